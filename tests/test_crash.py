"""SIGKILL at every store write step of pack and gc: the store stays
consistent, no incomplete image is readable, and a re-run completes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from imagebuilder import Entry, make_tar, write_oci

import convstore
from convstore.errors import ImagePending

MAX_POINTS = 300


def cli(env, *args, crash_at=0):
    e = dict(env)
    if crash_at:
        e["CONVSTORE_CRASH_AT"] = str(crash_at)
    return subprocess.run([sys.executable, "-m", "convstore.cli", "--quiet", *args], env=e, capture_output=True,
                          text=True, timeout=120)


def check_consistent(root: str, keyfile: str) -> convstore.Store:
    s = convstore.Store.open(root, f"file:{keyfile}", state_dir=root + "-state")
    report = s.verify()
    assert report.clean, report.to_json()
    for e in s.images():
        if e.complete:
            s.manifest(e.ref)  # readable
        else:
            with pytest.raises(ImagePending):
                s.manifest(e.ref)
    return s


def sweep(tmp_path, base_store: str, env, keyfile, args, after=None):
    """Kill ``convstore ARGS`` at step 1, 2, ... until it completes."""
    outcomes = []
    for n in range(1, MAX_POINTS):
        root = str(tmp_path / f"run{n}")
        shutil.copytree(base_store, root, symlinks=True)
        # each copy of the base store is a new client's (its trust state would rightly call the copy of an
        # older state of the same store a rollback)
        e = dict(env, CONVSTORE_STORE=root, CONVSTORE_STATE_DIR=root + "-state")
        p = cli(e, *args, crash_at=n)
        if p.returncode == 0:
            shutil.rmtree(root)
            break
        assert p.returncode == -9, p.stderr
        check_consistent(root, keyfile)
        assert cli(e, *args).returncode == 0  # a re-run completes
        s = check_consistent(root, keyfile)
        if after:
            after(s)
        outcomes.append(n)
        shutil.rmtree(root)
    else:
        pytest.fail("never completed")
    print(f"\n{' '.join(args[:1])}: {len(outcomes)} kill points, all consistent")
    return outcomes


@pytest.fixture
def base(tmp_path, cli_env, keyfile):
    """A store holding one image, and a source for a second one."""
    shared = [Entry(f"shared{i}", data=os.urandom(70_000)) for i in range(4)]
    write_oci(str(tmp_path / "a"), [make_tar(shared)])
    write_oci(str(tmp_path / "b"), [make_tar(shared + [Entry(f"b{i}", data=os.urandom(70_000)) for i in range(5)]),
                                    make_tar([Entry("x", data=b"y")])])
    root = str(tmp_path / "base-store")
    env = dict(cli_env, CONVSTORE_STORE=root)
    assert cli(env, "pack", f"oci:{tmp_path / 'a'}", "a:1").returncode == 0
    return root, env


def test_kill_pack_at_every_step(tmp_path, base, keyfile):
    root, env = base

    def after(s):
        assert sorted(str(e.ref) for e in s.images()) == ["a:1", "b:1"]
        s.unpack_oci("b:1", f"oci:{tmp_path / 'out'}")  # every diff_id verifies
        shutil.rmtree(tmp_path / "out")

    points = sweep(tmp_path, root, env, keyfile, ["pack", f"oci:{tmp_path / 'b'}", "b:1"], after)
    assert len(points) >= 15


def test_kill_update_at_every_step(tmp_path, base, keyfile):
    """Re-packing a tag that already has an ACTIVE version: the old version
    stays readable after any kill."""
    root, env = base
    points = sweep(tmp_path, root, env, keyfile, ["pack", f"oci:{tmp_path / 'b'}", "a:1"])
    assert len(points) >= 10


def test_kill_gc_at_every_step(tmp_path, base, keyfile):
    root, env = base
    assert cli(env, "pack", f"oci:{tmp_path / 'b'}", "b:1").returncode == 0
    assert cli(env, "rm", "a:1").returncode == 0
    write_oci(str(tmp_path / "c"), [make_tar([Entry(f"c{i}", data=os.urandom(70_000)) for i in range(4)])])
    assert cli(env, "pack", f"oci:{tmp_path / 'c'}", "c:1").returncode == 0
    assert cli(env, "rm", "c:1").returncode == 0

    def after(s):
        assert [str(e.ref) for e in s.images()] == ["b:1"]
        assert s.gc(dry_run=True).chunks_removed == 0

    points = sweep(tmp_path, root, env, keyfile, ["gc"], after)
    assert len(points) >= 5


def test_kill_rekey_at_every_step(tmp_path, base, keyfile):
    root, env = base
    assert cli(env, "pack", f"oci:{tmp_path / 'b'}", "b:1").returncode == 0
    new = tmp_path / "new" / "master.key"
    convstore.LocalKeyFile(str(new))  # creates the new key file (outside the store)
    outcomes = []
    for n in range(1, MAX_POINTS):
        run_root = str(tmp_path / f"rk{n}")
        shutil.copytree(root, run_root)
        e = dict(env, CONVSTORE_STORE=run_root, CONVSTORE_STATE_DIR=run_root + "-state")
        p = cli(e, "rekey", "--to", f"file:{new}", crash_at=n)
        if p.returncode == 0:
            break
        assert p.returncode == -9, p.stderr
        # mid-rekey, every object opens under the key it is recorded under: finish, then drop the old key
        assert cli(e, "rekey", "--to", f"file:{new}").returncode == 0
        s = check_consistent(run_root, str(new))
        assert all(x.key_id == s.key.key_id for x in s.images())
        outcomes.append(n)
        shutil.rmtree(run_root)
    print(f"\nrekey: {len(outcomes)} kill points, all consistent")
    assert len(outcomes) >= 3
