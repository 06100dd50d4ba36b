//! Shared online features: the latest value of each entity's features in Redis, so that every
//! replica (and every model) reads what any replica wrote; each replica's RocksDB keeps its own
//! history for point-in-time reads.
//!
//! Layout: a hash per entity, `<prefix>:f:<entity>`, one field per feature holding the value's
//! time (15 zero-padded digits, so that times compare as strings) followed by the value as
//! protobuf. A write keeps the newest value per feature (a Lua script compares the times), and
//! the hash expires after the features' retention. Definitions: a hash `<prefix>:feature-defs`,
//! one JSON field per feature.
//!
//! Reads "as of now" (or of any time at or after the shared value's) merge the shared value with
//! the replica's own, newest first; reads further in the past come from the replica's history.
//! Redis away: reads and writes fall back to the replica's own store (writes are queued for a
//! while and sent when it returns).

use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use super::redis::Redis;
use crate::clock::SharedClock;
use crate::feature_store::{self, FeatureDef};
use crate::pb::modelgate::v1 as pb;
use crate::record::FeatureValue;
use crate::storage::{FeatureStore, StoreError, StoreResult};

/// Keeps the newer value of each field. KEYS[1]: the entity's hash. ARGV[1]: the hash's TTL in
/// ms; ARGV[2]: the values' time (15 digits); then (field, value) pairs whose values start with
/// that time.
///
/// The hash also keeps the newest time written to it ([`NEWEST`]): a write at least that new (the
/// usual case) is stored as it is, with one read of one field; only a write that arrives late
/// (another replica flushed a newer one first) compares field by field.
pub const NEWEST_WINS: &str = r#"
local newest = redis.call('HGET', KEYS[1], '\0t')
if (newest and newest <= ARGV[2]) or ((not newest) and redis.call('EXISTS', KEYS[1]) == 0) then
  redis.call('HSET', KEYS[1], '\0t', ARGV[2], unpack(ARGV, 3))
