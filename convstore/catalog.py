"""Catalog entries and the image lifecycle.

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
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import CorruptObject, StoreFormatError
from .refs import ImageRef

REF_VERSION = 2  # 2: MAC-authenticated (convstore.authmeta), with seq
PENDING, ACTIVE, INACTIVE, FAILED = "pending", "active", "inactive", "failed"
STATES = (PENDING, ACTIVE, INACTIVE, FAILED)
HISTORY = 20


def iso(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


def pid_alive(pending: dict[str, Any] | None) -> bool:
    """Whether the process that set ``pending`` still runs (same host only)."""
    if not pending:
        return False
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
    #: grows with every write of this entry (rollback protection, convstore.trust)
    seq: int = 0

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
                "history": list(self.history), "seq": self.seq}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CatalogEntry:
        if d.get("format") != "convstore-ref":
            raise CorruptObject("catalog entry is malformed")
        if d.get("version") != REF_VERSION:
            raise StoreFormatError(f"catalog entry version {d.get('version')} is not supported")
        try:
            if d["state"] not in STATES:
                raise ValueError(d["state"])
            return cls(ImageRef(d["name"], d["tag"]), d["state"], float(d["state_since"]), d.get("reason", ""),
                       d.get("manifest"), d.get("key_id"),
                       base64.b64decode(d["wrapped_key"]) if d.get("wrapped_key") else None,
                       d.get("created", ""), d.get("source", ""), int(d.get("logical_bytes", 0)),
                       int(d.get("layers", 0)), float(d.get("last_read", 0)), d.get("pending"),
                       tuple(d.get("history") or ()), int(d.get("seq", 0)))
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
                "pending": self.pending,
                "history": [{"at": iso(h["at"]), "state": h["state"], "reason": h["reason"]} for h in self.history]}
