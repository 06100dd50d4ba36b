//! What the tests of `monitor` share: a monitor on the in-memory storage with a manual clock (so
//! that nothing time-dependent needs a sleep), a control state the test can change, references
//! and rows of one numeric feature, and the events published so far.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::clock::{Clock, ManualClock};
use crate::drift::{self, Reference};
use crate::events::EventBus;
use crate::pb::modelgate::v1 as pb;
use crate::record::{FeatureValue, Precision};
use crate::state::State;
use crate::state::StateSource;
use crate::storage::memory::MemoryStore;
use crate::storage::{Retention, Storage};

use super::{DriftSettings, Monitor};

/// The model every test watches.
pub(super) const MODEL: &str = "iris";

/// A control state the test sets by hand.
#[derive(Default)]
pub(super) struct Plane(pub(super) Mutex<Arc<State>>);

impl StateSource for Plane {
    fn state(&self) -> Arc<State> {
        self.0.lock().clone()
    }
}

/// A running monitor and what it works on.
pub(super) struct Harness {
    pub(super) monitor: Arc<Monitor>,
    pub(super) clock: Arc<ManualClock>,
    pub(super) storage: Storage,
    pub(super) plane: Arc<Plane>,
}

/// Settings for tests: evaluations only when the test asks ([`Monitor::evaluate_now`]), windows
/// of 200 rows, everything else as configured by default.
pub(super) fn settings() -> DriftSettings {
    DriftSettings {
        window: 200,
        every: u64::MAX,
        ..DriftSettings::default()
    }
}

/// A monitor started on an empty in-memory storage, its clock at a fixed time.
pub(super) fn harness(settings: DriftSettings) -> Harness {
    let clock = ManualClock::at(1_700_000_000_000);
    let storage = MemoryStore::storage(clock.clone(), Retention::default());
    let events = Arc::new(
        EventBus::open(
            storage.events.clone(),
            clock.clone(),
            None,
            Default::default(),
        )
        .unwrap(),
    );
    let plane = Arc::new(Plane::default());
    let monitor = Monitor::start(
        settings,
        storage.clone(),
        clock.clone(),
        events,
        plane.clone(),
    )
    .unwrap();
    Harness {
        monitor,
        clock,
        storage,
        plane,
    }
}

/// `n` rows of the feature `x`, spread evenly over `[from, from + 2)`.
pub(super) fn rows(from: f64, n: usize) -> Vec<Vec<FeatureValue>> {
    (0..n)
        .map(|i| vec![FeatureValue::Number(from + 2.0 * i as f64 / n as f64)])
        .collect()
}

/// A reference of 200 rows of `x` over `[from, from + 2)`.
pub(super) fn reference(from: f64, now_ms: u64) -> Reference {
    drift::build_reference(
        &["x".to_string()],
        rows(from, 200),
        &[],
        drift::MAX_SAMPLE,
        "uploaded",
        now_ms,
    )
    .unwrap()
}

impl Harness {
    /// Observes `n` rows of `x` over `[from, from + 2)`, then evaluates and waits for it.
    pub(super) fn evaluate_rows(&self, from: f64, n: usize) {
        self.monitor.observe(
            MODEL,
            &std::sync::Arc::from(["x".to_string()]),
            &[Precision::F64],
            &rows(from, n),
        );
        self.monitor.evaluate_now(MODEL);
    }

    /// Installs a reference of `x` over `[0, 2)`.
    pub(super) fn set_reference(&self) {
        self.monitor
            .set_reference(MODEL, reference(0.0, self.clock.now_ms()))
            .unwrap();
    }

    /// Every event published so far, oldest first.
    pub(super) fn events(&self) -> Vec<pb::Event> {
        self.storage.events.events_after(0, 10_000).unwrap()
    }

    /// The types of the events published so far, oldest first.
    pub(super) fn event_types(&self) -> Vec<String> {
        self.events().into_iter().map(|e| e.r#type).collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.monitor.stop_blocking();
    }
}
