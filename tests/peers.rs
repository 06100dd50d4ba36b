//! Real Open Inference Protocol peers against modelgate: NVIDIA's Triton gRPC client (Python).

mod common;

use common::*;

/// Runs a peer script with python3, or skips when its packages are missing — unless
/// MODELGATE_REQUIRE_PEERS is set (scripts/test.sh installs them and sets it).
async fn run_python(script: &str, args: &[&str], module: &str) -> Option<String> {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .await;
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        assert!(
            std::env::var_os("MODELGATE_REQUIRE_PEERS").is_none(),
            "python3 with {module} is required but missing"
        );
        eprintln!("python3 module {module} not installed; skipping (scripts/test.sh installs it)");
        return None;
    }
    let path = format!("{}/tests/peers/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[tokio::test]
async fn the_triton_client_talks_to_modelgate() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=iris_backend;kind=linear;weights=2,3;bias=1").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(modelgate::pb::modelgate::v1::RegisterModelVersionRequest {
        model: "iris".into(),
        endpoint: server.endpoint(),
        backend_model: "iris_backend".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "iris", "1").await;
    let Some(out) = run_python(
        "triton_client.py",
        &[&mg.data_addr.to_string(), "iris"],
        "tritonclient.grpc",
    )
    .await
    else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["live"], true, "{v}");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["model_ready"], true, "{v}");
    assert_eq!(v["metadata_inputs"], serde_json::json!(["input"]), "{v}");
    // 2*1 + 3*2 + 1 = 9 and 2*0.5 - 3 + 1 = -1
    assert_eq!(v["value"], serde_json::json!([[9.0], [-1.0]]), "{v}");
    assert_eq!(v["id"], "triton-peer-1", "{v}");
    mg.shutdown().await;
}
