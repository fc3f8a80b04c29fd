"""The S3 store (``s3://BUCKET/PREFIX``) on a real object store, SeaweedFS on
127.0.0.1: round trips between local, S3 and registry stores, the request
count of a lazy cold read, gc against a concurrent writer (leases), the
named errors, and a store writer who lies."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from imagebuilder import Entry, make_tar, rich_layer, write_oci

import convstore
from convstore.errors import ConvstoreError, CorruptObject, S3NoSuchBucket, S3Unreachable, TamperedObject
from convstore.reader import ImageFS
from convstore.stores.s3 import S3Client
from convstore.transfer import copy_image


def images(tmp_path: Path) -> None:
    shared = [Entry(f"s{i}", data=os.urandom(90_000)) for i in range(8)]
    for n in ("a", "b"):
        own = [Entry(f"{n}{i}", data=os.urandom(90_000)) for i in range(4)]
        write_oci(str(tmp_path / n), [rich_layer(), make_tar(shared + own)])


def config_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    return json.loads((layout / "blobs" / "sha256" / digest).read_text())["config"]["digest"]


def layer_blobs(layout: Path) -> list[str]:
    """The sha256 of each layer's uncompressed tar (unpack re-compresses: the tars are what is exact)."""
    import gzip
    import hashlib

    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    blobs = layout / "blobs" / "sha256"
    return [hashlib.sha256(gzip.decompress((blobs / d["digest"].split(":", 1)[1]).read_bytes())).hexdigest()
            for d in json.loads((blobs / digest).read_text())["layers"]]


def open_s3(url: str, key, cache: Path, **kw) -> convstore.Store:
    return convstore.Store.open(url, key, cache_dir=str(cache), **kw)


# -- round trips --------------------------------------------------------------------------------------------------
def test_push_pull_round_trips_local_s3_registry_exact(tmp_path, s3, seaweed, registry, cli_env):
    """local -> S3 (push, only missing chunks) -> registry (push from the S3 store) -> S3 again
    (another prefix) -> a second local store (pull): each copy unpacks to the source's exact
    bytes (unpack checks every diff_id; the config and layer digests match)."""
    images(tmp_path)
    env = dict(cli_env, **seaweed.env())
    for n in ("a", "b"):
        run_cli(env, "pack", f"oci:{tmp_path / n}", f"{n}:1")
    a = json.loads(run_cli(env, "push", "--json", "a:1", s3).stdout)
    b = json.loads(run_cli(env, "push", "--json", "b:1", s3).stdout)
    assert a["chunks_sent"] == a["chunks"] > 0
    assert 0 < b["chunks_sent"] < b["chunks"]  # the shared files were already there
    assert json.loads(run_cli(env, "push", "--json", "b:1", s3).stdout)["chunks_sent"] == 0
    reg = f"oci://{registry.host}/from-s3"
    c3 = ["--cache", str(tmp_path / "c3")]
    run_cli(env, "--insecure", *c3, "--store", s3, "push", "b:1", reg)  # S3 -> registry
    other = s3 + "-copy"  # another prefix of the bucket
    run_cli(env, "--insecure", "--cache", str(tmp_path / "c4"), "--store", reg, "push", "b:1", other)  # registry -> S3
    env2 = dict(env, CONVSTORE_STORE=str(tmp_path / "store2"))
    pulled = json.loads(run_cli(env2, "--cache", str(tmp_path / "c5"), "pull", "--json", other, "b:1").stdout)
    assert pulled["chunks_sent"] == b["chunks"]
    run_cli(env2, "unpack", "b:1", f"oci:{tmp_path / 'out'}")
    assert config_digest(tmp_path / "out") == config_digest(tmp_path / "b")
    assert layer_blobs(tmp_path / "out") == layer_blobs(tmp_path / "b")
    run_cli(env, "--cache", str(tmp_path / "c6"), "--store", other, "unpack", "b:1", f"oci:{tmp_path / 'out2'}")
    assert layer_blobs(tmp_path / "out2") == layer_blobs(tmp_path / "b")


