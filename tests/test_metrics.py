"""The metrics endpoint, the stats file and the memory budget (issue 23, sections 5 and 6).

The endpoint is scraped over HTTP on 127.0.0.1 from a real ``convstore mount``
process; what it says is checked against the store itself (the stored size of
every chunk the reads needed), and its error counters against a store writer
who swaps one chunk for damaged bytes and deletes another.  The memory budget
is checked from the shared cache's own accounting while many images are read
through one layer store's FUSE mount."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CORPUS_DIR, need_tool, run_cli
from engine_fixtures import podman, podman_config, remove_podman_root
from imagebuilder import Entry, make_tar, write_oci
from kms_fixtures import Registry
from prometheus_client.parser import text_string_to_metric_families

import convstore
from convstore.engines.layerstore import LayerMount, LayerStore
from convstore.reader import ImageFS
from convstore.reader.chunkcache import ChunkCache

BIG = os.urandom(3_000_000)
TAMPERED = os.urandom(200_000)
GONE = os.urandom(200_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _scrape_or_none(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """A scrape, or None while nothing listens on ``port`` yet."""
    try:
        return scrape(port)
    except OSError:
        return None


def sample(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def stored_bytes(store: convstore.Store, cids: set[bytes]) -> int:
    return sum(len(store.chunks.blob(c)) for c in cids)


@pytest.fixture
def image(tmp_path: Path, store: convstore.Store) -> convstore.Store:
    l0 = make_tar([Entry("a", "dir"), Entry("a/keep", data=b"1"), Entry("big.bin", data=BIG)])
    l1 = make_tar([Entry("t.bin", data=TAMPERED), Entry("g.bin", data=GONE), Entry("ok.bin", data=b"fine\n")])
    write_oci(str(tmp_path / "src"), [l0, l1])
    store.pack(f"oci:{tmp_path / 'src'}", "m:1")
    return store


def _chunks_of(store: convstore.Store, path: str) -> tuple[set[bytes], set[bytes]]:
    """(cids of the file at path, cids of its whole layer)."""
    with ImageFS.from_store(store, "m:1") as fs:
        node = fs.lookup(path)
        layer = fs.manifest.layers[node.layer]
        starts = fs.fetcher._starts[node.layer]
        mine = {fs.manifest.chunks[i].cid for k, i in enumerate(layer.chunks)
                if starts[k] < node.offset + node.size and starts[k + 1] > node.offset}
        return mine, {fs.manifest.chunks[i].cid for i in layer.chunks}


def test_mount_endpoint_counts_what_was_fetched_and_read_errors_by_cause(
        image: convstore.Store, cli_env: dict[str, str], tmp_path: Path) -> None:
    big_chunks, layer0 = _chunks_of(image, "/big.bin")
    t_chunks, _ = _chunks_of(image, "/t.bin")
    g_chunks, _ = _chunks_of(image, "/g.bin")
    assert big_chunks and not (t_chunks & g_chunks)
    mnt, port, stats = tmp_path / "mnt", free_port(), tmp_path / "stats.json"
    mnt.mkdir()
    run_cli(cli_env, "mount", "--background", "--metrics-address", f"127.0.0.1:{port}", "--stats-file", str(stats),
            "m:1", str(mnt))
    try:
        before = scrape(port)
        assert sample(before, "convstore_fetched_chunks_total", image="m:1", tier="origin") == 0
        assert sample(before, "convstore_image_chunks", image="m:1") == len(image.manifest("m:1").chunks)
        assert sample(before, "process_resident_memory_bytes") > 10 << 20  # the client's process collector
        assert (mnt / "a" / "keep").read_bytes() == b"1"
        assert (mnt / "big.bin").read_bytes() == BIG
        m = scrape(port)
        # layer 0 read whole (its small file and big.bin): every one of its chunks fetched once from the store
        assert sample(m, "convstore_fetched_chunks_total", image="m:1", tier="origin") == len(layer0)
        assert sample(m, "convstore_fetched_bytes_total", image="m:1", tier="origin") == stored_bytes(image, layer0)
        assert sample(m, "convstore_fetched_chunks_total", image="m:1", tier="disk") == 0  # a local store
        assert sample(m, "convstore_read_bytes_total", image="m:1") >= len(BIG) + 1
        assert sample(m, "convstore_fetch_seconds_count", tier="origin") == len(layer0)
        assert 0 < sample(m, "convstore_memory_cache_bytes") <= sample(m, "convstore_memory_budget_bytes") == 128 << 20
        assert not [k for k in m if k[0] in ("convstore_read_errors_total", "convstore_fetch_errors_total")]
        # the stats file holds the same process's counters
        deadline = time.monotonic() + 10
        while json.loads(stats.read_text() if stats.exists() else "{}").get("images", {}).get("m:1", {}).get(
                "bytes_fetched") != stored_bytes(image, layer0):
            assert time.monotonic() < deadline, stats.read_text() if stats.exists() else "no stats file"
            time.sleep(0.1)

        # a store writer swaps one chunk of t.bin for damaged bytes and deletes one of g.bin
        victim = next(iter(t_chunks))
        blob = bytearray(image.chunks.blob(victim))
        blob[-3] ^= 0xFF
        image.chunks.delete([victim])
        image.chunks.put(victim, bytes(blob))
        gone = next(iter(g_chunks))
        image.chunks.delete([gone])
        image.chunks.flush()
        for name in ("t.bin", "g.bin"):
            with pytest.raises(OSError) as e:
                (mnt / name).read_bytes()
            assert e.value.errno == 5  # EIO
        assert (mnt / "ok.bin").read_bytes() == b"fine\n"  # the rest still serves
        m = scrape(port)
        assert sample(m, "convstore_fetch_errors_total", image="m:1", cause="corrupt") >= 1  # tampered, quarantined
        assert sample(m, "convstore_fetch_errors_total", image="m:1", cause="missing") >= 1
        # every failed read is counted by its cause, and only those two causes occur
        causes = {dict(k[1])["cause"]: v for k, v in m.items() if k[0] == "convstore_read_errors_total"}
        assert set(causes) <= {"corrupt", "missing"} and causes.get("missing", 0) >= 1 and sum(causes.values()) >= 2
        deadline = time.monotonic() + 10
        while sum(json.loads(stats.read_text()).get("read_errors", {}).values()) != sum(causes.values()):
            assert time.monotonic() < deadline, stats.read_text()
            time.sleep(0.1)
        assert stats.stat().st_mode & 0o777 == 0o600
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    # a new process adds to the stats file instead of starting it again
    first = json.loads(stats.read_text())
    run_cli(cli_env, "mount", "--background", "--stats-file", str(stats), "m:1", str(mnt))
    try:
        assert (mnt / "a" / "keep").read_bytes() == b"1"
        deadline = time.monotonic() + 10
        while (doc := json.loads(stats.read_text()))["pid"] == first["pid"] or \
                doc["images"]["m:1"]["chunks_fetched"] <= first["images"]["m:1"]["chunks_fetched"]:
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert doc["since"] == first["since"] and doc["processes"] == 2 and doc["started"] > first["started"]
        assert doc["read_errors"] == first["read_errors"]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def test_metrics_address_is_checked_before_mounting(image: convstore.Store, cli_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_cli(cli_env, "mount", "--background", "--metrics-address", "localhost", "m:1", str(mnt), check=False)
    assert p.returncode == 2 and "--metrics-address" in p.stderr and "Traceback" not in p.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_cli(cli_env, "mount", "--background", "--metrics-address", f"127.0.0.1:{port}", "m:1", str(mnt),
                    check=False)
    assert p.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not os.path.ismount(mnt)


def test_one_memory_budget_for_every_image_a_layer_store_serves(tmp_path: Path, store: convstore.Store) -> None:
    budget = 1 << 20
    contents = {}
    for n in range(8):  # eight images, 600 KB of distinct content each: 4.8 MB through a 1 MiB budget
        data = os.urandom(600_000)
        write_oci(str(tmp_path / f"src{n}"), [make_tar([Entry("f.bin", data=data)])])
        store.pack(f"oci:{tmp_path / f'src{n}'}", f"img{n}:1")
        contents[f"img{n}:1"] = data
    layers = LayerStore(store, cache=ChunkCache(budget))
    layers.scan()
    mnt = tmp_path / "als"
    ref = base64.b64encode(b"x").decode()
    seen = 0
    with LayerMount(layers, str(mnt)):
        for _ in range(2):
            for name, data in contents.items():
                digest = store.manifest(name).layers[0].digest
                assert (mnt / ref / digest / "diff" / "f.bin").read_bytes() == data
                assert layers.cache.bytes <= budget  # the shared cache's own accounting
                seen += 1
    assert seen == 16
    fetchers = {id(f): f for _, _, f in layers._manifests.values()}
    assert len(fetchers) == 8 and all(f.cache is layers.cache for f in fetchers.values())
    assert 0 < layers.cache.peak_bytes <= budget and layers.cache.evictions > 0
    # what was fetched is more than the budget could hold: the bound held under pressure
    assert sum(f.stats.plain_bytes_fetched for f in fetchers.values()) > 4 * budget
    layers.close()


def test_tiers_of_a_registry_store_origin_then_node_disk_cache(image: convstore.Store, cli_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    """Over a real registry: a first mount fetches from the origin, a second process (same node cache) from disk."""
    reg = Registry(tmp_path / "registry")
    try:
        url = f"oci://{reg.host}/tiers"
        run_cli(cli_env, "--insecure", "push", "m:1", url)
        remote = convstore.Store.open(url, image.key, insecure=True, cache_dir=str(tmp_path / "probe-cache"))
        _, layer0 = _chunks_of(remote, "/big.bin")
        stored = stored_bytes(remote, layer0)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cache = ["--insecure", "--store", url, "--cache", str(tmp_path / "node-cache")]
        for tier in ("origin", "disk"):
            port = free_port()
            # no background fetch: it would bring the chunks into the node cache before the read asks the origin
            run_cli(cli_env, *cache, "mount", "--background", "--no-background-fetch", "--metrics-address",
                    f"127.0.0.1:{port}", "m:1", str(mnt))
            try:
                assert (mnt / "big.bin").read_bytes() == BIG
                m = scrape(port)
                assert sample(m, "convstore_fetched_chunks_total", image="m:1", tier=tier) >= len(layer0) - 1
                other = "disk" if tier == "origin" else "origin"
                assert sample(m, "convstore_fetched_chunks_total", image="m:1", tier=other) <= 1  # a/keep's chunk
                total = sum(sample(m, "convstore_fetched_bytes_total", image="m:1", tier=t) for t in ("disk", "origin"))
                assert total <= stored
                assert sample(m, "convstore_fetch_seconds_count", tier=tier) >= len(layer0) - 1
                assert sample(m, "convstore_node_cache_bytes") >= sample(m, "convstore_fetched_bytes_total",
                                                                         image="m:1", tier=tier)
                assert sample(m, "convstore_node_cache_limit_bytes") == 2048e6
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    finally:
        reg.kill()


@pytest.mark.corpus
def test_podman_start_through_the_layer_store_is_recorded(tmp_path: Path, cli_env: dict[str, str],
                                                          corpus: dict) -> None:
    """A real engine: podman runs app1 from the layer store; the endpoint's counters equal the stats file's
    (FetchStats of the same process) and the start is recorded once its window ends."""
    need_tool("skopeo")
    need_tool("podman")
    reg = Registry(tmp_path / "registry")
    podman_root, mnt, stats, port = tmp_path / "podman", tmp_path / "als", tmp_path / "stats.json", free_port()
    mnt.mkdir()
    env = podman_config(podman_root, mnt)
    try:
        src = f"oci:{CORPUS_DIR / 'app1'}:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{reg.host}/app1:latest"],
                       check=True, timeout=300)
        run_cli(cli_env, "pack", src, "app1:latest")
        run_cli(cli_env, "layerstore", "--background", str(mnt), "--stats-file", str(stats),
                "--metrics-address", f"127.0.0.1:{port}", "--memory-budget", "64")
        ref = f"{reg.host}/app1:latest"
        podman(env, "pull", "-q", "--tls-verify=false", ref)
        assert podman(env, "run", "--rm", ref).stdout.strip() == "hello"
        deadline = time.monotonic() + 40  # the start window (10 s) ends, then the record is made
        while sample(m := scrape(port), "convstore_start_image_fraction_count") < 1:
            assert time.monotonic() < deadline, "no start record"
            time.sleep(0.2)
        assert sample(m, "convstore_start_image_fraction_count") == 1  # one image, one start
        assert 0 < sample(m, "convstore_start_image_fraction_sum") < 0.25  # a few MB of a 122 MB image
        total = corpus["images"]["app1"]
        deadline = time.monotonic() + 10
        while True:
            doc = json.loads(stats.read_text()) if stats.exists() else {}
            got = doc.get("images", {}).get("app1:latest", {})
            m = scrape(port)
            if got.get("chunks_fetched") == sample(m, "convstore_fetched_chunks_total", image="app1:latest",
                                                   tier="origin"):
                break
            assert time.monotonic() < deadline, (got, total)
            time.sleep(0.2)
        assert got["chunks_fetched"] > 0 and got["bytes_fetched"] == sample(
            m, "convstore_fetched_bytes_total", image="app1:latest", tier="origin")
        assert sample(m, "convstore_memory_budget_bytes") == 64 << 20
        assert sample(m, "convstore_memory_cache_peak_bytes") <= 64 << 20
        assert [r["image"] for r in doc["starts"]] == ["app1:latest"] and doc["starts"][0]["fetched_bytes"] > 0
    finally:
        remove_podman_root(env, podman_root)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        reg.kill()


@pytest.mark.corpus
def test_containerd_snapshotter_endpoint(tmp_path: Path, cli_env: dict[str, str], corpus: dict) -> None:
    """The snapshotter serves the same endpoint and stats file; a container run through it is counted, and its
    start recorded, once its window has ended."""
    need_tool("containerd")
    need_tool("ctr")
    from engine_fixtures import snapshotter_and_containerd

    run_cli(cli_env, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
    stats, port = tmp_path / "snap-stats.json", free_port()
    with snapshotter_and_containerd(cli_env, tmp_path, "--metrics-address", f"127.0.0.1:{port}", "--stats-file",
                                    str(stats), "--memory-budget", "48") as (_snap, ctd):
        deadline = time.monotonic() + 30  # the endpoint comes up once the gRPC socket listens
        while (m := _scrape_or_none(port)) is None:
            assert time.monotonic() < deadline, "the metrics endpoint did not come up"
            time.sleep(0.05)
        assert sample(m, "convstore_memory_budget_bytes") == 48 << 20
        run_cli(cli_env, "containerd-load", "app1:latest", "--address", str(ctd.socket))
        r = ctd.ctr("run", "--snapshotter", "convstore", "--rm", "convstore.local/app1:latest", "t0", check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
        deadline = time.monotonic() + 40
        while sample(m := scrape(port), "convstore_start_image_fraction_count") < 1:
            assert time.monotonic() < deadline, "no start record"
            time.sleep(0.2)
        fetched = sample(m, "convstore_fetched_chunks_total", image="app1:latest", tier="origin")
        assert fetched > 0 and sample(m, "convstore_memory_cache_peak_bytes") <= 48 << 20
        deadline = time.monotonic() + 10
        while json.loads(stats.read_text() if stats.exists() else "{}").get("images", {}).get(
                "app1:latest", {}).get("chunks_fetched") != fetched:
            assert time.monotonic() < deadline, stats.read_text() if stats.exists() else "no stats file"
            time.sleep(0.1)
