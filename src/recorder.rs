//! The record pipeline: request path → bounded queue → one writer thread → RocksDB.
//!
//! The request path only hands over what it already has (the decoded request, the answer's
//! bytes) with a non-blocking `try_send`; when the queue is full (by count or by bytes) the record
//! is dropped and counted, never waited for. The writer thread does the work — features,
//! predictions, encoding — and commits `WriteBatch`es; a RocksDB write stall therefore stalls only
//! the writer, and at worst fills the queue. Records waiting in the queue stay visible in a
//! pending map, so an outcome that arrives before its record reached RocksDB still joins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
// The writer's maps are keyed by names from the configuration (models, experiments, variants,
// shadow versions), not by what callers send, so a fast unkeyed hash is safe here; SipHash was
// ~900 instructions per recorded call.
use rustc_hash::FxHashMap;

use crate::convert::prediction_record::{self, RecordParts};
use crate::experiment::UnitSketch;
use crate::feature_store::{FeatureCatalog, FeatureDef, FeatureKind};
use crate::pb::modelgate::v1 as pb;
use crate::protocol::{InferAnswer, InferRequest, Protocol, Wanted};
use crate::record::{self, FeatureTable, Prediction};
use crate::routing::Route;
use crate::shadow::{self, Answer, Comparison};
use crate::shadow::{Disagreement, ShadowCounter, ShadowLatency};
use crate::storage::{EncodedPrediction, RecordLog, RecordWrites, SharedFields, Tallies};
use crate::telemetry::Metrics;
use prometheus_client::metrics::counter::Counter;

/// Everything the data plane knows about one finished request.
#[derive(Debug, Default)]
pub struct RawRecord {
    /// Request id.
    pub request_id: String,
    /// Arrival time, Unix ms.
    pub time_ms: u64,
    /// gRPC path.
    pub method: String,
    /// Model as named by the caller (empty when none).
    pub model: String,
    /// The route that served it.
    pub route: Option<Arc<Route>>,
    /// A/B experiment, when the request was in one (shared with the routing snapshot).
    pub experiment: Option<Arc<str>>,
    /// Variant within the experiment.
    pub variant: Option<Arc<str>>,
    /// Counted in the experiment's results (false when the variant was forced).
    pub counted: bool,
    /// Shadow versions that did not take this request (sampling).
    pub shadow_skipped: Vec<u32>,
    /// Shadow versions whose copy was dropped (too many copies in flight).
    pub shadow_dropped: Vec<u32>,
    /// Shadow versions that were not sent a copy because they are down (breaker open).
    pub shadow_suppressed: Vec<u32>,
    /// Unit id (the bucketing key).
    pub unit_id: Option<String>,
    /// Final gRPC status code.
    pub status: i32,
    /// Time waiting for the upstream.
    pub upstream_latency: Option<Duration>,
    /// Time through modelgate.
    pub latency: Duration,
    /// The inference request as its protocol decoded it (which reads its answer too); `None`
    /// when the call was not an inference. Its inputs are decoded on the writer thread.
    pub request: Option<Arc<dyn InferRequest>>,
    /// The answer (one message, unframed) when it succeeded: an inference's, read for
    /// predictions; a pass-through call's, kept for shadow comparisons only.
    pub response: Option<Bytes>,
    /// Approximate bytes held (for the queue's byte bound).
    pub size: usize,
}

/// Settings of the pipeline.
#[derive(Clone, Debug)]
pub struct RecorderSettings {
    /// Store every inference call as a prediction record (and its features in the feature
    /// store); when false, records are still prepared for experiments, shadows and drift, but
    /// not stored.
    pub record_predictions: bool,
    /// Records the queue holds.
    pub queue: usize,
    /// Bytes the queued records may hold.
    pub queue_bytes: usize,
    /// Records per `WriteBatch` at most.
    pub batch: usize,
    /// How long the writer waits after writing a partial batch before it takes the next.
    pub linger: Duration,
    /// How often changed unit sketches and latency histograms are stored.
    pub tally_persist: Duration,
    /// Input tensor or request parameter naming the feature-store entity.
    pub entity_key: String,
    /// Elements decoded per tensor at most.
    pub max_elements: usize,
}

impl Default for RecorderSettings {
    fn default() -> Self {
        RecorderSettings {
            record_predictions: true,
            queue: 65_536,
            queue_bytes: 16 << 20,
            batch: 512,
            linger: Duration::from_millis(5),
            tally_persist: Duration::from_millis(250),
            entity_key: "entity_id".into(),
            max_elements: crate::oip::DEFAULT_MAX_ELEMENTS,
        }
    }
}

