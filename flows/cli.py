"""The vggprice command: the common jobs, each a Prefect flow run."""

# (The docstring above is what --help shows: plain text, no markup.)

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from pydantic import ValidationError

# Defaults for what this command starts (a value the user set wins): the embedded Prefect
# server sends no telemetry unless the user turned it on, and its first start migrates a
# fresh SQLite database, which on a busy 2-core machine takes longer than Prefect's
# default 20 s wait for it.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def _quiet_environment() -> None:
    """Set before TensorFlow loads: its C++ start-up chatter (CPU flags; on machines
    without an NVIDIA device, its failed CUDA probe) is noise on a laptop; the lines its
    native code prints before logging exists are filtered out of this process's stderr
    while it loads. And Prefect's defaults, for the processes this command starts (its
    temporary server, Dask workers)."""
    from tasks.runtime import has_gpu_device, quiet_tensorflow_start

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if has_gpu_device() else "3")
    quiet_tensorflow_start()
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _prefect_defaults():
    """The same Prefect defaults for this process, which may have read its settings
    before this command set them (a caller that imported Prefect first). And where no
    PREFECT_API_URL is set: the server of a running `vggprice ui` on this PREFECT_HOME,
    for this process and those it starts, instead of a temporary server each."""
    import prefect.settings

    from tasks.deploy.local_ui import running_ui

    updates = {getattr(prefect.settings, n): os.environ[n] for n in PREFECT_DEFAULTS}
    api = None if prefect.settings.PREFECT_API_URL.value() else running_ui()
    if api:
        updates[prefect.settings.PREFECT_API_URL] = api
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = api
    try:
        with prefect.settings.temporary_settings(updates=updates):
            yield
    finally:
        if api:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


