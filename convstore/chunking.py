"""Content-defined chunking of a layer's file-content stream.

FastCDC 2020 (pyfastcdc, Cython, releases the GIL) over the concatenated
contents of a layer's regular files.  Two rules on top of plain FastCDC, both
recorded in every manifest because chunk boundaries are storage format:

* a layer boundary is always a cut;
* a file of at least ``file_cut`` bytes starts and ends on a cut, so a large
  file chunks the same wherever it appears (another layer, another order),
  while small files are still packed together into full-size chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .errors import CorruptLayer, StoreFormatError


@dataclass(frozen=True, slots=True)
class ChunkParams:
    """Pinned chunker parameters (see docs/format.md)."""

    algorithm: str = "fastcdc2020"
    min_size: int = 16 * 1024
    avg_size: int = 64 * 1024
    max_size: int = 256 * 1024
    normalized: int = 1
    seed: int = 0
    file_cut: int = 64 * 1024

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkParams:
        if d.get("algorithm") != "fastcdc2020":
            raise StoreFormatError(f"unknown chunking algorithm {d.get('algorithm')!r}")
        return cls(**d)


class ReadInto(Protocol):
    def readinto(self, b: memoryview, /) -> int | None: ...


class StreamChunker:
    """Cuts a stream fed piecewise into chunks, handing each to ``emit``.

    Bytes are read straight into one reusable buffer; each emitted chunk is
    a private ``bytes`` copy, so ``emit`` may hand it to another thread.
    """

    def __init__(self, params: ChunkParams, emit: Callable[[bytes], None], buffer_size: int = 8 << 20):
        if buffer_size < 4 * params.max_size:
            raise ValueError("buffer must hold four maximal chunks")
        from pyfastcdc import FastCDC  # here: readers import this module for ChunkParams only

        self.params = params
        self._cdc = FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalized,  # type: ignore[arg-type]
            seed=params.seed,
        )
        self._emit = emit
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._fill = 0

    def feed_from(self, reader: ReadInto, n: int) -> None:
        """Read exactly ``n`` bytes of file content from ``reader``."""
        cap = len(self._buf)
        while n:
            if self._fill == cap:
                self._cut(final=False)
            want = min(n, cap - self._fill)
            got = reader.readinto(self._view[self._fill : self._fill + want])
            if not got:
                raise CorruptLayer("tar stream ends inside a file's contents")
            self._fill += got
            n -= got

    def feed_file(self, reader: ReadInto, n: int) -> None:
        """Feed one file's contents, applying the large-file cut rule."""
        big = n >= self.params.file_cut
        if big:
            self.cut()
        self.feed_from(reader, n)
        if big:
            self.cut()

    def cut(self) -> None:
        """Force a chunk boundary at the current position."""
        if self._fill:
            self._cut(final=True)

    def _cut(self, final: bool) -> None:
        view = self._view[: self._fill]
        # FastCDC looks at most max_size bytes ahead of a chunk's start, and
        # its normalisation point depends on how many bytes remain; so only
        # a chunk that starts at least max_size before the buffer's end is
        # final.  The rest is carried over to the next fill.
        limit = self._fill if final else self._fill - self.params.max_size
        carry_from = self._fill
        for c in self._cdc.cut_buf(view):
            if c.offset >= limit:
                carry_from = c.offset
                break
            self._emit(bytes(view[c.offset : c.offset + c.length]))
        del view
        keep = self._fill - carry_from
        if keep:
            self._buf[:keep] = self._buf[carry_from : self._fill]
        self._fill = keep
