"""The image manifest: everything needed to rebuild or lazily read an image.

Plaintext layout (format version 1, see docs/format.md)::

    b"CSMANIF\\0" | u32 version | u32 nsections | nsections x u64 length | sections
    section 0      JSON document (layers, config, file index, parameters)
    section 1      chunk table: N x (cid 32 | ckey 32 | phash 32 | size u32)
    other sections named by the JSON: raw config bytes, original manifest
                   bytes, per layer zstd(tar metadata), segment table and the
                   u32 chunk indices of its content stream

The whole plaintext is sealed (crypto.seal) under a random data key.
"""

from __future__ import annotations

import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .chunking import ChunkParams
from .crypto import ChunkIdentity
from .errors import CorruptObject, StoreFormatError
from .tarsplit import TarEntry, pack_segments, unpack_segments

MAGIC = b"CSMANIF\0"
FORMAT_VERSION = 1
_ROW = struct.Struct("<32s32s32sI")


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

    def __repr__(self) -> str:
        return f"<Manifest {self.name}:{self.tag} layers={len(self.layers)} chunks={len(self.chunks)}>"

    @property
    def logical_bytes(self) -> int:
        return sum(l.uncompressed_size for l in self.layers)

    def encode(self) -> bytes:
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
        sections[0] = json.dumps(doc, separators=(",", ":")).encode()
        head = MAGIC + struct.pack("<II", FORMAT_VERSION, len(sections))
        head += b"".join(struct.pack("<Q", len(s)) for s in sections)
        return head + b"".join(sections)

    @classmethod
    def decode(cls, b: bytes) -> Manifest:
        try:
            if b[:8] != MAGIC:
                raise CorruptObject("manifest: bad magic")
            version, n = struct.unpack_from("<II", b, 8)
            if version != FORMAT_VERSION:
                raise StoreFormatError(f"manifest format version {version} is not supported")
            lens = struct.unpack_from(f"<{n}Q", b, 16)
            pos = 16 + 8 * n
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
            chunks = [ChunkIdentity(*r) for r in _ROW.iter_unpack(table)]
            layers = []
            for l in doc["layers"]:
                idx = array("I")
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
                created=doc.get("created", ""),
            )
        except (struct.error, KeyError, IndexError, TypeError, ValueError) as e:
            raise CorruptObject(f"manifest is malformed ({type(e).__name__})") from None
