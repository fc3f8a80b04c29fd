"""A counting, fault-injecting HTTP proxy on 127.0.0.1 in front of a registry.

Every request from a client is forwarded to ``upstream`` (``host:port``)
and counted by kind; ``latency_s`` is added to each request (a simulated
round trip).  The Host header is passed through, so the registry builds its
upload locations with the proxy's address and the client stays behind it.

Faults (tests): ``proxy.fault`` is called with (method, path) for each
request and returns None (forward it) or one of ``"500"`` (answer HTTP 500),
``"reset"`` (close the connection without an answer), ``"stall"`` (answer
nothing for ``stall_s``, then close) and ``"corrupt"`` (forward it, flip one
byte of the answer's body).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def kind_of(method: str, path: str) -> str:
    """A coarse name for a registry request: ``GET blob``, ``GET manifest``, ``GET tags`` ..."""
    p = path.split("?", 1)[0]
    for part, name in (("/blobs/uploads", "upload"), ("/blobs/", "blob"), ("/manifests/", "manifest"),
                       ("/tags/list", "tags")):
        if part in p:
            return f"{method} {name}"
    return f"{method} other"


class CountingProxy:
    def __init__(self, upstream: str, latency_s: float = 0.0):
        self.upstream = upstream
        self.latency_s = latency_s
        self.fault: Callable[[str, str], str | None] | None = None
        self.stall_s = 30.0
        self.faults_injected = 0
        self.counts: Counter[str] = Counter()
        self.bytes = 0  # body bytes answered
        #: with a list here, every answered request is appended: (seconds since the proxy started, method, path,
        #: Range header, status, body bytes) -- a benchmark's request log
        self.log: list[tuple[float, str, str, str, int, int]] | None = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def _forward(self) -> None:
                with proxy._lock:
                    proxy.counts[kind_of(self.command, self.path)] += 1
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                fault = proxy.fault(self.command, self.path) if proxy.fault else None
                if fault:
                    with proxy._lock:
                        proxy.faults_injected += 1
                if fault == "500":
                    self.send_response(500, "injected")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault in ("reset", "stall"):
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    # an RST, not a FIN: the client sees a reset connection
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                c = http.client.HTTPConnection(proxy.upstream, timeout=120)
                headers: dict[str, str] = {}
                for k, v in self.headers.items():  # a repeated header (podman sends Accept several times) joined
                    if k.lower() not in HOP_BY_HOP:
                        headers[k] = f"{headers[k]}, {v}" if k in headers else v
                try:
                    c.request(self.command, self.path, body=body, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                finally:
                    c.close()
                if fault == "corrupt" and data:
                    data = data[:-1] + bytes([data[-1] ^ 0x40])
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # a HEAD answer has no body but the length of the GET's (containerd reads it)
                length = r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                with proxy._lock:
                    proxy.bytes += len(data) if self.command != "HEAD" else 0
                    if proxy.log is not None:
                        proxy.log.append((time.monotonic() - proxy._t0, self.command, self.path,
                                          self.headers.get("Range", ""), r.status, len(data)))

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # type: ignore[method-assign]  # injected resets are expected
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.bytes = 0

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
