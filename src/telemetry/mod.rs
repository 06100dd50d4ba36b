//! Prometheus metrics and logs.

pub mod sharded;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::Code;

pub use sharded::{ShardedCounter, ShardedHistogram};

/// Labels of a data-plane request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model name, empty when the request never resolved one.
    pub model: String,
    /// Version number, empty when none.
    pub version: String,
    /// Experiment the request was in, empty when none.
    pub experiment: String,
    /// Its variant, empty when none.
    pub variant: String,
    /// gRPC status name, e.g. `OK`, `NOT_FOUND`.
    pub code: String,
}

/// Labels of the request latency histogram (every request label but the status).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: String,
    /// Experiment, empty when none.
    pub experiment: String,
    /// Variant, empty when none.
    pub variant: String,
}

/// Labels of an upstream endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `http://host:port`.
    pub endpoint: String,
}

/// Labels of an upstream failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `http://host:port`.
    pub endpoint: String,
    /// `connect`, `http_status`, `body`.
    pub kind: String,
}

/// Labels of a model version (shadows).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: String,
}

/// Labels of what happened to a request a shadow could have received.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// Model name.
    pub model: String,
    /// The shadow's version number.
    pub version: String,
    /// `mirrored`, `dropped` (cap reached), `suppressed` (breaker open), `skipped` (not
    /// sampled), `timeout`, `error`.
    pub outcome: String,
}

/// Labels of an experiment variant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabels {
    /// Experiment name.
    pub experiment: String,
    /// Variant name.
    pub variant: String,
}

/// Labels of an experiment variant's outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Experiment name.
    pub experiment: String,
    /// Variant name.
    pub variant: String,
    /// `success`, `failure` or `unjudged`.
    pub result: String,
}

/// Per-variant outcome counters, for Prometheus-based rollout analysis (Flagger, Argo
/// Rollouts): summed over a fleet's pods they are the fleet's figures.
impl crate::app::outcomes::OutcomeObserver for Metrics {
    fn observe_outcome(&self, _: &str, _: u32, _: &crate::outcome::Judgement) {}

    fn observe_variant_outcome(
        &self,
        experiment: &str,
        variant: &str,
        judgement: &crate::outcome::Judgement,
        value: Option<f64>,
    ) {
        let result = match judgement.success {
            Some(true) => "success",
            Some(false) => "failure",
            None => "unjudged",
        };
        self.experiment_outcomes
            .get_or_create(&OutcomeLabels {
                experiment: experiment.to_string(),
                variant: variant.to_string(),
                result: result.to_string(),
            })
            .inc();
        if let Some(x) = value {
            let l = VariantLabels {
                experiment: experiment.to_string(),
                variant: variant.to_string(),
            };
            self.experiment_outcome_value_sum
                .get_or_create(&l)
                .inc_by(x);
            self.experiment_outcome_value_count.get_or_create(&l).inc();
        }
    }
}

/// Labels of a monitored feature.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabels {
    /// Model name.
    pub model: String,
    /// Feature name.
    pub feature: String,
}

/// Labels of a data-plane thread.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabels {
    /// The data thread's index, from 0.
    pub thread: String,
}

/// Labels of a RocksDB column family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// Column family.
    pub family: String,
}

