//! Bodies: wrappers that report how a response ended, rescue a failing stream, and copy a body
//! for shadows. (gRPC message framing is the protocols', in `crate::protocol::grpc`; it is
//! re-exported here.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Code;

pub use crate::protocol::grpc::{frame, frame_bytes, unary_message, FrameError};

/// How a response stream ended, as seen by the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The stream finished with this gRPC status (from trailers or trailers-only headers).
    Status(Code),
    /// The stream finished with no grpc-status at all.
    NoStatus,
    /// The upstream body failed mid-stream.
    Error,
    /// The client went away before the end.
    Cancelled,
}

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum ReadWholeError<E> {
    /// More than the limit of data.
    TooLarge,
    /// The body failed.
    Body(E),
}

/// A unary body read whole: its data and its trailers, at most `limit` bytes of data. As
/// `Limited::new(body, limit).collect()` with `to_bytes` and the trailers taken, without what
/// that costs on every call (a buffer list, the trailers cloned, a boxed error): the common
/// answer is one DATA frame, kept as it came (no copy); more are joined.
pub async fn read_whole<B>(
    body: B,
    limit: usize,
) -> Result<(Bytes, Option<http::HeaderMap>), ReadWholeError<B::Error>>
where
    B: HttpBody<Data = Bytes>,
{
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let mut first = Bytes::new();
    let mut more: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadWholeError::Body)?;
        let frame = match frame.into_data() {
            // An empty frame (some servers end a stream with one) neither copies nor counts.
            Ok(data) if data.is_empty() => continue,
            Ok(data) => {
                len = len.saturating_add(data.len());
                if len > limit {
                    return Err(ReadWholeError::TooLarge);
                }
                if let Some(m) = more.as_mut() {
                    m.extend_from_slice(&data);
                } else if first.is_empty() {
                    first = data;
                } else {
                    let mut m = bytes::BytesMut::with_capacity(len);
                    m.extend_from_slice(&first);
                    m.extend_from_slice(&data);
                    more = Some(m);
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(t) = frame.into_trailers() {
            // As `collect`: trailers sent more than once are merged.
            match trailers.as_mut() {
                None => trailers = Some(t),
                Some(all) => all.extend(t),
            }
        }
    }
    Ok((more.map_or(first, bytes::BytesMut::freeze), trailers))
}

type OnEnd = Box<dyn FnOnce(Ending) + Send + Sync>;

pin_project_lite::pin_project! {
    /// Forwards a body and calls `on_end` exactly once, when it ends, fails or is dropped.
    pub struct Observed<B>
    where
        B: HttpBody,
    {
        #[pin]
        inner: B,
        header_code: Option<Code>,
        on_end: Option<OnEnd>,
    }

    impl<B> PinnedDrop for Observed<B>
    where
        B: HttpBody,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.on_end.take() {
                // A body that was complete (e.g. a trailers-only response, never polled) ended
                // normally; anything else was abandoned by the client.
                let ending = if this.inner.is_end_stream() {
                    this.header_code.map(Ending::Status).unwrap_or(Ending::NoStatus)
                } else {
                    Ending::Cancelled
                };
                f(ending);
            }
        }
    }
}

impl<B: HttpBody> Observed<B> {
    /// Wraps `inner`; `header_code` is the status already seen in the response headers.
    pub fn new(
        inner: B,
        header_code: Option<Code>,
        on_end: impl FnOnce(Ending) + Send + Sync + 'static,
    ) -> Self {
        Observed {
            inner,
            header_code,
            on_end: Some(Box::new(on_end)),
        }
    }
}

