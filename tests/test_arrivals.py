"""Drops priced on arrival: moto's S3 bucket notifications delivered to moto's SQS, the
bridge that turns them into one event per drop, and (marked deployed) a real Prefect
server and cpu worker where `vggprice notify` and the bridge start the score-drop
deployment's trigger, which prices each drop exactly once."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tasks.scoring.arrivals import (
    DROP_READY,
    BadMessage,
    Bridge,
    SqsQueue,
    drop_resource,
    drops_in_message,
    notify_drop,
    s3_objects,
)
from tasks.store.lake import Lake
from tasks.store.storage import open_store
from tests.conftest import copy_lake, prefect_home

REPO = Path(__file__).resolve().parents[1]


def _png(shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 30 + shade % 200).save(buf, format="PNG")
    return buf.getvalue()


def notified_queue(endpoint: str, store_uri: str) -> str:
    """A moto SQS queue that the store's bucket notifies of every object created under
    the store's drops/ (S3's own notification, as infra/terraform configures it)."""
    import boto3

    lake = Lake(open_store(store_uri))
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    url = sqs.create_queue(QueueName=f"drops-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    store = lake.store
    rule = {"Name": "prefix", "Value": store.prefix + lake.drops_prefix()}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_bucket_notification_configuration(
        Bucket=store.bucket,
        NotificationConfiguration={"QueueConfigurations": [{
            "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [rule]}}}]},
    )  # fmt: skip
    return url


def queue_counts(url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    import boto3

    attrs = boto3.client("sqs", region_name="us-east-1").get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_s3_notifications_name_their_drops(s3_endpoint, s3_uri):
    """What moto's S3 really delivers to SQS (a test event, then one message per object,
    keys URL-encoded) maps to this store's drops; keys outside drops/ name none, another
    bucket's are a message the bridge cannot use."""
    import boto3

    url = notified_queue(s3_endpoint, s3_uri)
    store = open_store(s3_uri)
    store.put_bytes("drops/spring 26/my photo (1).png", _png())
    store.put_bytes("drops/spring 26/.ready", b"")
    store.put_bytes("drops/loose.png", _png())  # right under drops/: in no drop
    sqs = boto3.client("sqs", region_name="us-east-1")
    bodies = [m["Body"] for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                                     WaitTimeSeconds=2).get("Messages", [])]  # fmt: skip
    assert len(bodies) == 4, bodies  # the test event and three objects
    assert any(json.loads(b).get("Event") == "s3:TestEvent" for b in bodies)
    keys = [k for b in bodies for _, k in s3_objects(b)]
    assert f"{store.prefix}drops/spring 26/my photo (1).png" in keys, keys
    assert any("%28" in b or "+" in b for b in bodies), "moto sends keys URL-encoded"
    lake = Lake(store)
    found = [drops_in_message(lake, b) for b in bodies]
    assert sorted(map(json.dumps, found)) == sorted(
        map(json.dumps, [{}, {"spring 26": False}, {"spring 26": True}, {}])
    )
    other = json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": "another-bucket"}, "object": {"key": "lake/drops/x/a.png"}}}]})  # fmt: skip
    with pytest.raises(BadMessage, match="another-bucket"):  # deleted, with its reason
        drops_in_message(lake, other)
    removed = other.replace("another-bucket", store.bucket).replace("Created:Put", "Removed:Delete")
    assert drops_in_message(lake, removed) == {}
    via_sns = json.dumps({"Type": "Notification", "Message": other.replace("another-bucket",
                                                                           store.bucket)})  # fmt: skip
    assert drops_in_message(lake, via_sns) == {"x": False}


