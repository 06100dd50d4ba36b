//! The `modelgate` command line: `serve`, `model-server`, `demo`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use modelgate::config::{self, Config, ServeArgs};
use modelgate::demo::DemoArgs;
use modelgate::model_server::ModelSpec;

/// jemalloc for every Rust allocation of the binary (RocksDB's C++ keeps glibc's malloc: the
/// symbols are prefixed). Measured under h2load (4 × 32 streams, 8 s, this README's issue #18,
/// a thirteenth round): modelgate's CPU per call routing only 15.5 → 14.7 µs and everything on
/// 26.0 → 22.0 µs; callgrind 80,367 → 75,553 instructions per routed call (72,991 with
/// jemalloc's default settings, below). glibc's thread cache holds 7 chunks of each size up to
/// 1 KiB, so with 128 calls in flight most allocations fell through to its arenas (~385
/// instructions each), and the record writer freed what data threads allocated under their
/// arenas' locks.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation; `_RJEM_MALLOC_CONF` in the environment
/// overrides them one by one. Its defaults (eight arenas per core, thread caches up to 32 KiB
/// per size, freed pages kept 10 s) took routing only's peak RSS under saturation from 29–31 to
/// 36 MiB; with one arena (CPU per call no different from two arenas in interleaved runs) and
/// freed pages returned within half a second, 31 MiB (everything on: 57 MiB). Thread caches go
/// up to 4 KiB per size: a call's boxed futures (1.2–3.5 KiB) and decoded header maps (~1.3 KiB)
/// are above 1 KiB, and with 1 KiB caches each took the arena's bin lock, ~6 allocations and 6
/// frees a call (callgrind, h2load: 55,646 → 52,414 instructions per routed call with 4 KiB,
/// everything on 79,396 → 76,198; peak RSS under h2load 4 × 32 within 0.4 MiB either way, 8 KiB
/// caches took everything on's from ~45 to 51 MiB). `tests/cli.rs` checks that jemalloc takes
/// them. The data threads each get an arena of their own besides ([`own_arena`]): measured then
/// with connections on one thread, one arena was no dearer; with both threads serving, it was.
///
/// Larger caches for small sizes (`tcache_nslots_small_min:100,tcache_nslots_small_max:400,
/// tcache_gc_incr_bytes:1048576`) took routing only from 48,534 to 46,651 instructions per call
/// (callgrind, h2load) but are not set: timed, everything on was no cheaper with them — at a
/// fixed rate, in turns, its data threads took 21.4 against 20.8 µs per call and its record
/// writer 4.45 against 4.28, the writer never cheaper in paired runs (the blocks it frees are the
/// data threads', held longer in larger caches) — and its peak RSS over 180 s rose by 2.3 MiB
/// (docs/performance-log.md, a thirty-second round).
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 62] =
    b"narenas:1,tcache_max:4096,dirty_decay_ms:500,muzzy_decay_ms:0\0";

#[derive(Parser, Debug)]
#[command(
    name = "modelgate",
    version,
    about = "gRPC sidecar for ML model servers: routing, A/B tests, shadows, prediction logging, drift"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar: data, control and admin ports, RocksDB in --data-dir.
    Serve(Box<ServeArgs>),
    /// Run the built-in Open Inference Protocol v2 model server (for demos, tests, benchmarks).
    ModelServer(ModelServerArgs),
    /// Start two model servers and modelgate in front of them, and send traffic through it.
    Demo(DemoArgs),
    /// Call the control API: models, experiments, shadows, predictions, outcomes, features,
    /// drift, events (exit codes: 0 ok, 1 server error, 2 usage, 3 unreachable, 4 not found,
    /// 5 invalid argument, 6 failed precondition, 7 unauthenticated).
    Ctl(Box<modelgate::ctl::CtlArgs>),
}

#[derive(clap::Args, Debug)]
struct ModelServerArgs {
    /// Address to listen on (gRPC: OIP and TF Serving).
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// Address to serve REST on too (OIP's HTTP/JSON API and KServe v1), e.g. 127.0.0.1:8000.
    #[arg(long, value_name = "ADDR")]
    rest_listen: Option<SocketAddr>,
    /// A model: 'name=iris;kind=logistic;weights=0.5,-1,0.2;bias=0.1;version=v1;latency=5ms'
    /// (or features=N;seed=S instead of weights). Repeat for more models or versions.
    #[arg(long = "model", value_name = "SPEC", required = true)]
    models: Vec<ModelSpec>,
}

