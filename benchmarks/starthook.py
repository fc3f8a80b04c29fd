"""``python benchmarks/starthook.py CONVSTORE-ARGS...``: the convstore command line with counters for
one profiled start (benchmarks/startprofile.py): FUSE operations by kind (count, seconds in the handler),
seconds in the fetcher's reads and store batches, in chunk decryption.  Written as JSON at exit to
``$CONVSTORE_STARTHOOK_OUT.PID``.  Measurement only: nothing of convstore is changed but timed."""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

from convstore.core import chunks
from convstore.reader import fetcher, kfuse

_lock = threading.Lock()
count: Counter[str] = Counter()
secs: Counter[str] = Counter()
# FUSE opcodes (linux/fuse.h), those kfuse names and the few it answers ENOSYS
OPS = {getattr(kfuse, n): n for n in ("LOOKUP", "FORGET", "GETATTR", "SETATTR", "READLINK", "MKDIR", "UNLINK",
                                      "RMDIR", "OPEN", "READ", "STATFS", "RELEASE", "CREATE", "GETXATTR",
                                      "LISTXATTR", "FLUSH", "INIT", "OPENDIR", "READDIR", "RELEASEDIR", "ACCESS",
                                      "INTERRUPT", "DESTROY", "BATCH_FORGET", "READDIRPLUS")}
OPS.update({39: "IOCTL", 40: "POLL", 46: "LSEEK", 47: "COPY_FILE_RANGE", 52: "STATX"})


def timed(key: str, f: Any) -> Any:
    def g(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            with _lock:
                count[key] += 1
                secs[key] += time.perf_counter() - t
    return g


_dispatch = kfuse.KernelServer._dispatch


#: (wall-clock start, opcode name, seconds in the handler, nodeid, name looked up) of each FUSE request
timeline: list[tuple[float, str, float, int, str]] = []


def dispatch(self: Any, req: memoryview) -> None:
    _, op, _, nodeid = kfuse.IN_HEADER.unpack_from(req)[:4]
    t0, t = time.time(), time.perf_counter()
    timed(f"fuse {OPS.get(op, op)}", _dispatch)(self, req)
    name = bytes(req[kfuse.IN_HEADER.size:]).split(b"\0", 1)[0].decode(errors="replace") if op == kfuse.LOOKUP else ""
    timeline.append((t0, OPS.get(op, str(op)), time.perf_counter() - t, nodeid, name))


if os.environ.get("CONVSTORE_STARTHOOK_SWITCH"):  # an experiment: the GIL's switch interval, seconds
    sys.setswitchinterval(float(os.environ["CONVSTORE_STARTHOOK_SWITCH"]))
kfuse.KernelServer._dispatch = dispatch  # type: ignore[method-assign]
fetcher.ChunkFetcher.read = timed("fetcher read (FUSE readers' wait)", fetcher.ChunkFetcher.read)  # type: ignore
_load_batch = timed("fetcher store batch (worker)", fetcher.ChunkFetcher._load_batch)


def load_batch(self: Any, idxs: list[int], futs: Any) -> None:
    t0, t = time.time(), time.perf_counter()
    try:
        _load_batch(self, idxs, futs)
    finally:
        timeline.append((t0, "store batch", time.perf_counter() - t, len(idxs), ""))


fetcher.ChunkFetcher._load_batch = load_batch  # type: ignore[method-assign]


def _span(name: str, f: Any) -> Any:
    """``f`` timed into the timeline as ``name`` events (start, seconds)."""
    def g(*a: Any, **k: Any) -> Any:
        t0, t = time.time(), time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            timeline.append((t0, name, time.perf_counter() - t, 0, ""))
    return g


fetcher.ChunkFetcher.prefetch_profile = _span("prefetch_profile", fetcher.ChunkFetcher.prefetch_profile)  # type: ignore
chunks.Chunks.blobs = _span("store blobs", chunks.Chunks.blobs)  # type: ignore[method-assign]
chunks.decrypt_chunk = timed("decrypt_chunk", chunks.decrypt_chunk)


def _cpu_sampler() -> None:
    """The process's CPU seconds (user + system) every 20 ms, into the timeline as ``cpu`` events."""
    while True:
        t = os.times()
        timeline.append((time.time(), "cpu", t.user + t.system, 0, ""))
        time.sleep(0.02)


if os.environ.get("CONVSTORE_STARTHOOK_OUT"):
    threading.Thread(target=_cpu_sampler, daemon=True, name="starthook-cpu").start()


@atexit.register
def dump() -> None:
    out = os.environ.get("CONVSTORE_STARTHOOK_OUT")
    if out:
        with open(f"{out}.{os.getpid()}", "w") as f:
            json.dump({k: [count[k], round(secs[k], 4)] for k in sorted(count)}, f, indent=1)
        if timeline:
            with open(f"{out}.timeline.{os.getpid()}", "w") as f:
                json.dump(timeline, f)


if __name__ == "__main__":
    from convstore.__main__ import main

    sys.argv[0] = "convstore"
    main()
