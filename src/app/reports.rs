//! Assembling results and reports: an experiment's per-variant figures and tests, a model
//! version's performance, a shadow's report — from the configuration (which experiment, which
//! version) and the tallies behind the storage seam. Blocking: call them off the async runtime.

use crate::experiment::{self, Experiment, ExperimentError, Results};
use crate::ids::{ModelName, Version};
use crate::outcome::Tally;
use crate::registry::RegistryError;
use crate::shadow::{Disagreement, ShadowCounts, ShadowLatency};
use crate::state::State;
use crate::storage::{StoreError, Tallies};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The model or version is not in the registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The experiment does not exist.
    #[error(transparent)]
    Experiment(#[from] ExperimentError),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

/// An experiment's results: its configuration, and what its tallies say.
pub fn experiment_results(
    state: &State,
    tallies: &dyn Tallies,
    name: &str,
) -> Result<(Experiment, Results), ReportError> {
    let e = state.experiments.get(name)?.clone();
    let names: Vec<&str> = e.variants.iter().map(|v| v.name.as_str()).collect();
    let counts = tallies.experiment_counts(&e.name, &names)?;
    let results = experiment::results(&e, &counts);
    Ok((e, results))
}

/// A model version's accuracy (or error), over all time and its last outcomes.
#[derive(Clone, Debug, PartialEq)]
pub struct Performance {
    /// The version, resolved.
    pub version: u32,
    /// Every outcome recorded.
    pub all_time: Tally,
    /// The last `window` outcomes.
    pub recent: Tally,
}

/// The performance of `model` `version` over all time and its last `window` outcomes.
pub fn model_performance(
    state: &State,
    tallies: &dyn Tallies,
    model: &ModelName,
    version: &Version,
    window: usize,
) -> Result<Performance, ReportError> {
    let version = state
        .registry
        .resolve(model.as_str(), &version.to_string())?;
    Ok(Performance {
        version,
        all_time: tallies.tally(model.as_str(), version)?,
        recent: tallies.recent_tally(model.as_str(), version, window)?,
    })
}

/// What a shadow did and how often it agreed with production.
#[derive(Clone, Debug)]
pub struct ShadowReport {
    /// The shadow version, resolved.
    pub version: u32,
    /// Its counters.
    pub counts: ShadowCounts,
    /// Agreed / compared, when anything was compared.
    pub agreement_rate: Option<f64>,
    /// Wilson 95% interval of the agreement rate.
    pub agreement_interval: Option<(f64, f64)>,
    /// Production's and the shadow's latencies.
    pub latency: Option<ShadowLatency>,
    /// The last disagreements, newest first.
    pub disagreements: Vec<Disagreement>,
}

/// The report of `model`'s shadow `version`, with its last `disagreements`.
pub fn shadow_report(
    state: &State,
    tallies: &dyn Tallies,
    model: &ModelName,
    version: &Version,
    disagreements: usize,
) -> Result<ShadowReport, ReportError> {
    let version = state
        .registry
        .resolve(model.as_str(), &version.to_string())?;
    let counts = tallies.shadow_counts(model.as_str(), version)?;
    let agreement_rate =
        (counts.compared > 0).then(|| counts.agreed as f64 / counts.compared as f64);
    let agreement_interval = crate::stats::wilson_95(counts.agreed, counts.compared).ok();
    Ok(ShadowReport {
        version,
        latency: tallies.shadow_latency(model.as_str(), version)?,
        disagreements: tallies.recent_disagreements(model.as_str(), version, disagreements)?,
        counts,
        agreement_rate,
        agreement_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::control::ControlPlane;
    use crate::clock::{Clock, ManualClock};
    use crate::experiment::{NewExperiment, NewVariant};
    use crate::registry::{NewVersion, Stage};
    use crate::shadow::ShadowCounter;
    use crate::state::Update;
    use crate::storage::memory::MemoryStore;
    use crate::storage::{RecordWrites, Retention, Storage};

    fn version(endpoint: &str) -> NewVersion {
        NewVersion {
            model: "iris".into(),
            endpoint: endpoint.into(),
            ..Default::default()
        }
    }

    /// A control plane over the in-memory storage: changes are made durable through the seam
    /// (a second control plane loading the same storage sees them), and reports read the
    /// tallies the record writer leaves there.
    #[tokio::test]
    async fn control_changes_and_reports_run_on_the_in_memory_storage() {
        let clock = ManualClock::at(1_700_000_000_000);
        let storage: Storage = MemoryStore::storage(clock.clone(), Retention::default());
        let plane = ControlPlane::load(storage.clone(), clock.clone(), None).unwrap();
        let now = clock.now_ms();
        for endpoint in ["http://a:1", "http://b:1"] {
            plane
                .update(|reg| reg.register(version(endpoint), now))
                .await
                .unwrap();
        }
        plane
            .update(|reg| reg.transition("iris", "1", Stage::Production, false, now))
            .await
            .unwrap();
        plane
            .update_state(|s| {
                let e = s.experiments.create(
                    NewExperiment {
                        name: "ab".into(),
                        model: "iris".into(),
                        variants: ["control", "treatment"]
                            .into_iter()
                            .zip(["1", "2"])
                            .map(|(name, version)| NewVariant {
                                name: name.into(),
                                version: version.into(),
                                weight: 1.0,
                            })
                            .collect(),
                        ..Default::default()
                    },
                    &s.registry,
                    now,
                )?;
                Ok((
                    (),
                    Update {
                        experiments: vec![e],
                        ..Default::default()
                    },
                ))
            })
            .await
            .unwrap();
        let reloaded = ControlPlane::load(storage.clone(), clock.clone(), None).unwrap();
        assert_eq!(
            *reloaded.state(),
            *plane.state(),
            "durable through the seam"
        );
        let routing = reloaded.routing().load_full();
        assert!(routing.experiment("iris").is_some());

        let mut w = RecordWrites::default();
        w.add_experiment_requests("ab", "control", 40);
        w.add_experiment_requests("ab", "treatment", 60);
        w.add_shadow_count("iris", 2, ShadowCounter::Compared, 10);
        w.add_shadow_count("iris", 2, ShadowCounter::Agreed, 9);
        w.add_shadow_count("iris", 2, ShadowCounter::Error("UNAVAILABLE"), 2);
        storage.records.commit(w, false).unwrap();

        let state = plane.state();
        let (e, results) = experiment_results(&state, &*storage.tallies, "ab").unwrap();
        assert_eq!(e.model, "iris");
        assert_eq!(results.variants[0].counts.requests, 40);
        assert_eq!(results.variants[1].counts.requests, 60);
        // 40 / 60 against equal weights: scipy.stats.chisquare([40, 60]) → p = 0.0455003
        let srm = results.srm.as_ref().unwrap();
        assert!((srm.p_value - 0.04550026389635842).abs() < 1e-12, "{srm:?}");

        let iris = ModelName::parse("iris", "model").unwrap();
        let report =
            shadow_report(&state, &*storage.tallies, &iris, &Version::Number(2), 20).unwrap();
        assert_eq!(report.counts.errors["UNAVAILABLE"], 2);
        assert_eq!(report.agreement_rate, Some(0.9));
        let perf =
            model_performance(&state, &*storage.tallies, &iris, &Version::Number(1), 100).unwrap();
        assert_eq!(perf.all_time.outcomes, 0);
        assert!(matches!(
            model_performance(&state, &*storage.tallies, &iris, &Version::Number(9), 100),
            Err(ReportError::Registry(RegistryError::VersionNotFound { .. }))
        ));
    }
}
