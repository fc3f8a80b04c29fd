"""Keeping a long-lived store healthy: refresh, garbage collection, verification.

GC safety with concurrent packs: every pack holds the store's ``gc`` lock
shared for its whole run, and gc holds it exclusively, so gc never runs
while a pack might be relying on (deduplicating against) a chunk that no
manifest references yet.  A store without locks (a registry) uses leases
instead (:mod:`convstore.core.leases`, docs/lifecycle.md): gc there deletes
the removed images' manifests and rewrites the chunk index; the registry's
own garbage collection frees the pack blobs nothing references any more.
Readers take no lock: a reader of an image that is removed and collected may
fail, one of a live image cannot.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from .core import lifecycle
from .core.catalog import FAILED, INACTIVE, CatalogEntry
from .manifest import ROW_SIZE
from .stores.base import ChunkSet
from .errors import ChunkMissing, ConvstoreError, CorruptObject, KeyAccessDenied, SourceChanged, StoreError
from .oci.sources import parse_source
from .pack import check_recorded_source, repack
from .core.repository import Repository

TMP_GRACE = 3600.0  # temporary files older than this belong to dead writers
INDEX = "chunk index"  # what verify names when an index file (a cache) is damaged


# -- refresh -------------------------------------------------------------------
@dataclass
class RefreshChange:
    ref: str
    old: str
    new: str
    reason: str


def refresh(store: Repository, ref: str | None = None, check_sources: bool = True) -> list[RefreshChange]:
    """Re-check sources and keys (FAILED <-> ACTIVE), age unused images to
    INACTIVE, and clear packs that died (their pid is gone)."""
    now = store.clock()
    entries = [store.catalog.entry(ref)] if ref else store.catalog.list()
    changes: list[RefreshChange] = []
    for e in entries:
        problem = _problem(store, e) if check_sources and e.complete else None

        def change(cur: CatalogEntry | None, problem: str | None = problem) -> CatalogEntry | None:
            if cur is None:
                return None
            cur = lifecycle.clear_dead_pack(cur, now, store.pending_alive)
            if cur is None or not cur.complete:
                return cur
            # the source was judged for e's version: a name packed again meanwhile is judged next time
            judged = cur.manifest_digest == e.manifest_digest
            if problem and judged:
                return lifecycle.fail(cur, now, problem, update_reason=True)
            if cur.state == FAILED and check_sources and judged:
                return lifecycle.recover(cur, now)
            if store.is_stale(cur, now):
                return lifecycle.deactivate(cur, now, store.inactive_after)
            return cur

        new = store.catalog.update(e.ref, change)
        new_state = new.state if new else "removed"
        if new_state != e.state or (new is not None and new.state == FAILED and new.reason != e.reason):
            changes.append(RefreshChange(str(e.ref), e.state, new_state, new.reason if new else "interrupted pack"))
    return changes


def _problem(store: Repository, e: CatalogEntry) -> str | None:
    """Why ``e`` cannot be served, or None.  A FAILED image comes back only if its source still
    serves what it was packed from (a moved tag keeps it FAILED, naming both digests)."""
    try:
        src = parse_source(e.source, insecure=store.options.insecure)
        src.close()
        if e.state == FAILED:
            check_recorded_source(store, e)
    except SourceChanged as err:
        return str(err)
    except ConvstoreError as err:
        return f"source {e.source} is no longer available ({err})"
    try:
        store.manifests.load(e)
    except KeyAccessDenied as err:
        return f"key access denied: {err}"
    except StoreError as err:
        return f"manifest unreadable: {err}"
    return None


# -- garbage collection ----------------------------------------------------------
@dataclass
class GCReport:
    dry_run: bool
    live_images: int
    reclaimed_images: list[str]
    chunks_total: int
    chunks_removed: int
    chunk_bytes_freed: int
    manifests_removed: int
    manifest_bytes_freed: int
    other_files_removed: int
    store_bytes_before: int
    store_bytes_after: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gc(store: Repository, dry_run: bool = False) -> GCReport:
    """Mark every chunk a live (complete, not INACTIVE) image references;
    sweep the rest.  Also removes unreferenced manifests, profiles,
    layer-index records and stale temporary files."""
    t0 = time.perf_counter()
    with store.gc_lock():
        refresh(store, check_sources=False)
        before = _usage(store)
        live = ChunkSet()
        keep_manifests: set[str] = set()
        reclaimed: list[str] = []
        n_live = 0
        # a store whose containers someone else reclaims (a registry) must know which ones live images use
        live_containers: set[bytes] | None = set() if store.chunk_store.needs_locations else None
        for e in store.catalog.complete(strict=True):  # an entry that fails authentication stops gc
            keep_manifests.add(e.manifest_digest.split(":", 1)[1])  # type: ignore[union-attr]
            if e.state == INACTIVE:
                reclaimed.append(str(e.ref))
                continue
            table = store.manifests.chunk_table(e)  # the chunk table only: no file index decoded
            n_live += 1
            live.add_rows(table, ROW_SIZE)  # 32 bytes per id, no object per id
            if live_containers is not None:
                live_containers.update(h[0] for h in store.manifests.load(e).locations if h is not None)
        chunks_total, unreferenced = store.chunk_store.unreferenced(live)  # set operations over the index
        del live
        doomed = [c for c, _n in unreferenced]
        chunk_bytes = sum(n for _c, n in unreferenced)
        dead_manifests, manifest_bytes, others = store.manifests.dead(keep_manifests)
        quarantined = store.chunks.quarantined()
        if not dry_run:
            if not store.objects.supports_locking:
                store.leases.check_held()  # gc's lease lapsed: a pack elsewhere may rely on what it would sweep
            store.chunks.sweep(doomed, live_containers)
            store.chunk_store.compact()
            store.manifests.delete(dead_manifests + others)
            store.chunks.drop_quarantined(quarantined)
            others_n = len(others) + len(quarantined) + store.chunk_store.clean_leftovers(TMP_GRACE)
            if not store.objects.supports_locking:
                others_n += store.leases.clean()  # dead holders' leases (and unauthentic ones)
        else:
            others_n = len(others) + len(quarantined)
        after = before if dry_run else _usage(store)
    return GCReport(dry_run, n_live, reclaimed, chunks_total, len(doomed), chunk_bytes, len(dead_manifests),
                    manifest_bytes, others_n, before, after, time.perf_counter() - t0)


def _usage(store: Repository) -> int:
    return store.chunks.usage() + store.manifests.usage(derived=True)


# -- verification ----------------------------------------------------------------
@dataclass
class VerifyReport:
    images: int
    chunks_checked: int
    missing: dict[str, list[str]] = field(default_factory=dict)  # cid -> images
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # image -> why
    errors: dict[str, str] = field(default_factory=dict)  # cid -> a read error (transient: not repaired)
    index_problems: list[str] = field(default_factory=list)  # damaged chunk-index files (caches: rebuilt by repair)
    repaired: list[str] = field(default_factory=list)
    not_repaired: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.unreadable or self.errors or self.index_problems)

    @property
    def affected(self) -> list[str]:
        out = set(self.unreadable) | ({INDEX} if self.index_problems else set())
        for imgs in (*self.missing.values(), *self.corrupt.values()):
            out.update(imgs)
        return sorted(out)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clean"], d["affected"] = self.clean, self.affected
        return d


def verify(store: Repository, ref: str | None = None, repair: bool = False, workers: int = 4,
           repair_from: Repository | None = None) -> VerifyReport:
    """Check that every catalog entry authenticates, and that every chunk of
    every live image (or of ``ref``) is present, decrypts, and holds the
    plaintext its manifest names.  A corrupt chunk is quarantined.  With
    ``repair``, missing and corrupt chunks are copied from ``repair_from``
    (another store holding them) where it can, and the images still affected
    are re-packed from their authenticated source."""
    t0 = time.perf_counter()
    report = VerifyReport(0, 0)
    report.index_problems = store.chunk_store.check_index()
    if ref:
        entries = [store.catalog.entry(ref)]
    else:
        entries = [e for e in store.catalog.list(problems=report.unreadable) if e.complete and e.state != INACTIVE]
    users: dict[bytes, list[str]] = {}
    idents: dict[bytes, Any] = {}
    for e in entries:
        try:
            m = store.manifests.load(e)
        except ConvstoreError as err:
            report.unreadable[str(e.ref)] = str(err)
            continue
        report.images += 1
        for c in m.chunks:
            users.setdefault(c.cid, []).append(str(e.ref))
            idents[c.cid] = c

    def check(cid: bytes) -> tuple[bytes, str | None]:
        try:
            store.chunks.read(idents[cid])  # quarantines a chunk that is corrupt as stored
            return cid, None
        except ChunkMissing:
            return cid, "missing"
        except CorruptObject:
            return cid, "corrupt"
        except ConvstoreError as err:  # the store could not be read (a transient error): never a repair target
            report.errors[cid.hex()] = str(err)
            return cid, "error"

    with ThreadPoolExecutor(workers) as pool:
        for cid, problem in pool.map(check, list(idents)):
            report.chunks_checked += 1
            if problem == "missing":
                report.missing[cid.hex()] = users[cid]
            elif problem == "corrupt":
                report.corrupt[cid.hex()] = users[cid]
    if repair and report.index_problems:
        store.chunk_store.repair_index()
        report.repaired.append(INDEX)
    if repair and not report.clean and set(report.affected) - {INDEX}:
        _repair(store, report, idents, repair_from, {str(e.ref): e.manifest_digest or "" for e in entries})
    report.seconds = time.perf_counter() - t0
    return report


def _repair(store: Repository, report: VerifyReport, idents: dict[bytes, Any], other: Repository | None,
            versions: dict[str, str]) -> None:
    """Copy bad chunks from ``other`` where it holds good ones, then re-pack
    every image still affected from its (authenticated) source.  An image that cannot be
    repaired goes FAILED only if it still holds the version found broken (``versions``): one
    packed again meanwhile is not judged by the old version's problem."""
    # corrupt chunks were quarantined by the read that found them (after a second read confirmed it);
    # nothing is deleted here, so a transient error never costs a good chunk
    bad = {bytes.fromhex(h): imgs for h, imgs in (*report.missing.items(), *report.corrupt.items())}
    authentic = {str(e.ref) for e in store.catalog.list()}
    still = {r for r in report.unreadable if r in authentic}  # a tampered entry has no source to trust
    copied: set[str] = set()
    for cid, imgs in bad.items():
        if other is not None:
            try:
                # only a copy that checks out against our (authenticated) manifest: the plaintext it names
                blob = other.chunks.checked(other.chunks.blob(cid), idents[cid])
                store.chunks.put(cid, blob)
                copied.update(imgs)
                continue
            except ConvstoreError:
                pass
        still.update(imgs)
    store.chunks.flush()
    report.repaired.extend(sorted(copied - still))
    for ref in sorted(still):
        try:
            repack(store, ref, repair=True)  # only what it was packed from, back into its own domain
            report.repaired.append(ref)
        except ConvstoreError as err:
            report.not_repaired[ref] = str(err)
            now, why, seen = store.clock(), f"cannot repair: {err}", versions.get(ref, "")
            store.catalog.update(ref, lambda c: lifecycle.fail(c, now, why, version=seen))
