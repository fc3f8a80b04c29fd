"""Start a container from a stored image, lazily.

The image is mounted read-only over FUSE; an OCI runtime bundle is generated
from the image config (``runc spec``, then Entrypoint/Cmd, Env, WorkingDir,
User, read-only root, no terminal) and run with ``runc``.  Where runc is
missing or cannot start, the process runs in new mount/UTS/IPC namespaces
under ``chroot`` instead.  The mount is removed afterwards, unless the run
keeps it (``keep``, ``--keep-mount``): then a keeper process serves it for
the next runs of the image until it is idle that long (convstore.engines.keeper);
a run of an image whose kept mount is up starts on it.

A start-up profile (the chunks touched) is recorded on every run and merged
into the image's stored profile (convstore.reader.profile); a run prefetches
it in coalesced parallel batches before and while the process starts, then
fetches the rest of the image in the background while it runs
(convstore.reader.background).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConvstoreError, KeptMountUnusable
from ..hardening import private_tempdir, tool_environ
from ..oci.policy import Policy
from ..oci.policy import require as require_policy
from ..core.catalog import CatalogEntry
from ..core.repository import Repository
from ..manifest import Manifest
from . import keeper

if TYPE_CHECKING:
    from ..reader.background import BackgroundConfig
    from ..reader.imagefs import ImageFS

log = logging.getLogger(__name__)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RunError(ConvstoreError):
    """The container could not be started."""


@dataclass
class RunResult:
    exit_code: int
    runtime: str
    seconds: float
    fetch: dict[str, Any]
    fuse_read_calls: int
    fuse_read_bytes: int
    profile: str  # "recorded", "prefetched N", "none"
    warnings: list[str] = field(default_factory=list)
    site_tier: dict[str, int] | None = None  # chunks and bytes the site tier served, its failures and lies
    kept: str = ""  # "" its own mount; "new": it started a keeper; "reused": it ran on a kept mount
    keeper_runs: int = 0  # the kept mount's runs so far, this one included

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_text(fs: ImageFS | str, path: str) -> str:
    """A small text file of the image; ``fs`` a mounted root: read through it, resolved inside it."""
    if isinstance(fs, str):
        return read_in_root(fs, path)
    from ..reader.imagefs import FSError

    try:
        with fs.open(path) as f:
            return f.read().decode("utf-8", "replace")
    except (FSError, ConvstoreError):
        return ""


def read_in_root(root: str, path: str, limit: int = 1 << 20) -> str:
    """The text of regular file ``path`` of the tree at ``root`` as a process chrooted there sees it
    (symlinks, absolute or relative, and ``..`` resolved inside ``root``, never above it); "" if absent."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    top = os.open(root, flags | os.O_DIRECTORY)
    stack = [top]
    todo = [p for p in path.split("/") if p not in ("", ".")]
    hops = 0
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                fd = os.open(name, flags, dir_fd=stack[-1])
            except OSError:
                return ""
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=stack[-1])
                os.close(fd)
                hops += 1
                if hops > 40:
                    return ""
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
            elif todo:
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    return ""
                stack.append(fd)
            else:
                os.close(fd)
                if not stat.S_ISREG(st.st_mode):
                    return ""
                try:
                    rfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=stack[-1])
                except OSError:
                    return ""
                try:
                    return os.read(rfd, limit).decode("utf-8", "replace")
                finally:
                    os.close(rfd)
        return ""
    finally:
        for fd in stack:
            os.close(fd)


