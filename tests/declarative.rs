//! Declarative state end to end: a `--state-file` applied at start (before the data port serves),
//! again after a restart without duplicating anything, and again when it changes at runtime; bad
//! files refused at start (naming the field) and at runtime (keeping the state, with an event).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use modelgate::config::Config;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::{
    experiments_client::ExperimentsClient, shadows_client::ShadowsClient,
};
use modelgate::server::Running;

const A: &str = "name=iris;kind=linear;weights=1;version=a";
const B: &str = "name=iris;kind=linear;weights=2;version=b";
const POLL: Duration = Duration::from_millis(100);

/// The state file of these tests: `iris` with `v1` on `a` and `v2` on `b`, `production` the key
/// in production, an A/B experiment over both and a full shadow of `v2`.
fn state(a: &str, b: &str, production: &str, treatment_weight: f64) -> String {
    let stage = |key: &str| {
        if key == production {
            "stage = \"production\""
        } else {
            ""
        }
    };
    format!(
        r#"
[[models]]
name = "iris"
  [[models.versions]]
  key = "v1"
  endpoint = "{a}"
  {v1}
  [[models.versions]]
  key = "v2"
  endpoint = "{b}"
  {v2}

[[experiments]]
name = "iris-ab"
model = "iris"
salt = "declared"
variants = [ {{ name = "control", version = "v1" }}, {{ name = "treatment", version = "v2", weight = {treatment_weight:?} }} ]

[[shadows]]
model = "iris"
version = "v2"
sample_fraction = 1.0
"#,
        v1 = stage("v1"),
        v2 = stage("v2"),
    )
}

/// Replaces the file the way a ConfigMap update does: a new file renamed over the old one, so the
/// poller never reads half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(dir: &Path, file: &Path) -> Config {
    let mut c = Config::for_tests(dir);
    c.state_file = Some(file.to_path_buf());
    c.state_poll_interval = POLL;
    c
}

struct Setup {
    data: tempfile::TempDir,
    file: PathBuf,
    a: modelgate::model_server::RunningModelServer,
    b: modelgate::model_server::RunningModelServer,
}

async fn setup() -> Setup {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (model_server(A).await, model_server(B).await);
    let file = data.path().join("state.toml");
    write_atomically(&file, &state(&a.endpoint(), &b.endpoint(), "v1", 1.0));
    Setup { data, file, a, b }
}

impl Setup {
    fn db(&self) -> PathBuf {
        self.data.path().join("db")
    }

    async fn start(&self) -> Running {
        start_with(config(&self.db(), &self.file)).await
    }

    fn write(&self, production: &str, treatment_weight: f64) {
        write_atomically(
            &self.file,
            &state(
                &self.a.endpoint(),
                &self.b.endpoint(),
                production,
                treatment_weight,
            ),
        );
    }
}

