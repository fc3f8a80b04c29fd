"""The registry HTTP client: the OCI distribution API at the byte level, on oras-py.

oras-py's ``Registry`` provider gives auth (docker config, basic, token),
the distribution API paths and ``do_request``; it takes file paths for
blobs and has no ranged reads, so :class:`RegistryClient` extends it with
byte-level blob upload, ranged GET, manifest PUT/GET by reference, tag
listing and retries with backoff on 5xx and connection errors.  Every
answer is read under a cap for its kind and a deadline (see the constants).

Used by the registry store (:mod:`convstore.stores.registry`), image sources
(:mod:`.sources`) and signature attachments (:mod:`.sigstore`).  The network
is a ``requests`` transport adapter, injectable (``transport=``, the model
is httpx's transports): the client's policy -- timeouts, caps, retries,
digest checks, errors -- runs the same over a scripted adapter in tests.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import re
import select
import sys
import threading
import time
import types
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, cast

import requests
import requests.adapters
import urllib3
import urllib3.response

from ..errors import (ConvstoreError, DigestMismatch, RegistryAuthError, RegistryCorrupt, RegistryError,
                      RegistryHTTPError, RegistryPlainHTTP, RegistryResponseTooLarge, RegistryServerError,
                      RegistryRangesRefused, RegistryTimeout, RegistryTLSError, RegistryTooSlow, RegistryUnavailable,
                      RegistryUnreachable)
from .media import MAX_MANIFEST, check_digest, sha256_digest, verify_bytes

log = logging.getLogger(__name__)


EMPTY_CONFIG: dict[str, Any] = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# -- response caps, enforced while the body streams in (a registry's answer never decides how much is read)
# manifests and image indexes: the distribution spec's limit (media.MAX_MANIFEST); convstore's own
# artifacts are far below it (an image's artifact lists its pack blobs, ~150 bytes each: 27,000 packs)
MAX_TAGS_PAGE = 4 << 20  # one page of a tag listing: asked for 1,000 tags of at most 128 characters
MAX_TAGS = 1_000_000  # tags in one listing (every page): ~100 MB of Python strings, a 250,000-image store
MAX_TAG_PAGES = 10_000  # pages of one listing: MAX_TAGS at 100 a page (registries may give fewer than asked)
MAX_BLOB = 64 << 20  # a whole-blob GET with no descriptor size (configs, metadata objects are far smaller)
MAX_OTHER = 64 << 10  # any other answer (upload, delete, an error's body: only its start is shown)
RETRIES = 4  # attempts per request; backoff 0.2, 0.4, 0.8 s between them
TIMEOUT = 60.0  # seconds without an answer (connect: at most 10) before a request is retried
# an answer's body must arrive whole within TIMEOUT plus its cap at this rate (a manifest: 60 + 64 s),
# however it trickles in: a per-read timeout alone never fires on a byte sent every TIMEOUT - 1 s
MIN_RATE = 64 << 10
# a registry store's reads (--read-deadline): seconds a read may wait with NOTHING arriving -- no byte of its
# answer and none of any other answer this client is getting (a queued read behind a slow but moving registry
# waits; a silent or stopped one fails).  The clock starts when the request is sent (not while it waits for
# a worker or a connection); a registry that cannot be reached fails within it too.
READ_DEADLINE = 10.0


PROBE_INTERVAL = 2.0  # seconds a registry that missed a read's deadline is not asked again (reads fail at once)


@dataclass
class RegistryCounters:
    """Plain counters of one client (read by ``stats`` and the metrics exporter)."""

    requests: int = 0  #: attempts sent
    retries: int = 0  #: attempts after a first one failed
    unreachable: int = 0  #: requests that ended RegistryUnreachable
    timeouts: int = 0  #: requests that ended RegistryTimeout (a silent or stalled registry)
    fast_failures: int = 0  #: reads refused at once while the registry was marked down
    recoveries: int = 0  #: times the registry answered again after being marked down

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class _Watchdog:
    """Shuts ``r``'s socket down ``seconds`` from now unless cancelled: a read blocked on it then ends
    or fails at once (a per-read timeout never fires on a body trickled in); ``expired`` tells why."""

    def __init__(self, r: requests.Response, seconds: float):
        self.r, self.seconds = r, seconds
        self.expired = threading.Event()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired.set()
        try:
            self.r.raw.shutdown()
        except Exception:  # already closed, or no socket: nothing is blocked on it
            pass

    def cancel(self) -> None:
        self._timer.cancel()


_current = threading.local()  # .attempt: the read with a deadline the calling thread is making (or None)


class _Attempt:
    """One attempt at a read with a deadline, as its client's :class:`_Monitor` sees it."""

    __slots__ = ("monitor", "sent", "last", "conn", "expired")

    def __init__(self, monitor: _Monitor):
        self.monitor = monitor
        self.sent: float | None = None  # when its request went out (None: not yet, e.g. connecting)
        self.last = 0.0  # when a byte of its answer last arrived
        self.conn: Any = None  # the urllib3 connection it was sent on
        self.expired = False

    def progress(self) -> None:
        self.last = self.monitor.last = time.monotonic()


