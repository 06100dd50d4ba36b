//! The state file's format: what a file may declare ([`StateFile`] and its items, read by serde
//! with `deny_unknown_fields`), and [`DeclareError`], a problem named by the path of the field at
//! fault (`models[0].versions[1].endpoint`), including the registry, experiment and shadow rules'
//! refusals translated to the file's field names.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::experiment::ExperimentError;
use crate::registry::{PredictionSpec, RegistryError, Stage};
use crate::shadow::{Comparison, ShadowError};

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
    /// The protocol the model server speaks: `grpc` (the default) or `oip-rest`.
    #[serde(default)]
    pub backend_protocol: crate::registry::BackendProtocol,
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
    /// The registry's stage, or `None` when the file leaves it alone.
    pub(super) fn stage(self) -> Option<Stage> {
        match self {
            StageDecl::None => None,
            StageDecl::Staging => Some(Stage::Staging),
            StageDecl::Production => Some(Stage::Production),
            StageDecl::Archived => Some(Stage::Archived),
        }
    }
}

/// How predictions are read (`prediction = { kind = "threshold", … }`): the state file's strict
/// form of [`crate::spec::PredictionSpec`] (unknown keys refused, omitted ones defaulted).
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
    /// The registry's form, with the defaults every form of the rule has.
    pub(super) fn spec(&self) -> PredictionSpec {
        match self.clone() {
            PredictionDecl::Argmax { output, labels } => PredictionSpec::Argmax { output, labels },
            PredictionDecl::Threshold {
                output,
                threshold,
                positive_label,
                negative_label,
            } => PredictionSpec::threshold(output, threshold, positive_label, negative_label),
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

/// When a shadow's answer agrees with production's (`comparison = { kind = "label" }`): the
/// state file's strict form of [`crate::spec::Comparison`] (`Label {}`, not `Label`, so that serde
/// refuses unknown keys beside it).
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
    /// The shadow rule's form.
    pub(super) fn comparison(&self) -> Comparison {
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
    /// An error at `path` (empty: the file as a whole), its position not yet known.
    pub(super) fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
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

/// `path.field`, with the field named as the file names it.
fn join(path: &str, field: &str) -> String {
    format!("{path}.{}", file_field(field))
}

/// A registry rule's refusal, named by the file's path.
pub(super) fn registry_error(path: &str, e: RegistryError) -> DeclareError {
    match e {
        RegistryError::InvalidArgument { field, reason } => {
            DeclareError::at(join(path, field), reason)
        }
        other => DeclareError::at(path, other.to_string()),
    }
}

/// An experiment rule's refusal, named by the file's path.
pub(super) fn experiment_error(path: &str, e: ExperimentError) -> DeclareError {
    match e {
        ExperimentError::InvalidArgument { field, reason } => {
            DeclareError::at(join(path, &field), reason)
        }
        ExperimentError::Registry(e) => registry_error(path, e),
        other => DeclareError::at(path, other.to_string()),
    }
}

/// A shadow rule's refusal, named by the file's path.
pub(super) fn shadow_error(path: &str, e: ShadowError) -> DeclareError {
    match e {
        ShadowError::InvalidArgument { field, reason } => {
            DeclareError::at(join(path, field), reason)
        }
        ShadowError::Registry(e) => registry_error(path, e),
        other => DeclareError::at(path, other.to_string()),
    }
}
