"""The shared site tier (convstore/stores/sitetier.py) on real components: a
docker-registry origin behind a counting proxy (what the origin served), and
nginx with contrib/site-tier/nginx.conf as the tier; node processes with their
own caches and state.  A tier that is down is skipped; a tier that lies is
caught by the chunks' authentication and bypassed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci
from netproxy import CountingProxy
from site_tier import SiteTier, free_port

import convstore
from convstore.reader import ImageFS
from convstore.stores.sitetier import SiteTierChunkStore, SiteTierObjectStore

#: a node: opens the registry store (own cache and trust state), reads every regular file of the image
#: lazily through the reader, prints {path: sha256} and the site tier's counters
NODE = r"""
import hashlib, json, stat, sys, convstore
from convstore.reader import ImageFS
url, key, cache, state, site = sys.argv[1:6]
s = convstore.Store.open(url, key, insecure=True, cache_dir=cache, state_dir=state, site_cache=site or None)
out = {}
with ImageFS.from_store(s, "a:1") as fs:
    for path in [p for p, n in fs.walk() if stat.S_ISREG(n.mode)]:
        out[path] = hashlib.sha256(fs.open(path).read()).hexdigest()
tier = s.chunk_store.inner
print(json.dumps({"files": out, "tier": tier.stats() if hasattr(tier, "stats") else None,
                  "manifests_via_tier": getattr(s.objects.inner, "tier_objects", None)}))
