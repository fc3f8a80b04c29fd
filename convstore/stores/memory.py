"""In-memory backends (zarr v3's ``MemoryStore`` is the model): a chunk store
and an object store held in dicts, for tests and for a store built in memory.
They keep the contract of the local backends -- buffered chunk puts visible
after ``flush``, immutable containers behind location hints, exclusive puts,
shared and exclusive locks, append-only logs -- within one process, and lose
everything with it."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Collection, Iterator

from .base import ChunkStore, Location, ObjectStore, check_key


class MemoryChunkStore(ChunkStore):
    """Chunks in memory.  Each flush publishes the pending chunks as one
    immutable container (a 16-byte name, like a local pack): a location hint
    names it, and a delete rewrites the containers that held the chunks."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._containers: dict[bytes, bytes] = {}
        self._where: dict[bytes, tuple[bytes, int, int]] = {}  # cid -> (container, offset, length)
        self._pending: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"MemoryChunkStore({len(self._where)} chunks)"

    def has(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._where or cid in self._pending

    def holds(self, hint: Location) -> bool:
        with self._lock:
            return hint[0] in self._containers

    def locate(self, cid: bytes) -> Location | None:
        with self._lock:
            return self._where.get(cid)

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        with self._lock:
            if hint is not None:
                data = self._containers.get(hint[0])
                if data is not None and 0 <= hint[1] and hint[1] + hint[2] <= len(data):
                    return data[hint[1] : hint[1] + hint[2]]
            if cid in self._pending:
                return self._pending[cid]
            loc = self._where.get(cid)
            if loc is None:
                raise KeyError(cid.hex())
            return self._containers[loc[0]][loc[1] : loc[1] + loc[2]]

    def put(self, cid: bytes, blob: bytes) -> None:
        with self._lock:
            if cid not in self._where:
                self._pending.setdefault(cid, bytes(blob))

    def _publish(self, blobs: dict[bytes, bytes]) -> None:
        if not blobs:
            return
        name = secrets.token_bytes(16)
        parts, off = [], 0
        for cid, blob in blobs.items():
            self._where[cid] = (name, off, len(blob))
            parts.append(blob)
            off += len(blob)
        self._containers[name] = b"".join(parts)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._publish(pending)

    def abort(self) -> None:
        with self._lock:
            self._pending.clear()

    def delete(self, cids: list[bytes]) -> None:
        if not cids:
            return
        with self._lock:
            self.flush()
            doomed = set(cids)
            for name in {self._where[c][0] for c in doomed if c in self._where}:
                data = self._containers.pop(name)
                keep = {c: data[o : o + n] for c, (cn, o, n) in self._where.items() if cn == name and c not in doomed}
                for c in doomed:
                    self._where.pop(c, None)
                self._publish(keep)

    def ids(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._where))

    def entries(self) -> Iterator[tuple[bytes, int]]:
        with self._lock:
            return iter([(c, n) for c, (_p, _o, n) in self._where.items()])

    def size(self, cid: bytes) -> int:
        with self._lock:
            loc = self._where.get(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return loc[2]

    def usage(self) -> int:
        with self._lock:
            return sum(len(d) for d in self._containers.values())


class _RWLock:
    """Shared holders together, or one exclusive holder."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def hold(self, shared: bool) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and (shared or not self._readers))
            if shared:
                self._readers += 1
            else:
                self._writer = True
        try:
            yield
        finally:
            with self._cond:
                if shared:
                    self._readers -= 1
                else:
                    self._writer = False
                self._cond.notify_all()


class MemoryStore(ObjectStore):
    """Objects in a dict (keys checked like a local store's).  Locks hold
    between threads of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, bytes] = {}
        self._locks: dict[str, _RWLock] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._objects)} objects)"

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[check_key(key)]
            except KeyError:
                raise KeyError(key) from None

    def has(self, key: str) -> bool:
        with self._lock:
            return check_key(key) in self._objects

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        with self._lock:
            if exclusive and check_key(key) in self._objects:
                return False
            self._objects[check_key(key)] = bytes(data)
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)

    def list(self, prefix: str) -> Iterator[str]:
        p = prefix.strip("/")
        with self._lock:
            keys = [k for k in self._objects if not p or k.startswith(p + "/")]
        return iter(keys)

    def size(self, key: str) -> int:
        return len(self.get(key))

    def lock(self, name: str, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        with self._lock:
            lk = self._locks.setdefault(check_key(f"locks/{name}"), _RWLock())
        return lk.hold(shared)

    def append_line(self, key: str, line: str) -> None:
        with self._lock:
            k = check_key(key)
            self._objects[k] = self._objects.get(k, b"") + (line.replace("\n", " ") + "\n").encode()
