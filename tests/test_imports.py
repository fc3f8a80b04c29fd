"""No import cycle anywhere in ``convstore/``: layers import downward only.

The graph is built with :mod:`ast` from the source, not by importing it, so
every ``import`` and ``from ... import`` statement counts wherever it stands:
at module level, inside a function (a lazy import is still a dependency), and
inside an ``if TYPE_CHECKING:`` block.  TYPE_CHECKING-only imports count
deliberately: a type a module names is a dependency of its design even when
the interpreter never executes the import, and a cycle hidden behind
TYPE_CHECKING is the same tangle a reader has to untangle.

Resolution rules:

- a module is a node named by its dotted path (``convstore.stores.local``); a
  package is the node of its ``__init__.py`` (``convstore.stores``);
- relative imports resolve against the importing module's package (a
  package's ``__init__`` is its own package);
- ``from P import name`` is an edge to ``P.name`` when that is a module of
  the tree, else to ``P`` (a name defined in, or re-exported by, P's
  ``__init__``);
- importing ``P.m`` is an edge to ``P.m`` only, not to the parent packages
  whose ``__init__`` Python also runs: ``convstore/__init__.py`` re-exports the
  public API lazily (PEP 562), so an edge from every module to it would make
  every module a cycle with the facade.  Its own imports do count (its edges
  go down like any other module's).
- dynamic imports (``importlib.import_module(name)``) are not statements and
  are not seen.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "convstore"
ROOT = PACKAGE.name


def _modules(package: Path) -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module of the tree: first line importing it}."""
    mods = _modules(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        pkg = mod if _is_package(path) else mod.rpartition(".")[0]
        edges = graph[mod]

        def add(target: str, line: int) -> None:
            if target in mods and target != mod:
                edges.setdefault(target, line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + "."):
                        add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = pkg.split(".")
                    if node.level > 1:
                        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not (base == root or base.startswith(root + ".")):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in mods else base, node.lineno)
    return graph


def _sccs(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out, key=lambda c: (-len(c), c))


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component."""
    prev: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w not in within:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle")


def _short(mod: str) -> str:
    return mod[len(ROOT) + 1:] if mod.startswith(ROOT + ".") else mod


def describe_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """One paragraph per cycle (strongly connected component): its modules,
    and for each module a shortest cycle through it, e.g. ``store -> pack -> store``."""
    lines: list[str] = []
    for comp in _sccs(graph):
        within = set(comp)
        lines.append(f"{len(comp)}-module cycle: {', '.join(_short(m) for m in comp)}")
        shown: set[tuple[str, ...]] = set()
        for m in comp:
            cyc = _shortest_cycle(graph, m, within)
            # one rotation per distinct cycle
            body = cyc[:-1]
            i = body.index(min(body))
            key = tuple(body[i:] + body[:i])
            if key in shown:
                continue
            shown.add(key)
            hops = " -> ".join(
                f"{_short(a)}:{graph[a][b]}" for a, b in zip(cyc, cyc[1:]))
            lines.append(f"  {' -> '.join(_short(x) for x in cyc)}    (at {hops})")
    return lines


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The builder itself: lazy, TYPE_CHECKING, relative, ``from pkg import module`` and package imports."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text("import p.sub\nfrom ..a import f\nfrom p import nothing_here\n")
    g = import_graph(pkg)
    assert g == {
        "p": {"p.a": 1},
        "p.a": {"p.b": 2},
        "p.b": {"p.sub.c": 3},
        "p.sub": {"p.a": 1},
        "p.sub.c": {"p.sub": 1, "p.a": 2, "p": 3},
    }
    assert [c for c in _sccs(g)] == [["p", "p.a", "p.b", "p.sub", "p.sub.c"]]
    text = "\n".join(describe_cycles(g))
    assert "a -> b -> sub.c -> a" in text.replace("p.", "")


def test_no_import_cycle_in_convstore() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["convstore.store"], "the graph was not built"
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles in convstore/ (layers must import downward only):\n" + "\n".join(cycles)


# -- what a warm `convstore run` imports ---------------------------------------------------------
#: modules a run on a kept mount used to import at its start and never uses (issue 24: its own process
#: is mostly the interpreter and its imports): layer decompression (isal), the tar splitter (tarfile),
#: the socket module's enums, docker reference parsing (an image packed from oci:)
RUN_NEEDS_NONE_OF = ("isal", "tarfile", "convstore.tarsplit", "socket", "convstore.oci.dockerref",
                     "convstore.reader", "mfusepy", "rich")

_WARM_RUN = """
import json, sys
from convstore.__main__ import main  # the entry point, as `convstore run` starts
from convstore import cli
from convstore.engines import keeper
from convstore.engines.run import process_spec  # run_image's module and its imports
from convstore.oci.policy import require

