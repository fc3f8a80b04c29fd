"""A registry repository's chunks: packed blobs, and the chunk index in the
sibling repository ``REPO/convstore-index`` (see :class:`RegistryChunkStore`)."""

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
from typing import Any

from ...errors import CorruptObject, DigestMismatch, StoreError
from ...oci.media import verify_bytes
from ...oci.registry_client import (OCI_MANIFEST, RegistryClient, RegistryError, RegistryRangesRefused,
                                    RegistryResponseTooLarge)
from ..base import ChunkStore, Location
from ..fs import makedirs_private
from ..index import AUTO_MERGE_MAX, SortedIndex, encode_midx, record
from .artifacts import AT_CHUNK_INDEX, AT_INDEX_SNAPSHOT, artifact, layer

log = logging.getLogger(__name__)

_SEG_HEAD = struct.Struct("<4sI32s")  # b"CSRX", version, pack blob digest
_SEG = struct.Struct("<32sQI")  # cid, offset, length
SNAP_MAGIC = b"CSRSNAP\0"
INDEX_REPO = "convstore-index"  # the sibling repository of the chunk index
_INDEX_TAG = re.compile(r"[sx]-[0-9a-f]{32}\Z")  # what this client writes; anything else in the index is ignored
PACK_BYTES = 32 << 20
COMPACT_SEGMENTS = 16  # segments not yet merged that make a writer write a snapshot
# the registry store's own blobs, each checked against its descriptor's size before it is read:
# an index segment lists the chunks of one pack (under PACK_BYTES, plus the chunk that fills it); a chunk
# is at least 32 bytes (its header and tag), a record 44 bytes: ~44 MiB at most
MAX_SEGMENT = _SEG_HEAD.size + _SEG.size * (PACK_BYTES // 32 + 2)
MAX_SNAPSHOT = 2 << 30  # a snapshot holds a record per chunk of the store: 2 GiB is ~25 M chunks
MULTI_RANGES = 128  # ranges in one multi-range GET (a Range header of ~3 kB)
MULTI_GAP = 64 << 10  # with multi-range reads, a gap is bridged only up to this (a range costs no request)
MAX_COVERED = 64 << 20  # a snapshot's JSON list of the tags it covers (~37 bytes a tag)


class RegistryChunkStore(ChunkStore):
    """Chunks in packed blobs of one repository.

    Reads need no index: manifests carry each chunk's (pack digest, offset,
    length) as a hint, read with one ranged GET.  The index -- for dedup
    when packing or pushing, and for chunks without a hint -- lives in the
    sibling repository ``REPO/convstore-index`` and is loaded only then:

    * every flush adds a *segment* artifact (tag ``x-<random>``: the pack's
      digest and its (cid, offset, length) records);
    * a writer that sees ``COMPACT_SEGMENTS`` segments not yet merged writes a
      *snapshot* (tag ``s-<random>``: sorted records, read by bisection like
      a local multi-pack index, and the list of what it covers), size-tiered
      like the local indexes, and deletes what it merged where the registry
      allows;
    * tags are never re-pointed, so artifacts and blobs are cached in
      ``index_dir`` once fetched: a warm client asks for the tag list and
      the artifacts it has not seen.

    The index is a dedup accelerator, never the source of truth: an image's
    own sealed-manifest artifact references every pack blob it uses (so the
    registry's garbage collection keeps them), and a pack is checked to
    exist before an image that relies on it is published.
    """

    supports_deletes = False  # chunks are reclaimed by the registry's own GC
    needs_locations = True

    def __init__(self, url: str, client: RegistryClient, repo: str, index_dir: str | None = None):
        self.url, self.client, self.repo = url, client, repo
        self.index_repo = f"{repo}/{INDEX_REPO}"
        self.index_dir = index_dir
        self._lock = threading.RLock()
        self._loaded = False
        self._snaps: dict[str, SortedIndex] = {}  # snapshot tag -> mapped records
        self._snap_size: dict[str, int] = {}
        self._snap_covers: dict[str, list[str]] = {}  # snapshot tag -> every tag it covers
        self._segs: dict[bytes, tuple[str, int, int]] = {}  # cid -> (pack digest, offset, length), not merged
        self._seg_tags: dict[str, list[tuple[bytes, str, int, int]]] = {}  # loaded segment tag -> its records
        self._covered: set[str] = set()
        self._art_digest: dict[str, str] = {}  # index tag -> its manifest digest (for deletes)
        self._known: set[str] = set()  # pack digests (hex) the loaded index names, or this client wrote
        self._pending: dict[bytes, tuple[int, int]] = {}  # cid -> (offset, length) in _pack
        self._pack = bytearray()
        self._count_lock = threading.Lock()
        self.requests = 0  # ranged chunk reads sent (plain counters, read by the fetcher's stats)
        self.multi_range = True  # until the registry answers one otherwise
        self.range_bytes = 0

    def __repr__(self) -> str:
        return f"RegistryChunkStore({self.url})"

    # -- the index ------------------------------------------------------------
    def _cached(self, kind: str, name: str, fetch: Callable[[], bytes]) -> bytes:
        """An immutable index object, from ``index_dir`` if it was fetched before."""
        path = os.path.join(self.index_dir, kind, name) if self.index_dir else None
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

    def _artifact_of(self, tag: str) -> dict[str, Any] | None:
        def fetch() -> bytes:
            got = self.client.get_manifest(self.index_repo, tag, [OCI_MANIFEST])
            if got is None:
                raise KeyError(tag)
            return got[0]

        try:
            body = self._cached("tags", tag, fetch)
        except KeyError:
            return None  # merged and deleted meanwhile
        self._art_digest[tag] = "sha256:" + hashlib.sha256(body).hexdigest()
        doc = json.loads(body)
        return doc if isinstance(doc, dict) else None

    def _blob(self, layer: object, max_bytes: int) -> bytes:
        """An index artifact's layer blob, checked against its descriptor (digest and size)."""
        if not isinstance(layer, dict):
            raise StoreError("bad blob descriptor in the index")
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(digest, str):
            raise StoreError("bad blob digest in the index")
        hexd = digest.split(":", 1)[-1]
        if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise StoreError(f"bad blob digest {digest!r} in the index")
        if not isinstance(size, int):
            raise StoreError(f"index blob {digest} has no size")
        data = self._cached("blobs", hexd, lambda: self.client.get_blob(self.index_repo, digest, size=size,
                                                                         max_bytes=max_bytes))
        try:  # also what index_dir held
            return verify_bytes(data, digest, size, f"index blob {digest}")
        except DigestMismatch as e:
            raise StoreError(str(e)) from None

    def refresh(self) -> None:
        """Load the index artifacts not seen yet (one tag listing)."""
        with self._lock:
            self._load()

    def _load(self) -> None:
        # only well-formed index tags: they become cache file names (a registry's tag list is not trusted)
        tags = [t for t in self.client.tags(self.index_repo) if isinstance(t, str) and _INDEX_TAG.match(t)]
        for t in sorted(t for t in tags if t.startswith("s-") and t not in self._snaps and t not in self._covered):
            got = self._index_artifact(t, AT_INDEX_SNAPSHOT, (MAX_SNAPSHOT, MAX_COVERED))
            if got is None:
                continue
            data, cov = got
            try:
                covered = json.loads(cov)
                if not isinstance(covered, list) or not all(isinstance(c, str) and _INDEX_TAG.match(c)
                                                            for c in covered):
                    raise StoreError("its list of covered tags is malformed")
                snap = SortedIndex.from_bytes(data, f"index snapshot {t}", SNAP_MAGIC, 32)
            except (StoreError, ValueError) as e:
                log.warning("skipping index snapshot %s: %s", t, e)
                continue
            self._snaps[t] = snap
            self._snap_size[t] = snap.count
            self._snap_covers[t] = [str(c) for c in covered]
            self._known |= snap.packs
            self._covered |= set(covered)
        for t in [t for t in self._snaps if t in self._covered]:
            del self._snaps[t]
        stale = [t for t in self._seg_tags if t in self._covered]
        if stale:  # merged by another writer, or swept by gc: what they said is in the snapshots now (or gone)
            for t in stale:
                del self._seg_tags[t]
            self._segs.clear()
            for recs in self._seg_tags.values():
                for cid, pack, off, n in recs:
                    self._segs.setdefault(cid, (pack, off, n))
            self._known = {p for snap in self._snaps.values() for p in snap.packs} | \
                {pack.split(":", 1)[1] for recs in self._seg_tags.values() for _c, pack, _o, _n in recs}
        for t in sorted(t for t in tags if t.startswith("x-") and t not in self._seg_tags and t not in self._covered):
            got = self._index_artifact(t, AT_CHUNK_INDEX, (MAX_SEGMENT,))
            if got is None:
                continue
            try:
                recs = _decode_segment(got[0], t)
            except StoreError as e:
                log.warning("skipping pack index %s: %s", t, e)
                continue
            self._add_segment(t, recs)
        self._loaded = True

    def _index_artifact(self, tag: str, artifact_type: str, caps: tuple[int, ...]) -> list[bytes] | None:
        """The first blobs of the index artifact ``tag``, one per cap in ``caps``; None (logged)
        if it is gone, of another type, malformed or damaged.  A registry that
        fails (after retries) is an error, not a missing index."""
        try:
            art = self._artifact_of(tag)
            if art is None or art.get("artifactType") != artifact_type:
                return None
            return [self._blob(art["layers"][i], cap) for i, cap in enumerate(caps)]
        except RegistryError as e:
            if not isinstance(e, (CorruptObject, RegistryResponseTooLarge)):  # damaged or oversized: skipped
                raise
            log.warning("skipping index artifact %s: %s", tag, e)
        except (StoreError, KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            log.warning("skipping index artifact %s: %s", tag, e)
        return None

    def _add_segment(self, tag: str, recs: list[tuple[bytes, str, int, int]]) -> None:
        self._seg_tags[tag] = recs
        for cid, pack, off, n in recs:
            self._segs.setdefault(cid, (pack, off, n))
            self._known.add(pack.split(":", 1)[1])

    def _lookup(self, cid: bytes) -> tuple[str, int, int] | None:
        if not self._loaded:
            self._load()
        loc = self._segs.get(cid)
        if loc is not None:
            return loc
        for snap in self._snaps.values():
            got = snap.find(cid)
            if got is not None:
                return "sha256:" + got[0].hex(), got[1], got[2]
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
        if loc is None:
            return None
        return bytes.fromhex(loc[0].split(":", 1)[1]), loc[1], loc[2]

    def _range(self, digest: str, start: int, end: int) -> bytes:
        with self._count_lock:
            self.requests += 1  # ranged GETs sent (the readers' request counts: reader/fetcher.py)
            self.range_bytes += end - start
        data = self.client.get_blob(self.repo, digest, start, end)
        if len(data) != end - start:
            raise StoreError(f"registry returned {len(data)} bytes for a {end - start}-byte range")
        return data

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        if hint is not None and len(hint[0]) == 32:
            try:
                return self._range("sha256:" + hint[0].hex(), hint[1], hint[1] + hint[2])
            except RegistryError:
                raise  # the registry failed (after retries): reported as such
            except (KeyError, StoreError):
                pass  # the pack is gone or shorter: the index says where the chunk is
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
        return self._range(loc[0], loc[1], loc[1] + loc[2])

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None,
                 max_gap: int = 1 << 20, max_span: int = 16 << 20) -> dict[bytes, bytes]:
        """Chunks by coalesced ranged reads: neighbours in a pack (gaps up to
        ``max_gap``) make one range of at most ``max_span`` bytes, and the
        ranges of one pack go in one multi-range request (up to
        ``MULTI_RANGES`` ranges, ``max_span`` bytes; one by one if the
        registry does not answer it)."""
        out: dict[bytes, bytes] = {}
        by_pack: dict[str, list[tuple[int, int, bytes]]] = {}
        hints = hints or {}
        for c in cids:
            h = hints.get(c)
            if h is not None and len(h[0]) == 32:
                by_pack.setdefault("sha256:" + h[0].hex(), []).append((h[1], h[2], c))
                continue
            with self._lock:
                loc = None if c in self._pending else self._lookup(c)
            if loc is None:
                out[c] = self.get(c)
            else:
                by_pack.setdefault(loc[0], []).append((loc[1], loc[2], c))
        gap = min(max_gap, MULTI_GAP) if self.multi_range else max_gap
        for digest, items in by_pack.items():
            items.sort()
            spans: list[tuple[int, int, list[tuple[int, int, bytes]]]] = []  # (start, end, its chunks)
            for off, n, c in items:
                if spans and off - spans[-1][1] <= gap and off + n - spans[-1][0] <= max_span:
                    start, end, its = spans[-1]
                    spans[-1] = (start, max(end, off + n), its + [(off, n, c)])
                else:
                    spans.append((off, off + n, [(off, n, c)]))
            groups: list[list[tuple[int, int, list[tuple[int, int, bytes]]]]] = []
            size = 0
            for sp in spans:
                if not groups or len(groups[-1]) >= MULTI_RANGES or size + sp[1] - sp[0] > max_span:
                    groups.append([])
                    size = 0
                groups[-1].append(sp)
                size += sp[1] - sp[0]
            for group in groups:
                for (start, _end, its), data in zip(group, self._ranges(digest, [(a, b) for a, b, _ in group])):
                    if data is None:  # a stale hint: one by one through the index
                        for _off, _n, c in its:
                            out[c] = self.get(c)
                        continue
                    for off, n, c in its:
                        out[c] = data[off - start : off - start + n]
        return out

    def _ranges(self, digest: str, ranges: list[tuple[int, int]]) -> list[bytes | None]:
        """Several ranges of a pack blob: one multi-range request, else one request
        each; None for a range the pack does not have (gone, or shorter)."""
        if len(ranges) > 1 and self.multi_range:
            with self._count_lock:
                self.requests += 1
                self.range_bytes += sum(e - s for s, e in ranges)
            try:
                return list(self.client.get_blob_ranges(self.repo, digest, ranges))
            except KeyError:
                return [None] * len(ranges)
            except RegistryRangesRefused as why:  # other registry errors are errors, as for one range
                log.info("%s: no multi-range reads (%s); one range a request", self.url, why)
                self.multi_range = False
        out: list[bytes | None] = []
        for s, e in ranges:
            try:
                out.append(self._range(digest, s, e))
            except RegistryError:
                raise
            except (KeyError, StoreError):
                out.append(None)
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

    def flush(self) -> None:
        """Upload the pending chunks as one pack blob, then its segment
        artifact (the commit point for dedup: chunks are found through it);
        then merge segments if there are enough."""
        with self._lock:
            pending, pack = self._pending, bytes(self._pack)
            self._pending, self._pack = {}, bytearray()
        if pending:
            try:
                digest = self.client.put_blob(self.repo, pack)
                body = _SEG_HEAD.pack(b"CSRX", 1, bytes.fromhex(digest.split(":", 1)[1])) + b"".join(
                    _SEG.pack(cid, off, n) for cid, (off, n) in pending.items())
                idx = self.client.put_blob(self.index_repo, body)
                tag = self._put_index_artifact("x-", AT_CHUNK_INDEX, [layer(idx, len(body))])
            except BaseException:
                with self._lock:  # keep them pending: a retry of flush sends them again
                    for cid, (off, n) in pending.items():
                        self._pending.setdefault(cid, (len(self._pack), n))
                        self._pack += pack[off : off + n]
                raise
            with self._lock:
                self._add_segment(tag, [(cid, digest, off, n) for cid, (off, n) in pending.items()])
        with self._lock:
            loose = [t for t in self._seg_tags if t not in self._covered]
        if len(loose) >= COMPACT_SEGMENTS:
            try:
                self.compact(full=False)
            except RegistryError as e:  # a merge is an optimisation: the segments stay valid
                log.warning("could not merge the registry index: %s", e)

    def _put_index_artifact(self, prefix: str, artifact_type: str, layers: list[dict[str, Any]]) -> str:
        """Tag a new index artifact ``prefix<random>``; its tag (its digest is kept for deletes)."""
        tag = prefix + secrets.token_hex(16)
        art = artifact(artifact_type, layers, {})
        self.client.put_manifest(self.index_repo, tag, art)
        self._art_digest[tag] = "sha256:" + hashlib.sha256(art).hexdigest()
        return tag

    def compact(self, full: bool = True) -> None:
        """Merge the loaded segments (and, size-tiered, the small snapshots)
        into one snapshot; then delete what it covers where the registry allows."""
        with self._lock:
            if not self._loaded:
                self._load()
            loose = [t for t in self._seg_tags if t not in self._covered]
            total = sum(len(self._seg_tags[t]) for t in loose)
            taken: list[str] = []
            for t, n in sorted(self._snap_size.items(), key=lambda kv: kv[1]):
                if t in self._snaps and (full or (n <= 2 * total and total + n <= AUTO_MERGE_MAX)):
                    taken.append(t)
                    total += n
            if not loose and len(taken) <= 1:
                return
            records: list[bytes] = []
            for t in taken:
                records.extend(bytes(r) for r in self._snaps[t].records())
            for t in loose:
                records.extend(record(cid, bytes.fromhex(pack.split(":", 1)[1]), off, n)
                               for cid, pack, off, n in self._seg_tags[t])
        data = encode_midx(records, SNAP_MAGIC, 32)
        covered = sorted({*loose, *taken, *(c for t in taken for c in self._snap_covers.get(t, ()))})
        cov = json.dumps(covered).encode()
        d1 = self.client.put_blob(self.index_repo, data)
        d2 = self.client.put_blob(self.index_repo, cov)
        tag = self._put_index_artifact("s-", AT_INDEX_SNAPSHOT,
                                       [layer(d1, len(data)), layer(d2, len(cov), "application/json")])
        with self._lock:
            snap = SortedIndex.from_bytes(data, f"index snapshot {tag}", SNAP_MAGIC, 32)
            self._snaps[tag] = snap
            self._snap_size[tag] = snap.count
            self._snap_covers[tag] = covered
            self._covered |= set(covered)
            for t in taken:
                self._snaps.pop(t, None)
            for t in loose:
                for cid, _p, _o, _n in self._seg_tags[t]:
                    self._segs.pop(cid, None)
        for t in covered:  # best effort: a registry without deletes keeps them (they are skipped as covered)
            digest = self._art_digest.get(t)
            if digest is not None and not self.client.delete_manifest(self.index_repo, digest):
                break

    def abort(self) -> None:
        with self._lock:
            self._pending.clear()
            self._pack = bytearray()

    def delete(self, cids: list[bytes]) -> None:
        if cids:
            raise StoreError("a registry store does not delete chunks: gc unreferences them (sweep) and the "
                             "registry's garbage collection frees their pack blobs")

    def sweep(self, cids: list[bytes], live_containers: set[bytes] | None = None) -> None:
        """gc's sweep: the pack blobs themselves are the registry's to free (its garbage collection frees
        every blob no tagged manifest references, once gc deleted the removed images' manifests); here
        the index forgets ``cids`` and every record in a pack outside ``live_containers``, so that no
        later pack dedups against a chunk whose pack blob may be gone.  One new snapshot replaces every
        index artifact (gc holds the store's exclusive lease: no writer adds one meanwhile)."""
        drop = set(cids)
        with self._lock:
            self._load()
            if not drop and live_containers is None:
                return
            old = [*self._seg_tags, *self._snaps, *(c for t in self._snaps for c in self._snap_covers.get(t, ()))]
            records: list[bytes] = []
            for snap in self._snaps.values():
                records.extend(bytes(r) for r in snap.records())
            for t, recs in self._seg_tags.items():
                if t not in self._covered:
                    records.extend(record(cid, bytes.fromhex(pack.split(":", 1)[1]), off, n)
                                   for cid, pack, off, n in recs)
            records = [r for r in records if r[:32] not in drop
                       and (live_containers is None or r[32:64] in live_containers)]
        data = encode_midx(records, SNAP_MAGIC, 32)
        covered = sorted(set(old))
        cov = json.dumps(covered).encode()
        d1 = self.client.put_blob(self.index_repo, data)
        d2 = self.client.put_blob(self.index_repo, cov)
        tag = self._put_index_artifact("s-", AT_INDEX_SNAPSHOT,
                                       [layer(d1, len(data)), layer(d2, len(cov), "application/json")])
        with self._lock:
            snap = SortedIndex.from_bytes(data, f"index snapshot {tag}", SNAP_MAGIC, 32)
            self._snaps = {tag: snap}
            self._snap_size = {tag: snap.count}
            self._snap_covers = {tag: covered}
            self._covered |= set(covered)
            self._segs.clear()
            self._known = set(snap.packs)
        for t in covered:  # best effort, as in compact: what stays is skipped as covered
            digest = self._art_digest.get(t)
            if digest is not None and not self.client.delete_manifest(self.index_repo, digest):
                break

    def ids(self) -> Iterator[bytes]:
        return (c for c, _n in self.entries())

    def entries(self) -> Iterator[tuple[bytes, int]]:
        with self._lock:
            self._load()
            segs = [(c, n) for c, (_p, _o, n) in self._segs.items()]
            snaps = list(self._snaps.values())
        yield from segs
        for s in snaps:
            yield from s.entries()

    def usage(self) -> int:
        return sum(n for _c, n in self.entries())

    def pack_sizes(self, containers: set[bytes]) -> dict[bytes, int]:
        """The size of each pack blob (one HEAD each); StoreError naming one
        that is missing (so no image that relies on it is published)."""
        out = {}
        for c in containers:
            size = self.client.blob_size(self.repo, "sha256:" + c.hex())
            if size is None:
                raise RegistryError(f"pack blob sha256:{c.hex()} is missing from {self.url} (removed by the "
                                    f"registry's garbage collection?): run the push or pack again")
            out[c] = size
        return out


def _decode_segment(data: bytes, what: str) -> list[tuple[bytes, str, int, int]]:
    if len(data) < _SEG_HEAD.size or (len(data) - _SEG_HEAD.size) % _SEG.size:
        raise StoreError(f"{what}: truncated pack index")
    magic, version, pack = _SEG_HEAD.unpack_from(data)
    if magic != b"CSRX" or version != 1:
        raise StoreError(f"{what}: unknown pack index format")
    digest = "sha256:" + pack.hex()
    return [(cid, digest, off, n) for cid, off, n in _SEG.iter_unpack(data[_SEG_HEAD.size:])]
