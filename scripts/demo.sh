#!/usr/bin/env bash
# Installs what is missing, builds modelgate (release) and runs the demo. Extra arguments go to
# `modelgate demo` (e.g. --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_build_deps
# The release build optimised with the committed execution profile (scripts/release.sh).
BIN=$(bash scripts/release.sh)
exec "$BIN" demo "$@"
