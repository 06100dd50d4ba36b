//! Fleet mode: several replicas, one configuration, through a real redis-server (standalone and
//! a 3-master Cluster) on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::redis::{self as r, RedisCluster, RedisServer};
use common::*;
use modelgate::config::Config;
use modelgate::fleet::{FleetSettings, RedisSettings};
use modelgate::pb::modelgate::v1 as pb;
use modelgate::server::Running;
use modelgate::storage::EventLog;
use tonic::Code;

const MODEL: &str = "name=iris;kind=linear;weights=1,2";

fn fleet_config(dir: &std::path::Path, urls: &str) -> Config {
    let mut c = Config::for_tests(dir);
    c.fleet = Some(FleetSettings {
        redis: RedisSettings {
            urls: urls.split(',').map(str::to_string).collect(),
            cluster: false,
            timeout: Duration::from_millis(500),
        },
        name: "test".into(),
        poll: Duration::from_millis(200),
        outcome_window: Duration::from_secs(3600),
    });
    c
}

async fn replica(dir: &tempfile::TempDir, urls: &str) -> Running {
    start_with(fleet_config(dir.path(), urls)).await
}

/// Which version served an inference of iris on `mg`, or the error code.
async fn served(mg: &Running) -> Result<String, Code> {
    let mut c = infer_client(mg.data_addr).await;
    c.model_infer(infer_request("iris", &[&[1.0, 2.0]]))
        .await
        .map(|r| served_version(&r))
        .map_err(|s| s.code())
}

