"""The registry store on a real docker-registry (127.0.0.1): push, pull,
packing from docker://, the cache tier, and faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.reader import ImageFS


def images(tmp_path):
    shared = [Entry(f"s{i}", data=os.urandom(90_000)) for i in range(8)]
    for n in ("a", "b"):
        own = [Entry(f"{n}{i}", data=os.urandom(90_000)) for i in range(4)]
        write_oci(str(tmp_path / n), [rich_layer(), make_tar(shared + own)])


def test_push_pull_roundtrip_sends_only_missing(tmp_path, registry, cli_env):
    images(tmp_path)
    url = f"oci://{registry.host}/convstore"
    for n in ("a", "b"):
        run_cli(cli_env, "pack", f"oci:{tmp_path / n}", f"{n}:1")
    a = run_cli(cli_env, "--insecure", "push", "--json", "a:1", url).stdout
    b = run_cli(cli_env, "--insecure", "push", "--json", "b:1", url).stdout
    import json

    a, b = json.loads(a), json.loads(b)
    assert a["chunks_sent"] == a["chunks"] > 0
    assert 0 < b["chunks_sent"] < b["chunks"]  # the shared files were already there
    again = json.loads(run_cli(cli_env, "--insecure", "push", "--json", "b:1", url).stdout)
    assert again["chunks_sent"] == 0
    # a second worker: another local store pulls b and unpacks it exactly
    env2 = dict(cli_env, CONVSTORE_STORE=str(tmp_path / "store2"))
    pulled = json.loads(run_cli(env2, "--insecure", "pull", "--json", url, "b:1").stdout)
    assert pulled["chunks_sent"] == b["chunks"]
    run_cli(env2, "unpack", "b:1", f"oci:{tmp_path / 'out'}")
    s = convstore.Store.open(url, f"file:{cli_env['CONVSTORE_KEY'].split(':', 1)[1]}", insecure=True,
                             cache_dir=str(tmp_path / "cache"))
    assert sorted(str(e.ref) for e in s.images()) == ["a:1", "b:1"]
    assert s.verify().clean


def test_pack_from_registry_source(tmp_path, registry, store):
    images(tmp_path)
    skopeo = subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{tmp_path / 'a'}:latest",
                             f"docker://{registry.host}/src/a:v1"], capture_output=True, text=True)
    assert skopeo.returncode == 0, skopeo.stderr
    store.pack(f"docker://{registry.host}/src/a:v1", "a:1", insecure=True)
    store.pack(f"oci:{tmp_path / 'a'}", "a:local")
    assert store.inspect("a:1").layers[1].diff_id == store.inspect("a:local").layers[1].diff_id
    with pytest.raises(convstore.SourceNotFound):
        store.pack(f"docker://{registry.host}/src/a:nope", "x:1", insecure=True)


def test_lazy_read_through_cache_tier(tmp_path, registry, store):
    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    url = f"oci://{registry.host}/lazy"
    from convstore.transfer import copy_image

    remote = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "c1"))
    copy_image(store, remote, "a:1")
    worker = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "c2"),
                                  cache_bytes=10_000_000)
    with ImageFS.from_store(worker, "a:1") as fs:
        assert fs.open("/d/small.txt").read() == b"hello world\n"
        fetched = fs.fetcher.stats.chunks_fetched
    assert 1 <= fetched <= 3 and worker.objects.cache.misses >= 1
    hits = worker.objects.cache.hits
    with ImageFS.from_store(worker, "a:1") as fs:  # a restart: served from the cache on disk
        fs.open("/d/small.txt").read()
    assert worker.objects.cache.hits > hits


def test_cache_is_bounded(tmp_path, registry, store):
    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    url = f"oci://{registry.host}/bound"
    from convstore.transfer import copy_image

    copy_image(store, convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "c0")), "b:1")
    w = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "cb"), cache_bytes=300_000)
    w.unpack_oci("b:1", f"oci:{tmp_path / 'o'}")  # reads every chunk (>1 MB) through a 300 kB cache
    assert w.objects.cache.cached_bytes() <= 300_000


def test_unreachable_registry_one_line(tmp_path, cli_env):
    p = run_cli(cli_env, "--insecure", "--store", "oci://127.0.0.1:9/x", "images", check=False)
    assert p.returncode == 1 and p.stderr.strip() == "convstore: error: cannot reach the registry at 127.0.0.1:9"
    p = run_cli(cli_env, "pack", "docker://127.0.0.1:9/x:1", "x:1", check=False)
    assert p.returncode == 1 and "cannot reach the registry" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_registry_killed_mid_push_then_completes(tmp_path, registry, cli_env, keyfile):
    big = [Entry(f"f{i}", data=os.urandom(200_000)) for i in range(500)]  # 100 MB: three or four packs
    write_oci(str(tmp_path / "big"), [make_tar(big)])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'big'}", "big:1")
    url = f"oci://{registry.host}/faults"
    p = subprocess.Popen([sys.executable, "-m", "convstore.cli", "--insecure", "push", "big:1", url], env=cli_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import glob
    import time

    blobs = str(registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / "*" / "*")
    deadline = time.monotonic() + 60
    while len(glob.glob(blobs)) < 2:  # kill it once the first pack has landed
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.01)
    registry.kill()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().startswith("convstore: error: ") and len(err.strip().splitlines()) == 1
    registry.start()
    remote = convstore.Store.open(url, f"file:{keyfile}", insecure=True, cache_dir=str(tmp_path / "cx"))
    assert [str(e.ref) for e in remote.images()] == []  # nothing half-written is visible
    run_cli(cli_env, "--insecure", "push", "big:1", url)  # re-run completes
    remote = convstore.Store.open(url, f"file:{keyfile}", insecure=True, cache_dir=str(tmp_path / "cy"))
    assert [str(e.ref) for e in remote.images()] == ["big:1"]
    assert remote.verify().clean


def test_credentials(tmp_path, auth_registry, cli_env):
    write_oci(str(tmp_path / "a"), [rich_layer()])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'a'}", "a:1")
    url = f"oci://{auth_registry.host}/private"

    def push(*opts, password=None):
        return subprocess.run([sys.executable, "-m", "convstore.cli", "--insecure", *opts, "push", "a:1", url],
                              env=cli_env, input=password, capture_output=True, text=True, timeout=120)

    for opts, pw, why in [((), None, "requires credentials"),
                          (("--username", "alice", "--password-stdin"), "wrong\n", "refused the credentials")]:
        p = push(*opts, password=pw)
        assert p.returncode == 1 and why in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "wrong" not in p.stderr and "s3cret" not in p.stderr
    p = push("--username", "alice", "--password-stdin", password="s3cret\n")
    assert p.returncode == 0, p.stderr
    assert "s3cret" not in p.stdout + p.stderr


# -- issue 11: reads without the index, a bounded index, packing straight into a registry ----------------
def config_digest(layout):
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    return json.loads((layout / "blobs" / "sha256" / digest).read_text())["config"]["digest"]


def _open(url, key, cache, **kw):
    return convstore.Store.open(url, key, insecure=True, cache_dir=str(cache), **kw)


def test_a_lazy_read_needs_no_index_and_a_warm_worker_asks_only_for_the_entry(tmp_path, registry, store):
    from netproxy import CountingProxy

    images(tmp_path)
    url = f"oci://{registry.host}/hints"
    from convstore.transfer import copy_image

    remote = _open(url, store.key, tmp_path / "c0")
    for i in range(20):  # many images (and index segments) in the repository
        store.pack(f"oci:{tmp_path / ('a' if i % 2 else 'b')}", f"img{i}:1")
        copy_image(store, remote, f"img{i}:1")
    proxy = CountingProxy(registry.host)
    try:
        purl = f"oci://{proxy.host}/hints"
        for attempt in ("cold", "warm"):
            proxy.reset()
            worker = _open(purl, store.key, tmp_path / "worker")
            with ImageFS.from_store(worker, "img7:1") as fs:
                assert fs.open("/d/small.txt").read() == b"hello world\n"
                ranges = fs.fetcher.stats.chunks_fetched
            counts = proxy.snapshot()
            assert "GET tags" not in counts, counts  # no index was listed, let alone loaded
            if attempt == "cold":
                assert sum(counts.values()) <= 10 + ranges, counts
            else:
                assert sum(counts.values()) <= 3, counts  # store identity and catalog entry only
                assert counts.get("GET blob", 0) == 0, counts
    finally:
        proxy.stop()


def test_pack_straight_into_a_registry_store_dedups_and_reads_back_exactly(tmp_path, registry, cli_env):
    images(tmp_path)
    url = f"oci://{registry.host}/direct"
    a = json.loads(run_cli(cli_env, "--insecure", "--store", url, "--cache", str(tmp_path / "c1"), "pack", "--json",
                           f"oci:{tmp_path / 'a'}", "a:1").stdout)
    b = json.loads(run_cli(cli_env, "--insecure", "--store", url, "--cache", str(tmp_path / "c2"), "pack", "--json",
                           f"oci:{tmp_path / 'b'}", "b:1").stdout)
    assert a["new_chunks"] == a["chunks"] and 0 < b["new_chunks"] < b["chunks"]  # another client deduplicated
    run_cli(cli_env, "--insecure", "--store", url, "--cache", str(tmp_path / "c3"), "unpack", "b:1",
            f"oci:{tmp_path / 'out'}")
    assert config_digest(tmp_path / "b") == config_digest(tmp_path / "out")  # and unpack checked every diff_id
    # the image's manifest artifact references every pack blob it uses (the registry's gc keeps them)
    import requests

    tags = requests.get(f"http://{registry.host}/v2/direct/tags/list").json()["tags"]
    packs = set()
    for t in tags:
        if t.startswith("m-"):
            m = requests.get(f"http://{registry.host}/v2/direct/manifests/{t}",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
            packs |= {l["digest"] for l in m["layers"] if l["mediaType"] == "application/vnd.convstore.pack.v1"}
    assert packs and all(requests.head(f"http://{registry.host}/v2/direct/blobs/{d}").status_code == 200
                         for d in packs)


def test_two_packers_at_once_into_one_registry_lose_nothing(tmp_path, registry, cli_env):
    images(tmp_path)
    url = f"oci://{registry.host}/race"
    _open(url, f"file:{cli_env['CONVSTORE_KEY'].split(':', 1)[1]}", tmp_path / "c0")  # the store exists
    procs = [subprocess.Popen([sys.executable, "-m", "convstore.cli", "--quiet", "--insecure", "--store", url,
                               "--cache", str(tmp_path / f"c{n}"), "pack", f"oci:{tmp_path / n}", f"{n}:1"],
                              env=cli_env, stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    s = _open(url, f"file:{cli_env['CONVSTORE_KEY'].split(':', 1)[1]}", tmp_path / "check")
    assert sorted(str(e.ref) for e in s.images()) == ["a:1", "b:1"]
    assert s.verify().clean
    for n in ("a", "b"):
        s.unpack_oci(f"{n}:1", f"oci:{tmp_path / ('out-' + n)}")  # every layer's diff_id checked
        assert config_digest(tmp_path / n) == config_digest(tmp_path / f"out-{n}")


def test_index_segments_are_merged_into_snapshots_and_a_new_client_reads_few(tmp_path, registry, store):
    from convstore.stores.registry import COMPACT_SEGMENTS
    from netproxy import CountingProxy

    url = f"oci://{registry.host}/snap"
    remote = _open(url, store.key, tmp_path / "c0")
    from convstore.transfer import copy_image

    n = COMPACT_SEGMENTS * 2 + 3
    for i in range(n):  # one segment per push
        write_oci(str(tmp_path / f"i{i}"), [make_tar([Entry(f"f{i}", data=os.urandom(50_000))])])
        store.pack(f"oci:{tmp_path / f'i{i}'}", f"i{i}:1")
        copy_image(store, remote, f"i{i}:1")
    import requests

    index_tags = requests.get(f"http://{registry.host}/v2/snap/convstore-index/tags/list").json()["tags"]
    assert any(t.startswith("s-") for t in index_tags)
    assert sum(t.startswith("x-") for t in index_tags) < COMPACT_SEGMENTS  # merged ones were deleted
    proxy = CountingProxy(registry.host)
    try:
        fresh = _open(f"oci://{proxy.host}/snap", store.key, tmp_path / "fresh")
        ids = set(fresh.chunk_store.ids())  # the whole index, as a pusher loads it
        assert proxy.snapshot().get("GET tags", 0) == 1
        assert proxy.total() <= 3 + 3 * 3 + 2 * COMPACT_SEGMENTS, proxy.snapshot()
    finally:
        proxy.stop()
    assert all(c.cid in ids for i in range(n) for c in store.manifest(f"i{i}:1").chunks)
    # and after that whole scan, lookups in the (in-memory) snapshot still find every chunk
    assert all(fresh.chunk_store.locate(c.cid) is not None for i in range(n) for c in store.manifest(f"i{i}:1").chunks)


def test_a_layout_1_registry_store_is_refused_in_one_line(tmp_path, registry, cli_env):
    import hashlib

    from convstore.oci.registry_client import RegistryClient

    c = RegistryClient(registry.host, insecure=True)
    d = c.put_blob("old", b"{}")
    c.put_manifest("old", "o-" + hashlib.sha256(b"store.json").hexdigest()[:40], json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": d, "size": 2},
         "layers": []}).encode())
    p = run_cli(cli_env, "--insecure", "--store", f"oci://{registry.host}/old", "images", check=False)
    assert p.returncode == 1 and "registry layout 1" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_index_tags_this_client_did_not_write_are_ignored(tmp_path, registry, store):
    from convstore.oci.registry_client import RegistryClient
    from convstore.transfer import copy_image

    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    url = f"oci://{registry.host}/odd"
    copy_image(store, _open(url, store.key, tmp_path / "c0"), "a:1")
    c = RegistryClient(registry.host, insecure=True)
    d = c.put_blob("odd/convstore-index", b"{}")
    for tag in ("x-..", "s-notours", "x-" + "A" * 32):  # tags a hostile registry could list; they name cache files
        c.put_manifest("odd/convstore-index", tag, json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": d, "size": 2},
             "layers": []}).encode())
    fresh = _open(url, store.key, tmp_path / "fresh")
    ids = set(fresh.chunk_store.ids())
    assert {c.cid for c in store.manifest("a:1").chunks} <= ids
    cache = tmp_path / "fresh" / "index" / "tags"
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        p.name for p in cache.iterdir() if p.name[:2] in ("x-", "s-") and len(p.name) == 34)


def test_two_clients_creating_one_registry_store_at_once_never_publish_under_a_lost_identity(tmp_path, registry,
                                                                                              cli_env):
    images(tmp_path)
    url = f"oci://{registry.host}/born"
    procs = [subprocess.Popen([sys.executable, "-m", "convstore.cli", "--quiet", "--insecure", "--store", url,
                               "--cache", str(tmp_path / f"c{n}"), "pack", f"oci:{tmp_path / n}", f"{n}:1"],
                              env=cli_env, stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
    done = []
    for n, p in zip(("a", "b"), procs):
        _out, err = p.communicate(timeout=300)
        if p.returncode == 0:
            done.append(f"{n}:1")
        else:  # the loser of the creation race refuses at publication, in one line
            assert err.count("\n") == 1 and "created at the same time by another client" in err, err
    s = _open(url, f"file:{cli_env['CONVSTORE_KEY'].split(':', 1)[1]}", tmp_path / "check")
    problems: dict[str, str] = {}
    assert sorted(str(e.ref) for e in s.images(problems=problems)) == sorted(done) and not problems
    assert done and s.verify().clean


def test_a_chunk_in_a_snapshot_and_in_a_later_segment_is_listed_once(tmp_path, registry):
    """A writer that loaded the index before another's chunk was merged into a snapshot writes the
    chunk again in its own segment: the index then names it twice, yet it is one chunk for gc's
    listing and for the store's usage."""
    from convstore.stores.registry import open_registry

    url = f"oci://{registry.host}/twice"
    _, a = open_registry(url, insecure=True)
    _, b = open_registry(url, insecure=True)
    cid, blob = os.urandom(32), os.urandom(1000)
    assert not b.has(os.urandom(32))  # b has loaded the index: empty
    a.put(cid, blob)
    a.flush()
    a.compact()  # a's segment merged into a snapshot
    b.put(cid, blob)  # b does not know of it: its own segment lists the chunk again
    b.flush()
    _, fresh = open_registry(url, insecure=True, index_dir=str(tmp_path / "idx"))
    assert fresh.get(cid) == blob
    assert list(fresh.entries()) == [(cid, 1000)]
    assert fresh.usage() == 1000