/// Latency histograms (50 µs … ~3.3 s), written per data thread (see [`sharded`]).
type HistogramFamily<L> = Family<L, ShardedHistogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric modelgate exports.
pub struct Metrics {
    registry: Registry,
    /// Finished data-plane requests (counted per data thread, see [`sharded`]).
    pub requests: Family<RequestLabels, ShardedCounter>,
    /// Request duration through modelgate, until the response body ends.
    pub request_duration: HistogramFamily<LatencyLabels>,
    /// Time from sending a request upstream to the end of its answer (OIP unary) or its response
    /// head (streams).
    pub upstream_duration: HistogramFamily<UpstreamLabels>,
    /// Requests in flight.
    pub in_flight: Gauge,
    /// Requests waiting for an in-flight slot.
    pub queued: Gauge,
    /// Requests refused because of the in-flight limit.
    pub shed: Counter,
    /// Open data-port connections per data thread.
    pub connections: Family<ThreadLabels, Gauge>,
    /// Upstream failures.
    pub upstream_errors: Family<EndpointLabels, Counter>,
    /// Shadow copies by outcome.
    pub shadow_requests: Family<ShadowLabels, Counter>,
    /// Rows (or messages) compared between production and a shadow.
    pub shadow_compared: Family<VersionLabels, Counter>,
    /// Those that agreed.
    pub shadow_agreed: Family<VersionLabels, Counter>,
    /// Requests counted in an experiment, per variant.
    pub experiment_requests: Family<VariantLabels, Counter>,
    /// Outcomes counted in an experiment, per variant and result.
    pub experiment_outcomes: Family<OutcomeLabels, Counter>,
    /// Sum of the numeric outcomes counted in an experiment, per variant.
    pub experiment_outcome_value_sum:
        Family<VariantLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Numeric outcomes counted in an experiment, per variant.
    pub experiment_outcome_value_count: Family<VariantLabels, Counter>,
    /// Latest drift test statistic per feature (KS D or chi-square).
    pub drift_statistic: Family<FeatureLabels, FloatGauge>,
    /// Its p-value (Benjamini–Hochberg adjusted).
    pub drift_p_value: Family<FeatureLabels, FloatGauge>,
    /// 1 while the feature is drifted.
    pub drift_drifted: Family<FeatureLabels, Gauge>,
    /// Prediction records committed to RocksDB.
    pub records_written: Counter,
    /// Prediction records dropped because the queue was full.
    pub records_dropped: Counter,
    /// Write batches the record writer committed.
    pub record_batches: Counter,
    /// Prediction records lost to failed writes.
    pub record_write_errors: Counter,
    /// Prediction records waiting in the queue.
    pub record_queue_depth: Gauge,
    /// Bytes of SST files per column family.
    pub rocksdb_sst_bytes: Family<FamilyLabels, Gauge>,
    /// Bytes of memtables per column family.
    pub rocksdb_memtable_bytes: Family<FamilyLabels, Gauge>,
    /// Estimated live data per column family.
    pub rocksdb_live_data_bytes: Family<FamilyLabels, Gauge>,
    /// Memory of open files' readers outside the block cache, per column family.
    pub rocksdb_table_readers_bytes: Family<FamilyLabels, Gauge>,
    /// Bytes in RocksDB's block cache (shared by every column family).
    pub rocksdb_block_cache_bytes: Gauge,
    /// Of those, bytes pinned by readers.
    pub rocksdb_block_cache_pinned_bytes: Gauge,
    /// The process's resident memory (VmRSS).
    pub resident_memory_bytes: Gauge,
    /// The process's peak resident memory since it started (VmHWM).
    pub resident_memory_peak_bytes: Gauge,
    /// 1 while RocksDB stops writes (a write stall).
    pub rocksdb_write_stopped: Gauge,
    /// 1 while the fleet's Redis answers (0 while it does not, and without a fleet).
    pub fleet_store_up: Gauge,
    /// The version of the fleet's configuration this replica serves.
    pub fleet_config_version: Gauge,
    /// The rate RocksDB slows writes to, in bytes per second; 0 when it does not.
    pub rocksdb_delayed_write_rate: Gauge,
    /// Time writes have been stalled since the database opened.
    pub rocksdb_stall_seconds: FloatGauge,
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
        let mut r = Registry::with_prefix("modelgate");
        macro_rules! metric {
            ($name:expr, $help:expr, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
            ($name:expr, $help:expr, $unit:expr, $m:expr) => {{
                let m = $m;
                r.register_with_unit($name, $help, $unit, m.clone());
                m
            }};
        }
        let seconds = || prometheus_client::registry::Unit::Seconds;
        let bytes = || prometheus_client::registry::Unit::Bytes;
        Metrics {
            requests: metric!(
                "requests",
                "Data-plane requests by model, version, experiment, variant and gRPC status (from trailers, else headers)",
                Family::default()
            ),
            request_duration: metric!(
                "request_duration",
                "Time from request arrival to the end of the response, through modelgate",
                seconds(),
                HistogramFamily::<LatencyLabels>::default()
            ),
            upstream_duration: metric!(
                "upstream_request_duration",
                "Time the upstream took: to the end of an OIP answer, to the response head of a stream",
                seconds(),
                HistogramFamily::<UpstreamLabels>::default()
            ),
            in_flight: metric!(
                "in_flight_requests",
                "Data-plane requests being served",
                Gauge::default()
            ),
            queued: metric!(
                "queued_requests",
                "Data-plane requests waiting for an in-flight slot (--max-in-flight, --queue-timeout)",
                Gauge::default()
            ),
            connections: metric!(
                "data_connections",
                "Open data-port connections per data thread (--data-threads); new ones go to the thread with the fewest",
                Family::default()
            ),
            shed: metric!(
                "shed_requests",
                "Requests refused with RESOURCE_EXHAUSTED by the in-flight limit and its queue",
                Counter::default()
            ),
            upstream_errors: metric!(
                "upstream_errors",
                "Upstream failures by endpoint and kind",
                Family::default()
            ),
            shadow_requests: metric!(
                "shadow_requests",
                "Requests a shadow could have received, by outcome: mirrored, dropped, suppressed, skipped, timeout, error",
                Family::default()
            ),
            shadow_compared: metric!(
                "shadow_compared",
                "Rows (or messages) compared between production and a shadow",
                Family::default()
            ),
            shadow_agreed: metric!(
                "shadow_agreed",
                "Compared rows (or messages) on which the shadow agreed with production",
                Family::default()
            ),
            experiment_requests: metric!(
                "experiment_requests",
                "Requests counted in an experiment, per variant",
                Family::default()
            ),
            experiment_outcomes: metric!(
                "experiment_outcomes",
                "Outcomes counted in an experiment, per variant and result (success, failure, or unjudged for numeric outcomes without a verdict); an overwritten outcome counts again",
                Family::default()
            ),
            experiment_outcome_value_sum: metric!(
                "experiment_outcome_value_sum",
                "Sum of the numeric outcomes counted in an experiment, per variant",
                Family::default()
            ),
            experiment_outcome_value_count: metric!(
                "experiment_outcome_value_count",
                "Numeric outcomes counted in an experiment, per variant",
                Family::default()
            ),
            drift_statistic: metric!(
                "drift_statistic",
                "Latest drift test statistic per feature: KS D (numeric) or chi-square (categorical)",
                Family::default()
            ),
            drift_p_value: metric!(
                "drift_p_value",
                "Latest drift p-value per feature, Benjamini-Hochberg adjusted",
                Family::default()
            ),
            drift_drifted: metric!(
                "drift_drifted",
                "1 while a feature has drifted",
                Family::default()
            ),
            records_written: metric!(
                "records_written",
                "Prediction records committed to RocksDB",
                Counter::default()
            ),
            records_dropped: metric!(
                "records_dropped",
                "Prediction records dropped because the record queue was full",
                Counter::default()
            ),
            record_batches: metric!(
                "record_batches",
                "Write batches the record writer committed (records written per batch: the \
                 ratio of the two counters)",
                Counter::default()
            ),
            record_write_errors: metric!(
                "record_write_errors",
                "Prediction records lost because RocksDB refused the write",
                Counter::default()
            ),
            record_queue_depth: metric!(
                "record_queue_depth",
                "Prediction records waiting for the writer",
                Gauge::default()
            ),
            rocksdb_sst_bytes: metric!(
                "rocksdb_sst",
                "Size of SST files per column family",
                bytes(),
                Family::default()
            ),
            rocksdb_memtable_bytes: metric!(
                "rocksdb_memtable",
                "Size of memtables per column family",
                bytes(),
                Family::default()
            ),
            rocksdb_live_data_bytes: metric!(
                "rocksdb_live_data",
                "Estimated live data per column family",
                bytes(),
                Family::default()
            ),
            rocksdb_table_readers_bytes: metric!(
                "rocksdb_table_readers",
                "Memory of open SST files' readers outside the block cache, per column family",
                bytes(),
                Family::default()
            ),
            rocksdb_block_cache_bytes: metric!(
                "rocksdb_block_cache",
                "Bytes in RocksDB's block cache, shared by every column family (index and filter blocks included)",
                bytes(),
                Gauge::default()
            ),
            rocksdb_block_cache_pinned_bytes: metric!(
                "rocksdb_block_cache_pinned",
                "Bytes of the block cache pinned by readers",
                bytes(),
                Gauge::default()
            ),
            resident_memory_bytes: metric!(
                "resident_memory",
                "The process's resident memory (VmRSS)",
                bytes(),
                Gauge::default()
            ),
            resident_memory_peak_bytes: metric!(
                "resident_memory_peak",
                "The process's peak resident memory (VmHWM: since it started, or since the peak was last reset through /proc/<pid>/clear_refs)",
                bytes(),
                Gauge::default()
            ),
            fleet_store_up: metric!(
                "fleet_store_up",
                "1 while the fleet's Redis (--fleet-store) answers; 0 while it does not, and without --fleet-store",
                Gauge::default()
            ),
            fleet_config_version: metric!(
                "fleet_config_version",
                "The version of the fleet's shared configuration this replica serves (0 without --fleet-store)",
                Gauge::default()
            ),
            rocksdb_write_stopped: metric!(
                "rocksdb_write_stopped",
                "1 while RocksDB stops writes (a write stall)",
                Gauge::default()
            ),
            rocksdb_delayed_write_rate: metric!(
                "rocksdb_delayed_write_rate",
                "Bytes per second RocksDB slows writes to; 0 when writes are not delayed",
                Gauge::default()
            ),
            rocksdb_stall_seconds: metric!(
                "rocksdb_write_stall",
                "Time writes have been stalled since the database opened",
                seconds(),
                FloatGauge::default()
            ),
            webhook_deliveries: metric!(
                "webhook_deliveries",
                "Events delivered to webhooks",
                Counter::default()
            ),
            webhook_failures: metric!(
                "webhook_failures",
                "Webhook deliveries that failed after every retry",
                Counter::default()
            ),
            webhook_dropped: metric!(
                "webhook_dropped",
                "Events not sent to webhooks because the sender's queue was full",
                Counter::default()
            ),
            registry: r,
        }
    }

