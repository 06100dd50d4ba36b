//! Shadow deployments end to end: agreement, isolation from broken shadows, sampling, the
//! in-flight cap, pass-through copies, and the control API's refusals.

mod common;

use std::time::{Duration, Instant};

use common::*;
use modelgate::config::Config;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::shadows_client::ShadowsClient;
use tonic::transport::Channel;
use tonic::Code;

const PROD: &str = "name=m;kind=logistic;weights=1,-1,0.5;bias=0;version=prod";
const SAME: &str = "name=m;kind=logistic;weights=1,-1,0.5;bias=0;version=same";
const OTHER: &str = "name=m;kind=logistic;weights=-1,1,0.2;bias=0.3;version=other";

fn threshold() -> Option<pb::PredictionSpec> {
    Some(pb::PredictionSpec {
        kind: Some(pb::prediction_spec::Kind::Threshold(
            pb::ThresholdPrediction {
                output: "probabilities".into(),
                threshold: 0.5,
                positive_label: "yes".into(),
                negative_label: "no".into(),
            },
        )),
    })
}

async fn register_all(mg: &modelgate::server::Running, endpoints: &[String]) {
    let mut reg = registry(mg.control_addr).await;
    for e in endpoints {
        reg.register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: e.clone(),
            prediction: threshold(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    promote(&mut reg, "m", "1").await;
}

async fn shadows(mg: &modelgate::server::Running) -> ShadowsClient<Channel> {
    ShadowsClient::new(channel(mg.control_addr).await)
}

fn set(version: &str, fraction: f64, timeout_ms: u64) -> pb::SetShadowRequest {
    pb::SetShadowRequest {
        model: "m".into(),
        version: version.into(),
        sample_fraction: fraction,
        comparison: None,
        timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: (timeout_ms * 1_000_000) as i32,
        }),
    }
}

