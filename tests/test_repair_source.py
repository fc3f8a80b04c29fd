"""A repair never changes what a name serves (issue 21 §2).

``verify --repair`` and the reactivation of an INACTIVE image re-pack from the
source recorded in the (authenticated) catalog entry.  The liar here is whoever
controls that source: the owner of the OCI layout or the registry moves the tag
to another image after the pack, and a store writer forces the re-pack by
corrupting one chunk.  The only acceptable outcomes: the old content, or a
clear refusal (FAILED with a reason naming both digests); never the new bytes
under the old name.  A user who wants the new content packs it explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import need_tool, run_cli
from imagebuilder import Entry, make_tar, write_oci

import convstore
from convstore.core.catalog import ACTIVE, FAILED, INACTIVE
from convstore.errors import ImageFailed, ImageInactive

DAY = 86400.0
OLD, NEW = b"old content\n", b"NEW content\n"


def layout(root: Path, marker: bytes) -> dict:
    return write_oci(str(root), [make_tar([Entry("who", data=marker), Entry("payload", data=os.urandom(300_000))])])


def move_tag(src: Path, other: Path) -> None:
    """What the layout's owner does: ``latest`` now names the image in ``other``."""
    for blob in (other / "blobs" / "sha256").iterdir():
        shutil.copyfile(blob, src / "blobs" / "sha256" / blob.name)
    shutil.copyfile(other / "index.json", src / "index.json")


def corrupt_one_chunk(store: convstore.Store, ref: str) -> bytes:
    """What a store writer does (no key needed): flip one byte of a chunk the image uses."""
    cid = store.load_manifest(store.entry(ref)).chunks[0].cid
    blob = bytearray(store.chunks.blob(cid))
    blob[40] ^= 1
    store.chunks.delete([cid])
    store.chunks.put(cid, bytes(blob))
    store.chunks.flush()
    return cid


def recorded_digest(store: convstore.Store, ref: str) -> str:
    """The source manifest digest the image was packed from (its sealed manifest records it)."""
    return store.load_manifest(store.entry(ref)).source["manifest_digest"]


def who(store: convstore.Store, ref: str, tmp: Path) -> bytes:
    dest = tmp / f"rootfs-{time.monotonic_ns()}"
    store.unpack_rootfs(ref, str(dest))
    return (dest / "who").read_bytes()


@pytest.fixture
def moved(tmp_path: Path) -> tuple[Path, str, str]:
    """An OCI layout packed as OLD, then (after the pack) its tag moved to NEW: (dir, old, new digest)."""
    src, other = tmp_path / "src", tmp_path / "other"
    old = layout(src, OLD)["manifest"]["digest"]
    new = layout(other, NEW)["manifest"]["digest"]
    return src, old, new


def test_cli_repair_of_a_moved_oci_tag_fails_and_keeps_the_old_content(tmp_path, cli_env, moved):
    src, old, new = moved
    run_cli(cli_env, "--insecure", "pack", f"oci:{src}", "x:1")
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    assert recorded_digest(store, "x:1") == old
    before = store.entry("x:1").manifest_digest
    move_tag(src, tmp_path / "other")
    corrupt_one_chunk(store, "x:1")

    p = run_cli(cli_env, "--insecure", "verify", "--repair", check=False)
    why = f"source oci:{src} now serves {new}, packed from {old}; pack it explicitly to take the new content"
    assert p.returncode == 1 and f"could not repair x:1: {why}" in [ln.strip() for ln in p.stdout.splitlines()], p.stdout
    assert "repaired x:1" not in p.stdout and "Traceback" not in p.stdout + p.stderr
    line = [ln for ln in run_cli(cli_env, "--insecure", "images").stdout.splitlines() if ln.startswith("x")]
    assert "FAILED" in line[0]
    # the name still points at the old version; reading it is refused in one line, never the new bytes
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    e = store.entry("x:1")
    assert (e.state, e.manifest_digest, e.reason) == (FAILED, before, why)
    p = run_cli(cli_env, "--insecure", "cat", "x:1", "/who", check=False)
    assert p.returncode == 1 and p.stdout == "" and p.stderr == f"convstore: error: image x:1 is FAILED: {why}\n"

    # the user who wants the new content packs it explicitly: that still works
    run_cli(cli_env, "--insecure", "pack", f"oci:{src}", "x:1")
    assert run_cli(cli_env, "--insecure", "cat", "x:1", "/who").stdout == NEW.decode()