def test_pack_straight_into_s3_dedups_across_clients_and_reads_back_exactly(tmp_path, s3, seaweed, cli_env):
    images(tmp_path)
    env = dict(cli_env, **seaweed.env())
    a = json.loads(run_cli(env, "--store", s3, "--cache", str(tmp_path / "c1"), "pack", "--json",
                           f"oci:{tmp_path / 'a'}", "a:1").stdout)
    b = json.loads(run_cli(env, "--store", s3, "--cache", str(tmp_path / "c2"), "pack", "--json",
                           f"oci:{tmp_path / 'b'}", "b:1").stdout)
    assert a["new_chunks"] == a["chunks"] and 0 < b["new_chunks"] < b["chunks"]  # another client deduplicated
    run_cli(env, "--store", s3, "--cache", str(tmp_path / "c3"), "unpack", "b:1", f"oci:{tmp_path / 'out'}")
    assert layer_blobs(tmp_path / "out") == layer_blobs(tmp_path / "b")
    s = open_s3(s3, f"file:{cli_env['CONVSTORE_KEY'].split(':', 1)[1]}", tmp_path / "c4")
    assert sorted(str(e.ref) for e in s.images()) == ["a:1", "b:1"] and s.verify().clean
    # the maintenance commands run on it as on a local store: rm, then gc frees a's own chunks
    c5 = ["--store", s3, "--cache", str(tmp_path / "c5")]
    run_cli(env, *c5, "rm", "a:1")
    gc = json.loads(run_cli(env, *c5, "gc", "--json").stdout)
    assert gc["chunks_removed"] > 0 and gc["store_bytes_after"] < gc["store_bytes_before"], gc
    assert json.loads(run_cli(env, *c5, "verify", "--json").stdout)["clean"]
    assert run_cli(env, *c5, "cat", "b:1", "/d/small.txt").stdout == "hello world\n"  # a lazy read
    run_cli(env, *c5, "unpack", "b:1", f"oci:{tmp_path / 'out2'}")
    assert layer_blobs(tmp_path / "out2") == layer_blobs(tmp_path / "b")


