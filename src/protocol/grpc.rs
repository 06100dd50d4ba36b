//! gRPC as a protocol: the message framing every gRPC protocol shares, errors as trailers-only
//! responses, and [`Grpc`], plain gRPC calls modelgate does not read — forwarded untouched,
//! routed by the `x-model-name` header or the default model, their answers opaque (shadows
//! compare them byte for byte) — and the health and reflection services modelgate answers itself.

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use tonic::{body::Body, Status};

use super::{Call, Protocol, ProtocolError};

/// The one message of a unary gRPC body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than 5 bytes, or fewer than the length prefix says.
    #[error("truncated gRPC message frame ({0} bytes)")]
    Truncated(usize),
    /// The message is compressed.
    #[error("compressed gRPC messages are not supported on this path; send them uncompressed")]
    Compressed,
    /// More than one message.
    #[error("expected exactly one gRPC message, found more data after it")]
    Trailing,
}

/// Extracts the single message of a unary gRPC body (5-byte prefix: flag, u32 BE length).
pub fn unary_message(body: &Bytes) -> Result<Bytes, FrameError> {
    if body.len() < 5 {
        return Err(FrameError::Truncated(body.len()));
    }
    if body[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let end = 5usize
        .checked_add(len)
        .ok_or(FrameError::Truncated(body.len()))?;
    if body.len() < end {
        return Err(FrameError::Truncated(body.len()));
    }
    if body.len() > end {
        return Err(FrameError::Trailing);
    }
    Ok(body.slice(5..end))
}

/// Frames a protobuf message as one uncompressed gRPC message.
pub fn frame<M: prost::Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("buffer has capacity");
    buf.freeze()
}

/// Frames an encoded message as one uncompressed gRPC message.
pub fn frame_bytes(msg: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + msg.len());
    buf.put_u8(0);
    buf.put_u32(msg.len() as u32);
    buf.extend_from_slice(msg);
    buf.freeze()
}

/// A trailers-only gRPC error response carrying `status`.
pub fn error_response(status: Status) -> http::Response<Body> {
    status.into_http()
}

/// A successful unary gRPC response that modelgate answers itself.
pub fn unary_response<M: prost::Message>(msg: &M) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = Full::new(frame(msg)).with_trailers(async move { Some(Ok(trailers)) });
    let mut resp = http::Response::new(Body::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Plain gRPC: every call that no other protocol claims.
#[derive(Debug)]
pub struct Grpc;

/// The plain gRPC protocol.
pub static GRPC: Grpc = Grpc;

impl Protocol for Grpc {
    fn name(&self) -> &'static str {
        "grpc"
    }

    fn classify(&self, path: &str) -> Option<Call> {
        if path.starts_with("/grpc.health.v1.Health/")
            || path.starts_with("/grpc.reflection.v1.ServerReflection/")
            || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
        {
            return Some(Call::Local);
        }
        Some(Call::PassThrough)
    }

    fn message(&self, body: &Bytes) -> Result<Bytes, ProtocolError> {
        Ok(unary_message(body)?)
    }

    fn body(&self, msg: &[u8]) -> Bytes {
        frame_bytes(msg)
    }

    fn error_response(&self, status: Status) -> http::Response<Body> {
        error_response(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_frames_round_trip_and_reject_garbage() {
        let msg = crate::pb::inference::ModelReadyRequest {
            name: "iris".into(),
            version: String::new(),
        };
        let framed = frame(&msg);
        let inner = unary_message(&framed).unwrap();
        let back: crate::pb::inference::ModelReadyRequest = prost::Message::decode(inner).unwrap();
        assert_eq!(back, msg);
        assert_eq!(
            unary_message(&Bytes::from_static(&[0, 0])),
            Err(FrameError::Truncated(2))
        );
        assert_eq!(
            unary_message(&Bytes::from_static(&[1, 0, 0, 0, 0])),
            Err(FrameError::Compressed)
        );
        assert_eq!(
            unary_message(&Bytes::from_static(&[0, 0, 0, 0, 9, 1])),
            Err(FrameError::Truncated(6))
        );
        assert_eq!(
            unary_message(&Bytes::from_static(&[0, 0, 0, 0, 0, 1])),
            Err(FrameError::Trailing)
        );
        assert_eq!(
            unary_message(&Bytes::from_static(&[0, 0, 0, 0, 0]))
                .unwrap()
                .len(),
            0
        );
    }
}
