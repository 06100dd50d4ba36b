//! REST callers on the data port (OIP over HTTP/JSON, KServe v2 REST) with curl: HTTP/1.1 on the
//! same port as gRPC, translated to OIP gRPC so that they get routing, records and the rest, and
//! REST errors as `{"error": …}` with the HTTP status a REST client expects.

mod common;

use std::process::Command;

use common::*;
use modelgate::config::Config;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::predictions_client::PredictionsClient;
use serde_json::Value;

async fn setup() -> (
    tempfile::TempDir,
    modelgate::server::Running,
    modelgate::model_server::RunningModelServer,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=1,0,0").await;
    let mut config = Config::for_tests(dir.path());
    config.max_message_bytes = 1 << 20;
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "m".into(),
        endpoint: server.endpoint(),
        feature_names: vec![pb::InputFeatureNames {
            input: "input".into(),
            names: vec!["a".into(), "b".into(), "c".into()],
        }],
        prediction: Some(threshold_prediction("1", "0")),
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "m", "1").await;
    (dir, mg, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_gets_health_metadata_and_inference_over_http1() {
    let (_dir, mg, _server) = setup().await;
    let base = format!("http://{}", mg.data_addr);
    let (code, _, body) = curl(&[&format!("{base}/v2/health/live")]);
    assert_eq!((code, &body), (200, &serde_json::json!({"live": true})));
    let (code, _, _) = curl(&[&format!("{base}/v2/health/ready")]);
    assert_eq!(code, 200);
    // REST over HTTP/2 cleartext (prior knowledge) on the same port.
    let h2 = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg(format!("{base}/v2/health/ready"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&h2.stdout), "2 200");
    let (code, _, body) = curl(&[&format!("{base}/v2/models/m/ready")]);
    assert_eq!((code, body["ready"].as_bool()), (200, Some(true)));
    let (code, _, meta) = curl(&[&format!("{base}/v2/models/m")]);
    assert_eq!(code, 200, "{meta}");
    assert_eq!(meta["inputs"][0]["name"], "input");

    let request = r#"{"id":"call-1","inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[[2,0,0]]}]}"#;
    let (code, headers, answer) = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        "x-user-id: user-7",
        "-d",
        request,
        &format!("{base}/v2/models/m/infer"),
    ]);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model_name"], "m");
    assert_eq!(answer["model_version"], "1");
    assert_eq!(answer["id"], "call-1");
    let p = &answer["outputs"][0];
    assert_eq!(p["name"], "probabilities");
    assert_eq!(p["datatype"], "FP32");
    let data: Vec<f64> = p["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(data.iter().all(|x| (0.0..=1.0).contains(x)), "{data:?}");
    assert!(
        headers.contains("x-modelgate-model-version: 1"),
        "{headers}"
    );
    let id = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-modelgate-request-id: "))
        .expect("the request id header")
        .trim()
        .to_string();

    // Recorded as a gRPC call is: named features, the parsed prediction, the unit.
    mg.recorder.flush().await;
    let rec = PredictionsClient::new(channel(mg.control_addr).await)
        .get_prediction(pb::GetPredictionRequest { request_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rec.model, "m");
    assert_eq!(rec.feature_names, vec!["a", "b", "c"]);
    assert_eq!(rec.unit_id, "user-7");
    assert_eq!(rec.predictions.len(), 1);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_errors_are_json_with_the_status_a_rest_client_expects() {
    let (_dir, mg, server) = setup().await;
    let base = format!("http://{}", mg.data_addr);
    let infer =
        |model: &str, body: &str| curl(&["-d", body, &format!("{base}/v2/models/{model}/infer")]);
    let good = r#"{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#;
    let (code, _, e) = infer("nope", good);
    assert_eq!(code, 404, "{e}");
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    let (code, _, e) = infer("m", "{not json");
    assert_eq!(code, 400);
    assert!(e["error"].as_str().unwrap().contains("not JSON"), "{e}");
    let (code, _, e) = infer(
        "m",
        r#"{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[1,"x",3]}]}"#,
    );
    assert_eq!(code, 400);
    assert!(
        e["error"].as_str().unwrap().contains("inputs[0].data[1]"),
        "{e}"
    );
    let (code, _, e) = curl(&[&format!("{base}/v2/nothing/here")]);
    assert_eq!(code, 404, "{e}");
    // KServe v1 / TF Serving REST: unknown model and bad bodies.
    let (code, _, e) = curl(&[
        "-d",
        r#"{"instances":[[1,2,3]]}"#,
        &format!("{base}/v1/models/nope:predict"),
    ]);
    assert_eq!(code, 404, "{e}");
    let (code, _, e) = curl(&[
        "-d",
        r#"{"instances":3}"#,
        &format!("{base}/v1/models/m:predict"),
    ]);
    assert_eq!(code, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("'instances'"), "{e}");
    let (code, _, _) = curl(&[&format!("{base}/v2/models/m/infer")]);
    assert_eq!(code, 405);
    // Over --max-message-bytes (1 MiB here): 413.
    let big = format!(
        r#"{{"inputs":[{{"name":"input","shape":[1,3],"datatype":"FP32","data":[{}]}}]}}"#,
        vec!["1.0"; 2_000_000].join(",")
    );
    let path = std::env::temp_dir().join(format!("mg-big-{}.json", std::process::id()));
    std::fs::write(&path, big).unwrap();
    let (code, _, e) = curl(&[
        "--data-binary",
        &format!("@{}", path.display()),
        &format!("{base}/v2/models/m/infer"),
    ]);
    std::fs::remove_file(&path).ok();
    assert_eq!(code, 413, "{e}");
    // The model server gone: 503, as gRPC callers get UNAVAILABLE.
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (code, _, e) = infer("m", good);
    assert_eq!(code, 503, "{e}");
    mg.shutdown().await;
}

/// NVIDIA's `tritonclient.http`: health, metadata, inference with JSON and with binary tensors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_http_works_through_modelgate() {
    let (_dir, mg, _server) = setup().await;
    let Some(out) = python_peer(
        "triton_http.py",
        &[&mg.data_addr.to_string(), "m"],
        "tritonclient.http",
    )
    .await
    else {
        return;
    };
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["live"], true, "{v}");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["model_ready"], true, "{v}");
    assert_eq!(v["metadata_inputs"], serde_json::json!(["input"]), "{v}");
    assert_eq!(v["json"], v["binary"], "the same answer either way: {v}");
    assert_eq!(v["label_0"], v["label_1"], "{v}");
    assert_eq!(v["label_1"], serde_json::json!([[1]]), "{v}");
    assert_eq!(v["id_1"], "http-peer-1", "{v}");
    assert!(v["unknown_model"].as_str().unwrap().contains("nope"), "{v}");
    mg.shutdown().await;
}

