//! RocksDB: one database, one column family per kind of record.
//!
//! Every call here blocks; callers on the async runtime go through `spawn_blocking` (control
//! plane) or the record writer thread (data plane), never a request task.

pub mod keys;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::registry::{ModelMeta, ModelVersion, PromotionPolicy, Registry, RegistryUpdate};

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
    /// Drift reference samples.
    pub const REFERENCES: &str = "references";
    /// Prediction records.
    pub const PREDICTIONS: &str = "predictions";
    /// Outcomes joined to predictions.
    pub const OUTCOMES: &str = "outcomes";
    /// Online feature store.
    pub const FEATURES: &str = "features";
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
        REFERENCES,
        PREDICTIONS,
        OUTCOMES,
        FEATURES,
        COUNTERS,
        EVENTS,
    ];
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored key does not parse.
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    /// A stored value does not parse.
    #[error("corrupt {family} record for {key}: {source}")]
    Value {
        /// Column family.
        family: &'static str,
        /// Readable key.
        key: String,
        /// Parse error.
        source: serde_json::Error,
    },
    /// A blocking task did not finish (panicked or was cancelled).
    #[error("storage task failed: {0}")]
    Task(String),
}

/// The open database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.increase_parallelism(2);
    o
}

impl Store {
    /// Opens (or creates) the database in `dir` with every column family.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let opts = db_options();
        let families = cf::ALL
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, db_options_for(name)));
        let db = DB::open_cf_descriptors(&opts, dir, families)?;
        Ok(Store { db: Arc::new(db) })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
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

    /// Writes one registry update as one batch, synced to disk before returning.
    pub fn write_registry(&self, update: &RegistryUpdate) -> Result<(), StoreError> {
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
        self.write_sync(batch)
    }

    /// Commits a batch with `sync = true`: durable on return, even across power loss.
    fn write_sync(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        self.db.path()
    }
}

fn db_options_for(_family: &str) -> Options {
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o
}

/// Serialises a stored record. Records are plain serde structs (string keys, finite numbers), so
/// this cannot fail.
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("registry records always serialise")
}

/// Runs a blocking store call off the async runtime.
pub async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewVersion, Stage};

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
