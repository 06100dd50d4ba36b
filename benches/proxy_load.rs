//! Load benchmark: the built-in model server directly vs. through modelgate (and, when installed,
//! HAProxy and nginx), closed loop and open loop, in one run.
//!
//! `cargo bench --bench proxy_load` (or `make bench-load`) starts the release binary as a model
//! server (`modelgate model-server`, a logistic model over 16 features) and two modelgates in
//! front of it:
//!
//! - **routing only**: the model registered with a production version, prediction records off
//!   (`--record-predictions=false`), no experiment, shadow or drift reference;
//! - **everything on**: records on, an experiment over half of the users (two variants), a shadow
//!   taking 10% of production's traffic, and a drift reference captured from the first rows, so
//!   every request is recorded, assigned, compared or observed.
//!
//! The routing-only modelgate is also driven over **REST** (`POST /v2/models/bench/infer` with
//! the same tensor as JSON, one HTTP/1.1 connection per caller; closed loop only): the cost of
//! translating a REST call to OIP gRPC.
//!
//! It then drives `ModelInfer` (a 1×16 FP32 input, a distinct `x-user-id` per request from a pool
//! of 10,000 users) against each target:
//!
//! 1. **closed loop**: `BENCH_CONCURRENCY` callers over `BENCH_CONNECTIONS` HTTP/2 connections,
//!    each sending the next request when the last one answers, for `BENCH_SECONDS`: throughput;
//! 2. **open loop**: requests sent on a fixed schedule at half of the direct closed-loop rate
//!    (`BENCH_RATE` overrides), latency measured from when each request was *due*, so queueing
//!    is not hidden (no coordinated omission): the latency a proxy adds at moderate load. A
//!    second table gives the same calls' latency from when each was *sent*, as ghz reports it:
//!    at a moderate rate nothing queues, and the time from due also holds how late the
//!    generator's timer (1 ms granularity) woke to send, which moves more between runs than a
//!    proxy adds — so the added p50 from sending is the figure to compare proxies by.
//!
//! 3. **overload** (`BENCH_MODES=overload`, or `closed,open,overload`): a third modelgate, routing
//!    only, with `--max-in-flight` `BENCH_OVERLOAD_CAP` (64), in front of its own model server
//!    that takes `BENCH_OVERLOAD_MODEL_LATENCY` (5ms) per call, so that the model's capacity is
//!    what saturates (`0ms` makes it modelgate's CPU). Its maximum is measured closed loop
//!    with as many callers as the cap; then requests are offered open loop at twice that rate
//!    (`BENCH_OVERLOAD_FACTOR`) by `BENCH_OVERLOAD_CALLERS` (2048) callers, so more calls arrive
//!    than it can serve. It prints the goodput (answered OK per second) against the maximum, the
//!    share refused with RESOURCE_EXHAUSTED and how fast (latency from sending), the latency of
//!    the calls served, and the proxy's peak memory: the excess must not stop the served calls
//!    flowing. With the default `--queue-timeout` the calls beyond the cap wait for a slot
//!    (their callers held back) rather than being refused. When h2load is on PATH it runs the
//!    same two steps again as the load generator (its maximum with as many streams as the cap
//!    over `BENCH_CONNECTIONS` connections, then twice that rate with `--rps` and as many
//!    streams as callers): the in-process generator's thousands of callers cost more CPU per
//!    call than modelgate does, and share its two cores.
//!
//! 4. **h2load** (when `h2load`, Debian's `nghttp2-client`, is on PATH; `BENCH_H2LOAD=0` skips
//!    it): an external load generator that shares no code with modelgate, at saturation.
//!    gRPC: the framed `ModelInferRequest` POSTed by `BENCH_H2LOAD_CLIENTS` (4) connections ×
//!    `BENCH_H2LOAD_STREAMS` (32) streams to every gRPC target. REST: the JSON body POSTed over
//!    HTTP/1.1 (`--h1`) by `BENCH_CONCURRENCY` connections to the model server's own REST port
//!    (`--rest-listen`, "direct REST") and to modelgate's data port — the REST row's ratio is
//!    against direct REST. h2load reports throughput and mean latency; modelgate's CPU per call
//!    comes from /proc as for the other modes.
//!
//! `BENCH_REPEAT=N` runs the closed loop and the h2load runs N times each, the targets
//! interleaved round by round, and reports each target's median round (this machine's
//! neighbours make single runs noisy); h2load's table lists every round's req/s beside it.
//!
//! For every target it prints throughput, the ratio to direct, latency p50 / p99 / p99.9, and —
//! for the proxy processes — CPU seconds per 1,000 requests and peak resident memory (VmHWM,
//! reset before each run); then the CPU µs per call of the load generator (this process) and
//! of the model server in the same run ("gen µs", "model µs"): the three share the two cores,
//! so a target whose calls cost the generator or the model more gets less of them for itself.
//! Under the closed-loop table, each modelgate's CPU per call is split by thread (from
//! `/proc/<pid>/task`): the data threads, the record writer, RocksDB's flush and compaction
//! threads, and the rest; and the everything-on line gives issue #18's two figures, its
//! throughput and its CPU per call against routing only's.
//! `BENCH_JSON=path` also writes everything as JSON. Rows for HAProxy
//! (HTTP/2 both sides) and nginx (`grpc_pass`) appear when `haproxy` / `nginx` are on PATH
//! (`BENCH_COMPARE=0` skips them). `BENCH_BASELINE=path/to/modelgate` adds routing-only and
//! everything-on rows for another build of the binary, measured in the same run (before/after).
//! `BENCH_BINARY=path/to/modelgate` measures that build instead of the one cargo built for the
//! benchmark (e.g. `BENCH_BINARY=$(bash scripts/release.sh)`, the profile-optimised build).
//!
//! Everything runs on one machine: the load generator, the proxy and the model server share its
//! cores, so the figures measure the cost a proxy adds under contention, not a NIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use modelgate::pb::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
};
use modelgate::pb::modelgate::v1 as pb;
use tonic::transport::Channel;

/// The load generator allocates with jemalloc, as modelgate does. With glibc's malloc, its
/// allocations churned by 2,048 callers in flight (the overload mode at twice the maximum) took
/// ~28% of its CPU (`_int_malloc`, `_int_free`, `unlink_chunk`, `malloc_consolidate`; 13% at the
/// maximum), and the CPU it took was the proxy's and the model server's to lose on the same cores.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One h2load run: requests per second, mean latency (ms), calls that failed, and the proxy's
/// CPU seconds over the run.
struct H2load {
    target: String,
    rps: f64,
    mean_ms: f64,
    failed: u64,
    done: u64,
    cpu_seconds: Option<f64>,
    /// Every round's req/s, when this is the median of several (see [`H2load::median`]).
    rounds: Vec<f64>,
}

