"""A containerd proxy snapshotter whose image layers are convstore's, lazily.

containerd loads it from ``[proxy_plugins]`` (``type = "snapshot"``) and
talks containerd's snapshots API to it over a unix socket (gRPC; the schema
is :mod:`convstore.engines.containerd_api`).  It keeps containerd's snapshot
model (committed, active and view snapshots, each with a parent) and its
mounts are overlayfs mounts, as containerd's own overlay snapshotter makes
them, with one difference: a committed layer whose chain ID belongs to an
image in the convstore store is never unpacked.  It is that layer's
directory in the :class:`~convstore.engines.layerstore.LayerMount` it is
given: a :class:`~convstore.engines.layerstore.LayerStore` served over FUSE
by this process (one layer as an overlay lower directory, files fetched
lazily), as stargz-snapshotter's ``NewSnapshotter(ctx, root, targetFs)``
receives its filesystem.

How containerd finds out (its "remote snapshot" protocol): a ``Prepare``
carrying ``containerd.io/snapshot.ref`` = a stored layer's chain ID commits
that layer at once, labelled with that ref, and answers ALREADY_EXISTS;
containerd then finds the committed target by the label and skips the
layer, never fetching its blob.  containerd's own pull-and-unpack (CRI,
nerdctl, Go clients) sends that label for every layer; ``ctr images pull``
in containerd 1.6 does not (it fetches every blob, then unpacks without the
label), so :func:`~convstore.engines.containerd_load.load_into_containerd`
(``convstore containerd-load``) does
those calls itself: it writes the image's manifest and config into
containerd's content store, prepares each layer by its chain ID, and
creates the image record.  ``ctr run --snapshotter convstore`` then finds
the image unpacked.

Layers the store does not hold are unpacked by containerd into ordinary
directories, as with the overlay snapshotter.  State lives in
``ROOT/metadata.db`` (:mod:`convstore.engines.snapmeta`, one transaction per change), active
snapshots' files in ``ROOT/snapshots/<id>/{fs,work}``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConvstoreError
from ..reader.fuse import mount_answers
from ..service import sdnotify
from . import containerd_api as api
from .containerd_api import REF_LABEL, grpc_module
from .ctrfilter import FilterError, Subject, parse_all
from ..metrics import reporting
from .layerstore import LayerMount, LayerStore
from .snapmeta import MAX_KEY, Snap, SnapshotDB, label_problem

log = logging.getLogger(__name__)

REMOTE_LABEL = "containerd.io/snapshot/convstore.layer"  # set on a committed convstore layer: its blob digest


#: labels that are convstore's alone: set on its own layers, dropped from what a client gives
RESERVED_PREFIX = "containerd.io/snapshot/convstore."
#: one List answer stays far below gRPC's 4 MiB message limit
LIST_BATCH_BYTES = 1 << 20
NAMESPACE_HEADER = "containerd-namespace"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KINDS = {api.VIEW: "view", api.ACTIVE: "active", api.COMMITTED: "committed"}


def _reserved(label: str) -> bool:
    return label == REF_LABEL or label.startswith(RESERVED_PREFIX)


class SnapshotError(Exception):
    def __init__(self, code: Any, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class Snapshotter:
    """The snapshot model over ``root``, whose convstore layers are those of ``layers``
    (mounted while the snapshotter is in a ``with``; closed with it)."""

    def __init__(self, root: str, layers: LayerMount) -> None:
        self._grpc = grpc_module()
        self.root = os.path.abspath(root)
        if "," in self.root or ":" in self.root:
            raise ConvstoreError(f"snapshotter root {self.root!r}: ',' and ':' would split overlay mount options")
        os.makedirs(os.path.join(self.root, "snapshots"), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.root, "l"), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)  # the layers below are decrypted image files
        self.layers = layers.layers
        self.layers.scan()
        self._mount = layers
        self._lock = threading.RLock()
        self._db = SnapshotDB(self.root)
        self._snaps = self._db.load()
        self._normalize()

    def __enter__(self) -> Snapshotter:
        self._mount.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mount.__exit__(*exc)
        self.layers.close()
        self._db.close()

    # -- state --------------------------------------------------------------
    def _normalize(self) -> None:
        """A convstore layer carries convstore's labels alone, and no other
        snapshot carries them (a state written by earlier versions may)."""
        fixed = {}
        for key, s in self._snaps.items():
            want = self._remote_labels(key, s.remote) if s.remote else \
                {k: v for k, v in s.labels.items() if not _reserved(k)}
            if want != s.labels:
                s.labels = want
                fixed[key] = s
        if fixed:
            log.warning("snapshotter: reset the convstore labels of %d snapshot(s)", len(fixed))
            self._db.write(fixed)

    @staticmethod
    def _remote_labels(chain: str, digest: str) -> dict[str, str]:
        return {REF_LABEL: chain, REMOTE_LABEL: digest}  # what containerd looks the target up by

    def _client_labels(self, labels: Any, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` updated with a client's labels, bounded; convstore's own labels
        are dropped (a client's label never makes its snapshot a convstore layer)."""
        out = dict(base or {})
        out.update((k, v) for k, v in dict(labels).items() if not _reserved(k))
        problem = label_problem(out)
        if problem:
            raise self._err("INVALID_ARGUMENT", problem)
        return out

    def _check_key(self, key: str) -> None:
        if not key or len(key.encode()) > MAX_KEY:
            raise self._err("INVALID_ARGUMENT", f"a snapshot key must have 1 to {MAX_KEY} bytes")
        if _DIGEST.fullmatch(key):
            raise self._err("INVALID_ARGUMENT", f"snapshot key {key}: bare digests name convstore's layers")

    def _err(self, code: str, msg: str) -> SnapshotError:
        return SnapshotError(getattr(self._grpc.StatusCode, code), msg)

    def _get(self, key: str) -> Snap:
        s = self._snaps.get(key)
        if s is None:
            raise self._err("NOT_FOUND", f"snapshot {key} does not exist")
        return s

    def _commit_remote(self, chain_id: str) -> bool:
        """Commit the stored layer named by ``chain_id`` (and its parents); whether it is one."""
        todo: list[tuple[str, str, str]] = []
        while chain_id and chain_id not in self._snaps:
            hit = self.layers.chain(chain_id)
            if hit is None:
                return False
            todo.append((chain_id, hit[0], hit[1]))
            chain_id = hit[1]
        now = time.time()
        new = {chain: Snap(api.COMMITTED, parent, self._remote_labels(chain, digest), now, now, remote=digest)
               for chain, digest, parent in reversed(todo)}
        self._db.write(new)
        self._snaps.update(new)
        return True

    def _remote_target(self, target: str, parent: str) -> bool:
        """Whether convstore's own layer is the snapshot ``target`` names over
        ``parent`` (committed now if need be): only a convstore layer answers a
        remote-snapshot lookup, whatever labels other snapshots carry."""
        s = self._snaps.get(target)
        if s is not None:
            return bool(s.remote) and s.parent == parent
        hit = self.layers.chain(target)
        return hit is not None and hit[1] == parent and self._commit_remote(target)

    def _dir(self, s: Snap) -> str:
        """The directory a committed snapshot contributes as a lower layer."""
        if s.remote:
            # through a short link: a digest's ':' would split overlayfs's lowerdir list
            link = os.path.join(self.root, "l", s.remote.removeprefix("sha256:"))
            target = self._mount.diff_dir(s.remote)
            try:
                current = os.readlink(link)
            except OSError:
                current = None
            if current != target:
                tmp = f"{link}.{secrets.token_hex(4)}"
                os.symlink(target, tmp)
                os.replace(tmp, link)
            return link
        return os.path.join(self.root, "snapshots", s.id, "fs")

    def _lowers(self, parent: str) -> list[str]:
        out = []
        while parent:
            p = self._get(parent)
            out.append(self._dir(p))
            parent = p.parent
        return out

    def _mounts(self, s: Snap) -> list[Any]:
        lowers = self._lowers(s.parent)
        if s.kind == api.VIEW:
            if len(lowers) == 1:
                return [api.Mount(type="bind", source=lowers[0], options=["ro", "rbind"])]
            if not lowers:
                return [api.Mount(type="bind", source=os.path.join(self.root, "snapshots", s.id, "fs"),
                                  options=["ro", "rbind"])]
            return [api.Mount(type="overlay", source="overlay", options=["lowerdir=" + ":".join(lowers)])]
        base = os.path.join(self.root, "snapshots", s.id)
        if not lowers:
            return [api.Mount(type="bind", source=os.path.join(base, "fs"), options=["rw", "rbind"])]
        return [api.Mount(type="overlay", source="overlay",
                          options=[f"workdir={base}/work", f"upperdir={base}/fs", "lowerdir=" + ":".join(lowers)])]

    def _new(self, key: str, parent: str, labels: dict[str, str], kind: int) -> list[Any]:
        self._check_key(key)
        if key in self._snaps:
            raise self._err("ALREADY_EXISTS", f"snapshot {key} already exists")
        if parent:
            p = self._get(parent)
            if p.kind != api.COMMITTED:
                raise self._err("FAILED_PRECONDITION", f"parent {parent} is not committed")
        sid = secrets.token_hex(8)
        base = os.path.join(self.root, "snapshots", sid)
        os.makedirs(os.path.join(base, "fs"), mode=0o755)
        os.makedirs(os.path.join(base, "work"), mode=0o700)
        now = time.time()
        s = Snap(kind, parent, labels, now, now, id=sid)
        self._db.write({key: s})
        self._snaps[key] = s
        return self._mounts(s)

    def _info(self, key: str, s: Snap) -> Any:
        i = api.Info(name=key, parent=s.parent, kind=s.kind, labels=s.labels)
        i.created_at.FromNanoseconds(int(s.created * 1e9))
        i.updated_at.FromNanoseconds(int(s.updated * 1e9))
        return i

    # -- the API ------------------------------------------------------------
    def Prepare(self, req: Any) -> Any:
        with self._lock:
            labels = self._client_labels(req.labels)
            target = req.labels.get(REF_LABEL, "")
            if target and self._remote_target(target, req.parent):
                # an engine is about to use the image: open it and start its profile's prefetch now
                self.layers.warm(self._snaps[target].remote)
                raise self._err("ALREADY_EXISTS", f"target snapshot {target!r}: a convstore layer")
            return api.PrepareSnapshotResponse(mounts=self._new(req.key, req.parent, labels, api.ACTIVE))

    def View(self, req: Any) -> Any:
        with self._lock:
            labels = self._client_labels(req.labels)
            return api.ViewSnapshotResponse(mounts=self._new(req.key, req.parent, labels, api.VIEW))

    def Mounts(self, req: Any) -> Any:
        with self._lock:
            s = self._get(req.key)
            if s.kind == api.COMMITTED:
                raise self._err("FAILED_PRECONDITION", f"snapshot {req.key} is committed: it has no mounts")
            return api.MountsResponse(mounts=self._mounts(s))

    def Commit(self, req: Any) -> Any:
        with self._lock:
            s = self._get(req.key)
            if s.kind != api.ACTIVE:
                raise self._err("FAILED_PRECONDITION", f"snapshot {req.key} is not active")
            self._check_key(req.name)
            if req.name in self._snaps:
                raise self._err("ALREADY_EXISTS", f"snapshot {req.name} already exists")
            new = Snap(api.COMMITTED, s.parent, self._client_labels(req.labels, s.labels), s.created, time.time(),
                       s.id)
            self._db.write({req.name: new}, delete=[req.key])
            del self._snaps[req.key]
            self._snaps[req.name] = new
            shutil.rmtree(os.path.join(self.root, "snapshots", s.id, "work"), ignore_errors=True)
            return api.Empty()

    def Remove(self, req: Any) -> Any:
        with self._lock:
            s = self._get(req.key)
            if any(c.parent == req.key for c in self._snaps.values()):
                raise self._err("FAILED_PRECONDITION", f"snapshot {req.key} has children")
            self._db.write(delete=[req.key])
            del self._snaps[req.key]
            if s.id:
                shutil.rmtree(os.path.join(self.root, "snapshots", s.id), ignore_errors=True)
            return api.Empty()

    def Stat(self, req: Any) -> Any:
        with self._lock:
            return api.StatSnapshotResponse(info=self._info(req.key, self._get(req.key)))

    def Update(self, req: Any) -> Any:
        with self._lock:
            s = self._get(req.info.name)
            labels = dict(s.labels)
            paths = list(req.update_mask.paths) or ["labels"]
            for p in paths:
                if p == "labels":
                    labels = dict(req.info.labels)
                elif p.startswith("labels."):
                    k = p[len("labels."):]
                    if k in req.info.labels:
                        labels[k] = req.info.labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise self._err("INVALID_ARGUMENT", f"cannot update {p!r}")
            if s.remote:
                # shared by every namespace: its labels are convstore's; a client's stay in containerd's own metadata
                return api.UpdateSnapshotResponse(info=self._info(req.info.name, s))
            new = Snap(s.kind, s.parent, self._client_labels(labels), s.created, time.time(), s.id)
            self._db.write({req.info.name: new})
            self._snaps[req.info.name] = new
            return api.UpdateSnapshotResponse(info=self._info(req.info.name, new))

    def List(self, req: Any, namespace: str | None = None) -> Iterator[Any]:
        """The snapshots ``req.filters`` select (containerd's filter syntax;
        an unknown filter is refused), in key order.  A caller in a containerd
        namespace (gRPC header ``containerd-namespace``) sees that namespace's
        snapshots (containerd names them ``NAMESPACE/SEQ/NAME``) and convstore's
        layers, which every namespace shares; one without sees all.
        containerd 1.6 sends no such header to a proxy snapshotter: what keeps
        its namespaces apart is that only a convstore layer carries the ref
        label its remote-snapshot lookup filters on."""
        try:
            match = parse_all(list(req.filters))
        except FilterError as e:
            raise self._err("INVALID_ARGUMENT", f"filter: {e}") from None
        prefix = f"{namespace}/" if namespace else ""
        with self._lock:
            infos = [self._info(k, s) for k, s in sorted(self._snaps.items())
                     if (s.remote or k.startswith(prefix))
                     and match(Subject(k, s.parent, _KINDS.get(s.kind, ""), s.labels))]
        batch: list[Any] = []
        size = 0
        for info in infos:
            n = info.ByteSize() + 8
            if batch and size + n > LIST_BATCH_BYTES:
                yield api.ListSnapshotsResponse(info=batch)
                batch, size = [], 0
            batch.append(info)
            size += n
        if batch:
            yield api.ListSnapshotsResponse(info=batch)

    def Usage(self, req: Any) -> Any:
        with self._lock:
            s = self._get(req.key)
        if not s.id:
            return api.UsageResponse(size=0, inodes=0)  # a convstore layer takes no local space
        size = inodes = 0
        for dirpath, dirs, files in os.walk(os.path.join(self.root, "snapshots", s.id, "fs")):
            inodes += len(dirs) + len(files)
            for n in files:
                try:
                    size += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                except OSError:
                    pass
        return api.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, req: Any) -> Any:
        with self._lock:
            used = {s.id for s in self._snaps.values() if s.id}
            for sid in os.listdir(os.path.join(self.root, "snapshots")):
                if sid not in used:
                    shutil.rmtree(os.path.join(self.root, "snapshots", sid), ignore_errors=True)
        return api.Empty()

    # -- gRPC -----------------------------------------------------------------
    def handler(self) -> Any:
        grpc = self._grpc
        methods = {
            "Prepare": (api.PrepareSnapshotRequest, False), "View": (api.ViewSnapshotRequest, False),
            "Mounts": (api.MountsRequest, False), "Commit": (api.CommitSnapshotRequest, False),
            "Remove": (api.RemoveSnapshotRequest, False), "Stat": (api.StatSnapshotRequest, False),
            "Update": (api.UpdateSnapshotRequest, False), "List": (api.ListSnapshotsRequest, True),
            "Usage": (api.UsageRequest, False), "Cleanup": (api.CleanupRequest, False),
        }

        def wrap(fn: Any, stream: bool) -> Any:
            def unary(req: Any, ctx: Any) -> Any:
                try:
                    return fn(req)
                except SnapshotError as e:
                    ctx.abort(e.code, str(e))

            def streaming(req: Any, ctx: Any) -> Any:
                namespace = dict(ctx.invocation_metadata() or ()).get(NAMESPACE_HEADER)
                try:
                    yield from fn(req, namespace)
                except SnapshotError as e:
                    ctx.abort(e.code, str(e))

            return streaming if stream else unary

        handlers = {}
        for name, (req_cls, stream) in methods.items():
            fn = wrap(getattr(self, name), stream)
            make = grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
            handlers[name] = make(fn, request_deserializer=req_cls.FromString,
                                  response_serializer=lambda m: m.SerializeToString())
        return grpc.method_handlers_generic_handler(api.SERVICE, handlers)


