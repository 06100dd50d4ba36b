//! Records in RocksDB: a batch of record writes committed as one `WriteBatch` (`RecordBatch`,
//! all or nothing, so counters agree with the records they count), and the [`RecordLog`] seam
//! over the files that hold each kind of record:
//!
//! | file | records |
//! |---|---|
//! | `predictions.rs` | prediction records, their index by model and time, listing |
//! | `outcomes.rs` | outcomes, their index with judgements, the tallies of versions |
//! | `experiments.rs` | experiment request counters and distinct-unit sketches |
//! | `features.rs` | feature rows, latest values (merge operator), definitions, point-in-time reads |
//! | `shadows.rs` | shadow counters, latency histograms, disagreements |
//! | `counters.rs` | the counter encoding they share, and its merge operator |
//! | `retention.rs` | what is retained: cutoffs, entry times, compaction |
//!
//! Keys are built in `keys.rs`, the one key module.
//!
//! [`RecordLog`]: crate::storage::RecordLog

use std::sync::Arc;

use rocksdb::WriteOptions;

use super::batch::{BatchBytes, FamilyId};

use super::{keys, Store, StoreError};
use crate::outcome::Judgement;
use crate::pb::modelgate::v1 as pb;
use crate::storage::{OutcomeWrite, RecordWrite, RecordWrites, SharedFields};

pub use crate::convert::{feature_value_from_pb, feature_value_to_pb};
pub use crate::experiment::{unit_estimate_registers, UnitSketch, UNIT_SKETCH_PRECISION};
pub use crate::storage::{PredictionPage, Retention};

/// A record that does not decode, named by its family and key.
pub(super) fn decode_err(
    family: &'static str,
    key: String,
) -> impl FnOnce(prost::DecodeError) -> StoreError {
    move |e| StoreError::Decode {
        family,
        key,
        reason: e.to_string(),
    }
}

/// Many records written as one `WriteBatch` (WAL on, not synced: a process crash loses nothing
/// committed; a power loss may lose the last moments).
pub(crate) struct RecordBatch<'s> {
    pub(super) store: &'s Store,
    pub(super) batch: BatchBytes,
    /// The ids of the families records go to, looked up once per batch.
    pub(super) families: Families,
    /// A value being built, kept between writes so that each does not allocate its own
    /// (`WriteBatch` copies what it is given).
    pub(super) scratch: Vec<u8>,
    /// A history row of floats being built (`features::FLOAT_ROW`), kept as `scratch` is.
    pub(super) floats: Vec<u8>,
    /// Prediction records added.
    pub(super) records: usize,
    /// The group of `prediction_index` being filled (`predictions.rs`).
    pub(super) index: IndexGroup,
    /// How the rows of each table of feature names are written (`features.rs`): the store's,
    /// taken for the batch and given back when it ends.
    pub(super) row_layouts: RowLayouts,
    /// Entities whose latest values the batch merges into (`features::LatestChains`).
    pub(super) merged: MergedKeys,
    /// The tables of names the batch's compact history rows refer to, each written once into
    /// the batch beside them (`features::NameTable`).
    pub(super) tables: Vec<u64>,
    /// The runs of feature rows, locked from the batch's first compact row to its write
    /// (`runs.rs`).
    pub(super) runs: Option<super::runs::RunBatch<'s>>,
    /// Shared fields of prediction records that the batch writes beside the records referring
    /// to them, known stored once it is written (`predictions.rs`).
    pub(super) shared_new: Vec<Arc<SharedFields>>,
    /// The shared fields the batch's last record referred to.
    pub(super) shared_last: Option<Arc<SharedFields>>,
}

/// The shared fields of prediction records (`storage::SharedFields`) a store holds, as far as
/// this process knows, by id: those it wrote and those it read back (`predictions.rs`). The
/// fields are stored once, in the default family (`keys::shared_fields_key`), and kept forever:
/// a store holds a few (a model's records share them while their method and feature names stay
/// the same). Past [`SharedTables::MAX`] the map is emptied, and what is needed again is read
/// again.
#[derive(Default)]
pub(super) struct SharedTables {
    pub(super) known: rustc_hash::FxHashMap<u64, Arc<SharedFields>>,
}

impl SharedTables {
    pub(super) const MAX: usize = 4096;

    pub(super) fn insert(&mut self, fields: Arc<SharedFields>) {
        if self.known.len() >= Self::MAX {
            self.known.clear();
        }
        self.known.insert(fields.id, fields);
    }
}

