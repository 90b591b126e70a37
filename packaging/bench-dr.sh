#!/usr/bin/env bash
# Disaster-recovery measurements (local slaves; numbers, never assertions):
#  A. failback of a tree of BENCH_DR_GIB GiB (default 2) in 8 MiB files,
#     with 1% of the data changed on B after promote and 0.5% divergent on
#     A: bytes and time of `georep sync back` against `rsync -a` of the
#     whole store to an empty directory, same run;
#  B. promote time (RTO) of a replica of a snapshot store of BENCH_DR_POINTS
#     points (default 1000);
#  C. failback of a snapshot store (sample-store, BENCH_DR_STORE_HOSTS hosts,
#     default 8, disks of BENCH_DR_STORE_DISK, default 256M) with
#     BENCH_DR_B_POINTS journal points (default 80) appended on B after
#     promote and BENCH_DR_A_POINTS (default 40) divergent on A: bytes and
#     time against `rsync -a` of B to an empty directory, same run.
#     (BENCH_DR_ONLY=C runs C alone.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
G=$PWD/target/release/georep
WORK=${GEOREP_BENCH_DIR:-$(mktemp -d /var/tmp/georep-bench-dr.XXXXXX)}
export GEOREP_HOME=$WORK/home
GIB=${BENCH_DR_GIB:-2}
POINTS=${BENCH_DR_POINTS:-1000}
now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 2))"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(str(eval(e, {'d': d})) for e in sys.argv[1:]))" "$@"; }
# Overwrites COUNT random 64 KiB ranges of files under DIR (seeded), marking them.
scribble() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, random, sys, subprocess
root, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if not d.startswith(os.path.join(root, ".georep")))
touched = set()
for _ in range(count):
    p = r.choice(files)
    with open(p, "r+b") as f:
        f.seek(r.randrange(0, os.path.getsize(p) - 65536))
        f.write(os.urandom(65536))
    touched.add(p)
subprocess.run([os.environ["G"], "mark", *sorted(touched)], check=True)
PY
}
export G

if [ "${BENCH_DR_ONLY:-}" != C ]; then
echo "== A. failback of a ${GIB} GiB tree: 1% changed on B, 0.5% divergent on A"
A=$WORK/a; B=$WORK/b
mkdir -p "$A"
nfiles=$((GIB * 128))
for i in $(seq 1 $nfiles); do
  d="$A/d$((i % 16))"; mkdir -p "$d"
  head -c $((8 << 20)) /dev/urandom > "$d/f$i"
done
"$G" create s1 "$A" "$B" --marker mark >/dev/null
"$G" sync s1 >/dev/null
total=$((GIB << 30))
# 0.5% divergent on A (written after the last sync), then B promoted, 1% changed on B.
scribble "$A" $((total / 200 / 65536)) 1
t0=$(now); "$G" promote "$B" --json > "$WORK/promote-tree.json"; t1=$(now)
echo "promote (tree, $nfiles files): $(secs "$t0" "$t1") s"
scribble "$B" $((total / 100 / 65536)) 2
"$G" create back "$B" "$A" --failback >/dev/null
sync; t0=$(now); "$G" sync back --json > "$WORK/failback.json"; t1=$(now)
read -r sent wire_out wire_in <<<"$(json 'd["bytes_sent"]' 'd["wire_bytes_out"]' 'd["wire_bytes_in"]' < "$WORK/failback.json")"
q=$("$G" quarantine list "$A" --json | json 'sum(len(m["items"]) for m in d)' 'sum(sum(i["size"] for i in m["items"]) for m in d)')
fb_time=$(secs "$t0" "$t1")
mkdir -p "$WORK/empty"
sync; t0=$(now)
rs=$(rsync -a --stats "$B/" "$WORK/empty/" 2>&1)
t1=$(now)
rs_sent=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' <<<"$rs" | tr -d ,)
echo "store:             $total bytes in $nfiles files (page cache warm: the files were just written)"
echo "failback:          $fb_time s, $sent payload bytes, $wire_out bytes on the wire out, $wire_in in; quarantine: $q (entries, bytes)"
echo "rsync -a to empty: $(secs "$t0" "$t1") s, $rs_sent bytes sent"
python3 -c "print('ratio: bytes %.4f (wire out / rsync sent), time %.2f' % ($wire_out / $rs_sent, $fb_time / $(secs "$t0" "$t1")))"

