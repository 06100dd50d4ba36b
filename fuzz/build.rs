//! When RocksDB comes prebuilt (`ROCKSDB_LIB_DIR`, set by `scripts/fuzz.sh` to the main
//! workspace's build), librocksdb-sys links only the archive: the C++ runtime it needs is added
//! here.
fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    if std::env::var_os("ROCKSDB_LIB_DIR").is_some() {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}
