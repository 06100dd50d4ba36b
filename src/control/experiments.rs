//! `modelgate.v1.Experiments`: parses requests, applies the experiment rules through the control
//! plane, and turns counters into results. No rules live here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::records::timestamp_ms;
use super::registry::{timestamp, version_to_pb};
use super::{experiment_status, now_ms, ControlError, ControlPlane, Update};
use crate::experiment::{self, Experiment, ExperimentState, NewExperiment, NewVariant};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::experiments_server::Experiments as ExperimentsApi;
use crate::registry::Stage;
use crate::stats::{TestResult, Unavailable};
use crate::store;

/// The Experiments service.
#[derive(Clone)]
pub struct ExperimentService {
    plane: Arc<ControlPlane>,
}

impl ExperimentService {
    /// A service over `plane`.
    pub fn new(plane: Arc<ControlPlane>) -> Self {
        ExperimentService { plane }
    }

    async fn publish(&self, e: &Experiment, kind: &str) {
        self.plane
            .publish(crate::events::experiment_event(kind, e))
            .await;
    }

    async fn change(
        &self,
        name: String,
        op: fn(
            &mut experiment::Experiments,
            &str,
            u64,
        ) -> Result<Experiment, experiment::ExperimentError>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let e = self
            .plane
            .update_state(|s| {
                let e = op(&mut s.experiments, &name, now_ms())?;
                Ok((
                    e.clone(),
                    Update {
                        experiments: vec![e],
                        ..Default::default()
                    },
                ))
            })
            .await?;
        tracing::info!(experiment = %e.name, state = e.state.as_str(), "experiment state changed");
        if e.state == ExperimentState::Stopped {
            self.publish(&e, "experiment_stopped").await;
        }
        Ok(Response::new(experiment_to_pb(&e)))
    }
}

fn state_to_pb(s: &ExperimentState) -> pb::ExperimentState {
    match s {
        ExperimentState::Running => pb::ExperimentState::Running,
        ExperimentState::Paused => pb::ExperimentState::Paused,
        ExperimentState::Stopped => pb::ExperimentState::Stopped,
        ExperimentState::Concluded { .. } => pb::ExperimentState::Concluded,
    }
}

/// Converts an experiment.
pub fn experiment_to_pb(e: &Experiment) -> pb::Experiment {
    let total: f64 = e.variants.iter().map(|v| v.weight).sum();
    pb::Experiment {
        name: e.name.clone(),
        model: e.model.clone(),
        variants: e
            .variants
            .iter()
            .map(|v| pb::ExperimentVariant {
                name: v.name.clone(),
                version: v.version,
                weight: v.weight,
                share: v.weight / total,
            })
            .collect(),
        unit_key: e.unit_key.clone(),
        salt: e.salt.clone(),
        coverage: e.coverage,
        alpha: e.alpha,
        start: e.start_ms.map(timestamp),
        end: e.end_ms.map(timestamp),
        state: state_to_pb(&e.state) as i32,
        winner: match &e.state {
            ExperimentState::Concluded { winner } => winner.clone(),
            _ => String::new(),
        },
        created_at: Some(timestamp(e.created_at_ms)),
        updated_at: Some(timestamp(e.updated_at_ms)),
    }
}

/// A test result for the API: numbers, or the reason they are absent — never NaN.
fn statistic(test: &str, r: &Result<TestResult, Unavailable>, alpha: f64) -> pb::TestStatistic {
    match r {
        Ok(t) if t.statistic.is_finite() && t.p_value.is_finite() => pb::TestStatistic {
            test: test.into(),
            statistic: Some(t.statistic),
            dof: Some(t.dof),
            p_value: Some(t.p_value),
            significant: t.p_value < alpha,
            unavailable_reason: String::new(),
        },
        Ok(_) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: "not a finite number for this data".into(),
            ..Default::default()
        },
        Err(e) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: e.0.clone(),
            ..Default::default()
        },
    }
}

