"""Issue 23 §2 and §7: a node that works offline from its cache, reads that fail within a deadline
against a dead or stalled registry and recover by themselves, registry errors told apart, and
$CONVSTORE_STORE taking every form --store does.  Real docker-registry on 127.0.0.1, real FUSE,
podman and containerd."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPUS_DIR, need_tool, run_cli
from engine_fixtures import Containerd, podman, podman_config, remove_podman_root, unmount_below
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.errors import (RegistryAuthError, RegistryHTTPError, RegistryPlainHTTP, RegistryTimeout,
                              RegistryUnavailable, RegistryUnreachable, TamperedObject)
from convstore.oci.registry_client import RegistryClient
from convstore.reader import ImageFS
from convstore.transfer import copy_image

DEADLINE = 2.0  # --read-deadline of these tests
# what a failed read may take past the deadline: one retry's backoff, the FUSE round trip, a loaded machine
SLACK = 3.0


def small_image(tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    files = {f"f{i}": os.urandom(200_000) for i in range(12)}
    write_oci(str(tmp_path / "img"), [rich_layer(), make_tar([Entry(k, data=v) for k, v in files.items()])])
    return f"oci:{tmp_path / 'img'}", files


@pytest.fixture
def remote(tmp_path, registry, store):
    """Image a:1 (and b:1, other content) in a registry store; the node's CLI options for it."""
    src, files = small_image(tmp_path)
    store.pack(src, "a:1")
    (tmp_path / "img2").mkdir()
    write_oci(str(tmp_path / "img2"), [make_tar([Entry("f0", data=b"the other image\n")])])
    store.pack(f"oci:{tmp_path / 'img2'}", "b:1")
    url = f"oci://{registry.host}/node"
    dst = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "c0"))
    copy_image(store, dst, "a:1")
    copy_image(store, dst, "b:1")
    args = ["--insecure", "--store", url, "--cache", str(tmp_path / "cache"), "--read-deadline", str(DEADLINE)]
    yield registry, url, args, files
    if registry.proc is not None:
        os.kill(registry.proc.pid, signal.SIGCONT)  # a stalled registry is resumed before it is stopped


def fault(registry, how: str) -> None:
    if how == "stop":
        registry.stop()
    else:
        os.kill(registry.proc.pid, signal.SIGSTOP)


def heal(registry, how: str) -> None:
    if how == "stop":
        registry.start()
    else:
        os.kill(registry.proc.pid, signal.SIGCONT)


def timed_read(path: Path, limit: float) -> tuple[bytes | int, float]:
    """(contents, or the errno) and seconds, read by a child process killed at ``limit`` s (a read
    that blocks on a stalled registry must not hang the test)."""
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", "import sys,os\ntry:\n sys.stdout.buffer.write(open(sys.argv[1],'rb')"
                          ".read())\nexcept OSError as e:\n sys.exit(100+e.errno)", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, _ = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"a read of {path.name} still blocked after {limit:.0f} s")
    return (out if p.returncode == 0 else p.returncode - 100), time.monotonic() - t


def cat(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "convstore.cli", *args], env=env, capture_output=True, timeout=120)


@pytest.mark.parametrize("how", ["stop", "stall"])
def test_a_mount_fails_uncached_reads_within_the_deadline_and_recovers_without_a_restart(
        tmp_path, remote, cli_env, how):
    registry, url, args, files = remote
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    with open(log, "wb") as lf:
        # no background fetch: the uncached files must stay uncached until the registry goes away
        p = subprocess.Popen([sys.executable, "-m", "convstore.cli", *args, "mount", "--no-background-fetch", "a:1",
                              str(mnt)], env=cli_env, stdout=lf, stderr=lf)
    try:
        end = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert p.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        assert (mnt / "f0").read_bytes() == files["f0"]
        fault(registry, how)
        # (f0's readahead fetched the chunks after it: far ones are read)
        for name in ("f9", "f11"):  # the first read spends the deadline, the next fails at once
            got, took = timed_read(mnt / name, 60)
            assert got == errno.EIO and took < DEADLINE + SLACK, (name, got, took)
        text = log.read_text()
        assert any(registry.host in ln and "image a:1" in ln and "/f9" in ln for ln in text.splitlines()), text
        heal(registry, how)
        end = time.monotonic() + 30  # it asks again by itself every few seconds
        while True:
            got, took = timed_read(mnt / "f9", 60)
            if got != errno.EIO or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert got == files["f9"]  # the same mount, once the registry answers again
        assert "answers again" in log.read_text()
    finally:
        heal(registry, how) if how == "stall" else None
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        p.wait(timeout=30)


