#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each (default 60), one at a time.
#
#   bash scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECONDS=300 bash scripts/fuzz.sh keys oip_request
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz when
# missing. Builds without a sanitizer (the crate forbids unsafe code; what is hunted is panics,
# broken invariants and runaway allocations) in fuzz/target. RocksDB's C++ is linked from the
# main workspace's debug build when one exists (MODELGATE_TARGET_DIR, default
# ~/.cache/modelgate/target, or set ROCKSDB_LIB_DIR yourself); otherwise it is compiled once
# into fuzz/target (10-15 minutes on 2 cores). Crashes land in fuzz/artifacts/<target>/; the
# corpus grows in fuzz/corpus/<target>/, where git keeps only the seed-* and crash-* files.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(oip_request oip_response grpc_frame control_args keys)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ -z "${ROCKSDB_LIB_DIR:-}" ]; then
    main_target="${MODELGATE_TARGET_DIR:-$HOME/.cache/modelgate/target}"
    # shellcheck disable=SC2012 # names are cargo's hashes, no odd characters
    lib=$(ls -t "$main_target"/debug/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n 1 || true)
    if [ -n "$lib" ]; then
        export ROCKSDB_LIB_DIR="${lib%/librocksdb.a}" ROCKSDB_STATIC=1
        echo "fuzz.sh: linking the prebuilt RocksDB in $ROCKSDB_LIB_DIR"
    fi
fi

flags=(--sanitizer none -O)
cargo +nightly fuzz build "${flags[@]}"
status=0
for t in "${targets[@]}"; do
    echo "== $t: ${seconds}s"
    # -rss_limit_mb: a hostile input must not make modelgate allocate gigabytes.
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1; then
        echo "fuzz.sh: $t found a crash; see fuzz/artifacts/$t/" >&2
        status=1
    fi
done
exit "$status"
