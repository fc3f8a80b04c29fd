"""Pack: source image -> chunks + sealed manifest + catalog entry.

Per layer, one thread reads the blob (sha256 of the blob), decompresses it
(isal runs gzip in a helper thread), hashes the tar (diff_id), splits headers
from contents and cuts the contents with FastCDC.  Each chunk goes to a
thread pool: keyed hash; if the store has it, done (the dedup fast path);
else compress, encrypt and write.  Results are collected in order, with a
bounded number in flight so memory stays flat.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zstandard

from .chunking import ChunkParams, StreamChunker
from .crypto import ChunkIdentity, identify_chunk
from .core.catalog import ACTIVE, CatalogEntry
from .errors import ConvstoreError, DigestMismatch, ImagePending, SourceChanged, SourceNotFound
from .manifest import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from .manifest import ROW_SIZE, LayerRecord, Manifest
from .oci.media import HashingReader
from .oci.policy import Policy, load_policy
from .oci.policy import evaluate as evaluate_policy
from .oci.sources import ImageSource, LayerDescriptor, layer_stream, open_at_digest, parse_source
from .progress import NoProgress, Progress
from .refs import ImageRef
from .core.domains import DEFAULT_DOMAIN, Domain
from .core.repository import Repository
from .stores.base import Location
from .core.identity import now_iso
from .tarsplit import split_tar

DEFAULT_LEVEL = 3


@dataclass
class PackResult:
    ref: str
    manifest_digest: str
    layers: int
    logical_bytes: int
    chunks: int
    new_chunks: int
    new_plain_bytes: int
    new_stored_bytes: int
    reused_layers: int
    seconds: float
    #: the name already served this very source, packed the same way, with every chunk present: nothing written
    up_to_date: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _intern(ident: ChunkIdentity, table: list[ChunkIdentity], index: dict[bytes, int]) -> tuple[int, bool]:
    """The chunk's position in the image's chunk table, and whether it is new there."""
    i = index.get(ident.cid)
    if i is not None:
        return i, False
    i = index[ident.cid] = len(table)
    table.append(ident)
    return i, True


class _ChunkSink:
    """Hands chunks to the pool and collects their identities in order."""

    def __init__(self, store: Repository, domain_key: bytes, level: int, pool: ThreadPoolExecutor,
                 table: list[ChunkIdentity], index: dict[bytes, int], max_inflight: int):
        self._chunks = store.chunks
        self._dkey = domain_key
        self._level = level
        self._pool = pool
        self._table = table
        self._index = index
        self._inflight: deque[Future[tuple[ChunkIdentity, int]]] = deque()
        self._max = max_inflight
        self.layer_chunks = array("I")
        self.new_chunks = 0
        self._counted: set[bytes] = set()
        self.new_plain = 0
        self.new_stored = 0

    def _work(self, plain: bytes) -> tuple[ChunkIdentity, int]:
        ident = identify_chunk(plain, self._dkey)
        if ident.cid in self._index:
            return ident, -1
        return ident, self._chunks.put_plain(plain, ident, self._level)

    def __call__(self, plain: bytes) -> None:
        self._inflight.append(self._pool.submit(self._work, plain))
        if len(self._inflight) >= self._max:
            self._collect(self._inflight.popleft())

    def _collect(self, fut: Future[tuple[ChunkIdentity, int]]) -> None:
        ident, stored = fut.result()
        i, _first = _intern(ident, self._table, self._index)
        # counted once, whichever of two copies in flight together stored it (the one collected
        # first may be the one that found it already stored by the other)
        if stored >= 0 and ident.cid not in self._counted:
            self._counted.add(ident.cid)
            self.new_chunks += 1
            self.new_plain += ident.size
            self.new_stored += stored
        self.layer_chunks.append(i)

    def drain(self) -> None:
        while self._inflight:
            self._collect(self._inflight.popleft())


class _MetaSink:
    """Collects tar metadata zstd-compressed, in 1 MiB batches (a compressor
    call per 512-byte header costs more than the parsing)."""

    def __init__(self) -> None:
        self._z = zstandard.ZstdCompressor(level=3).compressobj()
        self._buf = bytearray()
        self._parts: list[bytes] = []

    def __call__(self, b: bytes) -> None:
        self._buf += b
        if len(self._buf) >= 1 << 20:
            self._parts.append(self._z.compress(bytes(self._buf)))
            self._buf.clear()

    def finish(self) -> bytes:
        self._parts.append(self._z.compress(bytes(self._buf)))
        self._parts.append(self._z.flush())
        return b"".join(self._parts)


def pack(
    store: Repository,
    source: str | ImageSource,
    ref: str,
    *,
    level: int = DEFAULT_LEVEL,
    params: ChunkParams | None = None,
    workers: int | None = None,
    domain: str = DEFAULT_DOMAIN,
    progress: Progress | None = None,
    reuse_layers: bool = True,
    insecure: bool = False,
    expect: tuple[str, str] | None = None,
    repack_of: str | None = None,
    policy: Policy | None = None,
) -> PackResult:
    """Pack an image into ``store`` under ``ref`` (``NAME[:TAG]``).

    The catalog changes only when every chunk and the manifest are durable;
    any error before that leaves it as it was.  A layer whose diff_id is
    already stored (with all its chunks) is reused without reading its blob,
    unless ``reuse_layers`` is False.  ``expect`` (a re-pack, :func:`repack`): the
    (manifest digest, config digest) the source must serve, else :class:`SourceChanged`;
    ``repack_of``: the version it re-packs, which the name must still point at when the pack
    begins and when it publishes (else :class:`ImageChanged`, and nothing is published).
    The source must satisfy the trust
    ``policy`` before anything is stored; what it verified is sealed into the
    manifest.  ``policy`` None (re-packs: repair, reactivation): the policy
    file the name's current version was verified under, if it still exists,
    else the containers tools' policy file (:func:`convstore.oci.policy.load_policy`).
    """
    t0 = time.perf_counter()
    iref = ImageRef.parse(ref)
    params = params or ChunkParams()
    progress = progress or NoProgress()
    try:
        with contextlib.ExitStack() as stack:
            src = parse_source(source, insecure=insecure) if isinstance(source, str) else source
            if isinstance(source, str):
                stack.callback(src.close)
            if expect is not None:
                _check_source(src, expect)
            verification = evaluate_policy(_recorded_policy(store, iref) if policy is None else policy, src)
            dom = store.convergence_domains.get(domain)
            identity = pack_identity(src, params, dom, verification)
            done = _up_to_date(store, iref, identity, t0) if reuse_layers else None  # a repair reads the source
            if done is not None:
                return done
            stack.enter_context(store.gc_guard())  # gc waits for packs in progress
            store.begin_pack(iref, src.ref, repack_of)
            return _pack(store, src, iref, dom, params, level, workers, progress, reuse_layers, t0, identity,
                         repack_of, verification)
    except BaseException as e:
        store.chunks.abort()  # unpublished chunks of a failed pack are dropped
        store.abort_pack(iref, e, repack_of)
        raise


def repack(store: Repository, ref: str | ImageRef, *, repair: bool = False, progress: Progress | None = None
           ) -> PackResult:
    """Re-pack ``ref`` from the source its authenticated catalog entry records, back into its own
    domain (verify --repair, the reactivation of an INACTIVE image): a repair never changes what a
    name serves.  The source must serve the very manifest and config the current version was packed
    from; if it serves anything else (a moved tag), or that cannot be told, the image goes FAILED
    with the reason (:class:`SourceChanged`) and keeps its version.  ``repair``: read every layer
    from the source again (no layer is reused)."""
    e = store.catalog.entry(ref)
    iref = e.ref
    if not e.complete:
        raise ImagePending(f"image {iref} has no packed version yet: nothing to re-pack")
    try:
        expect = _recorded_source(store, e)
        src = _open_recorded(e.source, expect[0], store.options.insecure)
    except ConvstoreError as err:
        store.abort_pack(iref, err, e.manifest_digest)
        raise
    with src:  # the name may be packed again meanwhile: this re-pack then publishes nothing (repack_of)
        return pack(store, src, str(iref), domain=store.domain_of(e), progress=progress,
                    reuse_layers=not repair, expect=expect, repack_of=e.manifest_digest)


def _open_recorded(source: str, manifest_digest: str, insecure: bool = False) -> ImageSource:
    """``source`` read at the recorded ``manifest_digest`` where it can be (a registry, an OCI layout),
    so a moved tag does not matter while the source still holds that manifest; else (a docker archive,
    or a source that no longer has it) as recorded.  The caller compares either way."""
    try:
        src = open_at_digest(source, manifest_digest, insecure)
    except SourceNotFound:
        src = None  # the digest is gone: the recorded name, compared by the caller, says what it serves now
    except DigestMismatch as err:  # asked for the recorded digest, answered with other bytes
        raise SourceChanged(f"source {source} does not serve what was packed ({err}); pack it explicitly "
                            f"to take the new content") from None
    return src if src is not None else parse_source(source, insecure=insecure)


def check_recorded_source(store: Repository, e: CatalogEntry) -> None:
    """:class:`SourceChanged` unless ``e``'s recorded source serves what its version was packed from,
    read as :func:`repack` reads it (refresh: whether a FAILED image may come back)."""
    expect = _recorded_source(store, e)
    with _open_recorded(e.source, expect[0], store.options.insecure) as src:
        _check_source(src, expect)


def _recorded_source(store: Repository, e: CatalogEntry) -> tuple[str, str]:
    """The (manifest, config) digests ``e``'s version was packed from: from the entry (catalog
    version 3), else from its sealed manifest (entries written before them; both authenticated)."""
    if e.source_manifest and e.source_config:
        return e.source_manifest, e.source_config
    try:
        m = store.manifests.load(e)
        recorded = (str((m.source or {}).get("manifest_digest") or ""), m.config_digest or "")
    except ConvstoreError as err:
        raise SourceChanged(f"cannot re-pack {e.ref} from {e.source}: its entry records no source digest and its "
                            f"manifest cannot be read ({err}); pack it explicitly") from None
    if not all(recorded):
        raise SourceChanged(f"cannot re-pack {e.ref} from {e.source}: no source digest is recorded for it; "
                            f"pack it explicitly")
    return recorded


def _check_source(src: ImageSource, expect: tuple[str, str]) -> None:
    """A re-pack reads exactly what was packed: the source's manifest and config digests (the
    config's diff_ids pin every layer) are those recorded, or :class:`SourceChanged`."""
    manifest, config = expect
    if not hmac.compare_digest(src.manifest_digest or "", manifest):
        raise SourceChanged(f"source {src.ref} now serves {src.manifest_digest or 'an unnamed manifest'}, "
                            f"packed from {manifest}; pack it explicitly to take the new content")
    if not hmac.compare_digest(src.config_digest or "", config):
        raise SourceChanged(f"source {src.ref} now serves config {src.config_digest}, packed from config {config} "
                            f"(manifest {manifest}); pack it explicitly to take the new content")


