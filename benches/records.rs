//! Record pipeline and feature store benchmarks (no network):
//!
//! 1. the rate the record writer sustains: N ModelInfer records (1×16 FP32 features, a
//!    threshold prediction, an entity) handed to the recorder at once, timed until all are in
//!    RocksDB — with the feature store on (every feature also written under its entity) and off;
//! 2. online feature lookups: `get_features` of 100 entities × 10 features from a store holding
//!    10,000 entities × 10 features × 3 versions, answered from "latest" (as of now) and from
//!    history (as of the past), reported as latency percentiles.
//!
//! `cargo bench --bench records`; `BENCH_RECORDS` (default 200000) sets N.

use std::sync::Arc;
use std::time::{Duration, Instant};

use modelgate::clock::{Clock, SystemClock};
use modelgate::feature_store::FeatureCatalog;
use modelgate::pb::inference::{
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use modelgate::protocol::oip_grpc::OipRequest;
use modelgate::record::FeatureValue;
use modelgate::recorder::{RawRecord, Recorder, RecorderSettings};
use modelgate::registry::PredictionSpec;
use modelgate::routing::Route;
use modelgate::storage::{RecordLog, RecordWrites};
use modelgate::store::Store;
use modelgate::telemetry::Metrics;
use prost::Message;

fn route() -> Arc<Route> {
    Arc::new(Route {
        model: "bench".into(),
        version: 1,
        version_label: "1".into(),
        endpoint: "http://127.0.0.1:1".into(),
        backend_model: None,
        backend_version: None,
        backend_protocol: Default::default(),
        prediction: PredictionSpec::Threshold {
            output: "probabilities".into(),
            threshold: 0.5,
            positive_label: "1".into(),
            negative_label: "0".into(),
        },
        feature_names: Default::default(),
        metrics: Default::default(),
    })
}

fn raw(i: usize, entity: bool, response: &bytes::Bytes) -> RawRecord {
    let infer = ModelInferRequest {
        model_name: "bench".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 16],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: (0..16).map(|j| (i * 16 + j) as f32 * 0.01).collect(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    };
    RawRecord {
        request_id: uuid::Uuid::now_v7().to_string(),
        time_ms: SystemClock.now_ms(),
        method: "/inference.GRPCInferenceService/ModelInfer".into(),
        model: "bench".into(),
        route: Some(route()),
        unit_id: entity.then(|| format!("user-{}", i % 50_000)),
        status: 0,
        upstream_latency: Some(Duration::from_micros(300)),
        latency: Duration::from_micros(400),
        size: infer.encoded_len() + response.len(),
        request: Some(std::sync::Arc::new(OipRequest::from(&infer))),
        response: Some(response.clone()),
        ..Default::default()
    }
}

fn writer_rate(n: usize, entity: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let storage = modelgate::store::storage(Store::open(dir.path()).unwrap());
    let metrics = Arc::new(Metrics::new());
    let (recorder, writer) = Recorder::start(
        storage.records,
        storage.tallies,
        RecorderSettings {
            queue: n + 1,
            queue_bytes: usize::MAX / 2,
            ..Default::default()
        },
        metrics.clone(),
        Arc::new(FeatureCatalog::default()),
        None,
    );
    let response = bytes::Bytes::from(
        ModelInferResponse {
            model_name: "bench".into(),
            outputs: vec![InferOutputTensor {
                name: "probabilities".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                parameters: Default::default(),
                contents: Some(InferTensorContents {
                    fp32_contents: vec![0.3, 0.7],
                    ..Default::default()
                }),
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let records: Vec<RawRecord> = (0..n).map(|i| raw(i, entity, &response)).collect();
    let started = Instant::now();
    for r in records {
        assert!(recorder.submit(r), "the queue holds every record");
    }
    recorder.flush_blocking();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(metrics.records_written.get(), n as u64);
    drop(recorder);
    writer.join().unwrap();
    n as f64 / secs
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
}

fn feature_lookups() -> Vec<(String, f64, f64, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let features: Vec<String> = (0..10).map(|f| format!("f{f}")).collect();
    let now = SystemClock.now_ms();
    for chunk in (0..10_000).collect::<Vec<usize>>().chunks(500) {
        let mut batch = RecordWrites::default();
        for &e in chunk {
            for v in 0..3u64 {
                let t = now - 3_600_000 + v * 600_000;
                let values: Vec<FeatureValue> = (0..features.len())
                    .map(|fi| FeatureValue::Number((e * 10 + fi) as f64 + v as f64))
                    .collect();
                batch.add_features(
                    &format!("entity-{e}"),
                    t,
                    features.iter().map(String::as_str).zip(&values),
                );
            }
        }
        store.commit(batch, false).unwrap();
    }
    let with_ttl: Vec<(String, Option<u64>)> = features.iter().map(|f| (f.clone(), None)).collect();
    let mut out = Vec::new();
    // First from the memtable (just written), then from SST files (the steady state).
    for place in ["memtable", "SST files"] {
        if place == "SST files" {
            store.flush_features().unwrap();
        }
        for (when, as_of) in [("as of now", now), ("45 min ago", now - 2_700_000)] {
            let mut times = Vec::new();
            for round in 0..1000usize {
                let entities: Vec<String> = (0..100)
                    .map(|k| format!("entity-{}", (round * 7919 + k * 101) % 10_000))
                    .collect();
                let t = Instant::now();
                let cells = store.get_features(&entities, &with_ttl, as_of).unwrap();
                times.push(t.elapsed());
                assert!(cells.iter().all(|row| row.iter().all(Option::is_some)));
            }
            times.sort();
            out.push((
                format!("{place}, {when}"),
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                percentile(&times, 0.999),
            ));
        }
    }
    out
}

fn main() {
    let n: usize = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!("record writer, {n} records of 1x16 FP32 features + threshold prediction:");
    for (label, entity) in [
        ("prediction log only", false),
        ("log + feature store (16 features/entity)", true),
    ] {
        println!("  {label:<44} {:>10.0} records/s", writer_rate(n, entity));
    }
    println!("feature lookups, 100 entities x 10 features (10,000 entities x 10 features x 3 versions stored):");
    println!(
        "  {:<32} {:>9} {:>9} {:>9}",
        "read", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for (name, p50, p99, p999) in feature_lookups() {
        println!("  {name:<32} {p50:>9.0} {p99:>9.0} {p999:>9.0}");
    }
}
