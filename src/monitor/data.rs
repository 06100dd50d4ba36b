//! Data drift: each model's reference and live windows (one per feature, fed by
//! [`Monitor::observe`]), a capture of live rows as a new reference, the evaluation of the
//! windows against the reference, and the model's episode (`drift_started` / `drift_ended`,
//! with hysteresis), whose start may trigger retraining.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::drift::{self, FeatureResult, LiveWindow, Reference};
use crate::events::event;
use crate::record::{FeatureValue, Precision};
use crate::storage::{DriftStateExt, StoreError};

use super::Monitor;

/// The persisted drift state of a model: the features in an episode. (Alone, their counts of
/// quiet evaluations are kept in memory only: a restart counts afresh, which can only make an
/// episode last longer. In a fleet they are stored too, so that an evaluation by another
/// replica goes on counting.)
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct DriftState {
    /// The features in the episode.
    pub(super) drifted: Vec<String>,
    /// When the set last changed.
    pub(super) changed_ms: u64,
    /// Fleet mode: quiet evaluations in a row of the features in `drifted`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) quiet: BTreeMap<String, u32>,
}

/// The latest evaluation of a model.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Per feature.
    pub features: Vec<FeatureResult>,
    /// When.
    pub at_ms: u64,
}

/// A capture of live rows in progress.
pub(super) struct Capture {
    target: usize,
    names: Vec<String>,
    rows: Vec<Vec<FeatureValue>>,
    received: u64,
}

/// What the monitor holds of one model's data drift.
#[derive(Default)]
pub(super) struct ModelDrift {
    /// The reference the windows are tested against.
    pub(super) reference: Option<Arc<Reference>>,
    index: HashMap<String, usize>,
    windows: Vec<LiveWindow>,
    /// The columns of the rows last observed (names and precisions) and, per column, its window
    /// and precision: traffic repeats the same columns, and looking each name up in `index` was
    /// most of what observing a row cost.
    columns: Option<ColumnMap>,
    since_eval: u64,
    /// When the last evaluation was asked for.
    pub(super) asked: Option<std::time::Instant>,
    /// Evaluations so far (this process).
    pub(super) evaluations: u64,
    pub(super) capture: Option<Capture>,
    /// The latest evaluation.
    pub(super) latest: Option<Arc<Evaluation>>,
    /// The episode, as stored.
    pub(super) state: DriftState,
    /// Quiet evaluations in a row of the features in `state.drifted`.
    pub(super) quiet: BTreeMap<String, u32>,
    /// Fleet mode: the stamp of the fleet's reference that `reference` is.
    pub(super) stamp: u64,
    /// Fleet mode: rows the fleet had contributed at the last evaluation.
    pub(super) evaluated_rows: u64,
    /// Fleet mode: the last request for an evaluation that was served (its time).
    pub(super) served_request: u64,
}

/// Where the columns of observed rows go: for the columns `names` (at `precisions`), each one's
/// window (none when the reference has no such feature) and precision.
struct ColumnMap {
    names: Arc<[String]>,
    precisions: Vec<Precision>,
    slots: Vec<(Option<usize>, Precision)>,
}

impl ModelDrift {
    /// Where the reference keeps feature `name`.
    pub(super) fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The reference and a copy of the windows, when there is a reference to test against.
    pub(super) fn snapshot(&self) -> Option<Snapshot> {
        self.reference.clone().map(|r| (r, self.windows.clone()))
    }
}

/// The windows of a model as they were when K new rows had arrived.
pub(super) type Snapshot = (Arc<Reference>, Vec<LiveWindow>);

impl Monitor {
    /// Empty windows for `reference`, with the stored episode `state`.
    pub(super) fn fresh(&self, reference: Arc<Reference>, state: DriftState) -> ModelDrift {
        ModelDrift {
            index: reference
                .features
                .iter()
                .enumerate()
                .map(|(i, f)| (f.name.clone(), i))
                .collect(),
            windows: reference
                .features
                .iter()
                .map(|f| LiveWindow::for_feature(f, self.settings.window))
                .collect(),
            reference: Some(reference),
            state,
            ..Default::default()
        }
    }

