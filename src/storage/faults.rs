//! Fault injection at the storage seam, for tests: [`Faulty`] wraps a [`Storage`] and, on
//! demand, fails every write as a failing disk does, or holds the record writer's commits as a
//! long write stall does. Production code never builds one; tests hand one to
//! `server::start_with_storage`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::*;

/// The switches of a [`Faulty`] storage.
#[derive(Default)]
pub struct Faults {
    fail_writes: AtomicBool,
    /// Since when writes have been failing (for `/live`).
    failing_since: Mutex<Option<Instant>>,
    stall: Mutex<()>,
}

impl Faults {
    /// While `on`, every write fails with [`StoreError::Injected`] before reaching the backend
    /// — control changes, record batches, outcomes, references, events and `/ready`'s probe
    /// alike — and counts as a failure the backend does not recover from by itself (`/live`).
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::Release);
        if !on {
            *self.failing_since.lock() = None;
        }
    }

    /// While the guard lives, record batches wait before they are committed, as during a long
    /// write stall (the record writer stops with the batch it took).
    pub fn stall_records(&self) -> MutexGuard<'_, ()> {
        self.stall.lock()
    }

    /// A write: refused while writes are failed (the first refusal starts `/live`'s clock, as
    /// the first failed write does in a real store).
    fn write(&self) -> StoreResult<()> {
        if self.fail_writes.load(Ordering::Acquire) {
            self.failing_since.lock().get_or_insert_with(Instant::now);
            Err(StoreError::Injected)
        } else {
            Ok(())
        }
    }
}

/// A storage whose writes fail or stall when its [`Faults`] say so.
pub struct Faulty {
    inner: Storage,
    faults: Arc<Faults>,
}

impl Faulty {
    /// Wraps `inner`; returns the wrapped storage and its switches.
    pub fn wrap(inner: Storage) -> (Storage, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let retention = inner.retention;
        let faulty = Arc::new(Faulty {
            inner,
            faults: faults.clone(),
        });
        (Storage::of(faulty, retention), faults)
    }
}

impl ControlStore for Faulty {
    fn load_state(&self) -> StoreResult<State> {
        self.inner.control.load_state()
    }

    fn write_control(&self, update: &Update) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.control.write_control(update)
    }

    // A shared store's version-checked writes are not faulted: fleet tests stop Redis instead.
    fn shared(&self) -> Option<&dyn crate::storage::SharedControl> {
        self.inner.control.shared()
    }
}

impl RecordLog for Faulty {
    fn commit(&self, writes: RecordWrites, no_slowdown: bool) -> StoreResult<()> {
        drop(self.faults.stall.lock());
        self.faults.write()?;
        self.inner.records.commit(writes, no_slowdown)
    }

    fn finish(&self) -> StoreResult<()> {
        self.inner.records.finish()
    }

    fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> StoreResult<Option<(u64, pb::PredictionRecord)>> {
        self.inner.records.get_prediction(request_id, not_before_ms)
    }

    fn list_predictions(
        &self,
        model: &str,
        version: u32,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
        after: Option<(u64, String)>,
    ) -> StoreResult<PredictionPage> {
        self.inner
            .records
            .list_predictions(model, version, start_ms, end_ms, limit, after)
    }

    fn outcomes_of(&self, request_id: &str) -> StoreResult<Vec<pb::OutcomeRecord>> {
        self.inner.records.outcomes_of(request_id)
    }

    fn get_outcome(
        &self,
        request_id: &str,
        row: u32,
    ) -> StoreResult<Option<(u64, pb::OutcomeRecord)>> {
        self.inner.records.get_outcome(request_id, row)
    }

    fn write_outcome(&self, w: OutcomeWrite<'_>) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.records.write_outcome(w)
    }

    fn recent_judgements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Judgement>> {
        self.inner.records.recent_judgements(model, version, n)
    }
}

impl Tallies for Faulty {
    fn experiment_counts(
        &self,
        experiment: &str,
        variants: &[&str],
    ) -> StoreResult<Vec<VariantCounts>> {
        self.inner.tallies.experiment_counts(experiment, variants)
    }

    fn experiment_units(&self, experiment: &str, variant: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.tallies.experiment_units(experiment, variant)
    }

    fn tally(&self, model: &str, version: u32) -> StoreResult<Tally> {
        self.inner.tallies.tally(model, version)
    }

    fn recent_tally(&self, model: &str, version: u32, n: usize) -> StoreResult<Tally> {
        self.inner.tallies.recent_tally(model, version, n)
    }

    fn shadow_counts(&self, model: &str, version: u32) -> StoreResult<ShadowCounts> {
        self.inner.tallies.shadow_counts(model, version)
    }

    fn shadow_latency(&self, model: &str, version: u32) -> StoreResult<Option<ShadowLatency>> {
        self.inner.tallies.shadow_latency(model, version)
    }

    fn recent_disagreements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Disagreement>> {
        self.inner.tallies.recent_disagreements(model, version, n)
    }
}

impl EventLog for Faulty {
    fn append_event(&self, e: &pb::Event) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.events.append_event(e)
    }

    fn last_event_cursor(&self) -> StoreResult<u64> {
        self.inner.events.last_event_cursor()
    }

    fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<pb::Event>> {
        self.inner.events.events_after(after, limit)
    }

    fn append_next(&self, e: &mut pb::Event, next: u64) -> StoreResult<u64> {
        self.faults.write()?;
        self.inner.events.append_next(e, next)
    }

    fn shared(&self) -> bool {
        self.inner.events.shared()
    }
}

impl FeatureStore for Faulty {
    fn load_feature_defs(&self) -> StoreResult<Vec<FeatureDef>> {
        self.inner.features.load_feature_defs()
    }

    fn put_feature_defs(&self, defs: &[FeatureDef]) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.features.put_feature_defs(defs)
    }

    fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> StoreResult<Vec<Vec<Option<(u64, FeatureValue)>>>> {
        self.inner
            .features
            .get_features(entities, features, as_of_ms)
    }
}

impl DriftStore for Faulty {
    fn put_reference(&self, model: &str, r: &Reference) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.drift.put_reference(model, r)
    }

    fn load_reference(&self, model: &str) -> StoreResult<Option<Reference>> {
        self.inner.drift.load_reference(model)
    }

    fn reference_models(&self) -> StoreResult<Vec<String>> {
        self.inner.drift.reference_models()
    }

    fn put_model_state(&self, model: &str, name: &str, json: &[u8]) -> StoreResult<()> {
        self.faults.write()?;
        self.inner.drift.put_model_state(model, name, json)
    }

    fn get_model_state(&self, model: &str, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.drift.get_model_state(model, name)
    }

    fn model_states(&self) -> StoreResult<Vec<(String, String, Vec<u8>)>> {
        self.inner.drift.model_states()
    }

    fn shared(&self) -> Option<&dyn crate::storage::SharedDrift> {
        self.inner.drift.shared()
    }
}

impl StoreHealth for Faulty {
    fn check(&self) -> Result<(), String> {
        // `/ready`'s probe is a write: it fails while writes are failed.
        self.faults
            .write()
            .map_err(|e| format!("writes are failing: {e}"))?;
        self.inner.health.check()
    }

    fn unrecoverable_write_failure(&self) -> Option<(Duration, String)> {
        match *self.faults.failing_since.lock() {
            Some(since) => Some((since.elapsed(), StoreError::Injected.to_string())),
            None => self.inner.health.unrecoverable_write_failure(),
        }
    }

    fn stats(&self) -> StoreStats {
        self.inner.health.stats()
    }
}
