//! Records in RocksDB: predictions and their time index, outcomes with their index and the
//! per-version counters, and the online feature store.
//!
//! | family | key | value |
//! |---|---|---|
//! | `predictions` | request id | time ‖ `PredictionRecord` |
//! | `prediction_index` | model ∅ time ‖ request id | version |
//! | `outcomes` | request id ∅ row | time ‖ `OutcomeRecord` |
//! | `outcome_index` | model ∅ version ‖ time ‖ request id ∅ row | judgement (flags, error) |
//! | `counters` | `v` model ∅ version ‖ name | tagged i64 / f64, merged by addition |
//! | `features` | entity ∅ feature ∅ ¬time | `FeatureValue` |
//! | `features_latest` | entity | newest time ‖ every feature's newest (time, value), merged per feature |
//! | `feature_defs` | name | JSON `FeatureDef` |

use std::time::Duration;

use prost::Message;
use rocksdb::{Direction, IteratorMode, MergeOperands, WriteBatch, WriteOptions};

use super::{cf, keys, Store, StoreError};
use crate::experiment::VariantCounts;
use crate::feature_store::{self, FeatureDef};
use crate::outcome::{Judgement, Tally, TallyDelta};
use crate::pb::modelgate::v1 as pb;
use crate::record::FeatureValue;
use crate::stats::Moments;

/// How long records are kept, per family group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Prediction records and their index.
    pub predictions: Duration,
    /// Outcomes and their index (the counters are kept forever).
    pub outcomes: Duration,
    /// Feature values (history and latest).
    pub features: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        let week = Duration::from_secs(7 * 24 * 3600);
        Retention {
            predictions: week,
            outcomes: week,
            features: week,
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The oldest time still retained.
pub fn cutoff(retention: Duration) -> u64 {
    now_ms().saturating_sub(retention.as_millis() as u64)
}

fn decode_err(family: &'static str, key: String) -> impl FnOnce(prost::DecodeError) -> StoreError {
    move |e| StoreError::Decode {
        family,
        key,
        reason: e.to_string(),
    }
}

const COUNTERS: [&str; 6] = [
    "outcomes",
    "judged",
    "successes",
    "regression",
    "abs_error",
    "sq_error",
];

pub(super) fn int_counter(v: i64) -> [u8; 9] {
    let mut b = [b'i'; 9];
    b[1..].copy_from_slice(&v.to_le_bytes());
    b
}

fn float_counter(v: f64) -> [u8; 9] {
    let mut b = [b'f'; 9];
    b[1..].copy_from_slice(&v.to_le_bytes());
    b
}

/// A numeric-outcome moments operand: tag 'w', n (i64, negative to take observations back),
/// mean, M2.
fn moments_counter(n: i64, mean: f64, m2: f64) -> [u8; 25] {
    let mut b = [b'w'; 25];
    b[1..9].copy_from_slice(&n.to_le_bytes());
    b[9..17].copy_from_slice(&mean.to_le_bytes());
    b[17..].copy_from_slice(&m2.to_le_bytes());
    b
}

pub(super) enum Counter {
    Int(i64),
    Float(f64),
    Moments(i64, f64, f64),
}

pub(super) fn parse_counter(v: &[u8]) -> Option<Counter> {
    let le = |b: &[u8]| -> Option<[u8; 8]> { b.try_into().ok() };
    match (v.first()?, v.len()) {
        (b'i', 9) => Some(Counter::Int(i64::from_le_bytes(le(&v[1..])?))),
        (b'f', 9) => Some(Counter::Float(f64::from_le_bytes(le(&v[1..])?))),
        (b'w', 25) => Some(Counter::Moments(
            i64::from_le_bytes(le(&v[1..9])?),
            f64::from_le_bytes(le(&v[9..17])?),
            f64::from_le_bytes(le(&v[17..])?),
        )),
        _ => None,
    }
}

/// Chan et al.'s combination of (n, mean, M2); with a negative n it removes observations.
fn combine_moments(a: (i64, f64, f64), b: (i64, f64, f64)) -> (i64, f64, f64) {
    let n = a.0 + b.0;
    if n == 0 {
        return (0, 0.0, 0.0);
    }
    if a.0 == 0 {
        return b;
    }
    let delta = b.1 - a.1;
    let mean = a.1 + delta * b.0 as f64 / n as f64;
    let m2 = a.2 + b.2 + delta * delta * a.0 as f64 * b.0 as f64 / n as f64;
    (n, mean, m2.max(0.0))
}

/// Merge operator of `counters`: adds tagged integers or floats, and combines tagged moments.
/// A malformed operand is skipped rather than poisoning the counter.
pub(super) fn add_counters(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let mut int: Option<i64> = None;
    let mut float: Option<f64> = None;
    let mut moments: Option<(i64, f64, f64)> = None;
    for v in existing.into_iter().chain(operands.iter()) {
        match parse_counter(v) {
            Some(Counter::Int(i)) => int = Some(int.unwrap_or(0).wrapping_add(i)),
            Some(Counter::Float(f)) => float = Some(float.unwrap_or(0.0) + f),
            Some(Counter::Moments(n, mean, m2)) => {
                moments = Some(combine_moments(
                    moments.unwrap_or((0, 0.0, 0.0)),
                    (n, mean, m2),
                ))
            }
            None => {}
        }
    }
    match (int, float, moments) {
        (_, _, Some((n, mean, m2))) => Some(moments_counter(n, mean, m2).to_vec()),
        (_, Some(f), None) => Some(float_counter(f).to_vec()),
        (Some(i), None, None) => Some(int_counter(i).to_vec()),
        (None, None, None) => existing.map(<[u8]>::to_vec),
    }
}

/// One feature's newest value in an entity's `features_latest` record.
#[derive(Clone, PartialEq, prost::Message)]
struct LatestEntry {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint64, tag = "2")]
    time_ms: u64,
    #[prost(message, optional, tag = "3")]
    value: Option<pb::FeatureValue>,
}

