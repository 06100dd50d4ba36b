//! Drift across a fleet (a [`SharedDrift`](crate::storage::SharedDrift) store): every replica
//! adds a uniform sample of its rows to the model's shared window instead of its own; once a
//! second ([`Monitor::shared_tick`]) each replica follows the fleet's references and retraining
//! policies, and the replica holding a model's lease evaluates the shared window when enough new
//! rows arrived (or an evaluation was asked for on any replica). The episode, its quiet counts
//! and the latest evaluation are stored where every replica reads them, so the report and the
//! events are the fleet's, and each event is published once, by the evaluator.
//!
//! Concept drift goes the same way: judged outcomes join their version's shared concept window,
//! and the holder of the model's lease judges the new ones each tick, in the window's order,
//! exactly as a replica alone judges its outcomes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::drift::{ConceptMetric, ConceptWindow, FeatureDrift, FeatureResult, LiveWindow};
use crate::record::{FeatureValue, Precision};
use crate::stats::Unavailable;
use crate::storage::{DriftRow, DriftStateExt};

use super::concept::{Concept, ConceptRecord, ConceptStatus};
use super::data::{DriftState, ModelDrift, Snapshot};
use super::triggers::RetrainPolicy;
use super::{Evaluation, Monitor};

/// How long a model's evaluation lease lasts; its holder renews it every tick (a second), so a
/// replica that dies hands evaluation over within this.
pub const LEASE: Duration = Duration::from_secs(5);

/// How long [`Monitor::evaluate_now`] waits for the lease holder to evaluate.
const ASKED_WAIT: Duration = Duration::from_secs(10);

/// The latest evaluation as the fleet keeps it (state record `evaluation`). Floats travel as
/// their bits: exact, and NaN survives.
#[derive(Serialize, Deserialize)]
struct SharedEvaluation {
    at_ms: u64,
    /// Evaluations of the current reference, by any replica.
    evaluations: u64,
    features: Vec<SharedFeature>,
}

#[derive(Serialize, Deserialize)]
struct SharedFeature {
    name: String,
    categorical: bool,
    reference_size: u64,
    window_size: u64,
    non_finite: u64,
    /// The test's name, statistic, p-value, PSI and Wasserstein distance (bits), or why not.
    test: Result<(String, u64, u64, u64, Option<u64>), String>,
    adjusted: Option<u64>,
    alarm: bool,
    drifted: bool,
    quiet_evaluations: u32,
    precision: u8,
}

fn test_name(name: &str) -> &'static str {
    match name {
        "ks_2samp" => "ks_2samp",
        "chi2_contingency" => "chi2_contingency",
        _ => "unknown",
    }
}

impl SharedFeature {
    fn of(f: &FeatureResult) -> Self {
        SharedFeature {
            name: f.name.clone(),
            categorical: f.categorical,
            reference_size: f.reference_size,
            window_size: f.window_size,
            non_finite: f.non_finite,
            test: match &f.result {
                Ok(d) => Ok((
                    d.test.to_string(),
                    d.statistic.to_bits(),
                    d.p_value.to_bits(),
                    d.psi.to_bits(),
                    d.wasserstein.map(f64::to_bits),
                )),
                Err(u) => Err(u.0.clone()),
            },
            adjusted: f.adjusted.map(f64::to_bits),
            alarm: f.alarm,
            drifted: f.drifted,
            quiet_evaluations: f.quiet_evaluations,
            precision: f.precision.code(),
        }
    }

    fn result(self) -> FeatureResult {
        FeatureResult {
            name: self.name,
            categorical: self.categorical,
            reference_size: self.reference_size,
            window_size: self.window_size,
            non_finite: self.non_finite,
            result: match self.test {
                Ok((test, statistic, p, psi, w)) => Ok(FeatureDrift {
                    test: test_name(&test),
                    statistic: f64::from_bits(statistic),
                    p_value: f64::from_bits(p),
                    psi: f64::from_bits(psi),
                    wasserstein: w.map(f64::from_bits),
                }),
                Err(why) => Err(Unavailable(why)),
            },
            adjusted: self.adjusted.map(f64::from_bits),
            alarm: self.alarm,
            drifted: self.drifted,
            quiet_evaluations: self.quiet_evaluations,
            precision: Precision::from_code(self.precision).unwrap_or_default(),
        }
    }
}

