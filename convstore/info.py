"""What ``inspect`` and ``stats`` report: one image's entry, chunking and
layers (no key bytes), and a store's logical, unique and stored bytes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .core.repository import Repository
from .manifest import ROW_SIZE, ROW_SIZE_AT
from .stores.base import ChunkSet


@dataclass(frozen=True)
class LayerInfo:
    media_type: str
    digest: str | None
    size: int | None
    diff_id: str
    uncompressed_size: int
    files: int
    chunks: int


@dataclass(frozen=True)
class ImageInfo:
    """What ``inspect`` shows of one image."""

    entry: dict[str, Any]  # the catalog entry's public fields (CatalogEntry.public)
    domain: dict[str, Any]
    chunking: dict[str, Any]
    compression_level: int
    config_digest: str
    config: dict[str, Any]
    chunks: int
    layers: tuple[LayerInfo, ...]
    #: what the trust policy verified at pack (convstore.oci.policy), None if nothing was recorded
    verification: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("entry"), **d}


@dataclass(frozen=True)
class StoreStats:
    images: int
    logical_bytes: int
    unique_chunks: int
    unique_plaintext_bytes: int
    stored_bytes: int
    stored_chunk_bytes: int
    stored_manifest_bytes: int
    dedup_ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect(repo: Repository, ref: str) -> ImageInfo:
    """An image's catalog entry, chunking and layers (no key bytes)."""
    e = repo.catalog.entry(ref)
    m = repo.manifests.load(e)
    return ImageInfo(
        entry=e.public(), domain=dict(m.domain), chunking=m.chunking.to_json(),
        compression_level=m.compression_level, config_digest=m.config_digest,
        config=json.loads(m.config_bytes), chunks=len(m.chunks), verification=m.verification,
        layers=tuple(LayerInfo(l.media_type, l.digest, l.size, l.diff_id, l.uncompressed_size, len(l.entries),
                               len(l.chunks)) for l in m.layers))


def stats(repo: Repository) -> StoreStats:
    """Logical, unique-plaintext and stored bytes over every image.  Reads
    each manifest's chunk table only (logical sizes are in the catalog)."""
    logical = images = 0
    seen = ChunkSet(size_at=ROW_SIZE_AT)  # compact: 36 bytes per id, deduplicated bucket by bucket below
    for e in repo.catalog.complete():
        images += 1
        logical += e.logical_bytes or 0
        seen.add_rows(repo.manifests.chunk_table(e), ROW_SIZE)
    n_unique = unique_bytes = 0
    for first in range(256):
        sizes = seen.bucket_sizes(first)
        n_unique += len(sizes)
        unique_bytes += sum(sizes.values())
    chunk_bytes = repo.chunks.usage()
    meta_bytes = repo.manifests.usage()
    stored = chunk_bytes + meta_bytes
    return StoreStats(images, logical, n_unique, unique_bytes, stored, chunk_bytes, meta_bytes,
                      round(logical / stored, 3) if stored else None)
