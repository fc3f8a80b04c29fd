"""Bad input: a named error, one line from the CLI, and nothing changes."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.errors import (
    CorruptLayer,
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    KeyAccessDenied,
    SourceNotFound,
    TamperedObject,
    UnsupportedMediaType,
)


def blob_path(root, digest):
    return os.path.join(root, "blobs", "sha256", digest.split(":")[1])


def snapshot(store: convstore.Store):
    return sorted((str(e.ref), e.manifest_digest) for e in store.images())


@pytest.fixture
def good(tmp_path, store):
    """A store that already holds one image, and a source to break."""
    write_oci(str(tmp_path / "ok"), [rich_layer()])
    store.pack(f"oci:{tmp_path / 'ok'}", "keep:1")
    return snapshot(store)


def layer_source(tmp_path, compression="gzip", **kw):
    root = str(tmp_path / "bad")
    descs = write_oci(root, [make_tar([Entry("f", data=os.urandom(200_000))]), rich_layer()],
                      compression=compression, **kw)
    return root, descs


def corrupt_blob(tmp_path):
    root, d = layer_source(tmp_path)
    p = blob_path(root, d["layers"][1]["digest"])
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0x55
    open(p, "wb").write(data)
    return root


def digest_mismatch(tmp_path):
    """A well-formed blob that is not the one the manifest names."""
    root, d = layer_source(tmp_path)
    other = gzip.compress(make_tar([Entry("other", data=b"x")]), mtime=0)
    p = blob_path(root, d["layers"][1]["digest"])
    open(p, "wb").write(other + b"\0" * (d["layers"][1]["size"] - len(other)))
    return root


def truncated_gzip(tmp_path):
    root, d = layer_source(tmp_path)
    p = blob_path(root, d["layers"][0]["digest"])
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return root


def missing_blob(tmp_path):
    root, d = layer_source(tmp_path)
    os.unlink(blob_path(root, d["layers"][1]["digest"]))
    return root


def unknown_media_type(tmp_path):
    root, _ = layer_source(tmp_path, layer_media=["application/vnd.oci.image.layer.v1.tar+gzip",
                                                  "application/vnd.example.weird"])
    return root


def diff_id_mismatch(tmp_path):
    root, _ = layer_source(tmp_path, config_extra={"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64,
                                                                                          "sha256:" + "1" * 64]}})
    return root


CASES = [
    (corrupt_blob, (CorruptLayer, DigestMismatch)),
    (digest_mismatch, (DigestMismatch, CorruptLayer)),
    (truncated_gzip, (CorruptLayer,)),
    (missing_blob, (SourceNotFound,)),
    (unknown_media_type, (UnsupportedMediaType,)),
    (diff_id_mismatch, (DigestMismatch,)),
]


@pytest.mark.parametrize("make,errors", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_source_api(tmp_path, store, good, make, errors):
    root = make(tmp_path)
    with pytest.raises(errors):
        store.pack(f"oci:{root}", "broken:1")
    assert snapshot(store) == good
    with pytest.raises(ImageNotFound):
        store.entry("broken:1")


@pytest.mark.parametrize("make", [c[0] for c in CASES], ids=[c[0].__name__ for c in CASES])
def test_bad_source_cli(tmp_path, cli_env, make):
    write_oci(str(tmp_path / "ok"), [rich_layer()])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'ok'}", "keep:1")
    before = run_cli(cli_env, "images", "--json").stdout
    root = make(tmp_path)
    p = run_cli(cli_env, "pack", f"oci:{root}", "broken:1", check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convstore: error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert run_cli(cli_env, "images", "--json").stdout == before


def test_wrong_key_file(tmp_path, store, good):
    convstore.LocalKeyFile(str(tmp_path / "other" / "k"))  # another key that exists (a missing one is KeyFileMissing)
    other = convstore.Store.open(store.objects.root, f"file:{tmp_path / 'other' / 'k'}")
    with pytest.raises(KeyAccessDenied):
        other.manifest("keep:1")
    with pytest.raises(KeyAccessDenied):
        other.pack(f"oci:{tmp_path / 'ok'}", "keep:2")
    assert snapshot(store) == good


def test_wrong_key_file_cli(tmp_path, cli_env):
    write_oci(str(tmp_path / "ok"), [rich_layer()])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'ok'}", "keep:1")
    convstore.LocalKeyFile(str(tmp_path / "other.key"))  # another key that exists (a missing one is KeyFileMissing)
    env = dict(cli_env, CONVSTORE_KEY=f"file:{tmp_path / 'other.key'}")
    p = run_cli(env, "unpack", "keep:1", "--rootfs", str(tmp_path / "r"), check=False)
    assert p.returncode == 1 and "sealed under master key" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_moved_wrapped_key_fails(tmp_path, store, good):
    """A catalog entry's wrapped key copied onto another image does not unwrap."""
    write_oci(str(tmp_path / "b"), [make_tar([Entry("z", data=b"z")])])
    store.pack(f"oci:{tmp_path / 'b'}", "other:1")
    a, b = store.entry("keep:1"), store.entry("other:1")
    doc = b.to_json()
    doc["wrapped_key"] = a.to_json()["wrapped_key"]
    store.objects.put("refs/other:1", json.dumps(doc).encode())  # written without the master key: no valid MAC
    with pytest.raises(TamperedObject):
        store.manifest("other:1")