else
  local n = (#ARGV - 2) / 2
  local fields = {}
  for i = 1, n do
    fields[i] = ARGV[2 * i + 1]
  end
  local current = redis.call('HMGET', KEYS[1], unpack(fields))
  local newer = {}
  for i = 1, n do
    local value = ARGV[2 * i + 2]
    if (not current[i]) or string.sub(current[i], 1, 15) <= string.sub(value, 1, 15) then
      newer[#newer + 1] = fields[i]
      newer[#newer + 1] = value
    end
  end
  if #newer > 0 then
    redis.call('HSET', KEYS[1], unpack(newer))
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"#;

/// The field of an entity's hash that holds the newest time written to it (a NUL byte first,
/// so that no feature name is it).
pub const NEWEST: &str = "\0t";

/// The hash of an entity's shared features.
pub fn entity_key(prefix: &str, entity: &str) -> String {
    format!("{prefix}:f:{entity}")
}

/// A value as kept in the entity's hash: its time first.
pub fn encode_value(time_ms: u64, v: &FeatureValue) -> Vec<u8> {
    let mut out = encode_time(time_ms).to_vec();
    encode_value_into(v, &mut out);
    out
}

/// A value's time as kept: 15 zero-padded digits (times compare as strings).
pub fn encode_time(time_ms: u64) -> [u8; 15] {
    let mut out = [b'0'; 15];
    let mut t = time_ms.min(999_999_999_999_999);
    for d in out.iter_mut().rev() {
        *d = b'0' + (t % 10) as u8;
        t /= 10;
    }
    out
}

/// Appends a value (protobuf) after its time.
pub fn encode_value_into(v: &FeatureValue, out: &mut Vec<u8>) {
    crate::convert::feature_value_to_pb(v)
        .encode(out)
        .expect("a Vec grows");
}

fn decode_value(v: &[u8]) -> Option<(u64, FeatureValue)> {
    let time = std::str::from_utf8(v.get(..15)?).ok()?.parse().ok()?;
    let value = pb::FeatureValue::decode(&v[15..]).ok()?;
    Some((time, crate::convert::feature_value_from_pb(value)?))
}

/// The feature store of a replica in a fleet.
pub struct FleetFeatures {
    redis: Arc<Redis>,
    local: Arc<dyn FeatureStore>,
    prefix: String,
    retention: Duration,
    clock: SharedClock,
}

impl FleetFeatures {
    /// Features under `prefix`, with the replica's own store `local`; values older than
    /// `retention` (by `clock`) are not served, as from the replica's own store.
    pub fn new(
        redis: Arc<Redis>,
        prefix: &str,
        local: Arc<dyn FeatureStore>,
        retention: Duration,
        clock: SharedClock,
    ) -> Self {
        FleetFeatures {
            redis,
            local,
            prefix: prefix.to_string(),
            retention,
            clock,
        }
    }

    fn defs_key(&self) -> String {
        format!("{}:feature-defs", self.prefix)
    }
}

impl FeatureStore for FleetFeatures {
    fn load_feature_defs(&self) -> StoreResult<Vec<FeatureDef>> {
        let mut defs = self.local.load_feature_defs()?;
        let shared: Vec<(String, Vec<u8>)> = match self
            .redis
            .with(|c| redis::cmd("HGETALL").arg(self.defs_key()).query(c))
        {
            Ok(s) => s,
            Err(StoreError::Unavailable(_)) => return Ok(defs),
            Err(e) => return Err(e),
        };
        for (name, json) in shared {
            let Ok(d) = serde_json::from_slice::<FeatureDef>(&json) else {
                continue;
            };
            match defs.iter_mut().find(|x| x.name == name) {
                Some(mine) => *mine = d,
                None => defs.push(d),
            }
        }
        Ok(defs)
    }

    fn put_feature_defs(&self, defs: &[FeatureDef]) -> StoreResult<()> {
        self.local.put_feature_defs(defs)?;
        if defs.is_empty() {
            return Ok(());
        }
        self.redis.with(|c| {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(self.defs_key());
            for d in defs {
                cmd.arg(&d.name)
                    .arg(serde_json::to_vec(d).expect("definitions serialise"));
            }
            cmd.query::<()>(c)
        })
    }

    fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> StoreResult<Vec<Vec<Option<(u64, FeatureValue)>>>> {
        let mut rows = self.local.get_features(entities, features, as_of_ms)?;
        if features.is_empty() || entities.is_empty() {
            return Ok(rows);
        }
        let shared = self.redis.pipeline::<Vec<Vec<Option<Vec<u8>>>>>(
            entities
                .iter()
                .map(|e| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(entity_key(&self.prefix, e));
                    for (f, _) in features {
                        cmd.arg(f);
                    }
                    cmd
                })
                .collect(),
        );
        let shared = match shared {
            Ok(s) => s,
            // Redis away: this replica's own values.
            Err(StoreError::Unavailable(_)) => return Ok(rows),
            Err(e) => return Err(e),
        };
        // The replica's retention applies to shared values too.
        let retained = crate::storage::cutoff(self.clock.now_ms(), self.retention);
        for (row, values) in rows.iter_mut().zip(shared) {
            for ((mine, theirs), (_, ttl)) in row.iter_mut().zip(values).zip(features) {
                let Some((t, v)) = theirs.as_deref().and_then(decode_value) else {
                    continue;
                };
                if t < retained || !feature_store::visible(t, as_of_ms, *ttl) {
                    continue;
                }
                if mine.as_ref().is_none_or(|(m, _)| *m < t) {
                    *mine = Some((t, v));
                }
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_time_and_compare_as_strings() {
        let a = encode_value(999, &FeatureValue::Number(0.25));
        let b = encode_value(1_000, &FeatureValue::Text("x".into()));
        assert!(a[..15] < b[..15]);
        assert_eq!(decode_value(&a), Some((999, FeatureValue::Number(0.25))));
        assert_eq!(
            decode_value(&b),
            Some((1_000, FeatureValue::Text("x".into())))
        );
        assert_eq!(decode_value(b"short"), None);
        assert_eq!(&encode_time(1_764_000_000_123), b"001764000000123");
        assert_eq!(&encode_time(0), b"000000000000000");
    }
}
