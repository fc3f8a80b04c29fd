"""Every third-party module that the project imports is declared in pyproject.toml.

The package (``convstore/``) may import only its runtime ``dependencies``, or a
module of an optional extra, and then only inside a ``try: ... except
ImportError:`` whose handler raises an error naming the extra.  ``tests/``,
``benchmarks/`` and ``scripts/`` may also use the ``test`` extra (``benchmarks/`` the ``bench`` one too).  Module names are
mapped to distributions with the installed metadata
(``importlib.metadata.packages_distributions``), so a module installed by hand
but never declared fails here as surely as a missing one.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Import:
    module: str  # top-level name
    where: str  # file:line
    guarded_extra: str | None  # the extra named by an enclosing `except ImportError` handler, if any


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, req
    return _norm(m.group(1))


def declared(root: Path) -> tuple[set[str], dict[str, set[str]]]:
    with open(root / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    runtime = {_req_name(r) for r in project["dependencies"]}
    extras = {k: {_req_name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def _extra_named(handler: ast.ExceptHandler) -> str | None:
    """The extra a handler names in its message (pip install 'convstore[EXTRA]')."""
    for node in ast.walk(handler):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.search(r"convstore\[([a-z0-9-]+)\]", node.value)
            if m:
                return m.group(1)
    return None


def _catches_import_error(h: ast.ExceptHandler) -> bool:
    names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def imports_of(path: Path, local: set[str], root: Path = REPO) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[Import] = []

    def visit(node: ast.AST, extra: str | None) -> None:
        if isinstance(node, ast.Try):
            guard = next((_extra_named(h) or "?" for h in node.handlers if _catches_import_error(h)), None)
            for child in node.body:
                visit(child, guard or extra)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, extra)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            top = n.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                out.append(Import(top, f"{path.relative_to(root)}:{node.lineno}", extra))  # type: ignore[attr-defined]
        for child in ast.iter_child_nodes(node):
            visit(child, extra)

    visit(tree, None)
    return out


def local_modules(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}


def problems(folder: str, allowed_extras: tuple[str, ...], root: Path = REPO) -> list[str]:
    runtime, extras = declared(root)
    allowed = set(runtime).union(*(extras.get(e, set()) for e in allowed_extras))
    dists = {mod: {_norm(d) for d in ds} for mod, ds in importlib.metadata.packages_distributions().items()}
    # the project's own helper modules (benchmarks import the tests' image builder)
    local = {"convstore"}.union(*(local_modules(root / d) for d in (folder, "tests", "benchmarks", "scripts")
                                  if (root / d).is_dir()))
    out = []
    for py in sorted((root / folder).rglob("*.py")):
        for imp in imports_of(py, local, root):
            provided_by = dists.get(imp.module)
            if not provided_by:
                out.append(f"{imp.where}: imports {imp.module!r}, which no installed distribution provides "
                           "(declare it in pyproject.toml)")
                continue
            if provided_by & allowed:
                continue
            extra = next((e for e, reqs in extras.items() if provided_by & reqs), None)
            if extra is not None and imp.guarded_extra == extra:
                continue  # an optional extra, imported under a guard that names it
            what = f"is in the extra [{extra}] but not imported under an ImportError guard naming it" if extra \
                else "is not declared in pyproject.toml"
            out.append(f"{imp.where}: {imp.module!r} (distribution {', '.join(sorted(provided_by))}) {what}")
    return out


def test_package_imports_are_declared() -> None:
    assert problems("convstore", ()) == []


def test_tests_benchmarks_and_scripts_imports_are_declared() -> None:
    for folder in ("tests", "scripts"):
        assert problems(folder, ("test",)) == [], folder
    assert problems("benchmarks", ("test", "bench")) == []  # scripts/setup.sh --bench installs both


def test_removing_a_dependency_from_pyproject_fails_the_check(tmp_path: Path) -> None:
    """The check can fail: the same package against a pyproject.toml without ``oras``."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\s*"oras[><=]', text, re.M)
    (tmp_path / "pyproject.toml").write_text(re.sub(r'^\s*"oras[^\n]*\n', "", text, flags=re.M))
    (tmp_path / "convstore").symlink_to(REPO / "convstore")
    found = problems("convstore", (), root=tmp_path)
    assert found and all("'oras'" in p and "not declared" in p for p in found), found
    assert any(p.startswith("convstore/oci/registry_client.py:") for p in found)


def test_unguarded_extra_and_unknown_modules_are_reported(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = []\n'
        '[project.optional-dependencies]\npkcs11 = ["python-pkcs11"]\naws = ["boto3"]\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "import boto3\n"
        "try:\n    import pkcs11\nexcept ImportError:\n    raise E(\"pip install 'convstore[pkcs11]'\")\n"
        "import surely_not_a_module_xyz\n")
    found = problems("pkg", (), root=tmp_path)
    assert len(found) == 2, found
    assert "'boto3'" in found[0] and "extra [aws] but not imported under an ImportError guard" in found[0]
    assert "'surely_not_a_module_xyz'" in found[1] and "no installed distribution" in found[1]