"""


#: what an S3 origin's tier may be asked for: pack objects and sealed manifests, by their sha256
_TIER_KEY = re.compile(r"^/[^/]+/(.+/)?(packs|meta/manifests)/[0-9a-f]{64}$")


def _regular(fs: ImageFS) -> list[str]:
    return [p for p, n in fs.walk() if stat.S_ISREG(n.mode)]


def _read_image(s: convstore.Store) -> dict[str, str]:
    """{path: sha256} of every regular file of "a:1" in ``s``, read through the lazy reader."""
    with ImageFS.from_store(s, "a:1") as fs:
        return {p: hashlib.sha256(fs.open(p).read()).hexdigest() for p in _regular(fs)}


def _read_through_tier(tmp_path, url, store, site: str, **opts) -> tuple[dict[str, str], SiteTierChunkStore,
                                                                         SiteTierObjectStore]:
    """"a:1" read in this process from ``url`` through the site cache ``site`` (own cache and state:
    ``lc``, ``ls``): {path: sha256}, and the chunk and object stores that read through the tier."""
    w = convstore.Store.open(url, store.key, cache_dir=str(tmp_path / "lc"), state_dir=str(tmp_path / "ls"),
                             site_cache=site, **opts)
    got = _read_image(w)
    tier, objects = w.chunk_store.inner, w.objects.inner
    assert isinstance(tier, SiteTierChunkStore) and isinstance(objects, SiteTierObjectStore)
    return got, tier, objects


def _files(n: int, size: int) -> list[Entry]:
    return [Entry(f"f{i}", data=os.urandom(size)) for i in range(n)]


def _origin_holding_the_image(tmp_path, store, proxy, url, **opts) -> dict[str, str]:
    """Pack the test image ("a:1") into ``store`` and copy it to the origin at ``url`` (through
    ``proxy``, its counters then reset); the truth {path: sha256}."""
    # 800 small files besides: the sealed manifest is over INLINE_BYTES, a blob of its own (as a real image's)
    small = [Entry(f"s/{os.urandom(16).hex()}", data=os.urandom(100)) for _ in range(800)]
    write_oci(str(tmp_path / "a"), [rich_layer(), make_tar(_files(24, 100_000) + small)])
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    from convstore.transfer import copy_image

    copy_image(store, convstore.Store.open(url, store.key, cache_dir=str(tmp_path / "c0"),
                                           state_dir=str(tmp_path / "s0"), **opts), "a:1")
    truth = _read_image(store)
    proxy.reset()
    return truth


@pytest.fixture
def origin(tmp_path, registry, store):
    """(counting proxy in front of the origin registry, store URL through it, the truth {path: sha256})."""
    proxy = CountingProxy(registry.host)
    url = f"oci://{proxy.host}/fleet"
    yield proxy, url, _origin_holding_the_image(tmp_path, store, proxy, url, insecure=True)
    proxy.stop()


def _nodes(tmp_path, url, key, site, n, tag):
    procs = [subprocess.Popen([sys.executable, "-c", NODE, url, key, str(tmp_path / f"{tag}-cache{i}"),
                               str(tmp_path / f"{tag}-state{i}"), site], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
        outs.append(json.loads(o))
    return outs


def _alone_then_three_through_the_tier(tmp_path, origin, store, packs: str) -> tuple[int, dict[str, int], list]:
    """One node without the tier (what one node costs the origin: the proxy's ``packs`` bytes), then
    three at once through a tier, each reading the image exactly, its sealed manifest and chunks
    through the tier, with no lie and no failure; the origin served each pack range once, and about
    one node's bytes.  (one node's bytes, the origin's request counts for one node, the tier's log)."""
    proxy, url, truth = origin
    key = store.key.spec
    [alone] = _nodes(tmp_path, url, key, "", 1, "alone")
    assert alone["files"] == truth
    one_node, alone_counts = proxy.sent[packs], dict(proxy.counts)
    assert one_node > 2_000_000
    proxy.reset()
    tier = SiteTier(tmp_path / "tier", proxy.host)
    try:
        outs = _nodes(tmp_path, url, key, tier.url, 3, "fleet")
        log = tier.log()
    finally:
        tier.stop()
    for o in outs:
        assert o["files"] == truth  # every node read the image exactly
        assert o["manifests_via_tier"] == 1  # the sealed manifest came from the tier, checked against its name
        assert o["tier"]["tier_chunks"] > 0 and o["tier"]["tier_lies"] == 0 and o["tier"]["tier_failures"] == 0
    # the origin served each pack range once (through the tier), whatever the three nodes asked for at once
    assert proxy.ranges and max(proxy.ranges.values()) == 1, proxy.ranges.most_common(3)
    assert proxy.sent[packs] <= 1.2 * one_node, (proxy.sent[packs], one_node)
    return one_node, alone_counts, log


def test_nodes_starting_one_image_through_the_tier_fetch_it_from_the_origin_once(tmp_path, origin, store):
    one_node, _alone, log = _alone_then_three_through_the_tier(tmp_path, origin, store, "GET blob")
    served = sum(int(r[4]) for r in log if "/blobs/sha256:" in r[1] and r[0] == "GET")
    assert served >= 2.5 * one_node  # the nodes' reads were served by the tier


def test_a_tier_that_is_down_is_skipped_within_a_bounded_time(tmp_path, origin, store):
    proxy, url, truth = origin
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.monotonic()
    [o] = _nodes(tmp_path, url, store.key.spec, dead, 1, "down")
    took = time.monotonic() - t
    assert o["files"] == truth
    assert o["tier"]["tier_failures"] == 1 and o["tier"]["tier_chunks"] == 0 and o["tier"]["origin_chunks"] > 0
    # one bounded attempt (connection refused: ~1.4 s of retries), then skipped for the rest of the start;
    # the wall-clock bound is loose (a loaded machine), the single failure is what bounds the cost
    assert took < 60, took
    assert proxy.sent["GET blob"] > 2_000_000  # the origin served it


def test_a_lying_tier_never_serves_wrong_bytes_and_the_origin_is_read_instead(tmp_path, origin, store):
    proxy, url, truth = origin
    liar = CountingProxy(proxy.host)  # a "tier" that flips a byte of every blob range it serves
    liar.fault = lambda method, path: "corrupt" if "/blobs/sha256:" in path and method == "GET" else None
    try:
        got, tier, objects = _read_through_tier(tmp_path, url, store, f"http://{liar.host}", insecure=True)
        stats = tier.stats()
        assert objects.tier_objects == 0  # the sealed manifest came through the liar too: refused by its name
    finally:
        liar.stop()
    assert got == truth  # nothing wrong was ever returned
    assert liar.faults_injected >= 1
    # caught by authentication; after max_lies the tier is dropped (reads already in flight may add a few)
    assert stats["tier_lies"] >= tier.max_lies
    assert liar.counts["GET blob"] <= tier.max_lies + 16, liar.counts  # 16: the fetcher's parallel reads
    assert stats["origin_chunks"] > 0
    assert proxy.sent["GET blob"] > 2_000_000
    # a disk cache holds only what checked out: a second read from it is exact without any store
    again = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "lc"),
                                 state_dir=str(tmp_path / "ls"))
    proxy.reset()
    assert _read_image(again) == truth
    assert proxy.counts.get("GET blob", 0) == 0


def test_site_cache_errors_are_one_line(tmp_path, cli_env, registry):
    p = run_cli(cli_env, "--site-cache", "http://127.0.0.1:1", "images", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "local store" in p.stderr, p.stderr
    p = run_cli(cli_env, "--insecure", "--store", f"oci://{registry.host}/x", "--site-cache", "ftp://h/x",
                "images", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "http[s]://HOST[:PORT]" in p.stderr, \
        p.stderr


# -- an S3 origin (SeaweedFS) behind the same tier: pack objects and sealed manifests through it, ------
# -- other metadata never --------------------------------------------------------------------------------


@pytest.fixture
def s3_origin(tmp_path, seaweed, s3, store, monkeypatch):
    """(counting proxy in front of SeaweedFS, the s3:// URL, the truth {path: sha256}); the nodes'
    endpoint (``CONVSTORE_S3_ENDPOINT``, inherited) is the proxy."""
    proxy = CountingProxy(seaweed.endpoint.removeprefix("http://"))
    monkeypatch.setenv("CONVSTORE_S3_ENDPOINT", f"http://{proxy.host}")
    yield proxy, s3, _origin_holding_the_image(tmp_path, store, proxy, s3)
    proxy.stop()


def test_s3_nodes_through_the_tier_fetch_each_pack_range_from_the_origin_once(tmp_path, s3_origin, store):
    proxy = s3_origin[0]
    one_node, alone, log = _alone_then_three_through_the_tier(tmp_path, s3_origin, store, "GET pack")
    # and the sealed manifest once: three nodes, one origin GET
    assert proxy.counts["GET manifest"] == 1 and alone.get("GET manifest") == 1, (proxy.counts, alone)
    # packs and sealed manifests, never any other metadata
    assert log and all(_TIER_KEY.search(r[1]) and r[0] == "GET" for r in log), log[:5]
    assert sum(1 for r in log if "/meta/manifests/" in r[1]) == 3
    served = sum(int(r[4]) for r in log)
    assert served >= 2.5 * one_node
    assert proxy.counts["GET other"] >= 3  # each node read the metadata from the origin itself


def test_s3_a_tier_that_is_down_is_skipped(tmp_path, s3_origin, store):
    proxy, url, truth = s3_origin
    dead = f"http://127.0.0.1:{free_port()}"
    [o] = _nodes(tmp_path, url, store.key.spec, dead, 1, "down")
    assert o["files"] == truth
    assert o["tier"]["tier_failures"] == 1 and o["tier"]["tier_chunks"] == 0 and o["tier"]["origin_chunks"] > 0
    assert proxy.sent["GET pack"] > 2_000_000


def test_s3_a_lying_tier_never_serves_wrong_bytes(tmp_path, s3_origin, store):
    proxy, url, truth = s3_origin
    liar = CountingProxy(proxy.host)  # a "tier" that flips a byte of every pack range it serves
    liar.fault = lambda method, path: "corrupt" if "/packs/" in path and method == "GET" else None
    liar.log = []
    try:
        got, tier, _objects = _read_through_tier(tmp_path, url, store, f"http://{liar.host}")
        stats = tier.stats()
    finally:
        liar.stop()
    assert got == truth
    assert liar.faults_injected >= 1
    # the liar was asked for packs and the sealed manifest, never any other metadata
    assert liar.log and all(_TIER_KEY.search(r[2]) for r in liar.log), liar.log[:5]
    assert stats["tier_lies"] >= tier.max_lies
    assert liar.counts["GET pack"] <= tier.max_lies + 16, liar.counts
    assert stats["origin_chunks"] > 0 and proxy.sent["GET pack"] > 2_000_000


def test_s3_a_tier_serving_another_manifest_is_caught(tmp_path, s3_origin, store, seaweed):
    """The tier answers the sealed manifest's GET with another image's sealed manifest (a valid object of
    the same store, so unsealing alone would not tell): refused by its name, counted as a lie, read from
    the origin; the image read is exact."""
    proxy, url, truth = s3_origin
    from convstore.stores.s3 import S3Client, S3Store
    from convstore.transfer import copy_image

    origin_meta = S3Store(S3Client(url, seaweed.endpoint))
    before = set(origin_meta.list("manifests/"))
    other = [Entry(f"o/{os.urandom(16).hex()}", data=os.urandom(100)) for _ in range(800)]
    write_oci(str(tmp_path / "b"), [make_tar(_files(4, 50_000) + other)])
    store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    copy_image(store, convstore.Store.open(url, store.key, cache_dir=str(tmp_path / "cb"),
                                           state_dir=str(tmp_path / "sb")), "b:1")
    [other_key] = set(origin_meta.list("manifests/")) - before
    liar = CountingProxy(proxy.host)  # honest with packs; for any sealed manifest, b's
    liar.swap_body = origin_meta.get(other_key)
    liar.fault = lambda method, path: "swap" if "/meta/manifests/" in path and method == "GET" else None
    try:
        got, tier, objects = _read_through_tier(tmp_path, url, store, f"http://{liar.host}")
        stats = tier.stats()
    finally:
        liar.stop()
    assert got == truth  # a's files, not b's
    assert liar.faults_injected == 1  # the liar was asked for a's sealed manifest and answered b's
    assert objects.tier_objects == 0
    assert stats["tier_lies"] == 1  # the swapped manifest, and nothing else
    assert stats["tier_chunks"] > 0  # one lie does not drop the tier: the packs still came through it


def test_a_tier_that_is_busy_but_answering_is_waited_for_not_skipped(tmp_path, origin, store):
    """A registry tier that serves one read at a time (0.3 s each: overloaded, but moving) with 8 reads
    queued on it, 2.4 s for the last, 2.4 tier timeouts of 1 s: each read is waited for (an answer to another
    read arrives every 0.3 s), none is skipped to the origin (the tier's rule is the read deadline's)."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    from liar_registry import LiarRegistry

    from convstore.stores.sitetier import open_site_tier

    proxy, url, _truth = origin
    busy = LiarRegistry(proxy.host)
    try:
        node = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "bc"),
                                    state_dir=str(tmp_path / "bs"))
        with ImageFS.from_store(node, "a:1") as fs:
            hints = fs.fetcher.manifest.hints()
        cids = sorted(hints)[:8]
        _objects, tier = open_site_tier(url, f"http://{busy.host}", node.chunk_store, node.objects, timeout=1.0)
        tier.get(cids[0], hints[cids[0]])  # a connection and a token first: then the queue
        busy.queue, busy.hold = threading.Semaphore(1), 0.3
        proxy.reset()
        t = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda c: tier.get(c, hints[c]), cids))
        took = time.monotonic() - t
    finally:
        busy.stop()
    assert all(got)
    assert took > 2.0, f"{took:.2f} s: the reads were not queued past the tier's timeout"
    stats = tier.stats()
    assert stats["tier_failures"] == 0 and stats["tier_chunks"] == 9, stats
    assert proxy.counts.get("GET blob", 0) == 8, proxy.counts  # all through the tier (the liar forwards)
