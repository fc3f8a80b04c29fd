"""Attacks on the EROFS writer (convstore.reader.erofs) with a malicious image: a layer's tar is untrusted
input (an image from a public registry), packed into an authenticated manifest as it is.  What the kernel's
EROFS makes of a name must be what the tree (and the FUSE path, and the tar) says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from imagebuilder import Entry, make_tar, write_oci
from test_erofs import mnt, write_image  # noqa: F401 - the fixture

from convstore.errors import CorruptLayer, ErofsUnsupported
from convstore.reader import ImageFS, kfuse
from convstore.merge import layer_tree
from convstore.reader.erofs import build
from convstore.reader.erofsmount import mount_image

pytestmark = pytest.mark.skipif(not kfuse.available() or "erofs" not in Path("/proc/filesystems").read_text(),
                                reason="mounting EROFS needs root and a kernel with EROFS")


def test_a_name_with_a_nul_is_not_served_as_another_name(tmp_path, store, mnt):  # noqa: F811
    """A PAX path ``etc/passwd\\0x`` (NUL is legal in a PAX record): the kernel's EROFS compares names up to a
    NUL, so its lookup of ``etc/passwd`` could answer with that file.  The merge refuses the layer
    (CorruptLayer, for every reader), and the writer refuses such a name built by hand (below)."""
    entries = [Entry("etc", "dir"), Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")]
    # names sorting around "passwd" so that a binary search meets the NUL name first
    entries += [Entry(f"etc/x{i}", data=b"evil\n", pax={"path": f"etc/passwd\0{i:02d}"}) for i in range(40)]
    write_oci(str(tmp_path / "src"), [make_tar(entries)])
    store.pack(f"oci:{tmp_path / 'src'}", "nul:1")
    with pytest.raises(CorruptLayer, match="NUL"):  # the merged tree (mount, run)
        ImageFS.from_store(store, "nul:1")
    _, manifest = store.open_image("nul:1")
    with pytest.raises(CorruptLayer, match="NUL"):  # one layer's tree (the layer store, its EROFS option)
        layer_tree(manifest.layers[0].entries, 0)


def test_names_the_kernel_cannot_hold_are_refused():
    """Names built into a tree by hand (a caller other than the merge): '/', NUL, '.', '..' -> ErofsUnsupported."""
    from convstore.merge import Node
    import stat

    for bad in ("a/b", "a\0b", ".", ".."):
        root = Node(1, stat.S_IFDIR | 0o755, 0, 0, 0, 0, children={})
        root.children[bad] = Node(2, stat.S_IFREG | 0o644, 0, 0, 0, 0)
        with pytest.raises(ErofsUnsupported):
            build(root)



NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="another uid: needs root")
def test_another_user_cannot_swap_the_folder_diff_points_into(tmp_path, store, monkeypatch):
    """Root's layer store runs with a TMPDIR uid 65534 can write (``su`` keeps it).  Each layer's ``diff`` is a
    symlink into the store's EROFS folder: if that folder sat in TMPDIR, 65534 could rename it away and put
    its own in its place, with a directory of its own for the layer, and the engine following ``diff`` would
    run a container on 65534's files.  The folder goes where no other user can rename it."""
    import base64
    import subprocess

    from convstore.engines import layerstore

    import shutil
    import tempfile

    evil_tmp = Path(tempfile.mkdtemp(prefix="convstore-attack-"))  # pytest's tmp_path: under a 0700 folder
    request_cleanup = lambda: shutil.rmtree(evil_tmp, ignore_errors=True)  # noqa: E731
    os.chmod(evil_tmp, 0o755)
    os.chown(evil_tmp, NOBODY, NOBODY)
    write_oci(str(tmp_path / "src"), [make_tar([Entry("bin", "dir"), Entry("bin/sh", data=b"the image's sh")])])
    store.pack(f"oci:{tmp_path / 'src'}", "sh:1")
    _, manifest = store.open_image("sh:1")
    digest = manifest.layers[0].digest
    monkeypatch.setenv("TMPDIR", str(evil_tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv(layerstore.EROFS_ENV, "1")
    ls = layerstore.LayerStore(store)
    try:
        ls.scan()
        ops = layerstore.LayerStoreOperations(ls)
        diff = f"/{base64.b64encode(b'any/ref:1').decode()}/{digest}/diff"
        target = ops.readlink(diff)
        assert Path(target, "bin", "sh").read_bytes() == b"the image's sh"
        swap = (f"mv {ls.erofs_dir} {ls.erofs_dir}.old && mkdir -p {target}/bin && "
                f"echo 'not the image' > {target}/bin/sh")
        p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c", swap],
                           capture_output=True, text=True)
        assert Path(ops.readlink(diff), "bin", "sh").read_bytes() == b"the image's sh", p.stderr
        assert p.returncode != 0
    finally:
        ls.close()
        request_cleanup()
