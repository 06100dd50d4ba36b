//! `modelgate ctl`: the control API from the shell. Every subcommand is one control call (or a
//! stream of them) built from flags; answers print as tables or as proto JSON. `ctl call` reaches
//! any method with a JSON body, like grpcurl.
//!
//! Exit codes: 0 success; 1 another server error; 2 bad usage or input file; 3 modelgate
//! unreachable (or UNAVAILABLE / DEADLINE_EXCEEDED); 4 NOT_FOUND; 5 INVALID_ARGUMENT /
//! OUT_OF_RANGE; 6 FAILED_PRECONDITION / ALREADY_EXISTS / ABORTED; 7 UNAUTHENTICATED /
//! PERMISSION_DENIED. Errors print the server's own message on stderr.

pub mod client;
pub mod render;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

pub use client::{Client, CtlError};
use render::Output;

/// Options of `modelgate ctl`.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// modelgate's control port.
    #[arg(
        long,
        env = "MODELGATE_CTL_ADDR",
        default_value = "http://127.0.0.1:9001",
        global = true
    )]
    pub addr: String,
    /// Bearer token, when modelgate runs with --control-token.
    #[arg(
        long,
        env = "MODELGATE_CONTROL_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify a TLS control port against, instead of the system roots;
    /// TLS is used when --addr starts with https://.
    #[arg(long, value_name = "FILE", env = "MODELGATE_CTL_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for a control port that requires one (--control-client-ca).
    #[arg(
        long,
        value_name = "FILE",
        env = "MODELGATE_CTL_CERT",
        requires = "key",
        global = true
    )]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "MODELGATE_CTL_KEY",
        requires = "cert",
        global = true
    )]
    pub key: Option<PathBuf>,
    /// Name to verify the control port's certificate against, when it is not --addr's host.
    #[arg(
        long,
        value_name = "NAME",
        env = "MODELGATE_CTL_SERVER_NAME",
        global = true
    )]
    pub server_name: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Deadline of each control call (`--timeout` is a setting of `shadows set`, not this).
    // Not `--timeout`: a global flag shares its name and value with a subcommand's flag of the
    // same id, so `shadows set` without `--timeout` stored this deadline as the shadow's.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    pub call_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The control services.
#[derive(Subcommand, Debug, Clone)]
pub enum CtlCommand {
    /// Models and versions: register, list, stages, aliases, promotion gates.
    #[command(subcommand)]
    Models(Models),
    /// A/B experiments: create, list, pause, resume, stop, conclude, results.
    #[command(subcommand)]
    Experiments(Experiments),
    /// Shadow deployments: set, remove, list, report.
    #[command(subcommand)]
    Shadows(Shadows),
    /// Prediction records: get one, list a model's.
    #[command(subcommand)]
    Predictions(Predictions),
    /// Outcomes (ground truth): record one, import many, model performance.
    #[command(subcommand)]
    Outcomes(Outcomes),
    /// The online feature store: register, list, put, get.
    #[command(subcommand)]
    Features(Features),
    /// Drift: references, reports, retraining policies.
    #[command(subcommand)]
    Drift(Drift),
    /// The event stream.
    #[command(subcommand)]
    Events(Events),
    /// Any control method with a JSON request, e.g.
    /// `call Registry/ListModels '{}'` (like grpcurl; the answer is printed as proto JSON).
    Call {
        /// `Service/Method`; `modelgate.v1.` may be left out.
        method: String,
        /// The request as proto JSON; `-` reads it from stdin.
        #[arg(default_value = "{}")]
        body: String,
    },
}

/// `ctl models …`
#[derive(Subcommand, Debug, Clone)]
pub enum Models {
    /// Every model with its production version, latest version and aliases.
    List,
    /// A model's versions.
    Versions {
        /// Model name.
        model: String,
        /// Only this stage: staging, production, archived.
        #[arg(long)]
        stage: Option<String>,
    },
    /// One version (number or alias).
    Get {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
    },
    /// The production version.
    Production {
        /// Model name.
        model: String,
    },
    /// Registers a new version (numbered by modelgate).
    Register(Box<Register>),
    /// Moves a version to a stage: none, staging, production (archives the previous one), archived.
    Stage {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// none | staging | production | archived
        stage: String,
        /// Skip the promotion gates.
        #[arg(long)]
        force: bool,
    },
    /// Same as `stage MODEL VERSION production`.
    Promote {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// Skip the promotion gates.
        #[arg(long)]
        force: bool,
    },
    /// Points an alias at a version.
    Alias {
        /// Model name.
        model: String,
        /// Alias name.
        alias: String,
        /// Version number or alias.
        version: String,
    },
    /// Removes an alias.
    Unalias {
        /// Model name.
        model: String,
        /// Alias name.
        alias: String,
    },
    /// Shows the promotion gates (`--min`/`--max` set them).
    Policy {
        /// Model name.
        model: String,
        /// Gate: METRIC=VALUE the version's metric must reach; repeatable.
        #[arg(long = "min", value_name = "METRIC=VALUE")]
        minimum: Vec<String>,
        /// Gate: METRIC=VALUE the version's metric must not exceed; repeatable.
        #[arg(long = "max", value_name = "METRIC=VALUE")]
        maximum: Vec<String>,
    },
    /// Deletes a version that is not in production.
    Delete {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
    },
}

