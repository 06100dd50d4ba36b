//! Health, reflection (v1 and v1alpha) and the admin endpoints, on the ports the design names;
//! and grpcurl, a real peer, against them.

mod common;

use common::*;
use tokio_stream::StreamExt;

/// Lists services through server reflection; v1 and v1alpha have the same shape, different types.
macro_rules! reflected_services {
    ($name:ident, $version:ident) => {
        async fn $name(addr: std::net::SocketAddr) -> Vec<String> {
            use tonic_reflection::pb::$version::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let mut c = ServerReflectionClient::new(channel(addr).await);
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = c
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            match stream
                .next()
                .await
                .unwrap()
                .unwrap()
                .message_response
                .unwrap()
            {
                MessageResponse::ListServicesResponse(l) => {
                    l.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
}

reflected_services!(reflected_services_v1, v1);
reflected_services!(reflected_services_v1alpha, v1alpha);

#[tokio::test]
async fn both_ports_serve_health_and_both_reflection_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    for services in [
        reflected_services_v1(mg.data_addr).await,
        reflected_services_v1alpha(mg.data_addr).await,
    ] {
        assert!(
            services.contains(&"inference.GRPCInferenceService".to_string()),
            "{services:?}"
        );
        assert!(
            !services.iter().any(|s| s.starts_with("modelgate.v1")),
            "data port hides control: {services:?}"
        );
    }
    for services in [
        reflected_services_v1(mg.control_addr).await,
        reflected_services_v1alpha(mg.control_addr).await,
    ] {
        assert!(
            services.contains(&"modelgate.v1.Registry".to_string()),
            "{services:?}"
        );
        assert!(
            !services.contains(&"inference.GRPCInferenceService".to_string()),
            "{services:?}"
        );
    }
    for (addr, service) in [
        (mg.data_addr, "inference.GRPCInferenceService"),
        (mg.control_addr, "modelgate.v1.Registry"),
        (mg.data_addr, ""),
    ] {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            s.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    mg.shutdown().await;
}

#[tokio::test]
async fn oip_server_calls_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let mut client = infer_client(mg.data_addr).await;
    use modelgate::pb::inference::*;
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    // Nothing in production yet: not ready.
    assert!(
        !client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let md = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.name, "modelgate");
    let server = model_server("name=iris;weights=1").await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &server.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn admin_port_answers_live_ready_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let live = http_get(mg.admin_addr, "/live").await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let ready = http_get(mg.admin_addr, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("# TYPE modelgate_shed_requests_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelgate_in_flight_requests 0"),
        "{metrics}"
    );
    let missing = http_get(mg.admin_addr, "/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    mg.shutdown().await;
}

#[tokio::test]
async fn grpcurl_works_without_proto_files() {
    let Some(g) = grpcurl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = model_server("name=iris;kind=linear;weights=2,3;bias=1").await;
    let mg = start(dir.path()).await;
    let ctl = mg.control_addr.to_string();
    let data = mg.data_addr.to_string();
    let (ok, out) = run_tool(&g, &["-plaintext", &ctl, "list"]).await;
    assert!(ok && out.contains("modelgate.v1.Registry"), "{out}");
    let body = format!(
        r#"{{"model":"iris","endpoint":"{}","metrics":{{"accuracy":0.9}}}}"#,
        server.endpoint()
    );
    let (ok, out) = run_tool(
        &g,
        &[
            "-plaintext",
            "-d",
            &body,
            &ctl,
            "modelgate.v1.Registry/RegisterModelVersion",
        ],
    )
    .await;
    assert!(ok && out.contains("\"STAGE_STAGING\""), "{out}");
    let (ok, out) = run_tool(
        &g,
        &[
            "-plaintext",
            "-d",
            r#"{"model":"iris","version":"1","stage":"STAGE_PRODUCTION"}"#,
            &ctl,
            "modelgate.v1.Registry/TransitionStage",
        ],
    )
    .await;
    assert!(ok && out.contains("STAGE_PRODUCTION"), "{out}");
    let (ok, out) = run_tool(&g, &["-plaintext", &data, "list"]).await;
    assert!(
        ok && out.contains("inference.GRPCInferenceService"),
        "{out}"
    );
    let infer = r#"{"model_name":"iris","inputs":[{"name":"input","datatype":"FP32","shape":[1,2],"contents":{"fp32_contents":[1,1]}}]}"#;
    let (ok, out) = run_tool(
        &g,
        &[
            "-plaintext",
            "-v",
            "-d",
            infer,
            &data,
            "inference.GRPCInferenceService/ModelInfer",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("x-modelgate-model-version: 1"), "{out}");
    assert!(out.contains("6"), "2*1 + 3*1 + 1 = 6: {out}");
    let (ok, out) = run_tool(
        &g,
        &[
            "-plaintext",
            "-d",
            r#"{"model":"iris","version":"1","stage":"STAGE_UNSPECIFIED"}"#,
            &ctl,
            "modelgate.v1.Registry/TransitionStage",
        ],
    )
    .await;
    assert!(
        !ok && out.contains("InvalidArgument") && out.contains("stage: required"),
        "{out}"
    );
    mg.shutdown().await;
}

/// Data-port connections are spread over the data threads (`--data-threads`, two in tests):
/// four clients, each connecting after the last was served, end up two on each thread, whichever
/// thread accepted them, and every one is proxied. Left to whichever thread called `accept`
/// first, a thread often took three or all four while the other idled. A closed connection stops
/// counting, so the next one goes to the thread it left.
#[tokio::test]
async fn data_connections_spread_evenly_over_the_data_threads() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_server("name=iris;kind=logistic;weights=0.5,-0.25;bias=0.1").await;
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &model.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = infer_client(mg.data_addr).await;
        let resp = client
            .model_infer(infer_request("iris", &[&[1.0, 2.0]]))
            .await
            .expect("proxied on whichever thread the connection went to");
        assert_eq!(served_version(&resp), "1");
        clients.push(client);
    }
    let within = std::time::Duration::from_secs(5);
    wait_for_metric(
        mg.admin_addr,
        "modelgate_data_connections{thread=\"0\"} 2\n",
        within,
    )
    .await;
    wait_for_metric(
        mg.admin_addr,
        "modelgate_data_connections{thread=\"1\"} 2\n",
        within,
    )
    .await;
    drop(clients);
    wait_for_metric(
        mg.admin_addr,
        "modelgate_data_connections{thread=\"0\"} 0\n",
        within,
    )
    .await;
    wait_for_metric(
        mg.admin_addr,
        "modelgate_data_connections{thread=\"1\"} 0\n",
        within,
    )
    .await;
    mg.shutdown().await;
}