/// (version, stage, aliases) of every `iris` version.
async fn versions(mg: &Running) -> Vec<(u32, pb::Stage, Vec<String>)> {
    registry(mg.control_addr)
        .await
        .list_model_versions(pb::ListModelVersionsRequest {
            model: "iris".into(),
            stage: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .versions
        .into_iter()
        .map(|v| (v.version, v.stage(), v.aliases))
        .collect()
}

async fn production(mg: &Running) -> u32 {
    registry(mg.control_addr)
        .await
        .get_production_version(pb::GetProductionVersionRequest {
            model: "iris".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version
}

fn events_after(mg: &Running, cursor: u64) -> Vec<pb::Event> {
    mg.events.store().events_after(cursor, 10_000).unwrap()
}

fn last_cursor(mg: &Running) -> u64 {
    mg.events.store().last_event_cursor().unwrap()
}

async fn wait_for_event(mg: &Running, kind: &str, after: u64) -> pb::Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = events_after(mg, after)
            .into_iter()
            .find(|e| e.r#type == kind)
        {
            return e;
        }
        assert!(Instant::now() < deadline, "no {kind} event after {after}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Infers `[3]` as `user` (or with no unit id): (served version, variant, answer).
async fn infer(mg: &Running, user: Option<&str>) -> (String, Option<String>, f64) {
    let mut client = infer_client(mg.data_addr).await;
    let mut req = tonic::Request::new(infer_request("iris", &[&[3.0]]));
    if let Some(u) = user {
        req.metadata_mut().insert("x-user-id", u.parse().unwrap());
    }
    let resp = client.model_infer(req).await.unwrap();
    let variant = resp
        .metadata()
        .get("x-modelgate-variant")
        .map(|v| v.to_str().unwrap().to_string());
    (
        served_version(&resp),
        variant,
        first_output(resp.get_ref())[0],
    )
}

#[tokio::test]
async fn a_state_file_at_start_registers_promotes_and_routes() {
    let s = setup().await;
    let mg = s.start().await;

    assert_eq!(
        versions(&mg).await,
        vec![
            (1, pb::Stage::Production, vec!["v1".to_string()]),
            (2, pb::Stage::Staging, vec!["v2".to_string()]),
        ]
    );
    let experiments = ExperimentsClient::new(channel(mg.control_addr).await)
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experiments;
    assert_eq!(experiments.len(), 1);
    let e = &experiments[0];
    assert_eq!(
        (e.name.as_str(), e.state()),
        ("iris-ab", pb::ExperimentState::Running)
    );
    assert_eq!(
        e.variants
            .iter()
            .map(|v| (v.name.as_str(), v.version))
            .collect::<Vec<_>>(),
        vec![("control", 1), ("treatment", 2)]
    );
    let mut shadows = ShadowsClient::new(channel(mg.control_addr).await);
    let listed = shadows
        .list_shadows(pb::ListShadowsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .shadows;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].version, listed[0].sample_fraction), (2, 1.0));

    // No unit id: production (v1, weight 1).
    assert_eq!(infer(&mg, None).await, ("1".into(), None, 3.0));
    // Unit ids: split between the variants, each served by its version.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let (version, variant, answer) = infer(&mg, Some(&format!("user-{i}"))).await;
        let variant = variant.expect("an experiment variant");
        let expected = match variant.as_str() {
            "control" => ("1", 3.0),
            "treatment" => ("2", 6.0),
            other => panic!("unexpected variant {other}"),
        };
        assert_eq!((version.as_str(), answer), expected, "{variant}");
        seen.insert(variant);
    }
    assert_eq!(seen.len(), 2, "both variants serve");
    // The shadow of v2 receives copies.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = shadows
            .get_shadow_report(pb::GetShadowReportRequest {
                model: "iris".into(),
                version: "v2".into(),
                disagreements: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if report.mirrored > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the shadow got no copies");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The same events as the API would publish, and one for the file.
    let kinds: Vec<String> = events_after(&mg, 0).into_iter().map(|e| e.r#type).collect();
    for kind in [
        "version_registered",
        "version_promoted",
        "experiment_created",
        "state_file_applied",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    let applied = wait_for_event(&mg, "state_file_applied", 0).await;
    assert_eq!(applied.details["changes"], "5", "{applied:?}");
    assert_eq!(applied.details["sha256"].len(), 64);
    mg.shutdown().await;
}

#[tokio::test]
async fn a_restart_with_the_same_file_changes_nothing() {
    let s = setup().await;
    let mg = s.start().await;
    // A version registered by hand: not the file's business.
    let mut reg = registry(mg.control_addr).await;
    assert_eq!(register(&mut reg, "iris", &s.b.endpoint()).await, 3);
    let before = versions(&mg).await;
    mg.shutdown().await;

    let mg = s.start().await;
    let start_cursor = 0;
    assert_eq!(versions(&mg).await, before, "no duplicates, nothing undone");
    assert_eq!(before.len(), 3);
    let after_restart: Vec<String> = events_after(&mg, start_cursor)
        .into_iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(
        after_restart
            .iter()
            .filter(|k| *k == "state_file_applied")
            .count(),
        1,
        "only the first start changed anything: {after_restart:?}"
    );
    assert_eq!(
        after_restart
            .iter()
            .filter(|k| *k == "version_registered")
            .count(),
        3,
        "two from the file, one by hand: {after_restart:?}"
    );
    assert_eq!(infer(&mg, None).await.0, "1");
    mg.shutdown().await;
}

#[tokio::test]
async fn an_edited_file_is_applied_while_running() {
    let s = setup().await;
    let mg = s.start().await;
    assert_eq!(production(&mg).await, 1);
    let cursor = last_cursor(&mg);

    // Promote v2, and (by mistake) change the running experiment's weights.
    s.write("v2", 3.0);
    let edited = Instant::now();
    while production(&mg).await != 2 {
        assert!(
            edited.elapsed() < Duration::from_secs(5),
            "v2 not promoted after {:?}",
            edited.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "promotion applied {:?} after the edit (poll interval {POLL:?})",
        edited.elapsed()
    );
    assert_eq!(infer(&mg, None).await, ("2".into(), None, 6.0));
    assert_eq!(
        versions(&mg).await,
        vec![
            (1, pb::Stage::Archived, vec!["v1".to_string()]),
            (2, pb::Stage::Production, vec!["v2".to_string()]),
        ]
    );
    // The experiment cannot change: reported, the rest applied anyway.
    let applied = wait_for_event(&mg, "state_file_applied", cursor).await;
    assert_eq!(applied.details["conflicts"], "1", "{applied:?}");
    assert!(
        applied
            .message
            .contains("experiments[0]: experiment 'iris-ab' already exists with a different definition: variants[1].weight"),
        "{}",
        applied.message
    );
    let promoted = wait_for_event(&mg, "version_promoted", cursor).await;
    assert_eq!(promoted.version, 2);
    mg.shutdown().await;
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_state_and_publishes_an_event() {
    let s = setup().await;
    let mg = s.start().await;
    let cursor = last_cursor(&mg);

    let broken = state(&s.a.endpoint(), "http://127.0.0.1", "v2", 1.0);
    write_atomically(&s.file, &broken);
    let rejected = wait_for_event(&mg, "state_file_rejected", cursor).await;
    assert!(
        rejected
            .message
            .contains("models[0].versions[1].endpoint: 'http://127.0.0.1' has no port"),
        "{}",
        rejected.message
    );
    assert_eq!(rejected.details["file"], s.file.display().to_string());
    // Nothing moved, and the rejection is reported once, not every poll.
    tokio::time::sleep(POLL * 5).await;
    assert_eq!(production(&mg).await, 1);
    assert_eq!(versions(&mg).await.len(), 2);
    let rejections = events_after(&mg, cursor)
        .into_iter()
        .filter(|e| e.r#type == "state_file_rejected")
        .count();
    assert_eq!(rejections, 1);

    // Fixing the file applies it.
    let cursor = last_cursor(&mg);
    s.write("v2", 1.0);
    wait_for_event(&mg, "state_file_applied", cursor).await;
    assert_eq!(production(&mg).await, 2);
    mg.shutdown().await;
}

#[tokio::test]
async fn an_invalid_file_at_start_fails_naming_the_field() {
    let s = setup().await;
    write_atomically(
        &s.file,
        &state(&s.a.endpoint(), &s.b.endpoint(), "v1", 1.0).replace("key = \"v2\"", "key = \"2\""),
    );
    let err = match modelgate::server::start(config(&s.db(), &s.file)).await {
        Ok(_) => panic!("an invalid state file must stop start-up"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&s.file.display().to_string()), "{err}");
    assert!(
        err.contains("models[0].versions[1].key: must start with a letter"),
        "{err}"
    );
    assert!(!s.db().exists(), "refused before the database was opened");

    // The binary: exit status 2, like any bad setting, naming the flag, the file and the field.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(s.db())
        .env("MODELGATE_STATE_FILE", &s.file)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--state-file (MODELGATE_STATE_FILE)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("models[0].versions[1].key: must start with a letter"),
        "{stderr}"
    );
    // An unreadable file, likewise.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["serve", "--state-file", "/nonexistent/state.toml"])
        .arg("--data-dir")
        .arg(s.db())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/state.toml: cannot read it"),
        "{stderr}"
    );
    assert!(!s.db().exists());
}
