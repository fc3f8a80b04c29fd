"""convstore against borg, restic and casync (and ``zstd -3 -T2`` and
``skopeo copy`` as references), side by side in one run, on the corpus.

    sudo python -m benchmarks.compare [--write-docs] [--label after] [--rounds 3]

Every figure is one process timed from fork to exit, as a user runs it
(``os.wait4``: wall time and the process's peak RSS).  Two inputs:

* **layer tars**: each image's layers as plain tars (491.7 MB for the five).
  The peers archive the tar files; convstore packs the same bytes as an OCI
  layout with uncompressed layers (each blob *is* the tar, hard-linked).
* **rootfs**: each image unpacked to a directory.  The peers archive the
  directories; convstore stores images, not directories, so its ingest row
  is the layer-tar one and its restore is ``unpack --rootfs``.

Ingest runs one call per image (stored bytes measured after each), then all
five images in one call.  Restore is of app1, best of ``--rounds``
alternating rounds.  Then convstore's own rows: unpack to the original
media type (gzip) and a re-pack of a stored image, each against
``zstd -3 -T2`` over the same uncompressed bytes, and the start of a
container (``convstore run``, and runc on a mount kept up by
``convstore mount``) against ``runc run`` on the unpacked rootfs.

Every convstore command is timed twice: as its own process, and as
``convstore + daemon``: the same command line with a ``convstore daemon``
running (started once, untimed), from which the command forks instead of
starting an interpreter.  GNU time sees only the client of a daemon-served
command; the commands' own peak RSS comes from the daemon (``wait4``).

Needs root (FUSE, runc) and Debian's borgbackup, restic, casync, zstd,
skopeo and runc (``scripts/setup.sh --bench`` installs them); matplotlib for
the plots (the ``bench`` extra).  ``--write-docs`` puts the tables into
docs/benchmarks.md and the plots into docs/img/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_bench import CORPUS_DIR, IMAGES, ensure_corpus, write_layer_tars  # noqa: E402
from docblock import DOCS, write_block  # noqa: E402

import convstore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEERS = ("borg", "restic", "casync")
DAEMON = "convstore + daemon"
TOOLS = ("convstore", DAEMON, *PEERS, "zstd -3 -T2", "skopeo copy")
OURS = ("convstore", DAEMON)
START_IMAGE = "app1"
PASSWORD = "bench-password"  # the peers' repository passphrase (throwaway repositories)


@dataclass
class Proc:
    seconds: float
    rss: int  # peak RSS in bytes


@dataclass
class ToolRun:
    per_image: list[Proc] = field(default_factory=list)
    stored_after: list[int] = field(default_factory=list)
    all_in_one: Proc | None = None
    all_stored: int = 0
    restore: list[Proc] = field(default_factory=list)
    restore_rootfs: list[Proc] = field(default_factory=list)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        stdout: Any = subprocess.DEVNULL) -> Proc:
    """Run ``cmd`` to completion: its wall time and peak RSS (fails loudly).
    GNU time reports the RSS (a child forked from this large process would
    count this process's pages until it execs); its own cost is a fork+exec."""
    e = {**os.environ, **(env or {})}
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # users' interpreters cache bytecode
    with tempfile.NamedTemporaryFile("r") as rss:
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name, *cmd], cwd=cwd, env=e, stdout=stdout,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        dt = time.perf_counter() - t
        kib = rss.read().strip().splitlines()
    if p.returncode != 0:
        raise SystemExit(f"compare: {' '.join(cmd)} failed ({p.returncode}): "
                         f"{p.stderr.decode(errors='replace').strip()[-600:]}")
    return Proc(dt, int(kib[-1]) * 1024)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# -- inputs (prepared once, not timed) -----------------------------------------