def test_tampered_manifest_detected(tmp_path, store, good):
    e = store.entry("keep:1")
    key = "manifests/" + e.manifest_digest.split(":")[1]
    data = bytearray(store.objects.get(key))
    data[-5] ^= 1
    store.objects.put(key, bytes(data))
    with pytest.raises(convstore.CorruptObject):
        store.manifest("keep:1")


def test_missing_and_corrupt_chunk_on_unpack(tmp_path, store, good):
    cids = list(store.chunks.ids())
    store.chunks.delete(cids[:1])
    with pytest.raises((convstore.ChunkMissing,)):
        store.unpack_oci("keep:1", f"oci:{tmp_path / 'out'}")
    assert not os.path.exists(tmp_path / "out" / "index.json")


@pytest.mark.parametrize("args", [
    ["pack"], ["pack", "oci:x"], ["unpack", "a:1"], ["unpack", "a:1", "oci:x", "--rootfs", "y"],
    ["unpack", "a:1", "oci:x", "--compress", "lz4"], ["nosuchcommand"], ["pack", "oci:x", "y", "--level", "99"],
])
def test_usage_errors_exit_2(cli_env, args):
    p = run_cli(cli_env, *args, check=False)
    assert p.returncode == 2, (args, p.returncode, p.stderr)
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("ref", ["UPPER:1", "a:b:c/d", "a//b", "-a", "a:" + "t" * 200])
def test_invalid_refs(store, tmp_path, ref):
    write_oci(str(tmp_path / "ok"), [rich_layer()])
    with pytest.raises(InvalidReference):
        store.pack(f"oci:{tmp_path / 'ok'}", ref)


@pytest.mark.parametrize("src", ["nope", "oci:", "http://x", "docker-archive:/nonexistent.tar"])
def test_invalid_sources(store, src):
    with pytest.raises((InvalidReference, SourceNotFound)):
        store.pack(src, "a:1")


def test_tag_selection_errors(tmp_path, store):
    write_oci(str(tmp_path / "two"), [rich_layer()], tag="one")
    write_oci(str(tmp_path / "two"), [make_tar([Entry("x", data=b"1")])], tag="two")
    with pytest.raises(InvalidReference, match="holds 2 images"):
        store.pack(f"oci:{tmp_path / 'two'}", "a:1")
    with pytest.raises(SourceNotFound):
        store.pack(f"oci:{tmp_path / 'two'}:three", "a:1")
    store.pack(f"oci:{tmp_path / 'two'}:two", "a:1")