@pytest.mark.parametrize("how", ["stop", "stall"])
def test_reads_fail_within_the_deadline_counted_and_the_catalog_is_served_from_the_node_cache(
        tmp_path, remote, store, how):
    registry, url, _args, files = remote
    node = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "cache"),
                                read_deadline=DEADLINE)
    with ImageFS.from_store(node, "a:1") as fs:
        assert fs.open("f0").read() == files["f0"]
    client = node.objects.remote.client
    fault(registry, how)
    t = time.monotonic()
    with ImageFS.from_store(node, "a:1") as fs:  # the catalog entry: the node cache's copy
        opened = time.monotonic() - t
        assert fs.open("f0").read() == files["f0"]  # a cached chunk
        t = time.monotonic()
        with pytest.raises(RegistryUnavailable) as e:
            fs.open("f9").read()
        took = time.monotonic() - t
    assert opened < DEADLINE + SLACK and took < DEADLINE + SLACK, (opened, took)
    assert isinstance(e.value, RegistryTimeout if how == "stall" else RegistryUnreachable), e.value
    assert registry.host in str(e.value)
    c = client.counters
    assert (c.timeouts if how == "stall" else c.unreachable) >= 1 and c.fast_failures >= 1, c
    assert node.objects.offline_reads >= 1 and node.objects.counters()["fast_failures"] == c.fast_failures
    heal(registry, how)
    end = time.monotonic() + 30
    while True:
        try:
            with ImageFS.from_store(node, "a:1") as fs:
                assert fs.open("f9").read() == files["f9"]
            break
        except RegistryUnavailable:
            assert time.monotonic() < end
            time.sleep(0.2)
    assert client.counters.recoveries >= 1


def test_cat_and_ls_of_cached_content_work_offline_within_the_age_limit_and_a_swapped_copy_is_refused(
        tmp_path, remote, cli_env):
    registry, url, args, files = remote
    assert cat(cli_env, *args, "cat", "a:1", "/f0").stdout == files["f0"]
    run_cli(cli_env, *args, "ls", "a:1", "/")
    run_cli(cli_env, *args, "ls", "b:1", "/")
    registry.stop()
    p = cat(cli_env, *args, "cat", "a:1", "/f0")
    assert p.returncode == 0 and p.stdout == files["f0"], p.stderr
    assert "f0" in run_cli(cli_env, *args, "ls", "a:1", "/").stdout
    p = run_cli(cli_env, *args, "cat", "a:1", "/f9", check=False)
    last = p.stderr.splitlines()[-1]  # (after the log lines naming the registry and the chunk)
    assert p.returncode == 1 and last.startswith(f"convstore: error: cannot reach the registry at {registry.host}") \
        and "Traceback" not in p.stderr, p.stderr
    # no offline mode: the registry's absence is the error, as before
    p = run_cli(cli_env, *args, "--offline-max-age", "0", "ls", "a:1", "/", check=False)
    assert p.returncode == 1 and f"cannot reach the registry at {registry.host}" in p.stderr, p.stderr
    copies = {}
    for f in (tmp_path / "cache" / "last").iterdir():
        head, _, body = f.read_bytes().partition(b"\n")
        copies[json.loads(head)["name"]] = (f, json.loads(head), body)
    # a copy older than the limit is not served
    f, head, body = copies["refs/a:1"]
    f.write_bytes(json.dumps(dict(head, at=time.time() - 7200)).encode() + b"\n" + body)
    p = run_cli(cli_env, *args, "--offline-max-age", "1h", "ls", "a:1", "/", check=False)
    assert p.returncode == 1 and "past the offline limit of 3600 s" in p.stderr, p.stderr
    # a liar with write access to the node cache swaps a:1's copy for b:1's: refused, never b's content
    fb, hb, bb = copies["refs/b:1"]
    f.write_bytes(json.dumps(dict(hb, name="refs/a:1")).encode() + b"\n" + bb)
    p = run_cli(cli_env, *args, "cat", "a:1", "/f0", check=False)
    assert p.returncode == 1 and "fails authentication" in p.stderr and p.stdout != "the other image\n", p.stderr


