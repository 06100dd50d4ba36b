//! Outcomes that join on any replica: each prediction leaves a stub in Redis, and each outcome
//! claims its (request, row) there, so it counts once fleet-wide.
//!
//! - The stub, `<prefix>:p:<request id>`, is the prediction record cut to what judging an
//!   outcome needs — time, model, version, experiment, variant, the predictions per row, whether
//!   the variant was forced — as protobuf, with the outcome window as its TTL. The record writer
//!   hands stubs to a flusher thread after its batch is committed; the flusher sends them in
//!   pipelines. The request path never waits for Redis.
//! - The claim, `<prefix>:o:<request id>:<row>`, is written with `SET … NX` before the outcome is
//!   stored: a second outcome of the same row, on any replica, finds it and is refused (or, when
//!   it replaces the first, takes the first one's judgement back, which the claim holds).
//! - A replica asked for a request's prediction looks in its own store first (it recorded it, or
//!   the record is still in its queue), then for the stub.
//!
//! Redis away: an outcome whose prediction this replica recorded still joins (unclaimed: a copy
//! of it sent to another replica during the outage could count twice); the others fail
//! UNAVAILABLE, to be retried. Stubs wait in the flusher (bounded) and are sent when Redis
//! returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;

use super::redis::Redis;
use super::FleetStatus;
use crate::outcome::Judgement;
use crate::pb::modelgate::v1 as pb;
use crate::storage::{
    OutcomeWrite, PredictionPage, RecordLog, RecordWrite, RecordWrites, StoreError, StoreResult,
};

/// Stubs the flusher holds at most (waiting for Redis); more are dropped and counted.
pub const STUB_QUEUE: usize = 65_536;
/// How often the flusher sends what it holds, at the latest.
pub const STUB_FLUSH: Duration = Duration::from_millis(100);

/// The record log of a replica in a fleet: its own, with stubs and claims in Redis.
pub struct FleetRecords {
    redis: Arc<Redis>,
    local: Arc<dyn RecordLog>,
    prefix: String,
    window: Duration,
    stubs: SyncSender<Outgoing>,
    /// The hash of the feature script (called by it).
    feature_sha: String,
    /// How long an entity's shared features are kept after their last write.
    feature_ttl: Duration,
    /// Stubs dropped because the flusher's queue was full.
    pub dropped: Arc<AtomicU64>,
}

/// What the flusher sends to Redis.
#[derive(Debug)]
pub enum Outgoing {
    /// A prediction's stub (key, value).
    Stub(Vec<u8>, Vec<u8>),
    /// An entity's newest feature values: the feature script's call, made whole on the record
    /// writer's thread (encoding each value straight into the call, not into values of its own).
    Features(redis::Cmd),
    /// Feature definitions first seen in traffic (name, JSON).
    FeatureDef(String, Vec<u8>),
    /// Items for a capped shared list — a model's drift window, a version's concept window
    /// (`fleet::drift`) — and the count of what the list was given.
    Capped {
        /// The list.
        list: String,
        /// The hash counting what each list was given.
        counts: String,
        /// The list's field in `counts`.
        field: String,
        /// Items the list keeps.
        keep: usize,
        /// Encoded items, oldest first.
        items: Vec<Vec<u8>>,
        /// Counts the items once they are sent.
        sent: Arc<AtomicU64>,
    },
}

/// Appends to a capped list and counts what it was given, at once. KEYS: the list, the counts
/// hash. ARGV: the list's field in the counts, the items it keeps, how many items were given,
/// then the items (the newest of them).
const PUSH_CAPPED: &str = r#"
redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[3])
"#;

/// One list's items in a send: (list, counts, field, items kept, items).
type Push<'a> = (&'a str, &'a str, &'a str, usize, Vec<&'a [u8]>);

