"""Container engines on convstore layers: the additional layer store that
podman and CRI-O (containers/storage) read (``convstore layerstore``).

The tree is checked through a real FUSE mount and a real overlayfs mount of
its layer directories; podman (Debian's) pulls a corpus image from a real
docker-registry on 127.0.0.1 and runs it, its layers coming from convstore.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CORPUS_DIR, need_tool, run_cli
from imagebuilder import Entry, make_tar, write_oci
from kms_fixtures import Registry
from engine_fixtures import podman, podman_config, remove_podman_root, snapshotter_and_containerd

import convstore
from convstore.merge import OVERLAY_OPAQUE, layer_tree
from convstore.tarsplit import TarEntry


def _layers() -> list[bytes]:
    lower = make_tar([Entry("etc/", "dir"), Entry("etc/keep", data=b"kept\n"), Entry("etc/gone", data=b"gone\n"),
                      Entry("opt/", "dir"), Entry("opt/old", data=b"old\n"),
                      Entry("bin/", "dir"), Entry("bin/tool", data=b"#!tool\n", mode=0o755)])
    upper = make_tar([Entry("etc/", "dir"), Entry("etc/.wh.gone", data=b""), Entry("etc/new", data=b"new\n"),
                      Entry("opt/", "dir"), Entry("opt/.wh..wh..opq", data=b""), Entry("opt/fresh", data=b"fresh\n"),
                      Entry("bin/", "dir"), Entry("bin/tool2", data=b"#!tool2\n", mode=0o755),
                      Entry("bin/link", "hardlink", linkname="bin/tool2")])
    return [lower, upper]


def _entries(tar: bytes) -> list[TarEntry]:
    import io

    from convstore.tarsplit import split_tar

    return split_tar(io.BytesIO(tar), lambda b: None, lambda r, n: r.read(n)).entries


def test_layer_tree_keeps_whiteouts_in_overlay_form() -> None:
    entries = _entries(_layers()[1])
    with pytest.raises(convstore.CorruptLayer):  # refused as a merge refuses it: a hardlink to a missing file
        layer_tree([e for e in entries if e.path != "bin/tool2"], 1)
    tree = layer_tree(entries, 1)
    root = tree.root.children
    assert root is not None
    etc, opt = root["etc"].children, root["opt"]
    assert etc is not None and "gone" in etc and ".wh.gone" not in etc
    import stat

    assert stat.S_ISCHR(etc["gone"].mode) and etc["gone"].rdev == 0
    assert opt.xattrs == {OVERLAY_OPAQUE: b"y"} and set(opt.children or {}) == {"fresh"}
    bin_ = root["bin"].children
    assert bin_ is not None and bin_["link"] is bin_["tool2"] and bin_["link"].nlink == 2


def test_layer_tree_speaks_to_overlayfs_only_through_its_own_markers() -> None:
    """A layer's own overlay xattrs are dropped (they would steer the kernel's
    overlayfs: redirects, metacopy), and a directory that replaces a name the
    same layer whited out is opaque, so the lower directory cannot show
    through (what the layer merge gives)."""
    tar = make_tar([Entry("foo/", "dir"), Entry(".wh.foo", data=b""), Entry("foo/", "dir"),
                    Entry("foo/new", data=b"n\n"),
                    Entry("x", data=b"x", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                               "SCHILY.xattr.user.overlay.origin": "o",
                                               "SCHILY.xattr.user.kept": "1"})])
    root = layer_tree(_entries(tar), 0).root.children
    assert root is not None
    assert root["foo"].xattrs == {OVERLAY_OPAQUE: b"y"} and set(root["foo"].children or {}) == {"new"}
    assert root["x"].xattrs == {"user.kept": b"1"}


@pytest.fixture
def layerstore(tmp_path: Path, cli_env: dict[str, str]):
    """A store holding the two-layer image, served at MNT by ``convstore layerstore --background``."""
    layout = tmp_path / "img"
    descs = write_oci(str(layout), _layers())
    run_cli(cli_env, "pack", f"oci:{layout}:latest", "two:1")
    mnt = tmp_path / "als"
    mnt.mkdir()
    stats = tmp_path / "stats.json"
    run_cli(cli_env, "layerstore", "--background", str(mnt), "--stats-file", str(stats))
    yield mnt, descs["layers"], stats
    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def _ref_dir(mnt: Path, ref: str = "127.0.0.1:5000/two:1") -> Path:
    return mnt / base64.b64encode(ref.encode()).decode()


def test_layer_store_tree(layerstore, tmp_path: Path) -> None:
    mnt, layers, stats = layerstore
    d = _ref_dir(mnt) / layers[1]["digest"]
    info = json.loads((d / "info").read_text())
    assert info["compressed-diff-digest"] == layers[1]["digest"]
    assert info["compressed-size"] == layers[1]["size"] == (d / "blob").stat().st_size
    assert info["compression"] == 2 and info["diff-digest"].startswith("sha256:")
    # any reference finds a layer by its blob digest; an unknown digest is not there
    assert (_ref_dir(mnt, "other.example/x:y") / layers[0]["digest"] / "diff" / "etc" / "keep").read_bytes() == b"kept\n"
    assert not (_ref_dir(mnt) / ("sha256:" + "0" * 64)).exists()
    diff = d / "diff"
    st = os.lstat(diff / "etc" / "gone")
    import stat

    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # the whiteout, as overlayfs writes it
    assert os.getxattr(diff / "opt", OVERLAY_OPAQUE) == b"y"
    assert (diff / "etc" / "new").read_bytes() == b"new\n"
    # the engine's use/release notifications answer ENOENT ("understood"); the blob refuses reads
    with pytest.raises(FileNotFoundError):
        open(d / "use", "w").close()
    with pytest.raises(FileNotFoundError):
        os.rmdir(d)
    with pytest.raises(OSError) as e:
        (d / "blob").read_bytes()
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        (diff / "etc" / "new").write_bytes(b"x")
    for flags in (os.O_WRONLY, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):  # nothing is writable
        with pytest.raises(OSError):
            os.close(os.open(d / "info", flags))
    assert (d / "info").stat().st_size > 0
    # overlayfs over the two layer directories gives the merged image
    lower0 = _ref_dir(mnt) / layers[0]["digest"] / "diff"
    merged = tmp_path / "merged"
    merged.mkdir()
    (tmp_path / "l1").symlink_to(diff)  # a digest's ':' would split overlayfs's lowerdir list, as
    (tmp_path / "l0").symlink_to(lower0)  # containers/storage's own short links avoid too
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={tmp_path / 'l1'}:{tmp_path / 'l0'}",
                    str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "etc")) == ["keep", "new"]
        assert sorted(os.listdir(merged / "opt")) == ["fresh"]
        assert (merged / "bin" / "tool").read_bytes() == b"#!tool\n"
        assert (merged / "bin" / "link").read_bytes() == b"#!tool2\n"
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    deadline = time.monotonic() + 10
    while not (stats.exists() and json.loads(stats.read_text())["images"].get("two:1", {}).get("chunks_fetched")):
        assert time.monotonic() < deadline, "the stats file never showed the reads"
        time.sleep(0.1)
    assert stats.stat().st_mode & 0o777 == 0o600  # it names the images this node runs


@pytest.mark.corpus
def test_podman_runs_from_the_layer_store(tmp_path: Path, cli_env: dict[str, str], corpus: dict) -> None:
    need_tool("skopeo")
    need_tool("podman")
    reg = Registry(tmp_path / "registry", access_log=tmp_path / "registry.log")
    podman_root = tmp_path / "podman"
    mnt = tmp_path / "als"
    mnt.mkdir()
    try:
        image = "app1"
        src = f"oci:{CORPUS_DIR / image}:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", src, f"docker://{reg.host}/{image}:latest"],
                       check=True, timeout=300)
        run_cli(cli_env, "pack", src, f"{image}:latest")
        run_cli(cli_env, "layerstore", "--background", str(mnt), "--stats-file", str(tmp_path / "stats.json"))
        env = podman_config(podman_root, mnt)
        before = len(reg.requests())
        ref = f"{reg.host}/{image}:latest"
        podman(env, "pull", "-q", "--tls-verify=false", ref)
        pulled = reg.requests()[before:]
        layer_digests = [lay["digest"] for lay in corpus["images"][image]["layers"]]
        blob_gets = [r for r in pulled if r.startswith("GET ") and "/blobs/" in r]
        assert blob_gets and all(d not in r for r in blob_gets for d in layer_digests), pulled  # no layer blob
        r = podman(env, "run", "--rm", ref)
        assert r.stdout.strip() == "hello", r.stderr
        deadline = time.monotonic() + 10
        while True:
            st = json.loads((tmp_path / "stats.json").read_text()) if (tmp_path / "stats.json").exists() else {}
            got = st.get("images", {}).get(f"{image}:latest", {})
            if got.get("chunks_fetched") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        stored = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"])
        total = stored.inspect(f"{image}:latest").to_json()["chunks"]
        # only what the start touched was read: a few MB of a 122 MB image
        assert 0 < got["chunks_fetched"] < total / 4, got
    finally:
        remove_podman_root(podman_config(podman_root, mnt), podman_root)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        reg.stop()


@pytest.mark.corpus
def test_containerd_runs_from_the_convstore_snapshotter(tmp_path: Path, cli_env: dict[str, str],
                                                        corpus: dict) -> None:
    need_tool("containerd")
    need_tool("ctr")
    image = "app1"
    run_cli(cli_env, "pack", f"oci:{CORPUS_DIR / image}:latest", f"{image}:latest")
    with snapshotter_and_containerd(cli_env, tmp_path) as (_snap, ctd):
        out = run_cli(cli_env, "containerd-load", f"{image}:latest", "--address", str(ctd.socket)).stdout
        name = f"convstore.local/{image}:latest"
        assert name in out
        assert name in ctd.ctr("images", "ls", "-q").stdout.split()
        content = ctd.ctr("content", "ls", "-q").stdout.split()
        layer_digests = {lay["digest"] for lay in corpus["images"][image]["layers"]}
        assert len(content) == 2 and not layer_digests & set(content), content  # manifest and config only
        for i in range(2):  # the second start: the snapshots survived the first container's removal (GC)
            r = ctd.ctr("run", "--snapshotter", "convstore", "--rm", name, f"t{i}", check=False)
            assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
        r = ctd.ctr("run", "--snapshotter", "convstore", "--rm", name, "t-write", "sh", "-c",
                    "echo x > /etc/written && cat /etc/written && head -1 /etc/os-release", check=False)
        assert r.stdout.splitlines() == ["x", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'], r.stderr
        snaps = ctd.ctr("snapshots", "--snapshotter", "convstore", "ls").stdout
        assert snaps.count("Committed") == len(layer_digests)  # one per layer, none unpacked by containerd
        # an image the store does not hold is refused in one line, and leaves nothing behind
        r = run_cli(cli_env, "containerd-load", "nothere:1", "--address", str(ctd.socket), check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nothere" in r.stderr
    assert not os.path.ismount(tmp_path / "snapshots" / "layers")


# -- issue 21 §6: the engine surface ------------------------------------------------------------------------------

def _grpc_call(sock: Path, service: str, method: str, req, resp, namespace: str, lease: str = ""):
    import grpc

    meta = (("containerd-namespace", namespace),) + ((("containerd-lease", lease),) if lease else ())
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        fn = ch.unary_unary(f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=resp.FromString)
        return fn(req, metadata=meta, timeout=60)


@pytest.mark.corpus
def test_containerd_namespace_cannot_plant_a_layer_under_another(tmp_path: Path, cli_env: dict[str, str],
                                                                 corpus: dict) -> None:
    """The attack of issue 21 §6: a client of namespace `evil` commits its own
    snapshot (convstore's base layer plus a planted file) labelled with the
    image's top chain ID before anyone in `default` loads the image; a
    container started in `default` must still run on convstore's layer."""
    import grpc

    from convstore.engines import containerd_api as api
    from convstore.engines.layerstore import chain_ids

    need_tool("containerd")
    need_tool("ctr")
    image = "app1"
    run_cli(cli_env, "pack", f"oci:{CORPUS_DIR / image}:latest", f"{image}:latest")
    stored = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"])
    _, manifest = stored.open_image(f"{image}:latest")
    chains = [c for c, _ in chain_ids([lr.diff_id for lr in manifest.layers])]
    assert len(chains) >= 2
    ref = "containerd.io/snapshot.ref"
    with snapshotter_and_containerd(cli_env, tmp_path) as (_snap, ctd):
        sock = ctd.socket
        evil = "evil"
        ctd.ctr("-n", evil, "leases", "create", "--id", "evil-lease", "--expires", "0")  # kept from the GC
        parent = ""
        for chain in chains[:-1]:  # evil reaches convstore's lower layers by the remote-snapshot protocol
            with pytest.raises(grpc.RpcError) as e:
                _grpc_call(sock, api.SNAPSHOTS, "Prepare", api.PrepareSnapshotRequest(
                    snapshotter="convstore", key=f"evil-{chain[-8:]}", parent=parent, labels={ref: chain}),
                    api.PrepareSnapshotResponse, evil, "evil-lease")
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            parent = chain
        mounts = _grpc_call(sock, api.SNAPSHOTS, "Prepare", api.PrepareSnapshotRequest(
            snapshotter="convstore", key="evil-work", parent=parent), api.PrepareSnapshotResponse, evil, "evil-lease").mounts
        upper = next(o.removeprefix("upperdir=") for m in mounts for o in m.options if o.startswith("upperdir="))
        Path(upper, "planted").write_text("evil\n")
        try:  # labelled at Commit, and again by Update
            _grpc_call(sock, api.SNAPSHOTS, "Commit", api.CommitSnapshotRequest(
                snapshotter="convstore", name="evil-top", key="evil-work", labels={ref: chains[-1]}),
                api.Empty, evil, "evil-lease")
        except grpc.RpcError as e2:
            pytest.fail(f"evil's commit failed: {e2.details()}")
        try:
            _grpc_call(sock, api.SNAPSHOTS, "Update", api.UpdateSnapshotRequest(
                snapshotter="convstore", info=api.Info(name="evil-top", labels={ref: chains[-1]}),
                update_mask={"paths": [f"labels.{ref}"]}), api.UpdateSnapshotResponse, evil, "evil-lease")
        except grpc.RpcError:
            pass  # refusing the label is fine too
        # now `default` loads and runs the image
        run_cli(cli_env, "containerd-load", f"{image}:latest", "--address", str(sock))
        name = f"convstore.local/{image}:latest"
        r = ctd.ctr("run", "--snapshotter", "convstore", "--rm", name, "t-evil", "sh", "-c",
                    "cat /planted 2>/dev/null || echo clean", check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "clean"), (r.stdout, r.stderr)
        r = ctd.ctr("run", "--snapshotter", "convstore", "--rm", name, "t-hello", check=False)
        assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
        # evil's own view of its snapshot is untouched: it is still there, in its namespace only
        assert "evil-top" in ctd.ctr("-n", "evil", "snapshots", "--snapshotter", "convstore", "ls").stdout
        assert "evil-top" not in ctd.ctr("snapshots", "--snapshotter", "convstore", "ls").stdout


@pytest.fixture
def snapshotter_obj(tmp_path: Path, store: convstore.Store):
    """The snapshot model over a store holding the two-layer image (its gRPC methods called directly; no mount)."""
    pytest.importorskip("grpc")
    from convstore.engines.layerstore import LayerMount, LayerStore, chain_ids
    from convstore.engines.snapshotter import Snapshotter

    layout = tmp_path / "img"
    write_oci(str(layout), _layers())
    store.pack(f"oci:{layout}:latest", "two:1")
    _, manifest = store.open_image("two:1")
    chains = [c for c, _ in chain_ids([lr.diff_id for lr in manifest.layers])]
    snap = Snapshotter(str(tmp_path / "snaps"), LayerMount(LayerStore(store), str(tmp_path / "snaps" / "layers")))
    yield snap, chains
    snap.layers.close()


def _code(e: BaseException) -> str:
    return getattr(e, "code").name


def test_snapshotter_lookup_is_answered_by_convstore_layers_only(snapshotter_obj) -> None:
    """Within one namespace too: a client's snapshot labelled with a stored
    chain ID (at Commit and Update) never becomes the answer to
    containerd's remote-snapshot lookup, and List honours its filter."""
    from convstore.engines import containerd_api as api
    from convstore.engines.snapshotter import REF_LABEL, SnapshotError

    snap, (c0, c1) = snapshotter_obj
    ns = "default/"
    with pytest.raises(SnapshotError) as e:  # convstore's base layer, by the remote-snapshot protocol
        snap.Prepare(api.PrepareSnapshotRequest(key=ns + "1/x", parent="", labels={REF_LABEL: c0}))
    assert _code(e.value) == "ALREADY_EXISTS"
    # a client plants a snapshot over the base layer, labelled as the top layer
    snap.Prepare(api.PrepareSnapshotRequest(key=ns + "2/work", parent=c0, labels={"any": "thing"}))
    snap.Commit(api.CommitSnapshotRequest(name=ns + "3/fake", key=ns + "2/work", labels={REF_LABEL: c1}))
    snap.Update(api.UpdateSnapshotRequest(info=api.Info(name=ns + "3/fake", labels={REF_LABEL: c1}),
                                          update_mask={"paths": [f"labels.{REF_LABEL}"]}))
    with pytest.raises(SnapshotError) as e:  # containerd's unpacker asks for the top layer
        snap.Prepare(api.PrepareSnapshotRequest(key=ns + "4/y", parent=c0, labels={REF_LABEL: c1}))
    assert _code(e.value) == "ALREADY_EXISTS"
    # ... and looks the target up as containerd 1.6 does
    lookup = f'labels."{REF_LABEL}"=={c1},parent=="{c0}"'
    found = [i.name for r in snap.List(api.ListSnapshotsRequest(filters=[lookup])) for i in r.info]
    assert found == [c1]
    assert [i.name for r in snap.List(api.ListSnapshotsRequest(filters=[f'name=="{ns}3/fake"'])) for i in r.info] \
        == [ns + "3/fake"]
    every = [i.name for r in snap.List(api.ListSnapshotsRequest()) for i in r.info]
    assert set(every) == {c0, c1, ns + "3/fake"}
    for bad in ("labels.x~=(", "nosuchfield==1", "name==/re/", "name=1"):  # refused, never ignored
        with pytest.raises(SnapshotError) as e:
            list(snap.List(api.ListSnapshotsRequest(filters=[bad])))
        assert _code(e.value) == "INVALID_ARGUMENT", bad


def test_snapshotter_bounds_keys_labels_and_answers(snapshotter_obj, tmp_path: Path) -> None:
    """Labels are bounded as containerd bounds them (key + value 4096 bytes),
    and a snapshot's label set too; List answers stay far under gRPC's 4 MiB
    message limit; a change writes what changed, not the whole state."""
    from convstore.engines import containerd_api as api
    from convstore.engines.snapshotter import SnapshotError

    snap, _ = snapshotter_obj
    with pytest.raises(SnapshotError) as e:
        snap.Prepare(api.PrepareSnapshotRequest(key="default/1/big", labels={"k": "v" * 4096}))
    assert _code(e.value) == "INVALID_ARGUMENT"
    with pytest.raises(SnapshotError) as e:
        snap.Prepare(api.PrepareSnapshotRequest(key="default/1/many", labels={f"l{i}": "x" for i in range(80000)}))
    assert _code(e.value) == "INVALID_ARGUMENT"
    with pytest.raises(SnapshotError) as e:
        snap.Prepare(api.PrepareSnapshotRequest(key="k" * 5000))
    assert _code(e.value) == "INVALID_ARGUMENT"
    fat = {f"label-{j}": "v" * 4000 for j in range(15)}  # 60 KB of labels: within the bounds
    for i in range(80):
        snap.View(api.ViewSnapshotRequest(key=f"default/{i}/fat", labels=fat))
    answers = list(snap.List(api.ListSnapshotsRequest()))
    assert sum(len(r.info) for r in answers) == 80 + 0
    assert max(r.ByteSize() for r in answers) < 2 << 20  # gRPC refuses a message over 4 MiB
    for i in range(300):
        snap.View(api.ViewSnapshotRequest(key=f"default/{i}/small-{'x' * 100}", labels={"a": "b" * 200}))

    def written() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))

    before = written()
    snap.View(api.ViewSnapshotRequest(key="default/999/one-more"))
    snap.Remove(api.RemoveSnapshotRequest(key="default/999/one-more"))
    cost = written() - before
    assert cost < 256 << 10, cost  # the state is ~5 MB: a change writes a few pages, not all of it