/// `ctl models register …`
#[derive(Args, Debug, Clone)]
pub struct Register {
    /// Model name.
    pub model: String,
    /// The model server of this version: http://host:port, or https://host:port over TLS.
    #[arg(long)]
    pub endpoint: String,
    /// Model name to send to the model server, when it differs.
    #[arg(long)]
    pub backend_model: Option<String>,
    /// Model version to send to the model server.
    #[arg(long)]
    pub backend_version: Option<String>,
    /// Artifact path or URI (a local file is hashed).
    #[arg(long)]
    pub artifact_uri: Option<String>,
    /// Expected SHA-256 of the artifact.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Free text.
    #[arg(long)]
    pub description: Option<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// METRIC=NUMBER (offline evaluation); repeatable.
    #[arg(long = "metric", value_name = "METRIC=NUMBER")]
    pub metrics: Vec<String>,
    /// How to read a prediction: argmax:OUTPUT[:LABEL,…] | threshold:OUTPUT:T[:POS:NEG] |
    /// label:OUTPUT | value:OUTPUT.
    #[arg(long)]
    pub prediction: Option<String>,
    /// Feature names of an input: INPUT=NAME,NAME,…; repeatable.
    #[arg(long = "features", value_name = "INPUT=NAMES")]
    pub features: Vec<String>,
}

/// `ctl experiments …`
#[derive(Subcommand, Debug, Clone)]
pub enum Experiments {
    /// Creates and starts an experiment.
    Create {
        /// Experiment name.
        name: String,
        /// Model name.
        #[arg(long)]
        model: String,
        /// NAME=VERSION[:WEIGHT]; at least two.
        #[arg(
            long = "variant",
            value_name = "NAME=VERSION[:WEIGHT]",
            required = true
        )]
        variants: Vec<String>,
        /// Share of units in the experiment, (0, 1]; default 1.
        #[arg(long)]
        coverage: Option<f64>,
        /// Assignment salt (change it to reshuffle units).
        #[arg(long)]
        salt: Option<String>,
        /// Metadata key of the unit id (default: the server's --unit-key).
        #[arg(long)]
        unit_key: Option<String>,
        /// Significance level.
        #[arg(long)]
        alpha: Option<f64>,
        /// Start time, RFC 3339.
        #[arg(long)]
        start: Option<String>,
        /// End time, RFC 3339.
        #[arg(long)]
        end: Option<String>,
    },
    /// Every experiment (of one model).
    List {
        /// Only this model's.
        #[arg(long)]
        model: Option<String>,
    },
    /// One experiment.
    Get {
        /// Experiment name.
        name: String,
    },
    /// Stops assigning units; traffic goes to production.
    Pause {
        /// Experiment name.
        name: String,
    },
    /// Assigns again.
    Resume {
        /// Experiment name.
        name: String,
    },
    /// Ends it without a winner.
    Stop {
        /// Experiment name.
        name: String,
    },
    /// Ends it and promotes the winner's version in the same write.
    Conclude {
        /// Experiment name.
        name: String,
        /// Winning variant (none: conclude without promotion).
        #[arg(long)]
        winner: Option<String>,
        /// Skip the promotion gates.
        #[arg(long)]
        force: bool,
    },
    /// Per-variant counts, rates and the tests (significance, SRM, always-valid).
    Results {
        /// Experiment name.
        name: String,
    },
}

/// `ctl shadows …`
#[derive(Subcommand, Debug, Clone)]
pub enum Shadows {
    /// Mirrors a share of production traffic to a version.
    Set {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// Share of requests mirrored, (0, 1].
        #[arg(long, default_value_t = 1.0)]
        fraction: f64,
        /// Deadline of each copy, at most 60s (default 1s).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// When answers agree: label (default), bytes, or tolerance:ABS[:REL].
        #[arg(long)]
        compare: Option<String>,
    },
    /// Stops mirroring to a version.
    Remove {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
    },
    /// Every shadow (of one model).
    List {
        /// Only this model's.
        #[arg(long)]
        model: Option<String>,
    },
    /// Agreement, latency and disagreements of a shadow.
    Report {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// Disagreements to show.
        #[arg(long, default_value_t = 10)]
        disagreements: u32,
    },
}

/// `ctl predictions …`
#[derive(Subcommand, Debug, Clone)]
pub enum Predictions {
    /// One record by request id (the `x-modelgate-request-id` response header).
    Get {
        /// Request id.
        request_id: String,
    },
    /// A model's records, newest first.
    List {
        /// Model name.
        model: String,
        /// Only this version number.
        #[arg(long)]
        version: Option<u32>,
        /// At most this many (≤ 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// From this time, RFC 3339.
        #[arg(long)]
        since: Option<String>,
    },
}

