"""pytest-benchmark suite on the real corpus (``pytest benchmarks/ --benchmark-only``).

Each benchmark reports seconds; MB/s = the uncompressed bytes in
``extra_info`` divided by the mean.  ``pack_table.py`` prints the side-by-side
ratios against ``zstd -3 -T2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_bench import (  # noqa: E402
    CORPUS_DIR,
    IMAGES,
    ensure_corpus,
    new_store,
    pack_images,
    time_zstd,
    uncompressed_layers,
    unpack_images,
)


@pytest.fixture(scope="module", autouse=True)
def _corpus():
    ensure_corpus()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    s = new_store(tmp_path_factory.mktemp("packed"))
    pack_images(s, IMAGES)
    return s


def test_zstd_reference_corpus(benchmark, tmp_path):
    files = uncompressed_layers(tmp_path, IMAGES)
    benchmark.extra_info["bytes"] = sum(f.stat().st_size for f in files)
    benchmark.pedantic(time_zstd, args=(files,), rounds=3)


def test_pack_cold_one_image(benchmark, tmp_path):
    def run():
        return pack_images(new_store(tmp_path / "s"), ["app1"])

    benchmark.extra_info["bytes"] = benchmark.pedantic(run, rounds=3)[1]


def test_pack_cold_corpus(benchmark, tmp_path):
    def run():
        return pack_images(new_store(tmp_path / "s"), IMAGES)

    benchmark.extra_info["bytes"] = benchmark.pedantic(run, rounds=3)[1]


@pytest.mark.parametrize("reuse", [True, False], ids=["layer-reuse", "chunk-path"])
def test_pack_warm_corpus(benchmark, packed, reuse):
    n = [0]

    def run():
        for img in IMAGES:
            n[0] += packed.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:warm", reuse_layers=reuse).logical_bytes

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["bytes"] = n[0] // 3


@pytest.mark.parametrize("mode", ["none", "gzip", "rootfs"])
def test_unpack_corpus(benchmark, packed, tmp_path, mode):
    benchmark.extra_info["bytes"] = benchmark.pedantic(
        unpack_images, args=(packed, IMAGES, tmp_path, mode), rounds=3)[1]
