//! A/B experiments: definitions and lifecycle rules, deterministic assignment, and the results
//! computed from their counters. Plain Rust; the statistics live in [`crate::stats`].
//!
//! **Assignment** is a pure function of (salt, experiment name, unit id): the bytes
//! `salt + "/" + experiment + "/" + unit_id` are hashed with XXH3-64 (seed 0, the published
//! algorithm, also in Python's `xxhash.xxh3_64`), the top 53 bits make u ∈ [0, 1). A unit is in the
//! experiment when u < coverage; its variant is then found from u / coverage against the
//! cumulative normalised weights. Nothing depends on the process, the replica or the release.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::registry::{self, Registry, RegistryError};
use crate::stats::{self, Moments, TestResult, Unavailable};

/// Default metadata key carrying the unit id.
pub const DEFAULT_UNIT_KEY: &str = "x-user-id";
/// Samples-ratio-mismatch threshold.
pub const SRM_P: f64 = 0.001;
/// τ of the always-valid test, as a fraction of one observation's standard deviation.
pub const MSPRT_TAU: f64 = 0.1;

/// Lifecycle of an experiment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ExperimentState {
    /// Splitting traffic.
    Running,
    /// Traffic goes to production; statistics are kept.
    Paused,
    /// Final; traffic goes to production.
    Stopped,
    /// Final, with a winner promoted through the registry.
    Concluded {
        /// The winning variant.
        winner: String,
    },
}

impl ExperimentState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExperimentState::Running => "running",
            ExperimentState::Paused => "paused",
            ExperimentState::Stopped => "stopped",
            ExperimentState::Concluded { .. } => "concluded",
        }
    }

    /// Running or paused: holds the model's one experiment slot.
    pub fn is_open(&self) -> bool {
        matches!(self, ExperimentState::Running | ExperimentState::Paused)
    }
}

/// One arm of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Name, unique in the experiment.
    pub name: String,
    /// The model version it serves (resolved from a number or alias at creation).
    pub version: u32,
    /// Relative weight (> 0).
    pub weight: f64,
}

/// An experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    /// Name, unique among all experiments.
    pub name: String,
    /// The model whose traffic it splits.
    pub model: String,
    /// Two or more arms.
    pub variants: Vec<Variant>,
    /// Metadata key (or OIP parameter) carrying the unit id.
    pub unit_key: String,
    /// Salt of the assignment hash.
    pub salt: String,
    /// Share of units in the experiment, (0, 1].
    pub coverage: f64,
    /// Significance level.
    pub alpha: f64,
    /// Not before (Unix ms).
    pub start_ms: Option<u64>,
    /// Not after (Unix ms).
    pub end_ms: Option<u64>,
    /// Lifecycle.
    pub state: ExperimentState,
    /// Creation time.
    pub created_at_ms: u64,
    /// Last change.
    pub updated_at_ms: u64,
}

/// A requested variant: a version number or alias and a weight.
#[derive(Clone, Debug, Default)]
pub struct NewVariant {
    /// Name.
    pub name: String,
    /// Version number or alias.
    pub version: String,
    /// Weight.
    pub weight: f64,
}

/// What `CreateExperiment` asks for; zero/empty values mean "default".
#[derive(Clone, Debug, Default)]
pub struct NewExperiment {
    /// Name.
    pub name: String,
    /// Model.
    pub model: String,
    /// Arms.
    pub variants: Vec<NewVariant>,
    /// Unit key (default `x-user-id`).
    pub unit_key: String,
    /// Salt (default empty).
    pub salt: String,
    /// Coverage (default 1).
    pub coverage: f64,
    /// Alpha (default 0.05).
    pub alpha: f64,
    /// Start.
    pub start_ms: Option<u64>,
    /// End.
    pub end_ms: Option<u64>,
}

