"""Image sources: an OCI image layout directory and a ``docker save`` archive.

A source yields the image's manifest, its exact config bytes and a verifying
stream per layer blob.  Nothing is held in memory but JSON documents.
"""

from __future__ import annotations

import json
import os
import platform
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import (
    ConvstoreError,
    CorruptLayer,
    DigestMismatch,
    InvalidReference,
    SourceError,
    SourceNotFound,
    UnsupportedMediaType,
)
from . import media
from .media import MAX_JSON, MAX_MANIFEST, VerifyingReader, check_digest, sha256_digest, verify_bytes


@dataclass(frozen=True, slots=True)
class LayerDescriptor:
    media_type: str
    digest: str | None  # digest of the blob as stored; None when the source has none
    size: int | None
    diff_id: str
    annotations: dict[str, str] | None = None

    @property
    def compression(self) -> str:
        return media.layer_compression(self.media_type)


class ImageSource(ABC):
    """One image read from somewhere.  Subclasses fill the fields in ``open``."""

    ref: str
    manifest_media_type: str
    manifest_bytes: bytes
    manifest_digest: str
    config_media_type: str
    config_bytes: bytes
    config_digest: str
    layers: list[LayerDescriptor]
    annotations: dict[str, str]

    @abstractmethod
    def open_layer(self, index: int) -> VerifyingReader:
        """A stream of layer ``index``'s blob that verifies digest and size."""

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def config(self) -> dict[str, Any]:
        return _loads(self.config_bytes, "image config")

    def _set_layers(self, manifest_layers: list[dict[str, Any]] | None) -> None:
        """Pair manifest layers with the config's diff_ids."""
        cfg = self.config
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list):
            raise SourceError(f"{self.ref}: image config has no rootfs.diff_ids")
        for d in diff_ids:
            check_digest(d)
        if manifest_layers is None:
            return
        if len(manifest_layers) != len(diff_ids):
            raise SourceError(f"{self.ref}: manifest has {len(manifest_layers)} layers but config has {len(diff_ids)} diff_ids")
        out = []
        for desc, diff_id in zip(manifest_layers, diff_ids):
            mt = desc.get("mediaType", "")
            media.layer_compression(mt)  # raises on an unknown media type
            out.append(LayerDescriptor(mt, check_digest(desc.get("digest")), int(desc.get("size", -1)), diff_id,
                                       desc.get("annotations")))
        self.layers = out


def _loads(b: bytes, what: str) -> Any:
    try:
        return json.loads(b)
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{what} is not valid JSON") from None


def _host_platform() -> tuple[str, str]:
    m = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)
    return "linux", arch


