#!/usr/bin/env bash
# Instructions per call (valgrind's callgrind, user space), stable on a noisy machine where
# timings are not: the built-in model server, then modelgate routing only (or HAProxy, h2 both
# sides) in front of it under valgrind; h2load sends N ModelInfer calls (1x16 FP32, 4 connections x
# 32 streams) after 1,500 to warm up, with instrumentation on only for those N.
#
#   scripts/callgrind.sh [N]            modelgate ($CARGO_TARGET_DIR or target/, release build)
#   TARGET=haproxy scripts/callgrind.sh HAProxy (when installed)
#   EXTRA='--record-predictions true' scripts/callgrind.sh   modelgate with other flags
#   EVERYTHING=1 scripts/callgrind.sh   everything on: records, an experiment over half the
#                                       traffic, a 10% shadow, drift against a captured reference
#   REP_MOVSB=1 ...                     count glibc's large copies per byte, as before (see VG)
#   USERS=10000 ...                     calls from 10,000 distinct x-user-id (scripts/grpc_load.py,
#                                       Python grpcio) instead of h2load's one fixed request, which
#                                       has no user: no experiment unit and no feature-store entity,
#                                       so with EVERYTHING=1 the feature store is not exercised.
#                                       Compare everything on with routing only under the same
#                                       USERS: grpcio's requests carry more headers than h2load's
#                                       (~4,000 instructions per call more to read and forward)
#
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client). Prints "<target>: <Ir> per call";
# the callgrind profile stays in $OUT (callgrind_annotate $OUT/callgrind.out.1).
set -euo pipefail
N=${1:-5000}
TARGET=${TARGET:-modelgate}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/modelgate}
OUT=${OUT:-$(mktemp -d)}
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release first (or set BIN)" >&2; exit 1; }
for tool in valgrind callgrind_control h2load; do
    command -v $tool >/dev/null || { echo "$tool is needed (apt-get install valgrind nghttp2-client)" >&2; exit 1; }
done
if [ -n "${USERS:-}" ]; then
    python3 -c 'import grpc' 2>/dev/null || { echo "USERS needs Python's grpcio (pip install grpcio)" >&2; exit 1; }
fi
source "$ROOT/scripts/bench_lib.sh"
MODEL=$(free_port); DATA=$(free_port); CONTROL=$(free_port); ADMIN=$(free_port)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
start_bench_model "$BIN" $MODEL "$OUT/model.log"
PIDS+=($!)
python3 "$ROOT/scripts/bench_request.py" "$OUT/request.grpc"
# glibc copies blocks of more than a few KiB with `rep movsb`, which callgrind counts once per
# byte: the write-ahead log's copy of each ~30 KB record batch counted ~1,400 instructions per
# call for what takes the CPU a few dozen. The copies are made with vector loops instead (as for
# smaller blocks), so that the count stays a measure of work. REP_MOVSB=1 keeps glibc's choice
# (the counting of rounds before the twenty-sixth).
TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1000000000:glibc.cpu.x86_rep_stosb_threshold=1000000000
[ -n "${REP_MOVSB:-}" ] && TUNABLES=
VG=(env GLIBC_TUNABLES=$TUNABLES valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out")
if [ "$TARGET" = haproxy ]; then
    printf 'global\n  nbthread 2\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\nfrontend grpc\n  bind 127.0.0.1:%s proto h2\n  default_backend model\n\nbackend model\n  server m1 127.0.0.1:%s proto h2\n' $DATA $MODEL >"$OUT/haproxy.cfg"
    "${VG[@]}" haproxy -f "$OUT/haproxy.cfg" -db >"$OUT/target.log" 2>&1 &
    PID=$!
else
    FLAGS=(--record-predictions false)
    # Drift is evaluated at most once a second (--drift-min-interval): at full speed that is one
    # evaluation per ~20,000 calls, but valgrind runs modelgate ~50 times slower, so the interval
    # is stretched as much to keep the evaluations' share of each call what it is at full speed.
    # So is the writer's storing of unit sketches and shadow latency histograms (every 250 ms:
    # ~150,000 instructions per histogram serialised, some tens per call at full speed, thousands
    # under valgrind).
    [ -n "${EVERYTHING:-}" ] && FLAGS=(--record-predictions true --drift-min-interval 50s --tally-persist-interval 12500ms)
    "${VG[@]}" "$BIN" serve --data-dir "$OUT/db" --listen 127.0.0.1:$DATA --control-listen 127.0.0.1:$CONTROL \
        --admin-listen 127.0.0.1:$ADMIN "${FLAGS[@]}" ${EXTRA:-} >"$OUT/target.log" 2>&1 &
    PID=$!
    wait_live $ADMIN
    configure_bench "$BIN" $CONTROL $MODEL ${EVERYTHING:+everything}
fi
PIDS+=($PID)
load() {
    if [ -n "${USERS:-}" ]; then
        python3 "$ROOT/scripts/grpc_load.py" "127.0.0.1:$DATA" "$1" "$USERS" "$OUT/request.grpc"
        return
    fi
    h2load_grpc $DATA "$OUT/request.grpc" -n "$1"
}
for _ in $(seq 1 120); do load 1 2>/dev/null | grep -q " 1 succeeded" && break; sleep 0.5; done
# Warm up past the drift capture's 1,000 rows (everything on), so the measured calls are steady.
load 1500 >/dev/null 2>&1
callgrind_control -i on $PID >/dev/null
load "$N" | grep -E "^requests:" >&2
callgrind_control -i off $PID >/dev/null
callgrind_control -d $PID >/dev/null
sleep 1
total=$(grep -hE "^(summary|totals):" "$OUT"/callgrind.out.1 | awk '{s += $2} END {printf "%.0f\n", s}')
echo "$TARGET: $((total / N)) instructions per call ($total over $N calls; profile: $OUT/callgrind.out.1)"
