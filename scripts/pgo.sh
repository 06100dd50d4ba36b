#!/usr/bin/env bash
# Regenerates pgo/modelgate.profdata, the execution profile the release build optimises with
# (profile-guided optimisation; scripts/release.sh uses it, see "Profile-guided optimisation"
# in docs/performance-log.md). Run it after changes to the data plane, and commit the new profile.
#
# 1. builds modelgate instrumented (-Cprofile-generate), in its own target directory;
# 2. runs it on the data plane's common paths: the built-in model server, then modelgate routing
#    only, then everything on (records, an experiment over half the traffic, a 10% shadow, drift),
#    each driven by h2load (OIP ModelInfer, gRPC; four users), a REST caller
#    (POST /v2/models/bench/infer) and, when Python's grpcio is installed, gRPC calls from 10,000
#    users (scripts/grpc_load.py);
# 3. merges the raw profiles (llvm-profdata, from rustup's llvm-tools component).
#
# A profile that no longer matches some functions (the code changed since) is still used for the
# rest; those functions are optimised as without one. Needs h2load (Debian nghttp2-client).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/deps.sh
source scripts/bench_lib.sh
TRIPLE=$(host_triple)
SYSROOT=$(rustc --print sysroot)
PROFDATA="$SYSROOT/lib/rustlib/$TRIPLE/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
    rustup component add llvm-tools
fi
command -v h2load >/dev/null || { echo "h2load is needed (apt-get install nghttp2-client)" >&2; exit 1; }
GRPCIO=1
python3 -c 'import grpc' 2>/dev/null || {
    GRPCIO=""
    echo "warning: no Python grpcio (pip install grpcio): the profile will miss calls from many users" >&2
}
# Its own target directory: its flags differ from the release build's, and cargo reruns build
# scripts (RocksDB's C++) whenever a directory's RUSTFLAGS change.
TARGET_DIR=${PGO_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/pgo-generate}
if [ -n "${PGO_BIN:-}" ]; then
    BIN=$PGO_BIN    # an instrumented build already at hand
else
    BIN=$(PGO_GENERATE="$TARGET_DIR/profraw" CARGO_TARGET_DIR="$TARGET_DIR" bash scripts/release.sh)
fi
WORK=$(mktemp -d)
RAW="$WORK/profraw"
# Where each process writes its raw profile on exit (%p: its pid).
export LLVM_PROFILE_FILE="$RAW/modelgate-%p.profraw"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

python3 scripts/bench_request.py "$WORK/request.grpc" "$WORK/request.json"

MODEL=$(free_port)
start_bench_model "$BIN" $MODEL "$WORK/model.log"
MODEL_PID=$!
PIDS+=($MODEL_PID)

# One modelgate run: $1 = routing | everything.
run() {
    local mode=$1 data control admin flags pid
    data=$(free_port); control=$(free_port); admin=$(free_port)
    flags=(--record-predictions false)
    [ "$mode" = everything ] && flags=(--record-predictions true)
    "$BIN" serve --data-dir "$WORK/db-$mode" --listen 127.0.0.1:$data --control-listen 127.0.0.1:$control \
        --admin-listen 127.0.0.1:$admin "${flags[@]}" >"$WORK/$mode.log" 2>&1 &
    pid=$!
    PIDS+=($pid)
    wait_live $admin 100 0.2
    configure_bench "$BIN" $control $MODEL $mode
    local user
    for user in u1 u2 u3 u4; do
        h2load_grpc $data "$WORK/request.grpc" -n 50000 -H "x-user-id: $user" | grep -E '^requests:'
    done
    h2load -c 2 -m 16 -n 20000 -d "$WORK/request.json" -H 'content-type: application/json' \
        -H 'x-user-id: u5' "http://127.0.0.1:$data/v2/models/bench/infer" | grep -E '^requests:'
    # Callers from 10,000 users (the benchmark's tonic loop has as many): experiment units and
    # feature-store entities that differ from call to call.
    if [ -n "$GRPCIO" ]; then
        python3 scripts/grpc_load.py "127.0.0.1:$data" 30000 10000 "$WORK/request.grpc"
    fi
    curl -sf -o /dev/null "127.0.0.1:$admin/metrics"
    if [ "$mode" = everything ]; then
        bench_ctl "$BIN" $control experiments results bench-ab
        bench_ctl "$BIN" $control drift report bench
    fi
    kill -TERM $pid
    wait $pid || true
}
run routing
run everything
kill -TERM $MODEL_PID
wait $MODEL_PID || true
mkdir -p "$ROOT/pgo"
"$PROFDATA" merge --sparse -o "$ROOT/pgo/modelgate.profdata" "$RAW"/*.profraw
ls -l "$ROOT/pgo/modelgate.profdata"
