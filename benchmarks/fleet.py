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

``--node-daemon``: each node also runs as a node of a real fleet would, with
convstore's services up before the clock: its own ``convstore daemon`` (its
own socket under the node's state folder, at the nodes' priority), and each
start is ``convstore run`` through it (a fork of a loaded interpreter, not a
fresh one).  A start's CPU seconds are then its client's and the daemon's
(with the command it forked and that one's children: runc, the container)
in the start's window; measured alone too, for its own CPU floor.

``--origin s3``: the origin is an ``s3://fleet/IMAGE`` store on SeaweedFS's
S3 gateway (``weed server -s3``) in the same network namespace, behind the
same veth/tbf and the same 30 ms proxy; the tier fronts it with the same
nginx config (pack objects only, keyed on the nodes' ranges).  ``--origin
both`` (the default) measures both origins in one run, then the plain pull
fleet once (from the registry).
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
# a node with a daemon: the command line's own entry point, which hands the command to the daemon
DAEMON_CLI = [sys.executable, "-m", "convstore", "--quiet"]
DAEMON = [sys.executable, "-m", "convstore", "daemon"]
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


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` (utime stime cutime cstime) and of its live descendants; 0 for one gone."""
    tick = os.sysconf("SC_CLK_TCK")
    try:  # the process first, then its children: a child reaped in between is in its cutime, or missed
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except (OSError, ValueError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / tick + sum(_tree_cpu(c) for c in kids)


class NodeDaemons:
    """One ``convstore daemon`` per node (``--node-daemon``): started before the clock, each with its
    own socket (the node's ``$CONVSTORE_DAEMON_SOCKET``), stopped by :meth:`stop`."""

    def __init__(self, cmds: list[tuple[list[str], dict[str, str]]]):
        self.socks: list[tuple[str, dict[str, str]]] = []
        self.pids: list[int] = []
        try:
            for _cmd, env in cmds:
                sock = env["CONVSTORE_DAEMON_SOCKET"]
                Path(sock).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                subprocess.run([*DAEMON, "--background", "--socket", sock], env=env, check=True,
                               capture_output=True, preexec_fn=_node_priority)
                self.socks.append((sock, env))
                info = subprocess.run([*DAEMON, "--socket", sock, "--status"], env=env, check=True,
                                      capture_output=True, text=True).stdout
                self.pids.append(int(json.loads(info)["pid"]))
        except BaseException:
            self.stop()
            raise

    def cpu(self) -> list[float]:
        """Each daemon's CPU seconds so far: its own, its reaped children's and its live children's (a
        command's child reports its exit status before the daemon reaps it, so at a client's end its CPU
        may not be in the daemon's cutime yet; a live spare is counted too)."""
        return [_tree_cpu(pid) for pid in self.pids]

    def stop(self) -> None:
        for sock, env in self.socks:
            subprocess.run([*DAEMON, "--socket", sock, "--stop"], env=env, capture_output=True)
        self.socks = []


def launch(cmds: list[tuple[list[str], dict[str, str]]],
           daemons: NodeDaemons | None = None) -> list[dict[str, float | int | str]]:
    """Start every command at once; per process: wall seconds, CPU seconds (its own and its
    waited-for children's, from wait4; with ``daemons``, plus what its node's daemon spent
    meanwhile), exit code, the end of its stderr."""
    results: list[dict[str, float | int | str]] = [{} for _ in cmds]
    before = daemons.cpu() if daemons is not None else None
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
    if daemons is not None and before is not None:
        # the daemon reaps a command before it tells the client its status: its CPU is counted by now
        for r, b, a in zip(results, before, daemons.cpu()):
            r["cpu"] = float(r["cpu"]) + a - b
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
              image: str, base_env: dict[str, str] | None = None,
              daemon: bool = False) -> list[tuple[list[str], dict[str, str]]]:
    """The start of each of ``n`` nodes; with ``daemon``, through the node's own daemon (NodeDaemons)."""
    out = []
    for i in range(n):
        # bytecode as an installed package has it (compiled once, by the recording run: a sandbox's
        # PYTHONDONTWRITEBYTECODE would otherwise make every node compile every module it imports)
        env = dict(base_env if base_env is not None else os.environ, CONVSTORE_DAEMON="0", CONVSTORE_KEY=key,
                   CONVSTORE_STATE_DIR=str(w / tag / f"state{i}"), PYTHONPYCACHEPREFIX=str(w / "pycache"),
                   # each node its own kept mounts (engines/keeper.py: a user's keepers are found by store and
                   # digest, so nodes sharing one directory would start on one another's mounts)
                   CONVSTORE_KEEP_DIR=str(w / tag / f"keep{i}"),
                   # and none kept: a node starts the image once, and a keeper (a process of its own, not the
                   # daemon's child) would serve the start's reads where its CPU is not counted
                   CONVSTORE_KEEP_MOUNT="0")
        env.pop("CONVSTORE_SITE_CACHE", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        # the start is what is measured: a node's background fetch of the rest of the image (on by default)
        # would add whatever distinct ranges it reaches while the node lives -- 30 s in a starved fleet,
        # under a second alone -- to the origin's bytes, so only with --background-fetch
        env["CONVSTORE_BACKGROUND_FETCH"] = "on" if BACKGROUND_FETCH else "off"
        if daemon:
            env.pop("CONVSTORE_DAEMON")
            env["CONVSTORE_DAEMON_SOCKET"] = str(w / tag / f"daemon{i}" / "cli.sock")
        cmd = [*(DAEMON_CLI if daemon else CLI), "--insecure", "--store", store_url, "--cache", str(w / tag / f"cache{i}"),
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


class ShapedS3:
    """SeaweedFS's S3 gateway (``weed server -s3``, the venv's ``weed``) in the origin's network
    namespace (``ns``, at ``ip``: behind the same veth and tbf as the registry), with one bucket."""

    BUCKET = "fleet"

    def __init__(self, root: Path, ns: str, ip: str):
        from s3_fixtures import ACCESS_KEY, SECRET_KEY, weed_exe

        root.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [
            {"name": "convstore", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        os.chmod(root / "s3.json", 0o600)
        self.endpoint = f"http://{ip}:8333"
        self.host = f"{ip}:8333"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        self.log = open(root / "weed.log", "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, weed_exe(), "server", f"-dir={root / 'data'}",
                                      f"-ip={ip}", f"-ip.bind={ip}", "-s3", f"-s3.config={root / 's3.json'}",
                                      "-s3.port=8333", "-s3.port.iceberg=0", "-s3.port.lance=0",
                                      "-s3.autoCreateBucket=false", "-metricsPort=0", "-master.volumeSizeLimitMB=64",
                                      "-volume.max=100"], stdout=self.log, stderr=self.log)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        deadline = time.monotonic() + 90
        while True:  # the gateway answers once the filer is up; the bucket once a volume can be made
            try:
                s3.create_bucket(Bucket=self.BUCKET)
                break
            except Exception as e:
                if "BucketAlready" in type(e).__name__ or "BucketAlready" in str(e):
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start in the namespace: {e}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def one_origin(a: argparse.Namespace, w: Path, kind: str, key: str, upstream: str, url_for,  # noqa: ANN001
               env: dict[str, str], cores: int) -> dict[str, object]:
    """One node alone (x ``a.alone``), the fleet without and with a cold site tier, against the
    origin ``upstream`` (host:port) reached through a ``a.origin_ms`` proxy; ``url_for(proxy_host)``
    is the store URL the nodes open."""
    blob = "GET pack" if kind == "s3" else "GET blob"
    origin = DelayProxy(upstream, a.origin_ms / 1e3)
    res: dict[str, object] = {}
    try:
        ourl = url_for(origin.host)
        nenv = dict(env, CONVSTORE_S3_ENDPOINT=f"http://{origin.host}") if kind == "s3" else env
        alone = []
        for r in range(a.alone):
            origin.reset()
            [one] = launch(node_cmds(w, f"{kind}-alone{r}", 1, ourl, key, None, a.image, nenv))
            assert one["code"] == 0, one["err"]
            alone.append((float(one["seconds"]), float(one["cpu"]), origin.counts[blob], origin.sent_bytes))
        alone.sort()
        t1, _cpu, blob1, bytes1 = alone[len(alone) // 2]
        cpu1 = statistics.median(x[1] for x in alone)
        floor = a.nodes * cpu1 / cores
        res["alone"] = {"seconds": t1, "cpu": cpu1, "origin_blob_requests": blob1, "origin_bytes": bytes1,
                        "all": alone}
        res["cpu_floor"] = floor
        print(f"{kind}: one node: {t1:.2f} s, {cpu1:.2f} CPU s, origin {bytes1 / 1e6:.1f} MB; floor {floor:.1f} s",
              file=sys.stderr)

        origin.reset()
        direct = summary(launch(node_cmds(w, f"{kind}-direct", a.nodes, ourl, key, None, a.image, nenv)))
        direct.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total(), tier_bytes=0,
                      distinct_ranges=len(origin.ranges), ranges=sum(origin.ranges.values()))
        res["fleet_direct"] = direct
        print(f"{kind}: fleet, no tier: p50 {direct['p50']:.2f} p99 {direct['p99']:.2f} failed {direct['failed']}",
              file=sys.stderr)

        origin.reset()
        tier = SiteTier(w / f"{kind}-tier", origin.host, mode=a.tier_mode, slice_size=a.slice)
        near = DelayProxy(tier.host, a.tier_ms / 1e3)
        try:
            tiered = summary(launch(node_cmds(w, f"{kind}-tiered", a.nodes, ourl, key, f"http://{near.host}",
                                              a.image, nenv)))
            tiered.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total(),
                          tier_bytes=near.sent_bytes, tier_requests=near.total(),
                          origin_repeated_ranges=sum(1 for v in origin.ranges.values() if v > 1))
        finally:
            near.stop()
            tier.stop()
        res["fleet_tier"] = tiered
        print(f"{kind}: fleet, tier: p50 {tiered['p50']:.2f} p99 {tiered['p99']:.2f} failed {tiered['failed']}",
              file=sys.stderr)
        if a.node_daemon:
            res.update(daemon_fleets(a, w, kind, key, ourl, nenv, origin, cores, blob))
    finally:
        origin.stop()
    return res


def daemon_fleets(a: argparse.Namespace, w: Path, kind: str, key: str, ourl: str, nenv: dict[str, str],
                  origin: DelayProxy, cores: int, blob: str) -> dict[str, object]:
    """``--node-daemon``: one node alone (x ``a.alone``) and the fleet with and without the tier, each
    node starting through its own daemon (started before the clock)."""
    res: dict[str, object] = {}
    alone = []
    for r in range(a.alone):
        cmds = node_cmds(w, f"{kind}-dalone{r}", 1, ourl, key, None, a.image, nenv, daemon=True)
        daemons = NodeDaemons(cmds)
        try:
            origin.reset()
            [one] = launch(cmds, daemons)
        finally:
            daemons.stop()
        assert one["code"] == 0, one["err"]
        alone.append((float(one["seconds"]), float(one["cpu"]), origin.counts[blob], origin.sent_bytes))
    alone.sort()
    t1, _cpu, blob1, bytes1 = alone[len(alone) // 2]
    cpu1 = statistics.median(x[1] for x in alone)
    res["daemon_alone"] = {"seconds": t1, "cpu": cpu1, "origin_blob_requests": blob1, "origin_bytes": bytes1,
                           "all": alone}
    res["daemon_cpu_floor"] = a.nodes * cpu1 / cores
    print(f"{kind}: one daemon node: {t1:.2f} s, {cpu1:.2f} CPU s; floor {res['daemon_cpu_floor']:.1f} s",
          file=sys.stderr)
    for name, tiered in (("daemon_fleet_direct", False), ("daemon_fleet_tier", True)):
        tier = near = None
        if tiered:
            tier = SiteTier(w / f"{kind}-dtier", origin.host, mode=a.tier_mode, slice_size=a.slice)
            near = DelayProxy(tier.host, a.tier_ms / 1e3)
        cmds = node_cmds(w, f"{kind}-{name}", a.nodes, ourl, key, f"http://{near.host}" if near else None,
                         a.image, nenv, daemon=True)
        daemons = NodeDaemons(cmds)
        try:
            origin.reset()
            if near is not None:
                near.reset()
            f = summary(launch(cmds, daemons))
            f.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total(),
                     tier_bytes=near.sent_bytes if near else 0,
                     origin_repeated_ranges=sum(1 for v in origin.ranges.values() if v > 1))
        finally:
            daemons.stop()
            if near is not None:
                near.stop()
            if tier is not None:
                tier.stop()
        res[name] = f
        print(f"{kind}: {name}: p50 {f['p50']:.2f} p99 {f['p99']:.2f} failed {f['failed']}", file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--origin", choices=("registry", "s3", "both"), default="both",
                    help="the origin store: a registry (docker-registry), S3 (SeaweedFS), or both in one run")
    ap.add_argument("--origin-ms", type=float, default=30.0)
    ap.add_argument("--origin-mbit", type=float, default=1000.0, help="the origin's uplink (tbf); 0: unshaped")
    ap.add_argument("--tier-ms", type=float, default=2.0)
    ap.add_argument("--tier-mode", choices=("range", "slice"), default="range",
                    help="the tier's cache key: the nodes' ranges, or fixed slices (contrib/site-tier/nginx.conf; "
                         "registry origins only: SigV4 signs an S3 request's Range)")
    ap.add_argument("--slice", default="256k", help="the tier's nginx slice size (slice mode)")
    ap.add_argument("--alone", type=int, default=3, help="runs of one node alone (median)")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--background-fetch", action="store_true",
                    help="let each node fetch the rest of the image in the background (off: the start is measured)")
    ap.add_argument("--json", metavar="FILE", help="write the raw results here")
    ap.add_argument("--node-daemon", action="store_true",
                    help="also measure nodes that start through their own convstore daemon (started before the clock)")
    a = ap.parse_args()
    global BACKGROUND_FETCH
    BACKGROUND_FETCH = a.background_fetch
    if a.origin != "registry" and a.tier_mode == "slice":
        sys.exit("fleet: --tier-mode slice needs --origin registry (an S3 request signs its Range header)")
    if os.geteuid() != 0:
        sys.exit("fleet: convstore run needs root (FUSE, runc)")
    ensure_corpus()
    os.nice(NETWORK_NICE)
    cores = os.cpu_count() or 1
    kinds = ["registry", "s3"] if a.origin == "both" else [a.origin]
    w = Path(tempfile.mkdtemp(prefix="convstore-fleet-"))
    res: dict[str, object] = {"nodes": a.nodes, "image": a.image, "cores": cores, "origin_ms": a.origin_ms,
                              "tier_ms": a.tier_ms, "origin_mbit": a.origin_mbit, "origins": kinds,
                              "tier_mode": a.tier_mode if a.tier_mode == "range" else f"slice {a.slice}"}
    t_start = time.monotonic()
    reg = ShapedOrigin(w / "registry", a.origin_mbit)
    s3: ShapedS3 | None = None
    try:
        key = f"file:{w / 'master.key'}"
        local = [*CLI, "--store", str(w / "local"), "--key", key]
        subprocess.run([*local, "pack", f"oci:{CORPUS_DIR / a.image}:latest", f"{a.image}:latest"], check=True)
        skopeo = subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                 f"oci:{CORPUS_DIR / a.image}:latest", f"docker://{reg.host}/plain/{a.image}:latest"],
                                capture_output=True, text=True)
        assert skopeo.returncode == 0, skopeo.stderr
        for kind in kinds:
            env = dict(os.environ)
            if kind == "registry":
                url, upstream = f"oci://{reg.host}/fleet", reg.host
                url_for = lambda host: f"oci://{host}/fleet"  # noqa: E731
            else:
                s3 = ShapedS3(w / "s3", reg.ns, reg.host.split(":")[0])
                env.update(s3.env)
                url, upstream = f"s3://{ShapedS3.BUCKET}/{a.image}", s3.host
                url_for = lambda host: f"s3://{ShapedS3.BUCKET}/{a.image}"  # noqa: E731
            push_env = dict(env, CONVSTORE_S3_ENDPOINT=s3.endpoint) if kind == "s3" and s3 else env
            p = subprocess.run([*local, "--insecure", "push", f"{a.image}:latest", url], env=push_env,
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            # the start-up profile, recorded once (a deployed image has one)
            rec = launch(node_cmds(w, f"{kind}-record", 1, url, key, None, a.image, push_env))
            assert rec[0]["code"] == 0, rec[0]["err"]
            res[kind] = one_origin(a, w, kind, key, upstream, url_for, env, cores)
            if s3 is not None:
                s3.stop()
                s3 = None

        # the same fleet pulling the plain image (from the registry)
        origin = DelayProxy(reg.host, a.origin_ms / 1e3)
        try:
            plain = summary(launch([(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                      f"docker://{origin.host}/plain/{a.image}:latest", f"dir:{w / f'plain{i}'}"],
                                     dict(os.environ)) for i in range(a.nodes)]))
            plain.update(origin_bytes=origin.sent_bytes, origin_requests=origin.total())
        finally:
            origin.stop()
        res["fleet_plain_pull"] = plain
        print(f"plain pull fleet: p50 {plain['p50']:.2f} p99 {plain['p99']:.2f}", file=sys.stderr)
    finally:
        if s3 is not None:
            s3.stop()
        reg.stop()
        subprocess.run(["sh", "-c", f"grep ' {w}/' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 fusermount3 -uz"],
                       capture_output=True)
        shutil.rmtree(w, ignore_errors=True)
    res["run_minutes"] = (time.monotonic() - t_start) / 60

    text = render(res)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    both = a.origin == "both"
    plot(res, IMG / f"fleet_cdf_{a.nodes}{'_both' if both else '_s3' if a.origin == 's3' else ''}"
              f"{'' if a.tier_mode == 'range' else '_slice'}{'_daemon' if a.node_daemon else ''}.png")
    if a.write_docs:
        name = f"fleet-{a.nodes}{'-both' if both else '-s3' if a.origin == 's3' else ''}"
        write_block(name, f"A fleet of {a.nodes} nodes starting one image at once"
                          f"{', registry and S3 origins' if both else ''}", text)


NAMES = {"registry": "registry", "s3": "S3 (SeaweedFS)"}
BACKGROUND_FETCH = False  # --background-fetch


def render(res: dict[str, object]) -> str:
    kinds = res["origins"]
    assert isinstance(kinds, list)
    lines = [f"{res['nodes']} nodes on {res['cores']} cores, image {res['image']}, origin {res['origin_ms']:g} ms "
             f"away (uplink {res['origin_mbit']:g} Mbit/s, tbf), site tier {res['tier_ms']:g} ms (nginx, cache key: "
             f"{res['tier_mode']}); one run of {float(res.get('run_minutes', 0)):.1f} min."]
    for kind in kinds:
        r = res[kind]
        assert isinstance(r, dict)
        al = r["alone"]
        lines.append(f"{NAMES[kind]} origin: one node alone (cold, no tier) {float(al['seconds']):.2f} s, "
                     f"{float(al['cpu']):.2f} CPU s a start, origin served {float(al['origin_bytes']) / 1e6:.1f} MB; "
                     f"CPU floor = {res['nodes']} x {float(al['cpu']):.2f} s / {res['cores']} cores = "
                     f"{float(r['cpu_floor']):.1f} s.")
        if "daemon_alone" in r:
            da = r["daemon_alone"]
            lines.append(f"{NAMES[kind]} origin, nodes with a daemon: one node alone {float(da['seconds']):.2f} s, "
                         f"{float(da['cpu']):.2f} CPU s a start; CPU floor = {res['nodes']} x {float(da['cpu']):.2f} "
                         f"s / {res['cores']} cores = {float(r['daemon_cpu_floor']):.1f} s.")
    lines += ["",
              "| origin | fleet | p50 s | p99 s | max s | p99 / max(one node, CPU floor) | CPU s a start | share of the "
              "machine's CPU the fleet got | CPU pressure (avg60) | failed | origin MB (x one node) | tier MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows: list[tuple[str, str, dict[str, object], float, float]] = []
    for kind in kinds:
        r = res[kind]
        assert isinstance(r, dict)
        al = r["alone"]
        ref, one_bytes = max(float(al["seconds"]), float(r["cpu_floor"])), float(al["origin_bytes"])
        rows += [(NAMES[kind], "convstore run, no tier", r["fleet_direct"], ref, one_bytes),
                 (NAMES[kind], "convstore run, site tier", r["fleet_tier"], ref, one_bytes)]
        if "daemon_alone" in r:
            da = r["daemon_alone"]
            dref = max(float(da["seconds"]), float(r["daemon_cpu_floor"]))
            rows += [(NAMES[kind], "run via node daemon, no tier", r["daemon_fleet_direct"], dref, one_bytes),
                     (NAMES[kind], "run via node daemon, site tier", r["daemon_fleet_tier"], dref, one_bytes)]
    first = res[kinds[0]]
    assert isinstance(first, dict)
    fp = res["fleet_plain_pull"]
    assert isinstance(fp, dict)
    rows.append(("registry", "skopeo copy of the plain image", fp,
                 max(float(first["alone"]["seconds"]), float(first["cpu_floor"])),
                 float(first["alone"]["origin_bytes"])))
    for origin, name, f, ref, one_bytes in rows:
        ob = float(f["origin_bytes"])  # type: ignore[arg-type]
        tb = f.get("tier_bytes")
        lines.append(f"| {origin} | {name} | {f['p50']:.2f} | {f['p99']:.2f} | {f['max']:.2f} | "
                     f"{float(f['p99']) / ref:.2f} | {f['cpu_per_start']:.2f} | {f['machine_share']:.0%} | "  # type: ignore[arg-type]
                     f"{f['cpu_pressure']}% | {f['failed']} | {ob / 1e6:.1f} ({ob / one_bytes:.2f}x) | "
                     f"{'' if tb is None else f'{float(tb) / 1e6:.1f}'} |")  # type: ignore[arg-type]
    for kind in kinds:
        r = res[kind]
        assert isinstance(r, dict)
        ft = r["fleet_tier"]
        assert isinstance(ft, dict)
        lines += ["", f"{NAMES[kind]}: site tier counters summed over the nodes: {ft.get('site_tier')}; with the "
                      f"tier p99 {ft['p99']:.2f} s vs the plain pull fleet's {fp['p99']:.2f} s "
                      f"({fp['p99'] / ft['p99']:.1f}x faster); origin ranges fetched more than once: "
                      f"{ft.get('origin_repeated_ranges')}."]
    # the plain pull fleet's bandwidth floor: what it moves through the origin's uplink
    mbit = float(res["origin_mbit"])  # type: ignore[arg-type]
    if mbit:
        lines += ["", f"plain pull fleet's bandwidth floor: {float(fp['origin_bytes']) / 1e6:.0f} MB through "
                      f"{mbit:g} Mbit/s = {float(fp['origin_bytes']) * 8 / (mbit * 1e6):.1f} s (its p99: "
                      f"{float(fp['p99']):.2f} s)."]
    return "\n".join(lines)


def plot(res: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    kinds = res["origins"]
    assert isinstance(kinds, list)
    series = []
    for kind in kinds:
        r = res[kind]
        assert isinstance(r, dict)
        series += [(f"{NAMES[kind]}: convstore run, no tier", r["fleet_direct"]),
                   (f"{NAMES[kind]}: convstore run, site tier", r["fleet_tier"])]
        if "daemon_fleet_tier" in r:
            series.append((f"{NAMES[kind]}: run via node daemon, site tier", r["daemon_fleet_tier"]))
    series.append(("registry: skopeo copy (plain pull)", res["fleet_plain_pull"]))
    for name, f in series:
        assert isinstance(f, dict)
        xs = f["times"]
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    for kind, style in zip(kinds, (":", "-.")):
        r = res[kind]
        assert isinstance(r, dict)
        ax.axvline(float(r["alone"]["seconds"]), ls=style, c="grey", label=f"one node alone ({NAMES[kind]})")
        ax.axvline(float(r["cpu_floor"]), ls="--", c="grey" if kind == "registry" else "black",
                   label=f"CPU floor ({NAMES[kind]})")
    ax.set_xlabel("seconds from launch to exit")
    ax.set_ylabel("fraction of nodes started")
    ax.set_title(f"{res['nodes']} nodes starting {res['image']} at once")
    ax.legend(loc="lower right", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    main()
