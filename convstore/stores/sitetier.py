"""A shared site tier between a node's own cache and the origin (Lambda's AZ cache).

Nodes of one site read chunk blobs through one HTTP cache that sits in front of
the origin and speaks the origin's own protocol, so that N nodes starting one
image fetch it from the origin about once.  The engine is an existing one
(docs/architecture.md, "Site tier", says which and why: nginx ``proxy_cache``
with the ``slice`` module and ``proxy_cache_lock`` in front of a registry; a
``docker-registry`` pull-through mirror answers a ranged GET of a blob it has
not cached with the whole blob and fetches it from the origin once per waiting
client, so it does not fit).

:class:`SiteTierChunkStore` wraps any :class:`ChunkStore` (the origin) and a
second chunk store of the same kind that reads the same containers through the
tier.  The tier is never trusted and never needed:

* only reads that carry a location hint go to the tier (a hint names the pack
  and range, so the tier needs no index); writes, ``has`` and index lookups go
  to the origin;
* a tier that fails (down, slow past its short timeout, 404, a short answer)
  is skipped for ``down_for`` seconds and the read goes to the origin;
* the tier's bytes are checked like every chunk (:mod:`convstore.core.chunks`
  decrypts and authenticates each blob against its id): a blob that does not
  check out is evicted, which here means *read it again from the origin*, at
  the same hint; after ``max_lies`` such blobs the tier is not used again by
  this process.

One rule says what may come through a tier, for either origin: objects that
are immutable and named by their content, read by that name and checked
against it (or against the chunk ids inside) before anything uses them.  That
is chunk packs read at location hints (an S3 origin's ``PREFIX/packs/<sha256>``
through :class:`~.s3.S3PackReader`, which reads nothing else) and, of the
metadata, only sealed manifests (``manifests/<sha256>``, :class:`SiteTierObjectStore`
for both origins): they are write-once objects named by the sha256 of their
bytes, so what the tier answers is checked against the name before anything
reads it (and then unsealed under the store's metadata key, like any copy);
one that does not match is counted as a lie and read from the origin.  A
sealed manifest of a large image is hundreds of kB, the biggest thing a start
reads besides chunks.  Catalog entries, domains, profiles, the store's
identity, an S3 origin's ``index/`` and ``locks/`` -- mutable, or bound to
freshness (rollback protection) -- always come from the origin.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

import hashlib
import hmac

from ..errors import ConvstoreError, CorruptObject, InvalidReference
from .base import (ChunkStore, ForwardingChunkStore, ForwardingObjectStore, Location, ObjectStore,
                   sealed_manifest_name)

log = logging.getLogger(__name__)

#: seconds a tier may send nothing (to any read of the process) before a read gives up on it (the origin
#: is asked next)
TIER_TIMEOUT = 5.0
#: seconds a failed tier is skipped before it is tried again
DOWN_FOR = 30.0
#: blobs that failed authentication after which this process stops using the tier
MAX_LIES = 3
_HINTS_KEPT = 1 << 16


def parse_site_cache(url: str) -> tuple[str, bool]:
    """``http[s]://HOST[:PORT]`` -> (host[:port], insecure); :class:`InvalidReference` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        raise InvalidReference(f"--site-cache {url!r}: a site cache is http[s]://HOST[:PORT] (no path, "
                               f"no credentials)")
    return parts.netloc, parts.scheme == "http"