/// What the fleet's report of a model says: its latest evaluation, how many there were, and
/// the episode.
pub(super) struct SharedReport {
    pub(super) evaluation: Option<Arc<Evaluation>>,
    pub(super) evaluations: u64,
    pub(super) state: DriftState,
    /// Concept drift per version with a shared concept window.
    pub(super) concept: Vec<ConceptStatus>,
}

impl Monitor {
    /// Whether this monitor is one of a fleet's.
    pub fn is_shared(&self) -> bool {
        self.store.drift.shared().is_some()
    }

    /// Whether this replica leads `model` (alone: always; in a fleet: it holds the lease).
    pub(super) fn leads(&self, model: &str) -> bool {
        match self.store.drift.shared() {
            None => true,
            Some(s) => s.lease(model, LEASE).unwrap_or(false),
        }
    }

    /// A uniform sample of `rows` (each kept with the fleet sample rate), in the reference's
    /// feature order.
    pub(super) fn sample(
        &self,
        md: &ModelDrift,
        names: &[String],
        precisions: &[Precision],
        rows: &[Vec<FeatureValue>],
    ) -> Vec<DriftRow> {
        let width = md.reference.as_ref().map_or(0, |r| r.features.len());
        let slots: Vec<Option<usize>> = names.iter().map(|n| md.index_of(n)).collect();
        let rate = self.settings.fleet_sample;
        rows.iter()
            .filter(|_| rate >= 1.0 || rand::random::<f64>() < rate)
            .map(|r| {
                let mut row: DriftRow = vec![None; width];
                for (c, v) in r.iter().enumerate() {
                    if let Some(Some(i)) = slots.get(c) {
                        let p = precisions.get(c).copied().unwrap_or_default();
                        row[*i] = Some((v.clone(), p));
                    }
                }
                row
            })
            .collect()
    }

    /// Sends sampled rows to the model's shared window.
    pub(super) fn contribute(&self, model: &str, stamp: u64, rows: Vec<DriftRow>) {
        if let Some(shared) = self.store.drift.shared() {
            shared.contribute(model, stamp, self.settings.window, rows);
        }
    }

    /// In a fleet: reads the model's episode as stored (another replica may have moved it on).
    /// Whether the drift is shared.
    pub(super) fn sync_state(&self, model: &str, md: &mut ModelDrift) -> bool {
        if !self.is_shared() {
            return false;
        }
        match self.store.drift.get_state::<DriftState>(model, "drift") {
            Ok(state) => {
                md.state = state.unwrap_or_default();
                md.quiet = md.state.quiet.clone();
            }
            Err(e) => tracing::warn!(model, error = %e, "cannot read the fleet's drift state"),
        }
        true
    }

