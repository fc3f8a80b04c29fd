"""Library code in a detached child process: background re-packs and mounts.

The parent calls :func:`spawn` with a task and its :class:`StoreOptions`;
the child (``python -m convstore.worker``, no other arguments) reads both as
one JSON document from its standard input, opens the store the same way and
runs the task.  Secrets (a PIN in a key spec, a registry password) travel
only through that pipe: never in argv, never in the environment.  The child
reports a failure as one line on its standard error and exits 1.

Tasks::

    {"op": "repack", "ref": NAME:TAG}   (the reactivation of an INACTIVE image: convstore.pack.repack)
    {"op": "mount", "ref": NAME:TAG, "mountpoint": DIR, "policy": PATH or null}
    {"op": "layerstore", "mountpoint": DIR, "stats_file": PATH or null, "policy": PATH or null}

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
from typing import IO, Any

from . import hardening
from .core.catalog import CatalogEntry
from .errors import ConvstoreError, StoreError
from .options import StoreOptions

#: variables that may hold a secret (a key spec can carry a PIN); a worker gets what it needs on its pipe
SECRET_ENV = ("CONVSTORE_KEY",)


def spawn(task: dict[str, Any], options: StoreOptions, *, stderr: int | IO[bytes] | None = subprocess.DEVNULL
          ) -> subprocess.Popen[bytes]:
    """Start ``task`` in a new session; returns at once."""
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
    env = {k: v for k, v in os.environ.items() if k not in secret_env}  # the options carry them
    p = subprocess.Popen([sys.executable, "-m", "convstore.worker"], stdin=subprocess.PIPE, env=env,
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
    store = Repository.open_with(options, reactivator=lambda e: spawn_repack(store.options, e))
    policy = load_policy(task["policy"]) if task.get("policy") else None
    if task["op"] == "repack":
        from .pack import repack

        repack(store, task["ref"])  # source, digests and domain from the authenticated entry
    elif task["op"] == "mount":
        from .reader.fuse import mount_image

        mount_image(store, task["ref"], task["mountpoint"], policy=policy,
                    background=BackgroundConfig.from_json(task.get("background")))
    elif task["op"] == "layerstore":
        from .engines.layerstore import LayerStore, serve_layerstore

        serve_layerstore(LayerStore(store, policy=policy, background=BackgroundConfig.from_json(task.get("background"))),
                         task["mountpoint"], task.get("stats_file"))
    else:
        raise ConvstoreError(f"unknown worker task {task.get('op')!r}")


def main() -> int:
    try:
        doc = json.loads(sys.stdin.buffer.read())
        run_task(doc)
    except ConvstoreError as e:
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
