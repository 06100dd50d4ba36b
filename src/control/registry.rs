//! `modelgate.v1.Registry`: parses requests, calls the registry through the control plane and
//! maps answers and errors. No rules live here.

use crate::convert::registry::policy_to_pb;
pub use crate::convert::registry::{stage_to_pb, version_to_pb};
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::{registry_status, ControlPlane, Update};
use crate::experiment::ExperimentError;
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::registry_server::Registry as RegistryApi;
use crate::registry::{self as reg, NewVersion, PredictionSpec, PromotionPolicy, Stage};

/// The Registry service.
#[derive(Clone)]
pub struct RegistryService {
    plane: Arc<ControlPlane>,
}

impl RegistryService {
    /// A service over `plane`.
    pub fn new(plane: Arc<ControlPlane>) -> Self {
        RegistryService { plane }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        Err(invalid(field, "required"))
    } else {
        Ok(())
    }
}

fn stage_from_pb(raw: i32, field: &'static str) -> Result<Option<Stage>, Status> {
    crate::convert::registry::stage_from_pb(raw, field).map_err(|(f, e)| invalid(f, e))
}

fn feature_names_from_pb(
    list: Vec<pb::InputFeatureNames>,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, Status> {
    crate::convert::registry::feature_names_from_pb(list).map_err(|(f, e)| invalid(f, e))
}

/// An event about a version.
pub fn version_event(kind: &str, v: &reg::ModelVersion, message: String) -> pb::Event {
    let mut e = crate::events::event(kind, &v.model, message);
    e.version = v.version;
    e
}

/// The events of a stage transition: the version promoted (or archived), and the versions a
/// promotion archived.
pub async fn publish_transition(
    plane: &ControlPlane,
    v: &reg::ModelVersion,
    archived: &[reg::ModelVersion],
) {
    let kind = match v.stage {
        Stage::Production => Some("version_promoted"),
        Stage::Archived => Some("version_archived"),
        Stage::Staging => None,
    };
    if let Some(kind) = kind {
        plane
            .publish(version_event(
                kind,
                v,
                format!(
                    "model '{}' version {} is now {}",
                    v.model,
                    v.version,
                    v.stage.as_str()
                ),
            ))
            .await;
    }
    for a in archived {
        plane
            .publish(version_event(
                "version_archived",
                a,
                format!(
                    "model '{}' version {} archived (version {} promoted)",
                    a.model, a.version, v.version
                ),
            ))
            .await;
    }
}

/// Converts Unix milliseconds to a protobuf timestamp.
pub use crate::pb::timestamp;

/// The local file an artifact URI names, if it is a local path or `file://` URI.
fn local_artifact_path(uri: &str) -> Option<PathBuf> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    if uri.contains("://") || uri.is_empty() {
        return None;
    }
    Some(PathBuf::from(uri))
}

/// SHA-256 of a readable regular file, or `None` when it is not readable here (the artifact may
/// live in the model server's container, not ours).
fn hash_file(path: &std::path::Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(hex::encode(h.finalize()))
}

