"""The containers trust policy (containers-policy.json(5)), at pack and at start.

The file podman, skopeo and CRI-O read::

    {"default": [REQUIREMENT, ...],
     "transports": {"docker": {"HOST[:PORT]/REPO": [...], "HOST": [...], "*.example.com": [...], "": [...]},
                    "oci": {"/abs/dir": [...]}, "docker-archive": {"": [...]}}}

Every requirement of the scope that applies must accept the image.
Implemented: ``insecureAcceptAnything``, ``reject``, and ``sigstoreSigned``
with public keys (``keyPath``, ``keyPaths``, ``keyData``, ``keyDatas``) and a
``signedIdentity`` (``matchRepoDigestOrExact``, the default, ``matchExact``,
``matchRepository``, ``exactReference``, ``exactRepository``,
``remapIdentity``), with containers/image's semantics: a scope is looked up
as the image's exact identity, then its namespaces, most specific first, then
the transport's ``""``, then ``default``.  ``signedBy`` (GPG),
``signedBaseLayer`` and ``sigstoreSigned`` with Fulcio, PKI or Rekor parse,
but an image they apply to is refused (:class:`PolicyInvalid`), never let
through; anything else unknown makes the whole file invalid.

At pack, :func:`evaluate` checks the source against the policy and returns
the *verification record* sealed into the manifest (``verification``,
version 1, docs/format.md): the policy file and scope used, the requirements
met, and for each ``sigstoreSigned`` requirement the signature that
satisfied it (payload and signature kept whole, the key's id, the signed
digest and identity).  At start, :func:`require` checks a stored image
against the node's policy: a signature requirement is met only by a recorded
signature that verifies again, here, under the node's keys and identity
rule, over the digest of the source manifest sealed in the image, whose
config and layer digests must be the image's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidReference, PolicyDenied, PolicyInvalid, SignatureInvalid, SignatureRequired
from .media import no_duplicate_keys

if TYPE_CHECKING:
    from .dockerref import DockerRef
    from . import sigstore
    from ..manifest import Manifest
    from .sources import ImageSource

ACCEPT = "insecureAcceptAnything"
REJECT = "reject"
SIGSTORE = "sigstoreSigned"
RECORD_VERSION = 1
MAX_POLICY_BYTES = 4 << 20
SYSTEM_POLICY = "/etc/containers/policy.json"
_UNSUPPORTED = {"signedBy": "signedBy (GPG signatures) is not supported; use sigstoreSigned with a public key",
                "signedBaseLayer": "signedBaseLayer is not supported"}
_IDENTITY_TYPES = ("matchExact", "matchRepoDigestOrExact", "matchRepository", "exactReference", "exactRepository",
                   "remapIdentity")
# compiled on first use (re caches it), and dockerref imported there: not at every run's start
_PREFIX = (r"^(?:[a-z0-9.-]+(?::[0-9]+)?|\*\.[a-z0-9.-]+)(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


def user_policy_path() -> str:
    """``$XDG_CONFIG_HOME/containers/policy.json`` (else ``$HOME/.config/...``), as the containers tools look."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "containers", "policy.json")


