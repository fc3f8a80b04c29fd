"""Trust policy and sigstore signatures end to end (issue 21 section 5): a real
docker-registry on loopback, images pushed by skopeo and signed with keys made
here (sigstore attachments in containers/image's format: Debian's skopeo has
its sigstore signer patched out, see sigstore_fixtures.py), packed under
containers-policy.json files, and a node policy required at start.  Liars: a
signature attachment moved to another image's digest, a signed image tagged
elsewhere, a key the node does not trust, a record moved to another image.
Real cosign signatures (containers/image's own fixtures) check the verifier's
interoperability."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, write_oci
from sigstore_fixtures import SigningKey, make_key, policy_file, sign, sigstore_policy, skopeo_copy

import convstore
from convstore.errors import PolicyDenied, PolicyInvalid, SignatureInvalid, SignatureRequired
from convstore.manifest import Manifest
from convstore.oci.media import OCI_MANIFEST
from convstore.oci.policy import Policy, scope_of
from convstore.oci.registry_client import RegistryClient

ACCEPT = {"default": [{"type": "insecureAcceptAnything"}]}


def _runnable_layer(marker: str) -> bytes:
    """A tiny runnable root: the host's dash and the two libraries it loads."""
    files = [Entry(d, "dir") for d in ("bin", "lib", "lib/x86_64-linux-gnu", "lib64", "etc", "proc", "dev", "sys",
                                       "tmp")] + [Entry("etc/marker", data=marker.encode())]
    for src, dst in (("/bin/dash", "bin/sh"), ("/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6"),
                     ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2")):
        with open(os.path.realpath(src), "rb") as f:
            files.append(Entry(dst, data=f.read(), mode=0o755))
    return make_tar(files)


@pytest.fixture
def signing(tmp_path, registry):
    """Images A (``app:a``, signed) and B (``app:b``, unsigned) pushed by skopeo."""
    for n in ("a", "b"):
        write_oci(str(tmp_path / n), [_runnable_layer(f"image {n}\n")])
        skopeo_copy(f"oci:{tmp_path / n}:latest", f"docker://{registry.host}/app:{n}")
    key = make_key(tmp_path / "signing-keys")
    sign(registry.host, "app", "a", key)
    client = RegistryClient(registry.host, insecure=True)
    digests = {n: client.get_manifest("app", n, [OCI_MANIFEST])[2] for n in ("a", "b")}
    return {"key": key, "client": client, "digest": digests, "host": registry.host}


def _key_id(key: SigningKey) -> str:
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_pem_public_key(key.public_pem)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _fails_one_line(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convstore: error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _nothing_stored(env: dict[str, str], tmp_path) -> None:
    assert json.loads(run_cli(env, "--insecure", "images", "--json").stdout) == []
    packs = tmp_path / "store" / "packs"
    assert not packs.exists() or not [p for p in packs.iterdir() if p.name.endswith(".pack")]


def test_the_attachment_is_where_containers_image_looks(signing):
    got = signing["client"].get_manifest("app", signing["digest"]["a"].replace(":", "-") + ".sig", [OCI_MANIFEST])
    assert got is not None
    doc = json.loads(got[0])
    layer = doc["layers"][0]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    assert "dev.cosignproject.cosign/signature" in layer["annotations"]
    assert signing["client"].get_manifest("app", signing["digest"]["b"].replace(":", "-") + ".sig",
                                          [OCI_MANIFEST]) is None


def test_good_signature_is_packed_and_inspect_shows_what_was_verified(tmp_path, signing, cli_env):
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", signing["key"]))
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:a", "app:a")
    assert "packed app:a" in p.stdout
    doc = json.loads(run_cli(cli_env, "--insecure", "inspect", "--json", "app:a").stdout)
    v = doc["verification"]
    assert v["v"] == 1 and v["policy"] == str(pol) and v["requirements"] == ["sigstoreSigned"]
    assert v["scope"] == f'docker transports.docker["{signing["host"]}/app"]'
    (s,) = v["signatures"]
    assert s["key_id"] == _key_id(signing["key"])
    assert s["docker_manifest_digest"] == signing["digest"]["a"] == v["manifest_digest"]
    assert s["docker_reference"] == f"{signing['host']}/app:a"
    assert s["signed_identity"] == {"type": "matchRepoDigestOrExact"}
    payload = base64.b64decode(s["payload"])
    assert json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == signing["digest"]["a"]
    assert s["payload_digest"] == "sha256:" + hashlib.sha256(payload).hexdigest()
    text = run_cli(cli_env, "--insecure", "inspect", "app:a").stdout
    assert f"verification: sigstoreSigned by key {_key_id(signing['key'])} for {signing['digest']['a']}" in text
    # the library shows the same
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    assert store.inspect("app:a").verification == v


def test_wrong_key_is_refused_and_nothing_is_stored(tmp_path, signing, cli_env):
    other = make_key(tmp_path / "other", "other")
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", other))
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:a", "app:a", check=False)
    _fails_one_line(p, "cryptographic signature verification failed", _key_id(other)[:19])
    _nothing_stored(cli_env, tmp_path)


def test_a_signature_moved_to_another_digest_is_refused(tmp_path, signing, cli_env):
    """The registry's writer copies A's signature attachment to B's digest: the payload names A."""
    c = signing["client"]
    body, mt, _ = c.get_manifest("app", signing["digest"]["a"].replace(":", "-") + ".sig", [OCI_MANIFEST])
    c.put_manifest("app", signing["digest"]["b"].replace(":", "-") + ".sig", body, OCI_MANIFEST)
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", signing["key"]))
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:b", "app:b", check=False)
    _fails_one_line(p, f"signature for digest {signing['digest']['a']} does not match {signing['digest']['b']}")
    _nothing_stored(cli_env, tmp_path)


def test_a_signed_image_under_another_tag_fails_the_identity_rule_unless_the_policy_says_repository(
        tmp_path, signing, cli_env):
    c = signing["client"]
    body, mt, _ = c.get_manifest("app", "a", [OCI_MANIFEST])
    c.put_manifest("app", "moved", body, OCI_MANIFEST)  # same digest: the signature is found, its identity is app:a
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", signing["key"]))
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:moved", "app:m",
                check=False)
    _fails_one_line(p, f"signature for identity '{signing['host']}/app:a' is not accepted")
    _nothing_stored(cli_env, tmp_path)
    pol2 = policy_file(tmp_path / "policy2.json", sigstore_policy(f"{signing['host']}/app", signing["key"],
                                                                  signedIdentity={"type": "matchRepository"}))
    run_cli(cli_env, "--insecure", "pack", "--policy", str(pol2), f"docker://{signing['host']}/app:moved", "app:m")


def test_no_signature_under_sigstore_signed_is_refused(tmp_path, signing, cli_env):
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", signing["key"]))
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:b", "app:b", check=False)
    _fails_one_line(p, "a signature was required", "but no signature exists")
    _nothing_stored(cli_env, tmp_path)
    # an OCI layout carries no signatures: a policy requiring them for oci: refuses it
    pol2 = policy_file(tmp_path / "policy2.json", {"default": [{"type": "sigstoreSigned",
                                                                "keyPath": str(signing["key"].public)}]})
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol2), f"oci:{tmp_path / 'b'}", "b:1", check=False)
    _fails_one_line(p, "oci: sources carry no sigstore signatures")


