"""The chunk index of a remote store that packs chunks (a registry, S3):
*segments* (one per flush: a pack's digest and its records) merged into
*snapshots* (sorted records, :class:`~.index.SortedIndex`, and the list of
the index objects they cover).  :class:`PackIndexChunkStore` holds what the
two backends share -- the buffered pack, the loaded index, its lookups, the
size-tiered merge and the snapshot that replaces what it covers; each backend
says how its objects are listed, fetched, written and removed
(:mod:`.registry.index`, :mod:`.s3.index`).  Formats: docs/format.md.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator

from ..errors import StoreError
from .base import ChunkStore, Location
from .fs import makedirs_private
from .index import AUTO_MERGE_MAX, SortedIndex, encode_midx, record

log = logging.getLogger(__name__)

_SEG_HEAD = struct.Struct("<4sI32s")  # b"CSRX", version, pack digest (sha256)
_SEG = struct.Struct("<32sQI")  # cid, offset, length
SNAP_MAGIC = b"CSRSNAP\0"
PACK_BYTES = 32 << 20
COMPACT_SEGMENTS = 16  # segments not yet merged that make a writer write a snapshot
# a segment lists the chunks of one pack (under PACK_BYTES, plus the chunk that fills it); a chunk
# is at least 32 bytes (its header and tag), a record 44 bytes: ~44 MiB at most
MAX_SEGMENT = _SEG_HEAD.size + _SEG.size * (PACK_BYTES // 32 + 2)
MAX_SNAPSHOT = 2 << 30  # a snapshot holds a record per chunk of the store: 2 GiB is ~25 M chunks
MULTI_GAP = 64 << 10  # with multi-range reads, a gap is bridged only up to this (a range costs no request)

#: a place in the index: (pack digest hex, offset, length)
Place = tuple[str, int, int]
#: chunks to read from one pack: (offset, length, cid)
Wanted = tuple[int, int, bytes]


def encode_segment(pack: str, recs: dict[bytes, tuple[int, int]]) -> bytes:
    """A segment: the pack ``pack`` (sha256 hex) and its chunks {cid: (offset, length)}."""
    return _SEG_HEAD.pack(b"CSRX", 1, bytes.fromhex(pack)) + b"".join(
        _SEG.pack(cid, off, n) for cid, (off, n) in recs.items())


def _decode_segment(data: bytes, what: str) -> list[tuple[bytes, str, int, int]]:
    """A segment's records (cid, pack digest hex, offset, length)."""
    if len(data) < _SEG_HEAD.size or (len(data) - _SEG_HEAD.size) % _SEG.size:
        raise StoreError(f"{what}: truncated pack index")
    magic, version, pack = _SEG_HEAD.unpack_from(data)
    if magic != b"CSRX" or version != 1:
        raise StoreError(f"{what}: unknown pack index format")
    name = pack.hex()
    return [(cid, name, off, n) for cid, off, n in _SEG.iter_unpack(data[_SEG_HEAD.size:])]


def coalesce(items: list[Wanted], max_gap: int, max_span: int) -> list[tuple[int, int, list[Wanted]]]:
    """(start, end, its chunks) of the ranges that read ``items`` (sorted here):
    neighbours with gaps up to ``max_gap`` in one range of at most ``max_span`` bytes."""
    items.sort()
    spans: list[tuple[int, int, list[Wanted]]] = []
    for off, n, c in items:
        if spans and off - spans[-1][1] <= max_gap and off + n - spans[-1][0] <= max_span:
            start, end, its = spans[-1]
            spans[-1] = (start, max(end, off + n), its + [(off, n, c)])
        else:
            spans.append((off, off + n, [(off, n, c)]))
    return spans