def test_bridge_emits_once_per_drop_and_deletes_only_after(s3_endpoint, s3_uri):
    """Notifications grouped by drop: a drop with its ready marker is emitted at once, the
    other once quiet; an event that cannot be sent keeps its messages, which are deleted
    only once it is; messages still held when the bridge stops go back to the queue."""
    url = notified_queue(s3_endpoint, s3_uri)
    store = open_store(s3_uri)
    clock, sent, failing = Clock(), [], []

    def emit(drop: str) -> None:
        if failing:
            failing.pop()
            raise ConnectionError("Prefect API unreachable\nsecond line")
        sent.append(drop)

    bridge = Bridge(SqsQueue(url, "us-east-1"), Lake(store), quiet_seconds=30, emit=emit,
                    clock=clock, poll_seconds=1)  # fmt: skip
    for i in range(3):
        store.put_bytes(f"drops/slow/img-{i}.png", _png(i))
    for i in range(2):
        store.put_bytes(f"drops/marked/img-{i}.png", _png(i))
    store.put_bytes("drops/marked/.ready", b"")
    while bridge.receive(1):  # everything delivered so far (moto returns it at once)
        pass
    assert bridge.flush() == ["marked"] and sent == ["marked"]
    assert queue_counts(url) == (0, 3), "the marked drop's messages (and the test event) deleted"

    clock.now += 29
    store.put_bytes("drops/slow/img-3.png", _png(3))  # not quiet yet: the clock restarts
    bridge.step()
    assert sent == ["marked"] and queue_counts(url) == (0, 4)
    clock.now += 31
    failing.append(1)
    assert bridge.flush() == [] and queue_counts(url) == (0, 4), "kept while the event fails"
    clock.now += 60
    assert bridge.flush() == ["slow"] and sent == ["marked", "slow"]
    assert queue_counts(url) == (0, 0)

    store.put_bytes("drops/late/img-0.png", _png())
    stop = threading.Event()
    bridge.step()
    stop.set()
    assert bridge.run(stop) == {"events": 2, "drops": ["marked", "slow"], "handed_back": 1}
    assert queue_counts(url) == (1, 0), "handed back for the next bridge"


