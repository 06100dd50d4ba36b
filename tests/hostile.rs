//! Hostile and malformed HTTP/2 from a raw client: frames written byte by byte on a TCP socket,
//! the way a broken or malicious peer would send them. Each test checks that the damage stays on
//! the offending stream or connection while a well-behaved client keeps being served, and that
//! the limits answer with the status a user can act on.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use modelgate::config::Config;
use modelgate::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tonic::Code;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

// Frame types and flags (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

// Error codes (RFC 9113 §7).
const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Debug)]
struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    fn error_code(&self) -> u32 {
        let at = if self.ty == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// A client that writes HTTP/2 frames by hand.
struct Raw {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
}

impl Raw {
    /// Connects and sends nothing.
    async fn tcp(addr: SocketAddr) -> Raw {
        let (rd, wr) = TcpStream::connect(addr).await.unwrap().into_split();
        Raw { rd, wr }
    }

    /// Connects and completes the HTTP/2 handshake: preface, SETTINGS both ways, both ACKed, so
    /// the server's limits are in force for every frame that follows.
    async fn handshake(addr: SocketAddr) -> Raw {
        let mut raw = Raw::tcp(addr).await;
        raw.write(PREFACE).await;
        raw.send(SETTINGS, 0, 0, &[]).await;
        let (mut got_settings, mut got_ack) = (false, false);
        while !(got_settings && got_ack) {
            let f = raw.read().await.expect("server answers the handshake");
            if f.ty == SETTINGS && f.flags & ACK == 0 {
                got_settings = true;
                raw.send(SETTINGS, ACK, 0, &[]).await;
            } else if f.ty == SETTINGS {
                got_ack = true;
            }
        }
        raw
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.write(&frame(ty, flags, stream, payload)).await;
    }

    async fn read(&mut self) -> Option<Frame> {
        read_frame(&mut self.rd).await
    }

    async fn read_to_close(&mut self) -> Vec<Frame> {
        read_to_close(&mut self.rd).await
    }

    /// Opens a gRPC call on `stream` and sends `message` as its only message.
    async fn call(&mut self, stream: u32, path: &str, message: &[u8]) {
        self.send(HEADERS, END_HEADERS, stream, &grpc_headers(path, &[]))
            .await;
        self.send(DATA, END_STREAM, stream, &grpc_frame(message))
            .await;
    }
}

/// The bytes of one frame.
fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(9 + payload.len());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    b.extend_from_slice(&[ty, flags]);
    b.extend_from_slice(&stream.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The next frame; None when the server closed the connection (or reset it).
async fn read_frame(rd: &mut OwnedReadHalf) -> Option<Frame> {
    let mut head = [0u8; 9];
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_exact(&mut head))
        .await
        .expect("the server neither sent a frame nor closed within 10 s");
    read.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    rd.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        ty: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    })
}

/// Reads until the connection closes, returning every frame the server sent.
async fn read_to_close(rd: &mut OwnedReadHalf) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(f) = read_frame(rd).await {
        frames.push(f);
    }
    frames
}

/// Writes `frames` while reading what the server sends, until it closes the connection; returns
/// what it sent.
async fn flood(raw: &mut Raw, frames: impl Iterator<Item = Vec<u8>>) -> Vec<Frame> {
    let Raw { rd, wr } = raw;
    let write = async {
        for f in frames {
            if wr.write_all(&f).await.is_err() {
                return; // the server hung up
            }
        }
        // Half-close: a server that took everything now sees the end of the connection.
        let _ = wr.shutdown().await;
    };
    tokio::join!(write, read_to_close(rd)).1
}

/// The GOAWAY a server sends when a peer abuses the protocol, with h2's reason.
fn assert_calm_down(frames: &[Frame], reason: &str) {
    let goaway = frames.iter().find(|f| f.ty == GOAWAY).expect("a GOAWAY");
    assert_eq!(goaway.error_code(), ENHANCE_YOUR_CALM, "{frames:?}");
    assert_eq!(&goaway.payload[8..], reason.as_bytes(), "{frames:?}");
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1); the prefix bits above N are zero.
fn hpack_int(out: &mut Vec<u8>, mut v: usize, prefix_bits: u32) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header field as "literal without indexing, new name" (RFC 7541 §6.2.2), no Huffman coding.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, name.len(), 7);
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, value.len(), 7);
    out.extend_from_slice(value);
}

