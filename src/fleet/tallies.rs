//! Fleet-wide tallies: experiment counters, moments and unit sketches, per-version outcome
//! tallies, shadow counters and latencies, summed over the replicas.
//!
//! Each replica keeps its own tallies in its own store, exactly as without a fleet, and
//! publishes them — absolute values, not deltas — to Redis: one hash per tallied object, one
//! field per replica (`<prefix>:tally:<kind>:<object>` → `<replica id>` → value). A reader sums
//! the fields (merges the sketches, adds the histograms), taking its own share from its own store
//! so that it is never behind. Publishing an absolute value is idempotent, which is what makes
//! the fleet's figures exact: a publication repeated after a crash, a Redis outage or a restart
//! counts nothing twice, and a replica's share stays in Redis after the replica is gone. The
//! replica's store is the spool: what Redis has not seen yet is still there, and is published
//! when Redis returns.
//!
//! What stays per replica: the recent windows (the last `n` outcomes of a version, the last
//! disagreements of a shadow), which have no order across replicas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

use super::redis::Redis;
use crate::experiment::{merge_unit_registers, unit_estimate_registers, VariantCounts};
use crate::outcome::Tally;
use crate::shadow::{Disagreement, ShadowCounts, ShadowLatency};
use crate::state::StateSource;
use crate::storage::{StoreError, StoreResult, Tallies};

/// A hash's fields: (replica, value).
type Fields = Vec<(String, Vec<u8>)>;

/// The fleet's tallies, as a [`Tallies`].
pub struct FleetTallies {
    redis: Arc<Redis>,
    local: Arc<dyn Tallies>,
    keys: Keys,
    replica: String,
}

/// Where each tallied object is kept.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    fn experiment(&self, experiment: &str, variant: &str) -> String {
        format!("{}:tally:experiment:{experiment}:{variant}", self.prefix)
    }
    fn units(&self, experiment: &str, variant: &str) -> String {
        format!("{}:tally:units:{experiment}:{variant}", self.prefix)
    }
    fn version(&self, model: &str, version: u32) -> String {
        format!("{}:tally:version:{model}:{version}", self.prefix)
    }
    fn shadow(&self, model: &str, version: u32) -> String {
        format!("{}:tally:shadow:{model}:{version}", self.prefix)
    }
    fn latency(&self, model: &str, version: u32) -> String {
        format!("{}:tally:shadow-latency:{model}:{version}", self.prefix)
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("tallies serialise")
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(v).map_err(|source| StoreError::Value {
        family: "fleet tallies",
        key: key.to_string(),
        source,
    })
}

fn latency_bytes(l: &ShadowLatency) -> Vec<u8> {
    let mut out = Vec::new();
    for h in [&l.production, &l.shadow] {
        let mut b = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut b)
            .expect("histograms serialise");
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    out
}

fn latency_of(mut v: &[u8]) -> Option<ShadowLatency> {
    let mut read = || -> Option<hdrhistogram::Histogram<u64>> {
        let n = u32::from_le_bytes(v.get(..4)?.try_into().ok()?) as usize;
        let body = v.get(4..4 + n)?;
        v = &v[4 + n..];
        Deserializer::new().deserialize(&mut &body[..]).ok()
    };
    let production = read()?;
    let shadow = read()?;
    Some(ShadowLatency { production, shadow })
}

impl FleetTallies {
    /// The fleet's tallies under `prefix`, this replica's share read from `local`.
    pub fn new(redis: Arc<Redis>, prefix: &str, replica: String, local: Arc<dyn Tallies>) -> Self {
        FleetTallies {
            redis,
            local,
            keys: Keys {
                prefix: prefix.to_string(),
            },
            replica,
        }
    }

    /// The other replicas' fields of each key, read in one round trip.
    fn others(&self, keys: &[String]) -> StoreResult<Vec<Fields>> {
        let r = self.redis.pipeline::<Vec<Fields>>(
            keys.iter()
                .map(|k| {
                    let mut c = redis::cmd("HGETALL");
                    c.arg(k);
                    c
                })
                .collect(),
        );
        Ok(r?
            .into_iter()
            .map(|fields| {
                fields
                    .into_iter()
                    .filter(|(replica, _)| *replica != self.replica)
                    .collect()
            })
            .collect())
    }
}

impl Tallies for FleetTallies {
    fn experiment_counts(
        &self,
        experiment: &str,
        variants: &[&str],
    ) -> StoreResult<Vec<VariantCounts>> {
        let mut counts = self.local.experiment_counts(experiment, variants)?;
        let keys: Vec<String> = variants
            .iter()
            .flat_map(|v| {
                [
                    self.keys.experiment(experiment, v),
                    self.keys.units(experiment, v),
                ]
            })
            .collect();
        let others = self.others(&keys)?;
        for (i, v) in variants.iter().enumerate() {
            let c = &mut counts[i];
            for (_, value) in &others[2 * i] {
                c.merge(&parse::<VariantCounts>(&keys[2 * i], value)?);
            }
            let mut registers = self
                .local
                .experiment_units(experiment, v)?
                .unwrap_or_default();
            for (_, r) in &others[2 * i + 1] {
                merge_unit_registers(&mut registers, r);
            }
            c.units = unit_estimate_registers(&registers);
        }
        Ok(counts)
    }

    fn experiment_units(&self, experiment: &str, variant: &str) -> StoreResult<Option<Vec<u8>>> {
        let mut registers = self.local.experiment_units(experiment, variant)?;
        for (_, r) in &self.others(&[self.keys.units(experiment, variant)])?[0] {
            merge_unit_registers(registers.get_or_insert_with(Vec::new), r);
        }
        Ok(registers)
    }

