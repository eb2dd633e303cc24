"""MLflow follows the lake: a real `mlflow server` (SQLite, served artifacts, 127.0.0.1),
trainings and promotions through the flows, and what MLflow then holds, read back through
MlflowClient. The server going down loses nothing; the next run reconciles."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY, copy_lake
from tests.servers import free_port, running_mlflow_server

pytest.importorskip("mlflow")  # the test extra installs it (with `mlflow server`)

NAME = "vggprice-demo"


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def train_in_children(lake_dir, dv: str, lv: str, settings: list[dict]) -> list[str]:
    """`train` once per settings, each in its own Python process, at the same time (as
    conftest.train_in_child); the model versions."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.programs.train", str(lake_dir), dv, lv,
                          json.dumps(one)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for one in settings
    ]  # fmt: skip
    versions = []
    for proc in procs:
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-4000:]
        versions.append(out.split()[-1])
    return versions


def retrain(store: str, dv: str, lv: str, seed: int, uri: str, **gate) -> tuple[str, dict]:
    """train -> evaluate -> promote as the retrain flow chains them, with tracking at ``uri``
    (the training itself happened before, in a child process: here it is found)."""
    from flows.evaluate import evaluate_flow, promote_flow
    from flows.train import train_flow
    from tasks.model.train_settings import TrainSettings

    settings = TrainSettings(**TINY | {"seed": seed})
    trained = train_flow(dataset_version=dv, labels_version=lv, store=store, settings=settings,
                         mlflow_tracking_uri=uri)  # fmt: skip
    mv = trained["model_version"]
    evaluate_flow(model_version=mv, store=store, mlflow_tracking_uri=uri)
    return mv, promote_flow(model_version=mv, store=store, mlflow_tracking_uri=uri, **gate)


def runs_of(client, model_version: str) -> list:
    from tasks.governance.tracking import EXPERIMENT, MODEL_TAG

    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id],
                              f"tags.`{MODEL_TAG}` = '{model_version}'")  # fmt: skip


def registered(client) -> dict[str, str]:
    """model version -> its registered version in vggprice-demo."""
    from tasks.governance.tracking import MODEL_TAG

    return {v.tags[MODEL_TAG]: v.version for v in client.search_model_versions(f"name = '{NAME}'")}


