//! Criterion benchmarks of drift monitoring: the per-row update (one live row of 16 features into
//! the windows, as the record writer does it) and one evaluation of 16 numeric features against a
//! 10,000-row reference, at W = 1,000 and W = 10,000. `cargo bench --bench drift`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use modelgate::control::ControlPlane;
use modelgate::drift::{self, LiveWindow};
use modelgate::events::EventBus;
use modelgate::monitor::{DriftSettings, Monitor};
use modelgate::record::{FeatureValue, Precision};
use modelgate::store::Store;
use modelgate::telemetry::Metrics;

const FEATURES: usize = 16;

fn sample(i: usize, f: usize) -> f64 {
    // Deterministic, roughly bell-shaped values.
    let u = ((i * 7919 + f * 104_729) % 10_007) as f64 / 10_007.0;
    let v = ((i * 6151 + f * 3083) % 9_973) as f64 / 9_973.0;
    u + v - 1.0
}

fn drift_benches(c: &mut Criterion) {
    let names: Vec<String> = (0..FEATURES).map(|f| format!("f{f}")).collect();
    let rows: Vec<Vec<FeatureValue>> = (0..10_000)
        .map(|i| {
            (0..FEATURES)
                .map(|f| FeatureValue::Number(sample(i, f)))
                .collect()
        })
        .collect();
    let reference =
        drift::build_reference(&names, rows, &[], drift::MAX_SAMPLE, "uploaded", 0).unwrap();

    // The per-row update, through the monitor as the record writer calls it.
    let dir = tempfile::tempdir().unwrap();
    let storage = modelgate::store::storage(Store::open(dir.path()).unwrap());
    let clock = modelgate::clock::system();
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(
        EventBus::open(
            storage.events.clone(),
            clock.clone(),
            None,
            metrics.webhook_dropped.clone(),
        )
        .unwrap(),
    );
    let plane = Arc::new(ControlPlane::load(storage.clone(), clock.clone(), None).unwrap());
    let settings = DriftSettings {
        every: u64::MAX, // measure the update alone, not the evaluation it would queue
        ..Default::default()
    };
    let monitor = Monitor::start(settings, storage, clock, events, plane).unwrap();
    monitor.set_reference("m", reference.clone()).unwrap();
    let live: Vec<Vec<FeatureValue>> = (0..1024)
        .map(|i| {
            (0..FEATURES)
                .map(|f| FeatureValue::Number(sample(i + 77, f) + 0.1))
                .collect()
        })
        .collect();
    let precisions = [Precision::F64; FEATURES];
    // Shared, as the record writer shares a model's names between its records.
    let names: std::sync::Arc<[String]> = names.into();
    let mut i = 0usize;
    c.bench_function("observe one row of 16 features", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            monitor.observe("m", &names, &precisions, std::slice::from_ref(&live[i]));
        })
    });

    let mut group = c.benchmark_group("evaluate 16 features, reference 10000");
    group.sample_size(10);
    for w in [1000usize, 10_000] {
        let mut windows: Vec<LiveWindow> = reference
            .features
            .iter()
            .map(|f| LiveWindow::for_feature(f, w))
            .collect();
        for r in 0..w {
            for (f, win) in windows.iter_mut().enumerate() {
                win.push(
                    &FeatureValue::Number(sample(r + 31, f) + 0.05),
                    Precision::F64,
                );
            }
        }
        group.bench_function(format!("W = {w}"), |b| {
            b.iter(|| black_box(drift::evaluate(&reference, &windows, 0.05)))
        });
    }
    group.finish();
}

criterion_group!(benches, drift_benches);
criterion_main!(benches);
