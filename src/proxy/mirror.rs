//! The data-plane side of shadows: copies of finished production requests sent to shadow
//! versions, in the background.
//!
//! A copy is sent after the caller's response has ended, from a spawned task: the caller never
//! waits for it. Copies in flight are capped by a semaphore taken with `try_acquire` — when none
//! is free the copy is dropped and counted, never queued. Each copy has its own deadline; its
//! answer and production's go to the record writer, which compares them off the request path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use tokio::sync::Semaphore;

use super::{
    status,
    upstream::{Payload, Upstreams},
    GRPC_TIMEOUT, REQUEST_ID, TRACEPARENT,
};
use crate::protocol::{Call, InferRequest};
use crate::recorder::{Recorder, ShadowCall, ShadowObservation};
use crate::routing::{LiveShadow, Route};

/// Header marking a mirrored copy.
pub const SHADOW_HEADER: &str = "x-modelgate-shadow";
/// [`SHADOW_HEADER`], parsed once: a header named by a `&str` is parsed at every insert (the
/// names of the shadow's headers were ~6,000 instructions of each copy sent).
const SHADOW: http::HeaderName = http::HeaderName::from_static(SHADOW_HEADER);

/// Sends shadow copies.
pub struct Mirror {
    permits: Arc<Semaphore>,
    upstreams: Arc<Upstreams>,
    recorder: Arc<Recorder>,
    max_message_bytes: usize,
    /// Times the breakers.
    pub(super) clock: crate::clock::SharedClock,
}

/// A finished production exchange, as the copies need it.
pub struct Finished {
    /// Model.
    pub model: String,
    /// The version that answered the caller.
    pub production: Arc<Route>,
    /// Request id (shared with the copies, for correlation).
    pub request_id: String,
    /// Arrival time, Unix ms.
    pub time_ms: u64,
    /// gRPC path.
    pub path: String,
    /// The caller's request headers.
    pub headers: HeaderMap,
    /// The request body as received (gRPC framed).
    pub body: Bytes,
    /// The inference request as its protocol decoded it, when the call was an inference (its
    /// protocol rewrites the copies for the shadows' backends and reads the answers).
    pub request: Option<Arc<dyn InferRequest>>,
    /// Production's answer: the response message bytes, or `None` when it failed.
    pub answer: Option<Bytes>,
    /// Production's upstream latency.
    pub latency: Duration,
    /// The trace context of the production request's span, when traces are exported: the
    /// copy is traced as its child.
    pub traceparent: Option<HeaderValue>,
}

impl Mirror {
    /// A mirror allowing `max_in_flight` copies at once.
    pub fn new(
        max_in_flight: usize,
        upstreams: Arc<Upstreams>,
        recorder: Arc<Recorder>,
        max_message_bytes: usize,
    ) -> Self {
        Mirror {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            upstreams,
            recorder,
            max_message_bytes,
            clock: crate::clock::system(),
        }
    }

    /// The same mirror (and cap) sending over other connections.
    pub fn with_upstreams(&self, upstreams: Arc<Upstreams>) -> Self {
        Mirror {
            permits: self.permits.clone(),
            upstreams,
            recorder: self.recorder.clone(),
            max_message_bytes: self.max_message_bytes,
            clock: self.clock.clone(),
        }
    }

    /// Sends a copy of `f` to each of `shadows`; returns the versions whose copy was dropped
    /// because the in-flight cap was reached.
    pub fn dispatch(&self, f: Arc<Finished>, all: &Arc<[LiveShadow]>, taken: &[usize]) -> Vec<u32> {
        let mut dropped = Vec::new();
        for &i in taken {
            let s = &all[i];
            // The version that answered is not its own shadow (e.g. after a promotion).
            if s.route.version == f.production.version {
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                dropped.push(s.route.version);
                continue;
            };
            let route = s.route.clone();
            let timeout = s.timeout;
            let comparison = s.comparison.clone();
            let shadows = all.clone();
            let upstreams = self.upstreams.clone();
            let recorder = self.recorder.clone();
            let clock = self.clock.clone();
            let limit = self.max_message_bytes;
            let f = f.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let call = tokio::time::timeout(
                    timeout,
                    call_shadow(&upstreams, &route, &f, timeout, limit),
                )
                .await;
                let latency = started.elapsed();
                drop(permit);
                let result = match call {
                    Err(_) | Ok(Err(Failure::Timeout)) => ShadowCall::Timeout,
                    Ok(Err(Failure::Code(code))) => ShadowCall::Failed(code),
                    Ok(Ok(answer)) => ShadowCall::Answered(answer, latency),
                };
                // A shadow that cannot be reached (or does not answer in time) is suspended for
                // a while, so that a dead shadow costs nothing on the request path.
                let breaker = &shadows[i].breaker;
                match &result {
                    ShadowCall::Timeout => breaker.failed(clock.now_ms()),
                    ShadowCall::Failed(c) if *c == tonic::Code::Unavailable as i32 => {
                        breaker.failed(clock.now_ms())
                    }
                    _ => breaker.succeeded(),
                }
                recorder.submit_shadow(ShadowObservation {
                    model: f.model.clone(),
                    version: route.version,
                    shadow: route,
                    production: f.production.clone(),
                    request_id: f.request_id.clone(),
                    time_ms: f.time_ms,
                    reader: f.request.as_ref().map(|r| r.protocol()),
                    comparison: comparison.clone(),
                    production_answer: f.answer.clone().map(|a| (a, f.latency)),
                    result,
                });
            });
        }
        dropped
    }
}

