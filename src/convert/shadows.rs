//! Shadows and their reports as the control API carries them.

use std::time::Duration;

use crate::convert::spec::duration_to_pb;
use crate::convert::timestamp;
use crate::pb::modelgate::v1 as pb;
use crate::shadow::Shadow;

/// Converts a shadow.
pub fn shadow_to_pb(s: &Shadow) -> pb::Shadow {
    pb::Shadow {
        model: s.model.clone(),
        version: s.version,
        sample_fraction: s.sample_fraction,
        comparison: Some((&s.comparison).into()),
        timeout: Some(duration_to_pb(Duration::from_millis(s.timeout_ms))),
        created_at: Some(timestamp(s.created_at_ms)),
    }
}

/// Latency percentiles (ms) of a histogram in microseconds.
pub fn latency(h: Option<&hdrhistogram::Histogram<u64>>) -> pb::LatencySummary {
    match h.filter(|h| !h.is_empty()) {
        Some(h) => pb::LatencySummary {
            count: h.len(),
            p50_ms: Some(h.value_at_quantile(0.5) as f64 / 1000.0),
            p99_ms: Some(h.value_at_quantile(0.99) as f64 / 1000.0),
        },
        None => pb::LatencySummary::default(),
    }
}