/// The entities a batch merges into (`RecordBatch::merged`): their `features_latest` keys, end
/// to end, for the writer's count of each entity's operands (`features::LatestChains`).
#[derive(Default)]
pub(super) struct MergedKeys {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl MergedKeys {
    pub(super) fn push(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len());
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(a, &b)| &self.bytes[a..b])
    }
}

/// The group of `prediction_index` a batch is filling (`RecordBatch::index`, `predictions.rs`):
/// records of one model whose times lie within [`keys::PREDICTION_GROUP_SPAN_MS`] of one another.
#[derive(Default)]
pub(super) struct IndexGroup {
    pub(super) model: String,
    pub(super) oldest: u64,
    pub(super) newest: u64,
    /// The records, each time (u64 BE) ‖ version (u32 BE) ‖ request id length (varint) ‖
    /// request id; empty when no group is open.
    pub(super) entries: Vec<u8>,
}

impl IndexGroup {
    /// Whether a record of `model` at `time_ms` joins the open group.
    pub(super) fn takes(&self, model: &str, time_ms: u64) -> bool {
        !self.entries.is_empty()
            && self.model == model
            && time_ms.max(self.newest) - time_ms.min(self.oldest) <= keys::PREDICTION_GROUP_SPAN_MS
    }

    pub(super) fn push(&mut self, time_ms: u64, version: u32, request_id: &str) {
        self.oldest = self.oldest.min(time_ms);
        self.newest = self.newest.max(time_ms);
        self.entries.extend_from_slice(&time_ms.to_be_bytes());
        self.entries.extend_from_slice(&version.to_be_bytes());
        prost::encoding::encode_varint(request_id.len() as u64, &mut self.entries);
        self.entries.extend_from_slice(request_id.as_bytes());
    }
}

/// How the rows of each table of feature names are written, by table (`features.rs`). A
/// model's records share one table, so its layout is found once and kept: finding it again for
/// every batch was ~750 instructions per recorded call at ~14 calls per batch.
pub(super) type RowLayouts = Vec<(
    std::sync::Arc<[String]>,
    Layout,
    NumberRow,
    Option<NameTable>,
)>;

impl Drop for RecordBatch<'_> {
    fn drop(&mut self) {
        let mut kept = self.store.row_layouts.lock();
        // Two batches at once (the writer's and a control call's): the later one's are kept.
        *kept = std::mem::take(&mut self.row_layouts);
    }
}

/// A table of feature names (in its layout's order: by name, each once) that history rows of
/// numbers refer to instead of naming every value (`features.rs`): such a row is a zero byte,
/// the table's id (u64 LE) and each column's number (f64 LE), 137 bytes for 16 features where
/// naming them took ~400. Every recorded call writes one history row, so this is most of what
/// the feature store flushes and compacts (measured: README, Performance). The table is
/// written into every batch holding a row that refers to it (one put per batch, whatever the
/// rows), so a row is never committed without its table. The id is the xxh3 hash of the stored
/// table; should two tables ever share one, the later table's rows are written whole.
#[derive(Clone)]
pub(super) struct NameTable {
    pub(super) id: u64,
    pub(super) key: [u8; 9],
    /// `features::StoredNames`, encoded.
    pub(super) stored: Vec<u8>,
}

/// How the rows of a table of feature names are written (`features.rs`): the table's columns in
/// writing order, each its index in the table and its name encoded.
pub(super) type Layout = Vec<(usize, Vec<u8>)>;

/// A table's history row when every value is a number (`features.rs`): encoded with zeros, and
/// where each column's number goes, as its index in the table and the offset of its 8 bytes.
pub(super) type NumberRow = (Vec<u8>, Vec<(usize, usize)>);

/// The column families every recorded call writes to.
pub(super) struct Families {
    pub(super) predictions: FamilyId,
    pub(super) prediction_index: FamilyId,
    pub(super) features: FamilyId,
    pub(super) features_latest: FamilyId,
    pub(super) counters: FamilyId,
}

