"""The command line's unhappy paths, through the real CLI in a subprocess: one line on
stderr, `vggprice: error: <what> — <what to do>`, a non-zero status, nothing written,
and a traceback only when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyLake, copy_lake, prefect_home

REPO = Path(__file__).resolve().parents[1]


def vggprice(*args: str, env: dict | None = None) -> tuple[int, list[str], str]:
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    return out.returncode, lines, out.stdout


@pytest.fixture
def no_aws(tmp_path):
    """An environment with no AWS credentials anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VGGPRICE_S3"))}
    return env | {"AWS_CONFIG_FILE": str(tmp_path / "none"),
                  "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                  "AWS_EC2_METADATA_DISABLED": "true", "PREFECT_HOME": prefect_home(tmp_path / "ph")}  # fmt: skip


def test_s3_without_credentials_fails_fast(no_aws):
    code, err, _ = vggprice("run", "--quick", "--store", "s3://no-such-bucket/x",
                                     env=no_aws)  # fmt: skip
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("vggprice: error: s3://no-such-bucket/x: no AWS credentials")
    assert "AWS_ACCESS_KEY_ID" in err[0]


def test_unreachable_endpoint_fails_fast(no_aws):
    env = no_aws | {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                    "VGGPRICE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}  # fmt: skip
    code, err, _ = vggprice("champion", "--store", "s3://bucket/x", env=env)
    assert code == 2 and len(err) == 1, err
    assert "cannot reach http://127.0.0.1:9 — check VGGPRICE_S3_ENDPOINT_URL" in err[0]


def test_unknown_bucket(s3_endpoint, tmp_path):
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph")}
    code, err, _ = vggprice("champion", "--store", "s3://no-such-bucket/x", env=env)
    assert code == 2 and len(err) == 1, err
    assert "bucket 'no-such-bucket' does not exist" in err[0]


@pytest.fixture
def lake(tiny_lake, tmp_path) -> TinyLake:
    """The session's versions, with a copy of its lake as `lake`."""
    return tiny_lake._replace(lake=copy_lake(tiny_lake.lake, str(tmp_path / "lake")))


def test_unknown_versions_list_the_known_ones(lake, tmp_path):
    copy, dv, lv, mv = lake
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph")}
    before = copy.store.keys()
    cases = [
        (("train", "bad-version", "bad-labels"), f"no such dataset version (known: {dv})"),
        (("train", dv, "bad-labels"), f"no such labels version for dataset {dv} (known: {lv})"),
        (("label", "fm-nope"), f"(known: {dv})"),
        (("evaluate", "m-nope"), f"no such (complete) model version (known: {mv})"),
        (("promote", "m-nope"), f"(known: {mv})"),
        (("score", "nonexistent-drop"), "no such drop 'nonexistent-drop'"),
        (("score", "x", "--model", "m-nope"), f"(known: {mv})"),
        (("train", dv, lv, "--set", "epochs=zero"), "epochs: Input should be a valid integer"),
    ]
    for args, expected in cases:
        code, err, _ = vggprice(*args, "--store", copy.uri, env=env)
        assert code == 2 and len(err) == 1, (args, err)
        assert err[0].startswith("vggprice: error: ") and expected in err[0], (args, err)
    assert copy.store.keys() == before, "nothing written"


def test_tracebacks_only_when_asked(lake, tmp_path):
    copy = lake.lake
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph")}
    code, err, _ = vggprice("evaluate", "m-nope", "--store", copy.uri, "--debug", env=env)
    assert code != 0 and any(ln.startswith("Traceback") for ln in err)
    code, err, _ = vggprice("evaluate", "m-nope", "--store", copy.uri,
                               env=env | {"VGGPRICE_DEBUG": "1"})  # fmt: skip
    assert code != 0 and any(ln.startswith("Traceback") for ln in err)


def test_a_bad_setting_in_the_environment_is_one_line(tmp_path):
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph"),
                        "VGGPRICE_TRAIN_MEMORY_MB": "-1"}  # fmt: skip
    code, err, _ = vggprice("champion", "--store", str(tmp_path / "lake"), env=env)
    assert (code, err) == (2, ["vggprice: error: VGGPRICE_TRAIN_MEMORY_MB: Input should be "
                               "greater than or equal to 0 (in the environment)"])  # fmt: skip


def test_empty_store_and_missing_source(tmp_path):
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph")}
    store = str(tmp_path / "lake")
    Path(store).mkdir()  # there and empty (a missing one: tests/test_prices.py)
    no_prices = ("--prices", str(tmp_path / "none.csv"), "--name", "shop")
    (tmp_path / "p.csv").write_text("image,price\na.png,10\n")
    (tmp_path / "empty").mkdir()
    prices = ("--prices", str(tmp_path / "p.csv"), "--name", "shop")
    cases = [
        # a source with nothing to learn from stops before any server or run starts
        (("run", "--source", str(tmp_path / "nowhere")), "nowhere: missing train-images"),
        (("run", "--source", str(tmp_path / "empty"), *prices), "empty: no images found"),
        (("run", "--source", str(tmp_path / "x.parquet"), *prices), "x.parquet: no such file"),
        (("ingest", "--source", str(tmp_path / "nowhere")), "nowhere: missing train-images"),
        (("champion",), "no champion in"),
        (("score-new",), "train and promote a model (vggprice run)"),
        (("deploy", "--gpu-pool", "nosuch"), "unknown work pool 'nosuch': one of cpu, gpu"),
        (("run", "--source", str(tmp_path), *no_prices), "none.csv: no such prices file"),
        (("run", "--workers", "2"), "--workers spreads a catalog's feature extraction"),
        (("run", "--source", str(tmp_path), *prices, "--workers", "0"), "--workers 0: give"),
    ]
    for args, expected in cases:
        code, err, _ = vggprice(*args, "--store", store, env=env)
        assert code == 2 and len(err) == 1, (args, err)
        assert err[0].startswith("vggprice: error: ") and expected in err[0], (args, err)
    assert not any(p.is_file() for p in Path(store).rglob("*")), "nothing written"


def test_the_shared_local_api_is_the_commands_only(monkeypatch, tmp_path):
    """`score --workers N` hands its temporary server's address to its Dask workers
    through the environment, and takes it back afterwards."""
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.cli import _share_local_api

    home = prefect_home(tmp_path / "ph")  # migrated already: the server starts in seconds
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", home)
    with temporary_settings({PREFECT_HOME: home}, restore_defaults={PREFECT_API_URL}):
        try:
            with _share_local_api():
                url = os.environ["PREFECT_API_URL"]
                assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            assert "PREFECT_API_URL" not in os.environ
        finally:  # a command's process would exit here; this one goes on
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().stop()
