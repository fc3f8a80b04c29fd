"""Private podman and containerd set-ups for tests and benchmarks
(tests/test_engines.py, benchmarks/engines.py), and their clean-up."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def podman_config(root: Path, layer_store: Path | None) -> dict[str, str]:
    """Environment for podman with overlay storage under ``root`` (and the
    convstore layer store when given), cgroupfs, file events, no network,
    and ulimits this sandbox allows (podman's defaults raise nofile/nproc
    above what it may set: runc fails with "error setting rlimit")."""
    root.mkdir(parents=True, exist_ok=True)
    opts = f'\n[storage.options]\nadditionallayerstores = ["{layer_store}:ref"]\n' if layer_store else ""
    (root / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\n'
                                       f'runroot = "{root / "run"}"\n{opts}')
    (root / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\nnetns = "none"\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    return {"CONTAINERS_STORAGE_CONF": str(root / "storage.conf"), "CONTAINERS_CONF": str(root / "containers.conf")}


def podman(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("podman")
    if exe is None:
        raise RuntimeError("podman is not installed; scripts/setup.sh installs it")
    return subprocess.run([exe, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
                          check=check)


def remove_podman_root(env: dict[str, str], root: Path) -> None:
    """Remove every image, unmount what containers/storage left mounted under ``root``, delete it."""
    if (root / "storage.conf").exists():
        podman(env, "rmi", "-a", "-f", check=False)
    unmount_below(root)
    shutil.rmtree(root, ignore_errors=True)


class Containerd:
    """Debian's containerd with its own root, state and socket under ``root``,
    and ``convstore snapshotter`` (started by the caller's ``start_snapshotter``)
    registered as the proxy snapshotter ``convstore``."""

    def __init__(self, root: Path, snapshotter_socket: Path) -> None:
        exe = shutil.which("containerd")
        if exe is None:
            raise RuntimeError("containerd is not installed; scripts/setup.sh installs it")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "containerd.sock"
        (root / "config.toml").write_text(
            f'version = 2\nroot = "{root / "root"}"\nstate = "{root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[proxy_plugins]\n  [proxy_plugins.convstore]\n    type = "snapshot"\n'
            f'    address = "{snapshotter_socket}"\n')
        self.log = open(root / "containerd.log", "ab")
        self.proc = subprocess.Popen([exe, "--config", str(root / "config.toml")], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {(root / 'containerd.log').read_text()[-500:]}")
            time.sleep(0.05)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "-a", str(self.socket), *args], capture_output=True, text=True, timeout=300,
                              check=check)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        unmount_below(self.root)


def start_snapshotter(env: dict[str, str], root: Path, socket: Path, *args: str) -> subprocess.Popen[bytes]:
    """``convstore snapshotter ROOT --socket SOCKET ARGS`` in the background, once it listens."""
    p = subprocess.Popen([sys.executable, "-m", "convstore", "snapshotter", str(root), "--socket", str(socket), *args],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            err = p.stderr.read().decode() if p.stderr and p.poll() is not None else "timed out"
            raise AssertionError(f"the snapshotter did not start: {err}")
        time.sleep(0.05)
    return p


@contextlib.contextmanager
def snapshotter_and_containerd(env: dict[str, str], tmp_path: Path,
                               *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Containerd]]:
    """``convstore snapshotter`` (root ``tmp_path/snapshots``, ``ARGS``) and a containerd using it
    (``tmp_path/containerd``); after the ``with`` both stopped (the snapshotter ending cleanly on
    SIGTERM) and every mount below ``tmp_path`` undone."""
    snap = start_snapshotter(env, tmp_path / "snapshots", tmp_path / "run" / "snapshotter.sock", *args)
    ctd = None
    try:
        ctd = Containerd(tmp_path / "containerd", tmp_path / "run" / "snapshotter.sock")
        yield snap, ctd
    finally:
        if ctd is not None:
            ctd.stop()
        snap.terminate()
        assert snap.wait(timeout=30) == 0
        unmount_below(tmp_path)


def unmount_below(root: Path) -> None:
    target = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(target)]
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
