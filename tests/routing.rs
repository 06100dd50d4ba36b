//! Registry → routing, end to end: real model servers, modelgate, RocksDB and gRPC clients.

mod common;

use common::*;
use modelgate::pb::modelgate::v1 as pb;

/// Two versions of `iris` with different weights, on two model servers.
const V1: &str = "name=iris;kind=linear;weights=1,1;bias=0;version=a";
const V2: &str = "name=iris;kind=linear;weights=10,-1;bias=5;version=b";

#[tokio::test]
async fn promotion_moves_traffic_and_archives_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (model_server(V1).await, model_server(V2).await);
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    assert_eq!(register(&mut reg, "iris", &a.endpoint()).await, 1);
    assert_eq!(register(&mut reg, "iris", &b.endpoint()).await, 2);

    let mut client = infer_client(mg.data_addr).await;
    let err = client
        .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "nothing in production yet: {err:?}"
    );
    assert!(
        err.message().contains("no production version"),
        "{}",
        err.message()
    );

    promote(&mut reg, "iris", "1").await;
    let resp = client
        .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "1");
    assert!(resp.metadata().get("x-modelgate-request-id").is_some());
    let body = resp.into_inner();
    assert_eq!(body.model_version, "a", "the v1 server answered");
    assert_eq!(first_output(&body), vec![3.0]);

    promote(&mut reg, "iris", "2").await;
    let resp = client
        .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "2");
    assert_eq!(first_output(&resp.into_inner()), vec![13.0], "10*1 - 2 + 5");

    let old = reg
        .get_model_version(pb::GetModelVersionRequest {
            model: "iris".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.stage, pb::Stage::Archived as i32);
    let prod = reg
        .get_production_version(pb::GetProductionVersionRequest {
            model: "iris".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prod.version, 2);
    let archived = reg
        .list_model_versions(pb::ListModelVersionsRequest {
            model: "iris".into(),
            stage: pb::Stage::Archived as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        archived.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1]
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn aliases_name_versions_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (model_server(V1).await, model_server(V2).await);
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &a.endpoint()).await;
    register(&mut reg, "iris", &b.endpoint()).await;
    let set = reg
        .set_alias(pb::SetAliasRequest {
            model: "iris".into(),
            alias: "champion".into(),
            version: "2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((set.version, set.previous_version), (2, 0));
    promote(&mut reg, "iris", "champion").await;
    let mut client = infer_client(mg.data_addr).await;
    let resp = client
        .model_infer(infer_request("iris", &[&[0.0, 0.0]]))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "2");
    let v = reg
        .get_model_version(pb::GetModelVersionRequest {
            model: "iris".into(),
            version: "champion".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.version, 2);
    assert_eq!(v.aliases, vec!["champion".to_string()]);
    let models = reg
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].production_version, 2);
    assert_eq!(models[0].aliases.get("champion"), Some(&2));
    let deleted = reg
        .delete_alias(pb::DeleteAliasRequest {
            model: "iris".into(),
            alias: "champion".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.version, 2);
    mg.shutdown().await;
}

#[tokio::test]
async fn raw_and_typed_contents_give_the_same_answer_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let a = model_server("name=iris;kind=logistic;weights=0.5,-0.25,1;bias=0.1").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &a.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    let rows: [&[f32]; 3] = [&[1.0, 2.0, 3.0], &[-1.0, 0.0, 0.5], &[0.0, 0.0, 0.0]];
    for addr in [a.addr, mg.data_addr] {
        let mut client = infer_client(addr).await;
        let typed = client
            .model_infer(infer_request("iris", &rows))
            .await
            .unwrap()
            .into_inner();
        let raw = client
            .model_infer(raw_infer_request("iris", &rows))
            .await
            .unwrap()
            .into_inner();
        assert!(typed.raw_output_contents.is_empty());
        assert_eq!(raw.raw_output_contents.len(), 2, "raw in, raw out");
        let (t, r) = (first_output(&typed), first_output(&raw));
        assert_eq!(t, r);
        assert_eq!(t.len(), 6, "[3, 2] probabilities");
        // Row 3 is all zeros: sigmoid(0.1).
        assert!((t[5] - 1.0 / (1.0 + (-0.1f64).exp())).abs() < 1e-6, "{t:?}");
    }
    mg.shutdown().await;
}

#[tokio::test]
async fn backend_name_and_version_are_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    // The model server knows the model as "iris_onnx" with versions 7 and 8.
    let server = modelgate::model_server::spawn(
        ANY,
        vec![
            "name=iris_onnx;kind=linear;weights=1;version=7"
                .parse()
                .unwrap(),
            "name=iris_onnx;kind=linear;weights=2;version=8"
                .parse()
                .unwrap(),
        ],
    )
    .await
    .unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "iris".into(),
        endpoint: server.endpoint(),
        backend_model: "iris_onnx".into(),
        backend_version: "7".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "iris", "1").await;
    let mut client = infer_client(mg.data_addr).await;
    let resp = client
        .model_infer(infer_request("iris", &[&[3.0]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_name, "iris_onnx");
    assert_eq!(resp.model_version, "7", "not the server's default (8)");
    assert_eq!(first_output(&resp), vec![3.0]);
    // ModelMetadata and ModelReady are routed and rewritten the same way.
    let md = client
        .model_metadata(modelgate::pb::inference::ModelMetadataRequest {
            name: "iris".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.name, "iris_onnx");
    let ready = client
        .model_ready(modelgate::pb::inference::ModelReadyRequest {
            name: "iris".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    // From a caller that sends content-length (h2load, curl): the message with the backend's
    // name written in is longer than the caller's, and an HTTP/2 server resets a stream whose
    // length disagrees with it, so modelgate sends the new length.
    use prost::Message;
    let body = grpc_frame(&infer_request("iris", &[&[3.0]]).encode_to_vec());
    let length = body.len().to_string();
    let (head, code, message) = raw_grpc_exchange(
        mg.data_addr,
        "/inference.GRPCInferenceService/ModelInfer",
        body,
        &[("content-length", &length)],
    )
    .await;
    assert_eq!(code, 0, "{message}");
    // The answer is framed by its messages and trailers, with no length announced (as model
    // servers answer).
    assert!(head.get("content-length").is_none(), "{head:?}");
    mg.shutdown().await;
}

#[tokio::test]
async fn artifact_digests_are_computed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("model.onnx");
    std::fs::write(&artifact, b"abc").unwrap();
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let mg = start(&dir.path().join("db")).await;
    let mut reg = registry(mg.control_addr).await;
    let v = reg
        .register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: "127.0.0.1:1".into(),
            artifact_uri: artifact.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(v.artifact_sha256, ABC);
    assert!(v.artifact_sha256_verified);
    let err = reg
        .register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: "127.0.0.1:1".into(),
            artifact_uri: format!("file://{}", artifact.display()),
            artifact_sha256: "0".repeat(64),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("artifact_sha256:"),
        "{}",
        err.message()
    );
    // A remote URI keeps the given digest, unverified.
    let v = reg
        .register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: "127.0.0.1:1".into(),
            artifact_uri: "s3://bucket/model.onnx".into(),
            artifact_sha256: ABC.to_uppercase(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(v.artifact_sha256, ABC);
    assert!(!v.artifact_sha256_verified);
    assert_eq!(v.version, 2, "the refused registration used no number");
    mg.shutdown().await;
}

#[tokio::test]
async fn a_promotion_does_not_disturb_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let slow_v1 = model_server("name=iris;kind=linear;weights=1;version=a;latency=400ms").await;
    let v2 = model_server("name=iris;kind=linear;weights=2;version=b").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &slow_v1.endpoint()).await;
    register(&mut reg, "iris", &v2.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    let client = infer_client(mg.data_addr).await;
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.model_infer(infer_request("iris", &[&[5.0]])).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    promote(&mut reg, "iris", "2").await;
    // New requests go to version 2 at once, while the old ones are still being answered.
    let mut c = client.clone();
    let resp = c
        .model_infer(infer_request("iris", &[&[5.0]]))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "2");
    assert_eq!(first_output(&resp.into_inner()), vec![10.0]);
    for call in in_flight {
        let resp = call.await.unwrap().expect("in-flight request completes");
        assert_eq!(served_version(&resp), "1");
        assert_eq!(first_output(&resp.into_inner()), vec![5.0]);
    }
    mg.shutdown().await;
}
