#!/usr/bin/env bash
# Builds the release binary optimised with the committed execution profile
# (pgo/modelgate.profdata; profile-guided optimisation, see the README) and prints its path.
#
#   bash scripts/release.sh            # → $CARGO_TARGET_DIR/<host triple>/release/modelgate
#
# MODELGATE_NO_PGO=1 builds without the profile and without pgo/symbol-order.txt's layout (for
# comparisons; other flags, so give it its own CARGO_TARGET_DIR). PGO_GENERATE=dir builds an
# instrumented binary instead, which writes raw profiles into dir (scripts/pgo.sh, also in its own
# target directory).
#
# `cargo build --release` still works and gives the same program without the profile (slower:
# see "Profile-guided optimisation" in docs/performance-log.md). The profile is passed in RUSTFLAGS with an
# explicit --target, so the flags reach modelgate and its Rust dependencies but not build scripts
# and proc macros. Cargo reruns build scripts when RUSTFLAGS change (RocksDB's C++, ~13 minutes),
# not when the profile's content does: the flags name the file, and rustc tracks its content.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/deps.sh
ensure_build_deps
TRIPLE=$(host_triple)
PROFILE="$ROOT/pgo/modelgate.profdata"
FLAGS=""
if [ -n "${PGO_GENERATE:-}" ]; then
    FLAGS="-Cprofile-generate=$PGO_GENERATE"
elif [ -f "$PROFILE" ] && [ -z "${MODELGATE_NO_PGO:-}" ]; then
    # Functions changed since the profile was taken are optimised as without one; LLVM's warning
    # for each of them is silenced (scripts/pgo.sh regenerates the profile).
    FLAGS="-Cprofile-use=$PROFILE -Cllvm-args=-no-pgo-warn-mismatch"
fi
# The functions serving runs, linked together first in the code (pgo/symbol-order.txt, written by
# scripts/symbol_order.sh; docs/performance-log.md, "Serving's code together"): lld's option, and lld is the linker
# of Rust 1.90 and later for x86-64 Linux only. Passed to modelgate's build script, not in
# RUSTFLAGS. MODELGATE_SYMBOL_ORDER set (even empty) overrides the choice, e.g. with another linker.
ORDER="$ROOT/pgo/symbol-order.txt"
RUST_MINOR=$(rustc -V | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
if [ -z "${MODELGATE_SYMBOL_ORDER+set}" ] && [ "$TRIPLE" = x86_64-unknown-linux-gnu ] \
    && [ "${RUST_MINOR:-0}" -ge 90 ] && [ -f "$ORDER" ] && [ -z "${MODELGATE_NO_PGO:-}" ] \
    && [ -z "${PGO_GENERATE:-}" ]; then
    export MODELGATE_SYMBOL_ORDER="$ORDER"
fi
RUSTFLAGS="${RUSTFLAGS:-} $FLAGS" cargo build --release --locked --target "$TRIPLE" --bin modelgate >&2
echo "${CARGO_TARGET_DIR:-$ROOT/target}/$TRIPLE/release/modelgate"
