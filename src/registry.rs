//! Model registry rules: versions, stages, aliases and promotion gates.
//!
//! Plain data and plain functions. Every mutating operation changes `self` and returns the
//! [`RegistryUpdate`] that must be made durable; the control plane applies it to a copy, writes the
//! update to RocksDB, and only then publishes the copy. A failed write therefore changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest model name accepted.
pub const MAX_MODEL_NAME: usize = 128;
/// Longest alias accepted.
pub const MAX_ALIAS: usize = 64;

/// Lifecycle stage of a model version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Registered, not serving.
    Staging,
    /// Serving the model's traffic; at most one version per model.
    Production,
    /// Retired.
    Archived,
}

impl Stage {
    /// Lower-case name, as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Staging => "staging",
            Stage::Production => "production",
            Stage::Archived => "archived",
        }
    }
}

pub use crate::spec::PredictionSpec;

/// The protocol a version's model server is called in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendProtocol {
    /// gRPC, the default: OIP, TF Serving and every other gRPC call is forwarded as it came,
    /// and REST callers are translated to OIP gRPC.
    #[default]
    Grpc,
    /// The Open Inference Protocol over HTTP/JSON (KServe v2 REST: MLServer's and KServe's HTTP
    /// port, Triton's 8000): OIP calls, from gRPC and REST callers alike, are sent as REST.
    OipRest,
}

impl BackendProtocol {
    /// Every protocol, in the order they are documented.
    pub const ALL: [BackendProtocol; 2] = [BackendProtocol::Grpc, BackendProtocol::OipRest];

    /// The name used by the CLI, the declarative file and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendProtocol::Grpc => "grpc",
            BackendProtocol::OipRest => "oip-rest",
        }
    }

    /// Parses [`BackendProtocol::as_str`]'s names.
    pub fn parse(s: &str) -> Option<BackendProtocol> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// One registered version of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model name.
    pub model: String,
    /// Version number, 1, 2, 3… per model; never reused.
    pub version: u32,
    /// Current stage.
    pub stage: Stage,
    /// Normalised upstream endpoint, `http://host:port` or `https://host:port` (TLS).
    pub endpoint: String,
    /// Model name written into forwarded OIP requests.
    #[serde(default)]
    pub backend_model: Option<String>,
    /// Model version written into forwarded OIP requests.
    #[serde(default)]
    pub backend_version: Option<String>,
    /// The protocol the backend is called in.
    #[serde(default)]
    pub backend_protocol: BackendProtocol,
    /// Where the artifact lives.
    #[serde(default)]
    pub artifact_uri: String,
    /// Lower-case hex SHA-256 of the artifact.
    #[serde(default)]
    pub artifact_sha256: Option<String>,
    /// Whether modelgate computed or checked the digest from the file itself.
    #[serde(default)]
    pub artifact_sha256_verified: bool,
    /// Offline metrics, e.g. `accuracy`.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
    /// How to read its predictions.
    #[serde(default)]
    pub prediction: PredictionSpec,
    /// Feature names per input tensor, in column order.
    #[serde(default)]
    pub feature_names: BTreeMap<String, Vec<String>>,
    /// Registration time, Unix milliseconds.
    pub created_at_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_at_ms: u64,
}

/// Per-model state that is not a version: the version counter and the aliases.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Model name.
    pub name: String,
    /// The highest version number ever assigned (deleted numbers are not reused).
    pub last_version: u32,
    /// Alias → version number.
    #[serde(default)]
    pub aliases: BTreeMap<String, u32>,
}

/// Minimum and maximum registered metrics a version needs to reach production.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromotionPolicy {
    /// Metric → lowest acceptable value.
    #[serde(default)]
    pub minimum: BTreeMap<String, f64>,
    /// Metric → highest acceptable value.
    #[serde(default)]
    pub maximum: BTreeMap<String, f64>,
}

/// A model: its metadata and versions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    /// Counter and aliases.
    pub meta: ModelMeta,
    /// Versions by number.
    pub versions: BTreeMap<u32, ModelVersion>,
}

