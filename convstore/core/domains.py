"""Convergence domains: the scope inside which equal content dedups.

A domain record (``domains/<name>``, MAC-authenticated and bound to its
name) holds the current epoch's secret wrapped by the master key under
``{"purpose": "domain", "store", "domain", "epoch"}``.  Chunk ids and keys,
and layer-index names, are derived from the secret (:mod:`convstore.crypto`).

A domain's identity is global: its random ``id`` (made once, at creation)
names the same secret in every store that holds it.  A copy between stores
brings the source's domain into a destination that lacks it (:meth:`Domains.adopt`:
the secret unwrapped by the source's key, wrapped by the destination's, the
record authenticated by the destination's metadata key), so images packed
anywhere in one domain share chunks; a destination with *another* domain of
that name keeps its own (:class:`~convstore.errors.DomainConflict`, which a
copy reports and goes on without the domain).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ..crypto import domain_chunk_key, domain_layer_key
from ..errors import DomainConflict, InvalidReference, StoreError, StoreFormatError, TamperedObject
from ..keys import KeyProvider
from .identity import StoreIdentity, check_key_id, now_iso
from ..stores.base import ObjectStore
from .trust import TrustState

log = logging.getLogger(__name__)

DOMAIN_VERSION = 2  # 2: MAC-authenticated
DEFAULT_DOMAIN = "default"


@dataclass(frozen=True)
class Domain:
    """An unlocked convergence domain.  The keys are secret: never logged."""

    public: dict[str, Any]
    chunk_key: bytes = field(repr=False)
    layer_key: bytes = field(repr=False)


def describe(public: dict[str, Any]) -> str:
    """``name (epoch N, id XXXXXXXXXXXXXXXX)``: how a domain is shown everywhere (the name alone is
    not an identity: two stores may each have made a ``default`` of their own)."""
    return f"{public.get('name')} (epoch {public.get('epoch')}, id {str(public.get('id') or '?')[:16]})"


def check_domain_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise InvalidReference(f"invalid domain name {name!r}")


class Domains:
    def __init__(self, objects: ObjectStore, key: KeyProvider, ident: StoreIdentity, trust: TrustState):
        self.objects, self.key, self.ident, self.trust = objects, key, ident, trust
        self._open: dict[str, Domain] = {}

    def context(self, rec: dict[str, Any]) -> dict[str, str]:
        return {"purpose": "domain", "store": self.ident.id, "domain": rec["name"], "epoch": str(rec["epoch"])}

    def get(self, name: str = DEFAULT_DOMAIN) -> Domain:
        """The domain ``name``, unlocked (the default one is created on first use)."""
        if name in self._open:
            return self._open[name]
        secret = None
        try:
            rec = self.record(name)
        except KeyError:
            if name != DEFAULT_DOMAIN:
                raise StoreError(f"no convergence domain {name!r}; create it with: convstore domain create "
                                 f"{name}") from None
            rec, secret = self._create(name, exist_ok=True)
        except TamperedObject:
            if not self._may_replace(name):
                raise
            rec, secret = self._create(name, replace=True)
        check_key_id(self.key, rec["key_id"], f"domain {name!r}")
        if secret is None:
            secret = self.key.unwrap(base64.b64decode(rec["wrapped_secret"]), self.context(rec))
        d = Domain({k: rec[k] for k in ("name", "epoch", "id")}, domain_chunk_key(secret), domain_layer_key(secret))
        self._open[name] = d
        return d

    def record(self, name: str) -> dict[str, Any]:
        """The authenticated record of domain ``name`` (KeyError if absent)."""
        check_domain_name(name)
        data = self.objects.get(f"domains/{name}")
        rec = self.ident.open_signed("domain", f"domain {name}", data, f"domain record {name!r}")
        if rec.get("format") != "convstore-domain" or rec.get("version") != DOMAIN_VERSION:
            raise StoreFormatError(f"domain record {name} has an unsupported format or version")
        if rec.get("name") != name or not isinstance(rec.get("epoch"), int):
            raise TamperedObject(f"domain record {name!r} names another domain")
        self.trust.check_domain(name, rec["epoch"])
        return rec

    def write(self, rec: dict[str, Any], *, exclusive: bool = False) -> bool:
        name = rec["name"]
        ok = self.objects.put(f"domains/{name}", self.ident.meta().sign("domain", f"domain {name}", rec),
                              exclusive=exclusive)
        if ok:
            self.trust.check_domain(name, rec["epoch"])
        return ok

    def create(self, name: str) -> dict[str, Any]:
        """A new domain with a fresh secret (epoch 1)."""
        return self._create(name)[0]

    def _may_replace(self, name: str) -> bool:
        """Whether an unauthentic record of ``name`` may be replaced by this
        process's own: only the default domain of a store this process has
        just created without an atomic create (a registry).  There it is a
        concurrent creator's, which lost (it refuses to publish), or a forgery."""
        return self.ident.created and name == DEFAULT_DOMAIN and not self.objects.supports_locking

    def _create(self, name: str, exist_ok: bool = False, replace: bool = False) -> tuple[dict[str, Any], bytes | None]:
        check_domain_name(name)
        now = now_iso()
        rec: dict[str, Any] = {"format": "convstore-domain", "version": DOMAIN_VERSION, "name": name, "epoch": 1,
                               "id": uuid.uuid4().hex, "key_id": self.key.key_id, "created": now,
                               "epochs": [{"epoch": 1, "created": now}]}
        secret, wrapped = self.key.generate(self.context(rec))
        rec["wrapped_secret"] = base64.b64encode(wrapped).decode()
        if not self.write(rec, exclusive=not replace):
            if exist_ok:
                try:
                    return self.record(name), None
                except TamperedObject:
                    if not self._may_replace(name):
                        raise
                    self.write(rec)
                    return rec, secret
            raise StoreError(f"convergence domain {name!r} already exists")
        return rec, secret

    def adopt(self, source: Domains, name: str, domain_id: str, min_epoch: int = 0) -> bool:
        """Bring the domain ``name`` of ``source`` (another store) here, if it is the domain
        ``domain_id`` and this store lacks it or holds an older epoch of it: the same id, epochs and
        current secret; the secret unwrapped by the source's key (its wrap context binds the source
        store) and wrapped by this store's key (binding this store), the record authenticated under
        this store's metadata key.  The secret never leaves the two key providers' calls.  Whether
        it wrote a record.  :class:`DomainConflict` if this store has another domain of that name.
        ``min_epoch``: the epoch the copied image was packed in (its authenticated manifest says so):
        a source record older than that is an authentic record replayed by a store writer (a rotated-out
        secret), never adopted."""
        try:
            theirs = source.record(name)
        except KeyError:
            return False  # the source no longer has it: the copied image still reads (its manifest holds its keys)
        if theirs.get("id") != domain_id:
            return False  # the image was packed in another domain of that name (one the source replaced)
        if theirs["epoch"] < min_epoch:
            log.warning("not adopting domain %s: the source's record is of epoch %s, older than the copied "
                        "image's %s (an older record replayed?)", describe(theirs), theirs["epoch"], min_epoch)
            return False
        with self._lock(name) if self.objects.supports_locking else contextlib.nullcontext():
            try:
                mine: dict[str, Any] | None = self.record(name)
            except KeyError:
                mine = None
            if mine is not None:
                self._check_same(mine, theirs)
                if mine["epoch"] >= theirs["epoch"]:
                    return False
            check_key_id(source.key, theirs["key_id"], f"domain {name!r}")
            secret = source.key.unwrap(base64.b64decode(theirs["wrapped_secret"]), source.context(theirs))
            rec: dict[str, Any] = {k: theirs[k] for k in ("format", "version", "name", "epoch", "id", "created",
                                                          "epochs") if k in theirs}
            rec["key_id"] = self.key.key_id
            rec["wrapped_secret"] = base64.b64encode(self.key.wrap(secret, self.context(rec))).decode()
            if not self.write(rec, exclusive=mine is None):
                # created meanwhile by someone else (a store without locks): only the same domain is accepted
                self._check_same(self.record(name), theirs)
                return False
        self._open.pop(name, None)
        return True

    @staticmethod
    def _check_same(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
        if mine.get("id") != theirs.get("id"):
            raise DomainConflict(
                f"this store already has another convergence domain named {mine['name']!r} ({describe(mine)}; "
                f"the copied image is in {describe(theirs)}): they do not share a secret, so they never share "
                f"a chunk: the image is copied without its domain and will not dedup with what is packed there")

    def rotate(self, name: str) -> dict[str, Any]:
        """Start a new epoch: a new secret, so new chunks no longer dedup with
        older ones; older images stay readable (their manifests hold their keys)."""
        with self._lock(name):
            try:
                rec = self.record(name)
            except KeyError:
                raise StoreError(f"no convergence domain {name!r}") from None
            check_key_id(self.key, rec["key_id"], f"domain {name!r}")
            now = now_iso()
            rec = dict(rec, epoch=rec["epoch"] + 1, key_id=self.key.key_id)
            rec["epochs"] = [*(rec.get("epochs") or []), {"epoch": rec["epoch"], "created": now}]
            _secret, wrapped = self.key.generate(self.context(rec))
            rec["wrapped_secret"] = base64.b64encode(wrapped).decode()
            self.write(rec)
        self._open.pop(name, None)
        return rec

    def _lock(self, name: str) -> AbstractContextManager[None]:
        """The lock of one domain record (rotate and rekey replace it under this)."""
        return self.objects.lock(f"domain-{name}")

    def names(self) -> list[str]:
        return [k.split("/", 1)[1] for k in sorted(self.objects.list("domains"))]

    def rewrap(self, old: KeyProvider, new: KeyProvider) -> tuple[int, int]:
        """Re-wrap every domain secret under ``new``, each record under its lock: (re-wrapped, skipped)."""
        done = skipped = 0
        for name in self.names():
            with self._lock(name):
                rec = self.record(name)
                if rec["key_id"] == new.key_id:
                    skipped += 1
                    continue
                ctx = self.context(rec)
                secret = old.unwrap(base64.b64decode(rec["wrapped_secret"]), ctx)
                rec = dict(rec, key_id=new.key_id, wrapped_secret=base64.b64encode(new.wrap(secret, ctx)).decode())
                self.write(rec)
                done += 1
        return done, skipped

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name in self.names():
            rec = self.record(name)
            out.append({k2: rec.get(k2) for k2 in ("name", "epoch", "id", "key_id", "created", "epochs")})
        return out
