"""A counting HTTP proxy on 127.0.0.1 in front of a registry (measurement).

Every request from a client is forwarded to ``upstream`` (``host:port``)
and counted by kind; ``latency_s`` is added to each request (a simulated
round trip).  The Host header is passed through, so the registry builds its
upload locations with the proxy's address and the client stays behind it.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
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
        self.counts: Counter[str] = Counter()
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
                c = http.client.HTTPConnection(proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    c.request(self.command, self.path, body=body, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                finally:
                    c.close()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
