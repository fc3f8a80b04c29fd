"""The layer store's metadata path alone, old code against new, interleaved (issue 24): what a container
start asks of a FUSE lower layer -- LOOKUP, GETATTR, GETXATTR (overlayfs asks every lower entry for its
``trusted.overlay.*`` and ``security.capability`` xattrs, almost always absent), READLINK -- without podman,
fetching or the network around it.

    sudo .venv/bin/python -m benchmarks.layerwalk --baseline DIR [--image app1] [--rounds 7]

A local store holds the image; each round, for each version (``DIR`` holds the older ``convstore/``,
run with ``PYTHONPATH=DIR`` from outside the checkout), a fresh process serves the store's layers
(``LayerMount``, the low-level server as root) and another process walks every layer's ``diff/`` once,
cold: ``lstat`` of every entry, ``getxattr`` of ``trusted.overlay.opaque`` and ``security.capability``
on each, ``readlink`` of each symlink, ``listdir`` of each directory.  Prints each walk and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_bench import CORPUS_DIR  # noqa: E402

SERVE = """
import sys
from convstore.core.repository import Repository
from convstore.engines.layerstore import LayerMount, LayerStore
ls = LayerStore(Repository.open(sys.argv[1], sys.argv[2]))
ls.scan()
with LayerMount(ls, sys.argv[3]) as m:
    for d in sys.argv[4:]:
        m.layers.tree(d)  # the image opened and its trees built: only the metadata path is timed
    print("up", flush=True)
    sys.stdin.read()
"""

WALK = """
import errno, os, stat, sys, time
t = time.perf_counter()
n = 0
for root in sys.argv[1:]:
    todo = [root]
    while todo:
        d = todo.pop()
        for name in os.listdir(d):
            p = os.path.join(d, name)
            st = os.lstat(p)
            n += 1
            if stat.S_ISLNK(st.st_mode):
                os.readlink(p)
                continue
            for x in ("trusted.overlay.opaque", "security.capability"):
                try:
                    os.getxattr(p, x, follow_symlinks=False)
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        raise
            if stat.S_ISDIR(st.st_mode):
                todo.append(p)
print(n, time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a directory holding the older convstore/ package")
    ap.add_argument("--image", default="app1")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("layerwalk: run as root (the low-level FUSE server)")
    if not (Path(a.baseline) / "convstore" / "__init__.py").exists():
        raise SystemExit(f"layerwalk: {a.baseline} holds no convstore/ package")
    os.chdir("/")  # python -m in the checkout would import its convstore/, whatever PYTHONPATH says
    env = {"old": {**os.environ, "PYTHONPATH": os.path.abspath(a.baseline)},
           "new": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    with tempfile.TemporaryDirectory(prefix="convstore-layerwalk-") as tmp:
        w = Path(tmp)
        os.chmod(w, 0o700)
        store, key = str(w / "store"), f"file:{w / 'key'}"
        subprocess.run([sys.executable, "-m", "convstore", "-q", "--store", store, "--key", key, "pack",
                        f"oci:{CORPUS_DIR / a.image}:latest", f"{a.image}:latest"], check=True, env=env["new"],
                       capture_output=True)
        from convstore.core.repository import Repository

        digests = [lr.digest for lr in Repository.open(store, key).open_image(f"{a.image}:latest")[1].layers]
        res: dict[str, list[float]] = {v: [] for v in env}
        for r in range(a.rounds):
            for v in (("old", "new") if r % 2 else ("new", "old")):
                mnt = w / f"mnt-{v}-{r}"
                mnt.mkdir()
                srv = subprocess.Popen([sys.executable, "-c", SERVE, store, key, str(mnt), *digests], env=env[v],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                try:
                    assert srv.stdout is not None and srv.stdout.readline() == "up\n", f"{v}: the server did not start"
                    roots = [str(mnt / "Y29udGFpbmVyZA==" / d / "diff") for d in digests]
                    out = subprocess.run([sys.executable, "-c", WALK, *roots], check=True, capture_output=True,
                                         text=True).stdout.split()
                    n, secs = int(out[0]), float(out[1])
                    res[v].append(secs)
                    print(f"{v} round {r}: {n} entries in {secs:.3f} s ({secs / n * 1e6:.0f} us an entry)", flush=True)
                finally:
                    assert srv.stdin is not None
                    srv.stdin.close()
                    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
                    srv.wait(30)
        for v, ss in res.items():
            print(f"{a.image}: {v}: median walk {statistics.median(ss):.3f} s (n={len(ss)})")
        print(f"new / old: {statistics.median(res['new']) / statistics.median(res['old']):.2f}x")


if __name__ == "__main__":
    main()
