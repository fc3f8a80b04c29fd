"""podman and containerd starting a corpus image: a plain pull + run against
the same image's layers from convstore, side by side in one run, at 0, 20
and 50 ms per request.

    sudo python -m benchmarks.engines [--image app1] [--rounds 3] [--label after] [--write-docs]

The original image is in Debian's docker-registry on 127.0.0.1; its
convstore twin is pushed to a convstore registry store in the same registry
(one repository per engine and latency setting, so each has its own
start-up profile).  Everything -- the engines' pulls and convstore's chunk
reads -- goes through one proxy per latency setting (tests/netproxy.py),
which adds the latency to every request (0 ms: no delay, the proxy's own
cost only) and counts requests and bytes.

Every start begins with empty engine storage and a fresh convstore process
(``layerstore`` for podman, ``snapshotter`` for containerd) with an empty
cache; that process's own start is not counted (it is a daemon).  The first
convstore start of each setting records the image's start-up profile, the
later ones prefetch it.  Times are per command, as a user runs them.
``requests``/``bytes`` are what the proxy saw from the start of the pull to
the end of the run (the container printed ``hello`` and exited: ready).
Where the code has a background fetch (convstore.reader.background), the
lazy starts run with it off, and one more start per setting runs with it on:
its start time, and when the whole image was local (from the stats file).

The local-image baseline of an engine is its ``run`` of an image it has
pulled (the plain round's run).  Three more rows show what is convstore's:
the engine's floor (its pull again, the image present -- podman's 3 requests,
``ctr images pull``'s 1 -- plus the local run); at 0 ms the start with a
profile again with the node cache of the previous round (chunks on the
node: convstore without fetching); and for containerd the start with a
profile with ``containerd-load`` run by a ``convstore daemon`` (one per
setting, started like the snapshotter and not counted; the other rows run
it in its own process, ``CONVSTORE_DAEMON=0``).  ``--label`` names the plot
(docs/img/engines-latency-LABEL.png) and the JSON results
(benchmarks/results/engines-LABEL.json); one podman start with a profile at
0 ms has its request log written beside them.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus_bench import CORPUS_DIR, ensure_corpus  # noqa: E402
from docblock import write_block  # noqa: E402
from engine_fixtures import Containerd, podman_config, remove_podman_root, unmount_below  # noqa: E402
from kms_fixtures import Registry  # noqa: E402
from netproxy import CountingProxy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "engines.md"
CS = [sys.executable, "-m", "convstore", "-q"]
LATENCIES = (0.0, 0.020, 0.050)


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


def local_at(stats: Path, t0: float, timeout: float = 90.0) -> float | None:
    """Seconds from ``t0`` (unix time) until the background fetch said it was done, from the stats file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = json.loads(stats.read_text())
        except (OSError, ValueError):
            doc = {}
        # stats file format 2: {"background": {image: progress}}; format 1: {image: {"background": progress}}
        bgs = (list((doc.get("background") or {}).values()) if "version" in doc
               else [v.get("background") or {} for v in doc.values() if isinstance(v, dict)])
        if bgs and all(b.get("state") in ("done", "failed", "too-large", "off", "local") for b in bgs):
            return max(b.get("finished", 0) for b in bgs) - t0 if all(b.get("state") == "done" for b in bgs) \
                else None
        time.sleep(0.1)
    return None


class Start:
    """One start: times, what the proxy saw, and (background on) when the image was local."""

    def __init__(self, pull: float, run: float, fetched: int, requests: int, req_bytes: int,
                 local: float | None = None) -> None:
        self.pull, self.run, self.fetched, self.requests, self.req_bytes, self.local = \
            pull, run, fetched, requests, req_bytes, local
        self.floor: Start | None = None  # a plain start's pull again, the image present (the engine's floor)

    @property
    def total(self) -> float:
        return self.pull + self.run

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, total=self.total, floor=self.floor.to_json() if self.floor else None)


