//! Declarative state: one TOML file naming models, versions, experiments and shadows, applied at
//! start and again whenever it changes, so that every replica of a Deployment — each with its own
//! RocksDB — converges to the same routing. The format and its rules are in
//! `docs/declarative-state.md`; `deploy/state.example.toml` is a complete example.
//!
//! Three layers, the first two plain Rust (no I/O, no async):
//!
//! - **The format** ([`StateFile`]) and [`parse`]: serde with `deny_unknown_fields`, then checks
//!   across items, then a dry run of the whole file against an empty state. Every error names the
//!   field by its path in the file (`models[0].versions[1].endpoint: …`) and its line.
//! - **Reconciliation** ([`reconcile`], and [`plan`] on a copy): compares what the file says with
//!   what a [`State`] holds and changes only the difference, through the same registry, experiment
//!   and shadow rules the gRPC services call. Applying a file twice changes nothing the second time.
//! - **Application** ([`apply`], [`watch`]): one [`ControlPlane::update_state`] per apply, so the
//!   whole file is one synced `WriteBatch` and one routing snapshot; then the same events the
//!   services publish, plus `state_file_applied` / `state_file_rejected`; and the poller.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::control::{ControlError, ControlPlane, State, Update};
use crate::experiment::{
    Experiment, ExperimentError, ExperimentState, Experiments, NewExperiment, NewVariant,
};
use crate::registry::{
    self, ModelVersion, NewVersion, PredictionSpec, PromotionPolicy, RegistryError, RegistryUpdate,
    Stage,
};
use crate::shadow::{self, Comparison, Shadow, ShadowError, ShadowSpec};

/// Event published when a state file changed something (or had items it could not apply).
pub const APPLIED_EVENT: &str = "state_file_applied";
/// Event published when a changed state file is refused at runtime; the current state is kept.
pub const REJECTED_EVENT: &str = "state_file_rejected";

/// Largest state file read. A ConfigMap holds at most 1 MiB; anything near this is a mistake.
const MAX_FILE_BYTES: u64 = 4 << 20;

// ---------------------------------------------------------------------------------------------
// The format
// ---------------------------------------------------------------------------------------------

/// A state file: what the file manages. Anything it does not name is left alone.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Models and their versions (`[[models]]`).
    #[serde(default)]
    pub models: Vec<ModelDecl>,
    /// Experiments (`[[experiments]]`).
    #[serde(default)]
    pub experiments: Vec<ExperimentDecl>,
    /// Shadows (`[[shadows]]`).
    #[serde(default)]
    pub shadows: Vec<ShadowDecl>,
}

/// A model (`[[models]]`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    /// Model name.
    pub name: String,
    /// Promotion policy; when absent, the model's policy is not managed.
    #[serde(default)]
    pub promotion_policy: Option<PolicyDecl>,
    /// Versions (`[[models.versions]]`).
    #[serde(default)]
    pub versions: Vec<VersionDecl>,
}

/// A promotion policy (`[models.promotion_policy]`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDecl {
    /// Metric → lowest value a version needs to reach production.
    #[serde(default)]
    pub minimum_metrics: BTreeMap<String, f64>,
    /// Metric → highest value a version may have to reach production.
    #[serde(default)]
    pub maximum_metrics: BTreeMap<String, f64>,
}

/// A model version (`[[models.versions]]`). Everything but `key` and `stage` is its registration,
/// which cannot change once registered: a change registers a new version and moves the key.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionDecl {
    /// The file's name for this version; it becomes a registry alias, which is how a version is
    /// found again on the next apply.
    pub key: String,
    /// Upstream, `http://host:port` (or `https://host:port` over TLS).
    pub endpoint: String,
    /// Model name written into forwarded OIP requests (empty: keep the caller's).
    #[serde(default)]
    pub backend_model: String,
    /// Model version written into forwarded OIP requests (empty: keep the caller's).
    #[serde(default)]
    pub backend_version: String,
    /// Stage to hold; `none` leaves the stage alone (new versions start in staging).
    #[serde(default)]
    pub stage: StageDecl,
    /// Where the artifact lives, recorded as given.
    #[serde(default)]
    pub artifact_uri: String,
    /// The artifact's SHA-256, recorded as given (never computed from a local file: the result
    /// would depend on the replica's file system).
    #[serde(default)]
    pub artifact_sha256: String,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Offline metrics, checked by the promotion policy.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// How predictions are read from responses (default: the value of the first output).
    #[serde(default)]
    pub prediction: Option<PredictionDecl>,
    /// Feature names per input tensor, in column order.
    #[serde(default)]
    pub feature_names: BTreeMap<String, Vec<String>>,
}

/// The stage a version should hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageDecl {
    /// Not managed.
    #[default]
    None,
    /// Staging.
    Staging,
    /// Production (at most one per model).
    Production,
    /// Archived.
    Archived,
}

impl StageDecl {
    fn stage(self) -> Option<Stage> {
        match self {
            StageDecl::None => None,
            StageDecl::Staging => Some(Stage::Staging),
            StageDecl::Production => Some(Stage::Production),
            StageDecl::Archived => Some(Stage::Archived),
        }
    }
}

/// How predictions are read (`prediction = { kind = "threshold", … }`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PredictionDecl {
    /// Index of the largest value per row, mapped through `labels` when given.
    Argmax {
        /// Output tensor (empty: the first).
        #[serde(default)]
        output: String,
        /// Label per class index.
        #[serde(default)]
        labels: Vec<String>,
    },
    /// Positive when the row's score exceeds `threshold`.
    Threshold {
        /// Output tensor (empty: the first).
        #[serde(default)]
        output: String,
        /// Decision threshold.
        threshold: f64,
        /// Label above the threshold (default `1`).
        #[serde(default)]
        positive_label: String,
        /// Label at or below it (default `0`).
        #[serde(default)]
        negative_label: String,
    },
    /// The output holds the label.
    Label {
        /// Output tensor (empty: the first).
        #[serde(default)]
        output: String,
    },
    /// Regression: the row's value.
    Value {
        /// Output tensor (empty: the first).
        #[serde(default)]
        output: String,
    },
}

impl PredictionDecl {
    /// The registry's form, with the API's defaults (`RegisterModelVersion` does the same).
    fn spec(&self) -> PredictionSpec {
        let or = |s: &str, default: &str| {
            if s.is_empty() {
                default.to_string()
            } else {
                s.to_string()
            }
        };
        match self.clone() {
            PredictionDecl::Argmax { output, labels } => PredictionSpec::Argmax { output, labels },
            PredictionDecl::Threshold {
                output,
                threshold,
                positive_label,
                negative_label,
            } => PredictionSpec::Threshold {
                output,
                threshold,
                positive_label: or(&positive_label, "1"),
                negative_label: or(&negative_label, "0"),
            },
            PredictionDecl::Label { output } => PredictionSpec::Label { output },
            PredictionDecl::Value { output } => PredictionSpec::Value { output },
        }
    }
}

/// An experiment (`[[experiments]]`). Created when absent; its definition cannot change after.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentDecl {
    /// Name, unique among all experiments, never reused.
    pub name: String,
    /// Model whose traffic it splits (declared in this file).
    pub model: String,
    /// Two or more arms.
    pub variants: Vec<VariantDecl>,
    /// Metadata key carrying the unit id (default `x-user-id`).
    #[serde(default)]
    pub unit_key: String,
    /// Salt of the assignment hash (default empty).
    #[serde(default)]
    pub salt: String,
    /// Share of units in the experiment, (0, 1] (default 1).
    #[serde(default)]
    pub coverage: Option<f64>,
    /// Significance level, (0, 0.5) (default 0.05).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Not before this instant (a TOML date-time with a time zone).
    #[serde(default)]
    pub start: Option<toml::value::Datetime>,
    /// Not after this instant.
    #[serde(default)]
    pub end: Option<toml::value::Datetime>,
    /// Lifecycle to hold: `running` (default), `paused` or `stopped`.
    #[serde(default)]
    pub state: ExperimentStateDecl,
}

