"""Rollback protection: what this client has already seen of each store.

A store writer without the master key cannot forge or edit metadata
(:mod:`convstore.authmeta`), but it can put back an *older* authentic version
of an object: a catalog entry that served the previous image, or a domain
record from before an epoch rotation.  Like TUF's snapshot and timestamp
roles, the client remembers the newest version it has seen and refuses to go
back:

* each catalog entry carries ``seq``, a number that grows with every write of
  that entry (and across ``rm`` and re-creation, as it starts from the
  writer's clock in milliseconds);
* each domain record carries its ``epoch``.

The state lives outside the store, in the user's state folder
(``$CONVSTORE_STATE_DIR``, else ``<user state dir>/convstore``), one file per
store id: ``trust/<store id>.json``, mode 0600 in a 0700 folder, replaced
atomically under a lock.  Format::

    {"format": "convstore-trust", "version": 1, "store": "<id>",
     "refs": {"name:tag": {"seq": N, "manifest": "sha256:..."}},
     "domains": {"name": EPOCH}}

An explicit override (``allow_rollback``, CLI ``--allow-rollback``) accepts
the older version and records it as the newest seen.  A client without the
file (a new machine, a wiped state folder) trusts the first version it sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import platformdirs

from .errors import RollbackDetected, StoreError

TRUST_FORMAT = "convstore-trust"
TRUST_VERSION = 1


def default_state_dir() -> str:
    return os.environ.get("CONVSTORE_STATE_DIR") or platformdirs.user_state_dir("convstore")


class TrustState:
    """The newest versions one client has seen of one store's objects."""

    def __init__(self, state_dir: str, store_id: str, *, allow_rollback: bool = False) -> None:
        self.dir = os.path.join(state_dir, "trust")
        self.path = os.path.join(self.dir, f"{store_id}.json")
        self.store_id = store_id
        self.allow_rollback = allow_rollback
        self._seen: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {"refs": {}, "domains": {}}
        except (OSError, ValueError) as e:
            raise StoreError(f"trust state {self.path} is unreadable ({e}); remove it to start afresh") from None
        if doc.get("format") != TRUST_FORMAT or doc.get("version") != TRUST_VERSION or doc.get("store") != \
                self.store_id:
            raise StoreError(f"trust state {self.path} has another format; remove it to start afresh")
        return {"refs": dict(doc.get("refs") or {}), "domains": dict(doc.get("domains") or {})}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The on-disk state, re-read under the file lock; written back on exit."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            doc = self._load()
            yield doc
            tmp = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}"
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(wfd, "w") as f:
                json.dump({"format": TRUST_FORMAT, "version": TRUST_VERSION, "store": self.store_id, **doc}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._seen = doc
        finally:
            os.close(fd)

    def _current(self) -> dict[str, Any]:
        if self._seen is None:
            self._seen = self._load()
        return self._seen

    def check_entry(self, ref: str, seq: int, manifest: str | None) -> None:
        """Refuse an entry older than the newest seen for ``ref``; remember a newer one."""
        with self._lock:
            seen = self._current()["refs"].get(ref)
            if seen is not None and seen.get("seq") == seq:
                return
            with self._locked() as doc:
                seen = doc["refs"].get(ref)
                if seen is not None and seq < int(seen.get("seq", 0)) and not self.allow_rollback:
                    raise RollbackDetected(
                        f"image {ref} was rolled back: the store serves version {seq}, older than version "
                        f"{seen['seq']} already seen here (manifest {seen.get('manifest')}); refusing it "
                        f"(override: --allow-rollback)")
                if seen is None or seq != int(seen.get("seq", 0)):
                    doc["refs"][ref] = {"seq": seq, "manifest": manifest}

    def check_domain(self, name: str, epoch: int) -> None:
        """Refuse a domain record whose epoch is older than the newest seen."""
        with self._lock:
            if self._current()["domains"].get(name) == epoch:
                return
            with self._locked() as doc:
                seen = doc["domains"].get(name)
                if seen is not None and epoch < int(seen) and not self.allow_rollback:
                    raise RollbackDetected(
                        f"convergence domain {name!r} was rolled back to epoch {epoch}, older than epoch {seen} "
                        f"already seen here; refusing it (override: --allow-rollback)")
                doc["domains"][name] = epoch
