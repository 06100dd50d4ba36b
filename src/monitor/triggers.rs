//! Retraining triggers and the periodic alerts: a model's [`RetrainPolicy`] (on data drift, on
//! performance drift, on the production version's age) fires `retrain_triggered` at most once per
//! cooldown; [`Monitor::periodic`] raises scheduled triggers and the experiment (significance,
//! sample ratio mismatch) and shadow (low agreement) alerts, each once.

use serde::{Deserialize, Serialize};

use crate::events::event;
use crate::storage::{DriftStateExt, StoreError};

use super::Monitor;

/// The cooldown of a retraining policy that names none.
pub const DEFAULT_RETRAIN_COOLDOWN_MS: u64 = 3_600_000;

/// A model's retraining policy, with what it has already triggered. The default (no policy
/// set) triggers nothing and shows the cooldown a new policy would get.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrainPolicy {
    /// Trigger when data drift starts.
    pub on_data_drift: bool,
    /// Trigger when a version's performance drifts.
    pub on_performance_drift: bool,
    /// Trigger when the production version is older than this.
    pub max_age_ms: Option<u64>,
    /// No second trigger within this.
    pub cooldown_ms: u64,
    /// When the last trigger fired.
    #[serde(default)]
    pub last_trigger_ms: Option<u64>,
    /// The production version a scheduled trigger already fired for.
    #[serde(default)]
    pub scheduled_version: Option<u32>,
}

impl Default for RetrainPolicy {
    fn default() -> Self {
        RetrainPolicy {
            on_data_drift: false,
            on_performance_drift: false,
            max_age_ms: None,
            cooldown_ms: DEFAULT_RETRAIN_COOLDOWN_MS,
            last_trigger_ms: None,
            scheduled_version: None,
        }
    }
}

impl Monitor {
    /// Sets a model's retraining policy (synced).
    pub fn set_retrain_policy(
        &self,
        model: &str,
        mut p: RetrainPolicy,
    ) -> Result<RetrainPolicy, StoreError> {
        let mut all = self.retrain.lock();
        if let Some(old) = all.get(model) {
            p.last_trigger_ms = old.last_trigger_ms;
            p.scheduled_version = old.scheduled_version;
        }
        self.store.drift.put_state(model, "retrain", &p)?;
        all.insert(model.to_string(), p.clone());
        Ok(p)
    }

    /// A model's retraining policy.
    pub fn retrain_policy(&self, model: &str) -> Option<RetrainPolicy> {
        self.retrain.lock().get(model).cloned()
    }

    /// Fires a retraining trigger if the policy asks for it and the cooldown has passed.
    pub(super) fn trigger(&self, model: &str, reason: &str, version: Option<u32>) -> bool {
        let now = self.clock.now_ms();
        let mut all = self.retrain.lock();
        let Some(p) = all.get_mut(model) else {
            return false;
        };
        let wanted = match reason {
            "data_drift" => p.on_data_drift,
            "performance_drift" => p.on_performance_drift,
            _ => true,
        };
        if !wanted || p.last_trigger_ms.is_some_and(|t| now < t + p.cooldown_ms) {
            return false;
        }
        p.last_trigger_ms = Some(now);
        let p = p.clone();
        drop(all);
        if let Err(e) = self.store.drift.put_state(model, "retrain", &p) {
            tracing::error!(model, error = %e, "could not store the retraining policy");
        }
        let mut e = event(
            "retrain_triggered",
            model,
            format!("model '{model}' should be retrained: {reason}"),
        );
        e.reason = reason.to_string();
        e.version = version.unwrap_or(0);
        self.publish(e);
        true
    }

