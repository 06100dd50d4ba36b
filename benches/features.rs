//! Criterion micro-benchmark of what the record writer does per request: OIP feature extraction
//! (typed and raw contents, one sample and a batch of 32) and turning a request and its answer into
//! the stored record (features, predictions, protobuf encoding). `cargo bench --bench features`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use modelgate::control::State;
use modelgate::oip;
use modelgate::pb::inference::{
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use modelgate::protocol::oip_grpc::{self, OipRequest};
use modelgate::record;
use modelgate::recorder::{self, RawRecord, RecorderSettings};
use modelgate::registry::{NewVersion, PredictionSpec, Registry, Stage};
use modelgate::routing::{Lookup, Route, RoutingTable};
use prost::Message;

const FEATURES: usize = 16;

fn request(rows: usize, raw: bool) -> ModelInferRequest {
    let values: Vec<f32> = (0..rows * FEATURES)
        .map(|i| (i % 97) as f32 * 0.5)
        .collect();
    let mut tensor = InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, FEATURES as i64],
        ..Default::default()
    };
    let mut req = ModelInferRequest {
        model_name: "m".into(),
        ..Default::default()
    };
    if raw {
        req.raw_input_contents = vec![oip::f32_raw(&values)];
    } else {
        tensor.contents = Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        });
    }
    req.inputs = vec![tensor];
    req
}

fn response(rows: usize) -> ModelInferResponse {
    ModelInferResponse {
        model_name: "m".into(),
        outputs: vec![InferOutputTensor {
            name: "probabilities".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 3],
            contents: Some(InferTensorContents {
                fp32_contents: (0..rows * 3).map(|i| (i % 7) as f32 / 7.0).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn names() -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([(
        "input".to_string(),
        (0..FEATURES).map(|i| format!("f{i:02}")).collect(),
    )])
}

fn route() -> Arc<Route> {
    let mut r = Registry::default();
    r.register(
        NewVersion {
            model: "m".into(),
            endpoint: "127.0.0.1:1".into(),
            prediction: Some(PredictionSpec::Argmax {
                output: "probabilities".into(),
                labels: vec!["a".into(), "b".into(), "c".into()],
            }),
            feature_names: names(),
            ..Default::default()
        },
        0,
    )
    .unwrap();
    r.transition("m", "1", Stage::Production, false, 0).unwrap();
    let table = RoutingTable::build(
        &State {
            registry: r,
            ..Default::default()
        },
        None,
    );
    match table.lookup("m") {
        Lookup::Found(route) => route,
        _ => unreachable!("version 1 is in production"),
    }
}

fn extraction(c: &mut Criterion) {
    let names = names();
    for (rows, raw) in [(1, false), (1, true), (32, false), (32, true)] {
        let req = request(rows, raw);
        let label = format!(
            "extract features: {rows} x {FEATURES} FP32, {} contents",
            if raw { "raw" } else { "typed" }
        );
        c.bench_function(&label, |b| {
            b.iter(|| {
                let inputs = oip_grpc::inputs(&req, 1 << 20).unwrap();
                black_box(
                    record::extract_features(&inputs, &names, "", Some("user-1"), None).unwrap(),
                )
            })
        });
    }
}

fn encoding(c: &mut Criterion) {
    let settings = RecorderSettings::default();
    let route = route();
    for rows in [1, 32] {
        let raw = RawRecord {
            request_id: "0192f3a1-7c1e-7b2a-9d3e-4f5a6b7c8d9e".into(),
            time_ms: 1_795_000_000_000,
            method: "/inference.GRPCInferenceService/ModelInfer".into(),
            model: "m".into(),
            route: Some(route.clone()),
            unit_id: Some("user-1".into()),
            latency: Duration::from_micros(420),
            upstream_latency: Some(Duration::from_micros(380)),
            request: Some(Arc::new(OipRequest::from(&request(rows, false)))),
            response: Some(response(rows).encode_to_vec().into()),
            ..Default::default()
        };
        // As the writer does after a model's first record: its names are shared.
        let names = recorder::prepare(&raw, &settings, None).features.columns();
        c.bench_function(
            &format!("prepare + encode record: {rows} x {FEATURES} features, argmax"),
            |b| {
                b.iter(|| {
                    let p = recorder::prepare(&raw, &settings, Some(&names));
                    black_box(p.encode(&raw).bytes)
                })
            },
        );
    }
}

criterion_group!(benches, extraction, encoding);
criterion_main!(benches);
