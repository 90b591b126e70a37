#!/usr/bin/env bash
# A plain directory tree replicated on the embedded default (a local slave).
# Builds georep, creates a small snapshot store, replicates it, changes it
# the way a backup appliance does, replicates again, and checks the copy.
set -euo pipefail
cd "$(dirname "$0")/.."
packaging/setup.sh
cargo build --release --quiet
G=$PWD/target/release/georep
WORK=${GEOREP_DEMO_DIR:-$(mktemp -d /var/tmp/georep-demo.XXXXXX)}
export GEOREP_HOME=$WORK/home
store=$WORK/store replica=$WORK/replica
mkdir -p "$store/hosts/web01/disks" "$store/hosts/db01/disks" "$store/catalog"

echo "== a snapshot store in $store"
head -c 64M /dev/urandom > "$store/hosts/web01/disks/disk0.img"
truncate -s 256M "$store/hosts/db01/disks/disk0.img"            # sparse: mostly holes
head -c 8M /dev/urandom | dd of="$store/hosts/db01/disks/disk0.img" bs=1M seek=100 conv=notrunc status=none
head -c 16M /dev/urandom > "$store/hosts/db01/disks/journal.cdp"
echo '{"host":"web01","disks":["disk0.img"]}' > "$store/catalog/web01.json"

echo "== georep create demo (local slave $replica)"
"$G" create demo "$store" "$replica" --marker mark
echo "== georep sync demo --json (first sync: full crawl)"
"$G" sync demo --json

echo "== the appliance writes: 1% of the image's 4 KiB blocks, a journal append, a new record"
python3 - "$store/hosts/web01/disks/disk0.img" <<'PY'
import os, random, sys
f = os.open(sys.argv[1], os.O_WRONLY); size = os.fstat(f).st_size; r = random.Random(1)
for _ in range(size // 4096 // 100):
    os.pwrite(f, os.urandom(4096), r.randrange(size // 4096) * 4096)
PY
head -c 4M /dev/urandom >> "$store/hosts/db01/disks/journal.cdp"
echo '{"host":"db01","disks":["disk0.img"]}' > "$store/catalog/db01.json"
"$G" mark "$store/hosts/web01/disks/disk0.img" "$store/hosts/db01/disks/journal.cdp" "$store/catalog/db01.json"

echo "== georep sync demo --json (xtime crawl: only what changed, as deltas)"
"$G" sync demo --json
echo "== georep sync demo --json (nothing changed: the root only)"
"$G" sync demo --json

diff -r --exclude=.georep "$store" "$replica" && echo "== replica equals the store (state in $WORK)"