def test_api_repair_of_a_moved_oci_tag_fails_and_keeps_the_old_content(tmp_path, store, moved):
    src, old, new = moved
    store.pack(f"oci:{src}", "x:1")
    assert who(store, "x:1", tmp_path) == OLD
    before = store.entry("x:1")
    move_tag(src, tmp_path / "other")
    corrupt_one_chunk(store, "x:1")

    r = store.verify("x:1", repair=True)
    assert r.repaired == [] and new in r.not_repaired["x:1"] and old in r.not_repaired["x:1"]
    e = store.entry("x:1")
    assert e.state == FAILED and e.manifest_digest == before.manifest_digest
    assert e.reason == f"source oci:{src} now serves {new}, packed from {old}; pack it explicitly to take the new content"
    with pytest.raises(ImageFailed, match=f"now serves {new}, packed from {old}"):
        store.manifest("x:1")
    # nothing new was published: no other manifest than the old one is named, no new version under the name
    assert [h["state"] for h in e.history][-1] == FAILED and e.seq > before.seq


def test_repair_with_the_tag_back_restores_the_old_content(tmp_path, store, moved):
    """The check compares, it does not refuse everything: while the source still serves what was packed,
    the repair goes through; after the tag moves, the same repair is refused."""
    src, old, new = moved
    store.pack(f"oci:{src}", "x:1")
    saved = tmp_path / "saved-index.json"
    shutil.copyfile(src / "index.json", saved)
    corrupt_one_chunk(store, "x:1")
    assert store.verify("x:1", repair=True).repaired == ["x:1"]
    assert who(store, "x:1", tmp_path) == OLD and store.entry("x:1").state == ACTIVE
    move_tag(src, tmp_path / "other")
    corrupt_one_chunk(store, "x:1")
    assert "x:1" in store.verify("x:1", repair=True).not_repaired
    with pytest.raises(ImageFailed):
        who(store, "x:1", tmp_path)
    # refresh does not bring it back while the tag names the other image ...
    assert store.refresh() == [] and store.entry("x:1").state == FAILED
    # ... and does once the source serves what was packed again; a repair then heals the chunk
    shutil.copyfile(saved, src / "index.json")
    [ch] = store.refresh()
    assert (ch.old, ch.new) == (FAILED, ACTIVE)
    assert store.verify("x:1", repair=True).repaired == ["x:1"]
    assert who(store, "x:1", tmp_path) == OLD


def test_repair_from_another_store_cannot_change_content(tmp_path, keyfile, moved):
    """``--from STORE``: chunks copied from another store are checked against our own manifest; a liar
    store whose chunk file holds another (valid) chunk is not taken, and the source fallback refuses."""
    src, old, new = moved
    a = convstore.Store.open(str(tmp_path / "a"), f"file:{keyfile}", insecure=True)
    b = convstore.Store.open(str(tmp_path / "b"), f"file:{keyfile}", insecure=True)
    a.pack(f"oci:{src}", "x:1")
    b.pack(f"oci:{tmp_path / 'other'}", "y:1")
    ids = [c.cid for c in a.load_manifest(a.entry("x:1")).chunks]
    other_ids = [c.cid for c in b.load_manifest(b.entry("y:1")).chunks]
    # the liar: b serves, under x:1's chunk id, the blob of one of the NEW image's chunks
    cid = ids[0]
    b.chunks.put(cid, b.chunks.blob(other_ids[0]))
    b.chunks.flush()
    a.chunks.delete([cid])
    a.chunks.flush()
    move_tag(src, tmp_path / "other")
    r = a.verify("x:1", repair=True, repair_from=b)
    assert r.repaired == [] and f"now serves {new}, packed from {old}" in r.not_repaired["x:1"]
    assert not a.chunks.has(cid)
    assert a.entry("x:1").state == FAILED