echo "== B. promote time of a replica of a ${POINTS}-point store"
S=$WORK/store; R=$WORK/replica
hosts=4
per=$((POINTS / hosts))
"$G" sample-store "$S" --hosts $hosts --kinds cdp --disks 1 --disk-size 16M --snapshots 1 --points 5 >/dev/null
"$G" create s2 "$S" "$R" --mode continuous >/dev/null
"$G" sync s2 >/dev/null
"$G" sample-store "$S" --advance --only cdp --points $per >/dev/null
"$G" sync s2 >/dev/null
pts=$("$G" point list "$R" --json | json 'len(d["points"])')
t0=$(now); "$G" promote "$R" --json > "$WORK/promote-store.json"; t1=$(now)
echo "replica points:    $pts"
echo "promote:           $(secs "$t0" "$t1") s (verifies every record against its data)"
fi

echo "== C. failback of a snapshot store: CDP points on B after promote, divergent points on A"
SA=$WORK/sa; SB=$WORK/sb
rm -rf "$SA" "$SB"
"$G" sample-store "$SA" --hosts "${BENCH_DR_STORE_HOSTS:-8}" --disk-size "${BENCH_DR_STORE_DISK:-256M}" --snapshots 3 --points 20 --kinds mixed >/dev/null
"$G" create s3 "$SA" "$SB" --mode continuous >/dev/null
"$G" sync s3 >/dev/null
"$G" sample-store "$SA" --advance --only cdp --points 20 --seed 2 >/dev/null
"$G" sync s3 >/dev/null
size() { du -sb --exclude=.georep --exclude=.georep-locks --exclude=.georep-quarantine "$1" | cut -f1; }
store_bytes=$(size "$SB")
# Divergent on A after the last sync (lost to B): journal points.
a0=$(size "$SA")
"$G" sample-store "$SA" --advance --only cdp --points "${BENCH_DR_A_POINTS:-40}" --seed 3 >/dev/null
a1=$(size "$SA")
"$G" promote "$SB" --json >/dev/null
b0=$(size "$SB")
"$G" sample-store "$SB" --advance --only cdp --points "${BENCH_DR_B_POINTS:-80}" --seed 5 >/dev/null
b1=$(size "$SB")
"$G" create back3 "$SB" "$SA" --failback --mode continuous >/dev/null
sync; t0=$(now); "$G" sync back3 --json > "$WORK/failback-store.json"; t1=$(now)
fb_time=$(secs "$t0" "$t1")
read -r wire_out wire_in pub pts <<<"$(json 'd["wire_bytes_out"]' 'd["wire_bytes_in"]' 'd["catalog"]["generations_published"]' 'd["catalog"]["cdp_points"]' < "$WORK/failback-store.json")"
q=$("$G" quarantine list "$SA" --json | json 'sum(len(m["items"]) for m in d)' 'sum(len(m.get("store", [])) for m in d)')
rm -rf "$WORK/empty3"; mkdir -p "$WORK/empty3"
sync; t0=$(now)
rs=$(rsync -a --stats --exclude=.georep --exclude=.georep-locks "$SB/" "$WORK/empty3/" 2>&1)
t1=$(now)
rs_sent=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' <<<"$rs" | tr -d ,)
python3 -c "print('store:             %d bytes; divergent on A %d bytes (%.2f%%), new on B after promote %d bytes (%.2f%%); page cache warm' % ($store_bytes, $a1 - $a0, 100.0 * ($a1 - $a0) / $store_bytes, $b1 - $b0, 100.0 * ($b1 - $b0) / $store_bytes))"
echo "failback:          $fb_time s, $wire_out bytes on the wire out, $wire_in in; $pub generations, $pts journal points; quarantine: $q (files, host snapshots)"
echo "rsync -a to empty: $(secs "$t0" "$t1") s, $rs_sent bytes sent"
python3 -c "print('ratio: bytes %.4f (wire out / rsync sent), time %.2f' % ($wire_out / $rs_sent, $fb_time / $(secs "$t0" "$t1")))"
echo "work dir: $WORK"