/// An arm of an experiment.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantDecl {
    /// Name, unique in the experiment.
    pub name: String,
    /// The `key` of one of the model's versions in this file.
    pub version: String,
    /// Relative weight, > 0 (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// The lifecycle an experiment should hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExperimentStateDecl {
    /// Splitting traffic.
    #[default]
    Running,
    /// Everyone on production; statistics kept.
    Paused,
    /// Ended (a concluded experiment counts as stopped).
    Stopped,
}

/// A shadow (`[[shadows]]`). Set (upserted); `sample_fraction = 0` removes it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowDecl {
    /// Model (declared in this file).
    pub model: String,
    /// The `key` of the shadow version.
    pub version: String,
    /// Share of requests mirrored, [0, 1]; 0 means no shadow.
    pub sample_fraction: f64,
    /// When answers agree (default: same label).
    #[serde(default)]
    pub comparison: Option<ComparisonDecl>,
    /// Deadline of each copy, e.g. `500ms` (default 1s, at most 60s).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// When a shadow's answer agrees with production's (`comparison = { kind = "label" }`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ComparisonDecl {
    /// Same predicted label per row.
    Label {},
    /// Every output value within `absolute + relative × |production|`.
    Tolerance {
        /// Absolute tolerance (default 0).
        #[serde(default)]
        absolute: f64,
        /// Relative tolerance (default 0).
        #[serde(default)]
        relative: f64,
    },
    /// Byte-identical responses.
    Bytes {},
}

impl ComparisonDecl {
    fn comparison(&self) -> Comparison {
        match *self {
            ComparisonDecl::Label {} => Comparison::Label,
            ComparisonDecl::Tolerance { absolute, relative } => {
                Comparison::Tolerance { absolute, relative }
            }
            ComparisonDecl::Bytes {} => Comparison::Bytes,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A problem with a state file, named by the path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclareError {
    /// Path in the file, e.g. `models[0].versions[1].endpoint`; empty for the file as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
}

impl DeclareError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        DeclareError {
            path: path.into(),
            message: message.into(),
            position: None,
        }
    }
}

impl fmt::Display for DeclareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some((line, column)) = self.position {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

impl std::error::Error for DeclareError {}

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It cannot be read.
    #[error("{}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid state file.
    #[error("{}: {error}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, where.
        error: DeclareError,
    },
}

/// The file names whose registry errors use the API's request field names.
fn file_field(field: &str) -> &str {
    match field {
        "alias" => "key",
        "prediction.threshold.threshold" => "prediction.threshold",
        "feature_names.input" | "feature_names.names" => "feature_names",
        "comparison.tolerance" => "comparison",
        other => other,
    }
}

fn join(path: &str, field: &str) -> String {
    format!("{path}.{}", file_field(field))
}

fn registry_error(path: &str, e: RegistryError) -> DeclareError {
    match e {
        RegistryError::InvalidArgument { field, reason } => {
            DeclareError::at(join(path, field), reason)
        }
        other => DeclareError::at(path, other.to_string()),
    }
}

fn experiment_error(path: &str, e: ExperimentError) -> DeclareError {
    match e {
        ExperimentError::InvalidArgument { field, reason } => {
            DeclareError::at(join(path, &field), reason)
        }
        ExperimentError::Registry(e) => registry_error(path, e),
        other => DeclareError::at(path, other.to_string()),
    }
}

fn shadow_error(path: &str, e: ShadowError) -> DeclareError {
    match e {
        ShadowError::InvalidArgument { field, reason } => {
            DeclareError::at(join(path, field), reason)
        }
        ShadowError::Registry(e) => registry_error(path, e),
        other => DeclareError::at(path, other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// A state file read from disk: its content, its SHA-256 (which replicas can compare) and the
/// parsed declaration.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The parsed, checked declaration.
    pub file: StateFile,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
    text: String,
}

impl Loaded {
    /// Fills in the line of an error found after parsing (an apply refusal, a conflict).
    pub fn locate(&self, mut e: DeclareError) -> DeclareError {
        if e.position.is_none() {
            e.position = position_of_path(&self.text, &e.path);
        }
        e
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads and parses a state file.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let bytes = read(path)?;
    from_bytes(&bytes).map_err(|error| LoadError::Invalid {
        path: path.to_path_buf(),
        error,
    })
}

/// The bytes of a state file, refusing one far larger than a state file can sensibly be.
fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    let failed = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(failed)?.len();
    if size > MAX_FILE_BYTES {
        return Err(failed(std::io::Error::other(format!(
            "it is {size} bytes, more than the {MAX_FILE_BYTES} a state file may have"
        ))));
    }
    std::fs::read(path).map_err(failed)
}

/// Parses the bytes of a state file.
pub fn from_bytes(bytes: &[u8]) -> Result<Loaded, DeclareError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DeclareError::at("", format!("not UTF-8 text: {e}")))?;
    Ok(Loaded {
        file: parse(text)?,
        sha256: sha256_hex(bytes),
        text: text.to_string(),
    })
}

/// Parses and checks a state file: the TOML, the fields, the references between items, and a dry
/// run of the whole file against an empty state (so a file that parses also applies on a fresh
/// replica, unless a policy or experiment created by hand stands in the way).
pub fn parse(text: &str) -> Result<StateFile, DeclareError> {
    let file: StateFile = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return DeclareError::at("", message);
        };
        DeclareError {
            path: path_at(text, span.start).unwrap_or_default(),
            message,
            position: Some(line_column(text, span.start)),
        }
    })?;
    let located = |e: DeclareError| DeclareError {
        position: position_of_path(text, &e.path),
        ..e
    };
    check(&file).map_err(located)?;
    let mut empty = State::default();
    let (report, _) = reconcile(&file, &mut empty, 0).map_err(located)?;
    if let Some(conflict) = report.conflicts.into_iter().next() {
        return Err(located(conflict));
    }
    Ok(file)
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// A key or array item of the document, with where it is written.
struct Node {
    /// `models[0].versions[1].endpoint`.
    path: String,
    /// The key's bytes (none for an array item).
    key: Option<Range<usize>>,
    /// The value's bytes; for an `[[array]]` item, its header (where "missing field" points).
    value: Range<usize>,
}

/// Every key and array item of the document. `None` when the text is not TOML.
fn nodes(text: &str) -> Option<Vec<Node>> {
    use toml::de::{DeTable, DeValue};
    fn table(t: &DeTable<'_>, prefix: &str, out: &mut Vec<Node>) {
        for (k, v) in t.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            out.push(Node {
                path: path.clone(),
                key: Some(k.span()),
                value: v.span(),
            });
            value(v, &path, out);
        }
    }
    fn value(v: &toml::Spanned<DeValue<'_>>, path: &str, out: &mut Vec<Node>) {
        match v.get_ref() {
            DeValue::Table(t) => table(t, path, out),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    out.push(Node {
                        path: p.clone(),
                        key: None,
                        value: item.span(),
                    });
                    value(item, &p, out);
                }
            }
            _ => {}
        }
    }
    let doc = DeTable::parse(text).ok()?;
    let mut out = Vec::new();
    table(doc.get_ref(), "", &mut out);
    Some(out)
}

fn depth(path: &str) -> usize {
    path.matches(['.', '[']).count()
}

/// The path of the key or item whose text covers byte `offset` (where a serde error points), so
/// that the error names the field, not only its line. A key wins over the values around it (an
/// unknown key inside a table's header); otherwise the deepest value or item (a wrong type, or a
/// missing field reported at its table's `[[header]]`).
fn path_at(text: &str, offset: usize) -> Option<String> {
    let nodes = nodes(text)?;
    let deepest = |covers: &dyn Fn(&Node) -> bool| {
        nodes
            .iter()
            .filter(|n| covers(n))
            .max_by_key(|n| depth(&n.path))
            .map(|n| n.path.clone())
    };
    deepest(&|n| n.key.as_ref().is_some_and(|k| k.contains(&offset)))
        .or_else(|| deepest(&|n| n.value.contains(&offset)))
}

/// Where `path` (or, when it is not written in the file — a defaulted field — its nearest
/// ancestor) starts.
fn position_of_path(text: &str, path: &str) -> Option<(usize, usize)> {
    let nodes = nodes(text)?;
    let mut wanted = path.to_string();
    loop {
        if let Some(n) = nodes.iter().find(|n| n.path == wanted) {
            let at = n.key.as_ref().unwrap_or(&n.value).start;
            return Some(line_column(text, at));
        }
        let cut = wanted.rfind(['.', '['])?;
        wanted.truncate(cut);
    }
}

