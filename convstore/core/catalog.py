"""Catalog entries, the catalog, and the image lifecycle states.

One JSON record per ``name:tag`` (``refs/<name>:<tag>``), replaced
atomically under a per-ref lock.  States (the product's lifecycle):

* ``pending``  -- packed for the first time, or re-packed after INACTIVE;
  not readable.  While an ACTIVE image is updated its state stays ACTIVE
  (readers keep the previous version) and ``pending`` describes the update.
* ``active``   -- every chunk and the sealed manifest are durable.
* ``inactive`` -- not read for ``inactive_after`` seconds; GC may reclaim its
  chunks; the first read is refused and starts a re-pack from the source.
* ``failed``   -- the source is gone or the key provider denies access;
  reads fail with the reason; ``refresh`` re-checks.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import (
    CorruptObject,
    ImageNotFound,
    RollbackDetected,
    StoreError,
    StoreFormatError,
    TamperedObject,
)
from ..refs import ImageRef
from .identity import StoreIdentity
from ..stores.base import ObjectStore
from .trust import TrustState

log = logging.getLogger("convstore")

REF_VERSION = 3  # 2: MAC-authenticated (convstore.core.authmeta), with seq; 3: source_manifest, source_config
READABLE_REF_VERSIONS = (2, 3)  # a version-2 entry records no source digests (a re-pack falls back to its manifest)
PENDING, ACTIVE, INACTIVE, FAILED = "pending", "active", "inactive", "failed"
STATES = (PENDING, ACTIVE, INACTIVE, FAILED)
HISTORY = 20


def iso(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


def pid_alive(pending: dict[str, Any] | None) -> bool:
    """Whether the process that set ``pending`` still runs (same host only)."""
    if not pending:
        return False
    import socket  # here: the module's enums cost every command ~2 ms of imports (docs/benchmarks.md)

    if pending.get("host") != socket.gethostname():
        return True  # cannot tell: assume it does
    try:
        os.kill(int(pending.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


@dataclass(frozen=True)
class CatalogEntry:
    """One ``name:tag``.  Holds no secret: the data key is wrapped."""

    ref: ImageRef
    state: str
    state_since: float
    reason: str = ""
    manifest_digest: str | None = None
    key_id: str | None = None
    wrapped_key: bytes | None = field(default=None, repr=False)
    created: str = ""
    source: str = ""
    logical_bytes: int = 0
    layers: int = 0
    last_read: float = 0.0
    pending: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] = ()
    #: grows with every write of this entry (rollback protection, convstore.core.trust)
    seq: int = 0
    #: the convergence domain the current version was packed in (a re-pack goes back into it)
    domain: str = ""
    #: what the current version was packed from and how (``pack.pack_identity``): a pack of the same is a no-op
    packed_from: str = ""
    #: the digests of the source manifest and config the current version was packed from: a re-pack
    #: (repair, reactivation) must find exactly these at the source (``pack.repack``); "" if unknown
    source_manifest: str = ""
    source_config: str = ""

    @property
    def complete(self) -> bool:
        """Has a finished version (a manifest) to serve."""
        return self.manifest_digest is not None

    def transition(self, state: str, reason: str, now: float, **changes: Any) -> CatalogEntry:
        hist = (*self.history, {"at": now, "state": state, "reason": reason})[-HISTORY:]
        return replace(self, state=state, state_since=now if state != self.state else self.state_since,
                       reason=reason, history=hist, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"format": "convstore-ref", "version": REF_VERSION, "name": self.ref.name, "tag": self.ref.tag,
                "state": self.state, "state_since": self.state_since, "reason": self.reason,
                "manifest": self.manifest_digest, "key_id": self.key_id,
                "wrapped_key": base64.b64encode(self.wrapped_key).decode() if self.wrapped_key else None,
                "created": self.created, "source": self.source, "logical_bytes": self.logical_bytes,
                "layers": self.layers, "last_read": self.last_read, "pending": self.pending,
                "history": list(self.history), "seq": self.seq, "domain": self.domain,
                "packed_from": self.packed_from, "source_manifest": self.source_manifest,
                "source_config": self.source_config}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CatalogEntry:
        if d.get("format") != "convstore-ref":
            raise CorruptObject("catalog entry is malformed")
        if d.get("version") not in READABLE_REF_VERSIONS:
            raise StoreFormatError(f"catalog entry version {d.get('version')} is not supported")
        try:
            if d["state"] not in STATES:
                raise ValueError(d["state"])
            return cls(ImageRef(d["name"], d["tag"]), d["state"], float(d["state_since"]), d.get("reason", ""),
                       d.get("manifest"), d.get("key_id"),
                       base64.b64decode(d["wrapped_key"]) if d.get("wrapped_key") else None,
                       d.get("created", ""), d.get("source", ""), int(d.get("logical_bytes", 0)),
                       int(d.get("layers", 0)), float(d.get("last_read", 0)), d.get("pending"),
                       tuple(d.get("history") or ()), int(d.get("seq", 0)), str(d.get("domain", "")),
                       str(d.get("packed_from", "")), str(d.get("source_manifest") or ""),
                       str(d.get("source_config") or ""))
        except (KeyError, ValueError, TypeError):
            raise CorruptObject("catalog entry is malformed") from None

    def display_state(self) -> str:
        s = self.state.upper()
        if self.pending and self.state != PENDING:
            s += " (update pending)" if pid_alive(self.pending) else " (update interrupted)"
        elif self.state == PENDING and not pid_alive(self.pending):
            s += " (interrupted)"
        return s

    def public(self) -> dict[str, Any]:
        """What ``images``/``inspect`` show: no wrapped key bytes."""
        return {"name": self.ref.name, "tag": self.ref.tag, "state": self.state,
                "state_since": iso(self.state_since), "reason": self.reason, "manifest": self.manifest_digest,
                "key_id": self.key_id, "created": self.created, "source": self.source,
                "logical_bytes": self.logical_bytes, "layers": self.layers, "last_read": iso(self.last_read),
                "domain": self.domain,
                "pending": self.pending,
                "history": [{"at": iso(h["at"]), "state": h["state"], "reason": h["reason"]} for h in self.history]}


class Catalog:
    """The catalog of one store: ``refs/<name>:<tag>`` entries, each
    MAC-authenticated and bound to its name and tag (:mod:`convstore.core.authmeta`),
    checked against this client's trust state (:mod:`convstore.core.trust`), and
    replaced atomically under a per-ref lock."""

    def __init__(self, objects: ObjectStore, ident: StoreIdentity, trust: TrustState):
        self.objects, self.ident, self.trust = objects, ident, trust

    def _ref_lock(self, r: ImageRef) -> AbstractContextManager[None]:
        """The entry's lock; a registry has none (there an update is last-writer-wins, one tag PUT)."""
        if not self.objects.supports_locking:
            return contextlib.nullcontext()
        return self.objects.lock("ref-" + hashlib.sha256(r.key.encode()).hexdigest()[:32])

    def read(self, r: ImageRef) -> CatalogEntry | None:
        """The authenticated entry of ``r``, bound to that name and tag, and
        no older than the newest this client has seen; None if absent."""
        try:
            data = self.objects.get(r.key)
        except KeyError:
            return None
        return self._open(r, data)

    def _open(self, r: ImageRef, data: bytes) -> CatalogEntry:
        e = CatalogEntry.from_json(self.ident.open_signed("entry", f"ref {r}", data, f"catalog entry {r}"))
        if e.ref != r:
            raise TamperedObject(f"catalog entry {r} names another image ({e.ref})")
        self.trust.check_entry(str(r), e.seq, e.manifest_digest)
        return e

    def update(self, ref: ImageRef | str,
               change: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry | None:
        """Read-modify-write one entry under its lock; ``change`` returns the
        new entry, or None to remove it.  A registry has no locks: there an
        update is last-writer-wins (one tag PUT)."""
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        with self._ref_lock(r):
            cur = self.read(r)
            new = change(cur)
            if new is None:
                if cur is not None:
                    self.objects.delete(r.key)
                    self.trust.record_removed(str(r), cur.seq)
            elif new != cur:
                # seq grows with every write, and across rm + re-create (it starts from the clock)
                new = replace(new, seq=max((cur.seq + 1) if cur else 0, int(time.time() * 1000),
                                           self.trust.removed_at(str(r)) + 1))
                self.objects.put(r.key, self.ident.meta().sign("entry", f"ref {r}", new.to_json()))
                self.trust.check_entry(str(r), new.seq, new.manifest_digest)
            return new

    def remove_damaged(self, r: ImageRef) -> None:
        """Delete an entry that cannot be read (it fails authentication): only its owner's ``rm`` does this."""
        with self._ref_lock(r):
            self.objects.delete(r.key)

    def entry(self, ref: ImageRef | str) -> CatalogEntry:
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        e = self.read(r)
        if e is None:
            raise ImageNotFound(f"no image {r} in the store")
        return e

    def list(self, *, strict: bool = False, problems: dict[str, str] | None = None) -> list[CatalogEntry]:
        """Every entry.  One that fails authentication is skipped with a
        warning (and noted in ``problems``), or with ``strict`` raises."""
        out = []
        keys = list(self.objects.list("refs"))
        found = self.objects.get_many(keys)  # in parallel on a registry
        for k in keys:
            try:
                r = ImageRef.from_key(k)
                data = found.get(k)
                out.append(self._open(r, data) if data is not None else self.entry(r))  # alone: its own error
            except ImageNotFound:
                continue  # removed meanwhile
            except (ValueError, CorruptObject, RollbackDetected, StoreFormatError) as err:  # this entry's problem
                if strict:
                    raise StoreError(f"{err}; refusing to go on (remove it with convstore rm, or restore it)") \
                        from None
                log.warning("skipping %s: %s", k, err)
                if problems is not None:
                    problems[k.removeprefix("refs/")] = str(err)
        return sorted(out, key=lambda e: (e.ref.name, e.ref.tag))

    def complete(self, *, strict: bool = False) -> builtins.list[CatalogEntry]:
        """Every entry that names a published version (not a first pack still PENDING)."""
        return [e for e in self.list(strict=strict) if e.complete]
