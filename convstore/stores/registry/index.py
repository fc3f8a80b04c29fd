"""A registry repository's chunks: packed blobs, and the chunk index in the
sibling repository ``REPO/convstore-index`` (see :class:`RegistryChunkStore`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
from typing import Any

from ...errors import CorruptObject, DigestMismatch, StoreError
from ...oci.media import verify_bytes
from ...oci.registry_client import (OCI_MANIFEST, RegistryClient, RegistryError, RegistryRangesRefused,
                                    RegistryResponseTooLarge)
from ..base import Location
from ..index import SortedIndex
from ..packindex import (MAX_SEGMENT, MAX_SNAPSHOT, MULTI_GAP, SNAP_MAGIC, PackIndexChunkStore, Wanted,
                         _decode_segment, coalesce)
from .artifacts import AT_CHUNK_INDEX, AT_INDEX_SNAPSHOT, artifact, layer

log = logging.getLogger(__name__)

INDEX_REPO = "convstore-index"  # the sibling repository of the chunk index
_INDEX_TAG = re.compile(r"[sx]-[0-9a-f]{32}\Z")  # what this client writes; anything else in the index is ignored
# the registry store's own blobs are each checked against its descriptor's size (at most MAX_SEGMENT,
# MAX_SNAPSHOT, MAX_COVERED) before it is read
MULTI_RANGES = 128  # ranges in one multi-range GET (a Range header of ~3 kB)
MAX_COVERED = 64 << 20  # a snapshot's JSON list of the tags it covers (~37 bytes a tag)


class RegistryChunkStore(PackIndexChunkStore):
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
    index_what = "the registry"
    merge_errors = (RegistryError,)
    range_failures = (RegistryError,)  # the registry failed (after retries): reported as such
    range_misses = (KeyError, StoreError)  # the pack is gone or shorter
    reload_to_merge = False

    def __init__(self, url: str, client: RegistryClient, repo: str, index_dir: str | None = None):
        self.url, self.client, self.repo = url, client, repo
        self.index_repo = f"{repo}/{INDEX_REPO}"
        self._art_digest: dict[str, str] = {}  # index tag -> its manifest digest (for deletes)
        super().__init__(index_dir)
        self._count_lock = threading.Lock()
        self.requests = 0  # ranged chunk reads sent (plain counters, read by the fetcher's stats)
        self.multi_range = True  # until the registry answers one otherwise
        self.range_bytes = 0

    def __repr__(self) -> str:
        return f"RegistryChunkStore({self.url})"

    # -- the index ------------------------------------------------------------
    def _artifact_of(self, tag: str) -> dict[str, Any] | None:
        def fetch() -> bytes:
            got = self.client.get_manifest(self.index_repo, tag, [OCI_MANIFEST])
            if got is None:
                raise KeyError(tag)
            return got[0]

        try:
            body = self._cached(os.path.join("tags", tag), fetch)
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
        data = self._cached(os.path.join("blobs", hexd),
                            lambda: self.client.get_blob(self.index_repo, digest, size=size, max_bytes=max_bytes))
        try:  # also what index_dir held
            return verify_bytes(data, digest, size, f"index blob {digest}")
        except DigestMismatch as e:
            raise StoreError(str(e)) from None

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
            self._add_snapshot(t, snap, [str(c) for c in covered])
        if self._drop_covered():
            self._known = self._named_packs()
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

    # -- the ChunkStore API ---------------------------------------------------
    def _range(self, pack: str, start: int, end: int) -> bytes:
        with self._count_lock:
            self.requests += 1  # ranged GETs sent (the readers' request counts: reader/fetcher.py)
            self.range_bytes += end - start
        data = self.client.get_blob(self.repo, "sha256:" + pack, start, end)
        if len(data) != end - start:
            raise StoreError(f"registry returned {len(data)} bytes for a {end - start}-byte range")
        return data

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        if hint is not None and len(hint[0]) == 32:
            got = self._range_or_none(hint[0].hex(), hint[1], hint[1] + hint[2])
            if got is not None:
                return got  # else the pack is gone or shorter: the index says where the chunk is
        loc = self._place(cid)
        return loc if isinstance(loc, bytes) else self._range(loc[0], loc[1], loc[1] + loc[2])

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None,
                 max_gap: int = 1 << 20, max_span: int = 16 << 20) -> dict[bytes, bytes]:
        """Chunks by coalesced ranged reads: neighbours in a pack (gaps up to
        ``max_gap``) make one range of at most ``max_span`` bytes, and the
        ranges of one pack go in one multi-range request (up to
        ``MULTI_RANGES`` ranges, ``max_span`` bytes; one by one if the
        registry does not answer it)."""
        out: dict[bytes, bytes] = {}
        by_pack = self._by_pack(cids, hints, out)
        gap = min(max_gap, MULTI_GAP) if self.multi_range else max_gap
        for pack, items in by_pack.items():
            spans = coalesce(items, gap, max_span)
            groups: list[list[tuple[int, int, list[Wanted]]]] = []
            size = 0
            for sp in spans:
                if not groups or len(groups[-1]) >= MULTI_RANGES or size + sp[1] - sp[0] > max_span:
                    groups.append([])
                    size = 0
                groups[-1].append(sp)
                size += sp[1] - sp[0]
            for group in groups:
                for (start, _end, its), data in zip(group, self._ranges(pack, [(a, b) for a, b, _ in group])):
                    self._deliver(out, start, its, data)
        return out

    def _ranges(self, pack: str, ranges: list[tuple[int, int]]) -> list[bytes | None]:
        """Several ranges of a pack blob: one multi-range request, else one request
        each; None for a range the pack does not have (gone, or shorter)."""
        if len(ranges) > 1 and self.multi_range:
            with self._count_lock:
                self.requests += 1
                self.range_bytes += sum(e - s for s, e in ranges)
            try:
                return list(self.client.get_blob_ranges(self.repo, "sha256:" + pack, ranges))
            except KeyError:
                return [None] * len(ranges)
            except RegistryRangesRefused as why:  # other registry errors are errors, as for one range
                log.info("%s: no multi-range reads (%s); one range a request", self.url, why)
                self.multi_range = False
        return [self._range_or_none(pack, s, e) for s, e in ranges]

    def _write_pack(self, pack: bytes) -> str:
        return self.client.put_blob(self.repo, pack).split(":", 1)[1]

    def _write_segment(self, pack: str, body: bytes) -> str:
        idx = self.client.put_blob(self.index_repo, body)
        return self._put_index_artifact("x-", AT_CHUNK_INDEX, [layer(idx, len(body))])

    def _put_index_artifact(self, prefix: str, artifact_type: str, layers: list[dict[str, Any]]) -> str:
        """Tag a new index artifact ``prefix<random>``; its tag (its digest is kept for deletes)."""
        tag = prefix + secrets.token_hex(16)
        art = artifact(artifact_type, layers, {})
        self.client.put_manifest(self.index_repo, tag, art)
        self._art_digest[tag] = "sha256:" + hashlib.sha256(art).hexdigest()
        return tag

    def _put_snapshot(self, data: bytes, covered: list[str]) -> str:
        cov = json.dumps(covered).encode()
        d1 = self.client.put_blob(self.index_repo, data)
        d2 = self.client.put_blob(self.index_repo, cov)
        return self._put_index_artifact("s-", AT_INDEX_SNAPSHOT,
                                        [layer(d1, len(data)), layer(d2, len(cov), "application/json")])

    def _remove_index(self, names: list[str]) -> None:
        for t in names:  # best effort: a registry without deletes keeps them (they are skipped as covered)
            digest = self._art_digest.get(t)
            if digest is not None and not self.client.delete_manifest(self.index_repo, digest):
                break

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
            records = [r for r in self._records([t for t in self._seg_tags if t not in self._covered],
                                                list(self._snaps))
                       if r[:32] not in drop and (live_containers is None or r[32:64] in live_containers)]
        self._write_snapshot(records, old, replace=True)

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

