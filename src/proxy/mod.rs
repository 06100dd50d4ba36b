//! The data plane: an HTTP/2 gRPC server that routes each call to a model version's upstream.
//!
//! [`Proxy::handle`] is the whole request path, in order: request id → in-flight limit →
//! classify → route → forward → response headers → observe the end of the response (metrics,
//! in-flight release). Open Inference Protocol unary calls are read whole (bounded), routed by the
//! model name in the message, and their answers are read whole within the deadline; every other
//! call is streamed through untouched.

pub mod accept;
pub mod body;
pub mod mirror;
pub mod status;
pub mod stream;
pub mod upstream;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
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

/// Limits of the data plane.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests in flight beyond which new ones are shed.
    pub max_in_flight: usize,
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
    #[error("model '{model}' has no version '{version}' (model_version names a modelgate version: a number or an alias)")]
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

/// Releases one in-flight slot when dropped.
struct InFlight {
    counter: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    fn acquire(counter: &Arc<AtomicUsize>, max: usize, metrics: &Arc<Metrics>) -> Option<Self> {
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            counter: counter.clone(),
            metrics: metrics.clone(),
        };
        metrics.in_flight.inc();
        (prev < max).then_some(guard)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
        self.metrics.in_flight.dec();
    }
}

/// What handling a request learned, for its record.
#[derive(Default)]
struct Exchange {
    /// The model the call named.
    model: String,
    route: Option<Arc<Route>>,
    /// Experiment and variant, when the request is in one.
    experiment: Option<(Arc<str>, Arc<str>)>,
    /// Whether it counts in the experiment (not forced).
    counted: bool,
    unit_id: Option<String>,
    upstream_latency: Option<Duration>,
    /// The inference request, decoded by its protocol.
    request: Option<Arc<dyn InferRequest>>,
    /// The answer's message when it succeeded (inferences only).
    response: Option<Bytes>,
    size: usize,
    /// The model's shadows and which of them take this request.
    shadows: Option<(Arc<[LiveShadow]>, Vec<usize>)>,
    /// The request as received, and its headers, when shadows take it.
    request_copy: Option<(Bytes, HeaderMap)>,
    /// Shadow versions that sampled this request but are down (breaker open).
    shadow_suppressed: Vec<u32>,
    /// Pass-through calls that shadows take: copies of the request and response bodies, and the
    /// request headers.
    tee: Option<(body::TeeSlot, body::TeeSlot, HeaderMap)>,
    /// The request's trace span, when traces are exported.
    span: Option<crate::traces::RequestSpan>,
    /// A stream whose inferences are recorded one by one (`ModelStreamInfer`), not as one call.
    streamed: bool,
}

