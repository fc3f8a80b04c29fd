"""An S3 store's chunks: pack objects ``PREFIX/packs/<sha256 hex>`` and the
chunk index under ``PREFIX/index/`` (see :class:`S3ChunkStore`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterator

from ...errors import S3Error, StoreError
from ..base import ChunkSet, ChunkStore, Location
from ..fs import makedirs_private
from ..index import AUTO_MERGE_MAX, SortedIndex, encode_midx, record
from ..registry.index import _SEG, _SEG_HEAD, MAX_SEGMENT, MULTI_GAP, PACK_BYTES, SNAP_MAGIC, _decode_segment
from .client import S3Client

log = logging.getLogger(__name__)

PACKS = "packs/"
INDEX = "index/"
_INDEX_NAME = re.compile(r"[sx]-[0-9a-f]{32}\Z")
_PACK_NAME = re.compile(r"[0-9a-f]{64}\Z")
#: a snapshot object: magic, version, length of the JSON list of what it covers, that list, then the index
_SNAP_HEAD = struct.Struct("<8sII")
S3_SNAP_MAGIC = b"CSS3SNAP"
COMPACT_SEGMENTS = 16
MAX_SNAPSHOT = 2 << 30


class S3ChunkStore(ChunkStore):
    """Chunks in pack objects of one bucket prefix, as in a registry store
    (:class:`~convstore.stores.registry.index.RegistryChunkStore`):

    * the chunks written between two flushes (at most ``PACK_BYTES``) are one
      object ``packs/<sha256 of its bytes>``, written only if absent;
    * reads go by the location hint an image manifest holds: one ranged GET,
      no index;
    * the index (dedup for writers, and chunks without a good hint) is
      *segments* ``index/x-<random>`` (one per flush: the pack's digest and
      its records, the same encoding as a registry segment) merged into
      *snapshots* ``index/s-<random>`` (sorted records and the list of the
      index objects they cover); both are immutable, so they are cached in
      ``index_dir`` once read.

    Unlike a registry, S3 has no garbage collection of its own, so this store
    deletes: :meth:`delete` rewrites the packs that keep live chunks, writes
    one snapshot of what remains (covering every index object before it),
    then removes the old index objects and packs (gc runs under the store's
    exclusive gc lease, so no writer is adding to the index meanwhile).
    A hint into a removed pack costs a reader one index load.
    """

    supports_deletes = True
    needs_locations = True

    def __init__(self, client: S3Client, index_dir: str | None = None) -> None:
        self.client = client
        self.url = client.url
        self.index_dir = index_dir
        self._lock = threading.RLock()
        self._reset()
        self._pending: dict[bytes, tuple[int, int]] = {}
        self._pack = bytearray()

    def _reset(self) -> None:
        self._loaded = False
        self._snaps: dict[str, SortedIndex] = {}
        self._snap_covers: dict[str, list[str]] = {}
        self._segs: dict[bytes, tuple[str, int, int]] = {}  # cid -> (pack hex, offset, length), not merged
        self._seg_tags: dict[str, list[tuple[bytes, str, int, int]]] = {}
        self._covered: set[str] = set()
        self._known: set[str] = set()  # pack names (hex) the loaded index names, or this client wrote

    def __repr__(self) -> str:
        return f"S3ChunkStore({self.url})"

    # -- the index ------------------------------------------------------------
    def _cached(self, name: str, fetch: Callable[[], bytes]) -> bytes:
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

    def _fetch(self, tag: str, max_bytes: int) -> bytes:
        """An index object, from ``index_dir`` if it was read before (they are immutable)."""
        return self._cached(tag, lambda: self.client.get(INDEX + tag, max_bytes=max_bytes))

    def refresh(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> None:
        objs, _now = self.client.list_with_time(INDEX)
        names = sorted(n[len(INDEX):] for n, _s, _m in objs if _INDEX_NAME.match(n[len(INDEX):]))
        for t in [t for t in names if t.startswith("s-") and t not in self._snaps and t not in self._covered]:
            try:
                data = self._fetch(t, MAX_SNAPSHOT)
                covered, snap = _decode_snapshot(data, t)
            except KeyError:
                continue  # merged and removed meanwhile
            except (StoreError, ValueError) as e:
                if isinstance(e, S3Error):
                    raise
                log.warning("skipping index snapshot %s: %s", t, e)
                continue
            self._snaps[t] = snap
            self._snap_covers[t] = covered
            self._known |= set(snap.packs)
            self._covered |= set(covered)
        for t in [t for t in self._snaps if t in self._covered]:
            del self._snaps[t]
        for t in [t for t in self._seg_tags if t in self._covered]:  # merged since: their places may be gone
            for cid, pack, off, n in self._seg_tags.pop(t):
                if self._segs.get(cid) == (pack, off, n):
                    del self._segs[cid]
        for t in [t for t in names if t.startswith("x-") and t not in self._seg_tags and t not in self._covered]:
            try:
                data = self._fetch(t, MAX_SEGMENT)
                recs = _decode_segment(data, t)
            except KeyError:
                continue
            except StoreError as e:
                if isinstance(e, S3Error):
                    raise
                log.warning("skipping pack index %s: %s", t, e)
                continue
            self._add_segment(t, [(cid, pack.split(":", 1)[1], off, n) for cid, pack, off, n in recs])
        # the packs the index names now (a gc since the last load may have removed some)
        self._known = {p for s in self._snaps.values() for p in s.packs} | \
            {pack for recs in self._seg_tags.values() for _c, pack, _o, _n in recs}
        self._loaded = True

    def _add_segment(self, tag: str, recs: list[tuple[bytes, str, int, int]]) -> None:
        self._seg_tags[tag] = recs
        for cid, pack, off, n in recs:
            self._segs.setdefault(cid, (pack, off, n))
            self._known.add(pack)

    def _lookup(self, cid: bytes) -> tuple[str, int, int] | None:
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

    def _range(self, pack: str, start: int, end: int) -> bytes:
        data = self.client.get(PACKS + pack, start, end)
        if len(data) != end - start:
            raise KeyError(pack)  # a shorter object than the hint says: not where the chunk is
        return data

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        if hint is not None and len(hint[0]) == 32:
            try:
                return self._range(hint[0].hex(), hint[1], hint[1] + hint[2])
            except KeyError:
                pass  # the pack is gone (rewritten by gc) or shorter: the index says where the chunk is
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
        try:
            return self._range(loc[0], loc[1], loc[1] + loc[2])
        except KeyError:  # the index this client loaded is older than a gc: load it again
            with self._lock:
                self._reset()
                self._load()
                places = self._places(cid)
            for pack, off, n in places:  # every place the index names, newest snapshot last
                try:
                    return self._range(pack, off, off + n)
                except KeyError:
                    continue
            raise KeyError(cid.hex()) from None

    def _places(self, cid: bytes) -> list[tuple[str, int, int]]:
        """Every place the loaded index names for ``cid`` (segments, then each snapshot)."""
        out = [self._segs[cid]] if cid in self._segs else []
        for snap in self._snaps.values():
            got = snap.find(cid)
            if got is not None:
                out.append((got[0].hex(), got[1], got[2]))
        return out

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None,
                 max_gap: int = MULTI_GAP, max_span: int = 16 << 20) -> dict[bytes, bytes]:
        """Chunks by coalesced ranged reads: neighbours in a pack (gaps up to
        ``max_gap``, the registry store's bridge with multi-range reads: a
        wider bridge read 2.5x what a node needs in the 50-node fleet run)
        come in one request of at most ``max_span`` bytes."""
        out: dict[bytes, bytes] = {}
        by_pack: dict[str, list[tuple[int, int, bytes]]] = {}
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
        spans: list[tuple[str, int, int]] = []
        held: list[list[tuple[int, int, bytes]]] = []
        for pack, items in by_pack.items():
            items.sort()
            i = 0
            while i < len(items):
                j = i
                start, end = items[i][0], items[i][0] + items[i][1]
                while j + 1 < len(items) and items[j + 1][0] - end <= max_gap and \
                        items[j + 1][0] + items[j + 1][1] - start <= max_span:
                    j += 1
                    end = max(end, items[j][0] + items[j][1])
                spans.append((PACKS + pack, start, end))
                held.append(items[i : j + 1])
                i = j + 1
        # the spans in parallel (S3 has no multi-range GET)
        for (_name, start, end), its, data in zip(spans, held, self.client.get_ranges(spans)):
            if isinstance(data, KeyError) or len(data) != end - start:  # a stale hint: through the index
                for _off, _n, c in its:
                    out[c] = self.get(c)
            else:
                for off, n, c in its:
                    out[c] = data[off - start : off - start + n]
        return out

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

    def _write_pack(self, pack: bytes) -> str:
        name = hashlib.sha256(pack).hexdigest()
        self.client.put(PACKS + name, pack, if_absent=True)  # present: the same bytes (named by their digest)
        return name

    def _write_segment(self, name: str, recs: dict[bytes, tuple[int, int]]) -> str:
        body = _SEG_HEAD.pack(b"CSRX", 1, bytes.fromhex(name)) + b"".join(
            _SEG.pack(cid, off, n) for cid, (off, n) in recs.items())
        tag = "x-" + secrets.token_hex(16)
        self.client.put(INDEX + tag, body, if_absent=True)
        return tag

    def flush(self) -> None:
        """Write the pending chunks as one pack object, then its segment (the
        commit point for dedup); then merge segments if there are enough."""
        with self._lock:
            pending, pack = self._pending, bytes(self._pack)
            self._pending, self._pack = {}, bytearray()
        if pending:
            try:
                name = self._write_pack(pack)
                tag = self._write_segment(name, pending)
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
            except S3Error as e:  # a merge is an optimisation: the segments stay valid
                log.warning("could not merge the S3 index: %s", e)

    def _records(self, tags_segs: list[str], tags_snaps: list[str]) -> list[bytes]:
        records: list[bytes] = []
        for t in tags_snaps:
            records.extend(bytes(r) for r in self._snaps[t].records())
        for t in tags_segs:
            records.extend(record(cid, bytes.fromhex(pack), off, n) for cid, pack, off, n in self._seg_tags[t])
        return records

    def _write_snapshot(self, records: list[bytes], covered: list[str]) -> None:
        """One snapshot of ``records`` covering ``covered``; then those removed."""
        data = encode_midx(records, SNAP_MAGIC, 32)
        cov = json.dumps(sorted(covered)).encode()
        tag = "s-" + secrets.token_hex(16)
        self.client.put(INDEX + tag, _SNAP_HEAD.pack(S3_SNAP_MAGIC, 1, len(cov)) + cov + data, if_absent=True)
        snap = SortedIndex.from_bytes(data, f"index snapshot {tag}", SNAP_MAGIC, 32)
        with self._lock:
            self._snaps[tag] = snap
            self._snap_covers[tag] = sorted(covered)
            self._covered |= set(covered)
            for t in covered:
                self._snaps.pop(t, None)
                for cid, pack, off, n in self._seg_tags.pop(t, ()):
                    if self._segs.get(cid) == (pack, off, n):
                        del self._segs[cid]
        self.client.delete([INDEX + t for t in covered])

    def compact(self, full: bool = True) -> bool:
        """Merge the loaded segments (and, size-tiered, the small snapshots) into one snapshot."""
        with self._lock:
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

    def abort(self) -> None:
        with self._lock:
            self._pending.clear()
            self._pack = bytearray()

    def delete(self, cids: list[bytes]) -> None:
        """Remove chunks: packs left with no live chunk are removed, the others
        rewritten with their live chunks only; one snapshot then indexes what
        remains (the caller holds the gc lock: no writer adds meanwhile)."""
        if not cids:
            return
        doomed = set(cids)
        with self._lock:
            self._reset()
            self._load()
            segs, snaps = [t for t in self._seg_tags], list(self._snaps)
            by_pack: dict[str, list[tuple[bytes, int, int]]] = {}
            for r in self._records(segs, snaps):
                by_pack.setdefault(r[32:64].hex(), []).append(
                    (r[:32], int.from_bytes(r[64:72], "little"), int.from_bytes(r[72:76], "little")))
            covered = sorted({*segs, *snaps, *(c for t in snaps for c in self._snap_covers.get(t, ()))})
        affected = [p for p, items in by_pack.items() if any(c in doomed for c, _o, _n in items)]
        keep: list[bytes] = []
        for pack, items in by_pack.items():
            if pack not in affected:
                keep += [record(c, bytes.fromhex(pack), o, n) for c, o, n in items]
                continue
            live = sorted({(o, n, c) for c, o, n in items if c not in doomed})
            if not live:
                continue
            old = self.client.get(PACKS + pack)
            new = bytearray()
            moved = []
            for o, n, c in live:
                moved.append((c, len(new), n))
                new += old[o : o + n]
            name = self._write_pack(bytes(new))
            keep += [record(c, bytes.fromhex(name), o, n) for c, o, n in moved]
            with self._lock:
                self._known.add(name)
        self._write_snapshot(keep, covered)  # the commit point: every earlier index object is covered
        self.client.delete([PACKS + p for p in affected])
        with self._lock:
            self._known -= set(affected)

    def ids(self) -> Iterator[bytes]:
        return (c for c, _n in self.entries())

    def entries(self) -> Iterator[tuple[bytes, int]]:
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

    def unreferenced(self, live: ChunkSet) -> tuple[int, list[tuple[bytes, int]]]:
        with self._lock:
            self._reset()  # gc sweeps what the store holds now, not what this client loaded before
        return super().unreferenced(live)

    def usage(self) -> int:
        return sum(n for _c, n in self.entries())

    def pack_sizes(self, packs: set[bytes]) -> dict[bytes, int]:
        """The size of each pack object (one HEAD each); an error naming one that is
        missing (so no image that relies on it is published)."""
        out = {}
        for p in packs:
            h = self.client.head(PACKS + p.hex())
            if h is None:
                raise StoreError(f"pack {p.hex()} is missing from {self.url} (removed by a gc?): run the push "
                                 f"or pack again")
            out[p] = h[0]
        return out

    def clean_leftovers(self, grace: float) -> int:
        """Remove packs no index object names, older than ``grace`` s (a writer
        died between its pack and its segment)."""
        with self._lock:
            self._reset()
            self._load()
            known = set(self._known)
        objs, now = self.client.list_with_time(PACKS)
        dead = [n for n, _s, mtime in objs if _PACK_NAME.match(n[len(PACKS):]) and n[len(PACKS):] not in known
                and now - mtime > grace]
        self.client.delete(dead)
        return len(dead)


def _decode_snapshot(data: bytes, what: str) -> tuple[list[str], SortedIndex]:
    if len(data) < _SNAP_HEAD.size:
        raise StoreError(f"{what}: truncated index snapshot")
    magic, version, n = _SNAP_HEAD.unpack_from(data)
    if magic != S3_SNAP_MAGIC or version != 1 or _SNAP_HEAD.size + n > len(data):
        raise StoreError(f"{what}: unknown index snapshot format")
    covered = json.loads(data[_SNAP_HEAD.size : _SNAP_HEAD.size + n])
    if not isinstance(covered, list) or not all(isinstance(c, str) and _INDEX_NAME.match(c) for c in covered):
        raise StoreError(f"{what}: its list of covered index objects is malformed")
    return covered, SortedIndex.from_bytes(data[_SNAP_HEAD.size + n:], f"index snapshot {what}", SNAP_MAGIC, 32)


class S3PackReader(S3ChunkStore):
    """Pack objects read at their location hints and nothing else: the reader
    a site tier in front of an S3 origin is read with
    (:mod:`convstore.stores.sitetier`).  It has no index (a chunk without a
    usable hint is a KeyError: the origin, with its index, is asked instead),
    reads no key outside ``packs/`` and writes nothing."""

    def __repr__(self) -> str:
        return f"S3PackReader({self.url} at {self.client.endpoint})"

    def _load(self) -> None:
        raise KeyError("a pack reader has no index")

    def _lookup(self, cid: bytes) -> tuple[str, int, int] | None:
        return None

    def put(self, cid: bytes, blob: bytes) -> None:
        raise StoreError("a site tier is read-only")

    def flush(self) -> None:
        pass