/// Waits until the report of `version` shows `mirrored` copies, then returns it.
async fn report_when(
    mg: &modelgate::server::Running,
    version: &str,
    done: impl Fn(&pb::ShadowReport) -> bool,
) -> pb::ShadowReport {
    let mut c = shadows(mg).await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        mg.recorder.flush().await;
        let r = c
            .get_shadow_report(pb::GetShadowReportRequest {
                model: "m".into(),
                version: version.into(),
                disagreements: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        if done(&r) || Instant::now() > until {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rows(i: usize) -> Vec<Vec<f32>> {
    (0..3)
        .map(|r| {
            let x = (i * 3 + r) as f32;
            vec![
                (x * 0.37).sin() * 2.0,
                (x * 0.11).cos() * 2.0,
                (x * 0.05).sin(),
            ]
        })
        .collect()
}

fn label_of(p1: f64) -> &'static str {
    if p1 > 0.5 {
        "yes"
    } else {
        "no"
    }
}

#[tokio::test]
async fn agreement_is_measured_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let (prod, same, other) = (
        model_server(PROD).await,
        model_server(SAME).await,
        model_server(OTHER).await,
    );
    let mg = start(dir.path()).await;
    register_all(&mg, &[prod.endpoint(), same.endpoint(), other.endpoint()]).await;
    let mut sc = shadows(&mg).await;
    sc.set_shadow(set("2", 1.0, 2000)).await.unwrap();
    let s3 = sc
        .set_shadow(set("3", 1.0, 2000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s3.comparison.unwrap().kind,
        Some(pb::shadow_comparison::Kind::Label(pb::SameLabel {}))
    );

    let mut infer = infer_client(mg.data_addr).await;
    let mut direct_prod = infer_client(prod.addr).await;
    let mut direct_other = infer_client(other.addr).await;
    let (mut differing, mut total) = (0u64, 0u64);
    for i in 0..40 {
        let r = rows(i);
        let refs: Vec<&[f32]> = r.iter().map(|v| &v[..]).collect();
        let resp = infer
            .model_infer(infer_request("m", &refs))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.model_version, "prod",
            "the caller only ever sees production"
        );
        // What each model says, asked directly.
        let p = first_output(
            &direct_prod
                .model_infer(infer_request("m", &refs))
                .await
                .unwrap()
                .into_inner(),
        );
        let o = first_output(
            &direct_other
                .model_infer(infer_request("m", &refs))
                .await
                .unwrap()
                .into_inner(),
        );
        for row in 0..3 {
            total += 1;
            if label_of(p[row * 2 + 1]) != label_of(o[row * 2 + 1]) {
                differing += 1;
            }
        }
    }
    // Latency histograms are persisted every 250 ms, a little after the counters.
    let identical = report_when(&mg, "2", |r| {
        r.mirrored >= 40 && r.shadow_latency.as_ref().is_some_and(|l| l.count >= 40)
    })
    .await;
    assert_eq!(identical.mirrored, 40);
    assert_eq!(
        (identical.compared, identical.agreed),
        (120, 120),
        "an identical shadow agrees on every row"
    );
    assert_eq!(identical.agreement_rate, Some(1.0));
    assert!(identical.disagreements.is_empty());
    let lat = identical.shadow_latency.unwrap();
    assert_eq!(lat.count, 40);
    assert!(lat.p50_ms.is_some() && identical.production_latency.unwrap().p99_ms.is_some());

    let different = report_when(&mg, "3", |r| r.mirrored >= 40).await;
    assert_eq!(different.compared, total);
    assert_eq!(
        different.compared - different.agreed,
        differing,
        "disagreement = rows whose labels differ"
    );
    assert!(
        differing > 0 && differing < total,
        "the test needs both kinds of rows: {differing}/{total}"
    );
    let rate = different.agreement_rate.unwrap();
    assert!(different.ci_low.unwrap() <= rate && rate <= different.ci_high.unwrap());
    let d = &different.disagreements[0];
    assert!(
        ["yes", "no"].contains(&d.production.as_str())
            && ["yes", "no"].contains(&d.shadow.as_str())
    );
    assert_ne!(d.production, d.shadow);
    // Every record and shadow observation was written: the writer's queue is empty again
    // (shadow observations used to be counted in and never out).
    let page = http_get(mg.admin_addr, "/metrics").await;
    assert!(page.contains("modelgate_record_queue_depth 0\n"), "{page}");
    mg.shutdown().await;
}

#[tokio::test]
async fn broken_shadows_never_touch_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let prod =
        model_server("name=m;kind=logistic;weights=1,-1,0.5;version=prod;latency=20ms").await;
    // (a) nothing listens there
    let unreachable = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    // (b) ten times slower than production
    let slow =
        model_server("name=m;kind=logistic;weights=1,-1,0.5;version=slow;latency=200ms").await;
    // (c) answers with errors: it serves no model named m
    let errors = model_server("name=other;kind=linear;weights=1,1,1").await;
    // (d) accepts connections and never answers
    let hang = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let hang_addr = format!("http://{}", hang.local_addr().unwrap());
    let held = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hang.accept().await {
            h.lock().push(s);
        }
    });
    // (e) answers, but only after 5 s
    let late = model_server("name=m;kind=logistic;weights=1,-1,0.5;version=late;latency=5s").await;
    let mg = start(dir.path()).await;
    register_all(
        &mg,
        &[
            prod.endpoint(),
            unreachable,
            slow.endpoint(),
            errors.endpoint(),
            hang_addr,
            late.endpoint(),
        ],
    )
    .await;
    let mut sc = shadows(&mg).await;
    for v in ["2", "3", "4", "5"] {
        // A generous shadow deadline: the caller must finish long before it.
        sc.set_shadow(set(v, 1.0, 900)).await.unwrap();
    }
    sc.set_shadow(set("6", 1.0, 150)).await.unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    for i in 0..20 {
        let r = rows(i);
        let refs: Vec<&[f32]> = r.iter().map(|v| &v[..]).collect();
        let started = Instant::now();
        let resp = infer
            .model_infer(infer_request("m", &refs))
            .await
            .expect("the caller always succeeds");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "call {i} took {:?}",
            started.elapsed()
        );
        assert_eq!(served_version(&resp), "1");
        assert_eq!(resp.into_inner().model_version, "prod");
    }
    // Unreachable: the copies that were sent failed with UNAVAILABLE; after the first failure the
    // breaker suspends copies (suppressed), so a dead shadow costs almost nothing.
    let a = report_when(&mg, "2", |r| r.mirrored + r.suppressed >= 20).await;
    assert_eq!(a.mirrored + a.suppressed, 20, "{a:?}");
    assert_eq!(a.errors.get("UNAVAILABLE"), Some(&a.mirrored), "{a:?}");
    assert!(a.suppressed > 0, "{a:?}");
    let b = report_when(&mg, "3", |r| r.mirrored >= 20).await;
    assert_eq!((b.compared, b.agreed), (60, 60), "slow but identical");
    assert!(b.shadow_latency.unwrap().p50_ms.unwrap() >= 200.0);
    let c = report_when(&mg, "4", |r| r.mirrored >= 20).await;
    assert_eq!(
        c.errors.get("NOT_FOUND"),
        Some(&20),
        "answering errors is not being down: {c:?}"
    );
    // A server that accepts connections and never answers: copies end either at their own
    // deadline or when the connection attempt times out (UNAVAILABLE) — which one depends on
    // timing — and the breaker then suspends the rest for a while.
    let d = report_when(&mg, "5", |r| r.mirrored + r.suppressed >= 20).await;
    assert_eq!(d.mirrored + d.suppressed, 20, "{d:?}");
    assert_eq!(
        d.timeouts + d.errors.get("UNAVAILABLE").copied().unwrap_or(0),
        d.mirrored,
        "{d:?}"
    );
    // (e) An HTTP/2 server that answers long after the copy's deadline: timeouts, for certain.
    let e = report_when(&mg, "6", |r| r.mirrored + r.suppressed >= 20).await;
    assert!(e.timeouts >= 1, "{e:?}");
    assert_eq!(e.timeouts, e.mirrored, "{e:?}");
    assert_eq!(e.mirrored + e.suppressed, 20, "{e:?}");
    assert_eq!(d.compared, 0);
    mg.shutdown().await;
}

