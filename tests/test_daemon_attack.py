"""Attacks on the daemon's loaded-code watch (server._CodeWatch): code that changes on disk without an inotify
event on any watched file or folder must still make the daemon stale (it would serve the old code)."""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest

from convstore.daemon import server as srv


def _package(where: Path, name: str, value: str) -> None:
    pkg = where / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(f"X = {value}\n")


def _watch(monkeypatch, path: Path, name: str) -> srv._CodeWatch:
    monkeypatch.syspath_prepend(str(path))
    importlib.import_module(f"{name}.sub.mod")
    watch = srv._CodeWatch()
    assert watch.fd >= 0, "no inotify watch"
    assert not watch.changed()
    return watch


def test_a_folder_two_levels_up_swapped_is_seen(tmp_path, monkeypatch):
    """A venv swapped (its top folder renamed away, a new one renamed in): no event on any watched inode."""
    site = tmp_path / "venv" / "lib"
    _package(site, "attack_pkg_venv", "1")
    watch = _watch(monkeypatch, site, "attack_pkg_venv")
    try:
        _package(tmp_path / "venv-new" / "lib", "attack_pkg_venv", "22222")
        os.rename(tmp_path / "venv", tmp_path / "venv-old")
        os.rename(tmp_path / "venv-new", tmp_path / "venv")
        assert watch.changed() and watch.changed()
    finally:
        watch.close()


def test_a_release_symlink_swapped_is_seen(tmp_path, monkeypatch):
    """``ln -sfn release-2 current`` (a symlink renamed over the one on sys.path)."""
    _package(tmp_path / "release-1", "attack_pkg_rel", "1")
    _package(tmp_path / "release-2", "attack_pkg_rel", "22222")
    os.symlink("release-1", tmp_path / "current")
    watch = _watch(monkeypatch, tmp_path / "current", "attack_pkg_rel")
    try:
        os.symlink("release-2", tmp_path / "current.new")
        os.replace(tmp_path / "current.new", tmp_path / "current")
        assert watch.changed() and watch.changed()
    finally:
        watch.close()


def test_an_unrelated_entry_above_is_not_a_change(tmp_path, monkeypatch):
    """Events in a folder above that touch no watched path do not count (the stat would say no anyway)."""
    site = tmp_path / "venv" / "lib"
    _package(site, "attack_pkg_quiet", "1")
    watch = _watch(monkeypatch, site, "attack_pkg_quiet")
    try:
        (tmp_path / "notes.txt").write_text("x")
        (tmp_path / "venv" / "other").mkdir()
        assert watch._reported() is False
        assert not watch.changed()
    finally:
        watch.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")
def test_a_mount_over_a_package_folder_is_seen(tmp_path, monkeypatch):
    """A bind mount over a loaded package's folder: the watches keep the covered inodes, the paths name others."""
    site = tmp_path / "site"
    _package(site, "attack_pkg_mnt", "1")
    _package(tmp_path / "other", "attack_pkg_mnt", "22222")
    watch = _watch(monkeypatch, site, "attack_pkg_mnt")
    target = site / "attack_pkg_mnt" / "sub"
    subprocess.run(["mount", "--bind", str(tmp_path / "other" / "attack_pkg_mnt" / "sub"), str(target)], check=True)
    try:
        assert watch.changed() and watch.changed()
        assert watch.fd < 0  # blind watches: every later check stats
    finally:
        subprocess.run(["umount", str(target)], check=True)
        watch.close()


def _passthrough(backing: str):
    """A read-only FUSE view of ``backing`` (mfusepy): a change made in ``backing`` itself, as a file server's
    own or another host's, reaches no inotify watch on the mount."""
    import errno

    import mfusepy

    class Passthrough(mfusepy.Operations):
        def _real(self, path: str) -> str:
            return backing + path

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._real(path))
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno or errno.EIO) from None
            return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime",
                                                "st_mtime", "st_ctime")}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._real(path))]

        def read(self, path, size, offset, fh):
            with open(self._real(path), "rb") as f:
                f.seek(offset)
                return f.read(size)

    return Passthrough()


def test_a_module_on_a_fuse_or_network_filesystem_is_statted(tmp_path, monkeypatch):
    """A file server changes a loaded module behind its FUSE (or NFS, 9p, virtiofs) mount: no inotify event
    on this host, so such a module makes the watch stat every file at every command."""
    import threading
    import time

    import mfusepy

    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    _package(backing, "attack_pkg_fuse", "1")
    mnt.mkdir()
    t = threading.Thread(target=mfusepy.FUSE, args=(_passthrough(str(backing)), str(mnt)),
                         kwargs={"foreground": True, "ro": True, "attr_timeout": 0, "entry_timeout": 0},
                         daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.ismount(mnt)
    try:
        monkeypatch.syspath_prepend(str(mnt))
        importlib.import_module("attack_pkg_fuse.sub.mod")
        watch = srv._CodeWatch()
        try:
            assert not watch.changed()
            (backing / "attack_pkg_fuse" / "sub" / "mod.py").write_text("X = 22222\n")  # the server's side
            assert watch.changed() and watch.changed()
        finally:
            watch.close()
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        t.join(10)
