"""What a person sees on the console: no native start-up noise, one line about a
temporary server, and `vggprice ui` serving every command of its PREFECT_HOME."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tasks.deploy.local_ui import ANNOUNCEMENT, TOKEN_HEADER, answers, running_ui, token_of
from tasks.reports import line_key, store_tag
from tasks.runtime import NATIVE_NOISE, has_gpu_device
from tests.conftest import REPO, copy_lake, prefect_home, write_idx_source
from tests.servers import free_port, stop_process
from tests.test_scoring import good_files, put_drop

CLI = [sys.executable, "-m", "flows.cli"]


def cli_env(home: str) -> dict:
    env = os.environ | {"PREFECT_HOME": home}
    for name in ("PREFECT_API_URL", "TF_CPP_MIN_LOG_LEVEL"):  # as a user's shell has it
        env.pop(name, None)
    return env


@pytest.mark.skipif(has_gpu_device(), reason="the CUDA lines are kept where a GPU exists")
def test_a_scoring_command_prints_no_start_up_noise(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    put_drop(lake, "d1", dict(list(good_files().items())[:3]))
    env = cli_env(prefect_home(tmp_path / "ph"))
    done = subprocess.run([*CLI, "score", "d1", "--store", str(tmp_path / "lake")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "priced" in done.stdout
    noise = [line for line in done.stderr.splitlines() if NATIVE_NOISE.search(line)]
    assert noise == [], "TensorFlow's native start-up lines reached the console"
    assert "prefect.io/docs" not in done.stderr, "Prefect's hint line"
    (note,) = [line for line in done.stderr.splitlines() if "Starting temporary server" in line]
    assert "`vggprice ui` keeps one running" in note


@pytest.mark.skipif(has_gpu_device(), reason="the CUDA lines are kept where a GPU exists")
@pytest.mark.parametrize("level", ["2", "0"])
def test_no_cuda_probe_line_whatever_tf_cpp_min_log_level_the_user_set(level, tmp_path):
    """`vggprice`'s process set-up, then TensorFlow imported (through Keras) and used, with
    the user's TF_CPP_MIN_LOG_LEVEL: its failed CUDA probe (an ERROR line) stays out."""
    code = ("from flows.cli import _quiet_environment; _quiet_environment(); import keras; "
            "import tensorflow as tf; print(float(tf.constant(1.0) + 1))")  # fmt: skip
    env = cli_env(str(tmp_path)) | {"TF_CPP_MIN_LOG_LEVEL": level}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.split() == ["2.0"], done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines() if "cuInit" in line or "E0000" in line]
    assert noise == [], noise


def test_ui_serves_every_command_of_its_home_and_stops_on_ctrl_c(tmp_path):
    home = prefect_home(tmp_path / "ph")
    env = cli_env(home)
    port = free_port()
    ui = subprocess.Popen([*CLI, "ui", "--port", str(port)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "Prefect UI:" not in line:
            assert ui.poll() is None and time.monotonic() < deadline, "vggprice ui did not start"
            line = ui.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        note = json.loads((tmp_path / "ph" / ANNOUNCEMENT).read_text())
        assert note["api_url"] == api and len(note["token"]) >= 16
        assert token_of(api) == note["token"], "the server answers with the announced token"

        idx = write_idx_source(tmp_path / "idx")
        done = subprocess.run([*CLI, "ingest", "--source", str(idx), "--store", str(tmp_path / "lake")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Starting temporary server" not in done.stderr, "the command used the ui's server"
        request = urllib.request.Request(api + "/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.load(response)
        assert [r["state_type"] for r in runs] == ["COMPLETED"], "the ingest run is in the ui's db"

        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=60) == 0
        assert not (tmp_path / "ph" / ANNOUNCEMENT).exists(), "the announcement is withdrawn"
        assert not answers(api)
    finally:
        if ui.poll() is None:
            stop_process(ui)


def test_a_stale_announcement_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    from prefect.settings import PREFECT_HOME, temporary_settings

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with temporary_settings({PREFECT_HOME: str(tmp_path)}):
        (tmp_path / ANNOUNCEMENT).write_text(json.dumps({"api_url": "http://127.0.0.1:9/api",
                                                         "pid": dead.pid}))  # fmt: skip
        assert running_ui() is None, "its process is gone"
        (tmp_path / ANNOUNCEMENT).write_text(json.dumps({"api_url": "http://127.0.0.1:9/api",
                                                         "pid": os.getpid()}))  # fmt: skip
        assert running_ui() is None, "alive, but no API answers there"
        (tmp_path / ANNOUNCEMENT).write_text("{not json")
        assert running_ui() is None


class _OtherServer(http.server.BaseHTTPRequestHandler):
    """Another HTTP server on the announced port: healthy, its own settings."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = {
            "/api/health": True,
            "/api/admin/settings": {"client": {"custom_headers": {TOKEN_HEADER: "other"}}},
        }
        if self.path not in body:
            self.send_error(404)
            return
        data = json.dumps(body[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_announcement_whose_server_does_not_answer_with_its_token_is_ignored(
    tmp_path, monkeypatch, caplog
):
    """A live process id (reused after a kill -9) and a healthy server on the port, but
    not the announced one: the command starts its own server, and says why in one line."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    from prefect.settings import PREFECT_HOME, temporary_settings

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtherServer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{other.server_port}/api"
    try:
        assert answers(api), "the other server is healthy"
        with temporary_settings({PREFECT_HOME: str(tmp_path)}):
            for note in ({"api_url": api, "pid": os.getpid(), "token": "announced"},
                         {"api_url": api, "pid": os.getpid()}):  # fmt: skip
                (tmp_path / ANNOUNCEMENT).write_text(json.dumps(note))
                caplog.clear()
                assert running_ui() is None, note
                (line,) = [r.getMessage() for r in caplog.records if ANNOUNCEMENT in r.getMessage()]
                assert "ignored" in line
    finally:
        other.shutdown()
        other.server_close()


def test_two_stores_never_share_an_artifact_key():
    a, b = "/home/me/lake", "s3://shop/lake"
    assert store_tag(a).startswith("lake-") and store_tag(a) != store_tag(b)
    assert line_key(a, "demo", "champion") != line_key(b, "demo", "champion")
    assert line_key(a, "shoes", "champion") == f"{store_tag(a)}-shoes-champion"
    assert line_key(a + "/", "demo", "eval-m-1") == line_key(a, "demo", "eval-m-1")
