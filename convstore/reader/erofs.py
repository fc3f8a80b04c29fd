"""An EROFS image of an image tree, for the kernel to serve a lower layer.

:func:`build` lays out an uncompressed EROFS filesystem (4 KiB blocks) for a
tree of :class:`~convstore.merge.Node` (an :class:`ImageFS`'s root: the merged
image, or one layer in overlay form):

* block 0 holds the superblock (at byte 1024), then come the inodes (64-byte
  extended inodes, so uid/gid > 65535, 64-bit sizes and nanosecond mtimes
  round-trip; inline xattrs after each), short symlink targets inline after
  their inode (FLAT_INLINE), then directory blocks (FLAT_PLAIN);
* after the metadata, the **data area**: every regular file's bytes start
  at a block address of their own (FLAT_PLAIN), in content-stream order
  (layer, offset), so the kernel's readahead over the image becomes
  sequential reads of the chunks.

Only the metadata is held as bytes (:attr:`ErofsLayout.meta`); the data
area is a map of block ranges to files (:attr:`ErofsLayout.extents`), read
on demand through the image's fetcher (:meth:`ErofsLayout.read`): nothing
plaintext is written anywhere.  The layout is deterministic (same tree, same
bytes) and never persisted (rebuilt from the manifest each time), so it has
no version of its own; the EROFS on-disk format is the kernel's
(fs/erofs/erofs_fs.h, erofs-utils include/erofs_fs.h), and only its oldest
features are used (no compression, chunks, devices, shared or long-prefix
xattrs, 48-bit addresses): any kernel with EROFS (5.4+) reads the format,
and 6.12+ mounts it from a regular file.

Hand-written: no maintained Python EROFS writer exists (erofs-utils'
``mkfs.erofs`` needs the tree unpacked on disk, which is what this avoids).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable

from ..errors import ErofsUnsupported
from ..merge import Node

BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
META_BLKADDR = 1  # inodes start at block 1: nid 0 (the root) is the first inode

# i_format: bit 0 = extended inode, bits 1-3 = data layout
FLAT_PLAIN, FLAT_INLINE = 0, 2
EXTENDED = 1

SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")  # 128 bytes
INODE = struct.Struct("<HHHHQIIIIqII16x")  # erofs_inode_extended: 64 bytes
XATTR_HEAD = struct.Struct("<IB7x")  # erofs_xattr_ibody_header: name filter, shared count
XATTR_ENTRY = struct.Struct("<BBH")  # name length, name index, value size
DIRENT = struct.Struct("<QHBx")  # nid, nameoff, file type
assert SUPER.size == 128 and INODE.size == 64 and XATTR_HEAD.size == 12 and DIRENT.size == 12

FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = 1, 2, 3, 4, 5, 6, 7
_FTYPE = {stat.S_IFREG: FT_REG, stat.S_IFDIR: FT_DIR, stat.S_IFCHR: FT_CHR, stat.S_IFBLK: FT_BLK,
          stat.S_IFIFO: FT_FIFO, stat.S_IFSOCK: FT_SOCK, stat.S_IFLNK: FT_LNK}

# xattr name indexes (exact names first, then prefixes)
_XATTR_EXACT = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}
_XATTR_PREFIX = (("user.", 1), ("trusted.", 4), ("security.", 6))


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _xattr_body(node: Node) -> bytes:
    """The inline xattr area (header + entries), or b"" without xattrs."""
    if not node.xattrs:
        return b""
    out = [XATTR_HEAD.pack(0, 0)]
    for name in sorted(node.xattrs):
        value = node.xattrs[name]
        index = _XATTR_EXACT.get(name)
        suffix = b""
        if index is None:
            for prefix, index in _XATTR_PREFIX:
                if name.startswith(prefix) and len(name) > len(prefix):
                    suffix = name[len(prefix):].encode()
                    break
            else:
                raise ErofsUnsupported(f"xattr {name!r}: EROFS stores only user., trusted., security. and "
                                       "POSIX ACL attributes")
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise ErofsUnsupported(f"xattr {name!r}: name over 255 bytes or value over 64 KiB")
        e = XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out.append(e + bytes(_round(len(e), 4) - len(e)))
    return b"".join(out)


def _dir_blocks(names: list[bytes]) -> list[int]:
    """How many of the (sorted) names each directory block holds: dirents then names, at most a block."""
    counts: list[int] = []
    i = 0
    while i < len(names):
        j, used = i, 0
        while j < len(names) and used + DIRENT.size + len(names[j]) <= BLOCK:
            used += DIRENT.size + len(names[j])
            j += 1
        counts.append(j - i)
        i = j
    return counts


def _dir_block(group: list[tuple[bytes, int, int]]) -> bytes:
    """One directory block's bytes (unpadded) for (name, nid, file type) entries."""
    nameoff = DIRENT.size * len(group)
    heads = []
    for name, nid, ftype in group:
        heads.append(DIRENT.pack(nid, nameoff, ftype))
        nameoff += len(name)
    return b"".join(heads) + b"".join(name for name, _nid, _ft in group)


