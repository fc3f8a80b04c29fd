"""podman and containerd starting a corpus image: a plain pull + run against
the same image's layers from convstore, side by side in one run.

    sudo python -m benchmarks.engines [--image app1] [--rounds 3] [--write-docs]

The original image is in Debian's docker-registry on 127.0.0.1; its
convstore twin is pushed to a convstore registry store in the same registry
(one repository per latency setting, so each has its own start-up profile).
At 0 ms everything talks to the registry directly; at 20 ms everything goes
through one proxy (tests/netproxy.py) that adds the latency to every
request, so the engines' pulls and convstore's chunk reads pay the same
round trip (the proxy also costs some CPU per request, and convstore makes
more, smaller requests).

Every start begins with empty engine storage and a fresh convstore process
(``layerstore`` for podman, ``snapshotter`` for containerd) with an empty
cache; that process's own start is not counted (it is a daemon).  The first
convstore start of each setting records the image's start-up profile, the
later ones prefetch it.  Times are per command, as a user runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus_bench import CORPUS_DIR, ensure_corpus  # noqa: E402
from docblock import write_block  # noqa: E402
from engine_fixtures import Containerd, podman_config, remove_podman_root, unmount_below  # noqa: E402
from kms_fixtures import Registry  # noqa: E402
from netproxy import CountingProxy  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "engines.md"
CS = [sys.executable, "-m", "convstore", "-q"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"engines: {' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return dt, p.stdout


def fetched(stats: Path) -> int:
    time.sleep(0.6)  # the stats writer's last flush
    doc = json.loads(stats.read_text()) if stats.exists() else {}
    return sum(v["bytes_fetched"] for v in doc.get("images", {}).values())


def podman_round(w: Path, ref: str, remote: list[str] | None) -> tuple[float, float, int]:
    """(pull, run, bytes convstore read) for one podman start, plain when ``remote`` is None."""
    mnt, stats = w / "als", w / "stats.json"
    stats.unlink(missing_ok=True)
    if remote is not None:
        mnt.mkdir(exist_ok=True)
        timed(remote + ["layerstore", "-b", str(mnt), "--stats-file", str(stats)])
    root = w / "podman"
    env = podman_config(root, mnt if remote is not None else None)
    try:
        pull = timed(["podman", "pull", "-q", "--tls-verify=false", ref], env)[0]
        run, out = timed(["podman", "run", "--rm", ref], env)
        assert out.strip() == "hello", out
    finally:
        remove_podman_root(env, root)
        if remote is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    return pull, run, fetched(stats) if remote is not None else 0


def containerd_round(w: Path, ref: str, image: str, remote: list[str] | None) -> tuple[float, float, int]:
    """(pull or load, run, bytes convstore read) for one containerd start."""
    sock, stats = w / "snap" / "snapshotter.sock", w / "snap-stats.json"
    stats.unlink(missing_ok=True)
    snap = None
    if remote is not None:
        snap = subprocess.Popen(remote + ["snapshotter", str(w / "snap" / "root"), "--socket", str(sock),
                                          "--stats-file", str(stats)], stderr=subprocess.DEVNULL)
        while not sock.exists():
            assert snap.poll() is None, "the snapshotter exited"
            time.sleep(0.05)
    ctd = Containerd(w / "containerd", sock)
    try:
        if remote is None:
            pull = timed(["ctr", "-a", str(ctd.socket), "images", "pull", "--plain-http", ref])[0]
            run, out = timed(["ctr", "-a", str(ctd.socket), "run", "--rm", ref, "bench"])
        else:
            pull = timed(remote + ["containerd-load", f"{image}:latest", "--address", str(ctd.socket),
                                   "--name", ref])[0]
            run, out = timed(["ctr", "-a", str(ctd.socket), "run", "--snapshotter", "convstore", "--rm", ref,
                              "bench"])
        assert out.strip() == "hello", out
    finally:
        ctd.stop()
        if snap is not None:
            snap.terminate()
            snap.wait(timeout=30)
        unmount_below(w)
        subprocess.run(["rm", "-rf", str(w / "containerd"), str(w / "snap")], check=False)
    return pull, run, fetched(stats) if remote is not None else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("engines: run as root (podman, containerd, FUSE)")
    ensure_corpus()
    corpus = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"][a.image]
    blob_bytes = sum(lay["size"] for lay in corpus["layers"])
    results: list[tuple[str, float, str, list[tuple[float, float, int]]]] = []
    with tempfile.TemporaryDirectory(prefix="convstore-engines-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        reg = Registry(w / "registry")
        try:
            src = f"oci:{CORPUS_DIR / a.image}:latest"
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src,
                            f"docker://{reg.host}/{a.image}:latest"], check=True)
            local = CS + ["--store", str(w / "store"), "--key", f"file:{w / 'key'}"]
            subprocess.run(local + ["pack", src, f"{a.image}:latest"], check=True)
            for engine in ("podman", "containerd"):
                for latency_ms in (0, 20):
                    subprocess.run(local + ["--insecure", "push", f"{a.image}:latest",
                                            f"oci://{reg.host}/convstore-{engine}-{latency_ms}"], check=True)
            for engine in ("podman", "containerd"):
                for latency in (0.0, 0.020):
                    proxy = CountingProxy(reg.host, latency) if latency else None
                    host = proxy.host if proxy else reg.host
                    ref = f"{host}/{a.image}:latest"
                    remote = CS + ["--store", f"oci://{host}/convstore-{engine}-{round(latency * 1000)}",
                                   "--insecure", "--key", f"file:{w / 'key'}"]
                    plain, lazy = [], []
                    for r in range(a.rounds):
                        print(f"{engine}, latency {latency * 1000:.0f} ms, round {r + 1}", file=sys.stderr)
                        cache = ["--cache", str(w / f"cache-{engine}-{latency}-{r}")]
                        if engine == "podman":
                            plain.append(podman_round(w, ref, None))
                            lazy.append(podman_round(w, ref, remote + cache))
                        else:
                            plain.append(containerd_round(w, ref, a.image, None))
                            lazy.append(containerd_round(w, ref, a.image, remote + cache))
                    if proxy:
                        proxy.stop()
                    results.append((engine, latency, "plain", plain))
                    results.append((engine, latency, "convstore", lazy))
        finally:
            reg.stop()
    lines = ["| engine | latency | start | pull (podman) / pull or `containerd-load` (containerd) | run | total | "
             "bytes read |", "|---|---|---|---|---|---|---|"]
    plain_total: dict[tuple[str, float], float] = {}
    for engine, latency, kind, rounds in results:
        ms = f"{latency * 1000:.0f} ms"
        if kind == "plain":
            total = statistics.median(p + r for p, r, _ in rounds)
            plain_total[(engine, latency)] = total
            lines.append(f"| {engine} | {ms} | plain (median) | {statistics.median(p for p, _, _ in rounds):.2f} s | "
                         f"{statistics.median(r for _, r, _ in rounds):.2f} s | {total:.2f} s | "
                         f"{blob_bytes / 1e6:.1f} MB (layer blobs) |")
            continue
        base = plain_total[(engine, latency)]
        p0, r0, f0 = rounds[0]
        lines.append(f"| {engine} | {ms} | convstore, first start (records the profile) | {p0:.2f} s | {r0:.2f} s | "
                     f"**{p0 + r0:.2f} s** ({base / (p0 + r0):.1f}x) | {f0 / 1e6:.1f} MB |")
        if len(rounds) > 1:
            later = rounds[1:]
            total = statistics.median(p + r for p, r, _ in later)
            lines.append(f"| {engine} | {ms} | convstore, profile prefetched (median) | "
                         f"{statistics.median(p for p, _, _ in later):.2f} s | "
                         f"{statistics.median(r for _, r, _ in later):.2f} s | **{total:.2f} s** ({base / total:.1f}x) "
                         f"| {statistics.median(f for _, _, f in later) / 1e6:.1f} MB |")
    text = (f"`python -m benchmarks.engines --image {a.image} --rounds {a.rounds}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, image {a.image} "
            f"({blob_bytes / 1e6:.1f} MB of gzip layers), medians of {a.rounds} rounds (see the script's doc for "
            "the set-up). `bytes read`: what convstore fetched from its registry store, against the layer blobs "
            "a plain pull downloads.\n\n" + "\n".join(lines))
    print(text)
    if a.write_docs:
        write_block("engines-starts", "Start times", text, docs=DOCS)


if __name__ == "__main__":
    main()
