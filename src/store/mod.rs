//! RocksDB: one database, one column family per kind of record.
//!
//! Every call here blocks; callers on the async runtime go through `spawn_blocking` (control
//! plane) or the record writer thread (data plane), never a request task.

pub(crate) mod batch;
mod counters;
pub mod drift;
mod experiments;
mod features;
pub mod keys;
mod outcomes;
mod predictions;
pub mod records;
mod retention;
mod runs;
pub mod shadows;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::clock::SharedClock;
use crate::experiment::Experiment;
use crate::registry::{ModelMeta, ModelVersion, PromotionPolicy, Registry, RegistryUpdate};
use crate::shadow::Shadow;
use crate::storage::FailureKind;

/// Column family names; [`cf::ALL`] lists every one, all created when the database is opened.
pub mod cf {
    /// Model versions and per-model metadata.
    pub const REGISTRY: &str = "registry";
    /// Promotion policies by model.
    pub const POLICIES: &str = "policies";
    /// A/B experiments.
    pub const EXPERIMENTS: &str = "experiments";
    /// Shadow configurations.
    pub const SHADOWS: &str = "shadows";
    /// Recent shadow disagreements, by model, version and time.
    pub const SHADOW_LOG: &str = "shadow_log";
    /// Drift reference samples.
    pub const REFERENCES: &str = "references";
    /// Prediction records.
    pub const PREDICTIONS: &str = "predictions";
    /// Prediction records by model and time.
    pub const PREDICTION_INDEX: &str = "prediction_index";
    /// Outcomes joined to predictions.
    pub const OUTCOMES: &str = "outcomes";
    /// Outcomes by model version and time.
    pub const OUTCOME_INDEX: &str = "outcome_index";
    /// Online feature store: every row of values an entity was given, newest first per entity
    /// (one key per write, not one per feature: traffic writes a row per request).
    pub const FEATURES: &str = "feature_rows";
    /// The per-feature history of earlier builds (one key per entity, feature and time); its
    /// contents are not read any more and the family is dropped when found.
    pub const LEGACY_FEATURES: &str = "features";
    /// Online feature store: the newest value per entity and feature.
    pub const FEATURES_LATEST: &str = "features_latest";
    /// Feature definitions.
    pub const FEATURE_DEFS: &str = "feature_defs";
    /// Merge-operator counters.
    pub const COUNTERS: &str = "counters";
    /// Event stream.
    pub const EVENTS: &str = "events";
    /// Every family.
    pub const ALL: &[&str] = &[
        REGISTRY,
        POLICIES,
        EXPERIMENTS,
        SHADOWS,
        SHADOW_LOG,
        REFERENCES,
        PREDICTIONS,
        PREDICTION_INDEX,
        OUTCOMES,
        OUTCOME_INDEX,
        FEATURES,
        FEATURES_LATEST,
        FEATURE_DEFS,
        COUNTERS,
        EVENTS,
    ];
}

pub use crate::storage::{FamilyStats, Retention, StoreError, StoreStats};

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let kind = if e.kind() == rocksdb::ErrorKind::Incomplete {
            FailureKind::WouldStall
        } else if e.kind() == rocksdb::ErrorKind::IOError
            && e.as_ref().contains("No space left on device")
        {
            FailureKind::NoSpace
        } else {
            FailureKind::Other
        };
        StoreError::Backend {
            backend: "rocksdb",
            message: e.into_string(),
            kind,
        }
    }
}

impl From<keys::KeyError> for StoreError {
    fn from(e: keys::KeyError) -> Self {
        StoreError::Key(e.to_string())
    }
}

/// The open database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    retention: records::Retention,
    /// "Now", for retention.
    clock: SharedClock,
    /// Tells apart feature rows of one entity written in the same millisecond.
    row_seq: Arc<std::sync::atomic::AtomicU32>,
    /// Whether writes are failing, and why: see [`Store::check`].
    health: Arc<WriteHealth>,
    /// How the rows of each table of feature names are written, kept from batch to batch
    /// (`records::RowLayouts`).
    row_layouts: Arc<parking_lot::Mutex<records::RowLayouts>>,
    /// Operands piled up per entity in `features_latest` (`features::LatestChains`).
    latest_chains: Arc<parking_lot::Mutex<features::LatestChains>>,
    /// The tables of names of compact history rows read so far, by id (`features::NameTable`).
    name_tables: Arc<parking_lot::RwLock<rustc_hash::FxHashMap<u64, Arc<[String]>>>>,
    /// Entities' runs of feature rows not merged one by one (`runs.rs`).
    runs: Arc<parking_lot::Mutex<runs::FeatureRuns>>,
    /// The shared fields of prediction records known stored, by id (`records::SharedTables`).
    shared_fields: Arc<parking_lot::Mutex<records::SharedTables>>,
    /// Each family's id, in [`cf::ALL`]'s order, for batches built as bytes (`batch.rs`).
    family_ids: Arc<[batch::FamilyId]>,
}

