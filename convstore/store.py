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
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import platformdirs
from blake3 import blake3

from .crypto import domain_chunk_key, domain_layer_key, layer_index_name, seal, unseal
from .errors import ConvstoreError, CorruptObject, ImageNotFound, KeyAccessDenied, StoreError, StoreFormatError
from .keys import KeyProvider, open_key
from .manifest import LayerRecord, Manifest
from .refs import ImageRef
from .stores.base import ObjectStore
from .stores.local import LocalStore

STORE_FORMAT = "convstore-store"
STORE_VERSION = 1
REF_VERSION = 1
DOMAIN_VERSION = 1
DEFAULT_DOMAIN = "default"


def default_store_path() -> str:
    """``$CONVSTORE_STORE``, else ``<user data dir>/convstore/store``."""
    return os.environ.get("CONVSTORE_STORE") or os.path.join(platformdirs.user_data_dir("convstore"), "store")


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


@dataclass(frozen=True)
class CatalogEntry:
    """One ``name:tag`` in the catalog.  Holds no secret: the data key is wrapped."""

    ref: ImageRef
    manifest_digest: str
    key_id: str
    wrapped_key: bytes
    created: str
    source: str
    logical_bytes: int
    layers: int
    state: str = "active"

    def to_json(self) -> dict[str, Any]:
        return {"format": "convstore-ref", "version": REF_VERSION, "name": self.ref.name, "tag": self.ref.tag,
                "manifest": self.manifest_digest, "key_id": self.key_id,
                "wrapped_key": base64.b64encode(self.wrapped_key).decode(), "created": self.created,
                "source": self.source, "logical_bytes": self.logical_bytes, "layers": self.layers,
                "state": self.state}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CatalogEntry:
        if d.get("format") != "convstore-ref":
            raise CorruptObject("catalog entry is malformed")
        if d.get("version") != REF_VERSION:
            raise StoreFormatError(f"catalog entry version {d.get('version')} is not supported")
        try:
            return cls(ImageRef(d["name"], d["tag"]), d["manifest"], d["key_id"],
                       base64.b64decode(d["wrapped_key"]), d["created"], d["source"], d["logical_bytes"],
                       d["layers"], d.get("state", "active"))
        except (KeyError, ValueError, TypeError):
            raise CorruptObject("catalog entry is malformed") from None

    def public(self) -> dict[str, Any]:
        """What ``images``/``inspect`` show: no wrapped key bytes."""
        return {"name": self.ref.name, "tag": self.ref.tag, "manifest": self.manifest_digest,
                "key_id": self.key_id, "created": self.created, "source": self.source,
                "logical_bytes": self.logical_bytes, "layers": self.layers, "state": self.state}