class PackIndexChunkStore(ChunkStore):
    """Chunks in immutable pack objects named by their sha256, with the index
    as segments and snapshots (immutable too: cached in ``index_dir`` once
    read).  A backend implements ``_load`` (list the index, read what is new
    through ``_add_snapshot`` / ``_add_segment`` / ``_drop_covered``),
    ``_range``, ``_write_pack``, ``_write_segment``, ``_put_snapshot`` and
    ``_remove_index``."""

    needs_locations = True
    #: what the index objects are called in log lines
    index_what = "the"
    #: errors of a merge after a flush that are logged, not raised (a merge is an optimisation)
    merge_errors: tuple[type[BaseException], ...] = ()
    #: a read error that is the backend failing (raised), and those that mean "not at that place"
    range_failures: tuple[type[BaseException], ...] = ()
    range_misses: tuple[type[BaseException], ...] = (KeyError,)
    #: whether a merge lists the index again first (else only if it was never loaded)
    reload_to_merge = True

    def __init__(self, index_dir: str | None) -> None:
        self.index_dir = index_dir
        self._lock = threading.RLock()
        self._reset()
        self._pending: dict[bytes, tuple[int, int]] = {}  # cid -> (offset, length) in _pack
        self._pack = bytearray()

    def _reset(self) -> None:
        """Forget the loaded index (the next lookup loads it again)."""
        self._loaded = False
        self._snaps: dict[str, SortedIndex] = {}  # snapshot name -> mapped records
        self._snap_covers: dict[str, list[str]] = {}  # snapshot name -> every index object it covers
        self._segs: dict[bytes, Place] = {}  # cid -> place, from the segments not merged
        self._seg_tags: dict[str, list[tuple[bytes, str, int, int]]] = {}  # loaded segment -> its records
        self._covered: set[str] = set()
        self._known: set[str] = set()  # pack digests (hex) the loaded index names, or this client wrote

    # -- backend hooks --------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _range(self, pack: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    def _write_pack(self, pack: bytes) -> str:
        """Write a pack object; its digest (hex)."""
        raise NotImplementedError

    def _write_segment(self, pack: str, body: bytes) -> str:
        """Write the segment ``body`` of the pack ``pack``; its name."""
        raise NotImplementedError

    def _put_snapshot(self, data: bytes, covered: list[str]) -> str:
        """Write a snapshot (its sorted index ``data``, what it covers); its name."""
        raise NotImplementedError

    def _remove_index(self, names: list[str]) -> None:
        """Remove the index objects a new snapshot covers (where the backend can)."""
        raise NotImplementedError

    # -- the index ------------------------------------------------------------
    def _cached(self, name: str, fetch: Callable[[], bytes]) -> bytes:
        """An immutable index object, from ``index_dir`` (at ``name`` below it) if it was fetched before."""
        path = os.path.join(self.index_dir, name) if self.index_dir else None
        if path:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
        data = fetch()
        if path:
            makedirs_private(os.path.dirname(path))
            tmp = f"{path}.{secrets.token_hex(4)}.tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return data

    def refresh(self) -> None:
        """Load the index objects not seen yet (one listing)."""
        with self._lock:
            self._load()

    def _add_snapshot(self, name: str, snap: SortedIndex, covered: list[str]) -> None:
        self._snaps[name] = snap
        self._snap_covers[name] = covered
        self._known |= snap.packs
        self._covered |= set(covered)

    def _add_segment(self, name: str, recs: list[tuple[bytes, str, int, int]]) -> None:
        self._seg_tags[name] = recs
        for cid, pack, off, n in recs:
            self._segs.setdefault(cid, (pack, off, n))
            self._known.add(pack)

    def _drop_covered(self) -> bool:
        """Drop the loaded snapshots and segments a snapshot covers now (merged by
        another writer, or swept by gc: what they said is in the snapshots now, or
        gone); whether any segment was dropped."""
        for t in [t for t in self._snaps if t in self._covered]:
            del self._snaps[t]
        stale = [t for t in self._seg_tags if t in self._covered]
        for t in stale:
            del self._seg_tags[t]
        if stale:
            self._segs.clear()
            for recs in self._seg_tags.values():
                for cid, pack, off, n in recs:
                    self._segs.setdefault(cid, (pack, off, n))
        return bool(stale)

    def _named_packs(self) -> set[str]:
        """The packs the loaded index names."""
        return {p for snap in self._snaps.values() for p in snap.packs} | \
            {pack for recs in self._seg_tags.values() for _c, pack, _o, _n in recs}

    def _lookup(self, cid: bytes) -> Place | None:
        if not self._loaded:
            self._load()
        loc = self._segs.get(cid)
        if loc is not None:
            return loc
        for snap in self._snaps.values():
            got = snap.find(cid)
            if got is not None:
                return got[0].hex(), got[1], got[2]
        return None

    def _records(self, segs: list[str], snaps: list[str]) -> list[bytes]:
        """The index records of the loaded snapshots ``snaps`` and segments ``segs``."""
        records: list[bytes] = []
        for t in snaps:
            records.extend(bytes(r) for r in self._snaps[t].records())
        for t in segs:
            records.extend(record(cid, bytes.fromhex(pack), off, n) for cid, pack, off, n in self._seg_tags[t])
        return records

    def _write_snapshot(self, records: list[bytes], covered: list[str], replace: bool = False) -> None:
        """One snapshot of ``records`` covering ``covered``, taken in place of
        what it covers (``replace``: of the whole loaded index, a sweep's);
        then those removed."""
        data = encode_midx(records, SNAP_MAGIC, 32)
        covered = sorted(set(covered))
        tag = self._put_snapshot(data, covered)
        snap = SortedIndex.from_bytes(data, f"index snapshot {tag}", SNAP_MAGIC, 32)
        with self._lock:
            self._snaps[tag] = snap
            self._snap_covers[tag] = covered
            self._covered |= set(covered)
            for t in covered:
                self._snaps.pop(t, None)
                for cid, pack, off, n in self._seg_tags.pop(t, ()):
                    if self._segs.get(cid) == (pack, off, n):
                        del self._segs[cid]
            if replace:
                self._snaps = {tag: snap}
                self._snap_covers = {tag: covered}
                self._segs.clear()
                self._known = set(snap.packs)
        self._remove_index(covered)

    def compact(self, full: bool = True) -> bool:
        """Merge the loaded segments (and, size-tiered, the small snapshots)
        into one snapshot; then remove what it covers where the backend can."""
        with self._lock:
            if self.reload_to_merge or not self._loaded:
                self._load()
            loose = [t for t in self._seg_tags if t not in self._covered]
            total = sum(len(self._seg_tags[t]) for t in loose)
            taken: list[str] = []
            for t, s in sorted(self._snaps.items(), key=lambda kv: kv[1].count):
                if full or (s.count <= 2 * total and total + s.count <= AUTO_MERGE_MAX):
                    taken.append(t)
                    total += s.count
            if not loose and len(taken) <= 1:
                return False
            records = self._records(loose, taken)
            covered = sorted({*loose, *taken, *(c for t in taken for c in self._snap_covers.get(t, ()))})
        self._write_snapshot(records, covered)
        return True

    # -- reads ----------------------------------------------------------------
    def _range_or_none(self, pack: str, start: int, end: int) -> bytes | None:
        """A range of a pack; None if the pack is gone or shorter (a stale place)."""
        try:
            return self._range(pack, start, end)
        except self.range_failures:
            raise
        except self.range_misses:
            return None

    def _place(self, cid: bytes) -> bytes | Place:
        """A chunk not yet flushed (its bytes), or its place in the index
        (loaded again if it is not there); KeyError if the index lacks it."""
        with self._lock:
            pend = self._pending.get(cid)
            if pend is not None:
                return bytes(self._pack[pend[0] : pend[0] + pend[1]])
            loc = self._lookup(cid)
            if loc is None:
                self._load()
                loc = self._lookup(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return loc

    def _by_pack(self, cids: list[bytes], hints: dict[bytes, Location] | None,
                 out: dict[bytes, bytes]) -> dict[str, list[Wanted]]:
        """``cids`` by the pack their hint (else the index) places them in; a
        chunk with no place is read on its own into ``out``."""
        by_pack: dict[str, list[Wanted]] = {}
        hints = hints or {}
        for c in cids:
            h = hints.get(c)
            if h is not None and len(h[0]) == 32:
                by_pack.setdefault(h[0].hex(), []).append((h[1], h[2], c))
                continue
            with self._lock:
                loc = None if c in self._pending else self._lookup(c)
            if loc is None:
                out[c] = self.get(c)
            else:
                by_pack.setdefault(loc[0], []).append((loc[1], loc[2], c))
        return by_pack

    def _deliver(self, out: dict[bytes, bytes], start: int, its: list[Wanted], data: bytes | None) -> None:
        """The chunks ``its`` of a range read from ``start`` into ``out``; each
        through the index if the range was not there (a stale hint)."""
        if data is None:
            for _off, _n, c in its:
                out[c] = self.get(c)
            return
        for off, n, c in its:
            out[c] = data[off - start : off - start + n]

    # -- the ChunkStore API ---------------------------------------------------
    def has(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._pending or self._lookup(cid) is not None

    def holds(self, hint: Location) -> bool:
        with self._lock:
            return hint[0].hex() in self._known

    def locate(self, cid: bytes) -> Location | None:
        with self._lock:
            loc = self._lookup(cid)
        return None if loc is None else (bytes.fromhex(loc[0]), loc[1], loc[2])

    def size(self, cid: bytes) -> int:
        with self._lock:
            loc = self._lookup(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return loc[2]

    def put(self, cid: bytes, blob: bytes) -> None:
        with self._lock:
            if cid in self._pending or self._lookup(cid) is not None:
                return
            self._pending[cid] = (len(self._pack), len(blob))
            self._pack += blob
            full = len(self._pack) >= PACK_BYTES
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the pending chunks as one pack, then its segment (the commit
        point for dedup: chunks are found through it); then merge segments if
        there are enough."""
        with self._lock:
            pending, pack = self._pending, bytes(self._pack)
            self._pending, self._pack = {}, bytearray()
        if pending:
            try:
                name = self._write_pack(pack)
                tag = self._write_segment(name, encode_segment(name, pending))
            except BaseException:
                with self._lock:  # kept pending: a retry of flush sends them again
                    for cid, (off, n) in pending.items():
                        self._pending.setdefault(cid, (len(self._pack), n))
                        self._pack += pack[off : off + n]
                raise
            with self._lock:
                self._add_segment(tag, [(cid, name, off, n) for cid, (off, n) in pending.items()])
        with self._lock:
            loose = [t for t in self._seg_tags if t not in self._covered]
        if len(loose) >= COMPACT_SEGMENTS:
            try:
                self.compact(full=False)
            except self.merge_errors as e:  # a merge is an optimisation: the segments stay valid
                log.warning("could not merge %s index: %s", self.index_what, e)

    def abort(self) -> None:
        with self._lock:
            self._pending.clear()
            self._pack = bytearray()

    def ids(self) -> Iterator[bytes]:
        return (c for c, _n in self.entries())

    def entries(self) -> Iterator[tuple[bytes, int]]:
        """Every indexed chunk once (a chunk in a segment and a snapshot: the segment's)."""
        with self._lock:
            self._load()
            segs = [(c, n) for c, (_p, _o, n) in self._segs.items()]
            snaps = list(self._snaps.values())
        seen: set[bytes] = set()
        for c, n in segs:
            seen.add(c)
            yield c, n
        for s in snaps:
            for c, n in s.entries():
                if c not in seen:
                    seen.add(c)
                    yield c, n

    def usage(self) -> int:
        return sum(n for _c, n in self.entries())
