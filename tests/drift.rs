//! Drift, retraining triggers and the event stream, end to end: the built-in model server behind
//! modelgate, references over gRPC, live traffic, outcomes, a Watch stream and a webhook
//! receiver the test runs.

mod common;

use std::time::Duration;

use common::*;
use modelgate::config::Config;
use modelgate::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::{
    drift_client::DriftClient, events_client::EventsClient, outcomes_client::OutcomesClient,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

/// Deterministic standard normals (xorshift + Box–Muller).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }
}

fn num(x: f64) -> pb::FeatureValue {
    pb::FeatureValue {
        kind: Some(pb::feature_value::Kind::Number(x)),
    }
}

async fn drift_client(mg: &modelgate::server::Running) -> DriftClient<Channel> {
    DriftClient::new(channel(mg.control_addr).await)
}

async fn next_event(stream: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
        .expect("an event")
}

/// Sends `n` single-row requests whose features come from `row`.
async fn traffic(mg: &modelgate::server::Running, n: usize, mut row: impl FnMut() -> [f32; 3]) {
    let mut infer = infer_client(mg.data_addr).await;
    for _ in 0..n {
        let r = row();
        infer.model_infer(infer_request("m", &[&r])).await.unwrap();
    }
    mg.recorder.flush().await;
}

async fn setup(
    config: Config,
    server: &modelgate::model_server::RunningModelServer,
) -> modelgate::server::Running {
    // Storage faults are at hand for the test that stalls the record writer.
    let mg = start_faulty(config).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "m".into(),
        endpoint: server.endpoint(),
        feature_names: vec![pb::InputFeatureNames {
            input: "input".into(),
            names: vec!["a".into(), "b".into(), "c".into()],
        }],
        metrics: [("accuracy".to_string(), 0.9)].into(),
        prediction: Some(threshold_prediction("1", "0")),
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "m", "1").await;
    mg
}

