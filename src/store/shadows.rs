//! Shadow observations in RocksDB: counters (mirrored, skipped, dropped, timeouts, errors by
//! status, compared, agreed) in `counters`, latency histograms, and recent disagreements in
//! `shadow_log`.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};

use super::records::{int_counter, parse_counter, Counter, RecordBatch};
use super::{cf, keys, Store, StoreError};

/// Production and shadow latencies of one shadow, in microseconds.
#[derive(Clone, Debug)]
pub struct ShadowLatency {
    /// Production's upstream latency for the mirrored requests.
    pub production: Histogram<u64>,
    /// The shadow's latency.
    pub shadow: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs … 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

impl Default for ShadowLatency {
    fn default() -> Self {
        ShadowLatency {
            production: histogram(),
            shadow: histogram(),
        }
    }
}

impl ShadowLatency {
    /// Records one pair.
    pub fn record(&mut self, production: Duration, shadow: Duration) {
        let us = |d: Duration| (d.as_micros() as u64).clamp(1, 600_000_000);
        let _ = self.production.record(us(production));
        let _ = self.shadow.record(us(shadow));
    }

    fn encode(&self) -> Option<Vec<u8>> {
        let mut a = Vec::new();
        let mut b = Vec::new();
        V2Serializer::new()
            .serialize(&self.production, &mut a)
            .ok()?;
        V2Serializer::new().serialize(&self.shadow, &mut b).ok()?;
        let mut out = Vec::with_capacity(a.len() + b.len() + 5);
        out.push(b'l');
        out.extend_from_slice(&(a.len() as u32).to_be_bytes());
        out.extend_from_slice(&a);
        out.extend_from_slice(&b);
        Some(out)
    }

    fn decode(v: &[u8]) -> Option<ShadowLatency> {
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
}

/// A logged disagreement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Disagreement {
    /// Request id.
    pub request_id: String,
    /// Time of the original request.
    pub time_ms: u64,
    /// First row that disagreed.
    pub row: u32,
    /// Production's answer for it.
    pub production: String,
    /// The shadow's answer for it.
    pub shadow: String,
}

/// The counters of one shadow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShadowCounts {
    /// Copies sent.
    pub mirrored: u64,
    /// Requests not sampled.
    pub skipped: u64,
    /// Copies dropped at the in-flight cap.
    pub dropped: u64,
    /// Copies past their deadline.
    pub timeouts: u64,
    /// Copies not sent because the shadow was down (breaker open).
    pub suppressed: u64,
    /// Failed copies by gRPC status name.
    pub errors: BTreeMap<String, u64>,
    /// Rows (or messages) compared.
    pub compared: u64,
    /// Of which agreed.
    pub agreed: u64,
}

impl RecordBatch<'_> {
    /// Adds `n` to a shadow counter.
    pub fn add_shadow_count(&mut self, model: &str, version: u32, name: &str, n: i64) {
        if n != 0 {
            self.batch.merge_cf(
                self.store.cf(cf::COUNTERS),
                keys::shadow_counter_key(model, version, name),
                int_counter(n),
            );
        }
    }

    /// Stores a shadow's latency histograms.
    pub fn put_shadow_latency(&mut self, model: &str, version: u32, h: &ShadowLatency) {
        if let Some(v) = h.encode() {
            self.batch.put_cf(
                self.store.cf(cf::COUNTERS),
                keys::shadow_counter_key(model, version, "latency"),
                v,
            );
        }
    }

    /// Logs a disagreement.
    #[allow(clippy::too_many_arguments)]
    pub fn add_disagreement(
        &mut self,
        model: &str,
        version: u32,
        time_ms: u64,
        request_id: &str,
        row: u32,
        production: &str,
        shadow: &str,
    ) {
        let d = Disagreement {
            request_id: request_id.to_string(),
            time_ms,
            row,
            production: production.to_string(),
            shadow: shadow.to_string(),
        };
        self.batch.put_cf(
            self.store.cf(cf::SHADOW_LOG),
            keys::shadow_log_key(model, version, time_ms, request_id),
            serde_json::to_vec(&d).expect("disagreements serialise"),
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
            let n = n.max(0) as u64;
            match name.as_str() {
                "mirrored" => c.mirrored = n,
                "skipped" => c.skipped = n,
                "dropped" => c.dropped = n,
                "timeouts" => c.timeouts = n,
                "suppressed" => c.suppressed = n,
                "compared" => c.compared = n,
                "agreed" => c.agreed = n,
                other => {
                    if let Some(code) = other.strip_prefix("error.") {
                        c.errors.insert(code.to_string(), n);
                    }
                }
            }
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
        Ok(v.as_deref().and_then(ShadowLatency::decode))
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
        let not_before = super::records::cutoff(self.retention.predictions);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histograms_round_trip() {
        let mut h = ShadowLatency::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms), Duration::from_millis(ms * 10));
        }
        let back = ShadowLatency::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(back.production.len(), 100);
        assert_eq!(
            back.shadow.value_at_quantile(0.5),
            h.shadow.value_at_quantile(0.5)
        );
        assert!(ShadowLatency::decode(b"junk").is_none());
    }
}