/// Why an experiment operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExperimentError {
    /// A field is missing or malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Field.
        field: String,
        /// Reason.
        reason: String,
    },
    /// No such experiment.
    #[error("experiment '{0}' does not exist")]
    NotFound(String),
    /// The name is taken.
    #[error("an experiment named '{0}' already exists; experiment names are never reused")]
    AlreadyExists(String),
    /// The model already has an open experiment.
    #[error(
        "model '{model}' already has experiment '{existing}' ({state}); stop or conclude it first"
    )]
    ModelBusy {
        /// Model.
        model: String,
        /// The open experiment.
        existing: String,
        /// Its state.
        state: &'static str,
    },
    /// The operation does not apply in the current state.
    #[error("experiment '{name}' is {state}; cannot {operation} it")]
    WrongState {
        /// Experiment.
        name: String,
        /// Its state.
        state: &'static str,
        /// What was asked.
        operation: &'static str,
    },
    /// The version serves an open experiment.
    #[error("model '{model}' version {version} serves experiment '{experiment}'; stop or conclude it first")]
    VersionInUse {
        /// Model.
        model: String,
        /// Version.
        version: u32,
        /// The experiment.
        experiment: String,
    },
    /// A registry rule refused (unknown model, promotion gate…).
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ExperimentError {
    ExperimentError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// u ∈ [0, 1) for a unit: XXH3-64 of `salt/experiment/unit`, top 53 bits.
pub fn bucket(salt: &str, experiment: &str, unit_id: &str) -> f64 {
    let mut key = Vec::with_capacity(salt.len() + experiment.len() + unit_id.len() + 2);
    key.extend_from_slice(salt.as_bytes());
    key.push(b'/');
    key.extend_from_slice(experiment.as_bytes());
    key.push(b'/');
    key.extend_from_slice(unit_id.as_bytes());
    let h = xxhash_rust::xxh3::xxh3_64(&key);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The arm for u: `None` outside coverage, else the index whose cumulative share covers it.
pub fn pick(u: f64, coverage: f64, cumulative: &[f64]) -> Option<usize> {
    if u >= coverage {
        return None;
    }
    let v = u / coverage;
    Some(
        cumulative
            .iter()
            .position(|&c| v < c)
            .unwrap_or(cumulative.len().saturating_sub(1)),
    )
}

impl Experiment {
    /// Normalised cumulative weights, last = 1.
    pub fn cumulative(&self) -> Vec<f64> {
        let total: f64 = self.variants.iter().map(|v| v.weight).sum();
        let mut acc = 0.0;
        let mut out: Vec<f64> = self
            .variants
            .iter()
            .map(|v| {
                acc += v.weight / total;
                acc
            })
            .collect();
        if let Some(last) = out.last_mut() {
            *last = 1.0;
        }
        out
    }

    /// Whether the experiment splits traffic at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.state == ExperimentState::Running
            && self.start_ms.is_none_or(|s| now_ms >= s)
            && self.end_ms.is_none_or(|e| now_ms < e)
    }

    /// The arm of a unit, or `None` when the unit is outside coverage.
    pub fn assign(&self, unit_id: &str) -> Option<usize> {
        pick(
            bucket(&self.salt, &self.name, unit_id),
            self.coverage,
            &self.cumulative(),
        )
    }

    fn variant_index(&self, name: &str) -> Option<usize> {
        self.variants.iter().position(|v| v.name == name)
    }
}

/// Checks a unit key: a lower-case gRPC metadata key.
pub fn validate_unit_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || !key.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
    {
        return Err(format!("'{key}' is not a lower-case gRPC metadata key"));
    }
    Ok(())
}

/// Every experiment, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Experiments {
    by_name: BTreeMap<String, Experiment>,
}

impl Experiments {
    /// From stored records.
    pub fn from_records(list: Vec<Experiment>) -> Self {
        Experiments {
            by_name: list.into_iter().map(|e| (e.name.clone(), e)).collect(),
        }
    }

    /// Every experiment.
    pub fn all(&self) -> impl Iterator<Item = &Experiment> {
        self.by_name.values()
    }

    /// One experiment.
    pub fn get(&self, name: &str) -> Result<&Experiment, ExperimentError> {
        self.by_name
            .get(name)
            .ok_or_else(|| ExperimentError::NotFound(name.to_string()))
    }

    /// The open (running or paused) experiment of a model.
    pub fn open_for(&self, model: &str) -> Option<&Experiment> {
        self.by_name
            .values()
            .find(|e| e.model == model && e.state.is_open())
    }

    /// Whether an open experiment serves `model` version `version`.
    pub fn uses_version(&self, model: &str, version: u32) -> Option<&Experiment> {
        self.open_for(model)
            .filter(|e| e.variants.iter().any(|v| v.version == version))
    }

