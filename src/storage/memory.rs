//! Every storage trait in memory: a second implementation of the seam, for tests. Nothing
//! survives the process and nothing is bounded — not for production.
//!
//! It keeps the same meaning as the RocksDB store where the use cases can tell: control writes
//! replace records whole, outcomes replace the row they overwrite and take its judgement back from
//! the tallies, retention hides records older than it at read time, reads of features are
//! point-in-time with TTLs. It does not imitate RocksDB's encodings or its write stalls.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::*;
use crate::clock::SharedClock;
use crate::experiment::Experiment;
use crate::feature_store::visible;
use crate::registry::{ModelMeta, ModelVersion, PromotionPolicy, Registry};
use crate::shadow::Shadow;

/// Counters of a model version's outcomes (signed: a replaced outcome is taken back).
#[derive(Clone, Copy, Debug, Default)]
struct VersionCounters {
    outcomes: i64,
    judged: i64,
    successes: i64,
    regression: i64,
    abs_error: f64,
    sq_error: f64,
}

#[derive(Clone, Debug, Default)]
struct VariantCounters {
    requests: i64,
    outcomes: i64,
    judged: i64,
    successes: i64,
    numeric: (i64, f64, f64),
    units: Option<Vec<u8>>,
}

#[derive(Default)]
struct Inner {
    metas: BTreeMap<String, ModelMeta>,
    versions: BTreeMap<(String, u32), ModelVersion>,
    policies: BTreeMap<String, PromotionPolicy>,
    experiments: BTreeMap<String, Experiment>,
    shadows: BTreeMap<(String, u32), Shadow>,
    predictions: HashMap<String, (u64, pb::PredictionRecord)>,
    /// (model, time, request id) → version.
    prediction_index: BTreeMap<(String, u64, String), u32>,
    outcomes: BTreeMap<(String, u32), (u64, pb::OutcomeRecord)>,
    /// (model, version, time, request id, row) → judgement.
    outcome_index: BTreeMap<(String, u32, u64, String, u32), Judgement>,
    version_counters: HashMap<(String, u32), VersionCounters>,
    variants: HashMap<(String, String), VariantCounters>,
    shadow_counters: HashMap<(String, u32), BTreeMap<String, i64>>,
    shadow_latency: HashMap<(String, u32), ShadowLatency>,
    /// (model, version, time, request id) → disagreement.
    disagreements: BTreeMap<(String, u32, u64, String), Disagreement>,
    events: BTreeMap<u64, pb::Event>,
    feature_defs: BTreeMap<String, FeatureDef>,
    /// (entity, time, sequence) → the row of values written together.
    feature_rows: BTreeMap<(String, u64, u64), Vec<(String, FeatureValue)>>,
    references: BTreeMap<String, Reference>,
    model_state: HashMap<(String, String), Vec<u8>>,
}

/// Everything in memory; see the module documentation.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    clock: SharedClock,
    retention: Retention,
    seq: AtomicU64,
}

impl MemoryStore {
    /// An empty store that reads "now" from `clock` for retention.
    pub fn new(clock: SharedClock, retention: Retention) -> Self {
        MemoryStore {
            inner: Mutex::default(),
            clock,
            retention,
            seq: AtomicU64::new(0),
        }
    }

    /// An empty store as a whole [`Storage`].
    pub fn storage(clock: SharedClock, retention: Retention) -> Storage {
        Storage::of(Arc::new(MemoryStore::new(clock, retention)), retention)
    }

    fn cutoff(&self, keep: Duration) -> u64 {
        cutoff(self.clock.now_ms(), keep)
    }
}

impl ControlStore for MemoryStore {
    fn load_state(&self) -> StoreResult<State> {
        let inner = self.inner.lock();
        Ok(State {
            registry: Registry::from_records(
                inner.metas.values().cloned().collect(),
                inner.versions.values().cloned().collect(),
                inner
                    .policies
                    .iter()
                    .map(|(m, p)| (m.clone(), p.clone()))
                    .collect(),
            ),
            experiments: crate::experiment::Experiments::from_records(
                inner.experiments.values().cloned().collect(),
            ),
            shadows: crate::shadow::Shadows::from_records(
                inner.shadows.values().cloned().collect(),
            ),
        })
    }

