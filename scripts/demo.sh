#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up (Debian packages and the
# .venv), build a real image with the project's own builder (app1: Debian
# bookworm + python3), pack it into the default local store, show what was
# stored, start it lazily (FUSE + runc: only the chunks its start touches are
# read) and unpack it back exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -1)
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
CORPUS=${CONVSTORE_CORPUS:-$HOME/.cache/convstore-corpus}
python scripts/build_images.py --out "$CORPUS" base app1 >/dev/null

set -x
convstore pack "oci:$CORPUS/base:latest" demo/base:latest
convstore pack "oci:$CORPUS/app1:latest" demo/app1:latest
convstore images
convstore inspect demo/app1:latest
convstore stats
convstore ls -l demo/app1:latest /usr/bin/python3
convstore cat --stats demo/app1:latest /etc/os-release
convstore run --stats demo/app1:latest                     # cold: records a start-up profile
convstore run --stats demo/app1:latest -- python3 -c "import sys; print(sys.version)"
out=$(mktemp -d)
convstore unpack demo/app1:latest "oci:$out/layout:latest"  # byte-identical config, every diff_id verified
skopeo inspect "oci:$out/layout:latest" | head -4
# exact: the unpacked image's config is the original's, byte for byte (so every diff_id is too)
cmp <(skopeo inspect --raw --config "oci:$CORPUS/app1:latest") <(skopeo inspect --raw --config "oci:$out/layout:latest")
{ set +x; } 2>/dev/null
rm -rf "$out"
echo "demo: packed, ran lazily and unpacked demo/app1:latest exactly"