class _Monitor:
    """Tells a read that is queued or slow but moving from one that is stalled, for one client.

    A read (attempt) is stalled when nothing arrived for ``deadline`` seconds since its request was
    sent: no byte of its own answer and none of any other answer this client got meanwhile (a
    registry that answers others is up, its queue moving), and no byte waits unread on its socket
    (a CPU-starved reader has not read it yet).  A stalled read's socket is shut down: the blocked
    read then ends at once and the attempt fails as :class:`RegistryTimeout`.  One thread watches
    every read of the client, asleep until the earliest one could stall."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.last = 0.0  # when any answer of this client last brought a byte
        self._cond = threading.Condition()
        self._live: set[_Attempt] = set()
        self._thread: threading.Thread | None = None

    def begin(self) -> _Attempt:
        att = _Attempt(self)
        with self._cond:
            self._live.add(att)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="convstore-read-deadline", daemon=True)
                self._thread.start()
        _current.attempt = att
        return att

    def end(self, att: _Attempt) -> None:
        _current.attempt = None
        with self._cond:
            self._live.discard(att)

    def sent(self, att: _Attempt, conn: Any) -> None:
        # no need to wake the watcher: it wakes by the deadline after it last looked, before this one is due
        att.conn = conn
        att.sent = time.monotonic()

    @staticmethod
    def _unread(conn: Any) -> bool:
        """Whether bytes of an answer wait on ``conn``'s socket (or its buffer) unread."""
        sock = getattr(conn, "sock", None)
        if sock is None:
            return False
        try:
            if getattr(sock, "pending", None) and sock.pending():  # TLS: decrypted but unread
                return True
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _run(self) -> None:
        with self._cond:
            while self._live:
                now = time.monotonic()
                wake = now + self.deadline
                for att in self._live:
                    if att.sent is None or att.expired:
                        continue
                    due = max(att.sent, att.last, self.last) + self.deadline
                    if due <= now and self._unread(att.conn):
                        att.last = self.last = now  # it arrived; the reader has not had the CPU to read it
                        due = now + self.deadline
                    if due > now:
                        wake = min(wake, due)
                        continue
                    att.expired = True
                    try:
                        att.conn.sock.shutdown(2)  # socket.SHUT_RDWR
                    except (AttributeError, OSError):  # closed meanwhile: nothing is blocked on it
                        pass
                self._cond.wait(max(0.01, wake - now))
            self._thread = None


class _WatchedPool(urllib3.HTTPConnectionPool):
    """A connection pool that tells the calling thread's read (if it has a deadline) when its request
    is sent and when its answer's head arrives."""

    def _make_request(self, conn: Any, *args: Any, **kw: Any) -> Any:
        att: _Attempt | None = getattr(_current, "attempt", None)
        if att is not None:
            att.monitor.sent(att, conn)
        r = super()._make_request(conn, *args, **kw)
        if att is not None:
            att.progress()
        return r


class _WatchedTLSPool(_WatchedPool, urllib3.HTTPSConnectionPool):
    pass


