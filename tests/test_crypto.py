"""The convergent chunk construction and sealing."""

from __future__ import annotations

import os

import pytest

from convstore import crypto
from convstore.crypto import ChunkIdentity, decrypt_chunk, domain_chunk_key, encrypt_chunk, identify_chunk
from convstore.errors import CorruptObject


@pytest.fixture
def dkey() -> bytes:
    return domain_chunk_key(os.urandom(32))


def test_convergent_and_deterministic(dkey):
    p = os.urandom(100_000) + b"a" * 100_000
    a, b = identify_chunk(p, dkey), identify_chunk(p, dkey)
    assert a == b
    assert encrypt_chunk(p, a, 3) == encrypt_chunk(p, b, 3)
    assert decrypt_chunk(encrypt_chunk(p, a, 3), a) == p


def test_domains_do_not_share_ids():
    p = b"same content" * 1000
    a = identify_chunk(p, domain_chunk_key(os.urandom(32)))
    b = identify_chunk(p, domain_chunk_key(os.urandom(32)))
    assert a.cid != b.cid and a.ckey != b.ckey


def test_cid_and_key_are_independent(dkey):
    ident = identify_chunk(b"x" * 5000, dkey)
    assert ident.cid != ident.ckey and len(ident.cid) == len(ident.ckey) == 32


def test_incompressible_is_stored_raw(dkey):
    p = os.urandom(70_000)
    blob = encrypt_chunk(p, identify_chunk(p, dkey), 3)
    assert blob[4] == crypto.CODEC_RAW
    q = b"z" * 70_000
    assert encrypt_chunk(q, identify_chunk(q, dkey), 3)[4] == crypto.CODEC_ZSTD


def test_nonce_depends_on_encrypted_bytes(dkey):
    """Two encoders giving different bodies for one chunk must not reuse a nonce."""
    p = b"abc" * 10_000
    ident = identify_chunk(p, dkey)
    lvl1, lvl19 = encrypt_chunk(p, ident, 1), encrypt_chunk(p, ident, 19)
    assert lvl1[5:17] != lvl19[5:17] or lvl1 == lvl19
    assert decrypt_chunk(lvl1, ident) == decrypt_chunk(lvl19, ident) == p


def test_tamper_and_swap_fail(dkey):
    p, q = os.urandom(5000), os.urandom(5000)
    ip, iq = identify_chunk(p, dkey), identify_chunk(q, dkey)
    blob = bytearray(encrypt_chunk(p, ip, 3))
    blob[-1] ^= 1
    with pytest.raises(CorruptObject):
        decrypt_chunk(bytes(blob), ip)
    # a blob stored under another chunk's name fails (AAD binds the name)
    with pytest.raises(CorruptObject):
        decrypt_chunk(encrypt_chunk(q, iq, 3), ChunkIdentity(ip.cid, iq.ckey, iq.phash, iq.size))


def test_planted_chunk_is_detected(dkey):
    """Someone who knows P (and so ckey) plants other content under cid: the
    manifest's plaintext hash catches it."""
    p = b"real content" * 500
    ident = identify_chunk(p, dkey)
    evil = b"evil content" * 500
    forged = encrypt_chunk(evil, ChunkIdentity(ident.cid, ident.ckey, ident.phash, len(evil)), 0)
    with pytest.raises(CorruptObject, match="does not match"):
        decrypt_chunk(forged, ident)


def test_repr_hides_key(dkey):
    ident = identify_chunk(b"secret" * 100, dkey)
    assert ident.ckey.hex() not in repr(ident)


def test_seal_unseal():
    key = os.urandom(32)
    sealed = crypto.seal(b"manifest" * 100, key, b"ctx")
    assert crypto.unseal(sealed, key, b"ctx", "m") == b"manifest" * 100
    with pytest.raises(CorruptObject):
        crypto.unseal(sealed, key, b"other ctx", "m")
    with pytest.raises(CorruptObject):
        crypto.unseal(sealed, os.urandom(32), b"ctx", "m")
