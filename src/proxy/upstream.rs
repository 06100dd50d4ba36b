//! Upstream connections: a few lazily opened HTTP/2 connections per endpoint, used in turn, spoken
//! to with the `h2` crate directly.
//!
//! Why not a tonic `Channel` (or hyper's client)? Both put a queue and a task between the caller
//! and the connection (tower's `Buffer` worker, hyper's dispatch channel), so every request
//! crossed two extra tasks — often two extra threads woken — before its frames were written. The
//! load benchmark showed that hop among the largest costs modelgate added. With `h2`, the
//! request's own task writes into the connection's frame queue and only the connection task does
//! I/O.
//!
//! Each endpoint has `connections` slots. A slot holds an open connection or nothing; a request
//! that finds nothing connects (one attempt at a time per slot, bounded by the connect timeout).
//! When a connection ends (the upstream closed it, a GOAWAY, a keepalive PING unanswered), its
//! slot empties and the next request reconnects. A request that could not even start on a
//! connection that turned out to be dead is retried once on a fresh one: nothing of it reached
//! the upstream.
//!
//! `https://` endpoints are reached over TLS (rustls, ALPN `h2`), verified against the system
//! roots or `--upstream-ca`; the handshake shares the connect timeout, and a failed one names
//! its reason (`certificate verify failed: UnknownIssuer`).

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tonic::body::Body;

/// Connection settings for upstreams.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval; a PING unanswered for as long (at most 20s) closes the connection.
    pub keepalive_interval: Duration,
    /// HTTP/2 connections per endpoint.
    pub connections: usize,
    /// TLS towards `https://` endpoints.
    pub tls: Arc<UpstreamTls>,
}

/// TLS towards `https://` upstreams: the files, and the client configuration built from them
/// when the first `https://` endpoint is connected to (so that the system roots are only read
/// when needed). Shared by every data thread.
#[derive(Debug, Default)]
pub struct UpstreamTls {
    files: crate::tls::UpstreamTlsFiles,
    config: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl UpstreamTls {
    /// TLS settings from `--upstream-ca`, `--upstream-cert`, `--upstream-key`.
    pub fn new(files: crate::tls::UpstreamTlsFiles) -> Self {
        UpstreamTls {
            files,
            config: Default::default(),
        }
    }

    fn connector(&self) -> Result<tokio_rustls::TlsConnector, UpstreamError> {
        self.config
            .get_or_init(|| self.files.client_config().map_err(|e| e.to_string()))
            .clone()
            .map(tokio_rustls::TlsConnector::from)
            .map_err(UpstreamError::Connect)
    }
}

/// Why an upstream call failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The endpoint is not an `http://host:port` or `https://host:port` URL.
    #[error("invalid endpoint: {0}")]
    Endpoint(String),
    /// No connection could be opened.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection failed before the call could start on it.
    #[error("{0}")]
    Stream(#[from] h2::Error),
    /// The call started, then its stream was reset or its connection failed before the answer's
    /// head arrived.
    #[error("{0}")]
    Broken(h2::Error),
}

impl UpstreamError {
    /// How the upstream's stream failed, for an error after the call started (`None` before).
    pub fn failure(&self) -> Option<StreamFailure> {
        match self {
            UpstreamError::Broken(e) => Some(StreamFailure::of(e)),
            _ => None,
        }
    }
}

/// What to send: a whole message (unary calls, shadow copies) or a stream to relay.
pub enum Payload {
    /// Sent at once, ending the request stream.
    Full(Bytes),
    /// Relayed frame by frame as the caller sends it, with HTTP/2 flow control.
    Stream(Body),
}

/// An open connection and its identity (so that only its own task clears its slot).
struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
}

