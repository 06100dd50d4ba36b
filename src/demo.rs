//! `modelgate demo`: everything modelgate does, for real, in one process that cleans up after
//! itself. Two built-in model servers (two versions of an `iris` classifier with different
//! weights) and modelgate on free 127.0.0.1 ports with RocksDB in a temporary directory; the
//! versions are registered and one promoted; an A/B experiment and a shadow are set up, a drift
//! reference uploaded and a retraining policy set; simulated users send traffic (with a progress
//! bar), outcomes come back with the treatment known to be better, and half-way through one
//! feature shifts. Then a summary: the experiment's tests, shadow agreement, the drift report,
//! performance per version, the events — and how to look further with `modelgate ctl`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::config::Config;
use crate::model_server::{self, ModelSpec};
use crate::pb::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
};
use crate::pb::modelgate::v1 as pb;

/// Options of the demo.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep modelgate's RocksDB here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Requests to send in all (half before the feature shift, half after).
    #[arg(long, default_value_t = 4000)]
    pub requests: usize,
    /// Simulated users (units of the experiment).
    #[arg(long, default_value_t = 600)]
    pub users: usize,
    /// Keep modelgate and the model servers running after the summary (until Ctrl-C).
    #[arg(long)]
    pub keep_running: bool,
    /// Run a fleet of this many modelgate replicas sharing a Redis (started by the demo; needs
    /// `redis-server` installed): traffic is spread round robin, outcomes go to another replica,
    /// and the summary is read from the last one (docs/fleet.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub replicas: u16,
}

/// A redis-server the demo started, stopped when dropped.
struct DemoRedis(std::process::Child, String);

