//! Fleet drift: references, monitor state and one shared window of live rows per model in Redis,
//! so that the drift a fleet reports covers the fleet's traffic, not one replica's slice.
//!
//! Every replica contributes a uniform (Bernoulli) sample of its rows to the model's window, a
//! capped Redis list, through the stub flusher (one `RPUSH`, `LTRIM` and `HINCRBY` per model per
//! flush, whatever the number of rows). One replica at a time, the holder of the model's lease,
//! evaluates the window against the reference and moves the episode on; the others read its
//! evaluation and episode from Redis. Judged outcomes go the same way, to one concept window per
//! model version, whose episode the model's lease holder moves on, outcome by outcome. A reference uploaded (or captured) on any replica replaces
//! the fleet's, with a new stamp that the others notice within a second; rows made against an
//! older reference are skipped.
//!
//! Layout, under `<prefix>:{drift}` (one hash slot, so a script may touch several keys in a
//! Cluster):
//!
//! | key | holds |
//! |---|---|
//! | `…:stamps` | hash: model → reference stamp |
//! | `…:ref:<model>` | hash: `h` → JSON header, `n:<feature>` → sorted f64 LE values |
//! | `…:states` | hash: `<model>` NUL `<name>` → JSON state record (`drift`, `evaluation`, `retrain`, …) |
//! | `…:w:<model>` | list: the shared window, one encoded row per element, newest last |
//! | `…:rows` | hash: model → rows contributed so far |
//! | `…:lease:<model>` | the replica evaluating the model, expiring |
//! | `…:c:<version>:<model>` | list: a version's shared concept window, one judged outcome per element (metric byte, f64 LE) |
//! | `…:outcomes` | hash: `<version>:<model>` → outcomes added to its concept window so far |
//!
//! Redis away: reads come from the replica's own copy (references and states are written to both),
//! writes fail UNAVAILABLE, rows wait in the flusher's queue, and no replica evaluates (a lease
//! cannot be taken): drift evaluation pauses until Redis returns. Redis restarted empty: the
//! first replica to look finds no reference stamps and puts its own references back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;

use super::outcomes::Outgoing;
use super::redis::Redis;
use crate::drift::{ConceptMetric, Reference};
use crate::record::{FeatureValue, Precision};
use crate::storage::{reference, DriftRow, DriftStore, SharedDrift, StoreError, StoreResult};

/// Replaces a model's reference. KEYS: the reference hash, the stamps, the states, the window.
/// ARGV: the model, the two state fields a new reference clears (episode, evaluation), then the
/// reference's (field, value) pairs. Returns the new stamp.
const PUT_REFERENCE: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HDEL', KEYS[3], ARGV[2], ARGV[3])
redis.call('DEL', KEYS[4])
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
"#;

/// Takes or keeps a lease. KEYS[1]: the lease. ARGV: this replica, the lease's length in ms.
const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Reads a capped list and its count at once. KEYS: the list, the counts hash. ARGV: the
/// list's field.
const READ_CAPPED: &str = r#"
return {redis.call('HGET', KEYS[2], ARGV[1]), redis.call('LRANGE', KEYS[1], 0, -1)}
"#;

/// The fleet's drift store.
pub struct FleetDrift {
    redis: Arc<Redis>,
    base: String,
    replica: String,
    local: Arc<dyn DriftStore>,
    queue: SyncSender<Outgoing>,
    /// Rows dropped because the flusher's queue was full.
    pub dropped: Arc<AtomicU64>,
    /// Rows queued for the flusher, and sent by it.
    queued: AtomicU64,
    sent: Arc<AtomicU64>,
    put_script: Script,
    lease_script: Script,
    read_script: Script,
    /// The stamp of each reference this replica has copied into its own store.
    copied: Mutex<HashMap<String, u64>>,
}

fn state_field(model: &str, name: &str) -> String {
    format!("{model}\0{name}")
}

