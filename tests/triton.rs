//! Triton's calls by model name: every `inference.GRPCInferenceService` method that names a model
//! is routed by that name (no `x-model-name` needed), `ModelStreamInfer` by its first message
//! with every inference recorded; methods that name no model go to the default model or answer
//! FAILED_PRECONDITION; and a caller's `model_version` names one of modelgate's versions, which
//! the backend gets as that version's backend version — or none.
//!
//! The upstream is a raw HTTP/2 server that speaks Triton's extension methods as far as the
//! callers need (their answers are empty messages, a streamed answer per streamed request) and
//! remembers the model name and version every request carried. NVIDIA's tritonclient is the
//! caller at the end.

mod common;

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use http::{HeaderMap, HeaderValue, Response};
use modelgate::config::Config;
use modelgate::pb::inference::{
    model_infer_response::InferOutputTensor, InferTensorContents, ModelInferRequest,
    ModelInferResponse,
};
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::predictions_client::PredictionsClient;
use parking_lot::Mutex;
use prost::Message;

/// The fields of Triton's requests that name a model (`ModelConfigRequest`,
/// `ModelStatisticsRequest`: name = 1, version = 2; repository requests: model_name = 2).
#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StreamResponse {
    #[prost(string, tag = "1")]
    error_message: String,
    #[prost(message, optional, tag = "2")]
    infer_response: Option<ModelInferResponse>,
}

/// What the upstream saw: (method, first string field, second string field) per message.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// The answer to one ModelInfer: `value` = the sum of the input's FP32 values, per the request id.
fn answer(req: &ModelInferRequest) -> ModelInferResponse {
    let values: Vec<f32> = match req.raw_input_contents.first() {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => {
            req.inputs[0]
                .contents
                .clone()
                .unwrap_or_default()
                .fp32_contents
        }
    };
    let sum: f32 = values.iter().sum();
    // Raw inputs get raw outputs, as Triton answers (tritonclient reads only those).
    let raw = !req.raw_input_contents.is_empty();
    ModelInferResponse {
        model_name: req.model_name.clone(),
        model_version: req.model_version.clone(),
        id: req.id.clone(),
        outputs: vec![InferOutputTensor {
            name: "value".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1],
            parameters: Default::default(),
            contents: (!raw).then(|| InferTensorContents {
                fp32_contents: vec![sum],
                ..Default::default()
            }),
        }],
        raw_output_contents: if raw {
            vec![Bytes::copy_from_slice(&sum.to_le_bytes())]
        } else {
            vec![]
        },
        ..Default::default()
    }
}

/// A Triton-like upstream; returns its endpoint and what it saw.
async fn triton_upstream() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Default::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(serve(req, respond, log.clone()));
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

async fn serve(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    log: Seen,
) {
    let method = req.uri().path().rsplit('/').next().unwrap().to_string();
    let mut body = req.into_body();
    let mut head = Response::new(());
    head.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    let mut send = respond.send_response(head, false).unwrap();
    let mut buf = BytesMut::new();
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    while let Some(Ok(d)) = body.data().await {
        let _ = body.flow_control().release_capacity(d.len());
        buf.extend_from_slice(&d);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            pending.push_back(buf.split_to(len).freeze());
        }
        // Streamed requests are answered one by one, as they come.
        while let Some(msg) = pending.pop_front() {
            let answer_msg = match method.as_str() {
                "ModelInfer" | "ModelStreamInfer" => {
                    let r = ModelInferRequest::decode(msg).unwrap();
                    log.lock().push((
                        method.clone(),
                        r.model_name.clone(),
                        r.model_version.clone(),
                    ));
                    let a = answer(&r);
                    if method == "ModelInfer" {
                        a.encode_to_vec()
                    } else {
                        StreamResponse {
                            error_message: String::new(),
                            infer_response: Some(a),
                        }
                        .encode_to_vec()
                    }
                }
                "RepositoryModelLoad" | "RepositoryModelUnload" | "TraceSetting" => {
                    // model_name is field 2 of these.
                    let r = Named::decode(msg).unwrap();
                    log.lock()
                        .push((method.clone(), r.version.clone(), String::new()));
                    Vec::new()
                }
                _ => {
                    let r = Named::decode(msg).unwrap_or_default();
                    log.lock().push((method.clone(), r.name, r.version));
                    Vec::new()
                }
            };
            send.send_data(grpc_frame(&answer_msg), false).unwrap();
        }
    }
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    let _ = send.send_trailers(t);
}

