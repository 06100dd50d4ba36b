//! The control plane: the registry in memory, persisted in RocksDB, published as the routing
//! snapshot; and the tonic services of the `modelgate.v1` control API (thin adapters).

pub mod records;
pub mod registry;

use std::sync::Arc;

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::registry::{Registry, RegistryError, RegistryUpdate};
use crate::routing::RoutingTable;
use crate::store::{self, Store, StoreError};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The registry's rules refused it.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// It could not be made durable; nothing changed.
    #[error("the change could not be made durable, nothing was changed: {0}")]
    Store(#[from] StoreError),
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        match e {
            ControlError::Registry(e) => registry_status(e),
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

/// The registry and routing state shared by the control services and the data plane.
///
/// Reads are lock-free snapshots. Writes are serialised: each applies an operation to a copy of
/// the registry, writes the resulting update to RocksDB with `sync`, and only then publishes the
/// copy and a rebuilt routing table. A failed write leaves both untouched.
pub struct ControlPlane {
    store: Store,
    registry: ArcSwap<Registry>,
    routing: Arc<ArcSwap<RoutingTable>>,
    default_model: Option<String>,
    write_lock: tokio::sync::Mutex<()>,
}

impl ControlPlane {
    /// Loads the registry from `store` and builds the first routing snapshot.
    pub fn load(store: Store, default_model: Option<String>) -> Result<Self, StoreError> {
        let registry = store.load_registry()?;
        let routing = RoutingTable::build(&registry, default_model.as_deref());
        Ok(ControlPlane {
            store,
            registry: ArcSwap::from_pointee(registry),
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            default_model,
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The current registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    /// The routing snapshot handle the data plane reads.
    pub fn routing(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.routing.clone()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Applies `op` durably and publishes the result. `op` runs on a copy of the registry.
    pub async fn update<R>(
        &self,
        op: impl FnOnce(&mut Registry) -> Result<(R, RegistryUpdate), RegistryError>,
    ) -> Result<R, ControlError> {
        let _guard = self.write_lock.lock().await;
        let mut next = Registry::clone(&self.registry.load());
        let (out, update) = op(&mut next)?;
        if !update.is_empty() {
            let store = self.store.clone();
            store::blocking(move || store.write_registry(&update)).await?;
            let routing = RoutingTable::build(&next, self.default_model.as_deref());
            self.registry.store(Arc::new(next));
            self.routing.store(Arc::new(routing));
        }
        Ok(out)
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
