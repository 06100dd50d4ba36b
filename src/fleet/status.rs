//! Whether the fleet's Redis answers: kept by the Redis connection itself (every call reports
//! how it went), read by `/ready`, the metrics and the events.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

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