    /// The text exposition in `format`.
    pub fn encode(&self, format: Exposition) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Prometheus => openmetrics_to_prometheus(&out),
        }
    }

    /// Counts a finished request and its latency. The label sets are resolved once per route and
    /// experiment variant and cached in `cache`, so the request path allocates nothing here.
    pub fn observe_request(
        &self,
        cache: Option<&RouteMetrics>,
        route: Option<(&str, &str)>,
        experiment: Option<&(Arc<str>, Arc<str>)>,
        code: Code,
        seconds: f64,
    ) {
        let (Some(cache), Some((model, version))) = (cache, route) else {
            self.requests
                .get_or_create(&RequestLabels {
                    model: String::new(),
                    version: String::new(),
                    experiment: String::new(),
                    variant: String::new(),
                    code: code_name(code).to_string(),
                })
                .inc();
            return;
        };
        // Found by reference in a snapshot of the list: reading it writes nothing shared (an
        // `ArcSwap` load), where a lock or an `Arc` clone wrote a line both data threads use.
        let entries = cache.entries.load();
        let entry = match entries.iter().find(|e| e.is_for(experiment)) {
            Some(e) => e,
            None => {
                drop(entries);
                self.add_route_entry(cache, model, version, experiment);
                return self.observe_request(Some(cache), route, experiment, code, seconds);
            }
        };
        entry.duration.observe(seconds);
        entry.codes[code as usize % 17]
            .get_or_init(|| {
                let (exp, var) = experiment_labels(experiment);
                self.requests
                    .get_or_create(&RequestLabels {
                        model: model.to_string(),
                        version: version.to_string(),
                        experiment: exp,
                        variant: var,
                        code: code_name(code).to_string(),
                    })
                    .clone()
            })
            .inc();
    }

    /// Adds a route's series for `experiment` (once: callers racing here add one).
    fn add_route_entry(
        &self,
        cache: &RouteMetrics,
        model: &str,
        version: &str,
        experiment: Option<&(Arc<str>, Arc<str>)>,
    ) {
        let _one_at_a_time = cache.adding.lock();
        let entries = cache.entries.load();
        if entries.iter().any(|e| e.is_for(experiment)) {
            return;
        }
        let (exp, var) = experiment_labels(experiment);
        let mut next = Vec::with_capacity(entries.len() + 1);
        next.extend(entries.iter().cloned());
        next.push(Arc::new(RouteEntry {
            experiment: experiment.cloned(),
            duration: self
                .request_duration
                .get_or_create(&LatencyLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                    experiment: exp,
                    variant: var,
                })
                .clone(),
            codes: Default::default(),
        }));
        cache.entries.store(Arc::new(next));
    }

    /// The open-connections gauge of data thread `thread`.
    pub fn data_connections(&self, thread: usize) -> Gauge {
        self.connections
            .get_or_create(&ThreadLabels {
                thread: thread.to_string(),
            })
            .clone()
    }

    /// The upstream latency histogram of `endpoint`, resolved once per route.
    pub fn upstream_histogram<'a>(
        &self,
        cache: &'a RouteMetrics,
        endpoint: &str,
    ) -> &'a ShardedHistogram {
        cache.upstream.get_or_init(|| {
            self.upstream_duration
                .get_or_create(&UpstreamLabels {
                    endpoint: endpoint.to_string(),
                })
                .clone()
        })
    }
}