/// The data-plane request handler.
pub struct Proxy {
    routing: Arc<ArcSwap<RoutingTable>>,
    upstreams: Arc<upstream::Upstreams>,
    local: tonic::service::Routes,
    limits: Limits,
    in_flight: Arc<AtomicUsize>,
    /// Request bodies of refused calls being drained (see [`Proxy::drain`]).
    draining: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    recorder: Arc<Recorder>,
    mirror: mirror::Mirror,
    traces: Option<Arc<crate::traces::Traces>>,
    /// Arrival times, experiment time windows, shadow breakers.
    clock: crate::clock::SharedClock,
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
        Proxy {
            routing,
            upstreams,
            local,
            limits,
            in_flight: Arc::new(AtomicUsize::new(0)),
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
            in_flight: self.in_flight.clone(),
            draining: self.draining.clone(),
            metrics: self.metrics.clone(),
            recorder: self.recorder.clone(),
            traces: self.traces.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Serves one request. Never fails: every error is a gRPC status.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let arrival_ms = self.clock.now_ms();
        let request_id = request_id(req.headers());
        let method = req.uri().path().to_string();
        let (protocol, call) = protocol::classify(&method);
        let mut ex = Exchange {
            unit_id: header_str(req.headers(), &self.limits.unit_key).map(str::to_string),
            span: (call != Call::Local)
                .then(|| {
                    self.traces
                        .as_ref()
                        .map(|t| t.request(req.headers(), &method))
                })
                .flatten(),
            ..Default::default()
        };
        let Some(guard) =
            InFlight::acquire(&self.in_flight, self.limits.max_in_flight, &self.metrics)
        else {
            self.metrics.shed.inc();
            let mut resp = protocol.error_response(Status::resource_exhausted(format!(
                "modelgate is serving its limit of {} requests (--max-in-flight); retry with backoff",
                self.limits.max_in_flight
            )));
            ex.model = header_str(req.headers(), MODEL_HEADER)
                .unwrap_or_default()
                .to_string();
            self.drain(req.into_body());
            self.finish(
                ex,
                request_id.clone(),
                method,
                arrival_ms,
                Code::ResourceExhausted,
                start,
            );
            set_header(resp.headers_mut(), REQUEST_ID_HEADER, &request_id);
            return resp;
        };

        let header_bytes = header_list_size(&req);
        let result = match call {
            _ if header_bytes > self.limits.max_header_bytes => {
                self.drain(req.into_body());
                Err(ProxyError::HeadersTooLarge {
                    size: header_bytes,
                    limit: self.limits.max_header_bytes,
                })
            }
            Call::Local => Ok(self
                .local
                .clone()
                .oneshot(req)
                .await
                .unwrap_or_else(|e: Infallible| match e {})),
            Call::Infer | Call::Model(_) => {
                self.unary(req, protocol, call, &mut ex, &request_id).await
            }
            Call::Stream => self.stream(req, protocol, &mut ex, &request_id).await,
            Call::Server(c) => self.server(req, protocol, c, &mut ex, &request_id).await,
            Call::Unnamed => match self.pass_through(req, &mut ex, &request_id).await {
                Err(ProxyError::NoModel) => Err(ProxyError::OipNoModel(method.clone())),
                other => other,
            },
            Call::PassThrough => self.pass_through(req, &mut ex, &request_id).await,
        };
        let mut resp = result.unwrap_or_else(|e| {
            e.count(&self.metrics);
            protocol.error_response(e.status())
        });

        set_header(resp.headers_mut(), REQUEST_ID_HEADER, &request_id);
        mark_per_request(resp.headers_mut(), &self.limits.unit_key);
        if let Some(r) = &ex.route {
            set_header(resp.headers_mut(), VERSION_HEADER, &r.version_label);
        }
        if let Some((experiment, variant)) = &ex.experiment {
            set_header(resp.headers_mut(), EXPERIMENT_HEADER, experiment);
            set_header(resp.headers_mut(), VARIANT_HEADER, variant);
        }
        if let Some((_, response, _)) = &ex.tee {
            let (slot, limit) = (response.clone(), self.limits.max_message_bytes);
            resp = resp.map(|b| Body::new(body::Tee::new(b, limit, slot)));
        }
        let header_code = status::code_from_headers(resp.headers());
        let this = self.clone();
        resp.map(move |b| {
            Body::new(Observed::new(b, header_code, move |ending| {
                let code = match ending {
                    Ending::Status(c) => c,
                    Ending::NoStatus => Code::Unknown,
                    Ending::Error => Code::Unavailable,
                    Ending::Cancelled => Code::Cancelled,
                };
                if call != Call::Local {
                    this.finish(ex, request_id, method, arrival_ms, code, start);
                } else {
                    this.count(None, None, code, start);
                }
                drop(guard);
            }))
        })
    }

