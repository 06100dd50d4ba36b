//! Shared test helpers: real servers on 127.0.0.1:0, real clients, a real RocksDB in a tempdir.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use modelgate::config::Config;
use modelgate::model_server::{self, ModelSpec, RunningModelServer};
use modelgate::pb::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
};
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::registry_client::RegistryClient;
use modelgate::pb::testing::{
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest,
};
use modelgate::server::Running;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

pub mod redis;

/// A protobuf timestamp of Unix milliseconds.
pub fn ts(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A `PutFeatures` row: `values` of `entity` at `time_ms`.
pub fn put_row(
    entity: &str,
    values: &[(&str, pb::feature_value::Kind)],
    time_ms: u64,
) -> pb::FeatureRowInput {
    pb::FeatureRowInput {
        entity_id: entity.into(),
        values: values
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    pb::FeatureValue {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect(),
        event_time: Some(ts(time_ms)),
    }
}

pub const ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// modelgate on 127.0.0.1:0 with its RocksDB in `dir`.
pub async fn start(dir: &std::path::Path) -> Running {
    start_with(Config::for_tests(dir)).await
}

pub async fn start_with(config: Config) -> Running {
    modelgate::server::start(config)
        .await
        .expect("modelgate starts")
}

/// modelgate whose storage can be made to fail or stall (`mg.faults`), through the storage seam.
pub async fn start_faulty(config: Config) -> Running {
    modelgate::server::start_with_storage(config, |storage| {
        let (storage, faults) = modelgate::storage::faults::Faulty::wrap(storage);
        (storage, Some(faults))
    })
    .await
    .expect("modelgate starts")
}

/// A built-in model server with one model.
pub async fn model_server(spec: &str) -> RunningModelServer {
    let spec: ModelSpec = spec.parse().expect("valid spec");
    model_server::spawn(ANY, vec![spec])
        .await
        .expect("model server starts")
}

pub async fn registry(addr: SocketAddr) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{addr}"))
        .await
        .expect("control port reachable")
}

pub async fn infer_client(addr: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("data port reachable")
}

/// Registers a version and returns its number.
pub async fn register(reg: &mut RegistryClient<Channel>, model: &str, endpoint: &str) -> u32 {
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: model.into(),
        endpoint: endpoint.into(),
        ..Default::default()
    })
    .await
    .expect("registration succeeds")
    .into_inner()
    .version
    .expect("a version")
    .version
}

pub fn transition(model: &str, version: &str, stage: pb::Stage) -> pb::TransitionStageRequest {
    pb::TransitionStageRequest {
        model: model.into(),
        version: version.into(),
        stage: stage as i32,
        force: false,
    }
}

pub async fn promote(reg: &mut RegistryClient<Channel>, model: &str, version: &str) {
    reg.transition_stage(transition(model, version, pb::Stage::Production))
        .await
        .expect("promotion succeeds");
}

/// A typed-contents FP32 request of `rows` rows.
pub fn infer_request(model: &str, rows: &[&[f32]]) -> ModelInferRequest {
    let cols = rows.first().map(|r| r.len()).unwrap_or(0);
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, cols as i64],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: rows.iter().flat_map(|r| r.iter().copied()).collect(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// The same request with raw little-endian contents.
pub fn raw_infer_request(model: &str, rows: &[&[f32]]) -> ModelInferRequest {
    let mut r = infer_request(model, rows);
    let values = r.inputs[0].contents.take().unwrap().fp32_contents;
    r.raw_input_contents = vec![modelgate::oip::f32_raw(&values)];
    r
}

/// The first output's FP32 values, from typed or raw contents.
pub fn first_output(resp: &modelgate::pb::inference::ModelInferResponse) -> Vec<f64> {
    let outputs = modelgate::oip::response_outputs(resp, 1 << 20).expect("decodable outputs");
    outputs[0].numeric().expect("numeric").to_vec()
}

/// The x-modelgate-request-id header.
pub fn request_id_of<T>(resp: &Response<T>) -> String {
    resp.metadata()
        .get("x-modelgate-request-id")
        .expect("request id header")
        .to_str()
        .unwrap()
        .to_string()
}

/// A prediction read as the threshold at 0.5 of the output `probabilities`, labelled
/// `positive` / `negative`.
pub fn threshold_prediction(positive: &str, negative: &str) -> pb::PredictionSpec {
    pb::PredictionSpec {
        kind: Some(pb::prediction_spec::Kind::Threshold(
            pb::ThresholdPrediction {
                output: "probabilities".into(),
                threshold: 0.5,
                positive_label: positive.into(),
                negative_label: negative.into(),
            },
        )),
    }
}

/// The x-modelgate-model-version header.
pub fn served_version<T>(resp: &Response<T>) -> String {
    resp.metadata()
        .get("x-modelgate-model-version")
        .expect("version header")
        .to_str()
        .unwrap()
        .to_string()
}

/// One length-prefixed, uncompressed gRPC message.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + message.len());
    b.push(0);
    b.extend_from_slice(&(message.len() as u32).to_be_bytes());
    b.extend_from_slice(message);
    Bytes::from(b)
}

/// Sends raw bytes as one gRPC request body over HTTP/2 and returns (grpc-status, grpc-message).
pub async fn raw_grpc_call(addr: SocketAddr, path: &str, body: Bytes) -> (i32, String) {
    raw_grpc_call_with(addr, path, body, &[]).await
}

