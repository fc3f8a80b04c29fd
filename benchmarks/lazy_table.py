"""Lazy start against unpack-then-run, through a simulated remote store.

    sudo python3 benchmarks/lazy_table.py [--images base app1 ...]

For each corpus image and each (latency, bandwidth) setting, in one run:
cold lazy start (``run_image``: FUSE + runc, empty chunk cache), the same
with the recorded start-up profile prefetched, and ``unpack --rootfs`` then
runc on the unpacked tree, all reading through the same ``SlowStore``.
Also read amplification, warm random 4 KiB reads through ImageFS, and a
cold sequential read of a large file through the FUSE mount.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus_bench import CORPUS_DIR, IMAGES, ensure_corpus, new_store  # noqa: E402

import convstore  # noqa: E402
from convstore.reader import ImageFS  # noqa: E402
from convstore.reader.fuse import BackgroundMount  # noqa: E402
from convstore.engines.run import _runc_bundle, process_spec, run_image  # noqa: E402
from convstore.reader.imagefs import PREFETCH_ON_OPEN  # noqa: E402

SETTINGS = [(0.002, 200e6), (0.020, 100e6)]


def lazy_run(store: convstore.Store, ref: str, prefetch: bool) -> tuple[float, dict, int]:
    fs = ImageFS.from_store(store, ref, prefetch_on_open=PREFETCH_ON_OPEN)  # a fresh, empty chunk cache
    t = time.perf_counter()
    r = run_image(store, ref, fs=fs, prefetch=prefetch, record=not prefetch, runtime="runc",
                  stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    fs.close()
    assert r.exit_code == 0, r
    return dt, r.fetch, r.fuse_read_bytes


def unpack_then_run(store: convstore.Store, ref: str, work: Path) -> float:
    root = work / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    t = time.perf_counter()
    store.unpack_rootfs(ref, str(root))
    with ImageFS.from_store(store, ref) as fs:
        import json

        proc = process_spec(fs, json.loads(fs.manifest.config_bytes), None)
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir()
    _runc_bundle(str(bundle), str(root), proc, shutil.which("runc") or "runc", "bench")
    subprocess.run(["runc", "run", "--bundle", str(bundle), f"bench-{os.getpid()}"], check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    shutil.rmtree(root)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", nargs="*", default=IMAGES)
    args = ap.parse_args()
    ensure_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        base = new_store(w / "s")
        for img in args.images:
            base.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest")
        rows = []
        amp = None
        for lat, bw in SETTINGS:
            for img in args.images:
                ref = f"{img}:latest"
                size = base.entry(ref).logical_bytes
                slow = base.throttled(lat, bw)
                cold, fetch, fuse_bytes = lazy_run(slow, ref, prefetch=False)  # also records the profile
                prof, pfetch, _ = lazy_run(slow, ref, prefetch=True)
                full = unpack_then_run(slow, ref, w)
                if img == "app1" and amp is None:
                    amp = (fetch["plain_bytes_fetched"] / fuse_bytes, fetch["bytes_fetched"] / fuse_bytes)
                rows.append((f"{lat * 1e3:g} ms / {bw / 1e6:g} MB/s", img, size, fetch["bytes_fetched"],
                             fetch["plain_bytes_fetched"], cold, prof, full))
        print("\n| store | image | image MB | fetched MB (stored / plain) | plain % of image | lazy cold s "
              "| lazy + profile s | unpack then run s | unpack / lazy | lazy / profile |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for st, img, size, fb, pb, cold, prof, full in rows:
            print(f"| {st} | {img} | {size / 1e6:.1f} | {fb / 1e6:.1f} / {pb / 1e6:.1f} | {100 * pb / size:.1f} % "
                  f"| {cold:.2f} | {prof:.2f} | {full:.2f} | {full / cold:.1f}x | {cold / prof:.1f}x |")
        if amp:
            print(f"\nread amplification, app1 start: {amp[0]:.2f} plaintext bytes fetched per byte read through "
                  f"FUSE ({amp[1]:.2f} counting stored, compressed bytes)")

        # warm random 4 KiB reads through ImageFS (local store)
        with ImageFS.from_store(base, "app1:latest" if "app1" in args.images else f"{args.images[0]}:latest") as fs:
            path, node = max(((p, n) for p, n in fs.walk("/") if n.layer >= 0), key=lambda x: x[1].size)
            f = fs.open(path).raw
            f.read()  # warm
            rnd = random.Random(1)
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 2.0:
                f.seek(rnd.randrange(0, node.size - 4096))
                f.read(4096)
                n += 1
            print(f"\nwarm random 4 KiB reads through ImageFS ({path}, {node.size / 1e6:.1f} MB): "
                  f"{n / (time.perf_counter() - t):,.0f} per second")

        # cold sequential read of a large file through FUSE, local store
        from imagebuilder import Entry, make_tar, write_oci

        rnd = random.Random(2)
        blob = b"".join(rnd.randbytes(4096) + bytes(4096) for _ in range(256 * 1024 * 1024 // 8192))
        write_oci(str(w / "big"), [make_tar([Entry("big.bin", data=blob)])], compression="none")
        del blob
        base.pack(f"oci:{w / 'big'}", "big:1")
        with ImageFS.from_store(base, "big:1") as fs, BackgroundMount(fs, str(w / "mnt")):
            t = time.perf_counter()
            total = 0
            with open(w / "mnt" / "big.bin", "rb", buffering=0) as fh:
                while True:
                    b = fh.read(1 << 20)
                    if not b:
                        break
                    total += len(b)
            dt = time.perf_counter() - t
            print(f"sequential cold read of a {total / 1e6:.0f} MB file through the FUSE mount (local store): "
                  f"{total / 1e6 / dt:.0f} MB/s")


if __name__ == "__main__":
    main()
