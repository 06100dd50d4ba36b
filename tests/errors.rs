//! Every failure is a gRPC status with a message a person can act on.

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use modelgate::config::Config;
use modelgate::pb::modelgate::v1 as pb;
use tonic::Code;

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

fn frame(flag: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(flag);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

#[tokio::test]
async fn unknown_models_and_unreachable_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut client = infer_client(mg.data_addr).await;
    let err = client
        .model_infer(infer_request("nope", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "model 'nope' is not registered with modelgate"
    );

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "ghost", &format!("http://{closed}")).await;
    promote(&mut reg, "ghost", "1").await;
    let started = std::time::Instant::now();
    let err = client
        .model_infer(infer_request("ghost", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&format!("http://{closed}")),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("model 'ghost' version 1"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(2), "fails fast");
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert!(metrics.contains(r#"code="UNAVAILABLE""#), "{metrics}");
    assert!(
        metrics.contains(&format!(
            r#"modelgate_upstream_errors_total{{endpoint="http://{closed}",kind="connect"}} 1"#
        )),
        "{metrics}"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn deadlines_from_the_caller_and_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let slow = model_server("name=slow;kind=linear;weights=1;latency=3s").await;
    let mut config = Config::for_tests(dir.path());
    config.request_timeout = Duration::from_millis(300);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "slow", &slow.endpoint()).await;
    promote(&mut reg, "slow", "1").await;
    let mut client = infer_client(mg.data_addr).await;

    // A raw call: tonic's client would race modelgate's answer with its own timer.
    let body = modelgate::proxy::body::frame(&infer_request("slow", &[&[1.0]]));
    let started = std::time::Instant::now();
    let (code, msg) =
        raw_grpc_call_with(mg.data_addr, INFER, body, &[("grpc-timeout", "100m")]).await;
    assert_eq!(code, Code::DeadlineExceeded as i32, "{msg}");
    assert!(msg.contains("100ms"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(1));

    let started = std::time::Instant::now();
    let err = client
        .model_infer(infer_request("slow", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("300ms"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(2));
    mg.shutdown().await;
}

#[tokio::test]
async fn the_in_flight_limit_sheds_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let slow = model_server("name=slow;kind=linear;weights=1;latency=500ms").await;
    let mut config = Config::for_tests(dir.path());
    config.max_in_flight = 2;
    // No waiting for a slot: the calls beyond the limit are refused at once.
    config.queue_timeout = Duration::ZERO;
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "slow", &slow.endpoint()).await;
    promote(&mut reg, "slow", "1").await;
    let client = infer_client(mg.data_addr).await;
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.model_infer(infer_request("slow", &[&[1.0]])).await })
        })
        .collect();
    let mut ok = 0;
    let mut shed = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("--max-in-flight"), "{}", e.message());
                shed += 1;
            }
        }
    }
    assert_eq!(ok, 2, "exactly the limit is served");
    assert_eq!(shed, 4);
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("modelgate_shed_requests_total 4"),
        "{metrics}"
    );
    // Slots are released: the next request goes through.
    let mut c = client.clone();
    c.model_infer(infer_request("slow", &[&[1.0]]))
        .await
        .unwrap();
    mg.shutdown().await;
}