/// Checks that need more than one item: names and keys declared once, references to keys that
/// exist, one production version per model, values the API's "zero means default" would hide.
fn check(file: &StateFile) -> Result<(), DeclareError> {
    let mut models: BTreeMap<&str, (usize, BTreeSet<&str>)> = BTreeMap::new();
    for (i, m) in file.models.iter().enumerate() {
        let path = format!("models[{i}]");
        registry::validate_model_name(&m.name, "name").map_err(|e| registry_error(&path, e))?;
        if let Some((first, _)) = models.get(m.name.as_str()) {
            return Err(DeclareError::at(
                format!("{path}.name"),
                format!(
                    "model '{}' is declared twice (also models[{first}]); declare each model once",
                    m.name
                ),
            ));
        }
        let mut keys: BTreeMap<&str, usize> = BTreeMap::new();
        let mut production = None;
        for (j, v) in m.versions.iter().enumerate() {
            let path = format!("{path}.versions[{j}]");
            registry::validate_alias(&v.key).map_err(|e| registry_error(&path, e))?;
            if let Some(first) = keys.insert(&v.key, j) {
                return Err(DeclareError::at(
                    format!("{path}.key"),
                    format!(
                        "key '{}' is used twice in model '{}' (also versions[{first}])",
                        v.key, m.name
                    ),
                ));
            }
            if v.stage == StageDecl::Production {
                if let Some(first) = production.replace(j) {
                    return Err(DeclareError::at(
                        format!("{path}.stage"),
                        format!(
                            "model '{}' can have one production version; versions[{first}] is production too",
                            m.name
                        ),
                    ));
                }
            }
        }
        models.insert(&m.name, (i, keys.into_keys().collect()));
    }
    let key_of = |path: &str, model: &str, key: &str| -> Result<(), DeclareError> {
        let Some((i, keys)) = models.get(model) else {
            return Err(DeclareError::at(
                format!("{path}.model"),
                format!("model '{model}' is not declared under [[models]] in this file"),
            ));
        };
        if !keys.contains(key) {
            let known: Vec<&str> = keys.iter().copied().collect();
            return Err(DeclareError::at(
                format!("{path}.version"),
                format!(
                    "'{key}' is not a version key of model '{model}' (models[{i}] declares: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        Ok(())
    };
    let mut experiments: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, e) in file.experiments.iter().enumerate() {
        let path = format!("experiments[{i}]");
        if let Some(first) = experiments.insert(&e.name, i) {
            return Err(DeclareError::at(
                format!("{path}.name"),
                format!(
                    "experiment '{}' is declared twice (also experiments[{first}])",
                    e.name
                ),
            ));
        }
        if !models.contains_key(e.model.as_str()) {
            return Err(DeclareError::at(
                format!("{path}.model"),
                format!(
                    "model '{}' is not declared under [[models]] in this file",
                    e.model
                ),
            ));
        }
        for (k, v) in e.variants.iter().enumerate() {
            key_of(&format!("{path}.variants[{k}]"), &e.model, &v.version).map_err(|mut err| {
                // The variant's field is `version`; the model is the experiment's.
                err.path = format!("{path}.variants[{k}].version");
                err
            })?;
        }
        // CreateExperiment reads 0 as "the default"; in a file, 0 written out is a mistake.
        for (field, value) in [("coverage", e.coverage), ("alpha", e.alpha)] {
            if value == Some(0.0) {
                return Err(DeclareError::at(
                    format!("{path}.{field}"),
                    "must be greater than 0 (leave it out for the default)",
                ));
            }
        }
        for (field, value) in [("start", &e.start), ("end", &e.end)] {
            if let Some(d) = value {
                datetime_ms(d).map_err(|m| DeclareError::at(format!("{path}.{field}"), m))?;
            }
        }
    }
    let mut shadows: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, s) in file.shadows.iter().enumerate() {
        let path = format!("shadows[{i}]");
        key_of(&path, &s.model, &s.version)?;
        if let Some(first) = shadows.insert((&s.model, &s.version), i) {
            return Err(DeclareError::at(
                format!("{path}.version"),
                format!(
                    "model '{}' version '{}' already has a shadow in shadows[{first}]",
                    s.model, s.version
                ),
            ));
        }
        if let Some(t) = &s.timeout {
            crate::config::parse_duration(t)
                .map_err(|m| DeclareError::at(format!("{path}.timeout"), m))?;
        }
        if !(0.0..=1.0).contains(&s.sample_fraction) {
            return Err(DeclareError::at(
                format!("{path}.sample_fraction"),
                format!(
                    "{} is outside [0, 1] (0 removes the shadow)",
                    s.sample_fraction
                ),
            ));
        }
    }
    Ok(())
}

/// Unix milliseconds of a TOML offset date-time.
fn datetime_ms(d: &toml::value::Datetime) -> Result<u64, String> {
    use toml::value::Offset;
    let (Some(date), Some(time), Some(offset)) = (d.date, d.time, d.offset) else {
        return Err(format!(
            "'{d}' is not an instant: write a date, a time and a time zone, e.g. 2026-12-01T00:00:00Z"
        ));
    };
    let offset_minutes = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes),
    };
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    let seconds = days * 86_400
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(time.second)
        - offset_minutes * 60;
    if seconds < 0 {
        return Err(format!("'{d}' is before 1970"));
    }
    Ok(seconds as u64 * 1000 + u64::from(time.nanosecond) / 1_000_000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------
// Reconciliation
// ---------------------------------------------------------------------------------------------

/// One change an apply made (or a plan would make).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A model's promotion policy was set.
    PolicySet {
        /// Model.
        model: String,
    },
    /// A version was registered for `key` and the alias `key` pointed at it.
    Registered {
        /// The file's key.
        key: String,
        /// The new version.
        version: ModelVersion,
        /// The version `key` pointed at before (its registration differed from the file's).
        replaced: Option<u32>,
    },
    /// A version moved to the stage the file gives it.
    StageChanged {
        /// The file's key.
        key: String,
        /// The version, after the move.
        version: ModelVersion,
        /// Versions a promotion archived.
        archived: Vec<ModelVersion>,
    },
    /// An experiment was created.
    ExperimentCreated(Experiment),
    /// An experiment was paused, resumed or stopped.
    ExperimentChanged(Experiment),
    /// A shadow was set or replaced.
    ShadowSet(Shadow),
    /// A shadow was removed (`sample_fraction = 0`, or its key moved to a new version).
    ShadowRemoved(Shadow),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::PolicySet { model } => write!(f, "model '{model}': promotion policy set"),
            Change::Registered {
                key,
                version: v,
                replaced,
            } => {
                write!(
                    f,
                    "model '{}' version {} registered as '{key}' ({})",
                    v.model, v.version, v.endpoint
                )?;
                if let Some(old) = replaced {
                    write!(f, ", replacing version {old}")?;
                }
                Ok(())
            }
            Change::StageChanged {
                key,
                version: v,
                archived,
            } => {
                write!(
                    f,
                    "model '{}' version {} ('{key}') is now {}",
                    v.model,
                    v.version,
                    v.stage.as_str()
                )?;
                for a in archived {
                    write!(f, ", version {} archived", a.version)?;
                }
                Ok(())
            }
            Change::ExperimentCreated(e) => {
                write!(f, "experiment '{}' created on model '{}'", e.name, e.model)
            }
            Change::ExperimentChanged(e) => {
                write!(f, "experiment '{}' is now {}", e.name, e.state.as_str())
            }
            Change::ShadowSet(s) => write!(
                f,
                "model '{}' version {} shadows {}% of traffic",
                s.model,
                s.version,
                s.sample_fraction * 100.0
            ),
            Change::ShadowRemoved(s) => write!(
                f,
                "model '{}' version {} no longer shadows traffic",
                s.model, s.version
            ),
        }
    }
}

