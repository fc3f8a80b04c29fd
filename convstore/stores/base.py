"""The storage seams, modelled on zarr v3's small Store ABC.

Two stores make a backend:

* :class:`ChunkStore` -- encrypted chunk blobs by chunk id: write-once,
  immutable, many of them (a backend packs them into larger files or blobs).
  Chunks are stored and read only through :mod:`convstore.core.chunks`; gc and
  verify also use its index operations (``unreferenced``, ``compact``,
  ``check_index``, ``repair_index``, ``clean_leftovers``) directly.
* :class:`ObjectStore` -- the small metadata store: ``/``-separated keys to
  bytes, with exclusive puts, listing, locks and an append-only log.  Keys:

  * ``manifests/<sha256 hex>``   sealed image manifests (write-once)
  * ``refs/<name>:<tag>``        catalog entries (replaced atomically)
  * ``domains/<name>``           convergence-domain records
  * ``layers/<hex>``             layer-index records
  * ``profiles/<sha256 hex>``    sealed start-up profiles
  * ``quarantine/<cid hex>``     corrupt chunk blobs kept as evidence
  * ``store.json``               the store's identity, format and metadata key

Every ``put`` is atomic: a reader sees the old value or the new one, never
a partial object.  Capability flags say what a backend can do, and are read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import struct
from collections.abc import Collection, Iterator
from itertools import chain
from contextlib import AbstractContextManager

from ..errors import ConvstoreError, StoreError


#: Where a chunk is stored: (container id, offset, length) -- a local pack's
#: 16-byte name or a registry pack blob's 32-byte sha256.  Image manifests keep
#: one per chunk as a *hint*: a read goes straight there, without an index
#: lookup; a stale or wrong hint costs one index lookup (the chunk is always
#: checked against its id and key after the read).
Location = tuple[bytes, int, int]


#: the prefix of sealed manifests' keys (``manifests/<sha256 hex>``, owned by :mod:`convstore.core.manifests`)
MANIFESTS = "manifests/"


def sealed_manifest_key(digest: str) -> str:
    """The key of the sealed manifest ``digest`` (``sha256:<hex>``)."""
    return MANIFESTS + digest.split(":", 1)[1]


def sealed_manifest_name(key: str) -> str | None:
    """The sha256 (hex) a key ``manifests/<sha256 hex>`` names, or None for any other key.  Sealed
    manifests are the only metadata that is write-once and named by its content (the sha256 of its
    bytes): what a disk cache keeps and a site tier serves; every other object is mutable."""
    name = key[len(MANIFESTS):] if key.startswith(MANIFESTS) else ""
    return name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None


def check_key(key: str) -> str:
    """``key`` if it is a valid object key (``/``-separated, relative, no
    empty, ``.`` or ``..`` part, no NUL), else :class:`StoreError`."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise StoreError(f"invalid object key {key!r}")
    return key


class ChunkSet:
    """A large set of chunk ids, compact (32 bytes each, no object per id):
    256 buckets by first byte, each turned into a Python set only while it is
    compared (gc's live set: 1M ids in 32 MiB instead of ~140 MiB)."""

    def __init__(self, size_at: int | None = None) -> None:
        #: with ``size_at``, each id keeps the u32 found at that offset of its row (a chunk-table row's size)
        self.size_at = size_at
        self._w = 32 if size_at is None else 36
        self._buckets = [bytearray() for _ in range(256)]
        self.added = 0

    def add_rows(self, table: bytes | memoryview, row_size: int) -> None:
        """Add the ids at the start of each ``row_size``-byte row of ``table``."""
        b, at = self._buckets, self.size_at
        if at is None:
            for (cid,) in struct.iter_unpack(f"<32s{row_size - 32}x", table):
                b[cid[0]] += cid
        else:
            for cid, size in struct.iter_unpack(f"<32s{at - 32}x4s{row_size - at - 4}x", table):
                b[cid[0]] += cid + size
        self.added += len(table) // row_size

    def bucket(self, first: int) -> set[bytes]:
        """The ids whose first byte is ``first``."""
        fmt = "<32s" if self._w == 32 else "<32s4x"
        return set(chain.from_iterable(struct.iter_unpack(fmt, self._buckets[first])))

    def bucket_sizes(self, first: int) -> dict[bytes, int]:
        """id -> size of the ids whose first byte is ``first`` (needs ``size_at``)."""
        return dict(struct.iter_unpack("<32sI", self._buckets[first]))


