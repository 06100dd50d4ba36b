//! One event stream for the fleet: a Redis Stream, `<prefix>:events`, whose entry ids are
//! `<cursor>-0`, so a `Watch` cursor means the same event on every replica.
//!
//! A replica appends with a Lua script that numbers the event after the stream's last entry (one
//! atomic step, so two replicas never take the same number) and stores it as protobuf; the
//! cursor is the entry id, not a field. Each replica follows the stream (XREAD BLOCK) and relays
//! every entry — its own included — to its watchers, in the stream's order. Webhooks are called
//! by the replica that published the event only: once per event, not once per replica.
//!
//! Events that several replicas would each raise from the same fleet-wide figures
//! (`experiment_significant`, `experiment_sample_ratio_mismatch`, `shadow_agreement_low`) are
//! appended once: the first replica's append claims the event's identity for a day, and the
//! others' appends are skipped.
//!
//! Redis away: an event that cannot be appended is logged and not published (as when RocksDB
//! refuses one without a fleet); the operation that caused it still succeeds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use redis::Script;

use super::redis::Redis;
use crate::pb::modelgate::v1 as pb;
use crate::storage::{EventLog, StoreError, StoreResult};

/// Numbers and appends an event. KEYS[1]: the stream; KEYS[2]: the claim of a once-only event
/// (or the stream again when there is none). ARGV[1]: the event; ARGV[2]: "1" for a once-only
/// event. Returns the cursor, or 0 when a once-only event was appended already.
const APPEND: &str = r#"
if ARGV[2] == '1' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', 86400) then
    return 0
  end
end
local n = 1
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  n = tonumber(string.match(last[1][1], '^(%d+)')) + 1
end
redis.call('XADD', KEYS[1], n .. '-0', 'e', ARGV[1])
return n
"#;

/// Events raised from fleet-wide figures, which every replica would raise.
const ONCE: &[&str] = &[
    "experiment_significant",
    "experiment_sample_ratio_mismatch",
    "shadow_agreement_low",
];

/// The fleet's event stream, as an [`EventLog`].
pub struct FleetEvents {
    redis: Arc<Redis>,
    key: String,
    script: Script,
}

fn cursor_of(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// Stream entries as returned by XRANGE / XREAD: (id, [(field, value)]).
type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

fn decode(entries: Entries) -> Vec<pb::Event> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let bytes = fields.into_iter().find(|(f, _)| f == "e")?.1;
            let mut e = pb::Event::decode(bytes.as_slice()).ok()?;
            e.cursor = cursor_of(&id)?;
            Some(e)
        })
        .collect()
}

impl FleetEvents {
    /// The stream under `prefix`.
    pub fn new(redis: Arc<Redis>, prefix: &str) -> Self {
        FleetEvents {
            redis,
            // Hash-tagged with the claims of once-only events: the script touches both, and in a
            // Cluster they must live on one slot.
            key: format!("{prefix}:{{events}}"),
            script: Script::new(APPEND),
        }
    }

    /// Follows the stream from after `from` and hands every event to `relay`, until `stop`.
    /// `own` is a connection of its own: a blocking read must not hold the shared one.
    pub fn follow(&self, own: &Redis, from: u64, relay: impl Fn(pb::Event), stop: Arc<AtomicBool>) {
        let mut last = from;
        while !stop.load(Ordering::Acquire) {
            let read: StoreResult<Option<Vec<(String, Entries)>>> = own.with(|c| {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(256)
                    .arg("BLOCK")
                    .arg(250)
                    .arg("STREAMS")
                    .arg(&self.key)
                    .arg(format!("{last}-0"))
                    .query(c)
            });
            match read {
                Ok(streams) => {
                    for (_, entries) in streams.unwrap_or_default() {
                        for e in decode(entries) {
                            last = last.max(e.cursor);
                            relay(e);
                        }
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

impl EventLog for FleetEvents {
    fn append_event(&self, e: &pb::Event) -> StoreResult<()> {
        let mut e = e.clone();
        self.append_next(&mut e, 0).map(|_| ())
    }

    /// The stream's last cursor; 0 while Redis is away (a replica starts without it: the
    /// number only seeds a local counter that a shared stream does not use).
    fn last_event_cursor(&self) -> StoreResult<u64> {
        let last: Entries = match self.redis.with(|c| {
            redis::cmd("XREVRANGE")
                .arg(&self.key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query(c)
        }) {
            Ok(l) => l,
            Err(StoreError::Unavailable(_)) => return Ok(0),
            Err(e) => return Err(e),
        };
        Ok(last.first().and_then(|(id, _)| cursor_of(id)).unwrap_or(0))
    }

    fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<pb::Event>> {
        let entries: Entries = self.redis.with(|c| {
            redis::cmd("XRANGE")
                .arg(&self.key)
                .arg(format!("({after}-0"))
                .arg("+")
                .arg("COUNT")
                .arg(limit.max(1))
                .query(c)
        })?;
        Ok(decode(entries))
    }

    fn append_next(&self, e: &mut pb::Event, _next: u64) -> StoreResult<u64> {
        e.cursor = 0;
        let once = ONCE.contains(&e.r#type.as_str());
        let claim = if once {
            format!(
                "{}:once:{}:{}:{}:{}",
                self.key, e.r#type, e.model, e.experiment, e.version
            )
        } else {
            self.key.clone()
        };
        let bytes = e.encode_to_vec();
        let n: u64 = self.redis.with(|c| {
            self.script
                .key(&self.key)
                .key(&claim)
                .arg(bytes.as_slice())
                .arg(if once { "1" } else { "0" })
                .invoke(c)
        })?;
        if n == 0 {
            return Err(StoreError::AlreadyExists);
        }
        e.cursor = n;
        Ok(n)
    }

    fn shared(&self) -> bool {
        true
    }
}
