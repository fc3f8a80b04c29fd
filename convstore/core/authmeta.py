"""Authenticated store metadata.

Every metadata object a reader trusts (catalog entries, convergence-domain
records, layer-index records, leases) carries a MAC under the store's *metadata key*,
a random 32-byte key wrapped by the master key (context ``{"purpose":
"metadata", "store": <store id>}``) and kept in ``store.json``.  Only a holder
of the master key can unwrap it, so a store writer without the key can
neither forge nor edit such an object.

The MAC is bound to the object's *identity*, which the reader derives from
what it asked for (``ref app:1``, ``domain tenant``, ``layer <index name>``),
never from the object's content: an entry copied from ``t:2`` to ``t:1``, a
domain record copied to another name, or any object copied from another store
fails with :class:`~convstore.errors.TamperedObject`.

Construction: ``mac = BLAKE3-keyed(K_kind, identity || 0x00 || body)``, with
``K_kind = BLAKE3-derive_key("convstore v2 metadata mac " + kind, K_meta)``
and ``body`` the object's canonical JSON (sorted keys, compact, without the
``mac`` field).  Compared in constant time.  Replay of an *older* version of
the same object is not caught here; :mod:`convstore.core.trust` does that for a
client that keeps state.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from blake3 import blake3

from ..errors import CorruptObject, TamperedObject

KINDS = ("entry", "domain", "layer", "lease")
MAC_FIELD = "mac"


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """A stored JSON object, or :class:`CorruptObject` naming ``what``."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptObject(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CorruptObject(f"{what} is malformed")
    return doc


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class MetadataKey:
    """The unwrapped metadata key of one store (secret: never logged)."""

    __slots__ = ("_keys",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a metadata key is 32 bytes")
        self._keys = {k: blake3(key, derive_key_context=f"convstore v2 metadata mac {k}").digest() for k in KINDS}

    def __repr__(self) -> str:
        return "<MetadataKey>"

    def _mac(self, kind: str, identity: str, body: bytes) -> str:
        return blake3(identity.encode() + b"\0" + body, key=self._keys[kind]).hexdigest()

    def sign(self, kind: str, identity: str, doc: dict[str, Any]) -> bytes:
        """``doc`` with its MAC, as the bytes to store."""
        body = {k: v for k, v in doc.items() if k != MAC_FIELD}
        return json.dumps({**body, MAC_FIELD: self._mac(kind, identity, canonical(body))}, indent=1).encode()

    def open(self, kind: str, identity: str, data: bytes, what: str) -> dict[str, Any]:
        """The authenticated document, or :class:`TamperedObject` naming ``what``."""
        doc = parse_json(data, what)
        mac = doc.pop(MAC_FIELD, None)
        if not isinstance(mac, str):
            raise TamperedObject(f"{what} carries no authentication code (written without the master key)")
        if not hmac.compare_digest(mac.encode(), self._mac(kind, identity, canonical(doc)).encode()):
            raise TamperedObject(f"{what} fails authentication: it was edited, or moved from another "
                                 f"{'name' if kind == 'entry' else kind} or store")
        return doc
