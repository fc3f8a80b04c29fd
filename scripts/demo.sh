#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, build a real image
# (the corpus's app1: Debian bookworm + python3), pack it into the default
# local store, show what was stored, then unpack its root filesystem and run
# its command in it.
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
out=$(mktemp -d)
convstore unpack demo/app1:latest --rootfs "$out/rootfs"
convstore unpack demo/app1:latest "oci:$out/layout:latest"
skopeo inspect "oci:$out/layout:latest" | head -5
unshare --mount --pid --fork --mount-proc="$out/rootfs/proc" chroot "$out/rootfs" /usr/bin/python3 -c "print('hello')"
rm -rf "$out"
