//! Webhooks: every event is POSTed as JSON to each configured URL whose filter it passes, from a
//! background task, in order, with retries and backoff. Plain HTTP only (TLS is not implemented).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::mpsc;

use crate::pb::modelgate::v1 as pb;
use crate::telemetry::Metrics;

/// Events waiting for delivery before new ones are dropped (and counted).
pub const QUEUE: usize = 10_000;
/// Attempts per delivery.
pub const ATTEMPTS: u32 = 5;

/// One webhook: where, and which event types (empty: all).
#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    /// `http://host:port/path`.
    pub url: http::Uri,
    /// Event types delivered; empty means every type.
    pub types: Vec<String>,
}

/// Parses `http://host:port/path` with an optional `#type,type` filter.
pub fn parse_webhook(s: &str) -> Result<Webhook, String> {
    let (url, filter) = s.split_once('#').unwrap_or((s, ""));
    let url: http::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    if url.scheme_str() != Some("http") {
        return Err(format!("'{url}': only http:// webhooks are supported"));
    }
    if url.host().is_none() {
        return Err(format!("'{url}' has no host"));
    }
    let types = filter
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Webhook { url, types })
}

/// The JSON body of an event.
pub fn event_json(e: &pb::Event) -> serde_json::Value {
    let time = e.time.as_ref().map(|t| {
        let st =
            std::time::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
        humantime::format_rfc3339_millis(st).to_string()
    });
    serde_json::json!({
        "cursor": e.cursor,
        "time": time,
        "type": e.r#type,
        "model": e.model,
        "version": e.version,
        "experiment": e.experiment,
        "features": e.features,
        "reason": e.reason,
        "message": e.message,
        "details": e.details,
    })
}

async fn post(url: &http::Uri, body: Bytes) -> Result<(), String> {
    let host = url.host().unwrap_or("localhost");
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = http::Request::post(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "modelgate")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no answer within 10s".to_string())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered HTTP {}", resp.status()))
    }
}

/// Starts the sender; returns the queue the event bus feeds.
pub fn spawn(hooks: Vec<Webhook>, metrics: Arc<Metrics>) -> Option<mpsc::Sender<Arc<pb::Event>>> {
    if hooks.is_empty() {
        return None;
    }
    let (tx, mut rx) = mpsc::channel::<Arc<pb::Event>>(QUEUE);
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            let body = Bytes::from(event_json(&e).to_string());
            for h in &hooks {
                if !(h.types.is_empty() || h.types.contains(&e.r#type)) {
                    continue;
                }
                let mut delay = Duration::from_millis(200);
                let mut attempt = 1;
                loop {
                    match post(&h.url, body.clone()).await {
                        Ok(()) => {
                            metrics.webhook_deliveries.inc();
                            break;
                        }
                        Err(err) if attempt >= ATTEMPTS => {
                            metrics.webhook_failures.inc();
                            tracing::warn!(url = %h.url, cursor = e.cursor, error = %err, "webhook delivery failed; giving up");
                            break;
                        }
                        Err(err) => {
                            tracing::debug!(url = %h.url, attempt, error = %err, "webhook delivery failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                            attempt += 1;
                        }
                    }
                }
            }
        }
    });
    Some(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_specs() {
        let w =
            parse_webhook("http://127.0.0.1:8080/hook#drift_started, retrain_triggered").unwrap();
        assert_eq!(w.url.port_u16(), Some(8080));
        assert_eq!(w.types, vec!["drift_started", "retrain_triggered"]);
        assert!(parse_webhook("http://h/x").unwrap().types.is_empty());
        assert!(parse_webhook("https://h/x").is_err());
        assert!(parse_webhook("not a url").is_err());
    }
}
