"""Leases: the gc lock of a store that has no locks (a registry, an object store).

A lease is a small authenticated object ``leases/<id>`` (docs/format.md):
who holds it (purpose, host, pid), whether it is *exclusive* (gc, rekey) or
*shared* (a pack or copy into the store), and when its holder last renewed
it.  A holder renews it every ``ttl / 4`` seconds from a background thread;
a lease not renewed for ``ttl`` seconds belongs to a holder that died and is
ignored (gc deletes it).

Taking one without a compare-and-swap (restic's locks work the same way):
the taker *first writes* its lease, *then lists* the others.  Of two takers
that exclude each other, whichever lists second sees the first one's lease
(each wrote before it listed), so they can never both go on; when both see
each other both back off (delete their own) and a pack retries after a
pause, bounded by its ``wait``.  What this needs of the store: a write that
completes is seen by every later listing (a registry's tags are).

A lease that fails authentication was not written by a holder of the
store's key: it is ignored (and gc deletes it), so a forged lease can
neither keep gc out nor let a real one in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConvstoreError, CorruptObject, LeaseUnreadable, StoreBusy, StoreError, StoreIdentityLost
from ..stores.base import ObjectStore
from .identity import StoreIdentity

log = logging.getLogger(__name__)

LEASE_VERSION = 1
#: a lease not renewed for this long is a dead holder's (restic: 30 min); clocks of the
#: machines sharing a store must agree to well within it
LEASE_TTL = 1800.0
PACK_WAIT = 600.0  # how long a pack waits for a running gc before it gives up (StoreBusy)
POLL = 1.0  # seconds between two looks at the leases while waiting


@dataclass(frozen=True)
class Lease:
    id: str
    purpose: str
    exclusive: bool
    host: str
    pid: int
    created: float
    renewed: float
    ttl: float

    def live(self, now: float) -> bool:
        return now - self.renewed < self.ttl

    def describe(self, now: float) -> str:
        return (f"{'an exclusive' if self.exclusive else 'a'} {self.purpose} lease of pid {self.pid} on "
                f"{self.host}, renewed {max(0.0, now - self.renewed):.0f} s ago")


class Leases:
    """The leases of one store (see the module docstring)."""

    def __init__(self, objects: ObjectStore, ident: StoreIdentity, clock: Callable[[], float] = time.time,
                 ttl: float = LEASE_TTL):
        self.objects, self.ident, self.clock, self.ttl = objects, ident, clock, ttl
        self._offset = 0.0  # the store's clock minus ``clock`` (see :meth:`sync`)
        self._held: dict[str, tuple[str, float]] = {}
        self._lost: set[str] = set()  # leases held here that went unrenewed for more than ttl/2 once  # lease id -> (purpose, monotonic time of its last write)

    def now(self) -> float:
        """Lease time: ``clock`` moved onto the store's own clock where it has one (a registry's
        ``Date``), so that writers whose clocks disagree still agree on a lease's age."""
        return self.clock() + self._offset

    def sync(self) -> None:
        """Measure this client's offset from the store's clock (one request); kept as it was if the
        store has no clock (then local clocks must agree, see docs/lifecycle.md).  A store that cannot
        be asked fails here, as the lease write would."""
        t0 = self.clock()
        server = self.objects.server_time()
        local = (t0 + self.clock()) / 2
        if server is not None:
            self._offset = server - local
            if abs(self._offset) > self.ttl / 8:
                log.warning("leases: this machine's clock is %.0f s off the store's; leases use the store's",
                            self._offset)

    @staticmethod
    def _key(lease_id: str) -> str:
        return f"leases/{lease_id}"

    def _write(self, lease: Lease) -> None:
        doc = {"format": "convstore-lease", "version": LEASE_VERSION, "id": lease.id, "purpose": lease.purpose,
               "exclusive": lease.exclusive, "host": lease.host, "pid": lease.pid, "created": lease.created,
               "renewed": lease.renewed, "ttl": lease.ttl}
        self.objects.put(self._key(lease.id), self.ident.meta().sign("lease", f"lease {lease.id}", doc))

    def _read(self, key: str) -> Lease | None:
        """The authenticated lease at ``key``; None if it is gone or fails authentication (logged: a
        forgery, ignored).  A lease that cannot be *read* (the store fails, times out) is not a forged
        one: :class:`LeaseUnreadable`, so that no one goes on as if it were not there."""
        lease_id = key.rsplit("/", 1)[-1]
        try:
            data = self.objects.get(key)
        except KeyError:
            return None  # released meanwhile
        except CorruptObject as e:  # its content: not what a holder of the key wrote
            log.warning("ignoring lease %s: %s", lease_id, e)
            return None
        except ConvstoreError as e:
            raise LeaseUnreadable(f"lease {lease_id}, which cannot be read ({e}) and may be a live holder's") \
                from None
        try:
            # (open_signed: in a store this process just created, a lease that fails authentication may be
            # the winner's of a creation race: StoreIdentityLost, said at once, not a forgery ignored)
            doc = self.ident.open_signed("lease", f"lease {lease_id}", data, f"lease {lease_id}")
            if doc.get("format") != "convstore-lease" or doc.get("version") != LEASE_VERSION \
                    or doc.get("id") != lease_id:
                raise StoreError(f"lease {lease_id} has an unsupported format or names another lease")
            return Lease(lease_id, str(doc["purpose"]), bool(doc["exclusive"]), str(doc["host"]), int(doc["pid"]),
                         float(doc["created"]), float(doc["renewed"]), float(doc["ttl"]))
        except StoreIdentityLost:
            raise
        except (ConvstoreError, KeyError, TypeError, ValueError) as e:
            log.warning("ignoring lease %s: %s", lease_id, e)
            return None

    def all(self) -> tuple[list[Lease], list[str]]:
        """(the authentic leases, the keys of the others).  :class:`LeaseUnreadable` if one cannot be read."""
        good, bad = [], []
        for key in self.objects.list("leases"):
            lease = self._read(key)
            if lease is None:
                if self.objects.has(key):
                    bad.append(key)
            else:
                good.append(lease)
        return good, bad

    def clean(self) -> int:
        """Delete the leases of dead holders and the unauthentic ones (gc, under its own lease); how many.
        One that cannot be read now is left alone (it may be live)."""
        now = self.now()
        doomed = []
        for key in self.objects.list("leases"):
            try:
                lease = self._read(key)
            except LeaseUnreadable as e:
                log.warning("leaving %s alone: %s", key, e)
                continue
            if (lease is None and self.objects.has(key)) or (lease is not None and not lease.live(now)):
                doomed.append(key)
        self.objects.delete_many(doomed)
        return len(doomed)

    def check_held(self) -> None:
        """Before a step that relies on the leases this process holds (a pack's publish, gc's sweep):
        :class:`StoreBusy` if one was not renewed for half its ttl (the store failed every renewal), as
        others may soon take it for a dead holder's and go on."""
        now = time.monotonic()
        for lease_id, (purpose, ok) in list(self._held.items()):
            if now - ok > self.ttl / 2 or lease_id in self._lost:
                raise StoreBusy(f"the {purpose} lost its lease {lease_id}: it went unrenewed for more than "
                                f"{self.ttl / 2:.0f} s (a lease not renewed for {self.ttl:.0f} s is taken for a "
                                f"dead holder's); nothing was published: run it again")

    @contextlib.contextmanager
    def hold(self, purpose: str, *, exclusive: bool, wait: float = 0.0) -> Iterator[Lease]:
        """Hold a lease for the block: shared ones exclude only exclusive ones.  Waits up to ``wait``
        seconds for the leases that exclude it to go; then :class:`StoreBusy`, naming them."""
        import socket  # here: the module's enums cost every command ~2 ms of imports (docs/benchmarks.md)

        self.sync()
        now = self.now()
        lease = Lease(secrets.token_hex(16), purpose, exclusive, socket.gethostname(), os.getpid(), now, now,
                      self.ttl)
        deadline = time.monotonic() + wait
        while True:
            lease = Lease(lease.id, purpose, exclusive, lease.host, lease.pid, lease.created, self.now(), self.ttl)
            written = time.monotonic()
            self._write(lease)  # first write, then list: see the module docstring
            now = self.now()
            try:
                others = [l.describe(now) for l in self.all()[0]
                          if l.id != lease.id and l.live(now) and (exclusive or l.exclusive)]
            except LeaseUnreadable as e:  # unknown: as if an exclusive holder's (never treated as absent)
                others = [str(e)]
            except BaseException:  # the listing failed: never leave this lease behind to keep others out
                with contextlib.suppress(ConvstoreError):
                    self.objects.delete(self._key(lease.id))
                raise
            if not others:
                break
            self.objects.delete(self._key(lease.id))
            if time.monotonic() >= deadline:
                what = "; ".join(others)
                raise StoreBusy(f"{purpose} cannot run now: the store holds {what} (nothing was changed; a "
                                f"lease not renewed for {self.ttl:.0f} s is ignored)")
            time.sleep(POLL)  # a bounded poll: the other holder releases, or its lease expires
        stop = threading.Event()
        self._held[lease.id] = (purpose, written)

        def renew() -> None:
            cur = lease
            while not stop.wait(self.ttl / 4):
                cur = Lease(cur.id, purpose, exclusive, cur.host, cur.pid, cur.created, self.now(), self.ttl)
                t = time.monotonic()
                try:
                    self._write(cur)
                except ConvstoreError as e:  # the next renewal tries again; check_held refuses past ttl/2
                    log.warning("could not renew the %s lease %s: %s", purpose, cur.id, e)
                else:
                    if t - self._held.get(cur.id, (purpose, t))[1] > self.ttl / 2:
                        self._lost.add(cur.id)  # it lapsed meanwhile: others may have gone on; lost for good
                    self._held[cur.id] = (purpose, t)

        t = threading.Thread(target=renew, name=f"convstore-lease-{purpose}", daemon=True)
        t.start()
        try:
            yield lease
        finally:
            stop.set()
            t.join()
            self._held.pop(lease.id, None)
            self._lost.discard(lease.id)
            try:
                self.objects.delete(self._key(lease.id))
            except ConvstoreError as e:  # it expires by itself
                log.warning("could not release the %s lease %s: %s", purpose, lease.id, e)
