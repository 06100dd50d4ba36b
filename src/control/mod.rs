//! The control plane: the registry in memory, persisted in RocksDB, published as the routing
//! snapshot; and the tonic services of the `modelgate.v1` control API (thin adapters).

pub mod drift;
pub mod events;
pub mod experiments;
pub mod records;
pub mod registry;
pub mod shadows;

use std::sync::Arc;

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::experiment::{Experiment, ExperimentError, Experiments};
use crate::registry::{Registry, RegistryError, RegistryUpdate};
use crate::routing::RoutingTable;
use crate::shadow::{Shadow, ShadowError, Shadows};
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
    /// The experiment rules refused it.
    #[error(transparent)]
    Experiment(#[from] ExperimentError),
    /// The shadow rules refused it.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// It could not be made durable; nothing changed.
    #[error("the change could not be made durable, nothing was changed: {0}")]
    Store(#[from] StoreError),
}

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

/// Everything the control plane configures: the registry, experiments and shadows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Models and versions.
    pub registry: Registry,
    /// Experiments.
    pub experiments: Experiments,
    /// Shadows.
    pub shadows: Shadows,
}

/// The writes one control operation needs made durable, as one atomic batch.
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// Registry records.
    pub registry: RegistryUpdate,
    /// Experiment records to write.
    pub experiments: Vec<Experiment>,
    /// Shadow records to write.
    pub put_shadows: Vec<Shadow>,
    /// Shadow records to delete (model, version).
    pub delete_shadows: Vec<(String, u32)>,
}

impl Update {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.registry.is_empty()
            && self.experiments.is_empty()
            && self.put_shadows.is_empty()
            && self.delete_shadows.is_empty()
    }
}

impl From<RegistryUpdate> for Update {
    fn from(registry: RegistryUpdate) -> Self {
        Update {
            registry,
            ..Default::default()
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
    state: ArcSwap<State>,
    routing: Arc<ArcSwap<RoutingTable>>,
    default_model: Option<String>,
    write_lock: tokio::sync::Mutex<()>,
    events: Option<Arc<crate::events::EventBus>>,
}

impl ControlPlane {
    /// Loads the registry and experiments from `store` and builds the first routing snapshot.
    pub fn load(store: Store, default_model: Option<String>) -> Result<Self, StoreError> {
        let state = State {
            registry: store.load_registry()?,
            experiments: Experiments::from_records(store.load_experiments()?),
            shadows: Shadows::from_records(store.load_shadows()?),
        };
        let routing = RoutingTable::build(&state, default_model.as_deref());
        Ok(ControlPlane {
            store,
            state: ArcSwap::from_pointee(state),
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            default_model,
            write_lock: tokio::sync::Mutex::new(()),
            events: None,
        })
    }

    /// Publishes control-plane events (versions, experiments) on `events`.
    pub fn with_events(mut self, events: Arc<crate::events::EventBus>) -> Self {
        self.events = Some(events);
        self
    }

    /// Publishes an event, when an event bus is attached. Never fails the caller.
    pub async fn publish(&self, e: crate::pb::modelgate::v1::Event) {
        if let Some(bus) = &self.events {
            bus.publish(e).await;
        }
    }

    /// The current registry and experiments.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The routing snapshot handle the data plane reads.
    pub fn routing(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.routing.clone()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Applies a registry operation durably and publishes the result.
    pub async fn update<R>(
        &self,
        op: impl FnOnce(&mut Registry) -> Result<(R, RegistryUpdate), RegistryError>,
    ) -> Result<R, ControlError> {
        self.update_state(|s| {
            let (r, u) = op(&mut s.registry)?;
            Ok((r, u.into()))
        })
        .await
    }

    /// Applies `op` to a copy of the whole state, makes its update durable in one synced batch,
    /// and only then publishes the copy and a rebuilt routing table.
    pub async fn update_state<R>(
        &self,
        op: impl FnOnce(&mut State) -> Result<(R, Update), ControlError>,
    ) -> Result<R, ControlError> {
        let _guard = self.write_lock.lock().await;
        let mut next = State::clone(&self.state.load());
        let (out, update) = op(&mut next)?;
        if !update.is_empty() {
            let store = self.store.clone();
            store::blocking(move || store.write_control(&update)).await?;
            let routing = RoutingTable::build(&next, self.default_model.as_deref());
            self.state.store(Arc::new(next));
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
