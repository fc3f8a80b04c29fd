"""Master-key rotation cost does not grow with image size: rekey 1 and then 5
corpus images, and show that no pack (chunk) file changed.

    python3 benchmarks/rekey_table.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus_bench import CORPUS_DIR, IMAGES, ensure_corpus  # noqa: E402

import convstore  # noqa: E402


def mtimes(root: str) -> dict[str, int]:
    d = os.path.join(root, "packs")
    return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)}


def main() -> None:
    ensure_corpus()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for images in (IMAGES[:1], IMAGES):
            root = f"{tmp}/s{len(images)}"
            s = convstore.Store.open(root, f"file:{tmp}/k{len(images)}/old.key")
            for img in images:
                s.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest")
            before = mtimes(root)
            logical = sum(e.logical_bytes for e in s.images())
            t = time.perf_counter()
            r = s.rekey(f"file:{tmp}/k{len(images)}/new.key")
            dt = time.perf_counter() - t
            unchanged = mtimes(root) == before
            os.unlink(f"{tmp}/k{len(images)}/old.key")
            s2 = convstore.Store.open(root, f"file:{tmp}/k{len(images)}/new.key")
            ok = s2.verify().clean
            rows.append((len(images), logical, len(before), r.images, r.domains, r.layer_records, dt, unchanged, ok))
    print("| images | logical MB | pack files | re-wrapped images / domains / layer records | rekey s "
          "| pack files untouched | verifies with only the new key |")
    print("|---|---|---|---|---|---|---|")
    for n, logical, packs, im, dom, lay, dt, unchanged, ok in rows:
        print(f"| {n} | {logical / 1e6:.1f} | {packs} | {im} / {dom} / {lay} | {dt:.3f} | {unchanged} | {ok} |")


if __name__ == "__main__":
    main()
