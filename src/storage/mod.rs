//! The storage seam: what the control plane, the record writer, the outcome and result use cases,
//! the drift monitor and the event bus need from storage, as traits. The embedded RocksDB
//! (`crate::store`) implements them all; [`memory::MemoryStore`] implements them in memory (tests
//! run the use cases on it); [`faults::Faulty`] wraps any implementation to inject failures and
//! stalls. A new backend implements the traits and is bundled in a [`Storage`] — nothing in the
//! domain or the use cases changes (docs/architecture.md, "Adding a storage backend").
//!
//! | trait | holds | written |
//! |---|---|---|
//! | [`ControlStore`] | registry, experiments, shadows | one synced atomic write per control change |
//! | [`RecordLog`] | prediction records, outcomes, their indexes | record writes in batches; an outcome with its tallies |
//! | [`Tallies`] | experiment counters and unit sketches, per-version outcome tallies, shadow counters, latency and disagreements | with the records they count |
//! | [`EventLog`] | the numbered event stream | synced, one event at a time |
//! | [`FeatureStore`] | feature definitions and values (history and latest) | values with the records, definitions synced |
//! | [`DriftStore`] | drift references, drift and retraining state per model | synced |
//! | [`StoreHealth`] | whether writes work, sizes for the metrics | — |
//!
//! Records and events cross the seam in their protobuf form (`PredictionRecord`,
//! `OutcomeRecord`, `Event`): that is the format they are kept and served in, whatever keeps them.

pub mod faults;
pub mod memory;
pub mod reference;

use std::sync::Arc;
use std::time::Duration;

use crate::drift::{ConceptMetric, Reference};
use crate::experiment::VariantCounts;
use crate::feature_store::FeatureDef;
use crate::outcome::{Judgement, Tally};
use crate::pb::modelgate::v1 as pb;
use crate::record::{FeatureValue, Precision};
use crate::shadow::{Disagreement, ShadowCounter, ShadowCounts, ShadowLatency};
use crate::state::{State, Update};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend refused.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend (`rocksdb`, `memory`…).
        backend: &'static str,
        /// Its message.
        message: String,
        /// What kind of failure it is.
        kind: FailureKind,
    },
    /// A stored key does not parse.
    #[error("{0}")]
    Key(String),
    /// A stored value does not parse.
    #[error("corrupt {family} record for {key}: {source}")]
    Value {
        /// Where it is stored (a RocksDB column family).
        family: &'static str,
        /// Readable key.
        key: String,
        /// Parse error.
        source: serde_json::Error,
    },
    /// A stored protobuf does not decode.
    #[error("corrupt {family} record for {key}: {reason}")]
    Decode {
        /// Where it is stored.
        family: &'static str,
        /// Readable key.
        key: String,
        /// Decode error.
        reason: String,
    },
    /// A blocking task did not finish (panicked or was cancelled).
    #[error("storage task failed: {0}")]
    Task(String),
    /// The record exists already and may not be replaced (an outcome another replica of the
    /// fleet recorded first).
    #[error("already recorded")]
    AlreadyExists,
    /// A shared store (fleet mode's Redis) cannot be reached: nothing was changed, and the
    /// caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A write refused by the fault injector ([`faults::Faulty`], tests only).
    #[error("rocksdb: IO error: write failure injected for a test (as if the disk had failed)")]
    Injected,
}

/// What kind of failure a backend reported, for the decisions made on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The disk is full: the backend recovers by itself once space returns.
    NoSpace,
    /// The write was refused rather than made to wait (a stall, with "no slowdown" asked for):
    /// not a failure of the disk.
    WouldStall,
    /// Anything else.
    Other,
}

impl StoreError {
    /// Whether the backend recovers from this by itself (a full disk).
    pub fn recovers(&self) -> bool {
        matches!(
            self,
            StoreError::Backend {
                kind: FailureKind::NoSpace,
                ..
            }
        )
    }

