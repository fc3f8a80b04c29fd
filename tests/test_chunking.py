"""Chunk boundaries are storage format: deterministic, buffer-independent."""

from __future__ import annotations

import io
import os
import random

import pytest

from convstore.chunking import ChunkParams, StreamChunker
from convstore.errors import CorruptLayer


def chunks_of(data_files: list[bytes], buffer_size: int, params: ChunkParams = ChunkParams()) -> list[bytes]:
    out: list[bytes] = []
    c = StreamChunker(params, out.append, buffer_size=buffer_size)
    for f in data_files:
        c.feed_file(io.BytesIO(f), len(f))
    c.cut()
    return out


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    rnd = random.Random(7)
    return [rnd.randbytes(rnd.choice([10, 500, 5000, 40_000, 70_000, 300_000, 2_000_000])) for _ in range(40)]


def test_boundaries_do_not_depend_on_buffer_size(files):
    a = chunks_of(files, 1 << 20)
    b = chunks_of(files, 8 << 20)
    c = chunks_of(files, (1 << 20) + 12345)
    assert a == b == c
    assert b"".join(a) == b"".join(files)


def test_sizes_within_limits(files):
    p = ChunkParams()
    cs = chunks_of(files, 8 << 20)
    assert max(len(c) for c in cs) <= p.max_size
    sizes = [len(c) for c in cs]
    assert sum(sizes) / len(sizes) > p.min_size


def test_large_file_chunks_same_in_any_context(files):
    big = os.urandom(1_500_000)
    a = chunks_of([b"prefix" * 100, big, b"tail"], 1 << 20)
    b = chunks_of([os.urandom(12345), big], 1 << 20)
    assert set(chunks_of([big], 1 << 20)) <= set(a) & set(b)


def test_insertion_resynchronises():
    base = os.urandom(3_000_000)
    edited = base[:1_000_000] + b"INSERTED" + base[1_000_000:]
    a = set(chunks_of([base[:50_000]] + [base[50_000:]], 1 << 20))
    b = chunks_of([edited[:50_000]] + [edited[50_000:]], 1 << 20)
    shared = sum(len(c) for c in b if c in a)
    assert shared > 0.9 * len(base)


def test_short_stream_is_an_error():
    c = StreamChunker(ChunkParams(), lambda b: None)
    with pytest.raises(CorruptLayer):
        c.feed_file(io.BytesIO(b"abc"), 10)
