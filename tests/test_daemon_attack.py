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
