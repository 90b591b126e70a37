#!/usr/bin/env bash
# georep's main job on the embedded default (a local slave, no SSH set-up):
# catalog mode on a sample snapshot
# store (qcow2 chains, CDP journals), replicated point by point, changed the
# way an appliance does (CDP appends, a host snapshot, a reclamation split, a
# retention delete), replicated again; then both sides list the same points
# and a point restores to the same image on both.
set -euo pipefail
cd "$(dirname "$0")/.."
packaging/setup.sh
cargo build --release --quiet
G=$PWD/target/release/georep
WORK=${GEOREP_DEMO_DIR:-$(mktemp -d /var/tmp/georep-demo-store.XXXXXX)}
export GEOREP_HOME=$WORK/home
store=$WORK/store replica=$WORK/replica

echo "== georep sample-store $store (2 hosts: qcow chains; CDP journals)"
"$G" sample-store "$store" --hosts 2 --disk-size 64M --points 10 | tail -3
echo "== georep create demo $store $replica --mode continuous"
"$G" create demo "$store" "$replica" --mode continuous
echo "== georep sync demo (first sync: the newest points)"
"$G" sync demo
echo "== the appliance goes on"
"$G" sample-store "$store" --advance --points 10
echo "== georep sync demo (new host snapshots whole; journal tails appended)"
"$G" sync demo
echo "== georep point list $replica --host host02 --disk disk0"
"$G" point list "$replica" --host host02 --disk disk0 | tail -8
echo "== georep point verify $replica"
"$G" point verify "$replica"
echo "== the newest point of host02/disk0, restored on both sides"
"$G" point restore "$store" host02/disk0@latest -o "$WORK/master.qcow2"
"$G" point restore "$replica" host02/disk0@latest -o "$WORK/replica.qcow2"
qemu-img compare "$WORK/master.qcow2" "$WORK/replica.qcow2"
echo "== done (state in $WORK)"
