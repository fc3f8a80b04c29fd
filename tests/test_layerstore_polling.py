"""The layer store's catalog polling against a real registry (issue 23 §2/§6): a registry that comes
back empty (404 for everything) is an unreachable store, not a removal of every image; an idle look
for removed images costs one request, not one per image."""

from __future__ import annotations

import os
import threading
import time

import pytest
from imagebuilder import Entry, make_tar, write_oci

import convstore
from convstore.engines.layerstore import LayerStore


def _pack(tmp_path, url, keyfile, n):
    s = convstore.Store.open(url, f"file:{keyfile}", insecure=True, cache_dir=str(tmp_path / "packer"))
    digests = []
    for i in range(n):
        descs = write_oci(str(tmp_path / f"i{i}"), [make_tar([Entry(f"f{i}", data=os.urandom(20_000))])])
        s.pack(f"oci:{tmp_path / f'i{i}'}", f"img{i}:1")
        digests.append(descs["layers"][0]["digest"])
    return s, digests


def test_a_registry_that_comes_back_empty_does_not_unserve_every_image(tmp_path, registry, keyfile):
    from kms_fixtures import Registry
    from netproxy import CountingProxy

    _s, digests = _pack(tmp_path, f"oci://{registry.host}/node", keyfile, 2)
    proxy = CountingProxy(registry.host)
    empty = Registry(tmp_path / "registry-empty")
    try:
        node = convstore.Store.open(f"oci://{proxy.host}/node", f"file:{keyfile}", insecure=True,
                                    cache_dir=str(tmp_path / "node"))
        ls = LayerStore(node)
        ls.scan()
        assert sorted(ls.known()) == sorted(digests)
        tree = ls.tree(digests[0])  # served: its fetcher is open
        # the registry restarts on empty storage (or the route goes to another one): 404 for everything
        proxy.upstream = empty.host
        with pytest.raises(convstore.StoreError, match="no longer holds its store.json"):
            ls.scan()
        assert sorted(ls.known()) == sorted(digests)  # nothing stopped being served
        assert ls.tree(digests[0]) is tree
        # the registry is back: business as usual, and a real removal still stops an image being served
        proxy.upstream = registry.host
        _s.rm("img1:1")
        ls.scan()
        assert ls.known() == [digests[0]]
    finally:
        proxy.stop()
        empty.stop()


def test_an_idle_look_for_removed_images_is_one_request_and_a_removal_is_seen(tmp_path, registry, keyfile):
    from netproxy import CountingProxy

    s, digests = _pack(tmp_path, f"oci://{registry.host}/poll", keyfile, 5)
    proxy = CountingProxy(registry.host)
    try:
        node = convstore.Store.open(f"oci://{proxy.host}/poll", f"file:{keyfile}", insecure=True,
                                    cache_dir=str(tmp_path / "node"))
        ls = LayerStore(node)
        ls.scan()
        done = threading.Event()
        watcher = threading.Thread(target=ls.watch, args=(done, 0.05))
        watcher.start()
        try:
            deadline = time.monotonic() + 60
            while proxy.snapshot().get("GET tags", 0) < 5:  # the first scan, the first look (a scan), idle ones
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proxy.reset()
            while proxy.snapshot().get("GET tags", 0) < 10:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            counts = proxy.snapshot()
            # ten idle looks: tag listings only, not a manifest per image (5 images: 50 GETs before)
            assert counts.get("GET manifest", 0) <= 1, counts
            s.rm("img3:1")
            while digests[3] in ls.known():
                assert time.monotonic() < deadline, "the removed image is still served"
                time.sleep(0.05)
            assert sorted(ls.known()) == sorted(d for i, d in enumerate(digests) if i != 3)
        finally:
            done.set()
            watcher.join(30)
    finally:
        proxy.stop()
