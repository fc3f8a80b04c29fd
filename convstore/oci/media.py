"""OCI and Docker media types, digests and streaming (de)compression."""

from __future__ import annotations

import hashlib
import hmac
import io
import re
from collections.abc import Callable
from typing import Any, BinaryIO

import zstandard

from ..errors import CorruptLayer, DigestMismatch, UnsupportedMediaType

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

# media type -> compression ("none" | "gzip" | "zstd")
LAYER_COMPRESSION = {
    LAYER_TAR: "none",
    LAYER_GZIP: "gzip",
    LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
MEDIA_FOR_COMPRESSION = {"none": LAYER_TAR, "gzip": LAYER_GZIP, "zstd": LAYER_ZSTD}
COMPRESSIONS = tuple(MEDIA_FOR_COMPRESSION)

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")

#: The largest manifest or image index convstore reads, from a registry or an OCI layout: the OCI
#: distribution spec's limit (registries SHOULD accept manifests up to 4 MiB; clients may refuse more).
MAX_MANIFEST = 4 << 20
#: The largest other JSON document (image config, index.json, oci-layout, manifest.json of a docker
#: archive): a config is a blob, which the spec does not bound; 16 MiB is four times the manifest limit
#: (the largest config among common images is under 100 kB).
MAX_JSON = 16 << 20


def layer_compression(media_type: str) -> str:
    try:
        return LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedMediaType(f"unsupported layer media type {media_type!r}") from None


def check_digest(digest: object) -> str:
    """Only sha256 digests: what every registry and tool interoperates on."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise UnsupportedMediaType(f"unsupported or malformed digest {digest!r} (only sha256 is accepted)")
    return digest


def chain_ids(diff_ids: list[str]) -> list[tuple[str, str]]:
    """(chain ID, parent chain ID or "") of each layer: the OCI names containerd gives layer snapshots."""
    out, parent = [], ""
    for d in diff_ids:
        chain = d if not parent else "sha256:" + hashlib.sha256(f"{parent} {d}".encode()).hexdigest()
        out.append((chain, parent))
        parent = chain
    return out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, digest: str, size: object, what: str) -> bytes:
    """``data`` if it hashes to ``digest`` and, where a descriptor gives one, has ``size`` bytes.

    The one check for every digest convstore is given or reads (a pin, a
    descriptor, an index entry); :class:`DigestMismatch` naming ``what`` otherwise.
    """
    check_digest(digest)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or len(data) != size):
        raise DigestMismatch(f"{what}: {len(data)} bytes, but its descriptor says {size!r}")
    got = sha256_digest(data)
    if not hmac.compare_digest(got, digest):
        raise DigestMismatch(f"{what}: content hashes to {got}, expected {digest}")
    return data


def sniff_compression(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


class VerifyingReader(io.RawIOBase):
    """Hashes what it passes on and checks digest and size at end of stream.

    Reading past the declared size or ending short raises at once, so a
    corrupt or hostile blob can never be consumed silently.
    """

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None, what: str):
        self._raw = raw
        self._h = hashlib.sha256()
        self._digest = digest
        self._size = size
        self._n = 0
        self._what = what
        self.verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        if self._size is not None:
            # Read one byte more than declared to detect an oversized blob.
            b = memoryview(b)[: max(0, min(len(b), self._size + 1 - self._n))]
            if len(b) == 0:
                raise DigestMismatch(f"{self._what}: blob is larger than its declared size {self._size}")
        n = self._raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            self._h.update(b[:n])
            self._n += n
            if self._size is not None and self._n > self._size:
                raise DigestMismatch(f"{self._what}: blob is larger than its declared size {self._size}")
        else:
            self._finish()
        return n or 0

    def _finish(self) -> None:
        if self.verified:
            return
        if self._size is not None and self._n != self._size:
            raise CorruptLayer(f"{self._what}: blob is truncated ({self._n} of {self._size} bytes)")
        if self._digest is not None:
            got = "sha256:" + self._h.hexdigest()
            if not hmac.compare_digest(got, self._digest):
                raise DigestMismatch(f"{self._what}: content hashes to {got}, expected {self._digest}")
        self.verified = True

    def drain(self) -> None:
        """Read to the end (e.g. bytes after a compressed stream) and verify."""
        buf = bytearray(1 << 16)
        while self.readinto(memoryview(buf)):
            pass

    @property
    def bytes_read(self) -> int:
        return self._n

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class HashingReader(io.RawIOBase):
    """Counts and sha256-hashes a decompressed stream (for the diff_id).
    ``hash=False`` only counts (an uncompressed blob is already hashed)."""

    def __init__(self, raw: BinaryIO, hash: bool = True):
        self._raw = raw
        self.h = hashlib.sha256() if hash else None
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            if self.h is not None:
                self.h.update(memoryview(b)[:n])
            self.n += n
        return n or 0


def open_decompressed(raw: BinaryIO, compression: str, what: str) -> BinaryIO:
    """A streaming reader of the decompressed layer.  gzip runs on isal in its
    own thread (multi-member aware); zstd reads across frames."""
    if compression == "gzip":
        from isal import igzip, igzip_threaded  # here: only layers are gzip (a run's imports, docs/benchmarks.md)

        return _ErrorMapping(igzip_threaded.open(raw, "rb", threads=1, block_size=1 << 20),  # type: ignore
                             what, igzip.BadGzipFile)
    if compression == "zstd":
        d = zstandard.ZstdDecompressor()
        return _ErrorMapping(d.stream_reader(raw, read_size=1 << 20, read_across_frames=True),  # type: ignore
                             what, zstandard.ZstdError)
    if compression == "none":
        return raw
    raise UnsupportedMediaType(f"unsupported compression {compression!r}")


class _ErrorMapping(io.RawIOBase):
    """Maps decompressor exceptions (and ``corrupt``, the decompressor's own) to :class:`CorruptLayer`."""

    def __init__(self, inner: BinaryIO, what: str, corrupt: type[Exception]):
        self._inner = inner
        self._what = what
        self._errors = (EOFError, OSError, corrupt)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(b) or 0  # type: ignore[attr-defined]
        except (DigestMismatch, CorruptLayer):
            raise
        except self._errors as e:
            raise CorruptLayer(f"{self._what}: compressed stream is corrupt or truncated ({e})") from None

    def close(self) -> None:
        try:
            self._inner.close()
        except Exception:
            pass
        super().close()


def no_duplicate_keys(error: Callable[[str], Exception]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` object_pairs_hook that refuses a key given twice (``error(message)``):
    signature payloads and policy files are parsed as strictly as containers/image parses them."""
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise error(f"duplicate key {k!r}")
            d[k] = v
        return d
    return hook
