"""A bounded local cache in front of a remote backend (Lambda's worker cache).

Immutable objects -- chunks, and sealed manifests (their names are their
content) -- are read through one directory of files (:class:`DiskCache`);
everything mutable (catalog entries, domains) is read from the remote, and the
last copy read is kept (:class:`LastCopies`) for offline mode: while the
remote is unavailable, a mutable object is served as last read if that was at
most ``offline_max_age`` seconds ago (docs/security.md, "Offline mode").  The
cache survives restarts, is bounded in bytes with LRU eviction (file mtime is
the recency, touched on every hit), and is safe with several processes:
files appear by atomic rename and eviction runs under an flock.  Its
directories are 0700 and its files 0600.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Collection, Iterator

from ..errors import CorruptObject, DigestMismatch, RegistryUnavailable
from ..oci.media import verify_bytes
from .base import (ChunkStore, ForwardingChunkStore, ForwardingObjectStore, Location, ObjectStore,
                   sealed_manifest_name)
from .fs import append_line, makedirs_private

OFFLINE_MAX_AGE = 86400.0  # seconds a last copy may be served while the remote is unavailable
LAST_COPY_VERSION = 1
REFRESH_EVERY = 60.0  # an unchanged copy's time is rewritten at most this often (its age is that coarse)

log = logging.getLogger(__name__)


class DiskCache:
    """Bytes by name in files under ``dir/objects``, bounded by ``max_bytes``."""

    def __init__(self, cache_dir: str, max_bytes: int = 2 << 30):
        self.dir = os.path.abspath(cache_dir)
        self.max_bytes = max_bytes
        makedirs_private(os.path.join(self.dir, "objects"))
        makedirs_private(os.path.join(self.dir, "tmp"))
        self._lock = threading.Lock()
        self._size = self._scan()
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"DiskCache({self.dir!r})"

    def _path(self, name: str) -> str:
        h = hashlib.sha256(name.encode()).hexdigest()
        return os.path.join(self.dir, "objects", h[:2], h)

    def _scan(self) -> int:
        total = 0
        for dp, _d, fs in os.walk(os.path.join(self.dir, "objects")):
            for f in fs:
                try:
                    total += os.lstat(os.path.join(dp, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def get(self, name: str) -> bytes | None:
        p = self._path(name)
        try:
            with open(p, "rb") as f:
                data = f.read()
            os.utime(p)
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return data

    def contains(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def put(self, name: str, data: bytes) -> None:
        p = self._path(name)
        makedirs_private(os.path.dirname(p))
        tmp = os.path.join(self.dir, "tmp", secrets.token_hex(8))
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        os.rename(tmp, p)
        with self._lock:
            self._size += len(data)
            over = self._size > self.max_bytes
        if over:
            self._evict()

    def drop(self, name: str) -> None:
        p = self._path(name)
        try:
            size = os.lstat(p).st_size
            os.unlink(p)
        except FileNotFoundError:
            return
        with self._lock:
            self._size = max(0, self._size - size)

    def cached_bytes(self) -> int:
        return self._size

    def _evict(self) -> None:
        """Drop least recently used files until 90 % of the bound."""
        fd = os.open(os.path.join(self.dir, "evict.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            files = []
            for dp, _d, fs in os.walk(os.path.join(self.dir, "objects")):
                for f in fs:
                    p = os.path.join(dp, f)
                    try:
                        st = os.lstat(p)
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime_ns, st.st_size, p))
            total = sum(s for _m, s, _p in files)
            for _m, size, p in sorted(files):
                if total <= self.max_bytes * 0.9:
                    break
                try:
                    os.unlink(p)
                    total -= size
                except FileNotFoundError:
                    pass
            with self._lock:
                self._size = total
        finally:
            os.close(fd)


class CachedChunkStore(ForwardingChunkStore):
    """Chunks read through a :class:`DiskCache`; everything else (writes,
    and ``has``: dedup asks the remote, a cached copy is not a stored one)
    goes to the remote."""

    def __init__(self, remote: ChunkStore, cache: DiskCache):
        super().__init__(remote)
        self.cache = cache

    def __repr__(self) -> str:
        return f"CachedChunkStore({self.inner!r}, {self.cache!r})"

    @staticmethod
    def _name(cid: bytes) -> str:
        return "chunk " + cid.hex()

    def is_cached(self, cid: bytes) -> bool:
        """Whether the node's disk cache holds the chunk (which tier a read will come from)."""
        return self.cache.contains(self._name(cid))

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        data = self.cache.get(self._name(cid))
        if data is None:
            data = self.inner.get(cid, hint)
            self.cache.put(self._name(cid), data)
        return data

    def cached(self, cid: bytes) -> bool:
        """Whether the chunk is in the node cache (local: read with no request)."""
        return self.cache.contains(self._name(cid))

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        missing = []
        for c in cids:
            data = self.cache.get(self._name(c)) if self.cache.contains(self._name(c)) else None
            if data is None:
                missing.append(c)
            else:
                out[c] = data
        for c, data in self.inner.get_many(missing, hints).items():
            self.cache.put(self._name(c), data)
            out[c] = data
        return out

    def delete(self, cids: list[bytes]) -> None:
        for c in cids:
            self.cache.drop(self._name(c))
        self.inner.delete(cids)

    def sweep(self, cids: list[bytes], live_containers: set[bytes] | None = None) -> None:
        """The node's copies of swept chunks go too (what only removed images used)."""
        for c in cids:
            self.cache.drop(self._name(c))
        self.inner.sweep(cids, live_containers)

    def evict(self, cid: bytes) -> None:
        self.cache.drop(self._name(cid))
        self.inner.evict(cid)  # a site tier behind the cache is bypassed for it too


