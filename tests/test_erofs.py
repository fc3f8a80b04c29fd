"""The EROFS writer (convstore.reader.erofs) and the kernel-served mount over FUSE (convstore.reader.erofsmount),
checked against the REAL kernel: the image is mounted by the kernel's EROFS and compared with the same tree
unpacked on disk, and erofs-utils' fsck.erofs checks it."""

from __future__ import annotations

import base64
import errno
import os
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import need_tool
from imagebuilder import Entry, make_tar, rich_layer, write_oci
from treecmp import walk

from convstore.errors import ErofsUnsupported, KernelFuseError
from convstore.merge import Node
from convstore.reader import ImageFS, kfuse
from convstore.reader.erofs import BLOCK, build
from convstore.reader.erofsmount import IMAGE_NAME, mount_erofs, mount_image

pytestmark = pytest.mark.skipif(not kfuse.available() or "erofs" not in Path("/proc/filesystems").read_text(),
                                reason="mounting EROFS and FUSE needs root and a kernel with EROFS")

CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # vfs_cap_data v2: cap_net_bind_service, effective
SPARSE = b"head" + bytes(1_000_000) + b"tail"
MULTI = os.urandom(3 * BLOCK + 123)


def every_kind() -> list[bytes]:
    """Layers with every entry kind: the first all files, the second whiteouts and an opaque directory."""
    many = [Entry(f"many/{i:04d}-" + "n" * 200, data=str(i).encode()) for i in range(300)]  # 300 x 212 B: 16 blocks
    # one block of 4064 bytes (".", "..", 15 x 255 + 20): too big to sit inline after its inode
    full = [Entry(f"full/{i:02d}" + "f" * 253, "fifo") for i in range(15)] + [Entry("full/" + "s" * 20, "fifo")]
    l0 = make_tar([
        Entry("e", "dir", mode=0o750, uid=70000, gid=80000),
        Entry("e/zero", data=b""),
        Entry("e/one-block", data=os.urandom(BLOCK)),
        Entry("e/block-and-one", data=os.urandom(BLOCK + 1)),
        Entry("e/multi", data=MULTI, uid=123456, gid=654321, pax={"mtime": "1600000000.5"}),
        Entry("e/sparse", data=SPARSE),
        Entry("e/short-link", "symlink", linkname="multi"),
        Entry("e/long-link", "symlink", linkname="/" + "/".join(["p" * 200] * 15)),  # 3015 B: inline
        Entry("e/longest-link", "symlink", linkname="/" + "/".join(["q" * 250] * 16)),  # 4031 B: a block of its own
        Entry("e/hard1", data=b"shared bytes"),
        Entry("e/hard2", "hardlink", linkname="e/hard1"),
        Entry("many/hard3", "hardlink", linkname="e/hard1"),
        Entry("e/chr", "chr", devmajor=136, devminor=300),  # minor > 255: the split encoding
        Entry("e/blk", "blk", devmajor=259, devminor=1),
        Entry("e/fifo", "fifo", mode=0o610),
        Entry("e/setuid", data=b"#!/bin/sh\n", mode=0o4755),
        Entry("e/cap", data=b"\x7fELF", mode=0o755, pax={"SCHILY.xattr.security.capability":
                                                           CAP.decode("latin-1")}),
        Entry("e/trusted", data=b"t", pax={"SCHILY.xattr.trusted.overlay.x": "y",
                                           "SCHILY.xattr.user.k": "v" * 300}),
        Entry("e/" + "L" * 255, data=b"longest name"),
        Entry("e/unicodé", data=b"u"),
        Entry("op", "dir"), Entry("op/old", data=b"before the opaque"),
    ] + many + full)
    l1 = make_tar([Entry("e/.wh.zero"), Entry("op", "dir"), Entry("op/.wh..wh..opq"),
                   Entry("op/only", data=b"after the opaque"), Entry("e/new", data=b"n")])
    return [rich_layer(), l0, l1]


@pytest.fixture
def image(tmp_path, store):
    write_oci(str(tmp_path / "src"), every_kind())
    store.pack(f"oci:{tmp_path / 'src'}", "erofs:1")
    return store


def write_image(fs: ImageFS, path: Path) -> None:
    """The EROFS image of ``fs`` as a file (the tests' own: fsck.erofs reads a file)."""
    layout = build(fs.root)
    with open(path, "wb") as f:
        for off in range(0, layout.size, 1 << 20):
            f.write(layout.read(off, 1 << 20, fs.read_node))
    assert path.stat().st_size == layout.size


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture
def mnt(tmp_path):
    d = tmp_path / "erofs"
    d.mkdir()
    yield d
    if _mounted(d):
        kfuse.umount(str(d))


