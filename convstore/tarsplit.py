"""Split a tar stream into metadata and file contents, and join it back.

Like tar-split (containers/storage), every byte that is not regular-file
content -- headers, PAX and GNU long-name records, padding, the end-of-archive
blocks and anything after them -- is kept verbatim as *metadata*, and file
contents go to the chunker.  Joining metadata and contents back gives the
exact original tar, so every layer's diff_id verifies after a round trip.

Written by hand because :mod:`tarfile` hides the raw header bytes, reads
ahead in stream mode, and decodes headers slowly; its constants and
semantics are followed exactly (a test compares against it).
"""

from __future__ import annotations

import base64
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .errors import CorruptLayer, UnsupportedMediaType

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
GNU_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# Data follows a header only for regular files and unknown types (as in tarfile).
_NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)


@dataclass(slots=True)
class TarEntry:
    """One member of a layer: what a lazy reader and rootfs unpack need."""

    path: str
    type: str  # one tar typeflag character ('0' file, '5' dir, '2' symlink, ...)
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0  # where its contents start in the layer's content stream
    uname: str = ""
    gname: str = ""

    @property
    def is_file(self) -> bool:
        return self.type in ("0", "\0", "7")

    def to_row(self) -> list[Any]:
        x = {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()} if self.xattrs else 0
        return [self.path, self.type, self.mode, self.uid, self.gid, self.size, self.mtime_ns,
                self.linkname, self.devmajor, self.devminor, x, self.offset, self.uname, self.gname]

    @classmethod
    def from_row(cls, r: list[Any]) -> TarEntry:
        x = {k: base64.b64decode(v) for k, v in r[10].items()} if r[10] else {}
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], x, r[11], r[12], r[13])


@dataclass(slots=True)
class SplitResult:
    segments: list[tuple[int, int]]  # (metadata bytes, content bytes) pairs in stream order
    entries: list[TarEntry]
    content_size: int
    total_size: int


@dataclass(slots=True)
class _Header:
    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    type: bytes
    linkname: str
    uname: str
    gname: str
    devmajor: int
    devminor: int


_UNSIGNED = struct.Struct("148B8x356B")
_SIGNED = struct.Struct("148b8x356b")


def _str(b: bytes) -> str:
    i = b.find(0)
    return (b if i < 0 else b[:i]).decode("utf-8", "surrogateescape")


