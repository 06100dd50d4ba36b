//! Transparent pass-through of methods modelgate does not understand: unary and all three
//! streaming kinds, metadata both ways, trailers, status codes and deadlines.

mod common;

use std::time::Duration;

use common::*;
use modelgate::config::Config;
use modelgate::pb::testing::{echo_client::EchoClient, EchoRequest};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Request;

async fn setup(
    default_model: Option<&str>,
) -> (
    tempfile::TempDir,
    modelgate::server::Running,
    EchoClient<Channel>,
) {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let mut config = Config::for_tests(dir.path());
    config.default_model = default_model.map(str::to_string);
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "echo", &echo).await;
    promote(&mut reg, "echo", "1").await;
    let client = EchoClient::connect(format!("http://{}", mg.data_addr))
        .await
        .unwrap();
    (dir, mg, client)
}

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("x-model-name", "echo".parse().unwrap());
    r.metadata_mut().insert("x-tenant", "blue".parse().unwrap());
    r
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unary_keeps_metadata_both_ways() {
    let (_dir, mg, mut client) = setup(None).await;
    let resp = client.unary(req(echo("hi"))).await.unwrap();
    assert_eq!(resp.metadata().get("x-echo-header").unwrap(), "unary");
    assert_eq!(served_version(&resp), "1");
    let request_id = request_id_of(&resp);
    let body = resp.into_inner();
    assert_eq!(body.message, "hi");
    assert!(
        body.metadata.contains(&"x-tenant=blue".to_string()),
        "{:?}",
        body.metadata
    );
    assert!(body.metadata.contains(&"x-model-name=echo".to_string()));
    // The upstream sees the same request id the caller gets back.
    assert!(
        body.metadata
            .contains(&format!("x-modelgate-request-id={request_id}")),
        "{:?}",
        body.metadata
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn a_client_request_id_is_kept() {
    let (_dir, mg, mut client) = setup(None).await;
    let mut r = req(echo("hi"));
    r.metadata_mut()
        .insert("x-request-id", "order-17".parse().unwrap());
    let resp = client.unary(r).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-modelgate-request-id").unwrap(),
        "order-17"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn server_streaming_passes_every_message() {
    let (_dir, mg, mut client) = setup(None).await;
    let resp = client
        .server_stream(req(EchoRequest {
            message: "n".into(),
            repeat: 50,
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "1");
    let msgs: Vec<_> = resp
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(msgs.len(), 50);
    assert_eq!(msgs[49].message, "n 49");
    assert_eq!(msgs[49].index, 49);
    mg.shutdown().await;
}

#[tokio::test]
async fn client_streaming_passes_every_message() {
    let (_dir, mg, mut client) = setup(None).await;
    let input = tokio_stream::iter(["a", "b", "c"].map(echo));
    let resp = client.client_stream(req(input)).await.unwrap().into_inner();
    assert_eq!(resp.message, "a+b+c");
    assert_eq!(resp.index, 3);
    assert!(resp.metadata.contains(&"x-tenant=blue".to_string()));
    mg.shutdown().await;
}

#[tokio::test]
async fn bidi_streaming_is_interactive() {
    let (_dir, mg, mut client) = setup(None).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let resp = client
        .bidi_stream(req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap();
    let mut replies = resp.into_inner();
    // Ping-pong: each reply must arrive before the next message is sent, so nothing is buffered
    // whole in between.
    for word in ["one", "two", "three"] {
        tx.send(echo(word)).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.message, word.to_uppercase());
    }
    drop(tx);
    assert!(replies.next().await.is_none());
    mg.shutdown().await;
}

#[tokio::test]
async fn upstream_status_codes_and_messages_come_back_unchanged() {
    let (_dir, mg, mut client) = setup(None).await;
    let err = client
        .unary(req(EchoRequest {
            message: "no such user".into(),
            fail_with_code: tonic::Code::NotFound as i32,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "no such user");
    assert_eq!(
        err.metadata().get("x-modelgate-model-version").unwrap(),
        "1"
    );
    // A stream that fails after messages: the status arrives in the trailers.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(echo("fine")).await.unwrap();
    tx.send(EchoRequest {
        message: "broken".into(),
        fail_with_code: tonic::Code::DataLoss as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut replies = client
        .bidi_stream(req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replies.next().await.unwrap().unwrap().message, "FINE");
    let err = replies.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss);
    assert_eq!(err.message(), "broken");
    mg.shutdown().await;
}

#[tokio::test]
async fn the_callers_deadline_applies() {
    let (_dir, mg, _client) = setup(None).await;
    // A raw call: tonic's client would race modelgate's answer with its own timer.
    let body = modelgate::proxy::body::frame(&EchoRequest {
        message: "slow".into(),
        delay_ms: 2000,
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let (code, msg) = raw_grpc_call_with(
        mg.data_addr,
        "/modelgate.testing.Echo/Unary",
        body,
        &[("grpc-timeout", "150m"), ("x-model-name", "echo")],
    )
    .await;
    assert_eq!(code, tonic::Code::DeadlineExceeded as i32, "{msg}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at the deadline, not after the upstream"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn the_default_model_serves_calls_without_a_model_header() {
    let (_dir, mg, mut client) = setup(Some("echo")).await;
    let resp = client.unary(Request::new(echo("default"))).await.unwrap();
    assert_eq!(resp.into_inner().message, "default");
    mg.shutdown().await;

    let (_dir, mg, mut client) = setup(None).await;
    let err = client.unary(Request::new(echo("lost"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("x-model-name"), "{}", err.message());
    assert!(
        err.message().contains("--default-model"),
        "{}",
        err.message()
    );
    mg.shutdown().await;
}