def _recorded_policy(store: Repository, iref: ImageRef) -> Policy:
    """The policy file ``iref``'s current version was verified under (a re-pack verifies under the same
    policy, so a repair does not drop what was verified), else the default policy."""
    try:
        path = (store.manifests.load(store.catalog.entry(iref)).verification or {}).get("policy")
    except (ConvstoreError, OSError):
        path = None
    if isinstance(path, str) and os.path.isfile(path):
        return Policy.load(path)
    return load_policy()


# Bumped whenever what a pack writes changes: a version packed by older code is then packed again.
PACK_IDENTITY_VERSION = 1


def pack_identity(src: ImageSource, params: ChunkParams, dom: Domain,
                  verification: dict[str, Any] | None = None) -> str:
    """What a version is packed from and how: the source's reference, its manifest's digest and
    its config's (every source checks the config against it; the config's diff_ids pin every
    layer's content, also where the manifest digest does not, as in a docker archive), the
    chunking, the convergence domain's id and epoch, and the packer and manifest format versions.
    Not the zstd level, which only shapes chunks that are new, and an unchanged source has none.
    The signatures the trust policy verified, when there are any: a version packed without them
    (or with others) is packed again, so the sealed record is the current one."""
    if not src.manifest_digest:
        return ""
    doc = {"v": [PACK_IDENTITY_VERSION, MANIFEST_FORMAT_VERSION], "ref": src.ref, "source": src.manifest_digest,
           "config": src.config_digest, "chunking": params.to_json(),
           "domain": [dom.public.get("id"), dom.public.get("epoch")]}
    if verification and verification.get("signatures"):
        doc["signatures"] = [s.get("signature_digest") for s in verification["signatures"]]
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _up_to_date(store: Repository, iref: ImageRef, identity: str, t0: float) -> PackResult | None:
    """The result of a pack that has nothing to do, or None: ``iref`` is ACTIVE, not stale, under
    the current master key, with no pack in progress, its version was packed from ``identity``,
    and every chunk of it is present (a pack of an image with a lost chunk re-reads the source and
    heals it).  Any doubt, or any error, is None: the full pack decides."""
    if not identity:
        return None
    try:
        e = store.catalog.entry(iref)
        now = store.clock()
        if (e.state != ACTIVE or e.pending or not e.complete or store.is_stale(e, now)
                or e.key_id != store.key.key_id or not hmac.compare_digest(e.packed_from, identity)):
            return None
        table = store.manifests.chunk_table(e)
        cids = [bytes(table[i:i + 32]) for i in range(0, len(table), ROW_SIZE)]
        if not all(store.chunks.has(c) for c in cids):
            return None
        store.stamp_read(e, now)  # packing it again is a use
    except (ConvstoreError, OSError):
        return None
    return PackResult(str(iref), e.manifest_digest or "", e.layers, e.logical_bytes, len(cids), 0, 0, 0,
                      e.layers, time.perf_counter() - t0, up_to_date=True)


