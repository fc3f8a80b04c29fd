"""Unpack: rebuild exact layer tars from chunks and write an OCI image layout.

Every rebuilt tar is hashed on the way out and must match its diff_id before
its blob is renamed into place; index.json is replaced last, atomically, so
an interrupted unpack never leaves a tag pointing at a partial image.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard
from isal import igzip_threaded

from .errors import ConvstoreError, CorruptLayer, DigestMismatch, InvalidReference, SourceError
from .manifest import LayerRecord, Manifest
from .oci import media
from .progress import NoProgress, Progress
from .core.repository import Repository
from .tarsplit import join_tar
from .writeback import Writeback


def iter_content(store: Repository, manifest: Manifest, layer: LayerRecord, pool: ThreadPoolExecutor,
                 lookahead: int = 16) -> Iterator[bytes]:
    """The layer's file-content stream, chunk by chunk, fetched and decrypted
    ``lookahead`` chunks ahead in ``pool``."""
    chunks = store.chunks
    what = f"image {manifest.name}:{manifest.tag}"

    def fetch(i: int) -> bytes:
        return chunks.read(manifest.chunks[i], what, manifest.hint(i))[0]

    q: deque[Future[bytes]] = deque()
    it = iter(layer.chunks)
    for i in it:
        q.append(pool.submit(fetch, i))
        if len(q) >= lookahead:
            break
    while q:
        data = q.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            q.append(pool.submit(fetch, nxt))
        yield data


def iter_layer_tar(store: Repository, manifest: Manifest, layer: LayerRecord,
                   pool: ThreadPoolExecutor) -> Iterator[memoryview | bytes]:
    """The layer's exact uncompressed tar, in pieces."""
    return join_tar(layer.segments, layer.metadata(), iter_content(store, manifest, layer, pool))