    /// Whether this only says a write would have had to wait.
    pub fn would_stall(&self) -> bool {
        matches!(
            self,
            StoreError::Backend {
                kind: FailureKind::WouldStall,
                ..
            }
        )
    }
}

/// The number an outcome reports (numeric outcomes feed the experiment's moments).
pub fn actual_number(o: &pb::OutcomeRecord) -> Option<f64> {
    match o.actual.as_ref()?.kind.as_ref()? {
        pb::actual::Kind::Number(x) => Some(*x),
        _ => None,
    }
}

/// Result of a storage call.
pub type StoreResult<T> = Result<T, StoreError>;

/// How long records are kept, per family group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Prediction records and their index.
    pub predictions: Duration,
    /// Outcomes and their index (the tallies are kept forever).
    pub outcomes: Duration,
    /// Feature values (history and latest).
    pub features: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        let week = Duration::from_secs(7 * 24 * 3600);
        Retention {
            predictions: week,
            outcomes: week,
            features: week,
        }
    }
}

/// The oldest time still retained at `now_ms`.
pub fn cutoff(now_ms: u64, retention: Duration) -> u64 {
    now_ms.saturating_sub(retention.as_millis() as u64)
}

/// The configuration: registry, experiments, shadows.
pub trait ControlStore: Send + Sync {
    /// The whole state, as last written.
    fn load_state(&self) -> StoreResult<State>;
    /// Makes one control change durable, atomically and synced, before it returns.
    fn write_control(&self, update: &Update) -> StoreResult<()>;
    /// The store as one that several writers share (fleet mode), whose changes must be
    /// version-checked; `None` (the default) for a store this process alone writes.
    fn shared(&self) -> Option<&dyn SharedControl> {
        None
    }
}

/// A configuration several replicas write: every change is checked against the version it was
/// made from, so that two writers at once cannot lose an update (the loser reloads and applies
/// its change again).
pub trait SharedControl: Send + Sync {
    /// The stored configuration and its version, read at once.
    fn load_versioned(&self) -> StoreResult<(u64, State)>;
    /// The version of the stored configuration (0 when there is none).
    fn version(&self) -> StoreResult<u64>;
    /// Writes `update` if the stored configuration is still at version `base`: the new version,
    /// or `None` when another writer got there first (nothing was written).
    fn write_if(&self, base: u64, update: &Update) -> StoreResult<Option<u64>>;
}

/// A prediction record as stored (the encoded `PredictionRecord`), with what its index needs.
#[derive(Clone, Debug)]
pub struct EncodedPrediction {
    /// Its request id.
    pub request_id: String,
    /// Its model.
    pub model: String,
    /// Its version (0 when the request reached none).
    pub version: u32,
    /// The encoded `PredictionRecord`; with `shared`, only its own fields
    /// (`convert::prediction_record::encode_own`).
    pub bytes: Vec<u8>,
    /// The fields it shares with the other records of its model, method and feature names, when
    /// kept apart: a store may keep them once for all of those records.
    pub shared: Option<Arc<SharedFields>>,
}

/// Fields that the records of one model, called by one method with one table of feature names,
/// share (`convert::prediction_record::encode_shared`): half of a record of 16 features.
#[derive(Debug, PartialEq, Eq)]
pub struct SharedFields {
    /// The xxh3 hash of `bytes`: how a stored record names them.
    pub id: u64,
    /// The fields, encoded.
    pub bytes: Vec<u8>,
}

impl SharedFields {
    /// Shared fields encoded as `bytes`.
    pub fn new(bytes: Vec<u8>) -> SharedFields {
        SharedFields {
            id: xxhash_rust::xxh3::xxh3_64(&bytes),
            bytes,
        }
    }
}

