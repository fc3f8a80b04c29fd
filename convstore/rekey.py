"""Master key rotation: re-wrap every data key and domain secret under a new
key, never touching chunks or manifests.

Atomic per object (each catalog entry, domain record and layer-index record
is replaced on its own, under its lock) and resumable: an object already
under the new key is skipped, so a rekey killed at any point is finished by
running it again.  Afterwards the old key is no longer needed.
"""

from __future__ import annotations

import base64
import contextlib
import time
from dataclasses import asdict, dataclass, replace

from .catalog import CatalogEntry
from .keys import KeyProvider
from .keys.audit import AuditedKeyProvider
from .store import Store


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


def rekey(store: Store, new: KeyProvider) -> RekeyReport:
    """Re-wrap everything under ``new``.  ``store.key`` must still open what
    is not yet re-wrapped."""
    t0 = time.perf_counter()
    old = store.key
    new = new if isinstance(new, AuditedKeyProvider) else AuditedKeyProvider(new, store._audit)
    # exclusive against packs and pulls (they hold the gc lock shared): none can publish an image
    # under the old key after this pass went by it.  A registry store has no locks: stop its writers.
    lock = store.objects.lock("gc") if store.objects.supports_locking else contextlib.nullcontext()
    with lock:
        counts = _rekey(store, old, new)
    return RekeyReport(old.key_id, new.key_id, *counts, time.perf_counter() - t0)


def _rekey(store: Store, old: KeyProvider, new: KeyProvider) -> tuple[int, int, int, int]:
    images = domains = layers = skipped = 0

    # the metadata key (which authenticates every record below) is re-wrapped last, so that a rekey killed
    # at any point is finished by running it again with the old key
    store.unlock_metadata(new if store.metadata_key_id() == new.key_id else old)

    # domain secrets
    for k in list(store.objects.list("domains")):
        name = k.split("/", 1)[1]
        with store.objects.lock(f"domain-{name}"):
            rec = store.convergence_domains.record(name)
            if rec["key_id"] == new.key_id:
                skipped += 1
                continue
            ctx = store.convergence_domains.context(rec)
            secret = old.unwrap(base64.b64decode(rec["wrapped_secret"]), ctx)
            rec = dict(rec, key_id=new.key_id, wrapped_secret=base64.b64encode(new.wrap(secret, ctx)).decode())
            store.convergence_domains.write(rec)
            domains += 1

    # catalog entries (one image version each)
    for e in store.images(strict=True):  # never leave an entry behind under a key about to be dropped
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

        store.update_entry(e.ref, change)
        if moved[0]:
            images += 1
        else:
            skipped += 1

    # layer-index records carry wrapped data keys too
    for k, maybe in store.manifests.layer_records():
        if maybe is None:
            store.objects.delete(k)  # fails authentication: a hint nobody may trust
            continue
        rec = maybe
        if rec.get("key_id") == new.key_id:
            skipped += 1
            continue
        ctx = store.manifests.context(rec["image"], rec["manifest"])
        try:
            dek = old.unwrap(base64.b64decode(rec["wrapped_key"]), ctx)
        except Exception:
            store.objects.delete(k)  # a stale hint: dropping it only costs a re-read
            continue
        rec.update(key_id=new.key_id, wrapped_key=base64.b64encode(new.wrap(dek, ctx)).decode())
        store.manifests.put_layer_record(k, rec)
        layers += 1
    store.objects.flush()  # the layer-index records
    store.rewrap_metadata_key(old, new)
    return images, domains, layers, skipped
