//! Fleet mode (`--fleet-store`): several replicas behave as one system through a Redis they
//! share (docs/fleet.md). An adapter behind the storage seam: the control plane and the use
//! cases do not know whether they run alone or in a fleet.
//!
//! What is shared so far: the configuration ([`control`]). Each replica keeps everything else in
//! its own RocksDB, as without a fleet.

pub mod control;
pub mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::app::control::ControlPlane;
use crate::storage::Storage;

pub use self::redis::RedisSettings;

/// Fleet mode's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSettings {
    /// The Redis the fleet shares.
    pub redis: RedisSettings,
    /// The fleet's name: every key starts with `modelgate:<name>:`, so several fleets share one
    /// Redis.
    pub name: String,
    /// How often a replica checks the configuration's version besides listening for changes
    /// (a lost notification only delays a change by this much).
    pub poll: Duration,
}

/// Longest fleet name.
pub const MAX_FLEET_NAME: usize = 64;

/// Checks a fleet name: letters, digits, `.`, `_`, `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_FLEET_NAME {
        return Err(format!("must be 1 to {MAX_FLEET_NAME} characters"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "'{c}' is not allowed (letters, digits, '.', '_', '-')"
        )),
        None => Ok(()),
    }
}

impl FleetSettings {
    /// The prefix of every key of this fleet.
    pub fn prefix(&self) -> String {
        format!("modelgate:{}", self.name)
    }
}

/// Called when Redis stops or starts answering: `(answers, error)`.
pub type OnChange = Box<dyn Fn(bool, &str) + Send + Sync>;

/// Whether Redis answers, for `/ready`, the metrics and the events.
#[derive(Default)]
pub struct FleetStatus {
    up: AtomicBool,
    /// Whether the first call was made (the first failure is news too).
    known: AtomicBool,
    version: AtomicU64,
    error: Mutex<String>,
    on_change: Mutex<Option<OnChange>>,
}

impl FleetStatus {
    /// Calls `f` whenever Redis stops or starts answering — and at once when it already did
    /// not answer (at start).
    pub fn on_change(&self, f: OnChange) {
        if self.known.load(Ordering::Acquire) && !self.is_up() {
            f(false, &self.error.lock());
        }
        *self.on_change.lock() = Some(f);
    }

    fn changed(&self, up: bool, error: &str) {
        if let Some(f) = self.on_change.lock().as_ref() {
            f(up, error);
        }
    }

    /// Redis answered.
    pub fn reached(&self) {
        let first = !self.known.swap(true, Ordering::AcqRel);
        if !self.up.swap(true, Ordering::AcqRel) && !first {
            tracing::info!("the fleet store answers again");
            self.changed(true, "");
        }
    }

    /// Redis did not answer.
    pub fn lost(&self, error: &str) {
        *self.error.lock() = error.to_string();
        let first = !self.known.swap(true, Ordering::AcqRel);
        if self.up.swap(false, Ordering::AcqRel) || first {
            tracing::warn!(%error, "the fleet store does not answer; serving the last configuration seen, control writes fail until it returns");
            self.changed(false, error);
        }
    }

    /// The configuration at `version` is served.
    pub fn serving(&self, version: u64) {
        self.version.store(version, Ordering::Release);
    }

    /// Whether the last call to Redis succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The configuration version served.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// `/ready`'s detail while Redis is away (it stays ready: it serves the last state).
    pub fn detail(&self) -> Option<String> {
        (!self.is_up()).then(|| {
            format!(
                "fleet store unreachable, serving the configuration last seen (version {}); control writes fail until it returns: {}",
                self.version(),
                self.error.lock()
            )
        })
    }
}

/// The fleet's shared parts over a replica's own `local` storage.
pub fn storage(settings: &FleetSettings, local: Storage) -> Result<(Storage, Fleet), String> {
    let redis = Arc::new(redis::Redis::open(&settings.redis)?);
    let status = Arc::new(FleetStatus::default());
    let control = Arc::new(control::FleetControl::new(
        redis.clone(),
        &settings.prefix(),
        local.control.clone(),
        status.clone(),
    ));
    Ok((
        Storage { control, ..local },
        Fleet {
            redis,
            status,
            settings: settings.clone(),
        },
    ))
}

/// A replica's view of its fleet.
pub struct Fleet {
    redis: Arc<redis::Redis>,
    /// Whether Redis answers.
    pub status: Arc<FleetStatus>,
    settings: FleetSettings,
}

impl Fleet {
    /// Keeps `plane` at the fleet's configuration: a thread listens for change notifications
    /// and, every `poll` besides, compares versions and reloads on a difference. Stops when
    /// `stop` turns true.
    pub fn watch(
        &self,
        plane: Arc<ControlPlane>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let (redis, status) = (self.redis.clone(), self.status.clone());
        let channel = control::channel(&self.settings.prefix());
        let poll = self.settings.poll;
        std::thread::Builder::new()
            .name("modelgate-fleet".into())
            .spawn(move || {
                let refresh = || {
                    if let Err(e) = plane.refresh_blocking() {
                        status.lost(&e.to_string());
                    }
                };
                while !stop.load(Ordering::Acquire) {
                    if let Ok(mut conn) = redis.subscriber(poll) {
                        let mut sub = conn.as_pubsub();
                        if sub.subscribe(&channel).is_ok() {
                            // Subscribed before checking, so no change falls in between.
                            while !stop.load(Ordering::Acquire) {
                                refresh();
                                match sub.get_message() {
                                    Ok(_) => {}
                                    Err(e) if e.is_timeout() => {}
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                    refresh();
                    std::thread::sleep(poll);
                }
            })
            .expect("spawning the fleet watcher")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_names_are_key_safe() {
        assert!(validate_name("payments-prod_2").is_ok());
        assert!(validate_name("a:b").unwrap_err().contains("':'"));
        assert!(validate_name("").is_err());
    }
}