class LastCopies:
    """The last answer the remote gave for each mutable object (and listing): its bytes, or that it
    was absent, and when (wall clock) the remote last confirmed it.  One file per name under
    ``dir``, written by atomic rename, 0600: a JSON header line ``{"v": 1, "name", "at", "absent"}``
    and the bytes (format: docs/format.md, "Node cache").  Not bounded (metadata is small) and
    never evicted: it is what a node starts from when the registry is down."""

    def __init__(self, dir: str):
        self.dir = dir
        makedirs_private(dir)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(name.encode()).hexdigest())

    def load(self, name: str) -> tuple[float, bytes | None] | None:
        """(confirmed at, bytes or None if absent), or None if never seen (or unreadable)."""
        try:
            with open(self._path(name), "rb") as f:
                head, _, data = f.read().partition(b"\n")
            doc = json.loads(head)
            if doc.get("v") != LAST_COPY_VERSION or doc.get("name") != name:
                return None
            return float(doc["at"]), (None if doc.get("absent") else data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, name: str, data: bytes | None) -> None:
        now = time.time()
        old = self.load(name)
        if old is not None and old[1] == data and now - old[0] < REFRESH_EVERY:
            return
        head = json.dumps({"v": LAST_COPY_VERSION, "name": name, "at": now, "absent": data is None}).encode()
        tmp = os.path.join(self.dir, f".{secrets.token_hex(8)}.tmp")
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(head + b"\n" + (data or b""))
            os.replace(tmp, self._path(name))
        except OSError as e:  # a full disk costs offline mode, never the read
            log.warning("cannot keep the last copy of %s for offline use: %s", name, e)


