"""A locked-down deployment: reports never carry credentials (store URIs, no presigned
links), and the CLI stops its temporary Prefect server when it is told to stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.reports import line_key
from tests.conftest import REPO, copy_lake, prefect_home, write_idx_source

CREDENTIALS = ("AWSAccessKeyId", "X-Amz-Credential", "Signature")


def artifacts_markdown() -> dict[str, str]:
    """key -> the newest markdown the Prefect server holds for it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = sorted(client.read_artifacts(), key=lambda a: a.created)
    return {a.key: a.data for a in found if a.key and a.type == "markdown"}


@pytest.mark.usefixtures("prefect_server")
def test_reports_on_s3_carry_store_uris_and_no_credentials(tiny_lake, s3_uri):
    """The evaluation and drop reports of a model on (moto's) S3, as the Prefect server
    keeps them: links to the stored plots are s3:// URIs, nothing presigned."""
    from flows.evaluate import evaluate_flow
    from flows.score import score_flow
    from tests.test_scoring import good_files, put_drop

    lake = copy_lake(tiny_lake.lake, s3_uri)
    mv = tiny_lake.model_version
    for key in lake.store.keys(lake.model(mv).prefix):  # evaluate again, on S3
        if key.endswith(("metrics.json", "pred_vs_true.png", "residuals.png")):
            lake.store.delete(key)
    evaluate_flow(mv, store=s3_uri)
    put_drop(lake, "lockdown", good_files())
    score_flow("lockdown", store=s3_uri, shard_size=5)
    reports = artifacts_markdown()
    published = [reports[line_key(s3_uri, "demo", f"eval-{mv}")],
                 reports[line_key(s3_uri, "demo", "drop-lockdown")]]  # fmt: skip
    bucket = s3_uri.split("/")[2]
    for markdown in published:
        links = re.findall(r"Stored copy: `([^`]*)`", markdown)
        assert links and all(link.startswith(f"s3://{bucket}/") for link in links), links
        for word in CREDENTIALS:
            assert word not in markdown, word
    assert lake.model(mv).plot_link("loss") in published[0], "training curves: the attempt's"


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_its_temporary_server_on_a_signal(tmp_path, sig):
    """`vggprice run` with a fresh PREFECT_HOME starts a temporary server as a child; a
    signal to the CLI ends the CLI and that server, none left running."""
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph")}
    env.pop("PREFECT_API_URL", None)
    idx = write_idx_source(tmp_path / "idx")
    args = ["run", "--quick", "--set", "epochs=50", "--store", str(tmp_path / "lake"),
            "--source", str(idx)]  # fmt: skip
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    server, port = None, None
    try:
        deadline = time.monotonic() + 240
        while server is None or not answers(port):
            assert cli.poll() is None, cli.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no temporary server answered"
            for pid in children(cli.pid):
                line = cmdline(pid)
                if "uvicorn" in line and "--port" in line:
                    server, port = pid, int(line[line.index("--port") + 1])
            time.sleep(0.5)
        cli.send_signal(sig)
        assert cli.wait(timeout=120) == 128 + sig
        deadline = time.monotonic() + 60
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(server), f"the temporary server {server} outlived the CLI"
        assert not answers(port)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)