/// How a shadow copy went.
#[derive(Debug)]
pub enum ShadowCall {
    /// It answered OK: the response message and the time it took.
    Answered(Bytes, Duration),
    /// It failed with this gRPC code (unreachable upstreams are UNAVAILABLE).
    Failed(i32),
    /// It missed its deadline.
    Timeout,
}

/// One shadow copy and production's answer, for the writer to count and compare.
#[derive(Debug)]
pub struct ShadowObservation {
    /// Model.
    pub model: String,
    /// Shadow version.
    pub version: u32,
    /// The shadow's route (prediction reading).
    pub shadow: Arc<Route>,
    /// The version that answered the caller.
    pub production: Arc<Route>,
    /// Request id.
    pub request_id: String,
    /// Arrival time of the original request.
    pub time_ms: u64,
    /// The protocol that reads both answers when they answer an inference; `None` when they are
    /// opaque (compared byte for byte).
    pub reader: Option<&'static dyn Protocol>,
    /// When the answers agree.
    pub comparison: Comparison,
    /// Production's answer and upstream latency (`None` when it failed).
    pub production_answer: Option<(Bytes, Duration)>,
    /// The copy's result.
    pub result: ShadowCall,
}

/// Records queued and not yet written, by request id. Request ids can be the caller's
/// (`x-request-id`), so the hash is keyed (aHash, randomly seeded); SipHash, the default, cost
/// ~300 instructions per hashing, and DashMap hashes a key twice per insert or removal.
type Pending = DashMap<String, Arc<RawRecord>, ahash::RandomState>;

enum Msg {
    Record(Arc<RawRecord>),
    Shadow(Box<ShadowObservation>),
    Flush(SyncSender<()>),
    Stop,
}

/// The handle the data plane and the control services use.
pub struct Recorder {
    // Unbounded as a channel (its blocks are allocated as messages arrive and freed as they are
    // taken: a preallocated channel of `--record-queue` slots held 1.5 MiB even when nothing is
    // recorded); bounded by `depth`.
    tx: Sender<Msg>,
    /// Records and shadow observations queued and not yet written (at most `settings.queue`).
    depth: Arc<AtomicUsize>,
    pending: Arc<Pending>,
    queued_bytes: Arc<AtomicUsize>,
    settings: RecorderSettings,
    metrics: Arc<Metrics>,
    catalog: Arc<FeatureCatalog>,
    monitor: Option<Arc<crate::monitor::Monitor>>,
}

/// What a finished call says, read on the writer thread: its features and predictions, and why
/// either could not be read. [`Prepared::encode`] then makes the stored record of it.
pub struct Prepared {
    /// Its features, one row per sample.
    pub features: FeatureTable,
    /// Its predictions, one per row.
    pub predictions: Vec<Prediction>,
    /// Why features or predictions could not be read (empty when they were).
    pub notes: Vec<String>,
}

pub use crate::convert::{prediction_from_pb, prediction_to_pb};

/// Reads what the data plane saw: features, predictions, notes. `names` are the feature columns
/// of an earlier record of the same model, shared when this one's are the same.
pub fn prepare(
    raw: &RawRecord,
    settings: &RecorderSettings,
    names: Option<&record::Columns>,
) -> Prepared {
    let mut notes = Vec::new();
    let features = match &raw.request {
        Some(req) => {
            let unregistered = std::collections::BTreeMap::new();
            let registered = raw
                .route
                .as_ref()
                .map_or(&unregistered, |r| &r.feature_names);
            req.inputs(settings.max_elements)
                .and_then(|inputs| {
                    record::extract_features(
                        &inputs,
                        registered,
                        &settings.entity_key,
                        raw.unit_id.as_deref(),
                        names,
                    )
                })
                .unwrap_or_else(|e| {
                    notes.push(format!("features: {e}"));
                    FeatureTable::default()
                })
        }
        None => FeatureTable::default(),
    };
    let predictions = match (&raw.response, &raw.route, &raw.request) {
        (Some(bytes), Some(route), Some(req)) => {
            let protocol = req.protocol();
            protocol
                .read_answer(bytes)
                .and_then(|a| predictions(&*a, route, settings.max_elements))
                .unwrap_or_else(|e| {
                    notes.push(format!("prediction: {e}"));
                    Vec::new()
                })
        }
        _ => Vec::new(),
    };
    Prepared {
        features,
        predictions,
        notes,
    }
}

impl Prepared {
    /// The stored record of `raw`, encoded from what it borrows (see
    /// [`crate::convert::prediction_record`]).
    pub fn encode(&self, raw: &RawRecord) -> EncodedPrediction {
        self.encode_sharing(raw, None)
    }