impl FleetDrift {
    /// The drift store under `prefix`, over the replica's own `local` one; rows leave through
    /// `queue` (the stub flusher's).
    pub fn new(
        redis: Arc<Redis>,
        prefix: &str,
        replica: String,
        local: Arc<dyn DriftStore>,
        queue: SyncSender<Outgoing>,
    ) -> Self {
        FleetDrift {
            redis,
            base: format!("{prefix}:{{drift}}"),
            replica,
            local,
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
            queued: AtomicU64::new(0),
            sent: Arc::new(AtomicU64::new(0)),
            put_script: Script::new(PUT_REFERENCE),
            lease_script: Script::new(LEASE),
            read_script: Script::new(READ_CAPPED),
            copied: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.base)
    }

    fn reference_key(&self, model: &str) -> String {
        self.key(&format!("ref:{model}"))
    }

    fn window_key(&self, model: &str) -> String {
        self.key(&format!("w:{model}"))
    }

    /// Writes `r` as the fleet's reference of `model`: its new stamp.
    fn put_shared(&self, model: &str, r: &Reference) -> StoreResult<u64> {
        let parts = reference::encode(r);
        self.redis.with(|c| {
            let mut call = self.put_script.prepare_invoke();
            call.key(self.reference_key(model))
                .key(self.key("stamps"))
                .key(self.key("states"))
                .key(self.window_key(model))
                .arg(model)
                .arg(state_field(model, "drift"))
                .arg(state_field(model, "evaluation"))
                .arg("h")
                .arg(parts.header.as_slice());
            for (name, bytes) in &parts.numeric {
                call.arg(format!("n:{name}")).arg(bytes.as_slice());
            }
            call.invoke(c)
        })
    }

    fn stamps(&self) -> StoreResult<HashMap<String, u64>> {
        self.redis
            .with(|c| redis::cmd("HGETALL").arg(self.key("stamps")).query(c))
    }

    /// Puts this replica's references back into an empty Redis (one restarted without its
    /// data): what the fleet had, as far as this replica knows.
    fn reseed(&self) -> StoreResult<HashMap<String, u64>> {
        let mut stamps = HashMap::new();
        for model in self.local.reference_models()? {
            if let Some(r) = self.local.load_reference(&model)? {
                let stamp = self.put_shared(&model, &r)?;
                self.copied.lock().insert(model.clone(), stamp);
                stamps.insert(model, stamp);
            }
        }
        if !stamps.is_empty() {
            tracing::warn!(
                references = stamps.len(),
                "the fleet's store had no drift references: put this replica's back"
            );
        }
        Ok(stamps)
    }
}

impl DriftStore for FleetDrift {
    fn put_reference(&self, model: &str, r: &Reference) -> StoreResult<()> {
        let stamp = self.put_shared(model, r)?;
        self.local.put_reference(model, r)?;
        self.copied.lock().insert(model.to_string(), stamp);
        Ok(())
    }

    fn load_reference(&self, model: &str) -> StoreResult<Option<Reference>> {
        let read = self.redis.with(|c| {
            redis::cmd("HGETALL")
                .arg(self.reference_key(model))
                .query::<HashMap<String, Vec<u8>>>(c)
        });
        let mut fields = match read {
            Ok(f) => f,
            Err(StoreError::Unavailable(_)) => return self.local.load_reference(model),
            Err(e) => return Err(e),
        };
        let Some(header) = fields.remove("h") else {
            return Ok(None);
        };
        let r = reference::decode(model, "fleet drift references", &header, |name| {
            Ok(fields.remove(&format!("n:{name}")))
        })?;
        // Kept in the replica's own store too, once per stamp: a start without Redis has it.
        if let Ok(stamps) = self.stamps() {
            let stamp = stamps.get(model).copied().unwrap_or(0);
            let mut copied = self.copied.lock();
            if copied.get(model) != Some(&stamp) {
                self.local.put_reference(model, &r)?;
                copied.insert(model.to_string(), stamp);
            }
        }
        Ok(Some(r))
    }

    fn reference_models(&self) -> StoreResult<Vec<String>> {
        match self.reference_stamps() {
            Ok(s) => Ok(s.into_keys().collect()),
            Err(StoreError::Unavailable(_)) => self.local.reference_models(),
            Err(e) => Err(e),
        }
    }

    fn put_model_state(&self, model: &str, name: &str, json: &[u8]) -> StoreResult<()> {
        self.redis.with(|c| {
            redis::cmd("HSET")
                .arg(self.key("states"))
                .arg(state_field(model, name))
                .arg(json)
                .query::<()>(c)
        })?;
        self.local.put_model_state(model, name, json)
    }

