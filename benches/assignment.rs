//! Criterion micro-benchmark of A/B assignment: the hash bucket alone, and a whole routing
//! decision (experiment lookup, unit hash, variant pick) on a snapshot with a running experiment.
//! `cargo bench --bench assignment`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use modelgate::control::State;
use modelgate::experiment::{self, Experiments, NewExperiment, NewVariant};
use modelgate::registry::{NewVersion, Registry, Stage};
use modelgate::routing::RoutingTable;

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

criterion_group!(benches, assignment);
criterion_main!(benches);
