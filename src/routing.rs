//! The routing snapshot: which upstream serves each model right now.
//!
//! Built from the registry off the request path and published whole (the control plane swaps it
//! in an `ArcSwap`); a request reads one snapshot from start to end, so a promotion never tears a
//! request in half.

use std::collections::BTreeMap;

// The snapshot's maps are keyed by configured names (models, aliases) and only built from the
// configuration; callers' names are only looked up, so a fast unkeyed hash cannot be flooded.
// SipHash was ~170 instructions per lookup, one to three lookups per call.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

use crate::experiment::{self, Experiment, ExperimentState};
use crate::registry::{ModelVersion, PredictionSpec};
use crate::state::State;

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
    /// The protocol the upstream is called in.
    pub backend_protocol: crate::registry::BackendProtocol,
    /// How to read predictions from this version's responses.
    pub prediction: PredictionSpec,
    /// Feature names per input tensor.
    pub feature_names: BTreeMap<String, Vec<String>>,
    /// What the data plane caches per route (its metric handles), resolved on first use: a
    /// cache, not part of the route's identity.
    pub metrics: Extension,
}

impl Route {
    /// The route to a registered version.
    pub fn to(v: &ModelVersion) -> Route {
        Route {
            model: v.model.clone(),
            version: v.version,
            version_label: v.version.to_string(),
            endpoint: v.endpoint.clone(),
            backend_model: v.backend_model.clone(),
            backend_version: v.backend_version.clone(),
            backend_protocol: v.backend_protocol,
            prediction: v.prediction.clone(),
            feature_names: v.feature_names.clone(),
            metrics: Default::default(),
        }
    }
}

/// A value an adapter caches on a route the first time it needs it — the data plane's metric
/// handles, so that a request never looks them up by label — opaque to routing. Never part of a
/// route's identity: every two compare equal, a clone starts empty.
#[derive(Default)]
pub struct Extension(std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>);

impl Extension {
    /// The cached value, made by `init` on first use. One slot holds one type: the data plane's.
    pub fn get_or_init<T: std::any::Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> &T {
        self.0
            .get_or_init(|| Box::new(init()))
            .downcast_ref::<T>()
            .expect("a route's extension holds one type")
    }
}

impl Clone for Extension {
    fn clone(&self) -> Self {
        Extension::default()
    }
}

impl PartialEq for Extension {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Extension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Extension")
    }
}

/// A running experiment, as the data plane needs it.
#[derive(Debug)]
pub struct LiveExperiment {
    /// Experiment name.
    pub name: Arc<str>,
    /// Metadata key / OIP parameter of the unit id.
    pub unit_key: String,
    salt: String,
    coverage: f64,
    cumulative: Vec<f64>,
    /// Variant names and their routes, in order.
    pub variants: Vec<(Arc<str>, Arc<Route>)>,
    start_ms: Option<u64>,
    end_ms: Option<u64>,
}

/// A shadow, as the data plane needs it.
#[derive(Debug)]
pub struct LiveShadow {
    /// The shadow version's route.
    pub route: Arc<Route>,
    /// Share of requests mirrored.
    pub sample_fraction: f64,
    /// Deadline of each copy.
    pub timeout: std::time::Duration,
    /// When answers agree.
    pub comparison: crate::shadow::Comparison,
    /// Suspends copies while the shadow is down.
    pub breaker: crate::shadow::Breaker,
}

/// Where one request goes, and whether it is an experiment observation.
#[derive(Clone, Debug)]
pub struct Decision {
    /// The route.
    pub route: Arc<Route>,
    /// Experiment and variant, when the request is in one.
    pub experiment: Option<(Arc<str>, Arc<str>)>,
    /// Counted in the experiment's results (false for forced variants).
    pub counted: bool,
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

/// Why a call naming a version of a model cannot be routed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionLookup {
    /// No such model.
    UnknownModel,
    /// The model has no version by that number or alias.
    UnknownVersion,
    /// The version is archived: it serves no traffic.
    Archived(u32),
}

/// The versions of one model a call can name: by number or alias.
#[derive(Clone, Debug, Default)]
struct Versions {
    routes: HashMap<u32, Arc<Route>>,
    archived: HashSet<u32>,
    aliases: HashMap<String, u32>,
}