impl RecordBatch<'_> {
    /// Adds one backend-neutral write.
    pub(super) fn apply(&mut self, w: &RecordWrite) {
        match w {
            RecordWrite::Prediction { record, time_ms } => self.add_prediction(record, *time_ms),
            RecordWrite::Features {
                entity,
                time_ms,
                names,
                values,
            } => self.add_feature_row(entity, *time_ms, names, values),
            RecordWrite::ExperimentRequests {
                experiment,
                variant,
                n,
            } => self.add_experiment_requests(experiment, variant, *n),
            RecordWrite::ExperimentUnits {
                experiment,
                variant,
                registers,
            } => self.put_experiment_units(experiment, variant, registers),
            RecordWrite::FeatureDef(def) => self.add_feature_def(def),
            RecordWrite::ShadowCount {
                model,
                version,
                counter,
                n,
            } => self.add_shadow_count(model, *version, &counter.key(), *n),
            RecordWrite::ShadowLatency {
                model,
                version,
                latency,
            } => self.put_shadow_latency(model, *version, latency),
            RecordWrite::Disagreement {
                model,
                version,
                disagreement,
            } => self.add_disagreement(model, *version, disagreement),
        }
    }

    /// Commits the batch. `no_slowdown` makes RocksDB fail instead of stalling the writer.
    pub(super) fn commit(mut self, no_slowdown: bool) -> Result<(), StoreError> {
        self.close_index_group();
        let mut wo = WriteOptions::default();
        wo.set_no_slowdown(no_slowdown);
        let batch = std::mem::take(&mut self.batch).into_write_batch();
        let runs = self.runs.take();
        if self.merged.is_empty() {
            self.store.write_opt(batch, &wo)?;
        } else {
            let mut chains = self.store.latest_chains.lock();
            self.store.write_opt(batch, &wo)?;
            self.store.settle_latest(&mut chains, &self.merged, &wo);
        }
        if let Some(runs) = runs {
            runs.written();
        }
        if !self.shared_new.is_empty() {
            let mut known = self.store.shared_fields.lock();
            for fields in self.shared_new.drain(..) {
                known.insert(fields);
            }
        }
        Ok(())
    }
}

/// About the bytes a write adds to a `WriteBatch` (keys, values and RocksDB's framing): a
/// record is its encoding, the request id twice (the record's key, its index group) and its
/// share of the group's; a feature row is written twice, ~30 bytes per value besides its name.
fn approx_bytes(w: &RecordWrite) -> usize {
    match w {
        RecordWrite::Prediction { record, .. } => {
            record.bytes.len() + 2 * record.request_id.len() + 32
        }
        RecordWrite::Features { entity, values, .. } => 2 * entity.len() + values.len() * 80 + 48,
        RecordWrite::ExperimentUnits { registers, .. } => registers.len() + 96,
        _ => 96,
    }
}

/// Where a write goes in a batch: prediction records by (model, time, request id), after every
/// other write, which keeps its order (the sort is stable, so of two writes of
/// one key the later still wins).
///
/// Why: a memtable is a skip list that remembers where its last insert went and places a key
/// just past it in a step or two; any other key is searched for from the top (~20 key
/// comparisons in a memtable of 8,000 records). Calls finish, and are queued for writing, out of
/// the order they started in, so nearly every record was searched for from the top. Sorted, a
/// batch's records mostly follow one another: ~3 comparisons each (the test
/// below; callgrind: ~2,300 fewer instructions per recorded call). Their own key, a generated
/// request id, follows time too; with several models in a batch it runs once per model. It also
/// brings each model's records together, for one index group per model (`predictions.rs`). Feature
/// rows are left in order: keyed by entity, consecutive ones land far apart whatever their order.
fn insertion_place(w: &RecordWrite) -> Option<(&str, u64, &str)> {
    match w {
        RecordWrite::Prediction { record, time_ms } => {
            Some((&record.model, *time_ms, &record.request_id))
        }
        _ => None,
    }
}

impl Store {
    /// Starts a batch of records.
    pub(crate) fn record_batch(&self) -> RecordBatch<'_> {
        RecordBatch {
            store: self,
            batch: BatchBytes::default(),
            families: Families {
                predictions: self.family_id(super::cf::PREDICTIONS),
                prediction_index: self.family_id(super::cf::PREDICTION_INDEX),
                features: self.family_id(super::cf::FEATURES),
                features_latest: self.family_id(super::cf::FEATURES_LATEST),
                counters: self.family_id(super::cf::COUNTERS),
            },
            scratch: Vec::new(),
            floats: Vec::new(),
            records: 0,
            index: Default::default(),
            row_layouts: std::mem::take(&mut self.row_layouts.lock()),
            merged: Default::default(),
            tables: Vec::new(),
            runs: None,
            shared_new: Vec::new(),
            shared_last: None,
        }
    }
}

impl crate::storage::RecordLog for Store {
    fn commit(&self, writes: RecordWrites, no_slowdown: bool) -> Result<(), StoreError> {
        let mut order: Vec<&RecordWrite> = writes.writes.iter().collect();
        order.sort_by_key(|w| insertion_place(w));
        let mut batch = self.record_batch();
        // Sized up front: a growing batch is copied at each doubling.
        batch.batch = BatchBytes::with_capacity(writes.writes.iter().map(approx_bytes).sum());
        for w in order {
            batch.apply(w);
        }
        batch.commit(no_slowdown)
    }