def expected_nlinks(root: Path) -> dict[str, tuple[int, str]]:
    """Per path: (st_nlink, the first path, in sorted order, of its inode): hardlinks share it."""
    first: dict[int, str] = {}
    out = {}
    for p in sorted(os.path.relpath(os.path.join(dp, n), root) for dp, dns, fns in os.walk(root) for n in dns + fns):
        st = os.lstat(os.path.join(root, p))
        out[p] = (st.st_nlink, first.setdefault(st.st_ino, p))
    return out


def test_merged_image_round_trips_through_the_kernel(image, tmp_path, mnt):
    image.unpack_rootfs("erofs:1", str(tmp_path / "root"))
    with ImageFS.from_store(image, "erofs:1") as fs:
        write_image(fs, tmp_path / "img.erofs")
    fsck = subprocess.run([need_tool("fsck.erofs"), str(tmp_path / "img.erofs")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mount_image(str(tmp_path / "img.erofs"), str(mnt))
    ref, got = walk(tmp_path / "root"), walk(mnt)
    assert len(ref) > 330 and "e/longest-link" in ref and "e/sparse" in ref
    assert got == ref
    assert expected_nlinks(mnt) == expected_nlinks(tmp_path / "root")  # directory link counts, shared inodes
    assert os.readlink(mnt / "e" / "longest-link") == "/" + "/".join(["q" * 250] * 16)
    assert os.lstat(mnt / "e" / "chr").st_rdev == os.makedev(136, 300)
    assert os.lstat(mnt / "e" / "multi").st_uid == 123456
    assert os.lstat(mnt / "e" / "multi").st_mtime_ns == 1600000000_500000000
    assert os.getxattr(mnt / "e" / "cap", "security.capability") == CAP
    with pytest.raises(FileNotFoundError):
        os.lstat(mnt / "e" / "zero")  # the whiteout applied in the merge
    assert os.listdir(mnt / "op") == ["only"]


def test_layer_in_overlay_form_keeps_whiteouts(image, tmp_path, mnt):
    """One layer alone, as overlayfs's lower directory wants it: whiteouts as char 0/0, opaque xattrs."""
    entry, manifest = image.open_image("erofs:1")
    with ImageFS.from_manifest(image, entry, manifest) as merged:
        fs = ImageFS(manifest, merged.fetcher, layer=2)
        write_image(fs, tmp_path / "l2.erofs")
        fsck = subprocess.run([need_tool("fsck.erofs"), str(tmp_path / "l2.erofs")], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        mount_image(str(tmp_path / "l2.erofs"), str(mnt))
        wh = os.lstat(mnt / "e" / "zero")
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
        assert os.getxattr(mnt / "op", "trusted.overlay.opaque") == b"y"
        assert (mnt / "op" / "only").read_bytes() == b"after the opaque"
        assert sorted(os.listdir(mnt)) == sorted(fs.listdir("/"))


def test_served_lazily_from_a_fuse_file(image, tmp_path, mnt):
    """The image as one FUSE file, mounted by the kernel: the tree as unpacked, metadata without FUSE reads
    past the metadata blocks, and a second read of the tree served by the kernel alone."""
    image.unpack_rootfs("erofs:1", str(tmp_path / "root"))
    with ImageFS.from_store(image, "erofs:1") as fs:
        with mount_erofs(fs, str(mnt)) as m:
            assert os.stat(os.path.join(m.fusedir, IMAGE_NAME)).st_size == m.layout.size
            stats = {p: os.lstat(os.path.join(dp, p)) for dp, dns, fns in os.walk(mnt) for p in dns + fns}
            assert len(stats) > 330
            # the kernel's readahead of the last metadata blocks may run into the first files, no further
            assert m.file_fs.data_bytes <= 128 << 10, "listing the tree read file data"
            assert walk(mnt) == walk(tmp_path / "root")
            reads = m.ops.get(kfuse.READ, 0)
            assert reads > 0
            assert walk(mnt) == walk(tmp_path / "root")
            assert m.ops.get(kfuse.READ, 0) == reads, "a warm tree went back to FUSE"
            assert m.ops.get(kfuse.LOOKUP, 0) <= 2
        assert not _mounted(mnt)
        assert not os.path.exists(m.fusedir)


def test_the_image_file_is_roots_alone(image, tmp_path, mnt):
    """The FUSE file is the whole image decrypted: another user reaches it neither through its 0700
    directory nor by the FUSE mount's own modes (root, 0500 / 0400)."""
    with ImageFS.from_store(image, "erofs:1") as fs, mount_erofs(fs, str(mnt)) as m:
        path = os.path.join(m.fusedir, IMAGE_NAME)
        assert os.path.dirname(m.fusedir).startswith(tempfile.gettempdir())  # reachable by path but for modes
        for target in (path, m.fusedir):
            p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", target],
                               capture_output=True)
            assert p.returncode != 0 and b"Permission denied" in p.stderr, (target, p.stderr)
        assert os.stat(path).st_mode & 0o777 == 0o400 and os.stat(os.path.dirname(m.fusedir)).st_mode & 0o077 == 0


def test_unsupported_xattr_is_refused():
    root = Node(1, stat.S_IFDIR | 0o755, 0, 0, 0, 0, children={})
    assert root.children is not None
    root.children["f"] = Node(2, stat.S_IFREG | 0o644, 0, 0, 0, 0, xattrs={"system.nfs4_acl": b"x"})
    with pytest.raises(ErofsUnsupported, match="system.nfs4_acl"):
        build(root)


def test_any_range_reads_as_the_whole_image(image, tmp_path):
    """``ErofsLayout.read`` of any range (across metadata, files, their zero tails, the end) is that slice of
    the image read whole: what the FUSE file answers to the kernel's reads of any size."""
    import random

    with ImageFS.from_store(image, "erofs:1") as fs:
        write_image(fs, tmp_path / "img.erofs")
        whole = (tmp_path / "img.erofs").read_bytes()
        layout = build(fs.root)
        rng = random.Random(24)
        edges = [len(layout.meta)] + [e.block * BLOCK for e in layout.extents] + \
                [e.block * BLOCK + e.node.size for e in layout.extents]
        for _ in range(300):
            off = rng.choice([rng.randrange(layout.size), rng.choice(edges) - rng.randrange(3)])
            size = rng.choice([1, 4096, 131072, rng.randrange(1, 300_000)])
            assert layout.read(off, size, fs.read_node) == whole[off:off + size], (off, size)
        assert layout.read(layout.size - 10, 100, fs.read_node) == whole[-10:]


def test_layout_is_deterministic(image):
    with ImageFS.from_store(image, "erofs:1") as fs:
        a, b = build(fs.root), build(fs.root)
        assert a.meta == b.meta and [(e.block, e.node.ino) for e in a.extents] == \
            [(e.block, e.node.ino) for e in b.extents]
        assert all(e.block * BLOCK >= len(a.meta) for e in a.extents)
    with pytest.raises(KernelFuseError, match="cannot mount the EROFS image /nonexistent.erofs .*No such file"):
        mount_image("/nonexistent.erofs", "/nonexistent")


def test_a_swapped_chunk_reads_as_an_error_never_as_other_bytes(image, tmp_path, mnt):
    """A LIAR store (a chunk's bytes swapped under the image): the kernel's EROFS gets EIO for the files of
    that chunk, and every file it does return is the image's."""
    image.unpack_rootfs("erofs:1", str(tmp_path / "root"))
    m = image.manifest("erofs:1")
    victim = max(m.chunks, key=lambda c: c.size)
    blob = bytearray(image.chunks.blob(victim.cid))
    blob[len(blob) // 2] ^= 1
    image.chunks.delete([victim.cid])
    image.chunks.put(victim.cid, bytes(blob))
    image.chunks.flush()
    errors, wrong = 0, []
    with ImageFS.from_store(image, "erofs:1") as fs, mount_erofs(fs, str(mnt)):
        for dp, _dns, fns in os.walk(mnt):
            for n in fns:
                p = os.path.join(dp, n)
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                try:
                    got = Path(p).read_bytes()
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    errors += 1
                    continue
                if got != (tmp_path / "root" / os.path.relpath(p, mnt)).read_bytes():
                    wrong.append(p)
    assert wrong == []
    assert errors >= 1


def _erofs_mounts() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split(" - ")[1].split()[0] == "erofs"}


@pytest.mark.corpus
def test_podman_runs_on_erofs_layers_from_the_layer_store(tmp_path, cli_env, corpus):
    """``$CONVSTORE_LAYERSTORE_EROFS=1``: each layer's ``diff`` is a symlink to a kernel EROFS mount, and
    podman (containers/storage's additional layer store) pulls without layer blobs and runs on it."""
    from conftest import CORPUS_DIR, run_cli
    from engine_fixtures import podman, podman_config, remove_podman_root
    from kms_fixtures import Registry

    need_tool("skopeo")
    need_tool("podman")
    reg = Registry(tmp_path / "registry")
    podman_root = tmp_path / "podman"
    als = tmp_path / "als"
    als.mkdir()
    before = _erofs_mounts()
    try:
        src = f"oci:{CORPUS_DIR / 'app1'}:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{reg.host}/app1:latest"],
                       check=True, timeout=300)
        run_cli(cli_env, "pack", src, "app1:latest")
        run_cli({**cli_env, "CONVSTORE_LAYERSTORE_EROFS": "1"}, "layerstore", "--background", str(als))
        env = podman_config(podman_root, als)
        ref = f"{reg.host}/app1:latest"
        podman(env, "pull", "-q", "--tls-verify=false", ref)
        r = podman(env, "run", "--rm", ref)
        assert r.stdout.strip() == "hello", r.stderr
        r = podman(env, "run", "--rm", ref, "sh", "-c", "head -1 /etc/os-release; ls /usr/bin/python3")
        assert r.stdout.splitlines() == ['PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"', "/usr/bin/python3"], r.stderr
        layers = [lay["digest"] for lay in corpus["images"]["app1"]["layers"]]
        diffs = [als / base64.b64encode(ref.encode()).decode() / d / "diff" for d in layers]
        assert all(os.path.islink(d) for d in diffs)
        mounted = _erofs_mounts() - before
        assert {os.readlink(d) for d in diffs} == mounted, (mounted, diffs)
    finally:
        remove_podman_root(podman_config(podman_root, als), podman_root)
        subprocess.run(["fusermount3", "-u", str(als)], check=False)
        reg.stop()
    deadline = time.monotonic() + 30
    while _erofs_mounts() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _erofs_mounts() - before, "the layer store left EROFS mounts behind"