impl<B> HttpBody for Observed<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are always the last frame: the stream's status is known now.
                if let Some(t) = frame.trailers_ref() {
                    let ending = super::status::code_from_headers(t)
                        .map(Ending::Status)
                        .unwrap_or(Ending::NoStatus);
                    if let Some(f) = this.on_end.take() {
                        f(ending);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_end.take() {
                    f(Ending::Error);
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_end.take() {
                    f(this
                        .header_code
                        .map(Ending::Status)
                        .unwrap_or(Ending::NoStatus));
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    /// Unknown: a gRPC response is framed by its messages and ended by its trailers, and its
    /// peers do not read a length. An exact hint (a unary answer is held whole) made hyper add a
    /// `content-length` to every response, ~1,000 instructions per call to build, insert and
    /// encode; model servers do not send one either.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type OnError = Box<dyn FnOnce(&(dyn std::error::Error + 'static)) -> http::HeaderMap + Send + Sync>;

pin_project_lite::pin_project! {
    /// Ends a streamed answer whose upstream fails midway (a reset, a GOAWAY, a broken connection)
    /// with trailers carrying the status the failure stands for, so that the caller gets a gRPC
    /// status with a message instead of a reset stream it would report as INTERNAL.
    pub struct Rescue<B> {
        #[pin]
        inner: B,
        on_error: Option<OnError>,
        ended: bool,
    }
}

impl<B> Rescue<B> {
    /// Wraps `inner`; `on_error` turns its failure into the trailers to end with.
    pub fn new(
        inner: B,
        on_error: impl FnOnce(&(dyn std::error::Error + 'static)) -> http::HeaderMap
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Rescue {
            inner,
            on_error: Some(Box::new(on_error)),
            ended: false,
        }
    }
}

impl<B> HttpBody for Rescue<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: std::error::Error + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Err(e)) => match this.on_error.take() {
                Some(rescue) => {
                    *this.ended = true;
                    Poll::Ready(Some(Ok(Frame::trailers(rescue(&e)))))
                }
                None => Poll::Ready(Some(Err(e))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

/// Where a [`Tee`] leaves its copy: the whole body, or `None` while incomplete or when it was
/// larger than the limit.
pub type TeeSlot = Arc<parking_lot::Mutex<Option<Bytes>>>;

pin_project_lite::pin_project! {
    /// Forwards a body unchanged and keeps a copy of its data (up to `limit` bytes) in `slot`
    /// once the body ends. The copy shares the frames' buffers.
    pub struct Tee<B> {
        #[pin]
        inner: B,
        parts: Vec<Bytes>,
        size: usize,
        limit: usize,
        overflow: bool,
        done: bool,
        slot: TeeSlot,
    }
}

impl<B> Tee<B> {
    /// Wraps `inner`, copying at most `limit` bytes.
    pub fn new(inner: B, limit: usize, slot: TeeSlot) -> Self {
        Tee {
            inner,
            parts: Vec::new(),
            size: 0,
            limit,
            overflow: false,
            done: false,
            slot,
        }
    }
}

impl<B> HttpBody for Tee<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let res = this.inner.as_mut().poll_frame(cx);
        let finished = match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.size += data.len();
                    if *this.size > *this.limit {
                        *this.overflow = true;
                        this.parts.clear();
                    } else if !*this.overflow {
                        this.parts.push(data.clone());
                    }
                }
                // The last data frame may carry the end of the stream itself (HTTP/2
                // END_STREAM): then nobody polls again, so the copy is complete now.
                frame.is_trailers() || this.inner.is_end_stream()
            }
            Poll::Ready(None) => true,
            _ => false,
        };
        if finished && !*this.done {
            *this.done = true;
            if !*this.overflow {
                let whole = match this.parts.len() {
                    1 => this.parts[0].clone(),
                    _ => Bytes::from(this.parts.concat()),
                };
                *this.slot.lock() = Some(whole);
            }
            this.parts.clear();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use parking_lot::Mutex;
    use std::sync::Arc;

    /// A body read whole is what `collect` gives: the data joined (one frame kept as it came),
    /// trailers merged, and more than the limit refused.
    #[tokio::test]
    async fn a_body_read_whole_is_its_data_and_trailers() {
        let trailers = |k: &'static str, v: &'static str| {
            let mut t = http::HeaderMap::new();
            t.insert(k, http::HeaderValue::from_static(v));
            Frame::trailers(t)
        };
        let body = |frames: Vec<Frame<Bytes>>| {
            http_body_util::StreamBody::new(futures_util::stream::iter(
                frames.into_iter().map(Ok::<_, std::convert::Infallible>),
            ))
        };
        let one = Bytes::from_static(b"one frame");
        let (data, t) = read_whole(
            body(vec![Frame::data(one.clone()), Frame::data(Bytes::new())]),
            100,
        )
        .await
        .unwrap();
        assert_eq!(data, one);
        assert_eq!(data.as_ptr(), one.as_ptr(), "a single frame is not copied");
        assert!(t.is_none());
        let frames = || {
            vec![
                Frame::data(Bytes::from_static(b"ab")),
                Frame::data(Bytes::new()),
                Frame::data(Bytes::from_static(b"cd")),
                Frame::data(Bytes::from_static(b"e")),
                trailers("grpc-status", "0"),
                trailers("grpc-message", "ok"),
            ]
        };
        let (data, t) = read_whole(body(frames()), 5).await.unwrap();
        assert_eq!(&data[..], b"abcde");
        let t = t.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["grpc-message"], "ok");
        let collected = http_body_util::Limited::new(body(frames()), 5)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.trailers(), Some(&t));
        assert!(matches!(
            read_whole(body(frames()), 4).await,
            Err(ReadWholeError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn observed_bodies_report_trailer_status_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
        let inner = http_body_util::Full::new(Bytes::from_static(b"abc"))
            .with_trailers(async move { Some(Ok(trailers)) });
        let body = Observed::new(inner, None, move |e| s.lock().push(e));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "5");
        assert_eq!(*seen.lock(), vec![Ending::Status(Code::NotFound)]);

        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        drop(Observed::new(
            http_body_util::Full::new(Bytes::from_static(b"unread")),
            None,
            move |e| s.lock().push(e),
        ));
        assert_eq!(*seen.lock(), vec![Ending::Cancelled]);

        // A trailers-only response: nothing to poll, the status was in the headers.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        drop(Observed::new(
            http_body_util::Empty::<Bytes>::new(),
            Some(Code::Unavailable),
            move |e| s.lock().push(e),
        ));
        assert_eq!(*seen.lock(), vec![Ending::Status(Code::Unavailable)]);
    }

    #[tokio::test]
    async fn tees_copy_whole_bodies_within_the_limit() {
        let slot: TeeSlot = Default::default();
        let inner = http_body_util::StreamBody::new(tokio_stream::iter(
            ["ab", "cd", "e"]
                .map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s)))),
        ));
        let out = Tee::new(inner, 10, slot.clone())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&out[..], b"abcde");
        assert_eq!(slot.lock().as_deref(), Some(&b"abcde"[..]));
        let slot: TeeSlot = Default::default();
        let big = http_body_util::Full::new(Bytes::from_static(b"0123456789abc"));
        let out = Tee::new(big, 10, slot.clone())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(out.len(), 13, "the body itself passes whole");
        assert_eq!(*slot.lock(), None, "too large to copy");
    }
}
