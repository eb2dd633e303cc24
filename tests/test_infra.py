"""Offline checks of infra/: templates accepted by a real Prefect server, the Kubernetes
Job rendered and validated, terraform fmt, checkov, hadolint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.pools import REPO, render_job_template

INFRA = REPO / "infra"
POOL_TYPES = {
    "process-cpu.json": "process",
    "process-gpu.json": "process",
    "docker.json": "docker",
    "kubernetes.json": "kubernetes",
    "ecs.json": "ecs",
}


def tool(name: str) -> str:
    """A checker from .venv-infra (scripts/test installs it) or the PATH; never skipped."""
    local = REPO / ".venv-infra" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/test, which installs the infra checkers")
    return found


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def rendered_job(tmp_path: Path) -> Path:
    template = json.loads((INFRA / "work-pools" / "kubernetes.json").read_text())
    cfg = render_job_template(
        template,
        {
            "name": "vggprice-train",
            "command": ["prefect", "flow-run", "execute"],
            "env": [{"name": "VGGPRICE_STORE", "value": "s3://bucket/vggprice"}],
            "labels": {"app": "vggprice"},
        },
    )
    job = cfg["job_manifest"]
    job["metadata"]["name"] = "vggprice-train-abcde"  # the API server's generateName
    out = tmp_path / "k8s" / "job.json"
    out.parent.mkdir()
    out.write_text(json.dumps(job, indent=2))
    return out


def test_every_template_is_accounted_for():
    assert sorted(p.name for p in (INFRA / "work-pools").glob("*.json")) == sorted(POOL_TYPES)


def test_render_fills_placeholders_from_defaults(tmp_path):
    job = json.loads(rendered_job(tmp_path).read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job["metadata"]["generateName"] == "vggprice-train-"
    assert "{{" not in json.dumps(job)


def test_templates_accepted_by_a_real_prefect_server(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        for file, kind in POOL_TYPES.items():
            template = json.loads((INFRA / "work-pools" / file).read_text())
            pool = c.create_work_pool(
                WorkPoolCreate(
                    name=file.removesuffix(".json"), type=kind, base_job_template=template
                )
            )
            assert pool.base_job_template == template, file
        broken = {"job_configuration": {"image": "{{ nowhere }}"}, "variables": {"properties": {}}}
        with pytest.raises(PrefectHTTPStatusError):
            c.create_work_pool(
                WorkPoolCreate(name="broken", type="docker", base_job_template=broken)
            )


def test_kubernetes_job_validates(tmp_path):
    out = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(rendered_job(tmp_path)))
    assert out.returncode == 0 and "passed" in out.stdout, out.stdout + out.stderr


def test_terraform_fmt():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.fail("terraform is not installed")
    out = run(terraform, "fmt", "-check", "-recursive", "-diff", "infra/terraform")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("framework,target", [("terraform", "infra/terraform"),
                                              ("dockerfile", "infra/docker"),
                                              ("kubernetes", None)])  # fmt: skip
def test_checkov(framework, target, tmp_path):
    directory = target or str(rendered_job(tmp_path).parent)
    out = run(tool("checkov"), "--skip-download", "--quiet", "--compact",
              "--framework", framework, "-d", directory)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    assert "Passed checks" in out.stdout


def test_hadolint():
    files = sorted(str(p) for p in (INFRA / "docker").glob("Dockerfile*"))
    assert len(files) == 2
    out = run(tool("hadolint"), *files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_automations_notify_on_a_rejected_challenger(prefect_api):
    """The shipped automations on a real server: a rejected challenger's event reaches a
    webhook notification block (a local HTTP server stands in for Slack or email)."""
    import http.server
    import threading
    import time

    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.pools import apply_automations
    from tests.conftest import free_port

    received: list[bytes] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            block = CustomWebhookNotificationBlock(
                name="vggprice-alerts",
                url=f"http://127.0.0.1:{port}/hook",
                json_data={"text": "{{subject}}: {{body}}"},
                allow_private_urls=True,
            )
            block_id = block.save("vggprice-alerts", overwrite=True)
            names = apply_automations(str(block_id))
            assert names == ["vggprice: challenger rejected", "vggprice: nightly retrain failed"]
            assert apply_automations(str(block_id)) == names, "re-applying replaces, by name"
            # From a process of its own: this one's events client may already be bound
            # to another test server.
            emit = (
                "from prefect.events import emit_event\n"
                "from prefect.events.worker import EventsWorker\n"
                "emit_event(event='vggprice.challenger.rejected',\n"
                "           resource={'prefect.resource.id': 'vggprice.model.m-test'},\n"
                "           payload={'reason': 'RMSE 9.0 does not beat 8.0'})\n"
                "EventsWorker.drain_all()\n"
            )
            env = os.environ | {"PREFECT_API_URL": prefect_api}
            out = subprocess.run([sys.executable, "-c", emit], env=env, capture_output=True)
            assert out.returncode == 0, out.stderr
            deadline = time.time() + 90
            while not received and time.time() < deadline:
                time.sleep(1)
    finally:
        server.shutdown()
    assert received, "the automation did not call the webhook within 90 s"
    assert b"challenger rejected" in received[0] and b"m-test" in received[0]
