"""The :class:`Store` facade: catalog, domains, manifests and chunks over an
:class:`~convstore.stores.base.ObjectStore`, with a master key provider.

Publication order (what makes a crash at any point harmless): chunks are
written, then made durable together; then the sealed manifest; then the
catalog entry, atomically.  An image is visible only through its catalog
entry, so a half-written image is never visible.  Orphaned chunks and
manifests are harmless garbage.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import os
import time
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import platformdirs
from blake3 import blake3

from .authmeta import MetadataKey
from . import lifecycle
from .catalog import ACTIVE, FAILED, INACTIVE, PENDING, CatalogEntry, iso
from .chunks import Chunks
from .crypto import domain_chunk_key, domain_layer_key, layer_index_name, seal, unseal
from .errors import (
    ConvstoreError,
    CorruptObject,
    ImageFailed,
    ImageInactive,
    ImageNotFound,
    ImagePending,
    InvalidReference,
    KeyAccessDenied,
    KeyProviderError,
    SourceNotFound,
    StoreError,
    StoreFormatError,
    TamperedObject,
)
from .keys import KeyProvider, open_key
from .keys.audit import AUDIT_LOG, AuditedKeyProvider, parse_audit
from .manifest import LayerRecord, Manifest
from .options import StoreOptions
from .refs import ImageRef
from .stores.base import ChunkStore, ObjectStore
from .stores.local import LocalChunkStore, LocalStore
from .trust import TrustState, default_state_dir

if TYPE_CHECKING:
    from .chunking import ChunkParams
    from .maintenance import GCReport, RefreshChange, VerifyReport
    from .oci.sources import ImageSource
    from .pack import PackResult
    from .progress import Progress
    from .rekey import RekeyReport
    from .rootfs import RootfsResult
    from .stores.slow import Link
    from .unpack import UnpackResult

log = logging.getLogger("convstore")

STORE_FORMAT = "convstore-store"
STORE_VERSION = 2  # 2: authenticated metadata (a metadata key wrapped in store.json)
DOMAIN_VERSION = 2  # 2: MAC-authenticated
LAYER_INDEX_VERSION = 2
DEFAULT_DOMAIN = "default"
DEFAULT_INACTIVE_AFTER = 14 * 86400.0
READ_STAMP_INTERVAL = 3600.0  # last_read is written at most this often


def default_store_path() -> str:
    """``$CONVSTORE_STORE``, else ``<user data dir>/convstore/store``."""
    return os.environ.get("CONVSTORE_STORE") or os.path.join(platformdirs.user_data_dir("convstore"), "store")


def default_cache_dir(url: str) -> str:
    """The local cache of the registry store at ``url``."""
    return os.path.join(platformdirs.user_cache_dir("convstore"), "registry",
                        hashlib.sha256(url.encode()).hexdigest()[:16])


def read_audit_log(options: StoreOptions, since: str | None = None,
                   image: str | None = None) -> list[dict[str, Any]]:
    """The audit log of the store ``options`` name; reading it needs no key.
    A local store keeps it inside; a registry store's clients each keep theirs
    beside their cache (a registry has no append)."""
    path = options.path
    if path and path.startswith("oci://"):
        log_path = os.path.join(options.cache_dir or default_cache_dir(path), AUDIT_LOG)
    else:
        log_path = os.path.join(os.path.abspath(os.path.expanduser(path or default_store_path())), AUDIT_LOG)
    try:
        with open(log_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(os.path.dirname(log_path))):
            raise StoreError(f"no store at {path or default_store_path()}") from None
        return []
    return parse_audit(data, since, image)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptObject(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CorruptObject(f"{what} is malformed")
    return doc


@dataclass(frozen=True)
class Domain:
    """An unlocked convergence domain.  The keys are secret: never logged."""

    public: dict[str, Any]
    chunk_key: bytes = field(repr=False)
    layer_key: bytes = field(repr=False)


class Store:
    """A convstore image store.  Open with :meth:`Store.open`."""

    def __init__(self, objects: ObjectStore, key: KeyProvider, *, chunk_store: ChunkStore,
                 clock: Callable[[], float] = time.time,
                 inactive_after: float = DEFAULT_INACTIVE_AFTER, key_cache_ttl: float = 300.0,
                 options: StoreOptions | None = None, state_dir: str | None = None, allow_rollback: bool = False):
        self.objects = objects
        self.chunk_store = chunk_store
        #: the simulated link of a throttled() view (measurement), else None
        self.link: Link | None = None
        self.key: KeyProvider = key if isinstance(key, AuditedKeyProvider) else \
            AuditedKeyProvider(key, self._audit, ttl=key_cache_ttl)
        self.clock = clock
        self.inactive_after = inactive_after
        #: how this store was opened: what a background worker inherits
        self.options = options or StoreOptions(path=getattr(objects, "root", None), key=self.key.spec)
        #: called with (source, ref) to start the re-pack of an INACTIVE image
        self.reactivator: Callable[[str, str], None] = self._spawn_repack
        self._meta_key: MetadataKey | None = None
        self._store_doc: dict[str, Any] = {}
        self.id = self._identity()
        #: rollback protection: the newest versions this client has seen (see convstore.trust)
        self.trust = TrustState(state_dir or options and options.state_dir or default_state_dir(), self.id,
                                allow_rollback=allow_rollback)
        self._domains: dict[str, Domain] = {}

    @property
    def chunks(self) -> Chunks:
        """The chunk seam: the one encrypt->store and fetch->decrypt->check path."""
        return Chunks(self.chunk_store, self.objects)

    @classmethod
    def open_registry(cls, url: str, key: KeyProvider, *, insecure: bool = False, username: str | None = None,
                      password: str | None = None, cache_dir: str | None = None, cache_bytes: int = 2 << 30,
                      **kw: Any) -> Store:
        """A store in an OCI registry (``oci://HOST[:PORT]/REPO``), read
        through a bounded local cache."""
        from .stores.cache import CachedChunkStore, CachedStore, DiskCache
        from .stores.registry import open_registry

        meta, chunks = open_registry(url, insecure=insecure, username=username, password=password)
        cache_dir = cache_dir or default_cache_dir(url)
        kw.setdefault("options", StoreOptions(path=url, key=key.spec, insecure=insecure, username=username,
                                              password=password, cache_dir=cache_dir, cache_bytes=cache_bytes))
        cache = DiskCache(cache_dir, cache_bytes)
        return cls(CachedStore(meta, cache), key, chunk_store=CachedChunkStore(chunks, cache), **kw)

    def throttled(self, latency_s: float, bandwidth_bps: float) -> Store:
        """The same store behind a simulated link (latency per request, shared
        bandwidth; ``.link`` of the result counts requests and bytes)."""
        from .stores.slow import Link, SlowChunkStore, SlowStore

        link = Link(latency_s, bandwidth_bps)
        other = Store.__new__(Store)
        other.__dict__.update(self.__dict__)
        other.objects = SlowStore(self.objects, link)
        other.chunk_store = SlowChunkStore(self.chunk_store, link)
        other.link = link
        return other

    @classmethod
    def open(cls, path: str | None = None, key: KeyProvider | str | None = None, *,
             kms_endpoint: str | None = None, **kw: Any) -> Store:
        """Open (creating if needed) the local store at ``path`` with ``key``
        (a provider or a ``--key`` spec; default: the user's key file)."""
        provider = key if isinstance(key, KeyProvider) else open_key(key, kms_endpoint=kms_endpoint)
        if path and path.startswith("oci://"):
            return cls.open_registry(path, provider, **kw)
        path = os.path.abspath(os.path.expanduser(path or default_store_path()))
        kp = getattr(provider, "path", None)
        if kp and os.path.commonpath([path, os.path.abspath(kp)]) == path:
            raise StoreError(f"the key file {kp} lies inside the store {path}: keep master keys apart from data")
        kw.setdefault("options", StoreOptions(path=path, key=provider.spec,
                                              kms_endpoint=kms_endpoint or getattr(provider, "endpoint", None)))
        return cls(LocalStore(path), provider, chunk_store=LocalChunkStore(path), **kw)

    @classmethod
    def open_with(cls, options: StoreOptions) -> Store:
        """Open the store ``options`` describe (what the CLI and background workers use)."""
        kw: dict[str, Any] = {"options": options, "allow_rollback": options.allow_rollback}
        if options.state_dir:
            kw["state_dir"] = options.state_dir
        if options.inactive_after is not None:
            kw["inactive_after"] = options.inactive_after
        if options.now is not None:
            fixed = options.now
            kw["clock"] = lambda: fixed
        if options.path and options.path.startswith("oci://"):
            kw.update(insecure=options.insecure, username=options.username, password=options.password,
                      cache_dir=options.cache_dir, cache_bytes=options.cache_bytes)
        s = cls.open(options.path, options.key, kms_endpoint=options.kms_endpoint, **kw)
        # what a worker inherits names the store and key actually opened (defaults and $CONVSTORE_* resolved)
        s.options = replace(options, path=options.path or getattr(s.objects, "root", None),
                            key=options.key or s.key.spec,
                            kms_endpoint=options.kms_endpoint or getattr(s.key, "endpoint", None))
        if options.latency_ms or options.bandwidth_mbps:
            s = s.throttled(options.latency_ms / 1e3, (options.bandwidth_mbps or 1e6) * 1e6)
        return s

    def __repr__(self) -> str:
        return f"<Store {self.objects!r} id={self.id}>"

    # -- audit ------------------------------------------------------------
    def _audit(self, record: dict[str, Any]) -> None:
        """Append one key-use record to the store's audit log (JSON lines)."""
        if "error" in record:
            record["error"] = record["error"][:400]
        self.objects.append_line(AUDIT_LOG, json.dumps(record, sort_keys=True))

    def audit(self, since: str | None = None, image: str | None = None) -> list[dict[str, Any]]:
        """Audit records, optionally from an ISO time on, or for one image name."""
        return read_audit_log(self.options, since, image)

    # -- identity -------------------------------------------------------
    def _identity(self) -> str:
        """The store's id, from ``store.json`` (created with a new metadata key
        on first use).  The id is authenticated indirectly: the metadata key is
        wrapped under a context naming it, so a changed id cannot unwrap it."""
        try:
            doc = _json(self.objects.get("store.json"), "store.json")
        except KeyError:
            sid = uuid.uuid4().hex
            _mk, wrapped = self.key.generate(self._metadata_context(sid))
            doc = {"format": STORE_FORMAT, "version": STORE_VERSION, "id": sid, "created": _now(),
                   "metadata_key": {"key_id": self.key.key_id, "wrapped": base64.b64encode(wrapped).decode()}}
            if not self.objects.put("store.json", json.dumps(doc).encode(), exclusive=True):
                doc = _json(self.objects.get("store.json"), "store.json")
            else:
                self._meta_key = MetadataKey(_mk)
        if doc.get("format") != STORE_FORMAT:
            raise StoreFormatError("not a convstore store (store.json has another format)")
        if doc.get("version") == 1:
            raise StoreFormatError("store format 1 predates authenticated metadata and is not supported by this "
                                   "convstore: pack its images into a new store")
        if doc.get("version") != STORE_VERSION:
            raise StoreFormatError(f"store format version {doc.get('version')} is not supported by this convstore")
        mk = doc.get("metadata_key")
        if not isinstance(mk, dict) or not isinstance(mk.get("key_id"), str) or not isinstance(mk.get("wrapped"), str) \
                or not isinstance(doc.get("id"), str):
            raise CorruptObject("store.json is malformed")
        self._store_doc = doc
        return doc["id"]

    @staticmethod
    def _metadata_context(store_id: str) -> dict[str, str]:
        return {"purpose": "metadata", "store": store_id}

    def _meta(self) -> MetadataKey:
        """The store's metadata key (unwrapped once per process, audited)."""
        if self._meta_key is None:
            self.unlock_metadata(self.key)
        assert self._meta_key is not None
        return self._meta_key

    def metadata_key_id(self) -> str:
        """The id of the master key the metadata key is wrapped under."""
        return str(self._store_doc["metadata_key"]["key_id"])

    def unlock_metadata(self, provider: KeyProvider) -> None:
        """Unwrap the metadata key with ``provider`` (a rekey may need the new key for it)."""
        mk = self._store_doc["metadata_key"]
        if not hmac.compare_digest(mk["key_id"], provider.key_id):
            raise KeyAccessDenied(f"the store's metadata key is sealed under master key {mk['key_id']}, but the "
                                  f"key given is {provider.key_id}")
        try:
            raw = base64.b64decode(mk["wrapped"], validate=True)
        except ValueError:
            raise CorruptObject("store.json is malformed") from None
        self._meta_key = MetadataKey(provider.unwrap(raw, self._metadata_context(self.id)))

    def rewrap_metadata_key(self, old: KeyProvider, new: KeyProvider) -> bool:
        """Re-wrap the metadata key under ``new`` (rekey); False if it already is."""
        with self.objects.lock("store") if self.objects.supports_locking else contextlib.nullcontext():
            doc = _json(self.objects.get("store.json"), "store.json")
            mk = doc["metadata_key"]
            if mk["key_id"] == new.key_id:
                return False
            ctx = self._metadata_context(self.id)
            raw = old.unwrap(base64.b64decode(mk["wrapped"]), ctx)
            doc["metadata_key"] = {"key_id": new.key_id, "wrapped": base64.b64encode(new.wrap(raw, ctx)).decode()}
            self.objects.put("store.json", json.dumps(doc).encode())
            self._store_doc = doc
        return True

    # -- convergence domains ---------------------------------------------
    def domain(self, name: str = DEFAULT_DOMAIN) -> Domain:
        """The convergence domain ``name`` (the default one is created on first use)."""
        if name in self._domains:
            return self._domains[name]
        secret = None
        try:
            rec = self._domain_record(name)
        except KeyError:
            if name != DEFAULT_DOMAIN:
                raise StoreError(f"no convergence domain {name!r}; create it with: convstore domain create "
                                 f"{name}") from None
            rec, secret = self._create_domain(name, exist_ok=True)
        self._check_key_id(rec["key_id"], f"domain {name!r}")
        if secret is None:
            secret = self.key.unwrap(base64.b64decode(rec["wrapped_secret"]), self._domain_context(rec))
        d = Domain({k: rec[k] for k in ("name", "epoch", "id")}, domain_chunk_key(secret), domain_layer_key(secret))
        self._domains[name] = d
        return d

    @staticmethod
    def _check_domain_name(name: str) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
            raise InvalidReference(f"invalid domain name {name!r}")

    def _domain_record(self, name: str) -> dict[str, Any]:
        """The authenticated record of domain ``name`` (KeyError if absent)."""
        self._check_domain_name(name)
        data = self.objects.get(f"domains/{name}")
        rec = self._meta().open("domain", f"domain {name}", data, f"domain record {name!r}")
        if rec.get("format") != "convstore-domain" or rec.get("version") != DOMAIN_VERSION:
            raise StoreFormatError(f"domain record {name} has an unsupported format or version")
        if rec.get("name") != name or not isinstance(rec.get("epoch"), int):
            raise TamperedObject(f"domain record {name!r} names another domain")
        self.trust.check_domain(name, rec["epoch"])
        return rec

    def _write_domain(self, rec: dict[str, Any], *, exclusive: bool = False) -> bool:
        name = rec["name"]
        ok = self.objects.put(f"domains/{name}", self._meta().sign("domain", f"domain {name}", rec),
                              exclusive=exclusive)
        if ok:
            self.trust.check_domain(name, rec["epoch"])
        return ok

    def create_domain(self, name: str) -> dict[str, Any]:
        """A new convergence domain with a fresh secret (epoch 1)."""
        return self._create_domain(name)[0]

    def _create_domain(self, name: str, exist_ok: bool = False) -> tuple[dict[str, Any], bytes | None]:
        self._check_domain_name(name)
        now = _now()
        rec: dict[str, Any] = {"format": "convstore-domain", "version": DOMAIN_VERSION, "name": name, "epoch": 1,
                               "id": uuid.uuid4().hex, "key_id": self.key.key_id, "created": now,
                               "epochs": [{"epoch": 1, "created": now}]}
        secret, wrapped = self.key.generate(self._domain_context(rec))
        rec["wrapped_secret"] = base64.b64encode(wrapped).decode()
        if not self._write_domain(rec, exclusive=True):
            if exist_ok:
                return self._domain_record(name), None
            raise StoreError(f"convergence domain {name!r} already exists")
        return rec, secret

    def rotate_domain(self, name: str) -> dict[str, Any]:
        """Start a new epoch: a new secret, so new chunks no longer dedup with
        older ones; older images stay readable (their manifests hold their keys)."""
        with self.objects.lock(f"domain-{name}"):
            try:
                rec = self._domain_record(name)
            except KeyError:
                raise StoreError(f"no convergence domain {name!r}") from None
            self._check_key_id(rec["key_id"], f"domain {name!r}")
            now = _now()
            rec = dict(rec, epoch=rec["epoch"] + 1, key_id=self.key.key_id)
            rec["epochs"] = [*(rec.get("epochs") or []), {"epoch": rec["epoch"], "created": now}]
            _secret, wrapped = self.key.generate(self._domain_context(rec))
            rec["wrapped_secret"] = base64.b64encode(wrapped).decode()
            self._write_domain(rec)
        self._domains.pop(name, None)
        return rec

    def domains(self) -> list[dict[str, Any]]:
        out = []
        for k in sorted(self.objects.list("domains")):
            rec = self._domain_record(k.split("/", 1)[1])
            out.append({k2: rec.get(k2) for k2 in ("name", "epoch", "id", "key_id", "created", "epochs")})
        return out

    def _domain_context(self, rec: dict[str, Any]) -> dict[str, str]:
        return {"purpose": "domain", "store": self.id, "domain": rec["name"], "epoch": str(rec["epoch"])}

    def _check_key_id(self, key_id: str, what: str) -> None:
        if not hmac.compare_digest(key_id, self.key.key_id):
            raise KeyAccessDenied(f"{what} is sealed under master key {key_id}, but the key given is "
                                  f"{self.key.key_id}")

    # -- manifests ------------------------------------------------------
    def _manifest_context(self, name: str, digest: str) -> dict[str, str]:
        return {"purpose": "manifest", "store": self.id, "image": name, "manifest": digest}

    def put_manifest(self, manifest: Manifest) -> tuple[str, bytes]:
        """Seal, store durably, and return (digest, wrapped data key)."""
        dek = os.urandom(32)
        sealed = seal(manifest.encode(), dek, b"convstore manifest v1\0" + self.id.encode())
        digest = "sha256:" + hashlib.sha256(sealed).hexdigest()
        self.objects.put("manifests/" + digest.split(":", 1)[1], sealed)
        return digest, self.key.wrap(dek, self._manifest_context(manifest.name, digest))

    @staticmethod
    def _sealed(entry: CatalogEntry) -> tuple[str, bytes, str]:
        """(manifest digest, wrapped data key, key id) of a complete entry."""
        if entry.manifest_digest is None or entry.key_id is None or entry.wrapped_key is None:
            raise ImagePending(f"image {entry.ref} has no complete version")
        return entry.manifest_digest, entry.wrapped_key, entry.key_id

    def load_manifest(self, entry: CatalogEntry) -> Manifest:
        """Open an entry's manifest without the read gate (maintenance)."""
        digest, wrapped, key_id = self._sealed(entry)
        return self._open_manifest(digest, entry.ref.name, wrapped, key_id, f"image {entry.ref}")

    def _open_manifest(self, digest: str, image: str, wrapped: bytes, key_id: str, what: str) -> Manifest:
        self._check_key_id(key_id, what)
        try:
            sealed = self.objects.get("manifests/" + digest.split(":", 1)[1])
        except KeyError:
            raise StoreError(f"{what}: manifest {digest} is missing from the store") from None
        got = "sha256:" + hashlib.sha256(sealed).hexdigest()
        if not hmac.compare_digest(got, digest):
            raise CorruptObject(f"{what}: manifest {digest} is corrupt")
        dek = self.key.unwrap(wrapped, self._manifest_context(image, digest))
        plain = unseal(sealed, dek, b"convstore manifest v1\0" + self.id.encode(), f"manifest of {what}")
        m = Manifest.decode(plain)
        if m.name != image:
            raise CorruptObject(f"{what}: manifest belongs to another image")
        return m

    # -- start-up profiles ------------------------------------------------
    def _profile_key(self, entry: CatalogEntry) -> bytes:
        digest, wrapped, key_id = self._sealed(entry)
        self._check_key_id(key_id, f"image {entry.ref}")
        dek = self.key.unwrap(wrapped, self._manifest_context(entry.ref.name, digest))
        return blake3(dek, derive_key_context="convstore v1 start-up profile").digest()

    def save_profile(self, entry: CatalogEntry, profile: list[tuple[int, int]]) -> None:
        """Store the chunks an image's start-up touched, sealed like its manifest."""
        digest = self._sealed(entry)[0]
        body = json.dumps({"version": 1, "manifest": digest, "chunks": profile}).encode()
        sealed = seal(body, self._profile_key(entry), b"convstore profile v1\0" + digest.encode())
        self.objects.put("profiles/" + digest.split(":", 1)[1], sealed)

    def load_profile(self, entry: CatalogEntry) -> list[tuple[int, int]] | None:
        """The recorded start-up profile, or None if there is none or it does
        not match this image (never an error)."""
        try:
            digest = self._sealed(entry)[0]
            sealed = self.objects.get("profiles/" + digest.split(":", 1)[1])
            doc = json.loads(unseal(sealed, self._profile_key(entry),
                                    b"convstore profile v1\0" + digest.encode(), "profile"))
            if doc.get("version") != 1 or doc.get("manifest") != entry.manifest_digest:
                return None
            return [(int(a), int(b)) for a, b in doc["chunks"]]
        except (KeyError, ValueError, TypeError, ConvstoreError):
            return None

    # -- layer index: reuse an already packed layer by its diff_id ---------
    def record_layers(self, domain: Domain, manifest: Manifest, digest: str, wrapped: bytes) -> None:
        """Note where each layer of a published image lives (a cache: losing
        or staling a record only costs a full re-read of that layer)."""
        for i, layer in enumerate(manifest.layers):
            rec = {"format": "convstore-layer-index", "version": LAYER_INDEX_VERSION, "manifest": digest,
                   "image": manifest.name, "layer": i, "key_id": self.key.key_id,
                   "wrapped_key": base64.b64encode(wrapped).decode()}
            self.put_layer_record("layers/" + layer_index_name(domain.layer_key, layer.diff_id), rec)

    def put_layer_record(self, key: str, rec: dict[str, Any]) -> None:
        self.objects.put(key, self._meta().sign("layer", key, rec), durable=False)

    def layer_record(self, key: str) -> dict[str, Any]:
        """An authenticated layer-index record (KeyError if absent, TamperedObject if forged)."""
        rec = self._meta().open("layer", key, self.objects.get(key), f"layer-index record {key}")
        if rec.get("format") != "convstore-layer-index" or rec.get("version") != LAYER_INDEX_VERSION:
            raise StoreFormatError(f"layer-index record {key} has an unsupported format or version")
        return rec

    def layer_records(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Every layer-index record: (key, record), or (key, None) if it fails authentication."""
        for k in list(self.objects.list("layers")):
            try:
                yield k, self.layer_record(k)
            except KeyError:
                continue
            except ConvstoreError:
                yield k, None

    def find_layer(self, domain: Domain, diff_id: str) -> tuple[Manifest, LayerRecord] | None:
        """An already stored layer with this diff_id whose chunks are all
        present, or None."""
        try:
            rec = self.layer_record("layers/" + layer_index_name(domain.layer_key, diff_id))
            m = self._open_manifest(rec["manifest"], rec["image"], base64.b64decode(rec["wrapped_key"]),
                                    rec["key_id"], "layer index")
            layer = m.layers[rec["layer"]]
        except (KeyError, IndexError, TypeError, ValueError, CorruptObject, StoreError, KeyAccessDenied):
            return None
        if (m.domain.get("id"), m.domain.get("epoch")) != (domain.public["id"], domain.public["epoch"]) \
                or not hmac.compare_digest(layer.diff_id, diff_id):
            return None
        if not all(self.chunks.has(m.chunks[i].cid) for i in set(layer.chunks)):
            return None
        return m, layer

    # -- catalog ----------------------------------------------------------
    def _read_entry(self, r: ImageRef) -> CatalogEntry | None:
        """The authenticated entry of ``r``, bound to that name and tag, and
        no older than the newest this client has seen; None if absent."""
        try:
            data = self.objects.get(r.key)
        except KeyError:
            return None
        e = CatalogEntry.from_json(self._meta().open("entry", f"ref {r}", data, f"catalog entry {r}"))
        if e.ref != r:
            raise TamperedObject(f"catalog entry {r} names another image ({e.ref})")
        self.trust.check_entry(str(r), e.seq, e.manifest_digest)
        return e

    def update_entry(self, ref: ImageRef | str,
                     change: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry | None:
        """Read-modify-write one catalog entry under its lock; ``change``
        returns the new entry, or None to remove it."""
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        # a registry has no locks: there an update is last-writer-wins (one tag PUT)
        lock = self.objects.lock("ref-" + hashlib.sha256(r.key.encode()).hexdigest()[:32]) \
            if self.objects.supports_locking else contextlib.nullcontext()
        with lock:
            cur = self._read_entry(r)
            new = change(cur)
            if new is None:
                if cur is not None:
                    self.objects.delete(r.key)
            elif new != cur:
                # seq grows with every write, and across rm + re-create (it starts from the clock)
                new = replace(new, seq=max((cur.seq + 1) if cur else 0, int(time.time() * 1000)))
                self.objects.put(r.key, self._meta().sign("entry", f"ref {r}", new.to_json()))
                self.trust.check_entry(str(r), new.seq, new.manifest_digest)
            return new

    def entry(self, ref: ImageRef | str) -> CatalogEntry:
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        e = self._read_entry(r)
        if e is None:
            raise ImageNotFound(f"no image {r} in the store")
        return e

    def images(self, *, strict: bool = False, problems: dict[str, str] | None = None) -> list[CatalogEntry]:
        """Every catalog entry.  One that fails authentication is skipped with
        a warning (and noted in ``problems``), or with ``strict`` (what gc
        uses) raises."""
        out = []
        for k in self.objects.list("refs"):
            try:
                out.append(self.entry(ImageRef.from_key(k)))
            except ImageNotFound:
                continue
            except KeyProviderError:
                raise  # the key cannot open the catalog at all: not one entry's problem
            except (ValueError, ConvstoreError) as err:
                if strict:
                    raise StoreError(f"{err}; refusing to go on (remove it with convstore rm, or restore it)") \
                        from None
                log.warning("skipping %s: %s", k, err)
                if problems is not None:
                    problems[k.removeprefix("refs/")] = str(err)
                continue
        return sorted(out, key=lambda e: (e.ref.name, e.ref.tag))

    def complete_images(self, *, strict: bool = False) -> list[CatalogEntry]:
        return [e for e in self.images(strict=strict) if e.complete]

    # -- lifecycle (the transitions themselves live in convstore.lifecycle) --
    def _change(self, ref: ImageRef, fn: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry:
        e = self.update_entry(ref, fn)
        assert e is not None
        return e

    def begin_pack(self, ref: ImageRef, source: str) -> CatalogEntry:
        """Mark ``ref`` PENDING (or note the pending update of a servable image)."""
        now = self.clock()
        return self._change(ref, lambda cur: lifecycle.begin_pack(cur, ref, now, source))

    def finish_pack(self, ref: ImageRef, manifest_digest: str, wrapped: bytes, created: str, source: str,
                    logical_bytes: int, layers: int) -> CatalogEntry:
        """Make every chunk durable, then atomically point ``ref`` at the new version: ACTIVE."""
        self.chunk_store.flush()
        self.objects.flush()
        now = self.clock()
        return self._change(ref, lambda cur: lifecycle.finish_pack(
            cur, ref, now, manifest_digest=manifest_digest, key_id=self.key.key_id, wrapped_key=wrapped,
            created=created, source=source, logical_bytes=logical_bytes, layers=layers))

    def abort_pack(self, ref: ImageRef, error: BaseException) -> None:
        """A pack failed: keep serving the previous version (a re-pack whose source is gone: FAILED)."""
        now = self.clock()
        self.update_entry(ref, lambda cur: lifecycle.abort_pack(cur, now, str(error),
                                                                isinstance(error, SourceNotFound)))

    def is_stale(self, e: CatalogEntry, now: float) -> bool:
        """Unread for ``inactive_after``.  Only stores that can record reads
        (local ones) age their images; a registry copy never goes INACTIVE."""
        return (self.objects.supports_locking and e.state == ACTIVE and e.complete
                and now - (e.last_read or e.state_since) > self.inactive_after)

    def open_image(self, ref: ImageRef | str) -> tuple[CatalogEntry, Manifest]:
        """The read gate: the manifest of a readable (ACTIVE) image.  Records
        the read; refuses PENDING and FAILED images; an image unused for
        ``inactive_after`` is INACTIVE, and its first read starts a re-pack."""
        e = self.entry(ref)
        now = self.clock()
        if not e.complete:
            raise ImagePending(f"image {e.ref} is being packed (PENDING since {iso(e.state_since)}); "
                               f"it cannot be read yet")
        if e.state == FAILED:
            raise ImageFailed(f"image {e.ref} is FAILED: {e.reason}")
        if e.state in (INACTIVE, PENDING) or self.is_stale(e, now):
            self._reactivate(e)
            raise ImageInactive(f"image {e.ref} is inactive and is being reactivated from {e.source}; "
                                f"retry when it is ACTIVE")
        if now - e.last_read > READ_STAMP_INTERVAL and self.objects.supports_locking:
            e = self.update_entry(e.ref, lambda cur: lifecycle.mark_read(cur, now)) or e
        return e, self.load_manifest(e)

    def _reactivate(self, e: CatalogEntry) -> None:
        now = self.clock()
        start = [False]

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            new, start[0] = lifecycle.start_reactivation(cur, now, self.inactive_after)
            return new

        self.update_entry(e.ref, change)
        if start[0]:
            self.reactivator(e.source, str(e.ref))

    def _spawn_repack(self, source: str, ref: str) -> None:
        """Re-pack in a detached worker process (library code; it inherits
        this store's options on a pipe, never in argv).  ``source`` comes from
        the authenticated catalog entry."""
        from .worker import spawn

        if self.options.key is None:
            raise StoreError(f"cannot reactivate {ref} automatically (the key provider cannot be reopened in "
                             f"another process): run convstore pack {source} {ref}")
        spawn({"op": "pack", "source": source, "ref": ref}, self.options)

    def manifest(self, ref: ImageRef | str) -> Manifest:
        """The manifest of a readable image (goes through the read gate)."""
        return self.open_image(ref)[1]

    def iter_manifests(self, include_inactive: bool = False) -> Iterator[tuple[CatalogEntry, Manifest]]:
        """Every complete image's manifest (no read is recorded)."""
        for e in self.complete_images():
            if e.state == INACTIVE and not include_inactive:
                continue
            yield e, self.load_manifest(e)

    def rm(self, ref: ImageRef | str) -> CatalogEntry:
        """Remove ``name:tag`` from the catalog (its chunks go at the next gc)."""
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        removed: list[CatalogEntry] = []

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            if cur is not None:
                removed.append(cur)
            return lifecycle.remove(cur, r)

        self.update_entry(r, change)
        return removed[0]

    # -- operations (implemented in their own modules) -------------------
    def pack(self, source: str | ImageSource, ref: str, *, level: int | None = None, params: ChunkParams | None = None,
             workers: int | None = None, domain: str = DEFAULT_DOMAIN, progress: Progress | None = None,
             reuse_layers: bool = True, insecure: bool = False) -> PackResult:
        """Pack ``source`` (``oci:DIR[:TAG]``, ``docker-archive:FILE``, ``docker://...``) as ``ref``."""
        from .pack import DEFAULT_LEVEL, pack

        return pack(self, source, ref, level=DEFAULT_LEVEL if level is None else level, params=params,
                    workers=workers, domain=domain, progress=progress, reuse_layers=reuse_layers, insecure=insecure)

    def unpack_oci(self, ref: str, dest: str, *, compress: str | None = None, workers: int | None = None,
                   progress: Progress | None = None) -> UnpackResult:
        from .unpack import unpack_oci

        return unpack_oci(self, ref, dest, compress=compress, workers=workers, progress=progress)

    def unpack_rootfs(self, ref: str, dest: str, *, progress: Progress | None = None) -> RootfsResult:
        from .rootfs import unpack_rootfs

        return unpack_rootfs(self, ref, dest, progress=progress)

    def gc(self, dry_run: bool = False) -> GCReport:
        from .maintenance import gc

        return gc(self, dry_run)

    def verify(self, ref: str | None = None, repair: bool = False, repair_from: Store | None = None) -> VerifyReport:
        """Check chunks and catalog; ``repair`` from ``repair_from`` (another store) or the images' sources."""
        from .maintenance import verify

        return verify(self, ref, repair, repair_from=repair_from)

    def refresh(self, ref: str | None = None) -> list[RefreshChange]:
        from .maintenance import refresh

        return refresh(self, ref)

    def rekey(self, new: KeyProvider | str, kms_endpoint: str | None = None) -> RekeyReport:
        """Re-wrap every data key and domain secret under ``new``."""
        from .rekey import rekey

        return rekey(self, new if isinstance(new, KeyProvider) else open_key(new, kms_endpoint=kms_endpoint))

    def inspect(self, ref: str) -> ImageInfo:
        """An image's catalog entry, chunking and layers (no key bytes)."""
        e = self.entry(ref)
        m = self.load_manifest(e)
        return ImageInfo(
            entry=e.public(), domain=dict(m.domain), chunking=m.chunking.to_json(),
            compression_level=m.compression_level, config_digest=m.config_digest,
            config=json.loads(m.config_bytes), chunks=len(m.chunks),
            layers=tuple(LayerInfo(l.media_type, l.digest, l.size, l.diff_id, l.uncompressed_size, len(l.entries),
                                   len(l.chunks)) for l in m.layers))

    def stats(self) -> StoreStats:
        """Logical, unique-plaintext and stored bytes over every image."""
        logical = 0
        unique: dict[bytes, int] = {}
        images = 0
        for _e, m in self.iter_manifests(include_inactive=True):
            images += 1
            logical += m.logical_bytes
            for c in m.chunks:
                unique[c.cid] = c.size
        chunk_bytes = self.chunks.usage()
        meta_bytes = self.objects.usage("manifests")
        stored = chunk_bytes + meta_bytes
        return StoreStats(images, logical, len(unique), sum(unique.values()), stored, chunk_bytes, meta_bytes,
                          round(logical / stored, 3) if stored else None)


@dataclass(frozen=True)
class LayerInfo:
    media_type: str
    digest: str | None
    size: int | None
    diff_id: str
    uncompressed_size: int
    files: int
    chunks: int


@dataclass(frozen=True)
class ImageInfo:
    """What ``inspect`` shows of one image."""

    entry: dict[str, Any]  # the catalog entry's public fields (CatalogEntry.public)
    domain: dict[str, Any]
    chunking: dict[str, Any]
    compression_level: int
    config_digest: str
    config: dict[str, Any]
    chunks: int
    layers: tuple[LayerInfo, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("entry"), **d}


@dataclass(frozen=True)
class StoreStats:
    images: int
    logical_bytes: int
    unique_chunks: int
    unique_plaintext_bytes: int
    stored_bytes: int
    stored_chunk_bytes: int
    stored_manifest_bytes: int
    dedup_ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
