"""Coverage-guided fuzzing (atheris/libFuzzer) of the parsers that read
stored or downloaded bytes: the tar splitter, the manifest decoder and its
chunk-table reader, stored JSON, the pack index, the multi-pack index and a
registry's index segment.  Each must either accept its input or refuse it
with a convstore error -- never crash, hang or raise anything else.

    .venv/bin/python tests/fuzz_parsers.py -max_total_time=600 fuzz-corpus/   # a longer run
    (tests/test_fuzz.py runs it for a few seconds in the normal test run)
"""

from __future__ import annotations

import io
import sys

import atheris

with atheris.instrument_imports():
    from convstore.core.authmeta import parse_json
    from convstore.errors import ConvstoreError, CorruptLayer
    from convstore.manifest import Manifest, chunk_table
    from convstore.stores.index import SortedIndex
    from convstore.stores.packs import decode_index
    from convstore.stores.packindex import _decode_segment
    from convstore.tarsplit import join_tar, split_tar, unpack_segments


def _tar(data: bytes) -> None:
    meta: list[bytes] = []
    content: list[bytes] = []

    def take(r: io.BufferedIOBase, n: int) -> None:
        b = r.read(n)
        if len(b) != n:  # what the real sink (StreamChunker.feed_from) does with a short stream
            raise CorruptLayer("tar stream ends inside a file's contents")
        content.append(b)

    res = split_tar(io.BufferedReader(io.BytesIO(data)), meta.append, take)  # type: ignore[arg-type]
    out = b"".join(join_tar(res.segments, b"".join(meta), iter(content)))
    if out != data:
        raise AssertionError("split + join did not give the same bytes back")


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 7, data[1:]
    try:
        if kind == 0:
            _tar(body)
        elif kind == 1:
            Manifest.decode(body)
        elif kind == 2:
            chunk_table(body)
        elif kind == 3:
            parse_json(body, "fuzz")
        elif kind == 4:
            decode_index(body, "fuzz")
        elif kind == 5:
            idx = SortedIndex.from_bytes(body, "fuzz")
            idx.find(bytes(32))
            idx.find(b"\xff" * 32)
            sum(1 for _ in idx.entries())
            idx.bucket_cids(0)
        else:
            _decode_segment(body, "fuzz")
            unpack_segments(body)
    except ConvstoreError:
        pass  # refused, by name: what a parser should do with bad bytes


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