class _ServerNote(logging.Filter):
    """Prefect's note on its temporary server, in one line that says how to avoid it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server"):
            record.msg = (record.msg.split("\n")[0] + " (for this command; `vggprice ui` keeps "
                          "one running for every command)")  # fmt: skip
        return True


def _rule(args: argparse.Namespace):
    from tasks.data.prices import PriceRule

    if args.means is None and args.sigma is None:
        return None
    fields: dict = {}
    if args.means is not None:
        try:
            fields["means"] = [float(x) for x in args.means.split(",")]
        except ValueError:
            raise ValueError(
                f"--means must be 10 comma-separated numbers, got {args.means!r}"
            ) from None
    if args.sigma is not None:
        fields["sigma"] = args.sigma
    return PriceRule(**fields)


def _lake(args: argparse.Namespace, existing: bool = False):
    """The store of ``--store`` (or VGGPRICE_STORE), checked: fails fast with one line
    (``existing``: a command that only reads also when a local store is not there)."""
    from tasks.settings import load_settings
    from tasks.store.lake import Lake
    from tasks.store.storage import open_store

    store = open_store(load_settings(store=args.store).store)
    store.check(existing=existing)
    return Lake(store)


def _cmd_ingest(args: argparse.Namespace) -> dict:
    from flows.ingest import ingest_flow
    from tasks.data.fashion_mnist import find_source

    _lake(args)
    if args.source:  # a wrong directory stops here, before any run starts
        find_source(args.source)
    return ingest_flow(store=args.store, source=args.source)


def _cmd_label(args: argparse.Namespace) -> dict:
    from flows.label import label_flow

    _lake(args).dataset(args.dataset_version).manifest()  # known, or the known ones listed
    return label_flow(
        dataset_version=args.dataset_version, store=args.store, rule=_rule(args), seed=args.seed
    )


def _train_settings(args: argparse.Namespace, catalog: bool = False):
    from tasks.model.train_settings import CATALOG_DEFAULTS, QUICK, TrainSettings

    fields: dict = dict(CATALOG_DEFAULTS) if catalog else {}
    fields |= dict(QUICK) if getattr(args, "quick", False) else {}
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep or name not in TrainSettings.model_fields:
            known = ", ".join(TrainSettings.model_fields)
            raise ValueError(f"--set {item!r}: expected NAME=VALUE with NAME one of {known}")
        fields[name] = None if value.lower() in ("", "null") else value
    return TrainSettings(**fields)


def _mlflow(args: argparse.Namespace) -> str | None:
    """The tracking URI of ``--mlflow`` (or VGGPRICE_MLFLOW_TRACKING_URI), its
    credentials moved into this process's environment (never a flow parameter); mlflow
    is imported only when one is set, and must be installed then."""
    import importlib.util

    from tasks.governance.tracking import credentials_to_environment
    from tasks.settings import load_settings

    uri = load_settings(mlflow_tracking_uri=args.mlflow).mlflow_tracking_uri
    if uri and importlib.util.find_spec("mlflow") is None:
        raise ValueError("MLflow tracking is on (--mlflow or VGGPRICE_MLFLOW_TRACKING_URI) but "
                         "mlflow is not installed — pip install 'vggprice[mlflow]'")  # fmt: skip
    return credentials_to_environment(uri) or None


def _cmd_run(args: argparse.Namespace) -> dict:
    from flows.pipeline import retrain_flow

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1 extractor process")
    if args.prices or args.name:
        return _run_catalog(args)
    if args.skip_bad_rows:
        raise ValueError("--skip-bad-rows is for a catalog run (--source, --prices, --name)")
    if args.workers:
        raise ValueError("--workers spreads a catalog's feature extraction (--source, --prices, "
                         "--name); the demo's features are one cache, made in the training")  # fmt: skip
    _lake(args)
    if args.source:  # a wrong directory stops here, before any run starts
        from tasks.data.fashion_mnist import find_source

        find_source(args.source)
    return retrain_flow(
        store=args.store,
        source=args.source,
        rule=_rule(args),
        seed=args.seed,
        settings=_train_settings(args),
        margin=args.margin,
        force=args.force,
        mlflow_tracking_uri=_mlflow(args),
    )


def _run_catalog(args: argparse.Namespace) -> dict:
    """vggprice run --source ... --prices ... --name ...: a catalog's own line."""
    from flows.catalog import catalog_flow
    from flows.train import Extraction
    from tasks.data.catalog import check_inputs

    missing = [f for f in ("source", "prices", "name") if not getattr(args, f)]
    if missing:
        raise ValueError(f"a catalog run needs --{', --'.join(missing)} too (--source DIR_OR_S3, "
                         "--prices CSV_OR_PARQUET, --name NAME)")  # fmt: skip
    if args.means is not None or args.sigma is not None:
        raise ValueError("--means and --sigma draw the demo's prices; a catalog has its own")
    check_inputs(args.source, args.prices, args.name)  # what was typed, before any run
    settings = _train_settings(args, catalog=True)
    _lake(args)
    with _share_local_api() if args.workers else contextlib.nullcontext():
        return catalog_flow(source=args.source, prices=args.prices, name=args.name,
                            store=args.store, settings=settings, margin=args.margin,
                            skip_bad_rows=args.skip_bad_rows, force=args.force,
                            mlflow_tracking_uri=_mlflow(args),
                            extraction=Extraction(workers=args.workers or 0))  # fmt: skip


def _cmd_train(args: argparse.Namespace) -> dict:
    from flows.train import train_flow

    settings = _train_settings(args)  # bad settings are named before the store is read
    lake = _lake(args)
    lake.dataset(args.dataset_version).manifest()  # each known, or the known ones listed
    lake.labels(args.dataset_version, args.labels_version).scaling()
    return train_flow(
        dataset_version=args.dataset_version,
        labels_version=args.labels_version,
        store=args.store,
        settings=settings,
        mlflow_tracking_uri=_mlflow(args),
    )


