"""Running convstore as a service (issue 23 §4, §7): systemd's readiness
protocol, ``--background`` waiting for it, logs that reach a file or the
journal, the config file, and the systemd units in contrib/systemd.

Every readiness test listens on a NOTIFY_SOCKET of its own, as systemd
would, and checks the service at the moment READY=1 arrives: the mount must
answer then (real FUSE), the snapshotter's socket must accept.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CORPUS_DIR, REPO, need_tool, run_cli
from engine_fixtures import podman, podman_config, remove_podman_root
from imagebuilder import Entry, make_tar, write_oci
from kms_fixtures import Registry

UNITS = REPO / "contrib" / "systemd"


class NotifySocket:
    """A datagram socket standing in for systemd's: what a service sends to
    ``$NOTIFY_SOCKET`` (with the sender's pid, and any fds passed)."""

    def __init__(self, tmp: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if tmp is None:  # the abstract namespace, as systemd uses
            name = f"convstore-test-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.env = f"@{name}"
        else:
            path = str(tmp / "notify.sock")
            self.sock.bind(path)
            self.env = path
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[dict[str, str], int | None, list[int]]:
        """One message: its assignments, the sender's pid, the fds it carried."""
        self.sock.settimeout(timeout)
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * 16))
        pid, fds = None, []
        for level, kind, d in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", d[:12])[0]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(d) // 4}i", d[: len(d) - len(d) % 4]))
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return msg, pid, fds

    def wait_for(self, key: str, value: str, timeout: float, proc: subprocess.Popen | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout} s")
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the service exited {proc.returncode} before {key}={value}: "
                                     f"{proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                msg, pid, fds = self.receive(min(left, 0.2))
            except TimeoutError:
                continue
            for fd in fds:
                os.close(fd)
            if proc is not None:
                assert pid == proc.pid, (pid, proc.pid)
            if msg.get(key) == value:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    yield s
    s.close()


# -- sd_notify --------------------------------------------------------------------------------------------------------


def test_notify_speaks_to_abstract_and_path_sockets_and_passes_fds(tmp_path: Path, notify_socket: NotifySocket,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from convstore.service import sdnotify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False  # no manager: nothing sent, no error
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env)
    assert sdnotify.notify("READY=1\nSTATUS=up")
    msg, pid, fds = notify_socket.receive(5)
    assert msg == {"READY": "1", "STATUS": "up"} and pid == os.getpid() and fds == []
    # FDSTORE: a real descriptor reaches the manager (what a restart gets back: /dev/fuse in kfuse's failover)
    r, w = os.pipe()
    try:
        assert sdnotify.notify("FDSTORE=1\nFDNAME=fuse", [r])
        msg, _, fds = notify_socket.receive(5)
        assert msg == {"FDSTORE": "1", "FDNAME": "fuse"} and len(fds) == 1 and fds[0] != r
        os.write(w, b"through the stored fd")
        assert os.read(fds[0], 100) == b"through the stored fd"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)
    path_socket = NotifySocket(tmp_path)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", path_socket.env)
        assert sdnotify.stopping("bye")
        assert path_socket.receive(5)[0] == {"STOPPING": "1", "STATUS": "bye"}
    finally:
        path_socket.close()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False  # logged, not raised: the service keeps serving
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def _two_layer_image(tmp_path: Path, env: dict[str, str]) -> list[dict]:
    lower = make_tar([Entry("etc/", "dir"), Entry("etc/hello", data=b"hello\n")])
    upper = make_tar([Entry("etc/", "dir"), Entry("etc/world", data=b"world\n")])
    layout = tmp_path / "img"
    descs = write_oci(str(layout), [lower, upper])
    run_cli(env, "pack", f"oci:{layout}:latest", "two:1")
    return descs["layers"]


def _private_mountpoint(tmp_path: Path, name: str) -> Path:
    (tmp_path / "private").mkdir(mode=0o700, exist_ok=True)
    mnt = tmp_path / "private" / name
    mnt.mkdir()
    return mnt


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "convstore", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _layer_file(mnt: Path, digest: str, path: str) -> Path:
    return mnt / base64.b64encode(b"any/ref:1").decode() / digest / "diff" / path


