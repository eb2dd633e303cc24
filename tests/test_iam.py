"""The IAM policies of infra/terraform against the calls the code really makes.

Every S3 request is recorded over HTTP by tests/faultproxy.py in front of moto (each
method of the store, a `vggprice` command in a subprocess, the bridge), and the bridge's
SQS calls by botocore's ``provide-client-params`` event on its real client. Each call must be
allowed by its role's policy document in the parsed Terraform (worker, bridge): action,
resource and the ``s3:prefix`` condition. moto enforces no IAM, so the policies are
evaluated here, for the few condition kinds these roles use (an unknown one fails).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

from tasks.store.storage import S3Store, StoreUnavailable
from tests.faultproxy import DENIED, FaultProxy
from tests.test_infra import terraform

REPO = Path(__file__).resolve().parents[1]
PREFIX = "vggprice"  # Terraform's store_prefix default: the stores here live under it
Call = tuple[str, str, str | None]  # IAM action, resource ARN, s3:prefix (None: absent)


def s3_call(method: str, target: str) -> Call:
    """The IAM action a path-style S3 request needs, its resource and its s3:prefix."""
    path, _, query = target.partition("?")
    q = parse_qs(query, keep_blank_values=True)
    bucket, _, key = unquote(path.lstrip("/")).partition("/")
    if not key:
        if method == "GET" and "list-type" in q:
            return "s3:ListBucket", f"arn:aws:s3:::{bucket}", q.get("prefix", [None])[0]
        if method == "HEAD":  # HeadBucket: ListBucket, with no prefix to condition on
            return "s3:ListBucket", f"arn:aws:s3:::{bucket}", None
        raise AssertionError(f"a bucket request this test cannot map: {method} {target}")
    arn = f"arn:aws:s3:::{bucket}/{key}"
    if method in ("GET", "HEAD"):
        return "s3:GetObject", arn, None
    if method == "PUT" or (method == "POST" and ("uploads" in q or "uploadId" in q)):
        return "s3:PutObject", arn, None  # multipart uploads included
    if method == "DELETE":
        return ("s3:AbortMultipartUpload" if "uploadId" in q else "s3:DeleteObject"), arn, None
    raise AssertionError(f"an object request this test cannot map: {method} {target}")


def recording(calls: list[Call]):
    """A FaultProxy match hook that records each request's call (rate 0: only faults
    queued with fail_next are given)."""

    def hook(method: str, target: str) -> bool:
        calls.append(s3_call(method, target))
        return True

    return hook


def policy(role: str, subs: dict[str, str]) -> list[dict]:
    """A role's policy statements from the parsed Terraform, its references filled in."""

    def fill(text: str) -> str:
        for ref, value in subs.items():
            text = text.replace("${" + ref + "}", value)
        assert "${" not in text, f"an unfilled reference in {role}'s policy: {text}"
        return text

    statements = terraform()["data"][f"aws_iam_policy_document.{role}"]["statement"]
    return [
        {"effect": st.get("effect", "Allow"), "actions": st["actions"],
         "resources": [fill(r) for r in st["resources"]],
         "conditions": [(c["test"], c["variable"], [fill(v) for v in c["values"]])
                        for c in st.get("condition", [])]}
        for st in statements
    ]  # fmt: skip


def allows(statements: list[dict], call: Call) -> bool:
    action, resource, prefix = call
    for st in statements:
        if st["effect"] != "Allow" or not any(fnmatchcase(action, a) for a in st["actions"]):
            continue
        if not any(fnmatchcase(resource, r) for r in st["resources"]):
            continue
        for test, variable, _ in st["conditions"]:
            assert (test, variable) == ("StringLike", "s3:prefix"), f"not evaluated: {test}"
        if all(prefix is not None and any(fnmatchcase(prefix, v) for v in values)
               for _, _, values in st["conditions"]):  # fmt: skip
            return True
    return False


