"""A low-level FUSE server for an :class:`ImageFS`, speaking the kernel protocol on ``/dev/fuse``.

Why not libfuse (mfusepy): its high-level layer numbers the kernel's nodes
itself, so a new process cannot answer for the nodeids the kernel already
holds, and libfuse 3.14 has neither passthrough nor fd takeover; every
open/flush/release is a round trip into Python too.  Here:

* **nodeid = the image tree's inode number** (:attr:`Node.ino`, the same
  in every process for the same manifest), so a successor process serves
  the kernel's existing nodes (failover, :mod:`.fdholder`);
* **no open/opendir**: OPEN and OPENDIR answer ENOSYS, so the kernel
  stops sending them (and RELEASE/FLUSH) and opens every file with
  FOPEN_KEEP_CACHE and every directory with FOPEN_CACHE_DIR
  (fs/fuse/file.c ``fuse_file_open``: "Default for no-open"): a warm tree
  is read from the page cache with no round trip per open;
* hour-long (here: a day) entry/attribute/negative-entry timeouts, READDIRPLUS,
  cached symlinks: the image never changes under a mount;
* several threads read the same fd (the kernel hands each request to one
  reader); a read of a chunk still on the network blocks only its thread.

The kernel structures (linux/uapi ``fuse.h``) are packed by hand below;
only the operations a read-only tree needs are answered, the rest ENOSYS.

:class:`PathServer` serves path callbacks (the layer store's tree) the same
way, its nodeids journaled to the session holder for a successor.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..errors import ConvstoreError, FuseSessionError, KernelFuseError
from .imagefs import ImageFS, Node

log = logging.getLogger(__name__)

# -- protocol constants (include/uapi/linux/fuse.h) ----------------------------
KERNEL_VERSION = 7
KERNEL_MINOR = 40  # what this server implements (struct sizes below are those of 7.23+)
ROOT_ID = 1

LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
MKDIR, UNLINK, RMDIR = 9, 10, 11
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
CREATE = 35
GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 23, 25, 26, 27, 28, 29
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS = 34, 36, 38, 42, 44

ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39  # FUSE_NOTIFY_RESEND: a successor asks for the requests its predecessor had taken

FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5

NOTIFY_RESEND = 7

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime a/m/ctimensec mode nlink uid gid rdev blksize flags
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 with INIT_EXT)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... flags2 max_stack_depth unused: 64 bytes
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner flags padding follow)
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
DIRENT = struct.Struct("<QQII")  # ino off namelen type
FORGET_ONE = struct.Struct("<QQ")

#: entries, attributes and negative entries stay valid this long: an image never changes under its mount
TIMEOUT = 24 * 3600
BUFFER = (1 << 20) + 4096  # max_pages 256 (1 MiB) reads and writes plus the headers
MAX_WRITE = 1 << 20
THREADS = 8

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


@dataclass
class Negotiated:
    """What INIT agreed on: a successor serving the same connection needs it (it gets no INIT)."""

    major: int
    minor: int
    flags: int  # the flags this server answered with (64 bits)
    max_readahead: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Negotiated:
        return cls(int(d["major"]), int(d["minor"]), int(d["flags"]), int(d["max_readahead"]))


def available() -> bool:
    """Whether this process can mount with the low-level server (root and /dev/fuse)."""
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and os.environ.get("CONVSTORE_FUSE") != "libfuse"


_libc = ctypes.CDLL(None, use_errno=True)  # libc, already loaded (find_library would run ldconfig)


def mount_fd(mountpoint: str, fd: int, read_only: bool = True) -> None:
    """mount(2) a FUSE filesystem served on ``fd`` at ``mountpoint`` (for every user, permissions checked
    by the kernel from the image's modes)."""
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions".encode()
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    if _libc.mount(b"convstore", os.fsencode(mountpoint), b"fuse.convstore", flags, data) != 0:
        e = ctypes.get_errno()
        raise KernelFuseError(f"cannot mount FUSE at {mountpoint}: {os.strerror(e)}")


def umount(mountpoint: str, lazy: bool = True) -> bool:
    return _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) == 0


def _attr(n: Node, nlink: int) -> bytes:
    s, ns = divmod(n.mtime_ns, 1_000_000_000)
    return ATTR.pack(n.ino, n.size, (n.size + 511) // 512, s, s, s, ns, ns, ns, n.mode, nlink, n.uid, n.gid,
                     n.rdev & 0xFFFFFFFF, 4096, 0)