def _num(b: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (as tarfile.nti)."""
    if b[0] in (0o200, 0o377):
        n = int.from_bytes(b[1:], "big")
        return n - 256 ** (len(b) - 1) if b[0] == 0o377 else n
    i = b.find(0)
    t = (b if i < 0 else b[:i]).strip()
    try:
        return int(t, 8) if t else 0
    except ValueError:
        raise CorruptLayer("invalid number in tar header") from None


_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")


def parse_header(b: bytes) -> _Header:
    """Decode one 512-byte ustar/GNU/PAX header block, as
    :meth:`tarfile.TarInfo.frombuf` does (several times faster; tar headers
    are the per-file cost of packing)."""
    (name_b, mode, uid, gid, size, mtime, chk, t, link, _magic, _ver, uname, gname, dmaj, dmin,
     prefix_b) = _FIELDS.unpack_from(b)
    c = _num(chk)
    if c != 256 + sum(_UNSIGNED.unpack_from(b)) and c != 256 + sum(_SIGNED.unpack_from(b)):
        raise CorruptLayer("invalid tar header (bad checksum)")
    name = _str(name_b)
    if t == tarfile.AREGTYPE and name.endswith("/"):
        t = tarfile.DIRTYPE
    if t == tarfile.DIRTYPE:
        name = name.rstrip("/")
    if prefix_b[0] and t not in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE):
        name = _str(prefix_b) + "/" + name
    if _num(size) < 0:  # base-256 numbers can be negative
        raise CorruptLayer(f"tar header of {name!r} has a negative size")
    return _Header(name, _num(mode), _num(uid), _num(gid), _num(size), _num(mtime), t, _str(link),
                   _str(uname), _str(gname), _num(dmaj), _num(dmin))


def _read_exact(reader: BinaryIO, n: int) -> bytes:
    b = reader.read(n)
    if len(b) != n:
        raise CorruptLayer("tar stream is truncated")
    return b


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse PAX records ``"%d %s=%s\\n"``; values stay bytes (xattrs may be binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        if sp < 0:
            raise CorruptLayer("malformed PAX header")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise CorruptLayer("malformed PAX header") from None
        rec = data[sp + 1 : pos + length]
        if length <= 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise CorruptLayer("malformed PAX header")
        k, v = rec[:-1].split(b"=", 1)
        out[k.decode("utf-8", "surrogateescape")] = v
        pos += length
    return out


def _pax_time_ns(v: bytes) -> int:
    s = v.decode("ascii", "replace")
    neg = s.startswith("-")
    whole, _, frac = s.lstrip("-").partition(".")
    try:
        ns = int(whole or 0) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    except ValueError:
        raise CorruptLayer("malformed PAX time") from None
    return -ns if neg else ns


def split_tar(
    reader: BinaryIO,
    meta_sink: Callable[[bytes], None],
    content_sink: Callable[[BinaryIO, int], None],
) -> SplitResult:
    """Walk an uncompressed tar stream.

    Metadata bytes go to ``meta_sink``; for each regular file,
    ``content_sink(reader, size)`` must consume exactly ``size`` bytes.
    The stream is read to its end (trailing blocks are metadata too).
    """
    segments: list[tuple[int, int]] = []
    entries: list[TarEntry] = []
    pending = 0  # metadata bytes since the last content segment
    content = 0
    total = 0
    pax_global: dict[str, bytes] = {}
    pax: dict[str, bytes] = {}
    longname: str | None = None
    longlink: str | None = None

    def meta(b: bytes) -> None:
        nonlocal pending, total
        meta_sink(b)
        pending += len(b)
        total += len(b)

    while True:
        hdr = reader.read(BLOCK)
        if not hdr:
            break  # no end-of-archive marker: accepted, as tarfile does
        if len(hdr) < BLOCK:
            raise CorruptLayer("tar stream is truncated inside a header")
        if hdr == ZERO_BLOCK:
            meta(hdr)
            while True:  # end of archive: keep everything after it verbatim
                rest = reader.read(1 << 16)
                if not rest:
                    break
                meta(rest)
            break
        ti = parse_header(hdr)
        meta(hdr)
        t = ti.type
        if t in PAX_TYPES or t in GNU_LONG:
            data = _read_exact(reader, ti.size + (-ti.size % BLOCK))
            meta(data)
            body = data[: ti.size]
            if t == tarfile.XGLTYPE:
                pax_global.update(_parse_pax(body))
            elif t in PAX_TYPES:
                pax.update(_parse_pax(body))
            elif t == tarfile.GNUTYPE_LONGNAME:
                longname = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                longlink = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if t == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in pax):
            raise UnsupportedMediaType("layer holds a GNU sparse file, which OCI layers do not use")
        rec = {**pax_global, **pax}
        name = longname if longname is not None else ti.name
        link = longlink if longlink is not None else ti.linkname
        size = ti.size
        mtime_ns = ti.mtime * 1_000_000_000
        uid, gid, uname, gname = ti.uid, ti.gid, ti.uname, ti.gname
        xattrs: dict[str, bytes] = {}
        for k, v in rec.items():
            if k == "path":
                name = v.decode("utf-8", "surrogateescape")
            elif k == "linkpath":
                link = v.decode("utf-8", "surrogateescape")
            elif k == "size":
                size = int(v)
                if size < 0:
                    raise CorruptLayer(f"PAX size of {name!r} is negative")
            elif k == "mtime":
                mtime_ns = _pax_time_ns(v)
            elif k == "uid":
                uid = int(v)
            elif k == "gid":
                gid = int(v)
            elif k == "uname":
                uname = v.decode("utf-8", "surrogateescape")
            elif k == "gname":
                gname = v.decode("utf-8", "surrogateescape")
            elif k.startswith("SCHILY.xattr."):
                xattrs[k[len("SCHILY.xattr."):]] = v
            elif k.startswith("LIBARCHIVE.xattr."):
                xattrs[k[len("LIBARCHIVE.xattr."):]] = base64.b64decode(v + b"==")
        pax = {}
        longname = longlink = None
        tchar = t.decode("latin-1")
        if t == tarfile.DIRTYPE:
            name = name.rstrip("/") or name
        data_len = 0 if t in _NO_DATA else size
        entries.append(TarEntry(name, tchar, ti.mode, uid, gid, size if t in REGULAR else 0, mtime_ns, link,
                                ti.devmajor, ti.devminor, xattrs, content, uname, gname))
        segments.append((pending, data_len))
        pending = 0
        if data_len:
            content_sink(reader, data_len)
            content += data_len
            total += data_len
            pad = -data_len % BLOCK
            if pad:
                meta(_read_exact(reader, pad))
    if pending:
        segments.append((pending, 0))
    return SplitResult(segments, entries, content, total)


SEGMENT = struct.Struct("<QQ")


def pack_segments(segments: list[tuple[int, int]]) -> bytes:
    return b"".join(SEGMENT.pack(m, d) for m, d in segments)


def unpack_segments(b: bytes) -> list[tuple[int, int]]:
    if len(b) % SEGMENT.size:
        raise CorruptLayer("segment table has a bad length")
    return [SEGMENT.unpack_from(b, i) for i in range(0, len(b), SEGMENT.size)]


def join_tar(
    segments: list[tuple[int, int]], meta: bytes, content: Iterator[memoryview | bytes]
) -> Iterator[memoryview | bytes]:
    """Yield the original tar stream from its metadata and its content pieces."""
    mpos = 0
    it = iter(content)
    piece: memoryview = memoryview(b"")
    for mlen, dlen in segments:
        if mlen:
            yield meta[mpos : mpos + mlen]
            mpos += mlen
        while dlen:
            if not piece:
                try:
                    piece = memoryview(next(it))
                except StopIteration:
                    raise CorruptLayer("content stream is shorter than the layer") from None
                continue
            take = min(dlen, len(piece))
            yield piece[:take]
            piece = piece[take:]
            dlen -= take
    if mpos != len(meta):
        raise CorruptLayer("metadata is longer than the segment table")