def _cmd_evaluate(args: argparse.Namespace) -> dict:
    from flows.evaluate import evaluate_flow

    lake = _lake(args)
    lineage = lake.model(args.model_version).lineage()  # known, or the known ones listed
    if args.labels:
        lake.labels(lineage["dataset_version"], args.labels).scaling()
    return evaluate_flow(model_version=args.model_version, store=args.store,
                         labels_version=args.labels, mlflow_tracking_uri=_mlflow(args))  # fmt: skip


def _cmd_promote(args: argparse.Namespace) -> dict:
    from flows.evaluate import promote_flow

    _lake(args).model(args.model_version).lineage()
    return promote_flow(model_version=args.model_version, store=args.store, margin=args.margin,
                        force=args.force, mlflow_tracking_uri=_mlflow(args))  # fmt: skip


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _share_local_api():
    """Where no PREFECT_API_URL is set, start the temporary local server now and hand its
    address to the processes started inside (local Dask workers): one server for the run,
    instead of one more server and database connection per worker. The address is this
    command's only: the environment is as it was afterwards."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process's flow run will use too
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def engine_arguments(p: argparse.ArgumentParser, SCORE) -> None:  # noqa: N803 - as in build_parser
    from tasks.scoring.engines import ENGINES, PRECISIONS

    p.add_argument("--engine", choices=ENGINES, default=SCORE.engine,
                   help="keras or openvino; auto: keras on a GPU, else openvino "
                        f"(default {SCORE.engine})")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default=SCORE.precision,
                   help="int8 (openvino: made once per model, used only if it passes its "
                        "accuracy gate); auto: int8 where it passed, else float32 on "
                        "openvino, the machine's fastest on keras "
                        f"(default {SCORE.precision})")  # fmt: skip


def _cmd_score(args: argparse.Namespace) -> dict:
    from flows.score import score_flow
    from tasks.governance.registry import resolve_model
    from tasks.scoring.engines import check
    from tasks.scoring.runner import list_drop, locate_drop

    # Bad input (no such drop or model, an empty drop) stops here, before any run starts.
    check(args.engine, args.precision)
    lake = _lake(args, existing=True)
    resolve_model(lake, args.model, args.line)
    list_drop(lake, locate_drop(lake, args.drop, from_user=True))
    flow, scorers, api = score_flow, 2, contextlib.nullcontext()
    if args.workers or args.dask_address:
        from prefect_dask import DaskTaskRunner

        if args.dask_address:  # an existing cluster: one scorer per worker unless told
            from distributed import Client

            with Client(args.dask_address, timeout=30) as client:
                scorers = args.workers or len(client.scheduler_info()["workers"])
            runner = DaskTaskRunner(address=args.dask_address)
        else:  # N local scorer processes, one thread each, sharing the cores between them
            scorers, api = args.workers, _share_local_api()
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, _cores() // scorers)))
            runner = DaskTaskRunner(
                cluster_kwargs={"n_workers": scorers, "threads_per_worker": 1, "processes": True}
            )
        flow = score_flow.with_options(task_runner=runner)
    with api:
        return flow(
            drop=args.drop,
            store=args.store,
            model=args.model,
            shard_size=args.shard_size,
            max_pixels=args.max_pixels,
            max_bytes=args.max_bytes,
            max_rows_per_object=args.max_rows_per_object,
            scorers=scorers,
            engine=args.engine,
            precision=args.precision,
            claim_seconds=args.claim_seconds,
            wait=not args.no_wait,
            line=args.line,
            from_user=True,
        )


def _cmd_score_new(args: argparse.Namespace) -> dict:
    from flows.score import score_new_drops_flow
    from tasks.governance.registry import resolve_model
    from tasks.scoring.engines import check
    from tasks.scoring.runner import ScanIncomplete

    check(args.engine, args.precision)
    resolve_model(_lake(args, existing=True), None, args.line)  # a champion, or why not
    try:
        return score_new_drops_flow(store=args.store, shard_size=args.shard_size,
                                    line=args.line, engine=args.engine,
                                    precision=args.precision)  # fmt: skip
    except ScanIncomplete as err:  # what was priced, then a line per drop that was not
        print(json.dumps(err.result, indent=2) if args.json else _human(err.result))
        raise


def _cmd_notify(args: argparse.Namespace) -> dict:
    from tasks.governance.registry import resolve_model
    from tasks.scoring.arrivals import check_drop_id, notify_drop
    from tasks.scoring.runner import list_drop

    lake = _lake(args)
    drop = check_drop_id(args.drop)
    resolve_model(lake, None, args.line)  # a champion to price it with, or why not
    list_drop(lake, lake.drop(drop))  # no such drop, or an empty one: nothing is sent
    event = notify_drop(lake.uri, drop, args.line)
    return {"event": event["event"], "id": event["id"], "resource": event["resource"]}


def _cmd_bridge(args: argparse.Namespace) -> dict:
    from tasks.scoring.arrivals import open_bridge

    if args.quiet_seconds < 0:
        raise ValueError(f"--quiet-seconds must be >= 0, got {args.quiet_seconds:g}")
    store = _lake(args).uri
    bridge = open_bridge(args.sqs, store, quiet_seconds=args.quiet_seconds, line=args.line)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():  # stop cleanly, not exit
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return bridge.run(stop)


def _cmd_pools(args: argparse.Namespace) -> dict:
    from tasks.deploy.pools import apply_pools

    return apply_pools(args.pool or None)


def _catalog_schedule(args: argparse.Namespace) -> dict | None:
    """deploy --catalog NAME ...: the line's schedule, checked before anything is written
    (None without --catalog)."""
    from tasks.deploy.schedules import (
        DEFAULT_CRON,
        DEFAULT_TIMEZONE,
        catalog_parameters,
        cron_schedule,
    )
    from tasks.store.lake import check_line_name

    given = [f"--{f}" for f in ("source", "prices", "cron", "timezone", "set")
             if getattr(args, f) is not None]  # fmt: skip
    if not args.catalog:
        if given or args.remove:
            raise ValueError(f"{', '.join(given + ['--remove'] * args.remove)} go with "
                             "--catalog NAME: vggprice deploy --catalog NAME --source URI "
                             "--prices URI")  # fmt: skip
        return None
    check_line_name(args.catalog)
    if args.remove:
        if given:
            raise ValueError(f"--remove takes only --catalog NAME, not {', '.join(given)}")
        return {}
    missing = [f"--{f}" for f in ("source", "prices") if not getattr(args, f)]
    if missing:
        raise ValueError(f"a catalog schedule needs {' and '.join(missing)} too: vggprice "
                         "deploy --catalog NAME --source URI --prices URI")  # fmt: skip
    cron, timezone = args.cron or DEFAULT_CRON, args.timezone or DEFAULT_TIMEZONE
    cron_schedule(cron, timezone)
    settings = _train_settings(args, catalog=True).model_dump(mode="json", exclude_unset=True)
    store = _lake(args).uri  # where this command's store is, for the scheduled runs too
    parameters = catalog_parameters(args.catalog, args.source, args.prices, store, settings)
    return {"name": args.catalog, "parameters": parameters, "cron": cron, "timezone": timezone}


def _cmd_deploy(args: argparse.Namespace) -> dict:
    from tasks.deploy.pools import apply_pools, deploy_all, pool_kind
    from tasks.deploy.schedules import schedule_catalog, unschedule_catalog

    schedule = _catalog_schedule(args)  # a bad line, cron or setting stops before any write
    if args.remove:
        return unschedule_catalog(args.catalog)
    for pool in (args.cpu_pool, args.gpu_pool):  # a wrong name stops before any write
        pool_kind(pool)
    pools = apply_pools()
    out = deploy_all(
        cpu_pool=args.cpu_pool,
        gpu_pool=args.gpu_pool,
        cpu_image=args.cpu_image,
        gpu_image=args.gpu_image,
    )
    names = [line.split("'")[1] for line in out.splitlines() if "Deployment '" in line]
    result = {"pools": pools, "deployments": sorted(set(names))}
    if schedule:
        result["schedule"] = schedule_catalog(**schedule)
    return result


def _cmd_automations(args: argparse.Namespace) -> dict:
    from prefect.blocks.core import Block

    from tasks.deploy.pools import apply_automations

    block = Block.load(args.block)  # e.g. slack-webhook/vggprice-alerts
    return {"automations": apply_automations(str(block._block_document_id))}


def _cmd_worker(args: argparse.Namespace) -> dict:
    from tasks.deploy.pools import worker_command

    cmd = worker_command(args.pool, args.limit)
    os.execv(cmd[0], cmd)
    return {}  # not reached


def _cmd_ui(args: argparse.Namespace) -> dict:
    from tasks.deploy.local_ui import serve

    code = serve(args.host, args.port)
    if code:
        raise RuntimeError(f"the Prefect server stopped with status {code}")
    return {}


def _cmd_champion(args: argparse.Namespace) -> dict:
    from tasks.governance.registry import resolve_champion

    return resolve_champion(_lake(args, existing=True), args.line)


def _cmd_prices(args: argparse.Namespace) -> dict:
    from tasks.scoring.prices import current_prices, summary, write_prices

    if args.out:  # a bad --out is named before the store is read
        from tasks.scoring.prices import check_out

        check_out(args.out)
    prices = current_prices(_lake(args, existing=True), args.drop, args.model_version, args.line,
                            from_user=True)  # fmt: skip
    result = summary(prices)
    if args.out:
        result = {k: v for k, v in result.items() if not k.startswith("first_")}
        result["written"] = write_prices(prices, args.out)
    return result


def _cmd_gc(args: argparse.Namespace) -> dict:
    from tasks.governance.gc import collect_garbage, parse_age
    from tasks.model.ov_runtime import unfinished_conversions

    age = parse_age(args.older_than)  # a bad age is named before the store is read
    lake = _lake(args, existing=True)
    return collect_garbage(lake, age, args.dry_run, conversions=unfinished_conversions()).as_dict()


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1 else f"{value:,.2f}"


def _table(rows: list[dict], indent: str) -> str:
    """Rows (dicts) as an aligned text table, floats rounded, numbers to the right."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_number(v) if isinstance(v, float) else "" if v is None else str(v)
              for v in (r.get(c) for c in columns)] for r in rows]  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float) for r in rows if r.get(c) is not None)
               for c in columns]  # fmt: skip

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w)
               for v, w, num in zip(values, widths, numeric, strict=True)]  # fmt: skip
        return (indent + "  ".join(out)).rstrip()

    return "\n".join([line(columns), *(line(row) for row in cells)])


