//! Load benchmark: the built-in model server directly vs. through modelgate.
//!
//! `cargo bench --bench proxy_load` starts the release binary as two model servers
//! (`modelgate model-server`, a logistic model over 16 features) and `modelgate serve` in front,
//! registers the model (plus a shadow version on the second server and one whose endpoint is
//! down), then drives `ModelInfer` with a 1×16 FP32 input at a fixed concurrency for a fixed time
//! against: the model server directly, modelgate routing only, modelgate mirroring 100% to a
//! healthy shadow, and modelgate mirroring 100% to a shadow that is down — and prints throughput,
//! the ratio to direct, and latency percentiles side by side. Settings (environment): `BENCH_CONCURRENCY` (default 32),
//! `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (default 4), `BENCH_JSON=1` for JSON too.
//!
//! Everything runs on one machine: the load generator, modelgate and the model server share its
//! cores, so the figures measure the cost modelgate adds under contention, not a NIC.

use std::net::SocketAddr;
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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("modelgate binary starts"),
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

struct Result {
    name: &'static str,
    requests: u64,
    errors: u64,
    seconds: f64,
    hist: Histogram<u64>,
}

impl Result {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Closed loop: `concurrency` workers, each sending the next request when the last one answers.
async fn run(
    name: &'static str,
    addr: SocketAddr,
    concurrency: usize,
    connections: usize,
    seconds: f64,
) -> Result {
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
    // Warm-up: connections, pools, caches.
    let mut warm = GrpcInferenceServiceClient::new(channels[0].clone());
    for _ in 0..200 {
        warm.model_infer(request()).await.expect("warm-up request");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut client = GrpcInferenceServiceClient::new(channels[w % connections].clone());
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let req = request();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.model_infer(req.clone()).await {
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
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    Result {
        name,
        requests: hist.len(),
        errors: errors.load(Ordering::Relaxed),
        seconds: elapsed,
        hist,
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

fn main() {
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 32);
    let seconds: f64 = env_or("BENCH_SECONDS", 10.0);
    let connections: usize = env_or("BENCH_CONNECTIONS", 4).max(1);
    let json = std::env::var("BENCH_JSON").is_ok_and(|v| v == "1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let model_addr = free_addr();
        let _model = spawn(&[
            "model-server",
            "--listen",
            &model_addr.to_string(),
            "--model",
            "name=bench;kind=logistic;features=16;seed=1",
        ]);
        // A second server for the healthy shadow (same model), and an address nothing listens on
        // for the shadow that is down.
        let shadow_addr = free_addr();
        let _shadow = spawn(&[
            "model-server",
            "--listen",
            &shadow_addr.to_string(),
            "--model",
            "name=bench;kind=logistic;features=16;seed=1",
        ]);
        let down_addr = free_addr();
        let (data, control, admin) = (free_addr(), free_addr(), free_addr());
        let _mg = spawn(&[
            "serve",
            "--listen",
            &data.to_string(),
            "--control-listen",
            &control.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--log-level",
            "warn",
        ]);
        wait_for(model_addr).await;
        wait_for(shadow_addr).await;
        wait_for(control).await;
        wait_for(data).await;
        let mut reg = pb::registry_client::RegistryClient::connect(format!("http://{control}"))
            .await
            .unwrap();
        for addr in [model_addr, shadow_addr, down_addr] {
            reg.register_model_version(pb::RegisterModelVersionRequest {
                model: "bench".into(),
                endpoint: format!("http://{addr}"),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let mut shadows = pb::shadows_client::ShadowsClient::connect(format!("http://{control}"))
            .await
            .unwrap();
        reg.transition_stage(pb::TransitionStageRequest {
            model: "bench".into(),
            version: "1".into(),
            stage: pb::Stage::Production as i32,
            force: false,
        })
        .await
        .unwrap();

        eprintln!(
            "ModelInfer 1x16 FP32, closed loop, concurrency {concurrency} over {connections} HTTP/2 connections, {seconds}s per target; machine: {}",
            machine()
        );
        let direct = run("direct", model_addr, concurrency, connections, seconds).await;
        let proxied = run("modelgate (routing)", data, concurrency, connections, seconds).await;
        let shadow = |version: &str| pb::SetShadowRequest {
            model: "bench".into(),
            version: version.into(),
            sample_fraction: 1.0,
            ..Default::default()
        };
        shadows.set_shadow(shadow("2")).await.unwrap();
        let healthy = run("+ 100% shadow (healthy)", data, concurrency, connections, seconds).await;
        shadows
            .remove_shadow(pb::RemoveShadowRequest {
                model: "bench".into(),
                version: "2".into(),
            })
            .await
            .unwrap();
        shadows.set_shadow(shadow("3")).await.unwrap();
        let down = run("+ 100% shadow (down)", data, concurrency, connections, seconds).await;
        let results = [&direct, &proxied, &healthy, &down];
        println!(
            "{:<24} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7}",
            "target", "req/s", "ratio", "p50 ms", "p99 ms", "p99.9 ms", "errors"
        );
        for r in results {
            println!(
                "{:<24} {:>10.0} {:>8.3} {:>9.3} {:>9.3} {:>9.3} {:>7}",
                r.name,
                r.rps(),
                r.rps() / direct.rps(),
                r.ms(0.5),
                r.ms(0.99),
                r.ms(0.999),
                r.errors
            );
        }
        println!(
            "p99 with a shadow that is down vs. without shadows: {:+.1}%",
            (down.ms(0.99) / proxied.ms(0.99) - 1.0) * 100.0
        );
        if json {
            let rows: Vec<serde_json::Value> = results
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "target": r.name, "requests": r.requests, "errors": r.errors,
                        "rps": r.rps(), "ratio_to_direct": r.rps() / direct.rps(),
                        "p50_ms": r.ms(0.5), "p99_ms": r.ms(0.99), "p999_ms": r.ms(0.999),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "machine": machine(), "concurrency": concurrency,
                    "connections": connections, "seconds": seconds, "results": rows,
                })
            );
        }
    });
}
