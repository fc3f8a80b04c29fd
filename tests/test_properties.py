"""Property tests against simple reference models: the merge of layers, the
manifest encoding and the pack index (the tar splitter's are in
test_tarsplit.py)."""

from __future__ import annotations

import stat
import tempfile
from array import array

from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convstore.chunking import ChunkParams
from convstore.crypto import ChunkIdentity
from convstore.manifest import LayerRecord, Manifest, chunk_table
from convstore.merge import merge_layers
from convstore.stores.packs import PackSet
from convstore.tarsplit import TarEntry

# -- the merge of layers -------------------------------------------------------------------------------------
NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{x}/{y}" for x in NAMES for y in NAMES]


def parent(p: str) -> str | None:
    return p.rsplit("/", 1)[0] if "/" in p else None


@st.composite
def layer_ops(draw: st.DrawFn) -> list[tuple[str, str]]:
    """One layer: (kind, path) with kind file | dir | whiteout | opaque; parents are
    explicit dirs listed first; whiteouts and entries never name the same path."""
    chosen = draw(st.lists(st.sampled_from(PATHS), unique=True, max_size=6))
    ops: list[tuple[str, str]] = []
    touched: set[str] = set()
    dirs: set[str] = set()
    whiteouts = [p for p in chosen if draw(st.booleans()) and draw(st.booleans())]
    for p in chosen:
        if p in whiteouts:
            continue
        kind = draw(st.sampled_from(["file", "dir", "opaque"]))
        par = parent(p)
        if par is not None and par not in touched:
            if par in whiteouts:
                continue
            ops.append(("dir", par))
            touched.add(par)
            dirs.add(par)
        if p in touched or (par is not None and par not in dirs):
            continue
        if kind == "opaque":
            ops.append(("dir", p))
            ops.append(("opaque", p))
        else:
            ops.append((kind, p))
        touched.add(p)
        if kind != "file":
            dirs.add(p)
    whiteouts = [w for w in whiteouts if w not in touched and not any(t.startswith(w + "/") for t in touched)
                 and (parent(w) is None or parent(w) in dirs)]
    for w in whiteouts:
        ops.append(("whiteout", w))
    return ops


def entries_of(ops: list[tuple[str, str]], layer: int) -> list[TarEntry]:
    out = []
    for i, (kind, p) in enumerate(ops):
        if kind == "file":
            out.append(TarEntry(p, "0", 0o644, 0, 0, 1, 0, offset=layer * 100 + i))
        elif kind == "dir":
            out.append(TarEntry(p + "/", "5", 0o755, 0, 0, 0, 0))
        elif kind == "whiteout":
            d, _, n = p.rpartition("/")
            out.append(TarEntry((d + "/" if d else "") + ".wh." + n, "0", 0o644, 0, 0, 0, 0))
        else:
            out.append(TarEntry(p + "/.wh..wh..opq", "0", 0o644, 0, 0, 0, 0))
    return out


def model(layers: list[list[tuple[str, str]]]) -> dict[str, object]:
    """OCI layer semantics, spelled out: path -> ("dir",) or ("file", layer, offset)."""
    merged: dict[str, tuple] = {}

    def drop(p: str) -> None:
        for q in [q for q in merged if q == p or q.startswith(p + "/")]:
            del merged[q]

    for li, ops in enumerate(layers):
        lower = set(merged)
        for kind, p in ops:
            if kind == "whiteout":
                drop(p)
            elif kind == "opaque":
                for q in [q for q in lower if q.startswith(p + "/")]:
                    merged.pop(q, None)
        for i, (kind, p) in enumerate(ops):
            if kind == "file":
                drop(p)
                merged[p] = ("file", li, li * 100 + i)
            elif kind == "dir":
                if merged.get(p) != ("dir",):
                    drop(p)
                    merged[p] = ("dir",)
    return merged


@settings(max_examples=300, deadline=None)
@given(st.lists(layer_ops(), min_size=1, max_size=4))
def test_the_merge_of_layers_agrees_with_the_reference_model(layers: list[list[tuple[str, str]]]) -> None:
    tree = merge_layers([entries_of(ops, i) for i, ops in enumerate(layers)])
    got: dict[str, object] = {}
    for path, node in tree.walk():
        if not path:
            continue
        got[path] = ("dir",) if node.is_dir else ("file", node.layer, node.offset) if node.is_file else \
            ("other", stat.S_IFMT(node.mode))
    assert got == model(layers)


# -- manifests ----------------------------------------------------------------------------------------------
ident = st.builds(ChunkIdentity, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32),
                  st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1))
hint = st.one_of(st.none(), st.tuples(st.sampled_from([b"\x01" * 16, b"\x02" * 32, b"\x03" * 32]),
                                      st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)))
text = st.text(max_size=20)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(ident, hint), max_size=40), text, text, st.binary(max_size=200),
       st.dictionaries(text, text, max_size=3), st.booleans())
def test_manifest_encoding_round_trips(chunks, name, tag, config, annotations, with_hints):
    n = len(chunks)
    layer = LayerRecord("application/vnd.oci.image.layer.v1.tar", "sha256:" + "0" * 64, 10, "sha256:" + "1" * 64,
                        100, 50, b"", [(1, 2)], array("I", range(n)),
                        [TarEntry("x", "0", 0o644, 0, 0, 1, 5, offset=0)], None)
    m = Manifest(name=name, tag=tag, source={"ref": "oci:x"}, chunking=ChunkParams(), compression_level=3,
                 domain={"name": "default"}, config_media_type="application/json", config_digest="sha256:x",
                 config_bytes=config, source_manifest_media_type="m", source_manifest_bytes=b"{}",
                 annotations=annotations, layers=[layer], chunks=[c for c, _h in chunks], created="now",
                 locations=[h for _c, h in chunks] if with_hints else [])
    b = m.encode()
    back = Manifest.decode(b)
    assert back == m
    table = chunk_table(b)
    assert bytes(table) == b"".join(c.cid + c.ckey + c.phash + c.size.to_bytes(4, "little") for c, _h in chunks)


# -- the pack index ------------------------------------------------------------------------------------------
op = st.one_of(st.tuples(st.just("put"), st.integers(0, 60)), st.tuples(st.just("flush"), st.just(0)),
               st.tuples(st.just("delete"), st.lists(st.integers(0, 60), max_size=8)),
               st.tuples(st.just("compact"), st.booleans()), st.tuples(st.just("reopen"), st.just(0)))


def cid(i: int) -> bytes:
    return blake3(i.to_bytes(4, "little")).digest()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=60))
def test_the_pack_index_agrees_with_a_dict(ops):
    with tempfile.TemporaryDirectory() as root:
        ps = PackSet(root)
        model: dict[bytes, bytes] = {}
        for kind, arg in ops:
            if kind == "put":
                c = cid(arg)
                ps.put(c, b"v%d" % arg * (1 + arg % 5))
                model.setdefault(c, b"v%d" % arg * (1 + arg % 5))
            elif kind == "flush":
                ps.flush()
            elif kind == "delete":
                ps.delete([cid(i) for i in arg])
                for i in arg:
                    model.pop(cid(i), None)
            elif kind == "compact":
                ps.flush()
                ps.compact(full=arg)
            else:
                ps.flush()
                ps.close()
                ps = PackSet(root)
        for i in range(61):
            c = cid(i)
            assert ps.has(c) == (c in model)
            if c in model:
                assert ps.get(c) == model[c]
        ps.flush()
        assert dict(PackSet(root).entries()) == {c: len(v) for c, v in model.items()}
        ps.close()
