"""py-spy profiles of the three paths issue 13 is about, condensed to text.

    sudo python -m benchmarks.profiles [--python PY] [--image app1] [--min 3]

Runs, each as one CLI process under ``py-spy record --idle`` (1 kHz):
``pack`` of the image (as an OCI layout of uncompressed layers) into an
empty store, ``unpack --compress none`` of it, and a warm ``run``.  Prints,
per path, the main thread's time by frame (a tree cut at ``--min`` percent)
and what the worker threads did, by their innermost convstore frame.
``--python`` picks the interpreter (another checkout's venv gives the
"before" profile; it runs ``-m convstore.cli`` there).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import prepare  # noqa: E402

SKIP = ("_find_and_load", "_load_unlocked", "_call_with_frames", "exec_module", "_LoaderBasics",
        "_handle_fromlist", "_gcd_import", "typer/", "_click/", "click/", "runpy")


def record(py: str, module: str, args: list[str], out: Path) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([pyspy, "record", "--idle", "-r", "1000", "-f", "raw", "-o", str(out), "--", py, "-m", module,
                    *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=out.parent)  # not this checkout: -m would import its convstore over PY's own


def summarize(raw: Path, min_pct: float) -> str:
    main: collections.Counter[tuple[str, ...]] = collections.Counter()
    workers: collections.Counter[str] = collections.Counter()
    total = wtotal = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if any("Thread._bootstrap" in f for f in frames[:2]):
            inner = [f for f in frames if "convstore/" in f]
            workers[(inner[-1] if inner else frames[-1]).split(" (")[0]] += int(n)
            wtotal += int(n)
            continue
        total += int(n)
        kept = tuple(f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")").split(":")[0]
                     for f in frames if not any(s in f for s in SKIP))
        for d in range(1, len(kept) + 1):
            main[kept[:d]] += int(n)
    lines = [f"main thread: {total} ms sampled"]

    def show(prefix: tuple[str, ...]) -> None:
        kids = sorted((k for k in main if len(k) == len(prefix) + 1 and k[: len(prefix)] == prefix),
                      key=lambda k: -main[k])
        for k in kids:
            if main[k] * 100 < min_pct * total:
                continue
            lines.append(f"{'  ' * len(prefix)}{main[k]:5d} ms {100 * main[k] / total:4.0f}%  {k[-1]}")
            show(k)

    show(())
    lines.append(f"worker threads: {wtotal} ms sampled (idle included)")
    for k, v in workers.most_common(8):
        lines.append(f"  {v:5d} ms  {k}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--min", type=float, default=3.0, help="cut tree nodes under this percent")
    ap.add_argument("--work", default="/var/tmp/convstore-profiles")
    a = ap.parse_args()
    module = "convstore" if a.python == sys.executable else "convstore.cli"
    work = Path(a.work)
    inp = prepare(work / "inputs", [a.image])
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t = Path(tmp)
        os.chmod(t, 0o700)
        base = ["--store", str(t / "store"), "--key", f"file:{t / 'key'}", "-q"]
        ref = f"{a.image}:latest"
        paths = {
            "pack": base + ["pack", f"oci:{inp['layouts'][a.image]}:latest", ref],
            "unpack --compress none": base + ["unpack", "--compress", "none", ref, f"oci:{t / 'out'}:latest"],
            "run (warm)": base + ["run", ref],
        }
        for name, args in paths.items():
            if name == "run (warm)":  # the first run records the start-up profile
                subprocess.run([a.python, "-m", module, *args], check=True, stdout=subprocess.DEVNULL, cwd=t)
            record(a.python, module, args, t / "p.raw")
            print(f"### {name}\n\n```\n{summarize(t / 'p.raw', a.min)}\n```\n")


if __name__ == "__main__":
    main()
