#!/usr/bin/env bash
# Installs what is missing, then runs every check: formatting, clippy, and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_build_deps
if ensure_peers; then
    # The tests that talk to real peers must run, not skip.
    export MODELGATE_REQUIRE_PEERS=1
else
    echo "warning: grpcurl / tritonclient could not be installed; their compatibility tests will be skipped" >&2
fi
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
