//! The data plane: an HTTP/2 gRPC server that routes each call to a model version's upstream.
//!
//! [`Proxy::call`] is the whole request path, in typed stages: admitted (request id, the
//! protocol and kind of call, an in-flight slot) → routed (version, experiment variant, shadows)
//! → forwarded (the upstream exchange) → finished (when the response ends: metrics, span, shadow
//! copies, record, in-flight release). What a protocol says about a call — its kind, the model it
//! names, its rewrite for a backend, its inputs and outputs — comes from `crate::protocol`.
//! Unary inferences and the other calls that name a model are read whole (bounded), routed by
//! the model named in the message, and their answers are read whole within the deadline; every
//! other call is streamed through untouched.

pub mod accept;
pub mod admission;
pub mod balance;
pub mod body;
pub mod mirror;
pub mod rest;
pub mod rest_upstream;
pub mod status;
pub mod stream;
pub mod upstream;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tonic::{body::Body, Code, Status};
use tower::ServiceExt;

use crate::protocol::{self, Call, InferRequest, ModelCall, Protocol, ProtocolError, ServerCall};
use crate::recorder::{RawRecord, Recorder};
use crate::routing::{LiveShadow, Lookup, Route, RoutingTable, VersionLookup};
use crate::telemetry::{EndpointLabels, Metrics};
pub use accept::{serve, ServerSettings};
use body::{Ending, Observed};

/// Header carrying the request id back to the caller.
pub const REQUEST_ID_HEADER: &str = "x-modelgate-request-id";
/// Header carrying the version that served the request.
pub const VERSION_HEADER: &str = "x-modelgate-model-version";
/// Header naming the model for non-OIP calls.
pub const MODEL_HEADER: &str = "x-model-name";
/// Header naming the experiment that served the request.
pub const EXPERIMENT_HEADER: &str = "x-modelgate-experiment";
/// Header naming the variant that served the request; on a request, forces that variant.
pub const VARIANT_HEADER: &str = "x-modelgate-variant";
/// A request id the caller chose.
pub const CLIENT_REQUEST_ID_HEADER: &str = "x-request-id";

// The same names as `HeaderName`s, made at compile time: a `&str` name is parsed and checked on
// every lookup or insert (`HdrName::from_bytes`), which was 7% of modelgate's instructions per
// call before these.
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const VERSION: HeaderName = HeaderName::from_static(VERSION_HEADER);
const MODEL: HeaderName = HeaderName::from_static(MODEL_HEADER);
const EXPERIMENT: HeaderName = HeaderName::from_static(EXPERIMENT_HEADER);
const VARIANT: HeaderName = HeaderName::from_static(VARIANT_HEADER);
const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static(CLIENT_REQUEST_ID_HEADER);
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Limits of the data plane.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests served at once; more wait for a slot (see [`admission`]).
    pub max_in_flight: usize,
    /// Requests waiting for a slot at most; more are refused at once.
    pub max_queued: usize,
    /// Longest a request waits for a slot; zero refuses at once.
    pub queue_timeout: Duration,
    /// Largest OIP message read, each way.
    pub max_message_bytes: usize,
    /// Most elements an OIP input tensor may declare.
    pub max_tensor_elements: usize,
    /// Largest request header block, counted as HTTP/2 counts it (RFC 9113 §6.5.2).
    pub max_header_bytes: usize,
    /// Deadline for OIP unary calls without grpc-timeout.
    pub request_timeout: Duration,
    /// Metadata key (and OIP parameter) carrying the unit id.
    pub unit_key: String,
    /// Shadow copies in flight at most; more are dropped and counted.
    pub max_shadow_in_flight: usize,
}

/// Why the proxy answered a call itself, with an error.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("model '{0}' is not registered with modelgate")]
    UnknownModel(String),
    #[error("model '{0}' has no production version; promote one with modelgate.v1.Registry/TransitionStage")]
    NoProduction(String),
    #[error(
        "no model named: set the '{MODEL_HEADER}' header or start modelgate with --default-model"
    )]
    NoModel,
    #[error("invalid '{MODEL_HEADER}' header: not visible ASCII")]
    BadModelHeader,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("model '{model}' has no version '{version}' (a version a call names is one of modelgate's: a number or an alias)")]
    UnknownVersion { model: String, version: String },
    #[error("version {version} of model '{model}' is archived and serves no calls")]
    ArchivedVersion { model: String, version: u32 },
    #[error("{} names no model: start modelgate with --default-model to send such calls to that model's server, or set the '{MODEL_HEADER}' header", .0.trim_start_matches('/'))]
    OipNoModel(String),
    #[error("request message larger than the limit of {0} bytes (--max-message-bytes)")]
    RequestTooLarge(usize),
    #[error(
        "request metadata of {size} bytes exceeds the limit of {limit} bytes (--max-header-bytes)"
    )]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("reading the request failed: {0}")]
    ReadRequest(String),
    #[error("the stream ended before its first message, which names the model to route to")]
    EmptyStream,
    #[error("upstream {endpoint} (model '{model}' version {version}) is unreachable: {reason}")]
    Unreachable {
        endpoint: String,
        model: String,
        version: u32,
        reason: String,
    },
    #[error("upstream {endpoint} (model '{model}' version {version}) answered HTTP {status}; is it a gRPC server?")]
    UpstreamHttp {
        endpoint: String,
        model: String,
        version: u32,
        status: http::StatusCode,
    },
    #[error(
        "upstream {endpoint} (model '{model}' version {version}) failed while answering: {reason}"
    )]
    UpstreamBody {
        endpoint: String,
        model: String,
        version: u32,
        reason: String,
    },
    #[error("upstream {endpoint} (model '{model}' version {version}) {failure}")]
    UpstreamFailed {
        endpoint: String,
        model: String,
        version: u32,
        failure: upstream::StreamFailure,
    },
    #[error("deadline of {0:?} exceeded before the upstream answered")]
    Deadline(Duration),
}