/// What the store knows about its writes, for `/ready`.
///
/// RocksDB has no "are writes failing?" property: a write that fails with an I/O error (ENOSPC,
/// EIO) puts the database into a background-error state in which every later write fails too,
/// until RocksDB recovers. For ENOSPC its SstFileManager checks the free space every 5 s and,
/// once at least the largest write buffer (4 MiB here) is free, flushes the memtables and clears
/// the error by itself; retryable I/O errors are resumed every second. Other hard errors need
/// `DB::Resume()`, which neither rust-rocksdb nor RocksDB's C API exposes, or a reopen — a
/// restart. So the store remembers the last write's failure and since when writes fail; `/ready`
/// retries a tiny synced write while it is set (the first one that succeeds clears it), and
/// `/live` fails once writes have failed for `--write-failure-deadline` with an error other than
/// a full disk, so that the orchestrator restarts the process.
#[derive(Default)]
struct WriteHealth {
    /// Set by a failed write, cleared by a successful one.
    failing: std::sync::atomic::AtomicBool,
    /// The failure, for `/ready`, `/live` and logs.
    error: parking_lot::Mutex<Option<WriteFailure>>,
    /// RocksDB's count of background errors (flushes, compactions) when last looked at.
    background_errors: std::sync::atomic::AtomicU64,
}