    fn finish(&self) -> Result<(), StoreError> {
        self.finish_feature_runs()
    }

    fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> Result<Option<(u64, pb::PredictionRecord)>, StoreError> {
        Store::get_prediction(self, request_id, not_before_ms)
    }

    fn list_predictions(
        &self,
        model: &str,
        version: u32,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
        after: Option<(u64, String)>,
    ) -> Result<PredictionPage, StoreError> {
        Store::list_predictions(self, model, version, start_ms, end_ms, limit, after)
    }

    fn outcomes_of(&self, request_id: &str) -> Result<Vec<pb::OutcomeRecord>, StoreError> {
        Store::outcomes_of(self, request_id)
    }

    fn get_outcome(
        &self,
        request_id: &str,
        row: u32,
    ) -> Result<Option<(u64, pb::OutcomeRecord)>, StoreError> {
        Store::get_outcome(self, request_id, row)
    }

    fn write_outcome(&self, w: OutcomeWrite<'_>) -> Result<(), StoreError> {
        Store::write_outcome(self, w)
    }

    fn recent_judgements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> Result<Vec<Judgement>, StoreError> {
        Store::recent_judgements(self, model, version, n)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::storage::{EncodedPrediction, RecordLog};

    /// A prediction record of `model` with this request id and version, encoded.
    pub(in crate::store) fn record(model: &str, id: &str, version: u32) -> EncodedPrediction {
        EncodedPrediction::of(&pb::PredictionRecord {
            request_id: id.to_string(),
            model: model.to_string(),
            version,
            ..Default::default()
        })
    }

    /// Key comparisons RocksDB makes (its perf context, this thread) while `store` commits
    /// `writes`.
    fn comparisons(store: &Store, writes: RecordWrites) -> u64 {
        rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::EnableCount);
        let mut perf = rocksdb::perf::PerfContext::default();
        perf.reset();
        store.commit(writes, false).unwrap();
        let n = perf.metric(rocksdb::perf::PerfMetric::UserKeyComparisonCount);
        rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
        n
    }

    /// A batch's records arrive in the order their calls finished, not started. Put into RocksDB
    /// in key order, each record follows the previous one in its memtable, a few key comparisons
    /// each instead of a search from the top (~20 each in this memtable; the index adds a group
    /// or two per batch, `predictions.rs`); and
    /// what reads back is what was written: every record, listed in time order, the later of two
    /// writes of one request id kept.
    #[test]
    fn a_batch_of_records_finished_out_of_order_is_inserted_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 600_000;
        let id = |t: u64| format!("req-{t:08}");
        // A memtable of 8,000 records already.
        for b in 0..100u64 {
            let mut w = RecordWrites::default();
            for i in 0..80 {
                let t = b * 80 + i;
                w.add_prediction(record("m", &id(t), 1), t0 + t);
            }
            store.commit(w, false).unwrap();
        }
        // The next 64 calls, finished in a scrambled order, one request id twice.
        let scrambled = |from: u64| (0..64).map(move |i| from + (i * 37) % 64);
        let mut w = RecordWrites::default();
        for t in scrambled(8_000) {
            w.add_prediction(record("m", &id(t), 1), t0 + t);
        }
        w.add_prediction(record("m", &id(8_000), 2), t0 + 8_000);
        let per_insert = comparisons(&store, w) as f64 / 65.0;
        assert!(
            per_insert < 5.0,
            "{per_insert:.1} key comparisons per insert"
        );
        // And 64 more of two models.
        let mut w = RecordWrites::default();
        for t in scrambled(8_064) {
            let model = if t % 2 == 0 { "m" } else { "n" };
            w.add_prediction(record(model, &id(t), 1), t0 + t);
        }
        store.commit(w, false).unwrap();
        // Listed newest first: all of n's, and m's of both batches.
        for (model, times) in [
            (
                "n",
                (8_064..8_128).filter(|t| t % 2 == 1).collect::<Vec<u64>>(),
            ),
            (
                "m",
                (8_000..8_128)
                    .filter(|t| *t < 8_064 || t % 2 == 0)
                    .collect(),
            ),
        ] {
            let page = store
                .list_predictions(model, 0, t0 + 8_000, t0 + 8_128, 200, None)
                .unwrap();
            let ids: Vec<String> = page.records.into_iter().map(|r| r.request_id).collect();
            let expected: Vec<String> = times.into_iter().rev().map(id).collect();
            assert_eq!(ids, expected, "{model}");
        }
        let (_, kept) = store.get_prediction(&id(8_000), 0).unwrap().unwrap();
        assert_eq!(kept.version, 2, "the later of two writes of one request id");
    }
}