class OCILayoutSource(ImageSource):
    """``oci:DIR[:TAG]``: tag from ``org.opencontainers.image.ref.name``,
    default the only manifest in index.json."""

    def __init__(self, path: str, tag: str | None, *, digest: str | None = None):
        """``digest``: read the image whose (platform) manifest has this digest, whatever its tag."""
        self.path = path
        self.tag = tag
        self.ref = f"oci:{path}" + (f":{tag}" if tag else "")
        try:
            self._open(path, digest)
        except ConvstoreError:
            raise  # already says what is wrong (some are ValueErrors too)
        except (AttributeError, TypeError, ValueError, KeyError) as e:  # JSON of another shape than the spec's
            raise SourceError(f"{self.ref}: malformed image layout ({type(e).__name__}: {e})") from None

    def _open(self, path: str, digest: str | None) -> None:
        layout = os.path.join(path, "oci-layout")
        if not os.path.isfile(layout):
            raise SourceNotFound(f"{path}: not an OCI image layout (no oci-layout file)")
        ver = _loads(self._read_small(layout), "oci-layout").get("imageLayoutVersion")
        if ver != "1.0.0":
            raise UnsupportedMediaType(f"{path}: unsupported imageLayoutVersion {ver!r}")
        index = _loads(self._read_small(os.path.join(path, "index.json")), "index.json")
        manifests = index.get("manifests")
        if not isinstance(manifests, list):
            raise ValueError("index.json has no list of manifests")
        if digest is not None:
            desc = self._select_digest(manifests, digest)
        else:
            desc = self._resolve_index(self._select(manifests))
        self.manifest_media_type = desc.get("mediaType", "")
        self.manifest_bytes = self._read_blob(desc, MAX_MANIFEST)
        self.manifest_digest = desc["digest"]
        manifest = _loads(self.manifest_bytes, "image manifest")
        mt = manifest.get("mediaType") or self.manifest_media_type
        if mt not in (media.OCI_MANIFEST, media.DOCKER_MANIFEST):
            raise UnsupportedMediaType(f"{self.ref}: unsupported manifest media type {mt!r}")
        self.manifest_media_type = mt
        cdesc = manifest.get("config") or {}
        self.config_media_type = cdesc.get("mediaType", "")
        if self.config_media_type not in (media.OCI_CONFIG, media.DOCKER_CONFIG):
            raise UnsupportedMediaType(f"{self.ref}: unsupported config media type {self.config_media_type!r}")
        self.config_bytes = self._read_blob(cdesc, MAX_JSON)
        self.config_digest = cdesc["digest"]
        self.annotations = manifest.get("annotations") or {}
        self._set_layers(manifest.get("layers") or [])

    def _read_small(self, p: str, cap: int = MAX_JSON) -> bytes:
        try:
            with open(p, "rb") as f:
                b = f.read(cap + 1)
        except FileNotFoundError:
            raise SourceNotFound(f"{p}: no such file") from None
        except OSError as e:
            raise SourceError(f"{p}: {e.strerror}") from None
        if len(b) > cap:
            raise SourceError(f"{p}: larger than {cap} bytes")
        return b

    def _blob_path(self, digest: str) -> str:
        check_digest(digest)
        return os.path.join(self.path, "blobs", "sha256", digest.split(":", 1)[1])

    def _read_blob(self, desc: dict[str, Any], cap: int) -> bytes:
        """A JSON blob a descriptor names (at most ``cap`` bytes), checked against its digest and size."""
        digest = check_digest(desc.get("digest"))
        size = desc.get("size")
        if isinstance(size, int) and size > cap:
            raise SourceError(f"{self.ref}: blob {digest} is larger than {cap} bytes")
        return verify_bytes(self._read_small(self._blob_path(digest), cap), digest, size,
                            f"{self.ref}: blob {digest}")

    def _select(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        if self.tag is None:
            if len(manifests) != 1:
                tags = sorted(filter(None, ((m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
                                            for m in manifests)))
                raise InvalidReference(f"{self.path} holds {len(manifests)} images; name one with oci:DIR:TAG "
                                       f"(tags: {', '.join(tags) or 'none'})")
            return manifests[0]
        for m in manifests:
            if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == self.tag:
                return m
        raise SourceNotFound(f"{self.path}: no image tagged {self.tag!r}")

    def _select_digest(self, manifests: list[dict[str, Any]], digest: str) -> dict[str, Any]:
        """The index entry (followed to this host's platform) whose manifest is ``digest``."""
        for m in manifests:
            try:
                desc = self._resolve_index(m)
            except SourceError:
                continue
            if desc.get("digest") == digest:
                return desc
        raise SourceNotFound(f"{self.path}: no image with manifest {digest}")

    def _resolve_index(self, desc: dict[str, Any]) -> dict[str, Any]:
        """Follow an image index to the manifest for this host's platform."""
        for _ in range(4):
            if desc.get("mediaType") not in (media.OCI_INDEX, media.DOCKER_MANIFEST_LIST):
                return desc
            idx = _loads(self._read_blob(desc, MAX_MANIFEST), "image index")
            want_os, want_arch = _host_platform()
            for m in idx.get("manifests") or []:
                p = m.get("platform") or {}
                if p.get("os") == want_os and p.get("architecture") == want_arch:
                    desc = m
                    break
            else:
                raise SourceNotFound(f"{self.ref}: image index has no manifest for {want_os}/{want_arch}")
        raise SourceError(f"{self.ref}: image index nesting is too deep")

    def open_layer(self, index: int) -> VerifyingReader:
        d = self.layers[index]
        assert d.digest is not None
        p = self._blob_path(d.digest)
        try:
            f = open(p, "rb", buffering=0)
        except FileNotFoundError:
            raise SourceNotFound(f"{self.ref}: layer blob {d.digest} is missing") from None
        return VerifyingReader(f, d.digest, d.size, f"layer {d.digest}")


class DockerArchiveSource(ImageSource):
    """``docker-archive:FILE[:NAME:TAG]``, the ``docker save`` format."""

    def __init__(self, path: str, ref: str | None):
        self.path = path
        self.ref = f"docker-archive:{path}" + (f":{ref}" if ref else "")
        try:
            self._tar = tarfile.open(path, "r:")
        except FileNotFoundError:
            raise SourceNotFound(f"{path}: no such file") from None
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{path}: not a docker archive ({e})") from None
        try:
            self._members = {m.name.lstrip("./") if m.name.startswith("./") else m.name: m
                             for m in self._tar.getmembers() if m.isreg()}
            mf = _loads(self._member_bytes("manifest.json"), "manifest.json")
            if not isinstance(mf, list) or not mf:
                raise SourceError(f"{path}: manifest.json lists no image")
            entry = self._select(mf, ref)
            self.config_bytes = self._member_bytes(entry["Config"])
            self.config_digest = sha256_digest(self.config_bytes)
            want = os.path.basename(entry["Config"]).removesuffix(".json")
            if len(want) == 64:  # named by its digest (blobs/sha256/HEX, or HEX.json)
                verify_bytes(self.config_bytes, "sha256:" + want, None, f"{self.ref}: config {entry['Config']}")
            self.config_media_type = media.OCI_CONFIG
            self.manifest_media_type = media.OCI_MANIFEST
            self.manifest_bytes = json.dumps(entry, sort_keys=True).encode()
            self.manifest_digest = sha256_digest(self.manifest_bytes)
            self.annotations = {}
            self._set_layers(None)
            diff_ids = self.config["rootfs"]["diff_ids"]
            paths = entry.get("Layers") or []
            if len(paths) != len(diff_ids):
                raise SourceError(f"{self.ref}: {len(paths)} layers but {len(diff_ids)} diff_ids")
            self._layer_paths = paths
            layers = []
            for p, diff_id in zip(paths, diff_ids):
                m = self._member(p)
                f = self._tar.extractfile(m)
                assert f is not None
                comp = media.sniff_compression(f.read(4))
                name = os.path.basename(p)
                digest = "sha256:" + name if len(name) == 64 and p.startswith("blobs/sha256/") else None
                if comp == "none" and digest is None:
                    digest = diff_id  # an uncompressed layer's blob digest is its diff_id
                layers.append(LayerDescriptor(media.MEDIA_FOR_COMPRESSION[comp], digest, m.size, diff_id))
            self.layers = layers
        except (KeyError, TypeError) as e:
            self._tar.close()
            raise SourceError(f"{self.ref}: malformed manifest.json ({e})") from None
        except ConvstoreError:
            self._tar.close()
            raise

    def _select(self, mf: list[dict[str, Any]], ref: str | None) -> dict[str, Any]:
        if ref is None:
            if len(mf) != 1:
                raise InvalidReference(f"{self.path} holds {len(mf)} images; name one with docker-archive:FILE:NAME:TAG")
            return mf[0]
        for e in mf:
            tags = e.get("RepoTags") or []
            if ref in tags or f"{ref}:latest" in tags:
                return e
        raise SourceNotFound(f"{self.path}: no image tagged {ref!r}")

    def _member(self, name: str) -> tarfile.TarInfo:
        m = self._members.get(name)
        if m is None:
            raise SourceNotFound(f"{self.ref}: {name} is missing from the archive")
        return m

    def _member_bytes(self, name: str) -> bytes:
        m = self._member(name)
        if m.size > MAX_JSON:
            raise SourceError(f"{self.ref}: {name} is larger than {MAX_JSON} bytes")
        f = self._tar.extractfile(m)
        assert f is not None
        return f.read()

    def open_layer(self, index: int) -> VerifyingReader:
        d = self.layers[index]
        m = self._member(self._layer_paths[index])
        f = self._tar.extractfile(m)
        assert f is not None
        return VerifyingReader(f, d.digest, m.size, f"layer {self._layer_paths[index]}")  # type: ignore[arg-type]

    def close(self) -> None:
        self._tar.close()


class RegistrySource(ImageSource):
    """``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``: pulled through the
    distribution API, layers streamed and verified, never stored whole."""

    def __init__(self, spec: str, insecure: bool = False):
        from .registry_client import RegistryClient, RegistryCorrupt, RegistryError

        self.ref = spec
        rest = spec[len("docker://"):]
        host, _, path = rest.partition("/")
        if not host or not path:
            raise InvalidReference(f"{spec!r}: a registry source is docker://HOST[:PORT]/REPO[:TAG]")
        if "@" in path:  # REPO@DIGEST or REPO:TAG@DIGEST (the digest decides)
            repo, ref = path.split("@", 1)
            if ":" in repo.rsplit("/", 1)[-1]:
                repo = repo.rpartition(":")[0]
            check_digest(ref)
        else:
            repo, _, ref = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "latest")
        # plain HTTP only with --insecure, as for a registry store (loopback included: one rule)
        self.client = RegistryClient(host, insecure=insecure)
        self.repo = repo
        accept = [media.OCI_MANIFEST, media.DOCKER_MANIFEST, media.OCI_INDEX, media.DOCKER_MANIFEST_LIST]
        try:
            got = self.client.get_manifest(repo, ref, accept)
            if got is None:
                raise SourceNotFound(f"{spec}: no such image in the registry")
            body, mt, digest = got
            doc = _loads(body, "image manifest")
            mt = doc.get("mediaType") or mt
            if mt in (media.OCI_INDEX, media.DOCKER_MANIFEST_LIST):
                want_os, want_arch = _host_platform()
                sel = [m for m in doc.get("manifests") or []
                       if (m.get("platform") or {}).get("os") == want_os
                       and (m.get("platform") or {}).get("architecture") == want_arch]
                if not sel:
                    raise SourceNotFound(f"{spec}: no manifest for {want_os}/{want_arch}")
                # the index entry's digest and size pin the platform manifest
                got = self.client.get_manifest(repo, check_digest(sel[0].get("digest")), accept,
                                               expect_size=sel[0].get("size"))
                if got is None:
                    raise SourceNotFound(f"{spec}: manifest {sel[0]['digest']} is missing")
                body, mt, digest = got
                doc = _loads(body, "image manifest")
                mt = doc.get("mediaType") or mt
            if mt not in (media.OCI_MANIFEST, media.DOCKER_MANIFEST):
                raise UnsupportedMediaType(f"{spec}: unsupported manifest media type {mt!r}")
            self.manifest_bytes, self.manifest_media_type, self.manifest_digest = body, mt, digest
            cdesc = doc.get("config") or {}
            self.config_media_type = cdesc.get("mediaType", "")
            if self.config_media_type not in (media.OCI_CONFIG, media.DOCKER_CONFIG):
                raise UnsupportedMediaType(f"{spec}: unsupported config media type {self.config_media_type!r}")
            self.config_digest = check_digest(cdesc.get("digest"))
            try:
                self.config_bytes = self.client.get_blob(repo, self.config_digest, size=cdesc.get("size"),
                                                         max_bytes=MAX_JSON)
            except KeyError:
                raise SourceNotFound(f"{spec}: config blob {self.config_digest} is missing") from None
            self.annotations = doc.get("annotations") or {}
            self._set_layers(doc.get("layers") or [])
        except RegistryCorrupt as e:
            raise DigestMismatch(f"{spec}: {e}") from None
        except RegistryError as e:
            raise SourceError(str(e)) from None
        except ConvstoreError:
            raise  # already says what is wrong (some are ValueErrors too)
        except (AttributeError, TypeError, ValueError, KeyError) as e:  # JSON of another shape than the spec's
            raise SourceError(f"{spec}: malformed manifest or index ({type(e).__name__}: {e})") from None

    def open_layer(self, index: int) -> VerifyingReader:
        from .registry_client import RegistryError

        d = self.layers[index]
        assert d.digest is not None
        try:
            raw = self.client.open_blob(self.repo, d.digest, d.size)
        except KeyError:
            raise SourceNotFound(f"{self.ref}: layer blob {d.digest} is missing") from None
        except RegistryError as e:
            raise SourceError(str(e)) from None
        return VerifyingReader(raw, d.digest, d.size, f"layer {d.digest}")


def parse_source(spec: str, insecure: bool = False) -> ImageSource:
    """Open ``oci:DIR[:TAG]``, ``docker-archive:FILE[:NAME:TAG]`` or
    ``docker://HOST[:PORT]/REPO[:TAG]``."""
    if spec.startswith("docker://"):
        return RegistrySource(spec, insecure=insecure)
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InvalidReference(f"{spec!r}: a source is oci:DIR[:TAG], docker-archive:FILE[:NAME:TAG] or "
                               f"docker://HOST/REPO[:TAG]")
    if kind == "oci":
        path, tag = _split_path_ref(rest, os.path.isdir)
        return OCILayoutSource(path, tag)
    if kind == "docker-archive":
        path, tag = _split_path_ref(rest, os.path.isfile)
        return DockerArchiveSource(path, tag)
    raise InvalidReference(f"{spec!r}: unknown source transport {kind!r} (use oci:, docker-archive: or docker://)")


def open_at_digest(spec: str, manifest_digest: str, insecure: bool = False) -> ImageSource | None:
    """``spec`` read at ``manifest_digest`` instead of its tag, where the transport can address a
    manifest by digest (a registry: ``REPO@DIGEST``; an OCI layout: the index entry with that
    manifest), keeping ``spec`` as its name; None where it cannot (a docker archive).  Raises
    :class:`SourceNotFound` if the source no longer holds that manifest.  What is read is still
    hashed: the caller compares its digest."""
    check_digest(manifest_digest)
    if spec.startswith("docker://"):
        host, _, path = spec[len("docker://"):].partition("/")
        repo = path.split("@", 1)[0]
        if "@" not in path and ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rpartition(":")[0]
        src: ImageSource = RegistrySource(f"docker://{host}/{repo}@{manifest_digest}", insecure=insecure)
    elif spec.startswith("oci:"):
        path, tag = _split_path_ref(spec[len("oci:"):], os.path.isdir)
        src = OCILayoutSource(path, tag, digest=manifest_digest)
    else:
        return None
    src.ref = spec
    return src


def _split_path_ref(rest: str, exists: Any) -> tuple[str, str | None]:
    """Split PATH[:REF] like skopeo: the longest existing prefix is the path."""
    if exists(rest):
        return rest, None
    i = rest.find(":")
    while i >= 0:
        if exists(rest[:i]):
            return rest[:i], rest[i + 1 :] or None
        i = rest.find(":", i + 1)
    path, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    raise SourceNotFound(f"{path or rest}: no such file or directory")


def layer_stream(source: ImageSource, index: int) -> tuple[VerifyingReader, BinaryIO]:
    """(raw verifying reader, decompressed reader) for one layer."""
    raw = source.open_layer(index)
    d = source.layers[index]
    return raw, media.open_decompressed(raw, d.compression, f"layer {d.digest or index}")  # type: ignore[arg-type]


__all__ = ["ImageSource", "OCILayoutSource", "DockerArchiveSource", "LayerDescriptor", "parse_source",
           "open_at_digest", "layer_stream", "CorruptLayer"]
