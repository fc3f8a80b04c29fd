"""A kernel-served lower layer (EROFS over a FUSE-served image file) against the tree FUSE mount and the disk.

    sudo python -m benchmarks.erofs_start [--image app1] [--rounds 5]

One run, interleaved, chunks local (a local store, its files in the page cache after the first round):

(a) ``tar -c`` of the whole merged tree: the unpacked rootfs (page cache warm), the kfuse tree mount and
    the EROFS-over-FUSE mount, each mount new every round (cold node cache: a new ImageFS, so a new plaintext
    chunk cache, and new kernel caches), read twice: cold, then warm;
(b) a podman-like start: an overlay (lowerdir = the tree, upperdir on disk) and ``runc run`` of the image's
    command on it, the tree on disk / a new kfuse mount / a new EROFS mount: the mount's time (the EROFS image
    is built then, from the manifest's tree), the first run (cold), a second run on the same mount (warm);
    and the same with ``+decoded``: the process keeps its plaintext chunk cache from mount to mount (a
    layer store or daemon that served the image before), so only the kernel's caches are cold.
FUSE requests are counted per kind (kfuse's counters) for each mount.
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
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_bench import CORPUS_DIR, ensure_corpus, new_store  # noqa: E402

from convstore.reader import kfuse  # noqa: E402
from convstore.reader.chunkcache import ChunkCache  # noqa: E402
from convstore.reader.erofsmount import mount_erofs  # noqa: E402
from convstore.reader.imagefs import PREFETCH_ON_OPEN, ImageFS  # noqa: E402

OPS = {kfuse.LOOKUP: "LOOKUP", kfuse.GETATTR: "GETATTR", kfuse.READLINK: "READLINK", kfuse.READ: "READ",
       kfuse.GETXATTR: "GETXATTR", kfuse.LISTXATTR: "LISTXATTR", kfuse.READDIR: "READDIR",
       kfuse.READDIRPLUS: "READDIRPLUS", kfuse.OPEN: "OPEN", kfuse.OPENDIR: "OPENDIR", kfuse.STATFS: "STATFS",
       kfuse.ACCESS: "ACCESS", kfuse.FLUSH: "FLUSH", kfuse.INIT: "INIT", kfuse.INTERRUPT: "INTERRUPT"}


def tar_seconds(root: Path) -> float:
    """``tar -c`` into a pipe (GNU tar reads no file data when the archive is /dev/null)."""
    t = time.perf_counter()
    subprocess.run(f"tar -C '{root}' -cf - . | wc -c >/dev/null", shell=True, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


class Tree:
    """A way to present the image's merged tree at a directory: on disk, kfuse, EROFS over FUSE."""

    def __init__(self, kind: str, store: Any, ref: str, rootfs: Path, where: Path):
        self.kind, self.store, self.ref, self.rootfs, self.where = kind, store, ref, rootfs, where
        # "+decoded": the node's process keeps its plaintext chunk cache across mounts (the layer store's or
        # the daemon's); the kernel's caches are new with each mount all the same
        self.cache = ChunkCache() if kind.endswith("+decoded") else None
        self.fs: ImageFS | None = None
        self.handle: Any = None
        self.ops: dict[int, int] = {}

    def open(self) -> Path:
        if self.kind == "disk":
            return self.rootfs
        self.where.mkdir(exist_ok=True)
        self.fs = ImageFS.from_store(self.store, self.ref, prefetch_on_open=PREFETCH_ON_OPEN, cache=self.cache)
        if self.kind.startswith("kfuse"):
            self.handle = kfuse.start(self.fs, str(self.where), read_only=True)
        else:
            self.handle = mount_erofs(self.fs, str(self.where), fusedir=str(self.where) + ".fuse")
        return self.where

    def close(self) -> None:
        if self.kind == "disk":
            return
        self.ops = dict(self.handle.ops)
        if self.kind.startswith("kfuse"):
            kfuse.umount(str(self.where))
            self.handle.wait(5)
        else:
            self.handle.close()
        assert self.fs is not None
        self.fs.close()


def overlay_run(lower: Path, work: Path, bundle: Path, cid: str) -> None:
    for d in ("upper", "work", "merged"):
        (work / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}", str(work / "merged")],
                   check=True)
    try:
        p = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, timeout=120)
        if p.returncode != 0:
            raise SystemExit(f"erofs_start: runc run failed: {p.stderr.decode(errors='replace')[-400:]}")
    finally:
        subprocess.run(["umount", "-l", str(work / "merged")], check=False)
        shutil.rmtree(work, ignore_errors=True)