def test_layerstore_says_ready_only_once_its_mount_serves(tmp_path: Path, cli_env: dict[str, str],
                                                          notify_socket: NotifySocket) -> None:
    """READY=1 arrives once the tree is there (read at that very moment), not
    when the process starts: the store is made slow (300 ms a read), so the
    scan before the mount takes a while.  The watchdog is fed; SIGTERM sends
    STOPPING=1 and unmounts."""
    layers = _two_layer_image(tmp_path, cli_env)
    mnt = _private_mountpoint(tmp_path, "layers")
    env = {**cli_env, "NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "300000"}
    p = _cli(env, "--simulate-latency", "300", "layerstore", str(mnt))
    try:
        started = time.monotonic()
        msg = notify_socket.wait_for("READY", "1", 60, p)
        # at this moment the mount serves: the layer's file is there
        assert os.path.ismount(mnt)
        assert _layer_file(mnt, layers[0]["digest"], "etc/hello").read_bytes() == b"hello\n"
        assert time.monotonic() - started > 0.3  # the slow scan came first
        assert msg["STATUS"] == f"serving the layer store at {mnt}" and msg["MAINPID"] == str(p.pid)
        notify_socket.wait_for("WATCHDOG", "1", 10, p)
        p.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1", 30)
        assert p.wait(30) == 0
        assert not os.path.ismount(mnt)
        log = p.stderr.read().decode() if p.stderr else ""
        assert re.search(r"INFO convstore\.engines\.layerstore\[\d+\]: serving the layer store at", log), log
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_mount_says_ready_once_its_image_is_there_and_logs_to_the_journal(tmp_path: Path, cli_env: dict[str, str],
                                                                          notify_socket: NotifySocket) -> None:
    """Also: with its stderr the journal's stream ($JOURNAL_STREAM names it,
    as systemd sets it), each log line carries its syslog priority."""
    _two_layer_image(tmp_path, cli_env)
    mnt = _private_mountpoint(tmp_path, "two")
    journal = open(tmp_path / "journal", "wb")
    st = os.fstat(journal.fileno())
    p = subprocess.Popen([sys.executable, "-m", "convstore", "--simulate-latency", "200", "mount", "two:1", str(mnt)],
                         env={**cli_env, "NOTIFY_SOCKET": notify_socket.env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                         stdout=subprocess.DEVNULL, stderr=journal)
    journal.close()
    try:
        notify_socket.wait_for("READY", "1", 60, p)
        assert (mnt / "etc" / "world").read_bytes() == b"world\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert f"<6>convstore.reader.fuse: serving two:1 at {mnt}\n" in (tmp_path / "journal").read_text()
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_snapshotter_says_ready_once_its_socket_and_layers_serve(tmp_path: Path, cli_env: dict[str, str],
                                                                 notify_socket: NotifySocket) -> None:
    layers = _two_layer_image(tmp_path, cli_env)
    root = tmp_path / "snap"
    sock = tmp_path / "run" / "snapshotter.sock"
    p = _cli({**cli_env, "NOTIFY_SOCKET": notify_socket.env}, "--simulate-latency", "200", "snapshotter", str(root),
             "--socket", str(sock))
    try:
        notify_socket.wait_for("READY", "1", 60, p)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))  # containerd can call it now
        assert _layer_file(root / "layers", layers[1]["digest"], "etc/world").read_bytes() == b"world\n"
        p.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1", 30)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(root / "layers")], check=False, capture_output=True)


# -- --background ------------------------------------------------------------------------------------------------------