    /// Counts a finished request and hands its record to the recorder.
    fn finish(
        &self,
        mut ex: Exchange,
        request_id: String,
        method: String,
        time_ms: u64,
        code: Code,
        start: Instant,
    ) {
        self.count(ex.route.as_deref(), ex.experiment.as_ref(), code, start);

        if let (Some(r), Some(latency)) = (&ex.route, ex.upstream_latency) {
            self.metrics
                .upstream_histogram(route_metrics(r), &r.endpoint)
                .observe(latency.as_secs_f64());
        }
        let unit_id = ex.unit_id.or_else(|| {
            ex.request
                .as_ref()
                .and_then(|r| r.parameter(&self.limits.unit_key))
        });
        let traceparent = match (&self.traces, &ex.span) {
            (Some(t), Some(s)) => t.traceparent(s),
            _ => None,
        };
        if let Some(span) = ex.span.take() {
            span.finish(crate::traces::Outcome {
                model: &ex.model,
                version: ex.route.as_ref().map(|r| r.version),
                experiment: ex.experiment.as_ref().map(|(e, v)| (&**e, &**v)),
                request_id: &request_id,
                code,
            });
        }
        if let Some((request, response, headers)) = ex.tee.take() {
            ex.request_copy = request.lock().take().map(|r| (r, headers));
            ex.response = response.lock().take().filter(|_| code == Code::Ok);
        }
        if ex.streamed {
            return;
        }
        let (shadow_skipped, shadow_dropped) = self.mirror_finished(
            &mut ex.shadows,
            &ex.shadow_suppressed,
            &mut ex.request_copy,
            &ex.request,
            &ex.response,
            &ex.route,
            &ex.model,
            &request_id,
            &method,
            time_ms,
            ex.upstream_latency,
            traceparent,
        );
        let shadowed = !(shadow_skipped.is_empty()
            && shadow_dropped.is_empty()
            && ex.shadow_suppressed.is_empty());
        if !self
            .recorder
            .wanted(&ex.model, ex.experiment.is_some(), shadowed)
        {
            return;
        }
        self.recorder.submit(RawRecord {
            request_id,
            time_ms,
            method,
            model: ex.model,
            route: ex.route,
            experiment: ex.experiment.as_ref().map(|(e, _)| e.to_string()),
            variant: ex.experiment.as_ref().map(|(_, v)| v.to_string()),
            counted: ex.counted,
            unit_id,
            status: code as i32,
            upstream_latency: ex.upstream_latency,
            latency: start.elapsed(),
            request: ex.request,
            response: ex.response,
            size: ex.size,
            shadow_skipped,
            shadow_dropped,
            shadow_suppressed: ex.shadow_suppressed,
        });
    }

