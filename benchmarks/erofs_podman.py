"""podman on the layer store: each layer's ``diff`` a FUSE tree (kfuse) or an EROFS mount over a FUSE file
(``CONVSTORE_LAYERSTORE_EROFS=1``), against podman's own pull and run; interleaved round by round.

    sudo .venv/bin/python -m benchmarks.erofs_podman [--rounds 6]

Set-up as benchmarks/engines.py (app1 in Debian's docker-registry behind the counting proxy, 0 ms): each
start is ``podman pull`` + ``podman run --rm`` (prints hello) with fresh engine storage and a new layer store
process, background fetch off, the store either

* ``registry``: a convstore registry store with a fresh node cache per start (cold node), or
* ``local``: a local store (every chunk on the node, encrypted; the process's plaintext cache is new),

and the layer store serving ``diff`` as kfuse's tree or as EROFS.  Round 0 records the start-up profile of
each store and is not counted.  Prints the medians of pull, run and total, and the ratio to podman's start of
an image it has pulled (benchmarks/engines.py's floor: its pull again, nothing to fetch, then run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus_bench import CORPUS_DIR, ensure_corpus  # noqa: E402
from engines import Start, podman_round  # noqa: E402
from kms_fixtures import Registry  # noqa: E402
from netproxy import CountingProxy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("erofs_podman: run as root (podman, FUSE, mount)")
    ensure_corpus()
    os.chdir("/")
    py = [sys.executable, "-m", "convstore", "-q"]
    with tempfile.TemporaryDirectory(prefix="convstore-erofs-podman-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        reg = Registry(w / "registry")
        try:
            src = f"oci:{CORPUS_DIR / 'app1'}:latest"
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src,
                            f"docker://{reg.host}/app1:latest"], check=True)
            local = py + ["--store", str(w / "store"), "--key", f"file:{w / 'key'}"]
            subprocess.run(local + ["pack", src, "app1:latest"], check=True, capture_output=True)
            subprocess.run(local + ["--insecure", "push", "app1:latest", f"oci://{reg.host}/cs"], check=True,
                           capture_output=True)
            proxy = CountingProxy(reg.host, 0)
            ref = f"{proxy.host}/app1:latest"
            variants = [f"{store} {tree}" for store in ("registry", "local") for tree in ("kfuse", "erofs")]
            res: dict[str, list[Start]] = {v: [] for v in ["podman"] + variants}
            try:
                for r in range(a.rounds + 1):
                    order = ["podman"] + (variants if r % 2 else variants[::-1])
                    for v in order:
                        if v == "podman":
                            s = podman_round(w, ref, None, proxy)
                        else:
                            store, tree = v.split()
                            env = ["env", f"CONVSTORE_LAYERSTORE_EROFS={1 if tree == 'erofs' else 0}"]
                            where = (["--store", f"oci://{proxy.host}/cs", "--insecure", "--cache",
                                      str(w / f"cache-{tree}-{r}")] if store == "registry"
                                     else ["--store", str(w / "store")])
                            s = podman_round(w, ref, env + py + where + ["--key", f"file:{w / 'key'}"], proxy, False)
                        if r:
                            res[v].append(s)
                        print(f"{v} round {r}: pull {s.pull:.3f} run {s.run:.3f} total {s.total:.3f} "
                              f"requests {s.requests}", flush=True)
            finally:
                proxy.stop()
        finally:
            reg.stop()
    # the reference: podman's start of an image it has pulled (its pull again, nothing to fetch, then run)
    base = statistics.median(s.floor.total for s in res["podman"] if s.floor is not None)
    print(f"podman, image present: pull again + run {base:.3f} s")
    print(f"\npodman, app1, 0 ms, median of {a.rounds} rounds (interleaved)")
    print("| start | pull | run | total | x podman (local image) |")
    print("|---|---|---|---|---|")
    for v, ss in res.items():
        t = statistics.median(s.total for s in ss)
        print(f"| {v} | {statistics.median(s.pull for s in ss):.3f} s | {statistics.median(s.run for s in ss):.3f} s "
              f"| {t:.3f} s | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
