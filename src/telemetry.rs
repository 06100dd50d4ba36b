//! Prometheus metrics and logs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::config::LogFormat;

/// Labels of a data-plane request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model name, empty when the request never resolved one.
    pub model: String,
    /// Version number, empty when none.
    pub version: String,
    /// gRPC status name, e.g. `OK`, `NOT_FOUND`.
    pub code: String,
}

/// Labels of a model version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: String,
}

/// Labels of an upstream endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `http://host:port`.
    pub endpoint: String,
    /// `connect`, `deadline`, `http_status`, `body`.
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100µs … ~6.5s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric modelgate exports.
pub struct Metrics {
    registry: Registry,
    /// Finished data-plane requests.
    pub requests: Family<RequestLabels, Counter>,
    /// Request duration through modelgate, until the response body ends.
    pub request_duration: HistogramFamily<VersionLabels>,
    /// Requests in flight.
    pub in_flight: Gauge,
    /// Requests refused because of the in-flight limit.
    pub shed: Counter,
    /// Upstream failures.
    pub upstream_errors: Family<EndpointLabels, Counter>,
    /// Prediction records committed to RocksDB.
    pub records_written: Counter,
    /// Prediction records dropped because the queue was full.
    pub records_dropped: Counter,
    /// Prediction records lost to failed writes.
    pub record_write_errors: Counter,
    /// Prediction records waiting in the queue.
    pub record_queue_depth: Gauge,
    /// Events POSTed to webhooks.
    pub webhook_deliveries: Counter,
    /// Webhook deliveries that failed after every retry.
    pub webhook_failures: Counter,
    /// Events not handed to the webhook sender because its queue was full.
    pub webhook_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("modelgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Data-plane requests by model, version and gRPC status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<VersionLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from request arrival to the end of the response, through modelgate",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Data-plane requests being served",
            in_flight.clone(),
        );
        let shed = Counter::default();
        registry.register(
            "shed_requests",
            "Requests refused with RESOURCE_EXHAUSTED by the in-flight limit",
            shed.clone(),
        );
        let upstream_errors = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by endpoint and kind",
            upstream_errors.clone(),
        );
        let records_written = Counter::default();
        registry.register(
            "records_written",
            "Prediction records committed to RocksDB",
            records_written.clone(),
        );
        let records_dropped = Counter::default();
        registry.register(
            "records_dropped",
            "Prediction records dropped because the record queue was full",
            records_dropped.clone(),
        );
        let record_write_errors = Counter::default();
        registry.register(
            "record_write_errors",
            "Prediction records lost because RocksDB refused the write",
            record_write_errors.clone(),
        );
        let record_queue_depth = Gauge::default();
        registry.register(
            "record_queue_depth",
            "Prediction records waiting for the writer",
            record_queue_depth.clone(),
        );
        let webhook_deliveries = Counter::default();
        registry.register(
            "webhook_deliveries",
            "Events delivered to webhooks",
            webhook_deliveries.clone(),
        );
        let webhook_failures = Counter::default();
        registry.register(
            "webhook_failures",
            "Webhook deliveries that failed after every retry",
            webhook_failures.clone(),
        );
        let webhook_dropped = Counter::default();
        registry.register(
            "webhook_dropped",
            "Events not sent to webhooks because the sender's queue was full",
            webhook_dropped.clone(),
        );
        Metrics {
            registry,
            webhook_deliveries,
            webhook_failures,
            webhook_dropped,
            records_written,
            records_dropped,
            record_write_errors,
            record_queue_depth,
            requests,
            request_duration,
            in_flight,
            shed,
            upstream_errors,
        }
    }

    /// Prometheus / OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The canonical upper-case name of a gRPC code, as Prometheus labels and logs use it.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Installs the global log subscriber. `RUST_LOG`, when set, overrides `filter`.
pub fn init_logging(format: LogFormat, filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_prometheus_naming() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                model: "iris".into(),
                version: "2".into(),
                code: code_name(Code::NotFound).into(),
            })
            .inc();
        m.request_duration
            .get_or_create(&VersionLabels {
                model: "iris".into(),
                version: "2".into(),
            })
            .observe(0.003);
        let text = m.encode();
        assert!(
            text.contains(
                r#"modelgate_requests_total{model="iris",version="2",code="NOT_FOUND"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("modelgate_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("modelgate_shed_requests_total 0"), "{text}");
    }
}
