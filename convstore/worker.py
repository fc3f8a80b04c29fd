"""Library code in a detached child process: background re-packs and mounts.

The parent calls :func:`spawn` with a task and its :class:`StoreOptions`;
the child (``python -m convstore.worker``, no other arguments) reads both as
one JSON document from its standard input, opens the store the same way and
runs the task.  Secrets (a PIN in a key spec, a registry password) travel
only through that pipe: never in argv, never in the environment.  The child
reports a failure as one line on its standard error and exits 1.

Tasks::

    {"op": "repack", "ref": NAME:TAG}   (the reactivation of an INACTIVE image: convstore.pack.repack)
    {"op": "mount", "ref": NAME:TAG, "mountpoint": DIR, "policy": PATH or null, "stats_file": PATH or null,
     "metrics_address": HOST:PORT or null, "memory_budget": BYTES}
    {"op": "layerstore", "mountpoint": DIR, "stats_file": PATH or null, "policy": PATH or null,
     "metrics_address": HOST:PORT or null, "memory_budget": BYTES}
    {"op": "snapshotter", "root": DIR, "socket": PATH, "stats_file": PATH or null, "policy": PATH or null,
     "metrics_address": HOST:PORT or null, "memory_budget": BYTES}

The services (mount, layerstore, snapshotter) log to standard error (the
log file ``--background`` opened) and say ``READY=1`` on ``$NOTIFY_SOCKET``
once they serve (:mod:`convstore.service`).

``policy``: the node's trust policy file (null: none, nothing required).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
import sys
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any

from . import hardening
from .core.catalog import CatalogEntry
from .errors import ConvstoreError, StoreError
from .options import StoreOptions

if TYPE_CHECKING:
    from .core.repository import Repository
    from .oci.policy import Policy

#: variables that may hold a secret (a key spec can carry a PIN); a worker gets what it needs on its pipe
SECRET_ENV = ("CONVSTORE_KEY",)


def spawn(task: dict[str, Any], options: StoreOptions, *, stderr: int | IO[bytes] | None = subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``task`` in a new session; returns at once.  ``env``: variables
    to add (a background service's ``NOTIFY_SOCKET``)."""
    if options.key is None and os.environ.get("CONVSTORE_KEY"):
        options = replace(options, key=os.environ["CONVSTORE_KEY"])
    secret_env = set(SECRET_ENV)
    if options.key:
        # a PIN named by pin-source=env:VAR travels on the pipe as pin-value, and VAR stays behind
        key = options.key
        for m in reversed(list(re.finditer(r"([?&;])pin-source=env:([A-Za-z_][A-Za-z0-9_]*)", key))):
            secret_env.add(m.group(2))
            value = hardening.secret_env(m.group(2))  # still in the environment, or already taken by the key provider
            if value is not None:
                pin = urllib.parse.quote(value, safe="")
                key = key[:m.start()] + f"{m.group(1)}pin-value={pin}" + key[m.end():]
        options = replace(options, key=key)
    child_env = {k: v for k, v in os.environ.items() if k not in secret_env}  # the options carry them
    child_env.update(env or {})
    p = subprocess.Popen([sys.executable, "-m", "convstore.worker"], stdin=subprocess.PIPE, env=child_env,
                         stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, close_fds=True)
    assert p.stdin is not None
    try:
        p.stdin.write(json.dumps({"options": options.to_json(), "task": task}).encode())
        p.stdin.close()
    except BrokenPipeError:
        pass
    return p


def spawn_repack(options: StoreOptions, e: CatalogEntry) -> None:
    """Re-pack ``e``'s image in a detached worker process (the reactivator of a
    store opened by the facade or a worker).  The worker inherits the store's
    options on a pipe, never in argv, and re-reads the authenticated catalog
    entry: the source, the digests it must still serve and the convergence
    domain come from there (:func:`convstore.pack.repack`)."""
    if options.key is None:
        raise StoreError(f"cannot reactivate {e.ref} automatically (the key provider cannot be reopened in "
                         f"another process): run convstore pack {e.source} {e.ref}")
    spawn({"op": "repack", "ref": str(e.ref)}, replace(options, allow_rollback=False))


def run_task(doc: dict[str, Any]) -> None:
    from .core.repository import Repository
    from .oci.policy import load_policy
    from .reader.background import BackgroundConfig

    options = StoreOptions.from_json(doc["options"])
    task = doc["task"]
    if task["op"] != "repack":
        from .service.logs import setup_service_logging

        setup_service_logging()
    store = Repository.open_with(options, reactivator=lambda e: spawn_repack(store.options, e))
    policy = load_policy(task["policy"]) if task.get("policy") else None
    if task["op"] == "repack":
        from .pack import repack

        repack(store, task["ref"])  # source, digests and domain from the authenticated entry
    elif task["op"] == "mount":
        run_mount(store, task["ref"], task["mountpoint"], policy, task)
    elif task["op"] == "layerstore":
        from .engines.layerstore import LayerStore, serve_layerstore
        from .reader.chunkcache import DEFAULT_MEMORY_BUDGET, ChunkCache

        cache = ChunkCache(int(task.get("memory_budget") or DEFAULT_MEMORY_BUDGET))
        serve_layerstore(LayerStore(store, policy=policy, cache=cache,
                                    background=BackgroundConfig.from_json(task.get("background"))),
                         task["mountpoint"], task.get("stats_file"), task.get("metrics_address"))
    elif task["op"] == "snapshotter":
        from .engines.layerstore import LayerStore
        from .engines.snapshotter import serve_snapshotter
        from .reader.chunkcache import DEFAULT_MEMORY_BUDGET, ChunkCache

        cache = ChunkCache(int(task.get("memory_budget") or DEFAULT_MEMORY_BUDGET))
        serve_snapshotter(LayerStore(store, policy=policy, cache=cache,
                                     background=BackgroundConfig.from_json(task.get("background"))),
                          task["root"], task["socket"], task.get("stats_file"), task.get("metrics_address"))
    else:
        raise ConvstoreError(f"unknown worker task {task.get('op')!r}")


def run_mount(store: Repository, ref: str, mountpoint: str, policy: Policy | None, report: dict[str, Any]) -> None:
    """``convstore mount`` (foreground or its worker): ``report`` holds ``memory_budget`` (bytes),
    ``metrics_address`` and ``stats_file`` (or None), and ``background`` (the background-fetch setting)."""
    from .metrics import mount_reporting
    from .reader.background import BackgroundConfig
    from .reader.chunkcache import DEFAULT_MEMORY_BUDGET, ChunkCache
    from .reader.fuse import mount_image

    cache = ChunkCache(int(report.get("memory_budget") or DEFAULT_MEMORY_BUDGET))
    mount_image(store, ref, mountpoint, policy=policy, cache=cache,
                report=mount_reporting(store, cache, report.get("metrics_address"), report.get("stats_file")),
                background=BackgroundConfig.from_json(report.get("background")))


def main() -> int:
    try:
        doc = json.loads(sys.stdin.buffer.read())
        run_task(doc)
    except ConvstoreError as e:
        print(f"convstore: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"convstore: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError):
        print("convstore: error: the worker's task is malformed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
