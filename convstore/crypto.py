"""Convergent chunk encryption and manifest sealing.

This is the hazmat layer: every function here is deterministic or takes its
randomness from ``os.urandom``, and every failure to authenticate raises the
one opaque :class:`~convstore.errors.CorruptObject` (no detail that could act
as an oracle).  The construction and the reasons for it are in
``docs/security.md``; the byte layouts are in ``docs/format.md``.

Chunk construction (format version 1)::

    K_dom         = blake3(S_dom, derive_key_context="convstore v1 chunk id+key")
    cid || ckey   = blake3(P, key=K_dom).digest(64)        # one pass, 64-byte XOF
    phash         = blake3(P)                               # reader-side integrity
    body          = zstd(P) if it pays, else P
    nonce         = blake3(body, key=blake3(ckey, derive_key_context=NONCE_CTX))[:12]
    header        = b"CSC" || version || codec || nonce
    blob          = header || AES-256-GCM(ckey, nonce, body, aad=header || cid)
"""

from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass

import zstandard
from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import CorruptObject, StoreFormatError

CHUNK_MAGIC = b"CSC"
CHUNK_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
CHUNK_HEADER_LEN = len(CHUNK_MAGIC) + 1 + 1 + 12  # magic, version, codec, nonce
TAG_LEN = 16

DOMAIN_KEY_CTX = "convstore v1 chunk id+key"
NONCE_CTX = "convstore v1 chunk nonce"
LAYER_INDEX_CTX = "convstore v1 layer index"

SEAL_MAGIC = b"CSS"
SEAL_VERSION = 1
SEAL_HEADER_LEN = len(SEAL_MAGIC) + 1 + 12

# A chunk is never larger than FastCDC's max size (16 MiB hard limit of the
# chunker); refuse to decompress anything that claims to be bigger.
MAX_CHUNK_PLAIN = 16 << 20
# A sealed manifest of a 10 GiB image with 64 KiB chunks is ~20 MB; allow 1 GiB.
MAX_SEALED_PLAIN = 1 << 30

_tls = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """ZstdCompressor is not thread-safe: keep one per thread and level."""
    cache = getattr(_tls, "compressors", None)
    if cache is None:
        cache = _tls.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "decompressor", None)
    if d is None:
        d = _tls.decompressor = zstandard.ZstdDecompressor()
    return d


def domain_chunk_key(domain_secret: bytes) -> bytes:
    """Derive the keyed-hash key for chunk ids and chunk keys from S_dom."""
    if len(domain_secret) != 32:
        raise ValueError("domain secret must be 32 bytes")
    return blake3(domain_secret, derive_key_context=DOMAIN_KEY_CTX).digest()


def domain_layer_key(domain_secret: bytes) -> bytes:
    """Derive the keyed-hash key that names layer-index records from S_dom."""
    return blake3(domain_secret, derive_key_context=LAYER_INDEX_CTX).digest()


def layer_index_name(layer_key: bytes, diff_id: str) -> str:
    """A layer-index record's name: a PRF of the diff_id, so the store holder
    cannot test whether a known public layer is stored."""
    return blake3(diff_id.encode(), key=layer_key).hexdigest()


@dataclass(frozen=True, slots=True)
class ChunkIdentity:
    """What the manifest records about one chunk.  ``ckey`` is secret."""

    cid: bytes
    ckey: bytes = b""
    phash: bytes = b""
    size: int = 0

    def __repr__(self) -> str:  # never print ckey
        return f"ChunkIdentity(cid={self.cid.hex()}, size={self.size})"


def identify_chunk(plain: bytes | memoryview, domain_key: bytes) -> ChunkIdentity:
    """The dedup fast path: one keyed pass and one plain pass over ``plain``."""
    out = blake3(plain, key=domain_key).digest(64)
    return ChunkIdentity(cid=out[:32], ckey=out[32:], phash=blake3(plain).digest(), size=len(plain))


def chunk_nonce(ckey: bytes, body: bytes | memoryview) -> bytes:
    """A synthetic nonce: the same key never meets two different bodies under
    one nonce, even when two zstd builds compress the same chunk differently."""
    nkey = blake3(ckey, derive_key_context=NONCE_CTX).digest()
    return blake3(body, key=nkey).digest(12)


