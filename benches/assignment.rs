//! Criterion micro-benchmark of A/B assignment and request routing: the hash bucket alone, a
//! whole routing decision (experiment lookup, unit hash, variant pick) on a snapshot with a running
//! experiment, and what the data plane does per `ModelInfer` before forwarding it (classify the
//! path, unframe and decode the request, decide the route). `cargo bench --bench assignment`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use modelgate::control::State;
use modelgate::experiment::{self, Experiments, NewExperiment, NewVariant};
use modelgate::pb::inference::{
    model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest,
};
use modelgate::protocol;
use modelgate::proxy::body;
use modelgate::registry::{NewVersion, Registry, Stage};
use modelgate::routing::RoutingTable;
use prost::Message;

fn table() -> RoutingTable {
    let mut r = Registry::default();
    for port in [1, 2, 3] {
        r.register(
            NewVersion {
                model: "m".into(),
                endpoint: format!("127.0.0.1:{port}"),
                ..Default::default()
            },
            0,
        )
        .unwrap();
    }
    r.transition("m", "1", Stage::Production, false, 0).unwrap();
    let mut ex = Experiments::default();
    ex.create(
        NewExperiment {
            name: "homepage".into(),
            model: "m".into(),
            variants: (1..=3)
                .map(|v| NewVariant {
                    name: format!("v{v}"),
                    version: v.to_string(),
                    weight: v as f64,
                })
                .collect(),
            salt: "2026-11".into(),
            coverage: 0.9,
            ..Default::default()
        },
        &r,
        0,
    )
    .unwrap();
    RoutingTable::build(
        &State {
            registry: r,
            experiments: ex,
            ..Default::default()
        },
        None,
    )
}

fn assignment(c: &mut Criterion) {
    let users: Vec<String> = (0..1024).map(|i| format!("user-{i:08}")).collect();
    let mut i = 0usize;
    c.bench_function("bucket (xxh3 of salt/experiment/unit)", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(experiment::bucket("2026-11", "homepage", &users[i]))
        })
    });
    let t = table();
    c.bench_function("routing decision with a running experiment", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(t.decide("m", Some(&users[i]), None, 1).unwrap())
        })
    });
}

/// A framed 16-feature FP32 `ModelInfer` request, as it arrives on the wire.
fn framed_request() -> Bytes {
    body::frame(&ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 16],
            contents: Some(InferTensorContents {
                fp32_contents: (0..16).map(|i| i as f32 * 0.25).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn classify_and_route(c: &mut Criterion) {
    let t = table();
    let framed = framed_request();
    let users: Vec<String> = (0..1024).map(|i| format!("user-{i:08}")).collect();
    let mut i = 0usize;
    c.bench_function("classify + decode ModelInfer (16 features) + route", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (_, call) = protocol::classify("/inference.GRPCInferenceService/ModelInfer");
            assert_eq!(call, protocol::Call::Infer);
            let msg = body::unary_message(&framed).unwrap();
            let req = ModelInferRequest::decode(msg).unwrap();
            black_box(t.decide(&req.model_name, Some(&users[i]), None, 1).unwrap());
            black_box(req)
        })
    });
}

criterion_group!(benches, assignment, classify_and_route);
criterion_main!(benches);
