"""The lazy reader: ImageFS semantics, what gets fetched, faults, FUSE."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci
from treecmp import walk

import convstore
from convstore.reader import FSError, ImageFS
from convstore.reader.fuse import BackgroundMount

BIG = os.urandom(3_000_000)


def layers():
    l0 = make_tar([Entry("a", "dir"), Entry("a/keep", data=b"1"), Entry("a/gone", data=b"2"),
                   Entry("o", "dir"), Entry("o/old", data=b"3"), Entry("big.bin", data=BIG),
                   Entry("usr", "dir"), Entry("usr/bin", "dir"), Entry("bin", "symlink", linkname="usr/bin")])
    l1 = make_tar([Entry("a/.wh.gone"), Entry("o", "dir", mode=0o700), Entry("o/.wh..wh..opq"),
                   Entry("o/new", data=b"6"), Entry("bin/tool", data=b"#!/bin/sh\n", mode=0o755)])
    return [rich_layer(), l0, l1]


@pytest.fixture(params=["kfuse", "libfuse"])
def fuse_backend(request, monkeypatch):
    """Each FUSE test against both servers: the low-level one (the default as root) and libfuse."""
    if request.param == "libfuse":
        monkeypatch.setenv("CONVSTORE_FUSE", "libfuse")
    else:
        monkeypatch.delenv("CONVSTORE_FUSE", raising=False)
    return request.param


@pytest.fixture
def image(tmp_path, store):
    write_oci(str(tmp_path / "src"), layers())
    store.pack(f"oci:{tmp_path / 'src'}", "lazy:1")
    return store


def test_open_reads_no_chunk(image):
    with ImageFS.from_store(image, "lazy:1") as fs:
        assert sorted(fs.listdir("/")) == ["a", "big.bin", "bin", "d", "o", "usr"]
        fs.stat("/big.bin")
        fs.listxattr("/d/xattr")
        assert fs.fetcher.stats.chunks_fetched == 0


def test_merged_view_semantics(image):
    with ImageFS.from_store(image, "lazy:1") as fs:
        assert sorted(fs.listdir("/a")) == ["keep"]
        assert sorted(fs.listdir("/o")) == ["new"]
        assert fs.stat("/o").st_mode & 0o777 == 0o700
        assert fs.readlink("/bin") == "usr/bin"
        assert fs.open("/usr/bin/tool").read() == b"#!/bin/sh\n"
        assert fs.open("/bin/tool").read() == b"#!/bin/sh\n"  # through the symlink
        assert fs.stat("/d/small.txt").st_nlink == 2 and fs.stat("/d/hard").st_ino == fs.stat("/d/small.txt").st_ino
        assert fs.stat("/d/null").st_rdev == os.makedev(1, 3)
        assert fs.getxattr("/d/xattr", "user.test") == b"value"
        assert fs.stat("/d/suid").st_mode & 0o7777 == 0o4755
        with pytest.raises(FSError) as e:
            fs.stat("/a/gone")
        assert e.value.errno == errno.ENOENT


def test_same_tree_as_rootfs_unpack(fuse_backend, image, tmp_path):
    image.unpack_rootfs("lazy:1", str(tmp_path / "root"))
    with ImageFS.from_store(image, "lazy:1") as fs, BackgroundMount(fs, str(tmp_path / "mnt")):
        assert walk(tmp_path / "mnt") == walk(tmp_path / "root")


def test_range_read_fetches_only_covering_chunks(image):
    with ImageFS.from_store(image, "lazy:1") as fs:
        f = fs.open("/big.bin")
        f.seek(2_000_000)
        assert f.raw.read(100) == BIG[2_000_000:2_000_100]
        s = fs.fetcher.stats
        assert s.chunks_fetched == 1 and s.plain_bytes_fetched <= 256 * 1024
        f.seek(0)
        assert f.read() == BIG
        assert fs.fetcher.stats.plain_bytes_fetched < len(BIG) + 2 * 256 * 1024


def test_small_cache_evicts_and_stays_correct(image):
    with ImageFS.from_store(image, "lazy:1", cache_bytes=300_000, readahead=0) as fs:
        for _ in range(2):
            assert fs.open("/big.bin").read() == BIG
        assert fs.fetcher.cache.peak_bytes <= 300_000  # the budget is never exceeded, not even by one chunk
        assert fs.fetcher.stats.chunks_fetched > 2 * (len(BIG) // (256 * 1024))  # refetched after eviction


def test_concurrent_readers_share_fetches(tmp_path, image):
    slow = image.throttled(0.05, 1e9)
    with ImageFS.from_store(slow, "lazy:1", readahead=0) as fs:
        results = []
        ts = [threading.Thread(target=lambda: results.append(fs.open("/big.bin").raw.read(1000))) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert results == [BIG[:1000]] * 8
        assert fs.fetcher.stats.chunks_fetched == 1


def test_slow_store_delays(image):
    slow = image.throttled(0.03, 1e6)
    cid = next(iter(image.chunks.ids()))
    t = time.monotonic()
    n = len(slow.chunks.blob(cid))
    assert time.monotonic() - t >= 0.03 + n / 1e6 * 0.9
    assert slow.link is not None and slow.link.requests == 1 and slow.link.bytes == n


def test_missing_chunk_is_eio_not_a_hang(fuse_backend, image, tmp_path, caplog):
    with ImageFS.from_store(image, "lazy:1") as fs:
        node = fs.lookup("/big.bin")
        layer = fs.manifest.layers[node.layer]
        victim_cid = fs.manifest.chunks[layer.chunks[len(layer.chunks) // 2]].cid
        victim = victim_cid.hex()
        image.chunks.delete([victim_cid])
        with pytest.raises(convstore.ChunkMissing):
            fs.open("/big.bin").read()
        with BackgroundMount(fs, str(tmp_path / "mnt")):
            with pytest.raises(OSError) as e:
                open(tmp_path / "mnt" / "big.bin", "rb").read()
            assert e.value.errno == errno.EIO
            assert (tmp_path / "mnt" / "a" / "keep").read_bytes() == b"1"  # the mount is still up
        assert not os.path.ismount(tmp_path / "mnt")
    assert victim in caplog.text


def test_corrupt_chunk_is_eio(fuse_backend, image, tmp_path):
    with ImageFS.from_store(image, "lazy:1") as fs:
        import bisect

        node = fs.lookup("/big.bin")
        k = bisect.bisect_right(fs.fetcher._starts[node.layer], node.offset) - 1
        cid = fs.manifest.chunks[fs.manifest.layers[node.layer].chunks[k]].cid
        blob = bytearray(image.chunks.blob(cid))
        blob[-3] ^= 0xFF
        image.chunks.delete([cid])
        image.chunks.put(cid, bytes(blob))
        image.chunks.flush()
        with BackgroundMount(fs, str(tmp_path / "mnt")):
            with pytest.raises(OSError) as e:
                open(tmp_path / "mnt" / "big.bin", "rb").read(10)
            assert e.value.errno == errno.EIO


def test_profile_roundtrip_and_mismatch(image, tmp_path):
    e = image.entry("lazy:1")
    image.save_profile(e, [(1, 0), (1, 3)])
    assert image.load_profile(e) == [(1, 0), (1, 3)]
    write_oci(str(tmp_path / "src2"), layers()[:2])
    image.pack(f"oci:{tmp_path / 'src2'}", "lazy:1")  # the tag now names another manifest
    assert image.load_profile(image.entry("lazy:1")) is None
    key = "profiles/" + e.manifest_digest.split(":")[1]
    image.objects.put(key, b"garbage")
    assert image.load_profile(e) is None


def test_cli_ls_cat(image, cli_env, tmp_path):
    p = run_cli(cli_env, "ls", "lazy:1", "/a")
    assert p.stdout.split() == ["keep"]
    p = run_cli(cli_env, "ls", "-l", "lazy:1", "/")
    assert "bin -> usr/bin" in p.stdout
    p = subprocess.run([sys.executable, "-m", "convstore.cli", "cat", "--stats", "lazy:1", "/big.bin"], env=cli_env,
                       capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout == BIG and b"fetched" in p.stderr
    p = run_cli(cli_env, "cat", "lazy:1", "/nope", check=False)
    assert p.returncode == 1 and p.stderr == "convstore: error: lazy:1: /nope: no such file or directory\n"


def test_cli_mount_background_and_sigterm(fuse_backend, image, cli_env, tmp_path):
    cli_env = {**cli_env, "CONVSTORE_FUSE": fuse_backend}  # "kfuse": anything but libfuse
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli(cli_env, "mount", "--background", "lazy:1", str(mnt))
    try:
        assert (mnt / "o" / "new").read_bytes() == b"6"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert not os.path.ismount(mnt)
    p = subprocess.Popen([sys.executable, "-m", "convstore.cli", "mount", "lazy:1", str(mnt)], env=cli_env,
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not os.path.ismount(mnt)
