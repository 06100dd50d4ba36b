#!/usr/bin/env bash
# Installs what is missing, then runs every check: formatting, supply chain (cargo-deny), clippy,
# and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_build_deps
if ensure_peers; then
    # The tests that talk to real peers must run, not skip.
    export MODELGATE_REQUIRE_PEERS=1
else
    echo "warning: grpcurl / tritonclient / promtool could not be installed; their compatibility tests will be skipped" >&2
fi
cargo fmt --all -- --check
# Supply chain (deny.toml): licences, banned crates, sources, and known vulnerabilities — the
# last offline, against a snapshot of the RustSec advisory database (.ci/data/README.md): this
# project's machines reach package registries only, not GitHub (see docs/security.md).
if ensure_cargo_deny; then
    cargo deny --log-level error check licenses bans sources
    advisories_offline
else
    echo "warning: cargo-deny could not be installed; supply-chain checks skipped" >&2
fi
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