def store_subs(bucket: str, queue_arn: str = "arn:aws:sqs:us-east-1:0:none") -> dict[str, str]:
    return {"var.bucket_name": bucket, "var.store_prefix": PREFIX,
            "aws_sqs_queue.drops[0].arn": queue_arn,
            "var.prefect_api_key_secret_arn": "arn:aws:secretsmanager:us-east-1:0:secret:k"}  # fmt: skip


@pytest.fixture
def bucket(s3_uri) -> str:
    return s3_uri[len("s3://") :].split("/")[0]


def test_worker_policy_allows_every_call_of_the_store(s3_endpoint, bucket, tmp_path):
    """Each method of the store (multipart uploads, conditional writes, misses, a shared
    link fetched) and a real command: every S3 request is allowed by the worker role."""
    calls: list[Call] = []
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    with FaultProxy(s3_endpoint, match=recording(calls)) as proxy:
        store = S3Store(bucket, PREFIX, endpoint_url=proxy.url, multipart_threshold=5 << 20)
        store.put_bytes("a/x.json", b"{}")
        exercised = {
            "check": lambda: store.check(existing=True),
            "put_bytes": lambda: store.put_bytes("a/b.bin", b"b"),
            "put_if_absent": lambda: store.put_if_absent("a/c.bin", b"c"),
            "get_versioned": lambda: store.get_versioned("a/x.json"),
            "put_if_match": lambda: store.put_if_match("a/x.json", b"[]", store.get_versioned("a/x.json")[1]),
            "get_bytes": lambda: store.get_bytes("a/b.bin"),
            "sha256": lambda: store.sha256("a/b.bin"),
            "put_file": lambda: store.put_file("a/big.bin", big),
            "get_file": lambda: store.get_file("a/big.bin", tmp_path / "back.bin"),
            "exists": lambda: (store.exists("a/b.bin"), store.exists("a/missing")),
            "list": lambda: list(store.list("a/")),
            "keys": lambda: store.keys(),
            "delete": lambda: store.delete("a/c.bin"),
            "delete_prefix": lambda: store.delete_prefix("a/"),
            "put_json": lambda: store.put_json("j/x.json", {"a": 1}),
            "get_json": lambda: store.get_json("j/x.json"),
            "uri_for": lambda: store.uri_for("j/x.json"),
            "key_in_store": lambda: store.key_in_store(bucket, f"{PREFIX}/j/x.json"),
            "link_for": lambda: urllib.request.urlopen(store.link_for("j/x.json")).read(),
            "list_folders": lambda: list(store.list_folders("a/")),
            "temp_files": lambda: list(store.temp_files()),  # S3 writes leave none
            "remove_temp": lambda: pytest.raises(NotImplementedError, store.remove_temp, "x"),
        }  # fmt: skip
        public = {
            n for n in dir(S3Store) if not n.startswith("_") and callable(getattr(S3Store, n))
        }
        assert set(exercised) == public, "a store method this test does not exercise yet"
        for call in exercised.values():
            call()
        assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
        before = len(calls)
        env = os.environ | {"VGGPRICE_S3_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL": proxy.url,
                            "PREFECT_HOME": str(tmp_path / "ph")}  # fmt: skip
        cli = subprocess.run([sys.executable, "-m", "flows.cli", "champion", "--store",
                              f"s3://{bucket}/{PREFIX}"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert "access denied" not in cli.stderr, cli.stderr
        print(f"\n`vggprice champion`: {len(calls) - before} S3 requests, {cli.stderr.strip()}")
        assert len(calls) - before >= 2, "the command checked the store and read it"
    made = set(calls)
    assert {c[0] for c in made} >= {"s3:ListBucket", "s3:GetObject", "s3:PutObject",
                                    "s3:DeleteObject"}, made  # fmt: skip
    worker = policy("worker", store_subs(bucket))
    refused = sorted(c for c in made if not allows(worker, c))
    assert not refused, f"the worker role does not allow: {refused}"


def test_bridge_policy_allows_every_call_of_the_bridge(s3_endpoint, bucket, monkeypatch):
    """The bridge's store check, and its SQS calls (receive, hold, delete) on a real
    client: each allowed by the bridge role, on its own queue."""
    from tasks.scoring.arrivals import open_bridge
    from tests.test_arrivals import Clock, _png, notified_queue

    store_uri = f"s3://{bucket}/{PREFIX}"
    url = notified_queue(s3_endpoint, store_uri)
    s3_calls: list[Call] = []
    sqs_calls: set[Call] = set()
    with FaultProxy(s3_endpoint, match=recording(s3_calls)) as proxy:
        monkeypatch.setenv("VGGPRICE_S3_ENDPOINT_URL", proxy.url)
        clock, sent = Clock(), []
        bridge = open_bridge(url, store_uri, quiet_seconds=30, emit=sent.append, clock=clock)
        bridge.lake.store.check()  # what `vggprice bridge` does first

        def record(model, params, **_):
            account, name = params["QueueUrl"].rstrip("/").split("/")[-2:]
            action = "sqs:" + model.name.removesuffix("Batch")  # a batch needs the action
            sqs_calls.add((action, f"arn:aws:sqs:us-east-1:{account}:{name}", None))

        bridge.queue.client.meta.events.register("provide-client-params.sqs", record)
        monkeypatch.delenv("VGGPRICE_S3_ENDPOINT_URL")
        from tasks.store.storage import open_store

        open_store(store_uri).put_bytes("drops/d1/a.png", _png())
        while bridge.receive(1):
            pass
        clock.now += bridge.visibility / 2
        bridge.keep_held()
        clock.now += 31
        assert bridge.flush() == ["d1"] and sent == ["d1"]
    (queue_arn,) = {c[1] for c in sqs_calls}
    assert {c[0] for c in sqs_calls} == {"sqs:ReceiveMessage", "sqs:ChangeMessageVisibility",
                                         "sqs:DeleteMessage"}, sqs_calls  # fmt: skip
    role = policy("bridge", store_subs(bucket, queue_arn))
    refused = sorted(c for c in set(s3_calls) | sqs_calls if not allows(role, c))
    assert s3_calls and not refused, f"the bridge role does not allow: {refused}"


def test_check_works_under_a_prefix_only_policy(s3_endpoint, bucket):
    """check() makes one call that a ListBucket limited to the prefix allows (HeadBucket
    needs ListBucket on the whole bucket); an empty store and a full one pass; a refusal
    is one line naming the prefix, a missing bucket one line, no secret in either."""
    calls: list[Call] = []
    with FaultProxy(s3_endpoint, match=recording(calls)) as proxy:
        store = S3Store(bucket, PREFIX, endpoint_url=proxy.url)
        store.check()
        store.put_bytes("x/y.bin", b"y")
        store.check()
        assert calls[0] == calls[-1] == ("s3:ListBucket", f"arn:aws:s3:::{bucket}", f"{PREFIX}/")
        only_prefix = [{"effect": "Allow", "actions": ["s3:ListBucket"],
                        "resources": [f"arn:aws:s3:::{bucket}"],
                        "conditions": [("StringLike", "s3:prefix", [f"{PREFIX}/*"])]}]  # fmt: skip
        assert allows(only_prefix, calls[0])
        assert not allows(only_prefix, s3_call("HEAD", f"/{bucket}")), "HeadBucket is refused"
        proxy.fail_next(DENIED)
        with pytest.raises(StoreUnavailable) as denied:
            store.check()
        with pytest.raises(StoreUnavailable) as missing:
            S3Store("no-such-bucket-here", PREFIX, endpoint_url=proxy.url).check()
    for err, expected in ((denied, f"lack access to the prefix '{PREFIX}/'"),
                          (missing, "bucket 'no-such-bucket-here' does not exist")):  # fmt: skip
        line = str(err.value)
        assert "\n" not in line and expected in line, line
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in line
