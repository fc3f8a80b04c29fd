"""Image states, refresh, rm, gc and verify."""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import replace

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.core.catalog import ACTIVE, FAILED, INACTIVE, PENDING
from convstore.errors import ImageFailed, ImageInactive, ImagePending, KeyAccessDenied

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cstore(tmp_path, keyfile, clock):
    s = convstore.Store.open(str(tmp_path / "store"), f"file:{keyfile}", clock=clock, inactive_after=14 * DAY)
    s.reactivator = lambda e: s.repack(e.ref)  # in-process, for determinism
    return s


def shared_and_own(tmp_path, name, shared):
    own = [Entry(f"{name}-{i}", data=os.urandom(100_000)) for i in range(5)]
    write_oci(str(tmp_path / name), [make_tar(shared), make_tar(own)])
    return str(tmp_path / name)


def test_state_walk(tmp_path, cstore, clock):
    src = shared_and_own(tmp_path, "a", [Entry("s", data=os.urandom(300_000))])
    cstore.pack(f"oci:{src}", "a:1")
    e = cstore.entry("a:1")
    assert e.state == ACTIVE and [h["state"] for h in e.history] == [PENDING, ACTIVE]

    # unread for 15 days: INACTIVE (refresh), and its unshared chunks are reclaimable
    clock.now += 15 * DAY
    [ch] = cstore.refresh()
    assert (ch.old, ch.new) == (ACTIVE, INACTIVE)
    r = cstore.gc()
    assert r.reclaimed_images == ["a:1"] and r.chunks_removed > 0
    # first read: refused, starts the re-pack, which makes it ACTIVE again
    with pytest.raises(ImageInactive, match="reactivated"):
        cstore.unpack_rootfs("a:1", str(tmp_path / "r1"))
    assert cstore.entry("a:1").state == ACTIVE
    cstore.unpack_rootfs("a:1", str(tmp_path / "r1"))
    assert cstore.verify().clean

    # the source disappears: FAILED with the reason; reads fail with it
    shutil.move(src, src + ".moved")
    [ch] = cstore.refresh()
    assert ch.new == FAILED and "no longer available" in ch.reason
    with pytest.raises(ImageFailed, match="no longer available"):
        cstore.manifest("a:1")
    shutil.move(src + ".moved", src)
    [ch] = cstore.refresh()
    assert ch.new == ACTIVE
    cstore.manifest("a:1")
    states = [h["state"] for h in cstore.entry("a:1").history]
    assert states == [PENDING, ACTIVE, INACTIVE, PENDING, ACTIVE, FAILED, ACTIVE]


def test_reactivation_of_vanished_source_fails(tmp_path, cstore, clock):
    src = shared_and_own(tmp_path, "a", [])
    cstore.pack(f"oci:{src}", "a:1")
    shutil.rmtree(src)
    clock.now += 20 * DAY
    with pytest.raises((ImageInactive, convstore.SourceNotFound)):
        cstore.manifest("a:1")
    e = cstore.entry("a:1")
    assert e.state == FAILED and "no longer exists" in e.reason


def test_key_denied_is_failed(tmp_path, cstore, keyfile):
    src = shared_and_own(tmp_path, "a", [])
    cstore.pack(f"oci:{src}", "a:1")
    # another master key cannot even authenticate the catalog: every read is refused, nothing changes
    convstore.LocalKeyFile(str(tmp_path / "other.key"))  # another key that exists
    other = convstore.Store.open(cstore.objects.root, f"file:{tmp_path / 'other.key'}")
    with pytest.raises(KeyAccessDenied, match="metadata key is sealed under master key"):
        other.manifest("a:1")
    with pytest.raises(KeyAccessDenied):
        other.refresh()
    assert cstore.entry("a:1").state == ACTIVE
    # the image's own data key denied (a KMS grant withdrawn for it alone): FAILED, and back with the key
    e = cstore.entry("a:1")
    cstore.update_entry("a:1", lambda c: replace(c, wrapped_key=bytes(len(e.wrapped_key))) if c else c)
    [ch] = cstore.refresh()
    assert ch.new == FAILED and "key" in ch.reason
    with pytest.raises(ImageFailed):
        cstore.manifest("a:1")
    cstore.update_entry("a:1", lambda c: replace(c, wrapped_key=e.wrapped_key) if c else c)
    [ch] = cstore.refresh()  # the right key is back
    assert ch.new == ACTIVE


