# shellcheck shell=bash
# Sourced by scripts/callgrind.sh, scripts/pgo.sh and scripts/symbol_order.sh: a free loopback
# port, the benchmark's model server, waiting for a modelgate to serve, its gRPC load, and its
# model configured through a modelgate's control port.

# free_port: a free loopback port, never one this script was given before (the socket that
# found it is closed at once, and the kernel may offer the same port again; two of a modelgate's
# ports once came out equal in the benchmark). The ports given are listed in a temporary file.
MODELGATE_GIVEN_PORTS=${MODELGATE_GIVEN_PORTS:-$(mktemp)}
free_port() {
    python3 - "$MODELGATE_GIVEN_PORTS" <<'PY'
import socket, sys
path = sys.argv[1]
given = set(open(path).read().split())
while True:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
    s.close()
    if port not in given:
        open(path, "a").write(port + "\n")
        print(port)
        break
PY
}

# start_bench_model BIN PORT LOG: the built-in model server with the benchmark's model ("bench",
# logistic over 16 features), in the background ($! is its pid).
start_bench_model() {
    "$1" model-server --listen 127.0.0.1:$2 --model 'name=bench;kind=logistic;features=16;seed=1' \
        >"$3" 2>&1 &
}

# wait_live ADMIN_PORT [TRIES] [SECONDS]: until that modelgate's /live answers (200 tries, 0.3 s
# apart, unless told otherwise).
wait_live() {
    local admin=$1 tries=${2:-200} pause=${3:-0.3}
    for _ in $(seq 1 "$tries"); do
        curl -sf -o /dev/null "127.0.0.1:$admin/live" && return
        sleep "$pause"
    done
}

# h2load_grpc DATA_PORT REQUEST H2LOAD_ARGS…: h2load's OIP ModelInfer calls with the framed
# REQUEST body, 4 connections × 32 streams (-n, extra headers… in H2LOAD_ARGS).
h2load_grpc() {
    local data=$1 request=$2
    shift 2
    h2load -c 4 -m 32 "$@" -d "$request" -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$data/inference.GRPCInferenceService/ModelInfer"
}

# bench_ctl BIN CONTROL_PORT ARGS…: `modelgate ctl ARGS…` against that control port, quietly.
bench_ctl() {
    local bin=$1 control=$2
    shift 2
    MODELGATE_CTL_ADDR=http://127.0.0.1:$control "$bin" ctl "$@" >/dev/null
}

# configure_bench BIN CONTROL_PORT MODEL_PORT [everything]
# Registers the model server at MODEL_PORT as "bench" version 1 and promotes it. With
# "everything": versions 2 and 3 as well, an experiment over half the users (1 against 2), a 10%
# shadow to 3, and the next 1,000 live rows captured as the drift reference.
configure_bench() {
    local bin=$1 control=$2 model=$3 mode=${4:-}
    bench_ctl "$bin" "$control" models register bench --endpoint http://127.0.0.1:$model
    bench_ctl "$bin" "$control" models promote bench 1
    if [ "$mode" = everything ]; then
        bench_ctl "$bin" "$control" models register bench --endpoint http://127.0.0.1:$model
        bench_ctl "$bin" "$control" models register bench --endpoint http://127.0.0.1:$model
        bench_ctl "$bin" "$control" experiments create bench-ab --model bench --variant control=1 --variant treatment=2 --coverage 0.5
        bench_ctl "$bin" "$control" shadows set bench 3 --fraction 0.1
        bench_ctl "$bin" "$control" drift capture bench --rows 1000
    fi
}