def podman_round(w: Path, ref: str, remote: list[str] | None, proxy: CountingProxy,
                 background: bool | None = None) -> Start:
    """One podman start, plain when ``remote`` is None; ``background``: the layer store's
    --background-fetch setting (None: the code has none)."""
    mnt, stats = w / "als", w / "stats.json"
    stats.unlink(missing_ok=True)
    floor = None
    if remote is not None:
        mnt.mkdir(exist_ok=True)
        bg = [] if background is None else ["--background-fetch" if background else "--no-background-fetch"]
        timed(remote + ["layerstore", "-b", str(mnt), "--stats-file", str(stats)] + bg)
    root = w / "podman"
    env = podman_config(root, mnt if remote is not None else None)
    local = None
    try:
        proxy.reset()
        t0 = time.time()
        pull = timed(["podman", "pull", "-q", "--tls-verify=false", ref], env)[0]
        run, out = timed(["podman", "run", "--rm", ref], env)
        requests, req_bytes = proxy.total(), proxy.bytes
        assert out.strip() == "hello", out
        if background:
            local = local_at(stats, t0)
        if remote is None:  # the floor of podman's own pull: the image is present, nothing to fetch
            proxy.reset()
            again = timed(["podman", "pull", "-q", "--tls-verify=false", ref], env)[0]
            floor = Start(again, run, 0, proxy.total(), proxy.bytes)
    finally:
        remove_podman_root(env, root)
        if remote is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    start = Start(pull, run, fetched(stats) if remote is not None else 0, requests, req_bytes, local)
    start.floor = floor if remote is None else None
    return start


def containerd_round(w: Path, ref: str, image: str, remote: list[str] | None, proxy: CountingProxy,
                     background: bool | None = None, daemon: Path | None = None) -> Start:
    """One containerd start (pull or ``containerd-load``, then ``ctr run``); ``daemon``: the socket of
    a ``convstore daemon`` that runs ``containerd-load`` (else its own process)."""
    sock, stats = w / "snap" / "snapshotter.sock", w / "snap-stats.json"
    stats.unlink(missing_ok=True)
    snap = floor = None
    load_env = {"CONVSTORE_DAEMON_SOCKET": str(daemon)} if daemon else {"CONVSTORE_DAEMON": "0"}
    if remote is not None:
        bg = [] if background is None else ["--background-fetch" if background else "--no-background-fetch"]
        snap = subprocess.Popen(remote + ["snapshotter", str(w / "snap" / "root"), "--socket", str(sock),
                                          "--stats-file", str(stats)] + bg, stderr=subprocess.DEVNULL)
        while not sock.exists():
            assert snap.poll() is None, "the snapshotter exited"
            time.sleep(0.05)
    ctd = Containerd(w / "containerd", sock)
    local = None
    try:
        proxy.reset()
        t0 = time.time()
        if remote is None:
            pull = timed(["ctr", "-a", str(ctd.socket), "images", "pull", "--plain-http", ref])[0]
            run, out = timed(["ctr", "-a", str(ctd.socket), "run", "--rm", ref, "bench"])
            before = (proxy.total(), proxy.bytes)
            # the floor of containerd's own pull: the image is present and unpacked, nothing to fetch
            again = timed(["ctr", "-a", str(ctd.socket), "images", "pull", "--plain-http", ref])[0]
            floor = Start(again, run, 0, proxy.total() - before[0], proxy.bytes - before[1])
        else:
            pull = timed(remote + ["containerd-load", f"{image}:latest", "--address", str(ctd.socket),
                                   "--name", ref], load_env)[0]
            run, out = timed(["ctr", "-a", str(ctd.socket), "run", "--snapshotter", "convstore", "--rm", ref,
                              "bench"])
        requests, req_bytes = proxy.total(), proxy.bytes
        assert out.strip() == "hello", out
        if background:
            local = local_at(stats, t0)
    finally:
        ctd.stop()
        if snap is not None:
            snap.terminate()
            snap.wait(timeout=30)
        unmount_below(w)
        subprocess.run(["rm", "-rf", str(w / "containerd"), str(w / "snap")], check=False)
    start = Start(pull, run, fetched(stats) if remote is not None else 0, requests, req_bytes, local)
    start.floor = floor
    return start


