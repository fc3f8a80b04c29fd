"""Sigstore signatures of registry images, as containers/image reads them.

A signature is a sigstore *attachment*: an OCI manifest tagged
``sha256-<hex>.sig`` in the image's repository (written by ``skopeo copy
--sign-by-sigstore-private-key`` or ``cosign sign``), each layer a
``application/vnd.dev.cosign.simplesigning.v1+json`` payload blob whose
base64 signature is the layer annotation ``dev.cosignproject.cosign/signature``.
The payload names what was signed::

    {"critical": {"type": "cosign container image signature",
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "identity": {"docker-reference": "HOST/REPO:TAG"}},
     "optional": {...}}

It is parsed as strictly as containers/image's ``UntrustedSigstorePayload``
(exact field sets, no duplicate keys), and only after its signature verified
(SHA-256; ECDSA, RSA PKCS#1 v1.5 or Ed25519 public keys).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..errors import PolicyInvalid, SignatureInvalid
from . import media
from .media import no_duplicate_keys  # policy files and payloads are parsed alike

if TYPE_CHECKING:
    from .registry_client import RegistryClient

SIGNATURE_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
MAX_SIGNATURE_BODY = 4 << 20  # containers/image's iolimits.MaxSignatureBodySize (also for the attachment manifest)


@dataclass(frozen=True)
class PublicKey:
    key: Any  # a cryptography public key
    key_id: str  # "sha256:" + hex of the SubjectPublicKeyInfo DER

    @classmethod
    def from_pem(cls, data: bytes, what: str) -> PublicKey:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise PolicyInvalid(f"{what}: not a PEM public key") from None
        if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
            raise PolicyInvalid(f"{what}: unsupported public key type {type(key).__name__}")
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(key, "sha256:" + hashlib.sha256(spki).hexdigest())

    def verify(self, signature: bytes, payload: bytes) -> bool:
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                self.key.verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Attachment:
    """One layer of a sigstore attachment manifest, with its payload (digest checked)."""

    media_type: str
    digest: str
    payload: bytes
    annotations: dict[str, str]


@dataclass(frozen=True)
class SignedClaim:
    """What a verified payload says was signed."""

    manifest_digest: str
    docker_reference: str


def attachment_tag(manifest_digest: str) -> str:
    """``sha256-<hex>.sig``: where sigstore attachments of ``manifest_digest`` are tagged."""
    return media.check_digest(manifest_digest).replace(":", "-", 1) + ".sig"


def fetch_attachments(client: RegistryClient, repo: str, manifest_digest: str) -> list[Attachment]:
    """The signature attachments of ``manifest_digest`` in ``repo`` (empty if none).
    Each payload is checked against its descriptor's digest and size; other
    kinds of attachments (attestations, ...) are skipped unread."""
    tag = attachment_tag(manifest_digest)
    got = client.get_manifest(repo, tag, [media.OCI_MANIFEST])
    if got is None:
        return []
    body, mt, _ = got
    where = f"sigstore attachment {repo}:{tag}"
    if len(body) > MAX_SIGNATURE_BODY:
        raise SignatureInvalid(f"{where}: manifest larger than {MAX_SIGNATURE_BODY} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SignatureInvalid(f"{where}: manifest is not JSON") from None
    mt = (doc.get("mediaType") if isinstance(doc, dict) else None) or mt.split(";")[0].strip()
    if not isinstance(doc, dict) or mt != media.OCI_MANIFEST or not isinstance(doc.get("layers"), list):
        raise SignatureInvalid(f"{where}: not an OCI image manifest ({mt!r})")
    out = []
    for layer in doc["layers"]:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIGNATURE_MEDIA_TYPE:
            continue
        digest = layer.get("digest")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise SignatureInvalid(f"{where}: a layer has an invalid digest {digest!r}")
        media.check_digest(digest)
        size = layer.get("size")
        if not isinstance(size, int) or not 0 <= size <= MAX_SIGNATURE_BODY:
            raise SignatureInvalid(f"{where}: layer {digest} has size {size!r} (at most {MAX_SIGNATURE_BODY})")
        try:
            payload = client.get_blob(repo, digest, size=size, max_bytes=MAX_SIGNATURE_BODY)
        except KeyError:
            raise SignatureInvalid(f"{where}: payload blob {digest} is missing") from None
        media.verify_bytes(payload, digest, size, f"{where}: payload blob {digest}")
        ann = layer.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
            raise SignatureInvalid(f"{where}: layer {digest} has malformed annotations")
        out.append(Attachment(SIGNATURE_MEDIA_TYPE, digest, payload, dict(ann)))
    return out


_no_duplicates = no_duplicate_keys(lambda m: SignatureInvalid(f"signature payload: {m}"))


def _exact(obj: Any, fields: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != fields:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise SignatureInvalid(f"signature payload: {what} must have exactly the fields {sorted(fields)}, has {got}")
    return obj


def parse_payload(payload: bytes) -> SignedClaim:
    """The claim of a (verified) payload, checked like containers/image does."""
    try:
        doc = json.loads(payload, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError):
        raise SignatureInvalid("signature payload is not JSON") from None
    doc = _exact(doc, {"critical", "optional"}, "the payload")
    if doc["optional"] is not None and not isinstance(doc["optional"], dict):
        raise SignatureInvalid("signature payload: optional must be an object")
    crit = _exact(doc["critical"], {"type", "image", "identity"}, "critical")
    if crit["type"] != SIGNATURE_TYPE:
        raise SignatureInvalid(f"signature payload: unrecognized signature type {crit['type']!r}")
    digest = _exact(crit["image"], {"docker-manifest-digest"}, "critical.image")["docker-manifest-digest"]
    ref = _exact(crit["identity"], {"docker-reference"}, "critical.identity")["docker-reference"]
    if not isinstance(digest, str) or not isinstance(ref, str):
        raise SignatureInvalid("signature payload: digest and reference must be strings")
    try:
        media.check_digest(digest)
    except Exception:
        raise SignatureInvalid(f"signature payload: invalid docker-manifest-digest {digest!r}") from None
    return SignedClaim(digest, ref)


def verify(keys: list[PublicKey], payload: bytes, b64_signature: str) -> tuple[PublicKey, SignedClaim]:
    """The key that signed ``payload`` and the payload's claim; :class:`SignatureInvalid` if none did."""
    try:
        sig = base64.b64decode(b64_signature, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SignatureInvalid("signature is not valid base64") from None
    for k in keys:
        if k.verify(sig, payload):
            return k, parse_payload(payload)
    ids = ", ".join(k.key_id[:19] for k in keys)
    raise SignatureInvalid(f"cryptographic signature verification failed (trusted keys: {ids})")


__all__ = ["SignatureInvalid", "PublicKey", "Attachment", "SignedClaim", "attachment_tag", "fetch_attachments",
           "parse_payload", "verify", "SIGNATURE_MEDIA_TYPE", "SIGNATURE_ANNOTATION"]
