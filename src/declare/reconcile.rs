//! Reconciliation, plain Rust on a [`State`]: what the file says against what the state holds,
//! changed only where they differ, through the registry, experiment and shadow rules the gRPC
//! services call. The result is a [`Report`] of the [`Change`]s made (and the items that could
//! not be) and the [`Update`] that makes them durable. [`plan`] does the same on a copy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::control::{State, Update};
use crate::experiment::{
    Experiment, ExperimentError, ExperimentState, Experiments, NewExperiment, NewVariant,
};
use crate::registry::{
    self, ModelVersion, NewVersion, PromotionPolicy, RegistryError, RegistryUpdate, Stage,
};
use crate::shadow::{self, Comparison, Shadow, ShadowSpec};
use crate::spec;

use super::dates::datetime_ms;
use super::format::{
    experiment_error, registry_error, shadow_error, ComparisonDecl, DeclareError, ExperimentDecl,
    ExperimentStateDecl, PredictionDecl, StateFile, VersionDecl,
};

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
        backend_protocol: v.backend_protocol,
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
        && v.backend_protocol == d.backend_protocol
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
/// On error `state` is left part-way and must be discarded, as [`ControlPlane::update_state`](crate::control::ControlPlane::update_state)
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
            Some(t) => spec::parse_duration(t)
                .map_err(|e| DeclareError::at(format!("{path}.timeout"), e.to_string()))?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declare::fixtures::{BASIC, EXAMPLE};
    use crate::declare::parse;

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
    fn an_empty_file_manages_nothing() {
        let mut state = State::default();
        applied(BASIC, &mut state, 1);
        let before = state.clone();
        assert!(applied("", &mut state, 2).is_noop());
        assert_eq!(state, before);
    }
}