class Store:
    """A convstore image store.  Open with :meth:`Store.open`."""

    def __init__(self, objects: ObjectStore, key: KeyProvider):
        self.objects = objects
        self.key = key
        self.id = self._identity()
        self._domains: dict[str, Domain] = {}

    def with_objects(self, objects: ObjectStore) -> Store:
        """The same store seen through another object layer (e.g. SlowStore)."""
        other = Store.__new__(Store)
        other.objects, other.key, other.id, other._domains = objects, self.key, self.id, self._domains
        return other

    @classmethod
    def open(cls, path: str | None = None, key: KeyProvider | str | None = None) -> Store:
        """Open (creating if needed) the local store at ``path`` with ``key``
        (a provider or a ``--key`` spec; default: the user's key file)."""
        path = os.path.abspath(os.path.expanduser(path or default_store_path()))
        provider = key if isinstance(key, KeyProvider) else open_key(key)
        kp = getattr(provider, "path", None)
        if kp and os.path.commonpath([path, os.path.abspath(kp)]) == path:
            raise StoreError(f"the key file {kp} lies inside the store {path}: keep master keys apart from data")
        return cls(LocalStore(path), provider)

    def __repr__(self) -> str:
        return f"<Store {self.objects!r} id={self.id}>"

    # -- identity -------------------------------------------------------
    def _identity(self) -> str:
        try:
            doc = _json(self.objects.get("store.json"), "store.json")
        except KeyError:
            doc = {"format": STORE_FORMAT, "version": STORE_VERSION, "id": uuid.uuid4().hex, "created": _now()}
            if not self.objects.put("store.json", json.dumps(doc).encode(), exclusive=True):
                doc = _json(self.objects.get("store.json"), "store.json")
        if doc.get("format") != STORE_FORMAT:
            raise StoreFormatError("not a convstore store (store.json has another format)")
        if doc.get("version") != STORE_VERSION:
            raise StoreFormatError(f"store format version {doc.get('version')} is not supported by this convstore")
        return str(doc["id"])

    # -- convergence domains ---------------------------------------------
    def domain(self, name: str = DEFAULT_DOMAIN) -> Domain:
        """The convergence domain ``name``, created on first use."""
        if name in self._domains:
            return self._domains[name]
        key = f"domains/{name}"
        try:
            rec = _json(self.objects.get(key), f"domain {name}")
        except KeyError:
            secret = os.urandom(32)
            rec = {"format": "convstore-domain", "version": DOMAIN_VERSION, "name": name, "epoch": 1,
                   "id": uuid.uuid4().hex, "key_id": self.key.key_id, "created": _now()}
            rec["wrapped_secret"] = base64.b64encode(self.key.wrap(secret, self._domain_context(rec))).decode()
            if not self.objects.put(key, json.dumps(rec).encode(), exclusive=True):
                rec = _json(self.objects.get(key), f"domain {name}")
        if rec.get("version") != DOMAIN_VERSION:
            raise StoreFormatError(f"domain record version {rec.get('version')} is not supported")
        self._check_key_id(rec["key_id"], f"domain {name!r}")
        secret = self.key.unwrap(base64.b64decode(rec["wrapped_secret"]), self._domain_context(rec))
        d = Domain({k: rec[k] for k in ("name", "epoch", "id")}, domain_chunk_key(secret), domain_layer_key(secret))
        self._domains[name] = d
        return d

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

    def load_manifest(self, entry: CatalogEntry) -> Manifest:
        return self._open_manifest(entry.manifest_digest, entry.ref.name, entry.wrapped_key, entry.key_id,
                                   f"image {entry.ref}")

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
        self._check_key_id(entry.key_id, f"image {entry.ref}")
        dek = self.key.unwrap(entry.wrapped_key, self._manifest_context(entry.ref.name, entry.manifest_digest))
        return blake3(dek, derive_key_context="convstore v1 start-up profile").digest()

    def save_profile(self, entry: CatalogEntry, profile: list[tuple[int, int]]) -> None:
        """Store the chunks an image's start-up touched, sealed like its manifest."""
        body = json.dumps({"version": 1, "manifest": entry.manifest_digest, "chunks": profile}).encode()
        sealed = seal(body, self._profile_key(entry), b"convstore profile v1\0" + entry.manifest_digest.encode())
        self.objects.put("profiles/" + entry.manifest_digest.split(":", 1)[1], sealed)

    def load_profile(self, entry: CatalogEntry) -> list[tuple[int, int]] | None:
        """The recorded start-up profile, or None if there is none or it does
        not match this image (never an error)."""
        try:
            sealed = self.objects.get("profiles/" + entry.manifest_digest.split(":", 1)[1])
            doc = json.loads(unseal(sealed, self._profile_key(entry),
                                    b"convstore profile v1\0" + entry.manifest_digest.encode(), "profile"))
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
            rec = {"format": "convstore-layer-index", "version": 1, "manifest": digest, "image": manifest.name,
                   "layer": i, "key_id": self.key.key_id, "wrapped_key": base64.b64encode(wrapped).decode()}
            self.objects.put("layers/" + layer_index_name(domain.layer_key, layer.diff_id),
                             json.dumps(rec).encode(), durable=False)

    def find_layer(self, domain: Domain, diff_id: str) -> tuple[Manifest, LayerRecord] | None:
        """An already stored layer with this diff_id whose chunks are all
        present, or None."""
        try:
            rec = _json(self.objects.get("layers/" + layer_index_name(domain.layer_key, diff_id)), "layer index")
            m = self._open_manifest(rec["manifest"], rec["image"], base64.b64decode(rec["wrapped_key"]),
                                    rec["key_id"], "layer index")
            layer = m.layers[rec["layer"]]
        except (KeyError, IndexError, TypeError, ValueError, CorruptObject, StoreError, KeyAccessDenied):
            return None
        if m.domain.get("id") != domain.public["id"] or not hmac.compare_digest(layer.diff_id, diff_id):
            return None
        if not all(self.objects.has("chunks/" + m.chunks[i].cid.hex()) for i in set(layer.chunks)):
            return None
        return m, layer

    # -- catalog --------------------------------------------------------
    def publish(self, entry: CatalogEntry) -> None:
        """Atomically point ``name:tag`` at a complete image."""
        self.objects.flush()
        self.objects.put(entry.ref.key, json.dumps(entry.to_json(), indent=1).encode())

    def entry(self, ref: ImageRef | str) -> CatalogEntry:
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        try:
            data = self.objects.get(r.key)
        except KeyError:
            raise ImageNotFound(f"no image {r} in the store") from None
        return CatalogEntry.from_json(_json(data, f"catalog entry {r}"))

    def images(self) -> list[CatalogEntry]:
        out = []
        for k in self.objects.list("refs"):
            try:
                out.append(self.entry(ImageRef.from_key(k)))
            except (ImageNotFound, ValueError):
                continue
        return sorted(out, key=lambda e: (e.ref.name, e.ref.tag))

    def manifest(self, ref: ImageRef | str) -> Manifest:
        return self.load_manifest(self.entry(ref))

    def iter_manifests(self) -> Iterator[tuple[CatalogEntry, Manifest]]:
        for e in self.images():
            yield e, self.load_manifest(e)

    # -- operations (implemented in their own modules) -------------------
    def pack(self, source: str, ref: str, **kw: Any) -> Any:
        """Pack ``source`` (``oci:DIR[:TAG]`` or ``docker-archive:FILE``) as ``ref``."""
        from .pack import pack

        return pack(self, source, ref, **kw)

    def unpack_oci(self, ref: str, dest: str, **kw: Any) -> Any:
        from .unpack import unpack_oci

        return unpack_oci(self, ref, dest, **kw)

    def unpack_rootfs(self, ref: str, dest: str, **kw: Any) -> Any:
        from .rootfs import unpack_rootfs

        return unpack_rootfs(self, ref, dest, **kw)

    def inspect(self, ref: str) -> dict[str, Any]:
        e = self.entry(ref)
        m = self.load_manifest(e)
        return {
            **e.public(),
            "domain": m.domain,
            "chunking": m.chunking.to_json(),
            "compression_level": m.compression_level,
            "config_digest": m.config_digest,
            "config": json.loads(m.config_bytes),
            "chunks": len(m.chunks),
            "layers": [{"media_type": l.media_type, "digest": l.digest, "size": l.size, "diff_id": l.diff_id,
                        "uncompressed_size": l.uncompressed_size, "files": len(l.entries),
                        "chunks": len(l.chunks)} for l in m.layers],
        }

    def stats(self) -> dict[str, Any]:
        """Logical, unique-plaintext and stored bytes over every image."""
        logical = 0
        unique: dict[bytes, int] = {}
        images = 0
        for _e, m in self.iter_manifests():
            images += 1
            logical += m.logical_bytes
            for c in m.chunks:
                unique[c.cid] = c.size
        chunk_bytes = self.objects.usage("chunks")
        meta_bytes = self.objects.usage("manifests")
        stored = chunk_bytes + meta_bytes
        return {
            "images": images,
            "logical_bytes": logical,
            "unique_chunks": len(unique),
            "unique_plaintext_bytes": sum(unique.values()),
            "stored_bytes": stored,
            "stored_chunk_bytes": chunk_bytes,
            "stored_manifest_bytes": meta_bytes,
            "dedup_ratio": round(logical / stored, 3) if stored else None,
        }
