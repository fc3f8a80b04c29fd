"""A warm ``convstore run`` against ``runc run`` of the unpacked rootfs, side by side.

    sudo .venv/bin/python -m benchmarks.runspeed [--image app1] [--rounds 15]

One local store holds the corpus image; its rootfs is unpacked once and a
runc bundle made for it with the image's command.  A first ``convstore run``
records the start-up profile (so every timed run is warm: chunks local,
profile prefetched).  Then, alternating in each round so a noisy spell hits
all alike: ``runc run`` of the rootfs, ``convstore run`` in its own process,
``convstore run`` through a ``convstore daemon`` on a private socket.  Each
command is timed as a user runs it (wall time, and the CPU seconds of the
command and its children from ``wait4``; a daemon-served command's work is
done in the daemon's child, so its CPU is not seen here).  Medians and the
ratios to ``runc run`` are printed (issue 24: own process <= 4x, daemon <= 2x).

Each ``convstore run`` is timed twice per round: on a fresh mount of its own
(``CONVSTORE_KEEP_MOUNT=0``) and on a kept mount (``--keep-mount``: the
image's mount stays up between runs, served by a keeper,
convstore.engines.keeper; its first run, which starts the keeper, is untimed).
The keepers run in a keep directory of the benchmark's own and are stopped at
the end.

``--gap S``: a pause before each timed command, so what a command leaves running
in the background (the daemon forking its next spare, a keeper merging the
start-up profile) is done before the next command is timed, as between the
commands of a user; 0 (the default): back to back.

``--baseline DIR``: a checkout of other code (``git archive COMMIT | tar -x -C DIR``)
whose ``convstore`` package runs the same commands in the same rounds
(``PYTHONPATH=DIR``, its own daemon): before and after, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_bench import CORPUS_DIR  # noqa: E402

CONVSTORE = str(Path(sys.executable).with_name("convstore"))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and its children) of ``cmd``."""
    e = {**os.environ, **(env or {})}
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # users' interpreters cache bytecode
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"runspeed: {' '.join(cmd)} failed ({p.returncode}): {err.decode(errors='replace')[-600:]}")
    return dt, ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="write the raw samples here")
    ap.add_argument("--baseline", metavar="DIR", help="also time the convstore package in DIR (before/after)")
    ap.add_argument("--gap", type=float, default=0.0, metavar="S", help="pause before each timed command")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("runspeed: convstore run needs root (FUSE, runc)")
    if not (CORPUS_DIR / "corpus.json").exists():
        sys.exit(f"runspeed: no corpus in {CORPUS_DIR} (python -m benchmarks.corpus_bench builds it)")
    args = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"][a.image]["cmd"]
    work = Path(tempfile.mkdtemp(prefix="cs-runspeed-"))
    os.chmod(work, 0o700)
    socks: list[tuple[Path, dict[str, str]]] = []
    cs = [CONVSTORE, "--store", str(work / "store"), "--key", f"file:{work / 'key'}", "-q"]
    try:
        timed([*cs, "pack", f"oci:{CORPUS_DIR / a.image}:latest", f"{a.image}:latest"])
        timed([*cs, "unpack", f"{a.image}:latest", "--rootfs", str(work / "rootfs")])
        bundle = work / "bundle"
        bundle.mkdir()
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(work / "rootfs"), "readonly": True}
        spec["process"].update(terminal=False, args=args)
        spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777"]})
        (bundle / "config.json").write_text(json.dumps(spec))
        variants = {"": {}}
        if a.baseline:
            variants[" (baseline)"] = {"PYTHONPATH": str(Path(a.baseline).resolve())}
        runs: dict[str, tuple[list[str], dict[str, str]]] = {}
        keep = {"CONVSTORE_KEEP_DIR": str(work / "keep")}
        (work / "keep").mkdir(mode=0o700)
        for v, extra in variants.items():
            sock = work / f"daemon{len(socks)}" / "cli.sock"
            sock.parent.mkdir(mode=0o700)
            timed([CONVSTORE, "daemon", "--background", "--socket", str(sock)], extra)
            socks.append((sock, extra))
            run = [*cs, "run", f"{a.image}:latest"]
            own = {**extra, **keep, "CONVSTORE_DAEMON": "0"}
            daemon = {**extra, **keep, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(sock)}
            runs[f"convstore run, own process{v}"] = (run, {**own, "CONVSTORE_KEEP_MOUNT": "0"})
            runs[f"convstore run, through the daemon{v}"] = (run, {**daemon, "CONVSTORE_KEEP_MOUNT": "0"})
            if not v or (Path(a.baseline) / "convstore" / "engines" / "keeper.py").exists():  # has kept mounts
                runs[f"convstore run, own process, kept mount{v}"] = (run, {**own, "CONVSTORE_KEEP_MOUNT": "10m"})
                runs[f"convstore run, through the daemon, kept mount{v}"] = (run, {**daemon,
                                                                                   "CONVSTORE_KEEP_MOUNT": "10m"})
        for cmd, env in runs.values():  # the first records the start-up profile; each daemon's first command
            timed(cmd, env)
        rows: dict[str, list[tuple[float, float]]] = {"runc run, rootfs on disk": [], **{n: [] for n in runs}}
        for i in range(a.rounds):
            time.sleep(a.gap)
            rows["runc run, rootfs on disk"].append(timed(["runc", "run", "--bundle", str(bundle), f"rs-{os.getpid()}-{i}"]))
            for n, (cmd, env) in runs.items():
                time.sleep(a.gap)
                rows[n].append(timed(cmd, env))
    finally:
        subprocess.run([sys.executable, "-c", "from convstore.engines.keeper import stop_keepers; stop_keepers()"],
                       env={**os.environ, "CONVSTORE_KEEP_DIR": str(work / "keep")}, check=False)
        for sock, extra in socks:
            subprocess.run([CONVSTORE, "daemon", "--stop", "--socket", str(sock)], capture_output=True, check=False,
                           env={**os.environ, **extra})
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(w for w, _ in rows["runc run, rootfs on disk"])
    print(f"image {a.image}, medians of {a.rounds} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.1f}" + (f", {a.gap:g} s between commands" if a.gap else ""))
    print("| start | wall (median) | min–max | CPU s (median) | x runc run |")
    print("|---|---|---|---|---|")
    for name, xs in rows.items():
        walls = [w for w, _ in xs]
        med = statistics.median(walls)
        print(f"| {name} | {med:.3f} s | {min(walls):.3f}–{max(walls):.3f} s | "
              f"{statistics.median(c for _, c in xs):.3f} | {med / base:.1f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