/// `ctl outcomes …`
#[derive(Subcommand, Debug, Clone)]
pub enum Outcomes {
    /// Records the truth for a prediction: one of --label, --value, --success.
    Record {
        /// Request id of the prediction.
        request_id: String,
        /// Row of a batched request.
        #[arg(long, default_value_t = 0)]
        row: u32,
        /// The true label.
        #[arg(long, group = "actual")]
        label: Option<String>,
        /// The true value (regression).
        #[arg(long, group = "actual")]
        value: Option<f64>,
        /// Whether the prediction was right.
        #[arg(long, group = "actual")]
        success: Option<bool>,
        /// Replace an outcome already recorded.
        #[arg(long)]
        overwrite: bool,
    },
    /// Streams outcomes from a JSON-lines file (`-`: stdin), one RecordOutcomeRequest per line,
    /// e.g. {"requestId":"…","actual":{"label":"setosa"}}.
    Import {
        /// File path or `-`.
        file: String,
    },
    /// Accuracy / MAE / RMSE of a model version from its outcomes.
    Performance {
        /// Model name.
        model: String,
        /// Version number or alias (default: production).
        #[arg(long)]
        version: Option<String>,
        /// Only the last N outcomes.
        #[arg(long)]
        window: Option<u32>,
    },
}

/// `ctl features …`
#[derive(Subcommand, Debug, Clone)]
pub enum Features {
    /// Declares a feature.
    Register {
        /// Feature name.
        name: String,
        /// number | string
        #[arg(long = "type", default_value = "number")]
        kind: String,
        /// Values older than this are not served.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
    },
    /// Every feature.
    List,
    /// Writes an entity's values: NAME=VALUE… (numbers, else strings).
    Put {
        /// Entity id.
        entity: String,
        /// NAME=VALUE; at least one.
        #[arg(required = true)]
        values: Vec<String>,
        /// Event time, RFC 3339 (default now).
        #[arg(long)]
        time: Option<String>,
    },
    /// Reads values of entities, as of now or a time.
    Get {
        /// Entity ids.
        #[arg(long = "entity", required = true)]
        entities: Vec<String>,
        /// Feature names.
        #[arg(long = "feature", required = true)]
        features: Vec<String>,
        /// Point in time, RFC 3339.
        #[arg(long)]
        as_of: Option<String>,
    },
}

/// `ctl drift …`
#[derive(Subcommand, Debug, Clone)]
pub enum Drift {
    /// Uploads a reference sample from a CSV file with a header row of feature names.
    SetReference {
        /// Model name.
        model: String,
        /// CSV file (`-`: stdin).
        #[arg(long)]
        csv: String,
        /// Columns to treat as categories; repeatable.
        #[arg(long = "categorical")]
        categorical: Vec<String>,
    },
    /// Takes the next N live rows as the reference.
    Capture {
        /// Model name.
        model: String,
        /// Rows to capture.
        #[arg(long, default_value_t = 1000)]
        rows: u32,
    },
    /// The reference's summary.
    Reference {
        /// Model name.
        model: String,
    },
    /// Data drift per feature and concept drift per version.
    Report {
        /// Model name.
        model: String,
        /// Evaluate now instead of showing the last evaluation.
        #[arg(long)]
        evaluate: bool,
    },
    /// Shows the retraining policy; flags change it.
    Policy {
        /// Model name.
        model: String,
        /// Trigger on data drift.
        #[arg(long)]
        on_data_drift: Option<bool>,
        /// Trigger on performance drift.
        #[arg(long)]
        on_performance_drift: Option<bool>,
        /// Trigger when production is older than this.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
        /// Least time between two triggers.
        #[arg(long, value_parser = humantime::parse_duration)]
        cooldown: Option<Duration>,
    },
}

/// `ctl events …`
#[derive(Subcommand, Debug, Clone)]
pub enum Events {
    /// Stored events after a cursor, then (with --follow) new ones as they happen.
    Watch {
        /// Start after this cursor (0: from the first event).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Only these types; repeatable.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only this model's.
        #[arg(long)]
        model: Option<String>,
        /// Keep watching (until Ctrl-C); otherwise stop once the stored events are shown.
        #[arg(long, short)]
        follow: bool,
    },
}