    fn write_control(&self, update: &Update) -> StoreResult<()> {
        let mut inner = self.inner.lock();
        let r = &update.registry;
        for m in &r.put_models {
            inner.metas.insert(m.name.clone(), m.clone());
        }
        for v in &r.put_versions {
            inner
                .versions
                .insert((v.model.clone(), v.version), v.clone());
        }
        for (model, version) in &r.delete_versions {
            inner.versions.remove(&(model.clone(), *version));
        }
        for (model, p) in &r.put_policies {
            inner.policies.insert(model.clone(), p.clone());
        }
        for e in &update.experiments {
            inner.experiments.insert(e.name.clone(), e.clone());
        }
        for s in &update.put_shadows {
            inner
                .shadows
                .insert((s.model.clone(), s.version), s.clone());
        }
        for (model, version) in &update.delete_shadows {
            inner.shadows.remove(&(model.clone(), *version));
        }
        Ok(())
    }
}

impl Inner {
    fn apply(&mut self, w: RecordWrite, seq: u64) {
        match w {
            RecordWrite::Prediction { record, time_ms } => {
                // Encoded by this process: it decodes.
                let Ok(message) = record.decode() else { return };
                self.prediction_index.insert(
                    (record.model.clone(), time_ms, record.request_id.clone()),
                    record.version,
                );
                self.predictions
                    .insert(record.request_id, (time_ms, message));
            }
            RecordWrite::Features {
                entity,
                time_ms,
                names,
                values,
            } => {
                let row = names.iter().cloned().zip(values).collect();
                self.feature_rows.insert((entity, time_ms, seq), row);
            }
            RecordWrite::ExperimentRequests {
                experiment,
                variant,
                n,
            } => {
                self.variants
                    .entry((experiment, variant))
                    .or_default()
                    .requests += n as i64;
            }
            RecordWrite::ExperimentUnits {
                experiment,
                variant,
                registers,
            } => {
                self.variants
                    .entry((experiment, variant))
                    .or_default()
                    .units = Some(registers);
            }
            RecordWrite::FeatureDef(def) => {
                self.feature_defs.insert(def.name.clone(), def);
            }
            RecordWrite::ShadowCount {
                model,
                version,
                counter,
                n,
            } => {
                *self
                    .shadow_counters
                    .entry((model, version))
                    .or_default()
                    .entry(counter.key().into_owned())
                    .or_default() += n;
            }
            RecordWrite::ShadowLatency {
                model,
                version,
                latency,
            } => {
                self.shadow_latency
                    .insert((model, version), Arc::unwrap_or_clone(latency));
            }
            RecordWrite::Disagreement {
                model,
                version,
                disagreement,
            } => {
                self.disagreements.insert(
                    (
                        model,
                        version,
                        disagreement.time_ms,
                        disagreement.request_id.clone(),
                    ),
                    disagreement,
                );
            }
        }
    }
}

impl RecordLog for MemoryStore {
    fn commit(&self, writes: RecordWrites, _no_slowdown: bool) -> StoreResult<()> {
        let mut inner = self.inner.lock();
        for w in writes.writes {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            inner.apply(w, seq);
        }
        Ok(())
    }

    fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> StoreResult<Option<(u64, pb::PredictionRecord)>> {
        let retained = self.cutoff(self.retention.predictions);
        Ok(self
            .inner
            .lock()
            .predictions
            .get(request_id)
            .filter(|(t, _)| *t >= not_before_ms.max(retained))
            .cloned())
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
        let retained = self.cutoff(self.retention.predictions);
        let inner = self.inner.lock();
        let lower = (model.to_string(), start_ms.max(retained), String::new());
        let upper = match &after {
            Some((t, id)) => (model.to_string(), *t, id.clone()),
            None => (model.to_string(), end_ms, String::new()),
        };
        let mut page = PredictionPage::default();
        for ((_, time, id), v) in inner.prediction_index.range(lower..upper).rev() {
            if *time >= end_ms || (version != 0 && *v != version) {
                continue;
            }
            if page.records.len() == limit {
                page.next = page.records.last().and_then(|r| {
                    Some((
                        inner.predictions.get(&r.request_id)?.0,
                        r.request_id.clone(),
                    ))
                });
                break;
            }
            if let Some((_, rec)) = inner
                .predictions
                .get(id)
                .filter(|(t, r)| *t == *time && r.model == model)
            {
                page.records.push(rec.clone());
            }
        }
        Ok(page)
    }

    fn outcomes_of(&self, request_id: &str) -> StoreResult<Vec<pb::OutcomeRecord>> {
        let retained = self.cutoff(self.retention.outcomes);
        Ok(self
            .inner
            .lock()
            .outcomes
            .range((request_id.to_string(), 0)..=(request_id.to_string(), u32::MAX))
            .filter(|(_, (t, _))| *t >= retained)
            .map(|(_, (_, o))| o.clone())
            .collect())
    }