/// The stub of a prediction record: what judging an outcome needs — time, model, version,
/// experiment, variant, whether the variant was forced, the rows and their predictions — in a
/// compact binary form, because a stub per prediction is what fleet mode keeps most of in Redis
/// (docs/fleet.md, "Memory per stub"): a format byte, then varints and length-prefixed strings.
pub fn encode_stub(r: &pb::PredictionRecord) -> Vec<u8> {
    use prost::encoding::encode_varint;
    let mut out = Vec::with_capacity(48);
    out.push(STUB_FORMAT);
    encode_varint(time_ms(r.time.as_ref()), &mut out);
    encode_varint(u64::from(r.version), &mut out);
    out.push(u8::from(r.variant_forced));
    for s in [&r.model, &r.experiment, &r.variant] {
        encode_varint(s.len() as u64, &mut out);
        out.extend_from_slice(s.as_bytes());
    }
    encode_varint(r.rows.len().max(r.predictions.len()) as u64, &mut out);
    encode_varint(r.predictions.len() as u64, &mut out);
    for p in &r.predictions {
        match &p.kind {
            Some(pb::prediction_value::Kind::Label(l)) => {
                out.push(0);
                encode_varint(l.len() as u64, &mut out);
                out.extend_from_slice(l.as_bytes());
            }
            Some(pb::prediction_value::Kind::Value(x)) => {
                out.push(1);
                out.extend_from_slice(&x.to_le_bytes());
            }
            None => out.push(2),
        }
    }
    out
}

const STUB_FORMAT: u8 = 1;

/// The prediction record a stub stands for (without its request id); `None` when the bytes are
/// not a stub.
pub fn decode_stub(mut b: &[u8]) -> Option<pb::PredictionRecord> {
    use prost::encoding::decode_varint;
    fn string(b: &mut &[u8]) -> Option<String> {
        let n = decode_varint(b).ok()? as usize;
        let s = std::str::from_utf8(b.get(..n)?).ok()?.to_string();
        *b = &b[n..];
        Some(s)
    }
    fn byte(b: &mut &[u8]) -> Option<u8> {
        let (first, rest) = b.split_first()?;
        *b = rest;
        Some(*first)
    }
    if byte(&mut b)? != STUB_FORMAT {
        return None;
    }
    let time = decode_varint(&mut b).ok()?;
    let version = u32::try_from(decode_varint(&mut b).ok()?).ok()?;
    let forced = byte(&mut b)? != 0;
    let (model, experiment, variant) = (string(&mut b)?, string(&mut b)?, string(&mut b)?);
    let rows = decode_varint(&mut b).ok()? as usize;
    let n = decode_varint(&mut b).ok()? as usize;
    if rows > 1 << 24 || n > rows {
        return None;
    }
    let mut predictions = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = match byte(&mut b)? {
            0 => Some(pb::prediction_value::Kind::Label(string(&mut b)?)),
            1 => {
                let x = f64::from_le_bytes(b.get(..8)?.try_into().ok()?);
                b = &b[8..];
                Some(pb::prediction_value::Kind::Value(x))
            }
            _ => None,
        };
        predictions.push(pb::PredictionValue { kind });
    }
    Some(pb::PredictionRecord {
        time: Some(crate::pb::timestamp(time)),
        model,
        version,
        experiment,
        variant,
        rows: if predictions.is_empty() {
            vec![pb::FeatureRow::default(); rows]
        } else {
            Vec::new()
        },
        predictions,
        variant_forced: forced,
        ..Default::default()
    })
}

/// A request id as it appears in a key: its 16 bytes when it is a UUID (as modelgate's own ids
/// are), else as given. Shorter keys are most of what a stub costs in Redis.
fn id_bytes(request_id: &str) -> Vec<u8> {
    match uuid::Uuid::try_parse(request_id) {
        Ok(u) if u.hyphenated().to_string() == request_id => u.as_bytes().to_vec(),
        _ => request_id.as_bytes().to_vec(),
    }
}

fn time_ms(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    })
}