def _record(bucket: str, key: object, event: str = "ObjectCreated:Put") -> dict:
    return {"eventName": event, "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}


def hostile_bodies(bucket: str, prefix: str) -> dict[str, str]:
    """Queue messages the bridge cannot use, by what is wrong with them."""
    good = _record(bucket, f"{prefix}drops/ok/a.png")
    return {
        "records not a list": json.dumps({"Records": "x"}),
        "numeric key": json.dumps({"Records": [_record(bucket, 123)]}),
        "record not an object": json.dumps({"Records": [7]}),
        "SNS message an object": json.dumps({"Type": "Notification", "Message": {"Records": [good]}}),
        "nested too deep": '{"Records": ' + "[" * 30000 + "]" * 30000 + "}",
        "huge": json.dumps({"Records": [good] * 2000}),
        "not JSON": "{nope",
        "dot-dot drop": json.dumps({"Records": [_record(bucket, f"{prefix}drops/../x.png")]}),
        "encoded dot-dot": json.dumps({"Records": [_record(bucket, f"{prefix}drops/%2E%2E/x.png")]}),
        "dot drop": json.dumps({"Records": [_record(bucket, f"{prefix}drops/./x.png")]}),
        "control character": json.dumps({"Records": [_record(bucket, f"{prefix}drops/a%0Ab/x.png")]}),
        "another bucket": json.dumps({"Records": [_record("another-bucket", f"{prefix}drops/b/x.png")]}),
    }  # fmt: skip


def test_bridge_deletes_what_it_cannot_use_and_handles_the_rest(s3_endpoint, s3_uri, caplog):
    """Hostile or malformed messages between two good ones: each is deleted with one log
    line, both good drops get their events, nothing is left on the queue or held."""
    import boto3

    caplog.set_level(logging.INFO, logger="vggprice")
    url = notified_queue(s3_endpoint, s3_uri)
    store = open_store(s3_uri)
    sqs = boto3.client("sqs", region_name="us-east-1")
    store.put_bytes("drops/first/img-0.png", _png())
    bad = hostile_bodies(store.bucket, store.prefix)
    for body in bad.values():
        sqs.send_message(QueueUrl=url, MessageBody=body)
    store.put_bytes("drops/second/img-0.png", _png())
    clock, sent = Clock(), []
    bridge = Bridge(SqsQueue(url, "us-east-1"), Lake(store), quiet_seconds=30, emit=sent.append,
                    clock=clock, poll_seconds=1)  # fmt: skip
    received = 0
    while got := bridge.receive(1):
        received += got
    assert received == len(bad) + 3, "the test event, two good ones and every bad one"
    clock.now += 31
    assert bridge.flush() == ["first", "second"] and sent == ["first", "second"]
    assert queue_counts(url) == (0, 0), "the bad messages deleted, the good ones once sent"
    assert not bridge.held and not bridge.messages
    deleted = [r.getMessage() for r in caplog.records if "deleted:" in r.getMessage()]
    assert len(deleted) == len(bad), deleted
    assert all(len(line) < 300 and "\n" not in line for line in deleted), deleted
    for why in ("'..'", "'.'", "control character", "another-bucket", "not JSON", "at most"):
        assert sum(why in line for line in deleted) >= 1, (why, deleted)


def test_a_message_that_cannot_be_held_is_logged_and_let_go(s3_endpoint, s3_uri, caplog):
    """A hold that SQS refuses (here a receipt made invalid by deleting its message) is
    logged; the bridge stops holding that message and still sends its drop's event."""
    import boto3

    caplog.set_level(logging.INFO, logger="vggprice")
    url = notified_queue(s3_endpoint, s3_uri)
    store = open_store(s3_uri)
    for i in range(2):
        store.put_bytes(f"drops/slow/img-{i}.png", _png(i))
    clock, sent = Clock(), []
    bridge = Bridge(SqsQueue(url, "us-east-1"), Lake(store), quiet_seconds=100, emit=sent.append,
                    clock=clock, poll_seconds=1)  # fmt: skip
    while bridge.receive(1):
        pass
    assert len(bridge.messages) == 2
    gone, kept = sorted(bridge.messages)
    boto3.client("sqs", region_name="us-east-1").delete_message(
        QueueUrl=url, ReceiptHandle=bridge.messages[gone].receipt
    )
    clock.now += bridge.visibility / 2
    bridge.keep_held()
    lines = [r.getMessage() for r in caplog.records if "not held" in r.getMessage()]
    assert len(lines) == 1 and gone in lines[0] and "ReceiptHandleIsInvalid" in lines[0], lines
    assert set(bridge.messages) == {kept}, "the other message is still held"
    clock.now += 100
    assert bridge.flush() == ["slow"] and sent == ["slow"]
    assert queue_counts(url) == (0, 0)


def test_drop_event_names_drop_and_store_never_credentials(s3_endpoint):
    a = drop_resource("s3://bucket-a/lake", "d1")
    assert a == {"prefect.resource.id": a["prefect.resource.id"], "prefect.resource.name": "d1",
                 "drop": "d1", "store": "s3://bucket-a/lake"}  # fmt: skip
    assert a["prefect.resource.id"].startswith("vggprice.drop.d1@")
    assert drop_resource("s3://bucket-a/lake/", "d1") == a, "one store, one id"
    assert (
        drop_resource("s3://bucket-b/lake", "d1")["prefect.resource.id"] != a["prefect.resource.id"]
    )
    assert "testing" not in json.dumps(a), "no credential of the environment"


def test_notify_needs_a_prefect_api(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ValueError, match="PREFECT_API_URL is not set"):  # fmt: skip
        notify_drop(str(tmp_path), "d1")
    with pytest.raises(ValueError, match="invalid drop id"):
        notify_drop(str(tmp_path), "a/b")


def test_cli_notify_refuses_an_unknown_drop_in_one_line(tiny_lake, tmp_path):
    lake = copy_lake(tiny_lake.lake, str(tmp_path / "lake"))
    env = os.environ | {"PREFECT_HOME": prefect_home(tmp_path / "ph"),
                        "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "flows.cli", "notify", "nope", "--store",
                          lake.uri], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    err = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(err) == 1, err
    assert err[0].startswith("vggprice: error: no such drop 'nope'"), err


# --- on a real Prefect server, a cpu worker and moto -------------------------------------


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, s3_endpoint, tiny_lake):
    """A Prefect server with the pools and every deployment of prefect.yaml (the
    score-drop trigger included), one cpu worker, and a moto store holding the tiny
    lake's champion: (api url, store uri, model version, environment, log dir)."""
    import boto3
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.deploy.pools import apply_pools, deploy_all, worker_command
    from tests.servers import running_prefect_server, stop_process

    home = tmp_path_factory.mktemp("arrivals")
    bucket = f"vp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
    store_uri = f"s3://{bucket}/lake"
    copy_lake(tiny_lake.lake, store_uri)
    with running_prefect_server(home / "prefect") as api:
        env = os.environ | {"PREFECT_API_URL": api, "TF_CPP_MIN_LOG_LEVEL": "2",
                            "PREFECT_WORKER_QUERY_SECONDS": "1",
                            "PREFECT_HOME": prefect_home(home / "client")}  # fmt: skip
        with temporary_settings({PREFECT_API_URL: api}):
            apply_pools(["cpu", "gpu"])
            deploy_all(REPO, api_url=api)
            log = open(home / "worker.log", "w")  # noqa: SIM115 - the worker's lifetime
            worker = subprocess.Popen(worker_command("cpu"), env=env | {"VGGPRICE_WORKER_NAME": "cpu"},
                                      stdout=log, stderr=log)  # fmt: skip
            try:
                yield api, store_uri, tiny_lake.model_version, env, home
            finally:
                stop_process(worker)
                log.close()