    /// [`Prepared::encode`], its shared fields kept apart when given: `shared` must be
    /// [`Prepared::shared_fields`] of this record.
    pub fn encode_sharing(
        &self,
        raw: &RawRecord,
        shared: Option<&Arc<SharedFields>>,
    ) -> EncodedPrediction {
        let route = raw.route.as_deref();
        let model = route.map_or(raw.model.as_str(), |r| r.model.as_str());
        let version = route.map_or(0, |r| r.version);
        let note = self.notes.join("; ");
        let parts = RecordParts {
            request_id: &raw.request_id,
            time_ms: raw.time_ms,
            model,
            version,
            experiment: raw.experiment.as_deref().unwrap_or_default(),
            variant: raw.variant.as_deref().unwrap_or_default(),
            unit_id: raw.unit_id.as_deref().unwrap_or_default(),
            method: &raw.method,
            status_code: raw.status,
            upstream_latency_us: raw.upstream_latency.map_or(0, |d| d.as_micros() as u64),
            latency_us: raw.latency.as_micros() as u64,
            feature_names: &self.features.names,
            rows: &self.features.rows,
            predictions: &self.predictions,
            entity_ids: &self.features.entities,
            note: &note,
            variant_forced: raw.experiment.is_some() && !raw.counted,
        };
        debug_assert!(shared.is_none_or(|s| s.bytes == self.shared_fields(raw).bytes));
        let bytes = match shared {
            Some(_) => prediction_record::encode_own(&parts),
            None => prediction_record::encode(&parts),
        };
        EncodedPrediction {
            request_id: raw.request_id.clone(),
            model: model.to_string(),
            version,
            bytes,
            shared: shared.cloned(),
        }
    }

    /// The fields `raw`'s record shares with the other records of its model, method and
    /// feature names.
    pub fn shared_fields(&self, raw: &RawRecord) -> SharedFields {
        let model = raw.route.as_deref().map_or(&raw.model, |r| &r.model);
        SharedFields::new(prediction_record::encode_shared(
            model,
            &raw.method,
            &self.features.names,
        ))
    }
}

impl Recorder {
    /// Starts the writer thread.
    pub fn start(
        records: Arc<dyn RecordLog>,
        tallies: Arc<dyn Tallies>,
        settings: RecorderSettings,
        metrics: Arc<Metrics>,
        catalog: Arc<FeatureCatalog>,
        monitor: Option<Arc<crate::monitor::Monitor>>,
    ) -> (Recorder, std::thread::JoinHandle<()>) {
        let (tx, rx) = channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(Pending::default());
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            monitor: monitor.clone(),
            sketches: Default::default(),
            names: Default::default(),
            shadow_metrics: Default::default(),
            records,
            tallies,
            rx,
            depth: depth.clone(),
            pending: pending.clone(),
            queued_bytes: queued_bytes.clone(),
            settings: settings.clone(),
            metrics: metrics.clone(),
            catalog: catalog.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("modelgate-recorder".into())
            .spawn(move || writer.run())
            .expect("spawning the recorder thread");
        (
            Recorder {
                tx,
                depth,
                pending,
                queued_bytes,
                settings,
                metrics,
                catalog,
                monitor,
            },
            handle,
        )
    }

    /// Whether a finished call needs the writer: always when prediction records are stored;
    /// otherwise only when an experiment counts it, shadows were involved, or drift monitoring
    /// watches its model. (Routing-only deployments then never touch the queue.)
    pub fn wanted(&self, model: &str, in_experiment: bool, shadowed: bool) -> bool {
        self.settings.record_predictions
            || in_experiment
            || shadowed
            || self.monitor.as_ref().is_some_and(|m| m.watching(model))
    }

    /// Hands a record to the writer without waiting. Returns false when it was dropped.
    pub fn submit(&self, raw: RawRecord) -> bool {
        let size = raw.size + 512;
        if self.queued_bytes.load(Ordering::Relaxed) + size > self.settings.queue_bytes
            || !self.enter_queue()
        {
            self.metrics.records_dropped.inc();
            return false;
        }
        let raw = Arc::new(raw);
        // Visible to outcome joins before the caller can see the response.
        if self.settings.record_predictions {
            self.pending.insert(raw.request_id.clone(), raw.clone());
        }
        self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        match self.tx.send(Msg::Record(raw.clone())) {
            Ok(()) => {
                self.metrics.record_queue_depth.inc();
                true
            }
            Err(_) => {
                self.depth.fetch_sub(1, Ordering::AcqRel);
                self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                self.pending
                    .remove_if(&raw.request_id, |_, v| Arc::ptr_eq(v, &raw));
                self.metrics.records_dropped.inc();
                false
            }
        }
    }

