"""A digest is a promise, and a registry's answer is bounded (issue 21 §1, §3).

Every test talks to a registry that lies (tests/liar_registry.py) in front of
a real docker-registry: it answers a pinned digest with another image's
manifest, an index entry with another manifest, a blob with other bytes, or
any request with an endless body.  What is checked: the one-line error, that
nothing is stored (the catalog as before), and for the endless bodies the
peak RSS of the ``convstore`` process.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, write_oci
from liar_registry import Body, Endless, LiarRegistry, Swap

import convstore
from convstore.errors import DigestMismatch
from convstore.oci.sources import _host_platform
from convstore.stores import registry as registry_store
from convstore.oci import registry_client
from convstore.oci.registry_client import RegistryClient
from convstore.transfer import copy_image

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
RSS_LIMIT = 150 << 20
#: an "endless" body in the suite: well above RSS_LIMIT, so that the code before the caps fails,
#: small enough for a shared machine (by hand, 600 MiB drove the old client to over 1.2 GiB)
ENDLESS = 256 << 20


def _http(host: str, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection(host, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def _manifest(host: str, repo: str, ref: str) -> tuple[str, bytes]:
    status, h, body = _http(host, "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
    assert status == 200, body
    return h["docker-content-digest"], body


@pytest.fixture
def two_images(tmp_path, registry):
    """Images a and b (small, synthetic) in the real registry as pins/a:1 and pins/b:1 (b also as
    pins/a:other: its blobs are in a's repository too), and an index pins/a:multi whose entry for this
    host's platform is a.  Returns (digest, body) of each manifest and of the index."""
    out = {}
    for n, dests in (("a", ["pins/a:1"]), ("b", ["pins/b:1", "pins/a:other"])):
        write_oci(str(tmp_path / f"src-{n}"), [make_tar([Entry(f"{n}.txt", data=f"image {n}\n".encode() * 50)])])
        for dest in dests:
            p = subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                f"oci:{tmp_path / f'src-{n}'}:latest", f"docker://{registry.host}/{dest}"],
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
        out[n] = _manifest(registry.host, f"pins/{n}", "1")
    os_, arch = _host_platform()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": out["a"][0], "size": len(out["a"][1]),
         "platform": {"os": os_, "architecture": arch}}]}).encode()
    status, _h, body = _http(registry.host, "PUT", "/v2/pins/a/manifests/multi", index, {"Content-Type": OCI_INDEX})
    assert status == 201, body
    out["index"] = ("sha256:" + hashlib.sha256(index).hexdigest(), index)
    return out


@pytest.fixture
def liar(registry):
    lr = LiarRegistry(registry.host)
    yield lr
    lr.stop()


def _one_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, (p.returncode, p.stderr)
    assert lines[0].startswith("convstore: error: ")
    return re.sub(r" \(a new master key was created at [^)]*\)$", "", lines[0])  # the test's first command


def _catalog(env: dict[str, str]) -> list[tuple[str, str, str]]:
    listed = json.loads(run_cli(env, "--insecure", "images", "--json").stdout)
    return [(f"{i['name']}:{i['tag']}", i["manifest"], i["state"]) for i in listed]


# -- §1: a digest pin is a promise ----------------------------------------------------------------

def test_pinned_digest_answered_with_another_manifest_cli(two_images, liar, cli_env):
    """docker://HOST/REPO@PIN: the registry answers the pin with image b's manifest."""
    (a_digest, _), (b_digest, _) = two_images["a"], two_images["b"]
    liar.lie = lambda m, p: Swap(f"/v2/pins/b/manifests/{b_digest}") if p == f"/v2/pins/a/manifests/{a_digest}" \
        else None
    src = f"docker://{liar.host}/pins/a@{a_digest}"
    line = _one_line(run_cli(cli_env, "--insecure", "pack", src, "a:1", check=False))
    assert f"hashes to {b_digest}, expected {a_digest}" in line and liar.host in line
    assert _catalog(cli_env) == []  # nothing stored
    # an image already under the name keeps being served
    liar.lie = None
    run_cli(cli_env, "--insecure", "pack", src, "a:1")
    before = _catalog(cli_env)
    liar.lie = lambda m, p: Swap(f"/v2/pins/b/manifests/{b_digest}") if p == f"/v2/pins/a/manifests/{a_digest}" \
        else None
    _one_line(run_cli(cli_env, "--insecure", "pack", src, "a:1", check=False))
    assert _catalog(cli_env) == before
    served = json.loads(run_cli(cli_env, "--insecure", "inspect", "--json", "a:1").stdout)["config_digest"]
    assert served == json.loads(two_images["a"][1])["config"]["digest"]  # still image a