def test_layerstore_refuses_a_mount_point_others_can_reach(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The mount shows every stored image's decrypted files to every user
    (allow_other): a mount point under a directory others can enter is
    refused in one line, nothing mounted; under a 0700 directory it works."""
    if os.geteuid() != 0:
        pytest.skip("allow_other mounts are made as root only")
    layout = tmp_path / "img"
    write_oci(str(layout), _layers())
    run_cli(cli_env, "pack", f"oci:{layout}:latest", "two:1")
    open_dir = tmp_path / "shared"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    mnt = open_dir / "als"
    mnt.mkdir()
    import sys

    for background in ([], ["--background"]):
        p = subprocess.Popen([sys.executable, "-m", "convstore.cli", "layerstore", *background, str(mnt)],
                             env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=60)  # refused: it exits at once (a served mount would block)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        try:
            assert p.returncode == 1 and err.count("\n") == 1, (background, p.returncode, err)
            assert f"chmod 0700 {open_dir}" in err and "Traceback" not in err
            assert not os.path.ismount(mnt)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
    os.chmod(open_dir, 0o700)
    r = run_cli(cli_env, "layerstore", "--background", str(mnt))
    try:
        assert os.path.ismount(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def test_layerstore_holding_a_pkcs11_key_leaves_no_core_and_no_pin(tmp_path: Path, softhsm) -> None:
    """A layer store that opened a PKCS#11 key with ``pin-source=env:VAR``:
    the PIN is gone from its /proc/PID/environ, its core limit is 0 and
    SIGABRT leaves no core file (core_pattern here is ``core``, in the
    process's working directory; the test raises the soft core limit of the
    process it starts, as a system with core dumps on would, and changes no
    system-wide setting)."""
    import resource
    import signal
    import sys

    from kms_fixtures import PIN

    if os.geteuid() != 0:
        pytest.skip("the layer store mounts for every user as root")
    spec = softhsm.add_key("engines-core")
    env = dict(os.environ, CONVSTORE_STORE=str(tmp_path / "store"), CONVSTORE_KEY=spec, **softhsm.env)
    layout = tmp_path / "img"
    descs = write_oci(str(layout), _layers())
    run_cli(env, "pack", f"oci:{layout}:latest", "two:1")
    mnt, cwd = tmp_path / "als", tmp_path / "cwd"
    mnt.mkdir()
    cwd.mkdir()

    def cores_on() -> None:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    p = subprocess.Popen([sys.executable, "-m", "convstore.cli", "layerstore", str(mnt)], env=env, cwd=cwd,
                         preexec_fn=cores_on, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline, "the layer store did not mount"
            time.sleep(0.05)
        # the key is open (a layer read unwraps the image's keys through the token)
        assert (_ref_dir(mnt) / descs["layers"][0]["digest"] / "diff" / "etc" / "keep").read_bytes() == b"kept\n"
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
        assert not [e for e in entries if e.startswith(b"CONVSTORE_TEST_PIN=") and e != b"CONVSTORE_TEST_PIN="]
        assert f"={PIN}".encode() not in b"\0".join(entries)
        with open(f"/proc/{p.pid}/limits") as f:
            core = next(line for line in f if line.startswith("Max core file size")).split()[4:6]
        assert core[0] == "0", core  # the soft limit, the one that applies
        os.kill(p.pid, signal.SIGABRT)
        assert p.wait(timeout=30) == -signal.SIGABRT
        assert list(cwd.iterdir()) == []  # no core file
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_opening_a_key_turns_core_dumps_off(tmp_path: Path, keyfile: str) -> None:
    """The process that opens a master key becomes non-dumpable
    (PR_GET_DUMPABLE 0: no core, no same-user ptrace or /proc/PID/mem) with
    a (soft) core limit of 0, whatever it was started with."""
    import sys

    code = ("import ctypes, resource, sys\n"
            "hard = resource.getrlimit(resource.RLIMIT_CORE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))\n"
            "import convstore\n"
            "convstore.Store.open(sys.argv[1], 'file:' + sys.argv[2])\n"
            "libc = ctypes.CDLL(None)\n"
            "print(libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[0])\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), keyfile], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"], r.stdout  # not dumpable; soft core limit 0


def test_snapshotter_state_upgrade_and_version(tmp_path: Path, store: convstore.Store) -> None:
    """A metadata.json of earlier versions is imported once (a client's
    planted ref label dropped, a convstore layer's labels its own); a
    database of another format version is refused in one line."""
    pytest.importorskip("grpc")
    import sqlite3

    from convstore.engines import containerd_api as api
    from convstore.engines.layerstore import LayerMount, LayerStore
    from convstore.engines.snapshotter import REF_LABEL, Snapshotter

    root = tmp_path / "snaps"
    root.mkdir(mode=0o700)
    chain = "sha256:" + "a" * 64
    legacy = {chain: {"kind": 3, "parent": "", "labels": {REF_LABEL: "sha256:" + "b" * 64}, "created": 1.0,
                      "updated": 1.0, "id": "", "remote": "sha256:" + "c" * 64},
              "default/3/fake": {"kind": 3, "parent": chain, "labels": {REF_LABEL: "sha256:" + "d" * 64, "x": "y"},
                                 "created": 1.0, "updated": 1.0, "id": "0123456789abcdef", "remote": ""}}
    (root / "metadata.json").write_text(json.dumps(legacy))
    snap = Snapshotter(str(root), LayerMount(LayerStore(store), str(root / "layers")))
    try:
        infos = {i.name: dict(i.labels) for r in snap.List(api.ListSnapshotsRequest()) for i in r.info}
        assert infos["default/3/fake"] == {"x": "y"}
        assert infos[chain][REF_LABEL] == chain
    finally:
        snap.layers.close()
    assert not (root / "metadata.json").exists() and (root / "metadata.json.imported").exists()
    assert (root / "metadata.db").stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(root / "metadata.db") as db:
        db.execute("PRAGMA user_version=7")
    with pytest.raises(convstore.ConvstoreError) as e:
        Snapshotter(str(root), LayerMount(LayerStore(store), str(root / "layers")))
    assert "format 7" in str(e.value) and "\n" not in str(e.value)


def test_a_pin_taken_from_the_environment_still_reaches_a_worker(tmp_path: Path, softhsm, monkeypatch) -> None:
    """Opening a PKCS#11 key with ``pin-source=env:VAR`` takes VAR out of the
    process's environment; a background
    worker started afterwards (a re-pack, a mount) still opens the key: the
    PIN travels on its pipe."""
    from kms_fixtures import PIN

    from convstore.options import StoreOptions
    from convstore.worker import spawn

    if os.geteuid() != 0:
        pytest.skip("the mount is made for every user as root")
    spec = softhsm.add_key("engines-worker").replace("env:CONVSTORE_TEST_PIN", "env:ENGINES_PIN")
    monkeypatch.setenv("ENGINES_PIN", PIN)
    store = convstore.Store.open(str(tmp_path / "store"), spec)
    assert "ENGINES_PIN" not in os.environ  # no child inherits it (/proc/PID/environ: the layer store test)
    layout = tmp_path / "img"
    write_oci(str(layout), _layers())
    store.pack(f"oci:{layout}:latest", "two:1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = spawn({"op": "mount", "ref": "two:1", "mountpoint": str(mnt)}, StoreOptions(path=str(tmp_path / "store"),
                                                                                   key=spec), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline, "the worker did not mount"
            time.sleep(0.05)
        assert (mnt / "etc" / "new").read_bytes() == b"new\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        p.wait(timeout=30)


def test_containerd_filter_syntax() -> None:
    """containerd's filter grammar as its snapshot service sends it: quoted
    field paths and values (Go escapes), ==, !=, ~=, presence, ',' for all
    and several filters for any; anything else is refused."""
    from convstore.engines.ctrfilter import FilterError, Subject, parse_all

    a = Subject("default/3/x", "", "committed", {"containerd.io/snapshot.ref": "sha256:ab", "a.b": "1"})
    b = Subject("sha256:ab", "p", "active", {})
    cases = {
        'labels."containerd.io/snapshot.ref"==sha256:ab,parent==""': (True, False),
        "labels.a.b==1": (True, False),  # an unquoted dotted label key, as containerd joins it
        "labels.nope": (False, False),
        "labels.nope!=x": (True, True),
        "kind==active": (False, True),
        'name~="^default/"': (True, False),
        'name=="sha256\\x3aab"': (False, True),
        " name == sha256:ab , kind==active ": (False, True),
    }
    for f, want in cases.items():
        match = parse_all([f])
        assert (match(a), match(b)) == want, f
    either = parse_all(["kind==active", "parent==\"\""])
    assert either(a) and either(b) and parse_all([])(a)
    for bad in ("", "name==", "name===x", "name==/x/", "name==|x|", "name==\"x", "name==\"\\q\"", "labels",
                "foo==1", "name.x==1", "name==a,,kind==b", "name==a kind==b", "name~=(", "x" * 20000):
        if bad == "":
            assert parse_all([bad])(a)  # an empty filter matches all, as containerd's does
            continue
        with pytest.raises(FilterError):
            parse_all([bad])
