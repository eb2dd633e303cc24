"""MLflow, brought up to date from the lake: runs, metric histories, models, the registry.

The lake stays the source of truth. Every function here reads what the lake holds and
makes MLflow show it, doing only what MLflow lacks, so the same call is both the first
record and the repair of anything a lost call or a server that was down left behind:

- one run per model version in the experiment ``vggprice``, found again by the tag
  ``vggprice.model_version`` (never created twice): every training setting as a param,
  the versions and the Prefect flow run id as tags, ``loss`` / ``val_loss`` per epoch,
  the model's files (config, history, summary, plots) as artifacts, the model itself
  (the ``mlflow.keras`` flavour) and each evaluation's metrics;
- one registered model per model line (``vggprice-demo``, ``vggprice-<line>``), a
  registered version for every evaluated model version, and the aliases ``champion``
  (the lake's champion pointer) and ``challenger`` (the newest candidate the gate
  rejected against that champion).

Nothing imports mlflow unless a tracking URI is set (``track``), and MLflow being down
never fails a stage: ``track`` logs one warning line and the next call reconciles.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from tasks.runtime import get_logger
from tasks.store.lake import Lake, Model, line_of

EXPERIMENT = "vggprice"
MODEL_TAG = "vggprice.model_version"  # finds a model version's run again
COMPLETE_TAG = "vggprice.recorded"  # set last: the run holds the training (params .. model)
MODEL_URI_TAG = "vggprice.model_uri"  # the logged model's models:/ URI, as log_model returned it
LOGGED_MODEL = "model"  # the name of the logged model in its run
CHAMPION, CHALLENGER = "champion", "challenger"
PROBE_SECONDS = 5  # how long a health check of an http(s) tracking server waits


def registered_name(line: str) -> str:
    """A model line's registered model: vggprice-demo, vggprice-<catalog name>."""
    return f"vggprice-{line}"


def safe_uri(uri: str) -> str:
    """The tracking URI without user:password (and without a query), fit to print or link."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def credentials_to_environment(uri: str | None) -> str | None:
    """The tracking URI fit for a flow parameter (Prefect stores parameters and shows
    them): without ``user:password@``, which go instead to this process's environment,
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, where MLflow's client reads
    them (and the runs and processes it starts inherit them). Any other URI as it is."""
    parts = urlsplit(uri or "")
    if "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if has_password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI's page of a run, for an http(s) tracking server (None otherwise)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    return f"{safe_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def track(uri: str | None, what: str, fn: Callable[[Tracker], Any]) -> Any:
    """``fn(Tracker(uri))``, or None without touching mlflow when ``uri`` is unset. Any
    failure (server down, mlflow missing, a refusal) is one warning line: the lake has
    ``what`` and the next run with tracking on brings MLflow up to date."""
    if not uri:
        return None
    try:
        return fn(Tracker(uri))
    except ImportError:
        get_logger().warning("MLflow tracking is on but mlflow is not installed: %s is not "
                             "in MLflow; pip install 'vggprice[mlflow]'", what)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - tracking never fails the stage
        get_logger().warning(
            "MLflow at %s: %s is not recorded there (%s); the lake has it, and the next run "
            "with tracking on brings MLflow up to date",
            safe_uri(uri), what, _one_line(err),
        )  # fmt: skip
    return None


def record_model(
    uri: str | None, lake: Lake, model_version: str, flow_run_id: str | None = None
) -> str | None:
    """The model version's run up to date (training and evaluations); its UI link."""
    return track(uri, f"model {model_version}",
                 lambda t: t.link(t.sync_model(lake, model_version, flow_run_id)))  # fmt: skip


def record_line(uri: str | None, lake: Lake, line: str) -> dict | None:
    """The line's registered model up to date with the lake's gate (see Tracker.sync_line)."""
    return track(uri, f"the {line} line's champion and challenger",
                 lambda t: t.sync_line(lake, line))  # fmt: skip


