//! Ingesting an outcome: find the prediction it answers — still waiting in the record queue, or
//! stored and within retention — judge it against that prediction, and store it with its
//! version's (and experiment variant's) tallies in one write. One outcome per request and row: a
//! second one is refused unless it replaces the first, whose judgement is then taken back from the
//! tallies. Outcomes of one request are serialised, so concurrent ones cannot both count.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::ids::RequestId;
use crate::outcome::{self, Actual, JudgeError, Judgement};
use crate::pb::modelgate::v1 as pb;
use crate::record::Prediction;
use crate::storage::{cutoff, OutcomeWrite, Storage, StoreError};

/// Predictions accepted but not yet stored (the record writer's queue), so that an outcome
/// arriving right after its answer still joins.
pub trait PendingPredictions: Send + Sync {
    /// The record a queued prediction will be stored as.
    fn pending(&self, request_id: &RequestId) -> Option<pb::PredictionRecord>;
}

/// Whoever watches judged outcomes (concept drift, the per-variant metrics).
pub trait OutcomeObserver: Send + Sync {
    /// One more judgement of `model` `version`.
    fn observe_outcome(&self, model: &str, version: u32, judgement: &Judgement);

    /// One more outcome counted in an experiment's variant (outcomes of forced variants are
    /// not counted), with its numeric value when it has one.
    fn observe_variant_outcome(
        &self,
        _experiment: &str,
        _variant: &str,
        _judgement: &Judgement,
        _value: Option<f64>,
    ) {
    }
}

/// An outcome as it arrives.
#[derive(Clone, Debug)]
pub struct NewOutcome {
    /// The request it is the outcome of.
    pub request_id: RequestId,
    /// The row of that request.
    pub row: u32,
    /// What happened.
    pub actual: Actual,
    /// When (Unix ms); now when not given.
    pub time_ms: Option<u64>,
    /// Replace an outcome already recorded for the row.
    pub overwrite: bool,
}

/// Why an outcome was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum OutcomeError {
    /// No record of the request: unknown, expired, or dropped under load.
    #[error("no prediction record for request id '{request_id}': unknown, older than the {} retention, or dropped under load", crate::spec::format_duration(*retention))]
    UnknownRequest {
        /// The request.
        request_id: RequestId,
        /// How long records are kept.
        retention: Duration,
    },
    /// The row is not one of the request's.
    #[error("row: {row} is out of range: request '{request_id}' had {rows} row(s)")]
    RowOutOfRange {
        /// The request.
        request_id: RequestId,
        /// The row asked for.
        row: u32,
        /// Rows the request had.
        rows: usize,
    },
    /// The row has an outcome already, and `overwrite` was not set.
    #[error(
        "request '{request_id}' row {row} already has an outcome; set overwrite to replace it"
    )]
    AlreadyRecorded {
        /// The request.
        request_id: RequestId,
        /// The row.
        row: u32,
    },
    /// The outcome does not fit the prediction (a label for a regression…).
    #[error("{0}")]
    Mismatch(String),
    /// There is no prediction to judge against (none could be read from the answer).
    #[error("{0}")]
    NoPrediction(String),
    /// Storage failed; nothing was recorded.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

/// The outcome-ingestion use case.
#[derive(Clone)]
pub struct Outcomes {
    storage: Storage,
    clock: SharedClock,
    pending: Arc<dyn PendingPredictions>,
    observers: Vec<Arc<dyn OutcomeObserver>>,
    /// Outcome writes for one request are serialised (duplicate checks, tally deltas).
    stripes: Arc<[Mutex<()>; 64]>,
}

impl Outcomes {
    /// Outcomes over `storage`, joining predictions still in `pending` too.
    pub fn new(storage: Storage, clock: SharedClock, pending: Arc<dyn PendingPredictions>) -> Self {
        Outcomes {
            storage,
            clock,
            pending,
            observers: Vec::new(),
            stripes: Arc::new(std::array::from_fn(|_| Mutex::new(()))),
        }
    }

