//! The built-in Open Inference Protocol v2 model server (`modelgate model-server`), for demos,
//! tests and benchmarks.
//!
//! Each model is a linear or logistic model over N FP32 features. A linear model answers one
//! output, `value` (FP32, [B, 1]): w·x + b. A logistic model answers `probabilities` (FP32, [B, 2]:
//! P(0), P(1) with P(1) = sigmoid(w·x + b)) and `label` (INT64, [B, 1]: 1 when P(1) > 0.5). Several
//! versions of one model name may be served; a request without `model_version` gets the last one
//! given on the command line. Answers use `raw_output_contents` when the request used raw inputs.
//!
//! The same models are served in TF Serving's gRPC protocol too (`PredictionService`, see
//! [`tfs`]), on the same port, and over REST (OIP's HTTP/JSON API and KServe v1, see
//! [`serve_rest`]) on a port of its own when one is given (`--rest-listen`).

mod rest;
mod tfs;

pub use rest::serve_rest;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::oip::{self, Values};
use crate::pb::inference::{
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
    model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata,
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use crate::pb::tensorflow::serving::prediction_service_server::PredictionServiceServer;

/// Kind of built-in model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// w·x + b
    Linear,
    /// sigmoid(w·x + b)
    Logistic,
}

/// One served model, parsed from `name=iris;kind=logistic;weights=0.5,-1;bias=0.1;version=v1`.
///
/// Keys: `name` (required), `kind` (`linear` or `logistic`, default `logistic`), `weights`
/// (comma-separated) or `features=N` with an optional `seed` for N deterministic pseudo-random
/// weights in [-1, 1], `bias` (default 0), `version` (default `1`), `latency` (e.g. `5ms`, default
/// none: an artificial delay before each answer).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Version label reported in responses.
    pub version: String,
    /// Linear or logistic.
    pub kind: Kind,
    /// One weight per feature.
    pub weights: Vec<f32>,
    /// Bias.
    pub bias: f32,
    /// Artificial delay before each inference answer.
    pub latency: Duration,
}

impl FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut name = None;
        let mut version = "1".to_string();
        let mut kind = Kind::Logistic;
        let mut weights = None;
        let mut features = None;
        let mut seed = 0u64;
        let mut bias = 0f32;
        let mut latency = Duration::ZERO;
        for pair in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "name" => {
                    crate::registry::validate_model_name(v, "name").map_err(|e| e.to_string())?;
                    name = Some(v.to_string());
                }
                "version" => version = v.to_string(),
                "kind" => {
                    kind = match v {
                        "linear" => Kind::Linear,
                        "logistic" => Kind::Logistic,
                        _ => return Err(format!("kind '{v}': expected linear or logistic")),
                    }
                }
                "weights" => {
                    let w: Result<Vec<f32>, _> = v.split(',').map(|x| x.trim().parse::<f32>()).collect();
                    let w = w.map_err(|e| format!("weights '{v}': {e}"))?;
                    if w.iter().any(|x| !x.is_finite()) {
                        return Err(format!("weights '{v}': must be finite"));
                    }
                    weights = Some(w);
                }
                "features" => {
                    features = Some(
                        v.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=100_000).contains(n))
                            .ok_or_else(|| format!("features '{v}': expected 1..=100000"))?,
                    )
                }
                "seed" => seed = v.parse().map_err(|e| format!("seed '{v}': {e}"))?,
                "bias" => {
                    bias = v
                        .parse::<f32>()
                        .ok()
                        .filter(|b| b.is_finite())
                        .ok_or_else(|| format!("bias '{v}': expected a finite number"))?
                }
                "latency" => {
                    latency = crate::spec::parse_duration(v).map_err(|e| e.to_string())?
                }
                _ => return Err(format!("unknown key '{k}' (expected name, version, kind, weights, features, seed, bias, latency)")),
            }
        }
        let name = name.ok_or("name is required")?;
        let weights = match (weights, features) {
            (Some(_), Some(_)) => return Err("give either weights or features, not both".into()),
            (Some(w), None) => w,
            (None, Some(n)) => generated_weights(n, seed),
            (None, None) => return Err("weights (or features=N) is required".into()),
        };
        Ok(ModelSpec {
            name,
            version,
            kind,
            weights,
            bias,
            latency,
        })
    }
}