/// One connection's place in an endpoint's set.
#[derive(Default)]
struct Slot {
    conn: ArcSwapOption<Conn>,
    /// Held while connecting, so that a burst of requests opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

/// The connections of one endpoint.
pub(super) struct Endpoint {
    /// `host:port`, for connecting and for the `:authority` of requests.
    pub(super) authority: http::uri::Authority,
    /// The name the server's certificate must carry, for `https://` endpoints.
    tls: Option<rustls_pki_types::ServerName<'static>>,
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
}

/// Idle connections kept per endpoint; more are closed when they finish.
const IDLE_PER_ENDPOINT: usize = 64;

/// Idle HTTP/1.1 connections to REST backends, by endpoint. A connection carries one call at a
/// time; it is taken out for a call and put back when the answer has been read.
#[derive(Default)]
pub(super) struct RestPool {
    idle: dashmap::DashMap<String, Vec<RestSender>>,
}

/// One HTTP/1.1 connection to a REST backend.
pub(super) type RestSender = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

impl RestPool {
    pub(super) fn take(&self, endpoint: &str) -> Option<RestSender> {
        let mut idle = self.idle.get_mut(endpoint)?;
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    pub(super) fn put(&self, endpoint: &str, s: RestSender) {
        let mut idle = self.idle.entry(endpoint.to_string()).or_default();
        if idle.len() < IDLE_PER_ENDPOINT {
            idle.push(s);
        }
    }
}

/// An open connection to an endpoint.
pub(super) enum Dialed {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// Connections by endpoint.
pub struct Upstreams {
    settings: UpstreamSettings,
    /// (aHash: looked up for every call; SipHash was ~300 instructions a lookup.)
    endpoints: DashMap<String, Arc<Endpoint>, ahash::RandomState>,
    ids: AtomicU64,
    /// Idle HTTP/1.1 connections to OIP REST backends (`super::rest_upstream`).
    pub(super) rest: RestPool,
}

impl Upstreams {
    /// An empty pool.
    pub fn new(settings: UpstreamSettings) -> Self {
        Upstreams {
            settings,
            endpoints: DashMap::default(),
            ids: AtomicU64::new(0),
            rest: Default::default(),
        }
    }

