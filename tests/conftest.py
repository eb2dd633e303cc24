"""Shared fixtures: a real S3 endpoint (moto's server over HTTP), a Prefect
server for flow tests, and small generated IDX files."""

from __future__ import annotations

import atexit
import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.servers import copy_sqlite, free_port, migrated_prefect_db, running_prefect_server

# Keep test runs out of the user's Prefect database, caches and store, and quiet. The
# scratch directory (Prefect's home, the model cache: about 2 GB by the end of a run, the
# session's tiny lake) goes when this process ends.
REPORTS = "VGGPRICE_TEST_REPORTS"  # set in an own-process child: where it writes its reports
PREFECT_URL = "VGGPRICE_TEST_PREFECT_API"  # the session's Prefect server, once started
SCRATCH = Path(tempfile.mkdtemp(prefix="vggprice-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
if not os.environ.get(REPORTS):  # the main process: its own-process children share these
    os.environ.update(
        PREFECT_HOME=str(SCRATCH / "prefect"),
        VGGPRICE_CACHE_DIR=str(SCRATCH / "cache"),
        VGGPRICE_TEST_TINY_LAKE=str(SCRATCH / "tiny"),
        VGGPRICE_TEST_PREFECT_DB=str(SCRATCH / "prefect-migrated.db"),  # servers.py
    )
    os.environ.pop(PREFECT_URL, None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never use the user's store or data source by accident.
for var in ("VGGPRICE_STORE", "VGGPRICE_DATA_SOURCE", "FASHION_MNIST_DIR", "AWS_ENDPOINT_URL"):
    os.environ.pop(var, None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_uri(s3_endpoint):
    """A fresh bucket (and prefix) for one test: s3://bucket/prefix."""
    import boto3

    bucket = f"vp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return f"s3://{bucket}/lake"


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """The same test against both backends."""
    if request.param == "local":
        return str(tmp_path / "lake")
    return request.getfixturevalue("s3_uri")


_servers = contextlib.ExitStack()  # the shared Prefect server; closed when pytest ends


def shared_prefect_api() -> str:
    """The session's Prefect API (`prefect server start` on SQLite in the scratch
    directory), started on first use; own-process children inherit its URL."""
    if PREFECT_URL not in os.environ:
        home = SCRATCH / "prefect-server"
        os.environ[PREFECT_URL] = _servers.enter_context(running_prefect_server(home))
    return os.environ[PREFECT_URL]


def prefect_home(path: Path) -> str:
    """A PREFECT_HOME of its own for a CLI run, holding a copy of an empty migrated
    database, so that the run's temporary server starts in seconds."""
    path.mkdir(parents=True, exist_ok=True)
    if template := migrated_prefect_db():
        copy_sqlite(template, path / "prefect.db")
    return str(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    _servers.close()


@pytest.fixture(scope="session")
def prefect_server():
    """A real (temporary) Prefect API server for the flow runs of this session."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: shared_prefect_api()}):
        yield


# --- generated IDX files ------------------------------------------------------


def idx_images(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    n, h, w = images.shape
    header = b"".join(x.to_bytes(4, "big") for x in (magic, n, h, w))
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    return (
        magic.to_bytes(4, "big")
        + len(labels).to_bytes(4, "big")
        + labels.astype(np.uint8).tobytes()
    )


def garments(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Generated 28x28 gray garments: a bright square whose size depends on the class,
    on a dark field; every class present."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 4 : 6 + 2 * c, 4 : 6 + 2 * c] = 200 + c * 5
    return images.astype(np.uint8), labels


def write_idx_source(directory: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Four gzip IDX files in Fashion-MNIST's names, holding generated garments."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = garments(n, rng)
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(images)))
        (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(labels)))
    return directory


@pytest.fixture
def idx_source(tmp_path) -> Path:
    return write_idx_source(tmp_path / "idx")


# --- one tiny trained model per session, copied into the stores that need one --------

# Small and fast: 32x32 input, random init, the first 15 layers frozen, one cached view.
TINY = {"weights": "none", "freeze": 15, "input_size": 32, "epochs": 1, "views": 1}


@pytest.fixture(scope="session")
def tiny_lake():
    """A local lake with a dataset (shards of 30 rows), labels, and one TINY model,
    promoted: trained once for the whole session (children included). Tests copy it
    (`copy_lake`) before they write."""
    from tasks.data.fashion_mnist import find_source, ingest
    from tasks.data.prices import PriceRule, make_labels
    from tasks.governance.registry import promote
    from tasks.model.train_settings import TrainSettings
    from tasks.model.training import version_for
    from tasks.store.lake import Lake
    from tasks.store.storage import LocalStore

    root = Path(os.environ["VGGPRICE_TEST_TINY_LAKE"])
    done = root / "versions.json"  # written last: the lake is complete
    lake = Lake(LocalStore(root / "lake"))
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        source = find_source(write_idx_source(root / "idx"))
        dv = ingest(lake, source, shard_rows=30)["version"]
        lv = make_labels(lake, dv, PriceRule(), seed=0)["labels_version"]
        mv = train_in_child(root / "lake", dv, lv, TINY)
        assert mv == version_for(dv, lv, TrainSettings(**TINY))
        promote(lake, mv)
        done.write_text(json.dumps([dv, lv, mv]))
    dv, lv, mv = json.loads(done.read_text())
    return lake, dv, lv, mv


def train_in_child(lake_dir: Path, dv: str, lv: str, settings: dict) -> str:
    """`train` on a local lake in a fresh Python process (the memory TensorFlow keeps
    from the fit goes with it); the model version."""
    code = ("import json, sys; from tasks.store.lake import Lake; from tasks.store.storage import LocalStore; "
            "from tasks.model.train_settings import TrainSettings; from tasks.model.training import train; "
            "d, dv, lv, s = sys.argv[1:]; "
            "print(train(Lake(LocalStore(d)), dv, lv, TrainSettings(**json.loads(s)))"
            "['model_version'])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(lake_dir), dv, lv, json.dumps(settings)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.split()[-1]


def copy_lake(source, target_uri: str):
    """Every object of one lake into another store (a fresh copy for one test)."""
    from tasks.store.lake import Lake
    from tasks.store.storage import open_store

    target = Lake(open_store(target_uri))
    for info in source.store.list():
        target.store.put_bytes(info.key, source.store.get_bytes(info.key))
    return target


# --- tests that train in a process of their own ----------------------------------
# TensorFlow keeps native memory from every model.fit of a process (about 100-400 MB a
# training, clear_session does not give it back: tensorflow/tensorflow#61791). Tests marked
# `own_process` run, a few at a time, in a fresh pytest process whose reports come back to
# this one as pytest-xdist carries them, so the suite's memory does not grow with each fit.

BATCH = 4  # marked tests per fresh process: ~5 s of start-up against ~0.25 GB a training
_config: pytest.Config | None = None
_from_child: dict[str, list[pytest.TestReport]] = {}  # reports not yet shown, by test
_sent: set[str] = set()  # tests already run in a child


def pytest_configure(config: pytest.Config) -> None:
    global _config  # noqa: PLW0603 - the hook below gets no config of its own
    _config = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get(REPORTS) and _config is not None:
        data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
        with open(os.environ[REPORTS], "a") as f:
            f.write(json.dumps(data) + "\n")


def _run_in_child(item: pytest.Item) -> None:
    """Run this test and the next marked ones of its file (BATCH in all) in one fresh
    pytest process; keep each test's reports for its turn."""
    config = item.config
    batch = [
        i
        for i in item.session.items
        if i.get_closest_marker("own_process") and i.path == item.path and i.nodeid not in _sent
    ][:BATCH]
    lines: list[str] = []
    try:  # whatever goes wrong here fails these tests, not the whole session
        if any("prefect_server" in i.fixturenames for i in batch):
            shared_prefect_api()  # started here, so that it outlives the child
        with tempfile.TemporaryDirectory(prefix="vggprice-own-process-") as base:
            out = Path(base) / "reports.jsonl"
            cmd = [sys.executable, "-m", "pytest", *(i.nodeid for i in batch), "-q", "-p",
                   "no:cacheprovider", "--basetemp", str(Path(base) / "tmp"), "-o", "addopts="]  # fmt: skip
            child = subprocess.run(cmd, cwd=config.rootpath, env=os.environ | {REPORTS: str(out)},
                                   capture_output=True, text=True)  # fmt: skip
            ended = (f"the tests' own process ended with status {child.returncode} before this "
                     f"test did:\n{child.stdout[-4000:]}{child.stderr[-4000:]}")  # fmt: skip
            lines = out.read_text(errors="replace").splitlines() if out.exists() else []
    except Exception as err:  # noqa: BLE001 - a full disk, a server that did not start, ...
        ended = f"the tests' own process could not run: {err.__class__.__name__}: {err}"
    for line in lines:
        try:  # a line cut short (the child killed mid-write, a full disk) is dropped
            data = json.loads(line)
        except ValueError:
            continue
        report = config.hook.pytest_report_from_serializable(config=config, data=data)
        _from_child.setdefault(report.nodeid, []).append(report)
    for i in batch:
        _sent.add(i.nodeid)
        reports = _from_child.setdefault(i.nodeid, [])
        if not any(r.when == "teardown" for r in reports):  # the child died before it ended
            reports.append(pytest.TestReport(i.nodeid, i.location, {}, "failed", ended, "call"))


def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if item.get_closest_marker("own_process") is None or os.environ.get(REPORTS):
        return None
    if item.nodeid not in _sent:
        _run_in_child(item)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _from_child.pop(item.nodeid):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


# --- a real Prefect server --------------------------------------------------------


@pytest.fixture
def prefect_api(tmp_path):
    """A real Prefect API server for one test."""
    with running_prefect_server(tmp_path / "prefect-home") as url:
        yield url
