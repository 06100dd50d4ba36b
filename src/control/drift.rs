//! `modelgate.v1.Drift`: references, drift reports and retraining policies, over the monitor.

use crate::convert::drift::summary;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::registry::timestamp;
use super::{registry_status, ControlPlane};
use crate::convert::spec::{duration_from_pb, duration_to_pb};
use crate::drift::{self};
use crate::monitor::{Monitor, RetrainPolicy};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::drift_server::Drift;
use crate::recorder::Recorder;
use crate::store::records::feature_value_from_pb;

/// How long an on-demand evaluation waits for the rows already answered to reach the windows
/// (they are with the record writer, which a RocksDB stall can hold up); then it evaluates what
/// has arrived.
pub const EVALUATE_ROWS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Drift service.
#[derive(Clone)]
pub struct DriftService {
    plane: Arc<ControlPlane>,
    monitor: Arc<Monitor>,
    recorder: Option<Arc<Recorder>>,
}

impl DriftService {
    /// A service over `monitor`.
    pub fn new(plane: Arc<ControlPlane>, monitor: Arc<Monitor>) -> Self {
        DriftService {
            plane,
            monitor,
            recorder: None,
        }
    }

    /// The record writer that feeds the monitor: an on-demand evaluation waits for it to write
    /// what it was handed before.
    pub fn with_recorder(mut self, recorder: Arc<Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    fn known_model(&self, model: &str) -> Result<(), Status> {
        crate::registry::validate_model_name(model, "model").map_err(registry_status)?;
        self.plane
            .state()
            .registry
            .model(model)
            .map(|_| ())
            .map_err(registry_status)
    }

    fn summary(&self, model: &str) -> Result<pb::ReferenceSummary, Status> {
        let (reference, capturing) = self.monitor.reference(model);
        let mut s = match (&reference, capturing) {
            (Some(r), _) => summary(model, r),
            (None, Some(_)) => pb::ReferenceSummary {
                model: model.to_string(),
                ..Default::default()
            },
            (None, None) => {
                return Err(Status::not_found(format!(
                    "model '{model}' has no drift reference; upload one with SetReference or take one with CaptureReference"
                )))
            }
        };
        if let Some((remaining, received)) = capturing {
            s.source = "capturing".into();
            s.capture_remaining = remaining as u64;
            s.received = received;
        }
        Ok(s)
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn duration_ms(d: &prost_types::Duration, field: &str) -> Result<u64, Status> {
    duration_from_pb(d)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn duration_pb(ms: u64) -> prost_types::Duration {
    duration_to_pb(Duration::from_millis(ms))
}

fn policy_to_pb(model: &str, p: &RetrainPolicy) -> pb::RetrainPolicy {
    pb::RetrainPolicy {
        model: model.to_string(),
        on_data_drift: p.on_data_drift,
        on_performance_drift: p.on_performance_drift,
        max_age: p.max_age_ms.map(duration_pb),
        cooldown: Some(duration_pb(p.cooldown_ms)),
    }
}

#[tonic::async_trait]
impl Drift for DriftService {
    async fn set_reference(
        &self,
        request: Request<pb::SetReferenceRequest>,
    ) -> Result<Response<pb::ReferenceSummary>, Status> {
        let r = request.into_inner();
        self.known_model(&r.model)?;
        let rows = r
            .rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                row.values
                    .into_iter()
                    .map(|v| {
                        feature_value_from_pb(v).ok_or_else(|| {
                            Status::invalid_argument(format!("rows[{i}]: a value is empty"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let max = self.monitor.settings().reference_max;
        let reference = drift::build_reference(
            &r.feature_names,
            rows,
            &r.categorical_features,
            max,
            "uploaded",
            self.plane.now_ms(),
        )
        .map_err(Status::invalid_argument)?;
        let monitor = self.monitor.clone();
        let model = r.model.clone();
        let reference =
            tokio::task::spawn_blocking(move || monitor.set_reference(&model, reference))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::unavailable(format!("storage: {e}")))?;
        tracing::info!(model = %r.model, rows = reference.rows, sampled = reference.sampled, "drift reference set");
        Ok(Response::new(summary(&r.model, &reference)))
    }

    async fn capture_reference(
        &self,
        request: Request<pb::CaptureReferenceRequest>,
    ) -> Result<Response<pb::ReferenceSummary>, Status> {
        let r = request.into_inner();
        self.known_model(&r.model)?;
        let max = self.monitor.settings().reference_max;
        if r.rows == 0 || r.rows as usize > max {
            return Err(Status::invalid_argument(format!(
                "rows: {} is outside 1..={max} (--drift-reference-max)",
                r.rows
            )));
        }
        self.monitor.capture(&r.model, r.rows as usize);
        Ok(Response::new(self.summary(&r.model)?))
    }

    async fn get_reference(
        &self,
        request: Request<pb::GetReferenceRequest>,
    ) -> Result<Response<pb::ReferenceSummary>, Status> {
        let r = request.into_inner();
        self.known_model(&r.model)?;
        Ok(Response::new(self.summary(&r.model)?))
    }

    async fn get_drift_report(
        &self,
        request: Request<pb::GetDriftReportRequest>,
    ) -> Result<Response<pb::DriftReport>, Status> {
        let r = request.into_inner();
        self.known_model(&r.model)?;
        if r.evaluate {
            let monitor = self.monitor.clone();
            let recorder = self.recorder.clone();
            let model = r.model.clone();
            tokio::task::spawn_blocking(move || {
                // Every row answered before this call was handed to the writer before its caller
                // saw the answer: once the writer has written it, the windows hold it.
                if let Some(recorder) = recorder {
                    if !recorder.flush_within_blocking(EVALUATE_ROWS_WAIT) {
                        tracing::warn!(model = %model, "evaluating before the record writer caught up");
                    }
                }
                monitor.evaluate_now(&model)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        }
        let rep = self.monitor.report(&r.model);
        let status = if !rep.has_reference {
            "no reference yet: SetReference or CaptureReference"
        } else if rep.evaluation.is_none() {
            "not evaluated yet"
        } else {
            ""
        };
        let features = rep
            .evaluation
            .as_ref()
            .map(|e| {
                e.features
                    .iter()
                    .map(|f| {
                        let (test, statistic, p_value, psi, wasserstein, reason) = match &f.result {
                            Ok(d) => (
                                d.test,
                                finite(d.statistic),
                                finite(d.p_value),
                                finite(d.psi),
                                d.wasserstein.and_then(finite),
                                String::new(),
                            ),
                            Err(u) => (
                                if f.categorical {
                                    "chi2_contingency"
                                } else {
                                    "ks_2samp"
                                },
                                None,
                                None,
                                None,
                                None,
                                u.0.clone(),
                            ),
                        };
                        pb::FeatureDriftResult {
                            name: f.name.clone(),
                            categorical: f.categorical,
                            reference_size: f.reference_size,
                            window_size: f.window_size,
                            non_finite: f.non_finite,
                            test: test.to_string(),
                            statistic,
                            p_value,
                            adjusted_p_value: f.adjusted.and_then(finite),
                            psi,
                            wasserstein,
                            drifted: f.drifted,
                            unavailable_reason: reason,
                            quiet_evaluations: f.quiet_evaluations,
                            precision: f.precision.as_str().to_string(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let settings = self.monitor.settings();
        let (threshold, exit) = (settings.concept_threshold, settings.concept_exit_threshold);
        Ok(Response::new(pb::DriftReport {
            model: r.model,
            features,
            drifted: !rep.drifted.is_empty(),
            false_discovery_rate: settings.fdr,
            drift_exit_p_value: settings.exit_p_value,
            drift_exit_evaluations: settings.exit_evaluations,
            evaluations: rep.evaluations,
            evaluated_at: rep.evaluation.as_ref().map(|e| timestamp(e.at_ms)),
            state_changed_at: (rep.changed_ms > 0).then(|| timestamp(rep.changed_ms)),
            concept: rep
                .concept
                .iter()
                .map(|c| {
                    let degradation = match (c.baseline, c.current) {
                        (Some((b, _)), Some(cur)) => finite(c.metric.degradation(b, cur)),
                        _ => None,
                    };
                    pb::ConceptDrift {
                        version: c.version,
                        metric: c.metric.as_str().to_string(),
                        baseline: c.baseline.map(|b| b.0),
                        baseline_source: c.baseline.map(|b| b.1.to_string()).unwrap_or_default(),
                        current: c.current,
                        degradation,
                        window: c.window.0 as u32,
                        window_fill: c.window.1 as u32,
                        drifted: c.drifted,
                        quiet_outcomes: c.quiet_outcomes,
                        exit_degradation: exit,
                        status: if c.current.is_none() {
                            "insufficient data".into()
                        } else if c.drifted {
                            format!(
                                "drifting: degraded by more than {threshold}, until at most {exit} for {} outcomes in a row",
                                settings.concept_exit_outcomes
                            )
                        } else {
                            "ok".into()
                        },
                    }
                })
                .collect(),
            status: status.into(),
        }))
    }

    async fn set_retrain_policy(
        &self,
        request: Request<pb::RetrainPolicy>,
    ) -> Result<Response<pb::RetrainPolicy>, Status> {
        let r = request.into_inner();
        self.known_model(&r.model)?;
        let max_age_ms = r
            .max_age
            .as_ref()
            .map(|d| duration_ms(d, "max_age"))
            .transpose()?;
        if max_age_ms == Some(0) {
            return Err(Status::invalid_argument(
                "max_age: must be positive (or unset)",
            ));
        }
        let cooldown_ms = match &r.cooldown {
            Some(d) => duration_ms(d, "cooldown")?,
            None => crate::monitor::DEFAULT_RETRAIN_COOLDOWN_MS,
        };
        let policy = RetrainPolicy {
            on_data_drift: r.on_data_drift,
            on_performance_drift: r.on_performance_drift,
            max_age_ms,
            cooldown_ms,
            ..Default::default()
        };
        let monitor = self.monitor.clone();
        let model = r.model.clone();
        let p = tokio::task::spawn_blocking(move || monitor.set_retrain_policy(&model, policy))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("storage: {e}")))?;
        Ok(Response::new(policy_to_pb(&r.model, &p)))
    }

    async fn get_retrain_policy(
        &self,
        request: Request<pb::GetRetrainPolicyRequest>,
    ) -> Result<Response<pb::RetrainPolicy>, Status> {
        let r = request.into_inner();
        self.known_model(&r.model)?;
        let p = self.monitor.retrain_policy(&r.model).unwrap_or_default();
        Ok(Response::new(policy_to_pb(&r.model, &p)))
    }
}
