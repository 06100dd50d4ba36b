//! Fleet mode (`--fleet-store`): several replicas behave as one system through a Redis they
//! share (docs/fleet.md). An adapter behind the storage seam: the control plane and the use
//! cases do not know whether they run alone or in a fleet.
//!
//! What is shared: the configuration ([`control`]), the tallies ([`tallies`]), what joins an
//! outcome to its prediction on any replica ([`outcomes`]), the latest online features
//! ([`features`]), the event stream ([`events`]) and data drift — references, one window of live
//! rows per model, its evaluation and episode ([`drift`]). Each replica keeps everything else in its own RocksDB, as without a fleet.

pub mod control;
pub mod drift;
pub mod events;
pub mod features;
pub mod outcomes;
pub mod redis;
pub mod status;
pub mod tallies;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::app::control::ControlPlane;
use crate::storage::Storage;

pub use self::redis::RedisSettings;
pub use self::status::{FleetStatus, OnChange};

/// Fleet mode's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSettings {
    /// The Redis the fleet shares.
    pub redis: RedisSettings,
    /// The fleet's name: every key starts with `mg:<name>:`, so several fleets share one
    /// Redis.
    pub name: String,
    /// How often a replica checks the configuration's version besides listening for changes
    /// (a lost notification only delays a change by this much).
    pub poll: Duration,
    /// How long a prediction's stub stays in Redis for its outcome to join on any replica.
    pub outcome_window: Duration,
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
        format!("mg:{}", self.name)
    }
}

/// This replica's id in the fleet: made once (a UUIDv7) and kept in `data_dir`, so that a
/// restarted replica publishes its tallies under the same name (replacing, not adding to, what
/// it published before).
pub fn replica_id(data_dir: &Path) -> Result<String, String> {
    let path = data_dir.join("fleet-replica-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::now_v7().to_string();
            // Written whole, then renamed: a crash leaves the old file or the new one.
            let tmp = data_dir.join("fleet-replica-id.tmp");
            std::fs::write(&tmp, &id)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(id)
        }
    }
}

/// The fleet's shared parts over a replica's own `local` storage.
pub fn storage(
    settings: &FleetSettings,
    local: Storage,
    data_dir: &Path,
    clock: crate::clock::SharedClock,
) -> Result<(Storage, Fleet), String> {
    let status = Arc::new(FleetStatus::default());
    let redis = Arc::new(redis::Redis::open(&settings.redis)?.reporting_to(status.clone()));
    let replica = replica_id(data_dir)?;
    let prefix = settings.prefix();
    let control = Arc::new(control::FleetControl::new(
        redis.clone(),
        &prefix,
        local.control.clone(),
        status.clone(),
    ));
    let tallies = Arc::new(tallies::FleetTallies::new(
        redis.clone(),
        &prefix,
        replica.clone(),
        local.tallies.clone(),
    ));
    let (records, flusher) = outcomes::FleetRecords::new(
        redis.clone(),
        &prefix,
        settings.outcome_window,
        local.retention.features,
        local.records.clone(),
        status.clone(),
    );
    let features = Arc::new(features::FleetFeatures::new(
        redis.clone(),
        &prefix,
        local.features.clone(),
        local.retention.features,
        clock,
    ));
    let drift = Arc::new(drift::FleetDrift::new(
        redis.clone(),
        &prefix,
        replica.clone(),
        local.drift.clone(),
        records.queue(),
    ));
    let stubs_dropped = records.dropped.clone();
    let events = Arc::new(events::FleetEvents::new(redis.clone(), &prefix));
    // A connection of its own for following the event stream (blocking reads).
    let follower = Arc::new(redis::Redis::open(&settings.redis)?);
    let local_tallies = local.tallies.clone();
    Ok((
        Storage {
            control,
            tallies,
            records: Arc::new(records),
            features,
            events: events.clone(),
            drift,
            ..local
        },
        Fleet {
            redis,
            status,
            settings: settings.clone(),
            replica,
            local_tallies,
            flusher: Mutex::new(Some(flusher)),
            stubs_dropped,
            events,
            follower,
        },
    ))
}

/// A replica's view of its fleet.
pub struct Fleet {
    redis: Arc<redis::Redis>,
    /// Whether Redis answers.
    pub status: Arc<FleetStatus>,
    settings: FleetSettings,
    /// This replica's id.
    pub replica: String,
    /// This replica's own tallies (what the record writer adds to, and what it publishes).
    pub local_tallies: Arc<dyn crate::storage::Tallies>,
    flusher: Mutex<Option<outcomes::StubFlusher>>,
    /// Prediction stubs dropped because Redis was away too long.
    pub stubs_dropped: Arc<AtomicU64>,
    events: Arc<events::FleetEvents>,
    follower: Arc<redis::Redis>,
}

/// How often a replica publishes its tallies.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

impl Fleet {
    /// Starts the fleet's threads — the configuration watcher, the tally publisher, the stub
    /// flusher — until `stop`; `plane` is the configuration they follow.
    pub fn start(
        &self,
        plane: Arc<ControlPlane>,
        bus: Arc<crate::events::EventBus>,
        stop: Arc<AtomicBool>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let mut threads = vec![
            self.watch(plane.clone(), stop.clone()),
            self.publish(plane, stop.clone()),
        ];
        // Every event of the stream, from now on, to this replica's watchers (they replay what
        // came before from the stream itself).
        let (events, follower, from) = (
            self.events.clone(),
            self.follower.clone(),
            bus.store().last_event_cursor().unwrap_or(0),
        );
        let stop_follow = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("modelgate-fleet-events".into())
                .spawn(move || events.follow(&follower, from, |e| bus.relay(e), stop_follow))
                .expect("spawning the event follower"),
        );
        if let Some(flusher) = self.flusher.lock().take() {
            threads.push(
                std::thread::Builder::new()
                    .name("modelgate-fleet-stubs".into())
                    .spawn(move || flusher.run(stop))
                    .expect("spawning the stub flusher"),
            );
        }
        threads
    }

    /// Publishes this replica's tallies every [`PUBLISH_EVERY`] until `stop`.
    pub fn publish(
        &self,
        state: Arc<dyn crate::state::StateSource>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let publisher = tallies::Publisher {
            redis: self.redis.clone(),
            keys: tallies::Publisher::keys(&self.settings.prefix()),
            replica: self.replica.clone(),
            local: self.local_tallies.clone(),
            state,
        };
        std::thread::Builder::new()
            .name("modelgate-fleet-tallies".into())
            .spawn(move || publisher.run(PUBLISH_EVERY, 20, stop))
            .expect("spawning the tally publisher")
    }

    /// Keeps `plane` at the fleet's configuration: a thread listens for change notifications
    /// and, every `poll` besides, compares versions and reloads on a difference. Stops when
    /// `stop` turns true.
    pub fn watch(
        &self,
        plane: Arc<ControlPlane>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let redis = self.redis.clone();
        let channel = control::channel(&self.settings.prefix());
        let poll = self.settings.poll;
        std::thread::Builder::new()
            .name("modelgate-fleet".into())
            .spawn(move || {
                // A failure is reported by the connection itself (FleetStatus).
                let refresh = || {
                    if let Err(e) = plane.refresh_blocking() {
                        tracing::debug!(error = %e, "cannot read the fleet's configuration");
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