/// Runs a `ctl` command; the error carries the exit code.
pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    // Check what can be checked before connecting.
    let plan = plan(&args.command)?;
    let tls = client::TlsFiles {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        server_name: args.server_name.clone(),
    };
    let client =
        Client::connect(&args.addr, args.token.as_deref(), &tls, args.call_timeout).await?;
    match plan {
        Plan::Unary { method, body, view } => {
            let answer = client.unary(method, body).await?;
            show(&answer, view, args.output);
        }
        Plan::Call { method, body } => {
            // Like grpcurl: the answer as proto JSON, whatever --output says.
            let answer = client.unary(&method, body).await?;
            render::print(&answer, Output::Json);
        }
        Plan::PolicyThenShow { set, get } => {
            let answer = match set {
                Some((method, body)) => client.unary(method, body).await?,
                None => client.unary(get.0, get.1).await?,
            };
            show(&answer, View::Whole, args.output);
        }
        Plan::Import { batches } => {
            let answer = client
                .client_stream("Outcomes/RecordOutcomes", batches)
                .await?;
            show(&answer, View::Whole, args.output);
        }
        Plan::Watch { body, follow } => {
            let output = args.output;
            let idle = (!follow).then_some(Duration::from_millis(500));
            client
                .server_stream("Events/Watch", body, idle, |e| {
                    match output {
                        Output::Json => println!("{e}"),
                        Output::Table => println!(
                            "{:>6}  {}  {:<24} {}",
                            render::cell(&e["cursor"]),
                            render::cell(&e["time"]),
                            render::cell(&e["type"]),
                            render::cell(&e["message"])
                        ),
                    }
                    true
                })
                .await?;
        }
    }
    Ok(())
}

/// What to show of an answer in table mode.
#[derive(Clone, Copy, Debug)]
enum View {
    /// Every field.
    Whole,
    /// The list in this field, as a table with these columns.
    List(&'static str, &'static [&'static str]),
    /// A prediction record: feature names beside their values.
    Prediction,
}

fn show(answer: &Value, view: View, output: Output) {
    match (view, output) {
        (View::List(field, columns), Output::Table) => {
            let mut rows = answer[field].as_array().cloned().unwrap_or_default();
            if columns == PREDICTION_COLUMNS {
                rows.iter_mut().for_each(render::plain_predictions);
            }
            if rows.is_empty() {
                println!("no {field}");
            } else {
                println!("{}", render::table(&rows, columns));
            }
        }
        (View::Prediction, Output::Table) => print!("{}", render::prediction_record(answer)),
        _ => render::print(answer, output),
    }
}

enum Plan {
    Unary {
        method: &'static str,
        body: Value,
        view: View,
    },
    Call {
        method: String,
        body: Value,
    },
    /// Set when flags were given, else get; show the policy either way.
    PolicyThenShow {
        set: Option<(&'static str, Value)>,
        get: (&'static str, Value),
    },
    Import {
        batches: Vec<Value>,
    },
    Watch {
        body: Value,
        follow: bool,
    },
}

fn unary(method: &'static str, body: Value) -> Plan {
    Plan::Unary {
        method,
        body,
        view: View::Whole,
    }
}

fn list(
    method: &'static str,
    body: Value,
    field: &'static str,
    cols: &'static [&'static str],
) -> Plan {
    Plan::Unary {
        method,
        body,
        view: View::List(field, cols),
    }
}

fn usage(msg: impl Into<String>) -> CtlError {
    CtlError::Usage(msg.into())
}

/// `KEY=VALUE` pairs into a JSON object; `parse` turns each value into JSON.
fn pairs(
    flag: &str,
    items: &[String],
    parse: impl Fn(&str) -> Option<Value>,
) -> Result<Map<String, Value>, CtlError> {
    let mut m = Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| usage(format!("{flag} {item:?}: expected KEY=VALUE")))?;
        let v = parse(v).ok_or_else(|| usage(format!("{flag} {item:?}: {v:?} is not a number")))?;
        m.insert(k.to_string(), v);
    }
    Ok(m)
}

fn number(s: &str) -> Option<Value> {
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .map(|x| json!(x))
}

/// A feature value: a number when it reads as one, else text.
fn feature_value(s: &str) -> Value {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() => json!({ "number": x }),
        _ => json!({ "text": s }),
    }
}

fn stage(s: &str) -> Result<&'static str, CtlError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "none" | "unspecified" => "STAGE_UNSPECIFIED",
        "staging" => "STAGE_STAGING",
        "production" => "STAGE_PRODUCTION",
        "archived" => "STAGE_ARCHIVED",
        _ => {
            return Err(usage(format!(
                "stage {s:?}: expected none, staging, production or archived"
            )))
        }
    })
}

fn duration(d: Duration) -> Value {
    json!(format!("{}.{:09}s", d.as_secs(), d.subsec_nanos()))
}