/// The header block of a gRPC request to `path`.
fn grpc_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    .iter()
    .chain(extra)
    {
        hpack_literal(&mut b, n, v.as_bytes());
    }
    b
}

fn infer_message(model: &str) -> Vec<u8> {
    use prost::Message;
    infer_request(model, &[&[1.0, 2.0]]).encode_to_vec()
}

/// modelgate with model `iris` served by a model server answering after `latency`.
async fn gateway(
    config: Config,
    latency: &str,
) -> (Running, modelgate::model_server::RunningModelServer) {
    let ms = model_server(&format!(
        "name=iris;kind=linear;weights=1,1;latency={latency}"
    ))
    .await;
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &ms.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    (mg, ms)
}

/// An HTTP/2 client (the vendored h2 on this side too) connected to `addr`, ready to send.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// A call from a well-behaved client, started now and awaited later: it must succeed whatever
/// the raw client does meanwhile.
fn bystander(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = infer_client(addr).await;
        for _ in 0..3 {
            client
                .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
                .await
                .expect("a well-behaved client is served");
        }
    })
}

/// Whether the server ended a connection because of a protocol violation: a GOAWAY carrying an
/// error, or (when the violation came before the handshake) a bare close.
fn ended_with_error(frames: &[Frame]) -> bool {
    frames
        .iter()
        .filter(|f| f.ty == GOAWAY)
        .all(|f| f.error_code() != 0)
}

#[tokio::test]
async fn garbage_instead_of_http2_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "200ms").await;
    let calls = bystander(mg.data_addr);

    // (HTTP/1.1 is not junk: the data port serves REST callers on it — tests/rest.rs.)
    for junk in [&[0xff; 64][..], b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"] {
        let mut raw = Raw::tcp(mg.data_addr).await;
        let started = Instant::now();
        raw.write(junk).await;
        let frames = raw.read_to_close().await;
        assert!(ended_with_error(&frames), "{junk:?}: {frames:?}");
        // At once, not at the 10 s handshake timeout a server ignoring the bytes would reach.
        assert!(started.elapsed() < Duration::from_secs(3), "{junk:?}");
    }
    calls.await.unwrap();
    mg.shutdown().await;
}

#[tokio::test]
async fn connection_errors_end_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "200ms").await;
    let calls = bystander(mg.data_addr);

    // DATA on stream 0, which only carries connection frames.
    let mut raw = Raw::handshake(mg.data_addr).await;
    raw.send(DATA, 0, 0, b"hello").await;
    let frames = raw.read_to_close().await;
    let goaway = frames.iter().find(|f| f.ty == GOAWAY).expect("a GOAWAY");
    assert_eq!(goaway.error_code(), PROTOCOL_ERROR, "{frames:?}");

    // An upper-case header name: h2 rejects the whole header block, which also breaks the
    // connection's HPACK state, so the connection ends.
    let mut raw = Raw::handshake(mg.data_addr).await;
    let block = grpc_headers(INFER, &[("X-Upper", "1")]);
    raw.send(HEADERS, END_HEADERS | END_STREAM, 1, &block).await;
    let frames = raw.read_to_close().await;
    let goaway = frames.iter().find(|f| f.ty == GOAWAY).expect("a GOAWAY");
    assert_eq!(goaway.error_code(), PROTOCOL_ERROR, "{frames:?}");

    // A frame length over the 16 KiB SETTINGS_MAX_FRAME_SIZE the server advertised.
    let mut raw = Raw::handshake(mg.data_addr).await;
    raw.send(DATA, 0, 1, &vec![0; 20_000]).await;
    let frames = raw.read_to_close().await;
    assert!(frames.iter().any(|f| f.ty == GOAWAY), "{frames:?}");
    assert!(ended_with_error(&frames), "{frames:?}");

    // A header block that never ends (CVE-2024-27316): CONTINUATION frames past the header
    // limit, 4 MiB if the server let them all in.
    let mut raw = Raw::handshake(mg.data_addr).await;
    let started = Instant::now();
    let mut pad = Vec::new();
    hpack_literal(&mut pad, "x-pad", &[b'a'; 8000]);
    let first = frame(
        HEADERS,
        0,
        1,
        &[grpc_headers(INFER, &[]), pad.clone()].concat(),
    );
    let more = (0..512).map(|_| frame(CONTINUATION, 0, 1, &pad));
    let frames = flood(&mut raw, std::iter::once(first).chain(more)).await;
    assert_calm_down(&frames, "too_many_continuations");
    assert!(started.elapsed() < Duration::from_secs(5));

    calls.await.unwrap();
    mg.shutdown().await;
}