    fn get_model_state(&self, model: &str, name: &str) -> StoreResult<Option<Vec<u8>>> {
        match self.redis.with(|c| {
            redis::cmd("HGET")
                .arg(self.key("states"))
                .arg(state_field(model, name))
                .query(c)
        }) {
            Ok(v) => Ok(v),
            Err(StoreError::Unavailable(_)) => self.local.get_model_state(model, name),
            Err(e) => Err(e),
        }
    }

    fn model_states(&self) -> StoreResult<Vec<(String, String, Vec<u8>)>> {
        let all: Vec<(String, Vec<u8>)> = self
            .redis
            .with(|c| redis::cmd("HGETALL").arg(self.key("states")).query(c))?;
        Ok(all
            .into_iter()
            .filter_map(|(field, json)| {
                let (model, name) = field.split_once('\0')?;
                Some((model.to_string(), name.to_string(), json))
            })
            .collect())
    }

    fn shared(&self) -> Option<&dyn SharedDrift> {
        Some(self)
    }
}

impl SharedDrift for FleetDrift {
    fn reference_stamps(&self) -> StoreResult<HashMap<String, u64>> {
        let stamps = self.stamps()?;
        if stamps.is_empty() {
            return self.reseed();
        }
        Ok(stamps)
    }

    fn contribute(&self, model: &str, stamp: u64, keep: usize, rows: Vec<DriftRow>) {
        if rows.is_empty() {
            return;
        }
        self.queue_capped(
            self.window_key(model),
            self.key("rows"),
            model.to_string(),
            keep,
            rows.iter().map(|r| encode_row(stamp, r)).collect(),
        );
    }

