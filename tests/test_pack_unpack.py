"""Pack and unpack synthetic images end to end on the local store."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest
from imagebuilder import Entry, make_tar, rich_layer, sha, write_docker_archive, write_oci

import convstore
from convstore.errors import UnsafePathError


def read_layout(root: str, tag: str):
    with open(os.path.join(root, "index.json")) as f:
        idx = json.load(f)
    [desc] = [m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    blob = lambda d: open(os.path.join(root, "blobs", "sha256", d.split(":")[1]), "rb").read()  # noqa: E731
    manifest = json.loads(blob(desc["digest"]))
    return manifest, blob


def uncompressed(data: bytes, media: str) -> bytes:
    import gzip

    import zstandard

    if media.endswith("+gzip"):
        return gzip.decompress(data)
    if media.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(data).read()
    return data


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("out", [None, "none", "gzip", "zstd"])
def test_oci_roundtrip_byte_exact(tmp_path, store, compression, out):
    layers = [rich_layer(), make_tar([Entry("d/.wh.small.txt"), Entry("e", "dir"), Entry("e/new", data=b"n" * 99)])]
    src = write_oci(str(tmp_path / "src"), layers, compression=compression)
    store.pack(f"oci:{tmp_path / 'src'}:latest", "syn/img:v1")
    store.unpack_oci("syn/img:v1", f"oci:{tmp_path / 'dst'}:v1", compress=out)
    manifest, blob = read_layout(str(tmp_path / "dst"), "v1")
    assert blob(manifest["config"]["digest"]) == src["config_bytes"]
    assert manifest["config"]["digest"] == src["config"]["digest"]
    for d, original in zip(manifest["layers"], layers):
        data = blob(d["digest"])
        assert sha(data) == d["digest"] and len(data) == d["size"]
        assert d["mediaType"].endswith({"gzip": "+gzip", "zstd": "+zstd", "none": ".tar"}[out or compression])
        assert uncompressed(data, d["mediaType"]) == original


def test_docker_archive_source(tmp_path, store):
    layers = [rich_layer()]
    cbytes = write_docker_archive(str(tmp_path / "img.tar"), layers)
    store.pack(f"docker-archive:{tmp_path / 'img.tar'}", "dock:1")
    store.pack(f"docker-archive:{tmp_path / 'img.tar'}:test/img:latest", "dock:2")
    store.unpack_oci("dock:1", f"oci:{tmp_path / 'out'}")
    manifest, blob = read_layout(str(tmp_path / "out"), "1")
    assert blob(manifest["config"]["digest"]) == cbytes
    assert blob(manifest["layers"][0]["digest"]) == layers[0]


def test_second_pack_writes_nothing_new(tmp_path, store):
    write_oci(str(tmp_path / "src"), [rich_layer()])
    first = store.pack(f"oci:{tmp_path / 'src'}", "a:1")
    again = store.pack(f"oci:{tmp_path / 'src'}", "a:2")
    assert first.new_chunks > 0 and again.new_chunks == 0 and again.chunks == first.chunks


def test_rebuilt_layer_with_new_mtimes_dedups(tmp_path, store):
    files = [(f"f{i}", os.urandom(50_000 + i * 1000)) for i in range(30)]
    a = make_tar([Entry(n, data=d, mtime=1_600_000_000) for n, d in files])
    b = make_tar([Entry(n, data=d, mtime=1_700_000_000 + i) for i, (n, d) in enumerate(files)])
    write_oci(str(tmp_path / "a"), [a])
    write_oci(str(tmp_path / "b"), [b])
    store.pack(f"oci:{tmp_path / 'a'}", "x:a")
    r = store.pack(f"oci:{tmp_path / 'b'}", "x:b")
    assert r.new_chunks == 0
    store.unpack_oci("x:b", f"oci:{tmp_path / 'out'}:b", compress="none")
    manifest, blob = read_layout(str(tmp_path / "out"), "b")
    assert blob(manifest["layers"][0]["digest"]) == b


def test_stats(tmp_path, store):
    data = os.urandom(400_000)
    write_oci(str(tmp_path / "a"), [make_tar([Entry("f", data=data)])])
    write_oci(str(tmp_path / "b"), [make_tar([Entry("g", data=data, mtime=5)])])
    store.pack(f"oci:{tmp_path / 'a'}", "s:a")
    store.pack(f"oci:{tmp_path / 'b'}", "s:b")
    s = store.stats()
    assert s.images == 2
    assert s.unique_plaintext_bytes == len(data)
    assert s.logical_bytes == 2 * len(make_tar([Entry("f", data=data)]))
    assert len(data) < s.stored_bytes < len(data) * 1.1  # random data: raw, plus small manifests


def test_images_and_inspect(tmp_path, store):
    write_oci(str(tmp_path / "a"), [rich_layer()])
    store.pack(f"oci:{tmp_path / 'a'}", "lib/thing:1.0")
    [e] = store.images()
    assert str(e.ref) == "lib/thing:1.0" and e.layers == 1 and e.state == "active"
    info = store.inspect("lib/thing:1.0")
    assert info.layers[0].files == len(tarfile.open(fileobj=__import__("io").BytesIO(rich_layer())).getmembers())
    assert info.entry["name"] == "lib/thing" and info.to_json()["tag"] == "1.0"
    assert "wrapped_key" not in json.dumps(info.to_json())


# -- rootfs ---------------------------------------------------------------

def tree(root: str) -> dict[str, tuple]:
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            data = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, data, os.readlink(p) if os.path.islink(p) else None)
    return out


def test_rootfs_entry_kinds(tmp_path, store):
    write_oci(str(tmp_path / "a"), [rich_layer()])
    store.pack(f"oci:{tmp_path / 'a'}", "r:1")
    res = store.unpack_rootfs("r:1", str(tmp_path / "root"))
    r = tmp_path / "root" / "d"
    assert (r / "small.txt").read_bytes() == b"hello world\n"
    assert os.readlink(r / "link") == "small.txt"
    assert os.stat(r / "hard").st_ino == os.stat(r / "small.txt").st_ino
    assert os.stat(r / "small.txt").st_nlink == 2
    assert oct(os.stat(r / "suid").st_mode & 0o7777) == oct(0o4755)
    assert oct(os.stat(r / "sgid-dir").st_mode & 0o7777) == oct(0o2775)
    import stat as S
    assert S.S_ISFIFO(os.lstat(r / "fifo").st_mode)
    if os.geteuid() == 0:
        assert S.S_ISCHR(os.lstat(r / "null").st_mode) and os.lstat(r / "null").st_rdev == os.makedev(1, 3)
        assert S.S_ISBLK(os.lstat(r / "loop").st_mode)
        assert (os.stat(r / "owned").st_uid, os.stat(r / "owned").st_gid) == (1234, 5678)
    assert os.getxattr(r / "xattr", "user.test") == b"value"
    assert os.stat(r / "hiresmtime").st_mtime_ns == 1_700_000_000_123_456_789
    assert os.stat(r / "big.bin").st_size == 500_000
    assert res.files >= 8


def test_rootfs_whiteouts_and_opaque(tmp_path, store):
    l0 = make_tar([Entry("a", "dir"), Entry("a/keep", data=b"1"), Entry("a/gone", data=b"2"),
                   Entry("o", "dir"), Entry("o/old1", data=b"3"), Entry("o/sub", "dir"), Entry("o/sub/x", data=b"4"),
                   Entry("dirgone", "dir"), Entry("dirgone/f", data=b"5")])
    l1 = make_tar([Entry("a/.wh.gone"), Entry(".wh.dirgone"), Entry("o", "dir"), Entry("o/.wh..wh..opq"),
                   Entry("o/new", data=b"6")])
    l2 = make_tar([Entry("o/newer", data=b"7"), Entry("a/keep", data=b"replaced")])
    write_oci(str(tmp_path / "src"), [l0, l1, l2])
    store.pack(f"oci:{tmp_path / 'src'}", "wh:1")
    store.unpack_rootfs("wh:1", str(tmp_path / "root"))
    t = tree(str(tmp_path / "root"))
    assert sorted(t) == ["a", "a/keep", "o", "o/new", "o/newer"]
    assert (tmp_path / "root" / "a" / "keep").read_bytes() == b"replaced"


def test_opaque_keeps_same_layer_entries(tmp_path, store):
    l0 = make_tar([Entry("o", "dir"), Entry("o/old", data=b"x")])
    l1 = make_tar([Entry("o", "dir"), Entry("o/new", data=b"y"), Entry("o/.wh..wh..opq")])
    write_oci(str(tmp_path / "src"), [l0, l1])
    store.pack(f"oci:{tmp_path / 'src'}", "op:1")
    store.unpack_rootfs("op:1", str(tmp_path / "root"))
    assert sorted(os.listdir(tmp_path / "root" / "o")) == ["new"]


def test_symlinked_parent_inside_root_is_followed(tmp_path, store):
    """merged-/usr images: bin -> usr/bin, a later layer writes bin/tool."""
    l0 = make_tar([Entry("usr", "dir"), Entry("usr/bin", "dir"), Entry("bin", "symlink", linkname="usr/bin")])
    l1 = make_tar([Entry("bin/tool", data=b"t"), Entry("abs", "symlink", linkname="/usr"), Entry("abs/lib", "dir")])
    write_oci(str(tmp_path / "src"), [l0, l1])
    store.pack(f"oci:{tmp_path / 'src'}", "ml:1")
    store.unpack_rootfs("ml:1", str(tmp_path / "root"))
    assert (tmp_path / "root" / "usr" / "bin" / "tool").read_bytes() == b"t"
    assert (tmp_path / "root" / "usr" / "lib").is_dir()


@pytest.mark.parametrize("entries", [
    [Entry("../evil", data=b"x")],
    [Entry("a/../../evil", data=b"x")],
    [Entry("/etc/evil", data=b"x")],
    [Entry("esc", "symlink", linkname="../../.."), Entry("esc/evil", data=b"x")],
    [Entry("d", "dir"), Entry("d/esc", "symlink", linkname="../.."), Entry("d/esc/evil", data=b"x")],
    [Entry("h", "hardlink", linkname="../outside")],
    [Entry("up", "symlink", linkname=".."), Entry("h", "hardlink", linkname="up/outside")],
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-escape", "nested-symlink-escape", "hardlink-dotdot",
        "hardlink-through-symlink"])
def test_rootfs_escapes_refused(tmp_path, store, entries):
    (tmp_path / "outside").write_bytes(b"secret")
    write_oci(str(tmp_path / "src"), [make_tar(entries)])
    store.pack(f"oci:{tmp_path / 'src'}", "evil:1")
    dest = tmp_path / "deep" / "er" / "root"
    with pytest.raises(UnsafePathError):
        store.unpack_rootfs("evil:1", str(dest))
    assert not dest.exists()  # nothing half-written is left
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "deep" / "er" / "evil").exists()
    assert sorted(os.listdir(tmp_path / "deep" / "er")) == []


def test_rootfs_refuses_nonempty_dest(tmp_path, store):
    write_oci(str(tmp_path / "src"), [rich_layer()])
    store.pack(f"oci:{tmp_path / 'src'}", "n:1")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "x").write_text("mine")
    with pytest.raises(convstore.SourceError):
        store.unpack_rootfs("n:1", str(tmp_path / "root"))
    assert (tmp_path / "root" / "x").read_text() == "mine"


def test_known_layer_is_reused_without_reading(tmp_path, store):
    l0, l1 = rich_layer(), make_tar([Entry("only-b", data=os.urandom(90_000))])
    write_oci(str(tmp_path / "a"), [l0])
    descs = write_oci(str(tmp_path / "b"), [l0, l1], compression=["zstd", "gzip"])
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    # the shared layer's blob in b is recompressed (new digest, same diff_id): still reused
    r = store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    assert r.reused_layers == 1
    store.unpack_oci("b:1", f"oci:{tmp_path / 'out'}:b", compress="none")  # verifies every diff_id
    manifest, blob = read_layout(str(tmp_path / "out"), "b")
    assert [blob(d["digest"]) for d in manifest["layers"]] == [l0, l1]
    assert store.inspect("b:1").layers[0].digest == descs["layers"][0]["digest"]
    r2 = store.pack(f"oci:{tmp_path / 'b'}", "b:2", reuse_layers=False)
    assert r2.reused_layers == 0 and r2.new_chunks == 0


def test_layer_reuse_falls_back_when_chunks_are_gone(tmp_path, store):
    l0 = rich_layer()
    write_oci(str(tmp_path / "a"), [l0])
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    store.chunks.delete([next(iter(store.chunks.ids()))])
    r = store.pack(f"oci:{tmp_path / 'a'}", "a:2")
    assert r.reused_layers == 0 and r.new_chunks == 1
    store.unpack_oci("a:2", f"oci:{tmp_path / 'out'}")
