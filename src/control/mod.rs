//! The tonic services of the `modelgate.v1` control API: thin adapters that parse a request, call
//! the use case (`crate::app`) and map its typed errors to gRPC statuses; plus server reflection
//! and the bearer-token check.

pub mod drift;
pub mod events;
pub mod experiments;
pub mod records;
pub mod registry;
pub mod shadows;

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::Status;

pub use crate::app::control::{ControlError, ControlPlane};
use crate::experiment::ExperimentError;
use crate::registry::RegistryError;
use crate::shadow::ShadowError;
pub use crate::state::{State, StateSource, Update};

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        match e {
            ControlError::Registry(e) => registry_status(e),
            ControlError::Experiment(e) => experiment_status(e),
            ControlError::Shadow(e) => shadow_status(e),
            ControlError::Store(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Maps a registry refusal to its gRPC status.
pub fn registry_status(e: RegistryError) -> Status {
    let msg = e.to_string();
    match e {
        RegistryError::InvalidArgument { .. } => Status::invalid_argument(msg),
        RegistryError::ModelNotFound(_)
        | RegistryError::VersionNotFound { .. }
        | RegistryError::AliasNotFound { .. }
        | RegistryError::NoProduction(_) => Status::not_found(msg),
        RegistryError::PromotionRefused { .. } | RegistryError::DeleteProduction { .. } => {
            Status::failed_precondition(msg)
        }
    }
}

/// Maps an experiment refusal to its gRPC status.
pub fn experiment_status(e: ExperimentError) -> Status {
    let msg = e.to_string();
    match e {
        ExperimentError::InvalidArgument { .. } => Status::invalid_argument(msg),
        ExperimentError::NotFound(_) => Status::not_found(msg),
        ExperimentError::AlreadyExists(_) => Status::already_exists(msg),
        ExperimentError::ModelBusy { .. }
        | ExperimentError::WrongState { .. }
        | ExperimentError::VersionInUse { .. } => Status::failed_precondition(msg),
        ExperimentError::Registry(e) => registry_status(e),
    }
}

/// Maps a shadow refusal to its gRPC status.
pub fn shadow_status(e: ShadowError) -> Status {
    let msg = e.to_string();
    match e {
        ShadowError::InvalidArgument { .. } => Status::invalid_argument(msg),
        ShadowError::NotFound { .. } => Status::not_found(msg),
        ShadowError::Registry(e) => registry_status(e),
    }
}

/// Server reflection (v1 and v1alpha) describing the given proto packages (and grpc.health.v1).
pub fn reflection_services(
    packages: &[&str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let all: prost_types::FileDescriptorSet =
        prost::Message::decode(crate::pb::FILE_DESCRIPTOR_SET).expect("built-in descriptor set");
    let files = all
        .file
        .into_iter()
        .filter(|f| {
            let pkg = f.package();
            pkg == "google.protobuf" || packages.contains(&pkg)
        })
        .collect();
    let set = prost_types::FileDescriptorSet { file: files };
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(set.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    (
        builder()
            .build_v1()
            .expect("built-in descriptors are valid"),
        builder()
            .build_v1alpha()
            .expect("built-in descriptors are valid"),
    )
}

/// Checks `authorization: Bearer <token>` in constant time. With no token configured every call
/// passes.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl BearerAuth {
    /// Requires `token` (or nothing, when `None`).
    pub fn new(token: Option<&str>) -> Self {
        BearerAuth {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this control port requires a bearer token: send the header 'authorization: Bearer <token>'",
                )
            })?;
        if bool::from(given.as_bytes().ct_eq(expected)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}