/// Runs h2load for `seconds` against `url`, POSTing `body` with `headers`; HTTP/1.1 with `h1`
/// (`clients` connections, one request each at a time), else HTTP/2 (`clients` × `streams`).
/// With `rps`, each connection sends that many requests per second, on schedule, as long as
/// it has a stream free (h2load's `--rps`: what is due while every stream is busy waits).
#[allow(clippy::too_many_arguments)]
fn h2load(
    name: String,
    pid: Option<u32>,
    url: &str,
    body: &Path,
    headers: &[&str],
    h1: bool,
    (clients, streams): (usize, usize),
    rps: Option<f64>,
    seconds: f64,
) -> H2load {
    let mut cmd = Command::new("h2load");
    cmd.args(["-c", &clients.to_string(), "-m", &streams.to_string()])
        .args(["-D", &format!("{}", seconds.round().max(1.0))])
        .args(["--warm-up-time", "1"])
        .arg("-d")
        .arg(body);
    if let Some(rps) = rps {
        cmd.args(["--rps", &format!("{}", rps.ceil().max(1.0))]);
    }
    if h1 {
        cmd.arg("--h1");
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    let before = pid.map(usage);
    let out = cmd.arg(url).output().expect("h2load runs");
    let cpu_seconds = pid
        .zip(before)
        .map(|(p, b)| usage(p).cpu_seconds - b.cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |line: &str, after: &str| -> Option<f64> {
        let l = text.lines().find(|l| l.trim_start().starts_with(line))?;
        let rest = &l[l.find(after)? + after.len()..];
        rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|s| !s.is_empty())?
            .parse()
            .ok()
    };
    // "finished in 10.00s, 17234.50 req/s, …"; "requests: N total, N started, N done, N
    // succeeded, M failed, …"; "time for request:  min  max  mean  sd  +/- sd".
    let rps = number("finished in", "s, ").unwrap_or(0.0);
    let done = number("requests:", "started, ").unwrap_or(0.0) as u64;
    let failed = number("requests:", "succeeded, ").unwrap_or(0.0) as u64;
    let mean_ms = text
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(|v| {
            let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = n.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .unwrap_or(f64::NAN);
    if rps == 0.0 {
        eprintln!(
            "h2load against {url} measured nothing:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    H2load {
        target: name,
        rps,
        mean_ms,
        failed,
        done,
        cpu_seconds,
        rounds: vec![rps],
    }
}

impl H2load {
    /// The median of one target's rounds by throughput (see [`median_by`]), with every round's
    /// throughput kept beside it.
    fn median(rounds: Vec<H2load>) -> H2load {
        let mut all: Vec<f64> = rounds.iter().map(|r| r.rps).collect();
        all.sort_by(f64::total_cmp);
        let mut m = median_by(rounds, |r| r.rps).expect("at least one round");
        m.rounds = all;
        m
    }

    /// The proxy's CPU µs per call over the run, when it is a proxy.
    fn cpu_us_per_call(&self) -> Option<f64> {
        self.cpu_seconds.map(|c| c * 1e6 / self.done.max(1) as f64)
    }
}

/// Whether the h2load runs are on: h2load installed, and not `BENCH_H2LOAD=0`.
fn h2load_on() -> bool {
    std::env::var("BENCH_H2LOAD").map_or(true, |v| v != "0") && on_path("h2load")
}

/// The framed `ModelInferRequest` h2load POSTs, written into `dir`.
fn grpc_body(dir: &Path) -> PathBuf {
    let body = dir.join("request.grpc");
    std::fs::write(&body, modelgate::protocol::grpc::frame(&request())).unwrap();
    body
}

/// [`h2load`] of OIP `ModelInfer` over gRPC against `addr`, POSTing the framed `body`.
fn h2load_grpc(
    name: String,
    pid: Option<u32>,
    addr: SocketAddr,
    body: &Path,
    connections_streams: (usize, usize),
    rps: Option<f64>,
    seconds: f64,
) -> H2load {
    h2load(
        name,
        pid,
        &format!("http://{addr}/inference.GRPCInferenceService/ModelInfer"),
        body,
        &["content-type: application/grpc", "te: trailers"],
        false,
        connections_streams,
        rps,
        seconds,
    )
}

/// The overload mode again with h2load as the load generator, which shares no code with
/// modelgate and costs a few µs per call where the in-process generator's 2,048 callers cost
/// more than modelgate itself: the maximum closed loop with `cap` streams over `connections`,
/// then `factor` × that rate on schedule (`--rps`) with `callers` streams. h2load reads no
/// gRPC status, so the calls modelgate shed (its `modelgate_shed_requests_total`) are taken off
/// what it counted as served.
fn h2load_overload(
    target: &Target,
    admin: SocketAddr,
    body: &Path,
    (connections, cap, callers): (usize, usize, usize),
    factor: f64,
    seconds: f64,
) -> serde_json::Value {
    let streams = |n: usize| (connections, n.div_ceil(connections).max(1));
    eprintln!("overload, h2load: maximum, closed loop with {cap} streams");
    let max = h2load_grpc(
        "maximum".into(),
        target.pid,
        target.addr,
        body,
        streams(cap),
        None,
        seconds,
    );
    let rate = max.rps * factor;
    eprintln!("overload, h2load: {rate:.0} req/s on schedule, {callers} streams");
    let shed_before = shed_so_far(admin);
    let over = h2load_grpc(
        format!("{factor:.0}x"),
        target.pid,
        target.addr,
        body,
        streams(callers),
        Some(rate / connections as f64),
        seconds,
    );
    let shed = shed_so_far(admin).saturating_sub(shed_before);
    let served = over.rps * (1.0 - (shed as f64 / over.done.max(1) as f64).min(1.0));
    println!(
        "overload, h2load: maximum ({connections} connections × {} streams, closed loop) {:.0} req/s; offered {rate:.0} req/s ({factor:.2}x, {connections} × {} streams, --rps): served {served:.0} req/s = {:.3} of the maximum, shed {shed}; modelgate CPU µs per call {} / {}",
        streams(cap).1,
        max.rps,
        streams(callers).1,
        served / max.rps,
        max.cpu_us_per_call()
            .map_or("-".into(), |v| format!("{v:.1}")),
        over.cpu_us_per_call()
            .map_or("-".into(), |v| format!("{v:.1}")),
    );
    serde_json::json!({
        "maximum_rps": max.rps, "offered_rps": rate, "served_rps": served,
        "goodput_ratio": served / max.rps, "shed": shed, "failed": over.failed,
        "proxy_cpu_us_per_call_at_maximum": max.cpu_us_per_call(),
        "proxy_cpu_us_per_call_overloaded": over.cpu_us_per_call(),
    })
}

/// Calls the modelgate whose admin port is `admin` has shed so far
/// (`modelgate_shed_requests_total`).
fn shed_so_far(admin: SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let mut text = String::new();
    let mut s = std::net::TcpStream::connect(admin).expect("modelgate's admin port");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: modelgate\r\n\r\n")
        .and_then(|_| s.read_to_string(&mut text))
        .expect("modelgate's metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("modelgate_shed_requests_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn print_h2load(title: &str, runs: &[H2load]) {
    println!("\n{title}");
    println!(
        "{:<30} {:>9} {:>7} {:>9} {:>12} {:>8}  rounds' req/s",
        "target", "req/s", "ratio", "mean ms", "CPU µs/call", "failed"
    );
    let base = runs.first().map_or(1.0, |r| r.rps);
    for r in runs {
        println!(
            "{:<30} {:>9.0} {:>7.3} {:>9.3} {:>12} {:>8}  {}",
            r.target,
            r.rps,
            r.rps / base,
            r.mean_ms,
            r.cpu_us_per_call()
                .map_or("-".into(), |us| format!("{us:.1}")),
            r.failed,
            r.rounds
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
}

/// The median of `values` by `key`: the middle one, or the larger of the two middle ones; none
/// when there are none.
fn median_by<T>(mut values: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    values.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = values.len() / 2;
    (!values.is_empty()).then(|| values.swap_remove(middle))
}

/// A free loopback port, never one handed out before in this run: the listener that found it is
/// closed at once (the process that will listen is started later), so the kernel may offer the
/// same port again, and two of a modelgate's ports once came out equal (it refuses to start).
fn free_addr() -> SocketAddr {
    static GIVEN: parking_lot::Mutex<Vec<u16>> = parking_lot::Mutex::new(Vec::new());
    let mut given = GIVEN.lock();
    loop {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// A child process, killed with the benchmark.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // nginx's workers outlive a killed master (they were left running, using CPU, into the
        // next benchmark run): they are killed with it.
        let children: Vec<String> = family(self.0.id())
            .into_iter()
            .skip(1)
            .map(|pid| pid.to_string())
            .collect();
        let _ = self.0.kill();
        let _ = self.0.wait();
        if !children.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&children)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The modelgate under test: `BENCH_BINARY` (e.g. the profile-optimised build of
/// `scripts/release.sh`), or the one cargo built for this benchmark.
fn modelgate_binary() -> PathBuf {
    std::env::var_os("BENCH_BINARY")
        .filter(|p| !p.is_empty())
        .map_or_else(|| env!("CARGO_BIN_EXE_modelgate").into(), Into::into)
}

/// The built-in model server: always cargo's build, so that "direct" is the same whichever
/// modelgate is measured.
fn spawn_modelgate(args: &[&str]) -> Proc {
    spawn(Command::new(env!("CARGO_BIN_EXE_modelgate")).args(args))
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("process starts"),
    )
}

async fn wait_for(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never started listening");
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(bin).is_file()
}

fn request() -> ModelInferRequest {
    ModelInferRequest {
        model_name: "bench".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 16],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: (0..16).map(|i| i as f32 * 0.1).collect(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// User ids cycled through by the load generator.
const USERS: u64 = 10_000;

fn call(n: u64, req: &ModelInferRequest) -> tonic::Request<ModelInferRequest> {
    let mut r = tonic::Request::new(req.clone());
    let user = format!("user-{}", n % USERS);
    r.metadata_mut()
        .insert("x-user-id", user.parse().expect("ASCII"));
    r
}

/// CPU time and peak memory of a process tree (a proxy and its workers).
#[derive(Clone, Copy)]
struct Usage {
    cpu_seconds: f64,
    peak_rss_bytes: u64,
    /// The root process's CPU seconds by thread, grouped as [`THREAD_GROUPS`] (modelgate's).
    threads: [f64; 4],
}

/// modelgate's threads, grouped by name for where its CPU goes: the data threads that serve
/// calls, the record writer, RocksDB's flush and compaction threads, and the rest (drift,
/// fleet, the control plane's runtime).
const THREAD_GROUPS: [&str; 4] = ["data threads", "record writer", "RocksDB", "other"];

fn thread_group(name: &str) -> usize {
    if name.starts_with("modelgate-data") {
        0
    } else if name.starts_with("modelgate-recor") {
        1
    } else if name.starts_with("rocksdb:") {
        2
    } else {
        3
    }
}

/// CPU seconds (user + system) of one `stat` line of `/proc`, and the name it gives.
fn stat_cpu(stat: &str) -> (&str, f64) {
    let ticks = 100.0; // USER_HZ, fixed at 100 on Linux for /proc/<pid>/stat
    let (head, after) = stat.rsplit_once(')').unwrap_or(("", ""));
    let name = head.split_once('(').map_or("", |x| x.1);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    let t: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    (name, t / ticks)
}

/// CPU seconds `pid`'s threads have used so far, by [`thread_group`] (threads that have
/// exited are not counted: modelgate's live as long as it does).
fn thread_cpu(pid: u32) -> [f64; 4] {
    let mut groups = [0.0; 4];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return groups;
    };
    for task in tasks.flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
            let (name, seconds) = stat_cpu(&stat);
            groups[thread_group(name)] += seconds;
        }
    }
    groups
}

/// The pids of `root` and its direct children (nginx's workers).
fn family(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
                if after.split_whitespace().nth(1) == Some(&root.to_string()) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// CPU seconds (user + system) one process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(0.0, |s| stat_cpu(&s).1)
}

/// The model server the runs in progress call (the "direct" target's process, or the overload
/// mode's own), for its CPU per call; 0 before one is started.
static MODEL_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// CPU seconds used so far by the load generator (this process alone, not its children) and by
/// the model server: beside the proxy's, where the two cores went.
#[derive(Clone, Copy)]
struct Shared {
    generator: f64,
    model: f64,
}

impl Shared {
    fn now() -> Self {
        Shared {
            generator: cpu_seconds(std::process::id()),
            model: match MODEL_PID.load(Ordering::Relaxed) {
                0 => 0.0,
                p => cpu_seconds(p),
            },
        }
    }
    fn since(self, before: Shared) -> Shared {
        Shared {
            generator: self.generator - before.generator,
            model: self.model - before.model,
        }
    }
}

fn usage(root: u32) -> Usage {
    let mut u = Usage {
        cpu_seconds: 0.0,
        peak_rss_bytes: 0,
        threads: thread_cpu(root),
    };
    for pid in family(root) {
        u.cpu_seconds += cpu_seconds(pid);
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let hwm = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .unwrap_or(0);
            u.peak_rss_bytes = u.peak_rss_bytes.max(hwm * 1024);
        }
    }
    u
}

/// Resets the peak-RSS mark of a process tree (`echo 5 > /proc/<pid>/clear_refs`).
fn reset_peak(root: u32) {
    for pid in family(root) {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The proxy's process, when the target is one.
    pid: Option<u32>,
    /// Driven over REST (OIP over HTTP/1.1 JSON, one connection per caller), not gRPC.
    rest: bool,
}

struct Run {
    target: &'static str,
    mode: &'static str,
    requests: u64,
    errors: u64,
    seconds: f64,
    hist: Histogram<u64>,
    /// Open loop only: latency of the same calls from when each was sent (as ghz measures it),
    /// which leaves out how late the generator's timer woke to send it.
    sent_hist: Option<Histogram<u64>>,
    /// CPU seconds and peak RSS of the proxy during the run.
    proxy: Option<Usage>,
    /// CPU seconds of the load generator and the model server during the run.
    shared: Shared,
}

impl Run {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    /// Latency from sending at quantile `q`, in ms (open loop only).
    fn sent_ms(&self, q: f64) -> Option<f64> {
        self.sent_hist
            .as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
    }
    /// Latency from sending at quantile `q` added to `direct`'s, in ms (open loop only).
    fn added_from_sent(&self, direct: &Run, q: f64) -> Option<f64> {
        Some(self.sent_ms(q)? - direct.sent_ms(q)?)
    }
    fn cpu_per_1000(&self) -> Option<f64> {
        self.proxy
            .map(|u| u.cpu_seconds / self.requests.max(1) as f64 * 1000.0)
    }
    /// modelgate's CPU µs per call by [`THREAD_GROUPS`], when the target is a modelgate (other
    /// proxies' threads are not grouped).
    fn threads_us(&self) -> Option<[f64; 4]> {
        let n = self.requests.max(1) as f64;
        let modelgate = self.target.contains("modelgate") || self.target.starts_with("baseline");
        self.proxy
            .filter(|_| modelgate)
            .map(|u| u.threads.map(|s| s / n * 1e6))
    }
    /// The load generator's and the model server's CPU µs per call.
    fn shared_us(&self) -> (f64, f64) {
        let n = self.requests.max(1) as f64;
        (self.shared.generator / n * 1e6, self.shared.model / n * 1e6)
    }
    fn json(&self, direct: &Run) -> serde_json::Value {
        serde_json::json!({
            "target": self.target, "mode": self.mode, "requests": self.requests,
            "errors": self.errors, "seconds": self.seconds, "rps": self.rps(),
            "ratio_to_direct": self.rps() / direct.rps(),
            "p50_ms": self.ms(0.5), "p99_ms": self.ms(0.99), "p999_ms": self.ms(0.999),
            "added_p50_ms": self.ms(0.5) - direct.ms(0.5),
            "added_p99_ms": self.ms(0.99) - direct.ms(0.99),
            "from_sent_p50_ms": self.sent_ms(0.5),
            "from_sent_p99_ms": self.sent_ms(0.99),
            "added_from_sent_p50_ms": self.added_from_sent(direct, 0.5),
            "added_from_sent_p99_ms": self.added_from_sent(direct, 0.99),
            "proxy_cpu_seconds_per_1000": self.cpu_per_1000(),
            "proxy_peak_rss_mib": self.proxy.map(|u| u.peak_rss_bytes as f64 / (1 << 20) as f64),
            "proxy_cpu_us_per_call_by_thread": self.threads_us().map(|t| {
                THREAD_GROUPS.iter().zip(t).map(|(g, us)| (g.to_string(), us.into()))
                    .collect::<serde_json::Map<String, serde_json::Value>>()
            }),
            "generator_cpu_us_per_call": self.shared_us().0,
            "model_cpu_us_per_call": self.shared_us().1,
        })
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()
}

async fn connect(addr: SocketAddr, connections: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    // Warm-up: connections, pools, caches, the proxy's upstream connections.
    let req = request();
    for (i, ch) in channels.iter().enumerate() {
        let mut c = GrpcInferenceServiceClient::new(ch.clone());
        for n in 0..100 {
            c.model_infer(call((i * 100 + n) as u64, &req))
                .await
                .expect("warm-up request");
        }
    }
    channels
}

/// Closed loop: `concurrency` callers, each sending the next request when the last one answers.
async fn closed(target: &Target, concurrency: usize, connections: usize, seconds: f64) -> Run {
    let channels = connect(target.addr, connections).await;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    if let Some(pid) = target.pid {
        reset_peak(pid);
    }
    let before = (target.pid.map(usage), Shared::now());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut client = GrpcInferenceServiceClient::new(channels[w % connections].clone());
        let (stop, errors, counter) = (stop.clone(), errors.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let req = request();
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match client.model_infer(call(n, &req)).await {
                    Ok(_) => {
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist
        }));
    }
    end_closed(target, tasks, &stop, &errors, started, before, seconds).await
}

/// Lets a closed loop's callers run for `seconds`, stops them and gathers their latencies.
async fn end_closed(
    target: &Target,
    tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
    stop: &AtomicBool,
    errors: &AtomicU64,
    started: Instant,
    before: (Option<Usage>, Shared),
    seconds: f64,
) -> Run {
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = new_hist();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    finish(
        target,
        "closed",
        hist,
        errors.load(Ordering::Relaxed),
        elapsed,
        before,
    )
}

/// The REST body of the benchmark's request (OIP over HTTP/JSON).
const REST_BODY: &str = r#"{"inputs":[{"name":"input","shape":[1,16],"datatype":"FP32","data":[0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,1.1,1.2,1.3,1.4,1.5]}]}"#;

/// Closed loop over REST: `concurrency` callers, each on its own HTTP/1.1 connection.
async fn closed_rest(target: &Target, concurrency: usize, seconds: f64) -> Run {
    use http_body_util::{BodyExt, Full};
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    if let Some(pid) = target.pid {
        reset_peak(pid);
    }
    let before = (target.pid.map(usage), Shared::now());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let stream = tokio::net::TcpStream::connect(target.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (stop, errors, counter) = (stop.clone(), errors.clone(), counter.clone());
        let uri = format!("http://{}/v2/models/bench/infer", target.addr);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let req = http::Request::post(&uri)
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("x-user-id", format!("user-{}", n % USERS))
                    .body(Full::new(bytes::Bytes::from_static(REST_BODY.as_bytes())))
                    .unwrap();
                let t = Instant::now();
                let ok = match send.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        resp.into_body().collect().await.is_ok() && status.is_success()
                    }
                    Err(_) => false,
                };
                if ok {
                    let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if send.ready().await.is_err() {
                        break;
                    }
                }
            }
            hist
        }));
    }
    end_closed(target, tasks, &stop, &errors, started, before, seconds).await
}

/// Open loop: request `n` is due at `n / rate` seconds whether or not earlier ones answered;
/// each latency counts from when its request was due, so a proxy that falls behind shows it.
async fn open(target: &Target, rate: f64, workers: usize, connections: usize, seconds: f64) -> Run {
    let o = overload(target, rate, workers, connections, seconds).await;
    Run {
        target: target.name,
        mode: "open",
        requests: o.ok,
        errors: o.shed + o.other_errors,
        seconds: o.seconds,
        hist: o.ok_hist,
        sent_hist: Some(o.ok_sent_hist),
        proxy: o.proxy,
        shared: o.shared,
    }
}

/// What an overload run saw.
struct Overload {
    offered: f64,
    sent: u64,
    ok: u64,
    shed: u64,
    other_errors: u64,
    seconds: f64,
    /// Latency of the calls served, from when each was due.
    ok_hist: Histogram<u64>,
    /// Latency of the calls served, from when each was sent.
    ok_sent_hist: Histogram<u64>,
    /// Time from sending to RESOURCE_EXHAUSTED.
    shed_hist: Histogram<u64>,
    proxy: Option<Usage>,
    shared: Shared,
}

/// The open-loop driver: request `n` is due at `n / rate` seconds whether or not earlier ones
/// answered. `workers` callers take the next due request in turn (no task per request, so the
/// load generator stays cheap); a caller that is early sleeps until the request is due. Calls
/// served count from when they were due; calls shed (RESOURCE_EXHAUSTED) from when they were
/// sent, to show how fast a refusal comes back.
async fn overload(
    target: &Target,
    rate: f64,
    workers: usize,
    connections: usize,
    seconds: f64,
) -> Overload {
    let channels = connect(target.addr, connections).await;
    let next = Arc::new(AtomicU64::new(0));
    if let Some(pid) = target.pid {
        reset_peak(pid);
    }
    let before = target.pid.map(usage);
    let shared = Shared::now();
    let started = tokio::time::Instant::now();
    let total = (rate * seconds) as u64;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut client = GrpcInferenceServiceClient::new(channels[w % connections].clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            // Latencies (µs) are appended to vectors and put into histograms at the end: a
            // histogram per caller (~150 KB each, 3 of them × 2,048 callers) took a cache miss
            // and, at first, a page fault for every call recorded, and made the generator's
            // CPU per call rise with the number of callers.
            let (mut ok, mut ok_sent, mut shed, mut other) =
                (Vec::new(), Vec::new(), Vec::new(), 0u64);
            let req = request();
            let micros = |since: tokio::time::Instant| since.elapsed().as_micros().max(1) as u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let due = started + Duration::from_secs_f64(n as f64 / rate);
                // Behind schedule (as every caller is once the target saturates), the call
                // goes at once, without a trip through the timer.
                if due > tokio::time::Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                let sent = tokio::time::Instant::now();
                match client.model_infer(call(n, &req)).await {
                    Ok(_) => {
                        ok.push(micros(due));
                        ok_sent.push(micros(sent));
                    }
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => shed.push(micros(sent)),
                    Err(_) => other += 1,
                }
            }
            (ok, ok_sent, shed, other)
        }));
    }
    let (mut ok_hist, mut ok_sent_hist, mut shed_hist, mut other_errors) =
        (new_hist(), new_hist(), new_hist(), 0);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // Measured before the histograms are filled, which is the generator's work, not the run's.
    let elapsed = started.elapsed().as_secs_f64();
    let proxy = proxy_usage(target, before);
    let shared = Shared::now().since(shared);
    for (ok, ok_sent, shed, other) in results {
        for (hist, values) in [
            (&mut ok_hist, ok),
            (&mut ok_sent_hist, ok_sent),
            (&mut shed_hist, shed),
        ] {
            for v in values {
                let _ = hist.record(v);
            }
        }
        other_errors += other;
    }
    Overload {
        offered: rate,
        sent: total,
        ok: ok_hist.len(),
        shed: shed_hist.len(),
        other_errors,
        seconds: elapsed,
        ok_hist,
        ok_sent_hist,
        shed_hist,
        proxy,
        shared,
    }
}

