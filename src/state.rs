//! What the control plane configures — the registry, experiments and shadows — as one value, and
//! the writes one change of it needs made durable. Plain values: the control plane (`control`)
//! applies changes to a copy, a storage backend (`store`) makes the update durable, and the
//! routing snapshot (`routing`) is built from it.

use std::sync::Arc;

use crate::experiment::{Experiment, Experiments};
use crate::registry::{Registry, RegistryUpdate};
use crate::shadow::{Shadow, Shadows};

/// Everything the control plane configures: the registry, experiments and shadows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Models and versions.
    pub registry: Registry,
    /// Experiments.
    pub experiments: Experiments,
    /// Shadows.
    pub shadows: Shadows,
}

/// The writes one control operation needs made durable, as one atomic batch.
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// Registry records.
    pub registry: RegistryUpdate,
    /// Experiment records to write.
    pub experiments: Vec<Experiment>,
    /// Shadow records to write.
    pub put_shadows: Vec<Shadow>,
    /// Shadow records to delete (model, version).
    pub delete_shadows: Vec<(String, u32)>,
}

impl Update {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.registry.is_empty()
            && self.experiments.is_empty()
            && self.put_shadows.is_empty()
            && self.delete_shadows.is_empty()
    }
}

impl From<RegistryUpdate> for Update {
    fn from(registry: RegistryUpdate) -> Self {
        Update {
            registry,
            ..Default::default()
        }
    }
}

/// Where the current state can be read: the control plane, for those that only read it (the
/// drift monitor's registered baselines and retraining schedule).
pub trait StateSource: Send + Sync {
    /// The current state.
    fn state(&self) -> Arc<State>;
}
