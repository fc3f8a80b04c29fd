"""The storage seam: a small key -> bytes store, modelled on zarr v3's Store.

Keys are ``/``-separated paths.  convstore uses four prefixes:

* ``chunks/<cid hex>``         encrypted chunk blobs (write-once, immutable; a
                               backend may pack many into one file)
* ``manifests/<sha256 hex>``   sealed image manifests (write-once)
* ``refs/<name>:<tag>``        catalog entries (replaced atomically)
* ``domains/<name>``           wrapped convergence-domain secrets
* ``store.json``               the store's identity and format version

Every ``put`` is atomic: a reader sees the old value or the new one, never
a partial object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager

from ..errors import StoreError


class ObjectStore(ABC):
    """Minimal storage backend.  Capability flags instead of probing."""

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_ranges: bool = False
    supports_locking: bool = True

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; raises KeyError if absent."""

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; backends with ranged reads override this."""
        return self.get(key)[start:end]

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several objects at once (backends coalesce requests where they can)."""
        return {k: self.get(k) for k in keys}

    @abstractmethod
    def has(self, key: str) -> bool: ...

    @abstractmethod
    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> bool:
        """Store ``data`` atomically.  With ``exclusive``, do nothing and
        return False if the key exists.  ``durable=False`` defers the fsync to
        the next :meth:`flush` (batched durability for chunk writes)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None:
        """Delete several objects (backends batch this where it pays)."""
        for k in keys:
            self.delete(k)

    def abort(self) -> None:
        """Discard unpublished non-durable puts (after a failed operation)."""

    def evict(self, key: str) -> None:
        """Drop any local copy of ``key`` (caches override this), so that the
        next read goes to the source of truth."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (recursively), in no particular order."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    def flush(self) -> None:
        """Make every earlier non-durable put durable."""

    def lock(self, name: str, shared: bool = False) -> AbstractContextManager[None]:
        """An inter-process lock (exclusive, or shared with other shared holders)."""
        raise StoreError(f"{type(self).__name__} does not support locking")

    def append_line(self, key: str, line: str) -> None:
        """Append one line to a log object (atomically with other appenders)."""
        raise StoreError(f"{type(self).__name__} does not support append-only logs")

    def usage(self, prefix: str) -> int:
        """Total stored bytes under ``prefix``."""
        return sum(self.size(k) for k in self.list(prefix))