def score_drop_runs(drop: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["score-drop"]))
        )
    return [r for r in runs if r.parameters.get("drop") == drop]


def wait_priced(lake: Lake, drop: str, mv: str, t0: float, seconds: float = 240) -> dict:
    """Until the drop's manifest exists: the seconds from t0 to its first part and to
    the manifest (measured, printed, never asserted on)."""
    run = lake.score_run(drop, mv)
    first = None
    deadline = time.time() + seconds
    while time.time() < deadline:
        if first is None and run.done_shards():
            first = time.time() - t0
        manifest = run.manifest()
        if manifest is not None:
            return {"first_part_s": round(first or time.time() - t0, 1),
                    "manifest_s": round(time.time() - t0, 1), "manifest": manifest}  # fmt: skip
        time.sleep(0.2)
    raise AssertionError(f"drop {drop} not priced within {seconds} s")


def wait_runs_final(drop: str, count: int, seconds: float = 240) -> list:
    deadline = time.time() + seconds
    while time.time() < deadline:
        runs = score_drop_runs(drop)
        if len(runs) >= count and all(r.state and r.state.is_final() for r in runs):
            return runs
        time.sleep(1)
    raise AssertionError(f"score-drop runs of {drop}: {score_drop_runs(drop)}")


def assert_priced_once(lake: Lake, drop: str, mv: str, n: int) -> None:
    run = lake.score_run(drop, mv)
    manifest = run.manifest()
    assert manifest["counts"] == {"listed": n, "priced": n, "rejected": 0}, manifest["counts"]
    assert sum(manifest["scorer_counts"].values()) == len(manifest["parts"]), manifest
    assert len(manifest["parts"]) == len(run.done_shards())
    priced = run.prices(["price"])
    assert len(priced) == n, "every image priced once, none twice"


