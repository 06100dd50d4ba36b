//! Applying a control change: the registry, experiments and shadows in memory, each change made
//! durable through the storage seam before it is published, with the routing snapshot rebuilt
//! from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::clock::SharedClock;
use crate::experiment::ExperimentError;
use crate::registry::{Registry, RegistryError, RegistryUpdate};
use crate::routing::RoutingTable;
use crate::shadow::ShadowError;
use crate::state::{State, StateSource, Update};
use crate::storage::{self, Storage, StoreError};

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The registry's rules refused it.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The experiment rules refused it.
    #[error(transparent)]
    Experiment(#[from] ExperimentError),
    /// The shadow rules refused it.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// It could not be made durable; nothing changed.
    #[error("the change could not be made durable, nothing was changed: {0}")]
    Store(#[from] StoreError),
}

/// The registry and routing state shared by the control services and the data plane.
///
/// Reads are lock-free snapshots. Writes are serialised: each applies an operation to a copy of
/// the registry, writes the resulting update to RocksDB with `sync`, and only then publishes the
/// copy and a rebuilt routing table. A failed write leaves both untouched.
pub struct ControlPlane {
    storage: Storage,
    clock: SharedClock,
    state: ArcSwap<State>,
    routing: Arc<ArcSwap<RoutingTable>>,
    default_model: Option<String>,
    write_lock: tokio::sync::Mutex<()>,
    events: Option<Arc<crate::events::EventBus>>,
    /// The version of a shared store's configuration the state was read at (0 otherwise).
    version: AtomicU64,
}

/// Attempts at a version-checked change before giving up: each failed attempt means another
/// replica changed the configuration in between, and this one reloaded it.
const SHARED_WRITE_ATTEMPTS: usize = 16;

/// The version served before the shared store was ever read: unequal to any stored version, so
/// the first check reads the store (and re-seeds it, if it is empty).
const NOT_READ: u64 = u64::MAX;

impl ControlPlane {
    /// Loads the registry, experiments and shadows from `storage` and builds the first routing
    /// snapshot. Every time the control plane records comes from `clock`.
    pub fn load(
        storage: Storage,
        clock: SharedClock,
        default_model: Option<String>,
    ) -> Result<Self, StoreError> {
        let (version, state) = match storage.control.shared() {
            Some(shared) => match shared.load_versioned() {
                Ok(v) => v,
                // The shared store is away: serve from the local copy (the store's `load_state`
                // falls back to it); the fleet watcher catches up once it returns.
                Err(StoreError::Unavailable(_)) => (NOT_READ, storage.control.load_state()?),
                Err(e) => return Err(e),
            },
            None => (0, storage.control.load_state()?),
        };
        let routing = RoutingTable::build(&state, default_model.as_deref());
        Ok(ControlPlane {
            storage,
            clock,
            state: ArcSwap::from_pointee(state),
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            default_model,
            write_lock: tokio::sync::Mutex::new(()),
            events: None,
            version: AtomicU64::new(version),
        })
    }

    /// Publishes control-plane events (versions, experiments) on `events`.
    pub fn with_events(mut self, events: Arc<crate::events::EventBus>) -> Self {
        self.events = Some(events);
        self
    }

    /// Publishes an event, when an event bus is attached. Never fails the caller.
    pub async fn publish(&self, e: crate::pb::modelgate::v1::Event) {
        if let Some(bus) = &self.events {
            bus.publish(e).await;
        }
    }

    /// The current registry and experiments.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The routing snapshot handle the data plane reads.
    pub fn routing(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.routing.clone()
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The clock everything the control plane records is timed by.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Now, by the control plane's clock (Unix ms).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Applies a registry operation durably and publishes the result.
    pub async fn update<R>(
        &self,
        mut op: impl FnMut(&mut Registry) -> Result<(R, RegistryUpdate), RegistryError>,
    ) -> Result<R, ControlError> {
        self.update_state(|s| {
            let (r, u) = op(&mut s.registry)?;
            Ok((r, u.into()))
        })
        .await
    }

    /// Applies `op` to a copy of the whole state, makes its update durable in one synced batch,
    /// and only then publishes the copy and a rebuilt routing table.
    ///
    /// With a shared store (fleet mode) the write is checked against the version the state was
    /// read at; when another replica changed the configuration in between, the state is
    /// reloaded and `op` applied again to it — which is why `op` may run more than once.
    pub async fn update_state<R>(
        &self,
        mut op: impl FnMut(&mut State) -> Result<(R, Update), ControlError>,
    ) -> Result<R, ControlError> {
        let _guard = self.write_lock.lock().await;
        if self.storage.control.shared().is_none() {
            let mut next = State::clone(&self.state.load());
            let (out, update) = op(&mut next)?;
            if !update.is_empty() {
                let control = self.storage.control.clone();
                storage::blocking(move || control.write_control(&update)).await?;
                self.publish_state(next);
            }
            return Ok(out);
        }
        for _ in 0..SHARED_WRITE_ATTEMPTS {
            let base = self.version.load(Ordering::Acquire);
            let mut next = State::clone(&self.state.load());
            let (out, update) = op(&mut next)?;
            if update.is_empty() {
                return Ok(out);
            }
            let control = self.storage.control.clone();
            let written = storage::blocking(move || {
                let shared = control.shared().expect("checked above");
                shared.write_if(base, &update)
            })
            .await?;
            match written {
                Some(version) => {
                    self.version.store(version, Ordering::Release);
                    self.publish_state(next);
                    return Ok(out);
                }
                None => {
                    let control = self.storage.control.clone();
                    let (version, state) = storage::blocking(move || {
                        control.shared().expect("checked above").load_versioned()
                    })
                    .await?;
                    self.version.store(version, Ordering::Release);
                    self.publish_state(state);
                }
            }
        }
        Err(ControlError::Store(StoreError::Unavailable(format!(
            "the shared configuration changed under {SHARED_WRITE_ATTEMPTS} attempts in a row; retry"
        ))))
    }

    /// Publishes `next` and a routing table built from it.
    fn publish_state(&self, next: State) {
        let routing = RoutingTable::build(&next, self.default_model.as_deref());
        self.state.store(Arc::new(next));
        self.routing.store(Arc::new(routing));
    }

    /// The version of the shared configuration this replica serves (0 without a shared store,
    /// or before it was first reached).
    pub fn shared_version(&self) -> u64 {
        match self.version.load(Ordering::Acquire) {
            NOT_READ => 0,
            v => v,
        }
    }

    /// Catches up with a shared store (blocking; the fleet watcher's thread calls it): when its
    /// configuration is at another version than the one served, loads and publishes it. Returns
    /// the version now served. Without a shared store, does nothing.
    pub fn refresh_blocking(&self) -> Result<u64, StoreError> {
        let Some(shared) = self.storage.control.shared() else {
            return Ok(0);
        };
        let stored = shared.version()?;
        if stored == self.version.load(Ordering::Acquire) {
            return Ok(stored);
        }
        let _guard = self.write_lock.blocking_lock();
        let (version, state) = shared.load_versioned()?;
        self.version.store(version, Ordering::Release);
        if *self.state.load_full() != state {
            self.publish_state(state);
        }
        Ok(version)
    }
}

impl StateSource for ControlPlane {
    fn state(&self) -> Arc<State> {
        ControlPlane::state(self)
    }
}