def test_reject_is_refused(tmp_path, signing, cli_env):
    pol = policy_file(tmp_path / "policy.json", {"default": [{"type": "insecureAcceptAnything"}],
                                                 "transports": {"docker": {signing["host"]: [{"type": "reject"}]},
                                                                "oci": {str(tmp_path / "b"): [{"type": "reject"}]}}})
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:a", "app:a", check=False)
    _fails_one_line(p, "rejected by trust policy", f'transports.docker["{signing["host"]}"]')
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"oci:{tmp_path / 'b'}", "b:1", check=False)
    _fails_one_line(p, "rejected by trust policy", f'transports.oci["{tmp_path / "b"}"]')
    _nothing_stored(cli_env, tmp_path)
    run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"oci:{tmp_path / 'a'}", "a:1")  # other scopes: the default


def test_insecure_accept_anything_packs_and_records_no_verification(tmp_path, signing, cli_env):
    pol = policy_file(tmp_path / "policy.json", ACCEPT)
    run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:b", "app:b")
    v = json.loads(run_cli(cli_env, "--insecure", "inspect", "--json", "app:b").stdout)["verification"]
    assert v["signatures"] == [] and v["requirements"] == ["insecureAcceptAnything"] and v["policy"] == str(pol)
    assert "verification: no signature verified (requirements insecureAcceptAnything" in \
        run_cli(cli_env, "--insecure", "inspect", "app:b").stdout


