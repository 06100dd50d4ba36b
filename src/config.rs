//! Settings for `modelgate serve`: flags, `MODELGATE_*` environment variables and an optional TOML
//! config file, merged and validated into a [`Config`] before any port is bound.
//!
//! Precedence, highest first: command-line flag, environment variable, config file, built-in
//! default. Environment and file values are installed as clap defaults, so one parser checks every
//! value and its errors name the flag. The environment is passed in (never read from the process
//! here), so tests do not touch global state.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::registry;
use crate::store::records::Retention;

/// Prefix of every environment variable modelgate reads.
pub const ENV_PREFIX: &str = "MODELGATE_";

/// Shortest `--state-poll-interval`: polling is a `stat` per tick, but a zero interval would spin.
const MIN_STATE_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `modelgate serve`. Every flag can also be set as `MODELGATE_<NAME>` (upper case,
/// underscores) or as `<name>` (underscores or dashes) in the `--config` TOML file.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML config file (env MODELGATE_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Data port: gRPC from applications (env MODELGATE_LISTEN).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9000")]
    pub listen: SocketAddr,

    /// Control port: the modelgate.v1 API (env MODELGATE_CONTROL_LISTEN).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9001")]
    pub control_listen: SocketAddr,

    /// Admin port: /metrics, /live, /ready over HTTP/1.1 (env MODELGATE_ADMIN_LISTEN).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9002")]
    pub admin_listen: SocketAddr,

    /// RocksDB directory, created if missing (env MODELGATE_DATA_DIR).
    #[arg(long, value_name = "DIR", default_value = "./modelgate-data")]
    pub data_dir: PathBuf,

    /// Model serving calls that name none: non-OIP methods without an x-model-name header
    /// (env MODELGATE_DEFAULT_MODEL).
    #[arg(long, value_name = "MODEL")]
    pub default_model: Option<String>,

    /// Bearer token the control API requires; none means no authentication
    /// (env MODELGATE_CONTROL_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    pub control_token: Option<String>,

    /// Requests in flight on the data port beyond which new ones get RESOURCE_EXHAUSTED
    /// (env MODELGATE_MAX_IN_FLIGHT).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Largest OIP request message modelgate reads, in bytes (env MODELGATE_MAX_MESSAGE_BYTES).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Most elements an OIP input tensor may declare (the product of its shape); larger calls get
    /// RESOURCE_EXHAUSTED, and records decode no more from a tensor
    /// (env MODELGATE_MAX_TENSOR_ELEMENTS).
    #[arg(long, value_name = "N", default_value_t = crate::oip::DEFAULT_MAX_ELEMENTS)]
    pub max_tensor_elements: usize,

    /// Concurrent HTTP/2 streams allowed per client connection (env MODELGATE_MAX_CONCURRENT_STREAMS).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_concurrent_streams: u32,

    /// Largest request header block (metadata), in bytes as HTTP/2 counts them; larger calls get
    /// RESOURCE_EXHAUSTED, and blocks over twice the limit are refused by HTTP/2 itself
    /// (env MODELGATE_MAX_HEADER_BYTES).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Threads serving the data port, each with its own connections; 0 means one per CPU core
    /// (env MODELGATE_DATA_THREADS).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub data_threads: usize,

    /// HTTP/2 connections modelgate opens to each upstream endpoint, per data thread, used in
    /// turn (env MODELGATE_UPSTREAM_CONNECTIONS).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub upstream_connections: usize,

    /// Time allowed to open a connection to an upstream (env MODELGATE_CONNECT_TIMEOUT).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Deadline for a unary call whose caller sets no grpc-timeout (env MODELGATE_REQUEST_TIMEOUT).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// HTTP/2 keepalive PING interval on upstream and client connections
    /// (env MODELGATE_KEEPALIVE_INTERVAL).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// Time a new data-port connection has to finish its TLS handshake, and then to send the
    /// HTTP/2 preface, before it is closed (env MODELGATE_HANDSHAKE_TIMEOUT).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// How long RocksDB writes may fail with an error it does not recover from by itself
    /// (anything but a full disk) before `/live` answers 503, asking for a restart
    /// (env MODELGATE_WRITE_FAILURE_DEADLINE).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub write_failure_deadline: Duration,

    /// How long shutdown waits for in-flight requests (env MODELGATE_SHUTDOWN_GRACE).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Metadata key (and OIP request parameter) carrying the caller's unit id
    /// (env MODELGATE_UNIT_KEY).
    #[arg(long, value_name = "KEY", default_value = "x-user-id")]
    pub unit_key: String,

    /// Input tensor (one id per row) or OIP request parameter naming the feature-store entity;
    /// the unit id is used when neither is present (env MODELGATE_ENTITY_KEY).
    #[arg(long, value_name = "NAME", default_value = "entity_id")]
    pub entity_key: String,

    /// How long records are kept: one duration for all, or per family, e.g.
    /// `predictions=7d,outcomes=30d,features=1d` (env MODELGATE_RETENTION).
    #[arg(long, value_name = "SPEC", default_value = "7d", value_parser = parse_retention)]
    pub retention: Retention,

    /// Store a prediction record (request, features, answer) for every inference call; `false`
    /// keeps only what experiments, shadows and drift monitoring need (env
    /// MODELGATE_RECORD_PREDICTIONS).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub record_predictions: bool,

    /// Prediction records waiting for the writer before new ones are dropped
    /// (env MODELGATE_RECORD_QUEUE).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub record_queue: usize,

    /// Bytes the waiting records may hold before new ones are dropped
    /// (env MODELGATE_RECORD_QUEUE_BYTES).
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    pub record_queue_bytes: usize,

    /// Shadow copies in flight at most; more are dropped and counted, never queued
    /// (env MODELGATE_MAX_SHADOW_IN_FLIGHT).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_shadow_in_flight: usize,

    /// Live values per feature in the drift window (env MODELGATE_DRIFT_WINDOW).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub drift_window: usize,

    /// New rows between drift evaluations (env MODELGATE_DRIFT_EVERY).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub drift_every: u64,

    /// Least time between two drift evaluations of a model, however fast rows arrive
    /// (env MODELGATE_DRIFT_MIN_INTERVAL).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub drift_min_interval: Duration,

    /// False discovery rate of the Benjamini–Hochberg correction across features
    /// (env MODELGATE_DRIFT_FDR).
    #[arg(long, value_name = "RATE", default_value_t = 0.05)]
    pub drift_fdr: f64,

    /// A feature stops drifting only after its adjusted p-value has been above this for
    /// --drift-exit-evaluations evaluations in a row (env MODELGATE_DRIFT_EXIT_P_VALUE).
    #[arg(long, value_name = "P", default_value_t = 0.2)]
    pub drift_exit_p_value: f64,

    /// Evaluations in a row above --drift-exit-p-value that end a feature's drift
    /// (env MODELGATE_DRIFT_EXIT_EVALUATIONS).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub drift_exit_evaluations: u32,

    /// Largest reference sample; larger uploads are uniformly sampled
    /// (env MODELGATE_DRIFT_REFERENCE_MAX).
    #[arg(long, value_name = "ROWS", default_value_t = 10_000)]
    pub drift_reference_max: usize,

    /// Outcomes per version in the concept-drift window (env MODELGATE_CONCEPT_WINDOW).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub concept_window: usize,

    /// Accuracy drop (or MAE rise) beyond which a version's performance has drifted
    /// (env MODELGATE_CONCEPT_THRESHOLD).
    #[arg(long, value_name = "DELTA", default_value_t = 0.1)]
    pub concept_threshold: f64,

    /// Performance drift ends only after the degradation has been at most this for
    /// --concept-exit-outcomes outcomes in a row; default: half of --concept-threshold
    /// (env MODELGATE_CONCEPT_EXIT_THRESHOLD).
    #[arg(long, value_name = "DELTA")]
    pub concept_exit_threshold: Option<f64>,

    /// Outcomes in a row at most --concept-exit-threshold that end a version's performance drift
    /// (env MODELGATE_CONCEPT_EXIT_OUTCOMES).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub concept_exit_outcomes: u32,

    /// Shadow agreement below which a shadow_agreement_low event fires
    /// (env MODELGATE_SHADOW_AGREEMENT_ALERT).
    #[arg(long, value_name = "RATE", default_value_t = 0.9)]
    pub shadow_agreement_alert: f64,

    /// POST every event as JSON to this URL, optionally only some types: `http://h:p/path#type,type`;
    /// repeatable (env MODELGATE_WEBHOOK, whitespace-separated).
    #[arg(long = "webhook", value_name = "URL", action = clap::ArgAction::Append)]
    pub webhook: Vec<String>,

    /// Export traces over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317`; none means
    /// no tracing (env MODELGATE_OTLP_ENDPOINT, else the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Declarative state: a TOML file of models, versions, experiments and shadows applied at
    /// start (before the data port serves) and again whenever it changes, so that every replica
    /// converges to the same state; see docs/declarative-state.md (env MODELGATE_STATE_FILE).
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,

    /// How often the --state-file is checked for changes (env MODELGATE_STATE_POLL_INTERVAL).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub state_poll_interval: Duration,

    /// Serve the data port over TLS with this certificate chain, PEM, leaf first (with
    /// --tls-key; env MODELGATE_TLS_CERT).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert, PEM (env MODELGATE_TLS_KEY).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Require data-port clients to present a certificate issued by a CA in this PEM bundle
    /// (mTLS; env MODELGATE_TLS_CLIENT_CA).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Verify https:// upstreams against the CAs in this PEM bundle instead of the system's
    /// trusted roots (env MODELGATE_UPSTREAM_CA).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// Client certificate chain, PEM, presented to https:// upstreams (with --upstream-key;
    /// env MODELGATE_UPSTREAM_CERT).
    #[arg(long, value_name = "FILE")]
    pub upstream_cert: Option<PathBuf>,

    /// Private key of --upstream-cert, PEM (env MODELGATE_UPSTREAM_KEY).
    #[arg(long, value_name = "FILE")]
    pub upstream_key: Option<PathBuf>,

    /// Serve the control port over TLS with this certificate chain, PEM (with
    /// --control-tls-key; env MODELGATE_CONTROL_TLS_CERT).
    #[arg(long, value_name = "FILE")]
    pub control_tls_cert: Option<PathBuf>,

    /// Private key of --control-tls-cert, PEM (env MODELGATE_CONTROL_TLS_KEY).
    #[arg(long, value_name = "FILE")]
    pub control_tls_key: Option<PathBuf>,

    /// Require control-port clients to present a certificate issued by a CA in this PEM bundle
    /// (mTLS, in addition to --control-token; env MODELGATE_CONTROL_CLIENT_CA).
    #[arg(long, value_name = "FILE")]
    pub control_client_ca: Option<PathBuf>,

    /// Log format (env MODELGATE_LOG_FORMAT).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `modelgate=debug` (env MODELGATE_LOG_LEVEL; RUST_LOG also works).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
}