#[tokio::test]
async fn sampling_is_honoured_and_the_same_users_are_mirrored_by_every_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let (prod, s1, s2) = (
        model_server(PROD).await,
        model_server(SAME).await,
        model_server(OTHER).await,
    );
    let mg = start(dir.path()).await;
    register_all(&mg, &[prod.endpoint(), s1.endpoint(), s2.endpoint()]).await;
    let mut sc = shadows(&mg).await;
    sc.set_shadow(set("2", 0.3, 2000)).await.unwrap();
    sc.set_shadow(set("3", 0.3, 2000)).await.unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    for i in 0..600 {
        let mut req = tonic::Request::new(infer_request("m", &[&[1.0, 2.0, 3.0]]));
        req.metadata_mut()
            .insert("x-user-id", format!("user-{}", i % 300).parse().unwrap());
        infer.model_infer(req).await.unwrap();
    }
    let a = report_when(&mg, "2", |r| r.mirrored + r.skipped >= 600).await;
    let b = report_when(&mg, "3", |r| r.mirrored + r.skipped >= 600).await;
    assert_eq!(a.mirrored + a.skipped, 600);
    let share = a.mirrored as f64 / 600.0;
    assert!((share - 0.3).abs() < 0.08, "mirrored share {share}");
    assert_eq!(
        a.mirrored % 2,
        0,
        "each user sent twice is mirrored both times or never"
    );
    assert_eq!(
        a.mirrored, b.mirrored,
        "the same users for every shadow of the model"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn copies_beyond_the_in_flight_cap_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let prod = model_server(PROD).await;
    let slow = model_server("name=m;kind=logistic;weights=1,-1,0.5;latency=400ms").await;
    let mut config = Config::for_tests(dir.path());
    config.max_shadow_in_flight = 1;
    let mg = start_with(config).await;
    register_all(&mg, &[prod.endpoint(), slow.endpoint()]).await;
    shadows(&mg)
        .await
        .set_shadow(set("2", 1.0, 2000))
        .await
        .unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    for _ in 0..5 {
        infer
            .model_infer(infer_request("m", &[&[1.0, 2.0, 3.0]]))
            .await
            .unwrap();
    }
    let r = report_when(&mg, "2", |r| r.mirrored + r.dropped >= 5).await;
    assert!(r.dropped >= 3, "{r:?}");
    assert_eq!(r.mirrored + r.dropped, 5);
    mg.shutdown().await;
}

