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
    status: Arc<FleetStatus>,
    stubs: SyncSender<Outgoing>,
    /// How long an entity's shared features are kept after their last write.
    feature_ttl: Duration,
    /// Stubs dropped because the flusher's queue was full.
    pub dropped: Arc<AtomicU64>,
}

/// What the flusher sends to Redis.
#[derive(Debug)]
pub enum Outgoing {
    /// A prediction's stub (key, value).
    Stub(String, Vec<u8>),
    /// An entity's newest feature values (key, [(feature, encoded value)]).
    Features(String, Vec<(String, Vec<u8>)>),
    /// Feature definitions first seen in traffic (name, JSON).
    FeatureDef(String, Vec<u8>),
}

/// The stub of a prediction record: what judging an outcome needs, and nothing else.
pub fn stub_of(r: &pb::PredictionRecord) -> pb::PredictionRecord {
    pb::PredictionRecord {
        time: r.time,
        model: r.model.clone(),
        version: r.version,
        experiment: r.experiment.clone(),
        variant: r.variant.clone(),
        predictions: r.predictions.clone(),
        // The number of rows, when no prediction could be read (`rows` is only counted).
        rows: if r.predictions.is_empty() {
            vec![pb::FeatureRow::default(); r.rows.len()]
        } else {
            Vec::new()
        },
        variant_forced: r.variant_forced,
        ..Default::default()
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
            status: status.clone(),
            stubs: tx,
            feature_ttl,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let flusher = StubFlusher {
            redis,
            rx,
            window,
            feature_ttl,
            defs_key: format!("{prefix}:feature-defs"),
            status,
        };
        (records, flusher)
    }

    fn stub_key(&self, request_id: &str) -> String {
        format!("{}:p:{request_id}", self.prefix)
    }

    fn claim_key(&self, request_id: &str, row: u32) -> String {
        format!("{}:o:{request_id}:{row}", self.prefix)
    }

    fn tracked<T>(&self, r: StoreResult<T>) -> StoreResult<T> {
        match &r {
            Ok(_) => self.status.reached(),
            Err(StoreError::Unavailable(e)) => self.status.lost(e),
            Err(_) => {}
        }
        r
    }

    fn window_ms(&self) -> u64 {
        self.window.as_millis() as u64
    }

    /// How long shared features stay after their last write.
    pub fn feature_ttl(&self) -> Duration {
        self.feature_ttl
    }
}

impl RecordLog for FleetRecords {
    fn commit(&self, writes: RecordWrites, no_slowdown: bool) -> StoreResult<()> {
        let stubs: Vec<Outgoing> = writes
            .writes
            .iter()
            .filter_map(|w| match w {
                RecordWrite::Prediction { record, .. } if record.version > 0 => Some(
                    Outgoing::Stub(
                        self.stub_key(&record.request_id),
                        stub_of(record).encode_to_vec(),
                    ),
                ),
                RecordWrite::Features {
                    entity,
                    time_ms,
                    values,
                } => Some(Outgoing::Features(
                    super::features::entity_key(&self.prefix, entity),
                    values
                        .iter()
                        .map(|(f, v)| (f.clone(), super::features::encode_value(*time_ms, v)))
                        .collect(),
                )),
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

    fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> StoreResult<Option<(u64, pb::PredictionRecord)>> {
        if let Some(found) = self.local.get_prediction(request_id, not_before_ms)? {
            return Ok(Some(found));
        }
        let key = self.stub_key(request_id);
        let stub: Option<Vec<u8>> =
            self.tracked(self.redis.with(|c| redis::cmd("GET").arg(&key).query(c)))?;
        let Some(bytes) = stub else { return Ok(None) };
        let mut r =
            pb::PredictionRecord::decode(bytes.as_slice()).map_err(|e| StoreError::Decode {
                family: "fleet prediction stubs",
                key,
                reason: e.to_string(),
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
        let claim: Option<Vec<u8>> =
            match self.tracked(self.redis.with(|c| redis::cmd("GET").arg(&key).query(c))) {
                Ok(c) => c,
                // Redis away: the write below decides (see the module documentation).
                Err(StoreError::Unavailable(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
        let Some(bytes) = claim else { return Ok(None) };
        let o = pb::OutcomeRecord::decode(bytes.as_slice()).map_err(|e| StoreError::Decode {
            family: "fleet outcome claims",
            key,
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
        let claimed = self.tracked(self.redis.with(|c| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(claim.as_slice()).arg("PX").arg(ttl);
            if w.replaced.is_none() {
                cmd.arg("NX");
            }
            cmd.query::<Option<String>>(c)
        }));
        match claimed {
            Ok(Some(_)) => {}
            Ok(None) => return Err(StoreError::AlreadyExists),
            // Redis away: a prediction this replica recorded still joins; others must wait.
            Err(StoreError::Unavailable(e)) => {
                let local = self.local.get_prediction(&w.outcome.request_id, 0)?;
                if local.is_none() {
                    return Err(StoreError::Unavailable(e));
                }
            }
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
    rx: Receiver<Outgoing>,
    window: Duration,
    feature_ttl: Duration,
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
            if held.len() >= 1024 || last.elapsed() >= STUB_FLUSH || stop.load(Ordering::Acquire)
            {
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
                held.drain(..excess);
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
        let feature_ttl = self.feature_ttl.as_millis().max(1) as u64;
        let r = self.redis.with(|c| {
            let mut p = redis::pipe();
            for o in held.iter() {
                match o {
                    Outgoing::Stub(k, v) => {
                        p.cmd("SET").arg(k).arg(v.as_slice()).arg("PX").arg(ttl).ignore();
                    }
                    Outgoing::Features(k, values) => {
                        let cmd = p
                            .cmd("EVAL")
                            .arg(super::features::NEWEST_WINS)
                            .arg(1)
                            .arg(k)
                            .arg(feature_ttl);
                        for (f, v) in values {
                            cmd.arg(f).arg(v.as_slice());
                        }
                        cmd.ignore();
                    }
                    Outgoing::FeatureDef(name, json) => {
                        // A definition first seen in traffic never replaces a declared one.
                        p.cmd("HSETNX")
                            .arg(&self.defs_key)
                            .arg(name)
                            .arg(json.as_slice())
                            .ignore();
                    }
                }
            }
            p.query::<()>(c)
        });
        match r {
            Ok(()) => {
                self.status.reached();
                held.clear();
            }
            Err(StoreError::Unavailable(e)) => self.status.lost(&e),
            Err(e) => tracing::warn!(error = %e, "cannot store prediction stubs"),
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
            ..Default::default()
        };
        let stub = stub_of(&record);
        assert_eq!(stub.predictions, record.predictions);
        assert_eq!((stub.model.as_str(), stub.version), ("fraud", 3));
        assert_eq!(time_ms(stub.time.as_ref()), 1_764_000_000_123);
        assert!(stub.encoded_len() <= 48, "{}", stub.encoded_len());
    }
}
