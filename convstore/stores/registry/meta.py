"""A registry repository's metadata objects: each an OCI artifact with one
layer, tagged by kind (see :class:`RegistryStore`)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import ConvstoreError, CorruptObject, StoreError, StoreFormatError
from ...oci.registry_client import OCI_MANIFEST, RegistryClient
from ..base import ObjectStore
from .artifacts import AT_IMAGE, AT_MANIFEST, AT_OBJECT, MT_PACK, artifact, inline, layer
from .index import RegistryChunkStore

log = logging.getLogger(__name__)

INLINE_BYTES = 16 << 10  # objects up to this size are also embedded in their artifact (one GET reads them)
LIST_WORKERS = 16
MAX_OBJECT = 1 << 30  # a sealed manifest (a row per chunk and every file's metadata) or catalog object


# object keys -> tag prefixes: a listing of one kind needs only the tag list
_KINDS = (("store.json", "s-"), ("refs/", "r-"), ("manifests/", "m-"), ("domains/", "d-"), ("layers/", "l-"), ("profiles/", "p-"), ("leases/", "e-"))


class RegistryStore(ObjectStore):
    """convstore metadata objects in one registry repository (see the module docstring)."""

    supports_writes = True
    supports_deletes = True  # tags can be deleted (chunk space is the registry GC's)
    supports_locking = False

    def __init__(self, url: str, client: RegistryClient, repo: str):
        self.url, self.client, self.repo = url, client, repo
        self._keys: dict[str, str] = {}  # tag -> key
        self._listed: dict[str, bytes] = {}  # tag -> manifest body fetched by list(), for the get() that follows
        #: the repository's chunk store (image manifests reference its pack blobs)
        self.chunks: RegistryChunkStore | None = None
        self._memo_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RegistryStore({self.url})"

    @staticmethod
    def _tag(key: str) -> str:
        prefix = next((t for k, t in _KINDS if key.startswith(k)), "o-")
        return prefix + hashlib.sha256(key.encode()).hexdigest()[:40]

    def _manifest(self, tag: str, use_listed: bool = False) -> dict[str, Any] | None:
        body = None
        if use_listed:
            with self._memo_lock:
                body = self._listed.pop(tag, None)
        if body is None:
            got = self.client.get_manifest(self.repo, tag, [OCI_MANIFEST])
            if got is None:
                return None
            body = got[0]
        try:
            doc = json.loads(body)
        except ValueError:
            raise CorruptObject(f"registry object {tag} is not a convstore artifact") from None
        return doc if isinstance(doc, dict) else None

    def _value(self, key: str, m: dict[str, Any] | None) -> bytes:
        if m is None:
            raise KeyError(key)
        try:
            if (m.get("annotations") or {}).get("org.convstore.key") != key:
                raise CorruptObject(f"registry object for {key} is not what its tag claims")
            desc = m["layers"][0]
            digest = str(desc["digest"])
        except (AttributeError, KeyError, IndexError, TypeError):
            raise CorruptObject(f"registry object for {key} is not a convstore artifact") from None
        data = inline(desc)
        return data if data is not None else self.client.get_blob(self.repo, digest, size=desc.get("size"),
                                                                  max_bytes=MAX_OBJECT)

    def has(self, key: str) -> bool:
        return self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST]) is not None

    def get(self, key: str) -> bytes:
        m = self._manifest(self._tag(key))
        if m is None and key == "store.json":
            self._refuse_layout_1()  # said even by a command that would not create the store
        return self._value(key, m)

    def _refuse_layout_1(self) -> None:
        if self.client.get_manifest(self.repo, "o-" + hashlib.sha256(b"store.json").hexdigest()[:40],
                                    [OCI_MANIFEST]) is not None:
            raise StoreFormatError(f"{self.url} holds a convstore store of registry layout 1 (before index "
                                   f"snapshots and location hints): push its images into a new repository")

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several objects, fetched in parallel (a listing's manifests are reused)."""
        def one(k: str) -> tuple[str, bytes | None]:
            try:
                return k, self._value(k, self._manifest(self._tag(k), use_listed=True))
            except (KeyError, ConvstoreError, ValueError):
                return k, None

        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            return {k: v for k, v in pool.map(one, keys) if v is not None}

    def size(self, key: str) -> int:
        return len(self.get(key))

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        if exclusive and self.has(key):
            return False
        if key == "store.json" and exclusive:
            self._refuse_layout_1()
        digest = self.client.put_blob(self.repo, data)
        kind = AT_MANIFEST if key.startswith("manifests/") else AT_IMAGE if key.startswith("refs/") else AT_OBJECT
        layers = [layer(digest, len(data), data=data if len(data) <= INLINE_BYTES else None)]
        if refs and self.chunks is not None:  # the pack blobs an image uses: kept by the registry's gc
            sizes = self.chunks.pack_sizes(set(refs))
            layers += [layer("sha256:" + c.hex(), n, MT_PACK) for c, n in sorted(sizes.items())]
        self.client.put_manifest(self.repo, self._tag(key), artifact(kind, layers, {"org.convstore.key": key}))
        self._keys[self._tag(key)] = key
        return True

    def delete(self, key: str) -> None:
        got = self.client.get_manifest(self.repo, self._tag(key), [OCI_MANIFEST])
        if got is not None:
            self.client.delete_manifest(self.repo, got[2])

    def list(self, prefix: str) -> Iterator[str]:
        want = prefix.rstrip("/") + "/"
        tag_prefix = self._tag(want)[:2]
        tags = [t for t in self.client.tags(self.repo) if t.startswith(tag_prefix)]

        def key_of(t: str) -> tuple[str, str]:
            key = self._keys.get(t)
            if key is None:
                got = self.client.get_manifest(self.repo, t, [OCI_MANIFEST])
                if got is None:
                    return t, ""
                try:
                    doc = json.loads(got[0])
                    key = str((doc.get("annotations") or {}).get("org.convstore.key", ""))
                except (ValueError, AttributeError):
                    log.warning("skipping registry object %s: not a convstore artifact", t)
                    return t, ""
                with self._memo_lock:
                    self._listed[t] = got[0]
                self._keys[t] = key
            return t, key

        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            found = list(pool.map(key_of, tags))
        for _t, key in found:
            if key.startswith(want):
                yield key

    def lock(self, name: str, shared: bool = False) -> Any:
        raise StoreError("a registry store has no locks")

    def server_time(self) -> float | None:
        return self.client.server_time(self.repo)

    def append_line(self, key: str, line: str) -> None:
        log.info("audit %s", line)  # a registry has no append; the local cache keeps the audit log