impl EncodedPrediction {
    /// A record message, encoded.
    pub fn of(record: &pb::PredictionRecord) -> EncodedPrediction {
        EncodedPrediction {
            request_id: record.request_id.clone(),
            model: record.model.clone(),
            version: record.version,
            bytes: prost::Message::encode_to_vec(record),
            shared: None,
        }
    }

    /// The whole record, encoded.
    pub fn whole(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.shared {
            Some(s) => std::borrow::Cow::Owned(crate::convert::prediction_record::reassemble(
                &self.request_id,
                &s.bytes,
                &self.bytes,
            )),
            None => std::borrow::Cow::Borrowed(&self.bytes),
        }
    }

    /// The record message.
    pub fn decode(&self) -> Result<pb::PredictionRecord, prost::DecodeError> {
        prost::Message::decode(&self.whole()[..])
    }
}

/// One write of a record batch.
#[derive(Clone, Debug)]
pub enum RecordWrite {
    /// A prediction record (and its index entry), at `time_ms`.
    Prediction {
        /// The record.
        record: EncodedPrediction,
        /// Its time.
        time_ms: u64,
    },
    /// Feature values of one entity at one time (history, and the entity's latest values).
    Features {
        /// Entity id.
        entity: String,
        /// Time of the values.
        time_ms: u64,
        /// Feature names: shared between the rows of a table, and between a model's records
        /// while its columns repeat.
        names: Arc<[String]>,
        /// One value per name.
        values: Vec<FeatureValue>,
    },
    /// `n` more requests of an experiment variant.
    ExperimentRequests {
        /// Experiment.
        experiment: String,
        /// Variant.
        variant: String,
        /// Requests.
        n: u64,
    },
    /// The distinct-unit sketch (HyperLogLog registers) of an experiment variant, replaced.
    ExperimentUnits {
        /// Experiment.
        experiment: String,
        /// Variant.
        variant: String,
        /// The registers.
        registers: Vec<u8>,
    },
    /// A feature definition first seen in traffic.
    FeatureDef(FeatureDef),
    /// `n` added to a shadow counter.
    ShadowCount {
        /// Model.
        model: String,
        /// Shadow version.
        version: u32,
        /// Which counter.
        counter: ShadowCounter,
        /// How many.
        n: i64,
    },
    /// A shadow's latency histograms, replaced.
    ShadowLatency {
        /// Model.
        model: String,
        /// Shadow version.
        version: u32,
        /// The histograms, shared with the record writer that keeps them: a copy of two
        /// histograms is ~350 KB, every time they are stored.
        latency: Arc<ShadowLatency>,
    },
    /// A disagreement between a shadow and production, logged.
    Disagreement {
        /// Model.
        model: String,
        /// Shadow version.
        version: u32,
        /// What disagreed.
        disagreement: Disagreement,
    },
}

/// Record writes committed together: a crash or a failed write keeps all of them or none, so
/// counters and the records they count agree.
#[derive(Clone, Debug, Default)]
pub struct RecordWrites {
    /// The writes, in order.
    pub writes: Vec<RecordWrite>,
    records: usize,
}

impl RecordWrites {
    /// Adds a prediction record.
    pub fn add_prediction(&mut self, record: EncodedPrediction, time_ms: u64) {
        self.records += 1;
        self.writes
            .push(RecordWrite::Prediction { record, time_ms });
    }