impl Overload {
    fn goodput(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn print(&self, max: &Run, cap: usize, callers: usize, model_latency: &str) {
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "\noverload: modelgate routing only, --max-in-flight {cap}, model latency {model_latency}; maximum (closed loop, {cap} callers) {:.0} req/s",
            max.rps()
        );
        println!(
            "offered {:.0} req/s ({:.2}x) by {callers} callers for {:.1}s: sent {}, served {} ({:.0} req/s = {:.3} of the maximum), shed {} ({:.1}%), other errors {}",
            self.offered,
            self.offered / max.rps(),
            self.seconds,
            self.sent,
            self.ok,
            self.goodput(),
            self.goodput() / max.rps(),
            self.shed,
            100.0 * self.shed as f64 / self.sent.max(1) as f64,
            self.other_errors,
        );
        println!(
            "served latency from due p50/p99/p99.9 {:.3}/{:.3}/{:.3} ms; RESOURCE_EXHAUSTED after p50/p99/p99.9 {:.3}/{:.3}/{:.3} ms; proxy CPU {} s, peak RSS {} MiB",
            q(&self.ok_hist, 0.5),
            q(&self.ok_hist, 0.99),
            q(&self.ok_hist, 0.999),
            q(&self.shed_hist, 0.5),
            q(&self.shed_hist, 0.99),
            q(&self.shed_hist, 0.999),
            self.proxy.map_or("-".into(), |u| format!("{:.1}", u.cpu_seconds)),
            self.proxy
                .map_or("-".into(), |u| format!("{:.1}", u.peak_rss_bytes as f64 / (1 << 20) as f64)),
        );
    }

