//! Triton's `ModelStreamInfer`: a bidirectional stream of `ModelInferRequest`s, answered by
//! `ModelStreamInferResponse`s. The stream is routed by the model its first message names (and
//! version, as for `ModelInfer`); every message naming that model gets the backend's name and
//! version written in; and every inference in it is recorded like a unary `ModelInfer` — its
//! features, its answer, the stream's experiment variant — so experiments, outcomes and drift
//! see streamed traffic too.
//!
//! Both directions are parsed as they pass, message by message, without holding the stream back:
//! the request side ([`Requests`]) as the upstream's flow control lets it through, the answer
//! side ([`Answers`]) as the caller reads it. Answers are paired with their requests by the
//! response's `id` when the request had one, else in order (what a non-decoupled model does).
//! A message that cannot be parsed (compressed, over `--max-message-bytes`, not a
//! `ModelInferRequest`) is forwarded untouched and not recorded; the stream is never broken for
//! the sake of a record.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tonic::{body::Body, Code};

use super::{
    body, status, upstream, Admitted, Forwarded, Inbound, Proxy, ProxyError, Routed, Subject,
    Unrouted,
};
use crate::protocol::{Call, InferRequest, Protocol, ProtocolError};
use crate::recorder::{RawRecord, Recorder};
use crate::routing::Route;

/// The gRPC path of the call.
const METHOD: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// A stream whose first message has arrived and named the model it was routed by.
pub(super) struct Opened {
    parts: http::request::Parts,
    frames: Frames,
    incoming: Incoming,
    /// The first message, and its request decoded.
    first: Bytes,
    request: Arc<dyn InferRequest>,
    /// The unit id the stream's inferences are recorded with.
    unit_id: Option<String>,
    /// The caller's deadline, if any (until the upstream's response headers), and its start.
    deadline: Option<Duration>,
    started: Instant,
}

impl Proxy {
    /// `ModelStreamInfer`, stage 2: waits for the first message and routes the stream by the
    /// model it names. Streams are not mirrored.
    pub(super) async fn route_stream(
        &self,
        a: &Admitted,
        req: Request<Incoming>,
    ) -> Result<(Subject, Routed, Inbound), Box<Unrouted>> {
        let deadline = Self::caller_deadline(req.headers());
        let started = Instant::now();
        let work = self.open_stream(a, req, deadline, started);
        match deadline {
            Some(d) => tokio::time::timeout(d, work).await.unwrap_or_else(|_| {
                Err(Unrouted::new(
                    Subject::default(),
                    0,
                    ProxyError::Deadline(d),
                ))
            }),
            None => work.await,
        }
    }