/// An immutable routing snapshot.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    production: HashMap<String, Arc<Route>>,
    known: HashSet<String>,
    versions: HashMap<String, Versions>,
    experiments: HashMap<String, Arc<LiveExperiment>>,
    shadows: HashMap<String, Arc<[LiveShadow]>>,
    default_model: Option<String>,
}

impl RoutingTable {
    /// Builds the snapshot for the current registry and experiments.
    pub fn build(state: &State, default_model: Option<&str>) -> Self {
        let mut production = HashMap::default();
        let mut known = HashSet::default();
        let mut versions = HashMap::default();
        for m in state.registry.models() {
            known.insert(m.meta.name.clone());
            let mut named = Versions {
                aliases: m.meta.aliases.clone().into_iter().collect(),
                ..Default::default()
            };
            for v in m.versions.values() {
                if v.stage == crate::registry::Stage::Archived {
                    named.archived.insert(v.version);
                    continue;
                }
                let route = Arc::new(Route::to(v));
                if v.stage == crate::registry::Stage::Production {
                    production.insert(v.model.clone(), route.clone());
                }
                named.routes.insert(v.version, route);
            }
            versions.insert(m.meta.name.clone(), named);
        }
        let experiments = state
            .experiments
            .all()
            .filter(|e| e.state == ExperimentState::Running)
            .filter_map(|e| Some((e.model.clone(), Arc::new(live(e, state)?))))
            .collect();
        let mut shadows: HashMap<String, Vec<LiveShadow>> = HashMap::default();
        for s in state.shadows.all() {
            let Ok(m) = state.registry.model(&s.model) else {
                continue;
            };
            let Some(v) = m.versions.get(&s.version) else {
                continue;
            };
            shadows
                .entry(s.model.clone())
                .or_default()
                .push(LiveShadow {
                    route: Arc::new(Route::to(v)),
                    sample_fraction: s.sample_fraction,
                    timeout: std::time::Duration::from_millis(s.timeout_ms),
                    comparison: s.comparison.clone(),
                    // A new snapshot starts with closed breakers: one probe per shadow.
                    breaker: Default::default(),
                });
        }
        RoutingTable {
            production,
            known,
            versions,
            experiments,
            shadows: shadows.into_iter().map(|(k, v)| (k, v.into())).collect(),
            default_model: default_model.map(str::to_string),
        }
    }

    /// The shadows of `model`, if any.
    pub fn shadows(&self, model: &str) -> Option<Arc<[LiveShadow]>> {
        self.shadows.get(model).cloned()
    }

    /// The running experiment of `model`, if any (it may still be outside its time window).
    pub fn experiment(&self, model: &str) -> Option<&Arc<LiveExperiment>> {
        self.experiments.get(model)
    }