    /// Adds feature values of one entity at one time.
    pub fn add_features<'a>(
        &mut self,
        entity: &str,
        time_ms: u64,
        values: impl IntoIterator<Item = (&'a str, &'a FeatureValue)>,
    ) {
        let (names, values): (Vec<String>, Vec<FeatureValue>) = values
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .unzip();
        self.add_feature_row(entity, time_ms, names.into(), values);
    }

    /// Adds one row of feature values (`values[i]` is `names[i]`'s) of one entity at one time;
    /// the names are shared, not copied.
    pub fn add_feature_row(
        &mut self,
        entity: &str,
        time_ms: u64,
        names: Arc<[String]>,
        values: Vec<FeatureValue>,
    ) {
        debug_assert_eq!(names.len(), values.len());
        if !values.is_empty() {
            self.writes.push(RecordWrite::Features {
                entity: entity.to_string(),
                time_ms,
                names,
                values,
            });
        }
    }

    /// Counts `n` requests of an experiment variant.
    pub fn add_experiment_requests(&mut self, experiment: &str, variant: &str, n: u64) {
        self.writes.push(RecordWrite::ExperimentRequests {
            experiment: experiment.to_string(),
            variant: variant.to_string(),
            n,
        });
    }

    /// Stores the distinct-unit sketch of an experiment variant.
    pub fn put_experiment_units(&mut self, experiment: &str, variant: &str, registers: &[u8]) {
        self.writes.push(RecordWrite::ExperimentUnits {
            experiment: experiment.to_string(),
            variant: variant.to_string(),
            registers: registers.to_vec(),
        });
    }

    /// Adds a feature definition.
    pub fn add_feature_def(&mut self, def: &FeatureDef) {
        self.writes.push(RecordWrite::FeatureDef(def.clone()));
    }

    /// Adds `n` to a shadow counter (nothing for 0).
    pub fn add_shadow_count(&mut self, model: &str, version: u32, counter: ShadowCounter, n: i64) {
        if n != 0 {
            self.writes.push(RecordWrite::ShadowCount {
                model: model.to_string(),
                version,
                counter,
                n,
            });
        }
    }

    /// Stores a shadow's latency histograms.
    pub fn put_shadow_latency(&mut self, model: &str, version: u32, latency: &Arc<ShadowLatency>) {
        self.writes.push(RecordWrite::ShadowLatency {
            model: model.to_string(),
            version,
            latency: latency.clone(),
        });
    }

    /// Logs a disagreement.
    pub fn add_disagreement(&mut self, model: &str, version: u32, disagreement: Disagreement) {
        self.writes.push(RecordWrite::Disagreement {
            model: model.to_string(),
            version,
            disagreement,
        });
    }

    /// Prediction records in the batch.
    pub fn len(&self) -> usize {
        self.records
    }

    /// True when no prediction was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

/// A page of prediction records.
#[derive(Clone, Debug, Default)]
pub struct PredictionPage {
    /// Records, newest first.
    pub records: Vec<pb::PredictionRecord>,
    /// Where the next page starts (time, request id), if there is one.
    pub next: Option<(u64, String)>,
}

/// An outcome to store, with what it changes in its version's tallies.
#[derive(Clone, Debug)]
pub struct OutcomeWrite<'a> {
    /// The outcome.
    pub outcome: &'a pb::OutcomeRecord,
    /// When it arrived.
    pub time_ms: u64,
    /// Its judgement against the prediction.
    pub judgement: &'a Judgement,
    /// The outcome it replaces (time, record, judgement), taken back from the tallies.
    pub replaced: Option<(u64, &'a pb::OutcomeRecord, Judgement)>,
    /// Whether it counts in the version's tallies.
    pub counted: bool,
}