def _pack(store: Repository, src: ImageSource, iref: ImageRef, dom: Domain, params: ChunkParams, level: int,
          workers: int | None, progress: Progress, reuse_layers: bool, t0: float, identity: str,
          repack_of: str | None = None, verification: dict[str, Any] | None = None) -> PackResult:
    table: list[ChunkIdentity] = []
    index: dict[bytes, int] = {}
    layers: list[LayerRecord] = []
    prior: dict[bytes, Location] = {}  # hints of reused layers' chunks (kept while their packs are)
    new_chunks = new_plain = new_stored = reused = 0
    nworkers = workers or max(2, (os.cpu_count() or 2))
    try:
        total = sum(d.size or 0 for d in src.layers)
        progress.start(f"packing {iref}", total or None)
        with ThreadPoolExecutor(nworkers, thread_name_prefix="convstore-pack") as pool:
            for i, desc in enumerate(src.layers):
                found = store.find_layer(dom, desc.diff_id) if reuse_layers else None
                if found is not None:
                    layers.append(_reuse_layer(found, desc, table, index))
                    prior.update(found[0].hints())
                    reused += 1
                    progress.advance(desc.size or 0)
                    continue
                raw, dec = layer_stream(src, i)
                try:
                    sink = _ChunkSink(store, dom.chunk_key, level, pool, table, index, max_inflight=4 * nworkers + 8)
                    chunker = StreamChunker(params, sink)
                    # An uncompressed blob is its own tar: its digest check covers the diff_id.
                    plain = desc.compression == "none"
                    reader = HashingReader(dec, hash=not plain)
                    buffered = io.BufferedReader(reader, 1 << 20)
                    meta = _MetaSink()
                    last = [0]

                    def content(r: Any, n: int) -> None:
                        chunker.feed_file(r, n)
                        done = raw.bytes_read
                        progress.advance(done - last[0])
                        last[0] = done

                    split = split_tar(buffered, meta, content)
                    chunker.cut()
                    sink.drain()
                finally:
                    dec.close()
                raw.drain()  # the blob digest is checked at its end
                progress.advance(raw.bytes_read - last[0])
                diff_id = "sha256:" + (raw.hexdigest() if reader.h is None else reader.h.hexdigest())
                if not hmac.compare_digest(diff_id, desc.diff_id):
                    raise DigestMismatch(f"layer {desc.digest}: uncompressed content hashes to {diff_id}, "
                                         f"config says {desc.diff_id}")
                layers.append(LayerRecord(
                    desc.media_type, desc.digest, desc.size, desc.diff_id, reader.n, split.content_size,
                    meta.finish(), split.segments, sink.layer_chunks, split.entries, desc.annotations))
                new_chunks += sink.new_chunks
                new_plain += sink.new_plain
                new_stored += sink.new_stored
        manifest = Manifest(
            name=iref.name, tag=iref.tag,
            source={"ref": src.ref, "manifest_digest": src.manifest_digest},
            chunking=params, compression_level=level, domain=dom.public,
            config_media_type=src.config_media_type, config_digest=src.config_digest,
            config_bytes=src.config_bytes, source_manifest_media_type=src.manifest_media_type,
            source_manifest_bytes=src.manifest_bytes, annotations=src.annotations,
            layers=layers, chunks=table, created=now_iso(), verification=verification,
        )
        store.chunks.flush()  # chunks durable before anything references them
        manifest.locations = store.chunks.locate([c.cid for c in table], [prior.get(c.cid) for c in table])
        digest, wrapped = store.manifests.put(manifest)
        store.finish_pack(iref, digest, wrapped, manifest.created, src.ref, manifest.logical_bytes, len(layers),
                          dom.public["name"], identity, (src.manifest_digest or "", src.config_digest), repack_of)
        store.manifests.record_layers(dom, manifest, digest, wrapped)
    finally:
        progress.finish()
    return PackResult(str(iref), digest, len(layers), manifest.logical_bytes, len(table), new_chunks, new_plain,
                      new_stored, reused, time.perf_counter() - t0)


def _reuse_layer(found: tuple[Manifest, LayerRecord], desc: LayerDescriptor, table: list[ChunkIdentity],
                 index: dict[bytes, int]) -> LayerRecord:
    """Copy a stored layer's record into this image, renumbering its chunks."""
    m, old = found
    chunks = array("I", (_intern(m.chunks[j], table, index)[0] for j in old.chunks))
    return LayerRecord(desc.media_type, desc.digest, desc.size, desc.diff_id, old.uncompressed_size,
                       old.content_size, old.meta, old.segments, chunks, old.entries, desc.annotations)
