"""The distribution that `pip install .` builds holds the whole package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_module_and_py_typed(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("convstore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "convstore").rglob("*.py")} | {"convstore/py.typed"}
    assert expected - names == set()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "convstore = convstore.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    import convstore

    assert f"\nVersion: {convstore.__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return {m.split(".")[0] for m in out.split()}


def test_imports_stay_lazy() -> None:
    """Start-up time is budgeted (docs/benchmarks.md): the package and the
    command tree import neither the crypto, FUSE or chunking libraries nor
    rich until a command uses them."""
    heavy = {"rich", "typer", "cryptography", "mfusepy", "pyfastcdc", "zstandard", "oras", "requests", "pydantic"}
    assert _modules_after("import convstore") & heavy == set()
    assert _modules_after("import convstore.cli") & heavy == {"typer"}
    assert "cryptography" in _modules_after("import convstore; convstore.Store")


def test_version_fast_path() -> None:
    import convstore

    r = subprocess.run([sys.executable, "-m", "convstore", "--version"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"convstore {convstore.__version__}\n")
    # the entry point answers it before typer and the command tree are imported (the start-up budget)
    code = ("import sys; sys.argv = ['convstore', '--version']; from convstore.__main__ import main; main(); "
            "print(sorted(m for m in ('typer', 'rich', 'convstore.cli') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == f"convstore {convstore.__version__}\n[]\n", r.stderr
    r = subprocess.run([sys.executable, "-m", "convstore", "-q", "--version"], capture_output=True, text=True,
                       timeout=60)  # through the command tree
    assert (r.returncode, r.stdout) == (0, f"convstore {convstore.__version__}\n")
