//! Prediction records: `predictions` (request id → time ‖ `PredictionRecord`) and its index by
//! model and time, `prediction_index`, read back one at a time or listed newest first, a page at
//! a time.
//!
//! | family | key | value |
//! |---|---|---|
//! | `predictions` | request id | time ‖ 0x00 ‖ shared fields' id ‖ the record's own fields |
//! | `predictions` | request id | time ‖ `PredictionRecord` (a record written whole) |
//! | default | `modelgate/record-shared/` ‖ id | shared fields (`storage::SharedFields`) |
//! | `prediction_index` | model ∅ newest time ‖ 0xFF ‖ group id | the group's records: time ‖ version ‖ request id, each |
//! | `prediction_index` | model ∅ time ‖ request id | version (one record: written before groups, still read) |
//!
//! The index holds a group of records per entry, not one record per entry: the records of a
//! write batch, by model, split where they would span more than
//! [`keys::PREDICTION_GROUP_SPAN_MS`]. Every entry is a memtable insert, two passes of RocksDB's
//! over the batch, and a key the flush and each compaction carry, whatever its size: an entry of
//! ~60 bytes per record cost ~2,200 instructions per recorded call over a long run, writer and
//! flush together (callgrind, README "Index groups"). A listing reads groups newest first and
//! lists a record once no group still unread can hold a newer one: groups are keyed by their
//! newest time, and hold nothing older than that time less the span.
//!
//! A record holds its own fields only, not its request id (the key) nor what the records of its
//! model, method and feature names share: the model, the method and the names, half of a record
//! of 16 features (`prediction_record::encode_shared`). Those are stored once, under their xxh3
//! hash, beside the first records that refer to them, and kept forever (a store holds a few).
//! Every byte of a record is copied into the write-ahead log and the memtable, checksummed,
//! flushed, read back and compressed by the compaction: ~10 instructions per byte in all, and
//! the shared fields and the request id were 246 of 507 bytes (README "Shared record fields"). A
//! record is written whole, as before, when its fields' id names other fields in the store, or
//! when the writer has no shared fields for it (a call that reached no model).

use std::collections::BTreeSet;
use std::sync::Arc;

use prost::Message;
use rocksdb::{Direction, IteratorMode};

use super::batch::FamilyId;
use super::records::{decode_err, RecordBatch};
use super::{cf, keys, Store, StoreError};
use crate::convert::prediction_record;
use crate::pb::modelgate::v1 as pb;
use crate::storage::{EncodedPrediction, PredictionPage, SharedFields};

/// The first byte of a stored record (past its time) that refers to its shared fields
/// (`storage::SharedFields`) instead of holding them: then the fields' id (u64 LE) and the
/// record's own fields (`prediction_record::encode_own`). A whole record, a `PredictionRecord`
/// message, never starts with it (field 0 is no field).
const SHARED: u8 = 0x00;

/// The records a `prediction_index` entry lists, as (time, request id, version); `group`: whether
/// the entry is a group's ([`keys::prediction_index_time`]).
fn index_records(
    key: &[u8],
    value: &[u8],
    group: bool,
) -> Result<Vec<(u64, String, u32)>, StoreError> {
    let bad = |reason: &str| StoreError::Decode {
        family: cf::PREDICTION_INDEX,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    };
    if !group {
        let (_, time, id) = keys::decode_prediction_index_key(key)?;
        let v: [u8; 4] = value
            .try_into()
            .map_err(|_| bad("version is not 4 bytes"))?;
        return Ok(vec![(time, id, u32::from_be_bytes(v))]);
    }
    let mut records = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(bad("a group's record is cut short"));
        }
        let time = keys::be64(&rest[..8]);
        let version = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes"));
        rest = &rest[12..];
        let len = prost::encoding::decode_varint(&mut rest)
            .map_err(|_| bad("a group's request id has no length"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= rest.len())
            .ok_or_else(|| bad("a group's request id is cut short"))?;
        let id = std::str::from_utf8(&rest[..len])
            .map_err(|_| bad("a group's request id is not UTF-8"))?;
        records.push((time, id.to_string(), version));
        rest = &rest[len..];
    }
    Ok(records)
}

