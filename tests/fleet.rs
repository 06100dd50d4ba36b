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
use tonic::Code;

const MODEL: &str = "name=iris;kind=linear;weights=1,2";

fn fleet_config(dir: &std::path::Path, urls: &str) -> Config {
    let mut c = Config::for_tests(dir);
    c.fleet = Some(FleetSettings {
        redis: RedisSettings {
            urls: urls.split(',').map(str::to_string).collect(),
            cluster: false,
            timeout: Duration::from_millis(500),
            ca: None,
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

/// Registers `endpoint` as the next version of `model`, its prediction read as the threshold at
/// 0.5 of the output `probabilities` (labels `positive` / `negative`).
async fn register_scored(
    control: std::net::SocketAddr,
    model: &str,
    endpoint: &str,
    (positive, negative): (&str, &str),
) {
    registry(control)
        .await
        .register_model_version(pb::RegisterModelVersionRequest {
            model: model.into(),
            endpoint: endpoint.into(),
            prediction: Some(threshold_prediction(positive, negative)),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The value of an unlabelled gauge on a /metrics page.
fn gauge(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
        .trim()
        .parse()
        .unwrap()
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
    assert_eq!(
        all,
        (1..=20).collect::<Vec<_>>(),
        "a number handed out twice"
    );
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
    assert_eq!(gauge(&metrics, "modelgate_fleet_store_up"), 0.0);

    // A restart while Redis is away serves from the local copy.
    mg.shutdown().await;
    let mg = replica(&dir, &redis.url()).await;
    assert_eq!(served(&mg).await, Ok("1".into()));

    // Redis returns empty: the replica seeds it with its last state, and a new replica reads it.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !redis
        .cli(&["hexists", "mg:test:config", "#version"])
        .starts_with('1')
    {
        assert!(
            Instant::now() < deadline,
            "the replica did not re-seed Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = tempfile::tempdir().unwrap();
    let mg2 = replica(&other, &redis.url()).await;
    assert_eq!(served(&mg2).await, Ok("1".into()));
    let mut reg = registry(mg.control_addr).await;
    assert_eq!(register(&mut reg, "iris", &ms.endpoint()).await, 2);
    let metrics = http_get(mg.admin_addr, "/metrics").await;
    assert_eq!(gauge(&metrics, "modelgate_fleet_store_up"), 1.0);
    assert_eq!(
        gauge(&metrics, "modelgate_fleet_config_version"),
        2.0,
        "seeded, then one change"
    );
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

mod equality {
    //! Three replicas fed round robin, with every outcome sent to another replica than the one
    //! that served its prediction, measure exactly what one modelgate fed the same calls
    //! measures.

    use super::*;
    use modelgate::pb::modelgate::v1::{
        experiments_client::ExperimentsClient, outcomes_client::OutcomesClient,
        shadows_client::ShadowsClient,
    };

    const CONTROL: &str = "name=m;kind=logistic;weights=1,-1;bias=0;version=a";
    const TREATMENT: &str = "name=m;kind=logistic;weights=-1,1;bias=0;version=b";

    /// Versions 1 (production) and 2, an experiment on half the users, a shadow of 2 on the
    /// other half — set up through `mg`.
    async fn configure(mg: &Running, a: &str, b: &str) {
        for endpoint in [a, b] {
            register_scored(mg.control_addr, "m", endpoint, ("1", "0")).await;
        }
        promote(&mut registry(mg.control_addr).await, "m", "1").await;
        ExperimentsClient::new(channel(mg.control_addr).await)
            .create_experiment(pb::CreateExperimentRequest {
                name: "homepage".into(),
                model: "m".into(),
                variants: vec![
                    pb::VariantSpec {
                        name: "control".into(),
                        version: "1".into(),
                        weight: 1.0,
                    },
                    pb::VariantSpec {
                        name: "treatment".into(),
                        version: "2".into(),
                        weight: 1.0,
                    },
                ],
                salt: "2026-12".into(),
                coverage: 0.5,
                ..Default::default()
            })
            .await
            .unwrap();
        ShadowsClient::new(channel(mg.control_addr).await)
            .set_shadow(pb::SetShadowRequest {
                model: "m".into(),
                version: "2".into(),
                sample_fraction: 1.0,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    struct Figures {
        results: pb::ExperimentResults,
        performance: Vec<Option<pb::PerformanceFigures>>,
        shadow: pb::ShadowReport,
    }

    async fn figures(mg: &Running) -> Figures {
        let ch = channel(mg.control_addr).await;
        let mut results = ExperimentsClient::new(ch.clone())
            .get_experiment_results(pb::ExperimentRef {
                name: "homepage".into(),
            })
            .await
            .unwrap()
            .into_inner();
        results.computed_at = None;
        let mut performance = Vec::new();
        for v in ["1", "2"] {
            let p = OutcomesClient::new(ch.clone())
                .get_model_performance(pb::GetModelPerformanceRequest {
                    model: "m".into(),
                    version: v.into(),
                    window: 0,
                })
                .await
                .unwrap()
                .into_inner();
            // `recent` is per replica (the last outcomes have no order across replicas).
            performance.push(p.all_time);
        }
        let mut shadow = ShadowsClient::new(ch)
            .get_shadow_report(pb::GetShadowReportRequest {
                model: "m".into(),
                version: "2".into(),
                disagreements: 0,
            })
            .await
            .unwrap()
            .into_inner();
        // Latencies and the recent disagreements are timings and per-replica windows.
        shadow.production_latency = None;
        shadow.shadow_latency = None;
        shadow.disagreements.clear();
        Figures {
            results,
            performance,
            shadow,
        }
    }

    /// Waits until the whole configuration reached `mg` (the shadow is set last), without
    /// sending it traffic that would count.
    async fn until_served_m(mg: &Running, limit: Duration) {
        let start = Instant::now();
        let mut c = ShadowsClient::new(channel(mg.control_addr).await);
        loop {
            let shadows = c
                .list_shadows(pb::ListShadowsRequest { model: "m".into() })
                .await
                .unwrap()
                .into_inner()
                .shadows;
            if !shadows.is_empty() {
                return;
            }
            assert!(start.elapsed() < limit, "the configuration did not arrive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn as_user<T>(msg: T, user: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("x-user-id", user.parse().unwrap());
        r
    }

    fn outcome(request_id: String, i: usize) -> pb::RecordOutcomeRequest {
        pb::RecordOutcomeRequest {
            request_id,
            actual: Some(pb::Actual {
                kind: Some(pb::actual::Kind::Label(
                    if i % 3 == 0 { "1" } else { "0" }.into(),
                )),
            }),
            ..Default::default()
        }
    }

    pub async fn three_replicas_measure_what_one_measures(urls: &str) {
        let (a, b) = (model_server(CONTROL).await, model_server(TREATMENT).await);
        let single_dir = tempfile::tempdir().unwrap();
        let single = start(single_dir.path()).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut fleet = Vec::new();
        for d in &dirs {
            fleet.push(replica(d, urls).await);
        }
        configure(&single, &a.endpoint(), &b.endpoint()).await;
        configure(&fleet[0], &a.endpoint(), &b.endpoint()).await;
        for mg in &fleet {
            until_served_m(mg, Duration::from_secs(2)).await;
        }

        let mut one = infer_client(single.data_addr).await;
        let mut many = Vec::new();
        for mg in &fleet {
            many.push(infer_client(mg.data_addr).await);
        }
        let mut one_out = OutcomesClient::new(channel(single.control_addr).await);
        let mut many_out = Vec::new();
        for mg in &fleet {
            many_out.push(OutcomesClient::new(channel(mg.control_addr).await));
        }
        const CALLS: usize = 240;
        let mut pending = Vec::new();
        for i in 0..CALLS {
            let user = format!("user-{}", i % 80);
            let x = (i % 7) as f32 / 7.0;
            let req = infer_request("m", &[&[x, 1.0 - x]]);
            let r1 = one.model_infer(as_user(req.clone(), &user)).await.unwrap();
            let r3 = many[i % 3].model_infer(as_user(req, &user)).await.unwrap();
            assert_eq!(
                r1.metadata()
                    .get("x-modelgate-variant")
                    .map(|v| v.to_str().unwrap()),
                r3.metadata()
                    .get("x-modelgate-variant")
                    .map(|v| v.to_str().unwrap()),
                "the same user gets the same variant from the fleet"
            );
            pending.push((request_id_of(&r1), request_id_of(&r3), i));
        }
        // Outcomes once their records are written; each to another replica than the one that
        // served the prediction.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (id1, id3, i) in pending {
            one_out.record_outcome(outcome(id1, i)).await.unwrap();
            let mut tries = 0;
            loop {
                match many_out[(i + 1) % 3]
                    .record_outcome(outcome(id3.clone(), i))
                    .await
                {
                    Ok(_) => {
                        if i == 0 {
                            // The same outcome again, on the third replica: counted once.
                            let again = many_out[(i + 2) % 3]
                                .record_outcome(outcome(id3.clone(), i))
                                .await
                                .unwrap_err();
                            assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
                        }
                        break;
                    }
                    // The stub may still be on its way to Redis.
                    Err(s) if s.code() == Code::NotFound && tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(s) => panic!("outcome {i} refused: {s:?}"),
                }
            }
        }

        let expected = figures(&single).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        for (n, mg) in fleet.iter().enumerate() {
            loop {
                let got = figures(mg).await;
                let same = got.results.variants == expected.results.variants
                    && got.performance == expected.performance
                    && got.shadow == expected.shadow;
                if same {
                    assert_eq!(got.results.significance, expected.results.significance);
                    assert_eq!(
                        got.results.sample_ratio_mismatch,
                        expected.results.sample_ratio_mismatch
                    );
                    assert_eq!(got.results.always_valid, expected.results.always_valid);
                    break;
                }
                if Instant::now() > deadline {
                    assert_eq!(
                        got.results.variants, expected.results.variants,
                        "replica {n}"
                    );
                    assert_eq!(got.performance, expected.performance, "replica {n}");
                    assert_eq!(got.shadow, expected.shadow, "replica {n}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let v = &expected.results.variants;
        assert!(
            v.iter().all(|v| v.requests > 20 && v.outcomes > 10),
            "{v:?}"
        );
        assert!(expected.shadow.compared > 20, "{:?}", expected.shadow);
        for mg in fleet {
            mg.shutdown().await;
        }
        single.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_measure_exactly_what_one_measures() {
    if !r::available() {
        return;
    }
    let redis = RedisServer::start();
    equality::three_replicas_measure_what_one_measures(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_fleet_measures_exactly_what_one_measures() {
    if !r::available() {
        return;
    }
    let cluster = RedisCluster::start();
    equality::three_replicas_measure_what_one_measures(&cluster.urls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_stream_with_the_same_cursors_on_every_replica() {
    use modelgate::pb::modelgate::v1::events_client::EventsClient;
    use tokio_stream::StreamExt;
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
    // A watcher on B, from the start.
    let mut watch = EventsClient::new(channel(b.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut reg_a = registry(a.control_addr).await;
    register(&mut reg_a, "iris", &ms.endpoint()).await;
    let mut reg_b = registry(b.control_addr).await;
    register(&mut reg_b, "iris", &ms.endpoint()).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(2), watch.next())
            .await
            .expect("B's watcher sees both replicas' events")
            .unwrap()
            .unwrap();
        seen.push((e.cursor, e.r#type, e.version));
    }
    assert_eq!(
        seen,
        vec![
            (1, "version_registered".to_string(), 1),
            (2, "version_registered".to_string(), 2)
        ]
    );
    // A watcher on A resuming after cursor 1 gets the same second event.
    let mut resumed = EventsClient::new(channel(a.control_addr).await)
        .watch(pb::WatchRequest {
            from_cursor: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = tokio::time::timeout(Duration::from_secs(2), resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((e.cursor, e.version), (2, 2));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_stub_memory() {
    if !r::available() {
        return;
    }
    let redis = RedisServer::start();
    let ms = model_server("name=iris;kind=logistic;weights=1,2;bias=0").await;
    let dir = tempfile::tempdir().unwrap();
    let mg = replica(&dir, &redis.url()).await;
    register_scored(mg.control_addr, "iris", &ms.endpoint(), ("fraud", "legit")).await;
    promote(&mut registry(mg.control_addr).await, "iris", "1").await;
    let used_memory = |redis: &RedisServer| -> f64 {
        redis
            .cli(&["info", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = used_memory(&redis);
    let mut c = infer_client(mg.data_addr).await;
    const CALLS: usize = 2000;
    for _ in 0..CALLS {
        c.model_infer(infer_request("iris", &[&[0.5, 0.25]]))
            .await
            .unwrap();
    }
    // Stub keys hold binary request ids: read them with a real client, not redis-cli's text.
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let keys = loop {
        let keys: Vec<Vec<u8>> = ::redis::cmd("KEYS")
            .arg("mg:test:p:*")
            .query(&mut conn)
            .unwrap();
        if keys.len() == CALLS || Instant::now() > deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(keys.len(), CALLS, "every prediction left a stub");
    let mut total = 0usize;
    for k in &keys {
        let n: usize = ::redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(k)
            .arg("SAMPLES")
            .arg(0)
            .query(&mut conn)
            .unwrap();
        total += n;
    }
    let per_stub = total as f64 / CALLS as f64;
    // What the server holds in all (the expiry table's entries and allocator rounding included),
    // less the other keys' share, which does not grow with traffic.
    let grown = (used_memory(&redis) - before) / CALLS as f64;
    eprintln!("used_memory grew by {grown:.1} bytes per prediction");
    let ttl_ms: i64 = ::redis::cmd("PTTL").arg(&keys[0]).query(&mut conn).unwrap();
    eprintln!(
        "MEMORY USAGE per stub: {per_stub:.1} bytes (key {} bytes); 1,000 req/s over a 24 h window: {:.1} GiB",
        keys[0].len(),
        per_stub * 1000.0 * 86_400.0 / (1u64 << 30) as f64
    );
    assert!(ttl_ms > 3_500_000 && ttl_ms <= 3_600_000, "TTL {ttl_ms} ms");
    assert!(per_stub <= 128.0, "{per_stub} bytes per stub");
    mg.shutdown().await;
}

mod outages {
    //! A replica killed with SIGKILL, and Redis frozen, under load: nothing acknowledged is lost
    //! or counted twice.

    use super::*;
    use modelgate::pb::modelgate::v1::outcomes_client::OutcomesClient;
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};

    pub const SCORED: &str = "name=iris;kind=logistic;weights=1,-1;bias=0";

    pub async fn register_scored(mg_control: SocketAddr, endpoint: &str) {
        super::register_scored(mg_control, "iris", endpoint, ("1", "0")).await;
        promote(&mut registry(mg_control).await, "iris", "1").await;
    }

    /// The real binary in fleet mode; its data and control addresses.
    fn spawn(dir: &std::path::Path, url: &str) -> (Child, SocketAddr, SocketAddr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
            ])
            .args(["--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--fleet-store", url, "--fleet-name", "test"])
            .arg("--data-dir")
            .arg(dir)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("binary starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                let status = child.wait();
                panic!("modelgate exited before listening: {status:?}");
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "modelgate listening" {
                let data = v["data"].as_str().unwrap().parse().unwrap();
                let control = v["control"].as_str().unwrap().parse().unwrap();
                std::thread::spawn(move || for _ in lines {});
                return (child, data, control);
            }
        }
    }

    pub async fn all_time_outcomes(control: SocketAddr) -> u64 {
        OutcomesClient::new(channel(control).await)
            .get_model_performance(pb::GetModelPerformanceRequest {
                model: "iris".into(),
                version: "1".into(),
                window: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .all_time
            .map_or(0, |f| f.outcomes)
    }

    pub fn success(request_id: String) -> pb::RecordOutcomeRequest {
        pb::RecordOutcomeRequest {
            request_id,
            actual: Some(pb::Actual {
                kind: Some(pb::actual::Kind::Label("1".into())),
            }),
            ..Default::default()
        }
    }

    /// Waits until `control` reports `want` outcomes of iris v1 fleet-wide.
    pub async fn until_outcomes(control: SocketAddr, want: u64, limit: Duration) {
        let start = Instant::now();
        loop {
            let got = all_time_outcomes(control).await;
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the fleet counts {got} outcomes, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_replica_killed_under_load_loses_and_doubles_nothing() {
        if !r::available() {
            return;
        }
        let redis = RedisServer::start();
        let ms = model_server(SCORED).await;
        let (db, da) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let b = replica(&db, &redis.url()).await;
        register_scored(b.control_addr, &ms.endpoint()).await;
        let (mut a, data, control) = spawn(da.path(), &redis.url());
        let mut infer = infer_client(data).await;
        let mut out = OutcomesClient::new(channel(control).await);
        let mut acknowledged = 0u64;
        for _ in 0..150 {
            let r = infer
                .model_infer(infer_request("iris", &[&[1.0, 0.0]]))
                .await
                .unwrap();
            // Straight after the call: the record may still be in the writer's queue.
            if out.record_outcome(success(request_id_of(&r))).await.is_ok() {
                acknowledged += 1;
            }
        }
        // SIGKILL right after the last acknowledgement: no flush, no last publication.
        a.kill().unwrap();
        a.wait().unwrap();
        assert_eq!(acknowledged, 150);
        // Restarted on its data directory: same replica id, its tallies published again, not
        // added again.
        let (mut a, _, control) = spawn(da.path(), &redis.url());
        until_outcomes(b.control_addr, acknowledged, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(all_time_outcomes(b.control_addr).await, acknowledged);
        assert_eq!(all_time_outcomes(control).await, acknowledged);
        a.kill().unwrap();
        a.wait().unwrap();
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_frozen_for_ten_seconds_under_load() {
        if !r::available() {
            return;
        }
        let redis = RedisServer::start();
        let ms = model_server(SCORED).await;
        let (db, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let b = replica(&db, &redis.url()).await;
        let c = replica(&dc, &redis.url()).await;
        register_scored(b.control_addr, &ms.endpoint()).await;
        until_served(&c, "1", Duration::from_secs(2)).await;

        let load = |mg_data: SocketAddr, mg_control: SocketAddr, seconds: u64| async move {
            let mut infer = infer_client(mg_data).await;
            let mut out = OutcomesClient::new(channel(mg_control).await);
            let (mut calls, mut acknowledged) = (0u64, 0u64);
            let until = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < until {
                let r = infer
                    .model_infer(infer_request("iris", &[&[1.0, 0.0]]))
                    .await
                    .expect("no caller error while Redis is away");
                calls += 1;
                match out.record_outcome(success(request_id_of(&r))).await {
                    Ok(_) => acknowledged += 1,
                    Err(e) => eprintln!("outcome refused: {e:?}"),
                }
            }
            (calls, acknowledged)
        };
        let before = tokio::spawn(load(b.data_addr, b.control_addr, 1));
        let (c1, a1) = before.await.unwrap();
        redis.pause();
        let during = tokio::spawn(load(b.data_addr, b.control_addr, 10));
        // Control writes are refused while Redis is away, in about --fleet-timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let refused = registry(b.control_addr)
            .await
            .register_model_version(pb::RegisterModelVersionRequest {
                model: "iris".into(),
                endpoint: ms.endpoint(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let (c2, a2) = during.await.unwrap();
        redis.resume();
        let (c3, a3) = load(b.data_addr, b.control_addr, 1).await;
        eprintln!(
            "calls before/during/after the freeze: {c1}/{c2}/{c3}; outcomes acknowledged: {a1}/{a2}/{a3}"
        );
        assert!(
            c2 > 0 && a2 == c2,
            "outcomes of B's own predictions join while Redis is away"
        );
        let total = a1 + a2 + a3;
        until_outcomes(c.control_addr, total, Duration::from_secs(10)).await;
        b.shutdown().await;
        c.shutdown().await;
    }
}

/// The shared features' script keeps the newest value of each feature, whether writes arrive in
/// time order (stored as they are) or late (compared field by field).
#[test]
fn the_feature_script_keeps_the_newest_value_of_each_feature() {
    if !r::available() {
        return;
    }
    use modelgate::fleet::features::{encode_value, NEWEST, NEWEST_WINS};
    use modelgate::record::FeatureValue::Number;
    let redis = RedisServer::start();
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let script = ::redis::Script::new(NEWEST_WINS);
    let write = |conn: &mut ::redis::Connection, t: u64, values: &[(&str, f64)]| {
        let mut call = script.key("e");
        call.arg(60_000).arg(format!("{t:015}"));
        for (f, x) in values {
            call.arg(*f).arg(encode_value(t, &Number(*x)));
        }
        call.invoke::<i64>(conn).unwrap();
    };
    write(&mut conn, 200, &[("a", 1.0), ("b", 2.0)]);
    // Late: an older write of a (kept out) and of c (new to the entity: stored).
    write(&mut conn, 100, &[("a", 9.0), ("c", 3.0)]);
    write(&mut conn, 300, &[("b", 5.0)]);
    let got: Vec<Vec<u8>> = ::redis::cmd("HMGET")
        .arg("e")
        .arg("a")
        .arg("b")
        .arg("c")
        .query(&mut conn)
        .unwrap();
    assert_eq!(got[0], encode_value(200, &Number(1.0)));
    assert_eq!(got[1], encode_value(300, &Number(5.0)));
    assert_eq!(got[2], encode_value(100, &Number(3.0)));
    let newest: String = ::redis::cmd("HGET")
        .arg("e")
        .arg(NEWEST)
        .query(&mut conn)
        .unwrap();
    assert_eq!(newest, format!("{:015}", 300));
    let ttl: i64 = ::redis::cmd("PTTL").arg("e").query(&mut conn).unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn online_features_written_on_one_replica_are_read_on_another() {
    use modelgate::pb::modelgate::v1::features_client::FeaturesClient;
    if !r::available() {
        return;
    }
    let redis = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        replica(&da, &redis.url()).await,
        replica(&db, &redis.url()).await,
    );
    let mut fa = FeaturesClient::new(channel(a.control_addr).await);
    let mut fb = FeaturesClient::new(channel(b.control_addr).await);
    // Registered on A, after B started: B learns it from the fleet.
    fa.register_feature(pb::RegisterFeatureRequest {
        name: "balance".into(),
        r#type: pb::FeatureType::Number as i32,
        ttl: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let now = modelgate::clock::Clock::now_ms(&modelgate::clock::SystemClock);
    let row = |x: f64, t: u64| pb::FeatureRowInput {
        entity_id: "acct-1".into(),
        values: [(
            "balance".to_string(),
            pb::FeatureValue {
                kind: Some(pb::feature_value::Kind::Number(x)),
            },
        )]
        .into(),
        event_time: Some(modelgate::pb::timestamp(t)),
    };
    let put = fa
        .put_features(pb::PutFeaturesRequest {
            rows: vec![row(30.0, now - 1_000)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.accepted, 1);
    // An older value written on B afterwards does not win "latest" anywhere.
    let put = fb
        .put_features(pb::PutFeaturesRequest {
            rows: vec![row(20.0, now - 5_000)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.accepted, 1, "{put:?}");
    let latest = |mut c: FeaturesClient<tonic::transport::Channel>| async move {
        c.get_features(pb::GetFeaturesRequest {
            entity_ids: vec!["acct-1".into()],
            feature_names: vec!["balance".into()],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .entities[0]
            .cells[0]
            .value
            .clone()
            .and_then(|v| v.kind)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (on_a, on_b) = (latest(fa.clone()).await, latest(fb.clone()).await);
        let want = Some(pb::feature_value::Kind::Number(30.0));
        if on_a == want && on_b == want {
            break;
        }
        assert!(Instant::now() < deadline, "A: {on_a:?}, B: {on_b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rediss_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    if !r::available() {
        return;
    }
    // A CA and a certificate for 127.0.0.1, made here: no key is checked in.
    let pki = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleet test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let path = |f: &str| pki.path().join(f).to_str().unwrap().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("server.pem"), server.pem()).unwrap();
    std::fs::write(path("server-key.pem"), server_key.serialize_pem()).unwrap();
    let tls_port = r::free_port();
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &path("server.pem"),
        "--tls-key-file",
        &path("server-key.pem"),
        "--tls-ca-cert-file",
        &path("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    let ms = model_server(MODEL).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = fleet_config(dir.path(), &format!("rediss://127.0.0.1:{tls_port}"));
    config.fleet.as_mut().unwrap().redis.ca = Some(path("ca.pem").into());
    let mg = start_with(config).await;
    let mut reg = registry(mg.control_addr).await;
    assert_eq!(register(&mut reg, "iris", &ms.endpoint()).await, 1);
    // It went to Redis, over TLS.
    assert!(redis
        .cli(&["hexists", "mg:test:config", "version/iris/1"])
        .starts_with('1'));
    mg.shutdown().await;

    // Without the CA, the server's certificate is not trusted: a clear refusal, nothing written.
    let dir = tempfile::tempdir().unwrap();
    let mg = start_with(fleet_config(
        dir.path(),
        &format!("rediss://127.0.0.1:{tls_port}"),
    ))
    .await;
    let refused = registry(mg.control_addr)
        .await
        .register_model_version(pb::RegisterModelVersionRequest {
            model: "iris".into(),
            endpoint: ms.endpoint(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_file_is_applied_once_redis_answers() {
    if !r::available() {
        return;
    }
    let mut redis = RedisServer::start();
    let ms = model_server(MODEL).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.toml");
    std::fs::write(
        &file,
        format!(
            "[[models]]\nname = \"iris\"\n  [[models.versions]]\n  key = \"v1\"\n  endpoint = \"{}\"\n  stage = \"production\"\n",
            ms.endpoint()
        ),
    )
    .unwrap();
    // Redis is away when the replica starts: it starts anyway, serving what it saw last (nothing).
    redis.kill();
    let mut config = fleet_config(&dir.path().join("data"), &redis.url());
    config.state_file = Some(file);
    config.state_poll_interval = Duration::from_millis(50);
    let mg = start_with(config).await;
    assert_eq!(served(&mg).await, Err(Code::NotFound));
    // Redis returns: the watcher applies the file through the fleet's configuration.
    redis.restart();
    until_served(&mg, "1", Duration::from_secs(5)).await;
    assert!(redis
        .cli(&["hexists", "mg:test:config", "version/iris/1"])
        .starts_with('1'));
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_fires_once_per_event_not_once_per_replica() {
    if !r::available() {
        return;
    }
    let redis = RedisServer::start();
    let ms = model_server(MODEL).await;
    let (hook, mut posts) = webhook_receiver().await;
    let hook = modelgate::webhook::parse_webhook(&format!("{hook}#version_registered")).unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut replicas = Vec::new();
    for d in [&da, &db] {
        let mut c = fleet_config(d.path(), &redis.url());
        c.webhooks = vec![hook.clone()];
        replicas.push(start_with(c).await);
    }
    register(
        &mut registry(replicas[0].control_addr).await,
        "iris",
        &ms.endpoint(),
    )
    .await;
    let post = tokio::time::timeout(Duration::from_secs(5), posts.recv())
        .await
        .expect("the event is delivered")
        .unwrap();
    assert_eq!(post["type"], "version_registered", "{post}");
    // Both replicas relay the event to their watchers; only the one that published it calls
    // the webhook.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), posts.recv())
            .await
            .is_err(),
        "delivered twice"
    );
    for mg in replicas {
        mg.shutdown().await;
    }
}

/// Fleet drift: one window of the fleet's rows per model, evaluated by one replica at a time.
mod drift {
    use super::*;
    use modelgate::pb::modelgate::v1::{drift_client::DriftClient, events_client::EventsClient};
    use tokio_stream::StreamExt;

    const LOGISTIC: &str = "name=m;kind=logistic;weights=0.5,-0.5,0.2";

    /// Deterministic values in (-3, 3): a grid walked in a fixed scrambled order.
    fn value(i: u64, salt: u64) -> f64 {
        let k = (i.wrapping_mul(2_654_435_761).wrapping_add(salt * 97)) % 1000;
        (k as f64 + 0.5) / 1000.0 * 6.0 - 3.0
    }

    fn num(x: f64) -> pb::FeatureValue {
        pb::FeatureValue {
            kind: Some(pb::feature_value::Kind::Number(x)),
        }
    }

    fn reference() -> pb::SetReferenceRequest {
        pb::SetReferenceRequest {
            model: "m".into(),
            feature_names: vec!["a".into(), "b".into(), "c".into()],
            rows: (0..1000)
                .map(|i| pb::ReferenceRow {
                    values: vec![num(value(i, 1)), num(value(i, 2)), num(value(i, 3))],
                })
                .collect(),
            categorical_features: vec![],
        }
    }

    /// Live row `i`: `a` shifted by 1.5 (drifted), `b` and `c` like the reference.
    fn live(i: u64) -> [f32; 3] {
        [
            (value(i * 7 + 3, 1) * 0.5 + 1.5) as f32,
            value(i * 7 + 3, 2) as f32,
            value(i * 7 + 3, 3) as f32,
        ]
    }

    fn config(c: &mut Config) {
        c.drift.window = 1000;
        // Evaluated when asked only: the test compares one evaluation of the same rows.
        c.drift.every = u64::MAX;
    }

    async fn setup(mg: &Running, endpoint: &str) {
        let mut reg = registry(mg.control_addr).await;
        reg.register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: endpoint.into(),
            feature_names: vec![pb::InputFeatureNames {
                input: "input".into(),
                names: vec!["a".into(), "b".into(), "c".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        promote(&mut reg, "m", "1").await;
    }

    async fn report(mg: &Running, evaluate: bool) -> pb::DriftReport {
        DriftClient::new(channel(mg.control_addr).await)
            .get_drift_report(pb::GetDriftReportRequest {
                model: "m".into(),
                evaluate,
            })
            .await
            .unwrap()
            .into_inner()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_fleet_evaluates_every_replicas_rows_once_as_one_replica_would() {
        if !r::available() {
            return;
        }
        let redis = RedisServer::start();
        let server = model_server(LOGISTIC).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut fleet = Vec::new();
        for d in &dirs {
            let mut c = fleet_config(d.path(), &redis.url());
            config(&mut c);
            fleet.push(start_with(c).await);
        }
        setup(&fleet[0], &server.endpoint()).await;
        for mg in &fleet {
            until_served_m(mg).await;
            // That call's row is not watched: there is no reference yet.
            mg.recorder.flush().await;
        }
        // Uploaded on the second replica: every replica has it within a couple of seconds.
        DriftClient::new(channel(fleet[1].control_addr).await)
            .set_reference(reference())
            .await
            .unwrap();
        let start = Instant::now();
        for mg in &fleet {
            while report(mg, false).await.status.starts_with("no reference") {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "reference not shared"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut events = EventsClient::new(channel(fleet[2].control_addr).await)
            .watch(pb::WatchRequest {
                from_cursor: 0,
                types: vec!["drift_started".into(), "drift_ended".into()],
                model: "m".into(),
            })
            .await
            .unwrap()
            .into_inner();

        // 600 rows, round robin over the replicas.
        let mut clients = Vec::new();
        for mg in &fleet {
            clients.push(infer_client(mg.data_addr).await);
        }
        for i in 0..600u64 {
            let row = live(i);
            clients[(i % 3) as usize]
                .model_infer(infer_request("m", &[&row]))
                .await
                .unwrap();
        }
        for mg in &fleet {
            mg.recorder.flush().await;
        }
        // Every replica's rows are in Redis within a flush (100 ms); asked on the third.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let evaluated = report(&fleet[2], true).await;
        assert_eq!(evaluated.evaluations, 1, "{evaluated:?}");
        assert!(evaluated.drifted, "{evaluated:?}");
        let a = &evaluated.features[0];
        assert_eq!(
            (a.name.as_str(), a.window_size),
            ("a", 600),
            "the fleet's rows"
        );
        assert!(a.drifted && !evaluated.features[1].drifted);

        // Every replica reports the same evaluation.
        for mg in &fleet {
            let r = report(mg, false).await;
            assert_eq!(r.features, evaluated.features);
            assert_eq!((r.evaluations, r.drifted), (1, true));
        }

        // One drift_started for the fleet, not one per replica.
        let first = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("drift_started within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(first.r#type, "drift_started");
        assert_eq!(first.features, vec!["a"]);
        let more = tokio::time::timeout(Duration::from_millis(1500), events.next()).await;
        assert!(more.is_err(), "a second drift event: {more:?}");

        // One modelgate alone, fed the same rows, evaluates the same statistics.
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::for_tests(dir.path());
        config(&mut c);
        let alone = start_with(c).await;
        setup(&alone, &server.endpoint()).await;
        DriftClient::new(channel(alone.control_addr).await)
            .set_reference(reference())
            .await
            .unwrap();
        let mut client = infer_client(alone.data_addr).await;
        for i in 0..600u64 {
            client
                .model_infer(infer_request("m", &[&live(i)]))
                .await
                .unwrap();
        }
        alone.recorder.flush().await;
        let single = report(&alone, true).await;
        assert_eq!(single.features.len(), evaluated.features.len());
        for (f, s) in evaluated.features.iter().zip(&single.features) {
            assert_eq!(
                (&f.name, f.window_size, f.drifted),
                (&s.name, s.window_size, s.drifted)
            );
            for (x, y) in [
                (f.statistic, s.statistic),
                (f.p_value, s.p_value),
                (f.adjusted_p_value, s.adjusted_p_value),
                (f.psi, s.psi),
                (f.wasserstein, s.wasserstein),
            ] {
                let (x, y) = (x.unwrap(), y.unwrap());
                assert!(
                    (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                    "{}: {x} vs {y}",
                    f.name
                );
            }
        }
        alone.shutdown().await;
        for mg in fleet {
            mg.shutdown().await;
        }
    }

    /// The replica id in a replica's data directory.
    fn replica_id(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("fleet-replica-id")).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn evaluation_moves_to_another_replica_when_its_evaluator_goes() {
        if !r::available() {
            return;
        }
        let mut redis = RedisServer::start();
        let server = model_server(LOGISTIC).await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut fleet = Vec::new();
        for d in &dirs {
            let mut c = fleet_config(d.path(), &redis.url());
            c.drift.window = 1000;
            c.drift.every = 100;
            fleet.push(Some(start_with(c).await));
        }
        let first = fleet[0].as_ref().unwrap();
        setup(first, &server.endpoint()).await;
        DriftClient::new(channel(first.control_addr).await)
            .set_reference(reference())
            .await
            .unwrap();
        let lease = "mg:test:{drift}:lease:m";
        // Rows through every replica that is up; evaluations follow by themselves, one per
        // 100 rows at most (the evaluator looks once a second).
        async fn traffic(fleet: &[Option<Running>], from: u64, n: u64) {
            let up: Vec<&Running> = fleet.iter().flatten().collect();
            for i in from..from + n {
                let mg = up[(i % up.len() as u64) as usize];
                let row = live(i);
                let mut c = infer_client(mg.data_addr).await;
                // The configuration may still be on its way to this replica.
                let start = Instant::now();
                while c.model_infer(infer_request("m", &[&row])).await.is_err() {
                    assert!(start.elapsed() < Duration::from_secs(2));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        async fn evaluations_reach(mg: &Running, n: u64) -> pb::DriftReport {
            let start = Instant::now();
            loop {
                let r = report(mg, false).await;
                if r.evaluations >= n {
                    return r;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "still {} evaluations",
                    r.evaluations
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Once each replica knows the reference (a tick), its rows go to the shared window.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        traffic(&fleet, 0, 300).await;
        let r = evaluations_reach(fleet[1].as_ref().unwrap(), 1).await;
        assert!(r.drifted, "{r:?}");
        let holder = redis.cli(&["GET", lease]).trim().to_string();
        let gone = dirs
            .iter()
            .position(|d| replica_id(d) == holder)
            .expect("a replica holds the lease");
        let before = r.evaluations;
        fleet[gone].take().unwrap().shutdown().await;

        // The others take over within the lease (5 s) and evaluate the new rows.
        traffic(&fleet, 300, 300).await;
        let survivor = fleet.iter().flatten().next().unwrap();
        let r = evaluations_reach(survivor, before + 1).await;
        assert!(r.features[0].window_size >= 500, "{:?}", r.features[0]);
        let next = redis.cli(&["GET", lease]).trim().to_string();
        assert!(!next.is_empty() && next != holder, "{next} after {holder}");

        // Redis restarted empty: the replicas put the reference back.
        redis.restart();
        let start = Instant::now();
        while redis.cli(&["HLEN", "mg:test:{drift}:stamps"]).trim() != "1" {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "reference not put back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for mg in fleet.into_iter().flatten() {
            mg.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concept_drift_judges_every_replicas_outcomes_once() {
        use modelgate::pb::modelgate::v1::outcomes_client::OutcomesClient;
        if !r::available() {
            return;
        }
        let redis = RedisServer::start();
        let server = model_server("name=m;kind=logistic;weights=1,0,0").await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut fleet = Vec::new();
        for d in &dirs {
            let mut c = fleet_config(d.path(), &redis.url());
            c.drift.concept_window = 20;
            fleet.push(start_with(c).await);
        }
        registry(fleet[0].control_addr)
            .await
            .register_model_version(pb::RegisterModelVersionRequest {
                model: "m".into(),
                endpoint: server.endpoint(),
                metrics: [("accuracy".to_string(), 0.9)].into(),
                prediction: Some(threshold_prediction("1", "0")),
                ..Default::default()
            })
            .await
            .unwrap();
        promote(&mut registry(fleet[0].control_addr).await, "m", "1").await;
        // A policy set on the third replica: the evaluator (whichever it is) follows it.
        DriftClient::new(channel(fleet[2].control_addr).await)
            .set_retrain_policy(pb::RetrainPolicy {
                model: "m".into(),
                on_performance_drift: true,
                ..Default::default()
            })
            .await
            .unwrap();
        for mg in &fleet {
            until_served_m(mg).await;
        }
        let mut events = EventsClient::new(channel(fleet[0].control_addr).await)
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
        // Predictions on replica i, their outcomes on replica i + 1: x = 2 → label 1.
        let fleet_ref = &fleet;
        let send = |n: usize, right: bool| async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let resp = infer_client(fleet_ref[i % 3].data_addr)
                    .await
                    .model_infer(infer_request("m", &[&[2.0, 0.0, 0.0]]))
                    .await
                    .unwrap();
                ids.push(request_id_of(&resp));
            }
            // Once their stubs are in Redis (a flush).
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (i, id) in ids.into_iter().enumerate() {
                let mut outcomes =
                    OutcomesClient::new(channel(fleet_ref[(i + 1) % 3].control_addr).await);
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
        async fn concept(mg: &Running) -> pb::ConceptDrift {
            report(mg, false)
                .await
                .concept
                .into_iter()
                .next()
                .unwrap_or_default()
        }
        send(15, true).await;
        // Each replica reports the fleet's window, with every replica's outcomes in it.
        let start = Instant::now();
        for mg in &fleet {
            while concept(mg).await.window_fill != 15 {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{:?}",
                    concept(mg).await
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        send(30, false).await;
        let mut seen = Vec::new();
        // Two events within 10 s each (the evaluator looks once a second), then no third.
        while let Ok(Some(e)) = tokio::time::timeout(
            Duration::from_millis(if seen.len() < 2 { 10_000 } else { 1_500 }),
            events.next(),
        )
        .await
        {
            let e = e.unwrap();
            seen.push((e.r#type, e.version, e.reason));
        }
        assert_eq!(
            seen,
            vec![
                ("performance_drift_started".to_string(), 1, String::new()),
                (
                    "retrain_triggered".to_string(),
                    1,
                    "performance_drift".to_string()
                ),
            ],
            "once for the fleet"
        );
        for mg in &fleet {
            let c = concept(mg).await;
            assert_eq!(
                (c.window_fill, c.current, c.drifted),
                (20, Some(0.0), true),
                "{c:?}"
            );
            assert_eq!(c.baseline, Some(0.9));
        }
        for mg in fleet {
            mg.shutdown().await;
        }
    }

    /// Waits until `mg` serves m (the configuration reached it).
    async fn until_served_m(mg: &Running) {
        let mut c = infer_client(mg.data_addr).await;
        let start = Instant::now();
        while c
            .model_infer(infer_request("m", &[&[0.0, 0.0, 0.0]]))
            .await
            .is_err()
        {
            assert!(start.elapsed() < Duration::from_secs(2), "m not served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