#[tokio::test]
async fn stream_errors_reset_that_stream_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "1ms").await;
    let mut raw = Raw::handshake(mg.data_addr).await;

    // Malformed requests (RFC 9113 §8.1.1), each on its own stream of one connection.
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", b"POST");
    hpack_literal(&mut block, ":scheme", b"http");
    hpack_literal(&mut block, ":authority", b"localhost");
    raw.send(HEADERS, END_HEADERS | END_STREAM, 1, &block).await; // no :path
    for (stream, (name, value)) in [
        (3, ("te", "gzip")),          // TE other than "trailers"
        (5, ("connection", "close")), // a connection-specific field
        (7, (":status", "200")),      // a response pseudo-header in a request
    ] {
        let block = grpc_headers(INFER, &[(name, value)]);
        raw.send(HEADERS, END_HEADERS | END_STREAM, stream, &block)
            .await;
    }
    // Stream 9: a good call on the same connection.
    raw.call(9, INFER, &infer_message("iris")).await;

    let mut reset = Vec::new();
    let mut answered = false;
    while !(answered && reset.len() == 4) {
        let f = raw.read().await.expect("the connection stays open");
        assert_ne!(f.ty, GOAWAY, "{f:?}");
        match (f.ty, f.stream) {
            (RST_STREAM, s) => {
                assert_eq!(f.error_code(), PROTOCOL_ERROR, "{f:?}");
                reset.push(s);
            }
            // The trailers that end the good call.
            (HEADERS, 9) if f.flags & END_STREAM != 0 => answered = true,
            _ => {}
        }
    }
    reset.sort();
    assert_eq!(reset, [1, 3, 5, 7]);
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"model="iris",version="1",experiment="",variant="",code="OK"} 1"#),
        "{metrics}"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn streams_over_the_per_connection_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.max_concurrent_streams = 2;
    let (mg, _ms) = gateway(config, "300ms").await;
    let mut raw = Raw::handshake(mg.data_addr).await;
    for stream in [1, 3, 5] {
        raw.call(stream, INFER, &infer_message("iris")).await;
    }
    // Stream 5 is refused when its HEADERS arrive; its DATA, already on the wire, then meets a
    // closed stream (STREAM_CLOSED). Streams 1 and 3 are served.
    let (mut refused, mut answered) = (Vec::new(), Vec::new());
    while refused.is_empty() || answered.len() < 2 {
        let f = raw.read().await.expect("the connection stays open");
        assert_ne!(f.ty, GOAWAY, "{f:?}");
        if f.ty == RST_STREAM {
            assert_eq!(f.stream, 5, "{f:?}");
            if f.error_code() == REFUSED_STREAM {
                refused.push(f.stream);
            }
        } else if f.ty == HEADERS && f.flags & END_STREAM != 0 {
            answered.push(f.stream);
        }
    }
    answered.sort();
    assert_eq!(answered, [1, 3]);
    // REFUSED_STREAM tells the client nothing was processed: the call may be retried as is.
    raw.call(7, INFER, &infer_message("iris")).await;
    loop {
        let f = raw.read().await.expect("the connection stays open");
        if f.ty == HEADERS && f.stream == 7 && f.flags & END_STREAM != 0 {
            break;
        }
        assert_ne!(f.ty, RST_STREAM, "{f:?}");
    }
    mg.shutdown().await;
}

