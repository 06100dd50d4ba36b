//! `modelgate serve`: opens RocksDB, loads the registry and runs the data, control and admin
//! ports until shut down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::control::{
    self, drift::DriftService, events::EventService, experiments::ExperimentService,
    records::RecordServices, registry::RegistryService, shadows::ShadowService, BearerAuth,
    ControlPlane,
};
use crate::events::EventBus;
use crate::feature_store::FeatureCatalog;
use crate::monitor::Monitor;
use crate::pb::modelgate::v1::registry_server::RegistryServer;
use crate::pb::modelgate::v1::{
    drift_server::DriftServer, events_server::EventsServer, experiments_server::ExperimentsServer,
    features_server::FeaturesServer, outcomes_server::OutcomesServer,
    predictions_server::PredictionsServer, shadows_server::ShadowsServer,
};
use crate::proxy::upstream::{UpstreamSettings, UpstreamTls};
use crate::proxy::{self, Limits, Proxy, ServerSettings};
use crate::recorder::{Recorder, RecorderSettings};
use crate::storage::faults::Faults;
use crate::storage::{self, Storage, StoreError, StoreHealth};
use crate::store::Store;
use crate::telemetry::Metrics;

/// A running modelgate.
pub struct Running {
    /// Data port address.
    pub data_addr: SocketAddr,
    /// Control port address.
    pub control_addr: SocketAddr,
    /// Admin port address.
    pub admin_addr: SocketAddr,
    /// The control plane (registry and routing).
    pub plane: Arc<ControlPlane>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The record pipeline.
    pub recorder: Arc<Recorder>,
    /// Drift monitoring.
    pub monitor: Arc<Monitor>,
    /// The event stream.
    pub events: Arc<EventBus>,
    /// The fault switches, when started by [`start_with_storage`] with a faulty storage.
    pub faults: Option<Arc<Faults>>,
    /// The RocksDB store itself, for tests of what is on disk (compaction, retention).
    pub store: Store,
    /// Fleet mode's view of the shared Redis, when `--fleet-store` is set.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    traces: Option<Arc<crate::traces::Traces>>,
    writer: Option<std::thread::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    /// The data-plane threads' tasks: each ends when its thread has drained (within the grace).
    data_tasks: Vec<JoinHandle<()>>,
    /// Control and admin ports and periodic work.
    tasks: Vec<JoinHandle<()>>,
    shutdown_grace: std::time::Duration,
}

async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--{setting})"))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The control port's TLS: tonic's own (rustls with ring), from the same files the settings
/// check read. The configuration is also built with [`crate::tls`] first, so that a key that does
/// not match its certificate is reported as such.
fn control_tls_config(
    files: &crate::tls::ServerTlsFiles,
) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    files.server_config(["control_tls_cert", "control_tls_key", "control_client_ca"])?;
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .timeout(std::time::Duration::from_secs(10));
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(tls)
}

/// Starts modelgate with `config` and returns once every port is listening.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with_storage(config, |s| (s, None)).await
}