# -- the read path: requests counted ------------------------------------------------------------------------------
class RequestLog:
    """Every HTTP request the S3 clients made (botocore's before-send event): method, path, range."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        orig = S3Client.__init__

        def init(client: S3Client, *a, **kw) -> None:
            orig(client, *a, **kw)
            client.s3.meta.events.register("before-send.s3", self.record)

        monkeypatch.setattr(S3Client, "__init__", init)

    def record(self, request, **_kw) -> None:
        from urllib.parse import urlsplit

        path = urlsplit(request.url).path
        rng = request.headers.get("Range")
        self.sent.append(f"{request.method} {path}" + (f" {rng.decode() if isinstance(rng, bytes) else rng}"
                                                       if rng else ""))


def small_image(tmp_path: Path, i: int) -> str:
    d = tmp_path / f"img{i}"
    write_oci(str(d), [make_tar([Entry("d", "dir"), Entry("d/small.txt", data=b"hello world\n"),
                                 Entry(f"d/own{i}", data=os.urandom(5000))])])
    return f"oci:{d}"


def test_a_cold_lazy_read_takes_at_most_5_requests_whatever_the_number_of_images(tmp_path, s3, store,
                                                                                monkeypatch):
    log = RequestLog(monkeypatch)
    remote = open_s3(s3, store.key, tmp_path / "c0")

    def cold_read(n: int, days_later: float = 0) -> list[str]:
        start = len(log.sent)
        worker = open_s3(s3, store.key, tmp_path / f"worker{n}", clock=lambda: time.time() + days_later * 86400)
        with ImageFS.from_store(worker, "img0:1") as fs:
            assert fs.open("/d/small.txt").read() == b"hello world\n"
        return log.sent[start:]

    counts = {}
    for i in range(100):  # 100 images, each with chunks of its own: 100 packs and index segments
        store.pack(small_image(tmp_path, i), f"img{i}:1")
        copy_image(store, remote, f"img{i}:1")
        if i in (0, 99):
            counts[i + 1] = cold_read(i + 1)
    assert len(remote.images()) == 100
    one, hundred = counts[1], counts[100]
    print("cold read requests, 1 image:", one, "\n100 images:", hundred)
    assert len(hundred) <= 5, hundred
    assert len(one) == len(hundred), (one, hundred)  # open and read cost the same with 1 or 100 images
    assert not any("list-type" in r or r.endswith("/index/") for r in hundred), hundred  # no index, no listing
    assert sum(1 for r in hundred if "/packs/" in r and "bytes=" in r) >= 1, hundred  # the chunk: a ranged GET
    # a reader writes nothing to the store, even a month after the last read (no last_read stamp,
    # no INACTIVE aging: a fleet of nodes shares the store, and may hold read-only credentials)
    later = cold_read(101, days_later=30)
    assert len(later) == len(hundred) and all(r.startswith("GET ") for r in later + hundred), later


# -- gc against a concurrent writer ------------------------------------------------------------------------------
class Paused:
    """A copy's progress that stops at its start (the copy then holds the gc guard and has
    decided which chunks it relies on) until ``go`` is set."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def start(self, description: str, total: int | None) -> None:
        self.reached.set()
        assert self.go.wait(120)

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def test_gc_waits_for_a_concurrent_writer_that_relies_on_unreferenced_chunks(tmp_path, s3, store):
    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    setup = open_s3(s3, store.key, tmp_path / "c0")
    copy_image(store, setup, "a:1", "old:1")
    copy_image(store, setup, "b:1")
    setup.rm("old:1")  # a's chunks are now unreferenced: garbage, unless a writer relies on them
    writer = open_s3(s3, store.key, tmp_path / "cw")
    collector = open_s3(s3, store.key, tmp_path / "cg")
    paused = Paused()
    done: dict[str, object] = {}

    def write() -> None:
        try:
            done["copy"] = copy_image(store, writer, "a:1", progress=paused)  # finds every chunk there
        except BaseException as e:  # noqa: BLE001 (reported by the assertions)
            done["copy"] = e

    def collect() -> None:
        try:
            done["gc"] = collector.gc()
        except BaseException as e:  # noqa: BLE001
            done["gc"] = e

    w = threading.Thread(target=write)
    w.start()
    assert paused.reached.wait(60)
    client = collector.objects.inner.client
    held = [n for n, _s, _m in client.list_with_time("locks/gc/")[0]]
    assert len(held) == 1 and held[0].startswith("locks/gc/s-"), held  # the writer's shared lease
    g = threading.Thread(target=collect)
    g.start()
    deadline = time.monotonic() + 60
    while client.head("locks/gc/x") is None:  # gc has taken its exclusive lease and waits for the writer
        assert time.monotonic() < deadline and g.is_alive(), done
        time.sleep(0.02)
    assert g.is_alive() and "gc" not in done  # it waits, and has deleted nothing meanwhile
    paused.go.set()
    w.join(120)
    g.join(120)
    assert isinstance(done.get("copy"), convstore.transfer.CopyResult), done
    assert done["copy"].chunks_sent == 0  # type: ignore[union-attr]  (it relied on what it found)
    assert not isinstance(done.get("gc"), BaseException), done
    fresh = open_s3(s3, store.key, tmp_path / "cf")
    assert sorted(str(e.ref) for e in fresh.images()) == ["a:1", "b:1"]
    assert fresh.verify().clean  # every chunk of the writer's image survived the gc
    fresh.unpack_oci("a:1", f"oci:{tmp_path / 'out'}")
    assert layer_blobs(tmp_path / "out") == layer_blobs(tmp_path / "a")
    # and gc does collect: a's own chunks go once a:1 is removed, b stays whole (its packs rewritten)
    fresh.rm("a:1")
    report = fresh.gc()
    assert report.chunks_removed > 0 and report.chunk_bytes_freed > 0
    again = open_s3(s3, store.key, tmp_path / "ca")
    assert [str(e.ref) for e in again.images()] == ["b:1"] and again.verify().clean
    again.unpack_oci("b:1", f"oci:{tmp_path / 'outb'}")
    assert layer_blobs(tmp_path / "outb") == layer_blobs(tmp_path / "b")
    assert again.gc().chunks_removed == 0
    assert [n for n, _s, _m in client.list_with_time("locks/")[0] if "/broken-" not in n] == []  # all released