impl DemoRedis {
    fn start(dir: &std::path::Path) -> anyhow::Result<DemoRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("--replicas needs redis-server (e.g. apt-get install redis-server)")?;
        let redis = DemoRedis(child, format!("redis://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }
}

impl Drop for DemoRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MODEL: &str = "iris";
const EXPERIMENT: &str = "iris-ab";
const FEATURES: [&str; 4] = ["sepal_length", "sepal_width", "petal_length", "petal_width"];
/// Means and standard deviations of the simulated features.
const MEAN: [f64; 4] = [5.8, 3.0, 3.8, 1.2];
const SD: [f64; 4] = [0.8, 0.4, 1.7, 0.7];
/// The feature that shifts half-way, and by how much.
const SHIFTED: usize = 2;
const SHIFT: f64 = 2.0;
/// The world's true rule (with noise): version 2 learned it, version 1 did not quite.
const TRUTH: ([f64; 4], f64) = ([1.0, -1.0, 0.8, 0.5], -6.44);
const V1: &str = "name=iris;kind=logistic;weights=0.6,-1.4,0.5,1.2;bias=-2.62;version=1";
const V2: &str = "name=iris;kind=logistic;weights=1.0,-1.0,0.8,0.5;bias=-6.44;version=2";
/// Concurrent callers.
const CALLERS: usize = 16;

/// One simulated sample.
fn sample(rng: &mut impl Rng, shifted: bool) -> [f32; 4] {
    let mut x = [0f32; 4];
    for (i, v) in x.iter_mut().enumerate() {
        // Box–Muller: a normal deviate from two uniforms.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let shift = if shifted && i == SHIFTED { SHIFT } else { 0.0 };
        *v = (MEAN[i] + SD[i] * z + shift) as f32;
    }
    x
}

/// The true label of a sample: the true rule plus noise, so even version 2 is not always right.
fn truth(x: &[f32; 4], noise: f64) -> &'static str {
    let score: f64 = TRUTH
        .0
        .iter()
        .zip(x)
        .map(|(w, v)| w * *v as f64)
        .sum::<f64>()
        + TRUTH.1;
    if score + noise > 0.0 {
        "1"
    } else {
        "0"
    }
}

fn infer_request(x: [f32; 4]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: x.to_vec(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// What one call came back with.
struct Served {
    request_id: String,
    version: String,
    truth: &'static str,
}

/// Sends `n` calls from `users` simulated users with `CALLERS` concurrent callers; the progress
/// bar advances per answer.
async fn traffic(
    data: Vec<Channel>,
    n: usize,
    users: usize,
    seed: u64,
    shifted: bool,
    bar: &indicatif::ProgressBar,
) -> (Vec<Served>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        // Callers spread over the replicas, as a load balancer would.
        let (next, bar) = (next.clone(), bar.clone());
        let data = data[c % data.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut client = GrpcInferenceServiceClient::new(data);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + c as u64);
            let (mut served, mut errors) = (Vec::new(), 0usize);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let x = sample(&mut rng, shifted);
                let noise = (rng.random::<f64>() - 0.5) * 1.2;
                let mut req = tonic::Request::new(infer_request(x));
                let user = format!("user-{:04}", rng.random_range(0..users));
                req.metadata_mut()
                    .insert("x-user-id", user.parse().expect("ASCII"));
                match client.model_infer(req).await {
                    Ok(resp) => {
                        let header = |name: &str| {
                            resp.metadata()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        served.push(Served {
                            request_id: header(crate::proxy::REQUEST_ID_HEADER),
                            version: header(crate::proxy::VERSION_HEADER),
                            truth: truth(&x, noise),
                        });
                    }
                    Err(_) => errors += 1,
                }
                bar.inc(1);
            }
            (served, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((s, e)) = t.await {
            all.extend(s);
            errors += e;
        }
    }
    (all, errors)
}

/// Waits for every replica's records to be written — and, in a fleet, for their prediction stubs
/// to reach Redis, so that outcomes sent to another replica join.
async fn settle(fleet: &[crate::server::Running]) {
    for r in fleet {
        r.recorder.flush().await;
    }
    if fleet.len() > 1 {
        tokio::time::sleep(crate::fleet::outcomes::STUB_FLUSH * 3).await;
    }
}

/// Reports the true label of every call, as a labelling pipeline would, in one client stream.
async fn report_outcomes(control: Channel, served: &[Served]) -> anyhow::Result<u32> {
    let batches: Vec<pb::RecordOutcomesRequest> = served
        .chunks(500)
        .map(|chunk| pb::RecordOutcomesRequest {
            outcomes: chunk
                .iter()
                .map(|s| pb::RecordOutcomeRequest {
                    request_id: s.request_id.clone(),
                    actual: Some(pb::Actual {
                        kind: Some(pb::actual::Kind::Label(s.truth.into())),
                    }),
                    ..Default::default()
                })
                .collect(),
        })
        .collect();
    let answer = pb::outcomes_client::OutcomesClient::new(control)
        .record_outcomes(tokio_stream::iter(batches))
        .await?
        .into_inner();
    Ok(answer.accepted)
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

fn fmt_p(p: Option<f64>) -> String {
    match p {
        None => "–".into(),
        Some(p) if p < 1e-4 => format!("{p:.1e}"),
        Some(p) => format!("{p:.4}"),
    }
}

/// Runs the demo and prints what happens.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let v1: ModelSpec = V1.parse().map_err(anyhow::Error::msg)?;
    let v2: ModelSpec = V2.parse().map_err(anyhow::Error::msg)?;
    let server_1 = model_server::spawn(any, vec![v1]).await?;
    let server_2 = model_server::spawn(any, vec![v2]).await?;

    let tmp = tempfile::tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("modelgate-data"));
    let replicas = usize::from(args.replicas.max(1));
    let redis = if replicas > 1 {
        Some(DemoRedis::start(tmp.path())?)
    } else {
        None
    };
    let mut fleet = Vec::new();
    for i in 0..replicas {
        let dir = if replicas == 1 {
            data_dir.clone()
        } else {
            data_dir.join(format!("replica-{}", i + 1))
        };
        let mut config = Config::for_tests(&dir);
        config.shutdown_grace = Duration::from_secs(5);
        if let Some(r) = &redis {
            config.fleet = Some(crate::fleet::FleetSettings {
                redis: crate::fleet::RedisSettings {
                    urls: vec![r.1.clone()],
                    cluster: false,
                    timeout: Duration::from_secs(1),
                    ca: None,
                },
                name: "demo".into(),
                poll: Duration::from_millis(500),
                outcome_window: Duration::from_secs(3600),
            });
        }
        fleet.push(crate::server::start(config).await?);
    }
    let mg = &fleet[0];
    let last = &fleet[replicas - 1];
    println!("modelgate demo — everything below is real gRPC on 127.0.0.1\n");
    println!(
        "  model server, iris version 1 (production)   {}",
        server_1.endpoint()
    );
    println!(
        "  model server, iris version 2 (challenger)   {}",
        server_2.endpoint()
    );
    for (i, r) in fleet.iter().enumerate() {
        println!(
            "  modelgate{}: data {}  control {}  admin http://{}",
            if replicas > 1 {
                format!(" replica {}", i + 1)
            } else {
                String::new()
            },
            r.data_addr,
            r.control_addr,
            r.admin_addr
        );
    }
    if let Some(r) = &redis {
        println!("  fleet store: {} (fleet 'demo')", r.1);
    }
    println!("  RocksDB: {}\n", data_dir.display());

    let control = Channel::from_shared(format!("http://{}", mg.control_addr))?
        .connect()
        .await
        .context("connecting to the control port")?;
    let mut data = Vec::new();
    for r in &fleet {
        data.push(
            Channel::from_shared(format!("http://{}", r.data_addr))?
                .connect()
                .await
                .context("connecting to the data port")?,
        );
    }
    // In a fleet, outcomes go to, and the summary is read from, the last replica: not the one
    // configured, and (for most calls) not the one that served.
    let summary = Channel::from_shared(format!("http://{}", last.control_addr))?
        .connect()
        .await
        .context("connecting to the control port")?;
    let mut registry = pb::registry_client::RegistryClient::new(control.clone());

    // 1. Registry: two versions with their offline metrics; promote version 1.
    for (server, accuracy, what) in [
        (&server_1, 0.91, "first model"),
        (&server_2, 0.94, "retrained on fresh data"),
    ] {
        registry
            .register_model_version(pb::RegisterModelVersionRequest {
                model: MODEL.into(),
                endpoint: server.endpoint(),
                metrics: [("accuracy".to_string(), accuracy)].into(),
                description: what.into(),
                prediction: Some(pb::PredictionSpec {
                    kind: Some(pb::prediction_spec::Kind::Label(pb::LabelPrediction {
                        output: "label".into(),
                    })),
                }),
                feature_names: vec![pb::InputFeatureNames {
                    input: "input".into(),
                    names: FEATURES.iter().map(|f| f.to_string()).collect(),
                }],
                ..Default::default()
            })
            .await?;
    }
    registry
        .transition_stage(pb::TransitionStageRequest {
            model: MODEL.into(),
            version: "1".into(),
            stage: pb::Stage::Production as i32,
            force: false,
        })
        .await?;
    println!("1. registered iris versions 1 and 2; version 1 promoted to production");

    // 2. An A/B experiment over 60% of users, and version 2 shadowing the rest.
    pb::experiments_client::ExperimentsClient::new(control.clone())
        .create_experiment(pb::CreateExperimentRequest {
            name: EXPERIMENT.into(),
            model: MODEL.into(),
            variants: vec![
                pb::VariantSpec {
                    name: "control".into(),
                    version: "1".into(),
                    weight: 1.0,
                },
                pb::VariantSpec {
                    name: "treatment".into(),
                    version: "2".into(),
                    weight: 1.0,
                },
            ],
            coverage: 0.6,
            ..Default::default()
        })
        .await?;
    pb::shadows_client::ShadowsClient::new(control.clone())
        .set_shadow(pb::SetShadowRequest {
            model: MODEL.into(),
            version: "2".into(),
            sample_fraction: 1.0,
            ..Default::default()
        })
        .await?;
    println!(
        "2. experiment '{EXPERIMENT}': 60% of users split 50/50 between version 1 (control) and 2 (treatment);\n   \
         the other 40% are served by production, and every such call is mirrored to version 2 (shadow)"
    );

    // 3. Drift: a reference sample of the training distribution; retrain when drift starts.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let rows = (0..2000)
        .map(|_| pb::ReferenceRow {
            values: sample(&mut rng, false)
                .iter()
                .map(|v| pb::FeatureValue {
                    kind: Some(pb::feature_value::Kind::Number(*v as f64)),
                })
                .collect(),
        })
        .collect();
    // Drift is evaluated per replica (docs/fleet.md): each gets the reference and the policy.
    let rows: Vec<pb::ReferenceRow> = rows;
    for r in &fleet {
        let mut drift = pb::drift_client::DriftClient::new(
            Channel::from_shared(format!("http://{}", r.control_addr))?
                .connect()
                .await?,
        );
        drift
            .set_reference(pb::SetReferenceRequest {
                model: MODEL.into(),
                feature_names: FEATURES.iter().map(|f| f.to_string()).collect(),
                rows: rows.clone(),
                categorical_features: vec![],
            })
            .await?;
        drift
            .set_retrain_policy(pb::RetrainPolicy {
                model: MODEL.into(),
                on_data_drift: true,
                on_performance_drift: true,
                ..Default::default()
            })
            .await?;
    }
    let mut drift = pb::drift_client::DriftClient::new(summary.clone());
    println!("3. drift reference: 2,000 rows of the training distribution; retrain on data or performance drift\n");

    // 4. Traffic, outcomes, the shift, more traffic and outcomes. The heading goes to stdout: the
    // progress bar is drawn on a terminal only.
    println!("4. traffic");
    let half = args.requests / 2;
    let bar = indicatif::ProgressBar::new((half * 2) as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "   {bar:40.cyan/blue} {pos:>5}/{len} calls  {per_sec}  {msg}",
        )
        .expect("a valid template"),
    );
    let users = args.users.max(1);
    bar.set_message("before the shift");
    let (first, e1) = traffic(data.clone(), half, users, 1, false, &bar).await;
    settle(&fleet).await;
    let accepted_1 = report_outcomes(summary.clone(), &first).await?;
    bar.set_message(format!("{} shifted by +{SHIFT}", FEATURES[SHIFTED]));
    let (second, e2) = traffic(data.clone(), half, users, 2, true, &bar).await;
    settle(&fleet).await;
    let accepted_2 = report_outcomes(summary.clone(), &second).await?;
    bar.finish_with_message("done");
    let served = first.len() + second.len();
    let mut by_version: BTreeMap<&str, usize> = BTreeMap::new();
    for s in first.iter().chain(&second) {
        *by_version.entry(s.version.as_str()).or_default() += 1;
    }
    println!(
        "   {served} calls answered ({} failed) from {users} users: {}; {} outcomes recorded\n   \
         half-way, '{}' shifted by +{SHIFT} (a data drift the model never saw)\n",
        e1 + e2,
        by_version
            .iter()
            .map(|(v, n)| format!("version {v} served {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        accepted_1 + accepted_2,
        FEATURES[SHIFTED]
    );

    // Let the record writer, shadow copies and the drift evaluator catch up (and, in a fleet,
    // every replica publish its tallies).
    for r in &fleet {
        r.recorder.flush().await;
    }
    if replicas > 1 {
        tokio::time::sleep(crate::fleet::PUBLISH_EVERY * 3).await;
    }
    let mut shadows = pb::shadows_client::ShadowsClient::new(summary.clone());
    let shadow_request = pb::GetShadowReportRequest {
        model: MODEL.into(),
        version: "2".into(),
        disagreements: 3,
    };
    let mut shadow = shadows
        .get_shadow_report(shadow_request.clone())
        .await?
        .into_inner();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for r in &fleet {
            r.recorder.flush().await;
        }
        if replicas > 1 {
            tokio::time::sleep(crate::fleet::PUBLISH_EVERY * 2).await;
        }
        let now = shadows
            .get_shadow_report(shadow_request.clone())
            .await?
            .into_inner();
        let settled = now.compared == shadow.compared && now.compared > 0;
        shadow = now;
        if settled {
            break;
        }
    }

    // 5. The summary.
    let results = pb::experiments_client::ExperimentsClient::new(summary.clone())
        .get_experiment_results(pb::ExperimentRef {
            name: EXPERIMENT.into(),
        })
        .await?
        .into_inner();
    println!("5. experiment '{EXPERIMENT}' (outcomes say which variant is right more often)");
    println!(
        "   {:<10} {:>7} {:>6} {:>9} {:>9} {:>16}",
        "variant", "version", "units", "requests", "outcomes", "success [95% CI]"
    );
    for v in &results.variants {
        println!(
            "   {:<10} {:>7} {:>6} {:>9} {:>9} {:>6} [{}, {}]",
            v.name,
            v.version,
            v.units,
            v.requests,
            v.outcomes,
            fmt_opt(v.success_rate, 3),
            fmt_opt(v.ci_low, 3),
            fmt_opt(v.ci_high, 3),
        );
    }
    if let Some(t) = &results.significance {
        println!(
            "   {}: statistic {}, p = {} → {}",
            t.test,
            fmt_opt(t.statistic, 2),
            fmt_p(t.p_value),
            if t.significant {
                "the difference is significant".to_string()
            } else if t.unavailable_reason.is_empty() {
                "no significant difference yet".to_string()
            } else {
                t.unavailable_reason.clone()
            }
        );
    }
    if let Some(t) = &results.sample_ratio_mismatch {
        println!(
            "   sample ratio check ({}): p = {} → {}",
            t.test,
            fmt_p(t.p_value),
            if t.significant {
                "MISMATCH: the split is not what was configured"
            } else {
                "the split matches the 50/50 weights"
            }
        );
    }

    println!(
        "\n6. shadow: version 2 answered copies of production's calls (production = version 1)"
    );
    println!(
        "   mirrored {}, compared {}, agreed {}: agreement {} [95% CI {}, {}]; dropped {}, timeouts {}",
        shadow.mirrored,
        shadow.compared,
        shadow.agreed,
        fmt_opt(shadow.agreement_rate, 3),
        fmt_opt(shadow.ci_low, 3),
        fmt_opt(shadow.ci_high, 3),
        shadow.dropped,
        shadow.timeouts
    );

    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: MODEL.into(),
            evaluate: true,
        })
        .await?
        .into_inner();
    println!(
        "\n7. data drift (last {} live rows per feature vs. the reference; Benjamini–Hochberg at {}){}",
        report.features.first().map_or(0, |f| f.window_size),
        report.false_discovery_rate,
        if replicas > 1 {
            format!("; replica {replicas}'s own traffic: drift is evaluated per replica")
        } else {
            String::new()
        }
    );
    println!(
        "   {:<14} {:<10} {:>9} {:>10} {:>7}  drifted",
        "feature", "test", "statistic", "adjusted p", "PSI"
    );
    for f in &report.features {
        println!(
            "   {:<14} {:<10} {:>9} {:>10} {:>7}  {}",
            f.name,
            f.test,
            fmt_opt(f.statistic, 3),
            fmt_p(f.adjusted_p_value),
            fmt_opt(f.psi, 2),
            if f.drifted { "YES" } else { "no" }
        );
    }
    let drifted: Vec<&str> = report
        .features
        .iter()
        .filter(|f| f.drifted)
        .map(|f| f.name.as_str())
        .collect();
    println!(
        "   → {}",
        if drifted.is_empty() {
            "no feature drifted".to_string()
        } else {
            format!("drifted: {}", drifted.join(", "))
        }
    );

