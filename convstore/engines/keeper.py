"""Kept image mounts: one read-only FUSE mount of an image serves many ``convstore run``s.

A run's root filesystem is read-only (engines/run.py), so after a run the
image's mount can stay up, served by a *keeper* process, and the next run of
the same image (same store, same manifest digest, same user) starts its
container on it: no image open, no mount, and a warm kernel dentry and page
cache.  The keeper unmounts and exits once no run has used it for its idle
period (``--keep-mount DURATION``).

Trust (docs/security.md, "Kept mounts").  A reusing run gets no more than it
would have got alone:

* it resolves the name to a manifest digest in the store itself and applies
  its own policy before it looks for a keeper (engines/run.py); the keeper is
  found by that digest and the store's id, never asked what a name means;
* it and the keeper prove to each other that each can unwrap the image's
  data key: each answers the other's fresh 32-byte nonce with an HMAC-SHA256
  under a key derived from that data key
  (:meth:`~convstore.core.manifests.ManifestStore.keep_key`), compared in
  constant time; the keeper's proof covers the mount it names.  A client
  whose key provider cannot unwrap gets no mount, and a socket that cannot
  prove it holds the key is not used;
* the keeper's socket and mount point live in a 0700 directory of this user
  (:func:`keep_dir`), the socket is 0600, and both ends check the other's
  uid (``SO_PEERCRED``): a socket or mount of another uid is never used;
* a dead keeper (connection refused) or a hung one (no answer within
  :data:`HANDSHAKE_TIMEOUT`) is not used: the run mounts the image itself,
  and the next keeper detaches the dead mount first;
* a keeper serves only while its image is in the store's catalog: it checks
  the name a client resolved at every request, and every catalog entry at
  each idle check (:data:`CHECK_INTERVAL`); after ``convstore rm`` it stops
  taking runs and exits once the running ones end.

Lifetime: each run holds its connection to the keeper open while its
container runs (a lease; a run that dies drops it).  With no lease for the
idle period the keeper saves the start-up profile, unmounts and exits.  What
the mount's readers touch is recorded and merged into the image's start-up
profile whenever the last running container on it ends.

Process model: the first run forks the keeper before any thread of its own
starts (a process with threads cannot be forked safely; a run that has some
does not keep its mount).  A double fork and ``setsid`` take the keeper out
of the run's process group and session (a daemon's child has its group
killed when its command ends); its standard streams are /dev/null, so no
caller waits on it for an end of file.

Wire format, version 1 (all on one unix stream socket per run):
keeper -> client ``MAGIC`` + version byte + 32-byte nonce; client -> keeper a
4-byte big-endian length and a JSON object ``{"op": "run"|"status", "ref",
"digest", "nonce": hex, "mac": hex}``, ``mac`` = HMAC(key, "client",
keeper nonce, client nonce, digest, ref); keeper -> client the same framing,
``{"ok": true, "root", "dev", "pid", "runs", "mac"}`` with ``mac`` = HMAC(key,
"keeper", client nonce, keeper nonce, digest, root, dev), or ``{"ok": false,
"why"}``.  Each HMAC input field is length-prefixed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import select
import signal
import stat
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import _socket  # a run's client side: the socket module's wrapper costs a start ~3-5 ms of imports

from ..daemon.protocol import peer, private_dir
from ..errors import ConvstoreError, KeptMountUnusable

if TYPE_CHECKING:
    import socket

    from ..core.catalog import CatalogEntry
    from ..core.repository import Repository
    from ..manifest import Manifest
    from ..reader.background import BackgroundConfig

log = logging.getLogger(__name__)

KEEP_VERSION = 1
MAGIC = b"convstore-keep\0"
NONCE = 32
MAX_MESSAGE = 64 << 10
#: a keeper that has not answered a run within this is taken as hung: the run mounts the image itself
HANDSHAKE_TIMEOUT = 2.0
#: how long a first run waits for the keeper it forked to mount the image
READY_TIMEOUT = 30.0
#: a keeper checks this often that its image is still in the store
CHECK_INTERVAL = 5.0
_LEN = struct.Struct("!I")


def keep_dir() -> str:
    """Where this user's keepers are: ``$CONVSTORE_KEEP_DIR``, else ``$XDG_RUNTIME_DIR/convstore/keep``,
    else ``/run/convstore/keep`` for root, else ``/tmp/convstore-UID/keep``."""
    explicit = os.environ.get("CONVSTORE_KEEP_DIR")
    if explicit:
        return os.path.abspath(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "convstore", "keep")
    if os.geteuid() == 0:
        return "/run/convstore/keep"
    return f"/tmp/convstore-{os.geteuid()}/keep"


def _check_private(d: str, create: bool) -> None:
    """``d`` is a directory of this user closed to everyone else (0700), in a parent only this user (or
    root) can write: what is in it is this user's."""
    if create:
        parent = os.path.dirname(d)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    try:
        st, pst = os.lstat(d), os.lstat(os.path.dirname(d))
    except FileNotFoundError:
        raise KeptMountUnusable(f"no kept mounts ({d} does not exist)") from None
    if not private_dir(st) or st.st_mode & 0o077:
        raise KeptMountUnusable(f"{d} is not a private directory of this user (0700): not used for kept mounts")
    if not stat.S_ISDIR(pst.st_mode) or pst.st_uid not in (0, os.geteuid()) or pst.st_mode & 0o022:
        raise KeptMountUnusable(f"{os.path.dirname(d)} can be written by others: not used for kept mounts")


