"""A short coverage-guided fuzzing run of the parsers (tests/fuzz_parsers.py),
seeded with valid inputs of each kind, in the normal test run."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from blake3 import blake3
from imagebuilder import Entry, make_tar, rich_layer

from convstore.stores.index import encode_midx, record
from convstore.stores.packs import encode_index

HARNESS = Path(__file__).with_name("fuzz_parsers.py")


def seeds(d: Path) -> None:
    from convstore.chunking import ChunkParams
    from convstore.crypto import ChunkIdentity
    from convstore.manifest import Manifest

    cids = [blake3(bytes([i])).digest() for i in range(5)]
    m = Manifest(name="n", tag="t", source={}, chunking=ChunkParams(), compression_level=3, domain={},
                 config_media_type="c", config_digest="d", config_bytes=b"{}", source_manifest_media_type="m",
                 source_manifest_bytes=b"{}", annotations={}, chunks=[ChunkIdentity(c, c, c, 9) for c in cids],
                 locations=[(b"\1" * 16, 10, 9)] * 5)
    samples = {
        0: [make_tar([Entry("a", data=b"x" * 700), Entry("d", "dir"), Entry("l", "symlink", linkname="a")]),
            rich_layer()[:20000]],
        1: [m.encode()],
        2: [m.encode()],
        3: [b'{"a": 1, "mac": "00"}'],
        4: [encode_index({c: (i * 10, 9) for i, c in enumerate(cids)})],
        5: [encode_midx(sorted(record(c, b"\2" * 16, i, 9) for i, c in enumerate(cids)))],
        6: [b"CSRX" + struct.pack("<I", 1) + bytes(32) + b"".join(c + struct.pack("<QI", 0, 9) for c in cids)],
    }
    for kind, items in samples.items():
        for i, s in enumerate(items):
            (d / f"seed-{kind}-{i}").write_bytes(bytes([kind]) + s)


def test_the_parsers_survive_a_short_fuzzing_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds(corpus)
    p = subprocess.run([sys.executable, str(HARNESS), "-runs=200000", "-timeout=10", "-rss_limit_mb=1024",
                        f"-artifact_prefix={tmp_path}/", str(corpus)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Done 200000 runs" in p.stderr, p.stderr[-500:]  # it really ran