/// An entity's `features_latest` record: entries sorted by feature name.
#[derive(Clone, PartialEq, prost::Message)]
struct LatestFeatures {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<LatestEntry>,
}

impl LatestFeatures {
    /// Keeps, per feature, the entry with the newest time (the later one on ties).
    fn absorb(&mut self, other: LatestFeatures) {
        for e in other.entries {
            match self.entries.binary_search_by(|x| x.name.cmp(&e.name)) {
                Ok(i) if self.entries[i].time_ms <= e.time_ms => self.entries[i] = e,
                Ok(_) => {}
                Err(i) => self.entries.insert(i, e),
            }
        }
    }

    fn get(&self, name: &str) -> Option<&LatestEntry> {
        self.entries
            .binary_search_by(|x| x.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Encoded with the newest time in front, for the retention filter.
    fn to_value(&self) -> Vec<u8> {
        let newest = self.entries.iter().map(|e| e.time_ms).max().unwrap_or(0);
        keys::timed_value(newest, &self.encode_to_vec())
    }

    fn from_value(v: &[u8]) -> Option<LatestFeatures> {
        let (_, body) = keys::split_timed_value(cf::FEATURES_LATEST, v).ok()?;
        LatestFeatures::decode(body).ok()
    }
}

/// Merge operator of `features_latest`: per feature, the value with the newest time wins, so a
/// late write of an old value never hides a newer one and no write needs a read first.
pub(super) fn keep_newest(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let mut acc = LatestFeatures::default();
    for v in existing.into_iter().chain(operands.iter()) {
        if let Some(l) = LatestFeatures::from_value(v) {
            acc.absorb(l);
        }
    }
    Some(acc.to_value())
}

/// The judgement stored in `outcome_index`: flags (has success, success, has error), error (f64 LE).
fn encode_judgement(j: &Judgement) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0] = u8::from(j.success.is_some())
        | (u8::from(j.success == Some(true)) << 1)
        | (u8::from(j.error.is_some()) << 2);
    b[1..].copy_from_slice(&j.error.unwrap_or(0.0).to_le_bytes());
    b
}

fn decode_judgement(v: &[u8]) -> Option<Judgement> {
    if v.len() != 9 {
        return None;
    }
    let e = f64::from_le_bytes(v[1..].try_into().ok()?);
    Some(Judgement {
        success: (v[0] & 1 != 0).then_some(v[0] & 2 != 0),
        error: (v[0] & 4 != 0).then_some(e),
    })
}

