"""Checks of infra/ that need no cloud and no GPU: every pool created by `vggprice pools
apply` on a real Prefect server, with its own type; the flow-run job of every deployment
built by the workers' own code (prefect-kubernetes, prefect-aws, prefect-docker, Prefect's
process worker) and validated (kubernetes-validate --strict, the ECS worker against moto's
ECS, docker-py's request types); Terraform parsed and checked (python-hcl2, checkov;
`terraform fmt` where terraform is installed); Dockerfiles (hadolint, checkov); the Helm
values; the automations on a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.deploy.pools import POOLS, REPO, apply_pools, deploy_all
from tests.conftest import shared_prefect_api

INFRA = REPO / "infra"
CHECKOUT = Path(__file__).resolve().parents[1]  # these tests' checkout: tests.programs is here
# prefect.yaml's deployments, and those on the gpu-role pool (the rest are cpu-role).
_SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
DEPLOYMENTS = {d["name"] for d in _SPEC}
GPU_ROLE = {d["name"] for d in _SPEC if d["work_pool"]["name"] == "{{ $VGGPRICE_GPU_POOL }}"}
K8S_IMAGE = "registry.example.com/vggprice-worker:gpu-0123abc"
ECS_IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/vggprice-worker:gpu-0123abc"
# The worker's own environment: what docker and ECS runs get from it.
WORKER_ENV = {
    "VGGPRICE_STORE": "s3://vggprice-bucket/lake",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "AKIAWORKERKEY",
    "AWS_SECRET_ACCESS_KEY": "worker-secret-never-in-a-template",
    "CUDA_VISIBLE_DEVICES": "1",
    "VGGPRICE_WORKER_NAME": "render-worker",
}


def tool(name: str) -> str:
    """A checker from .venv-infra (scripts/test installs it) or the PATH; never skipped."""
    local = REPO / ".venv-infra" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/test, which installs the infra checkers")
    return found


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


# --- a Prefect server with every pool and each family of deployments ---------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server for this module, with every pool applied."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.servers import running_prefect_server

    with (
        running_prefect_server(tmp_path_factory.mktemp("prefect")) as url,
        temporary_settings({PREFECT_API_URL: url}),
    ):
        assert apply_pools() == dict.fromkeys(POOLS, "created")
        yield url
        # The workers' log and event senders finish here, not against a stopped server
        # later on (their retries would run in other tests' time).
        APILogWorker.drain_all()
        EventsWorker.drain_all()


def _worker_class(kind: str):
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker
    if kind == "docker":
        from prefect_docker.worker import DockerWorker

        return DockerWorker
    if kind == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker
    from prefect_aws.workers.ecs_worker import ECSWorker

    return ECSWorker


async def _resolve(flow_run, pool_name: str):
    """The job configuration a worker of the pool builds for the flow run: the same
    classmethod the worker calls before it submits a run."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        pool = await client.read_work_pool(pool_name)
        cls = _worker_class(pool.type)
        return await cls.job_configuration.resolve_for_flow_run(
            flow_run, client=client, work_pool=pool, worker_name="render-worker"
        )


def parameters(deployment) -> dict:
    """Placeholder values for a deployment's required parameters (what a schedule or a
    parent run passes), enough for the server to accept a run."""
    schema = deployment.parameter_openapi_schema or {}
    blank = {"array": [], "object": {}, "integer": 0, "number": 0.0, "boolean": False}
    return {
        name: blank.get(schema["properties"][name].get("type"), "x")
        for name in schema.get("required", [])
    }


