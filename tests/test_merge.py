"""One layer merge: ``unpack --rootfs`` and the lazy reader (ImageFS through a
real FUSE mount) give the same tree, and refuse the same images, for every
tricky and hostile synthetic image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci
from treecmp import walk

import convstore
from convstore.errors import ConvstoreError
from convstore.reader import ImageFS
from convstore.reader.fuse import BackgroundMount

TRICKY: dict[str, list[list[Entry]]] = {
    "whiteouts": [
        [Entry("a", "dir"), Entry("a/keep", data=b"1"), Entry("a/gone", data=b"2"), Entry("dirgone", "dir"),
         Entry("dirgone/f", data=b"5")],
        [Entry("a/.wh.gone"), Entry(".wh.dirgone"), Entry("a/new", data=b"3")]],
    "opaque-keeps-same-layer": [
        [Entry("o", "dir"), Entry("o/old", data=b"x")],
        [Entry("o", "dir"), Entry("o/new", data=b"y"), Entry("o/.wh..wh..opq")]],
    "merged-usr-symlinked-parent": [
        [Entry("usr", "dir"), Entry("usr/bin", "dir"), Entry("bin", "symlink", linkname="usr/bin")],
        [Entry("bin/tool", data=b"t", mode=0o755), Entry("abs", "symlink", linkname="/usr"),
         Entry("abs/lib", "dir")]],
    "hardlinks": [
        [Entry("f", data=b"body" * 1000), Entry("h1", "hardlink", linkname="f"),
         Entry("d", "dir"), Entry("d/h2", "hardlink", linkname="f")]],
    "file-replaced-by-dir-and-back": [
        [Entry("x", data=b"file"), Entry("y", "dir"), Entry("y/in", data=b"i")],
        [Entry("x", "dir", mode=0o700), Entry("x/z", data=b"z"), Entry("y", data=b"now a file")]],
    "replaced-file-content": [
        [Entry("big", data=os.urandom(300_000)), Entry("small", data=b"s")],
        [Entry("big", data=b"replaced"), Entry(".wh.small")]],
    "implicit-parents": [[Entry("p/q/r/file", data=b"deep")]],
    "rich": [],
}

HOSTILE: dict[str, list[list[Entry]]] = {
    "dotdot": [[Entry("../evil", data=b"x")]],
    "nested-dotdot": [[Entry("a/../../evil", data=b"x")]],
    "absolute": [[Entry("/etc/evil", data=b"x")]],
    "symlink-escape": [[Entry("esc", "symlink", linkname="../../.."), Entry("esc/evil", data=b"x")]],
    "nested-symlink-escape": [[Entry("d", "dir"), Entry("d/esc", "symlink", linkname="../.."),
                               Entry("d/esc/evil", data=b"x")]],
    "hardlink-dotdot": [[Entry("h", "hardlink", linkname="../outside")]],
    "hardlink-through-symlink": [[Entry("up", "symlink", linkname=".."),
                                  Entry("h", "hardlink", linkname="up/outside")]],
    "whiteout-of-dotdot": [[Entry("a", "dir")], [Entry("a/.wh..."), ]],
    "whiteout-in-escaping-dir": [[Entry("esc", "symlink", linkname="../..")], [Entry("esc/.wh.etc")]],
    "hardlink-to-missing": [[Entry("h", "hardlink", linkname="nothing")]],
    "hardlink-to-dir": [[Entry("d", "dir"), Entry("h", "hardlink", linkname="d")]],
    "parent-is-a-file": [[Entry("f", data=b"x"), Entry("f/child", data=b"y")]],
    # NUL is legal in a PAX path; every kernel interface would read "etc/passwd\0x" as etc/passwd
    "nul-in-a-name": [[Entry("etc", "dir"), Entry("etc/passwd", data=b"root\n"),
                       Entry("etc/x", data=b"evil\n", pax={"path": "etc/passwd\0x"})]],
    "symlink-loop-parent": [[Entry("l1", "symlink", linkname="l2"), Entry("l2", "symlink", linkname="l1"),
                             Entry("l1/x", data=b"x")]],
}


def _pack(tmp_path: Path, store: convstore.Store, name: str, layers: list[list[Entry]]) -> str:
    tars = [make_tar(entries) for entries in layers] or [rich_layer()]
    write_oci(str(tmp_path / name), tars)
    store.pack(f"oci:{tmp_path / name}", f"{name}:1")
    return f"{name}:1"


def _rootfs(store: convstore.Store, ref: str, dest: Path) -> dict | str:
    try:
        store.unpack_rootfs(ref, str(dest))
    except ConvstoreError as e:
        assert not dest.exists()
        return type(e).__name__
    return walk(dest)


def _lazy(store: convstore.Store, ref: str, mnt: Path) -> dict | str:
    try:
        fs = ImageFS.from_store(store, ref)
    except ConvstoreError as e:
        return type(e).__name__
    mnt.mkdir()
    with fs, BackgroundMount(fs, str(mnt)):
        return walk(mnt)


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_same_tree_from_rootfs_and_lazy_reader(tmp_path: Path, store: convstore.Store, name: str) -> None:
    ref = _pack(tmp_path, store, name, TRICKY[name])
    a = _rootfs(store, ref, tmp_path / "rootfs")
    b = _lazy(store, ref, tmp_path / "mnt")
    assert isinstance(a, dict) and len(a) > 0
    if os.geteuid() != 0:  # a non-root unpack cannot chown: compare the rest
        a = {k: v[:2] + v[4:] for k, v in a.items()}
        b = {k: v[:2] + v[4:] for k, v in b.items()}  # type: ignore[union-attr]
    assert a == b


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_same_refusal_from_rootfs_and_lazy_reader(tmp_path: Path, store: convstore.Store, cli_env: dict[str, str],
                                                  name: str) -> None:
    (tmp_path / "outside").write_bytes(b"secret")
    ref = _pack(tmp_path, store, name, HOSTILE[name])
    a = _rootfs(store, ref, tmp_path / "deep" / "rootfs")
    b = _lazy(store, ref, tmp_path / "mnt")
    assert a == b and a in ("UnsafePathError", "CorruptLayer"), (a, b)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    # every lazy path of the CLI refuses it the same way, in one line: ls, cat, mount, run
    with pytest.raises(ConvstoreError) as refusal:
        ImageFS.from_store(store, ref)
    why = str(refusal.value)
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    try:
        for args in (["ls", ref, "/"], ["cat", ref, "/x"], ["mount", "--background", ref, str(mnt2)],
                     ["run", ref, "--", "/bin/true"]):
            p = run_cli(cli_env, *args, check=False)
            assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)
            assert p.stderr.strip() == f"convstore: error: {why}", (args, p.stderr)  # the library's refusal
    finally:
        if os.path.ismount(mnt2):
            subprocess.run(["fusermount3", "-u", str(mnt2)], capture_output=True)
    assert not os.path.ismount(mnt2)


@pytest.mark.parametrize("path", ["./usr/bin/sh", "./", ".", "./.", "././etc", "./a//b", "./a/./b/", "etc/"])
def test_entry_components_dot_slash_fast_path(path: str) -> None:
    """``./``-prefixed entries (most layers built with ``tar -C dir .``) take a fast split in the merge's
    hot loop: it must give exactly what the general splitter gives."""
    from convstore.merge import entry_components
    from convstore.paths import components

    assert entry_components(path) == components(path)


@pytest.mark.parametrize("path", ["./..", "./../etc/passwd", "./a/../../b", "/./etc", "./a/.."])
def test_entry_components_dot_slash_still_refuses_escapes(path: str) -> None:
    from convstore.errors import UnsafePathError
    from convstore.merge import entry_components

    with pytest.raises(UnsafePathError):
        entry_components(path)