/// Converts a feature value to its protobuf.
pub fn feature_value_to_pb(v: &FeatureValue) -> pb::FeatureValue {
    pb::FeatureValue {
        kind: Some(match v {
            FeatureValue::Number(x) => pb::feature_value::Kind::Number(*x),
            FeatureValue::Text(s) => pb::feature_value::Kind::Text(s.clone()),
        }),
    }
}

/// Converts a stored feature value back.
pub fn feature_value_from_pb(v: pb::FeatureValue) -> Option<FeatureValue> {
    match v.kind? {
        pb::feature_value::Kind::Number(x) => Some(FeatureValue::Number(x)),
        pb::feature_value::Kind::Text(s) => Some(FeatureValue::Text(s)),
    }
}

/// Many records written as one `WriteBatch` (WAL on, not synced: a process crash loses nothing
/// committed; a power loss may lose the last moments).
pub struct RecordBatch<'s> {
    pub(super) store: &'s Store,
    pub(super) batch: WriteBatch,
    records: usize,
}

impl RecordBatch<'_> {
    /// Adds a prediction record and its index entry.
    pub fn add_prediction(&mut self, rec: &pb::PredictionRecord, time_ms: u64) {
        self.batch.put_cf(
            self.store.cf(cf::PREDICTIONS),
            keys::prediction_key(&rec.request_id),
            keys::timed_value(time_ms, &rec.encode_to_vec()),
        );
        self.batch.put_cf(
            self.store.cf(cf::PREDICTION_INDEX),
            keys::prediction_index_key(&rec.model, time_ms, &rec.request_id),
            rec.version.to_be_bytes(),
        );
        self.records += 1;
    }

    /// Adds feature values of one entity at one time (history, and one merge into latest).
    pub fn add_features<'a>(
        &mut self,
        entity: &str,
        time_ms: u64,
        values: impl IntoIterator<Item = (&'a str, &'a FeatureValue)>,
    ) {
        // One row (names and values, sorted by name) for the history and the same entries,
        // timed, merged into the entity's latest values.
        let mut row = LatestFeatures::default();
        for (feature, value) in values {
            row.absorb(LatestFeatures {
                entries: vec![LatestEntry {
                    name: feature.to_string(),
                    time_ms: 0,
                    value: Some(feature_value_to_pb(value)),
                }],
            });
        }
        if row.entries.is_empty() {
            return;
        }
        let seq = self
            .store
            .row_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.batch.put_cf(
            self.store.cf(cf::FEATURES),
            keys::feature_row_key(entity, time_ms, seq),
            row.encode_to_vec(),
        );
        for e in &mut row.entries {
            e.time_ms = time_ms;
        }
        self.batch.merge_cf(
            self.store.cf(cf::FEATURES_LATEST),
            keys::feature_entity_key(entity),
            row.to_value(),
        );
    }

    /// Counts `n` requests of an experiment variant.
    pub fn add_experiment_requests(&mut self, experiment: &str, variant: &str, n: u64) {
        self.batch.merge_cf(
            self.store.cf(cf::COUNTERS),
            keys::experiment_counter_key(experiment, variant, "requests"),
            int_counter(n as i64),
        );
    }

    /// Stores the distinct-unit sketch (HyperLogLog registers) of an experiment variant.
    pub fn put_experiment_units(&mut self, experiment: &str, variant: &str, registers: &[u8]) {
        let mut v = Vec::with_capacity(registers.len() + 1);
        v.push(b'h');
        v.extend_from_slice(registers);
        self.batch.put_cf(
            self.store.cf(cf::COUNTERS),
            keys::experiment_counter_key(experiment, variant, "units"),
            v,
        );
    }

    /// Adds a feature definition.
    pub fn add_feature_def(&mut self, def: &FeatureDef) {
        self.batch.put_cf(
            self.store.cf(cf::FEATURE_DEFS),
            def.name.as_bytes(),
            serde_json::to_vec(def).expect("feature definitions serialise"),
        );
    }

    /// Prediction records in the batch.
    pub fn len(&self) -> usize {
        self.records
    }

    /// True when no prediction was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Commits the batch. `no_slowdown` makes RocksDB fail instead of stalling the writer.
    pub fn commit(self, no_slowdown: bool) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_no_slowdown(no_slowdown);
        self.store.write_opt(self.batch, &wo)
    }
}