/// How a copy failed.
enum Failure {
    /// Its deadline passed (ours, or the upstream's answer to the `grpc-timeout` we sent).
    Timeout,
    /// It ended with this gRPC code.
    Code(i32),
}

const UNAVAILABLE: Failure = Failure::Code(tonic::Code::Unavailable as i32);

/// One copy: the caller's request to the shadow's upstream, its answer read whole (bounded).
/// Returns the answer's message bytes.
async fn call_shadow(
    upstreams: &Upstreams,
    route: &Route,
    f: &Finished,
    timeout: Duration,
    limit: usize,
) -> Result<Bytes, Failure> {
    let started = Instant::now();
    // The caller's own bytes, with the shadow's backend name and version written in when they
    // differ (the same rule as for production: `Protocol::rewrite`).
    let body = f
        .request
        .as_ref()
        .and_then(|r| {
            let protocol = r.protocol();
            let msg = protocol.message(&f.body).ok()?;
            let rewritten = protocol
                .rewrite(&Call::Infer, &msg, (r.model(), r.version()), route)
                .ok()??;
            Some(protocol.body(&rewritten))
        })
        .unwrap_or_else(|| f.body.clone());
    let mut req = Request::post(f.path.as_str())
        .body(())
        .map_err(|_| UNAVAILABLE)?;
    // Copied into a map with room for the four headers added next: a clone is full, and the
    // first insert then grew it, a reallocation that cost ~13,000 instructions per copy sent.
    let h = req.headers_mut();
    h.reserve(f.headers.len() + 4);
    for (name, value) in &f.headers {
        h.append(name.clone(), value.clone());
    }
    h.insert(SHADOW, HeaderValue::from_static("true"));
    if let Some(t) = &f.traceparent {
        h.insert(TRACEPARENT, t.clone());
    }
    h.insert(GRPC_TIMEOUT, status::encode_grpc_timeout(timeout));
    if let Ok(v) = HeaderValue::from_str(&f.request_id) {
        h.insert(REQUEST_ID, v);
    }
    // Kept out of the connection's HPACK table, as production's are (`mark_per_request`).
    super::mark_per_request(h, None);
    let resp = upstreams
        .send_to(route, req, Payload::Full(body))
        .await
        .map_err(|_| UNAVAILABLE)?;
    if resp.status() != http::StatusCode::OK {
        return Err(Failure::Code(
            status::code_for_http_status(resp.status()) as i32
        ));
    }
    let (parts, body) = resp.into_parts();
    let (data, trailers) = super::body::read_whole(body, limit)
        .await
        .map_err(|_| UNAVAILABLE)?;
    let code = trailers
        .as_ref()
        .and_then(status::code_from_headers)
        .or_else(|| status::code_from_headers(&parts.headers))
        .unwrap_or(tonic::Code::Unknown);
    // The upstream enforces the grpc-timeout we sent: DEADLINE_EXCEEDED, or CANCELLED as tonic
    // servers answer, once our deadline has passed — either way the copy ran out of time.
    if code == tonic::Code::DeadlineExceeded
        || (code == tonic::Code::Cancelled && started.elapsed() >= timeout)
    {
        return Err(Failure::Timeout);
    }
    if code != tonic::Code::Ok {
        return Err(Failure::Code(code as i32));
    }
    Ok(match &f.request {
        Some(r) => r.protocol().message(&data).unwrap_or(data),
        None => data,
    })
}