    /// Periodic checks: scheduled retraining, experiment significance and sample-ratio mismatch,
    /// shadow agreement. Blocking (reads RocksDB).
    pub fn periodic(&self) {
        // Rows that arrived inside the last evaluation's interval and were never followed by
        // more: evaluate them now.
        self.evaluate_pending();
        let state = self.plane.state();
        let now = self.clock.now_ms();
        // Scheduled retraining: the production version is older than max_age.
        let policies: Vec<(String, RetrainPolicy)> = self
            .retrain
            .lock()
            .iter()
            .map(|(m, p)| (m.clone(), p.clone()))
            .collect();
        for (model, p) in policies {
            let (Some(max_age), Ok(v)) = (p.max_age_ms, state.registry.production(&model)) else {
                continue;
            };
            // In a fleet, the replica leading the model raises it (once for the fleet).
            if now.saturating_sub(v.updated_at_ms) > max_age
                && p.scheduled_version != Some(v.version)
                && self.leads(&model)
            {
                let version = v.version;
                if let Some(p) = self.retrain.lock().get_mut(&model) {
                    p.scheduled_version = Some(version);
                }
                if !self.trigger(&model, "scheduled", Some(version)) {
                    continue;
                }
            }
        }
        // Experiments: significance and sample ratio mismatch, once each.
        for e in state.experiments.all().filter(|e| e.state.is_open()) {
            let names: Vec<&str> = e.variants.iter().map(|v| v.name.as_str()).collect();
            let Ok(counts) = self.store.tallies.experiment_counts(&e.name, &names) else {
                continue;
            };
            let r = crate::experiment::results(e, &counts);
            if let Ok(t) = &r.significance {
                if t.p_value < e.alpha && self.raise(format!("sig/{}", e.name)) {
                    let mut ev = event(
                        "experiment_significant",
                        &e.model,
                        format!(
                            "experiment '{}' is significant (p = {:.3e})",
                            e.name, t.p_value
                        ),
                    );
                    ev.experiment = e.name.clone();
                    self.publish(ev);
                }
            }
            if let Ok(t) = &r.srm {
                if t.p_value < crate::experiment::SRM_P && self.raise(format!("srm/{}", e.name)) {
                    let mut ev = event(
                        "experiment_sample_ratio_mismatch",
                        &e.model,
                        format!(
                            "experiment '{}' has a sample ratio mismatch (p = {:.3e}); its results cannot be trusted",
                            e.name, t.p_value
                        ),
                    );
                    ev.experiment = e.name.clone();
                    self.publish(ev);
                }
            }
        }
        // Shadows: agreement below the alert level after enough comparisons.
        for s in state.shadows.all() {
            let Ok(c) = self.store.tallies.shadow_counts(&s.model, s.version) else {
                continue;
            };
            if c.compared < 100 {
                continue;
            }
            let rate = c.agreed as f64 / c.compared as f64;
            let key = format!("shadow/{}/{}", s.model, s.version);
            if rate < self.settings.shadow_agreement_alert {
                if self.raise(key) {
                    let mut ev = event(
                        "shadow_agreement_low",
                        &s.model,
                        format!(
                            "shadow version {} of model '{}' agrees with production on {:.1}% of {} comparisons",
                            s.version,
                            s.model,
                            rate * 100.0,
                            c.compared
                        ),
                    );
                    ev.version = s.version;
                    ev.details
                        .insert("agreement_rate".into(), format!("{rate}"));
                    self.publish(ev);
                }
            } else {
                self.raised.lock().remove(&key);
            }
        }
    }