/// Deterministic weights in [-1, 1]: the same `(n, seed)` always gives the same model.
fn generated_weights(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..=1.0)).collect()
}

impl ModelSpec {
    /// The model's outputs for a batch of rows (`features.len() == rows * weights.len()`), as
    /// (name, datatype, shape, values) — values are f32 for FP32 and i64-in-f32 for INT64.
    fn infer(&self, features: &[f64], rows: usize) -> Vec<Output> {
        let n = self.weights.len();
        let scores: Vec<f32> = (0..rows)
            .map(|r| {
                let row = &features[r * n..(r + 1) * n];
                let dot: f64 = row
                    .iter()
                    .zip(&self.weights)
                    .map(|(x, w)| x * f64::from(*w))
                    .sum();
                (dot + f64::from(self.bias)) as f32
            })
            .collect();
        match self.kind {
            Kind::Linear => vec![Output::F32("value", vec![rows as i64, 1], scores)],
            Kind::Logistic => {
                let p1: Vec<f32> = scores.iter().map(|s| 1.0 / (1.0 + (-s).exp())).collect();
                let probs = p1.iter().flat_map(|p| [1.0 - p, *p]).collect();
                let labels = p1.iter().map(|p| i64::from(*p > 0.5)).collect();
                vec![
                    Output::F32("probabilities", vec![rows as i64, 2], probs),
                    Output::I64("label", vec![rows as i64, 1], labels),
                ]
            }
        }
    }

    fn output_metadata(&self) -> Vec<TensorMetadata> {
        let t = |name: &str, dt: &str, cols: i64| TensorMetadata {
            name: name.into(),
            datatype: dt.into(),
            shape: vec![-1, cols],
        };
        match self.kind {
            Kind::Linear => vec![t("value", "FP32", 1)],
            Kind::Logistic => vec![t("probabilities", "FP32", 2), t("label", "INT64", 1)],
        }
    }
}

enum Output {
    F32(&'static str, Vec<i64>, Vec<f32>),
    I64(&'static str, Vec<i64>, Vec<i64>),
}

impl Output {
    fn name(&self) -> &'static str {
        match self {
            Output::F32(n, ..) | Output::I64(n, ..) => n,
        }
    }
}

/// The model server: every model by name, then by version label in command-line order.
#[derive(Clone, Debug)]
pub struct ModelServer {
    models: Arc<BTreeMap<String, Vec<ModelSpec>>>,
}

impl ModelServer {
    /// A server for `specs`.
    pub fn new(specs: Vec<ModelSpec>) -> Self {
        let mut models: BTreeMap<String, Vec<ModelSpec>> = BTreeMap::new();
        for s in specs {
            models.entry(s.name.clone()).or_default().push(s);
        }
        ModelServer {
            models: Arc::new(models),
        }
    }

    fn find(&self, name: &str, version: &str) -> Result<&ModelSpec, Status> {
        let versions = self
            .models
            .get(name)
            .ok_or_else(|| Status::not_found(format!("model '{name}' is not served here")))?;
        if version.is_empty() {
            return Ok(versions.last().expect("at least one version"));
        }
        versions
            .iter()
            .find(|m| m.version == version)
            .ok_or_else(|| {
                let available: Vec<&str> = versions.iter().map(|m| m.version.as_str()).collect();
                Status::not_found(format!(
                    "model '{name}' has no version '{version}' (available: {})",
                    available.join(", ")
                ))
            })
    }

