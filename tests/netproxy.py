"""A counting, fault-injecting HTTP proxy on 127.0.0.1 in front of a registry.

Every request from a client is forwarded to ``upstream`` (``host:port``)
and counted by kind; ``latency_s`` is added to each request (a simulated
round trip).  The Host header is passed through, so the registry builds its
upload locations with the proxy's address and the client stays behind it.

Faults (tests): ``proxy.fault`` is called with (method, path) for each
request and returns None (forward it) or one of ``"500"`` (answer HTTP 500),
``"reset"`` (close the connection without an answer), ``"stall"`` (answer
nothing for ``stall_s``, then close), ``"corrupt"`` (forward it, flip one
byte of the answer's body) and ``"swap"`` (forward it, answer ``swap_body``
instead of its body: another object's bytes).
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
                       ("/tags/list", "tags"), ("/packs/", "pack")):  # an S3 store's pack objects
        if part in p:
            return f"{method} {name}"
    return f"{method} other"


class CountingProxy:
    def __init__(self, upstream: str, latency_s: float = 0.0):
        self.upstream = upstream
        self.latency_s = latency_s
        self.fault: Callable[[str, str], str | None] | None = None
        self.stall_s = 30.0
        self.swap_body = b""
        self.faults_injected = 0
        self.counts: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # bytes of answer bodies by kind
        self.ranges: Counter[tuple[str, str]] = Counter()  # (path, Range header) of every GET blob
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
                    if kind_of(self.command, self.path) in ("GET blob", "GET pack"):
                        proxy.ranges[(self.path, self.headers.get("Range", ""))] += 1
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
                if fault == "swap":
                    data = proxy.swap_body
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
                        proxy.sent[kind_of(self.command, self.path)] += len(data)
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
            self.sent.clear()
            self.ranges.clear()
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


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds every piece a client sends for ``latency_s``
    before passing it on (one added round trip per request), on one asyncio loop in its own
    thread: what a fleet benchmark needs, where hundreds of connections at once would starve a
    thread per connection (:class:`CountingProxy`) on the GIL.  It counts the bytes sent back
    (``sent``, by request kind is not known at this level: all of it) and, from the request lines
    it sees, requests by kind (``counts``) and (path, Range) of blob GETs (``ranges``)."""

    _REQ = None

    def __init__(self, upstream: str, latency_s: float = 0.0):
        import asyncio
        import re

        DelayProxy._REQ = re.compile(rb"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.S)
        self.upstream = upstream
        self.latency_s = latency_s
        self.counts: Counter[str] = Counter()
        self.ranges: Counter[tuple[str, str]] = Counter()
        self.sent_bytes = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        uhost, uport = upstream.rsplit(":", 1)

        async def pipe_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def deliver() -> None:
                while True:
                    due, data = await q.get()
                    if not data:
                        break
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
                writer.close()

            task = loop.create_task(deliver())
            try:
                while True:
                    data = await reader.read(65536)
                    if data:
                        for m in self._REQ.finditer(data):
                            method, path = m.group(1).decode(), m.group(2).decode(errors="replace")
                            kind = kind_of(method, path)
                            self.counts[kind] += 1
                            if kind in ("GET blob", "GET pack"):
                                rng = re.search(rb"(?im)^range: *(\S+)", m.group(3))
                                self.ranges[(path, rng.group(1).decode() if rng else "")] += 1
                    await q.put((loop.time() + self.latency_s, data))
                    if not data:
                        break
            except OSError:
                await q.put((0.0, b""))
            await task

        async def pipe_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await reader.read(262144)
                    if not data:
                        break
                    self.sent_bytes += len(data)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
            try:
                ureader, uwriter = await asyncio.open_connection(uhost, int(uport))
            except OSError:
                cwriter.close()
                return
            await asyncio.gather(pipe_up(creader, uwriter), pipe_down(ureader, cwriter), return_exceptions=True)

        async def serve() -> None:
            self._server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
            self.host = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)

    def reset(self) -> None:
        def clear() -> None:
            self.counts.clear()
            self.ranges.clear()
            self.sent_bytes = 0
        done = threading.Event()
        self._loop.call_soon_threadsafe(lambda: (clear(), done.set()))
        done.wait(10)

    def total(self) -> int:
        return sum(self.counts.values())

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
