"""The image lifecycle: every transition of a catalog entry, in one place.

Each function takes the current entry (or None) and returns the new one (or
None to remove it).  They are pure: :meth:`Catalog.update
<convstore.core.catalog.Catalog.update>` runs them under the entry's lock and
writes (and authenticates) the result.  Only the transitions in
:data:`TRANSITIONS` are allowed: :func:`_to`, the one place a state changes,
refuses any other (:meth:`CatalogEntry.transition` only records one).

======== ============ ============================== ===================================
from     to           function                       trigger
======== ============ ============================== ===================================
(none)   PENDING      :func:`begin_pack`             first pack of a name:tag
INACTIVE PENDING      :func:`begin_pack`             pack / reactivation of an unused image
FAILED   PENDING      :func:`begin_pack`             re-pack of a failed image
PENDING  ACTIVE       :func:`finish_pack`            every chunk and the manifest durable
ACTIVE   ACTIVE       :func:`finish_pack`            an update of a served tag
INACTIVE ACTIVE       :func:`finish_pack`            a pack that raced a refresh (also FAILED)
PENDING  INACTIVE     :func:`abort_pack`             a re-pack failed; :func:`clear_dead_pack`
PENDING  FAILED       :func:`abort_pack`             a re-pack found its source gone or changed
ACTIVE   FAILED       :func:`abort_pack`             a repair found its source changed
ACTIVE   INACTIVE     :func:`deactivate`             unread for ``inactive_after`` (refresh, read)
INACTIVE PENDING      :func:`start_reactivation`     the first read of an INACTIVE image
ACTIVE   FAILED       :func:`fail`                   source gone, key denied, repair impossible
INACTIVE FAILED       :func:`fail`                   the same, found by refresh
FAILED   ACTIVE       :func:`recover`                source and key are back (refresh)
======== ============ ============================== ===================================

A pending *update* of an ACTIVE image does not change its state: the entry
keeps serving the previous version and carries a ``pending`` mark.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .catalog import ACTIVE, FAILED, INACTIVE, PENDING, CatalogEntry, iso, pid_alive
from ..errors import ImageChanged, ImageNotFound, ImagePending
from ..refs import ImageRef

NEW = "new"
#: (from, to) pairs a transition may make; (s, s) pairs record an event without a state change
TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    (NEW, PENDING), (INACTIVE, PENDING), (FAILED, PENDING), (PENDING, PENDING),
    (PENDING, ACTIVE), (ACTIVE, ACTIVE), (INACTIVE, ACTIVE), (FAILED, ACTIVE),
    (PENDING, INACTIVE), (PENDING, FAILED),
    (ACTIVE, INACTIVE), (INACTIVE, INACTIVE),
    (ACTIVE, FAILED), (INACTIVE, FAILED), (FAILED, FAILED),
})


def _to(cur: CatalogEntry, state: str, reason: str, now: float, **changes: Any) -> CatalogEntry:
    """The one place a state changes: checked against :data:`TRANSITIONS`, recorded in the history."""
    if (cur.state, state) not in TRANSITIONS:
        raise AssertionError(f"lifecycle: {cur.state} -> {state} is not a transition")
    return cur.transition(state, reason, now, **changes)


def _pending_mark(now: float, source: str) -> dict[str, Any]:
    import socket  # here: the module's enums cost every command ~2 ms of imports (docs/benchmarks.md)

    return {"since": now, "pid": os.getpid(), "host": socket.gethostname(), "source": source}


def _check_repack_of(cur: CatalogEntry | None, ref: ImageRef, repack_of: str | None) -> None:
    """A re-pack of the version ``repack_of`` goes on only while the name still points at it: if the
    name was packed again, copied into or removed since the re-pack read its entry, :class:`ImageChanged`
    (a repair never puts back what the user replaced or removed)."""
    if repack_of is None:
        return
    if cur is None or not cur.complete:
        raise ImageChanged(f"image {ref} was removed while it was being re-packed: nothing re-packed")
    if cur.manifest_digest != repack_of:
        raise ImageChanged(f"image {ref} was packed again while it was being re-packed (it now holds "
                           f"{cur.manifest_digest}, the re-pack was of {repack_of}): nothing re-packed")


def begin_pack(cur: CatalogEntry | None, ref: ImageRef, now: float, source: str,
               repack_of: str | None = None) -> CatalogEntry:
    """Mark ``ref`` PENDING, or note a pending update of a servable image.
    Refuses if another live process is packing it, or (a re-pack of the version ``repack_of``)
    if the name no longer points at that version."""
    if cur is not None and cur.pending and pid_alive(cur.pending) and cur.pending.get("pid") != os.getpid():
        raise ImagePending(f"image {ref} is already being packed (pid {cur.pending.get('pid')}, "
                           f"since {iso(cur.pending.get('since'))})")
    _check_repack_of(cur, ref, repack_of)
    pending = _pending_mark(now, source)
    if cur is None:
        return CatalogEntry(ref, PENDING, now, "packing", source=source, pending=pending,
                            history=({"at": now, "state": PENDING, "reason": "packing"},))
    if cur.complete and cur.state in (ACTIVE, PENDING):  # an update, or the reactivation's re-pack
        return replace(cur, pending=pending)
    return _to(cur, PENDING, "reactivating" if cur.state == INACTIVE else "re-packing", now, pending=pending)


def finish_pack(cur: CatalogEntry | None, ref: ImageRef, now: float, *, manifest_digest: str, key_id: str,
                wrapped_key: bytes, created: str, source: str, logical_bytes: int, layers: int,
                domain: str, packed_from: str = "", source_digests: tuple[str, str] = ("", ""),
                repack_of: str | None = None) -> CatalogEntry:
    """Point ``ref`` at a complete, durable version: ACTIVE.  ``source_digests``: the source manifest's
    and config's digests it was packed from (what a re-pack must find again).  ``repack_of``: a re-pack
    publishes only while the name still points at the version it re-packs (a copy into the name takes
    no pack lock)."""
    _check_repack_of(cur, ref, repack_of)
    base = cur or CatalogEntry(ref, PENDING, now)
    return _to(base, ACTIVE, "packed", now, manifest_digest=manifest_digest, key_id=key_id,
                           wrapped_key=wrapped_key, created=created, source=source, logical_bytes=logical_bytes,
                           layers=layers, last_read=now, pending=None, domain=domain, packed_from=packed_from,
                           source_manifest=source_digests[0], source_config=source_digests[1])


def abort_pack(cur: CatalogEntry | None, now: float, error: str, source_gone: bool,
               source_changed: bool = False, repack_of: str | None = None) -> CatalogEntry | None:
    """A pack by this process failed: keep serving the previous version.  A re-pack (repair,
    reactivation) whose source now serves other content: FAILED with ``error``, which names both
    digests; the entry keeps its version (nothing else is ever served under the name).  A re-pack of
    ``repack_of`` whose name now holds another version judges nothing about it: it only drops its mark."""
    if cur is None:
        return None
    if cur.pending and cur.pending.get("pid") != os.getpid() and pid_alive(cur.pending):
        return cur  # another process's pack: not ours to abort
    if repack_of is not None and cur.manifest_digest != repack_of:
        ours = cur.pending and cur.pending.get("pid") == os.getpid()
        return replace(cur, pending=None) if ours else cur
    if not cur.complete:
        return None  # a first pack that failed leaves the catalog as it was
    if source_changed:
        return _to(cur, FAILED, error, now, pending=None)
    if cur.state == PENDING:  # a reactivation or re-pack
        if source_gone:
            return _to(cur, FAILED, f"source {cur.source} no longer exists", now, pending=None)
        return _to(cur, INACTIVE, f"re-pack failed: {error}", now, pending=None)
    return replace(cur, pending=None)


def clear_dead_pack(cur: CatalogEntry, now: float,
                    alive: Callable[[dict[str, Any] | None], bool] = pid_alive) -> CatalogEntry | None:
    """Drop the pending mark of a pack whose process is gone (refresh); ``alive`` judges it
    (a store without locks: :meth:`Repository.pending_alive`, which asks the leases)."""
    if not (cur.pending and not alive(cur.pending)):
        return cur
    if not cur.complete:
        return None  # a first pack that died: nothing to serve
    if cur.state == PENDING:
        return _to(cur, INACTIVE, "reactivation was interrupted", now, pending=None)
    return _to(cur, cur.state, "update was interrupted", now, pending=None)


def mark_read(cur: CatalogEntry | None, now: float) -> CatalogEntry | None:
    """Record a read (``last_read``; written at most hourly by the caller)."""
    return replace(cur, last_read=now) if cur is not None and cur.complete else cur


def deactivate(cur: CatalogEntry, now: float, inactive_after: float) -> CatalogEntry:
    return _to(cur, INACTIVE, f"not read for {inactive_after / 86400:g} days", now)


def start_reactivation(cur: CatalogEntry | None, now: float, inactive_after: float) -> tuple[CatalogEntry | None, bool]:
    """The first read of an INACTIVE (or stale ACTIVE) image: PENDING, and
    whether the caller must start the re-pack (False if one is running)."""
    if cur is None or not cur.complete:
        return cur, False
    if cur.state == PENDING and pid_alive(cur.pending):
        return cur, False  # already being reactivated
    if cur.state == ACTIVE:
        cur = deactivate(cur, now, inactive_after)
    return _to(cur, PENDING, "reactivating", now), True


def fail(cur: CatalogEntry | None, now: float, reason: str, update_reason: bool = False,
         version: str | None = None) -> CatalogEntry | None:
    """The image cannot be served (source gone or changed, key denied, repair impossible).  An image
    already FAILED keeps its reason, unless ``update_reason`` (refresh: the problem found now).
    ``version``: the manifest the problem was found in; a name packed again since is left alone."""
    if cur is None or not cur.complete or (cur.state == FAILED and (not update_reason or cur.reason == reason)):
        return cur
    if version is not None and cur.manifest_digest != version:
        return cur
    return _to(cur, FAILED, reason, now)


def recover(cur: CatalogEntry, now: float) -> CatalogEntry:
    return _to(cur, ACTIVE, "source and key are available again", now, last_read=now)


def remove(cur: CatalogEntry | None, ref: ImageRef) -> CatalogEntry | None:
    """``rm``: the entry goes (None; its chunks at the next gc); refused while a pack of it runs."""
    if cur is None:
        raise ImageNotFound(f"no image {ref} in the store")
    if cur.pending and pid_alive(cur.pending):
        raise ImagePending(f"image {ref} is being packed (pid {cur.pending.get('pid')}); try again after")
    return None
