//! A model server's error reaches the caller as a direct caller would see it: every shape an
//! upstream can answer an error in — trailers-only (the status in the response headers, as tonic,
//! grpc-go and Python gRPC answer an error before any message), headers then trailers, a message
//! then an error trailer, RST_STREAM before or after the headers, GOAWAY — with its status,
//! message and `grpc-status-details-bin`, on the OIP path, the pass-through path and streams.
//!
//! The upstream is a raw HTTP/2 server (the `h2` crate) that answers in the shape a request's
//! `x-shape` header asks for; the caller is a raw HTTP/2 client that sees frames as they are, so
//! "trailers-only" is checked the way grpc-go and gRPC's C core read it: the status in a HEADERS
//! frame that ends the stream. grpcurl and NVIDIA's tritonclient are the real callers at the end.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response};
use modelgate::pb::modelgate::v1 as pb;

const DETAILS: &str = "CAMSGmlucHV0ICdpbnB1dCcgaGFzIHNoYXBlIFsxLCAzXQ";
const MESSAGE: &str = "input 'input' has shape [1, 3]; model 'm' expects [batch, 2]";

/// A raw HTTP/2 upstream answering each request in the shape its `x-shape` header names.
/// Returns its endpoint and how many requests it has received.
async fn shape_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let shape = req
                        .headers()
                        .get("x-shape")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("ok")
                        .to_string();
                    if shape == "goaway" {
                        // The connection ends with an error while the call is under way.
                        conn.abrupt_shutdown(h2::Reason::INTERNAL_ERROR);
                        std::mem::forget(respond);
                        let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
                        return;
                    }
                    tokio::spawn(answer(req, respond, shape, n));
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn error_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from_static("3"));
    h.insert(
        "grpc-message",
        HeaderValue::from_static("input 'input' has shape [1, 3]%3B model 'm' expects [batch, 2]"),
    );
    h.insert("grpc-status-details-bin", HeaderValue::from_static(DETAILS));
    h
}

fn grpc_head() -> Response<()> {
    let mut r = Response::new(());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

/// One framed message (its content does not matter to the caller's status).
fn framed() -> Bytes {
    Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])
}

async fn answer(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    shape: String,
    n: usize,
) {
    // Read the request whole first, as a unary server does.
    let mut body = req.into_body();
    while let Some(Ok(d)) = body.data().await {
        let _ = body.flow_control().release_capacity(d.len());
    }
    match shape.as_str() {
        "trailers-only" => {
            let mut head = grpc_head();
            head.headers_mut().extend(error_headers());
            respond.send_response(head, true).unwrap();
        }
        "headers-trailers" => {
            let mut s = respond.send_response(grpc_head(), false).unwrap();
            s.send_trailers(error_headers()).unwrap();
        }
        "body-error" => {
            let mut s = respond.send_response(grpc_head(), false).unwrap();
            s.send_data(framed(), false).unwrap();
            s.send_trailers(error_headers()).unwrap();
        }
        "rst-cancel" => respond.send_reset(h2::Reason::CANCEL),
        "rst-calm" => respond.send_reset(h2::Reason::ENHANCE_YOUR_CALM),
        "rst-mid" => {
            let mut s = respond.send_response(grpc_head(), false).unwrap();
            s.send_data(framed(), false).unwrap();
            // Let the message leave before the reset.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            s.send_reset(h2::Reason::INTERNAL_ERROR);
        }
        // Refused unprocessed the first time (even request numbers), served the second.
        "refuse-once" if n % 2 == 0 => respond.send_reset(h2::Reason::REFUSED_STREAM),
        _ => {
            let mut s = respond.send_response(grpc_head(), false).unwrap();
            s.send_data(framed(), false).unwrap();
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            s.send_trailers(t).unwrap();
        }
    }
}

/// What a gRPC client concludes from an answer, and the shape it came in.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    /// The response HEADERS frame ended the stream (a trailers-only answer).
    trailers_only: bool,
    /// gRPC status code: from the trailers-only headers, the trailers, or the reset.
    code: Option<i32>,
    message: Option<String>,
    details: Option<String>,
    /// Data bytes received.
    data: usize,
    /// The stream was reset (the reason), or the connection closed.
    reset: Option<String>,
}