impl FleetRecords {
    /// The record log under `prefix`; returns it and the flusher's loop (run it on a thread).
    pub fn new(
        redis: Arc<Redis>,
        prefix: &str,
        window: Duration,
        feature_ttl: Duration,
        local: Arc<dyn RecordLog>,
        status: Arc<FleetStatus>,
    ) -> (Self, StubFlusher) {
        let (tx, rx) = sync_channel(STUB_QUEUE);
        let records = FleetRecords {
            redis: redis.clone(),
            local,
            prefix: prefix.to_string(),
            window,
            stubs: tx,
            feature_sha: redis::Script::new(super::features::NEWEST_WINS)
                .get_hash()
                .to_string(),
            feature_ttl,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let flusher = StubFlusher {
            redis,
            script_loaded: AtomicBool::new(false),
            rx,
            window,
            defs_key: format!("{prefix}:feature-defs"),
            status,
        };
        (records, flusher)
    }

    /// The feature script's call (EVALSHA) writing an entity's values at `time_ms`.
    fn feature_call(
        &self,
        entity: &str,
        time_ms: u64,
        names: &[String],
        values: &[crate::record::FeatureValue],
        scratch: &mut Vec<u8>,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.feature_sha)
            .arg(1)
            .arg(super::features::entity_key(&self.prefix, entity))
            .arg(self.feature_ttl.as_millis().max(1) as u64);
        let time = super::features::encode_time(time_ms);
        cmd.arg(&time[..]);
        for (f, v) in names.iter().zip(values) {
            scratch.clear();
            scratch.extend_from_slice(&time);
            super::features::encode_value_into(v, scratch);
            cmd.arg(f).arg(scratch.as_slice());
        }
        cmd
    }

    fn stub_key(&self, request_id: &str) -> Vec<u8> {
        let mut k = format!("{}:p:", self.prefix).into_bytes();
        k.extend(id_bytes(request_id));
        k
    }

    fn claim_key(&self, request_id: &str, row: u32) -> Vec<u8> {
        let mut k = format!("{}:o:{row}:", self.prefix).into_bytes();
        k.extend(id_bytes(request_id));
        k
    }

    fn window_ms(&self) -> u64 {
        self.window.as_millis() as u64
    }

    /// The flusher's queue, for what else leaves for Redis in batches (drift rows).
    pub fn queue(&self) -> SyncSender<Outgoing> {
        self.stubs.clone()
    }

    /// How long shared features stay after their last write.
    pub fn feature_ttl(&self) -> Duration {
        self.feature_ttl
    }
}

