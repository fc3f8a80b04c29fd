"""A fleet, not a node: N nodes on this machine starting one image at once.

    sudo .venv/bin/python -m benchmarks.fleet [--nodes 50] [--image app1] [--origin registry] [--write-docs]

Each node is a separate ``convstore run IMAGE -- python3 -c pass`` process
(no daemon) with its own registry cache (``--cache``) and trust state
(``$CONVSTORE_STATE_DIR``): a FUSE mount, runc, the image's start-up profile
prefetched (recorded once before the measurement, as a deployed image has).
All N are started at once; a node's start is its process's wall time.

The origin is Debian's docker-registry in a network namespace of its own,
reached over a veth pair whose origin side is shaped by ``tbf`` to
``--origin-mbit`` (1000: a site's uplink to its registry or object store;
0: unshaped), behind the project's latency proxy (tests/netproxy.py, ``DelayProxy``: one
asyncio loop, as a proxy thread per connection starved on the GIL with 800
connections at once) at ``--origin-ms`` (30) per request, which also counts the requests and bytes
the origin served.  The site tier is nginx with
contrib/site-tier/nginx.conf (proxy_cache + slice + proxy_cache_lock, cold at
the start of its run) in front of that proxy, reached by the nodes through a
second latency proxy at ``--tier-ms`` (2), which counts what the tier served.
This kernel has no netem, so latency comes from the proxies; the tier and
the nodes share loopback (unshaped).  The simulated network and the machines
behind it (this process's proxies, the origin registry, the tier's nginx) run
at niceness -10 and the nodes at 0, as they would not share the nodes' CPU on
a real site.

Measured in the same run: one node alone (cold, no tier) -- the reference
start and the CPU seconds of one start (user+sys of the node process and its
children: runc, the container) -- and the CPU floor N x those CPU seconds /
cores; the fleet without and with the tier; and the same N nodes pulling the
plain image at once (``skopeo copy docker://... dir:NODE``, each to its own
folder) through the same 30 ms proxy.

``--origin s3`` needs the S3 store (not on this branch yet): refused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from corpus_bench import CORPUS_DIR, ensure_corpus  # noqa: E402
from docblock import write_block  # noqa: E402
from netproxy import DelayProxy  # noqa: E402
from site_tier import SiteTier  # noqa: E402

CLI = [sys.executable, "-m", "convstore.cli", "--quiet"]
IMG = ROOT / "docs" / "img"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


#: the simulated network (this process's latency proxies) and the machines behind it (the origin
#: registry, the tier's nginx: started from here) run at this niceness, the nodes at 0: on a real site
#: they do not take the nodes' CPU, and a proxy starved by 50 busy nodes would measure itself
NETWORK_NICE = -10


def _node_priority() -> None:
    os.nice(-NETWORK_NICE)


def launch(cmds: list[tuple[list[str], dict[str, str]]]) -> list[dict[str, float | int | str]]:
    """Start every command at once; per process: wall seconds, CPU seconds (its own and its
    waited-for children's, from wait4), exit code, the end of its stderr."""
    results: list[dict[str, float | int | str]] = [{} for _ in cmds]
    procs = []
    t0 = time.perf_counter()
    for cmd, env in cmds:
        procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, preexec_fn=_node_priority))

    def reap(i: int, p: subprocess.Popen[bytes]) -> None:
        assert p.stderr is not None
        err = p.stderr.read()
        _pid, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        text = err.decode(errors="replace")
        summary_line = next((x for x in reversed(text.splitlines()) if x.startswith("{")), "")
        try:
            run_json = json.loads(summary_line) if summary_line else {}
        except ValueError:
            run_json = {}
        results[i] = {"seconds": time.perf_counter() - t0, "cpu": ru.ru_utime + ru.ru_stime,
                      "code": p.returncode, "err": text[-300:], "run": run_json}

    threads = [threading.Thread(target=reap, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class ShapedOrigin:
    """docker-registry in its own network namespace behind a veth pair whose origin side sends at
    ``mbit`` (tbf); ``host`` is its address as seen from here.  Torn down by :meth:`stop`."""

    def __init__(self, root: Path, mbit: float):
        tag = f"cvf{os.getpid() % 100000}"
        self.ns, self.dev = tag, f"{tag}a"
        net = 100 + os.getpid() % 150
        here, there = f"10.{net}.77.1", f"10.{net}.77.2"
        self.proc: subprocess.Popen[bytes] | None = None
        steps = [["ip", "netns", "add", self.ns],
                 ["ip", "link", "add", self.dev, "type", "veth", "peer", "name", f"{tag}b"],
                 ["ip", "link", "set", f"{tag}b", "netns", self.ns],
                 ["ip", "addr", "add", f"{here}/30", "dev", self.dev], ["ip", "link", "set", self.dev, "up"],
                 ["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{there}/30", "dev", f"{tag}b"],
                 ["ip", "netns", "exec", self.ns, "ip", "link", "set", f"{tag}b", "up"],
                 ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"]]
        if mbit:
            steps.append(["ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", f"{tag}b", "root", "tbf",
                          "rate", f"{mbit:g}mbit", "burst", "512kb", "latency", "200ms"])
        try:
            for st in steps:
                subprocess.run(st, check=True, capture_output=True)
            root.mkdir(parents=True, exist_ok=True)
            self.host = f"{there}:5000"
            (root / "config.yml").write_text(
                f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
                f"http: {{addr: {self.host}}}\n")
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "docker-registry", "serve",
                                          str(root / "config.yml")], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection((there, 5000), 0.2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("docker-registry did not start in its namespace") from None
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def node_cmds(w: Path, tag: str, n: int, store_url: str, key: str, site: str | None,
              image: str) -> list[tuple[list[str], dict[str, str]]]:
    out = []
    for i in range(n):
        # bytecode as an installed package has it (compiled once, by the recording run: a sandbox's
        # PYTHONDONTWRITEBYTECODE would otherwise make every node compile every module it imports)
        env = dict(os.environ, CONVSTORE_DAEMON="0", CONVSTORE_KEY=key,
                   CONVSTORE_STATE_DIR=str(w / tag / f"state{i}"), PYTHONPYCACHEPREFIX=str(w / "pycache"))
        env.pop("CONVSTORE_SITE_CACHE", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cmd = [*CLI, "--insecure", "--store", store_url, "--cache", str(w / tag / f"cache{i}"),
               *(["--site-cache", site] if site else []), "run", "--json", f"{image}:latest", "--", "python3", "-c", "pass"]
        out.append((cmd, env))
    return out


def cpu_pressure() -> float | None:
    """/proc/pressure/cpu ``some avg60``: the share of the last minute some task here waited for a CPU
    (this machine is shared: a high value says other work competed with the fleet)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("avg60=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def summary(rs: list[dict[str, float | int | str]]) -> dict[str, float | int | list[str]]:
    secs = [float(r["seconds"]) for r in rs]
    fails = [str(r["err"]) for r in rs if r["code"] != 0]
    tiers = [r["run"].get("site_tier") for r in rs if isinstance(r.get("run"), dict)]  # type: ignore[union-attr]
    tier = {k: sum(int(t[k]) for t in tiers if t) for k in ("tier_chunks", "origin_chunks", "tier_failures",
                                                             "tier_lies")} if any(tiers) else None
    cores = os.cpu_count() or 1
    return {"n": len(rs), "site_tier": tier, "machine_share": sum(float(r["cpu"]) for r in rs) / (max(secs) * cores),
            "cpu_pressure": cpu_pressure(), "p50": pct(secs, 0.5), "p99": pct(secs, 0.99), "max": max(secs),
            "cpu_per_start": statistics.mean(float(r["cpu"]) for r in rs), "failed": len(fails),
            "fail_samples": fails[:3], "times": sorted(secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--origin", choices=("registry", "s3"), default="registry")
    ap.add_argument("--origin-ms", type=float, default=30.0)
    ap.add_argument("--origin-mbit", type=float, default=1000.0, help="the origin's uplink (tbf); 0: unshaped")
    ap.add_argument("--tier-ms", type=float, default=2.0)
    ap.add_argument("--tier-mode", choices=("range", "slice"), default="range",
                    help="the tier's cache key: the nodes' ranges, or fixed slices (contrib/site-tier/nginx.conf)")
    ap.add_argument("--slice", default="256k", help="the tier's nginx slice size (slice mode)")
    ap.add_argument("--alone", type=int, default=3, help="runs of one node alone (median)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write the raw results here")
    a = ap.parse_args()
    if a.origin == "s3":
        sys.exit("fleet: --origin s3 needs the S3 store (convstore/stores/s3.py), not on this branch yet")
    if os.geteuid() != 0:
        sys.exit("fleet: convstore run needs root (FUSE, runc)")
    ensure_corpus()
    os.nice(NETWORK_NICE)
    cores = os.cpu_count() or 1
    w = Path(tempfile.mkdtemp(prefix="convstore-fleet-"))
    res: dict[str, object] = {"nodes": a.nodes, "image": a.image, "cores": cores, "origin_ms": a.origin_ms,
                              "tier_ms": a.tier_ms, "origin_mbit": a.origin_mbit, "tier_mode": a.tier_mode if a.tier_mode == "range" else f"slice {a.slice}"}
    reg = ShapedOrigin(w / "registry", a.origin_mbit)
    origin = DelayProxy(reg.host, a.origin_ms / 1e3)
    try:
        key = f"file:{w / 'master.key'}"
        local = [*CLI, "--store", str(w / "local"), "--key", key]
        subprocess.run([*local, "pack", f"oci:{CORPUS_DIR / a.image}:latest", f"{a.image}:latest"], check=True)
        url = f"oci://{reg.host}/fleet"
        subprocess.run([*local, "--insecure", "push", f"{a.image}:latest", url], check=True, capture_output=True)
        # the start-up profile, recorded once (a deployed image has one)
        rec = launch(node_cmds(w, "record", 1, url, key, None, a.image))
        assert rec[0]["code"] == 0, rec[0]["err"]
        skopeo = subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                 f"oci:{CORPUS_DIR / a.image}:latest", f"docker://{reg.host}/plain/{a.image}:latest"],
                                capture_output=True, text=True)
        assert skopeo.returncode == 0, skopeo.stderr
        ourl = f"oci://{origin.host}/fleet"

        # one node alone, cold, no tier
        alone = []
        for r in range(a.alone):
            origin.reset()
            [one] = launch(node_cmds(w, f"alone{r}", 1, ourl, key, None, a.image))
            assert one["code"] == 0, one["err"]
            alone.append((float(one["seconds"]), float(one["cpu"]), origin.counts["GET blob"],
                          origin.sent_bytes))
        alone.sort()
        t1, cpu1, blob1, bytes1 = alone[len(alone) // 2]
        cpu1 = statistics.median(x[1] for x in alone)
        floor = a.nodes * cpu1 / cores
        res["alone"] = {"seconds": t1, "cpu": cpu1, "origin_blob_requests": blob1, "origin_bytes": bytes1,
                        "all": alone}
        res["cpu_floor"] = floor
        print(f"one node: {t1:.2f} s, {cpu1:.2f} CPU s, origin {bytes1 / 1e6:.1f} MB; floor {floor:.1f} s",
              file=sys.stderr)

        # the fleet straight to the origin
        origin.reset()
        direct = summary(launch(node_cmds(w, "direct", a.nodes, ourl, key, None, a.image)))
        direct.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total(), tier_bytes=0,
                      distinct_ranges=len(origin.ranges), ranges=sum(origin.ranges.values()))
        res["fleet_direct"] = direct
        print(f"fleet, no tier: p50 {direct['p50']:.2f} p99 {direct['p99']:.2f} failed {direct['failed']}",
              file=sys.stderr)

        # the fleet through a cold site tier
        origin.reset()
        tier = SiteTier(w / "tier", origin.host, mode=a.tier_mode, slice_size=a.slice)
        near = DelayProxy(tier.host, a.tier_ms / 1e3)
        try:
            tiered = summary(launch(node_cmds(w, "tiered", a.nodes, ourl, key, f"http://{near.host}", a.image)))
            tiered.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total(),
                          tier_bytes=near.sent_bytes, tier_requests=near.total(),
                          origin_repeated_ranges=sum(1 for v in origin.ranges.values() if v > 1))
        finally:
            near.stop()
            tier.stop()
        res["fleet_tier"] = tiered
        print(f"fleet, tier: p50 {tiered['p50']:.2f} p99 {tiered['p99']:.2f} failed {tiered['failed']}",
              file=sys.stderr)

        # the same fleet pulling the plain image
        origin.reset()
        env = dict(os.environ)
        plain = summary(launch([(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                  f"docker://{origin.host}/plain/{a.image}:latest", f"dir:{w / f'plain{i}'}"],
                                 env) for i in range(a.nodes)]))
        plain.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total())
        res["fleet_plain_pull"] = plain
        print(f"plain pull fleet: p50 {plain['p50']:.2f} p99 {plain['p99']:.2f}", file=sys.stderr)
    finally:
        origin.stop()
        reg.stop()
        subprocess.run(["sh", "-c", f"grep ' {w}/' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 fusermount3 -uz"],
                       capture_output=True)
        shutil.rmtree(w, ignore_errors=True)

    text = render(res)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    plot(res, IMG / f"fleet_cdf_{a.nodes}{'' if a.tier_mode == 'range' else '_slice'}.png")
    if a.write_docs:
        write_block(f"fleet-{a.nodes}", f"A fleet of {a.nodes} nodes starting one image at once", text)


def render(res: dict[str, object]) -> str:
    al = res["alone"]
    assert isinstance(al, dict)
    t1, floor = float(al["seconds"]), float(res["cpu_floor"])  # type: ignore[arg-type]
    ref = max(t1, floor)
    one_bytes = float(al["origin_bytes"])
    lines = [f"{res['nodes']} nodes on {res['cores']} cores, image {res['image']}, origin {res['origin_ms']:g} ms "
             f"away (uplink {res['origin_mbit']:g} Mbit/s, tbf), site tier {res['tier_ms']:g} ms (nginx, cache key: {res['tier_mode']}). One node alone (cold, no tier): "
             f"{t1:.2f} s, {float(al['cpu']):.2f} CPU s a start, origin served {one_bytes / 1e6:.1f} MB. "
             f"CPU floor = {res['nodes']} x {float(al['cpu']):.2f} s / {res['cores']} cores = {floor:.1f} s.",
             "",
             "| fleet | p50 s | p99 s | max s | p99 / max(one node, CPU floor) | CPU s a start | share of the "
             "machine's CPU the fleet got | CPU pressure (avg60) | failed | origin MB (x one node) | tier MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, k in (("convstore run, no tier", "fleet_direct"), ("convstore run, site tier", "fleet_tier"),
                    ("skopeo copy of the plain image", "fleet_plain_pull")):
        f = res[k]
        assert isinstance(f, dict)
        ob = float(f["origin_bytes"])
        tb = f.get("tier_bytes")
        lines.append(f"| {name} | {f['p50']:.2f} | {f['p99']:.2f} | {f['max']:.2f} | {f['p99'] / ref:.2f} | "
                     f"{f['cpu_per_start']:.2f} | {f['machine_share']:.0%} | {f['cpu_pressure']}% | {f['failed']} | {ob / 1e6:.1f} ({ob / one_bytes:.2f}x) | "
                     f"{'' if tb is None else f'{float(tb) / 1e6:.1f}'} |")
    ft, fp = res["fleet_tier"], res["fleet_plain_pull"]
    assert isinstance(ft, dict) and isinstance(fp, dict)
    lines += ["", f"Site tier counters summed over the nodes: {ft.get('site_tier')}.",
              "", f"With the tier: p99 {ft['p99']:.2f} s vs the plain pull fleet's {fp['p99']:.2f} s "
                  f"({fp['p99'] / ft['p99']:.1f}x faster); origin ranges fetched more than once: "
                  f"{ft.get('origin_repeated_ranges')}."]
    return "\n".join(lines)


def plot(res: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, k in (("convstore run, no tier", "fleet_direct"), ("convstore run, site tier", "fleet_tier"),
                    ("skopeo copy (plain pull)", "fleet_plain_pull")):
        f = res[k]
        assert isinstance(f, dict)
        xs = f["times"]
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    al = res["alone"]
    assert isinstance(al, dict)
    ax.axvline(float(al["seconds"]), ls=":", c="grey", label="one node alone")
    ax.axvline(float(res["cpu_floor"]), ls="--", c="grey", label="CPU floor")  # type: ignore[arg-type]
    ax.set_xlabel("seconds from launch to exit")
    ax.set_ylabel("fraction of nodes started")
    ax.set_title(f"{res['nodes']} nodes starting {res['image']} at once")
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    main()