cli.state.store_path, cli.state.key_spec = sys.argv[1], sys.argv[2]
store = cli._store()
policy = cli._policy(sys.argv[3])
entry = store.open_entry("app:1")
# run_image's steps before it hands over to a kept mount (engines/run.py): the keep key, the cached head
key = store.manifests.keep_key(entry)
manifest = keeper.load_head(key, store.manifests.ident.id, entry)
assert manifest is not None, "no cached head"
require(policy, manifest, "app:1")
process_spec(sys.argv[4], json.loads(manifest.config_bytes), None)
print(json.dumps(sorted(sys.modules)))
"""


def test_a_warm_run_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    """The modules a `convstore run` on a kept mount imports before its container starts: the command line,
    the store, the policy, the keep key and the cached manifest head -- and none of RUN_NEEDS_NONE_OF."""
    import json
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from imagebuilder import Entry, make_tar, write_oci

    import convstore
    from convstore.engines import keeper

    keyfile = tmp_path / "key"
    env = {**os.environ, "CONVSTORE_KEEP_DIR": str(tmp_path / "keep"), "CONVSTORE_DAEMON": "0"}
    os.environ["CONVSTORE_KEEP_DIR"] = env["CONVSTORE_KEEP_DIR"]
    try:
        write_oci(str(tmp_path / "img"), [make_tar([Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")])],
                  config_extra={"config": {"Cmd": ["/bin/true"]}})
        store = convstore.Store.open(str(tmp_path / "store"), f"file:{keyfile}")
        store.pack(f"oci:{tmp_path / 'img'}", "app:1")
        e = store.open_entry("app:1")
        keeper.save_head(store.manifests.keep_key(e), store.manifests.ident.id, e,
                         store.manifests.load(e, head_only=True))  # as the kept mount's first run did
    finally:
        del os.environ["CONVSTORE_KEEP_DIR"]
    policy = tmp_path / "policy.json"  # a policy file with a docker scope: parsed on every run
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}],
                                  "transports": {"docker": {"registry.example/app": [{"type": "reject"}]}}}))
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", _WARM_RUN, str(tmp_path / "store"), f"file:{keyfile}", str(policy),
                        str(rootfs)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.splitlines()[-1]))
    assert {"typer", "convstore.core.repository", "convstore.engines.run", "cryptography"} <= {
        m for m in loaded if m.count(".") <= 2}, "the script did not take a run's path"
    unused = sorted(m for m in loaded if m in RUN_NEEDS_NONE_OF or m.split(".")[0] in RUN_NEEDS_NONE_OF
                    or any(m.startswith(p + ".") for p in RUN_NEEDS_NONE_OF))
    assert unused == [], f"a warm run imports modules it does not use: {unused}"


def test_a_command_line_builds_only_its_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """typer makes a click command of every command it is given on each start: a command line naming one
    command (after global options, valued or flags, ``--opt=value`` too) is given that command, and the
    services if a config file is read (its sections name them); anything else the whole tree, which answers
    as before."""
    from typer.main import get_command

    from convstore import cli
    from convstore.service.config import SERVICES

    def built(argv: list[str]) -> set[str]:
        return set(get_command(cli._app_for(argv)).commands)  # type: ignore[attr-defined]

    monkeypatch.setenv("CONVSTORE_CONFIG", "")  # no config file
    everything = built([])
    assert {"run", "images", "domain", *SERVICES} <= everything
    assert built(["--store", "images", "--key=file:/k", "-q", "--insecure", "run", "app:1"]) == {"run"}
    assert built(["--store=/s", "domain", "list"]) == {"domain"}
    assert built(["--config", "/c.toml", "run", "app:1"]) == built(["--config=/c.toml", "run"]) == {"run", *SERVICES}
    (tmp_path / "c.toml").write_text("version = 1\n")
    monkeypatch.setenv("CONVSTORE_CONFIG", str(tmp_path / "c.toml"))
    assert built(["run", "app:1"]) == {"run", *SERVICES}
    monkeypatch.setenv("CONVSTORE_CONFIG", str(tmp_path / "missing.toml"))  # an error the callback reports
    assert built(["run", "app:1"]) == {"run", *SERVICES}
    for argv in (["--help"], ["--store", "/s"], ["imagez"], ["--stor", "/s", "run"], ["-qx", "run"], ["--", "run"]):
        assert built(argv) == everything, argv
