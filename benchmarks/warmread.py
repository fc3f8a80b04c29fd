"""A warm node reading a whole image tree through its mount, against the unpacked rootfs; and failover.

    sudo python -m benchmarks.warmread [--image app1] [--rounds 5] [--failover]

One run, side by side: the image is packed into a local store and unpacked
(``unpack --rootfs``); it is mounted twice with ``convstore mount``, once by
the low-level server (kfuse, the default as root) and once by libfuse
(``CONVSTORE_FUSE=libfuse``, what every mount used before).  Each tree is
read whole once (chunks local, page cache warm), then ``tar -c`` of each is
timed ``--rounds`` times, interleaved; medians are reported with the ratio to
the rootfs (issue 24's goal: at most 1.3x).

``--failover`` (issue 23 §3), on each backend: a reader with an open file and a
shell whose cwd is in the mount, ``kill -9`` of the server, a successor started
the same way (``convstore mount``), then whether the reader finishes its read,
the shell reads and lists its cwd and a new lookup works.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_bench import CORPUS_DIR, ensure_corpus, new_store  # noqa: E402

CS = [sys.executable, "-m", "convstore", "-q"]


def tar_seconds(root: Path) -> float:
    """``tar -c`` of the tree into a pipe: with ``-f /dev/null`` GNU tar reads no file data at all (it
    knows the archive is thrown away), so that timed the metadata only (runs before 2026-12-05)."""
    t = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
        cat = subprocess.Popen(["cat"], stdin=tar.stdout, stdout=sink)
        assert tar.stdout is not None
        tar.stdout.close()
        if cat.wait() != 0 or tar.wait() != 0:
            raise SystemExit(f"warmread: tar -c of {root} failed")
    return time.perf_counter() - t


def mount(env: dict[str, str], ref: str, mnt: Path) -> int:
    p = subprocess.run([*CS, "mount", "--background", ref, str(mnt)], env=env, capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"warmread: mount failed: {p.stderr.strip()}")
    m = re.search(r"\(pid (\d+)\)", p.stdout)
    return int(m.group(1)) if m else 0


def unmount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def failover(env: dict[str, str], ref: str, mnt: Path, big: str, small_dir: str) -> dict[str, str]:
    """What a reader, a shell in the mount and a new lookup see across kill -9 and a successor."""
    pid = mount(env, ref, mnt)
    out: dict[str, str] = {}
    sh = subprocess.Popen(["sh", "-c", "read x; ls | wc -l"], cwd=mnt / small_dir, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    size = os.path.getsize(mnt / big)
    # the connection's first close asks the server for FLUSH (answered ENOSYS, never again); done before the
    # kill, else the successor's start (a fork of this process, closing its fds) would wait for a server
    os.listdir(mnt / small_dir)
    for p in sorted((mnt / small_dir).iterdir()):
        if p.is_file() and not p.is_symlink():
            p.read_bytes()
            break
    with open(mnt / big, "rb", buffering=0) as f:
        f.read(4096)
        if env.get("CONVSTORE_FUSE") != "libfuse":
            from convstore.reader import fdholder

            deadline = time.monotonic() + 20
            while not fdholder.held(str(mnt)) and time.monotonic() < deadline:
                time.sleep(0.02)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z":
            time.sleep(0.01)
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(_read_rest(f)))
        reader.start()
        reader.join(0.5)
        out["reader during the gap"] = "waiting" if reader.is_alive() else str(got[0])
        t1 = time.perf_counter()
        subprocess.run([*CS, "mount", "--background", ref, str(mnt)], env=env, capture_output=True, timeout=120)
        reader.join(60)
        out["successor start s"] = f"{time.perf_counter() - t1:.2f}"
        out["open file"] = (f"read on: {got[0]} of {size - 4096} bytes" if got and isinstance(got[0], int)
                            else f"failed: {got[0] if got else 'still blocked'}")
    assert sh.stdin is not None and sh.stdout is not None
    sh.stdin.write("\n")
    sh.stdin.close()
    res = sh.stdout.read().strip().splitlines()
    out["shell in cwd"] = f"exit {sh.wait(20)}: {res[-1] if res else ''}"
    try:
        out["new lookup"] = f"ok ({len(os.listdir(mnt / small_dir))} names)"
    except OSError as e:
        out["new lookup"] = f"failed: {e.strerror}"
    out["kill to recovered s"] = f"{time.perf_counter() - t0:.2f}"
    unmount(mnt)
    return out


def _read_rest(f) -> object:  # type: ignore[no-untyped-def]
    try:
        return len(f.read())
    except OSError as e:
        return f"{e.strerror}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--failover", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("warmread: run as root (the low-level server mounts with mount(2))")
    ensure_corpus()
    with tempfile.TemporaryDirectory(prefix="warmread-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        store = new_store(w / "s")
        ref = f"{args.image}:latest"
        store.pack(f"oci:{CORPUS_DIR / args.image}:latest", ref)
        store.unpack_rootfs(ref, str(w / "rootfs"))
        env = {**os.environ, "CONVSTORE_STORE": str(w / "s" / "store"), "CONVSTORE_KEY": f"file:{w / 's' / 'key'}",
               "CONVSTORE_FUSE_SESSIONS": str(w / "sessions")}
        trees = {"rootfs": w / "rootfs", "kfuse": w / "kfuse", "libfuse": w / "libfuse"}
        for name in ("kfuse", "libfuse"):
            trees[name].mkdir()
            mount({**env, **({"CONVSTORE_FUSE": "libfuse"} if name == "libfuse" else {})}, ref, trees[name])
        try:
            for root in trees.values():
                tar_seconds(root)  # chunks local, page cache warm
                subprocess.run(["find", str(root), "-type", "f", "-exec", "cat", "{}", "+"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(args.rounds):
                for k, root in trees.items():
                    times[k].append(tar_seconds(root))
        finally:
            for name in ("kfuse", "libfuse"):
                unmount(trees[name])
        base = statistics.median(times["rootfs"])
        print(f"whole-tree tar -c of {args.image}, warm, median of {args.rounds}:")
        print("| tree | seconds | / rootfs |")
        print("|---|---|---|")
        for k, v in times.items():
            m = statistics.median(v)
            print(f"| {k} | {m:.3f} | {m / base:.2f}x |")
        if args.failover:
            big = max((p for p in (w / "rootfs").rglob("*") if p.is_file() and not p.is_symlink()),
                      key=lambda p: p.stat().st_size)
            big_rel = str(big.relative_to(w / "rootfs"))
            for name in ("kfuse", "libfuse"):
                e = {**env, **({"CONVSTORE_FUSE": "libfuse"} if name == "libfuse" else {})}
                print(f"failover, {name}: {failover(e, ref, trees[name], big_rel, 'etc')}")


if __name__ == "__main__":
    main()
