"""The deployed system: a real Prefect server, cpu and gpu process pools from the
infra templates, `prefect deploy --all`, one worker per pool, and a moto S3 store."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from tasks.deploy.pools import POOLS, REPO, apply_pools, deploy_all, worker_command
from tasks.reports import line_key
from tasks.store.storage import open_store
from tests.conftest import TINY
from tests.servers import stop_process

pytestmark = pytest.mark.deployed


def _png(shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 30 + shade % 200).save(buf, format="PNG")
    return buf.getvalue()


def test_retrain_on_pools_and_score_new_drops(prefect_api, s3_uri, idx_source, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = os.environ | {"PREFECT_API_URL": prefect_api, "TF_CPP_MIN_LOG_LEVEL": "2",
                        "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
    workers = []
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        assert apply_pools() == dict.fromkeys(POOLS, "created")
        assert apply_pools() == dict.fromkeys(POOLS, "updated")
        deploy_all(REPO, api_url=prefect_api)
        try:
            # One cpu worker; two gpu workers taking one run at a time each.
            for name, pool, limit in (
                ("cpu", "cpu", None),
                ("gpu-a", "gpu", 1),
                ("gpu-b", "gpu", 1),
            ):
                log = open(tmp_path / f"worker-{name}.log", "w")  # noqa: SIM115 - worker's lifetime
                named = env | {"VGGPRICE_WORKER_NAME": name}
                workers.append(subprocess.Popen(worker_command(pool, limit), env=named,
                                                stdout=log, stderr=log))  # fmt: skip
            params = {"store": s3_uri, "source": str(idx_source), "settings": TINY, "force": True}
            first = run_deployment(
                "retrain/retrain-nightly", parameters=params, timeout=600, poll_interval=2
            )
            assert first.state.is_completed(), (first.state, _logs(tmp_path))

            with get_client(sync_client=True) as client:
                (train_run,) = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["train"]))
                )
                assert train_run.work_pool_name == "gpu" and train_run.state.is_completed()
                assert train_run.deployment_id is not None, "run through its deployment"
                keys = {a.key for a in client.read_artifacts()}
            store = open_store(s3_uri)
            champion = store.get_json("registry/champion.json")
            mv = champion["model_version"]
            names = ("champion", f"eval-{mv}", f"train-{mv}")
            assert {line_key(s3_uri, "demo", n) for n in names} <= keys

            second = run_deployment(
                "retrain/retrain-nightly", parameters=params, timeout=600, poll_interval=2
            )
            assert second.state.is_completed()
            with get_client(sync_client=True) as client:
                assert len(client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))) == 1  # fmt: skip
                # The run's process ships its last logs as it exits, which can be just
                # after the server marks the run completed.
                for _ in range(30):
                    messages = [lg.message for lg in client.read_logs(
                        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[second.id])))]  # fmt: skip
                    if any("skipped (inputs unchanged)" in m for m in messages):
                        break
                    time.sleep(1)
            assert any(
                "skipped (inputs unchanged): ingest, label, train, evaluate" in m for m in messages
            ), messages

            # A child that fails (weights whose layers are not VGG16's) fails the parent
            # with the child's reason.
            import keras

            wrong = tmp_path / "wrong.weights.h5"
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save_weights(wrong)
            bad = params | {"settings": TINY | {"weights": str(wrong)}}
            failed = run_deployment(
                "retrain/retrain-nightly", parameters=bad, timeout=600, poll_interval=2
            )
            assert failed.state.is_failed(), failed.state
            assert "on pool 'gpu' ended FAILED" in failed.state.message
            assert "not VGG16" in failed.state.message, failed.state.message

            for drop in ("drop-a", "drop-b"):
                for i in range(3):
                    store.put_bytes(f"drops/{drop}/img-{i}.png", _png())
            scan = run_deployment(
                "score-new-drops/score-new-drops",
                parameters={"store": s3_uri},
                timeout=600,
                poll_interval=2,
            )
            assert scan.state.is_completed(), (scan.state, _logs(tmp_path))
            for drop in ("drop-a", "drop-b"):
                manifest = store.get_json(f"scores/{drop}/{mv}/_manifest.json")
                assert manifest["counts"] == {"listed": 3, "priced": 3, "rejected": 0}

            # The fan-out: score-drop launches two partition runs on the gpu pool; each
            # gpu worker takes one; the drop is priced once and the manifest names both.
            for i in range(300):
                store.put_bytes(f"drops/big/img-{i:03d}.png", _png(i))
            fan = run_deployment(
                "score-drop/score-drop",
                parameters={"drop": "big", "store": s3_uri, "score_pool": "gpu",
                            "partitions": 2, "shard_size": 10},
                timeout=600,
                poll_interval=2,
            )  # fmt: skip
            assert fan.state.is_completed(), (fan.state, _logs(tmp_path))
            manifest = store.get_json(f"scores/big/{mv}/_manifest.json")
            assert manifest["counts"] == {"listed": 300, "priced": 300, "rejected": 0}
            workers_seen = {s.rsplit("@", 1)[-1] for s in manifest["scorer_counts"]}
            assert workers_seen == {"gpu-a", "gpu-b"}, manifest["scorer_counts"]
            priced = open_store(s3_uri).keys(f"scores/big/{mv}/part-")
            assert len(priced) == 30

            # A catalog line retrained on the pools beside the demo: its own champion; its
            # training launches an extract partition on the gpu pool beside it.
            from tests.test_catalog import make_catalog

            photos, text = make_catalog(tmp_path / "photos")
            (tmp_path / "prices.csv").write_text(text)
            catalog = run_deployment(
                "catalog/retrain-catalog",
                parameters={"store": s3_uri, "source": str(photos), "name": "shoes",
                            "prices": str(tmp_path / "prices.csv"), "skip_bad_rows": True, "force": True,
                            "settings": TINY | {"preprocess": "rgb"},
                            "extraction": {"pool": "gpu", "partitions": 1}},
                timeout=600,
                poll_interval=2,
            )  # fmt: skip
            assert catalog.state.is_completed(), (catalog.state, _logs(tmp_path))
            shoes = store.get_json("registry/lines/shoes/champion.json")["model_version"]
            assert store.get_json("registry/champion.json")["model_version"] == mv
            with get_client(sync_client=True) as client:
                trains = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))  # fmt: skip
            (catalog_train,) = [r for r in trains
                                if r.parameters["dataset_version"].startswith("cat-shoes-")]  # fmt: skip
            assert catalog_train.work_pool_name == "gpu" and catalog_train.state.is_completed()
            assert catalog_train.parameters["extraction"]["pool"] == "gpu"
            with get_client(sync_client=True) as client:
                for _ in range(150):  # it runs on the other gpu worker, maybe after the train
                    (partition,) = client.read_flow_runs(
                        flow_filter=FlowFilter(name=FlowFilterName(any_=["extract-features"])))  # fmt: skip
                    if partition.state.is_final():
                        break
                    time.sleep(2)
            assert partition.work_pool_name == "gpu" and partition.state.is_completed(), (
                partition.state, _logs(tmp_path))  # fmt: skip
            assert partition.parameters["settings"] == catalog_train.parameters["settings"]
            features = [k for k in store.keys("features/") if k.endswith(".npy")]
            assert features and not [k for k in store.keys("features/") if "/_claims/" in k]
            scan = run_deployment(
                "score-new-drops/score-new-drops",
                parameters={"store": s3_uri, "line": "shoes"},
                timeout=600,
                poll_interval=2,
            )
            assert scan.state.is_completed(), (scan.state, _logs(tmp_path))
            manifest = store.get_json(f"scores/drop-a/{shoes}/_manifest.json")
            assert manifest["counts"] == {"listed": 3, "priced": 3, "rejected": 0}
        finally:
            for proc in workers:
                stop_process(proc)


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("worker-*.log"))
