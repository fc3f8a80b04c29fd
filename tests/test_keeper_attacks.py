"""Attacks on kept image mounts (convstore.engines.keeper): real FUSE and runc, as root.

Each test is a liar against a kept mount or its keeper, and failed on the code before its fix (the
"keeper attack N" commits): 1 a client that drips its request to hold the keeper's only thread; 2 a reader
of the keep directory after ``rm`` + ``gc`` (plaintext manifest head); 3 a client that opens ~1100
connections at once (select(2)); 4 a keeper writing a removed image's profile back into the store; 5 the
keepers of a daemon gone before ``daemon --stop``; 6 a keeper that drips its greeting to hold a run.
One more (a replayed request) checks a property found sound."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

import convstore
from conftest import run_cli
from convstore.engines import keeper
from convstore.errors import KeptMountUnusable
from test_run_keep import _image_key, _keeper_pid, _mounts, _run, _wait, kept  # noqa: F401 - kept: the fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="convstore run needs root (FUSE, runc)")


def _socket_of(keep: Path) -> str:
    (sock,) = keep.glob("*.sock")
    return str(sock)


def test_a_client_that_drips_its_request_does_not_hold_the_keeper(tmp_path: Path, kept: dict) -> None:
    """Attack 1: a client that sends its request a byte at a time (each within the socket timeout) held
    the keeper's single thread in a blocking read: no other run was served, and the keeper ignored its
    idle time, ``rm`` and ``daemon --stop`` for as long as the client kept dripping."""
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1m", "img:1")
    key, store_id, digest = _image_key(tmp_path, "img:1")
    liar = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    liar.connect(_socket_of(keep))
    liar.recv(len(keeper.MAGIC) + 1 + keeper.NONCE)
    liar.sendall((1000).to_bytes(4, "big"))  # announces 1000 bytes, sends them one by one
    stop, dropped = threading.Event(), threading.Event()

    def drip() -> None:
        while not stop.is_set():
            try:
                liar.send(b" ")
            except OSError:
                dropped.set()  # the keeper closed it
                return
            stop.wait(keeper.HANDSHAKE_TIMEOUT / 4)  # the attack's pace: well inside a recv timeout

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        # an honest client is served while the liar drips
        for _ in range(3):
            with keeper.attach(key, store_id, "img:1", digest, op="status") as lease:
                assert lease.runs == 1
        # and the liar is dropped once its handshake time is over
        _wait(dropped.is_set, "the keeper to drop the dripping client", timeout=keeper.HANDSHAKE_TIMEOUT * 4)
    finally:
        stop.set()
        t.join()
        liar.close()
    assert _keeper_pid(keep) > 0 and len(_mounts(keep)) == 1


def test_the_cached_manifest_head_is_not_plaintext_on_disk(tmp_path: Path, kept: dict) -> None:
    """Attack 2: the manifest head cache (``<id>.head``) held the image's config (Env, Cmd, labels), source
    manifest, layer digests and signatures in plaintext, MAC'd only; a keeper that had gone idle before
    ``rm`` + ``gc`` left it there for good: the decrypted metadata of an image the store no longer has."""
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1s", "img:1")
    s = convstore.Store.open(str(tmp_path / "store"), f"file:{tmp_path / 'key'}")
    entry = s.catalog.entry("img:1")
    key = s.manifests.keep_key(entry)
    head = keeper.load_head(key, s.manifests.ident.id, entry)  # the cache is there and used
    assert head is not None and head.name == "img"
    secrets = [head.config_bytes, b"echo hello", head.layers[0].digest.encode(), head.layers[0].diff_id.encode(),
               head.config_bytes[:40]]
    _wait(lambda: not _mounts(keep) and not list(keep.glob("*.sock")), "the keeper to go idle and exit")
    run_cli(kept, "rm", "img:1")
    run_cli(kept, "gc")
    left = {p.name: p.read_bytes() for p in keep.iterdir() if p.is_file()}
    assert any(n.endswith(".head") for n in left)  # what this test is about: the cache outlived the image
    for name, data in left.items():
        for secret in secrets:
            assert secret not in data, f"{name} holds the removed image's plaintext {secret[:40]!r}"


def test_many_connections_at_once_do_not_kill_the_keeper(tmp_path: Path, kept: dict) -> None:
    """Attack 3: the keeper waited with select(2), which cannot watch a descriptor above 1023: a client
    of the user that opened ~1100 connections at once (the keeper accepts each one) made it raise, and
    the keeper exited, unmounting its image under the containers running on it."""
    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1m", "img:1")
    pid = _keeper_pid(keep)
    key, store_id, digest = _image_key(tmp_path, "img:1")
    path = _socket_of(keep)
    held = []
    try:
        for _ in range(1100):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            held.append(c)
            deadline = time.monotonic() + 10
            while True:  # the listen backlog is full until the keeper accepts: a bounded retry
                try:
                    c.connect(path)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the keeper stopped accepting"
                    time.sleep(0.001)
                except (FileNotFoundError, ConnectionRefusedError):
                    (log,) = keep.glob("*.log")
                    pytest.fail(f"the keeper died after {len(held)} connections: {log.read_text()[-300:]}")
        # the keeper has accepted (and greeted) every one of them: its descriptors went past 1023
        for c in held[-3:]:
            assert c.recv(len(keeper.MAGIC)) == keeper.MAGIC
    finally:
        for c in held:
            c.close()
    # still there, still serving
    with keeper.attach(key, store_id, "img:1", digest, op="status") as lease:
        assert lease.pid == pid and lease.runs == 1
    assert len(_mounts(keep)) == 1


def _profiles(store: Path, digest: str) -> list[Path]:
    return [p for p in store.rglob("*") if p.name.startswith(digest.split(":", 1)[1]) and "profiles" in p.parts]


def test_a_keeper_writes_nothing_to_the_store_for_a_removed_image(tmp_path: Path, kept: dict) -> None:
    """Attack 4: a keeper whose image was removed and collected while a run held its mount merged what
    that run read into the image's start-up profile when it ended, and at exit: a new sealed object
    (``profiles/<digest>``) for an image ``rm`` + ``gc`` had just taken out of the store."""
    keep, store = tmp_path / "keep", tmp_path / "store"
    _run(kept, "--keep-mount", "1m", "img:1")
    key, store_id, digest = _image_key(tmp_path, "img:1")
    with keeper.attach(key, store_id, "img:1", digest) as lease:  # a run on the kept mount
        for name in ("usr/bin/ls", "usr/bin/cat", "usr/lib/os-release"):
            assert (Path(lease.root) / name).read_bytes()  # what this run reads: recorded by the keeper
        run_cli(kept, "rm", "img:1")
        run_cli(kept, "gc")
        assert not _profiles(store, digest)  # gc took the image's profile with it
    _wait(lambda: not _mounts(keep) and not list(keep.glob("*.sock")), "the keeper of the removed image to exit",
          timeout=keeper.CHECK_INTERVAL + 15)
    assert not _profiles(store, digest), "the keeper wrote a profile of the removed image into the store"


def test_daemon_stop_stops_the_keepers_of_a_daemon_already_gone(tmp_path: Path, kept: dict) -> None:
    """Attack 5: ``convstore daemon --stop`` stopped this user's keepers only when a daemon answered: the
    keepers of a daemon that was stopped with SIGTERM (which leaves them, by design) or had died kept
    their decrypted mounts for their whole idle period (5 min by default; ``--keep-mount`` any), and
    ``daemon --stop`` failed with "no daemon" and left them."""
    import json
    import signal

    keep = tmp_path / "keep"
    (tmp_path / "d").mkdir(mode=0o700)
    env = dict(kept, CONVSTORE_DAEMON="1", CONVSTORE_DAEMON_SOCKET=str(tmp_path / "d" / "cli.sock"))
    run_cli(env, "daemon", "--background")
    pid = json.loads(run_cli(env, "daemon", "--status").stdout)["pid"]
    try:
        out, first = _run(env, "img:1")
        assert out == "hello\n" and first["kept"] == "new", first
    finally:
        os.kill(pid, signal.SIGTERM)  # as a service manager stops it
    _wait(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon to exit")
    assert len(_mounts(keep)) == 1  # its keeper is its own session: still up
    p = run_cli(env, "daemon", "--stop", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr  # no daemon to stop: said so, one line
    _wait(lambda: not _mounts(keep), "daemon --stop to stop the keeper of the daemon that is gone")


def test_a_recorded_request_replayed_on_a_new_connection_is_refused(tmp_path: Path, kept: dict) -> None:
    """Checked sound (no fix): a request recorded from an honest run (its MAC over that connection's
    keeper nonce) gets nothing when replayed on another connection; fails if the keeper's nonce were not
    fresh per connection (checked by making it constant)."""
    import json

    keep = tmp_path / "keep"
    _run(kept, "--keep-mount", "1m", "img:1")
    key, store_id, digest = _image_key(tmp_path, "img:1")
    hello = len(keeper.MAGIC) + 1 + keeper.NONCE

    def request(c: socket.socket, body: bytes) -> dict:
        c.sendall(len(body).to_bytes(4, "big") + body)
        n = int.from_bytes(c.recv(4), "big")
        data = b""
        while len(data) < n:
            data += c.recv(n - len(data))
        return json.loads(data)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:  # the honest run, recorded
        c.settimeout(10)
        c.connect(_socket_of(keep))
        theirs, ours = c.recv(hello)[-keeper.NONCE:], os.urandom(keeper.NONCE)
        recorded = json.dumps({"op": "status", "ref": "img:1", "digest": digest, "nonce": ours.hex(),
                               "mac": keeper._mac(key, "client", theirs, ours, digest, "img:1")}).encode()
        assert request(c, recorded)["ok"] is True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:  # the liar, replaying it
        c.settimeout(10)
        c.connect(_socket_of(keep))
        c.recv(hello)
        ans = request(c, recorded)
        assert ans["ok"] is False and "cannot prove" in ans["why"] and "root" not in ans, ans


def test_a_keeper_that_drips_its_greeting_is_given_up_in_bounded_time(tmp_path: Path, kept: dict) -> None:
    """Attack 6: a run waited for its keeper's greeting and answer with a timeout per recv(2), so a
    keeper (of the user: one wedged, or a liar at the socket) that sent a byte now and then held the run
    as long as it liked, where a hung keeper is given up after HANDSHAKE_TIMEOUT."""
    import signal

    key, store_id, digest = _image_key(tmp_path, "img:1")
    keep = tmp_path / "keep"
    keep.mkdir(mode=0o700)
    path = keep / f"{keeper.keeper_id(store_id, digest)}.sock"
    hello = keeper.MAGIC + bytes([keeper.KEEP_VERSION]) + os.urandom(keeper.NONCE)
    pid = os.fork()
    if pid == 0:  # the dripping keeper: one byte of its greeting every HANDSHAKE_TIMEOUT / 4
        try:
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            s.listen(8)
            while True:
                c, _ = s.accept()
                try:
                    for i in range(len(hello)):
                        c.sendall(hello[i:i + 1])
                        time.sleep(keeper.HANDSHAKE_TIMEOUT / 4)  # the attack's pace
                except OSError:
                    pass
                c.close()
        finally:
            os._exit(0)
    try:
        _wait(path.exists, "the dripping keeper to listen")
        start = time.monotonic()
        with pytest.raises(KeptMountUnusable, match="did not answer"):
            keeper.attach(key, store_id, "img:1", digest)
        assert time.monotonic() - start < keeper.HANDSHAKE_TIMEOUT + 1.0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
