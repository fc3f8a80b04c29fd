"""A store's identity: ``store.json``, its format version, and its metadata key.

``store.json`` holds the store id (bound into every wrapped key and sealed
object, so objects copied into another store do not open there) and the
store's metadata key wrapped by the master key under ``{"purpose":
"metadata", "store": <id>}`` (see :mod:`convstore.core.authmeta`).  A changed id
cannot unwrap the metadata key, so the identity is authenticated too.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import time
import uuid
from typing import Any

from .authmeta import MetadataKey, parse_json
from ..errors import CorruptObject, KeyAccessDenied, StoreError, StoreFormatError, StoreIdentityLost, TamperedObject
from ..keys import KeyProvider
from ..stores.base import ObjectStore

STORE_FORMAT = "convstore-store"
STORE_VERSION = 2  # 2: authenticated metadata (a metadata key wrapped in store.json)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_key_id(provider: KeyProvider, key_id: str, what: str) -> None:
    """Refuse, naming both key ids (never a key), an object sealed under another master key."""
    if not hmac.compare_digest(key_id, provider.key_id):
        raise KeyAccessDenied(f"{what} is sealed under master key {key_id}, but the key given is "
                              f"{provider.key_id}")


def metadata_context(store_id: str) -> dict[str, str]:
    return {"purpose": "metadata", "store": store_id}


def no_store(where: str) -> StoreError:
    """What a command that may not create a store says when there is none."""
    return StoreError(f"no convstore store at {where}; pack, pull or push an image to create one")


class StoreIdentity:
    """Reads (or creates, with a new metadata key) ``store.json``."""

    def __init__(self, objects: ObjectStore, key: KeyProvider, *, create: bool = True, where: str = "this store"):
        self.objects = objects
        self.key = key
        self._meta: MetadataKey | None = None
        #: whether this process created the store (its first store.json)
        self.created = False
        try:
            doc = parse_json(objects.get("store.json"), "store.json")
        except KeyError:
            if not create:  # a read-only command: nothing is created, in a folder or a registry
                raise no_store(where) from None
            sid = uuid.uuid4().hex
            raw, wrapped = key.generate(metadata_context(sid))
            doc = {"format": STORE_FORMAT, "version": STORE_VERSION, "id": sid, "created": now_iso(),
                   "metadata_key": {"key_id": key.key_id, "wrapped": base64.b64encode(wrapped).decode()}}
            if objects.put("store.json", json.dumps(doc).encode(), exclusive=True):
                self._meta = MetadataKey(raw)
                self.created = True
                if not objects.supports_locking:
                    # a registry's "exclusive" put is a check then a put: two clients creating the store at
                    # once may both write; the one stored last is the store (publication checks it again)
                    stored = parse_json(objects.get("store.json"), "store.json")
                    if stored.get("id") != sid:
                        doc, self._meta, self.created = stored, None, False
            else:
                doc = parse_json(objects.get("store.json"), "store.json")
        if doc.get("format") != STORE_FORMAT:
            raise StoreFormatError("not a convstore store (store.json has another format)")
        if doc.get("version") == 1:
            raise StoreFormatError("store format 1 predates authenticated metadata and is not supported by this "
                                   "convstore: pack its images into a new store")
        if doc.get("version") != STORE_VERSION:
            raise StoreFormatError(f"store format version {doc.get('version')} is not supported by this convstore")
        mk = doc.get("metadata_key")
        if not isinstance(mk, dict) or not isinstance(mk.get("key_id"), str) or \
                not isinstance(mk.get("wrapped"), str) or not isinstance(doc.get("id"), str):
            raise CorruptObject("store.json is malformed")
        self._doc = doc
        self.id: str = doc["id"]

    def meta(self) -> MetadataKey:
        """The metadata key (unwrapped once per process: one audited key use)."""
        if self._meta is None:
            self.unlock(self.key)
        assert self._meta is not None
        return self._meta

    @property
    def metadata_key_id(self) -> str:
        """The id of the master key the metadata key is wrapped under."""
        return str(self._doc["metadata_key"]["key_id"])

    def open_signed(self, kind: str, identity: str, data: bytes, what: str) -> dict[str, Any]:
        """An authenticated metadata object (:meth:`MetadataKey.open`).  In a
        store this process just created, a failure may mean that another
        client created it at the same moment and won (a registry has no
        atomic create): that is checked and said instead."""
        try:
            return self.meta().open(kind, identity, data, what)
        except TamperedObject:
            if self.created:
                self._check_id(parse_json(self.objects.get("store.json"), "store.json"))
            raise

    def _check_id(self, doc: dict[str, Any]) -> None:
        if doc.get("id") != self.id:
            raise StoreIdentityLost(f"the store was created at the same time by another client (its id is now "
                             f"{doc.get('id')}, this operation began under {self.id}); nothing was published: "
                             f"run it again")

    def check_current(self, provider: KeyProvider) -> None:
        """Re-read ``store.json``: refuse to publish under ``provider`` if the
        store has been re-keyed to another master key meanwhile (or is not the
        store this operation began in)."""
        doc = parse_json(self.objects.get("store.json"), "store.json")
        self._check_id(doc)
        key_id = str((doc.get("metadata_key") or {}).get("key_id", ""))
        if not hmac.compare_digest(key_id, provider.key_id):
            raise KeyAccessDenied(f"the store was re-keyed to master key {key_id} while this operation ran under "
                                  f"{provider.key_id}; run it again with the new key")

    def unlock(self, provider: KeyProvider) -> None:
        """Unwrap the metadata key with ``provider`` (a rekey may need the new key for it)."""
        mk = self._doc["metadata_key"]
        check_key_id(provider, mk["key_id"], "the store's metadata key")
        try:
            raw = base64.b64decode(mk["wrapped"], validate=True)
        except ValueError:
            raise CorruptObject("store.json is malformed") from None
        self._meta = MetadataKey(provider.unwrap(raw, metadata_context(self.id)))

    def rewrap(self, old: KeyProvider, new: KeyProvider) -> bool:
        """Re-wrap the metadata key under ``new`` (rekey); False if it already is."""
        with self.objects.lock("store") if self.objects.supports_locking else contextlib.nullcontext():
            doc = parse_json(self.objects.get("store.json"), "store.json")
            mk = doc["metadata_key"]
            if mk["key_id"] == new.key_id:
                return False
            ctx = metadata_context(self.id)
            raw = old.unwrap(base64.b64decode(mk["wrapped"]), ctx)
            doc["metadata_key"] = {"key_id": new.key_id, "wrapped": base64.b64encode(new.wrap(raw, ctx)).decode()}
            self.objects.put("store.json", json.dumps(doc).encode())
            self._doc = doc
        return True
