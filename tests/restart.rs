//! Durability: the registry, stages, aliases, routing and feature values survive a restart and a
//! `kill -9`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::*;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::features_client::FeaturesClient;

async fn snapshot(
    reg: &mut modelgate::pb::modelgate::v1::registry_client::RegistryClient<
        tonic::transport::Channel,
    >,
) -> Vec<(u32, i32, Vec<String>, String)> {
    let versions = reg
        .list_model_versions(pb::ListModelVersionsRequest {
            model: "iris".into(),
            stage: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    versions
        .into_iter()
        .map(|v| (v.version, v.stage, v.aliases, v.endpoint))
        .collect()
}

async fn set_up_registry(control: SocketAddr, a: &str, b: &str) {
    let mut reg = registry(control).await;
    register(&mut reg, "iris", a).await;
    register(&mut reg, "iris", b).await;
    promote(&mut reg, "iris", "1").await;
    promote(&mut reg, "iris", "2").await;
    reg.set_alias(pb::SetAliasRequest {
        model: "iris".into(),
        alias: "champion".into(),
        version: "2".into(),
    })
    .await
    .unwrap();
    reg.set_alias(pb::SetAliasRequest {
        model: "iris".into(),
        alias: "previous".into(),
        version: "1".into(),
    })
    .await
    .unwrap();
    reg.set_promotion_policy(pb::SetPromotionPolicyRequest {
        model: "iris".into(),
        minimum_metrics: [("accuracy".to_string(), 0.8)].into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn check_state(control: SocketAddr, data: SocketAddr, b_endpoint: &str) {
    let mut reg = registry(control).await;
    let s = snapshot(&mut reg).await;
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].0, 1);
    assert_eq!(s[0].1, pb::Stage::Archived as i32);
    assert_eq!(s[0].2, vec!["previous".to_string()]);
    assert_eq!(s[1].1, pb::Stage::Production as i32);
    assert_eq!(s[1].2, vec!["champion".to_string()]);
    assert_eq!(s[1].3, b_endpoint);
    let policy = reg
        .get_promotion_policy(pb::GetPromotionPolicyRequest {
            model: "iris".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.minimum_metrics.get("accuracy"), Some(&0.8));
    // Routing is back without any control call.
    let mut client = infer_client(data).await;
    let resp = client
        .model_infer(infer_request("iris", &[&[1.0]]))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "2");
    // Version numbers continue where they stopped.
    assert_eq!(register(&mut reg, "iris", b_endpoint).await, 3);
}

#[tokio::test]
async fn registry_and_routing_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = model_server("name=iris;kind=linear;weights=1;version=a").await;
    let b = model_server("name=iris;kind=linear;weights=2;version=b").await;
    let mg = start(dir.path()).await;
    set_up_registry(mg.control_addr, &a.endpoint(), &b.endpoint()).await;
    mg.shutdown().await;

    let mg = start(dir.path()).await;
    check_state(mg.control_addr, mg.data_addr, &b.endpoint()).await;
    mg.shutdown().await;
}

/// Starts the real binary and reads its listening addresses from the JSON start-up log line.
fn spawn_binary(dir: &std::path::Path) -> (Child, SocketAddr, SocketAddr) {
    let (child, data, control, _) = spawn_binary_logged(dir);
    (child, data, control)
}

/// The log message of a store repairing the feature runs a process left open (`store::runs`).
const REPAIRED: &str =
    "the last process did not stop cleanly: feature runs it left open are merged";

/// [`spawn_binary`], with the JSON log lines written before it listened.
fn spawn_binary_logged(
    dir: &std::path::Path,
) -> (Child, SocketAddr, SocketAddr, Vec<serde_json::Value>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut before = Vec::new();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let status = child.wait();
            panic!("modelgate exited before listening: {status:?}");
        };
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["message"] == "modelgate listening" {
            let data = v["data"].as_str().unwrap().parse().unwrap();
            let control = v["control"].as_str().unwrap().parse().unwrap();
            // Keep draining stderr so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (child, data, control, before);
        }
        before.push(v);
    }
}

