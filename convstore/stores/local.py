"""The embedded default store: a directory on a local filesystem.

Chunks live in pack files (:class:`LocalChunkStore` over :mod:`.packs`);
every other object is one file (:class:`LocalStore`).  Atomicity: each file is written to ``tmp/`` and
renamed into place.  Durability: a durable put fsyncs the file, renames, and
fsyncs the directory; chunk puts are made durable when their pack is
published, at the latest at ``flush``, before anything that references them
is written.  Several processes may write at once: each writes its own packs,
and other objects are replaced atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator

from ..errors import StoreError
from .base import ChunkStore, ObjectStore
from .faults import crash_point
from .packs import PackSet, fsync_dir, makedirs_private

def append_line(path: str, line: str) -> None:
    """One ``write`` with O_APPEND: lines from several processes never interleave."""
    makedirs_private(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)


def _valid_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise StoreError(f"invalid object key {key!r}")
    return key


class LocalChunkStore(ChunkStore):
    """Chunks in the pack files of a local store (``ROOT/packs``)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        tmp = os.path.join(self.root, "tmp")
        try:
            makedirs_private(tmp)
        except OSError as e:
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from None
        self.packs = PackSet(self.root, tmp)

    def __repr__(self) -> str:
        return f"LocalChunkStore({self.root!r})"

    def has(self, cid: bytes) -> bool:
        return self.packs.has(cid)

    def get(self, cid: bytes) -> bytes:
        return self.packs.get(cid)

    def put(self, cid: bytes, blob: bytes) -> None:
        self.packs.put(cid, blob)

    def flush(self) -> None:
        """Publish (durably) the pack being written."""
        self.packs.flush()

    def abort(self) -> None:
        self.packs.abort()

    def delete(self, cids: list[bytes]) -> None:
        if cids:
            self.packs.delete(cids)

    def ids(self) -> Iterator[bytes]:
        return self.packs.cids()

    def size(self, cid: bytes) -> int:
        return len(self.packs.get(cid))

    def usage(self) -> int:
        return self.packs.usage()


class LocalStore(ObjectStore):
    """Objects as files under ``root``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._tmp = os.path.join(self.root, "tmp")
        try:
            makedirs_private(self._tmp)
        except OSError as e:
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from None
        self._made_dirs: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def path(self, key: str) -> str:
        return os.path.join(self.root, _valid_key(key))

    def get(self, key: str) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    def has(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def size(self, key: str) -> int:
        try:
            return os.stat(self.path(key)).st_size
        except FileNotFoundError:
            raise KeyError(key) from None

    def _ensure_dir(self, d: str) -> None:
        if d in self._made_dirs:
            return
        makedirs_private(d)
        with self._lock:
            self._made_dirs.add(d)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> bool:
        final = self.path(key)
        self._ensure_dir(os.path.dirname(final))
        crash_point()
        tmp = os.path.join(self._tmp, f"{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        crash_point()
        try:
            if exclusive:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.rename(tmp, final)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise StoreError(f"cannot write {key}: {e.strerror}") from None
        crash_point()
        if durable:
            fsync_dir(os.path.dirname(final))
        return True

    def flush(self) -> None:
        """Non-durable puts (layer-index hints) are fsynced by the directory's
        next durable write; nothing is buffered here."""

    def append_line(self, key: str, line: str) -> None:
        append_line(self.path(key), line)

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """``flock`` on ``locks/<name>``: released if the process dies."""
        d = os.path.join(self.root, "locks")
        makedirs_private(d)
        fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: list[str]) -> None:
        for k in keys:
            crash_point()
            try:
                os.unlink(self.path(k))
            except FileNotFoundError:
                pass

    def list(self, prefix: str) -> Iterator[str]:
        base = os.path.join(self.root, prefix.rstrip("/"))
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                yield f"{rel}/{f}".replace(os.sep, "/")

    def usage(self, prefix: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(os.path.join(self.root, prefix)):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
        return total