/// [`raw_grpc_call`] with extra request headers (e.g. a `grpc-timeout` no client timer races).
pub async fn raw_grpc_call_with(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> (i32, String) {
    let (_, code, message) = raw_grpc_exchange(addr, path, body, headers).await;
    (code, message)
}

/// [`raw_grpc_call_with`] that also returns the response's headers (not its trailers).
pub async fn raw_grpc_exchange(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> (http::HeaderMap, i32, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let status = collected.trailers().unwrap_or(&parts.headers);
    let code = status
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().parse().unwrap())
        .unwrap_or(-1);
    // tonic percent-decodes grpc-message.
    let message = tonic::Status::from_header_map(status)
        .map(|s| s.message().to_string())
        .unwrap_or_default();
    (parts.headers, code, message)
}

/// The Echo test service: every call kind, echoing `x-*` metadata and setting a trailer.
#[derive(Clone, Default)]
pub struct EchoService;

fn x_metadata<T>(req: &Request<T>) -> Vec<String> {
    let mut v: Vec<String> = req
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v)
                if k.as_str().starts_with("x-") || k.as_str() == "traceparent" =>
            {
                Some(format!("{}={}", k.as_str(), v.to_str().unwrap_or("")))
            }
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn maybe_fail(r: &EchoRequest) -> Result<(), Status> {
    if r.fail_with_code != 0 {
        return Err(Status::new(
            tonic::Code::from_i32(r.fail_with_code),
            r.message.clone(),
        ));
    }
    Ok(())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let md = x_metadata(&req);
        let r = req.into_inner();
        if r.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(r.delay_ms.into())).await;
        }
        maybe_fail(&r)?;
        let mut resp = Response::new(EchoReply {
            message: r.message,
            index: 0,
            metadata: md,
        });
        resp.metadata_mut()
            .insert("x-echo-header", "unary".parse().unwrap());
        Ok(resp)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let md = x_metadata(&req);
        let r = req.into_inner();
        maybe_fail(&r)?;
        let s = tokio_stream::iter(0..r.repeat).map(move |i| {
            Ok(EchoReply {
                message: format!("{} {i}", r.message),
                index: i,
                metadata: md.clone(),
            })
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let md = x_metadata(&req);
        let mut s = req.into_inner();
        let mut parts = Vec::new();
        while let Some(m) = s.next().await {
            let m = m?;
            maybe_fail(&m)?;
            parts.push(m.message);
        }
        Ok(Response::new(EchoReply {
            message: parts.join("+"),
            index: parts.len() as u32,
            metadata: md,
        }))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let md = x_metadata(&req);
        let mut s = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut i = 0;
            while let Some(m) = s.next().await {
                let reply = m.and_then(|m| {
                    maybe_fail(&m)?;
                    Ok(EchoReply {
                        message: m.message.to_uppercase(),
                        index: i,
                        metadata: md.clone(),
                    })
                });
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
                i += 1;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Starts the Echo service on 127.0.0.1:0; returns its endpoint.
pub async fn echo_server() -> String {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    format!("http://{addr}")
}

/// The sum of a labelled metric on a `/metrics` page over the series whose labels contain
/// `filter` (`""` for all of them).
pub fn metric_sum(page: &str, name: &str, filter: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(filter))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Waits (up to `within`) until the admin port's `/metrics` page contains `line`, e.g.
/// `modelgate_in_flight_requests 1`; panics naming it otherwise.
pub async fn wait_for_metric(admin: std::net::SocketAddr, line: &str, within: Duration) {
    let started = std::time::Instant::now();
    while !http_get(admin, "/metrics").await.contains(line) {
        assert!(
            started.elapsed() < within,
            "`{line}` never appeared on /metrics within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET over HTTP/1.1 and return the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A connected channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("reachable")
}

/// grpcurl, when installed (scripts/test.sh installs it and sets MODELGATE_REQUIRE_PEERS=1).
pub fn grpcurl() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("grpcurl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("MODELGATE_REQUIRE_PEERS").is_none(),
            "grpcurl is required but not on PATH"
        );
        eprintln!("grpcurl not installed; skipping (scripts/test.sh installs it)");
    }
    found
}

/// Runs a command; returns whether it succeeded and its stdout and stderr together.
pub async fn run_tool(cmd: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a peer script of tests/peers with python3 and returns its stdout (it must succeed), or
/// skips when `module` is missing — unless MODELGATE_REQUIRE_PEERS is set (scripts/test.sh
/// installs the peers and sets it).
pub async fn python_peer(script: &str, args: &[&str], module: &str) -> Option<String> {
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

/// A webhook receiver: every POSTed body, as JSON.
pub async fn webhook_receiver() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send(serde_json::from_slice(&body).unwrap());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Empty::<bytes::Bytes>::new(),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/hook"), rx)
}

/// Runs curl; returns (HTTP status, response headers, body as JSON).
pub fn curl(args: &[&str]) -> (u16, String, serde_json::Value) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http1.1", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (rest, code) = text.rsplit_once('\n').unwrap();
    // The last header block (a 100 Continue comes first when curl asked for one).
    let (mut headers, mut body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    while body.starts_with("HTTP/") {
        (headers, body) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
    }
    let json = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    };
    (
        code.trim().parse().unwrap(),
        headers.to_ascii_lowercase(),
        json,
    )
}

/// The shadow report of `model`'s `version` once it has compared `n` copies (or after 10 s).
pub async fn shadow_report_after(
    mg: &Running,
    model: &str,
    version: &str,
    n: u64,
) -> pb::ShadowReport {
    let mut shadows = pb::shadows_client::ShadowsClient::new(channel(mg.control_addr).await);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        mg.recorder.flush().await;
        let r = shadows
            .get_shadow_report(pb::GetShadowReportRequest {
                model: model.into(),
                version: version.into(),
                disagreements: 10,
            })
            .await
            .unwrap()
            .into_inner();
        if r.compared >= n || std::time::Instant::now() > until {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