def test_pinned_digest_api_and_client(two_images, liar, store):
    (a_digest, _), (b_digest, _) = two_images["a"], two_images["b"]
    liar.lie = lambda m, p: Swap(f"/v2/pins/b/manifests/{b_digest}") if p == f"/v2/pins/a/manifests/{a_digest}" \
        else None
    with pytest.raises(DigestMismatch, match=f"expected {a_digest}"):
        store.pack(f"docker://{liar.host}/pins/a@{a_digest}", "a:1")
    with pytest.raises(DigestMismatch):  # REPO:TAG@DIGEST: the digest decides
        store.pack(f"docker://{liar.host}/pins/a:1@{a_digest}", "a:1")
    assert store.images() == []
    # the client itself: a digest reference, or expect_digest= with a tag
    client = RegistryClient(liar.host, insecure=True)
    with pytest.raises(DigestMismatch):
        client.get_manifest("pins/a", a_digest, [OCI_MANIFEST])
    liar.lie = None
    with pytest.raises(DigestMismatch):
        client.get_manifest("pins/b", "1", [OCI_MANIFEST], expect_digest=a_digest)
    body, _mt, digest = client.get_manifest("pins/a", "1", [OCI_MANIFEST], expect_digest=a_digest)
    assert digest == a_digest and body == two_images["a"][1]


