"""How convstore's costs grow with the store: synthetic stores built with real packs.

    python -m benchmarks.scale                 # local 10k and 100k chunks; registry N = 1, 10, 100
    python -m benchmarks.scale --full          # adds the 1M-chunk store and N = 1,000
    python -m benchmarks.scale --write-docs    # also replaces the table in docs/benchmarks.md

Local: one store grows by packing synthetic images of 1,000 chunks each
(1,000 random 1 KiB files, each its own chunk) through ``Store.pack``;
at 10k, 100k and 1M chunks every command is timed as a user runs it (one
process each, the second of two runs: warm page cache), with its peak RSS.

Registry: Debian's docker-registry on 127.0.0.1 behind a counting proxy
(tests/netproxy.py); images are packed locally and pushed one by one; at
each N the proxy counts the requests of a lazy ``cat`` from an empty cache
(on loopback, and with 20 ms added per request), of the same ``cat`` with a
warm cache, and of the push of one more image; ``images`` is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from docblock import write_block  # noqa: E402
from netproxy import CountingProxy  # noqa: E402
from imagebuilder import Entry, make_tar, write_oci  # noqa: E402

CLI = [sys.executable, "-m", "convstore.cli", "--quiet"]
FILES = 1000
PACKS = 8  # new images packed at each size (mean and worst reported)
PARAMS = dict(min_size=1024, avg_size=2048, max_size=8192, file_cut=1024)  # each 1 KiB file is one chunk


def synthetic_image(dest: Path, i: int) -> str:
    """An OCI layout with one uncompressed layer of FILES random 1 KiB files (about 1,000 chunks)."""
    shutil.rmtree(dest, ignore_errors=True)
    rnd = random.Random(i)
    entries = [Entry("data/", "dir")] + [Entry(f"data/f{k:04d}", data=rnd.randbytes(1024)) for k in range(FILES)]
    write_oci(str(dest), [make_tar(entries)], compression="none")
    return f"oci:{dest}:latest"


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """The second of two runs (warm page cache)."""
    subprocess.run(args, env=env, capture_output=True)
    return once(args, env)


# The child's peak RSS is read by a small wrapper process: a child forked from this (large) process
# would report this process's RSS as its own high-water mark (ru_maxrss survives exec).
_WRAP = ("import os, resource, sys\n"
         "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
         "_, status, ru = os.wait4(pid, 0)\n"
         "os.write(int(sys.argv[1]), str(ru.ru_maxrss).encode())\n"
         "sys.exit(os.waitstatus_to_exitcode(status) and 1)\n")


def once(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one process."""
    r, w = os.pipe()
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-S", "-c", _WRAP, str(w), *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=err, pass_fds=(w,))
        os.close(w)
        status = p.wait()
        dt = time.perf_counter() - t
        rss = os.read(r, 64)
        os.close(r)
        if status:
            err.seek(0)
            raise SystemExit(f"{' '.join(args[3:])} failed: {err.read().decode()[-500:]}")
    return dt, int(rss) / 1024


def pack_in_process(store_path: str, key: str, source: str, ref: str) -> None:
    from convstore import ChunkParams, Store

    store = Store.open(store_path, key)
    store.pack(source, ref, params=ChunkParams(**PARAMS))  # type: ignore[arg-type]