@pytest.mark.corpus
def test_services_start_with_the_registry_down_and_podman_runs_the_cached_image(tmp_path, registry, cli_env,
                                                                                corpus):
    need_tool("skopeo")
    need_tool("podman")
    need_tool("containerd")
    image = "base"
    src = f"oci:{CORPUS_DIR / image}:latest"
    ref = f"{registry.host}/{image}:latest"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{ref}"], check=True,
                   timeout=300)
    url = f"oci://{registry.host}/node"
    args = ["--insecure", "--store", url, "--cache", str(tmp_path / "cache"), "--read-deadline", str(DEADLINE)]
    run_cli(cli_env, *args, "pack", src, f"{image}:latest")  # straight into the registry store
    mnt = tmp_path / "als"
    mnt.mkdir()
    podman_root = tmp_path / "podman"
    env = podman_config(podman_root, mnt)
    snap = ctd = None
    try:
        run_cli(cli_env, *args, "layerstore", "--background", str(mnt))
        podman(env, "pull", "-q", "--tls-verify=false", ref)
        r = podman(env, "run", "--rm", ref)
        assert r.stdout.strip() == "hello", r.stderr  # the node cache now holds what a start reads
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        registry.stop()
        # the layer store starts from the node cache, and podman starts the image it pulled before
        t = time.monotonic()
        p = run_cli(cli_env, *args, "layerstore", "--background", str(mnt))
        assert time.monotonic() - t < 60, p.stderr
        r = podman(env, "run", "--rm", ref, check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
        # so does the containerd snapshotter (its layers come from the same node cache)
        sock = tmp_path / "run" / "snap.sock"
        with open(tmp_path / "snap.log", "wb") as log:
            snap = subprocess.Popen([sys.executable, "-m", "convstore", *args, "snapshotter",
                                     str(tmp_path / "snapshots"), "--socket", str(sock)], env=cli_env,
                                    stdout=log, stderr=log)
        end = time.monotonic() + 60
        while not sock.exists():
            assert snap.poll() is None and time.monotonic() < end, (tmp_path / "snap.log").read_text()
            time.sleep(0.1)
        # containerd-load reads the catalog offline, and containerd starts the image on the snapshotter
        ctd = Containerd(tmp_path / "containerd", sock)
        out = run_cli(cli_env, *args, "containerd-load", f"{image}:latest", "--address", str(ctd.socket)).stdout
        assert f"convstore.local/{image}:latest" in out
        r = ctd.ctr("run", "--snapshotter", "convstore", "--rm", f"convstore.local/{image}:latest", "t0", check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
    finally:
        if ctd is not None:
            ctd.stop()
        if snap is not None:
            snap.terminate()
            snap.wait(timeout=30)
        remove_podman_root(env, podman_root)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        unmount_below(tmp_path)


def test_registry_errors_are_told_apart_by_class_and_message(tmp_path, registry, auth_registry):
    from convstore.errors import RegistryServerError
    from netproxy import CountingProxy

    def fails(client: RegistryClient, cls: type, words: str) -> None:
        with pytest.raises(cls) as e:
            client.tags("x")
        assert words in str(e.value) and "\n" not in str(e.value), e.value

    fails(RegistryClient(registry.host), RegistryPlainHTTP, f"the registry at {registry.host} speaks plain HTTP; "
                                                            f"use --insecure")
    fails(RegistryClient(auth_registry.host, insecure=True), RegistryAuthError, "requires credentials")
    fails(RegistryClient(auth_registry.host, insecure=True, username="alice", password="wrong"), RegistryAuthError,
          "refused the credentials")
    with pytest.raises(RegistryHTTPError) as e:
        RegistryClient(registry.host, insecure=True).put_manifest("x", "t", b"not a manifest")
    assert e.value.status == 400 and "HTTP 400" in str(e.value), e.value
    assert not isinstance(e.value, RegistryUnavailable)  # the registry answered: no offline fallback
    proxy = CountingProxy(registry.host)
    try:
        proxy.fault = lambda m, p: "500"
        fails(RegistryClient(proxy.host, insecure=True, deadline=DEADLINE), RegistryServerError, "HTTP 500")
        assert issubclass(RegistryServerError, RegistryUnavailable)  # served offline, like a dead registry
    finally:
        proxy.stop()
    registry.stop()
    fails(RegistryClient(registry.host, insecure=True), RegistryUnreachable, "cannot reach the registry at")
    fails(RegistryClient(registry.host), RegistryUnreachable, "cannot reach the registry at")  # down: not "TLS"


def test_convstore_store_takes_a_registry_and_says_insecure_for_plain_http(tmp_path, registry, cli_env):
    src, files = small_image(tmp_path)
    env = dict(cli_env, CONVSTORE_STORE=f"oci://{registry.host}/envstore")
    cache = ["--cache", str(tmp_path / "cache")]
    p = run_cli(env, *cache, "images", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == \
        f"convstore: error: the registry at {registry.host} speaks plain HTTP; use --insecure", p.stderr
    p = subprocess.run([sys.executable, "-m", "convstore.cli", "--insecure", *cache, "pack", src, "e:1"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not any(f.name.startswith("oci") for f in tmp_path.iterdir())  # no local folder named oci:
    tags = json.loads(subprocess.run(["curl", "-s", f"http://{registry.host}/v2/envstore/tags/list"],
                                     capture_output=True, text=True, check=True).stdout)["tags"]
    assert any(t.startswith("r-") for t in tags)  # the catalog entry is in the registry
    other = convstore.Store.open(f"oci://{registry.host}/envstore", cli_env["CONVSTORE_KEY"], insecure=True,
                                 cache_dir=str(tmp_path / "c2"))
    with ImageFS.from_store(other, "e:1") as fs:
        assert fs.open("f3").read() == files["f3"]
