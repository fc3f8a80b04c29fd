"""convstore against a real registry on loopback, beside skopeo, one run.

    sudo python3 benchmarks/registry_table.py

Starts Debian's docker-registry on 127.0.0.1, then for the corpus: skopeo
copy of each image (OCI layout -> registry), convstore push and pull of the
same images, and a lazy start (`convstore run`, empty cache) against the
registry.  Also measures the storage choice: one blob per chunk against one
packed blob read with HTTP ranges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus_bench import CORPUS_DIR, IMAGES, ensure_corpus  # noqa: E402
from kms_fixtures import Registry  # noqa: E402

CLI = [sys.executable, "-m", "convstore.cli", "--quiet", "--insecure"]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, check=True)


def main() -> None:
    ensure_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        reg = Registry(w / "registry")
        try:
            env = dict(os.environ, CONVSTORE_STORE=str(w / "store"), CONVSTORE_KEY=f"file:{w / 'key'}")
            url = f"oci://{reg.host}/cs"
            rows = []
            for img in IMAGES:
                size = json.loads(subprocess.run(
                    [sys.executable, "-c", "import sys,json; from convstore.oci.sources import parse_source;"
                     "s=parse_source(sys.argv[1]); print(sum(d.size for d in s.layers))",
                     f"oci:{CORPUS_DIR / img}:latest"], capture_output=True, text=True, check=True).stdout)
                t = time.perf_counter()
                subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{CORPUS_DIR / img}:latest",
                                f"docker://{reg.host}/sk/{img}:latest"], check=True, capture_output=True)
                sk_push = time.perf_counter() - t
                t = time.perf_counter()
                subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{reg.host}/sk/{img}:latest",
                                f"oci:{w / 'skpull'}:{img}"], check=True, capture_output=True)
                sk_pull = time.perf_counter() - t
                run(env, "pack", f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest")
                t = time.perf_counter()
                push = json.loads(run(env, "push", "--json", f"{img}:latest", url).stdout)
                cs_push = time.perf_counter() - t
                env2 = dict(env, CONVSTORE_STORE=str(w / f"pull-{img}"))
                t = time.perf_counter()
                pull = json.loads(run(env2, "pull", "--json", url, f"{img}:latest").stdout)
                cs_pull = time.perf_counter() - t
                t = time.perf_counter()
                p = subprocess.run([*CLI, "--store", url, "--cache", str(w / f"cache-{img}"), "run", "--json",
                                    f"{img}:latest"], env=env, capture_output=True, text=True, check=True)
                lazy = time.perf_counter() - t
                fetch = json.loads(p.stderr.strip().splitlines()[-1])["fetch"]
                rows.append((img, size, sk_push, sk_pull, push, cs_push, pull, cs_pull, lazy, fetch))
        finally:
            reg.stop()
    print("\n| image | compressed MB | skopeo push s | convstore push s (chunks sent / all, MB) | skopeo pull s "
          "| convstore pull s (chunks) | lazy run s (MB fetched) |")
    print("|---|---|---|---|---|---|---|")
    for img, size, sp, sl, push, cp, pull, cl, lazy, fetch in rows:
        print(f"| {img} | {size / 1e6:.1f} | {sp:.2f} | {cp:.2f} ({push['chunks_sent']} / {push['chunks']}, "
              f"{push['bytes_sent'] / 1e6:.1f}) | {sl:.2f} | {cl:.2f} ({pull['chunks_sent']}) | "
              f"{lazy:.2f} ({fetch['bytes_fetched'] / 1e6:.1f}) |")
    chunk_vs_pack()


def chunk_vs_pack() -> None:
    """One blob per chunk vs one packed blob with ranged reads (1,000 x 40 kB)."""
    from convstore.oci.registry_client import RegistryClient

    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "r")
        try:
            c = RegistryClient(reg.host, insecure=True)
            blobs = [os.urandom(40_000) for _ in range(1000)]
            t = time.perf_counter()
            digests = [c.put_blob("per", b) for b in blobs]
            up_each = time.perf_counter() - t
            t = time.perf_counter()
            packed = b"".join(blobs)
            pd = c.put_blob("pack", packed)
            up_pack = time.perf_counter() - t
            t = time.perf_counter()
            for d in digests[:200]:
                c.get_blob("per", d)
            get_each = (time.perf_counter() - t) / 200
            t = time.perf_counter()
            for i in range(200):
                c.get_blob("pack", pd, i * 40_000, (i + 1) * 40_000)
            get_range = (time.perf_counter() - t) / 200
        finally:
            reg.stop()
    print("\n| layout (1,000 chunks of 40 kB, loopback) | upload s | one chunk read ms |")
    print("|---|---|---|")
    print(f"| one blob per chunk | {up_each:.2f} | {get_each * 1e3:.2f} |")
    print(f"| one packed blob, ranged reads | {up_pack:.2f} | {get_range * 1e3:.2f} |")


if __name__ == "__main__":
    main()
