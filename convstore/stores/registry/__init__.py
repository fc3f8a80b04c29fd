"""An OCI registry as a convstore store.

The HTTP client is :mod:`convstore.oci.registry_client`; this package maps
convstore's objects onto a repository (layout 2, docs/format.md) --
:class:`~.index.RegistryChunkStore` (:mod:`.index`) and
:class:`~.meta.RegistryStore` (:mod:`.meta`), built together by
:func:`open_registry`:

* chunks are packed: the chunks written between two flushes (at most
  ``PACK_BYTES``) are uploaded as one blob; a chunk is read with an HTTP
  Range request at the place its image manifest's location hint names, so a
  read needs no index.  Measured on loopback (docs/benchmarks.md):
  uploading 1,000 40 kB chunks took 10.9 s as 1,000 blobs and 0.2 s as one
  pack, and a ranged read of one chunk costs about what a whole small blob
  does (4.7 vs 3.3 ms), so packs win;
* the chunk index -- used for dedup by writers -- lives in the sibling
  repository ``REPO/convstore-index`` as segments merged into snapshots
  (see :class:`RegistryChunkStore`);
* every other object (sealed image manifests, catalog entries, domains,
  store identity) is an OCI artifact with one layer, tagged
  ``<kind>-<sha256(key)[:40]>`` (kind ``r`` catalog entries, ``m`` manifests,
  ``d`` domains, ...: a listing of one kind reads only the tag list) and
  annotated with its key; objects up to ``INLINE_BYTES`` are also embedded in
  the descriptor (one GET reads them).

Pushes are idempotent: a blob already present is not sent again (HEAD),
and an interrupted push re-run sends only what is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import InvalidReference
from ...oci.registry_client import (READ_DEADLINE, TIMEOUT, RegistryClient, RegistryCorrupt, RegistryError,
                                    RegistryResponseTooLarge, RegistryTooSlow)
from ..packindex import COMPACT_SEGMENTS, PACK_BYTES
from .artifacts import AT_IMAGE, AT_MANIFEST, AT_OBJECT, artifact, layer
from .index import INDEX_REPO, RegistryChunkStore
from .meta import INLINE_BYTES, RegistryStore

if TYPE_CHECKING:
    import requests.adapters

_artifact, _layer = artifact, layer  # their names before the split (tests forge artifacts with them)

__all__ = ["AT_IMAGE", "AT_MANIFEST", "AT_OBJECT", "COMPACT_SEGMENTS", "INDEX_REPO", "INLINE_BYTES", "PACK_BYTES", "RegistryChunkStore", "RegistryClient",
           "RegistryCorrupt", "RegistryError", "RegistryResponseTooLarge", "RegistryStore", "RegistryTooSlow",
           "artifact", "layer", "open_registry", "parse_store_url"]


def parse_store_url(url: str) -> tuple[str, str]:
    """``oci://HOST[:PORT]/REPO`` -> (host, repo)."""
    if not url.startswith("oci://"):
        raise InvalidReference(f"{url!r}: a registry store is oci://HOST[:PORT]/REPO")
    host, _, repo = url[6:].partition("/")
    if not host or not repo:
        raise InvalidReference(f"{url!r}: a registry store is oci://HOST[:PORT]/REPO")
    return host, repo.rstrip("/")


def open_registry(url: str, insecure: bool = False, username: str | None = None,
                  password: str | None = None, index_dir: str | None = None,
                  timeout: float = TIMEOUT, *, transport: requests.adapters.BaseAdapter | None = None,
                  deadline: float | None = READ_DEADLINE) -> tuple[RegistryStore, RegistryChunkStore]:
    """The metadata store and the chunk store of one registry repository (one
    client; ``transport``: see :class:`RegistryClient`; ``deadline``: the
    seconds each read gets for all its attempts, see :meth:`RegistryClient._req`)."""
    host, repo = parse_store_url(url)
    client = RegistryClient(host, insecure, username, password, timeout, transport=transport, deadline=deadline)
    client.reg.auth.load_configs(client.reg.get_container(f"{host}/{repo}"))
    meta, chunks = RegistryStore(url, client, repo), RegistryChunkStore(url, client, repo, index_dir)
    meta.chunks = chunks
    return meta, chunks