/// What an apply did (or a plan would do).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The changes, in the order they were made.
    pub changes: Vec<Change>,
    /// Experiments that could not be brought to the file's definition because of what already
    /// exists (experiments are immutable once created); the rest of the file was applied.
    pub conflicts: Vec<DeclareError>,
}

impl Report {
    /// True when the state already matched the file.
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty() && self.conflicts.is_empty()
    }
}

/// What reconciling `file` against a copy of `state` would do, without doing it.
pub fn plan(file: &StateFile, state: &State, now_ms: u64) -> Result<Report, DeclareError> {
    let mut copy = state.clone();
    reconcile(file, &mut copy, now_ms).map(|(report, _)| report)
}

fn add_registry(update: &mut Update, r: RegistryUpdate) {
    update.registry.put_models.extend(r.put_models);
    update.registry.put_versions.extend(r.put_versions);
    update.registry.delete_versions.extend(r.delete_versions);
    update.registry.put_policies.extend(r.put_policies);
}

/// The registration a version declaration asks for.
fn new_version(model: &str, v: &VersionDecl) -> NewVersion {
    NewVersion {
        model: model.to_string(),
        endpoint: v.endpoint.clone(),
        backend_model: v.backend_model.clone(),
        backend_version: v.backend_version.clone(),
        artifact_uri: v.artifact_uri.clone(),
        artifact_sha256: v.artifact_sha256.trim().to_string(),
        artifact_sha256_verified: false,
        metrics: v.metrics.clone(),
        tags: v.tags.clone(),
        description: v.description.clone(),
        prediction: v.prediction.as_ref().map(PredictionDecl::spec),
        feature_names: v.feature_names.clone(),
    }
}

/// Whether a registered version is the one a declaration describes (compared as the registry
/// normalises it, so `127.0.0.1:8001` matches `http://127.0.0.1:8001/`).
fn same_registration(v: &ModelVersion, d: &VersionDecl) -> bool {
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.to_string());
    let sha = d.artifact_sha256.trim();
    registry::normalize_endpoint(&d.endpoint).is_ok_and(|e| e == v.endpoint)
        && v.backend_model == non_empty(&d.backend_model)
        && v.backend_version == non_empty(&d.backend_version)
        && v.artifact_uri == d.artifact_uri
        && v.artifact_sha256 == non_empty(sha).map(|s| s.to_ascii_lowercase())
        && v.description == d.description
        && v.tags == d.tags
        && v.metrics == d.metrics
        && v.prediction
            == d.prediction
                .as_ref()
                .map(PredictionDecl::spec)
                .unwrap_or_default()
        && v.feature_names == d.feature_names
}

/// The first difference between a stored experiment's definition and the file's, if any.
fn definition_difference(have: &Experiment, want: &Experiment) -> Option<String> {
    let differs = |field: &str, a: &dyn fmt::Debug, b: &dyn fmt::Debug| {
        Some(format!(
            "{field} is {a:?} in the experiment but {b:?} in the file"
        ))
    };
    if have.model != want.model {
        return differs("model", &have.model, &want.model);
    }
    if have.variants.len() != want.variants.len() {
        return differs(
            "the number of variants",
            &have.variants.len(),
            &want.variants.len(),
        );
    }
    for (i, (a, b)) in have.variants.iter().zip(&want.variants).enumerate() {
        if a.name != b.name {
            return differs(&format!("variants[{i}].name"), &a.name, &b.name);
        }
        if a.version != b.version {
            return differs(
                &format!("variants[{i}].version (as a version number)"),
                &a.version,
                &b.version,
            );
        }
        if a.weight != b.weight {
            return differs(&format!("variants[{i}].weight"), &a.weight, &b.weight);
        }
    }
    if have.unit_key != want.unit_key {
        return differs("unit_key", &have.unit_key, &want.unit_key);
    }
    if have.salt != want.salt {
        return differs("salt", &have.salt, &want.salt);
    }
    if have.coverage != want.coverage {
        return differs("coverage", &have.coverage, &want.coverage);
    }
    if have.alpha != want.alpha {
        return differs("alpha", &have.alpha, &want.alpha);
    }
    if have.start_ms != want.start_ms {
        return differs("start (Unix ms)", &have.start_ms, &want.start_ms);
    }
    if have.end_ms != want.end_ms {
        return differs("end (Unix ms)", &have.end_ms, &want.end_ms);
    }
    None
}

fn new_experiment(e: &ExperimentDecl) -> NewExperiment {
    NewExperiment {
        name: e.name.clone(),
        model: e.model.clone(),
        variants: e
            .variants
            .iter()
            .map(|v| NewVariant {
                name: v.name.clone(),
                version: v.version.clone(),
                weight: v.weight,
            })
            .collect(),
        unit_key: e.unit_key.clone(),
        salt: e.salt.clone(),
        // 0 is "the default" to the API; `check` refused a written 0.
        coverage: e.coverage.unwrap_or(0.0),
        alpha: e.alpha.unwrap_or(0.0),
        start_ms: e.start.as_ref().and_then(|d| datetime_ms(d).ok()),
        end_ms: e.end.as_ref().and_then(|d| datetime_ms(d).ok()),
    }
}

/// Brings one experiment to the file's definition and lifecycle. An error is about this item
/// only: the caller restores the experiments and carries on.
fn reconcile_experiment(
    e: &ExperimentDecl,
    path: &str,
    state: &mut State,
    now_ms: u64,
    changes: &mut Vec<Change>,
) -> Result<(), DeclareError> {
    let State {
        registry,
        experiments,
        ..
    } = state;
    let existing = experiments.get(&e.name).ok().cloned();
    let current = match existing {
        Some(have) => {
            // Normalised exactly as CreateExperiment would (defaults, keys → numbers).
            let want = Experiments::default()
                .create(new_experiment(e), registry, now_ms)
                .map_err(|err| experiment_error(path, err))?;
            if let Some(diff) = definition_difference(&have, &want) {
                return Err(DeclareError::at(
                    path,
                    format!(
                        "experiment '{}' already exists with a different definition: {diff}; an experiment cannot change once created, so give the new definition a new name (and set state = \"stopped\" on the old one)",
                        e.name
                    ),
                ));
            }
            have
        }
        None => {
            let created = experiments
                .create(new_experiment(e), registry, now_ms)
                .map_err(|err| experiment_error(path, err))?;
            changes.push(Change::ExperimentCreated(created.clone()));
            created
        }
    };
    let ended = |s: &ExperimentState| {
        DeclareError::at(
            format!("{path}.state"),
            format!(
                "experiment '{}' is {}; an ended experiment cannot run again: set state = \"stopped\" or give the file's experiment a new name",
                e.name,
                s.as_str()
            ),
        )
    };
    type Op = fn(&mut Experiments, &str, u64) -> Result<Experiment, ExperimentError>;
    let op: Option<Op> = match (e.state, &current.state) {
        (ExperimentStateDecl::Running, ExperimentState::Running)
        | (ExperimentStateDecl::Paused, ExperimentState::Paused)
        | (
            ExperimentStateDecl::Stopped,
            ExperimentState::Stopped | ExperimentState::Concluded { .. },
        ) => None,
        (ExperimentStateDecl::Running, ExperimentState::Paused) => Some(Experiments::resume as Op),
        (ExperimentStateDecl::Paused, ExperimentState::Running) => Some(Experiments::pause as Op),
        (ExperimentStateDecl::Stopped, _) => Some(Experiments::stop as Op),
        (_, s) => return Err(ended(s)),
    };
    if let Some(op) = op {
        let changed =
            op(experiments, &e.name, now_ms).map_err(|err| experiment_error(path, err))?;
        changes.push(Change::ExperimentChanged(changed));
    }
    Ok(())
}