def alias(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    from tasks.governance.tracking import MODEL_TAG

    try:
        return client.get_model_version_by_alias(NAME, name).tags[MODEL_TAG]
    except MlflowException:
        return None


def eval_report(store: str, model_version: str) -> str:
    from prefect.client.orchestration import get_client

    from tasks.reports import line_key

    with get_client(sync_client=True) as client:
        found = sorted(client.read_artifacts(), key=lambda a: a.created)
    return [a.data for a in found if a.key == line_key(store, "demo", f"eval-{model_version}")][-1]


def test_mlflow_follows_the_lake_through_a_server_outage(
    tiny_lake, tmp_path, mlflow_url, prefect_server, caplog, capsys
):
    from mlflow import MlflowClient
    from mlflow.models import get_model_info
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from flows.cli import main
    from tasks.governance.tracking import COMPLETE_TAG, MODEL_URI_TAG

    _, dv, lv, m1 = tiny_lake
    store = str(tmp_path / "lake")
    lake = copy_lake(tiny_lake.lake, store)  # m1 is its champion, promoted without MLflow
    m2, m3 = train_in_children(tmp_path / "lake", dv, lv, [TINY | {"seed": s} for s in (1, 2)])
    client = MlflowClient(mlflow_url, registry_uri=mlflow_url)

    # 1. Tracking on: m2 is promoted over m1 (forced: tiny models are noise).
    mv, decision = retrain(store, dv, lv, 1, mlflow_url, force=True)
    assert mv == m2 and decision["promoted"]
    (run,) = runs_of(client, m2)
    settings = lake.model(m2).config()["settings"]
    assert run.data.params == {k: str(v) for k, v in settings.items()}
    assert run.data.tags["vggprice.dataset_version"] == dv
    assert run.data.tags["vggprice.labels_version"] == lv
    assert run.data.tags["prefect.flow_run_id"], "the Prefect flow run that trained it"
    assert run.data.tags[COMPLETE_TAG] == "true" and run.info.status == "FINISHED"
    history = lake.model(m2).history()
    for key in ("loss", "val_loss"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in logged] == list(enumerate(history[key], start=1))
    metrics = lake.model(m2).evaluation().metrics()
    assert run.data.metrics["test_rmse"] == pytest.approx(metrics["rmse"])
    assert run.data.metrics["test_noise_floor_rmse"] == pytest.approx(metrics["noise_floor_rmse"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "history.json", "plots", "evaluation"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/loss.png"}
    (logged_model,) = client.search_logged_models(
        [run.info.experiment_id], f"source_run_id = '{run.info.run_id}'"
    )
    assert logged_model.name == "model" and logged_model.model_uri == run.data.tags[MODEL_URI_TAG]
    with _use_tracking_uri(mlflow_url):
        assert "keras" in get_model_info(logged_model.model_uri).flavors
    assert set(registered(client)) == {m1, m2}, "every model the gate decided on"
    assert alias(client, "champion") == m2 and alias(client, "challenger") is None
    report = eval_report(store, m2)
    assert (
        f"[The run in MLflow]({mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"
        in report
    )

    # 2. The server is down (and its URI carries a password): m3 is trained and judged
    # all the same (the gate keeps m2), with one warning line per stage.
    down = f"http://vp:hunter2@127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        mv, decision = retrain(store, dv, lv, 2, down, margin=1.0)
    assert mv == m3 and not decision["promoted"]
    assert lake.registry().champion()["model_version"] == m2
    assert lake.model(m3).evaluation().complete
    said = [r.getMessage() for r in caplog.records if "MLflow at" in r.getMessage()]
    assert len(said) == 3, said  # train, evaluate, promote
    assert all("\n" not in s and "next run" in s and "127.0.0.1" in s for s in said)
    assert "hunter2" not in caplog.text + capsys.readouterr().err
    assert runs_of(client, m3) == [] and alias(client, "champion") == m2

    # 3. Up again: the same run again finds everything in the lake and MLflow catches up.
    mv, decision = retrain(store, dv, lv, 2, mlflow_url, margin=1.0)
    assert not decision["promoted"]
    (run3,) = runs_of(client, m3)
    assert len(client.get_metric_history(run3.info.run_id, "loss")) == len(
        lake.model(m3).history()["loss"]
    )
    assert run3.data.metrics["test_rmse"] == pytest.approx(
        lake.model(m3).evaluation().metrics()["rmse"]
    )
    assert set(registered(client)) == {m1, m2, m3}
    assert alias(client, "champion") == m2 and alias(client, "challenger") == m3
    assert [len(runs_of(client, v)) for v in (m1, m2, m3)] == [1, 1, 1], "never a second run"

    # 4. A person promotes m3 from the command line: the champion alias moves with the
    # lake's pointer, and no candidate stands rejected against it.
    assert main(["promote", m3, "--force", "--store", store, "--mlflow", mlflow_url]) == 0
    assert lake.registry().champion()["model_version"] == m3
    assert alias(client, "champion") == m3 and alias(client, "challenger") is None
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3


def test_uris_lose_their_credentials(monkeypatch):
    from tasks.governance.tracking import credentials_to_environment, run_url, safe_uri

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert credentials_to_environment("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    uri = credentials_to_environment("https://me%40shop:p%3As@mlflow.example:8443/base")
    assert uri == "https://mlflow.example:8443/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "me@shop"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p:s"

    assert safe_uri("https://me:s3cret@mlflow.example:8443/base?token=x") == (
        "https://mlflow.example:8443/base"
    )
    assert safe_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert run_url("https://me:s3cret@host/", "1", "abc") == "https://host/#/experiments/1/runs/abc"
    assert run_url("sqlite:///mlflow.db", "1", "abc") is None


def test_a_password_in_the_uri_reaches_the_run_environment_not_its_parameters(
    tiny_lake, tmp_path, prefect_server, monkeypatch
):
    """`--mlflow http://user:password@host`: Prefect stores (and shows) the run's
    parameters, so the URI there has no credentials; they are in the run's environment,
    where MLflow's client reads them. Nothing the run logged has the password either."""
    from prefect import get_client, tags
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )  # fmt: skip

    from flows.cli import main

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # and put back as they were after
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    port = free_port()  # no MLflow answers there: tracking logs one warning
    tag = f"credentials-{port}"
    with tags(tag):
        assert main(["promote", tiny_lake.model_version, "--force", "--store", lake.uri,
                     "--mlflow", f"http://alice:s3cret-pw@127.0.0.1:{port}"]) == 0  # fmt: skip
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
        assert "s3cret" not in json.dumps(run.parameters, default=str)
        assert run.parameters["mlflow_tracking_uri"] == f"http://127.0.0.1:{port}"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret-pw"
        for _ in range(30):  # the run's last logs may reach the server just after it ends
            messages = [lg.message for lg in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]  # fmt: skip
            if any(f"MLflow at http://127.0.0.1:{port}" in m for m in messages):
                break
            time.sleep(1)
    assert any(f"MLflow at http://127.0.0.1:{port}" in m for m in messages), messages
    assert [m for m in messages if "s3cret" in m] == []


def test_tracking_off_never_imports_mlflow(tiny_lake, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "VGGPRICE_MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.programs.no_mlflow", str(tiny_lake.lake.store.root),
         tiny_lake.model_version],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False", out.stdout
