"""The store contract: the same tests over every backend -- in memory, the
local directory store, a real registry (docker-registry on 127.0.0.1) and a
real S3 object store (SeaweedFS on 127.0.0.1) --
for the chunk store (has/get/get_many/put/flush/abort/delete/locate/entries)
and the object store (get/put/exclusive put/delete/list/get_many/locks/logs).
A backend that cannot do something says so by its capability flags, and is
held to saying it clearly.  Last, the core runs on memory backends: a small
synthetic image packed and unpacked byte-exact with no file store at all."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.errors import StoreError
from convstore.keys import open_key
from convstore.stores.base import ChunkSet, ChunkStore, ForwardingChunkStore, ForwardingObjectStore, ObjectStore
from convstore.stores.cache import CachedChunkStore, CachedStore, DiskCache
from convstore.stores.local import LocalChunkStore, LocalStore
from convstore.stores.memory import MemoryChunkStore, MemoryStore
from convstore.stores.registry import open_registry
from convstore.stores.s3 import open_s3
from convstore.stores.slow import Link, SlowChunkStore, SlowStore

#: the backends, and the forwarding wrappers over them (a read cache over memory, a simulated link over local)
BACKENDS = ["memory", "local", "registry", "s3", "cached-memory", "slow-local"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[str, ObjectStore, ChunkStore]]:
    kind = request.param
    if kind == "memory":
        yield kind, MemoryStore(), MemoryChunkStore()
    elif kind == "local":
        yield kind, LocalStore(str(tmp_path / "s")), LocalChunkStore(str(tmp_path / "s"))
    elif kind == "cached-memory":
        cache = DiskCache(str(tmp_path / "cache"))
        yield kind, CachedStore(MemoryStore(), cache), CachedChunkStore(MemoryChunkStore(), cache)
    elif kind == "slow-local":
        link = Link(0.0, 1e12)
        yield kind, SlowStore(LocalStore(str(tmp_path / "s")), link), \
            SlowChunkStore(LocalChunkStore(str(tmp_path / "s")), link)
    elif kind == "s3":
        url = request.getfixturevalue("s3")
        meta3, chunks3 = open_s3(url, index_dir=str(tmp_path / "ix"))
        yield kind, meta3, chunks3
    else:
        registry = request.getfixturevalue("registry")
        meta, chunks = open_registry(f"oci://{registry.host}/contract", insecure=True,
                                     index_dir=str(tmp_path / "ix"))
        yield kind, meta, chunks


def cid(i: int) -> bytes:
    return hashlib.sha256(b"chunk %d" % i).digest()


def blob(i: int) -> bytes:
    return hashlib.sha256(b"blob %d" % i).digest() * (20 + i)  # 640 bytes and more: unlike any error body


# -- chunk stores -------------------------------------------------------------------------------------------------
def test_chunks_put_are_readable_at_once_and_durable_at_flush(backend):
    _kind, _objects, chunks = backend
    for i in range(5):
        chunks.put(cid(i), blob(i))
    assert all(chunks.has(cid(i)) for i in range(5)) and not chunks.has(cid(99))
    assert chunks.get(cid(3)) == blob(3)  # a pending chunk reads back before the flush
    chunks.flush()
    assert {c: chunks.get(c) for c in map(cid, range(5))} == {cid(i): blob(i) for i in range(5)}
    assert dict(chunks.entries()) == {cid(i): len(blob(i)) for i in range(5)}
    assert set(chunks.ids()) == {cid(i) for i in range(5)}
    assert chunks.size(cid(2)) == len(blob(2))
    with pytest.raises(KeyError):
        chunks.get(cid(99))
    with pytest.raises(KeyError):
        chunks.size(cid(99))


def test_a_chunk_is_write_once(backend):
    _kind, _objects, chunks = backend
    chunks.put(cid(1), blob(1))
    chunks.flush()
    chunks.put(cid(1), blob(2))  # a present id: a no-op
    chunks.flush()
    assert chunks.get(cid(1)) == blob(1) and dict(chunks.entries()) == {cid(1): len(blob(1))}


def test_abort_drops_what_was_not_flushed(backend):
    _kind, _objects, chunks = backend
    chunks.put(cid(1), blob(1))
    chunks.flush()
    chunks.put(cid(2), blob(2))
    chunks.abort()
    chunks.flush()
    assert chunks.has(cid(1)) and not chunks.has(cid(2))
    with pytest.raises(KeyError):
        chunks.get(cid(2))
    assert set(chunks.ids()) == {cid(1)}


def test_locations_are_hints_into_immutable_containers(backend):
    _kind, _objects, chunks = backend
    for i in range(4):
        chunks.put(cid(i), blob(i))
    chunks.flush()
    hints = {cid(i): chunks.locate(cid(i)) for i in range(4)}
    assert all(h is not None and h[2] == len(blob(i)) for i, h in enumerate(hints.values()))
    assert all(chunks.holds(h) for h in hints.values() if h is not None)
    assert chunks.get(cid(2), hints[cid(2)]) == blob(2)
    assert chunks.get_many([cid(i) for i in range(4)], {c: h for c, h in hints.items() if h}) == \
        {cid(i): blob(i) for i in range(4)}
    assert chunks.get_many([cid(1), cid(3)]) == {cid(1): blob(1), cid(3): blob(3)}  # no hints: by the index
    h = hints[cid(1)]
    assert h is not None
    gone = (os.urandom(len(h[0])), h[1], h[2])  # a container that does not exist: the index finds the chunk
    assert not chunks.holds(gone)
    assert chunks.get(cid(1), gone) == blob(1)
    assert chunks.locate(cid(99)) is None


def test_delete_where_supported_else_a_clear_refusal(backend):
    kind, _objects, chunks = backend
    for i in range(4):
        chunks.put(cid(i), blob(i))
    chunks.flush()
    if not chunks.supports_deletes:
        assert kind == "registry"
        with pytest.raises(StoreError, match="does not delete chunks"):
            chunks.delete([cid(1)])
        assert chunks.get(cid(1)) == blob(1)
        return
    old = chunks.locate(cid(0))
    chunks.delete([cid(1), cid(3)])
    chunks.compact()
    assert {c for c, _n in chunks.entries()} == {cid(0), cid(2)}
    assert not chunks.has(cid(1))
    with pytest.raises(KeyError):
        chunks.get(cid(1))
    assert chunks.get(cid(0), old) == blob(0)  # a hint into the rewritten container still reads right
    chunks.delete([])


def test_unreferenced_is_gcs_sweep(backend):
    _kind, _objects, chunks = backend
    for i in range(6):
        chunks.put(cid(i), blob(i))
    chunks.flush()
    live = ChunkSet()
    live.add_rows(b"".join(cid(i) for i in (0, 2, 4)), 32)
    total, dead = chunks.unreferenced(live)
    assert total == 6 and sorted(dead) == sorted((cid(i), len(blob(i))) for i in (1, 3, 5))


def test_a_second_handle_sees_what_was_flushed(backend, tmp_path):
    kind, _objects, chunks = backend
    chunks.put(cid(1), blob(1))
    chunks.flush()
    if kind in ("memory", "cached-memory"):
        return  # one process, one handle: nothing else to open
    if kind in ("local", "slow-local"):
        other: ChunkStore = LocalChunkStore(str(tmp_path / "s"))
    elif kind == "s3":
        other = open_s3(chunks.url)[1]  # type: ignore[attr-defined]
    else:
        other = open_registry(chunks.url, insecure=True)[1]  # type: ignore[attr-defined]
    assert other.has(cid(1)) and other.get(cid(1)) == blob(1)


# -- object stores ------------------------------------------------------------------------------------------------
def test_objects_put_get_replace_delete(backend):
    _kind, objects, _chunks = backend
    assert objects.put("refs/a:1", b"one") is True
    assert objects.get("refs/a:1") == b"one" and objects.has("refs/a:1") and objects.size("refs/a:1") == 3
    objects.put("refs/a:1", b"two!")
    assert objects.get("refs/a:1") == b"two!" and objects.size("refs/a:1") == 4
    objects.delete("refs/a:1")
    assert not objects.has("refs/a:1")
    with pytest.raises(KeyError):
        objects.get("refs/a:1")
    objects.delete("refs/a:1")  # deleting what is absent is no error
    objects.flush()


def test_exclusive_put_never_replaces(backend):
    _kind, objects, _chunks = backend
    assert objects.put("domains/d", b"first", exclusive=True) is True
    assert objects.put("domains/d", b"second", exclusive=True) is False
    assert objects.get("domains/d") == b"first"


def test_list_and_get_many_by_prefix(backend):
    _kind, objects, _chunks = backend
    m = hashlib.sha256(b"manifests/").hexdigest()  # a sealed manifest is named by its digest (a cache checks it)
    for k in ("refs/a:1", "refs/lib/b:2", "domains/x"):
        objects.put(k, k.encode())
    objects.put(f"manifests/{m}", b"manifests/")
    assert sorted(objects.list("refs/")) == ["refs/a:1", "refs/lib/b:2"]
    assert sorted(objects.list("refs")) == ["refs/a:1", "refs/lib/b:2"]
    assert list(objects.list("profiles/")) == []
    assert objects.get_many(["refs/a:1", f"manifests/{m}", "refs/none:0"]) == \
        {"refs/a:1": b"refs/a:1", f"manifests/{m}": b"manifests/"}
    assert objects.usage("refs/") == len(b"refs/a:1") + len(b"refs/lib/b:2")
    objects.delete_many(["refs/a:1", "domains/x"])
    assert sorted(objects.list("refs/")) == ["refs/lib/b:2"] and not objects.has("domains/x")


def test_locks_shared_together_exclusive_alone(backend):
    _kind, objects, _chunks = backend
    if not objects.supports_locking:
        with pytest.raises(StoreError, match="no locks|does not support locking"):
            with objects.lock("gc"):
                pass
        return
    got = threading.Event()

    def exclusive() -> None:
        with objects.lock("gc"):
            got.set()

    with objects.lock("gc", shared=True), objects.lock("gc", shared=True):  # two shared holders at once
        t = threading.Thread(target=exclusive)
        t.start()
        assert not got.wait(0.3)  # the exclusive holder waits for both
    t.join(10)
    assert got.is_set() and not t.is_alive()


def test_append_only_log(backend):
    kind, objects, _chunks = backend
    if kind in ("registry", "s3"):  # no append there: lines go to the log (and a cache's local file)
        objects.append_line("log/audit", "one")
        return
    threads = [threading.Thread(target=lambda i=i: [objects.append_line("log/audit", f"t{i} {n}\nx")
                                                    for n in range(50)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if kind == "cached-memory":  # the cache keeps the log locally, beside it (the remote may have no append)
        assert not objects.has("log/audit")
        with open(os.path.join(objects.cache.dir, "log/audit")) as f:  # type: ignore[attr-defined]
            lines = f.read().splitlines()
    else:
        lines = objects.get("log/audit").decode().splitlines()
    assert sorted(lines) == sorted(f"t{i} {n} x" for i in range(4) for n in range(50))


def test_racing_exclusive_puts_have_one_winner(backend):
    """Writers race to create one object: exactly one is told it won, and its
    bytes are what is stored.  (A registry's exclusive put is check-then-put:
    it has no atomic create, and catalog updates there are last-writer-wins,
    docs/architecture.md.)"""
    kind, objects, _chunks = backend
    if kind == "registry":
        return
    start = threading.Barrier(8)
    won: list[int] = []

    def writer(i: int) -> None:
        start.wait()
        if objects.put("domains/race", b"writer %d" % i, exclusive=True):
            won.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and objects.get("domains/race") == b"writer %d" % won[0]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/.", "nul\0"])
@pytest.mark.parametrize("kind", ["memory", "local"])
def test_invalid_keys_are_refused(tmp_path, kind, key):
    objects: ObjectStore = MemoryStore() if kind == "memory" else LocalStore(str(tmp_path / "s"))
    for op in (lambda: objects.put(key, b"x"), lambda: objects.get(key), lambda: objects.has(key)):
        with pytest.raises(StoreError, match="invalid object key"):
            op()


@pytest.mark.parametrize("base, forwarding", [(ChunkStore, ForwardingChunkStore), (ObjectStore, ForwardingObjectStore)])
def test_a_forwarding_store_forwards_every_method(base, forwarding):
    """A method added to a seam and not forwarded would silently do the base's
    default in every wrapper: each is overridden, but the documented ones
    that read (or delete) through the wrapper's own single-item method."""
    methods = {n for n, v in vars(base).items() if callable(v) and not n.startswith("_")}
    own = {n for n in vars(forwarding) if not n.startswith("_")}
    assert methods - own == {"get_many"} | ({"delete_many"} if base is ObjectStore else set())