/// Writes failing, as [`WriteHealth`] remembers it.
struct WriteFailure {
    /// The last write's error.
    message: String,
    /// When the first write of this run of failures of this kind (recoverable or not) failed.
    since: std::time::Instant,
    /// Whether RocksDB recovers from the last error by itself (a full disk).
    recovers: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Memory RocksDB may use, so that a sidecar stays small (peak RSS under load is measured by
/// `benches/proxy_load.rs`): memtables of all column families together…
const MEMTABLES_BYTES: usize = 16 << 20;
/// …each family's memtable before it is flushed (RocksDB's default is 64 MiB per family, with
/// 15 families)…
const FAMILY_MEMTABLE_BYTES: usize = 4 << 20;
/// …and, by default, the block cache shared by every family (`--block-cache-bytes`). It holds the
/// index and filter blocks of every file a flush or compaction writes (they are read when the
/// file is opened), and a deleted file's blocks stay until newer ones push them out, so under a
/// steady write load it is always full: measured everything on, 10,000 users, it grew ~110 KiB
/// a second to its capacity (`modelgate_rocksdb_block_cache_bytes`); peak RSS over 180 s was
/// 70.4 MiB with 16 MiB, 64.2 with 8 (docs/performance-log.md, the thirtieth round). What the
/// online path reads (`features_latest`, the tables of feature names) is a small part of it.
pub const DEFAULT_BLOCK_CACHE_BYTES: usize = 8 << 20;

/// Flushed files a family written on every recorded call gathers in level 0 before they are
/// compacted into the last level (RocksDB's default is 4). Such a compaction also rewrites the
/// files of the last level that the new ones overlap, and these always overlap: calls finish out
/// of order, so a memtable's oldest keys (request ids, index times) fall inside the range already
/// compacted — for `prediction_index`, one file holding every key so far. Compacting twice the
/// input at a time rewrites that overlap half as often: measured everything on (`/proc`,
/// per-thread user + kernel CPU, three interleaved pairs each), RocksDB's compaction thread went
/// from 1.6–2.1 to 0.9–1.0 µs per call under h2load and from 3.7–3.9 to 2.3–2.7 µs per call
/// with 10,000 users (the feature store on; README, Performance). `features_latest` keeps the
/// default: "as of now" feature reads look every key up in each of its level-0 files, and they
/// are the online path.
const LOG_L0_FILES_TO_COMPACT: i32 = 8;

/// Data block size of the families written per call (RocksDB's default is 4 KiB). RocksDB's LZ4
/// compression sets up a fresh 16 KiB stream state for every block it compresses, which cost
/// more than compressing the block (callgrind, 30,000 calls with 10,000 users, everything on:
/// ~4,200 instructions per call in `LZ4_createStream` against ~5,500 in LZ4 itself); 16 KiB
/// blocks set up a quarter as many. Their reads are control calls and joins (a record or an
/// outcome by id, a time range, a feature row from before the newest), for which decompressing
/// 16 KiB instead of 4 costs a few microseconds; `features_latest`, read online, keeps 4 KiB.
const LOG_BLOCK_BYTES: usize = 16 << 10;

/// Compression by level of the families written per call and of `features_latest`, whose
/// flushed files are always compacted: every feature flush holds rows of nearly every entity,
/// overlapping all the data below, and the call logs' flushes overlap what is below too (calls
/// finish out of order). So flushes write level 0 uncompressed, and the compaction compresses
/// once what it writes below (reading level 0 without decompressing it); a level-0 file that
/// overlaps nothing is rewritten rather than moved down, since RocksDB moves files only between
/// levels of one compression. Compressing at the flush as well cost the flush thread ~3,600
/// instructions per recorded call (callgrind, 30,000 calls with 10,000 users), for files the
/// next compaction rewrote anyway. With dynamic level sizes the second entry is the level level
/// 0 compacts into, and so on.
const FLUSHED_UNCOMPRESSED: [rocksdb::DBCompressionType; 7] = {
    use rocksdb::DBCompressionType::{Lz4, None};
    [None, Lz4, Lz4, Lz4, Lz4, Lz4, Lz4]
};

/// Whether `family` is a log appended to as calls and outcomes arrive, whose reads (a record or
/// an outcome by id, a time range, a feature row from before the newest) are control calls and
/// joins, not the online path: a few more level-0 files to look in cost them little.
fn written_per_call(family: &str) -> bool {
    matches!(
        family,
        cf::PREDICTIONS
            | cf::PREDICTION_INDEX
            | cf::SHADOW_LOG
            | cf::OUTCOMES
            | cf::OUTCOME_INDEX
            | cf::FEATURES
    )
}

/// Whether `family` is only ever read by seeking (ranges of an index, an entity's rows), never
/// by a point lookup of a whole key, so that a bloom filter or a hash index inside its data
/// blocks would be built at every flush and compaction and kept in the block cache for nothing
/// (`feature_rows`' tables of names are looked up by key, once per table a process meets).
fn only_seeked(family: &str) -> bool {
    matches!(
        family,
        cf::PREDICTION_INDEX | cf::OUTCOME_INDEX | cf::SHADOW_LOG | cf::FEATURES
    )
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.increase_parallelism(2);
    // Past this total the largest memtable is flushed, whichever family it belongs to.
    o.set_db_write_buffer_size(MEMTABLES_BYTES);
    o
}

impl Store {
    /// Opens (or creates) the database in `dir` with every column family, the default
    /// retention and the system clock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, records::Retention::default(), crate::clock::system())
    }

    /// Opens (or creates) the database in `dir`, dropping records older than `retention` by
    /// `clock`, with the default block cache.
    pub fn open_with(
        dir: &Path,
        retention: records::Retention,
        clock: SharedClock,
    ) -> Result<Self, StoreError> {
        Self::open_tuned(dir, retention, clock, DEFAULT_BLOCK_CACHE_BYTES)
    }

    /// [`Store::open_with`], with a block cache of `block_cache_bytes`.
    pub fn open_tuned(
        dir: &Path,
        retention: records::Retention,
        clock: SharedClock,
        block_cache_bytes: usize,
    ) -> Result<Self, StoreError> {
        let opts = db_options();
        let cache = rocksdb::Cache::new_lru_cache(block_cache_bytes);
        // The default family (only /ready's write probe uses it) is opened with the others'
        // options too: rust-rocksdb would open it with RocksDB's defaults, a 64 MiB write buffer,
        // and RocksDB reserves the largest write buffer of any family as the free space it waits
        // for before it recovers from a full disk — after ENOSPC, writes stayed stopped until
        // 64 MiB were free again, where 4 MiB now suffice (tests/faults.rs, the full-disk test).
        let families = cf::ALL
            .iter()
            .chain([&rocksdb::DEFAULT_COLUMN_FAMILY_NAME])
            .map(|name| {
                ColumnFamilyDescriptor::new(
                    *name,
                    family_options(name, &cache, retention, clock.clone()),
                )
            });
        let legacy = DB::list_cf(&opts, dir)
            .map(|names| names.iter().any(|n| n == cf::LEGACY_FEATURES))
            .unwrap_or(false);
        let families = families.chain(
            legacy.then(|| ColumnFamilyDescriptor::new(cf::LEGACY_FEATURES, Options::default())),
        );
        let mut db = DB::open_cf_descriptors(&opts, dir, families)?;
        if legacy {
            db.drop_cf(cf::LEGACY_FEATURES)?;
            tracing::info!(
                "dropped the per-feature history of an earlier version (feature_rows replaces it)"
            );
        }
        // Rows written in the same millisecond by an earlier process must not be overwritten:
        // start the sequence somewhere else each time.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let (runs, left_open) = runs::FeatureRuns::start(&db)?;
        let family_ids = cf::ALL
            .iter()
            .map(|name| {
                let family = db.cf_handle(name).expect("every family is opened");
                batch::FamilyId::of(family)
            })
            .collect::<Result<_, _>>()?;
        let store = Store {
            family_ids,
            db: Arc::new(db),
            row_seq: Arc::new(std::sync::atomic::AtomicU32::new(seed)),
            retention,
            clock,
            health: Arc::default(),
            row_layouts: Arc::default(),
            shared_fields: Arc::default(),
            latest_chains: Arc::default(),
            name_tables: Arc::default(),
            runs: Arc::new(parking_lot::Mutex::new(runs)),
        };
        if left_open {
            // Before any row is written: the last process did not finish its runs.
            store.repair_feature_runs()?;
        }
        Ok(store)
    }

    /// How long records are kept.
    pub fn retention(&self) -> records::Retention {
        self.retention
    }

    /// Whether RocksDB answers and takes writes; the error says why not. Normally a property
    /// read (no I/O). After a write failed, or when RocksDB counts a new background error (a
    /// failed flush or compaction, which may have stopped writes), it tries one small synced
    /// write — the only way to learn whether writes work again — and reports the failure while
    /// that fails too.
    pub fn check(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let bg = self
            .db
            .property_int_value("rocksdb.background-errors")
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        let new_bg = self.health.background_errors.swap(bg, Ordering::AcqRel) != bg;
        if !(self.health.failing.load(Ordering::Acquire) || new_bg) {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put(b"modelgate/ready-probe", self.clock.now_ms().to_be_bytes());
        self.write(batch, true)
            .map_err(|e| format!("writes are failing: {e}"))
    }

    /// How long writes have been failing with an error RocksDB does not recover from by itself
    /// (anything but a full disk), and the error; None while writes work or the disk is full.
    pub fn unrecoverable_write_failure(&self) -> Option<(std::time::Duration, String)> {
        let error = self.health.error.lock();
        error
            .as_ref()
            .filter(|f| !f.recovers)
            .map(|f| (f.since.elapsed(), f.message.clone()))
    }

    /// The one way anything is written: commits `batch` (synced when `sync`), and remembers
    /// whether writes are failing for [`Store::check`].
    pub(crate) fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        self.write_opt(batch, &{
            let mut wo = WriteOptions::default();
            wo.set_sync(sync);
            wo
        })
    }

    /// [`Store::write`] with explicit write options.
    pub(crate) fn write_opt(&self, batch: WriteBatch, wo: &WriteOptions) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let result = self.db.write_opt(batch, wo).map_err(StoreError::from);
        match &result {
            Ok(()) => {
                if self.health.failing.load(Ordering::Acquire) {
                    let mut error = self.health.error.lock();
                    self.health.failing.store(false, Ordering::Release);
                    if let Some(e) = error.take() {
                        tracing::info!(previous_error = %e.message, failed_for = ?e.since.elapsed(), "RocksDB writes work again");
                    }
                }
            }
            // A stall refused because the caller asked not to wait is not a failure of the disk.
            Err(e) if e.would_stall() => {}
            Err(e) => {
                let mut error = self.health.error.lock();
                if !self.health.failing.swap(true, Ordering::AcqRel) {
                    tracing::error!(error = %e, "RocksDB writes are failing");
                }
                // The clock runs per kind of failure: a full disk turning into an I/O error that
                // RocksDB does not recover from starts the `/live` deadline afresh.
                let recovers = e.recovers();
                let since = match error.as_ref() {
                    Some(f) if f.recovers == recovers => f.since,
                    _ => std::time::Instant::now(),
                };
                *error = Some(WriteFailure {
                    message: e.to_string(),
                    since,
                    recovers,
                });
            }
        }
        result
    }

