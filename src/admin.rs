//! The admin port: `/metrics` (Prometheus text 0.0.4, or OpenMetrics when the `Accept` header
//! asks for it), `/live` and `/ready`, over HTTP/1.1.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::telemetry::{Exposition, Metrics};

/// A probe's answer: `Err(reason)` when the answer is no.
pub type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The two probes.
#[derive(Clone)]
pub struct Probes {
    /// `/ready`: whether modelgate can serve traffic now.
    pub ready: Check,
    /// `/live`: whether it can still get there without a restart.
    pub live: Check,
    /// What `/ready` adds to a yes: a degraded but serving state (fleet mode with its Redis
    /// away).
    pub detail: Arc<dyn Fn() -> Option<String> + Send + Sync>,
}

/// Brings sampled metrics (RocksDB sizes, drift statistics) up to date before a scrape.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static parts are valid")
}

fn route(
    req: &Request<Incoming>,
    metrics: &Metrics,
    refresh: &Refresh,
    probes: &Probes,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            refresh();
            let format = Exposition::negotiate(
                req.headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let mut resp = text(
                StatusCode::OK,
                format.content_type(),
                metrics.encode(format),
            );
            // Caches must not serve one format to a client that asked for the other.
            resp.headers_mut()
                .insert(http::header::VARY, http::HeaderValue::from_static("accept"));
            resp
        }
        "/live" => match (probes.live)() {
            Ok(()) => text(StatusCode::OK, PLAIN, "live\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not live: {reason}\n"),
            ),
        },
        "/ready" => match (probes.ready)() {
            Ok(()) => match (probes.detail)() {
                None => text(StatusCode::OK, PLAIN, "ready\n".into()),
                Some(detail) => text(StatusCode::OK, PLAIN, format!("ready; {detail}\n")),
            },
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics, /live or /ready\n".into(),
        ),
    }
}

/// Serves the admin port until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: Refresh,
    probes: Probes,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the admin port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let (metrics, refresh, probes) = (metrics.clone(), refresh.clone(), probes.clone());
        let svc = hyper::service::service_fn(move |req| {
            let resp = route(&req, &metrics, &refresh, &probes);
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