/// The two text formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4: the default, what `curl`, `promtool check metrics` and most
    /// tools read.
    Prometheus,
    /// OpenMetrics 1.0.0 text, for scrapers that ask for it (Prometheus itself does).
    OpenMetrics,
}

impl Exposition {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of any text/plain range
    /// (`text/plain`, `text/*`, `*/*`), else Prometheus text. No header, or one naming neither,
    /// gets Prometheus text rather than 406: a scrape should never fail over a header.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Exposition::OpenMetrics
        } else {
            Exposition::Prometheus
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The process's resident memory and its peak, in bytes (`VmRSS` and `VmHWM` of
/// `/proc/self/status`); `None` where there is no such file.
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |field: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(field))?;
        line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
    };
    Some((kib("VmRSS:")? * 1024, kib("VmHWM:")? * 1024))
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4 (the crate writes only
/// OpenMetrics). A family is named as its samples are — a counter `x`, whose samples are
/// `x_total`, becomes `x_total` in `# HELP` and `# TYPE`, else Prometheus reads the samples as an
/// untyped metric without help — and the lines 0.0.4 does not have (`# UNIT`, `# EOF`) go.
/// modelgate registers no exemplars and no `_created` samples, the other OpenMetrics-only parts.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes HELP before TYPE; HELP needs the family's name from TYPE.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, text)| text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                kind => (name.to_string(), kind),
            };
            if let Some(text) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if !(line.starts_with("# UNIT ") || line == "# EOF") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The metric handles of one route, resolved on first use and cached on the route
