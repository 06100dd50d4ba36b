//! The prediction log, outcomes and the online feature store, end to end: the built-in model
//! server behind modelgate, real RocksDB, real gRPC clients.

mod common;

use std::time::Duration;

use common::*;
use modelgate::config::Config;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::{
    features_client::FeaturesClient, outcomes_client::OutcomesClient,
    predictions_client::PredictionsClient,
};
use tonic::transport::Channel;
use tonic::Code;

struct Clients {
    predictions: PredictionsClient<Channel>,
    outcomes: OutcomesClient<Channel>,
    features: FeaturesClient<Channel>,
}

async fn clients(mg: &modelgate::server::Running) -> Clients {
    let ch = channel(mg.control_addr).await;
    Clients {
        predictions: PredictionsClient::new(ch.clone()),
        outcomes: OutcomesClient::new(ch.clone()),
        features: FeaturesClient::new(ch),
    }
}

/// A logistic model over 3 features, registered with two feature names and a threshold reading.
async fn setup_classifier(mg: &modelgate::server::Running, endpoint: &str) {
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "churn".into(),
        endpoint: endpoint.into(),
        feature_names: vec![pb::InputFeatureNames {
            input: "input".into(),
            names: vec!["tenure".into(), "spend".into()],
        }],
        prediction: Some(pb::PredictionSpec {
            kind: Some(pb::prediction_spec::Kind::Threshold(
                pb::ThresholdPrediction {
                    output: "probabilities".into(),
                    threshold: 0.5,
                    positive_label: "churn".into(),
                    negative_label: "stay".into(),
                },
            )),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    promote(&mut reg, "churn", "1").await;
}

const CLASSIFIER: &str = "name=churn;kind=logistic;weights=1,-1,0.5;bias=0";

fn with_headers<T>(msg: T, headers: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    for (k, v) in headers {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r
}

fn number(v: &pb::FeatureValue) -> f64 {
    match v.kind {
        Some(pb::feature_value::Kind::Number(x)) => x,
        ref other => panic!("not a number: {other:?}"),
    }
}

fn label(p: &pb::PredictionValue) -> &str {
    match &p.kind {
        Some(pb::prediction_value::Kind::Label(l)) => l,
        other => panic!("not a label: {other:?}"),
    }
}

fn outcome(request_id: &str, row: u32, actual: pb::actual::Kind) -> pb::RecordOutcomeRequest {
    pb::RecordOutcomeRequest {
        request_id: request_id.into(),
        row,
        actual: Some(pb::Actual { kind: Some(actual) }),
        overwrite: false,
        time: None,
    }
}

#[tokio::test]
async fn records_hold_features_and_predictions_and_outcomes_join_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mg = start(dir.path()).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut c = clients(&mg).await;
    let mut infer = infer_client(mg.data_addr).await;

    // A batch of two rows, typed contents. Row 0 scores 2-1+0.5 > 0 (churn), row 1 scores < 0.
    let resp = infer
        .model_infer(with_headers(
            infer_request("churn", &[&[2.0, 1.0, 1.0], &[0.0, 3.0, 0.0]]),
            &[("x-user-id", "user-7")],
        ))
        .await
        .unwrap();
    let id = request_id_of(&resp);
    // The outcome is sent the moment the answer arrives, before the record can have been written.
    let o = c
        .outcomes
        .record_outcome(outcome(&id, 1, pb::actual::Kind::Label("stay".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(o.success, Some(true));
    assert_eq!(o.version, 1);
    assert_eq!(label(o.prediction.as_ref().unwrap()), "stay");

    // Raw contents, one row, with the caller's own request id.
    infer
        .model_infer(with_headers(
            raw_infer_request("churn", &[&[0.5, 0.25, -1.0]]),
            &[("x-request-id", "order-42"), ("x-user-id", "user-8")],
        ))
        .await
        .unwrap();
    mg.recorder.flush().await;

    let rec = c
        .predictions
        .get_prediction(pb::GetPredictionRequest {
            request_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rec.model, "churn");
    assert_eq!(rec.version, 1);
    assert_eq!(rec.status_code, 0);
    assert_eq!(rec.unit_id, "user-7");
    assert_eq!(rec.method, "/inference.GRPCInferenceService/ModelInfer");
    assert!(rec.latency_us > 0 && rec.upstream_latency_us > 0);
    assert!(rec.upstream_latency_us <= rec.latency_us);
    assert_eq!(rec.feature_names, vec!["tenure", "spend", "input[2]"]);
    assert_eq!(rec.rows.len(), 2);
    let row1: Vec<f64> = rec.rows[1].values.iter().map(number).collect();
    assert_eq!(row1, vec![0.0, 3.0, 0.0]);
    let preds: Vec<&str> = rec.predictions.iter().map(label).collect();
    assert_eq!(preds, vec!["churn", "stay"]);
    assert_eq!(rec.entity_ids, vec!["user-7", "user-7"]);
    assert_eq!(rec.outcomes.len(), 1, "the early outcome joined");
    assert_eq!(rec.outcomes[0].row, 1);
    assert!(rec.note.is_empty(), "{}", rec.note);

    let raw = c
        .predictions
        .get_prediction(pb::GetPredictionRequest {
            request_id: "order-42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<f64> = raw.rows[0].values.iter().map(number).collect();
    assert_eq!(values, vec![0.5, 0.25, -1.0]);
    assert_eq!(raw.predictions.len(), 1);
    // 0.5 - 0.25 - 0.5 = -0.25: sigmoid below 0.5.
    assert_eq!(label(&raw.predictions[0]), "stay");
    mg.shutdown().await;
}

#[tokio::test]
async fn duplicate_outcomes_overwrites_and_exact_performance_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mg = start(dir.path()).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut c = clients(&mg).await;
    let mut infer = infer_client(mg.data_addr).await;
    // 10 single-row requests: predictions alternate churn (even) / stay (odd).
    let mut ids = Vec::new();
    for i in 0..10 {
        let row: &[f32] = if i % 2 == 0 {
            &[2.0, 0.0, 0.0]
        } else {
            &[0.0, 2.0, 0.0]
        };
        let r = infer
            .model_infer(infer_request("churn", &[row]))
            .await
            .unwrap();
        ids.push(request_id_of(&r));
    }
    // Truth: everyone churned. Right on the 5 even ones.
    let items: Vec<_> = ids
        .iter()
        .map(|id| outcome(id, 0, pb::actual::Kind::Label("churn".into())))
        .collect();
    let resp = c
        .outcomes
        .record_outcomes(tokio_stream::iter([pb::RecordOutcomesRequest {
            outcomes: items,
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.accepted, resp.rejected), (10, 0));

    let dup = c
        .outcomes
        .record_outcome(outcome(&ids[1], 0, pb::actual::Kind::Label("stay".into())))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains("overwrite"), "{}", dup.message());
    // Overwrite: request 1 (predicted stay) really stayed. 6 of 10 right now.
    let mut over = outcome(&ids[1], 0, pb::actual::Kind::Label("stay".into()));
    over.overwrite = true;
    assert_eq!(
        c.outcomes
            .record_outcome(over)
            .await
            .unwrap()
            .into_inner()
            .success,
        Some(true)
    );

    let perf = |c: &mut Clients| {
        let mut oc = c.outcomes.clone();
        async move {
            oc.get_model_performance(pb::GetModelPerformanceRequest {
                model: "churn".into(),
                version: "1".into(),
                window: 4,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let p = perf(&mut c).await;
    let all = p.all_time.unwrap();
    assert_eq!((all.outcomes, all.judged, all.successes), (10, 10, 6));
    assert_eq!(all.accuracy, Some(0.6));
    assert_eq!(all.mae, None);
    let recent = p.recent.unwrap();
    assert_eq!(recent.outcomes, 4, "the window");
    mg.shutdown().await;

    let mg = start(dir.path()).await;
    let mut c = clients(&mg).await;
    let after = perf(&mut c).await;
    assert_eq!(after.all_time, Some(all), "exact after a restart");
    assert_eq!(after.recent.unwrap().outcomes, 4);
    mg.shutdown().await;
}

#[tokio::test]
async fn regression_outcomes_give_mae_and_rmse() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=price;kind=linear;weights=2;bias=1").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "price", &server.endpoint()).await;
    promote(&mut reg, "price", "1").await;
    let mut c = clients(&mg).await;
    let mut infer = infer_client(mg.data_addr).await;
    // Predictions 3, 5, 7 (x = 1, 2, 3); truths 4, 5, 5 → errors -1, 0, 2.
    let mut results = Vec::new();
    for (x, truth) in [(1.0, 4.0), (2.0, 5.0), (3.0, 5.0)] {
        let r = infer
            .model_infer(infer_request("price", &[&[x]]))
            .await
            .unwrap();
        let id = request_id_of(&r);
        results.push(
            c.outcomes
                .record_outcome(outcome(&id, 0, pb::actual::Kind::Number(truth)))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_eq!(
        results.iter().map(|o| o.error.unwrap()).collect::<Vec<_>>(),
        vec![-1.0, 0.0, 2.0]
    );
    assert!(results.iter().all(|o| o.success.is_none()));
    // A label that is not a number is refused for a regression model.
    let r = infer
        .model_infer(infer_request("price", &[&[1.0]]))
        .await
        .unwrap();
    let id = request_id_of(&r);
    let err = c
        .outcomes
        .record_outcome(outcome(&id, 0, pb::actual::Kind::Label("cheap".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("actual:"), "{}", err.message());
    let p = c
        .outcomes
        .get_model_performance(pb::GetModelPerformanceRequest {
            model: "price".into(),
            version: "1".into(),
            window: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let all = p.all_time.unwrap();
    assert_eq!(all.regression_outcomes, 3);
    assert_eq!(all.mae, Some(1.0));
    assert_eq!(all.rmse, Some((5.0f64 / 3.0).sqrt()));
    assert_eq!(all.accuracy, None);
    mg.shutdown().await;
}

#[tokio::test]
async fn list_predictions_pages_newest_first_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let a = model_server("name=m;kind=linear;weights=1;version=a").await;
    let b = model_server("name=m;kind=linear;weights=2;version=b").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "m", &a.endpoint()).await;
    register(&mut reg, "m", &b.endpoint()).await;
    promote(&mut reg, "m", "1").await;
    let mut infer = infer_client(mg.data_addr).await;
    for i in 0..3 {
        infer
            .model_infer(with_headers(
                infer_request("m", &[&[1.0]]),
                &[("x-request-id", &format!("v1-{i}"))],
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    promote(&mut reg, "m", "2").await;
    for i in 0..2 {
        infer
            .model_infer(with_headers(
                infer_request("m", &[&[1.0]]),
                &[("x-request-id", &format!("v2-{i}"))],
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // An unknown model leaves a record too.
    let _ = infer
        .model_infer(infer_request("ghost", &[&[1.0]]))
        .await
        .unwrap_err();
    mg.recorder.flush().await;
    let mut c = clients(&mg).await;
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .predictions
            .list_predictions(pb::ListPredictionsRequest {
                model: "m".into(),
                limit: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.predictions.len() <= 2);
        ids.extend(page.predictions.iter().map(|p| p.request_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids, vec!["v2-1", "v2-0", "v1-2", "v1-1", "v1-0"]);
    let v1: Vec<String> = c
        .predictions
        .list_predictions(pb::ListPredictionsRequest {
            model: "m".into(),
            version: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .predictions
        .into_iter()
        .map(|p| p.request_id)
        .collect();
    assert_eq!(v1, vec!["v1-2", "v1-1", "v1-0"]);
    let ghost = c
        .predictions
        .list_predictions(pb::ListPredictionsRequest {
            model: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .predictions;
    assert_eq!(ghost.len(), 1);
    assert_eq!(ghost[0].status_code, Code::NotFound as i32);
    assert_eq!(ghost[0].version, 0);
    // A time range that ends before anything was logged.
    let none = c
        .predictions
        .list_predictions(pb::ListPredictionsRequest {
            model: "m".into(),
            end_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.predictions.is_empty());
    let err = c
        .predictions
        .list_predictions(pb::ListPredictionsRequest {
            model: "m".into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("page_token:"),
        "{}",
        err.message()
    );
    mg.shutdown().await;
}

// The writer is held paused (a lock) while requests are awaited: that is the point of the test.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn a_full_queue_drops_and_counts_while_every_request_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mut config = Config::for_tests(dir.path());
    config.record_queue = 4;
    let mg = start_faulty(config).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut infer = infer_client(mg.data_addr).await;
    {
        // The writer stalls (as in a long RocksDB write stall) holding one record.
        let _stalled = mg.faults.as_ref().unwrap().stall_records();
        for i in 0..20 {
            let started = std::time::Instant::now();
            infer
                .model_infer(infer_request("churn", &[&[1.0, 1.0, 1.0]]))
                .await
                .expect("requests never fail because of the log");
            assert!(started.elapsed() < Duration::from_secs(2));
            if i == 0 {
                // The writer takes the first record into the batch it then stalls on (how soon
                // the record is handed over and the writer's thread wakes varies on a loaded
                // machine, so the test waits for both: submitted, unwritten, not queued).
                let taken = std::time::Instant::now();
                while mg.metrics.record_queue_depth.get() != 1 || mg.recorder.queued() > 0 {
                    assert!(
                        taken.elapsed() < Duration::from_secs(5),
                        "the writer never woke"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    // 1 taken by the writer, 4 waiting in the queue, the other 15 dropped.
    assert_eq!(mg.metrics.records_dropped.get(), 15);
    mg.recorder.flush().await;
    // Nothing is lost uncounted: every record is written or counted as dropped.
    assert_eq!(mg.metrics.records_written.get(), 5);
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("modelgate_records_dropped_total 15\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelgate_records_written_total 5\n"),
        "{metrics}"
    );
    mg.shutdown().await;

    // The byte bound works the same way.
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.record_queue_bytes = 1;
    let mg = start_with(config).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut infer = infer_client(mg.data_addr).await;
    infer
        .model_infer(infer_request("churn", &[&[1.0, 1.0, 1.0]]))
        .await
        .unwrap();
    assert_eq!(mg.metrics.records_dropped.get(), 1);
    mg.shutdown().await;
}

#[tokio::test]
async fn under_load_the_writer_lingers_and_writes_what_gathered_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mut config = Config::for_tests(dir.path());
    // Long enough that the calls below surely arrive while the writer sleeps, on any machine.
    config.record_linger = Duration::from_secs(2);
    let mg = start_with(config).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let infer = infer_client(mg.data_addr).await;
    let started = std::time::Instant::now();
    infer
        .clone()
        .model_infer(infer_request("churn", &[&[1.0, 1.0, 1.0]]))
        .await
        .unwrap();
    // A record after a quiet spell is written at once, not after the linger.
    while mg.metrics.records_written.get() < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the first record waited for the linger"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(mg.metrics.record_batches.get(), 1);
    // The writer now sleeps: ten calls made meanwhile are queued, not written one by one...
    let calls = (0..10).map(|_| {
        let mut infer = infer.clone();
        async move {
            infer
                .model_infer(infer_request("churn", &[&[2.0, 1.0, 0.0]]))
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(calls).await;
    assert_eq!(mg.metrics.records_written.get(), 1);
    // ...and written together, in one batch (the flush rides in it).
    mg.recorder.flush().await;
    assert_eq!(mg.metrics.records_written.get(), 11);
    assert_eq!(mg.metrics.record_batches.get(), 2);
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("modelgate_record_batches_total 2\n"),
        "{metrics}"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn point_in_time_reads_ttl_and_unknown_entities() {
    use pb::feature_value::Kind::{Number, Text};
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut c = clients(&mg).await;
    c.features
        .register_feature(pb::RegisterFeatureRequest {
            name: "balance".into(),
            r#type: pb::FeatureType::Number as i32,
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            description: "account balance".into(),
        })
        .await
        .unwrap();
    c.features
        .register_feature(pb::RegisterFeatureRequest {
            name: "tier".into(),
            r#type: pb::FeatureType::String as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    // A day ago: inside the 7-day retention.
    let t0 = modelgate::clock::Clock::now_ms(&modelgate::clock::SystemClock) - 86_400_000;
    let resp = c
        .features
        .put_features(pb::PutFeaturesRequest {
            rows: vec![
                put_row(
                    "acct-1",
                    &[("balance", Number(10.0)), ("tier", Text("gold".into()))],
                    t0,
                ),
                // Written out of order: an older value after a newer one must not win "latest".
                put_row("acct-1", &[("balance", Number(30.0))], t0 + 20_000),
                put_row("acct-1", &[("balance", Number(20.0))], t0 + 10_000),
                put_row("acct-1", &[("balance", Text("lots".into()))], t0),
                put_row("acct-1", &[("nope", Number(1.0))], t0),
                put_row("", &[("balance", Number(1.0))], t0),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.accepted, 3);
    assert_eq!(resp.results[3].code, Code::InvalidArgument as i32);
    assert!(
        resp.results[3]
            .message
            .contains("'balance' is a number; got a string"),
        "{}",
        resp.results[3].message
    );
    assert!(
        resp.results[4].message.contains("unknown feature 'nope'"),
        "{}",
        resp.results[4].message
    );
    assert!(
        resp.results[5].message.starts_with("entity_id:"),
        "{}",
        resp.results[5].message
    );

    let get = |as_of: u64| {
        let mut f = c.features.clone();
        async move {
            f.get_features(pb::GetFeaturesRequest {
                entity_ids: vec!["acct-1".into(), "never-seen".into()],
                feature_names: vec!["balance".into(), "tier".into()],
                as_of: Some(ts(as_of)),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let value = |r: &pb::GetFeaturesResponse, e: usize, f: usize| {
        r.entities[e].cells[f].value.clone().and_then(|v| v.kind)
    };
    let r = get(t0 - 1).await;
    assert_eq!(value(&r, 0, 0), None, "nothing before the first write");
    let r = get(t0).await;
    assert_eq!(value(&r, 0, 0), Some(Number(10.0)), "at as_of exactly");
    assert_eq!(value(&r, 0, 1), Some(Text("gold".into())));
    assert_eq!(r.entities[0].cells[0].event_time, Some(ts(t0)));
    let r = get(t0 + 15_000).await;
    assert_eq!(
        value(&r, 0, 0),
        Some(Number(20.0)),
        "never a value from the future"
    );
    let r = get(t0 + 25_000).await;
    assert_eq!(value(&r, 0, 0), Some(Number(30.0)));
    assert_eq!(value(&r, 1, 0), None, "an entity never seen");
    assert_eq!(r.entities[1].entity_id, "never-seen");
    // One hour TTL: two hours after the last write the balance has no value, not a stale one;
    // the tier has no TTL and is still there.
    let r = get(t0 + 20_000 + 2 * 3600 * 1000).await;
    assert_eq!(value(&r, 0, 0), None);
    assert_eq!(value(&r, 0, 1), Some(Text("gold".into())));

    let err = c
        .features
        .get_features(pb::GetFeaturesRequest {
            entity_ids: vec!["acct-1".into()],
            feature_names: vec!["balance".into(), "colour".into(), "size".into()],
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "feature_names: unknown feature(s) 'colour', 'size'"
    );
    let listed = c
        .features
        .list_features(pb::ListFeaturesRequest {})
        .await
        .unwrap()
        .into_inner()
        .features;
    assert_eq!(
        listed.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        vec!["balance", "tier"]
    );
    assert_eq!(
        listed[0].ttl,
        Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0
        })
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn traffic_features_are_served_online_by_entity() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mg = start(dir.path()).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut infer = infer_client(mg.data_addr).await;
    infer
        .model_infer(with_headers(
            infer_request("churn", &[&[4.0, 5.0, 6.0]]),
            &[("x-user-id", "u-1")],
        ))
        .await
        .unwrap();
    infer
        .model_infer(with_headers(
            infer_request("churn", &[&[7.0, 8.0, 9.0]]),
            &[("x-user-id", "u-2")],
        ))
        .await
        .unwrap();
    mg.recorder.flush().await;
    let mut c = clients(&mg).await;
    let r = c
        .features
        .get_features(pb::GetFeaturesRequest {
            entity_ids: vec!["u-1".into(), "u-2".into()],
            feature_names: vec!["tenure".into(), "input[2]".into()],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    let v = |e: usize, f: usize| number(r.entities[e].cells[f].value.as_ref().unwrap());
    assert_eq!((v(0, 0), v(0, 1), v(1, 0), v(1, 1)), (4.0, 6.0, 7.0, 9.0));
    let listed = c
        .features
        .list_features(pb::ListFeaturesRequest {})
        .await
        .unwrap()
        .into_inner()
        .features;
    let tenure = listed.iter().find(|f| f.name == "tenure").unwrap();
    assert!(tenure.from_traffic);
    assert_eq!(tenure.r#type, pb::FeatureType::Number as i32);
    mg.shutdown().await;
}

#[tokio::test]
async fn bad_outcomes_get_a_status_each_and_lose_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mg = start(dir.path()).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut infer = infer_client(mg.data_addr).await;
    let r = infer
        .model_infer(infer_request("churn", &[&[1.0, 0.0, 0.0]]))
        .await
        .unwrap();
    let id = request_id_of(&r);
    let mut c = clients(&mg).await;

    let err = c
        .predictions
        .get_prediction(pb::GetPredictionRequest {
            request_id: "has space".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("request_id:"),
        "{}",
        err.message()
    );
    let err = c
        .predictions
        .get_prediction(pb::GetPredictionRequest {
            request_id: "never-sent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let items = vec![
        outcome(&id, 0, pb::actual::Kind::Label("churn".into())),
        outcome("never-sent", 0, pb::actual::Kind::Label("churn".into())),
        outcome(&id, 5, pb::actual::Kind::Label("churn".into())),
        pb::RecordOutcomeRequest {
            request_id: id.clone(),
            ..Default::default()
        },
        outcome("", 0, pb::actual::Kind::Success(true)),
        outcome(&id, 0, pb::actual::Kind::Label("stay".into())),
        outcome(&id, 0, pb::actual::Kind::Number(f64::NAN)),
    ];
    // Sent as a stream of single-item messages.
    let stream = tokio_stream::iter(
        items
            .into_iter()
            .map(|o| pb::RecordOutcomesRequest { outcomes: vec![o] }),
    );
    let resp = c
        .outcomes
        .record_outcomes(stream)
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp.results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            Code::NotFound as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            Code::AlreadyExists as i32,
            Code::InvalidArgument as i32,
        ]
    );
    assert!(
        resp.results[2].message.starts_with("row:"),
        "{}",
        resp.results[2].message
    );
    assert!(
        resp.results[3].message.starts_with("actual:"),
        "{}",
        resp.results[3].message
    );
    assert!(
        resp.results[4].message.starts_with("request_id:"),
        "{}",
        resp.results[4].message
    );
    assert_eq!(
        resp.results.iter().map(|r| r.index).collect::<Vec<_>>(),
        (0..7).collect::<Vec<_>>()
    );
    assert_eq!((resp.accepted, resp.rejected), (1, 6));
    let p = c
        .outcomes
        .get_model_performance(pb::GetModelPerformanceRequest {
            model: "churn".into(),
            version: "1".into(),
            window: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.all_time.unwrap().outcomes, 1, "only the good one counted");
    // A pass-through call has no prediction: only an explicit verdict is accepted.
    let echo = echo_server().await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "echo", &echo).await;
    promote(&mut reg, "echo", "1").await;
    let mut ec = modelgate::pb::testing::echo_client::EchoClient::new(channel(mg.data_addr).await);
    let r = ec
        .unary(with_headers(
            modelgate::pb::testing::EchoRequest {
                message: "hi".into(),
                ..Default::default()
            },
            &[("x-model-name", "echo")],
        ))
        .await
        .unwrap();
    let eid = request_id_of(&r);
    let err = c
        .outcomes
        .record_outcome(outcome(&eid, 0, pb::actual::Kind::Label("x".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let ok = c
        .outcomes
        .record_outcome(outcome(&eid, 0, pb::actual::Kind::Success(true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.success, Some(true));
    mg.shutdown().await;
}

#[tokio::test]
async fn retention_expires_records() {
    let dir = tempfile::tempdir().unwrap();
    let server = model_server(CLASSIFIER).await;
    let mut config = Config::for_tests(dir.path());
    config.retention = modelgate::config::parse_retention("predictions=1s").unwrap();
    // Time is the injected clock's: it moves when the test says, no sleeping.
    let clock = modelgate::clock::ManualClock::now();
    config.clock = clock.clone();
    let mg = start_with(config).await;
    setup_classifier(&mg, &server.endpoint()).await;
    let mut infer = infer_client(mg.data_addr).await;
    infer
        .model_infer(with_headers(
            infer_request("churn", &[&[1.0, 0.0, 0.0]]),
            &[("x-request-id", "short-lived")],
        ))
        .await
        .unwrap();
    mg.recorder.flush().await;
    let mut c = clients(&mg).await;
    c.predictions
        .get_prediction(pb::GetPredictionRequest {
            request_id: "short-lived".into(),
        })
        .await
        .unwrap();
    clock.advance(1300);
    let err = c
        .predictions
        .get_prediction(pb::GetPredictionRequest {
            request_id: "short-lived".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("retention"), "{}", err.message());
    let err = c
        .outcomes
        .record_outcome(outcome("short-lived", 0, pb::actual::Kind::Success(true)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "an expired request takes no outcome"
    );
    // The compaction filter removes it physically.
    let store = mg.store.clone();
    assert!(
        store.get_prediction("short-lived", 0).unwrap().is_some(),
        "still on disk before compaction"
    );
    tokio::task::spawn_blocking(move || {
        store.compact_expired();
        assert!(store.get_prediction("short-lived", 0).unwrap().is_none());
    })
    .await
    .unwrap();
    mg.shutdown().await;
}