    /// Sends the copies of a finished request to the shadows that sampled it. Returns the
    /// versions that skipped it and those whose copy was dropped.
    #[allow(clippy::too_many_arguments)]
    fn mirror_finished(
        &self,
        shadows: &mut Option<(Arc<[LiveShadow]>, Vec<usize>)>,
        suppressed: &[u32],
        copy: &mut Option<(Bytes, HeaderMap)>,
        decoded: &Option<Arc<dyn InferRequest>>,
        response: &Option<Bytes>,
        route: &Option<Arc<Route>>,
        model: &str,
        request_id: &str,
        method: &str,
        time_ms: u64,
        latency: Option<Duration>,
        traceparent: Option<HeaderValue>,
    ) -> (Vec<u32>, Vec<u32>) {
        let Some((all, taken)) = shadows.take() else {
            return (Vec::new(), Vec::new());
        };
        // Not sampled: skipped. (Sampled but suppressed by an open breaker are counted apart.)
        let skipped = all
            .iter()
            .enumerate()
            .filter(|(i, s)| !taken.contains(i) && !suppressed.contains(&s.route.version))
            .map(|(_, s)| s.route.version)
            .collect();
        let (Some((request, headers)), Some(production)) = (copy.take(), route.clone()) else {
            return (skipped, Vec::new());
        };
        let finished = Arc::new(mirror::Finished {
            model: model.to_string(),
            production,
            request_id: request_id.to_string(),
            time_ms,
            path: method.to_string(),
            headers,
            body: request,
            request: decoded.clone(),
            answer: response.clone(),
            latency: latency.unwrap_or_default(),
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

    /// Routes a request for `model`: to its experiment variant (by the unit id under the
    /// experiment's unit key, in the headers or the request's parameters, or a forced variant) or to
    /// production. Records the decision in `ex`.
    ///
    /// A call that names a version (OIP's `model_version`: a modelgate version number or alias)
    /// goes to that version, outside any experiment and shadow.
    fn decide(
        &self,
        model: &str,
        version: &str,
        headers: &HeaderMap,
        params: Option<&dyn InferRequest>,
        request_id: &str,
        ex: &mut Exchange,
    ) -> Result<Arc<Route>, ProxyError> {
        ex.model = model.to_string();
        let table = self.routing.load();
        if !version.is_empty() {
            let route = table.version(model, version).map_err(|e| match e {
                VersionLookup::UnknownModel => ProxyError::UnknownModel(model.to_string()),
                VersionLookup::UnknownVersion => ProxyError::UnknownVersion {
                    model: model.to_string(),
                    version: version.to_string(),
                },
                VersionLookup::Archived(v) => ProxyError::ArchivedVersion {
                    model: model.to_string(),
                    version: v,
                },
            })?;
            ex.route = Some(route.clone());
            return Ok(route);
        }
        let unit_key = table
            .experiment(model)
            .map(|e| e.unit_key.as_str())
            .unwrap_or(&self.limits.unit_key);
        if let Some(u) = header_str(headers, unit_key)
            .map(str::to_string)
            .or_else(|| params.and_then(|p| p.parameter(unit_key)))
        {
            ex.unit_id = Some(u);
        }
        let forced = header_str(headers, VARIANT_HEADER);
        let now = self.clock.now_ms();
        match table.decide(model, ex.unit_id.as_deref(), forced, now) {
            Ok(d) => {
                // Shadows mirror production's traffic (not experiment variants), sampled by unit
                // id, else request id.
                if d.experiment.is_none() {
                    if let Some(shadows) = table.shadows(model) {
                        let key = ex.unit_id.as_deref().unwrap_or(request_id);
                        let mut taken = Vec::new();
                        for (i, s) in shadows.iter().enumerate() {
                            if crate::shadow::sampled(model, key, s.sample_fraction) {
                                if s.breaker.allows(now) {
                                    taken.push(i);
                                } else {
                                    ex.shadow_suppressed.push(s.route.version);
                                }
                            }
                        }
                        ex.shadows = Some((shadows, taken));
                    }
                }
                ex.route = Some(d.route.clone());
                ex.experiment = d.experiment;
                ex.counted = d.counted;
                Ok(d.route)
            }
            Err(Lookup::NoProduction) => Err(ProxyError::NoProduction(model.to_string())),
            Err(_) => Err(ProxyError::UnknownModel(model.to_string())),
        }
    }

    /// The deadline the caller set, if any.
    fn caller_deadline(headers: &HeaderMap) -> Option<Duration> {
        headers
            .get("grpc-timeout")
            .and_then(status::parse_grpc_timeout)
    }

    /// ModelInfer, ModelMetadata, ModelReady: read the message, route by its model name,
    /// rewrite the backend name and version if the route says so, and read the answer whole.
    async fn unary(
        &self,
        req: Request<Incoming>,
        protocol: &'static dyn Protocol,
        call: Call,
        ex: &mut Exchange,
        request_id: &str,
    ) -> Result<Response<Body>, ProxyError> {
        let deadline = Self::caller_deadline(req.headers()).unwrap_or(self.limits.request_timeout);
        let started = Instant::now();
        let work = async {
            let (parts, body) = req.into_parts();
            let bytes = read_limited(body, self.limits.max_message_bytes)
                .await
                .map_err(|e| match e {
                    ReadError::TooLarge => {
                        ProxyError::RequestTooLarge(self.limits.max_message_bytes)
                    }
                    ReadError::Body(e) => ProxyError::ReadRequest(e),
                })?;
            ex.size = bytes.len();
            let (route, forward) = match call {
                Call::Model(m) => self.route_model_call(
                    protocol,
                    m,
                    parts.uri.path(),
                    bytes,
                    &parts.headers,
                    request_id,
                    ex,
                )?,
                _ => {
                    let (req, route, forward) =
                        self.route_infer(protocol, bytes, &parts.headers, request_id, ex)?;
                    ex.request = Some(req);
                    (route, forward)
                }
            };
            let left = deadline.saturating_sub(started.elapsed());
            let sent = Instant::now();
            let resp = self
                .send(
                    Request::from_parts(parts, ()),
                    upstream::Payload::Full(forward),
                    &route,
                    request_id,
                    Some(left),
                    ex.span.as_ref(),
                )
                .await
                .map_err(|e| match e {
                    // Report the caller's whole budget, not what was left of it.
                    ProxyError::Deadline(_) => ProxyError::Deadline(deadline),
                    e => e,
                })?;
            let (parts, body) = resp.into_parts();
            let collected = Limited::new(body, self.limits.max_message_bytes)
                .collect()
                .await
                .map_err(|e| match upstream::StreamFailure::of(&*e) {
                    upstream::StreamFailure::Broken => ProxyError::UpstreamBody {
                        endpoint: route.endpoint.clone(),
                        model: route.model.clone(),
                        version: route.version,
                        reason: upstream::describe(&*e),
                    },
                    failure => ProxyError::failed(&route, failure),
                });
            let collected = match collected {
                // An upstream that cancels the call at the deadline we passed on.
                Err(e) if ran_out(e.code(), started, deadline) => {
                    return Err(ProxyError::Deadline(deadline))
                }
                other => other?,
            };
            ex.upstream_latency = Some(sent.elapsed());
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            let code = trailers
                .as_ref()
                .and_then(status::code_from_headers)
                .or_else(|| status::code_from_headers(&parts.headers));
            if ran_out(code, started, deadline) {
                return Err(ProxyError::Deadline(deadline));
            }
            let ok = code == Some(Code::Ok);
            if ok && call == Call::Infer {
                ex.size += data.len();
                ex.response = protocol.message(&data).ok();
            }
            Ok(Response::from_parts(parts, unary_body(data, trailers)))
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Deadline(deadline)),
        }
    }

    /// Decodes an inference request, checks its tensors against the limits, finds the route for
    /// the model (and version) it names, and returns the bytes to forward: the caller's own,
    /// unless the backend model name or version must be written in.
    #[allow(clippy::type_complexity)]
    fn route_infer(
        &self,
        protocol: &'static dyn Protocol,
        framed: Bytes,
        headers: &HeaderMap,
        request_id: &str,
        ex: &mut Exchange,
    ) -> Result<(Arc<dyn InferRequest>, Arc<Route>, Bytes), ProxyError> {
        let msg = protocol.message(&framed)?;
        let m = protocol.decode_infer(msg.clone())?;
        // Before routing, so that a refused call is neither counted by an experiment nor copied
        // to a shadow.
        m.check(self.limits.max_tensor_elements)
            .inspect_err(|_| ex.model = m.model().to_string())?;
        let route = self.decide(m.model(), m.version(), headers, Some(&*m), request_id, ex)?;
        if ex
            .shadows
            .as_ref()
            .is_some_and(|(_, taken)| !taken.is_empty())
        {
            ex.request_copy = Some((framed.clone(), headers.clone()));
        }
        let forward =
            match protocol.rewrite(&Call::Infer, &msg, (m.model(), m.version()), &route)? {
                Some(rewritten) => protocol.body(&rewritten),
                None => framed,
            };
        Ok((m, route, forward))
    }

    /// A unary call that names a model in its message (metadata, readiness, Triton's config,
    /// statistics, repository and trace calls): routed by that name (and version), with the
    /// backend's name and version written in. These calls are not traffic worth comparing: no
    /// shadow takes them.
    #[allow(clippy::too_many_arguments)]
    fn route_model_call(
        &self,
        protocol: &'static dyn Protocol,
        call: ModelCall,
        method: &str,
        framed: Bytes,
        headers: &HeaderMap,
        request_id: &str,
        ex: &mut Exchange,
    ) -> Result<(Arc<Route>, Bytes), ProxyError> {
        let msg = protocol.message(&framed)?;
        let named = protocol.named(&call, &msg)?;
        let route = if named.model.is_empty() {
            if !call.optional {
                return Err(ProtocolError::MissingModel(call.name).into());
            }
            // Naming no model is allowed (Triton's server-wide trace settings): the default
            // model's server answers.
            let model = self
                .routing
                .load()
                .default_model()
                .ok_or_else(|| ProxyError::OipNoModel(method.to_string()))?
                .to_string();
            self.decide(&model, "", headers, None, request_id, ex)?
        } else {
            self.decide(&named.model, &named.version, headers, None, request_id, ex)?
        };
        ex.shadows = None;
        let forward = match protocol.rewrite(
            &Call::Model(call),
            &msg,
            (&named.model, &named.version),
            &route,
        )? {
            Some(rewritten) => protocol.body(&rewritten),
            None => framed,
        };
        Ok((route, forward))
    }

    /// ServerLive / ServerReady / ServerMetadata: the default model's upstream answers when there
    /// is one; otherwise modelgate answers for itself.
    async fn server(
        &self,
        req: Request<Incoming>,
        protocol: &'static dyn Protocol,
        call: ServerCall,
        ex: &mut Exchange,
        request_id: &str,
    ) -> Result<Response<Body>, ProxyError> {
        if self.routing.load().default_model().is_some() {
            return self.pass_through(req, ex, request_id).await;
        }
        let ready = call == ServerCall::Ready && self.routing.load().routed_models() > 0;
        Ok(protocol.server_response(call, ready))
    }

    /// Any other call: streamed both ways, routed by `x-model-name` or the default model.
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

    /// The route of a pass-through call, from `x-model-name` or the default model.
    fn pass_through_route(
        &self,
        headers: &HeaderMap,
        ex: &mut Exchange,
        request_id: &str,
    ) -> Result<Arc<Route>, ProxyError> {
        let model = match headers.get(MODEL_HEADER) {
            Some(v) => v
                .to_str()
                .map_err(|_| ProxyError::BadModelHeader)?
                .to_string(),
            None => self
                .routing
                .load()
                .default_model()
                .ok_or(ProxyError::NoModel)?
                .to_string(),
        };
        self.decide(&model, "", headers, None, request_id, ex)
    }

    async fn pass_through(
        &self,
        req: Request<Incoming>,
        ex: &mut Exchange,
        request_id: &str,
    ) -> Result<Response<Body>, ProxyError> {
        let route = match self.pass_through_route(req.headers(), ex, request_id) {
            Ok(route) => route,
            Err(e) => {
                self.drain(req.into_body());
                return Err(e);
            }
        };
        let deadline = Self::caller_deadline(req.headers());
        let (parts, body) = req.into_parts();
        let body = if ex
            .shadows
            .as_ref()
            .is_some_and(|(_, taken)| !taken.is_empty())
        {
            let (request, response) = (body::TeeSlot::default(), body::TeeSlot::default());
            ex.tee = Some((request.clone(), response, parts.headers.clone()));
            Body::new(body::Tee::new(body, self.limits.max_message_bytes, request))
        } else {
            Body::new(body)
        };
        let sent = Instant::now();
        let send = self.send(
            Request::from_parts(parts, ()),
            upstream::Payload::Stream(body),
            &route,
            request_id,
            deadline,
            ex.span.as_ref(),
        );
        let resp = match deadline {
            Some(d) => tokio::time::timeout(d, send)
                .await
                .unwrap_or(Err(ProxyError::Deadline(d))),
            None => send.await,
        };
        // For a stream, the time until the upstream's response headers.
        ex.upstream_latency = Some(sent.elapsed());
        Ok(self.rescued(&route, resp?))
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
        set_header(head.headers_mut(), REQUEST_ID_HEADER, request_id);
        if let Some(d) = deadline {
            head.headers_mut()
                .insert("grpc-timeout", status::encode_grpc_timeout(d));
        }
        mark_per_request(head.headers_mut(), &self.limits.unit_key);
        let child = match (&self.traces, span) {
            (Some(t), Some(s)) => Some(t.upstream(s, &route.endpoint, head.headers_mut())),
            _ => None,
        };
        let sent = Instant::now();
        let result = async {
            let resp = self
                .upstreams
                .send(&route.endpoint, head, payload)
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
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Err(e) => Err(ReadError::Body(upstream::describe(&*e))),
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

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Headers whose value changes with every request (ids, deadlines, trace context, the unit id).
const PER_REQUEST_HEADERS: [&str; 6] = [
    REQUEST_ID_HEADER,
    CLIENT_REQUEST_ID_HEADER,
    "grpc-timeout",
    "traceparent",
    "tracestate",
    "x-user-id",
];

/// Marks per-request header values so that HPACK sends them as literals and keeps them out of
/// the connection's header table. Indexed, each new value would evict the headers that repeat
/// (content-type, user-agent, te…), and every request would pay to search and rebuild the table
/// (the load benchmark's profile showed HPACK among the largest costs before this).
fn mark_per_request(headers: &mut HeaderMap, unit_key: &str) {
    for name in PER_REQUEST_HEADERS.iter().copied().chain([unit_key]) {
        if let Some(v) = headers.get_mut(name) {
            v.set_sensitive(true);
        }
    }
}

/// The caller's `x-request-id` when it is a sane token (visible ASCII, at most 128 bytes), else a
/// new UUIDv7 (time-ordered, so records sort by arrival).
fn request_id(headers: &HeaderMap) -> String {
    if let Some(s) = header_str(headers, CLIENT_REQUEST_ID_HEADER) {
        if crate::record::validate_request_id(s).is_ok() {
            return s.to_string();
        }
    }
    uuid::Uuid::now_v7().to_string()
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
}