/// (`routing::Extension`).
#[derive(Default)]
pub struct RouteMetrics {
    /// One entry per experiment variant seen on the route (and one outside any): read on every
    /// call, replaced whole when one is added.
    entries: arc_swap::ArcSwap<Vec<Arc<RouteEntry>>>,
    /// Held while adding an entry.
    adding: parking_lot::Mutex<()>,
    upstream: OnceLock<ShardedHistogram>,
}

struct RouteEntry {
    experiment: Option<(Arc<str>, Arc<str>)>,
    duration: ShardedHistogram,
    codes: [OnceLock<ShardedCounter>; 17],
}

impl RouteEntry {
    /// Whether this is the series of `experiment`'s variant (or of calls outside any).
    fn is_for(&self, experiment: Option<&(Arc<str>, Arc<str>)>) -> bool {
        self.experiment.as_ref() == experiment
    }
}

/// The `experiment` and `variant` label values of a call in `experiment`'s variant (empty
/// outside any).
fn experiment_labels(experiment: Option<&(Arc<str>, Arc<str>)>) -> (String, String) {
    experiment
        .map(|(e, v)| (e.to_string(), v.to_string()))
        .unwrap_or_default()
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

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global log subscriber. `RUST_LOG`, when set, overrides `filter`. Text logs are
/// coloured only on a terminal (and without `NO_COLOR`): a file, a pipe or a log collector gets
/// plain text, not escape codes.
pub fn init_logging(format: LogFormat, filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(filter));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
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
        let cache = RouteMetrics::default();
        let exp: (Arc<str>, Arc<str>) = ("ab".into(), "treatment".into());
        for _ in 0..2 {
            m.observe_request(
                Some(&cache),
                Some(("iris", "2")),
                None,
                Code::NotFound,
                0.003,
            );
        }
        m.observe_request(
            Some(&cache),
            Some(("iris", "2")),
            Some(&exp),
            Code::Ok,
            0.001,
        );
        m.observe_request(None, None, None, Code::InvalidArgument, 0.0);
        let text = m.encode(Exposition::Prometheus);
        for line in [
            r#"modelgate_requests_total{model="iris",version="2",experiment="",variant="",code="NOT_FOUND"} 2"#,
            r#"modelgate_requests_total{model="iris",version="2",experiment="ab",variant="treatment",code="OK"} 1"#,
            r#"modelgate_requests_total{model="",version="",experiment="",variant="",code="INVALID_ARGUMENT"} 1"#,
            r#"modelgate_request_duration_seconds_count{model="iris",version="2",experiment="ab",variant="treatment"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            text.contains("modelgate_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("modelgate_shed_requests_total 0"), "{text}");
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        use Exposition::*;
        for (accept, format) in [
            (None, Prometheus),
            (Some("*/*"), Prometheus),
            (Some("text/plain"), Prometheus),
            (Some("application/json"), Prometheus),
            (Some("application/openmetrics-text"), OpenMetrics),
            // What Prometheus 2.x sends.
            (
                Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
                OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=0.5, */*"), Prometheus),
            (Some("Application/OpenMetrics-Text; q=0"), Prometheus),
            (Some("text/plain;version=0.0.4;q=0.3, application/openmetrics-text;q=0.4"), OpenMetrics),
        ] {
            assert_eq!(Exposition::negotiate(accept), format, "{accept:?}");
        }
        assert!(Prometheus
            .content_type()
            .starts_with("text/plain; version=0.0.4"));
        assert!(OpenMetrics
            .content_type()
            .starts_with("application/openmetrics-text; version=1.0.0"));
    }

    #[test]
    fn prometheus_text_names_families_as_their_samples() {
        let m = Metrics::new();
        m.shed.inc();
        // Families without a series are not written at all; give the histogram one.
        let cache = RouteMetrics::default();
        m.observe_request(Some(&cache), Some(("iris", "2")), None, Code::Ok, 0.001);
        let openmetrics = m.encode(Exposition::OpenMetrics);
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        assert!(openmetrics.contains("# TYPE modelgate_shed_requests counter\n"));
        let text = m.encode(Exposition::Prometheus);
        for expected in [
            "# HELP modelgate_shed_requests_total Requests refused with RESOURCE_EXHAUSTED by the in-flight limit and its queue.\n# TYPE modelgate_shed_requests_total counter\nmodelgate_shed_requests_total 1\n",
            "# TYPE modelgate_request_duration_seconds histogram\n",
            "# TYPE modelgate_in_flight_requests gauge\nmodelgate_in_flight_requests 0\n",
            "# TYPE modelgate_queued_requests gauge\nmodelgate_queued_requests 0\n",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
        assert!(
            !text.contains("# UNIT") && !text.contains("# EOF"),
            "{text}"
        );
        // Every sample line is the same in both formats.
        let samples = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(samples(&text), samples(&openmetrics));
    }
}