def test_cli_reactivation_of_a_moved_source_fails_in_the_worker(tmp_path, cli_env, moved):
    """The read that meets an INACTIVE image starts a real background re-pack (convstore.worker);
    the source moved meanwhile: the image ends FAILED naming both digests, never the new bytes."""
    src, old, new = moved
    run_cli(cli_env, "--insecure", "pack", f"oci:{src}", "x:1")
    later = dict(cli_env, CONVSTORE_NOW=str(time.time() + 30 * DAY))
    assert "ACTIVE -> INACTIVE" in run_cli(later, "--insecure", "refresh").stdout
    run_cli(later, "--insecure", "gc")
    move_tag(src, tmp_path / "other")
    p = run_cli(later, "--insecure", "cat", "x:1", "/who", check=False)
    assert p.returncode == 1 and "being reactivated" in p.stderr
    deadline = time.monotonic() + 120
    while True:
        states = run_cli(later, "--insecure", "images").stdout.split()
        if "FAILED" in states or "ACTIVE" in states:
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.1)  # polling a condition (bounded), not ordering events
    why = f"source oci:{src} now serves {new}, packed from {old}; pack it explicitly to take the new content"
    p = run_cli(later, "--insecure", "cat", "x:1", "/who", check=False)
    assert p.returncode == 1 and p.stdout == "" and p.stderr == f"convstore: error: image x:1 is FAILED: {why}\n"


def test_api_reactivation_of_a_moved_source_fails(tmp_path, keyfile, moved):
    """The same through the API, with the store's own reactivator (a real background worker)."""
    src, old, new = moved
    now = [1_800_000_000.0]
    s = convstore.Store.open(str(tmp_path / "store"), f"file:{keyfile}", insecure=True, clock=lambda: now[0],
                             inactive_after=14 * DAY)
    s.pack(f"oci:{src}", "x:1")
    before = s.entry("x:1").manifest_digest
    now[0] += 15 * DAY
    assert [(c.old, c.new) for c in s.refresh()] == [(ACTIVE, INACTIVE)]
    s.gc()
    move_tag(src, tmp_path / "other")
    with pytest.raises(ImageInactive):
        s.manifest("x:1")
    deadline = time.monotonic() + 120
    while s.entry("x:1").state not in (ACTIVE, FAILED):  # the worker's end, polled with a bound
        assert time.monotonic() < deadline, s.entry("x:1")
        time.sleep(0.1)
    e = s.entry("x:1")
    assert e.state == FAILED and e.manifest_digest == before and f"now serves {new}, packed from {old}" in e.reason
    with pytest.raises(ImageFailed, match=f"now serves {new}, packed from {old}"):
        who(s, "x:1", tmp_path)


def test_entry_without_recorded_digests_uses_its_sealed_manifest_or_refuses(tmp_path, store, moved):
    """An entry written before the digests were recorded (catalog entry version 2) falls back to the
    digests in its authenticated manifest; with that manifest gone it refuses to re-pack at all."""
    from dataclasses import replace

    src, old, new = moved
    store.pack(f"oci:{src}", "x:1")
    store.update_entry("x:1", lambda c: replace(c, source_manifest="", source_config=""))  # as an old writer left it
    move_tag(src, tmp_path / "other")
    corrupt_one_chunk(store, "x:1")
    r = store.verify("x:1", repair=True)
    assert f"now serves {new}, packed from {old}" in r.not_repaired["x:1"]
    # and with its manifest gone too (a store writer deletes it): no digest to compare, no re-pack
    e = store.entry("x:1")
    store.objects.delete("manifests/" + e.manifest_digest.split(":", 1)[1])
    r = store.verify("x:1", repair=True)
    assert "records no source digest" in r.not_repaired["x:1"]
    assert store.entry("x:1").state == FAILED and store.entry("x:1").manifest_digest == e.manifest_digest


