//! REST callers on the data port: the Open Inference Protocol over HTTP/JSON (KServe v2 REST,
//! what `tritonclient.http`, MLServer's and KServe's clients and curl send).
//!
//! A REST call is translated to its OIP gRPC twin (`protocol::oip_rest`) and served by the proxy
//! exactly as a gRPC call, through an in-process HTTP/2 connection to [`Proxy::call`] (one per
//! data-plane runtime, multiplexed): routing to production or the caller's experiment variant,
//! shadows, records with named features and parsed predictions, outcomes, drift, metrics and
//! traces all apply unchanged, and the backend is called in its registered protocol (OIP gRPC, or
//! REST through `rest_upstream`). The answer is translated
//! back: JSON tensors, or `{"error": "…"}` with the HTTP status a REST client expects.
//!
//! | REST | gRPC twin |
//! |---|---|
//! | `GET /v2/health/live`, `/v2/health/ready` | `ServerLive`, `ServerReady` (200, or 503) |
//! | `GET /v2` | `ServerMetadata` |
//! | `GET /v2/models/{m}[/versions/{v}]` | `ModelMetadata` |
//! | `GET /v2/models/{m}[/versions/{v}]/ready` | `ModelReady` (200, or 503) |
//! | `POST /v2/models/{m}[/versions/{v}]/infer` | `ModelInfer` |
//! | `GET /v1/models/{m}[/versions/{v}\|/labels/{l}]` | `ModelReady` (KServe v1 / TF Serving status) |
//! | `POST /v1/models/{m}[/versions/{v}\|/labels/{l}]:predict` | `ModelMetadata` (first input, cached), then `ModelInfer` |

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tonic::Code;

use tonic::body::Body;

use super::Proxy;
use crate::pb::inference as oip;
use crate::protocol::{grpc, kserve_v1, oip_rest};

const SERVICE: &str = "/inference.GRPCInferenceService/";
/// The binary extension's header, parsed once (a `&str` name is parsed at every insert).
const HEADER_LENGTH: http::HeaderName =
    http::HeaderName::from_static("inference-header-content-length");