/// Parses a retention: `7d` for every family, or `predictions=7d,outcomes=30d,features=1d`
/// (families not named keep the 7-day default).
pub fn parse_retention(s: &str) -> Result<Retention, String> {
    let positive = |v: &str| -> Result<Duration, String> {
        let d = parse_duration(v)?;
        if d < Duration::from_secs(1) {
            return Err(format!("'{v}' is shorter than one second"));
        }
        Ok(d)
    };
    if !s.contains('=') {
        let d = positive(s.trim())?;
        return Ok(Retention {
            predictions: d,
            outcomes: d,
            features: d,
        });
    }
    let mut r = Retention::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (family, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not family=duration"))?;
        let d = positive(v.trim())?;
        match family.trim() {
            "predictions" => r.predictions = d,
            "outcomes" => r.outcomes = d,
            "features" => r.features = d,
            other => {
                return Err(format!(
                    "unknown family '{other}'; expected predictions, outcomes or features"
                ))
            }
        }
    }
    Ok(r)
}

/// Parses `250ms`, `2s`, `1m30s`…
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 500ms or 2s: {e}"))
}

/// Validated settings of `modelgate serve`.
#[derive(Clone)]
pub struct Config {
    /// Data port address.
    pub listen: SocketAddr,
    /// Control port address.
    pub control_listen: SocketAddr,
    /// Admin port address.
    pub admin_listen: SocketAddr,
    /// RocksDB directory.
    pub data_dir: PathBuf,
    /// Model for calls that name none.
    pub default_model: Option<String>,
    /// Control API bearer token.
    pub control_token: Option<String>,
    /// In-flight request limit on the data port.
    pub max_in_flight: usize,
    /// Largest OIP request read.
    pub max_message_bytes: usize,
    /// Most elements per OIP input tensor.
    pub max_tensor_elements: usize,
    /// HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Largest request header block.
    pub max_header_bytes: usize,
    /// Data-plane threads (at least 1).
    pub data_threads: usize,
    /// HTTP/2 connections per upstream endpoint.
    pub upstream_connections: usize,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Default unary deadline.
    pub request_timeout: Duration,
    /// HTTP/2 keepalive interval.
    pub keepalive_interval: Duration,
    /// Data-port TLS handshake and HTTP/2 preface deadline.
    pub handshake_timeout: Duration,
    /// Unrecoverable write failures before `/live` fails.
    pub write_failure_deadline: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Unit id metadata key / parameter.
    pub unit_key: String,
    /// Feature-store entity input / parameter.
    pub entity_key: String,
    /// Record retention.
    pub retention: Retention,
    /// OTLP/gRPC collector for traces.
    pub otlp_endpoint: Option<String>,
    /// Whether every inference call is stored as a prediction record.
    pub record_predictions: bool,
    /// Record queue length.
    pub record_queue: usize,
    /// Record queue bytes.
    pub record_queue_bytes: usize,
    /// Shadow copies in flight at most.
    pub max_shadow_in_flight: usize,
    /// Drift settings.
    pub drift: crate::monitor::DriftSettings,
    /// Webhooks.
    pub webhooks: Vec<crate::webhook::Webhook>,
    /// Declarative state file, applied at start and on change.
    pub state_file: Option<PathBuf>,
    /// How often the state file is checked for changes.
    pub state_poll_interval: Duration,
    /// TLS on the data port (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    pub tls: Option<crate::tls::ServerTlsFiles>,
    /// TLS towards `https://` upstreams (`--upstream-ca`, `--upstream-cert`, `--upstream-key`).
    pub upstream_tls: crate::tls::UpstreamTlsFiles,
    /// TLS on the control port (`--control-tls-cert`, `--control-tls-key`,
    /// `--control-client-ca`).
    pub control_tls: Option<crate::tls::ServerTlsFiles>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never print it.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("control_listen", &self.control_listen)
            .field("admin_listen", &self.admin_listen)
            .field("data_dir", &self.data_dir)
            .field("default_model", &self.default_model)
            .field(
                "control_token",
                &self.control_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_in_flight", &self.max_in_flight)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_tensor_elements", &self.max_tensor_elements)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("upstream_connections", &self.upstream_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("write_failure_deadline", &self.write_failure_deadline)
            .field("request_timeout", &self.request_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("unit_key", &self.unit_key)
            .field("entity_key", &self.entity_key)
            .field("retention", &self.retention)
            .field("record_queue", &self.record_queue)
            .field("record_queue_bytes", &self.record_queue_bytes)
            .field("max_shadow_in_flight", &self.max_shadow_in_flight)
            .field("drift", &self.drift)
            .field("webhooks", &self.webhooks)
            .field("state_file", &self.state_file)
            .field("state_poll_interval", &self.state_poll_interval)
            // Paths only: key material is never loaded into the configuration.
            .field("tls", &self.tls)
            .field("upstream_tls", &self.upstream_tls)
            .field("control_tls", &self.control_tls)
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .finish()
    }
}

impl Config {
    /// Settings for tests and embedding: every port on 127.0.0.1:0, data in `data_dir`.
    pub fn for_tests(data_dir: &Path) -> Config {
        let args = ServeArgs::parse_from_defaults();
        let mut c = Config::from_args(args).expect("defaults are valid");
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        c.listen = any;
        c.control_listen = any;
        c.admin_listen = any;
        c.data_dir = data_dir.to_path_buf();
        c.shutdown_grace = Duration::from_secs(2);
        // Tests drive a few hundred rows and expect every evaluation they ask for.
        c.drift.min_interval = Duration::ZERO;
        // Two data threads whatever the machine, so tests exercise the thread-per-core path.
        c.data_threads = 2;
        c
    }

