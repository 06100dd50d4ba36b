//! Online monitoring: data drift, concept drift, retraining triggers and alerts.
//!
//! Live rows reach [`Monitor::observe`] from the record writer's thread (never the request
//! path): each row updates every feature's window in O(features). Every `--drift-every` rows (or
//! on demand) the model is queued for the evaluator thread, which compares windows with the
//! reference, moves each feature's episode on (with hysteresis:
//! [`drift::Episode`](crate::drift::Episode)) and publishes `drift_started` / `drift_ended` when
//! the model's episode starts or ends. Outcomes update each version's concept window, and its
//! episode, as they are recorded. A periodic task raises scheduled retraining triggers and the
//! experiment and shadow alerts.
//!
//! Events of a model's episode are published while its lock is held, after the state they
//! announce is stored: whatever else changes the model (a new reference, another evaluation)
//! comes wholly before or after, so a watcher sees `drift_started` and `drift_ended` alternate.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Monitor`], the state the jobs share, and its [`report`](Monitor::report) |
//! | `settings.rs` | [`DriftSettings`] |
//! | `data.rs` | data drift: windows, captures, evaluation, episodes |
//! | `concept.rs` | concept drift: outcome windows, baselines, episodes |
//! | `triggers.rs` | retraining triggers and the periodic alerts |
//! | `evaluator.rs` | the evaluator thread: start, queue, stop |
//! | `shared.rs` | drift across a fleet: the shared window, its lease, the fleet's report |

use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::events::EventBus;
use crate::state::StateSource;
use crate::storage::Storage;

mod concept;
mod data;
mod evaluator;
mod settings;
mod shared;
#[cfg(test)]
mod test_support;
mod triggers;

pub use concept::ConceptStatus;
pub use data::Evaluation;
pub use settings::DriftSettings;
pub use triggers::{RetrainPolicy, DEFAULT_RETRAIN_COOLDOWN_MS};

use concept::Concept;
use data::ModelDrift;
use evaluator::EvalRequest;

/// Everything [`Monitor::report`] returns.
pub struct ModelReport {
    /// Latest evaluation.
    pub evaluation: Option<Arc<Evaluation>>,
    /// Evaluations so far (this process; in a fleet, of the current reference by any
    /// replica).
    pub evaluations: u64,
    /// Drifted features.
    pub drifted: Vec<String>,
    /// When the drifted set last changed.
    pub changed_ms: u64,
    /// Whether there is a reference.
    pub has_reference: bool,
    /// Concept drift per version seen.
    pub concept: Vec<ConceptStatus>,
}

/// The monitor.
pub struct Monitor {
    settings: DriftSettings,
    store: Storage,
    clock: SharedClock,
    events: Arc<EventBus>,
    plane: Arc<dyn StateSource>,
    // aHash (keyed, fast): the writer looks a model up for every record; SipHash was ~300
    // instructions a lookup.
    models: DashMap<String, Arc<Mutex<ModelDrift>>, ahash::RandomState>,
    concepts: DashMap<(String, u32), Arc<Mutex<Concept>>, ahash::RandomState>,
    retrain: Mutex<HashMap<String, RetrainPolicy>>,
    eval_tx: SyncSender<EvalRequest>,
    /// Alerts already raised (experiment significance / SRM, shadow agreement), by key.
    raised: Mutex<std::collections::HashSet<String>>,
    /// The evaluator thread, joined by [`Monitor::stop_blocking`].
    evaluator: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set at shutdown: the evaluator skips what is still queued.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Monitor {
    /// Settings.
    pub fn settings(&self) -> &DriftSettings {
        &self.settings
    }

    /// Stores and broadcasts an event (blocking); a failure is logged.
    fn publish(&self, e: crate::pb::modelgate::v1::Event) {
        match self.events.publish_blocking(e) {
            // A fleet-wide event another replica published already.
            Ok(_) | Err(crate::storage::StoreError::AlreadyExists) => {}
            Err(err) => tracing::error!(error = %err, "could not store an event"),
        }
    }

    /// The report of a model.
    pub fn report(&self, model: &str) -> ModelReport {
        // In a fleet, the evaluation, the episode and concept drift are the fleet's.
        if let Some(r) = self.shared_report(model) {
            let mut concept = r.concept;
            concept.sort_by_key(|c| c.version);
            return ModelReport {
                evaluation: r.evaluation,
                evaluations: r.evaluations,
                drifted: r.state.drifted,
                changed_ms: r.state.changed_ms,
                has_reference: self
                    .models
                    .get(model)
                    .is_some_and(|md| md.lock().reference.is_some()),
                concept,
            };
        }
        let (evaluation, evaluations, drifted, changed_ms, has_reference) =
            match self.models.get(model) {
                Some(md) => {
                    let md = md.lock();
                    (
                        md.latest.clone(),
                        md.evaluations,
                        md.state.drifted.clone(),
                        md.state.changed_ms,
                        md.reference.is_some(),
                    )
                }
                None => (None, 0, Vec::new(), 0, false),
            };
        let mut concept: Vec<ConceptStatus> = self
            .concepts
            .iter()
            .filter(|e| e.key().0 == model)
            .map(|e| {
                let version = e.key().1;
                let c = e.value().lock();
                self.concept_status(model, version, &c)
            })
            .collect();
        concept.sort_by_key(|c| c.version);
        ModelReport {
            evaluation,
            evaluations,
            drifted,
            changed_ms,
            has_reference,
            concept,
        }
    }
}
