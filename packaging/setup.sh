#!/usr/bin/env bash
# Installs what georep's demo, tests and benchmarks need on a fresh Debian
# machine, where it is missing: OpenSSH (client and server), rsync,
# qemu-utils, attr, faketime (the clock-step test), python3-prometheus-client (for the system python3),
# and for the package test lintian, dpkg-dev (dpkg-shlibdeps), systemd
# (systemd-analyze), man-db, e2fsprogs (chattr) and bsdutils (script).
# cargo-deb is installed by `cargo run -p xtask -- deb` when missing.
# For the fuzz targets: cargo-afl with AFL++ (built from crates.io
# sources; make and a C compiler from apt if missing).
# Idempotent; prints what it installs.
set -euo pipefail

need=()
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
{ command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; } || need+=(openssh-server)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v getfattr >/dev/null 2>&1 || need+=(attr)
# libfaketime: the clock-step fault test runs georep with its clock an hour behind.
command -v faketime >/dev/null 2>&1 || need+=(faketime)
# The reference Prometheus exposition-format parser checks `georep status --prometheus`.
/usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || need+=(python3-prometheus-client)
# The Debian package test: build, lint, verify the units, read the man pages.
command -v lintian >/dev/null 2>&1 || need+=(lintian)
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v man >/dev/null 2>&1 || need+=(man-db)
# A real failing path (an immutable slave directory) and a pseudo-terminal for the progress line.
command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v make >/dev/null 2>&1 || need+=(make)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup: need root (or sudo) to apt-get install ${need[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Fuzzing (`cargo run -p xtask -- fuzz` and its test in the suite): cargo-afl
# drives AFL++ on stable Rust; `cargo afl config --build` compiles AFL++.
if ! cargo afl --version >/dev/null 2>&1; then
    echo "setup: installing cargo-afl" >&2
    cargo install cargo-afl --locked --quiet
fi
afl_usage=$(cargo afl fuzz -h 2>&1 || true)
if [[ "$afl_usage" != *"afl-fuzz [ options ]"* ]]; then
    echo "setup: building AFL++ (cargo afl config --build)" >&2
    cargo afl config --build --force >/dev/null
fi
