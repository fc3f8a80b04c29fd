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
import threading
import time
from pathlib import Path

import pytest
from imagebuilder import Entry, make_tar, write_oci

BIG = os.urandom(1_500_000)
NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


# Every convstore process here runs outside the checkout: ``python -m`` in the checkout would import its
# convstore/ instead of the installed one, other code than a daemon started elsewhere runs (and not used)
OUTSIDE = Path(tempfile.gettempdir())


def convstore(env: dict[str, str], *args: str, cwd: Path | None = None, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convstore", *args], env=env, cwd=cwd or OUTSIDE,
                          capture_output=True, timeout=120, **kw)  # type: ignore[call-overload]


def status(env: dict[str, str]) -> dict:
    p = convstore(env, "daemon", "--status")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def start_daemon(folder: Path, extra_env: dict[str, str] | None = None, **kw: object) -> dict[str, str]:
    folder.mkdir(mode=0o700)
    env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock")}
    env.pop("CONVSTORE_STORE", None)
    env.pop("CONVSTORE_KEY", None)
    p = convstore({**env, **(extra_env or {})}, "daemon", "--background", cwd=folder.parent, **kw)
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
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client, cwd=image_dir,
                         stderr=subprocess.PIPE)
    wait_for(lambda: os.path.ismount(mnt) or p.poll() is not None, "the mount")
    assert os.path.ismount(mnt), p.stderr.read() if p.stderr else ""
    assert (mnt / "etc" / "hostname").read_bytes() == b"box\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not os.path.ismount(mnt)
    # a client killed outright: its command gets SIGHUP and ends (libfuse unmounts on it)
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client, cwd=image_dir,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.ismount(mnt), "the second mount")
    p.kill()
    p.wait(timeout=20)
    wait_for(lambda: not os.path.ismount(mnt), "the orphaned command to end")
    wait_for(lambda: status(daemon)["running"] == 0, "the daemon to reap it")
    # a command killed by a signal (libfuse does not catch SIGQUIT) kills its client with the same signal
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client, cwd=image_dir,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.ismount(mnt), "the third mount")
    try:
        p.send_signal(signal.SIGQUIT)
        assert p.wait(timeout=20) == -signal.SIGQUIT
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    # SIGKILL of the command itself (the OOM killer's signal) is reported the same way
    p = subprocess.Popen([sys.executable, "-m", "convstore", "mount", "box:1", str(mnt)], env=client, cwd=image_dir,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.ismount(mnt), "the fourth mount")
    try:
        info = status(daemon)  # the daemon's children: this command, and the spare made for the next one
        pid = info["pid"]
        [command] = set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()) - {str(info["spare"])}
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


def test_a_spare_is_replaced_when_killed_and_deaf_while_idle(daemon, image_dir):
    # the daemon forks each command's process ahead of it: a signal sent to it while it waits is not the
    # next command's, and one killed while idle costs nothing but its place
    info = status(daemon)
    assert info["spare"] is not None
    os.kill(info["spare"], signal.SIGTERM)
    os.kill(info["spare"], signal.SIGINT)
    p = convstore(daemon, "--help", cwd=image_dir)
    assert p.returncode == 0 and b"Usage" in p.stdout, p.stderr
    after = status(daemon)
    assert after["served"] == info["served"] + 1
    os.kill(after["spare"], signal.SIGKILL)
    assert convstore(daemon, "--help", cwd=image_dir).returncode == 0
    last = status(daemon)
    assert last["served"] == after["served"] + 1
    assert last["spare"] not in (None, after["spare"])


def test_a_stopped_spare_is_replaced_not_waited_for(daemon, image_dir):
    # a spare that does not take its command (stopped here; or stuck) is killed after the hand-over's
    # time-out and the command runs in a fresh one: it neither hangs nor "succeeds" without running
    info = status(daemon)
    os.kill(info["spare"], signal.SIGSTOP)
    p = convstore(daemon, "--help", cwd=image_dir)
    assert p.returncode == 0 and b"Usage" in p.stdout, p.stderr
    after = status(daemon)
    assert after["served"] == info["served"] + 1
    assert after["spare"] != info["spare"]
    wait_for(lambda: not Path(f"/proc/{info['spare']}").exists() or
             Path(f"/proc/{info['spare']}/stat").read_text().split()[2] == "Z", "the stopped spare to be killed")