/// Brings `state` to what `file` declares and returns what changed and the update to make it
/// durable. Only what the file names is touched. The registry, experiment and shadow rules are
/// the ones the gRPC services apply, called in this order:
///
/// 1. promotion policies;
/// 2. versions: a key whose alias points at a version with the same registration is left alone;
///    otherwise the version is registered and the alias (the key) pointed at it, in one step;
/// 3. stages: staging and archived first, then production (which archives the previous one);
/// 4. experiments that exist (definition check, lifecycle), then new ones — so one apply can stop
///    a model's experiment and start its successor; an item that cannot be applied is reported in
///    [`Report::conflicts`] and skipped;
/// 5. shadows (set, or removed at `sample_fraction = 0`); a key that moved to a new version in
///    step 2 takes its shadow along.
///
/// On error `state` is left part-way and must be discarded, as [`ControlPlane::update_state`]
/// does with an empty update.
pub fn reconcile(
    file: &StateFile,
    state: &mut State,
    now_ms: u64,
) -> Result<(Report, Update), DeclareError> {
    let mut report = Report::default();
    let mut update = Update::default();

    for (i, m) in file.models.iter().enumerate() {
        let Some(p) = &m.promotion_policy else {
            continue;
        };
        let policy = PromotionPolicy {
            minimum: p.minimum_metrics.clone(),
            maximum: p.maximum_metrics.clone(),
        };
        if state.registry.policy(&m.name) != policy {
            let path = format!("models[{i}].promotion_policy");
            let (_, u) = state
                .registry
                .set_policy(&m.name, policy)
                .map_err(|e| registry_error(&path, e))?;
            add_registry(&mut update, u);
            report.changes.push(Change::PolicySet {
                model: m.name.clone(),
            });
        }
    }

    let mut replaced: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for (i, m) in file.models.iter().enumerate() {
        for (j, v) in m.versions.iter().enumerate() {
            let path = format!("models[{i}].versions[{j}]");
            let current = state.registry.get(&m.name, &v.key).ok();
            if current.is_some_and(|c| same_registration(c, v)) {
                continue;
            }
            let (registered, u) = state
                .registry
                .register(new_version(&m.name, v), now_ms)
                .map_err(|e| registry_error(&path, e))?;
            add_registry(&mut update, u);
            let ((_, previous), u) = state
                .registry
                .set_alias(&m.name, &v.key, &registered.version.to_string())
                .map_err(|e| registry_error(&path, e))?;
            add_registry(&mut update, u);
            if let Some(old) = previous {
                replaced.insert((&m.name, &v.key), old);
            }
            report.changes.push(Change::Registered {
                key: v.key.clone(),
                version: registered,
                replaced: previous,
            });
        }
    }

    for promote in [false, true] {
        for (i, m) in file.models.iter().enumerate() {
            for (j, v) in m.versions.iter().enumerate() {
                let Some(stage) = v.stage.stage() else {
                    continue;
                };
                if (stage == Stage::Production) != promote {
                    continue;
                }
                let path = format!("models[{i}].versions[{j}].stage");
                let current = state
                    .registry
                    .get(&m.name, &v.key)
                    .map_err(|e| registry_error(&path, e))?;
                if current.stage == stage {
                    continue;
                }
                let ((moved, archived), u) = state
                    .registry
                    .transition(&m.name, &v.key, stage, false, now_ms)
                    .map_err(|e| match e {
                        RegistryError::PromotionRefused { reason, .. } => DeclareError::at(
                            path.clone(),
                            format!(
                                "the promotion policy of model '{}' refuses '{}': {reason}",
                                m.name, v.key
                            ),
                        ),
                        e => registry_error(&path, e),
                    })?;
                add_registry(&mut update, u);
                report.changes.push(Change::StageChanged {
                    key: v.key.clone(),
                    version: moved,
                    archived,
                });
            }
        }
    }

    let (existing, new): (Vec<_>, Vec<_>) = file
        .experiments
        .iter()
        .enumerate()
        .partition(|(_, e)| state.experiments.get(&e.name).is_ok());
    for (i, e) in existing.into_iter().chain(new) {
        let path = format!("experiments[{i}]");
        // Experiment operations change nothing when they fail, but restoring keeps this item's
        // failure from ever leaking a half-made change into the rest of the apply.
        let before = state.experiments.clone();
        let mut changes = Vec::new();
        match reconcile_experiment(e, &path, state, now_ms, &mut changes) {
            Ok(()) => {
                for c in &changes {
                    if let Change::ExperimentCreated(x) | Change::ExperimentChanged(x) = c {
                        update.experiments.push(x.clone());
                    }
                }
                report.changes.extend(changes);
            }
            Err(conflict) => {
                state.experiments = before;
                report.conflicts.push(conflict);
            }
        }
    }

    for (i, s) in file.shadows.iter().enumerate() {
        let path = format!("shadows[{i}]");
        if let Some(old) = replaced.get(&(s.model.as_str(), s.version.as_str())) {
            if state.shadows.get(&s.model, *old).is_some() {
                let removed = state
                    .shadows
                    .remove(&state.registry, &s.model, &old.to_string())
                    .map_err(|e| shadow_error(&path, e))?;
                update
                    .delete_shadows
                    .push((removed.model.clone(), removed.version));
                report.changes.push(Change::ShadowRemoved(removed));
            }
        }
        let n = state
            .registry
            .resolve(&s.model, &s.version)
            .map_err(|e| registry_error(&format!("{path}.version"), e))?;
        let current = state.shadows.get(&s.model, n).cloned();
        if s.sample_fraction == 0.0 {
            if current.is_some() {
                let removed = state
                    .shadows
                    .remove(&state.registry, &s.model, &s.version)
                    .map_err(|e| shadow_error(&path, e))?;
                update
                    .delete_shadows
                    .push((removed.model.clone(), removed.version));
                report.changes.push(Change::ShadowRemoved(removed));
            }
            continue;
        }
        let comparison = s
            .comparison
            .as_ref()
            .map_or(Comparison::Label, ComparisonDecl::comparison);
        let timeout = match &s.timeout {
            Some(t) => crate::config::parse_duration(t)
                .map_err(|m| DeclareError::at(format!("{path}.timeout"), m))?,
            None => shadow::DEFAULT_TIMEOUT,
        };
        if current.is_some_and(|c| {
            c.sample_fraction == s.sample_fraction
                && c.comparison == comparison
                && u128::from(c.timeout_ms) == timeout.as_millis()
        }) {
            continue;
        }
        let set = state
            .shadows
            .set(
                &state.registry,
                &s.model,
                &s.version,
                ShadowSpec {
                    sample_fraction: s.sample_fraction,
                    comparison: Some(comparison),
                    timeout: Some(timeout),
                },
                now_ms,
            )
            .map_err(|e| shadow_error(&path, e))?;
        update.put_shadows.push(set.clone());
        report.changes.push(Change::ShadowSet(set));
    }

    Ok((report, finish(update, state)))
}

/// One record per key, as the final state has it: several steps may write the same model record
/// (a registration, then its alias) or the same shadow (removed, then set again).
fn finish(update: Update, state: &State) -> Update {
    fn keep_last<T, K: Ord>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
        let mut seen = BTreeSet::new();
        let mut out: Vec<T> = items
            .into_iter()
            .rev()
            .filter(|x| seen.insert(key(x)))
            .collect();
        out.reverse();
        out
    }
    let Update {
        registry,
        experiments,
        put_shadows,
        delete_shadows,
    } = update;
    let shadow_keys: BTreeSet<(String, u32)> = put_shadows
        .iter()
        .map(|s| (s.model.clone(), s.version))
        .chain(delete_shadows)
        .collect();
    let mut put_shadows = Vec::new();
    let mut delete_shadows = Vec::new();
    for (model, version) in shadow_keys {
        match state.shadows.get(&model, version) {
            Some(s) => put_shadows.push(s.clone()),
            None => delete_shadows.push((model, version)),
        }
    }
    Update {
        registry: RegistryUpdate {
            put_models: keep_last(registry.put_models, |m| m.name.clone()),
            put_versions: keep_last(registry.put_versions, |v| (v.model.clone(), v.version)),
            delete_versions: registry.delete_versions,
            put_policies: keep_last(registry.put_policies, |(m, _)| m.clone()),
        },
        experiments: keep_last(experiments, |e| e.name.clone()),
        put_shadows,
        delete_shadows,
    }
}

// ---------------------------------------------------------------------------------------------
// Application
// ---------------------------------------------------------------------------------------------

