"""Rollback protection: what this client has already seen of each store.

A store writer without the master key cannot forge or edit metadata
(:mod:`convstore.core.authmeta`), but it can put back an *older* authentic version
of an object: a catalog entry that served the previous image, or a domain
record from before an epoch rotation.  Like TUF's snapshot and timestamp
roles, the client remembers the newest version it has seen and refuses to go
back:

* each catalog entry carries ``seq``, a number that grows with every write of
  that entry (and across ``rm`` and re-creation, as it starts from the
  writer's clock in milliseconds);
* each domain record carries its ``epoch``;
* a tag this client removed is remembered with the version it removed, so
  that version reappearing is a rollback too (a re-creation has a larger seq).

The state lives outside the store, in the user's state folder
(``$CONVSTORE_STATE_DIR``, else ``<user state dir>/convstore``), one file per
store id: ``trust/<store id>.json``, mode 0600 in a 0700 folder, replaced
atomically under a lock.  Format::

    {"format": "convstore-trust", "version": 1, "store": "<id>",
     "refs": {"name:tag": {"seq": N, "manifest": "sha256:..."}},   # or {"seq": N, "removed": true}
     "domains": {"name": EPOCH}}

The store id seen at each location (path or URL) is pinned too
(``trust/locations.json``), so a whole store swapped for another one is
refused (:func:`check_location`).

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
import stat
import threading
from collections.abc import Iterator
from typing import Any

import platformdirs

from ..errors import RollbackDetected, StoreError

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

    def _private_dir(self) -> None:
        """The state folder exists, and only its owner can change it (others could lower what was seen)."""
        os.makedirs(os.path.dirname(self.dir), mode=0o700, exist_ok=True)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for d in (os.path.dirname(self.dir), self.dir):  # the state folder and trust/ in it
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022 or st.st_uid not in (os.getuid(), 0):
                raise StoreError(f"trust state folder {d} can be changed by other users (or is not a "
                                 f"folder of yours); run chmod 700 on it")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The on-disk state, re-read under the file lock; written back on exit."""
        self._private_dir()
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
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
            if seen is not None and seen.get("seq") == seq and not seen.get("removed"):
                return
            with self._locked() as doc:
                seen = doc["refs"].get(ref)
                if seen is not None and not self.allow_rollback:
                    if seen.get("removed") and seq <= int(seen.get("seq", 0)):
                        raise RollbackDetected(
                            f"image {ref} was removed here after version {seen['seq']}, and the store serves "
                            f"version {seq} again; refusing it (override: --allow-rollback)")
                    if seq < int(seen.get("seq", 0)):
                        raise RollbackDetected(
                            f"image {ref} was rolled back: the store serves version {seq}, older than version "
                            f"{seen['seq']} already seen here (manifest {seen.get('manifest')}); refusing it "
                            f"(override: --allow-rollback)")
                if seen is None or seq != int(seen.get("seq", 0)) or seen.get("removed"):
                    doc["refs"][ref] = {"seq": seq, "manifest": manifest}

    def removed_at(self, ref: str) -> int:
        """The version at which this client removed ``ref`` (0 if it did not): a re-creation must be newer."""
        with self._lock:
            seen = self._current()["refs"].get(ref)
        return int(seen["seq"]) if seen and seen.get("removed") else 0

    def record_removed(self, ref: str, seq: int) -> None:
        """This client removed ``ref`` at version ``seq``: that version (or an older one) coming back is a rollback."""
        with self._lock, self._locked() as doc:
            doc["refs"][ref] = {"seq": seq, "manifest": None, "removed": True}

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


def check_location(state_dir: str, location: str, store_id: str, *, created: bool, allow: bool) -> None:
    """Pin the store id seen at ``location`` (a path or URL): a whole store
    swapped for another one (same master key, other id) is refused, unless
    this process created the new store itself, or ``allow`` (--allow-rollback)."""
    d = os.path.join(state_dir, "trust")
    TrustState(state_dir, "locations")._private_dir()
    path = os.path.join(d, "locations.json")
    fd = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                pins = json.load(f)
            if not isinstance(pins, dict):
                raise ValueError
        except FileNotFoundError:
            pins = {}
        except (OSError, ValueError):
            raise StoreError(f"trust state {path} is unreadable; remove it to start afresh") from None
        seen = pins.get(location)
        if seen == store_id:
            return
        if seen is not None and not created and not allow:
            raise RollbackDetected(f"the store at {location} was replaced: its id is {store_id}, but this client "
                                   f"knows it as {seen}; refusing it (override: --allow-rollback)")
        pins[location] = store_id
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(pins, f)
        os.replace(tmp, path)
    finally:
        os.close(fd)

