//! Online monitoring: data drift, concept drift, retraining triggers and alerts.
//!
//! Live rows reach [`Monitor::observe`] from the record writer's thread (never the request
//! path): each row updates every feature's window in O(features). Every `--drift-every` rows (or
//! on demand) the model is queued for the evaluator thread, which compares windows with the
//! reference, moves each feature's episode on (with hysteresis: [`drift::Episode`]) and
//! publishes `drift_started` / `drift_ended` when the model's episode starts or ends. Outcomes
//! update each version's concept window, and its episode, as they are recorded. A periodic task
//! raises scheduled retraining triggers and the experiment and shadow alerts.
//!
//! Events of a model's episode are published while its lock is held, after the state they
//! announce is stored: whatever else changes the model (a new reference, another evaluation)
//! comes wholly before or after, so a watcher sees `drift_started` and `drift_ended` alternate.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::control::ControlPlane;
use crate::drift::{
    self, ConceptMetric, ConceptWindow, Episode, FeatureResult, Hysteresis, Level, LiveWindow,
    Reference,
};
use crate::events::{event, EventBus};
use crate::outcome::Judgement;
use crate::record::{FeatureValue, Precision};
use crate::store::records::now_ms;
use crate::store::{Store, StoreError};

/// Drift settings.
#[derive(Clone, Debug)]
pub struct DriftSettings {
    /// Live values per feature window (W).
    pub window: usize,
    /// New rows between evaluations (K).
    pub every: u64,
    /// Least time between evaluations of a model: under heavy traffic K rows arrive every few
    /// milliseconds, and evaluating that often would spend a core on statistics.
    pub min_interval: std::time::Duration,
    /// Benjamini–Hochberg false discovery rate: a feature starts drifting below it.
    pub fdr: f64,
    /// Adjusted p-value above which an evaluation counts towards the end of a feature's drift.
    pub exit_p_value: f64,
    /// Evaluations in a row above `exit_p_value` that end a feature's drift.
    pub exit_evaluations: u32,
    /// Largest reference (rows).
    pub reference_max: usize,
    /// Outcomes per concept window (N).
    pub concept_window: usize,
    /// Degradation beyond which a version's performance starts drifting.
    pub concept_threshold: f64,
    /// Degradation at most which an outcome counts towards the end of performance drift.
    pub concept_exit_threshold: f64,
    /// Outcomes in a row at most `concept_exit_threshold` that end performance drift.
    pub concept_exit_outcomes: u32,
    /// Shadow agreement below which `shadow_agreement_low` fires (after 100 comparisons).
    pub shadow_agreement_alert: f64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings {
            window: 1000,
            every: 100,
            min_interval: std::time::Duration::ZERO,
            fdr: 0.05,
            exit_p_value: 0.2,
            exit_evaluations: 3,
            reference_max: drift::MAX_SAMPLE,
            concept_window: 1000,
            concept_threshold: 0.1,
            concept_exit_threshold: 0.05,
            concept_exit_outcomes: 100,
            shadow_agreement_alert: 0.9,
        }
    }
}

impl DriftSettings {
    /// The levels of data drift's hysteresis.
    pub fn hysteresis(&self) -> Hysteresis {
        Hysteresis {
            fdr: self.fdr,
            exit_p_value: self.exit_p_value,
            exit_evaluations: self.exit_evaluations,
        }
    }

    /// Where a version's degradation stands against the levels of performance drift.
    pub fn concept_level(&self, degradation: f64) -> Level {
        if degradation > self.concept_threshold {
            Level::Alarm
        } else if degradation <= self.concept_exit_threshold {
            Level::Quiet
        } else {
            Level::Between
        }
    }
}

/// The persisted drift state of a model: the features in an episode. (Their counts of quiet
/// evaluations are kept in memory only: a restart counts afresh, which can only make an episode
/// last longer.)
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct DriftState {
    drifted: Vec<String>,
    changed_ms: u64,
}

/// The cooldown of a retraining policy that names none.
pub const DEFAULT_RETRAIN_COOLDOWN_MS: u64 = 3_600_000;