#[tokio::test]
async fn oversized_metadata_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "1ms").await;
    let mut client = infer_client(mg.data_addr).await;
    let with_metadata = |bytes: usize| {
        let mut req = tonic::Request::new(infer_request("iris", &[&[1.0, 2.0]]));
        req.metadata_mut()
            .insert("x-pad", "a".repeat(bytes).parse().unwrap());
        req
    };
    client.model_infer(with_metadata(8_000)).await.unwrap();
    // Over the 16 KiB --max-header-bytes default, under twice it: modelgate reads the block and
    // says which limit it hit.
    let err = client.model_infer(with_metadata(20_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("exceeds the limit of 16384 bytes (--max-header-bytes)"),
        "{}",
        err.message()
    );
    // Over twice the limit: HTTP/2 refuses the block without buffering it.
    let err = client.model_infer(with_metadata(40_000)).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    // The connection is still good.
    client.model_infer(with_metadata(10)).await.unwrap();

    // The limit is a setting.
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.max_header_bytes = 4 * 1024;
    let (mg2, _ms2) = gateway(config, "1ms").await;
    let mut client = infer_client(mg2.data_addr).await;
    let err = client.model_infer(with_metadata(5_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limit of 4096 bytes"),
        "{}",
        err.message()
    );
    mg2.shutdown().await;
    mg.shutdown().await;
}

#[tokio::test]
async fn silent_connections_are_closed_at_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.handshake_timeout = Duration::from_millis(300);
    let (mg, _ms) = gateway(config, "1ms").await;

    // Connected, sends nothing.
    let started = Instant::now();
    let mut silent = Raw::tcp(mg.data_addr).await;
    let frames = silent.read_to_close().await;
    assert!(frames.iter().all(|f| f.ty == SETTINGS), "{frames:?}");
    let closed_after = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(3)).contains(&closed_after),
        "{closed_after:?}"
    );
    // Half a preface is not a preface.
    let mut partial = Raw::tcp(mg.data_addr).await;
    partial.write(&PREFACE[..10]).await;
    let frames = partial.read_to_close().await;
    assert!(frames.iter().all(|f| f.ty == SETTINGS), "{frames:?}");

    // A client that completed the handshake may stay idle: its connection is kept.
    let mut idle = Raw::handshake(mg.data_addr).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    idle.call(1, INFER, &infer_message("iris")).await;
    loop {
        let f = idle.read().await.expect("the idle connection was kept");
        if f.ty == HEADERS && f.stream == 1 && f.flags & END_STREAM != 0 {
            break;
        }
    }
    mg.shutdown().await;
}

#[tokio::test]
async fn rapid_resets_do_not_starve_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "20ms").await;
    let mut raw = Raw::handshake(mg.data_addr).await;
    let calls = bystander(mg.data_addr);
    // CVE-2023-44487: open a stream and cancel it at once, thousands of times.
    let headers = grpc_headers(INFER, &[]);
    let burst = (0..20_000u32).map(|i| {
        let stream = 1 + 2 * i;
        [
            frame(HEADERS, END_HEADERS, stream, &headers),
            frame(RST_STREAM, 0, stream, &0x8u32.to_be_bytes()),
        ]
        .concat()
    });
    let frames = flood(&mut raw, burst).await;
    assert_calm_down(&frames, "too_many_resets");
    calls.await.unwrap();
    let ready = http_get(mg.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_thousands_of_calls_keeps_the_connection() {
    // Each shed call is answered before its request body is read. If modelgate reset those
    // streams, the client's DATA frames arriving after would count as protocol errors, and h2
    // ends the connection after 1,024 of them (GOAWAY ENHANCE_YOUR_CALM): overload would kill
    // every call sharing the connection.
    use modelgate::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.max_in_flight = 1;
    config.queue_timeout = Duration::ZERO;
    let (mg, _ms) = gateway(config, "4s").await;
    let channel = common::channel(mg.data_addr).await;
    let mut holder = GrpcInferenceServiceClient::new(channel.clone());
    let held = tokio::spawn(async move {
        holder
            .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
            .await
    });
    // The slot is taken once the in-flight gauge says so.
    wait_for_metric(
        mg.admin_addr,
        "modelgate_in_flight_requests 1",
        Duration::from_secs(5),
    )
    .await;

    // Callers stop at 3,000 calls or when the held call ends (after which calls are admitted).
    let (next, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let mut client = GrpcInferenceServiceClient::new(channel.clone());
            let (next, done) = (next.clone(), done.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                while !done.load(Ordering::Acquire) && next.fetch_add(1, Ordering::Relaxed) < 3000 {
                    let result = client
                        .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
                        .await;
                    if !done.load(Ordering::Acquire) {
                        codes.push(result.map_or_else(|e| e.code(), |_| Code::Ok));
                    }
                }
                codes
            })
        })
        .collect();
    let held = tokio::spawn(async move {
        let r = held.await.unwrap();
        done.store(true, Ordering::Release);
        r
    });
    let mut shed = 0;
    for c in callers {
        for code in c.await.unwrap() {
            assert_eq!(code, Code::ResourceExhausted);
            shed += 1;
        }
    }
    assert!(
        shed > 1024,
        "only {shed} calls were shed before the held call ended"
    );
    held.await
        .unwrap()
        .expect("the call holding the slot completes on the same connection");
    mg.shutdown().await;
}

