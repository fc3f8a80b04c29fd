#!/usr/bin/env bash
# Install what convstore, its tests and its demo need on a fresh Debian machine:
#  1. the Debian tools they drive for real (apt; idempotent);
#  2. a virtual environment .venv (no system site-packages) holding convstore
#     (editable, strict mode) and its test extras, installed from pyproject.toml only.
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
              docker-registry python3-venv ca-certificates podman containerd nginx-light
              systemd  # systemd-analyze: tests/test_services.py verifies the units in contrib/systemd
              erofs-utils)  # fsck.erofs: tests/test_erofs.py validates the EROFS images convstore writes
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
pip_q() { PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
           | { grep -v -e "^WARNING: Location 'file:" -e "Running pip as the 'root' user" >&2 || true; }; }
# convstore is installed editable in setuptools' strict mode: links to the checkout's files from
# build/__editable__.*, named by one static path.  The default mode's import hook costs every
# process 13 ms of start-up (docs/benchmarks.md), where a user's installed wheel costs none; a new
# module needs the links made again, which the module-list stamp below does.
EDITABLE=(--config-settings editable_mode=strict)
if [ "${CONVSTORE_FRESH_VENV:-0}" = 1 ] || [ "$(cat "$VENV/.convstore-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: creating a fresh virtual environment in $VENV (pip install -e '.[$EXTRAS]')" >&2
  "$PY" -m venv --clear "$VENV"
  pip_q --upgrade pip
  pip_q -e ".[$EXTRAS]" "${EDITABLE[@]}"
  rm -f "$VENV/.convstore-modules"
  echo "$stamp" >"$VENV/.convstore-stamp"
fi
modules=$(find convstore -name '*.py' -not -path '*/__pycache__/*' -o -name py.typed | sort | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.convstore-modules" 2>/dev/null)" != "$modules" ]; then
  [ -f "$VENV/.convstore-modules" ] && echo "setup: convstore's modules changed: linking them again" >&2
  pip_q --no-deps -e . "${EDITABLE[@]}"
  echo "$modules" >"$VENV/.convstore-modules"
fi
# convstore's own modules byte-compiled once (pip compiled the dependencies at install): where
# PYTHONDONTWRITEBYTECODE is set, as in some sandboxes, every process would otherwise compile them again
# (~70 ms of CPU per start); a stale .pyc is recompiled in memory by its mtime check, so this is only a cache.
"$VENV/bin/python" -m compileall -q convstore >/dev/null
# containers/image's own signature fixtures (signatures made by real cosign and skopeo), from Debian's
# golang-github-containers-image-dev: tests/test_signatures.py checks convstore's verifier against them.
# Only that package's files are unpacked (apt-get download, dpkg-deb -x), not its 300 Go build dependencies.
FIX="$VENV/share/containers-image-fixtures"
if [ ! -f "$FIX/cosign.pub" ]; then
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt downloads as _apt
  fetch_fixtures() { (cd "$tmp" && apt-get download -qq golang-github-containers-image-dev 2>/dev/null); }
  if ! fetch_fixtures; then  # no package lists yet (the Debian tools were already installed): read them once
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    fetch_fixtures || { echo "setup: apt-get download golang-github-containers-image-dev failed" >&2; exit 1; }
  fi
  dpkg-deb -x "$tmp"/golang-github-containers-image-dev_*.deb "$tmp/x"
  mkdir -p "$FIX"
  cp -r "$tmp"/x/usr/share/gocode/src/github.com/containers/image/signature/fixtures/. "$FIX/"
  rm -rf "$tmp"
fi
"$VENV/bin/python" -c "import convstore.cli, convstore.stores.registry" \
  || { echo "setup: convstore does not import in $VENV" >&2; exit 1; }
echo "$VENV"