def _human(result: dict, indent: str = "") -> str:
    """A result a person reads: nested keys indented, numbers rounded, lists of rows as
    tables, empties left out; a result with a ``message`` is that one line."""
    if not indent and isinstance(result.get("message"), str):
        return result["message"]
    lines = []
    for key, value in result.items():
        if value is None or value == [] or value == {}:
            continue
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(_human(value, indent + "  "))
        elif isinstance(value, float):
            lines.append(f"{indent}{key}: {_number(value)}")
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:")
            lines.append(_table(value, indent + "  "))
        elif isinstance(value, list):
            lines.append(f"{indent}{key}: {', '.join(str(v) for v in value)}")
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(line for line in lines if line)


def _add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for the price draw (default 0)")
    p.add_argument(
        "--means", help="10 comma-separated class means (default: the recipe's, see README)"
    )
    p.add_argument("--sigma", type=float, help="noise sigma around each class mean (default 3)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from tasks.model.train_settings import QUICK

    p.add_argument(
        "--quick",
        action="store_true",
        help="laptop settings: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="a training setting, e.g. --set epochs=1 --set weights=none (repeatable)",
    )


MLFLOW_HELP = ("an MLflow tracking server, e.g. http://127.0.0.1:5000 (default "
               "$VGGPRICE_MLFLOW_TRACKING_URI; unset: no MLflow)")  # fmt: skip
LINE_HELP = "the model line: demo or a catalog's name (default: the store's only line)"


def build_parser() -> argparse.ArgumentParser:
    from tasks.governance.registry import MARGIN
    from tasks.scoring.ledger import ScoreOptions

    SCORE = ScoreOptions()  # the scoring defaults the options show
    parser = argparse.ArgumentParser(prog="vggprice", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="s3://bucket/prefix or a directory (default ./lake)")
    common.add_argument("--json", action="store_true", help="print a JSON result")
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks (also VGGPRICE_DEBUG=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", parents=[common], help="Fashion-MNIST into the store")
    p.add_argument("--source", help="directory with the four IDX files")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("label", parents=[common], help="prices for a dataset version")
    p.add_argument("dataset_version", help="as printed by 'vggprice ingest'")
    _add_label_args(p)
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("run", parents=[common], help="the whole pipeline on this machine")
    p.add_argument("--source", help="directory with the four IDX files; with --prices: the "
                   "catalog's images (a directory, s3:// prefix or Parquet file)")  # fmt: skip
    p.add_argument("--prices", help="your catalog's prices table (CSV or Parquet: image, price"
                   "[, category][, split])")  # fmt: skip
    p.add_argument("--name", help="the catalog's name: its dataset and model line")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and record) bad rows of the prices table instead of failing")  # fmt: skip
    _add_label_args(p)
    _add_train_args(p)
    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"promotion margin (default {MARGIN}: {MARGIN * 100:g}%%)")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="promote the model past the gate (recorded as forced)")  # fmt: skip
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.add_argument("--workers", type=int, metavar="N",
                   help="a catalog run: extract the frozen features in N local processes "
                        "(a Dask LocalCluster) before training")  # fmt: skip
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", parents=[common], help="train the price model")
    p.add_argument("dataset_version")
    p.add_argument("labels_version")
    _add_train_args(p)
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="metrics of a model version")
    p.add_argument("model_version")
    p.add_argument("--labels", help="labels version (default: the model's own)")
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("promote", parents=[common], help="champion/challenger gate")
    p.add_argument("model_version")
    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"required RMSE improvement (default {MARGIN})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="promote regardless (recorded)")
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("score", parents=[common], help="price every image of a drop")
    p.add_argument("drop", help="a drop id under drops/, or an s3:// URI or directory")
    p.add_argument("--model", help="pin a model version instead of the champion")
    p.add_argument("--shard-size", type=int, default=SCORE.shard_size,
                   help=f"objects per shard (default {SCORE.shard_size})")  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=SCORE.max_pixels,
                   help=f"refuse larger images (bombs; default {SCORE.max_pixels:,})")  # fmt: skip
    p.add_argument("--max-bytes", type=int, default=SCORE.max_bytes,
                   help=f"refuse larger files unread (default {SCORE.max_bytes:,})")  # fmt: skip
    p.add_argument("--max-rows-per-object", type=int, default=SCORE.max_rows_per_object,
                   help="refuse a Parquet file with more images, whole "
                        f"(default {SCORE.max_rows_per_object:,})")  # fmt: skip
    p.add_argument("--workers", type=int, help="N local scorer processes (a Dask LocalCluster)")
    p.add_argument("--dask-address", help="an existing Dask cluster, e.g. tcp://scheduler:8786")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="stop (status 3) instead of waiting for shards that live scorers hold",
    )
    p.add_argument("--claim-seconds", type=float, default=SCORE.claim_seconds,
                   help="a scorer's claim expires this long after its last heartbeat "
                        f"(default {SCORE.claim_seconds:g})")  # fmt: skip
    p.add_argument("--line", help=LINE_HELP)
    engine_arguments(p, SCORE)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("score-new", parents=[common], help="price every drop not yet priced")
    p.add_argument("--shard-size", type=int, default=SCORE.shard_size,
                   help=f"objects per shard (default {SCORE.shard_size})")  # fmt: skip
    p.add_argument("--line", help=LINE_HELP)
    engine_arguments(p, SCORE)
    p.set_defaults(func=_cmd_score_new)

    p = sub.add_parser("prices", parents=[common],
                       help="a drop's current prices (one row per image) and its rejections")  # fmt: skip
    p.add_argument("drop", help="a drop id under drops/, or the s3:// URI or directory it was "
                   "scored from")  # fmt: skip
    p.add_argument("--line", help=LINE_HELP)
    p.add_argument("--model-version", help="the model that priced it (default: the champion)")
    p.add_argument("--out", help="write the prices to this .csv or .parquet file, and the "
                   "rejected files with their reasons beside it (NAME-rejected.csv)")  # fmt: skip
    p.set_defaults(func=_cmd_prices)

    p = sub.add_parser("notify", parents=[common],
                       help="a drop is complete: price it now (an event on PREFECT_API_URL)")  # fmt: skip
    p.add_argument("drop", help="the drop's folder name under drops/")
    p.add_argument("--line", help=LINE_HELP)
    p.set_defaults(func=_cmd_notify)

    p = sub.add_parser("bridge", parents=[common],
                       help="S3 notifications on SQS -> one event per drop (runs until stopped)")  # fmt: skip
    p.add_argument("--sqs", required=True, metavar="QUEUE_URL",
                   help="the queue the store's bucket notifies (s3:ObjectCreated:*)")  # fmt: skip
    p.add_argument("--quiet-seconds", type=float, default=30.0,
                   help="emit a drop's event once it has had no new object for this long, "
                        "or at once on its drops/<drop>/.ready marker (default 30)")  # fmt: skip
    p.add_argument("--line", help=LINE_HELP)
    p.set_defaults(func=_cmd_bridge)

    p = sub.add_parser("pools", parents=[common], help="work pools on PREFECT_API_URL")
    p.add_argument("action", choices=["apply"], help="create or update every pool from infra/")
    p.add_argument("--pool", action="append", help="only this pool (repeatable)")
    p.set_defaults(func=_cmd_pools)

    p = sub.add_parser("deploy", parents=[common], help="pools + deployments on PREFECT_API_URL")
    p.add_argument("--cpu-pool", default="cpu", help="cpu or cpu-docker (default cpu)")
    p.add_argument("--gpu-pool", default="gpu",
                   help="gpu, gpu-docker, gpu-k8s, gpu-ecs, or a cpu pool (default gpu)")  # fmt: skip
    p.add_argument("--cpu-image", help="image for a container cpu pool (default: the pool's)")
    p.add_argument("--gpu-image", help="image for a container gpu pool (your registry's tag)")
    p.add_argument("--catalog", metavar="NAME",
                   help="then schedule this catalog line's retrain on retrain-catalog (one "
                        "schedule per line; again for the same line replaces it)")  # fmt: skip
    p.add_argument("--source", help="with --catalog: the catalog's images (a directory, s3:// "
                   "prefix or Parquet file)")  # fmt: skip
    p.add_argument("--prices", help="with --catalog: its prices table (CSV or Parquet)")
    p.add_argument("--cron", help='with --catalog: when it runs (default "0 3 * * *")')
    p.add_argument("--timezone", help="with --catalog: the cron's time zone (default UTC)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="with --catalog: a training setting of its runs, as on run (repeatable)")  # fmt: skip
    p.add_argument("--remove", action="store_true",
                   help="with --catalog: delete that line's schedule only (no deploy)")  # fmt: skip
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("automations", parents=[common], help="notify on failures/rejections")
    p.add_argument("action", choices=["apply"])
    p.add_argument("--block", required=True, help="notification block, e.g. slack-webhook/alerts")
    p.set_defaults(func=_cmd_automations)

    p = sub.add_parser("worker", help="start a worker for a pool (prefect worker start)")
    p.add_argument("--pool", default="cpu", help="a pool of infra/work-pools (default cpu)")
    p.add_argument("--limit", type=int, help="flow runs at a time (e.g. 1 per GPU)")
    p.set_defaults(func=_cmd_worker, json=False)

    p = sub.add_parser("ui", help="the Prefect UI and server the commands use (until Ctrl-C)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    p.set_defaults(func=_cmd_ui, json=False, debug=False)

    p = sub.add_parser("gc", parents=[common], help="remove orphans: losing attempts, "
                       "stale checkpoints, lapsed claims, temp files")  # fmt: skip
    p.add_argument("--older-than", default="7d", metavar="AGE",
                   help="only what is older than this: 30m, 12h, 7d (default 7d)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser("champion", parents=[common], help="print the model in service")
    p.add_argument("--line", help=LINE_HELP)
    p.set_defaults(func=_cmd_champion)
    return parser


class _NoTracebacks(logging.Filter):
    """Log records keep their one-line message; their tracebacks go (see --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_tracebacks() -> None:
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(n) for n in logging.root.manager.loggerDict),
    ]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            handler.addFilter(_NoTracebacks())


def _error(message: str) -> None:
    text = str(message).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # a KeyError's message comes quoted
    lines = text.splitlines() or ["unknown error"]
    print(f"vggprice: error: {lines[0]}", file=sys.stderr)


def _stop_temporary_servers(signum: int, _frame) -> None:
    """SIGTERM or SIGINT: stop the temporary Prefect servers this process started (a
    process exit on a signal runs no atexit hook, so the server would keep running,
    orphaned), then exit with 128 + the signal's number. In a flow run Prefect's own
    handler runs first (the run is marked crashed) and then hands the signal on here."""
    module = sys.modules.get("prefect.server.api.server")
    servers = getattr(getattr(module, "SubprocessASGIServer", None), "_instances", {})
    for server in list(servers.values()):
        server.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """The command; while it runs, SIGTERM and SIGINT stop its temporary Prefect server
    (the handlers before are put back when it returns, for callers in-process)."""
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if main_thread else ()  # main thread only
    before = {sig: signal.signal(sig, _stop_temporary_servers) for sig in signals}
    try:
        return _main(argv)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    _quiet_environment()
    from tasks.settings import load_settings

    args = build_parser().parse_args(argv)
    try:
        debug = getattr(args, "debug", False) or load_settings().debug
    except ValidationError as err:  # a VGGPRICE_* variable that is not a valid value
        first = err.errors()[0]
        _error(f"VGGPRICE_{str(first['loc'][0]).upper()}: {first['msg']} (in the environment)")
        return 2
    if not debug:
        import prefect  # noqa: F401 - its log handlers exist once it is imported

        _quiet_tracebacks()
    prefect_logger = logging.getLogger("prefect")
    if not any(isinstance(f, _ServerNote) for f in prefect_logger.filters):
        prefect_logger.addFilter(_ServerNote())
    func: Callable[[argparse.Namespace], dict] = args.func
    try:
        with _prefect_defaults():
            result = func(args)
    except Exception as err:
        if debug:
            raise
        return _report(err)
    if result or args.json:
        print(json.dumps(result, indent=2, default=str) if args.json else _human(result))
    return 0


def _report(err: Exception) -> int:
    """One line for the user, and the exit status: 2 bad input or settings, 3 the drop is
    held by other scorers, 1 anything else (the traceback with --debug)."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        _error(f"{where + ': ' if where else ''}{first['msg']}")
        return 2
    from tasks.scoring.ledger import DropBusy

    if isinstance(err, DropBusy):
        _error(str(err))
        return 3
    from tasks.scoring.runner import ScanIncomplete

    if isinstance(err, ScanIncomplete):
        for line in err.lines():
            _error(line)
        return 1
    if isinstance(err, (ValueError, FileNotFoundError, KeyError)):
        _error(str(err) or type(err).__name__)
        return 2
    _error(f"{type(err).__name__}: {str(err).strip() or 'no message'} (for the traceback: "
           "--debug or VGGPRICE_DEBUG=1)")  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