@pytest.mark.deployed
def test_notify_starts_one_run_that_prices_the_drop_once(deployed):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, store_uri, mv, env, home = deployed
    lake = Lake(open_store(store_uri))
    n = 60
    for i in range(n):
        lake.store.put_bytes(f"drops/arrive/img-{i:03d}.png", _png(i))
    cmd = [sys.executable, "-m", "flows.cli", "notify", "arrive", "--store", store_uri, "--json"]
    t0 = time.time()
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    event = json.loads(first.stdout)
    assert event["event"] == DROP_READY and event["resource"]["drop"] == "arrive"
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    with temporary_settings({PREFECT_API_URL: api}):
        # The event's run, and (as an event past the trigger's window would) another run of
        # the same drop while the first prices it: the ledger makes it harmless.
        deadline = time.time() + 120
        while not score_drop_runs("arrive") and time.time() < deadline:
            time.sleep(0.5)
        (triggered,) = score_drop_runs("arrive")
        assert triggered.parameters == {"drop": "arrive", "store": store_uri, "line": None}
        manual = run_deployment("score-drop/score-drop", timeout=0,
                                parameters={"drop": "arrive", "store": store_uri})  # fmt: skip
        timing = wait_priced(lake, "arrive", mv, t0)
        runs = wait_runs_final("arrive", 2)
    (done,) = [r for r in runs if r.id == triggered.id]
    timing["run_created_s"] = round(done.created.timestamp() - t0, 1)
    timing["run_started_s"] = round(done.start_time.timestamp() - t0, 1)
    print(f"\nnotify -> run created {timing['run_created_s']} s, -> run started "
          f"{timing['run_started_s']} s, -> first priced shard {timing['first_part_s']} s, "
          f"-> manifest {timing['manifest_s']} s ({n} images, 1 cpu worker)")  # fmt: skip
    assert len(runs) == 2, "two notifies, one run; the manual run is the second"
    assert {r.id for r in runs} == {triggered.id, manual.id}
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    assert_priced_once(lake, "arrive", mv, n)


@pytest.mark.deployed
def test_bridge_turns_s3_notifications_into_one_priced_run(deployed, s3_endpoint):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, store_uri, mv, env, home = deployed
    url = notified_queue(s3_endpoint, store_uri)
    lake = Lake(open_store(store_uri))
    log = open(home / "bridge.log", "w")  # noqa: SIM115 - the bridge's lifetime
    bridge = subprocess.Popen([sys.executable, "-m", "flows.cli", "bridge", "--sqs", url,
                               "--store", store_uri, "--quiet-seconds", "3", "--json"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    try:
        n = 20
        for i in range(n):  # one S3 notification per object
            lake.store.put_bytes(f"drops/bridged/img-{i:02d}.png", _png(i))
        t0 = time.time()
        with temporary_settings({PREFECT_API_URL: api}):
            timing = wait_priced(lake, "bridged", mv, t0)
            (run,) = wait_runs_final("bridged", 1)
        assert run.state.is_completed(), run.state
        timing["run_created_s"] = round(run.created.timestamp() - t0, 1)
        timing["run_started_s"] = round(run.start_time.timestamp() - t0, 1)
        # A second batch of notifications for the priced drop (objects written again):
        # its event within the trigger's window starts no second run.
        for i in range(2):
            lake.store.put_bytes(f"drops/bridged/img-{i:02d}.png", _png(i))
        deadline = time.time() + 60
        while queue_counts(url) != (0, 0) and time.time() < deadline:
            time.sleep(0.5)
        assert queue_counts(url) == (0, 0), "every message deleted once its event was sent"
    finally:
        bridge.send_signal(signal.SIGTERM)
        out, _ = bridge.communicate(timeout=60)
        log.close()
    print(f"\nlast upload -> run created {timing['run_created_s']} s, -> run started "
          f"{timing['run_started_s']} s, -> first priced shard {timing['first_part_s']} s, "
          f"-> manifest {timing['manifest_s']} s ({n} images, quiet 3 s, 1 cpu worker)")  # fmt: skip
    assert bridge.returncode == 0, (home / "bridge.log").read_text()[-3000:]
    summary = json.loads(out)
    assert summary["drops"] == ["bridged"] and summary["events"] == 2, summary
    with temporary_settings({PREFECT_API_URL: api}):
        time.sleep(3)  # room for a (wrong) second run to appear
        assert len(score_drop_runs("bridged")) == 1
    assert_priced_once(lake, "bridged", mv, n)