def test_an_expired_lease_is_removed_and_a_live_one_waited_for(s3):
    """A holder that died leaves its lease: a waiter removes it once the server's clock says it
    expired; a lease that is there and fresh makes the waiter give up with a named error."""
    from convstore.errors import StoreError
    from convstore.stores.s3.meta import lease

    client = S3Client(s3)
    assert client.put("locks/n/x", b"{}", if_absent=True)  # a dead holder's exclusive lease
    with pytest.raises(StoreError, match="lock n of .* is still held"):
        with lease(client, "n", ttl=3600, wait=0.5):
            pass
    with lease(client, "n", ttl=1.0, wait=30):  # expired after a second of the server's clock
        assert client.head("locks/n/x") is not None
        with pytest.raises(StoreError, match="still held"):
            with lease(client, "n", shared=True, wait=0.5):  # a shared holder waits for the exclusive one
                pass
    held = lambda: [n for n, _s, _m in client.list_with_time("locks/")[0] if "/broken-" not in n]  # noqa: E731
    assert held() == []
    marks = [n for n, _s, _m in client.list_with_time("locks/n/broken-")[0]]
    assert len(marks) == 1  # the claim on that one expired lease: a second waiter cannot remove a newer one
    client.put("locks/m/s-" + "0" * 32, b"{}")  # a dead shared holder
    with lease(client, "m", ttl=1.0, wait=30):
        assert [n for n, _s, _m in client.list_with_time("locks/m/")[0]] == ["locks/m/x"]


def test_a_long_lived_writer_sees_what_a_gc_moved(tmp_path, s3, store):
    """A writer that loaded the index before a gc rewrote packs starts its next copy from the
    index as it is then: it uploads what the gc removed instead of relying on it."""
    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    writer = open_s3(s3, store.key, tmp_path / "cw")
    copy_image(store, writer, "b:1")
    copy_image(store, writer, "a:1", "w1:1")  # the writer has loaded the index
    other = open_s3(s3, store.key, tmp_path / "co")
    other.rm("w1:1")
    assert other.gc().chunks_removed > 0  # a's own chunks are gone, packs shared with b rewritten
    again = copy_image(store, writer, "a:1", "w2:1")
    assert again.chunks_sent > 0
    fresh = open_s3(s3, store.key, tmp_path / "cf")
    assert fresh.verify().clean
    fresh.unpack_oci("w2:1", f"oci:{tmp_path / 'out'}")
    assert layer_blobs(tmp_path / "out") == layer_blobs(tmp_path / "a")