def test_index_entry_answered_with_another_manifest(two_images, liar, store, cli_env):
    """An index (by tag) names the platform manifest by digest: the registry answers it with b's."""
    (a_digest, _), (b_digest, _) = two_images["a"], two_images["b"]
    liar.lie = lambda m, p: Swap(f"/v2/pins/b/manifests/{b_digest}") if p == f"/v2/pins/a/manifests/{a_digest}" \
        else None
    with pytest.raises(DigestMismatch, match=f"expected {a_digest}"):
        store.pack(f"docker://{liar.host}/pins/a:multi", "m:1")
    assert store.images() == []
    line = _one_line(run_cli(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:multi", "m:1", check=False))
    assert f"expected {a_digest}" in line
    assert _catalog(cli_env) == []
    liar.lie = None
    store.pack(f"docker://{liar.host}/pins/a:multi", "m:1")  # the honest answer packs a
    assert store.inspect("m:1").config_digest == json.loads(two_images["a"][1])["config"]["digest"]


def test_index_entry_size_is_checked(two_images, liar, store):
    """The index entry's size is part of the promise (OCI descriptor)."""
    a_digest, a_body = two_images["a"]
    index = json.loads(two_images["index"][1])
    index["manifests"][0]["size"] = len(a_body) + 1
    liar.lie = lambda m, p: Body(json.dumps(index).encode(), OCI_INDEX) if p == "/v2/pins/a/manifests/multi" \
        else None
    with pytest.raises(DigestMismatch, match=f"{len(a_body)} bytes, but its descriptor says {len(a_body) + 1}"):
        store.pack(f"docker://{liar.host}/pins/a:multi", "m:1")
    assert store.images() == []


def test_config_blob_answered_with_other_bytes(two_images, liar, store, cli_env):
    a_digest, a_body = two_images["a"]
    b_config = json.loads(two_images["b"][1])["config"]["digest"]
    a_config = json.loads(a_body)["config"]["digest"]
    liar.lie = lambda m, p: Swap(f"/v2/pins/b/blobs/{b_config}") if p == f"/v2/pins/a/blobs/{a_config}" else None
    with pytest.raises(DigestMismatch, match=f"expected {a_config}"):
        store.pack(f"docker://{liar.host}/pins/a@{a_digest}", "a:1")
    assert store.images() == []
    line = _one_line(run_cli(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:1", "a:1", check=False))
    assert f"expected {a_config}" in line
    assert _catalog(cli_env) == []


# -- §3: bounded memory whatever a registry sends ------------------------------------------------

def _measured(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI; (its result, its peak RSS in bytes) from wait4.  A small interpreter forks it and
    reads its usage: a child forked straight from this (large) test process would count this process's
    pages, touched between fork and exec, in its peak."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        p = subprocess.run([sys.executable, "-c", _MEASURE, rss.name, "-m", "convstore.cli", *args], env=env,
                           stdout=out, stderr=err, timeout=600)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, p.returncode, out.read(), err.read()), int(rss.read()) * 1024


_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@pytest.mark.parametrize("case", ["manifest", "manifest-error-body", "config-blob", "token"])
def test_endless_answer_to_pack_is_bounded(case, two_images, liar, cli_env):
    a_digest, a_body = two_images["a"]
    a_config = json.loads(a_body)["config"]
    endless = Endless(limit=ENDLESS, status=400 if case == "manifest-error-body" else 200)
    target = {"config-blob": f"/v2/pins/a/blobs/{a_config['digest']}", "token": "/token?"}.get(
        case, "/v2/pins/a/manifests/1")
    challenge = Body(b"{}", "application/json", 401,
                     {"WWW-Authenticate": f'Bearer realm="http://{liar.host}/token",service="liar"'})

    def lie(m: str, p: str) -> Endless | Body | None:
        if case == "token":  # every request wants a token; the token server's answer never ends
            return endless if p.startswith("/token") else challenge
        return endless if m == "GET" and p == target else None

    liar.lie = lie
    p, rss = _measured(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:1", "a:1")
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    line = _one_line(p)
    expected = {"manifest": f"registry {liar.host} sent a manifest larger than 4 MiB (the distribution spec's limit)",
                "manifest-error-body": f"registry {liar.host} refused GET pins/a/manifests/1: HTTP 400 [",
                "config-blob": f"registry {liar.host} sent blob {a_config['digest']} larger than "
                               f"{a_config['size']} bytes",
                "token": f"registry {liar.host} sent an answer larger than 4 MiB"}[case]
    assert line == f"convstore: error: {expected}"
    assert liar.requests_for("GET", target) == 1  # an oversized answer is final: never read again
    assert _catalog(cli_env) == []


def test_endless_tag_listing_is_bounded(tmp_path, registry, liar, keyfile, cli_env):
    url = f"oci://{registry.host}/lst"
    convstore.Store.open(url, f"file:{keyfile}", insecure=True, cache_dir=str(tmp_path / "c0"))  # creates it
    endless = Endless(content_type="application/json", limit=ENDLESS)
    liar.lie = lambda m, p: endless if m == "GET" and "/tags/list" in p else None
    p, rss = _measured(cli_env, "--insecure", "--store", f"oci://{liar.host}/lst", "--cache", str(tmp_path / "c1"),
                       "images")
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    assert _one_line(p) == f"convstore: error: registry {liar.host} sent a tag list page larger than 4 MiB"
    assert liar.requests_for("GET", "/tags/list") == 1


def test_client_caps_every_kind(two_images, liar):
    """The API: RegistryResponseTooLarge (a RegistryError) for a manifest, a blob, a listing."""
    a_digest, a_body = two_images["a"]
    cfg = json.loads(a_body)["config"]
    liar.lie = lambda m, p: Endless(limit=ENDLESS) if m == "GET" else None
    client = RegistryClient(liar.host, insecure=True)
    with pytest.raises(registry_store.RegistryResponseTooLarge, match="4 MiB"):
        client.get_manifest("pins/a", "1", [OCI_MANIFEST])
    with pytest.raises(registry_store.RegistryResponseTooLarge, match=f"larger than {cfg['size']} bytes"):
        client.get_blob("pins/a", cfg["digest"], size=cfg["size"])
    with pytest.raises(registry_store.RegistryResponseTooLarge, match="64 MiB"):
        client.get_blob("pins/a", cfg["digest"])
    with pytest.raises(registry_store.RegistryResponseTooLarge, match="tag list page"):
        client.tags("pins/a")
    with pytest.raises(registry_store.RegistryResponseTooLarge, match="blob range"):
        client.get_blob("pins/a", cfg["digest"], 0, 10)


# -- every other place a digest is named ----------------------------------------------------------

def test_a_registry_store_object_that_is_not_what_its_name_says_is_never_cached(tmp_path, registry, liar, store):
    """A registry store answers a's sealed manifest with b's (a well-formed artifact under a's key): the
    read fails, and the client's cache does not keep b's bytes under a's name (a poisoned cache would
    fail every later read of a, after the registry behaves again)."""
    rs = registry_store
    for n in ("a", "b"):
        write_oci(str(tmp_path / n), [make_tar([Entry(f"{n}.txt", data=os.urandom(3000))])])
        store.pack(f"oci:{tmp_path / n}", f"{n}:1")
    url = f"oci://{registry.host}/poison"
    remote = convstore.Store.open(url, store.key, insecure=True, cache_dir=str(tmp_path / "c0"))
    for n in ("a", "b"):
        copy_image(store, remote, f"{n}:1")
    digest = {f"{e.ref}": str(e.manifest_digest) for e in remote.images()}
    key_a, key_b = (f"manifests/{digest[r].split(':', 1)[1]}" for r in ("a:1", "b:1"))
    sealed_b = rs.open_registry(url, insecure=True)[0].get(key_b)
    layer = rs._layer("sha256:" + hashlib.sha256(sealed_b).hexdigest(), len(sealed_b), data=sealed_b)
    forged = rs._artifact(rs.AT_MANIFEST, [layer], {"org.convstore.key": key_a})
    liar.lie = lambda m, p: Body(forged, OCI_MANIFEST) if m == "GET" and \
        p == f"/v2/poison/manifests/{rs.RegistryStore._tag(key_a)}" else None
    worker = convstore.Store.open(f"oci://{liar.host}/poison", store.key, insecure=True,
                                  cache_dir=str(tmp_path / "cw"))
    with pytest.raises(convstore.CorruptObject, match=digest["a:1"].split(":", 1)[1]):
        worker.open_image("a:1")
    liar.lie = None  # the registry behaves again: the same cache serves a
    again = convstore.Store.open(f"oci://{liar.host}/poison", store.key, insecure=True,
                                 cache_dir=str(tmp_path / "cw"))
    assert again.open_image("a:1")[1].name == "a"


def test_an_oci_layout_manifest_is_capped_like_a_registry_one(tmp_path, store):
    """One rule for manifests wherever they come from: the distribution spec's 4 MiB."""
    d = write_oci(str(tmp_path / "big"), [make_tar([Entry("f", data=b"x")])])
    root = tmp_path / "big"
    body = (root / "blobs" / "sha256" / d["manifest"]["digest"][7:]).read_bytes()
    padded = body[:-1] + b" " * (5 << 20) + b"}"  # valid JSON, 5 MiB
    new = hashlib.sha256(padded).hexdigest()
    (root / "blobs" / "sha256" / new).write_bytes(padded)
    index = json.loads((root / "index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{new}", size=len(padded))
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(convstore.SourceError, match=f"larger than {4 << 20} bytes"):
        store.pack(f"oci:{root}", "big:1")
    assert store.images() == []


def test_an_endless_index_blob_of_a_registry_store_is_read_no_further_than_its_size(tmp_path, registry, liar,
                                                                                    store):
    """The chunk index (a dedup accelerator) of a registry store: a segment blob answered with an endless
    body is read up to its descriptor's size, then skipped with a warning, as a damaged one is."""
    write_oci(str(tmp_path / "a"), [make_tar([Entry("a.txt", data=os.urandom(3000))])])
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    copy_image(store, convstore.Store.open(f"oci://{registry.host}/ix", store.key, insecure=True,
                                           cache_dir=str(tmp_path / "c0")), "a:1")
    cids = [c.cid for c in store.open_image("a:1")[1].chunks]
    _meta, chunks = registry_store.open_registry(f"oci://{registry.host}/ix", insecure=True)
    assert all(chunks.has(c) for c in cids)  # the honest index finds them
    endless = Endless(content_type="application/octet-stream", limit=ENDLESS)
    liar.lie = lambda m, p: endless if m == "GET" and p.startswith("/v2/ix/convstore-index/blobs/") else None
    _meta, chunks = registry_store.open_registry(f"oci://{liar.host}/ix", insecure=True)
    assert not any(chunks.has(c) for c in cids)  # skipped: not an error
    assert 0 < endless.sent < 32 << 20, f"{endless.sent >> 20} MiB sent"


# -- §3, the review: what requests reads on its own, and time ------------------------------------

def test_an_endless_redirect_body_is_bounded(two_images, liar, cli_env):
    """A redirect's body is read by requests itself (to free the connection) before it follows the
    Location: a 302 with an endless body must be capped like any answer, not read whole into memory."""
    endless = Endless(limit=ENDLESS, status=302, headers={"Location": f"http://{liar.host}/v2/pins/a/manifests/1"})
    liar.lie = lambda m, p: endless if m == "GET" and p == "/v2/pins/a/manifests/moved" else None
    p, rss = _measured(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:moved", "a:1")
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    assert _one_line(p) == f"convstore: error: registry {liar.host} sent a redirect larger than 65536 bytes"
    assert endless.sent < ENDLESS
    assert _catalog(cli_env) == []
    # a redirect with an ordinary body is followed, and what it leads to is checked as ever
    moved = Body(b"moved", "text/plain", 302, {"Location": f"http://{liar.host}/v2/pins/a/manifests/1"})
    liar.lie = lambda m, p: moved if m == "GET" and p == "/v2/pins/a/manifests/moved" else None
    run_cli(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:moved", "a:1")
    assert [r for r, _m, _s in _catalog(cli_env)] == ["a:1"]


def test_a_redirect_for_a_pinned_manifest_to_another_host_is_still_checked(two_images, liar, registry, store):
    """A pin answered by a redirect to another host (a CDN, or whoever the registry names) that serves
    another image's manifest: the digest check applies to what the redirect leads to."""
    (a_digest, _), (b_digest, _) = two_images["a"], two_images["b"]
    other = LiarRegistry(registry.host)  # the redirect target: another host, serving b for a's pin
    try:
        other.lie = lambda m, p: Swap(f"/v2/pins/b/manifests/{b_digest}") if "/manifests/" in p else None
        liar.lie = lambda m, p: Body(b"", "text/plain", 307, {"Location": f"http://{other.host}{p}"}) \
            if m == "GET" and p == f"/v2/pins/a/manifests/{a_digest}" else None
        with pytest.raises(DigestMismatch, match=f"hashes to {b_digest}, expected {a_digest}"):
            store.pack(f"docker://{liar.host}/pins/a@{a_digest}", "a:1")
        assert other.requests_for("GET", "/manifests/") == 1
        assert store.images() == []
    finally:
        other.stop()


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip"])
def test_a_compressed_endless_answer_is_capped_decoded(encoding, two_images, liar):
    """Content-Encoding: a small body that inflates into gigabytes is capped on what it decodes to,
    as it decodes (a nested gzip inflates ~1000x twice)."""
    endless = Endless(limit=4 << 30, encoding=encoding, piece=16 << 20)
    liar.lie = lambda m, p: endless if m == "GET" and "/manifests/" in p else None
    client = RegistryClient(liar.host, insecure=True)
    with pytest.raises(registry_store.RegistryResponseTooLarge, match="larger than 4 MiB"):
        client.get_manifest("pins/a", "1", [OCI_MANIFEST])
    assert endless.sent < 1 << 30, f"{endless.sent >> 20} MiB decoded"


def test_a_trickled_answer_meets_a_deadline(two_images, liar, monkeypatch):
    """A body trickled a byte at a time, each sooner than the read timeout, never times out per read:
    an answer must arrive whole within the timeout plus its cap at MIN_RATE bytes a second."""
    monkeypatch.setattr(registry_client, "MIN_RATE", 1 << 30, raising=False)  # the deadline is then the timeout (1 s)
    trickle = Endless(limit=20, piece=1, pause=0.4)
    liar.lie = lambda m, p: trickle if m == "GET" and "/manifests/" in p else None
    client = RegistryClient(liar.host, insecure=True, timeout=1.0)
    with pytest.raises(registry_store.RegistryError, match=f"registry {liar.host} sent a manifest too slowly"):
        client.get_manifest("pins/a", "1", [OCI_MANIFEST])
    assert trickle.sent < 10, f"{trickle.sent} bytes: read until the body ended"
    assert liar.requests_for("GET", "/manifests/") == 1  # final: a trickle is not asked for again


def test_a_trickled_layer_blob_meets_a_deadline(two_images, liar, store, monkeypatch):
    """A layer blob streams (it is not capped in memory) but must also arrive within the timeout plus its
    size at MIN_RATE: one line naming the registry, nothing stored."""
    from convstore.oci.sources import RegistrySource

    monkeypatch.setattr(registry_client, "MIN_RATE", 1 << 30, raising=False)
    a_digest, a_body = two_images["a"]
    layer = json.loads(a_body)["layers"][0]
    _status, _h, blob = _http(liar.upstream, "GET", f"/v2/pins/a/blobs/{layer['digest']}")
    assert len(blob) == layer["size"]
    trickle = Endless(content_type="application/octet-stream", data=blob, piece=layer["size"] // 40 + 1, pause=0.4)
    liar.lie = lambda m, p: trickle if m == "GET" and p == f"/v2/pins/a/blobs/{layer['digest']}" else None
    src = RegistrySource(f"docker://{liar.host}/pins/a@{a_digest}", insecure=True)
    src.client.timeout = 1.0
    with pytest.raises(registry_store.RegistryTooSlow,
                       match=f"registry {liar.host} sent blob {layer['digest']} too slowly"):
        store.pack(src, "a:1", reuse_layers=False)
    assert trickle.sent < layer["size"] // 4, f"{trickle.sent} bytes: read until the body ended"
    assert store.images() == []



def test_an_endless_tag_listing_by_pages_ends(two_images, liar):
    """Each page of a tag listing is capped, and so is the listing: pages that add no tag but name a
    next page (the same one, or always a new one) are refused, not followed for ever."""
    for fresh in (False, True):
        liar.served.clear()

        def lie(m: str, p: str) -> Body | None:
            if "/tags/list" not in p:
                return None
            if liar.requests_for("GET", "/tags/list") > 300:  # bounds the test on code that follows for ever
                return Body(b'{"tags": []}', "application/json")
            nxt = f"/v2/pins/a/tags/list?n=1000&last={liar.requests_for('GET', '/tags/list')}" if fresh \
                else "/v2/pins/a/tags/list?n=1000"
            return Body(b'{"name": "pins/a", "tags": []}', "application/json", headers={"Link": f'<{nxt}>; rel="next"'})

        liar.lie = lie
        client = RegistryClient(liar.host, insecure=True)
        with pytest.raises(registry_store.RegistryError, match=f"registry {liar.host} sent a tag list page"):
            client.tags("pins/a")
        assert liar.requests_for("GET", "/tags/list") == 1


def test_a_tag_listing_has_a_bounded_number_of_pages(two_images, liar, monkeypatch):
    """Pages of one tag each, for ever: the listing stops at MAX_TAG_PAGES pages."""
    monkeypatch.setattr(registry_client, "MAX_TAG_PAGES", 5, raising=False)

    def lie(m: str, p: str) -> Body | None:
        if "/tags/list" not in p:
            return None
        n = liar.requests_for("GET", "/tags/list")
        if n > 300:  # bounds the test on code that follows for ever
            return Body(b'{"tags": []}', "application/json")
        return Body(json.dumps({"name": "pins/a", "tags": [f"t{n}"]}).encode(), "application/json",
                    headers={"Link": f'</v2/pins/a/tags/list?n=1000&last=t{n}>; rel="next"'})

    liar.lie = lie
    client = RegistryClient(liar.host, insecure=True)
    with pytest.raises(registry_store.RegistryResponseTooLarge, match="or 5 pages of them in pins/a"):
        client.tags("pins/a")
    assert liar.requests_for("GET", "/tags/list") == 6


def test_a_layer_blob_broken_off_is_one_line(two_images, liar, cli_env):
    """A layer blob whose body ends before its Content-Length: one line naming the registry (it was
    urllib3's ProtocolError, an internal error), nothing stored."""
    a_digest, a_body = two_images["a"]
    layer = json.loads(a_body)["layers"][0]
    _status, _h, blob = _http(liar.upstream, "GET", f"/v2/pins/a/blobs/{layer['digest']}")
    liar.lie = lambda m, p: Body(blob[:10], "application/octet-stream", 200, {"Content-Length": str(len(blob))}) \
        if m == "GET" and p == f"/v2/pins/a/blobs/{layer['digest']}" else None
    line = _one_line(run_cli(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a@{a_digest}", "a:1", check=False))
    assert line == f"convstore: error: registry {liar.host} broke off blob {layer['digest']} (ProtocolError)"
    assert _catalog(cli_env) == []


@pytest.mark.parametrize("body", [b"[]", b'{"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [1]}',
                                  b'{"mediaType": "application/vnd.oci.image.manifest.v1+json", "config": "x"}'])
def test_a_manifest_of_another_shape_is_one_line(body, two_images, liar, cli_env, tmp_path):
    """Valid JSON of another shape than the spec's (a list, an index entry that is a number): one line
    naming the source (it was an internal AttributeError), from a registry and from an OCI layout."""
    liar.lie = lambda m, p: Body(body, OCI_MANIFEST) if m == "GET" and p == "/v2/pins/a/manifests/1" else None
    line = _one_line(run_cli(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:1", "a:1", check=False))
    assert line.startswith(f"convstore: error: docker://{liar.host}/pins/a:1: malformed manifest or index (")
    root = tmp_path / "layout"
    write_oci(str(root), [make_tar([Entry("f", data=b"x")])])
    (root / "index.json").write_bytes(body)
    line = _one_line(run_cli(cli_env, "--insecure", "pack", f"oci:{root}", "a:1", check=False))
    assert line.startswith(f"convstore: error: oci:{root}: malformed image layout (")
    assert _catalog(cli_env) == []


def test_a_trickled_error_body_meets_a_deadline(two_images, liar):
    """The start of an error answer's body is shown: it is read within the timeout, not byte by byte
    for as long as the registry trickles it."""
    trickle = Endless(limit=40, piece=1, pause=0.4, status=400)
    liar.lie = lambda m, p: trickle if m == "GET" and "/manifests/" in p else None
    client = RegistryClient(liar.host, insecure=True, timeout=1.0)
    with pytest.raises(registry_store.RegistryError, match=f"registry {liar.host} refused GET pins/a/manifests/1: "
                                                           f"HTTP 400"):
        client.get_manifest("pins/a", "1", [OCI_MANIFEST])
    assert trickle.sent < 10, f"{trickle.sent} bytes: read until the body ended"



def test_a_token_answer_of_another_shape_is_one_line(two_images, liar, cli_env):
    """The auth realm (token server) answers with JSON that is not an object: one line naming the registry
    (it was an internal AttributeError from oras-py's token handling)."""
    challenge = Body(b"{}", "application/json", 401,
                     {"WWW-Authenticate": f'Bearer realm="http://{liar.host}/token",service="liar"'})
    liar.lie = lambda m, p: Body(b"[]", "application/json") if p.startswith("/token") else challenge
    line = _one_line(run_cli(cli_env, "--insecure", "pack", f"docker://{liar.host}/pins/a:1", "a:1", check=False))
    assert line.startswith(f"convstore: error: registry {liar.host} sent a malformed authentication answer (")
    assert _catalog(cli_env) == []