    /// The settings the pool was made with.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    pub(super) fn endpoint(&self, endpoint: &str) -> Result<Arc<Endpoint>, UpstreamError> {
        if let Some(e) = self.endpoints.get(endpoint) {
            return Ok(e.clone());
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| UpstreamError::Endpoint(format!("'{endpoint}': {e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(UpstreamError::Endpoint(format!(
                    "'{endpoint}': only http:// and https:// upstreams are supported"
                )))
            }
        };
        let authority = uri
            .authority()
            .filter(|a| a.port_u16().is_some())
            .cloned()
            .ok_or_else(|| UpstreamError::Endpoint(format!("'{endpoint}': no host:port")))?;
        let tls = if https {
            // `[::1]` is written with brackets in a URL, not in a certificate.
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            Some(
                rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
                    UpstreamError::Endpoint(format!("'{endpoint}': not a TLS server name: {e}"))
                })?,
            )
        } else {
            None
        };
        let e = Arc::new(Endpoint {
            authority,
            tls,
            slots: (0..self.settings.connections.max(1))
                .map(|_| Arc::default())
                .collect(),
            next: AtomicUsize::new(0),
        });
        Ok(self
            .endpoints
            .entry(endpoint.to_string())
            .or_insert(e)
            .clone())
    }

    /// Sends a request to `endpoint` (`http://host:port` or `https://host:port`; the request's
    /// path is kept) and returns the response head with its body streaming. Dropping the
    /// response (or its body) before the end resets the upstream stream.
    pub async fn send(
        &self,
        endpoint: &str,
        head: Request<()>,
        payload: Payload,
    ) -> Result<Response<Body>, UpstreamError> {
        let ep = self.endpoint(endpoint)?;
        let slot = ep.slots[ep.next.fetch_add(1, Ordering::Relaxed) % ep.slots.len()].clone();
        let (mut parts, ()) = head.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme(if ep.tls.is_some() { "https" } else { "http" })
            .authority(ep.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| UpstreamError::Endpoint(e.to_string()))?;
        parts.version = http::Version::HTTP_2;
        strip_connection_headers(&mut parts.headers);
        // The caller's content-length (gRPC clients rarely send one) describes the caller's
        // body; a message with the backend's name written in may be longer or shorter, and an
        // HTTP/2 server resets a stream whose length disagrees (PROTOCOL_ERROR). A relayed
        // stream keeps it: its bytes are the caller's own.
        // Rewritten only when it differs: replacing the value (a new header value, a hashed
        // insert, the old value dropped) cost ~2,000 instructions per call from clients that send
        // one (h2load, curl), and most messages go out as long as they came in.
        if let Payload::Full(b) = &payload {
            let stale = super::find_header(&parts.headers, &http::header::CONTENT_LENGTH)
                .is_some_and(|v| {
                    v.to_str().ok().and_then(|s| s.parse::<usize>().ok()) != Some(b.len())
                });
            if stale {
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, b.len().into());
            }
        }
        let head = Request::from_parts(parts, ());
        let end = match &payload {
            Payload::Full(b) => b.is_empty(),
            Payload::Stream(b) => b.is_end_stream(),
        };
        // A whole message can be sent again when the upstream refused it unprocessed
        // (REFUSED_STREAM, or a graceful GOAWAY that left it out): gRPC clients retry those
        // transparently, and a caller of modelgate should not see an error a direct caller would
        // not. A relayed stream has been read from the caller; it is never sent twice.
        let again = match &payload {
            Payload::Full(b) => Some((head.clone(), b.clone())),
            Payload::Stream(_) => None,
        };
        match self.send_once(&ep, &slot, head, payload, end).await {
            Err(e) if e.failure().is_some_and(StreamFailure::unprocessed) => match again {
                Some((head, b)) => {
                    tracing::debug!(upstream = %ep.authority, error = %e, "upstream refused a call unprocessed; sending it once more");
                    self.send_once(&ep, &slot, head, Payload::Full(b), end)
                        .await
                }
                None => Err(e),
            },
            other => other,
        }
    }

    /// One attempt of [`Upstreams::send`] on the slot's connection.
    async fn send_once(
        &self,
        ep: &Endpoint,
        slot: &Arc<Slot>,
        head: Request<()>,
        payload: Payload,
        end: bool,
    ) -> Result<Response<Body>, UpstreamError> {
        // A connection found dead before the request started on it: one retry on a new one.
        let mut send = None;
        for attempt in 0..2 {
            // Connecting is rare and its future (TCP, TLS and HTTP/2 handshakes) large: boxed,
            // so that every call's future does not carry it (see `accept`: futures are copied).
            let conn = match slot.conn.load_full() {
                Some(c) => c,
                None => Box::pin(self.connection(ep, slot)).await?,
            };
            match conn.send.clone().ready().await {
                Ok(s) => {
                    send = Some(s);
                    break;
                }
                Err(e) => {
                    slot.conn
                        .compare_and_swap(&Some(conn.clone()), None::<Arc<Conn>>);
                    if attempt == 1 {
                        return Err(e.into());
                    }
                }
            }
        }
        let mut send = send.expect("the loop returns or sets it");
        let (response, mut stream) = send.send_request(head, end)?;
        match payload {
            Payload::Full(b) if !b.is_empty() => {
                // h2 queues what the window does not admit yet; the message is bounded.
                stream.send_data(b, true).map_err(UpstreamError::Broken)?;
            }
            Payload::Full(_) => {}
            Payload::Stream(body) if !end => {
                tokio::spawn(relay(body, stream));
            }
            Payload::Stream(_) => {}
        }
        let resp = response.await.map_err(UpstreamError::Broken)?;
        Ok(resp.map(|recv| {
            Body::new(Received {
                recv,
                data_done: false,
            })
        }))
    }

    /// Opens the slot's connection, which the caller found missing — unless another call opened
    /// it while this one waited for the slot's lock.
    async fn connection(
        &self,
        ep: &Endpoint,
        slot: &Arc<Slot>,
    ) -> Result<Arc<Conn>, UpstreamError> {
        let _connecting = slot.connecting.lock().await;
        if let Some(c) = slot.conn.load_full() {
            return Ok(c);
        }
        match self.dial(ep).await? {
            Dialed::Tcp(tcp) => self.start(ep, slot, tcp).await,
            Dialed::Tls(tls) => self.start(ep, slot, tls).await,
        }
    }

    /// Opens a connection to an endpoint: TCP, and TLS for `https://` endpoints, within the
    /// connect timeout.
    pub(super) async fn dial(&self, ep: &Endpoint) -> Result<Dialed, UpstreamError> {
        let addr = ep.authority.as_str();
        let timeout = self.settings.connect_timeout;
        let timed_out =
            || UpstreamError::Connect(format!("timed out after {timeout:?} connecting to {addr}"));
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| UpstreamError::Connect(format!("{addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let Some(name) = &ep.tls else {
            return Ok(Dialed::Tcp(tcp));
        };
        let connector = self.settings.tls.connector()?;
        // The handshake shares the connect timeout.
        let tls = tokio::time::timeout(timeout, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                UpstreamError::Connect(format!(
                    "{addr}: TLS handshake failed: {}",
                    crate::tls::describe_io_error(&e)
                ))
            })?;
        Ok(Dialed::Tls(Box::new(tls)))
    }

    /// Starts HTTP/2 on an open connection (TCP or TLS) and puts it in the slot.
    async fn start<T>(
        &self,
        ep: &Endpoint,
        slot: &Arc<Slot>,
        io: T,
    ) -> Result<Arc<Conn>, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let addr = ep.authority.as_str();
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_frame_size(1 << 20)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| UpstreamError::Connect(format!("{addr}: HTTP/2 handshake: {e}")))?;
        let conn = Arc::new(Conn {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            send,
        });
        slot.conn.store(Some(conn.clone()));
        let (interval, ka_timeout) = (
            self.settings.keepalive_interval,
            self.settings
                .keepalive_interval
                .min(Duration::from_secs(20)),
        );
        let ping = connection.ping_pong();
        let (dead_tx, dead_rx) = tokio::sync::oneshot::channel::<()>();
        if let Some(mut ping) = ping {
            // PINGs from their own task: the pong is read by the connection task.
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    match tokio::time::timeout(ka_timeout, ping.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => return, // the connection is gone
                        Err(_) => {
                            tracing::warn!(
                                "upstream did not answer a keepalive PING; closing the connection"
                            );
                            let _ = dead_tx.send(());
                            return;
                        }
                    }
                }
            });
        }
        let (slot, id, authority) = (slot.clone(), conn.id, ep.authority.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = connection => if let Err(e) = r {
                    tracing::debug!(upstream = %authority, error = %e, "upstream connection ended");
                },
                _ = dead_rx => {}
            }
            let current = slot.conn.load();
            if current.as_ref().is_some_and(|c| c.id == id) {
                slot.conn.store(None);
            }
        });
        Ok(conn)
    }
}