def _fifo_source(tmp_path, name):
    """An OCI layout whose layer blob is a FIFO: a pack of it blocks until fed."""
    tar = make_tar([Entry("slow", data=os.urandom(200_000))])
    d = write_oci(str(tmp_path / name), [tar], compression="none")
    p = os.path.join(tmp_path / name, "blobs", "sha256", d["layers"][0]["digest"].split(":")[1])
    os.unlink(p)
    os.mkfifo(p)
    return str(tmp_path / name), p, tar


def test_pending_update_keeps_serving_previous_version(tmp_path, cstore, cli_env, keyfile):
    first = shared_and_own(tmp_path, "v1", [])
    cstore.pack(f"oci:{first}", "app:1")
    before = cstore.entry("app:1").manifest_digest
    src, fifo, tar = _fifo_source(tmp_path, "v2")
    for ref in ("app:1", "new:1"):
        p = __import__("subprocess").Popen(
            [__import__("sys").executable, "-m", "convstore.cli", "pack", f"oci:{src}", ref],
            env=dict(cli_env, CONVSTORE_STORE=cstore.objects.root))
        deadline = time.monotonic() + 20
        while not cstore.entry(ref if ref == "app:1" else ref).pending if ref == "app:1" else \
                not _exists(cstore, ref):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if ref == "app:1":
            e = cstore.entry("app:1")
            assert e.state == ACTIVE and e.pending and "update pending" in e.display_state()
            assert cstore.manifest("app:1") and cstore.entry("app:1").manifest_digest == before
            with pytest.raises(ImagePending):
                cstore.rm("app:1")
        else:
            e = cstore.entry("new:1")
            assert e.state == PENDING and not e.complete
            with pytest.raises(ImagePending, match="being packed"):
                cstore.manifest("new:1")
            out = run_cli(dict(cli_env, CONVSTORE_STORE=cstore.objects.root), "images").stdout
            assert "PENDING" in out
        with open(fifo, "wb") as f:
            f.write(tar)
        assert p.wait(timeout=60) == 0
        if ref == "app:1":
            src, fifo, tar = _fifo_source(tmp_path, "v3")
    assert cstore.entry("app:1").manifest_digest != before
    assert cstore.entry("new:1").state == ACTIVE


def _exists(store, ref):
    try:
        store.entry(ref)
        return True
    except convstore.ImageNotFound:
        return False


def test_gc_frees_exactly_what_removed_images_used(tmp_path, cstore):
    shared = [Entry("shared", data=os.urandom(400_000))]
    for n in ("a", "b", "c"):
        cstore.pack(f"oci:{shared_and_own(tmp_path, n, shared)}", f"{n}:1")
    used = {n: {c.cid for c in cstore.manifest(f"{n}:1").chunks} for n in ("a", "b", "c")}
    only_removed = (used["a"] | used["b"]) - used["c"]
    expect = sum(cstore.chunks.size(c) for c in only_removed)
    manifests = sum(cstore.objects.size("manifests/" + cstore.entry(f"{n}:1").manifest_digest.split(":")[1])
                    for n in ("a", "b"))
    cstore.rm("a:1")
    cstore.rm("b:1")
    dry = cstore.gc(dry_run=True)
    assert dry.chunk_bytes_freed == expect and dry.chunks_removed == len(only_removed)
    assert len(list(cstore.chunks.ids())) == len(used["a"] | used["b"] | used["c"])  # nothing yet
    r = cstore.gc()
    assert (r.chunks_removed, r.chunk_bytes_freed, r.manifest_bytes_freed) == (len(only_removed), expect, manifests)
    assert r.store_bytes_after < r.store_bytes_before
    assert cstore.verify().clean
    cstore.unpack_oci("c:1", f"oci:{tmp_path / 'out'}")
    assert cstore.gc().chunks_removed == 0


