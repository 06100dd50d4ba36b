//! The routing snapshot: which upstream serves each model right now.
//!
//! Built from the registry off the request path and published whole (the control plane swaps it
//! in an `ArcSwap`); a request reads one snapshot from start to end, so a promotion never tears a
//! request in half.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::registry::{PredictionSpec, Registry};

/// Where one model's traffic goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Model name as callers use it.
    pub model: String,
    /// Registered version number.
    pub version: u32,
    /// `version` as text, for the response header.
    pub version_label: String,
    /// Upstream endpoint, `http://host:port`.
    pub endpoint: String,
    /// Model name to write into forwarded OIP requests.
    pub backend_model: Option<String>,
    /// Model version to write into forwarded OIP requests.
    pub backend_version: Option<String>,
    /// How to read predictions from this version's responses.
    pub prediction: PredictionSpec,
    /// Feature names per input tensor.
    pub feature_names: BTreeMap<String, Vec<String>>,
}

/// The answer to "where does this model's traffic go?".
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    /// The production route.
    Found(Arc<Route>),
    /// The model is registered but nothing is in production.
    NoProduction,
    /// No such model.
    UnknownModel,
}

/// An immutable routing snapshot.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    production: HashMap<String, Arc<Route>>,
    known: HashSet<String>,
    default_model: Option<String>,
}

impl RoutingTable {
    /// Builds the snapshot for the current registry.
    pub fn build(registry: &Registry, default_model: Option<&str>) -> Self {
        let mut production = HashMap::new();
        let mut known = HashSet::new();
        for m in registry.models() {
            known.insert(m.meta.name.clone());
            if let Some(v) = m.production() {
                production.insert(
                    v.model.clone(),
                    Arc::new(Route {
                        model: v.model.clone(),
                        version: v.version,
                        version_label: v.version.to_string(),
                        endpoint: v.endpoint.clone(),
                        backend_model: v.backend_model.clone(),
                        backend_version: v.backend_version.clone(),
                        prediction: v.prediction.clone(),
                        feature_names: v.feature_names.clone(),
                    }),
                );
            }
        }
        RoutingTable {
            production,
            known,
            default_model: default_model.map(str::to_string),
        }
    }

    /// The route for `model`'s production traffic.
    pub fn lookup(&self, model: &str) -> Lookup {
        match self.production.get(model) {
            Some(r) => Lookup::Found(r.clone()),
            None if self.known.contains(model) => Lookup::NoProduction,
            None => Lookup::UnknownModel,
        }
    }

    /// The model that serves calls naming none (`--default-model`).
    pub fn default_model(&self) -> Option<&str> {
        self.default_model.as_deref()
    }

    /// Number of models with a production version.
    pub fn routed_models(&self) -> usize {
        self.production.len()
    }

    /// Every distinct upstream endpoint in production, for warming connections.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.production.values().map(|r| r.endpoint.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewVersion, Stage};

    #[test]
    fn routes_follow_the_production_stage() {
        let mut r = Registry::default();
        for port in [1, 2] {
            r.register(
                NewVersion {
                    model: "iris".into(),
                    endpoint: format!("127.0.0.1:{port}"),
                    backend_model: "iris-backend".into(),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        }
        r.register(
            NewVersion {
                model: "idle".into(),
                endpoint: "h:1".into(),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let t = RoutingTable::build(&r, Some("iris"));
        assert_eq!(t.lookup("iris"), Lookup::NoProduction);
        assert_eq!(t.lookup("nope"), Lookup::UnknownModel);

        r.transition("iris", "2", Stage::Production, false, 0)
            .unwrap();
        let t = RoutingTable::build(&r, Some("iris"));
        let Lookup::Found(route) = t.lookup("iris") else {
            panic!("no route")
        };
        assert_eq!(route.version, 2);
        assert_eq!(route.endpoint, "http://127.0.0.1:2");
        assert_eq!(route.backend_model.as_deref(), Some("iris-backend"));
        assert_eq!(t.default_model(), Some("iris"));
        assert_eq!(t.routed_models(), 1);
        assert_eq!(t.lookup("idle"), Lookup::NoProduction);
    }
}