/// modelgate's HTTP/2 (vendored h2, vendor/README.md) writes HPACK string literals raw, not
/// Huffman-coded, which any decoder must accept (RFC 7541 §5.2) and costs far less to write. The
/// request id is a per-call value: a literal never indexed, with its name spelled out.
#[tokio::test]
async fn response_header_blocks_are_raw_literals() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "1ms").await;
    let mut raw = Raw::handshake(mg.data_addr).await;
    raw.call(1, INFER, &infer_message("iris")).await;
    let block = loop {
        let f = raw.read().await.expect("the call is answered");
        if f.ty == HEADERS && f.stream == 1 {
            assert!(
                f.flags & END_HEADERS != 0,
                "one frame holds the block: {f:?}"
            );
            break f.payload;
        }
    };
    // Never indexed, new name (0x10), then the name's length with the Huffman bit clear.
    let name = b"x-modelgate-request-id";
    let mut field = vec![0x10, name.len() as u8];
    field.extend_from_slice(name);
    let at = block
        .windows(field.len())
        .position(|w| w == field)
        .unwrap_or_else(|| panic!("no raw never-indexed request id in {block:02x?}"));
    let rest = &block[at + field.len()..];
    let len = rest[0] as usize;
    assert!(
        rest[0] & 0x80 == 0,
        "the value is Huffman-coded: {block:02x?}"
    );
    let id = std::str::from_utf8(&rest[1..1 + len]).unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "request id {id:?}");
    mg.shutdown().await;
}

/// modelgate's HTTP/2 encodes header blocks against the static table only (vendor/README.md):
/// no field is added to the dynamic table, so every representation is a static index or a
/// literal without (or never) indexing — on the first call of a connection and on the next.
#[tokio::test]
async fn header_blocks_never_add_to_the_dynamic_table() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "1ms").await;
    let mut raw = Raw::handshake(mg.data_addr).await;
    for stream in [1, 3, 5] {
        raw.call(stream, INFER, &infer_message("iris")).await;
        let mut blocks = Vec::new();
        while blocks.len() < 2 {
            let f = raw.read().await.expect("the call is answered");
            if f.ty == HEADERS && f.stream == stream {
                assert!(f.flags & END_HEADERS != 0, "one frame holds the block");
                blocks.push(f.payload);
            }
        }
        // The response's headers, then its trailers.
        let fields: Vec<Vec<Field>> = blocks.iter().map(|b| hpack_fields(b)).collect();
        for (block, fields) in blocks.iter().zip(&fields) {
            for f in fields {
                assert!(
                    !matches!(f, Field::Incremental | Field::Indexed(62..)),
                    "stream {stream}: {f:?} in {block:02x?}"
                );
            }
        }
        assert!(
            fields[0].contains(&Field::Indexed(8)),
            ":status 200, indexed"
        );
        assert!(
            fields[1].contains(&Field::Literal(b"grpc-status".to_vec(), b"0".to_vec())),
            "{:?}",
            fields[1]
        );
    }
    mg.shutdown().await;
}

/// One HPACK field representation (RFC 7541 §6), as far as the test above tells them apart.
#[derive(Debug, PartialEq)]
enum Field {
    /// Indexed: its index.
    Indexed(usize),
    /// Literal with incremental indexing (added to the dynamic table).
    Incremental,
    /// Literal without or never indexing, a new name and its value.
    Literal(Vec<u8>, Vec<u8>),
    /// Literal without or never indexing, the name by index.
    IndexedName(usize, Vec<u8>),
    /// Dynamic table size update.
    SizeUpdate,
}

