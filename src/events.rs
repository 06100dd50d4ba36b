//! The event stream: events are numbered, written to RocksDB (synced) in order, then broadcast to
//! live watchers and handed to the webhook sender. A watcher that falls behind the broadcast, or
//! reconnects, reads the missed events back from RocksDB by cursor — nothing is lost, and no
//! watcher ever slows the publishers.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

use crate::clock::SharedClock;
use crate::pb::modelgate::v1 as pb;
use crate::storage::{EventLog, StoreError};

/// Live events buffered for watchers before they fall back to reading RocksDB.
const BROADCAST: usize = 1024;

/// Publishes and replays events.
pub struct EventBus {
    store: Arc<dyn EventLog>,
    clock: SharedClock,
    next: Mutex<u64>,
    tx: broadcast::Sender<Arc<pb::Event>>,
    hooks: Option<mpsc::Sender<Arc<pb::Event>>>,
    /// Counts events the webhook queue had no room for.
    hooks_dropped: prometheus_client::metrics::counter::Counter,
}

impl EventBus {
    /// An event bus continuing after the last stored event. `hooks` receives every event for the
    /// webhook sender (a full queue drops and counts).
    pub fn open(
        store: Arc<dyn EventLog>,
        clock: SharedClock,
        hooks: Option<mpsc::Sender<Arc<pb::Event>>>,
        hooks_dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<Self, StoreError> {
        let last = store.last_event_cursor()?;
        Ok(EventBus {
            store,
            clock,
            next: Mutex::new(last + 1),
            tx: broadcast::channel(BROADCAST).0,
            hooks,
            hooks_dropped,
        })
    }

    /// Numbers, stores (synced) and broadcasts an event; returns its cursor. Blocking.
    pub fn publish_blocking(&self, mut event: pb::Event) -> Result<u64, StoreError> {
        let mut next = self.next.lock();
        if event.time.is_none() {
            event.time = Some(crate::pb::timestamp(self.clock.now_ms()));
        }
        let cursor = self.store.append_next(&mut event, *next)?;
        *next = cursor + 1;
        let event = Arc::new(event);
        // No watcher is fine; a lagging one re-reads from RocksDB. A shared log's events (this
        // replica's too) reach the watchers through `relay`, in the log's order.
        if !self.store.shared() {
            let _ = self.tx.send(event.clone());
        }
        if let Some(h) = &self.hooks {
            if h.try_send(event.clone()).is_err() {
                self.hooks_dropped.inc();
            }
        }
        drop(next);
        tracing::info!(cursor = event.cursor, r#type = %event.r#type, model = %event.model, "{}", event.message);
        Ok(event.cursor)
    }

    /// Publishes from async code (the write runs off the runtime). Failures are logged: an event
    /// that cannot be stored must not fail the operation that caused it.
    pub async fn publish(self: &Arc<Self>, event: pb::Event) {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.publish_blocking(event)).await {
            Ok(Ok(_)) => {}
            // A fleet-wide event another replica published already.
            Ok(Err(StoreError::AlreadyExists)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not store an event"),
            Err(e) => tracing::error!(error = %e, "event task failed"),
        }
    }

    /// Hands an event read from a shared log (fleet mode) to this replica's watchers.
    pub fn relay(&self, event: pb::Event) {
        let _ = self.tx.send(Arc::new(event));
    }

    /// New events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::Event>> {
        self.tx.subscribe()
    }

    /// The event log (for replays).
    pub fn store(&self) -> &Arc<dyn EventLog> {
        &self.store
    }
}

/// An event of `kind` about `model`, with a readable message.
pub fn event(kind: &str, model: &str, message: impl Into<String>) -> pb::Event {
    pb::Event {
        r#type: kind.to_string(),
        model: model.to_string(),
        message: message.into(),
        ..Default::default()
    }
}

/// An event of `kind` about experiment `e` ("experiment 'ab' on model 'iris' is running"), from
/// the control API and from the state file alike.
pub fn experiment_event(kind: &str, e: &crate::experiment::Experiment) -> pb::Event {
    let mut ev = event(
        kind,
        &e.model,
        format!(
            "experiment '{}' on model '{}' is {}",
            e.name,
            e.model,
            e.state.as_str()
        ),
    );
    ev.experiment = e.name.clone();
    ev
}

/// Whether `e` passes a watch filter.
pub fn matches(e: &pb::Event, types: &[String], model: &str) -> bool {
    (types.is_empty() || types.contains(&e.r#type)) && (model.is_empty() || e.model == model)
}