def test_layer_store_mounts_each_layer_with_its_layout_built_ahead(image, monkeypatch):
    """With the option, the layer store builds each layer's EROFS layout after its scan (next to the tree,
    before any lookup), so the engine's first look at ``diff`` only mounts; the mount serves that layer
    (whiteouts in overlay form) and goes with the store's close."""
    from convstore.engines import layerstore

    monkeypatch.setenv(layerstore.EROFS_ENV, "1")
    ls = layerstore.LayerStore(image)
    try:
        ls.scan()
        _, manifest = image.open_image("erofs:1")
        assert len(ls._layouts) == len(manifest.layers)  # one layout per layer, ahead of any lookup
        prebuilt = {id(fut.result(timeout=30)[1]) for fut in ls._layouts.values()}
        where = ls.erofs(manifest.layers[2].digest)
        assert where == ls.erofs_path(manifest.layers[2].digest) and _mounted(Path(where))
        assert id(ls._erofs[manifest.layers[2].digest].layout) in prebuilt
        assert stat.S_ISCHR(os.lstat(os.path.join(where, "e", "zero")).st_mode)
        assert Path(where, "op", "only").read_bytes() == b"after the opaque"
    finally:
        ls.close()
    assert not _mounted(Path(where))
    assert ls.erofs_dir is not None and not os.path.exists(ls.erofs_dir)  # its mount points go with it