    println!("\n8. performance per version (from outcomes)");
    let mut outcomes = pb::outcomes_client::OutcomesClient::new(summary.clone());
    for v in ["1", "2"] {
        let p = outcomes
            .get_model_performance(pb::GetModelPerformanceRequest {
                model: MODEL.into(),
                version: v.into(),
                window: 0,
            })
            .await?
            .into_inner();
        let (judged, acc) = p
            .all_time
            .as_ref()
            .map_or((0, None), |o| (o.judged, o.accuracy));
        println!(
            "   version {v}: accuracy {} over {judged} judged outcomes (registered offline: {})",
            fmt_opt(acc, 3),
            if v == "1" { "0.91" } else { "0.94" }
        );
    }

    println!("\n9. events");
    let mut events = pb::events_client::EventsClient::new(summary.clone())
        .watch(pb::WatchRequest::default())
        .await?
        .into_inner();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(300), events.message()).await
    {
        let marker = if e.r#type == "retrain_triggered" {
            "  ◀ retrain"
        } else {
            ""
        };
        println!("   #{:<3} {:<24} {}{marker}", e.cursor, e.r#type, e.message);
    }

    let ctl = format!("modelgate ctl --addr {}", mg.control_addr);
    println!("\nexplore (while it runs with --keep-running):");
    println!("  {ctl} models versions {MODEL}");
    println!("  {ctl} experiments results {EXPERIMENT}");
    println!("  {ctl} shadows report {MODEL} 2");
    println!("  {ctl} drift report {MODEL}");
    println!("  {ctl} predictions list {MODEL} --limit 5");
    println!("  {ctl} events watch --follow");
    println!(
        "  grpcurl -plaintext -d '{{\"name\":\"{EXPERIMENT}\"}}' {} modelgate.v1.Experiments/GetExperimentResults",
        mg.control_addr
    );
    println!(
        "  curl -s http://{}/metrics | grep modelgate_",
        mg.admin_addr
    );
    println!("\nfinished in {:.1} s", started.elapsed().as_secs_f64());

    if args.keep_running {
        println!("still running; Ctrl-C stops everything");
        tokio::signal::ctrl_c().await?;
    }
    for r in fleet {
        r.shutdown().await;
    }
    drop(redis);
    server_1.stop().await;
    server_2.stop().await;
    println!("stopped modelgate and both model servers; temporary files removed");
    Ok(())
}