def _flow_runs(job_variables: dict | None = None) -> dict[str, object]:
    """A flow run of each deployment on the server: {deployment name: flow run}."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {
            d.name: client.create_flow_run_from_deployment(
                d.id, parameters=parameters(d), job_variables=job_variables
            )
            for d in client.read_deployments()
        }


FAMILIES = {  # gpu-role pool -> (cpu-role pool, gpu image)
    "gpu": ("cpu", None),
    "gpu-docker": ("cpu-docker", None),
    "gpu-k8s": ("cpu", K8S_IMAGE),
    "gpu-ecs": ("cpu", ECS_IMAGE),
}


@pytest.fixture(scope="module")
def rendered(server):
    """Each family deployed from prefect.yaml in turn, and for a flow run of each
    deployment the job its pool's worker would start: {(gpu pool, deployment): (pool,
    flow run, configuration)}."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = {}
    with temporary_settings({PREFECT_API_URL: server}), pytest.MonkeyPatch.context() as mp:
        for name, value in WORKER_ENV.items():
            mp.setenv(name, value)
        for gpu_pool, (cpu_pool, image) in FAMILIES.items():
            deploy_all(REPO, api_url=server, cpu_pool=cpu_pool, gpu_pool=gpu_pool, gpu_image=image)
            with get_client(sync_client=True) as client:
                deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == DEPLOYMENTS
            for name, flow_run in _flow_runs().items():
                pool = deployments[name].work_pool_name
                assert pool == (gpu_pool if name in GPU_ROLE else cpu_pool), name
                out[gpu_pool, name] = (pool, flow_run, asyncio.run(_resolve(flow_run, pool)))
        out["deployments"] = deployments
    return out


# --- pools ------------------------------------------------------------------------------


def test_every_template_is_accounted_for():
    assert sorted(p.stem for p in (INFRA / "work-pools").glob("*.json")) == sorted(POOLS)


