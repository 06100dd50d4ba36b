//! Concept drift: each version's window of recorded outcomes (accuracy, or MAE for regression),
//! refilled from storage after a restart, compared with a baseline (the version's registered
//! metric, else its first full window); its episode (`performance_drift_started` / `_ended`, with
//! hysteresis) may trigger retraining.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::drift::{ConceptMetric, ConceptWindow, Episode};
use crate::events::event;
use crate::outcome::Judgement;
use crate::storage::DriftStateExt;

use super::Monitor;

/// The persisted concept-drift state of a version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct ConceptRecord {
    pub(super) baseline: Option<f64>,
    pub(super) drifted: bool,
    /// Fleet mode: `quiet` as of the last outcome the lease holder judged (alone it is kept in
    /// memory only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) quiet: u32,
    /// Fleet mode: outcomes of the version's shared concept window judged so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) judged: u64,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// What the monitor holds of one version's concept drift.
pub(super) struct Concept {
    pub(super) window: ConceptWindow,
    pub(super) record: ConceptRecord,
    /// While drifted: outcomes in a row at most the exit level (in memory only, alone).
    pub(super) quiet: u32,
}

/// What the report of a version's concept drift says.
#[derive(Clone, Debug, PartialEq)]
pub struct ConceptStatus {
    /// Version.
    pub version: u32,
    /// Metric.
    pub metric: ConceptMetric,
    /// Baseline and where it came from.
    pub baseline: Option<(f64, &'static str)>,
    /// Metric over the full window.
    pub current: Option<f64>,
    /// Window size and fill.
    pub window: (usize, usize),
    /// In a performance-drift episode.
    pub drifted: bool,
    /// While drifted: outcomes in a row at most the exit level.
    pub quiet_outcomes: u32,
}

impl Monitor {
    fn registered_baseline(&self, model: &str, version: u32, metric: ConceptMetric) -> Option<f64> {
        self.plane
            .state()
            .registry
            .get(model, &version.to_string())
            .ok()
            .and_then(|v| v.metrics.get(metric.as_str()).copied())
    }

    pub(super) fn concept_status(&self, model: &str, version: u32, c: &Concept) -> ConceptStatus {
        let metric = c.window.metric;
        let baseline = match self.registered_baseline(model, version, metric) {
            Some(b) => Some((b, "registered metric")),
            None => c.record.baseline.map(|b| (b, "first full window")),
        };
        ConceptStatus {
            version,
            metric,
            baseline,
            current: c.window.current(),
            window: (c.window.size(), c.window.fill()),
            drifted: c.record.drifted,
            quiet_outcomes: c.quiet,
        }
    }

    /// One recorded outcome of `model` version `version` (from the Outcomes service, blocking).
    pub fn observe_outcome(&self, model: &str, version: u32, j: &Judgement) {
        let (metric, x) = match (j.success, j.error) {
            (Some(s), _) => (ConceptMetric::Accuracy, f64::from(u8::from(s))),
            (None, Some(e)) => (ConceptMetric::Mae, e.abs()),
            (None, None) => return,
        };
        // In a fleet, to the version's shared window: the model's lease holder judges it.
        if let Some(shared) = self.store.drift.shared() {
            shared.contribute_outcomes(
                model,
                version,
                self.settings.concept_window,
                vec![(metric, x)],
            );
            return;
        }
        let key = (model.to_string(), version);
        // A window made now is refilled from RocksDB, where this outcome already is.
        let (concept, refilled) = match self.concepts.get(&key) {
            Some(c) => (c.clone(), false),
            None => {
                let mut created = false;
                let c = self
                    .concepts
                    .entry(key)
                    .or_insert_with(|| {
                        created = true;
                        Arc::new(Mutex::new(self.load_concept(model, version, metric)))
                    })
                    .clone();
                (c, created)
            }
        };
        let mut c = concept.lock();
        self.concept_step(model, version, &mut c, metric, (!refilled).then_some(x));
    }

    /// One outcome of a version: `x` joins the window (`None`: it is there already), and the
    /// episode moves on. Called with the version's lock held.
    pub(super) fn concept_step(
        &self,
        model: &str,
        version: u32,
        c: &mut Concept,
        metric: ConceptMetric,
        x: Option<f64>,
    ) {
        if c.window.metric != metric {
            return; // a version is judged one way; mixed outcomes would make no metric
        }
        if let Some(x) = x {
            c.window.push(x);
        }
        let Some(current) = c.window.current() else {
            return;
        };
        let registered = self.registered_baseline(model, version, metric);
        if registered.is_none() && c.record.baseline.is_none() {
            c.record.baseline = Some(current);
            self.save_concept(model, version, &c.record);
        }
        let baseline = registered.or(c.record.baseline).expect("set above");
        let degradation = metric.degradation(baseline, current);
        let mut episode = Episode {
            drifted: c.record.drifted,
            quiet: c.quiet,
        };
        let changed = episode.step(
            self.settings.concept_level(degradation),
            self.settings.concept_exit_outcomes,
        );
        c.quiet = episode.quiet;
        if !changed {
            return;
        }
        let drifted = episode.drifted;
        c.record.drifted = drifted;
        self.save_concept(model, version, &c.record);
        // Published with the version's lock held, so that the next outcome's event cannot
        // overtake this one.
        let mut e = event(
            if drifted {
                "performance_drift_started"
            } else {
                "performance_drift_ended"
            },
            model,
            format!(
                "model '{model}' version {version}: {} {current:.4} against a baseline of {baseline:.4}",
                metric.as_str()
            ),
        );
        e.version = version;
        e.details.insert("metric".into(), metric.as_str().into());
        e.details.insert("current".into(), format!("{current}"));
        e.details.insert("baseline".into(), format!("{baseline}"));
        self.publish(e);
        if drifted {
            self.trigger(model, "performance_drift", Some(version));
        }
    }

