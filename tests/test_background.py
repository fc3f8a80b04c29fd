"""Fetch scheduling of the lazy reader against a real registry: the
background fetch (everything local after a start, readers first), the
coalesced prefetch of a start-up profile (few requests, counted at the
registry through a proxy), and profiles merged across starts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, write_oci
from netproxy import CountingProxy

import convstore
from convstore.reader import ImageFS
from convstore.reader.fuse import BackgroundMount
from convstore.stores.cache import DiskCache
from convstore.transfer import copy_image

N_FILES = 120


def _data(i: int, size: int = 40_000) -> bytes:
    return hashlib.shake_256(f"file {i}".encode()).digest(size)


@pytest.fixture
def remote(tmp_path: Path, registry, store: convstore.Store) -> str:
    """A registry store holding ``many:1`` (N_FILES files of 40 kB, one 3 MB file): its oci:// URL."""
    entries = [Entry("d", "dir")] + [Entry(f"d/f{i:03d}", data=_data(i)) for i in range(N_FILES)]
    entries.append(Entry("big.bin", data=_data(999, 3_000_000)))
    write_oci(str(tmp_path / "src"), [make_tar(entries)])
    store.pack(f"oci:{tmp_path / 'src'}", "many:1")
    url = f"oci://{registry.host}/bg"
    copy_image(store, convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "c0")), "many:1")
    return url


def _node(url: str, store: convstore.Store, cache: Path) -> convstore.Store:
    return convstore.Store.open(url, store.key, insecure=True, cache_dir=str(cache))


def _local(cache: Path, manifest) -> int:
    """How many of the image's chunks are in the node cache at ``cache``."""
    dc = DiskCache(str(cache))
    return sum(dc.contains("chunk " + c.cid.hex()) for c in manifest.chunks)


