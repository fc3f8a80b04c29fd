"""The layer store's ``diff/`` trees answered by node (issue 24): below a layer's ``diff/`` the low-level
server answers LOOKUP, GETATTR, READLINK, GETXATTR, LISTXATTR and OPEN from the layer's tree by nodeid, with
no path callback (no path split, no layer lookup, no walk from the root per request), negative entries are
kept by the kernel, and a tree no longer served (its image removed) is not served from a cached directory.
Opening an image for an engine reuses the manifest the scan decoded, unless the catalog entry now names
another one.  On real FUSE (root)."""

from __future__ import annotations

import base64
import errno
import os
import stat
import time
from pathlib import Path

import pytest
from imagebuilder import Entry, make_tar, write_oci
from test_reader import image  # noqa: F401 - the fixture: the test image packed as lazy:1

from convstore.engines import layerstore
from convstore.reader import kfuse

pytestmark = pytest.mark.skipif(not kfuse.available(), reason="the low-level server mounts as root only")



class _Counted:
    """Counts the path callbacks the server makes for paths below a layer's diff/ (not diff/ itself)."""

    NAMES = ("getattr", "readlink", "getxattr", "listxattr", "open", "access", "readdir")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str]] = []
        for name in self.NAMES:
            orig = getattr(layerstore.LayerStoreOperations, name)

            def wrapped(ops, path, *a, _orig=orig, _name=name):
                if "/diff/" in path or (_name == "readdir" and path.endswith("/diff")):
                    self.calls.append((_name, path))
                return _orig(ops, path, *a)

            monkeypatch.setattr(layerstore.LayerStoreOperations, name, wrapped)


def _mounted(store, mnt: Path) -> layerstore.LayerMount:
    ls = layerstore.LayerStore(store)
    ls.scan()
    mnt.mkdir()
    return layerstore.LayerMount(ls, str(mnt))


def test_files_below_a_layers_diff_are_answered_by_node(image, tmp_path, monkeypatch) -> None:
    counted = _Counted(monkeypatch)
    _, manifest = image.open_image("lazy:1")
    mnt = tmp_path / "als"
    with _mounted(image, mnt) as m:
        server = m._mount.server
        assert isinstance(server, kfuse.PathServer)
        for i, lr in enumerate(manifest.layers):
            diff = Path(m.diff_dir(lr.digest))
            assert diff.is_dir()
            fs = m.layers.tree(lr.digest)
            seen = 0
            for p, n in fs.walk("/"):  # every entry: the same attributes, link targets and xattrs
                if p == "/":
                    continue
                st = os.lstat(diff / p.lstrip("/"))
                assert (st.st_mode, st.st_size, st.st_ino) == (n.mode, n.size, n.ino), p
                if n.children is not None:
                    assert st.st_nlink == 2 + sum(1 for c in n.children.values() if c.children is not None), p
                if stat.S_ISLNK(n.mode):
                    assert os.readlink(diff / p.lstrip("/")) == n.linkname
                if not stat.S_ISLNK(n.mode):
                    names = os.listxattr(diff / p.lstrip("/"))
                    assert sorted(names) == sorted(n.xattrs), p
                    for k, v in n.xattrs.items():
                        assert os.getxattr(diff / p.lstrip("/"), k) == v
                    with pytest.raises(OSError) as e:
                        os.getxattr(diff / p.lstrip("/"), "user.none")
                    assert e.value.errno == errno.ENODATA
                if stat.S_ISREG(n.mode):
                    assert (diff / p.lstrip("/")).read_bytes() == fs.open(p).read()
                seen += 1
            assert seen > 0, i
        # an entry of the opaque directory's layer (overlay xattr served by node)
        top = Path(m.diff_dir(manifest.layers[2].digest))
        assert os.getxattr(top / "o", "trusted.overlay.opaque") == b"y"
        assert counted.calls == []  # nothing below diff/ went through the path callbacks
        # a directory's listing (with the file types overlayfs needs: a whiteout is a character device)
        # comes from the node, once: the kernel keeps it
        listed = {e.name: stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) for e in os.scandir(top / "o")}
        node = m.layers.tree(manifest.layers[2].digest).lookup("/o")
        assert listed == {k: stat.S_IFMT(c.mode) for k, c in node.children.items()}
        readdirs = server.ops.get(kfuse.READDIR, 0)
        assert sorted(os.listdir(top / "o")) == sorted(node.children)
        assert server.ops.get(kfuse.READDIR, 0) == readdirs
        # a name a layer does not have: one LOOKUP, then the kernel's negative entry answers
        before = server.ops.get(kfuse.LOOKUP, 0)
        for _ in range(3):
            assert not (top / "a" / "no-such-file").exists()
        assert server.ops.get(kfuse.LOOKUP, 0) == before + 1


def test_a_removed_image_is_not_served_from_a_cached_directory(image, tmp_path) -> None:
    """A directory the kernel holds (its nodeid answered by node) of an image removed since: a name not
    looked up yet is looked up again through the store's index, which no longer has the layer."""
    _, manifest = image.open_image("lazy:1")
    mnt = tmp_path / "als"
    with _mounted(image, mnt) as m:
        diff = Path(m.diff_dir(manifest.layers[1].digest))
        assert (diff / "a" / "keep").read_bytes() == b"1"  # diff/ and a/ now held by the kernel
        image.rm("lazy:1")
        m.layers.scan()
        assert m.layers.layer(manifest.layers[1].digest) is None
        with pytest.raises(OSError) as e:
            os.lstat(diff / "a" / "gone")  # in the tree that was served, never looked up
        assert e.value.errno in (errno.ENOENT, errno.EIO)
        with pytest.raises(OSError):
            os.lstat(diff / "o" / "old")