    /// The model's reference and the shared window, as it is now.
    pub(super) fn shared_snapshot(
        &self,
        model: &str,
        md: &Arc<Mutex<ModelDrift>>,
    ) -> Option<Snapshot> {
        let shared = self.store.drift.shared()?;
        let (reference, stamp) = {
            let md = md.lock();
            (md.reference.clone()?, md.stamp)
        };
        let rows = match shared.window(model, stamp, self.settings.window) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(model, error = %e, "cannot read the shared drift window");
                return None;
            }
        };
        let mut windows: Vec<LiveWindow> = reference
            .features
            .iter()
            .map(|f| LiveWindow::for_feature(f, self.settings.window))
            .collect();
        for row in &rows {
            for (w, v) in windows.iter_mut().zip(row) {
                if let Some((v, p)) = v {
                    w.push(v, *p);
                }
            }
        }
        Some((reference, windows))
    }

    fn shared_evaluation(&self, model: &str) -> Option<SharedEvaluation> {
        match self
            .store
            .drift
            .get_state::<SharedEvaluation>(model, "evaluation")
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(model, error = %e, "cannot read the fleet's drift evaluation");
                None
            }
        }
    }

    /// Stores an evaluation for every replica's reports.
    pub(super) fn share_evaluation(&self, model: &str, e: &Evaluation) {
        let before = self.shared_evaluation(model).map_or(0, |e| e.evaluations);
        let shared = SharedEvaluation {
            at_ms: e.at_ms,
            evaluations: before + 1,
            features: e.features.iter().map(SharedFeature::of).collect(),
        };
        if let Err(err) = self.store.drift.put_state(model, "evaluation", &shared) {
            tracing::error!(model, error = %err, "could not share the drift evaluation");
        }
    }

    /// The fleet's report of `model` (evaluation, episode, concept drift), when drift is shared.
    pub(super) fn shared_report(&self, model: &str) -> Option<SharedReport> {
        if !self.is_shared() {
            return None;
        }
        let (evaluation, evaluations) = match self.shared_evaluation(model) {
            Some(e) => (
                Some(Arc::new(Evaluation {
                    at_ms: e.at_ms,
                    features: e.features.into_iter().map(SharedFeature::result).collect(),
                })),
                e.evaluations,
            ),
            None => (None, 0),
        };
        let state = self
            .store
            .drift
            .get_state::<DriftState>(model, "drift")
            .ok()
            .flatten()
            .unwrap_or_default();
        Some(SharedReport {
            evaluation,
            evaluations,
            state,
            // Unreadable (Redis away): none, as a replica of a fleet keeps no concept windows.
            concept: self.shared_concepts(model).unwrap_or_default(),
        })
    }

    /// In a fleet: evaluates `model` here if this replica holds (or can take) its lease, else
    /// asks the holder and waits (at most [`ASKED_WAIT`]) for its evaluation. Whether it was
    /// handled (false: not in a fleet).
    pub(super) fn evaluate_shared_now(&self, model: &str) -> bool {
        let Some(shared) = self.store.drift.shared() else {
            return false;
        };
        // The rows this replica answered before the call are in the shared window first.
        if !shared.settle(ASKED_WAIT) {
            tracing::warn!(
                model,
                "evaluating before this replica's rows reached the fleet"
            );
        }
        if self.leads(model) {
            return false; // evaluated here, as alone
        }
        let before = self.shared_evaluation(model).map_or(0, |e| e.evaluations);
        let asked = self.clock.now_ms();
        if let Err(e) = self.store.drift.put_state(model, "evaluate", &asked) {
            tracing::warn!(model, error = %e, "cannot ask the fleet for an evaluation");
            return true;
        }
        let until = std::time::Instant::now() + ASKED_WAIT;
        while std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            if self.shared_evaluation(model).map_or(0, |e| e.evaluations) > before {
                break;
            }
        }
        true
    }

    /// Once a second in a fleet: follows the fleet's references and retraining policies, and
    /// evaluates the models whose lease this replica holds when K new rows arrived (or an
    /// evaluation was asked for). Blocking (reads Redis).
    pub fn shared_tick(&self) {
        let Some(shared) = self.store.drift.shared() else {
            return;
        };
        let stamps = match shared.reference_stamps() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the fleet's drift references");
                return;
            }
        };
        for (model, &stamp) in &stamps {
            let md = self.models.entry(model.clone()).or_default().clone();
            if md.lock().stamp == stamp {
                continue;
            }
            match self.store.drift.load_reference(model) {
                Ok(Some(r)) => {
                    let mut md = md.lock();
                    let capture = md.capture.take();
                    *md = self.fresh(Arc::new(r), DriftState::default());
                    md.stamp = stamp;
                    md.capture = capture;
                    self.sync_state(model, &mut md);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(model, error = %e, "cannot read a fleet reference"),
            }
        }
        let mut asked: BTreeMap<String, u64> = BTreeMap::new();
        match self.store.drift.model_states() {
            Ok(states) => {
                let mut policies = self.retrain.lock();
                for (model, name, json) in states {
                    match name.as_str() {
                        "retrain" => {
                            if let Ok(p) = serde_json::from_slice::<RetrainPolicy>(&json) {
                                policies.insert(model, p);
                            }
                        }
                        "evaluate" => {
                            if let Ok(t) = serde_json::from_slice::<u64>(&json) {
                                asked.insert(model, t);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the fleet's drift states"),
        }
        // The lease of each model with a reference or outcomes, taken or kept once a tick.
        let mut leading: BTreeMap<String, bool> = BTreeMap::new();
        let versions = shared.outcome_versions().unwrap_or_default();
        for model in stamps.keys().chain(versions.iter().map(|(m, _)| m)) {
            if !leading.contains_key(model) {
                leading.insert(model.clone(), self.leads(model));
            }
        }
        self.judge_outcomes(&versions, &leading);
        for model in stamps.keys() {
            let Some(md) = self.models.get(model).map(|m| m.clone()) else {
                continue;
            };
            if !leading.get(model).copied().unwrap_or(false) {
                continue;
            }
            let Ok(rows) = shared.contributed(model) else {
                continue;
            };
            let mut md = md.lock();
            let request = asked.get(model).copied().unwrap_or(0);
            let due = rows.saturating_sub(md.evaluated_rows) >= self.settings.every
                && md
                    .asked
                    .is_none_or(|t| t.elapsed() >= self.settings.min_interval);
            if due || request > md.served_request {
                md.evaluated_rows = rows;
                md.served_request = md.served_request.max(request);
                md.asked = Some(std::time::Instant::now());
                drop(md);
                let _ = self.eval_tx.try_send((model.clone(), None, None));
            }
        }
    }
}

impl Monitor {
    /// The lease holder's part of concept drift: the outcomes added to each shared concept
    /// window since the last judged one (the count is stored with the episode), judged one by
    /// one as one replica alone would, from the window as it was before them. Nothing is kept in
    /// memory between ticks, so a new holder goes on exactly where the last one stopped.
    fn judge_outcomes(&self, versions: &[(String, u32)], leading: &BTreeMap<String, bool>) {
        let Some(shared) = self.store.drift.shared() else {
            return;
        };
        for (model, version) in versions {
            if !leading.get(model).copied().unwrap_or(false) {
                continue;
            }
            let Ok((total, values)) = shared.outcomes(model, *version) else {
                continue;
            };
            let Some(&(metric, _)) = values.last() else {
                continue;
            };
            let record = self.concept_record(model, *version);
            if record.judged >= total {
                continue;
            }
            let new = ((total - record.judged) as usize).min(values.len());
            let (before, after) = values.split_at(values.len() - new);
            let window = self.concept_window(metric, before);
            let mut c = Concept {
                window,
                quiet: record.quiet,
                record: ConceptRecord {
                    judged: total,
                    ..record.clone()
                },
            };
            for (m, x) in after {
                self.concept_step(model, *version, &mut c, *m, Some(*x));
            }
            c.record.quiet = c.quiet;
            self.save_concept(model, *version, &c.record);
        }
    }

    /// A concept window holding `values` of `metric` (a version is judged one way).
    fn concept_window(
        &self,
        metric: ConceptMetric,
        values: &[(ConceptMetric, f64)],
    ) -> ConceptWindow {
        let mut window = ConceptWindow::new(metric, self.settings.concept_window);
        for (m, x) in values {
            if *m == metric {
                window.push(*x);
            }
        }
        window
    }

    /// The fleet's concept drift of `model`, when drift is shared: each version's shared
    /// window and stored episode.
    fn shared_concepts(&self, model: &str) -> Option<Vec<ConceptStatus>> {
        let shared = self.store.drift.shared()?;
        let versions = shared.outcome_versions().ok()?;
        let mut out = Vec::new();
        for (m, version) in versions {
            if m != model {
                continue;
            }
            let Ok((_, values)) = shared.outcomes(model, version) else {
                continue;
            };
            let Some(&(metric, _)) = values.last() else {
                continue;
            };
            let window = self.concept_window(metric, &values);
            let record = self.concept_record(model, version);
            let quiet = record.quiet;
            let c = Concept {
                window,
                record,
                quiet,
            };
            out.push(self.concept_status(model, version, &c));
        }
        Some(out)
    }
}
