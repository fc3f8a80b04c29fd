#!/usr/bin/env bash
# Install what convstore, its tests and its demo need on a fresh Debian machine:
#  1. the Debian tools they drive for real (apt; idempotent);
#  2. a virtual environment .venv (no system site-packages) holding convstore
#     (editable) and its test extras, installed from pyproject.toml only.
# The venv is rebuilt from scratch when pyproject.toml or the interpreter changed,
# or always with CONVSTORE_FRESH_VENV=1 (scripts/test.sh sets it), so nothing
# installed by hand can stand in for an undeclared dependency.
# With --bench, also the peers and tools the benchmark suite compares with
# (borg, restic, casync, hyperfine).
# Prints the venv's path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=0
[ "${1:-}" = "--bench" ] && BENCH=1

APT_PACKAGES=(skopeo umoci runc fuse3 libfuse3-3 zstd mmdebstrap arch-test uidmap util-linux softhsm2
              docker-registry python3-venv ca-certificates podman containerd)
[ $BENCH = 1 ] && APT_PACKAGES+=(borgbackup restic casync hyperfine time)
# the bench extra (matplotlib, py-spy) too: the dependency check reads the benchmarks' imports
EXTRAS=test,bench
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
VENV=${CONVSTORE_VENV:-$PWD/.venv}
stamp=$( (sha256sum pyproject.toml; echo "$EXTRAS"; "$PY" -c 'import sys; print(sys.version, sys.executable)') | sha256sum | cut -c1-16)
if [ "${CONVSTORE_FRESH_VENV:-0}" = 1 ] || [ "$(cat "$VENV/.convstore-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: creating a fresh virtual environment in $VENV (pip install -e '.[$EXTRAS]')" >&2
  "$PY" -m venv --clear "$VENV"
  pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
             | { grep -v -e "^WARNING: Location 'file:" -e "Running pip as the 'root' user" >&2 || true; }; }
  pip_q --upgrade pip
  pip_q -e ".[$EXTRAS]"
  echo "$stamp" >"$VENV/.convstore-stamp"
fi
"$VENV/bin/python" -c "import convstore.cli, convstore.stores.registry" \
  || { echo "setup: convstore does not import in $VENV" >&2; exit 1; }
echo "$VENV"