class ChunkStore(ABC):
    """Chunk blobs by chunk id (32 bytes).  Puts are buffered until
    :meth:`flush` makes them durable and visible together; :meth:`abort`
    drops what was not flushed."""

    supports_deletes: bool = True
    #: a manifest published here must carry a location for every chunk (a
    #: registry: reads go by them, and the image's artifact references its packs)
    needs_locations: bool = False

    @abstractmethod
    def has(self, cid: bytes) -> bool: ...

    def holds(self, hint: Location) -> bool:
        """Whether the container a hint names is still there (containers are
        immutable, so a chunk a manifest placed there is too).  False when
        unknown: the caller then asks :meth:`has`."""
        return False

    def locate(self, cid: bytes) -> Location | None:
        """Where a flushed chunk is (a hint for manifests), or None."""
        return None

    @abstractmethod
    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        """The blob (from ``hint`` if it is still good, else through the
        index); raises KeyError if absent."""

    def get_many(self, cids: list[bytes], hints: dict[bytes, Location] | None = None) -> dict[bytes, bytes]:
        """Several blobs at once (backends coalesce requests where they can)."""
        hints = hints or {}
        return {c: self.get(c, hints.get(c)) for c in cids}

    @abstractmethod
    def put(self, cid: bytes, blob: bytes) -> None:
        """Store a blob (a no-op if the id is present), durable at the next :meth:`flush`."""

    @abstractmethod
    def flush(self) -> None: ...

    def abort(self) -> None:
        """Drop puts not yet flushed (after a failed operation)."""

    @abstractmethod
    def delete(self, cids: list[bytes]) -> None: ...

    def sweep(self, cids: list[bytes], live_containers: set[bytes] | None = None) -> None:
        """gc's sweep: remove the chunks ``cids``.  ``live_containers`` (given to a store that
        ``needs_locations``): the containers the live images' manifests reference; a store whose
        containers are reclaimed by someone else (a registry's own garbage collection) also forgets
        every chunk it placed outside them, since those containers may go."""
        self.delete(cids)

    @abstractmethod
    def ids(self) -> Iterator[bytes]:
        """Every stored chunk id, in no particular order."""

    def entries(self) -> Iterator[tuple[bytes, int]]:
        """(chunk id, stored size) of every chunk, streamed."""
        return ((c, self.size(c)) for c in self.ids())

    def unreferenced(self, live: ChunkSet) -> tuple[int, list[tuple[bytes, int]]]:
        """(how many chunks are stored, [(cid, stored size)] of those not in
        ``live``): gc's sweep, which a backend may do in bulk."""
        by_first: dict[int, list[tuple[bytes, int]]] = {}
        total = 0
        for cid, size in self.entries():
            total += 1
            by_first.setdefault(cid[0], []).append((cid, size))
        out = []
        for first, items in by_first.items():
            keep = live.bucket(first)
            out += [(c, n) for c, n in items if c not in keep]
        return total, out

    def compact(self) -> bool | None:
        """Tidy the index after deletes (gc calls this last); whether it
        rewrote anything, where the backend says."""
        return None

    def refresh(self) -> None:
        """Look again at what other writers published or gc swept (an index
        held in memory); nothing where every lookup reads the store."""

    def check_index(self) -> list[str]:
        """Damaged index files (``verify``); each one a line."""
        return []

    def repair_index(self) -> None:
        """Drop damaged index files and rebuild what they held (they are caches)."""

    @abstractmethod
    def size(self, cid: bytes) -> int: ...

    @abstractmethod
    def usage(self) -> int:
        """Stored bytes of all chunks."""

    def evict(self, cid: bytes) -> None:
        """Drop any local copy (caches override this), so that the next read
        goes to the source of truth."""

    def clean_leftovers(self, grace: float) -> int:
        """Remove what writers that died left behind (older than ``grace`` s); how many."""
        return 0