/// Why an apply changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The current state and the file disagree in a way the rules refuse (a promotion policy set
    /// by hand, say). Names the item.
    #[error("{0}")]
    Refused(DeclareError),
    /// The change could not be made durable (worth retrying).
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Applies a loaded state file: reconciles under the control plane's write lock, makes the whole
/// change durable in one synced write, publishes the routing snapshot, then the events the gRPC
/// services would have published for the same changes and `state_file_applied`. All or nothing,
/// except experiments that conflict with existing ones (reported in the result).
pub async fn apply(
    plane: &ControlPlane,
    path: &Path,
    loaded: &Loaded,
) -> Result<Report, ApplyError> {
    let file = &loaded.file;
    let result = plane
        .update_state(|s| {
            Ok(match reconcile(file, s, crate::control::now_ms()) {
                Ok((report, update)) => (Ok(report), update),
                // An empty update: `update_state` discards the half-reconciled copy.
                Err(e) => (Err(e), Update::default()),
            })
        })
        .await?;
    let mut report = result.map_err(|e| ApplyError::Refused(loaded.locate(e)))?;
    report.conflicts = report
        .conflicts
        .into_iter()
        .map(|c| loaded.locate(c))
        .collect();
    let file_name = path.display().to_string();
    for c in &report.changes {
        tracing::info!(file = %file_name, "state file: {c}");
        publish_change(plane, c).await;
    }
    for c in &report.conflicts {
        tracing::warn!(file = %file_name, "state file item not applied: {c}");
    }
    if report.is_noop() {
        tracing::info!(file = %file_name, sha256 = %loaded.sha256, "state file: nothing to change");
        return Ok(report);
    }
    let mut message = format!(
        "state file {file_name} applied: {} change(s)",
        report.changes.len()
    );
    if !report.conflicts.is_empty() {
        message.push_str(&format!(
            ", {} item(s) not applied: {}",
            report.conflicts.len(),
            report
                .conflicts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut event = crate::events::event(APPLIED_EVENT, "", message);
    event.details = [
        ("file".to_string(), file_name),
        ("sha256".to_string(), loaded.sha256.clone()),
        ("changes".to_string(), report.changes.len().to_string()),
        ("conflicts".to_string(), report.conflicts.len().to_string()),
    ]
    .into();
    plane.publish(event).await;
    Ok(report)
}

/// The event the gRPC service publishes for the same change.
async fn publish_change(plane: &ControlPlane, c: &Change) {
    use crate::control::registry::{publish_transition, version_event};
    match c {
        Change::Registered { key, version, .. } => {
            plane
                .publish(version_event(
                    "version_registered",
                    version,
                    format!(
                        "model '{}' version {} registered ({}) from the state file as '{key}'",
                        version.model, version.version, version.endpoint
                    ),
                ))
                .await
        }
        Change::StageChanged {
            version, archived, ..
        } => publish_transition(plane, version, archived).await,
        Change::ExperimentCreated(e) => {
            plane
                .publish(crate::events::experiment_event("experiment_created", e))
                .await
        }
        Change::ExperimentChanged(e) if e.state == ExperimentState::Stopped => {
            plane
                .publish(crate::events::experiment_event("experiment_stopped", e))
                .await
        }
        // The services publish nothing for these either.
        Change::ExperimentChanged(_)
        | Change::PolicySet { .. }
        | Change::ShadowSet(_)
        | Change::ShadowRemoved(_) => {}
    }
}

/// Re-reads the file's content at least this often even when its modification time and size
/// look unchanged: some file systems keep times to the second, and an edit within that second
/// that keeps the size would otherwise go unseen.
const FORCED_READ_EVERY: u32 = 12;

/// What the poller last saw of the file.
#[derive(Default)]
struct Seen {
    /// Modification time and size at the last read.
    stamp: Option<(Option<SystemTime>, u64)>,
    /// Polls since the content was last read.
    polls: u32,
    /// A failure (its content hash, or the read error) seen once and waiting for a second look.
    pending: Option<String>,
    /// The failure already reported, so that it is reported once, not every poll.
    reported: Option<String>,
}

/// Polls `path` every `interval` and applies its content when it changes, until `stop`.
///
/// `applied` is the SHA-256 of the content in force. A content that fails to parse is reported
/// only when the next poll sees it again: an editor writing the file in place can be caught
/// half-way, and a Kubernetes ConfigMap (swapped atomically) never is. A reported failure keeps
/// the current state, logs a warning and publishes `state_file_rejected` once per content.
pub async fn watch(
    plane: std::sync::Arc<ControlPlane>,
    path: PathBuf,
    interval: Duration,
    mut applied: String,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the file was just applied
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        poll(&plane, &path, &mut applied, &mut seen).await;
    }
}

async fn poll(plane: &ControlPlane, path: &Path, applied: &mut String, seen: &mut Seen) {
    seen.polls += 1;
    let stamp = match tokio::fs::metadata(path).await {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(e) => {
            let reason = format!("cannot read it: {e}");
            failed(plane, path, seen, reason.clone(), reason, None, false).await;
            return;
        }
    };
    if seen.stamp == Some(stamp) && seen.polls < FORCED_READ_EVERY {
        return;
    }
    seen.polls = 0;
    let path_for_read = path.to_path_buf();
    let loaded = match tokio::task::spawn_blocking(move || read_and_parse(&path_for_read)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "state file read task failed");
            return;
        }
    };
    seen.stamp = Some(stamp);
    let loaded = match loaded {
        Ok(l) => l,
        Err(ReadFailure::Read(reason)) => {
            failed(plane, path, seen, reason.clone(), reason, None, false).await;
            return;
        }
        Err(ReadFailure::Invalid { sha256, error }) => {
            let reason = error.to_string();
            failed(
                plane,
                path,
                seen,
                sha256.clone(),
                reason,
                Some(sha256),
                false,
            )
            .await;
            return;
        }
    };
    if loaded.sha256 == *applied {
        seen.pending = None;
        seen.reported = None;
        return;
    }
    if seen.reported.as_deref() == Some(loaded.sha256.as_str()) {
        return;
    }
    match apply(plane, path, &loaded).await {
        Ok(report) => {
            tracing::info!(
                file = %path.display(), sha256 = %loaded.sha256,
                changes = report.changes.len(), conflicts = report.conflicts.len(),
                "state file changed and applied"
            );
            *applied = loaded.sha256;
            seen.pending = None;
            seen.reported = None;
        }
        Err(ApplyError::Refused(e)) => {
            // The rules refused a valid file: the same content will be refused again, so report
            // it now rather than after a second look.
            let sha = loaded.sha256.clone();
            failed(
                plane,
                path,
                seen,
                sha.clone(),
                e.to_string(),
                Some(sha),
                true,
            )
            .await;
        }
        Err(ApplyError::Control(e)) => {
            // Not durable, nothing changed: try again next poll.
            tracing::warn!(file = %path.display(), error = %e, "state file not applied; retrying");
            seen.stamp = None;
        }
    }
}

enum ReadFailure {
    Read(String),
    Invalid { sha256: String, error: DeclareError },
}

fn read_and_parse(path: &Path) -> Result<Loaded, ReadFailure> {
    let bytes = match read(path) {
        Ok(b) => b,
        Err(LoadError::Read { source, .. }) => {
            return Err(ReadFailure::Read(format!("cannot read it: {source}")))
        }
        Err(e) => return Err(ReadFailure::Read(e.to_string())),
    };
    from_bytes(&bytes).map_err(|error| ReadFailure::Invalid {
        // The hash of what was read, so that the same bad content is reported once.
        sha256: sha256_hex(&bytes),
        error,
    })
}

