//! `modelgate demo`: two built-in model servers, modelgate in front of them, and traffic through it
//! — everything real, over gRPC on 127.0.0.1, cleaned up at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::Channel;

use crate::config::Config;
use crate::model_server::{self, ModelSpec};
use crate::pb::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::registry_client::RegistryClient;

/// Options of the demo.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep modelgate's RocksDB here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Requests to send before and after the promotion.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Keep modelgate and the model servers running after the demo (until Ctrl-C).
    #[arg(long)]
    pub keep_running: bool,
}

const FEATURES: [&str; 4] = ["sepal_length", "sepal_width", "petal_length", "petal_width"];

/// Simulated samples: four features in plausible ranges, deterministic.
fn sample(i: usize) -> [f32; 4] {
    let t = i as f32;
    [
        5.0 + (t * 0.37).sin(),
        3.0 + (t * 0.23).cos() * 0.5,
        3.5 + (t * 0.11).sin() * 2.0,
        1.2 + (t * 0.07).cos() * 0.8,
    ]
}

fn infer_request(i: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "iris".into(),
        id: format!("demo-{i}"),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: sample(i).to_vec(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

struct Traffic {
    by_version: std::collections::BTreeMap<String, usize>,
    positive: usize,
    errors: usize,
    latencies: Vec<Duration>,
}

async fn send_traffic(
    client: &mut GrpcInferenceServiceClient<Channel>,
    n: usize,
    offset: usize,
) -> Traffic {
    let mut t = Traffic {
        by_version: Default::default(),
        positive: 0,
        errors: 0,
        latencies: Vec::with_capacity(n),
    };
    for i in 0..n {
        let started = Instant::now();
        match client.model_infer(infer_request(offset + i)).await {
            Ok(resp) => {
                t.latencies.push(started.elapsed());
                let version = resp
                    .metadata()
                    .get(crate::proxy::VERSION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                *t.by_version.entry(version).or_default() += 1;
                let r = resp.into_inner();
                let label = r
                    .outputs
                    .iter()
                    .position(|o| o.name == "label")
                    .and_then(|i| r.outputs[i].contents.as_ref())
                    .and_then(|c| c.int64_contents.first().copied());
                if label == Some(1) {
                    t.positive += 1;
                }
            }
            Err(_) => t.errors += 1,
        }
    }
    t.latencies.sort();
    t
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(title: &str, t: &Traffic) {
    println!("  {title}");
    for (v, n) in &t.by_version {
        println!("    served by version {v}: {n} requests");
    }
    println!(
        "    predicted label 1: {} of {}; errors: {}; latency p50 {:?}, p99 {:?}",
        t.positive,
        t.latencies.len(),
        t.errors,
        pct(&t.latencies, 0.5),
        pct(&t.latencies, 0.99)
    );
}

/// Runs the demo and prints what happens.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let v1: ModelSpec = "name=iris;kind=logistic;weights=0.9,-1.2,0.8,0.6;bias=-2.5;version=v1"
        .parse()
        .map_err(anyhow::Error::msg)?;
    let v2: ModelSpec = "name=iris;kind=logistic;weights=-0.4,0.7,1.1,-0.3;bias=-1.0;version=v2"
        .parse()
        .map_err(anyhow::Error::msg)?;
    let server_a = model_server::spawn(any, vec![v1]).await?;
    let server_b = model_server::spawn(any, vec![v2]).await?;
    println!("model servers (built-in, Open Inference Protocol v2):");
    println!(
        "  iris v1 at {}   iris v2 at {}",
        server_a.endpoint(),
        server_b.endpoint()
    );

    let tmp = tempfile::tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("modelgate-data"));
    let mut config = Config::for_tests(&data_dir);
    config.shutdown_grace = Duration::from_secs(5);
    let mg = crate::server::start(config).await?;
    println!(
        "modelgate: data port {}, control port {}, admin port {}, RocksDB in {}",
        mg.data_addr,
        mg.control_addr,
        mg.admin_addr,
        data_dir.display()
    );

    let mut registry = RegistryClient::connect(format!("http://{}", mg.control_addr))
        .await
        .context("connecting to the control port")?;
    let prediction = pb::PredictionSpec {
        kind: Some(pb::prediction_spec::Kind::Threshold(
            pb::ThresholdPrediction {
                output: "probabilities".into(),
                threshold: 0.5,
                positive_label: "1".into(),
                negative_label: "0".into(),
            },
        )),
    };
    let mut versions = Vec::new();
    for (server, accuracy, what) in [
        (&server_a, 0.91, "first model"),
        (&server_b, 0.94, "retrained"),
    ] {
        let v = registry
            .register_model_version(pb::RegisterModelVersionRequest {
                model: "iris".into(),
                endpoint: server.endpoint(),
                metrics: [("accuracy".to_string(), accuracy)].into(),
                tags: [("features".to_string(), FEATURES.join(","))].into(),
                description: what.into(),
                prediction: Some(prediction.clone()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .version
            .context("registration answered no version")?;
        versions.push(v.version);
    }
    println!("\nregistered iris versions {versions:?} (stage staging)");
    registry
        .set_promotion_policy(pb::SetPromotionPolicyRequest {
            model: "iris".into(),
            minimum_metrics: [("accuracy".to_string(), 0.9)].into(),
            ..Default::default()
        })
        .await?;
    println!("promotion policy: accuracy >= 0.9");
    let promote = |v: u32| pb::TransitionStageRequest {
        model: "iris".into(),
        version: v.to_string(),
        stage: pb::Stage::Production as i32,
        force: false,
    };
    registry.transition_stage(promote(versions[0])).await?;
    registry
        .set_alias(pb::SetAliasRequest {
            model: "iris".into(),
            alias: "challenger".into(),
            version: versions[1].to_string(),
        })
        .await?;
    println!(
        "promoted version {} to production; alias challenger -> {}",
        versions[0], versions[1]
    );

    let mut client =
        GrpcInferenceServiceClient::connect(format!("http://{}", mg.data_addr)).await?;
    println!(
        "\nsending {} ModelInfer requests through modelgate…",
        args.requests
    );
    let before = send_traffic(&mut client, args.requests, 0).await;
    report("before the promotion:", &before);

    let moved = registry
        .transition_stage(pb::TransitionStageRequest {
            version: "challenger".into(),
            ..promote(0)
        })
        .await?
        .into_inner();
    println!(
        "\npromoted the challenger (version {}); archived: {:?}",
        moved.version.map(|v| v.version).unwrap_or_default(),
        moved.archived.iter().map(|v| v.version).collect::<Vec<_>>()
    );
    let after = send_traffic(&mut client, args.requests, args.requests).await;
    report("after the promotion (same inputs, new weights):", &after);

    let err = client
        .model_infer(ModelInferRequest {
            model_name: "unknown-model".into(),
            ..infer_request(0)
        })
        .await
        .expect_err("unknown models are refused");
    println!(
        "\nan unknown model is refused: {:?}: {}",
        err.code(),
        err.message()
    );

    if args.keep_running {
        println!("\nstill running; try (Ctrl-C to stop):");
        println!("  grpcurl -plaintext {} list", mg.control_addr);
        println!(
            "  grpcurl -plaintext -d '{{\"model\":\"iris\"}}' {} modelgate.v1.Registry/ListModelVersions",
            mg.control_addr
        );
        println!("  curl -s http://{}/metrics", mg.admin_addr);
        tokio::signal::ctrl_c().await?;
    }
    mg.shutdown().await;
    server_a.stop().await;
    server_b.stop().await;
    println!("\ndemo finished: everything stopped and cleaned up");
    Ok(())
}