def test_gc_waits_for_a_pack_in_progress(tmp_path, cstore):
    cstore.pack(f"oci:{shared_and_own(tmp_path, 'a', [])}", "a:1")
    cstore.rm("a:1")
    src, fifo, tar = _fifo_source(tmp_path, "slow")
    t = threading.Thread(target=lambda: cstore.pack(f"oci:{src}", "slow:1"))
    t.start()
    deadline = time.monotonic() + 30
    while not _exists(cstore, "slow:1"):  # PENDING: the pack holds the gc lock shared
        assert time.monotonic() < deadline
        time.sleep(0.02)
    done = []
    g = threading.Thread(target=lambda: done.append(cstore.gc()))
    g.start()
    time.sleep(0.5)
    assert not done  # gc is waiting for the pack's shared lock
    with open(fifo, "wb") as f:
        f.write(tar)
    t.join(30)
    g.join(30)
    assert done and cstore.verify().clean
    cstore.unpack_oci("slow:1", f"oci:{tmp_path / 'o'}")


def test_verify_reports_and_repairs(tmp_path, cstore, cli_env):
    shared = [Entry("shared", data=os.urandom(300_000))]
    for n in ("a", "b"):
        cstore.pack(f"oci:{shared_and_own(tmp_path, n, shared)}", f"{n}:1")
    ma, mb = cstore.manifest("a:1"), cstore.manifest("b:1")
    common = ({c.cid for c in ma.chunks} & {c.cid for c in mb.chunks}).pop()
    only_a = ({c.cid for c in ma.chunks} - {c.cid for c in mb.chunks}).pop()
    blob = bytearray(cstore.chunks.blob(common))
    blob[40] ^= 1
    cstore.chunks.delete([common, only_a])
    cstore.chunks.put(common, bytes(blob))
    cstore.chunks.flush()
    env = dict(cli_env, CONVSTORE_STORE=cstore.objects.root)
    p = run_cli(env, "verify", check=False)
    assert p.returncode == 1 and f"corrupt chunk {common.hex()} used by a:1, b:1" in p.stdout
    # the corrupt chunk was quarantined (kept aside as evidence, no longer a dedup target)
    cstore = convstore.Store.open(cstore.objects.root, cstore.options.key)  # sees the other process's changes
    assert not cstore.chunks.has(common) and cstore.objects.get("quarantine/" + common.hex()) == bytes(blob)
    r = cstore.verify()
    assert not r.clean and r.corrupt == {}
    assert r.missing == {common.hex(): ["a:1", "b:1"], only_a.hex(): ["a:1"]}
    p = run_cli(env, "verify", "--repair")
    assert "repaired a:1" in p.stdout and "repaired b:1" in p.stdout
    assert cstore.verify().clean


def test_cli_rm_gc_refresh(tmp_path, cli_env):
    write_oci(str(tmp_path / "a"), [rich_layer()])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'a'}", "x:1")
    assert "no changes" in run_cli(cli_env, "refresh").stdout
    later = dict(cli_env, CONVSTORE_NOW=str(time.time() + 30 * DAY))
    assert "ACTIVE -> INACTIVE" in run_cli(later, "refresh").stdout
    assert "INACTIVE" in run_cli(later, "images").stdout
    run_cli(cli_env, "rm", "x:1")
    assert "freed" in run_cli(cli_env, "gc").stdout
    p = run_cli(cli_env, "rm", "x:1", check=False)
    assert p.returncode == 1 and "no image" in p.stderr


def test_gc_cleans_dead_writers_leftovers(tmp_path, cstore):
    cstore.pack(f"oci:{shared_and_own(tmp_path, 'a', [])}", "a:1")
    root = cstore.objects.root
    old, fresh = os.path.join(root, "tmp", "dead.tmp"), os.path.join(root, "tmp", "live.tmp")
    orphan = os.path.join(root, "packs", "0" * 32 + ".pack")
    for p in (old, fresh, orphan):
        open(p, "wb").write(b"x" * 100)
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(orphan, (past, past))
    r = cstore.gc()
    assert r.other_files_removed == 2
    assert not os.path.exists(old) and not os.path.exists(orphan) and os.path.exists(fresh)
    assert cstore.verify().clean


