"""The low-level FUSE server (convstore.reader.kfuse) and its failover (convstore.reader.fdholder), on real FUSE."""

from __future__ import annotations

import array
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import write_oci
from test_reader import BIG, image, layers  # noqa: F401 - image: the fixture
from treecmp import walk

from convstore.errors import FuseSessionError
from convstore.reader import ImageFS, fdholder, kfuse
from convstore.reader.fuse import BackgroundMount

pytestmark = pytest.mark.skipif(not kfuse.available(), reason="the low-level server mounts as root only")



@pytest.fixture
def sessions(monkeypatch):
    """The holders' sockets: a short private path (a unix socket's path is at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="kfuse-", dir="/tmp")
    monkeypatch.setenv("CONVSTORE_FUSE_SESSIONS", d)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _serve_in_background(env: dict[str, str], *args: str) -> int:
    """``convstore ARGS --background ...`` (a mount or a layer store); the pid of the server it left."""
    p = run_cli(env, *args)
    found = re.search(r"\(pid (\d+)\)", p.stdout)
    assert found, p.stdout
    return int(found.group(1))


def _kill_9(pid: int, what: str = "the server") -> None:
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not _alive(pid), f"{what} to die")


def _read_in_thread(f, size: int = -1, daemon: bool = False) -> tuple[threading.Thread, list[bytes | BaseException]]:
    """A started thread reading ``size`` bytes of ``f`` (the rest if -1; it blocks while nobody serves
    the mount); the list it puts what it read, or its error, in."""
    got: list[bytes | BaseException] = []

    def read() -> None:
        try:
            got.append(f.read(size))
        except BaseException as e:
            got.append(e)

    reader = threading.Thread(target=read, daemon=daemon)
    reader.start()
    return reader, got


def test_low_level_server_serves_the_image(image, tmp_path, sessions):
    """The same tree as an unpack, through the kernel-protocol server (not libfuse), with its warm-read
    choices: no OPEN reaches the server after the first (no_open), and nodeids are the image's inodes."""
    image.unpack_rootfs("lazy:1", str(tmp_path / "root"))
    with ImageFS.from_store(image, "lazy:1") as fs, BackgroundMount(fs, str(tmp_path / "mnt")) as m:
        assert m.server is not None  # served by kfuse
        assert walk(tmp_path / "mnt") == walk(tmp_path / "root")
        for _ in range(3):
            assert (tmp_path / "mnt" / "o" / "new").read_bytes() == b"6"
        assert m.server.ops.get(kfuse.OPEN, 0) <= 1 and m.server.ops.get(kfuse.OPENDIR, 0) <= 1
        assert os.stat(tmp_path / "mnt" / "a" / "keep").st_ino == fs.lookup("/a/keep").ino
        assert os.statvfs(tmp_path / "mnt").f_files == fs.inodes + 1
        with pytest.raises(OSError) as e:
            open(tmp_path / "mnt" / "a" / "new-file", "w")
        assert e.value.errno == errno.EROFS
    assert not os.path.ismount(tmp_path / "mnt")


