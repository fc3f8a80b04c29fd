"""``convstore daemon``: a command forked from the resident process behaves as
its own process would (files, cwd, environment, output, exit status,
signals), is refused across users, and is not used when the code differs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from imagebuilder import Entry, make_tar, write_oci

BIG = os.urandom(1_500_000)
NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


def convstore(env: dict[str, str], *args: str, cwd: Path | None = None, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convstore", *args], env=env, cwd=cwd, capture_output=True,
                          timeout=120, **kw)  # type: ignore[call-overload]


def status(env: dict[str, str]) -> dict:
    p = convstore(env, "daemon", "--status")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def start_daemon(folder: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    folder.mkdir(mode=0o700)
    env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock")}
    env.pop("CONVSTORE_STORE", None)
    env.pop("CONVSTORE_KEY", None)
    p = convstore({**env, **(extra_env or {})}, "daemon", "--background", cwd=folder.parent)
    assert p.returncode == 0, p.stderr
    assert b"listening on" in p.stdout
    return env


@pytest.fixture
def daemon(tmp_path: Path):
    env = start_daemon(tmp_path / "daemon")
    yield env
    convstore(env, "daemon", "--stop")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A work directory with a small OCI layout at ``src``, and the client's store settings in the environment."""
    work = tmp_path / "work"
    work.mkdir()
    write_oci(str(work / "src"), [make_tar([Entry("etc", "dir"), Entry("etc/hostname", data=b"box\n"),
                                            Entry("big.bin", data=BIG)])])
    return work


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_command_runs_in_the_daemon_as_in_its_own_process(daemon, image_dir):
    # relative paths are the client's, and so is the environment (the daemon was started without a store)
    client = {**daemon, "CONVSTORE_STORE": "store", "CONVSTORE_KEY": "file:keys/master.key"}
    before = status(daemon)["served"]
    p = convstore(client, "pack", "oci:src", "box:1", cwd=image_dir)
    assert p.returncode == 0, p.stderr
    assert b"packed box:1" in p.stdout
    assert (image_dir / "store").is_dir() and (image_dir / "keys" / "master.key").is_file()
    assert status(daemon)["served"] == before + 1
    # the same output, binary included, and the same failures, as a process of its own gives
    alone = {**client, "CONVSTORE_DAEMON": "0"}
    for args in (["cat", "box:1", "/big.bin"], ["ls", "box:1", "/etc"], ["images"],
                 ["cat", "box:1", "/nope"], ["unpack", "nope:1", "oci:out"], ["pack"], ["no-such-command"]):
        via, own = convstore(client, *args, cwd=image_dir), convstore(alone, *args, cwd=image_dir)
        assert (via.returncode, via.stdout, via.stderr) == (own.returncode, own.stdout, own.stderr), args
    assert convstore(client, "cat", "box:1", "/big.bin", cwd=image_dir).stdout == BIG
    assert convstore(client, "cat", "box:1", "/nope", cwd=image_dir).returncode == 1
    assert convstore(client, "pack", cwd=image_dir).returncode == 2
    assert status(daemon)["served"] == before + 1 + 7 + 3
    assert not (image_dir / "out").exists()


def test_signals_reach_the_command_and_a_vanished_client_ends_it(daemon, image_dir):
    client = {**daemon, "CONVSTORE_STORE": str(image_dir / "store"),
              "CONVSTORE_KEY": f"file:{image_dir / 'keys' / 'master.key'}"}
    assert convstore(client, "pack", "oci:src", "box:1", cwd=image_dir).returncode == 0
    mnt = image_dir / "mnt"
    mnt.mkdir()
    # SIGTERM to the client is relayed: the foreground mount unmounts and exits 0, as it does alone
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client,
                         stderr=subprocess.PIPE)
    wait_for(lambda: os.path.ismount(mnt) or p.poll() is not None, "the mount")
    assert os.path.ismount(mnt), p.stderr.read() if p.stderr else ""
    assert (mnt / "etc" / "hostname").read_bytes() == b"box\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not os.path.ismount(mnt)
    # a client killed outright: its command gets SIGHUP and ends (libfuse unmounts on it)
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.ismount(mnt), "the second mount")
    p.kill()
    p.wait(timeout=20)
    wait_for(lambda: not os.path.ismount(mnt), "the orphaned command to end")
    wait_for(lambda: status(daemon)["running"] == 0, "the daemon to reap it")
    # a command killed by a signal (libfuse does not catch SIGQUIT) kills its client with the same signal
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.ismount(mnt), "the third mount")
    try:
        p.send_signal(signal.SIGQUIT)
        assert p.wait(timeout=20) == -signal.SIGQUIT
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    # SIGKILL of the command itself (the OOM killer's signal) is reported the same way
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.ismount(mnt), "the fourth mount")
    try:
        pid = status(daemon)["pid"]
        [command] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        os.kill(int(command), signal.SIGKILL)
        assert p.wait(timeout=20) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=20)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_other_code_is_not_used(tmp_path, image_dir):
    # a daemon running another copy of convstore (an upgrade, an edit) answers, and the client runs alone
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "convstore", copy / "convstore",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = start_daemon(tmp_path / "other", {"PYTHONPATH": str(copy)})
    try:
        client = {**env, "CONVSTORE_STORE": "store", "CONVSTORE_KEY": "file:keys/master.key"}
        p = convstore(client, "pack", "oci:src", "box:1", cwd=image_dir)
        assert p.returncode == 0, p.stderr
        info = status(env)
        assert (info["code"], info["served"]) == (str(copy / "convstore"), 0)
    finally:
        convstore(env, "daemon", "--stop")