@dataclass(frozen=True)
class Extent:
    """A regular file's bytes in the data area: from block ``block``, ``node.size`` bytes."""

    block: int
    node: Node


class ErofsLayout:
    """The EROFS image of one tree: metadata bytes, then the files' data by block."""

    def __init__(self, meta: bytes, extents: list[Extent], blocks: int, inodes: int):
        #: blocks [0, len(meta) / BLOCK): superblock, inodes, directories
        self.meta = meta
        #: the regular files with data, by block address
        self.extents = extents
        self._starts = [e.block * BLOCK for e in extents]
        #: the image's size in blocks and bytes
        self.blocks = blocks
        self.size = blocks * BLOCK
        self.inodes = inodes

    def read(self, offset: int, size: int, read_node: Callable[[Node, int, int], bytes]) -> bytes:
        """Bytes ``[offset, offset + size)`` of the image (short at its end): metadata from memory, file
        data through ``read_node(node, offset, size)`` (the fetcher), zeros in each file's last block."""
        end = min(offset + size, self.size)
        out: list[bytes] = []
        pos = offset
        if pos < len(self.meta):
            out.append(self.meta[pos:min(end, len(self.meta))])
            pos = min(end, len(self.meta))
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if i >= 0:
                ext = self.extents[i]
                start = self._starts[i]
                fend = min(start + ext.node.size, end)
                if pos < fend:
                    data = read_node(ext.node, pos - start, fend - pos)
                    if len(data) != fend - pos:
                        raise EOFError(f"short read of inode {ext.node.ino}: {len(data)} of {fend - pos} bytes")
                    out.append(data)
                    pos = fend
                    continue
            nxt = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
            gap = min(nxt, end) - pos
            out.append(bytes(gap))
            pos += gap
            i += 1
        return b"".join(out)