/// [`start`], with the storage wrapped by `wrap` once it is open: tests wrap it in
/// [`crate::storage::faults::Faulty`] to inject failures and stalls (returned in
/// [`Running::faults`]).
///
/// The steps, in order: everything that can be wrong with the settings' files fails before a
/// port is bound; a port in use fails before the database is opened; the declared state is
/// applied before any port serves; the data plane serves before the control and admin ports.
pub async fn start_with_storage(
    config: Config,
    wrap: impl FnOnce(Storage) -> (Storage, Option<Arc<Faults>>),
) -> anyhow::Result<Running> {
    let declared = read_state_file(&config)?;
    let tls = read_tls(&config)?;
    let ports = bind_ports(&config).await?;
    let (data_addr, control_addr, admin_addr) = (
        ports.data.local_addr()?,
        ports.control.local_addr()?,
        ports.admin.local_addr()?,
    );
    let store = open_store(&config).await?;
    let (storage, faults) = wrap(crate::store::storage(store.clone()));
    let (storage, fleet) = join_fleet(&config, storage)?;
    // The record writer adds to the replica's own tallies (a fleet publishes them).
    let own_tallies = fleet.as_ref().map(|f| f.local_tallies.clone());
    let (core, writer) = build_core(&config, storage, own_tallies, declared.as_ref()).await?;
    let (stop, stop_rx) = watch::channel(false);
    let data = start_data_plane(&config, &core, ports.data, tls.data, &stop_rx).await?;
    let mut tasks = vec![
        start_control_port(&config, &core, ports.control, tls.control, &stop_rx).await?,
        start_periodic_checks(&core, &stop_rx),
    ];
    tasks.extend(watch_state_file(&config, &core, declared, &stop_rx));
    tasks.extend(watch_fleet(fleet.as_ref(), &core, &stop_rx));
    tasks.push(start_admin_port(
        &config,
        &core,
        ports.admin,
        data.serving,
        fleet.as_ref().map(|f| f.status.clone()),
        &stop_rx,
    ));
    tracing::info!(
        data = %data_addr, control = %control_addr, admin = %admin_addr,
        data_tls = config.tls.as_ref().map_or("off", |t| if t.client_ca.is_some() { "mtls" } else { "on" }),
        control_tls = config.control_tls.as_ref().map_or("off", |t| if t.client_ca.is_some() { "mtls" } else { "on" }),
        data_dir = %config.data_dir.display(),
        models = core.plane.state().registry.models().count(),
        "modelgate listening"
    );
    Ok(Running {
        data_addr,
        control_addr,
        admin_addr,
        plane: core.plane,
        metrics: core.metrics,
        recorder: core.recorder,
        monitor: core.monitor,
        events: core.events,
        traces: data.traces,
        writer: Some(writer),
        faults,
        store,
        fleet,
        stop,
        data_tasks: data.tasks,
        tasks,
        shutdown_grace: config.shutdown_grace,
    })
}

/// The state file, read and checked before anything else: a bad one fails start-up before a
/// port is bound.
fn read_state_file(config: &Config) -> anyhow::Result<Option<crate::declare::Loaded>> {
    config
        .state_file
        .as_ref()
        .map(|path| {
            crate::declare::load(path).map_err(|e| anyhow::anyhow!("invalid --state-file {e}"))
        })
        .transpose()
}

/// TLS of the data and control ports.
struct Tls {
    data: Option<Arc<rustls::ServerConfig>>,
    control: Option<tonic::transport::ServerTlsConfig>,
}

/// TLS material, read again (checked at validation already: the files are the source of truth),
/// so that a file that went bad since fails start-up before a port is bound.
fn read_tls(config: &Config) -> anyhow::Result<Tls> {
    let data_tls = match &config.tls {
        Some(files) => Some(
            files
                .server_config(["tls_cert", "tls_key", "tls_client_ca"])
                .context("cannot set up TLS on the data port")?,
        ),
        None => None,
    };
    let control_tls = match &config.control_tls {
        Some(files) => {
            Some(control_tls_config(files).context("cannot set up TLS on the control port")?)
        }
        None => None,
    };
    Ok(Tls {
        data: data_tls,
        control: control_tls,
    })
}

/// The three listening sockets.
struct Ports {
    data: TcpListener,
    control: TcpListener,
    admin: TcpListener,
}

/// Binds every port: a port in use fails before the database is opened or any thread started.
async fn bind_ports(config: &Config) -> anyhow::Result<Ports> {
    Ok(Ports {
        data: bind(config.listen, "listen").await?,
        control: bind(config.control_listen, "control-listen").await?,
        admin: bind(config.admin_listen, "admin-listen").await?,
    })
}

/// Opens RocksDB in `--data-dir`, creating the directory.
async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create --data-dir {}", dir.display()))?;
    let (retention, clock, cache) = (
        config.retention,
        config.clock.clone(),
        config.block_cache_bytes,
    );
    storage::blocking(move || Store::open_tuned(&dir, retention, clock, cache))
        .await
        .with_context(|| {
            format!(
                "cannot open RocksDB in --data-dir {}",
                config.data_dir.display()
            )
        })
}

/// Fleet mode: the configuration moves to the fleet's Redis (the replica's own store keeps a
/// copy). Nothing is connected yet: a Redis that is away at start is a degraded start (the local
/// copy serves), not a failure; only a malformed setting fails.
fn join_fleet(
    config: &Config,
    storage: Storage,
) -> anyhow::Result<(Storage, Option<Arc<crate::fleet::Fleet>>)> {
    match &config.fleet {
        None => Ok((storage, None)),
        Some(settings) => {
            let (storage, fleet) =
                crate::fleet::storage(settings, storage, &config.data_dir, config.clock.clone())
                    .map_err(anyhow::Error::msg)?;
            Ok((storage, Some(Arc::new(fleet))))
        }
    }
}