def test_repair_of_a_moved_registry_tag_reads_by_digest_or_fails(tmp_path, cli_env, registry, moved):
    """The same with a real registry: skopeo pushes the old image, the pack takes it, skopeo moves the
    tag to the new image and a chunk is corrupted.  The repair reads the recorded digest, so while the
    registry still holds it the old content comes back; once it is deleted, the tag is compared and the
    repair refuses the new content, naming both digests."""
    skopeo = need_tool("skopeo")
    src, _old, _new = moved
    dest = f"docker://{registry.host}/app:1"

    def push(layout_dir: Path) -> str:
        subprocess.run([skopeo, "copy", "-q", "--dest-tls-verify=false", f"oci:{layout_dir}:latest", dest],
                       check=True, capture_output=True)
        p = subprocess.run([skopeo, "inspect", "--tls-verify=false", dest], check=True, capture_output=True,
                           text=True)
        return json.loads(p.stdout)["Digest"]

    old = push(src)
    run_cli(cli_env, "--insecure", "pack", dest, "r:1")
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    assert recorded_digest(store, "r:1") == old
    new = push(tmp_path / "other")
    assert new != old
    corrupt_one_chunk(store, "r:1")
    p = run_cli(cli_env, "--insecure", "verify", "--repair", check=False)
    assert "repaired r:1" in p.stdout, (p.stdout, p.stderr)
    assert run_cli(cli_env, "--insecure", "cat", "r:1", "/who").stdout == OLD.decode()
    assert convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True).entry("r:1").source == dest

    # the registry's owner deletes the old manifest: only the moved tag is left
    subprocess.run([skopeo, "delete", "--tls-verify=false", f"docker://{registry.host}/app@{old}"], check=True,
                   capture_output=True)
    corrupt_one_chunk(store, "r:1")
    p = run_cli(cli_env, "--insecure", "verify", "--repair", check=False)
    why = f"source {dest} now serves {new}, packed from {old}; pack it explicitly to take the new content"
    assert p.returncode == 1 and f"could not repair r:1: {why}" in [ln.strip() for ln in p.stdout.splitlines()], \
        p.stdout
    p = run_cli(cli_env, "--insecure", "cat", "r:1", "/who", check=False)
    assert p.returncode == 1 and p.stderr == f"convstore: error: image r:1 is FAILED: {why}\n"
    run_cli(cli_env, "--insecure", "pack", dest, "r:1")  # explicit: takes the new content
    assert run_cli(cli_env, "--insecure", "cat", "r:1", "/who").stdout == NEW.decode()