    /// Creates a running experiment.
    pub fn create(
        &mut self,
        new: NewExperiment,
        registry: &Registry,
        now_ms: u64,
    ) -> Result<Experiment, ExperimentError> {
        registry::validate_model_name(&new.name, "name")?;
        registry::validate_model_name(&new.model, "model")?;
        registry.model(&new.model)?;
        if self.by_name.contains_key(&new.name) {
            return Err(ExperimentError::AlreadyExists(new.name));
        }
        if let Some(e) = self.open_for(&new.model) {
            return Err(ExperimentError::ModelBusy {
                model: new.model,
                existing: e.name.clone(),
                state: e.state.as_str(),
            });
        }
        if new.variants.len() < 2 {
            return Err(invalid(
                "variants",
                format!(
                    "an experiment needs at least 2 variants, got {}",
                    new.variants.len()
                ),
            ));
        }
        let mut variants: Vec<Variant> = Vec::with_capacity(new.variants.len());
        for (i, v) in new.variants.iter().enumerate() {
            let field = |f: &str| format!("variants[{i}].{f}");
            if v.name.is_empty() {
                return Err(invalid(field("name"), "required"));
            }
            if variants.iter().any(|o| o.name == v.name) {
                return Err(invalid(
                    field("name"),
                    format!("duplicate variant name '{}'", v.name),
                ));
            }
            if !(v.weight.is_finite() && v.weight > 0.0) {
                return Err(invalid(
                    field("weight"),
                    format!("{} must be a positive number", v.weight),
                ));
            }
            let version = registry
                .resolve(&new.model, &v.version)
                .map_err(|e| invalid(field("version"), e.to_string()))?;
            variants.push(Variant {
                name: v.name.clone(),
                version,
                weight: v.weight,
            });
        }
        // Shares are weight / total: a total that overflows would give every variant but the
        // last a share of 0.
        if !variants.iter().map(|v| v.weight).sum::<f64>().is_finite() {
            return Err(invalid(
                "variants",
                "the weights must add up to a finite number",
            ));
        }
        let unit_key = if new.unit_key.is_empty() {
            DEFAULT_UNIT_KEY.to_string()
        } else {
            new.unit_key
        };
        validate_unit_key(&unit_key).map_err(|e| invalid("unit_key", e))?;
        let coverage = if new.coverage == 0.0 {
            1.0
        } else {
            new.coverage
        };
        if !(coverage > 0.0 && coverage <= 1.0) {
            return Err(invalid("coverage", format!("{coverage} is outside (0, 1]")));
        }
        let alpha = if new.alpha == 0.0 { 0.05 } else { new.alpha };
        if !(alpha > 0.0 && alpha < 0.5) {
            return Err(invalid("alpha", format!("{alpha} is outside (0, 0.5)")));
        }
        if let (Some(s), Some(e)) = (new.start_ms, new.end_ms) {
            if e <= s {
                return Err(invalid("end", "must be after start"));
            }
        }
        let e = Experiment {
            name: new.name,
            model: new.model,
            variants,
            unit_key,
            salt: new.salt,
            coverage,
            alpha,
            start_ms: new.start_ms,
            end_ms: new.end_ms,
            state: ExperimentState::Running,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        self.by_name.insert(e.name.clone(), e.clone());
        Ok(e)
    }

    fn transition(
        &mut self,
        name: &str,
        operation: &'static str,
        allowed: impl Fn(&ExperimentState) -> bool,
        to: ExperimentState,
        now_ms: u64,
    ) -> Result<Experiment, ExperimentError> {
        let e = self
            .by_name
            .get_mut(name)
            .ok_or_else(|| ExperimentError::NotFound(name.to_string()))?;
        if !allowed(&e.state) {
            return Err(ExperimentError::WrongState {
                name: name.to_string(),
                state: e.state.as_str(),
                operation,
            });
        }
        e.state = to;
        e.updated_at_ms = now_ms;
        Ok(e.clone())
    }

    /// Running → paused.
    pub fn pause(&mut self, name: &str, now_ms: u64) -> Result<Experiment, ExperimentError> {
        self.transition(
            name,
            "pause",
            |s| *s == ExperimentState::Running,
            ExperimentState::Paused,
            now_ms,
        )
    }

    /// Paused → running.
    pub fn resume(&mut self, name: &str, now_ms: u64) -> Result<Experiment, ExperimentError> {
        self.transition(
            name,
            "resume",
            |s| *s == ExperimentState::Paused,
            ExperimentState::Running,
            now_ms,
        )
    }

    /// Running or paused → stopped.
    pub fn stop(&mut self, name: &str, now_ms: u64) -> Result<Experiment, ExperimentError> {
        self.transition(
            name,
            "stop",
            ExperimentState::is_open,
            ExperimentState::Stopped,
            now_ms,
        )
    }

    /// Running or paused → concluded with `winner`; returns the experiment and the winner's
    /// version, which the caller promotes in the same durable write.
    pub fn conclude(
        &mut self,
        name: &str,
        winner: &str,
        now_ms: u64,
    ) -> Result<(Experiment, u32), ExperimentError> {
        let e = self.get(name)?;
        let i = e.variant_index(winner).ok_or_else(|| {
            let names: Vec<&str> = e.variants.iter().map(|v| v.name.as_str()).collect();
            invalid(
                "winner",
                format!(
                    "experiment '{name}' has no variant '{winner}' (variants: {})",
                    names.join(", ")
                ),
            )
        })?;
        let version = e.variants[i].version;
        let e = self.transition(
            name,
            "conclude",
            ExperimentState::is_open,
            ExperimentState::Concluded {
                winner: winner.to_string(),
            },
            now_ms,
        )?;
        Ok((e, version))
    }
}

/// The counters of one variant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantCounts {
    /// Counted requests.
    pub requests: u64,
    /// Distinct units (estimate).
    pub units: u64,
    /// Outcomes.
    pub outcomes: u64,
    /// Outcomes with a verdict.
    pub judged: u64,
    /// Right ones.
    pub successes: u64,
    /// Numeric outcomes.
    pub numeric: Moments,
}

