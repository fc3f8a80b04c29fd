"""Pack files: many chunk blobs in one file, found through a sorted index.

Why: creating a file costs ~170 us on this machine's ext4 (measured in
docs/benchmarks.md), so one file per chunk made cold packing file-system
bound.  Chunks are appended to a pack in ``tmp/``; when the pack reaches its
target size or the writer flushes, the pack is fsynced and renamed into
``packs/``, then its index is written, fsynced and renamed beside it.  The
index is the commit point: a pack without an index is invisible, so a crash
leaves only unreferenced temporary files.

Formats (version 1, little-endian, see docs/format.md)::

    NAME.pack  b"CSPACK\\0\\0" | u32 version | blobs...
    NAME.idx   b"CSIDX\\0\\0\\0" | u32 version | u32 count
               | count x (cid 32 | u64 offset | u32 length), sorted by cid
               | blake3 of everything before (32)
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterable, Iterator

from blake3 import blake3

from ..errors import StoreError, StoreFormatError
from .faults import crash_point

log = logging.getLogger(__name__)

PACK_MAGIC = b"CSPACK\0\0"
IDX_MAGIC = b"CSIDX\0\0\0"
VERSION = 1
_HEAD = struct.Struct("<8sI")
_IDX_HEAD = struct.Struct("<8sII")
_ENTRY = struct.Struct("<32sQI")
DEFAULT_TARGET = 128 << 20


def encode_index(entries: dict[bytes, tuple[int, int]]) -> bytes:
    body = _IDX_HEAD.pack(IDX_MAGIC, VERSION, len(entries)) + b"".join(
        _ENTRY.pack(cid, off, ln) for cid, (off, ln) in sorted(entries.items()))
    return body + blake3(body).digest()


def decode_index(data: bytes, what: str) -> list[tuple[bytes, int, int]]:
    if len(data) < _IDX_HEAD.size + 32:
        raise StoreError(f"{what}: truncated pack index")
    magic, version, count = _IDX_HEAD.unpack_from(data)
    if magic != IDX_MAGIC:
        raise StoreError(f"{what}: not a pack index")
    if version != VERSION:
        raise StoreFormatError(f"{what}: pack index version {version} is not supported")
    body, check = data[:-32], data[-32:]
    if len(body) != _IDX_HEAD.size + count * _ENTRY.size or not hmac.compare_digest(blake3(body).digest(), check):
        raise StoreError(f"{what}: pack index is corrupt")
    return [_ENTRY.unpack_from(body, _IDX_HEAD.size + i * _ENTRY.size) for i in range(count)]


def makedirs_private(d: str) -> None:
    """``os.makedirs`` with every directory it creates 0700 (store objects are
    not for other users, whatever the umask)."""
    if os.path.isdir(d):
        return
    parent = os.path.dirname(d)
    if parent and parent != d:
        makedirs_private(parent)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass


def open_dir_at(fd: int, rel: str, *, create: bool, where: str) -> int:
    """Walk ``rel`` from the folder descriptor ``fd`` (which this takes over)
    component by component with ``O_NOFOLLOW``, creating missing folders 0700
    if ``create`` (else FileNotFoundError): a symlink planted in a store is
    refused, never followed.  ``where`` names the root in the error."""
    try:
        for part in filter(None, rel.split("/")):
            if create:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StoreError(f"{os.path.join(where, rel)}: a store folder is a symlink or not a folder; "
                                     f"refusing to follow it") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_dir(root: str, rel: str) -> int:
    """A descriptor of ``root/rel`` (created 0700 as needed), opened without
    following symlinks.  Work relative to it, so that a folder swapped later
    changes nothing."""
    makedirs_private(root)
    return open_dir_at(os.open(root, os.O_RDONLY | os.O_DIRECTORY), rel, create=True, where=root)


def open_regular(name: str, dir_fd: int) -> int | None:
    """A read-only descriptor of the regular file ``name`` in ``dir_fd``; None
    if it is a symlink, a FIFO, a device or a folder (planted, never followed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class _Writer:
    """One pack being filled in ``tmp/``."""

    def __init__(self, tmp_fd: int):
        self.name = secrets.token_hex(16)
        self.tmp_fd = tmp_fd
        self.fd = os.open(self.name + ".pack", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                          dir_fd=tmp_fd)
        head = _HEAD.pack(PACK_MAGIC, VERSION)
        os.write(self.fd, head)
        self.size = len(head)
        self.entries: dict[bytes, tuple[int, int]] = {}

    def append(self, cid: bytes, blob: bytes) -> None:
        crash_point()
        view = memoryview(blob)
        off = self.size
        while view:
            view = view[os.pwrite(self.fd, view, off + len(blob) - len(view)):]
        self.entries[cid] = (off, len(blob))
        self.size += len(blob)

    def read(self, off: int, ln: int) -> bytes:
        return os.pread(self.fd, ln, off)

    def abort(self) -> None:
        os.close(self.fd)
        try:
            os.unlink(self.name + ".pack", dir_fd=self.tmp_fd)
        except FileNotFoundError:
            pass


class PackSet:
    """The chunk area of a local store.  Thread-safe; several processes may
    write at once (each writes its own packs)."""

    def __init__(self, root: str, target_size: int = DEFAULT_TARGET):
        self.dir = os.path.join(root, "packs")
        self.target = target_size
        # every file operation is relative to these two descriptors (no path is followed again)
        self._dfd = open_dir(root, "packs")
        self._tfd = open_dir(root, "tmp")
        self._lock = threading.RLock()
        self._index: dict[bytes, tuple[str, int, int]] = {}
        self._loaded: set[str] = set()
        self._w: _Writer | None = None
        self._fds: dict[str, int] = {}  # open packs, for pread without an open() per chunk
        self._retired: list[int] = []
        self.refresh()

    # -- index --------------------------------------------------------------
    def refresh(self) -> None:
        """Load indexes written since the last look (by us or other processes);
        rebuild from scratch if any index we knew has gone (a repack)."""
        with self._lock:
            names = {n for n in os.listdir(self._dfd) if n.endswith(".idx")}
            if self._loaded - names:
                self._index.clear()
                self._loaded.clear()
            for n in sorted(names - self._loaded):
                self._load(n)

    def _load(self, idx_name: str) -> None:
        path = os.path.join(self.dir, idx_name)
        try:
            fd = open_regular(idx_name, self._dfd)
            if fd is None:
                log.warning("skipping %s: not a regular file", path)
                return
            with os.fdopen(fd, "rb") as f:
                entries = decode_index(f.read(), path)
        except FileNotFoundError:
            return
        except StoreError as e:
            log.warning("skipping %s", e)
            return
        pack = idx_name[:-4]
        for cid, off, ln in entries:
            self._index.setdefault(cid, (pack, off, ln))
        self._loaded.add(idx_name)

    def _locate(self, cid: bytes) -> tuple[str | None, int, int] | None:
        loc = self._index.get(cid)
        if loc is not None:
            return loc
        w = self._w
        if w is not None and cid in w.entries:
            off, ln = w.entries[cid]
            return None, off, ln
        return None

    # -- object API -----------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        with self._lock:
            return self._locate(cid) is not None

    def get(self, cid: bytes) -> bytes:
        for attempt in (0, 1):
            with self._lock:
                loc = self._locate(cid)
                if loc is not None and loc[0] is None:
                    assert self._w is not None
                    return self._w.read(loc[1], loc[2])
            if loc is None:
                if attempt == 0:
                    self.refresh()
                    continue
                raise KeyError(cid.hex())
            pack, off, ln = loc
            assert pack is not None  # an unpublished chunk was returned above
            try:
                data = os.pread(self._fd(pack), ln, off)
            except FileNotFoundError:
                self.refresh()  # repacked by another process: look again
                continue
            if len(data) != ln:
                raise StoreError(f"pack {pack} is truncated")
            return data
        raise KeyError(cid.hex())

    def _fd(self, pack: str) -> int:
        """An open fd of a live pack; FileNotFoundError once the pack has been
        rewritten away (by gc in this or another process)."""
        fd = self._fds.get(pack)
        if fd is not None and os.fstat(fd).st_nlink == 0:
            with self._lock:  # retired, not closed: another thread may be reading with it
                if self._fds.get(pack) == fd:
                    self._retired.append(self._fds.pop(pack))
            raise FileNotFoundError(pack)
        if fd is None:
            opened = open_regular(pack + ".pack", self._dfd)
            if opened is None:
                raise StoreError(f"pack {pack} is not a regular file")
            new = opened
            with self._lock:
                fd = self._fds.setdefault(pack, new)
            if fd != new:
                os.close(new)
        return fd

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        with self._lock:
            fds = [*self._fds.values(), *self._retired, self._dfd, self._tfd]
            self._fds, self._retired = {}, []
            self._dfd = self._tfd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def put(self, cid: bytes, blob: bytes) -> None:
        with self._lock:
            if self._locate(cid) is not None:
                return
            if self._w is None:
                self._w = _Writer(self._tfd)
            self._w.append(cid, blob)
            if self._w.size >= self.target:
                self._finish(durable=True)

    def flush(self, durable: bool = True) -> None:
        """Publish the pack being written (fsynced when ``durable``)."""
        with self._lock:
            if self._w is not None:
                self._finish(durable)

    def _finish(self, durable: bool) -> None:
        w = self._w
        assert w is not None
        self._w = None
        if not w.entries:
            w.abort()
            return
        try:
            if durable:
                os.fsync(w.fd)
            os.close(w.fd)
            crash_point()
            os.rename(w.name + ".pack", w.name + ".pack", src_dir_fd=self._tfd, dst_dir_fd=self._dfd)
            crash_point()
            idx_tmp = w.name + ".idx"
            with os.fdopen(os.open(idx_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600,
                                   dir_fd=self._tfd), "wb") as f:
                f.write(encode_index(w.entries))
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            crash_point()
            os.rename(idx_tmp, idx_tmp, src_dir_fd=self._tfd, dst_dir_fd=self._dfd)
            crash_point()
            if durable:
                os.fsync(self._dfd)
        except OSError as e:
            raise StoreError(f"cannot write pack {w.name}: {e.strerror}") from None
        for cid, (off, ln) in w.entries.items():
            self._index.setdefault(cid, (w.name, off, ln))
        self._loaded.add(w.name + ".idx")

    def abort(self) -> None:
        """Drop the pack being written (its chunks were never published)."""
        with self._lock:
            if self._w is not None:
                self._w.abort()
                self._w = None

    def cids(self) -> Iterator[bytes]:
        self.refresh()
        with self._lock:
            return iter(list(self._index))

    def usage(self) -> int:
        total = 0
        for n in os.listdir(self._dfd):
            try:
                total += os.stat(n, dir_fd=self._dfd, follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
        return total

    def clean_leftovers(self, grace: float) -> int:
        """Remove files in ``tmp/`` left by writers that died, and packs whose
        index never appeared, both older than ``grace`` seconds."""
        now = time.time()

        def unlink_if_old(name: str, dfd: int) -> int:
            try:
                if now - os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime > grace:
                    os.unlink(name, dir_fd=dfd)
                    return 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
            return 0

        n = sum(unlink_if_old(name, self._tfd) for name in os.listdir(self._tfd))
        names = set(os.listdir(self._dfd))
        n += sum(unlink_if_old(name, self._dfd) for name in names
                 if name.endswith(".pack") and name[:-5] + ".idx" not in names)
        return n

    def delete(self, cids: Iterable[bytes]) -> None:
        """Remove chunks by rewriting the packs that hold them."""
        self.refresh()
        with self._lock:
            self.flush()
            doomed = set(cids)
            packs: dict[str, list[tuple[bytes, int, int]]] = {}
            for cid, (pack, off, ln) in self._index.items():
                packs.setdefault(pack, []).append((cid, off, ln))
            for pack, entries in packs.items():
                if not any(cid in doomed for cid, _o, _l in entries):
                    continue
                src = open_regular(pack + ".pack", self._dfd)
                if src is None:
                    raise StoreError(f"pack {pack} is not a regular file")
                try:
                    for cid, off, ln in entries:
                        if cid not in doomed:
                            blob = os.pread(src, ln, off)
                            if self._w is None:
                                self._w = _Writer(self._tfd)
                            self._w.append(cid, blob)
                finally:
                    os.close(src)
                self.flush()
                crash_point()
                os.unlink(pack + ".idx", dir_fd=self._dfd)  # unpublish first
                crash_point()
                os.unlink(pack + ".pack", dir_fd=self._dfd)
                if pack in self._fds:
                    self._retired.append(self._fds.pop(pack))
                os.fsync(self._dfd)
            self._index.clear()
            self._loaded.clear()
        self.refresh()