    async fn open_stream(
        &self,
        a: &Admitted,
        req: Request<Incoming>,
        deadline: Option<Duration>,
        started: Instant,
    ) -> Result<(Subject, Routed, Inbound), Box<Unrouted>> {
        let refused = |e: ProxyError| Unrouted::new(Subject::default(), 0, e);
        let (mut parts, mut incoming) = req.into_parts();
        // Messages get the backend's name written in: the caller's length no longer holds.
        parts.headers.remove(http::header::CONTENT_LENGTH);
        let limit = self.limits.max_message_bytes;
        let mut frames = Frames::default();
        // The first message names the model. A stream whose first message is not one
        // modelgate can read is refused: there is nothing to route it by.
        let first = loop {
            match frames.next(limit) {
                Next::Message(m) => break m,
                Next::Compressed(_) => {
                    self.drain(incoming);
                    return Err(refused(
                        ProtocolError::Frame(body::FrameError::Compressed).into(),
                    ));
                }
                Next::TooLarge => {
                    self.drain(incoming);
                    return Err(refused(ProxyError::RequestTooLarge(limit)));
                }
                Next::Incomplete => {}
            }
            match incoming.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        frames.push(d);
                    }
                }
                Some(Err(e)) => {
                    return Err(refused(ProxyError::ReadRequest(upstream::describe(&e))))
                }
                None => return Err(refused(ProxyError::EmptyStream)),
            }
        };
        let request = match a.protocol.decode_infer(&a.method, first.clone()) {
            Ok(m) => match m.check(self.limits.max_tensor_elements) {
                Ok(()) => Ok(m),
                Err(e) => Err(Unrouted::new(
                    Subject {
                        model: m.model().to_string(),
                        unit_id: None,
                    },
                    0,
                    e,
                )),
            },
            Err(e) => Err(refused(e.into())),
        };
        let routed = request.and_then(|m| {
            let (subject, routed) =
                self.decide(a, m.model(), m.version(), &parts.headers, Some(&*m));
            match routed {
                Ok(routed) => Ok((subject, routed, m)),
                Err(e) => Err(Unrouted::new(subject, 0, e)),
            }
        });
        let (subject, mut routed, request) = match routed {
            Ok(r) => r,
            Err(u) => {
                self.drain(incoming);
                return Err(u);
            }
        };
        // Streams are not mirrored; their inferences are recorded one by one (below), not as
        // one record of the call.
        routed.shadows = None;
        let opened = Opened {
            parts,
            frames,
            incoming,
            first,
            request,
            unit_id: subject.unit_id.clone().or_else(|| a.unit_id.clone()),
            deadline,
            started,
        };
        Ok((subject, routed, Inbound::Stream(opened)))
    }

    /// `ModelStreamInfer`, stage 3: relays both ways, recording every inference.
    pub(super) async fn forward_stream(
        &self,
        a: &Admitted,
        routed: &Routed,
        opened: Opened,
    ) -> (Forwarded, Result<Response<Body>, ProxyError>) {
        let mut forwarded = Forwarded::default();
        let Opened {
            parts,
            frames,
            incoming,
            first,
            request,
            unit_id,
            deadline,
            started,
        } = opened;
        let route = &routed.route;
        let limit = self.limits.max_message_bytes;
        let log = Arc::new(StreamLog {
            protocol: a.protocol,
            recorder: self.recorder.clone(),
            unit_key: self.limits.unit_key.clone(),
            request_id: a.request_id.clone(),
            model: request.model().to_string(),
            route: route.clone(),
            experiment: routed.experiment.clone(),
            counted: routed.counted,
            unit_id,
            clock: self.clock.clone(),
            state: Default::default(),
        });
        let first = log.request(first, Some(request));
        let requests = Requests {
            first: Some(first),
            frames,
            incoming,
            log: log.clone(),
            limit,
            raw: false,
            done: false,
        };
        let sent = Instant::now();
        let send = self.send(
            Request::from_parts(parts, ()),
            upstream::Payload::Stream(Body::new(requests)),
            route,
            &a.request_id,
            deadline,
            a.span.as_ref(),
        );
        let resp = match deadline {
            Some(d) => tokio::time::timeout(d.saturating_sub(started.elapsed()), send)
                .await
                .unwrap_or(Err(ProxyError::Deadline(d))),
            None => send.await,
        };
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => return (forwarded, Err(e)),
        };
        forwarded.upstream_latency = Some(sent.elapsed());
        let header_code = status::code_from_headers(resp.headers());
        let resp = self.rescued(route, resp).map(|b| {
            Body::new(Answers {
                inner: b,
                frames: Frames::default(),
                log,
                limit,
                header_code,
                lost: false,
            })
        });
        (forwarded, Ok(resp))
    }
}

/// What [`Frames::next`] found.
enum Next {
    /// A whole uncompressed message (without its 5-byte prefix).
    Message(Bytes),
    /// A whole compressed message, still framed: it cannot be read, only forwarded.
    Compressed(Bytes),
    /// The next message is larger than the limit.
    TooLarge,
    /// Not a whole message yet.
    Incomplete,
}

/// Bytes of a gRPC stream, split into messages as they arrive.
#[derive(Default)]
struct Frames {
    buf: BytesMut,
}

impl Frames {
    fn push(&mut self, data: Bytes) {
        self.buf.extend_from_slice(&data);
    }