    /// Sizes and write-stall state, for the metrics.
    pub fn stats(&self) -> StoreStats {
        let int = |name: &str| self.db.property_int_value(name).ok().flatten();
        let families = cf::ALL
            .iter()
            .map(|f| {
                let h = self.cf(f);
                let v = |name: &str| {
                    self.db
                        .property_int_value_cf(h, name)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                FamilyStats {
                    name: f,
                    sst_bytes: v("rocksdb.total-sst-files-size"),
                    memtable_bytes: v("rocksdb.cur-size-all-mem-tables"),
                    live_data_bytes: v("rocksdb.estimate-live-data-size"),
                    table_readers_bytes: v("rocksdb.estimate-table-readers-mem"),
                }
            })
            .collect();
        // "Cumulative stall: 00:00:1.234 H:M:S, ..." in the DB stats text.
        let stall_seconds = self
            .db
            .property_value("rocksdb.dbstats")
            .ok()
            .flatten()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("Cumulative stall:"))?;
                let hms = line.split_whitespace().nth(2)?;
                let mut parts = hms.split(':').map(|p| p.parse::<f64>().ok());
                Some(parts.next()?? * 3600.0 + parts.next()?? * 60.0 + parts.next()??)
            })
            .unwrap_or(0.0);
        StoreStats {
            families,
            write_stopped: int("rocksdb.is-write-stopped").unwrap_or(0) > 0,
            delayed_write_rate: int("rocksdb.actual-delayed-write-rate").unwrap_or(0),
            stall_seconds,
            block_cache_bytes: int("rocksdb.block-cache-usage").unwrap_or(0),
            block_cache_pinned_bytes: int("rocksdb.block-cache-pinned-usage").unwrap_or(0),
        }
    }

    /// The id of the family `name` (one of [`cf::ALL`]), for a batch built as bytes.
    pub(crate) fn family_id(&self, name: &str) -> batch::FamilyId {
        let i = cf::ALL
            .iter()
            .position(|f| *f == name)
            .unwrap_or_else(|| panic!("column family {name} not opened"));
        self.family_ids[i]
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every family in cf::ALL is created at open; a missing one is a programming error.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} not opened"))
    }

    /// Reads the whole registry.
    pub fn load_registry(&self) -> Result<Registry, StoreError> {
        let mut metas = Vec::new();
        let mut versions = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::REGISTRY), IteratorMode::Start)
        {
            let (k, v) = item?;
            let (model, version) = keys::decode_registry_key(&k)?;
            let bad = |source| StoreError::Value {
                family: cf::REGISTRY,
                key: format!("{model}/{version}"),
                source,
            };
            if version == keys::MODEL_META_VERSION {
                metas.push(serde_json::from_slice::<ModelMeta>(&v).map_err(bad)?);
            } else {
                versions.push(serde_json::from_slice::<ModelVersion>(&v).map_err(bad)?);
            }
        }
        let mut policies = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::POLICIES), IteratorMode::Start)
        {
            let (k, v) = item?;
            let model = keys::decode_policy_key(&k)?;
            let policy: PromotionPolicy =
                serde_json::from_slice(&v).map_err(|source| StoreError::Value {
                    family: cf::POLICIES,
                    key: model.clone(),
                    source,
                })?;
            policies.push((model, policy));
        }
        Ok(Registry::from_records(metas, versions, policies))
    }

    /// Every experiment.
    pub fn load_experiments(&self) -> Result<Vec<Experiment>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::EXPERIMENTS), IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| StoreError::Value {
                    family: cf::EXPERIMENTS,
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Every shadow.
    pub fn load_shadows(&self) -> Result<Vec<Shadow>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::SHADOWS), IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| StoreError::Value {
                    family: cf::SHADOWS,
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Writes one registry update as one batch, synced to disk before returning.
    pub fn write_registry(&self, update: &RegistryUpdate) -> Result<(), StoreError> {
        self.write_control(&crate::state::Update {
            registry: update.clone(),
            ..Default::default()
        })
    }

    /// Writes one control-plane update (registry, experiments, shadows) as one batch, synced
    /// before returning.
    pub fn write_control(&self, control: &crate::state::Update) -> Result<(), StoreError> {
        let update = &control.registry;
        let experiments = &control.experiments;
        let reg = self.cf(cf::REGISTRY);
        let pol = self.cf(cf::POLICIES);
        let mut batch = WriteBatch::default();
        for m in &update.put_models {
            batch.put_cf(
                reg,
                keys::registry_key(&m.name, keys::MODEL_META_VERSION),
                json(m),
            );
        }
        for v in &update.put_versions {
            batch.put_cf(reg, keys::registry_key(&v.model, v.version), json(v));
        }
        for (model, version) in &update.delete_versions {
            batch.delete_cf(reg, keys::registry_key(model, *version));
        }
        for (model, p) in &update.put_policies {
            batch.put_cf(pol, keys::policy_key(model), json(p));
        }
        for e in experiments {
            batch.put_cf(self.cf(cf::EXPERIMENTS), e.name.as_bytes(), json(e));
        }
        for s in &control.put_shadows {
            batch.put_cf(
                self.cf(cf::SHADOWS),
                keys::registry_key(&s.model, s.version),
                json(s),
            );
        }
        for (model, version) in &control.delete_shadows {
            batch.delete_cf(self.cf(cf::SHADOWS), keys::registry_key(model, *version));
        }
        self.write_sync(batch)
    }

    /// Commits a batch with `sync = true`: durable on return, even across power loss.
    fn write_sync(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write(batch, true)
    }

    /// Appends an event under its cursor, synced.
    pub fn append_event(&self, e: &crate::pb::modelgate::v1::Event) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(cf::EVENTS),
            e.cursor.to_be_bytes(),
            prost::Message::encode_to_vec(e),
        );
        self.write_sync(batch)
    }

    /// The cursor of the last stored event (0 when none).
    pub fn last_event_cursor(&self) -> Result<u64, StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(cf::EVENTS));
        it.seek_to_last();
        it.status()?;
        Ok(it
            .key()
            .and_then(|k| <[u8; 8]>::try_from(k).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Up to `limit` events with a cursor above `after`, in order.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::pb::modelgate::v1::Event>, StoreError> {
        let start = (after + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(cf::EVENTS),
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            if out.len() >= limit {
                break;
            }
            out.push(
                <crate::pb::modelgate::v1::Event as prost::Message>::decode(&*v).map_err(|e| {
                    StoreError::Decode {
                        family: cf::EVENTS,
                        key: format!("{k:02x?}"),
                        reason: e.to_string(),
                    }
                })?,
            );
        }
        Ok(out)
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        self.db.path()
    }
}

/// Options of one column family: a shared block cache with bloom filters for point lookups
/// (where there are any, [`only_seeked`]), the merge operators of `counters` and
/// `features_latest`, and — for families with a retention — a compaction filter that drops
/// expired entries, with periodic compaction so that files are revisited even when nothing else
/// triggers a compaction.
fn family_options(
    family: &str,
    cache: &rocksdb::Cache,
    retention: records::Retention,
    clock: SharedClock,
) -> Options {
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_write_buffer_size(FAMILY_MEMTABLE_BYTES);
    let mut table = rocksdb::BlockBasedOptions::default();
    if written_per_call(family) {
        o.set_level_zero_file_num_compaction_trigger(LOG_L0_FILES_TO_COMPACT);
        table.set_block_size(LOG_BLOCK_BYTES);
    }
    if written_per_call(family) || family == cf::FEATURES_LATEST {
        o.set_compression_per_level(&FLUSHED_UNCOMPRESSED);
    }
    if family == cf::FEATURES {
        // Every flushed file of feature rows holds rows of nearly every entity, so a leveled
        // compaction of level 0 rewrites every row below it, each time: over a 150 s run,
        // everything on, 17 compactions read 38.7 million rows for ~4.4 million written (10.8 s
        // of CPU). Compacted by size tiers, a row is rewritten about once per tier it passes:
        // 20.9 million rows read, 5.7 s; RocksDB's threads 2.5 against 3.8 µs per call
        // (docs/performance-log.md, the thirty-first round). Reads of the history (an entity's
        // rows as of a past time: control calls and joins) look in each tier, a few more files.
        o.set_compaction_style(rocksdb::DBCompactionStyle::Universal);
    }
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    if !only_seeked(family) {
        table.set_bloom_filter(10.0, false);
        // A hash index inside data blocks speeds point lookups (records, outcomes, latest
        // features).
        table.set_data_block_index_type(rocksdb::DataBlockIndexType::BinaryAndHash);
    }
    o.set_block_based_table_factory(&table);
    match family {
        cf::COUNTERS => o.set_merge_operator_associative("add", counters::add_counters),
        // An entity's pile of operands is bounded by the writer (`features::LatestChains`), not
        // by RocksDB's `max_successive_merges`, which seeks the memtable on every merge.
        cf::FEATURES_LATEST => o.set_merge_operator_associative("newest", features::keep_newest),
        _ => {}
    }
    let keep = match family {
        cf::PREDICTIONS | cf::PREDICTION_INDEX | cf::SHADOW_LOG => Some(retention.predictions),
        cf::OUTCOMES | cf::OUTCOME_INDEX => Some(retention.outcomes),
        cf::FEATURES | cf::FEATURES_LATEST => Some(retention.features),
        _ => None,
    };
    if let Some(keep) = keep {
        let family: &'static str = cf::ALL
            .iter()
            .find(|f| **f == family)
            .expect("a known family");
        let keep_ms = keep.as_millis() as u64;
        o.set_compaction_filter("retention", move |_level: u32, key: &[u8], value: &[u8]| {
            match retention::record_time(family, key, value) {
                Some(t) if t < clock.now_ms().saturating_sub(keep_ms) => {
                    rocksdb::CompactionDecision::Remove
                }
                _ => rocksdb::CompactionDecision::Keep,
            }
        });
        o.set_periodic_compaction_seconds(keep.as_secs().clamp(60, 24 * 3600));
    }
    o
}

/// Serialises a stored record. Records are plain serde structs (string keys, finite numbers), so
/// this cannot fail.
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("registry records always serialise")
}

