"""An S3 bucket (any S3-compatible object store) as a convstore store:
``s3://BUCKET/PREFIX`` (layout 1, docs/format.md).

The same guarantees as the registry store (:mod:`convstore.stores.registry`),
on S3's own primitives:

* :class:`~.index.S3ChunkStore` (:mod:`.index`): chunks in pack objects
  ``PREFIX/packs/<sha256>``, read with one ranged GET at the place an image
  manifest's location hint names (no index on the read path); the chunk
  index, for writers' dedup, as segments and snapshots under ``PREFIX/index/``;
* :class:`~.meta.S3Store` (:mod:`.meta`): every other object under
  ``PREFIX/meta/<key>`` -- a put replaces the whole object atomically, an
  exclusive put is an atomic create (``If-None-Match: *``), and locks are
  leases (``PREFIX/locks/``), so catalog updates, gc and packs exclude each
  other as on a local store;
* :class:`~.client.S3Client` (:mod:`.client`): the boto3 calls and the
  named errors (no such bucket, access denied, unreachable endpoint).

Opening a store reads ``store.json``; an image is found by its key
(``meta/refs/NAME:TAG``), so neither costs more with more images.
"""

from __future__ import annotations

from .client import ENDPOINT_ENV, S3Client, parse_s3_url
from .index import S3ChunkStore, S3PackReader
from .meta import S3Store

__all__ = ["ENDPOINT_ENV", "S3ChunkStore", "S3Client", "S3PackReader", "S3Store", "open_s3", "parse_s3_url"]


def open_s3(url: str, endpoint: str | None = None, index_dir: str | None = None,
            timeout: float = 60.0) -> tuple[S3Store, S3ChunkStore]:
    """The metadata store and the chunk store of ``s3://BUCKET/PREFIX`` (one client)."""
    client = S3Client(url, endpoint, timeout)
    meta, chunks = S3Store(client), S3ChunkStore(client, index_dir)
    meta.chunks = chunks
    return meta, chunks