/// A features client of `control`, with the numeric feature "balance" registered.
async fn balance_registered(control: SocketAddr) -> FeaturesClient<tonic::transport::Channel> {
    let mut features = FeaturesClient::new(channel(control).await);
    features
        .register_feature(pb::RegisterFeatureRequest {
            name: "balance".into(),
            r#type: pb::FeatureType::Number as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    features
}

/// The "balance" of `entities` as of now, as `GetFeatures` answers on `control`.
async fn balances(control: SocketAddr, entities: &[&str]) -> pb::GetFeaturesResponse {
    FeaturesClient::new(channel(control).await)
        .get_features(pb::GetFeaturesRequest {
            entity_ids: entities.iter().map(|e| e.to_string()).collect(),
            feature_names: vec!["balance".into()],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
}

/// How many runs of feature rows the store repaired as it opened, if it did.
fn repaired(log: &[serde_json::Value]) -> Option<u64> {
    log.iter()
        .find(|v| v["message"] == REPAIRED)
        .map(|v| v["repaired"].as_u64().unwrap())
}

/// Sends SIGTERM and waits for the process to exit, successfully (off the runtime, whose tasks
/// close this test's connections meanwhile: the drain waits for them).
async fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn acknowledged_control_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let a = model_server("name=iris;kind=linear;weights=1;version=a").await;
    let b = model_server("name=iris;kind=linear;weights=2;version=b").await;
    let (mut child, _data, control) = spawn_binary(dir.path());
    set_up_registry(control, &a.endpoint(), &b.endpoint()).await;
    // SIGKILL right after the last acknowledgement: no graceful close, no flush.
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, data, control) = spawn_binary(dir.path());
    check_state(control, data, &b.endpoint()).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Feature values put just before a `kill -9` read back as the latest after the restart: an
/// acknowledged `PutFeatures` is in RocksDB's write-ahead log, history rows and latest values
/// in one write.
#[tokio::test]
async fn features_written_just_before_kill_9_are_the_latest_after_it() {
    use modelgate::pb::modelgate::v1::feature_value::Kind;
    let dir = tempfile::tempdir().unwrap();
    let now = modelgate::clock::Clock::now_ms(&modelgate::clock::SystemClock);
    let (mut child, _data, control) = spawn_binary(dir.path());
    let mut features = balance_registered(control).await;
    for (i, x) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        let r = features
            .put_features(pb::PutFeaturesRequest {
                rows: vec![
                    put_row(
                        "acct-1",
                        &[("balance", Kind::Number(x))],
                        now - 3_000 + i as u64 * 1_000,
                    ),
                    put_row("acct-2", &[("balance", Kind::Number(-x))], now),
                ],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.accepted, 2);
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, _data, control, log) = spawn_binary_logged(dir.path());
    // Both entities' runs (three rows each) were left open: their newest rows were in the
    // history only, and the store merged them as it opened.
    assert_eq!(repaired(&log), Some(2));
    let r = balances(control, &["acct-1", "acct-2"]).await;
    let value = |e: usize| r.entities[e].cells[0].value.clone().and_then(|v| v.kind);
    assert_eq!(value(0), Some(Kind::Number(30.0)));
    assert_eq!(r.entities[0].cells[0].event_time, Some(ts(now - 1_000)));
    assert_eq!(
        value(1),
        Some(Kind::Number(-30.0)),
        "the later of three rows at one time"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A process stopped with SIGTERM merges its runs of feature rows as it stops: the next start
/// has nothing to repair, and reads the newest values.
#[tokio::test]
async fn feature_runs_are_merged_when_the_process_stops() {
    use modelgate::pb::modelgate::v1::feature_value::Kind;
    let dir = tempfile::tempdir().unwrap();
    let now = modelgate::clock::Clock::now_ms(&modelgate::clock::SystemClock);
    let (child, _data, control) = spawn_binary(dir.path());
    let mut features = balance_registered(control).await;
    for x in [1.0, 2.0, 3.0] {
        let row = put_row(
            "acct",
            &[("balance", Kind::Number(x))],
            now - 3_000 + x as u64,
        );
        features
            .put_features(pb::PutFeaturesRequest { rows: vec![row] })
            .await
            .unwrap();
    }
    drop(features);
    terminate(child).await;

    let (child, _data, control, log) = spawn_binary_logged(dir.path());
    assert_eq!(repaired(&log), None, "nothing left to repair");
    let r = balances(control, &["acct"]).await;
    let cell = &r.entities[0].cells[0];
    assert_eq!(
        cell.value.clone().and_then(|v| v.kind),
        Some(Kind::Number(3.0))
    );
    assert_eq!(cell.event_time, Some(ts(now - 3_000 + 3)));
    // Right after the start: a SIGTERM this early stops it gracefully too.
    terminate(child).await;
}
