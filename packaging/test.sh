#!/usr/bin/env bash
# The whole test suite: set-up, formatting, lints, unit and integration
# tests (real processes, real sshd on loopback, real xattrs).
set -euo pipefail
cd "$(dirname "$0")/.."
packaging/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
