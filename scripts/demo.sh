#!/usr/bin/env bash
# Installs what is missing, builds modelgate (release) and runs the demo. Extra arguments go to
# `modelgate demo` (e.g. --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_build_deps
cargo run --release --locked -- demo "$@"
