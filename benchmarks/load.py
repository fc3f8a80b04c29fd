"""convstore under sustained load, measured (root: FUSE, runc).

    sudo .venv/bin/python -m benchmarks.load [--seconds 60] [--runs 100] [--write-docs]

1. FUSE load: one `convstore mount` of app1; 16 reader processes open random
   regular files for ``--seconds`` and check every read against the file's
   sha256 (from an `unpack --rootfs` of the same image): reads, errors, p50/p99
   latency, and the mount process's peak RSS (VmHWM).
2. Starts: `convstore run app1` ``--runs`` times in a row (warm: the page
   cache and the start-up profile), and 8 at once, against `runc run` of an
   unpacked rootfs of the same image, in the same run.
3. Concurrency: 4 packs of overlapping corpus images at once, while 4 readers
   read a packed image and `convstore gc` runs in a loop; then `verify` and an
   exact unpack (every diff_id checked) of every image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from corpus_bench import CORPUS_DIR, ensure_corpus  # noqa: E402
from docblock import write_block  # noqa: E402

CLI = [sys.executable, "-m", "convstore.cli", "--quiet"]

READER = r"""
import hashlib, json, os, random, sys, time
mnt, truth, seconds, seed = sys.argv[1], json.load(open(sys.argv[2])), float(sys.argv[3]), int(sys.argv[4])
paths = sorted(truth)
rnd = random.Random(seed)
lat, errors, n, nbytes = [], [], 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    p = rnd.choice(paths)
    t = time.perf_counter()
    try:
        with open(os.path.join(mnt, p), "rb") as f:
            data = f.read()
    except OSError as e:
        errors.append(f"{p}: {e}")
        continue
    lat.append(time.perf_counter() - t)
    if hashlib.sha256(data).hexdigest() != truth[p]:
        errors.append(f"{p}: wrong content")
    n += 1
    nbytes += len(data)
json.dump({"reads": n, "bytes": nbytes, "errors": errors[:20], "nerrors": len(errors), "lat": lat}, sys.stdout)
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def cli(env: dict[str, str], *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, check=True, **kw)  # type: ignore


