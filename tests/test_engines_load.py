"""``convstore containerd-load`` through ``convstore daemon`` (issue 24: a start's ``containerd-load``
without the interpreter and the imports): a real containerd, the convstore snapshotter, a daemon of this
user.  The daemon has grpc and the containerd schema loaded before any command (what made a load a
quarter of a second slower in its own process); a load through it refuses what the client's trust
policy refuses -- in one line, nothing written to containerd -- and loads the same image as a load in
its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool, run_cli
from engine_fixtures import Containerd, start_snapshotter, unmount_below
from imagebuilder import Entry, make_tar, write_oci


def _cs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # outside the checkout: ``python -m`` there would import its convstore/, not the daemon's
    return subprocess.run([sys.executable, "-m", "convstore", *args], env=env, cwd="/", capture_output=True,
                          text=True, timeout=120)


def _images(ctd: Containerd) -> dict[str, str]:
    """containerd's images: name -> target digest."""
    rows = ctd.ctr("images", "ls").stdout.splitlines()[1:]
    return {r.split()[0]: r.split()[2] for r in rows if r.strip()}


def test_containerd_load_through_the_daemon_keeps_the_policy_and_loads_the_same_image(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    need_tool("containerd")
    need_tool("ctr")
    pytest.importorskip("grpc")
    write_oci(str(tmp_path / "img"), [make_tar([Entry("etc", "dir"), Entry("etc/hostname", data=b"box\n")]),
                                      make_tar([Entry("data.bin", data=os.urandom(100_000))])])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'img'}:latest", "two:1")
    (tmp_path / "reject.json").write_text(json.dumps({"default": [{"type": "reject"}]}))
    (tmp_path / "accept.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    folder = tmp_path / "daemon"
    folder.mkdir(mode=0o700)
    via = {**cli_env, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock")}
    own = {**cli_env, "CONVSTORE_DAEMON": "0"}
    p = _cs({k: v for k, v in via.items() if k not in ("CONVSTORE_STORE", "CONVSTORE_KEY")}, "daemon", "-b")
    assert p.returncode == 0, p.stderr
    snap_sock = tmp_path / "run" / "snapshotter.sock"
    snap = start_snapshotter(cli_env, tmp_path / "snapshots", snap_sock)
    ctd = None
    try:
        daemon = json.loads(_cs(via, "daemon", "--status").stdout)
        with open(f"/proc/{daemon['pid']}/maps") as f:  # loaded before any command: a child forks with it
            assert "cygrpc" in f.read(), "the daemon did not preload grpc"
        ctd = Containerd(tmp_path / "containerd", snap_sock)
        load = ["containerd-load", "two:1", "--address", str(ctd.socket)]
        # the client's policy refuses the image: one line, exit 1, nothing written to containerd
        r = _cs(via, *load, "--name", "example.org/two:via", "--policy", str(tmp_path / "reject.json"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "two:1" in r.stderr and "polic" in r.stderr, r.stderr
        assert _images(ctd) == {} and ctd.ctr("content", "ls", "-q").stdout.split() == []
        served = json.loads(_cs(via, "daemon", "--status").stdout)["served"]
        # accepted: through the daemon and in a process of its own, the same image
        r = _cs(via, *load, "--name", "example.org/two:via", "--policy", str(tmp_path / "accept.json"))
        assert r.returncode == 0, r.stderr
        assert json.loads(_cs(via, "daemon", "--status").stdout)["served"] > served  # it ran in the daemon
        r = _cs(own, *load, "--name", "example.org/two:own", "--policy", str(tmp_path / "accept.json"))
        assert r.returncode == 0, r.stderr
        images = _images(ctd)
        assert set(images) == {"example.org/two:via", "example.org/two:own"}, images
        assert images["example.org/two:via"] == images["example.org/two:own"]
        snaps = ctd.ctr("snapshots", "--snapshotter", "convstore", "ls").stdout
        assert snaps.count("Committed") == 2  # both layers convstore's, none unpacked by containerd
    finally:
        if ctd is not None:
            ctd.stop()
        snap.terminate()
        snap.wait(timeout=30)
        _cs(via, "daemon", "--stop")
        unmount_below(tmp_path)
