"""The package type-checks with mypy in strict-optional mode (configuration in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_mypy_strict_optional_passes() -> None:
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict-optional", "convstore"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:]