    /// Checks settings that clap's types cannot.
    pub fn from_args(a: ServeArgs) -> Result<Config, ConfigError> {
        let bad =
            |setting: &'static str, message: String| ConfigError::Invalid { setting, message };
        let ports = [
            ("listen", a.listen),
            ("control_listen", a.control_listen),
            ("admin_listen", a.admin_listen),
        ];
        for (i, (name, addr)) in ports.iter().enumerate() {
            for (other, other_addr) in &ports[i + 1..] {
                if addr.port() != 0 && addr == other_addr {
                    return Err(bad(
                        name,
                        format!("{addr} is also the {other} address; each port needs its own"),
                    ));
                }
            }
        }
        if a.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty".into()));
        }
        if let Some(m) = &a.default_model {
            registry::validate_model_name(m, "default_model")
                .map_err(|e| bad("default_model", e.to_string()))?;
        }
        if let Some(t) = &a.control_token {
            if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    "control_token",
                    "must be non-empty with no whitespace or control characters".into(),
                ));
            }
        }
        if a.max_in_flight == 0 {
            return Err(bad("max_in_flight", "must be at least 1".into()));
        }
        if !(1024..=1 << 30).contains(&a.max_message_bytes) {
            return Err(bad(
                "max_message_bytes",
                format!("{} is outside 1024..=1073741824", a.max_message_bytes),
            ));
        }
        if !(1..=1 << 32).contains(&a.max_tensor_elements) {
            return Err(bad(
                "max_tensor_elements",
                format!("{} is outside 1..=4294967296", a.max_tensor_elements),
            ));
        }
        if !(1..=64).contains(&a.upstream_connections) {
            return Err(bad(
                "upstream_connections",
                format!("{} is outside 1..=64", a.upstream_connections),
            ));
        }
        if a.max_concurrent_streams == 0 {
            return Err(bad("max_concurrent_streams", "must be at least 1".into()));
        }
        if !(1024..=1 << 20).contains(&a.max_header_bytes) {
            return Err(bad(
                "max_header_bytes",
                format!("{} is outside 1024..=1048576", a.max_header_bytes),
            ));
        }
        for (name, d) in [
            ("connect_timeout", a.connect_timeout),
            ("request_timeout", a.request_timeout),
            ("keepalive_interval", a.keepalive_interval),
            ("handshake_timeout", a.handshake_timeout),
            ("write_failure_deadline", a.write_failure_deadline),
        ] {
            if d.is_zero() {
                return Err(bad(name, "must be greater than zero".into()));
            }
        }
        if a.unit_key.is_empty()
            || !a.unit_key.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
            })
        {
            return Err(bad(
                "unit_key",
                format!("'{}' is not a lower-case gRPC metadata key", a.unit_key),
            ));
        }
        if a.record_queue == 0 {
            return Err(bad("record_queue", "must be at least 1".into()));
        }
        if a.record_queue_bytes < 1 << 20 {
            return Err(bad("record_queue_bytes", "must be at least 1048576".into()));
        }
        if !(10..=crate::drift::MAX_SAMPLE).contains(&a.drift_window) {
            return Err(bad(
                "drift_window",
                format!("{} is outside 10..=10000", a.drift_window),
            ));
        }
        if a.drift_every == 0 {
            return Err(bad("drift_every", "must be at least 1".into()));
        }
        if !(a.drift_fdr > 0.0 && a.drift_fdr < 1.0) {
            return Err(bad(
                "drift_fdr",
                format!("{} is outside (0, 1)", a.drift_fdr),
            ));
        }
        // A band between the two levels is what stops a p-value at the threshold from flapping;
        // an exit level of 1 would never be exceeded (adjusted p-values reach 1).
        if !(a.drift_exit_p_value >= a.drift_fdr && a.drift_exit_p_value < 1.0) {
            return Err(bad(
                "drift_exit_p_value",
                format!(
                    "{} is outside [--drift-fdr ({}), 1)",
                    a.drift_exit_p_value, a.drift_fdr
                ),
            ));
        }
        if !(1..=1000).contains(&a.drift_exit_evaluations) {
            return Err(bad(
                "drift_exit_evaluations",
                format!("{} is outside 1..=1000", a.drift_exit_evaluations),
            ));
        }
        if !(10..=crate::drift::MAX_SAMPLE).contains(&a.drift_reference_max) {
            return Err(bad(
                "drift_reference_max",
                format!("{} is outside 10..=10000", a.drift_reference_max),
            ));
        }
        if a.concept_window == 0 {
            return Err(bad("concept_window", "must be at least 1".into()));
        }
        if !(a.concept_threshold > 0.0 && a.concept_threshold.is_finite()) {
            return Err(bad("concept_threshold", "must be a positive number".into()));
        }
        let concept_exit_threshold = a
            .concept_exit_threshold
            .unwrap_or(a.concept_threshold / 2.0);
        if !(0.0..=a.concept_threshold).contains(&concept_exit_threshold) {
            return Err(bad(
                "concept_exit_threshold",
                format!(
                    "{concept_exit_threshold} is outside [0, --concept-threshold ({})]",
                    a.concept_threshold
                ),
            ));
        }
        if a.concept_exit_outcomes == 0 {
            return Err(bad("concept_exit_outcomes", "must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&a.shadow_agreement_alert) {
            return Err(bad(
                "shadow_agreement_alert",
                "must be within [0, 1]".into(),
            ));
        }
        let webhooks = a
            .webhook
            .iter()
            .map(|w| crate::webhook::parse_webhook(w))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("webhook", e))?;
        tracing_subscriber::EnvFilter::try_new(&a.log_level)
            .map_err(|e| bad("log_level", format!("'{}': {e}", a.log_level)))?;
        if a.state_poll_interval < MIN_STATE_POLL_INTERVAL {
            return Err(bad(
                "state_poll_interval",
                format!(
                    "{:?} is shorter than {MIN_STATE_POLL_INTERVAL:?}",
                    a.state_poll_interval
                ),
            ));
        }
        // Last: the only check that reads a file.
        if let Some(path) = &a.state_file {
            // Read and checked here, like every other setting, so that a bad file stops start-up
            // (status 2) before any port is bound or the database is opened. The server reads it
            // again when it starts: the file is the source of truth, not this copy.
            crate::declare::load(path).map_err(|e| bad("state_file", e.to_string()))?;
        }
        let tls = server_tls(
            [a.tls_cert, a.tls_key, a.tls_client_ca],
            ["tls_cert", "tls_key", "tls_client_ca"],
        )?;
        let control_tls = server_tls(
            [a.control_tls_cert, a.control_tls_key, a.control_client_ca],
            ["control_tls_cert", "control_tls_key", "control_client_ca"],
        )?;
        let upstream_tls = crate::tls::UpstreamTlsFiles {
            ca: a.upstream_ca,
            cert: a.upstream_cert,
            key: a.upstream_key,
        };
        // Read and checked now; the system roots are only loaded when an upstream needs them.
        upstream_tls.check().map_err(|e| ConfigError::Invalid {
            setting: e.setting,
            message: e.message,
        })?;
        Ok(Config {
            listen: a.listen,
            control_listen: a.control_listen,
            admin_listen: a.admin_listen,
            data_dir: a.data_dir,
            default_model: a.default_model,
            control_token: a.control_token,
            max_in_flight: a.max_in_flight,
            max_message_bytes: a.max_message_bytes,
            max_tensor_elements: a.max_tensor_elements,
            max_concurrent_streams: a.max_concurrent_streams,
            max_header_bytes: a.max_header_bytes,
            data_threads: match a.data_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            upstream_connections: a.upstream_connections,
            connect_timeout: a.connect_timeout,
            request_timeout: a.request_timeout,
            keepalive_interval: a.keepalive_interval,
            handshake_timeout: a.handshake_timeout,
            write_failure_deadline: a.write_failure_deadline,
            shutdown_grace: a.shutdown_grace,
            unit_key: a.unit_key,
            entity_key: a.entity_key,
            retention: a.retention,
            record_predictions: a.record_predictions,
            otlp_endpoint: match a.otlp_endpoint {
                Some(e) if !e.starts_with("http://") => {
                    return Err(bad(
                        "otlp_endpoint",
                        format!("'{e}' is not an http:// URL (traces go over plaintext OTLP/gRPC; put a collector beside modelgate for TLS)"),
                    ))
                }
                e => e,
            },
            record_queue: a.record_queue,
            record_queue_bytes: a.record_queue_bytes,
            max_shadow_in_flight: a.max_shadow_in_flight,
            drift: crate::monitor::DriftSettings {
                window: a.drift_window,
                every: a.drift_every,
                min_interval: a.drift_min_interval,
                fdr: a.drift_fdr,
                exit_p_value: a.drift_exit_p_value,
                exit_evaluations: a.drift_exit_evaluations,
                reference_max: a.drift_reference_max,
                concept_window: a.concept_window,
                concept_threshold: a.concept_threshold,
                concept_exit_threshold,
                concept_exit_outcomes: a.concept_exit_outcomes,
                shadow_agreement_alert: a.shadow_agreement_alert,
            },
            webhooks,
            state_file: a.state_file,
            state_poll_interval: a.state_poll_interval,
            log_format: a.log_format,
            log_level: a.log_level,
            tls,
            upstream_tls,
            control_tls,
        })
    }

    /// Warnings worth logging at start-up (valid, but probably not what the user wants).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.control_listen.ip().is_loopback() && self.control_token.is_none() {
            w.push(format!(
                "the control port {} is reachable from other hosts and no --control-token is set: anyone who can reach it can change routing",
                self.control_listen
            ));
        }
        w
    }
}