    /// Live rows of `model` (record writer thread): `names` and `precisions` per column (a
    /// missing precision is [`Precision::F64`]).
    pub fn observe(
        &self,
        model: &str,
        names: &Arc<[String]>,
        precisions: &[Precision],
        rows: &[Vec<FeatureValue>],
    ) {
        if rows.is_empty() {
            return;
        }
        let Some(md) = self.models.get(model).map(|m| m.clone()) else {
            return;
        };
        let mut md = md.lock();
        if let Some(c) = md.capture.as_mut() {
            if c.names.is_empty() {
                c.names = names.to_vec();
            }
            if c.names[..] == names[..] {
                for r in rows {
                    c.received += 1;
                    if c.rows.len() < c.target {
                        c.rows.push(r.clone());
                    }
                }
            }
            if c.rows.len() >= c.target {
                let c = md.capture.take().expect("capturing");
                match drift::build_reference(
                    &c.names,
                    c.rows,
                    &[],
                    c.target,
                    "captured",
                    self.clock.now_ms(),
                ) {
                    Ok(mut r) => {
                        r.received = c.received;
                        self.end_episode(model, &mut md, "reference_replaced");
                        if let Err(e) = self.store.drift.put_reference(model, &r) {
                            tracing::error!(model, error = %e, "could not store the captured reference");
                        }
                        *md = self.fresh(Arc::new(r), DriftState::default());
                        tracing::info!(model, "reference captured");
                    }
                    Err(e) => tracing::warn!(model, error = %e, "capture failed"),
                }
            }
            return;
        }
        if md.reference.is_none() {
            return;
        }
        if self.is_shared() {
            let (stamp, sample) = (md.stamp, self.sample(&md, names, precisions, rows));
            drop(md);
            self.contribute(model, stamp, sample);
            return;
        }
        // One mutable borrow through the guard, so that the cached map and the windows can be
        // borrowed apart.
        let m = &mut *md;
        let known = m
            .columns
            .as_ref()
            // The same table as last time (the writer shares a model's names): no comparing.
            .is_some_and(|c| {
                (Arc::ptr_eq(&c.names, names) || c.names == *names) && c.precisions == precisions
            });
        if !known {
            let slots = names
                .iter()
                .enumerate()
                .map(|(c, n)| {
                    let p = precisions.get(c).copied().unwrap_or_default();
                    (m.index.get(n).copied(), p)
                })
                .collect();
            m.columns = Some(ColumnMap {
                names: names.clone(),
                precisions: precisions.to_vec(),
                slots,
            });
        }
        let map = m.columns.as_ref().map_or(&[][..], |c| &c.slots);
        for r in rows {
            for (v, (slot, p)) in r.iter().zip(map) {
                if let Some(i) = slot {
                    m.windows[*i].push(v, *p);
                }
            }
        }
        md.since_eval += rows.len() as u64;
        if md.since_eval >= self.settings.every
            && md
                .asked
                .is_none_or(|t| t.elapsed() >= self.settings.min_interval)
        {
            md.since_eval = 0;
            md.asked = Some(std::time::Instant::now());
            let snapshot = md.snapshot();
            drop(md);
            // The evaluator is busy or far behind: the next K rows will ask again.
            let _ = self.eval_tx.try_send((model.to_string(), snapshot, None));
        }
    }