def test_the_daemon_keeps_nothing_its_launcher_gave_it(tmp_path, image_dir):
    # a launcher's pipe held by the daemon, and so by every command it forks, would never see its end
    import select

    r, w = os.pipe()
    try:
        env = start_daemon(tmp_path / "d", pass_fds=(w,))
        os.close(w)
        w = -1
        try:
            assert convstore(env, "--help", cwd=image_dir).returncode == 0
            assert select.select([r], [], [], 30)[0], "the daemon or its spare still holds the launcher's pipe"
            assert os.read(r, 1) == b""
        finally:
            convstore(env, "daemon", "--stop")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _scripted_daemon(folder: Path, script) -> tuple[dict[str, str], threading.Thread]:
    """A socket at ``folder/cli.sock`` answered by ``script(conn)``: a scripted peer that puts the
    client through what the real daemon does only under faults."""
    folder.mkdir(mode=0o700)
    path = folder / "cli.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                script(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(path)}, t


def _read_request(conn: socket.socket) -> None:
    (n,) = struct.unpack("!I", conn.recv(4))
    while n:
        n -= len(conn.recv(n))


def test_a_daemon_that_never_answers_is_not_waited_for(tmp_path, image_dir):
    # it accepts nothing: the client gives up after its hand-shake time-out and runs the command itself
    silent = socket.socket(socket.AF_UNIX)
    (tmp_path / "d").mkdir(mode=0o700)
    silent.bind(str(tmp_path / "d" / "cli.sock"))
    silent.listen(1)
    try:
        env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(tmp_path / "d" / "cli.sock")}
        # and its stdout ends with it: a daemon that never answered was never given the descriptors
        p = convstore(env, "--help", cwd=image_dir)
        assert p.returncode == 0 and b"Usage" in p.stdout, p.stderr
    finally:
        silent.close()


def test_a_signal_sent_while_a_command_falls_back_is_not_lost(tmp_path, image_dir):
    # the daemon accepted, the client committed, the user pressed Ctrl-C, then the daemon could not start
    # the command ("F"): the command runs in the client, and the Ctrl-C is the client's, as it would have been
    committed = threading.Event()

    def script(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"A" + struct.pack("!I", 0))
        assert conn.recv(1) == b"G"
        committed.set()
        assert conn.recv(2) == b"S" + bytes([signal.SIGINT])  # relayed to the daemon
        conn.sendall(b"F" + struct.pack("!I", 11) + b"fork failed")

    env, server = _scripted_daemon(tmp_path / "d", script)
    p = subprocess.Popen([sys.executable, "-m", "convstore", "--help"], env=env, cwd=image_dir,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert committed.wait(60)
        p.send_signal(signal.SIGINT)
        out, _err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    server.join(60)
    assert p.returncode == -signal.SIGINT  # interrupted, as a process of its own would have been
    assert b"Usage" not in out


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
                 "b = b'convstore-daemon\\x002\\x00status\\x00'\n"
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
                  "from convstore.daemon_client import run_via_daemon\n"
                  "print(run_via_daemon(['images']))\n")
        p = subprocess.run([system_python, "-c", client, str(REPO)], capture_output=True, text=True, timeout=60,
                           user=NOBODY, env={"CONVSTORE_DAEMON_SOCKET": str(sock), "PATH": "/usr/bin:/bin"})
        assert (p.returncode, p.stdout.strip()) == (0, "None"), p.stderr
        os.chmod(sock.parent, 0o700)
        assert status(env)["served"] == 0
    finally:
        convstore(env, "daemon", "--stop")
        shutil.rmtree(top, ignore_errors=True)


