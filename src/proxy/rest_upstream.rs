//! Model servers that speak the Open Inference Protocol over HTTP/JSON (a version registered with
//! backend protocol `oip-rest`: MLServer's or KServe's HTTP port, Triton's 8000): the inverse of
//! `proxy::rest`.
//!
//! The data plane stays a gRPC proxy: it hands this module the OIP gRPC call it would have sent
//! (a caller's own, or a REST caller's translated one), and gets back the gRPC answer the model
//! server would have given — the REST call made over HTTP/1.1 and its JSON answer translated
//! (`protocol::oip_rest`). So routing, records, shadows and drift see the same messages whatever
//! the backend speaks, and a shadow on a REST backend is compared with a gRPC production answer
//! like any other.
//!
//! | gRPC call | REST call |
//! |---|---|
//! | `ModelInfer` | `POST /v2/models/{m}[/versions/{v}]/infer` (JSON tensors) |
//! | `ModelMetadata` | `GET /v2/models/{m}[/versions/{v}]` |
//! | `ModelReady` | `GET /v2/models/{m}[/versions/{v}]/ready` |
//! | `ServerLive`, `ServerReady` | `GET /v2/health/live`, `/v2/health/ready` |
//! | `ServerMetadata` | `GET /v2` |
//!
//! Other calls (Triton's extensions, streams, TF Serving, other services) are refused: their
//! REST forms are not part of the protocol. Failures to connect are the upstream's, as for gRPC
//! backends (UNAVAILABLE); a REST error answer becomes the gRPC status its HTTP status means,
//! with the server's `{"error"}` message.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prost::Message;
use serde_json::Value;
use tonic::{body::Body, Code, Status};

use super::status::parse_grpc_timeout;
use super::upstream::{Dialed, Payload, UpstreamError, Upstreams};
use crate::pb::inference as oip;
use crate::protocol::grpc::{error_response, unary_message, unary_response};
use crate::protocol::oip_grpc::OIP_PREFIX;
use crate::protocol::oip_rest;
use crate::registry::BackendProtocol;
use crate::routing::Route;

/// The largest REST answer read. JSON tensors take several times their gRPC size; the
/// translated answer is held to `--max-message-bytes` by the data plane as any answer is.
const MAX_ANSWER_BYTES: usize = 1 << 30;

/// What a REST answer is read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Infer,
    Metadata,
    ModelReady,
    Live,
    Ready,
    ServerMetadata,
}

/// The REST call of a gRPC call.
struct RestCall {
    method: Method,
    path: String,
    body: Option<Bytes>,
    answer: Answer,
}

impl Upstreams {
    /// Sends a call to `route`'s upstream in the protocol it speaks: gRPC as it is, or to an OIP
    /// REST backend translated both ways.
    pub async fn send_to(
        &self,
        route: &Route,
        head: Request<()>,
        payload: Payload,
    ) -> Result<Response<Body>, UpstreamError> {
        match route.backend_protocol {
            BackendProtocol::Grpc => self.send(&route.endpoint, head, payload).await,
            // Boxed: the REST exchange's future would otherwise enlarge every gRPC call's.
            BackendProtocol::OipRest => {
                Box::pin(self.send_rest(&route.endpoint, head, payload)).await
            }
        }
    }

