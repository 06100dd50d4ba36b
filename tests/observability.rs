//! What operators watch: `/metrics` after real traffic (requests by version, experiment and
//! status; upstream latency; shadows; records; RocksDB; drift), `/live` and `/ready`, and
//! OpenTelemetry traces exported to an OTLP receiver the test runs, with W3C trace context
//! carried to the model server and to a shadow.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use modelgate::config::Config;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::testing::{echo_client::EchoClient, EchoRequest};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;

/// The value of the sample `name{labels}` in a Prometheus text exposition, summed over every
/// series whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

async fn metrics(mg: &modelgate::server::Running) -> String {
    let resp = http_get(mg.admin_addr, "/metrics").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp
}

#[tokio::test]
async fn metrics_cover_traffic_experiments_shadows_records_storage_and_drift() {
    let dir = tempfile::tempdir().unwrap();
    let prod = model_server("name=m;kind=logistic;weights=1,-1,0.5;version=prod").await;
    let other = model_server("name=m;kind=logistic;weights=1,-1,0.5;version=other").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "m", &prod.endpoint()).await; // 1: production, control
    register(&mut reg, "m", &other.endpoint()).await; // 2: shadow
    register(&mut reg, "m", &other.endpoint()).await; // 3: treatment
    promote(&mut reg, "m", "1").await;
    let ctl = channel(mg.control_addr).await;
    pb::experiments_client::ExperimentsClient::new(ctl.clone())
        .create_experiment(pb::CreateExperimentRequest {
            name: "ab".into(),
            model: "m".into(),
            variants: vec![
                pb::VariantSpec {
                    name: "control".into(),
                    version: "1".into(),
                    weight: 1.0,
                },
                pb::VariantSpec {
                    name: "treatment".into(),
                    version: "3".into(),
                    weight: 1.0,
                },
            ],
            coverage: 0.5,
            ..Default::default()
        })
        .await
        .unwrap();
    pb::shadows_client::ShadowsClient::new(ctl.clone())
        .set_shadow(pb::SetShadowRequest {
            model: "m".into(),
            version: "2".into(),
            sample_fraction: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut drift = pb::drift_client::DriftClient::new(ctl);
    let rows = (0..200)
        .map(|i| pb::ReferenceRow {
            values: (0..3)
                .map(|j| pb::FeatureValue {
                    kind: Some(pb::feature_value::Kind::Number(((i * 7 + j) % 13) as f64)),
                })
                .collect(),
        })
        .collect();
    drift
        .set_reference(pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["input[0]".into(), "input[1]".into(), "input[2]".into()],
            rows,
            categorical_features: vec![],
        })
        .await
        .unwrap();

    let mut infer = infer_client(mg.data_addr).await;
    let mut in_experiment = 0;
    const N: usize = 60;
    for i in 0..N {
        let mut req = tonic::Request::new(infer_request("m", &[&[i as f32, 1.0, 2.0]]));
        req.metadata_mut()
            .insert("x-user-id", format!("user-{i}").parse().unwrap());
        let resp = infer.model_infer(req).await.unwrap();
        if resp.metadata().get("x-modelgate-experiment").is_some() {
            in_experiment += 1;
        }
    }
    assert!(0 < in_experiment && in_experiment < N, "{in_experiment}");
    // An unknown model: counted with its status, without a version.
    let err = infer
        .model_infer(infer_request("nope", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Records reach the drift windows on the writer's thread: flush, then evaluate.
    mg.recorder.flush().await;
    drift
        .get_drift_report(pb::GetDriftReportRequest {
            model: "m".into(),
            evaluate: true,
        })
        .await
        .unwrap();

    // Shadow copies finish on their own time: wait until all are counted.
    let production = (N - in_experiment) as f64;
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics(&mg).await;
        let mirrored = sample(
            &text,
            "modelgate_shadow_requests_total",
            &[("model", "m"), ("version", "2"), ("outcome", "mirrored")],
        );
        if mirrored == Some(production) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = |labels: &[(&str, &str)]| {
        let mut l = vec![("model", "m"), ("code", "OK")];
        l.extend_from_slice(labels);
        sample(&text, "modelgate_requests_total", &l).unwrap_or(0.0)
    };
    assert_eq!(ok(&[]), N as f64, "{text}");
    assert_eq!(ok(&[("experiment", "ab")]), in_experiment as f64);
    assert_eq!(
        ok(&[("version", "1"), ("experiment", "")]),
        production,
        "production traffic outside the experiment"
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_requests_total",
            &[("model", ""), ("code", "NOT_FOUND")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_experiment_requests_total",
            &[("experiment", "ab")]
        ),
        Some(in_experiment as f64)
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_request_duration_seconds_count",
            &[("model", "m")]
        ),
        Some(N as f64)
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_upstream_request_duration_seconds_count",
            &[("endpoint", &prod.endpoint())]
        )
        .unwrap()
            + sample(
                &text,
                "modelgate_upstream_request_duration_seconds_count",
                &[("endpoint", &other.endpoint())]
            )
            .unwrap_or(0.0),
        N as f64
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_shadow_requests_total",
            &[("model", "m"), ("version", "2"), ("outcome", "mirrored")]
        ),
        Some(production),
        "{text}"
    );
    let compared = sample(&text, "modelgate_shadow_compared_total", &[("model", "m")]).unwrap();
    let agreed = sample(&text, "modelgate_shadow_agreed_total", &[("model", "m")]).unwrap();
    assert_eq!((compared, agreed), (production, production), "same weights");
    assert_eq!(
        sample(&text, "modelgate_records_written_total", &[]),
        Some((N + 1) as f64)
    );
    assert_eq!(
        sample(&text, "modelgate_in_flight_requests", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "modelgate_rocksdb_write_stopped", &[]),
        Some(0.0)
    );
    assert!(
        sample(
            &text,
            "modelgate_rocksdb_memtable_bytes",
            &[("family", "predictions")]
        )
        .unwrap()
            > 0.0
    );
    for f in ["input[0]", "input[1]", "input[2]"] {
        let p = sample(
            &text,
            "modelgate_drift_p_value",
            &[("model", "m"), ("feature", f)],
        )
        .unwrap_or_else(|| panic!("no p-value for {f}: {text}"));
        assert!((0.0..=1.0).contains(&p));
        assert!(sample(
            &text,
            "modelgate_drift_statistic",
            &[("model", "m"), ("feature", f)]
        )
        .is_some());
    }
    // Conventions: counters end in _total, durations are seconds.
    assert!(text.contains("# TYPE modelgate_requests counter"));
    assert!(text.contains("# UNIT modelgate_request_duration_seconds seconds"));

    let live = http_get(mg.admin_addr, "/live").await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let ready = http_get(mg.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    mg.shutdown().await;
}

