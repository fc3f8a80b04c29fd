"""Master key rotation: re-wrap every data key and domain secret under a new
key, never touching chunks or manifests.

Atomic per object (each catalog entry, domain record and layer-index record
is replaced on its own, under its lock) and resumable: an object already
under the new key is skipped, so a rekey killed at any point is finished by
running it again.  Afterwards the old key is no longer needed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from .core.catalog import CatalogEntry
from .core.repository import Repository
from .keys import KeyProvider
from .keys.audit import AuditedKeyProvider


@dataclass
class RekeyReport:
    old_key_id: str
    new_key_id: str
    images: int
    domains: int
    layer_records: int
    skipped: int
    seconds: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def rekey(store: Repository, new: KeyProvider) -> RekeyReport:
    """Re-wrap everything under ``new``.  ``store.key`` must still open what
    is not yet re-wrapped."""
    t0 = time.perf_counter()
    old = store.key
    new = new if isinstance(new, AuditedKeyProvider) else AuditedKeyProvider(new, store.record_audit)
    # exclusive against packs and pulls (they hold the gc lock shared): none can publish an image
    # under the old key after this pass went by it.  A registry store: an exclusive lease (StoreBusy while
    # a pack or copy into it holds one).
    with store.gc_lock(optional=True, purpose="rekey"):
        counts = _rekey(store, old, new)
    return RekeyReport(old.key_id, new.key_id, *counts, time.perf_counter() - t0)


def _rekey(store: Repository, old: KeyProvider, new: KeyProvider) -> tuple[int, int, int, int]:
    images = skipped = 0

    # the metadata key (which authenticates every record below) is re-wrapped last, so that a rekey killed
    # at any point is finished by running it again with the old key
    store.ident.unlock(new if store.ident.metadata_key_id == new.key_id else old)

    # domain secrets (each record under its lock: convstore.core.domains)
    domains, done = store.convergence_domains.rewrap(old, new)
    skipped += done

    # catalog entries (one image version each)
    for e in store.catalog.list(strict=True):  # never leave an entry behind under a key about to be dropped
        if not e.complete:
            continue
        moved = [False]

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            if cur is None or not cur.complete or cur.key_id == new.key_id:
                return cur
            assert cur.wrapped_key is not None and cur.manifest_digest is not None
            ctx = store.manifests.context(cur.ref.name, cur.manifest_digest)
            dek = old.unwrap(cur.wrapped_key, ctx)
            moved[0] = True
            return replace(cur, key_id=new.key_id, wrapped_key=new.wrap(dek, ctx))

        store.catalog.update(e.ref, change)
        if moved[0]:
            images += 1
        else:
            skipped += 1

    # layer-index records carry wrapped data keys too (convstore.core.manifests)
    layers, done = store.manifests.rewrap_layer_records(old, new)
    skipped += done
    store.ident.rewrap(old, new)
    return images, domains, layers, skipped
