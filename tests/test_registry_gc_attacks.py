"""Attacks on gc of a registry store (issue 23 §6): leases against a registry that
fails at the wrong moment, on a real docker-registry (127.0.0.1) behind fault-injecting
proxies, with a real packer in another process (its own cache) racing gc."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from test_registry_gc import _config_digest, _images, _open

import convstore
from convstore.stores.registry.meta import RegistryStore


def test_a_lease_gc_cannot_read_keeps_gc_out_and_the_racing_pack_publishes_intact(tmp_path, registry, keyfile,
                                                                                   cli_env):
    """A real packer (another process) holds its lease and has written its sealed manifest; it is held by
    a proxy at the catalog write that publishes it.  gc runs on another client whose registry fails
    (HTTP 500, every retry) when it reads that lease.  A lease that cannot be *read* is not a forged one:
    gc must refuse (StoreBusy), not run as if the store were idle -- which deletes the packer's sealed
    manifest (no complete entry names it yet), so that the image it then publishes cannot be read."""
    from netproxy import CountingProxy

    _images(tmp_path)
    url = f"oci://{registry.host}/leaseread"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    racer_proxy, gc_proxy = CountingProxy(registry.host), CountingProxy(registry.host)
    at_publish, release = threading.Event(), threading.Event()
    ref_puts = Counter()

    def hold_the_publish(method, path):
        if method == "PUT" and "/leaseread/manifests/r-" in path:
            ref_puts[path] += 1
            if ref_puts[path] == 2:  # begin_pack wrote PENDING; this is finish_pack's ACTIVE
                at_publish.set()
                release.wait(120)
        return None

    racer_proxy.fault = hold_the_publish
    racer = subprocess.Popen([sys.executable, "-m", "convstore.cli", "--quiet", "--insecure", "--store",
                              f"oci://{racer_proxy.host}/leaseread", "--cache", str(tmp_path / "c-racer"), "pack",
                              "--json", f"oci:{tmp_path / 'gone'}", "gone:1"], env=cli_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert at_publish.wait(120), racer.stderr.read() if racer.poll() is not None else "racer never got there"
        leases = s.leases.all()[0]
        assert [(l.purpose, l.exclusive) for l in leases] == [("pack", False)]
        racer_tag = "/leaseread/manifests/" + RegistryStore._tag(f"leases/{leases[0].id}")
        lease_gets = Counter()

        def flaky_lease_read(method, path):
            # the racer's lease: the listing reads it, then the registry fails on every retry of the next
            # read (~1.5 s of 500s), then answers again
            if method == "GET" and racer_tag in path:
                lease_gets[path] += 1
                if 2 <= lease_gets[path] <= 5:
                    return "500"
            return None

        gc_proxy.fault = flaky_lease_read
        g = _open(f"oci://{gc_proxy.host}/leaseread", keyfile, tmp_path / "c-gc")
        manifests_before = sorted(s.objects.list("manifests"))
        assert len(manifests_before) == 2  # keep's and the racer's (not yet published)
        with pytest.raises(convstore.StoreBusy, match="cannot be read"):
            g.gc()
        assert gc_proxy.faults_injected >= 4  # the fault did happen
        assert sorted(s.objects.list("manifests")) == manifests_before  # nothing changed
        assert [l.id for l in s.leases.all()[0]] == [l.id for l in leases]  # the racer's lease is still there
    finally:
        release.set()
    out, err = racer.communicate(timeout=300)
    racer_proxy.stop()
    gc_proxy.stop()
    assert racer.returncode == 0, err
    assert json.loads(out)["ref"] == "gone:1"
    # the published image reads whole on a new client (no cache), and the store verifies clean
    s2 = _open(url, keyfile, tmp_path / "c2")
    s2.unpack_oci("gone:1", f"oci:{tmp_path / 'out'}")  # every diff_id checked
    assert _config_digest(tmp_path / "gone") == _config_digest(tmp_path / "out")
    assert s2.verify().clean


@pytest.mark.parametrize("recovers", [False, True], ids=["still-failing", "renewals-recover"])
def test_a_pack_whose_lease_lapsed_publishes_nothing(tmp_path, registry, keyfile, recovers):
    """A slow pack whose registry fails every renewal of its lease (ttl 2 s here): gc on another client
    rightly takes the lapsed lease for a dead holder's and deletes the sealed manifest the pack has just
    written (no complete entry names it).  The pack must then refuse to publish (StoreBusy) rather than
    point its name at a manifest that is gone -- also when its renewals work again before it publishes
    (a lease that lapsed once is lost)."""
    from netproxy import CountingProxy

    _images(tmp_path)
    url = f"oci://{registry.host}/lapse"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    proxy = CountingProxy(registry.host)
    lease_puts = Counter()
    manifest_written, at_publish, release = threading.Event(), threading.Event(), threading.Event()
    failing = threading.Event()
    failing.set()

    def fault(method, path):
        if method == "PUT" and "/lapse/manifests/e-" in path:
            lease_puts[path] += 1
            return "500" if lease_puts[path] > 1 and failing.is_set() else None  # taken, then not renewed
        if method == "PUT" and "/lapse/manifests/m-" in path:
            manifest_written.set()
        elif method == "GET" and "/lapse/manifests/s-" in path and manifest_written.is_set() \
                and not at_publish.is_set():  # finish_pack re-reads store.json: hold it there
            at_publish.set()
            release.wait(120)
        return None

    proxy.fault = fault
    racer = _open(f"oci://{proxy.host}/lapse", keyfile, tmp_path / "c-racer")
    racer.leases.ttl = 2.0
    outcome: dict[str, object] = {}

    def pack() -> None:
        try:
            outcome["result"] = racer.pack(f"oci:{tmp_path / 'gone'}", "gone:1")
        except convstore.ConvstoreError as e:
            outcome["error"] = e

    t = threading.Thread(target=pack)
    t.start()
    try:
        assert at_publish.wait(120), outcome
        g = _open(url, keyfile, tmp_path / "c-gc")
        deadline = time.monotonic() + 60
        g.leases.sync()  # lease time is the registry's (1 s resolution): a margin of 1.5 s past the ttl
        while any(l.live(g.leases.now() - 1.5) for l in g.leases.all()[0]):  # until the racer's lease lapsed
            assert time.monotonic() < deadline, g.leases.all()
            time.sleep(0.2)
        assert lease_puts and max(lease_puts.values()) > 1  # renewals were tried, and failed
        report = g.gc()
        assert report.manifests_removed == 1  # the racer's, written but not yet published
        if recovers:  # the registry answers the renewals again before the pack publishes
            failing.clear()
            tried = sum(lease_puts.values())
            while sum(lease_puts.values()) < tried + 2:  # two renewals went through
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        release.set()
        t.join(300)
    proxy.stop()
    assert isinstance(outcome.get("error"), convstore.StoreBusy), outcome
    assert "lost its lease" in str(outcome["error"])
    # nothing points at a missing manifest: every ACTIVE image reads whole on a new client
    s2 = _open(url, keyfile, tmp_path / "c2")
    active = [str(e.ref) for e in s2.images() if e.state == "active"]
    assert active == ["keep:1"], active
    for ref in active:
        s2.unpack_oci(ref, f"oci:{tmp_path / ('out-' + ref.replace(':', '-'))}")
    assert s2.verify().clean


def _skew_setup(tmp_path, registry, keyfile):
    _images(tmp_path)
    url = f"oci://{registry.host}/skew"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    return s, _open(url, keyfile, tmp_path / "c-packer"), _open(url, keyfile, tmp_path / "c-gc")


def test_gc_keeps_out_of_a_live_pack_lease_written_by_a_clock_two_hours_behind(tmp_path, registry, keyfile):
    """Two machines whose clocks disagree by more than the 30-minute ttl: the packer's fresh lease must
    not look dead to gc.  Leases are timed on the registry's clock, not each writer's."""
    s, packer, g = _skew_setup(tmp_path, registry, keyfile)
    packer.leases.clock = lambda: time.time() - 7200
    with packer.leases.hold("pack", exclusive=False) as lease:
        with pytest.raises(convstore.StoreBusy, match="a pack lease of pid"):
            g.gc()
        assert [l.id for l in s.leases.all()[0]] == [lease.id]  # still there: gc did not take it for dead


def test_a_pack_keeps_out_of_a_running_gc_whose_clock_is_two_hours_behind(tmp_path, registry, keyfile):
    s, packer, g = _skew_setup(tmp_path, registry, keyfile)
    g.leases.clock = lambda: time.time() - 7200
    with g.leases.hold("gc", exclusive=True):
        with pytest.raises(convstore.StoreBusy, match="an exclusive gc lease"):
            with packer.leases.hold("pack", exclusive=False, wait=0.0):
                pass


def test_a_copy_never_adopts_a_replayed_older_epoch_of_its_domain(tmp_path, registry, keyfile):
    """A store writer without the key puts back an older, authentic record of the source's domain (its
    epoch-1 secret, rotated out).  A node with no trust state of that source pushes an image packed at
    epoch 2 into a registry store: the destination must not adopt the rotated-out epoch (the image's
    authenticated manifest names the epoch it was packed in)."""
    from convstore.transfer import copy_image

    _images(tmp_path)
    key = f"file:{keyfile}"
    packer = convstore.Store.open(str(tmp_path / "src"), key, state_dir=str(tmp_path / "state-packer"))
    packer.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    epoch1 = packer.objects.get("domains/default")
    packer.rotate_domain("default")
    packer.pack(f"oci:{tmp_path / 'gone'}", "gone:2")
    assert packer.catalog.entry("gone:2") and json.loads(packer.objects.get("domains/default"))["epoch"] == 2
    packer.objects.put("domains/default", epoch1)  # the replay (MAC intact: it is the store's own old record)
    node_state = str(tmp_path / "state-node")  # a node that never saw epoch 2
    src = convstore.Store.open(str(tmp_path / "src"), key, state_dir=node_state)
    dst = convstore.Store.open(f"oci://{registry.host}/adopt", key, insecure=True, state_dir=node_state,
                               cache_dir=str(tmp_path / "c-node"))
    copy_image(src, dst, "gone:2")
    epochs = [d["epoch"] for d in dst.domains()]
    assert all(e >= 2 for e in epochs), epochs  # never the rotated-out epoch-1 secret
    out = tmp_path / "out"
    dst.unpack_oci("gone:2", f"oci:{out}")  # the copy itself is whole
    assert _config_digest(tmp_path / "gone") == _config_digest(out)


def test_a_long_lived_packer_does_not_dedup_against_chunks_gc_swept_meanwhile(tmp_path, registry, keyfile):
    """A packer process that loaded the chunk index before another machine's gc swept it (and the
    registry freed the packs) must look again once it holds its lease: before, it deduplicated against
    the swept chunks and its pack failed (a pack blob missing), again at every retry in that process."""
    _images(tmp_path)
    url = f"oci://{registry.host}/stale-index"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    s.pack(f"oci:{tmp_path / 'gone'}", "gone:1")
    packer = _open(url, keyfile, tmp_path / "c-packer")  # a long-lived process on another machine
    assert packer.pack(f"oci:{tmp_path / 'gone'}", "gone:1").up_to_date  # its index is loaded now
    s.rm("gone:1")
    s.gc()
    registry.garbage_collect()  # the removed image's own packs are freed
    r = packer.pack(f"oci:{tmp_path / 'gone'}", "gone:2")
    assert r.new_chunks > 0  # it uploaded what was swept
    fresh = _open(url, keyfile, tmp_path / "c2")
    fresh.unpack_oci("gone:2", f"oci:{tmp_path / 'out'}")
    assert _config_digest(tmp_path / "gone") == _config_digest(tmp_path / "out")
    assert fresh.verify().clean


def test_a_packer_that_died_on_another_machine_does_not_block_its_tag_forever(tmp_path, registry, keyfile):
    """A first pack on another machine died after its pending mark (its lease expired long ago).  On a
    registry store its pid cannot be checked from here: the leases tell.  Before, every later pack and
    rm of that tag was refused (ImagePending) forever, and refresh and gc never cleared the mark."""
    from convstore.core.catalog import PENDING, CatalogEntry
    from convstore.refs import ImageRef

    _images(tmp_path)
    s = _open(f"oci://{registry.host}/orphan", keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    then = time.time() - 7200
    mark = {"since": then, "pid": 4242, "host": "dead-builder", "source": "oci:x"}
    ref = ImageRef.parse("app:1")
    s.catalog.update(ref, lambda cur: CatalogEntry(ref, PENDING, then, "packing", source="oci:x", pending=mark))
    # while that packer's lease is live, it is alive: refused as before
    with s.leases.hold("pack", exclusive=False):
        lease = s.leases.all()[0][0]
    s.leases._write(type(lease)(lease.id, "pack", False, "dead-builder", 4242, time.time(), time.time(), 1800.0))
    with pytest.raises(convstore.ImagePending):
        s.pack(f"oci:{tmp_path / 'gone'}", "app:1", )
    s.objects.delete(f"leases/{lease.id}")
    # it died: its lease is gone (or expired); the tag can be packed again, and removed
    r = s.pack(f"oci:{tmp_path / 'gone'}", "app:1")
    assert r.ref == "app:1" and s.catalog.entry("app:1").state == "active"
    s.rm("app:1")
    assert [str(e.ref) for e in s.images()] == ["keep:1"]


def test_gc_whose_lease_listing_fails_leaves_no_exclusive_lease_behind(tmp_path, registry, keyfile):
    """gc writes its exclusive lease, then the registry fails the listing (every retry): gc fails, and
    must take its lease with it -- before, it stayed for the 30-minute ttl and every pack waited on it."""
    from netproxy import CountingProxy

    _images(tmp_path)
    url = f"oci://{registry.host}/leftover"
    s = _open(url, keyfile, tmp_path / "c1")
    s.pack(f"oci:{tmp_path / 'keep'}", "keep:1")
    proxy = CountingProxy(registry.host)
    state = {"lease_written": False, "failed": 0}

    def fault(method, path):
        if method == "PUT" and "/leftover/manifests/e-" in path:
            state["lease_written"] = True
        elif method == "GET" and "/leftover/tags/list" in path and state["lease_written"] and state["failed"] < 4:
            state["failed"] += 1
            return "500"
        return None

    proxy.fault = fault
    try:
        g = _open(f"oci://{proxy.host}/leftover", keyfile, tmp_path / "c-gc")
        with pytest.raises(convstore.StoreError, match="HTTP 500"):
            g.gc()
        assert state["failed"] == 4
    finally:
        proxy.stop()
    assert s.leases.all() == ([], [])  # nothing left to keep packs out
    s.pack(f"oci:{tmp_path / 'gone'}", "gone:1")