    fn tally(&self, model: &str, version: u32) -> StoreResult<Tally> {
        let mut t = self.local.tally(model, version)?;
        let key = self.keys.version(model, version);
        for (_, v) in &self.others(std::slice::from_ref(&key))?[0] {
            t.merge(&parse(&key, v)?);
        }
        Ok(t)
    }

    fn recent_tally(&self, model: &str, version: u32, n: usize) -> StoreResult<Tally> {
        self.local.recent_tally(model, version, n)
    }

    fn shadow_counts(&self, model: &str, version: u32) -> StoreResult<ShadowCounts> {
        let mut c = self.local.shadow_counts(model, version)?;
        let key = self.keys.shadow(model, version);
        for (_, v) in &self.others(std::slice::from_ref(&key))?[0] {
            c.merge(&parse(&key, v)?);
        }
        Ok(c)
    }

    fn shadow_latency(&self, model: &str, version: u32) -> StoreResult<Option<ShadowLatency>> {
        let mut l = self.local.shadow_latency(model, version)?;
        for (_, v) in &self.others(&[self.keys.latency(model, version)])?[0] {
            let Some(other) = latency_of(v) else { continue };
            match l.as_mut() {
                None => l = Some(other),
                Some(mine) => {
                    // Same bounds everywhere (shadow::histogram), so adding cannot fail.
                    let _ = mine.production.add(&other.production);
                    let _ = mine.shadow.add(&other.shadow);
                }
            }
        }
        Ok(l)
    }

    fn recent_disagreements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Disagreement>> {
        self.local.recent_disagreements(model, version, n)
    }
}

/// Publishes this replica's tallies: every `every`, what changed since the last publication;
/// everything again every `full_every` rounds and after any failure (Redis restarted empty, a
/// publication lost), so Redis converges to the replica's store whatever happened in between.
pub struct Publisher {
    /// The fleet's Redis.
    pub redis: Arc<Redis>,
    /// Where the tallied objects are.
    pub keys: Keys,
    /// This replica's id (the field it writes).
    pub replica: String,
    /// This replica's own tallies.
    pub local: Arc<dyn Tallies>,
    /// The configuration (which experiments, versions and shadows exist).
    pub state: Arc<dyn StateSource>,
}

impl Publisher {
    /// The keys for a fleet under `prefix`.
    pub fn keys(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Every tallied object of this replica, as (key, value).
    fn snapshot(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let state = self.state.state();
        let mut out = Vec::new();
        for e in state.experiments.all() {
            let names: Vec<&str> = e.variants.iter().map(|v| v.name.as_str()).collect();
            let counts = self.local.experiment_counts(&e.name, &names)?;
            for (v, c) in names.iter().zip(counts) {
                let c = VariantCounts { units: 0, ..c };
                if c != VariantCounts::default() {
                    out.push((self.keys.experiment(&e.name, v), json(&c)));
                }
                if let Some(r) = self.local.experiment_units(&e.name, v)? {
                    out.push((self.keys.units(&e.name, v), r));
                }
            }
        }
        for m in state.registry.models() {
            for v in m.versions.keys() {
                let t = self.local.tally(&m.meta.name, *v)?;
                if t != Tally::default() {
                    out.push((self.keys.version(&m.meta.name, *v), json(&t)));
                }
            }
        }
        for s in state.shadows.all() {
            let c = self.local.shadow_counts(&s.model, s.version)?;
            if c != ShadowCounts::default() {
                out.push((self.keys.shadow(&s.model, s.version), json(&c)));
            }
            if let Some(l) = self.local.shadow_latency(&s.model, s.version)? {
                out.push((self.keys.latency(&s.model, s.version), latency_bytes(&l)));
            }
        }
        Ok(out)
    }

    /// One round: publishes what differs from `published` (all of it when `published` is
    /// empty). On failure `published` is cleared, so the next round publishes everything.
    pub fn round(&self, published: &mut HashMap<String, Vec<u8>>) -> StoreResult<usize> {
        let snapshot = self.snapshot()?;
        let changed: Vec<&(String, Vec<u8>)> = snapshot
            .iter()
            .filter(|(k, v)| published.get(k) != Some(v))
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let r = self.redis.pipeline::<redis::Value>(
            changed
                .iter()
                .map(|(k, v)| {
                    let mut c = redis::cmd("HSET");
                    c.arg(k).arg(&self.replica).arg(v.as_slice());
                    c
                })
                .collect(),
        );
        match r {
            Ok(_) => {
                for (k, v) in changed.iter() {
                    published.insert(k.clone(), v.clone());
                }
                Ok(changed.len())
            }
            Err(e) => {
                published.clear();
                Err(e)
            }
        }
    }

    /// Publishes every `every` until `stop`; a full publication every `full_every` rounds.
    pub fn run(self, every: Duration, full_every: u32, stop: Arc<AtomicBool>) {
        let mut published = HashMap::new();
        let mut round = 0u32;
        while !stop.load(Ordering::Acquire) {
            round = round.wrapping_add(1);
            if round % full_every.max(1) == 0 {
                published.clear();
            }
            if let Err(e) = self.round(&mut published) {
                tracing::debug!(error = %e, "publishing tallies to the fleet store failed; retrying");
            }
            std::thread::sleep(every);
        }
        // A last publication on the way out (a clean shutdown loses nothing to the interval).
        let _ = self.round(&mut published);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_round_trip() {
        let mut l = ShadowLatency::default();
        l.production.record(1200).unwrap();
        l.shadow.record(3400).unwrap();
        let back = latency_of(&latency_bytes(&l)).unwrap();
        assert_eq!(back.production.len(), 1);
        assert_eq!(back.shadow.max(), l.shadow.max());
        assert!(latency_of(b"junk").is_none());
    }
}
