"""A bounded local cache in front of a remote store (Lambda's worker cache).

Immutable objects (chunks and sealed manifests: their names are their
content) are read through a directory of files; everything mutable (catalog
entries, domains) always goes to the remote.  The cache survives restarts,
is bounded in bytes with LRU eviction (file mtime is the recency, touched on
every hit), and is safe with several processes: files appear by atomic
rename and eviction runs under an flock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from typing import Any

from .base import ObjectStore
from .local import append_line
from .packs import makedirs_private

IMMUTABLE = ("chunks/", "manifests/")


class CachedStore(ObjectStore):
    supports_ranges = True

    def __init__(self, remote: ObjectStore, cache_dir: str, max_bytes: int = 2 << 30):
        self.remote = remote
        self.dir = os.path.abspath(cache_dir)
        self.max_bytes = max_bytes
        self.supports_locking = remote.supports_locking
        self.supports_deletes = remote.supports_deletes
        makedirs_private(os.path.join(self.dir, "objects"))
        makedirs_private(os.path.join(self.dir, "tmp"))
        self._lock = threading.Lock()
        self._size = self._scan()
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"CachedStore({self.remote!r}, {self.dir!r})"

    def _path(self, key: str) -> str:
        h = hashlib.sha256(key.encode()).hexdigest()
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

    def _store_local(self, key: str, data: bytes) -> None:
        p = self._path(key)
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

    def get(self, key: str) -> bytes:
        if key.startswith(IMMUTABLE):
            p = self._path(key)
            try:
                with open(p, "rb") as f:
                    data = f.read()
                os.utime(p)
                self.hits += 1
                return data
            except FileNotFoundError:
                pass
            self.misses += 1
            data = self.remote.get(key)
            self._store_local(key, data)
            return data
        return self.remote.get(key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        missing = []
        for k in keys:
            p = self._path(k)
            if k.startswith(IMMUTABLE) and os.path.exists(p):
                out[k] = self.get(k)
            else:
                missing.append(k)
        for k, data in self.remote.get_many(missing).items():
            if k.startswith(IMMUTABLE):
                self.misses += 1
                self._store_local(k, data)
            out[k] = data
        return out

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.get(key)[start:end]

    def has(self, key: str) -> bool:
        if key.startswith(IMMUTABLE) and os.path.exists(self._path(key)):
            return True
        return self.remote.has(key)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> bool:
        return self.remote.put(key, data, durable=durable, exclusive=exclusive)

    def evict(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def delete(self, key: str) -> None:
        self.evict(key)
        self.remote.delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.remote.list(prefix)

    def size(self, key: str) -> int:
        return self.remote.size(key)

    def flush(self) -> None:
        self.remote.flush()

    def abort(self) -> None:
        self.remote.abort()

    def usage(self, prefix: str) -> int:
        return self.remote.usage(prefix)

    def cached_bytes(self) -> int:
        return self._size

    def lock(self, name: str, shared: bool = False) -> Any:
        return self.remote.lock(name, shared)

    def append_line(self, key: str, line: str) -> None:
        """Logs (the key audit) are kept locally, beside the cache."""
        append_line(os.path.join(self.dir, key), line)