def _read_capped(r: requests.Response, cap: int, host: str, kind: str, timeout: float,
                 attempt: _Attempt | None = None) -> bytes:
    """The body of ``r`` if it has at most ``cap`` bytes, read as it arrives (64 KiB at a time,
    decoded: a Content-Encoding is capped on what it inflates to) and whole within ``timeout``
    seconds plus ``cap`` at MIN_RATE bytes a second (a trickle meets no per-read timeout: past the
    deadline the socket is shut down); :class:`RegistryResponseTooLarge` naming ``host`` and
    ``kind`` past the cap, :class:`RegistryTooSlow` past the deadline.  A HEAD answer has no body.
    Each piece that arrives is progress for ``attempt`` (a read with a deadline) as it arrives."""
    def too_large() -> RegistryResponseTooLarge:
        r.close()
        limit = f"{cap >> 20} MiB" if cap >= 1 << 20 and cap % (1 << 20) == 0 else f"{cap} bytes"
        why = " (the distribution spec's limit)" if kind == "a manifest" else ""
        return RegistryResponseTooLarge(f"registry {host} sent {kind} larger than {limit}{why}")

    if r.request is not None and r.request.method == "HEAD":
        return b""
    try:
        declared = int(r.headers.get("Content-Length", ""))
    except ValueError:
        declared = -1
    if declared > cap:
        raise too_large()
    deadline = timeout + cap / MIN_RATE
    watchdog = _Watchdog(r, deadline)
    buf = bytearray()
    if attempt is not None and isinstance(r.raw, urllib3.response.HTTPResponse):
        # as it arrives (read1: one receive, not 64 KiB), so that a trickle is seen moving
        parts: Any = iter(lambda: r.raw.read1(1 << 16, decode_content=True), b"")
    else:
        parts = r.iter_content(1 << 16)
    try:
        for part in parts:
            if attempt is not None:
                attempt.progress()
            buf += part
            if len(buf) > cap:
                raise too_large()
            if watchdog.expired.is_set():
                break
    except urllib3.exceptions.HTTPError as e:  # read1's own (iter_content wraps them in requests')
        if not watchdog.expired.is_set():
            raise requests.exceptions.ChunkedEncodingError(e) from None
    except (requests.exceptions.RequestException, OSError):
        if not watchdog.expired.is_set():
            raise
    finally:
        watchdog.cancel()
    if watchdog.expired.is_set():
        r.close()
        raise RegistryTooSlow(f"registry {host} sent {kind} too slowly (not whole within {deadline:g} s)")
    return bytes(buf)


def _split_byteranges(body: bytes, ctype: str, ranges: list[tuple[int, int]], host: str) -> list[bytes]:
    """The parts of a ``multipart/byteranges`` answer, by the ranges asked for."""
    bad = RegistryRangesRefused(f"registry {host} sent a malformed multi-range answer")
    m = re.search(r'boundary="?([^";,\s]+)"?', ctype)
    if not ctype.startswith("multipart/byteranges") or m is None:
        raise bad
    delim = b"--" + m.group(1).encode()
    got: dict[int, bytes] = {}
    pos = 0
    while True:
        at = body.find(delim, pos)
        if at < 0:
            raise bad
        pos = at + len(delim)
        if body[pos:pos + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise bad
        head = body[pos:head_end].decode("latin-1")
        cr = re.search(r"(?im)^content-range:\s*bytes\s+(\d+)-(\d+)/", head)
        if cr is None:
            raise bad
        start, last = int(cr.group(1)), int(cr.group(2))
        data = body[head_end + 4 : head_end + 4 + last - start + 1]
        if len(data) != last - start + 1:
            raise bad
        got[start] = data
        pos = head_end + 4 + len(data)
    out = []
    for s, e in ranges:
        part = got.get(s)
        if part is None or len(part) != e - s:
            raise bad
        out.append(part)
    return out


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """Every request gets a (connect, read) timeout: a stalled registry is an
    error after it, never a hang (oras-py sets none).  A body nobody streams
    (oras-py's token requests; :meth:`RegistryClient._req` streams and caps
    its own) is read here, at most ``MAX_MANIFEST``, and so is a redirect's
    (which requests reads whole, streamed or not), at most ``MAX_OTHER``.

    The bytes go through ``transport`` where one is given (any
    :class:`requests.adapters.BaseAdapter`: a scripted registry in tests),
    else through this adapter's own connection pool."""

    def __init__(self, timeout: tuple[float, float], host: str,
                 transport: requests.adapters.BaseAdapter | None = None):
        super().__init__()
        self.timeout = timeout
        self.host = host
        self.transport = transport
        #: a shorter (connect, read) timeout for the requests of this thread (a read's deadline)
        self.bound = threading.local()

    def init_poolmanager(self, *args: Any, **kw: Any) -> None:
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedPool, "https": _WatchedTLSPool}

    def send(self, request: requests.PreparedRequest, *args: Any, **kw: Any) -> requests.Response:
        if kw.get("timeout") is None:
            kw["timeout"] = getattr(self.bound, "timeout", None) or self.timeout
        streamed = bool(kw.get("stream"))
        kw["stream"] = True
        if self.transport is not None:
            r = self.transport.send(request, *args, **kw)
        else:
            r = super().send(request, *args, **kw)
        host = urllib.parse.urlsplit(request.url or "").netloc or self.host
        if r.is_redirect:  # requests reads a redirect's body whole itself before it follows it
            r._content = _read_capped(r, MAX_OTHER, host, "a redirect", self.timeout[1])
        elif not streamed:
            r._content = _read_capped(r, MAX_MANIFEST, host, "an answer", self.timeout[1])  # requests' .content
        return r

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        super().close()


