#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, build a real image
# (the corpus's app1: Debian bookworm + python3), pack it into the default
# local store, show what was stored, then start it lazily (FUSE + runc: only
# the chunks its start touches are read) and unpack it back exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED=${CONVSTORE_SHARED:-$(cd .. && pwd)/shared}
CORPUS=${CONVSTORE_CORPUS:-$HOME/.cache/convstore-corpus}
CORPUS_IMAGES="base app1" bash "$SHARED/corpus/build-corpus.sh" "$CORPUS" >/dev/null

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
rm -rf "$out"