/// Checks a server's TLS settings (certificate, key, client CA) and builds its configuration
/// once, so that unreadable files, bad PEM and a key that does not match the certificate stop
/// start-up with the flag named.
fn server_tls(
    files: [Option<PathBuf>; 3],
    settings: [&'static str; 3],
) -> Result<Option<crate::tls::ServerTlsFiles>, ConfigError> {
    let [cert, key, client_ca] = files;
    let requires = |setting: &'static str, other: &str| ConfigError::Invalid {
        setting,
        message: format!("is required with --{}", other.replace('_', "-")),
    };
    let files = match (cert, key) {
        (Some(cert), Some(key)) => crate::tls::ServerTlsFiles {
            cert,
            key,
            client_ca,
        },
        (Some(_), None) => return Err(requires(settings[1], settings[0])),
        (None, Some(_)) => return Err(requires(settings[0], settings[1])),
        (None, None) => {
            if client_ca.is_some() {
                return Err(ConfigError::Invalid {
                    setting: settings[2],
                    message: format!(
                        "needs TLS: set --{} and --{} too",
                        settings[0].replace('_', "-"),
                        settings[1].replace('_', "-")
                    ),
                });
            }
            return Ok(None);
        }
    };
    files
        .server_config(settings)
        .map_err(|e| ConfigError::Invalid {
            setting: e.setting,
            message: e.message,
        })?;
    Ok(Some(files))
}