#[tokio::test]
async fn pass_through_calls_are_mirrored_and_carry_the_shadow_header() {
    let dir = tempfile::tempdir().unwrap();
    let (prod, shadow) = (echo_server().await, echo_server().await);
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "echo", &prod).await;
    register(&mut reg, "echo", &shadow).await;
    promote(&mut reg, "echo", "1").await;
    let mut sc = shadows(&mg).await;
    sc.set_shadow(pb::SetShadowRequest {
        model: "echo".into(),
        version: "2".into(),
        sample_fraction: 1.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut echo =
        modelgate::pb::testing::echo_client::EchoClient::new(channel(mg.data_addr).await);
    for i in 0..5 {
        let mut r = tonic::Request::new(modelgate::pb::testing::EchoRequest {
            message: format!("m{i}"),
            ..Default::default()
        });
        r.metadata_mut()
            .insert("x-model-name", "echo".parse().unwrap());
        let reply = echo.unary(r).await.unwrap().into_inner();
        assert!(
            !reply
                .metadata
                .iter()
                .any(|m| m.starts_with("x-modelgate-shadow")),
            "the caller's call is not a copy"
        );
    }
    let mut c = shadows(&mg).await;
    let until = Instant::now() + Duration::from_secs(10);
    let report = loop {
        mg.recorder.flush().await;
        let r = c
            .get_shadow_report(pb::GetShadowReportRequest {
                model: "echo".into(),
                version: "2".into(),
                disagreements: 10,
            })
            .await
            .unwrap()
            .into_inner();
        if r.compared >= 5 || Instant::now() > until {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report.mirrored, 5);
    // Byte comparison of the whole answers. The echo service reflects the copy's
    // `x-modelgate-shadow: true` header back, so its answers are longer than production's.
    assert_eq!((report.compared, report.agreed), (5, 0));
    let d = &report.disagreements[0];
    let bytes = |s: &str| s.trim_end_matches(" bytes").parse::<usize>().unwrap();
    assert_eq!(
        bytes(&d.shadow) - bytes(&d.production),
        "x-modelgate-shadow=true".len() + 2
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn the_control_api_refuses_bad_shadows() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    register_all(&mg, &["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()]).await;
    let mut sc = shadows(&mg).await;
    let status = |r: Result<tonic::Response<pb::Shadow>, tonic::Status>| r.unwrap_err();
    let e = status(sc.set_shadow(set("2", 0.0, 100)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("sample_fraction:"),
        "{}",
        e.message()
    );
    let e = status(sc.set_shadow(set("2", 1.0, 120_000)).await);
    assert!(e.message().starts_with("timeout:"), "{}", e.message());
    let mut neg = set("2", 1.0, 100);
    neg.comparison = Some(pb::ShadowComparison {
        kind: Some(pb::shadow_comparison::Kind::Tolerance(
            pb::WithinTolerance {
                absolute: -1.0,
                relative: 0.0,
            },
        )),
    });
    let e = status(sc.set_shadow(neg).await);
    assert!(
        e.message().starts_with("comparison.tolerance:"),
        "{}",
        e.message()
    );
    let mut empty = set("2", 1.0, 100);
    empty.comparison = Some(pb::ShadowComparison { kind: None });
    assert!(status(sc.set_shadow(empty).await)
        .message()
        .starts_with("comparison:"));
    let mut no_model = set("2", 1.0, 100);
    no_model.model.clear();
    assert!(status(sc.set_shadow(no_model).await)
        .message()
        .starts_with("model:"));
    let e = status(sc.set_shadow(set("9", 1.0, 100)).await);
    assert_eq!(e.code(), Code::NotFound, "a version that does not exist");
    let e = status(
        sc.remove_shadow(pb::RemoveShadowRequest {
            model: "m".into(),
            version: "2".into(),
        })
        .await,
    );
    assert_eq!(e.code(), Code::NotFound);
    sc.set_shadow(set("2", 0.5, 100)).await.unwrap();
    let list = sc
        .list_shadows(pb::ListShadowsRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.shadows.len(), 1);
    assert_eq!(
        list.shadows[0].timeout,
        Some(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000
        })
    );
    sc.remove_shadow(pb::RemoveShadowRequest {
        model: "m".into(),
        version: "2".into(),
    })
    .await
    .unwrap();
    mg.shutdown().await;
}

#[tokio::test]
async fn deleting_a_version_removes_its_shadow_in_the_same_write() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    register_all(&mg, &["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()]).await;
    let mut sc = shadows(&mg).await;
    sc.set_shadow(set("2", 1.0, 100)).await.unwrap();
    let list = |sc: &mut ShadowsClient<Channel>| {
        let mut sc = sc.clone();
        async move {
            sc.list_shadows(pb::ListShadowsRequest { model: "m".into() })
                .await
                .unwrap()
                .into_inner()
                .shadows
                .len()
        }
    };
    assert_eq!(list(&mut sc).await, 1);
    registry(mg.control_addr)
        .await
        .delete_model_version(pb::DeleteModelVersionRequest {
            model: "m".into(),
            version: "2".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        list(&mut sc).await,
        0,
        "the shadow of a deleted version is gone"
    );
    // …and stays gone after a restart (it was deleted from RocksDB too).
    mg.shutdown().await;
    let mg = start(dir.path()).await;
    let mut sc = shadows(&mg).await;
    assert_eq!(list(&mut sc).await, 0);
    mg.shutdown().await;
}