/// Records a failure; reports it (warning and `state_file_rejected`) when it is seen a second
/// time in a row, or at once when `now`.
async fn failed(
    plane: &ControlPlane,
    path: &Path,
    seen: &mut Seen,
    key: String,
    reason: String,
    sha256: Option<String>,
    now: bool,
) {
    if seen.reported.as_deref() == Some(key.as_str()) {
        return;
    }
    if !now && seen.pending.as_deref() != Some(key.as_str()) {
        seen.pending = Some(key);
        // Read again next poll even if the file's time and size do not move.
        seen.stamp = None;
        return;
    }
    seen.pending = None;
    seen.reported = Some(key);
    let file = path.display().to_string();
    tracing::warn!(file = %file, error = %reason, "state file rejected; keeping the current state");
    let mut event = crate::events::event(
        REJECTED_EVENT,
        "",
        format!("state file {file} rejected, current state kept: {reason}"),
    );
    event.details = [
        ("file".to_string(), file),
        ("error".to_string(), reason),
        ("sha256".to_string(), sha256.unwrap_or_default()),
    ]
    .into();
    plane.publish(event).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../deploy/state.example.toml");

    const BASIC: &str = r#"
[[models]]
name = "iris"
  [[models.versions]]
  key = "v1"
  endpoint = "http://127.0.0.1:8081"
  stage = "production"
  metrics = { accuracy = 0.93 }
  [[models.versions]]
  key = "v2"
  endpoint = "127.0.0.1:8082"
  backend_model = "iris"
  backend_version = "2"

[[experiments]]
name = "iris-ab"
model = "iris"
variants = [ { name = "control", version = "v1", weight = 1.0 }, { name = "treatment", version = "v2", weight = 1 } ]
coverage = 0.5

[[shadows]]
model = "iris"
version = "v2"
sample_fraction = 0.1
"#;

    fn err(text: &str) -> DeclareError {
        parse(text).expect_err("should be refused")
    }

    fn applied(text: &str, state: &mut State, now: u64) -> Report {
        let file = parse(text).unwrap();
        let (report, update) = reconcile(&file, state, now).unwrap();
        assert_eq!(report.changes.is_empty(), update.is_empty(), "{report:?}");
        report
    }

    #[test]
    fn the_example_file_parses_and_applies_to_a_fresh_replica() {
        let file = parse(EXAMPLE).unwrap_or_else(|e| panic!("deploy/state.example.toml: {e}"));
        assert!(!file.models.is_empty());
        assert!(!file.experiments.is_empty());
        assert!(!file.shadows.is_empty());
        let mut state = State::default();
        let report = applied(EXAMPLE, &mut state, 1);
        assert!(report.conflicts.is_empty(), "{:?}", report.conflicts);
        assert!(plan(&file, &state, 2).unwrap().is_noop());
    }

    #[test]
    fn applying_twice_changes_nothing_the_second_time() {
        let mut state = State::default();
        let first = applied(BASIC, &mut state, 1);
        // policy none; 2 registrations, 1 promotion, 1 experiment, 1 shadow.
        assert_eq!(first.changes.len(), 5, "{first:?}");
        let after_first = state.clone();
        let second = applied(BASIC, &mut state, 2);
        assert!(second.is_noop(), "{second:?}");
        assert_eq!(state, after_first);
        let file = parse(BASIC).unwrap();
        let (_, update) = reconcile(&file, &mut state, 3).unwrap();
        assert!(update.is_empty());

        let r = &state.registry;
        assert_eq!(r.get("iris", "v1").unwrap().version, 1);
        assert_eq!(r.production("iris").unwrap().version, 1);
        let v2 = r.get("iris", "v2").unwrap();
        assert_eq!(v2.endpoint, "http://127.0.0.1:8082");
        assert_eq!(v2.backend_version.as_deref(), Some("2"));
        assert_eq!(v2.stage, Stage::Staging);
        let e = state.experiments.get("iris-ab").unwrap();
        assert_eq!(e.state, ExperimentState::Running);
        assert_eq!(e.coverage, 0.5);
        assert_eq!(e.unit_key, "x-user-id");
        assert_eq!(
            e.variants.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(state.shadows.get("iris", 2).unwrap().sample_fraction, 0.1);
    }

    #[test]
    fn fresh_replicas_converge_to_the_same_state() {
        let (mut a, mut b) = (State::default(), State::default());
        applied(BASIC, &mut a, 7);
        applied(BASIC, &mut b, 7);
        assert_eq!(a, b);
    }

    #[test]
    fn the_update_writes_what_the_state_holds() {
        let mut state = State::default();
        let file = parse(BASIC).unwrap();
        let (_, update) = reconcile(&file, &mut state, 1).unwrap();
        // One model record (the last, with both aliases), each version once, as it ends up.
        assert_eq!(update.registry.put_models.len(), 1);
        assert_eq!(update.registry.put_models[0].aliases.len(), 2);
        assert_eq!(update.registry.put_versions.len(), 2);
        for v in &update.registry.put_versions {
            assert_eq!(
                v,
                state.registry.get("iris", &v.version.to_string()).unwrap()
            );
        }
        assert_eq!(update.experiments.len(), 1);
        assert_eq!(update.put_shadows.len(), 1);
    }

    #[test]
    fn state_made_by_hand_is_left_alone() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        let (hand, _) = state
            .registry
            .register(
                NewVersion {
                    model: "iris".into(),
                    endpoint: "127.0.0.1:9999".into(),
                    ..Default::default()
                },
                2,
            )
            .unwrap();
        state
            .registry
            .set_alias("iris", "mine", &hand.version.to_string())
            .unwrap();
        let before = state.clone();
        assert!(applied(BASIC, &mut state, 3).is_noop());
        assert_eq!(state, before);
    }

    #[test]
    fn a_changed_registration_registers_anew_and_moves_the_key_and_its_shadow() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        let edited = BASIC.replace("127.0.0.1:8082", "127.0.0.1:9092");
        let report = applied(&edited, &mut state, 2);
        let v2 = state.registry.get("iris", "v2").unwrap();
        assert_eq!(
            (v2.version, v2.endpoint.as_str()),
            (3, "http://127.0.0.1:9092")
        );
        assert!(report.changes.iter().any(|c| matches!(
            c,
            Change::Registered {
                replaced: Some(2),
                ..
            }
        )));
        // The old version stays (nothing is deleted); the shadow follows the key.
        assert!(state.registry.get("iris", "2").is_ok());
        assert!(state.shadows.get("iris", 2).is_none());
        assert!(state.shadows.get("iris", 3).is_some());
        // The running experiment still uses version 2 and cannot change: reported, not applied.
        assert_eq!(report.conflicts.len(), 1, "{report:?}");
        let c = &report.conflicts[0];
        assert_eq!(c.path, "experiments[0]");
        assert!(c.message.contains("variants[1].version"), "{c}");
        assert!(applied(&edited, &mut state, 3).changes.is_empty());
    }

    #[test]
    fn stages_follow_the_file() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        let promoted = BASIC
            .replace("stage = \"production\"\n", "")
            .replace("key = \"v2\"\n", "key = \"v2\"\n  stage = \"production\"\n");
        let report = applied(&promoted, &mut state, 2);
        assert_eq!(state.registry.production("iris").unwrap().version, 2);
        assert_eq!(
            state.registry.get("iris", "v1").unwrap().stage,
            Stage::Archived
        );
        assert_eq!(report.changes.len(), 1, "{report:?}");
        assert!(applied(&promoted, &mut state, 3).is_noop());
        // A hand promotion is undone by the next apply: the file wins for what it names.
        state
            .registry
            .transition("iris", "1", Stage::Production, true, 4)
            .unwrap();
        applied(&promoted, &mut state, 5);
        assert_eq!(state.registry.production("iris").unwrap().version, 2);
    }

    #[test]
    fn experiments_can_be_stopped_and_succeeded_in_one_apply() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        let next = BASIC.replace(
            "coverage = 0.5\n",
            "coverage = 0.5\nstate = \"stopped\"\n\n[[experiments]]\nname = \"iris-ab-2\"\nmodel = \"iris\"\nvariants = [ { name = \"a\", version = \"v1\" }, { name = \"b\", version = \"v2\" } ]\n",
        );
        // The successor is listed after the one it replaces; either order must work.
        let report = applied(&next, &mut state, 2);
        assert!(report.conflicts.is_empty(), "{report:?}");
        assert_eq!(
            state.experiments.get("iris-ab").unwrap().state,
            ExperimentState::Stopped
        );
        assert_eq!(
            state.experiments.open_for("iris").unwrap().name,
            "iris-ab-2"
        );
        // Asking a stopped experiment to run again is a conflict, the rest still applies.
        let report = applied(BASIC, &mut state, 3);
        assert_eq!(report.conflicts.len(), 1);
        assert_eq!(report.conflicts[0].path, "experiments[0].state");
    }

    #[test]
    fn an_experiment_created_by_hand_blocks_only_the_file_s_experiment() {
        let mut state = State::default();
        let without = BASIC.split("[[experiments]]").next().unwrap().to_string();
        applied(&without, &mut state, 1);
        state
            .experiments
            .create(
                NewExperiment {
                    name: "by-hand".into(),
                    model: "iris".into(),
                    variants: vec![
                        NewVariant {
                            name: "a".into(),
                            version: "1".into(),
                            weight: 1.0,
                        },
                        NewVariant {
                            name: "b".into(),
                            version: "2".into(),
                            weight: 1.0,
                        },
                    ],
                    ..Default::default()
                },
                &state.registry,
                2,
            )
            .unwrap();
        let with_shadow_change = BASIC.replace("sample_fraction = 0.1", "sample_fraction = 0.2");
        let report = applied(&with_shadow_change, &mut state, 3);
        assert_eq!(report.conflicts.len(), 1);
        assert!(
            report.conflicts[0].message.contains("by-hand"),
            "{}",
            report.conflicts[0]
        );
        assert_eq!(state.shadows.get("iris", 2).unwrap().sample_fraction, 0.2);
        assert!(state.experiments.get("iris-ab").is_err());
    }

    #[test]
    fn a_zero_fraction_removes_a_shadow() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        applied(
            &BASIC.replace("sample_fraction = 0.1", "sample_fraction = 0"),
            &mut state,
            2,
        );
        assert!(state.shadows.get("iris", 2).is_none());
    }

    #[test]
    fn a_policy_set_by_hand_refuses_the_whole_file() {
        let mut state = State::default();
        let staged = BASIC.replace("stage = \"production\"\n", "");
        applied(&staged, &mut state, 1);
        let mut p = PromotionPolicy::default();
        p.minimum.insert("accuracy".into(), 0.99);
        state.registry.set_policy("iris", p).unwrap();
        let e = reconcile(&parse(BASIC).unwrap(), &mut state.clone(), 2).unwrap_err();
        assert_eq!(e.path, "models[0].versions[0].stage");
        assert!(e.message.contains("accuracy"), "{e}");
        // The file's own policy is managed like the rest.
        let with_policy = BASIC.replace(
            "name = \"iris\"\n",
            "name = \"iris\"\npromotion_policy = { minimum_metrics = { accuracy = 0.9 } }\n",
        );
        let report = applied(&with_policy, &mut state, 3);
        assert!(matches!(report.changes[0], Change::PolicySet { .. }));
        assert_eq!(state.registry.production("iris").unwrap().version, 1);
    }

    #[test]
    fn errors_name_the_field_and_its_line() {
        let e = err(&BASIC.replace("endpoint = \"127.0.0.1:8082\"", "endpoint = \"127.0.0.1\""));
        assert_eq!(e.path, "models[0].versions[1].endpoint");
        assert!(e.message.contains("port"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(11), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with("models[0].versions[1].endpoint: "),
            "{shown}"
        );
        assert!(shown.ends_with("(line 11, column 3)"), "{shown}");

        let e = err(&BASIC.replace("endpoint = \"127.0.0.1:8082\"", "endpont = \"x\""));
        assert_eq!(e.path, "models[0].versions[1].endpont");
        assert!(e.message.contains("unknown field `endpont`"), "{e}");

        let e = err(&BASIC.replace("endpoint = \"127.0.0.1:8082\"", "endpoint = 8082"));
        assert_eq!(e.path, "models[0].versions[1].endpoint");
        assert!(e.message.contains("expected a string"), "{e}");

        let e = err(&BASIC.replace("  endpoint = \"127.0.0.1:8082\"\n", ""));
        assert_eq!(e.path, "models[0].versions[1]");
        assert!(e.message.contains("missing field `endpoint`"), "{e}");

        let e = err(&BASIC.replace("stage = \"production\"", "stage = \"prod\""));
        assert_eq!(e.path, "models[0].versions[0].stage");

        let e = err(&BASIC.replace("weight = 1 }", "weight = 0 }"));
        assert_eq!(e.path, "experiments[0].variants[1].weight");

        let e = err(&BASIC.replace("version = \"v2\", weight", "version = \"v3\", weight"));
        assert_eq!(e.path, "experiments[0].variants[1].version");
        assert!(e.message.contains("v1, v2"), "{e}");

        let e = err(&BASIC.replace("coverage = 0.5", "coverage = 0"));
        assert_eq!(e.path, "experiments[0].coverage");
        let e = err(&BASIC.replace("coverage = 0.5", "coverage = 1.5"));
        assert_eq!(e.path, "experiments[0].coverage");
        let e = err(&BASIC.replace("coverage = 0.5", "start = 2026-12-01T00:00:00"));
        assert_eq!(e.path, "experiments[0].start");
        assert!(e.message.contains("time zone"), "{e}");

        let e = err(&BASIC.replace("sample_fraction = 0.1", "sample_fraction = 2"));
        assert_eq!(e.path, "shadows[0].sample_fraction");
        let e = err(&BASIC.replace(
            "sample_fraction = 0.1",
            "sample_fraction = 0.1\ntimeout = \"2m\"",
        ));
        assert_eq!(e.path, "shadows[0].timeout");
        let e = err(&BASIC.replace(
            "sample_fraction = 0.1",
            "sample_fraction = 0.1\ncomparison = { kind = \"tolerance\", absolute = -1 }",
        ));
        assert_eq!(e.path, "shadows[0].comparison");
        let e = err(&BASIC.replace("version = \"v2\"\nsample", "version = \"v9\"\nsample"));
        assert_eq!(e.path, "shadows[0].version");

        let e = err(&BASIC.replace("key = \"v2\"", "key = \"v1\""));
        assert_eq!(e.path, "models[0].versions[1].key");
        let e = err(&BASIC.replace("key = \"v2\"", "key = \"2\""));
        assert_eq!(e.path, "models[0].versions[1].key");
        let e = err(&BASIC.replace("key = \"v2\"", "key = \"v2\"\n  stage = \"production\""));
        assert_eq!(e.path, "models[0].versions[1].stage");
        let e = err(&BASIC.replace(
            "metrics = { accuracy = 0.93 }",
            "metrics = { accuracy = nan }",
        ));
        assert_eq!(e.path, "models[0].versions[0].metrics");
        let e = err(&format!("{BASIC}\n[[models]]\nname = \"iris\"\n"));
        assert_eq!(e.path, "models[1].name");
        let e = err(&format!("{BASIC}\n[[experiments]]\nname = \"x\"\nmodel = \"iris\"\nvariants = [ {{ name = \"a\", version = \"v1\" }}, {{ name = \"b\", version = \"v2\" }} ]\n"));
        assert_eq!(e.path, "experiments[1]");
        assert!(e.message.contains("iris-ab"), "{e}");

        let e = err("[[model]]\nname = \"x\"\n");
        assert_eq!(e.path, "model");
        assert!(e.message.contains("unknown field `model`"), "{e}");
        let e = err("[[models]]\nname = \"x\n");
        assert_eq!(e.path, "");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(from_bytes(b"\xff").unwrap_err().message.contains("UTF-8"));
    }

    #[test]
    fn an_empty_file_manages_nothing() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        let before = state.clone();
        assert!(applied("", &mut state, 2).is_noop());
        assert_eq!(state, before);
    }

    #[test]
    fn dates_are_unix_milliseconds() {
        let d: toml::value::Datetime = "2026-12-01T00:00:00Z".parse().unwrap();
        assert_eq!(datetime_ms(&d).unwrap(), 1_796_083_200_000);
        let d: toml::value::Datetime = "2026-12-01T01:02:03.5+02:00".parse().unwrap();
        assert_eq!(datetime_ms(&d).unwrap(), 1_796_079_723_500);
        let d: toml::value::Datetime = "1969-12-31T23:59:59Z".parse().unwrap();
        assert!(datetime_ms(&d).is_err());
        let d: toml::value::Datetime = "2026-12-01".parse().unwrap();
        assert!(datetime_ms(&d).is_err());
    }
}