def resolve_user(fs: ImageFS | str, user: str) -> tuple[int, int, list[int]]:
    """uid, gid, extra gids for an image config ``User`` (name, uid, uid:gid, name:group)."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = [line.split(":") for line in _read_text(fs, "/etc/passwd").splitlines() if line.count(":") >= 6]
    groups = [line.split(":") for line in _read_text(fs, "/etc/group").splitlines() if line.count(":") >= 3]
    uid = gid = None
    if name.isdigit():
        uid = int(name)
        for p in passwd:
            if p[2] == name:
                gid = int(p[3])
    else:
        for p in passwd:
            if p[0] == name:
                uid, gid = int(p[2]), int(p[3])
                break
        if uid is None:
            raise RunError(f"user {name!r} is not in the image's /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = [g for g in groups if g[0] == group]
            if not found:
                raise RunError(f"group {group!r} is not in the image's /etc/group")
            gid = int(found[0][2])
    uname = name if not name.isdigit() else next((p[0] for p in passwd if p[2] == name), "")
    extra = sorted({int(g[2]) for g in groups if uname and uname in g[3].split(",")})
    return uid, gid if gid is not None else 0, extra


def process_spec(fs: ImageFS | str, config: dict[str, Any], command: list[str] | None) -> dict[str, Any]:
    c = config.get("config") or {}
    entry = c.get("Entrypoint") or []
    if command:
        args = list(command)
    else:
        args = list(entry) + list(c.get("Cmd") or [])
    if not args:
        raise RunError("the image has no Entrypoint or Cmd; give a command after --")
    env = list(c.get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    uid, gid, extra = resolve_user(fs, c.get("User") or "")
    return {"args": args, "env": env, "cwd": c.get("WorkingDir") or "/", "uid": uid, "gid": gid,
            "additionalGids": extra}


def _runc_template(runc: str, bundle: str) -> dict[str, Any]:
    """runc's default spec (``runc spec``), kept in the user cache dir per
    runc binary: a subprocess less on every start."""
    import platformdirs

    st = os.stat(runc)
    key = hashlib.sha256(f"{os.path.realpath(runc)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(platformdirs.user_cache_dir("convstore"), f"runc-spec-{key}.json")
    try:
        with open(cache) as f:
            spec: dict[str, Any] = json.load(f)
        if isinstance(spec, dict) and isinstance(spec.get("process"), dict) and isinstance(spec.get("mounts"), list):
            return spec
    except (OSError, ValueError):
        pass
    subprocess.run([runc, "spec", "--bundle", bundle], check=True, capture_output=True, env=tool_environ())
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        raw = f.read()
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, cache)
    except OSError:
        pass  # no cache: the next start asks runc again
    spec = json.loads(raw)
    return spec


def _runc_bundle(bundle: str, rootfs: str, proc: dict[str, Any], runc: str, hostname: str) -> None:
    spec = _runc_template(runc, bundle)
    path = os.path.join(bundle, "config.json")
    spec["root"] = {"path": rootfs, "readonly": True}
    spec["hostname"] = hostname
    p = spec["process"]
    p["terminal"] = False
    p["args"] = proc["args"]
    p["env"] = proc["env"]
    p["cwd"] = proc["cwd"]
    p["user"] = {"uid": proc["uid"], "gid": proc["gid"]}
    if proc["additionalGids"]:
        p["user"]["additionalGids"] = proc["additionalGids"]
    # a writable /tmp, as most images expect one
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777"]})
    with open(path, "w") as f:
        json.dump(spec, f)


MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def _chroot_preexec(root: str, proc: dict[str, Any]) -> Any:
    """The fallback runtime, run in the child before exec: private mount,
    UTS and IPC namespaces; /dev (host null, zero, random... bound in),
    /proc and a /tmp over the read-only image; then chroot and drop to the
    image's user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        if libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}")

    def setup() -> None:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        mount("none", "/", None, MS_REC | MS_PRIVATE)
        dev = os.path.join(root, "dev")
        if os.path.isdir(dev):
            mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755")
            for d in _DEVICES:
                if os.path.exists(f"/dev/{d}"):
                    open(os.path.join(dev, d), "w").close()
                    mount(f"/dev/{d}", os.path.join(dev, d), None, MS_BIND)
        if os.path.isdir(os.path.join(root, "proc")):
            mount("proc", os.path.join(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if os.path.isdir(os.path.join(root, "tmp")):
            mount("tmpfs", os.path.join(root, "tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        os.chroot(root)
        os.chdir(proc["cwd"])
        os.setgroups(proc["additionalGids"])
        os.setgid(proc["gid"])
        os.setuid(proc["uid"])

    return setup


def _run_runc(runc: str, bundle: str, cid: str, stdout: Any, stderr: Any) -> tuple[int, bool, str]:
    """Run the bundle, streaming the container's stderr as it comes while
    watching for runc's own start-up failure (then the caller falls back)."""
    p = subprocess.Popen([runc, "run", "--bundle", bundle, cid], stdin=subprocess.DEVNULL, stdout=stdout,
                         stderr=subprocess.PIPE, env=tool_environ())
    assert p.stderr is not None
    sink = stderr if stderr is not None else sys.stderr.buffer
    failed, msg = False, ""
    for line in iter(p.stderr.readline, b""):
        text = line.decode("utf-8", "replace")
        if "level=error" in text and ("runc run failed" in text or "runc create failed" in text):
            failed, msg = True, text.strip()[-300:]
            continue
        if hasattr(sink, "write"):
            sink.write(line)
            sink.flush()
    return p.wait(), failed, msg


def run_image(store: Repository, ref: str, command: list[str] | None = None, *, runtime: str = "auto",
              prefetch: bool = True, record: bool | None = None, fs: ImageFS | None = None,
              stdout: Any = None, stderr: Any = None, policy: Policy | None = None,
              background: BackgroundConfig | None = None, keep: float | None = None) -> RunResult:
    """Run ``ref``'s Entrypoint/Cmd (or ``command``) from a lazy FUSE mount.

    ``runtime``: ``runc``, ``chroot`` or ``auto`` (runc if it works).
    ``record``: record what this start reads into the image's start-up profile (default: yes).
    ``background``: fetch the rest of the image while it runs (default: on; see convstore.reader.background).
    ``policy``: the node's trust policy; an image it refuses does not start.
    ``keep``: seconds the image's mount stays up after the run for the next runs, on a kept mount
    (convstore.engines.keeper): > 0 uses the image's kept mount or starts one; None uses one that is up,
    else mounts the image for this run only; 0 always mounts it for this run only.
    """
    t0 = time.perf_counter()
    if os.geteuid() != 0:
        raise RunError("convstore run needs root (FUSE allow_other, namespaces, runc)")
    key, head, store_id = None, False, store.manifests.ident.id
    if fs is not None:
        entry = fs.entry if fs.entry is not None else store.catalog.entry(ref)
        manifest = fs.manifest
    else:
        entry = store.open_entry(ref)  # resolved in this store, whatever a keeper says
        # a run that may start on a kept mount needs only the manifest's head (no file table)
        head = bool(keep) or keep is None and keeper.present(store_id, str(entry.manifest_digest))
        if head:
            key = store.manifests.keep_key(entry)  # this run's own key provider unwraps the image, or it fails here
            cached = keeper.load_head(key, store_id, entry)
            manifest = cached or store.manifests.load(entry, head_only=True)
            if cached is None:
                keeper.save_head(key, store_id, entry, manifest)
        else:
            manifest = store.manifests.load(entry)
    require_policy(policy, manifest, ref)
    config = json.loads(manifest.config_bytes)
    if fs is None:
        lease, kept = (None, "") if key is None else _kept_mount(store, entry, key, keep, prefetch, background)
        if lease is not None:
            with lease:
                proc = process_spec(lease.root, config, command)
                code, used = _execute(lease.root, proc, runtime, entry, stdout, stderr)
            return RunResult(code, used, time.perf_counter() - t0, {}, 0, 0,
                             "kept mount: recorded by its keeper", [], None, kept, lease.runs)
        if head:
            manifest = store.manifests.load(entry)  # the same sealed manifest, whole
        from ..reader.imagefs import PREFETCH_ON_OPEN, ImageFS

        fs = ImageFS.from_manifest(store, entry, manifest, prefetch_on_open=PREFETCH_ON_OPEN)
    from ..reader.background import BackgroundConfig, start_fetching
    from ..reader.profile import save_start

    profile_state = "none"
    profile = store.manifests.load_profile(entry) if prefetch else None
    if profile:
        profile_state = f"prefetched {len(profile)}"
    # the profile queued from a thread: starting the fetcher's workers costs the main thread tens of ms,
    # which overlap the mount and runc's start this way (a read that comes first shares the fetch)
    start_fetching(fs.fetcher, profile, background or BackgroundConfig.from_env(), str(entry.ref), threaded=True)
    if record is None or record:
        fs.fetcher.start_recording()
    proc = process_spec(fs, config, command)
    work = private_tempdir("convstore-run-")
    rootfs = os.path.join(work, "rootfs")
    os.mkdir(rootfs)
    from ..reader.fuse import BackgroundMount

    try:
        with BackgroundMount(fs, rootfs) as mount:
            code, used = _execute(rootfs, proc, runtime, entry, stdout, stderr, work)
            read_calls, read_bytes = mount.ops.read_calls, mount.ops.read_bytes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recorded = fs.fetcher.stop_recording()
    merged = save_start(store, entry, recorded)
    if merged is not None:
        profile_state = f"recorded {len(recorded)} (profile {merged})" if profile else f"recorded {len(recorded)}"
    from ..stores.sitetier import tier_stats

    return RunResult(code, used, time.perf_counter() - t0, fs.fetcher.refresh_requests().to_json(), read_calls,
                     read_bytes, profile_state, fs.warnings[:20], tier_stats(store.chunk_store))


def _kept_mount(store: Repository, entry: CatalogEntry, key: bytes, keep: float | None, prefetch: bool,
                background: BackgroundConfig | None) -> tuple[keeper.Lease | None, str]:
    """A lease on the image's kept mount (``"reused"``, or ``"new"``: this run started its keeper, as
    ``keep`` > 0 asks), else (None, "") and the run mounts the image itself.  ``key``: the image's
    keep_key."""
    store_id, digest = store.manifests.ident.id, str(entry.manifest_digest)
    if keep == 0 or keep is None and not keeper.present(store_id, digest):
        return None, ""
    try:
        return keeper.attach(key, store_id, str(entry.ref), digest), "reused"
    except KeptMountUnusable as e:
        if keep is None:
            log.info("%s: %s; mounting it", entry.ref, e)
            return None, ""
        log.debug("%s: %s", entry.ref, e)
    try:
        manifest = store.manifests.load(entry)  # the keeper serves its files: the whole manifest
        keeper.spawn(store, entry, manifest, key, float(keep or 0), prefetch=prefetch, background=background)
        return keeper.attach(key, store_id, str(entry.ref), digest), "new"
    except KeptMountUnusable as e:
        log.info("%s: no kept mount (%s); mounting it for this run only", entry.ref, e)
        return None, ""


def _execute(rootfs: str, proc: dict[str, Any], runtime: str, entry: CatalogEntry, stdout: Any, stderr: Any,
             work: str | None = None) -> tuple[int, str]:
    """Run ``proc`` on the image mounted at ``rootfs``: runc (``auto``, ``runc``), else the chroot
    fallback; (exit status, runtime used)."""
    runc = shutil.which("runc")
    used, code = "chroot", None
    if runtime in ("auto", "runc") and runc:
        own = work is None
        bdir = private_tempdir("convstore-run-") if work is None else work
        try:
            bundle = os.path.join(bdir, "bundle")
            os.mkdir(bundle)
            _runc_bundle(bundle, rootfs, proc, runc, entry.ref.name.replace("/", "-")[:63])
            cid = f"convstore-{os.getpid()}-{int(time.time() * 1000) % 100000}"
            rc, runc_failed, msg = _run_runc(runc, bundle, cid, stdout, stderr)
        finally:
            if own:
                shutil.rmtree(bdir, ignore_errors=True)
        if runc_failed:  # a container that ran is deleted by `runc run` itself
            subprocess.run([runc, "delete", "--force", cid], capture_output=True, env=tool_environ())
        if runc_failed and "exec:" in msg:  # the command itself cannot be started
            why = msg.split("exec:", 1)[1].replace('\\"', '"').strip().rstrip('"')
            raise RunError(f"cannot start {proc['args'][0]!r} in the image: {why}")
        if runc_failed and runtime == "auto":
            log.warning("runc could not start the container (%s); falling back to chroot", msg)
        elif runc_failed:
            raise RunError(f"runc could not start the container: {msg}")
        else:
            used, code = "runc", rc
    elif runtime == "runc":
        raise RunError("runc is not installed")
    if code is None:
        env = dict(e.split("=", 1) for e in proc["env"] if "=" in e)
        try:
            p = subprocess.run(proc["args"], env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                               stderr=stderr, preexec_fn=_chroot_preexec(rootfs, proc))
        except (OSError, subprocess.SubprocessError) as e:
            raise RunError(f"cannot start {proc['args'][0]!r} in the image: {e}") from None
        code = p.returncode
    return code, used