@pytest.mark.parametrize("req, needle", [
    ({"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}, "signedBy (GPG signatures) is not supported"),
    ({"type": "sigstoreSigned", "fulcio": {"caPath": "/ca", "oidcIssuer": "x", "subjectEmail": "y"},
      "rekorPublicKeyPath": "/r"}, "sigstoreSigned with fulcio, rekorPublicKeyPath is not supported"),
    ({"type": "signedBaseLayer", "baseLayerIdentity": {"type": "exactRepository", "dockerRepository": "x/y"}},
     "signedBaseLayer is not supported"),
])
def test_an_unsupported_requirement_is_refused_in_one_line(tmp_path, signing, cli_env, req, needle):
    pol = policy_file(tmp_path / "policy.json", {"default": [req]})
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:a", "app:a", check=False)
    _fails_one_line(p, needle)
    _nothing_stored(cli_env, tmp_path)


@pytest.mark.parametrize("doc, needle", [
    ({"default": [{"type": "signedByAnyone"}]}, "unknown policy requirement type 'signedByAnyone'"),
    ({"default": []}, "must not be empty"),
    ({"transports": {}}, "default policy is missing"),
    ({"default": [{"type": "reject", "extra": 1}]}, "unknown field 'extra'"),
])
def test_a_malformed_policy_is_refused_in_one_line(tmp_path, cli_env, doc, needle):
    write_oci(str(tmp_path / "x"), [make_tar([Entry("f", data=b"x")])])
    pol = policy_file(tmp_path / "policy.json", doc)
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"oci:{tmp_path / 'x'}", "x:1", check=False)
    _fails_one_line(p, needle)
    p = run_cli(cli_env, "--insecure", "pack", "--policy", str(tmp_path / "missing.json"), f"oci:{tmp_path / 'x'}", "x:1",
                check=False)
    _fails_one_line(p, "missing.json: No such file or directory")


def test_a_key_given_twice_is_refused_in_a_policy_and_in_a_signature_payload():
    """containers/image parses both strictly: a duplicate key could make two parsers read two documents."""
    with pytest.raises(PolicyInvalid, match=r"p.json: duplicate key 'default'"):
        Policy.parse(b'{"default": [{"type": "reject"}], "default": [{"type": "insecureAcceptAnything"}]}', "p.json")
    from convstore.oci.sigstore import _no_duplicates

    with pytest.raises(SignatureInvalid, match="signature payload: duplicate key 'critical'"):
        json.loads('{"critical": {}, "critical": {}}', object_pairs_hook=_no_duplicates)


def test_most_specific_scope_wins_and_scopes_follow_containers_image():
    doc = {"default": [{"type": "reject"}], "transports": {"docker": {
        "reg.example.com": [{"type": "insecureAcceptAnything"}],
        "reg.example.com/team": [{"type": "reject"}],
        "reg.example.com/team/app:1": [{"type": "insecureAcceptAnything"}],
        "*.example.com": [{"type": "reject"}]}}}
    pol = Policy.parse(json.dumps(doc).encode(), "p.json")

    def where(ref: str) -> str:
        return pol.requirements_for(scope_of(ref))[0]

    assert where("docker://reg.example.com/team/app:1") == 'transports.docker["reg.example.com/team/app:1"]'
    assert where("docker://reg.example.com/team/app:2") == 'transports.docker["reg.example.com/team"]'
    assert where("docker://reg.example.com/other:1") == 'transports.docker["reg.example.com"]'
    assert where("docker://x.example.com/other:1") == 'transports.docker["*.example.com"]'
    assert where("docker://elsewhere.org/a:1") == "default"
    assert where("oci:/tmp/layout:1") == "default"


def _pack_signed_and_unsigned(tmp_path, signing, env) -> None:
    pack_pol = policy_file(tmp_path / "pack-policy.json",
                           {"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {
                               f"{signing['host']}/app:a": [{"type": "sigstoreSigned",
                                                             "keyPath": str(signing["key"].public)}]}}})
    run_cli(env, "--insecure", "pack", "--policy", str(pack_pol), f"docker://{signing['host']}/app:a", "app:a")
    run_cli(env, "--insecure", "pack", "--policy", str(pack_pol), f"docker://{signing['host']}/app:b", "app:b")


