"""The Docker path for real (marker ``docker``): the images built on a Debian base made
from the Debian mirror (no container registry needed), a prefect-docker worker running a
retrain and a drop in containers against an S3 store on the docker bridge, and the compose
stack (Prefect server on Debian's PostgreSQL, moto standing in for MinIO) running a retrain.
Skipped, with the reason, only where no Docker daemon answers."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tasks.deploy.pools import REPO, apply_pools, deploy_all, worker_command
from tasks.store.storage import open_store
from tests.conftest import TINY, write_idx_source
from tests.servers import free_port, running_prefect_server, stop_process, wait_healthy

pytestmark = pytest.mark.docker
COMPOSE = REPO / "infra" / "compose"


@pytest.fixture(scope="module")
def images():
    """vggprice-worker:cpu, vggprice-postgres and vggprice-moto, built by
    infra/docker/build.sh: on the Debian base where debootstrap can run (root), else on the
    Dockerfiles' official bases. Layers (and the base) are reused from earlier runs."""
    try:
        import docker

        docker.from_env().ping()
    except Exception as err:  # noqa: BLE001 - any way of not reaching a daemon
        pytest.skip(f"no Docker daemon answers ({err.__class__.__name__}): {err}")
    debian = os.geteuid() == 0 and shutil.which("debootstrap")
    started = time.time()
    out = subprocess.run(
        ["bash", "infra/docker/build.sh", *(["--debian-base"] if debian else []),
         "cpu", "postgres", "moto"],
        cwd=REPO, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-6000:]
    print(f"images built in {time.time() - started:.0f} s: {out.stdout.split()}")
    return out.stdout.split()


def bridge_gateway() -> str:
    """The default docker bridge's gateway: an address of this machine that containers
    on the bridge reach."""
    import docker

    bridge = docker.from_env().networks.get("bridge").attrs
    gateway = bridge["IPAM"]["Config"][0].get("Gateway")
    if gateway:
        return gateway
    # Docker 20.10 leaves the default bridge's gateway out: the bridge interface's address.
    name = bridge["Options"]["com.docker.network.bridge.name"].encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("256s", name[:15])
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 30 + shade % 200).save(buf, format="PNG")
    return buf.getvalue()


def api_status(url: str, auth: str | None) -> int:
    """The HTTP status of a POST to the Prefect API, with basic auth ``auth`` or none."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def readable_idx(tmp_path: Path) -> Path:
    """Generated IDX files the containers' user (uid 10001) may read through a mount."""
    idx = write_idx_source(tmp_path / "idx")
    idx.chmod(0o755)
    for f in idx.iterdir():
        f.chmod(0o644)
    return idx