def local_table(work: Path, sizes: list[int]) -> list[dict[str, object]]:
    from convstore import Store

    store_path, key = str(work / "store"), f"file:{work / 'key'}"
    env = dict(os.environ, CONVSTORE_STORE=store_path, CONVSTORE_KEY=key,
               CONVSTORE_STATE_DIR=str(work / "state"))
    store = Store.open(store_path, key, state_dir=str(work / "state"))
    from convstore import ChunkParams

    params = ChunkParams(**PARAMS)  # type: ignore[arg-type]
    rows = []
    n = 0
    src_dir = work / "src"
    t_build = time.perf_counter()
    for target in sizes:
        while n * FILES < target:
            src = synthetic_image(src_dir / "img", n)
            store.pack(src, f"img{n}:latest", params=params)
            n += 1
            if n % 100 == 0:
                print(f"  local: {n} images packed ({time.perf_counter() - t_build:.0f} s)", file=sys.stderr)
        row: dict[str, object] = {"chunks": n * FILES, "images": n}
        row["cat"] = measure([*CLI, "cat", "img0:latest", "data/f0007"], env)
        code = ("import sys; sys.path.insert(0, sys.argv[5]); from benchmarks.scale import pack_in_process;"
                "pack_in_process(*sys.argv[1:5])")
        packs = []
        for k in range(PACKS + 1):  # the first warms the page cache; then PACKS new images, one process each
            extra = synthetic_image(src_dir / f"extra{k}", 10_000_000 + 100 * n + k)
            t = once([sys.executable, "-c", code, store_path, key, extra, f"extra{n}-{k}:latest", str(ROOT)], env)
            if k:
                packs.append(t)
            subprocess.run([*CLI, "rm", f"extra{n}-{k}:latest"], env=env, check=True, capture_output=True)
        # the mean is what a pack costs (index merges are amortized over packs); the worst is shown too
        row["pack"] = (sum(t for t, _r in packs) / len(packs), max(r for _t, r in packs))
        row["pack_worst"] = max(packs)
        row["images_cmd"] = measure([*CLI, "images"], env)
        row["stats"] = measure([*CLI, "stats"], env)
        row["gc"] = measure([*CLI, "gc", "--dry-run"], env)
        rows.append(row)
        print(f"  local {row}", file=sys.stderr)
    return rows


def registry_table(work: Path, counts: list[int], latency_ms: float) -> list[dict[str, object]]:
    from convstore import ChunkParams, Store
    from convstore.transfer import copy_image
    from kms_fixtures import Registry

    reg = Registry(work / "registry")
    proxy = CountingProxy(reg.host)
    slow = CountingProxy(reg.host, latency_s=latency_ms / 1e3)
    try:
        local_path, key = str(work / "rstore"), f"file:{work / 'key'}"
        state = str(work / "rstate")
        env = dict(os.environ, CONVSTORE_STORE=local_path, CONVSTORE_KEY=key, CONVSTORE_STATE_DIR=state)
        local = Store.open(local_path, key, state_dir=state)
        params = ChunkParams(**PARAMS)  # type: ignore[arg-type]

        def remote(host: str) -> Store:
            return Store.open(f"oci://{host}/cs", key, insecure=True, state_dir=state,
                              cache_dir=str(work / "pushcache"))

        rows = []
        n = 0
        t_build = time.perf_counter()
        for target in counts:
            while n < target:
                src = synthetic_image(work / "rsrc", n)
                local.pack(src, f"img{n}:latest", params=params)
                copy_image(local, remote(proxy.host), f"img{n}:latest")
                n += 1
                if n % 50 == 0:
                    print(f"  registry: {n} images pushed ({time.perf_counter() - t_build:.0f} s)", file=sys.stderr)
            row: dict[str, object] = {"images": n}
            for name, px in (("loopback", proxy), ("slow", slow)):
                cache = work / f"cache-{n}-{name}"
                args = [*CLI, "--insecure", "--store", f"oci://{px.host}/cs", "--cache", str(cache),
                        "cat", "img0:latest", "data/f0007"]
                px.reset()
                t = time.perf_counter()
                subprocess.run(args, env=env, check=True, capture_output=True)
                row[f"cold_{name}_s"] = time.perf_counter() - t
                row[f"cold_{name}_requests"] = px.total()
                if name == "loopback":
                    row["cold_kinds"] = px.snapshot()
                    px.reset()
                    subprocess.run(args, env=env, check=True, capture_output=True)
                    row["warm_requests"] = px.total()
                    row["warm_kinds"] = px.snapshot()
            # the push of one more image, counted
            src = synthetic_image(work / "rsrc", 20_000_000 + n)
            local.pack(src, f"extra{n}:latest", params=params)
            proxy.reset()
            p = subprocess.run([*CLI, "--insecure", "push", f"extra{n}:latest", f"oci://{proxy.host}/cs"],
                               env=env, capture_output=True)
            if p.returncode:
                raise SystemExit(f"push failed: {p.stderr.decode()[-400:]}")
            row["push_requests"] = proxy.total()
            # `images` straight to the registry on loopback (the counting proxy would add its own time)
            t = time.perf_counter()
            subprocess.run([*CLI, "--insecure", "--store", f"oci://{reg.host}/cs", "--cache",
                            str(work / f"cache-images-{n}"), "images"], env=env, check=True, capture_output=True)
            row["images_s"] = time.perf_counter() - t
            rows.append(row)
            print(f"  registry {row}", file=sys.stderr)
        return rows
    finally:
        proxy.stop()
        slow.stop()
        reg.stop()