/// Whether a data-port request is a REST call: not gRPC, and HTTP/1 or a REST path.
pub fn is_rest<B>(req: &Request<B>) -> bool {
    let grpc = super::find_header(req.headers(), &http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let path = req.uri().path();
    !grpc
        && (req.version() < http::Version::HTTP_2
            || path == "/v2"
            || path.starts_with("/v2/")
            || path.starts_with("/v1/"))
}

/// What serves the gRPC twins of REST calls: modelgate's data plane, or a gRPC service (the
/// built-in model server's REST port).
pub type GrpcHandler = Arc<
    dyn Fn(Request<Incoming>) -> futures_util::future::BoxFuture<'static, Response<Body>>
        + Send
        + Sync,
>;

/// The REST side of one data-plane runtime: the in-process connection its calls go through.
pub struct RestGateway {
    handler: GrpcHandler,
    /// `--max-message-bytes`: the largest REST body read.
    max_message_bytes: usize,
    /// `--max-tensor-elements`: the largest answer tensor written as JSON.
    max_tensor_elements: usize,
    client: Mutex<Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>>,
    /// Each model's (and version's) first input, for KServe v1 rows, and when it was read.
    #[allow(clippy::type_complexity)]
    inputs:
        Mutex<std::collections::HashMap<(String, String), ((String, String), std::time::Instant)>>,
}

/// What a REST path asks for.
enum Endpoint {
    Live,
    Ready,
    ServerMetadata,
    ModelMetadata(String, String),
    ModelReady(String, String),
    Infer(String, String),
    /// KServe v1 / TF Serving: a model's status.
    V1Status(String, String),
    /// KServe v1 / TF Serving: `:predict`.
    V1Predict(String, String),
}

fn endpoint(method: &Method, path: &str) -> Result<Endpoint, (StatusCode, String)> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let get = method == Method::GET;
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}"),
        )
    };
    let model = |rest: &[&str]| -> Option<(String, String, Option<String>)> {
        match rest {
            [m] => Some((m.to_string(), String::new(), None)),
            [m, last] => Some((m.to_string(), String::new(), Some(last.to_string()))),
            [m, "versions", v] => Some((m.to_string(), v.to_string(), None)),
            [m, "versions", v, last] => {
                Some((m.to_string(), v.to_string(), Some(last.to_string())))
            }
            _ => None,
        }
    };
    let e = match parts.as_slice() {
        ["v2"] if get => Endpoint::ServerMetadata,
        ["v2", "health", "live"] if get => Endpoint::Live,
        ["v2", "health", "ready"] if get => Endpoint::Ready,
        ["v2", "models", rest @ ..] => {
            let (m, v, last) = model(rest).ok_or_else(not_found)?;
            match (last.as_deref(), get, method == Method::POST) {
                (None, true, _) => Endpoint::ModelMetadata(m, v),
                (Some("ready"), true, _) => Endpoint::ModelReady(m, v),
                (Some("infer"), _, true) => Endpoint::Infer(m, v),
                (Some("infer"), _, _) | (None, _, _) | (Some("ready"), _, _) => {
                    return Err((
                        StatusCode::METHOD_NOT_ALLOWED,
                        format!("{method} is not allowed on {path}"),
                    ))
                }
                _ => return Err(not_found()),
            }
        }
        ["v1", "models", rest @ ..] => {
            // `m`, `m/versions/v` or `m/labels/l`, the last part possibly `…:predict`.
            let (last, predict) = match rest.last().and_then(|l| l.strip_suffix(":predict")) {
                Some(stripped) => (stripped, true),
                None => (*rest.last().ok_or_else(not_found)?, false),
            };
            let (m, v) = match rest {
                [_] => (last.to_string(), String::new()),
                [m, "versions" | "labels", _] => (m.to_string(), last.to_string()),
                _ => return Err(not_found()),
            };
            match (predict, method == Method::POST, get) {
                (true, true, _) => Endpoint::V1Predict(m, v),
                (false, _, true) => Endpoint::V1Status(m, v),
                _ => {
                    return Err((
                        StatusCode::METHOD_NOT_ALLOWED,
                        format!("{method} is not allowed on {path}"),
                    ))
                }
            }
        }
        _ => return Err(not_found()),
    };
    Ok(e)
}

/// The HTTP status a REST client expects for a gRPC status code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::from_u16(499).expect("valid"),
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json_response(status: StatusCode, body: &Value, headers: Option<&HeaderMap>) -> Response<Body> {
    let body = Bytes::from(body.to_string());
    response(status, body, "application/json", headers)
}

/// A response of `body` (of `content_type`) with modelgate's own headers from `headers`.
fn response(
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
    headers: Option<&HeaderMap>,
) -> Response<Body> {
    let mut resp = Response::new(Body::new(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    if let Some(h) = headers {
        // modelgate's own response headers (request id, served version, variant…).
        for (k, v) in h {
            if k.as_str().starts_with("x-modelgate-") {
                resp.headers_mut().insert(k.clone(), v.clone());
            }
        }
    }
    resp
}

fn error(status: StatusCode, message: &str, headers: Option<&HeaderMap>) -> Response<Body> {
    json_response(status, &json!({ "error": message }), headers)
}

/// An inference answer with the outputs `binary` names as binary tensors (the binary tensor
/// extension: `Inference-Header-Content-Length` gives the JSON header's length).
fn binary_answer(a: Answer, max: usize, binary: &oip_rest::BinaryOutputs) -> Response<Body> {
    let encoded = oip::ModelInferResponse::decode(a.body.clone())
        .map_err(|e| e.to_string())
        .and_then(|r| oip_rest::infer_response_binary(&r, max, binary));
    let (body, header_len) = match encoded {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("the model's answer cannot be read: {e}"),
                Some(&a.headers),
            )
        }
    };
    let mut resp = response(
        StatusCode::OK,
        body,
        "application/octet-stream",
        Some(&a.headers),
    );
    resp.headers_mut().insert(HEADER_LENGTH, header_len.into());
    resp
}

/// A gRPC answer: its status, message and headers (the initial ones with the trailers').
struct Answer {
    code: Code,
    message: String,
    headers: HeaderMap,
    body: Bytes,
}