    fn get_outcome(
        &self,
        request_id: &str,
        row: u32,
    ) -> StoreResult<Option<(u64, pb::OutcomeRecord)>> {
        let retained = self.cutoff(self.retention.outcomes);
        Ok(self
            .inner
            .lock()
            .outcomes
            .get(&(request_id.to_string(), row))
            .filter(|(t, _)| *t >= retained)
            .cloned())
    }

    fn write_outcome(&self, w: OutcomeWrite<'_>) -> StoreResult<()> {
        let OutcomeWrite {
            outcome,
            time_ms,
            judgement,
            replaced,
            counted,
        } = w;
        let mut inner = self.inner.lock();
        inner.outcomes.insert(
            (outcome.request_id.clone(), outcome.row),
            (time_ms, outcome.clone()),
        );
        let mut delta = crate::outcome::TallyDelta::of(judgement);
        if let Some((old_time, old, old_judgement)) = &replaced {
            inner.outcome_index.remove(&(
                old.model.clone(),
                old.version,
                *old_time,
                old.request_id.clone(),
                old.row,
            ));
            delta = delta.plus(crate::outcome::TallyDelta::of(old_judgement).negate());
        }
        inner.outcome_index.insert(
            (
                outcome.model.clone(),
                outcome.version,
                time_ms,
                outcome.request_id.clone(),
                outcome.row,
            ),
            *judgement,
        );
        let c = inner
            .version_counters
            .entry((outcome.model.clone(), outcome.version))
            .or_default();
        c.outcomes += delta.outcomes;
        c.judged += delta.judged;
        c.successes += delta.successes;
        c.regression += delta.regression;
        c.abs_error += delta.abs_error;
        c.sq_error += delta.sq_error;
        if counted && !outcome.experiment.is_empty() {
            let v = inner
                .variants
                .entry((outcome.experiment.clone(), outcome.variant.clone()))
                .or_default();
            v.outcomes += delta.outcomes;
            v.judged += delta.judged;
            v.successes += delta.successes;
            if let Some(x) = actual_number(outcome) {
                v.numeric = crate::stats::combine_signed_moments(v.numeric, (1, x, 0.0));
            }
            if let Some(x) = replaced.as_ref().and_then(|(_, old, _)| actual_number(old)) {
                v.numeric = crate::stats::combine_signed_moments(v.numeric, (-1, x, 0.0));
            }
        }
        Ok(())
    }

    fn recent_judgements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Judgement>> {
        let retained = self.cutoff(self.retention.outcomes);
        let lower = (model.to_string(), version, retained, String::new(), 0);
        let upper = (model.to_string(), version, u64::MAX, String::new(), 0);
        Ok(self
            .inner
            .lock()
            .outcome_index
            .range(lower..upper)
            .rev()
            .take(n)
            .map(|(_, j)| *j)
            .collect())
    }
}

impl Tallies for MemoryStore {
    fn experiment_counts(
        &self,
        experiment: &str,
        variants: &[&str],
    ) -> StoreResult<Vec<VariantCounts>> {
        let inner = self.inner.lock();
        Ok(variants
            .iter()
            .map(|v| {
                let c = inner
                    .variants
                    .get(&(experiment.to_string(), v.to_string()))
                    .cloned()
                    .unwrap_or_default();
                let (n, mean, m2) = c.numeric;
                VariantCounts {
                    requests: c.requests.max(0) as u64,
                    units: c
                        .units
                        .as_deref()
                        .map_or(0, crate::experiment::unit_estimate_registers),
                    outcomes: c.outcomes.max(0) as u64,
                    judged: c.judged.max(0) as u64,
                    successes: c.successes.max(0) as u64,
                    numeric: crate::stats::Moments {
                        n: n.max(0) as u64,
                        mean,
                        m2,
                    },
                }
            })
            .collect())
    }

