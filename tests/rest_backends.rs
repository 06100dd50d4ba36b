//! Versions whose model server speaks the Open Inference Protocol over HTTP/JSON (backend protocol
//! `oip-rest`): gRPC and REST callers alike are answered through REST calls to it, recorded as
//! usual; its errors come back as the status they mean; a shadow on a REST backend is compared
//! with a gRPC production answer. Against the built-in model server's REST port, and MLServer's
//! when it is installed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use modelgate::pb::inference::ModelMetadataRequest;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::predictions_client::PredictionsClient;
use modelgate::pb::modelgate::v1::shadows_client::ShadowsClient;
use serde_json::{json, Value};
use tonic::Code;

const SPEC: &str = "name=iris;kind=logistic;weights=1,0,0";

async fn register_rest(
    mg: &modelgate::server::Running,
    model: &str,
    endpoint: &str,
    backend_model: &str,
    protocol: pb::BackendProtocol,
) -> u32 {
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: model.into(),
        endpoint: endpoint.into(),
        backend_model: backend_model.into(),
        backend_protocol: protocol as i32,
        feature_names: vec![pb::InputFeatureNames {
            input: "input".into(),
            names: vec!["a".into(), "b".into(), "c".into()],
        }],
        prediction: Some(threshold_prediction("yes", "no")),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .version
    .unwrap()
    .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_and_rest_callers_are_served_by_a_rest_model_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = modelgate::model_server::spawn_with_rest(ANY, vec![SPEC.parse().unwrap()])
        .await
        .unwrap();
    let rest = server.rest_endpoint().unwrap();
    let mg = start(dir.path()).await;
    let v = register_rest(&mg, "m", &rest, "iris", pb::BackendProtocol::OipRest).await;
    assert_eq!(v, 1);
    let mut reg = registry(mg.control_addr).await;
    promote(&mut reg, "m", "1").await;
    let got = reg
        .get_model_version(pb::GetModelVersionRequest {
            model: "m".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.backend_protocol, pb::BackendProtocol::OipRest as i32);

    // A gRPC caller: its call goes out as REST and comes back as gRPC.
    let mut infer = infer_client(mg.data_addr).await;
    let mut req = tonic::Request::new(infer_request("m", &[&[2.0, 0.0, 0.0], &[-2.0, 0.0, 0.0]]));
    req.metadata_mut()
        .insert("x-user-id", "user-3".parse().unwrap());
    let resp = infer.model_infer(req).await.unwrap();
    assert_eq!(served_version(&resp), "1");
    let grpc_id = request_id_of(&resp);
    let answer = resp.into_inner();
    assert_eq!(answer.model_name, "iris", "the backend's own answer");
    let p = first_output(&answer);
    assert!(p[1] > 0.5 && p[3] < 0.5, "{p:?}");
    let meta = infer
        .model_metadata(ModelMetadataRequest {
            name: "m".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.inputs[0].name, "input");
    assert_eq!(meta.inputs[0].shape, vec![-1, 3]);

    // A REST caller: REST in, REST out.
    let base = format!("http://{}", mg.data_addr);
    let (code, headers, body) = curl(&[
        "-H",
        "x-user-id: user-4",
        "-d",
        r#"{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[2,0,0]}]}"#,
        &format!("{base}/v2/models/m/infer"),
    ]);
    assert_eq!(code, 200, "{body}");
    let data = &body["outputs"][0]["data"];
    assert!(data[1].as_f64().unwrap() > 0.5, "{body}");
    let rest_id = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-modelgate-request-id: "))
        .unwrap()
        .trim()
        .to_string();
    let (code, _, ready) = curl(&[&format!("{base}/v2/models/m/ready")]);
    assert_eq!((code, &ready["ready"]), (200, &json!(true)));

    // Both recorded with named features and parsed predictions.
    mg.recorder.flush().await;
    let mut records = PredictionsClient::new(channel(mg.control_addr).await);
    for (id, unit, rows) in [(grpc_id, "user-3", 2), (rest_id, "user-4", 1)] {
        let rec = records
            .get_prediction(pb::GetPredictionRequest { request_id: id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rec.unit_id, unit);
        assert_eq!(rec.feature_names, vec!["a", "b", "c"]);
        assert_eq!(rec.predictions.len(), rows, "{rec:?}");
        assert!(rec.note.is_empty(), "{rec:?}");
    }
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_model_server_errors_come_back_as_the_status_they_mean() {
    let dir = tempfile::tempdir().unwrap();
    let server = modelgate::model_server::spawn_with_rest(ANY, vec![SPEC.parse().unwrap()])
        .await
        .unwrap();
    let rest = server.rest_endpoint().unwrap();
    let mg = start(dir.path()).await;
    // Version 1 names a model the server does not have.
    register_rest(&mg, "m", &rest, "ghost", pb::BackendProtocol::OipRest).await;
    let mut reg = registry(mg.control_addr).await;
    promote(&mut reg, "m", "1").await;
    let mut infer = infer_client(mg.data_addr).await;
    let e = infer
        .model_infer(infer_request("m", &[&[1.0, 0.0, 0.0]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("ghost"), "{e:?}");
    // A tensor of the wrong shape: the server's 400 is INVALID_ARGUMENT with its message.
    register_rest(&mg, "n", &rest, "iris", pb::BackendProtocol::OipRest).await;
    promote(&mut reg, "n", "1").await;
    let e = infer
        .model_infer(infer_request("n", &[&[1.0, 0.0]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("shape"), "{e:?}");
    // Streams and other protocols have no OIP REST form.
    let (code, msg) = raw_grpc_call(
        mg.data_addr,
        "/tensorflow.serving.PredictionService/GetModelMetadata",
        modelgate::protocol::grpc::frame(
            &modelgate::pb::tensorflow::serving::GetModelMetadataRequest {
                model_spec: Some(modelgate::pb::tensorflow::serving::ModelSpec {
                    name: "n".into(),
                    ..Default::default()
                }),
                metadata_field: vec![],
            },
        ),
    )
    .await;
    assert_eq!(code, Code::FailedPrecondition as i32, "{msg}");
    assert!(msg.contains("oip-rest"), "{msg}");
    // The server gone: UNAVAILABLE to gRPC callers, 503 to REST callers.
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = infer
        .model_infer(infer_request("n", &[&[1.0, 0.0, 0.0]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let (code, _, body) = curl(&[
        "-d",
        r#"{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[2,0,0]}]}"#,
        &format!("http://{}/v2/models/n/infer", mg.data_addr),
    ]);
    assert_eq!(code, 503, "{body}");
    mg.shutdown().await;
}

/// A REST caller's production answer (from a gRPC model server) compared with a shadow's (from a
/// REST model server) row by row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_on_a_rest_server_is_compared_with_a_grpc_production() {
    let dir = tempfile::tempdir().unwrap();
    let same = modelgate::model_server::spawn_with_rest(ANY, vec![SPEC.parse().unwrap()])
        .await
        .unwrap();
    // Production over gRPC; the shadow is the same model over REST, so every row agrees.
    let mg = start(dir.path()).await;
    register_rest(
        &mg,
        "m",
        &same.endpoint(),
        "iris",
        pb::BackendProtocol::Grpc,
    )
    .await;
    let rest = same.rest_endpoint().unwrap();
    register_rest(&mg, "m", &rest, "iris", pb::BackendProtocol::OipRest).await;
    let mut reg = registry(mg.control_addr).await;
    promote(&mut reg, "m", "1").await;
    let mut shadows = ShadowsClient::new(channel(mg.control_addr).await);
    shadows
        .set_shadow(pb::SetShadowRequest {
            model: "m".into(),
            version: "2".into(),
            sample_fraction: 1.0,
            comparison: None,
            timeout: None,
        })
        .await
        .unwrap();
    let base = format!("http://{}", mg.data_addr);
    for x in [2.0, -1.0, 0.5, -3.0, 1.5] {
        let body = json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
            "data": [x, 0.0, 0.0]}]});
        let (code, _, answer) = curl(&[
            "-d",
            &body.to_string(),
            &format!("{base}/v2/models/m/infer"),
        ]);
        assert_eq!(code, 200, "{answer}");
    }
    let report = shadow_report_after(&mg, "m", "2", 5).await;
    assert_eq!(
        (report.mirrored, report.compared, report.agreed),
        (5, 5, 5),
        "{report:?}"
    );
    assert!(report.errors.is_empty(), "{report:?}");
    mg.shutdown().await;
}

/// MLServer (scikit-learn runtime) on its REST port as a version's model server: a gRPC caller and
/// a REST caller get what MLServer answers directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mlserver_rest_port_as_a_backend() {
    let Some(ml) = MlServer::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "iris".into(),
        endpoint: ml.endpoint(),
        backend_protocol: pb::BackendProtocol::OipRest as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "iris", "1").await;
    let body = json!({"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
        "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]});
    let (code, _, direct) = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        &body.to_string(),
        &format!("{}/v2/models/iris/infer", ml.endpoint()),
    ]);
    assert_eq!(code, 200, "{direct}");
    let (code, _, through) = curl(&[
        "-d",
        &body.to_string(),
        &format!("http://{}/v2/models/iris/infer", mg.data_addr),
    ]);
    assert_eq!(code, 200, "{through}");
    assert_eq!(through["outputs"][0]["data"], direct["outputs"][0]["data"]);
    assert_eq!(through["outputs"][0]["name"], "predict");

    let mut infer = infer_client(mg.data_addr).await;
    let mut req = infer_request("iris", &[&[5.1, 3.5, 1.4, 0.2], &[6.7, 3.0, 5.2, 2.3]]);
    req.inputs[0].name = "input-0".into();
    let answer = infer.model_infer(req).await.unwrap().into_inner();
    let got = modelgate::oip::response_outputs(&answer, 100).unwrap();
    let want: Vec<f64> = direct["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got[0].numeric().unwrap(), &want[..]);
    let (code, _, meta) = curl(&[&format!("http://{}/v2/models/iris", mg.data_addr)]);
    assert_eq!((code, &meta["name"]), (200, &Value::from("iris")), "{meta}");
    // A request MLServer fails (it answers 500 with its traceback): INTERNAL, with its status.
    let mut bad = infer_request("iris", &[&[1.0]]);
    bad.inputs[0].name = "input-0".into();
    let e = infer.model_infer(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("answered 500"), "{e:?}");
    mg.shutdown().await;
}

/// MLServer serving a scikit-learn logistic regression trained on a fixed iris-like sample, on
/// free loopback ports (tests/peers/mlserver_model.py writes the model and settings).
struct MlServer {
    child: tokio::process::Child,
    http_port: u16,
    _dir: tempfile::TempDir,
}

impl MlServer {
    async fn start() -> Option<MlServer> {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let root = dir.path().to_str().unwrap().to_string();
        let args: Vec<String> = std::iter::once(root.clone())
            .chain(ports.iter().map(u16::to_string))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        python_peer("mlserver_model.py", &args, "mlserver_sklearn").await?;
        let child = tokio::process::Command::new("mlserver")
            .args(["start", &root])
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mlserver starts");
        let ml = MlServer {
            child,
            http_port: ports[0],
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = std::process::Command::new("curl")
                .args(["-sf", "-o", "/dev/null"])
                .arg(format!("{}/v2/models/iris/ready", ml.endpoint()))
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Some(ml);
            }
            assert!(Instant::now() < until, "MLServer did not become ready");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

impl Drop for MlServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
