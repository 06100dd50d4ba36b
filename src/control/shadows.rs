//! `modelgate.v1.Shadows`: parses requests, applies the shadow rules through the control plane,
//! and turns stored counters into reports.

use crate::convert::shadows::latency;
pub use crate::convert::shadows::shadow_to_pb;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::registry::timestamp;
use super::{ControlPlane, Update};
use crate::app::reports;
use crate::convert::spec::duration_from_pb;
use crate::ids::{ModelName, Version};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::shadows_server::Shadows as ShadowsApi;
use crate::shadow::{Comparison, ShadowSpec};

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

fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field}: required")))
    } else {
        Ok(())
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
        let comparison = r
            .comparison
            .map(Comparison::try_from)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("comparison: {e}")))?;
        let timeout = r
            .timeout
            .as_ref()
            .map(duration_from_pb)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("timeout: {e}")))?;
        let s = self
            .plane
            .update_state(|st| {
                let s = st.shadows.set(
                    &st.registry,
                    &r.model,
                    &r.version,
                    ShadowSpec {
                        sample_fraction: r.sample_fraction,
                        comparison: comparison.clone(),
                        timeout,
                    },
                    self.plane.now_ms(),
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
        let model = ModelName::parse(&r.model, "model")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let version = Version::parse(&r.version, "version")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (state, tallies) = (self.plane.state(), self.plane.storage().tallies.clone());
        let report = tokio::task::spawn_blocking(move || {
            reports::shadow_report(&state, &*tallies, &model, &version, n)
        })
        .await
        .map_err(|e| Status::unavailable(format!("storage: {e}")))?
        .map_err(super::records::report_status)?;
        let (version, counts, lat, recent) = (
            report.version,
            report.counts,
            report.latency,
            report.disagreements,
        );
        let wilson = report.agreement_interval;
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
            agreement_rate: report.agreement_rate,
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
