"""A registry outage under a lazy FUSE mount and fresh ``cat``/``ls`` (issue 23 §2): seconds per step.

    sudo .venv/bin/python -m benchmarks.offline [GLOBAL OPTION...]     # e.g. --read-deadline 5

An image of 12 x 300 kB files is packed and pushed into a registry store on a loopback docker-registry,
mounted with ``convstore mount --background`` (one file read, so its chunks are in the node cache);
then the registry is stopped, restarted, stalled with SIGSTOP (also a ``cat`` from an empty cache)
and resumed, and each read is timed.  Figures: docs/robustness.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from imagebuilder import Entry, make_tar, rich_layer, write_oci  # noqa: E402
from kms_fixtures import Registry  # noqa: E402

CLI = [sys.executable, "-m", "convstore.cli"]


def main(extra: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="convstore-offline-"))
    (tmp / "keys").mkdir(mode=0o700)
    env = dict(os.environ, CONVSTORE_STORE=str(tmp / "store"), CONVSTORE_KEY=f"file:{tmp}/keys/master.key",
               CONVSTORE_STATE_DIR=str(tmp / "state"), CONVSTORE_DAEMON="0")

    def cli(*a: str, check: bool = True) -> tuple[subprocess.CompletedProcess[bytes], float]:
        t = time.monotonic()
        p = subprocess.run(CLI + list(a), env=env, capture_output=True, timeout=900)
        if check and p.returncode:
            raise SystemExit(f"convstore {' '.join(a)}: {p.stderr.decode(errors='replace')}")
        return p, time.monotonic() - t

    def timed_read(p: Path) -> str:
        t = time.monotonic()
        try:
            p.read_bytes()
            r = "ok"
        except OSError as e:
            r = f"errno {e.errno}"
        return f"{r} in {time.monotonic() - t:.1f} s"

    def until_ok(p: Path) -> str:
        t0 = time.monotonic()
        while True:
            r = timed_read(p)
            if r.startswith("ok") or time.monotonic() - t0 > 60:
                return f"{r}, {time.monotonic() - t0:.1f} s after it came back"
            time.sleep(0.2)

    write_oci(str(tmp / "img"), [rich_layer(), make_tar([Entry(f"f{i}", data=os.urandom(300_000))
                                                         for i in range(12)])])
    reg = Registry(tmp / "reg")
    url = f"oci://{reg.host}/s"
    cli("pack", f"oci:{tmp / 'img'}", "a:1")
    cli("--insecure", "push", "a:1", url)
    g = ["--insecure", "--store", url, "--cache", str(tmp / "cache"), *extra]
    mnt = tmp / "mnt"
    mnt.mkdir()
    cli(*g, "mount", "--background", "a:1", str(mnt))
    (mnt / "f0").read_bytes()
    try:
        reg.stop()
        print("registry stopped: unread f9:", timed_read(mnt / "f9"), "| unread f11:", timed_read(mnt / "f11"),
              "| read before f0:", timed_read(mnt / "f0"), flush=True)
        for what in (["cat", "a:1", "/f0"], ["ls", "a:1", "/"]):
            p, dt = cli(*g, *what, check=False)
            print(f"registry stopped: a new `{what[0]}` of cached content: exit {p.returncode} in {dt:.1f} s "
                  f"{p.stderr.decode(errors='replace').strip()[-160:]}", flush=True)
        reg.start()
        print("registry restarted: f9:", until_ok(mnt / "f9"), flush=True)
        assert reg.proc is not None
        os.kill(reg.proc.pid, signal.SIGSTOP)
        print("registry stalled: unread f4:", timed_read(mnt / "f4"), "| unread f7:", timed_read(mnt / "f7"),
              flush=True)
        p, dt = cli(*g[:4], str(tmp / "cache2"), *extra, "cat", "a:1", "/f5", check=False)
        print(f"registry stalled: `cat` with an empty cache: exit {p.returncode} in {dt:.1f} s "
              f"{p.stderr.decode(errors='replace').strip()[-160:]}", flush=True)
        os.kill(reg.proc.pid, signal.SIGCONT)
        print("registry resumed: f4:", until_ok(mnt / "f4"), flush=True)
    finally:
        if reg.proc is not None:
            os.kill(reg.proc.pid, signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        reg.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
