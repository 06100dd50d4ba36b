//! The registry's values as the control API carries them.

use crate::convert::timestamp;
use crate::pb::modelgate::v1 as pb;
use crate::registry::{self as reg, PromotionPolicy, Stage};

/// A domain stage.
/// Converts a domain stage.
pub fn stage_to_pb(s: Stage) -> pb::Stage {
    match s {
        Stage::Staging => pb::Stage::Staging,
        Stage::Production => pb::Stage::Production,
        Stage::Archived => pb::Stage::Archived,
    }
}

/// Converts a version, with the aliases that point at it.
pub fn version_to_pb(v: &reg::ModelVersion, aliases: Vec<String>) -> pb::ModelVersion {
    pb::ModelVersion {
        model: v.model.clone(),
        version: v.version,
        stage: stage_to_pb(v.stage) as i32,
        endpoint: v.endpoint.clone(),
        backend_model: v.backend_model.clone().unwrap_or_default(),
        backend_version: v.backend_version.clone().unwrap_or_default(),
        backend_protocol: backend_protocol_to_pb(v.backend_protocol) as i32,
        artifact_uri: v.artifact_uri.clone(),
        artifact_sha256: v.artifact_sha256.clone().unwrap_or_default(),
        artifact_sha256_verified: v.artifact_sha256_verified,
        metrics: v.metrics.clone().into_iter().collect(),
        tags: v.tags.clone().into_iter().collect(),
        description: v.description.clone(),
        prediction: Some((&v.prediction).into()),
        aliases,
        feature_names: v
            .feature_names
            .iter()
            .map(|(input, names)| pb::InputFeatureNames {
                input: input.clone(),
                names: names.clone(),
            })
            .collect(),
        created_at: Some(timestamp(v.created_at_ms)),
        updated_at: Some(timestamp(v.updated_at_ms)),
    }
}

/// Converts a backend protocol.
pub fn backend_protocol_to_pb(p: reg::BackendProtocol) -> pb::BackendProtocol {
    match p {
        reg::BackendProtocol::Grpc => pb::BackendProtocol::Grpc,
        reg::BackendProtocol::OipRest => pb::BackendProtocol::OipRest,
    }
}

/// A backend protocol from the API (unspecified: gRPC); the error says why it is none.
pub fn backend_protocol_from_pb(raw: i32) -> Result<reg::BackendProtocol, String> {
    match pb::BackendProtocol::try_from(raw) {
        Ok(pb::BackendProtocol::Unspecified | pb::BackendProtocol::Grpc) => {
            Ok(reg::BackendProtocol::Grpc)
        }
        Ok(pb::BackendProtocol::OipRest) => Ok(reg::BackendProtocol::OipRest),
        Err(_) => Err(format!(
            "unknown value {raw} (expected BACKEND_PROTOCOL_GRPC or BACKEND_PROTOCOL_OIP_REST)"
        )),
    }
}

/// A model's promotion policy.
pub fn policy_to_pb(model: &str, p: &PromotionPolicy) -> pb::PromotionPolicy {
    pb::PromotionPolicy {
        model: model.to_string(),
        minimum_metrics: p.minimum.clone().into_iter().collect(),
        maximum_metrics: p.maximum.clone().into_iter().collect(),
    }
}

/// A stage from the API (`None` for unspecified): the field at fault and why, when it is none.
pub fn stage_from_pb(
    raw: i32,
    field: &'static str,
) -> Result<Option<Stage>, (&'static str, String)> {
    match pb::Stage::try_from(raw) {
        Ok(pb::Stage::Unspecified) => Ok(None),
        Ok(pb::Stage::Staging) => Ok(Some(Stage::Staging)),
        Ok(pb::Stage::Production) => Ok(Some(Stage::Production)),
        Ok(pb::Stage::Archived) => Ok(Some(Stage::Archived)),
        Err(_) => Err((field, format!("unknown stage {raw}"))),
    }
}

/// Feature names per input from the API: an input listed twice is refused.
pub fn feature_names_from_pb(
    list: Vec<pb::InputFeatureNames>,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, (&'static str, String)> {
    let mut out = std::collections::BTreeMap::new();
    for f in list {
        let input = f.input.clone();
        if out.insert(f.input, f.names).is_some() {
            return Err((
                "feature_names.input",
                format!("input '{input}' is listed twice"),
            ));
        }
    }
    Ok(out)
}