# -- the core on memory backends ----------------------------------------------------------------------------------
def test_the_store_packs_and_unpacks_on_memory_backends(tmp_path, keyfile):
    layers = [rich_layer(), make_tar([Entry("e", "dir"), Entry("e/new", data=os.urandom(300_000)),
                                      Entry("e/same", data=b"s" * 70_000)])]
    src = write_oci(str(tmp_path / "src"), layers)
    objects, chunks = MemoryStore(), MemoryChunkStore()
    store = convstore.Store(objects, open_key(f"file:{keyfile}", create_file=True), chunk_store=chunks,
                            state_dir=str(tmp_path / "state"))
    store.pack(f"oci:{tmp_path / 'src'}:latest", "mem/img:v1")
    assert [str(e.ref) for e in store.images()] == ["mem/img:v1"]
    assert sum(1 for _ in chunks.ids()) > 0 and any(k.startswith("manifests/") for k in objects.list(""))
    store.unpack_oci("mem/img:v1", f"oci:{tmp_path / 'dst'}:v1")
    import json
    with open(tmp_path / "dst" / "index.json") as f:
        [desc] = json.load(f)["manifests"]
    blob_ = lambda d: open(tmp_path / "dst" / "blobs" / "sha256" / d.split(":")[1], "rb").read()  # noqa: E731
    manifest = json.loads(blob_(desc["digest"]))
    assert manifest["config"]["digest"] == src["config"]["digest"]
    import gzip
    assert [gzip.decompress(blob_(d["digest"])) for d in manifest["layers"]] == layers
    assert store.verify().clean
