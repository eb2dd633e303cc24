"""Processes the tests (and benchmarks) run: free ports, a `prefect server start`, and
stopping what they started. No side effects on import, unlike conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PREFECT = Path(sys.executable).with_name("prefect")  # the CLI of this environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(url: str, log: Path | None = None, seconds: int = 240) -> None:
    """Until the Prefect API at ``url`` answers; RuntimeError with the log's tail if not."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"no Prefect API at {url}: " + (log.read_text()[-3000:] if log else ""))


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (its backup API), renamed into place."""
    partial = target.with_name(target.name + ".partial")
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(partial)) as dst,
    ):
        src.backup(dst)
    partial.replace(target)


def migrated_prefect_db() -> Path | None:
    """An empty Prefect database with every migration applied, at VGGPRICE_TEST_PREFECT_DB
    (None where that is unset), made on first use by `prefect server database upgrade`.
    A server started from a copy is up in about 10 s instead of 20 s here."""
    template = os.environ.get("VGGPRICE_TEST_PREFECT_DB")
    if not template:
        return None
    template = Path(template)
    if not template.is_file():
        work = template.with_name(template.name + ".home")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if "DATABASE_CONNECTION_URL" not in k}
        subprocess.run([str(PREFECT), "server", "database", "upgrade", "-y"], check=True,
                       env=env | {"PREFECT_HOME": str(work)}, capture_output=True)  # fmt: skip
        (work / "prefect.db").replace(template)  # closed by the upgrade's exit: a rename is enough
        shutil.rmtree(work)
    return template


@contextlib.contextmanager
def running_prefect_server(home: Path, host: str = "127.0.0.1"):
    """`prefect server start` bound to ``host`` (SQLite under ``home``, analytics and
    scheduler off) for the duration of the block; yields the API URL."""
    home.mkdir(parents=True, exist_ok=True)
    template = migrated_prefect_db()
    if template and not (home / "prefect.db").exists():
        copy_sqlite(template, home / "prefect.db")
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", host, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{host}:{port}/api"
    try:
        wait_healthy(url, home / "server.log")
        yield url
    finally:
        stop_process(server)
        log.close()


MLFLOW = Path(sys.executable).with_name("mlflow")  # the test extra's full mlflow


@contextlib.contextmanager
def running_mlflow_server(home: Path, seconds: int = 180):
    """`mlflow server` on 127.0.0.1 (a SQLite backend and served artifacts under
    ``home``) for the duration of the block; yields its URL. The server and its workers
    are a process group of their own, stopped together."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(home / "mlflow.log", "w")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"),
         "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job workers
                          "MLFLOW_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + seconds
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"no MLflow server at {url}: "
                                       + (home / "mlflow.log").read_text()[-3000:]) from None  # fmt: skip
                time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
