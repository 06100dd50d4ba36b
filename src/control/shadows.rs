//! `modelgate.v1.Shadows`: parses requests, applies the shadow rules through the control plane,
//! and turns stored counters into reports.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::registry::timestamp;
use super::{now_ms, registry_status, ControlPlane, Update};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::shadows_server::Shadows as ShadowsApi;
use crate::shadow::{Comparison, Shadow, ShadowSpec};
use crate::stats;
use crate::store;

/// The Shadows service.
#[derive(Clone)]
pub struct ShadowService {
    plane: Arc<ControlPlane>,
}

impl ShadowService {
    /// A service over `plane`.
    pub fn new(plane: Arc<ControlPlane>) -> Self {
        ShadowService { plane }
    }
}

fn comparison_from_pb(c: Option<pb::ShadowComparison>) -> Option<Comparison> {
    use pb::shadow_comparison::Kind;
    match c?.kind? {
        Kind::Label(_) => Some(Comparison::Label),
        Kind::Tolerance(t) => Some(Comparison::Tolerance {
            absolute: t.absolute,
            relative: t.relative,
        }),
        Kind::Bytes(_) => Some(Comparison::Bytes),
    }
}

fn comparison_to_pb(c: &Comparison) -> pb::ShadowComparison {
    use pb::shadow_comparison::Kind;
    pb::ShadowComparison {
        kind: Some(match c {
            Comparison::Label => Kind::Label(pb::SameLabel {}),
            Comparison::Tolerance { absolute, relative } => Kind::Tolerance(pb::WithinTolerance {
                absolute: *absolute,
                relative: *relative,
            }),
            Comparison::Bytes => Kind::Bytes(pb::SameBytes {}),
        }),
    }
}

fn duration_pb(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Converts a shadow.
pub fn shadow_to_pb(s: &Shadow) -> pb::Shadow {
    pb::Shadow {
        model: s.model.clone(),
        version: s.version,
        sample_fraction: s.sample_fraction,
        comparison: Some(comparison_to_pb(&s.comparison)),
        timeout: Some(duration_pb(s.timeout_ms)),
        created_at: Some(timestamp(s.created_at_ms)),
    }
}

fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field}: required")))
    } else {
        Ok(())
    }
}

fn latency(h: Option<&hdrhistogram::Histogram<u64>>) -> pb::LatencySummary {
    match h.filter(|h| !h.is_empty()) {
        Some(h) => pb::LatencySummary {
            count: h.len(),
            p50_ms: Some(h.value_at_quantile(0.5) as f64 / 1000.0),
            p99_ms: Some(h.value_at_quantile(0.99) as f64 / 1000.0),
        },
        None => pb::LatencySummary::default(),
    }
}

#[tonic::async_trait]
impl ShadowsApi for ShadowService {
    async fn set_shadow(
        &self,
        request: Request<pb::SetShadowRequest>,
    ) -> Result<Response<pb::Shadow>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        required("version", &r.version)?;
        if r.comparison.as_ref().is_some_and(|c| c.kind.is_none()) {
            return Err(Status::invalid_argument(
                "comparison: set one of label, tolerance, bytes (or leave it unset for label)",
            ));
        }
        let timeout = match r.timeout {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument("timeout: must not be negative"))
            }
            Some(d) => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
        };
        let comparison = comparison_from_pb(r.comparison);
        let s = self
            .plane
            .update_state(|st| {
                let s = st.shadows.set(
                    &st.registry,
                    &r.model,
                    &r.version,
                    ShadowSpec {
                        sample_fraction: r.sample_fraction,
                        comparison,
                        timeout,
                    },
                    now_ms(),
                )?;
                Ok((
                    s.clone(),
                    Update {
                        put_shadows: vec![s],
                        ..Default::default()
                    },
                ))
            })
            .await?;
        tracing::info!(model = %s.model, version = s.version, fraction = s.sample_fraction, "shadow set");
        Ok(Response::new(shadow_to_pb(&s)))
    }

    async fn remove_shadow(
        &self,
        request: Request<pb::RemoveShadowRequest>,
    ) -> Result<Response<pb::Shadow>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        required("version", &r.version)?;
        let s = self
            .plane
            .update_state(|st| {
                let s = st.shadows.remove(&st.registry, &r.model, &r.version)?;
                Ok((
                    s.clone(),
                    Update {
                        delete_shadows: vec![(s.model.clone(), s.version)],
                        ..Default::default()
                    },
                ))
            })
            .await?;
        tracing::info!(model = %s.model, version = s.version, "shadow removed");
        Ok(Response::new(shadow_to_pb(&s)))
    }

    async fn list_shadows(
        &self,
        request: Request<pb::ListShadowsRequest>,
    ) -> Result<Response<pb::ListShadowsResponse>, Status> {
        let model = request.into_inner().model;
        let state = self.plane.state();
        Ok(Response::new(pb::ListShadowsResponse {
            shadows: state
                .shadows
                .all()
                .filter(|s| model.is_empty() || s.model == model)
                .map(shadow_to_pb)
                .collect(),
        }))
    }

    async fn get_shadow_report(
        &self,
        request: Request<pb::GetShadowReportRequest>,
    ) -> Result<Response<pb::ShadowReport>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        required("version", &r.version)?;
        let n = match r.disagreements {
            0 => 20,
            n if n > 1000 => {
                return Err(Status::invalid_argument(format!(
                    "disagreements: {n} is above 1000"
                )))
            }
            n => n as usize,
        };
        let version = self
            .plane
            .state()
            .registry
            .resolve(&r.model, &r.version)
            .map_err(registry_status)?;
        let store = self.plane.store().clone();
        let model = r.model.clone();
        let (counts, lat, recent) = store::blocking(move || {
            Ok((
                store.shadow_counts(&model, version)?,
                store.shadow_latency(&model, version)?,
                store.recent_disagreements(&model, version, n)?,
            ))
        })
        .await
        .map_err(|e| Status::unavailable(format!("storage: {e}")))?;
        let wilson = stats::wilson_95(counts.agreed, counts.compared).ok();
        Ok(Response::new(pb::ShadowReport {
            model: r.model,
            version,
            mirrored: counts.mirrored,
            skipped: counts.skipped,
            dropped: counts.dropped,
            errors: counts.errors.into_iter().collect(),
            timeouts: counts.timeouts,
            suppressed: counts.suppressed,
            compared: counts.compared,
            agreed: counts.agreed,
            agreement_rate: (counts.compared > 0)
                .then(|| counts.agreed as f64 / counts.compared as f64),
            ci_low: wilson.map(|w| w.0),
            ci_high: wilson.map(|w| w.1),
            production_latency: Some(latency(lat.as_ref().map(|l| &l.production))),
            shadow_latency: Some(latency(lat.as_ref().map(|l| &l.shadow))),
            disagreements: recent
                .into_iter()
                .map(|d| pb::Disagreement {
                    request_id: d.request_id,
                    time: Some(timestamp(d.time_ms)),
                    row: d.row,
                    production: d.production,
                    shadow: d.shadow,
                })
                .collect(),
        }))
    }
}