@pytest.mark.corpus
def test_background_layer_store_on_a_registry_store_is_ready_for_podman_at_once(tmp_path: Path, cli_env: dict[str, str],
                                                                                corpus: dict) -> None:
    """``layerstore --background`` over a registry store (a slow first scan)
    returns only once it serves: a podman pull and run right after it
    succeed from its layers.  Its log is a 0600 file it names, the child's
    standard error, and says where it serves."""
    need_tool("skopeo")
    need_tool("podman")
    reg = Registry(tmp_path / "registry")
    podman_root = tmp_path / "podman"
    mnt = _private_mountpoint(tmp_path, "als")
    env = {k: v for k, v in cli_env.items() if k != "CONVSTORE_STORE"}
    store = ["--insecure", "--store", f"oci://{reg.host}/convstore", "--cache", str(tmp_path / "cache")]
    log = tmp_path / "logs" / "layerstore.log"
    try:
        src = f"oci:{CORPUS_DIR / 'app1'}:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{reg.host}/app1:latest"],
                       check=True, timeout=300)
        run_cli(env, *store, "pack", src, "app1:latest")
        shutil.rmtree(tmp_path / "cache")  # a node with an empty cache
        out = run_cli(env, *store, "--simulate-latency", "100", "layerstore", "--background", str(mnt),
                      "--log-file", str(log)).stdout
        assert f"log: {log}" in out
        penv = podman_config(podman_root, mnt)
        ref = f"{reg.host}/app1:latest"
        podman(penv, "pull", "-q", "--tls-verify=false", ref)
        r = podman(penv, "run", "--rm", ref, check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
        assert log.stat().st_mode & 0o777 == 0o600
        pid = int(re.search(r"\(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
        assert os.readlink(f"/proc/{pid}/fd/2") == str(log)  # its stderr: the log file, not a dead pipe
        assert f"serving the layer store at {mnt}" in log.read_text()
    finally:
        remove_podman_root(podman_config(podman_root, mnt), podman_root)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        reg.stop()


def test_background_reports_the_childs_start_up_error_in_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A child that fails before it serves (here: the store's master key is
    the wrong one) makes ``--background`` exit 1 with the child's own error
    in one line, the same line as in its log; nothing stays mounted."""
    _two_layer_image(tmp_path, cli_env)
    wrong = tmp_path / "keys2" / "other.key"
    run_cli({**cli_env, "CONVSTORE_STORE": str(tmp_path / "other-store"), "CONVSTORE_KEY": f"file:{wrong}"},
            "pack", f"oci:{tmp_path / 'img'}:latest", "x:1")  # another store, and its own master key
    mnt = _private_mountpoint(tmp_path, "two")
    log = tmp_path / "mount.log"
    r = run_cli({**cli_env, "CONVSTORE_KEY": f"file:{wrong}"}, "mount", "--background", "two:1", str(mnt),
                "--log-file", str(log), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("convstore: error: ") and "key" in r.stderr
    assert r.stderr in log.read_text()  # the child's own line, as the foreground command says it
    assert not os.path.ismount(mnt)


def _child(code: str, log_fd: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stderr=log_fd)


def test_ready_waiter_believes_only_its_child(tmp_path: Path) -> None:
    """The --background parent's socket: a READY=1 from another process (a
    liar on the same machine) is ignored; the child's own counts.  A child
    that dies without an error line of its own is reported by its last
    line and its log's path; one that never gets ready is stopped."""
    from convstore.errors import ServiceStartFailed, ServiceStartTimeout
    from convstore.service.background import ReadyWaiter, open_log

    log = str(tmp_path / "logs" / "x.log")
    fd, offset = open_log(log)
    assert os.stat(log).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(log)).st_mode & 0o777 == 0o700
    send = ("import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            "s.connect(os.environ['NOTIFY_SOCKET']); s.send(b'READY=1\\nSTATUS=%s')")
    with ReadyWaiter() as w:
        child = _child("import time; time.sleep(60)", fd, {})
        try:
            liar = _child(send % "liar", fd, {"NOTIFY_SOCKET": w.path})
            assert liar.wait(30) == 0
            with pytest.raises(ServiceStartTimeout) as e:
                w.wait(child, "the sleeper", log, offset, timeout=2)  # the liar's READY=1 did not count
            assert "was not ready after 2 s; stopped it" in str(e.value) and child.poll() is not None
        finally:
            if child.poll() is None:
                child.kill()
        honest = _child(send % "honest" + "; import time; time.sleep(60)", fd, {"NOTIFY_SOCKET": w.path})
        try:
            assert w.wait(honest, "honest", log, offset, timeout=30) == "honest"
        finally:
            honest.kill()
        crash = _child("raise SystemExit('Boom: the last words')", fd, {})
        with pytest.raises(ServiceStartFailed) as e:
            w.wait(crash, "the crasher", log, offset, timeout=30)
        assert str(e.value) == f"the crasher exited with status 1: Boom: the last words (log: {log})"
    os.close(fd)


# -- the config file ---------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_config_file_gives_the_services_their_options_and_the_command_line_wins(tmp_path: Path,
                                                                                 cli_env: dict[str, str]) -> None:
    layers = _two_layer_image(tmp_path, cli_env)
    mnt = _private_mountpoint(tmp_path, "als")
    stats, other_stats = tmp_path / "stats.json", tmp_path / "other-stats.json"
    cfg = _config(tmp_path, f'''version = 1
[global]
store = "{cli_env['CONVSTORE_STORE']}"
key = "{cli_env['CONVSTORE_KEY']}"
[layerstore]
mountpoint = "{mnt}"
stats-file = "{stats}"
log-file = "{tmp_path / 'ls.log'}"
[mount]
ref = "nothere:1"
''')
    env = {k: v for k, v in cli_env.items() if k not in ("CONVSTORE_STORE", "CONVSTORE_KEY")}
    try:
        # everything from the file: the store, the key, the mount point, the stats file
        run_cli(env, "--config", str(cfg), "layerstore", "--background")
        assert _layer_file(mnt, layers[0]["digest"], "etc/hello").read_bytes() == b"hello\n"
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        _wait_for_file(stats)
        # the command line wins over the file
        run_cli({**env, "CONVSTORE_CONFIG": str(cfg)}, "layerstore", "--background", "--stats-file", str(other_stats))
        assert _layer_file(mnt, layers[1]["digest"], "etc/world").read_bytes() == b"world\n"
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        _wait_for_file(other_stats)
        # arguments on the command line win over the file's ([mount] ref names another image)
        mnt2 = _private_mountpoint(tmp_path, "two")
        r = run_cli(env, "--config", str(cfg), "mount", "--background", "--log-file", str(tmp_path / "m.log"),
                    "two:1", str(mnt2))
        assert "mounted two:1" in r.stdout and (mnt2 / "etc" / "world").read_bytes() == b"world\n"
        subprocess.run(["fusermount3", "-u", str(mnt2)], check=True)
        # an environment variable of an option wins over the file too (as click's envvar)
        r = run_cli({**env, "CONVSTORE_STORE": str(tmp_path / "nowhere")}, "--config", str(cfg), "images", check=False)
        assert "two" not in r.stdout and f"{tmp_path / 'nowhere'}" in r.stderr, r.stderr
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.05)