impl ServeArgs {
    fn parse_from_defaults() -> ServeArgs {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let m = Wrapper::command().get_matches_from(["modelgate"]);
        Wrapper::from_arg_matches(&m).expect("defaults parse").serve
    }
}

/// A setting that is wrong, named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is invalid.
    #[error("invalid setting {}: {message}", describe(setting))]
    Invalid {
        /// Setting name (flag without dashes, with underscores).
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The config file cannot be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// File path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The config file has a key modelgate does not know.
    #[error("config file {path}: unknown setting '{key}'")]
    UnknownKey {
        /// File path.
        path: PathBuf,
        /// The key.
        key: String,
    },
}

fn describe(setting: &str) -> String {
    format!(
        "--{} ({}{})",
        setting.replace('_', "-"),
        ENV_PREFIX,
        setting.to_ascii_uppercase()
    )
}

/// The environment as a map, so tests can pass their own.
pub type Env = HashMap<String, String>;

/// Reads the process environment's `MODELGATE_*` variables (call once, in `main`), and the
/// standard OpenTelemetry endpoint as `--otlp-endpoint` unless that is set.
pub fn process_env() -> Env {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    with_otel_endpoint(vars)
}

/// `MODELGATE_*` variables from `vars`, plus `MODELGATE_OTLP_ENDPOINT` taken from
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, when not set itself.
fn with_otel_endpoint(vars: Vec<(String, String)>) -> Env {
    let find = |name: &str| {
        vars.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let otel =
        find("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| find("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let mut env: Env = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    if let Some(e) = otel {
        env.entry(format!("{ENV_PREFIX}OTLP_ENDPOINT")).or_insert(e);
    }
    env
}

/// Finds the config file path: `--config PATH`, `--config=PATH`, else `MODELGATE_CONFIG`.
fn config_path(args: &[OsString], env: &Env) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    env.get("MODELGATE_CONFIG").map(PathBuf::from)
}

fn toml_to_string(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Installs config-file values, then environment values, as the defaults of `cmd`'s arguments, so
/// that flags override env, which overrides the file. `args` is the command line of `cmd` itself
/// (used only to find `--config`). Returns warnings (unknown `MODELGATE_*` variables).
pub fn apply_sources(
    mut cmd: clap::Command,
    args: &[OsString],
    env: &Env,
    read_file: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<(clap::Command, Vec<String>), ConfigError> {
    let ids: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .filter(|id| id != "help" && id != "config")
        .collect();
    // Repeatable flags take a list: a TOML array, or whitespace-separated in the environment.
    let lists: Vec<String> = cmd
        .get_arguments()
        .filter(|a| matches!(a.get_action(), clap::ArgAction::Append))
        .map(|a| a.get_id().as_str().to_string())
        .collect();
    let mut defaults: HashMap<String, Vec<String>> = HashMap::new();
    if let Some(path) = config_path(args, env) {
        let text = read_file(&path).map_err(|e| ConfigError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for (key, value) in table {
            let id = key.replace('-', "_");
            if !ids.contains(&id) {
                return Err(ConfigError::UnknownKey { path, key });
            }
            let items: Vec<toml::Value> = match value {
                toml::Value::Array(a) if lists.contains(&id) => a,
                v => vec![v],
            };
            let v = items
                .iter()
                .map(toml_to_string)
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| ConfigError::File {
                    path: path.clone(),
                    message: format!("setting '{key}' must be a string, number or boolean"),
                })?;
            defaults.insert(id, v);
        }
    }
    let mut warnings = Vec::new();
    for (k, v) in env {
        let Some(name) = k.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let id = name.to_ascii_lowercase();
        if lists.contains(&id) {
            defaults.insert(id, v.split_whitespace().map(str::to_string).collect());
        } else if ids.contains(&id) {
            defaults.insert(id, vec![v.clone()]);
        } else if id != "config" && !OTHER_ENV.contains(&name) {
            warnings.push(format!("ignoring unknown environment variable {k}"));
        }
    }
    for (id, values) in defaults {
        cmd = cmd.mut_arg(id, |a| a.default_values(values));
    }
    Ok((cmd, warnings))
}

/// `MODELGATE_*` variables read by other subcommands, not unknown to `serve`.
/// `modelgate ctl` reads `MODELGATE_CTL_ADDR` (and `MODELGATE_CONTROL_TOKEN`, a setting too);
/// `deploy/ghz/run.sh` reads `MODELGATE_ADDR`.
const OTHER_ENV: &[&str] = &["ADDR", "CTL_ADDR"];

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[test]
    fn the_standard_otel_endpoint_turns_tracing_on_unless_overridden() {
        let vars = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let env = with_otel_endpoint(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("PATH", "/bin"),
        ]));
        assert_eq!(env.get("MODELGATE_OTLP_ENDPOINT").unwrap(), "http://c:4317");
        assert!(!env.contains_key("PATH"));
        let env = with_otel_endpoint(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
        ]));
        assert_eq!(env.get("MODELGATE_OTLP_ENDPOINT").unwrap(), "http://t:4317");
        let env = with_otel_endpoint(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("MODELGATE_OTLP_ENDPOINT", "http://mine:4317"),
        ]));
        assert_eq!(
            env.get("MODELGATE_OTLP_ENDPOINT").unwrap(),
            "http://mine:4317"
        );
        assert!(with_otel_endpoint(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])).is_empty());
        assert!(load(&["--otlp-endpoint", "grpc://c:4317"], &[], None)
            .unwrap_err()
            .contains("otlp"));
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn load(args: &[&str], env: &[(&str, &str)], file: Option<&str>) -> Result<Config, String> {
        let argv: Vec<OsString> = std::iter::once("modelgate")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let env: Env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file.map(str::to_string);
        let (cmd, _) = apply_sources(Cli::command(), &argv, &env, |_| {
            file.clone()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        })
        .map_err(|e| e.to_string())?;
        let m = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&m).map_err(|e| e.to_string())?;
        Config::from_args(cli.serve).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_design() {
        let c = load(&[], &[], None).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.control_listen.to_string(), "127.0.0.1:9001");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9002");
        assert_eq!(c.data_dir, PathBuf::from("./modelgate-data"));
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let file = "max_in_flight = 10\nmax-concurrent-streams = 7\nrequest_timeout = \"5s\"\n";
        // Without --config (or MODELGATE_CONFIG) no file is read.
        assert_eq!(load(&[], &[], Some(file)).unwrap().max_in_flight, 10_000);
        let c = load(&["--config", "x.toml"], &[], Some(file)).unwrap();
        assert_eq!(c.max_in_flight, 10);
        assert_eq!(c.max_concurrent_streams, 7);
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        let c = load(
            &["--config", "x.toml"],
            &[("MODELGATE_MAX_IN_FLIGHT", "20")],
            Some(file),
        )
        .unwrap();
        assert_eq!(c.max_in_flight, 20);
        let c = load(
            &["--config=x.toml", "--max-in-flight", "30"],
            &[("MODELGATE_MAX_IN_FLIGHT", "20")],
            Some(file),
        )
        .unwrap();
        assert_eq!(c.max_in_flight, 30);
        let c = load(&[], &[("MODELGATE_CONFIG", "x.toml")], Some(file)).unwrap();
        assert_eq!(c.max_in_flight, 10);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = load(&["--max-in-flight", "0"], &[], None).unwrap_err();
        assert!(err.contains("--max-in-flight"), "{err}");
        assert!(err.contains("MODELGATE_MAX_IN_FLIGHT"), "{err}");
        let err = load(&[], &[("MODELGATE_LISTEN", "nonsense")], None).unwrap_err();
        assert!(err.contains("--listen"), "{err}");
        let err = load(&["--config", "f"], &[], Some("lisen = \"1.2.3.4:1\"")).unwrap_err();
        assert!(err.contains("unknown setting 'lisen'"), "{err}");
        let err = load(&["--config", "f"], &[], Some("connect_timeout = \"soon\"")).unwrap_err();
        assert!(err.contains("--connect-timeout"), "{err}");
        let err = load(&["--config", "missing.toml"], &[], None).unwrap_err();
        assert!(err.contains("missing.toml"), "{err}");
        let err = load(
            &[
                "--listen",
                "127.0.0.1:5000",
                "--admin-listen",
                "127.0.0.1:5000",
            ],
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            err.contains("--listen") && err.contains("admin_listen"),
            "{err}"
        );
        let err = load(&["--default-model", "a b"], &[], None).unwrap_err();
        assert!(err.contains("--default-model"), "{err}");
        let err = load(&["--request-timeout", "0s"], &[], None).unwrap_err();
        assert!(err.contains("--request-timeout"), "{err}");
        let err = load(&["--log-level", "=="], &[], None).unwrap_err();
        assert!(err.contains("--log-level"), "{err}");
    }

    #[test]
    fn repeatable_settings_from_file_and_env() {
        let file = "webhook = [\"http://a:1/x\", \"http://b:2/y#drift_started\"]\n";
        let c = load(&["--config", "f"], &[], Some(file)).unwrap();
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(c.webhooks[1].types, vec!["drift_started"]);
        let c = load(
            &[],
            &[("MODELGATE_WEBHOOK", "http://a:1/x http://b:2/y")],
            None,
        )
        .unwrap();
        assert_eq!(c.webhooks.len(), 2);
        let c = load(
            &["--webhook", "http://c:3/z"],
            &[("MODELGATE_WEBHOOK", "http://a:1/x")],
            None,
        )
        .unwrap();
        assert_eq!(c.webhooks.len(), 1, "flags replace the environment");
        let err = load(&["--webhook", "https://x/y"], &[], None).unwrap_err();
        assert!(err.contains("--webhook"), "{err}");
        let err = load(&["--drift-fdr", "2"], &[], None).unwrap_err();
        assert!(err.contains("--drift-fdr"), "{err}");
    }

    #[test]
    fn drift_hysteresis_settings() {
        let c = load(&[], &[], None).unwrap();
        assert_eq!((c.drift.exit_p_value, c.drift.exit_evaluations), (0.2, 3));
        assert_eq!(c.drift.concept_exit_outcomes, 100);
        assert_eq!(c.drift.concept_exit_threshold, 0.05, "half the threshold");
        let c = load(&["--concept-threshold", "0.02"], &[], None).unwrap();
        assert_eq!(
            c.drift.concept_exit_threshold, 0.01,
            "follows the threshold"
        );
        let c = load(
            &["--concept-exit-threshold", "0"],
            &[("MODELGATE_DRIFT_EXIT_EVALUATIONS", "5")],
            None,
        )
        .unwrap();
        assert_eq!(
            (c.drift.concept_exit_threshold, c.drift.exit_evaluations),
            (0.0, 5)
        );
        for (args, flag) in [
            (
                &["--drift-exit-p-value", "0.01"][..],
                "--drift-exit-p-value",
            ),
            (&["--drift-exit-p-value", "1"][..], "--drift-exit-p-value"),
            (
                &["--drift-fdr", "0.3", "--drift-exit-p-value", "0.2"][..],
                "--drift-exit-p-value",
            ),
            (
                &["--drift-exit-evaluations", "0"][..],
                "--drift-exit-evaluations",
            ),
            (
                &["--concept-exit-threshold", "0.2"][..],
                "--concept-exit-threshold",
            ),
            (
                &["--concept-exit-threshold=-1"][..],
                "--concept-exit-threshold",
            ),
            (
                &["--concept-exit-outcomes", "0"][..],
                "--concept-exit-outcomes",
            ),
        ] {
            let err = load(args, &[], None).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn retention_specs() {
        let day = Duration::from_secs(86_400);
        let r = parse_retention("1d").unwrap();
        assert_eq!((r.predictions, r.outcomes, r.features), (day, day, day));
        let r = parse_retention("outcomes=30d, features=1h").unwrap();
        assert_eq!(r.predictions, 7 * day);
        assert_eq!(r.outcomes, 30 * day);
        assert_eq!(r.features, Duration::from_secs(3600));
        assert!(parse_retention("events=1d")
            .unwrap_err()
            .contains("unknown family"));
        assert!(parse_retention("0s").is_err());
        let err = load(&["--retention", "soon"], &[], None).unwrap_err();
        assert!(err.contains("--retention"), "{err}");
    }

    #[test]
    fn exposed_control_port_without_token_warns_and_token_is_redacted() {
        let c = load(&["--control-listen", "0.0.0.0:9001"], &[], None).unwrap();
        assert_eq!(c.warnings().len(), 1);
        let c = load(
            &["--control-listen", "0.0.0.0:9001"],
            &[("MODELGATE_CONTROL_TOKEN", "s3cret")],
            None,
        )
        .unwrap();
        assert!(c.warnings().is_empty());
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_state_file_is_checked_with_the_other_settings() {
        let c = load(&[], &[], None).unwrap();
        assert_eq!(c.state_file, None);
        assert_eq!(c.state_poll_interval, Duration::from_secs(5));
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("state.toml");
        std::fs::write(
            &good,
            "[[models]]\nname = \"m\"\n[[models.versions]]\nkey = \"v1\"\nendpoint = \"h:1\"\n",
        )
        .unwrap();
        let good = good.to_str().unwrap();
        let c = load(
            &["--state-poll-interval", "100ms"],
            &[("MODELGATE_STATE_FILE", good)],
            None,
        )
        .unwrap();
        assert_eq!(c.state_file.as_deref(), Some(Path::new(good)));
        assert_eq!(c.state_poll_interval, Duration::from_millis(100));
        let c = load(
            &["--config", "f"],
            &[],
            Some(&format!("state_file = \"{good}\"\n")),
        )
        .unwrap();
        assert!(c.state_file.is_some());

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[models]]\nname = \"m\"\n[[models.versions]]\nkey = \"v1\"\nendpoint = \"h\"\n",
        )
        .unwrap();
        let err = load(&["--state-file", bad.to_str().unwrap()], &[], None).unwrap_err();
        assert!(err.contains("--state-file (MODELGATE_STATE_FILE)"), "{err}");
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains("models[0].versions[0].endpoint"), "{err}");
        let missing = dir.path().join("missing.toml");
        let err = load(&["--state-file", missing.to_str().unwrap()], &[], None).unwrap_err();
        assert!(
            err.contains("missing.toml") && err.contains("cannot read"),
            "{err}"
        );
        let err = load(&["--state-poll-interval", "0s"], &[], None).unwrap_err();
        assert!(err.contains("--state-poll-interval"), "{err}");
    }

    #[test]
    fn tls_settings_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        };
        let (cert, key, other_key) = (
            write("cert.pem", &cert.pem()),
            write("key.pem", &key.serialize_pem()),
            write("other.pem", &other_key.serialize_pem()),
        );
        let c = load(&["--tls-cert", &cert, "--tls-key", &key], &[], None).unwrap();
        let files = c.tls.as_ref().unwrap();
        assert_eq!(files.client_ca, None);
        let c = load(
            &[],
            &[
                ("MODELGATE_CONTROL_TLS_CERT", &cert),
                ("MODELGATE_CONTROL_TLS_KEY", &key),
                ("MODELGATE_CONTROL_CLIENT_CA", &cert),
                ("MODELGATE_UPSTREAM_CA", &cert),
                ("MODELGATE_CONTROL_TOKEN", "s3cret"),
            ],
            None,
        )
        .unwrap();
        assert!(c.control_tls.as_ref().unwrap().client_ca.is_some());
        assert!(c.tls.is_none());
        // Paths are printed, never what the files hold, nor the token.
        let debug = format!("{c:?}");
        assert!(
            debug.contains("cert.pem") && !debug.contains("BEGIN"),
            "{debug}"
        );
        assert!(!debug.contains("s3cret"), "{debug}");

        let err = load(&["--tls-cert", &cert], &[], None).unwrap_err();
        assert!(err.contains("--tls-key (MODELGATE_TLS_KEY)"), "{err}");
        let err = load(&["--tls-client-ca", &cert], &[], None).unwrap_err();
        assert!(err.contains("--tls-client-ca"), "{err}");
        let err = load(
            &["--tls-cert", "/nonexistent.pem", "--tls-key", &key],
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            err.contains("--tls-cert") && err.contains("/nonexistent.pem"),
            "{err}"
        );
        let err = load(&["--tls-cert", &key, "--tls-key", &key], &[], None).unwrap_err();
        assert!(
            err.contains("--tls-cert") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = load(&["--tls-cert", &cert, "--tls-key", &cert], &[], None).unwrap_err();
        assert!(
            err.contains("--tls-key") && err.contains("no PEM private key"),
            "{err}"
        );
        let err = load(&["--tls-cert", &cert, "--tls-key", &other_key], &[], None).unwrap_err();
        assert!(
            err.contains("--tls-key") && err.contains("does not match"),
            "{err}"
        );
        let err = load(
            &["--control-tls-cert", &cert, "--control-tls-key", &other_key],
            &[],
            None,
        )
        .unwrap_err();
        assert!(err.contains("--control-tls-key"), "{err}");
        let err = load(&["--upstream-ca", &key], &[], None).unwrap_err();
        assert!(err.contains("--upstream-ca"), "{err}");
        let err = load(&["--upstream-cert", &cert], &[], None).unwrap_err();
        assert!(err.contains("--upstream-key"), "{err}");
        let err = load(
            &["--upstream-cert", &cert, "--upstream-key", &other_key],
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            err.contains("--upstream-key") && err.contains("does not match"),
            "{err}"
        );
        load(
            &["--upstream-cert", &cert, "--upstream-key", &key],
            &[],
            None,
        )
        .unwrap();
    }

    #[test]
    fn every_flag_documents_its_env_variable() {
        for a in Cli::command().get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" {
                continue;
            }
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let env = format!("env {ENV_PREFIX}{}", id.to_ascii_uppercase());
            assert!(
                help.contains(&env),
                "--{id} help should mention {env}: {help}"
            );
        }
    }
}
