"""The OCI artifacts a registry store writes (layout 2, docs/format.md): their
types, and the manifests and descriptors that carry convstore's objects."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from ...oci.registry_client import EMPTY_CONFIG, OCI_MANIFEST

AT_OBJECT = "application/vnd.convstore.object.v1"
AT_MANIFEST = "application/vnd.convstore.manifest.v1"
AT_IMAGE = "application/vnd.convstore.image.v1"
AT_CHUNK_INDEX = "application/vnd.convstore.chunk-index.v1"
AT_INDEX_SNAPSHOT = "application/vnd.convstore.chunk-index-snapshot.v1"
MT_BLOB = "application/vnd.convstore.blob.v1"
MT_PACK = "application/vnd.convstore.pack.v1"


def artifact(artifact_type: str, layers: list[dict[str, Any]], annotations: dict[str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                       "config": EMPTY_CONFIG, "layers": layers, "annotations": annotations},
                      sort_keys=True).encode()


def layer(digest: str, size: int, media_type: str = MT_BLOB, data: bytes | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if data is not None:
        d["data"] = base64.b64encode(data).decode()
    return d


def inline(desc: dict[str, Any]) -> bytes | None:
    """A descriptor's embedded ``data`` (OCI image-spec 1.1), if present and it matches the digest."""
    raw = desc.get("data")
    if not isinstance(raw, str):
        return None
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        return None
    ok = hmac.compare_digest("sha256:" + hashlib.sha256(data).hexdigest(), str(desc.get("digest", "")))
    return data if ok and len(data) == desc.get("size") else None
