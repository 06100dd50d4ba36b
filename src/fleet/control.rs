//! The fleet's one configuration: registry, experiments and shadows in one Redis hash, changed by
//! a version-checked Lua script, with a copy in the replica's own store.
//!
//! Layout: the hash `<prefix>:config` holds one field per record — `meta/<model>`,
//! `version/<model>/<n>`, `policy/<model>`, `experiment/<name>`, `shadow/<model>/<n>` — each the
//! record's JSON (the same JSON RocksDB keeps), and `#version`, the number of changes made. One
//! key, so a read (HGETALL) is a consistent snapshot and a change is atomic in a Cluster too.
//! A change is applied only if `#version` is still the one the writer read; the script then
//! bumps it and publishes the new number on `<prefix>:config-changed`.
//!
//! The local copy: every state read from Redis, and every change written to it, is also written
//! to the replica's own store, which serves when Redis is away at start.
//!
//! Redis restarted empty (or a replica's first start in fleet mode against an empty Redis): the
//! hash has no `#version`. A replica that finds it so seeds Redis with its own last state
//! (version-checked against 0, so one replica wins and the others load its seed). Changes that
//! only reached the lost Redis and no replica are lost with it; Redis persistence (AOF) is the
//! remedy (docs/fleet.md).

use std::sync::Arc;

use redis::Script;

use super::redis::Redis;
use super::FleetStatus;
use crate::experiment::{Experiment, Experiments};
use crate::registry::{ModelMeta, ModelVersion, PromotionPolicy, Registry};
use crate::shadow::{Shadow, Shadows};
use crate::state::{State, Update};
use crate::storage::{ControlStore, SharedControl, StoreError, StoreResult};

const VERSION_FIELD: &str = "#version";

/// Applies a change if the configuration is still at the expected version. KEYS[1]: the hash.
/// ARGV: expected version, channel, number of fields set, then field/value pairs, then fields
/// to delete. Returns the new version, or -1 when the version moved.
const WRITE_IF: &str = r#"
local current = tonumber(redis.call('HGET', KEYS[1], '#version') or '0')
if current ~= tonumber(ARGV[1]) then
  return -1
end
local sets = tonumber(ARGV[3])
local i = 4
for _ = 1, sets do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  i = i + 1
end
current = current + 1
redis.call('HSET', KEYS[1], '#version', current)
redis.call('PUBLISH', ARGV[2], current)
return current
"#;

/// The configuration kept in Redis, with the local copy.
pub struct FleetControl {
    redis: Arc<Redis>,
    local: Arc<dyn ControlStore>,
    key: String,
    channel: String,
    script: Script,
    status: Arc<FleetStatus>,
}

impl FleetControl {
    /// The configuration under `prefix` in `redis`, copied to `local`.
    pub fn new(
        redis: Arc<Redis>,
        prefix: &str,
        local: Arc<dyn ControlStore>,
        status: Arc<FleetStatus>,
    ) -> Self {
        FleetControl {
            redis,
            local,
            key: format!("{prefix}:config"),
            channel: channel(prefix),
            script: Script::new(WRITE_IF),
            status,
        }
    }

    fn read(&self) -> StoreResult<(u64, State)> {
        let fields: Vec<(String, Vec<u8>)> = self
            .redis
            .with(|c| redis::cmd("HGETALL").arg(&self.key).query(c))?;
        decode(&fields)
    }

    /// Makes the local copy equal `state`.
    fn copy_locally(&self, state: &State) -> StoreResult<()> {
        let old = self.local.load_state()?;
        if old != *state {
            self.local.write_control(&Update::replacing(&old, state))?;
        }
        Ok(())
    }
}

/// The channel a fleet's configuration changes are announced on.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:config-changed")
}

impl ControlStore for FleetControl {
    /// The fleet's configuration, or the local copy when Redis is away.
    fn load_state(&self) -> StoreResult<State> {
        match self.load_versioned() {
            Ok((_, s)) => Ok(s),
            Err(StoreError::Unavailable(_)) => self.local.load_state(),
            Err(e) => Err(e),
        }
    }

    /// Not used (the control plane writes through [`SharedControl::write_if`]); writes at the
    /// current version, for completeness.
    fn write_control(&self, update: &Update) -> StoreResult<()> {
        let base = self.version()?;
        match self.write_if(base, update)? {
            Some(_) => Ok(()),
            None => Err(StoreError::Unavailable(
                "the fleet's configuration changed during the write; retry".into(),
            )),
        }
    }

    fn shared(&self) -> Option<&dyn SharedControl> {
        Some(self)
    }
}

