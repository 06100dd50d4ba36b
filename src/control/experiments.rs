//! `modelgate.v1.Experiments`: parses requests, applies the experiment rules through the control
//! plane, and turns counters into results. No rules live here.

use crate::convert::experiments::{experiment_to_pb, p_value_only, state_to_pb, statistic};
use crate::convert::registry::version_to_pb;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::records::timestamp_ms;
use super::registry::timestamp;
use super::{experiment_status, ControlError, ControlPlane, Update};
use crate::app::reports;
use crate::experiment::{self, Experiment, ExperimentState, NewExperiment, NewVariant};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::experiments_server::Experiments as ExperimentsApi;
use crate::registry::Stage;

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
                let e = op(&mut s.experiments, &name, self.plane.now_ms())?;
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
                let e = s
                    .experiments
                    .create(new.clone(), &s.registry, self.plane.now_ms())?;
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
                let (e, version) =
                    s.experiments
                        .conclude(&r.name, &r.winner, self.plane.now_ms())?;
                // The promotion goes through the registry and its gate, in the same write.
                let ((v, archived), registry) = s
                    .registry
                    .transition(
                        &e.model,
                        &version.to_string(),
                        Stage::Production,
                        r.force,
                        self.plane.now_ms(),
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
        let (state, tallies) = (self.plane.state(), self.plane.storage().tallies.clone());
        let (e, res) = tokio::task::spawn_blocking(move || {
            reports::experiment_results(&state, &*tallies, &name)
        })
        .await
        .map_err(|e| Status::unavailable(format!("storage: {e}")))?
        .map_err(super::records::report_status)?;
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
            computed_at: Some(timestamp(self.plane.now_ms())),
        }))
    }
}