    /// The next message, if it has arrived whole.
    fn next(&mut self, limit: usize) -> Next {
        if self.buf.len() < 5 {
            return Next::Incomplete;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > limit {
            return Next::TooLarge;
        }
        if self.buf.len() < 5 + len {
            return Next::Incomplete;
        }
        let mut framed = self.buf.split_to(5 + len);
        if framed[0] != 0 {
            return Next::Compressed(framed.freeze());
        }
        framed.advance(5);
        Next::Message(framed.freeze())
    }

    /// Whatever is buffered, to forward as it is.
    fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// One inference sent and not yet answered.
struct Pending {
    record_id: String,
    /// The request's own `id` (what a response names).
    id: String,
    infer: Arc<dyn InferRequest>,
    time_ms: u64,
    sent: Instant,
    size: usize,
}

#[derive(Default)]
struct LogState {
    pending: VecDeque<Pending>,
    /// Inferences seen so far (for record ids).
    count: u64,
    ended: bool,
}

/// What a stream's inferences are recorded with, and the ones waiting for an answer.
struct StreamLog {
    /// Decodes the requests and reads the answers.
    protocol: &'static dyn Protocol,
    recorder: Arc<Recorder>,
    unit_key: String,
    request_id: String,
    model: String,
    route: Arc<Route>,
    experiment: Option<(Arc<str>, Arc<str>)>,
    counted: bool,
    unit_id: Option<String>,
    clock: crate::clock::SharedClock,
    state: parking_lot::Mutex<LogState>,
}

impl StreamLog {
    /// A request message on its way: remembered for its record when it names the stream's model
    /// (`infer`, if already decoded), and returned framed with the backend's name and version.
    fn request(&self, msg: Bytes, infer: Option<Arc<dyn InferRequest>>) -> Bytes {
        let infer = infer.or_else(|| self.protocol.decode_infer(METHOD, msg.clone()).ok());
        let Some(infer) = infer.filter(|m| m.model() == self.model) else {
            // Another model, or not readable: forwarded as it came, not recorded.
            return self.protocol.body(&msg);
        };
        let forward = self
            .protocol
            .rewrite(
                &Call::Stream,
                &msg,
                (infer.model(), infer.version()),
                &self.route,
            )
            .ok()
            .flatten();
        let mut st = self.state.lock();
        st.count += 1;
        let record_id = match crate::record::validate_request_id(infer.id()) {
            Ok(()) => infer.id().to_string(),
            Err(_) => format!("{}-{}", self.request_id, st.count),
        };
        st.pending.push_back(Pending {
            record_id,
            id: infer.id().to_string(),
            infer,
            time_ms: self.clock.now_ms(),
            sent: Instant::now(),
            size: msg.len(),
        });
        self.protocol.body(forward.as_deref().unwrap_or(&msg))
    }

    /// An answer (`ModelStreamInferResponse`): records the inference it answers.
    fn answer(&self, msg: &Bytes) {
        let answer = self.protocol.stream_answer(msg);
        let id = answer.id;
        let pending = {
            let mut st = self.state.lock();
            let at = match id.is_empty() {
                true => None,
                false => st.pending.iter().position(|p| p.id == id),
            };
            match at {
                Some(i) => st.pending.remove(i),
                None => st.pending.pop_front(),
            }
        };
        if let Some(p) = pending {
            // Triton reports a failed inference in the message, not as a status: UNKNOWN.
            match answer.failed {
                false => self.record(p, Code::Ok, answer.response),
                true => self.record(p, Code::Unknown, None),
            }
        }
    }

    /// The stream ended with `code`: inferences still unanswered are recorded with it.
    fn end(&self, code: Code) {
        let pending = {
            let mut st = self.state.lock();
            if st.ended {
                return;
            }
            st.ended = true;
            std::mem::take(&mut st.pending)
        };
        for p in pending {
            self.record(p, code, None);
        }
    }

    fn record(&self, p: Pending, code: Code, response: Option<Bytes>) {
        if !self
            .recorder
            .wanted(&self.model, self.experiment.is_some(), false)
        {
            return;
        }
        let unit_id = self
            .unit_id
            .clone()
            .or_else(|| p.infer.parameter(&self.unit_key));
        let latency = p.sent.elapsed();
        self.recorder.submit(RawRecord {
            request_id: p.record_id,
            time_ms: p.time_ms,
            method: METHOD.to_string(),
            model: self.model.clone(),
            route: Some(self.route.clone()),
            experiment: self.experiment.as_ref().map(|(e, _)| e.clone()),
            variant: self.experiment.as_ref().map(|(_, v)| v.clone()),
            counted: self.counted,
            shadow_skipped: Vec::new(),
            shadow_dropped: Vec::new(),
            shadow_suppressed: Vec::new(),
            unit_id,
            status: code as i32,
            upstream_latency: Some(latency),
            latency,
            request: Some(p.infer),
            size: p.size + response.as_ref().map_or(0, Bytes::len),
            response,
        });
    }
}

/// The caller's request stream on its way upstream, message by message.
struct Requests {
    first: Option<Bytes>,
    frames: Frames,
    incoming: Incoming,
    log: Arc<StreamLog>,
    limit: usize,
    /// A message could not be split off (over the limit): the rest is relayed as it comes.
    raw: bool,
    done: bool,
}

impl HttpBody for Requests {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            if !this.raw {
                match this.frames.next(this.limit) {
                    Next::Message(m) => {
                        return Poll::Ready(Some(Ok(Frame::data(this.log.request(m, None)))))
                    }
                    // Forwarded as it came; it cannot be recorded.
                    Next::Compressed(framed) => return Poll::Ready(Some(Ok(Frame::data(framed)))),
                    Next::TooLarge => this.raw = true,
                    Next::Incomplete => {}
                }
            }
            if this.raw && !this.frames.buf.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(this.frames.take()))));
            }
            if this.done {
                // A partial message at the end is the caller's to explain: pass it on.
                return Poll::Ready(match this.frames.buf.is_empty() {
                    true => None,
                    false => Some(Ok(Frame::data(this.frames.take()))),
                });
            }
            match std::task::ready!(Pin::new(&mut this.incoming).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => this.frames.push(d),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.done = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.done && self.frames.buf.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

pin_project_lite::pin_project! {
    /// The upstream's answers on their way to the caller, unchanged; each one read for the record
    /// of the inference it answers.
    struct Answers<B>
    where
        B: HttpBody,
    {
        #[pin]
        inner: B,
        frames: Frames,
        log: Arc<StreamLog>,
        limit: usize,
        header_code: Option<Code>,
        // An answer too large to read: the rest are not read either (they cannot be split).
        lost: bool,
    }

    impl<B> PinnedDrop for Answers<B>
    where
        B: HttpBody,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A trailers-only answer ends with its headers and is never polled; anything else
            // dropped before its end was left by the caller. (After a normal end, nothing.)
            this.log.end(match this.inner.is_end_stream() {
                true => this.header_code.unwrap_or(Code::Unknown),
                false => Code::Cancelled,
            });
        }
    }
}

impl<B> HttpBody for Answers<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll_frame(cx));
        match &res {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref().filter(|_| !*this.lost) {
                    this.frames.push(d.clone());
                    loop {
                        match this.frames.next(*this.limit) {
                            Next::Message(m) => this.log.answer(&m),
                            // Unreadable answers still answer a request, in order.
                            Next::Compressed(_) => this.log.answer(&Bytes::new()),
                            Next::TooLarge => {
                                this.frames.take();
                                *this.lost = true;
                                break;
                            }
                            Next::Incomplete => break,
                        }
                    }
                }
                if let Some(t) = frame.trailers_ref() {
                    this.log
                        .end(status::code_from_headers(t).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(_)) => this.log.end(Code::Unavailable),
            None => this.log.end(this.header_code.unwrap_or(Code::Unknown)),
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