    async fn send_rest(
        &self,
        endpoint: &str,
        head: Request<()>,
        payload: Payload,
    ) -> Result<Response<Body>, UpstreamError> {
        let Payload::Full(body) = payload else {
            return Ok(error_response(Status::unimplemented(
                "streams cannot be sent to an OIP REST model server (backend protocol oip-rest); \
                 register its gRPC endpoint for them",
            )));
        };
        let call = match rest_call(head.uri().path(), &body) {
            Ok(c) => c,
            Err(status) => return Ok(error_response(status)),
        };
        let timeout = head
            .headers()
            .get("grpc-timeout")
            .and_then(parse_grpc_timeout);
        let request = |call: &RestCall| {
            let mut req = Request::builder()
                .method(call.method.clone())
                .uri(call.path.as_str())
                .body(Full::new(call.body.clone().unwrap_or_default()))
                .expect("a valid request");
            *req.headers_mut() = rest_headers(head.headers());
            if call.body.is_some() {
                req.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            req
        };
        let exchange = self.exchange(endpoint, || request(&call));
        let (status, headers, answer) = match timeout {
            Some(t) => match tokio::time::timeout(t, exchange).await {
                Ok(r) => r?,
                Err(_) => {
                    return Ok(error_response(Status::deadline_exceeded(format!(
                        "the OIP REST model server did not answer within {t:?}"
                    ))))
                }
            },
            None => exchange.await?,
        };
        Ok(translate(call.answer, status, &headers, &answer))
    }

    /// One HTTP/1.1 exchange with `endpoint`, on an idle connection or a new one; the answer
    /// read whole. A pooled connection the server had closed while idle is replaced once.
    async fn exchange(
        &self,
        endpoint: &str,
        request: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), UpstreamError> {
        let ep = self.endpoint(endpoint)?;
        let addr = ep.authority.to_string();
        let broken = |e: &dyn std::fmt::Display| UpstreamError::Connect(format!("{addr}: {e}"));
        for attempt in 0..2 {
            let (mut sender, pooled) = match self.rest.take(endpoint) {
                Some(s) => (s, true),
                None => (self.connect_http1(&ep).await?, false),
            };
            let mut req = request();
            req.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(&addr).map_err(|e| broken(&e))?,
            );
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                // The server closed the idle connection as the request went out: nothing of it
                // was processed, so it goes once more on a new connection.
                Err(e)
                    if pooled && attempt == 0 && (e.is_canceled() || e.is_incomplete_message()) =>
                {
                    continue
                }
                Err(e) => return Err(broken(&e)),
            };
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| broken(&e))?
                .to_bytes();
            if !sender.is_closed() {
                self.rest.put(endpoint, sender);
            }
            return Ok((parts.status, parts.headers, body));
        }
        unreachable!("the second attempt returns")
    }

    async fn connect_http1(
        &self,
        ep: &super::upstream::Endpoint,
    ) -> Result<super::upstream::RestSender, UpstreamError> {
        let addr = ep.authority.to_string();
        let handshake = |e: hyper::Error| UpstreamError::Connect(format!("{addr}: HTTP/1.1: {e}"));
        let sender = match self.dial(ep).await? {
            Dialed::Tcp(tcp) => {
                let (s, conn) = http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(handshake)?;
                tokio::spawn(conn);
                s
            }
            Dialed::Tls(tls) => {
                let (s, conn) = http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(handshake)?;
                tokio::spawn(conn);
                s
            }
        };
        Ok(sender)
    }
}

/// The REST call of the OIP gRPC call to `path` with the unary body `body`; the status to answer
/// when it has none.
fn rest_call(path: &str, body: &Bytes) -> Result<RestCall, Status> {
    let Some(method) = path.strip_prefix(OIP_PREFIX) else {
        return Err(Status::failed_precondition(format!(
            "{path} is not an Open Inference Protocol call, and this version's model server is \
             registered as an OIP REST server (backend protocol oip-rest)"
        )));
    };
    let msg = unary_message(body).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let get = |path: String, answer| RestCall {
        method: Method::GET,
        path,
        body: None,
        answer,
    };
    let invalid = |e: prost::DecodeError| Status::invalid_argument(e.to_string());
    Ok(match method {
        "ModelInfer" => {
            let req = oip::ModelInferRequest::decode(msg).map_err(invalid)?;
            let json = oip_rest::infer_request_json(&req, crate::oip::DEFAULT_MAX_ELEMENTS)
                .map_err(Status::invalid_argument)?;
            RestCall {
                method: Method::POST,
                path: model_path(&req.model_name, &req.model_version, "/infer"),
                body: Some(serde_json::to_vec(&json).expect("JSON").into()),
                answer: Answer::Infer,
            }
        }
        "ModelMetadata" => {
            let r = oip::ModelMetadataRequest::decode(msg).map_err(invalid)?;
            get(model_path(&r.name, &r.version, ""), Answer::Metadata)
        }
        "ModelReady" => {
            let r = oip::ModelReadyRequest::decode(msg).map_err(invalid)?;
            get(
                model_path(&r.name, &r.version, "/ready"),
                Answer::ModelReady,
            )
        }
        "ServerLive" => get("/v2/health/live".into(), Answer::Live),
        "ServerReady" => get("/v2/health/ready".into(), Answer::Ready),
        "ServerMetadata" => get("/v2".into(), Answer::ServerMetadata),
        other => {
            return Err(Status::unimplemented(format!(
                "{other} has no OIP REST form; this version's model server is registered as an \
                 OIP REST server (backend protocol oip-rest): register its gRPC endpoint for it"
            )))
        }
    })
}

/// `/v2/models/{model}[/versions/{version}]{rest}`, the names percent-encoded.
fn model_path(model: &str, version: &str, rest: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    // Path segments keep the characters model names use; everything else is encoded.
    const SEGMENT: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let mut p = format!("/v2/models/{}", utf8_percent_encode(model, SEGMENT));
    if !version.is_empty() {
        p.push_str(&format!(
            "/versions/{}",
            utf8_percent_encode(version, SEGMENT)
        ));
    }
    p.push_str(rest);
    p
}

/// The caller's headers that go on to a REST server: not gRPC's own, not HTTP/2's pseudo or
/// connection headers, not the body's length (the REST body is another).
fn rest_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 2);
    for (k, v) in from {
        let name = k.as_str();
        if name.starts_with("grpc-")
            || matches!(
                name,
                "content-type" | "content-length" | "te" | "connection" | "host" | "user-agent"
            )
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    out
}