def _count_loads(store, monkeypatch) -> list[str]:
    loads: list[str] = []
    orig = store.manifests.load

    def load(entry, *a, **k):
        loads.append(str(entry.ref))
        return orig(entry, *a, **k)

    monkeypatch.setattr(store.manifests, "load", load)
    return loads


def test_opening_an_image_reuses_the_manifest_the_scan_decoded(image, monkeypatch) -> None:
    _, manifest = image.open_image("lazy:1")
    ls = layerstore.LayerStore(image)
    try:
        ls.scan()
        loads = _count_loads(image, monkeypatch)
        fs = ls.tree(manifest.layers[1].digest)
        assert loads == []  # the catalog entry is read again (the read gate), the manifest not
        assert fs.open("/a/keep").read() == b"1"
    finally:
        ls.close()


def test_an_image_packed_again_since_the_scan_is_opened_from_its_new_manifest(tmp_path, store, monkeypatch) -> None:
    """The liar: between the scan and the engine's lookup the name was packed again (another manifest,
    sharing the first layer).  The open must load the manifest the entry names now, not reuse the one
    the scan decoded."""
    first = make_tar([Entry("f", data=b"first")])
    write_oci(str(tmp_path / "one"), [first])
    store.pack(f"oci:{tmp_path / 'one'}:latest", "img:1")
    _, old = store.open_image("img:1")
    ls = layerstore.LayerStore(store)
    try:
        ls.scan()
        write_oci(str(tmp_path / "two"), [first, make_tar([Entry("g", data=b"second")])])
        store.pack(f"oci:{tmp_path / 'two'}:latest", "img:1")
        loads = _count_loads(store, monkeypatch)
        fs = ls.tree(old.layers[0].digest)
        assert loads == ["img:1"]
        assert len(fs.manifest.layers) == 2 and fs.manifest is not old
        assert fs.open("/f").read() == b"first"
    finally:
        ls.close()


def test_queueing_a_profile_does_not_hold_up_lookups_or_close(image, monkeypatch) -> None:
    """The start-up profile is queued (claims, sorting, the fetch pool's threads: ~10 ms) outside the
    index's lock: the engine's lookup of the image's other layer does not wait for it, nor does close();
    a queueing that ends after close() leaves no background fetch running."""
    import threading

    entered, release = threading.Event(), threading.Event()
    started: list = []
    real = layerstore.start_fetching

    def slow(fetcher, profile, config, image_ref, **kw):
        entered.set()
        assert release.wait(30)
        bg = real(fetcher, profile, config, image_ref, **kw)
        started.append(bg)
        return bg

    monkeypatch.setattr(layerstore, "start_fetching", slow)
    _, manifest = image.open_image("lazy:1")
    ls = layerstore.LayerStore(image, background=layerstore.BackgroundConfig(enabled=True))
    closed = False
    try:
        ls.scan()
        first: list = []
        t = threading.Thread(target=lambda: first.append(ls.tree(manifest.layers[1].digest)), daemon=True)
        t.start()
        assert entered.wait(30)
        t.join(10)
        assert first, "the lookup that opened the image waited for its profile's queueing"
        other: list = []
        t = threading.Thread(target=lambda: other.append(ls.tree(manifest.layers[2].digest)), daemon=True)
        t.start()
        t.join(10)
        assert other, "the lookup of the image's other layer waited for the profile's queueing"
        c = threading.Thread(target=ls.close, daemon=True)
        c.start()
        c.join(10)
        assert not c.is_alive(), "close() waited for the profile's queueing"
        closed = True
        release.set()
        deadline = time.monotonic() + 30
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while not started[0]._stop.is_set() and time.monotonic() < deadline:  # stopped: nothing is fetched
            time.sleep(0.01)                                                    # for a closed store
        assert started[0]._stop.is_set() and started[0].finished.wait(30)
        assert ls.progress() == {}
    finally:
        release.set()
        if not closed:
            ls.close()


def test_the_scan_keeps_few_decoded_manifests_and_none_of_an_open_image(tmp_path, store) -> None:
    """The decoded manifests kept from a scan cost memory (~4 MB for a 5,729-entry image): at most
    DECODED_IMAGES of them, and none for an image already open (it keeps its own)."""
    for i in range(layerstore.DECODED_IMAGES + 2):
        write_oci(str(tmp_path / f"i{i}"), [make_tar([Entry("f", data=f"image {i}".encode())])])
        store.pack(f"oci:{tmp_path / f'i{i}'}:latest", f"img{i}:1")
    ls = layerstore.LayerStore(store)
    try:
        ls.scan()
        assert len(ls._decoded) == layerstore.DECODED_IMAGES
        opened = next(iter(ls._decoded))
        _, m = store.open_image(next(f"img{i}:1" for i in range(layerstore.DECODED_IMAGES + 2)
                                     if store.catalog.entry(f"img{i}:1").manifest_digest == opened))
        assert ls.tree(m.layers[0].digest).open("/f").read().startswith(b"image ")
        ls.scan()
        assert opened not in ls._decoded and len(ls._decoded) == layerstore.DECODED_IMAGES
    finally:
        ls.close()
