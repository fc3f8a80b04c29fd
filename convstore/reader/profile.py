"""Start-up profiles that serve more than one start.

A profile is the set of chunks (``(layer, position)`` in the layer's content
stream) that a container read before it was ready.  Every start records
what it read; :func:`save_start` merges it with the stored profile -- the
union, in file order (layer, then position: the order the chunks are packed,
so a prefetch reads them with few coalesced ranges) -- and stores it again
only when the start read something new.  The stored format is
:class:`~convstore.core.manifests.ManifestStore`'s (format 2, docs/format.md).

Two processes saving at once: the last one wins and the other's new chunks
wait for a later start (a profile is a hint; losing part of it costs only
round trips).
"""

from __future__ import annotations

import logging

from ..core.catalog import CatalogEntry
from ..core.repository import Repository
from ..errors import ConvstoreError

log = logging.getLogger(__name__)

#: a profile never names more chunks than this (a start that reads a whole huge image is not a start-up)
MAX_PROFILE_CHUNKS = 1 << 20


def merge(*profiles: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of profiles, in file order."""
    out: set[tuple[int, int]] = set()
    for p in profiles:
        out.update(p)
    return sorted(out)[:MAX_PROFILE_CHUNKS]


def save_start(repo: Repository, entry: CatalogEntry, recorded: list[tuple[int, int]]) -> int | None:
    """Merge what one start read into ``entry``'s stored profile; the merged
    profile's size if it was stored, None if nothing new was read (or it could
    not be stored: logged)."""
    if not recorded:
        return None
    prior = repo.manifests.load_profile_record(entry)
    old, starts = prior if prior is not None else ([], 0)
    merged = merge(old, recorded)
    if prior is not None and len(merged) == len(set(old)) and old == merged:
        return None  # this start read nothing the profile did not have
    try:
        repo.manifests.save_profile(entry, merged, starts=starts + 1)
    except (ConvstoreError, OSError) as e:
        log.warning("cannot save the start-up profile of %s: %s", entry.ref, e)
        return None
    log.info("start-up profile of %s: %d chunks (%d new) from %d starts", entry.ref, len(merged),
             len(merged) - len(set(old)), starts + 1)
    return len(merged)
