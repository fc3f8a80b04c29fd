"""Copy images between stores (push to / pull from a registry), sending only
the chunks the destination lacks.

Chunks are copied as they are (they are bound to their chunk id, not to a
store); the manifest is re-sealed under a new data key for the destination
store and wrapped for it, since every wrapped key is bound to its store.
The image's convergence domain comes along where the destination lacks it
(:meth:`~convstore.core.domains.Domains.adopt`), first, so that what is
packed there later dedups with what was copied.  A destination with another
domain of that name keeps its own: the image is copied all the same (its
manifest holds its chunk keys, so it reads), but its chunks will not dedup
with what is packed there, and the result says so (``domain_note``).
The destination's catalog entry is written last: an interrupted copy leaves
nothing visible, and re-running it sends only what is still missing.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from .core.catalog import CatalogEntry
from .errors import DomainConflict
from .manifest import Manifest
from .progress import NoProgress, Progress
from .refs import ImageRef
from .core.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class CopyResult:
    ref: str
    chunks: int
    chunks_sent: int
    bytes_sent: int
    seconds: float
    # empty, or why the image's convergence domain is not shared with the destination's (no dedup)
    domain_note: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def copy_image(src: Repository, dst: Repository, ref: str, dst_ref: str | None = None, *, workers: int = 8,
               progress: Progress | None = None) -> CopyResult:
    t0 = time.perf_counter()
    progress = progress or NoProgress()
    entry, manifest = src.open_image(ref)
    target = ImageRef.parse(dst_ref) if dst_ref else entry.ref
    if target.name != manifest.name:
        manifest.name, manifest.tag = target.name, target.tag
    # like a pack, a copy into a local store relies on chunks it finds there: gc waits for it
    with dst.gc_guard():
        try:
            domain, note = _bring_domain(src, dst, manifest), ""
        except DomainConflict as e:
            domain, note = "", str(e)
            log.info("%s", note)  # the result carries it; the CLI prints it
        result = _copy(src, dst, entry, manifest, target, workers, progress, t0, domain)
        result.domain_note = note
        return result


def _bring_domain(src: Repository, dst: Repository, manifest: Manifest) -> str:
    """Adopt the image's domain into ``dst`` where it lacks it; the name to record in the destination's
    entry: the domain's name if ``dst`` now holds that very domain (same id), else "" (none)."""
    name, did = str(manifest.domain.get("name") or ""), str(manifest.domain.get("id") or "")
    if not name or not did or src.id == dst.id:
        return name if src.id == dst.id else ""
    epoch = manifest.domain.get("epoch")
    dst.convergence_domains.adopt(src.convergence_domains, name, did,  # DomainConflict: nothing written
                                  min_epoch=epoch if isinstance(epoch, int) else 0)
    try:
        mine = dst.convergence_domains.record(name)
    except KeyError:
        return ""
    return name if mine.get("id") == did else ""


def _copy(src: Repository, dst: Repository, entry: CatalogEntry, manifest: Manifest, target: ImageRef, workers: int,
          progress: Progress, t0: float, domain: str) -> CopyResult:
    cids = list(dict.fromkeys(c.cid for c in manifest.chunks))
    missing = [c for c in cids if not dst.chunks.has(c)]
    idents = {c.cid: c for c in manifest.chunks}
    hints = manifest.hints()
    progress.start(f"copying {entry.ref}", sum(idents[c].size for c in missing))
    sent = 0

    def copy(batch: list[bytes]) -> int:
        blobs = src.chunks.blobs(batch, hints)  # coalesced where the source can
        n = 0
        for cid in batch:
            blob = src.chunks.checked(blobs[cid], idents[cid])  # a bad copy would become a dedup target there
            dst.chunks.put(cid, blob)
            progress.advance(idents[cid].size)
            n += len(blob)
        return n

    batches = [missing[i : i + 64] for i in range(0, len(missing), 64)]
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="convstore-copy") as pool:
            for n in pool.map(copy, batches):
                sent += n
        dst.chunks.flush()
        # the hints name the source's containers: the destination's replace them
        manifest.locations = dst.chunks.locate([c.cid for c in manifest.chunks])
        digest, wrapped = dst.manifests.put(manifest)
        # the domain is recorded only if the destination holds that very domain (a re-pack there goes into it)
        # the source digests come from the (authenticated) manifest: a re-pack there must find them again
        dst.finish_pack(target, digest, wrapped, manifest.created, entry.source, entry.logical_bytes, entry.layers,
                        domain,
                        source_digests=(str(manifest.source.get("manifest_digest") or ""), manifest.config_digest))
    except BaseException:
        dst.chunks.abort()
        raise
    finally:
        progress.finish()
    return CopyResult(str(target), len(cids), len(missing), sent, time.perf_counter() - t0)
