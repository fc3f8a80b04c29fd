"""The registry store on a real docker-registry (127.0.0.1): push, pull,
packing from docker://, the cache tier, and faults."""

from __future__ import annotations

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
    store.pack(f"docker://{registry.host}/src/a:v1", "a:1")
    store.pack(f"oci:{tmp_path / 'a'}", "a:local")
    assert store.inspect("a:1").layers[1].diff_id == store.inspect("a:local").layers[1].diff_id
    with pytest.raises(convstore.SourceNotFound):
        store.pack(f"docker://{registry.host}/src/a:nope", "x:1")


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