fn parse_cli() -> Result<(Cli, Vec<String>), config::ConfigError> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let env = config::process_env();
    let mut cmd = Cli::command();
    let mut warnings = Vec::new();
    if argv.get(1).is_some_and(|a| a == "serve") {
        let serve = cmd.find_subcommand("serve").expect("serve exists").clone();
        let (serve, w) =
            config::apply_sources(serve, &argv[1..], &env, |p| std::fs::read_to_string(p))?;
        warnings = w;
        cmd = cmd.mut_subcommand("serve", |_| serve);
    }
    let matches = cmd.get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((cli, warnings))
}

/// SIGTERM or SIGINT (Ctrl-C). Listened for from the call on, not from the first poll: `serve`
/// calls it before it starts, so that a signal that arrives while it starts (opening RocksDB,
/// or just after it logged that it listens) stops it gracefully instead of killing it with the
/// signal's default action, records and feature runs unwritten.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let (cli, warnings) = match parse_cli() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("modelgate: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime's threads exist (a thread takes its arena at its first allocation).
    limit_malloc_arenas(matches!(&cli.command, Command::Serve(a) if a.record_predictions));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result: anyhow::Result<ExitCode> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let config = match Config::from_args(*args)
                    .and_then(|c| modelgate::declare::check_setting(&c).map(|()| c))
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("modelgate: {e}");
                        return Ok(ExitCode::from(2));
                    }
                };
                modelgate::telemetry::init_logging(config.log_format, &config.log_level);
                for w in warnings.iter().chain(config.warnings().iter()) {
                    tracing::warn!("{w}");
                }
                #[cfg(not(target_env = "msvc"))]
                modelgate::server::on_data_thread_start(own_arena);
                let stop = shutdown_signal();
                let running = modelgate::server::start(config).await?;
                // Starting up ran code (RocksDB's open above all) that serving does not.
                match release_startup_pages() {
                    Ok((mappings, bytes)) => {
                        tracing::debug!(mappings, bytes, "released the pages mapped to start up")
                    }
                    Err(e) => tracing::warn!("could not release the pages mapped to start up: {e}"),
                }
                stop.await;
                tracing::info!("shutting down");
                running.shutdown().await;
                Ok(ExitCode::SUCCESS)
            }
            Command::ModelServer(args) => {
                modelgate::telemetry::init_logging(config::LogFormat::Text, "info");
                let listener = tokio::net::TcpListener::bind(args.listen).await?;
                let names: Vec<String> = args
                    .models
                    .iter()
                    .map(|m| format!("{} {} ({} features)", m.name, m.version, m.weights.len()))
                    .collect();
                tracing::info!(listen = %listener.local_addr()?, models = ?names, "model server listening");
                let server = modelgate::model_server::ModelServer::new(args.models);
                if let Some(rest) = args.rest_listen {
                    let rest = tokio::net::TcpListener::bind(rest).await?;
                    tracing::info!(listen = %rest.local_addr()?, "model server REST listening");
                    tokio::spawn(modelgate::model_server::serve_rest(
                        rest,
                        server.clone(),
                        std::future::pending(),
                    ));
                }
                modelgate::model_server::serve(listener, server, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Ctl(args) => match modelgate::ctl::run(*args).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::from(e.exit_code()))
                }
            },
            Command::Demo(args) => {
                modelgate::telemetry::init_logging(config::LogFormat::Text, "warn");
                modelgate::demo::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("modelgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Gives the calling data thread a jemalloc arena of its own.
///
/// With one arena for the process (`narenas:1`, above, for memory), every data thread took that
/// arena's locks about twelve times a call — the call's futures, boxed, are above the 1 KiB thread
/// caches — and once connections were spread over the threads (`proxy::balance`), two threads
/// running at once waited on each other for them: routing only's CPU per call rose from 12.4–12.9
/// to 14.8–15.1 µs (h2load 4 × 32, two data threads). One arena per data thread: 13.2–13.4 µs,
/// each thread's locks on its own core (README, issue #18, a sixteenth round); the record writer's
/// frees of what a data thread allocated still go to that thread's arena. jemalloc's
/// `percpu_arena` measured the same but makes an arena for every CPU a thread ever runs on — dozens
/// on a large node, for a sidecar given one or two of them.
#[cfg(not(target_env = "msvc"))]
fn own_arena(thread: usize) {
    let mut arena: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: both names are NUL-terminated; `arenas.create` writes the new arena's index, an
    // unsigned int, to `arena` (`len` bytes), and `thread.arena` reads one from it.
    let code = unsafe {
        match mallctl(
            c"arenas.create".as_ptr(),
            (&mut arena as *mut u32).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        ) {
            0 => mallctl(
                c"thread.arena".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&mut arena as *mut u32).cast(),
                std::mem::size_of::<u32>(),
            ),
            failed => failed,
        }
    };
    if code == 0 {
        tracing::debug!(
            thread,
            arena,
            "data thread allocates from an arena of its own"
        );
    } else {
        let error = std::io::Error::from_raw_os_error(code);
        tracing::warn!(thread, %error, "data thread shares the allocator's arena");
    }
}

#[cfg(not(target_env = "msvc"))]
extern "C" {
    /// jemalloc's control interface, prefixed like `malloc_conf` above. jemalloc is linked
    /// through tikv-jemallocator; declared here rather than through tikv-jemalloc-ctl, whose
    /// `paste` dependency is unmaintained (RUSTSEC-2024-0436, refused by `cargo deny`).
    #[link_name = "_rjem_mallctl"]
    fn mallctl(
        name: *const std::ffi::c_char,
        oldp: *mut std::ffi::c_void,
        oldlenp: *mut usize,
        newp: *mut std::ffi::c_void,
        newlen: usize,
    ) -> std::ffi::c_int;
}

/// Drops this process's mappings of the pages `modelgate::startup_pages` picks (code and
/// read-only data of files, never written), so that only what runs from now on maps them again;
/// returns how many mappings and bytes. Linux only.
fn release_startup_pages() -> std::io::Result<(usize, usize)> {
    #[cfg(target_os = "linux")]
    {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let (mut mappings, mut bytes) = (0, 0);
        for (start, end) in modelgate::startup_pages::releasable_mappings(&smaps) {
            // SAFETY: the range is a whole private mapping of a file that is not writable and
            // had no page of its own when `smaps` was read (and nothing makes it writable
            // since: the loader protects its relocated data before `main`). Every page in it is
            // the file's, so MADV_DONTNEED only unmaps them and the next access maps the same
            // page cache pages again; code running in the range meanwhile (this function's
            // included) faults its page back in.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            mappings += 1;
            bytes += end - start;
        }
        Ok((mappings, bytes))
    }
    #[cfg(not(target_os = "linux"))]
    Ok((0, 0))
}

/// Caps glibc's malloc arenas at one per core (at least 2), and two more when every call is
/// recorded, unless `MALLOC_ARENA_MAX` says otherwise. glibc's default is eight per core: every
/// thread that allocates under contention may get an arena of its own, and each keeps freed
/// memory for itself. Since jemalloc became the global allocator (above), glibc's malloc serves
/// RocksDB's C++ only (memtable blocks, write batches, the block cache, its flush and compaction
/// threads, the record writer's writes). The figures that set the cap were measured when glibc
/// served every allocation: routing only under h2load (4 × 32 streams, 2 cores), peak RSS 36.5 →
/// 32.4 MiB with two arenas and no CPU cost, one arena 30% more CPU per call (the data threads
/// contended for its lock); with records on, the record writer shared a data thread's arena and
/// spent a fifth of its time waiting for its lock, and two more arenas took that to 14%.
fn limit_malloc_arenas(recording: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = cores.max(2) + if recording { 2 } else { 0 };
        let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc tunable; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = recording;
}

#[cfg(test)]
mod tests {
    /// The pages released leave the resident set, and the code among them runs again.
    #[cfg(target_os = "linux")]
    #[test]
    fn released_startup_pages_leave_the_resident_set_and_run_again() {
        fn rss_file_kib() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .expect("/proc/self/status")
                .lines()
                .find_map(|l| l.strip_prefix("RssFile:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("RssFile in /proc/self/status")
        }
        let before = rss_file_kib();
        let (mappings, bytes) = super::release_startup_pages().expect("madvise");
        let after = rss_file_kib();
        // This test binary's code and read-only data, and libc's, at least.
        assert!(mappings >= 3, "{mappings} mappings, {bytes} bytes");
        assert!(after < before, "RssFile {before} → {after} KiB");
        // Code released a moment ago (formatting, allocation, reading files) runs as before,
        // and releasing again finds the same mappings.
        assert_eq!(format!("{:?}", vec![1, 2, 3]), "[1, 2, 3]");
        let again = super::release_startup_pages().expect("a second release");
        assert_eq!(again.0, mappings);
    }
}