/// What an experiment's data says, per variant and overall.
#[derive(Clone, Debug, PartialEq)]
pub struct Results {
    /// Per variant: counts, success rate, Wilson interval.
    pub variants: Vec<VariantResult>,
    /// χ² test of independence over variants × {success, failure}.
    pub significance: Result<TestResult, Unavailable>,
    /// Welch's t-test of numeric outcomes (first variant vs. each other).
    pub numeric: Vec<(String, Result<TestResult, Unavailable>)>,
    /// Sample ratio mismatch check on requests against weights.
    pub srm: Result<TestResult, Unavailable>,
    /// Always-valid p-values, first variant vs. each other, on the success rate.
    pub always_valid: Vec<(String, Result<f64, Unavailable>)>,
}

/// One variant's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantResult {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Counters.
    pub counts: VariantCounts,
    /// Successes / judged.
    pub success_rate: Option<f64>,
    /// 95% Wilson interval of the success rate.
    pub wilson: Result<(f64, f64), Unavailable>,
}

/// Computes the results of `e` from its variants' counters (in variant order).
pub fn results(e: &Experiment, counts: &[VariantCounts]) -> Results {
    let variants: Vec<VariantResult> = e
        .variants
        .iter()
        .zip(counts)
        .map(|(v, c)| VariantResult {
            name: v.name.clone(),
            version: v.version,
            counts: c.clone(),
            success_rate: (c.judged > 0).then(|| c.successes as f64 / c.judged as f64),
            wilson: stats::wilson_95(c.successes, c.judged),
        })
        .collect();
    let with_data = counts.iter().filter(|c| c.judged > 0).count();
    let significance = if with_data < 2 {
        Err(Unavailable(format!(
            "needs outcomes for at least 2 variants; {with_data} have any"
        )))
    } else {
        let table: Vec<Vec<u64>> = counts
            .iter()
            .map(|c| vec![c.successes, c.judged - c.successes])
            .collect();
        stats::chi2_contingency(&table)
    };
    let weights: Vec<f64> = e.variants.iter().map(|v| v.weight).collect();
    let requests: Vec<u64> = counts.iter().map(|c| c.requests).collect();
    let srm = stats::chisquare(&requests, &weights);
    let control = &counts[0];
    let rate = |c: &VariantCounts| Moments {
        n: c.judged,
        mean: if c.judged > 0 {
            c.successes as f64 / c.judged as f64
        } else {
            0.0
        },
        // Σ(x − p)² over 0/1 outcomes = n·p·(1 − p)
        m2: if c.judged > 0 {
            let p = c.successes as f64 / c.judged as f64;
            c.judged as f64 * p * (1.0 - p)
        } else {
            0.0
        },
    };
    let mut numeric = Vec::new();
    let mut always_valid = Vec::new();
    for (v, c) in e.variants.iter().zip(counts).skip(1) {
        if control.numeric.n > 0 || c.numeric.n > 0 {
            numeric.push((v.name.clone(), stats::welch_t(&control.numeric, &c.numeric)));
        }
        always_valid.push((
            v.name.clone(),
            stats::msprt_p_value(&rate(control), &rate(c), MSPRT_TAU),
        ));
    }
    Results {
        variants,
        significance,
        numeric,
        srm,
        always_valid,
    }
}

