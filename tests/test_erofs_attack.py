"""Attacks on the EROFS writer (convstore.reader.erofs) with a malicious image: a layer's tar is untrusted
input (an image from a public registry), packed into an authenticated manifest as it is.  What the kernel's
EROFS makes of a name must be what the tree (and the FUSE path, and the tar) says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from imagebuilder import Entry, make_tar, write_oci
from test_erofs import mnt, write_image  # noqa: F401 - the fixture

from convstore.errors import ErofsUnsupported
from convstore.reader import ImageFS, kfuse
from convstore.reader.erofs import build
from convstore.reader.erofsmount import mount_image

pytestmark = pytest.mark.skipif(not kfuse.available() or "erofs" not in Path("/proc/filesystems").read_text(),
                                reason="mounting EROFS needs root and a kernel with EROFS")


def test_a_name_with_a_nul_is_not_served_as_another_name(tmp_path, store, mnt):  # noqa: F811
    """A PAX path ``etc/passwd\\0x`` (NUL is legal in a PAX record): the kernel's EROFS compares names up to a
    NUL, so its lookup of ``etc/passwd`` could answer with that file.  The writer refuses the name (the layer
    stays a FUSE tree, whose lookups are exact)."""
    entries = [Entry("etc", "dir"), Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")]
    # names sorting around "passwd" so that a binary search meets the NUL name first
    entries += [Entry(f"etc/x{i}", data=b"evil\n", pax={"path": f"etc/passwd\0{i:02d}"}) for i in range(40)]
    write_oci(str(tmp_path / "src"), [make_tar(entries)])
    store.pack(f"oci:{tmp_path / 'src'}", "nul:1")
    with ImageFS.from_store(store, "nul:1") as fs:
        assert "passwd\x0000" in fs.root.children["etc"].children  # the tree keeps the name as the tar has it
        try:
            write_image(fs, tmp_path / "img.erofs")
        except ErofsUnsupported as e:
            assert "NUL" in str(e)
            return
    mount_image(str(tmp_path / "img.erofs"), str(mnt))
    assert (mnt / "etc" / "passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    assert sorted(os.listdir(mnt / "etc")).count("passwd") == 1, "two entries the kernel calls passwd"


def test_names_the_kernel_cannot_hold_are_refused():
    """Names built into a tree by hand (a caller other than the merge): '/', NUL, '.', '..' -> ErofsUnsupported."""
    from convstore.merge import Node
    import stat

    for bad in ("a/b", "a\0b", ".", ".."):
        root = Node(1, stat.S_IFDIR | 0o755, 0, 0, 0, 0, children={})
        root.children[bad] = Node(2, stat.S_IFREG | 0o644, 0, 0, 0, 0)
        with pytest.raises(ErofsUnsupported):
            build(root)

