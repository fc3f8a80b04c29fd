"""Pack / unpack throughput on the corpus beside ``zstd -3 -T2``, one run.

    python3 benchmarks/pack_table.py [--rounds 3]

Every figure is MB/s of uncompressed layer data (10^6 B/s), best of the
rounds; convstore and zstd are timed alternately in the same process so the
ratio is fair on a noisy machine.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_bench import (  # noqa: E402
    IMAGES,
    ensure_corpus,
    new_store,
    pack_images,
    peak_rss_pack,
    time_zstd,
    uncompressed_layers,
    unpack_images,
)

COLD_IMAGE = "app1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ensure_corpus()
    best: dict[str, float] = {}

    def record(name: str, seconds: float, nbytes: int) -> None:
        best[name] = max(best.get(name, 0.0), nbytes / 1e6 / seconds)

    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        cold_files = uncompressed_layers(w, [COLD_IMAGE])
        all_files = uncompressed_layers(w, IMAGES)
        cold_bytes = sum(f.stat().st_size for f in cold_files)
        all_bytes = sum(f.stat().st_size for f in all_files)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            record("zstd -3 -T2, one image", time_zstd(cold_files), cold_bytes)
            s = new_store(w / "cold")
            record("pack cold, one image", *pack_images(s, [COLD_IMAGE]))
            s = new_store(w / "cold1")
            record("pack cold, one image, --level 1", *pack_images(s, [COLD_IMAGE], level=1))
            record("zstd -3 -T2, corpus", time_zstd(all_files), all_bytes)
            s = new_store(w / "all")
            record("pack cold, whole corpus", *pack_images(s, IMAGES))
            stats = s.stats().to_json()
            record("pack warm, whole corpus (layer reuse)", *pack_images(s, IMAGES, tag_suffix="-again"))
            record("pack warm, whole corpus (chunk path)", *pack_images(s, IMAGES, tag_suffix="-chunks",
                                                                         reuse_layers=False))
            record("unpack to OCI, none", *unpack_images(s, IMAGES, w / "out", "none"))
            record("unpack to OCI, original compression", *unpack_images(s, IMAGES, w / "out", None))  # type: ignore[arg-type]
            record("unpack rootfs", *unpack_images(s, IMAGES, w / "out", "rootfs"))
        rss = peak_rss_pack("app1")

    z1, za = best["zstd -3 -T2, one image"], best["zstd -3 -T2, corpus"]
    targets = {"pack cold, one image": (z1, 0.8), "pack cold, one image, --level 1": (z1, 0.8),
               "pack cold, whole corpus": (za, 0.8),
               "pack warm, whole corpus (layer reuse)": (za, 3.0),
               "pack warm, whole corpus (chunk path)": (za, 3.0), "unpack to OCI, none": (za, 2.0),
               "unpack to OCI, original compression": (za, None), "unpack rootfs": (za, None)}
    print(f"\nbest of {args.rounds} rounds; MB/s of uncompressed layer data\n")
    print("| run | MB/s | x zstd -3 -T2 | target |")
    print("|---|---|---|---|")
    print(f"| zstd -3 -T2, one image ({COLD_IMAGE}) | {z1:.0f} | 1.00 | |")
    print(f"| zstd -3 -T2, corpus | {za:.0f} | 1.00 | |")
    for name, (ref, target) in targets.items():
        ratio = best[name] / ref
        t = "" if target is None else (f">= {target}x " + ("PASS" if ratio >= target else "MISS"))
        print(f"| {name} | {best[name]:.0f} | {ratio:.2f} | {t} |")
    print(f"\nstore after packing the five corpus images once: logical {stats['logical_bytes'] / 1e6:.1f} MB, unique plaintext "
          f"{stats['unique_plaintext_bytes'] / 1e6:.1f} MB, stored {stats['stored_bytes'] / 1e6:.1f} MB "
          f"(chunks {stats['stored_chunk_bytes'] / 1e6:.1f}, manifests {stats['stored_manifest_bytes'] / 1e6:.1f}), "
          f"dedup {stats['dedup_ratio']}x")
    print(f"\npeak RSS packing app1 (largest layer 77.6 MB) in a fresh process: {rss / 2**20:.0f} MiB "
          f"(target < 300 MB: {'PASS' if rss < 300e6 else 'MISS'})")


if __name__ == "__main__":
    main()