/// Headers that HTTP/2 forbids (RFC 9113 §8.2.2); a caller's HTTP/2 request has none, but a
/// shadow copy's headers are reused and `te` may only say `trailers`.
fn strip_connection_headers(h: &mut HeaderMap) {
    // `HeaderName`s, not `&str`s: a string name is parsed on every call.
    const HOP_BY_HOP: [http::HeaderName; 5] = [
        http::header::CONNECTION,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ];
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    if super::find_header(h, &http::header::TE).is_some_and(|v| v != "trailers") {
        h.remove(http::header::TE);
    }
}

/// Relays a caller's request stream to the upstream, respecting the upstream's flow-control
/// window, and resets the upstream stream if the caller's stream fails.
async fn relay(mut body: Body, mut to: h2::SendStream<Bytes>) {
    loop {
        match body.frame().await {
            None => {
                let _ = to.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                to.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while !data.is_empty() {
                        to.reserve_capacity(data.len());
                        match std::future::poll_fn(|cx| to.poll_capacity(cx)).await {
                            Some(Ok(n)) if n > 0 => {
                                let chunk = data.split_to(n.min(data.len()));
                                if to.send_data(chunk, false).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            // The upstream reset or closed the stream.
                            _ => return,
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = to.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// An upstream's response body: DATA frames (their window released as they are read), then the
/// trailers.
struct Received {
    recv: h2::RecvStream,
    data_done: bool,
}

impl HttpBody for Received {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// How an upstream's HTTP/2 stream failed, in the terms gRPC maps to a status ("Errors" in gRPC's
/// PROTOCOL-HTTP2.md), so that a caller of modelgate gets the status a direct caller would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFailure {
    /// The upstream reset the stream (RST_STREAM) with this reason.
    Reset(h2::Reason),
    /// The upstream closed the connection (GOAWAY) with this reason, leaving this stream out.
    GoAway(h2::Reason),
    /// The connection broke (reset, closed, an I/O or protocol error on our side).
    Broken,
}

impl StreamFailure {
    /// The failure somewhere in `err`'s cause chain (an `h2::Error`), else [`StreamFailure::Broken`].
    pub fn of(err: &(dyn StdError + 'static)) -> Self {
        let mut cause = Some(err);
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return match h2.reason() {
                    Some(r) if h2.is_go_away() && h2.is_remote() => StreamFailure::GoAway(r),
                    Some(r) if h2.is_reset() && h2.is_remote() => StreamFailure::Reset(r),
                    _ => StreamFailure::Broken,
                };
            }
            cause = e.source();
        }
        StreamFailure::Broken
    }

    /// The gRPC status code a client gives this failure: the RST_STREAM mapping of gRPC's HTTP/2
    /// spec, and UNAVAILABLE for a connection that went away or broke.
    pub fn code(self) -> tonic::Code {
        use h2::Reason;
        use tonic::Code;
        match self {
            StreamFailure::Reset(Reason::REFUSED_STREAM) => Code::Unavailable,
            StreamFailure::Reset(Reason::CANCEL) => Code::Cancelled,
            StreamFailure::Reset(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            StreamFailure::Reset(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            StreamFailure::Reset(_) => Code::Internal,
            StreamFailure::GoAway(_) | StreamFailure::Broken => Code::Unavailable,
        }
    }

    /// The `kind` label of `modelgate_upstream_errors_total` for this failure.
    pub fn kind(self) -> &'static str {
        match self {
            StreamFailure::Reset(_) => "reset",
            StreamFailure::GoAway(_) => "goaway",
            StreamFailure::Broken => "body",
        }
    }

    /// Whether the upstream did not process the stream at all, so that sending it again is
    /// safe: REFUSED_STREAM, or a GOAWAY whose last stream id left it out (h2 reports a GOAWAY
    /// only on such streams; those the upstream accepted just see the connection end).
    pub fn unprocessed(self) -> bool {
        matches!(
            self,
            StreamFailure::Reset(h2::Reason::REFUSED_STREAM) | StreamFailure::GoAway(_)
        )
    }
}

impl std::fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamFailure::Reset(r) => write!(f, "reset the call (RST_STREAM {r:?})"),
            StreamFailure::GoAway(r) => write!(f, "closed the connection (GOAWAY {r:?})"),
            StreamFailure::Broken => f.write_str("connection broke"),
        }
    }
}

/// The most specific description of an upstream failure: the innermost cause, which is where
/// "connection refused" or "timed out" lives.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut cause: &(dyn StdError + 'static) = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let inner = cause.to_string();
    let outer = err.to_string();
    if inner == outer {
        outer
    } else {
        format!("{outer}: {inner}")
    }
}