/// Calls `path` on `addr` with a raw HTTP/2 client, sending `body` and `headers`.
async fn call(addr: SocketAddr, path: &str, body: Bytes, headers: &[(&str, &str)]) -> Seen {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(body, true).unwrap();
    let mut seen = Seen {
        trailers_only: false,
        code: None,
        message: None,
        details: None,
        data: 0,
        reset: None,
    };
    let status_from = |h: &HeaderMap, seen: &mut Seen| {
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string());
        seen.code = get("grpc-status").map(|c| c.parse().unwrap());
        seen.message = get("grpc-message");
        seen.details = get("grpc-status-details-bin");
    };
    let resp = match response.await {
        Ok(r) => r,
        Err(e) => {
            seen.reset = Some(format!("{:?}", e.reason()));
            return seen;
        }
    };
    let (parts, mut body) = resp.into_parts();
    assert_eq!(parts.status, 200);
    if body.is_end_stream() {
        seen.trailers_only = true;
        status_from(&parts.headers, &mut seen);
        return seen;
    }
    loop {
        match body.data().await {
            Some(Ok(d)) => {
                seen.data += d.len();
                let _ = body.flow_control().release_capacity(d.len());
            }
            Some(Err(e)) => {
                seen.reset = Some(format!("{:?}", e.reason()));
                return seen;
            }
            None => break,
        }
    }
    match body.trailers().await {
        Ok(Some(t)) => status_from(&t, &mut seen),
        Ok(None) => {}
        Err(e) => seen.reset = Some(format!("{:?}", e.reason())),
    }
    seen
}

/// modelgate in front of a shape server, with model `m` in production on it.
async fn setup(dir: &std::path::Path) -> (modelgate::server::Running, String, Arc<AtomicUsize>) {
    let (endpoint, seen) = shape_server().await;
    let mg = start(dir).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "m", &endpoint).await;
    promote(&mut reg, "m", "1").await;
    (mg, endpoint, seen)
}

fn infer_body() -> Bytes {
    use prost::Message;
    grpc_frame(&infer_request("m", &[&[1.0, 2.0, 3.0]]).encode_to_vec())
}

/// A kind of call: its name, its path, and the headers it needs.
type CallKind = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

/// The ways a call crosses modelgate: an OIP unary call, Triton's inference stream (routed by
/// its first message), and pass-through unary and streaming calls.
fn paths() -> [CallKind; 4] {
    [
        ("OIP", "/inference.GRPCInferenceService/ModelInfer", vec![]),
        (
            "OIP stream",
            "/inference.GRPCInferenceService/ModelStreamInfer",
            vec![],
        ),
        (
            "pass-through",
            "/modelgate.testing.Echo/Unary",
            vec![("x-model-name", "m")],
        ),
        (
            "stream",
            "/modelgate.testing.Echo/BidiStream",
            vec![("x-model-name", "m")],
        ),
    ]
}

#[tokio::test]
async fn error_shapes_reach_the_caller_as_the_model_server_sent_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, endpoint, _) = setup(dir.path()).await;
    let direct: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    for (kind, path, extra) in paths() {
        for shape in ["trailers-only", "headers-trailers", "body-error"] {
            let mut headers = extra.clone();
            headers.push(("x-shape", shape));
            let want = call(direct, path, infer_body(), &headers).await;
            let got = call(mg.data_addr, path, infer_body(), &headers).await;
            assert_eq!(want.code, Some(3), "{kind} {shape}: {want:?}");
            assert_eq!(got, want, "{kind} {shape}: through modelgate vs direct");
            assert_eq!(
                percent_decode(got.message.as_deref().unwrap()),
                MESSAGE,
                "{kind} {shape}"
            );
        }
    }
    mg.shutdown().await;
}

