//! Upstream connections: a few lazily connected HTTP/2 channels per endpoint, used in turn.
//!
//! A tonic `Channel` multiplexes requests over one HTTP/2 connection, with a connect timeout,
//! keepalive PINGs and reconnection after failures. One connection is driven by one task, which
//! caps its throughput (the load benchmark measured ~30k small requests/s on one connection here),
//! so each endpoint gets `connections` channels and requests take them round-robin.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tonic::transport::{Channel, Endpoint};

/// Connection settings for upstreams.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval.
    pub keepalive_interval: Duration,
    /// HTTP/2 connections per endpoint.
    pub connections: usize,
}

/// The channels of one endpoint.
struct EndpointChannels {
    channels: Vec<Channel>,
    next: AtomicUsize,
}

/// Channels by endpoint.
pub struct Upstreams {
    settings: UpstreamSettings,
    endpoints: DashMap<String, Arc<EndpointChannels>>,
}

impl Upstreams {
    /// An empty pool.
    pub fn new(settings: UpstreamSettings) -> Self {
        Upstreams {
            settings,
            endpoints: DashMap::new(),
        }
    }

    /// A channel to `endpoint` (normalised `http://host:port`); the endpoint's channels are
    /// created on first use and handed out in turn.
    pub fn channel(&self, endpoint: &str) -> Result<Channel, tonic::transport::Error> {
        let set = match self.endpoints.get(endpoint) {
            Some(set) => set.clone(),
            None => {
                let s = &self.settings;
                let template = Endpoint::from_shared(endpoint.to_string())?
                    .connect_timeout(s.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(s.keepalive_interval)
                    .keep_alive_timeout(s.keepalive_interval.min(Duration::from_secs(20)))
                    .keep_alive_while_idle(true)
                    .http2_adaptive_window(true);
                let channels = (0..s.connections.max(1))
                    .map(|_| template.clone().connect_lazy())
                    .collect();
                let set = Arc::new(EndpointChannels {
                    channels,
                    next: AtomicUsize::new(0),
                });
                self.endpoints
                    .entry(endpoint.to_string())
                    .or_insert(set)
                    .clone()
            }
        };
        let i = set.next.fetch_add(1, Ordering::Relaxed) % set.channels.len();
        Ok(set.channels[i].clone())
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

/// True when `T` is anywhere in the cause chain of `err`.
pub fn caused_by<T: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(c) = cause {
        if c.is::<T>() {
            return true;
        }
        cause = c.source();
    }
    false
}
