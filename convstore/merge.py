"""The one layer merge: an image's layers -> the merged root filesystem tree.

A pure function over the manifest's file index (no I/O, no chunk read), used
by both the lazy reader (:class:`~convstore.reader.ImageFS` serves the tree)
and ``unpack --rootfs`` (:mod:`convstore.rootfs` writes it), so both give the
same tree and refuse the same images.

Rules (OCI image spec, layer changesets, with the refusals of a careful
extractor):

* entries apply in layer order, then tar order; a later entry replaces an
  earlier one at the same path, except that a directory over a directory
  only updates its attributes;
* ``.wh.NAME`` removes ``NAME`` (and everything under it) from lower
  layers; ``.wh..wh..opq`` removes every child of its directory that the
  same layer did not create;
* parent directories are resolved as if chrooted: a symlink met on the way is
  followed inside the image (absolute targets restart at the root); missing
  parents are created (0755, root-owned);
* refused with :class:`~convstore.errors.UnsafePathError`: an absolute entry
  path, a ``..`` component, a parent that resolves outside the root through
  symlinks, a hardlink whose target does so;
* refused with :class:`~convstore.errors.CorruptLayer`: a name with a NUL
  (legal in a PAX path record, impossible in a file system: the kernel would
  read it as a shorter name), a parent that is not a directory, a whiteout with an empty, ``.`` or ``..`` name, a hardlink to
  a missing entry or to a directory;
* an entry type convstore does not know is skipped with a warning.

Hardlinks share one :class:`Node` (``nlink`` counts the names).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import CorruptLayer, UnsafePathError
from .paths import NotADirectory, RootEscape, Step, components, resolve_dir
from .tarsplit import TarEntry

WH = ".wh."
OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE = "trusted.overlay.opaque"  # overlayfs's opaque-directory xattr (as root)
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")  # what the kernel's overlayfs reads from a lower layer
TYPE_BITS = {"0": stat.S_IFREG, "\0": stat.S_IFREG, "7": stat.S_IFREG, "2": stat.S_IFLNK,
             "3": stat.S_IFCHR, "4": stat.S_IFBLK, "5": stat.S_IFDIR, "6": stat.S_IFIFO}


@dataclass(eq=False, slots=True)
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
    layer: int = -1  # regular files: the layer whose content stream holds the bytes
    offset: int = 0  # ... and where they start in it
    nlink: int = 1
    children: dict[str, Node] | None = None
    implicit: bool = False  # a directory no entry described (a missing parent, or the root)

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def entry_components(path: str) -> list[str]:
    """Split a layer entry path; refuse absolute paths, ``..`` and NUL."""
    if "\0" in path:
        raise CorruptLayer(f"layer entry {path!r} has a NUL in its name")
    if path.startswith("/"):
        raise UnsafePathError(f"layer entry {path!r} has an absolute path")
    # the common clean path needs no filtering (the merge's hot loop); so does "./usr/bin" (tar -C dir .)
    parts = (path[2:] if path.startswith("./") else path).split("/")
    if "" in parts or "." in parts:
        parts = components(path)
    if ".." in parts:
        raise UnsafePathError(f"layer entry {path!r} climbs out of the root with '..'")
    return parts


class MergedTree:
    """The result of :func:`merge_layers`."""

    def __init__(self) -> None:
        self._next_ino = 1
        self._removals = 0  # counts _unlink calls: a resolved parent stays valid while nothing is removed
        self.root = self._new(stat.S_IFDIR | 0o755, 0, 0, 0, 0, is_dir=True)
        self.root.implicit = True
        self.warnings: list[str] = []

    def _new(self, mode: int, uid: int, gid: int, size: int, mtime_ns: int, is_dir: bool = False) -> Node:
        n = Node(self._next_ino, mode, uid, gid, size, mtime_ns, children={} if is_dir else None)
        self._next_ino += 1
        return n

    @property
    def inodes(self) -> int:
        """How many inode numbers were given out."""
        return self._next_ino - 1

    def walk(self) -> Iterator[tuple[str, Node]]:
        """(path, node) for every name, parents before children, in name order; the root is ``""``."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append((f"{path}/{name}" if path else name, node.children[name]))

    # -- building -----------------------------------------------------------
    def _parent(self, comps: list[str], path: str) -> Node:
        def step(d: Node, name: str) -> Step:
            assert d.children is not None
            child = d.children.get(name)
            if child is None:
                child = d.children[name] = self._new(stat.S_IFDIR | 0o755, 0, 0, 0, 0, is_dir=True)
                child.implicit = True
            if stat.S_ISLNK(child.mode):
                return "link", child.linkname
            return ("dir", child) if child.is_dir else ("notdir", None)

        try:
            return resolve_dir(self.root, comps, step)
        except RootEscape:
            raise UnsafePathError(f"layer entry {path!r} resolves outside the root through a symlink") from None
        except NotADirectory as e:
            raise CorruptLayer(f"layer entry {path!r}: {e} is not a directory") from None

    def _unlink(self, parent: Node, name: str) -> None:
        assert parent.children is not None
        self._removals += 1
        node = parent.children.pop(name, None)
        if node is not None and not node.is_dir:
            node.nlink -= 1

    @staticmethod
    def _set_attrs(node: Node, e: TarEntry, xattrs: dict[str, bytes]) -> None:
        node.implicit = False
        node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
        node.uid, node.gid, node.mtime_ns = e.uid, e.gid, e.mtime_ns
        node.xattrs = xattrs

    def apply(self, li: int, entries: Sequence[TarEntry], overlay: bool = False) -> None:
        """Apply one layer's entries.  With ``overlay``, whiteouts are kept in
        overlayfs's own form instead of applied: ``.wh.NAME`` becomes a 0:0
        character device ``NAME``, ``.wh..wh..opq`` the ``trusted.overlay.opaque``
        xattr on its directory (one layer as an overlay lower directory).  There
        the layer's own overlay xattrs are dropped (only this marker speaks to
        the kernel's overlayfs), and a directory that replaces a name the same
        layer whited out is made opaque, so nothing of the lower one shows."""
        created: set[int] = set()
        opaque: list[Node] = []
        whiteouts: set[int] = set()

        def xattrs_of(e: TarEntry) -> dict[str, bytes]:
            """The entry's xattrs as its node keeps them: a copy, without the layer's own overlay ones in overlay mode."""
            if not e.xattrs:
                return {}
            if overlay:
                return {k: v for k, v in e.xattrs.items() if not k.startswith(OVERLAY_XATTRS)}
            return dict(e.xattrs)

        def set_attrs(node: Node, e: TarEntry) -> None:
            self._set_attrs(node, e, xattrs_of(e))
        # entries of one directory come together: its resolution is reused until something is removed
        # (adding names never changes how an already resolved path resolves)
        last: tuple[list[str], int, Node] | None = None
        for e in entries:
            comps = entry_components(e.path)
            if not comps:
                if e.type == "5":
                    set_attrs(self.root, e)
                continue
            if last is not None and last[1] == self._removals and last[0] == comps[:-1]:
                parent = last[2]
            else:
                parent = self._parent(comps[:-1], e.path)
                last = (comps[:-1], self._removals, parent)
            assert parent.children is not None
            base = comps[-1]
            if base == OPAQUE:
                if overlay:
                    opaque.append(parent)  # marked at the end: the directory's own entry may come later
                    continue
                for name in [n for n, c in parent.children.items() if id(c) not in created]:
                    self._unlink(parent, name)
                continue
            if base.startswith(WH):
                name = base[len(WH):]
                if not name or name in (".", ".."):
                    raise CorruptLayer(f"invalid whiteout {e.path!r}")
                self._unlink(parent, name)
                if overlay:
                    node = parent.children[name] = self._new(stat.S_IFCHR, e.uid, e.gid, 0, e.mtime_ns)
                    created.add(id(node))
                    whiteouts.add(id(node))
                continue
            old = parent.children.get(base)
            if e.type == "5" and old is not None and old.is_dir:
                set_attrs(old, e)
                created.add(id(old))
                continue
            if e.type == "1":
                target = self._hardlink_target(e)
                if old is not None:
                    self._unlink(parent, base)
                target.nlink += 1
                parent.children[base] = target
                created.add(id(target))
                continue
            if e.type not in TYPE_BITS:
                self.warnings.append(f"skipped {e.path}: unsupported entry type {e.type!r}")
                continue
            if old is not None:
                self._unlink(parent, base)
            # a new inode with the entry's attributes (what _new then set_attrs would give, in one step)
            is_file = e.is_file
            node = Node(self._next_ino, TYPE_BITS[e.type] | (e.mode & 0o7777), e.uid, e.gid,
                        e.size if is_file else 0, e.mtime_ns, xattrs=xattrs_of(e),
                        children={} if e.type == "5" else None)
            self._next_ino += 1
            if overlay and node.is_dir and old is not None and id(old) in whiteouts:
                opaque.append(node)
            if is_file:
                node.layer, node.offset = li, e.offset
            elif e.type == "2":
                node.linkname = e.linkname
                node.size = len(e.linkname.encode("utf-8", "surrogateescape"))
            elif e.type in ("3", "4"):
                node.rdev = os.makedev(e.devmajor, e.devminor)
            parent.children[base] = node
            created.add(id(node))
        for d in opaque:
            d.xattrs[OVERLAY_OPAQUE] = b"y"

    def _hardlink_target(self, e: TarEntry) -> Node:
        comps = entry_components(e.linkname)
        if not comps:
            raise CorruptLayer(f"hardlink {e.path!r} has an empty target")
        parent = self._parent(comps[:-1], e.linkname)
        assert parent.children is not None
        target = parent.children.get(comps[-1])
        if target is None:
            raise CorruptLayer(f"hardlink {e.path!r} points to missing {e.linkname!r}")
        if target.is_dir:
            raise CorruptLayer(f"hardlink {e.path!r} points to a directory ({e.linkname!r})")
        return target


def merge_layers(layers: Sequence[Sequence[TarEntry]]) -> MergedTree:
    """Merge layer file indexes (lowest first) into one tree; see the module doc for the rules."""
    tree = MergedTree()
    for i, entries in enumerate(layers):
        tree.apply(i, entries)
    return tree


def layer_tree(entries: Sequence[TarEntry], li: int) -> MergedTree:
    """Layer ``li`` alone, as an overlayfs lower directory (its whiteouts in
    overlay form; the same refusals as a merge)."""
    tree = MergedTree()
    tree.apply(li, entries, overlay=True)
    return tree
