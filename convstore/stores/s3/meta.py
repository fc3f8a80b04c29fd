"""An S3 store's metadata objects (``PREFIX/meta/<key>``) and its locks:
leases made of objects (``PREFIX/locks/<name>/...``, see :func:`lease`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ...errors import ConvstoreError, StoreError
from ..base import ObjectStore, check_key
from .client import S3Client

if TYPE_CHECKING:
    from .index import S3ChunkStore

log = logging.getLogger(__name__)

META = "meta/"
LOCKS = "locks/"
LIST_WORKERS = 16
MAX_OBJECT = 1 << 30
LEASE_TTL = 120.0  #: server-clock seconds a lease lives unless its holder renews it
RENEW_EVERY = 20.0
LOCK_WAIT = 1800.0  #: how long a lock is waited for before the wait is given up (a named error)


@contextlib.contextmanager
def lease(client: S3Client, name: str, shared: bool = False, ttl: float = LEASE_TTL,
          wait: float = LOCK_WAIT) -> Iterator[None]:
    """A lock held as a lease object, shared or exclusive.

    * exclusive: create ``locks/NAME/x`` only if absent (``If-None-Match: *``),
      then wait until no live shared lease ``locks/NAME/s-*`` is listed;
    * shared: write ``locks/NAME/s-<random>``, then check that no ``x`` exists
      (if one does, withdraw and wait for it to go).

    Each side writes first and looks second, and S3 is strongly consistent
    (read-after-write and list-after-write), so an exclusive holder and a
    shared one can never both proceed.  A holder renews its lease every
    ``RENEW_EVERY`` s (each write has new content, so a new ETag); a lease not
    renewed for ``ttl`` (judged by the server's own clock: its LastModified
    against the Date of the answer, so no client clock matters) belongs to a
    dead process and is removed by a waiter.  Of several waiters that find
    the same expired ``x``, only the one that creates ``broken-<its ETag>``
    (``If-None-Match: *``) removes it, so none removes a lease taken since.  A
    holder whose lease was taken from it (its renewal finds another ETag)
    stops renewing and says so in the log.
    """
    prefix = f"{LOCKS}{name}/"
    xkey = prefix + "x"
    key = xkey if not shared else f"{prefix}s-{secrets.token_hex(16)}"
    token = secrets.token_hex(8)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    writes = [0]

    def body() -> bytes:
        writes[0] += 1
        return json.dumps({"holder": holder, "token": token, "write": writes[0], "ttl": ttl,
                           "shared": shared}).encode()

    deadline = time.monotonic() + wait
    pause = 0.02

    def waited() -> None:
        nonlocal pause
        if time.monotonic() > deadline:
            raise StoreError(f"lock {name} of {client.url} is still held after {wait:.0f} s (held by a live "
                             f"process, or its lease is renewed)")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)

    def stale(h: tuple[int, float, float, str] | None) -> bool:
        return h is not None and h[2] - h[1] > ttl

    def break_x(h: tuple[int, float, float, str]) -> None:
        """Remove the expired exclusive lease ``h`` describes, if this waiter is the first to claim it."""
        if client.put(f"{prefix}broken-{h[3].strip(chr(34))}", b"", if_absent=True):
            log.warning("removing the expired exclusive lease of lock %s", name)
            client.delete([xkey])

    etag = ""
    if shared:
        while True:
            etag = client.put(key, body())
            h = client.head(xkey)
            if h is None:
                break
            if stale(h):
                break_x(h)
                continue
            client.delete([key])
            while (h := client.head(xkey)) is not None and not stale(h):
                waited()
    else:
        while not (etag := client.put(key, body(), if_absent=True)):
            h = client.head(xkey)
            if h is not None and stale(h):
                break_x(h)
                continue
            waited()
    stop = threading.Event()
    mine = [etag]

    def renew() -> None:
        while not stop.wait(RENEW_EVERY):
            try:
                h = client.head(key)
                if h is None or h[3] != mine[0]:
                    log.error("the lease of lock %s was taken from this process (not renewed for %.0f s): "
                              "what it protects is no longer protected", name, ttl)
                    return
                mine[0] = client.put(key, body())
            except ConvstoreError as e:
                log.warning("could not renew the lease of lock %s: %s", name, e)

    renewer = threading.Thread(target=renew, name=f"convstore-lease-{name}", daemon=True)
    renewer.start()
    try:
        if not shared:  # wait for the shared holders that came first
            while True:
                objs, now = client.list_with_time(prefix)
                leases = [(n, mtime) for n, _s, mtime in objs if n.startswith(prefix + "s-")]
                dead = [n for n, mtime in leases if now - mtime > ttl]
                old_marks = [n for n, _s, mtime in objs if n.startswith(prefix + "broken-") and now - mtime > 10 * ttl]
                if dead or old_marks:
                    log.warning("removing %d expired shared leases of lock %s", len(dead), name)
                    client.delete(dead + old_marks)
                if len(leases) == len(dead):
                    break
                waited()
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            h = client.head(key)
            if h is not None and h[3] == mine[0]:  # never another holder's lease
                client.delete([key])
        except ConvstoreError as e:  # it expires by itself
            log.warning("could not release lock %s: %s", name, e)


class S3Store(ObjectStore):
    """convstore metadata objects under ``PREFIX/meta/`` of one bucket: every
    put is atomic (S3 replaces whole objects), an exclusive put is an atomic
    create (``If-None-Match: *``), and locks are leases (:func:`lease`)."""

    supports_writes = True
    supports_deletes = True
    supports_locking = True
    records_reads = False  # readers (a fleet of nodes) write nothing to the origin

    def __init__(self, client: S3Client) -> None:
        self.client = client
        self.url = client.url
        #: the store's chunk store (a manifest's packs are checked to exist before it is published)
        self.chunks: S3ChunkStore | None = None

    def __repr__(self) -> str:
        return f"S3Store({self.url})"

    def get(self, key: str) -> bytes:
        return self.client.get(META + check_key(key), max_bytes=MAX_OBJECT)

    def has(self, key: str) -> bool:
        return self.client.head(META + check_key(key)) is not None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        def one(k: str) -> tuple[str, bytes | None]:
            try:
                return k, self.get(k)
            except (KeyError, ConvstoreError):
                return k, None

        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            return {k: v for k, v in pool.map(one, keys) if v is not None}

    def size(self, key: str) -> int:
        h = self.client.head(META + check_key(key))
        if h is None:
            raise KeyError(key)
        return h[0]

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        check_key(key)
        if refs and self.chunks is not None:  # no image is published that relies on a pack not there
            self.chunks.pack_sizes(set(refs))
        return bool(self.client.put(META + key, data, if_absent=exclusive))

    def delete(self, key: str) -> None:
        self.client.delete([META + check_key(key)])

    def delete_many(self, keys: list[str]) -> None:
        self.client.delete([META + check_key(k) for k in keys])

    def list(self, prefix: str) -> Iterator[str]:
        want = prefix.rstrip("/") + "/" if prefix else ""
        objs, _now = self.client.list_with_time(META + want)
        for name, _size, _mtime in objs:
            yield name[len(META):]

    def usage(self, prefix: str) -> int:
        want = prefix.rstrip("/") + "/" if prefix else ""
        return sum(size for _n, size, _m in self.client.list_with_time(META + want)[0])

    def lock(self, name: str, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        if "/" in name or not name:
            raise StoreError(f"invalid lock name {name!r}")
        if name == "gc" and shared and self.chunks is not None:
            return self._writer_guard()
        return lease(self.client, name, shared)

    @contextlib.contextmanager
    def _writer_guard(self) -> Iterator[None]:
        """The gc lock held shared by a pack or copy: once it is held no gc runs, and the writer
        starts from the index as it is now (a gc may have rewritten packs since this client
        loaded it: a long-lived writer would otherwise deduplicate against chunks moved away)."""
        with lease(self.client, "gc", shared=True):
            assert self.chunks is not None
            self.chunks.refresh()
            yield

    def append_line(self, key: str, line: str) -> None:
        log.info("audit %s", line)  # S3 has no append; the local cache keeps the audit log


__all__ = ["LEASE_TTL", "S3Store", "lease"]
