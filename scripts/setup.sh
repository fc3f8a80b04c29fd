#!/usr/bin/env bash
# Install everything convstore and its tests need on a fresh Debian machine:
# the Debian tools the tests drive for real, then convstore itself (editable)
# with its test extras.  Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(skopeo umoci runc fuse3 libfuse3-3 zstd mmdebstrap arch-test uidmap util-linux softhsm2 docker-registry)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e "Running pip as the 'root' user" -e "^WARNING: Location" || true
python3 -c "import convstore" || { echo "setup: convstore did not install" >&2; exit 1; }