def test_kill_9_and_successor_keep_readers(image, cli_env, tmp_path, sessions):
    """Issue 23 §3: a reader with an open file and a process whose cwd is in the mount keep working
    across ``kill -9`` of the server and the start of its successor (the same public entry point)."""
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = _serve_in_background(env, "mount", "--background", "lazy:1", str(mnt))
    sh = subprocess.Popen(["sh", "-c", "read x; cat keep; echo; read x; ls"], cwd=mnt / "a", stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    try:
        # the first close on a connection asks the server for FLUSH (answered ENOSYS: never again); done
        # here, else the successor's own start (a fork of this process closing its fds) would wait for it
        assert (mnt / "a" / "keep").read_bytes() == b"1"
        f = open(mnt / "big.bin", "rb", buffering=0)
        assert f.read(1000) == BIG[:1000]
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")

        _kill_9(pid)
        # the read blocks while nobody serves (and fails at once with ENOTCONN without a holder)
        reader, got = _read_in_thread(f)
        run_cli(env, "mount", "--background", "lazy:1", str(mnt))  # the successor
        reader.join(60)
        assert not reader.is_alive()
        assert got and not isinstance(got[0], BaseException), got
        assert got[0] == BIG[1000:]
        assert (mnt / "o" / "new").read_bytes() == b"6"  # a new lookup
        assert sh.stdin is not None and sh.stdout is not None
        sh.stdin.write("\n\n")
        sh.stdin.close()
        assert sh.stdout.read().split() == ["1", "keep"]  # cat and ls in the cwd it had before the kill
        assert sh.wait(20) == 0
        f.close()
    finally:
        sh.kill()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    _wait_for(lambda: not fdholder.held(str(mnt)), "the holder to let go after the unmount")


def test_successor_for_another_image_is_refused(image, cli_env, tmp_path, sessions):
    """A successor serving another manifest would answer the kernel's nodeids with other files: refused."""
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    write_oci(str(tmp_path / "src2"), layers()[:2])
    image.pack(f"oci:{tmp_path / 'src2'}", "other:1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = _serve_in_background(env, "mount", "--background", "lazy:1", str(mnt))
    try:
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
        _kill_9(pid)
        p = run_cli(env, "mount", "other:1", str(mnt), check=False)
        assert p.returncode == 1 and "is still served for image manifest" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1  # one line, no traceback
        p = run_cli(env, "mount", "--background", "other:1", str(mnt), check=False)  # waits for the takeover
        assert p.returncode == 1 and "is still served for image manifest" in p.stderr, p.stderr
        run_cli(env, "mount", "--background", "lazy:1", str(mnt))
        assert (mnt / "a" / "keep").read_bytes() == b"1"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_holder_refuses_a_stranger(image, tmp_path, sessions):
    """The fd is the filesystem (whoever has it answers every read): even with its socket left open to
    everyone, the holder hands it only to a peer of its own uid (SO_PEERCRED); a stranger gets nothing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ImageFS.from_store(image, "lazy:1") as fs:
        server = kfuse.start(fs, str(mnt), hold=True, ref="lazy:1")
        try:
            _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
            path = fdholder.socket_path(str(mnt))
            os.chmod(sessions, 0o777)  # a misconfigured directory: the peer check must still hold
            os.chmod(path, 0o777)
            r, w = os.pipe()
            child = os.fork()
            if child == 0:  # the stranger: uid nobody asks for the fd
                os.close(r)
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(10)
                    s.connect(path)
                    fds = array.array("i")
                    try:
                        s.sendall(b'{"op": "get"}\n')
                        msg, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(fds.itemsize))
                    except (ConnectionResetError, BrokenPipeError):  # closed on it, its request unread
                        msg, anc = b"", []
                    n = sum(len(d) // fds.itemsize for lvl, kind, d in anc if kind == socket.SCM_RIGHTS)
                    os.write(w, json.dumps({"fds": n, "msg": msg.decode(errors="replace")}).encode())
                except BaseException as e:
                    os.write(w, json.dumps({"error": repr(e)}).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as rf:
                report = json.loads(rf.read())
            os.waitpid(child, 0)
            assert report == {"fds": 0, "msg": ""}, report  # connected, and got neither fd nor state
            taken = fdholder.take(str(mnt))  # the owner still can
            assert taken is not None and taken[1]["ref"] == "lazy:1"
            assert stat.S_ISCHR(os.fstat(taken[0]).st_mode)
            os.close(taken[0])
        finally:
            kfuse.umount(str(mnt), lazy=True)
            server.wait(10)
            os.close(server.fd)
    _wait_for(lambda: not fdholder.held(str(mnt)), "the holder to let go after the unmount")


def test_unreadable_holder_state_is_a_clear_error(tmp_path, sessions):
    """A holder socket answering garbage (no fd) is refused by name, never served."""
    mnt = tmp_path / "mnt"
    path = fdholder.socket_path(str(mnt))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def liar() -> None:
        c, _ = srv.accept()
        c.recv(100)
        c.sendall(b'{"version": 1, "manifest_digest": "sha256:00"}')
        c.close()

    t = threading.Thread(target=liar)
    t.start()
    with pytest.raises(FuseSessionError, match="refused to hand over"):
        fdholder.take(str(mnt))
    t.join()
    srv.close()


def test_sigterm_unmounts_and_ends_the_session(image, cli_env, tmp_path, sessions):
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "convstore.cli", "mount", "lazy:1", str(mnt)], env=env,
                         stderr=subprocess.PIPE)

    def up() -> bool:
        assert p.poll() is None, p.stderr.read() if p.stderr else p.returncode
        return fdholder.held(str(mnt))

    _wait_for(up, "the holder")
    assert (mnt / "a" / "keep").read_bytes() == b"1"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not os.path.ismount(mnt)
    _wait_for(lambda: not fdholder.held(str(mnt)), "the holder to let go")


def test_layer_store_kill_9_and_successor(image, cli_env, tmp_path, sessions):
    """The layer store (path callbacks, PathServer): a file of a layer open across kill -9 and a
    successor `convstore layerstore`; the successor knows the kernel's nodeids from the holder's journal."""
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    mnt = tmp_path / "layers"
    mnt.mkdir()
    _, manifest = image.open_image("lazy:1")
    diff = mnt / "eA==" / manifest.layers[1].digest / "diff"  # any base64 image name; the layer with big.bin
    pid = _serve_in_background(env, "layerstore", "--background", str(mnt))
    try:
        assert (diff / "a" / "keep").read_bytes() == b"1"  # and the connection's first FLUSH is answered
        f = open(diff / "big.bin", "rb", buffering=0)
        assert f.read(1000) == BIG[:1000]
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
        _kill_9(pid)
        reader, got = _read_in_thread(f)
        run_cli(env, "layerstore", "--background", str(mnt))  # the successor
        reader.join(60)
        assert not reader.is_alive()
        assert got and got[0] == BIG[1000:], got
        assert (diff / "o" / "old").read_bytes() == b"3"  # a new lookup
        assert (diff / "a" / "keep").read_bytes() == b"1"  # a node the predecessor gave out
        f.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_no_successor_within_the_grace_period_ends_the_session(image, cli_env, tmp_path, sessions):
    """Failover must not turn a dead server into readers blocked for ever: with no successor within
    $CONVSTORE_FUSE_FAILOVER_GRACE the holder lets go and readers fail (ENOTCONN), as without failover."""
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions), "CONVSTORE_FUSE_FAILOVER_GRACE": "1"}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = _serve_in_background(env, "mount", "--background", "lazy:1", str(mnt))
    try:
        assert (mnt / "a" / "keep").read_bytes() == b"1"
        f = open(mnt / "big.bin", "rb", buffering=0)
        assert f.read(1000) == BIG[:1000]
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
        os.kill(pid, signal.SIGKILL)
        reader, got = _read_in_thread(f, daemon=True)
        reader.join(30)
        assert not reader.is_alive(), "the reader still waits for a server that will never come"
        assert isinstance(got[0], OSError) and got[0].errno == errno.ENOTCONN, got
        assert not fdholder.held(str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


_LAYER_MOUNT = """
import sys, threading, convstore
from convstore.engines.layerstore import LayerMount, LayerStore
store = convstore.Store.open(sys.argv[1], sys.argv[2])
with LayerMount(LayerStore(store), sys.argv[3]):
    print("up", flush=True)
    threading.Event().wait()
"""


def test_snapshotter_layer_mount_survives_its_process(image, keyfile, tmp_path, sessions):
    """The snapshotter serves its layers through LayerMount (in its own process): a restarted process
    takes the held session over, and a layer file open across the kill -9 reads on."""
    mnt = tmp_path / "layers"
    _, manifest = image.open_image("lazy:1")
    diff = mnt / "Y29udGFpbmVyZA==" / manifest.layers[1].digest / "diff"
    args = [sys.executable, "-c", _LAYER_MOUNT, str(tmp_path / "store"), f"file:{keyfile}", str(mnt)]
    env = {**os.environ, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    successor = None
    try:
        assert first.stdout is not None and first.stdout.readline() == "up\n"
        assert (diff / "a" / "keep").read_bytes() == b"1"
        f = open(diff / "big.bin", "rb", buffering=0)
        assert f.read(1000) == BIG[:1000]
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
        first.kill()
        first.wait(20)
        successor = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
        assert successor.stdout is not None and successor.stdout.readline() == "up\n"
        assert f.read() == BIG[1000:]
        assert (diff / "o" / "old").read_bytes() == b"3"
        f.close()
    finally:
        for p in (first, successor):
            if p is not None:
                p.kill()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.corpus
def test_podman_container_survives_a_layer_store_kill_9(tmp_path, cli_env, sessions, corpus):
    """Issue 23 §3 with a real engine: a podman container running on the layer store keeps reading
    files it had not read yet across `kill -9` of `convstore layerstore` and the start of its successor."""
    from conftest import CORPUS_DIR, need_tool
    from engine_fixtures import podman, podman_config, remove_podman_root
    from kms_fixtures import Registry

    need_tool("skopeo")
    need_tool("podman")
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    reg = Registry(tmp_path / "registry")
    podman_root = tmp_path / "podman"
    mnt = tmp_path / "als"
    mnt.mkdir()
    ctr = None
    try:
        src = f"oci:{CORPUS_DIR / 'app1'}:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{reg.host}/app1:latest"],
                       check=True, timeout=300)
        run_cli(env, "pack", src, "app1:latest")
        pid = _serve_in_background(env, "layerstore", "--background", str(mnt))
        penv = {**os.environ, **podman_config(podman_root, mnt)}
        ref = f"{reg.host}/app1:latest"
        podman(penv, "pull", "-q", "--tls-verify=false", ref)
        ctr = subprocess.Popen([shutil.which("podman") or "podman", "run", "-i", "--rm", ref, "sh", "-c",
                                "echo started; read x; ls /usr/lib | wc -l; head -1 /etc/os-release"],
                               env=penv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        assert ctr.stdout is not None and ctr.stdin is not None
        assert ctr.stdout.readline() == "started\n"
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
        _kill_9(pid, "the layer store")
        run_cli(env, "layerstore", "--background", str(mnt))  # the successor
        out, err = ctr.communicate("\n", timeout=120)
        assert ctr.returncode == 0, err
        count, first = out.split("\n", 1)
        assert int(count) > 10 and first.startswith("PRETTY_NAME="), (out, err)
    finally:
        if ctr is not None and ctr.poll() is None:
            ctr.kill()
        remove_podman_root(podman_config(podman_root, mnt), podman_root)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        reg.stop()


@pytest.mark.corpus
def test_containerd_container_survives_a_snapshotter_kill_9(tmp_path, cli_env, sessions, corpus):
    """The same with containerd: `kill -9` of `convstore snapshotter` under a running container, a new
    snapshotter on the same ROOT takes the layers' session over, the container reads on."""
    from conftest import CORPUS_DIR, need_tool
    from engine_fixtures import Containerd, start_snapshotter, unmount_below

    need_tool("containerd")
    need_tool("ctr")
    env = {**cli_env, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    run_cli(env, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
    snap_sock = tmp_path / "run" / "snapshotter.sock"
    snap = start_snapshotter(env, tmp_path / "snapshots", snap_sock)
    ctd = ctr = None
    try:
        ctd = Containerd(tmp_path / "containerd", snap_sock)
        run_cli(env, "containerd-load", "app1:latest", "--address", str(ctd.socket))
        ctr = subprocess.Popen(["ctr", "-a", str(ctd.socket), "run", "--snapshotter", "convstore", "--rm",
                                "convstore.local/app1:latest", "t-failover", "sh", "-c",
                                "echo started; read x; ls /usr/lib | wc -l; head -1 /etc/os-release"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert ctr.stdout is not None
        assert ctr.stdout.readline() == "started\n"
        _wait_for(lambda: fdholder.held(str(tmp_path / "snapshots" / "layers")), "the holder")
        snap.kill()
        snap.wait(20)
        snap_sock.unlink()
        snap = start_snapshotter(env, tmp_path / "snapshots", snap_sock)  # the successor
        out, err = ctr.communicate("\n", timeout=120)
        assert ctr.returncode == 0, err
        count, first = out.split("\n", 1)
        assert int(count) > 10 and first.startswith("PRETTY_NAME="), (out, err)
    finally:
        if ctr is not None and ctr.poll() is None:
            ctr.kill()
        if ctd is not None:
            ctd.stop()
        snap.terminate()
        snap.wait(timeout=30)
        unmount_below(tmp_path)


def test_a_holder_socket_planted_by_a_stranger_is_refused(tmp_path, sessions):
    """The other direction: a successor asks only a holder of its own uid.  A stranger who could plant a
    socket (a sessions directory open to everyone) would get the image served into a FUSE connection of
    theirs; the successor refuses it by SO_PEERCRED (and anything handed over that is not /dev/fuse)."""
    os.chmod(sessions, 0o1777)
    mnt = tmp_path / "mnt"
    path = fdholder.socket_path(str(mnt))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the stranger's fake holder: hands over a pipe as the "session"
        try:
            os.setgid(65534)
            os.setuid(65534)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            srv.listen(1)
            os.write(w, b"up")
            c, _ = srv.accept()
            c.recv(100)
            c.sendmsg([b'{"version": 1, "init": {}}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                        array.array("i", [r]).tobytes())])
            c.close()
        finally:
            os._exit(0)
    try:
        assert os.read(r, 2) == b"up"
        with pytest.raises(FuseSessionError, match="belongs to uid 65534"):
            fdholder.take(str(mnt))
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(r)
        os.close(w)


_STALLING_SERVER = """
import sys, threading, convstore
from convstore.reader import ImageFS, kfuse
store = convstore.Store.open(sys.argv[1], sys.argv[2])
fs = ImageFS.from_store(store, "lazy:1")
if sys.argv[4] == "stall":  # a read of the big file never finishes: the kill comes while it is in flight
    read = fs.read_node
    def stall(n, offset, size):
        if n.size < 1_000_000:
            return read(n, offset, size)
        print("fetching", flush=True)
        threading.Event().wait()
    fs.read_node = stall
kfuse.start(fs, sys.argv[3], hold=True, ref="lazy:1")
print("up", flush=True)
threading.Event().wait()
"""


def test_a_read_in_flight_at_the_kill_is_resent_to_the_successor(image, keyfile, tmp_path, sessions):
    """The request the killed server had taken (and never answered) is not lost: the successor asks the
    kernel to queue it again (FUSE_NOTIFY_RESEND) and answers it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "CONVSTORE_FUSE_SESSIONS": str(sessions)}
    cmd = [sys.executable, "-c", _STALLING_SERVER, str(tmp_path / "store"), f"file:{keyfile}", str(mnt)]
    first = subprocess.Popen([*cmd, "stall"], env=env, stdout=subprocess.PIPE, text=True)
    successor = None
    try:
        assert first.stdout is not None and first.stdout.readline() == "up\n"
        assert (mnt / "a" / "keep").read_bytes() == b"1"  # the first FLUSH answered (see above)
        _wait_for(lambda: fdholder.held(str(mnt)), "the holder")
        f = open(mnt / "big.bin", "rb", buffering=0)
        reader, got = _read_in_thread(f, 100, daemon=True)
        assert first.stdout.readline() == "fetching\n"  # the server holds the request
        first.kill()
        first.wait(20)
        successor = subprocess.Popen([*cmd, "serve"], env=env, stdout=subprocess.PIPE, text=True)
        assert successor.stdout is not None and successor.stdout.readline() == "up\n"
        reader.join(30)
        assert not reader.is_alive(), "the request taken by the killed server was never answered"
        assert got == [BIG[:100]]
        f.close()
    finally:
        for p in (first, successor):
            if p is not None:
                p.kill()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