impl ProxyError {
    fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            ProxyError::UnknownModel(_)
            | ProxyError::NoProduction(_)
            | ProxyError::UnknownVersion { .. } => Status::not_found(msg),
            ProxyError::ArchivedVersion { .. } | ProxyError::OipNoModel(_) => {
                Status::failed_precondition(msg)
            }
            ProxyError::NoModel | ProxyError::BadModelHeader | ProxyError::EmptyStream => {
                Status::invalid_argument(msg)
            }
            ProxyError::Protocol(e) => e.status(),
            ProxyError::RequestTooLarge(_) | ProxyError::HeadersTooLarge { .. } => {
                Status::resource_exhausted(msg)
            }
            ProxyError::ReadRequest(_) => Status::cancelled(msg),
            ProxyError::Unreachable { .. } | ProxyError::UpstreamBody { .. } => {
                Status::unavailable(msg)
            }
            ProxyError::UpstreamHttp { status, .. } => {
                Status::new(status::code_for_http_status(*status), msg)
            }
            ProxyError::UpstreamFailed { failure, .. } => Status::new(failure.code(), msg),
            ProxyError::Deadline(_) => Status::deadline_exceeded(msg),
        }
    }

    /// An upstream stream that failed after it started.
    fn failed(route: &Route, failure: upstream::StreamFailure) -> Self {
        ProxyError::UpstreamFailed {
            endpoint: route.endpoint.clone(),
            model: route.model.clone(),
            version: route.version,
            failure,
        }
    }

    /// The status code this error answers with.
    fn code(&self) -> Option<Code> {
        Some(self.status().code())
    }

    /// Counts an upstream's failure in `modelgate_upstream_errors_total`.
    fn count(&self, metrics: &Metrics) {
        if let Some((endpoint, kind)) = self.endpoint_kind() {
            metrics
                .upstream_errors
                .get_or_create(&EndpointLabels {
                    endpoint: endpoint.to_string(),
                    kind: kind.to_string(),
                })
                .inc();
        }
    }

    fn endpoint_kind(&self) -> Option<(&str, &'static str)> {
        match self {
            ProxyError::Unreachable { endpoint, .. } => Some((endpoint, "connect")),
            ProxyError::UpstreamHttp { endpoint, .. } => Some((endpoint, "http_status")),
            ProxyError::UpstreamBody { endpoint, .. } => Some((endpoint, "body")),
            ProxyError::UpstreamFailed {
                endpoint, failure, ..
            } => Some((endpoint, failure.kind())),
            _ => None,
        }
    }
}

/// Stage 1 of a call: admitted (or shed at the door). What is known before its body is read.
struct Admitted {
    /// The caller's `x-request-id` when sane, else a new UUIDv7.
    request_id: String,
    /// The gRPC path.
    method: String,
    /// Arrival, Unix ms (records, experiment windows).
    arrival_ms: u64,
    /// Arrival on the monotonic clock (latencies).
    start: Instant,
    /// The protocol that claimed the path.
    protocol: &'static dyn Protocol,
    /// What kind of call it is.
    call: Call,
    /// The unit id in the headers, under `--unit-key` (routing may find another).
    unit_id: Option<String>,
    /// The request's trace span, when traces are exported.
    span: Option<crate::traces::RequestSpan>,
    /// The in-flight slot, released when the response ends; `None` when the call was shed.
    slot: Option<admission::Slot>,
}

/// What a call named, routed or not: for its record, its metrics and its span.
#[derive(Default)]
struct Subject {
    /// The model it named (empty when none).
    model: String,
    /// The unit id routing found under the experiment's unit key, in the headers or the
    /// request's parameters (else the admitted one counts).
    unit_id: Option<String>,
}

/// Stage 2: routed. The version that serves the call, and why.
struct Routed {
    route: Arc<Route>,
    /// Experiment and variant, when the call is in one.
    experiment: Option<(Arc<str>, Arc<str>)>,
    /// Whether it counts in the experiment (not forced).
    counted: bool,
    /// The model's shadows and which of them take this call.
    shadows: Option<(Arc<[LiveShadow]>, Vec<usize>)>,
    /// Shadow versions that sampled this call but are down (breaker open).
    suppressed: Vec<u32>,
}

impl Routed {
    /// Whether a shadow takes a copy of this call.
    fn copied(&self) -> bool {
        self.shadows
            .as_ref()
            .is_some_and(|(_, taken)| !taken.is_empty())
    }
}

/// A call that could not be routed: what it named, the bytes read, and why.
struct Unrouted {
    subject: Subject,
    size: usize,
    error: ProxyError,
}

impl Unrouted {
    /// Boxed: refusals are the rare path, and a small `Result` keeps the routed one cheap.
    fn new(subject: Subject, size: usize, error: impl Into<ProxyError>) -> Box<Self> {
        Box::new(Unrouted {
            subject,
            size,
            error: error.into(),
        })
    }
}

/// A routed call's request, as the forward stage takes it.
enum Inbound {
    /// A unary call, read whole.
    Unary(UnaryCall),
    /// A stream, its first message read.
    Stream(stream::Opened),
    /// A call forwarded untouched.
    PassThrough(http::request::Parts, Incoming),
}

/// A unary call read whole and routed.
struct UnaryCall {
    parts: http::request::Parts,
    /// The body as received.
    framed: Bytes,
    /// Its message.
    msg: Bytes,
    /// An inference's request, decoded.
    request: Option<Arc<dyn InferRequest>>,
    /// The model and version another call named.
    named: Option<protocol::Named>,
    /// The caller's deadline (or `--request-timeout`), and when it started.
    deadline: Duration,
    started: Instant,
}

/// Stage 3: forwarded. What the exchange with the upstream left for the record and the shadows.
#[derive(Default)]
struct Forwarded {
    /// The inference request, decoded by its protocol.
    request: Option<Arc<dyn InferRequest>>,
    /// Bytes of request and answer held (the record queue's byte bound).
    size: usize,
    /// Time waiting for the upstream (for a stream, until its response headers).
    upstream_latency: Option<Duration>,
    /// The answer's message when an inference succeeded.
    response: Option<Bytes>,
    /// What shadows get a copy of.
    copy: Option<Copy>,
}

/// The request that shadows get a copy of.
enum Copy {
    /// A unary call's request as received, and its headers.
    Unary(Bytes, HeaderMap),
    /// A pass-through call's request and response bodies, copied as they pass, and the
    /// request headers.
    Tee(body::TeeSlot, body::TeeSlot, HeaderMap),
}

/// The stages a call reached, carried to its end (stage 4: finished, with its status code).
struct Trail {
    admitted: Admitted,
    subject: Subject,
    routed: Option<Routed>,
    forwarded: Forwarded,
}

/// The data-plane request handler.
pub struct Proxy {
    routing: Arc<ArcSwap<RoutingTable>>,
    upstreams: Arc<upstream::Upstreams>,
    local: tonic::service::Routes,
    pub(crate) limits: Limits,
    admission: Arc<admission::Admission>,
    /// Request bodies of refused calls being drained (see [`Proxy::drain`]).
    draining: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    recorder: Arc<Recorder>,
    mirror: mirror::Mirror,
    traces: Option<Arc<crate::traces::Traces>>,
    /// Arrival times, experiment time windows, shadow breakers.
    clock: crate::clock::SharedClock,
    /// `limits.unit_key` as a header name, when it is one.
    unit_header: Option<HeaderName>,
}

impl Proxy {
    /// A proxy reading routes from `routing`, answering health and reflection through `local`.
    pub fn new(
        routing: Arc<ArcSwap<RoutingTable>>,
        upstream: upstream::UpstreamSettings,
        local: tonic::service::Routes,
        limits: Limits,
        metrics: Arc<Metrics>,
        recorder: Arc<Recorder>,
    ) -> Self {
        let upstreams = Arc::new(upstream::Upstreams::new(upstream));
        let mirror = mirror::Mirror::new(
            limits.max_shadow_in_flight,
            upstreams.clone(),
            recorder.clone(),
            limits.max_message_bytes,
        );
        let admission = Arc::new(admission::Admission::new(
            limits.max_in_flight,
            limits.max_queued,
            limits.queue_timeout,
            metrics.clone(),
        ));
        Proxy {
            routing,
            upstreams,
            local,
            unit_header: HeaderName::from_bytes(limits.unit_key.as_bytes()).ok(),
            limits,
            admission,
            draining: Arc::new(AtomicUsize::new(0)),
            metrics,
            recorder,
            mirror,
            traces: None,
            clock: crate::clock::system(),
        }
    }