/// Waits until `mg` serves iris from `version`; returns how long it took.
async fn until_served(mg: &Running, version: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if served(mg).await.as_deref() == Ok(version) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "replica still does not serve version {version} after {limit:?}: {:?}",
            served(mg).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn versions(mg: &Running) -> Vec<u32> {
    let mut reg = registry(mg.control_addr).await;
    reg.list_model_versions(pb::ListModelVersionsRequest {
        model: "iris".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .versions
    .iter()
    .map(|v| v.version)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_on_one_replica_routes_every_replica_within_a_second() {
    if !r::available() {
        return;
    }
    let redis = RedisServer::start();
    let (v1, v2) = (
        model_server(MODEL).await,
        model_server("name=iris;kind=linear;weights=3,4").await,
    );
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut fleet = Vec::new();
    for d in &dirs {
        fleet.push(replica(d, &redis.url()).await);
    }
    let mut a = registry(fleet[0].control_addr).await;
    assert_eq!(register(&mut a, "iris", &v1.endpoint()).await, 1);
    promote(&mut a, "iris", "1").await;
    for mg in &fleet {
        until_served(mg, "1", Duration::from_secs(1)).await;
    }
    // A promotion on the third replica reaches the first within a second.
    let mut c = registry(fleet[2].control_addr).await;
    assert_eq!(register(&mut c, "iris", &v2.endpoint()).await, 2);
    promote(&mut c, "iris", "2").await;
    let took = until_served(&fleet[0], "2", Duration::from_secs(1)).await;
    eprintln!("replica A served the promotion made on C after {took:?}");
    assert_eq!(versions(&fleet[1]).await, vec![1, 2]);
    for mg in fleet {
        mg.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_writing_at_once_lose_no_update() {
    if !r::available() {
        return;
    }
    let redis = RedisServer::start();
    let ms = model_server(MODEL).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        replica(&da, &redis.url()).await,
        replica(&db, &redis.url()).await,
    );
    let write = |addr, n: usize| {
        let endpoint = ms.endpoint();
        async move {
            let mut reg = registry(addr).await;
            let mut got = Vec::new();
            for _ in 0..n {
                got.push(register(&mut reg, "iris", &endpoint).await);
            }
            got
        }
    };
    let (from_a, from_b) = tokio::join!(write(a.control_addr, 10), write(b.control_addr, 10));
    let mut all: Vec<u32> = from_a.iter().chain(&from_b).copied().collect();
    all.sort();
    assert_eq!(all, (1..=20).collect::<Vec<_>>(), "a number handed out twice");
    // Both replicas, and a third that joins later, see all twenty.
    let dc = tempfile::tempdir().unwrap();
    let c = replica(&dc, &redis.url()).await;
    assert_eq!(versions(&c).await.len(), 20);
    let deadline = Instant::now() + Duration::from_secs(1);
    while versions(&a).await.len() != 20 || versions(&b).await.len() != 20 {
        assert!(Instant::now() < deadline, "a replica missed a write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for mg in [a, b, c] {
        mg.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_a_replica_serves_its_last_state_and_refuses_writes() {
    if !r::available() {
        return;
    }
    let mut redis = RedisServer::start();
    let ms = model_server(MODEL).await;
    let dir = tempfile::tempdir().unwrap();
    let mg = replica(&dir, &redis.url()).await;
    let mut reg = registry(mg.control_addr).await;
    register(&mut reg, "iris", &ms.endpoint()).await;
    promote(&mut reg, "iris", "1").await;

    redis.kill();
    assert_eq!(served(&mg).await, Ok("1".into()), "traffic needs no Redis");
    let refused = reg
        .register_model_version(pb::RegisterModelVersionRequest {
            model: "iris".into(),
            endpoint: ms.endpoint(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("fleet store"), "{refused:?}");
    let ready = http_get(mg.admin_addr, "/ready").await;
    assert!(ready.contains("200"), "{ready}");
    assert!(ready.contains("fleet store unreachable"), "{ready}");
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert_eq!(metric_sum(&metrics, "modelgate_fleet_store_up", ""), 0.0);

    // A restart while Redis is away serves from the local copy.
    mg.shutdown().await;
    let mg = replica(&dir, &redis.url()).await;
    assert_eq!(served(&mg).await, Ok("1".into()));

    // Redis returns empty: the replica seeds it with its last state, and a new replica reads it.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !redis.cli(&["hexists", "modelgate:test:config", "#version"]).starts_with('1') {
        assert!(Instant::now() < deadline, "the replica did not re-seed Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = tempfile::tempdir().unwrap();
    let mg2 = replica(&other, &redis.url()).await;
    assert_eq!(served(&mg2).await, Ok("1".into()));
    let mut reg = registry(mg.control_addr).await;
    assert_eq!(register(&mut reg, "iris", &ms.endpoint()).await, 2);
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert_eq!(metric_sum(&metrics, "modelgate_fleet_store_up", ""), 1.0);
    // The outage and the return are events.
    let events = mg.events.store().events_after(0, 100).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    assert!(kinds.contains(&"fleet_store_reachable"), "{kinds:?}");
    mg.shutdown().await;
    mg2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_shares_the_configuration_too() {
    if !r::available() {
        return;
    }
    let cluster = RedisCluster::start();
    let ms = model_server(MODEL).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(&da, &cluster.urls()).await;
    let b = replica(&db, &cluster.urls()).await;
    let mut reg = registry(a.control_addr).await;
    register(&mut reg, "iris", &ms.endpoint()).await;
    promote(&mut reg, "iris", "1").await;
    until_served(&b, "1", Duration::from_secs(1)).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_auth_is_used_and_a_wrong_password_is_a_clear_refusal() {
    if !r::available() {
        return;
    }
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let ms = model_server(MODEL).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let mg = replica(&dir, &url).await;
    let mut reg = registry(mg.control_addr).await;
    assert_eq!(register(&mut reg, "iris", &ms.endpoint()).await, 1);
    mg.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let wrong = format!("redis://:nope@127.0.0.1:{}", redis.port);
    let mg = replica(&dir, &wrong).await;
    let refused = registry(mg.control_addr)
        .await
        .register_model_version(pb::RegisterModelVersionRequest {
            model: "iris".into(),
            endpoint: ms.endpoint(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        !refused.message().contains("nope"),
        "the password leaked: {refused:?}"
    );
    let ready = http_get(mg.admin_addr, "/ready").await;
    assert!(ready.contains("fleet store unreachable"), "{ready}");
    mg.shutdown().await;
}