pub use crate::storage::blocking;

impl crate::storage::ControlStore for Store {
    fn load_state(&self) -> Result<crate::state::State, StoreError> {
        Ok(crate::state::State {
            registry: self.load_registry()?,
            experiments: crate::experiment::Experiments::from_records(self.load_experiments()?),
            shadows: crate::shadow::Shadows::from_records(self.load_shadows()?),
        })
    }

    fn write_control(&self, update: &crate::state::Update) -> Result<(), StoreError> {
        Store::write_control(self, update)
    }
}

impl crate::storage::EventLog for Store {
    fn append_event(&self, e: &crate::pb::modelgate::v1::Event) -> Result<(), StoreError> {
        Store::append_event(self, e)
    }

    fn last_event_cursor(&self) -> Result<u64, StoreError> {
        Store::last_event_cursor(self)
    }

    fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::pb::modelgate::v1::Event>, StoreError> {
        Store::events_after(self, after, limit)
    }
}

impl crate::storage::StoreHealth for Store {
    fn check(&self) -> Result<(), String> {
        Store::check(self)
    }

    fn unrecoverable_write_failure(&self) -> Option<(std::time::Duration, String)> {
        Store::unrecoverable_write_failure(self)
    }

    fn stats(&self) -> StoreStats {
        Store::stats(self)
    }
}

