"""Sorted chunk indexes: git's ``multi-pack-index`` shape, shared by the
local pack files (:mod:`.packs`: a ``.midx`` merges the indexes of many packs)
and a registry store (:mod:`.registry.index`: an index snapshot, the same
layout with 32-byte pack digests and its own magic).

Sorted records read through ``mmap`` with a 256-entry fanout table and a
binary search: opening an index maps one file and a lookup touches a few
pages.  Format (little-endian, see docs/format.md)::

    NAME.midx  b"CSMIDX\\0\\0" | u32 version 1 | u32 npacks | u64 count
               | npacks x pack name (16, raw) | fanout 256 x u64
               | count x (cid 32 | pack name 16 | u64 offset | u32 length | u32 0), sorted by cid
               | blake3 of everything before (32)
"""

from __future__ import annotations

import hmac
import mmap
import os
import struct
from collections.abc import Iterator
from itertools import chain

from blake3 import blake3

from ..errors import StoreError, StoreFormatError

VERSION = 1
MIDX_MAGIC = b"CSMIDX\0\0"
_MIDX_HEAD = struct.Struct("<8sIIQ")
_FANOUT = struct.Struct("<256Q")
AUTO_MERGE_MAX = 1 << 18  # records: bigger merges are left to gc (compact(full=True))