/// A model's retraining policy, with what it has already triggered. The default (no policy
/// set) triggers nothing and shows the cooldown a new policy would get.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrainPolicy {
    /// Trigger when data drift starts.
    pub on_data_drift: bool,
    /// Trigger when a version's performance drifts.
    pub on_performance_drift: bool,
    /// Trigger when the production version is older than this.
    pub max_age_ms: Option<u64>,
    /// No second trigger within this.
    pub cooldown_ms: u64,
    /// When the last trigger fired.
    #[serde(default)]
    pub last_trigger_ms: Option<u64>,
    /// The production version a scheduled trigger already fired for.
    #[serde(default)]
    pub scheduled_version: Option<u32>,
}

impl Default for RetrainPolicy {
    fn default() -> Self {
        RetrainPolicy {
            on_data_drift: false,
            on_performance_drift: false,
            max_age_ms: None,
            cooldown_ms: DEFAULT_RETRAIN_COOLDOWN_MS,
            last_trigger_ms: None,
            scheduled_version: None,
        }
    }
}

/// The persisted concept-drift state of a version.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ConceptRecord {
    baseline: Option<f64>,
    drifted: bool,
}

/// The latest evaluation of a model.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Per feature.
    pub features: Vec<FeatureResult>,
    /// When.
    pub at_ms: u64,
}

/// A capture of live rows in progress.
struct Capture {
    target: usize,
    names: Vec<String>,
    rows: Vec<Vec<FeatureValue>>,
    received: u64,
}

#[derive(Default)]
struct ModelDrift {
    reference: Option<Arc<Reference>>,
    index: HashMap<String, usize>,
    windows: Vec<LiveWindow>,
    since_eval: u64,
    /// When the last evaluation was asked for.
    asked: Option<std::time::Instant>,
    evaluations: u64,
    capture: Option<Capture>,
    latest: Option<Arc<Evaluation>>,
    state: DriftState,
    /// Quiet evaluations in a row of the features in `state.drifted`.
    quiet: BTreeMap<String, u32>,
}

impl ModelDrift {
    /// The reference and a copy of the windows, when there is a reference to test against.
    fn snapshot(&self) -> Option<Snapshot> {
        self.reference.clone().map(|r| (r, self.windows.clone()))
    }
}

struct Concept {
    window: ConceptWindow,
    record: ConceptRecord,
    /// While drifted: outcomes in a row at most the exit level (in memory only).
    quiet: u32,
}

