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
import tempfile
from typing import Any

from ..errors import KernelFuseError
from ..merge import Node
from . import kfuse
from .erofs import ErofsLayout, build
from .imagefs import ImageFS

IMAGE_NAME = "layer.erofs"
MS_RDONLY, MS_NODEV = 1, 4

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
        self.file = Node(2, stat.S_IFREG | 0o444, 0, 0, layout.size, 0)
        self.root = Node(1, stat.S_IFDIR | 0o555, 0, 0, 0, 0, children={IMAGE_NAME: self.file})
        self.inodes = 2
        self._opened: set[int] = set()
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
            self._opened.add(node.ino)
            self.image.opened(node)
        self.data_bytes += size
        return self.image.read_node(node, offset, size)


def mount_image(image: str, where: str) -> None:
    """mount(2) the EROFS image file ``image`` at ``where``, read-only (file-backed: no loop device)."""
    if _libc.mount(os.fsencode(image), os.fsencode(where), b"erofs", MS_RDONLY | MS_NODEV, None) != 0:
        e = ctypes.get_errno()
        raise KernelFuseError(f"cannot mount the EROFS image {image} at {where}: {os.strerror(e)}")


class ErofsMount:
    """``fs`` at ``where`` through EROFS over a FUSE-served image; :meth:`close` unmounts both."""

    def __init__(self, fs: ImageFS, where: str, *, fusedir: str | None = None, name: str = ""):
        self.fs = fs
        self.where = where
        self.layout = build(fs.root, name=name)
        self.fusedir = fusedir or tempfile.mkdtemp(prefix="convstore-erofs-")
        self._made_dir = fusedir is None
        self.file_fs = ImageFileFS(fs, self.layout)
        self.server: Any = kfuse.start(self.file_fs, self.fusedir, read_only=True)
        try:
            mount_image(os.path.join(self.fusedir, IMAGE_NAME), where)
        except BaseException:
            kfuse.umount(self.fusedir)
            self.server.wait(5)
            raise

    @property
    def ops(self) -> dict[int, int]:
        """FUSE requests by opcode (kfuse's counts) on the image file's mount."""
        return dict(self.server.ops)

    def close(self) -> None:
        kfuse.umount(self.where)
        kfuse.umount(self.fusedir)
        self.server.wait(5)
        if self._made_dir:
            try:
                os.rmdir(self.fusedir)
            except OSError:
                pass

    def __enter__(self) -> ErofsMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mount_erofs(fs: ImageFS, where: str, **kw: Any) -> ErofsMount:
    """Mount ``fs`` (a merged image, or one layer in overlay form) at ``where`` through EROFS over FUSE."""
    return ErofsMount(fs, where, **kw)
