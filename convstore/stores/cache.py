"""A bounded local cache in front of a remote backend (Lambda's worker cache).

Immutable objects -- chunks, and sealed manifests (their names are their
content) -- are read through one directory of files (:class:`DiskCache`);
everything mutable (catalog entries, domains) always goes to the remote.  The
cache survives restarts, is bounded in bytes with LRU eviction (file mtime is
the recency, touched on every hit), and is safe with several processes:
files appear by atomic rename and eviction runs under an flock.  Its
directories are 0700 and its files 0600.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import threading

from ..errors import CorruptObject, DigestMismatch
from ..oci.media import verify_bytes
from .base import ChunkStore, ForwardingChunkStore, ForwardingObjectStore, Location, ObjectStore
from .fs import append_line, makedirs_private

IMMUTABLE_OBJECTS = ("manifests/",)


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


class CachedStore(ForwardingObjectStore):
    """Metadata from the remote, sealed manifests read through the :class:`DiskCache`;
    the key audit log is kept locally beside the cache (a registry has no append)."""

    def __init__(self, remote: ObjectStore, cache: DiskCache):
        super().__init__(remote)
        self.remote = remote
        self.cache = cache

    def __repr__(self) -> str:
        return f"CachedStore({self.remote!r}, {self.cache!r})"

    def get(self, key: str) -> bytes:
        if key.startswith(IMMUTABLE_OBJECTS):
            data = self.cache.get(key)
            if data is None:
                data = self.remote.get(key)
                try:  # a sealed manifest is named by its digest: what does not match it is never cached
                    verify_bytes(data, "sha256:" + key.rsplit("/", 1)[-1], None, f"{self.remote!r}: object {key}")
                except DigestMismatch as e:
                    raise CorruptObject(str(e)) from None
                self.cache.put(key, data)
            return data
        return self.remote.get(key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if any(k.startswith(IMMUTABLE_OBJECTS) for k in keys):
            return super().get_many(keys)
        return self.remote.get_many(keys)

    def has(self, key: str) -> bool:
        if key.startswith(IMMUTABLE_OBJECTS) and self.cache.contains(key):
            return True
        return self.remote.has(key)

    def evict(self, key: str) -> None:
        self.cache.drop(key)

    def delete(self, key: str) -> None:
        self.evict(key)
        self.remote.delete(key)

    def append_line(self, key: str, line: str) -> None:
        append_line(os.path.join(self.cache.dir, key), line)
