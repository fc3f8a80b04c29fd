"""``convstore daemon``: a command forked from the resident process behaves as
its own process would (files, cwd, environment, output, exit status,
signals), is refused across users, and is not used when the code differs."""

from __future__ import annotations

import contextlib
import json
import os
import resource
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
    work.mkdir(mode=0o700)  # mounts made for every user need a private parent
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
                  "from convstore.daemon.client import run_via_daemon\n"
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
    from convstore.daemon.protocol import encode_request

    sock = daemon["CONVSTORE_DAEMON_SOCKET"]
    # the installed convstore's fingerprint, as a client outside the checkout computes it
    fp = subprocess.run([sys.executable, "-c", "from convstore.daemon.protocol import fingerprint; "
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


# ---------------------------------------------------------------- a command never has more than its client had


@contextlib.contextmanager
def blocked_command(env: dict[str, str], cwd: Path, preexec_fn=None):
    """A command the daemon runs, blocked reading the registry password from its stdin: yields
    (its client, the command's pid)."""
    before = status(env)
    p = subprocess.Popen([sys.executable, "-m", "convstore", "--password-stdin", "pull", "oci://127.0.0.1:9/none",
                          "box:1"], cwd=cwd, env={**env, "CONVSTORE_STORE": "store"}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    try:
        wait_for(lambda: status(env)["served"] == before["served"] + 1 or p.poll() is not None, "the command")
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        info = status(env)
        [command] = set(Path(f"/proc/{info['pid']}/task/{info['pid']}/children").read_text().split()) - {
            str(info["spare"])}
        yield p, int(command)
    finally:
        p.communicate(b"\n", timeout=60)


def _limits(pid: int) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


def test_the_clients_resource_limits_bind_its_command(daemon, image_dir):
    client = {**daemon, "CONVSTORE_STORE": "store", "CONVSTORE_KEY": "file:keys/master.key"}
    assert convstore(client, "pack", "oci:src", "box:1", cwd=image_dir).returncode == 0

    def small_files() -> None:  # ulimit -f 64
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    # a command writing more than its client may fails in the daemon as it does alone (EFBIG), file cut short
    results = {}
    for name, env in (("alone", {**client, "CONVSTORE_DAEMON": "0"}), ("daemon", client)):
        before = status(daemon)["served"]
        with open(image_dir / f"{name}.out", "wb") as out:
            p = subprocess.run([sys.executable, "-m", "convstore", "cat", "box:1", "/big.bin"], env=env,
                               cwd=image_dir, stdout=out, stderr=subprocess.PIPE, preexec_fn=small_files, timeout=120)
        results[name] = (p.returncode, (image_dir / f"{name}.out").stat().st_size, p.stderr)
        assert status(daemon)["served"] == before + (name == "daemon")
    assert results["alone"][0] == 1 and results["alone"][1] <= 65536, results["alone"]
    assert results["daemon"] == results["alone"]

    # every limit (ulimit -n -v -c -t -u ...), soft and hard, is the client's in its command
    def limited() -> None:
        for res, lim in ((resource.RLIMIT_NOFILE, (512, 900)), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_AS, (8 << 30, 8 << 30)), (resource.RLIMIT_CPU, (3000, 3600)),
                         (resource.RLIMIT_NPROC, (5000, 6000)), (resource.RLIMIT_STACK, (4 << 20, 64 << 20)),
                         (resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20)), (resource.RLIMIT_MSGQUEUE, (4096, 8192))):
            resource.setrlimit(res, lim)

    with blocked_command(daemon, image_dir, limited) as (p, command):
        assert _limits(command) == _limits(p.pid)
        assert _limits(command) != _limits(status(daemon)["pid"])


def test_no_secret_of_the_daemons_launcher_reaches_its_commands(tmp_path, image_dir):
    # what the daemon was started with stays readable in /proc/PID/environ of every process it forks
    secrets = {"CONVSTORE_PKCS11_PIN": "4711-pin-secret", "FOO_TOKEN": "0815-token-secret"}
    env = start_daemon(tmp_path / "d", secrets)
    try:
        info = status(env)
        with blocked_command(env, image_dir) as (_p, command):
            for pid in (info["pid"], info["spare"], command):
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                assert not any(v in environ for v in (b"4711-pin", b"0815-token", b"PKCS11", b"FOO_TOKEN")), pid
                assert b"PATH=" in environ  # what it keeps
    finally:
        convstore(env, "daemon", "--stop")


def test_no_secret_on_the_daemons_command_line_reaches_its_commands(tmp_path, image_dir):
    # global options before `daemon` (a key URI with its PIN, a registry user) mean nothing to the daemon, but its
    # command line is every forked process's /proc/PID/cmdline, and what it re-executes itself with
    folder = tmp_path / "d"
    folder.mkdir(mode=0o700)
    env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock")}
    p = convstore(env, "--username", "alice-0815", "--key",
                  "pkcs11:token=t;object=o?module-path=/none.so&pin-value=4711-pin-secret", "daemon", "-b",
                  cwd=tmp_path)
    assert p.returncode == 0 and b"listening on" in p.stdout, p.stderr
    try:
        info = status(env)
        with blocked_command(env, image_dir) as (_p, command):
            for pid in (info["pid"], info["spare"], command):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert b"4711-pin" not in cmdline and b"alice-0815" not in cmdline, (pid, cmdline)
                assert cmdline.split(b"\0")[-3:] == [b"daemon", b"--background", b""], cmdline
    finally:
        convstore(env, "daemon", "--stop")


def test_a_daemon_started_as_the_cli_module_keeps_no_secret_either(tmp_path, image_dir):
    # `python -m convstore.cli daemon` (as the tests run the command line) is convstore's own process too
    folder = tmp_path / "d"
    folder.mkdir(mode=0o700)
    env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock")}
    p = subprocess.run([sys.executable, "-m", "convstore.cli", "daemon", "-b"], cwd=tmp_path, capture_output=True,
                       env={**env, "CONVSTORE_PKCS11_PIN": "4711-pin-secret"}, timeout=120)
    assert p.returncode == 0 and b"listening on" in p.stdout, p.stderr
    try:
        info = status(env)
        with blocked_command(env, image_dir) as (_p, command):
            for pid in (info["pid"], info["spare"], command):
                assert b"4711-pin" not in Path(f"/proc/{pid}/environ").read_bytes(), pid
    finally:
        convstore(env, "daemon", "--stop")


def test_an_edited_dependency_retires_the_daemon(tmp_path, image_dir):
    # a copy of a dependency the daemon loads (platformdirs, preloaded), first on the path of both ends
    import platformdirs

    deps = tmp_path / "deps"
    shutil.copytree(Path(platformdirs.__file__).parent, deps / "platformdirs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = start_daemon(tmp_path / "d", {"PYTHONPATH": str(deps)})
    env["PYTHONPATH"] = str(deps)
    try:
        before = status(env)["served"]
        assert convstore(env, "--help", cwd=image_dir).returncode == 0
        assert status(env)["served"] == before + 1
        # patched in place (its directory, on sys.path, keeps its mtime): the daemon's copy is stale now
        with open(deps / "platformdirs" / "__init__.py", "a") as f:
            f.write("\n# patched\n")
        old = status(env)["pid"]
        p = convstore(env, "--help", cwd=image_dir)
        assert p.returncode == 0 and b"Usage" in p.stdout, p.stderr
        # the command ran in its client (the stale daemon served nothing more), and the daemon started again:
        # the next command is served by a process that loaded the patched file
        wait_for(lambda: not Path(f"/proc/{old}").exists() or Path(f"/proc/{old}/stat").read_text().split()[2] == "Z",
                 "the stale daemon to exit")

        def restarted() -> bool:
            p = convstore(env, "daemon", "--status")
            return p.returncode == 0 and json.loads(p.stdout)["pid"] != old

        wait_for(restarted, "the daemon to start again", timeout=60)
        info = status(env)
        assert info["served"] == 0
        assert convstore(env, "--help", cwd=image_dir).returncode == 0
        assert status(env)["served"] == 1
    finally:
        convstore(env, "daemon", "--stop")


def test_a_trickling_client_holds_up_no_other(daemon, image_dir):
    before = status(daemon)["served"]
    with socket.socket(socket.AF_UNIX) as staller:
        staller.connect(daemon["CONVSTORE_DAEMON_SOCKET"])
        staller.sendall(b"\0")  # one byte of a request's length, then nothing
        p = convstore(daemon, "--help", cwd=image_dir)
        # the staller is still connected, its request still pending: the command did not wait it out
        staller.setblocking(False)
        with pytest.raises(BlockingIOError):
            staller.recv(1)
    assert p.returncode == 0 and b"Usage" in p.stdout, p.stderr
    # and it ran in the daemon, not in its client after a hand-shake that timed out
    assert status(daemon)["served"] == before + 1


# the process that connects hands the connection to its child and exits; the child sends the request
_RACER = r"""
import os, socket, struct, sys
from convstore.daemon.protocol import encode_request, fingerprint, recv_frame, send_message
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
go, out = int(sys.argv[2]), int(sys.argv[3])
if os.fork():
    os._exit(0)
os.read(go, 1)
env = [k + "=" + v for k, v in os.environ.items()]
send_message(s, encode_request("run", "convstore", "18", "1", "", fingerprint(), "--help", *env))
kind, why = recv_frame(s)
if kind == b"A":
    cwd = os.open(".", os.O_PATH)
    s.sendmsg([b"G"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", 0, 1, 2, cwd))])
    kind2, code = recv_frame(s)
    why += b" then " + kind2 + code
os.write(out, kind + why)
"""


def _spawn_with_pid(pid: int, argv: list[str]) -> subprocess.Popen:
    """A process with the given (free) pid: the kernel's next pid set just below it, then a fork."""
    for _ in range(500):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(argv)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    pytest.fail(f"could not start a process with pid {pid}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to choose the next pid (ns_last_pid)")
def test_a_pid_reused_after_the_client_left_does_not_vouch_for_it(daemon, image_dir):
    # a confined (no_new_privs) client connects, hands the connection to its child and exits; an unconfined
    # process of the same user takes its pid; the child's request must not run as that process's would
    before = status(daemon)["served"]
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        racer = subprocess.Popen([sys.executable, "-c", _RACER, daemon["CONVSTORE_DAEMON_SOCKET"], str(go_r),
                                  str(out_w)], env=daemon, cwd=image_dir, pass_fds=(go_r, out_w),
                                 stdout=subprocess.DEVNULL, preexec_fn=_no_new_privs)
        assert racer.wait(timeout=60) == 0  # reaped: its pid is free
        os.close(go_r)
        os.close(out_w)
        go_r = out_w = -1
        impostor = _spawn_with_pid(racer.pid, ["sleep", "120"])
        try:
            assert "NoNewPrivs:\t0" in Path(f"/proc/{racer.pid}/status").read_text()
            os.write(go_w, b"g")
            reply = b""
            while chunk := os.read(out_r, 200):
                reply += chunk
        finally:
            impostor.kill()
            impostor.wait()
    finally:
        for fd in (go_r, go_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
    assert reply == b"Fthe process that connected has exited", reply
    assert status(daemon)["served"] == before


def test_a_request_sent_after_the_connecting_process_exited_is_refused(daemon, image_dir):
    # the mechanism without the pid reuse: whoever holds the connection, nothing runs for a process that is gone
    before = status(daemon)["served"]
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        racer = subprocess.Popen([sys.executable, "-c", _RACER, daemon["CONVSTORE_DAEMON_SOCKET"], str(go_r),
                                  str(out_w)], env=daemon, cwd=image_dir, pass_fds=(go_r, out_w),
                                 stdout=subprocess.DEVNULL)
        assert racer.wait(timeout=60) == 0
        os.close(go_r)
        os.close(out_w)
        go_r = out_w = -1
        os.write(go_w, b"g")
        reply = b""
        while chunk := os.read(out_r, 200):
            reply += chunk
    finally:
        for fd in (go_r, go_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
    assert reply.startswith(b"F"), reply
    assert status(daemon)["served"] == before


_SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from convstore.daemon.server import Daemon, DaemonError
from convstore.daemon.protocol import socket_path
d = Daemon(socket_path(), lambda prog: sys.exit(42), "test")
try:
    d.bind()
except DaemonError as e:
    print("error:", e, flush=True)
    sys.exit(1)
print(d.path, flush=True)
d.serve()
"""
_CLIENT = r"""
import sys
sys.path.insert(0, sys.argv[1])
from convstore.daemon.client import run_via_daemon
print(run_via_daemon(["images"]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_a_folder_another_user_took_first_does_not_block_the_daemon():
    # without XDG_RUNTIME_DIR, /tmp/convstore-UID is a name any user can take first.  The other users run the
    # system's python3 on the stdlib-only daemon modules (the venv's interpreter may sit in root's home)
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.fail("no system python3 for the other user's side of this test")
    user = 65533
    squatted = Path(f"/tmp/convstore-{user}")
    home = Path(tempfile.mkdtemp(prefix="convstore-home-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        os.chown(home, user, user)
        squatted.mkdir(mode=0o755)
        os.chown(squatted, NOBODY, NOBODY)  # taken first by nobody

        def run(script: str, home_dir: str, **kw: object) -> subprocess.Popen:
            return subprocess.Popen([system_python, "-c", script, str(REPO)], user=user, cwd="/", text=True,
                                    env={"HOME": home_dir, "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]

        # a home of its own: the daemon listens there, and serves its user's commands
        server = run(_SERVER, str(home))
        try:
            where = server.stdout.readline().strip() if server.stdout else ""
            assert where == str(home / ".cache" / "convstore-daemon" / "cli.sock"), (where, server.stderr)
            client = run(_CLIENT, str(home))
            out, err = client.communicate(timeout=60)
            assert (client.returncode, out.strip()) == (0, "42"), err  # served by the daemon (its entry's status)
        finally:
            server.terminate()
            server.communicate(timeout=60)
        # no home of its own: one line naming the fix, and the client runs its command itself
        server = run(_SERVER, "/nonexistent")
        out, err = server.communicate(timeout=60)
        assert server.returncode == 1 and out.count("\n") == 1, (out, err)
        assert f"/tmp/convstore-{user}" in out and "CONVSTORE_DAEMON_SOCKET" in out, out
        client = run(_CLIENT, "/nonexistent")
        out, err = client.communicate(timeout=60)
        assert (client.returncode, out.strip()) == (0, "None"), err
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(squatted, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("how", ["replaced", "open to others"])
def test_a_restart_never_imports_what_another_user_put_in_its_launch_folder(tmp_path, image_dir, how):
    # `python -m convstore daemon` imports from its working directory; a stale daemon starts again from there,
    # perhaps long after: another user who replaced that folder, or can write to it, must not choose its code
    import platformdirs

    deps = tmp_path / "deps"
    shutil.copytree(Path(platformdirs.__file__).parent, deps / "platformdirs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    launch = tmp_path / "launch"
    launch.mkdir(mode=0o777 if how == "open to others" else 0o755)
    launch.chmod(0o777 if how == "open to others" else 0o755)
    folder = tmp_path / "d"
    folder.mkdir(mode=0o700)
    env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock"),
           "PYTHONPATH": str(deps)}
    p = convstore(env, "daemon", "--background", cwd=launch)
    assert p.returncode == 0 and b"listening on" in p.stdout, p.stderr
    try:
        old = status(env)["pid"]
        if how == "replaced":  # the user moved the folder away; another user made one of the same name
            launch.rename(tmp_path / "moved")
            launch.mkdir()
            os.chown(launch, NOBODY, NOBODY)
        planted = launch / "convstore"
        planted.mkdir()
        pwned = tmp_path / "pwned"
        (planted / "__init__.py").write_text(f"open({str(pwned)!r}, 'w').close()\n")
        (planted / "__main__.py").write_text("")
        os.chown(planted, NOBODY, NOBODY)
        with open(deps / "platformdirs" / "__init__.py", "a") as f:  # an upgrade: the daemon is stale
            f.write("\n# patched\n")
        assert convstore(env, "--help", cwd=image_dir).returncode == 0
        wait_for(lambda: not Path(f"/proc/{old}").exists() or Path(f"/proc/{old}/stat").read_text().split()[2] == "Z",
                 "the stale daemon to exit")
        assert not pwned.exists()
    finally:
        convstore(env, "daemon", "--stop")


_HUGE = (1 << 63) - (1 << 64)  # 2**63, finite, past a C long: Python gives and takes it negative; /proc shows it


def test_limits_past_a_c_long_are_compared_as_the_kernel_does(tmp_path, image_dir):
    def daemon_limits() -> None:  # the daemon's hard limit of real-time CPU is finite but huge
        resource.setrlimit(resource.RLIMIT_RTTIME, (_HUGE, _HUGE))

    env = start_daemon(tmp_path / "d", preexec_fn=daemon_limits)
    try:
        assert "9223372036854775808  9223372036854775808" in _limits(status(env)["pid"])

        def small() -> None:  # the client's is small: it binds, the daemon's being huge or not
            resource.setrlimit(resource.RLIMIT_RTTIME, (1000000, 1000000))

        with blocked_command(env, image_dir, small) as (p, command):
            assert _limits(command) == _limits(p.pid)

        def huge() -> None:  # the client's own limit is huge, below the daemon's unlimited: served, exactly so
            small()
            resource.setrlimit(resource.RLIMIT_RSS, (_HUGE + 1, _HUGE + 1))

        with blocked_command(env, image_dir, huge) as (p, command):
            assert "9223372036854775809  9223372036854775809" in _limits(command)
            assert _limits(command) == _limits(p.pid)
    finally:
        convstore(env, "daemon", "--stop")


def _scheduling(pid: int) -> tuple[int, int]:
    """(nice, policy) of a process, as /proc/PID/stat shows them."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[16]), int(fields[38])


def test_a_nice_or_idle_client_gets_no_higher_priority_in_the_daemon(daemon, image_dir):
    # `nice -n 19 convstore ...` and `chrt -i 0 convstore ...`: an unprivileged process cannot take back the
    # priority it gave up, so its command must not run at the daemon's
    for name, lower in (("nice", lambda: os.nice(19)),
                        ("idle", lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)))):
        with blocked_command(daemon, image_dir, lower) as (p, command):
            assert _scheduling(p.pid) != _scheduling(status(daemon)["pid"]), name
            assert _scheduling(command) == _scheduling(p.pid), name


def test_many_half_sent_requests_hold_a_bounded_part_of_the_daemon(tmp_path, image_dir):
    # any process of the user can connect, whatever its context, cgroup included: before a request is checked, it
    # was buffered whole (4 MiB) for every connection the daemon's descriptors allowed (here 2 x 20,000)
    env = start_daemon(tmp_path / "d")
    try:
        base = status(env)["rss_kib"]
        conns = []
        try:
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX)
                s.connect(env["CONVSTORE_DAEMON_SOCKET"])
                conns.append(s)
                try:
                    s.sendall(struct.pack("!I", (4 << 20) - 1) + b"\0" * (1 << 20))  # a quarter, then silence
                except OSError:  # dropped by the daemon (the kernel's buffer took part of it, or none)
                    pass
        finally:
            for s in conns:
                s.close()

        def peak() -> int | None:  # its peak RSS, once it answers again
            p = convstore(env, "daemon", "--status")
            return json.loads(p.stdout)["rss_kib"] if p.returncode == 0 else None

        wait_for(lambda: peak() is not None, "the daemon to answer")
        grown = (peak() or 0) - base
        assert grown < 128 << 10, f"the daemon grew by {grown >> 10} MiB"
        # and it serves once they are gone
        before = status(env)["served"]
        assert convstore(env, "--help", cwd=image_dir).returncode == 0
        assert status(env)["served"] == before + 1
    finally:
        convstore(env, "daemon", "--stop")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_command_never_imports_from_the_folder_the_daemon_was_started_in(tmp_path, image_dir):
    # `python -m convstore daemon` puts its working directory first on sys.path; a command importing a module the
    # daemon had not (python-pkcs11, for a pkcs11: key) looked there first, whatever folder its client ran in
    launch = tmp_path / "launch"
    launch.mkdir()
    launch.chmod(0o777)  # say /tmp, or a shared folder
    folder = tmp_path / "d"
    folder.mkdir(mode=0o700)
    env = {**os.environ, "CONVSTORE_DAEMON": "1", "CONVSTORE_DAEMON_SOCKET": str(folder / "cli.sock")}
    p = convstore(env, "daemon", "--background", cwd=launch)
    assert p.returncode == 0 and b"listening on" in p.stdout, p.stderr
    try:
        pwned = tmp_path / "pwned"
        planted = launch / "pkcs11.py"  # by another user, after the daemon started
        planted.write_text(f"open({str(pwned)!r}, 'w').close()\n")
        os.chown(planted, NOBODY, NOBODY)
        client = {**env, "CONVSTORE_STORE": "store"}
        key = "pkcs11:token=t;object=o?module-path=/nonexistent.so&pin-value=1"
        before = status(env)["served"]
        p = convstore(client, "--key", key, "pack", "oci:src", "box:1", cwd=image_dir)
        assert status(env)["served"] == before + 1, p.stderr  # it ran in the daemon
        assert not pwned.exists(), p.stderr
    finally:
        convstore(env, "daemon", "--stop")


def test_the_code_watch_sees_edits_replacements_and_moved_folders(tmp_path, monkeypatch):
    """The daemon's loaded-code check (server._CodeWatch): inotify says when to stat the files; the stat
    decides.  An edit, a file renamed over a loaded one and a package folder moved away all count; an event
    that changes no loaded file (a new file beside one) does not, and a change stays seen."""
    import importlib

    from convstore.daemon import server as srv

    def fresh(name: str) -> Path:
        pkg = tmp_path / name
        (pkg / "sub").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "sub" / "__init__.py").write_text("")
        (pkg / "sub" / "mod.py").write_text("X = 1\n")
        importlib.import_module(f"{name}.sub.mod")
        return pkg

    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "untouched": lambda pkg: None,
        "new file": lambda pkg: (pkg / "sub" / "notes.txt").write_text("not a module"),
        "edited": lambda pkg: (pkg / "sub" / "mod.py").write_text("X = 22\n"),
        "replaced": lambda pkg: ((pkg / "new.py").write_text("X = 333\n"), os.replace(pkg / "new.py", pkg / "sub" / "mod.py")),
        "moved": lambda pkg: (os.rename(pkg, tmp_path / f"{pkg.name}-old"), fresh(pkg.name + "x"),
                              os.rename(tmp_path / f"{pkg.name}x", pkg)),
    }
    for i, (what, change) in enumerate(cases.items()):
        pkg = fresh(f"watched_pkg{i}")
        watch = srv._CodeWatch()
        try:
            assert watch.fd >= 0, "no inotify watch"
            assert not watch.changed()
            change(pkg)
            expect = what not in ("untouched", "new file")
            assert watch.changed() is expect, what
            assert watch.changed() is expect, what  # said again
        finally:
            watch.close()
    # without inotify (no watches left): the stat of every file, each time
    pkg = fresh("watched_pkg_plain")
    watch = srv._CodeWatch()
    watch.close()
    assert not watch.changed()
    os.utime(pkg / "sub" / "mod.py", ns=(1, 1))
    assert watch.changed() and watch.changed()
