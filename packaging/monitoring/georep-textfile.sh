#!/bin/sh
# Writes every georep session's metrics for node_exporter's textfile
# collector (run node_exporter with --collector.textfile.directory=DIR).
# The file is replaced atomically, so node_exporter never reads half of it.
set -eu
DIR=${1:-/var/lib/prometheus/node-exporter}
tmp="$DIR/.georep.prom.$$"
trap 'rm -f "$tmp"' EXIT
georep status --prometheus > "$tmp"
mv "$tmp" "$DIR/georep.prom"