# -- signed identities ---------------------------------------------------------------
@dataclass(frozen=True)
class SignedIdentity:
    """How a signature's claimed ``docker-reference`` must relate to the image's."""

    type: str = "matchRepoDigestOrExact"
    docker_reference: str = ""  # exactReference
    docker_repository: str = ""  # exactRepository
    prefix: str = ""  # remapIdentity
    signed_prefix: str = ""

    def to_json(self) -> dict[str, str]:
        d = {"type": self.type, "dockerReference": self.docker_reference, "dockerRepository": self.docker_repository,
             "prefix": self.prefix, "signedPrefix": self.signed_prefix}
        return {k: v for k, v in d.items() if v}

    def matches(self, intended: DockerRef | None, signed: str) -> bool:
        from .dockerref import DockerRef

        try:
            sig = DockerRef.parse(signed)
        except InvalidReference:
            return False
        if self.type == "exactReference":
            want = DockerRef.parse(self.docker_reference)
            return not sig.name_only and str(sig) == str(want)
        if self.type == "exactRepository":
            return sig.name == DockerRef.parse(self.docker_repository).name
        if intended is None:  # the image has no docker reference (oci:, docker-archive:)
            return False
        if self.type == "matchExact":
            return not intended.name_only and not sig.name_only and str(sig) == str(intended)
        if self.type == "matchRepository":
            return sig.name == intended.name
        if self.type == "remapIdentity":
            name = intended.name
            if name == self.prefix or name.startswith(self.prefix + "/"):
                try:
                    intended = DockerRef.parse(str(intended).replace(self.prefix, self.signed_prefix, 1))
                except InvalidReference:
                    return False
        # matchRepoDigestOrExact (and remapIdentity after the remap)
        if sig.name_only:
            return False
        if intended.tag is not None:
            return str(sig) == str(intended)
        if intended.digest is not None:
            return sig.name == intended.name
        return False


# -- requirements ----------------------------------------------------------------------
@dataclass(frozen=True)
class Requirement:
    type: str
    key_paths: tuple[str, ...] = ()
    key_datas: tuple[bytes, ...] = ()
    identity: SignedIdentity = field(default_factory=SignedIdentity)
    unsupported: str = ""  # why this requirement cannot be evaluated ("" if it can)

    def keys(self, policy_path: str | None) -> list[sigstore.PublicKey]:
        """The trusted public keys (read when the requirement is used, as containers/image does)."""
        from . import sigstore  # only where signatures are read: it loads cryptography

        out = []
        for p in self.key_paths:
            try:
                with open(p, "rb") as f:
                    data = f.read(1 << 20)
            except OSError as e:
                raise PolicyInvalid(f"{policy_path}: sigstoreSigned keyPath {p}: {e.strerror}") from None
            out.append(sigstore.PublicKey.from_pem(data, f"{policy_path}: keyPath {p}"))
        for i, d in enumerate(self.key_datas):
            out.append(sigstore.PublicKey.from_pem(d, f"{policy_path}: keyData {i + 1}"))
        return out


