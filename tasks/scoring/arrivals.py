"""Drops priced on arrival: the ``vggprice.drop.ready`` event, and the S3 bridge.

``notify_drop`` tells the Prefect server that a drop is complete: one event, whose
resource names the drop and its store. The ``score-drop`` deployment's trigger
(``prefect.yaml``) starts one scoring run per event and drop.

The bridge (``Bridge``) turns S3 ``ObjectCreated`` notifications on an SQS queue into
those events: it groups the notifications by drop, waits until a drop has been quiet
for ``quiet_seconds`` (or its ready marker, ``drops/<drop>/.ready``, arrives), emits one
event for the drop, and only then deletes the drop's messages. Delivery is at least
once: a bridge that stops or crashes before the event leaves the messages on the
queue, and they come back (SQS's visibility timeout) to whichever bridge polls next. A
duplicate event is harmless: the trigger starts no second run for a drop within its
window, and past it the ledger prices every image exactly once (a second run for a
priced drop finds its manifest and stops; one that overlaps the first joins it).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote_plus

from tasks.runtime import get_logger
from tasks.store.lake import Lake, drop_name_problem
from tasks.store.storage import S3Store, open_store, validate_key

DROP_READY = "vggprice.drop.ready"
RESOURCE_PREFIX = "vggprice.drop."


def drop_resource(store_uri: str, drop: str) -> dict[str, str]:
    """The event's resource: an id per drop and store (the trigger's ``for_each``), the
    drop and the store URI (never credentials: a store URI holds none) as labels."""
    store = open_store(store_uri).uri  # normalised: one store, one id
    digest = hashlib.sha256(store.encode()).hexdigest()[:12]
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{drop}@{digest}",
        "prefect.resource.name": drop,
        "drop": drop,
        "store": store,
    }


def check_drop_id(drop: str) -> str:
    """A drop id: one folder name under the store's drops/ that can be a drop
    (``drop_name_problem``; ValueError otherwise)."""
    drop_id = drop.strip("/")
    if problem := drop_name_problem(drop_id):
        raise ValueError(f"invalid drop id {drop!r}: {problem} — use the drop's folder name "
                         "under drops/")  # fmt: skip
    return drop_id


def drop_event(store_uri: str, drop: str, line: str | None = None, why: str = "notify") -> dict:
    """The ``vggprice.drop.ready`` event as the Prefect API takes it."""
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": DROP_READY,
        "resource": drop_resource(store_uri, check_drop_id(drop)),
        "payload": {"line": line, "source": why},
    }


def send_events(events: list[dict]) -> None:
    """POST the events to the Prefect API (PREFECT_API_URL); returns once the server has
    accepted them, raises when it has not (so a caller never drops what it holds)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError("PREFECT_API_URL is not set: the event goes to the Prefect server "
                         "whose score-drop trigger prices the drop (e.g. "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api)")  # fmt: skip
    with get_client(sync_client=True) as client:
        response = client._client.post("/events", json=events)
        response.raise_for_status()


def notify_drop(store_uri: str, drop: str, line: str | None = None) -> dict:
    """Tell the Prefect server that a drop is complete and should be priced now (by the
    champion of ``line``, or of the store's only line): the Python call for upload
    scripts, and what ``vggprice notify`` runs. Returns the event sent."""
    event = drop_event(store_uri, drop, line)
    send_events([event])
    return event


# --- S3 notifications on SQS -----------------------------------------------------------


MAX_BODY = 64 * 1024  # an S3 notification names one object: a few kB


