"""Read-only FUSE mount of an :class:`ImageFS` (mfusepy on libfuse3).

A chunk that is missing or corrupt fails only the read that needs it, with
EIO, and is logged by name; the mount stays up and always unmounts.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from typing import Any

import mfusepy

from ..errors import ConvstoreError, ExposedMountpoint, StoreError
from ..oci.policy import Policy, require
from ..core.repository import Repository
from .imagefs import PREFETCH_ON_OPEN, FSError, ImageFS, Node

log = logging.getLogger(__name__)


class ImageOperations(mfusepy.Operations):
    """FUSE callbacks over an ImageFS.  Counts what readers asked for.

    Every path goes through :meth:`_target` (which filesystem, which path
    in it), so a tree of several images' layers (the layer store) serves
    its files through the same callbacks."""

    use_ns = True

    def __init__(self, fs: ImageFS | None):
        self.fs = fs
        self._handles: dict[int, tuple[ImageFS, Node]] = {}
        self._next = 1
        self._lock = threading.Lock()
        self.read_calls = 0
        self.read_bytes = 0
        #: reads answered EIO, by cause (the exception's class name: RegistryTimeout, ChunkMissing, ...)
        self.read_errors: dict[str, int] = {}
        #: set when the kernel's INIT arrives: the mount is up and served
        self.ready = threading.Event()

    def init(self, path: str) -> None:
        self.ready.set()

    def _target(self, path: str) -> tuple[ImageFS, str]:
        assert self.fs is not None
        return self.fs, path

    def _node(self, path: str) -> tuple[ImageFS, Node]:
        fs, p = self._target(path)
        try:
            return fs, fs.lookup(p)
        except FSError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        fs, p = self._target(path)
        try:
            return fs.stat(p).as_dict()
        except FSError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def readdir(self, path: str, fh: int) -> list[str | tuple[str, int, int]]:
        """Names with their file types (the d_type overlayfs needs to see a
        whiteout in a lower directory, and ``ls`` and ``find`` use)."""
        _, n = self._node(path)
        if n.children is None:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *((name, c.mode, 0) for name, c in n.children.items())]

    def readlink(self, path: str) -> str:
        fs, p = self._target(path)
        try:
            return fs.readlink(p)
        except FSError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def access(self, path: str, amode: int) -> int:
        self._node(path)
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise mfusepy.FuseOSError(errno.EROFS)
        fs, n = self._node(path)
        fs.opened(n)
        return self._new_handle((fs, n))

    def _new_handle(self, what: Any) -> int:
        with self._lock:
            fh = self._next
            self._next += 1
            self._handles[fh] = what
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        fs, n = self._handles.get(fh) or self._node(path)
        try:
            data = fs.read_node(n, offset, size)
        except ConvstoreError as e:
            self._count_error(e)
            log.error("read of %s at %d in image %s failed: %s", path, offset, fs.entry.ref if fs.entry else "?", e)
            raise mfusepy.FuseOSError(errno.EIO) from None
        except Exception as e:  # never let a bug take the mount down
            self._count_error(e)
            log.exception("read of %s at %d failed: %s", path, offset, e)
            raise mfusepy.FuseOSError(errno.EIO) from None
        with self._lock:
            self.read_calls += 1
            self.read_bytes += len(data)
        return data

    def _count_error(self, e: BaseException) -> None:
        with self._lock:
            self.read_errors[type(e).__name__] = self.read_errors.get(type(e).__name__, 0) + 1

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        x = self._node(path)[1].xattrs
        if name not in x:
            raise mfusepy.FuseOSError(errno.ENODATA)
        return x[name]

    def listxattr(self, path: str) -> list[str]:
        return list(self._node(path)[1].xattrs)

    def statfs(self, path: str) -> dict[str, int]:
        assert self.fs is not None
        total = sum(layer.uncompressed_size for layer in self.fs.manifest.layers)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total // 4096, "f_bfree": 0, "f_bavail": 0,
                "f_files": self.fs.inodes + 1, "f_ffree": 0, "f_namemax": 255}


def fuse_options(allow_other: bool = True, read_only: bool = True) -> dict[str, Any]:
    """Mount options.  Without ``read_only`` the kernel passes write calls
    on, for the callbacks to refuse one by one (the layer store answers two
    of them, ENOENT, as containers/storage expects)."""
    opts: dict[str, Any] = {"fsname": "convstore", "subtype": "convstore", "default_permissions": True,
                            "kernel_cache": True, "attr_timeout": 3600, "entry_timeout": 3600}
    if read_only:
        opts["ro"] = True
    if allow_other and os.geteuid() == 0:
        opts["allow_other"] = True
    return opts


def check_private_mountpoint(mountpoint: str) -> None:
    """Refuse to mount for every user (``allow_other``: the files are the
    image's, decrypted) where other users could reach the mount: the mount
    point's parent must belong to this user or root and be closed to group
    and others (0700)."""
    parent = os.path.dirname(os.path.realpath(mountpoint))
    try:
        st = os.stat(parent)
    except OSError as e:
        raise ExposedMountpoint(f"cannot check the mount point's parent {parent}: {e.strerror}") from None
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o077:
        fix = f"chmod 0700 {parent}" if st.st_uid in (0, os.geteuid()) else f"chown root {parent} && chmod 0700 {parent}"
        raise ExposedMountpoint(f"{mountpoint}: other users can reach it through {parent} (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}) and would read the image's "
                                f"decrypted files; fix: {fix}")


def serve(fs: ImageFS | None, mountpoint: str, ops: ImageOperations | None = None, read_only: bool = True) -> None:
    """Serve in the foreground until unmounted (libfuse handles SIGINT/SIGTERM
    by unmounting cleanly).  A dead mount left there by a killed process is
    detached first.  A mount for every user needs a private mount point
    (:func:`check_private_mountpoint`)."""
    opts = fuse_options(read_only=read_only)
    if opts.get("allow_other"):
        check_private_mountpoint(mountpoint)
    recover_stale_mount(mountpoint)
    try:
        mfusepy.FUSE(ops or ImageOperations(fs), mountpoint, foreground=True, nothreads=False, **opts)
    except RuntimeError as e:
        # libfuse reports a loop ended by SIGINT/SIGTERM as an error status
        # after it has unmounted; only a failure to mount is an error.
        if os.path.ismount(mountpoint) or not getattr(e, "args", None) or e.args[0] != 8:
            raise StoreError(f"FUSE at {mountpoint} failed (libfuse status {e})") from None


def mount_image(store: Repository, ref: str, mountpoint: str, *, policy: Policy | None = None) -> None:
    """``convstore mount`` (in the foreground, or in its background worker):
    serve image ``ref`` read-only at ``mountpoint`` until unmounted, once
    ``policy`` (the node's trust policy) accepts it."""
    with ImageFS.from_store(store, ref, prefetch_on_open=PREFETCH_ON_OPEN) as fs:
        require(policy, fs.manifest, ref)
        serve(fs, mountpoint)


def recover_stale_mount(mountpoint: str) -> bool:
    """If ``mountpoint`` is a FUSE mount whose process died ("transport
    endpoint is not connected"), detach it (lazily) so it can be mounted
    again; whether one was found.  A live mount is left alone."""
    try:
        os.statvfs(mountpoint)  # always asks the daemon (a stat may be answered from the kernel's cache)
        return False
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    target = os.path.abspath(mountpoint)  # never read as an option
    cmd = [tool, "-u", "-z", target] if tool else ["umount", "-l", target]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        raise StoreError(f"{mountpoint} is a dead FUSE mount and could not be detached: run fusermount3 -u -z "
                         f"{mountpoint}")
    log.warning("detached the dead FUSE mount at %s (its process had died)", mountpoint)
    return True


def unmount(mountpoint: str) -> None:
    """Unmount, lazily if busy; never raises if it is already gone."""
    if not os.path.ismount(mountpoint):
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    if subprocess.run(cmd, capture_output=True).returncode != 0 and os.path.ismount(mountpoint):
        lazy = [tool, "-u", "-z", mountpoint] if tool else ["umount", "-l", mountpoint]
        subprocess.run(lazy, capture_output=True)


class BackgroundMount:
    """Mount in a thread of this process; a context manager that always unmounts."""

    def __init__(self, fs: ImageFS | None, mountpoint: str, ops: ImageOperations | None = None,
                 read_only: bool = True):
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.ops = ops or ImageOperations(fs)
        self.read_only = read_only
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            serve(self.fs, self.mountpoint, self.ops, read_only=self.read_only)
        except BaseException as e:  # reported by __enter__
            self._error = e

    def __enter__(self) -> BackgroundMount:
        if not os.path.exists("/dev/fuse"):
            raise StoreError("FUSE is not available (/dev/fuse is missing)")
        os.makedirs(self.mountpoint, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="convstore-fuse", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.ops.ready.wait(0.05):
            if isinstance(self._error, ExposedMountpoint):
                raise self._error  # refused before mounting: its own message
            if self._error is not None or not self._thread.is_alive():
                raise StoreError(f"cannot mount at {self.mountpoint} (libfuse status {self._error or 'exited'})")
            if time.monotonic() > deadline:
                raise StoreError(f"timed out mounting at {self.mountpoint}")
        return self

    def __exit__(self, *exc: object) -> None:
        unmount(self.mountpoint)
        if self._thread is not None:
            self._thread.join(timeout=10)
