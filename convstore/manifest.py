"""The image manifest: everything needed to rebuild or lazily read an image.

Plaintext layout (format version 2, see docs/format.md; version 1, without
location hints, is still read)::

    b"CSMANIF\\0" | u32 version | u32 nsections | nsections x u64 length | sections
    section 0      JSON document (layers, config, file index, parameters; the
                   optional trust-policy verification record)
    section 1      chunk table: N x (cid 32 | ckey 32 | phash 32 | size u32)
    other sections named by the JSON: raw config bytes, original manifest
                   bytes, per layer zstd(tar metadata), segment table and the
                   u32 chunk indices of its content stream; location hints:
                   N x (u32 container | u64 offset | u32 length), the
                   containers listed in the JSON (u32 0xffffffff: no hint)

The whole plaintext is sealed (crypto.seal) under a random data key.
"""

from __future__ import annotations

import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zstandard

from .chunking import ChunkParams
from .crypto import ChunkIdentity
from .errors import CorruptObject, StoreFormatError
from .stores.base import Location

if TYPE_CHECKING:
    from .tarsplit import TarEntry

MAGIC = b"CSMANIF\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_ROW = struct.Struct("<32s32s32sI")
_LOC = struct.Struct("<IQI")
_NO_HINT = 0xFFFFFFFF


ROW_SIZE = _ROW.size  # a chunk-table row: cid at 0, plaintext size (u32) at ROW_SIZE_AT
ROW_SIZE_AT = 96  # after cid, ckey and phash (3 x 32 bytes)


def _section_lengths(b: bytes) -> tuple[int, ...]:
    """Check the magic and version of an encoded manifest; its section lengths."""
    if b[:8] != MAGIC:
        raise CorruptObject("manifest: bad magic")
    version, n = struct.unpack_from("<II", b, 8)
    if version not in READABLE_VERSIONS:
        raise StoreFormatError(f"manifest format version {version} is not supported")
    return struct.unpack_from(f"<{n}Q", b, 16)


def chunk_table(b: bytes) -> memoryview:
    """The chunk table (section 1) of an encoded manifest, without decoding
    the rest (gc and stats read only this)."""
    try:
        lens = _section_lengths(b)
        n = len(lens)
        start = 16 + 8 * n + lens[0]
        if n < 2 or start + lens[1] > len(b) or lens[1] % _ROW.size:
            raise CorruptObject("manifest: bad chunk table")
        return memoryview(b)[start : start + lens[1]]
    except (struct.error, IndexError) as e:
        raise CorruptObject(f"manifest is malformed ({type(e).__name__})") from None


@dataclass
class LayerRecord:
    media_type: str
    digest: str | None
    size: int | None
    diff_id: str
    uncompressed_size: int
    content_size: int
    meta: bytes  # zstd-compressed tar metadata
    segments: list[tuple[int, int]]
    chunks: array  # indices into Manifest.chunks, in content-stream order
    entries: list[TarEntry]
    annotations: dict[str, str] | None = None

    @property
    def compression(self) -> str:
        from .oci.media import layer_compression

        return layer_compression(self.media_type)

    def metadata(self) -> bytes:
        return zstandard.ZstdDecompressor().decompress(self.meta, max_output_size=1 << 31) if self.meta else b""