    /// Routes one request of `model`: to the variant the unit is assigned (or the one forced by
    /// `x-modelgate-variant`) when the model has a live experiment, else to production.
    pub fn decide(
        &self,
        model: &str,
        unit_id: Option<&str>,
        forced: Option<&str>,
        now_ms: u64,
    ) -> Result<Decision, Lookup> {
        if let Some(e) = self.experiments.get(model) {
            let live =
                e.start_ms.is_none_or(|s| now_ms >= s) && e.end_ms.is_none_or(|x| now_ms < x);
            if live {
                let forced = forced.and_then(|f| e.variants.iter().position(|(n, _)| &**n == f));
                let chosen = match forced {
                    Some(i) => Some((i, false)),
                    None => unit_id.and_then(|u| {
                        experiment::pick(
                            experiment::bucket(&e.salt, &e.name, u),
                            e.coverage,
                            &e.cumulative,
                        )
                        .map(|i| (i, true))
                    }),
                };
                if let Some((i, counted)) = chosen {
                    let (variant, route) = &e.variants[i];
                    return Ok(Decision {
                        route: route.clone(),
                        experiment: Some((e.name.clone(), variant.clone())),
                        counted,
                    });
                }
            }
        }
        match self.lookup(model) {
            Lookup::Found(route) => Ok(Decision {
                route,
                experiment: None,
                counted: false,
            }),
            other => Err(other),
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

    /// The route of the version a call names (`model_version` in OIP): a version number or an
    /// alias. Archived versions serve nothing.
    pub fn version(&self, model: &str, version: &str) -> Result<Arc<Route>, VersionLookup> {
        let m = self
            .versions
            .get(model)
            .ok_or(VersionLookup::UnknownModel)?;
        // As the registry resolves a version: a number, else an alias.
        let number = match version.parse::<u32>() {
            Ok(n) => n,
            Err(_) => *m
                .aliases
                .get(version)
                .ok_or(VersionLookup::UnknownVersion)?,
        };
        match m.routes.get(&number) {
            Some(r) => Ok(r.clone()),
            None if m.archived.contains(&number) => Err(VersionLookup::Archived(number)),
            None => Err(VersionLookup::UnknownVersion),
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

/// The data plane's view of a running experiment; `None` when a variant's version is gone.
fn live(e: &Experiment, state: &State) -> Option<LiveExperiment> {
    let model = state.registry.model(&e.model).ok()?;
    let variants = e
        .variants
        .iter()
        .map(|v| {
            let version = model.versions.get(&v.version)?;
            Some((Arc::from(v.name.as_str()), Arc::new(Route::to(version))))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(LiveExperiment {
        name: Arc::from(e.name.as_str()),
        unit_key: e.unit_key.clone(),
        salt: e.salt.clone(),
        coverage: e.coverage,
        cumulative: e.cumulative(),
        variants,
        start_ms: e.start_ms,
        end_ms: e.end_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewVersion, Registry, Stage};

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
        let state = |r: &crate::registry::Registry| State {
            registry: r.clone(),
            ..Default::default()
        };
        let t = RoutingTable::build(&state(&r), Some("iris"));
        assert_eq!(t.lookup("iris"), Lookup::NoProduction);
        assert_eq!(t.lookup("nope"), Lookup::UnknownModel);

        r.transition("iris", "2", Stage::Production, false, 0)
            .unwrap();
        let t = RoutingTable::build(&state(&r), Some("iris"));
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

    #[test]
    fn experiments_split_force_and_fall_back_to_production() {
        use crate::experiment::{Experiments, NewExperiment, NewVariant};
        let mut r = Registry::default();
        for port in [1, 2] {
            r.register(
                NewVersion {
                    model: "m".into(),
                    endpoint: format!("h:{port}"),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        }
        r.transition("m", "1", Stage::Production, false, 0).unwrap();
        let mut ex = Experiments::default();
        let new = |coverage| NewExperiment {
            name: "e".into(),
            model: "m".into(),
            variants: ["1", "2"]
                .iter()
                .map(|v| NewVariant {
                    name: format!("v{v}"),
                    version: v.to_string(),
                    weight: 1.0,
                })
                .collect(),
            coverage,
            start_ms: Some(100),
            ..Default::default()
        };
        ex.create(new(0.5), &r, 0).unwrap();
        let t = RoutingTable::build(
            &State {
                registry: r.clone(),
                experiments: ex.clone(),
                ..Default::default()
            },
            None,
        );
        // Before the start: production, uncounted.
        let d = t.decide("m", Some("u1"), None, 50).unwrap();
        assert!(d.experiment.is_none() && d.route.version == 1);
        // No unit id: production.
        assert!(t.decide("m", None, None, 200).unwrap().experiment.is_none());
        // Forced: that variant, not counted; unknown forced names are ignored.
        let d = t.decide("m", None, Some("v2"), 200).unwrap();
        assert_eq!(d.route.version, 2);
        assert!(!d.counted);
        assert!(t
            .decide("m", None, Some("nope"), 200)
            .unwrap()
            .experiment
            .is_none());
        // Units: about half in (coverage 0.5), split between the variants, sticky.
        let mut inside = 0;
        for i in 0..2000 {
            let u = format!("user-{i}");
            let d = t.decide("m", Some(&u), None, 200).unwrap();
            if let Some((e, v)) = &d.experiment {
                inside += 1;
                assert_eq!(&**e, "e");
                assert!(d.counted);
                assert_eq!(format!("v{}", d.route.version), **v);
                let again = t.decide("m", Some(&u), None, 300).unwrap();
                assert_eq!(again.route.version, d.route.version);
            }
        }
        assert!((900..1100).contains(&inside), "{inside}");
        // Paused: production for everyone.
        ex.pause("e", 1).unwrap();
        let t = RoutingTable::build(
            &State {
                registry: r,
                experiments: ex,
                ..Default::default()
            },
            None,
        );
        assert!(t.experiment("m").is_none());
    }
}