def fuse_load(w: Path, env: dict[str, str], seconds: float) -> dict[str, object]:
    rootfs = w / "rootfs"
    cli(env, "unpack", "app1:latest", "--rootfs", str(rootfs))
    truth = {}
    for dp, _d, fs in os.walk(rootfs):
        for f in fs:
            p = Path(dp) / f
            if p.is_file() and not p.is_symlink():
                truth[str(p.relative_to(rootfs))] = hashlib.sha256(p.read_bytes()).hexdigest()
    (w / "truth.json").write_text(json.dumps(truth))
    mnt = w / "mnt"
    mnt.mkdir()
    out = cli(env, "mount", "--background", "app1:latest", str(mnt)).stdout
    pid = int(out.split("(pid ")[1].split(")")[0])
    try:
        procs = [subprocess.Popen([sys.executable, "-c", READER, str(mnt), str(w / "truth.json"), str(seconds),
                                   str(i)], stdout=subprocess.PIPE, text=True) for i in range(16)]
        results = [json.loads(p.communicate()[0]) for p in procs]
        hwm = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) // 1024
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    lat = [x for r in results for x in r["lat"]]
    return {"files": len(truth), "reads": sum(r["reads"] for r in results),
            "mb": sum(r["bytes"] for r in results) / 1e6, "errors": sum(r["nerrors"] for r in results),
            "error_samples": [e for r in results for e in r["errors"]][:5], "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "mount_peak_rss_mib": hwm, "seconds": seconds}


def starts(w: Path, env: dict[str, str], runs: int) -> dict[str, object]:
    import convstore
    from convstore.reader import ImageFS
    from convstore.engines.run import _runc_bundle, process_spec

    store = convstore.Store.open(env["CONVSTORE_STORE"], env["CONVSTORE_KEY"])
    cli(env, "run", "app1:latest")  # records the start-up profile
    seq = []
    for _ in range(runs):
        t = time.perf_counter()
        cli(env, "run", "app1:latest")
        seq.append(time.perf_counter() - t)

    def one(_i: int) -> float:
        t = time.perf_counter()
        cli(env, "run", "app1:latest")
        return time.perf_counter() - t

    par: list[float] = []
    with ThreadPoolExecutor(8) as pool:
        for _round in range(max(1, runs // 8)):
            par += list(pool.map(one, range(8)))
    # runc on an unpacked rootfs of the same image
    root = w / "rootfs"
    with ImageFS.from_store(store, "app1:latest") as fs:
        proc = process_spec(fs, json.loads(fs.manifest.config_bytes), None)
    bundle = w / "bundle"
    bundle.mkdir()
    _runc_bundle(str(bundle), str(root), proc, shutil.which("runc") or "runc", "load")

    def runc(i: int) -> float:
        t = time.perf_counter()
        subprocess.run(["runc", "run", "--bundle", str(bundle), f"load-{os.getpid()}-{i}"], check=True,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t

    rseq = [runc(i) for i in range(runs)]
    rpar: list[float] = []
    with ThreadPoolExecutor(8) as pool:
        for r in range(max(1, runs // 8)):
            rpar += list(pool.map(runc, range(10_000 + 8 * r, 10_008 + 8 * r)))
    return {"runs": runs, "run_seq": (pct(seq, 0.5), pct(seq, 0.99)), "run_par": (pct(par, 0.5), pct(par, 0.99)),
            "runc_seq": (pct(rseq, 0.5), pct(rseq, 0.99)), "runc_par": (pct(rpar, 0.5), pct(rpar, 0.99))}


def chaos(w: Path, key: str) -> dict[str, object]:
    env = dict(os.environ, CONVSTORE_STORE=str(w / "chaos"), CONVSTORE_KEY=key)
    cli(env, "pack", f"oci:{CORPUS_DIR / 'base-prev'}:latest", "base-prev:latest")
    imgs = ["base", "app1", "app2", "app1-rebuilt"]
    t0 = time.perf_counter()
    packs = [subprocess.Popen([*CLI, "pack", f"oci:{CORPUS_DIR / i}:latest", f"{i}:latest"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in imgs]
    readers = [subprocess.Popen([*CLI, "unpack", "base-prev:latest", f"oci:{w / f'r{i}'}", "--compress", "none"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i in range(4)]
    gcs = 0
    while any(p.poll() is None for p in packs):
        subprocess.run([*CLI, "gc"], env=env, capture_output=True, text=True, check=True)
        gcs += 1
    failed = [p.stderr.read() for p in packs + readers if p.wait() != 0]  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    v = json.loads(cli(env, "verify", "--json").stdout)
    exact = 0
    for i in [*imgs, "base-prev"]:
        cli(env, "unpack", f"{i}:latest", f"oci:{w / ('x-' + i)}", "--compress", "none")  # diff_ids checked
        exact += 1
    return {"packs": len(imgs), "readers": 4, "gc_runs": gcs, "failed": failed, "verify_clean": v["clean"],
            "images_exact": exact, "seconds": wall}


def render(f: dict[str, object], s: dict[str, object], c: dict[str, object]) -> str:
    out = [f"Run: {time.strftime('%Y-%m-%d')}, {os.uname().nodename}, {os.cpu_count()} cores.", ""]
    if f:
        out += ["| FUSE load (app1, 16 reader processes) | value |", "|---|---|",
                f"| duration | {f['seconds']:.0f} s |", f"| files in the image | {f['files']:,} |",
                f"| reads completed (whole files, sha256 checked) | {f['reads']:,} ({f['mb']:.0f} MB) |",
                f"| errors | {f['errors']} |", f"| read latency p50 / p99 | {f['p50_ms']:.2f} / {f['p99_ms']:.1f} ms |",
                f"| mount process peak RSS | {f['mount_peak_rss_mib']} MiB |", ""]
    if s:
        def row(name: str, k: str) -> str:
            a, b = s[k]  # type: ignore[misc]
            return f"| {name} | {a:.3f} s | {b:.3f} s |"

        out += [f"| start ({s['runs']} runs) | p50 | p99 |", "|---|---|---|",
                row("`convstore run app1` in a row (warm)", "run_seq"), row("`convstore run app1`, 8 at once", "run_par"),
                row("`runc run` of an unpacked rootfs, in a row", "runc_seq"),
                row("`runc run` of an unpacked rootfs, 8 at once", "runc_par"), ""]
    if c:
        out += ["| 4 packs + 4 readers + gc in a loop | value |", "|---|---|",
                f"| wall time | {c['seconds']:.0f} s |", f"| gc runs during the packs | {c['gc_runs']} |",
                f"| failed processes | {len(c['failed'])} |", f"| verify afterwards | "
                f"{'clean' if c['verify_clean'] else 'NOT clean'} |",
                f"| images unpacked exactly afterwards | {c['images_exact']} of 5 |", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--skip", nargs="*", default=[], choices=["fuse", "starts", "chaos"])
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    ensure_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        key = f"file:{w / 'key'}"
        env = dict(os.environ, CONVSTORE_STORE=str(w / "s"), CONVSTORE_KEY=key, CONVSTORE_STATE_DIR=str(w / "st"))
        cli(env, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
        f = fuse_load(w, env, a.seconds) if "fuse" not in a.skip else {}
        if f:
            print(json.dumps({k: v for k, v in f.items()}, indent=1), file=sys.stderr)
        if "fuse" in a.skip:
            cli(env, "unpack", "app1:latest", "--rootfs", str(w / "rootfs"))
        s = starts(w, env, a.runs) if "starts" not in a.skip else {}
        c = chaos(w, key) if "chaos" not in a.skip else {}
    text = render(f, s, c)
    print(text)
    if a.write_docs:
        write_block("load", "Under load (`benchmarks/load.py`)", text)


if __name__ == "__main__":
    main()