class SiteTierChunkStore(ForwardingChunkStore):
    """``origin`` (``inner``) with hinted reads served by ``tier`` when it is up and honest."""

    def __init__(self, origin: ChunkStore, tier: ChunkStore, *, down_for: float = DOWN_FOR,
                 max_lies: int = MAX_LIES) -> None:
        super().__init__(origin)
        self.tier = tier
        self.down_for = down_for
        self.max_lies = max_lies
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._hints: OrderedDict[bytes, Location] = OrderedDict()  # cid -> hint of a recent tier read
        self._bypass: set[bytes] = set()  # chunks whose tier copy did not check out
        #: counters: chunks served by the tier, by the origin; tier failures; tier blobs that failed authentication
        self.tier_chunks = self.origin_chunks = self.tier_failures = self.tier_lies = 0
        self.tier_bytes = 0

    def __repr__(self) -> str:
        return f"SiteTierChunkStore({self.inner!r}, tier={self.tier!r})"

    def _usable(self) -> bool:
        return self.tier_lies < self.max_lies and time.monotonic() >= self._down_until

    def lied(self, what: str) -> None:
        """The tier served ``what`` and it did not check out."""
        with self._lock:
            self.tier_lies += 1
            lies = self.tier_lies
        log.warning("site tier %r served %s that does not check out: read from the origin%s", self.tier, what,
                    "; the tier is not used again" if lies >= self.max_lies else "")

    def _failed(self, e: BaseException) -> None:
        with self._lock:
            self.tier_failures += 1
            self._down_until = time.monotonic() + self.down_for
        log.warning("site tier %r failed (%s): reading from the origin for %g s", self.tier,
                    str(e)[:200] or type(e).__name__, self.down_for)

    def _remember(self, cids: list[bytes], hints: dict[bytes, Location]) -> None:
        with self._lock:
            for c in cids:
                self._hints[c] = hints[c]
                self._hints.move_to_end(c)
            while len(self._hints) > _HINTS_KEPT:
                self._hints.popitem(last=False)

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        with self._lock:
            bypass = cid in self._bypass
            if bypass:
                self._bypass.discard(cid)
                hint = hint or self._hints.pop(cid, None)
        if hint is not None and not bypass and self._usable():
            try:
                data = self.tier.get(cid, hint)
            except KeyError:
                pass  # the tier has no such pack (a stale hint): the origin's index knows better
            except (ConvstoreError, OSError) as e:
                self._failed(e)
            else:
                self._remember([cid], {cid: hint})
                with self._lock:
                    self.tier_chunks += 1
                    self.tier_bytes += len(data)
                return data
        data = self.inner.get(cid, hint)
        with self._lock:
            self.origin_chunks += 1
        return data

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None) -> dict[bytes, bytes]:
        hints = hints or {}
        out: dict[bytes, bytes] = {}
        with self._lock:
            via = [c for c in cids if c in hints and c not in self._bypass]
        if via and self._usable():
            try:
                got = self.tier.get_many(via, {c: hints[c] for c in via})
            except KeyError:
                pass  # a stale hint among them: all from the origin, the tier stays in use
            except (ConvstoreError, OSError) as e:
                self._failed(e)
            else:
                out.update(got)
                self._remember(list(got), hints)
                with self._lock:
                    self.tier_chunks += len(got)
                    self.tier_bytes += sum(len(b) for b in got.values())
        rest = [c for c in cids if c not in out]
        if rest:
            for c in rest:
                if c not in hints:
                    out[c] = self.get(c)
            hinted = [c for c in rest if c in hints]
            with self._lock:
                self._bypass.difference_update(hinted)
            got = self.inner.get_many(hinted, {c: hints[c] for c in hinted})
            out.update(got)
            with self._lock:
                self.origin_chunks += len(got)
        return out

    def evict(self, cid: bytes) -> None:
        """The copy read did not check out: if the tier served it, the next read
        of ``cid`` goes to the origin (at the same hint), and the tier is
        counted as having lied."""
        with self._lock:
            served = cid in self._hints
            if served:
                self._bypass.add(cid)
        if served:
            self.lied(f"chunk {cid.hex()}")
        self.inner.evict(cid)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"tier_chunks": self.tier_chunks, "tier_bytes": self.tier_bytes,
                    "origin_chunks": self.origin_chunks, "tier_failures": self.tier_failures,
                    "tier_lies": self.tier_lies}