def _wait(cond, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_background_fetch_makes_the_whole_image_local_and_off_means_off(tmp_path, remote, store, registry):
    """Two nodes mount the image (real FUSE) and read one file: with the
    background fetch on, every chunk of the image becomes local, and the
    whole tree reads back once the registry fails every request; on the node
    with it off, by the time the first is complete, only what was read is."""
    from convstore.reader.background import BackgroundConfig, start_fetching

    proxy = CountingProxy(registry.host)
    mounts = {}
    try:
        for name, on in (("on", True), ("off", False)):
            url = remote.replace(registry.host, proxy.host) if on else remote
            node = _node(url, store, tmp_path / f"cache-{name}")
            fs = ImageFS.from_store(node, "many:1")
            bg = start_fetching(fs.fetcher, None, BackgroundConfig(enabled=on, batch_bytes=1 << 20), "many:1")
            mnt = tmp_path / f"mnt-{name}"
            m = BackgroundMount(fs, str(mnt)).__enter__()
            mounts[name] = (fs, bg, m)
        manifest = mounts["on"][0].manifest
        total = len({c.cid for c in manifest.chunks})
        for name in mounts:
            assert (tmp_path / f"mnt-{name}" / "d" / "f005").read_bytes() == _data(5)
        assert _wait(lambda: _local(tmp_path / "cache-on", manifest) == total), \
            (mounts["on"][1].progress(), _local(tmp_path / "cache-on", manifest), total)
        assert mounts["on"][1].wait(30) and mounts["on"][1].progress().state == "done", mounts["on"][1].progress()
        p = mounts["on"][1].progress()
        assert p.chunks_local == p.chunks_total == total and p.batches >= 1
        # the off node: only the chunks its reads fetched, and its background fetch says it is off
        assert mounts["off"][1].progress().state == "off"
        off_local = _local(tmp_path / "cache-off", manifest)
        assert 0 < off_local == mounts["off"][0].fetcher.stats.chunks_fetched < total
        # the registry fails every request from now on: the on node reads its whole tree from the node cache
        proxy.fault = lambda method, path: "500"
        for i in range(N_FILES):
            assert (tmp_path / "mnt-on" / "d" / f"f{i:03d}").read_bytes() == _data(i)
        assert (tmp_path / "mnt-on" / "big.bin").read_bytes() == _data(999, 3_000_000)
        assert proxy.faults_injected == 0  # not one request needed
    finally:
        for fs, _bg, m in mounts.values():
            m.__exit__(None, None, None)
            fs.close()
        proxy.stop()


def test_an_on_demand_read_is_served_while_the_background_fetch_still_runs(tmp_path, remote, store):
    """The background fetch is paced to a crawl (64 kB batches at 128 kB/s);
    a reader asking for chunks at the image's far end gets them by itself,
    and the background fetch is still running when the read returns: it did
    not wait behind it (counters, not timing)."""
    from convstore.reader.background import BackgroundConfig, start_fetching

    node = _node(remote, store, tmp_path / "cache")
    with ImageFS.from_store(node, "many:1") as fs:
        bg = start_fetching(fs.fetcher, None, BackgroundConfig(rate=128 << 10, batch_bytes=64 << 10,
                                                               concurrency=1), "many:1")
        assert _wait(lambda: bg.progress().batches >= 1, 30), bg.progress()
        assert fs.open("/big.bin").read() == _data(999, 3_000_000)  # the last file packed
        p = bg.progress()
        assert p.state == "running" and p.chunks_local < p.chunks_total, p
        assert fs.fetcher.stats.chunks_fetched > 0  # the read fetched its own chunks
        bg.stop()
        assert bg.progress().state == "stopped"


def _start(fs: ImageFS, files: list[int]) -> list[tuple[int, int]]:
    """One "start": read ``files`` through the fetcher, recording; what it recorded."""
    fs.fetcher.start_recording()
    for i in files:
        assert fs.open(f"/d/f{i:03d}").read() == _data(i)
    return fs.fetcher.stop_recording()


def test_a_start_with_a_profile_makes_at_most_10_requests(tmp_path, remote, store, registry):
    """The first start reads 60 scattered files and records them; a second
    node, cache empty, prefetches the profile and reads the same files:
    counted at the registry (through a proxy), at most 10 ranged GETs for it
    all; and each fetcher's own request count is what the registry saw."""
    wanted = list(range(0, N_FILES, 2))
    proxy = CountingProxy(registry.host)
    counted = []
    try:
        url = remote.replace(registry.host, proxy.host)
        first = _node(url, store, tmp_path / "cache1")
        with ImageFS.from_store(first, "many:1") as fs:
            proxy.reset()
            recorded = _start(fs, wanted)
            first_gets = proxy.snapshot().get("GET blob", 0)
            assert _wait(lambda: not fs.fetcher._inflight, 30)  # readahead the reads started
            counted.append((_requests(fs), proxy.snapshot().get("GET blob", 0)))
        first.save_profile(first.entry("many:1"), recorded)
        assert first_gets > 10  # without a profile (what the profile saves)
        node = _node(url, store, tmp_path / "cache2")
        with ImageFS.from_store(node, "many:1") as fs:
            profile = node.load_profile(node.entry("many:1"))
            assert profile is not None and sorted(profile) == sorted(recorded)
            proxy.reset()
            fs.fetcher.prefetch_profile(profile)
            for i in wanted:
                assert fs.open(f"/d/f{i:03d}").read() == _data(i)
            blob_gets = proxy.snapshot().get("GET blob", 0)  # when the "container" is ready
            print(f"\nranged GETs: first start {first_gets}, with the profile {blob_gets}")
            assert blob_gets <= 10, (blob_gets, proxy.snapshot())
            assert _wait(lambda: not fs.fetcher._inflight, 30)
            counted.append((_requests(fs), proxy.snapshot().get("GET blob", 0)))
            assert fs.fetcher.stats.profile_chunks == len(profile)
    finally:
        proxy.stop()
    # the fetchers say how many requests they made (a start without a profile too)
    assert [n for n, _ in counted] == [seen for _, seen in counted]


def _requests(fs: ImageFS) -> int | None:
    refresh = getattr(fs.fetcher, "refresh_requests", None)  # (none before the fetcher counted requests)
    return refresh().requests if refresh else None


def test_profiles_merge_across_starts_in_file_order(tmp_path, remote, store):
    """Two starts read different files (the second one files packed earlier):
    the stored profile has both, in file order, and counts two starts."""
    from convstore.reader.profile import save_start

    node = _node(remote, store, tmp_path / "cache")
    e = node.entry("many:1")
    with ImageFS.from_store(node, "many:1") as fs:
        a = _start(fs, [90, 91, 92])
    save_start(node, e, a)
    with ImageFS.from_store(node, "many:1") as fs:
        b = _start(fs, [3, 4])
    save_start(node, e, b)
    chunks, starts = node.manifests.load_profile_record(e)
    assert set(a) | set(b) == set(chunks) and set(a).isdisjoint(b)
    assert chunks == sorted(chunks) and starts == 2
    # a start that reads nothing new stores nothing
    assert save_start(node, e, b) is None


def test_run_merges_what_each_start_reads(tmp_path, store, corpus):
    """``convstore run`` of a corpus image (real FUSE; runc, or chroot) with
    a different command each time: the image's stored profile grows to the
    union of both starts and counts two."""
    if os.geteuid() != 0:
        pytest.fail("convstore run needs root (the CI runs the tests as root)")
    from conftest import CORPUS_DIR
    from convstore.engines.run import run_image

    store.pack(f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
    got = []
    for cmd in (["/bin/cat", "/etc/debian_version"], ["/usr/bin/python3", "-c", "pass"]):
        r = run_image(store, "app1:latest", cmd, stdout=subprocess.DEVNULL)
        assert r.exit_code == 0, r
        got.append(store.load_profile(store.entry("app1:latest")))
    first, second = got
    assert first and second and set(first) < set(second), (len(first or []), len(second or []))
    assert second == sorted(second)  # file order
    assert store.manifests.load_profile_record(store.entry("app1:latest"))[1] == 2  # two starts merged


def test_background_fetch_settings_are_checked_in_one_line(tmp_path, cli_env):
    env = dict(cli_env, CONVSTORE_BACKGROUND_FETCH="sometimes")
    mnt = tmp_path / "m"
    mnt.mkdir()
    p = run_cli(env, "mount", "x:1", str(mnt), check=False)
    assert p.returncode == 1 and p.stderr == \
        "convstore: error: CONVSTORE_BACKGROUND_FETCH='sometimes': use on or off\n", p.stderr
    p = run_cli(cli_env, "layerstore", "--background-rate", "fast", str(mnt), check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "fast" in p.stderr, p.stderr


class _LyingRanges:
    """A transport in front of the real registry that lies in its answers to
    multi-range reads only: ``how`` is "flip" (one byte of the first part's
    data changed, lengths kept), "whole" (the Range header ignored: 200 and
    the whole blob) or "short" (the last part cut short)."""

    def __init__(self, how: str) -> None:
        import requests.adapters

        self.how = how
        self.lies = 0
        self.inner = requests.adapters.HTTPAdapter()

    def __call__(self):  # the adapter the client mounts
        import io

        import requests.adapters

        outer = self

        class Adapter(requests.adapters.BaseAdapter):
            def send(self, request, **kw):
                rng = request.headers.get("Range", "")
                multi = "," in rng
                if multi and outer.how == "whole":
                    del request.headers["Range"]
                r = outer.inner.send(request, **kw)
                if not multi or r.status_code not in (200, 206):
                    return r
                body = r.raw.read()
                outer.lies += 1
                if outer.how == "flip":
                    at = body.index(b"\r\n\r\n") + 4  # the first part's first data byte
                    body = body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :]
                elif outer.how == "short":
                    end = body.rindex(b"\r\n--")
                    body = body[: end - 5] + body[end:]
                r.raw = io.BytesIO(body)
                r.headers["Content-Length"] = str(len(body))
                return r

            def close(self):
                outer.inner.close()

        return Adapter()


@pytest.mark.parametrize("how", ["flip", "whole", "short"])
def test_a_registry_lying_in_multi_range_answers_never_gets_wrong_bytes_served(tmp_path, remote, store, how):
    """A profile prefetch reads several ranges of a pack with one multi-range
    GET; a registry that answers it with altered bytes, the whole blob or a
    cut part never gets them served: the chunks are authenticated and read
    again one range at a time."""
    from convstore.core.repository import Repository
    from convstore.stores.cache import CachedChunkStore, CachedStore
    from convstore.stores.registry import open_registry

    liar = _LyingRanges(how)
    cache = DiskCache(str(tmp_path / "cache"))
    meta, chunks = open_registry(remote, insecure=True, index_dir=str(tmp_path / "cache" / "index"),
                                 transport=liar())
    node = Repository(CachedStore(meta, cache), store.key, chunk_store=CachedChunkStore(chunks, cache),
                      state_dir=str(tmp_path / "state"))
    wanted = [0, 40, 80, 119]  # 1.6 MB apart: four ranges of one pack
    m = store.manifest("many:1")
    layer = m.layers[0]
    # the chunks of those files, as a profile names them
    with ImageFS.from_store(store, "many:1") as fs:
        recorded = _start(fs, wanted)
    with ImageFS.from_store(node, "many:1") as fs:
        fs.fetcher.prefetch_profile(recorded, parallel=1)
        for i in wanted:
            assert fs.open(f"/d/f{i:03d}").read() == _data(i)
    assert liar.lies >= 1 and len(layer.chunks) > len(recorded)
    if how == "flip":
        assert chunks.multi_range  # an answer of the right shape: the bad chunk is caught by its tag
    else:
        assert not chunks.multi_range  # refused once: one range a request from then on


@pytest.mark.corpus
def test_a_podman_start_with_a_profile_makes_at_most_10_chunk_requests(tmp_path, cli_env, corpus):
    """podman runs app1 from the layer store, the convstore store in a real
    registry behind a counting proxy.  The first start (no profile) says how
    many requests it made; a second node with an empty cache, the profile
    merged from the first, reads its chunks with at most 10 requests before
    the container has run."""
    import json
    import sys

    from conftest import CORPUS_DIR, need_tool
    from engine_fixtures import podman, podman_config, remove_podman_root
    from kms_fixtures import Registry

    need_tool("skopeo")
    need_tool("podman")
    reg = Registry(tmp_path / "registry")
    proxy = CountingProxy(reg.host)
    proxy.log = []
    src = f"oci:{CORPUS_DIR / 'app1'}:latest"
    try:
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{reg.host}/app1:latest"],
                       check=True, timeout=300)
        run_cli(cli_env, "pack", src, "app1:latest")
        run_cli(cli_env, "--insecure", "push", "app1:latest", f"oci://{reg.host}/cs")
        ref = f"{proxy.host}/app1:latest"
        env = dict(cli_env, CONVSTORE_BACKGROUND_FETCH="off")  # what the start itself needs, alone
        chunk_gets = []
        for n in (1, 2):
            mnt, root, stats = tmp_path / f"als{n}", tmp_path / f"podman{n}", tmp_path / f"stats{n}.json"
            mnt.mkdir()
            run_cli(env, "--insecure", "--store", f"oci://{proxy.host}/cs", "--cache", str(tmp_path / f"c{n}"),
                    "layerstore", "--background", str(mnt), "--stats-file", str(stats))
            penv = podman_config(root, mnt)
            try:
                proxy.log.clear()
                podman(penv, "pull", "-q", "--tls-verify=false", ref)
                assert podman(penv, "run", "--rm", ref).stdout.strip() == "hello"
                chunk_gets.append([e for e in proxy.log if e[1] == "GET" and "/v2/cs/blobs/" in e[2] and e[3]])
            finally:
                remove_podman_root(penv, root)
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            # the layer store saves the merged profile as it exits
            deadline = time.monotonic() + 30
            while subprocess.run(["pgrep", "-f", f"layerstore.*{mnt}"], capture_output=True).returncode == 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            doc = json.loads(stats.read_text())["images"]["app1:latest"]
            if n == 1:  # the layer store says how many requests it made (all of them, up to its exit)
                made = [e for e in proxy.log if e[1] == "GET" and "/v2/cs/blobs/" in e[2] and e[3]]
                assert doc.get("requests") == len(made), (doc, len(made))
        first, second = (len(g) for g in chunk_gets)
        print(f"\nranged GETs of chunks before ready: first start {first}, with the profile {second} "
              f"({sum(e[5] for e in chunk_gets[1]) / 1e6:.1f} MB)", file=sys.stderr)
        assert second <= 10, [(e[3][:60], e[5]) for e in chunk_gets[1]]
    finally:
        proxy.stop()
        reg.stop()