class ForwardingChunkStore(ChunkStore):
    """A chunk store that passes every call to ``inner``: the base of the
    wrappers (a read cache, a simulated link), which override only what they
    change.  ``get_many`` is not forwarded: the default reads through this
    wrapper's own ``get``."""

    def __init__(self, inner: ChunkStore) -> None:
        self.inner = inner
        self.supports_deletes = inner.supports_deletes
        self.needs_locations = inner.needs_locations

    def has(self, cid: bytes) -> bool:
        return self.inner.has(cid)

    def holds(self, hint: Location) -> bool:
        return self.inner.holds(hint)

    def locate(self, cid: bytes) -> Location | None:
        return self.inner.locate(cid)

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        return self.inner.get(cid, hint)

    def put(self, cid: bytes, blob: bytes) -> None:
        self.inner.put(cid, blob)

    def flush(self) -> None:
        self.inner.flush()

    def refresh(self) -> None:
        self.inner.refresh()

    def abort(self) -> None:
        self.inner.abort()

    def delete(self, cids: list[bytes]) -> None:
        self.inner.delete(cids)

    def sweep(self, cids: list[bytes], live_containers: set[bytes] | None = None) -> None:
        self.inner.sweep(cids, live_containers)

    def evict(self, cid: bytes) -> None:
        self.inner.evict(cid)

    def ids(self) -> Iterator[bytes]:
        return self.inner.ids()

    def entries(self) -> Iterator[tuple[bytes, int]]:
        return self.inner.entries()

    def unreferenced(self, live: ChunkSet) -> tuple[int, list[tuple[bytes, int]]]:
        return self.inner.unreferenced(live)

    def compact(self) -> None:
        self.inner.compact()

    def check_index(self) -> list[str]:
        return self.inner.check_index()

    def repair_index(self) -> None:
        self.inner.repair_index()

    def size(self, cid: bytes) -> int:
        return self.inner.size(cid)

    def usage(self) -> int:
        return self.inner.usage()

    def clean_leftovers(self, grace: float) -> int:
        return self.inner.clean_leftovers(grace)


class ObjectStore(ABC):
    """The metadata store.  Capability flags instead of probing."""

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_locking: bool = True
    #: whether reads are recorded here (``last_read``, hence INACTIVE aging); False where many
    #: readers share one remote store (S3) and must not write to it
    records_reads: bool = True

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; raises KeyError if absent."""

    @abstractmethod
    def has(self, key: str) -> bool: ...

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The objects of ``keys`` that could be read (a remote backend fetches
        them in parallel); a key that is absent or fails is left out, for the
        caller to read alone and meet its error."""
        out = {}
        for k in keys:
            try:
                out[k] = self.get(k)
            except (KeyError, ConvstoreError):
                pass
        return out

    @abstractmethod
    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        """Store ``data`` atomically.  With ``exclusive``, do nothing and
        return False if the key exists.  ``durable=False`` defers the fsync to
        the next :meth:`flush` (batched durability for hints).  ``refs``: the
        chunk containers the object relies on (an image manifest's packs; a
        registry references them so its garbage collection keeps them)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None:
        for k in keys:
            self.delete(k)

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (recursively), in no particular order."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    def flush(self) -> None:
        """Make every earlier non-durable put durable."""

    def evict(self, key: str) -> None:
        """Drop any local copy of ``key`` (caches override this)."""

    def server_time(self) -> float | None:
        """The store's own clock (epoch seconds, e.g. a registry's ``Date``), shared by every client
        of a store without locks (leases); None where the store has none (local stores)."""
        return None

    def lock(self, name: str, shared: bool = False) -> AbstractContextManager[None]:
        """An inter-process lock (exclusive, or shared with other shared holders)."""
        raise StoreError(f"{type(self).__name__} does not support locking")

    def append_line(self, key: str, line: str) -> None:
        """Append one line to a log object (atomically with other appenders)."""
        raise StoreError(f"{type(self).__name__} does not support append-only logs")

    def usage(self, prefix: str) -> int:
        """Total stored bytes under ``prefix``."""
        return sum(self.size(k) for k in self.list(prefix))


class ForwardingObjectStore(ObjectStore):
    """An object store that passes every call to ``inner``: the base of the
    wrappers (a read cache, a simulated link), which override only what they
    change.  ``get_many`` and ``delete_many`` are not forwarded: the defaults
    go through this wrapper's own ``get`` and ``delete``."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.supports_writes = inner.supports_writes
        self.supports_deletes = inner.supports_deletes
        self.supports_locking = inner.supports_locking
        self.records_reads = inner.records_reads

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def server_time(self) -> float | None:
        return self.inner.server_time()

    def has(self, key: str) -> bool:
        return self.inner.has(key)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        return self.inner.put(key, data, durable=durable, exclusive=exclusive, refs=refs)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def flush(self) -> None:
        self.inner.flush()

    def evict(self, key: str) -> None:
        self.inner.evict(key)

    def lock(self, name: str, shared: bool = False) -> AbstractContextManager[None]:
        return self.inner.lock(name, shared)

    def append_line(self, key: str, line: str) -> None:
        self.inner.append_line(key, line)

    def usage(self, prefix: str) -> int:
        return self.inner.usage(prefix)