def has_background_fetch() -> bool:
    p = subprocess.run(CS + ["layerstore", "--help"], capture_output=True, text=True)
    return "--background-fetch" in p.stdout


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(results: dict[str, Any], image: str, blob_bytes: int) -> str:
    lines = ["| engine | latency | start | pull / load | run | total | vs local run | vs same at 0 ms | "
             "requests | bytes (proxy) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for engine, by_lat in results.items():
        local_run = med([s["run"] for s in by_lat["0"]["plain"]])
        zero = {}
        for lat, kinds in by_lat.items():
            rows = [("plain pull + run", kinds["plain"]),
                    ("floor: the engine's pull of a present image + local run",
                     [s["floor"] for s in kinds["plain"] if s.get("floor")]),
                    ("convstore, first start", kinds["lazy"][:1]),
                    ("convstore, with profile", kinds["lazy"][1:])]
            if kinds.get("daemon"):
                rows.append(("convstore, with profile, containerd-load through `convstore daemon`", kinds["daemon"]))
            if kinds.get("warm"):
                rows.append(("convstore, with profile, chunks on the node (node cache of the previous start)",
                             kinds["warm"]))
            if kinds.get("background"):
                rows.append(("convstore, with profile, background fetch on", kinds["background"]))
            for name, starts in rows:
                if not starts:
                    continue
                total = med([s["total"] for s in starts])
                if lat == "0":
                    zero[name] = total
                local = [s["local"] for s in starts if s.get("local") is not None]
                extra = f"; image local at {med(local):.1f} s" if local else ""
                lines.append(f"| {engine} | {lat} ms | {name}{extra} | {med([s['pull'] for s in starts]):.2f} s | "
                             f"{med([s['run'] for s in starts]):.2f} s | **{total:.2f} s** | "
                             f"{total / local_run:.1f}x | {total / zero[name]:.2f}x | "
                             f"{med([s['requests'] for s in starts]):.0f} | "
                             f"{med([s['req_bytes'] for s in starts]) / 1e6:.1f} MB |")
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (engine, by_lat) in zip(axes[0], results.items()):
        lats = sorted(by_lat, key=float)
        for name, pick in (("plain pull", lambda k: k["plain"]), ("convstore, first start", lambda k: k["lazy"][:1]),
                           ("convstore, with profile", lambda k: k["lazy"][1:])):
            ys = [med([s["total"] for s in pick(by_lat[lat])]) for lat in lats]
            ax.plot([float(x) for x in lats], ys, marker="o", label=name)
        ax.set_title(f"{engine} ({label})")
        ax.set_xlabel("latency per request (ms)")
        ax.set_ylabel("pull + run (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--label", default="run")
    ap.add_argument("--engines", default="podman,containerd")
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("engines: run as root (podman, containerd, FUSE)")
    ensure_corpus()
    corpus = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"][a.image]
    blob_bytes = sum(lay["size"] for lay in corpus["layers"])
    engines = a.engines.split(",")
    bg_supported = has_background_fetch()
    bg = False if bg_supported else None
    results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    request_log: list[tuple[float, str, str, str, int, int]] = []
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
            for engine in engines:
                for latency in LATENCIES:
                    subprocess.run(local + ["--insecure", "push", f"{a.image}:latest",
                                            f"oci://{reg.host}/convstore-{engine}-{round(latency * 1000)}"],
                                   check=True)
            for engine in engines:
                results[engine] = {}
                for latency in LATENCIES:
                    ms = round(latency * 1000)
                    proxy = CountingProxy(reg.host, latency)
                    ref = f"{proxy.host}/{a.image}:latest"
                    remote = CS + ["--store", f"oci://{proxy.host}/convstore-{engine}-{ms}",
                                   "--insecure", "--key", f"file:{w / 'key'}"]
                    kinds: dict[str, list[dict[str, Any]]] = {"plain": [], "lazy": [], "background": [],
                                                              "daemon": [], "warm": []}
                    daemon = None
                    if engine == "containerd":  # a node's `convstore daemon` (its own start not counted)
                        daemon = w / f"daemon-{ms}" / "cli.sock"
                        daemon.parent.mkdir(mode=0o700)
                        timed(CS + ["daemon", "-b"], {"CONVSTORE_DAEMON_SOCKET": str(daemon)})
                    try:
                        for r in range(a.rounds):
                            print(f"{engine}, latency {ms} ms, round {r + 1}", file=sys.stderr)
                            cache = ["--cache", str(w / f"cache-{engine}-{ms}-{r}")]
                            if engine == "podman":
                                kinds["plain"].append(podman_round(w, ref, None, proxy).to_json())
                                if r == 1 and ms == 0:
                                    proxy.log = []
                                kinds["lazy"].append(podman_round(w, ref, remote + cache, proxy, bg).to_json())
                                if proxy.log is not None:
                                    request_log, proxy.log = proxy.log, None
                            else:
                                kinds["plain"].append(containerd_round(w, ref, a.image, None, proxy).to_json())
                                kinds["lazy"].append(containerd_round(w, ref, a.image, remote + cache, proxy,
                                                                      bg).to_json())
                                if r >= 1:  # with a profile, cold node cache, containerd-load in the daemon
                                    kinds["daemon"].append(containerd_round(
                                        w, ref, a.image, remote + ["--cache", str(w / f"cache-{engine}-{ms}-{r}d")],
                                        proxy, bg, daemon).to_json())
                            if r >= 1 and ms == 0:  # the same start again, its chunks in the node cache
                                print(f"{engine}, latency {ms} ms, round {r + 1}, chunks local", file=sys.stderr)
                                kinds["warm"].append((podman_round(w, ref, remote + cache, proxy, bg)
                                                      if engine == "podman" else
                                                      containerd_round(w, ref, a.image, remote + cache, proxy, bg)
                                                      ).to_json())
                        if bg_supported:
                            print(f"{engine}, latency {ms} ms, background fetch on", file=sys.stderr)
                            cache = ["--cache", str(w / f"cache-{engine}-{ms}-bg")]
                            if engine == "podman":
                                kinds["background"].append(podman_round(w, ref, remote + cache, proxy,
                                                                        True).to_json())
                            else:
                                kinds["background"].append(containerd_round(w, ref, a.image, remote + cache,
                                                                            proxy, True).to_json())
                    finally:
                        proxy.stop()
                        if daemon is not None:
                            subprocess.run(CS + ["daemon", "--stop"], env={**os.environ,
                                                                          "CONVSTORE_DAEMON_SOCKET": str(daemon)},
                                           capture_output=True, check=False)
                    results[engine][str(ms)] = kinds
        finally:
            reg.stop()
    text = (f"`python -m benchmarks.engines --image {a.image} --rounds {a.rounds} --label {a.label}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, image {a.image} "
            f"({blob_bytes / 1e6:.1f} MB of gzip layers), medians of {a.rounds} rounds (the first convstore start "
            f"of each setting alone; see the script's doc for the set-up). `vs local run`: the total against the "
            f"same engine's run of an image it has already pulled (0 ms); `vs same at 0 ms`: the same kind of "
            f"start at 0 ms. requests/bytes: every request through the proxy from pull to ready.\n\n"
            + table(results, a.image, blob_bytes))
    print(text)
    outdir = REPO / "benchmarks" / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / f"engines-{a.label}.json").write_text(json.dumps(results, indent=1))
    if request_log:
        (outdir / f"engines-{a.label}-podman-profile-requests.txt").write_text(
            "\n".join(f"{t:8.3f} {m} {path.split('?')[0]} {rng or '-'} {st} {n}"
                       for t, m, path, rng, st, n in request_log) + "\n")
    plot(results, REPO / "docs" / "img" / f"engines-latency-{a.label}.png", a.label)
    if a.write_docs:
        write_block("engines-starts", "Start times", text, docs=DOCS)


if __name__ == "__main__":
    main()