    /// Hands a shadow observation to the writer without waiting; dropped (and counted) when the
    /// queue is full.
    pub fn submit_shadow(&self, o: ShadowObservation) {
        if !self.enter_queue() {
            self.metrics.records_dropped.inc();
            return;
        }
        match self.tx.send(Msg::Shadow(Box::new(o))) {
            Ok(()) => {
                self.metrics.record_queue_depth.inc();
            }
            Err(_) => {
                self.depth.fetch_sub(1, Ordering::AcqRel);
                self.metrics.records_dropped.inc();
            }
        }
    }

    /// Takes a place in the queue, unless `--record-queue` places are taken.
    fn enter_queue(&self) -> bool {
        if self.depth.fetch_add(1, Ordering::AcqRel) >= self.settings.queue.max(1) {
            self.depth.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// A record still waiting to be written.
    pub fn pending(&self, request_id: &str) -> Option<Arc<RawRecord>> {
        self.pending.get(request_id).map(|r| r.clone())
    }

    /// Records and shadow observations waiting in the queue: submitted and not yet taken by the
    /// writer (a batch it is writing no longer counts).
    pub fn queued(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// Settings.
    pub fn settings(&self) -> &RecorderSettings {
        &self.settings
    }

    /// The feature catalog the writer registers traffic features in.
    pub fn catalog(&self) -> &Arc<FeatureCatalog> {
        &self.catalog
    }

    /// Waits (blocking) until everything submitted before the call is written.
    pub fn flush_blocking(&self) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Waits (blocking) until everything submitted before the call is written, for at most
    /// `timeout` (the queue may be full and the writer stalled). True when it was.
    pub fn flush_within_blocking(&self, timeout: Duration) -> bool {
        let (ack, done) = sync_channel(1);
        // The flush takes no place in the queue: it is answered once what is ahead of it is
        // written, or not within `timeout` when the writer is stalled.
        if self.tx.send(Msg::Flush(ack)).is_err() {
            return false;
        }
        done.recv_timeout(timeout).is_ok()
    }

    /// Writes everything submitted before the call and stops the writer thread, even if other
    /// handles remain (e.g. shadow copies still in flight): later submissions are dropped.
    pub fn close_blocking(&self) {
        let _ = self.tx.send(Msg::Stop);
    }

    /// Waits until everything submitted before the call is written, off the async runtime.
    pub async fn flush(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.flush_blocking()).await;
    }
}

impl crate::app::outcomes::PendingPredictions for Recorder {
    fn pending(&self, request_id: &crate::ids::RequestId) -> Option<pb::PredictionRecord> {
        Recorder::pending(self, request_id.as_str())
            // Rare (an outcome that arrived before its record was written): the record encoded
            // as it will be stored, and read back.
            .and_then(|raw| {
                prepare(&raw, &self.settings, None)
                    .encode(&raw)
                    .decode()
                    .ok()
            })
    }
}

/// Distinct-unit sketches of experiment variants and shadow latency histograms, kept by the
/// writer and stored when they changed, every `--tally-persist-interval`
/// ([`RecorderSettings::tally_persist`]), at flushes and at exit.
#[derive(Default)]
struct Sketches {
    /// (Keyed by the names the records share with the routing snapshot: no copy per record.)
    by_variant: FxHashMap<(Arc<str>, Arc<str>), (UnitSketch, bool)>,
    /// Production and shadow latency histograms per shadow (model, version).
    /// (Shared with the batch that stores them, and unshared again once it is written, so
    /// recording into them after a store copies nothing.)
    shadow_latency: FxHashMap<(String, u32), (Arc<ShadowLatency>, bool)>,
    last_persist: Option<std::time::Instant>,
}

/// The predictions of an inference's answer, as `route`'s registration says: only the output
/// they are read from is decoded.
fn predictions(
    answer: &dyn InferAnswer,
    route: &Route,
    max_elements: usize,
) -> Result<Vec<Prediction>, String> {
    let wanted = Wanted::One(record::prediction_output(&route.prediction));
    record::extract_predictions(&answer.outputs(wanted, max_elements)?, &route.prediction)
}

/// Reads a side's answer for `comparison`: the bytes, and when `reader` reads them (inference
/// answers) what the comparison compares — the predictions (as the version's registration
/// says) for `Label`, every output value per row for `Tolerance`. (Reading only that halves
/// the work: every output means decoding the whole answer.)
fn answer(
    bytes: &Bytes,
    reader: Option<&dyn Protocol>,
    route: &Route,
    max_elements: usize,
    comparison: &Comparison,
) -> Answer {
    let mut a = Answer {
        bytes: bytes.clone(),
        ..Default::default()
    };
    if let Some(decoded) = reader.and_then(|p| p.read_answer(bytes).ok()) {
        match comparison {
            Comparison::Label => {
                a.predictions = predictions(&*decoded, route, max_elements).unwrap_or_default();
            }
            // An output that does not decode leaves no rows at all, rather than rows whose
            // values would be compared out of place.
            Comparison::Tolerance { .. } => {
                a.rows = decoded
                    .outputs(Wanted::All, max_elements)
                    .map(|o| record::output_rows(&o))
                    .unwrap_or_default();
            }
            Comparison::Bytes => {}
        }
    }
    a
}

impl Writer {
    /// Adds to a shadow counter, in the batch (for reports) and in the metrics.
    fn count_shadow(
        &self,
        batch: &mut RecordWrites,
        model: &str,
        version: u32,
        counter: ShadowCounter,
        n: i64,
    ) {
        batch.add_shadow_count(model, version, counter, n);
        let mut metrics = self.shadow_metrics.lock();
        let by_version = match metrics.get_mut(model) {
            Some(m) => m,
            None => metrics.entry(model.to_string()).or_default(),
        };
        by_version
            .entry((version, counter))
            .or_insert_with(|| self.shadow_metric(model, version, counter))
            .inc_by(n as u64);
    }

    /// The metric a shadow counter adds to.
    fn shadow_metric(&self, model: &str, version: u32, counter: ShadowCounter) -> Counter {
        let labels = || crate::telemetry::VersionLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        let outcome = match counter {
            ShadowCounter::Compared => {
                return self
                    .metrics
                    .shadow_compared
                    .get_or_create(&labels())
                    .clone();
            }
            ShadowCounter::Agreed => {
                return self.metrics.shadow_agreed.get_or_create(&labels()).clone();
            }
            ShadowCounter::Timeouts => "timeout",
            ShadowCounter::Error(_) => "error",
            ShadowCounter::Mirrored => "mirrored",
            ShadowCounter::Skipped => "skipped",
            ShadowCounter::Dropped => "dropped",
            ShadowCounter::Suppressed => "suppressed",
        };
        self.metrics
            .shadow_requests
            .get_or_create(&crate::telemetry::ShadowLabels {
                model: model.to_string(),
                version: version.to_string(),
                outcome: outcome.to_string(),
            })
            .clone()
    }

    /// Counts one shadow copy, compares its answer with production's, logs a disagreement.
    fn observe_shadow(
        &self,
        batch: &mut RecordWrites,
        sketches: &mut Sketches,
        o: &ShadowObservation,
    ) {
        self.count_shadow(batch, &o.model, o.version, ShadowCounter::Mirrored, 1);
        let (answer_bytes, latency) = match &o.result {
            ShadowCall::Timeout => {
                self.count_shadow(batch, &o.model, o.version, ShadowCounter::Timeouts, 1);
                return;
            }
            ShadowCall::Failed(code) => {
                let name = crate::telemetry::code_name(tonic::Code::from_i32(*code));
                self.count_shadow(batch, &o.model, o.version, ShadowCounter::Error(name), 1);
                return;
            }
            ShadowCall::Answered(bytes, latency) => (bytes, *latency),
        };
        let Some((prod_bytes, prod_latency)) = &o.production_answer else {
            // Production failed: nothing to compare with.
            return;
        };
        let (h, dirty) = sketches
            .shadow_latency
            .entry((o.model.clone(), o.version))
            .or_insert_with(|| (Arc::new(self.load_latency(&o.model, o.version)), false));
        Arc::make_mut(h).record(*prod_latency, latency);
        *dirty = true;
        // Answers modelgate does not parse can only be compared byte for byte.
        let comparison = if o.reader.is_some() {
            o.comparison.clone()
        } else {
            Comparison::Bytes
        };
        let max = self.settings.max_elements;
        let verdict = shadow::compare(
            &comparison,
            &answer(prod_bytes, o.reader, &o.production, max, &comparison),
            &answer(answer_bytes, o.reader, &o.shadow, max, &comparison),
        );
        self.count_shadow(
            batch,
            &o.model,
            o.version,
            ShadowCounter::Compared,
            verdict.compared as i64,
        );
        self.count_shadow(
            batch,
            &o.model,
            o.version,
            ShadowCounter::Agreed,
            verdict.agreed as i64,
        );
        if let Some((row, production, shadow)) = verdict.first_disagreement {
            batch.add_disagreement(
                &o.model,
                o.version,
                Disagreement {
                    request_id: o.request_id.clone(),
                    time_ms: o.time_ms,
                    row,
                    production,
                    shadow,
                },
            );
        }
    }

    fn load_latency(&self, model: &str, version: u32) -> ShadowLatency {
        self.tallies
            .shadow_latency(model, version)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn load_sketch(&self, experiment: &str, variant: &str) -> UnitSketch {
        match self.tallies.experiment_units(experiment, variant) {
            Ok(Some(registers)) if registers.len() == UnitSketch::number_registers() => {
                UnitSketch::with_registers(registers)
            }
            _ => UnitSketch::new(),
        }
    }
}

/// A model's shadow counter metrics, by version and counter.
type ShadowMetrics = FxHashMap<(u32, ShadowCounter), Counter>;

/// A model's latest feature columns, and the fields its records share (with the method they
/// came by).
struct ModelNames {
    columns: record::Columns,
    method: String,
    shared: Arc<SharedFields>,
}

struct Writer {
    monitor: Option<Arc<crate::monitor::Monitor>>,
    // Only the writer thread touches it; the lock (never contended) lets `write` take `&self`
    // while it also loads sketches from the store.
    sketches: parking_lot::Mutex<Sketches>,
    /// The feature columns of each model's latest record, shared by the next ones with the
    /// same columns (one entry per model that routes: only routed records are kept).
    names: parking_lot::Mutex<FxHashMap<String, ModelNames>>,
    /// The metric of each shadow counter (model, then version and counter), found once: making
    /// its labels and looking it up in its family was ~1,400 instructions per count.
    shadow_metrics: parking_lot::Mutex<FxHashMap<String, ShadowMetrics>>,
    records: Arc<dyn RecordLog>,
    tallies: Arc<dyn Tallies>,
    rx: Receiver<Msg>,
    depth: Arc<AtomicUsize>,
    pending: Arc<Pending>,
    queued_bytes: Arc<AtomicUsize>,
    settings: RecorderSettings,
    metrics: Arc<Metrics>,
    catalog: Arc<FeatureCatalog>,
}

impl Writer {
    /// Runs until every `Recorder` (sender) is gone, writing everything queued before that.
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let mut records = Vec::new();
            let mut shadows = Vec::new();
            let mut acks = Vec::new();
            let mut stop = false;
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    Msg::Record(r) => records.push(r),
                    Msg::Shadow(o) => shadows.push(o),
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Stop => stop = true,
                }
                next = if records.len() + shadows.len() < self.settings.batch {
                    self.rx.try_recv().ok()
                } else {
                    None
                };
            }
            // Taken off the queue (as a bounded channel's slots would be freed): the queue holds
            // `--record-queue` more while this batch is written.
            self.depth
                .fetch_sub(records.len() + shadows.len(), Ordering::AcqRel);
            self.write(&records, &shadows, !acks.is_empty());
            // Records leave the depth gauge in `write`, once written; shadow observations here.
            self.metrics
                .record_queue_depth
                .dec_by(i64::try_from(shadows.len()).unwrap_or(i64::MAX));
            let full = records.len() + shadows.len() >= self.settings.batch;
            for ack in acks {
                let _ = ack.send(());
            }
            if stop {
                break;
            }
            // Under load, waking for every few records costs more than writing them: each
            // wake-up is a futex call on a data thread and a context switch on two busy cores,
            // and each small batch a WAL write. So after a partial batch the writer sleeps
            // (not waiting on the queue, so senders never wake it) and takes what gathered
            // meanwhile as one batch. A first record after a quiet spell is written at once.
            if !full && !self.settings.linger.is_zero() {
                std::thread::sleep(self.settings.linger);
            }
        }
        // Last changes of the unit sketches.
        self.write(&[], &[], true);
        // What the store keeps between batches (runs of feature rows): lost to a crash, it is
        // repaired at the next start; written here, it need not be.
        if let Err(e) = self.records.finish() {
            tracing::warn!(error = %e, "finishing the record store failed; it is repaired at the next start");
        }
    }

    fn write(
        &self,
        records: &[Arc<RawRecord>],
        shadows: &[Box<ShadowObservation>],
        persist_sketches: bool,
    ) {
        // Grown as it fills: sized up front (a few KB) it was one of glibc's large allocations
        // per batch, which cost more than the doublings (callgrind, ~500 instructions per call).
        let mut batch = RecordWrites::default();
        let mut new_defs: Vec<FeatureDef> = Vec::new();
        // Tables of feature names already checked against the catalog in this batch.
        let mut checked: Vec<Arc<[String]>> = Vec::new();
        let mut sketches = self.sketches.lock();
        let mut names = self.names.lock();
        let mut variant_requests: FxHashMap<(&str, &str), u64> = FxHashMap::default();
        for raw in records {
            let model = raw.route.as_ref().map(|r| &r.model);
            let previous = model.and_then(|m| names.get(m));
            let p = prepare(raw, &self.settings, previous.map(|n| &n.columns));
            // The model's entry, holding this record's names and shared fields from here on
            // (when it routed).
            let entry = match (model, previous) {
                (Some(_), Some(n))
                    if Arc::ptr_eq(&n.columns.names, &p.features.names)
                        && n.method == raw.method =>
                {
                    Some(n)
                }
                (Some(m), _) => {
                    let fresh = ModelNames {
                        columns: p.features.columns(),
                        method: raw.method.clone(),
                        shared: Arc::new(p.shared_fields(raw)),
                    };
                    names.insert(m.clone(), fresh);
                    names.get(m)
                }
                (None, _) => None,
            };
            let shared = entry.map(|n| &n.shared);
            if let Some(m) = &self.monitor {
                let model = raw.route.as_ref().map_or(&raw.model, |r| &r.model);
                m.observe(
                    model,
                    &p.features.names,
                    &p.features.precisions,
                    &p.features.rows,
                );
            }
            if let (Some(e), Some(v), true) = (&raw.experiment, &raw.variant, raw.counted) {
                *variant_requests.entry((e, v)).or_default() += 1;
                if let Some(unit) = &raw.unit_id {
                    let (sketch, dirty) = sketches
                        .by_variant
                        .entry((e.clone(), v.clone()))
                        .or_insert_with(|| (self.load_sketch(e, v), false));
                    sketch.add_hash(xxhash_rust::xxh3::xxh3_64(unit.as_bytes()));
                    *dirty = true;
                }
            }
            if !self.settings.record_predictions {
                continue;
            }
            // Encoded first, so that the rows can then move into the writes instead of being
            // copied.
            let record = p.encode_sharing(raw, shared);
            let Prepared { features, .. } = p;
            for (row, entity) in features.rows.into_iter().zip(&features.entities) {
                let Some(entity) = entity else { continue };
                if crate::feature_store::validate_entity_id(entity).is_err() {
                    continue;
                }
                // Each table of names is checked against the catalog once per batch: while a
                // model's columns repeat, its records share one.
                let known = checked.iter().any(|n| Arc::ptr_eq(n, &features.names));
                for (name, value) in features.names.iter().zip(&row).filter(|_| !known) {
                    if !self.catalog.contains(name) && !new_defs.iter().any(|d| &d.name == name) {
                        let def = FeatureDef {
                            name: name.clone(),
                            description: String::new(),
                            kind: FeatureKind::of(value),
                            ttl_ms: None,
                            from_traffic: true,
                        };
                        batch.add_feature_def(&def);
                        new_defs.push(def);
                    }
                }
                if !known {
                    checked.push(features.names.clone());
                }
                batch.add_feature_row(entity, raw.time_ms, features.names.clone(), row);
            }
            batch.add_prediction(record, raw.time_ms);
        }
        // Summed per batch: one merge per variant, not one per request.
        for ((experiment, variant), n) in variant_requests {
            batch.add_experiment_requests(experiment, variant, n);
            self.metrics
                .experiment_requests
                .get_or_create(&crate::telemetry::VariantLabels {
                    experiment: experiment.to_string(),
                    variant: variant.to_string(),
                })
                .inc_by(n);
        }
        // Shadow counters are summed per batch: one merge per counter, not one per request.
        let mut shadow_counts: FxHashMap<(&str, u32, ShadowCounter), i64> = FxHashMap::default();
        for raw in records {
            for (kind, versions) in [
                (ShadowCounter::Skipped, &raw.shadow_skipped),
                (ShadowCounter::Dropped, &raw.shadow_dropped),
                (ShadowCounter::Suppressed, &raw.shadow_suppressed),
            ] {
                for v in versions {
                    *shadow_counts.entry((&raw.model, *v, kind)).or_default() += 1;
                }
            }
        }
        for ((model, version, kind), n) in shadow_counts {
            self.count_shadow(&mut batch, model, version, kind, n);
        }
        for o in shadows {
            self.observe_shadow(&mut batch, &mut sketches, o);
        }
        let due = sketches
            .last_persist
            .is_none_or(|t| t.elapsed() >= self.settings.tally_persist);
        // What this batch stores of the sketches; marked dirty again if the batch fails, so a
        // failed write (a full disk) delays them instead of losing them.
        let mut persisted_units = Vec::new();
        let mut persisted_latency = Vec::new();
        if persist_sketches || due {
            for ((e, v), (sketch, dirty)) in sketches.by_variant.iter_mut() {
                if *dirty {
                    batch.put_experiment_units(e, v, sketch.get_registers());
                    *dirty = false;
                    persisted_units.push((e.clone(), v.clone()));
                }
            }
            for ((model, version), (h, dirty)) in sketches.shadow_latency.iter_mut() {
                if *dirty {
                    batch.put_shadow_latency(model, *version, h);
                    *dirty = false;
                    persisted_latency.push((model.clone(), *version));
                }
            }
            sketches.last_persist = Some(std::time::Instant::now());
        }
        drop(sketches);
        let n = records.len() as u64;
        // Records and the experiment request counters that count them are in this one batch:
        // after a crash or a failed write, counters and surviving records agree exactly.
        match self.records.commit(batch, false) {
            Ok(()) => {
                self.metrics.records_written.inc_by(n);
                self.metrics.record_batches.inc();
                for d in new_defs {
                    self.catalog.insert_if_absent(d);
                }
            }
            Err(e) => {
                self.metrics.record_write_errors.inc_by(n);
                // One line per failing batch would flood the log while the disk is full; the
                // store logs the first failure and the recovery, the metric counts every record.
                tracing::debug!(error = %e, records = n, "writing records failed; they are dropped");
                let mut sketches = self.sketches.lock();
                for key in persisted_units {
                    if let Some((_, dirty)) = sketches.by_variant.get_mut(&key) {
                        *dirty = true;
                    }
                }
                for key in persisted_latency {
                    if let Some((_, dirty)) = sketches.shadow_latency.get_mut(&key) {
                        *dirty = true;
                    }
                }
            }
        }
        // The queue's byte count and depth gauge, shared with every data thread's `submit`, are
        // lowered once per batch: per record, each was a locked add on a cache line that then
        // moved back to the next sender's core.
        let mut freed = 0;
        for raw in records {
            self.pending
                .remove_if(&raw.request_id, |_, v| Arc::ptr_eq(v, raw));
            freed += raw.size + 512;
        }
        self.queued_bytes.fetch_sub(freed, Ordering::Relaxed);
        self.metrics
            .record_queue_depth
            .dec_by(i64::try_from(records.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::{
        model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
    };
    use crate::protocol::oip_grpc::OipRequest;

    #[test]
    fn the_stored_record_says_what_the_call_did() {
        let request = ModelInferRequest {
            model_name: "churn".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2, 2],
                contents: Some(InferTensorContents {
                    fp32_contents: vec![1., 2., 3., 4.],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let raw = RawRecord {
            request_id: "r-1".into(),
            time_ms: 1_733_000_000_123,
            method: "/inference.GRPCInferenceService/ModelInfer".into(),
            model: "churn".into(),
            experiment: Some("ab".into()),
            variant: Some("treatment".into()),
            counted: false,
            unit_id: Some("user-3".into()),
            status: 0,
            upstream_latency: Some(Duration::from_micros(250)),
            latency: Duration::from_micros(300),
            request: Some(Arc::new(OipRequest::from(&request))),
            ..Default::default()
        };
        let settings = RecorderSettings::default();
        let p = prepare(&raw, &settings, None);
        let encoded = p.encode(&raw);
        assert_eq!(
            (
                encoded.request_id.as_str(),
                encoded.model.as_str(),
                encoded.version
            ),
            ("r-1", "churn", 0)
        );
        let record = encoded.decode().unwrap();
        assert_eq!(
            (
                record.request_id.as_str(),
                record.model.as_str(),
                record.version,
                record.time,
            ),
            ("r-1", "churn", 0, Some(crate::pb::timestamp(raw.time_ms)))
        );
        assert_eq!(
            (
                record.experiment.as_str(),
                record.variant.as_str(),
                record.unit_id.as_str(),
                record.method.as_str(),
                record.latency_us,
            ),
            (
                "ab",
                "treatment",
                "user-3",
                "/inference.GRPCInferenceService/ModelInfer",
                300
            )
        );
        assert_eq!(record.feature_names, ["x[0]", "x[1]"]);
        assert_eq!(
            record.rows[1].values,
            [3., 4.].map(|x| crate::convert::feature_value_to_pb(&record::FeatureValue::Number(x)))
        );
        assert_eq!(record.rows.len(), 2);
        assert_eq!(record.entity_ids, ["user-3", "user-3"]);
        assert!(record.variant_forced);
        assert_eq!(record.upstream_latency_us, 250);
    }
}
