"""The chunk seam: where a chunk id becomes a stored object and back.

Every module goes through :class:`Chunks` to store, find, read and drop
chunks; nothing else spells the ``chunks/`` key prefix.  Reading is one path:
fetch -> decrypt -> check against the manifest's identity
(:func:`~convstore.crypto.decrypt_chunk`).

Self-healing dedup: a stored chunk that is corrupt (it fails authentication,
or decrypts to other bytes than its manifest names) would otherwise stay a
dedup target forever, and every later pack of the same content would
produce an unreadable image.  When a read finds one, it is *quarantined*:
its blob is copied to ``quarantine/<cid>`` (evidence; ciphertext only) and
the chunk is deleted, so the next pack of that content stores a good copy.
A chunk is only quarantined after a second read gives the same corrupt bytes
(a transient transport error never deletes a good chunk).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Iterator

from .crypto import ChunkIdentity, decrypt_chunk
from .errors import ChunkMissing, CorruptObject
from .stores.base import ObjectStore

PREFIX = "chunks/"
QUARANTINE = "quarantine/"
log = logging.getLogger("convstore")


def chunk_key(cid: bytes) -> str:
    return PREFIX + cid.hex()


class Chunks:
    """Chunks by id over an :class:`ObjectStore`."""

    __slots__ = ("objects",)

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    # -- writing ------------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        return self.objects.has(chunk_key(cid))

    def put(self, cid: bytes, blob: bytes, *, durable: bool = False) -> None:
        self.objects.put(chunk_key(cid), blob, durable=durable)

    def flush(self) -> None:
        self.objects.flush()

    def abort(self) -> None:
        self.objects.abort()

    def delete(self, cids: Iterable[bytes]) -> None:
        self.objects.delete_many([chunk_key(c) for c in cids])

    # -- reading ------------------------------------------------------------
    def blob(self, cid: bytes, what: str = "") -> bytes:
        """The stored (encrypted) blob; :class:`ChunkMissing` if absent."""
        try:
            return self.objects.get(chunk_key(cid))
        except KeyError:
            raise ChunkMissing(f"{what + ': ' if what else ''}chunk {cid.hex()} is missing") from None

    def blobs(self, cids: list[bytes]) -> dict[bytes, bytes]:
        """Several blobs at once (coalesced where the backend can)."""
        got = self.objects.get_many([chunk_key(c) for c in cids])
        return {c: got[chunk_key(c)] for c in cids}

    def open(self, blob: bytes, ident: ChunkIdentity) -> bytes:
        """Decrypt and check ``blob`` against ``ident``; a corrupt stored chunk is quarantined."""
        try:
            return decrypt_chunk(blob, ident)
        except CorruptObject:
            self.quarantine(ident, blob)
            raise

    def read(self, ident: ChunkIdentity, what: str = "") -> tuple[bytes, int]:
        """(plaintext, stored size) of one chunk: fetch -> decrypt -> check."""
        blob = self.blob(ident.cid, what)
        return self.open(blob, ident), len(blob)

    def quarantine(self, ident: ChunkIdentity, blob: bytes) -> bool:
        """Move a chunk that is corrupt *as stored* out of the dedup index."""
        self.objects.evict(chunk_key(ident.cid))  # a cache's copy may be the damaged one
        try:
            again = self.objects.get(chunk_key(ident.cid))
        except KeyError:
            return False
        if not hmac.compare_digest(again, blob):
            return False  # the first read was damaged in transit, not the stored copy
        try:
            decrypt_chunk(again, ident)
            return False
        except CorruptObject:
            pass
        if not self.objects.supports_deletes:
            return False
        try:
            self.objects.put(QUARANTINE + ident.cid.hex(), blob, durable=False)
            self.objects.delete(chunk_key(ident.cid))
        except (OSError, KeyError, CorruptObject):
            return False
        log.warning("chunk %s is corrupt in the store: quarantined, the next pack of its content stores it again",
                    ident.cid.hex())
        return True

    # -- enumeration --------------------------------------------------------
    def ids(self) -> Iterator[bytes]:
        for k in self.objects.list(PREFIX):
            yield bytes.fromhex(k[len(PREFIX):])

    def size(self, cid: bytes) -> int:
        return self.objects.size(chunk_key(cid))

    def usage(self) -> int:
        return self.objects.usage(PREFIX.rstrip("/"))
