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

/// A modelgate with everything `/metrics` reports on: traffic to model `m` inside and outside an
/// A/B experiment (`ab`, control version 1, treatment 3), a shadow (version 2, every production
/// call), prediction records, a drift reference evaluated against the traffic, and one call to an
/// unknown model. Returns once every shadow copy is counted.
struct Busy {
    mg: modelgate::server::Running,
    prod: modelgate::model_server::RunningModelServer,
    other: modelgate::model_server::RunningModelServer,
    /// Calls to `m`, and how many of them were in the experiment.
    n: usize,
    in_experiment: usize,
    /// `/metrics` once every shadow copy was counted.
    text: String,
    _dir: tempfile::TempDir,
}

async fn busy() -> Busy {
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
    Busy {
        mg,
        prod,
        other,
        n: N,
        in_experiment,
        text,
        _dir: dir,
    }
}

#[tokio::test]
async fn metrics_cover_traffic_experiments_shadows_records_storage_and_drift() {
    let Busy {
        mg,
        prod,
        other,
        n,
        in_experiment,
        text,
        _dir,
    } = busy().await;
    let production = (n - in_experiment) as f64;

    let ok = |labels: &[(&str, &str)]| {
        let mut l = vec![("model", "m"), ("code", "OK")];
        l.extend_from_slice(labels);
        sample(&text, "modelgate_requests_total", &l).unwrap_or(0.0)
    };
    assert_eq!(ok(&[]), n as f64, "{text}");
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
        Some(n as f64)
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
        n as f64
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
        Some((n + 1) as f64)
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
    assert!(text.contains("# TYPE modelgate_requests_total counter"));
    assert!(text.contains("# TYPE modelgate_request_duration_seconds histogram"));

    let live = http_get(mg.admin_addr, "/live").await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let ready = http_get(mg.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    mg.shutdown().await;
}

/// `GET /metrics` with `accept` as the Accept header: the response's head and body.
async fn scrape(admin: SocketAddr, accept: Option<&str>) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (head.to_ascii_lowercase(), body.to_string())
}

/// Runs `promtool` with `args` and `stdin`, or returns `None` when it is not installed — unless
/// MODELGATE_REQUIRE_PEERS is set (scripts/test.sh installs it: Debian package `prometheus`).
fn promtool(args: &[&str], stdin: &str) -> Option<std::process::Output> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let installed = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        assert!(
            std::env::var_os("MODELGATE_REQUIRE_PEERS").is_none(),
            "promtool is required (MODELGATE_REQUIRE_PEERS) but not installed"
        );
        eprintln!("promtool not installed; skipping (scripts/test.sh installs it)");
        return None;
    }
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    Some(child.wait_with_output().unwrap())
}

fn output_of(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn metrics_pass_promtool_in_the_format_the_scraper_asks_for() {
    let busy = busy().await;
    let mg = &busy.mg;
    // Also an upstream failure, so that family has a series too.
    let mut reg = registry(mg.control_addr).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    register(&mut reg, "gone", &format!("http://{closed}")).await;
    promote(&mut reg, "gone", "1").await;
    let err = infer_client(mg.data_addr)
        .await
        .model_infer(infer_request("gone", &[&[1.0]]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    // No Accept header (curl, promtool's users): Prometheus text 0.0.4.
    let (head, text) = scrape(mg.admin_addr, None).await;
    assert!(
        head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("vary: accept"), "{head}");
    for family in [
        "requests_total",
        "request_duration_seconds",
        "upstream_request_duration_seconds",
        "upstream_errors_total",
        "shadow_requests_total",
        "shadow_compared_total",
        "experiment_requests_total",
        "drift_p_value",
        "records_written_total",
        "rocksdb_sst_bytes",
        "rocksdb_table_readers_bytes",
        "rocksdb_block_cache_bytes",
        "rocksdb_block_cache_pinned_bytes",
        "resident_memory_bytes",
        "resident_memory_peak_bytes",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("modelgate_{family}"))),
            "no series of modelgate_{family}:\n{text}"
        );
    }
    // Where the memory goes: the process's resident set (more than a megabyte, and at most its
    // peak) and the block cache (within --block-cache-bytes).
    let gauge = |name: &str| sample(&text, name, &[]).unwrap_or_else(|| panic!("no {name}"));
    let (rss, peak) = (
        gauge("modelgate_resident_memory_bytes"),
        gauge("modelgate_resident_memory_peak_bytes"),
    );
    assert!(rss > 1e6 && rss <= peak, "resident {rss}, peak {peak}");
    let cache = gauge("modelgate_rocksdb_block_cache_bytes");
    assert!(
        cache <= modelgate::store::DEFAULT_BLOCK_CACHE_BYTES as f64,
        "block cache {cache}"
    );
    // Every family has help text, named as its samples are.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(
                i > 0 && lines[i - 1].starts_with(&format!("# HELP {name} ")),
                "no HELP for {name}:\n{text}"
            );
        }
    }
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    let Some(check) = promtool(&["check", "metrics"], &text) else {
        busy.mg.shutdown().await;
        return;
    };
    assert!(
        check.status.success() && output_of(&check).trim().is_empty(),
        "promtool check metrics:\n{}\n{text}",
        output_of(&check)
    );

    // What Prometheus sends: OpenMetrics.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (head, openmetrics) = scrape(mg.admin_addr, Some(prometheus_accept)).await;
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE modelgate_requests counter\n"));
    assert!(openmetrics.contains("# UNIT modelgate_request_duration_seconds seconds\n"));
    // `promtool check metrics` reads only the text format; its OpenMetrics parser is the one
    // that backfills blocks, and that wants a timestamp on every sample: give each one, then
    // let it parse the exposition into a throwaway block.
    let stamped: String = openmetrics
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} 1700000000\n")
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.om");
    std::fs::write(&file, &stamped).unwrap();
    let blocks = dir.path().join("blocks");
    let parsed = promtool(
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            file.to_str().unwrap(),
            blocks.to_str().unwrap(),
        ],
        "",
    )
    .unwrap();
    assert!(
        parsed.status.success(),
        "promtool's OpenMetrics parser refused /metrics:\n{}\n{openmetrics}",
        output_of(&parsed)
    );
    // The same series either way (values may have moved between the two scrapes).
    let series = |t: &str| -> Vec<String> {
        let mut s: Vec<String> = t
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                l.rsplit_once(' ')
                    .map_or(l, |(series, _)| series)
                    .to_string()
            })
            .collect();
        s.sort();
        s
    };
    assert_eq!(series(&text), series(&openmetrics));

    // An explicit text/plain, or a wildcard, gets text again.
    for accept in ["text/plain", "*/*", "text/plain;version=0.0.4"] {
        let (head, _) = scrape(mg.admin_addr, Some(accept)).await;
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{accept}: {head}"
        );
    }
    busy.mg.shutdown().await;
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