/// KServe v1 / TF Serving REST: a model's status and `:predict` in row and columnar forms,
/// translated to OIP (the input named and typed by the model's metadata).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kserve_v1_predict_and_status() {
    let (_dir, mg, _server) = setup().await;
    let base = format!("http://{}", mg.data_addr);
    let (code, _, status) = curl(&[&format!("{base}/v1/models/m")]);
    assert_eq!(code, 200, "{status}");
    assert_eq!(
        status["model_version_status"][0]["state"], "AVAILABLE",
        "{status}"
    );
    assert_eq!(
        status["model_version_status"][0]["version"], "1",
        "{status}"
    );
    let (code, headers, rows) = curl(&[
        "-d",
        r#"{"instances":[[2,0,0],[-2,0,0]]}"#,
        &format!("{base}/v1/models/m:predict"),
    ]);
    assert_eq!(code, 200, "{rows}");
    assert!(
        headers.contains("x-modelgate-model-version: 1"),
        "{headers}"
    );
    let p = rows["predictions"].as_array().unwrap();
    assert_eq!(p.len(), 2, "{rows}");
    // The logistic model answers two outputs, so each row is an object of both: over x = 2 and
    // x = -2 the class probabilities mirror each other, and the labels differ.
    let probs = |r: &Value| -> Vec<f64> {
        r["probabilities"]
            .as_array()
            .unwrap_or_else(|| panic!("{rows}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (first, second) = (probs(&p[0]), probs(&p[1]));
    assert_eq!((first.len(), second.len()), (2, 2), "{rows}");
    let sigma = 1.0 / (1.0 + (-2.0f64).exp());
    assert!(
        (first[1] - sigma).abs() < 1e-6 && (second[0] - sigma).abs() < 1e-6,
        "{rows}"
    );
    assert_ne!(p[0]["label"], p[1]["label"], "{rows}");
    // Columnar, and pinned to version 1.
    let (code, _, cols) = curl(&[
        "-d",
        r#"{"inputs":[[2,0,0],[-2,0,0]]}"#,
        &format!("{base}/v1/models/m/versions/1:predict"),
    ]);
    assert_eq!(code, 200, "{cols}");
    assert_eq!(cols, rows);
    mg.shutdown().await;
}

/// Every shell example of docs/protocols.md (curl for OIP REST and KServe v1, grpcurl for TF
/// Serving, `modelgate ctl` registering a REST backend) runs as written against modelgate in
/// front of a built-in `iris` of four features.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_protocol_page_examples_run() {
    let Some(grpcurl) = grpcurl() else { return };
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocols.md"),
    )
    .unwrap();
    let blocks: Vec<&str> = page
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 3, "{blocks:?}");
    let dir = tempfile::tempdir().unwrap();
    let server = modelgate::model_server::spawn_with_rest(
        ANY,
        vec!["name=iris;kind=logistic;features=4".parse().unwrap()],
    )
    .await
    .unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &server.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    let path = format!(
        "{}:{}:{}",
        grpcurl.parent().unwrap().display(),
        std::path::Path::new(env!("CARGO_BIN_EXE_modelgate"))
            .parent()
            .unwrap()
            .display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for block in blocks {
        let script = block
            .replace("localhost:9000", &mg.data_addr.to_string())
            .replace("http://127.0.0.1:8080", &server.rest_endpoint().unwrap());
        let out = tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("PATH", &path)
            .env("MODELGATE_CTL_ADDR", format!("http://{}", mg.control_addr))
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("\"error\":") && !text.trim().is_empty(),
            "{script}\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if script.contains("Predict") {
            assert!(text.contains("probabilities"), "{text}");
        }
    }
    // The registered REST backend serves the model's version 2.
    let v2 = reg
        .get_model_version(pb::GetModelVersionRequest {
            model: "iris".into(),
            version: "2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.backend_protocol, pb::BackendProtocol::OipRest as i32);
    let (code, _, answer) = curl(&[
        "-d",
        r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#,
        &format!("http://{}/v2/models/iris/versions/2/infer", mg.data_addr),
    ]);
    assert_eq!(code, 200, "{answer}");
    mg.shutdown().await;
}
