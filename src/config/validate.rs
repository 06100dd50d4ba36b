//! Validation: the flags, once every source is in, checked where clap's types cannot check them
//! (ports distinct, ranges, hysteresis bands, TLS files readable and matching) and turned into the
//! [`Config`] the server starts from. No I/O beyond reading the TLS files named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::registry;
use crate::storage::Retention;
use crate::telemetry::LogFormat;

use super::args::ServeArgs;
use super::error::ConfigError;

/// Shortest `--state-poll-interval`: polling is a `stat` per tick, but a zero interval would spin.
const MIN_STATE_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Longest `--record-linger`: past a tenth of a second batches are as large as they usefully get,
/// and a longer wait only holds more records in memory, where a crash loses them.
const MAX_RECORD_LINGER: Duration = Duration::from_millis(100);

/// Bounds of `--tally-persist-interval`.
const MIN_TALLY_PERSIST: Duration = Duration::from_millis(10);
const MAX_TALLY_PERSIST: Duration = Duration::from_secs(60);

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
    /// Requests waiting for an in-flight slot at most.
    pub max_queued: usize,
    /// Longest wait for an in-flight slot.
    pub queue_timeout: Duration,
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
    /// RocksDB's block cache, bytes.
    pub block_cache_bytes: usize,
    /// The record writer's wait after a partial batch.
    pub record_linger: Duration,
    /// How often changed unit sketches and latency histograms are stored.
    pub tally_persist_interval: Duration,
    /// Shadow copies in flight at most.
    pub max_shadow_in_flight: usize,
    /// Drift settings.
    pub drift: crate::monitor::DriftSettings,
    /// Webhooks.
    pub webhooks: Vec<crate::webhook::Webhook>,
    /// Declarative state file, applied at start and on change.
    pub state_file: Option<PathBuf>,
    /// Fleet mode: the Redis shared with the other replicas.
    pub fleet: Option<crate::fleet::FleetSettings>,
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
    /// The clock everything is timed by: the system's; tests inject their own
    /// ([`crate::clock::ManualClock`]).
    pub clock: crate::clock::SharedClock,
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
            .field("max_queued", &self.max_queued)
            .field("queue_timeout", &self.queue_timeout)
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
            .field("block_cache_bytes", &self.block_cache_bytes)
            .field("record_linger", &self.record_linger)
            .field("tally_persist_interval", &self.tally_persist_interval)
            .field("max_shadow_in_flight", &self.max_shadow_in_flight)
            .field("drift", &self.drift)
            .field("webhooks", &self.webhooks)
            .field("state_file", &self.state_file)
            .field("state_poll_interval", &self.state_poll_interval)
            // Addresses without their passwords.
            .field(
                "fleet",
                &self.fleet.as_ref().map(|f| {
                    (
                        f.redis
                            .urls
                            .iter()
                            .map(|u| crate::fleet::redis::redact(u))
                            .collect::<Vec<_>>(),
                        &f.name,
                    )
                }),
            )
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
        if a.block_cache_bytes < 1 << 20 {
            return Err(bad("block_cache_bytes", "must be at least 1048576".into()));
        }
        if a.record_linger > MAX_RECORD_LINGER {
            return Err(bad(
                "record_linger",
                format!(
                    "{:?} is longer than {MAX_RECORD_LINGER:?} (records would wait in the queue, \
                     lost on a crash, for no further gain)",
                    a.record_linger
                ),
            ));
        }
        if !(MIN_TALLY_PERSIST..=MAX_TALLY_PERSIST).contains(&a.tally_persist_interval) {
            return Err(bad(
                "tally_persist_interval",
                format!(
                    "{:?} is outside {MIN_TALLY_PERSIST:?}..={MAX_TALLY_PERSIST:?} (shorter stores \
                     the same tallies over and over; longer loses more of them on a crash)",
                    a.tally_persist_interval
                ),
            ));
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
        let fleet = match &a.fleet_store {
            None => None,
            Some(list) => {
                crate::fleet::validate_name(&a.fleet_name).map_err(|e| bad("fleet_name", e))?;
                if a.outcome_window < Duration::from_secs(1) {
                    return Err(bad("outcome_window", "must be at least 1s".into()));
                }
                if !(a.fleet_drift_sample > 0.0 && a.fleet_drift_sample <= 1.0) {
                    return Err(bad(
                        "fleet_drift_sample",
                        format!("{} is outside (0, 1]", a.fleet_drift_sample),
                    ));
                }
                if a.fleet_timeout.is_zero() {
                    return Err(bad("fleet_timeout", "must be more than 0".into()));
                }
                let urls: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_string)
                    .collect();
                if urls.is_empty() {
                    return Err(bad("fleet_store", "no Redis URL".into()));
                }
                if let Some(ca) = &a.fleet_ca {
                    if !ca.is_file() {
                        return Err(bad(
                            "fleet_ca",
                            format!("{} is not a readable file", ca.display()),
                        ));
                    }
                }
                for u in &urls {
                    if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                        return Err(bad(
                            "fleet_store",
                            format!(
                                "'{}' is not a redis:// or rediss:// URL",
                                crate::fleet::redis::redact(u)
                            ),
                        ));
                    }
                }
                Some(crate::fleet::FleetSettings {
                    redis: crate::fleet::RedisSettings {
                        urls,
                        cluster: a.fleet_cluster,
                        timeout: a.fleet_timeout,
                        ca: a.fleet_ca.clone(),
                    },
                    name: a.fleet_name.clone(),
                    poll: Duration::from_millis(500),
                    outcome_window: a.outcome_window,
                })
            }
        };
        // The state file's contents are checked by `declare::check_setting` (it reads the file;
        // this stays free of I/O), still before any port is bound or the database is opened.
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
            max_queued: a.max_queued,
            queue_timeout: a.queue_timeout,
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
            block_cache_bytes: a.block_cache_bytes,
            record_linger: a.record_linger,
            tally_persist_interval: a.tally_persist_interval,
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
                fleet_sample: a.fleet_drift_sample,
            },
            webhooks,
            state_file: a.state_file,
            state_poll_interval: a.state_poll_interval,
            fleet,
            log_format: a.log_format,
            log_level: a.log_level,
            tls,
            upstream_tls,
            control_tls,
            clock: crate::clock::system(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::load;

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
    fn bad_settings_are_named() {
        let err = load(&["--max-in-flight", "0"], &[], None).unwrap_err();
        assert!(err.contains("--max-in-flight"), "{err}");
        assert!(err.contains("MODELGATE_MAX_IN_FLIGHT"), "{err}");
        let err = load(&[], &[("MODELGATE_LISTEN", "nonsense")], None).unwrap_err();
        assert!(err.contains("--listen"), "{err}");
        let err = load(&["--block-cache-bytes", "4096"], &[], None).unwrap_err();
        assert!(err.contains("--block-cache-bytes"), "{err}");
        assert!(err.contains("at least 1048576"), "{err}");
        let c = load(
            &["--config", "f"],
            &[],
            Some("block_cache_bytes = 33554432"),
        )
        .unwrap();
        assert_eq!(c.block_cache_bytes, 32 << 20);
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
        let err = load(
            &[
                "--fleet-store",
                "redis://127.0.0.1:1",
                "--fleet-drift-sample",
                "1.5",
            ],
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            err.contains("--fleet-drift-sample") && err.contains("(0, 1]"),
            "{err}"
        );
        let err = load(&["--record-linger", "1s"], &[], None).unwrap_err();
        assert!(
            err.contains("--record-linger") && err.contains("100ms"),
            "{err}"
        );
        let err = load(&["--tally-persist-interval", "0s"], &[], None).unwrap_err();
        assert!(
            err.contains("--tally-persist-interval") && err.contains("10ms"),
            "{err}"
        );
        assert!(load(&["--tally-persist-interval", "2m"], &[], None).is_err());
        assert_eq!(
            load(&[], &[("MODELGATE_TALLY_PERSIST_INTERVAL", "5s")], None)
                .unwrap()
                .tally_persist_interval,
            Duration::from_secs(5)
        );
        assert_eq!(
            load(&[], &[], None).unwrap().tally_persist_interval,
            Duration::from_millis(250)
        );
        let c = load(&[], &[("MODELGATE_RECORD_LINGER", "0s")], None).unwrap();
        assert_eq!(c.record_linger, Duration::ZERO);
        assert_eq!(
            load(&[], &[], None).unwrap().record_linger,
            Duration::from_millis(5)
        );
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

        let checked = |c: Config| crate::declare::check_setting(&c).map_err(|e| e.to_string());
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[models]]\nname = \"m\"\n[[models.versions]]\nkey = \"v1\"\nendpoint = \"h\"\n",
        )
        .unwrap();
        let err = load(&["--state-file", bad.to_str().unwrap()], &[], None)
            .and_then(checked)
            .unwrap_err();
        assert!(err.contains("--state-file (MODELGATE_STATE_FILE)"), "{err}");
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains("models[0].versions[0].endpoint"), "{err}");
        let missing = dir.path().join("missing.toml");
        let err = load(&["--state-file", missing.to_str().unwrap()], &[], None)
            .and_then(checked)
            .unwrap_err();
        assert!(
            err.contains("missing.toml") && err.contains("cannot read"),
            "{err}"
        );
        let good = load(&["--state-file", good], &[], None).unwrap();
        assert!(crate::declare::check_setting(&good).is_ok());
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
}