impl RecordBatch<'_> {
    /// Adds a prediction record, and lists it in the index group being filled.
    pub(super) fn add_prediction(&mut self, rec: &EncodedPrediction, time_ms: u64) {
        // A timed value (`keys::timed_value`), built in the batch's buffer.
        self.scratch.clear();
        self.scratch.extend_from_slice(&time_ms.to_be_bytes());
        match rec.shared.as_ref().filter(|s| self.shares(s)) {
            Some(shared) => {
                self.scratch.push(SHARED);
                self.scratch.extend_from_slice(&shared.id.to_le_bytes());
                self.scratch.extend_from_slice(&rec.bytes);
            }
            None => self.scratch.extend_from_slice(&rec.whole()),
        }
        self.batch.put_cf(
            self.families.predictions,
            keys::prediction_key(&rec.request_id),
            &self.scratch,
        );
        if !self.index.takes(&rec.model, time_ms) {
            self.close_index_group();
            self.index.model.clear();
            self.index.model.push_str(&rec.model);
            self.index.oldest = time_ms;
            self.index.newest = time_ms;
        }
        self.index.push(time_ms, rec.version, &rec.request_id);
        self.records += 1;
    }

    /// Whether a record may refer to `shared` rather than hold it: when the store holds it, or
    /// this batch writes it. Not when its id names other fields in the store (two encodings with
    /// one xxh3 hash): such records are written whole.
    fn shares(&mut self, shared: &Arc<SharedFields>) -> bool {
        if self
            .shared_last
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, shared))
        {
            return true;
        }
        let ok = match self.store.stored_shared_fields(shared.id) {
            Ok(Some(stored)) => stored.bytes == shared.bytes,
            Ok(None) => {
                if !self.shared_new.iter().any(|n| n.id == shared.id) {
                    self.batch.put_cf(
                        FamilyId::DEFAULT,
                        keys::shared_fields_key(shared.id),
                        &shared.bytes,
                    );
                    self.shared_new.push(shared.clone());
                }
                self.shared_new.iter().any(|n| n.bytes == shared.bytes)
            }
            // Not known to be stored, and not readable: the record is written whole.
            Err(_) => false,
        };
        if ok {
            self.shared_last = Some(shared.clone());
        }
        ok
    }

    /// Writes the index group being filled, if any, into the batch. Its id (a UUIDv7) makes its
    /// key unique, whatever other groups share its model and newest time.
    pub(super) fn close_index_group(&mut self) {
        if self.index.entries.is_empty() {
            return;
        }
        let key = keys::prediction_group_key(
            &self.index.model,
            self.index.newest,
            uuid::Uuid::now_v7().into_bytes(),
        );
        self.batch
            .put_cf(self.families.prediction_index, key, &self.index.entries);
        self.index.entries.clear();
    }
}