/// Six calls at once against two slots and two places in the queue: two are served at once, two
/// wait for them and are served after, two are refused at once naming `--max-queued`.
#[tokio::test]
async fn calls_beyond_the_in_flight_limit_wait_for_a_slot_in_a_bounded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let slow = model_server("name=slow;kind=linear;weights=1;latency=400ms").await;
    let mut config = Config::for_tests(dir.path());
    config.max_in_flight = 2;
    config.max_queued = 2;
    config.queue_timeout = Duration::from_secs(10);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "slow", &slow.endpoint()).await;
    promote(&mut reg, "slow", "1").await;
    let client = infer_client(mg.data_addr).await;
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let r = c.model_infer(infer_request("slow", &[&[1.0]])).await;
                (started.elapsed(), r)
            })
        })
        .collect();
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for c in calls {
        match c.await.unwrap() {
            (took, Ok(_)) => served.push(took),
            (took, Err(e)) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("--max-queued"), "{}", e.message());
                refused.push(took);
            }
        }
    }
    served.sort();
    assert_eq!(
        served.len(),
        4,
        "the limit and the queue are served: {served:?}"
    );
    assert_eq!(refused.len(), 2);
    // Two served in one model latency, the two that waited in two.
    assert!(served[1] < Duration::from_millis(790), "{served:?}");
    assert!(served[2] >= Duration::from_millis(800), "{served:?}");
    assert!(
        refused.iter().all(|t| *t < Duration::from_millis(400)),
        "{refused:?}"
    );
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    for line in [
        "modelgate_shed_requests_total 2",
        "modelgate_queued_requests 0",
        "modelgate_in_flight_requests 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    mg.shutdown().await;
}

