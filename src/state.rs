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

impl Update {
    /// The writes that turn a store holding `old` into one holding `new`: every record of `new`,
    /// and the deletion of the versions and shadows only `old` has. (Models, policies and
    /// experiments are never deleted, so none is missing from a later state.)
    pub fn replacing(old: &State, new: &State) -> Update {
        let mut u = Update::default();
        for m in new.registry.models() {
            u.registry.put_models.push(m.meta.clone());
            u.registry.put_versions.extend(m.versions.values().cloned());
        }
        for m in old.registry.models() {
            let kept = new.registry.model(&m.meta.name).ok();
            for v in m.versions.keys() {
                if !kept.is_some_and(|k| k.versions.contains_key(v)) {
                    u.registry.delete_versions.push((m.meta.name.clone(), *v));
                }
            }
        }
        u.registry.put_policies = new
            .registry
            .policies()
            .map(|(m, p)| (m.clone(), p.clone()))
            .collect();
        u.experiments = new.experiments.all().cloned().collect();
        u.put_shadows = new.shadows.all().cloned().collect();
        u.delete_shadows = old
            .shadows
            .all()
            .filter(|s| {
                !new.shadows
                    .all()
                    .any(|n| n.model == s.model && n.version == s.version)
            })
            .map(|s| (s.model.clone(), s.version))
            .collect();
        u
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