/// Precision of the distinct-unit sketches: 2^12 registers, about 1.6% standard error.
pub const UNIT_SKETCH_PRECISION: usize = 12;

/// The distinct-unit sketch of an experiment variant (HyperLogLog).
pub type UnitSketch = simple_hll::HyperLogLog<UNIT_SKETCH_PRECISION>;

impl VariantCounts {
    /// Adds another replica's counters of the same variant; `units` is left alone (distinct
    /// units do not add up: merge the sketches with [`merge_unit_registers`]).
    pub fn merge(&mut self, o: &VariantCounts) {
        self.requests += o.requests;
        self.outcomes += o.outcomes;
        self.judged += o.judged;
        self.successes += o.successes;
        self.numeric = self.numeric.merge(&o.numeric);
    }
}

/// Merges a sketch's registers into `into` (the register-wise maximum: the sketch of the union
/// of both sets of units). Registers of another size are ignored.
pub fn merge_unit_registers(into: &mut Vec<u8>, registers: &[u8]) {
    if registers.len() != 1 << UNIT_SKETCH_PRECISION {
        return;
    }
    if into.len() != registers.len() {
        *into = registers.to_vec();
        return;
    }
    for (a, b) in into.iter_mut().zip(registers) {
        *a = (*a).max(*b);
    }
}