def prepare(work: Path, images: list[str]) -> dict[str, Any]:
    """Layer tars, OCI layouts of uncompressed layers over the same files, and rootfs trees."""
    from convstore.oci.sources import parse_source

    tars, layouts, roots = work / "tars", work / "layouts", work / "rootfs"
    scratch = convstore.Store.open(str(work / "prep-store"), f"file:{work / 'prep-key'}")
    out: dict[str, Any] = {"tar_bytes": {}, "tars": {}, "layouts": {}, "rootfs": {}}
    for img in images:
        src = parse_source(f"oci:{CORPUS_DIR / img}:latest")
        d = tars / img
        d.mkdir(parents=True, exist_ok=True)
        files = write_layer_tars(src, lambda i: d / f"layer{i}.tar")
        out["tars"][img] = d
        out["tar_bytes"][img] = sum(f.stat().st_size for f in files)
        out["layouts"][img] = _plain_layout(layouts / img, src, files)
        root = roots / img
        if not root.exists():
            scratch.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest")
            scratch.unpack_rootfs(f"{img}:latest", str(root))
        out["rootfs"][img] = root
        src.close()
    return out


def _plain_layout(dest: Path, src: Any, files: list[Path]) -> Path:
    """An OCI layout whose layers are the uncompressed tars (hard links)."""
    if (dest / "index.json").exists():
        return dest
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    for desc, f in zip(src.layers, files):
        digest = desc.diff_id.split(":", 1)[1]
        if not (blobs / digest).exists():
            os.link(f, blobs / digest)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": desc.diff_id,
                       "size": f.stat().st_size})
    (blobs / src.config_digest.split(":", 1)[1]).write_bytes(src.config_bytes)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": src.config_media_type, "digest": src.config_digest,
                                      "size": len(src.config_bytes)}, "layers": layers}).encode()
    mdigest = hashlib.sha256(manifest).hexdigest()
    (blobs / mdigest).write_bytes(manifest)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{mdigest}",
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return dest


# -- the tools ----------------------------------------------------------------

# the installed command, as a user runs it (``python -m convstore`` adds runpy's imports, and in the
# checkout it would import the checkout's files, not the installed package the daemon runs)
CONVSTORE = str(Path(sys.executable).parent / "convstore")


def convstore_cmd(store: Path, *args: str) -> list[str]:
    return [CONVSTORE, "--store", str(store / "store"), "--key", f"file:{store / 'key'}",
            "-q", *args]


class Daemon:
    """``convstore daemon`` on a private socket: commands run with ``env(True)`` fork from it,
    with ``env(False)`` start their own interpreter."""

    def __init__(self, work: Path):
        self.socket = fresh(work / "daemon") / "cli.sock"
        os.chmod(self.socket.parent, 0o700)
        run([CONVSTORE, "daemon", "--background", "--socket", str(self.socket)])

    def env(self, daemon: bool) -> dict[str, str]:
        return {"CONVSTORE_DAEMON": "1" if daemon else "0", "CONVSTORE_DAEMON_SOCKET": str(self.socket)}

    def status(self) -> dict[str, Any]:
        p = subprocess.run([CONVSTORE, "daemon", "--status", "--socket", str(self.socket)],
                           capture_output=True, text=True, check=True)
        doc: dict[str, Any] = json.loads(p.stdout)
        return doc

    def stop(self) -> None:
        subprocess.run([CONVSTORE, "daemon", "--stop", "--socket", str(self.socket)],
                       capture_output=True, check=False)


DAEMON_ENV: dict[str, dict[str, str]] = {}  # per tool name: set by main() once the daemon runs


PEER_ENV = {"BORG_PASSPHRASE": PASSWORD, "RESTIC_PASSWORD": PASSWORD,
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}


