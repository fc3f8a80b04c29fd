"""Shared helpers for the corpus benchmarks: the reference command
(``zstd -3 -T2`` over the same uncompressed layer bytes) and convstore's
pack / unpack runs, each timed in this process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import convstore
from convstore.oci.sources import ImageSource, layer_stream, parse_source

CORPUS_DIR = Path(os.environ.get("CONVSTORE_CORPUS", Path.home() / ".cache" / "convstore-corpus"))
BUILDER = Path(__file__).resolve().parents[1] / "scripts" / "build_images.py"
IMAGES = ["base", "app1", "app2", "app1-rebuilt", "base-prev"]


def ensure_corpus() -> None:
    if not all((CORPUS_DIR / i / "index.json").exists() for i in IMAGES):
        subprocess.run([sys.executable, str(BUILDER), "--out", str(CORPUS_DIR)], check=True)


def write_layer_tars(src: ImageSource, path_of: Callable[[int], Path]) -> list[Path]:
    """Write each layer of ``src`` as a plain tar at ``path_of(index)`` (kept if already there)."""
    out = []
    for i in range(len(src.layers)):
        p = path_of(i)
        if not p.exists():
            raw, dec = layer_stream(src, i)
            with open(p, "wb") as f:
                shutil.copyfileobj(dec, f, 1 << 20)
            dec.close()
            raw.drain()
        out.append(p)
    return out


def uncompressed_layers(workdir: Path, images: list[str]) -> list[Path]:
    """Write each image's layers as plain tars (the bytes zstd is timed on)."""
    out = []
    for img in images:
        src = parse_source(f"oci:{CORPUS_DIR / img}:latest")
        out += write_layer_tars(src, lambda i: workdir / f"{img}-L{i}.tar")
    return out


def time_zstd(files: list[Path]) -> float:
    """Seconds for ``zstd -3 -T2`` over the concatenation of ``files`` (page cache warm)."""
    for f in files:  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    t = time.perf_counter()
    cat = subprocess.Popen(["cat", *map(str, files)], stdout=subprocess.PIPE)
    subprocess.run(["zstd", "-3", "-T2", "-q", "-c"], stdin=cat.stdout, stdout=subprocess.DEVNULL, check=True)
    cat.wait()
    return time.perf_counter() - t


def new_store(root: Path) -> convstore.Store:
    if root.exists():
        shutil.rmtree(root)
    return convstore.Store.open(str(root / "store"), f"file:{root / 'key'}")


def pack_images(store: convstore.Store, images: list[str], tag_suffix: str = "", **kw: object) -> tuple[float, int]:
    """(seconds, uncompressed bytes) for packing ``images`` one after another."""
    t = time.perf_counter()
    n = 0
    for img in images:
        r = store.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest{tag_suffix}", **kw)  # type: ignore[arg-type]
        n += r.logical_bytes
    return time.perf_counter() - t, n


def unpack_images(store: convstore.Store, images: list[str], dest: Path, mode: str) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for img in images:
        d = dest / f"{img}-{mode}"
        if d.exists():
            shutil.rmtree(d)
        if mode == "rootfs":
            store.unpack_rootfs(f"{img}:latest", str(d))
        else:
            store.unpack_oci(f"{img}:latest", f"oci:{d}:latest", compress=mode)
        n += store.entry(f"{img}:latest").logical_bytes
    return time.perf_counter() - t, n


def peak_rss_pack(image: str) -> int:
    """Peak RSS (bytes) of a fresh process packing ``image`` into an empty store."""
    with tempfile.TemporaryDirectory() as d:
        code = (
            "import resource, sys, convstore;"
            f"s = convstore.Store.open({d!r} + '/store', 'file:' + {d!r} + '/key');"
            f"s.pack('oci:{CORPUS_DIR / image}:latest', 'x:1');"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024