/// The gRPC status a REST error answer means.
fn code_of(status: StatusCode) -> Code {
    match status.as_u16() {
        400 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        500 => Code::Internal,
        _ => Code::Unknown,
    }
}

/// The gRPC answer of a REST answer.
fn translate(
    answer: Answer,
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Body> {
    let json = || serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    // Readiness is an answer, not an error: 503 (or `"ready": false`) says "not ready".
    let flag = |key: &str| match status {
        StatusCode::OK => Some(json().get(key).and_then(Value::as_bool).unwrap_or(true)),
        StatusCode::SERVICE_UNAVAILABLE => Some(false),
        _ => None,
    };
    match answer {
        Answer::Live => {
            if let Some(live) = flag("live") {
                return unary_response(&oip::ServerLiveResponse { live });
            }
        }
        Answer::Ready => {
            if let Some(ready) = flag("ready") {
                return unary_response(&oip::ServerReadyResponse { ready });
            }
        }
        Answer::ModelReady => {
            if let Some(ready) = flag("ready") {
                return unary_response(&oip::ModelReadyResponse { ready });
            }
        }
        _ => {}
    }
    if !status.is_success() {
        let v = json();
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| v.get("detail").map(Value::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
        return error_response(Status::new(
            code_of(status),
            format!("the OIP REST model server answered {status}: {message}"),
        ));
    }
    let unreadable = |e: &dyn std::fmt::Display| {
        error_response(Status::internal(format!(
            "the OIP REST model server's answer cannot be read: {e}"
        )))
    };
    match answer {
        Answer::Infer => {
            let header_len = headers
                .get("inference-header-content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            match oip_rest::infer_response_from_json(body, header_len) {
                Ok(r) => unary_response(&r),
                Err(e) => unreadable(&e.0),
            }
        }
        Answer::Metadata => match metadata(&json()) {
            Some(m) => unary_response(&m),
            None => unreadable(&"not model metadata"),
        },
        Answer::ServerMetadata => {
            let v = json();
            let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            unary_response(&oip::ServerMetadataResponse {
                name: text("name"),
                version: text("version"),
                extensions: strings(v.get("extensions")),
            })
        }
        // A success answered above.
        Answer::Live | Answer::Ready | Answer::ModelReady => unreachable!("answered above"),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `{"name", "versions", "platform", "inputs", "outputs"}` as a `ModelMetadataResponse`.
fn metadata(v: &Value) -> Option<oip::ModelMetadataResponse> {
    let tensors = |key: &str| -> Option<Vec<oip::model_metadata_response::TensorMetadata>> {
        let Some(list) = v.get(key) else {
            return Some(Vec::new());
        };
        list.as_array()?
            .iter()
            .map(|t| {
                Some(oip::model_metadata_response::TensorMetadata {
                    name: t.get("name")?.as_str()?.to_string(),
                    datatype: t.get("datatype")?.as_str()?.to_string(),
                    shape: t
                        .get("shape")?
                        .as_array()?
                        .iter()
                        .map(Value::as_i64)
                        .collect::<Option<_>>()?,
                })
            })
            .collect()
    };
    Some(oip::ModelMetadataResponse {
        name: v.get("name")?.as_str()?.to_string(),
        versions: strings(v.get("versions")),
        platform: v
            .get("platform")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        inputs: tensors("inputs")?,
        outputs: tensors("outputs")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_headers() {
        assert_eq!(model_path("iris", "", "/infer"), "/v2/models/iris/infer");
        assert_eq!(
            model_path("a b/c", "v1.2", "/ready"),
            "/v2/models/a%20b%2Fc/versions/v1.2/ready"
        );
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert("grpc-timeout", HeaderValue::from_static("1S"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-user-id", HeaderValue::from_static("u1"));
        let out = rest_headers(&h);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out["x-user-id"], "u1");
    }

    #[test]
    fn other_calls_are_refused_with_a_reason() {
        let e = rest_call(
            "/tensorflow.serving.PredictionService/Predict",
            &Bytes::new(),
        )
        .err()
        .unwrap();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let body = crate::protocol::grpc::frame(&oip::ServerLiveRequest::default());
        let e = rest_call("/inference.GRPCInferenceService/ModelConfig", &body)
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::Unimplemented);
        assert!(e.message().contains("ModelConfig"), "{e:?}");
    }

    #[test]
    fn rest_errors_become_the_status_they_mean() {
        let body = Bytes::from_static(br#"{"error": "Model iris not found"}"#);
        let resp = translate(
            Answer::Infer,
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            &body,
        );
        let status = Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().contains("Model iris not found"),
            "{status:?}"
        );
        let resp = translate(
            Answer::ModelReady,
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            &Bytes::new(),
        );
        assert!(Status::from_header_map(resp.headers()).is_none());
    }
}