impl RegistryService {
    fn pb_version(&self, v: &reg::ModelVersion) -> pb::ModelVersion {
        let state = self.plane.state();
        let r = &state.registry;
        let aliases = r
            .model(&v.model)
            .map(|m| m.aliases_of(v.version))
            .unwrap_or_default();
        version_to_pb(v, aliases)
    }
}

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    async fn register_model_version(
        &self,
        request: Request<pb::RegisterModelVersionRequest>,
    ) -> Result<Response<pb::RegisterModelVersionResponse>, Status> {
        let r = request.into_inner();
        reg::validate_model_name(&r.model, "model").map_err(registry_status)?;
        let prediction = r
            .prediction
            .map(PredictionSpec::try_from)
            .transpose()
            .map_err(|e| invalid("prediction", e))?;
        let mut sha = r.artifact_sha256.trim().to_string();
        if !sha.is_empty() {
            sha = reg::normalize_sha256(&sha).map_err(registry_status)?;
        }
        let mut verified = false;
        if let Some(path) = local_artifact_path(&r.artifact_uri) {
            let p = path.clone();
            let computed = tokio::task::spawn_blocking(move || hash_file(&p))
                .await
                .map_err(|e| Status::internal(format!("hashing the artifact failed: {e}")))?;
            if let Some(computed) = computed {
                if !sha.is_empty() && sha != computed {
                    return Err(invalid(
                        "artifact_sha256",
                        format!("given {sha}, but {} hashes to {computed}", path.display()),
                    ));
                }
                sha = computed;
                verified = true;
            }
        }
        let new = NewVersion {
            model: r.model,
            endpoint: r.endpoint,
            backend_model: r.backend_model,
            backend_version: r.backend_version,
            backend_protocol: crate::convert::registry::backend_protocol_from_pb(
                r.backend_protocol,
            )
            .map_err(|e| invalid("backend_protocol", e))?,
            artifact_uri: r.artifact_uri,
            artifact_sha256: sha,
            artifact_sha256_verified: verified,
            metrics: r.metrics.into_iter().collect(),
            tags: r.tags.into_iter().collect(),
            description: r.description,
            prediction,
            feature_names: feature_names_from_pb(r.feature_names)?,
        };
        let v = self
            .plane
            .update(|reg| reg.register(new.clone(), self.plane.now_ms()))
            .await?;
        tracing::info!(model = %v.model, version = v.version, endpoint = %v.endpoint, "registered model version");
        self.plane
            .publish(version_event(
                "version_registered",
                &v,
                format!(
                    "model '{}' version {} registered ({})",
                    v.model, v.version, v.endpoint
                ),
            ))
            .await;
        Ok(Response::new(pb::RegisterModelVersionResponse {
            version: Some(version_to_pb(&v, vec![])),
        }))
    }

    async fn get_model_version(
        &self,
        request: Request<pb::GetModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        let state = self.plane.state();
        let registry = &state.registry;
        let v = registry
            .get(&r.model, &r.version)
            .map_err(registry_status)?;
        Ok(Response::new(self.pb_version(v)))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let state = self.plane.state();
        let registry = &state.registry;
        let models = registry
            .models()
            .map(|m| pb::ModelSummary {
                model: m.meta.name.clone(),
                version_count: m.versions.len() as u32,
                production_version: m.production().map(|v| v.version).unwrap_or(0),
                latest_version: m.versions.keys().next_back().copied().unwrap_or(0),
                aliases: m.meta.aliases.clone().into_iter().collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn list_model_versions(
        &self,
        request: Request<pb::ListModelVersionsRequest>,
    ) -> Result<Response<pb::ListModelVersionsResponse>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        let stage = stage_from_pb(r.stage, "stage")?;
        let state = self.plane.state();
        let registry = &state.registry;
        let versions = registry
            .versions(&r.model, stage)
            .map_err(registry_status)?
            .into_iter()
            .map(|v| self.pb_version(v))
            .collect();
        Ok(Response::new(pb::ListModelVersionsResponse { versions }))
    }

    async fn get_production_version(
        &self,
        request: Request<pb::GetProductionVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        let state = self.plane.state();
        let registry = &state.registry;
        let v = registry.production(&r.model).map_err(registry_status)?;
        Ok(Response::new(self.pb_version(v)))
    }

    async fn transition_stage(
        &self,
        request: Request<pb::TransitionStageRequest>,
    ) -> Result<Response<pb::TransitionStageResponse>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        required("version", &r.version)?;
        let stage = stage_from_pb(r.stage, "stage")?.ok_or_else(|| {
            invalid(
                "stage",
                "required: STAGE_STAGING, STAGE_PRODUCTION or STAGE_ARCHIVED",
            )
        })?;
        let (v, archived) = self
            .plane
            .update(|reg| reg.transition(&r.model, &r.version, stage, r.force, self.plane.now_ms()))
            .await?;
        tracing::info!(model = %v.model, version = v.version, stage = stage.as_str(), force = r.force, "stage transition");
        publish_transition(&self.plane, &v, &archived).await;
        Ok(Response::new(pb::TransitionStageResponse {
            version: Some(self.pb_version(&v)),
            archived: archived.iter().map(|a| self.pb_version(a)).collect(),
        }))
    }

    async fn set_alias(
        &self,
        request: Request<pb::SetAliasRequest>,
    ) -> Result<Response<pb::SetAliasResponse>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        let (version, previous) = self
            .plane
            .update(|reg| reg.set_alias(&r.model, &r.alias, &r.version))
            .await?;
        Ok(Response::new(pb::SetAliasResponse {
            alias: r.alias,
            version,
            previous_version: previous.unwrap_or(0),
        }))
    }

    async fn delete_alias(
        &self,
        request: Request<pb::DeleteAliasRequest>,
    ) -> Result<Response<pb::DeleteAliasResponse>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        let version = self
            .plane
            .update(|reg| reg.delete_alias(&r.model, &r.alias))
            .await?;
        Ok(Response::new(pb::DeleteAliasResponse { version }))
    }

    async fn set_promotion_policy(
        &self,
        request: Request<pb::SetPromotionPolicyRequest>,
    ) -> Result<Response<pb::PromotionPolicy>, Status> {
        let r = request.into_inner();
        let policy = PromotionPolicy {
            minimum: r.minimum_metrics.into_iter().collect(),
            maximum: r.maximum_metrics.into_iter().collect(),
        };
        let p = self
            .plane
            .update(|reg| reg.set_policy(&r.model, policy.clone()))
            .await?;
        Ok(Response::new(policy_to_pb(&r.model, &p)))
    }

    async fn get_promotion_policy(
        &self,
        request: Request<pb::GetPromotionPolicyRequest>,
    ) -> Result<Response<pb::PromotionPolicy>, Status> {
        let r = request.into_inner();
        reg::validate_model_name(&r.model, "model").map_err(registry_status)?;
        let p = self.plane.state().registry.policy(&r.model);
        Ok(Response::new(policy_to_pb(&r.model, &p)))
    }

    async fn delete_model_version(
        &self,
        request: Request<pb::DeleteModelVersionRequest>,
    ) -> Result<Response<pb::DeleteModelVersionResponse>, Status> {
        let r = request.into_inner();
        required("model", &r.model)?;
        required("version", &r.version)?;
        let (v, removed_aliases) = self
            .plane
            .update_state(|s| {
                let n = s.registry.resolve(&r.model, &r.version)?;
                if let Some(e) = s.experiments.uses_version(&r.model, n) {
                    return Err(ExperimentError::VersionInUse {
                        model: r.model.clone(),
                        version: n,
                        experiment: e.name.clone(),
                    }
                    .into());
                }
                // A shadow of the deleted version would mirror to nothing: it goes in the same
                // write.
                let shadow = s.shadows.remove(&s.registry, &r.model, &n.to_string()).ok();
                let (out, u) = s.registry.delete_version(&r.model, &r.version)?;
                let mut update: Update = u.into();
                update
                    .delete_shadows
                    .extend(shadow.map(|sh| (sh.model, sh.version)));
                Ok((out, update))
            })
            .await?;
        tracing::info!(model = %v.model, version = v.version, "deleted model version");
        Ok(Response::new(pb::DeleteModelVersionResponse {
            deleted: Some(version_to_pb(&v, vec![])),
            removed_aliases,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_paths() {
        assert_eq!(
            local_artifact_path("/m/a.onnx"),
            Some(PathBuf::from("/m/a.onnx"))
        );
        assert_eq!(
            local_artifact_path("file:///m/a.onnx"),
            Some(PathBuf::from("/m/a.onnx"))
        );
        assert_eq!(local_artifact_path("s3://bucket/a.onnx"), None);
        assert_eq!(local_artifact_path(""), None);
    }

    #[test]
    fn hashes_match_sha256sum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        std::fs::write(&p, b"abc").unwrap();
        // `printf abc | sha256sum`
        assert_eq!(
            hash_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_file(dir.path()), None, "directories are not artifacts");
        assert_eq!(hash_file(&dir.path().join("missing")), None);
    }
}
