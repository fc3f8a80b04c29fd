"""The embedded default store: a directory on a local filesystem.

Atomicity: each object is written to ``tmp/`` and renamed into place.
Durability: a durable put fsyncs the file, renames, and fsyncs the directory;
non-durable puts (chunks) are made durable in one ``syncfs`` at ``flush``
time, before anything that references them is published.  Several processes
may write at once: chunk names are content addresses, so two writers of one
chunk rename equivalent bytes over each other.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
from collections.abc import Iterator

from ..errors import StoreError
from .base import ObjectStore

_libc = ctypes.CDLL(None, use_errno=True)


def _fanout(key: str) -> str:
    """``chunks/abcdef..`` -> ``chunks/ab/abcdef..`` (256 subdirectories)."""
    if key.startswith("chunks/"):
        name = key[7:]
        return f"chunks/{name[:2]}/{name}"
    return key


def _valid_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise StoreError(f"invalid object key {key!r}")
    return key


class LocalStore(ObjectStore):
    """Objects as files under ``root``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._tmp = os.path.join(self.root, "tmp")
        try:
            os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from None
        self._made_dirs: set[str] = set()
        self._lock = threading.Lock()
        self._dirty = False

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def path(self, key: str) -> str:
        return os.path.join(self.root, _fanout(_valid_key(key)))

    def get(self, key: str) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                return os.pread(f.fileno(), end - start, start)
        except FileNotFoundError:
            raise KeyError(key) from None

    supports_ranges = True

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
        os.makedirs(d, exist_ok=True)
        with self._lock:
            self._made_dirs.add(d)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> bool:
        final = self.path(key)
        self._ensure_dir(os.path.dirname(final))
        tmp = os.path.join(self._tmp, f"{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
        if durable:
            self._fsync_dir(os.path.dirname(final))
        else:
            self._dirty = True
        return True

    @staticmethod
    def _fsync_dir(d: str) -> None:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def flush(self) -> None:
        """One ``syncfs`` makes every earlier write on this filesystem durable."""
        if not self._dirty:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StoreError(f"syncfs on {self.root} failed: {os.strerror(err)}")
        finally:
            os.close(fd)
        self._dirty = False

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> Iterator[str]:
        base = os.path.join(self.root, prefix.rstrip("/"))
        chunks = prefix.rstrip("/") == "chunks"
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                if chunks:
                    yield "chunks/" + f
                else:
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
