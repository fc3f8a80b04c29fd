"""Where a lazy engine start's time goes: one podman and one containerd start with a start-up profile, at
0 ms, the convstore process (layer store / snapshotter) counted by benchmarks/starthook.py.

    sudo .venv/bin/python -m benchmarks.startprofile [--image app1]

Set-up as benchmarks/engines.py (Debian's docker-registry on 127.0.0.1 behind the counting proxy, a
convstore registry store): a first start records the image's start-up profile, the second (timed and
counted) prefetches it.  The layer store runs in the foreground here (``-b`` would hand it to a worker
process the hook does not reach).  Prints per engine: pull and run seconds, requests, and the convstore
process's FUSE operations by kind (count, handler seconds summed over threads), the fetcher's reads
(FUSE readers waiting for chunks), its store batches (worker threads: request + decrypt) and decryption.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus_bench import CORPUS_DIR  # noqa: E402
from engine_fixtures import Containerd, podman_config, remove_podman_root, unmount_below  # noqa: E402
from engines import timed  # noqa: E402
from kms_fixtures import Registry  # noqa: E402
from netproxy import CountingProxy  # noqa: E402

HOOK = [sys.executable, str(Path(__file__).resolve().parent / "starthook.py"), "-q"]


def counters(out: Path) -> dict[str, list[float]]:
    doc: dict[str, list[float]] = {}
    for f in out.parent.glob(out.name + ".[0-9]*"):
        for k, (n, s) in json.loads(f.read_text()).items():
            c = doc.setdefault(k, [0, 0.0])
            c[0] += n
            c[1] += s
        f.unlink()
    return doc


def timeline(out: Path, marks: dict[str, float], keep: Path | None) -> list[list[Any]]:
    """The FUSE requests of the convstore process (starthook.py), times relative to the pull's start."""
    got: list[list[Any]] = []
    for f in out.parent.glob(out.name + ".timeline.*"):
        got += json.loads(f.read_text())
        f.unlink()
    t0 = marks.get("t_pull", 0.0)
    got = sorted([[round(t - t0, 4), op, round(d, 5), n, name] for t, op, d, n, name in got])
    if keep is not None:
        keep.write_text(json.dumps({"marks": {k: v - t0 for k, v in marks.items()}, "requests": got}, indent=0))
    return got


def podman_start(w: Path, ref: str, remote: list[str], proxy: CountingProxy, env: dict[str, str]) -> dict:
    mnt = w / "als"
    mnt.mkdir(exist_ok=True)
    p = subprocess.Popen(remote + ["layerstore", str(mnt)], env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        assert p.poll() is None and time.monotonic() < deadline, "the layer store did not mount"
        time.sleep(0.02)
    root = w / "podman"
    penv = podman_config(root, mnt)
    try:
        proxy.reset()
        t0 = time.time()
        pull = timed(["podman", "pull", "-q", "--tls-verify=false", ref], penv)[0]
        t1 = time.time()
        run, out = timed(["podman", "run", "--rm", ref], penv)
        assert out.strip() == "hello", out
        return {"pull": pull, "run": run, "requests": proxy.total(), "bytes": proxy.bytes, "t_pull": t0, "t_run": t1}
    finally:
        remove_podman_root(penv, root)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        p.wait(timeout=30)


def containerd_start(w: Path, ref: str, image: str, remote: list[str], proxy: CountingProxy,
                     env: dict[str, str]) -> dict:
    sock = w / "snap" / "snapshotter.sock"
    snap = subprocess.Popen(remote + ["snapshotter", str(w / "snap" / "root"), "--socket", str(sock)],
                            env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    while not sock.exists():
        assert snap.poll() is None, "the snapshotter exited"
        time.sleep(0.05)
    ctd = Containerd(w / "containerd", sock)
    try:
        proxy.reset()
        pull = timed(remote + ["containerd-load", f"{image}:latest", "--address", str(ctd.socket), "--name", ref])[0]
        run, out = timed(["ctr", "-a", str(ctd.socket), "run", "--snapshotter", "convstore", "--rm", ref, "bench"])
        assert out.strip() == "hello", out
        return {"load": pull, "run": run, "requests": proxy.total(), "bytes": proxy.bytes}
    finally:
        ctd.stop()
        snap.terminate()
        snap.wait(timeout=30)
        unmount_below(w)
        subprocess.run(["rm", "-rf", str(w / "containerd"), str(w / "snap")], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--engines", default="podman,containerd")
    ap.add_argument("--timeline", help="write each engine's FUSE request timeline (JSON) to PATH.ENGINE.json")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("startprofile: run as root (podman, containerd, FUSE)")
    with tempfile.TemporaryDirectory(prefix="convstore-startprofile-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        reg = Registry(w / "registry")
        try:
            src = f"oci:{CORPUS_DIR / a.image}:latest"
            local = HOOK + ["--store", str(w / "store"), "--key", f"file:{w / 'key'}"]
            subprocess.run(local + ["pack", src, f"{a.image}:latest"], check=True, capture_output=True)
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src,  # podman reads its manifest
                            f"docker://{reg.host}/{a.image}:latest"], check=True)
            for engine in a.engines.split(","):
                subprocess.run(local + ["--insecure", "push", f"{a.image}:latest", f"oci://{reg.host}/cs-{engine}"],
                               check=True, capture_output=True)
                proxy = CountingProxy(reg.host, 0.0)
                try:
                    ref = f"{proxy.host}/{a.image}:latest"
                    remote = HOOK + ["--store", f"oci://{proxy.host}/cs-{engine}", "--insecure", "--key",
                                     f"file:{w / 'key'}"]
                    out = w / f"hook-{engine}"
                    for i in range(2):  # the first records the start-up profile, the second prefetches it
                        env = {"CONVSTORE_STARTHOOK_OUT": str(out), "CONVSTORE_BACKGROUND_FETCH": "0"}
                        cache = ["--cache", str(w / f"cache-{engine}-{i}")]
                        if engine == "podman":
                            r = podman_start(w, ref, remote + cache, proxy, env)
                        else:
                            r = containerd_start(w, ref, a.image, remote + cache, proxy, env)
                        c = counters(out)
                        timeline(out, {k: v for k, v in r.items() if k.startswith("t_")},
                                     Path(f"{a.timeline}.{engine}.json") if a.timeline and i else None)
                        r = {k: v for k, v in r.items() if not k.startswith("t_")}
                    print(f"## {engine}, start with profile, 0 ms: " + ", ".join(
                        f"{k} {v:.3f} s" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
                    print("| in the convstore process | count | seconds (summed over threads) |\n|---|---|---|")
                    for k, (n, s) in sorted(c.items(), key=lambda kv: -kv[1][1]):
                        print(f"| {k} | {n} | {s:.3f} |")
                    print()
                finally:
                    proxy.stop()
        finally:
            reg.stop()


if __name__ == "__main__":
    main()