/// Prediction records and outcomes.
pub trait RecordLog: Send + Sync {
    /// Commits a batch of record writes (records, features, tallies) atomically. With
    /// `no_slowdown`, a write that would stall fails instead ([`StoreError::would_stall`]).
    fn commit(&self, writes: RecordWrites, no_slowdown: bool) -> StoreResult<()>;
    /// Writes what the store keeps in memory between commits, once the last batch is committed
    /// (the record writer stops). Commits after it still work.
    fn finish(&self) -> StoreResult<()> {
        Ok(())
    }
    /// One prediction record with its time, unless unknown or older than `not_before_ms`.
    fn get_prediction(
        &self,
        request_id: &str,
        not_before_ms: u64,
    ) -> StoreResult<Option<(u64, pb::PredictionRecord)>>;
    /// Records of `model` (version 0: every version) in [start, end), newest first, at most
    /// `limit`, after the page cursor `after`.
    fn list_predictions(
        &self,
        model: &str,
        version: u32,
        start_ms: u64,
        end_ms: u64,
        limit: usize,
        after: Option<(u64, String)>,
    ) -> StoreResult<PredictionPage>;
    /// The outcomes joined to a request, by row.
    fn outcomes_of(&self, request_id: &str) -> StoreResult<Vec<pb::OutcomeRecord>>;
    /// One outcome with its time.
    fn get_outcome(
        &self,
        request_id: &str,
        row: u32,
    ) -> StoreResult<Option<(u64, pb::OutcomeRecord)>>;
    /// Stores an outcome and, in the same atomic write, its version's (and experiment
    /// variant's) tallies.
    fn write_outcome(&self, w: OutcomeWrite<'_>) -> StoreResult<()>;
    /// The last `n` judgements of a version, oldest first.
    fn recent_judgements(&self, model: &str, version: u32, n: usize)
        -> StoreResult<Vec<Judgement>>;
}

/// Counters, moments and sketches.
pub trait Tallies: Send + Sync {
    /// Requests, outcomes and successes per variant of an experiment, in `variants`' order.
    fn experiment_counts(
        &self,
        experiment: &str,
        variants: &[&str],
    ) -> StoreResult<Vec<VariantCounts>>;
    /// The stored unit sketch (HyperLogLog registers) of a variant.
    fn experiment_units(&self, experiment: &str, variant: &str) -> StoreResult<Option<Vec<u8>>>;
    /// A version's outcome tally over all time.
    fn tally(&self, model: &str, version: u32) -> StoreResult<Tally>;
    /// A version's outcome tally over its last `n` outcomes.
    fn recent_tally(&self, model: &str, version: u32, n: usize) -> StoreResult<Tally>;
    /// A shadow's counters.
    fn shadow_counts(&self, model: &str, version: u32) -> StoreResult<ShadowCounts>;
    /// A shadow's latency histograms.
    fn shadow_latency(&self, model: &str, version: u32) -> StoreResult<Option<ShadowLatency>>;
    /// A shadow's last `n` disagreements, newest first.
    fn recent_disagreements(
        &self,
        model: &str,
        version: u32,
        n: usize,
    ) -> StoreResult<Vec<Disagreement>>;
}

/// The numbered event stream.
pub trait EventLog: Send + Sync {
    /// Stores an event (its cursor is set), synced.
    fn append_event(&self, e: &pb::Event) -> StoreResult<()>;
    /// The last cursor stored (0 when none).
    fn last_event_cursor(&self) -> StoreResult<u64>;
    /// Events after `after`, oldest first, at most `limit`.
    fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<pb::Event>>;
    /// Stores `e` numbered right after the last stored event, sets its cursor and returns it.
    /// `next` is the number the caller expects: a log only this process writes uses it as is; a
    /// shared one (fleet mode) numbers the event itself.
    fn append_next(&self, e: &mut pb::Event, next: u64) -> StoreResult<u64> {
        e.cursor = next;
        self.append_event(e)?;
        Ok(next)
    }
    /// Whether other replicas append to this log too: their events then reach this replica's
    /// watchers by [`crate::events::EventBus::relay`], and so do this replica's own, in order.
    fn shared(&self) -> bool {
        false
    }
}

/// Feature definitions and values.
pub trait FeatureStore: Send + Sync {
    /// Every definition.
    fn load_feature_defs(&self) -> StoreResult<Vec<FeatureDef>>;
    /// Stores definitions, synced.
    fn put_feature_defs(&self, defs: &[FeatureDef]) -> StoreResult<()>;
    /// Per entity and feature (name, TTL), the newest value at or before `as_of_ms` within the
    /// TTL and retention, with its time.
    #[allow(clippy::type_complexity)]
    fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> StoreResult<Vec<Vec<Option<(u64, FeatureValue)>>>>;
}

/// Drift references and the per-model state of the drift monitor.
pub trait DriftStore: Send + Sync {
    /// Stores a model's reference, clearing its drift state in the same write.
    fn put_reference(&self, model: &str, r: &Reference) -> StoreResult<()>;
    /// A model's reference.
    fn load_reference(&self, model: &str) -> StoreResult<Option<Reference>>;
    /// Models with a reference.
    fn reference_models(&self) -> StoreResult<Vec<String>>;
    /// Stores a piece of a model's monitor state (JSON), synced.
    fn put_model_state(&self, model: &str, name: &str, json: &[u8]) -> StoreResult<()>;
    /// A piece of a model's monitor state (JSON).
    fn get_model_state(&self, model: &str, name: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Every piece of every model's monitor state, as `(model, name, JSON)`: how a replica of
    /// a fleet learns what the others changed (retraining policies, episodes, evaluations).
    fn model_states(&self) -> StoreResult<Vec<(String, String, Vec<u8>)>> {
        Ok(Vec::new())
    }
    /// The store as one that several replicas share (fleet mode): their rows make one window
    /// per model, which one replica at a time evaluates. `None` (the default) for a store this
    /// process alone uses.
    fn shared(&self) -> Option<&dyn SharedDrift> {
        None
    }
}

/// A live row as the drift monitor keeps it: each reference feature's value (in the
/// reference's order, `None` when the row lacks it) and the precision it came at.
pub type DriftRow = Vec<Option<(FeatureValue, Precision)>>;

/// Drift across a fleet: the rows every replica contributes to a model's shared window, and the
/// lease that lets one replica at a time evaluate it.
pub trait SharedDrift: Send + Sync {
    /// Each model's reference stamp: a number that changes whenever the model's reference is
    /// replaced, so that replicas notice another's upload without reading the reference.
    fn reference_stamps(&self) -> StoreResult<std::collections::HashMap<String, u64>>;
    /// Queues rows for the shared window of `model` (made against the reference with `stamp`),
    /// which keeps the latest `keep`. Never blocks: rows are sent in batches, and dropped (and
    /// counted) when the queue is full.
    fn contribute(&self, model: &str, stamp: u64, keep: usize, rows: Vec<DriftRow>);
    /// Waits (at most `limit`) until the rows this replica contributed so far are in the
    /// shared windows: whether they are.
    fn settle(&self, limit: Duration) -> bool;
    /// Rows contributed to the shared window of `model` so far, by the whole fleet.
    fn contributed(&self, model: &str) -> StoreResult<u64>;
    /// The latest (at most `n`) rows of the shared window that were made against `stamp`,
    /// oldest first.
    fn window(&self, model: &str, stamp: u64, n: usize) -> StoreResult<Vec<DriftRow>>;
    /// Takes, or keeps, the lease on evaluating `model` for `ttl`: whether this replica holds
    /// it now.
    fn lease(&self, model: &str, ttl: Duration) -> StoreResult<bool>;
    /// Queues judged outcomes of `model` version `version` (each its metric and value: 1/0 or
    /// the absolute error) for the version's shared concept window, which keeps the latest
    /// `keep`. Never blocks, like [`contribute`](SharedDrift::contribute).
    fn contribute_outcomes(
        &self,
        model: &str,
        version: u32,
        keep: usize,
        values: Vec<(ConceptMetric, f64)>,
    );
    /// The model versions with a shared concept window.
    fn outcome_versions(&self) -> StoreResult<Vec<(String, u32)>>;
    /// A version's shared concept window, oldest first, and how many outcomes the fleet has
    /// added to it so far (read at once).
    fn outcomes(&self, model: &str, version: u32) -> StoreResult<(u64, Vec<(ConceptMetric, f64)>)>;
}

/// Typed access to the monitor's state records (JSON) of a [`DriftStore`].
pub trait DriftStateExt {
    /// Writes a model's state record `name` (synced).
    fn put_state<T: serde::Serialize>(&self, model: &str, name: &str, v: &T) -> StoreResult<()>;
    /// Reads a model's state record `name`.
    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        model: &str,
        name: &str,
    ) -> StoreResult<Option<T>>;
}

impl<S: DriftStore + ?Sized> DriftStateExt for S {
    fn put_state<T: serde::Serialize>(&self, model: &str, name: &str, v: &T) -> StoreResult<()> {
        self.put_model_state(
            model,
            name,
            &serde_json::to_vec(v).expect("state records serialise"),
        )
    }

    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        model: &str,
        name: &str,
    ) -> StoreResult<Option<T>> {
        match self.get_model_state(model, name)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Value {
                    family: "references",
                    key: format!("{model}/{name}"),
                    source,
                }),
        }
    }
}

