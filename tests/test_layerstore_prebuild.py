"""The layer store builds its images' layer trees ahead, after each scan (issue 24): podman's first lookup
of a layer during its pull then does not wait 60-70 ms per layer for it.  The tree it serves is the one
built ahead, and the same as one built on demand."""

from __future__ import annotations

import os
import threading
import time

from imagebuilder import Entry, make_tar, write_oci

from convstore.engines import layerstore
from convstore.merge import layer_tree


def test_the_layer_trees_are_built_after_the_scan_not_in_the_lookup(tmp_path, store, monkeypatch) -> None:
    files = [os.urandom(5_000), os.urandom(7_000)]
    write_oci(str(tmp_path / "img"), [make_tar([Entry("etc", "dir"), Entry("etc/a", data=files[0])]),
                                      make_tar([Entry("etc", "dir"), Entry("etc/b", data=files[1]),
                                                Entry("etc/.wh.a", data=b"")])])
    store.pack(f"oci:{tmp_path / 'img'}:latest", "two:1")
    built: list[str] = []

    def counted(entries, li):  # which thread builds each layer's tree
        built.append(threading.current_thread().name)
        return layer_tree(entries, li)

    monkeypatch.setattr(layerstore, "layer_tree", counted)
    ls = layerstore.LayerStore(store)
    try:
        ls.scan()
        deadline = time.monotonic() + 20
        while len(built) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert built == ["convstore-layers-prebuild"] * 2, built  # before any lookup, in its own thread
        _, manifest = store.open_image("two:1")
        trees = [ls.tree(lr.digest) for lr in manifest.layers]
        assert len(built) == 2  # the lookups used them: nothing built again
        assert trees[0].open("/etc/a").read() == files[0] and trees[1].open("/etc/b").read() == files[1]
        # the same tree as one built on demand (the whiteout in overlay form among them)
        def shape(fs):
            return sorted((p, n.mode, n.size, n.rdev, n.linkname, sorted(n.xattrs.items())) for p, n in fs.walk("/"))

        for i, fs in enumerate(trees):
            assert shape(fs) == shape(layerstore.ImageFS(manifest, fs.fetcher, layer=i))
        assert "a" in trees[1].listdir("/etc")  # the whiteout of etc/a, a 0:0 character device
    finally:
        ls.close()


def test_a_read_of_a_layers_info_opens_its_image_ahead_of_its_files(tmp_path, store) -> None:
    """An engine pulling a layer reads its ``info``: the image is opened (and its start-up profile
    queued) from that read, in a thread, before any file of ``diff/`` is looked up.  A look at the
    layer alone (a release, ``rmdir``, looks the directory up too) opens nothing."""
    import base64

    write_oci(str(tmp_path / "img"), [make_tar([Entry("f", data=os.urandom(3_000))])])
    store.pack(f"oci:{tmp_path / 'img'}:latest", "one:1")
    _, manifest = store.open_image("one:1")
    ls = layerstore.LayerStore(store)
    try:
        ls.scan()
        ops = layerstore.LayerStoreOperations(ls)
        ref = base64.b64encode(b"example.org/one:1").decode()
        layer = f"/{ref}/{manifest.layers[0].digest}"
        assert ops.getattr(layer)["st_mode"] and ops.getattr(f"{layer}/info")["st_size"] > 0
        assert ls.stats() == {}
        fh = ops.open(f"{layer}/info", os.O_RDONLY)
        assert b"diff-digest" in ops.read(f"{layer}/info", 4096, 0, fh)
        deadline = time.monotonic() + 20
        while not ls.stats() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(ls.stats()) == ["one:1"]  # opened, no file of it looked up yet
    finally:
        ls.close()


def test_lookups_that_miss_while_a_scan_runs_wait_for_it(tmp_path, store, monkeypatch) -> None:
    """A layer store that has not scanned yet (a successor taking a session over, the snapshotter's
    first calls) gets several lookups at once: the kernel sends a held file's readahead READs in
    parallel.  One of them scans; the others must wait for that scan's index, not answer ENOENT."""
    write_oci(str(tmp_path / "img"), [make_tar([Entry("f", data=os.urandom(3_000))])])
    store.pack(f"oci:{tmp_path / 'img'}:latest", "one:1")
    _, manifest = store.open_image("one:1")
    digest = manifest.layers[0].digest
    ls = layerstore.LayerStore(store)
    answered = threading.Event()  # a lookup other than the scanning one came back
    complete = store.catalog.complete

    def slow_complete():  # the scan's catalog read lasts until another lookup answered (at most 3 s)
        answered.wait(3)
        return complete()

    monkeypatch.setattr(store.catalog, "complete", slow_complete)
    results: list[object] = []

    def look() -> None:
        got = ls.layer(digest)
        results.append(got)
        answered.set()

    threads = [threading.Thread(target=look) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all(r is not None for r in results), results
    finally:
        ls.close()