    /// The gRPC service, ready to add to a tonic router.
    pub fn into_service(self) -> GrpcInferenceServiceServer<ModelServer> {
        GrpcInferenceServiceServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// The TF Serving gRPC service (`tensorflow.serving.PredictionService`).
    pub fn into_tfs_service(self) -> PredictionServiceServer<ModelServer> {
        PredictionServiceServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for ModelServer {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = self.find(&r.name, &r.version).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "modelgate-model-server".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let m = self.find(&r.name, &r.version)?;
        let versions = self.models[&m.name]
            .iter()
            .map(|v| v.version.clone())
            .collect();
        Ok(Response::new(ModelMetadataResponse {
            name: m.name.clone(),
            versions,
            platform: "modelgate-builtin".into(),
            inputs: vec![TensorMetadata {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![-1, m.weights.len() as i64],
            }],
            outputs: m.output_metadata(),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let r = req.into_inner();
        let m = self.find(&r.model_name, &r.model_version)?.clone();
        if r.inputs.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "model '{}' takes exactly one input tensor, got {}",
                m.name,
                r.inputs.len()
            )));
        }
        let inputs = oip::request_inputs(&r, oip::DEFAULT_MAX_ELEMENTS)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let input = &inputs[0];
        let Values::Numeric(x) = &input.values else {
            return Err(Status::invalid_argument(format!(
                "input '{}' is BYTES; model '{}' takes numeric features",
                input.name, m.name
            )));
        };
        let n = m.weights.len();
        let rows = match input.shape.len() {
            1 if input.shape[0] == n => 1,
            2 if input.shape[1] == n => input.shape[0],
            _ => {
                return Err(Status::invalid_argument(format!(
                    "input '{}' has shape {:?}; model '{}' expects [batch, {n}] or [{n}]",
                    input.name, input.shape, m.name
                )))
            }
        };
        if !m.latency.is_zero() {
            tokio::time::sleep(m.latency).await;
        }
        let mut outputs = m.infer(x, rows);
        if !r.outputs.is_empty() {
            let wanted: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
            if let Some(bad) = wanted
                .iter()
                .find(|w| !outputs.iter().any(|o| o.name() == **w))
            {
                return Err(Status::invalid_argument(format!(
                    "model '{}' has no output '{bad}'",
                    m.name
                )));
            }
            outputs.retain(|o| wanted.contains(&o.name()));
        }
        let raw = !r.raw_input_contents.is_empty();
        let mut resp = ModelInferResponse {
            model_name: m.name.clone(),
            model_version: m.version.clone(),
            id: r.id,
            ..Default::default()
        };
        for o in outputs {
            let (name, dt, shape, contents, bytes) = match o {
                Output::F32(name, shape, v) => (
                    name,
                    "FP32",
                    shape,
                    InferTensorContents {
                        fp32_contents: v.clone(),
                        ..Default::default()
                    },
                    oip::f32_raw(&v),
                ),
                Output::I64(name, shape, v) => (
                    name,
                    "INT64",
                    shape,
                    InferTensorContents {
                        int64_contents: v.clone(),
                        ..Default::default()
                    },
                    oip::i64_raw(&v),
                ),
            };
            resp.outputs.push(InferOutputTensor {
                name: name.into(),
                datatype: dt.into(),
                shape,
                parameters: Default::default(),
                contents: (!raw).then_some(contents),
            });
            if raw {
                resp.raw_output_contents.push(bytes);
            }
        }
        Ok(Response::new(resp))
    }
}

/// Serves the model server (with grpc.health.v1 and reflection) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    server: ModelServer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_tls(listener, server, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (tonic's TLS, ALPN `h2`; with a client CA in it,
/// clients must present a certificate): an `https://` upstream for tests.
pub async fn serve_tls(
    listener: TcpListener,
    server: ModelServer,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GrpcInferenceServiceServer<ModelServer>>()
        .await;
    let (reflect_v1, reflect_v1alpha) =
        crate::control::reflection_services(&["inference", "tensorflow", "tensorflow.serving"]);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflect_v1)
        .add_service(reflect_v1alpha)
        .add_service(server.clone().into_tfs_service())
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(
            // `tcp_nodelay` above only applies to listeners tonic binds itself; without it,
            // Nagle and delayed ACKs hold a small share of answers back for ~40 ms.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// A model server running in the background (tests, demo, benchmarks).
pub struct RunningModelServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it serves REST, when it does.
    pub rest_addr: Option<SocketAddr>,
    rest_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningModelServer {
    /// `http://addr` (`https://addr` over TLS), as registered in modelgate.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `http://rest_addr`, as an OIP REST backend is registered.
    pub fn rest_endpoint(&self) -> Option<String> {
        self.rest_addr.map(|a| format!("http://{a}"))
    }

    /// Stops accepting and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(t) = self.rest_task.take() {
            t.abort();
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningModelServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self.rest_task {
            t.abort();
        }
    }
}

/// Starts a model server on `addr` (port 0 picks a free port) in the background.
pub async fn spawn(addr: SocketAddr, specs: Vec<ModelSpec>) -> std::io::Result<RunningModelServer> {
    spawn_tls(addr, specs, None).await
}

/// [`spawn`], serving REST too on a free port of `addr`'s host.
pub async fn spawn_with_rest(
    addr: SocketAddr,
    specs: Vec<ModelSpec>,
) -> std::io::Result<RunningModelServer> {
    let mut running = spawn(addr, specs.clone()).await?;
    let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?;
    running.rest_addr = Some(listener.local_addr()?);
    running.rest_task = Some(tokio::spawn(serve_rest(
        listener,
        ModelServer::new(specs),
        std::future::pending(),
    )));
    Ok(running)
}

/// [`spawn`] over TLS when `tls` is given.
pub async fn spawn_tls(
    addr: SocketAddr,
    specs: Vec<ModelSpec>,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> std::io::Result<RunningModelServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let is_tls = tls.is_some();
    let task = tokio::spawn(serve_tls(listener, ModelServer::new(specs), tls, async {
        let _ = rx.await;
    }));
    Ok(RunningModelServer {
        addr,
        rest_addr: None,
        rest_task: None,
        tls: is_tls,
        stop: Some(tx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_reject_nonsense() {
        let s: ModelSpec =
            "name=iris; kind=linear; weights=1,2.5; bias=-1; version=v2; latency=5ms"
                .parse()
                .unwrap();
        assert_eq!(s.weights, vec![1.0, 2.5]);
        assert_eq!(s.kind, Kind::Linear);
        assert_eq!(s.version, "v2");
        assert_eq!(s.latency, Duration::from_millis(5));
        let g: ModelSpec = "name=m;features=16;seed=7".parse().unwrap();
        assert_eq!(g.weights.len(), 16);
        assert_eq!(
            g,
            "name=m;features=16;seed=7".parse().unwrap(),
            "deterministic"
        );
        assert_ne!(
            g.weights,
            "name=m;features=16;seed=8"
                .parse::<ModelSpec>()
                .unwrap()
                .weights
        );
        for bad in [
            "",
            "name=m",
            "weights=1",
            "name=m;weights=x",
            "name=m;features=0",
            "name=m;weights=1;features=1",
            "name=m;weights=1;kind=tree",
            "name=m;weights=1;color=red",
            "name=a b;weights=1",
        ] {
            assert!(bad.parse::<ModelSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn logistic_and_linear_compute() {
        let lin: ModelSpec = "name=m;kind=linear;weights=1,2;bias=0.5".parse().unwrap();
        let out = lin.infer(&[1.0, 1.0, 0.0, -1.0], 2);
        let Output::F32(_, shape, v) = &out[0] else {
            panic!()
        };
        assert_eq!(shape, &vec![2, 1]);
        assert_eq!(v, &vec![3.5, -1.5]);
        let log: ModelSpec = "name=m;weights=1;bias=0".parse().unwrap();
        let out = log.infer(&[0.0, 10.0], 2);
        let Output::F32(_, _, p) = &out[0] else {
            panic!()
        };
        assert_eq!(p[0], 0.5);
        assert!(p[3] > 0.99);
        let Output::I64(_, _, labels) = &out[1] else {
            panic!()
        };
        assert_eq!(labels, &vec![0, 1]);
    }
}
