"""Pack files: many chunk blobs in one file, found through a sorted index.

Why: creating a file costs ~170 us on this machine's ext4 (measured in
docs/benchmarks.md), so one file per chunk made cold packing file-system
bound.  Chunks are appended to a pack in ``tmp/``; when the pack reaches its
target size or the writer flushes, the pack is fsynced and renamed into
``packs/``, then its index is written, fsynced and renamed beside it.  The
index is the commit point: a pack without an index is invisible, so a crash
leaves only unreferenced temporary files.

Finding a chunk must not cost in proportion to the store: a process does
not load every pack index.  Published indexes are merged into a few
*multi-pack indexes* (:mod:`.index`, git's ``multi-pack-index``): sorted records read
through ``mmap`` with a 256-entry fanout table and a binary search, so
opening a store maps a handful of files and a lookup touches a few pages.
Packs not yet merged ("loose") are loaded into a small dict.  A writer merges
after a flush once ``COMPACT_PACKS`` loose packs exist, size-tiered (a merge
takes the small multi-pack indexes along, never more than
``AUTO_MERGE_MAX`` records), so there are O(log n) of them; gc merges
everything into one.  A multi-pack index is a cache of the pack indexes: it
is written to ``tmp/`` and renamed into ``packs/`` (then the merged ones are
removed), its records for packs that are gone are ignored, and a crash at any
point leaves at worst a duplicate or a temporary file.

Formats (little-endian, see docs/format.md; ``NAME.midx`` in :mod:`.index`)::

    NAME.pack  b"CSPACK\\0\\0" | u32 version 1 | blobs...
    NAME.idx   b"CSIDX\\0\\0\\0" | u32 version 1 | u32 count
               | count x (cid 32 | u64 offset | u32 length), sorted by cid
               | blake3 of everything before (32)
"""

from __future__ import annotations

import fcntl
import hmac
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterator

from blake3 import blake3

from ..errors import StoreError, StoreFormatError
from .base import ChunkSet, ChunkStore, Location
from .faults import crash_point
from .fs import open_dir, open_regular
from .index import AUTO_MERGE_MAX, SortedIndex, encode_midx, record
from ..writeback import Writeback

log = logging.getLogger(__name__)

PACK_MAGIC = b"CSPACK\0\0"
IDX_MAGIC = b"CSIDX\0\0\0"
VERSION = 1
_HEAD = struct.Struct("<8sI")
_IDX_HEAD = struct.Struct("<8sII")
_ENTRY = struct.Struct("<32sQI")
DEFAULT_TARGET = 128 << 20
COMPACT_PACKS = 8  # loose packs that make a writer merge after its flush
_PACK_NAME = re.compile(r"[0-9a-f]{32}\Z")


def encode_index(entries: dict[bytes, tuple[int, int]]) -> bytes:
    body = _IDX_HEAD.pack(IDX_MAGIC, VERSION, len(entries)) + b"".join(
        _ENTRY.pack(cid, off, ln) for cid, (off, ln) in sorted(entries.items()))
    return body + blake3(body).digest()


def decode_index(data: bytes, what: str) -> list[tuple[bytes, int, int]]:
    if len(data) < _IDX_HEAD.size + 32:
        raise StoreError(f"{what}: truncated pack index")
    magic, version, count = _IDX_HEAD.unpack_from(data)
    if magic != IDX_MAGIC:
        raise StoreError(f"{what}: not a pack index")
    if version != VERSION:
        raise StoreFormatError(f"{what}: pack index version {version} is not supported")
    body, check = data[:-32], data[-32:]
    if len(body) != _IDX_HEAD.size + count * _ENTRY.size or not hmac.compare_digest(blake3(body).digest(), check):
        raise StoreError(f"{what}: pack index is corrupt")
    return [_ENTRY.unpack_from(body, _IDX_HEAD.size + i * _ENTRY.size) for i in range(count)]



