"""A fault-injecting HTTP proxy in front of an S3 endpoint, for tests (standard library only)."""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "500", "reset", "lost")
DENIED = "403"  # only by fail_next: answer 403 AccessDenied, as an IAM policy refuses
# Per-connection headers (RFC 9110 7.6.1) are not forwarded, and neither are the ones this proxy
# sets itself; "expect": the 100 Continue exchange already happened with our client.
HOP = {
    *("connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization"),
    *("te", "trailer", "transfer-encoding", "upgrade", "expect", "host", "content-length"),
}
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{}</Code><Message>{}</Message>'
    "<RequestId>faultproxy</RequestId></Error>"
)
Match = Callable[[str, str], bool]


class FaultProxy:
    """Forwards HTTP requests to `upstream`, failing some of them the way S3 and networks fail.

    Faults, for requests that are eligible (method in `only_methods` if given, and
    `match(method, path)` true if given; `path` is the raw target, path plus query):

      "503"    answer 503 SlowDown; the request is NOT forwarded
      "500"    answer 500 InternalError; the request is NOT forwarded
      "reset"  close the connection without an answer (RST); NOT forwarded
      "lost"   forward it (the upstream APPLIES it), then close the connection without
               an answer: a client retry repeats a write that already happened
      "403"    (DENIED; only queued with `fail_next`) answer 403 AccessDenied, as an IAM
               policy refuses; NOT forwarded

    Each eligible request gets a fault with probability `rate`, drawn uniformly from
    `faults` by a `random.Random(seed)`; faults queued with `fail_next` come first.
    Use as a context manager; `url` is where clients connect, `snapshot()` the counts.
    """

    def __init__(
        self,
        upstream: str,
        rate: float = 0.0,
        faults: Iterable[str] = FAULTS,
        seed: int = 0,
        only_methods: Iterable[str] | None = None,
        match: Match | None = None,
    ) -> None:
        self.faults = tuple(faults)
        if unknown := set(self.faults) - set(FAULTS):
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        self.upstream = urlsplit(upstream)
        self.rate = rate
        self.only_methods = None if only_methods is None else {m.upper() for m in only_methods}
        self.match = match
        self.stats = {"requests": 0, "forwarded": 0, **dict.fromkeys(FAULTS, 0)}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._queue: list[list] = []  # [fault, match, remaining], oldest first
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> FaultProxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: shutdown() waits for the loop to notice, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def fail_next(self, fault: str, match: Match | None = None, count: int = 1) -> None:
        """Give `fault` to the next `count` eligible requests for which `match` is true."""
        if fault not in (*FAULTS, DENIED):
            raise ValueError(f"unknown fault: {fault!r}")
        with self._lock:
            self._queue.append([fault, match, count])

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def _choose(self, method: str, path: str) -> str | None:
        """Count the request and pick its fault (None: pass it through)."""
        with self._lock:
            self.stats["requests"] += 1
            if self.only_methods is not None and method not in self.only_methods:
                return None
            if self.match is not None and not self.match(method, path):
                return None
            fault = None
            for entry in self._queue:
                if entry[1] is None or entry[1](method, path):
                    fault, entry[2] = entry[0], entry[2] - 1
                    if entry[2] <= 0:
                        self._queue.remove(entry)
                    break
            if fault is None and self._rng.random() < self.rate and self.faults:
                fault = self._rng.choice(self.faults)
            if fault is not None:
                self.stats[fault] = self.stats.get(fault, 0) + 1
            return fault

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: keep-alive to the client, and http.server answers `Expect: 100-continue`
    # with 100 Continue before we read the body (botocore sends it on every upload).
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections end eventually

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(out)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop_connection(self) -> None:
        # Linger 0 makes close() send RST, as a crashed peer or middlebox would; the fd
        # closes for real once the handler's file objects are closed in finish().
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)  # the upstream's Date and Server headers pass through
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = ERROR_BODY.format(code, message).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        self._answer(status, headers, body)

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()  # read first, so a fault never leaves a half-read request behind
        fault = proxy._choose(self.command, self.path)
        if fault == "503":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "500":
            return self._error(500, "InternalError", "We encountered an internal error.")
        if fault == DENIED:
            return self._error(403, "AccessDenied", "Access Denied")
        if fault == "reset":
            return self._drop_connection()
        up = proxy.upstream
        named = {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | named}
        headers["Host"] = up.netloc  # moto routes on Host; it does not verify SigV4
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        # A fresh upstream connection per request: simple, and no stale keep-alive state.
        conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            return self._error(502, "BadGateway", f"upstream: {e}")
        finally:
            conn.close()
        proxy._count("forwarded")
        if fault == "lost":
            return self._drop_connection()
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        out.append(("Content-Length", length or str(len(data))))  # HEAD: the object's size
        self._answer(resp.status, out, data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