class BadMessage(ValueError):
    """A queue message the bridge cannot use: deleted with one log line saying why."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(obj: object, name: str, kind: type, what: str) -> object:
    value = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise BadMessage(f"{what}.{name} is {_shown(value)}, not a {kind.__name__}")
    return value


def s3_objects(body: str) -> Iterator[tuple[str, str]]:
    """(bucket, key) of each ObjectCreated record in an S3 notification message (S3's
    event JSON, also inside an SNS envelope), keys URL-decoded. Test events and other
    records give nothing; BadMessage for a body that is not such JSON (not JSON, too
    large or deep, a field of the wrong type)."""
    if not isinstance(body, str) or len(body) > MAX_BODY:
        raise BadMessage(f"body of {len(body or '')} characters (at most {MAX_BODY})")
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        raise BadMessage("body is not JSON (or nested too deep)") from None
    if isinstance(message, dict) and message.get("Type") == "Notification":  # via SNS
        yield from s3_objects(_field(message, "Message", str, "SNS"))
        return
    if not isinstance(message, dict):
        raise BadMessage(f"body is a JSON {type(message).__name__}, not an object")
    if "Records" not in message:  # S3's test event, or another service's message
        return
    for record in _field(message, "Records", list, "body"):
        event = _field(record, "eventName", str, "record")
        if not event.startswith("ObjectCreated:"):
            continue
        s3 = _field(record, "s3", dict, "record")
        bucket = _field(_field(s3, "bucket", dict, "s3"), "name", str, "bucket")
        key = _field(_field(s3, "object", dict, "s3"), "key", str, "object")
        yield bucket, unquote_plus(key)


def drops_in_message(lake: Lake, body: str) -> dict[str, bool]:
    """The drops of this store that a notification message names: drop -> whether the
    message holds the drop's ready marker. BadMessage for a message that cannot be used:
    malformed, about another bucket, or a key no drop can have (``drops/../x``)."""
    store = lake.store
    found: dict[str, bool] = {}
    not_drops: list[str] = []
    for bucket, key in s3_objects(body):
        if bucket != store.bucket:
            raise BadMessage(f"names an object of bucket {_shown(bucket)}, not {store.bucket}")
        relative = store.key_in_store(bucket, key)
        hit = lake.drop_of_key(relative) if relative else None
        if not hit:
            continue
        if problem := drop_name_problem(hit[0]):  # no event (its run would fail)
            not_drops.append(f"folder {_shown(hit[0])} is not a drop: {problem}")
            continue
        try:
            validate_key(relative)
        except ValueError:
            raise BadMessage(f"key {_shown(key)} is no key of the store") from None
        found[hit[0]] = found.get(hit[0], False) or hit[1]
    if not_drops and not found:
        raise BadMessage(not_drops[0])
    for line in not_drops:  # beside drops of the same message: those still get events
        get_logger().info("%s: no event", line)
    return found


class SqsQueue:
    """The few SQS calls the bridge makes (boto3, credentials from the standard AWS
    chain). The endpoint is the queue URL's own (https://sqs.<region>.amazonaws.com, or
    an SQS-compatible server's), never the store's S3 endpoint."""

    def __init__(self, url: str, region: str):
        import boto3

        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https") or "/" not in rest:
            raise ValueError(f"--sqs must be a queue URL (https://sqs.<region>.amazonaws.com/"
                             f"<account>/<queue>), got {url!r}")  # fmt: skip
        self.url = url
        endpoint = f"{scheme}://{rest.split('/', 1)[0]}"
        self.client = boto3.session.Session().client(
            "sqs", region_name=region, endpoint_url=endpoint
        )

    def receive(self, wait_seconds: int, visibility: int) -> list[dict]:
        out = self.client.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=visibility,
        )
        return out.get("Messages", [])

    def delete(self, receipts: list[str]) -> None:
        for i in range(0, len(receipts), 10):
            batch = [{"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(receipts[i : i + 10])]
            failed = self.client.delete_message_batch(QueueUrl=self.url, Entries=batch).get(
                "Failed", []
            )
            if failed:  # the message comes back and its drop is notified again: harmless
                get_logger().warning("SQS kept %d messages: %s", len(failed), failed[0])

    def hold(self, receipts: list[str], visibility: int) -> list[tuple[str, str]]:
        """Keep messages invisible for ``visibility`` more seconds (0: hand them back).
        Returns (receipt, why) of each message SQS did not hold (a receipt no longer valid,
        or past SQS's 12 hours of invisibility)."""
        failed = []
        for i in range(0, len(receipts), 10):
            part = receipts[i : i + 10]
            batch = [{"Id": str(n), "ReceiptHandle": r, "VisibilityTimeout": visibility}
                     for n, r in enumerate(part)]  # fmt: skip
            out = self.client.change_message_visibility_batch(QueueUrl=self.url, Entries=batch)
            failed += [(part[int(f["Id"])], f"{f.get('Code')}: {f.get('Message', '')}")
                       for f in out.get("Failed", [])]  # fmt: skip
        return failed


def queue_region(url: str, default: str) -> str:
    """The region in an AWS queue URL (https://sqs.<region>.amazonaws.com/...)."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs" and parts[-1] == "com":
        return parts[1]
    return default


@dataclass
class _Held:
    """The messages of one drop that wait for its event."""

    last_seen: float
    ready: bool = False
    messages: set[str] = field(default_factory=set)
    retry_at: float = 0.0


@dataclass
class _Message:
    receipt: str
    held_since: float
    drops: set[str]


class Bridge:
    """S3 notifications on an SQS queue -> one ``vggprice.drop.ready`` event per drop.

    ``step`` receives once, emits the events of the drops that are due and deletes their
    messages; ``run`` steps until ``stop`` is set, then hands the messages still held
    back to the queue. ``emit(drop)`` sends the event (``notify_drop`` for the store by
    default) and raises when it could not."""

    def __init__(
        self,
        queue: SqsQueue,
        lake: Lake,
        quiet_seconds: float = 30.0,
        line: str | None = None,
        emit: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: int = 10,
    ):
        if not isinstance(lake.store, S3Store):
            raise ValueError(f"the bridge reads S3 notifications: --store must be an s3:// "
                             f"store, not {lake.store.uri}")  # fmt: skip
        self.queue, self.lake, self.quiet, self.clock = queue, lake, quiet_seconds, clock
        self.emit = emit or (lambda drop: notify_drop(lake.uri, drop, line))
        self.poll = poll_seconds
        # How long a received message stays invisible to other consumers; renewed while
        # its drop is not quiet yet.
        self.visibility = int(min(43200, max(60, 2 * quiet_seconds + 30)))
        self.held: dict[str, _Held] = {}
        self.messages: dict[str, _Message] = {}
        self.emitted: list[str] = []

    def receive(self, wait_seconds: int) -> int:
        """One receive; the messages' drops marked seen now. Messages that name no drop of
        this store (test events, other prefixes) are deleted at once, and so are those
        that cannot be used (malformed, another bucket, an impossible drop), with one log
        line each; every message is handled on its own."""
        got = self.queue.receive(wait_seconds, self.visibility)
        now, unrelated = self.clock(), []
        for m in got:
            try:
                drops = drops_in_message(self.lake, m.get("Body", ""))
            except Exception as err:  # BadMessage, or anything else this body provokes
                get_logger().warning("bridge: message %s deleted: %s", m.get("MessageId"),
                                     str(err).splitlines()[0] if str(err) else type(err).__name__)  # fmt: skip
                unrelated.append(m["ReceiptHandle"])
                continue
            known = self.messages.get(m["MessageId"])
            if known:  # delivered again (SQS is at least once): its newest receipt counts
                known.receipt, known.held_since = m["ReceiptHandle"], now
            elif drops:
                self.messages[m["MessageId"]] = _Message(m["ReceiptHandle"], now, set(drops))
            else:
                unrelated.append(m["ReceiptHandle"])
                continue
            for drop, ready in drops.items():
                held = self.held.setdefault(drop, _Held(last_seen=now))
                held.last_seen = now
                held.ready = held.ready or ready
                held.messages.add(m["MessageId"])
        if unrelated:
            self.queue.delete(unrelated)
        return len(got)

    def due(self) -> list[str]:
        now = self.clock()
        return sorted(
            d
            for d, h in self.held.items()
            if now >= h.retry_at and (h.ready or now - h.last_seen >= self.quiet)
        )

    def flush(self) -> list[str]:
        """Emit each due drop's event, then delete the messages no other drop waits on."""
        done = []
        for drop in self.due():
            held = self.held[drop]
            try:
                self.emit(drop)
            except Exception as err:  # kept: tried again, the messages stay held
                held.retry_at = self.clock() + min(60.0, max(5.0, self.quiet))
                get_logger().warning("drop %s: event not sent (%s); trying again", drop,
                                     str(err).splitlines()[0] if str(err) else type(err).__name__)  # fmt: skip
                continue
            del self.held[drop]
            receipts = []
            for mid in held.messages:
                message = self.messages[mid]
                message.drops.discard(drop)
                if not message.drops:
                    receipts.append(self.messages.pop(mid).receipt)
            self.queue.delete(receipts)
            get_logger().info("drop %s: %s sent (%d notifications)", drop, DROP_READY,
                              len(held.messages))  # fmt: skip
            self.emitted.append(drop)
            done.append(drop)
        return done

    def keep_held(self) -> None:
        """Renew the invisibility of messages held for half their timeout. A message SQS
        will not hold further is let go: it comes back when its timeout ends (counted
        towards the dead-letter queue), and its drop's event is still sent."""
        now = self.clock()
        old = [m for m in self.messages.values() if now - m.held_since >= self.visibility / 2]
        if not old:
            return
        failed = dict(self.queue.hold([m.receipt for m in old], self.visibility))
        for mid, m in list(self.messages.items()):
            if m.receipt in failed:
                get_logger().warning("bridge: message %s not held (%s); it returns to the "
                                     "queue", mid, failed[m.receipt])  # fmt: skip
                del self.messages[mid]
                for drop in m.drops:
                    self.held[drop].messages.discard(mid)
            elif now - m.held_since >= self.visibility / 2:
                m.held_since = now

    def wait_for_next(self) -> int:
        """Seconds to long-poll: up to ``poll_seconds``, less when a drop falls due."""
        if not self.held:
            return self.poll
        now = self.clock()
        soonest = min(max(h.retry_at, h.last_seen + self.quiet) for h in self.held.values())
        return int(max(0, min(self.poll, soonest - now)))

    def step(self) -> list[str]:
        self.receive(self.wait_for_next())
        self.keep_held()
        return self.flush()

    def run(self, stop: threading.Event) -> dict:
        """Step until ``stop`` is set (SIGTERM, SIGINT); the messages of drops not yet due
        go back to the queue for the next bridge."""
        log = get_logger()
        log.info("bridge: %s -> %s events for %s (quiet %gs)", self.queue.url, DROP_READY,
                 self.lake.uri, self.quiet)  # fmt: skip
        while not stop.is_set():
            try:
                self.step()
            except Exception as err:  # SQS unreachable for a moment: the next poll retries
                log.warning("bridge: %s", str(err).splitlines()[0] if str(err) else err)
                stop.wait(5)
        if self.messages:
            for _, why in self.queue.hold([m.receipt for m in self.messages.values()], 0):
                log.warning("bridge: a message not handed back (%s)", why)
        return {"events": len(self.emitted), "drops": sorted(set(self.emitted)),
                "handed_back": len(self.messages)}  # fmt: skip


def open_bridge(queue_url: str, store_uri: str | None = None, **kw) -> Bridge:
    """A bridge from an SQS queue to the events of a store's drops (the settings' store
    when not named)."""
    from tasks.settings import load_settings

    settings = load_settings(store=store_uri)
    lake = Lake(open_store(settings.store))
    return Bridge(SqsQueue(queue_url, queue_region(queue_url, settings.s3_region)), lake, **kw)
