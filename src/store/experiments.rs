//! Experiment observations in `counters`: each variant's requests (merged by addition), its
//! distinct-unit sketch (HyperLogLog registers, tag `h`, replaced whole), and the outcome counters
//! `outcomes.rs` writes with each counted outcome; read together as [`VariantCounts`].
//!
//! | family | key | value |
//! |---|---|---|
//! | `counters` | `e` experiment ∅ variant ∅ name | tagged i64, moments, or `h` ‖ registers |

use super::counters::{int_counter, parse_counter, Counter};
use super::records::RecordBatch;
use super::{cf, keys, Store, StoreError};
use crate::experiment::{unit_estimate_registers, VariantCounts};
use crate::stats::Moments;

impl RecordBatch<'_> {
    /// Counts `n` requests of an experiment variant.
    pub(super) fn add_experiment_requests(&mut self, experiment: &str, variant: &str, n: u64) {
        self.batch.merge_cf(
            self.families.counters,
            keys::experiment_counter_key(experiment, variant, "requests"),
            int_counter(n as i64),
        );
    }

    /// Stores the distinct-unit sketch (HyperLogLog registers) of an experiment variant.
    pub(super) fn put_experiment_units(
        &mut self,
        experiment: &str,
        variant: &str,
        registers: &[u8],
    ) {
        let mut v = Vec::with_capacity(registers.len() + 1);
        v.push(b'h');
        v.extend_from_slice(registers);
        self.batch.put_cf(
            self.families.counters,
            keys::experiment_counter_key(experiment, variant, "units"),
            v,
        );
    }
}

impl Store {
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
}

/// The distinct units a stored sketch estimates (0 when it is not one).
fn unit_estimate(v: &[u8]) -> u64 {
    match v.split_first() {
        Some((b'h', registers)) => unit_estimate_registers(registers),
        _ => 0,
    }
}