/// A page of prediction records.
pub struct PredictionPage {
    /// Records with their time, newest first.
    pub records: Vec<pb::PredictionRecord>,
    /// Where the next page starts, if there is one.
    pub next: Option<(u64, String)>,
}

impl Store {
    /// Starts a batch of records.
    pub fn record_batch(&self) -> RecordBatch<'_> {
        RecordBatch {
            store: self,
            batch: WriteBatch::default(),
            records: 0,
        }
    }

    /// One prediction record with its time, unless unknown or older than `not_before_ms`.
    pub fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> Result<Option<(u64, pb::PredictionRecord)>, StoreError> {
        let Some(v) = self
            .db
            .get_pinned_cf(self.cf(cf::PREDICTIONS), keys::prediction_key(request_id))?
        else {
            return Ok(None);
        };
        let (time, body) = keys::split_timed_value(cf::PREDICTIONS, &v)?;
        if time < not_before_ms {
            return Ok(None);
        }
        let rec = pb::PredictionRecord::decode(body)
            .map_err(decode_err(cf::PREDICTIONS, request_id.to_string()))?;
        Ok(Some((time, rec)))
    }

    /// Records of `model` (and `version`, unless 0) with `start_ms <= time < end_ms`, newest first,
    /// starting strictly after `after` (a previous page's last entry).
    pub fn list_predictions(
        &self,
        model: &str,
        version: u32,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
        after: Option<(u64, String)>,
    ) -> Result<PredictionPage, StoreError> {
        let prefix = keys::prediction_index_prefix(model);
        let from = match &after {
            Some((t, id)) => keys::prediction_index_key(model, *t, id),
            None => keys::prediction_index_key(model, end_ms, ""),
        };
        let mut ids = Vec::new();
        let mut next = None;
        let iter = self.db.iterator_cf(
            self.cf(cf::PREDICTION_INDEX),
            IteratorMode::From(&from, Direction::Reverse),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if k.as_ref() == from.as_slice() {
                continue; // the page token's own entry, or an entry exactly at end_ms
            }
            let (_, time, id) = keys::decode_prediction_index_key(&k)?;
            if time < start_ms {
                break;
            }
            if time >= end_ms {
                continue;
            }
            let v: [u8; 4] = v.as_ref().try_into().map_err(|_| StoreError::Decode {
                family: cf::PREDICTION_INDEX,
                key: id.clone(),
                reason: "version is not 4 bytes".into(),
            })?;
            if version != 0 && u32::from_be_bytes(v) != version {
                continue;
            }
            if ids.len() == limit {
                next = ids.last().cloned();
                break;
            }
            ids.push((time, id));
        }
        let mut records = Vec::with_capacity(ids.len());
        for (_, id) in &ids {
            // An index entry whose record is gone (retention, or a re-used request id) is skipped.
            if let Some((_, rec)) = self.get_prediction(id, 0)? {
                if rec.model == model {
                    records.push(rec);
                }
            }
        }
        Ok(PredictionPage { records, next })
    }

    /// Every outcome of a request, by row.
    pub fn outcomes_of(&self, request_id: &str) -> Result<Vec<pb::OutcomeRecord>, StoreError> {
        let prefix = keys::outcome_prefix(request_id);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(cf::OUTCOMES),
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let (_, body) = keys::split_timed_value(cf::OUTCOMES, &v)?;
            out.push(
                pb::OutcomeRecord::decode(body)
                    .map_err(decode_err(cf::OUTCOMES, request_id.to_string()))?,
            );
        }
        Ok(out)
    }

    /// The outcome of one row, with its time.
    pub fn get_outcome(
        &self,
        request_id: &str,
        row: u32,
    ) -> Result<Option<(u64, pb::OutcomeRecord)>, StoreError> {
        let Some(v) = self
            .db
            .get_pinned_cf(self.cf(cf::OUTCOMES), keys::outcome_key(request_id, row))?
        else {
            return Ok(None);
        };
        let (time, body) = keys::split_timed_value(cf::OUTCOMES, &v)?;
        let rec = pb::OutcomeRecord::decode(body)
            .map_err(decode_err(cf::OUTCOMES, request_id.to_string()))?;
        Ok(Some((time, rec)))
    }

    /// Writes an outcome, its index entry and the counter changes in one batch; `replaced` is the
    /// outcome it overwrites (time, record, judgement), whose contribution is taken back.
    ///
    /// When the prediction was a counted experiment observation (`counted`), the experiment
    /// variant's counters (outcomes, judged, successes, numeric moments of `number`) change in the
    /// same batch.
    pub fn write_outcome(
        &self,
        outcome: &pb::OutcomeRecord,
        time_ms: u64,
        judgement: &Judgement,
        replaced: Option<(u64, &pb::OutcomeRecord, Judgement)>,
        counted: bool,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let idx = self.cf(cf::OUTCOME_INDEX);
        batch.put_cf(
            self.cf(cf::OUTCOMES),
            keys::outcome_key(&outcome.request_id, outcome.row),
            keys::timed_value(time_ms, &outcome.encode_to_vec()),
        );
        batch.put_cf(
            idx,
            keys::outcome_index_key(
                &outcome.model,
                outcome.version,
                time_ms,
                &outcome.request_id,
                outcome.row,
            ),
            encode_judgement(judgement),
        );
        let mut delta = TallyDelta::of(judgement);
        if let Some((old_time, old, old_judgement)) = replaced {
            if old_time != time_ms {
                batch.delete_cf(
                    idx,
                    keys::outcome_index_key(
                        &old.model,
                        old.version,
                        old_time,
                        &old.request_id,
                        old.row,
                    ),
                );
            }
            delta = delta.plus(TallyDelta::of(&old_judgement).negate());
        }
        let counters = self.cf(cf::COUNTERS);
        let key = |name| keys::version_counter_key(&outcome.model, outcome.version, name);
        let ints = [
            delta.outcomes,
            delta.judged,
            delta.successes,
            delta.regression,
        ];
        for (name, v) in COUNTERS.iter().zip(ints) {
            if v != 0 {
                batch.merge_cf(counters, key(name), int_counter(v));
            }
        }
        for (name, v) in COUNTERS[4..].iter().zip([delta.abs_error, delta.sq_error]) {
            if v != 0.0 {
                batch.merge_cf(counters, key(name), float_counter(v));
            }
        }
        if counted && !outcome.experiment.is_empty() {
            let key =
                |name| keys::experiment_counter_key(&outcome.experiment, &outcome.variant, name);
            let ints = [delta.outcomes, delta.judged, delta.successes];
            for (name, v) in ["outcomes", "judged", "successes"].into_iter().zip(ints) {
                if v != 0 {
                    batch.merge_cf(counters, key(name), int_counter(v));
                }
            }
            if let Some(x) = actual_number(outcome) {
                batch.merge_cf(counters, key("numeric"), moments_counter(1, x, 0.0));
            }
            if let Some((_, old, _)) = replaced {
                if let Some(x) = actual_number(old) {
                    batch.merge_cf(counters, key("numeric"), moments_counter(-1, x, 0.0));
                }
            }
        }
        self.write(batch, false)
    }

    /// The counters of an experiment's variants, in the order given.
    pub fn experiment_counts(
        &self,
        experiment: &str,
        variants: &[&str],
    ) -> Result<Vec<VariantCounts>, StoreError> {
        const NAMES: [&str; 6] = [
            "requests",
            "units",
            "outcomes",
            "judged",
            "successes",
            "numeric",
        ];
        let keys: Vec<Vec<u8>> = variants
            .iter()
            .flat_map(|v| {
                NAMES
                    .iter()
                    .map(move |n| keys::experiment_counter_key(experiment, v, n))
            })
            .collect();
        let values = self
            .db
            .batched_multi_get_cf(self.cf(cf::COUNTERS), keys.iter(), false);
        let mut out = vec![VariantCounts::default(); variants.len()];
        for (i, v) in values.into_iter().enumerate() {
            let Some(v) = v? else { continue };
            let c = &mut out[i / NAMES.len()];
            let int = |v: &[u8]| match parse_counter(v) {
                Some(Counter::Int(n)) => n.max(0) as u64,
                _ => 0,
            };
            match NAMES[i % NAMES.len()] {
                "requests" => c.requests = int(&v),
                "units" => c.units = unit_estimate(&v),
                "outcomes" => c.outcomes = int(&v),
                "judged" => c.judged = int(&v),
                "successes" => c.successes = int(&v),
                _ => {
                    if let Some(Counter::Moments(n, mean, m2)) = parse_counter(&v) {
                        c.numeric = Moments {
                            n: n.max(0) as u64,
                            mean,
                            m2,
                        };
                    }
                }
            }
        }
        Ok(out)
    }

    /// The stored distinct-unit sketch registers of an experiment variant.
    pub fn experiment_units(
        &self,
        experiment: &str,
        variant: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.db.get_cf(
            self.cf(cf::COUNTERS),
            keys::experiment_counter_key(experiment, variant, "units"),
        )?;
        Ok(v.and_then(|v| (v.first() == Some(&b'h')).then(|| v[1..].to_vec())))
    }

    /// All-time figures of a model version, from the counters.
    pub fn tally(&self, model: &str, version: u32) -> Result<Tally, StoreError> {
        let counters = self.cf(cf::COUNTERS);
        let keys: Vec<Vec<u8>> = COUNTERS
            .iter()
            .map(|n| keys::version_counter_key(model, version, n))
            .collect();
        let values = self.db.batched_multi_get_cf(counters, keys.iter(), false);
        let mut ints = [0u64; 4];
        let mut floats = [0f64; 2];
        for (i, v) in values.into_iter().enumerate() {
            match v?.as_deref().and_then(parse_counter) {
                Some(Counter::Int(n)) if i < 4 => ints[i] = n.max(0) as u64,
                Some(Counter::Float(f)) if i >= 4 => floats[i - 4] = f,
                _ => {}
            }
        }
        Ok(Tally {
            outcomes: ints[0],
            judged: ints[1],
            successes: ints[2],
            regression: ints[3],
            abs_error: floats[0],
            sq_error: floats[1],
        })
    }

    /// Figures over the most recent `n` retained outcomes of a model version.
    pub fn recent_tally(&self, model: &str, version: u32, n: usize) -> Result<Tally, StoreError> {
        let mut t = Tally::default();
        for j in self.recent_judgements(model, version, n)? {
            t.add(&j);
        }
        Ok(t)
    }

    /// The judgements of the most recent `n` retained outcomes of a model version, newest first.
    pub fn recent_judgements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> Result<Vec<Judgement>, StoreError> {
        let prefix = keys::outcome_index_prefix(model, version);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&[0xff; 9]);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(cf::OUTCOME_INDEX),
            IteratorMode::From(&upper, Direction::Reverse),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= n {
                break;
            }
            if let Some(j) = decode_judgement(&v) {
                out.push(j);
            }
        }
        Ok(out)
    }

    /// Every feature definition.
    pub fn load_feature_defs(&self) -> Result<Vec<FeatureDef>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::FEATURE_DEFS), IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| StoreError::Value {
                    family: cf::FEATURE_DEFS,
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Writes feature definitions durably (synced): they are configuration.
    pub fn put_feature_defs(&self, defs: &[FeatureDef]) -> Result<(), StoreError> {
        let mut b = self.record_batch();
        for d in defs {
            b.add_feature_def(d);
        }
        self.write(b.batch, true)
    }

    /// Point-in-time feature reads: for each entity, for each `(feature, ttl)`, the latest value at
    /// or before `as_of_ms` with its time, or `None` (never seen, only newer values, or expired).
    #[allow(clippy::type_complexity)]
    pub fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> Result<Vec<Vec<Option<(u64, FeatureValue)>>>, StoreError> {
        let retained = cutoff(self.retention.features);
        // One batched, sorted multi-get of the entities' latest records: each holds every
        // feature's newest value, so most reads ("as of now") need nothing else.
        let mut order: Vec<(Vec<u8>, usize)> = entities
            .iter()
            .enumerate()
            .map(|(i, e)| (keys::feature_entity_key(e), i))
            .collect();
        order.sort_unstable();
        let values = self.db.batched_multi_get_cf(
            self.cf(cf::FEATURES_LATEST),
            order.iter().map(|(k, _)| k),
            true,
        );
        let mut latest: Vec<Option<LatestFeatures>> = vec![None; entities.len()];
        for ((_, i), v) in order.iter().zip(values) {
            latest[*i] = v?.and_then(|v| LatestFeatures::from_value(&v));
        }
        let mut history = self.db.raw_iterator_cf(self.cf(cf::FEATURES));
        let mut out = Vec::with_capacity(entities.len());
        for (entity, latest) in entities.iter().zip(latest) {
            let mut row: Vec<Option<(u64, FeatureValue)>> = Vec::with_capacity(features.len());
            let mut older = Vec::new();
            for (i, (feature, _)) in features.iter().enumerate() {
                row.push(match latest.as_ref().and_then(|l| l.get(feature)) {
                    None => None,
                    Some(e) if e.time_ms <= as_of_ms => e
                        .value
                        .clone()
                        .and_then(feature_value_from_pb)
                        .map(|v| (e.time_ms, v)),
                    Some(_) => {
                        // The newest value is from after as_of: look back in the history.
                        older.push(i);
                        None
                    }
                });
            }
            if !older.is_empty() {
                self.look_back(
                    &mut history,
                    entity,
                    features,
                    as_of_ms,
                    retained,
                    older,
                    &mut row,
                )?;
            }
            for (found, (_, ttl)) in row.iter_mut().zip(features) {
                if found.as_ref().is_some_and(|(t, _)| {
                    *t < retained || !feature_store::visible(*t, as_of_ms, *ttl)
                }) {
                    *found = None;
                }
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Fills `row[i]` for each `i` in `wanted` with the feature's value in the newest of
    /// `entity`'s rows at or before `as_of_ms`: rows are read newest first until every wanted
    /// feature is found or nothing older could be returned (retention, TTLs).
    #[allow(clippy::too_many_arguments)]
    fn look_back(
        &self,
        history: &mut rocksdb::DBRawIterator<'_>,
        entity: &str,
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
        retained: u64,
        mut wanted: Vec<usize>,
        row: &mut [Option<(u64, FeatureValue)>],
    ) -> Result<(), StoreError> {
        let prefix = keys::feature_row_prefix(entity);
        history.seek(keys::feature_row_key(entity, as_of_ms, 0));
        while !wanted.is_empty() {
            let (Some(k), Some(v)) = (history.key(), history.value()) else {
                history.status()?;
                break;
            };
            if !k.starts_with(&prefix) {
                break;
            }
            let t = keys::feature_row_time(k)?;
            if t < retained {
                break;
            }
            // A feature whose TTL has passed at this row is not in any older one either.
            wanted.retain(|&i| feature_store::visible(t, as_of_ms, features[i].1));
            let stored =
                LatestFeatures::decode(v).map_err(decode_err(cf::FEATURES, entity.to_string()))?;
            wanted.retain(|&i| match stored.get(&features[i].0) {
                Some(e) => {
                    row[i] = e
                        .value
                        .clone()
                        .and_then(feature_value_from_pb)
                        .map(|v| (t, v));
                    false
                }
                None => true,
            });
            history.next();
        }
        Ok(())
    }

    /// Flushes the feature families' memtables to SST files (benchmarks compare reads from both).
    pub fn flush_features(&self) -> Result<(), StoreError> {
        for name in [cf::FEATURES, cf::FEATURES_LATEST] {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }

    /// Runs a manual compaction of every retained family, which drops what retention has expired.
    /// RocksDB also does this on its own (periodic compaction); this makes it happen now.
    pub fn compact_expired(&self) {
        for name in [
            cf::PREDICTIONS,
            cf::PREDICTION_INDEX,
            cf::SHADOW_LOG,
            cf::OUTCOMES,
            cf::OUTCOME_INDEX,
            cf::FEATURES,
            cf::FEATURES_LATEST,
        ] {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}

/// The number sent as an outcome, for numeric-outcome statistics.
fn actual_number(o: &pb::OutcomeRecord) -> Option<f64> {
    match o.actual.as_ref()?.kind.as_ref()? {
        pb::actual::Kind::Number(x) => Some(*x),
        _ => None,
    }
}

/// Precision of the distinct-unit sketches: 2^12 registers, about 1.6% standard error.
pub const UNIT_SKETCH_PRECISION: usize = 12;

/// The distinct-unit sketch of an experiment variant.
pub type UnitSketch = simple_hll::HyperLogLog<UNIT_SKETCH_PRECISION>;

fn unit_estimate(v: &[u8]) -> u64 {
    if v.first() != Some(&b'h') || v.len() != 1 + (1 << UNIT_SKETCH_PRECISION) {
        return 0;
    }
    UnitSketch::with_registers(v[1..].to_vec()).count() as u64
}

/// The time a retained record was written, read from its key or value; `None` when the family is
/// kept forever or the entry is malformed (kept).
pub(super) fn record_time(family: &str, key: &[u8], value: &[u8]) -> Option<u64> {
    match family {
        cf::PREDICTIONS | cf::OUTCOMES | cf::FEATURES_LATEST => {
            keys::split_timed_value(cf::PREDICTIONS, value)
                .ok()
                .map(|(t, _)| t)
        }
        cf::PREDICTION_INDEX => keys::decode_prediction_index_key(key)
            .ok()
            .map(|(_, t, _)| t),
        cf::OUTCOME_INDEX | cf::SHADOW_LOG => keys::outcome_index_time(key).ok(),
        cf::FEATURES => keys::feature_row_time(key).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_moments_add_and_take_back() {
        let mut acc = (0, 0.0, 0.0);
        for x in [1.0, 2.0, 4.0, 8.0] {
            acc = combine_moments(acc, (1, x, 0.0));
        }
        assert_eq!(acc.0, 4);
        assert!((acc.1 - 3.75).abs() < 1e-12);
        // Taking 8 back leaves the moments of [1, 2, 4].
        let back = combine_moments(acc, (-1, 8.0, 0.0));
        assert_eq!(back.0, 3);
        assert!((back.1 - 7.0 / 3.0).abs() < 1e-12);
        let var = back.2 / 2.0;
        assert!((var - 2.333_333_333_333_333_5).abs() < 1e-9, "{var}");
    }

    #[test]
    fn judgements_round_trip() {
        for j in [
            Judgement {
                success: Some(true),
                error: None,
            },
            Judgement {
                success: Some(false),
                error: None,
            },
            Judgement {
                success: None,
                error: Some(-1.5),
            },
            Judgement::default(),
        ] {
            assert_eq!(decode_judgement(&encode_judgement(&j)), Some(j));
        }
    }

    /// History reads walk an entity's rows newest first: rows without the feature are passed
    /// over, rows of the same millisecond are both kept, and a TTL ends the walk.
    #[test]
    fn point_in_time_reads_walk_the_rows_of_an_entity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = now_ms() - 60_000;
        let n = |x: f64| FeatureValue::Number(x);
        let mut b = store.record_batch();
        b.add_features("e", t0, [("a", &n(1.0)), ("b", &n(10.0))]);
        b.add_features("e", t0 + 1_000, [("a", &n(2.0))]);
        b.add_features("e", t0 + 1_000, [("c", &n(7.0))]);
        b.add_features("e", t0 + 2_000, [("a", &n(3.0)), ("b", &n(30.0))]);
        // Another entity whose id extends "e" must not be read as "e".
        b.add_features("e2", t0 + 1_500, [("b", &n(99.0))]);
        b.commit(false).unwrap();
        let feats = |names: &[(&str, Option<u64>)]| -> Vec<(String, Option<u64>)> {
            names.iter().map(|(f, t)| (f.to_string(), *t)).collect()
        };
        let get = |as_of: u64, names: &[(&str, Option<u64>)]| {
            store
                .get_features(&["e".to_string()], &feats(names), as_of)
                .unwrap()
                .remove(0)
                .into_iter()
                .map(|c| c.map(|(t, v)| (t - t0, v)))
                .collect::<Vec<_>>()
        };
        let all = [("a", None), ("b", None), ("c", None)];
        assert_eq!(
            get(t0 + 1_500, &all),
            vec![
                Some((1_000, n(2.0))),
                Some((0, n(10.0))),
                Some((1_000, n(7.0)))
            ],
            "b is only in the oldest row; both rows of t0+1000 count"
        );
        assert_eq!(
            get(t0 + 2_000, &all),
            vec![
                Some((2_000, n(3.0))),
                Some((2_000, n(30.0))),
                Some((1_000, n(7.0)))
            ]
        );
        assert_eq!(get(t0 - 1, &all), vec![None, None, None]);
        // With a 1 s TTL, b's value of t0 has expired at t0+1500 although it is the latest then.
        assert_eq!(
            get(t0 + 1_500, &[("b", Some(1_000)), ("a", Some(1_000))]),
            vec![None, Some((1_000, n(2.0)))]
        );
    }
}