    fn experiment_units(&self, experiment: &str, variant: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .inner
            .lock()
            .variants
            .get(&(experiment.to_string(), variant.to_string()))
            .and_then(|c| c.units.clone()))
    }

    fn tally(&self, model: &str, version: u32) -> StoreResult<Tally> {
        let c = self
            .inner
            .lock()
            .version_counters
            .get(&(model.to_string(), version))
            .copied()
            .unwrap_or_default();
        Ok(Tally {
            outcomes: c.outcomes.max(0) as u64,
            judged: c.judged.max(0) as u64,
            successes: c.successes.max(0) as u64,
            regression: c.regression.max(0) as u64,
            abs_error: c.abs_error,
            sq_error: c.sq_error,
        })
    }

    fn recent_tally(&self, model: &str, version: u32, n: usize) -> StoreResult<Tally> {
        let mut t = Tally::default();
        for j in self.recent_judgements(model, version, n)? {
            t.add(&j);
        }
        Ok(t)
    }

    fn shadow_counts(&self, model: &str, version: u32) -> StoreResult<ShadowCounts> {
        let mut c = ShadowCounts::default();
        if let Some(counters) = self
            .inner
            .lock()
            .shadow_counters
            .get(&(model.to_string(), version))
        {
            for (key, n) in counters {
                c.add_stored(key, (*n).max(0) as u64);
            }
        }
        Ok(c)
    }

    fn shadow_latency(&self, model: &str, version: u32) -> StoreResult<Option<ShadowLatency>> {
        Ok(self
            .inner
            .lock()
            .shadow_latency
            .get(&(model.to_string(), version))
            .cloned())
    }

    fn recent_disagreements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Disagreement>> {
        let retained = self.cutoff(self.retention.predictions);
        let lower = (model.to_string(), version, retained, String::new());
        let upper = (model.to_string(), version, u64::MAX, String::new());
        Ok(self
            .inner
            .lock()
            .disagreements
            .range(lower..upper)
            .rev()
            .take(n)
            .map(|(_, d)| d.clone())
            .collect())
    }
}

impl EventLog for MemoryStore {
    fn append_event(&self, e: &pb::Event) -> StoreResult<()> {
        self.inner.lock().events.insert(e.cursor, e.clone());
        Ok(())
    }

    fn last_event_cursor(&self) -> StoreResult<u64> {
        Ok(self
            .inner
            .lock()
            .events
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0))
    }

    fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<pb::Event>> {
        Ok(self
            .inner
            .lock()
            .events
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl FeatureStore for MemoryStore {
    fn load_feature_defs(&self) -> StoreResult<Vec<FeatureDef>> {
        Ok(self.inner.lock().feature_defs.values().cloned().collect())
    }

    fn put_feature_defs(&self, defs: &[FeatureDef]) -> StoreResult<()> {
        let mut inner = self.inner.lock();
        for d in defs {
            inner.feature_defs.insert(d.name.clone(), d.clone());
        }
        Ok(())
    }

    fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> StoreResult<Vec<Vec<Option<(u64, FeatureValue)>>>> {
        let retained = self.cutoff(self.retention.features);
        let inner = self.inner.lock();
        Ok(entities
            .iter()
            .map(|entity| {
                let rows = inner
                    .feature_rows
                    .range((entity.clone(), 0, 0)..=(entity.clone(), as_of_ms, u64::MAX))
                    .rev();
                let mut found: Vec<Option<(u64, FeatureValue)>> = vec![None; features.len()];
                for ((_, t, _), values) in rows {
                    for (i, (name, _)) in features.iter().enumerate() {
                        if found[i].is_none() {
                            if let Some((_, v)) = values.iter().find(|(n, _)| n == name) {
                                found[i] = Some((*t, v.clone()));
                            }
                        }
                    }
                    if found.iter().all(Option::is_some) {
                        break;
                    }
                }
                for (f, (_, ttl)) in found.iter_mut().zip(features) {
                    if f.as_ref()
                        .is_some_and(|(t, _)| *t < retained || !visible(*t, as_of_ms, *ttl))
                    {
                        *f = None;
                    }
                }
                found
            })
            .collect())
    }
}

impl DriftStore for MemoryStore {
    fn put_reference(&self, model: &str, r: &Reference) -> StoreResult<()> {
        let mut inner = self.inner.lock();
        inner
            .model_state
            .remove(&(model.to_string(), "drift".to_string()));
        inner.references.insert(model.to_string(), r.clone());
        Ok(())
    }

    fn load_reference(&self, model: &str) -> StoreResult<Option<Reference>> {
        Ok(self.inner.lock().references.get(model).cloned())
    }

    fn reference_models(&self) -> StoreResult<Vec<String>> {
        Ok(self.inner.lock().references.keys().cloned().collect())
    }

    fn put_model_state(&self, model: &str, name: &str, json: &[u8]) -> StoreResult<()> {
        self.inner
            .lock()
            .model_state
            .insert((model.to_string(), name.to_string()), json.to_vec());
        Ok(())
    }

    fn get_model_state(&self, model: &str, name: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .inner
            .lock()
            .model_state
            .get(&(model.to_string(), name.to_string()))
            .cloned())
    }
}

impl StoreHealth for MemoryStore {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    fn unrecoverable_write_failure(&self) -> Option<(Duration, String)> {
        None
    }

    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}
