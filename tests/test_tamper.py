"""The tamper suite: an attacker who can write the store but holds no key.

A store holds four images with distinct content: ``t:1`` (A), ``t:2`` (B) and
``u:1`` (C) in the default convergence domain, and ``v:1`` (D) in domain
``tenant``.  Each case copies that store, applies one change that needs no key
(swap an object with another of its kind, rename it, edit it, truncate it),
then a client opens every name.  The only acceptable outcomes for a name are
its own content or a clear refusal; serving another image's content is a
failure.  A client with no trust state is used, the weakest position (what a
client with state adds is in the rollback tests below).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, write_oci

import convstore
from convstore.errors import ConvstoreError, CorruptObject, RollbackDetected, TamperedObject
from convstore.reader import ImageFS
from convstore.stores.base import Location, ObjectStore

OWN = {"t:1": b"A", "t:2": b"B", "u:1": b"C", "v:1": b"D"}


def image(tmp_path: Path, name: str, marker: bytes) -> str:
    write_oci(str(tmp_path / name), [make_tar([Entry("who", data=marker),
                                               Entry("payload", data=marker * 90_000)])])
    return f"oci:{tmp_path / name}"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("tamper")
    key = f"file:{tmp / 'keys' / 'master.key'}"
    s = convstore.Store.open(str(tmp / "store"), key, state_dir=str(tmp / "state"))
    for ref, marker in OWN.items():
        if ref == "v:1":
            s.create_domain("tenant")
        s.pack(image(tmp, ref.replace(":", "-"), marker), ref, domain="tenant" if ref == "v:1" else "default")
        e, _ = s.open_image(ref)
        s.save_profile(e, [(0, 0)])  # a start-up profile, as convstore run records
    return tmp, key


def outcome(root: str, key: str, state: str, ref: str) -> str:
    """What a client gets for ``ref``: 'own', 'OTHER:<marker>', or 'refused:<error>'."""
    try:
        s = convstore.Store.open(root, key, state_dir=state, cache_dir=state + "-cache")
        with ImageFS.from_store(s, ref) as fs:
            got = fs.open("/who").read()
            payload = fs.open("/payload").read()
    except ConvstoreError as e:
        return f"refused:{type(e).__name__}"
    if got == OWN[ref] and payload == OWN[ref] * 90_000:
        return "own"
    return f"OTHER:{got!r}"


def _swap(a: str, b: str) -> Callable[[ObjectStore], None]:
    def f(o: ObjectStore) -> None:
        o.put(a, o.get(b))
    return f


def _rename(a: str, b: str) -> Callable[[ObjectStore], None]:
    def f(o: ObjectStore) -> None:
        o.put(b, o.get(a))
        o.delete(a)
    return f


def _edit(key: str, change: Callable[[dict], None]) -> Callable[[ObjectStore], None]:
    def f(o: ObjectStore) -> None:
        doc = json.loads(o.get(key))
        change(doc)
        o.put(key, json.dumps(doc).encode())
    return f


def _truncate(key: str) -> Callable[[ObjectStore], None]:
    def f(o: ObjectStore) -> None:
        data = o.get(key)
        o.put(key, data[: len(data) // 2])
    return f


def _layer_keys(o: ObjectStore) -> list[str]:
    return sorted(o.list("layers"))


def _manifest_of(o: ObjectStore, ref: str) -> str:
    return "manifests/" + json.loads(o.get(f"refs/{ref}"))["manifest"].split(":")[1]


def _profile_swap(o: ObjectStore) -> None:
    a, b = (json.loads(o.get(f"refs/{r}"))["manifest"].split(":")[1] for r in ("t:1", "t:2"))
    o.put(f"profiles/{a}", o.get(f"profiles/{b}"))


def _other_store_json(o: ObjectStore) -> None:
    doc = json.loads(o.get("store.json"))
    doc["id"] = "0" * 32
    o.put("store.json", json.dumps(doc).encode())


def _foreign_metadata_key(tmp: Path, key: str) -> Callable[[ObjectStore], None]:
    """store.json of another store under the same master key (its metadata key is another one)."""
    def f(o: ObjectStore) -> None:
        other = convstore.Store.open(str(tmp / "foreign"), key, state_dir=str(tmp / "foreign-state"))
        o.put("store.json", other.objects.get("store.json"))
    return f


def cases(tmp: Path, key: str) -> dict[str, Callable[[ObjectStore], None]]:
    def lk(i: int) -> Callable[[ObjectStore], None]:
        return lambda o: o.put(_layer_keys(o)[i], o.get(_layer_keys(o)[1 - i]))

    c: dict[str, Callable[[ObjectStore], None]] = {
        # catalog entries
        "entry swap t:1 <- t:2 (same name)": _swap("refs/t:1", "refs/t:2"),
        "entry swap t:1 <- u:1 (other name)": _swap("refs/t:1", "refs/u:1"),
        "entry swap t:1 <- v:1 (other domain)": _swap("refs/t:1", "refs/v:1"),
        "entry rename t:2 -> t:1": _rename("refs/t:2", "refs/t:1"),
        "entry edit source + last_read": _edit("refs/t:1", lambda d: d.update(source=image(tmp, "evil", b"E"),
                                                                                 last_read=0)),
        "entry edit manifest -> t:2's": _edit("refs/t:1", lambda d: d.update(manifest=json.loads(
            open(tmp / "store" / "refs" / "t:2").read())["manifest"])),
        "entry edit state -> inactive": _edit("refs/t:1", lambda d: d.update(state="inactive")),
        "entry MAC removed": _edit("refs/t:1", lambda d: d.pop("mac")),
        "entry truncated": _truncate("refs/t:1"),
        # domain records
        "domain swap tenant <- default": _swap("domains/tenant", "domains/default"),
        "domain rename default -> tenant": _rename("domains/default", "domains/tenant"),
        "domain edit epoch": _edit("domains/tenant", lambda d: d.update(epoch=d["epoch"] + 1)),
        "domain truncated": _truncate("domains/tenant"),
        # layer index
        "layer-index swap": lk(0),
        "layer-index edit image": lambda o: _edit(_layer_keys(o)[0], lambda d: d.update(image="u"))(o),
        "layer-index truncated": lambda o: _truncate(_layer_keys(o)[0])(o),
        # manifests and profiles
        "manifest swap t:1 <- t:2": lambda o: o.put(_manifest_of(o, "t:1"), o.get(_manifest_of(o, "t:2"))),
        "manifest truncated": lambda o: _truncate(_manifest_of(o, "t:1"))(o),
        "profile swap t:1 <- t:2": _profile_swap,
        # the store's identity
        "store.json other id": _other_store_json,
        "store.json other store's metadata key": _foreign_metadata_key(tmp, key),
        "store.json truncated": _truncate("store.json"),
    }
    return c


def test_no_tamper_serves_other_content(base: tuple[Path, str], tmp_path: Path) -> None:
    tmp, key = base
    table = []
    for name, tamper in cases(tmp, key).items():
        root = tmp_path / "case"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(tmp / "store", root)
        tamper(convstore.Store.open(str(root), key, state_dir=str(tmp_path / "s0")).objects)
        results = {ref: outcome(str(root), key, str(tmp_path / f"fresh-{os.urandom(4).hex()}"), ref)
                   for ref in OWN}
        table.append((name, results))
    print("\n" + "\n".join(f"{n:<42} " + "  ".join(f"{r}={o}" for r, o in res.items()) for n, res in table))
    served_other = [(n, r, o) for n, res in table for r, o in res.items() if o.startswith("OTHER")]
    assert served_other == []
    # every tamper that touches what a name serves is refused for that name, with a named error
    for n, res in table:
        if n.startswith(("entry", "manifest")):
            assert res["t:1"].startswith("refused:"), (n, res)
        if n.startswith("store.json"):
            assert all(o.startswith("refused:") for o in res.values()), (n, res)
        if n.startswith("profile"):
            assert res["t:1"] == "own"  # a foreign profile is ignored (it is sealed to its own manifest)
    assert dict(table)["entry swap t:1 <- t:2 (same name)"]["t:1"] == "refused:TamperedObject"


def test_no_tamper_serves_other_content_on_s3(base: tuple[Path, str], tmp_path: Path, s3: str, seaweed) -> None:
    """The same cases against an S3 store (SeaweedFS): the four images packed straight into a
    bucket prefix, copied object by object to a fresh prefix per case, tampered there by a
    bucket writer who holds no key."""
    tmp, key = base
    src = convstore.Store.open(s3, key, state_dir=str(tmp_path / "s0"), cache_dir=str(tmp_path / "c0"))
    src.create_domain("tenant")
    for ref, marker in OWN.items():
        src.pack(image(tmp_path, ref.replace(":", "-"), marker), ref, domain="tenant" if ref == "v:1" else "default")
        src.save_profile(src.open_image(ref)[0], [(0, 0)])
    bucket, prefix = s3[len("s3://"):].split("/", 1)
    raw = seaweed.client()
    keys = [o["Key"] for page in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", ())]
    table = []
    for i, (name, tamper) in enumerate(cases(tmp, key).items()):
        case = f"s3://{bucket}/{prefix}-case{i}"
        for k in keys:
            raw.copy_object(Bucket=bucket, Key=f"{prefix}-case{i}/" + k.split("/", 1)[1],
                            CopySource={"Bucket": bucket, "Key": k})
        tamper(convstore.Store.open(case, key, state_dir=str(tmp_path / "s1"),
                                    cache_dir=str(tmp_path / f"t{i}")).objects.inner)  # the bucket itself
        table.append((name, {ref: outcome(case, key, str(tmp_path / f"fresh-{os.urandom(4).hex()}"), ref)
                             for ref in OWN}))
    print("\n" + "\n".join(f"{n:<42} " + "  ".join(f"{r}={o}" for r, o in res.items()) for n, res in table))
    assert [(n, r, o) for n, res in table for r, o in res.items() if o.startswith("OTHER")] == []
    for n, res in table:
        if n.startswith(("entry", "manifest")):
            assert res["t:1"].startswith("refused:"), (n, res)
        if n.startswith("store.json"):
            assert all(o.startswith("refused:") for o in res.values()), (n, res)
    assert dict(table)["entry swap t:1 <- t:2 (same name)"]["t:1"] == "refused:TamperedObject"
    assert dict(table)["profile swap t:1 <- t:2"]["t:1"] == "own"


def test_tampered_entry_is_named_in_one_line(base: tuple[Path, str], tmp_path: Path, cli_env: dict[str, str]) -> None:
    tmp, key = base
    root = tmp_path / "store"
    shutil.copytree(tmp / "store", root)
    _swap("refs/t:1", "refs/t:2")(convstore.Store.open(str(root), key).objects)
    env = dict(cli_env, CONVSTORE_STORE=str(root), CONVSTORE_KEY=key)
    for args in (["cat", "t:1", "/who"], ["unpack", "t:1", "--rootfs", str(tmp_path / "r")], ["inspect", "t:1"]):
        p = run_cli(env, *args, check=False)
        assert p.returncode == 1 and p.stdout == "", args
        assert p.stderr.count("\n") == 1 and "catalog entry t:1 fails authentication" in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()
    p = run_cli(env, "verify", check=False)  # verify names it too, and gc refuses to sweep past it
    assert p.returncode == 1 and "t:1" in p.stdout and "fails authentication" in p.stdout
    p = run_cli(env, "gc", check=False)
    assert p.returncode == 1 and "catalog entry t:1 fails authentication" in p.stderr


def test_swapped_domain_does_not_move_a_tenant(base: tuple[Path, str], tmp_path: Path) -> None:
    tmp, key = base
    root = tmp_path / "store"
    shutil.copytree(tmp / "store", root)
    s = convstore.Store.open(str(root), key, state_dir=str(tmp_path / "st"))
    s.objects.put("domains/tenant", s.objects.get("domains/default"))
    with pytest.raises(TamperedObject, match="domain record 'tenant'"):
        s.pack(image(tmp_path, "again", b"A"), "w:1", domain="tenant")
    assert "w:1" not in [str(e.ref) for e in s.images()]


def test_repack_source_comes_from_authenticated_data(base: tuple[Path, str], tmp_path: Path) -> None:
    """Editing an entry's source (to the attacker's image) and aging it is refused, not re-packed."""
    tmp, key = base
    root = tmp_path / "store"
    shutil.copytree(tmp / "store", root)
    s = convstore.Store.open(str(root), key, state_dir=str(tmp_path / "st"))
    _edit("refs/t:1", lambda d: d.update(source=image(tmp_path, "evil", b"E"), last_read=0, state="inactive"))(
        s.objects)
    started: list[tuple[str, str]] = []
    s.reactivator = lambda e: started.append((e.source, str(e.ref)))
    with pytest.raises(TamperedObject):
        s.open_image("t:1")
    with pytest.raises(TamperedObject):
        s.verify("t:1", repair=True)
    assert started == []


def test_rollback_of_a_tag_is_refused_with_state(tmp_path: Path) -> None:
    key = f"file:{tmp_path / 'keys' / 'k'}"
    s = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state"))
    s.pack(image(tmp_path, "v1", b"1"), "app:1")
    old = s.objects.get("refs/app:1")
    s.pack(image(tmp_path, "v2", b"2"), "app:1")
    assert s.manifest("app:1") is not None
    s.objects.put("refs/app:1", old)  # the store writer puts back the authentic older entry
    client = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state"))
    with pytest.raises(RollbackDetected, match="image app:1 was rolled back"):
        client.manifest("app:1")
    # explicit override, and a client without state: both accept the older version (documented)
    lenient = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state"),
                                   allow_rollback=True)
    with ImageFS.from_store(lenient, "app:1") as fs:
        assert fs.open("/who").read() == b"1"
    fresh = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "fresh"))
    assert fresh.manifest("app:1") is not None


def test_rollback_of_a_tag_cli(tmp_path: Path, cli_env: dict[str, str]) -> None:
    run_cli(cli_env, "pack", image(tmp_path, "v1", b"1"), "app:1")
    old = (tmp_path / "store" / "refs" / "app:1").read_bytes()
    run_cli(cli_env, "pack", image(tmp_path, "v2", b"2"), "app:1")
    assert run_cli(cli_env, "cat", "app:1", "/who").stdout == "2"
    (tmp_path / "store" / "refs" / "app:1").write_bytes(old)
    p = run_cli(cli_env, "cat", "app:1", "/who", check=False)
    assert p.returncode == 1 and "rolled back" in p.stderr and "--allow-rollback" in p.stderr
    assert run_cli(cli_env, "--allow-rollback", "cat", "app:1", "/who").stdout == "1"


def test_rollback_of_a_domain_epoch_is_refused(tmp_path: Path) -> None:
    key = f"file:{tmp_path / 'keys' / 'k'}"
    s = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state"))
    s.create_domain("tenant")
    old = s.objects.get("domains/tenant")
    s.rotate_domain("tenant")
    s.objects.put("domains/tenant", old)
    client = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state"))
    with pytest.raises(RollbackDetected, match="domain 'tenant' was rolled back to epoch 1"):
        client.pack(image(tmp_path, "x", b"x"), "x:1", domain="tenant")


def test_corrupt_chunk_is_quarantined_and_the_next_pack_heals(tmp_path: Path, store: convstore.Store) -> None:
    src = image(tmp_path, "h", b"H")
    store.pack(src, "h:1")
    m = store.manifest("h:1")
    victim = max(m.chunks, key=lambda c: c.size)
    blob = bytearray(store.chunks.blob(victim.cid))
    blob[-1] ^= 1
    store.chunks.delete([victim.cid])
    store.chunks.put(victim.cid, bytes(blob))
    store.chunks.flush()
    with ImageFS.from_store(store, "h:1") as fs:
        with pytest.raises(CorruptObject):
            fs.open("/payload").read()
    assert not store.chunks.has(victim.cid)  # quarantined on read: no longer a dedup target
    r = store.pack(src, "h:2", reuse_layers=False)
    assert r.new_chunks >= 1
    with ImageFS.from_store(store, "h:2") as fs:
        assert fs.open("/payload").read() == b"H" * 90_000
    assert store.verify().clean


def test_verify_repairs_from_another_store(tmp_path: Path, store: convstore.Store) -> None:
    src = image(tmp_path, "r", b"R")
    store.pack(src, "r:1")
    mirror = convstore.Store.open(str(tmp_path / "mirror"), store.key)
    from convstore.transfer import copy_image

    copy_image(store, mirror, "r:1")
    shutil.rmtree(tmp_path / "r")  # the source is gone: only the mirror can help
    m = store.manifest("r:1")
    store.chunks.delete([c.cid for c in m.chunks])
    r = store.verify(repair=True, repair_from=mirror)
    assert r.repaired == ["r:1"] and not r.not_repaired
    assert store.verify().clean


def test_store_objects_are_private(tmp_path: Path, store: convstore.Store) -> None:
    store.pack(image(tmp_path, "p", b"P"), "p:1")
    root = Path(store.objects.root)
    modes = {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}
    assert all(m & 0o077 == 0 for m in modes.values()), {k: oct(v) for k, v in modes.items() if v & 0o077}


def test_key_file_or_folder_open_to_others_is_refused(tmp_path: Path) -> None:
    from convstore.errors import KeyFileError
    from convstore.keys import open_key

    d = tmp_path / "kd"
    open_key(f"file:{d / 'master.key'}", create_file=True)
    os.chmod(d, 0o755)
    with pytest.raises(KeyFileError, match="key folder .* is open to other users"):
        open_key(f"file:{d / 'master.key'}")
    os.chmod(d, 0o730)
    with pytest.raises(KeyFileError, match="chmod 700"):
        open_key(f"file:{d / 'master.key'}")
    os.chmod(d, 0o700)
    open_key(f"file:{d / 'master.key'}")


def test_metadata_key_never_written_in_clear(base: tuple[Path, str]) -> None:
    tmp, key = base
    s = convstore.Store.open(str(tmp / "store"), key, state_dir=str(tmp / "state"))
    doc = json.loads(s.objects.get("store.json"))
    wrapped = base64.b64decode(doc["metadata_key"]["wrapped"])
    raw = s.key.unwrap(wrapped, {"purpose": "metadata", "store": s.id})
    for p in (tmp / "store").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert raw not in data and raw.hex().encode() not in data and base64.b64encode(raw) not in data


@pytest.mark.parametrize("planted", ["quarantine", "profiles", "manifests", "audit/keys.log", "locks"])
def test_symlinks_planted_in_the_store_are_never_followed(tmp_path: Path, cli_env: dict[str, str],
                                                          planted: str) -> None:
    """A store writer links a store folder (or the audit log) to the owner's files: gc, the audit
    log and locks refuse it in one line and nothing outside the store is touched."""
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "precious").write_bytes(b"keep me")
    old = os.path.getmtime(victim / "precious") - 7200
    os.utime(victim / "precious", (old, old))
    run_cli(cli_env, "pack", image(tmp_path, "p", b"P"), "p:1")
    root = tmp_path / "store"
    target = root / planted
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.symlink_to(victim / "precious" if planted.endswith(".log") else victim)
    for args in (["gc"], ["cat", "p:1", "/who"], ["verify"]):
        p = run_cli(cli_env, *args, check=False)
        assert "Traceback" not in p.stderr, p.stderr
        if p.returncode:
            assert p.stderr.count("\n") <= 1 and "symlink" in p.stdout + p.stderr, (p.stdout, p.stderr)
    assert (victim / "precious").read_bytes() == b"keep me"
    assert sorted(os.listdir(victim)) == ["precious"]


def test_key_spec_errors_never_echo_a_pin() -> None:
    from convstore.errors import InvalidReference
    from convstore.keys import open_key

    for spec in ("pkcs11-x:token=a;object=b?pin-value=98765", "98765"):
        with pytest.raises(InvalidReference) as e:
            open_key(spec)
        assert "98765" not in str(e.value)


def test_a_removed_tag_put_back_is_refused(tmp_path: Path) -> None:
    key = f"file:{tmp_path / 'keys' / 'k'}"
    s = convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state"))
    s.pack(image(tmp_path, "old", b"O"), "app:1")
    entry = s.objects.get("refs/app:1")
    s.rm("app:1")
    s.objects.put("refs/app:1", entry)  # the store writer resurrects the removed (authentic) entry
    with pytest.raises(RollbackDetected, match="was removed here"):
        convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state")).manifest("app:1")
    s.objects.delete("refs/app:1")
    s.pack(image(tmp_path, "new", b"N"), "app:1")  # a real re-creation is newer, and accepted
    with ImageFS.from_store(convstore.Store.open(str(tmp_path / "store"), key, state_dir=str(tmp_path / "state")),
                            "app:1") as fs:
        assert fs.open("/who").read() == b"N"


def test_a_whole_store_swapped_for_another_is_refused(tmp_path: Path) -> None:
    """Another store under the same master key copied over this one (store.json and all) is refused
    by a client that knows the location; one the client itself re-creates there is not."""
    key = f"file:{tmp_path / 'keys' / 'k'}"
    st = str(tmp_path / "state")
    a = convstore.Store.open(str(tmp_path / "a"), key, state_dir=st)
    a.pack(image(tmp_path, "ia", b"A"), "x:1")
    b = convstore.Store.open(str(tmp_path / "b"), key, state_dir=str(tmp_path / "elsewhere"))
    b.pack(image(tmp_path, "ib", b"B"), "x:1")
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(tmp_path / "b", tmp_path / "a")
    with pytest.raises(RollbackDetected, match="was replaced"):
        convstore.Store.open(str(tmp_path / "a"), key, state_dir=st)
    shutil.rmtree(tmp_path / "a")
    fresh = convstore.Store.open(str(tmp_path / "a"), key, state_dir=st)  # the owner starts over: accepted
    assert fresh.images() == []


def test_trust_state_folder_open_to_others_is_refused(tmp_path: Path) -> None:
    key = f"file:{tmp_path / 'keys' / 'k'}"
    st = tmp_path / "state"
    s = convstore.Store.open(str(tmp_path / "s"), key, state_dir=str(st))
    s.pack(image(tmp_path, "i", b"I"), "x:1")
    os.chmod(st / "trust", 0o777)
    with pytest.raises(convstore.StoreError, match="trust state folder .* other users"):
        convstore.Store.open(str(tmp_path / "s"), key, state_dir=str(st)).manifest("x:1")


def test_a_symlinked_entry_is_one_entrys_problem_and_rm_removes_it(tmp_path: Path, cli_env: dict[str, str]) -> None:
    run_cli(cli_env, "pack", image(tmp_path, "g", b"G"), "good:1")
    (tmp_path / "store" / "refs" / "zz:1").symlink_to("/etc/hostname")
    p = run_cli(cli_env, "images")
    assert "good" in p.stdout and "zz" not in p.stdout and "zz:1" in p.stderr
    p = run_cli(cli_env, "gc", check=False)
    assert p.returncode == 1 and "zz:1" in p.stderr and "convstore rm" in p.stderr
    assert "removed the damaged catalog entry zz:1" in run_cli(cli_env, "rm", "zz:1").stdout
    assert os.path.exists("/etc/hostname")
    assert "freed" in run_cli(cli_env, "gc").stdout
    assert run_cli(cli_env, "cat", "good:1", "/who").stdout == "G"


def test_a_pack_that_waited_out_a_rekey_is_not_published_under_the_old_key(tmp_path: Path) -> None:
    old = f"file:{tmp_path / 'old' / 'k'}"
    new = f"file:{tmp_path / 'new' / 'k'}"
    s = convstore.Store.open(str(tmp_path / "store"), old, state_dir=str(tmp_path / "st"))
    s.pack(image(tmp_path, "a", b"A"), "a:1")
    late = convstore.Store.open(str(tmp_path / "store"), old, state_dir=str(tmp_path / "st2"))
    late.domain()  # the late packer has opened the store and unlocked its domain under the old key
    s.rekey(new)
    with pytest.raises(convstore.KeyAccessDenied, match="re-keyed"):
        late.pack(image(tmp_path, "b", b"B"), "b:1")
    assert [str(e.ref) for e in convstore.Store.open(str(tmp_path / "store"), new,
                                                     state_dir=str(tmp_path / "st")).images()] == ["a:1"]


def test_a_chunk_damaged_in_transit_is_read_again_never_quarantined(tmp_path: Path, store: convstore.Store) -> None:
    from collections.abc import Iterator

    from convstore.stores.base import ChunkStore

    class DamagedOnce(ChunkStore):
        """Every chunk's first read comes back with one byte flipped (a bad link or cache)."""

        def __init__(self, inner: ChunkStore) -> None:
            self.inner, self.seen = inner, set()

        def get(self, cid: bytes, hint: Location | None = None) -> bytes:
            blob = self.inner.get(cid, hint)
            if cid in self.seen:
                return blob
            self.seen.add(cid)
            return blob[:-1] + bytes([blob[-1] ^ 1])

        def has(self, cid: bytes) -> bool: return self.inner.has(cid)
        def put(self, cid: bytes, blob: bytes) -> None: self.inner.put(cid, blob)
        def flush(self) -> None: self.inner.flush()
        def delete(self, cids: list[bytes]) -> None: self.inner.delete(cids)
        def ids(self) -> Iterator[bytes]: return self.inner.ids()
        def size(self, cid: bytes) -> int: return self.inner.size(cid)
        def usage(self) -> int: return self.inner.usage()

    store.pack(image(tmp_path, "t", b"T"), "t:1")
    n = len(list(store.chunks.ids()))
    flaky = convstore.Store(store.objects, store.key, chunk_store=DamagedOnce(store.chunk_store),
                            state_dir=str(tmp_path / "st"))
    with ImageFS.from_store(flaky, "t:1") as fs:
        assert fs.open("/payload").read() == b"T" * 90_000
    assert len(list(store.chunks.ids())) == n and list(store.objects.list("quarantine")) == []
    assert flaky.verify().clean