def med(v: list[float]) -> float:
    return statistics.median(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the raw samples here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("erofs_start: run as root (mount(2), runc)")
    ensure_corpus()
    cmd = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"][a.image]["cmd"]
    w = Path(tempfile.mkdtemp(prefix="erofs-start-"))
    os.chmod(w, 0o700)
    try:
        store = new_store(w / "s")
        ref = f"{a.image}:latest"
        store.pack(f"oci:{CORPUS_DIR / a.image}:latest", ref)
        store.unpack_rootfs(ref, str(w / "rootfs"))
        bundle = w / "bundle"
        bundle.mkdir()
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(w / "ov" / "merged"), "readonly": False}
        spec["process"].update(terminal=False, args=cmd)
        (bundle / "config.json").write_text(json.dumps(spec))
        kinds = ["disk", "kfuse", "erofs"]
        starts = kinds + ["kfuse+decoded", "erofs+decoded"]
        trees = {k: Tree(k, store, ref, w / "rootfs", w / f"mnt-{k}") for k in starts}
        samples: dict[str, list[float]] = {}
        ops: dict[str, dict[str, dict[int, int]]] = {"tar": {}, "start": {}}

        def add(key: str, v: float) -> None:
            samples.setdefault(key, []).append(v)

        def once(k: str, body: Callable[[Path], None], what: str) -> None:
            t = time.perf_counter()
            root = trees[k].open()
            add(f"{what} {k} mount", time.perf_counter() - t)
            try:
                body(root)
            finally:
                trees[k].close()
            add(f"{what} {k} total", time.perf_counter() - t)
            ops[what][k] = trees[k].ops

        tar_seconds(w / "rootfs")
        for i in range(a.rounds + 1):  # round 0 warms the store's files and the rootfs: not counted
            for k in kinds:
                def tars(root: Path, k: str = k, i: int = i) -> None:
                    cold, warm = tar_seconds(root), tar_seconds(root)
                    if i:
                        add(f"tar cold {k}", cold)
                        add(f"tar warm {k}", warm)
                once(k, tars, "tar")
            for k in starts:
                def start(root: Path, k: str = k, i: int = i) -> None:
                    t = time.perf_counter()
                    overlay_run(root, w / "ov", bundle, f"erofs-{os.getpid()}-{k}-{i}")
                    t1 = time.perf_counter()
                    overlay_run(root, w / "ov", bundle, f"erofs-{os.getpid()}-{k}-{i}-warm")
                    if i:
                        add(f"run {k}", t1 - t)
                        add(f"run warm {k}", time.perf_counter() - t1)
                once(k, start, "start")
        if a.json:
            Path(a.json).write_text(json.dumps({"samples": samples, "ops": ops}, indent=1))
        print(f"{a.image}, chunks local, median of {a.rounds} rounds (interleaved)\n")
        print("(a) whole-tree tar -c | cold (new mount) | x disk | warm | x disk")
        print("|---|---|---|---|---|")
        dc, dw = med(samples["tar cold disk"]), med(samples["tar warm disk"])
        for k in kinds:
            c, wm = med(samples[f"tar cold {k}"]), med(samples[f"tar warm {k}"])
            print(f"| {k} | {c:.3f} s | {c / dc:.2f}x | {wm:.3f} s | {wm / dw:.2f}x |")
        print("\n(b) overlay + runc run of the image's command | mount | first run (cold) | x disk | mount + first "
              "run | x disk | second run (warm) | x disk")
        print("|---|---|---|---|---|---|---|---|")
        r0, w0 = med(samples["run disk"]), med(samples["run warm disk"])
        for k in starts:
            m, r, wr = med(samples[f"start {k} mount"][1:]), med(samples[f"run {k}"]), med(samples[f"run warm {k}"])
            print(f"| {k} | {m:.3f} s | {r:.3f} s | {r / r0:.2f}x | {m + r:.3f} s | {(m + r) / r0:.2f}x | {wr:.3f} s "
                  f"| {wr / w0:.2f}x |")
        print("\nFUSE requests (last round): tar cold+warm / start cold+warm")
        for k in starts[1:]:
            for what in ("tar", "start"):
                o = ops[what].get(k)
                if o is None:
                    continue
                print(f"  {k} {what}: " + ", ".join(f"{OPS.get(op, op)} {n}" for op, n in sorted(o.items())))
    finally:
        for k in ("kfuse", "erofs", "kfuse+decoded", "erofs+decoded"):
            for d in (w / f"mnt-{k}", Path(str(w / f"mnt-{k}") + ".fuse")):
                subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
