#!/usr/bin/env bash
# Writes pgo/symbol-order.txt: the functions of the release binary that run once it serves —
# configured through the control port, then calls under h2load (gRPC and REST), from 10,000 users
# (grpcio, when installed), /metrics scraped — routing only and everything on, hottest first.
# scripts/release.sh links them together, first in the code (docs/performance-log.md, "Serving's code together").
#
#   bash scripts/symbol_order.sh [BIN]    # BIN: a release build (default: scripts/release.sh's)
#
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client). Names are the linker's (mangled),
# which change only when a function's crate or signature does: functions renamed or inlined since
# are skipped at the link, as LLVM skips profile entries that no longer match.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${1:-$(bash scripts/release.sh)}
for tool in valgrind callgrind_control h2load; do
    command -v $tool >/dev/null || { echo "$tool is needed (apt-get install valgrind nghttp2-client)" >&2; exit 1; }
done
source scripts/bench_lib.sh
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
MODEL=$(free_port)
start_bench_model "$BIN" $MODEL "$WORK/model.log"
PIDS+=($!)
python3 scripts/bench_request.py "$WORK/request.grpc" "$WORK/request.json"

for mode in routing everything; do
    DATA=$(free_port); CONTROL=$(free_port); ADMIN=$(free_port)
    FLAGS=(--record-predictions false)
    [ $mode = everything ] && FLAGS=(--record-predictions true)
    valgrind --tool=callgrind --instr-atstart=no --demangle=no \
        --callgrind-out-file="$WORK/$mode.out" "$BIN" serve --data-dir "$WORK/db-$mode" \
        --listen 127.0.0.1:$DATA --control-listen 127.0.0.1:$CONTROL --admin-listen 127.0.0.1:$ADMIN \
        "${FLAGS[@]}" >"$WORK/$mode.log" 2>&1 &
    PID=$!
    PIDS+=($PID)
    wait_live $ADMIN
    # Everything from here on: what a serving process runs.
    callgrind_control -i on $PID >/dev/null
    configure_bench "$BIN" $CONTROL $MODEL ${mode/routing/}
    grpc() { h2load_grpc $DATA "$WORK/request.grpc" -n "$1" -H "x-user-id: u$2"; }
    for _ in $(seq 1 120); do grpc 1 0 2>/dev/null | grep -q " 1 succeeded" && break; sleep 0.5; done
    for user in 1 2 3 4; do grpc 1000 $user >/dev/null; done
    for h1 in "" --h1; do
        h2load $h1 -c 2 -m 16 -n 400 -d "$WORK/request.json" -H 'content-type: application/json' \
            -H 'x-user-id: u5' "http://127.0.0.1:$DATA/v2/models/bench/infer" >/dev/null
    done
    if python3 -c 'import grpc' 2>/dev/null; then
        python3 scripts/grpc_load.py "127.0.0.1:$DATA" 1000 10000 "$WORK/request.grpc" >/dev/null
    fi
    curl -sf -o /dev/null 127.0.0.1:$ADMIN/metrics
    curl -sf -o /dev/null 127.0.0.1:$ADMIN/ready || true
    callgrind_control -d $PID >/dev/null
    kill $PID
    wait $PID 2>/dev/null || true
done

python3 - "$BIN" "$WORK"/routing.out.* "$WORK"/everything.out.* >pgo/symbol-order.txt <<'PY'
# The binary's functions with a cost in the profiles, by total cost, hottest first.
import collections, re, sys
binary, paths = sys.argv[1], sys.argv[2:]
cost = collections.Counter()
for path in paths:
    objects, names, obj, fn, after_call = {}, {}, None, None, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?)(ob|fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            table = objects if m.group(2) == "ob" else names
            if m.group(4) is not None:
                table[m.group(3)] = m.group(4)
            if not m.group(1):
                if m.group(2) == "ob":
                    obj = objects.get(m.group(3))
                else:
                    fn = names.get(m.group(3))
            continue
        if line.startswith("calls="):
            after_call = True  # the next cost line is the call's, not the function's own
            continue
        fields = line.split()
        if len(fields) >= 2 and (line[0].isdigit() or line[0] in "+-*"):
            if after_call:
                after_call = False
            elif obj == binary and fn and fields[1].isdigit():
                cost[fn] += int(fields[1])
for name, _ in cost.most_common():
    print(name)
PY
echo "pgo/symbol-order.txt: $(wc -l <pgo/symbol-order.txt) functions" >&2