class SortedIndex:
    """A multi-pack index (or a registry's index snapshot: the same layout
    with 32-byte container names and its own magic), mapped read-only."""

    def __init__(self, fd: int, what: str, magic: bytes = MIDX_MAGIC, name_len: int = 16):
        try:
            size = os.fstat(fd).st_size
            if size < _MIDX_HEAD.size + _FANOUT.size + 32:
                raise StoreError(f"{what}: truncated index")
            self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.file_backed = True
        self._init(what, magic, name_len, size)

    @classmethod
    def from_bytes(cls, data: bytes, what: str, magic: bytes = MIDX_MAGIC, name_len: int = 16) -> SortedIndex:
        """An index held in anonymous memory (no file to map)."""
        self = cls.__new__(cls)
        if len(data) < _MIDX_HEAD.size + _FANOUT.size + 32:
            raise StoreError(f"{what}: truncated index")
        self.mm = mmap.mmap(-1, len(data))
        self.mm.write(data)
        self.file_backed = False
        self._init(what, magic, name_len, len(data))
        return self

    def _drop(self, start: int, stop: int) -> None:
        """Drop the pages of ``[start, stop)`` from this process's page tables
        (a file-backed map only: the file keeps the bytes; an anonymous map
        would lose them)."""
        if not self.file_backed:
            return
        page = start - start % mmap.PAGESIZE
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, page, stop - page)
        except (OSError, ValueError, AttributeError):
            pass

    def _init(self, what: str, want_magic: bytes, name_len: int, size: int) -> None:
        magic, version, npacks, count = _MIDX_HEAD.unpack_from(self.mm)
        if magic != want_magic:
            raise StoreError(f"{what}: not a convstore index")
        if version != VERSION:
            raise StoreFormatError(f"{what}: index version {version} is not supported")
        self.name_len = name_len
        self.rec = struct.Struct(f"<32s{name_len}sQII")
        self.fan_at = _MIDX_HEAD.size + name_len * npacks
        self.base = self.fan_at + _FANOUT.size
        if size != self.base + count * self.rec.size + 32:
            raise StoreError(f"{what}: index has a bad length")
        h = _MIDX_HEAD.size
        self.packs = {bytes(self.mm[h + name_len * i : h + name_len * (i + 1)]).hex() for i in range(npacks)}
        self.fanout = _FANOUT.unpack_from(self.mm, self.fan_at)
        if self.fanout[255] != count or any(a > b for a, b in zip(self.fanout, self.fanout[1:])):
            raise StoreError(f"{what}: multi-pack index has a bad fanout table")
        self.count = count

    def find(self, cid: bytes) -> tuple[bytes, int, int] | None:
        """(raw pack name, offset, length) of ``cid``, by binary search in its fanout bucket."""
        b = cid[0]
        lo = self.fanout[b - 1] if b else 0
        hi = self.fanout[b]
        mm, base, size = self.mm, self.base, self.rec.size
        while lo < hi:
            mid = (lo + hi) >> 1
            p = base + mid * size
            k = mm[p : p + 32]
            if k < cid:
                lo = mid + 1
            elif k > cid:
                hi = mid
            else:
                _c, pack, off, ln, _r = self.rec.unpack_from(mm, p)
                return pack, off, ln
        return None

    def records(self) -> Iterator[bytes]:
        """Every record (cid | container name | offset | length | 0), in cid order."""
        mm, n = self.mm, self.rec.size
        for start, stop in self._spans():
            for p in range(start, stop, n):
                yield mm[p : p + n]

    def _spans(self) -> Iterator[tuple[int, int]]:
        """The record area in slices of about 4 MiB, each dropped from this
        process's page tables once the caller has moved on (a scan of the
        whole index would otherwise count every page in the RSS)."""
        step = ((4 << 20) // self.rec.size) * self.rec.size
        end = self.base + self.count * self.rec.size
        for start in range(self.base, end, step):
            stop = min(end, start + step)
            yield start, stop
            self._drop(start, stop)

    def bucket_cids(self, first: int) -> set[bytes]:
        """The cids whose first byte is ``first`` (built in C; the pages read are dropped behind)."""
        lo = self.fanout[first - 1] if first else 0
        start, stop = self.base + lo * self.rec.size, self.base + self.fanout[first] * self.rec.size
        if start == stop:
            return set()
        view = memoryview(self.mm)[start:stop]
        try:
            out = set(chain.from_iterable(struct.iter_unpack(f"<32s{self.rec.size - 32}x", view)))
            if out and (min(out)[0] != first or max(out)[0] != first):  # a damaged or planted index
                out = {c for c in out if c[0] == first}
            return out
        finally:
            view.release()
            self._drop(start, stop)

    def entries(self, live: set[bytes] | None = None) -> Iterator[tuple[bytes, int]]:
        """(cid, length) of every record whose container is in ``live`` (all if None)."""
        a, b = 32, 32 + self.name_len
        for r in self.records():
            if live is None or r[a:b] in live:
                yield r[:32], int.from_bytes(r[b + 8 : b + 12], "little")

    def checksum_ok(self) -> bool:
        """Whether the trailing BLAKE3 matches (read in slices, pages dropped behind)."""
        h = blake3()
        end = len(self.mm) - 32
        step = 4 << 20
        for start in range(0, end, step):
            stop = min(end, start + step)
            view = memoryview(self.mm)[start:stop]
            h.update(view)
            view.release()
            self._drop(start, stop)
        return hmac.compare_digest(h.digest(), self.mm[end:])


def record(cid: bytes, container: bytes, off: int, ln: int) -> bytes:
    """One index record (a container name of 16 or 32 bytes)."""
    return cid + container + struct.pack("<QII", off, ln, 0)


def encode_midx(records: list[bytes], magic: bytes = MIDX_MAGIC, name_len: int = 16) -> bytes:
    """An index of ``records`` (in any order; sorted here in place, and of a
    cid listed more than once only the first in sort order is kept)."""
    records.sort()
    records = [r for i, r in enumerate(records) if i == 0 or r[:32] != records[i - 1][:32]]
    packs = sorted({r[32 : 32 + name_len] for r in records})
    fan = [0] * 256
    for r in records:
        fan[r[0]] += 1
    for i in range(1, 256):
        fan[i] += fan[i - 1]
    body = b"".join([_MIDX_HEAD.pack(magic, VERSION, len(packs), len(records)), *packs,
                     _FANOUT.pack(*fan), *records])
    return body + blake3(body).digest()