class _Writer:
    """One pack being filled in ``tmp/``."""

    def __init__(self, tmp_fd: int):
        self.name = secrets.token_hex(16)
        self.tmp_fd = tmp_fd
        self.fd = os.open(self.name + ".pack", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                          dir_fd=tmp_fd)
        head = _HEAD.pack(PACK_MAGIC, VERSION)
        os.write(self.fd, head)
        self.size = len(head)
        self.entries: dict[bytes, tuple[int, int]] = {}
        self._writeback = Writeback(self.fd)

    def append(self, cid: bytes, blob: bytes) -> None:
        crash_point()
        view = memoryview(blob)
        off = self.size
        try:
            while view:
                view = view[os.pwrite(self.fd, view, off + len(blob) - len(view)):]
        except OSError as e:
            raise StoreError(f"cannot write pack {self.name}: {e.strerror}") from None
        self.entries[cid] = (off, len(blob))
        self.size += len(blob)
        self._writeback.wrote(self.size)

    def read(self, off: int, ln: int) -> bytes:
        return os.pread(self.fd, ln, off)

    def abort(self) -> None:
        os.close(self.fd)
        try:
            os.unlink(self.name + ".pack", dir_fd=self.tmp_fd)
        except FileNotFoundError:
            pass


class PackSet(ChunkStore):
    """The chunk store of a local store (``ROOT/packs``): its chunks in pack
    files.  Thread-safe; several processes may write at once (each writes its
    own packs).  Nothing is read at construction: the first lookup maps the
    multi-pack indexes and loads the loose pack indexes (see the module
    docstring)."""

    def __init__(self, root: str, target_size: int = DEFAULT_TARGET):
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, "packs")
        self.target = target_size
        self._dfd = self._tfd = -1
        self._fds: dict[str, int] = {}  # open packs, for pread without an open() per chunk
        self._retired: list[int] = []
        self._lock = threading.RLock()
        # every file operation is relative to these two descriptors (no path is followed again)
        try:
            self._dfd = open_dir(self.root, "packs")
            self._tfd = open_dir(self.root, "tmp")
        except OSError as e:
            self.close()
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from None
        self._scanned = False
        self._live: set[str] = set()  # packs with an index
        self._live_raw: set[bytes] = set()
        self._midx: dict[str, SortedIndex] = {}  # file name -> mapped multi-pack index
        self._bad_midx: set[str] = set()
        self._loose: dict[bytes, tuple[str, int, int]] = {}  # cid -> (pack, offset, length), packs not merged
        self._loose_packs: set[str] = set()
        self._w: _Writer | None = None
        self._recheck: set[bytes] = set()  # chunks whose next read goes by their pack's own index (after a bad read)

    def __repr__(self) -> str:
        return f"PackSet({self.root!r})"

    # -- index --------------------------------------------------------------
    def refresh(self) -> None:
        """Look again at what is published (by us or other processes)."""
        with self._lock:
            self._scan()

    def _scan(self) -> None:
        names = os.listdir(self._dfd)
        live = {n[:-4] for n in names if n.endswith(".idx") and _PACK_NAME.match(n[:-4])}
        midx = {n for n in names if n.endswith(".midx")}
        for n in set(self._midx) - midx:
            del self._midx[n]  # unmapped when no lookup uses it any more
        for n in sorted(midx - set(self._midx) - self._bad_midx):
            try:
                fd = open_regular(n, self._dfd)
                if fd is None:
                    raise StoreError(f"{os.path.join(self.dir, n)}: not a regular file")
                self._midx[n] = SortedIndex(fd, os.path.join(self.dir, n))
            except FileNotFoundError:
                continue
            except StoreError as e:
                log.warning("skipping %s", e)
                self._bad_midx.add(n)
        covered: set[str] = set()
        for m in self._midx.values():
            covered |= m.packs
        loose = live - covered
        if self._loose_packs - loose:  # merged or removed since: rebuild the small dict
            self._loose.clear()
            self._loose_packs.clear()
        for n in sorted(loose - self._loose_packs):
            self._load_loose(n)
        self._live = live
        self._live_raw = {bytes.fromhex(n) for n in live}
        self._scanned = True

    def _load_loose(self, pack: str) -> None:
        path = os.path.join(self.dir, pack + ".idx")
        try:
            fd = open_regular(pack + ".idx", self._dfd)
            if fd is None:
                log.warning("skipping %s: not a regular file", path)
                return
            with os.fdopen(fd, "rb") as f:
                entries = decode_index(f.read(), path)
        except FileNotFoundError:
            return
        except StoreError as e:
            log.warning("skipping %s", e)
            return
        for cid, off, ln in entries:
            self._loose.setdefault(cid, (pack, off, ln))
        self._loose_packs.add(pack)

    def _lookup(self, cid: bytes) -> tuple[str | None, int, int] | None:
        """Where ``cid`` is: (pack, offset, length), with pack None for the
        pack being written; None if absent.  Caller holds the lock."""
        if not self._scanned:
            self._scan()
        loc = self._loose.get(cid)
        if loc is not None and loc[0] in self._live:
            return loc
        for m in self._midx.values():
            got = m.find(cid)
            if got is not None and got[0] in self._live_raw:
                return got[0].hex(), got[1], got[2]
        w = self._w
        if w is not None and cid in w.entries:
            off, ln = w.entries[cid]
            return None, off, ln
        return None

    def locate(self, cid: bytes) -> Location | None:
        """Where a published chunk is (for a manifest's hints), or None."""
        with self._lock:
            loc = self._lookup(cid)
        if loc is None or loc[0] is None:
            return None
        return bytes.fromhex(loc[0]), loc[1], loc[2]

    def holds(self, hint: Location) -> bool:
        """Whether the pack a hint names is published (packs are immutable:
        a chunk a manifest placed there is still there)."""
        with self._lock:
            if not self._scanned:
                self._scan()
            return hint[0] in self._live_raw

    # -- object API -----------------------------------------------------------
    def has(self, cid: bytes) -> bool:
        with self._lock:
            return self._lookup(cid) is not None

    def evict(self, cid: bytes) -> None:
        """A read of ``cid`` did not check out: its next read finds it through
        its pack's own index (the commit point), not a multi-pack index
        record that may be damaged -- so that a damaged record never gets a
        good chunk quarantined."""
        with self._lock:
            self._recheck.add(cid)

    def _confirm(self, pack: str, cid: bytes) -> tuple[str, int, int] | None:
        """(pack, offset, length) of ``cid`` as ``pack``'s own index says, or None."""
        fd = open_regular(pack + ".idx", self._dfd)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            entries = decode_index(f.read(), os.path.join(self.dir, pack + ".idx"))
        for c, off, ln in entries:
            if c == cid:
                return pack, off, ln
        return None

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        if hint is not None and len(hint[0]) == 16:
            try:
                data = os.pread(self._fd(hint[0].hex()), hint[2], hint[1])
                if len(data) == hint[2]:
                    return data
            except (StoreError, OSError, OverflowError, ValueError):
                pass  # gone (gc rewrote it) or damaged: the index says where the chunk is now
        recheck = False
        for attempt in (0, 1):
            with self._lock:
                if attempt:
                    self._scan()
                elif self._recheck:
                    recheck = cid in self._recheck
                    self._recheck.discard(cid)
                loc = self._lookup(cid)
                if recheck and loc is not None and loc[0] is not None:
                    try:
                        loc = self._confirm(loc[0], cid)
                    except FileNotFoundError:
                        loc = None
                if loc is not None and loc[0] is None:
                    assert self._w is not None
                    return self._w.read(loc[1], loc[2])
            if loc is None:
                continue
            pack, off, ln = loc
            assert pack is not None  # an unpublished chunk was returned above
            try:
                data = os.pread(self._fd(pack), ln, off)
            except FileNotFoundError:
                continue  # repacked by another process: look again
            except (OverflowError, ValueError):
                raise StoreError(f"the index record of chunk {cid.hex()} is out of range (verify --repair "
                                 f"rebuilds the index)") from None
            if len(data) != ln:
                confirmed = self._confirm(pack, cid) if not recheck else None  # a damaged record, or a short pack?
                if confirmed is None or confirmed[1:] == (off, ln):
                    raise StoreError(f"pack {pack} is truncated")
                data = os.pread(self._fd(pack), confirmed[2], confirmed[1])
                if len(data) != confirmed[2]:
                    raise StoreError(f"pack {pack} is truncated")
            return data
        raise KeyError(cid.hex())

    def _fd(self, pack: str) -> int:
        """An open fd of a live pack; FileNotFoundError once the pack has been
        rewritten away (by gc in this or another process)."""
        fd = self._fds.get(pack)
        if fd is not None and os.fstat(fd).st_nlink == 0:
            with self._lock:  # retired, not closed: another thread may be reading with it
                if self._fds.get(pack) == fd:
                    self._retired.append(self._fds.pop(pack))
            raise FileNotFoundError(pack)
        if fd is None:
            opened = open_regular(pack + ".pack", self._dfd)
            if opened is None:
                raise StoreError(f"pack {pack} is not a regular file")
            new = opened
            with self._lock:
                fd = self._fds.setdefault(pack, new)
            if fd != new:
                os.close(new)
        return fd

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        with self._lock:
            fds = [*self._fds.values(), *self._retired, self._dfd, self._tfd]
            self._fds, self._retired = {}, []
            self._dfd = self._tfd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def put(self, cid: bytes, blob: bytes) -> None:
        with self._lock:
            if self._lookup(cid) is not None:
                return
            if self._w is None:
                self._w = _Writer(self._tfd)
            self._w.append(cid, blob)
            if self._w.size >= self.target:
                self._finish(durable=True)

    def flush(self, durable: bool = True) -> None:
        """Publish the pack being written (fsynced when ``durable``), then
        merge the loose pack indexes if there are enough of them."""
        with self._lock:
            if self._w is not None:
                self._finish(durable)
            if len(self._loose_packs) >= COMPACT_PACKS:
                self.compact(full=False)

    def _finish(self, durable: bool) -> None:
        w = self._w
        assert w is not None
        self._w = None
        if not w.entries:
            w.abort()
            return
        try:
            if durable:
                os.fsync(w.fd)
            os.close(w.fd)
            crash_point()
            os.rename(w.name + ".pack", w.name + ".pack", src_dir_fd=self._tfd, dst_dir_fd=self._dfd)
            crash_point()
            idx_tmp = w.name + ".idx"
            with os.fdopen(os.open(idx_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600,
                                   dir_fd=self._tfd), "wb") as f:
                f.write(encode_index(w.entries))
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            crash_point()
            os.rename(idx_tmp, idx_tmp, src_dir_fd=self._tfd, dst_dir_fd=self._dfd)
            crash_point()
            if durable:
                os.fsync(self._dfd)
        except OSError as e:
            raise StoreError(f"cannot write pack {w.name}: {e.strerror}") from None
        if not self._scanned:
            self._scan()
        for cid, (off, ln) in w.entries.items():
            self._loose.setdefault(cid, (w.name, off, ln))
        self._loose_packs.add(w.name)
        self._live.add(w.name)
        self._live_raw.add(bytes.fromhex(w.name))

    def abort(self) -> None:
        """Drop the pack being written (its chunks were never published)."""
        with self._lock:
            if self._w is not None:
                self._w.abort()
                self._w = None

    # -- merging the indexes -------------------------------------------------
    def compact(self, full: bool = True) -> bool:
        """Merge the loose pack indexes (and, size-tiered, the small
        multi-pack indexes; with ``full``, all of them) into one multi-pack
        index.  One process merges at a time; a writer that finds another
        merging skips (``full`` waits).  Whether a merge was written."""
        try:
            lock_fd = os.open("midx.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=self._dfd)
        except OSError as e:
            raise StoreError(f"{os.path.join(self.dir, 'midx.lock')}: {e.strerror} (a symlink or folder planted "
                             f"there is refused)") from None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | (0 if full else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            with self._lock:
                self._scan()
                return self._merge(full)
        finally:
            os.close(lock_fd)

    def _merge(self, full: bool) -> bool:
        for _attempt in range(3):
            inputs = self._merge_inputs(full)
            bad = [n for n, m in inputs if not m.checksum_ok()]
            if not bad:
                return self._write_merge(inputs)
            for n in bad:  # never re-encode damaged records under a fresh checksum: their packs go loose
                log.warning("skipping %s: checksum mismatch", os.path.join(self.dir, n))
                self._bad_midx.add(n)
                self._midx.pop(n, None)
            self._scan()
        return False

    def _merge_inputs(self, full: bool) -> list[tuple[str, SortedIndex]]:
        """The multi-pack indexes a merge takes (with every loose pack)."""
        total = sum(1 for _c, (p, _o, _l) in self._loose.items() if p in self._loose_packs)
        inputs: list[tuple[str, SortedIndex]] = []
        for name, m in sorted(self._midx.items(), key=lambda kv: kv[1].count):
            if full or (m.count <= 2 * total and total + m.count <= AUTO_MERGE_MAX):
                inputs.append((name, m))
                total += m.count
            else:
                break
        return inputs

    def _write_merge(self, inputs: list[tuple[str, SortedIndex]]) -> bool:
        loose = self._loose_packs
        if not loose and (len(inputs) <= 1 and not (inputs and inputs[0][1].packs - self._live)):
            return False  # nothing to merge, and no records of removed packs to drop
        live_raw = self._live_raw
        records: list[bytes] = []
        for _n, m in inputs:
            records.extend(r for r in m.records() if r[32:48] in live_raw)
        for cid, (pack, off, ln) in self._loose.items():
            if pack in self._live:
                records.append(record(cid, bytes.fromhex(pack), off, ln))
        name = secrets.token_hex(16) + ".midx"
        try:
            with os.fdopen(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                                   dir_fd=self._tfd), "wb") as f:
                f.write(encode_midx(records))
                f.flush()
                os.fsync(f.fileno())
            crash_point()
            os.rename(name, name, src_dir_fd=self._tfd, dst_dir_fd=self._dfd)
            os.fsync(self._dfd)
            crash_point()
            for old, _m in inputs:
                try:
                    os.unlink(old, dir_fd=self._dfd)
                except FileNotFoundError:
                    pass
        except OSError as e:
            raise StoreError(f"cannot write a multi-pack index: {e.strerror}") from None
        self._scan()
        return True

    # -- enumeration ----------------------------------------------------------
    def entries(self) -> Iterator[tuple[bytes, int]]:
        """(chunk id, stored length) of every published chunk, streamed from
        the indexes (a chunk stored twice by racing writers may appear twice)."""
        with self._lock:
            self._scan()
            live, live_raw = set(self._live), set(self._live_raw)
            loose = [(c, ln) for c, (p, _o, ln) in self._loose.items() if p in live]
            midx = list(self._midx.values())
        yield from loose
        for m in midx:
            yield from m.entries(live_raw)

    def unreferenced(self, live: ChunkSet) -> tuple[int, list[tuple[bytes, int]]]:
        """(chunks stored, [(cid, length)] of those not in ``live``): bucket by
        bucket (first byte), set operations in C over each index's fanout
        range, pages dropped behind (1M chunks: about a second, ~100 MiB)."""
        with self._lock:
            self._scan()
            loose: dict[int, list[bytes]] = {}
            for c, (p, _o, _ln) in self._loose.items():
                if p in self._live:
                    loose.setdefault(c[0], []).append(c)
            midx = list(self._midx.values())
        total = 0  # a chunk two racing writers both stored counts twice (until gc merges)
        doomed: set[bytes] = set()
        for first in range(256):
            keep = live.bucket(first)
            own = set(loose.get(first, ()))
            total += len(own)
            doomed |= own - keep
            for m in midx:
                cids = m.bucket_cids(first)
                total += len(cids)
                doomed |= cids - keep
        out = []
        for c in doomed:
            loc = self.locate(c)
            if loc is not None:
                out.append((c, loc[2]))
        return total, out

    def cids(self) -> Iterator[bytes]:
        return (c for c, _n in self.entries())

    def ids(self) -> Iterator[bytes]:
        return self.cids()

    def size(self, cid: bytes) -> int:
        loc = self.locate(cid)
        if loc is None:
            raise KeyError(cid.hex())
        return loc[2]

    def usage(self) -> int:
        total = 0
        for n in os.listdir(self._dfd):
            try:
                total += os.stat(n, dir_fd=self._dfd, follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
        return total

    def verify_indexes(self) -> list[str]:
        """Problems with the multi-pack indexes (checksums), for ``verify``."""
        with self._lock:
            self._scan()
            return [f"{os.path.join(self.dir, n)}: checksum mismatch" for n, m in self._midx.items()
                    if not m.checksum_ok()] + [f"{os.path.join(self.dir, n)}: unreadable" for n in self._bad_midx]

    def check_index(self) -> list[str]:
        return self.verify_indexes()

    def repair_index(self) -> None:
        self.repair_indexes()

    def repair_indexes(self) -> None:
        """Remove damaged multi-pack indexes (their packs' own indexes hold
        the same records), then merge everything again."""
        with self._lock:
            self._scan()
            bad = {n for n, m in self._midx.items() if not m.checksum_ok()} | set(self._bad_midx)
            for n in bad:
                try:
                    os.unlink(n, dir_fd=self._dfd)
                except FileNotFoundError:
                    pass
            self._bad_midx -= bad
            self._scan()
        self.compact(full=True)

    def clean_leftovers(self, grace: float) -> int:
        """Remove files in ``tmp/`` left by writers that died, and packs whose
        index never appeared, both older than ``grace`` seconds."""
        now = time.time()

        def unlink_if_old(name: str, dfd: int) -> int:
            try:
                if now - os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime > grace:
                    os.unlink(name, dir_fd=dfd)
                    return 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
            return 0

        n = sum(unlink_if_old(name, self._tfd) for name in os.listdir(self._tfd))
        names = set(os.listdir(self._dfd))
        n += sum(unlink_if_old(name, self._dfd) for name in names
                 if name.endswith(".pack") and name[:-5] + ".idx" not in names)
        return n

    def delete(self, cids: list[bytes]) -> None:
        """Remove chunks by rewriting the packs that hold them (the indexes
        are merged afterwards by :meth:`compact`)."""
        if not cids:
            return
        with self._lock:
            self.flush()
            self._scan()
            doomed = set(cids)
            for _round in range(3):  # a chunk two racing writers both stored is in two packs
                packs = {loc[0] for c in doomed if (loc := self._lookup(c)) is not None and loc[0] is not None}
                if not packs:
                    break
                for pack in sorted(packs):
                    self._rewrite(pack, doomed)
                self._scan()

    def _rewrite(self, pack: str, doomed: set[bytes]) -> None:
        try:
            fd = open_regular(pack + ".idx", self._dfd)
        except FileNotFoundError:
            return  # rewritten meanwhile (a quarantine in another process)
        if fd is None:
            raise StoreError(f"pack index {pack} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            entries = decode_index(f.read(), os.path.join(self.dir, pack + ".idx"))
        try:
            src = open_regular(pack + ".pack", self._dfd)
        except FileNotFoundError:
            return
        if src is None:
            raise StoreError(f"pack {pack} is not a regular file")
        try:
            for cid, off, ln in entries:
                if cid not in doomed:
                    blob = os.pread(src, ln, off)
                    if self._w is None:
                        self._w = _Writer(self._tfd)
                    self._w.append(cid, blob)
        finally:
            os.close(src)
        if self._w is not None:
            self._finish(durable=True)
        crash_point()
        os.unlink(pack + ".idx", dir_fd=self._dfd)  # unpublish first
        crash_point()
        os.unlink(pack + ".pack", dir_fd=self._dfd)
        if pack in self._fds:
            self._retired.append(self._fds.pop(pack))
        os.fsync(self._dfd)
