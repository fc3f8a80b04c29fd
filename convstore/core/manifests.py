"""Sealed manifests, start-up profiles and the layer index of one store.

A manifest is sealed under a random data key (DEK) with the store id as AAD,
stored under the sha256 of the sealed bytes, and the DEK is wrapped by the
master key under ``{"purpose": "manifest", "store", "image", "manifest"}``.
A start-up profile is sealed under a key derived from that DEK, with the
manifest digest as AAD.  A layer-index record (MAC-authenticated, named by a
keyed hash of the diff_id) points a diff_id at a stored layer, so a pack can
reuse it without reading the layer again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from typing import Any

from blake3 import blake3

from .catalog import CatalogEntry
from .chunks import Chunks
from ..crypto import layer_index_name, seal, unseal
from .domains import Domain
from ..errors import ConvstoreError, CorruptObject, ImagePending, KeyAccessDenied, StoreError, StoreFormatError
from ..keys import KeyProvider
from ..manifest import LayerRecord, Manifest, chunk_table
from .identity import StoreIdentity, check_key_id
from ..stores.base import ObjectStore, sealed_manifest_key

LAYER_INDEX_VERSION = 2
PROFILE_VERSION = 2  # start-up profiles: 1 one start in read order; 2 merged starts in file order (docs/format.md)


def sealed_version(entry: CatalogEntry) -> tuple[str, bytes, str]:
    """(manifest digest, wrapped data key, key id) of a complete entry."""
    if entry.manifest_digest is None or entry.key_id is None or entry.wrapped_key is None:
        raise ImagePending(f"image {entry.ref} has no complete version")
    return entry.manifest_digest, entry.wrapped_key, entry.key_id


class ManifestStore:
    def __init__(self, objects: ObjectStore, key: KeyProvider, ident: StoreIdentity):
        self.objects, self.key, self.ident = objects, key, ident
        self._last_found: tuple[tuple[str, str], Manifest] | None = None  # find_layer's last manifest (immutable)

    def context(self, name: str, digest: str) -> dict[str, str]:
        """The encryption context of a manifest's data key."""
        return {"purpose": "manifest", "store": self.ident.id, "image": name, "manifest": digest}

    # -- manifests ----------------------------------------------------------
    def put(self, manifest: Manifest) -> tuple[str, bytes]:
        """Seal, store durably, and return (digest, wrapped data key)."""
        dek = os.urandom(32)
        sealed = seal(manifest.encode(), dek, b"convstore manifest v1\0" + self.ident.id.encode())
        digest = "sha256:" + hashlib.sha256(sealed).hexdigest()
        self.objects.put(sealed_manifest_key(digest), sealed,
                         refs={h[0] for h in manifest.locations if h is not None})
        return digest, self.key.wrap(dek, self.context(manifest.name, digest))

    def load(self, entry: CatalogEntry, head_only: bool = False) -> Manifest:
        """Open an entry's manifest (``head_only``: :meth:`Manifest.decode`'s)."""
        digest, wrapped, key_id = sealed_version(entry)
        return self.open(digest, entry.ref.name, wrapped, key_id, f"image {entry.ref}", head_only)

    def chunk_table(self, entry: CatalogEntry) -> memoryview:
        """Only the chunk table of an entry's manifest (rows of ``manifest.ROW_SIZE``)."""
        digest, wrapped, key_id = sealed_version(entry)
        return chunk_table(self._plain(digest, entry.ref.name, wrapped, key_id, f"image {entry.ref}"))

    def open(self, digest: str, image: str, wrapped: bytes, key_id: str, what: str,
             head_only: bool = False) -> Manifest:
        m = Manifest.decode(self._plain(digest, image, wrapped, key_id, what), head_only)
        if m.name != image:
            raise CorruptObject(f"{what}: manifest belongs to another image")
        return m

    def _plain(self, digest: str, image: str, wrapped: bytes, key_id: str, what: str) -> bytes:
        """The authenticated plaintext of a sealed manifest."""
        check_key_id(self.key, key_id, what)
        try:
            sealed = self.objects.get(sealed_manifest_key(digest))
        except KeyError:
            raise StoreError(f"{what}: manifest {digest} is missing from the store") from None
        got = "sha256:" + hashlib.sha256(sealed).hexdigest()
        if not hmac.compare_digest(got, digest):
            raise CorruptObject(f"{what}: manifest {digest} is corrupt")
        dek = self.key.unwrap(wrapped, self.context(image, digest))
        return unseal(sealed, dek, b"convstore manifest v1\0" + self.ident.id.encode(), f"manifest of {what}")

    # -- start-up profiles --------------------------------------------------
    def _profile_key(self, entry: CatalogEntry) -> bytes:
        digest, wrapped, key_id = sealed_version(entry)
        check_key_id(self.key, key_id, f"image {entry.ref}")
        dek = self.key.unwrap(wrapped, self.context(entry.ref.name, digest))
        return blake3(dek, derive_key_context="convstore v1 start-up profile").digest()

    def keep_key(self, entry: CatalogEntry) -> bytes:
        """A key only a holder of the image's data key has (derived from it): a run and a kept mount's
        keeper prove to each other with it that each could unwrap the image (convstore.engines.keeper)."""
        digest, wrapped, key_id = sealed_version(entry)
        check_key_id(self.key, key_id, f"image {entry.ref}")
        dek = self.key.unwrap(wrapped, self.context(entry.ref.name, digest))
        return blake3(dek, derive_key_context="convstore v1 kept mount").digest()

    def save_profile(self, entry: CatalogEntry, profile: list[tuple[int, int]], starts: int = 1) -> None:
        """Store the chunks an image's starts touched (format 2: (layer,
        position) pairs in file order, the union of ``starts`` starts), sealed
        like its manifest.  Merging is the reader's (convstore.reader.profile)."""
        digest = sealed_version(entry)[0]
        body = json.dumps({"version": PROFILE_VERSION, "manifest": digest, "starts": starts,
                           "chunks": profile}).encode()
        sealed = seal(body, self._profile_key(entry), b"convstore profile v1\0" + digest.encode())
        self.objects.put("profiles/" + digest.split(":", 1)[1], sealed)

    def load_profile(self, entry: CatalogEntry) -> list[tuple[int, int]] | None:
        """The recorded start-up profile, or None if there is none or it does
        not match this image (never an error)."""
        got = self.load_profile_record(entry)
        return got[0] if got is not None else None

    def load_profile_record(self, entry: CatalogEntry) -> tuple[list[tuple[int, int]], int] | None:
        """(chunks, how many starts it merges) of the recorded profile, or None
        (format 1, one start recorded in read order, is read as such)."""
        try:
            digest = sealed_version(entry)[0]
            sealed = self.objects.get("profiles/" + digest.split(":", 1)[1])
            doc = json.loads(unseal(sealed, self._profile_key(entry),
                                    b"convstore profile v1\0" + digest.encode(), "profile"))
            if doc.get("version") not in (1, PROFILE_VERSION) or doc.get("manifest") != entry.manifest_digest:
                return None
            starts = int(doc.get("starts", 1))
            return [(int(a), int(b)) for a, b in doc["chunks"]], max(1, starts)
        except (KeyError, ValueError, TypeError, ConvstoreError):
            return None

    # -- layer index: reuse an already packed layer by its diff_id -------------
    def record_layers(self, domain: Domain, manifest: Manifest, digest: str, wrapped: bytes) -> None:
        """Note where each layer of a published image lives (a cache: losing
        or staling a record only costs a full re-read of that layer)."""
        for i, layer in enumerate(manifest.layers):
            rec = {"format": "convstore-layer-index", "version": LAYER_INDEX_VERSION, "manifest": digest,
                   "image": manifest.name, "layer": i, "key_id": self.key.key_id,
                   "wrapped_key": base64.b64encode(wrapped).decode()}
            self.put_layer_record("layers/" + layer_index_name(domain.layer_key, layer.diff_id), rec)

    def put_layer_record(self, key: str, rec: dict[str, Any]) -> None:
        self.objects.put(key, self.ident.meta().sign("layer", key, rec), durable=False)

    def layer_record(self, key: str) -> dict[str, Any]:
        """An authenticated layer-index record (KeyError if absent, TamperedObject if forged)."""
        rec = self.ident.open_signed("layer", key, self.objects.get(key), f"layer-index record {key}")
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

    def find_layer(self, domain: Domain, diff_id: str, chunks: Chunks) -> tuple[Manifest, LayerRecord] | None:
        """An already stored layer with this diff_id whose chunks are all present, or None."""
        try:
            rec = self.layer_record("layers/" + layer_index_name(domain.layer_key, diff_id))
            last = self._last_found
            if last is not None and last[0] == (rec["manifest"], rec["image"]):
                m = last[1]  # the layers of one image are usually found in one stored manifest: decoded once
            else:
                m = self.open(rec["manifest"], rec["image"], base64.b64decode(rec["wrapped_key"]), rec["key_id"],
                              "layer index")
                self._last_found = ((rec["manifest"], rec["image"]), m)
            layer = m.layers[rec["layer"]]
        except (KeyError, IndexError, TypeError, ValueError, CorruptObject, StoreError, KeyAccessDenied):
            return None
        if (m.domain.get("id"), m.domain.get("epoch")) != (domain.public["id"], domain.public["epoch"]) \
                or not hmac.compare_digest(layer.diff_id, diff_id):
            return None
        if not all(chunks.has(m.chunks[i].cid, m.hint(i)) for i in set(layer.chunks)):
            return None
        return m, layer

    # -- what gc and rekey need: the owner of manifests/, profiles/ and layers/ ----
    def usage(self, *, derived: bool = False) -> int:
        """Bytes of the sealed manifests (``derived``: with profiles and layer-index records)."""
        return sum(self.objects.usage(p) for p in (("manifests", "profiles", "layers") if derived else ("manifests",)))

    def dead(self, keep: set[str]) -> tuple[list[str], int, list[str]]:
        """What no kept manifest (``keep``: digest hex) needs: (manifest keys, their bytes, the keys of
        profiles and layer-index records -- of removed images, or failing authentication)."""
        manifests = [k for k in self.objects.list("manifests") if k.split("/", 1)[1] not in keep]
        size = sum(self.objects.size(k) for k in manifests)
        others = [k for k in self.objects.list("profiles") if k.split("/", 1)[1] not in keep]
        for k, rec in self.layer_records():
            try:
                if rec is None or rec["manifest"].split(":", 1)[1] not in keep:
                    others.append(k)
            except (KeyError, TypeError, AttributeError):
                others.append(k)
        return manifests, size, others

    def delete(self, keys: list[str]) -> None:
        """Drop manifests, profiles and layer-index records (gc's sweep)."""
        self.objects.delete_many(keys)

    def rewrap_layer_records(self, old: KeyProvider, new: KeyProvider) -> tuple[int, int]:
        """Re-wrap the data key every layer-index record carries under ``new``: (re-wrapped, skipped).
        A record that fails authentication or whose key ``old`` cannot open is dropped (a hint: losing it
        only costs a re-read).  Durable when it returns."""
        done = skipped = 0
        for k, maybe in self.layer_records():
            if maybe is None:
                self.objects.delete(k)  # fails authentication: a hint nobody may trust
                continue
            rec = maybe
            if rec.get("key_id") == new.key_id:
                skipped += 1
                continue
            ctx = self.context(rec["image"], rec["manifest"])
            try:
                dek = old.unwrap(base64.b64decode(rec["wrapped_key"]), ctx)
            except Exception:
                self.objects.delete(k)  # a stale hint: dropping it only costs a re-read
                continue
            rec.update(key_id=new.key_id, wrapped_key=base64.b64encode(new.wrap(dek, ctx)).decode())
            self.put_layer_record(k, rec)
            done += 1
        self.objects.flush()
        return done, skipped
