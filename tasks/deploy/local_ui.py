"""`vggprice ui`: the Prefect server (API and UI) of this machine's commands, kept
running, so that each command uses it instead of starting a temporary server of its own.

The server is `prefect server start` on the database the commands use (the SQLite file
under PREFECT_HOME, analytics off). While it runs it is announced in
``$PREFECT_HOME/vggprice-ui.json`` (its URL, process id and a random token); a command
with no PREFECT_API_URL of its own reads that file and uses the server when the process
is alive and the server at that URL answers with the token. The server is started with
the token as a Prefect setting of its own process (a custom header of its clients,
PREFECT_CLIENT_CUSTOM_HEADERS, which nothing of ours calls), and its API returns its
settings (GET /api/admin/settings): so a process id reused after a ``kill -9``, or
another server on that port, is not taken for it. A file left by a server that died is
ignored with one log line (and replaced by the next `vggprice ui`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ANNOUNCEMENT = "vggprice-ui.json"
TOKEN_HEADER = "X-Vggprice-Ui"  # the name of the token in the server's custom headers


def prefect_home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser()


def announcement() -> Path:
    return prefect_home() / ANNOUNCEMENT


def answers(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(api_url + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def token_of(api_url: str, timeout: float = 5.0) -> str | None:
    """The token the Prefect server at ``api_url`` was started with, or None."""
    try:
        with urllib.request.urlopen(api_url + "/admin/settings", timeout=timeout) as response:
            return json.load(response)["client"]["custom_headers"].get(TOKEN_HEADER)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def running_ui() -> str | None:
    """The API URL of a `vggprice ui` serving this PREFECT_HOME, or None (one log line
    when an announcement is there but its server is not)."""
    path = announcement()
    try:
        note = json.loads(path.read_text())
        api_url, pid, token = note["api_url"], int(note["pid"]), note.get("token")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        api_url, pid, token = None, 0, None
    if api_url and token and alive(pid) and token_of(api_url) == token:
        return api_url
    logging.getLogger("vggprice").warning(
        "%s: no vggprice ui answers as announced there (a stale file); ignored", path
    )
    return None


def server_command(host: str, port: int) -> list[str]:
    prefect = Path(sys.executable).with_name("prefect")
    return [str(prefect), "server", "start", "--host", host, "--port", str(port)]


def _with_token(token: str) -> str:
    """PREFECT_CLIENT_CUSTOM_HEADERS for the server: the user's own, and the token."""
    try:
        headers = json.loads(os.environ.get("PREFECT_CLIENT_CUSTOM_HEADERS") or "{}")
    except ValueError:
        headers = {}
    return json.dumps((headers if isinstance(headers, dict) else {}) | {TOKEN_HEADER: token})


def serve(host: str = "127.0.0.1", port: int = 4200, ready_seconds: float = 180) -> int:
    """Run the server until SIGINT or SIGTERM, announced while it answers; returns the
    server's exit status (0 when stopped by a signal)."""
    other = running_ui()
    if other:
        raise ValueError(f"a vggprice ui already serves {prefect_home()} at {other}")
    token = secrets.token_urlsafe(16)
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_CLIENT_CUSTOM_HEADERS": _with_token(token)}  # fmt: skip
    env.pop("PREFECT_API_URL", None)  # the server itself is not a client of another
    api_url = f"http://{host}:{port}/api"
    if answers(api_url):
        raise ValueError(f"port {port} is taken by another server: pass --port N")
    server = subprocess.Popen(server_command(host, port), env=env)
    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)
        server.terminate()

    before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    note = announcement()
    try:
        deadline = time.monotonic() + ready_seconds
        while token_of(api_url, timeout=1.0) != token:  # this server, not another's
            if server.poll() is not None or stopping:
                return server.wait() if not stopping else 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not answer at {api_url} "
                                   f"within {ready_seconds:.0f} s")  # fmt: skip
            time.sleep(0.5)
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_name(note.name + f".{os.getpid()}")
        tmp.write_text(json.dumps({"api_url": api_url, "pid": server.pid, "token": token}))
        tmp.replace(note)
        print(f"Prefect UI: http://{host}:{port}  (vggprice commands use this server while "
              "it runs; Ctrl-C stops it)", flush=True)  # fmt: skip
        code = server.wait()
        return 0 if stopping else code
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        try:
            if json.loads(note.read_text()).get("pid") == server.pid:
                note.unlink()
        except (OSError, ValueError):
            pass
        for s, handler in before.items():
            signal.signal(s, handler)