def test_a_layer_erofs_cannot_hold_stays_a_fuse_tree(tmp_path, store, monkeypatch):
    """A layer with an xattr EROFS has no name for (``system.nfs4_acl``) is found out while building ahead:
    its ``diff`` stays the FUSE tree (a directory), the image's other layer is a symlink to its EROFS mount."""
    from convstore.engines import layerstore

    write_oci(str(tmp_path / "src"), [make_tar([Entry("ok", data=b"fine")]),
                                      make_tar([Entry("odd", data=b"x", pax={"SCHILY.xattr.system.nfs4_acl": "a"})])])
    store.pack(f"oci:{tmp_path / 'src'}", "odd:1")
    _, manifest = store.open_image("odd:1")
    monkeypatch.setenv(layerstore.EROFS_ENV, "1")
    ls = layerstore.LayerStore(store)
    try:
        ls.scan()
        for fut in list(ls._layouts.values()):
            try:
                fut.result(timeout=30)
            except ErofsUnsupported:
                pass
        ops = layerstore.LayerStoreOperations(ls)
        top = "/" + base64.b64encode(b"any/ref:1").decode()
        good, odd = (f"{top}/{lr.digest}/diff" for lr in manifest.layers)
        assert stat.S_ISLNK(ops.getattr(good)["st_mode"])
        assert ops.readlink(good) == ls.erofs_path(manifest.layers[0].digest)
        assert Path(ops.readlink(good), "ok").read_bytes() == b"fine"
        assert stat.S_ISDIR(ops.getattr(odd)["st_mode"])
        assert ops.getxattr(f"{odd}/odd", "system.nfs4_acl") == b"a"
    finally:
        ls.close()
