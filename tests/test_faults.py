"""Faults on real components: a misbehaving registry (behind a fault-injecting
proxy on 127.0.0.1), a full disk (a small tmpfs), a key provider that goes
away mid-run (moto's KMS server stopped, a SoftHSM2 token removed), and a
FUSE mount whose process is killed."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci
from netproxy import CountingProxy

import convstore
from convstore.errors import ConvstoreError
from convstore.reader import ImageFS
from convstore.transfer import copy_image


def small_image(tmp_path: Path, name: str = "a") -> str:
    files = [Entry(f"f{i}", data=os.urandom(70_000)) for i in range(6)]
    write_oci(str(tmp_path / name), [rich_layer(), make_tar(files)])
    return f"oci:{tmp_path / name}"


@pytest.fixture
def served(tmp_path, registry, store):
    """An image in a registry store, and a proxy in front of the registry."""
    store.pack(small_image(tmp_path), "a:1")
    copy_image(store, convstore.Store.open(f"oci://{registry.host}/f", store.key, insecure=True,
                                           cache_dir=str(tmp_path / "c0")), "a:1")
    proxy = CountingProxy(registry.host)
    yield store, proxy, f"oci://{proxy.host}/f"
    proxy.stop()


def worker(store, url, tmp_path, name="w", timeout=60.0):
    return convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / name), timeout=timeout)


def expected(store, path="f3"):
    with ImageFS.from_store(store, "a:1") as fs:
        return fs.open(path).read()


@pytest.mark.parametrize("fault", ["500", "reset"])
def test_a_registry_that_fails_a_few_times_is_retried_and_one_that_keeps_failing_is_one_clear_error(
        tmp_path, served, fault):
    store, proxy, url = served
    want = expected(store)
    left = [2]

    def flaky(method, path):
        if "/blobs/" in path and left[0] > 0:
            left[0] -= 1
            return fault
        return None

    proxy.fault = flaky
    with ImageFS.from_store(worker(store, url, tmp_path, "w1"), "a:1") as fs:
        assert fs.open("f3").read() == want  # two failures, then the same bytes
    assert proxy.faults_injected == 2
    proxy.fault = lambda m, p: fault if "/blobs/" in p else None
    t = time.monotonic()
    with pytest.raises(ConvstoreError) as e:
        with ImageFS.from_store(worker(store, url, tmp_path, "w2"), "a:1") as fs:
            fs.open("f3").read()
    assert time.monotonic() - t < 20  # bounded: 4 attempts with backoff
    msg = str(e.value)
    assert ("HTTP 500" in msg if fault == "500" else "cannot reach the registry" in msg) and "\n" not in msg


def test_a_stalled_registry_is_an_error_after_the_timeout_not_a_hang(tmp_path, served):
    store, proxy, url = served
    proxy.stall_s = 3.0
    proxy.fault = lambda m, p: "stall" if "/manifests/" in p else None
    t = time.monotonic()
    with pytest.raises(ConvstoreError, match="did not answer within 0.5 s"):
        worker(store, url, tmp_path, timeout=0.5).entry("a:1")
    assert time.monotonic() - t < 15


def test_wrong_bytes_for_a_ranged_read_are_never_served(tmp_path, served):
    store, proxy, url = served
    want = expected(store)
    w = worker(store, url, tmp_path)
    with ImageFS.from_store(w, "a:1") as fs:  # the manifest is cached now; chunks are not
        pass
    once = [True]

    def corrupt_once(method, path):
        if method == "GET" and "/blobs/" in path and once[0]:
            once[0] = False
            return "corrupt"
        return None

    proxy.fault = corrupt_once
    with ImageFS.from_store(w, "a:1") as fs:
        assert fs.open("f3").read() == want  # the bad copy was read again, transparently
    proxy.fault = lambda m, p: "corrupt" if m == "GET" and "/blobs/" in p else None
    w2 = worker(store, url, tmp_path, "w2")
    proxy.fault = None
    with ImageFS.from_store(w2, "a:1") as fs:
        pass  # manifest cached
    proxy.fault = lambda m, p: "corrupt" if m == "GET" and "/blobs/" in p else None
    with pytest.raises((convstore.CorruptObject, convstore.ChunkMissing)) as e:
        with ImageFS.from_store(w2, "a:1") as fs:
            fs.open("f2").read()  # never the wrong bytes: an error naming the chunk
    assert "chunk" in str(e.value) and "\n" not in str(e.value)


def test_a_fuse_mount_stays_up_through_registry_faults(tmp_path, served, cli_env):
    store, proxy, url = served
    want = expected(store, "f4")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--insecure", "--store", url, "--cache", str(tmp_path / "fc"), "--timeout", "2"]
    # (no background fetch: the reads below must still go to the registry)
    run_cli(cli_env, *args, "mount", "--background", "--no-background-fetch", "a:1", str(mnt))
    try:
        proxy.fault = lambda m, p: "500" if "/blobs/" in p else None
        with pytest.raises(OSError) as e:
            (mnt / "f4").read_bytes()
        assert e.value.errno == errno.EIO
        proxy.fault = lambda m, p: "corrupt" if m == "GET" and "/blobs/" in p else None
        with pytest.raises(OSError):
            (mnt / "f4").read_bytes()
        proxy.fault = None
        assert (mnt / "f4").read_bytes() == want  # the same mount, once the registry behaves
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


def test_a_killed_mount_is_recovered_by_the_next_mount(tmp_path, store, cli_env):
    # as root the session outlives its server for a successor (tests/test_kfuse.py); with no successor
    # within the grace period it dies as a libfuse mount does, and this is that case
    cli_env = {**cli_env, "CONVSTORE_FUSE_FAILOVER_GRACE": "1",
               "CONVSTORE_FUSE_SESSIONS": tempfile.mkdtemp(prefix="kfuse-", dir="/tmp")}
    store.pack(small_image(tmp_path), "a:1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = run_cli(cli_env, "mount", "--background", "a:1", str(mnt)).stdout
    pid = int(out.split("(pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.statvfs(mnt)
        except OSError as e:
            assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        assert time.monotonic() < deadline, "the mount did not die"
        time.sleep(0.05)
    try:
        run_cli(cli_env, "mount", "--background", "a:1", str(mnt))  # no manual fusermount -u
        assert (mnt / "f1").read_bytes() == expected(store, "f1")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(d)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the fault tests need root): {p.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_fails_the_pack_cleanly_and_gives_the_space_back(tmp_path, keyfile, small_disk):
    s = convstore.Store.open(str(small_disk / "store"), f"file:{keyfile}")
    s.pack(small_image(tmp_path, "small"), "small:1")
    used_before = shutil.disk_usage(small_disk).used
    big = [Entry(f"big{i}", data=os.urandom(1 << 20)) for i in range(6)]  # 6 MiB, incompressible
    write_oci(str(tmp_path / "big"), [make_tar(big)], compression="none")
    with pytest.raises(ConvstoreError) as e:
        s.pack(f"oci:{tmp_path / 'big'}", "big:1")
    assert "No space left" in str(e.value) and "\n" not in str(e.value)
    assert [str(x.ref) for x in s.images()] == ["small:1"]  # nothing half-visible
    assert shutil.disk_usage(small_disk).used <= used_before + 64 * 1024  # the aborted pack's space is back
    assert s.verify().clean
    s.pack(small_image(tmp_path, "other"), "other:1")  # and the store is usable
    assert sorted(str(x.ref) for x in s.images()) == ["other:1", "small:1"]
    p = run_cli({**os.environ, "CONVSTORE_STORE": str(small_disk / "store"), "CONVSTORE_KEY": f"file:{keyfile}"},
                "pack", f"oci:{tmp_path / 'big'}", "big:2", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "No space left" in p.stderr


def test_a_kms_that_goes_away_keeps_cached_keys_for_their_lifetime_and_fails_new_unwraps_in_one_line(tmp_path):
    from kms_fixtures import MotoKMS

    saved = dict(os.environ)
    kms = MotoKMS()  # (it sets the AWS_* and CONVSTORE_KMS_ENDPOINT variables: restored below)
    try:
        spec = kms.new_key()
        s = convstore.Store.open(str(tmp_path / "s"), spec, kms_endpoint=kms.endpoint, key_cache_ttl=300)
        s.pack(small_image(tmp_path, "a"), "a:1")
        s.pack(small_image(tmp_path, "b"), "b:1")
        reader = convstore.Store.open(str(tmp_path / "s"), spec, kms_endpoint=kms.endpoint, key_cache_ttl=300)
        a = expected(reader)
    finally:
        kms.stop()
        os.environ.clear()
        os.environ.update(saved)
    assert expected(reader) == a  # a's data key is cached: reads go on
    with pytest.raises(ConvstoreError) as e:
        reader.manifest("b:1")  # a new unwrap needs the KMS
    assert "\n" not in str(e.value) and "KMS" in str(e.value)


def test_a_removed_hsm_token_keeps_cached_keys_and_fails_new_unwraps_in_one_line(tmp_path):
    from kms_fixtures import SoftHSM

    saved = dict(os.environ)
    try:
        hsm = SoftHSM(tmp_path / "hsm")  # (it sets SOFTHSM2_CONF in os.environ: restored below)
        spec = hsm.add_key("k1")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for n in ("a", "b"):
        small_image(tmp_path, n)
    # all in a child: a PKCS#11 module is initialized once per process, with the token directory it saw
    code = (
        "import sys, shutil, convstore\n"
        "from convstore.reader import ImageFS\n"
        "s = convstore.Store.open(sys.argv[1], sys.argv[2], key_cache_ttl=300)\n"
        "s.pack('oci:' + sys.argv[4] + '/a', 'a:1'); s.pack('oci:' + sys.argv[4] + '/b', 'b:1')\n"
        "r = convstore.Store.open(sys.argv[1], sys.argv[2], key_cache_ttl=300)\n"
        "def read(ref):\n"
        "    with ImageFS.from_store(r, ref) as fs: return fs.open('f1').read()\n"
        "a = read('a:1')\n"
        "shutil.rmtree(sys.argv[3])\n"  # the token is gone (its files removed)
        "assert read('a:1') == a\n"
        "try:\n"
        "    r.manifest('b:1')\n"
        "except convstore.ConvstoreError as e:\n"
        "    print('ERR', type(e).__name__, str(e).replace(chr(10), '|'))\n"
        "else:\n"
        "    print('READ')\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), spec, str(tmp_path / "hsm" / "tokens"),
                        str(tmp_path)], capture_output=True, text=True, env=dict(os.environ, **hsm.env), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ERR "), p.stdout
    assert "|" not in p.stdout