fn prediction(spec: &str) -> Result<Value, CtlError> {
    let bad = || {
        usage(format!(
            "--prediction {spec:?}: expected argmax:OUTPUT[:LABEL,…], threshold:OUTPUT:T[:POS:NEG], label:OUTPUT or value:OUTPUT"
        ))
    };
    let parts: Vec<&str> = spec.split(':').collect();
    Ok(match parts.as_slice() {
        ["argmax", output] => json!({"argmax": {"output": output}}),
        ["argmax", output, labels] => {
            json!({"argmax": {"output": output, "labels": labels.split(',').collect::<Vec<_>>()}})
        }
        ["threshold", output, t, rest @ ..] if rest.is_empty() || rest.len() == 2 => {
            let t: f64 = t.parse().map_err(|_| bad())?;
            let mut v = json!({"output": output, "threshold": t});
            if let [pos, neg] = rest {
                v["positiveLabel"] = json!(pos);
                v["negativeLabel"] = json!(neg);
            }
            json!({ "threshold": v })
        }
        ["label", output] => json!({"label": {"output": output}}),
        ["value", output] => json!({"value": {"output": output}}),
        _ => return Err(bad()),
    })
}

fn comparison(spec: &str) -> Result<Value, CtlError> {
    let parts: Vec<&str> = spec.split(':').collect();
    let f = |s: &str| {
        s.parse::<f64>()
            .map_err(|_| usage(format!("--compare {spec:?}: {s:?} is not a number")))
    };
    Ok(match parts.as_slice() {
        ["label"] => json!({"label": {}}),
        ["bytes"] => json!({"bytes": {}}),
        ["tolerance", abs] => json!({"tolerance": {"absolute": f(abs)?}}),
        ["tolerance", abs, rel] => json!({"tolerance": {"absolute": f(abs)?, "relative": f(rel)?}}),
        _ => {
            return Err(usage(format!(
                "--compare {spec:?}: expected label, bytes or tolerance:ABS[:REL]"
            )))
        }
    })
}

fn read_input(path: &str) -> Result<String, CtlError> {
    if path == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| usage(format!("stdin: {e}")))
    } else {
        std::fs::read_to_string(path).map_err(|e| usage(format!("{path}: {e}")))
    }
}

/// Turns a CSV with a header row into SetReference's names and rows. Quoting is not supported:
/// values are split on commas and trimmed.
fn csv_reference(text: &str) -> Result<(Vec<String>, Vec<Value>), CtlError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| usage("the CSV is empty; it needs a header row of feature names"))?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(usage(format!(
                "CSV line {}: {} values for {} columns",
                i + 2,
                cells.len(),
                header.len()
            )));
        }
        rows.push(json!({"values": cells.iter().map(|c| feature_value(c)).collect::<Vec<_>>()}));
    }
    Ok((header, rows))
}

const MODEL_COLUMNS: &[&str] = &[
    "model",
    "productionVersion",
    "latestVersion",
    "versionCount",
    "aliases",
];
const VERSION_COLUMNS: &[&str] = &[
    "version",
    "stage",
    "endpoint",
    "aliases",
    "metrics",
    "tags",
    "createdAt",
];
const EXPERIMENT_COLUMNS: &[&str] = &[
    "name",
    "model",
    "state",
    "variants",
    "coverage",
    "winner",
    "createdAt",
];
const SHADOW_COLUMNS: &[&str] = &[
    "model",
    "version",
    "sampleFraction",
    "timeout",
    "comparison",
    "createdAt",
];
const PREDICTION_COLUMNS: &[&str] = &[
    "requestId",
    "time",
    "version",
    "experiment",
    "variant",
    "unitId",
    "statusCode",
    "latencyUs",
    "predictions",
];
const FEATURE_COLUMNS: &[&str] = &["name", "type", "ttl", "fromTraffic", "description"];