class KernelServer:
    """Serves one :class:`ImageFS` on one ``/dev/fuse`` connection.

    ``negotiated``: given when taking over a connection whose INIT another
    process answered; then the requests the kernel had handed to that
    process are asked for again (FUSE_NOTIFY_RESEND) once serving starts.
    ``counters``: an object with ``read_calls``/``read_bytes``/``ready`` (the
    :class:`ImageOperations` of the libfuse path), kept up to date."""

    #: the INIT flags this server asks for (those the kernel offers)
    WANT = (ASYNC_READ | BIG_WRITES | DO_READDIRPLUS | READDIRPLUS_AUTO | PARALLEL_DIROPS | MAX_PAGES
            | CACHE_SYMLINKS | INIT_EXT | HAS_RESEND)

    def __init__(self, fs: ImageFS | None, fd: int, *, counters: Any = None, negotiated: Negotiated | None = None,
                 on_init: Callable[[Negotiated], None] | None = None):
        self.fs: ImageFS = fs  # type: ignore[assignment]  # None only in PathServer
        self.fd = fd
        self.counters = counters
        self.negotiated = negotiated
        self.on_init = on_init
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.ops: dict[int, int] = {}  # opcode -> count (profiling, the benchmark)
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {}
        self._parent: dict[int, int] = {}
        self._nlink: dict[int, int] = {}
        self._dirs: dict[int, list[tuple[bytes, Node | None, int]]] = {}
        self._prefetched: set[int] = set()
        self._threads: list[threading.Thread] = []
        self.journal: Any = None  # the connection to the session holder, while one keeps the session
        if fs is not None:
            self._index()

    # -- the tree by nodeid ---------------------------------------------------
    def _index(self) -> None:
        root = self.fs.root
        if root.ino != ROOT_ID:
            raise KernelFuseError(f"the image tree's root is inode {root.ino}, not {ROOT_ID}")
        self._nodes[root.ino] = root
        self._parent[root.ino] = root.ino
        todo = [root]
        while todo:
            d = todo.pop()
            assert d.children is not None
            subdirs = 0
            for c in d.children.values():
                if c.ino not in self._nodes:
                    self._nodes[c.ino] = c
                    if c.is_dir:
                        self._parent[c.ino] = d.ino
                        todo.append(c)
                subdirs += c.is_dir
            self._nlink[d.ino] = 2 + subdirs

    def _entries(self, d: Node) -> list[tuple[bytes, Node | None, int]]:
        got = self._dirs.get(d.ino)
        if got is None:
            assert d.children is not None
            got = [(b".", None, d.ino), (b"..", None, self._parent[d.ino])]
            got += [(os.fsencode(name), c, c.ino) for name, c in d.children.items()]
            self._dirs[d.ino] = got
        return got

    def _entry(self, n: Node) -> bytes:
        return ENTRY_HEAD.pack(n.ino, 0, TIMEOUT, TIMEOUT, 0, 0) + _attr(n, self._nlink.get(n.ino, n.nlink))

    # -- the loop -------------------------------------------------------------
    def start(self, threads: int = THREADS) -> None:
        if self.negotiated is not None:
            self.ready.set()
            if self.counters is not None:
                self.counters.ready.set()
        for i in range(threads):
            t = threading.Thread(target=self._loop, name=f"convstore-kfuse-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.negotiated is not None and self.negotiated.flags & HAS_RESEND:
            self._write(OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))

    def wait(self, timeout: float | None = None) -> bool:
        """Until the connection ends (unmounted, aborted); whether it did."""
        return self.stopped.wait(timeout)

    def _loop(self) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = os.readv(self.fd, [buf])
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse failed: %s", e)
                    return
                if n == 0:
                    return
                self._dispatch(view[:n])
        finally:
            self.stopped.set()

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError as e:
            # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("writing to /dev/fuse failed: %s (reply %s, %d bytes, op %s)", e,
                          OUT_HEADER.unpack_from(data), len(data), getattr(_tl, "op", None))

    def _reply(self, unique: int, payload: bytes = b"") -> None:
        self._write(OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload)

    def _error(self, unique: int, err: int) -> None:
        self._write(OUT_HEADER.pack(OUT_HEADER.size, -err, unique))

    def _dispatch(self, req: memoryview) -> None:
        _len, op, unique, nodeid, _uid, _gid, _pid, _ext, _pad = IN_HEADER.unpack_from(req)
        _tl.op = op
        body = req[IN_HEADER.size:]
        with self._lock:
            self.ops[op] = self.ops.get(op, 0) + 1
        if op in (FORGET, BATCH_FORGET, INTERRUPT):
            return  # no reply: the tree's nodes live as long as the server, nothing to count down or cancel
        try:
            handler = self._handlers.get(op)
            if handler is None:
                self._error(unique, errno.ENOSYS)
                return
            handler(self, unique, nodeid, body)
        except _Errno as e:
            self._error(unique, e.errno)
        except Exception as e:  # never let a bug take the mount down
            log.exception("FUSE operation %d on node %d failed: %s", op, nodeid, e)
            self._error(unique, errno.EIO)

    def _node(self, nodeid: int) -> Node:
        n = self._nodes.get(nodeid)
        if n is None:
            raise _Errno(errno.ESTALE)
        return n

    # -- operations -----------------------------------------------------------
    def _init(self, unique: int, nodeid: int, body: memoryview) -> None:
        major, minor, max_readahead, kflags = INIT_IN.unpack_from(body)
        if major != KERNEL_VERSION:
            log.error("the kernel speaks FUSE %d.%d, this server %d.%d", major, minor, KERNEL_VERSION, KERNEL_MINOR)
            self._error(unique, errno.EPROTO)
            return
        if kflags & INIT_EXT and len(body) >= INIT_IN.size + 4:
            kflags |= struct.unpack_from("<I", body, INIT_IN.size)[0] << 32
        flags = kflags & self.WANT
        neg = Negotiated(KERNEL_VERSION, min(minor, KERNEL_MINOR), flags, max_readahead)
        self._reply(unique, INIT_OUT.pack(neg.major, neg.minor, max_readahead, flags & 0xFFFFFFFF, 64, 48,
                                          MAX_WRITE, 1, MAX_WRITE // 4096, 0, flags >> 32, 0))
        self.negotiated = neg
        if self.on_init is not None:
            self.on_init(neg)
        self.ready.set()
        if self.counters is not None:
            self.counters.ready.set()

    def _lookup(self, unique: int, nodeid: int, body: memoryview) -> None:
        parent = self._node(nodeid)
        if parent.children is None:
            raise _Errno(errno.ENOTDIR)
        name = bytes(body).split(b"\0", 1)[0]
        c = parent.children.get(os.fsdecode(name))
        if c is None:  # a negative entry the kernel keeps for as long
            self._reply(unique, ENTRY_HEAD.pack(0, 0, TIMEOUT, 0, 0, 0) + bytes(ATTR.size))
            return
        self._reply(unique, self._entry(c))

    def _getattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        n = self._node(nodeid)
        self._reply(unique, ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + _attr(n, self._nlink.get(n.ino, n.nlink)))

    def _readlink(self, unique: int, nodeid: int, body: memoryview) -> None:
        n = self._node(nodeid)
        if not stat.S_ISLNK(n.mode):
            raise _Errno(errno.EINVAL)
        self._reply(unique, os.fsencode(n.linkname))

    def _open(self, unique: int, nodeid: int, body: memoryview) -> None:
        raise _Errno(errno.ENOSYS)  # no_open: the kernel keeps the page cache and stops asking (see above)

    def _read(self, unique: int, nodeid: int, body: memoryview) -> None:
        n = self._node(nodeid)
        _fh, offset, size, _flags = READ_IN.unpack_from(body)
        if n.children is not None:
            raise _Errno(errno.EISDIR)
        if offset == 0 and n.ino not in self._prefetched:
            # the first read of a file stands for its open (no OPEN comes): fetch a small file whole
            self._prefetched.add(n.ino)
            self.fs.opened(n)
        try:
            data = self.fs.read_node(n, offset, size)
        except ConvstoreError as e:
            count = getattr(self.counters, "_count_error", None)
            if count is not None:
                count(e)  # ImageOperations.read_errors, by cause
            entry = getattr(self.fs, "entry", None)
            log.error("read of %s (inode %d) at %d in image %s failed: %s", self._name(n), n.ino, offset,
                      entry.ref if entry is not None else "?", e)
            raise _Errno(errno.EIO) from None
        if self.counters is not None:
            with self._lock:
                self.counters.read_calls += 1
                self.counters.read_bytes += len(data)
        self._reply(unique, data)

    def _name(self, n: Node) -> str:
        for p, m in self.fs.walk("/"):
            if m is n:
                return p
        return "?"

    def _opendir(self, unique: int, nodeid: int, body: memoryview) -> None:
        raise _Errno(errno.ENOSYS)  # no_opendir: directories cached by the kernel (FOPEN_CACHE_DIR)

    def _readdir(self, unique: int, nodeid: int, body: memoryview, plus: bool = False) -> None:
        d = self._node(nodeid)
        if d.children is None:
            raise _Errno(errno.ENOTDIR)
        _fh, offset, size, _flags = READ_IN.unpack_from(body)
        out = bytearray()
        entries = self._entries(d)
        for i in range(offset, len(entries)):
            name, c, ino = entries[i]
            rec = DIRENT.size + len(name)
            pad = (-rec) % 8
            mode = c.mode if c is not None else stat.S_IFDIR
            if plus:
                head = self._entry(c) if c is not None else bytes(ENTRY_HEAD.size + ATTR.size)
            else:
                head = b""
            if len(out) + len(head) + rec + pad > size:
                break
            out += head + DIRENT.pack(ino, i + 1, len(name), stat.S_IFMT(mode) >> 12) + name + bytes(pad)
        self._reply(unique, bytes(out))

    def _readdirplus(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._readdir(unique, nodeid, body, plus=True)

    def _ok(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(unique)

    def _statfs(self, unique: int, nodeid: int, body: memoryview) -> None:
        total = sum(layer.uncompressed_size for layer in self.fs.manifest.layers)
        self._reply(unique, KSTATFS.pack(total // 4096, 0, 0, self.fs.inodes + 1, 0, 4096, 255, 4096, 0))

    def _getxattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        n = self._node(nodeid)
        size, _ = GETXATTR_IN.unpack_from(body)
        name = bytes(body[GETXATTR_IN.size:]).split(b"\0", 1)[0]
        value = n.xattrs.get(os.fsdecode(name))
        if value is None:
            raise _Errno(errno.ENODATA)
        self._sized(unique, size, value)

    def _listxattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        n = self._node(nodeid)
        size, _ = GETXATTR_IN.unpack_from(body)
        self._sized(unique, size, b"".join(os.fsencode(k) + b"\0" for k in n.xattrs))

    def _sized(self, unique: int, size: int, value: bytes) -> None:
        if size == 0:
            self._reply(unique, GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            raise _Errno(errno.ERANGE)
        else:
            self._reply(unique, value)

    def _access(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._node(nodeid)
        if struct.unpack_from("<I", body)[0] & os.W_OK:
            raise _Errno(errno.EROFS)
        self._reply(unique)

    def _flush(self, unique: int, nodeid: int, body: memoryview) -> None:
        raise _Errno(errno.ENOSYS)  # the kernel stops sending FLUSH

    def _destroy(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(unique)

    def _setattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        raise _Errno(errno.EROFS)

    _handlers: dict[int, Callable[..., None]] = {
        INIT: _init, LOOKUP: _lookup, GETATTR: _getattr, READLINK: _readlink, OPEN: _open, READ: _read,
        RELEASE: _ok, OPENDIR: _opendir, READDIR: _readdir, READDIRPLUS: _readdirplus, RELEASEDIR: _ok,
        STATFS: _statfs, GETXATTR: _getxattr, LISTXATTR: _listxattr, ACCESS: _access, FLUSH: _flush,
        DESTROY: _destroy, SETATTR: _setattr,
    }


_tl = threading.local()


class _Errno(Exception):
    def __init__(self, err: int):
        self.errno = err


class PathServer(KernelServer):
    """Serves path callbacks (an mfusepy ``Operations``: the layer store's tree of many images' layers,
    which has no inode numbering of its own) on a ``/dev/fuse`` connection.

    nodeids are given out in order and journaled to the session holder (:class:`fdholder.Journal`)
    before the kernel learns them, so a successor knows the path of every nodeid the kernel holds.
    Negative lookups are not cached (a layer store finds new images on a miss); files are opened
    (the callbacks keep handles), with FOPEN_KEEP_CACHE.

    A subtree the callbacks serve from an :class:`ImageFS` (a layer's ``diff/``: ``ops.subtree(path)``
    gives ``(key, fs)`` for its root; ``ops.subtree_current(key, fs)`` says whether it is still served;
    ``ops.open_node(fs, node, flags)`` opens a file of it) is answered node by node below its root, as
    :class:`KernelServer` answers a whole image: LOOKUP, GETATTR, READLINK, GETXATTR, LISTXATTR and OPEN by
    nodeid, with no path split or resolved per request, and negative entries cached there (a layer's tree
    never changes) and its directories' listings too (OPENDIR with FOPEN_CACHE_DIR, READDIR from the node).
    A tree no longer served falls back to the path callbacks."""

    WANT = ASYNC_READ | BIG_WRITES | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS | INIT_EXT | HAS_RESEND

    def __init__(self, ops: Any, fd: int, *, negotiated: Negotiated | None = None,
                 on_init: Callable[[Negotiated], None] | None = None, nodes: list[Any] | None = None):
        super().__init__(None, fd, counters=ops, negotiated=negotiated, on_init=on_init)
        self.callbacks = ops
        self._paths: dict[int, str] = {ROOT_ID: "/"}
        self._ids: dict[str, int] = {"/": ROOT_ID}
        for nodeid, path in nodes or []:
            self._paths[int(nodeid)] = str(path)
            self._ids[str(path)] = int(nodeid)
        self._next = max(self._paths) + 1
        #: nodeid -> (subtree key, its ImageFS, the node, its link count) below a subtree's root
        self._sub: dict[int, tuple[Any, ImageFS, Node, int]] = {}
        self._subtrees = callable(getattr(ops, "subtree", None))

    def _path(self, nodeid: int) -> str:
        p = self._paths.get(nodeid)
        if p is None:
            raise _Errno(errno.ESTALE)
        return p

    def _assign(self, path: str) -> int:
        with self._lock:
            nodeid = self._ids.get(path)
            if nodeid is None:
                nodeid = self._next
                self._next += 1
                if self.journal is not None:
                    self.journal.add([(nodeid, path)])
                self._ids[path] = nodeid
                self._paths[nodeid] = path
        return nodeid

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.callbacks, name)(*args)
        except OSError as e:  # mfusepy.FuseOSError and FSError carry the errno
            raise _Errno(e.errno or errno.EIO) from None

    @staticmethod
    def _pattr(st: dict[str, Any]) -> bytes:
        def ns(key: str) -> tuple[int, int]:
            v = st.get(key, 0)
            return divmod(int(v), 1_000_000_000) if isinstance(v, int) else (int(v), int((v % 1) * 1e9))

        (a, an), (m, mn), (c, cn) = ns("st_atime"), ns("st_mtime"), ns("st_ctime")
        size = int(st.get("st_size", 0))
        return ATTR.pack(int(st.get("st_ino", 0)), size, int(st.get("st_blocks", (size + 511) // 512)), a, m, c,
                         an, mn, cn, int(st["st_mode"]), int(st.get("st_nlink", 1)), int(st.get("st_uid", 0)),
                         int(st.get("st_gid", 0)), int(st.get("st_rdev", 0)) & 0xFFFFFFFF, 4096, 0)

    @staticmethod
    def _join(parent: str, name: str) -> str:
        return parent.rstrip("/") + "/" + name

    # -- subtrees served node by node ------------------------------------------
    def _subnode(self, nodeid: int) -> tuple[Any, ImageFS, Node, int] | None:
        """The subtree node behind ``nodeid`` while its tree is served (else None: the path callbacks)."""
        got = self._sub.get(nodeid)
        if got is None:
            return None
        try:
            current = self.callbacks.subtree_current(got[0], got[1])
        except OSError:
            current = False
        if not current:
            with self._lock:
                self._sub.pop(nodeid, None)
            return None
        return got

    def _remember(self, nodeid: int, key: Any, fs: ImageFS, n: Node) -> int:
        nlink = 2 + sum(1 for c in n.children.values() if c.children is not None) if n.children is not None \
            else n.nlink
        self._sub[nodeid] = (key, fs, n, nlink)
        return nlink

    def _lookup(self, unique: int, nodeid: int, body: memoryview) -> None:
        name = os.fsdecode(bytes(body).split(b"\0", 1)[0])
        sub = self._subnode(nodeid)
        if sub is not None:
            key, fs, parent, _ = sub
            if parent.children is None:
                raise _Errno(errno.ENOTDIR)
            c = parent.children.get(name)
            if c is None:  # a layer's tree never changes: the kernel keeps the negative entry
                self._reply(unique, ENTRY_HEAD.pack(0, 0, TIMEOUT, 0, 0, 0) + bytes(ATTR.size))
                return
            child = self._assign(self._join(self._path(nodeid), name))
            nlink = self._remember(child, key, fs, c)
            self._reply(unique, ENTRY_HEAD.pack(child, 0, TIMEOUT, TIMEOUT, 0, 0) + _attr(c, nlink))
            return
        path = self._join(self._path(nodeid), name)
        st = self._call("getattr", path, None)
        child = self._assign(path)
        if self._subtrees and stat.S_ISDIR(int(st["st_mode"])):
            found = self._call("subtree", path)
            if found is not None:
                self._remember(child, found[0], found[1], found[1].root)
        self._reply(unique, ENTRY_HEAD.pack(child, 0, TIMEOUT, TIMEOUT, 0, 0) + self._pattr(st))

    def _getattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        sub = self._subnode(nodeid)
        if sub is not None:
            self._reply(unique, ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + _attr(sub[2], sub[3]))
            return
        st = self._call("getattr", self._path(nodeid), None)
        self._reply(unique, ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + self._pattr(st))

    def _readlink(self, unique: int, nodeid: int, body: memoryview) -> None:
        sub = self._subnode(nodeid)
        if sub is not None:
            if not stat.S_ISLNK(sub[2].mode):
                raise _Errno(errno.EINVAL)
            self._reply(unique, os.fsencode(sub[2].linkname))
            return
        self._reply(unique, os.fsencode(self._call("readlink", self._path(nodeid))))

    def _open(self, unique: int, nodeid: int, body: memoryview) -> None:
        flags = struct.unpack_from("<I", body)[0]
        sub = self._subnode(nodeid)
        if sub is not None:
            fh = self._call("open_node", sub[1], sub[2], flags)
        else:
            fh = self._call("open", self._path(nodeid), flags)
        self._reply(unique, OPEN_OUT.pack(int(fh), FOPEN_KEEP_CACHE, 0))

    def _read(self, unique: int, nodeid: int, body: memoryview) -> None:
        fh, offset, size, _flags = READ_IN.unpack_from(body)
        self._reply(unique, self._call("read", self._path(nodeid), size, offset, fh))

    def _release(self, unique: int, nodeid: int, body: memoryview) -> None:
        fh = struct.unpack_from("<Q", body)[0]
        self._call("release", self._paths.get(nodeid, "/"), fh)
        self._reply(unique)

    def _opendir(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._path(nodeid)
        # a directory of a layer's tree never changes: the kernel keeps its listing (the store's own
        # directories list the layers known now, and are read again)
        cached = FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE if self._subnode(nodeid) is not None else 0
        self._reply(unique, OPEN_OUT.pack(0, cached, 0))

    def _readdir(self, unique: int, nodeid: int, body: memoryview, plus: bool = False) -> None:
        path = self._path(nodeid)
        _fh, offset, size, _flags = READ_IN.unpack_from(body)
        sub = self._subnode(nodeid)
        if sub is not None:
            if sub[2].children is None:
                raise _Errno(errno.ENOTDIR)
            names: list[Any] = [".", "..", *((name, c.mode, 0) for name, c in sub[2].children.items())]
        else:
            names = self._call("readdir", path, 0)
        out = bytearray()
        for i in range(offset, len(names)):
            e = names[i]
            name, mode = (e, 0) if isinstance(e, str) else (e[0], e[1])
            raw = os.fsencode(name)
            rec = DIRENT.size + len(raw)
            pad = (-rec) % 8
            if len(out) + rec + pad > size:
                break
            out += DIRENT.pack(0xFFFFFFFF, i + 1, len(raw), stat.S_IFMT(mode) >> 12) + raw + bytes(pad)
        self._reply(unique, bytes(out))

    def _statfs(self, unique: int, nodeid: int, body: memoryview) -> None:
        st = self._call("statfs", self._path(nodeid))
        self._reply(unique, KSTATFS.pack(st.get("f_blocks", 0), st.get("f_bfree", 0), st.get("f_bavail", 0),
                                         st.get("f_files", 0), st.get("f_ffree", 0), st.get("f_bsize", 4096),
                                         st.get("f_namemax", 255), st.get("f_frsize", 4096), 0))

    def _getxattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        size, _ = GETXATTR_IN.unpack_from(body)
        name = os.fsdecode(bytes(body[GETXATTR_IN.size:]).split(b"\0", 1)[0])
        sub = self._subnode(nodeid)
        if sub is not None:
            value = sub[2].xattrs.get(name)
            if value is None:
                raise _Errno(errno.ENODATA)
            self._sized(unique, size, value)
            return
        self._sized(unique, size, self._call("getxattr", self._path(nodeid), name))

    def _listxattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        size, _ = GETXATTR_IN.unpack_from(body)
        sub = self._subnode(nodeid)
        names = list(sub[2].xattrs) if sub is not None else self._call("listxattr", self._path(nodeid))
        self._sized(unique, size, b"".join(os.fsencode(k) + b"\0" for k in names))

    def _access(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._call("access", self._path(nodeid), struct.unpack_from("<I", body)[0])
        self._reply(unique)

    def _create(self, unique: int, nodeid: int, body: memoryview) -> None:
        flags, mode = struct.unpack_from("<II", body)
        name = os.fsdecode(bytes(body[16:]).split(b"\0", 1)[0])
        self._call("create", self._join(self._path(nodeid), name), mode)
        raise _Errno(errno.EROFS)  # a callback that accepted a create: nothing here writes

    def _mkdir(self, unique: int, nodeid: int, body: memoryview) -> None:
        mode = struct.unpack_from("<I", body)[0]
        self._call("mkdir", self._join(self._path(nodeid), os.fsdecode(bytes(body[8:]).split(b"\0", 1)[0])), mode)
        raise _Errno(errno.EROFS)

    def _unlinkish(self, unique: int, nodeid: int, body: memoryview, name: str) -> None:
        self._call(name, self._join(self._path(nodeid), os.fsdecode(bytes(body).split(b"\0", 1)[0])))
        self._reply(unique)

    def _rmdir(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._unlinkish(unique, nodeid, body, "rmdir")

    def _unlink(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._unlinkish(unique, nodeid, body, "unlink")

    _handlers: dict[int, Callable[..., None]] = {
        INIT: KernelServer._init, LOOKUP: _lookup, GETATTR: _getattr, READLINK: _readlink, OPEN: _open,
        READ: _read, RELEASE: _release, OPENDIR: _opendir, READDIR: _readdir, RELEASEDIR: KernelServer._ok,
        STATFS: _statfs, GETXATTR: _getxattr, LISTXATTR: _listxattr, ACCESS: _access,
        FLUSH: KernelServer._flush, DESTROY: KernelServer._destroy, SETATTR: KernelServer._setattr,
        CREATE: _create, MKDIR: _mkdir, RMDIR: _rmdir, UNLINK: _unlink,
    }


def start_paths(ops: Any, mountpoint: str, *, read_only: bool = False, hold: bool = False,
                what: str = "paths") -> PathServer:
    """Serve path callbacks at ``mountpoint`` (:class:`PathServer`); with ``hold``, with failover as
    :func:`start` (a held session of the same ``what`` is taken over with its journal of nodeids)."""
    from . import fdholder

    mnt = fdholder.mount_key(mountpoint)
    session = fdholder.take(mnt) if hold else None
    if session is not None:
        fd, state = session
        if state.get("kind") != what:
            os.close(fd)
            raise FuseSessionError(f"{mountpoint} is still served for {state.get('kind') or state.get('ref')}, "
                                   f"not {what}: unmount it first (umount -l {mountpoint})")
        server = PathServer(ops, fd, negotiated=Negotiated.from_json(state["init"]), nodes=state.get("nodes"))
        server.journal = fdholder.Journal(mnt)
        server.start()
        log.warning("took over the FUSE session at %s (%s, %d nodes) from a previous process", mnt, what,
                    len(server._paths))
        return server
    fd = open_device()
    server = PathServer(ops, fd)

    def handed(neg: Negotiated) -> None:
        if hold:
            try:
                fdholder.hold(mnt, fd, {"mountpoint": mnt, "kind": what, "ref": what, "init": neg.to_json(),
                                        "nodes": []})
                journal = fdholder.Journal(mnt)
                with server._lock:  # what was looked up meanwhile, then every new one as it comes
                    journal.add([(i, p) for i, p in server._paths.items() if i != ROOT_ID])
                    server.journal = journal
            except ConvstoreError as e:
                log.error("%s: no failover for this mount: %s", mountpoint, e)

    server.on_init = handed
    try:
        mount_fd(mnt, fd, read_only)
    except BaseException:
        os.close(fd)
        raise
    server.start()
    if not server.ready.wait(30):
        umount(mnt)
        raise KernelFuseError(f"the kernel did not initialise the FUSE mount at {mountpoint}")
    return server


def open_device() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KernelFuseError(f"cannot open /dev/fuse: {e.strerror}") from None


def start(fs: ImageFS, mountpoint: str, *, counters: Any = None, read_only: bool = True, hold: bool = False,
          ref: str = "") -> KernelServer:
    """Serve ``fs`` at ``mountpoint`` in threads of this process; returns once the kernel's INIT is answered.

    With ``hold``, the connection outlives this process (:mod:`.fdholder`): a session a holder keeps for
    ``mountpoint`` is taken over (it must serve the same manifest), else a new mount's fd is handed to a
    new holder once INIT is answered."""
    from . import fdholder

    mnt = fdholder.mount_key(mountpoint)
    digest = fs.entry.manifest_digest if fs.entry is not None else ""
    session = fdholder.take(mnt) if hold else None
    if session is not None:
        fd, state = session
        if not digest or state.get("manifest_digest") != digest:
            os.close(fd)
            raise FuseSessionError(f"{mountpoint} is still served for image manifest {state.get('manifest_digest')} "
                                   f"({state.get('ref')}), not {digest or 'this image'}: start the server with "
                                   f"that image, or unmount it first (umount -l {mountpoint})")
        server = KernelServer(fs, fd, counters=counters, negotiated=Negotiated.from_json(state["init"]))
        server.journal = fdholder.Journal(mnt)  # attached: the holder's grace period stops
        server.start()
        log.warning("took over the FUSE session at %s (image %s) from a previous process", mnt, state.get("ref"))
        return server

    fd = open_device()

    def handed(neg: Negotiated) -> None:
        if hold:
            try:
                fdholder.hold(mnt, fd, {"mountpoint": mnt, "manifest_digest": digest, "ref": ref,
                                        "init": neg.to_json()})
                server.journal = fdholder.Journal(mnt)
            except ConvstoreError as e:  # the mount works, only without failover
                log.error("%s: no failover for this mount: %s", mountpoint, e)

    server = KernelServer(fs, fd, counters=counters, on_init=handed)
    try:
        mount_fd(mnt, fd, read_only)
    except BaseException:
        os.close(fd)
        raise
    server.start()
    if not server.ready.wait(30):
        umount(mnt)
        raise KernelFuseError(f"the kernel did not initialise the FUSE mount at {mountpoint}")
    return server


def serve(fs: ImageFS, mountpoint: str, *, counters: Any = None, read_only: bool = True, ref: str = "") -> None:
    """Serve in the foreground until unmounted, with failover (:func:`start` with ``hold``).  SIGTERM,
    SIGINT or SIGHUP unmount (lazily: files still open keep reading) and end the held session; a SIGKILL leaves
    the session with its holder for a successor."""
    _serve_until_stopped(mountpoint, lambda: start(fs, mountpoint, counters=counters, read_only=read_only,
                                                   hold=True, ref=ref))


def serve_paths(ops: Any, mountpoint: str, *, read_only: bool = False, what: str = "paths") -> None:
    """:func:`serve` for path callbacks (:class:`PathServer`, :func:`start_paths`)."""
    _serve_until_stopped(mountpoint, lambda: start_paths(ops, mountpoint, read_only=read_only, hold=True,
                                                         what=what))


def _serve_until_stopped(mountpoint: str, starter: Callable[[], KernelServer]) -> None:
    import signal

    from . import fdholder

    mnt = fdholder.mount_key(mountpoint)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        # as libfuse's handlers: SIGHUP too (the daemon sends it when a command's client vanished); a
        # signal that kills (SIGKILL, SIGQUIT, a crash) leaves the session with its holder for a successor
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)  # before mounting: a stop request as soon as the mount shows is honoured
    server = starter()
    while not server.wait(0.5):
        if stopping.is_set():
            fdholder.drop(mnt)
            umount(mnt, lazy=True)
            server.wait(5)  # the kernel ends the connection once nothing holds the mount
            return
    fdholder.drop(mnt)
