//! Prediction records: `predictions` (request id → time ‖ `PredictionRecord`) and its index by
//! model and time, `prediction_index` (model ∅ time ‖ request id → version), read back one at a
//! time or listed newest first, a page at a time.
//!
//! | family | key | value |
//! |---|---|---|
//! | `predictions` | request id | time ‖ `PredictionRecord` |
//! | `prediction_index` | model ∅ time ‖ request id | version |

use prost::Message;
use rocksdb::{Direction, IteratorMode};

use super::records::{decode_err, RecordBatch};
use super::{cf, keys, Store, StoreError};
use crate::pb::modelgate::v1 as pb;
use crate::storage::{EncodedPrediction, PredictionPage};

impl RecordBatch<'_> {
    /// Adds a prediction record and its index entry.
    pub(super) fn add_prediction(&mut self, rec: &EncodedPrediction, time_ms: u64) {
        self.scratch.clear();
        keys::timed_value_into(time_ms, &rec.bytes, &mut self.scratch);
        self.batch.put_cf(
            self.families.predictions,
            keys::prediction_key(&rec.request_id),
            &self.scratch,
        );
        self.batch.put_cf(
            self.families.prediction_index,
            keys::prediction_index_key(&rec.model, time_ms, &rec.request_id),
            rec.version.to_be_bytes(),
        );
        self.records += 1;
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
}