class Tool:
    """One tool's repository in ``root``: init, ingest a path or several, restore one image."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, fresh(root)
        self.env = {**PEER_ENV, "RESTIC_CACHE_DIR": str(root / "restic-cache"), "BORG_BASE_DIR": str(root / "borg-home")}
        if name == "borg":
            run(["borg", "init", "-e", "repokey-blake2", str(root / "repo")], env=self.env)
        elif name == "restic":
            run(["restic", "init", "-q", "-r", str(root / "repo")], env=self.env)
        elif name in OURS:
            os.chmod(root, 0o700)
        self.cs_env = DAEMON_ENV.get(name, {})

    def stored(self) -> int:
        return tree_bytes(self.root / ("store" if self.name in OURS else "repo"))

    def ingest(self, names: list[str], paths: list[Path], layouts: list[Path] | None) -> Proc:
        """One call that stores ``paths`` (directories) as archive(s) named ``names``."""
        r = str(self.root / "repo")
        label = names[0] if len(names) == 1 else "all"
        if self.name in OURS:
            assert layouts is not None
            if len(names) == 1:
                return run(convstore_cmd(self.root, "pack", f"oci:{layouts[0]}:latest", f"{names[0]}:latest"),
                           env=self.cs_env)
            script = ("import sys, convstore\n"
                      "s = convstore.Store.open(sys.argv[1], sys.argv[2])\n"
                      "for src, ref in zip(sys.argv[3::2], sys.argv[4::2]):\n"
                      "    s.pack(src, ref)\n")
            args = [a for n, lay in zip(names, layouts) for a in (f"oci:{lay}:latest", f"{n}:latest")]
            return run([sys.executable, "-c", script, str(self.root / "store"), f"file:{self.root / 'key'}", *args])
        if self.name == "borg":
            return run(["borg", "create", f"{r}::{label}", *names],
                       cwd=paths[0].parent, env=self.env)
        if self.name == "restic":
            return run(["restic", "-r", r, "backup", "-q", "--tag", label, "--host", "bench", *names],
                       cwd=paths[0].parent, env=self.env)
        if self.name == "casync":
            (self.root / "repo").mkdir(exist_ok=True)
            if len(names) == 1:
                return run(["casync", "make", f"--store={r}/store", f"{r}/{label}.caidx", str(paths[0])])
            return run(["casync", "make", f"--store={r}/store", f"{r}/{label}.caidx", str(paths[0].parent)])
        if self.name == "zstd -3 -T2":
            (self.root / "repo").mkdir(exist_ok=True)
            files = sorted(str(f) for p in paths for f in p.rglob("*") if f.is_file())
            listing = self.root / "files.txt"  # a rootfs has more names than an argument list holds
            listing.write_text("".join(f + "\n" for f in files))
            with open(self.root / "repo" / f"{label}.zst", "wb") as out:
                return run(["zstd", "-3", "-T2", "-q", "-c", "--filelist", str(listing)], stdout=out)
        if self.name == "skopeo copy":
            return run(["skopeo", "copy", "-q", f"oci:{CORPUS_DIR / names[0]}:latest", f"oci:{r}:{label}"])
        raise ValueError(self.name)

    def restore(self, name: str, dest: Path, rootfs: bool) -> Proc:
        r = str(self.root / "repo")
        fresh(dest)
        if self.name in OURS:
            if rootfs:
                return run(convstore_cmd(self.root, "unpack", f"{name}:latest", "--rootfs", str(dest / "root")),
                           env=self.cs_env)
            return run(convstore_cmd(self.root, "unpack", "--compress", "none", f"{name}:latest",
                                     f"oci:{dest / 'oci'}:latest"), env=self.cs_env)
        if self.name == "borg":
            return run(["borg", "extract", f"{r}::{name}"], cwd=dest, env=self.env)
        if self.name == "restic":
            return run(["restic", "-r", r, "restore", "-q", "latest", "--tag", name, "--target", str(dest)],
                       env=self.env)
        if self.name == "casync":
            return run(["casync", "extract", f"--store={r}/store", f"{r}/{name}.caidx", str(dest / "out")])
        if self.name == "zstd -3 -T2":
            with open(dest / "out.tar", "wb") as out:
                return run(["zstd", "-d", "-T2", "-q", "-c", f"{r}/{name}.zst"], stdout=out)
        raise ValueError(self.name)


# -- the comparison ---------------------------------------------------------------

def compare(work: Path, inp: dict[str, Any], images: list[str], rootfs: bool, rounds: int,
            ours: dict[str, Tool] | None = None) -> tuple[dict[str, ToolRun], dict[str, Tool]]:
    """Ingest (per image, then all in one call) and restore of app1, for each tool.
    In the rootfs pass convstore is not re-ingested: ``ours`` (its layer-tar
    stores) restore with ``unpack --rootfs``.  ``convstore + daemon`` runs the
    same commands through a running ``convstore daemon``; its all-in-one
    ingest is convstore's (one process either way)."""
    kind = "rootfs" if rootfs else "tars"
    results: dict[str, ToolRun] = {}
    tools: dict[str, Tool] = {}
    for name in TOOLS:
        if rootfs and name in (*OURS, "skopeo copy"):
            continue
        print(f"[{kind}] {name}: ingest, one call per image", file=sys.stderr)
        res = results[name] = ToolRun()
        t = tools[name] = Tool(name, work / kind / name.split()[0])
        for img in images:
            res.per_image.append(t.ingest([img], [inp[kind][img]], [inp["layouts"][img]]))
            res.stored_after.append(t.stored())
        if name not in ("skopeo copy", DAEMON):
            print(f"[{kind}] {name}: ingest, one call for all", file=sys.stderr)
            t1 = Tool(name, work / kind / f"{name.split()[0]}-all")
            res.all_in_one = t1.ingest(images, [inp[kind][i] for i in images], [inp["layouts"][i] for i in images])
            res.all_stored = t1.stored()
            shutil.rmtree(t1.root)
    if rootfs and ours is not None:
        tools = {**ours, **tools}
        results = {**{n: ToolRun() for n in ours}, **results}
    for r in range(rounds):  # alternating, so a noisy spell hits every tool alike
        for name, tool in tools.items():
            if name == "skopeo copy":
                continue
            print(f"[{kind}] restore round {r + 1}: {name}", file=sys.stderr)
            p = tool.restore(START_IMAGE, work / "restore", rootfs)
            (results[name].restore_rootfs if rootfs else results[name].restore).append(p)
    shutil.rmtree(work / "restore", ignore_errors=True)
    return results, tools