/// A call that waits longer than `--queue-timeout` for a slot is refused, naming the flag; one
/// whose own deadline is shorter waits no longer than that.
#[tokio::test]
async fn a_call_waits_for_a_slot_no_longer_than_the_queue_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let slow = model_server("name=slow;kind=linear;weights=1;latency=2s").await;
    let mut config = Config::for_tests(dir.path());
    config.max_in_flight = 1;
    config.queue_timeout = Duration::from_millis(300);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "slow", &slow.endpoint()).await;
    promote(&mut reg, "slow", "1").await;
    let client = infer_client(mg.data_addr).await;
    let mut holder = client.clone();
    let held =
        tokio::spawn(async move { holder.model_infer(infer_request("slow", &[&[1.0]])).await });
    // The slot is taken once the in-flight gauge says so.
    wait_for_metric(
        mg.admin_addr,
        "modelgate_in_flight_requests 1",
        Duration::from_secs(5),
    )
    .await;
    let mut c = client.clone();
    let t = std::time::Instant::now();
    let e = c
        .model_infer(infer_request("slow", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--queue-timeout"), "{}", e.message());
    assert!(e.message().contains("300ms"), "{}", e.message());
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // A deadline shorter than the queue timeout ends the wait first.
    let mut req = tonic::Request::new(infer_request("slow", &[&[1.0]]));
    req.set_timeout(Duration::from_millis(100));
    let e = c.model_infer(req).await.unwrap_err();
    // (tonic's own timer may end it first, as CANCELLED; either way the call leaves the queue.)
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled
        ),
        "{e:?}"
    );
    wait_for_metric(
        mg.admin_addr,
        "modelgate_queued_requests 0",
        Duration::from_secs(1),
    )
    .await;
    assert!(
        held.await.unwrap().is_ok(),
        "the call holding the slot is served"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn malformed_oip_bodies_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.max_message_bytes = 4096;
    let mg = start_with(config).await;
    let (code, msg) = raw_grpc_call(mg.data_addr, INFER, frame(0, &[0xff, 0xff, 0xff, 0xff])).await;
    assert_eq!(code, Code::InvalidArgument as i32, "{msg}");
    assert!(
        msg.contains("not a valid inference.ModelInferRequest"),
        "{msg}"
    );
    let (code, msg) = raw_grpc_call(mg.data_addr, INFER, Bytes::from_static(&[0, 0, 0])).await;
    assert_eq!(code, Code::InvalidArgument as i32, "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    let (code, msg) = raw_grpc_call(mg.data_addr, INFER, frame(1, b"compressed")).await;
    assert_eq!(code, Code::Unimplemented as i32, "{msg}");
    let (code, msg) = raw_grpc_call(mg.data_addr, INFER, frame(0, &[])).await;
    assert_eq!(code, Code::InvalidArgument as i32, "{msg}");
    assert!(msg.contains("model_name: required"), "{msg}");
    let (code, msg) = raw_grpc_call(mg.data_addr, INFER, frame(0, &vec![0u8; 10_000])).await;
    assert_eq!(code, Code::ResourceExhausted as i32, "{msg}");
    assert!(msg.contains("--max-message-bytes"), "{msg}");
    // The server is still fine afterwards.
    let mut client = infer_client(mg.data_addr).await;
    let err = client
        .model_infer(infer_request("nope", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    mg.shutdown().await;
}

#[tokio::test]
async fn control_calls_name_the_field_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    let cases: Vec<(tonic::Status, &str)> = vec![
        (
            reg.register_model_version(pb::RegisterModelVersionRequest {
                endpoint: "h:1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "model: ",
        ),
        (
            reg.register_model_version(pb::RegisterModelVersionRequest {
                model: "m".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "endpoint: ",
        ),
        (
            reg.register_model_version(pb::RegisterModelVersionRequest {
                model: "m".into(),
                endpoint: "h:1".into(),
                artifact_sha256: "xyz".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "artifact_sha256: ",
        ),
        (
            reg.register_model_version(pb::RegisterModelVersionRequest {
                model: "m".into(),
                endpoint: "h:1".into(),
                prediction: Some(pb::PredictionSpec { kind: None }),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "prediction: ",
        ),
        (
            reg.transition_stage(pb::TransitionStageRequest {
                model: "m".into(),
                version: "1".into(),
                stage: 0,
                force: false,
            })
            .await
            .unwrap_err(),
            "stage: ",
        ),
        (
            reg.transition_stage(pb::TransitionStageRequest {
                model: "m".into(),
                version: "".into(),
                stage: 2,
                force: false,
            })
            .await
            .unwrap_err(),
            "version: ",
        ),
        (
            reg.get_model_version(pb::GetModelVersionRequest {
                model: "".into(),
                version: "1".into(),
            })
            .await
            .unwrap_err(),
            "model: ",
        ),
        (
            reg.set_promotion_policy(pb::SetPromotionPolicyRequest {
                model: "m".into(),
                minimum_metrics: [("auc".to_string(), f64::INFINITY)].into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "minimum_metrics: ",
        ),
    ];
    for (status, field) in cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(field),
            "expected '{field}…', got '{}'",
            status.message()
        );
    }
    let mut versions = Vec::new();
    for _ in 0..2 {
        versions.push(register(&mut reg, "m", "127.0.0.1:1").await);
    }
    let err = reg
        .set_alias(pb::SetAliasRequest {
            model: "m".into(),
            alias: "1st".into(),
            version: "1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("alias: "), "{}", err.message());
    let err = reg
        .get_model_version(pb::GetModelVersionRequest {
            model: "m".into(),
            version: "9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = reg
        .get_production_version(pb::GetProductionVersionRequest {
            model: "absent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "model 'absent' is not registered");
    mg.shutdown().await;
}

#[tokio::test]
async fn promotion_gates_and_protected_production() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    reg.register_model_version(pb::RegisterModelVersionRequest {
        model: "m".into(),
        endpoint: "127.0.0.1:1".into(),
        metrics: [
            ("accuracy".to_string(), 0.85),
            ("latency_p99_ms".to_string(), 12.0),
        ]
        .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    reg.set_promotion_policy(pb::SetPromotionPolicyRequest {
        model: "m".into(),
        minimum_metrics: [("accuracy".to_string(), 0.9)].into(),
        maximum_metrics: [("latency_p99_ms".to_string(), 50.0)].into(),
    })
    .await
    .unwrap();
    let err = reg
        .transition_stage(transition("m", "1", pb::Stage::Production))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("'accuracy' is 0.85, below the policy minimum 0.9"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("force"), "{}", err.message());
    let mut forced = transition("m", "1", pb::Stage::Production);
    forced.force = true;
    reg.transition_stage(forced).await.unwrap();

    let err = reg
        .delete_model_version(pb::DeleteModelVersionRequest {
            model: "m".into(),
            version: "1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("in production"), "{}", err.message());
    reg.transition_stage(transition("m", "1", pb::Stage::Archived))
        .await
        .unwrap();
    let deleted = reg
        .delete_model_version(pb::DeleteModelVersionRequest {
            model: "m".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted.unwrap().version, 1);
    mg.shutdown().await;
}

#[tokio::test]
async fn the_control_token_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.control_token = Some("s3cret-token".into());
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    let err = reg.list_models(pb::ListModelsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("authorization: Bearer"),
        "{}",
        err.message()
    );
    let mut wrong = tonic::Request::new(pb::ListModelsRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-tokem".parse().unwrap());
    assert_eq!(
        reg.list_models(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(pb::ListModelsRequest {});
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-token".parse().unwrap());
    reg.list_models(right).await.unwrap();
    // Health stays open for probes.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(mg.control_addr).await);
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "modelgate.v1.Registry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The data port never serves control services.
    let (code, _) = raw_grpc_call(
        mg.data_addr,
        "/modelgate.v1.Registry/ListModels",
        frame(0, &[]),
    )
    .await;
    assert_ne!(code, 0);
    mg.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_never_accepts_fails_at_the_connect_timeout() {
    // A listener whose accept queue is full and never drained: the kernel drops further SYNs,
    // so a connect neither succeeds nor is refused — a model server hung in accept, or a
    // firewall that drops packets, seen from the client.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        let probe = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match probe {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("connect to the full listener: {e}"),
            Err(_) => break, // the queue is full: connects now hang
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.connect_timeout = Duration::from_millis(300);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "stuck", &format!("http://{addr}")).await;
    promote(&mut reg, "stuck", "1").await;
    let mut client = infer_client(mg.data_addr).await;
    let started = std::time::Instant::now();
    let err = client
        .model_infer(infer_request("stuck", &[&[1.0]]))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("timed out after 300ms connecting to"),
        "{}",
        err.message()
    );
    // At the connect timeout, not at the 30 s request deadline.
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(2)).contains(&took),
        "{took:?}"
    );
    drop(listener);
    mg.shutdown().await;
}

#[tokio::test]
async fn tensors_over_the_element_limit_are_refused_before_the_model_server() {
    let dir = tempfile::tempdir().unwrap();
    let ms = model_server("name=iris;kind=linear;weights=1,1").await;
    let mut config = Config::for_tests(dir.path());
    config.max_tensor_elements = 100;
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &ms.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    // A shadow taking every call: a refused call must not reach it either.
    register(&mut reg, "iris", &ms.endpoint()).await;
    pb::shadows_client::ShadowsClient::new(channel(mg.control_addr).await)
        .set_shadow(pb::SetShadowRequest {
            model: "iris".into(),
            version: "2".into(),
            sample_fraction: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut client = infer_client(mg.data_addr).await;

    let rows: Vec<[f32; 2]> = vec![[1.0, 2.0]; 50];
    let rows: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
    client
        .model_infer(infer_request("iris", &rows))
        .await
        .unwrap();

    let rows: Vec<[f32; 2]> = vec![[1.0, 2.0]; 51];
    let rows: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
    let err = client
        .model_infer(infer_request("iris", &rows))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.message(),
        "tensor 'input': 102 elements exceed the limit of 100 (--max-tensor-elements)"
    );
    // A shape that claims what the contents do not hold is judged by the shape alone.
    let mut req = infer_request("iris", &[&[1.0, 2.0]]);
    req.inputs[0].shape = vec![1_000_000_000, 0];
    let err = client.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut req = infer_request("iris", &[&[1.0, 2.0]]);
    req.inputs[0].shape = vec![-1, 2];
    let err = client.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "tensor 'input': invalid shape [-1, 2]");
    // None of them reached a model server, the shadow included: only the first call did.
    mg.recorder.flush().await;
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "modelgate_upstream_request_duration_seconds_count",
            ""
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "modelgate_shadow_requests_total", ""),
        1.0,
        "{metrics}"
    );
    // Refused before routing, like a body that does not decode: no version, model or variant.
    assert_eq!(
        metric_sum(
            &metrics,
            "modelgate_requests_total",
            r#"{model="",version="",experiment="",variant="",code="RESOURCE_EXHAUSTED"}"#
        ),
        2.0,
        "{metrics}"
    );
    mg.shutdown().await;
}
