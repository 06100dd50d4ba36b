//! Compiles `proto/` with protox (no system `protoc` needed) and generates the tonic/prost code.
//! The encoded descriptor set is written to `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/inference/grpc_predict_v2.proto",
    "proto/modelgate/v1/registry.proto",
    "proto/modelgate/v1/records.proto",
    "proto/modelgate/v1/experiments.proto",
    "proto/modelgate/v1/shadows.proto",
    "proto/modelgate/v1/drift.proto",
    "proto/modelgate/v1/events.proto",
    "proto/modelgate/testing/echo.proto",
    // TF Serving's PredictionService, with the TensorFlow messages it uses (vendored).
    "proto/tensorflow_serving/apis/prediction_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    // The functions serving runs, laid out together in the order given (scripts/release.sh sets
    // this to pgo/symbol-order.txt; an option of lld, the linker of Rust 1.90 and later on x86-64
    // Linux). See the README's "Serving's code together".
    println!("cargo:rerun-if-env-changed=MODELGATE_SYMBOL_ORDER");
    if let Some(order) = std::env::var_os("MODELGATE_SYMBOL_ORDER").filter(|p| !p.is_empty()) {
        let order = PathBuf::from(order);
        println!("cargo:rerun-if-changed={}", order.display());
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Functions renamed or inlined since the file was written are skipped, silently.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("modelgate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Every message knows its proto name (`prost::Name`), so `modelgate ctl` can print any typed
    // answer as proto JSON through the descriptors.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor payloads decode as `Bytes` slices of the request buffer: no copy.
        .bytes(".inference")
        .bytes(".tensorflow")
        // TF Serving's maps (tensors by alias) in name order: records list them deterministically.
        .btree_map(".tensorflow")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