fn plan(cmd: &CtlCommand) -> Result<Plan, CtlError> {
    Ok(match cmd.clone() {
        CtlCommand::Call { method, body } => {
            let text = if body == "-" { read_input("-")? } else { body };
            let body: Value = serde_json::from_str(&text)
                .map_err(|e| usage(format!("the request is not JSON: {e}")))?;
            Plan::Call { method, body }
        }
        CtlCommand::Models(m) => match m {
            Models::List => list("Registry/ListModels", json!({}), "models", MODEL_COLUMNS),
            Models::Versions { model, stage: s } => {
                let mut body = json!({ "model": model });
                if let Some(s) = s {
                    body["stage"] = json!(stage(&s)?);
                }
                list(
                    "Registry/ListModelVersions",
                    body,
                    "versions",
                    VERSION_COLUMNS,
                )
            }
            Models::Get { model, version } => unary(
                "Registry/GetModelVersion",
                json!({"model": model, "version": version}),
            ),
            Models::Production { model } => {
                unary("Registry/GetProductionVersion", json!({ "model": model }))
            }
            Models::Register(r) => {
                let mut body = json!({
                    "model": r.model,
                    "endpoint": r.endpoint,
                    "tags": pairs("--tag", &r.tags, |v| Some(json!(v)))?,
                    "metrics": pairs("--metric", &r.metrics, number)?,
                });
                for (key, v) in [
                    ("backendModel", &r.backend_model),
                    ("backendVersion", &r.backend_version),
                    ("artifactUri", &r.artifact_uri),
                    ("artifactSha256", &r.sha256),
                    ("description", &r.description),
                ] {
                    if let Some(v) = v {
                        body[key] = json!(v);
                    }
                }
                if let Some(p) = &r.prediction {
                    body["prediction"] = prediction(p)?;
                }
                let mut names = Vec::new();
                for f in &r.features {
                    let (input, list) = f.split_once('=').ok_or_else(|| {
                        usage(format!("--features {f:?}: expected INPUT=NAME,NAME,…"))
                    })?;
                    names.push(
                        json!({"input": input, "names": list.split(',').collect::<Vec<_>>()}),
                    );
                }
                body["featureNames"] = json!(names);
                unary("Registry/RegisterModelVersion", body)
            }
            Models::Stage {
                model,
                version,
                stage: s,
                force,
            } => unary(
                "Registry/TransitionStage",
                json!({"model": model, "version": version, "stage": stage(&s)?, "force": force}),
            ),
            Models::Promote {
                model,
                version,
                force,
            } => unary(
                "Registry/TransitionStage",
                json!({"model": model, "version": version, "stage": "STAGE_PRODUCTION", "force": force}),
            ),
            Models::Alias {
                model,
                alias,
                version,
            } => unary(
                "Registry/SetAlias",
                json!({"model": model, "alias": alias, "version": version}),
            ),
            Models::Unalias { model, alias } => unary(
                "Registry/DeleteAlias",
                json!({"model": model, "alias": alias}),
            ),
            Models::Policy {
                model,
                minimum,
                maximum,
            } => {
                let set = if minimum.is_empty() && maximum.is_empty() {
                    None
                } else {
                    Some((
                        "Registry/SetPromotionPolicy",
                        json!({
                            "model": model,
                            "minimumMetrics": pairs("--min", &minimum, number)?,
                            "maximumMetrics": pairs("--max", &maximum, number)?,
                        }),
                    ))
                };
                Plan::PolicyThenShow {
                    set,
                    get: ("Registry/GetPromotionPolicy", json!({ "model": model })),
                }
            }
            Models::Delete { model, version } => unary(
                "Registry/DeleteModelVersion",
                json!({"model": model, "version": version}),
            ),
        },
        CtlCommand::Experiments(e) => match e {
            Experiments::Create {
                name,
                model,
                variants,
                coverage,
                salt,
                unit_key,
                alpha,
                start,
                end,
            } => {
                let mut specs = Vec::new();
                for v in &variants {
                    let bad = || usage(format!("--variant {v:?}: expected NAME=VERSION[:WEIGHT]"));
                    let (name, rest) = v.split_once('=').ok_or_else(bad)?;
                    let (version, weight) = match rest.split_once(':') {
                        Some((ver, w)) => (ver, w.parse::<f64>().map_err(|_| bad())?),
                        None => (rest, 1.0),
                    };
                    specs.push(json!({"name": name, "version": version, "weight": weight}));
                }
                let mut body = json!({"name": name, "model": model, "variants": specs});
                for (key, v) in [
                    ("coverage", coverage.map(|c| json!(c))),
                    ("alpha", alpha.map(|a| json!(a))),
                    ("salt", salt.map(|s| json!(s))),
                    ("unitKey", unit_key.map(|s| json!(s))),
                    ("start", start.map(|s| json!(s))),
                    ("end", end.map(|s| json!(s))),
                ] {
                    if let Some(v) = v {
                        body[key] = v;
                    }
                }
                unary("Experiments/CreateExperiment", body)
            }
            Experiments::List { model } => list(
                "Experiments/ListExperiments",
                json!({"model": model.unwrap_or_default()}),
                "experiments",
                EXPERIMENT_COLUMNS,
            ),
            Experiments::Get { name } => {
                unary("Experiments/GetExperiment", json!({ "name": name }))
            }
            Experiments::Pause { name } => {
                unary("Experiments/PauseExperiment", json!({ "name": name }))
            }
            Experiments::Resume { name } => {
                unary("Experiments/ResumeExperiment", json!({ "name": name }))
            }
            Experiments::Stop { name } => {
                unary("Experiments/StopExperiment", json!({ "name": name }))
            }
            Experiments::Conclude {
                name,
                winner,
                force,
            } => unary(
                "Experiments/ConcludeExperiment",
                json!({"name": name, "winner": winner.unwrap_or_default(), "force": force}),
            ),
            Experiments::Results { name } => {
                unary("Experiments/GetExperimentResults", json!({ "name": name }))
            }
        },
        CtlCommand::Shadows(s) => match s {
            Shadows::Set {
                model,
                version,
                fraction,
                timeout,
                compare,
            } => {
                let mut body =
                    json!({"model": model, "version": version, "sampleFraction": fraction});
                if let Some(t) = timeout {
                    body["timeout"] = duration(t);
                }
                if let Some(c) = compare {
                    body["comparison"] = comparison(&c)?;
                }
                unary("Shadows/SetShadow", body)
            }
            Shadows::Remove { model, version } => unary(
                "Shadows/RemoveShadow",
                json!({"model": model, "version": version}),
            ),
            Shadows::List { model } => list(
                "Shadows/ListShadows",
                json!({"model": model.unwrap_or_default()}),
                "shadows",
                SHADOW_COLUMNS,
            ),
            Shadows::Report {
                model,
                version,
                disagreements,
            } => unary(
                "Shadows/GetShadowReport",
                json!({"model": model, "version": version, "disagreements": disagreements}),
            ),
        },
        CtlCommand::Predictions(p) => match p {
            Predictions::Get { request_id } => Plan::Unary {
                method: "Predictions/GetPrediction",
                body: json!({ "requestId": request_id }),
                view: View::Prediction,
            },
            Predictions::List {
                model,
                version,
                limit,
                since,
            } => {
                let mut body =
                    json!({"model": model, "version": version.unwrap_or(0), "limit": limit});
                if let Some(s) = since {
                    body["startTime"] = json!(s);
                }
                list(
                    "Predictions/ListPredictions",
                    body,
                    "predictions",
                    PREDICTION_COLUMNS,
                )
            }
        },
        CtlCommand::Outcomes(o) => match o {
            Outcomes::Record {
                request_id,
                row,
                label,
                value,
                success,
                overwrite,
            } => {
                let actual = match (label, value, success) {
                    (Some(l), None, None) => json!({ "label": l }),
                    (None, Some(v), None) => json!({ "number": v }),
                    (None, None, Some(s)) => json!({ "success": s }),
                    _ => return Err(usage("give one of --label, --value or --success")),
                };
                unary(
                    "Outcomes/RecordOutcome",
                    json!({"requestId": request_id, "row": row, "actual": actual, "overwrite": overwrite}),
                )
            }
            Outcomes::Import { file } => {
                let text = read_input(&file)?;
                let mut outcomes = Vec::new();
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: Value = serde_json::from_str(line)
                        .map_err(|e| usage(format!("{file} line {}: {e}", i + 1)))?;
                    outcomes.push(v);
                }
                if outcomes.is_empty() {
                    return Err(usage(format!("{file}: no outcomes")));
                }
                // Batches of 500 per stream message keep each message small.
                let batches = outcomes
                    .chunks(500)
                    .map(|c| json!({ "outcomes": c }))
                    .collect();
                Plan::Import { batches }
            }
            Outcomes::Performance {
                model,
                version,
                window,
            } => unary(
                "Outcomes/GetModelPerformance",
                json!({"model": model, "version": version.unwrap_or_default(), "window": window.unwrap_or(0)}),
            ),
        },
        CtlCommand::Features(f) => match f {
            Features::Register {
                name,
                kind,
                ttl,
                description,
            } => {
                let t = match kind.to_ascii_lowercase().as_str() {
                    "number" => "FEATURE_TYPE_NUMBER",
                    "string" => "FEATURE_TYPE_STRING",
                    _ => return Err(usage(format!("--type {kind:?}: expected number or string"))),
                };
                let mut body = json!({"name": name, "type": t, "description": description.unwrap_or_default()});
                if let Some(d) = ttl {
                    body["ttl"] = duration(d);
                }
                unary("Features/RegisterFeature", body)
            }
            Features::List => list(
                "Features/ListFeatures",
                json!({}),
                "features",
                FEATURE_COLUMNS,
            ),
            Features::Put {
                entity,
                values,
                time,
            } => {
                let m = pairs("feature value", &values, |x| Some(feature_value(x)))?;
                let mut row = json!({"entityId": entity, "values": m});
                if let Some(t) = time {
                    row["eventTime"] = json!(t);
                }
                unary("Features/PutFeatures", json!({ "rows": [row] }))
            }
            Features::Get {
                entities,
                features,
                as_of,
            } => {
                let mut body = json!({"entityIds": entities, "featureNames": features});
                if let Some(t) = as_of {
                    body["asOf"] = json!(t);
                }
                unary("Features/GetFeatures", body)
            }
        },
        CtlCommand::Drift(d) => match d {
            Drift::SetReference {
                model,
                csv,
                categorical,
            } => {
                let (names, rows) = csv_reference(&read_input(&csv)?)?;
                unary(
                    "Drift/SetReference",
                    json!({"model": model, "featureNames": names, "rows": rows, "categoricalFeatures": categorical}),
                )
            }
            Drift::Capture { model, rows } => unary(
                "Drift/CaptureReference",
                json!({"model": model, "rows": rows}),
            ),
            Drift::Reference { model } => unary("Drift/GetReference", json!({ "model": model })),
            Drift::Report { model, evaluate } => unary(
                "Drift/GetDriftReport",
                json!({"model": model, "evaluate": evaluate}),
            ),
            Drift::Policy {
                model,
                on_data_drift,
                on_performance_drift,
                max_age,
                cooldown,
            } => {
                let changing = on_data_drift.is_some()
                    || on_performance_drift.is_some()
                    || max_age.is_some()
                    || cooldown.is_some();
                let set = changing.then(|| {
                    let mut body = json!({
                        "model": model,
                        "onDataDrift": on_data_drift.unwrap_or(false),
                        "onPerformanceDrift": on_performance_drift.unwrap_or(false),
                    });
                    if let Some(d) = max_age {
                        body["maxAge"] = duration(d);
                    }
                    if let Some(d) = cooldown {
                        body["cooldown"] = duration(d);
                    }
                    ("Drift/SetRetrainPolicy", body)
                });
                Plan::PolicyThenShow {
                    set,
                    get: ("Drift/GetRetrainPolicy", json!({ "model": model })),
                }
            }
        },
        CtlCommand::Events(Events::Watch {
            from,
            types,
            model,
            follow,
        }) => Plan::Watch {
            body: json!({"fromCursor": from, "types": types, "model": model.unwrap_or_default()}),
            follow,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_become_proto_json() {
        assert_eq!(
            prediction("threshold:probabilities:0.5:yes:no").unwrap(),
            json!({"threshold": {"output": "probabilities", "threshold": 0.5, "positiveLabel": "yes", "negativeLabel": "no"}})
        );
        assert_eq!(
            prediction("argmax:p:a,b").unwrap(),
            json!({"argmax": {"output": "p", "labels": ["a", "b"]}})
        );
        assert!(prediction("softmax:p").is_err());
        assert_eq!(
            comparison("tolerance:0.01").unwrap(),
            json!({"tolerance": {"absolute": 0.01}})
        );
        assert_eq!(stage("Production").unwrap(), "STAGE_PRODUCTION");
        assert!(stage("prod").is_err());
        assert_eq!(feature_value("3.5"), json!({"number": 3.5}));
        assert_eq!(feature_value("gold"), json!({"text": "gold"}));
        let err = pairs("--metric", &["acc".into()], number).unwrap_err();
        assert_eq!(err.to_string(), "--metric \"acc\": expected KEY=VALUE");
        assert_eq!(duration(Duration::from_millis(1500)), json!("1.500000000s"));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> CtlArgs {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap()
            .ctl
    }

    fn body(args: &CtlArgs) -> Value {
        match plan(&args.command).unwrap() {
            Plan::Unary { body, .. } => body,
            _ => panic!("a unary call"),
        }
    }

    #[test]
    fn the_call_deadline_and_the_shadow_timeout_are_separate_flags() {
        let a = parse(&["shadows", "set", "iris", "2"]);
        assert_eq!(a.call_timeout, Duration::from_secs(30));
        assert_eq!(body(&a).get("timeout"), None, "the server's default");
        let a = parse(&["--call-timeout", "5s", "shadows", "set", "iris", "2"]);
        assert_eq!(a.call_timeout, Duration::from_secs(5));
        assert_eq!(body(&a).get("timeout"), None);
        let a = parse(&["shadows", "set", "iris", "2", "--timeout", "2s"]);
        assert_eq!(a.call_timeout, Duration::from_secs(30));
        assert_eq!(body(&a)["timeout"], "2.000000000s");
    }

    /// A global flag and a subcommand's flag with the same id or name share one value in clap:
    /// whatever one is given (or defaults to) the other gets.
    #[test]
    fn no_subcommand_flag_shadows_a_global_one() {
        use clap::Args;
        let cmd = CtlArgs::augment_args(clap::Command::new("ctl"));
        let globals: Vec<(String, Option<String>)> = cmd
            .get_arguments()
            .filter(|a| a.is_global_set())
            .map(|a| (a.get_id().to_string(), a.get_long().map(str::to_string)))
            .collect();
        assert!(globals.iter().any(|(id, _)| id == "call_timeout"));
        fn walk(
            cmd: &clap::Command,
            path: &str,
            globals: &[(String, Option<String>)],
            bad: &mut Vec<String>,
        ) {
            for a in cmd.get_arguments() {
                for (id, long) in globals {
                    if a.get_id() == id.as_str()
                        || (long.is_some() && a.get_long() == long.as_deref())
                    {
                        bad.push(format!("{path}: --{}", a.get_long().unwrap_or_default()));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), globals, bad);
            }
        }
        let mut bad = Vec::new();
        for sub in cmd.get_subcommands() {
            walk(sub, sub.get_name(), &globals, &mut bad);
        }
        assert!(
            bad.is_empty(),
            "flags that collide with global ones: {bad:?}"
        );
    }

    #[test]
    fn csv_references_need_a_header_and_even_rows() {
        let (names, rows) = csv_reference("a, b\n1,x\n2,y\n").unwrap();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(rows[1], json!({"values": [{"number": 2.0}, {"text": "y"}]}));
        let err = csv_reference("a,b\n1\n").unwrap_err();
        assert_eq!(err.to_string(), "CSV line 2: 1 values for 2 columns");
    }
}