def test_gc_waits_for_a_copy_into_the_store(tmp_path, cstore, keyfile):
    """A pull relies on chunks it found in the destination: gc must not sweep
    them before the pulled image is published."""
    from convstore.transfer import copy_image

    shared = [Entry("shared", data=os.urandom(400_000))]
    src = convstore.Store.open(str(tmp_path / "src-store"), f"file:{keyfile}")
    src.pack(f"oci:{shared_and_own(tmp_path, 'a', shared)}", "a:1")
    # one convergence domain in both stores (a copy into a store with another "default" is DomainConflict)
    cstore.convergence_domains.adopt(src.convergence_domains, "default", src.domains()[0]["id"])
    cstore.pack(f"oci:{shared_and_own(tmp_path, 'b', shared)}", "b:1")
    cstore.rm("b:1")  # the shared chunks are now garbage in the destination, until a:1 arrives
    slow = src.throttled(0.05, 1e9)
    order = []
    t = threading.Thread(target=lambda: (copy_image(slow, cstore, "a:1"), order.append("copy")))
    t.start()
    time.sleep(0.2)
    g = threading.Thread(target=lambda: (cstore.gc(), order.append("gc")))
    g.start()
    t.join(60)
    g.join(60)
    assert order == ["copy", "gc"]
    assert cstore.verify().clean
    cstore.unpack_oci("a:1", f"oci:{tmp_path / 'out'}")


def test_cli_reactivation_runs_in_a_worker(tmp_path, cli_env):
    """The read that meets an INACTIVE image starts a real background re-pack (convstore.worker),
    with the store and key given only in the environment, and the image comes back ACTIVE."""
    write_oci(str(tmp_path / "a"), [rich_layer(), make_tar([Entry("hello", data=b"again\n")])])
    run_cli(cli_env, "pack", f"oci:{tmp_path / 'a'}", "x:1")
    later = dict(cli_env, CONVSTORE_NOW=str(time.time() + 30 * DAY))
    assert "ACTIVE -> INACTIVE" in run_cli(later, "refresh").stdout
    run_cli(later, "gc")
    p = run_cli(later, "cat", "x:1", "/hello", check=False)
    assert p.returncode == 1 and "being reactivated" in p.stderr
    deadline = time.monotonic() + 120
    while "ACTIVE" not in run_cli(later, "images").stdout.split():
        assert time.monotonic() < deadline, run_cli(later, "images").stdout
    assert run_cli(later, "cat", "x:1", "/hello").stdout == "again\n"


def test_transitions_outside_the_table_are_refused():
    from convstore.core import lifecycle
    from convstore.core.catalog import CatalogEntry
    from convstore.refs import ImageRef

    now = time.time()
    failed = CatalogEntry(ImageRef("x", "1"), FAILED, now, "gone", manifest_digest="sha256:" + "0" * 64)
    assert (FAILED, INACTIVE) not in lifecycle.TRANSITIONS
    with pytest.raises(AssertionError, match="failed -> inactive is not a transition"):
        lifecycle.deactivate(failed, now, DAY)
    back = lifecycle.recover(failed, now)
    assert back.state == ACTIVE and back.history[-1]["reason"] == "source and key are available again"


def test_repack_and_repair_stay_in_the_images_domain(tmp_path, cli_env):
    """A tenant's image re-packed by a reactivation (real worker) or by verify --repair goes back
    into the tenant's convergence domain, never into the shared default one."""
    import json

    write_oci(str(tmp_path / "t"), [rich_layer(), make_tar([Entry("hello", data=os.urandom(200_000))])])
    run_cli(cli_env, "domain", "create", "tenant")
    run_cli(cli_env, "pack", "--domain", "tenant", f"oci:{tmp_path / 't'}", "t:1")
    domain_of = lambda env: json.loads(run_cli(env, "inspect", "--json", "t:1").stdout)["domain"]["name"]  # noqa: E731
    assert domain_of(cli_env) == "tenant"
    later = dict(cli_env, CONVSTORE_NOW=str(time.time() + 30 * DAY))
    run_cli(later, "refresh")
    run_cli(later, "gc")
    assert run_cli(later, "cat", "t:1", "/hello", check=False).returncode == 1  # starts the re-pack
    deadline = time.monotonic() + 120
    while "ACTIVE" not in run_cli(later, "images").stdout.split():
        assert time.monotonic() < deadline
    assert domain_of(later) == "tenant"
    s = convstore.Store.open(cli_env["CONVSTORE_STORE"], cli_env["CONVSTORE_KEY"])
    s.chunks.delete([c.cid for c in s.load_manifest(s.entry("t:1")).chunks][:3])
    assert "repaired t:1" in run_cli(later, "verify", "--repair").stdout
    assert domain_of(later) == "tenant"


