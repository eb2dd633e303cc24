"""Shared fixtures: a real S3 endpoint (moto's server over HTTP), a Prefect
server for flow tests, and small generated IDX files. Importing this module changes
nothing: the environment is set when pytest configures itself (`pytest_configure`)."""

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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pytest

from tests.own_process import OwnProcessRunner, in_child
from tests.servers import copy_sqlite, free_port, migrated_prefect_db, running_prefect_server
from tests.tiers import TIERS, UNIT, mark_tiers, unit_guard

if TYPE_CHECKING:
    from tasks.store.lake import Lake

PREFECT_URL = "VGGPRICE_TEST_PREFECT_API"  # the session's Prefect server, once started
REPO = Path(__file__).resolve().parents[1]
_scratch: Path | None = None  # this process's scratch directory, made by pytest_configure


def scratch() -> Path:
    """This pytest process's scratch directory (removed when the process ends)."""
    assert _scratch is not None, "pytest_configure makes it"
    return _scratch


@pytest.hookimpl(tryfirst=True)  # before any other plugin's configure reads the environment
def pytest_configure(config: pytest.Config) -> None:
    """Keep test runs out of the user's Prefect database, caches and store, and quiet.

    The scratch directory (Prefect's home, the model cache: about 2 GB by the end of a run,
    the session's tiny lake) goes when this process ends. The main process points the
    environment into its own; its own-process children inherit that environment, and so
    share its Prefect home, model cache, tiny lake and Prefect server."""
    global _scratch  # noqa: PLW0603 - one per process, like the environment it names
    _scratch = Path(tempfile.mkdtemp(prefix="vggprice-tests-"))
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    if not in_child():  # the main process: its own-process children share these
        os.environ.update(
            PREFECT_HOME=str(_scratch / "prefect"),
            VGGPRICE_CACHE_DIR=str(_scratch / "cache"),
            VGGPRICE_TEST_TINY_LAKE=str(_scratch / "tiny"),
            VGGPRICE_TEST_PREFECT_DB=str(_scratch / "prefect-migrated.db"),  # servers.py
            # quantizing at every promotion would slow the flow tests by minutes; the
            # engine tests turn it on (tests/test_engines.py)
            VGGPRICE_ENGINES_AT_PROMOTION="false",
        )
        os.environ.pop(PREFECT_URL, None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Tests never use the user's store or data source by accident.
    for var in ("VGGPRICE_STORE", "VGGPRICE_DATA_SOURCE", "FASHION_MNIST_DIR", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)
    for tier, what in TIERS.items():  # tests/tiers.py gives every test one
        config.addinivalue_line("markers", f"{tier}: {what}")
    # Tests marked own_process run in fresh pytest processes (tests/own_process.py).
    config.pluginmanager.register(OwnProcessRunner(config, prepare=_servers_for), "own-process")


@pytest.hookimpl(tryfirst=True)  # before `-m` picks a tier
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test marked with its tier (tests/tiers.py); none may lack one."""
    mark_tiers(items, REPO / "tests")


_violations = pytest.StashKey[list[str]]()  # what a unit test did that only integration may


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """A unit test runs (setup, call, teardown) under the unit tier's guard."""
    if item.get_closest_marker(UNIT) is None:
        yield
        return
    with unit_guard(item.stash.setdefault(_violations, [])):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A unit test fails for what the guard refused, even where the code caught it."""
    report = (yield).get_result()
    if item.stash.get(_violations, None) and not report.failed:
        report.outcome = "failed"
        report.longrepr = "\n".join(dict.fromkeys(item.stash[_violations]))
    item.stash.get(_violations, []).clear()


def _servers_for(batch: list[pytest.Item]) -> None:
    """Before an own-process batch starts: the shared Prefect server, where a test of it
    needs one, started here so that it outlives the child."""
    if any("prefect_server" in i.fixturenames for i in batch):
        shared_prefect_api()


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
        home = scratch() / "prefect-server"
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


class TinyLake(NamedTuple):
    """A lake and the versions in it that tests use: what `tiny_lake` and the fixtures
    built on it return (they unpack in this order)."""

    lake: Lake
    dataset_version: str
    labels_version: str
    model_version: str


@pytest.fixture(scope="session")
def tiny_lake() -> TinyLake:
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
        promote(lake, mv, force=True)  # a tiny model need not beat the mean-price baseline
        done.write_text(json.dumps([dv, lv, mv]))
    dv, lv, mv = json.loads(done.read_text())
    return TinyLake(lake, dataset_version=dv, labels_version=lv, model_version=mv)


def train_in_child(lake_dir: Path, dv: str, lv: str, settings: dict) -> str:
    """`train` on a local lake in a fresh Python process (tests/programs/train.py: the
    memory TensorFlow keeps from the fit goes with it); the model version."""
    args = [str(lake_dir), dv, lv, json.dumps(settings)]
    out = subprocess.run([sys.executable, "-m", "tests.programs.train", *args], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
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


# --- a real Prefect server --------------------------------------------------------


@pytest.fixture
def prefect_api(tmp_path):
    """A real Prefect API server for one test."""
    with running_prefect_server(tmp_path / "prefect-home") as url:
        yield url