    /// Times calls (arrival, experiment windows, shadow breakers) by `clock`.
    pub fn with_clock(mut self, clock: crate::clock::SharedClock) -> Self {
        self.mirror.clock = clock.clone();
        self.clock = clock;
        self
    }

    /// Records a trace span per request (and per upstream call) with `traces`.
    pub fn with_traces(mut self, traces: Option<Arc<crate::traces::Traces>>) -> Self {
        self.traces = traces;
        self
    }

    /// A proxy sharing everything with this one (routes, limits, the in-flight and draining counts,
    /// metrics, recorder, the shadow cap) except its upstream connections: one per data-plane
    /// thread, so that a request and the connection it travels on are driven by the same thread.
    pub fn sibling(&self) -> Self {
        let upstreams = Arc::new(upstream::Upstreams::new(self.upstreams.settings().clone()));
        Proxy {
            routing: self.routing.clone(),
            mirror: self.mirror.with_upstreams(upstreams.clone()),
            upstreams,
            local: self.local.clone(),
            limits: self.limits.clone(),
            admission: Arc::new(self.admission.sibling()),
            draining: self.draining.clone(),
            metrics: self.metrics.clone(),
            recorder: self.recorder.clone(),
            traces: self.traces.clone(),
            clock: self.clock.clone(),
            unit_header: self.unit_header.clone(),
        }
    }

