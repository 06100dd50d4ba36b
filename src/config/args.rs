//! The flags of `modelgate serve` ([`ServeArgs`]): every setting, its default, its parser and its
//! help (which names its `MODELGATE_*` variable). The other sources only install defaults into
//! these flags (`sources.rs`); `validate.rs` turns them into a [`Config`](super::Config).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::spec::parse_duration;
use crate::storage::Retention;
use crate::telemetry::LogFormat;

use super::retention::parse_retention;

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

    /// Requests served at once on the data port; more wait for a slot (--queue-timeout,
    /// --max-queued) or get RESOURCE_EXHAUSTED (env MODELGATE_MAX_IN_FLIGHT).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Requests that may wait for an in-flight slot at once; more get RESOURCE_EXHAUSTED at once
    /// (env MODELGATE_MAX_QUEUED).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_queued: usize,

    /// Longest a request waits for an in-flight slot (or its own deadline, when shorter) before
    /// RESOURCE_EXHAUSTED; 0s refuses at once (env MODELGATE_QUEUE_TIMEOUT).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub queue_timeout: Duration,

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
    /// turn (env MODELGATE_UPSTREAM_CONNECTIONS). One a thread batches the most calls into each
    /// of the model server's reads and each of modelgate's writes; more spread a connection's
    /// flow-control window for large tensors.
    #[arg(long, value_name = "N", default_value_t = 1)]
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

    /// Bytes of RocksDB's block cache, shared by every column family: recent files' index and
    /// filter blocks and the blocks reads touched. Under a steady write load it is always full,
    /// so it counts in full towards the process's memory; raise it when a large feature store is
    /// read online (env MODELGATE_BLOCK_CACHE_BYTES).
    #[arg(long, value_name = "BYTES", default_value_t = crate::store::DEFAULT_BLOCK_CACHE_BYTES)]
    pub block_cache_bytes: usize,

    /// How long the record writer waits after a partial batch before it takes the next, so
    /// that under load it wakes once per many records instead of once per few; 0s writes as
    /// soon as records arrive (env MODELGATE_RECORD_LINGER).
    #[arg(long, value_name = "DURATION", default_value = "5ms", value_parser = parse_duration)]
    pub record_linger: Duration,

    /// How often the record writer stores what it keeps in memory between batches when it
    /// changed: experiment variants' distinct-unit sketches and shadows' latency histograms
    /// (also stored at flushes and at exit); a crash loses at most this much of them
    /// (env MODELGATE_TALLY_PERSIST_INTERVAL).
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    pub tally_persist_interval: Duration,

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

    /// Fleet mode: the Redis several replicas share, `redis://[user:password@]host:port[/db]`
    /// (`rediss://` for TLS); a comma-separated list of seeds for a Redis Cluster. Without it a
    /// replica keeps everything in its own RocksDB. See docs/fleet.md (env
    /// MODELGATE_FLEET_STORE; keep the password in the environment or a Secret).
    #[arg(long, value_name = "URL[,URL…]")]
    pub fleet_store: Option<String>,

    /// The fleet's name: every Redis key starts with `mg:<name>:`, so several fleets
    /// share one Redis (env MODELGATE_FLEET_NAME).
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub fleet_name: String,

    /// The --fleet-store is a Redis Cluster even though it is given one seed (env
    /// MODELGATE_FLEET_CLUSTER).
    #[arg(long)]
    pub fleet_cluster: bool,

    /// Fleet mode: how long a prediction can be joined by an outcome sent to any replica (its
    /// stub's TTL in Redis; env MODELGATE_OUTCOME_WINDOW).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub outcome_window: Duration,

    /// Fleet mode: the share of each replica's rows it adds to a model's shared drift window,
    /// in (0, 1] (a uniform sample of the fleet's traffic; env MODELGATE_FLEET_DRIFT_SAMPLE).
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0)]
    pub fleet_drift_sample: f64,

    /// Trust the certificates in this PEM file (a private CA) for a `rediss://` --fleet-store,
    /// instead of the system's roots (env MODELGATE_FLEET_CA).
    #[arg(long, value_name = "FILE")]
    pub fleet_ca: Option<PathBuf>,

    /// Timeout of each call to the fleet's Redis, connecting included (env
    /// MODELGATE_FLEET_TIMEOUT).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub fleet_timeout: Duration,

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

impl ServeArgs {
    /// The flags as they are with nothing given: every default.
    pub(super) fn parse_from_defaults() -> ServeArgs {
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

#[cfg(test)]
mod tests {
    use crate::config::test_support::Cli;
    use crate::config::ENV_PREFIX;
    use clap::CommandFactory;

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
