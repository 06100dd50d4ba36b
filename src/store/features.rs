//! The online feature store: every row of values an entity was given (`feature_rows`, newest
//! first per entity), each entity's newest value per feature (`features_latest`, kept by the
//! [`keep_newest`] merge operator so no write reads first), the definitions (`feature_defs`), and
//! point-in-time reads over both.
//!
//! | family | key | value |
//! |---|---|---|
//! | `feature_rows` | entity ∅ ¬time ‖ seq | the row: names and `FeatureValue`s |
//! | `features_latest` | entity | newest time ‖ every feature's newest (time, value), merged per feature |
//! | `feature_defs` | name | JSON `FeatureDef` |

use prost::Message;
use rocksdb::{IteratorMode, MergeOperands};

use super::records::{decode_err, RecordBatch};
use super::{cf, keys, Store, StoreError};
use crate::convert::{feature_value_from_pb, feature_value_to_pb};
use crate::feature_store::{self, FeatureDef};
use crate::pb::modelgate::v1 as pb;
use crate::record::FeatureValue;

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

impl RecordBatch<'_> {
    /// Adds feature values of one entity at one time (history, and one merge into latest).
    pub(super) fn add_features<'a>(
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

    /// Adds a feature definition.
    pub(super) fn add_feature_def(&mut self, def: &FeatureDef) {
        self.batch.put_cf(
            self.store.cf(cf::FEATURE_DEFS),
            def.name.as_bytes(),
            serde_json::to_vec(def).expect("feature definitions serialise"),
        );
    }
}

impl Store {
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
        let retained = self.cutoff(self.retention.features);
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
}

impl crate::storage::FeatureStore for Store {
    fn load_feature_defs(&self) -> Result<Vec<FeatureDef>, StoreError> {
        Store::load_feature_defs(self)
    }

    fn put_feature_defs(&self, defs: &[FeatureDef]) -> Result<(), StoreError> {
        Store::put_feature_defs(self, defs)
    }

    fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> Result<Vec<Vec<Option<(u64, FeatureValue)>>>, StoreError> {
        Store::get_features(self, entities, features, as_of_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// History reads walk an entity's rows newest first: rows without the feature are passed
    /// over, rows of the same millisecond are both kept, and a TTL ends the walk.
    #[test]
    fn point_in_time_reads_walk_the_rows_of_an_entity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 60_000;
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
