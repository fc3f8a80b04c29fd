"""A layer store's memory with many images (issue 23, section 6): 20 images,
100 starts, then one full read; the layer store process's RSS after each phase.

    python -m benchmarks.memory [--work DIR] [--memory-budget MIB] [--json]

The 20 images are the five corpus images in four variants, each packed into
a convergence domain of its own (so no two variants share a chunk) with its
layers compressed again (gzip, the variant's number as the header's mtime:
other blob digests, the same diff_ids), so that the layer store, which finds
a layer by its blob digest, serves 20 distinct images as a node serving 20
unrelated images does (within a variant, app1's base layer is base's, as in
the corpus).  A "start" reads the same files every time for an
image, as a container's start does: 60 of its files of at most 2 MiB,
chosen by a seeded draw, read whole through the layer store's FUSE mount
(``convstore layerstore --background``, a process of its own whose
``VmRSS``/``VmHWM`` are read from /proc).  100 starts are five rounds over
the 20 images.  Then app1 (domain 0) is read whole, then every image is
(``--full-reads``).  With ``--scrape`` the layer store also serves metrics
and the shared cache's own count of its bytes is shown (code with the
budget only).

To compare with the code before the shared budget, run the same command with
``PYTHONPATH`` naming an older checkout's folder: the store (packed once into
``--work``) is the same.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import convstore

CORPUS = Path(os.environ.get("CONVSTORE_CORPUS", Path.home() / ".cache" / "convstore-corpus"))
IMAGES = ["base", "app1", "app2", "app1-rebuilt", "base-prev"]
DOMAINS = ["default", "d1", "d2", "d3"]
FILES_PER_START = 60


def cli(env: dict[str, str], *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "convstore.cli", *args], env=env, capture_output=True, text=True,
                       timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"memory: convstore {' '.join(args)} failed: {p.stderr.strip()[-500:]}")
    return p.stdout


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    got = {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}
    return got["VmRSS"], got["VmHWM"]


def variant(src: Path, dst: Path, n: int) -> None:
    """An OCI layout of ``src``'s image whose layers are gzip-compressed again with header mtime ``n``."""
    import gzip
    import hashlib
    import shutil

    import zstandard

    def put(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        (dst / "blobs" / "sha256" / d).write_bytes(data)
        return "sha256:" + d

    shutil.rmtree(dst, ignore_errors=True)
    (dst / "blobs" / "sha256").mkdir(parents=True)
    (dst / "oci-layout").write_bytes((src / "oci-layout").read_bytes())
    blob = lambda digest: (src / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()  # noqa: E731
    index = json.loads((src / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads(blob(desc["digest"]))
    put(blob(manifest["config"]["digest"]))
    for lay in manifest["layers"]:
        raw = blob(lay["digest"])
        if raw[:2] == b"\x1f\x8b":
            tar = gzip.decompress(raw)
        elif raw[:4] == b"\x28\xb5\x2f\xfd":
            tar = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        else:
            tar = raw  # an uncompressed layer
        again = gzip.compress(tar, compresslevel=1, mtime=n)
        lay.update(digest=put(again), size=len(again), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
    body = json.dumps(manifest).encode()
    desc.update(digest=put(body), size=len(body))
    (dst / "index.json").write_text(json.dumps(index))


def prepare(work: Path, env: dict[str, str]) -> list[str]:
    """Pack the 20 images once (a marker file says it was done)."""
    refs = [f"{d}-{i}:1" for d in DOMAINS for i in IMAGES]
    if (work / "packed-v2").exists():
        return refs
    for d in DOMAINS[1:]:
        cli(env, "domain", "create", d)
    for n, d in enumerate(DOMAINS, 1):
        for i in IMAGES:
            variant(CORPUS / i, work / "layout", n)
            cli(env, "-q", "pack", "--domain", d, f"oci:{work / 'layout'}:latest", f"{d}-{i}:1")
    (work / "packed-v2").write_text("\n".join(refs))
    return refs


def start_files(store: convstore.Store, ref: str, everything: bool = False) -> list[tuple[str, str, int]]:
    """(layer blob digest, path, size) of the files a start of ``ref`` reads (or of every file)."""
    m = store.manifest(ref)
    files = [(lr.digest, e.path, e.size) for lr in m.layers for e in lr.entries if e.is_file and e.size]
    if everything:
        return files
    small = sorted(f for f in files if f[2] <= 2 << 20)
    return random.Random(ref).sample(small, min(FILES_PER_START, len(small)))


def read_all(mnt: Path, files: list[tuple[str, str, int]]) -> int:
    root = mnt / base64.b64encode(b"bench").decode()
    n = 0
    for digest, path, _ in files:
        with open(root / digest / "diff" / path.lstrip("/"), "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/convstore-bench-memory")
    ap.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                    help="passed to the layer store (omit for its default, or for code without the option)")
    ap.add_argument("--starts", type=int, default=100)
    ap.add_argument("--full-reads", type=int, default=20, metavar="N", help="then read N images whole")
    ap.add_argument("--scrape", action="store_true", help="show the memory cache's bytes from the endpoint")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    env = {**os.environ, "CONVSTORE_STORE": str(work / "store"), "CONVSTORE_KEY": f"file:{work / 'master.key'}",
           "CONVSTORE_STATE_DIR": str(work / "state"), "CONVSTORE_DAEMON": "0"}
    os.environ["CONVSTORE_STATE_DIR"] = env["CONVSTORE_STATE_DIR"]  # this process opens the store too
    refs = prepare(work, env)
    import shutil

    shutil.rmtree(work / "store" / "profiles", ignore_errors=True)  # every run starts without start-up profiles
    store = convstore.Store.open(str(work / "store"), f"file:{work / 'master.key'}")
    plans = {r: start_files(store, r) for r in refs}
    mnt = work / "als"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    extra = ["--memory-budget", str(a.memory_budget)] if a.memory_budget else []
    port = 0
    if a.scrape:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra += ["--metrics-address", f"127.0.0.1:{port}"]

    def cached() -> float:
        if not port:
            return float("nan")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return float(re.search(r"^convstore_memory_cache_bytes (\S+)$", text, re.M).group(1))  # type: ignore

    stats = work / "stats.json"
    stats.unlink(missing_ok=True)

    def fetched() -> float:
        """Plaintext bytes fetched from the store so far (the stats file, format 1 or 2)."""
        time.sleep(0.6)  # the stats writer's next flush
        doc = json.loads(stats.read_text()) if stats.exists() else {}
        return sum(v.get("plain_bytes_fetched", 0) for v in doc.get("images", doc).values() if isinstance(v, dict))

    out = cli(env, "layerstore", "--background", str(mnt), "--stats-file", str(stats), *extra)
    pid = int(re.search(r"\(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    rows: list[tuple[str, int, int, float, float, float]] = []

    def row(phase: str, t: float) -> None:
        dt = time.perf_counter() - t
        rows.append((phase, *rss(pid), cached(), fetched(), dt))

    try:
        row("mounted", time.perf_counter())
        t = time.perf_counter()
        for ref in refs:  # the layer store builds each image's layer trees: its metadata, no content read
            for lr in store.manifest(ref).layers:
                os.stat(mnt / base64.b64encode(b"bench").decode() / lr.digest / "diff")
        row("after opening the 20 images (no file read)", t)
        n = 0
        t = time.perf_counter()
        for k in range(a.starts):
            ref = refs[k % len(refs)]
            read_all(mnt, plans[ref])
            n += 1
            if n in (len(refs), a.starts):
                row(f"after {n} starts", t)
                t = time.perf_counter()
        t = time.perf_counter()
        got = read_all(mnt, start_files(store, "default-app1:1", everything=True))
        row(f"after one full read of app1 ({got / 1e6:.0f} MB)", t)
        if a.full_reads:
            t = time.perf_counter()
            got = sum(read_all(mnt, start_files(store, r, everything=True)) for r in refs[:a.full_reads])
            row(f"after full reads of {min(a.full_reads, len(refs))} images ({got / 1e6:.0f} MB)", t)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    if a.json:
        print(json.dumps([{"phase": p, "rss": r, "hwm": h, "cache": c, "fetched": f, "seconds": s}
                          for p, r, h, c, f, s in rows]))
        return
    print(f"{'phase':50} {'RSS MiB':>8} {'peak MiB':>9} {'cache MiB':>10} {'fetched MB':>11} {'s':>7}")
    for p, r, h, c, f, s in rows:
        print(f"{p:50} {r / 2**20:8.1f} {h / 2**20:9.1f} {c / 2**20:10.1f} {f / 1e6:11.0f} {s:7.1f}")

if __name__ == "__main__":
    main()