/// The RocksDB store as a [`crate::storage::Storage`]: every part of it.
pub fn storage(store: Store) -> crate::storage::Storage {
    let retention = store.retention;
    crate::storage::Storage::of(Arc::new(store), retention)
}

#[cfg(test)]
impl Store {
    /// A store in `dir` keeping feature values for a minute of a manual clock (for retention
    /// tests), and the clock.
    pub(crate) fn with_minute_of_features(dir: &Path) -> (Store, Arc<crate::clock::ManualClock>) {
        let clock = crate::clock::ManualClock::now();
        let retention = records::Retention {
            features: std::time::Duration::from_secs(60),
            ..Default::default()
        };
        let store = Store::open_with(dir, retention, clock.clone()).expect("store opens");
        (store, clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewVersion, Stage};

    #[test]
    fn the_per_feature_history_of_earlier_builds_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut o = Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            DB::open_cf(&o, dir.path(), [cf::LEGACY_FEATURES]).unwrap();
        }
        drop(Store::open(dir.path()).unwrap());
        let names = DB::list_cf(&Options::default(), dir.path()).unwrap();
        assert!(!names.iter().any(|n| n == cf::LEGACY_FEATURES), "{names:?}");
        assert!(names.iter().any(|n| n == cf::FEATURES), "{names:?}");
        drop(Store::open(dir.path()).unwrap());
    }

    /// The call logs gather `LOG_L0_FILES_TO_COMPACT` flushed files before compacting them;
    /// `features_latest`, read online, compacts at RocksDB's default of 4.
    #[test]
    fn call_logs_compact_level_zero_later_than_latest_features() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let level0 = |family: &str| {
            store
                .db
                .property_int_value_cf(store.cf(family), "rocksdb.num-files-at-level0")
                .unwrap()
                .unwrap()
        };
        for flush in 0..5u8 {
            for family in [cf::PREDICTION_INDEX, cf::FEATURES_LATEST] {
                store.db.put_cf(store.cf(family), [flush], [flush]).unwrap();
                store.db.flush_cf(store.cf(family)).unwrap();
            }
        }
        store
            .db
            .wait_for_compact(&rocksdb::WaitForCompactOptions::default())
            .unwrap();
        assert_eq!(level0(cf::PREDICTION_INDEX), 5);
        // Compacted once 4 gathered. (These one-key files do not overlap, and a level-0 file
        // flushed uncompressed cannot just be moved into the compressed last level, so RocksDB
        // compacts them one at a time until fewer than 4 are left.)
        assert!(level0(cf::FEATURES_LATEST) < 4);
    }

    /// A number from RocksDB's aggregated table properties of `family` (`# data blocks`, `data
    /// block size`, …).
    fn table_property(store: &Store, family: &str, name: &str) -> u64 {
        let props = store
            .db
            .property_value_cf(store.cf(family), "rocksdb.aggregated-table-properties")
            .unwrap()
            .unwrap();
        props
            .split(';')
            .find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {name} in {props}"))
    }

    /// What one flushed file of `family` holds: (data blocks, compressed data bytes, raw data
    /// bytes), from RocksDB's table properties, after writing `n` values of 100 digits (which
    /// compress well) and flushing.
    fn flushed(store: &Store, family: &str, n: u32) -> (u64, u64, u64) {
        let mut b = WriteBatch::default();
        for i in 0..n {
            let value = format!("{i:0>100}");
            b.put_cf(store.cf(family), i.to_be_bytes(), value);
        }
        store.write(b, false).unwrap();
        store.db.flush_cf(store.cf(family)).unwrap();
        let field = |name: &str| table_property(store, family, name);
        (
            field("# data blocks"),
            field("data block size"),
            field("raw value size") + field("raw key size"),
        )
    }

    /// The call logs write 16 KiB data blocks (RocksDB sets up an LZ4 stream per block); they
    /// and `features_latest` flush uncompressed, their compactions compress; everything else
    /// keeps RocksDB's 4 KiB blocks, compressed. Families only ever seeked have no bloom filter.
    #[test]
    fn block_sizes_and_compression_follow_how_each_family_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blocks, stored, raw) = flushed(&store, cf::PREDICTIONS, 5_000);
        assert!(raw / blocks > 12 << 10, "{blocks} blocks for {raw} bytes");
        assert!(
            stored > raw,
            "flushed uncompressed: {stored} of {raw} bytes"
        );
        let (blocks, stored, raw) = flushed(&store, cf::FEATURES_LATEST, 5_000);
        assert!(raw / blocks < 5 << 10, "{blocks} blocks for {raw} bytes");
        assert!(
            stored > raw,
            "flushed uncompressed: {stored} of {raw} bytes"
        );
        let (blocks, stored, raw) = flushed(&store, cf::COUNTERS, 5_000);
        assert!(raw / blocks < 5 << 10, "{blocks} blocks for {raw} bytes");
        assert!(stored < raw / 4, "compressed: {stored} of {raw} bytes");
        // Bloom filters only where keys are looked up whole.
        let filter = |family| table_property(&store, family, "filter block size");
        assert!(filter(cf::PREDICTIONS) > 0);
        flushed(&store, cf::PREDICTION_INDEX, 1_000);
        assert_eq!(filter(cf::PREDICTION_INDEX), 0, "an index is only seeked");
        // Compacted, they are compressed.
        for family in [cf::FEATURES_LATEST, cf::PREDICTIONS] {
            store
                .db
                .compact_range_cf(store.cf(family), None::<&[u8]>, None::<&[u8]>);
            let size = table_property(&store, family, "data block size");
            assert!(size < 5_000 * 100 / 4, "{family} compressed: {size} bytes");
        }
    }

    /// Feature rows are compacted by size tiers (universal compaction), the other families by
    /// levels; compacted, the rows are compressed as the call logs are.
    #[test]
    fn feature_rows_are_compacted_in_size_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .unwrap();
        let options = std::fs::read_to_string(options).unwrap();
        let style = |family: &str| {
            let section = format!("[CFOptions \"{family}\"]");
            let from = options.find(&section).unwrap();
            let line = options[from..]
                .lines()
                .find(|l| l.trim_start().starts_with("compaction_style="))
                .unwrap();
            line.trim()
                .trim_start_matches("compaction_style=")
                .to_string()
        };
        assert_eq!(style(cf::FEATURES), "kCompactionStyleUniversal");
        for family in [cf::PREDICTIONS, cf::FEATURES_LATEST, cf::OUTCOMES] {
            assert_eq!(style(family), "kCompactionStyleLevel", "{family}");
        }
        let (_, stored, raw) = flushed(&store, cf::FEATURES, 5_000);
        assert!(
            stored > raw,
            "flushed uncompressed: {stored} of {raw} bytes"
        );
        store
            .db
            .compact_range_cf(store.cf(cf::FEATURES), None::<&[u8]>, None::<&[u8]>);
        let size = table_property(&store, cf::FEATURES, "data block size");
        assert!(size < 5_000 * 100 / 4, "compressed: {size} bytes");
    }

    #[test]
    fn registry_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::default();
        {
            let store = Store::open(dir.path()).unwrap();
            for port in [1, 2] {
                let (_, u) = r
                    .register(
                        NewVersion {
                            model: "iris".into(),
                            endpoint: format!("h:{port}"),
                            ..Default::default()
                        },
                        7,
                    )
                    .unwrap();
                store.write_registry(&u).unwrap();
            }
            let (_, u) = r
                .transition("iris", "1", Stage::Production, false, 8)
                .unwrap();
            store.write_registry(&u).unwrap();
            let (_, u) = r.set_alias("iris", "champion", "1").unwrap();
            store.write_registry(&u).unwrap();
            let (_, u) = r.delete_version("iris", "2").unwrap();
            store.write_registry(&u).unwrap();
            let (_, u) = r
                .set_policy("iris", crate::registry::PromotionPolicy::default())
                .unwrap();
            store.write_registry(&u).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_registry().unwrap(), r);
    }
}