    /// Tells `observer` (too) of every judged outcome.
    pub fn with_observer(mut self, observer: Arc<dyn OutcomeObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// The storage outcomes are kept in.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// A request's prediction record: still queued, or stored and within retention.
    pub fn prediction(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<pb::PredictionRecord>, StoreError> {
        if let Some(rec) = self.pending.pending(request_id) {
            return Ok(Some(rec));
        }
        let not_before = cutoff(self.clock.now_ms(), self.storage.retention.predictions);
        Ok(self
            .storage
            .records
            .get_prediction(request_id.as_str(), not_before)?
            .map(|(_, r)| r))
    }

    /// The error for a request without a record.
    pub fn unknown(&self, request_id: &RequestId) -> OutcomeError {
        OutcomeError::UnknownRequest {
            request_id: request_id.clone(),
            retention: self.storage.retention.predictions,
        }
    }

    /// Records one outcome. Blocking: call it off the async runtime.
    pub fn record(&self, o: NewOutcome) -> Result<pb::OutcomeRecord, OutcomeError> {
        let time_ms = o.time_ms.unwrap_or_else(|| self.clock.now_ms());
        let id = &o.request_id;
        let _serialised = self.stripes[stripe_of(id.as_str())].lock();
        let rec = self.prediction(id)?.ok_or_else(|| self.unknown(id))?;
        let rows = rec.predictions.len().max(rec.rows.len()).max(1);
        if o.row as usize >= rows {
            return Err(OutcomeError::RowOutOfRange {
                request_id: id.clone(),
                row: o.row,
                rows,
            });
        }
        let previous = self.storage.records.get_outcome(id.as_str(), o.row)?;
        if previous.is_some() && !o.overwrite {
            return Err(OutcomeError::AlreadyRecorded {
                request_id: id.clone(),
                row: o.row,
            });
        }
        let prediction: Option<Prediction> = rec
            .predictions
            .get(o.row as usize)
            .and_then(crate::convert::prediction_from_pb);
        let judgement = outcome::judge(prediction.as_ref(), &o.actual).map_err(|e| match e {
            JudgeError::Mismatch(_) => OutcomeError::Mismatch(e.to_string()),
            JudgeError::NoPrediction => OutcomeError::NoPrediction(e.to_string()),
        })?;
        let out = pb::OutcomeRecord {
            request_id: id.to_string(),
            row: o.row,
            model: rec.model.clone(),
            version: rec.version,
            actual: Some(crate::convert::actual_to_pb(&o.actual)),
            prediction: prediction.as_ref().map(crate::convert::prediction_to_pb),
            success: judgement.success,
            error: judgement.error,
            time: Some(crate::pb::timestamp(time_ms)),
            experiment: rec.experiment.clone(),
            variant: rec.variant.clone(),
        };
        let replaced = previous.as_ref().map(|(t, old)| {
            (
                *t,
                old,
                Judgement {
                    success: old.success,
                    error: old.error,
                },
            )
        });
        self.storage
            .records
            .write_outcome(OutcomeWrite {
                outcome: &out,
                time_ms,
                judgement: &judgement,
                replaced,
                counted: !rec.variant_forced,
            })
            .map_err(|e| match e {
                // Another replica of the fleet recorded this row's outcome in between.
                StoreError::AlreadyExists => OutcomeError::AlreadyRecorded {
                    request_id: id.clone(),
                    row: o.row,
                },
                e => OutcomeError::Storage(e),
            })?;
        let value = crate::storage::actual_number(&out);
        for m in &self.observers {
            m.observe_outcome(&out.model, out.version, &judgement);
            if !out.experiment.is_empty() && !rec.variant_forced {
                m.observe_variant_outcome(&out.experiment, &out.variant, &judgement, value);
            }
        }
        Ok(out)
    }
}

fn stripe_of(request_id: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(request_id);
    (h % 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::storage::memory::MemoryStore;
    use crate::storage::{RecordWrites, Retention};

    struct NonePending;
    impl PendingPredictions for NonePending {
        fn pending(&self, _: &RequestId) -> Option<pb::PredictionRecord> {
            None
        }
    }

    fn stored(storage: &Storage, id: &str, label: &str, time_ms: u64, experiment: Option<&str>) {
        let mut w = RecordWrites::default();
        w.add_prediction(
            crate::storage::EncodedPrediction::of(&pb::PredictionRecord {
                request_id: id.into(),
                model: "iris".into(),
                version: 2,
                experiment: experiment.unwrap_or_default().into(),
                variant: experiment.map(|_| "treatment").unwrap_or_default().into(),
                predictions: vec![pb::PredictionValue {
                    kind: Some(pb::prediction_value::Kind::Label(label.into())),
                }],
                ..Default::default()
            }),
            time_ms,
        );
        storage.records.commit(w, false).unwrap();
    }

    fn outcome(id: &str, label: &str, overwrite: bool) -> NewOutcome {
        NewOutcome {
            request_id: RequestId::parse(id, "request_id").unwrap(),
            row: 0,
            actual: Actual::Label(label.into()),
            time_ms: None,
            overwrite,
        }
    }

    /// The use case on the in-memory storage: join, judge, refuse a duplicate, replace one and
    /// take its judgement back from the tallies — and retention by the injected clock, with no
    /// sleep.
    #[test]
    fn outcomes_join_once_and_replacements_are_taken_back() {
        let clock = ManualClock::at(1_000_000_000);
        let retention = Retention {
            predictions: Duration::from_secs(60),
            ..Default::default()
        };
        let storage = MemoryStore::storage(clock.clone(), retention);
        let outcomes = Outcomes::new(storage.clone(), clock.clone(), Arc::new(NonePending));
        stored(&storage, "r1", "setosa", clock.now_ms(), Some("ab"));

        let out = outcomes.record(outcome("r1", "virginica", false)).unwrap();
        assert_eq!(out.success, Some(false));
        assert_eq!(out.variant, "treatment");
        let t = storage.tallies.tally("iris", 2).unwrap();
        assert_eq!((t.outcomes, t.judged, t.successes), (1, 1, 0));

        assert!(matches!(
            outcomes.record(outcome("r1", "setosa", false)),
            Err(OutcomeError::AlreadyRecorded { row: 0, .. })
        ));
        outcomes.record(outcome("r1", "setosa", true)).unwrap();
        let t = storage.tallies.tally("iris", 2).unwrap();
        assert_eq!((t.outcomes, t.judged, t.successes), (1, 1, 1));
        let v = storage
            .tallies
            .experiment_counts("ab", &["treatment"])
            .unwrap();
        assert_eq!((v[0].outcomes, v[0].successes), (1, 1));

        let mut late = outcome("r1", "setosa", true);
        late.row = 3;
        assert!(matches!(
            outcomes.record(late),
            Err(OutcomeError::RowOutOfRange { rows: 1, .. })
        ));
        // A minute later the prediction is past retention: the outcome has nothing to join.
        clock.advance(61_000);
        let err = outcomes.record(outcome("r1", "setosa", true)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no prediction record for request id 'r1': unknown, older than the 1m retention, or dropped under load"
        );
    }
}