/// Sizes of one part of the store, for the metrics.
#[derive(Debug, Clone)]
pub struct FamilyStats {
    /// Name (a RocksDB column family).
    pub name: &'static str,
    /// Bytes in files.
    pub sst_bytes: u64,
    /// Bytes in memory tables.
    pub memtable_bytes: u64,
    /// Estimated live data.
    pub live_data_bytes: u64,
    /// Memory of its open files' readers outside the block cache.
    pub table_readers_bytes: u64,
}

/// The store's size and write-stall state, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Per part.
    pub families: Vec<FamilyStats>,
    /// Writes are stopped.
    pub write_stopped: bool,
    /// Bytes per second writes are delayed to, when delayed.
    pub delayed_write_rate: u64,
    /// Time writes have stalled in total.
    pub stall_seconds: f64,
    /// Bytes the block cache holds (every family shares it; index and filter blocks included).
    pub block_cache_bytes: u64,
    /// Of those, bytes pinned (in use by a reader, so not evictable).
    pub block_cache_pinned_bytes: u64,
}

/// Whether the store works, for `/ready`, `/live` and the metrics.
pub trait StoreHealth: Send + Sync {
    /// Ok while writes work (a small synced write is tried while they have been failing).
    fn check(&self) -> Result<(), String>;
    /// How long writes have been failing with an error the backend does not recover from by
    /// itself, and the error.
    fn unrecoverable_write_failure(&self) -> Option<(Duration, String)>;
    /// Sizes and write stalls.
    fn stats(&self) -> StoreStats;
}

