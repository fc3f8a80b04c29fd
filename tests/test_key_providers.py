"""KMS-style providers against real components (SoftHSM2 token, moto KMS on
127.0.0.1): round trips, wrong/revoked/moved keys, domains, rekey, audit."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.errors import KeyAccessDenied, KeyNotFound, KeyProviderUnavailable, TamperedObject
from convstore.keys import open_key


@pytest.fixture(params=["file", "pkcs11", "awskms"])
def provider_spec(request, tmp_path, softhsm, moto_kms):
    if request.param == "file":
        return f"file:{tmp_path / 'k' / 'master.key'}"
    if request.param == "pkcs11":
        return softhsm.add_key(f"master-{os.urandom(4).hex()}")
    return moto_kms.new_key()


def src_image(tmp_path, name="src", data=None):
    if (tmp_path / name).exists():
        return f"oci:{tmp_path / name}"
    layers = [make_tar([Entry("f", data=data)])] if data else [rich_layer(), make_tar([Entry("f", data=os.urandom(200_000))])]
    write_oci(str(tmp_path / name), layers)
    return f"oci:{tmp_path / name}"


def test_roundtrip_with_each_provider(tmp_path, provider_spec):
    s = convstore.Store.open(str(tmp_path / "store"), provider_spec)
    s.pack(src_image(tmp_path), "img:1")
    s.unpack_oci("img:1", f"oci:{tmp_path / 'out'}")  # verifies every diff_id
    fresh = convstore.Store.open(str(tmp_path / "store"), provider_spec)
    assert fresh.verify().clean
    assert fresh.entry("img:1").key_id == fresh.key.key_id and fresh.key.key_id.startswith(provider_spec.split(":")[0])


def test_wrong_key_is_denied(tmp_path, softhsm, moto_kms):
    for i, (a, b) in enumerate([(softhsm.add_key("wa"), softhsm.add_key("wb")),
                                (moto_kms.new_key(), moto_kms.new_key())]):
        root = str(tmp_path / f"store-{i}")
        convstore.Store.open(root, a).pack(src_image(tmp_path, f"src{i}"), "img:1")
        with pytest.raises(KeyAccessDenied):
            convstore.Store.open(root, b).manifest("img:1")
    # a key that does not exist
    with pytest.raises(KeyNotFound):
        open_key(softhsm.spec("no-such-key"))
    with pytest.raises(KeyNotFound):
        open_key("awskms:00000000-0000-0000-0000-000000000000", kms_endpoint=moto_kms.endpoint)
    with pytest.raises(KeyProviderUnavailable):
        open_key("awskms:x", kms_endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("kind", ["pkcs11", "awskms"])
def test_moved_wrapped_key_fails(tmp_path, softhsm, moto_kms, kind):
    spec = softhsm.add_key(f"mv-{os.urandom(3).hex()}") if kind == "pkcs11" else moto_kms.new_key()
    s = convstore.Store.open(str(tmp_path / "store"), spec)
    s.pack(src_image(tmp_path, "a"), "a:1")
    s.pack(src_image(tmp_path, "b"), "b:1")
    a, b = s.entry("a:1").to_json(), s.entry("b:1").to_json()
    b["wrapped_key"] = a["wrapped_key"]
    s.objects.put("refs/b:1", json.dumps(b).encode())  # written without the master key: no valid MAC
    with pytest.raises(TamperedObject):
        convstore.Store.open(str(tmp_path / "store"), spec).manifest("b:1")


def test_revocation_and_return(tmp_path, softhsm, cli_env):
    """The HSM administrator withdraws the key's use: reads and packs fail
    with a clear denial; when it is given back they work, with no repair."""
    spec = softhsm.add_key("revocable")
    env = dict(cli_env, CONVSTORE_KEY=spec, **softhsm.env)
    run_cli(env, "pack", src_image(tmp_path), "img:1")
    softhsm.set_usage("revocable", False)
    for args in (["unpack", "img:1", f"oci:{tmp_path / 'o1'}"], ["pack", src_image(tmp_path, "b"), "img:2"],
                 ["run", "img:1", "--", "/bin/true"]):
        p = run_cli(env, *args, check=False)
        assert p.returncode == 1 and "denied" in p.stderr.lower(), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o1" / "index.json").exists()
    softhsm.set_usage("revocable", True)
    run_cli(env, "unpack", "img:1", f"oci:{tmp_path / 'o2'}")  # works again, no repair
    run_cli(env, "pack", src_image(tmp_path, "b"), "img:2")


def test_domains_isolate_and_rotate(tmp_path, store):
    data = os.urandom(300_000)
    store.create_domain("tenant-b")
    r1 = store.pack(src_image(tmp_path, "a", data), "a:1")
    r2 = store.pack(src_image(tmp_path, "b", data), "b:1", domain="tenant-b")
    assert r1.new_chunks > 0 and r2.new_chunks == r1.new_chunks  # no dedup across domains
    r3 = store.pack(src_image(tmp_path, "c", data), "c:1")
    assert r3.new_chunks == 0
    store.rotate_domain("default")
    r4 = store.pack(src_image(tmp_path, "d", data), "d:1", reuse_layers=True)
    assert r4.new_chunks == r1.new_chunks and r4.reused_layers == 0  # new epoch: nothing dedups
    assert store.inspect("d:1").domain["epoch"] == 2
    for ref in ("a:1", "b:1", "c:1", "d:1"):
        store.unpack_oci(ref, f"oci:{tmp_path / 'out'}:{ref.replace(':', '-')}")
    assert [d["epoch"] for d in store.domains() if d["name"] == "default"] == [2]
    with pytest.raises(convstore.StoreError, match="domain create"):
        store.pack(src_image(tmp_path, "e"), "e:1", domain="nope")


def test_rekey_across_providers(tmp_path, softhsm, moto_kms, cli_env):
    old = f"file:{tmp_path / 'old' / 'master.key'}"
    env = dict(cli_env, CONVSTORE_KEY=old, **moto_kms.env, **softhsm.env)  # the PIN: an in-process open took it
    for n in ("a", "b", "c"):
        run_cli(env, "pack", src_image(tmp_path, n), f"{n}:1")
    root = env["CONVSTORE_STORE"]
    packs = {p: os.stat(os.path.join(root, "packs", p)).st_mtime_ns for p in os.listdir(os.path.join(root, "packs"))}
    manifests = {p: os.stat(os.path.join(root, "manifests", p)).st_mtime_ns
                 for p in os.listdir(os.path.join(root, "manifests"))}
    hsm = softhsm.add_key("rekeyed")
    out = run_cli(env, "rekey", "--to", hsm).stdout
    assert "re-wrapped 3 images, 1 domain," in out
    assert "re-wrapped 0 images, 0 domains" in run_cli(env, "rekey", "--to", hsm).stdout  # resumable/idempotent
    os.unlink(tmp_path / "old" / "master.key")  # the old key is no longer needed
    kms = moto_kms.new_key()
    env2 = dict(env, CONVSTORE_KEY=hsm)
    run_cli(env2, "rekey", "--to", kms)
    env3 = dict(env, CONVSTORE_KEY=kms)
    for n in ("a", "b", "c"):
        run_cli(env3, "unpack", f"{n}:1", f"oci:{tmp_path / 'out'}:{n}")
    run_cli(env3, "pack", src_image(tmp_path, "d"), "d:1")
    assert {p: os.stat(os.path.join(root, "packs", p)).st_mtime_ns for p in packs} == packs
    assert {p: os.stat(os.path.join(root, "manifests", p)).st_mtime_ns for p in manifests} == manifests
    p = run_cli(env2, "unpack", "a:1", f"oci:{tmp_path / 'x'}", check=False)
    assert p.returncode == 1 and "sealed under master key" in p.stderr


def test_audit_one_record_per_key_use(tmp_path, cli_env):
    key = tmp_path / "k" / "master.key"
    env = dict(cli_env, CONVSTORE_KEY=f"file:{key}")
    src = src_image(tmp_path)

    def log():
        return [json.loads(line) for line in run_cli(env, "audit", "--json").stdout.splitlines()]

    meta = ("unwrap", "metadata", "")  # each process unwraps the store's metadata key once
    steps = [
        (["pack", src, "img:1"], [("generate", "metadata", ""), ("generate", "domain", ""),
                                  ("wrap", "manifest", "img")]),
        (["pack", src, "img:2"], [meta, ("unwrap", "domain", ""), ("unwrap", "manifest", "img"),
                                  ("wrap", "manifest", "img")]),  # layer reuse opens img:1's manifest
        (["unpack", "img:1", f"oci:{tmp_path / 'o'}"], [meta, ("unwrap", "manifest", "img")]),
        (["inspect", "img:2"], [meta, ("unwrap", "manifest", "img")]),
        (["images"], [meta]),
        (["domain", "rotate"], [meta, ("generate", "domain", "")]),
    ]
    seen = 0
    for args, expect in steps:
        run_cli(env, *args)
        recs = log()[seen:]
        seen += len(recs)
        assert [(r["op"], r["purpose"], r["image"]) for r in recs] == expect, args
        for r in recs:
            assert r["outcome"] == "ok" and r["provider"] == "file" and r["key_id"].startswith("file:")
            assert r["pid"] and r["user"] and r["time"] and r["store"]
    # a denied unwrap is a key use too: recorded with its outcome (here: a damaged wrapped metadata key)
    sj = tmp_path / "store" / "store.json"
    doc = json.loads(sj.read_text())
    wrapped = bytearray(base64.b64decode(doc["metadata_key"]["wrapped"]))
    wrapped[-1] ^= 1
    doc["metadata_key"]["wrapped"] = base64.b64encode(wrapped).decode()
    sj.write_text(json.dumps(doc))
    p = run_cli(env, "unpack", "img:2", f"oci:{tmp_path / 'o2'}", check=False)
    assert p.returncode == 1 and "cannot unwrap" in p.stderr
    [rec] = log()[seen:]
    assert (rec["op"], rec["outcome"], rec["purpose"]) == ("unwrap", "denied", "metadata") and "error" in rec
    assert run_cli(env, "audit", "--image", "img").stdout.count("unwrap") == 3


def test_key_material_never_logged(tmp_path, cli_env):
    key = tmp_path / "k" / "master.key"
    env = dict(cli_env, CONVSTORE_KEY=f"file:{key}")
    outputs = []
    for args in (["pack", src_image(tmp_path), "img:1"], ["inspect", "--json", "img:1"], ["images", "--json"],
                 ["stats", "--json"], ["audit", "--json"], ["domain", "list", "--json"]):
        p = run_cli(env, *args)
        outputs += [p.stdout, p.stderr]
    p = run_cli(dict(env, CONVSTORE_KEY=f"file:{tmp_path / 'o.key'}"), "unpack", "img:1", "--rootfs",
                str(tmp_path / "r"), check=False)
    outputs += [p.stdout, p.stderr]
    master = base64.b64decode(json.loads(key.read_text())["key"])
    s = convstore.Store.open(env["CONVSTORE_STORE"], f"file:{key}")
    e = s.entry("img:1")
    dek = s.key.unwrap(e.wrapped_key, s.manifests.context("img", e.manifest_digest))
    secrets = [master, dek, s.domain().chunk_key]
    m = s.manifest("img:1")
    secrets.append(m.chunks[0].ckey)
    texts = outputs + [repr(s), repr(s.key), repr(s.domain()), repr(m.chunks[0]), repr(m)]
    texts.append((tmp_path / "store" / "audit" / "keys.log").read_text())
    for root, _d, files in os.walk(tmp_path / "store"):
        for f in files:
            if not f.endswith(".pack"):
                texts.append(open(os.path.join(root, f), "rb").read().decode("latin-1"))
    for secret in secrets:
        for form in (secret.hex(), base64.b64encode(secret).decode(), secret.decode("latin-1")):
            assert not any(form in t for t in texts)


def test_unwrap_is_cached(tmp_path, store):
    store.pack(src_image(tmp_path), "img:1")
    fresh = convstore.Store.open(store.objects.root, f"file:{store.key.path}")
    from convstore.reader import ImageFS

    for _ in range(5):
        with ImageFS.from_store(fresh, "img:1") as fs:
            fs.open("/f").read()
    assert fresh.key.provider_calls == 2  # the store's metadata key, then img:1's data key: once each


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    with pytest.raises(KeyProviderUnavailable, match=r"convstore\[pkcs11\]"):
        open_key("pkcs11:token=x;object=y?module-path=/nonexistent.so")
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(KeyProviderUnavailable, match=r"convstore\[aws\]"):
        open_key("awskms:x")


@pytest.mark.parametrize("how", ["pin-value", "pin-source-env"])
def test_pin_never_in_a_childs_argv_or_environment(tmp_path, softhsm, cli_env, how):
    """A key spec carrying a PIN (or naming the variable that holds it) reaches a background worker
    on a pipe, never in its argv or environment."""
    from kms_fixtures import PIN

    spec = softhsm.add_key(f"pin-{how}")
    if how == "pin-value":
        spec = spec.replace("pin-source=env:CONVSTORE_TEST_PIN", f"pin-value={PIN}")
        env = {k: v for k, v in cli_env.items() if k != "CONVSTORE_TEST_PIN"}
    else:
        env = dict(cli_env, CONVSTORE_TEST_PIN=PIN)
    env["CONVSTORE_KEY"] = spec
    run_cli(env, "pack", src_image(tmp_path, "p", data=b"pinned"), "img:1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli(env, "mount", "--background", "img:1", str(mnt))
    try:
        assert (mnt / "f").read_bytes() == b"pinned"  # the worker opened the token with the PIN
        workers = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"convstore.worker" in cmdline:
                workers.append((cmdline, environ))
        assert len(workers) == 1
        cmdline, environ = workers[0]
        assert not any(PIN.encode() in a or b"pkcs11:" in a for a in cmdline), cmdline
        assert not [e for e in environ if b"pin-value=" + PIN.encode() in e or e.endswith(b"=" + PIN.encode())]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
