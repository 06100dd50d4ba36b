# shellcheck shell=bash
# Sourced by scripts/callgrind.sh and scripts/pgo.sh: a free loopback port, and the benchmark's
# model configured through a modelgate's control port.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
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