/// Reads a header block's representations; strings must be raw (modelgate sends no Huffman).
fn hpack_fields(mut b: &[u8]) -> Vec<Field> {
    fn int(b: &mut &[u8], prefix: u32) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = (b[0] as usize) & max;
        *b = &b[1..];
        if v == max {
            let mut shift = 0;
            loop {
                let byte = b[0];
                *b = &b[1..];
                v += ((byte & 0x7f) as usize) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn string(b: &mut &[u8]) -> Vec<u8> {
        assert!(b[0] & 0x80 == 0, "a Huffman-coded string");
        let len = int(b, 7);
        let s = b[..len].to_vec();
        *b = &b[len..];
        s
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let first = b[0];
        out.push(if first & 0x80 != 0 {
            Field::Indexed(int(&mut b, 7))
        } else if first & 0xc0 == 0x40 {
            let name = int(&mut b, 6);
            if name == 0 {
                string(&mut b);
            }
            string(&mut b);
            Field::Incremental
        } else if first & 0xe0 == 0x20 {
            int(&mut b, 5);
            Field::SizeUpdate
        } else {
            match int(&mut b, 4) {
                0 => {
                    let name = string(&mut b);
                    Field::Literal(name, string(&mut b))
                }
                i => Field::IndexedName(i, string(&mut b)),
            }
        });
    }
    out
}

/// The vendored h2 checks connection-specific fields (RFC 9113 §8.2.2) in one pass over the
/// names instead of five lookups: the rule is the same, whether the field is first, last or the
/// only one.
#[tokio::test]
async fn h2_still_refuses_connection_specific_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "1ms").await;
    let mut client = h2_client(mg.data_addr).await;
    let request = |extra: &[(&str, &str)]| {
        let mut req = http::Request::post(format!("http://{}{INFER}", mg.data_addr));
        for (n, v) in extra {
            req = req.header(*n, *v);
        }
        req.header("content-type", "application/grpc")
            .body(())
            .unwrap()
    };
    for bad in [
        ("connection", "close"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("keep-alive", "5"),
        ("proxy-connection", "keep-alive"),
        ("te", "gzip"),
    ] {
        let first = client.send_request(request(&[bad]), true);
        assert!(first.is_err(), "{bad:?} was sent");
        let last = client.send_request(request(&[("x-a", "1"), ("x-b", "2"), bad]), true);
        assert!(last.is_err(), "{bad:?} after others was sent");
    }
    let (response, _) = client
        .send_request(request(&[("te", "trailers"), ("x-keep-alive", "5")]), true)
        .expect("te: trailers and look-alike names are allowed");
    // An empty body is not a message: the call is answered with an error status, not reset.
    let resp = response.await.expect("the request was sent and answered");
    assert_eq!(resp.status(), 200);
    mg.shutdown().await;
}

/// The vendored h2 decodes a header block into a map with room for 12 fields (vendor/README.md),
/// so that the headers modelgate adds to a call's request and response do not make `http`'s map
/// double and rehash on every call. Checked on a response decoded by the same h2, after a
/// request carrying a gRPC client's usual headers.
#[tokio::test]
async fn decoded_header_maps_have_room_for_modelgate_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _ms) = gateway(Config::for_tests(dir.path()), "1ms").await;
    let mut client = h2_client(mg.data_addr).await;
    let req = http::Request::post(format!("http://{}{INFER}", mg.data_addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "grpc-python/1.0")
        .header("grpc-accept-encoding", "identity,deflate,gzip")
        .header("grpc-timeout", "5S")
        .header("x-user-id", "user-1")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    body.send_data(grpc_frame(&infer_message("iris")), true)
        .unwrap();
    let resp = response.await.expect("the call is answered");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().contains_key("x-modelgate-request-id"),
        "{:?}",
        resp.headers()
    );
    assert!(
        resp.headers().capacity() >= 12,
        "a decoded map has room for {} fields",
        resp.headers().capacity()
    );
    let mut data = resp.into_body();
    while let Some(chunk) = data.data().await {
        chunk.expect("the answer's body");
    }
    let trailers = data.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
    mg.shutdown().await;
}