# -- errors -------------------------------------------------------------------------------------------------------
def test_named_errors_for_no_bucket_denied_and_unreachable(tmp_path, s3, seaweed, store, cli_env):
    bucket, prefix = s3[len("s3://"):].split("/")
    with pytest.raises(S3NoSuchBucket, match="no bucket nope-"):
        open_s3("s3://nope-" + bucket + "/x", store.key, tmp_path / "c1")
    with pytest.raises(S3Unreachable, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        open_s3(s3, store.key, tmp_path / "c2", s3_endpoint="http://127.0.0.1:9")
    env = dict(cli_env, **seaweed.env())
    for extra, args, want in [
            ({}, ["--store", f"s3://nope-{bucket}/x", "images"], f"convstore: error: no bucket nope-{bucket} at "
                                                                  f"{seaweed.endpoint}"),
            ({}, ["--s3-endpoint", "http://127.0.0.1:9", "--store", s3, "images"],
             f"convstore: error: cannot reach the S3 endpoint http://127.0.0.1:9 (bucket {bucket})"),
            ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}, ["--store", s3, "images"],
             "convstore: error: access denied to "),
            ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, ["--store", s3, "images"],
             "convstore: error: no AWS credentials"),
            ({}, ["--store", "s3://bucket-only", "images"], "names no bucket and prefix")]:
        p = run_cli(dict(env, **extra), "--cache", str(tmp_path / "cx"), *args, check=False)
        assert p.returncode in (1, 2) and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert want in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and seaweed.env()["AWS_SECRET_ACCESS_KEY"] not in p.stderr
        assert "wrong-secret-value" not in p.stderr
    # a read-only identity reads, and a write is refused by name
    remote = open_s3(s3, store.key, tmp_path / "c3")
    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    copy_image(store, remote, "a:1")
    p = run_cli(dict(env, **seaweed.env(reader=True)), "--cache", str(tmp_path / "c4"), "--store", s3, "images",
                check=False)
    assert p.returncode == 0 and p.stdout.splitlines()[1].split()[:3] == ["a", "1", "ACTIVE"], p.stderr
    p = run_cli(dict(env, **seaweed.env(reader=True)), "--cache", str(tmp_path / "c5"), "push", "a:1",
                f"s3://{bucket}/{prefix}-other", check=False)
    assert p.returncode == 1 and "access denied" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_credentials_from_a_named_profile(tmp_path, s3, seaweed, store, cli_env):
    """As the AWS tools take them: a profile of the shared credentials file, named by AWS_PROFILE
    (no key in the environment); a profile that does not exist is a named error, in one line."""
    env = seaweed.env()
    creds = tmp_path / "credentials"
    creds.write_text(f"[fleet]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n")
    profile_env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_")}  # no key in the environment
    profile_env.update(CONVSTORE_S3_ENDPOINT=seaweed.endpoint, AWS_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                       AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_PROFILE="fleet")
    images(tmp_path)
    run_cli(profile_env, "pack", f"oci:{tmp_path / 'a'}", "a:1")
    assert json.loads(run_cli(profile_env, "push", "--json", "a:1", s3).stdout)["chunks_sent"] > 0
    p = run_cli(dict(profile_env, AWS_PROFILE="nope"), "--cache", str(tmp_path / "c"), "--store", s3, "images",
                check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "profile (nope)" in p.stderr, p.stderr


def test_no_secret_in_repr_or_options(tmp_path, s3, seaweed, store):
    s = open_s3(s3, store.key, tmp_path / "c")
    secret = seaweed.env()["AWS_SECRET_ACCESS_KEY"]
    for obj in (s, s.objects, s.chunk_store, s.objects.inner, s.chunk_store.inner, s.objects.inner.client,
                s.options):
        assert secret not in repr(obj) and "convstore-test" not in repr(obj)
    assert secret not in json.dumps(s.options.to_json())


# -- a store writer who lies ---------------------------------------------------------------------------------------
def test_swapped_pack_and_catalog_objects_are_refused_never_served(tmp_path, s3, seaweed, store):
    images(tmp_path)
    store.pack(f"oci:{tmp_path / 'a'}", "a:1")
    store.pack(f"oci:{tmp_path / 'b'}", "b:1")
    remote = open_s3(s3, store.key, tmp_path / "c0")
    copy_image(store, remote, "a:1")
    copy_image(store, remote, "b:1")
    bucket, prefix = s3[len("s3://"):].split("/")
    raw = seaweed.client()
    # a writer swaps the catalog entries of a:1 and b:1 (both validly MAC'd, each under its own name)
    ka, kb = f"{prefix}/meta/refs/a:1", f"{prefix}/meta/refs/b:1"
    ea, eb = (raw.get_object(Bucket=bucket, Key=k)["Body"].read() for k in (ka, kb))
    raw.put_object(Bucket=bucket, Key=ka, Body=eb)
    with pytest.raises(TamperedObject):
        open_s3(s3, store.key, tmp_path / "c1").entry("a:1")
    raw.put_object(Bucket=bucket, Key=ka, Body=ea)
    # then replaces every pack with bytes of the same length (a hint still lands in range)
    packs = [o["Key"] for o in raw.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/packs/")["Contents"]]
    assert packs
    for k in packs:
        size = raw.head_object(Bucket=bucket, Key=k)["ContentLength"]
        raw.put_object(Bucket=bucket, Key=k, Body=os.urandom(size))
    reader = open_s3(s3, store.key, tmp_path / "c2")
    with ImageFS.from_store(reader, "a:1") as fs:
        with pytest.raises((CorruptObject, OSError, ConvstoreError)):
            fs.open("/d/small.txt").read()
    with pytest.raises(ConvstoreError):
        reader.unpack_oci("a:1", f"oci:{tmp_path / 'out'}")
    assert not (tmp_path / "out" / "index.json").exists()  # nothing half-written


def test_coalesced_reads_bridge_small_gaps_only(s3, seaweed):
    """Two wanted chunks of one pack with 200 KiB of other chunks between them come in two ranged GETs
    of their own bytes, not one GET that reads the gap too (the bridge is the registry store's 64 KiB);
    chunks 1 KiB apart still come in one GET."""
    from netproxy import CountingProxy

    from convstore.stores.s3 import open_s3 as open_s3_stores

    proxy = CountingProxy(seaweed.endpoint.removeprefix("http://"))
    try:
        _meta, chunks = open_s3_stores(s3, f"http://{proxy.host}")
        blobs = {os.urandom(32): os.urandom(n) for n in (1000, 1024, 1000, 200 << 10, 1000)}
        for cid, blob in blobs.items():
            chunks.put(cid, blob)
        chunks.flush()
        a, near, b, _gap, c = list(blobs)
        hints = {x: chunks.locate(x) for x in (a, b, c)}
        assert all(hints.values())
        proxy.reset()
        got = chunks.get_many([a, b, c], hints)  # type: ignore[arg-type]
    finally:
        proxy.stop()
    assert got == {x: blobs[x] for x in (a, b, c)}
    assert proxy.counts["GET pack"] == 2, proxy.counts  # a..b (1 KiB between: bridged), then c alone
    assert proxy.sent["GET pack"] == 1000 + 1024 + 1000 + 1000, proxy.sent  # the 200 KiB gap never read


def test_spans_of_one_read_come_as_parallel_ranged_gets(s3, seaweed):
    """S3 has no multi-range GET: the 8 spans of one coalesced read (8 chunks of one pack, 200 KiB apart)
    are 8 ranged GETs sent at once, not one after the other: through a 0.3 s proxy they take about one
    round trip, not 8 (a lone S3 node made 79 GETs in a row: 1.86 s against the registry's 0.86 s)."""
    from netproxy import CountingProxy

    from convstore.stores.s3 import open_s3 as open_s3_stores

    proxy = CountingProxy(seaweed.endpoint.removeprefix("http://"), latency_s=0.3)
    try:
        _meta, chunks = open_s3_stores(s3, f"http://{proxy.host}")
        blobs = {os.urandom(32): os.urandom(n) for _ in range(8) for n in (1000, 200 << 10)}
        for cid, blob in blobs.items():
            chunks.put(cid, blob)
        chunks.flush()
        wanted = [c for c, b in blobs.items() if len(b) == 1000]
        hints = {x: chunks.locate(x) for x in wanted}
        assert all(hints.values())
        chunks.get_many(wanted[:1], hints)  # type: ignore[arg-type]  # connections and credentials: then measure
        proxy.reset()
        t = time.monotonic()
        got = chunks.get_many(wanted, hints)  # type: ignore[arg-type]
        took = time.monotonic() - t
    finally:
        proxy.stop()
    assert got == {x: blobs[x] for x in wanted}
    assert proxy.counts["GET pack"] == 8, proxy.counts  # one GET a span: nothing bridged, nothing read twice
    assert proxy.sent["GET pack"] == 8 * 1000, proxy.sent
    assert took < 4 * 0.3, f"{took:.2f} s for 8 GETs of 0.3 s each: not in parallel"


def test_clients_of_one_process_share_the_parsed_api_model_never_the_credentials(s3, seaweed, monkeypatch):
    """A node with a site tier makes two S3 clients (the origin's, the tier's): the S3 API's model is parsed
    once per process (~0.07 CPU s a client), while each client reads the credentials as they are when it is
    made: a client made after the secret changed signs with the new one (refused), the first still reads."""
    first = S3Client(s3)
    first.put("x", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    second = S3Client(s3)
    assert second.s3._loader is first.s3._loader  # one parsed model
    with pytest.raises(ConvstoreError, match="access denied|SignatureDoesNotMatch|InvalidAccessKeyId"):
        second.get("x")
    assert first.get("x") == b"data"
    loader = first.s3._loader
    assert len(loader.search_paths) == len(set(loader.search_paths))  # not one more folder per client
