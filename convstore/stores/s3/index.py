"""An S3 store's chunks: pack objects ``PREFIX/packs/<sha256 hex>`` and the
chunk index under ``PREFIX/index/`` (see :class:`S3ChunkStore`)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import struct

from ...errors import S3Error, StoreError
from ..base import ChunkSet, Location
from ..index import SortedIndex, record
from ..packindex import (MAX_SEGMENT, MAX_SNAPSHOT, MULTI_GAP, SNAP_MAGIC, PackIndexChunkStore, Wanted,
                         _decode_segment, coalesce)
from .client import S3Client

log = logging.getLogger(__name__)

PACKS = "packs/"
INDEX = "index/"
_INDEX_NAME = re.compile(r"[sx]-[0-9a-f]{32}\Z")
_PACK_NAME = re.compile(r"[0-9a-f]{64}\Z")
#: a snapshot object: magic, version, length of the JSON list of what it covers, that list, then the index
_SNAP_HEAD = struct.Struct("<8sII")
S3_SNAP_MAGIC = b"CSS3SNAP"


class S3ChunkStore(PackIndexChunkStore):
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
    index_what = "the S3"
    merge_errors = (S3Error,)

    def __init__(self, client: S3Client, index_dir: str | None = None) -> None:
        self.client = client
        self.url = client.url
        super().__init__(index_dir)

    def __repr__(self) -> str:
        return f"S3ChunkStore({self.url})"

    # -- the index ------------------------------------------------------------
    def _fetch(self, tag: str, max_bytes: int) -> bytes:
        """An index object, from ``index_dir`` if it was read before (they are immutable)."""
        return self._cached(tag, lambda: self.client.get(INDEX + tag, max_bytes=max_bytes))

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
            self._add_snapshot(t, snap, covered)
        self._drop_covered()
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
            self._add_segment(t, recs)
        self._known = self._named_packs()  # a gc since the last load may have removed some
        self._loaded = True

    # -- the ChunkStore API ---------------------------------------------------
    def _range(self, pack: str, start: int, end: int) -> bytes:
        data = self.client.get(PACKS + pack, start, end)
        if len(data) != end - start:
            raise KeyError(pack)  # a shorter object than the hint says: not where the chunk is
        return data

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        if hint is not None and len(hint[0]) == 32:
            got = self._range_or_none(hint[0].hex(), hint[1], hint[1] + hint[2])
            if got is not None:
                return got
            # else the pack is gone (rewritten by gc) or shorter: the index says where the chunk is
        loc = self._place(cid)
        if isinstance(loc, bytes):
            return loc
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
        spans: list[tuple[str, int, int]] = []
        held: list[list[Wanted]] = []
        for pack, items in self._by_pack(cids, hints, out).items():
            for start, end, its in coalesce(items, max_gap, max_span):
                spans.append((PACKS + pack, start, end))
                held.append(its)
        # the spans in parallel (S3 has no multi-range GET)
        for (_name, start, end), its, data in zip(spans, held, self.client.get_ranges(spans)):
            # a stale hint (the pack gone or shorter): through the index
            self._deliver(out, start, its, data if isinstance(data, bytes) and len(data) == end - start else None)
        return out

    def _write_pack(self, pack: bytes) -> str:
        name = hashlib.sha256(pack).hexdigest()
        self.client.put(PACKS + name, pack, if_absent=True)  # present: the same bytes (named by their digest)
        return name

    def _write_segment(self, pack: str, body: bytes) -> str:
        tag = "x-" + secrets.token_hex(16)
        self.client.put(INDEX + tag, body, if_absent=True)
        return tag

    def _put_snapshot(self, data: bytes, covered: list[str]) -> str:
        cov = json.dumps(covered).encode()
        tag = "s-" + secrets.token_hex(16)
        self.client.put(INDEX + tag, _SNAP_HEAD.pack(S3_SNAP_MAGIC, 1, len(cov)) + cov + data, if_absent=True)
        return tag

    def _remove_index(self, names: list[str]) -> None:
        self.client.delete([INDEX + t for t in names])

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

    def unreferenced(self, live: ChunkSet) -> tuple[int, list[tuple[bytes, int]]]:
        with self._lock:
            self._reset()  # gc sweeps what the store holds now, not what this client loaded before
        return super().unreferenced(live)

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