/// Fleet mode: keeps the control plane at the fleet's configuration, and tells the event stream
/// when Redis stops or starts answering.
fn watch_fleet(
    fleet: Option<&Arc<crate::fleet::Fleet>>,
    core: &Core,
    stop_rx: &watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let fleet = fleet?;
    let (events, runtime) = (core.events.clone(), tokio::runtime::Handle::current());
    fleet.status.on_change(Box::new(move |up, error| {
        let e = if up {
            crate::events::event(
                "fleet_store_reachable",
                "",
                "the fleet store answers again; control writes work",
            )
        } else {
            crate::events::event(
                "fleet_store_unreachable",
                "",
                format!("the fleet store does not answer; this replica serves the configuration last seen and control writes fail until it returns: {error}"),
            )
        };
        let events = events.clone();
        runtime.spawn(async move { events.publish(e).await });
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads = fleet.start(core.plane.clone(), core.events.clone(), stop.clone());
    let stopping = stopped(stop_rx.clone());
    Some(tokio::spawn(async move {
        stopping.await;
        stop.store(true, Ordering::Release);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }))
}

/// What the ports serve from: the control plane, the record pipeline, drift monitoring, events.
struct Core {
    clock: crate::clock::SharedClock,
    storage: Storage,
    metrics: Arc<Metrics>,
    events: Arc<EventBus>,
    plane: Arc<ControlPlane>,
    monitor: Arc<Monitor>,
    recorder: Arc<Recorder>,
    /// The state file could not be applied at start (fleet mode, Redis away): its watcher
    /// applies it once Redis answers.
    state_file_pending: bool,
}

/// Loads the control plane and starts the event bus, the drift monitor and the record writer
/// over `storage`; applies the declared state before anything reads the registry.
async fn build_core(
    config: &Config,
    storage: Storage,
    own_tallies: Option<Arc<dyn crate::storage::Tallies>>,
    declared: Option<&crate::declare::Loaded>,
) -> anyhow::Result<(Core, std::thread::JoinHandle<()>)> {
    let clock = config.clock.clone();
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(
        EventBus::open(
            storage.events.clone(),
            clock.clone(),
            crate::webhook::spawn(config.webhooks.clone(), metrics.clone()),
            metrics.webhook_dropped.clone(),
        )
        .context("cannot open the event log in RocksDB")?,
    );
    let plane = Arc::new(
        ControlPlane::load(storage.clone(), clock.clone(), config.default_model.clone())
            .context("cannot load the registry from RocksDB")?
            .with_events(events.clone()),
    );
    // Declared state is applied before anything reads the registry and before the data port
    // serves, so the first request is routed by it. The data port is bound already, but nothing
    // accepts from it yet: early connections wait in the backlog.
    let mut state_file_pending = false;
    if let (Some(path), Some(loaded)) = (&config.state_file, declared) {
        match crate::declare::apply(&plane, path, loaded).await {
            Ok(_) => {}
            // Fleet mode with Redis away: the replica serves the configuration it saw last, and
            // the file's watcher applies it as soon as Redis answers (docs/fleet.md).
            Err(crate::declare::ApplyError::Control(crate::app::control::ControlError::Store(
                StoreError::Unavailable(e),
            ))) if config.fleet.is_some() => {
                tracing::warn!(file = %path.display(), error = %e, "the state file will be applied when the fleet store answers");
                state_file_pending = true;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot apply --state-file {}", path.display())))
            }
        }
    }
    let monitor = Monitor::start(
        config.drift.clone(),
        storage.clone(),
        clock.clone(),
        events.clone(),
        plane.clone(),
    )
    .context("cannot load drift references from RocksDB")?;
    let catalog = Arc::new(FeatureCatalog::new(
        storage
            .features
            .load_feature_defs()
            .context("cannot load feature definitions from RocksDB")?,
    ));
    let (recorder, writer) = Recorder::start(
        storage.records.clone(),
        own_tallies.unwrap_or_else(|| storage.tallies.clone()),
        RecorderSettings {
            record_predictions: config.record_predictions,
            queue: config.record_queue,
            queue_bytes: config.record_queue_bytes,
            linger: config.record_linger,
            tally_persist: config.tally_persist_interval,
            entity_key: config.entity_key.clone(),
            max_elements: config.max_tensor_elements,
            ..Default::default()
        },
        metrics.clone(),
        catalog,
        Some(monitor.clone()),
    );
    let recorder = Arc::new(recorder);
    Ok((
        Core {
            clock,
            storage,
            metrics,
            events,
            plane,
            monitor,
            recorder,
            state_file_pending,
        },
        writer,
    ))
}

/// The running data plane.
struct DataPlane {
    /// One per data thread: ends when the thread has drained.
    tasks: Vec<JoinHandle<()>>,
    /// Data threads serving.
    serving: Arc<AtomicUsize>,
    traces: Option<Arc<crate::traces::Traces>>,
}

/// What every data thread runs first, given its index: the binary gives each an allocator arena
/// of its own (`src/main.rs`). Unset in tests and library use.
static DATA_THREAD_START: std::sync::OnceLock<fn(usize)> = std::sync::OnceLock::new();

/// Sets what every data thread runs first (once per process; later calls change nothing).
pub fn on_data_thread_start(f: fn(usize)) {
    let _ = DATA_THREAD_START.set(f);
}

/// Starts the data port: the proxy, with health and reflection for the OIP service, on
/// `--data-threads` threads. Returns once every thread serves.
async fn start_data_plane(
    config: &Config,
    core: &Core,
    data: TcpListener,
    data_tls: Option<Arc<rustls::ServerConfig>>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<DataPlane> {
    let Core {
        clock,
        metrics,
        plane,
        recorder,
        ..
    } = core;
    let mut data_tasks = Vec::new();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(
            "inference.GRPCInferenceService",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let (refl_v1, refl_v1alpha) =
        control::reflection_services(&["inference", "tensorflow", "tensorflow.serving"]);
    let local = tonic::service::Routes::new(health)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .prepare();
    let traces = match &config.otlp_endpoint {
        Some(endpoint) => {
            let t = crate::traces::Traces::otlp(endpoint)
                .with_context(|| format!("cannot set up trace export to {endpoint}"))?;
            tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
            Some(Arc::new(t))
        }
        None => None,
    };
    let proxy = Arc::new(
        Proxy::new(
            plane.routing(),
            UpstreamSettings {
                connect_timeout: config.connect_timeout,
                keepalive_interval: config.keepalive_interval,
                connections: config.upstream_connections,
                tls: Arc::new(UpstreamTls::new(config.upstream_tls.clone())),
            },
            local,
            Limits {
                max_in_flight: config.max_in_flight,
                max_queued: config.max_queued,
                queue_timeout: config.queue_timeout,
                max_message_bytes: config.max_message_bytes,
                max_tensor_elements: config.max_tensor_elements,
                max_header_bytes: config.max_header_bytes,
                request_timeout: config.request_timeout,
                unit_key: config.unit_key.clone(),
                max_shadow_in_flight: config.max_shadow_in_flight,
            },
            metrics.clone(),
            recorder.clone(),
        )
        .with_traces(traces.clone())
        .with_clock(clock.clone()),
    );
    let settings = ServerSettings {
        max_concurrent_streams: config.max_concurrent_streams,
        max_header_bytes: config.max_header_bytes,
        keepalive_interval: config.keepalive_interval,
        handshake_timeout: config.handshake_timeout,
        shutdown_grace: config.shutdown_grace,
        tls: data_tls,
    };
    // The data plane runs on its own threads, each a single-threaded runtime accepting from the
    // shared listener with its own upstream connections: a request, its upstream stream and both
    // connections are driven by one thread, with no cross-thread wakeups, and the connection
    // tasks run after the request tasks that fed them, so their frames leave in fewer writes.
    let data = data.into_std()?;
    let serving = Arc::new(AtomicUsize::new(0));
    let mut started = Vec::new();
    // What each thread accepts is served by the thread with the fewest connections.
    let seats = proxy::balance::seats(config.data_threads, metrics);
    for (i, seat) in seats.into_iter().enumerate() {
        let listener = data.try_clone()?;
        let proxy = if i == 0 {
            proxy.clone()
        } else {
            Arc::new(proxy.sibling())
        };
        let (settings, shutdown) = (settings.clone(), stopped(stop_rx.clone()));
        let serving = serving.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        started.push(started_rx);
        std::thread::Builder::new()
            .name(format!("modelgate-data-{i}"))
            .spawn(move || {
                crate::telemetry::sharded::set_data_thread(i);
                if let Some(start) = DATA_THREAD_START.get() {
                    start(i);
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a single-threaded runtime builds");
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            serving.fetch_add(1, Ordering::AcqRel);
                            let _ = started_tx.send(());
                            proxy::serve(l, proxy, settings, seat, shutdown).await
                        }
                        Err(e) => tracing::error!(error = %e, "data port listener failed"),
                    }
                });
                // The runtime's remaining tasks (connections cut at the end of the grace, shadow
                // copies) hold the proxy and, through it, the store: drop them before saying
                // done, so that nothing of the data plane outlives shutdown.
                drop(rt);
                let _ = done_tx.send(());
            })
            .context("cannot start a data-plane thread")?;
        data_tasks.push(tokio::spawn(async move {
            let _ = done_rx.await;
        }));
    }
    // Return only once every data thread serves: /ready said "the data port is not serving yet"
    // for the first moments after start (tests/ports.rs failed now and then on a busy machine).
    // A thread whose listener failed has logged why; /ready keeps reporting it.
    for s in started {
        let _ = s.await;
    }
    Ok(DataPlane {
        tasks: data_tasks,
        serving,
        traces,
    })
}

/// Starts the control port: modelgate.v1 behind the bearer token; health and reflection open.
async fn start_control_port(
    config: &Config,
    core: &Core,
    ctl: TcpListener,
    control_tls: Option<tonic::transport::ServerTlsConfig>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let Core {
        clock,
        storage,
        events,
        plane,
        monitor,
        recorder,
        metrics,
        ..
    } = core;
    let (ctl_health_reporter, ctl_health) = tonic_health::server::health_reporter();
    ctl_health_reporter
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    let (ctl_refl_v1, ctl_refl_v1alpha) = control::reflection_services(&["modelgate.v1"]);
    let auth = BearerAuth::new(config.control_token.as_deref());
    let registry =
        RegistryServer::with_interceptor(RegistryService::new(plane.clone()), auth.clone());
    let outcomes =
        crate::app::outcomes::Outcomes::new(storage.clone(), clock.clone(), recorder.clone())
            .with_observer(monitor.clone())
            .with_observer(metrics.clone());
    let records = RecordServices::new(outcomes, recorder.catalog().clone(), plane.clone());
    // The header limit of the data port. No server-side deadline: tonic would cap every caller's
    // grpc-timeout with it (a long `ctl outcomes import` or artifact hash would be cut, and
    // answered CANCELLED); control calls keep the deadline their caller sets (`ctl --timeout`).
    let mut ctl_builder = tonic::transport::Server::builder()
        .http2_max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    if let Some(tls) = control_tls {
        ctl_builder = ctl_builder
            .tls_config(tls)
            .context("cannot set up TLS on the control port")?;
    }
    let ctl_server = ctl_builder
        .add_service(ctl_health)
        .add_service(ctl_refl_v1)
        .add_service(ctl_refl_v1alpha)
        .add_service(registry)
        .add_service(PredictionsServer::with_interceptor(
            records.clone(),
            auth.clone(),
        ))
        .add_service(OutcomesServer::with_interceptor(
            records.clone(),
            auth.clone(),
        ))
        .add_service(FeaturesServer::with_interceptor(records, auth.clone()))
        .add_service(ExperimentsServer::with_interceptor(
            ExperimentService::new(plane.clone()),
            auth.clone(),
        ))
        .add_service(ShadowsServer::with_interceptor(
            ShadowService::new(plane.clone()),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // References can be large uploads.
            DriftServer::new(
                DriftService::new(plane.clone(), monitor.clone()).with_recorder(recorder.clone()),
            )
            .max_decoding_message_size(256 << 20),
            auth.clone(),
        ))
        .add_service(EventsServer::with_interceptor(
            EventService::new(events.clone(), stop_rx.clone()),
            auth,
        ))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(ctl).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    Ok(tokio::spawn(async move {
        if let Err(e) = ctl_server.await {
            tracing::error!(error = %e, "control server failed");
        }
    }))
}

/// Periodic checks: scheduled retraining, experiment and shadow alerts; in a fleet, its drift.
fn start_periodic_checks(core: &Core, stop_rx: &watch::Receiver<bool>) -> JoinHandle<()> {
    let periodic = core.monitor.clone();
    let stop_periodic = stopped(stop_rx.clone());
    tokio::spawn(async move {
        tokio::pin!(stop_periodic);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        // In a fleet: following the fleet's drift and evaluating what this replica leads.
        let mut fleet_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let shared = periodic.is_shared();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let m = periodic.clone();
                    let _ = tokio::task::spawn_blocking(move || m.periodic()).await;
                }
                _ = fleet_tick.tick(), if shared => {
                    let m = periodic.clone();
                    let _ = tokio::task::spawn_blocking(move || m.shared_tick()).await;
                }
                _ = &mut stop_periodic => break,
            }
        }
    })
}