    fn json(&self, max: &Run, cap: usize) -> serde_json::Value {
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        serde_json::json!({
            "max_in_flight": cap, "max_rps": max.rps(),
            "proxy_cpu_seconds": self.proxy.map(|u| u.cpu_seconds), "offered_rps": self.offered,
            "sent": self.sent, "ok": self.ok, "shed": self.shed, "other_errors": self.other_errors,
            "seconds": self.seconds, "goodput_rps": self.goodput(),
            "goodput_ratio_to_max": self.goodput() / max.rps(),
            "ok_p50_ms": q(&self.ok_hist, 0.5), "ok_p99_ms": q(&self.ok_hist, 0.99),
            "shed_p50_ms": q(&self.shed_hist, 0.5), "shed_p99_ms": q(&self.shed_hist, 0.99),
            "proxy_peak_rss_mib": self.proxy.map(|u| u.peak_rss_bytes as f64 / (1 << 20) as f64),
        })
    }
}

fn finish(
    target: &Target,
    mode: &'static str,
    hist: Histogram<u64>,
    errors: u64,
    seconds: f64,
    before: (Option<Usage>, Shared),
) -> Run {
    Run {
        target: target.name,
        mode,
        requests: hist.len(),
        errors,
        seconds,
        hist,
        sent_hist: None,
        proxy: proxy_usage(target, before.0),
        shared: Shared::now().since(before.1),
    }
}

