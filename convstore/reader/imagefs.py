"""``ImageFS``: the merged, read-only view of an image's layers, read lazily.

Opening an image reads its manifest only.  The tree is built from the
manifest's file index with OCI whiteout and opaque-directory semantics; file
data is fetched chunk by chunk, on demand, through a :class:`ChunkFetcher`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConvstoreError
from ..manifest import Manifest
from ..paths import MAX_LINKS, NotADirectory, RootEscape, Step, components, resolve_dir
from ..rootfs import OPAQUE, WH
from ..catalog import CatalogEntry
from ..store import Store
from ..tarsplit import TarEntry
from .fetcher import ChunkFetcher

_TYPE_BITS = {"0": stat.S_IFREG, "\0": stat.S_IFREG, "7": stat.S_IFREG, "1": stat.S_IFREG, "2": stat.S_IFLNK,
              "3": stat.S_IFCHR, "4": stat.S_IFBLK, "5": stat.S_IFDIR, "6": stat.S_IFIFO}


class FSError(ConvstoreError, OSError):
    """A path error inside an image, carrying an errno (ENOENT, ENOTDIR, ...)."""

    def __init__(self, err: int, path: str):
        OSError.__init__(self, err, f"{path}: {errno.errorcode.get(err, err)}")
        self.errno = err


@dataclass(eq=False)
class Node:
    """One inode of the merged tree (hardlinks share a Node)."""

    ino: int
    mode: int  # type bits | permission bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    layer: int = -1
    offset: int = 0
    nlink: int = 1
    children: dict[str, Node] | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass(frozen=True)
class Stat:
    st_mode: int
    st_ino: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_mtime_ns: int
    st_rdev: int

    def as_dict(self) -> dict[str, Any]:
        return {"st_mode": self.st_mode, "st_ino": self.st_ino, "st_nlink": self.st_nlink, "st_uid": self.st_uid,
                "st_gid": self.st_gid, "st_size": self.st_size, "st_mtime": self.st_mtime_ns,
                "st_atime": self.st_mtime_ns, "st_ctime": self.st_mtime_ns, "st_rdev": self.st_rdev,
                "st_blocks": (self.st_size + 511) // 512}


class ImageFS:
    """A read-only filesystem over one stored image."""

    def __init__(self, manifest: Manifest, fetcher: ChunkFetcher, prefetch_on_open: int = 0):
        self.manifest = manifest
        self.fetcher = fetcher
        #: files up to this size are fetched whole, in parallel, when opened
        self.prefetch_on_open = prefetch_on_open
        self.entry: CatalogEntry | None = None
        self._next_ino = 1
        self.root = self._new(stat.S_IFDIR | 0o755, 0, 0, 0, 0, is_dir=True)
        self.warnings: list[str] = []
        for i, layer in enumerate(manifest.layers):
            self._apply(i, layer.entries)

    @classmethod
    def from_store(cls, store: Store, ref: str, *, cache_bytes: int = 256 << 20, workers: int = 16,
                   readahead: int = 8, prefetch_on_open: int = 0) -> ImageFS:
        """Open ``ref``: loads (and authenticates) its manifest, reads no chunk."""
        entry, manifest = store.open_image(ref)
        fs = cls(manifest, ChunkFetcher(store.objects, manifest, cache_bytes=cache_bytes, workers=workers,
                                        readahead=readahead), prefetch_on_open)
        fs.entry = entry
        return fs

    def close(self) -> None:
        self.fetcher.close()

    def __enter__(self) -> ImageFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building the tree ------------------------------------------------
    def _new(self, mode: int, uid: int, gid: int, size: int, mtime_ns: int, is_dir: bool = False) -> Node:
        n = Node(self._next_ino, mode, uid, gid, size, mtime_ns, children={} if is_dir else None)
        self._next_ino += 1
        return n

    def _parent_dir(self, comps: list[str]) -> Node | None:
        """Resolve (creating implicit directories) the directory holding an
        entry, following symlinks inside the image; None if it escapes."""

        def step(d: Node, name: str) -> Step:
            assert d.children is not None
            child = d.children.get(name)
            if child is None:
                child = d.children[name] = self._new(stat.S_IFDIR | 0o755, 0, 0, 0, 0, is_dir=True)
            if stat.S_ISLNK(child.mode):
                return "link", child.linkname
            return ("dir", child) if child.is_dir else ("notdir", None)

        try:
            return resolve_dir(self.root, comps, step)
        except (RootEscape, NotADirectory):
            return None

    def _apply(self, li: int, entries: list[TarEntry]) -> None:
        created: set[int] = set()
        for e in entries:
            comps = components(e.path)
            if not comps:
                if e.type == "5":
                    self._set_attrs(self.root, e)
                continue
            if ".." in comps:
                self.warnings.append(f"skipped {e.path!r}: climbs out of the root")
                continue
            parent = self._parent_dir(comps[:-1])
            if parent is None or parent.children is None:
                self.warnings.append(f"skipped {e.path!r}: parent is not a directory inside the image")
                continue
            base = comps[-1]
            if base == OPAQUE:
                for name in [n for n, c in parent.children.items() if id(c) not in created]:
                    self._unlink(parent, name)
                continue
            if base.startswith(WH):
                self._unlink(parent, base[len(WH):])
                continue
            old = parent.children.get(base)
            if e.type == "5" and old is not None and old.is_dir:
                self._set_attrs(old, e)
                created.add(id(old))
                continue
            if old is not None:
                self._unlink(parent, base)
            if e.type == "1":
                target = self._lookup_entry(e.linkname)
                if target is None or target.is_dir:
                    self.warnings.append(f"skipped hardlink {e.path!r}: target {e.linkname!r} not found")
                    continue
                target.nlink += 1
                parent.children[base] = target
                continue
            node = self._new(_TYPE_BITS.get(e.type, stat.S_IFREG) | (e.mode & 0o7777), e.uid, e.gid,
                             e.size if e.is_file else 0, e.mtime_ns, is_dir=e.type == "5")
            self._set_attrs(node, e)
            if e.is_file:
                node.layer, node.offset = li, e.offset
            elif e.type == "2":
                node.linkname = e.linkname
                node.size = len(e.linkname.encode("utf-8", "surrogateescape"))
            elif e.type in ("3", "4"):
                node.rdev = os.makedev(e.devmajor, e.devminor)
            parent.children[base] = node
            created.add(id(node))

    def _set_attrs(self, node: Node, e: TarEntry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
        node.uid, node.gid, node.mtime_ns = e.uid, e.gid, e.mtime_ns
        node.xattrs = dict(e.xattrs)

    def _unlink(self, parent: Node, name: str) -> None:
        assert parent.children is not None
        node = parent.children.pop(name, None)
        if node is not None and not node.is_dir:
            node.nlink -= 1

    def _lookup_entry(self, path: str) -> Node | None:
        comps = components(path)
        if not comps or ".." in comps:
            return None
        parent = self._parent_dir(comps[:-1])
        if parent is None or parent.children is None:
            return None
        return parent.children.get(comps[-1])

    # -- lookups ------------------------------------------------------------
    def lookup(self, path: str, follow: bool = False) -> Node:
        """The node at ``path``.  Intermediate symlinks are followed inside the
        image; the last component only with ``follow``."""
        comps = components(path)
        node = self.root
        stack: list[Node] = []
        links = 0
        queue = list(comps)
        while queue:
            c = queue.pop(0)
            if c == "..":
                node = stack.pop() if stack else self.root
                continue
            if node.children is None:
                raise FSError(errno.ENOTDIR, path)
            child = node.children.get(c)
            if child is None:
                raise FSError(errno.ENOENT, path)
            if stat.S_ISLNK(child.mode) and (queue or follow):
                links += 1
                if links > MAX_LINKS:
                    raise FSError(errno.ELOOP, path)
                if child.linkname.startswith("/"):
                    node, stack = self.root, []
                queue = components(child.linkname) + queue
                continue
            stack.append(node)
            node = child
        return node

    def stat(self, path: str, follow: bool = False) -> Stat:
        n = self.lookup(path, follow)
        nlink = n.nlink
        if n.is_dir:
            assert n.children is not None
            nlink = 2 + sum(1 for c in n.children.values() if c.is_dir)
        return Stat(n.mode, n.ino, nlink, n.uid, n.gid, n.size, n.mtime_ns, n.rdev)

    def listdir(self, path: str = "/") -> list[str]:
        n = self.lookup(path, follow=True)
        if n.children is None:
            raise FSError(errno.ENOTDIR, path)
        return list(n.children)

    def readlink(self, path: str) -> str:
        n = self.lookup(path)
        if not stat.S_ISLNK(n.mode):
            raise FSError(errno.EINVAL, path)
        return n.linkname

    def listxattr(self, path: str) -> list[str]:
        return list(self.lookup(path).xattrs)

    def getxattr(self, path: str, name: str) -> bytes:
        x = self.lookup(path).xattrs
        if name not in x:
            raise FSError(errno.ENODATA, path)
        return x[name]

    def opened(self, node: Node) -> None:
        """A file was opened: fetch it whole ahead of the reads if it is small."""
        if 0 < node.size <= self.prefetch_on_open and node.layer >= 0:
            self.fetcher.prefetch_range(node.layer, node.offset, node.size)

    def read_node(self, node: Node, offset: int, size: int) -> bytes:
        if offset >= node.size or size <= 0:
            return b""
        return self.fetcher.read(node.layer, node.offset + offset, min(size, node.size - offset))

    def open(self, path: str) -> io.BufferedReader:
        """A seekable binary file; reads fetch only the chunks they cover."""
        n = self.lookup(path, follow=True)
        if not stat.S_ISREG(n.mode):
            raise FSError(errno.EISDIR if n.is_dir else errno.EINVAL, path)
        return io.BufferedReader(LazyFile(self, n), buffer_size=128 * 1024)

    def walk(self, path: str = "/"):  # type: ignore[no-untyped-def]
        """(path, node) for every entry below ``path``, depth first."""
        start = self.lookup(path, follow=True)
        todo = [(path.rstrip("/") or "/", start)]
        while todo:
            p, n = todo.pop()
            yield p, n
            if n.children:
                for name, c in sorted(n.children.items(), reverse=True):
                    todo.append(((p.rstrip("/") + "/" + name), c))


class LazyFile(io.RawIOBase):
    """Raw seekable reader over one regular file of an :class:`ImageFS`."""

    def __init__(self, fs: ImageFS, node: Node):
        self._fs = fs
        self._node = node
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        elif whence == io.SEEK_END:
            self._pos = self._node.size + offset
        if self._pos < 0:
            raise ValueError("negative seek position")
        return self._pos

    def readinto(self, b: Any) -> int:
        data = self._fs.read_node(self._node, self._pos, len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        self._pos += n
        return n
