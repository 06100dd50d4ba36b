//! The evaluator thread: [`Monitor::start`] loads the stored references, drift states and
//! retraining policies and starts one thread that runs the evaluations queued by
//! [`Monitor::observe`] and [`Monitor::evaluate_now`] (statistics never run on the record writer
//! or a request); [`Monitor::stop_blocking`] ends it.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::events::EventBus;
use crate::state::StateSource;
use crate::storage::{DriftStateExt, Storage, StoreError};

use super::data::Snapshot;
use super::settings::DriftSettings;
use super::triggers::RetrainPolicy;
use super::Monitor;

/// A model to evaluate: on a snapshot taken when it was asked for (so that what is tested does
/// not depend on how far behind the evaluator is), or on its current windows; and whom to tell.
pub(super) type EvalRequest = (String, Option<Snapshot>, Option<SyncSender<()>>);

impl Monitor {
    /// Loads references and policies and starts the evaluator thread.
    pub fn start(
        settings: DriftSettings,
        store: Storage,
        clock: SharedClock,
        events: Arc<EventBus>,
        plane: Arc<dyn StateSource>,
    ) -> Result<Arc<Monitor>, StoreError> {
        let (eval_tx, eval_rx) = sync_channel::<EvalRequest>(1024);
        let monitor = Arc::new(Monitor {
            settings,
            store: store.clone(),
            clock,
            events,
            plane,
            models: DashMap::default(),
            concepts: DashMap::default(),
            retrain: Mutex::new(HashMap::new()),
            eval_tx,
            raised: Mutex::new(Default::default()),
            evaluator: Mutex::new(None),
            stopping: Default::default(),
        });
        for model in store.drift.reference_models()? {
            if let Some(r) = store.drift.load_reference(&model)? {
                let state = store.drift.get_state(&model, "drift")?.unwrap_or_default();
                let md = monitor.fresh(Arc::new(r), state);
                monitor
                    .models
                    .insert(model.clone(), Arc::new(Mutex::new(md)));
            }
            if let Some(p) = store.drift.get_state::<RetrainPolicy>(&model, "retrain")? {
                monitor.retrain.lock().insert(model, p);
            }
        }
        // The evaluator holds only a weak handle, so the monitor can be dropped at shutdown.
        let weak = Arc::downgrade(&monitor);
        let stopping = monitor.stopping.clone();
        let evaluator = std::thread::Builder::new()
            .name("modelgate-drift".into())
            .spawn(move || {
                while let Ok((model, snapshot, ack)) = eval_rx.recv() {
                    if stopping.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    let Some(m) = weak.upgrade() else { break };
                    m.evaluate(&model, snapshot);
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
            })
            .expect("spawning the drift evaluator");
        *monitor.evaluator.lock() = Some(evaluator);
        Ok(monitor)
    }

    /// Stops the evaluator thread once the evaluation under way (if any) ends; what is still
    /// queued is skipped. An evaluation holds the monitor, and with it the store: without this,
    /// RocksDB could stay open for a moment after shutdown returned, and a restart in the same
    /// process found its LOCK taken (tests/drift.rs, now and then under load). Blocking.
    pub fn stop_blocking(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        // Wakes an idle evaluator (a full queue wakes it anyway).
        let _ = self.eval_tx.try_send((String::new(), None, None));
        let handle = self.evaluator.lock().take();
        if let Some(h) = handle {
            // Never join from the evaluator itself (it may drop the last handle to the monitor).
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// Evaluates `model` now on the evaluator thread and waits for it.
    pub fn evaluate_now(&self, model: &str) {
        // In a fleet, the replica holding the model's lease evaluates; another asks it and waits.
        if self.evaluate_shared_now(model) {
            return;
        }
        let (ack, done) = sync_channel(1);
        if self
            .eval_tx
            .send((model.to_string(), None, Some(ack)))
            .is_ok()
        {
            let _ = done.recv_timeout(Duration::from_secs(60));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::test_support::{harness, settings, MODEL};

    #[test]
    fn a_restarted_monitor_resumes_from_what_was_stored() {
        let h = harness(settings());
        h.set_reference();
        h.evaluate_rows(5.0, 200);
        let policy = RetrainPolicy {
            on_data_drift: true,
            ..Default::default()
        };
        h.monitor.set_retrain_policy(MODEL, policy.clone()).unwrap();
        h.monitor.stop_blocking();
        // Stopped: asking for an evaluation returns at once.
        h.monitor.evaluate_now(MODEL);

        let events = Arc::new(
            EventBus::open(
                h.storage.events.clone(),
                h.clock.clone(),
                None,
                Default::default(),
            )
            .unwrap(),
        );
        let again = Monitor::start(
            settings(),
            h.storage.clone(),
            h.clock.clone(),
            events,
            h.plane.clone(),
        )
        .unwrap();
        let r = again.report(MODEL);
        assert!(r.has_reference);
        assert_eq!(r.drifted, vec!["x"], "the episode goes on");
        assert_eq!(r.evaluations, 0, "evaluations are counted per process");
        assert_eq!(again.retrain_policy(MODEL), Some(policy));
        again.stop_blocking();
    }
}