def test_pools_applied_with_their_own_type_template_and_limit(server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.deploy.pools import pool_template

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as c:
        for name, (kind, limit) in POOLS.items():
            pool = c.read_work_pool(name)
            assert (pool.type, pool.concurrency_limit) == (kind, limit), name
            assert pool.base_job_template == pool_template(name), name
        # A pool of another type under one of our names (another tool's worker made it)
        # is an error, not a silent overwrite of its template.
        c.delete_work_pool("cpu-docker")
        c.create_work_pool(WorkPoolCreate(name="cpu-docker", type="process"))
        with pytest.raises(ValueError, match="is a process pool, not docker"):
            apply_pools(["cpu-docker"])
        c.delete_work_pool("cpu-docker")
        assert apply_pools(["cpu-docker"]) == {"cpu-docker": "created"}
        broken = {"job_configuration": {"image": "{{ nowhere }}"}, "variables": {"properties": {}}}
        with pytest.raises(PrefectHTTPStatusError):
            c.create_work_pool(
                WorkPoolCreate(name="broken", type="docker", base_job_template=broken)
            )


def test_pool_limit_bounds_gpu_jobs_at_once(server, rendered):
    """Kubernetes and ECS workers let go of a run once its Job or task exists; the pool's
    concurrency limit is what keeps more GPU jobs from starting."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Running

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as c:
        deployment = c.read_deployment_by_name("score-partition/score-partition-gpu")
        assert deployment.work_pool_name == "gpu-ecs"  # the last family deployed
        for run in c.read_flow_runs():
            if run.work_pool_name == "gpu-ecs":
                c.delete_flow_run(run.id)
        runs = [
            c.create_flow_run_from_deployment(deployment.id, parameters=parameters(deployment))
            for _ in range(3)
        ]
        limit = POOLS["gpu-ecs"][1]
        assert len(c.get_scheduled_flow_runs_for_work_pool("gpu-ecs")) == limit < len(runs)
        for run in runs[:limit]:
            c.set_flow_run_state(run.id, Running(), force=True)
        assert c.get_scheduled_flow_runs_for_work_pool("gpu-ecs") == [], "pool is full"
        c.set_flow_run_state(runs[0].id, Completed(), force=True)
        assert len(c.get_scheduled_flow_runs_for_work_pool("gpu-ecs")) == 1


# --- item 1: the code reaches every run the same way ------------------------------------


def test_pull_step_enters_the_checkout_where_the_run_runs(rendered, tmp_path):
    """The deployments store one pull step and nothing of the deployer's machine; run as a
    flow run runs it (from another directory), it enters the checkout its Python imports."""
    for deployment in rendered["deployments"].values():
        assert deployment.pull_steps == [{"tasks.deploy.pools.enter_checkout": {}}]
        assert str(REPO) not in deployment.model_dump_json(), "deployer's path stored"
    steps = json.dumps(rendered["deployments"]["train"].pull_steps)
    program = Path(__file__).with_name("programs") / "pull_steps.py"
    # The steps report to a Prefect API: the session's server, not a temporary one of the
    # child's own (whose start-up, on a loaded machine, can outlast Prefect's 20 s wait).
    env = os.environ | {"PREFECT_API_URL": shared_prefect_api()}
    done = subprocess.run([sys.executable, str(program), steps], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    outputs, cwd = json.loads(done.stdout.strip().splitlines()[-1])
    assert cwd == str(REPO) and outputs["directory"] == str(REPO)
    assert (Path(cwd) / rendered["deployments"]["train"].entrypoint.split(":")[0]).is_file()


# --- items 3, 5: Kubernetes -------------------------------------------------------------


def test_kubernetes_jobs_validate_and_get_the_store_without_secrets(rendered, tmp_path):
    runtime = list(yaml.safe_load_all((INFRA / "kubernetes" / "job-runtime.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in runtime}
    out = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0",
              str(INFRA / "kubernetes" / "job-runtime.yaml"))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for name in GPU_ROLE:
        pool, flow_run, cfg = rendered["gpu-k8s", name]
        assert pool == "gpu-k8s"
        job = cfg.job_manifest
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == K8S_IMAGE and container["imagePullPolicy"] == "IfNotPresent"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["args"][:3] == ["prefect", "flow-run", "execute"]
        assert pod.get("nodeSelector", {}) == {}, "a GPU-present label blocks scaling from zero"
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] > 0
        # What the Job names exists in job-runtime.yaml: service account, store ConfigMap.
        assert ("ServiceAccount", pod["serviceAccountName"]) in kinds
        refs = container["envFrom"]
        assert ("ConfigMap", refs[0]["configMapRef"]["name"]) in kinds
        assert refs[1]["secretRef"]["optional"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
        assert WORKER_ENV["AWS_SECRET_ACCESS_KEY"] not in json.dumps(job)
        job["metadata"]["name"] = f"vggprice-{name}-abcde"  # the API server's generateName
        # prefect-kubernetes's own validator demands these two in the pod spec (its default
        # template has them there); the API server drops unknown fields with a warning
        # (fieldValidation defaults to Warn for API clients). The rest is checked strictly.
        assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(job))
        out = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(path))
        assert out.returncode == 0 and "passed" in out.stdout, out.stdout + out.stderr
    template = json.loads((INFRA / "work-pools" / "gpu-k8s.json").read_text())
    assert "pod_watch_timeout_seconds" not in json.dumps(template), "unused by the worker"


# --- items 4, 5: ECS, through the ECS worker on moto's ECS -----------------------------------


def test_ecs_task_runs_through_the_worker_on_moto(server, rendered, s3_endpoint):
    import boto3
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws.workers.ecs_worker import ECSWorker

    ecs = boto3.client("ecs", endpoint_url=s3_endpoint, region_name="us-east-1")
    ec2 = boto3.client("ec2", endpoint_url=s3_endpoint, region_name="us-east-1")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    n = len(GPU_ROLE)  # one GPU instance per gpu-role deployment: each runs one task here
    instances = ec2.run_instances(ImageId=image, InstanceType="g5.xlarge", MinCount=n,
                                  MaxCount=n)["Instances"]  # fmt: skip
    ecs.create_capacity_provider(
        name="vggprice-gpu",
        autoScalingGroupProvider={
            "autoScalingGroupArn": "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:x:autoScalingGroupName/vggprice-gpu",
            "managedScaling": {"status": "ENABLED", "targetCapacity": 100},
        },
    )
    ecs.create_cluster(clusterName="vggprice", capacityProviders=["vggprice-gpu"])
    for instance in instances:  # what the capacity provider started: one GPU task each
        ecs.register_container_instance(
            cluster="vggprice",
            instanceIdentityDocument=json.dumps({"instanceId": instance["InstanceId"]}),
        )
    role = "arn:aws:iam::123456789012:role/vggprice-task"
    task_runs = {}
    with temporary_settings({PREFECT_API_URL: server}), pytest.MonkeyPatch.context() as mp:
        for key, value in WORKER_ENV.items():
            mp.setenv(key, value)
        # The same deployments, one run each; moto's container instance has 7.3 GiB.
        for name, flow_run in _flow_runs({"memory": "7168", "task_role_arn": role}).items():
            if name not in GPU_ROLE:
                continue
            cfg = asyncio.run(_resolve(flow_run, "gpu-ecs"))
            assert cfg.configure_cloudwatch_logs is False

            async def submit(flow_run=flow_run, cfg=cfg):
                async with ECSWorker(work_pool_name="gpu-ecs") as worker:
                    return await worker.run(flow_run, cfg)

            task_runs[name] = asyncio.run(submit()).identifier.split("::")[1]
        # The defaults that failed before: logs without an execution role trip the worker.
        bad = _flow_runs({"configure_cloudwatch_logs": True})["train"]
        with pytest.raises(ValueError, match="execution_role_arn"):
            asyncio.run(_resolve(bad, "gpu-ecs"))
    tasks = ecs.describe_tasks(cluster="vggprice", tasks=list(task_runs.values()))["tasks"]
    assert len(tasks) == len(GPU_ROLE)
    for task in tasks:
        assert task["capacityProviderName"] == "vggprice-gpu" and not task.get("launchType")
        assert not task.get("attachments"), "no awsvpc: no subnets, no public IP asked"
        (override,) = task["overrides"]["containerOverrides"]
        env = {e["name"]: e["value"] for e in override["environment"]}
        assert env["VGGPRICE_STORE"] == WORKER_ENV["VGGPRICE_STORE"]
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), "task role instead"
        assert override["command"][:3] == ["prefect", "flow-run", "execute"]
        definition = ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])
        definition = definition["taskDefinition"]
        (container,) = definition["containerDefinitions"]
        assert container["image"] == ECS_IMAGE
        assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]
        assert definition["networkMode"] == "bridge"
        assert definition["requiresCompatibilities"] == ["EC2"]
        assert definition["taskRoleArn"] == role
        assert WORKER_ENV["AWS_SECRET_ACCESS_KEY"] not in json.dumps(definition, default=str)


# --- items 5, 6: Docker and process workers -----------------------------------------------


class _Daemon:
    """The one question the docker worker asks the daemon while it builds a request."""

    def version(self):
        return {"Version": "20.10.24"}


def docker_request(pool: str, cfg) -> dict:
    """The container-create request the docker worker makes, as docker-py checks it."""
    import docker
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker

    settings = DockerWorker(work_pool_name=pool)._build_container_settings(_Daemon(), cfg)
    args = _create_container_args(dict(settings, version="1.41"))
    args["environment"] = docker.utils.format_environment(args["environment"])
    return args


def test_docker_requests_carry_device_requests_and_the_workers_store_settings(rendered):
    for name in DEPLOYMENTS:
        pool, flow_run, cfg = rendered["gpu-docker", name]
        request = docker_request(pool, cfg)
        env = dict(item.split("=", 1) for item in request["environment"])
        for key in ("VGGPRICE_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "VGGPRICE_WORKER_NAME"):  # fmt: skip
            assert env[key] == WORKER_ENV[key], (name, key)
        assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
        devices = request["host_config"].get("DeviceRequests") or []
        if name in GPU_ROLE:
            assert pool == "gpu-docker" and request["image"] == "vggprice-worker:gpu"
            assert devices == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [],
                                "Capabilities": [["gpu"]], "Options": {}}]  # fmt: skip
            assert env["CUDA_VISIBLE_DEVICES"] == "1", "the worker's GPU, not a pool default"
        else:
            assert pool == "cpu-docker" and request["image"] == "vggprice-worker:cpu"
            assert devices == [] and "CUDA_VISIBLE_DEVICES" not in env
        assert request["host_config"]["ShmSize"] > 0
    # The template holds placeholders, never the values.
    for file in (INFRA / "work-pools").glob("*.json"):
        assert WORKER_ENV["AWS_SECRET_ACCESS_KEY"] not in file.read_text()


def test_process_gpu_runs_use_the_workers_gpu(rendered):
    """CUDA_VISIBLE_DEVICES from the worker's environment picks the GPU of a process
    worker's runs (one worker per GPU); the cpu pool hides GPUs."""
    for name in DEPLOYMENTS:
        pool, _, cfg = rendered["gpu", name]
        expected = WORKER_ENV["CUDA_VISIBLE_DEVICES"] if name in GPU_ROLE else ""
        assert cfg.env["CUDA_VISIBLE_DEVICES"] == expected, (pool, name)
        assert cfg.env["VGGPRICE_STORE"] == WORKER_ENV["VGGPRICE_STORE"]


def test_image_entrypoint_drops_empty_forwarded_variables():
    """A worker without one of the forwarded variables hands the run ''; the images'
    entrypoint unsets it, so defaults apply (all GPUs visible, boto3's own chain)."""
    env = {"PATH": os.environ["PATH"], "AWS_SESSION_TOKEN": "", "CUDA_VISIBLE_DEVICES": "",
           "VGGPRICE_STORE": "s3://b/p", "OTHER": ""}  # fmt: skip
    out = run("sh", str(INFRA / "docker" / "entrypoint.sh"), "env", env=env)
    seen = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert out.returncode == 0 and seen["VGGPRICE_STORE"] == "s3://b/p"
    assert "AWS_SESSION_TOKEN" not in seen and "CUDA_VISIBLE_DEVICES" not in seen
    assert seen["OTHER"] == "", "only the forwarded names"


# --- item 2 and 8: Helm ---------------------------------------------------------------------


def test_helm_values_name_the_kubernetes_pool_and_leave_its_template_alone():
    values = yaml.safe_load((INFRA / "helm" / "values-gpu.yaml").read_text())["worker"]
    pool = values["config"]["workPool"]
    assert POOLS[pool][0] == values["config"]["type"] == "kubernetes"
    assert "baseJobTemplate" not in values["config"], "vggprice pools apply owns the template"
    assert POOLS[pool][1], "the pool's concurrency limit bounds GPU Jobs"


def test_compose_and_helm_run_the_bridge():
    """The S3 bridge beside the workers: a compose service (its own profile, the workers'
    store settings) and a sidecar of the Kubernetes worker, each on the queue and the API
    the rest of the stack uses."""
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    bridge = services["bridge"]
    assert bridge["command"][:4] == ["vggprice", "bridge", "--sqs", "${DROPS_QUEUE_URL:-}"]
    assert bridge["profiles"] == ["bridge"], "off unless asked for: it needs a queue"
    assert bridge["environment"] == services["worker-cpu"]["environment"]
    assert bridge["image"] == services["worker-cpu"]["image"]
    worker = yaml.safe_load((INFRA / "helm" / "values-gpu.yaml").read_text())["worker"]
    (sidecar,) = worker["extraContainers"]
    assert sidecar["command"][:4] == ["vggprice", "bridge", "--sqs", "$(DROPS_QUEUE_URL)"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["PREFECT_API_URL"]["value"] == worker["selfHostedServerApiConfig"]["apiUrl"]
    assert (
        env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"]
        == (worker["selfHostedServerApiConfig"]["basicAuth"]["existingSecret"])
    )
    (config,) = sidecar["envFrom"]
    runtime = list(yaml.safe_load_all((INFRA / "kubernetes" / "job-runtime.yaml").read_text()))
    (store,) = [d for d in runtime if d["kind"] == "ConfigMap"]
    assert config["configMapRef"]["name"] == store["metadata"]["name"]
    assert {"DROPS_QUEUE_URL", "VGGPRICE_STORE"} <= set(store["data"])
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False


def test_score_drop_trigger_starts_a_run_per_drop_with_the_events_parameters():
    """prefect.yaml's trigger, as Prefect reads it: it matches the resource that
    notify_drop sends, one bucket per drop and store, and fills parameters score_flow has."""
    import inspect

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import Resource

    from flows.score import score_flow
    from tasks.scoring.arrivals import DROP_READY, drop_resource

    (spec,) = [d for d in _SPEC if d["name"] == "score-drop"]
    (raw,) = spec["triggers"]
    trigger = DeploymentEventTrigger.model_validate(raw)
    assert trigger.expect == {DROP_READY} and trigger.for_each == {"prefect.resource.id"}
    assert trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.within.total_seconds() >= 60, "a window: a duplicate event starts no run"
    labels = drop_resource("s3://bucket/lake", "d1")
    resource = Resource(labels)
    assert trigger.match.matches(resource)
    assert not trigger.match.matches(Resource({"prefect.resource.id": "vggprice.model.m-1"}))
    assert set(raw["parameters"]) <= set(inspect.signature(score_flow.fn).parameters)
    assert raw["parameters"]["drop"] == "{{ event.resource.drop }}"
    assert set(labels) >= {"drop", "store"}, "every label the templates read"
    others = [d["name"] for d in _SPEC if d.get("triggers") and d["name"] != "score-drop"]
    assert others == [], "score-new-drops stays the 5-minute safety net, on its schedule"


# --- item 7: Terraform ------------------------------------------------------------------------


def _unquote(node):
    if isinstance(node, dict):
        return {_unquote(k): _unquote(v) for k, v in node.items() if k != "__is_block__"}
    if isinstance(node, list):
        return [_unquote(v) for v in node]
    if isinstance(node, str) and len(node) > 1 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


def terraform() -> dict:
    """Every block of infra/terraform/*.tf, parsed by python-hcl2: {kind: {name: body}}
    (resources and data sources as 'type.name')."""
    import hcl2

    blocks: dict[str, dict] = {}
    for path in sorted((INFRA / "terraform").glob("*.tf")):
        with path.open() as f:
            parsed = _unquote(hcl2.load(f))
        for kind, items in parsed.items():
            for item in items:
                for label, body in item.items():
                    if kind in ("resource", "data"):
                        for name, inner in body.items():
                            blocks.setdefault(kind, {})[f"{label}.{name}"] = inner
                    else:
                        blocks.setdefault(kind, {})[label] = body
    return blocks


def test_terraform_scales_from_zero_on_schedule_and_boots_the_right_disk():
    tf = terraform()
    variables, resources = tf["variable"], tf["resource"]
    asg = resources["aws_autoscaling_group.worker"]
    assert variables["min_size"]["default"] == 0
    assert asg["desired_capacity"] == "${var.min_size}"
    assert asg["lifecycle"][0]["ignore_changes"] == ["desired_capacity"]
    schedule = resources["aws_autoscaling_schedule.nightly"]
    assert schedule["autoscaling_group_name"] == "${aws_autoscaling_group.worker.name}"
    minute, hour = map(int, variables["scale_up_recurrence"]["default"].split()[:2])
    (nightly,) = [d for d in _SPEC if d["name"] == "retrain-nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert (hour, minute) < (2, 0), "a worker is up before the nightly retrain"
    template = resources["aws_launch_template.worker"]
    disk = template["block_device_mappings"][0]
    assert disk["device_name"] == "${data.aws_ami.worker.root_device_name}"
    assert template["instance_initiated_shutdown_behavior"] == "terminate"
    assert "ubuntu-24.04" in variables["ami_ssm_parameter"]["default"], "Python 3.12"
    scale_in = tf["data"]["aws_iam_policy_document.scale_in"]["statement"][0]
    assert scale_in["actions"] == ["autoscaling:TerminateInstanceInAutoScalingGroup"]
    assert scale_in["resources"] == ["${aws_autoscaling_group.worker.arn}"]


def test_terraform_notifies_a_queue_of_drops_for_the_bridge():
    """The bucket sends ObjectCreated under the store's drops/ to an encrypted queue (a
    dead-letter queue behind it) that only that bucket may send to; the bridge's policy
    allows the calls it makes."""
    from tasks.store.lake import Lake

    tf = terraform()
    resources, data = tf["resource"], tf["data"]
    queue = resources["aws_sqs_queue.drops"]
    assert queue["sqs_managed_sse_enabled"] is True
    assert resources["aws_sqs_queue.drops_dead"]["sqs_managed_sse_enabled"] is True
    assert "aws_sqs_queue.drops_dead[0].arn" in queue["redrive_policy"]
    (notify,) = resources["aws_s3_bucket_notification.drops"]["queue"]
    assert notify["events"] == ["s3:ObjectCreated:*"]
    assert notify["filter_prefix"] == "${var.store_prefix}/" + Lake.DROPS
    assert notify["queue_arn"] == "${aws_sqs_queue.drops[0].arn}"
    assert resources["aws_s3_bucket_notification.drops"]["depends_on"] == [
        "${aws_sqs_queue_policy.drops}"
    ]
    (send,) = data["aws_iam_policy_document.drops_queue"]["statement"]
    assert send["actions"] == ["sqs:SendMessage"]
    assert send["principals"][0]["identifiers"] == ["s3.amazonaws.com"]
    conditions = {c["variable"]: c["values"] for c in send["condition"]}
    assert conditions["aws:SourceArn"] == ["arn:aws:s3:::${var.bucket_name}"]
    assert "aws:SourceAccount" in conditions
    bridge = data["aws_iam_policy_document.bridge"]["statement"]
    allowed = {a for st in bridge for a in st["actions"]}
    made = set(
        re.findall(r"self\.client\.(\w+)\(", (REPO / "tasks/scoring/arrivals.py").read_text())
    )
    assert made == {"receive_message", "delete_message_batch", "change_message_visibility_batch"}
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"} <= allowed
    assert not any(a.startswith("s3:Put") or a == "sqs:*" for a in allowed), "read only"
    outputs = tf["output"]
    assert "aws_sqs_queue.drops[0].url" in outputs["drops_queue_url"]["value"]


def test_user_data_finds_python_and_leaves_the_group_on_failure(tmp_path):
    """user_data.sh.tftpl with its template variables filled is valid bash that picks a
    Python >= 3.11 for scripts/bootstrap, runs a worker per GPU on its own device, and
    takes the instance out of the group when it fails or idles."""
    text = (INFRA / "terraform" / "user_data.sh.tftpl").read_text()
    assert "%{" not in text, "only plain ${name} interpolations"
    names = set(re.findall(r"\$\{([a-z_]+)\}", text))
    args = re.search(r"templatefile\([^,]+,\s*\{(.*?)\}\)", (INFRA / "terraform" / "main.tf")
                     .read_text(), re.S).group(1)  # fmt: skip
    assert names == set(re.findall(r"^\s*(\w+)\s*=", args, re.M)), "every variable is passed"
    script = re.sub(r"\$\{([a-z_]+)\}", lambda m: f"X{m.group(1)}", text)
    (tmp_path / "user_data.sh").write_text(script)
    out = run("bash", "-n", str(tmp_path / "user_data.sh"))
    assert out.returncode == 0, out.stderr
    assert re.search(r"for candidate in python3\.13 python3\.12 python3\.11", text)
    assert 'PYTHON="$python" "$repo/scripts/bootstrap"' in text
    assert "trap 'leave_group" in text and "--should-decrement-desired-capacity" in text
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in text and "--limit 1" in text
    assert "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule" in text
    # scripts/bootstrap honours PYTHON and refuses an old one, with the reason.
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    out = run("bash", "scripts/bootstrap", env=os.environ | {"PYTHON": str(old)})
    assert out.returncode == 1 and "Python >= 3.11" in out.stderr


def test_terraform_fmt():
    """The only check that needs terraform itself; the files are parsed and checked above
    (python-hcl2) and by checkov either way."""
    terraform_bin = shutil.which("terraform")
    if terraform_bin is None:
        pytest.skip("terraform is not installed (not on any package registry): fmt only")
    out = run(terraform_bin, "fmt", "-check", "-recursive", "-diff", "infra/terraform")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("framework,target", [("terraform", "infra/terraform"),
                                              ("dockerfile", "infra/docker"),
                                              ("kubernetes", "infra/kubernetes")])  # fmt: skip
def test_checkov(framework, target):
    out = run(tool("checkov"), "--skip-download", "--quiet", "--compact",
              "--framework", framework, "-d", target)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]
    assert "Passed checks" in out.stdout


def test_checkov_on_a_rendered_kubernetes_job(rendered, tmp_path):
    _, _, cfg = rendered["gpu-k8s", "train"]
    (tmp_path / "job.json").write_text(json.dumps(cfg.job_manifest))
    out = run(tool("checkov"), "--skip-download", "--quiet", "--compact",
              "--framework", "kubernetes", "-d", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:]


# --- images ---------------------------------------------------------------------------------


def test_dockerfiles_take_a_base_image_and_carry_the_code_at_one_path():
    out = run(tool("hadolint"), *sorted(str(p) for p in (INFRA / "docker").glob("Dockerfile.*")))
    assert out.returncode == 0, out.stdout + out.stderr
    official = {"cpu": "python:3.11-slim", "gpu": "tensorflow/tensorflow:2.17.0-gpu",
                "postgres": "debian:bookworm-slim", "moto": "python:3.11-slim"}  # fmt: skip
    for name, base in official.items():
        text = (INFRA / "docker" / f"Dockerfile.{name}").read_text()
        assert re.search(rf"^ARG BASE_IMAGE={re.escape(base)}\n(#.*\n)*FROM \$\{{BASE_IMAGE\}}\n",
                         text, re.M), name  # fmt: skip
    for name in ("cpu", "gpu"):
        text = (INFRA / "docker" / f"Dockerfile.{name}").read_text()
        assert "WORKDIR /opt/vggprice" in text and "install --no-cache-dir" in text
        assert re.search(r"pip install --no-cache-dir (--no-deps )?-e \.", text), name
        assert 'ENTRYPOINT ["vggprice-entrypoint"]' in text


# --- automations on a real server -------------------------------------------------------------


def _emit(api: str, event: str, resource_ids: list[str], payload: dict | None = None) -> None:
    """One event for each resource id, from a process of its own (tests/programs/emit.py)."""
    env = os.environ | {"PREFECT_API_URL": api}
    cmd = [sys.executable, "-m", "tests.programs.emit", event, json.dumps(payload or {}),
           *resource_ids]  # fmt: skip
    out = subprocess.run(cmd, cwd=CHECKOUT, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_automations_notify_on_a_rejected_challenger(prefect_api):
    """The shipped automations on a real server: a rejected challenger's event reaches a
    webhook notification block (a local HTTP server stands in for Slack or email)."""
    import http.server
    import threading

    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.deploy.pools import apply_automations
    from tests.servers import free_port

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
            assert names == ["vggprice: challenger rejected", "vggprice: crash runs stuck pending",
                             "vggprice: crash zombie flow runs",
                             "vggprice: nightly retrain failed"]  # fmt: skip
            assert apply_automations(str(block_id)) == names, "re-applying replaces, by name"
            # From a process of its own: this one's events client may already be bound
            # to another test server.
            _emit(prefect_api, "vggprice.challenger.rejected", ["vggprice.model.m-test"],
                  {"reason": "RMSE 9.0 does not beat 8.0"})  # fmt: skip
            deadline = time.time() + 90
            while not received and time.time() < deadline:
                time.sleep(1)
    finally:
        server.shutdown()
    assert received, "the automation did not call the webhook within 90 s"
    assert b"challenger rejected" in received[0] and b"m-test" in received[0]


def test_automations_crash_zombie_and_stuck_runs(prefect_api):
    """Item 7's zombies and item 3's stuck Pending runs, on a real server: a run whose
    heartbeats stop, and a run that stays Pending, end Crashed; a run that keeps beating
    does not. The shipped triggers, with their windows shortened to 20 s."""
    from prefect import flow
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending, Running

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        for file in ("crash-zombie-runs.json", "crash-stuck-pending.json"):
            spec = json.loads((INFRA / "automations" / file).read_text())
            assert spec["trigger"]["within"] >= 300, "room for slow starts and heartbeats"
            spec["trigger"]["within"] = 20
            Automation.model_validate(spec).create()

        @flow(name="vggprice-probe")
        def probe():
            pass

        zombie, alive, stuck = (c.create_flow_run(probe, name=n) for n in ("z", "a", "s"))
        for run_ in (zombie, alive):
            c.set_flow_run_state(run_.id, Running(), force=True)
        c.set_flow_run_state(stuck.id, Pending(), force=True)
        beat = "prefect.flow-run.heartbeat"
        _emit(prefect_api, beat, [f"prefect.flow-run.{r.id}" for r in (zombie, alive)])
        deadline = time.time() + 150
        states = {}
        while time.time() < deadline:
            _emit(prefect_api, beat, [f"prefect.flow-run.{alive.id}"])  # keeps beating
            states = {
                r.name: c.read_flow_run(r.id).state.type.value for r in (zombie, alive, stuck)
            }
            if states["z"] == states["s"] == "CRASHED":
                break
            time.sleep(3)
    assert states == {"z": "CRASHED", "a": "RUNNING", "s": "CRASHED"}, states
