"""Removal and the running services (issue 23 §6): a layer store serving two
images, one of them removed, stops serving it and keeps serving the other
(real FUSE, the ``convstore layerstore --background`` service)."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from pathlib import Path

from conftest import run_cli
from imagebuilder import Entry, make_tar, write_oci


def _image(tmp_path: Path, name: str) -> tuple[str, dict[str, bytes]]:
    files = {f"f{i}": os.urandom(50_000) for i in range(4)}
    descs = write_oci(str(tmp_path / name), [make_tar([Entry(f"{name}/{k}", data=v) for k, v in files.items()])])
    return descs["layers"][0]["digest"], files


def test_a_removed_image_stops_being_served_and_the_other_reads_on(tmp_path: Path, cli_env: dict[str, str]) -> None:
    a_digest, a_files = _image(tmp_path, "a")
    b_digest, b_files = _image(tmp_path, "b")
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'a'}", "a:1")
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'b'}", "b:1")
    mnt = tmp_path / "als"
    mnt.mkdir()
    run_cli(cli_env, "layerstore", "--background", str(mnt))
    try:
        ref = mnt / base64.b64encode(b"127.0.0.1:5000/x:1").decode()
        a, b = ref / a_digest / "diff" / "a", ref / b_digest / "diff" / "b"
        assert (a / "f0").read_bytes() == a_files["f0"]
        assert (b / "f0").read_bytes() == b_files["f0"]
        run_cli(cli_env, "rm", "a:1")
        deadline = time.monotonic() + 60
        while True:  # the service re-reads the catalog by itself (no lookup of an unknown layer needed)
            try:
                (a / "f1").read_bytes()
            except OSError:
                break
            assert time.monotonic() < deadline, "the removed image is still served"
            time.sleep(0.2)
        for name in ("f2", "f3"):
            try:
                data = (a / name).read_bytes()
            except OSError:
                continue
            raise AssertionError(f"the removed image's {name} was still served ({len(data)} bytes)")
        for name, data in b_files.items():  # the other image reads on, files read before and not
            assert (b / name).read_bytes() == data
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def test_a_layer_store_over_a_registry_drops_a_removed_images_chunks_from_the_node_cache(
        tmp_path: Path, cli_env: dict[str, str], registry) -> None:
    import convstore
    from convstore.stores.cache import DiskCache

    a_digest, a_files = _image(tmp_path, "a")
    b_digest, b_files = _image(tmp_path, "b")
    url = f"oci://{registry.host}/node"
    reg = ["--insecure", "--store", url]
    run_cli(cli_env, *reg, "--cache", str(tmp_path / "packer"), "pack", f"oci:{tmp_path / 'a'}", "a:1")
    run_cli(cli_env, *reg, "--cache", str(tmp_path / "packer"), "pack", f"oci:{tmp_path / 'b'}", "b:1")
    other = convstore.Store.open(url, cli_env["CONVSTORE_KEY"], insecure=True, cache_dir=str(tmp_path / "other"))
    ids = {n: {c.cid for c in other.manifests.load(other.catalog.entry(f"{n}:1")).chunks} for n in ("a", "b")}
    only_a = ids["a"] - ids["b"]
    assert only_a
    node = tmp_path / "node-cache"
    mnt = tmp_path / "als"
    mnt.mkdir()
    run_cli(cli_env, *reg, "--cache", str(node), "layerstore", "--background", str(mnt))
    try:
        ref = mnt / base64.b64encode(b"127.0.0.1:5000/x:1").decode()
        a, b = ref / a_digest / "diff" / "a", ref / b_digest / "diff" / "b"
        for name, data in a_files.items():
            assert (a / name).read_bytes() == data
        for name, data in b_files.items():
            assert (b / name).read_bytes() == data
        cache = DiskCache(str(node))
        assert all(cache.contains("chunk " + c.hex()) for c in ids["a"] | ids["b"])
        other.rm("a:1")  # another machine removes the image
        deadline = time.monotonic() + 60
        while any(cache.contains("chunk " + c.hex()) for c in only_a):
            assert time.monotonic() < deadline, "the node cache still holds the removed image's chunks"
            time.sleep(0.2)
        assert all(cache.contains("chunk " + c.hex()) for c in ids["b"])
        for name, data in b_files.items():
            assert (b / name).read_bytes() == data
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def test_the_snapshotters_layers_stop_serving_a_removed_image_and_serve_the_other(tmp_path: Path, store) -> None:
    """The containerd snapshotter serves its convstore layers through a layer store mount (real FUSE)."""
    from convstore.engines.layerstore import LayerMount, LayerStore
    from convstore.engines.snapshotter import Snapshotter

    a_digest, a_files = _image(tmp_path, "a")
    b_digest, b_files = _image(tmp_path, "b")
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    mount = LayerMount(LayerStore(store), str(tmp_path / "snaps" / "layers"))
    with Snapshotter(str(tmp_path / "snaps"), mount):
        a, b = Path(mount.diff_dir(a_digest)) / "a", Path(mount.diff_dir(b_digest)) / "b"
        assert (a / "f0").read_bytes() == a_files["f0"] and (b / "f0").read_bytes() == b_files["f0"]
        store.rm("a:1")
        deadline = time.monotonic() + 60
        while True:
            try:
                (a / "f1").read_bytes()
            except OSError:
                break
            assert time.monotonic() < deadline, "the removed image is still served"
            time.sleep(0.2)
        for name, data in b_files.items():
            assert (b / name).read_bytes() == data