/// modelgate with model `fraud`: version 1 (production) on `prod` with backend model
/// `fraud_backend` and backend version `v1`, version 2 (staging) on `other` without a backend
/// version.
async fn setup(
    dir: &std::path::Path,
    default_model: Option<&str>,
) -> (modelgate::server::Running, Seen, Seen) {
    let (prod, seen_prod) = triton_upstream().await;
    let (other, seen_other) = triton_upstream().await;
    let mut config = Config::for_tests(dir);
    config.default_model = default_model.map(str::to_string);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "fraud".into(),
        endpoint: prod,
        backend_model: "fraud_backend".into(),
        backend_version: "v1".into(),
        prediction: Some(pb::PredictionSpec {
            kind: Some(pb::prediction_spec::Kind::Value(pb::ValuePrediction {
                output: "value".into(),
            })),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    register(&mut reg, "fraud", &other).await;
    promote(&mut reg, "fraud", "1").await;
    reg.set_alias(pb::SetAliasRequest {
        model: "fraud".into(),
        alias: "candidate".into(),
        version: "2".into(),
    })
    .await
    .unwrap();
    (mg, seen_prod, seen_other)
}

fn encoded<M: Message>(m: &M) -> Bytes {
    grpc_frame(&m.encode_to_vec())
}

const OIP: &str = "/inference.GRPCInferenceService/";

#[tokio::test]
async fn methods_that_name_a_model_are_routed_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, prod, _) = setup(dir.path(), None).await;
    let named = |name: &str, version: &str| {
        encoded(&Named {
            name: name.into(),
            version: version.into(),
        })
    };
    for method in ["ModelConfig", "ModelStatistics"] {
        let (code, msg) =
            raw_grpc_call(mg.data_addr, &format!("{OIP}{method}"), named("fraud", "")).await;
        assert_eq!(code, 0, "{method}: {msg}");
    }
    // Repository calls name the model in field 2.
    for method in ["RepositoryModelLoad", "RepositoryModelUnload"] {
        let (code, msg) = raw_grpc_call(
            mg.data_addr,
            &format!("{OIP}{method}"),
            named("models", "fraud"),
        )
        .await;
        assert_eq!(code, 0, "{method}: {msg}");
    }
    let seen = prod.lock().clone();
    assert_eq!(
        seen,
        vec![
            ("ModelConfig".into(), "fraud_backend".into(), "v1".into()),
            (
                "ModelStatistics".into(),
                "fraud_backend".into(),
                "v1".into()
            ),
            (
                "RepositoryModelLoad".into(),
                "fraud_backend".into(),
                "".into()
            ),
            (
                "RepositoryModelUnload".into(),
                "fraud_backend".into(),
                "".into()
            ),
        ]
    );
    // Unknown model, a missing name, and garbage.
    let (code, msg) = raw_grpc_call(
        mg.data_addr,
        &format!("{OIP}ModelConfig"),
        named("nope", ""),
    )
    .await;
    assert_eq!(code, 5, "{msg}");
    let (code, msg) =
        raw_grpc_call(mg.data_addr, &format!("{OIP}ModelConfig"), named("", "")).await;
    assert_eq!(code, 3, "{msg}");
    assert!(msg.contains("name: required"), "{msg}");
    let (code, msg) = raw_grpc_call(
        mg.data_addr,
        &format!("{OIP}ModelStatistics"),
        grpc_frame(&[0x0a, 0x09, b'x']),
    )
    .await;
    assert_eq!(code, 3, "{msg}");
    assert!(msg.contains("inference.ModelStatisticsRequest"), "{msg}");
    mg.shutdown().await;
}

#[tokio::test]
async fn methods_that_name_no_model_need_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _, _) = setup(dir.path(), None).await;
    let (code, msg) = raw_grpc_call(
        mg.data_addr,
        &format!("{OIP}RepositoryIndex"),
        grpc_frame(&[]),
    )
    .await;
    assert_eq!(code, 9, "FAILED_PRECONDITION: {msg}");
    assert!(
        msg.contains("RepositoryIndex names no model") && msg.contains("--default-model"),
        "{msg}"
    );
    mg.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let (mg, prod, _) = setup(dir.path(), Some("fraud")).await;
    for method in ["RepositoryIndex", "SystemSharedMemoryStatus", "LogSettings"] {
        let (code, msg) =
            raw_grpc_call(mg.data_addr, &format!("{OIP}{method}"), grpc_frame(&[])).await;
        assert_eq!(code, 0, "{method}: {msg}");
    }
    // Trace settings naming no model go to the default model too.
    let (code, msg) =
        raw_grpc_call(mg.data_addr, &format!("{OIP}TraceSetting"), grpc_frame(&[])).await;
    assert_eq!(code, 0, "{msg}");
    let methods: Vec<String> = prod.lock().iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        methods,
        [
            "RepositoryIndex",
            "SystemSharedMemoryStatus",
            "LogSettings",
            "TraceSetting"
        ]
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn model_version_names_a_modelgate_version() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, prod, other) = setup(dir.path(), None).await;
    let mut client = infer_client(mg.data_addr).await;
    let call = |version: &str| {
        let mut r = infer_request("fraud", &[&[1.0, 2.0]]);
        r.model_version = version.into();
        r
    };
    // Version 1 by number: its backend version; version 2 by alias: none registered, cleared.
    for (version, served) in [("", "1"), ("1", "1"), ("candidate", "2"), ("2", "2")] {
        let resp = client.model_infer(call(version)).await.unwrap();
        assert_eq!(served_version(&resp), served, "model_version '{version}'");
    }
    assert_eq!(
        *prod.lock(),
        vec![
            ("ModelInfer".into(), "fraud_backend".into(), "v1".into()),
            ("ModelInfer".into(), "fraud_backend".into(), "v1".into()),
        ]
    );
    assert_eq!(
        *other.lock(),
        vec![
            ("ModelInfer".into(), "fraud".into(), "".into()),
            ("ModelInfer".into(), "fraud".into(), "".into()),
        ]
    );
    let err = client.model_infer(call("9")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("no version '9'"), "{err:?}");
    let mut reg = registry(mg.control_addr).await;
    reg.transition_stage(transition("fraud", "2", pb::Stage::Archived))
        .await
        .unwrap();
    let err = client.model_infer(call("2")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("archived"), "{err:?}");
    mg.shutdown().await;
}

