"""The chunk seam: the one encrypt->store and fetch->decrypt->check path.

Every module goes through :class:`Chunks` to store, find, read and drop
chunks, over the backend's :class:`~convstore.stores.base.ChunkStore`.
Reading is one path: fetch -> decrypt -> check against the manifest's
identity (:func:`~convstore.crypto.decrypt_chunk`).

Self-healing dedup: a stored chunk that is corrupt (it fails authentication,
or decrypts to other bytes than its manifest names) would otherwise stay a
dedup target forever, and every later pack of the same content would
produce an unreadable image.  When a read finds one, it is *quarantined*:
its blob is copied to the metadata object ``quarantine/<cid hex>`` (evidence;
ciphertext only) and
the chunk is deleted, so the next pack of that content stores a good copy.
A chunk is only quarantined after a second read gives the same corrupt bytes
(a transient transport error never deletes a good chunk).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Iterator

from ..crypto import ChunkIdentity, decrypt_chunk
from ..errors import ChunkMissing, ConvstoreError, CorruptObject
from ..crypto import encrypt_chunk
from ..stores.base import ChunkStore, Location, ObjectStore

QUARANTINE = "quarantine/"
log = logging.getLogger("convstore")


class Chunks:
    """Chunks by id over a :class:`ChunkStore` (``store``); ``objects`` is
    the metadata store that keeps quarantined blobs."""

    __slots__ = ("store", "objects")

    def __init__(self, store: ChunkStore, objects: ObjectStore) -> None:
        self.store = store
        self.objects = objects

    # -- writing ------------------------------------------------------------
    def has(self, cid: bytes, hint: Location | None = None) -> bool:
        """Whether the chunk is stored (a hint whose container is still there
        answers without an index lookup)."""
        return (hint is not None and self.store.holds(hint)) or self.store.has(cid)

    def locate(self, cids: list[bytes], prior: list[Location | None] | None = None) -> list[Location | None]:
        """Where each (flushed) chunk is, for a manifest's hints; a prior hint
        whose container is still there is kept without a lookup."""
        out: list[Location | None] = []
        for i, cid in enumerate(cids):
            h = prior[i] if prior is not None and i < len(prior) else None
            out.append(h if h is not None and self.store.holds(h) else self.store.locate(cid))
        if self.store.needs_locations:
            missing = [c.hex() for c, h in zip(cids, out) if h is None]
            if missing:
                raise ChunkMissing(f"{len(missing)} chunks (first {missing[0]}) are not in the store's index after "
                                   f"their upload; nothing was published: run it again")
        return out

    def put(self, cid: bytes, blob: bytes) -> None:
        """Store an encrypted blob (durable and visible at :meth:`flush`)."""
        self.store.put(cid, blob)

    def put_plain(self, plain: bytes | memoryview, ident: ChunkIdentity, level: int) -> int:
        """Encrypt and store one chunk unless present; its stored size, or -1 if it was there."""
        if self.store.has(ident.cid):
            return -1
        blob = encrypt_chunk(plain, ident, level)
        self.store.put(ident.cid, blob)
        return len(blob)

    def flush(self) -> None:
        self.store.flush()

    def abort(self) -> None:
        self.store.abort()

    def delete(self, cids: Iterable[bytes]) -> None:
        self.store.delete(list(cids))

    def sweep(self, cids: Iterable[bytes], live_containers: set[bytes] | None = None) -> None:
        """gc's sweep (:meth:`ChunkStore.sweep <convstore.stores.base.ChunkStore.sweep>`)."""
        self.store.sweep(list(cids), live_containers)

    # -- reading ------------------------------------------------------------
    def blob(self, cid: bytes, what: str = "", hint: Location | None = None) -> bytes:
        """The stored (encrypted) blob; :class:`ChunkMissing` if absent."""
        try:
            return self.store.get(cid, hint)
        except KeyError:
            raise ChunkMissing(f"{what + ': ' if what else ''}chunk {cid.hex()} is missing") from None

    def blobs(self, cids: list[bytes], hints: dict[bytes, Location] | None = None) -> dict[bytes, bytes]:
        """Several blobs at once (coalesced where the backend can)."""
        try:
            return self.store.get_many(cids, hints)
        except KeyError as e:
            raise ChunkMissing(f"chunk {e.args[0] if e.args else ''} is missing") from None

    def open(self, blob: bytes, ident: ChunkIdentity) -> bytes:
        """Decrypt and check ``blob`` against ``ident``.  If it fails, the chunk
        is read again through the index, never the hint (a cache's copy
        evicted first): a stale hint, or a copy damaged only in transit or in
        the cache, is replaced by the good one transparently; a
        stored copy that is corrupt twice alike is quarantined, and
        :class:`CorruptObject` raised."""
        return self._good(blob, ident)[1]

    def checked(self, blob: bytes, ident: ChunkIdentity) -> bytes:
        """``blob`` if it checks out against ``ident``, else a good copy read
        again as :meth:`open` does (what a copy to another store sends)."""
        return self._good(blob, ident)[0]

    def _good(self, blob: bytes, ident: ChunkIdentity) -> tuple[bytes, bytes]:
        try:
            return blob, decrypt_chunk(blob, ident)
        except CorruptObject:
            pass
        self.store.evict(ident.cid)
        try:
            again = self.store.get(ident.cid)
        except KeyError:
            raise ChunkMissing(f"chunk {ident.cid.hex()}: the copy read does not check out, and the store's "
                               f"index names no other") from None
        try:
            return again, decrypt_chunk(again, ident)
        except CorruptObject:
            if hmac.compare_digest(again, blob):
                self._quarantine(ident, blob)
            raise

    def read(self, ident: ChunkIdentity, what: str = "", hint: Location | None = None) -> tuple[bytes, int]:
        """(plaintext, stored size) of one chunk: fetch -> decrypt -> check."""
        blob = self.blob(ident.cid, what, hint)
        return self.open(blob, ident), len(blob)

    def _quarantine(self, ident: ChunkIdentity, blob: bytes) -> bool:
        """Move a chunk that is corrupt *as stored* (read twice alike) out of the dedup index."""
        if not self.store.supports_deletes:
            return False  # a registry: reported, and left to the registry's own clean-up
        try:
            self.objects.put(QUARANTINE + ident.cid.hex(), blob, durable=False)
            self.store.delete([ident.cid])
        except (OSError, KeyError, ConvstoreError):
            return False
        log.warning("chunk %s is corrupt in the store: quarantined, the next pack of its content stores it again",
                    ident.cid.hex())
        return True

    # -- enumeration --------------------------------------------------------
    def ids(self) -> Iterator[bytes]:
        return self.store.ids()

    def size(self, cid: bytes) -> int:
        return self.store.size(cid)

    def usage(self) -> int:
        return self.store.usage()

    # -- the quarantine (``quarantine/<cid hex>``: evidence, kept until gc) ----
    def quarantined(self) -> list[str]:
        """The keys of quarantined blobs."""
        return list(self.objects.list(QUARANTINE.rstrip("/")))

    def drop_quarantined(self, keys: list[str]) -> None:
        self.objects.delete_many(keys)