    /// A version's stored concept-drift state (the default when none, or unreadable).
    pub(super) fn concept_record(&self, model: &str, version: u32) -> ConceptRecord {
        self.store
            .drift
            .get_state(model, &format!("concept/{version}"))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    pub(super) fn load_concept(&self, model: &str, version: u32, metric: ConceptMetric) -> Concept {
        let record = self.concept_record(model, version);
        let mut window = ConceptWindow::new(metric, self.settings.concept_window);
        // Refill from the stored outcomes, oldest first, so a restart loses nothing.
        if let Ok(recent) =
            self.store
                .records
                .recent_judgements(model, version, self.settings.concept_window)
        {
            for j in recent.iter().rev() {
                match (metric, j.success, j.error) {
                    (ConceptMetric::Accuracy, Some(s), _) => window.push(f64::from(u8::from(s))),
                    (ConceptMetric::Mae, None, Some(e)) => window.push(e.abs()),
                    _ => {}
                }
            }
        }
        Concept {
            window,
            record,
            quiet: 0,
        }
    }

    pub(super) fn save_concept(&self, model: &str, version: u32, r: &ConceptRecord) {
        if let Err(e) = self
            .store
            .drift
            .put_state(model, &format!("concept/{version}"), r)
        {
            tracing::error!(model, version, error = %e, "could not store the concept-drift state");
        }
    }
}

impl crate::app::outcomes::OutcomeObserver for Monitor {
    fn observe_outcome(&self, model: &str, version: u32, judgement: &Judgement) {
        Monitor::observe_outcome(self, model, version, judgement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::test_support::{harness, settings, MODEL};
    use crate::monitor::DriftSettings;

    fn judged(success: bool) -> Judgement {
        Judgement {
            success: Some(success),
            error: None,
        }
    }

    #[test]
    fn performance_drifts_against_the_first_full_window_and_recovers() {
        let h = harness(DriftSettings {
            concept_window: 10,
            concept_exit_outcomes: 3,
            ..settings()
        });
        // The outcome that makes a version's window is read back from storage, where the
        // Outcomes use case wrote it first; here storage holds none, so it is not counted.
        h.monitor.observe_outcome(MODEL, 2, &judged(true));
        for _ in 0..10 {
            h.monitor.observe_outcome(MODEL, 2, &judged(true));
        }
        let c = &h.monitor.report(MODEL).concept[0];
        assert_eq!(c.version, 2);
        assert_eq!(c.metric, ConceptMetric::Accuracy);
        assert_eq!(c.baseline, Some((1.0, "first full window")));
        assert_eq!(
            (c.window, c.current, c.drifted),
            ((10, 10), Some(1.0), false)
        );

        // 0.9 is at the threshold (a drop of 0.1), 0.8 beyond it.
        h.monitor.observe_outcome(MODEL, 2, &judged(false));
        assert!(h.event_types().is_empty());
        h.monitor.observe_outcome(MODEL, 2, &judged(false));
        assert_eq!(h.event_types(), vec!["performance_drift_started"]);
        let e = &h.events()[0];
        assert_eq!(e.version, 2);
        assert_eq!(e.details["metric"], "accuracy");
        assert_eq!(e.details["baseline"], "1");
        assert!(h.monitor.report(MODEL).concept[0].drifted);

        // The wrong ones are out of the window after 10 right ones: from then on the window is
        // at the baseline (a drop of at most 0.05), and 3 such outcomes in a row end the episode.
        for _ in 0..11 {
            h.monitor.observe_outcome(MODEL, 2, &judged(true));
        }
        let c = &h.monitor.report(MODEL).concept[0];
        assert_eq!((c.drifted, c.quiet_outcomes), (true, 2));
        h.monitor.observe_outcome(MODEL, 2, &judged(true));
        assert_eq!(
            h.event_types(),
            vec!["performance_drift_started", "performance_drift_ended"]
        );
        let stored: ConceptRecord = h
            .storage
            .drift
            .get_state(MODEL, "concept/2")
            .unwrap()
            .unwrap();
        assert_eq!((stored.baseline, stored.drifted), (Some(1.0), false));
    }

    #[test]
    fn a_version_is_judged_one_way() {
        let h = harness(DriftSettings {
            concept_window: 2,
            ..settings()
        });
        let regression = Judgement {
            success: None,
            error: Some(-0.5),
        };
        for _ in 0..3 {
            h.monitor.observe_outcome(MODEL, 1, &regression);
        }
        // Neither right nor wrong, nor an error: nothing to count.
        let unjudged = Judgement {
            success: None,
            error: None,
        };
        h.monitor.observe_outcome(MODEL, 1, &unjudged);
        h.monitor.observe_outcome(MODEL, 1, &judged(false));
        let c = &h.monitor.report(MODEL).concept[0];
        assert_eq!(c.metric, ConceptMetric::Mae);
        assert_eq!(c.current, Some(0.5));
        assert!(!c.drifted);
    }
}