@pytest.mark.parametrize("text, says", [
    ('version = 1\n[layerstore]\nstats_flie = "/x"\n', "[layerstore]: unknown key 'stats_flie'"),
    ('version = 1\n[layerstore]\ninsecure = true\n', "unknown key 'insecure' (a global option: put it in [global])"),
    ('version = 1\n[global]\ncache-size = "big"\n', "[global] cache-size: expected a number, not 'big'"),
    ('version = 1\n[podman]\nx = 1\n', "unknown section [podman]"),
    ('[global]\ninsecure = true\n', "'version = 1' is missing"),
    ('version = 2\n', "version 2 is newer than this convstore reads (1)"),
    ('version = 1\n[global\n', "not valid TOML"),
])
def test_config_file_errors_are_one_line_naming_what(tmp_path: Path, cli_env: dict[str, str], text: str,
                                                      says: str) -> None:
    cfg = _config(tmp_path, text)
    r = run_cli(cli_env, "--config", str(cfg), "images", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert r.stderr.startswith(f"convstore: error: config file {cfg}: ")


def test_config_file_others_may_write_is_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    _two_layer_image(tmp_path, cli_env)
    cfg = _config(tmp_path, "version = 1\n")
    cfg.chmod(0o664)
    r = run_cli({**cli_env, "CONVSTORE_CONFIG": str(cfg)}, "images", check=False)
    assert r.returncode == 2 and "others may write it" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    cfg.chmod(0o644)
    assert run_cli({**cli_env, "CONVSTORE_CONFIG": str(cfg)}, "images").returncode == 0


# -- the systemd units -------------------------------------------------------------------------------------------------

#: [Service] settings the tests below apply to ExecStart as systemd would (setpriv, prlimit, umask, the
#: directories, the notify socket and watchdog variables)
EMULATED = {"Type", "NotifyAccess", "ExecStart", "WatchdogSec", "StateDirectory", "StateDirectoryMode",
            "CacheDirectory", "CacheDirectoryMode", "RuntimeDirectory", "RuntimeDirectoryMode", "UMask",
            "NoNewPrivileges", "CapabilityBoundingSet", "LimitCORE"}
#: settings only systemd acts on (restart policy, timeouts, the fd store's size, a directory kept across
#: restarts): checked by systemd-analyze verify
MANAGER_ONLY = {"Restart", "RestartSec", "TimeoutStartSec", "TimeoutStopSec", "FileDescriptorStoreMax",
                "RuntimeDirectoryPreserve"}


def _unit(name: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert key not in current, f"{name}: {key} given twice"
        current[key] = value
    return sections


@pytest.mark.parametrize("name", ["convstore-layerstore.service", "convstore-snapshotter.service"])
def test_unit_verifies_and_every_setting_is_tested(tmp_path: Path, name: str) -> None:
    """``systemd-analyze verify`` (systemd 252 here) finds nothing to say
    (it warns about an unknown key, such as FileDescriptorStorePreserve of
    systemd 254, without failing: so its output must be empty), and every
    [Service] setting is either applied to ExecStart below or one only the
    manager acts on."""
    tool = need_tool("systemd-analyze")
    unit = tmp_path / name
    exe = shutil.which("convstore", path=os.path.dirname(sys.executable))
    assert exe is not None
    unit.write_text((UNITS / name).read_text().replace("/usr/local/bin/convstore", exe))
    r = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r
    service = _unit(name)["Service"]
    assert set(service) <= EMULATED | MANAGER_ONLY, set(service) - EMULATED - MANAGER_ONLY
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert int(service["FileDescriptorStoreMax"]) > 0  # room for kfuse's /dev/fuse (FDSTORE=1)


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def _start_unit(name: str, tmp_path: Path, config: Path, notify: NotifySocket) -> subprocess.Popen[bytes]:
    """ExecStart of unit ``name``, run as systemd would: its directories made (below ``tmp_path``) with their
    modes, its umask, no new privileges, only its capabilities, no core, the notify socket and watchdog."""
    service = _unit(name)["Service"]
    roots = {"StateDirectory": "/var/lib", "CacheDirectory": "/var/cache", "RuntimeDirectory": "/run"}
    subst = {f"{base}/": f"{tmp_path}{base}/" for base in roots.values()}
    for kind, base in roots.items():
        for d in service.get(kind, "").split():
            path = Path(f"{tmp_path}{base}/{d}")
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(int(service[kind + "Mode"], 8))
            os.chmod(f"{tmp_path}{base}", 0o755)
    cmd = service["ExecStart"]
    for a, b in subst.items():
        cmd = cmd.replace(a, b)
    argv = cmd.split()
    assert argv[0] == "/usr/local/bin/convstore"
    argv[0] = shutil.which("convstore", path=os.path.dirname(sys.executable)) or "convstore"
    caps = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in service["CapabilityBoundingSet"].split()])
    wrap = [need_tool("setpriv"), *(["--no-new-privs"] if service["NoNewPrivileges"] == "yes" else []),
            "--bounding-set", caps, "--inh-caps", "-all", "--", need_tool("prlimit"), f"--core={service['LimitCORE']}",
            "--"]
    env = {**os.environ, "NOTIFY_SOCKET": notify.env, "CONVSTORE_CONFIG": str(config),
           "WATCHDOG_USEC": str(int(_seconds(service["WatchdogSec"]) * 1e6))}
    env.pop("CONVSTORE_STORE", None)
    env.pop("CONVSTORE_KEY", None)
    umask = int(service["UMask"], 8)
    return subprocess.Popen([*wrap, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.umask(umask))


def test_layerstore_unit_serves_under_its_own_limits(tmp_path: Path, cli_env: dict[str, str],
                                                     notify_socket: NotifySocket) -> None:
    """The layer store unit's ExecStart, with only CAP_SYS_ADMIN, no new
    privileges and the config file for its store: READY=1 with the tree
    there, files read through it, a clean stop on SIGTERM."""
    layers = _two_layer_image(tmp_path, cli_env)
    cfg = _config(tmp_path, f'version = 1\n[global]\nstore = "{cli_env["CONVSTORE_STORE"]}"\n'
                            f'key = "{cli_env["CONVSTORE_KEY"]}"\n')
    p = _start_unit("convstore-layerstore.service", tmp_path, cfg, notify_socket)
    mnt = tmp_path / "var" / "lib" / "convstore" / "layers"
    try:
        notify_socket.wait_for("READY", "1", 60, p)
        assert _layer_file(mnt, layers[1]["digest"], "etc/world").read_bytes() == b"world\n"
        status = Path(f"/proc/{p.pid}/status").read_text()
        assert re.search(r"CapBnd:\s+0000000000200000", status) and re.search(r"NoNewPrivs:\s+1", status), status
        p.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1", 30)
        assert p.wait(30) == 0
        assert not os.path.ismount(mnt)
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


@pytest.mark.corpus
def test_snapshotter_unit_serves_containerd_under_its_own_limits(tmp_path: Path, cli_env: dict[str, str],
                                                                 corpus: dict, notify_socket: NotifySocket) -> None:
    """The snapshotter unit's ExecStart, with its capabilities only, serves
    real containerd: a container leaves a read-only directory of user 1000
    in its upper directory, and once containerd removes that container's snapshot
    nothing of it is left (removing another user's read-only directory is
    what CAP_DAC_OVERRIDE is in the unit for)."""
    from engine_fixtures import Containerd, unmount_below

    need_tool("containerd")
    run_cli(cli_env, "pack", f"oci:{CORPUS_DIR / 'base'}:latest", "base:latest")
    cfg = _config(tmp_path, f'version = 1\n[global]\nstore = "{cli_env["CONVSTORE_STORE"]}"\n'
                            f'key = "{cli_env["CONVSTORE_KEY"]}"\n')
    p = _start_unit("convstore-snapshotter.service", tmp_path, cfg, notify_socket)
    root = tmp_path / "var" / "lib" / "convstore" / "snapshotter"
    ctd = None
    try:
        notify_socket.wait_for("READY", "1", 60, p)
        ctd = Containerd(tmp_path / "containerd", tmp_path / "run" / "convstore" / "snapshotter.sock")
        run_cli(cli_env, "containerd-load", "base:latest", "--address", str(ctd.socket), "--name", "base:latest")
        r = ctd.ctr("run", "--rm", "--snapshotter", "convstore", "base:latest", "u1000", "sh", "-c",
                    "mkdir /tmp/d && echo x > /tmp/d/f && chown -R 1000:1000 /tmp/d && chmod 500 /tmp/d && cat /tmp/d/f",
                    check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "x"), r.stderr
        deadline = time.monotonic() + 60
        while list(root.glob("snapshots/*/fs/tmp/d")):
            assert time.monotonic() < deadline, "the container's snapshot was never removed"
            ctd.ctr("snapshots", "--snapshotter", "convstore", "ls")  # containerd's gc runs on its own; wait
            time.sleep(0.5)
        assert "Active" not in ctd.ctr("snapshots", "--snapshotter", "convstore", "ls").stdout
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if ctd is not None:
            ctd.stop()
        if p.poll() is None:
            p.kill()
        unmount_below(tmp_path)
