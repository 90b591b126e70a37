#!/usr/bin/env bash
# Catalog-mode measurements (local slave; numbers, never assertions):
#  A. a new full image whose parent (~90% equal) is on the slave: bytes georep
#     sends, against the file's size and against rsync with the parent's copy
#     as its basis;
#  B. 64 MiB of CDP points appended to a big journal: bytes and time, against
#     rsync (delta, and --append-verify) updating a copy of the journal.
# BENCH_IMAGE (default 512M) and BENCH_JOURNAL_GIB (default 4) set the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
packaging/setup.sh
cargo build --release --quiet
G=$PWD/target/release/georep
WORK=${GEOREP_BENCH_DIR:-$(mktemp -d /var/tmp/georep-bench-catalog.XXXXXX)}
export GEOREP_HOME=$WORK/home
IMAGE=${BENCH_IMAGE:-512M}
JGIB=${BENCH_JOURNAL_GIB:-4}
now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 2))"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(str(eval(e, {'d': d})) for e in sys.argv[1:]))" "$@"; }

echo "== A. a new full image, its parent on the slave ($IMAGE disk, fully written, 10% of blocks rewritten)"
A=$WORK/a
"$G" sample-store "$A/store" --hosts 1 --kinds qcow --disks 1 --disk-size "$IMAGE" --fill 1 --snapshots 1 >/dev/null
"$G" create a "$A/store" "$A/replica" --mode continuous >/dev/null
"$G" sync a --json >/dev/null
"$G" sample-store "$A/store" --advance --only snapshot --change 0.10 >/dev/null
new=$(ls "$A/store/hosts/host01/disks/disk0/"*.qcow2 | sort | tail -1)
old=$(ls "$A/replica/hosts/host01/disks/disk0/"*.qcow2 | sort | tail -1)
"$G" sync a --json > "$A/sync.json"
size=$(stat -c %s "$new")
read -r sent wire ms <<<"$(json 'd["bytes_sent"]' 'd["wire_bytes_out"]' 'd["duration_ms"]' < "$A/sync.json")"
mkdir -p "$A/rsync"
cp "$old" "$A/rsync/$(basename "$new")"
rs=$(rsync --no-whole-file --stats "$new" "$A/rsync/" 2>&1)
rs_sent=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' <<<"$rs" | tr -d ,)
rs_lit=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' <<<"$rs" | tr -d ,)
echo "image size:            $size bytes"
echo "georep:                $sent payload bytes, $wire bytes on the wire, $ms ms"
echo "rsync (parent as basis): $rs_sent bytes sent ($rs_lit literal)"
echo "rsync (no basis):      ~$size bytes (whole file)"

echo "== B. 64 MiB of CDP points appended to a ${JGIB} GiB journal"
B=$WORK/b
"$G" sample-store "$B/store" --hosts 1 --kinds cdp --disks 1 --disk-size 1G --snapshots 1 --points 4 --max-write 1M >/dev/null
"$G" create b "$B/store" "$B/replica" --mode continuous >/dev/null
"$G" sync b --json >/dev/null
journal=$(ls "$B/store/hosts/host01/disks/disk0/"*.cdp)
target=$((JGIB << 30))
while [ "$(stat -c %s "$journal")" -lt "$target" ]; do
    "$G" sample-store "$B/store" --advance --only cdp --points 700 --max-write 1M >/dev/null
    "$G" sync b --json >/dev/null
done
slave_journal=$(ls "$B/replica/hosts/host01/disks/disk0/"*.cdp)
echo "master journal: $(stat -c %s "$journal") bytes; replica journal: $(stat -c %s "$slave_journal") bytes"
mkdir -p "$B/rsync"
cp "$journal" "$B/rsync/"
before=$(stat -c %s "$journal")
# About 64 MiB of points (each point is ~0.77 MB on average here).
"$G" sample-store "$B/store" --advance --only cdp --points 42 --max-write 1M >/dev/null
added=$(( $(stat -c %s "$journal") - before ))
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
"$G" sync b --json > "$B/sync.json"
read -r sent wire ms pts <<<"$(json 'd["bytes_sent"]' 'd["wire_bytes_out"]' 'd["duration_ms"]' 'd["catalog"]["cdp_points"]' < "$B/sync.json")"
echo "appended on the master: $added bytes"
echo "georep:                $sent payload bytes ($pts points), $wire bytes on the wire, $ms ms"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
cp "$B/rsync/$(basename "$journal")" "$B/rsync/copy.cdp"
t0=$(now); rs=$(rsync --no-whole-file --stats "$journal" "$B/rsync/" 2>&1); t1=$(now)
echo "rsync (delta):         $(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' <<<"$rs" | tr -d ,) bytes sent, $(secs "$t0" "$t1") s"
mv "$B/rsync/copy.cdp" "$B/rsync/$(basename "$journal")"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(now); rs=$(rsync --append-verify --stats "$journal" "$B/rsync/" 2>&1); t1=$(now)
echo "rsync --append-verify: $(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' <<<"$rs" | tr -d ,) bytes sent, $(secs "$t0" "$t1") s"
echo "== state in $WORK (remove it when done: it holds about $((3 * JGIB)) GiB)"
