"""The fault-injecting proxy, through boto3 and moto's S3 server over real HTTP."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError
from botocore.retries import standard

from tests.faultproxy import FaultProxy

# Config's "max_attempts" counts retries (total = n + 1); "total_max_attempts" counts attempts.
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})
RETRIES = Config(retries={"total_max_attempts": 5, "mode": "standard"})


def client(endpoint: str, config: Config | None = None):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"fp-{uuid.uuid4().hex[:12]}"
    client(s3_endpoint).create_bucket(Bucket=name)
    return name


def exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        assert e.response["Error"]["Code"] == "404"
        return False
    return True


def is_put(method: str, path: str) -> bool:
    return method == "PUT"


def test_rate_zero_passes_everything(s3_endpoint):
    with FaultProxy(s3_endpoint, rate=0, seed=1) as proxy:
        s3 = client(proxy.url, NO_RETRIES)
        name = f"fp-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=name)
        for i in range(3):
            s3.put_object(Bucket=name, Key=f"k/{i}", Body=f"body {i}".encode())
        assert s3.get_object(Bucket=name, Key="k/1")["Body"].read() == b"body 1"
        assert s3.head_object(Bucket=name, Key="k/2")["ContentLength"] == 6  # not the empty body's
        listed = s3.list_objects_v2(Bucket=name, Prefix="k/")
        assert [o["Key"] for o in listed["Contents"]] == ["k/0", "k/1", "k/2"]
        assert not exists(s3, name, "k/absent")  # errors pass through too
        stats = proxy.snapshot()
    assert stats == {"requests": 8, "forwarded": 8, "503": 0, "500": 0, "reset": 0, "lost": 0}


def test_lost_applies_the_write(s3_endpoint, bucket):
    direct = client(s3_endpoint)
    direct.put_object(Bucket=bucket, Key="registry/champion.json", Body=b"old")
    with FaultProxy(s3_endpoint) as proxy:
        proxy.fail_next("lost", match=lambda m, p: m == "PUT" and "champion.json" in p)
        s3 = client(proxy.url, NO_RETRIES)
        s3.put_object(Bucket=bucket, Key="registry/other.json", Body=b"x")  # not matched
        with pytest.raises(ConnectionClosedError):
            s3.put_object(Bucket=bucket, Key="registry/champion.json", Body=b"new")
        s3.put_object(Bucket=bucket, Key="registry/champion.json", Body=b"newer")  # queue used up
        assert proxy.snapshot()["lost"] == 1
    # The client saw a failure, yet the write happened (and so did the next one).
    assert direct.get_object(Bucket=bucket, Key="registry/champion.json")["Body"].read() == b"newer"


def test_lost_response_to_a_conditional_create_makes_its_retry_fail(s3_endpoint, bucket):
    with FaultProxy(s3_endpoint) as proxy:
        proxy.fail_next("lost", match=is_put)
        with pytest.raises(ClientError) as err:
            client(proxy.url, RETRIES).put_object(
                Bucket=bucket, Key="registry/champion.json", Body=b"v1", IfNoneMatch="*"
            )
    # The first attempt created it; the retry then found it there.
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    body = client(s3_endpoint).get_object(Bucket=bucket, Key="registry/champion.json")["Body"]
    assert body.read() == b"v1"


@pytest.mark.parametrize(
    ("fault", "error", "code"),
    [
        ("503", ClientError, "SlowDown"),
        ("500", ClientError, "InternalError"),
        ("reset", ConnectionClosedError, None),
    ],
)
def test_failed_requests_are_not_applied(s3_endpoint, bucket, fault, error, code):
    with FaultProxy(s3_endpoint) as proxy:
        proxy.fail_next(fault, match=is_put)
        s3 = client(proxy.url, NO_RETRIES)
        assert not exists(s3, bucket, "k")  # a HEAD: not matched, passes
        with pytest.raises(error) as err:
            s3.put_object(Bucket=bucket, Key="k", Body=b"v")
        assert proxy.snapshot() == {
            **dict.fromkeys(("503", "500", "reset", "lost"), 0),
            "requests": 2,
            "forwarded": 1,
            fault: 1,
        }
    if code:
        assert err.value.response["Error"]["Code"] == code
    assert not exists(client(s3_endpoint), bucket, "k")


def test_only_methods_and_match_limit_faults(s3_endpoint, bucket):
    direct = client(s3_endpoint)
    direct.put_object(Bucket=bucket, Key="data/a", Body=b"a")
    with FaultProxy(
        s3_endpoint, rate=1.0, faults=("500",), only_methods=("PUT",), match=lambda m, p: "/x/" in p
    ) as proxy:
        s3 = client(proxy.url, NO_RETRIES)
        assert s3.get_object(Bucket=bucket, Key="data/a")["Body"].read() == b"a"  # GET: untouched
        s3.put_object(Bucket=bucket, Key="data/b", Body=b"b")  # path not matched
        with pytest.raises(ClientError):
            s3.put_object(Bucket=bucket, Key="x/c", Body=b"c")
        assert proxy.snapshot()["500"] == 1


def put_many(s3_endpoint: str, bucket: str, seed: int, n: int = 40) -> dict[str, int]:
    with FaultProxy(s3_endpoint, rate=0.3, seed=seed, only_methods=("PUT",)) as proxy:
        s3 = client(proxy.url, RETRIES)
        for i in range(n):
            s3.put_object(Bucket=bucket, Key=f"many/{seed}/{i}", Body=f"v{i}".encode())
        return proxy.snapshot()


# With seed 1 the 40 puts draw 503 x2, 500 x2, reset x4, lost x5: 13 faults, 53 requests.
def test_standard_retries_get_every_put_through(s3_endpoint, bucket, monkeypatch):
    # botocore backs off up to seconds after SlowDown; the backoff is not what is tested here.
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    stats = put_many(s3_endpoint, bucket, seed=1)
    direct = client(s3_endpoint)
    for i in range(40):
        assert (
            direct.get_object(Bucket=bucket, Key=f"many/1/{i}")["Body"].read() == f"v{i}".encode()
        )
    faults = {k: stats[k] for k in ("503", "500", "reset", "lost")}
    assert all(faults.values()), faults  # this seed draws every kind
    # Every fault cost one retry; only "lost" ones reached moto as well as their retry.
    assert stats["requests"] == 40 + sum(faults.values())
    assert stats["forwarded"] == 40 + faults["lost"]
    assert put_many(s3_endpoint, bucket, seed=1) == stats  # seeded: the same faults again
