//! Upstream connections: one lazily connected, pooled HTTP/2 channel per endpoint.
//!
//! A tonic `Channel` multiplexes every request to an endpoint over one HTTP/2 connection, with a
//! connect timeout, keepalive PINGs and reconnection after failures; it is cheap to clone.

use std::error::Error as StdError;
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
}

/// Channels by endpoint.
pub struct Upstreams {
    settings: UpstreamSettings,
    channels: DashMap<String, Channel>,
}

impl Upstreams {
    /// An empty pool.
    pub fn new(settings: UpstreamSettings) -> Self {
        Upstreams {
            settings,
            channels: DashMap::new(),
        }
    }

    /// The channel to `endpoint` (normalised `http://host:port`), created on first use.
    pub fn channel(&self, endpoint: &str) -> Result<Channel, tonic::transport::Error> {
        if let Some(c) = self.channels.get(endpoint) {
            return Ok(c.clone());
        }
        let s = &self.settings;
        let channel = Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(s.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(s.keepalive_interval)
            .keep_alive_timeout(s.keepalive_interval.min(Duration::from_secs(20)))
            .keep_alive_while_idle(true)
            .http2_adaptive_window(true)
            .connect_lazy();
        Ok(self
            .channels
            .entry(endpoint.to_string())
            .or_insert(channel)
            .clone())
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