#[tokio::test]
async fn resets_and_goaways_become_the_status_grpc_gives_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, endpoint, _) = setup(dir.path()).await;
    for (kind, path, extra) in paths() {
        // (shape, the status gRPC's HTTP/2 spec maps the failure to, what the message says)
        for (shape, code, says) in [
            ("rst-cancel", 1, "RST_STREAM CANCEL"),
            ("rst-calm", 8, "RST_STREAM ENHANCE_YOUR_CALM"),
            ("rst-mid", 13, "RST_STREAM INTERNAL_ERROR"),
            // The upstream accepted the call, then closed the connection: h2 reports only that
            // the connection ended (a GOAWAY is reported on the calls it left out, which are
            // sent again), and a gRPC client says UNAVAILABLE.
            ("goaway", 14, "failed while answering"),
        ] {
            let mut headers = extra.clone();
            headers.push(("x-shape", shape));
            let got = call(mg.data_addr, path, infer_body(), &headers).await;
            assert_eq!(
                got.reset, None,
                "{kind} {shape}: a status, not a reset: {got:?}"
            );
            assert_eq!(got.code, Some(code), "{kind} {shape}: {got:?}");
            let message = percent_decode(got.message.as_deref().unwrap_or_default());
            assert!(
                message.contains(says) && message.contains(&endpoint),
                "{kind} {shape}: {message}"
            );
        }
    }
    let page = http_get(mg.admin_addr, "/metrics").await;
    // Per path: two resets before the answer, one during it, one connection closed.
    let n = paths().len() as f64;
    assert_eq!(
        metric_sum(&page, "modelgate_upstream_errors_total", "kind=\"reset\""),
        3.0 * n,
        "{page}"
    );
    assert_eq!(
        metric_sum(&page, "modelgate_upstream_errors_total", "kind=\"body\""),
        n
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn a_call_refused_unprocessed_is_sent_once_more() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, _, seen) = setup(dir.path()).await;
    let before = seen.load(Ordering::SeqCst);
    let got = call(
        mg.data_addr,
        "/inference.GRPCInferenceService/ModelInfer",
        infer_body(),
        &[("x-shape", "refuse-once")],
    )
    .await;
    assert_eq!(got.code, Some(0), "{got:?}");
    assert_eq!(
        seen.load(Ordering::SeqCst) - before,
        2,
        "refused, then served"
    );
    // A relayed stream has been read from the caller: never sent twice.
    let before = seen.load(Ordering::SeqCst);
    let got = call(
        mg.data_addr,
        "/modelgate.testing.Echo/BidiStream",
        infer_body(),
        &[("x-shape", "refuse-once"), ("x-model-name", "m")],
    )
    .await;
    assert_eq!(got.code, Some(14), "{got:?}");
    assert_eq!(seen.load(Ordering::SeqCst) - before, 1);
    mg.shutdown().await;
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The built-in model server answers a wrong shape with a trailers-only INVALID_ARGUMENT.
async fn wrong_shape_setup(dir: &std::path::Path) -> (modelgate::server::Running, String) {
    let server = model_server("name=iris;kind=linear;weights=2,3;bias=1").await;
    let mg = start(dir).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "iris".into(),
        endpoint: server.endpoint(),
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "iris", "1").await;
    std::mem::forget(server);
    (mg, "iris".into())
}

#[tokio::test]
async fn grpcurl_sees_the_model_servers_error() {
    let Some(g) = grpcurl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mg, model) = wrong_shape_setup(dir.path()).await;
    let data = mg.data_addr.to_string();
    let infer = format!(
        r#"{{"model_name":"{model}","inputs":[{{"name":"input","datatype":"FP32","shape":[1,3],"contents":{{"fp32_contents":[1,1,1]}}}}]}}"#
    );
    let (ok, out) = run_tool(
        &g,
        &[
            "-plaintext",
            "-d",
            &infer,
            &data,
            "inference.GRPCInferenceService/ModelInfer",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("Code: InvalidArgument") && out.contains("has shape [1, 3]"),
        "{out}"
    );
    assert!(!out.contains("without sending trailers"), "{out}");
    mg.shutdown().await;
}

#[tokio::test]
async fn tritonclient_sees_the_model_servers_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mg, model) = wrong_shape_setup(dir.path()).await;
    let Some(out) = python_peer(
        "triton_error.py",
        &[&mg.data_addr.to_string(), &model],
        "tritonclient.grpc",
    )
    .await
    else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "StatusCode.INVALID_ARGUMENT", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("has shape [1, 3]"),
        "{v}"
    );
    mg.shutdown().await;
}