/// What the report of a version's concept drift says.
#[derive(Clone, Debug, PartialEq)]
pub struct ConceptStatus {
    /// Version.
    pub version: u32,
    /// Metric.
    pub metric: ConceptMetric,
    /// Baseline and where it came from.
    pub baseline: Option<(f64, &'static str)>,
    /// Metric over the full window.
    pub current: Option<f64>,
    /// Window size and fill.
    pub window: (usize, usize),
    /// In a performance-drift episode.
    pub drifted: bool,
    /// While drifted: outcomes in a row at most the exit level.
    pub quiet_outcomes: u32,
}

/// Everything [`Monitor::report`] returns.
pub struct ModelReport {
    /// Latest evaluation.
    pub evaluation: Option<Arc<Evaluation>>,
    /// Evaluations so far (this process).
    pub evaluations: u64,
    /// Drifted features.
    pub drifted: Vec<String>,
    /// When the drifted set last changed.
    pub changed_ms: u64,
    /// Whether there is a reference.
    pub has_reference: bool,
    /// Concept drift per version seen.
    pub concept: Vec<ConceptStatus>,
}

/// The windows of a model as they were when K new rows had arrived.
type Snapshot = (Arc<Reference>, Vec<LiveWindow>);
/// A model to evaluate: on a snapshot taken when it was asked for (so that what is tested does
/// not depend on how far behind the evaluator is), or on its current windows; and whom to tell.
type EvalRequest = (String, Option<Snapshot>, Option<SyncSender<()>>);

/// The monitor.
pub struct Monitor {
    settings: DriftSettings,
    store: Store,
    events: Arc<EventBus>,
    plane: Arc<ControlPlane>,
    models: DashMap<String, Arc<Mutex<ModelDrift>>>,
    concepts: DashMap<(String, u32), Arc<Mutex<Concept>>>,
    retrain: Mutex<HashMap<String, RetrainPolicy>>,
    eval_tx: SyncSender<EvalRequest>,
    /// Alerts already raised (experiment significance / SRM, shadow agreement), by key.
    raised: Mutex<std::collections::HashSet<String>>,
    /// The evaluator thread, joined by [`Monitor::stop_blocking`].
    evaluator: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set at shutdown: the evaluator skips what is still queued.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Monitor {
    /// Loads references and policies and starts the evaluator thread.
    pub fn start(
        settings: DriftSettings,
        store: Store,
        events: Arc<EventBus>,
        plane: Arc<ControlPlane>,
    ) -> Result<Arc<Monitor>, StoreError> {
        let (eval_tx, eval_rx) = sync_channel::<EvalRequest>(1024);
        let monitor = Arc::new(Monitor {
            settings,
            store: store.clone(),
            events,
            plane,
            models: DashMap::new(),
            concepts: DashMap::new(),
            retrain: Mutex::new(HashMap::new()),
            eval_tx,
            raised: Mutex::new(Default::default()),
            evaluator: Mutex::new(None),
            stopping: Default::default(),
        });
        for model in store.reference_models()? {
            if let Some(r) = store.load_reference(&model)? {
                let state = store.get_model_state(&model, "drift")?.unwrap_or_default();
                let md = monitor.fresh(Arc::new(r), state);
                monitor
                    .models
                    .insert(model.clone(), Arc::new(Mutex::new(md)));
            }
            if let Some(p) = store.get_model_state::<RetrainPolicy>(&model, "retrain")? {
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

    fn fresh(&self, reference: Arc<Reference>, state: DriftState) -> ModelDrift {
        ModelDrift {
            index: reference
                .features
                .iter()
                .enumerate()
                .map(|(i, f)| (f.name.clone(), i))
                .collect(),
            windows: reference
                .features
                .iter()
                .map(|f| LiveWindow::for_feature(f, self.settings.window))
                .collect(),
            reference: Some(reference),
            state,
            ..Default::default()
        }
    }

    /// Settings.
    pub fn settings(&self) -> &DriftSettings {
        &self.settings
    }

    /// Live rows of `model` (record writer thread): `names` and `precisions` per column (a
    /// missing precision is [`Precision::F64`]).
    pub fn observe(
        &self,
        model: &str,
        names: &[String],
        precisions: &[Precision],
        rows: &[Vec<FeatureValue>],
    ) {
        if rows.is_empty() {
            return;
        }
        let Some(md) = self.models.get(model).map(|m| m.clone()) else {
            return;
        };
        let mut md = md.lock();
        if let Some(c) = md.capture.as_mut() {
            if c.names.is_empty() {
                c.names = names.to_vec();
            }
            if c.names == names {
                for r in rows {
                    c.received += 1;
                    if c.rows.len() < c.target {
                        c.rows.push(r.clone());
                    }
                }
            }
            if c.rows.len() >= c.target {
                let c = md.capture.take().expect("capturing");
                match drift::build_reference(&c.names, c.rows, &[], c.target, "captured", now_ms())
                {
                    Ok(mut r) => {
                        r.received = c.received;
                        self.end_episode(model, &mut md, "reference_replaced");
                        if let Err(e) = self.store.put_reference(model, &r) {
                            tracing::error!(model, error = %e, "could not store the captured reference");
                        }
                        *md = self.fresh(Arc::new(r), DriftState::default());
                        tracing::info!(model, "reference captured");
                    }
                    Err(e) => tracing::warn!(model, error = %e, "capture failed"),
                }
            }
            return;
        }
        if md.reference.is_none() {
            return;
        }
        let map: Vec<(Option<usize>, Precision)> = names
            .iter()
            .enumerate()
            .map(|(c, n)| {
                let p = precisions.get(c).copied().unwrap_or_default();
                (md.index.get(n).copied(), p)
            })
            .collect();
        for r in rows {
            for (v, (slot, p)) in r.iter().zip(&map) {
                if let Some(i) = slot {
                    md.windows[*i].push(v, *p);
                }
            }
        }
        md.since_eval += rows.len() as u64;
        if md.since_eval >= self.settings.every
            && md
                .asked
                .is_none_or(|t| t.elapsed() >= self.settings.min_interval)
        {
            md.since_eval = 0;
            md.asked = Some(std::time::Instant::now());
            let snapshot = md.snapshot();
            drop(md);
            // The evaluator is busy or far behind: the next K rows will ask again.
            let _ = self.eval_tx.try_send((model.to_string(), snapshot, None));
        }
    }

    /// Installs an uploaded reference (synced first). An episode of the previous reference ends
    /// first, with `drift_ended` (reason `reference_replaced`), under the model's lock: no event
    /// about the new reference can come before it.
    pub fn set_reference(&self, model: &str, r: Reference) -> Result<Arc<Reference>, StoreError> {
        let md = self.models.entry(model.to_string()).or_default().clone();
        let mut md = md.lock();
        // Ended (stored and announced) before the new reference is written: a crash in between
        // leaves the old reference with no episode, which is what the watcher was told.
        self.end_episode(model, &mut md, "reference_replaced");
        self.store.put_reference(model, &r)?;
        let r = Arc::new(r);
        // Replaced in place, not as a new entry: an evaluation of the old reference still under
        // way finds another reference here and says nothing.
        *md = self.fresh(r.clone(), DriftState::default());
        Ok(r)
    }

    /// Ends the model's drift episode, if any: stores the empty state, then publishes
    /// `drift_ended` with `reason`. Called with the model's lock held.
    fn end_episode(&self, model: &str, md: &mut ModelDrift, reason: &str) {
        md.quiet.clear();
        if md.state.drifted.is_empty() {
            return;
        }
        md.state = DriftState {
            drifted: Vec::new(),
            changed_ms: now_ms(),
        };
        if let Err(e) = self.store.put_model_state(model, "drift", &md.state) {
            tracing::error!(model, error = %e, "could not store the drift state");
        }
        let mut e = event(
            "drift_ended",
            model,
            match reason {
                "reference_replaced" => {
                    format!("data drift in model '{model}' ended: its reference was replaced")
                }
                _ => format!("no data drift in model '{model}' any more"),
            },
        );
        e.reason = reason.to_string();
        self.publish(e);
    }

    /// Whether `model` has a reference or is capturing one: its rows are wanted.
    pub fn watching(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|md| {
            let md = md.lock();
            md.reference.is_some() || md.capture.is_some()
        })
    }

    /// Starts taking the next `n` live rows as the reference.
    pub fn capture(&self, model: &str, n: usize) {
        let md = self.models.entry(model.to_string()).or_default().clone();
        md.lock().capture = Some(Capture {
            target: n,
            names: Vec::new(),
            rows: Vec::with_capacity(n.min(drift::MAX_SAMPLE)),
            received: 0,
        });
    }

    /// The reference and, while capturing, how many rows remain.
    pub fn reference(&self, model: &str) -> (Option<Arc<Reference>>, Option<(usize, u64)>) {
        match self.models.get(model) {
            None => (None, None),
            Some(md) => {
                let md = md.lock();
                let capturing = md
                    .capture
                    .as_ref()
                    .map(|c| (c.target - c.rows.len(), c.received));
                (md.reference.clone(), capturing)
            }
        }
    }

    /// Evaluates `model` now on the evaluator thread and waits for it.
    pub fn evaluate_now(&self, model: &str) {
        let (ack, done) = sync_channel(1);
        if self
            .eval_tx
            .send((model.to_string(), None, Some(ack)))
            .is_ok()
        {
            let _ = done.recv_timeout(Duration::from_secs(60));
        }
    }

    fn evaluate(&self, model: &str, snapshot: Option<Snapshot>) {
        let Some(md) = self.models.get(model).map(|m| m.clone()) else {
            return;
        };
        let Some((reference, windows)) = snapshot.or_else(|| md.lock().snapshot()) else {
            return;
        };
        let mut features = drift::evaluate(&reference, &windows, self.settings.fdr);
        let now = now_ms();
        let mut md = md.lock();
        if !md
            .reference
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &reference))
        {
            // The reference was replaced while this one was tested: its episode has ended.
            return;
        }
        let mut episodes: BTreeMap<String, u32> = md
            .state
            .drifted
            .iter()
            .map(|f| (f.clone(), md.quiet.get(f).copied().unwrap_or(0)))
            .collect();
        drift::update_episodes(&mut features, &mut episodes, &self.settings.hysteresis());
        let drifted: Vec<String> = features
            .iter()
            .filter(|f| f.drifted)
            .map(|f| f.name.clone())
            .collect();
        md.quiet = episodes;
        md.evaluations += 1;
        md.latest = Some(Arc::new(Evaluation {
            features,
            at_ms: now,
        }));
        if md.state.drifted == drifted {
            return;
        }
        let was = !md.state.drifted.is_empty();
        if was && drifted.is_empty() {
            self.end_episode(model, &mut md, "recovered");
            return;
        }
        md.state = DriftState {
            drifted: drifted.clone(),
            changed_ms: now,
        };
        if let Err(e) = self.store.put_model_state(model, "drift", &md.state) {
            tracing::error!(model, error = %e, "could not store the drift state");
        }
        // Within an episode a changing set of features only updates the report; events mark
        // the start and the end.
        if !was {
            let mut e = event(
                "drift_started",
                model,
                format!("data drift in model '{model}': {}", drifted.join(", ")),
            );
            e.features = drifted;
            self.publish(e);
            self.trigger(model, "data_drift", None);
        }
    }

    fn publish(&self, e: crate::pb::modelgate::v1::Event) {
        if let Err(err) = self.events.publish_blocking(e) {
            tracing::error!(error = %err, "could not store an event");
        }
    }

    /// The report of a model.
    pub fn report(&self, model: &str) -> ModelReport {
        let (evaluation, evaluations, drifted, changed_ms, has_reference) =
            match self.models.get(model) {
                Some(md) => {
                    let md = md.lock();
                    (
                        md.latest.clone(),
                        md.evaluations,
                        md.state.drifted.clone(),
                        md.state.changed_ms,
                        md.reference.is_some(),
                    )
                }
                None => (None, 0, Vec::new(), 0, false),
            };
        let mut concept: Vec<ConceptStatus> = self
            .concepts
            .iter()
            .filter(|e| e.key().0 == model)
            .map(|e| {
                let version = e.key().1;
                let c = e.value().lock();
                self.concept_status(model, version, &c)
            })
            .collect();
        concept.sort_by_key(|c| c.version);
        ModelReport {
            evaluation,
            evaluations,
            drifted,
            changed_ms,
            has_reference,
            concept,
        }
    }

    fn registered_baseline(&self, model: &str, version: u32, metric: ConceptMetric) -> Option<f64> {
        self.plane
            .state()
            .registry
            .get(model, &version.to_string())
            .ok()
            .and_then(|v| v.metrics.get(metric.as_str()).copied())
    }

    fn concept_status(&self, model: &str, version: u32, c: &Concept) -> ConceptStatus {
        let metric = c.window.metric;
        let baseline = match self.registered_baseline(model, version, metric) {
            Some(b) => Some((b, "registered metric")),
            None => c.record.baseline.map(|b| (b, "first full window")),
        };
        ConceptStatus {
            version,
            metric,
            baseline,
            current: c.window.current(),
            window: (c.window.size(), c.window.fill()),
            drifted: c.record.drifted,
            quiet_outcomes: c.quiet,
        }
    }

    /// One recorded outcome of `model` version `version` (from the Outcomes service, blocking).
    pub fn observe_outcome(&self, model: &str, version: u32, j: &Judgement) {
        let (metric, x) = match (j.success, j.error) {
            (Some(s), _) => (ConceptMetric::Accuracy, f64::from(u8::from(s))),
            (None, Some(e)) => (ConceptMetric::Mae, e.abs()),
            (None, None) => return,
        };
        let key = (model.to_string(), version);
        // A window made now is refilled from RocksDB, where this outcome already is.
        let (concept, refilled) = match self.concepts.get(&key) {
            Some(c) => (c.clone(), false),
            None => {
                let mut created = false;
                let c = self
                    .concepts
                    .entry(key)
                    .or_insert_with(|| {
                        created = true;
                        Arc::new(Mutex::new(self.load_concept(model, version, metric)))
                    })
                    .clone();
                (c, created)
            }
        };
        let mut c = concept.lock();
        if c.window.metric != metric {
            return; // a version is judged one way; mixed outcomes would make no metric
        }
        if !refilled {
            c.window.push(x);
        }
        let Some(current) = c.window.current() else {
            return;
        };
        let registered = self.registered_baseline(model, version, metric);
        if registered.is_none() && c.record.baseline.is_none() {
            c.record.baseline = Some(current);
            self.save_concept(model, version, &c.record);
        }
        let baseline = registered.or(c.record.baseline).expect("set above");
        let degradation = metric.degradation(baseline, current);
        let mut episode = Episode {
            drifted: c.record.drifted,
            quiet: c.quiet,
        };
        let changed = episode.step(
            self.settings.concept_level(degradation),
            self.settings.concept_exit_outcomes,
        );
        c.quiet = episode.quiet;
        if !changed {
            return;
        }
        let drifted = episode.drifted;
        c.record.drifted = drifted;
        self.save_concept(model, version, &c.record);
        // Published with the version's lock held, so that the next outcome's event cannot
        // overtake this one.
        let mut e = event(
            if drifted {
                "performance_drift_started"
            } else {
                "performance_drift_ended"
            },
            model,
            format!(
                "model '{model}' version {version}: {} {current:.4} against a baseline of {baseline:.4}",
                metric.as_str()
            ),
        );
        e.version = version;
        e.details.insert("metric".into(), metric.as_str().into());
        e.details.insert("current".into(), format!("{current}"));
        e.details.insert("baseline".into(), format!("{baseline}"));
        self.publish(e);
        if drifted {
            self.trigger(model, "performance_drift", Some(version));
        }
    }

    fn load_concept(&self, model: &str, version: u32, metric: ConceptMetric) -> Concept {
        let record: ConceptRecord = self
            .store
            .get_model_state(model, &format!("concept/{version}"))
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut window = ConceptWindow::new(metric, self.settings.concept_window);
        // Refill from the stored outcomes, oldest first, so a restart loses nothing.
        if let Ok(recent) =
            self.store
                .recent_judgements(model, version, self.settings.concept_window)
        {
            for j in recent.iter().rev() {
                match (metric, j.success, j.error) {
                    (ConceptMetric::Accuracy, Some(s), _) => window.push(f64::from(u8::from(s))),
                    (ConceptMetric::Mae, None, Some(e)) => window.push(e.abs()),
                    _ => {}
                }
            }
        }
        Concept {
            window,
            record,
            quiet: 0,
        }
    }

    fn save_concept(&self, model: &str, version: u32, r: &ConceptRecord) {
        if let Err(e) = self
            .store
            .put_model_state(model, &format!("concept/{version}"), r)
        {
            tracing::error!(model, version, error = %e, "could not store the concept-drift state");
        }
    }

    /// Sets a model's retraining policy (synced).
    pub fn set_retrain_policy(
        &self,
        model: &str,
        mut p: RetrainPolicy,
    ) -> Result<RetrainPolicy, StoreError> {
        let mut all = self.retrain.lock();
        if let Some(old) = all.get(model) {
            p.last_trigger_ms = old.last_trigger_ms;
            p.scheduled_version = old.scheduled_version;
        }
        self.store.put_model_state(model, "retrain", &p)?;
        all.insert(model.to_string(), p.clone());
        Ok(p)
    }

    /// A model's retraining policy.
    pub fn retrain_policy(&self, model: &str) -> Option<RetrainPolicy> {
        self.retrain.lock().get(model).cloned()
    }

    /// Fires a retraining trigger if the policy asks for it and the cooldown has passed.
    fn trigger(&self, model: &str, reason: &str, version: Option<u32>) -> bool {
        let now = now_ms();
        let mut all = self.retrain.lock();
        let Some(p) = all.get_mut(model) else {
            return false;
        };
        let wanted = match reason {
            "data_drift" => p.on_data_drift,
            "performance_drift" => p.on_performance_drift,
            _ => true,
        };
        if !wanted || p.last_trigger_ms.is_some_and(|t| now < t + p.cooldown_ms) {
            return false;
        }
        p.last_trigger_ms = Some(now);
        let p = p.clone();
        drop(all);
        if let Err(e) = self.store.put_model_state(model, "retrain", &p) {
            tracing::error!(model, error = %e, "could not store the retraining policy");
        }
        let mut e = event(
            "retrain_triggered",
            model,
            format!("model '{model}' should be retrained: {reason}"),
        );
        e.reason = reason.to_string();
        e.version = version.unwrap_or(0);
        self.publish(e);
        true
    }

    /// Periodic checks: scheduled retraining, experiment significance and sample-ratio mismatch,
    /// shadow agreement. Blocking (reads RocksDB).
    pub fn periodic(&self) {
        // Rows that arrived inside the last evaluation's interval and were never followed by
        // more: evaluate them now.
        for entry in self.models.iter() {
            let mut md = entry.value().lock();
            if md.reference.is_some()
                && md.since_eval >= self.settings.every
                && md
                    .asked
                    .is_none_or(|t| t.elapsed() >= self.settings.min_interval)
            {
                md.since_eval = 0;
                md.asked = Some(std::time::Instant::now());
                let snapshot = md.snapshot();
                let _ = self.eval_tx.try_send((entry.key().clone(), snapshot, None));
            }
        }
        let state = self.plane.state();
        let now = now_ms();
        // Scheduled retraining: the production version is older than max_age.
        let policies: Vec<(String, RetrainPolicy)> = self
            .retrain
            .lock()
            .iter()
            .map(|(m, p)| (m.clone(), p.clone()))
            .collect();
        for (model, p) in policies {
            let (Some(max_age), Ok(v)) = (p.max_age_ms, state.registry.production(&model)) else {
                continue;
            };
            if now.saturating_sub(v.updated_at_ms) > max_age
                && p.scheduled_version != Some(v.version)
            {
                let version = v.version;
                if let Some(p) = self.retrain.lock().get_mut(&model) {
                    p.scheduled_version = Some(version);
                }
                if !self.trigger(&model, "scheduled", Some(version)) {
                    continue;
                }
            }
        }
        // Experiments: significance and sample ratio mismatch, once each.
        for e in state.experiments.all().filter(|e| e.state.is_open()) {
            let names: Vec<&str> = e.variants.iter().map(|v| v.name.as_str()).collect();
            let Ok(counts) = self.store.experiment_counts(&e.name, &names) else {
                continue;
            };
            let r = crate::experiment::results(e, &counts);
            if let Ok(t) = &r.significance {
                if t.p_value < e.alpha && self.raise(format!("sig/{}", e.name)) {
                    let mut ev = event(
                        "experiment_significant",
                        &e.model,
                        format!(
                            "experiment '{}' is significant (p = {:.3e})",
                            e.name, t.p_value
                        ),
                    );
                    ev.experiment = e.name.clone();
                    self.publish(ev);
                }
            }
            if let Ok(t) = &r.srm {
                if t.p_value < crate::experiment::SRM_P && self.raise(format!("srm/{}", e.name)) {
                    let mut ev = event(
                        "experiment_sample_ratio_mismatch",
                        &e.model,
                        format!(
                            "experiment '{}' has a sample ratio mismatch (p = {:.3e}); its results cannot be trusted",
                            e.name, t.p_value
                        ),
                    );
                    ev.experiment = e.name.clone();
                    self.publish(ev);
                }
            }
        }
        // Shadows: agreement below the alert level after enough comparisons.
        for s in state.shadows.all() {
            let Ok(c) = self.store.shadow_counts(&s.model, s.version) else {
                continue;
            };
            if c.compared < 100 {
                continue;
            }
            let rate = c.agreed as f64 / c.compared as f64;
            let key = format!("shadow/{}/{}", s.model, s.version);
            if rate < self.settings.shadow_agreement_alert {
                if self.raise(key) {
                    let mut ev = event(
                        "shadow_agreement_low",
                        &s.model,
                        format!(
                            "shadow version {} of model '{}' agrees with production on {:.1}% of {} comparisons",
                            s.version,
                            s.model,
                            rate * 100.0,
                            c.compared
                        ),
                    );
                    ev.version = s.version;
                    ev.details
                        .insert("agreement_rate".into(), format!("{rate}"));
                    self.publish(ev);
                }
            } else {
                self.raised.lock().remove(&key);
            }
        }
    }

    /// Marks an alert raised; false when it already was.
    fn raise(&self, key: String) -> bool {
        self.raised.lock().insert(key)
    }
}
