"""Kept image mounts for ``convstore run`` (convstore.engines.keeper): real FUSE, runc, as root.

A run with ``--keep-mount`` leaves the image's read-only mount up, served by a keeper process; the next
run of the same image in the same store starts on it.  The liars: a client whose key cannot unwrap the
image, a socket of another uid, a socket that answers wrongly, a keeper killed with -9, an image removed
and collected, a tag moved to another image."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import convstore
from conftest import CORPUS_DIR, run_cli
from convstore.engines import keeper
from convstore.errors import KeptMountUnusable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="convstore run needs root (FUSE, runc)")

NOBODY = 65534


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'key'}",
                CONVSTORE_DAEMON="0", CONVSTORE_KEEP_DIR=str(tmp_path / "keep"), **extra)


def _run(env: dict[str, str], *args: str) -> tuple[str, dict]:
    """The output and the JSON summary of one ``convstore run``, in its own process."""
    p = subprocess.run([sys.executable, "-m", "convstore", "run", "--json", *args], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout, json.loads(p.stderr.splitlines()[-1])


def _mounts(keep: Path) -> list[tuple[str, str]]:
    """(mount id, mount point) of the mounts in ``keep``."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].startswith(str(keep) + "/"):
                out.append((fields[0], fields[4]))
    return out


