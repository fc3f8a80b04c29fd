"""podman starting a corpus image: plain pull + run against the same image's
layers from ``convstore layerstore``, side by side in one run.

    sudo python -m benchmarks.engines [--image app1] [--rounds 3] [--write-docs]

The original image is in Debian's docker-registry on 127.0.0.1; its
convstore twin is pushed to a convstore registry store in the same registry.
At 0 ms both talk to the registry directly; at 20 ms both go through one
proxy (tests/netproxy.py) that adds the latency to every request, so
podman's pull and the layer store's chunk reads pay the same round trip
(the proxy also costs some CPU per request, and the layer store makes more,
smaller requests).  Each round starts podman with empty storage and,
for the layer store, a fresh layer store process with an empty cache.
Times are per command, as a user runs them.
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
from kms_fixtures import Registry  # noqa: E402
from netproxy import CountingProxy  # noqa: E402
from engine_fixtures import podman_config, remove_podman_root  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "engines.md"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"engines: {' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return dt, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("engines: run as root (podman, FUSE)")
    ensure_corpus()
    corpus = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"][a.image]
    blob_bytes = sum(lay["size"] for lay in corpus["layers"])
    cs = [sys.executable, "-m", "convstore", "-q"]
    rows: list[tuple[float, dict[str, list[float]], list[int]]] = []
    with tempfile.TemporaryDirectory(prefix="convstore-engines-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        reg = Registry(w / "registry")
        try:
            src = f"oci:{CORPUS_DIR / a.image}:latest"
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src,
                            f"docker://{reg.host}/{a.image}:latest"], check=True)
            local = cs + ["--store", str(w / "store"), "--key", f"file:{w / 'key'}"]
            subprocess.run(local + ["pack", src, f"{a.image}:latest"], check=True)
            for latency_ms in (0, 20):  # a twin per setting: each has its own start-up profile
                subprocess.run(local + ["--insecure", "push", f"{a.image}:latest",
                                        f"oci://{reg.host}/convstore-{latency_ms}"], check=True)
            for latency in (0.0, 0.020):
                proxy = CountingProxy(reg.host, latency) if latency else None
                host = proxy.host if proxy else reg.host
                ref = f"{host}/{a.image}:latest"
                res: dict[str, list[float]] = {k: [] for k in ("plain pull", "plain run", "als pull", "als run",
                                                               "als start")}
                fetched: list[int] = []
                for r in range(a.rounds):
                    print(f"latency {latency * 1000:.0f} ms, round {r + 1}", file=sys.stderr)
                    root = w / "podman-plain"
                    env = podman_config(root, None)
                    res["plain pull"].append(timed(["podman", "pull", "-q", "--tls-verify=false", ref], env)[0])
                    dt, out = timed(["podman", "run", "--rm", ref], env)
                    assert out.strip() == "hello", out
                    res["plain run"].append(dt)
                    remove_podman_root(env, root)

                    mnt = w / "als"
                    mnt.mkdir(exist_ok=True)
                    stats = w / "stats.json"
                    stats.unlink(missing_ok=True)
                    remote = cs + ["--store", f"oci://{host}/convstore-{round(latency * 1000)}", "--insecure", "--key",
                                   f"file:{w / 'key'}", "--cache", str(w / f"cache-{latency}-{r}")]
                    res["als start"].append(timed(remote + ["layerstore", "-b", str(mnt), "--stats-file",
                                                            str(stats)])[0])
                    root = w / "podman-als"
                    env = podman_config(root, mnt)
                    res["als pull"].append(timed(["podman", "pull", "-q", "--tls-verify=false", ref], env)[0])
                    dt, out = timed(["podman", "run", "--rm", ref], env)
                    assert out.strip() == "hello", out
                    res["als run"].append(dt)
                    remove_podman_root(env, root)
                    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                    time.sleep(0.6)  # the stats writer's last flush happens at unmount
                    doc = json.loads(stats.read_text()) if stats.exists() else {}
                    fetched.append(sum(v["bytes_fetched"] for v in doc.values()))
                if proxy:
                    proxy.stop()
                rows.append((latency, res, fetched))
        finally:
            reg.stop()
    lines = ["| latency | start | `podman pull` | `podman run` | total | bytes read |", "|---|---|---|---|---|---|"]
    for latency, res, fetched in rows:
        ms = f"{latency * 1000:.0f} ms"
        plain = statistics.median(p + r for p, r in zip(res["plain pull"], res["plain run"]))
        lines.append(f"| {ms} | plain podman (median) | {statistics.median(res['plain pull']):.2f} s | "
                     f"{statistics.median(res['plain run']):.2f} s | {plain:.2f} s | {blob_bytes / 1e6:.1f} MB "
                     f"(layer blobs) |")
        first = res["als pull"][0] + res["als run"][0]
        lines.append(f"| {ms} | layer store, first start (records the profile) | {res['als pull'][0]:.2f} s | "
                     f"{res['als run'][0]:.2f} s | **{first:.2f} s** ({plain / first:.1f}x) | "
                     f"{fetched[0] / 1e6:.1f} MB |")
        if len(fetched) > 1:
            later = statistics.median(p + r for p, r in zip(res["als pull"][1:], res["als run"][1:]))
            lines.append(f"| {ms} | layer store, profile prefetched (median) | "
                         f"{statistics.median(res['als pull'][1:]):.2f} s | "
                         f"{statistics.median(res['als run'][1:]):.2f} s | **{later:.2f} s** ({plain / later:.1f}x) "
                         f"| {statistics.median(fetched[1:]) / 1e6:.1f} MB |")
    starts = [x for _, res, _ in rows for x in res["als start"]]
    text = (f"`python -m benchmarks.engines --image {a.image} --rounds {a.rounds}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every start has empty podman storage and, for "
            f"the layer store, a fresh layer store process with an empty cache; its own start (median "
            f"{statistics.median(starts):.2f} s) is not counted: it is a daemon. The first layer-store start of "
            f"each setting records the image's start-up profile, the later ones prefetch it. `bytes read`: what "
            f"the layer store fetched from the convstore store, against the layer blobs a plain pull "
            f"downloads.\n\n" + "\n".join(lines))
    print(text)
    if a.write_docs:
        write_block("engines-podman", "podman start times", text, docs=DOCS)


if __name__ == "__main__":
    main()