impl SharedControl for FleetControl {
    fn load_versioned(&self) -> StoreResult<(u64, State)> {
        let (version, state) = self.read()?;
        if version == 0 {
            // Empty: seed it with this replica's last state (see the module documentation).
            let mine = self.local.load_state()?;
            if mine != State::default() {
                tracing::warn!(
                    redis = %self.redis.display,
                    "the fleet's configuration is missing from Redis (restarted empty?); seeding it with this replica's last state"
                );
                self.write_if(0, &Update::replacing(&State::default(), &mine))?;
                let (version, state) = self.read()?;
                self.copy_locally(&state)?;
                self.status.serving(version);
                return Ok((version, state));
            }
        }
        self.copy_locally(&state)?;
        self.status.serving(version);
        Ok((version, state))
    }

    fn version(&self) -> StoreResult<u64> {
        let v: Option<u64> = self.redis.with(|c| {
            redis::cmd("HGET")
                .arg(&self.key)
                .arg(VERSION_FIELD)
                .query(c)
        })?;
        Ok(v.unwrap_or(0))
    }

    fn write_if(&self, base: u64, update: &Update) -> StoreResult<Option<u64>> {
        let (sets, deletes) = fields_of(update);
        let mut call = self.script.prepare_invoke();
        call.key(&self.key)
            .arg(base)
            .arg(&self.channel)
            .arg(sets.len());
        for (f, v) in &sets {
            call.arg(f).arg(v.as_slice());
        }
        for f in &deletes {
            call.arg(f);
        }
        let written: i64 = self.redis.with(|c| call.invoke(c))?;
        if written < 0 {
            return Ok(None);
        }
        // The local copy follows; a failure here only leaves it a change behind, which the next
        // read from Redis repairs.
        if let Err(e) = self.local.write_control(update) {
            tracing::warn!(error = %e, "cannot copy the fleet's configuration change locally");
        }
        self.status.serving(written as u64);
        Ok(Some(written as u64))
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("configuration records serialise")
}

/// The hash fields an update sets and deletes.
fn fields_of(u: &Update) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let r = &u.registry;
    let mut sets = Vec::new();
    for m in &r.put_models {
        sets.push((format!("meta/{}", m.name), json(m)));
    }
    for v in &r.put_versions {
        sets.push((format!("version/{}/{}", v.model, v.version), json(v)));
    }
    for (m, p) in &r.put_policies {
        sets.push((format!("policy/{m}"), json(p)));
    }
    for e in &u.experiments {
        sets.push((format!("experiment/{}", e.name), json(e)));
    }
    for s in &u.put_shadows {
        sets.push((format!("shadow/{}/{}", s.model, s.version), json(s)));
    }
    let mut deletes: Vec<String> = r
        .delete_versions
        .iter()
        .map(|(m, v)| format!("version/{m}/{v}"))
        .collect();
    deletes.extend(
        u.delete_shadows
            .iter()
            .map(|(m, v)| format!("shadow/{m}/{v}")),
    );
    (sets, deletes)
}

/// The state and version a hash's fields hold.
fn decode(fields: &[(String, Vec<u8>)]) -> StoreResult<(u64, State)> {
    fn parse<T: serde::de::DeserializeOwned>(field: &str, v: &[u8]) -> StoreResult<T> {
        serde_json::from_slice(v).map_err(|source| StoreError::Value {
            family: "fleet configuration",
            key: field.to_string(),
            source,
        })
    }
    let (mut version, mut metas, mut versions, mut policies) = (0, vec![], vec![], vec![]);
    let (mut experiments, mut shadows) = (Vec::<Experiment>::new(), Vec::<Shadow>::new());
    for (field, value) in fields {
        let Some((kind, rest)) = field.split_once('/') else {
            if field == VERSION_FIELD {
                version = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| StoreError::Key(format!("bad {VERSION_FIELD} in Redis")))?;
            }
            continue;
        };
        match kind {
            "meta" => metas.push(parse::<ModelMeta>(field, value)?),
            "version" => versions.push(parse::<ModelVersion>(field, value)?),
            "policy" => policies.push((rest.to_string(), parse::<PromotionPolicy>(field, value)?)),
            "experiment" => experiments.push(parse(field, value)?),
            "shadow" => shadows.push(parse(field, value)?),
            // A field of a later modelgate: left alone.
            _ => {}
        }
    }
    Ok((
        version,
        State {
            registry: Registry::from_records(metas, versions, policies),
            experiments: Experiments::from_records(experiments),
            shadows: Shadows::from_records(shadows),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewVersion;

    #[test]
    fn an_update_round_trips_through_the_hash_fields() {
        let mut s = State::default();
        let (_, u) = s
            .registry
            .register(
                NewVersion {
                    model: "fraud-eu".into(),
                    endpoint: "http://127.0.0.1:1".into(),
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        let (sets, deletes) = fields_of(&u.into());
        assert!(deletes.is_empty());
        let mut fields = sets;
        fields.push((VERSION_FIELD.into(), b"7".to_vec()));
        let (version, back) = decode(&fields).unwrap();
        assert_eq!(version, 7);
        assert_eq!(back, s);
    }
}