@pytest.mark.skipif(os.geteuid() != 0, reason="run and mount need root (FUSE allow_other, runc)")
def test_node_policy_at_start_refuses_unsigned_and_starts_signed(tmp_path, signing, cli_env):
    _pack_signed_and_unsigned(tmp_path, signing, cli_env)
    node = policy_file(tmp_path / "node-policy.json", sigstore_policy(signing["host"], signing["key"]))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (("run", "--policy", str(node), "app:b"),
                 ("mount", "--policy", str(node), "app:b", str(mnt)),
                 ("mount", "--background", "--policy", str(node), "app:b", str(mnt))):
        p = run_cli(cli_env, *args, check=False)
        _fails_one_line(p, "app:b", "requires a sigstore signature", "the image was packed without one")
        assert not os.path.ismount(mnt)
    # a node that trusts another key: the recorded signature is verified again, not taken on trust
    other = make_key(tmp_path / "other", "other")
    node2 = policy_file(tmp_path / "node2.json", sigstore_policy(signing["host"], other))
    _fails_one_line(run_cli(cli_env, "--insecure", "run", "--policy", str(node2), "app:a", check=False),
                    "cryptographic signature verification failed")
    # the signed image starts under the strict policy
    assert run_cli(cli_env, "--insecure", "run", "--policy", str(node), "app:a").stdout == "hello\n"
    run_cli(cli_env, "--insecure", "mount", "--background", "--policy", str(node), "app:a", str(mnt))
    try:
        assert (mnt / "etc" / "marker").read_text() == "image a\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_layer_store_serves_only_images_the_node_policy_accepts(tmp_path, signing, cli_env):
    """The check behind `convstore layerstore` and `convstore snapshotter` (both serve a LayerStore)."""
    from convstore.engines.layerstore import LayerStore

    _pack_signed_and_unsigned(tmp_path, signing, cli_env)
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    digest = {n: store.manifest(f"app:{n}").layers[0].digest for n in ("a", "b")}
    node = Policy.load(str(policy_file(tmp_path / "node.json", sigstore_policy(signing["host"], signing["key"]))))
    ls = LayerStore(store, policy=node)
    ls.scan()
    assert ls.layer(digest["a"]) is not None and ls.layer(digest["b"]) is None
    open_ls = LayerStore(store)
    open_ls.scan()
    assert open_ls.layer(digest["b"]) is not None  # without a node policy both are served


