#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite, corpus tests
# included (they build the corpus from ../shared on first use, ~3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q -p no:cacheprovider "$@" tests