/// A test that yields only a p-value (the always-valid one).
fn p_value_only(test: &str, r: &Result<f64, Unavailable>, alpha: f64) -> pb::TestStatistic {
    match r {
        Ok(p) if p.is_finite() => pb::TestStatistic {
            test: test.into(),
            p_value: Some(*p),
            significant: *p < alpha,
            ..Default::default()
        },
        Ok(_) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: "not a finite number for this data".into(),
            ..Default::default()
        },
        Err(e) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: e.0.clone(),
            ..Default::default()
        },
    }
}

fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite())
}

#[tonic::async_trait]
impl ExperimentsApi for ExperimentService {
    async fn create_experiment(
        &self,
        request: Request<pb::CreateExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let r = request.into_inner();
        let new = NewExperiment {
            name: r.name,
            model: r.model,
            variants: r
                .variants
                .into_iter()
                .map(|v| NewVariant {
                    name: v.name,
                    version: v.version,
                    weight: v.weight,
                })
                .collect(),
            unit_key: r.unit_key,
            salt: r.salt,
            coverage: r.coverage,
            alpha: r.alpha,
            start_ms: r
                .start
                .as_ref()
                .map(|t| timestamp_ms(t, "start"))
                .transpose()?,
            end_ms: r.end.as_ref().map(|t| timestamp_ms(t, "end")).transpose()?,
        };
        let e = self
            .plane
            .update_state(|s| {
                let e = s.experiments.create(new, &s.registry, now_ms())?;
                Ok((
                    e.clone(),
                    Update {
                        experiments: vec![e],
                        ..Default::default()
                    },
                ))
            })
            .await?;
        tracing::info!(experiment = %e.name, model = %e.model, variants = e.variants.len(), "experiment created");
        self.publish(&e, "experiment_created").await;
        Ok(Response::new(experiment_to_pb(&e)))
    }

    async fn get_experiment(
        &self,
        request: Request<pb::ExperimentRef>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let name = request.into_inner().name;
        let state = self.plane.state();
        let e = state.experiments.get(&name).map_err(experiment_status)?;
        Ok(Response::new(experiment_to_pb(e)))
    }

