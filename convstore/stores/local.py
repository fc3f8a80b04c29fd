"""The embedded default store: a directory on a local filesystem.

Chunks live in pack files (:class:`~.packs.PackSet`, named ``LocalChunkStore`` here);
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
from collections.abc import Collection, Iterator

from ..errors import StoreError, TamperedObject
from .base import ObjectStore, check_key
from .faults import crash_point
from .fs import makedirs_private, open_dir_at
from .packs import PackSet


#: the chunk store of a local store: its pack files (:class:`~.packs.PackSet` is a ChunkStore)
LocalChunkStore = PackSet


class LocalStore(ObjectStore):
    """Objects as files under ``root``.

    Every path under the root is opened component by component relative to
    directory descriptors with ``O_NOFOLLOW``: a symlink planted anywhere in the
    store (say ``quarantine -> ~/.config/convstore``) is refused, never
    followed, so no read, write, delete, lock or log append can reach outside
    the store.  The root itself may be a symlink (the owner's choice)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        try:
            makedirs_private(self.root)
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            os.close(self._dir("tmp", create=True))
        except OSError as e:
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from None

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def __del__(self) -> None:
        fd = getattr(self, "_root_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def _dir(self, rel: str, create: bool = False) -> int:
        """A descriptor of the folder ``rel`` under the root, opened without
        following any symlink (FileNotFoundError if absent and not ``create``)."""
        return open_dir_at(os.dup(self._root_fd), rel, create=create, where=self.root)

    def _split(self, key: str) -> tuple[str, str]:
        d, _, name = check_key(key).rpartition("/")
        return d, name

    def _open(self, key: str, flags: int, mode: int = 0o600, create_dir: bool = False) -> int:
        d, name = self._split(key)
        dfd = self._dir(d, create=create_dir)
        try:
            return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:  # planted in the store: this object's problem, not the store's
                raise TamperedObject(f"store object {key} is a symlink; refusing to follow it") from None
            raise
        finally:
            os.close(dfd)

    def get(self, key: str) -> bytes:
        try:
            fd = self._open(key, os.O_RDONLY)
        except FileNotFoundError:
            raise KeyError(key) from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def has(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except KeyError:
            return False

    def size(self, key: str) -> int:
        d, name = self._split(key)
        try:
            dfd = self._dir(d)
            try:
                return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size
            finally:
                os.close(dfd)
        except FileNotFoundError:
            raise KeyError(key) from None

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        d, name = self._split(key)
        dfd = self._dir(d, create=True)
        tfd = self._dir("tmp", create=True)
        try:
            crash_point()
            tmp = f"{os.getpid()}.{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=tfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp, dir_fd=tfd)
                raise
            os.close(fd)
            crash_point()
            try:
                if exclusive:
                    try:
                        os.link(tmp, name, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
                    except FileExistsError:
                        return False
                    finally:
                        os.unlink(tmp, dir_fd=tfd)
                else:
                    os.rename(tmp, name, src_dir_fd=tfd, dst_dir_fd=dfd)
            except OSError as e:
                try:
                    os.unlink(tmp, dir_fd=tfd)
                except FileNotFoundError:
                    pass
                raise StoreError(f"cannot write {key}: {e.strerror}") from None
            crash_point()
            if durable:
                os.fsync(dfd)
            return True
        finally:
            os.close(dfd)
            os.close(tfd)

    def flush(self) -> None:
        """Non-durable puts (layer-index hints) are fsynced by the directory's
        next durable write; nothing is buffered here."""

    def append_line(self, key: str, line: str) -> None:
        """One ``write`` with O_APPEND: lines from several processes never interleave."""
        try:
            fd = self._open(key, os.O_WRONLY | os.O_APPEND | os.O_CREAT, create_dir=True)
        except TamperedObject as e:  # the store's log, not one entry's problem
            raise StoreError(str(e)) from None
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode())
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """``flock`` on ``locks/<name>``: released if the process dies."""
        try:
            fd = self._open(f"locks/{name}", os.O_RDWR | os.O_CREAT, create_dir=True)
        except TamperedObject as e:
            raise StoreError(str(e)) from None
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
            d, name = self._split(k)
            try:
                dfd = self._dir(d)
            except FileNotFoundError:
                continue
            try:
                os.unlink(name, dir_fd=dfd)  # a symlink is removed itself, never its target
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)

    def _walk(self, prefix: str) -> Iterator[tuple[str, str, int]]:
        """(relative folder, file name, folder fd) of every file under ``prefix``, following no symlink."""
        prefix = prefix.strip("/")
        try:
            top = self._dir(prefix)
        except FileNotFoundError:
            return
        try:
            for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                rel = os.path.normpath(os.path.join(prefix, dirpath))
                for f in files:
                    yield rel, f, dfd
        finally:
            os.close(top)

    def list(self, prefix: str) -> Iterator[str]:
        for rel, f, _dfd in self._walk(prefix):
            yield f"{rel}/{f}".replace(os.sep, "/")

    def usage(self, prefix: str) -> int:
        total = 0
        for _rel, f, dfd in self._walk(prefix):
            try:
                total += os.stat(f, dir_fd=dfd, follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
        return total