@pytest.mark.skipif(os.geteuid() != 0, reason="the layer store mounts for every user (FUSE allow_other)")
def test_layerstore_command_serves_only_images_the_node_policy_accepts(tmp_path, signing, cli_env):
    """`convstore layerstore --policy`, in the foreground and through its background worker: the command
    line builds the LayerStore it serves, and the node policy goes with it."""
    _pack_signed_and_unsigned(tmp_path, signing, cli_env)
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"])
    digest = {n: store.manifest(f"app:{n}").layers[0].digest for n in ("a", "b")}
    node = policy_file(tmp_path / "node.json", sigstore_policy(signing["host"], signing["key"]))
    ref_dir = base64.b64encode(b"registry.example/any:1").decode()  # the engine's image reference: any
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for background in (True, False):
        args = ["layerstore", *(["--background"] if background else []), "--policy", str(node), str(mnt)]
        fg = None if background else subprocess.Popen([sys.executable, "-m", "convstore", *args], env=cli_env,
                                                      stderr=subprocess.PIPE)
        if background:
            run_cli(cli_env, *args)
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mnt):
                assert fg is None or fg.poll() is None, fg.stderr.read() if fg and fg.stderr else ""
                assert time.monotonic() < deadline, "the layer store did not mount"
                time.sleep(0.05)
            served = os.listdir(mnt / ref_dir)
            assert digest["a"] in served and digest["b"] not in served, (background, served)
            assert (mnt / ref_dir / digest["a"] / "info").is_file()
            assert not (mnt / ref_dir / digest["b"]).exists()
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            if fg is not None:
                fg.wait(timeout=30)


def test_require_rechecks_the_sealed_source_manifest(tmp_path, signing, cli_env):
    """A record copied onto an image whose layers are not the signed manifest's is refused."""
    from convstore.oci.policy import require

    _pack_signed_and_unsigned(tmp_path, signing, cli_env)
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    node = Policy.load(str(policy_file(tmp_path / "node.json", sigstore_policy(signing["host"], signing["key"]))))
    a, b = store.manifest("app:a"), store.manifest("app:b")
    require(node, a, "app:a")
    with pytest.raises(SignatureRequired):
        require(node, b, "app:b")
    b.verification = a.verification  # b's own source manifest: the signature names a's digest
    with pytest.raises(SignatureInvalid, match="does not match"):
        require(node, b, "app:b")
    b.source_manifest_bytes = a.source_manifest_bytes  # a's source manifest, b's layers
    with pytest.raises(PolicyDenied, match="differ from its signed source manifest"):
        require(node, b, "app:b")


def test_verification_record_round_trips_and_old_manifests_read(tmp_path, signing, cli_env):
    _pack_signed_and_unsigned(tmp_path, signing, cli_env)
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    m = store.manifest("app:a")
    assert Manifest.decode(m.encode()).verification == m.verification is not None
    m.verification = None
    enc = m.encode()
    assert b'"verification"' not in enc  # what a manifest written before the field looks like
    assert Manifest.decode(enc).verification is None


def test_policy_errors_are_convstore_errors():
    for e in (PolicyDenied, PolicyInvalid, SignatureRequired, SignatureInvalid):
        assert issubclass(e, convstore.ConvstoreError)


# -- interoperability: signatures made by real cosign and skopeo ---------------------------------
# containers/image's own fixtures, from Debian's golang-github-containers-image-dev (scripts/setup.sh
# unpacks them into the venv); the cases and expectations are those of its policy_eval_sigstore_test.go.
CIMAGE_FIXTURES = Path(sys.prefix) / "share" / "containers-image-fixtures"