impl RecordLog for FleetRecords {
    fn commit(&self, writes: RecordWrites, no_slowdown: bool) -> StoreResult<()> {
        let mut scratch = Vec::new();
        let stubs: Vec<Outgoing> = writes
            .writes
            .iter()
            .filter_map(|w| match w {
                // The stub is made of the record's message (encoded by this process: it decodes).
                RecordWrite::Prediction { record, .. } if record.version > 0 => {
                    let message = record.decode().ok()?;
                    Some(Outgoing::Stub(
                        self.stub_key(&record.request_id),
                        encode_stub(&message),
                    ))
                }
                RecordWrite::Features {
                    entity,
                    time_ms,
                    names,
                    values,
                } if !values.is_empty() => Some(Outgoing::Features(self.feature_call(
                    entity,
                    *time_ms,
                    names,
                    values,
                    &mut scratch,
                ))),
                RecordWrite::FeatureDef(d) => Some(Outgoing::FeatureDef(
                    d.name.clone(),
                    serde_json::to_vec(d).expect("definitions serialise"),
                )),
                _ => None,
            })
            .collect();
        self.local.commit(writes, no_slowdown)?;
        for s in stubs {
            if let Err(TrySendError::Full(_)) = self.stubs.try_send(s) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn finish(&self) -> StoreResult<()> {
        self.local.finish()
    }

    fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> StoreResult<Option<(u64, pb::PredictionRecord)>> {
        if let Some(found) = self.local.get_prediction(request_id, not_before_ms)? {
            return Ok(Some(found));
        }
        let key = self.stub_key(request_id);
        let stub: Option<Vec<u8>> = self.redis.with(|c| redis::cmd("GET").arg(&key).query(c))?;
        let Some(bytes) = stub else { return Ok(None) };
        let mut r = decode_stub(&bytes).ok_or_else(|| StoreError::Decode {
            family: "fleet prediction stubs",
            key: request_id.to_string(),
            reason: "not a prediction stub".into(),
        })?;
        r.request_id = request_id.to_string();
        let t = time_ms(r.time.as_ref());
        Ok((t >= not_before_ms).then_some((t, r)))
    }

    fn list_predictions(
        &self,
        model: &str,
        version: u32,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
        after: Option<(u64, String)>,
    ) -> StoreResult<PredictionPage> {
        self.local
            .list_predictions(model, version, start_ms, end_ms, limit, after)
    }

    fn outcomes_of(&self, request_id: &str) -> StoreResult<Vec<pb::OutcomeRecord>> {
        self.local.outcomes_of(request_id)
    }

    fn get_outcome(
        &self,
        request_id: &str,
        row: u32,
    ) -> StoreResult<Option<(u64, pb::OutcomeRecord)>> {
        if let Some(found) = self.local.get_outcome(request_id, row)? {
            return Ok(Some(found));
        }
        let key = self.claim_key(request_id, row);
        let claim: Option<Vec<u8>> = match self.redis.with(|c| redis::cmd("GET").arg(&key).query(c))
        {
            Ok(c) => c,
            // Redis away: the write below decides (see the module documentation).
            Err(StoreError::Unavailable(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(bytes) = claim else { return Ok(None) };
        let o = pb::OutcomeRecord::decode(bytes.as_slice()).map_err(|e| StoreError::Decode {
            family: "fleet outcome claims",
            key: format!("{request_id}/{row}"),
            reason: e.to_string(),
        })?;
        Ok(Some((time_ms(o.time.as_ref()), o)))
    }

    fn write_outcome(&self, w: OutcomeWrite<'_>) -> StoreResult<()> {
        let key = self.claim_key(&w.outcome.request_id, w.outcome.row);
        // The claim holds what taking this outcome back needs: its judgement and time.
        let claim = pb::OutcomeRecord {
            success: w.judgement.success,
            error: w.judgement.error,
            time: w.outcome.time,
            ..Default::default()
        }
        .encode_to_vec();
        let ttl = self.window_ms().max(1);
        let claimed = self.redis.with(|c| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(claim.as_slice()).arg("PX").arg(ttl);
            if w.replaced.is_none() {
                cmd.arg("NX");
            }
            cmd.query::<Option<String>>(c)
        });
        match claimed {
            Ok(Some(_)) => {}
            Ok(None) => return Err(StoreError::AlreadyExists),
            // Redis away: the prediction was found without it (this replica recorded it, or it is
            // still in its queue — a stub could not have been read), so the outcome joins here,
            // unclaimed (docs/fleet.md).
            Err(StoreError::Unavailable(_)) => {}
            Err(e) => return Err(e),
        }
        let (request_id, row) = (w.outcome.request_id.clone(), w.outcome.row);
        let replaced = w.replaced.is_some();
        self.local.write_outcome(w).inspect_err(|_| {
            // Not stored: release a fresh claim, so that a retry is not refused.
            if !replaced {
                let _ = self.redis.with(|c| {
                    redis::cmd("DEL")
                        .arg(self.claim_key(&request_id, row))
                        .query::<()>(c)
                });
            }
        })
    }

    fn recent_judgements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Judgement>> {
        self.local.recent_judgements(model, version, n)
    }
}

/// Sends stubs to Redis in pipelines; holds them (bounded) while Redis is away.
pub struct StubFlusher {
    redis: Arc<Redis>,
    script_loaded: AtomicBool,
    rx: Receiver<Outgoing>,
    window: Duration,
    defs_key: String,
    status: Arc<FleetStatus>,
}

impl StubFlusher {
    /// Runs until `stop` and the queue is empty (or every sender is gone).
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut held: Vec<Outgoing> = Vec::new();
        let ttl = self.window.as_millis().max(1) as u64;
        let mut last = Instant::now();
        loop {
            match self.rx.recv_timeout(STUB_FLUSH) {
                Ok(s) => {
                    held.push(s);
                    while let Ok(s) = self.rx.try_recv() {
                        held.push(s);
                        if held.len() >= 1024 {
                            break;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.send(&mut held, ttl);
                    return;
                }
            }
            if held.len() >= 1024 || last.elapsed() >= STUB_FLUSH || stop.load(Ordering::Acquire) {
                self.send(&mut held, ttl);
                last = Instant::now();
            }
            if stop.load(Ordering::Acquire) && held.is_empty() {
                return;
            }
            if held.len() > STUB_QUEUE {
                // Redis has been away for long: the oldest stubs go (their outcomes still join
                // on the replica that recorded them).
                let excess = held.len() - STUB_QUEUE;
                for gone in held.drain(..excess) {
                    // Settled, as far as waiting for them goes: they will never arrive.
                    if let Outgoing::Capped { items, sent, .. } = gone {
                        sent.fetch_add(items.len() as u64, Ordering::Release);
                    }
                }
            }
            if stop.load(Ordering::Acquire) && !self.status.is_up() {
                return;
            }
        }
    }

    fn send(&self, held: &mut Vec<Outgoing>, ttl: u64) {
        if held.is_empty() {
            return;
        }
        // The feature script is called by its hash (EVALSHA), not sent with every entity: loaded
        // once per connection to Redis, again after any failure (a restarted Redis has none).
        if !self.script_loaded.load(Ordering::Relaxed) {
            let loaded = self.redis.with(|c| {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(super::features::NEWEST_WINS)
                    .query::<redis::Value>(c)
            });
            match loaded {
                Ok(_) => self.script_loaded.store(true, Ordering::Relaxed),
                // Tried again on the next send (the connection reports Redis away).
                Err(e) => {
                    tracing::debug!(error = %e, "cannot load the feature script");
                    return;
                }
            }
        }
        // Each list's items go in one push, however many batches brought them.
        let mut lists: Vec<Push<'_>> = Vec::new();
        let mut sent: Vec<(&Arc<AtomicU64>, u64)> = Vec::new();
        let mut cmds: Vec<redis::Cmd> = held
            .iter()
            .filter_map(|o| {
                let mut cmd;
                match o {
                    Outgoing::Capped {
                        list,
                        counts,
                        field,
                        keep,
                        items,
                        sent: counter,
                    } => {
                        sent.push((counter, items.len() as u64));
                        let items = items.iter().map(Vec::as_slice);
                        match lists.iter_mut().find(|w| w.0 == list) {
                            Some(w) => w.4.extend(items),
                            None => lists.push((list, counts, field, *keep, items.collect())),
                        }
                        return None;
                    }
                    Outgoing::Stub(k, v) => {
                        cmd = redis::cmd("SET");
                        cmd.arg(k).arg(v.as_slice()).arg("PX").arg(ttl);
                    }
                    Outgoing::Features(call) => cmd = call.clone(),
                    Outgoing::FeatureDef(name, json) => {
                        // A definition first seen in traffic never replaces a declared one.
                        cmd = redis::cmd("HSETNX");
                        cmd.arg(&self.defs_key).arg(name).arg(json.as_slice());
                    }
                }
                Some(cmd)
            })
            .collect();
        for (list, counts, field, keep, items) in lists {
            // Only the newest `keep` can stay: the older ones are not sent. One script, so that
            // a reader sees the list and its count agree.
            // In pieces: Lua unpacks at most ~8000 values at once.
            let skip = items.len().saturating_sub(keep);
            for (i, piece) in items[skip..].chunks(4000).enumerate() {
                let given = piece.len() + if i == 0 { skip } else { 0 };
                let mut push = redis::cmd("EVAL");
                push.arg(PUSH_CAPPED)
                    .arg(2)
                    .arg(list)
                    .arg(counts)
                    .arg(field)
                    .arg(keep.max(1))
                    .arg(given);
                for item in piece {
                    push.arg(*item);
                }
                cmds.push(push);
            }
        }
        let r = self.redis.pipeline::<redis::Value>(cmds);
        match r {
            Ok(_) => {
                for (counter, n) in sent {
                    counter.fetch_add(n, Ordering::Release);
                }
                held.clear()
            }
            Err(e) => {
                // Sent again next time, with the script loaded again first (a restarted Redis
                // answers NOSCRIPT).
                self.script_loaded.store(false, Ordering::Relaxed);
                tracing::debug!(error = %e, "stubs and features will be sent again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stub_keeps_what_judging_needs_and_is_small() {
        let record = pb::PredictionRecord {
            request_id: "0193a1b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b".into(),
            time: Some(crate::pb::timestamp(1_764_000_000_123)),
            model: "fraud".into(),
            version: 3,
            experiment: "fraud-v3".into(),
            variant: "treatment".into(),
            unit_id: "user-123456".into(),
            method: "/inference.GRPCInferenceService/ModelInfer".into(),
            feature_names: (0..16).map(|i| format!("f{i}")).collect(),
            rows: vec![pb::FeatureRow::default()],
            predictions: vec![crate::convert::prediction_to_pb(
                &crate::record::Prediction::Label("fraud".into()),
            )],
            variant_forced: true,
            ..Default::default()
        };
        let bytes = encode_stub(&record);
        let stub = decode_stub(&bytes).unwrap();
        assert_eq!(stub.predictions, record.predictions);
        assert_eq!((stub.model.as_str(), stub.version), ("fraud", 3));
        assert_eq!(
            (stub.experiment.as_str(), stub.variant.as_str()),
            ("fraud-v3", "treatment")
        );
        assert!(stub.variant_forced);
        assert_eq!(time_ms(stub.time.as_ref()), 1_764_000_000_123);
        // Small enough for Redis to keep it inline with its object header (≤ 44 bytes).
        assert!(bytes.len() <= 44, "{}", bytes.len());
        // Rows without a readable prediction still count.
        let none = pb::PredictionRecord {
            rows: vec![pb::FeatureRow::default(); 3],
            ..record.clone()
        };
        let none = decode_stub(&encode_stub(&pb::PredictionRecord {
            predictions: vec![],
            ..none
        }))
        .unwrap();
        assert_eq!(none.rows.len(), 3);
        let value = pb::PredictionRecord {
            predictions: vec![crate::convert::prediction_to_pb(
                &crate::record::Prediction::Value(-1.5),
            )],
            ..record
        };
        assert_eq!(
            decode_stub(&encode_stub(&value)).unwrap().predictions,
            value.predictions
        );
        // Hostile bytes are refused, not trusted.
        for junk in [
            &b""[..],
            b"\x01",
            b"\x02abc",
            b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            assert!(decode_stub(junk).is_none());
        }
    }

    #[test]
    fn uuid_request_ids_are_keyed_by_their_bytes() {
        assert_eq!(id_bytes("0193a1b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b").len(), 16);
        // Not in canonical form: kept as given, so two spellings never meet by accident.
        assert_eq!(id_bytes("0193A1B2-7C4D-7E8F-9A0B-1C2D3E4F5A6B").len(), 36);
        assert_eq!(id_bytes("order-17"), b"order-17");
    }
}