def test_docker_worker_runs_a_retrain_and_scores_a_drop(images, tmp_path):
    """A prefect-docker worker on the cpu-docker pool (both roles: no GPU here) runs the
    nightly retrain, its train child and a drop in containers of vggprice-worker:cpu.
    The store settings and credentials reach the containers only from the worker's
    environment (no store parameter is passed), and the secret is nowhere after."""
    from moto.server import ThreadedMotoServer
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    gateway = bridge_gateway()
    secret = f"docker-secret-{uuid.uuid4().hex}"
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address=gateway, port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://{gateway}:{moto_port}"
    store_uri = "s3://vggprice/lake"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "docker-key",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}  # fmt: skip
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="docker-key", aws_secret_access_key=secret)  # fmt: skip
    s3.create_bucket(Bucket="vggprice")
    idx = readable_idx(tmp_path)
    home = tmp_path / "prefect"
    worker_log = tmp_path / "worker.log"
    try:
        with (
            running_prefect_server(home, gateway) as api,
            temporary_settings({PREFECT_API_URL: api}),
        ):
            apply_pools()
            deploy_all(REPO, api_url=api, cpu_pool="cpu-docker", gpu_pool="cpu-docker")
            env = os.environ | aws | {
                "PREFECT_API_URL": api, "VGGPRICE_STORE": store_uri,
                "VGGPRICE_WORKER_NAME": "docker-worker", "PREFECT_WORKER_QUERY_SECONDS": "2",
            }  # fmt: skip
            for name in ("VGGPRICE_CACHE_DIR", "PREFECT_HOME"):
                env.pop(name, None)
            with open(worker_log, "w") as log:
                worker = subprocess.Popen(worker_command("cpu-docker"), env=env, stdout=log,
                                          stderr=subprocess.STDOUT)  # fmt: skip
                try:
                    retrain = run_deployment(
                        "retrain/retrain-nightly",
                        parameters={"source": "/data/idx", "settings": TINY, "force": True},
                        job_variables={"volumes": [f"{idx}:/data/idx:ro"]},
                        timeout=900, poll_interval=2,
                    )  # fmt: skip
                    assert retrain.state.is_completed(), (
                        retrain.state,
                        worker_log.read_text()[-6000:],
                    )
                    with get_client(sync_client=True) as client:
                        (train,) = client.read_flow_runs(
                            flow_filter=FlowFilter(name=FlowFilterName(any_=["train"]))
                        )
                    assert train.work_pool_name == "cpu-docker" and train.state.is_completed()
                    with pytest.MonkeyPatch.context() as mp:
                        for key, value in aws.items():
                            mp.setenv(key, value)
                        store = open_store(store_uri)
                        mv = store.get_json("registry/champion.json")["model_version"]
                        for i in range(5):
                            store.put_bytes(f"drops/d1/img-{i}.png", png(i))
                        store.put_bytes("drops/d1/broken.png", b"not an image")
                        scored = run_deployment(
                            "score-drop/score-drop", parameters={"drop": "d1"},
                            timeout=900, poll_interval=2,
                        )  # fmt: skip
                        assert scored.state.is_completed(), worker_log.read_text()[-6000:]
                        manifest = store.get_json(f"scores/d1/{mv}/_manifest.json")
                        stored = b"".join(store.get_bytes(i.key) for i in store.list())
                finally:
                    stop_process(worker)
    finally:
        moto.stop()
    assert manifest["counts"] == {"listed": 6, "priced": 5, "rejected": 1}
    scorers = set(manifest["scorer_counts"])
    assert all(s.endswith("@docker-worker") for s in scorers), scorers
    hosts = {s.split(":")[0] for s in scorers}
    assert socket.gethostname() not in hosts, "priced inside a container, not on this host"
    # The credentials reached the containers and nothing kept them: not the worker's log,
    # the Prefect database (flow runs, job variables, logs, artifacts, events), nor the store.
    for path in [worker_log, *home.rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret.encode() not in stored


def test_compose_stack_runs_a_retrain(images, tmp_path):
    """infra/compose as shipped, with moto in MinIO's place (moto-store.yml): Prefect's
    server on Debian's PostgreSQL, and the cpu worker running a retrain (train on the cpu
    pool: no GPU here) that reaches the store by the stack's own settings."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is not installed: scripts/test installs it (Debian package)")
    idx = readable_idx(tmp_path)
    override = tmp_path / "test.yml"
    override.write_text(f"services:\n  worker-cpu:\n    volumes:\n      - {idx}:/data/idx:ro\n")
    project = f"vggprice-test-{uuid.uuid4().hex[:8]}"
    ports = {"PREFECT_PORT": str(free_port()), "STORE_PORT": str(free_port())}
    password = uuid.uuid4().hex
    auth = f"vggprice:{uuid.uuid4().hex}"  # the API's auth string, as docs/deploy.md makes it
    env = os.environ | ports | {"POSTGRES_PASSWORD": uuid.uuid4().hex,
                                "MINIO_ROOT_PASSWORD": password, "PREFECT_AUTH_STRING": auth}  # fmt: skip
    cmd = [compose, "-p", project, "-f", str(COMPOSE / "docker-compose.yml"),
           "-f", str(COMPOSE / "moto-store.yml"), "-f", str(override)]  # fmt: skip

    def compose_run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    services = ["postgres", "prefect-server", "store", "create-bucket", "worker-cpu"]
    up = compose_run("up", "-d", "--no-build", *services)
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        api = f"http://127.0.0.1:{ports['PREFECT_PORT']}/api"
        wait_healthy(api)
        # The API refuses a call without the auth string, and answers one with it.
        assert api_status(f"{api}/flow_runs/filter", None) == 401
        assert api_status(f"{api}/flow_runs/filter", "vggprice:wrong") == 401
        assert api_status(f"{api}/flow_runs/filter", auth) == 200
        with (
            pytest.MonkeyPatch.context() as mp,
            temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}),
        ):
            mp.setenv("PREFECT_API_AUTH_STRING", auth)  # for `prefect deploy` in deploy_all
            apply_pools()
            deploy_all(REPO, api_url=api, cpu_pool="cpu", gpu_pool="cpu")
            retrain = run_deployment(
                "retrain/retrain-nightly",
                parameters={"source": "/data/idx", "settings": TINY, "force": True},
                timeout=900, poll_interval=2,
            )  # fmt: skip
        logs = compose_run("logs", "--no-color", "worker-cpu").stdout[-6000:]
        assert retrain.state.is_completed(), (retrain.state, logs)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{ports['STORE_PORT']}")
            mp.setenv("AWS_ACCESS_KEY_ID", "vggprice")
            mp.setenv("AWS_SECRET_ACCESS_KEY", password)
            champion = open_store("s3://vggprice/lake").get_json("registry/champion.json")
        assert champion["model_version"].startswith("m-")
        # The runs are in PostgreSQL: the server's database, not a SQLite file.
        query = "select count(*) from flow_run where state_type = 'COMPLETED'"
        out = compose_run("exec", "-T", "postgres", "psql", "-h", "/tmp", "-U", "prefect",
                          "-d", "prefect", "-tAc", query)  # fmt: skip
        assert out.returncode == 0 and int(out.stdout.strip()) >= 2, out.stdout + out.stderr
    finally:
        compose_run("down", "-v", "--remove-orphans", timeout=300)