def build(root: Node, *, name: str = "") -> ErofsLayout:
    """The EROFS layout of the tree under ``root`` (hardlinks: nodes shared between directories).
    ``name``: a volume label (what the uuid is derived from with the metadata)."""
    # 1. every inode once, directories breadth first (the root is nid 0, as the superblock wants)
    order: list[Node] = []
    seen: dict[int, int] = {}  # id(node) -> index in order
    parent: dict[int, Node] = {id(root): root}
    links: dict[int, int] = {}
    todo = [root]
    seen[id(root)] = 0
    order.append(root)
    k = 0
    while k < len(todo):
        d = todo[k]
        k += 1
        assert d.children is not None
        for cname in sorted(d.children, key=os.fsencode):
            c = d.children[cname]
            links[id(c)] = links.get(id(c), 0) + 1
            if id(c) in seen:
                if c.is_dir:
                    raise ErofsUnsupported(f"directory inode {c.ino} is linked twice")
                continue
            seen[id(c)] = len(order)
            order.append(c)
            if c.is_dir:
                parent[id(c)] = d
                todo.append(c)

    # 2. directory entries by name, in blocks; a directory's last block sits inline after its inode
    #    (FLAT_INLINE) when it fits there, as a short symlink's target does
    xattrs = [_xattr_body(n) for n in order]
    names: dict[int, list[tuple[bytes, Node]]] = {}
    groups: dict[int, list[int]] = {}
    tails: list[int] = []  # bytes inline after each inode (-1: not inline)
    for idx, (n, x) in enumerate(zip(order, xattrs)):
        tail = -1
        if n.is_dir:
            assert n.children is not None
            ents = []
            for cname, c in n.children.items():
                bname = os.fsencode(cname)
                if not 0 < len(bname) <= 255:
                    raise ErofsUnsupported(f"name {cname!r}: EROFS names are 1 to 255 bytes")
                if b"\0" in bname or b"/" in bname or bname in (b".", b".."):
                    # the kernel compares a name up to a NUL: "passwd\0x" would answer a lookup of "passwd"
                    raise ErofsUnsupported(f"name {cname!r}: a NUL, a '/', '.' or '..' is no EROFS name")
                ents.append((bname, c))
            ents += [(b".", n), (b"..", parent[id(n)])]
            ents.sort(key=lambda e: e[0])
            names[idx] = ents
            groups[idx] = counts = _dir_blocks([e[0] for e in ents])
            last = sum(DIRENT.size + len(e[0]) for e in ents[len(ents) - counts[-1]:])
            if INODE.size + len(x) + last <= BLOCK:
                tail = last
        elif stat.S_ISLNK(n.mode):
            target = os.fsencode(n.linkname)
            if len(target) >= BLOCK:
                raise ErofsUnsupported(f"symlink target of {len(target)} bytes (at most {BLOCK - 1})")
            if INODE.size + len(x) + len(target) <= BLOCK:
                tail = len(target)
        tails.append(tail)

    # 3. inode records (inode, xattrs, inline tail), 32-byte aligned; none that fits a block crosses one
    offsets: list[int] = []
    pos = META_BLKADDR * BLOCK
    for x, tail in zip(xattrs, tails):
        size = INODE.size + len(x) + max(tail, 0)
        if size <= BLOCK and pos // BLOCK != (pos + size - 1) // BLOCK:
            pos = _round(pos, BLOCK)
        offsets.append(pos)
        pos = _round(pos + size, 32)
    nids = [(o - META_BLKADDR * BLOCK) // 32 for o in offsets]
    if nids[0] != 0:
        raise AssertionError("the root inode is not nid 0")
    block = _round(pos, BLOCK) // BLOCK

    # 4. the blocks of directories and symlinks not (wholly) inline, after the inodes
    content: dict[int, tuple[int, list[bytes], int]] = {}  # index -> (first block, blocks unpadded, i_size)
    for idx, n in enumerate(order):
        if n.is_dir:
            ents, blocks, i = names[idx], [], 0
            for count in groups[idx]:
                blocks.append(_dir_block([(nm, nids[seen[id(c)]], _FTYPE.get(stat.S_IFMT(c.mode), 0))
                                          for nm, c in ents[i:i + count]]))
                i += count
            content[idx] = (block, blocks, (len(blocks) - 1) * BLOCK + len(blocks[-1]))
            block += len(blocks) - (tails[idx] >= 0)
        elif stat.S_ISLNK(n.mode):
            target = os.fsencode(n.linkname)
            content[idx] = (block, [target], len(target))
            block += tails[idx] < 0
    meta_blocks = block

    # 5. the data area: regular files in content-stream order
    extents: list[Extent] = []
    start_of: dict[int, int] = {}
    files = sorted((i for i, n in enumerate(order) if n.is_file and n.size > 0),
                   key=lambda i: (order[i].layer, order[i].offset, i))
    for idx in files:
        start_of[idx] = block
        extents.append(Extent(block, order[idx]))
        block += _round(order[idx].size, BLOCK) // BLOCK
    if block >= 1 << 32:
        raise ErofsUnsupported("image over 16 TiB")

    # 6. the bytes: superblock, inodes, directory and symlink blocks
    meta = bytearray(meta_blocks * BLOCK)
    for idx, n in enumerate(order):
        fmt = stat.S_IFMT(n.mode)
        layout, startblk, size, tail_bytes = FLAT_PLAIN, 0, n.size, b""
        nlink = links.get(id(n), 1)
        if idx in content:
            startblk, blocks, size = content[idx]
            if tails[idx] >= 0:
                layout, tail_bytes = FLAT_INLINE, blocks[-1]
                blocks = blocks[:-1]
            for k, data in enumerate(blocks):
                meta[(startblk + k) * BLOCK:(startblk + k) * BLOCK + len(data)] = data
            if not blocks:
                startblk = 0
            if n.is_dir:
                assert n.children is not None
                nlink = 2 + sum(1 for c in n.children.values() if c.is_dir)
        elif fmt == stat.S_IFREG:
            startblk = start_of.get(idx, 0)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = os.major(n.rdev), os.minor(n.rdev)
            startblk = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)  # the kernel's new_encode_dev
            size = 0
        else:
            size = 0
        x = xattrs[idx]
        secs, nsec = divmod(n.mtime_ns, 1_000_000_000)
        try:
            rec = INODE.pack(EXTENDED | layout << 1, (len(x) - XATTR_HEAD.size) // 4 + 1 if x else 0,
                             n.mode & 0xFFFF, 0, size, startblk & 0xFFFFFFFF, (idx + 1) & 0xFFFFFFFF, n.uid, n.gid,
                             secs, nsec, nlink) + x + tail_bytes
        except struct.error as e:
            raise ErofsUnsupported(f"inode {n.ino}: a field out of EROFS's range ({e})") from None
        meta[offsets[idx]:offsets[idx] + len(rec)] = rec
    label = name.encode()[:16]
    uuid = hashlib.sha256(bytes(meta) + label).digest()[:16]
    sb = SUPER.pack(MAGIC, 0, 0, BLOCK_BITS, 0, nids[0], len(order), 0, 0, block, META_BLKADDR, 0, uuid, label,
                    0, 0, 0, 0, 0, 0, 0, 0, 0)
    meta[SUPER_OFFSET:SUPER_OFFSET + SUPER.size] = sb
    return ErofsLayout(bytes(meta), extents, block, len(order))
