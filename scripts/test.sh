#!/usr/bin/env bash
# The test command: set up (Debian packages, then a FRESH virtual environment
# .venv with convstore installed from pyproject.toml only), then run the whole
# suite inside that venv.  The real-image tests build their images with
# scripts/build_images.py on first use (about 2 minutes, cached in
# ~/.cache/convstore-corpus or $CONVSTORE_CORPUS).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(CONVSTORE_FRESH_VENV=1 bash scripts/setup.sh | tail -1)
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
unset PYTHONPATH PYTHONHOME
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