impl RestGateway {
    /// A gateway to `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Arc<Self> {
        let limits = (
            proxy.limits.max_message_bytes,
            proxy.limits.max_tensor_elements,
        );
        Self::with_handler(Arc::new(move |req| proxy.clone().call(req)), limits)
    }

    /// A gateway to any gRPC `handler` of the Open Inference Protocol, with the limits
    /// (message bytes, tensor elements) it reads and writes bodies within.
    pub fn with_handler(
        handler: GrpcHandler,
        (max_message_bytes, max_tensor_elements): (usize, usize),
    ) -> Arc<Self> {
        Arc::new(RestGateway {
            handler,
            max_message_bytes,
            max_tensor_elements,
            client: Mutex::new(None),
            inputs: Mutex::new(Default::default()),
        })
    }

    /// Serves one REST call.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let endpoint = match endpoint(&parts.method, parts.uri.path()) {
            Ok(e) => e,
            Err((status, message)) => return error(status, &message, None),
        };
        let limit = self.max_message_bytes;
        let body = match super::body::read_whole(body, limit).await {
            Ok((data, _)) => data,
            Err(super::body::ReadWholeError::TooLarge) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is over {limit} bytes (--max-message-bytes)"),
                    None,
                )
            }
            Err(super::body::ReadWholeError::Body(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the body: {e}"),
                    None,
                )
            }
        };
        let headers = &parts.headers;
        match endpoint {
            Endpoint::Live => {
                let a = self
                    .call("ServerLive", oip::ServerLiveRequest {}, headers)
                    .await;
                self.flag(a, |r: oip::ServerLiveResponse| r.live, "live")
            }
            Endpoint::Ready => {
                let a = self
                    .call("ServerReady", oip::ServerReadyRequest {}, headers)
                    .await;
                self.flag(a, |r: oip::ServerReadyResponse| r.ready, "ready")
            }
            Endpoint::ModelReady(name, version) => {
                let a = self
                    .call(
                        "ModelReady",
                        oip::ModelReadyRequest { name, version },
                        headers,
                    )
                    .await;
                self.flag(a, |r: oip::ModelReadyResponse| r.ready, "ready")
            }
            Endpoint::ServerMetadata => {
                let a = self
                    .call("ServerMetadata", oip::ServerMetadataRequest {}, headers)
                    .await;
                self.decode(a, |r: oip::ServerMetadataResponse| {
                    json!({"name": r.name, "version": r.version, "extensions": r.extensions})
                })
            }
            Endpoint::ModelMetadata(name, version) => {
                let a = self
                    .call(
                        "ModelMetadata",
                        oip::ModelMetadataRequest { name, version },
                        headers,
                    )
                    .await;
                self.decode(a, |r: oip::ModelMetadataResponse| {
                    let tensors = |ts: &[oip::model_metadata_response::TensorMetadata]| {
                        ts.iter()
                            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
                            .collect::<Vec<_>>()
                    };
                    json!({
                        "name": r.name,
                        "versions": r.versions,
                        "platform": r.platform,
                        "inputs": tensors(&r.inputs),
                        "outputs": tensors(&r.outputs),
                    })
                })
            }
            Endpoint::V1Status(name, version) => {
                let a = self
                    .call(
                        "ModelReady",
                        oip::ModelReadyRequest {
                            name: name.clone(),
                            version: version.clone(),
                        },
                        headers,
                    )
                    .await;
                if a.code != Code::Ok {
                    return error(http_status(a.code), &a.message, Some(&a.headers));
                }
                let ready = oip::ModelReadyResponse::decode(a.body.clone()).is_ok_and(|r| r.ready);
                let served = a
                    .headers
                    .get("x-modelgate-model-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(&version)
                    .to_string();
                json_response(
                    if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    },
                    &json!({
                        "name": name,
                        "ready": ready,
                        "model_version_status": [{
                            "version": served,
                            "state": if ready { "AVAILABLE" } else { "UNAVAILABLE" },
                            "status": {"error_code": "OK", "error_message": ""},
                        }],
                    }),
                    Some(&a.headers),
                )
            }
            Endpoint::V1Predict(model, version) => {
                let first = match self.first_input(&model, &version, headers).await {
                    Ok(f) => f,
                    Err(resp) => return resp,
                };
                let v2 = match kserve_v1::predict_to_v2(&body, (&first.0, &first.1)) {
                    Ok(v) => v,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e.0, None),
                };
                let request = match oip_rest::infer_request(
                    &model,
                    &version,
                    v2.to_string().as_bytes(),
                    None,
                ) {
                    Ok(r) => r,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e.0, None),
                };
                let a = self.call("ModelInfer", request, headers).await;
                let max = self.max_tensor_elements;
                self.decode(
                    a,
                    |r: oip::ModelInferResponse| match oip_rest::infer_response(&r, max) {
                        Ok(v) => kserve_v1::v2_to_predictions(&v),
                        Err(e) => {
                            json!({"error": format!("the model's answer cannot be read: {e}")})
                        }
                    },
                )
            }
            Endpoint::Infer(model, version) => {
                let header_len = headers
                    .get("inference-header-content-length")
                    .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()));
                let header_len = match header_len {
                    None => None,
                    Some(Some(n)) => Some(n),
                    Some(None) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "Inference-Header-Content-Length must be a number of bytes",
                            None,
                        )
                    }
                };
                let (request, binary) =
                    match oip_rest::infer_request_binary(&model, &version, &body, header_len) {
                        Ok(r) => r,
                        Err(e) => return error(StatusCode::BAD_REQUEST, &e.0, None),
                    };
                let a = self.call("ModelInfer", request, headers).await;
                let max = self.max_tensor_elements;
                if binary.any() && a.code == Code::Ok {
                    return binary_answer(a, max, &binary);
                }
                self.decode(a, |r: oip::ModelInferResponse| {
                    oip_rest::infer_response(&r, max).unwrap_or_else(
                        |e| json!({"error": format!("the model's answer cannot be read: {e}")}),
                    )
                })
            }
        }
    }

    /// The name and datatype of a model's first input (what a v1 list of rows feeds), from its
    /// metadata, kept for a minute.
    async fn first_input(
        &self,
        model: &str,
        version: &str,
        headers: &HeaderMap,
    ) -> Result<(String, String), Response<Body>> {
        let key = (model.to_string(), version.to_string());
        if let Some((first, at)) = self.inputs.lock().await.get(&key) {
            if at.elapsed() < std::time::Duration::from_secs(60) {
                return Ok(first.clone());
            }
        }
        let a = self
            .call(
                "ModelMetadata",
                oip::ModelMetadataRequest {
                    name: model.to_string(),
                    version: version.to_string(),
                },
                headers,
            )
            .await;
        if a.code != Code::Ok {
            return Err(error(http_status(a.code), &a.message, Some(&a.headers)));
        }
        let first = oip::ModelMetadataResponse::decode(a.body)
            .ok()
            .and_then(|m| m.inputs.into_iter().next())
            .map(|t| (t.name, t.datatype))
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_GATEWAY,
                    &format!("model '{model}' declares no input in its metadata"),
                    Some(&a.headers),
                )
            })?;
        self.inputs
            .lock()
            .await
            .insert(key, (first.clone(), std::time::Instant::now()));
        Ok(first)
    }

    /// A boolean answer: 200 when true, 503 when false.
    fn flag<M: Message + Default>(
        &self,
        a: Answer,
        get: impl FnOnce(M) -> bool,
        what: &str,
    ) -> Response<Body> {
        if a.code != Code::Ok {
            return error(http_status(a.code), &a.message, Some(&a.headers));
        }
        match M::decode(a.body) {
            Ok(m) => {
                let yes = get(m);
                json_response(
                    if yes {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    },
                    &json!({ what: yes }),
                    Some(&a.headers),
                )
            }
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                &format!("the answer cannot be read: {e}"),
                Some(&a.headers),
            ),
        }
    }

    fn decode<M: Message + Default>(
        &self,
        a: Answer,
        to_json: impl FnOnce(M) -> Value,
    ) -> Response<Body> {
        if a.code != Code::Ok {
            return error(http_status(a.code), &a.message, Some(&a.headers));
        }
        match M::decode(a.body) {
            Ok(m) => {
                let v = to_json(m);
                let status = if v.get("error").is_some() {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::OK
                };
                json_response(status, &v, Some(&a.headers))
            }
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                &format!("the answer cannot be read: {e}"),
                Some(&a.headers),
            ),
        }
    }

    /// The in-process HTTP/2 connection to the proxy (made on first use, again if it closed).
    async fn client(&self) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let handler = self.handler.clone();
        let svc = hyper::service::service_fn(move |req| {
            let answer = handler(req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let mut server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        server
            .max_concurrent_streams(u32::MAX)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20);
        tokio::spawn(async move {
            let _ = server.serve_connection(TokioIo::new(theirs), svc).await;
        });
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(TokioIo::new(ours))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *slot = Some(send.clone());
        Ok(send)
    }

    /// Calls `method` of OIP gRPC through the proxy, with the REST call's headers.
    async fn call(&self, method: &str, msg: impl Message, headers: &HeaderMap) -> Answer {
        let failed = |message: String| Answer {
            code: Code::Internal,
            message,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let mut req = Request::post(format!("http://modelgate{SERVICE}{method}"))
            .body(Full::new(grpc::frame(&msg)))
            .expect("a valid request");
        for (k, v) in headers {
            // The caller's own headers (unit id, request id, trace context, auth…), not what
            // describes the HTTP/1 exchange.
            if !matches!(
                k.as_str(),
                "host"
                    | "content-type"
                    | "content-length"
                    | "transfer-encoding"
                    | "connection"
                    | "keep-alive"
                    | "upgrade"
                    | "te"
                    | "accept-encoding"
                    | "inference-header-content-length"
            ) {
                req.headers_mut().append(k.clone(), v.clone());
            }
        }
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        req.headers_mut()
            .insert(http::header::TE, HeaderValue::from_static("trailers"));
        let mut client = match self.client().await {
            Ok(c) => c,
            Err(e) => return failed(format!("cannot reach the proxy: {e}")),
        };
        let resp = match client.send_request(req).await {
            Ok(r) => r,
            Err(e) => return failed(format!("the proxy did not answer: {e}")),
        };
        let (parts, body) = resp.into_parts();
        let collected = match body.collect().await {
            Ok(c) => c,
            Err(e) => return failed(format!("the proxy's answer broke off: {e}")),
        };
        let mut all = parts.headers;
        if let Some(t) = collected.trailers() {
            for (k, v) in t {
                all.insert(k.clone(), v.clone());
            }
        }
        // tonic reads the status (and percent-decodes its message).
        let (mut code, mut message) = match tonic::Status::from_header_map(&all) {
            Some(s) => (s.code(), s.message().to_string()),
            None => (Code::Unknown, String::new()),
        };
        let body = match code {
            Code::Ok => match grpc::unary_message(&collected.to_bytes()) {
                Ok(m) => m,
                Err(e) => {
                    (code, message) = (Code::Internal, format!("the answer cannot be read: {e}"));
                    Bytes::new()
                }
            },
            _ => Bytes::new(),
        };
        Answer {
            code,
            message,
            headers: all,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_endpoint() {
        let get = Method::GET;
        assert!(matches!(
            endpoint(&get, "/v2/health/ready"),
            Ok(Endpoint::Ready)
        ));
        assert!(matches!(
            endpoint(&get, "/v2"),
            Ok(Endpoint::ServerMetadata)
        ));
        assert!(matches!(
            endpoint(&Method::POST, "/v2/models/m/versions/3/infer"),
            Ok(Endpoint::Infer(m, v)) if m == "m" && v == "3"
        ));
        assert!(matches!(
            endpoint(&get, "/v2/models/m/ready"),
            Ok(Endpoint::ModelReady(m, v)) if m == "m" && v.is_empty()
        ));
        assert_eq!(
            endpoint(&get, "/v2/models/m/infer").err().unwrap().0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            endpoint(&get, "/v2/nothing").err().unwrap().0,
            StatusCode::NOT_FOUND
        );
    }
}
