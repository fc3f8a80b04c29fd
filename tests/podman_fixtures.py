"""A private podman configuration for tests and benchmarks (tests/test_engines.py,
benchmarks/engines.py), and its clean-up."""

from __future__ import annotations

import os
import shutil
import subprocess
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
    target = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(target)]
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    shutil.rmtree(root, ignore_errors=True)
