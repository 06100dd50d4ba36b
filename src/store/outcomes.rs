//! Outcomes: `outcomes` (request id ∅ row → time ‖ `OutcomeRecord`), their index by model version
//! and time with each one's judgement, `outcome_index`, and the version's tallies in `counters`
//! (written with the outcome in one batch, a replaced outcome's contribution taken back), read as
//! all-time figures or over the most recent outcomes.
//!
//! | family | key | value |
//! |---|---|---|
//! | `outcomes` | request id ∅ row | time ‖ `OutcomeRecord` |
//! | `outcome_index` | model ∅ version ‖ time ‖ request id ∅ row | judgement (flags, error) |
//! | `counters` | `v` model ∅ version ‖ name | tagged i64 / f64, merged by addition |

use prost::Message;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::counters::{float_counter, int_counter, moments_counter, parse_counter, Counter};
use super::records::decode_err;
use super::{cf, keys, Store, StoreError};
use crate::outcome::{Judgement, Tally, TallyDelta};
use crate::pb::modelgate::v1 as pb;
use crate::storage::{actual_number, OutcomeWrite};

/// The counters of a model version's tally, in [`Tally`]'s order: four integers, two floats.
const COUNTERS: [&str; 6] = [
    "outcomes",
    "judged",
    "successes",
    "regression",
    "abs_error",
    "sq_error",
];

/// The judgement stored in `outcome_index`: flags (has success, success, has error), error (f64 LE).
fn encode_judgement(j: &Judgement) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0] = u8::from(j.success.is_some())
        | (u8::from(j.success == Some(true)) << 1)
        | (u8::from(j.error.is_some()) << 2);
    b[1..].copy_from_slice(&j.error.unwrap_or(0.0).to_le_bytes());
    b
}

/// Reads back [`encode_judgement`]'s form; `None` when malformed.
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

impl Store {
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
    pub fn write_outcome(&self, w: OutcomeWrite<'_>) -> Result<(), StoreError> {
        let OutcomeWrite {
            outcome,
            time_ms,
            judgement,
            replaced,
            counted,
        } = w;
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