def _wait(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def kept(tmp_path: Path, corpus: dict, monkeypatch: pytest.MonkeyPatch):
    """A store with ``base`` packed as ``img:1``, this test's keep directory (here too); every keeper of
    the test stopped at its end."""
    env = _env(tmp_path)
    monkeypatch.setenv("CONVSTORE_KEEP_DIR", env["CONVSTORE_KEEP_DIR"])
    run_cli(env, "pack", f"oci:{CORPUS_DIR / 'base'}:latest", "img:1")
    yield env
    keeper.stop_keepers()
    for _, mnt in _mounts(tmp_path / "keep"):  # a keeper killed by the test left its mount
        subprocess.run(["umount", "-l", mnt], check=False)


def _image_key(tmp_path: Path, ref: str, key: str | None = None) -> tuple[bytes, str, str]:
    """(keep key, store id, manifest digest) of ``ref``, through the key provider ``key``."""
    s = convstore.Store.open(str(tmp_path / "store"), key or f"file:{tmp_path / 'key'}")
    e = s.catalog.entry(ref)
    return s.manifests.keep_key(e), s.manifests.ident.id, str(e.manifest_digest)


def _keeper_pid(keep: Path) -> int:
    (lock,) = keep.glob("*.lock")
    return int(lock.read_text())


def test_a_second_run_reuses_the_kept_mount_which_goes_when_idle(tmp_path: Path, kept: dict) -> None:
    keep = tmp_path / "keep"
    out, first = _run(kept, "--keep-mount", "3s", "img:1")
    assert out == "hello\n" and first["kept"] == "new" and first["keeper_runs"] == 1
    mounts = _mounts(keep)
    assert len(mounts) == 1, mounts
    assert oct(keep.stat().st_mode & 0o777) == "0o700"
    (sock,) = keep.glob("*.sock")
    assert sock.stat().st_mode & 0o777 == 0o600
    # the next run, with no --keep-mount, starts its container on that very mount (no new one)
    out, second = _run(kept, "img:1", "--", "/bin/sh", "-c", "echo again; test -w / || echo read-only")
    assert out == "again\nread-only\n"
    assert second["kept"] == "reused" and second["keeper_runs"] == 2, second
    assert _mounts(keep) == mounts
    # what the containers read was merged into the start-up profile when the last one ended
    _wait(lambda: not _mounts(keep), "the idle keeper to unmount")
    _wait(lambda: not list(keep.glob("*.sock")), "the idle keeper's socket to go")
    out, fresh = _run(kept, "img:1")
    assert out == "hello\n" and fresh["kept"] == "" and fresh["profile"].startswith("prefetched"), fresh
    assert not _mounts(keep)


def test_a_client_whose_key_cannot_unwrap_the_image_gets_no_mount(tmp_path: Path, kept: dict) -> None:
    _run(kept, "--keep-mount", "1m", "img:1")
    key, store_id, digest = _image_key(tmp_path, "img:1")
    # a liar who knows the name and digest but not the image's key: refused by the keeper
    with pytest.raises(KeptMountUnusable, match="refused: the client cannot prove"):
        keeper.attach(os.urandom(32), store_id, "img:1", digest)
    # with the right key it is served (the same call, so the refusal above is the key's)
    with keeper.attach(key, store_id, "img:1", digest, op="status") as lease:
        assert lease.runs == 1
    # through the command line with another master key: the run fails on its own key, runs nothing
    other = dict(kept, CONVSTORE_KEY=f"file:{tmp_path / 'other.key'}")
    subprocess.run([sys.executable, "-c", "import os; open(os.environ['K'], 'wb').write(os.urandom(32))"],
                   env={**other, "K": str(tmp_path / "other.key")}, check=True)
    os.chmod(tmp_path / "other.key", 0o600)
    p = subprocess.run([sys.executable, "-m", "convstore", "run", "img:1", "--", "/bin/sh", "-c", "echo RAN"],
                       env=other, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "RAN" not in p.stdout, p
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    with keeper.attach(key, store_id, "img:1", digest, op="status") as lease:
        assert lease.runs == 1  # no run was served


def _fake_keeper(path: Path, uid: int | None, answer: bytes) -> int:
    """A process serving ``path``: as ``uid`` (None: this one's), answering every client with ``answer``."""
    pid = os.fork()
    if pid == 0:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            s.listen(8)
            while True:
                c, _ = s.accept()
                try:
                    c.sendall(answer)
                    c.recv(65536)
                    body = json.dumps({"ok": True, "root": str(path)[:-5] + ".root", "dev": 0, "pid": 1,
                                       "runs": 1, "mac": "00" * 32}).encode()
                    c.sendall(len(body).to_bytes(4, "big") + body)
                except OSError:
                    pass
                c.close()
        finally:
            os._exit(0)
    return pid


@pytest.mark.parametrize("liar", ["other uid", "wrong answer"])
def test_a_fake_keeper_socket_is_not_used(tmp_path: Path, kept: dict, liar: str) -> None:
    key, store_id, digest = _image_key(tmp_path, "img:1")
    keep = tmp_path / "keep"
    keep.mkdir(mode=0o700)
    path = keep / f"{keeper.keeper_id(store_id, digest)}.sock"
    hello = keeper.MAGIC + bytes([keeper.KEEP_VERSION]) + os.urandom(32)
    pid = _fake_keeper(path, NOBODY if liar == "other uid" else None, hello)
    try:
        _wait(path.exists, "the fake keeper to listen")
        with pytest.raises(KeptMountUnusable, match="uid 65534" if liar == "other uid" else "cannot prove"):
            keeper.attach(key, store_id, "img:1", digest)
        out, summary = _run(kept, "img:1")  # not asked to keep: mounts the image itself
        assert out == "hello\n" and summary["kept"] == "", summary
        out, summary = _run(kept, "--keep-mount", "1m", "img:1")  # asked to keep: a real keeper replaces it
        assert out == "hello\n" and summary["kept"] == "new", summary
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_socket_of_another_uid_is_not_connected_to(tmp_path: Path, kept: dict) -> None:
    key, store_id, digest = _image_key(tmp_path, "img:1")
    keep = tmp_path / "keep"
    keep.mkdir(mode=0o700)
    path = keep / f"{keeper.keeper_id(store_id, digest)}.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    os.chown(path, NOBODY, NOBODY)
    try:
        with pytest.raises(KeptMountUnusable, match="not a socket of this user"):
            keeper.attach(key, store_id, "img:1", digest)
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.accept()  # nobody connected
    finally:
        s.close()


def test_a_keeper_killed_with_sigkill_leaves_the_next_run_working(tmp_path: Path, kept: dict) -> None:
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1m", "img:1")
    os.kill(_keeper_pid(keep), signal.SIGKILL)
    (_, mnt), = _mounts(keep)
    _wait(lambda: _dead(mnt), "the killed keeper's mount to fail")
    start = time.monotonic()
    out, summary = _run(kept, "img:1")  # not keeping: its own mount
    assert out == "hello\n" and summary["kept"] == "", summary
    assert time.monotonic() - start < 30
    assert not _mounts(keep) and not list(keep.glob("*.sock"))  # what the dead keeper left is cleaned up
    _run(kept, "--keep-mount", "1m", "img:1")
    os.kill(_keeper_pid(keep), signal.SIGKILL)  # again, and this time the next run keeps
    _wait(lambda: _dead(mnt), "the killed keeper's mount to fail")
    out, summary = _run(kept, "--keep-mount", "1m", "img:1")  # keeping: a new keeper, on a live mount
    assert out == "hello\n" and summary["kept"] == "new", summary
    assert [m for _, m in _mounts(keep)] == [mnt] and not _dead(mnt)


def _dead(mnt: str) -> bool:
    try:
        os.statvfs(mnt)
        return False
    except OSError:
        return True


def test_a_removed_image_is_not_served_from_its_kept_mount(tmp_path: Path, kept: dict) -> None:
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "10m", "img:1")
    key, store_id, digest = _image_key(tmp_path, "img:1")
    run_cli(kept, "rm", "img:1")
    run_cli(kept, "gc")
    with pytest.raises(KeptMountUnusable):
        keeper.attach(key, store_id, "img:1", digest)  # its next use: refused
    _wait(lambda: not _mounts(keep), "the keeper of the removed image to unmount", timeout=keeper.CHECK_INTERVAL + 15)
    _wait(lambda: not list(keep.glob("*.head")), "its cached manifest head to go")
    p = subprocess.run([sys.executable, "-m", "convstore", "run", "img:1"], env=kept, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "no image img:1" in p.stderr, p.stderr


def test_a_moved_tag_starts_the_new_image_not_the_kept_one(tmp_path: Path, kept: dict) -> None:
    probe = ["--", "/bin/sh", "-c", "test -e /usr/bin/python3 && echo python || echo no-python"]
    out, first = _run(kept, "--keep-mount", "10m", "img:1", *probe)
    assert out == "no-python\n" and first["kept"] == "new"
    run_cli(kept, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "img:1")  # the tag now names app1
    out, moved = _run(kept, "--keep-mount", "10m", "img:1", *probe)
    assert out == "python\n" and moved["kept"] == "new" and moved["keeper_runs"] == 1, moved
    assert len(_mounts(tmp_path / "keep")) == 2


def test_a_hung_keeper_is_waited_for_a_bounded_time(tmp_path: Path, kept: dict) -> None:
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1m", "img:1")
    pid = _keeper_pid(keep)
    os.kill(pid, signal.SIGSTOP)  # alive, holds its socket and lock, answers nothing
    try:
        for args in ([], ["--keep-mount", "1m"]):
            start = time.monotonic()
            out, summary = _run(kept, *args, "img:1")
            assert out == "hello\n" and summary["kept"] == "", summary  # its own mount
            assert time.monotonic() - start < keeper.HANDSHAKE_TIMEOUT + 20
    finally:
        os.kill(pid, signal.SIGCONT)


def test_through_the_daemon_the_mount_is_kept_by_default_and_stop_ends_it(tmp_path: Path, kept: dict) -> None:
    keep = tmp_path / "keep"
    (tmp_path / "d").mkdir(mode=0o700)
    env = dict(kept, CONVSTORE_DAEMON="1", CONVSTORE_DAEMON_SOCKET=str(tmp_path / "d" / "cli.sock"))
    run_cli(env, "daemon", "--background")
    try:
        out, first = _run(env, "img:1")
        assert out == "hello\n" and first["kept"] == "new", first  # forked from the daemon's child
        out, second = _run(env, "img:1")
        assert out == "hello\n" and second["kept"] == "reused" and second["keeper_runs"] == 2, second
        assert len(_mounts(keep)) == 1
    finally:
        run_cli(env, "daemon", "--stop")
    _wait(lambda: not _mounts(keep), "daemon --stop to stop the keeper")


def test_a_head_only_manifest_holds_what_a_run_on_a_kept_mount_checks(tmp_path: Path, kept: dict) -> None:
    s = convstore.Store.open(str(tmp_path / "store"), f"file:{tmp_path / 'key'}")
    e = s.catalog.entry("img:1")
    full, head = s.manifests.load(e), s.manifests.load(e, head_only=True)
    for f in ("name", "tag", "source", "config_digest", "config_bytes", "source_manifest_bytes", "verification"):
        assert getattr(head, f) == getattr(full, f), f
    assert [lr.digest for lr in head.layers] == [lr.digest for lr in full.layers]
    assert full.chunks and not head.chunks and all(not lr.entries for lr in head.layers)


def test_image_files_are_read_inside_the_kept_root(tmp_path: Path) -> None:
    from convstore.engines.run import read_in_root

    root, outside = tmp_path / "root", tmp_path / "secret"
    (root / "etc").mkdir(parents=True)
    outside.write_text("host secret\n")
    (root / "real").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "passwd").symlink_to("/../../../../real")  # absolute, with ..: stays in root
    (root / "etc" / "group").symlink_to("../../../../../../" + str(outside))  # relative, climbing out
    (root / "etc" / "loop").symlink_to("loop")
    assert read_in_root(str(root), "/etc/passwd") == "root:x:0:0::/root:/bin/sh\n"
    assert read_in_root(str(root), "/etc/group") == ""  # resolved inside root: no such file there
    assert read_in_root(str(root), "/etc/loop") == ""
    assert read_in_root(str(root), "/etc") == ""  # not a regular file


def test_a_running_container_holds_the_kept_mount_past_its_idle_time(tmp_path: Path, kept: dict) -> None:
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1s", "img:1")
    # a container's stdin is /dev/null: it runs for a while (the checks below end well before it does)
    slow = subprocess.Popen([sys.executable, "-m", "convstore", "run", "--json", "img:1", "--", "/bin/sh", "-c",
                             "echo started; sleep 10; echo slow-done"], env=kept,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert slow.stdout is not None and slow.stdout.readline() == "started\n"  # running on the kept mount
        out, other = _run(kept, "img:1")  # a second container on the same mount, at the same time
        assert out == "hello\n" and other["kept"] == "reused" and other["keeper_runs"] == 3, other
        deadline = time.monotonic() + 3  # three idle periods pass while the slow one runs: still mounted
        while time.monotonic() < deadline:
            assert len(_mounts(keep)) == 1
            time.sleep(0.1)
        assert slow.poll() is None  # the checks above ran while it ran
    finally:
        out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0 and out == "slow-done\n", err
    assert json.loads(err.splitlines()[-1])["kept"] == "reused"
    _wait(lambda: not _mounts(keep), "the keeper to unmount once the last container ended")


def test_a_forged_cached_manifest_head_is_not_used(tmp_path: Path, kept: dict) -> None:
    from convstore.crypto import seal, unseal
    from convstore.manifest import Manifest

    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1m", "img:1")
    (cached,) = keep.glob("*.head")  # the head of the manifest, as the first run decoded it (sealed)
    key, store_id, digest = _image_key(tmp_path, "img:1")
    hkey, aad = keeper._head_seal(key, store_id, digest)
    head = Manifest.decode(unseal(cached.read_bytes(), hkey, aad, "head"), head_only=True)
    config = json.loads(head.config_bytes)
    config["config"]["Cmd"] = ["/bin/sh", "-c", "echo FORGED"]
    config["config"]["Entrypoint"] = None
    head.config_bytes = json.dumps(config).encode()
    body = head.encode()
    forged = [seal(body, os.urandom(32), aad),  # sealed under another key
              seal(body, *keeper._head_seal(key, store_id, "sha256:" + "0" * 64)),  # the right key, another digest
              seal(body, *keeper._head_seal(key, "another store", digest)),  # the right key, another store
              body]  # not sealed at all
    for data in forged:
        cached.write_bytes(data)
        out, summary = _run(kept, "img:1")
        assert out == "hello\n" and summary["kept"] == "reused", (out, summary)
    # and the cache the runs rewrote is the store's manifest again
    assert json.loads(Manifest.decode(unseal(cached.read_bytes(), hkey, aad, "head"), head_only=True).config_bytes
                      )["config"]["Cmd"] == ["/bin/sh", "-c", "echo hello"]


def test_a_run_on_a_kept_mount_still_applies_its_own_policy(tmp_path: Path, kept: dict) -> None:
    _run(kept, "--keep-mount", "1m", "img:1")  # kept, under no policy
    reject = tmp_path / "reject.json"
    reject.write_text(json.dumps({"default": [{"type": "reject"}]}))
    p = subprocess.run([sys.executable, "-m", "convstore", "run", "--policy", str(reject), "img:1", "--", "/bin/sh",
                        "-c", "echo RAN"], env=kept, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "RAN" not in p.stdout and "rejected by the node's trust policy" in p.stderr, p
    key, store_id, digest = _image_key(tmp_path, "img:1")
    with keeper.attach(key, store_id, "img:1", digest, op="status") as lease:
        assert lease.runs == 1  # the refused run never asked the keeper