def render(local: list[dict[str, object]], registry: list[dict[str, object]], latency_ms: float,
           label: str) -> str:
    def ts(v: object) -> str:
        t, r = v  # type: ignore[misc]
        return f"{t:.2f} s / {r:.0f} MiB"

    out = [f"Run: {label}; {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, "
           f"Python {platform.python_version()}.", ""]
    if local:
        out += ["| local store | `cat` of one small file (warm) | pack one more image: mean (worst) "
                "| `images` | `stats` | `gc --dry-run` |", "|---|---|---|---|---|---|"]
        for r in local:
            worst = f" ({float(r['pack_worst'][0]):.2f} s)" if "pack_worst" in r else ""  # type: ignore[index]
            out.append(f"| {int(r['chunks']):,} chunks, {int(r['images']):,} images | {ts(r['cat'])} "
                       f"| {ts(r['pack'])}{worst} | {ts(r['images_cmd'])} | {ts(r['stats'])} | {ts(r['gc'])} |")
        out.append("")
    if registry:
        out += [f"| registry store, N images pushed | requests for one lazy `cat`, empty cache | loopback "
                f"| {latency_ms:.0f} ms per request | requests with a warm cache | requests to push one more image "
                f"| `images` |", "|---|---|---|---|---|---|---|"]
        for r in registry:
            out.append(f"| {int(r['images']):,} | {r['cold_loopback_requests']} | {float(r['cold_loopback_s']):.2f} s "
                       f"| {float(r['cold_slow_s']):.2f} s | {r['warm_requests']} | {r['push_requests']} "
                       f"| {float(r['images_s']):.2f} s |")
        out.append("")
        out.append("Requests by kind, lazy `cat` from an empty cache at the largest N: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(dict(registry[-1]['cold_kinds']).items())))  # type: ignore[call-overload]
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="add the 1M-chunk store and N = 1,000")
    ap.add_argument("--local", default=None, help="chunk counts, comma-separated (default 10000,100000)")
    ap.add_argument("--registry", default=None, help="image counts, comma-separated (default 1,10,100)")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--workdir", default=None, help="keep the synthetic stores here (default: a temporary folder)")
    ap.add_argument("--label", default="convstore " + subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip())
    ap.add_argument("--json", default=None, help="write the raw rows here")
    ap.add_argument("--write-docs", action="store_true", help="replace the scale section of docs/benchmarks.md")
    a = ap.parse_args()
    local = a.local if a.local is not None else "10000,100000,1000000" if a.full else "10000,100000"
    reg = a.registry if a.registry is not None else "1,10,100,1000" if a.full else "1,10,100"
    sizes = [int(x) for x in local.split(",") if x]
    counts = [int(x) for x in reg.split(",") if x]
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        local = local_table(work, sizes) if sizes else []
        registry = registry_table(work, counts, a.latency_ms) if counts else []
    text = render(local, registry, a.latency_ms, a.label)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"local": local, "registry": registry}, indent=1))
    if a.write_docs:
        write_block("scale", "Scale: costs against store size (`benchmarks/scale.py`)", text)


if __name__ == "__main__":
    main()