    /// Installs an uploaded reference (synced first). An episode of the previous reference ends
    /// first, with `drift_ended` (reason `reference_replaced`), under the model's lock: no event
    /// about the new reference can come before it.
    pub fn set_reference(&self, model: &str, r: Reference) -> Result<Arc<Reference>, StoreError> {
        let md = self.models.entry(model.to_string()).or_default().clone();
        let mut md = md.lock();
        // Ended (stored and announced) before the new reference is written: a crash in between
        // leaves the old reference with no episode, which is what the watcher was told.
        self.end_episode(model, &mut md, "reference_replaced");
        self.store.drift.put_reference(model, &r)?;
        let r = Arc::new(r);
        // Replaced in place, not as a new entry: an evaluation of the old reference still under
        // way finds another reference here and says nothing.
        *md = self.fresh(r.clone(), DriftState::default());
        Ok(r)
    }

    /// Ends the model's drift episode, if any: stores the empty state, then publishes
    /// `drift_ended` with `reason`. Called with the model's lock held.
    fn end_episode(&self, model: &str, md: &mut ModelDrift, reason: &str) {
        // In a fleet, another replica may have moved the episode on.
        self.sync_state(model, md);
        md.quiet.clear();
        if md.state.drifted.is_empty() {
            return;
        }
        md.state = DriftState {
            drifted: Vec::new(),
            changed_ms: self.clock.now_ms(),
            quiet: BTreeMap::new(),
        };
        if let Err(e) = self.store.drift.put_state(model, "drift", &md.state) {
            tracing::error!(model, error = %e, "could not store the drift state");
        }
        let mut e = event(
            "drift_ended",
            model,
            match reason {
                "reference_replaced" => {
                    format!("data drift in model '{model}' ended: its reference was replaced")
                }
                _ => format!("no data drift in model '{model}' any more"),
            },
        );
        e.reason = reason.to_string();
        self.publish(e);
    }