/// Declared state: re-applied whenever the file changes.
fn watch_state_file(
    config: &Config,
    core: &Core,
    declared: Option<crate::declare::Loaded>,
    stop_rx: &watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let (path, loaded) = (config.state_file.clone()?, declared?);
    Some(tokio::spawn(crate::declare::watch(
        core.plane.clone(),
        path,
        config.state_poll_interval,
        // Not applied yet: any content counts as new.
        if core.state_file_pending {
            String::new()
        } else {
            loaded.sha256
        },
        stopped(stop_rx.clone()),
    )))
}

/// The admin port: `/metrics`, `/ready` (serving, storage writable) and `/live` (no write failure
/// only a restart cures).
fn start_admin_port(
    config: &Config,
    core: &Core,
    admin: TcpListener,
    serving: Arc<AtomicUsize>,
    fleet: Option<Arc<crate::fleet::FleetStatus>>,
    stop_rx: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let Core {
        storage,
        metrics,
        plane,
        monitor,
        ..
    } = core;
    let ready: crate::admin::Check = {
        let (store, routing, serving, stop_rx) = (
            storage.health.clone(),
            plane.routing(),
            serving.clone(),
            stop_rx.clone(),
        );
        let threads = config.data_threads;
        Arc::new(move || {
            if *stop_rx.borrow() {
                return Err("shutting down".into());
            }
            if serving.load(Ordering::Acquire) < threads {
                return Err("the data port is not serving yet".into());
            }
            // A property read, unless writes have been failing (a full disk): then one small
            // synced write, so that /ready turns 200 again as soon as RocksDB takes writes.
            store.check().map_err(|e| format!("RocksDB: {e}"))?;
            // Routing is loaded from RocksDB before any port opens; a snapshot is always there.
            let _ = routing.load();
            Ok(())
        })
    };
    let refresh: crate::admin::Refresh = {
        let (m, store, monitor, plane) = (
            metrics.clone(),
            storage.health.clone(),
            monitor.clone(),
            plane.clone(),
        );
        let fleet = fleet.clone();
        Arc::new(move || {
            refresh_metrics(&m, &*store, &monitor, &plane);
            if let Some(f) = &fleet {
                m.fleet_store_up.set(f.is_up() as i64);
                m.fleet_config_version.set(f.version() as i64);
            }
        })
    };
    // Still ready while the fleet's Redis is away (the last configuration serves), but saying so.
    let detail: Arc<dyn Fn() -> Option<String> + Send + Sync> =
        Arc::new(move || fleet.as_ref().and_then(|f| f.detail()));
    // Live unless RocksDB writes have failed, for longer than the deadline, in a way RocksDB
    // does not recover from by itself: then only a restart (a reopen) brings writes back.
    let live: crate::admin::Check = {
        let (store, deadline) = (storage.health.clone(), config.write_failure_deadline);
        Arc::new(move || {
            // One small synced write while writes fail, so that a recovery is noticed.
            let _ = store.check();
            match store.unrecoverable_write_failure() {
                Some((failed_for, error)) if failed_for >= deadline => Err(format!(
                    "RocksDB writes have failed for {}s (--write-failure-deadline {}s) with an error RocksDB does not recover from by itself; restart modelgate: {error}",
                    failed_for.as_secs(),
                    deadline.as_secs()
                )),
                _ => Ok(()),
            }
        })
    };
    tokio::spawn(crate::admin::serve(
        admin,
        metrics.clone(),
        refresh,
        crate::admin::Probes {
            ready,
            live,
            detail,
        },
        stopped(stop_rx.clone()),
    ))
}