/// The proxy's CPU seconds since `before` and its peak RSS, when the target is a proxy.
fn proxy_usage(target: &Target, before: Option<Usage>) -> Option<Usage> {
    target.pid.zip(before).map(|(pid, b)| {
        let a = usage(pid);
        Usage {
            cpu_seconds: a.cpu_seconds - b.cpu_seconds,
            peak_rss_bytes: a.peak_rss_bytes,
            threads: std::array::from_fn(|i| a.threads[i] - b.threads[i]),
        }
    })
}

/// Commands a Redis has processed so far (`INFO stats`).
/// Commands Redis has processed, and the CPU seconds it has used (user + system), so far.
fn redis_stats(port: u16) -> (u64, f64) {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "all"])
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        field("total_commands_processed:") as u64,
        field("used_cpu_user:") + field("used_cpu_sys:"),
    )
}

/// Where Redis spent its time (since it started: the fleet row is its only user), by command.
fn print_redis_commands(port: u16) {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows: Vec<(String, u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let get = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Some((name.to_string(), get("calls=")?, get("usec=")?))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.2));
    eprintln!("Redis time by command (fleet row): command, calls, µs in all");
    for (name, calls, usec) in rows.iter().take(8) {
        eprintln!("  {name:<10} {calls:>10} {usec:>12}");
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

fn print_table(title: &str, runs: &[Run], direct: &Run) {
    println!("\n{title}");
    println!(
        "{:<26} {:>9} {:>7} {:>8} {:>8} {:>9} {:>10} {:>10} {:>9} {:>6} {:>7} {:>7}",
        "target",
        "req/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "+p50 ms",
        "+p99 ms",
        "CPU s/1k",
        "RSS MiB",
        "gen µs",
        "model µs"
    );
    for r in runs {
        let (cpu, rss) = match r.proxy {
            Some(u) => (
                format!("{:.4}", r.cpu_per_1000().unwrap_or(0.0)),
                format!("{:.1}", u.peak_rss_bytes as f64 / (1 << 20) as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        let (generator, model) = r.shared_us();
        println!(
            "{:<26} {:>9.0} {:>7.3} {:>8.3} {:>8.3} {:>9.3} {:>10.3} {:>10.3} {:>9} {:>6} {:>7.1} {:>7.1}{}",
            r.target,
            r.rps(),
            r.rps() / direct.rps(),
            r.ms(0.5),
            r.ms(0.99),
            r.ms(0.999),
            r.ms(0.5) - direct.ms(0.5),
            r.ms(0.99) - direct.ms(0.99),
            cpu,
            rss,
            generator,
            model,
            if r.errors > 0 {
                format!("  ({} errors)", r.errors)
            } else {
                String::new()
            }
        );
    }
}

/// The open loop's latencies from when each call was sent rather than due: what ghz reports.
/// At a moderate rate nothing queues, and the time from due adds how late the generator's timer
/// (1 ms granularity) woke to send, which varies more between runs than a proxy adds.
fn print_from_sent(runs: &[Run], direct: &Run) {
    if direct.sent_hist.is_none() {
        return;
    }
    println!("…the same calls, latency from sending (as ghz measures it)");
    println!(
        "{:<26} {:>8} {:>8} {:>10} {:>10}",
        "target", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms"
    );
    for r in runs {
        let row = (
            r.sent_ms(0.5),
            r.sent_ms(0.99),
            r.added_from_sent(direct, 0.5),
            r.added_from_sent(direct, 0.99),
        );
        if let (Some(p50), Some(p99), Some(a50), Some(a99)) = row {
            println!(
                "{:<26} {:>8.3} {:>8.3} {:>10.3} {:>10.3}",
                r.target, p50, p99, a50, a99
            );
        }
    }
}

/// Where each modelgate's CPU per call went in the closed loop, by thread group.
fn print_threads(runs: &[Run]) {
    let modelgates: Vec<(&Run, [f64; 4])> = runs
        .iter()
        .filter_map(|r| r.threads_us().map(|t| (r, t)))
        .collect();
    if modelgates.is_empty() {
        return;
    }
    println!("\nmodelgate's CPU µs per call by thread (closed loop)");
    println!(
        "{:<32} {:>12} {:>14} {:>9} {:>7}",
        "target", THREAD_GROUPS[0], THREAD_GROUPS[1], THREAD_GROUPS[2], THREAD_GROUPS[3]
    );
    for (r, t) in modelgates {
        println!(
            "{:<32} {:>12.1} {:>14.1} {:>9.1} {:>7.1}",
            r.target, t[0], t[1], t[2], t[3]
        );
    }
}

/// Starts HAProxy in HTTP/2 mode on both sides, in front of `upstream`.
fn haproxy(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Proc {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 2\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\n\
             frontend grpc\n  bind {listen} proto h2\n  default_backend model\n\n\
             backend model\n  server m1 {upstream} proto h2\n"
        ),
    )
    .unwrap();
    spawn(Command::new("haproxy").arg("-f").arg(&cfg).arg("-db"))
}

/// Starts nginx with `grpc_pass` to `upstream`, two workers. `keepalive_requests` is raised on
/// both sides: at its default (1,000) nginx closes busy HTTP/2 connections every 1,000 calls and
/// the calls in flight on them fail.
fn nginx(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Proc {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let cfg = prefix.join("nginx.conf");
    std::fs::write(
        &cfg,
        format!(
            "worker_processes 2;\nerror_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n\
               keepalive_requests 10000000;\n\
               upstream model {{ server {upstream}; keepalive 16; keepalive_requests 10000000; }}\n\
               server {{\n    listen {listen} http2;\n    location / {{ grpc_pass grpc://model; }}\n  }}\n}}\n",
            p = prefix.display()
        ),
    )
    .unwrap();
    spawn(
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&cfg)
            .args(["-g", "daemon off;"]),
    )
}

/// Starts a modelgate in front of the model server at `model` with `extra` flags; returns it and
/// its data and control addresses.
async fn modelgate(dir: &Path, extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    modelgate_from(&modelgate_binary(), dir, extra).await
}

/// [`modelgate`] from another build of the binary (`BENCH_BASELINE`).
async fn modelgate_from(bin: &Path, dir: &Path, extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let (p, data, control, _) = modelgate_with_admin(bin, dir, extra).await;
    (p, data, control)
}

/// [`modelgate_from`], also returning the admin address (its metrics).
async fn modelgate_with_admin(
    bin: &Path,
    dir: &Path,
    extra: &[&str],
) -> (Proc, SocketAddr, SocketAddr, SocketAddr) {
    let (data, control, admin) = (free_addr(), free_addr(), free_addr());
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        data.to_string(),
        "--control-listen".into(),
        control.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--data-dir".into(),
        dir.to_str().unwrap().into(),
        "--log-level".into(),
        "warn".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = spawn(Command::new(bin).args(&args));
    wait_for(control).await;
    wait_for(data).await;
    (p, data, control, admin)
}

/// Registers `versions` versions of `bench` at `model`; version 1 becomes production.
async fn register(control: SocketAddr, model: SocketAddr, versions: usize) {
    let mut reg = pb::registry_client::RegistryClient::connect(format!("http://{control}"))
        .await
        .unwrap();
    for _ in 0..versions {
        reg.register_model_version(pb::RegisterModelVersionRequest {
            model: "bench".into(),
            endpoint: format!("http://{model}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    reg.transition_stage(pb::TransitionStageRequest {
        model: "bench".into(),
        version: "1".into(),
        stage: pb::Stage::Production as i32,
        force: false,
    })
    .await
    .unwrap();
}

/// Turns on everything else: an experiment over half the users (versions 1 and 2), a 10% shadow
/// (version 3), and a drift reference captured from the next 1,000 rows.
async fn everything(control: SocketAddr) {
    let url = format!("http://{control}");
    let mut ex = pb::experiments_client::ExperimentsClient::connect(url.clone())
        .await
        .unwrap();
    let variant = |name: &str, version: &str| pb::VariantSpec {
        name: name.into(),
        version: version.into(),
        weight: 1.0,
    };
    ex.create_experiment(pb::CreateExperimentRequest {
        name: "bench-ab".into(),
        model: "bench".into(),
        variants: vec![variant("control", "1"), variant("treatment", "2")],
        coverage: 0.5,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sh = pb::shadows_client::ShadowsClient::connect(url.clone())
        .await
        .unwrap();
    sh.set_shadow(pb::SetShadowRequest {
        model: "bench".into(),
        version: "3".into(),
        sample_fraction: 0.1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut drift = pb::drift_client::DriftClient::connect(url).await.unwrap();
    drift
        .capture_reference(pb::CaptureReferenceRequest {
            model: "bench".into(),
            rows: 1000,
        })
        .await
        .unwrap();
}

fn main() {
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 32);
    let seconds: f64 = env_or("BENCH_SECONDS", 10.0);
    let connections: usize = env_or("BENCH_CONNECTIONS", 4).max(1);
    let open_workers: usize = env_or("BENCH_OPEN_WORKERS", 256).max(1);
    let compare = std::env::var("BENCH_COMPARE").map_or(true, |v| v != "0");
    // Comma-separated substrings of target names to run (direct always runs).
    let only: Vec<String> = std::env::var("BENCH_TARGETS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "closed,open".into());
    let json_path = std::env::var("BENCH_JSON").ok().filter(|p| !p.is_empty());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let model_addr = free_addr();
        let model_rest = free_addr();
        let model = spawn_modelgate(&[
            "model-server",
            "--listen",
            &model_addr.to_string(),
            "--rest-listen",
            &model_rest.to_string(),
            "--model",
            "name=bench;kind=logistic;features=16;seed=1",
        ]);
        MODEL_PID.store(model.0.id(), Ordering::Relaxed);
        wait_for(model_addr).await;
        wait_for(model_rest).await;

        let (routing, routing_data, routing_control) = modelgate(
            &dir.path().join("routing"),
            &["--record-predictions", "false"],
        )
        .await;
        register(routing_control, model_addr, 1).await;
        let (all, all_data, all_control) = modelgate(&dir.path().join("everything"), &[]).await;
        register(all_control, model_addr, 3).await;
        everything(all_control).await;

        let overload_cap: usize = env_or("BENCH_OVERLOAD_CAP", 64);
        let overload_latency =
            std::env::var("BENCH_OVERLOAD_MODEL_LATENCY").unwrap_or_else(|_| "5ms".into());
        let overload_gate = if modes.contains("overload") {
            // Its own model server, as slow as a real model: the model's capacity, guarded by
            // --max-in-flight, is what saturates, as in a pod where the model server uses most
            // of the CPU. BENCH_OVERLOAD_MODEL_LATENCY=0ms makes modelgate's CPU the limit.
            let slow_model = free_addr();
            let model = spawn_modelgate(&[
                "model-server",
                "--listen",
                &slow_model.to_string(),
                "--model",
                &format!("name=bench;kind=logistic;features=16;seed=1;latency={overload_latency}"),
            ]);
            wait_for(slow_model).await;
            let cap = overload_cap.to_string();
            let (p, data, control, admin) = modelgate_with_admin(
                &modelgate_binary(),
                &dir.path().join("overload"),
                &["--record-predictions", "false", "--max-in-flight", &cap],
            )
            .await;
            register(control, slow_model, 1).await;
            Some((p, data, model, admin))
        } else {
            None
        };

        let mut targets = vec![Target {
            name: "direct",
            addr: model_addr,
            pid: None,
            rest: false,
        }];
        let mut _others = Vec::new();
        if compare && on_path("haproxy") {
            let addr = free_addr();
            let p = haproxy(dir.path(), addr, model_addr);
            wait_for(addr).await;
            targets.push(Target {
                name: "haproxy (h2)",
                addr,
                pid: Some(p.0.id()),
                rest: false,
            });
            _others.push(p);
        }
        if compare && on_path("nginx") {
            let addr = free_addr();
            let p = nginx(dir.path(), addr, model_addr);
            wait_for(addr).await;
            targets.push(Target {
                name: "nginx (grpc_pass)",
                addr,
                pid: Some(p.0.id()),
                rest: false,
            });
            _others.push(p);
        }
        targets.push(Target {
            name: "modelgate routing only",
            addr: routing_data,
            pid: Some(routing.0.id()),
            rest: false,
        });
        targets.push(Target {
            name: "modelgate everything on",
            addr: all_data,
            pid: Some(all.0.id()),
            rest: false,
        });
        // The same routing-only modelgate, called over REST (translated to OIP gRPC inside).
        targets.push(Target {
            name: "modelgate routing only, REST",
            addr: routing_data,
            pid: Some(routing.0.id()),
            rest: true,
        });

        // Fleet mode (docs/fleet.md): everything on, sharing a Redis (started here when
        // redis-server is installed; BENCH_FLEET=0 skips it).
        let mut redis_port = None;
        if std::env::var("BENCH_FLEET").map_or(true, |v| v != "0") && on_path("redis-server") {
            let addr = free_addr();
            let p = spawn(
                Command::new("redis-server")
                    .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(dir.path()),
            );
            wait_for(addr).await;
            let redis = p;
            let url = format!("redis://{addr}");
            let (p, data, control) = modelgate(
                &dir.path().join("fleet"),
                &["--fleet-store", &url, "--fleet-name", "bench"],
            )
            .await;
            register(control, model_addr, 3).await;
            everything(control).await;
            targets.push(Target {
                name: "modelgate everything on + fleet",
                addr: data,
                pid: Some(p.0.id()),
                rest: false,
            });
            _others.push(p);
            // Stopped after the modelgate that uses it.
            _others.push(redis);
            redis_port = Some(addr.port());
        }

        // Another build (BENCH_BASELINE=path/to/modelgate, e.g. the last release) measured in the
        // same run, for before/after comparisons on a noisy machine.
        if let Ok(bin) = std::env::var("BENCH_BASELINE") {
            let bin = Path::new(&bin);
            let (p, data, control) = modelgate_from(
                bin,
                &dir.path().join("baseline-routing"),
                &["--record-predictions", "false"],
            )
            .await;
            register(control, model_addr, 1).await;
            targets.push(Target {
                name: "baseline routing only",
                addr: data,
                pid: Some(p.0.id()),
                rest: false,
            });
            _others.push(p);
            let (p, data, control) =
                modelgate_from(bin, &dir.path().join("baseline-everything"), &[]).await;
            register(control, model_addr, 3).await;
            everything(control).await;
            targets.push(Target {
                name: "baseline everything on",
                addr: data,
                pid: Some(p.0.id()),
                rest: false,
            });
            _others.push(p);
        }
        targets.retain(|t| {
            t.name == "direct" || only.is_empty() || only.iter().any(|o| t.name.contains(o.as_str()))
        });
        eprintln!(
            "ModelInfer 1x16 FP32; closed loop: concurrency {concurrency} over {connections} HTTP/2 connections; {seconds}s per run; machine: {}",
            machine()
        );
        // BENCH_REPEAT rounds over the targets, interleaved so that a noisy minute hurts every
        // target alike; each target's median round (by throughput) is reported.
        let repeat: usize = std::env::var("BENCH_REPEAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1);
        let mut rounds: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
        let mut redis_rounds: Vec<(f64, f64)> = Vec::new();
        for round in 0..repeat {
        for (i, t) in targets.iter().enumerate().filter(|_| modes.contains("closed")) {
            eprintln!("closed loop (round {}/{repeat}): {}", round + 1, t.name);
            let fleet = t.name.ends_with("+ fleet");
            let before = redis_port.filter(|_| fleet).map(redis_stats);
            let run = if t.rest {
                closed_rest(t, concurrency, seconds).await
            } else {
                closed(t, concurrency, connections, seconds).await
            };
            if let (Some(port), Some((commands, cpu))) = (redis_port, before) {
                // The writer and publisher run behind the calls: let them catch up first.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (commands_after, cpu_after) = redis_stats(port);
                print_redis_commands(port);
                let calls = run.requests.max(1) as f64;
                redis_rounds.push((
                    (commands_after - commands) as f64 / calls,
                    (cpu_after - cpu) * 1e6 / calls,
                ));
            }
            rounds[i].push(run);
        }
        }
        let median = |v: Vec<f64>| median_by(v, |x| *x);
        let redis_per_call = median(redis_rounds.iter().map(|r| r.0).collect())
            .zip(median(redis_rounds.iter().map(|r| r.1).collect()));
        let closed_runs: Vec<Run> = rounds
            .into_iter()
            .filter_map(|r| median_by(r, Run::rps))
            .collect();
        let (rate, why) = match std::env::var("BENCH_RATE").ok().and_then(|v| v.parse().ok()) {
            Some(r) => (r, "BENCH_RATE"),
            None => match closed_runs.first() {
                Some(d) => ((d.rps() / 2.0).round(), "half of direct's closed-loop rate"),
                None => (10_000.0, "default without a closed-loop run"),
            },
        };
        let mut open_runs = Vec::new();
        // Open loop drives gRPC only.
        for t in targets.iter().filter(|t| modes.contains("open") && !t.rest) {
            eprintln!("open loop at {rate:.0} req/s: {}", t.name);
            open_runs.push(open(t, rate, open_workers, connections, seconds).await);
        }
        if let Some(direct) = closed_runs.first() {
            print_table(
                &format!("closed loop, concurrency {concurrency}: throughput"),
                &closed_runs,
                direct,
            );
        }
        if let Some(direct) = open_runs.first() {
            print_table(
                &format!("open loop at {rate:.0} req/s ({why}), {open_workers} callers: added latency"),
                &open_runs,
                direct,
            );
            print_from_sent(&open_runs, direct);
        }
        println!("machine: {}", machine());
        print_threads(&closed_runs);
        let by_name: HashMap<&str, &Run> = closed_runs.iter().map(|r| (r.target, r)).collect();
        if let (Some(r), Some(e)) = (
            by_name.get("modelgate routing only"),
            by_name.get("modelgate everything on"),
        ) {
            // Issue #18's goal for everything on: at least 0.8 of the throughput, at most 1.5×
            // the CPU per call.
            println!(
                "everything on / routing only: {:.3} throughput, {} CPU per call",
                e.rps() / r.rps(),
                match (e.cpu_per_1000(), r.cpu_per_1000()) {
                    (Some(a), Some(b)) => format!("{:.3}", a / b),
                    _ => "-".into(),
                }
            );
        }
        if let (Some(e), Some(f)) = (
            by_name.get("modelgate everything on"),
            by_name.get("modelgate everything on + fleet"),
        ) {
            println!(
                "everything on + fleet / everything on: {:.3} throughput, {} modelgate CPU per call; Redis per call: {} commands, {} CPU µs{}",
                f.rps() / e.rps(),
                match (f.cpu_per_1000(), e.cpu_per_1000()) {
                    (Some(a), Some(b)) => format!("{:.3}", a / b),
                    _ => "-".into(),
                },
                redis_per_call.map_or("-".into(), |c| format!("{:.3}", c.0)),
                redis_per_call.map_or("-".into(), |c| format!("{:.1}", c.1)),
                // modelgate's and Redis's CPU per call together, against everything on alone.
                match (f.cpu_per_1000(), e.cpu_per_1000(), redis_per_call) {
                    (Some(a), Some(b), Some(c)) => format!(
                        "; modelgate + Redis CPU per call / everything on: {:.3}",
                        (a / 1000.0 + c.1 / 1e6) / (b / 1000.0)
                    ),
                    _ => String::new(),
                },
            );
        }
        let mut h2load_json = serde_json::Value::Null;
        if h2load_on() {
            let clients: usize = env_or("BENCH_H2LOAD_CLIENTS", 4);
            let streams: usize = env_or("BENCH_H2LOAD_STREAMS", 32);
            let grpc_body = grpc_body(dir.path());
            let rest_body = dir.path().join("request.json");
            std::fs::write(&rest_body, REST_BODY).unwrap();
            // Like the closed loop: BENCH_REPEAT rounds, the targets interleaved within each,
            // and each target's median round (by throughput) reported.
            let grpc_targets: Vec<&Target> = targets.iter().filter(|t| !t.rest).collect();
            let rest_targets = [
                ("direct REST (model server)", model_rest, None),
                ("modelgate routing only, REST", routing_data, Some(routing.0.id())),
            ];
            let mut grpc_rounds: Vec<Vec<H2load>> = grpc_targets.iter().map(|_| Vec::new()).collect();
            let mut rest_rounds: Vec<Vec<H2load>> = rest_targets.iter().map(|_| Vec::new()).collect();
            for round in 0..repeat {
                for (i, t) in grpc_targets.iter().enumerate() {
                    eprintln!(
                        "h2load gRPC (round {}/{repeat}), {clients} connections × {streams} streams: {}",
                        round + 1,
                        t.name
                    );
                    grpc_rounds[i].push(h2load_grpc(
                        t.name.to_string(),
                        t.pid,
                        t.addr,
                        &grpc_body,
                        (clients, streams),
                        None,
                        seconds,
                    ));
                }
                for (i, (name, addr, pid)) in rest_targets.iter().enumerate() {
                    eprintln!(
                        "h2load REST (HTTP/1.1, round {}/{repeat}), {concurrency} connections: {name}",
                        round + 1
                    );
                    rest_rounds[i].push(h2load(
                        name.to_string(),
                        *pid,
                        &format!("http://{addr}/v2/models/bench/infer"),
                        &rest_body,
                        &["content-type: application/json"],
                        true,
                        (concurrency, 1),
                        None,
                        seconds,
                    ));
                }
            }
            let grpc_runs: Vec<H2load> = grpc_rounds.into_iter().map(H2load::median).collect();
            let rest_runs: Vec<H2load> = rest_rounds.into_iter().map(H2load::median).collect();
            print_h2load(
                &format!("h2load gRPC, {clients} connections × {streams} streams, saturation"),
                &grpc_runs,
            );
            print_h2load(
                &format!("h2load REST over HTTP/1.1, {concurrency} connections, saturation (ratio to direct REST)"),
                &rest_runs,
            );
            let json = |r: &H2load, base: f64| {
                serde_json::json!({"target": r.target, "rps": r.rps, "ratio": r.rps / base,
                    "mean_ms": r.mean_ms, "failed": r.failed, "rounds_rps": r.rounds,
                    "proxy_cpu_us_per_call": r.cpu_us_per_call()})
            };
            h2load_json = serde_json::json!({
                "grpc": grpc_runs.iter().map(|r| json(r, grpc_runs[0].rps)).collect::<Vec<_>>(),
                "rest": rest_runs.iter().map(|r| json(r, rest_runs[0].rps)).collect::<Vec<_>>(),
            });
        }
        let mut overload_json = serde_json::Value::Null;
        if let Some((p, data, model, admin)) = &overload_gate {
            MODEL_PID.store(model.0.id(), Ordering::Relaxed);
            let target = Target {
                name: "modelgate overload",
                addr: *data,
                pid: Some(p.0.id()),
                rest: false,
            };
            let factor: f64 = env_or("BENCH_OVERLOAD_FACTOR", 2.0);
            let callers: usize = env_or("BENCH_OVERLOAD_CALLERS", 2048);
            eprintln!("overload: maximum, closed loop with {overload_cap} callers");
            let max = closed(&target, overload_cap, connections, seconds).await;
            let rate = (max.rps() * factor).round();
            eprintln!("overload: open loop at {rate:.0} req/s");
            let o = overload(&target, rate, callers, connections, seconds).await;
            o.print(&max, overload_cap, callers, &overload_latency);
            let per_call = |cpu: f64, n: u64| cpu / n.max(1) as f64 * 1e6;
            let (max_gen, max_model) = max.shared_us();
            println!(
                "CPU µs per call at the maximum / at {factor:.0}x: modelgate {:.1} / {:.1}, load generator {max_gen:.1} / {:.1}, model server {max_model:.1} / {:.1}",
                max.cpu_per_1000().unwrap_or(0.0) * 1000.0,
                o.proxy.map_or(0.0, |u| per_call(u.cpu_seconds, o.ok + o.shed)),
                per_call(o.shared.generator, o.ok + o.shed),
                per_call(o.shared.model, o.ok),
            );
            overload_json = o.json(&max, overload_cap);
            overload_json["model_latency"] = overload_latency.clone().into();
            if h2load_on() {
                overload_json["h2load"] = h2load_overload(
                    &target,
                    *admin,
                    &grpc_body(dir.path()),
                    (connections, overload_cap, callers),
                    factor,
                    seconds,
                );
            }
        }
        if let Some(path) = json_path {
            let doc = serde_json::json!({
                "overload": overload_json,
                "h2load": h2load_json,
                "machine": machine(), "concurrency": concurrency, "connections": connections,
                "seconds": seconds, "open_loop_rate": rate,
                "closed": closed_runs.iter().map(|r| r.json(&closed_runs[0])).collect::<Vec<_>>(),
                "open": open_runs.iter().map(|r| r.json(&open_runs[0])).collect::<Vec<_>>(),
                "open_loop_callers": open_workers,
            });
            std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
            println!("JSON written to {path}");
        }
        drop(_others);
    });
}