/// Collects what an OTLP exporter sends.
struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let _ = self.0.send(s);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn otlp_receiver() -> (String, mpsc::UnboundedReceiver<Span>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), rx)
}

/// An HTTP/2 server that answers every call with an empty gRPC OK and reports the `traceparent`
/// it received: a shadow whose requests the test can see.
async fn traceparent_recorder() -> (String, mpsc::UnboundedReceiver<Option<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                let tp = req
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let _ = tx.send(tp);
                async move {
                    let body = Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]));
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "0")
                        .body(body)
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    (format!("http://{addr}"), rx)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn echo_call(traceparent: &str) -> tonic::Request<EchoRequest> {
    let mut r = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("x-model-name", "echo".parse().unwrap());
    r.metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    r
}

fn seen_traceparent(metadata: &[String]) -> String {
    metadata
        .iter()
        .find_map(|m| m.strip_prefix("traceparent="))
        .expect("the upstream received a traceparent")
        .to_string()
}

fn attrs(s: &Span) -> HashMap<String, String> {
    s.attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(Value::StringValue(s)) => s,
                Some(Value::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[tokio::test]
async fn traces_are_exported_over_otlp_and_the_context_reaches_upstream_and_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let (collector, mut spans) = otlp_receiver().await;
    let (shadow, mut shadow_seen) = traceparent_recorder().await;
    let echo = echo_server().await;
    let mut config = Config::for_tests(dir.path());
    config.otlp_endpoint = Some(collector);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "echo", &echo).await;
    register(&mut reg, "echo", &shadow).await;
    promote(&mut reg, "echo", "1").await;
    pb::shadows_client::ShadowsClient::new(channel(mg.control_addr).await)
        .set_shadow(pb::SetShadowRequest {
            model: "echo".into(),
            version: "2".into(),
            sample_fraction: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut client = EchoClient::new(channel(mg.data_addr).await);
    let resp = client
        .unary(echo_call(&format!("00-{TRACE_ID}-{CALLER_SPAN}-01")))
        .await
        .unwrap();
    let request_id = request_id_of(&resp);
    let upstream_tp = seen_traceparent(&resp.into_inner().metadata);
    let shadow_tp = tokio::time::timeout(Duration::from_secs(5), shadow_seen.recv())
        .await
        .expect("the shadow got its copy")
        .flatten()
        .expect("with a traceparent");
    // Shutdown flushes the batch of spans.
    mg.shutdown().await;

    let mut got = Vec::new();
    while let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(5), spans.recv()).await {
        got.push(s);
        if got.len() >= 2 {
            break;
        }
    }
    let server = got
        .iter()
        .find(|s| s.name == "Unary")
        .expect("a span for the request");
    let upstream = got
        .iter()
        .find(|s| s.name == "upstream")
        .expect("a child span for the upstream call");
    assert_eq!(
        hex::encode(&server.trace_id),
        TRACE_ID,
        "joins the caller's trace"
    );
    assert_eq!(hex::encode(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(upstream.trace_id, server.trace_id);
    assert_eq!(upstream.parent_span_id, server.span_id);
    let a = attrs(server);
    assert_eq!(a["modelgate.model"], "echo");
    assert_eq!(a["modelgate.version"], "1");
    assert_eq!(a["modelgate.request_id"], request_id);
    assert_eq!(a["rpc.grpc.status_code"], "0");
    // The model server is a child of the upstream span, the shadow of the request span.
    assert_eq!(
        upstream_tp,
        format!("00-{TRACE_ID}-{}-01", hex::encode(&upstream.span_id))
    );
    assert_eq!(
        shadow_tp,
        format!("00-{TRACE_ID}-{}-01", hex::encode(&server.span_id))
    );
}

#[tokio::test]
async fn without_a_collector_the_callers_trace_context_passes_through_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "echo", &echo).await;
    promote(&mut reg, "echo", "1").await;
    let mut client = EchoClient::new(channel(mg.data_addr).await);
    let tp = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let resp = client.unary(echo_call(&tp)).await.unwrap();
    assert_eq!(seen_traceparent(&resp.into_inner().metadata), tp);
    mg.shutdown().await;
}