def keeper_id(store_id: str, digest: str) -> str:
    """The name of an image's keeper in :func:`keep_dir`: the store's id and the manifest's digest."""
    return hashlib.sha256(f"convstore keep v1\0{store_id}\0{digest}".encode()).hexdigest()[:32]


def _mac(key: bytes, *fields: str | bytes) -> str:
    h = hmac.new(key, MAGIC + bytes([KEEP_VERSION]), hashlib.sha256)
    for f in fields:
        b = f.encode() if isinstance(f, str) else f
        h.update(_LEN.pack(len(b)) + b)
    return h.hexdigest()


def _send(sock: _socket.socket, doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_by(sock: _socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, all of them by ``deadline`` (monotonic): a peer that drips them is given up
    (TimeoutError) as one that sends nothing is."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError
        buf += part
    return bytes(buf)


def _recv(sock: _socket.socket, deadline: float) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_by(sock, _LEN.size, deadline))
    if n > MAX_MESSAGE:
        raise ValueError("message too large")
    return _doc(_recv_by(sock, n, deadline))


def _doc(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _framed(buf: bytearray) -> dict[str, Any] | None:
    """The message in ``buf`` if it has all arrived, else None (the keeper never blocks on one client)."""
    if len(buf) < _LEN.size:
        return None
    (n,) = _LEN.unpack(buf[:_LEN.size])
    if n > MAX_MESSAGE:
        raise ValueError("message too large")
    return _doc(bytes(buf[_LEN.size:_LEN.size + n])) if len(buf) >= _LEN.size + n else None


class Lease:
    """A run's hold on a kept mount: the mount stays while this is open."""

    def __init__(self, sock: _socket.socket, root: str, pid: int, runs: int) -> None:
        self.sock, self.root, self.pid, self.runs = sock, root, pid, runs

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _paths(store_id: str, digest: str) -> tuple[str, str, str, str]:
    d = keep_dir()
    kid = keeper_id(store_id, digest)
    return d, os.path.join(d, kid + ".sock"), os.path.join(d, kid + ".root"), os.path.join(d, kid + ".lock")


def _head_seal(key: bytes, store_id: str, digest: str) -> tuple[bytes, bytes]:
    """The AES-256-GCM key and associated data of an image's cached head (format ``head`` v1): a key of
    its own, derived from the image's keep key, so the file is sealed like the manifest it comes from."""
    from blake3 import blake3

    return (blake3(key, derive_key_context="convstore v1 kept mount head").digest(),
            f"convstore keep head v1\0{store_id}\0{digest}".encode())


def load_head(key: bytes, store_id: str, entry: CatalogEntry) -> Manifest | None:
    """The head of ``entry``'s manifest (:meth:`Manifest.decode` ``head_only``) as an earlier run of this
    user cached it in the keep directory, if it unseals under ``key`` (the image's :meth:`keep_key`) for
    this store and digest; else None (the caller decodes the manifest)."""
    from ..crypto import unseal
    from ..manifest import Manifest

    digest = str(entry.manifest_digest)
    try:
        _check_private(keep_dir(), create=False)
        fd = os.open(_head_path(store_id, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 16 << 20:
                return None
            data = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
    except (OSError, KeptMountUnusable):
        return None
    try:
        m = Manifest.decode(unseal(data, *_head_seal(key, store_id, digest), "cached manifest head"),
                            head_only=True)
    except ConvstoreError:
        return None
    return m if m.name == entry.ref.name else None


def save_head(key: bytes, store_id: str, entry: CatalogEntry, head: Manifest) -> None:
    """Cache a manifest head for :func:`load_head` (sealed, 0600, in the keep directory; best effort)."""
    from ..crypto import seal

    digest = str(entry.manifest_digest)
    path = _head_path(store_id, digest)
    sealed = seal(head.encode(), *_head_seal(key, store_id, digest))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        _check_private(os.path.dirname(path), create=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, sealed)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, KeptMountUnusable):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _head_path(store_id: str, digest: str) -> str:
    return os.path.join(keep_dir(), keeper_id(store_id, digest) + ".head")


def present(store_id: str, digest: str) -> bool:
    """Whether a keeper of this image may be up (its socket is there): one ``lstat``."""
    return os.path.lexists(_paths(store_id, digest)[1])


def attach(key: bytes, store_id: str, ref: str, digest: str, *, op: str = "run",
           timeout: float = HANDSHAKE_TIMEOUT) -> Lease:
    """The kept mount of image ``digest`` (which the caller resolved ``ref`` to, in its own store), held
    for one run; :class:`KeptMountUnusable` if there is none or it cannot be trusted or reached in time.
    ``key``: the caller's :meth:`keep_key` of the image.  ``op`` ``status``: only ask (no lease)."""
    d, path, root, lock = _paths(store_id, digest)
    _check_private(d, create=False)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeptMountUnusable("no kept mount of this image") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise KeptMountUnusable(f"{path} is not a socket of this user: not used")
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
        pid, uid = peer(s)
        if uid != os.geteuid():
            raise KeptMountUnusable(f"the keeper at {path} runs as uid {uid}, not this user's: not used")
        deadline = time.monotonic() + timeout  # for the whole handshake, however the keeper paces it
        hello = _recv_by(s, len(MAGIC) + 1 + NONCE, deadline)
        if hello[:len(MAGIC)] != MAGIC or hello[len(MAGIC)] != KEEP_VERSION:
            raise KeptMountUnusable(f"{path} does not speak version {KEEP_VERSION} of the keeper protocol")
        theirs, ours = hello[-NONCE:], os.urandom(NONCE)
        _send(s, {"op": op, "ref": ref, "digest": digest, "nonce": ours.hex(),
                  "mac": _mac(key, "client", theirs, ours, digest, ref)})
        ans = _recv(s, deadline)
        if ans.get("ok") is not True:
            raise KeptMountUnusable(f"the keeper refused: {str(ans.get('why'))[:200]}")
        got_root, dev = str(ans["root"]), int(ans["dev"])
        want = _mac(key, "keeper", ours, theirs, digest, got_root, str(dev))
        if not hmac.compare_digest(want, str(ans.get("mac", ""))):
            raise KeptMountUnusable(f"the keeper at {path} cannot prove it holds the image's key: not used")
        if got_root != root:
            raise KeptMountUnusable(f"the keeper names a mount outside {d}: not used")
        if os.stat(root).st_dev != dev:
            raise KeptMountUnusable(f"the kept mount at {root} is gone")
        s.settimeout(None)
        return Lease(s, root, pid, int(ans.get("runs", 0)))
    except KeptMountUnusable:
        s.close()
        raise
    except TimeoutError:
        s.close()
        raise KeptMountUnusable(f"the keeper at {path} did not answer within {timeout:g} s (hung)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        s.close()
        if isinstance(e, ConnectionRefusedError) and not _held(lock):
            _clean_dead(path, root)
        raise KeptMountUnusable(f"the keeper at {path} cannot be used: {e}") from None


def _clean_dead(path: str, root: str) -> None:
    """What a dead keeper (killed) left: its socket, and its mount ("transport endpoint is not connected",
    detached), so later runs do not try it again."""
    try:
        os.unlink(path)
    except OSError:
        pass
    from ..reader.fuse import recover_stale_mount

    try:
        recover_stale_mount(root)
        os.rmdir(root)
    except (ConvstoreError, OSError):
        pass


def spawn(store: Repository, entry: CatalogEntry, manifest: Manifest, key: bytes, keep_seconds: float, *,
          prefetch: bool = True, background: BackgroundConfig | None = None) -> int:
    """Fork a keeper that mounts the image and serves it until idle for ``keep_seconds``; its pid once
    the mount serves.  :class:`KeptMountUnusable` if it cannot (this process has threads, another keeper
    of this image is starting, or it failed: the caller mounts the image itself)."""
    if threading.active_count() != 1:
        raise KeptMountUnusable("this process runs threads: a keeper cannot be forked from it")
    digest = str(entry.manifest_digest)
    d, path, root, lock = _paths(store.manifests.ident.id, digest)
    _check_private(d, create=True)
    import fcntl

    lockfd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lockfd)
        raise KeptMountUnusable("another keeper of this image is starting or does not answer") from None
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the intermediate child: forks the keeper and exits (the keeper is nobody's child)
            code = 1
            try:
                os.close(r)
                os.setsid()
                if os.fork() == 0:
                    code = 1
                    try:
                        code = _keeper(store, entry, manifest, key, keep_seconds, path, root, w, lockfd,
                                       prefetch, background)
                    except BaseException as e:  # noqa: BLE001 - reported to the run that forked it, if it waits
                        try:
                            os.write(w, b"E" + str(e).encode(errors="replace")[:300] + b"\n")
                        except OSError:
                            pass
                    finally:
                        os._exit(code)
                code = 0
            finally:
                os._exit(code)
    finally:
        os.close(lockfd)  # the keeper holds the lock (the same open file description) for its lifetime
        os.close(w)
    try:
        os.waitpid(pid, 0)
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        while b"R" not in buf and b"E" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                raise KeptMountUnusable(f"the keeper did not mount the image within {READY_TIMEOUT:g} s")
            part = os.read(r, 512)
            if not part:
                raise KeptMountUnusable("the keeper exited before it mounted the image")
            buf += part
    finally:
        os.close(r)
    lines = buf.split(b"\n")
    status = next((x for x in lines if x[:1] in (b"R", b"E")), b"")
    if status[:1] != b"R" or not lines[0].isdigit():
        why = status[1:].decode(errors="replace") or "no answer"
        raise KeptMountUnusable(f"the keeper could not start: {why}")
    return int(lines[0])


# ---------------------------------------------------------------- the keeper process


class _Conn:
    def __init__(self, sock: socket.socket, nonce: bytes) -> None:
        self.sock, self.nonce = sock, nonce
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        self.leased = False
        self.buf = bytearray()  # its request so far: read as it comes, never waited for


def _keeper(store: Repository, entry: CatalogEntry, manifest: Manifest, key: bytes, keep_seconds: float,
            path: str, root: str, ready: int, lockfd: int, prefetch: bool,
            background: BackgroundConfig | None) -> int:
    """The keeper's life (in the forked process): mount, serve runs until idle, unmount."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    # its warnings and errors (what it logs to stderr) in <id>.log, this keeper's life only (0600)
    logfd = os.open(root[:-len(".root")] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.dup2(logfd, 2)
    os.close(logfd)
    os.write(ready, b"%d\n" % os.getpid())
    os.ftruncate(lockfd, 0)
    os.pwrite(lockfd, b"%d\n" % os.getpid(), 0)  # for stop_keepers
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _f: stopping.append(signum))
    signal.set_wakeup_fd(wake_w)

    import socket

    from ..reader.background import BackgroundConfig, start_fetching
    from ..reader.fuse import BackgroundMount, recover_stale_mount
    from ..reader.imagefs import PREFETCH_ON_OPEN, ImageFS
    from ..reader.profile import save_start

    digest = str(entry.manifest_digest)
    fs = ImageFS.from_manifest(store, entry, manifest, prefetch_on_open=PREFETCH_ON_OPEN)
    profile = store.manifests.load_profile(entry) if prefetch else None
    start_fetching(fs.fetcher, profile, background or BackgroundConfig.from_env(), str(entry.ref), threaded=True)
    fs.fetcher.start_recording()

    def save_profile() -> None:
        recorded = fs.fetcher.stop_recording()
        fs.fetcher.start_recording()
        if not _image_present(store, digest):
            return  # removed (and maybe collected): nothing of it goes back into the store
        try:
            save_start(store, entry, recorded)
        except (ConvstoreError, OSError) as e:
            log.warning("kept mount of %s: cannot save the start-up profile: %s", entry.ref, e)

    if os.path.isdir(root):
        recover_stale_mount(root)  # a dead keeper's mount ("transport endpoint is not connected")
    mount = BackgroundMount(fs, root)
    mount.__enter__()
    listener: socket.socket | None = None
    inode = -1
    try:
        dev = os.stat(root).st_dev
        with _umask(0o177):
            try:
                os.unlink(path)  # a dead keeper's (we hold the lock)
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            listener.bind(path)
        os.chmod(path, 0o600)
        inode = os.lstat(path).st_ino
        listener.listen(64)
        os.write(ready, b"R\n")
        os.close(ready)
        _serve(store, entry, key, digest, keep_seconds, listener, root, dev, wake_r, stopping, save_profile,
               lambda: _unlisten(listener, path, inode))
    finally:
        if listener is not None:
            _unlisten(listener, path, inode)
        save_profile()
        mount.__exit__(None, None, None)
        if not _image_present(store, digest):  # removed: its cached head goes too
            try:
                os.unlink(_head_path(store.manifests.ident.id, digest))
            except OSError:
                pass
        try:
            os.rmdir(root)
        except OSError:
            pass
        fs.close()
    return 0


def _unlisten(listener: socket.socket, path: str, inode: int) -> None:
    """Stop listening, and remove the socket if it is still this keeper's."""
    listener.close()
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


class _umask:
    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __enter__(self) -> None:
        self.old = os.umask(self.mask)

    def __exit__(self, *exc: object) -> None:
        os.umask(self.old)


def _image_present(store: Repository, digest: str) -> bool:
    try:
        return any(e.manifest_digest == digest for e in store.catalog.list())
    except (ConvstoreError, OSError):
        return False


def _mount_alive(root: str, dev: int) -> bool:
    try:
        os.statvfs(root)  # asks the server (a stat may be answered from the kernel's cache)
        return os.stat(root).st_dev == dev
    except OSError:
        return False


def _serve(store: Repository, entry: CatalogEntry, key: bytes, digest: str, keep_seconds: float,
           listener: socket.socket, root: str, dev: int, wake: int, stopping: list[int],
           save_profile: Any, unlisten: Any) -> None:
    conns: dict[int, _Conn] = {}
    runs = 0
    idle_since = time.monotonic()
    checked = time.monotonic()
    accepting = True

    def stop_accepting() -> None:
        nonlocal accepting
        if accepting:
            accepting = False
            unlisten()  # no run finds it from now on
            for c in [c for c in conns.values() if not c.leased]:
                drop(c)

    def drop(c: _Conn) -> None:
        nonlocal idle_since
        conns.pop(c.sock.fileno(), None)
        c.sock.close()
        if c.leased and not any(x.leased for x in conns.values()):
            idle_since = time.monotonic()
            save_profile()  # the last container on the mount ended: what it read goes into the profile

    def refuse(c: _Conn, why: str) -> None:
        try:
            _send(c.sock, {"ok": False, "why": why})
        except OSError:
            pass
        drop(c)

    while True:
        now = time.monotonic()
        leased = any(c.leased for c in conns.values())
        if stopping:
            stop_accepting()
        if not leased and (not accepting or now - idle_since >= keep_seconds):
            return
        if accepting and now - checked >= CHECK_INTERVAL:
            checked = now
            if not _image_present(store, digest) or not _mount_alive(root, dev):
                stop_accepting()  # removed from the store: no new run; the running ones end first
                continue
        waits = [CHECK_INTERVAL - (now - checked)]
        if not leased:
            waits.append(keep_seconds - (now - idle_since))
        waits += [c.deadline - now for c in conns.values() if not c.leased]
        fds = [wake, *conns] + ([listener.fileno()] if accepting else [])
        readable = _readable(fds, max(0.0, min(waits)))
        for fd in readable:
            if fd == wake:
                try:
                    os.read(wake, 512)
                except OSError:
                    pass
            elif fd == listener.fileno():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                if peer(conn)[1] != os.geteuid():
                    conn.close()  # never serves another user
                    continue
                nonce = os.urandom(NONCE)
                conn.settimeout(HANDSHAKE_TIMEOUT)
                try:
                    conn.sendall(MAGIC + bytes([KEEP_VERSION]) + nonce)
                except OSError:
                    conn.close()
                    continue
                conns[conn.fileno()] = _Conn(conn, nonce)
            elif fd in conns:
                c = conns[fd]
                if c.leased:  # a lease sends nothing: this is its end
                    drop(c)
                    continue
                try:
                    part = c.sock.recv(MAX_MESSAGE)  # readable: does not block
                    if not part:
                        raise EOFError
                    c.buf += part
                    req = _framed(c.buf)
                    if req is None:
                        continue  # more to come, before its deadline
                    theirs = bytes.fromhex(str(req["nonce"]))
                    ref, op = str(req["ref"]), req.get("op")
                    if len(theirs) != NONCE or op not in ("run", "status"):
                        raise ValueError("malformed request")
                    if req.get("digest") != digest:
                        refuse(c, "another image")
                        continue
                    if not hmac.compare_digest(_mac(key, "client", c.nonce, theirs, digest, ref),
                                               str(req.get("mac", ""))):
                        refuse(c, "the client cannot prove it can unwrap the image's key")
                        continue
                except (OSError, EOFError, ValueError, KeyError, TypeError):
                    drop(c)
                    continue
                try:
                    named = store.catalog.entry(ref).manifest_digest
                except (ConvstoreError, OSError):
                    named = None
                if named != digest or not _mount_alive(root, dev):
                    refuse(c, "the image is no longer in the store" if named != digest else "the mount is gone")
                    stop_accepting()
                    continue
                if op == "run":
                    runs += 1
                try:
                    _send(c.sock, {"ok": True, "root": root, "dev": dev, "pid": os.getpid(), "runs": runs,
                                   "mac": _mac(key, "keeper", theirs, c.nonce, digest, root, str(dev))})
                except OSError:
                    drop(c)
                    continue
                if op == "run":
                    c.leased = True
                    c.sock.settimeout(None)
                else:
                    drop(c)
        now = time.monotonic()
        for c in [c for c in conns.values() if not c.leased and c.deadline <= now]:
            drop(c)  # silent too long mid-handshake


def _readable(fds: list[int], timeout: float) -> list[int]:
    """Which of ``fds`` can be read (or hung up) within ``timeout`` s: poll(2), which, unlike select(2),
    has no limit on descriptor numbers (a keeper holds one per connection)."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return [fd for fd, _ in p.poll(timeout * 1000)]


def stop_keepers(wait: float = 10.0) -> int:
    """Ask every keeper of this user (in :func:`keep_dir`) to stop: each takes no new run, and unmounts
    and exits once its running containers end.  How many were asked; waits up to ``wait`` seconds for
    those with no running container to be gone."""
    import fcntl

    d = keep_dir()
    try:
        _check_private(d, create=False)
        names = [n for n in os.listdir(d) if n.endswith(".lock")]
    except (KeptMountUnusable, OSError):
        return 0
    asked: list[str] = []
    for n in names:
        lock = os.path.join(d, n)
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # no keeper holds it
            except BlockingIOError:
                pass
            text = os.pread(fd, 32, 0).strip()
            if not text.isdigit():
                continue
            pidfd = os.pidfd_open(int(text))
            try:
                try:  # the lock still held after the pidfd was taken: that pid is still the keeper
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    continue
                except BlockingIOError:
                    pass
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                asked.append(lock)
            finally:
                os.close(pidfd)
        except OSError:
            continue
        finally:
            os.close(fd)
    count = len(asked)
    deadline = time.monotonic() + wait
    while asked and time.monotonic() < deadline:
        asked = [lock for lock in asked if _held(lock)]
        if asked:
            time.sleep(0.02)  # bounded: an idle keeper unmounts and exits within ms
    return count


def _held(lock: str) -> bool:
    """Whether a keeper still holds this lock (it is alive)."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


__all__ = ["HANDSHAKE_TIMEOUT", "KeptMountUnusable", "Lease", "attach", "keep_dir", "keeper_id", "load_head", "present", "save_head", "spawn", "stop_keepers"]