/// Brings the sampled metrics up to date: RocksDB sizes and stalls, drift per feature.
fn refresh_metrics(m: &Metrics, store: &dyn StoreHealth, monitor: &Monitor, plane: &ControlPlane) {
    use crate::telemetry::{FamilyLabels, FeatureLabels};
    let stats = store.stats();
    for f in &stats.families {
        let l = FamilyLabels {
            family: f.name.to_string(),
        };
        m.rocksdb_sst_bytes
            .get_or_create(&l)
            .set(f.sst_bytes as i64);
        m.rocksdb_memtable_bytes
            .get_or_create(&l)
            .set(f.memtable_bytes as i64);
        m.rocksdb_live_data_bytes
            .get_or_create(&l)
            .set(f.live_data_bytes as i64);
        m.rocksdb_table_readers_bytes
            .get_or_create(&l)
            .set(f.table_readers_bytes as i64);
    }
    m.rocksdb_block_cache_bytes
        .set(stats.block_cache_bytes as i64);
    m.rocksdb_block_cache_pinned_bytes
        .set(stats.block_cache_pinned_bytes as i64);
    if let Some((rss, peak)) = crate::telemetry::resident_memory() {
        m.resident_memory_bytes.set(rss as i64);
        m.resident_memory_peak_bytes.set(peak as i64);
    }
    m.rocksdb_write_stopped.set(stats.write_stopped as i64);
    m.rocksdb_delayed_write_rate
        .set(stats.delayed_write_rate as i64);
    m.rocksdb_stall_seconds.set(stats.stall_seconds);
    let state = plane.state();
    for model in state.registry.models() {
        let Some(evaluation) = monitor.report(&model.meta.name).evaluation else {
            continue;
        };
        for f in &evaluation.features {
            let l = FeatureLabels {
                model: model.meta.name.clone(),
                feature: f.name.clone(),
            };
            if let Ok(d) = &f.result {
                m.drift_statistic.get_or_create(&l).set(d.statistic);
            }
            if let Some(p) = f.adjusted {
                m.drift_p_value.get_or_create(&l).set(p);
            }
            m.drift_drifted.get_or_create(&l).set(f.drifted as i64);
        }
    }
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to the grace period), writes every queued
    /// record and closes RocksDB.
    pub async fn shutdown(self) {
        let Running {
            stop,
            data_tasks,
            tasks,
            plane,
            recorder,
            writer,
            traces,
            shutdown_grace,
            monitor,
            ..
        } = self;
        let deadline = tokio::time::Instant::now() + shutdown_grace;
        let _ = stop.send(true);
        // The data plane bounds its own drain by the grace period.
        for t in data_tasks {
            let _ = t.await;
        }
        // The control port's server waits for every connection to close, with no bound of its
        // own: a client that keeps a stream open (an outcome import it never ends) held the
        // process forever after SIGTERM (tests/faults.rs). What is still open at the end of the
        // grace period is cut (its connection tasks live on until the process exits).
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                tracing::warn!(grace = ?shutdown_grace, "control connections still open at the end of the shutdown grace period; closing them");
                abort.abort();
            }
        }
        // Everything queued is written, then the writer stops (shadow copies still in flight
        // hold handles; what they submit later is dropped and counted).
        let r = recorder.clone();
        let _ = tokio::task::spawn_blocking(move || r.close_blocking()).await;
        drop(recorder);
        if let Some(w) = writer {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tokio::task::spawn_blocking(move || w.join()),
            )
            .await;
        }
        // The writer queued its last drift evaluations; the evaluator ends with the one under way.
        let m = monitor.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::task::spawn_blocking(move || m.stop_blocking()),
        )
        .await;
        if let Some(t) = traces {
            // Spans still buffered go out now (bounded by the exporter's timeout).
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        drop(plane);
    }
}
