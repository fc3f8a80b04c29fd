"""Convergence domains across stores (issue 25 §5), on a real docker-registry
(127.0.0.1): a push brings the image's domain into the registry store, so an
image packed straight into that store dedups with the pushed one; a store with
another domain of that name keeps it and the copy says the two will not
dedup; a tampered or transplanted domain record
is refused."""

from __future__ import annotations

import base64
import json
import os

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore


def _images(tmp_path):
    """app = base's layer plus one of its own (base is a subset of app)."""
    base_layer = make_tar([Entry(f"lib/s{i}", data=os.urandom(90_000)) for i in range(10)])
    app_layer = make_tar([Entry(f"app/a{i}", data=os.urandom(90_000)) for i in range(4)])
    rich = rich_layer()
    write_oci(str(tmp_path / "base"), [rich, base_layer])
    write_oci(str(tmp_path / "app"), [rich, base_layer, app_layer])


def _open(url, env, cache):
    return convstore.Store.open(url, env["CONVSTORE_KEY"], insecure=True, cache_dir=str(cache))


def _reg(env, url, cache, *args, check=True):
    return run_cli(env, "--insecure", "--store", url, "--cache", str(cache), *args, check=check)


def test_push_then_direct_pack_of_a_subset_stores_no_new_chunk(tmp_path, registry, cli_env):
    _images(tmp_path)
    url = f"oci://{registry.host}/fleet"
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'app'}", "app:1")
    run_cli(cli_env, "--insecure", "push", "app:1", url)
    # another packer packs base straight into the registry store: it uses the store's (pushed) domain
    base = json.loads(_reg(cli_env, url, tmp_path / "c1", "pack", "--json", f"oci:{tmp_path / 'base'}",
                           "base:1").stdout)
    assert base["chunks"] > 0 and base["new_chunks"] == 0, base
    # the same images in one local store
    one = dict(cli_env, CONVSTORE_STORE=str(tmp_path / "one"))
    run_cli(one, "pack", f"oci:{tmp_path / 'app'}", "app:1")
    run_cli(one, "pack", f"oci:{tmp_path / 'base'}", "base:1")
    local = json.loads(run_cli(one, "stats", "--json").stdout)["unique_chunks"]
    remote = json.loads(_reg(cli_env, url, tmp_path / "c2", "stats", "--json").stdout)["unique_chunks"]
    assert remote <= 1.01 * local, (remote, local)
    # one global identity, shown everywhere: the same id in both stores
    here = _open(str(tmp_path / "store"), cli_env, tmp_path / "c3").domains()
    there = _open(url, cli_env, tmp_path / "c3").domains()
    assert [d["id"] for d in here] == [d["id"] for d in there] and len(here) == 1
    shown = _reg(cli_env, url, tmp_path / "c3", "inspect", "base:1").stdout
    assert f"domain: default (epoch 1, id {here[0]['id'][:16]})" in shown, shown
    # and both images read back exactly from the registry store
    s = _open(url, cli_env, tmp_path / "c4")
    for n in ("app", "base"):
        s.unpack_oci(f"{n}:1", f"oci:{tmp_path / ('out-' + n)}")  # every diff_id checked
    assert s.verify().clean


def test_a_store_with_another_domain_of_that_name_copies_and_says_it_will_not_dedup(tmp_path, registry, cli_env):
    _images(tmp_path)
    url = f"oci://{registry.host}/other"
    # the registry store got a default domain of its own first (a direct pack)
    _reg(cli_env, url, tmp_path / "c1", "pack", f"oci:{tmp_path / 'base'}", "base:1")
    s = _open(url, cli_env, tmp_path / "c2")
    theirs = s.convergence_domains.record("default")
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'app'}", "app:1")
    p = run_cli(cli_env, "--insecure", "push", "app:1", url, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    # not silent: the push says the two domains do not share chunks
    assert "another convergence domain named 'default'" in p.stderr and "will not dedup" in p.stderr, p.stderr
    s = _open(url, cli_env, tmp_path / "c3")
    assert sorted(str(e.ref) for e in s.images()) == ["app:1", "base:1"]
    # the destination keeps its own domain (never replaced by the pushed one)
    assert s.convergence_domains.record("default")["id"] == theirs["id"]
    local = _open(str(tmp_path / "store"), cli_env, tmp_path / "c4")
    from convstore.transfer import copy_image

    r = copy_image(local, s, "app:1", "app:2")
    assert r.domain_note and "will not dedup" in r.domain_note and r.chunks_sent == 0
    for ref in ("app:1", "app:2", "base:1"):
        s.unpack_oci(ref, f"oci:{tmp_path / ('out-' + ref.replace(':', '-'))}")  # every diff_id checked
    assert s.verify().clean


def _domain_record(s):
    return s.objects.remote if hasattr(s.objects, "remote") else s.objects


def test_a_tampered_or_transplanted_domain_secret_is_refused(tmp_path, registry, cli_env):
    _images(tmp_path)
    url = f"oci://{registry.host}/tamper"
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'app'}", "app:1")
    run_cli(cli_env, "--insecure", "push", "app:1", url)
    s = _open(url, cli_env, tmp_path / "c1")
    reg = _domain_record(s)
    good = reg.get("domains/default")
    rec = json.loads(good)
    # a liar with write access flips a byte of the wrapped secret: the record's MAC fails
    w = bytearray(base64.b64decode(rec["wrapped_secret"]))
    w[-1] ^= 1
    reg.put("domains/default", json.dumps(dict(rec, wrapped_secret=base64.b64encode(bytes(w)).decode())).encode())
    p = _reg(cli_env, url, tmp_path / "c2", "pack", f"oci:{tmp_path / 'base'}", "base:1", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "fails authentication" in p.stderr, p.stderr
    # even a record authenticated under this store's metadata key cannot carry a secret wrapped for
    # another store: the wrap binds the store's id (here: the local store's own record, re-signed)
    local = _open(str(tmp_path / "store"), cli_env, tmp_path / "c3")
    theirs = json.loads(local.objects.get("domains/default"))
    forged = {k: v for k, v in json.loads(good).items() if k != "mac"}
    forged["wrapped_secret"] = theirs["wrapped_secret"]
    s2 = _open(url, cli_env, tmp_path / "c4")
    reg.put("domains/default", s2.ident.meta().sign("domain", "domain default", forged))
    p = _reg(cli_env, url, tmp_path / "c5", "pack", f"oci:{tmp_path / 'base'}", "base:1", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "cannot unwrap" in p.stderr, p.stderr
    assert [str(e.ref) for e in _open(url, cli_env, tmp_path / "c6").images()] == ["app:1"]  # nothing published