impl Model {
    /// The production version, if any.
    pub fn production(&self) -> Option<&ModelVersion> {
        self.versions
            .values()
            .find(|v| v.stage == Stage::Production)
    }

    /// Aliases pointing at `version`, sorted.
    pub fn aliases_of(&self, version: u32) -> Vec<String> {
        self.meta
            .aliases
            .iter()
            .filter(|(_, v)| **v == version)
            .map(|(a, _)| a.clone())
            .collect()
    }
}

/// What a registration asks for, already checked for I/O facts (the artifact digest).
#[derive(Clone, Debug, Default)]
pub struct NewVersion {
    /// Model name.
    pub model: String,
    /// Upstream endpoint as given.
    pub endpoint: String,
    /// Backend model name to rewrite to (empty: keep).
    pub backend_model: String,
    /// Backend model version to rewrite to (empty: keep).
    pub backend_version: String,
    /// The protocol the backend speaks.
    pub backend_protocol: BackendProtocol,
    /// Artifact location.
    pub artifact_uri: String,
    /// Artifact digest, given or computed.
    pub artifact_sha256: String,
    /// Whether the digest was computed or checked from the file.
    pub artifact_sha256_verified: bool,
    /// Offline metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Description.
    pub description: String,
    /// Prediction reading.
    pub prediction: Option<PredictionSpec>,
    /// Feature names per input tensor.
    pub feature_names: BTreeMap<String, Vec<String>>,
}

/// The writes one registry operation needs made durable, as one atomic batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryUpdate {
    /// Model metadata records to write.
    pub put_models: Vec<ModelMeta>,
    /// Version records to write.
    pub put_versions: Vec<ModelVersion>,
    /// Version records to delete.
    pub delete_versions: Vec<(String, u32)>,
    /// Promotion policies to write.
    pub put_policies: Vec<(String, PromotionPolicy)>,
}

impl RegistryUpdate {
    /// True when nothing needs writing (an operation that changed nothing).
    pub fn is_empty(&self) -> bool {
        self.put_models.is_empty()
            && self.put_versions.is_empty()
            && self.delete_versions.is_empty()
            && self.put_policies.is_empty()
    }
}

