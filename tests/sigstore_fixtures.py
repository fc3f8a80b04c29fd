"""Sigstore keys and signature attachments, for tests.

Debian's skopeo 1.9.3 (and podman 4.3.1, on the same containers/image)
cannot sign with sigstore: ``skopeo copy --sign-by-sigstore-private-key``
exits with "creating signature: Debian-local change: sigstore disabled"
(Debian patched the signer out).  So :func:`sign` writes the attachment as
containers/image's signer and ``docker_image_dest.go``
(putSignaturesToSigstoreAttachments) do: the payload as its
``UntrustedSigstorePayload.MarshalJSON`` (Go's json.Marshal of a map: keys
sorted, compact), an ECDSA P-256 / SHA-256 ASN.1 signature, base64 in the
layer annotation ``dev.cosignproject.cosign/signature``, the payload pushed
as a blob of type ``application/vnd.dev.cosign.simplesigning.v1+json``, a
config ``{"rootfs": {"type": "layers", "diff_ids": [...]}}``, and the OCI
manifest tagged ``sha256-<hex>.sig``.  Interoperability with real cosign
output is checked separately against containers/image's own cosign
fixtures (tests/test_signatures.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from convstore.oci.media import OCI_CONFIG, OCI_MANIFEST
from convstore.oci.registry_client import RegistryClient

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"


@dataclass
class SigningKey:
    private: ec.EllipticCurvePrivateKey
    public: Path  # PEM SubjectPublicKeyInfo, what a policy's keyPath names

    @property
    def public_pem(self) -> bytes:
        return self.public.read_bytes()


def make_key(directory: Path, name: str = "signing") -> SigningKey:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    public = directory / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return SigningKey(key, public)


def payload(manifest_digest: str, docker_reference: str) -> bytes:
    """A sigstore payload, byte for byte as containers/image writes it."""
    doc = {"critical": {"identity": {"docker-reference": docker_reference},
                        "image": {"docker-manifest-digest": manifest_digest},
                        "type": "cosign container image signature"},
           "optional": {"creator": "containers/image 5.23.1", "timestamp": int(time.time())}}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def sign(host: str, repo: str, tag: str, key: SigningKey, docker_reference: str | None = None,
         manifest_digest: str | None = None) -> str:
    """Sign ``repo:tag`` on the loopback registry ``host`` (the digest its tag names now, or
    ``manifest_digest``) as ``docker_reference`` (default ``host/repo:tag``), adding a layer to the
    attachment as containers/image does.  Returns the signed digest."""
    c = RegistryClient(host, insecure=True)
    if manifest_digest is None:
        got = c.get_manifest(repo, tag, [OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])
        assert got is not None, f"{repo}:{tag} is not in the registry"
        manifest_digest = got[2]
    body = payload(manifest_digest, docker_reference or f"{host}/{repo}:{tag}")
    sig = key.private.sign(body, ec.ECDSA(hashes.SHA256()))
    att_tag = manifest_digest.replace(":", "-", 1) + ".sig"
    existing = c.get_manifest(repo, att_tag, [OCI_MANIFEST])
    layers = json.loads(existing[0])["layers"] if existing else []
    pdigest = "sha256:" + hashlib.sha256(body).hexdigest()
    c.put_blob(repo, body, pdigest)
    layers.append({"mediaType": SIMPLESIGNING, "digest": pdigest, "size": len(body),
                   "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(sig).decode()}})
    config = json.dumps({"architecture": "", "os": "", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}},
                        separators=(",", ":")).encode()
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    c.put_blob(repo, config, cdigest)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": len(config)}, "layers": layers}
    c.put_manifest(repo, att_tag, json.dumps(manifest, separators=(",", ":")).encode(), OCI_MANIFEST)
    return manifest_digest


def skopeo_copy(src: str, dest: str) -> None:
    """Push an image with the real skopeo (unsigned: see the module docstring)."""
    exe = shutil.which("skopeo")
    assert exe, "skopeo is not installed; scripts/setup.sh installs it"
    p = subprocess.run([exe, "copy", "-q", "--dest-tls-verify=false", src, dest], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr


def policy_file(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


def sigstore_policy(host_scope: str, key: SigningKey, default: str = "reject", **extra: object) -> dict:
    """A policy that requires ``key``'s signature for the docker scope ``host_scope`` (default: reject others)."""
    req = {"type": "sigstoreSigned", "keyPath": str(key.public), **extra}
    return {"default": [{"type": default}], "transports": {"docker": {host_scope: [req]}}}
