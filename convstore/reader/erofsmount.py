"""A kernel-served view of an image: its EROFS image (:mod:`.erofs`) served as ONE file by FUSE, mounted by
the kernel's file-backed EROFS.

::

    <fusedir>/layer.erofs   kfuse, read-only: metadata blocks from memory, data blocks through the fetcher
    <where>                 mount -t erofs <fusedir>/layer.erofs (kernel 6.12+, CONFIG_EROFS_FS_BACKED_BY_FILE)

The kernel then answers lookups, getattr, xattrs, readdir and every warm read from EROFS's own inode, dentry
and page caches: only cold blocks of the image reach Python, as large reads of one file.  Nothing plaintext is
written to disk: the image exists only as the FUSE file's answers (decrypted in memory, as for the tree mount).
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import threading
from typing import Any

from ..errors import KernelFuseError
from ..hardening import private_tempdir
from ..merge import Node
from . import kfuse
from .erofs import ErofsLayout, build
from .imagefs import ImageFS

IMAGE_NAME = "layer.erofs"
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
NOTIFY_STORE = 4  # FUSE_NOTIFY_STORE: the server puts bytes into the page cache of one of its files
STORE_OUT = struct.Struct("<QQII")  # fuse_notify_store_out: nodeid offset size padding
PUSH = 1 << 20  # bytes per notification

_libc = ctypes.CDLL(None, use_errno=True)


class ImageFileFS(ImageFS):
    """An :class:`ImageFS` whose tree is one regular file: ``/layer.erofs``, the EROFS image of ``fs``."""

    def __init__(self, fs: ImageFS, layout: ErofsLayout):  # noqa: D107 - no manifest merge: the tree is made here
        self.image = fs
        self.layout = layout
        self.manifest = fs.manifest
        self.fetcher = fs.fetcher
        self.prefetch_on_open = 0
        self.entry = None
        self.warnings = []
        # the whole image decrypted: root's alone (the kernel checks these modes: default_permissions)
        self.file = Node(2, stat.S_IFREG | 0o400, 0, 0, layout.size, 0)
        self.root = Node(1, stat.S_IFDIR | 0o500, 0, 0, 0, 0, children={IMAGE_NAME: self.file})
        self.inodes = 2
        self._opened: set[int] = set()
        self._lock = threading.Lock()
        #: bytes of file data (not metadata) the kernel read through the image file
        self.data_bytes = 0

    def close(self) -> None:
        pass  # the fetcher is the image's: its owner closes it

    def opened(self, node: Node) -> None:
        pass  # the image file is opened once, by the kernel's EROFS; what counts is each file inside it

    def read_node(self, node: Node, offset: int, size: int) -> bytes:
        if node is not self.file:
            return b""
        return self.layout.read(offset, size, self._read_file)

    def _read_file(self, node: Node, offset: int, size: int) -> bytes:
        if node.ino not in self._opened:  # the first read of a file inside: fetch it whole if small
            with self._lock:
                first = node.ino not in self._opened
                self._opened.add(node.ino)
            if first:
                self.image.opened(node)
        self.data_bytes += size
        return self.image.read_node(node, offset, size)


def mount_image(image: str, where: str) -> None:
    """mount(2) the EROFS image file ``image`` at ``where``: read-only, nosuid and nodev as the FUSE tree mounts
    (an overlay above decides for its own mount), file-backed (no loop device)."""
    if _libc.mount(os.fsencode(image), os.fsencode(where), b"erofs", MS_RDONLY | MS_NOSUID | MS_NODEV, None) != 0:
        e = ctypes.get_errno()
        raise KernelFuseError(f"cannot mount the EROFS image {image} at {where}: {os.strerror(e)}")


class ErofsMount:
    """``fs`` at ``where`` through EROFS over a FUSE-served image; :meth:`close` unmounts both.

    The metadata blocks are stored into the image file's page cache before the mount (no metadata read
    reaches FUSE).  Pushing each file's data the same way when the kernel first reads it was measured
    slower (docs/benchmarks.md): python3's start reads parts of large files."""

    def __init__(self, fs: ImageFS, where: str, *, fusedir: str | None = None, name: str = "",
                 layout: ErofsLayout | None = None):
        self.fs = fs
        self.where = where
        #: ``layout``: built ahead from this tree (the layer store's prebuild), else built here
        self.layout = layout if layout is not None else build(fs.root, name=name)
        # the FUSE mount inside a 0700 directory of its own (the mount's root replaces the mount point's modes)
        self._made_dir = private_tempdir("convstore-erofs-") if fusedir is None else None
        self.fusedir = fusedir or os.path.join(self._made_dir or "", "image")
        os.makedirs(self.fusedir, mode=0o700, exist_ok=True)
        self.file_fs = ImageFileFS(fs, self.layout)
        self.server: Any = kfuse.start(self.file_fs, self.fusedir, read_only=True)
        try:
            # the metadata into the image file's page cache ahead: EROFS's lookups, getattrs, xattrs and
            # readdirs then read no block through FUSE (the kernel must know the file: a lookup first)
            os.stat(os.path.join(self.fusedir, IMAGE_NAME))
            self.push(0, self.layout.meta)
            mount_image(os.path.join(self.fusedir, IMAGE_NAME), where)
        except BaseException:
            kfuse.umount(self.fusedir)
            self.server.wait(5)
            self._remove_dirs()
            raise

    def push(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` in the kernel's page cache of the image file (FUSE_NOTIFY_STORE)."""
        view = memoryview(data)
        for off in range(0, len(data), PUSH):
            piece = view[off:off + PUSH]
            head = kfuse.OUT_HEADER.pack(kfuse.OUT_HEADER.size + STORE_OUT.size + len(piece), NOTIFY_STORE, 0)
            try:
                os.writev(self.server.fd, [head, STORE_OUT.pack(self.file_fs.file.ino, offset + off, len(piece), 0),
                                           piece])
            except OSError as e:
                raise KernelFuseError(f"cannot store the EROFS metadata in the page cache: {e.strerror}") from None

    @property
    def ops(self) -> dict[int, int]:
        """FUSE requests by opcode (kfuse's counts) on the image file's mount."""
        return dict(self.server.ops)

    def close(self) -> None:
        kfuse.umount(self.where)
        kfuse.umount(self.fusedir)
        self.server.wait(5)
        self._remove_dirs()

    def _remove_dirs(self) -> None:
        if self._made_dir:
            try:
                os.rmdir(self.fusedir)
                os.rmdir(self._made_dir)
            except OSError:
                pass

    def __enter__(self) -> ErofsMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mount_erofs(fs: ImageFS, where: str, **kw: Any) -> ErofsMount:
    """Mount ``fs`` (a merged image, or one layer in overlay form) at ``where`` through EROFS over FUSE."""
    return ErofsMount(fs, where, **kw)
