//! Applying a control change: the registry, experiments and shadows in memory, each change made
//! durable through the storage seam before it is published, with the routing snapshot rebuilt
//! from it.

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
}

impl ControlPlane {
    /// Loads the registry, experiments and shadows from `storage` and builds the first routing
    /// snapshot. Every time the control plane records comes from `clock`.
    pub fn load(
        storage: Storage,
        clock: SharedClock,
        default_model: Option<String>,
    ) -> Result<Self, StoreError> {
        let state = storage.control.load_state()?;
        let routing = RoutingTable::build(&state, default_model.as_deref());
        Ok(ControlPlane {
            storage,
            clock,
            state: ArcSwap::from_pointee(state),
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            default_model,
            write_lock: tokio::sync::Mutex::new(()),
            events: None,
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
        op: impl FnOnce(&mut Registry) -> Result<(R, RegistryUpdate), RegistryError>,
    ) -> Result<R, ControlError> {
        self.update_state(|s| {
            let (r, u) = op(&mut s.registry)?;
            Ok((r, u.into()))
        })
        .await
    }

    /// Applies `op` to a copy of the whole state, makes its update durable in one synced batch,
    /// and only then publishes the copy and a rebuilt routing table.
    pub async fn update_state<R>(
        &self,
        op: impl FnOnce(&mut State) -> Result<(R, Update), ControlError>,
    ) -> Result<R, ControlError> {
        let _guard = self.write_lock.lock().await;
        let mut next = State::clone(&self.state.load());
        let (out, update) = op(&mut next)?;
        if !update.is_empty() {
            let control = self.storage.control.clone();
            storage::blocking(move || control.write_control(&update)).await?;
            let routing = RoutingTable::build(&next, self.default_model.as_deref());
            self.state.store(Arc::new(next));
            self.routing.store(Arc::new(routing));
        }
        Ok(out)
    }
}

impl StateSource for ControlPlane {
    fn state(&self) -> Arc<State> {
        ControlPlane::state(self)
    }
}
