"""The local chunk index: loose pack indexes merged into multi-pack indexes
(mmap + fanout + binary search), location hints in manifests, and their
fallbacks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from blake3 import blake3

from convstore import Store
from convstore.stores.packs import COMPACT_PACKS, PackSet
from imagebuilder import Entry, make_tar, write_oci


def cid(i: int) -> bytes:
    return blake3(i.to_bytes(8, "little")).digest()


def blob(i: int) -> bytes:
    return b"blob-%d-" % i + bytes(50 + i % 7)


def fill(ps: PackSet, start: int, n: int, per_pack: int) -> None:
    for i in range(start, start + n):
        ps.put(cid(i), blob(i))
        if (i - start + 1) % per_pack == 0:
            ps.flush()
    ps.flush()


def files(root: Path, suffix: str) -> list[str]:
    return sorted(n for n in os.listdir(root / "packs") if n.endswith(suffix))


def test_loose_indexes_are_merged_and_a_fresh_view_finds_every_chunk(tmp_path: Path) -> None:
    ps = PackSet(str(tmp_path))
    fill(ps, 0, 40 * 25, per_pack=25)  # 40 packs
    assert len(files(tmp_path, ".idx")) == 40
    midx = files(tmp_path, ".midx")
    assert 1 <= len(midx) <= 6, midx  # size-tiered: a few, not one per flush
    fresh = PackSet(str(tmp_path))  # what another process sees
    for i in range(0, 1000, 37):
        assert fresh.get(cid(i)) == blob(i)
        loc = fresh.locate(cid(i))
        assert loc is not None and loc[2] == len(blob(i))
    assert not fresh.has(cid(5000))
    got = dict(fresh.entries())
    assert len(got) == 1000 and got[cid(3)] == len(blob(3))


def test_a_damaged_multi_pack_index_is_skipped_and_its_packs_read_from_their_own_indexes(tmp_path: Path) -> None:
    ps = PackSet(str(tmp_path))
    fill(ps, 0, COMPACT_PACKS * 10, per_pack=10)
    (name,) = files(tmp_path, ".midx")
    p = tmp_path / "packs" / name
    data = bytearray(p.read_bytes())
    data[40:48] = b"\xff" * 8  # the fanout table
    p.write_bytes(bytes(data))
    fresh = PackSet(str(tmp_path))
    assert all(fresh.get(cid(i)) == blob(i) for i in range(COMPACT_PACKS * 10))
    assert fresh.verify_indexes()  # and verify names it


def test_a_leftover_duplicate_index_changes_nothing_and_the_next_merge_folds_it(tmp_path: Path) -> None:
    ps = PackSet(str(tmp_path))
    fill(ps, 0, COMPACT_PACKS * 10, per_pack=10)
    (name,) = files(tmp_path, ".midx")
    # a merge that crashed after its rename, before removing what it merged
    shutil.copy(tmp_path / "packs" / name, tmp_path / "packs" / ("0" * 32 + ".midx"))
    fresh = PackSet(str(tmp_path))
    assert sorted(c for c, _n in dict(fresh.entries()).items()) == sorted(cid(i) for i in range(COMPACT_PACKS * 10))
    assert fresh.compact(full=True)
    assert len(files(tmp_path, ".midx")) == 1
    assert PackSet(str(tmp_path)).get(cid(7)) == blob(7)


def test_deleting_rewrites_packs_and_a_stale_view_still_finds_the_survivors(tmp_path: Path) -> None:
    ps = PackSet(str(tmp_path))
    fill(ps, 0, COMPACT_PACKS * 20, per_pack=20)
    stale = PackSet(str(tmp_path))
    assert stale.has(cid(1))  # maps the indexes as they are now
    old_loc = stale.locate(cid(2))
    assert old_loc is not None
    ps.delete([cid(i) for i in range(0, COMPACT_PACKS * 20, 2)])
    ps.compact(full=True)
    assert len(files(tmp_path, ".midx")) == 1
    for i in range(1, 40, 2):
        assert stale.get(cid(i)) == blob(i)  # its pack was rewritten: found again through the index
    fresh = PackSet(str(tmp_path))
    assert not fresh.has(cid(2)) and fresh.has(cid(3))
    assert len(dict(fresh.entries())) == COMPACT_PACKS * 10
    # a hint into a pack that gc removed falls back to the index (and to KeyError when the chunk is gone)
    assert fresh.get(cid(3), (old_loc[0], 0, 10)) == blob(3)
    try:
        fresh.get(cid(2), old_loc)
    except KeyError:
        pass
    else:
        raise AssertionError("a deleted chunk was served from a removed pack")


def test_merges_stay_bounded_as_the_store_grows(tmp_path: Path) -> None:
    ps = PackSet(str(tmp_path))
    fill(ps, 0, 300 * 4, per_pack=4)  # 300 packs
    n = len(files(tmp_path, ".midx"))
    assert 1 <= n <= 8, n  # merged, into O(log packs) files, each searched by bisection
    assert len(files(tmp_path, ".idx")) == 300  # every pack keeps its own index (the commit point)
    fresh = PackSet(str(tmp_path))
    assert all(fresh.get(cid(i)) == blob(i) for i in range(0, 1200, 11))


def synthetic(tmp: Path, name: str, seed: int, n: int = 30) -> str:
    entries = [Entry("d/", "dir")] + [Entry(f"d/f{k}", data=blake3(b"%d-%d" % (seed, k)).digest(length=20_000)) for k in range(n)]
    write_oci(str(tmp / name), [make_tar(entries)], compression="gzip")
    return f"oci:{tmp / name}:latest"


def test_manifests_carry_location_hints_and_reads_survive_stale_and_wrong_ones(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "s"), f"file:{tmp_path / 'key'}", state_dir=str(tmp_path / "st"))
    store.pack(synthetic(tmp_path, "big", 1, n=60), "big:1")
    store.pack(synthetic(tmp_path, "a", 1, n=30), "a:1")  # its chunks are big's first ones: stored in big's pack
    m = store.manifest("a:1")
    assert len(m.locations) == len(m.chunks) and all(h is not None for h in m.locations)
    # a wrong hint (another chunk's place) is caught by the chunk check and read again through the index
    plain, _n = store.chunks.read(m.chunks[0], hint=m.locations[1])
    assert len(plain) == m.chunks[0].size
    assert store.verify().clean  # and nothing was quarantined
    # gc rewrites big's pack without big's own chunks: a's hints into it go stale, reads still work
    store.rm("big:1")
    store.gc()
    stale = [h for h in m.locations if h is not None and not store.chunk_store.holds(h)]
    assert len(stale) >= len(m.locations) // 2  # all but a's last chunk or two, which a stored itself
    out = tmp_path / "out"
    store.unpack_oci("a:1", f"oci:{out}")
    assert (out / "index.json").exists()
    # a new pack of the same layer (reused) refreshes the hints
    store.pack(synthetic(tmp_path, "a", 1, n=30), "a:2")
    m2 = store.manifest("a:2")
    assert all(h is not None and store.chunk_store.holds(h) for h in m2.locations)


def test_old_manifests_without_hints_still_read(tmp_path: Path, monkeypatch: object) -> None:
    from convstore import manifest as manifest_mod

    store = Store.open(str(tmp_path / "s"), f"file:{tmp_path / 'key'}", state_dir=str(tmp_path / "st"))
    real = manifest_mod.Manifest.encode

    def v1(self: manifest_mod.Manifest) -> bytes:  # what a version-1 writer stored
        self.locations = []
        b = real(self)
        return b[:8] + (1).to_bytes(4, "little") + b[12:]

    monkeypatch.setattr(manifest_mod.Manifest, "encode", v1)  # type: ignore[attr-defined]
    store.pack(synthetic(tmp_path, "a", 1), "a:1")
    monkeypatch.undo()  # type: ignore[attr-defined]
    m = store.manifest("a:1")
    assert m.locations == []
    store.unpack_oci("a:1", f"oci:{tmp_path / 'out'}")


def test_verify_finds_a_damaged_multi_pack_index_and_repair_rebuilds_it(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "s"), f"file:{tmp_path / 'key'}", state_dir=str(tmp_path / "st"))
    for i in range(COMPACT_PACKS):
        store.pack(synthetic(tmp_path, f"i{i}", i, n=3), f"i{i}:1")
    (name,) = files(tmp_path / "s", ".midx")
    p = tmp_path / "s" / "packs" / name
    data = bytearray(p.read_bytes())
    data[-40] ^= 1  # a record's length field: the structure holds, the checksum does not
    p.write_bytes(bytes(data))
    r = store.verify()
    assert not r.clean and r.index_problems and "checksum" in r.index_problems[0]
    r = store.verify(repair=True)
    assert "chunk index" in r.repaired
    assert store.verify().clean
    store.unpack_oci("i3:1", f"oci:{tmp_path / 'out'}")


def _store_with_merged_index(tmp_path: Path) -> Store:
    store = Store.open(str(tmp_path / "s"), f"file:{tmp_path / 'key'}", state_dir=str(tmp_path / "st"))
    store.pack(synthetic(tmp_path, "a", 1, n=12), "a:1")
    store.chunk_store.compact()  # everything in one multi-pack index
    return store


def test_a_planted_multi_pack_index_cannot_make_gc_drop_a_live_chunk(tmp_path: Path) -> None:
    from convstore.stores.index import encode_midx, record

    store = _store_with_merged_index(tmp_path)
    m = store.manifest("a:1")
    live = next(c.cid for c in m.chunks if c.cid[0] != 0)
    loc = store.chunk_store.locate(live)
    assert loc is not None
    # a record of a live chunk filed under first byte 0x00: a naive sweep would think it unreferenced
    body = bytearray(encode_midx([record(b"\0" + live[1:], loc[0], loc[1], loc[2])]))
    off = body.index(b"\0" + live[1:])
    body[off : off + 32] = live
    body[-32:] = blake3(bytes(body[:-32])).digest()  # a planted file with a consistent checksum
    (tmp_path / "s" / "packs" / ("f" * 32 + ".midx")).write_bytes(bytes(body))
    store.gc()
    assert store.verify().clean
    store.unpack_oci("a:1", f"oci:{tmp_path / 'out'}")


def test_a_damaged_index_record_never_gets_a_good_chunk_quarantined(tmp_path: Path) -> None:
    store = _store_with_merged_index(tmp_path)
    m = store.manifest("a:1")
    by_offset = sorted(m.chunks, key=lambda c: store.chunk_store.locate(c.cid)[1])  # type: ignore[index]
    (name,) = files(tmp_path / "s", ".midx")
    p = tmp_path / "s" / "packs" / name
    data = bytearray(p.read_bytes())
    for ident in (by_offset[0], by_offset[-1]):  # the last one's damaged record reads past the pack's end
        at = data.index(ident.cid) + 48  # its offset field
        data[at : at + 8] = (int.from_bytes(data[at : at + 8], "little") + 1).to_bytes(8, "little")
    data[-32:] = blake3(bytes(data[:-32])).digest()  # a consistent-looking file
    p.write_bytes(bytes(data))
    fresh = Store.open(str(tmp_path / "s"), f"file:{tmp_path / 'key'}", state_dir=str(tmp_path / "st"))
    for ident in (by_offset[0], by_offset[-1]):
        plain, _n = fresh.chunks.read(ident)  # no hint: the damaged record, then the pack's own index
        assert len(plain) == ident.size
    assert not list(fresh.objects.list("quarantine"))
    assert fresh.verify().clean