    /// Marks an alert raised; false when it already was.
    fn raise(&self, key: String) -> bool {
        self.raised.lock().insert(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::monitor::test_support::{harness, settings, Harness, MODEL};
    use crate::registry::{NewVersion, Stage};
    use crate::state::State;

    const MINUTE: u64 = 60_000;

    /// A data-drift episode from a fresh reference: rows far from it, evaluated.
    fn drift_episode(h: &Harness) {
        h.set_reference();
        h.evaluate_rows(5.0, 200);
    }

    fn triggers(h: &Harness) -> Vec<(String, u32)> {
        h.events()
            .into_iter()
            .filter(|e| e.r#type == "retrain_triggered")
            .map(|e| (e.reason, e.version))
            .collect()
    }

    #[test]
    fn a_retraining_cooldown_holds() {
        let h = harness(settings());
        let policy = RetrainPolicy {
            on_data_drift: true,
            cooldown_ms: 10 * MINUTE,
            ..Default::default()
        };
        h.monitor.set_retrain_policy(MODEL, policy).unwrap();
        let start = h.clock.now_ms();
        drift_episode(&h);
        assert_eq!(triggers(&h), vec![("data_drift".to_string(), 0)]);
        let p = h.monitor.retrain_policy(MODEL).unwrap();
        assert_eq!(p.last_trigger_ms, Some(start));

        // A second episode within the cooldown: announced, but no second trigger.
        h.clock.advance(10 * MINUTE - 1);
        drift_episode(&h);
        let started = h
            .event_types()
            .iter()
            .filter(|t| *t == "drift_started")
            .count();
        assert_eq!(started, 2);
        assert_eq!(triggers(&h).len(), 1);

        // Setting the policy again keeps what it already triggered.
        h.monitor
            .set_retrain_policy(
                MODEL,
                RetrainPolicy {
                    on_data_drift: true,
                    cooldown_ms: 10 * MINUTE,
                    ..Default::default()
                },
            )
            .unwrap();
        h.clock.advance(1);
        drift_episode(&h);
        assert_eq!(triggers(&h).len(), 2, "the cooldown is over");
        assert_eq!(
            h.monitor.retrain_policy(MODEL).unwrap().last_trigger_ms,
            Some(start + 10 * MINUTE)
        );
        // What was triggered is stored: a restart keeps the cooldown.
        let stored: RetrainPolicy = h
            .storage
            .drift
            .get_state(MODEL, "retrain")
            .unwrap()
            .unwrap();
        assert_eq!(stored.last_trigger_ms, Some(start + 10 * MINUTE));
    }

    #[test]
    fn drift_triggers_nothing_without_a_policy_that_asks() {
        let h = harness(settings());
        drift_episode(&h);
        h.monitor
            .set_retrain_policy(
                MODEL,
                RetrainPolicy {
                    on_performance_drift: true,
                    ..Default::default()
                },
            )
            .unwrap();
        h.clock.advance(DEFAULT_RETRAIN_COOLDOWN_MS);
        drift_episode(&h);
        assert!(triggers(&h).is_empty());
    }

    #[test]
    fn an_old_production_version_triggers_once() {
        let h = harness(settings());
        let mut state = State::default();
        let (v, _) = state
            .registry
            .register(
                NewVersion {
                    model: MODEL.into(),
                    endpoint: "127.0.0.1:8001".into(),
                    ..Default::default()
                },
                h.clock.now_ms(),
            )
            .unwrap();
        state
            .registry
            .transition(
                MODEL,
                &v.version.to_string(),
                Stage::Production,
                false,
                h.clock.now_ms(),
            )
            .unwrap();
        *h.plane.0.lock() = std::sync::Arc::new(state);
        h.monitor
            .set_retrain_policy(
                MODEL,
                RetrainPolicy {
                    max_age_ms: Some(60 * MINUTE),
                    cooldown_ms: 0,
                    ..Default::default()
                },
            )
            .unwrap();
        h.monitor.periodic();
        h.clock.advance(60 * MINUTE);
        h.monitor.periodic();
        assert!(
            triggers(&h).is_empty(),
            "not older than the maximum age yet"
        );
        h.clock.advance(1);
        h.monitor.periodic();
        assert_eq!(triggers(&h), vec![("scheduled".to_string(), v.version)]);
        h.clock.advance(60 * MINUTE);
        h.monitor.periodic();
        assert_eq!(triggers(&h).len(), 1, "once per production version");
        assert_eq!(
            h.monitor.retrain_policy(MODEL).unwrap().scheduled_version,
            Some(v.version)
        );
    }
}
