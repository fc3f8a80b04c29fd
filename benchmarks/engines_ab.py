"""The same lazy engine start on two versions of convstore, interleaved round by round (issue 24): on a
shared machine two separate runs of benchmarks/engines.py differ by more than the change being measured.

    sudo .venv/bin/python -m benchmarks.engines_ab --baseline DIR [--engine podman|containerd]
                                                   [--latency MS] [--rounds 6]

``DIR`` holds the older ``convstore/`` package (``git archive REV convstore | tar -x -C DIR``); its
processes run with ``PYTHONPATH=DIR`` from outside the checkout, this version's without.  Set-up as
benchmarks/engines.py (app1 in Debian's docker-registry behind the counting proxy, a convstore registry
store per version, a fresh node cache and engine storage per start, background fetch off); a first round
of each version records its start-up profile, the next ``--rounds`` alternate which version goes first.
With ``--shared-store`` both read one store (separately pushed stores differ in pack layout and each records
its own profile: an A/A run of one version against itself on separate stores differed by 10 % in its run
medians, on a loaded machine).
Prints each start and the medians of pull (podman) or ``containerd-load`` (containerd), run and total.
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

from corpus_bench import CORPUS_DIR  # noqa: E402
from engines import Start, containerd_round, podman_round  # noqa: E402
from kms_fixtures import Registry  # noqa: E402
from netproxy import CountingProxy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a directory holding the older convstore/ package")
    ap.add_argument("--engine", choices=("podman", "containerd"), default="podman")
    ap.add_argument("--latency", type=float, default=0.0, help="ms added to each request")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--log", action="store_true", help="print each start's requests (method, path, Range, bytes)")
    ap.add_argument("--shared-store", action="store_true",
                    help="both versions read one registry store (the same pack layout and one merged start-up "
                         "profile; else a store each, pushed separately, whose layouts differ)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("engines_ab: run as root (podman, containerd, FUSE)")
    if not (Path(a.baseline) / "convstore" / "__init__.py").exists():
        raise SystemExit(f"engines_ab: {a.baseline} holds no convstore/ package")
    os.chdir("/")  # python -m in the checkout would import its convstore/, whatever PYTHONPATH says
    py = [sys.executable, "-m", "convstore", "-q"]
    code = {"old": ["env", f"PYTHONPATH={os.path.abspath(a.baseline)}", *py], "new": ["env", "-u", "PYTHONPATH", *py]}
    with tempfile.TemporaryDirectory(prefix="convstore-engines-ab-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        reg = Registry(w / "registry")
        try:
            src = f"oci:{CORPUS_DIR / 'app1'}:latest"
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src,
                            f"docker://{reg.host}/app1:latest"], check=True)
            local = code["new"] + ["--store", str(w / "store"), "--key", f"file:{w / 'key'}"]
            subprocess.run(local + ["pack", src, "app1:latest"], check=True, capture_output=True)
            repo = {v: "cs-shared" if a.shared_store else f"cs-{v}" for v in code}
            for r in sorted(set(repo.values())):
                subprocess.run(local + ["--insecure", "push", "app1:latest", f"oci://{reg.host}/{r}"],
                               check=True, capture_output=True)
            for v in code:  # both versions start from bytecode (PYTHONDONTWRITEBYTECODE would leave one compiling
                # its modules in every process: containerd-load in its own process is timed)
                where = subprocess.run(code[v][:-3] + ["-c", "import convstore, os; print(os.path.dirname("
                                                       "convstore.__file__))"], check=True, capture_output=True,
                                       text=True).stdout.strip()
                subprocess.run([sys.executable, "-m", "compileall", "-q", where], check=True, capture_output=True)
            proxy = CountingProxy(reg.host, a.latency / 1000)
            ref = f"{proxy.host}/app1:latest"
            res: dict[str, list[Start]] = {v: [] for v in code}
            try:
                for r in range(a.rounds + 1):
                    for v in (("old", "new") if r % 2 else ("new", "old")):
                        proxy.log = [] if a.log else None
                        remote = code[v] + ["--store", f"oci://{proxy.host}/{repo[v]}", "--insecure", "--key",
                                            f"file:{w / 'key'}", "--cache", str(w / f"cache-{v}-{r}")]
                        s = (podman_round(w, ref, remote, proxy, False) if a.engine == "podman"
                             else containerd_round(w, ref, "app1", remote, proxy, False))
                        if r:  # round 0 records the profile
                            res[v].append(s)
                        print(f"{v} round {r}: pull {s.pull:.3f} run {s.run:.3f} total {s.total:.3f} "
                              f"requests {s.requests}", flush=True)
                        for t, method, path, rng, status, n in proxy.log or []:
                            print(f"    {t:8.3f} {method} {path[:90]} {rng[:40]} {status} {n}")
            finally:
                proxy.stop()
        finally:
            reg.stop()
    for v, ss in res.items():
        print(f"{a.engine} {a.latency:g} ms {v}: median pull {statistics.median(s.pull for s in ss):.3f} s, run "
              f"{statistics.median(s.run for s in ss):.3f} s, total {statistics.median(s.total for s in ss):.3f} s "
              f"(n={len(ss)})")


if __name__ == "__main__":
    main()