#[tokio::test]
async fn a_stream_is_routed_by_its_first_message_and_every_inference_recorded() {
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let (mg, prod, _) = setup(dir.path(), None).await;
    let channel = channel(mg.data_addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let requests: Vec<ModelInferRequest> = (0..3)
        .map(|i| {
            let mut r = infer_request("fraud", &[&[i as f32, 1.0]]);
            if i < 2 {
                r.id = format!("stream-{i}");
            }
            r
        })
        .collect();
    let codec: tonic_prost::ProstCodec<ModelInferRequest, StreamResponse> = Default::default();
    let path =
        http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelStreamInfer");
    let resp = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(requests)),
            path,
            codec,
        )
        .await
        .unwrap();
    let request_id = request_id_of(&resp);
    let answers: Vec<StreamResponse> = resp.into_inner().map(|r| r.unwrap()).collect().await;
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0].infer_response.as_ref().unwrap().id, "stream-0");
    assert_eq!(
        *prod.lock(),
        vec![
            (
                "ModelStreamInfer".into(),
                "fraud_backend".into(),
                "v1".into()
            );
            3
        ]
    );
    let mut predictions = PredictionsClient::connect(format!("http://{}", mg.control_addr))
        .await
        .unwrap();
    // Records leave through the writer: wait for them.
    let ids = [
        "stream-0".to_string(),
        "stream-1".into(),
        format!("{request_id}-3"),
    ];
    for (i, id) in ids.iter().enumerate() {
        let mut record = None;
        for _ in 0..100 {
            if let Ok(r) = predictions
                .get_prediction(pb::GetPredictionRequest {
                    request_id: id.clone(),
                })
                .await
            {
                record = Some(r.into_inner());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let record = record.unwrap_or_else(|| panic!("no record of {id}"));
        assert_eq!(record.model, "fraud");
        assert_eq!(record.version, 1);
        assert_eq!(record.status_code, 0);
        assert_eq!(
            record.method,
            "/inference.GRPCInferenceService/ModelStreamInfer"
        );
        let row: Vec<f64> = record.rows[0]
            .values
            .iter()
            .map(|v| match v.kind {
                Some(pb::feature_value::Kind::Number(x)) => x,
                _ => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(row, vec![i as f64, 1.0]);
        assert_eq!(
            record.predictions[0].kind,
            Some(pb::prediction_value::Kind::Value(i as f64 + 1.0)),
            "{record:?}"
        );
    }
    // No record of the stream as one call.
    assert_eq!(
        predictions
            .get_prediction(pb::GetPredictionRequest { request_id })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn tritonclient_calls_by_model_name() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, prod, other) = setup(dir.path(), Some("fraud")).await;
    let Some(out) = python_peer(
        "triton_calls.py",
        &[&mg.data_addr.to_string(), "fraud"],
        "tritonclient.grpc",
    )
    .await
    else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    assert_eq!(
        v["stream_ids"],
        serde_json::json!(["s0", "s1", "s2"]),
        "{v}"
    );
    assert_eq!(
        v["stream_values"],
        serde_json::json!([1.0, 2.0, 3.0]),
        "{v}"
    );
    assert_eq!(v["missing_version"], "StatusCode.NOT_FOUND", "{v}");
    let methods: Vec<(String, String, String)> = prod.lock().clone();
    let by = |m: &str| {
        methods
            .iter()
            .filter(|s| s.0 == m)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by("ModelConfig"),
        vec![("ModelConfig".into(), "fraud_backend".into(), "v1".into())]
    );
    assert_eq!(by("ModelStatistics").len(), 1);
    assert_eq!(by("RepositoryIndex").len(), 1);
    assert_eq!(by("ModelStreamInfer").len(), 3);
    assert!(by("ModelStreamInfer")
        .iter()
        .all(|s| s.1 == "fraud_backend" && s.2 == "v1"));
    // model_version "2" went to version 2, whose server got no version.
    assert_eq!(
        *other.lock(),
        vec![("ModelInfer".into(), "fraud".into(), "".into())]
    );
    mg.shutdown().await;
}