class SiteTierObjectStore(ForwardingObjectStore):
    """``origin`` (``inner``) with sealed manifests (``manifests/<sha256>``) read through ``tier``
    first, checked against their names; health and lies are counted by ``chunks`` (one tier)."""

    def __init__(self, origin: ObjectStore, tier: ObjectStore, chunks: SiteTierChunkStore) -> None:
        super().__init__(origin)
        self.tier = tier
        self.chunks = chunks
        #: sealed manifests the tier served (and that matched their names)
        self.tier_objects = 0

    def __repr__(self) -> str:
        return f"SiteTierObjectStore({self.inner!r}, tier={self.tier!r})"

    def get(self, key: str) -> bytes:
        name = sealed_manifest_name(key)
        if name is not None and self.chunks._usable():
            try:
                data = self.tier.get(key)
            except KeyError:
                pass  # not there (yet): the origin says
            except CorruptObject:  # a blob that does not match its digest: a lie, not an outage
                self.chunks.lied(f"object {key}")
            except (ConvstoreError, OSError) as e:
                self.chunks._failed(e)
            else:
                if hmac.compare_digest(hashlib.sha256(data).hexdigest(), name):
                    self.tier_objects += 1
                    return data
                self.chunks.lied(f"object {key}")
        return self.inner.get(key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Sealed manifests one by one through :meth:`get`; every other key from the origin at once."""
        out = super().get_many([k for k in keys if sealed_manifest_name(k) is not None])
        out.update(self.inner.get_many([k for k in keys if sealed_manifest_name(k) is None]))
        return out


def tier_stats(store: ChunkStore) -> dict[str, int] | None:
    """The counters of the site tier ``store`` reads through (wrappers followed by ``inner``), or None."""
    seen = 0
    while store is not None and seen < 16:
        if isinstance(store, SiteTierChunkStore):
            return store.stats()
        store = getattr(store, "inner", None)  # type: ignore[assignment]
        seen += 1
    return None


def open_site_tier(origin_url: str, site_cache: str, origin: ChunkStore, objects: ObjectStore, *,
                   username: str | None = None, password: str | None = None,
                   timeout: float = TIER_TIMEOUT) -> tuple[ObjectStore, SiteTierChunkStore]:
    """``objects`` and ``origin`` (the metadata and chunk stores of ``origin_url``) read through the
    site cache at ``site_cache``: chunk packs at their location hints and sealed manifests (named by
    their sha256), for a registry store as blobs, for an S3 store as ``PREFIX/packs/<sha256>`` and
    ``PREFIX/meta/manifests/<sha256>``, the S3 request signed as for the origin (the tier passes it on
    unchanged)."""
    host, insecure = parse_site_cache(site_cache)
    if origin_url.startswith("oci://"):
        from ..oci.registry_client import RegistryClient
        from .registry import RegistryChunkStore, RegistryStore, parse_store_url

        _origin_host, repo = parse_store_url(origin_url)
        # a tier read fails once nothing arrived for ``timeout`` s (the registry store's read deadline rule:
        # a tier that is busy but answering is waited for), not at ``timeout`` s of one answer's silence
        client = RegistryClient(host, insecure, username, password, deadline=timeout)
        chunks = SiteTierChunkStore(origin, RegistryChunkStore(f"oci://{host}/{repo}", client, repo, None))
        return SiteTierObjectStore(objects, RegistryStore(f"oci://{host}/{repo}", client, repo), chunks), chunks
    if origin_url.startswith("s3://"):
        from .s3 import S3Client, S3PackReader, S3Store

        s3client = S3Client(origin_url, ("http://" if insecure else "https://") + host, timeout, attempts=1)
        # packs and sealed manifests; every other metadata object (and index/, locks/) from the origin
        s3chunks = SiteTierChunkStore(origin, S3PackReader(s3client))
        return SiteTierObjectStore(objects, S3Store(s3client), s3chunks), s3chunks
    raise InvalidReference(f"--site-cache: {origin_url!r} is not a store a site cache can front "
                           f"(registry stores, oci://HOST/REPO; S3 stores, s3://BUCKET/PREFIX)")
