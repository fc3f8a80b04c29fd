"""gc on a registry store (issue 23 §6), on a real docker-registry (127.0.0.1):
convstore's gc deletes the removed images' manifests and rewrites the chunk
index, the registry's own ``garbage-collect`` frees the blobs; leases keep gc
away from a pack in flight (a real packer held at its publish by a proxy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore


def _images(tmp_path):
    """keep = a shared layer; gone = the same layer and one of its own (~1 MB, random: no dedup)."""
    rich = rich_layer()
    shared = make_tar([Entry(f"lib/s{i}", data=os.urandom(90_000)) for i in range(8)])
    own = make_tar([Entry(f"own/o{i}", data=os.urandom(100_000)) for i in range(10)])
    write_oci(str(tmp_path / "keep"), [rich, shared])
    write_oci(str(tmp_path / "gone"), [rich, shared, own])


def _open(url, keyfile, cache):
    return convstore.Store.open(url, f"file:{keyfile}", insecure=True, cache_dir=str(cache))


def _containers(s, ref):
    return {h[0] for h in s.manifests.load(s.catalog.entry(ref)).locations if h is not None}


def _head(registry, repo, container):
    return requests.head(f"http://{registry.host}/v2/{repo}/blobs/sha256:{container.hex()}").status_code


def _config_digest(layout):
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    return json.loads((layout / "blobs" / "sha256" / digest).read_text())["config"]["digest"]


def test_gc_on_a_registry_store_frees_a_removed_images_chunks_and_keeps_the_rest(tmp_path, registry, keyfile):
    _images(tmp_path)
    url = f"oci://{registry.host}/gcrepo"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    gone = s.pack(f"oci:{tmp_path / 'gone'}", "gone:1")
    own_packs = _containers(s, "gone:1") - _containers(s, "keep:1")
    assert own_packs and gone.new_chunks > 0
    keep_ids = {c.cid for c in s.manifests.load(s.catalog.entry("keep:1")).chunks}
    own_ids = {c.cid for c in s.manifests.load(s.catalog.entry("gone:1")).chunks} - keep_ids
    cache = s.chunk_store.cache
    # the node's cache holds the removed image's chunks once it was read
    s.unpack_oci("gone:1", f"oci:{tmp_path / 'out-gone'}")
    cached_before = cache.cached_bytes()
    assert all(cache.contains("chunk " + c.hex()) for c in own_ids | keep_ids)
    s.rm("gone:1")
    report = s.gc()
    assert report.chunks_removed == gone.new_chunks and report.manifests_removed == 1, report
    # the node cache dropped what only the removed image used
    assert not any(cache.contains("chunk " + c.hex()) for c in own_ids)
    assert all(cache.contains("chunk " + c.hex()) for c in keep_ids)
    assert cache.cached_bytes() <= cached_before - 1_000_000
    # convstore unreferenced the pack blobs; the registry's own garbage collection frees them
    before = registry.stored_bytes()
    assert all(_head(registry, "gcrepo", c) == 200 for c in own_packs)
    registry.garbage_collect()
    freed = before - registry.stored_bytes()
    assert freed >= 1_000_000, freed  # at least the removed image's own (random) megabyte
    assert all(_head(registry, "gcrepo", c) == 404 for c in own_packs)
    # the shared image is intact, read by a new client (no cache)
    s2 = _open(url, keyfile, tmp_path / "c2")
    assert [str(e.ref) for e in s2.images()] == ["keep:1"]
    s2.unpack_oci("keep:1", f"oci:{tmp_path / 'out-keep'}")  # every diff_id checked
    assert _config_digest(tmp_path / "keep") == _config_digest(tmp_path / "out-keep")
    assert s2.verify().clean
    # the index forgot the freed chunks: packing the removed image again uploads them again (a dedup
    # against a chunk whose pack blob is gone would fail to publish) and it reads back exactly
    again = _open(url, keyfile, tmp_path / "c3").pack(f"oci:{tmp_path / 'gone'}", "gone:1")
    assert again.new_chunks == gone.new_chunks
    _open(url, keyfile, tmp_path / "c4").unpack_oci("gone:1", f"oci:{tmp_path / 'out-gone2'}")
    assert _config_digest(tmp_path / "gone") == _config_digest(tmp_path / "out-gone2")


def test_gc_leaves_a_pack_in_flight_alone_and_it_publishes_intact(tmp_path, registry, keyfile, cli_env):
    """A racer: a real packer (another process) holds its lease, has uploaded its chunks and is held by a
    proxy just before its manifest is written, while gc runs on another client."""
    from netproxy import CountingProxy

    _images(tmp_path)
    url = f"oci://{registry.host}/race"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    s.rm("keep:1")  # keep's chunks are now garbage: exactly what the racer's dedup relies on
    proxy = CountingProxy(registry.host)
    at_publish, release = threading.Event(), threading.Event()

    def hold_the_manifest(method, path):
        if method == "PUT" and "/race/manifests/m-" in path:
            at_publish.set()
            release.wait(120)
        return None

    proxy.fault = hold_the_manifest
    racer = subprocess.Popen([sys.executable, "-m", "convstore.cli", "--quiet", "--insecure", "--store",
                              f"oci://{proxy.host}/race", "--cache", str(tmp_path / "c-racer"), "pack", "--json",
                              f"oci:{tmp_path / 'gone'}", "gone:1"], env=cli_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert at_publish.wait(120), racer.stderr.read() if racer.poll() is not None else "racer never published"
        leases = s.leases.all()[0]
        assert [(l.purpose, l.exclusive) for l in leases] == [("pack", False)]
        with pytest.raises(convstore.StoreBusy, match="a pack lease of pid"):
            s.gc()
        # the CLI says so in one line, and changed nothing
        p = subprocess.run([sys.executable, "-m", "convstore.cli", "--insecure", "--store", url, "--cache",
                            str(tmp_path / "c-cli"), "gc"], env=cli_env, capture_output=True, text=True)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "gc cannot run now" in p.stderr and "Traceback" not in p.stderr
    finally:
        release.set()
    out, err = racer.communicate(timeout=300)
    proxy.stop()
    assert racer.returncode == 0, err
    packed = json.loads(out)
    assert packed["new_chunks"] < packed["chunks"]  # it deduplicated against keep's (unreferenced) chunks
    assert s.leases.all() == ([], [])  # released
    s.gc()  # now it runs, and keeps everything the published image uses
    registry.garbage_collect()
    s2 = _open(url, keyfile, tmp_path / "c2")
    s2.unpack_oci("gone:1", f"oci:{tmp_path / 'out'}")  # every diff_id checked
    assert _config_digest(tmp_path / "gone") == _config_digest(tmp_path / "out")
    assert s2.verify().clean


def test_a_dead_packers_lease_expires_and_a_forged_one_is_ignored(tmp_path, registry, keyfile):
    from convstore.core.leases import Lease

    _images(tmp_path)
    url = f"oci://{registry.host}/stale"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    now = time.time()
    # a packer that died an hour ago, never renewed
    s.leases._write(Lease("a" * 32, "pack", False, "elsewhere", 4242, now - 3600, now - 3600, 1800.0))
    # a liar's lease, not authenticated under the store's key: it cannot keep gc out
    s.objects.put("leases/" + "b" * 32, json.dumps({"format": "convstore-lease", "version": 1, "id": "b" * 32,
                                                     "purpose": "gc", "exclusive": True, "host": "x", "pid": 1,
                                                     "created": now, "renewed": now, "ttl": 1e9}).encode())
    # a live one blocks
    with s.leases.hold("pack", exclusive=False):
        with pytest.raises(convstore.StoreBusy):
            s.gc()
    report = s.gc()
    assert report.other_files_removed >= 2  # the dead and the forged lease are gone
    assert s.leases.all() == ([], [])
    # the liar's exclusive lease never kept a pack out either
    s.pack(f"oci:{tmp_path / 'gone'}", "gone:1")