    fn settle(&self, limit: Duration) -> bool {
        let target = self.queued.load(Ordering::Acquire);
        let until = std::time::Instant::now() + limit;
        // The flusher sends at least every 100 ms; rows it dropped (Redis away too long) never
        // arrive, hence the limit.
        while self.sent.load(Ordering::Acquire) < target {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn contributed(&self, model: &str) -> StoreResult<u64> {
        let n: Option<u64> = self
            .redis
            .with(|c| redis::cmd("HGET").arg(self.key("rows")).arg(model).query(c))?;
        Ok(n.unwrap_or(0))
    }

    fn window(&self, model: &str, stamp: u64, n: usize) -> StoreResult<Vec<DriftRow>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let raw: Vec<Vec<u8>> = self.redis.with(|c| {
            redis::cmd("LRANGE")
                .arg(self.window_key(model))
                .arg(-(n as i64))
                .arg(-1)
                .query(c)
        })?;
        Ok(raw
            .iter()
            .filter_map(|b| match decode_row(b) {
                Some((s, row)) if s == stamp => Some(row),
                _ => None,
            })
            .collect())
    }

    fn lease(&self, model: &str, ttl: Duration) -> StoreResult<bool> {
        let held: i64 = self.redis.with(|c| {
            self.lease_script
                .key(self.key(&format!("lease:{model}")))
                .arg(&self.replica)
                .arg(ttl.as_millis().max(1) as u64)
                .invoke(c)
        })?;
        Ok(held == 1)
    }

    fn contribute_outcomes(
        &self,
        model: &str,
        version: u32,
        keep: usize,
        values: Vec<(ConceptMetric, f64)>,
    ) {
        if values.is_empty() {
            return;
        }
        let field = format!("{version}:{model}");
        self.queue_capped(
            self.key(&format!("c:{field}")),
            self.key("outcomes"),
            field,
            keep,
            values
                .iter()
                .map(|(m, x)| {
                    let mut b = vec![metric_code(*m)];
                    b.extend_from_slice(&x.to_le_bytes());
                    b
                })
                .collect(),
        );
    }

    fn outcome_versions(&self) -> StoreResult<Vec<(String, u32)>> {
        let fields: Vec<String> = self
            .redis
            .with(|c| redis::cmd("HKEYS").arg(self.key("outcomes")).query(c))?;
        Ok(fields
            .iter()
            .filter_map(|f| {
                let (v, m) = f.split_once(':')?;
                Some((m.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    fn outcomes(&self, model: &str, version: u32) -> StoreResult<(u64, Vec<(ConceptMetric, f64)>)> {
        let field = format!("{version}:{model}");
        let (count, items): (Option<u64>, Vec<Vec<u8>>) = self.redis.with(|c| {
            self.read_script
                .key(self.key(&format!("c:{field}")))
                .key(self.key("outcomes"))
                .arg(&field)
                .invoke(c)
        })?;
        Ok((
            count.unwrap_or(0),
            items
                .iter()
                .filter_map(|b| {
                    let m = metric_of(*b.first()?)?;
                    Some((m, f64::from_le_bytes(b.get(1..9)?.try_into().ok()?)))
                })
                .collect(),
        ))
    }
}

fn metric_code(m: ConceptMetric) -> u8 {
    match m {
        ConceptMetric::Accuracy => 0,
        ConceptMetric::Mae => 1,
    }
}

fn metric_of(code: u8) -> Option<ConceptMetric> {
    match code {
        0 => Some(ConceptMetric::Accuracy),
        1 => Some(ConceptMetric::Mae),
        _ => None,
    }
}

impl FleetDrift {
    /// Queues items for a capped shared list, counted in `counts` under `field`.
    fn queue_capped(
        &self,
        list: String,
        counts: String,
        field: String,
        keep: usize,
        items: Vec<Vec<u8>>,
    ) {
        let n = items.len() as u64;
        let out = Outgoing::Capped {
            list,
            counts,
            field,
            keep,
            items,
            sent: self.sent.clone(),
        };
        match self.queue.try_send(out) {
            Ok(()) => {
                self.queued.fetch_add(n, Ordering::AcqRel);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// A row of the shared window: the reference stamp (varint), then per feature a tag — 0
/// missing, 1 a number (precision byte, f64 LE), 2 a category (varint length, UTF-8).
pub fn encode_row(stamp: u64, row: &DriftRow) -> Vec<u8> {
    use prost::encoding::encode_varint;
    let mut out = Vec::with_capacity(2 + row.len() * 10);
    encode_varint(stamp, &mut out);
    for v in row {
        match v {
            None => out.push(0),
            Some((FeatureValue::Number(x), p)) => {
                out.push(1);
                out.push(p.code());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Some((FeatureValue::Text(s), p)) => {
                out.push(2);
                out.push(p.code());
                encode_varint(s.len() as u64, &mut out);
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
    out
}

/// Reads a row of the shared window (`None`: not one; a row from a newer format is skipped).
pub fn decode_row(mut b: &[u8]) -> Option<(u64, DriftRow)> {
    use prost::encoding::decode_varint;
    let stamp = decode_varint(&mut b).ok()?;
    let mut row = Vec::new();
    while let Some((&tag, rest)) = b.split_first() {
        b = rest;
        match tag {
            0 => row.push(None),
            1 | 2 => {
                let (&p, rest) = b.split_first()?;
                b = rest;
                let p = Precision::from_code(p)?;
                if tag == 1 {
                    let x = f64::from_le_bytes(b.get(..8)?.try_into().ok()?);
                    b = &b[8..];
                    row.push(Some((FeatureValue::Number(x), p)));
                } else {
                    let n = decode_varint(&mut b).ok()? as usize;
                    let s = std::str::from_utf8(b.get(..n)?).ok()?.to_string();
                    b = &b[n..];
                    row.push(Some((FeatureValue::Text(s), p)));
                }
            }
            _ => return None,
        }
    }
    Some((stamp, row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_the_shared_window_read_back_exactly() {
        let row: DriftRow = vec![
            Some((FeatureValue::Number(0.1 + 0.2), Precision::F32)),
            None,
            Some((FeatureValue::Text("gold".into()), Precision::F64)),
            Some((FeatureValue::Number(f64::NAN), Precision::BF16)),
        ];
        let (stamp, back) = decode_row(&encode_row(7, &row)).unwrap();
        assert_eq!(stamp, 7);
        assert_eq!(back.len(), 4);
        assert_eq!(back[..3], row[..3]);
        assert!(matches!(back[3], Some((FeatureValue::Number(x), Precision::BF16)) if x.is_nan()));
        assert!(decode_row(&[1, 9]).is_none(), "an unknown tag");
        assert!(decode_row(&[1, 1, 0]).is_none(), "a cut number");
    }
}