/// Why a registry operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No such model.
    #[error("model '{0}' is not registered")]
    ModelNotFound(String),
    /// No such version or alias.
    #[error("model '{model}' has no version or alias '{version}'")]
    VersionNotFound {
        /// Model name.
        model: String,
        /// The reference as given.
        version: String,
    },
    /// No such alias.
    #[error("model '{model}' has no alias '{alias}'")]
    AliasNotFound {
        /// Model name.
        model: String,
        /// Alias as given.
        alias: String,
    },
    /// The model has no production version.
    #[error("model '{0}' has no production version; promote one with TransitionStage")]
    NoProduction(String),
    /// The promotion policy refused a promotion.
    #[error("promotion of model '{model}' version {version} to production refused: {reason} (set force to override)")]
    PromotionRefused {
        /// Model name.
        model: String,
        /// Version number.
        version: u32,
        /// The metric that falls short.
        metric: String,
        /// Human-readable reason naming the metric.
        reason: String,
    },
    /// The production version cannot be deleted.
    #[error("model '{model}' version {version} is in production and cannot be deleted; promote another version or move it to archived first")]
    DeleteProduction {
        /// Model name.
        model: String,
        /// Version number.
        version: u32,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RegistryError {
    RegistryError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Checks a model name: `[A-Za-z0-9._-]`, starting with a letter or digit, at most 128 bytes.
pub fn validate_model_name(name: &str, field: &'static str) -> Result<(), RegistryError> {
    if name.is_empty() {
        return Err(invalid(field, "required"));
    }
    if name.len() > MAX_MODEL_NAME {
        return Err(invalid(
            field,
            format!("longer than {MAX_MODEL_NAME} characters"),
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(field, "must start with a letter or digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(
            field,
            format!("'{name}' contains '{c}'; allowed are letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// Checks an alias: `[A-Za-z][A-Za-z0-9_-]*`, at most 64 bytes. Aliases never look like numbers,
/// so a version reference is unambiguous.
pub fn validate_alias(alias: &str) -> Result<(), RegistryError> {
    if alias.is_empty() {
        return Err(invalid("alias", "required"));
    }
    if alias.len() > MAX_ALIAS {
        return Err(invalid(
            "alias",
            format!("longer than {MAX_ALIAS} characters"),
        ));
    }
    if !alias.as_bytes()[0].is_ascii_alphabetic() {
        return Err(invalid("alias", "must start with a letter"));
    }
    if alias
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        return Err(invalid(
            "alias",
            format!("'{alias}' may contain only letters, digits, '_' and '-'"),
        ));
    }
    Ok(())
}

/// Normalises an upstream endpoint to `http://host:port`, or `https://host:port` for a model
/// server reached over TLS. Accepts `host:port` (plaintext) and `http[s]://host:port[/]`.
pub fn normalize_endpoint(endpoint: &str) -> Result<String, RegistryError> {
    const FIELD: &str = "endpoint";
    let e = endpoint.trim();
    if e.is_empty() {
        return Err(invalid(FIELD, "required, e.g. http://127.0.0.1:8001"));
    }
    let (scheme, rest) = match e.strip_prefix("https://") {
        Some(rest) => ("https", rest),
        None => ("http", e.strip_prefix("http://").unwrap_or(e)),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains("://") || rest.contains('/') || rest.contains('?') {
        return Err(invalid(
            FIELD,
            format!("'{e}' must be http://host:port or https://host:port with no path"),
        ));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        invalid(
            FIELD,
            format!("'{e}' has no port; expected http://host:port or https://host:port"),
        )
    })?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(invalid(FIELD, format!("'{e}' has no valid host")));
    }
    let normalized = match port.parse::<u16>() {
        Ok(p) if p > 0 => format!("{scheme}://{host}:{p}"),
        _ => {
            return Err(invalid(
                FIELD,
                format!("'{e}' has port '{port}', expected 1-65535"),
            ))
        }
    };
    // What the upstream pool will dial: refuse now what it could never parse.
    let dialable = normalized
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().and_then(|a| a.port_u16()))
        .is_some();
    if !dialable {
        return Err(invalid(FIELD, format!("'{e}' has no valid host")));
    }
    Ok(normalized)
}

/// Checks a lower-case or upper-case hex SHA-256 and returns it lower-cased.
pub fn normalize_sha256(sha: &str) -> Result<String, RegistryError> {
    if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(
            "artifact_sha256",
            format!("'{sha}' is not 64 hexadecimal characters"),
        ));
    }
    Ok(sha.to_ascii_lowercase())
}

fn validate_metrics(
    metrics: &BTreeMap<String, f64>,
    field: &'static str,
) -> Result<(), RegistryError> {
    for (k, v) in metrics {
        if k.is_empty() {
            return Err(invalid(field, "metric names must not be empty"));
        }
        if !v.is_finite() {
            return Err(invalid(
                field,
                format!("metric '{k}' is {v}; must be a finite number"),
            ));
        }
    }
    Ok(())
}

fn validate_prediction(spec: &PredictionSpec) -> Result<(), RegistryError> {
    if let PredictionSpec::Threshold { threshold, .. } = spec {
        if !threshold.is_finite() {
            return Err(invalid(
                "prediction.threshold.threshold",
                "must be a finite number",
            ));
        }
    }
    Ok(())
}

/// Every model and policy: the whole registry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registry {
    models: BTreeMap<String, Model>,
    policies: BTreeMap<String, PromotionPolicy>,
}

impl Registry {
    /// Rebuilds the registry from stored records.
    pub fn from_records(
        metas: Vec<ModelMeta>,
        versions: Vec<ModelVersion>,
        policies: Vec<(String, PromotionPolicy)>,
    ) -> Self {
        let mut models: BTreeMap<String, Model> = BTreeMap::new();
        for meta in metas {
            let name = meta.name.clone();
            models.entry(name).or_default().meta = meta;
        }
        for v in versions {
            let model = models.entry(v.model.clone()).or_default();
            if model.meta.name.is_empty() {
                model.meta.name = v.model.clone();
            }
            // Never hand out a number that is already stored, even if the meta record lags.
            model.meta.last_version = model.meta.last_version.max(v.version);
            model.versions.insert(v.version, v);
        }
        Registry {
            models,
            policies: policies.into_iter().collect(),
        }
    }

    /// Every model, by name.
    pub fn models(&self) -> impl Iterator<Item = &Model> {
        self.models.values()
    }

    /// One model.
    pub fn model(&self, name: &str) -> Result<&Model, RegistryError> {
        self.models
            .get(name)
            .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))
    }

    fn model_mut(&mut self, name: &str) -> Result<&mut Model, RegistryError> {
        self.models
            .get_mut(name)
            .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))
    }

    /// Resolves a version reference (number or alias) to a version number.
    pub fn resolve(&self, model: &str, version: &str) -> Result<u32, RegistryError> {
        let m = self.model(model)?;
        let version = version.trim();
        if version.is_empty() {
            return Err(invalid("version", "required: a version number or an alias"));
        }
        let not_found = || RegistryError::VersionNotFound {
            model: model.to_string(),
            version: version.to_string(),
        };
        let n = match version.parse::<u32>() {
            Ok(n) => n,
            Err(_) => *m.meta.aliases.get(version).ok_or_else(not_found)?,
        };
        if m.versions.contains_key(&n) {
            Ok(n)
        } else {
            Err(not_found())
        }
    }

    /// One version by number or alias.
    pub fn get(&self, model: &str, version: &str) -> Result<&ModelVersion, RegistryError> {
        let n = self.resolve(model, version)?;
        Ok(&self.models[model].versions[&n])
    }

    /// The production version of a model.
    pub fn production(&self, model: &str) -> Result<&ModelVersion, RegistryError> {
        self.model(model)?
            .production()
            .ok_or_else(|| RegistryError::NoProduction(model.to_string()))
    }

    /// The versions of a model, optionally in one stage, by number.
    pub fn versions(
        &self,
        model: &str,
        stage: Option<Stage>,
    ) -> Result<Vec<&ModelVersion>, RegistryError> {
        Ok(self
            .model(model)?
            .versions
            .values()
            .filter(|v| stage.is_none_or(|s| v.stage == s))
            .collect())
    }

    /// Every promotion policy set, by model.
    pub fn policies(&self) -> impl Iterator<Item = (&String, &PromotionPolicy)> {
        self.policies.iter()
    }

    /// The promotion policy of a model (empty when none was set).
    pub fn policy(&self, model: &str) -> PromotionPolicy {
        self.policies.get(model).cloned().unwrap_or_default()
    }

    /// Registers a new version in `staging`.
    pub fn register(
        &mut self,
        new: NewVersion,
        now_ms: u64,
    ) -> Result<(ModelVersion, RegistryUpdate), RegistryError> {
        validate_model_name(&new.model, "model")?;
        let endpoint = normalize_endpoint(&new.endpoint)?;
        let sha = if new.artifact_sha256.is_empty() {
            None
        } else {
            Some(normalize_sha256(&new.artifact_sha256)?)
        };
        validate_metrics(&new.metrics, "metrics")?;
        if new.tags.keys().any(|k| k.is_empty()) {
            return Err(invalid("tags", "tag names must not be empty"));
        }
        let prediction = new.prediction.unwrap_or_default();
        validate_prediction(&prediction)?;
        for (input, names) in &new.feature_names {
            if input.is_empty() {
                return Err(invalid("feature_names.input", "required"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for n in names {
                if n.is_empty() {
                    return Err(invalid(
                        "feature_names.names",
                        format!("input '{input}' has an empty feature name"),
                    ));
                }
                if !seen.insert(n) {
                    return Err(invalid(
                        "feature_names.names",
                        format!("input '{input}' names feature '{n}' twice"),
                    ));
                }
            }
        }
        let non_empty = |s: String| (!s.is_empty()).then_some(s);

        let model = self.models.entry(new.model.clone()).or_default();
        model.meta.name = new.model.clone();
        model.meta.last_version = model
            .meta
            .last_version
            .checked_add(1)
            .ok_or_else(|| invalid("model", "version numbers exhausted"))?;
        let v = ModelVersion {
            model: new.model,
            version: model.meta.last_version,
            stage: Stage::Staging,
            endpoint,
            backend_model: non_empty(new.backend_model),
            backend_version: non_empty(new.backend_version),
            backend_protocol: new.backend_protocol,
            artifact_uri: new.artifact_uri,
            artifact_sha256: sha,
            artifact_sha256_verified: new.artifact_sha256_verified,
            metrics: new.metrics,
            tags: new.tags,
            description: new.description,
            prediction,
            feature_names: new.feature_names,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        model.versions.insert(v.version, v.clone());
        let update = RegistryUpdate {
            put_models: vec![model.meta.clone()],
            put_versions: vec![v.clone()],
            ..Default::default()
        };
        Ok((v, update))
    }

    /// Checks a version against the model's promotion policy.
    pub fn check_policy(&self, v: &ModelVersion) -> Result<(), RegistryError> {
        let Some(policy) = self.policies.get(&v.model) else {
            return Ok(());
        };
        let refuse = |metric: &str, reason: String| RegistryError::PromotionRefused {
            model: v.model.clone(),
            version: v.version,
            metric: metric.to_string(),
            reason,
        };
        for (metric, min) in &policy.minimum {
            match v.metrics.get(metric) {
                None => {
                    return Err(refuse(
                        metric,
                        format!("metric '{metric}' is missing; the promotion policy requires at least {min}"),
                    ))
                }
                Some(x) if x < min => {
                    return Err(refuse(
                        metric,
                        format!("metric '{metric}' is {x}, below the policy minimum {min}"),
                    ))
                }
                _ => {}
            }
        }
        for (metric, max) in &policy.maximum {
            match v.metrics.get(metric) {
                None => {
                    return Err(refuse(
                        metric,
                        format!(
                        "metric '{metric}' is missing; the promotion policy requires at most {max}"
                    ),
                    ))
                }
                Some(x) if x > max => {
                    return Err(refuse(
                        metric,
                        format!("metric '{metric}' is {x}, above the policy maximum {max}"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves a version to `stage`. Promotion to production archives the previous production
    /// version in the same update. Returns the version and the versions it archived.
    #[allow(clippy::type_complexity)]
    pub fn transition(
        &mut self,
        model: &str,
        version: &str,
        stage: Stage,
        force: bool,
        now_ms: u64,
    ) -> Result<((ModelVersion, Vec<ModelVersion>), RegistryUpdate), RegistryError> {
        let n = self.resolve(model, version)?;
        let current = self.models[model].versions[&n].clone();
        if current.stage == stage {
            return Ok(((current, Vec::new()), RegistryUpdate::default()));
        }
        if stage == Stage::Production && !force {
            self.check_policy(&current)?;
        }
        let m = self.model_mut(model)?;
        let mut update = RegistryUpdate::default();
        let mut archived = Vec::new();
        if stage == Stage::Production {
            for v in m.versions.values_mut() {
                if v.stage == Stage::Production {
                    v.stage = Stage::Archived;
                    v.updated_at_ms = now_ms;
                    archived.push(v.clone());
                    update.put_versions.push(v.clone());
                }
            }
        }
        let v = m.versions.get_mut(&n).expect("resolved above");
        v.stage = stage;
        v.updated_at_ms = now_ms;
        let v = v.clone();
        update.put_versions.push(v.clone());
        Ok(((v, archived), update))
    }

    /// Points `alias` at a version. Returns the version and the previous target, if any.
    pub fn set_alias(
        &mut self,
        model: &str,
        alias: &str,
        version: &str,
    ) -> Result<((u32, Option<u32>), RegistryUpdate), RegistryError> {
        validate_alias(alias)?;
        let n = self.resolve(model, version)?;
        let m = self.model_mut(model)?;
        let previous = m.meta.aliases.insert(alias.to_string(), n);
        let update = RegistryUpdate {
            put_models: vec![m.meta.clone()],
            ..Default::default()
        };
        Ok(((n, previous), update))
    }

    /// Removes an alias. Returns the version it pointed at.
    pub fn delete_alias(
        &mut self,
        model: &str,
        alias: &str,
    ) -> Result<(u32, RegistryUpdate), RegistryError> {
        if alias.is_empty() {
            return Err(invalid("alias", "required"));
        }
        let m = self.model_mut(model)?;
        let n = m
            .meta
            .aliases
            .remove(alias)
            .ok_or_else(|| RegistryError::AliasNotFound {
                model: model.to_string(),
                alias: alias.to_string(),
            })?;
        let update = RegistryUpdate {
            put_models: vec![m.meta.clone()],
            ..Default::default()
        };
        Ok((n, update))
    }

    /// Sets a model's promotion policy. The model need not exist yet.
    pub fn set_policy(
        &mut self,
        model: &str,
        policy: PromotionPolicy,
    ) -> Result<(PromotionPolicy, RegistryUpdate), RegistryError> {
        validate_model_name(model, "model")?;
        validate_metrics(&policy.minimum, "minimum_metrics")?;
        validate_metrics(&policy.maximum, "maximum_metrics")?;
        for (metric, min) in &policy.minimum {
            if let Some(max) = policy.maximum.get(metric) {
                if min > max {
                    return Err(invalid(
                        "minimum_metrics",
                        format!("metric '{metric}': minimum {min} is above maximum {max}"),
                    ));
                }
            }
        }
        self.policies.insert(model.to_string(), policy.clone());
        let update = RegistryUpdate {
            put_policies: vec![(model.to_string(), policy.clone())],
            ..Default::default()
        };
        Ok((policy, update))
    }

    /// Deletes a version that is not in production, with the aliases pointing at it.
    pub fn delete_version(
        &mut self,
        model: &str,
        version: &str,
    ) -> Result<((ModelVersion, Vec<String>), RegistryUpdate), RegistryError> {
        let n = self.resolve(model, version)?;
        let m = self.model_mut(model)?;
        if m.versions[&n].stage == Stage::Production {
            return Err(RegistryError::DeleteProduction {
                model: model.to_string(),
                version: n,
            });
        }
        let removed_aliases = m.aliases_of(n);
        for a in &removed_aliases {
            m.meta.aliases.remove(a);
        }
        let v = m.versions.remove(&n).expect("resolved above");
        let update = RegistryUpdate {
            put_models: vec![m.meta.clone()],
            delete_versions: vec![(model.to_string(), n)],
            ..Default::default()
        };
        Ok(((v, removed_aliases), update))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(model: &str, endpoint: &str) -> NewVersion {
        NewVersion {
            model: model.into(),
            endpoint: endpoint.into(),
            ..Default::default()
        }
    }

    fn registry_with_two() -> Registry {
        let mut r = Registry::default();
        r.register(new("iris", "127.0.0.1:8001"), 1).unwrap();
        let mut second = new("iris", "http://127.0.0.1:8002/");
        second.metrics.insert("accuracy".into(), 0.93);
        r.register(second, 2).unwrap();
        r
    }

    #[test]
    fn versions_are_numbered_per_model_and_start_in_staging() {
        let mut r = registry_with_two();
        let (v, update) = r.register(new("other", "localhost:9"), 3).unwrap();
        assert_eq!(v.version, 1);
        assert_eq!(v.stage, Stage::Staging);
        assert_eq!(update.put_versions.len(), 1);
        assert_eq!(
            r.get("iris", "2").unwrap().endpoint,
            "http://127.0.0.1:8002"
        );
        assert_eq!(
            r.get("iris", "1").unwrap().endpoint,
            "http://127.0.0.1:8001"
        );
        assert_eq!(
            normalize_endpoint(" https://models.internal:8443/ ").unwrap(),
            "https://models.internal:8443"
        );
    }

    #[test]
    fn deleted_numbers_are_not_reused() {
        let mut r = registry_with_two();
        r.delete_version("iris", "2").unwrap();
        let (v, _) = r.register(new("iris", "127.0.0.1:1"), 5).unwrap();
        assert_eq!(v.version, 3);
    }

    #[test]
    fn promotion_archives_the_previous_production_version() {
        let mut r = registry_with_two();
        let ((v, archived), _) = r
            .transition("iris", "1", Stage::Production, false, 10)
            .unwrap();
        assert_eq!(v.stage, Stage::Production);
        assert!(archived.is_empty());
        let ((v, archived), update) = r
            .transition("iris", "2", Stage::Production, false, 11)
            .unwrap();
        assert_eq!(v.version, 2);
        assert_eq!(archived.len(), 1);
        assert_eq!(archived[0].version, 1);
        assert_eq!(update.put_versions.len(), 2, "both changes in one update");
        assert_eq!(r.get("iris", "1").unwrap().stage, Stage::Archived);
        assert_eq!(r.production("iris").unwrap().version, 2);
    }

    #[test]
    fn aliases_resolve_and_move() {
        let mut r = registry_with_two();
        let ((n, prev), _) = r.set_alias("iris", "champion", "1").unwrap();
        assert_eq!((n, prev), (1, None));
        assert_eq!(r.get("iris", "champion").unwrap().version, 1);
        let ((n, prev), _) = r.set_alias("iris", "champion", "2").unwrap();
        assert_eq!((n, prev), (2, Some(1)));
        r.set_alias("iris", "challenger", "champion").unwrap();
        assert_eq!(r.resolve("iris", "challenger").unwrap(), 2);
        assert!(matches!(
            r.set_alias("iris", "7up", "1"),
            Err(RegistryError::InvalidArgument { field: "alias", .. })
        ));
        let (n, _) = r.delete_alias("iris", "champion").unwrap();
        assert_eq!(n, 2);
        assert!(matches!(
            r.resolve("iris", "champion"),
            Err(RegistryError::VersionNotFound { .. })
        ));
    }

    #[test]
    fn promotion_policy_names_the_metric_that_falls_short() {
        let mut r = registry_with_two();
        let mut policy = PromotionPolicy::default();
        policy.minimum.insert("accuracy".into(), 0.95);
        r.set_policy("iris", policy).unwrap();
        let err = r
            .transition("iris", "2", Stage::Production, false, 1)
            .unwrap_err();
        match &err {
            RegistryError::PromotionRefused { metric, .. } => assert_eq!(metric, "accuracy"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("0.93"), "{err}");
        // Version 1 has no accuracy at all.
        let err = r
            .transition("iris", "1", Stage::Production, false, 1)
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        // force skips the gate.
        r.transition("iris", "2", Stage::Production, true, 1)
            .unwrap();
        assert_eq!(r.production("iris").unwrap().version, 2);
    }

    #[test]
    fn maximum_metrics_are_enforced() {
        let mut r = Registry::default();
        let mut v = new("m", "h:1");
        v.metrics.insert("latency_ms".into(), 40.0);
        r.register(v, 0).unwrap();
        let mut policy = PromotionPolicy::default();
        policy.maximum.insert("latency_ms".into(), 30.0);
        r.set_policy("m", policy).unwrap();
        let err = r
            .transition("m", "1", Stage::Production, false, 0)
            .unwrap_err();
        assert!(
            err.to_string().contains("above the policy maximum 30"),
            "{err}"
        );
    }

    #[test]
    fn production_cannot_be_deleted_and_aliases_go_with_a_version() {
        let mut r = registry_with_two();
        r.transition("iris", "1", Stage::Production, false, 1)
            .unwrap();
        assert!(matches!(
            r.delete_version("iris", "1"),
            Err(RegistryError::DeleteProduction { version: 1, .. })
        ));
        r.set_alias("iris", "challenger", "2").unwrap();
        let ((v, aliases), update) = r.delete_version("iris", "challenger").unwrap();
        assert_eq!(v.version, 2);
        assert_eq!(aliases, vec!["challenger".to_string()]);
        assert_eq!(update.delete_versions, vec![("iris".to_string(), 2)]);
        assert!(r.model("iris").unwrap().meta.aliases.is_empty());
    }

    #[test]
    fn endpoints_are_accepted_only_when_the_upstream_pool_can_dial_them() {
        // Found by fuzzing (control_args): hosts with characters a URI cannot hold were
        // registered, and every request routed to them failed with "invalid endpoint".
        for bad in [
            "h\u{e9}:1",
            "::1:9000",
            "a b:1",
            "a|b:1",
            "a\"b:80",
            "h\u{7f}:80",
        ] {
            let err = normalize_endpoint(bad).unwrap_err().to_string();
            assert!(err.starts_with("endpoint: "), "{bad:?}: {err}");
        }
        for (good, normalized) in [
            ("[::1]:9000", "http://[::1]:9000"),
            ("http://127.0.0.1:8001/", "http://127.0.0.1:8001"),
            ("model-server.svc:80", "http://model-server.svc:80"),
        ] {
            assert_eq!(normalize_endpoint(good).unwrap(), normalized);
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let mut r = Registry::default();
        let cases = [
            (new("", "h:1"), "model"),
            (new("-x", "h:1"), "model"),
            (new("a b", "h:1"), "model"),
            (new("m", ""), "endpoint"),
            (new("m", "h"), "endpoint"),
            (new("m", "h:0"), "endpoint"),
            (new("m", "h:99999"), "endpoint"),
            (new("m", "http://h:1/path"), "endpoint"),
            (new("m", "https://h:1/x"), "endpoint"),
            (new("m", "ftp://h:1"), "endpoint"),
        ];
        for (n, field) in cases {
            match r.register(n.clone(), 0) {
                Err(RegistryError::InvalidArgument { field: f, .. }) => {
                    assert_eq!(f, field, "{n:?}")
                }
                other => panic!("{n:?}: {other:?}"),
            }
        }
        let mut n = new("m", "h:1");
        n.artifact_sha256 = "abc".into();
        assert!(matches!(
            r.register(n, 0),
            Err(RegistryError::InvalidArgument {
                field: "artifact_sha256",
                ..
            })
        ));
        let mut n = new("m", "h:1");
        n.metrics.insert("auc".into(), f64::NAN);
        assert!(matches!(
            r.register(n, 0),
            Err(RegistryError::InvalidArgument {
                field: "metrics",
                ..
            })
        ));
        assert!(
            r.models().next().is_none(),
            "failed registrations leave nothing"
        );
        assert!(matches!(
            r.resolve("nope", "1"),
            Err(RegistryError::ModelNotFound(_))
        ));
    }

    #[test]
    fn from_records_round_trips() {
        let mut r = registry_with_two();
        r.set_alias("iris", "champion", "2").unwrap();
        r.transition("iris", "2", Stage::Production, true, 5)
            .unwrap();
        let mut p = PromotionPolicy::default();
        p.minimum.insert("accuracy".into(), 0.5);
        r.set_policy("iris", p.clone()).unwrap();
        let metas = r.models().map(|m| m.meta.clone()).collect();
        let versions = r
            .models()
            .flat_map(|m| m.versions.values().cloned())
            .collect();
        let back = Registry::from_records(metas, versions, vec![("iris".into(), p)]);
        assert_eq!(back, r);
    }
}