class _HashingFile:
    """A write-only file object that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO, hash: bool = True):
        self.f = f
        self.h = hashlib.sha256() if hash else None
        self.n = 0
        self._writeback = Writeback(f.fileno())  # the blob is fsynced before it is named

    def write(self, b: Any) -> int:
        if self.h is not None:
            self.h.update(b)
        self.f.write(b)
        self.n += len(b)
        self._writeback.wrote(self.n)
        return len(b)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        pass


@dataclass
class UnpackResult:
    ref: str
    dest: str
    manifest_digest: str
    layers: int
    logical_bytes: int
    written_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _write_layer(store: Repository, manifest: Manifest, layer: LayerRecord, compression: str, blobs: str,
                 pool: ThreadPoolExecutor, progress: Progress) -> tuple[str, int]:
    """Write one layer blob into ``blobs`` and return (digest, size)."""
    tmp = os.path.join(blobs, f".tmp-{secrets.token_hex(8)}")
    diff = hashlib.sha256()
    try:
        with open(tmp, "wb") as raw:
            # An uncompressed blob is the tar itself: its digest is the diff hash.
            out = _HashingFile(raw, hash=compression != "none")
            if compression == "gzip":
                comp: Any = igzip_threaded.open(out, "wb", compresslevel=1, threads=2, block_size=1 << 20)
            elif compression == "zstd":
                comp = zstandard.ZstdCompressor(level=3, threads=2).stream_writer(out, closefd=False)  # type: ignore[arg-type]
            else:
                comp = out
            # the diff_id hash runs in its own thread (hashlib releases the GIL),
            # beside the writes and the tar joining; one buffer in flight
            with ThreadPoolExecutor(1, thread_name_prefix="convstore-hash") as hasher:
                hashing = None

                def emit(b: bytearray) -> None:
                    nonlocal hashing
                    if hashing is not None:
                        hashing.result()
                    hashing = hasher.submit(diff.update, b)
                    comp.write(b)
                    progress.advance(len(b))

                buf = bytearray()
                for piece in iter_layer_tar(store, manifest, layer, pool):
                    buf += piece  # coalesce headers and small files into large writes
                    if len(buf) >= 1 << 20:
                        emit(buf)
                        buf = bytearray()
                emit(buf)
                if hashing is not None:
                    hashing.result()
            if comp is not out:
                comp.close()
            raw.flush()
            os.fsync(raw.fileno())
        got = "sha256:" + diff.hexdigest()
        if not hmac.compare_digest(got, layer.diff_id):
            raise DigestMismatch(f"rebuilt layer hashes to {got}, expected diff_id {layer.diff_id}")
        digest = got if out.h is None else "sha256:" + out.h.hexdigest()
        os.rename(tmp, os.path.join(blobs, digest.split(":", 1)[1]))
        return digest, out.n
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_blob(blobs: str, data: bytes) -> str:
    digest = media.sha256_digest(data)
    path = os.path.join(blobs, digest.split(":", 1)[1])
    if not os.path.exists(path):
        tmp = os.path.join(blobs, f".tmp-{secrets.token_hex(8)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    return digest


def parse_oci_dest(spec: str) -> tuple[str, str | None]:
    if not spec.startswith("oci:") or len(spec) <= 4:
        raise InvalidReference(f"{spec!r}: the destination is oci:DIR[:TAG]")
    rest = spec[4:]
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag:
        return rest, None
    return path, tag


def unpack_oci(store: Repository, ref: str, dest: str, *, compress: str | None = None, workers: int | None = None,
               progress: Progress | None = None) -> UnpackResult:
    """Write image ``ref`` into the OCI layout ``dest`` (``oci:DIR[:TAG]``).

    ``compress`` is ``none``, ``gzip``, ``zstd`` or None (each layer as it was).
    """
    import time

    t0 = time.perf_counter()
    if compress is not None and compress not in media.COMPRESSIONS:
        raise InvalidReference(f"unknown compression {compress!r} (none, gzip or zstd)")
    path, tag = parse_oci_dest(dest)
    entry, manifest = store.open_image(ref)
    tag = tag or entry.ref.tag
    progress = progress or NoProgress()
    index_path = os.path.join(path, "index.json")
    layout_path = os.path.join(path, "oci-layout")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(layout_path):
        raise SourceError(f"{path} exists and is not an OCI image layout")
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    written = 0
    descs = []
    progress.start(f"unpacking {entry.ref}", manifest.logical_bytes)
    try:
        with ThreadPoolExecutor(max(2, os.cpu_count() or 2) if workers is None else workers,
                                thread_name_prefix="convstore-unpack") as pool:
            for layer in manifest.layers:
                comp = compress or layer.compression
                digest, size = _write_layer(store, manifest, layer, comp, blobs, pool, progress)
                written += size
                d: dict[str, Any] = {"mediaType": media.MEDIA_FOR_COMPRESSION[comp], "digest": digest, "size": size}
                if layer.annotations:
                    d["annotations"] = layer.annotations
                descs.append(d)
    finally:
        progress.finish()
    config_digest = _write_blob(blobs, manifest.config_bytes)
    if config_digest != manifest.config_digest:
        raise DigestMismatch(f"stored config hashes to {config_digest}, expected {manifest.config_digest}")
    oci_manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media.OCI_MANIFEST,
        "config": {"mediaType": media.OCI_CONFIG, "digest": config_digest, "size": len(manifest.config_bytes)},
        "layers": descs,
    }
    if manifest.annotations:
        oci_manifest["annotations"] = manifest.annotations
    mbytes = json.dumps(oci_manifest, indent=2).encode()
    mdigest = _write_blob(blobs, mbytes)
    _update_index(path, index_path, layout_path, {
        "mediaType": media.OCI_MANIFEST, "digest": mdigest, "size": len(mbytes),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }, tag)
    return UnpackResult(str(entry.ref), f"oci:{path}:{tag}", mdigest, len(descs), manifest.logical_bytes,
                        written, time.perf_counter() - t0)


def _update_index(path: str, index_path: str, layout_path: str, desc: dict[str, Any], tag: str) -> None:
    if not os.path.exists(layout_path):
        _atomic_write(layout_path, b'{"imageLayoutVersion":"1.0.0"}')
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        try:
            with open(index_path, "rb") as f:
                index = json.load(f)
        except ValueError:
            raise CorruptLayer(f"{index_path} is not valid JSON; refusing to overwrite it") from None
    index["manifests"] = [m for m in index.get("manifests", [])
                          if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append(desc)
    _atomic_write(index_path, json.dumps(index, indent=2).encode())


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["unpack_oci", "iter_content", "iter_layer_tar", "UnpackResult", "ConvstoreError"]