class Tracker:
    """One tracking server (and its registry), brought up to date from a lake."""

    def __init__(self, uri: str):
        # A server that is down answers in seconds instead of after MLflow's default
        # retries (minutes): only where the user set nothing of their own.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we log links
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as Prefect's analytics: off
        from mlflow import MlflowClient

        self.uri = uri = credentials_to_environment(uri)
        self._probe()
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiment_id: str | None = None

    def _probe(self) -> None:
        """Fail at once (not after retries) when an http(s) server does not answer."""
        if urlsplit(self.uri).scheme not in ("http", "https"):
            return
        parts = urlsplit(self.uri)
        health = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1],
                             parts.path.rstrip("/") + "/health", "", ""))  # fmt: skip
        try:
            urllib.request.urlopen(health, timeout=PROBE_SECONDS).close()
        except OSError as err:
            raise ConnectionError(f"no answer from {safe_uri(self.uri)}: {err}") from err

    # --- the run of a model version ------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(EXPERIMENT)
                except Exception:  # another process created it meanwhile
                    self._experiment_id = self.client.get_experiment_by_name(
                        EXPERIMENT
                    ).experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def find_run(self, model_version: str):
        """The model version's run (the oldest, should a race have made two), or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MODEL_TAG}` = '{model_version}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def link(self, run) -> str | None:
        return run_url(self.uri, run.info.experiment_id, run.info.run_id)

    def sync_model(self, lake: Lake, model_version: str, flow_run_id: str | None = None):
        """The model version's run, with what MLflow lacks of the lake's training and
        evaluations added; returns the run."""
        model = lake.model(model_version)
        lineage = model.lineage()
        run = self.find_run(model_version) or self._create_run(model, lineage, flow_run_id)
        if run.data.tags.get(COMPLETE_TAG) != "true":
            self._record_training(run.info.run_id, model, lineage)
        self._record_evaluations(run.info.run_id, model, set(run.data.metrics))
        return self.client.get_run(run.info.run_id)

    def _create_run(self, model: Model, lineage: dict, flow_run_id: str | None):
        from prefect.runtime import flow_run

        flow_run_id = flow_run_id or flow_run.get_id()
        tags = {
            MODEL_TAG: model.version,
            "vggprice.line": line_of(lineage["dataset_version"]),
            "vggprice.dataset_version": lineage["dataset_version"],
            "vggprice.labels_version": lineage["labels_version"],
            "vggprice.model_sha256": lineage.get("model_sha256", ""),
            "vggprice.store": model.store.uri,
            "mlflow.runName": model.version,
        }
        if flow_run_id:
            tags["prefect.flow_run_id"] = str(flow_run_id)
        return self.client.create_run(self.experiment_id, start_time=_started_ms(lineage),
                                      tags=tags, run_name=model.version)  # fmt: skip

    def _record_training(self, run_id: str, model: Model, lineage: dict) -> None:
        """Params, the per-epoch metric history, the files and the model, each only if
        missing; the complete tag last."""
        from mlflow.entities import Metric, Param

        config, history = model.config(), model.history()
        have = self.client.get_run(run_id).data.params
        params = [Param(k, str(v)) for k, v in sorted(config["settings"].items()) if k not in have]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(run_id, params=params[i : i + 100])
        at = _created_ms(lineage)
        for key in ("loss", "val_loss"):
            logged = {m.step for m in self.client.get_metric_history(run_id, key)}
            metrics = [Metric(key, float(v), at, step) for step, v in
                       enumerate(history.get(key, []), start=1) if step not in logged]  # fmt: skip
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)
        self._log_files(run_id, model)
        logged = self._logged_model(run_id)
        uri = logged.model_uri if logged else self._log_model(run_id, model, lineage, config)
        self.client.set_tag(run_id, MODEL_URI_TAG, uri)
        self.client.set_tag(run_id, COMPLETE_TAG, "true")
        self.client.set_terminated(run_id, "FINISHED", end_time=at)

    def _log_files(self, run_id: str, model: Model) -> None:
        """The model's files but model.keras (config, history, summary, plots), as
        artifacts under the same names (re-logging a file replaces it)."""
        files = model.files()
        with tempfile.TemporaryDirectory() as tmp:
            for name in files.names():
                if name != files.FILE:
                    path = Path(tmp, name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(files.get_bytes(name))
            self.client.log_artifacts(run_id, tmp)

    def _logged_model(self, run_id: str):
        """The run's logged model, once uploaded whole (READY), or None."""
        found = self.client.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        ready = [m for m in found if str(getattr(m.status, "value", m.status)) == "READY"]
        return ready[0] if ready else None

    def _log_model(self, run_id: str, model: Model, lineage: dict, config: dict) -> str:
        """model.keras through the mlflow.keras flavour (MLflow 3: ``name=``); returns the
        ``models:/`` URI of the returned ModelInfo."""
        import mlflow
        import mlflow.keras
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
        from mlflow.types import Schema, TensorSpec

        from tasks.model.export import load_stored_model

        libraries = lineage.get("libraries") or {}
        requirements = [f"{lib}=={libraries[lib]}" for lib in ("keras", "tensorflow")
                        if libraries.get(lib)]  # fmt: skip
        shape = tuple(config["input"]["shape"])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape), "pixels")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1), "price")]),
        )
        net = load_stored_model(model)
        # The flavour logs through the fluent API: point it here for this block only, and
        # put back exactly what was set before (often nothing), as MLflow's own helper does.
        with _use_tracking_uri(self.uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.keras.log_model(
                net, name=LOGGED_MODEL, signature=signature, pip_requirements=requirements,
                tags={MODEL_TAG: model.version},
            )  # fmt: skip
        return info.model_uri

    def _record_evaluations(self, run_id: str, model: Model, logged: set[str]) -> None:
        """Each complete evaluation's numbers: ``test_<metric>`` on the model's own
        labels, ``test_<metric>.<labels version>`` on others; plots as artifacts."""
        from mlflow.entities import Metric

        for i, evaluation in enumerate(model.evaluations()):
            suffix = "" if i == 0 else f".{evaluation.labels_version}"
            metrics = evaluation.metrics() or {}
            new = [
                Metric(f"test_{k}{suffix}", float(v), int(time.time() * 1000), 0)
                for k, v in sorted(metrics.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                and f"test_{k}{suffix}" not in logged
            ]  # fmt: skip
            if not new:
                continue
            self.client.log_batch(run_id, metrics=new)
            with tempfile.TemporaryDirectory() as tmp:
                for name in evaluation.plot_names():
                    Path(tmp, f"{name}.png").write_bytes(evaluation.plot(name))
                self.client.log_artifacts(run_id, tmp, f"evaluation/{evaluation.labels_version}")

    # --- the registry ---------------------------------------------------------------------

    def registered_version(self, lake: Lake, model_version: str) -> str | None:
        """The model version's registered version in its line (made when missing), for an
        evaluated model version; None while it has no evaluation."""
        model = lake.model(model_version)
        if not model.evaluation().complete:
            return None
        run = self.sync_model(lake, model_version)
        name = registered_name(line_of(model.lineage()["dataset_version"]))
        self._registered_model(name)
        found = self.client.search_model_versions(
            f"name = '{name}' and run_id = '{run.info.run_id}'"
        )
        if found:
            return found[0].version
        model_uri = (
            run.data.tags.get(MODEL_URI_TAG) or self._logged_model(run.info.run_id).model_uri
        )
        created = self.client.create_model_version(
            name, model_uri, run_id=run.info.run_id, model_id=model_uri.rsplit("/", 1)[-1],
            tags={MODEL_TAG: model_version}, run_link=self.link(run),
            description=f"{model_version}: dataset {run.data.tags.get('vggprice.dataset_version')}, "
            f"labels {run.data.tags.get('vggprice.labels_version')}",
        )  # fmt: skip
        return created.version

    def _registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    name, description="vggprice model line; the lake's registry decides the "
                    "champion, and these aliases follow it",
                )  # fmt: skip
            except MlflowException:  # created meanwhile
                self.client.get_registered_model(name)

    def sync_line(self, lake: Lake, line: str) -> dict:
        """Every model version the line's gate decided on registered, ``champion`` on the
        lake's champion and ``challenger`` on the newest candidate rejected since the last
        promotion (removed when there is none); returns alias -> model version."""
        registry = lake.registry(line)
        decisions = registry.decisions()
        champion = (registry.champion() or {}).get("model_version")
        decided = [v for d in decisions for v in (d["challenger"]["model_version"],
                                                  (d.get("champion") or {}).get("model_version"))
                   if v]  # fmt: skip
        versions = {}
        for mv in dict.fromkeys([*decided, *([champion] if champion else [])]):
            versions[mv] = self.registered_version(lake, mv)
        challenger = None
        for d in decisions:  # oldest first: the last rejection after the last promotion stands
            if d["promoted"]:
                challenger = None
            elif d["challenger"]["model_version"] != champion:
                challenger = d["challenger"]["model_version"]
        name = registered_name(line)
        aliases = {}
        for alias, mv in ((CHAMPION, champion), (CHALLENGER, challenger)):
            if mv and versions.get(mv):
                self.client.set_registered_model_alias(name, alias, versions[mv])
                aliases[alias] = mv
            elif versions:
                self._drop_alias(name, alias)
        return aliases

    def _drop_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return
        self.client.delete_registered_model_alias(name, alias)


def _created_ms(lineage: dict) -> int:
    try:
        stamp = time.strptime(lineage["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    except (KeyError, ValueError):
        return int(time.time() * 1000)
    import calendar

    return calendar.timegm(stamp) * 1000


def _started_ms(lineage: dict) -> int:
    seconds = (lineage.get("training") or {}).get("seconds") or 0
    return _created_ms(lineage) - int(float(seconds) * 1000)