class CachedStore(ForwardingObjectStore):
    """Metadata from the remote, sealed manifests read through the :class:`DiskCache`;
    the key audit log is kept locally beside the cache (a registry has no append).

    Offline mode: the last copy of every mutable object and listing read is
    kept (:class:`LastCopies`); while the remote is unavailable
    (:class:`~convstore.errors.RegistryUnavailable`: no answer, or 5xx), a
    read is answered from it if the remote confirmed it at most
    ``offline_max_age`` seconds ago (0: never).  What comes back is still
    authenticated by its reader (catalog entries and domain records by their
    MAC, bound to their name, and the rollback check; store.json by the
    location pin and its wrapped key)."""

    def __init__(self, remote: ObjectStore, cache: DiskCache, offline_max_age: float = OFFLINE_MAX_AGE):
        super().__init__(remote)
        self.remote = remote
        self.cache = cache
        self.offline_max_age = offline_max_age
        self.last = LastCopies(os.path.join(cache.dir, "last"))
        #: mutable objects and listings answered from their last copy (the registry unavailable)
        self.offline_reads = 0
        self._warned = False
        self._count_lock = threading.Lock()

    def counters(self) -> dict[str, int]:
        """Plain counters (for metrics): reads answered offline, and the remote client's (requests,
        retries, unreachable, timeouts, fast_failures, recoveries) where it has them."""
        client = getattr(self.remote, "client", None)
        counters = getattr(client, "counters", None)
        out: dict[str, int] = dict(counters.to_json()) if counters is not None else {}
        out["offline_reads"] = self.offline_reads
        return out

    def _offline(self, name: str, err: RegistryUnavailable) -> bytes | None:
        """The last copy of ``name`` (None: it was absent), if fresh enough; else ``err``, saying why."""
        got = self.last.load(name) if self.offline_max_age > 0 else None
        if got is None:
            raise err
        age = time.time() - got[0]
        if age > self.offline_max_age:
            raise type(err)(f"{err}; the node cache's copy of {name} is {age:.0f} s old, past the offline "
                            f"limit of {self.offline_max_age:g} s (--offline-max-age)") from None
        with self._count_lock:
            self.offline_reads += 1
            first, self._warned = not self._warned, True
        if first:
            log.info("%s: serving the catalog from the node cache (offline: copies confirmed up to %g s ago "
                     "are used)", err, self.offline_max_age)
        return got[1]

    def __repr__(self) -> str:
        return f"CachedStore({self.remote!r}, {self.cache!r})"

    def get(self, key: str) -> bytes:
        name = sealed_manifest_name(key)
        if name is not None:  # write-once: from the disk cache
            data = self.cache.get(key)
            if data is None:
                data = self.remote.get(key)
                try:  # a sealed manifest is named by its digest: what does not match it is never cached
                    verify_bytes(data, "sha256:" + name, None, f"{self.remote!r}: object {key}")
                except DigestMismatch as e:
                    raise CorruptObject(str(e)) from None
                self.cache.put(key, data)
            return data
        try:
            data = self.remote.get(key)
        except KeyError:
            self.last.save(key, None)
            raise
        except RegistryUnavailable as e:
            got = self._offline(key, e)
            if got is None:
                raise KeyError(key) from None
            return got
        self.last.save(key, data)
        return data

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if any(sealed_manifest_name(k) is not None for k in keys):
            return super().get_many(keys)
        found = self.remote.get_many(keys)  # what it left out is read alone (its error, or its last copy)
        for k, v in found.items():
            self.last.save(k, v)
        return found

    def has(self, key: str) -> bool:
        if sealed_manifest_name(key) is not None and self.cache.contains(key):
            return True
        try:
            return self.remote.has(key)
        except RegistryUnavailable as e:
            return self._offline(key, e) is not None

    def list(self, prefix: str) -> Iterator[str]:
        name = "listing " + prefix
        try:
            keys = list(self.remote.list(prefix))
        except RegistryUnavailable as e:
            keys = (self._offline(name, e) or b"").decode().split("\n")
            return iter([k for k in keys if k])
        self.last.save(name, "\n".join(keys).encode())
        return iter(keys)

    def evict(self, key: str) -> None:
        self.cache.drop(key)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        done = self.remote.put(key, data, durable=durable, exclusive=exclusive, refs=refs)
        if done and sealed_manifest_name(key) is None:
            self.last.save(key, data)
        return done

    def delete(self, key: str) -> None:
        self.evict(key)
        self.remote.delete(key)
        if sealed_manifest_name(key) is None:
            self.last.save(key, None)

    def append_line(self, key: str, line: str) -> None:
        append_line(os.path.join(self.cache.dir, key), line)