/// The distinct units a sketch's registers count (0 for registers of another size).
pub fn unit_estimate_registers(registers: &[u8]) -> u64 {
    if registers.len() != 1 << UNIT_SKETCH_PRECISION {
        return 0;
    }
    UnitSketch::with_registers(registers.to_vec()).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewVersion;

    /// Pinned against Python: `xxhash.xxh3_64_intdigest(s.encode())`, then `(h >> 11) / 2**53`.
    #[test]
    fn buckets_are_pinned_to_the_published_hash() {
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(b"s1/homepage/user-1"),
            14342552062997610455
        );
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(b"s1/homepage/user-2"),
            7286447014452768045
        );
        assert_eq!(bucket("s1", "homepage", "user-1"), 0.777511305284423);
        assert_eq!(bucket("s1", "homepage", "user-2"), 0.39499908413851037);
        assert_eq!(bucket("", "exp", ""), 0.44763221774931516);
        assert_eq!(bucket("salt", "checkout-test", "42"), 0.849285977046595);
    }

    fn experiment(weights: &[f64], coverage: f64) -> Experiment {
        Experiment {
            name: "exp".into(),
            model: "m".into(),
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Variant {
                    name: format!("v{i}"),
                    version: i as u32 + 1,
                    weight: *w,
                })
                .collect(),
            unit_key: DEFAULT_UNIT_KEY.into(),
            salt: "salt".into(),
            coverage,
            alpha: 0.05,
            start_ms: None,
            end_ms: None,
            state: ExperimentState::Running,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    /// Over 1,000,000 unit ids every variant's share is within ±0.5 pp of its weight, and the
    /// coverage is honoured to the same precision.
    #[test]
    fn split_accuracy_over_a_million_ids() {
        let e = experiment(&[1.0, 2.0, 1.0], 0.8);
        let mut counts = [0u64; 3];
        let mut outside = 0u64;
        let n = 1_000_000u64;
        for i in 0..n {
            match e.assign(&format!("user-{i}")) {
                Some(v) => counts[v] += 1,
                None => outside += 1,
            }
        }
        let inside = (n - outside) as f64;
        assert!(
            ((n - outside) as f64 / n as f64 - 0.8).abs() < 0.005,
            "coverage {}",
            inside / n as f64
        );
        for (c, w) in counts.iter().zip([0.25, 0.5, 0.25]) {
            let share = *c as f64 / inside;
            assert!((share - w).abs() < 0.005, "share {share} vs weight {w}");
        }
    }

    #[test]
    fn assignment_is_sticky_and_salted() {
        let e = experiment(&[1.0, 1.0], 1.0);
        let first: Vec<_> = (0..100).map(|i| e.assign(&format!("u{i}"))).collect();
        let again: Vec<_> = (0..100).map(|i| e.assign(&format!("u{i}"))).collect();
        assert_eq!(first, again);
        let mut other = e.clone();
        other.salt = "other".into();
        let resalted: Vec<_> = (0..100).map(|i| other.assign(&format!("u{i}"))).collect();
        assert_ne!(first, resalted, "a new salt reshuffles");
        assert_eq!(pick(0.99, 1.0, &[0.5, 1.0]), Some(1));
        assert_eq!(pick(0.5, 0.5, &[0.5, 1.0]), None);
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        for _ in 0..2 {
            r.register(
                NewVersion {
                    model: "m".into(),
                    endpoint: "h:1".into(),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        }
        r.set_alias("m", "champion", "1").unwrap();
        r
    }

    fn new(name: &str, variants: &[(&str, &str, f64)]) -> NewExperiment {
        NewExperiment {
            name: name.into(),
            model: "m".into(),
            variants: variants
                .iter()
                .map(|(n, v, w)| NewVariant {
                    name: n.to_string(),
                    version: v.to_string(),
                    weight: *w,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn creation_rules() {
        let reg = registry();
        let mut ex = Experiments::default();
        let e = ex
            .create(
                new(
                    "a",
                    &[("control", "champion", 1.0), ("treatment", "2", 3.0)],
                ),
                &reg,
                5,
            )
            .unwrap();
        assert_eq!(e.variants[0].version, 1);
        assert_eq!(e.unit_key, "x-user-id");
        assert_eq!((e.coverage, e.alpha), (1.0, 0.05));
        assert_eq!(e.cumulative(), vec![0.25, 1.0]);
        let busy = ex
            .create(new("b", &[("x", "1", 1.0), ("y", "2", 1.0)]), &reg, 5)
            .unwrap_err();
        assert!(
            matches!(&busy, ExperimentError::ModelBusy { existing, .. } if existing == "a"),
            "{busy}"
        );
        assert!(matches!(
            ex.create(new("a", &[("x", "1", 1.0), ("y", "2", 1.0)]), &reg, 5),
            Err(ExperimentError::AlreadyExists(_))
        ));
        ex.stop("a", 6).unwrap();
        let field = |e: ExperimentError| match e {
            ExperimentError::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        };
        let mut ex2 = ex.clone();
        assert_eq!(
            field(
                ex2.create(new("c", &[("x", "1", 1.0)]), &reg, 0)
                    .unwrap_err()
            ),
            "variants"
        );
        assert_eq!(
            field(
                ex2.create(new("c", &[("x", "1", 1.0), ("x", "2", 1.0)]), &reg, 0)
                    .unwrap_err()
            ),
            "variants[1].name"
        );
        assert_eq!(
            field(
                ex2.create(new("c", &[("x", "1", 0.0), ("y", "2", 1.0)]), &reg, 0)
                    .unwrap_err()
            ),
            "variants[0].weight"
        );
        assert_eq!(
            field(
                ex2.create(new("c", &[("x", "1", 1.0), ("y", "9", 1.0)]), &reg, 0)
                    .unwrap_err()
            ),
            "variants[1].version"
        );
        let mut bad = new("c", &[("x", "1", 1.0), ("y", "2", 1.0)]);
        bad.coverage = 1.5;
        assert_eq!(field(ex2.create(bad, &reg, 0).unwrap_err()), "coverage");
        let mut bad = new("c", &[("x", "1", 1.0), ("y", "2", 1.0)]);
        bad.unit_key = "X-User".into();
        assert_eq!(field(ex2.create(bad, &reg, 0).unwrap_err()), "unit_key");
        let mut unknown = new("c", &[("x", "1", 1.0), ("y", "2", 1.0)]);
        unknown.model = "nope".into();
        assert!(matches!(
            ex2.create(unknown, &reg, 0),
            Err(ExperimentError::Registry(RegistryError::ModelNotFound(_)))
        ));
        assert_eq!(ex2, ex, "failed creations change nothing");
    }

    #[test]
    fn weights_must_add_up_to_a_finite_number() {
        // Found while writing the control_args fuzz invariant (each variant gets its weight's
        // share): two weights of f64::MAX are each finite, but their sum overflows to infinity,
        // every share becomes 0 and the last variant (forced to 1) took all the units.
        let reg = registry();
        let mut ex = Experiments::default();
        let huge = new("big", &[("x", "1", f64::MAX), ("y", "2", f64::MAX)]);
        match ex.create(huge, &reg, 0) {
            Err(ExperimentError::InvalidArgument { field, .. }) => assert_eq!(field, "variants"),
            other => panic!("{other:?}"),
        }
        let e = ex
            .create(
                new(
                    "fine",
                    &[("x", "1", f64::MAX / 4.0), ("y", "2", f64::MAX / 4.0)],
                ),
                &reg,
                0,
            )
            .unwrap();
        assert_eq!(e.cumulative(), vec![0.5, 1.0]);
    }

    #[test]
    fn lifecycle() {
        let reg = registry();
        let mut ex = Experiments::default();
        ex.create(
            new("a", &[("control", "1", 1.0), ("treatment", "2", 1.0)]),
            &reg,
            0,
        )
        .unwrap();
        assert!(ex.get("a").unwrap().is_live(1));
        ex.pause("a", 1).unwrap();
        assert!(!ex.get("a").unwrap().is_live(1));
        assert!(matches!(
            ex.pause("a", 1),
            Err(ExperimentError::WrongState { .. })
        ));
        ex.resume("a", 2).unwrap();
        assert!(matches!(
            ex.conclude("a", "nobody", 3),
            Err(ExperimentError::InvalidArgument { .. })
        ));
        let (e, version) = ex.conclude("a", "treatment", 3).unwrap();
        assert_eq!(version, 2);
        assert_eq!(
            e.state,
            ExperimentState::Concluded {
                winner: "treatment".into()
            }
        );
        assert!(matches!(
            ex.stop("a", 4),
            Err(ExperimentError::WrongState { .. })
        ));
        assert!(ex.open_for("m").is_none());
        let mut timed = ex.get("a").unwrap().clone();
        timed.state = ExperimentState::Running;
        timed.start_ms = Some(10);
        timed.end_ms = Some(20);
        assert!(!timed.is_live(9) && timed.is_live(10) && !timed.is_live(20));
    }

    #[test]
    fn results_answer_edge_cases_with_reasons() {
        let e = experiment(&[1.0, 1.0], 1.0);
        let empty = results(&e, &[VariantCounts::default(), VariantCounts::default()]);
        assert!(empty.significance.is_err());
        assert!(empty.srm.is_err());
        assert!(empty.always_valid[0].1.is_err());
        assert_eq!(empty.variants[0].success_rate, None);
        let one = results(
            &e,
            &[
                VariantCounts {
                    requests: 10,
                    judged: 10,
                    successes: 4,
                    outcomes: 10,
                    ..Default::default()
                },
                VariantCounts {
                    requests: 10,
                    ..Default::default()
                },
            ],
        );
        assert!(one
            .significance
            .unwrap_err()
            .0
            .contains("at least 2 variants"));
        let skewed = results(
            &e,
            &[
                VariantCounts {
                    requests: 600,
                    judged: 500,
                    successes: 100,
                    outcomes: 500,
                    ..Default::default()
                },
                VariantCounts {
                    requests: 400,
                    judged: 400,
                    successes: 120,
                    outcomes: 400,
                    ..Default::default()
                },
            ],
        );
        let srm = skewed.srm.unwrap();
        assert!(srm.p_value < SRM_P, "600/400 against 50/50 is a mismatch");
        let sig = skewed.significance.unwrap();
        assert_eq!(sig.dof, 1.0);
    }

    /// The example of docs/routing-and-experiments.md: its numpy reference implementation gives
    /// 0.004803221533602207 for 1,500 of 2,000 against 1,600 of 2,000 (scipy's
    /// chi2_contingency: 0.00017786122545924846).
    #[test]
    fn always_valid_p_value_is_the_documented_one() {
        let e = experiment(&[1.0, 1.0], 1.0);
        let counts = |successes| VariantCounts {
            requests: 2000,
            judged: 2000,
            successes,
            outcomes: 2000,
            ..Default::default()
        };
        let r = results(&e, &[counts(1500), counts(1600)]);
        let p = *r.always_valid[0].1.as_ref().unwrap();
        assert!((p - 0.004803221533602207).abs() <= 1e-12 * 0.0048, "{p}");
        let chi2 = r.significance.unwrap().p_value;
        assert!(
            (chi2 - 0.00017786122545924846).abs() <= 1e-9 * chi2,
            "{chi2}"
        );
    }
}