impl Store {
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
        let bad = || decode_err(cf::PREDICTIONS, request_id.to_string());
        let whole;
        let bytes = match body.split_first() {
            Some((&SHARED, rest)) if rest.len() >= 8 => {
                let (id, own) = rest.split_at(8);
                let id = u64::from_le_bytes(id.try_into().expect("8 bytes"));
                let shared = self
                    .stored_shared_fields(id)?
                    .ok_or_else(|| StoreError::Decode {
                        family: cf::PREDICTIONS,
                        key: request_id.to_string(),
                        reason: format!("its shared fields {id:016x} are not stored"),
                    })?;
                whole = prediction_record::reassemble(request_id, &shared.bytes, own);
                &whole[..]
            }
            _ => body,
        };
        let rec = pb::PredictionRecord::decode(bytes).map_err(bad())?;
        Ok(Some((time, rec)))
    }

    /// The shared fields of prediction records stored under `id`, if any.
    fn stored_shared_fields(&self, id: u64) -> Result<Option<Arc<SharedFields>>, StoreError> {
        if let Some(known) = self.shared_fields.lock().known.get(&id) {
            return Ok(Some(known.clone()));
        }
        let Some(bytes) = self.db.get(keys::shared_fields_key(id))? else {
            return Ok(None);
        };
        let fields = Arc::new(SharedFields { id, bytes });
        self.shared_fields.lock().insert(fields.clone());
        Ok(Some(fields))
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
        // Listed: entries before this one, newest first (a time, and an id at that time).
        let below = |time: u64, id: &str| {
            time < end_ms
                && after
                    .as_ref()
                    .is_none_or(|(t, after_id)| (time, id) < (*t, after_id.as_str()))
        };
        let bound = after.as_ref().map_or(end_ms, |(t, _)| *t);
        // A record at `bound` may be in a group keyed up to the span later.
        let from = keys::prediction_index_seek(
            model,
            bound.saturating_add(keys::PREDICTION_GROUP_SPAN_MS),
        );
        let iter = self.db.iterator_cf(
            self.cf(cf::PREDICTION_INDEX),
            IteratorMode::From(&from, Direction::Reverse),
        );
        // Records read and not yet listed, and those listed (one more than the page, to know
        // whether a next page starts after it).
        let mut waiting: BTreeSet<(u64, String)> = BTreeSet::new();
        let mut ids: Vec<(u64, String)> = Vec::new();
        let list = |waiting: &mut BTreeSet<(u64, String)>,
                    ids: &mut Vec<(u64, String)>,
                    newer_than: Option<u64>| {
            while ids.len() <= limit {
                match waiting.last() {
                    Some((t, _)) if newer_than.is_none_or(|n| *t > n) => {
                        ids.push(waiting.pop_last().expect("a last entry"));
                    }
                    _ => break,
                }
            }
        };
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let (key_time, group) = keys::prediction_index_time(&k)?;
            // Entries still unread are keyed at or before this one's time, and hold no record
            // newer than it: what waits newer than it is next in order.
            list(&mut waiting, &mut ids, Some(key_time));
            if ids.len() > limit || key_time < start_ms {
                break;
            }
            for (time, id, v) in index_records(&k, &v, group)? {
                if time >= start_ms && below(time, &id) && (version == 0 || v == version) {
                    waiting.insert((time, id));
                }
            }
        }
        list(&mut waiting, &mut ids, None);
        let next = if ids.len() > limit {
            ids.truncate(limit);
            ids.last().cloned()
        } else {
            None
        };
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
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::super::records::tests::record;
    use super::*;
    use crate::record::FeatureValue;
    use crate::storage::{RecordLog, RecordWrites};

    fn index_entries(store: &Store) -> usize {
        store
            .db
            .iterator_cf(store.cf(cf::PREDICTION_INDEX), IteratorMode::Start)
            .count()
    }

    /// Every page of a listing, followed through its page tokens, as (time, request id).
    fn list_all(
        store: &Store,
        model: &str,
        version: u32,
        start: u64,
        end: u64,
        limit: usize,
    ) -> Vec<(u64, String)> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list_predictions(model, version, start, end, limit, after.clone())
                .unwrap();
            assert!(page.records.len() <= limit);
            for r in &page.records {
                assert_eq!(r.model, model);
                assert!(version == 0 || r.version == version);
                let (t, _) = store.get_prediction(&r.request_id, 0).unwrap().unwrap();
                all.push((t, r.request_id.clone()));
            }
            match page.next {
                Some(next) => {
                    assert_eq!(Some(&next), all.last(), "a page ends where the next starts");
                    after = Some(next);
                }
                None => return all,
            }
        }
    }

    /// Batches whose calls finished out of order and far apart (their records span up to 600 ms,
    /// batches overlap), two models, three versions, calls at the same millisecond, and records
    /// indexed one per entry as before groups: listed page by page, newest first, every record
    /// of the query exactly once, in the order of (time, request id).
    #[test]
    fn listing_through_groups_gives_every_record_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let t0 = 1_700_000_000_000u64;
        let mut all: Vec<(String, u32, u64, String)> = Vec::new();
        let mut n = 0;
        for b in 0..12u64 {
            let mut w = RecordWrites::default();
            for _ in 0..40 {
                n += 1;
                let id = format!("r{n:05}");
                let model = if rng.random_bool(0.7) { "m" } else { "n" };
                let version = rng.random_range(1..=3);
                let t = t0 + b * 200 + rng.random_range(0..600) / 3 * 3;
                w.add_prediction(record(model, &id, version), t);
                all.push((model.to_string(), version, t, id));
            }
            store.commit(w, false).unwrap();
        }
        // Entries of one record each, as stores written before groups hold.
        for i in 0..30u64 {
            let id = format!("old{i:03}");
            let (model, version) = (if i % 3 == 0 { "n" } else { "m" }, 1 + (i % 3) as u32);
            let t = t0 + rng.random_range(0..2_800);
            let predictions = store.cf(cf::PREDICTIONS);
            let bytes = record(model, &id, version).bytes;
            store
                .db
                .put_cf(predictions, id.as_bytes(), keys::timed_value(t, &bytes))
                .unwrap();
            let index = store.cf(cf::PREDICTION_INDEX);
            let key = keys::prediction_index_key(model, t, &id);
            store.db.put_cf(index, key, version.to_be_bytes()).unwrap();
            all.push((model.to_string(), version, t, id));
        }
        assert!(
            index_entries(&store) < 30 + 12 * 2 * 8,
            "groups, not one entry per record"
        );
        for (model, version, start, end, limit) in [
            ("m", 0, 0, u64::MAX, 7),
            ("m", 2, 0, u64::MAX, 5),
            ("n", 0, t0 + 500, t0 + 1_700, 4),
            ("m", 3, t0 + 999, t0 + 1_000, 1),
            ("m", 0, t0 + 300, t0 + 2_000, 1_000),
            ("x", 0, 0, u64::MAX, 3),
        ] {
            let mut expected: Vec<(u64, String)> = all
                .iter()
                .filter(|(m, v, t, _)| {
                    m == model && (version == 0 || *v == version) && *t >= start && *t < end
                })
                .map(|(_, _, t, id)| (*t, id.clone()))
                .collect();
            expected.sort();
            expected.reverse();
            assert_eq!(
                list_all(&store, model, version, start, end, limit),
                expected,
                "{model} v{version} [{start}, {end}) by {limit}"
            );
        }
    }

    /// A batch's records of one model within the span are one index entry; another model, or a
    /// record past the span, opens another.
    #[test]
    fn a_batch_indexes_its_records_a_group_per_model_and_span() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = 1_700_000_000_000u64;
        let mut w = RecordWrites::default();
        for i in 0..50 {
            w.add_prediction(record("m", &format!("a{i:02}"), 1), t0 + i * 2);
        }
        store.commit(w, false).unwrap();
        assert_eq!(index_entries(&store), 1);
        let mut w = RecordWrites::default();
        for i in 0..10 {
            w.add_prediction(record("m", &format!("b{i:02}"), 1), t0 + 1_000 + i);
            w.add_prediction(record("n", &format!("c{i:02}"), 1), t0 + 1_000 + i);
        }
        let span = keys::PREDICTION_GROUP_SPAN_MS;
        w.add_prediction(record("m", "late", 1), t0 + 1_000 + span + 1);
        store.commit(w, false).unwrap();
        assert_eq!(index_entries(&store), 1 + 3);
        let page = store
            .list_predictions("m", 0, 0, u64::MAX, 100, None)
            .unwrap();
        assert_eq!(page.records.len(), 61);
        assert_eq!(page.records[0].request_id, "late");
    }

    /// Entries keyed at one millisecond (two groups whose newest record is at it, and a record
    /// indexed alone) are all read before any record of that millisecond is listed: listed by
    /// request id, whichever entry holds them.
    #[test]
    fn records_of_one_millisecond_in_several_entries_list_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = 1_700_000_000_000u64;
        for (older, newest) in [("a2", "x2"), ("a9", "x9")] {
            let mut w = RecordWrites::default();
            w.add_prediction(record("m", older, 1), t - 5);
            w.add_prediction(record("m", newest, 1), t);
            store.commit(w, false).unwrap();
        }
        let bytes = record("m", "x5", 1).bytes;
        let predictions = store.cf(cf::PREDICTIONS);
        let value = keys::timed_value(t, &bytes);
        store.db.put_cf(predictions, "x5", value).unwrap();
        let index = store.cf(cf::PREDICTION_INDEX);
        let key = keys::prediction_index_key("m", t, "x5");
        store.db.put_cf(index, key, 1u32.to_be_bytes()).unwrap();
        let ids = |page: PredictionPage| -> Vec<String> {
            page.records.into_iter().map(|r| r.request_id).collect()
        };
        let page = store
            .list_predictions("m", 0, 0, u64::MAX, 10, None)
            .unwrap();
        assert_eq!(ids(page), ["x9", "x5", "x2", "a9", "a2"]);
        let after = Some((t, "x5".to_string()));
        let page = store
            .list_predictions("m", 0, 0, u64::MAX, 2, after)
            .unwrap();
        assert_eq!(page.next, Some((t - 5, "a9".to_string())));
        assert_eq!(ids(page), ["x2", "a9"]);
        // A page token past the end of the range lists nothing past the end.
        let after = Some((t, "x9".to_string()));
        let page = store.list_predictions("m", 0, 0, t, 10, after).unwrap();
        assert_eq!(ids(page), ["a9", "a2"]);
    }

    /// A group that does not decode is an error naming its family, not a panic or a short page.
    #[test]
    fn a_damaged_group_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = keys::prediction_group_key("m", 1_700_000_000_000, [7; 16]);
        for value in [
            &[1u8, 2, 3][..],
            &[0; 12][..],
            &[[0; 12].as_slice(), &[9, b'a']].concat(),
        ] {
            let index = store.cf(cf::PREDICTION_INDEX);
            store.db.put_cf(index, &key, value).unwrap();
            match store.list_predictions("m", 0, 0, u64::MAX, 10, None) {
                Err(StoreError::Decode { family, .. }) => assert_eq!(family, cf::PREDICTION_INDEX),
                other => panic!("{value:?}: {:?}", other.map(|p| p.records.len())),
            }
        }
        assert_eq!(
            super::super::retention::record_time(cf::PREDICTION_INDEX, &key, &[]),
            Some(1_700_000_000_000),
            "a group expires with its newest record"
        );
    }

    /// A record of `model` whose method and feature names are shared, as the writer encodes it:
    /// its own fields, and the shared ones apart.
    fn sharing(
        model: &str,
        id: &str,
        names: &[String],
    ) -> (pb::PredictionRecord, EncodedPrediction) {
        let method = "/inference.GRPCInferenceService/ModelInfer";
        let whole = pb::PredictionRecord {
            request_id: id.to_string(),
            time: Some(crate::pb::timestamp(1_700_000_000_123)),
            model: model.to_string(),
            version: 2,
            method: method.to_string(),
            unit_id: "user-7".to_string(),
            feature_names: names.to_vec(),
            rows: vec![pb::FeatureRow {
                values: (0..names.len())
                    .map(|i| crate::convert::feature_value_to_pb(&FeatureValue::Number(i as f64)))
                    .collect(),
            }],
            entity_ids: vec!["user-7".to_string()],
            ..Default::default()
        };
        let own = pb::PredictionRecord {
            request_id: String::new(),
            model: String::new(),
            method: String::new(),
            feature_names: Vec::new(),
            ..whole.clone()
        };
        let shared = prediction_record::encode_shared(model, method, names);
        let encoded = EncodedPrediction {
            request_id: id.to_string(),
            model: model.to_string(),
            version: 2,
            bytes: own.encode_to_vec(),
            shared: Some(Arc::new(SharedFields::new(shared))),
        };
        (whole, encoded)
    }

    /// The `predictions` value stored under `request_id`.
    fn stored_value(store: &Store, request_id: &str) -> Vec<u8> {
        store
            .db
            .get_cf(store.cf(cf::PREDICTIONS), request_id)
            .unwrap()
            .unwrap()
    }

    fn stored_shared_keys(store: &Store) -> usize {
        store
            .db
            .prefix_iterator(b"modelgate/record-shared/")
            .map(Result::unwrap)
            .take_while(|(k, _)| k.starts_with(b"modelgate/record-shared/"))
            .count()
    }

    /// Records whose fields are shared are stored without them, the fields once, and read back
    /// whole, after the store is opened again too; records written whole before still read.
    #[test]
    fn shared_fields_are_stored_once_and_records_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..16).map(|i| format!("input_{i}")).collect();
        let t = 1_700_000_000_123;
        let mut expected = Vec::new();
        {
            let store = Store::open(dir.path()).unwrap();
            for b in 0..3 {
                let mut w = RecordWrites::default();
                for i in 0..20 {
                    let model = if i % 3 == 0 { "n" } else { "m" };
                    let (whole, encoded) = sharing(model, &format!("r{b}-{i:02}"), &names);
                    w.add_prediction(encoded, t);
                    expected.push(whole);
                }
                let (id, old) = (format!("old{b}"), record("m", &format!("old{b}"), 1));
                expected.push(old.decode().unwrap());
                w.add_prediction(old, t);
                assert_eq!(id, expected.last().unwrap().request_id);
                store.commit(w, false).unwrap();
            }
            assert_eq!(
                stored_shared_keys(&store),
                2,
                "one entry per model's fields"
            );
            let (whole, encoded) = sharing("m", "r0-01", &names);
            let stored = stored_value(&store, "r0-01");
            assert_eq!(stored.len(), 8 + 1 + 8 + encoded.bytes.len());
            // Without the method (44 bytes) and the 16 names (~150).
            assert!(stored.len() + 180 < 8 + whole.encode_to_vec().len());
        }
        let store = Store::open(dir.path()).unwrap();
        for e in &expected {
            let (time, rec) = store.get_prediction(&e.request_id, 0).unwrap().unwrap();
            assert_eq!((time, &rec), (t, e));
        }
        let page = store
            .list_predictions("n", 0, 0, u64::MAX, 100, None)
            .unwrap();
        assert_eq!(page.records.len(), 21);
        assert!(page.records.iter().all(|r| r.feature_names == names));
    }

    /// Shared fields whose id names other fields already stored (two encodings, one hash): the
    /// records are written whole, and both kinds read back as written. Shared fields gone from
    /// the store make their records a decode error naming them, not a panic or a wrong record.
    #[test]
    fn records_are_written_whole_when_their_shared_id_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = (0..4).map(|i| format!("x{i}")).collect();
        let (whole, encoded) = sharing("m", "a", &names);
        let id = encoded.shared.as_ref().unwrap().id;
        let key = keys::shared_fields_key(id);
        store.db.put(key, b"other fields").unwrap();
        let mut w = RecordWrites::default();
        w.add_prediction(encoded.clone(), 5);
        store.commit(w, false).unwrap();
        let stored = stored_value(&store, "a");
        assert_ne!(stored[8], SHARED, "written whole");
        assert_eq!(pb::PredictionRecord::decode(&stored[8..]).unwrap(), whole);
        assert_eq!(store.get_prediction("a", 0).unwrap().unwrap().1, whole);
        assert_eq!(store.db.get(key).unwrap().unwrap(), b"other fields");
        // Once the id is free, the next batch stores the fields and refers to them.
        store.db.delete(key).unwrap();
        store.shared_fields.lock().known.clear();
        let (whole_b, encoded_b) = sharing("m", "b", &names);
        let mut w = RecordWrites::default();
        w.add_prediction(encoded_b, 6);
        store.commit(w, false).unwrap();
        let stored = stored_value(&store, "b");
        assert_eq!(stored[8], SHARED);
        assert_eq!(store.get_prediction("b", 0).unwrap().unwrap().1, whole_b);
        // Gone: an error naming the record.
        store.db.delete(key).unwrap();
        store.shared_fields.lock().known.clear();
        match store.get_prediction("b", 0) {
            Err(StoreError::Decode {
                family,
                key,
                reason,
            }) => {
                assert_eq!((family, key.as_str()), (cf::PREDICTIONS, "b"));
                assert!(reason.contains("shared fields"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store.get_prediction("a", 0).unwrap().unwrap().1, whole);
    }
}