@dataclass
class Manifest:
    name: str
    tag: str
    source: dict[str, Any]
    chunking: ChunkParams
    compression_level: int
    domain: dict[str, Any]
    config_media_type: str
    config_digest: str
    config_bytes: bytes
    source_manifest_media_type: str
    source_manifest_bytes: bytes
    annotations: dict[str, str]
    layers: list[LayerRecord] = field(default_factory=list)
    chunks: list[ChunkIdentity] = field(default_factory=list)
    created: str = ""
    #: where each chunk of ``chunks`` was stored when the manifest was written
    #: (hints: checked on use, see convstore.stores.base.Location); may be empty
    locations: list[Location | None] = field(default_factory=list)
    #: what the trust policy verified at pack (convstore.oci.policy.evaluate: its own version "v");
    #: None in manifests written before it existed, which read as "no verification recorded"
    verification: dict[str, Any] | None = None

    def hint(self, i: int) -> Location | None:
        return self.locations[i] if i < len(self.locations) else None

    def hints(self) -> dict[bytes, Location]:
        return {c.cid: h for c, h in zip(self.chunks, self.locations) if h is not None}

    def __repr__(self) -> str:
        return f"<Manifest {self.name}:{self.tag} layers={len(self.layers)} chunks={len(self.chunks)}>"

    @property
    def logical_bytes(self) -> int:
        return sum(l.uncompressed_size for l in self.layers)

    def encode(self) -> bytes:
        from .tarsplit import pack_segments  # here, as in decode: a run's imports (docs/benchmarks.md)

        sections: list[bytes] = [b"", b"".join(_ROW.pack(c.cid, c.ckey, c.phash, c.size) for c in self.chunks)]

        def add(b: bytes) -> int:
            sections.append(b)
            return len(sections) - 1

        doc = {
            "format": "convstore-manifest",
            "version": FORMAT_VERSION,
            "name": self.name,
            "tag": self.tag,
            "created": self.created,
            "source": self.source,
            "chunking": self.chunking.to_json(),
            "compression_level": self.compression_level,
            "domain": self.domain,
            "config": {"media_type": self.config_media_type, "digest": self.config_digest,
                       "section": add(self.config_bytes)},
            "source_manifest": {"media_type": self.source_manifest_media_type,
                                "section": add(self.source_manifest_bytes)},
            "annotations": self.annotations,
            "layers": [
                {
                    "media_type": l.media_type, "digest": l.digest, "size": l.size, "diff_id": l.diff_id,
                    "uncompressed_size": l.uncompressed_size, "content_size": l.content_size,
                    "annotations": l.annotations,
                    "meta_section": add(l.meta),
                    "segments_section": add(pack_segments(l.segments)),
                    "chunks_section": add(l.chunks.tobytes()),
                    "files": [e.to_row() for e in l.entries],
                }
                for l in self.layers
            ],
        }
        if self.verification is not None:
            doc["verification"] = self.verification
        if self.locations:
            containers: dict[bytes, int] = {}
            rows = []
            for h in self.locations:
                if h is None:
                    rows.append(_LOC.pack(_NO_HINT, 0, 0))
                else:
                    rows.append(_LOC.pack(containers.setdefault(h[0], len(containers)), h[1], h[2]))
            doc["locations"] = {"containers": [c.hex() for c in containers], "section": add(b"".join(rows))}
        sections[0] = json.dumps(doc, separators=(",", ":")).encode()
        head = MAGIC + struct.pack("<II", FORMAT_VERSION, len(sections))
        head += b"".join(struct.pack("<Q", len(s)) for s in sections)
        return head + b"".join(sections)

    @classmethod
    def decode(cls, b: bytes, head_only: bool = False) -> Manifest:
        """``head_only``: the image's identity, source, config, verification and layer digests, without
        its files, chunks and locations (empty): for a run on a kept mount, which reads no chunk."""
        try:
            lens = _section_lengths(b)
            pos = 16 + 8 * len(lens)
            sections = []
            for ln in lens:
                sections.append(b[pos : pos + ln])
                pos += ln
            if pos != len(b):
                raise CorruptObject("manifest: section lengths do not add up")
            doc = json.loads(sections[0])
            table = sections[1]
            if len(table) % _ROW.size:
                raise CorruptObject("manifest: chunk table has a bad length")
            chunks = [] if head_only else [ChunkIdentity(*r) for r in _ROW.iter_unpack(table)]
            locations: list[Location | None] = []
            if doc.get("locations") and not head_only:
                containers = [bytes.fromhex(c) for c in doc["locations"]["containers"]]
                loc_rows = sections[doc["locations"]["section"]]
                if len(loc_rows) != _LOC.size * len(chunks):
                    raise CorruptObject("manifest: location hints have a bad length")
                locations = [None if ci == _NO_HINT else (containers[ci], off, ln)
                             for ci, off, ln in _LOC.iter_unpack(loc_rows)]
            verification = doc.get("verification")
            if verification is not None and not isinstance(verification, dict):
                raise CorruptObject("manifest: the verification record is not an object")
            layers = []
            if not head_only:
                # here: a run on a kept mount decodes only the head, and imports no tarfile
                from .tarsplit import TarEntry, unpack_segments
            for l in doc["layers"]:
                idx = array("I")
                if head_only:
                    layers.append(LayerRecord(l["media_type"], l["digest"], l["size"], l["diff_id"],
                                              l["uncompressed_size"], l["content_size"], b"", [], idx, [],
                                              l.get("annotations")))
                    continue
                idx.frombytes(sections[l["chunks_section"]])
                layers.append(LayerRecord(
                    l["media_type"], l["digest"], l["size"], l["diff_id"], l["uncompressed_size"],
                    l["content_size"], sections[l["meta_section"]],
                    unpack_segments(sections[l["segments_section"]]), idx,
                    [TarEntry.from_row(r) for r in l["files"]], l.get("annotations")))
            return cls(
                name=doc["name"], tag=doc["tag"], source=doc["source"],
                chunking=ChunkParams.from_json(doc["chunking"]),
                compression_level=doc["compression_level"], domain=doc["domain"],
                config_media_type=doc["config"]["media_type"], config_digest=doc["config"]["digest"],
                config_bytes=sections[doc["config"]["section"]],
                source_manifest_media_type=doc["source_manifest"]["media_type"],
                source_manifest_bytes=sections[doc["source_manifest"]["section"]],
                annotations=doc.get("annotations") or {}, layers=layers, chunks=chunks,
                created=doc.get("created", ""), locations=locations, verification=verification,
            )
        except (struct.error, KeyError, IndexError, TypeError, ValueError) as e:
            raise CorruptObject(f"manifest is malformed ({type(e).__name__})") from None