#[tokio::test]
async fn a_shift_in_one_feature_drifts_exactly_that_feature_and_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=0.5,-0.5,0.2").await;
    let (hook, mut hook_rx) = webhook_receiver().await;
    let mut config = Config::for_tests(dir.path());
    config.drift.window = 300;
    config.drift.every = 100;
    config.webhooks =
        vec![modelgate::webhook::parse_webhook(&format!("{hook}#drift_started")).unwrap()];
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    let mut rng = Rng(7);
    let rows: Vec<pb::ReferenceRow> = (0..1000)
        .map(|_| pb::ReferenceRow {
            values: vec![num(rng.normal()), num(rng.normal()), num(rng.normal())],
        })
        .collect();
    let summary = drift
        .set_reference(pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["a".into(), "b".into(), "c".into()],
            rows,
            categorical_features: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.rows, summary.sampled), (1000, false));
    assert!((summary.features[0].mean.unwrap()).abs() < 0.1);

    let mut events = EventsClient::new(channel(mg.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 0,
            types: vec!["drift_started".into(), "drift_ended".into()],
            model: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // The same distribution: evaluated several times, never drifted.
    traffic(&mg, 900, || {
        [
            rng.normal() as f32,
            rng.normal() as f32,
            rng.normal() as f32,
        ]
    })
    .await;
    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        report.evaluations >= 8,
        "evaluated every 100 rows: {}",
        report.evaluations
    );
    assert!(!report.drifted, "{report:?}");
    assert_eq!(report.features.len(), 3);
    for f in &report.features {
        assert_eq!((f.reference_size, f.window_size), (1000, 300));
        assert_eq!(f.test, "ks_2samp");
        assert!(
            f.p_value.is_some()
                && f.adjusted_p_value.is_some()
                && f.psi.is_some()
                && f.wasserstein.is_some()
        );
    }

    // Feature b moves by +1.5 standard deviations.
    traffic(&mg, 300, || {
        [
            rng.normal() as f32,
            (rng.normal() + 1.5) as f32,
            rng.normal() as f32,
        ]
    })
    .await;
    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.drifted);
    let drifted: Vec<&str> = report
        .features
        .iter()
        .filter(|f| f.drifted)
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(drifted, vec!["b"], "{report:?}");
    assert!(report.state_changed_at.is_some());
    let e = next_event(&mut events).await;
    assert_eq!(e.r#type, "drift_started");
    assert_eq!(e.features, vec!["b".to_string()]);
    let posted = tokio::time::timeout(Duration::from_secs(10), hook_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(posted["type"], "drift_started");
    assert_eq!(posted["features"], serde_json::json!(["b"]));
    assert_eq!(posted["cursor"], e.cursor);
    mg.shutdown().await;

    // The reference is durable.
    let mut config = Config::for_tests(dir.path());
    config.drift.window = 300;
    let mg = start_with(config).await;
    let again = drift_client(&mg)
        .await
        .get_reference(pb::GetReferenceRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.rows, 1000);
    assert_eq!(again.source, "uploaded");
    mg.shutdown().await;
}

#[tokio::test]
async fn performance_drift_fires_one_retrain_trigger() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=1,0,0").await;
    let mut config = Config::for_tests(dir.path());
    config.drift.concept_window = 20;
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    drift
        .set_retrain_policy(pb::RetrainPolicy {
            model: "m".into(),
            on_performance_drift: true,
            cooldown: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut events = EventsClient::new(channel(mg.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 0,
            types: vec![
                "performance_drift_started".into(),
                "retrain_triggered".into(),
            ],
            model: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let infer = infer_client(mg.data_addr).await;
    let outcomes = OutcomesClient::new(channel(mg.control_addr).await);
    // x = 2 → label 1. Truth first agrees (accuracy 1.0), then never does.
    let send = |right: bool| {
        let mut infer = infer.clone();
        let mut outcomes = outcomes.clone();
        async move {
            let resp = infer
                .model_infer(infer_request("m", &[&[2.0, 0.0, 0.0]]))
                .await
                .unwrap();
            let id = request_id_of(&resp);
            outcomes
                .record_outcome(pb::RecordOutcomeRequest {
                    request_id: id,
                    actual: Some(pb::Actual {
                        kind: Some(pb::actual::Kind::Label(
                            if right { "1" } else { "0" }.into(),
                        )),
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    };
    for _ in 0..19 {
        send(true).await;
    }
    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.concept[0].status, "insufficient data");
    assert_eq!(report.concept[0].window_fill, 19);
    for _ in 0..40 {
        send(false).await;
    }
    let e = next_event(&mut events).await;
    assert_eq!(e.r#type, "performance_drift_started");
    assert_eq!(e.version, 1);
    let t = next_event(&mut events).await;
    assert_eq!(t.r#type, "retrain_triggered");
    assert_eq!(t.reason, "performance_drift");
    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: false,
        })
        .await
        .unwrap()
        .into_inner();
    let c = &report.concept[0];
    assert_eq!(
        (c.baseline, c.baseline_source.as_str()),
        (Some(0.9), "registered metric")
    );
    assert_eq!(c.current, Some(0.0));
    assert!(c.drifted);
    // Still drifting: no second trigger (one per episode, and the cooldown).
    for _ in 0..5 {
        send(false).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), events.next())
            .await
            .is_err(),
        "no more triggers"
    );
    drop(infer);
    drop(outcomes);
    mg.shutdown().await;
}

#[tokio::test]
async fn a_watcher_that_reconnects_with_its_cursor_gets_exactly_what_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "w", "127.0.0.1:1").await;
    promote(&mut reg, "w", "1").await;
    let mut watch = EventsClient::new(channel(mg.control_addr).await);
    let mut stream = watch
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut stream).await;
    let second = next_event(&mut stream).await;
    assert_eq!(
        (first.r#type.as_str(), second.r#type.as_str()),
        ("version_registered", "version_promoted")
    );
    assert_eq!(second.cursor, first.cursor + 1);
    drop(stream);
    // While disconnected: a registration, a promotion that archives version 1.
    register(&mut reg, "w", "127.0.0.1:2").await;
    promote(&mut reg, "w", "2").await;
    let mut stream = watch
        .watch(pb::WatchRequest {
            from_cursor: second.cursor,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut missed = Vec::new();
    for _ in 0..3 {
        missed.push(next_event(&mut stream).await);
    }
    let kinds: Vec<&str> = missed.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        kinds,
        vec!["version_registered", "version_promoted", "version_archived"]
    );
    let cursors: Vec<u64> = missed.iter().map(|e| e.cursor).collect();
    assert_eq!(
        cursors,
        vec![second.cursor + 1, second.cursor + 2, second.cursor + 3],
        "no gap, no repeat"
    );
    // Live events keep coming on the same stream.
    register(&mut reg, "w", "127.0.0.1:3").await;
    assert_eq!(next_event(&mut stream).await.cursor, second.cursor + 4);
    mg.shutdown().await;
}

#[tokio::test]
async fn references_capture_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=0.5,-0.5,0.2").await;
    let mg = setup(Config::for_tests(dir.path()), &server).await;
    let mut drift = drift_client(&mg).await;
    let e = drift
        .get_reference(pb::GetReferenceRequest { model: "m".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = drift
        .set_reference(pb::SetReferenceRequest {
            model: "ghost".into(),
            feature_names: vec!["a".into()],
            rows: vec![],
            categorical_features: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = drift
        .set_reference(pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["a".into(), "b".into()],
            rows: vec![pb::ReferenceRow {
                values: vec![num(1.0)],
            }],
            categorical_features: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("rows[0]:"), "{}", e.message());
    let e = drift
        .capture_reference(pb::CaptureReferenceRequest {
            model: "m".into(),
            rows: 0,
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("rows:"), "{}", e.message());

    let s = drift
        .capture_reference(pb::CaptureReferenceRequest {
            model: "m".into(),
            rows: 50,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.source.as_str(), s.capture_remaining), ("capturing", 50));
    let mut k = 0f32;
    traffic(&mg, 60, || {
        k += 1.0;
        [k, -k, 0.5]
    })
    .await;
    let s = drift
        .get_reference(pb::GetReferenceRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.source.as_str(), s.rows), ("captured", 50));
    assert_eq!(s.features[0].min, Some(1.0));
    assert_eq!(
        s.features[0].max,
        Some(50.0),
        "the next 50 rows, not later ones"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn periodic_checks_raise_scheduled_retraining_shadow_and_experiment_alerts_once() {
    let dir = tempfile::tempdir().unwrap();
    let prod = model_server("name=m;kind=logistic;weights=1,-1,0.5;version=a").await;
    let other = model_server("name=m;kind=logistic;weights=-1,1,0.5;version=b").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "m", &prod.endpoint()).await;
    register(&mut reg, "m", &other.endpoint()).await;
    promote(&mut reg, "m", "1").await;
    let mut drift = drift_client(&mg).await;
    drift
        .set_retrain_policy(pb::RetrainPolicy {
            model: "m".into(),
            max_age: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000,
            }),
            cooldown: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // A shadow that disagrees with production on most rows.
    modelgate::pb::modelgate::v1::shadows_client::ShadowsClient::new(
        channel(mg.control_addr).await,
    )
    .set_shadow(pb::SetShadowRequest {
        model: "m".into(),
        version: "2".into(),
        sample_fraction: 1.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    for i in 0..120 {
        let x = (i % 7) as f32 - 3.0;
        infer
            .model_infer(infer_request("m", &[&[x, -x, 0.1]]))
            .await
            .unwrap();
    }
    let mut sc = modelgate::pb::modelgate::v1::shadows_client::ShadowsClient::new(
        channel(mg.control_addr).await,
    );
    for _ in 0..200 {
        mg.recorder.flush().await;
        let r = sc
            .get_shadow_report(pb::GetShadowReportRequest {
                model: "m".into(),
                version: "2".into(),
                disagreements: 1,
            })
            .await
            .unwrap()
            .into_inner();
        if r.mirrored >= 120 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut events = EventsClient::new(channel(mg.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 0,
            types: vec!["retrain_triggered".into(), "shadow_agreement_low".into()],
            model: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let m = mg.monitor.clone();
        tokio::task::spawn_blocking(move || m.periodic())
            .await
            .unwrap();
    }
    let mut got: Vec<(String, String)> = Vec::new();
    for _ in 0..2 {
        let e = next_event(&mut events).await;
        got.push((e.r#type, e.reason));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("retrain_triggered".into(), "scheduled".into()),
            ("shadow_agreement_low".into(), String::new())
        ]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err(),
        "each fires once: the second check raised nothing new"
    );
    mg.shutdown().await;
}

/// A reproducible draw (a quadratic hash), the same in the Python that computed the expected
/// values: `h(i) = (i*i*7919 + i*104729 + 17) % 1000003`.
fn grid_row(i: u64) -> [f64; 3] {
    let h = (i * i * 7919 + i * 104_729 + 17) % 1_000_003;
    [
        ((h % 10) + 1) as f64 / 10.0,
        ((h / 10 % 4) + 1) as f64 / 10.0,
        (h / 40 % 100) as f64 / 100.0,
    ]
}

/// A reference on a decimal grid (float64, as uploaded) and FP32 traffic from the same
/// distribution: the live values are 0.1f widened (0.10000000149…), and compared with the exact
/// 0.1 of the reference they looked drifted (KS p = 0.00045 on `a`; the categorical `b` had
/// twice the categories). Compared at FP32, the p-values are those of the intended values.
#[tokio::test]
async fn fp32_traffic_against_a_decimal_float64_reference_stays_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=0.5,-0.5,0.2").await;
    let mut config = Config::for_tests(dir.path());
    config.drift.window = 300;
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    drift
        .set_reference(pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["a".into(), "b".into(), "c".into()],
            rows: (0..1000)
                .map(|i| pb::ReferenceRow {
                    values: grid_row(i).into_iter().map(num).collect(),
                })
                .collect(),
            categorical_features: vec!["b".into()],
        })
        .await
        .unwrap();
    let mut i = 1000;
    traffic(&mg, 300, || {
        let r = grid_row(i);
        i += 1;
        r.map(|x| x as f32)
    })
    .await;
    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!report.drifted, "{report:?}");
    // scipy 1.17.1 on the intended (decimal) values: ks_2samp(ref_a, live_a),
    // chi2_contingency([[240, 236, 248, 276], [85, 62, 73, 80]]), ks_2samp(ref_c, live_c).
    let want = [
        ("a", 0.044, 0.7463960713437322),
        ("b", 2.693313875751028, 0.44136472721661346),
        ("c", 0.06666666666666667, 0.2459357480156493),
    ];
    for (f, (name, statistic, p)) in report.features.iter().zip(want) {
        assert_eq!(f.name, name);
        assert_eq!(f.window_size, 300);
        let (s, q) = (f.statistic.unwrap(), f.p_value.unwrap());
        assert!(
            (s - statistic).abs() <= 1e-9 * statistic,
            "{name}: {s} vs {statistic}"
        );
        assert!((q - p).abs() <= 1e-6 * p, "{name}: p {q} vs {p}");
        assert!(!f.drifted, "{name}");
        assert_eq!(
            f.precision, "FP32",
            "compared at the precision the rows travel in"
        );
    }
    mg.shutdown().await;
}

/// Rows of a 0…1 uniform reference on a 1/1024 grid (exact in FP32), and batches of 100 live
/// values shifted by `s`: scipy 1.17.1 `ks_2samp(reference, batch)` gives p = 0.0216 at s = 0.15,
/// 0.1035 at s = 0.12 and 1.0 at s = 0.
fn uniform_reference() -> Vec<pb::ReferenceRow> {
    (0..1024)
        .map(|k| pb::ReferenceRow {
            values: vec![num(k as f64 / 1024.0), num(0.0), num(0.0)],
        })
        .collect()
}

fn shifted_batch(s: f64) -> Vec<[f32; 3]> {
    (0..100)
        .map(|j| {
            let x = ((((j as f64 + 0.5) / 100.0 + s) * 1024.0).round() / 1024.0) as f32;
            [x, 0.0, 0.0]
        })
        .collect()
}

async fn evaluate(drift: &mut DriftClient<Channel>) -> pb::DriftReport {
    drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Collects the events of `stream` until none arrives for 300 ms.
async fn drain(stream: &mut tonic::Streaming<pb::Event>) -> Vec<pb::Event> {
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        out.push(e.unwrap());
    }
    out
}

async fn drift_events(mg: &modelgate::server::Running) -> tonic::Streaming<pb::Event> {
    EventsClient::new(channel(mg.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 0,
            types: vec!["drift_started".into(), "drift_ended".into()],
            model: "m".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A p-value that hovers around α used to start and end an episode at every crossing. Now an
/// episode starts below α and ends only after the adjusted p-value stayed above the exit level
/// (default 0.2) for 3 evaluations (default).
#[tokio::test]
async fn data_drift_at_the_threshold_does_not_flap() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=0.5,-0.5,0.2").await;
    let mut config = Config::for_tests(dir.path());
    config.drift.window = 100;
    config.drift.every = u64::MAX; // evaluated on demand only, after each batch
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    drift
        .set_reference(pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["a".into()],
            rows: uniform_reference()
                .into_iter()
                .map(|mut r| {
                    r.values.truncate(1);
                    r
                })
                .collect(),
            categorical_features: vec![],
        })
        .await
        .unwrap();
    let mut events = drift_events(&mg).await;
    let mut seen = Vec::new();
    for s in [0.15, 0.12, 0.15, 0.12, 0.15, 0.0, 0.0, 0.0] {
        let mut batch = shifted_batch(s).into_iter();
        traffic(&mg, 100, || batch.next().unwrap()).await;
        let report = evaluate(&mut drift).await;
        assert_eq!(
            (report.drift_exit_p_value, report.drift_exit_evaluations),
            (0.2, 3)
        );
        let f = &report.features[0];
        eprintln!("s = {s}: p = {:?}", f.p_value);
        assert_eq!(f.drifted, report.drifted);
        seen.push((report.drifted, f.quiet_evaluations));
    }
    assert_eq!(
        seen,
        [
            (true, 0),
            (true, 0),
            (true, 0),
            (true, 0),
            (true, 0),
            (true, 1),
            (true, 2),
            (false, 0)
        ],
        "starts below 0.05, ends after 3 evaluations above 0.2"
    );
    let got: Vec<(String, String)> = drain(&mut events)
        .await
        .into_iter()
        .map(|e| (e.r#type, e.reason))
        .collect();
    assert_eq!(
        got,
        [
            ("drift_started".into(), String::new()),
            ("drift_ended".into(), "recovered".into())
        ]
    );
    mg.shutdown().await;
}

/// Replacing the reference during an episode ends it first: a watcher never sees two
/// `drift_started` in a row.
#[tokio::test]
async fn replacing_a_reference_ends_the_episode_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=0.5,-0.5,0.2").await;
    let mut config = Config::for_tests(dir.path());
    config.drift.window = 100;
    config.drift.every = u64::MAX;
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    let reference = pb::SetReferenceRequest {
        model: "m".into(),
        feature_names: vec!["a".into(), "b".into(), "c".into()],
        rows: uniform_reference(),
        categorical_features: vec![],
    };
    drift.set_reference(reference.clone()).await.unwrap();
    let mut events = drift_events(&mg).await;
    let shifted = |mg| async move {
        let mut batch = shifted_batch(0.5).into_iter();
        traffic(mg, 100, || batch.next().unwrap()).await;
    };
    shifted(&mg).await;
    assert!(evaluate(&mut drift).await.drifted);
    assert_eq!(next_event(&mut events).await.r#type, "drift_started");
    // The same reference again: a new reference, a new episode.
    drift.set_reference(reference).await.unwrap();
    let e = next_event(&mut events).await;
    assert_eq!(
        (e.r#type.as_str(), e.reason.as_str()),
        ("drift_ended", "reference_replaced"),
        "{e:?}"
    );
    assert!(!evaluate(&mut drift).await.drifted, "a fresh start");
    shifted(&mg).await;
    assert!(evaluate(&mut drift).await.drifted);
    assert_eq!(next_event(&mut events).await.r#type, "drift_started");
    // A captured reference replaces it too.
    drift
        .capture_reference(pb::CaptureReferenceRequest {
            model: "m".into(),
            rows: 50,
        })
        .await
        .unwrap();
    shifted(&mg).await;
    let e = next_event(&mut events).await;
    assert_eq!(
        (e.r#type.as_str(), e.reason.as_str()),
        ("drift_ended", "reference_replaced"),
        "{e:?}"
    );
    assert!(drain(&mut events).await.is_empty());
    mg.shutdown().await;

    // The replaced episode stays ended after a restart (the state went with the reference).
    let mut config = Config::for_tests(dir.path());
    config.drift.every = u64::MAX;
    let mg = start_with(config).await;
    let report = drift_client(&mg)
        .await
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!report.drifted, "{report:?}");
    mg.shutdown().await;
}

/// `evaluate: true` first waits for the rows already answered to reach the windows: the caller
/// does not poll. (The writer is held back here, as under a RocksDB stall.)
#[tokio::test]
async fn an_on_demand_evaluation_sees_every_row_already_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=0.5,-0.5,0.2").await;
    let mut config = Config::for_tests(dir.path());
    config.drift.window = 100;
    config.drift.every = u64::MAX;
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    drift
        .set_reference(pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["a".into(), "b".into(), "c".into()],
            rows: uniform_reference(),
            categorical_features: vec![],
        })
        .await
        .unwrap();
    let faults = mg.faults.clone().unwrap();
    let (held, is_held) = std::sync::mpsc::channel();
    let (sent, all_sent) = std::sync::mpsc::channel::<()>();
    let pause = std::thread::spawn(move || {
        let _guard = faults.stall_records();
        held.send(()).unwrap();
        // Held until 300 ms after the last answer: the evaluation below is asked for meanwhile.
        all_sent.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    is_held.recv().unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    for row in shifted_batch(0.0).iter().take(40) {
        infer.model_infer(infer_request("m", &[row])).await.unwrap();
    }
    sent.send(()).unwrap();
    let report = evaluate(&mut drift).await;
    assert_eq!(report.features[0].window_size, 40, "{report:?}");
    pause.join().unwrap();
    mg.shutdown().await;
}

/// One call (x = 2 → label 1) and its outcome, right or wrong.
async fn judged(
    infer: &mut GrpcInferenceServiceClient<Channel>,
    outcomes: &mut OutcomesClient<Channel>,
    right: bool,
) {
    let resp = infer
        .model_infer(infer_request("m", &[&[2.0, 0.0, 0.0]]))
        .await
        .unwrap();
    outcomes
        .record_outcome(pb::RecordOutcomeRequest {
            request_id: request_id_of(&resp),
            actual: Some(pb::Actual {
                kind: Some(pb::actual::Kind::Label(
                    if right { "1" } else { "0" }.into(),
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Accuracy hovering at the threshold (0.75 / 0.8 against a registered 0.9, threshold 0.1) used
/// to start and end performance drift at every crossing. Now it ends only once the degradation
/// is at most the exit level (half the threshold: accuracy 0.85) for `--concept-exit-outcomes`
/// outcomes in a row; and the one episode fires one retraining trigger.
#[tokio::test]
async fn performance_drift_at_the_threshold_does_not_flap() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=m;kind=logistic;weights=1,0,0").await;
    let mut config = Config::for_tests(dir.path());
    config.drift.concept_window = 20;
    let mg = setup(config, &server).await;
    let mut drift = drift_client(&mg).await;
    drift
        .set_retrain_policy(pb::RetrainPolicy {
            model: "m".into(),
            on_performance_drift: true,
            cooldown: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut events = EventsClient::new(channel(mg.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 0,
            types: vec![
                "performance_drift_started".into(),
                "performance_drift_ended".into(),
                "retrain_triggered".into(),
            ],
            model: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut infer = infer_client(mg.data_addr).await;
    let mut outcomes = OutcomesClient::new(channel(mg.control_addr).await);
    // The last 20 verdicts, as the version's window holds them.
    let mut ring = std::collections::VecDeque::new();
    // 0.8 (degradation 0.1, not above the threshold), then 0.75 and 0.8 in turn.
    let mut seen = Vec::new();
    for i in 0..100 {
        let right = if i < 20 {
            i % 5 != 0
        } else {
            // What leaves the window comes back, except to move between 0.75 and 0.8.
            let leaving: bool = *ring.front().unwrap();
            match (leaving, ring.iter().filter(|&&r| r).count()) {
                (true, 16) => false,
                (false, 15) => true,
                (l, _) => l,
            }
        };
        ring.push_back(right);
        if ring.len() > 20 {
            ring.pop_front();
        }
        seen.push(ring.iter().filter(|&&r| r).count());
        judged(&mut infer, &mut outcomes, right).await;
    }
    let crossings = seen.windows(2).filter(|w| w[0] == 16 && w[1] == 15).count();
    assert_eq!(crossings, 16, "0.8 → 0.75 again and again: {seen:?}");
    let kinds: Vec<String> = drain(&mut events)
        .await
        .into_iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(kinds, ["performance_drift_started", "retrain_triggered"]);
    // Recovery: every verdict right.
    for _ in 0..150 {
        judged(&mut infer, &mut outcomes, true).await;
    }
    let kinds: Vec<String> = drain(&mut events)
        .await
        .into_iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(kinds, ["performance_drift_ended"]);
    let report = drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: false,
        })
        .await
        .unwrap()
        .into_inner();
    let c = &report.concept[0];
    assert!(!c.drifted && c.quiet_outcomes == 0, "{c:?}");
    assert_eq!(c.exit_degradation, 0.05, "half the threshold by default");
    mg.shutdown().await;
}