    async fn list_experiments(
        &self,
        request: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        let model = request.into_inner().model;
        let state = self.plane.state();
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments: state
                .experiments
                .all()
                .filter(|e| model.is_empty() || e.model == model)
                .map(experiment_to_pb)
                .collect(),
        }))
    }

    async fn pause_experiment(
        &self,
        request: Request<pb::ExperimentRef>,
    ) -> Result<Response<pb::Experiment>, Status> {
        self.change(request.into_inner().name, experiment::Experiments::pause)
            .await
    }

    async fn resume_experiment(
        &self,
        request: Request<pb::ExperimentRef>,
    ) -> Result<Response<pb::Experiment>, Status> {
        self.change(request.into_inner().name, experiment::Experiments::resume)
            .await
    }

    async fn stop_experiment(
        &self,
        request: Request<pb::ExperimentRef>,
    ) -> Result<Response<pb::Experiment>, Status> {
        self.change(request.into_inner().name, experiment::Experiments::stop)
            .await
    }

    async fn conclude_experiment(
        &self,
        request: Request<pb::ConcludeExperimentRequest>,
    ) -> Result<Response<pb::ConcludeExperimentResponse>, Status> {
        let r = request.into_inner();
        if r.winner.is_empty() {
            return Err(Status::invalid_argument(
                "winner: required (a variant name)",
            ));
        }
        let (e, promoted, archived) = self
            .plane
            .update_state(|s| {
                let (e, version) = s.experiments.conclude(&r.name, &r.winner, now_ms())?;
                // The promotion goes through the registry and its gate, in the same write.
                let ((v, archived), registry) = s
                    .registry
                    .transition(
                        &e.model,
                        &version.to_string(),
                        Stage::Production,
                        r.force,
                        now_ms(),
                    )
                    .map_err(ControlError::from)?;
                Ok((
                    (e.clone(), v, archived),
                    Update {
                        registry,
                        experiments: vec![e],
                        ..Default::default()
                    },
                ))
            })
            .await?;
        tracing::info!(experiment = %e.name, winner = %r.winner, version = promoted.version, "experiment concluded");
        self.publish(&e, "experiment_concluded").await;
        super::registry::publish_transition(&self.plane, &promoted, &archived).await;
        let state = self.plane.state();
        let aliases = |v: &crate::registry::ModelVersion| {
            state
                .registry
                .model(&v.model)
                .map(|m| m.aliases_of(v.version))
                .unwrap_or_default()
        };
        Ok(Response::new(pb::ConcludeExperimentResponse {
            experiment: Some(experiment_to_pb(&e)),
            promoted: Some(version_to_pb(&promoted, aliases(&promoted))),
            archived: archived
                .iter()
                .map(|a| version_to_pb(a, aliases(a)))
                .collect(),
        }))
    }

    async fn get_experiment_results(
        &self,
        request: Request<pb::ExperimentRef>,
    ) -> Result<Response<pb::ExperimentResults>, Status> {
        let name = request.into_inner().name;
        let e = self
            .plane
            .state()
            .experiments
            .get(&name)
            .map_err(experiment_status)?
            .clone();
        let store = self.plane.store().clone();
        let names: Vec<String> = e.variants.iter().map(|v| v.name.clone()).collect();
        let exp_name = e.name.clone();
        let counts = store::blocking(move || {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            store.experiment_counts(&exp_name, &refs)
        })
        .await
        .map_err(|e| Status::unavailable(format!("storage: {e}")))?;
        let res = experiment::results(&e, &counts);
        let control = e.variants[0].name.clone();
        let compare = |list: Vec<(String, pb::TestStatistic)>| {
            list.into_iter()
                .map(|(variant, test)| pb::VariantComparison {
                    variant,
                    control: control.clone(),
                    test: Some(test),
                })
                .collect()
        };
        let mut srm = statistic("chisquare", &res.srm, experiment::SRM_P);
        // A mismatch is flagged below p = 0.001, whatever the experiment's alpha.
        srm.significant = srm.p_value.is_some_and(|p| p < experiment::SRM_P);
        Ok(Response::new(pb::ExperimentResults {
            experiment: e.name.clone(),
            model: e.model.clone(),
            state: state_to_pb(&e.state) as i32,
            alpha: e.alpha,
            variants: res
                .variants
                .iter()
                .zip(&e.variants)
                .map(|(v, spec)| pb::VariantResults {
                    name: v.name.clone(),
                    version: v.version,
                    weight: spec.weight,
                    requests: v.counts.requests,
                    units: v.counts.units,
                    outcomes: v.counts.outcomes,
                    judged: v.counts.judged,
                    successes: v.counts.successes,
                    success_rate: finite(v.success_rate),
                    ci_low: v.wilson.as_ref().ok().map(|w| w.0),
                    ci_high: v.wilson.as_ref().ok().map(|w| w.1),
                    numeric_outcomes: v.counts.numeric.n,
                    mean: finite((v.counts.numeric.n > 0).then_some(v.counts.numeric.mean)),
                    stddev: finite(v.counts.numeric.variance().map(f64::sqrt)),
                })
                .collect(),
            significance: Some(statistic("chi2_contingency", &res.significance, e.alpha)),
            numeric: compare(
                res.numeric
                    .iter()
                    .map(|(v, r)| (v.clone(), statistic("welch_t", r, e.alpha)))
                    .collect(),
            ),
            sample_ratio_mismatch: Some(srm),
            always_valid: compare(
                res.always_valid
                    .iter()
                    .map(|(v, r)| (v.clone(), p_value_only("msprt", r, e.alpha)))
                    .collect(),
            ),
            computed_at: Some(timestamp(now_ms())),
        }))
    }
}