def encrypt_chunk(plain: bytes | memoryview, ident: ChunkIdentity, level: int) -> bytes:
    """Compress (when it pays) and encrypt one chunk into its stored blob."""
    codec, body = CODEC_RAW, plain
    if level > 0:
        z = _zstd_compressor(level).compress(plain)
        # Keep raw bytes when compression saves less than 1/32.
        if len(z) < len(plain) - (len(plain) >> 5):
            codec, body = CODEC_ZSTD, z
    nonce = chunk_nonce(ident.ckey, body)
    header = CHUNK_MAGIC + bytes((CHUNK_VERSION, codec)) + nonce
    return header + AESGCM(ident.ckey).encrypt(nonce, bytes(body), header + ident.cid)


def decrypt_chunk(blob: bytes, ident: ChunkIdentity) -> bytes:
    """Authenticate, decrypt and decompress one stored chunk, and check that
    it holds the plaintext the manifest names (defeats planted chunks)."""
    if len(blob) < CHUNK_HEADER_LEN + TAG_LEN or blob[:3] != CHUNK_MAGIC:
        raise CorruptObject(f"chunk {ident.cid.hex()}: not a convstore chunk")
    version, codec = blob[3], blob[4]
    header = blob[:CHUNK_HEADER_LEN]
    nonce = blob[5:CHUNK_HEADER_LEN]
    # authenticate first (the header is in the AAD): a flipped version or codec byte is corruption,
    # which self-healing quarantines; only an authentic blob of another version is a format error
    try:
        body = AESGCM(ident.ckey).decrypt(nonce, blob[CHUNK_HEADER_LEN:], header + ident.cid)
    except InvalidTag:
        raise CorruptObject(f"chunk {ident.cid.hex()}: authentication failed") from None
    if version != CHUNK_VERSION:
        raise StoreFormatError(f"chunk {ident.cid.hex()}: format version {version} is not supported")
    if codec == CODEC_ZSTD:
        try:
            plain = _zstd_decompressor().decompress(body, max_output_size=MAX_CHUNK_PLAIN)
        except zstandard.ZstdError:
            raise CorruptObject(f"chunk {ident.cid.hex()}: bad compressed body") from None
    elif codec == CODEC_RAW:
        plain = body
    else:
        raise StoreFormatError(f"chunk {ident.cid.hex()}: unknown codec {codec}")
    if len(plain) != ident.size or not hmac.compare_digest(blake3(plain).digest(), ident.phash):
        raise CorruptObject(f"chunk {ident.cid.hex()}: content does not match the manifest")
    return plain


def seal(plaintext: bytes, key: bytes, aad: bytes) -> bytes:
    """Seal a manifest or record: zstd, then AES-256-GCM with a random nonce."""
    nonce = os.urandom(12)
    header = SEAL_MAGIC + bytes((SEAL_VERSION,)) + nonce
    body = _zstd_compressor(3).compress(plaintext)
    return header + AESGCM(key).encrypt(nonce, body, header + aad)


def unseal(sealed: bytes, key: bytes, aad: bytes, what: str) -> bytes:
    if len(sealed) < SEAL_HEADER_LEN + TAG_LEN or sealed[:3] != SEAL_MAGIC:
        raise CorruptObject(f"{what}: not a sealed convstore object")
    if sealed[3] != SEAL_VERSION:
        raise StoreFormatError(f"{what}: seal version {sealed[3]} is not supported")
    header = sealed[:SEAL_HEADER_LEN]
    try:
        body = AESGCM(key).decrypt(sealed[4:SEAL_HEADER_LEN], sealed[SEAL_HEADER_LEN:], header + aad)
    except InvalidTag:
        raise CorruptObject(f"{what}: authentication failed") from None
    try:
        return _zstd_decompressor().decompress(body, max_output_size=MAX_SEALED_PLAIN)
    except zstandard.ZstdError:
        raise CorruptObject(f"{what}: bad compressed body") from None