def test_one_daemon_per_socket_and_stop_removes_it(daemon):
    p = convstore(daemon, "daemon", "--background")
    assert p.returncode == 1 and b"already listens" in p.stderr and p.stderr.count(b"\n") == 1
    sock = Path(daemon["CONVSTORE_DAEMON_SOCKET"])
    assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert convstore(daemon, "daemon", "--stop").returncode == 0
    wait_for(lambda: not sock.exists(), "the socket to go")
    p = convstore(daemon, "daemon", "--status")
    assert p.returncode == 1 and b"no convstore daemon" in p.stderr
    assert convstore(daemon, "--help").returncode == 0  # no daemon: the command runs alone


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused():
    # the venv's interpreter may sit in root's home: the other user runs the system's python3 on the stdlib-only
    # client module, through a socket path every user can reach
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.fail("no system python3 for the other user's side of this test")
    top = Path(tempfile.mkdtemp(prefix="convstore-daemon-test-", dir="/tmp"))
    env = start_daemon(top / "d")
    sock = top / "d" / "cli.sock"
    try:
        # even where others can reach the socket, the daemon answers no other uid (SO_PEERCRED)
        for path, mode in ((top, 0o755), (sock.parent, 0o755), (sock, 0o666)):
            os.chmod(path, mode)
        probe = ("import socket, struct, sys\n"
                 "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                 "b = b'{\"v\": 1, \"op\": \"status\"}'\n"
                 "try:\n"
                 "    s.sendall(struct.pack('!I', len(b)) + b)\n"
                 "    print(len(s.recv(100)))\n"
                 "except (ConnectionResetError, BrokenPipeError):\n"
                 "    print(0)\n")
        p = subprocess.run([system_python, "-c", probe, str(sock)], capture_output=True, text=True, timeout=60,
                           user=NOBODY)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "0"  # closed without a word
        # and a client does not hand its descriptors to another user's socket: it runs the command itself
        client = ("import sys; sys.path.insert(0, sys.argv[1])\n"
                  "from convstore.daemon import run_via_daemon\n"
                  "print(run_via_daemon(['images']))\n")
        p = subprocess.run([system_python, "-c", client, str(REPO)], capture_output=True, text=True, timeout=60,
                           user=NOBODY, env={"CONVSTORE_DAEMON_SOCKET": str(sock), "PATH": "/usr/bin:/bin"})
        assert (p.returncode, p.stdout.strip()) == (0, "None"), p.stderr
        os.chmod(sock.parent, 0o700)
        assert status(env)["served"] == 0
    finally:
        convstore(env, "daemon", "--stop")
        shutil.rmtree(top, ignore_errors=True)


def test_the_wire_format_is_checked(daemon):
    sock = daemon["CONVSTORE_DAEMON_SOCKET"]
    for body in (b'{"v": 2, "op": "status"}', b"not json", b'{"v": 1, "op": "run", "argv": "x"}', b"[" * 200_000):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.sendall(struct.pack("!I", len(body)) + body)
            reply = s.recv(100)
            assert reply == b"" or reply[:1] == b"F", reply  # refused, or told to run the command itself
    assert status(daemon)["running"] == 0


def test_a_client_with_a_closed_stream_runs_alone(daemon, image_dir):
    # the socket would take the closed descriptor's number and be sent as the command's stdout
    before = status(daemon)["served"]
    p = subprocess.run([sys.executable, "-m", "convstore", "--help"], env=daemon, stderr=subprocess.PIPE,
                       preexec_fn=lambda: os.close(1), timeout=60)
    assert status(daemon)["served"] == before
    assert b"Usage" not in p.stderr


def _no_new_privs() -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl")


def test_a_confined_client_runs_alone(daemon, image_dir):
    # same uid, but confined (here: no_new_privs, as a sandbox sets it): its command must not run outside
    before = status(daemon)["served"]
    client = {**daemon, "CONVSTORE_STORE": "store", "CONVSTORE_KEY": "file:keys/master.key"}
    p = subprocess.run([sys.executable, "-m", "convstore", "images"], env=client, cwd=image_dir,
                       capture_output=True, preexec_fn=_no_new_privs, timeout=60)
    assert p.returncode == 0, p.stderr
    assert status(daemon)["served"] == before
    assert convstore(client, "images", cwd=image_dir).returncode == 0  # unconfined: served
    assert status(daemon)["served"] == before + 1