def serve_snapshotter(layers: LayerStore, root: str, socket_path: str, stats_file: str | None = None,
                      metrics_address: str | None = None) -> None:
    """Serve on the unix socket ``socket_path`` until SIGINT/SIGTERM, with
    ``layers`` mounted at ``ROOT/layers``; what the layers fetched is
    reported on ``metrics_address`` and in ``stats_file`` as the layer store does."""
    import signal

    grpc = grpc_module()
    import socket

    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), mode=0o700, exist_ok=True)
    if os.path.exists(socket_path):
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(socket_path)
            except OSError:
                os.unlink(socket_path)  # left by a snapshotter that is gone
            else:
                raise ConvstoreError(f"{socket_path}: a snapshotter is already serving there")
    sdnotify.status("scanning the store")
    layer_mount = LayerMount(layers, os.path.join(os.path.abspath(root), "layers"))
    with Snapshotter(root, layer_mount) as snap:
        server = grpc.server(ThreadPoolExecutor(8, thread_name_prefix="convstore-snapshots"))
        server.add_generic_rpc_handlers((snap.handler(),))
        mask = os.umask(0o077)  # the socket is root's alone from its creation
        try:
            server.add_insecure_port(f"unix://{os.path.abspath(socket_path)}")
            server.start()
        finally:
            os.umask(mask)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *a: stop.set())
        with reporting(snap.layers.metrics, metrics_address, stats_file):
            # its layers are mounted (LayerMount waits for that) and the socket listens: containerd may call
            sdnotify.serving(f"convstore snapshotter serving on {socket_path}, layers at {layer_mount.mountpoint}",
                             lambda: mount_answers(layer_mount.mountpoint) and _socket_answers(socket_path), log)
            stop.wait()
            sdnotify.stopping(f"convstore snapshotter stopping on {socket_path}")
            server.stop(grace=2).wait()


def _socket_answers(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