def test_a_pack_of_the_same_source_is_a_no_op_unless_something_is_missing(tmp_path, cstore, clock):
    """Packing again what a name already serves writes nothing (same version, same seq); a changed
    source, another domain, a lost chunk or a stale image take the full path."""
    src = shared_and_own(tmp_path, "a", [Entry("s", data=os.urandom(300_000))])
    first = cstore.pack(f"oci:{src}", "a:1")
    assert not first.up_to_date
    before = cstore.entry("a:1")
    again = cstore.pack(f"oci:{src}", "a:1")
    assert again.up_to_date and (again.manifest_digest, again.chunks, again.new_chunks) == \
        (first.manifest_digest, first.chunks, 0)
    assert cstore.entry("a:1").seq == before.seq  # the catalog was not written
    # a pack is a use: an image packed again long after its last read is stamped, not aged out
    clock.now += 10 * DAY
    assert cstore.pack(f"oci:{src}", "a:1").up_to_date
    assert cstore.entry("a:1").last_read == clock.now
    # the same source into another convergence domain: packed there
    cstore.create_domain("tenant")
    moved = cstore.pack(f"oci:{src}", "a:1", domain="tenant")
    assert not moved.up_to_date and cstore.entry("a:1").domain == "tenant"
    assert cstore.pack(f"oci:{src}", "a:1", domain="tenant").up_to_date
    assert not cstore.pack(f"oci:{src}", "a:1").up_to_date  # and back
    # a lost chunk: the pack re-reads the source and puts it back
    lost = cstore.load_manifest(cstore.entry("a:1")).chunks[0].cid
    cstore.chunks.delete([lost])
    healed = cstore.pack(f"oci:{src}", "a:1")
    assert not healed.up_to_date and healed.new_chunks >= 1
    assert cstore.verify().clean
    assert cstore.pack(f"oci:{src}", "a:1").up_to_date
    # the same image from another place: packed again, so the entry names the source that exists
    moved = shutil.copytree(src, str(tmp_path / "a-moved"))
    assert not cstore.pack(f"oci:{moved}", "a:1").up_to_date
    assert cstore.entry("a:1").source.endswith("a-moved")
    assert cstore.pack(f"oci:{moved}", "a:1").up_to_date
    # a pack that must read the source (what verify --repair runs) never takes the shortcut
    assert not cstore.pack(f"oci:{moved}", "a:1", reuse_layers=False).up_to_date
    # another source under the same name: a new version
    other = shared_and_own(tmp_path, "b", [Entry("s", data=os.urandom(300_000))])
    r = cstore.pack(f"oci:{other}", "a:1")
    assert not r.up_to_date and r.manifest_digest != first.manifest_digest
    # stale (unread past inactive_after): the full path, which makes it ACTIVE and fresh again
    clock.now += 15 * DAY
    assert not cstore.pack(f"oci:{other}", "a:1").up_to_date
    assert cstore.pack(f"oci:{other}", "a:1").up_to_date


def test_a_lost_creation_race_is_said_at_the_first_lease_read_not_ignored_as_a_forgery(tmp_path) -> None:
    """Two clients create one registry store at once (no atomic create): the one whose store.json
    was overwritten reads the winner's lease, which its own metadata key cannot authenticate.  That
    is the lost identity (StoreIdentityLost, one line), never "ignoring lease ...: a forgery"."""
    import pytest

    from convstore.core.identity import StoreIdentity
    from convstore.core.leases import Leases
    from convstore.errors import StoreIdentityLost
    from convstore.stores.memory import MemoryStore

    objects = MemoryStore()
    loser = StoreIdentity(objects, convstore.LocalKeyFile(str(tmp_path / "a.key")))  # created the store first
    assert loser.created
    winner_objects = MemoryStore()
    winner = StoreIdentity(winner_objects, convstore.LocalKeyFile(str(tmp_path / "b.key")))
    objects.put("store.json", winner_objects.get("store.json"))  # the winner's store.json, stored last
    with Leases(winner_objects, winner).hold("pack", exclusive=False):
        for key in winner_objects.list("leases/"):
            objects.put(key, winner_objects.get(key))
        with pytest.raises(StoreIdentityLost, match="created at the same time by another client"):
            Leases(objects, loser).all()
