"""A registry that lies: an HTTP server on 127.0.0.1 (free port, threaded)
in front of a real registry (tests/kms_fixtures.py ``Registry``).

Every request is forwarded to ``upstream`` unless ``liar.lie(method, path)``
returns a lie for it:

* ``Swap(path)``: answer with what the registry answers for another path
  (another image's manifest for a pinned digest, another blob's bytes);
* ``Body(data, content_type, status, headers)``: answer these bytes;
* ``Endless(content_type, limit, status, ...)``: answer a chunked body generated
  as it is sent (no Content-Length), until the client stops reading or
  ``limit`` bytes went out; with ``headers`` (a redirect's Location), in
  pieces of ``piece`` bytes ``pause`` seconds apart (a trickle), or
  compressed with ``encoding`` ("gzip", "gzip, gzip": ``sent`` then counts
  the decoded bytes, and ``limit`` bounds them).

``liar.served`` counts the requests each path got (retries show up there).
With ``liar.queue`` (a semaphore), requests are served that many at a time, each
held ``liar.hold`` seconds first (a registry that is overloaded: slow, but moving).
"""

from __future__ import annotations

import http.client
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Swap:
    path: str


@dataclass
class Body:
    data: bytes
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: dict[str, str] | None = None


@dataclass
class Endless:
    content_type: str = "application/vnd.oci.image.manifest.v1+json"
    limit: int = 1 << 40
    status: int = 200
    sent: int = 0  # bytes offered so far, decoded (read by the test)
    headers: dict[str, str] | None = None
    piece: int = 1 << 20  # bytes per chunk of the body
    pause: float = 0.0  # seconds between two chunks (a body trickled in)
    encoding: str | None = None  # a Content-Encoding the body is in (its pieces then are that encoding's)
    data: bytes | None = None  # what the body holds (then it ends there), instead of a JSON start and spaces


Lie = Swap | Body | Endless


class LiarRegistry:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.lie: Callable[[str, str], Lie | None] | None = None
        self.served: Counter[str] = Counter()
        self.queue: threading.Semaphore | None = None
        self.hold = 0.0
        self._lock = threading.Lock()
        liar = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def _upstream(self, path: str, body: bytes | None) -> tuple[http.client.HTTPResponse, bytes]:
                c = http.client.HTTPConnection(liar.upstream, timeout=60)
                headers: dict[str, str] = {}
                for k, v in self.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        headers[k] = f"{headers[k]}, {v}" if k in headers else v
                try:
                    c.request(self.command, path, body=body, headers=headers)
                    r = c.getresponse()
                    return r, r.read()
                finally:
                    c.close()

            def _endless(self, e: Endless) -> None:
                self.send_response(e.status)
                self.send_header("Content-Type", e.content_type)
                self.send_header("Transfer-Encoding", "chunked")
                if e.encoding:
                    self.send_header("Content-Encoding", e.encoding)
                for k, v in (e.headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                # the start of a JSON document that never ends (decoded, where the body is encoded)
                piece = b"[" + b" " * (e.piece - 1)
                rest = e.data
                coders = [zlib.compressobj(9, zlib.DEFLATED, 31) for _ in (e.encoding or "").split(",") if _.strip()]
                try:
                    while e.sent < e.limit:
                        n = min(len(piece), e.limit - e.sent)
                        out = piece[:n]
                        if rest is not None:
                            if not rest:
                                break
                            n = min(e.piece, len(rest), e.limit - e.sent)
                            out, rest = rest[:n], rest[n:]
                        for c in coders:  # the first encoding applied is the innermost
                            out = c.compress(out) + c.flush(zlib.Z_SYNC_FLUSH)
                        e.sent += n  # offered: a client that hangs up fails the write
                        if out:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(out), out))
                        piece = b" " * len(piece)
                        if e.pause:
                            time.sleep(e.pause)  # a trickle: the pace of the body is the lie
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the client stopped reading: what it should do
                    pass
                self.close_connection = True

            def _serve(self) -> None:
                if liar.queue is not None:
                    with liar.queue:
                        time.sleep(liar.hold)  # the service time of an overloaded registry (the lie's pace)
                        self._answer()
                else:
                    self._answer()

            def _answer(self) -> None:
                with liar._lock:
                    liar.served[f"{self.command} {self.path}"] += 1
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                lie = liar.lie(self.command, self.path) if liar.lie else None
                if isinstance(lie, Endless):
                    self._endless(lie)
                    return
                if isinstance(lie, Body):
                    self.send_response(lie.status)
                    self.send_header("Content-Type", lie.content_type)
                    if "Content-Length" not in (lie.headers or {}):  # (a lie may name another length)
                        self.send_header("Content-Length", str(len(lie.data)))
                    for k, v in (lie.headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(lie.data)
                    if "Content-Length" in (lie.headers or {}):
                        self.close_connection = True
                    return
                r, data = self._upstream(lie.path if isinstance(lie, Swap) else self.path, body)
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # type: ignore[method-assign]  # clients that hang up are expected
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def requests_for(self, method: str, path_part: str) -> int:
        with self._lock:
            return sum(n for k, n in self.served.items() if k.startswith(method + " ") and path_part in k)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