def _fields(obj: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise PolicyInvalid(f"{what}: unknown field {extra[0]!r}")


def _string(obj: dict[str, Any], key: str, what: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise PolicyInvalid(f"{what}: {key} must be a non-empty string")
    return v


def _parse_identity(obj: Any, what: str) -> SignedIdentity:
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise PolicyInvalid(f"{what}: signedIdentity must be an object with a type")
    t = obj["type"]
    if t not in _IDENTITY_TYPES:
        raise PolicyInvalid(f"{what}: unknown signedIdentity type {t!r}")
    w = f"{what}: signedIdentity {t}"
    from .dockerref import DockerRef

    try:
        if t == "exactReference":
            _fields(obj, {"type", "dockerReference"}, w)
            ref = _string(obj, "dockerReference", w)
            if DockerRef.parse(ref).name_only:
                raise PolicyInvalid(f"{w}: dockerReference {ref!r} has neither a tag nor a digest")
            return SignedIdentity(t, docker_reference=ref)
        if t == "exactRepository":
            _fields(obj, {"type", "dockerRepository"}, w)
            repo = _string(obj, "dockerRepository", w)
            DockerRef.parse(repo)
            return SignedIdentity(t, docker_repository=repo)
    except InvalidReference as e:
        raise PolicyInvalid(f"{w}: {e}") from None
    if t == "remapIdentity":
        _fields(obj, {"type", "prefix", "signedPrefix"}, w)
        prefix, signed = _string(obj, "prefix", w), _string(obj, "signedPrefix", w)
        for p in (prefix, signed):
            if not re.match(_PREFIX, p):
                raise PolicyInvalid(f"{w}: prefix {p!r} is not valid")
        return SignedIdentity(t, prefix=prefix, signed_prefix=signed)
    _fields(obj, {"type"}, w)
    return SignedIdentity(t)


def _b64(v: Any, what: str) -> bytes:
    if not isinstance(v, str):
        raise PolicyInvalid(f"{what} must be a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise PolicyInvalid(f"{what} is not valid base64") from None


def _parse_requirement(obj: Any, what: str) -> Requirement:
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise PolicyInvalid(f"{what}: a requirement must be an object with a type")
    t = obj["type"]
    if t in (ACCEPT, REJECT):
        _fields(obj, {"type"}, f"{what}: {t}")
        return Requirement(t)
    if t in _UNSUPPORTED:
        return Requirement(t, unsupported=_UNSUPPORTED[t])
    if t != SIGSTORE:
        raise PolicyInvalid(f"{what}: unknown policy requirement type {t!r}")
    w = f"{what}: {SIGSTORE}"
    _fields(obj, {"type", "keyPath", "keyPaths", "keyData", "keyDatas", "fulcio", "pki", "rekorPublicKeyPath",
                  "rekorPublicKeyPaths", "rekorPublicKeyData", "rekorPublicKeyDatas", "signedIdentity"}, w)
    sources = [k for k in ("keyPath", "keyPaths", "keyData", "keyDatas", "fulcio", "pki") if k in obj]
    if len(sources) != 1:
        raise PolicyInvalid(f"{w}: exactly one of keyPath, keyPaths, keyData, keyDatas, fulcio, and pki must be "
                            f"specified")
    identity = _parse_identity(obj["signedIdentity"], w) if "signedIdentity" in obj else SignedIdentity()
    if sources[0] in ("fulcio", "pki") or any(k.startswith("rekor") for k in obj):
        extra = sorted(k for k in obj if k in ("fulcio", "pki") or k.startswith("rekor"))
        return Requirement(t, identity=identity,
                           unsupported=f"{SIGSTORE} with {', '.join(extra)} is not supported; use a public key "
                                       f"(keyPath or keyData)")
    paths: tuple[str, ...] = ()
    datas: tuple[bytes, ...] = ()
    if "keyPath" in obj:
        paths = (_string(obj, "keyPath", w),)
    elif "keyPaths" in obj:
        v = obj["keyPaths"]
        if not isinstance(v, list) or not v or not all(isinstance(p, str) and p for p in v):
            raise PolicyInvalid(f"{w}: keyPaths must be a non-empty list of paths")
        paths = tuple(v)
    elif "keyData" in obj:
        datas = (_b64(obj["keyData"], f"{w}: keyData"),)
    else:
        v = obj["keyDatas"]
        if not isinstance(v, list) or not v:
            raise PolicyInvalid(f"{w}: keyDatas must be a non-empty list")
        datas = tuple(_b64(d, f"{w}: keyDatas") for d in v)
    return Requirement(t, key_paths=paths, key_datas=datas, identity=identity)


def _parse_requirements(obj: Any, what: str) -> tuple[Requirement, ...]:
    if not isinstance(obj, list) or not obj:
        raise PolicyInvalid(f"{what}: the list of policy requirements must not be empty")
    return tuple(_parse_requirement(r, f"{what}[{i}]") for i, r in enumerate(obj))


def _check_scope(transport: str, scope: str, what: str) -> None:
    if scope == "":
        return
    if transport == "docker-archive":
        raise PolicyInvalid(f"{what}: docker-archive: does not support any scopes except the default \"\" one")
    if transport == "oci" and (not scope.startswith("/") or os.path.normpath(scope) != scope or scope == "/"):
        raise PolicyInvalid(f"{what}: an oci scope must be an absolute, clean directory path")
    if transport == "docker" and not re.match(_PREFIX, scope.split("@")[0].rsplit(":", 1)[0] if "/" in scope
                                                        else scope):
        raise PolicyInvalid(f"{what}: invalid docker scope {scope!r}")


@dataclass(frozen=True)
class Policy:
    """A parsed policy file (``path`` None: no file was found, everything is accepted)."""

    path: str | None
    default: tuple[Requirement, ...]
    transports: dict[str, dict[str, tuple[Requirement, ...]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, path: str) -> Policy:
        try:
            doc = json.loads(data, object_pairs_hook=no_duplicate_keys(
                lambda m: PolicyInvalid(f"{path}: {m}")))
        except (ValueError, UnicodeDecodeError) as e:
            raise PolicyInvalid(f"{path}: not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(doc, dict):
            raise PolicyInvalid(f"{path}: a policy is a JSON object")
        _fields(doc, {"default", "transports"}, path)
        if "default" not in doc:
            raise PolicyInvalid(f"{path}: default policy is missing")
        default = _parse_requirements(doc["default"], f"{path}: default")
        transports: dict[str, dict[str, tuple[Requirement, ...]]] = {}
        tdoc = doc.get("transports") or {}
        if not isinstance(tdoc, dict):
            raise PolicyInvalid(f"{path}: transports must be an object")
        for tname, scopes in tdoc.items():
            if not isinstance(scopes, dict):
                raise PolicyInvalid(f"{path}: transports.{tname} must be an object")
            transports[tname] = {}
            for scope, reqs in scopes.items():
                what = f'{path}: transports.{tname}["{scope}"]'
                _check_scope(tname, scope, what)
                transports[tname][scope] = _parse_requirements(reqs, what)
        return cls(path, default, transports)

    @classmethod
    def load(cls, path: str) -> Policy:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_POLICY_BYTES + 1)
        except OSError as e:
            raise PolicyInvalid(f"trust policy {path}: {e.strerror}") from None
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyInvalid(f"trust policy {path}: larger than {MAX_POLICY_BYTES} bytes")
        return cls.parse(data, path)

    def requirements_for(self, scope: Scope) -> tuple[str, tuple[Requirement, ...]]:
        """(where in the file, requirements) for an image: its exact identity, then its namespaces, then the
        transport's "", then default."""
        scopes = self.transports.get(scope.transport)
        if scopes is not None:
            for name in ([scope.identity] if scope.identity else []) + scope.namespaces + [""]:
                if name in scopes:
                    return f'transports.{scope.transport}["{name}"]', scopes[name]
        return "default", self.default

    @property
    def label(self) -> str:
        return self.path or "no policy file (everything accepted)"


#: what is used when no policy file exists: accept, and record that nothing was verified
NO_POLICY = Policy(None, (Requirement(ACCEPT),))


def load_policy(path: str | None = None) -> Policy:
    """The policy at ``path`` (must exist), else the first of the user's and the system's policy files
    (``$XDG_CONFIG_HOME`` or ``~/.config/containers/policy.json``, ``/etc/containers/policy.json``), else
    :data:`NO_POLICY`."""
    if path is not None:
        return Policy.load(path)
    for p in (user_policy_path(), SYSTEM_POLICY):
        if os.path.exists(p):
            return Policy.load(p)
    return NO_POLICY


# -- scopes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    transport: str  # "docker", "oci", "docker-archive", or "" (unknown: only default applies)
    identity: str
    namespaces: list[str]
    docker_ref: DockerRef | None  # the image's docker reference, for signedIdentity

    def __str__(self) -> str:
        return f"{self.transport}:{self.identity}" if self.identity else f"{self.transport or 'unknown'}:"


def scope_of(source_ref: str, oci_dir: str | None = None) -> Scope:
    """The policy scope of an image packed from ``source_ref`` (``oci_dir``: the layout directory, if known)."""
    if source_ref.startswith("docker://"):
        from .dockerref import DockerRef, identity as docker_identity, namespaces as docker_namespaces

        try:
            ref = DockerRef.parse(source_ref[len("docker://"):])
        except InvalidReference:
            return Scope("", "", [], None)
        return Scope("docker", docker_identity(ref), docker_namespaces(ref), ref)
    if source_ref.startswith("oci:"):
        d = oci_dir
        if d is None:
            rest = source_ref[4:]
            head, sep, tail = rest.rpartition(":")
            d = head if sep and "/" not in tail and not os.path.isdir(rest) else rest
        d = os.path.realpath(d) if os.path.exists(d) else os.path.normpath(os.path.abspath(d))
        spaces, p = [], d
        while p != "/" and "/" in p:
            spaces.append(p)
            p = p.rsplit("/", 1)[0] or "/"
        return Scope("oci", d, spaces, None)
    if source_ref.startswith("docker-archive:"):
        return Scope("docker-archive", "", [], None)
    return Scope("", "", [], None)


# -- evaluation ---------------------------------------------------------------------------
def _check_supported(policy: Policy, where: str, reqs: tuple[Requirement, ...], what: str) -> None:
    for r in reqs:
        if r.unsupported:
            raise PolicyInvalid(f"{what}: trust policy {policy.label} {where}: {r.unsupported}")


def accept(policy: Policy, req: Requirement, candidates: list[tuple[bytes, str]], intended: DockerRef | None,
            manifest_digest: str, what: str, none_msg: str) -> dict[str, Any]:
    """The record of the first candidate (payload, base64 signature) that satisfies ``req``: signed by one of
    its keys, for ``manifest_digest``, with an identity ``req.identity`` accepts.  Raises otherwise."""
    from . import sigstore  # only where signatures are read: it loads cryptography

    if not candidates:
        raise SignatureRequired(f"{what}: {none_msg}")
    keys = req.keys(policy.path)
    reasons: list[str] = []
    for payload, b64 in candidates:
        try:
            if not b64:
                raise SignatureInvalid(f"missing {sigstore.SIGNATURE_ANNOTATION} annotation")
            key, claim = sigstore.verify(keys, payload, b64)
            if not hmac.compare_digest(claim.manifest_digest, manifest_digest):
                raise SignatureInvalid(f"signature for digest {claim.manifest_digest} does not match "
                                       f"{manifest_digest}")
            if not req.identity.matches(intended, claim.docker_reference):
                raise SignatureInvalid(f"signature for identity {claim.docker_reference!r} is not accepted "
                                       f"({req.identity.type} of {intended or 'an image with no docker reference'})")
        except SignatureInvalid as e:
            reasons.append(str(e))
            continue
        return {"requirement": SIGSTORE, "key_id": key.key_id, "signed_identity": req.identity.to_json(),
                "docker_manifest_digest": claim.manifest_digest, "docker_reference": claim.docker_reference,
                "payload_digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
                "signature_digest": "sha256:" + hashlib.sha256(base64.b64decode(b64)).hexdigest(),
                "payload": base64.b64encode(payload).decode(), "signature": b64}
    if len(reasons) == 1:
        raise SignatureInvalid(f"{what}: {reasons[0]}")
    raise SignatureInvalid(f"{what}: none of the {len(reasons)} signatures was accepted: " + "; ".join(reasons))


def evaluate(policy: Policy, src: ImageSource) -> dict[str, Any]:
    """Check ``src`` against ``policy`` before anything of it is stored; the verification record
    to seal into its manifest.  Raises :class:`PolicyDenied` (or a subclass) or :class:`PolicyInvalid`."""
    from . import sigstore  # only where signatures are read: it loads cryptography

    scope = scope_of(src.ref, getattr(src, "path", None) if src.ref.startswith("oci:") else None)
    where, reqs = policy.requirements_for(scope)
    _check_supported(policy, where, reqs, src.ref)
    record: dict[str, Any] = {"v": RECORD_VERSION, "policy": policy.path, "scope": f"{scope.transport} {where}",
                              "identity": str(scope.docker_ref) if scope.docker_ref else None,
                              "manifest_digest": src.manifest_digest, "requirements": [r.type for r in reqs],
                              "signatures": []}
    for r in reqs:
        if r.type == REJECT:
            raise PolicyDenied(f"{src.ref}: rejected by trust policy {policy.label} ({where})")
        if r.type == SIGSTORE:
            client, repo = getattr(src, "client", None), getattr(src, "repo", None)
            if scope.transport == "docker" and client is not None and repo:
                atts = sigstore.fetch_attachments(client, repo, src.manifest_digest)
                none = f"a signature was required by {policy.label} ({where}), but no signature exists"
            else:
                atts = []
                none = (f"a signature was required by {policy.label} ({where}), but {scope.transport or 'this'}: "
                        f"sources carry no sigstore signatures")
            cands = [(a.payload, a.annotations.get(sigstore.SIGNATURE_ANNOTATION, "")) for a in atts]
            record["signatures"].append(accept(policy, r, cands, scope.docker_ref, src.manifest_digest,
                                                src.ref, none))
    return record


def _check_bound(m: Manifest, what: str) -> str:
    """The digest of the source manifest sealed in ``m``, after checking that its config and layer digests are
    ``m``'s own (a signature covers that manifest; the image must be what it describes)."""
    digest = "sha256:" + hashlib.sha256(m.source_manifest_bytes).hexdigest()
    try:
        doc = json.loads(m.source_manifest_bytes)
        cfg = doc["config"]["digest"]
        layers = [l["digest"] for l in doc["layers"]]
    except (ValueError, KeyError, TypeError):
        raise PolicyDenied(f"{what}: the recorded source manifest is not an image manifest") from None
    if cfg != m.config_digest or layers != [l.digest for l in m.layers]:
        raise PolicyDenied(f"{what}: the image's config or layers differ from its signed source manifest {digest}")
    return digest


def require(policy: Policy | None, m: Manifest, what: str) -> None:
    """Refuse (one line, a :class:`PolicyDenied` or :class:`PolicyInvalid`) an image whose recorded
    verification does not satisfy the node's ``policy`` for the image's recorded source.  Signatures are
    verified again, not trusted from the record.  ``policy`` None: nothing is required."""
    if policy is None:
        return
    source = str(m.source.get("ref") or "")
    scope = scope_of(source)
    where, reqs = policy.requirements_for(scope)
    _check_supported(policy, where, reqs, what)
    rec = m.verification or {}
    for r in reqs:
        if r.type == REJECT:
            raise PolicyDenied(f"{what}: rejected by the node's trust policy {policy.label} ({where}, source "
                               f"{source or 'unknown'})")
        if r.type != SIGSTORE:
            continue
        if rec and rec.get("v") != RECORD_VERSION:
            raise PolicyDenied(f"{what}: verification record version {rec.get('v')!r} is not supported")
        cands = []
        for s in rec.get("signatures") or []:
            try:
                cands.append((base64.b64decode(s["payload"], validate=True), str(s["signature"])))
            except (KeyError, TypeError, binascii.Error, ValueError):
                raise PolicyDenied(f"{what}: the recorded signature is malformed") from None
        if not cands:
            raise SignatureRequired(f"{what}: the node's trust policy {policy.label} ({where}) requires a sigstore "
                                    f"signature, and the image was packed without one ({describe(m.verification)})")
        accept(policy, r, cands, scope.docker_ref, _check_bound(m, what), what, "")


def describe(rec: dict[str, Any] | None) -> str:
    """One line saying what was verified at pack."""
    if not rec:
        return "no verification recorded"
    where = f"{rec.get('policy') or 'no policy file'}, {rec.get('scope')}"
    sigs = rec.get("signatures") or []
    if not sigs:
        return f"no signature verified (requirements {', '.join(rec.get('requirements') or []) or 'none'}; {where})"
    parts = [f"sigstoreSigned by key {s.get('key_id')} for {s.get('docker_manifest_digest')} as "
             f"{s.get('docker_reference')} (signature {s.get('signature_digest')})" for s in sigs]
    return "; ".join(parts) + f" ({where})"


__all__ = ["Policy", "Requirement", "SignedIdentity", "Scope", "NO_POLICY", "load_policy", "scope_of", "evaluate",
           "require", "accept", "describe", "user_policy_path"]