def test_the_wire_format_is_checked(daemon, image_dir):
    from convstore.daemon_client import encode_request

    sock = daemon["CONVSTORE_DAEMON_SOCKET"]
    # the installed convstore's fingerprint, as a client outside the checkout computes it
    fp = subprocess.run([sys.executable, "-c", "from convstore.daemon_client import fingerprint; "
                         "import sys; sys.stdout.write(fingerprint())"], env=daemon, cwd=image_dir,
                        capture_output=True, text=True, check=True).stdout

    def run(*fields: str) -> bytes:
        return encode_request("run", *fields)

    cases = [  # (body, the reply expected: b"" dropped, F fall back, I status, A accepted)
        (encode_request("status"), b"I"),
        (b"convstore-daemon\x009\x00status\x00", b"F"),  # another version: told so
        (b'{"v": 1, "op": "status"}', b""),  # version 1 was JSON
        (b"convstore-daemon\x002\x00status", b""),  # not NUL-terminated
        (encode_request("reboot"), b""),
        (encode_request("status", "extra"), b""),
        (run("convstore", "0x12", "1", "", fp, "images"), b""),  # umask not decimal
        (run("convstore", "4096", "1", "", fp, "images"), b""),  # umask too large
        (run("convstore", "18", "9", "", fp, "images"), b""),  # more arguments than fields
        (run("convstore", "18", "-1", "", fp), b""),
        (run("convstore", "18", "1", "9", fp, "images"), b""),  # SIGKILL is not a relayed signal
        (run("convstore", "18", "1", "", fp, "images", "NOEQUALS"), b""),
        (run("convstore", "18", "1", "", fp, "images", "=x"), b""),
        (run("convstore", "18", "1", "2,15", "other code", "images", "A=1"), b"F"),  # well-formed: other code
        (run("convstore", "18", "1", "2,15", fp, "--help", "A=1"), b"A"),  # accepted: then G without descriptors
        (b"[" * 200_000, b""),
    ]
    before = status(daemon)["served"]
    for body, expected in cases:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.sendall(struct.pack("!I", len(body)) + body)
            reply = s.recv(100)
            assert reply[:1] == expected, (body[:80], reply)
            if expected == b"A":
                s.sendall(b"G")  # committed, but without its descriptors: nothing runs, and the client is told
                assert s.recv(100)[:1] == b"F"
    after = status(daemon)
    assert (after["served"], after["running"]) == (before, 0)


def test_a_client_with_a_closed_stream_runs_alone(daemon, image_dir):
    # the socket would take the closed descriptor's number and be sent as the command's stdout
    before = status(daemon)["served"]
    p = subprocess.run([sys.executable, "-m", "convstore", "--help"], env=daemon, stderr=subprocess.PIPE, cwd=image_dir,
                       preexec_fn=lambda: os.close(1), timeout=60)
    assert status(daemon)["served"] == before
    assert b"Usage" not in p.stderr
    assert convstore(daemon, "--help", cwd=image_dir).returncode == 0  # with its streams: served
    assert status(daemon)["served"] == before + 1


def _no_new_privs() -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl")


def test_a_confined_client_runs_alone(daemon, image_dir):
    # same uid, but confined (here: no_new_privs, as a sandbox sets it): its command must not run outside
    client = {**daemon, "CONVSTORE_STORE": "store", "CONVSTORE_KEY": "file:keys/master.key"}
    assert convstore({**client, "CONVSTORE_DAEMON": "0"}, "pack", "oci:src", "box:1", cwd=image_dir).returncode == 0
    before = status(daemon)["served"]
    p = subprocess.run([sys.executable, "-m", "convstore", "images"], env=client, cwd=image_dir,
                       capture_output=True, preexec_fn=_no_new_privs, timeout=60)
    assert p.returncode == 0, p.stderr
    assert status(daemon)["served"] == before
    assert convstore(client, "images", cwd=image_dir).returncode == 0  # unconfined: served
    assert status(daemon)["served"] == before + 1
