//! Shadow observations in RocksDB: counters (mirrored, skipped, dropped, timeouts, errors by
//! status, compared, agreed) in `counters`, latency histograms, and recent disagreements in
//! `shadow_log`.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use rocksdb::{Direction, IteratorMode};

use super::counters::{int_counter, parse_counter, Counter};
use super::records::RecordBatch;
use super::{cf, keys, Store, StoreError};
use crate::shadow::{Disagreement, ShadowCounts, ShadowLatency};

/// Encodes latency histograms: tag 'l', the production histogram's length, both (HdrHistogram V2).
pub(super) fn encode_latency(h: &ShadowLatency) -> Option<Vec<u8>> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    V2Serializer::new().serialize(&h.production, &mut a).ok()?;
    V2Serializer::new().serialize(&h.shadow, &mut b).ok()?;
    let mut out = Vec::with_capacity(a.len() + b.len() + 5);
    out.push(b'l');
    out.extend_from_slice(&(a.len() as u32).to_be_bytes());
    out.extend_from_slice(&a);
    out.extend_from_slice(&b);
    Some(out)
}

pub(super) fn decode_latency(v: &[u8]) -> Option<ShadowLatency> {
    if v.first() != Some(&b'l') || v.len() < 5 {
        return None;
    }
    let n = u32::from_be_bytes(v[1..5].try_into().ok()?) as usize;
    let (a, b) = v[5..].split_at_checked(n)?;
    let mut d = Deserializer::new();
    Some(ShadowLatency {
        production: d.deserialize(&mut &a[..]).ok()?,
        shadow: d.deserialize(&mut &b[..]).ok()?,
    })
}

impl RecordBatch<'_> {
    /// Adds `n` to a shadow counter.
    pub(super) fn add_shadow_count(&mut self, model: &str, version: u32, name: &str, n: i64) {
        if n != 0 {
            self.batch.merge_cf(
                self.families.counters,
                keys::shadow_counter_key(model, version, name),
                int_counter(n),
            );
        }
    }

    /// Stores a shadow's latency histograms.
    pub(super) fn put_shadow_latency(&mut self, model: &str, version: u32, h: &ShadowLatency) {
        if let Some(v) = encode_latency(h) {
            self.batch.put_cf(
                self.families.counters,
                keys::shadow_counter_key(model, version, "latency"),
                v,
            );
        }
    }

    /// Logs a disagreement.
    pub(super) fn add_disagreement(&mut self, model: &str, version: u32, d: &Disagreement) {
        self.batch.put_cf(
            self.store.family_id(cf::SHADOW_LOG),
            keys::shadow_log_key(model, version, d.time_ms, &d.request_id),
            serde_json::to_vec(d).expect("disagreements serialise"),
        );
    }
}

impl Store {
    /// A shadow's counters.
    pub fn shadow_counts(&self, model: &str, version: u32) -> Result<ShadowCounts, StoreError> {
        let prefix = keys::shadow_counter_prefix(model, version);
        let mut c = ShadowCounts::default();
        for item in self.db.iterator_cf(
            self.cf(cf::COUNTERS),
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let Some(Counter::Int(n)) = parse_counter(&v) else {
                continue;
            };
            c.add_stored(&name, n.max(0) as u64);
        }
        Ok(c)
    }

    /// A shadow's stored latency histograms.
    pub fn shadow_latency(
        &self,
        model: &str,
        version: u32,
    ) -> Result<Option<ShadowLatency>, StoreError> {
        let v = self.db.get_cf(
            self.cf(cf::COUNTERS),
            keys::shadow_counter_key(model, version, "latency"),
        )?;
        Ok(v.as_deref().and_then(decode_latency))
    }

    /// The most recent `n` retained disagreements of a shadow, newest first.
    pub fn recent_disagreements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> Result<Vec<Disagreement>, StoreError> {
        let prefix = keys::outcome_index_prefix(model, version);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&[0xff; 9]);
        let not_before = self.cutoff(self.retention.predictions);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(cf::SHADOW_LOG),
            IteratorMode::From(&upper, Direction::Reverse),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= n {
                break;
            }
            let d: Disagreement =
                serde_json::from_slice(&v).map_err(|source| StoreError::Value {
                    family: cf::SHADOW_LOG,
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?;
            if d.time_ms >= not_before {
                out.push(d);
            }
        }
        Ok(out)
    }
}

impl crate::storage::Tallies for Store {
    fn experiment_counts(
        &self,
        experiment: &str,
        variants: &[&str],
    ) -> Result<Vec<crate::experiment::VariantCounts>, StoreError> {
        Store::experiment_counts(self, experiment, variants)
    }

    fn experiment_units(
        &self,
        experiment: &str,
        variant: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Store::experiment_units(self, experiment, variant)
    }

    fn tally(&self, model: &str, version: u32) -> Result<crate::outcome::Tally, StoreError> {
        Store::tally(self, model, version)
    }

    fn recent_tally(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> Result<crate::outcome::Tally, StoreError> {
        Store::recent_tally(self, model, version, n)
    }

    fn shadow_counts(&self, model: &str, version: u32) -> Result<ShadowCounts, StoreError> {
        Store::shadow_counts(self, model, version)
    }

    fn shadow_latency(
        &self,
        model: &str,
        version: u32,
    ) -> Result<Option<ShadowLatency>, StoreError> {
        Store::shadow_latency(self, model, version)
    }

    fn recent_disagreements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> Result<Vec<Disagreement>, StoreError> {
        Store::recent_disagreements(self, model, version, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_histograms_round_trip() {
        let mut h = ShadowLatency::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms), Duration::from_millis(ms * 10));
        }
        let back = decode_latency(&encode_latency(&h).unwrap()).unwrap();
        assert_eq!(back.production.len(), 100);
        assert_eq!(
            back.shadow.value_at_quantile(0.5),
            h.shadow.value_at_quantile(0.5)
        );
        assert!(decode_latency(b"junk").is_none());
    }
}