def _cimage_signature(rel: str) -> tuple[bytes, str]:
    """(payload, base64 signature) of a containers/image signature file ("\\0sigstore-json\\n" + JSON)."""
    data = (CIMAGE_FIXTURES / rel).read_bytes()
    assert data.startswith(b"\0sigstore-json\n")
    doc = json.loads(data[len(b"\0sigstore-json\n"):])
    assert doc["mimeType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    return base64.b64decode(doc["payload"]), doc["annotations"]["dev.cosignproject.cosign/signature"]


def _cimage_digest(rel: str) -> str:
    return "sha256:" + hashlib.sha256((CIMAGE_FIXTURES / rel / "manifest.json").read_bytes()).hexdigest()


def test_real_cosign_and_skopeo_signatures_are_judged_as_containers_image_judges_them():
    from convstore.oci.dockerref import DockerRef
    from convstore.oci.policy import Requirement, SignedIdentity, accept

    assert (CIMAGE_FIXTURES / "cosign.pub").is_file(), "scripts/setup.sh unpacks containers/image's fixtures"
    pub = str(CIMAGE_FIXTURES / "cosign.pub")
    pol = Policy(None, ())

    def judge(sig: str, image: str, ref: str, identity: str, key_data: bool = False) -> None:
        req = (Requirement("sigstoreSigned", key_datas=((CIMAGE_FIXTURES / "cosign.pub").read_bytes(),),
                           identity=SignedIdentity(identity)) if key_data
               else Requirement("sigstoreSigned", key_paths=(pub,), identity=SignedIdentity(identity)))
        accept(pol, req, [_cimage_signature(sig)], DockerRef.parse(ref), _cimage_digest(image), "t", "none")

    cosign = "192.168.64.2:5000/cosign-signed-single-sample"
    judge("dir-img-cosign-valid/signature-1", "dir-img-cosign-valid", cosign, "matchRepository")  # made by cosign
    judge("dir-img-cosign-valid/signature-1", "dir-img-cosign-valid", cosign, "matchRepository", key_data=True)
    judge("dir-img-cosign-valid-with-tag/signature-1", "dir-img-cosign-valid-with-tag",  # made by skopeo
          "192.168.64.2:5000/skopeo-signed:tag", "matchExact")
    judge("dir-img-cosign-valid-with-tag/signature-1", "dir-img-cosign-valid-with-tag",
          "192.168.64.2:5000/skopeo-signed:tag", "matchRepoDigestOrExact")
    refused = [
        (("unknown-cosign-key.signature", "dir-img-cosign-valid", cosign, "matchRepository"),
         "cryptographic signature verification failed"),
        (("dir-img-cosign-manifest-digest-error/signature-1", "dir-img-cosign-manifest-digest-error", cosign,
          "matchRepository"), "does not match"),
        (("dir-img-cosign-modified-manifest/signature-1", "dir-img-cosign-modified-manifest", cosign,
          "matchRepository"), "does not match"),
        (("dir-img-cosign-valid-with-tag/signature-1", "dir-img-cosign-valid-with-tag",
          "192.168.64.2:5000/skopeo-signed:othertag", "matchExact"), "is not accepted"),
        (("dir-img-cosign-valid/signature-1", "dir-img-cosign-valid", cosign + ":latest", "matchExact"),
         "is not accepted"),  # cosign signs a name without a tag: never an exact match
        (("dir-img-cosign-valid/signature-1", "dir-img-cosign-valid", cosign + ":latest", "matchRepoDigestOrExact"),
         "is not accepted"),
    ]
    for args, why in refused:
        with pytest.raises(SignatureInvalid, match=why):
            judge(*args)


def test_signed_identity_rules_follow_containers_image():
    from convstore.oci.dockerref import DockerRef
    from convstore.oci.policy import SignedIdentity

    tagged, digested = DockerRef.parse("reg.io/ns/app:1"), DockerRef.parse("reg.io/ns/app@sha256:" + "a" * 64)
    cases = [
        (SignedIdentity("matchRepoDigestOrExact"), tagged, "reg.io/ns/app:1", True),
        (SignedIdentity("matchRepoDigestOrExact"), tagged, "reg.io/ns/app:2", False),
        (SignedIdentity("matchRepoDigestOrExact"), digested, "reg.io/ns/app:anything", True),
        (SignedIdentity("matchRepoDigestOrExact"), digested, "reg.io/ns/app", False),  # name only: never
        (SignedIdentity("matchRepoDigestOrExact"), tagged, "reg.io/ns/other:1", False),
        (SignedIdentity("matchExact"), tagged, "reg.io/ns/app:1", True),
        (SignedIdentity("matchExact"), digested, "reg.io/ns/app:1", False),
        (SignedIdentity("matchRepository"), tagged, "reg.io/ns/app:9", True),
        (SignedIdentity("exactReference", docker_reference="reg.io/ns/app:7"), tagged, "reg.io/ns/app:7", True),
        (SignedIdentity("exactReference", docker_reference="reg.io/ns/app:7"), tagged, "reg.io/ns/app:1", False),
        (SignedIdentity("exactRepository", docker_repository="other.io/x"), tagged, "other.io/x:5", True),
        (SignedIdentity("remapIdentity", prefix="reg.io/ns", signed_prefix="upstream.io/team"), tagged,
         "upstream.io/team/app:1", True),
        (SignedIdentity("remapIdentity", prefix="reg.io/ns", signed_prefix="upstream.io/team"), tagged,
         "reg.io/ns/app:1", False),
        (SignedIdentity("matchRepository"), DockerRef.parse("busybox:1"), "docker.io/library/busybox:2", True),
    ]
    for ident, intended, signed, want in cases:
        assert ident.matches(intended, signed) is want, (ident, intended, signed)
    assert not SignedIdentity("matchRepository").matches(None, "reg.io/ns/app:1")  # oci:, docker-archive:


def test_key_data_and_the_default_policy_lookup(tmp_path, monkeypatch):
    from convstore.oci import policy as policy_mod

    key = make_key(tmp_path / "k")
    doc = {"default": [{"type": "sigstoreSigned", "keyData": base64.b64encode(key.public_pem).decode()}]}
    pol = Policy.parse(json.dumps(doc).encode(), "p.json")
    assert [k.key_id for k in pol.default[0].keys(pol.path)] == [_key_id(key)]
    with pytest.raises(PolicyInvalid, match="keyData is not valid base64"):
        Policy.parse(b'{"default": [{"type": "sigstoreSigned", "keyData": "%%%"}]}', "p.json")
    # the user's file first (XDG_CONFIG_HOME), then the system's, else none: everything accepted, recorded as such
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setattr(policy_mod, "SYSTEM_POLICY", str(tmp_path / "etc-policy.json"))
    assert policy_mod.load_policy() is policy_mod.NO_POLICY
    policy_file(tmp_path / "etc-policy.json", {"default": [{"type": "reject"}]})
    assert policy_mod.load_policy().path == str(tmp_path / "etc-policy.json")
    (tmp_path / "cfg" / "containers").mkdir(parents=True)
    policy_file(tmp_path / "cfg" / "containers" / "policy.json", ACCEPT)
    assert policy_mod.load_policy().path == str(tmp_path / "cfg" / "containers" / "policy.json")


def test_the_user_policy_file_governs_a_pack_without_policy_option(tmp_path, cli_env):
    write_oci(str(tmp_path / "x"), [make_tar([Entry("f", data=b"x")])])
    (tmp_path / "cfg" / "containers").mkdir(parents=True)
    policy_file(tmp_path / "cfg" / "containers" / "policy.json", {"default": [{"type": "reject"}]})
    env = {**cli_env, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    _fails_one_line(run_cli(env, "--insecure", "pack", f"oci:{tmp_path / 'x'}", "x:1", check=False), "rejected by trust policy",
                    str(tmp_path / "cfg" / "containers" / "policy.json"))
    _nothing_stored(env, tmp_path)


def test_the_record_travels_with_push_and_pull(tmp_path, signing, cli_env):
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", signing["key"]))
    run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:a", "app:a")
    url = f"oci://{signing['host']}/store"
    run_cli(cli_env, "--insecure", "push", "app:a", url)
    env2 = {**cli_env, "CONVSTORE_STORE": str(tmp_path / "store2")}
    run_cli(env2, "--insecure", "pull", url, "app:a")
    v1 = json.loads(run_cli(cli_env, "--insecure", "inspect", "--json", "app:a").stdout)["verification"]
    v2 = json.loads(run_cli(env2, "--insecure", "inspect", "--json", "app:a").stdout)["verification"]
    assert v1 == v2 and v1["signatures"][0]["key_id"] == _key_id(signing["key"])


def test_snapshotter_and_containerd_load_apply_the_node_policy(tmp_path, signing, cli_env):
    """`convstore snapshotter` serves only accepted images' layers; `containerd-load` refuses before it
    writes anything to containerd (the address here does not even exist)."""
    from convstore.engines.layerstore import LayerMount, LayerStore
    from convstore.engines.containerd_load import load_into_containerd
    from convstore.engines.snapshotter import Snapshotter

    _pack_signed_and_unsigned(tmp_path, signing, cli_env)
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    node = Policy.load(str(policy_file(tmp_path / "node.json", sigstore_policy(signing["host"], signing["key"]))))
    digest = {n: store.manifest(f"app:{n}").layers[0].digest for n in ("a", "b")}
    snap = Snapshotter(str(tmp_path / "snaps"),
                       LayerMount(LayerStore(store, policy=node), str(tmp_path / "snaps" / "layers")))
    try:
        assert snap.layers.layer(digest["a"]) is not None and snap.layers.layer(digest["b"]) is None
    finally:
        snap.layers.close()
    with pytest.raises(SignatureRequired, match="app:b"):
        load_into_containerd(store, "app:b", str(tmp_path / "no-containerd.sock"), policy=node)
    p = run_cli(cli_env, "--insecure", "containerd-load", "--policy", str(tmp_path / "node.json"), "--address",
                str(tmp_path / "no-containerd.sock"), "app:b", check=False)
    _fails_one_line(p, "requires a sigstore signature")


@pytest.mark.parametrize("what", ["payload", "attachment"])
def test_a_registry_that_alters_the_signature_is_refused(tmp_path, signing, cli_env, what):
    """A liar in front of the registry flips a byte of the signature payload blob (its digest no longer
    matches) or of the attachment manifest: refused, nothing stored."""
    from netproxy import CountingProxy

    att = signing["digest"]["a"].replace(":", "-") + ".sig"
    body = json.loads(signing["client"].get_manifest("app", att, [OCI_MANIFEST])[0])
    payload_digest = body["layers"][0]["digest"]
    proxy = CountingProxy(signing["host"])
    proxy.fault = lambda m, p: "corrupt" if m == "GET" and (
        p.endswith(f"/blobs/{payload_digest}") if what == "payload" else p.endswith(f"/manifests/{att}")) else None
    try:
        # signed as the registry's name, fetched through the proxy's: the policy names the signed repository
        pol = policy_file(tmp_path / "policy.json", sigstore_policy(
            proxy.host, signing["key"], signedIdentity={"type": "exactRepository",
                                                        "dockerRepository": f"{signing['host']}/app"}))
        p = run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{proxy.host}/app:a", "app:a", check=False)
        assert proxy.faults_injected >= 1
        _fails_one_line(p, "content hashes to" if what == "payload" else "sigstore attachment")
        _nothing_stored(cli_env, tmp_path)
        proxy.fault = None  # the same pack through an honest proxy is accepted
        run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{proxy.host}/app:a", "app:a")
    finally:
        proxy.stop()


def test_a_re_pack_verifies_under_the_policy_the_image_was_packed_under(tmp_path, signing, cli_env):
    """verify --repair and reactivation re-pack through the library without a policy: they use the policy file
    recorded in the image (not the machine's default, which here accepts anything and verifies nothing)."""
    pol = policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", signing["key"]))
    run_cli(cli_env, "--insecure", "pack", "--policy", str(pol), f"docker://{signing['host']}/app:a", "app:a")
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    store.pack(f"docker://{signing['host']}/app:a", "app:a", reuse_layers=False)  # what a repair does
    v = store.inspect("app:a").verification
    assert v["policy"] == str(pol) and v["signatures"][0]["key_id"] == _key_id(signing["key"])
    # the recorded policy still decides: a signature it no longer accepts fails the re-pack
    policy_file(tmp_path / "policy.json", sigstore_policy(f"{signing['host']}/app", make_key(tmp_path / "o", "o")))
    with pytest.raises(SignatureInvalid):
        store.pack(f"docker://{signing['host']}/app:a", "app:a", reuse_layers=False)
    assert store.inspect("app:a").verification == v  # the old version still serves
