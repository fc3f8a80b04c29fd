"""The real five-image corpus: exact round trips and dedup against corpus.json."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import CORPUS_DIR, CORPUS_IMAGES, need_tool
from test_pack_unpack import read_layout

pytestmark = pytest.mark.corpus


def source_layout(img: str):
    return read_layout(str(CORPUS_DIR / img), "latest")


@pytest.mark.parametrize("img", CORPUS_IMAGES)
def test_corpus_roundtrip(tmp_path, corpus_store, img):
    dest = tmp_path / "out"
    corpus_store.unpack_oci(f"{img}:latest", f"oci:{dest}:latest")
    src_manifest, src_blob = source_layout(img)
    manifest, blob = read_layout(str(dest), "latest")
    assert manifest["config"]["digest"] == src_manifest["config"]["digest"]
    assert blob(manifest["config"]["digest"]) == src_blob(src_manifest["config"]["digest"])
    diff_ids = json.loads(blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]
    assert len(manifest["layers"]) == len(diff_ids)
    for d, s in zip(manifest["layers"], src_manifest["layers"]):
        assert d["mediaType"] == s["mediaType"]  # default: the original compression
    skopeo = need_tool("skopeo")
    p = subprocess.run([skopeo, "inspect", f"oci:{dest}:latest"], capture_output=True, text=True, check=True)
    doc = json.loads(p.stdout)
    assert doc["Layers"] and len(doc["Layers"]) == len(diff_ids)
    # rebuild diff_ids ourselves from the restored blobs (unpack verified them too)
    from test_pack_unpack import uncompressed
    import hashlib
    for d, diff_id in zip(manifest["layers"], diff_ids):
        assert "sha256:" + hashlib.sha256(uncompressed(blob(d["digest"]), d["mediaType"])).hexdigest() == diff_id


def _umoci_tree(tmp_path, layout: str, name: str):
    """umoci unpack (which cannot read zstd: convert with skopeo first)."""
    skopeo, umoci = need_tool("skopeo"), need_tool("umoci")
    gz = tmp_path / f"{name}-gz"
    subprocess.run([skopeo, "copy", "-q", "--dest-compress-format", "gzip", f"oci:{layout}:latest",
                    f"oci:{gz}:latest"], check=True, capture_output=True)
    bundle = tmp_path / f"{name}-bundle"
    subprocess.run([umoci, "unpack", "--image", f"{gz}:latest", str(bundle)], check=True, capture_output=True)
    return bundle / "rootfs"


@pytest.mark.parametrize("img", ["app1", "app2"])
def test_corpus_umoci_trees_identical(tmp_path, corpus_store, img):
    from treecmp import walk

    dest = tmp_path / "restored"
    corpus_store.unpack_oci(f"{img}:latest", f"oci:{dest}:latest", compress="zstd")
    a = walk(_umoci_tree(tmp_path, str(CORPUS_DIR / img), "orig"))
    b = walk(_umoci_tree(tmp_path, str(dest), "restored"))
    assert len(a) > 1000 and a == b
    # and convstore's own rootfs unpack gives the same tree
    corpus_store.unpack_rootfs(f"{img}:latest", str(tmp_path / "rootfs"))
    assert walk(tmp_path / "rootfs") == a


def test_corpus_stats_against_overlap(corpus_store, corpus):
    s = corpus_store.stats()
    overlap = corpus["overlap"]
    assert s.images == 5
    assert s.logical_bytes == overlap["sum_uncompressed_per_image"]
    assert s.unique_plaintext_bytes <= 1.15 * overlap["unique_file_bytes"], s
    assert s.stored_bytes < overlap["sum_compressed_per_image"], s


@pytest.mark.parametrize("img", CORPUS_IMAGES)
@pytest.mark.parametrize("runtime", ["runc", "chroot"])
def test_corpus_run_prints_hello(corpus_store, img, runtime):
    from conftest import run_cli

    need_tool("runc")
    env = dict(os.environ, CONVSTORE_STORE=corpus_store.objects.root, CONVSTORE_KEY=f"file:{corpus_store.key.path}")
    p = run_cli(env, "run", "--runtime", runtime, "--stats", f"{img}:latest")
    assert p.stdout == "hello\n"
    assert "fetched" in p.stderr and runtime in p.stderr


@pytest.mark.parametrize("img", ["app1", "app2", "base-prev"])
def test_corpus_fuse_mount_equals_umoci(tmp_path, corpus_store, img):
    from treecmp import walk

    from convstore.reader import ImageFS
    from convstore.reader.fuse import BackgroundMount

    expected = walk(_umoci_tree(tmp_path, str(CORPUS_DIR / img), "orig"))
    with ImageFS.from_store(corpus_store, f"{img}:latest") as fs, BackgroundMount(fs, str(tmp_path / "mnt")):
        got = walk(tmp_path / "mnt")
        ls = subprocess.run(["ls", "-lR", "--time-style=full-iso", str(tmp_path / "mnt")], capture_output=True,
                            text=True, check=True).stdout
    assert len(got) > 1000 and got == expected
    ref = subprocess.run(["ls", "-lR", "--time-style=full-iso", str(tmp_path / "orig-bundle" / "rootfs")],
                         capture_output=True, text=True, check=True).stdout
    # directory sizes differ by nature (ext4 blocks vs 0), so compare the other lines, whitespace folded
    strip = lambda s: [" ".join(l.split()) for l in s.splitlines()  # noqa: E731
                       if not l.startswith("/") and not l.startswith("total") and not l.startswith("d")]
    assert strip(ls) == strip(ref)


def test_corpus_gc_after_removing_two_images(tmp_path, corpus):
    import convstore

    s = convstore.Store.open(str(tmp_path / "store"), f"file:{tmp_path / 'key'}")
    for img in CORPUS_IMAGES:
        s.pack(f"oci:{CORPUS_DIR / img}:latest", f"{img}:latest")
    used = {img: {c.cid for c in s.manifest(f"{img}:latest").chunks} for img in CORPUS_IMAGES}
    removed, kept = ["app2", "base-prev"], ["base", "app1", "app1-rebuilt"]
    only = set().union(*(used[i] for i in removed)) - set().union(*(used[i] for i in kept))
    expect = sum(s.chunks.size(c) for c in only)
    for img in removed:
        s.rm(f"{img}:latest")
    r = s.gc()
    print(f"\ngc after removing {removed}: freed {r.chunks_removed} chunks, {r.chunk_bytes_freed} bytes "
          f"(independently computed: {len(only)} chunks, {expect} bytes); store {r.store_bytes_before} -> "
          f"{r.store_bytes_after}")
    assert (r.chunks_removed, r.chunk_bytes_freed) == (len(only), expect) and expect > 5_000_000
    assert s.verify().clean
    from conftest import run_cli

    env = dict(os.environ, CONVSTORE_STORE=s.objects.root, CONVSTORE_KEY=f"file:{tmp_path / 'key'}")
    for img in kept:
        assert run_cli(env, "run", f"{img}:latest").stdout == "hello\n"


@pytest.mark.parametrize("kind", ["pkcs11", "awskms"])
def test_corpus_run_with_hsm_and_kms(tmp_path, corpus, softhsm, moto_kms, kind):
    from conftest import run_cli

    spec = softhsm.add_key(f"corpus-{kind}") if kind == "pkcs11" else moto_kms.new_key()
    env = dict(os.environ, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=spec, **softhsm.env,
               **moto_kms.env)
    run_cli(env, "pack", f"oci:{CORPUS_DIR / 'app1'}:latest", "app1:latest")
    run_cli(env, "unpack", "app1:latest", f"oci:{tmp_path / 'out'}:latest")  # every diff_id verified
    assert run_cli(env, "run", "app1:latest").stdout == "hello\n"
    assert kind in run_cli(env, "inspect", "app1:latest").stdout


def test_corpus_through_registry(tmp_path, corpus, registry):
    """skopeo pushes the corpus to a registry; convstore packs each image from
    it, pushes them to a second repository, and runs them from there through
    the cache tier; a fresh worker fetches only what its start touches."""
    import json

    from conftest import run_cli

    env = dict(os.environ, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=f"file:{tmp_path / 'k'}")
    url = f"oci://{registry.host}/convstore"
    sent = {}
    for img in CORPUS_IMAGES:
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{CORPUS_DIR / img}:latest",
                        f"docker://{registry.host}/corpus/{img}:latest"], check=True, capture_output=True)
        run_cli(env, "--insecure", "pack", f"docker://{registry.host}/corpus/{img}:latest", f"{img}:latest")
        r = json.loads(run_cli(env, "--insecure", "push", "--json", f"{img}:latest", url).stdout)
        sent[img] = (r["chunks_sent"], r["chunks"])
    print(f"\nchunks sent per push (sent, total): {sent}")
    assert sent["base"][0] == sent["base"][1]
    assert sent["app1-rebuilt"][0] == 0 and sent["app1"][0] < sent["app1"][1]
    assert sent["base-prev"][0] < sent["base-prev"][1] // 3
    for img in CORPUS_IMAGES:
        p = run_cli(env, "--insecure", "--store", url, "--cache", str(tmp_path / "cache1"), "run", "--stats",
                    f"{img}:latest")
        assert p.stdout == "hello\n"
    # a second worker with an empty cache
    p = run_cli(env, "--insecure", "--store", url, "--cache", str(tmp_path / "cache2"), "run", "--json", "app1:latest")
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    assert p.stdout == "hello\n"
    assert stats["fetch"]["plain_bytes_fetched"] < 0.15 * 122_119_680