class _BlobStream(io.RawIOBase):
    """A blob's body as it streams in (undecoded), whole within ``deadline`` seconds: past it the
    socket is shut down and a read is :class:`RegistryTooSlow`; a body broken off is a RegistryError."""

    def __init__(self, r: requests.Response, deadline: float, host: str, what: str):
        self._r, self._deadline, self._host, self._what = r, deadline, host, what
        self._watchdog = _Watchdog(r, deadline)
        self._expired = self._watchdog.expired

    def _too_slow(self) -> RegistryTooSlow:
        return RegistryTooSlow(f"registry {self._host} sent {self._what} too slowly "
                               f"(not whole within {self._deadline:g} s)")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._expired.is_set():
            raise self._too_slow()
        try:
            n = self._r.raw.readinto(b)
        except ConvstoreError:
            raise
        except Exception as e:  # urllib3's and http.client's errors, OSError: the connection broke
            self._watchdog.cancel()
            if self._expired.is_set():
                raise self._too_slow() from None
            raise RegistryError(f"registry {self._host} broke off {self._what} ({type(e).__name__})") from None
        if self._expired.is_set():
            raise self._too_slow()
        if not n:
            self._watchdog.cancel()
        return n

    def close(self) -> None:
        self._watchdog.cancel()
        self._r.close()
        super().close()


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module not imported yet: the first attribute asked of it
    imports the real one (which then replaces it there) and answers from it."""

    _lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        with _Deferred._lock:
            real = self.__dict__.get("_real")
            if real is None:
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
                real = self.__dict__["_real"] = importlib.import_module(self.__name__)
        return getattr(real, attr)


def _defer_import(name: str) -> None:
    """Make ``import name`` cost nothing until the module is used: oras-py imports jsonschema
    (~0.1 CPU s, a sixth of a cold start's CPU) for manifests it validates on push, which
    convstore's client never asks it to do.  (importlib's LazyLoader does not do here: on 3.11
    the next ``import name`` reads ``__spec__`` and that loads it.)"""
    if name not in sys.modules:
        stub = sys.modules[name] = _Deferred(name)
        stub.__spec__ = None


class RegistryClient:
    """Byte-level registry operations over oras-py's provider (auth, paths).

    ``transport``: the adapter that moves the bytes (default: requests'
    own HTTP); the client's policy -- timeouts, caps, retries, digest checks
    and errors -- is the same over any transport."""

    def __init__(self, host: str, insecure: bool = False, username: str | None = None,
                 password: str | None = None, timeout: float = TIMEOUT, *,
                 transport: requests.adapters.BaseAdapter | None = None, deadline: float | None = None):
        _defer_import("jsonschema")  # oras-py imports it to validate what it pushes; a reader never does
        import oras.provider

        self.host = host
        self.timeout = timeout
        #: seconds a read (GET, HEAD) may wait with nothing arriving (READ_DEADLINE); past it, or while
        #: the registry is marked down after one missed it, the read fails with RegistryUnavailable
        self.deadline = deadline
        self.counters = RegistryCounters()
        self._health = threading.Lock()
        # while marked down: (since, next probe at, the error's class, its message)
        self._down: tuple[float, float, type[RegistryUnreachable | RegistryTimeout], str] | None = None
        self._probing = False
        self._monitor: _Monitor | None = None
        self.reg = oras.provider.Registry(hostname=host, insecure=insecure,
                                          auth_backend="basic" if username else "token")
        adapter = self._adapter = _TimeoutAdapter((min(timeout, 10.0), timeout), host, transport)
        self.reg.session.mount("http://", adapter)
        self.reg.session.mount("https://", adapter)
        if username:
            self.reg.auth.set_basic_auth(username, password or "")
        self.base = f"{'http' if insecure else 'https'}://{host}/v2"
        # the environment's proxies (as no_proxy has them for this host) and CA bundle, read once: requests
        # reads them again on every request (~0.15 ms CPU each, a cold start sends hundreds)
        env = self.reg.session.merge_environment_settings(self.base, {}, None, None, None)
        self.reg.session.proxies.update(env["proxies"])
        if isinstance(env["verify"], str):
            self.reg.session.verify = env["verify"]
        self.reg.session.trust_env = False
        self._empty_done: set[str] = set()
        self._do_request = getattr(oras.provider.Registry.do_request, "__wrapped__", oras.provider.Registry.do_request)

    def __repr__(self) -> str:  # never the credentials
        return f"RegistryClient({self.host})"

    def _req(self, method: str, url: str, ok: tuple[int, ...], *, cap: int = MAX_OTHER, kind: str = "an answer",
             stream: bool = False, **kw: Any) -> requests.Response:
        """One request, retried on connection errors, timeouts, 5xx and 429.

        The body of an answer in ``ok`` is read here, at most ``cap`` bytes
        (:class:`RegistryResponseTooLarge` naming ``kind`` past it, never
        retried), and is then the response's ``content``; ``stream=True``
        leaves it unread for the caller.  Other answers are never read whole.

        A read (GET, HEAD) of a client with a ``deadline`` fails once that
        many seconds passed with nothing arriving (see READ_DEADLINE and
        :class:`_Monitor`: an answer of another read counts, so a queue that
        moves is waited for; connection errors are retried for that long);
        one that misses it marks the registry down, and for
        PROBE_INTERVAL seconds reads fail at once (then one read probes it
        again, the others still fail at once until it answers).
        """
        bounded = self.deadline is not None and method in ("GET", "HEAD")
        if not bounded:
            return self._attempts(method, url, ok, cap, kind, stream, None, **kw)
        self._gate()
        try:
            end = time.monotonic() + cast(float, self.deadline)
            r = self._attempts(method, url, ok, cap, kind, stream, end, **kw)
        except (RegistryUnreachable, RegistryTimeout) as e:  # no answer (a 5xx is one: it is up)
            self._mark_down(type(e), str(e))
            raise
        except BaseException:
            self._mark_up()  # it answered (an error status, a refusal): it is up
            raise
        self._mark_up()
        return r

    def _watch(self) -> _Monitor:
        """The monitor of this client's reads with a deadline (made at the first)."""
        with self._health:
            mon = self._monitor
            if mon is None or mon.deadline != self.deadline:
                mon = self._monitor = _Monitor(cast(float, self.deadline))
            return mon

    def _gate(self) -> None:
        """Refuse a read at once while the registry is marked down (one read at a time probes it)."""
        with self._health:
            if self._down is None:
                return
            since, retry_at, cls, why = self._down
            now = time.monotonic()
            if now < retry_at or self._probing:
                self.counters.fast_failures += 1
                raise cls(f"{why} (marked down {now - since:.1f} s ago; asked again every {PROBE_INTERVAL:g} s)")
            self._probing = True

    def _mark_down(self, cls: type[RegistryUnreachable | RegistryTimeout], why: str) -> None:
        with self._health:
            now = time.monotonic()
            if self._down is None:
                log.info("%s: reads fail at once until it answers again", why)
            since = now if self._down is None else self._down[0]
            self._down = (since, now + PROBE_INTERVAL, cls, why.split(" (marked down ")[0])
            self._probing = False

    def _mark_up(self) -> None:
        with self._health:
            if self._down is not None:
                self.counters.recoveries += 1
                log.warning("registry %s answers again (after %.0f s)", self.host, time.monotonic() - self._down[0])
            self._down = None
            self._probing = False

    def _attempts(self, method: str, url: str, ok: tuple[int, ...], cap: int, kind: str, stream: bool,
                  end: float | None, **kw: Any) -> requests.Response:
        import oras.auth

        delay = 0.2
        timeouts = last_status = 0
        timeout = self.timeout
        monitor = None
        if end is not None:  # a read with a deadline: its monitor tells stalled from moving (per receive)
            monitor = self._watch()
        for attempt in range(RETRIES):
            r = None
            watched = None
            if monitor is not None:
                # out of time once nothing arrived for the deadline (an answer of another read is progress)
                if time.monotonic() >= max(cast(float, end), monitor.last + cast(float, self.deadline)) - 0.05:
                    break
                watched = monitor.begin()
                # connecting: at most the deadline; then a receive waits up to the timeout, the monitor
                # ends it sooner once nothing arrived for the deadline
                self._adapter.bound.timeout = (min(cast(float, self.deadline), 10.0), self.timeout)
            with self._health:
                self.counters.requests += 1
                self.counters.retries += attempt > 0
            try:
                try:
                    # oras-py's do_request (auth handling) without its retry decorator, whose
                    # backoff sleeps up to 81 s and hides errors: this policy is bounded (~3 s).
                    r = self._do_request(self.reg, url, method, stream=True, **kw)
                    if r.status_code in ok and not stream:  # (a HEAD answer has no body)
                        # a 404 carries the registry's error, not what was asked for: its own cap
                        body_cap = cap if r.status_code < 300 else MAX_OTHER
                        r._content = _read_capped(r, body_cap, self.host, kind, timeout, watched)  # .content
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
                    if watched is None or not watched.expired:
                        raise
                if watched is not None and watched.expired:  # the monitor shut it down: nothing came
                    self._count(RegistryTimeout)
                    raise RegistryTimeout(f"registry {self.host} sent nothing for {self.deadline:g} s (the read "
                                          f"deadline) while no other answer arrived either") from None
                assert r is not None
                if r.status_code in ok:
                    return r
            except oras.auth.AuthenticationException as e:
                raise RegistryAuthError(f"registry {self.host} refused the credentials ({e})") from None
            except requests.Timeout:
                timeouts += 1
                if attempt == RETRIES - 1:
                    self._count(RegistryTimeout)
                    raise RegistryTimeout(f"registry {self.host} did not answer within {self.timeout:g} s "
                                          f"({RETRIES} attempts)") from None
            except requests.exceptions.SSLError as e:
                # up, but not TLS: a plain-HTTP registry answers the TLS hello with HTTP ("wrong version number")
                if "WRONG_VERSION_NUMBER" in str(e).upper().replace(" ", "_"):
                    raise RegistryPlainHTTP(f"the registry at {self.host} speaks plain HTTP; use --insecure") from None
                raise RegistryTLSError(f"TLS with the registry at {self.host} failed: {e.__class__.__name__}") from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:
                if "timed out" in str(e):  # a body that stopped coming (urllib3's ReadTimeoutError, wrapped)
                    timeouts += 1
                if attempt == RETRIES - 1:
                    cls: type[RegistryUnavailable] = RegistryTimeout if timeouts else RegistryUnreachable
                    self._count(cls)
                    raise cls(f"cannot reach the registry at {self.host}") from None
            except (ValueError, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema):
                # oras could not answer the auth challenge: no (usable) credentials
                raise RegistryAuthError(f"registry {self.host} requires credentials (--username with "
                                        f"--password-stdin, or docker login)") from None
            except (AttributeError, TypeError) as e:  # oras-py read a token answer of another shape
                raise RegistryAuthError(f"registry {self.host} sent a malformed authentication answer "
                                        f"({type(e).__name__}: {e})") from None
            else:
                try:
                    if r.status_code in (401, 403):
                        raise RegistryAuthError(f"registry {self.host} refused the credentials "
                                                f"(HTTP {r.status_code})")
                    if r.status_code < 500 and r.status_code != 429:
                        raise RegistryHTTPError(f"registry {self.host} refused {method} "
                                                f"{url.split('/v2/', 1)[-1]}: HTTP {r.status_code} "
                                                f"{self._snippet(r, min(timeout, self.deadline or timeout))}", r.status_code)
                    last_status = r.status_code
                    if attempt == RETRIES - 1:
                        raise RegistryServerError(f"registry {self.host} failed: HTTP {r.status_code} for {method}",
                                                  r.status_code)
                finally:
                    r.close()
            finally:
                if r is not None and not stream and r._content is False:  # body unread: drop the connection
                    r.close()
                if watched is not None:
                    watched.monitor.end(watched)
                    self._adapter.bound.timeout = None
            if monitor is not None and time.monotonic() + delay >= max(cast(float, end),
                                                                      monitor.last + cast(float, self.deadline)):
                break
            time.sleep(delay)
            delay *= 2
        # a read's deadline ran out between or during attempts
        if last_status:
            raise RegistryServerError(f"registry {self.host} failed: HTTP {last_status} for {method} "
                                      f"(retried for {self.deadline:g} s)", last_status)
        cls = RegistryTimeout if timeouts or end is None else RegistryUnreachable
        self._count(cls)
        if cls is RegistryTimeout:
            raise RegistryTimeout(f"registry {self.host} did not answer within the read deadline of "
                                  f"{self.deadline:g} s")
        raise RegistryUnreachable(f"cannot reach the registry at {self.host} (tried for {self.deadline:g} s)")

    def _count(self, cls: type[RegistryUnavailable]) -> None:
        with self._health:
            if cls is RegistryTimeout:
                self.counters.timeouts += 1
            else:
                self.counters.unreachable += 1

    @staticmethod
    def _snippet(r: requests.Response, timeout: float) -> str:
        """The start of an error answer's body (at most 200 bytes are read, within ``timeout``)."""
        watchdog = _Watchdog(r, timeout)
        try:
            head = r.raw.read(200, decode_content=True) or b""
        except Exception:  # the error is already being reported; its body is a courtesy
            head = b""
        finally:
            watchdog.cancel()
        return head.decode("utf-8", "replace").strip()

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self._req("HEAD", f"{self.base}/{repo}/blobs/{digest}", (200, 404)).status_code == 200

    def blob_size(self, repo: str, digest: str) -> int | None:
        """The size of a blob, or None if the registry does not have it."""
        r = self._req("HEAD", f"{self.base}/{repo}/blobs/{digest}", (200, 404))
        if r.status_code != 200:
            return None
        try:
            return int(r.headers.get("Content-Length", ""))
        except ValueError:
            raise RegistryError(f"registry {self.host} gave no size for blob {digest}") from None

    def put_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Upload ``data`` (monolithic POST + PUT) unless it is already there."""
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        if self.blob_exists(repo, digest):
            return digest
        r = self._req("POST", f"{self.base}/{repo}/blobs/uploads/", (202,))
        loc = r.headers.get("Location", "")
        if not loc:
            raise RegistryError("registry gave no upload location")
        if not loc.startswith("http"):
            loc = self.base.rsplit("/v2", 1)[0] + loc
        sep = "&" if "?" in loc else "?"
        self._req("PUT", f"{loc}{sep}digest={digest}", (201,), data=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        return digest

    def get_blob(self, repo: str, digest: str, start: int | None = None, end: int | None = None, *,
                 size: int | None = None, max_bytes: int = MAX_BLOB) -> bytes:
        """A byte range of a blob (as the registry sends it: the caller checks what it holds),
        or the whole blob, checked against ``digest`` and, where given (a descriptor's),
        ``size``: :class:`RegistryCorrupt` otherwise.  A whole blob is read up to ``size``
        or else ``max_bytes``, a range up to its length."""
        url = f"{self.base}/{repo}/blobs/{digest}"
        if start is not None and end is not None:
            r = self._req("GET", url, (200, 206, 404), headers={"Range": f"bytes={start}-{end - 1}"},
                          cap=max(0, end - start), kind="a blob range")
            if r.status_code == 404:
                raise KeyError(digest)
            return r.content
        what = f"blob {digest} from {self.host}"
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise RegistryCorrupt(f"{what}: its descriptor's size {size!r} is not a size")
        if size is not None and size > max_bytes:
            raise RegistryResponseTooLarge(f"{what}: its descriptor's size {size} is over the {max_bytes}-byte "
                                           f"limit for it")
        r = self._req("GET", url, (200, 404), cap=max_bytes if size is None else size, kind=f"blob {digest}")
        if r.status_code == 404:
            raise KeyError(digest)
        try:
            return verify_bytes(r.content, digest, size, what)
        except DigestMismatch as e:
            raise RegistryCorrupt(str(e)) from None

    def get_blob_ranges(self, repo: str, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several byte ranges ``[(start, end)]`` (sorted, not overlapping) of a
        blob with ONE request (an HTTP multi-range GET: docker-registry, like
        any Go ``http.ServeContent``, answers ``multipart/byteranges``).  Each
        part is placed by its own Content-Range and taken at its declared
        length; an answer that is not the ranges asked for is
        :class:`RegistryRangesRefused` (the caller reads them one by one)."""
        url = f"{self.base}/{repo}/blobs/{digest}"
        want = sum(e - s for s, e in ranges)
        spec = ",".join(f"{s}-{e - 1}" for s, e in ranges)
        try:
            r = self._req("GET", url, (200, 206, 404), headers={"Range": f"bytes={spec}"},
                          cap=want + 256 * len(ranges) + 1024, kind="blob ranges")
        except RegistryResponseTooLarge as e:  # the whole blob, say: the Range header was ignored
            raise RegistryRangesRefused(str(e)) from None
        if r.status_code == 404:
            raise KeyError(digest)
        ctype = r.headers.get("Content-Type", "")
        if r.status_code != 206 or len(ranges) == 1:
            if r.status_code == 206 and len(ranges) == 1 and len(r.content) == ranges[0][1] - ranges[0][0]:
                return [r.content]
            raise RegistryRangesRefused(f"registry {self.host} answered a multi-range read with HTTP "
                                        f"{r.status_code} ({ctype or 'no type'})")
        return _split_byteranges(r.content, ctype, ranges, self.host)

    def open_blob(self, repo: str, digest: str, size: int | None = None) -> BinaryIO:
        """A streaming reader of a blob as stored (the caller verifies the digest), whole within the
        timeout plus ``size`` (else ``MAX_BLOB``) at MIN_RATE bytes a second: :class:`RegistryTooSlow`
        past it, :class:`RegistryError` for a body broken off."""
        r = self._req("GET", f"{self.base}/{repo}/blobs/{digest}", (200, 404), stream=True)
        if r.status_code == 404:
            r.close()
            raise KeyError(digest)
        r.raw.decode_content = False
        deadline = self.timeout + (size if size is not None and size >= 0 else MAX_BLOB) / MIN_RATE
        return cast(BinaryIO, _BlobStream(r, deadline, self.host, f"blob {digest}"))  # a raw binary stream

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str = OCI_MANIFEST) -> None:
        if repo not in self._empty_done:  # artifacts name the empty config; the registry wants it present
            self.put_blob(repo, b"{}", str(EMPTY_CONFIG["digest"]))
            self._empty_done.add(repo)
        self._req("PUT", f"{self.base}/{repo}/manifests/{ref}", (201,), data=body,
                  headers={"Content-Type": media_type})

    def get_manifest(self, repo: str, ref: str, accept: list[str], *, expect_digest: str | None = None,
                     expect_size: int | None = None) -> tuple[bytes, str, str] | None:
        """(body, Content-Type, digest of the body), or None if there is no such manifest.

        A digest is a promise: when ``ref`` is a digest (or ``expect_digest``
        is given) the body must hash to it, and have ``expect_size`` bytes
        where given (an index entry's size), else :class:`DigestMismatch`.
        At most the distribution spec's 4 MiB is read."""
        if expect_digest is None and ":" in ref:  # a tag never holds a colon: this is a digest reference
            expect_digest = ref
        if expect_digest is not None:
            check_digest(expect_digest)
        r = self._req("GET", f"{self.base}/{repo}/manifests/{ref}", (200, 404), headers={"Accept": ", ".join(accept)},
                      cap=MAX_MANIFEST, kind="a manifest")
        if r.status_code == 404:
            return None
        body = r.content
        if expect_digest is not None:
            verify_bytes(body, expect_digest, expect_size, f"registry {self.host} sent another manifest for "
                                                           f"{repo}@{expect_digest}")
        elif expect_size is not None and len(body) != expect_size:
            raise DigestMismatch(f"registry {self.host} sent a manifest of {len(body)} bytes for {repo}:{ref}, "
                                 f"expected {expect_size}")
        return body, r.headers.get("Content-Type", ""), sha256_digest(body)

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest (and its tags); False where the registry does not allow deletes."""
        try:
            self._req("DELETE", f"{self.base}/{repo}/manifests/{digest}", (202, 404))
        except RegistryHTTPError as e:
            if e.status in (400, 405):
                return False
            raise
        return True

    def server_time(self, repo: str) -> float | None:
        """The registry's clock (its ``Date`` header, 1 s resolution, taken mid-request), or None if it
        sends none.  One small request scoped to ``repo`` (so token auth works as for any other)."""
        import email.utils

        t0 = time.time()
        r = self._req("GET", f"{self.base}/{repo}/tags/list?n=1", (200, 404), cap=MAX_TAGS_PAGE,
                      kind="a tag list page")
        t1 = time.time()
        try:
            server = email.utils.parsedate_to_datetime(r.headers.get("Date", "")).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        return server + 0.5 + (time.time() - (t0 + t1) / 2)  # mid-second, carried to now

    def tags(self, repo: str) -> list[str]:
        """Every tag of ``repo`` (each page read up to MAX_TAGS_PAGE, at most MAX_TAGS in all, in at
        most MAX_TAG_PAGES pages, each adding a tag)."""
        out: list[str] = []
        pages = 0
        url = f"{self.base}/{repo}/tags/list?n=1000"
        while url:
            r = self._req("GET", url, (200, 404), cap=MAX_TAGS_PAGE, kind="a tag list page")
            if r.status_code == 404:
                return out
            try:
                doc = r.json()
                page = doc.get("tags") or []
                if not isinstance(page, list):
                    raise ValueError
            except (ValueError, AttributeError):
                raise RegistryError(f"registry {self.host} sent a malformed tag list for {repo}") from None
            out += page
            pages += 1
            if len(out) > MAX_TAGS or pages > MAX_TAG_PAGES:
                raise RegistryResponseTooLarge(f"registry {self.host} lists more than {MAX_TAGS} tags or "
                                               f"{MAX_TAG_PAGES} pages of them in {repo}")
            link = r.headers.get("Link", "")
            url = ""
            if 'rel="next"' in link:
                if not page:  # a next page after one that added nothing: a listing that never ends
                    raise RegistryError(f"registry {self.host} sent a tag list page for {repo} with no tag "
                                        f"and a next page")
                nxt = link.split(";")[0].strip("<> ")
                url = nxt if nxt.startswith("http") else self.base.rsplit("/v2", 1)[0] + nxt
        return out