    /// Serves one request, as a boxed future. Never fails: every error is a gRPC status.
    ///
    /// A call with a free slot is [`Proxy::serve`]'s future at once. One that must wait for
    /// a slot waits in a small future of its own, and [`Proxy::serve`]'s — kilobytes — is
    /// allocated only once it has one. Why: under overload thousands of calls wait (one per
    /// stream the clients opened); holding a whole call's future each, they spread each
    /// call's state over megabytes that a served call then reads back from memory, not from
    /// the cache. Allocated on admission, a call's future takes the block a call just
    /// finished with, still in the cache (measured: README, issue #18, a twenty-second round).
    pub fn call(self: Arc<Self>, req: Request<Incoming>) -> BoxFuture<'static, Response<Body>> {
        let admitted = self.admit(&req);
        if admitted.slot.is_some() {
            Box::pin(self.serve(admitted, req))
        } else {
            Box::pin(self.queue(admitted, req))
        }
    }

    /// A call that found every slot taken: waits for one (or is shed), then is served.
    async fn queue(
        self: Arc<Self>,
        mut admitted: Admitted,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let deadline = self.unary_deadline(req.headers());
        match self.admission.wait(deadline).await {
            Ok(slot) => {
                admitted.slot = Some(slot);
                Box::pin(self.serve(admitted, req)).await
            }
            Err(refused) => self.shed(admitted, req, refused),
        }
    }

    /// Serves an admitted call.
    ///
    /// A call goes through typed stages: admitted ([`Admitted`]: id, protocol and kind,
    /// in-flight slot) → routed ([`Routed`]: version, experiment variant, shadows) → forwarded
    /// ([`Forwarded`]: what the upstream exchange left) → finished (its status code, when the
    /// response ends: metrics, span, shadow copies, record).
    async fn serve(self: Arc<Self>, admitted: Admitted, req: Request<Incoming>) -> Response<Body> {
        let mut trail = Trail {
            admitted,
            subject: Subject::default(),
            routed: None,
            forwarded: Forwarded::default(),
        };
        let header_bytes = header_list_size(&req);
        let result = if header_bytes > self.limits.max_header_bytes {
            self.drain(req.into_body());
            Err(ProxyError::HeadersTooLarge {
                size: header_bytes,
                limit: self.limits.max_header_bytes,
            })
        } else if self.answers_itself(trail.admitted.call) {
            Ok(self.answer(&trail.admitted, req).await)
        } else {
            match self.route(&trail.admitted, req).await {
                Err(u) => {
                    trail.subject = u.subject;
                    trail.forwarded.size = u.size;
                    Err(u.error)
                }
                Ok((subject, routed, inbound)) => {
                    let (forwarded, result) =
                        Box::pin(self.forward(&trail.admitted, &routed, inbound)).await;
                    trail.subject = subject;
                    trail.routed = Some(routed);
                    trail.forwarded = forwarded;
                    result
                }
            }
        };
        self.respond(trail, result)
    }

    /// Stage 1: the call's id, arrival, protocol and kind, span, and an in-flight slot if one is
    /// free.
    fn admit(&self, req: &Request<Incoming>) -> Admitted {
        let start = Instant::now();
        let arrival_ms = self.clock.now_ms();
        let request_id = request_id(req.headers());
        let method = req.uri().path().to_string();
        let (protocol, call) = protocol::classify(&method);
        let unit_id = self
            .unit_header
            .as_ref()
            .and_then(|h| header_str(req.headers(), h))
            .map(str::to_string);
        let span = (call != Call::Local)
            .then(|| {
                self.traces
                    .as_ref()
                    .map(|t| t.request(req.headers(), &method))
            })
            .flatten();
        let slot = self.admission.try_admit();
        Admitted {
            request_id,
            method,
            arrival_ms,
            start,
            protocol,
            call,
            unit_id,
            span,
            slot,
        }
    }

    /// A call refused at the door (no in-flight slot, and it could not wait for one): answered
    /// at once, and still counted and recorded under the model its header names.
    fn shed(
        &self,
        admitted: Admitted,
        req: Request<Incoming>,
        why: admission::Refused,
    ) -> Response<Body> {
        self.metrics.shed.inc();
        let mut resp = admitted
            .protocol
            .error_response(Status::resource_exhausted(self.admission.refusal(why)));
        let subject = Subject {
            model: header_str(req.headers(), &MODEL)
                .unwrap_or_default()
                .to_string(),
            unit_id: None,
        };
        self.drain(req.into_body());
        set_header(resp.headers_mut(), REQUEST_ID, &admitted.request_id);
        let trail = Trail {
            admitted,
            subject,
            routed: None,
            forwarded: Forwarded::default(),
        };
        self.finish(trail, Code::ResourceExhausted);
        resp
    }

    /// Whether modelgate answers the call itself: health and reflection, and the server-level
    /// calls when no default model's server can answer them.
    fn answers_itself(&self, call: Call) -> bool {
        match call {
            Call::Local => true,
            Call::Server(_) => self.routing.load().default_model().is_none(),
            _ => false,
        }
    }

    /// modelgate's own answer (see [`Proxy::answers_itself`]).
    async fn answer(&self, a: &Admitted, req: Request<Incoming>) -> Response<Body> {
        match a.call {
            Call::Server(c) => {
                let ready = c == ServerCall::Ready && self.routing.load().routed_models() > 0;
                a.protocol.server_response(c, ready)
            }
            _ => self
                .local
                .clone()
                .oneshot(req)
                .await
                .unwrap_or_else(|e: Infallible| match e {}),
        }
    }

    /// Stage 2: reads what the call needs to be routed (a unary message, a stream's first
    /// message, or only the headers) and decides where it goes.
    async fn route(
        &self,
        a: &Admitted,
        req: Request<Incoming>,
    ) -> Result<(Subject, Routed, Inbound), Box<Unrouted>> {
        match a.call {
            Call::Infer | Call::Model(_) => self.route_unary(a, req).await,
            Call::Stream => self.route_stream(a, req).await,
            Call::Unnamed => self.route_pass_through(a, req).map_err(|mut u| {
                if matches!(u.error, ProxyError::NoModel) {
                    u.error = ProxyError::OipNoModel(a.method.clone());
                }
                u
            }),
            Call::Server(_) | Call::PassThrough | Call::Local => self.route_pass_through(a, req),
        }
    }

    /// Stage 3: sends the routed call upstream and relays or reads its answer.
    async fn forward(
        &self,
        a: &Admitted,
        routed: &Routed,
        inbound: Inbound,
    ) -> (Forwarded, Result<Response<Body>, ProxyError>) {
        // Streams and pass-through calls are boxed: their futures are larger than a unary
        // call's, and every call's future (copied as it is spawned and awaited) would be as
        // large as the largest of them.
        match inbound {
            Inbound::Unary(call) => self.forward_unary(a, routed, call).await,
            Inbound::Stream(opened) => Box::pin(self.forward_stream(a, routed, opened)).await,
            Inbound::PassThrough(parts, body) => {
                Box::pin(self.forward_pass_through(a, routed, parts, body)).await
            }
        }
    }

    /// The response headers (request id, version, experiment) and the body wrapper that
    /// finishes the call when the response ends.
    fn respond(
        self: Arc<Self>,
        trail: Trail,
        result: Result<Response<Body>, ProxyError>,
    ) -> Response<Body> {
        let mut resp = result.unwrap_or_else(|e| {
            e.count(&self.metrics);
            trail.admitted.protocol.error_response(e.status())
        });
        set_header(resp.headers_mut(), REQUEST_ID, &trail.admitted.request_id);
        mark_per_request(resp.headers_mut(), self.unit_header.as_ref());
        if let Some(r) = &trail.routed {
            set_header(resp.headers_mut(), VERSION, &r.route.version_label);
            if let Some((experiment, variant)) = &r.experiment {
                set_header(resp.headers_mut(), EXPERIMENT, experiment);
                set_header(resp.headers_mut(), VARIANT, variant);
            }
        }
        if let Some(Copy::Tee(_, response, _)) = &trail.forwarded.copy {
            let (slot, limit) = (response.clone(), self.limits.max_message_bytes);
            resp = resp.map(|b| Body::new(body::Tee::new(b, limit, slot)));
        }
        let header_code = status::code_from_headers(resp.headers());
        resp.map(move |b| {
            Body::new(Observed::new(b, header_code, move |ending| {
                let code = match ending {
                    Ending::Status(c) => c,
                    Ending::NoStatus => Code::Unknown,
                    Ending::Error => Code::Unavailable,
                    Ending::Cancelled => Code::Cancelled,
                };
                self.end(trail, code);
            }))
        })
    }

    /// Stage 4: the response ended with `code`. The in-flight slot is released last.
    fn end(&self, mut trail: Trail, code: Code) {
        let slot = trail.admitted.slot.take();
        if trail.admitted.call == Call::Local {
            self.count(None, None, code, trail.admitted.start);
        } else {
            self.finish(trail, code);
        }
        drop(slot);
    }

    /// Counts a finished call, ends its span, sends its shadow copies and hands its record to
    /// the recorder.
    fn finish(&self, trail: Trail, code: Code) {
        let Trail {
            mut admitted,
            subject,
            mut routed,
            mut forwarded,
        } = trail;
        let route = routed.as_ref().map(|r| r.route.clone());
        let experiment = routed.as_ref().and_then(|r| r.experiment.clone());
        self.count(route.as_deref(), experiment.as_ref(), code, admitted.start);

        if let (Some(r), Some(latency)) = (&route, forwarded.upstream_latency) {
            self.metrics
                .upstream_histogram(route_metrics(r), &r.endpoint)
                .observe(latency.as_secs_f64());
        }
        let unit_id = subject.unit_id.or(admitted.unit_id.take()).or_else(|| {
            forwarded
                .request
                .as_ref()
                .and_then(|r| r.parameter(&self.limits.unit_key))
        });
        let traceparent = match (&self.traces, &admitted.span) {
            (Some(t), Some(s)) => t.traceparent(s),
            _ => None,
        };
        if let Some(span) = admitted.span.take() {
            span.finish(crate::traces::Outcome {
                model: &subject.model,
                version: route.as_ref().map(|r| r.version),
                experiment: experiment.as_ref().map(|(e, v)| (&**e, &**v)),
                request_id: &admitted.request_id,
                code,
            });
        }
        let copy = match forwarded.copy.take() {
            Some(Copy::Tee(request, response, headers)) => {
                forwarded.response = response.lock().take().filter(|_| code == Code::Ok);
                request.lock().take().map(|r| (r, headers))
            }
            Some(Copy::Unary(request, headers)) => Some((request, headers)),
            None => None,
        };
        // A routed stream's inferences are recorded one by one (`stream`), not as one call.
        if admitted.call == Call::Stream && routed.is_some() {
            return;
        }
        let (shadow_skipped, shadow_dropped) = self.mirror(
            &admitted,
            &subject.model,
            routed.as_mut(),
            copy,
            &forwarded,
            traceparent,
        );
        let suppressed = routed
            .as_mut()
            .map(|r| std::mem::take(&mut r.suppressed))
            .unwrap_or_default();
        let shadowed =
            !(shadow_skipped.is_empty() && shadow_dropped.is_empty() && suppressed.is_empty());
        if !self
            .recorder
            .wanted(&subject.model, experiment.is_some(), shadowed)
        {
            return;
        }
        self.recorder.submit(RawRecord {
            request_id: admitted.request_id,
            time_ms: admitted.arrival_ms,
            method: admitted.method,
            model: subject.model,
            route,
            experiment: experiment.as_ref().map(|(e, _)| e.clone()),
            variant: experiment.as_ref().map(|(_, v)| v.clone()),
            counted: routed.as_ref().is_some_and(|r| r.counted),
            unit_id,
            status: code as i32,
            upstream_latency: forwarded.upstream_latency,
            latency: admitted.start.elapsed(),
            request: forwarded.request,
            response: forwarded.response,
            size: forwarded.size,
            shadow_skipped,
            shadow_dropped,
            shadow_suppressed: suppressed,
        });
    }

    /// Sends the copies of a finished call to the shadows of its route that sampled it. Returns
    /// the versions that skipped it and those whose copy was dropped.
    fn mirror(
        &self,
        a: &Admitted,
        model: &str,
        routed: Option<&mut Routed>,
        copy: Option<(Bytes, HeaderMap)>,
        forwarded: &Forwarded,
        traceparent: Option<HeaderValue>,
    ) -> (Vec<u32>, Vec<u32>) {
        let Some(routed) = routed else {
            return (Vec::new(), Vec::new());
        };
        let Some((all, taken)) = routed.shadows.take() else {
            return (Vec::new(), Vec::new());
        };
        // Not sampled: skipped. (Sampled but suppressed by an open breaker are counted apart.)
        let skipped = all
            .iter()
            .enumerate()
            .filter(|(i, s)| !taken.contains(i) && !routed.suppressed.contains(&s.route.version))
            .map(|(_, s)| s.route.version)
            .collect();
        let Some((body, mut headers)) = copy else {
            return (skipped, Vec::new());
        };
        // The copies share the production connection's header table when a shadow is served
        // by the same endpoint: unmarked, their per-request values (unit id, request id,
        // deadline) were inserted and evicted the headers that repeat, once per copy.
        mark_per_request(&mut headers, self.unit_header.as_ref());
        let finished = Arc::new(mirror::Finished {
            model: model.to_string(),
            production: routed.route.clone(),
            request_id: a.request_id.clone(),
            time_ms: a.arrival_ms,
            path: a.method.clone(),
            headers,
            body,
            request: forwarded.request.clone(),
            answer: forwarded.response.clone(),
            latency: forwarded.upstream_latency.unwrap_or_default(),
            traceparent,
        });
        let dropped = self.mirror.dispatch(finished, &all, &taken);
        (skipped, dropped)
    }

    fn count(
        &self,
        route: Option<&Route>,
        experiment: Option<&(Arc<str>, Arc<str>)>,
        code: Code,
        start: Instant,
    ) {
        self.metrics.observe_request(
            route.map(route_metrics),
            route.map(|r| (r.model.as_str(), r.version_label.as_str())),
            experiment,
            code,
            start.elapsed().as_secs_f64(),
        );
    }

    /// Routes a call for `model`: to its experiment variant (by the unit id under the
    /// experiment's unit key, in the headers or the request's parameters, or a forced variant)
    /// or to production. Returns what the call named either way.
    ///
    /// A call that names a version (OIP's `model_version`: a modelgate version number or alias)
    /// goes to that version, outside any experiment and shadow.
    fn decide(
        &self,
        a: &Admitted,
        model: &str,
        version: &str,
        headers: &HeaderMap,
        params: Option<&dyn InferRequest>,
    ) -> (Subject, Result<Routed, ProxyError>) {
        let mut subject = Subject {
            model: model.to_string(),
            unit_id: None,
        };
        let table = self.routing.load();
        if !version.is_empty() {
            let routed = table
                .version(model, version)
                .map(|route| Routed {
                    route,
                    experiment: None,
                    counted: false,
                    shadows: None,
                    suppressed: Vec::new(),
                })
                .map_err(|e| match e {
                    VersionLookup::UnknownModel => ProxyError::UnknownModel(model.to_string()),
                    VersionLookup::UnknownVersion => ProxyError::UnknownVersion {
                        model: model.to_string(),
                        version: version.to_string(),
                    },
                    VersionLookup::Archived(v) => ProxyError::ArchivedVersion {
                        model: model.to_string(),
                        version: v,
                    },
                });
            return (subject, routed);
        }
        let unit_key = table
            .experiment(model)
            .map(|e| e.unit_key.as_str())
            .unwrap_or(&self.limits.unit_key);
        // The parsed name when it is the default key (a `&str` name is parsed on every lookup).
        let unit_value = match &self.unit_header {
            Some(h) if h.as_str() == unit_key => header_str(headers, h),
            _ => non_empty_str(headers.get(unit_key)),
        };
        subject.unit_id = unit_value
            .map(str::to_string)
            .or_else(|| params.and_then(|p| p.parameter(unit_key)));
        let unit_id = subject.unit_id.as_deref().or(a.unit_id.as_deref());
        let forced = header_str(headers, &VARIANT);
        // The call's arrival time: one clock read fewer per call than asking again.
        let now = a.arrival_ms;
        let routed = match table.decide(model, unit_id, forced, now) {
            Ok(d) => {
                let mut shadows = None;
                let mut suppressed = Vec::new();
                // Shadows mirror production's traffic (not experiment variants), sampled by unit
                // id, else request id.
                if d.experiment.is_none() {
                    if let Some(all) = table.shadows(model) {
                        let key = unit_id.unwrap_or(&a.request_id);
                        let mut taken = Vec::new();
                        for (i, s) in all.iter().enumerate() {
                            if crate::shadow::sampled(model, key, s.sample_fraction) {
                                if s.breaker.allows(now) {
                                    taken.push(i);
                                } else {
                                    suppressed.push(s.route.version);
                                }
                            }
                        }
                        shadows = Some((all, taken));
                    }
                }
                Ok(Routed {
                    route: d.route,
                    experiment: d.experiment,
                    counted: d.counted,
                    shadows,
                    suppressed,
                })
            }
            Err(Lookup::NoProduction) => Err(ProxyError::NoProduction(model.to_string())),
            Err(_) => Err(ProxyError::UnknownModel(model.to_string())),
        };
        (subject, routed)
    }

    /// The deadline the caller set, if any.
    fn caller_deadline(headers: &HeaderMap) -> Option<Duration> {
        find_header(headers, &GRPC_TIMEOUT).and_then(status::parse_grpc_timeout)
    }

    /// The deadline of a unary call: the caller's, or `--request-timeout`.
    fn unary_deadline(&self, headers: &HeaderMap) -> Duration {
        Self::caller_deadline(headers).unwrap_or(self.limits.request_timeout)
    }

    /// An inference or another call that names a model: read its message (bounded, within the
    /// deadline), decode it, and route it by the model it names.
    async fn route_unary(
        &self,
        a: &Admitted,
        req: Request<Incoming>,
    ) -> Result<(Subject, Routed, Inbound), Box<Unrouted>> {
        let deadline = self.unary_deadline(req.headers());
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let limit = self.limits.max_message_bytes;
        let framed = match tokio::time::timeout(deadline, read_limited(body, limit)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(ReadError::TooLarge)) => {
                return Err(Unrouted::new(
                    Subject::default(),
                    0,
                    ProxyError::RequestTooLarge(limit),
                ))
            }
            Ok(Err(ReadError::Body(e))) => {
                return Err(Unrouted::new(
                    Subject::default(),
                    0,
                    ProxyError::ReadRequest(e),
                ))
            }
            Err(_) => {
                return Err(Unrouted::new(
                    Subject::default(),
                    0,
                    ProxyError::Deadline(deadline),
                ))
            }
        };
        let size = framed.len();
        let msg = a
            .protocol
            .message(&framed)
            .map_err(|e| Unrouted::new(Subject::default(), size, e))?;
        let (subject, routed, request, named) = match a.call {
            Call::Model(call) => {
                let (subject, routed, named) =
                    self.route_model_call(a, call, &msg, &parts.headers, size)?;
                (subject, routed, None, Some(named))
            }
            _ => {
                let m = a
                    .protocol
                    .decode_infer(&a.method, msg.clone())
                    .map_err(|e| Unrouted::new(Subject::default(), size, e))?;
                // Before routing, so that a refused call is neither counted by an experiment
                // nor copied to a shadow.
                if let Err(e) = m.check(self.limits.max_tensor_elements) {
                    let subject = Subject {
                        model: m.model().to_string(),
                        unit_id: None,
                    };
                    return Err(Unrouted::new(subject, size, e));
                }
                let (subject, routed) =
                    self.decide(a, m.model(), m.version(), &parts.headers, Some(&*m));
                match routed {
                    Ok(routed) => (subject, routed, Some(m), None),
                    Err(e) => return Err(Unrouted::new(subject, size, e)),
                }
            }
        };
        let call = UnaryCall {
            parts,
            framed,
            msg,
            request,
            named,
            deadline,
            started,
        };
        Ok((subject, routed, Inbound::Unary(call)))
    }

    /// A unary call that names a model in its message (metadata, readiness, Triton's config,
    /// statistics, repository and trace calls): routed by that name (and version). These calls
    /// are not traffic worth comparing: no shadow takes them.
    fn route_model_call(
        &self,
        a: &Admitted,
        call: ModelCall,
        msg: &Bytes,
        headers: &HeaderMap,
        size: usize,
    ) -> Result<(Subject, Routed, protocol::Named), Box<Unrouted>> {
        let named = a
            .protocol
            .named(&call, &a.method, msg)
            .map_err(|e| Unrouted::new(Subject::default(), size, e))?;
        let (subject, routed) = if named.model.is_empty() {
            if !call.optional {
                let e = ProtocolError::MissingModel(call.name);
                return Err(Unrouted::new(Subject::default(), size, e));
            }
            // Naming no model is allowed (Triton's server-wide trace settings): the default
            // model's server answers.
            let Some(model) = self.routing.load().default_model().map(str::to_string) else {
                let e = ProxyError::OipNoModel(a.method.clone());
                return Err(Unrouted::new(Subject::default(), size, e));
            };
            self.decide(a, &model, "", headers, None)
        } else {
            self.decide(a, &named.model, &named.version, headers, None)
        };
        match routed {
            Ok(mut routed) => {
                routed.shadows = None;
                Ok((subject, routed, named))
            }
            Err(e) => Err(Unrouted::new(subject, size, e)),
        }
    }

    /// A unary call, routed: the backend's name and version written in if the route says so,
    /// sent within what is left of the deadline, and its answer read whole.
    async fn forward_unary(
        &self,
        a: &Admitted,
        routed: &Routed,
        call: UnaryCall,
    ) -> (Forwarded, Result<Response<Body>, ProxyError>) {
        let mut forwarded = Forwarded {
            size: call.framed.len(),
            copy: routed
                .copied()
                .then(|| Copy::Unary(call.framed.clone(), call.parts.headers.clone())),
            ..Default::default()
        };
        let (request, named, deadline, started) =
            (call.request, call.named, call.deadline, call.started);
        let names = match (&request, &named) {
            (Some(r), _) => (r.model(), r.version()),
            (None, Some(n)) => (n.model.as_str(), n.version.as_str()),
            (None, None) => ("", ""),
        };
        let forward = match a.protocol.rewrite(&a.call, &call.msg, names, &routed.route) {
            Ok(Some(rewritten)) => a.protocol.body(&rewritten),
            Ok(None) => call.framed,
            Err(e) => return (forwarded, Err(e.into())),
        };
        forwarded.request = request;
        let left = deadline.saturating_sub(started.elapsed());
        let exchange = self.unary_exchange(
            a,
            routed,
            call.parts,
            forward,
            deadline,
            started,
            &mut forwarded,
        );
        let result = match tokio::time::timeout(left, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Deadline(deadline)),
        };
        (forwarded, result)
    }

    /// Sends a unary call and reads its answer whole; notes the upstream latency and, for a
    /// successful inference, the answer's message.
    #[allow(clippy::too_many_arguments)]
    async fn unary_exchange(
        &self,
        a: &Admitted,
        routed: &Routed,
        parts: http::request::Parts,
        forward: Bytes,
        deadline: Duration,
        started: Instant,
        forwarded: &mut Forwarded,
    ) -> Result<Response<Body>, ProxyError> {
        let route = &routed.route;
        let sent = Instant::now();
        let left = deadline.saturating_sub(sent.saturating_duration_since(started));
        let resp = self
            .send(
                Request::from_parts(parts, ()),
                upstream::Payload::Full(forward),
                route,
                &a.request_id,
                Some(left),
                a.span.as_ref(),
            )
            .await
            .map_err(|e| match e {
                // Report the caller's whole budget, not what was left of it.
                ProxyError::Deadline(_) => ProxyError::Deadline(deadline),
                e => e,
            })?;
        let (parts, body) = resp.into_parts();
        let broken = |reason| ProxyError::UpstreamBody {
            endpoint: route.endpoint.clone(),
            model: route.model.clone(),
            version: route.version,
            reason,
        };
        let collected = body::read_whole(body, self.limits.max_message_bytes)
            .await
            .map_err(|e| match e {
                body::ReadWholeError::TooLarge => broken(format!(
                    "answer larger than {} bytes (--max-message-bytes)",
                    self.limits.max_message_bytes
                )),
                body::ReadWholeError::Body(e) => match upstream::StreamFailure::of(&e) {
                    upstream::StreamFailure::Broken => broken(upstream::describe(&e)),
                    failure => ProxyError::failed(route, failure),
                },
            });
        let (data, trailers) = match collected {
            // An upstream that cancels the call at the deadline we passed on.
            Err(e) if ran_out(e.code(), started, deadline) => {
                return Err(ProxyError::Deadline(deadline))
            }
            other => other?,
        };
        forwarded.upstream_latency = Some(sent.elapsed());
        let code = trailers
            .as_ref()
            .and_then(status::code_from_headers)
            .or_else(|| status::code_from_headers(&parts.headers));
        if ran_out(code, started, deadline) {
            return Err(ProxyError::Deadline(deadline));
        }
        if code == Some(Code::Ok) && a.call == Call::Infer {
            forwarded.size += data.len();
            forwarded.response = a.protocol.message(&data).ok();
        }
        Ok(Response::from_parts(parts, unary_body(data, trailers)))
    }

    /// Reads and discards, in the background, the rest of the request body of a call modelgate
    /// answers early (shed, refused) — the answer itself leaves at once. Dropping the body unread
    /// would make HTTP/2 reset the stream, and the client's DATA frames still on the way would
    /// then meet a closed stream: h2 counts each of those as a protocol-error reset and, after
    /// 1,024 on a connection, sends GOAWAY ENHANCE_YOUR_CALM. Under overload, shedding would tear
    /// down the clients' connections and every call on them. A unary request's body has normally
    /// arrived already; one that is slow or huge is given up on after [`DRAIN_TIMEOUT`] or
    /// `--max-message-bytes`, and at most [`MAX_DRAINING`] bodies are drained at once (beyond
    /// that the body is dropped, and the stream reset, as before).
    fn drain(&self, mut body: Incoming) {
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        let draining = self.draining.clone();
        if draining.fetch_add(1, Ordering::AcqRel) >= MAX_DRAINING {
            draining.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let limit = self.limits.max_message_bytes;
        tokio::spawn(async move {
            let read = async {
                let mut n = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    n += frame.data_ref().map_or(0, Bytes::len);
                    if n > limit {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
            draining.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Any other call (and the protocol's calls that name no model): routed by `x-model-name`
    /// or the default model, without reading the body.
    fn route_pass_through(
        &self,
        a: &Admitted,
        req: Request<Incoming>,
    ) -> Result<(Subject, Routed, Inbound), Box<Unrouted>> {
        let (parts, body) = req.into_parts();
        let model = match parts.headers.get(MODEL_HEADER) {
            Some(v) => v
                .to_str()
                .map(str::to_string)
                .map_err(|_| ProxyError::BadModelHeader),
            None => self
                .routing
                .load()
                .default_model()
                .map(str::to_string)
                .ok_or(ProxyError::NoModel),
        };
        let (subject, routed) = match model {
            Ok(model) => self.decide(a, &model, "", &parts.headers, None),
            Err(e) => (Subject::default(), Err(e)),
        };
        match routed {
            Ok(routed) => Ok((subject, routed, Inbound::PassThrough(parts, body))),
            Err(e) => {
                self.drain(body);
                Err(Unrouted::new(subject, 0, e))
            }
        }
    }

    /// A pass-through call, routed: streamed both ways untouched (copied as it passes when a
    /// shadow takes it).
    async fn forward_pass_through(
        &self,
        a: &Admitted,
        routed: &Routed,
        parts: http::request::Parts,
        body: Incoming,
    ) -> (Forwarded, Result<Response<Body>, ProxyError>) {
        let mut forwarded = Forwarded::default();
        let deadline = Self::caller_deadline(&parts.headers);
        let body = if routed.copied() {
            let (request, response) = (body::TeeSlot::default(), body::TeeSlot::default());
            forwarded.copy = Some(Copy::Tee(request.clone(), response, parts.headers.clone()));
            Body::new(body::Tee::new(body, self.limits.max_message_bytes, request))
        } else {
            Body::new(body)
        };
        let sent = Instant::now();
        let send = self.send(
            Request::from_parts(parts, ()),
            upstream::Payload::Stream(body),
            &routed.route,
            &a.request_id,
            deadline,
            a.span.as_ref(),
        );
        let resp = match deadline {
            Some(d) => tokio::time::timeout(d, send)
                .await
                .unwrap_or(Err(ProxyError::Deadline(d))),
            None => send.await,
        };
        // For a stream, the time until the upstream's response headers.
        forwarded.upstream_latency = Some(sent.elapsed());
        let result = resp.map(|resp| self.rescued(&routed.route, resp));
        (forwarded, result)
    }

    /// A streamed answer that ends with a gRPC status when its upstream fails midway (see
    /// [`body::Rescue`]), the failure counted as the upstream's.
    fn rescued(&self, route: &Arc<Route>, resp: Response<Body>) -> Response<Body> {
        let (metrics, route) = (self.metrics.clone(), route.clone());
        resp.map(|b| {
            Body::new(body::Rescue::new(b, move |e| {
                let error = match upstream::StreamFailure::of(e) {
                    upstream::StreamFailure::Broken => ProxyError::UpstreamBody {
                        endpoint: route.endpoint.clone(),
                        model: route.model.clone(),
                        version: route.version,
                        reason: upstream::describe(e),
                    },
                    failure => ProxyError::failed(&route, failure),
                };
                error.count(&metrics);
                status::trailers(error.status())
            }))
        })
    }

    /// Sends a request to a route's upstream and returns its response head and streaming body.
    /// The deadline itself is enforced by the caller (a timeout around the call); here it is
    /// only passed on, as the time that is left, in `grpc-timeout`.
    async fn send(
        &self,
        mut head: Request<()>,
        payload: upstream::Payload,
        route: &Route,
        request_id: &str,
        deadline: Option<Duration>,
        span: Option<&crate::traces::RequestSpan>,
    ) -> Result<Response<Body>, ProxyError> {
        set_header(head.headers_mut(), REQUEST_ID, request_id);
        if let Some(d) = deadline {
            head.headers_mut()
                .insert(GRPC_TIMEOUT, status::encode_grpc_timeout(d));
        }
        mark_per_request(head.headers_mut(), self.unit_header.as_ref());
        let child = match (&self.traces, span) {
            (Some(t), Some(s)) => Some(t.upstream(s, &route.endpoint, head.headers_mut())),
            _ => None,
        };
        let sent = Instant::now();
        let result = async {
            // Boxed where it is made: a future is copied each time it is moved into the one that
            // awaits it, and this one (the HTTP/2 exchange) would otherwise be copied into every
            // level above, up to the task (see `accept`).
            let resp = Box::pin(self.upstreams.send_to(route, head, payload))
                .await
                .map_err(|e| match e.failure() {
                    None => ProxyError::Unreachable {
                        endpoint: route.endpoint.clone(),
                        model: route.model.clone(),
                        version: route.version,
                        reason: upstream::describe(&e),
                    },
                    // The call started; its connection broke before the answer.
                    Some(upstream::StreamFailure::Broken) => ProxyError::UpstreamBody {
                        endpoint: route.endpoint.clone(),
                        model: route.model.clone(),
                        version: route.version,
                        reason: upstream::describe(&e),
                    },
                    Some(failure) => ProxyError::failed(route, failure),
                })?;
            if resp.status() != http::StatusCode::OK {
                return Err(ProxyError::UpstreamHttp {
                    endpoint: route.endpoint.clone(),
                    model: route.model.clone(),
                    version: route.version,
                    status: resp.status(),
                });
            }
            if let Some(d) = deadline {
                if ran_out(status::code_from_headers(resp.headers()), sent, d) {
                    return Err(ProxyError::Deadline(d));
                }
            }
            Ok(resp)
        }
        .await
        .map_err(|e| match deadline {
            // An upstream that reset the call at the deadline we passed on.
            Some(d) if ran_out(e.code(), sent, d) => ProxyError::Deadline(d),
            _ => e,
        });
        if let Some(c) = child {
            c.end(result.as_ref().err().map(ToString::to_string));
        }
        result
    }
}

/// The route's metric handles, cached on it.
fn route_metrics(r: &Route) -> &crate::telemetry::RouteMetrics {
    r.metrics
        .get_or_init(crate::telemetry::RouteMetrics::default)
}

/// Whether an upstream's status means the caller's deadline ran out: the upstream enforces the
/// `grpc-timeout` we forward and answers DEADLINE_EXCEEDED — or CANCELLED, as tonic servers do —
/// which the caller should see as DEADLINE_EXCEEDED either way.
fn ran_out(code: Option<Code>, since: Instant, deadline: Duration) -> bool {
    matches!(code, Some(Code::DeadlineExceeded | Code::Cancelled)) && since.elapsed() >= deadline
}

enum ReadError {
    TooLarge,
    Body(String),
}

async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, ReadError> {
    match body::read_whole(body, limit).await {
        Ok((data, _)) => Ok(data),
        Err(body::ReadWholeError::TooLarge) => Err(ReadError::TooLarge),
        Err(body::ReadWholeError::Body(e)) => Err(ReadError::Body(upstream::describe(&e))),
    }
}

/// How long the rest of a refused call's request body is read for, at most.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Refused calls' bodies drained at once, at most: generous, because under overload refusals
/// come by the tens of thousands per second and a drain that cannot start resets a stream; a
/// drain task holds no more than a task's memory (the body is discarded as it is read).
const MAX_DRAINING: usize = 16_384;

/// The body of an upstream's unary answer read whole, to forward: the data and trailers as they
/// came. An answer that ended with its headers (a trailers-only error: the status is in the
/// headers) gets a body that has ended already, so that the response's HEADERS frame carries
/// END_STREAM again — gRPC clients other than tonic (grpc-go, gRPC C core, so grpcurl and
/// tritonclient) read a status from the headers only then, and otherwise report a stream closed
/// without trailers.
fn unary_body(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None if data.is_empty() => Body::empty(),
        trailers => Body::new(Full::new(data).with_trailers(async move { trailers.map(Ok) })),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    non_empty_str(find_header(headers, name))
}

fn non_empty_str(value: Option<&HeaderValue>) -> Option<&str> {
    value
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

/// Maps with at most this many values are scanned by [`find_header`] rather than hashed.
const SCAN_LIMIT: usize = 16;

/// The first value of `name` in `headers`, as `HeaderMap::get` gives it. A call's header maps hold
/// a handful of fields, and the map's lookup hashes a custom name byte by byte before probing:
/// 110–176 instructions a lookup (callgrind, h2load), ~12 lookups a call, most of the names
/// absent. Scanning, comparing names as it goes (a standard name against a custom one is one
/// comparison of their kinds), measured 94–131 a lookup: less, though `HeaderMap`'s iterator
/// also walks each entry's extra-value links.
pub(crate) fn find_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<&'a HeaderValue> {
    if headers.len() > SCAN_LIMIT {
        return headers.get(name);
    }
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Headers whose value changes with every request (ids, deadlines, trace context, the unit id).
const PER_REQUEST_HEADERS: [HeaderName; 6] = [
    REQUEST_ID,
    CLIENT_REQUEST_ID,
    GRPC_TIMEOUT,
    TRACEPARENT,
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("x-user-id"),
];

/// Marks per-request header values so that HPACK sends them as literals and keeps them out of
/// the connection's header table. Indexed, each new value would evict the headers that repeat
/// (content-type, user-agent, te…), and every request would pay to search and rebuild the table
/// (the load benchmark's profile showed HPACK among the largest costs before this).
/// One pass over the map comparing names: looking each of the seven names up hashed each one, 1.2%
/// of modelgate's instructions per call.
fn mark_per_request(headers: &mut HeaderMap, unit_key: Option<&HeaderName>) {
    for (name, v) in headers.iter_mut() {
        if PER_REQUEST_HEADERS.contains(name) || unit_key == Some(name) {
            v.set_sensitive(true);
        }
    }
}

/// The caller's `x-request-id` when it is a sane token (visible ASCII, at most 128 bytes), else a
/// new UUIDv7 (time-ordered, so records sort by arrival).
fn request_id(headers: &HeaderMap) -> String {
    if let Some(s) = header_str(headers, &CLIENT_REQUEST_ID) {
        if crate::record::validate_request_id(s).is_ok() {
            return s.to_string();
        }
    }
    // Each data thread keeps its own v7 counter: `Uuid::now_v7` shares one behind a mutex, whose
    // lock and unlock pulled a cache line from the other data thread's core on every generated
    // id. Ids still increase within a thread (and across threads by millisecond); the record
    // writer sorts each batch anyway (`store::records`).
    thread_local! {
        static IDS: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    let id = IDS.with(|c| uuid::Uuid::new_v7(uuid::Timestamp::now(c)));
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut text).to_string()
}

/// The size of a request's header block as HTTP/2 counts it for SETTINGS_MAX_HEADER_LIST_SIZE
/// (RFC 9113 §6.5.2): name and value lengths plus 32 per field, pseudo-header fields included.
fn header_list_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let pseudo = [
        (":method", req.method().as_str().len()),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path",
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo.iter().map(|(n, v)| n.len() + v + 32).sum();
    pseudo
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_output<A, B, F: FnOnce(A, B) -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn per_request_values_are_kept_out_of_the_hpack_table_and_the_rest_are_not() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.append("x-request-id", HeaderValue::from_static("a"));
        h.append("x-request-id", HeaderValue::from_static("b"));
        h.insert("traceparent", HeaderValue::from_static("00-1-2-01"));
        h.insert("x-tenant", HeaderValue::from_static("t1"));
        h.insert("x-other", HeaderValue::from_static("o"));
        mark_per_request(&mut h, Some(&HeaderName::from_static("x-tenant")));
        let sensitive = |name: &str| h.get_all(name).iter().all(|v| v.is_sensitive());
        assert!(sensitive("x-request-id") && sensitive("traceparent") && sensitive("x-tenant"));
        assert!(!h["content-type"].is_sensitive() && !h["x-other"].is_sensitive());
    }

    /// A call's future is moved into its task and into every future that awaits it, a copy of
    /// its whole size each time: the large rare parts (connecting, streams, the HTTP/2 exchange,
    /// REST backends) are boxed so that what every call carries stays small. Before, `handle`'s
    /// future was 9,008 bytes and memmove was 16% of modelgate's CPU under h2load.
    #[test]
    fn a_calls_future_stays_small() {
        let serve =
            size_of_output(|p: Arc<Proxy>, (a, r): (Admitted, Request<Incoming>)| p.serve(a, r));
        assert!(serve <= 4096, "Proxy::serve's future is {serve} bytes");
        // What a call waiting for a slot holds instead (`Proxy::call`).
        let queue =
            size_of_output(|p: Arc<Proxy>, (a, r): (Admitted, Request<Incoming>)| p.queue(a, r));
        assert!(
            queue * 2 <= serve,
            "a waiting call's future is {queue} bytes, a served call's {serve}"
        );
        let send = size_of_output(|p: &Proxy, (r, h): (&Route, Request<()>)| {
            p.send(h, upstream::Payload::Full(Bytes::new()), r, "", None, None)
        });
        assert!(send <= 1536, "Proxy::send's future is {send} bytes");
    }

    #[test]
    fn client_request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(CLIENT_REQUEST_ID_HEADER, HeaderValue::from_static("req-42"));
        assert_eq!(request_id(&h), "req-42");
        h.insert(
            CLIENT_REQUEST_ID_HEADER,
            HeaderValue::from_static("has space"),
        );
        let generated = request_id(&h);
        let id = uuid::Uuid::parse_str(&generated).unwrap();
        assert_eq!(id.get_version_num(), 7);
    }

    /// Generated ids keep arrival order within a millisecond too (a v7 counter per thread): the
    /// record writer's batches then mostly arrive in key order (`store::records`).
    #[test]
    fn generated_request_ids_increase() {
        let ids: Vec<String> = (0..2000).map(|_| request_id(&HeaderMap::new())).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    }
}
