"""Read-only FUSE mount of an :class:`ImageFS`.

As root, an image is served by the low-level server of :mod:`.kfuse`
(kernel protocol on /dev/fuse: stable nodeids, no open round trips,
failover through :mod:`.fdholder`); otherwise, and for trees of other
callbacks (the layer store), by mfusepy on libfuse3.

A chunk that is missing or corrupt fails only the read that needs it, with
EIO, and is logged by name; the mount stays up and always unmounts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any



def _load_mfusepy() -> Any:
    """mfusepy, bound to libfuse3 by its soname where the loader knows it: its own search
    (``find_library('fuse')`` first, which runs ldconfig and gcc) costs a start ~20 ms."""
    import ctypes
    import sys

    if sys.platform != "linux" or os.environ.get("FUSE_LIBRARY_PATH") or "mfusepy" in sys.modules:
        import mfusepy as m
        return m
    try:
        ctypes.CDLL("libfuse3.so.3")
    except OSError:
        import mfusepy as m
        return m
    os.environ["FUSE_LIBRARY_PATH"] = "libfuse3.so.3"  # what find_library('fuse3') answers, without its search
    try:
        import mfusepy as m
    finally:
        del os.environ["FUSE_LIBRARY_PATH"]
    return m


if TYPE_CHECKING:
    import mfusepy
else:
    mfusepy = _load_mfusepy()

from ..errors import ConvstoreError, ExposedMountpoint, StoreError
from ..hardening import tool_environ
from ..oci.policy import Policy, require
from ..core.repository import Repository
from ..service import sdnotify
from . import fdholder, kfuse
from .background import BackgroundConfig, start_fetching
from .chunkcache import ChunkCache
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


def low_level(fs: ImageFS | None, ops: ImageOperations | None) -> bool:
    """Whether this mount is served by :mod:`.kfuse`: an image (not other callbacks) and a process that
    may mount(2) (root; ``CONVSTORE_FUSE=libfuse`` forces libfuse)."""
    return fs is not None and (ops is None or type(ops) is ImageOperations) and kfuse.available()


def paths_low_level(ops: ImageOperations | None) -> bool:
    """Whether path callbacks that ask for it (a ``kfuse_paths`` attribute naming them: the layer store)
    are served by :class:`kfuse.PathServer`, with failover."""
    return ops is not None and bool(getattr(ops, "kfuse_paths", None)) and kfuse.available()


def serve(fs: ImageFS | None, mountpoint: str, ops: ImageOperations | None = None, read_only: bool = True,
          ref: str = "", on_ready: Callable[[], object] | None = None) -> None:
    """Serve in the foreground until unmounted (SIGINT/SIGTERM unmount
    cleanly).  A dead mount left there by a killed process is detached
    first; one whose session a holder keeps is taken over (kfuse).  A mount
    for every user needs a private mount point (:func:`check_private_mountpoint`).
    ``on_ready`` is called (in another thread) once a request has gone
    through this server: the mount serves (after a takeover too)."""
    opts = fuse_options(read_only=read_only)
    if opts.get("allow_other"):
        check_private_mountpoint(mountpoint)
    recover_stale_mount(mountpoint)
    kernel, paths = low_level(fs, ops), paths_low_level(ops)
    ops = ops or ImageOperations(fs)
    done = threading.Event()
    if on_ready is not None:
        threading.Thread(target=_when_served, args=(ops, mountpoint, on_ready, done), name="convstore-ready",
                         daemon=True).start()
    try:
        if kernel:
            assert fs is not None
            kfuse.serve(fs, mountpoint, counters=ops, read_only=read_only, ref=ref)
            return
        if paths:
            kfuse.serve_paths(ops, mountpoint, read_only=read_only, what=ops.kfuse_paths)
            return
        try:
            mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=False, **opts)
        except RuntimeError as e:
            # libfuse reports a loop ended by SIGINT/SIGTERM as an error status
            # after it has unmounted; only a failure to mount is an error.
            if os.path.ismount(mountpoint) or not getattr(e, "args", None) or e.args[0] != 8:
                raise StoreError(f"FUSE at {mountpoint} failed (libfuse status {e})") from None
    finally:
        done.set()


def mount_answers(mountpoint: str) -> bool:
    """Whether ``mountpoint`` is a mount that answers a statfs (a round trip
    through its FUSE server, never the kernel's cache)."""
    try:
        os.statvfs(mountpoint)
    except OSError:
        return False
    return os.path.ismount(mountpoint)


def _when_served(ops: ImageOperations, mountpoint: str, on_ready: Callable[[], object], done: threading.Event) -> None:
    """Call ``on_ready`` once the kernel's INIT has reached ``ops`` and a
    statfs has been answered through the mount (not before: a client told
    "ready" must find the tree there)."""
    while not ops.ready.wait(0.05):
        if done.is_set():
            return
    while not done.is_set():
        if mount_answers(mountpoint):
            on_ready()
            return
        done.wait(0.02)


def mount_image(store: Repository, ref: str, mountpoint: str, *, policy: Policy | None = None,
                cache: ChunkCache | None = None,
                report: Callable[[ImageFS], AbstractContextManager[None]] | None = None,
                background: BackgroundConfig | None = None) -> None:
    """``convstore mount`` (in the foreground, or in its background worker):
    serve image ``ref`` read-only at ``mountpoint`` until unmounted, once
    ``policy`` (the node's trust policy) accepts it; ``cache``: the process's
    memory budget; ``report``: what reports on the image while it is served
    (metrics, stats file).  The image's start-up profile is prefetched, then
    the rest fetched in the background (``background``: default on, see
    convstore.reader.background).  Tells a service manager
    (``$NOTIFY_SOCKET``) when it serves and when it stops."""
    with ImageFS.from_store(store, ref, prefetch_on_open=PREFETCH_ON_OPEN, cache=cache) as fs:
        require(policy, fs.manifest, ref)
        profile = store.manifests.load_profile(fs.entry) if fs.entry is not None else None
        start_fetching(fs.fetcher, profile, background or BackgroundConfig.from_env(), ref)
        try:
            with report(fs) if report is not None else contextlib.nullcontext():
                serve(fs, mountpoint, ref=ref, on_ready=lambda: sdnotify.serving(f"serving {ref} at {mountpoint}",
                                                                                 lambda: mount_answers(mountpoint), log))
        finally:
            sdnotify.stopping(f"unmounted {ref} from {mountpoint}")


def recover_stale_mount(mountpoint: str) -> bool:
    """If ``mountpoint`` is a FUSE mount whose process died ("transport
    endpoint is not connected"), detach it (lazily) so it can be mounted
    again; whether one was found.  A live mount is left alone, and so is one
    whose session a holder keeps for a successor (:mod:`.fdholder`)."""
    if fdholder.held(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)  # always asks the daemon (a stat may be answered from the kernel's cache)
        return False
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    target = os.path.abspath(mountpoint)  # never read as an option
    cmd = [tool, "-u", "-z", target] if tool else ["umount", "-l", target]
    if subprocess.run(cmd, capture_output=True, env=tool_environ()).returncode != 0:
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
    if subprocess.run(cmd, capture_output=True, env=tool_environ()).returncode != 0 and os.path.ismount(mountpoint):
        lazy = [tool, "-u", "-z", mountpoint] if tool else ["umount", "-l", mountpoint]
        subprocess.run(lazy, capture_output=True, env=tool_environ())


class BackgroundMount:
    """Mount in a thread of this process; a context manager that always unmounts."""

    def __init__(self, fs: ImageFS | None, mountpoint: str, ops: ImageOperations | None = None,
                 read_only: bool = True, hold: bool = False):
        """``hold``: the session outlives this process (failover, kfuse only), as :func:`serve`'s."""
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint)
        self.ops = ops or ImageOperations(fs)
        self.read_only = read_only
        self.hold = hold
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.server: kfuse.KernelServer | None = None  # the low-level server, when it serves this mount

    def _run(self) -> None:
        try:
            serve(self.fs, self.mountpoint, self.ops, read_only=self.read_only)
        except BaseException as e:  # reported by __enter__
            self._error = e

    def __enter__(self) -> BackgroundMount:
        if not os.path.exists("/dev/fuse"):
            raise StoreError("FUSE is not available (/dev/fuse is missing)")
        if not (self.hold and fdholder.held(self.mountpoint)):  # a held mount: a look at it would wait for us
            os.makedirs(self.mountpoint, exist_ok=True)
        if low_level(self.fs, self.ops):
            assert self.fs is not None
            check_private_mountpoint(self.mountpoint)
            recover_stale_mount(self.mountpoint)
            self.server = kfuse.start(self.fs, self.mountpoint, counters=self.ops, read_only=self.read_only,
                                      hold=self.hold)
            return self
        if paths_low_level(self.ops):
            check_private_mountpoint(self.mountpoint)
            recover_stale_mount(self.mountpoint)
            self.server = kfuse.start_paths(self.ops, self.mountpoint, read_only=self.read_only, hold=self.hold,
                                            what=self.ops.kfuse_paths)
            return self
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
        if self.hold:
            fdholder.drop(self.mountpoint)
        # our own kernel mount (root): umount(2) directly, not a fusermount3 process (a few ms of every run)
        if self.server is None or not kfuse.umount(self.mountpoint, lazy=False):
            unmount(self.mountpoint)
        if self.server is not None and self.server.wait(10):
            os.close(self.server.fd)  # ended: else (lazily detached, files still open) it serves on
        if self._thread is not None:
            self._thread.join(timeout=10)