def convstore_rows(work: Path, inp: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Unpack to the original media type and re-pack, against zstd; container start against runc.
    Each convstore command alternates between its own process and the daemon."""
    store = Tool("convstore", work / "gzip" / "convstore")
    tars = sorted(inp["tars"][START_IMAGE].glob("*.tar"))
    nbytes = inp["tar_bytes"][START_IMAGE]
    src = f"oci:{CORPUS_DIR / START_IMAGE}:latest"
    out: dict[str, Any] = {"bytes": nbytes, "first_pack": run(convstore_cmd(store.root, "pack", src, "app1:latest"))}
    z: list[Proc] = []
    unp: dict[str, list[Proc]] = {n: [] for n in OURS}
    rep: dict[str, list[Proc]] = {n: [] for n in OURS}
    for _ in range(rounds):
        with open(os.devnull, "wb") as devnull:
            z.append(run(["zstd", "-3", "-T2", "-q", "-c", *map(str, tars)], stdout=devnull))
        for n in OURS:
            dest = fresh(work / "gzip" / "out")
            unp[n].append(run(convstore_cmd(store.root, "unpack", "app1:latest", f"oci:{dest}:latest"),
                              env=DAEMON_ENV[n]))
            rep[n].append(run(convstore_cmd(store.root, "pack", src, "app1:latest"), env=DAEMON_ENV[n]))
    out.update(zstd=z, unpack_original=unp, repack=rep)
    out["start"] = start_rows(work, store, inp["rootfs"][START_IMAGE], rounds)
    return out


def _bundle(dest: Path, rootfs: Path, args: list[str]) -> Path:
    fresh(dest)
    subprocess.run(["runc", "spec", "--bundle", str(dest)], check=True)
    spec = json.loads((dest / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["process"].update(terminal=False, args=args)
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777"]})
    (dest / "config.json").write_text(json.dumps(spec))
    return dest


def start_rows(work: Path, store: Tool, rootfs: Path, rounds: int) -> dict[str, list[Proc]]:
    args = json.loads((CORPUS_DIR / "corpus.json").read_text())["images"][START_IMAGE]["cmd"]
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    local = _bundle(work / "bundle-local", rootfs, args)
    fuse = _bundle(work / "bundle-fuse", mnt, args)
    run(convstore_cmd(store.root, "run", "app1:latest"))  # records the start-up profile
    rows: dict[str, list[Proc]] = {"convstore run (warm)": [], f"convstore run (warm), {DAEMON}": [],
                                   "runc run, rootfs on disk": [], "runc run, rootfs on an up convstore mount": []}
    run(convstore_cmd(store.root, "mount", "--background", "app1:latest", str(mnt)))
    try:
        for i in range(max(rounds, 5)):
            for n in OURS:
                rows["convstore run (warm)" if n == "convstore" else f"convstore run (warm), {n}"].append(
                    run(convstore_cmd(store.root, "run", "app1:latest"), env=DAEMON_ENV[n]))
            rows["runc run, rootfs on disk"].append(run(["runc", "run", "--bundle", str(local), f"cmp-l{i}"]))
            rows["runc run, rootfs on an up convstore mount"].append(
                run(["runc", "run", "--bundle", str(fuse), f"cmp-f{i}"]))
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    return rows


def version_seconds(n: int = 15) -> list[float]:
    return [run([CONVSTORE, "--version"]).seconds for _ in range(n)]


# -- reporting ----------------------------------------------------------------

def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds if seconds else 0.0


def best(ps: list[Proc]) -> float:
    return min(p.seconds for p in ps)


def median(ps: list[Proc]) -> float:
    return statistics.median(p.seconds for p in ps)


def pass_table(res: dict[str, ToolRun], ingest_bytes: int, restore_bytes: int, restore_label: str) -> str:
    rows = ["| tool | ingest, one call per image | ingest, one call for all | stored after the five | "
            f"peak RSS, ingest | {restore_label} | peak RSS, restore |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        per = (f"{mbps(ingest_bytes, sum(p.seconds for p in r.per_image)):.0f} MB/s "
               f"({sum(p.seconds for p in r.per_image):.2f} s)") if r.per_image else "(its layer-tar store)"
        allin = f"{mbps(ingest_bytes, r.all_in_one.seconds):.0f} MB/s" if r.all_in_one else "—"
        stored = f"{r.stored_after[-1] / 1e6:.1f} MB" if r.stored_after else "—"
        if r.all_in_one and r.stored_after:
            stored += f" ({r.all_stored / 1e6:.1f} MB in one call)"
        client = " (the client's)" if name == DAEMON else ""  # the command's own: the targets' RSS row
        rss = f"{max(p.rss for p in [*r.per_image, *([r.all_in_one] if r.all_in_one else [])]) / 2**20:.0f} MiB" \
            f"{client}" if r.per_image else "—"
        rs = r.restore or r.restore_rootfs
        rest = f"{mbps(restore_bytes, best(rs)):.0f} MB/s ({best(rs):.2f} s)" if rs else "—"
        rrss = f"{max(p.rss for p in rs) / 2**20:.0f} MiB{client}" if rs else "—"
        rows.append(f"| {name} | {per} | {allin} | {stored} | {rss} | {rest} | {rrss} |")
    return "\n".join(rows)


def stored_table(res: dict[str, ToolRun], images: list[str]) -> str:
    rows = ["| tool | " + " | ".join(f"+ {i}" for i in images) + " |", "|---|" + "---|" * len(images)]
    for name, r in res.items():
        if r.stored_after:
            rows.append(f"| {name} | " + " | ".join(f"{b / 1e6:.1f}" for b in r.stored_after) + " |")
    return "\n".join(rows)


def targets(tars: dict[str, ToolRun], roots: dict[str, ToolRun], own: dict[str, Any], inp: dict[str, Any],
            images: list[str], version: list[float], daemon_rss: int) -> tuple[str, list[tuple[str, float, float, bool]]]:
    """Each target for convstore in its own processes and through the daemon (``daemon_rss``: the
    largest peak RSS of a command the daemon forked, which GNU time does not see)."""
    nb = sum(inp["tar_bytes"][i] for i in images)
    speed = {n: mbps(nb, sum(p.seconds for p in tars[n].per_image)) for n in (*OURS, *PEERS)}
    fastest = max(PEERS, key=lambda n: speed[n])
    smallest = min(PEERS, key=lambda n: tars[n].stored_after[-1])
    start = own["start"]

    def rss(n: str) -> float:
        cs = tars[n]
        procs = [*cs.per_image, *cs.restore, *roots[n].restore_rootfs, *own["unpack_original"][n], *own["repack"][n]]
        return max([p.rss for p in procs] + ([daemon_rss] if n == DAEMON else [])) / 1e6

    def run_row(n: str) -> str:
        return "convstore run (warm)" if n == "convstore" else f"convstore run (warm), {n}"

    checks: list[tuple[str, dict[str, float], float]] = [
        (f"ingest, one call per image, vs the fastest peer ({fastest})",
         {n: speed[n] / speed[fastest] for n in OURS}, 2.5),
        (f"stored bytes, smallest peer ({smallest}) / convstore",
         {n: tars[smallest].stored_after[-1] / tars[n].stored_after[-1] for n in OURS}, 1.0),
        ("restore `unpack --compress none` vs casync",
         {n: best(tars["casync"].restore) / best(tars[n].restore) for n in OURS}, 2.0),
        ("restore `unpack --rootfs` vs casync (rootfs)",
         {n: best(roots["casync"].restore_rootfs) / best(roots[n].restore_rootfs) for n in OURS}, 2.0),
        ("unpack to the original media type (gzip) vs `zstd -3 -T2`",
         {n: best(own["zstd"]) / best(own["unpack_original"][n]) for n in OURS}, 1.0),
        ("re-pack of a stored image vs `zstd -3 -T2`", {n: best(own["zstd"]) / best(own["repack"][n]) for n in OURS},
         10.0),
        ("peak RSS of any convstore process, MB (at most)", {n: rss(n) for n in OURS}, 300.0),
        ("`convstore --version`, ms (median; at most)", {"convstore": statistics.median(version) * 1000}, 120.0),
        ("warm `convstore run` of app1, s (median; at most)", {n: median(start[run_row(n)]) for n in OURS}, 0.3),
        ("runc on an up mount vs runc on disk (median; at most)",
         {"convstore": median(start["runc run, rootfs on an up convstore mount"])
          / median(start["runc run, rootfs on disk"])}, 2.0),
    ]
    rows = ["| target | convstore | " + DAEMON + " | needed | met |", "|---|---|---|---|---|"]
    out: list[tuple[str, float, float, bool]] = []
    for what, got, need in checks:
        at_most = "at most" in what
        unit = "" if at_most else "x"
        ok = {n: (v <= need if at_most else v >= need) for n, v in got.items()}
        cells = [f"{got[n]:.2f}{unit}" if n in got else "(same)" for n in OURS]
        met = " / ".join(("yes" if ok[n] else "**no**") for n in OURS if n in got)
        rows.append(f"| {what} | {cells[0]} | {cells[1]} | {'≤' if at_most else '≥'} {need:g}{unit} | {met} |")
        out.extend((f"{what} [{n}]", got[n], need, ok[n]) for n in got)
    return "\n".join(rows), out


def own_table(own: dict[str, Any]) -> str:
    nb = own["bytes"]
    rows = ["| app1 (122 MB of layer tars), per process | best | median | peak RSS |", "|---|---|---|---|"]
    lines: list[tuple[str, list[Proc]]] = [("`zstd -3 -T2` over the layer tars", own["zstd"])]
    for n in OURS:
        via = "" if n == "convstore" else ", through the daemon"
        lines += [(f"`convstore unpack` to the original gzip layout{via}", own["unpack_original"][n]),
                  (f"`convstore pack` of the stored image again{via}", own["repack"][n])]
    for label, ps in lines:
        rss = "(the client's: " if "daemon" in label else ""
        rows.append(f"| {label} | {best(ps):.3f} s ({mbps(nb, best(ps)):.0f} MB/s) | {median(ps):.3f} s | "
                    f"{rss}{max(p.rss for p in ps) / 2**20:.0f} MiB{')' if rss else ''} |")
    rows += ["", "| start of app1 (`python3 -c print('hello')`) | p50 | min | max |", "|---|---|---|---|"]
    for label, ps in own["start"].items():
        xs = sorted(p.seconds for p in ps)
        rows.append(f"| {label} | {statistics.median(xs):.3f} s | {xs[0]:.3f} s | {xs[-1]:.3f} s |")
    return "\n".join(rows)


def plots(tars: dict[str, ToolRun], roots: dict[str, ToolRun], inp: dict[str, Any], images: list[str],
          prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = sum(inp["tar_bytes"][i] for i in images)
    names = [n for n in tars if n != "skopeo copy"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups = [("ingest, call per image (tars)", lambda r: mbps(nb, sum(p.seconds for p in r.per_image))),
              ("ingest, one call (tars)", lambda r: mbps(nb, r.all_in_one.seconds) if r.all_in_one else 0),
              ("restore app1 (tars)", lambda r: mbps(inp["tar_bytes"][START_IMAGE], best(r.restore)))]
    width = 0.8 / len(groups)
    for gi, (label, f) in enumerate(groups):
        ax.bar([i + gi * width for i in range(len(names))], [f(tars[n]) for n in names], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("MB/s (uncompressed)")
    ax.set_title(f"Throughput, one process per call ({len(images)} corpus images, {nb / 1e6:.0f} MB)")
    ax.legend()
    paths = [prefix.with_name(prefix.name + "-throughput.png")]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    for ax, (title, res) in zip(axes, (("layer tars", tars), ("rootfs", roots))):
        for n, r in res.items():
            if r.stored_after and n != "zstd -3 -T2":
                ax.plot(range(1, len(images) + 1), [b / 1e6 for b in r.stored_after], marker="o", label=n)
        ax.set_xticks(range(1, len(images) + 1), [f"+{i}" for i in images], rotation=20)
        ax.set_ylabel("stored MB")
        ax.set_title(f"Stored bytes after each image ({title})")
        ax.legend()
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "-stored.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    vers = {}
    for tool, cmd in (("borg", ["borg", "--version"]), ("restic", ["restic", "version"]),
                      ("casync", ["casync", "--version"]), ("zstd", ["zstd", "--version"]),
                      ("skopeo", ["skopeo", "--version"]), ("runc", ["runc", "--version"])):
        try:
            vers[tool] = subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            vers[tool] = "missing"
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, Python "
            f"{platform.python_version()}; convstore {convstore.__version__} at {rev}; "
            + "; ".join(f"{k}: {v}" for k, v in vers.items()))


COMMANDS = """Commands, one process each (`REPO`, `STORE` fresh per tool; `DIR` one image's layer tars or rootfs;
`convstore` is the installed command, as a user runs it; scripts/setup.sh installs it editable in setuptools'
strict mode, which starts as a wheel install does, without an import hook):

- convstore: `convstore --store STORE --key file:KEY -q pack oci:LAYOUT:latest IMG:latest`, where `LAYOUT`
  holds the layer tars themselves as uncompressed layers (hard links); all in one call: one process packing
  the five through the API; restore `unpack --compress none IMG oci:OUT:latest` and `unpack --rootfs IMG OUT`
- borg: `borg init -e repokey-blake2 REPO` (untimed), `borg create REPO::IMG IMG` (default compression lz4),
  restore `borg extract REPO::IMG`
- restic: `restic init` (untimed), `restic backup -q --tag IMG --host bench IMG` (default compression auto),
  restore `restic restore -q latest --tag IMG --target OUT`
- casync: `casync make --store=STORE IMG.caidx DIR` (defaults: zstd, 64 KiB average chunks),
  restore `casync extract --store=STORE IMG.caidx OUT`
- zstd: `zstd -3 -T2 -q -c DIR/*.tar > IMG.zst`; restore `zstd -d -T2 -c IMG.zst > OUT`
- skopeo: `skopeo copy oci:CORPUS/IMG:latest oci:REPO:IMG` (the original gzip image)"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=IMAGES)
    ap.add_argument("--rounds", type=int, default=3, help="restore and re-pack rounds (best is reported)")
    ap.add_argument("--work", default="/var/tmp/convstore-compare", help="scratch space (about 5 GB)")
    ap.add_argument("--label", default="after", help="names the docs block and plots (e.g. before, after)")
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("compare: run as root (convstore run and mount need FUSE and runc)")
    missing = [t for t in ("borg", "restic", "casync", "zstd", "skopeo", "runc") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"compare: missing {', '.join(missing)}: run `bash scripts/setup.sh --bench`")
    ensure_corpus()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    inp = prepare(work / "inputs", a.images)
    t0 = time.time()
    os.environ["CONVSTORE_DAEMON"] = "0"  # untagged commands (set-up) never use a daemon the user runs
    daemon = Daemon(work)
    try:
        DAEMON_ENV.update({"convstore": daemon.env(False), DAEMON: daemon.env(True)})
        tars, tools = compare(work, inp, a.images, False, a.rounds)
        roots, _ = compare(work, inp, a.images, True, a.rounds, {n: tools[n] for n in OURS})
        own = convstore_rows(work, inp, a.rounds)
        version = version_seconds()
        status = daemon.status()
    finally:
        daemon.stop()
    if not status["served"]:
        raise SystemExit("compare: the daemon served no command: its rows would be convstore's own")
    nb = sum(inp["tar_bytes"][i] for i in a.images)
    nr = sum(tree_bytes(inp["rootfs"][i]) for i in a.images)
    tgt_table, _ = targets(tars, roots, own, inp, a.images, version, int(status["command_max_rss_kib"]) * 1024)
    img_dir = DOCS.parent / "img" if a.write_docs else work
    img_dir.mkdir(exist_ok=True)
    pngs = plots(tars, roots, inp, a.images, img_dir / f"compare-{a.label}")
    text = "\n\n".join([
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}, {time.time() - t0:.0f} s, "
        f"`python -m benchmarks.compare --label {a.label}`. Machine: {machine()}.",
        f"**Layer tars** ({len(a.images)} images, {nb / 1e6:.1f} MB; restore: app1, "
        f"{inp['tar_bytes'][START_IMAGE] / 1e6:.1f} MB, best of {a.rounds}):",
        pass_table(tars, nb, inp["tar_bytes"][START_IMAGE], "restore app1"),
        f"**Rootfs directories** ({nr / 1e6:.1f} MB of files; convstore restores from its layer-tar store):",
        pass_table(roots, nr, tree_bytes(inp["rootfs"][START_IMAGE]), "restore app1 to a directory"),
        "Stored MB after each image, one call per image (layer tars):",
        stored_table(tars, a.images),
        "Stored MB after each image (rootfs):",
        stored_table(roots, a.images),
        "convstore's own rows (same run):",
        own_table(own),
        "Targets (issue 13), from this run:",
        tgt_table,
        "Plots: " + ", ".join(f"![{p.stem}](img/{p.name})" if a.write_docs else str(p) for p in pngs),
        COMMANDS,
    ])
    print(text)
    if a.write_docs:
        write_block(f"compare-{a.label}", f"Against the peers ({a.label})", text)


if __name__ == "__main__":
    main()