class LyingRegistry:
    """A registry front on 127.0.0.1 that forwards every read to a real registry, but once ``lie`` is set
    answers every manifest request (by tag or by digest) with the manifest ``lie`` names."""

    def __init__(self, upstream: str):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.lie: str | None = None
        #: a racer: run once, when the first manifest request arrives (before it is answered)
        self.on_manifest: Callable[[], None] | None = None
        front = self
        import threading

        hook_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path
                if "/manifests/" in path:
                    with hook_lock:
                        hook, front.on_manifest = front.on_manifest, None
                    if hook is not None:
                        hook()
                if front.lie and "/manifests/" in path:
                    path = path.rsplit("/manifests/", 1)[0] + "/manifests/" + front.lie
                c = http.client.HTTPConnection(upstream, timeout=60)
                try:
                    c.request(self.command, path, headers={k: v for k, v in self.headers.items()
                                                           if k.lower() not in ("connection", "host")})
                    r = c.getresponse()
                    data = r.read()
                finally:
                    c.close()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("connection", "content-length", "transfer-encoding", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_repair_from_a_registry_that_lies_about_a_digest_fails(tmp_path, store, registry, moved):
    """A registry that answers the recorded digest with another image's manifest (no tag moved at all):
    the repair reads by digest, computes the digest of what it got, and refuses it."""
    skopeo = need_tool("skopeo")
    src, _old, _new = moved
    for d, tag in ((src, "1"), (tmp_path / "other", "2")):
        subprocess.run([skopeo, "copy", "-q", "--dest-tls-verify=false", f"oci:{d}:latest",
                        f"docker://{registry.host}/app:{tag}"], check=True, capture_output=True)
    liar = LyingRegistry(registry.host)
    try:
        source = f"docker://{liar.host}/app:1"
        store.pack(source, "r:1")
        old = recorded_digest(store, "r:1")
        new = json.loads(subprocess.run([skopeo, "inspect", "--tls-verify=false", f"docker://{registry.host}/app:2"],
                                        check=True, capture_output=True, text=True).stdout)["Digest"]
        liar.lie = new
        corrupt_one_chunk(store, "r:1")
        r = store.verify("r:1", repair=True)
        # the read by the recorded digest is answered with other bytes (the digest check names both)
        assert r.repaired == [] and list(r.not_repaired) == ["r:1"]
        why = r.not_repaired["r:1"]
        assert why.startswith(f"source {source} does not serve what was packed") and old in why and new in why
        e = store.entry("r:1")
        assert (e.state, e.reason) == (FAILED, why)
        with pytest.raises(ImageFailed, match="does not serve what was packed"):
            who(store, "r:1", tmp_path)
        liar.lie = None  # honest again: refresh recovers it and the repair brings the old content back
        store.refresh()
        assert store.verify("r:1", repair=True).repaired == ["r:1"] and who(store, "r:1", tmp_path) == OLD
    finally:
        liar.stop()


def test_cli_refresh_keeps_an_image_failed_while_its_source_serves_other_content(tmp_path, cli_env, moved):
    """A FAILED image (its source was gone) whose source comes back with the tag moved stays FAILED at
    refresh, with the reason naming both digests; it comes back once the source serves what was packed."""
    src, old, new = moved
    run_cli(cli_env, "--insecure", "pack", f"oci:{src}", "x:1")
    shutil.move(src, tmp_path / "away")
    assert "x:1: ACTIVE -> FAILED (source" in run_cli(cli_env, "--insecure", "refresh").stdout
    shutil.copytree(tmp_path / "away", src)
    move_tag(src, tmp_path / "other")
    why = f"source oci:{src} now serves {new}, packed from {old}; pack it explicitly to take the new content"
    p = run_cli(cli_env, "--insecure", "refresh")
    assert p.stdout == f"x:1: FAILED -> FAILED ({why})\n" and p.stderr == ""
    p = run_cli(cli_env, "--insecure", "cat", "x:1", "/who", check=False)
    assert p.returncode == 1 and p.stderr == f"convstore: error: image x:1 is FAILED: {why}\n"
    shutil.copyfile(tmp_path / "away" / "index.json", src / "index.json")  # the tag is back on the packed image
    assert run_cli(cli_env, "--insecure", "refresh").stdout == "x:1: FAILED -> ACTIVE (source and key are available again)\n"
    assert run_cli(cli_env, "--insecure", "cat", "x:1", "/who").stdout == OLD.decode()


def test_a_copied_image_is_repaired_only_from_what_was_packed(tmp_path, keyfile, moved):
    """A copy into another store (push/pull) records the source digests of the image it copies, so a
    repair there refuses the moved source too."""
    from convstore.transfer import copy_image

    src, old, new = moved
    a = convstore.Store.open(str(tmp_path / "a"), f"file:{keyfile}", insecure=True)
    b = convstore.Store.open(str(tmp_path / "b"), f"file:{keyfile}", insecure=True)
    a.pack(f"oci:{src}", "x:1")
    copy_image(a, b, "x:1")
    move_tag(src, tmp_path / "other")
    corrupt_one_chunk(b, "x:1")
    r = b.verify("x:1", repair=True)
    assert r.repaired == [] and f"now serves {new}, packed from {old}" in r.not_repaired["x:1"]
    assert b.entry("x:1").state == FAILED
    with pytest.raises(ImageFailed):
        who(b, "x:1", tmp_path)
    assert b.entry("x:1").source_manifest == old  # recorded by the copy itself


def test_oci_layout_repair_reads_the_recorded_digest_while_the_layout_holds_it(tmp_path, cli_env, moved):
    """``latest`` moved to the new image, but the layout still lists the packed one (under ``v1``): the
    repair reads the index entry with the recorded manifest digest and the name keeps its old content.
    Once that entry is gone too, the repair refuses (FAILED, both digests named)."""
    src, old, new = moved
    run_cli(cli_env, "--insecure", "pack", f"oci:{src}:latest", "x:1")
    index = json.loads((src / "index.json").read_text())
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "v1"
    move_tag(src, tmp_path / "other")
    moved_index = json.loads((src / "index.json").read_text())
    (src / "index.json").write_text(json.dumps({**moved_index,
                                                "manifests": index["manifests"] + moved_index["manifests"]}))
    store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
    corrupt_one_chunk(store, "x:1")
    assert "repaired x:1" in run_cli(cli_env, "--insecure", "verify", "--repair").stdout
    assert run_cli(cli_env, "--insecure", "cat", "x:1", "/who").stdout == OLD.decode()
    e = store.entry("x:1")
    assert e.state == ACTIVE and e.source == f"oci:{src}:latest" and e.source_manifest == old

    (src / "index.json").write_text(json.dumps(moved_index))  # the old entry is dropped as well
    corrupt_one_chunk(store, "x:1")
    p = run_cli(cli_env, "--insecure", "verify", "--repair", check=False)
    why = f"source oci:{src}:latest now serves {new}, packed from {old}; pack it explicitly to take the new content"
    assert p.returncode == 1 and f"could not repair x:1: {why}" in [ln.strip() for ln in p.stdout.splitlines()]
    assert run_cli(cli_env, "--insecure", "cat", "x:1", "/who", check=False).stderr == f"convstore: error: image x:1 is FAILED: {why}\n"


def _push(registry, layout_dir: Path, tag: str) -> str:
    skopeo = need_tool("skopeo")
    dest = f"docker://{registry.host}/app:{tag}"
    subprocess.run([skopeo, "copy", "-q", "--dest-tls-verify=false", f"oci:{layout_dir}:latest", dest], check=True,
                   capture_output=True)
    return json.loads(subprocess.run([skopeo, "inspect", "--tls-verify=false", dest], check=True, capture_output=True,
                                     text=True).stdout)["Digest"]


def test_an_explicit_pack_that_lands_during_a_repair_is_never_undone(tmp_path, cli_env, registry, moved):
    """The racer: while the repair reads its (unchanged) source, the user packs other content into the name
    (another process, the CLI).  The repair had read the old entry; it must not publish the old content over
    the explicit pack, nor re-create the name: it drops its re-pack and the name keeps what was packed last."""
    src, old, _new = moved
    _push(registry, src, "1")
    front = LyingRegistry(registry.host)  # honest: only the hook makes the race happen when it must
    try:
        store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
        store.pack(f"docker://{front.host}/app:1", "x:1")
        before = store.entry("x:1").manifest_digest
        corrupt_one_chunk(store, "x:1")
        explicit: list[subprocess.CompletedProcess[str]] = []
        front.on_manifest = lambda: explicit.append(run_cli(cli_env, "--insecure", "pack", f"oci:{tmp_path / 'other'}", "x:1",
                                                            check=False))
        r = store.verify("x:1", repair=True)
        assert explicit and explicit[0].returncode == 0, explicit
        e = store.entry("x:1")
        assert e.state == ACTIVE and e.manifest_digest != before and e.source == f"oci:{tmp_path / 'other'}"
        assert who(store, "x:1", tmp_path) == NEW  # the explicit pack's content, not the repair's
        assert r.repaired == [] and "packed again while it was being re-packed" in r.not_repaired["x:1"], r
    finally:
        front.stop()


def test_a_repair_that_meets_an_explicit_pack_does_not_fail_it(tmp_path, cli_env, registry, moved):
    """The same race where the repair's source has moved: the repair refuses (SourceChanged), but the name now
    holds what the user packed explicitly meanwhile; that must stay ACTIVE, not be marked FAILED for a source
    it was never packed from."""
    src, old, _new = moved
    _push(registry, src, "1")
    new = _push(registry, tmp_path / "other", "2")
    front = LyingRegistry(registry.host)
    try:
        store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
        store.pack(f"docker://{front.host}/app:1", "x:1")
        corrupt_one_chunk(store, "x:1")
        front.lie = new  # the source now serves another image
        explicit: list[subprocess.CompletedProcess[str]] = []
        front.on_manifest = lambda: explicit.append(run_cli(cli_env, "--insecure", "pack", f"oci:{tmp_path / 'other'}", "x:1",
                                                            check=False))
        r = store.verify("x:1", repair=True)
        assert explicit and explicit[0].returncode == 0, explicit
        assert r.repaired == [] and "x:1" in r.not_repaired
        e = store.entry("x:1")
        assert (e.state, e.source) == (ACTIVE, f"oci:{tmp_path / 'other'}"), (e.state, e.reason)
        assert who(store, "x:1", tmp_path) == NEW
    finally:
        front.stop()


def test_a_copy_into_the_name_during_a_repair_is_never_undone(tmp_path, keyfile, moved):
    """A copy (push/pull) into the name lands while the repair is packing (it takes no pack lock): the repair
    must not publish its old content over it when it finishes."""
    from convstore.transfer import copy_image

    src, _old, _new = moved
    a = convstore.Store.open(str(tmp_path / "a"), f"file:{keyfile}", insecure=True)
    b = convstore.Store.open(str(tmp_path / "b"), f"file:{keyfile}", insecure=True)
    a.pack(f"oci:{src}", "x:1")
    # one convergence domain in both stores (a copy into a store with another "default" is DomainConflict)
    b.convergence_domains.adopt(a.convergence_domains, "default", a.domains()[0]["id"])
    b.pack(f"oci:{tmp_path / 'other'}", "y:1")
    copied = b.entry("y:1")

    class CopyMeanwhile:
        """The racer, run once the repair has started packing."""

        def start(self, description: str, total: int | None) -> None:
            copy_image(b, a, "y:1", "x:1")

        def advance(self, n: int) -> None:
            pass

        def finish(self) -> None:
            pass

    with pytest.raises(convstore.ConvstoreError, match="packed again while it was being re-packed"):
        a.repack("x:1", repair=True, progress=CopyMeanwhile())
    e = a.entry("x:1")
    assert e.state == ACTIVE and e.pending is None and e.source_manifest == copied.source_manifest
    assert who(a, "x:1", tmp_path) == NEW


def test_refresh_judges_only_the_version_whose_source_it_checked(tmp_path, cli_env, registry, moved):
    """refresh checks an entry's source, then applies the verdict under the entry's lock: if the user packed
    the name again meanwhile (another process), the verdict on the old version's source must not mark the
    new version FAILED (nor bring a FAILED one back)."""
    src, _old, _new = moved
    _push(registry, src, "1")
    front = LyingRegistry(registry.host)
    try:
        store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
        store.pack(f"docker://{front.host}/app:1", "x:1")
        front.lie = "sha256:" + "0" * 64  # the old source is gone (the registry answers 404)
        explicit: list[subprocess.CompletedProcess[str]] = []
        front.on_manifest = lambda: explicit.append(run_cli(cli_env, "--insecure", "pack", f"oci:{tmp_path / 'other'}", "x:1",
                                                            check=False))
        store.refresh()
        assert explicit and explicit[0].returncode == 0, explicit
        e = store.entry("x:1")
        assert (e.state, e.source) == (ACTIVE, f"oci:{tmp_path / 'other'}"), (e.state, e.reason)
        assert who(store, "x:1", tmp_path) == NEW
        assert store.refresh() == []  # its own source is there: nothing to say about it
    finally:
        front.stop()


def test_a_name_removed_during_a_repair_is_not_re_created(tmp_path, cli_env, registry, moved):
    """The racer removes the name (convstore rm, another process) while the repair reads its source: the
    repair must not bring the removed image back under the name."""
    src, _old, _new = moved
    _push(registry, src, "1")
    front = LyingRegistry(registry.host)
    try:
        store = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"], insecure=True)
        store.pack(f"docker://{front.host}/app:1", "x:1")
        corrupt_one_chunk(store, "x:1")
        removed: list[subprocess.CompletedProcess[str]] = []
        front.on_manifest = lambda: removed.append(run_cli(cli_env, "--insecure", "rm", "x:1", check=False))
        r = store.verify("x:1", repair=True)
        assert removed and removed[0].returncode == 0, removed
        assert r.repaired == [] and "was removed while it was being re-packed" in r.not_repaired["x:1"], r
        with pytest.raises(convstore.ImageNotFound):
            store.entry("x:1")
        assert "x:1" not in run_cli(cli_env, "--insecure", "images").stdout
    finally:
        front.stop()
