"""Tar split/join: byte-exact round trips and a correct file index."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imagebuilder import Entry, make_tar, rich_layer

from convstore.errors import CorruptLayer, UnsupportedMediaType
from convstore.tarsplit import join_tar, split_tar


def roundtrip(tar: bytes):
    meta = bytearray()
    content = bytearray()

    def sink(r, n):
        content.extend(r.read(n))

    res = split_tar(io.BytesIO(tar), meta.extend, sink)
    rebuilt = b"".join(bytes(p) for p in join_tar(res.segments, bytes(meta), iter([bytes(content)])))
    return res, rebuilt, bytes(content)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_roundtrip_formats(fmt):
    entries = [Entry("a", "dir"), Entry("a/f", data=b"x" * 1000), Entry("a/l", "symlink", linkname="f")]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append(Entry("a/" + "n" * 200, data=b"long"))  # PAX path / GNU longname
    tar = make_tar(entries, fmt)
    res, rebuilt, content = roundtrip(tar)
    assert rebuilt == tar
    assert content == b"x" * 1000 + (b"long" if fmt != tarfile.USTAR_FORMAT else b"")
    assert [e.path for e in res.entries][-1] == ("a/" + "n" * 200 if fmt != tarfile.USTAR_FORMAT else "a/l")


def test_rich_layer_index():
    tar = rich_layer()
    res, rebuilt, content = roundtrip(tar)
    assert rebuilt == tar
    by = {e.path: e for e in res.entries}
    assert by["d/suid"].mode == 0o4755
    assert by["d/owned"].uid == 1234 and by["d/owned"].gid == 5678
    assert by["d/xattr"].xattrs == {"user.test": b"value", "user.other": "é\x01".encode()}
    assert by["d/hard"].type == "1" and by["d/hard"].linkname == "d/small.txt"
    assert by["d/null"].type == "3" and (by["d/null"].devmajor, by["d/null"].devminor) == (1, 3)
    assert by["d/hiresmtime"].mtime_ns == 1_700_000_000_123_456_789
    long = [p for p in by if p.endswith(".txt") and len(p) > 200]
    assert len(long) == 1
    # file offsets index the content stream exactly
    for e in res.entries:
        if e.is_file:
            with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
                assert content[e.offset : e.offset + e.size] == tf.extractfile(e.path).read()


def test_trailing_bytes_after_end_of_archive_are_kept():
    tar = make_tar([Entry("f", data=b"abc")]) + b"\0" * 4096 + b"garbage"
    _res, rebuilt, _ = roundtrip(tar)
    assert rebuilt == tar


def test_truncated_tar_is_an_error():
    tar = make_tar([Entry("f", data=b"a" * 5000)])
    with pytest.raises(CorruptLayer):
        roundtrip(tar[:1500])
    with pytest.raises(CorruptLayer):
        roundtrip(tar[:700])  # inside the second header block


def test_bad_checksum_is_an_error():
    tar = bytearray(make_tar([Entry("f", data=b"abc")]))
    tar[0] ^= 0xFF
    with pytest.raises(CorruptLayer):
        roundtrip(bytes(tar))


def test_a_negative_size_is_refused():
    """Found by the atheris harness: a base-256 size of -1 reached the content sink."""
    tar = bytearray(make_tar([Entry("f", data=b"abc")], tarfile.GNU_FORMAT))
    tar[124:136] = b"\xff" * 12  # base-256, negative: -1
    chk = sum(tar[:148]) + 8 * 32 + sum(tar[156:512])
    tar[148:156] = b"%06o\0 " % chk
    with pytest.raises(CorruptLayer, match="negative size"):
        roundtrip(bytes(tar))


def test_gnu_sparse_is_refused():
    tar = bytearray(make_tar([Entry("f", data=b"abc")], tarfile.GNU_FORMAT))
    tar[156:157] = b"S"
    chk = sum(tar[:148]) + 8 * 32 + sum(tar[156:512])
    tar[148:156] = b"%06o\0 " % chk
    with pytest.raises(UnsupportedMediaType):
        roundtrip(bytes(tar))


names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/\\"),
                min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(names, st.binary(max_size=3000), st.sampled_from(["file", "dir", "symlink"])),
                min_size=0, max_size=12, unique_by=lambda t: t[0]),
       st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_roundtrip_property(items, fmt):
    entries = [Entry(n, k, data=d if k == "file" else b"", linkname="t" if k == "symlink" else "") for n, d, k in items]
    tar = make_tar(entries, fmt)
    res, rebuilt, content = roundtrip(tar)
    assert rebuilt == tar
    assert content == b"".join(d for _n, d, k in items if k == "file")
    assert len(res.entries) == len(items)


def test_header_parser_agrees_with_tarfile():
    from convstore.tarsplit import parse_header

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        entries = [Entry("p" * 90 + "/" + "q" * 90, data=b"x")] if fmt == tarfile.USTAR_FORMAT else []
        tar = (make_tar(entries, fmt) if entries else rich_layer() if fmt == tarfile.PAX_FORMAT
               else make_tar([Entry("d", "dir"), Entry("d/f", data=b"a", uid=3_000_000, gid=7),
                              Entry("d/n", "chr", devmajor=5, devminor=1)], fmt))
        pos = 0
        while pos + 512 <= len(tar) and tar[pos : pos + 512] != bytes(512):
            block = tar[pos : pos + 512]
            ours, theirs = parse_header(block), tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            for f in ("name", "mode", "uid", "gid", "size", "mtime", "type", "linkname", "uname", "gname",
                      "devmajor", "devminor"):
                assert getattr(ours, f) == getattr(theirs, f), (f, fmt)
            data = theirs.size if theirs.type in (b"0", b"x", b"g", b"L", b"K") else 0
            pos += 512 + data + (-data % 512)
