#!/usr/bin/env bash
# Builds the Debian package: a release build of georep, its man pages and
# shell completions (generated from the CLI definition), the systemd
# units, logrotate, the Prometheus textfile exporter and the docs, into
# target/debian/georep_VERSION_ARCH.deb (cargo-deb, installed if missing).
# Install it on both sites with `dpkg -i` (or `apt install ./FILE.deb`,
# which also pulls in its dependencies).
#   packaging/deb.sh                  # release build
#   packaging/deb.sh --binary PATH    # package an existing georep binary
set -euo pipefail
cd "$(dirname "$0")/.."
command -v dpkg-shlibdeps >/dev/null 2>&1 || {
    echo "deb.sh: dpkg-shlibdeps missing: apt-get install dpkg-dev (or run packaging/setup.sh)" >&2
    exit 1
}
exec cargo run --quiet -p xtask -- deb "$@"
