#!/usr/bin/env bash
# Walk one image through every lifecycle state with the CLI, moving time
# with CONVSTORE_NOW (epoch seconds).  Uses a throwaway store and key.
# Usage: bash scripts/lifecycle-walkthrough.sh [CORPUS_DIR]
set -euo pipefail
C=${1:-$HOME/.cache/convstore-corpus}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export CONVSTORE_STORE=$W/store CONVSTORE_KEY=file:$W/key/master.key CONVSTORE_STATE_DIR=$W/state
cp -r "$C/base" "$W/src"
now=$(date +%s)
step() { echo; echo "\$ $*"; "$@" 2>&1 || echo "(exit $?)"; }
show() { convstore images | sed -n '2p' | awk '{print "   state:", $3, $4, $5}'; }

echo "# PENDING -> ACTIVE: pack"
step convstore pack "oci:$W/src:latest" demo:1; show
echo; echo "# ACTIVE -> INACTIVE: 15 days without reads (--inactive-after 14d)"
export CONVSTORE_NOW=$((now + 15 * 86400))
step convstore refresh; show
step convstore gc
echo; echo "# INACTIVE -> PENDING (reactivating) -> ACTIVE: the first read is refused and starts a re-pack"
step convstore run demo:1
for _ in $(seq 100); do convstore images | grep -qw "ACTIVE" && break; sleep 0.1; done; show
step convstore run demo:1
echo; echo "# ACTIVE -> FAILED: the source image is gone"
mv "$W/src" "$W/src.gone"
step convstore refresh; show
step convstore run demo:1
echo; echo "# FAILED -> ACTIVE: the source is back"
mv "$W/src.gone" "$W/src"
step convstore refresh; show
echo; echo "# another master key can neither read nor change anything: the catalog is authenticated"
python3 -c 'import convstore, sys; convstore.LocalKeyFile(sys.argv[1])' "$W/other/master.key"  # a key named with --key must exist
step convstore --key "file:$W/other/master.key" refresh
step convstore --key "file:$W/other/master.key" run demo:1
show
echo; echo "# history"
convstore inspect --json demo:1 | python3 -c "import json,sys; [print('  ', h['at'], h['state'].upper(), '-', h['reason']) for h in json.load(sys.stdin)['history']]"
