"""The containerd snapshotter opens an image when an engine prepares one of its layers (issue 24): the
start-up profile's prefetch starts at the ``Prepare`` carrying ``containerd.io/snapshot.ref`` -- while
containerd and ``containerd-load`` still set up -- not at the first file the container reads.  Against a
real registry behind a proxy that lies (flips the last byte of every blob range it serves): the early
open fetches, refuses what fails authentication, serves nothing wrong, and caches nothing wrong."""

from __future__ import annotations

import os
import time

import pytest
from imagebuilder import Entry, make_tar, write_oci

import convstore
from convstore.errors import ConvstoreError


def _wait_for(cond, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    return cond()


def test_a_prepare_of_a_stored_layer_prefetches_its_image_profile_and_a_liar_serves_nothing(
        tmp_path, registry, keyfile):
    pytest.importorskip("grpc")
    from netproxy import CountingProxy

    from convstore.engines import containerd_api as api
    from convstore.engines.containerd_api import REF_LABEL
    from convstore.engines.layerstore import LayerMount, LayerStore
    from convstore.engines.snapshotter import SnapshotError, Snapshotter
    from convstore.oci.media import chain_ids

    data = [os.urandom(300_000), os.urandom(300_000)]
    write_oci(str(tmp_path / "img"), [make_tar([Entry(f"f{i}", data=d)]) for i, d in enumerate(data)])
    packer = convstore.Store.open(f"oci://{registry.host}/node", f"file:{keyfile}", insecure=True,
                                  cache_dir=str(tmp_path / "packer"))
    packer.pack(f"oci:{tmp_path / 'img'}", "two:1")
    entry, manifest = packer.open_image("two:1")
    profile = [(layer, k) for layer, lr in enumerate(manifest.layers) for k in range(len(lr.chunks))]
    packer.manifests.save_profile(entry, profile)  # what an earlier start read: every chunk of both files
    c0, c1 = (c for c, _ in chain_ids([lr.diff_id for lr in manifest.layers]))

    proxy = CountingProxy(registry.host)
    try:
        node = convstore.Store.open(f"oci://{proxy.host}/node", f"file:{keyfile}", insecure=True,
                                    cache_dir=str(tmp_path / "node"))
        snap = Snapshotter(str(tmp_path / "snaps"), LayerMount(LayerStore(node), str(tmp_path / "snaps" / "l")))
        try:
            # the liar: the last byte of every blob (range) it serves is flipped
            proxy.fault = lambda method, path: "corrupt" if "/blobs/" in path and method == "GET" else None
            proxy.reset()
            with pytest.raises(SnapshotError) as e:  # containerd's unpacker (or containerd-load) prepares a layer
                snap.Prepare(api.PrepareSnapshotRequest(key="default/1/x", parent="", labels={REF_LABEL: c0}))
            assert e.value.code.name == "ALREADY_EXISTS"
            # no file read yet: the image is opened and its profile fetched (and refused) all the same
            stats = _wait_for(lambda: [v for v in snap.layers.stats().values()
                                       if v["profile_chunks"] == len(profile) and v["fetch_errors"]])
            assert stats, f"the Prepare did not start the image's prefetch: {snap.layers.stats()}"
            assert stats[0]["chunks_fetched"] < len(profile)  # the chunk(s) the liar flipped were refused
            assert proxy.counts["GET blob"] >= 1
            digests = [lr.digest for lr in manifest.layers]
            # the layers' trees: a reader gets the right bytes or an error, never the liar's
            outcomes = []
            for i, digest in enumerate(digests):
                try:
                    got = snap.layers.tree(digest).open(f"/f{i}").read()
                except ConvstoreError:
                    outcomes.append("refused")
                else:
                    assert got == data[i], "a lying registry's bytes were served"
                    outcomes.append("right")
            assert "refused" in outcomes
            # honest again: the right bytes (nothing wrong was kept from the early fetch)
            proxy.fault = None
            for i, digest in enumerate(digests):
                assert snap.layers.tree(digest).open(f"/f{i}").read() == data[i]
        finally:
            snap.layers.close()
    finally:
        proxy.stop()