    /// Whether `model` has a reference or is capturing one: its rows are wanted.
    pub fn watching(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|md| {
            let md = md.lock();
            md.reference.is_some() || md.capture.is_some()
        })
    }

    /// Starts taking the next `n` live rows as the reference.
    pub fn capture(&self, model: &str, n: usize) {
        let md = self.models.entry(model.to_string()).or_default().clone();
        md.lock().capture = Some(Capture {
            target: n,
            names: Vec::new(),
            rows: Vec::with_capacity(n.min(drift::MAX_SAMPLE)),
            received: 0,
        });
    }

    /// The reference and, while capturing, how many rows remain.
    pub fn reference(&self, model: &str) -> (Option<Arc<Reference>>, Option<(usize, u64)>) {
        match self.models.get(model) {
            None => (None, None),
            Some(md) => {
                let md = md.lock();
                let capturing = md
                    .capture
                    .as_ref()
                    .map(|c| (c.target - c.rows.len(), c.received));
                (md.reference.clone(), capturing)
            }
        }
    }

    pub(super) fn evaluate(&self, model: &str, snapshot: Option<Snapshot>) {
        let Some(md) = self.models.get(model).map(|m| m.clone()) else {
            return;
        };
        let snapshot = match snapshot {
            Some(s) => Some(s),
            // In a fleet: the shared window, as it is now.
            None if self.is_shared() => self.shared_snapshot(model, &md),
            None => md.lock().snapshot(),
        };
        let Some((reference, windows)) = snapshot else {
            return;
        };
        let mut features = drift::evaluate(&reference, &windows, self.settings.fdr);
        let now = self.clock.now_ms();
        let mut md = md.lock();
        if !md
            .reference
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &reference))
        {
            // The reference was replaced while this one was tested: its episode has ended.
            return;
        }
        let shared = self.sync_state(model, &mut md);
        let mut episodes: BTreeMap<String, u32> = md
            .state
            .drifted
            .iter()
            .map(|f| (f.clone(), md.quiet.get(f).copied().unwrap_or(0)))
            .collect();
        drift::update_episodes(&mut features, &mut episodes, &self.settings.hysteresis());
        let drifted: Vec<String> = features
            .iter()
            .filter(|f| f.drifted)
            .map(|f| f.name.clone())
            .collect();
        md.quiet = episodes;
        md.evaluations += 1;
        let evaluation = Arc::new(Evaluation {
            features,
            at_ms: now,
        });
        md.latest = Some(evaluation.clone());
        self.update_episode(model, &mut md, drifted, now, shared);
        // Shared once the episode it moved is stored: a replica that asked for this evaluation
        // waits for it to appear, then reads the episode that goes with it.
        if shared {
            self.share_evaluation(model, &evaluation);
        }
    }

    /// Moves the model's episode to the features an evaluation found `drifted`: stored, and
    /// `drift_started` / `drift_ended` published when it starts or ends.
    fn update_episode(
        &self,
        model: &str,
        md: &mut ModelDrift,
        drifted: Vec<String>,
        now: u64,
        shared: bool,
    ) {
        if md.state.drifted == drifted {
            if shared {
                // The counts of quiet evaluations moved on: the next evaluator goes on from them.
                md.state.quiet = md.quiet.clone();
                if let Err(e) = self.store.drift.put_state(model, "drift", &md.state) {
                    tracing::error!(model, error = %e, "could not store the drift state");
                }
            }
            return;
        }
        let was = !md.state.drifted.is_empty();
        if was && drifted.is_empty() {
            self.end_episode(model, md, "recovered");
            return;
        }
        md.state = DriftState {
            drifted: drifted.clone(),
            changed_ms: now,
            quiet: if shared {
                md.quiet.clone()
            } else {
                BTreeMap::new()
            },
        };
        if let Err(e) = self.store.drift.put_state(model, "drift", &md.state) {
            tracing::error!(model, error = %e, "could not store the drift state");
        }
        // Within an episode a changing set of features only updates the report; events mark
        // the start and the end.
        if !was {
            let mut e = event(
                "drift_started",
                model,
                format!("data drift in model '{model}': {}", drifted.join(", ")),
            );
            e.features = drifted;
            self.publish(e);
            self.trigger(model, "data_drift", None);
        }
    }

    /// Queues an evaluation of every model whose rows arrived inside the last evaluation's
    /// interval and were never followed by more (called by [`Monitor::periodic`]).
    pub(super) fn evaluate_pending(&self) {
        if self.is_shared() {
            return; // the lease holder evaluates the shared window (Monitor::shared_tick)
        }
        for entry in self.models.iter() {
            let mut md = entry.value().lock();
            if md.reference.is_some()
                && md.since_eval >= self.settings.every
                && md
                    .asked
                    .is_none_or(|t| t.elapsed() >= self.settings.min_interval)
            {
                md.since_eval = 0;
                md.asked = Some(std::time::Instant::now());
                let snapshot = md.snapshot();
                let _ = self.eval_tx.try_send((entry.key().clone(), snapshot, None));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::monitor::test_support::{harness, rows, settings, Harness, MODEL};

    /// Into an episode: rows like the reference, then rows far from it.
    fn drifting() -> Harness {
        let h = harness(settings());
        h.set_reference();
        h.evaluate_rows(0.0, 200);
        h.clock.advance(1000);
        h.evaluate_rows(5.0, 200);
        h
    }

    #[test]
    fn a_reference_and_observed_rows_give_an_evaluation() {
        let h = harness(settings());
        assert!(!h.monitor.watching(MODEL));
        h.set_reference();
        assert!(h.monitor.watching(MODEL));
        h.evaluate_rows(0.0, 200);
        let r = h.monitor.report(MODEL);
        assert!(r.has_reference);
        assert_eq!(r.evaluations, 1);
        let e = r.evaluation.expect("evaluated");
        assert_eq!(e.at_ms, h.clock.now_ms());
        assert_eq!(e.features.len(), 1);
        let x = &e.features[0];
        assert_eq!((x.name.as_str(), x.window_size), ("x", 200));
        assert!(x.result.is_ok() && !x.alarm && !x.drifted, "{x:?}");
        assert!(r.drifted.is_empty());
        assert!(h.event_types().is_empty());

        // The window holds the last 200 rows: all of them far from the reference.
        h.clock.advance(1000);
        h.evaluate_rows(5.0, 200);
        let r = h.monitor.report(MODEL);
        assert_eq!(r.evaluations, 2);
        assert_eq!(r.drifted, vec!["x"]);
        assert_eq!(r.changed_ms, h.clock.now_ms());
        assert_eq!(h.event_types(), vec!["drift_started"]);
        assert_eq!(h.events()[0].features, vec!["x"]);
        let stored: DriftState = h.storage.drift.get_state(MODEL, "drift").unwrap().unwrap();
        assert_eq!(stored.drifted, vec!["x"]);
    }

    #[test]
    fn rows_of_a_model_without_a_reference_are_not_wanted() {
        let h = harness(settings());
        h.evaluate_rows(0.0, 200);
        let r = h.monitor.report(MODEL);
        assert!(!r.has_reference && r.evaluation.is_none());
        assert_eq!(r.evaluations, 0);
    }

    #[test]
    fn a_replaced_reference_ends_the_episode_first() {
        let h = drifting();
        h.clock.advance(1000);
        h.set_reference();
        let events = h.events();
        let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
        assert_eq!(types, vec!["drift_started", "drift_ended"]);
        assert_eq!(events[1].reason, "reference_replaced");
        let r = h.monitor.report(MODEL);
        assert!(r.has_reference && r.drifted.is_empty());
        assert_eq!((r.evaluations, r.changed_ms), (0, 0), "a fresh start");
        assert!(r.evaluation.is_none());
        let stored: Option<DriftState> = h.storage.drift.get_state(MODEL, "drift").unwrap();
        assert!(
            stored.as_ref().is_none_or(|s| s.drifted.is_empty()),
            "{stored:?}"
        );
        // The new reference starts with empty windows: rows like it drift nothing.
        h.evaluate_rows(0.0, 200);
        assert!(h.monitor.report(MODEL).drifted.is_empty());
        assert_eq!(h.event_types().len(), 2);
    }

    #[test]
    fn an_episode_ends_after_quiet_evaluations_in_a_row() {
        let h = drifting();
        let exit = settings().exit_evaluations;
        for quiet in 1..exit {
            h.evaluate_rows(0.0, 200);
            let r = h.monitor.report(MODEL);
            assert_eq!(r.drifted, vec!["x"], "after {quiet} quiet evaluation(s)");
            let x = &r.evaluation.unwrap().features[0];
            assert_eq!(x.quiet_evaluations, quiet);
        }
        h.clock.advance(1000);
        h.evaluate_rows(0.0, 200);
        let r = h.monitor.report(MODEL);
        assert!(r.drifted.is_empty());
        assert_eq!(r.changed_ms, h.clock.now_ms());
        let events = h.events();
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[1].r#type.as_str(), events[1].reason.as_str()),
            ("drift_ended", "recovered")
        );
    }

    #[test]
    fn a_capture_takes_the_next_rows_as_the_reference() {
        let h = harness(settings());
        h.monitor.capture(MODEL, 150);
        assert!(h.monitor.watching(MODEL));
        let names: Arc<[String]> = Arc::from(["x".to_string()]);
        h.monitor
            .observe(MODEL, &names, &[Precision::F64], &rows(0.0, 100));
        assert_eq!(h.monitor.reference(MODEL).1, Some((50, 100)));
        h.monitor
            .observe(MODEL, &names, &[Precision::F64], &rows(0.0, 100));
        let (reference, capturing) = h.monitor.reference(MODEL);
        assert_eq!(capturing, None);
        let reference = reference.expect("captured");
        assert_eq!(reference.source, "captured");
        assert_eq!((reference.rows, reference.received), (150, 200));
        assert_eq!(reference.created_at_ms, h.clock.now_ms());
        assert!(h.storage.drift.load_reference(MODEL).unwrap().is_some());
    }
}