/// Every part of a storage backend, as the rest of modelgate holds it.
#[derive(Clone)]
pub struct Storage {
    /// Registry, experiments, shadows.
    pub control: Arc<dyn ControlStore>,
    /// Records and outcomes.
    pub records: Arc<dyn RecordLog>,
    /// Counters, moments, sketches.
    pub tallies: Arc<dyn Tallies>,
    /// Events.
    pub events: Arc<dyn EventLog>,
    /// The feature store.
    pub features: Arc<dyn FeatureStore>,
    /// Drift references and state.
    pub drift: Arc<dyn DriftStore>,
    /// Health and sizes.
    pub health: Arc<dyn StoreHealth>,
    /// How long records are kept (reads honour it).
    pub retention: Retention,
}

impl Storage {
    /// A storage whose every part is `backend`.
    pub fn of<B>(backend: Arc<B>, retention: Retention) -> Self
    where
        B: ControlStore
            + RecordLog
            + Tallies
            + EventLog
            + FeatureStore
            + DriftStore
            + StoreHealth
            + 'static,
    {
        Storage {
            control: backend.clone(),
            records: backend.clone(),
            tallies: backend.clone(),
            events: backend.clone(),
            features: backend.clone(),
            drift: backend.clone(),
            health: backend,
            retention,
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Runs a blocking storage call off the async runtime.
pub async fn blocking<T, F>(f: F) -> StoreResult<T>
where
    F: FnOnce() -> StoreResult<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}
