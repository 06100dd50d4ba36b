//! Real Open Inference Protocol peers against modelgate: NVIDIA's Triton gRPC client (Python).

mod common;

use common::*;

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
    let Some(out) = python_peer(
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
