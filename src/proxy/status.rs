//! gRPC status plumbing for the data plane: local errors as trailers-only responses, the status
//! of an upstream answer, `grpc-timeout` parsing, and the HTTP-to-gRPC code mapping.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use tonic::{Code, Status};

pub use crate::protocol::grpc::error_response;

/// `status` as a trailers block (grpc-status, grpc-message, grpc-status-details-bin).
pub fn trailers(status: Status) -> HeaderMap {
    // tonic encodes a status (the message percent-encoded, details in base64) only into a
    // response's headers; those are the trailers, less the content type.
    let mut h = status
        .into_http::<tonic::body::Body>()
        .into_parts()
        .0
        .headers;
    h.remove(http::header::CONTENT_TYPE);
    h
}

/// The gRPC status code in `headers` (a trailers block, or the headers of a trailers-only
/// response), if any.
pub fn code_from_headers(headers: &HeaderMap) -> Option<Code> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    let v = super::find_header(headers, &GRPC_STATUS)?;
    let n: i32 = v.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(n))
}

/// The gRPC code a non-200 HTTP status from an upstream stands for (gRPC's HTTP mapping).
pub fn code_for_http_status(s: StatusCode) -> Code {
    match s.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a duration as a `grpc-timeout` value, in the finest unit that fits 8 digits.
pub fn encode_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u64 = 99_999_999;
    // In u64 and written with itoa: formatting the u128 of `as_nanos` cost ~1,300 instructions
    // per forwarded call.
    let secs = d.as_secs();
    let (n, unit) = if secs == 0 {
        // Under a second: at most 999,999,999 ns, 999,999 µs.
        let nanos = u64::from(d.subsec_nanos());
        if nanos <= MAX {
            (nanos, b'n')
        } else {
            (nanos / 1_000, b'u')
        }
    } else if secs <= MAX / 1_000 {
        // Up to 99,999 s the milliseconds fit (a longer one in µs would not).
        let millis = secs * 1_000 + u64::from(d.subsec_millis());
        let micros = millis * 1_000 + u64::from(d.subsec_micros() % 1_000);
        if micros <= MAX {
            (micros, b'u')
        } else {
            (millis, b'm')
        }
    } else if secs <= MAX {
        (secs, b'S')
    } else {
        ((secs / 3600).min(MAX), b'H')
    };
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n).as_bytes();
    let mut text = [0u8; 9];
    text[..digits.len()].copy_from_slice(digits);
    text[digits.len()] = unit;
    HeaderValue::from_bytes(&text[..=digits.len()]).expect("digits and a letter")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finest unit whose value fits in eight digits, truncated: as the plain u128 formula
    /// (kept here as the reference) writes it, at every unit's edges and between.
    #[test]
    fn grpc_timeouts_are_written_in_the_finest_unit_that_fits() {
        let reference = |d: Duration| {
            const MAX: u128 = 99_999_999;
            let (n, unit) = if d.as_nanos() <= MAX {
                (d.as_nanos(), "n")
            } else if d.as_micros() <= MAX {
                (d.as_micros(), "u")
            } else if d.as_millis() <= MAX {
                (d.as_millis(), "m")
            } else if u128::from(d.as_secs()) <= MAX {
                (u128::from(d.as_secs()), "S")
            } else {
                ((u128::from(d.as_secs()) / 3600).min(MAX), "H")
            };
            format!("{n}{unit}")
        };
        let mut cases = vec![Duration::ZERO, Duration::MAX];
        for edge in [
            99_999_999u64,
            99_999_999_000,
            99_999_999_000_000,
            99_999_999_000_000_000,
        ] {
            for delta in [0, 1, 999, 1_000, 1_001] {
                cases.push(Duration::from_nanos(edge.saturating_sub(delta)));
                cases.push(Duration::from_nanos(edge + delta));
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Spread over every magnitude: up to 2^(x mod 64) nanoseconds.
            cases.push(Duration::from_nanos(x >> (x % 64)));
        }
        for d in cases {
            assert_eq!(
                encode_grpc_timeout(d).to_str().unwrap(),
                reference(d),
                "{d:?}"
            );
        }
    }

    #[test]
    fn grpc_timeouts_round_trip() {
        for (s, d) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(
                parse_grpc_timeout(&HeaderValue::from_static(s)),
                Some(d),
                "{s}"
            );
            assert_eq!(parse_grpc_timeout(&encode_grpc_timeout(d)), Some(d), "{s}");
        }
        for bad in ["", "5", "m", "123456789m", "-1S", "1x", "1.5S"] {
            assert_eq!(
                parse_grpc_timeout(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
        // Coarsens rather than overflows.
        let long = Duration::from_secs(1 << 40);
        assert!(parse_grpc_timeout(&encode_grpc_timeout(long)).is_some());
    }

    #[test]
    fn http_statuses_map_like_grpc_does() {
        assert_eq!(
            code_for_http_status(StatusCode::NOT_FOUND),
            Code::Unimplemented
        );
        assert_eq!(
            code_for_http_status(StatusCode::BAD_GATEWAY),
            Code::Unavailable
        );
        assert_eq!(code_for_http_status(StatusCode::IM_A_TEAPOT), Code::Unknown);
    }

    #[test]
    fn statuses_become_trailers() {
        let t = trailers(Status::with_details(
            Code::InvalidArgument,
            "bad; very",
            bytes::Bytes::from_static(b"\x08\x03"),
        ));
        assert_eq!(code_from_headers(&t), Some(Code::InvalidArgument));
        assert_eq!(t["grpc-message"], "bad;%20very");
        assert!(t.get("grpc-status-details-bin").is_some());
        assert!(t.get("content-type").is_none());
    }

    #[test]
    fn error_responses_are_trailers_only() {
        let r = error_response(Status::not_found("model 'x' is not registered"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(code_from_headers(r.headers()), Some(Code::NotFound));
        assert!(r.headers().get("grpc-message").is_some());
    }
}
