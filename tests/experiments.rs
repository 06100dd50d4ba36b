//! A/B experiments end to end: two built-in model-server versions behind modelgate, traffic with
//! unit ids, outcomes, results, conclusion — and every refusal.

mod common;

use std::collections::HashMap;

use common::*;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::{
    experiments_client::ExperimentsClient, outcomes_client::OutcomesClient,
};
use tonic::transport::Channel;
use tonic::Code;

const CONTROL: &str = "name=m;kind=logistic;weights=1,-1;bias=0;version=a";
const TREATMENT: &str = "name=m;kind=logistic;weights=-1,1;bias=0;version=b";

async fn two_versions(
    mg: &modelgate::server::Running,
) -> (
    modelgate::model_server::RunningModelServer,
    modelgate::model_server::RunningModelServer,
) {
    let (a, b) = (model_server(CONTROL).await, model_server(TREATMENT).await);
    let mut reg = registry(mg.control_addr).await;
    for (s, accuracy) in [(&a, 0.9), (&b, 0.95)] {
        reg.register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: s.endpoint(),
            metrics: [("accuracy".to_string(), accuracy)].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    promote(&mut reg, "m", "1").await;
    reg.set_alias(pb::SetAliasRequest {
        model: "m".into(),
        alias: "challenger".into(),
        version: "2".into(),
    })
    .await
    .unwrap();
    (a, b)
}

fn create(name: &str, coverage: f64) -> pb::CreateExperimentRequest {
    pb::CreateExperimentRequest {
        name: name.into(),
        model: "m".into(),
        variants: vec![
            pb::VariantSpec {
                name: "control".into(),
                version: "1".into(),
                weight: 1.0,
            },
            pb::VariantSpec {
                name: "treatment".into(),
                version: "challenger".into(),
                weight: 1.0,
            },
        ],
        salt: "2026-11".into(),
        coverage,
        ..Default::default()
    }
}

async fn experiments(mg: &modelgate::server::Running) -> ExperimentsClient<Channel> {
    ExperimentsClient::new(channel(mg.control_addr).await)
}

fn header(resp: &tonic::Response<impl Sized>, name: &str) -> Option<String> {
    resp.metadata()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn as_user<T>(msg: T, user: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-user-id", user.parse().unwrap());
    r
}

#[tokio::test]
async fn a_full_experiment_finds_the_better_version_and_concludes() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let (_a, _b) = two_versions(&mg).await;
    let mut ex = experiments(&mg).await;
    let e = ex
        .create_experiment(create("homepage", 0.0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.state, pb::ExperimentState::Running as i32);
    assert_eq!(e.variants[1].version, 2, "the alias was resolved");
    assert_eq!(e.coverage, 1.0);

    let mut infer = infer_client(mg.data_addr).await;
    let mut outcomes = OutcomesClient::new(channel(mg.control_addr).await);
    let mut assigned: HashMap<String, String> = HashMap::new();
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut items = Vec::new();
    for i in 0..600 {
        let user = format!("user-{}", i % 200);
        let resp = infer
            .model_infer(as_user(infer_request("m", &[&[1.0, 0.5]]), &user))
            .await
            .unwrap();
        let variant = header(&resp, "x-modelgate-variant").expect("in the experiment");
        assert_eq!(
            header(&resp, "x-modelgate-experiment").as_deref(),
            Some("homepage")
        );
        let version = served_version(&resp);
        assert_eq!(version, if variant == "control" { "1" } else { "2" });
        // Sticky: a user always gets the same variant.
        if let Some(prev) = assigned.insert(user.clone(), variant.clone()) {
            assert_eq!(prev, variant, "{user} moved");
        }
        *sent.entry(variant.clone()).or_default() += 1;
        // The treatment converts 60% of the time, the control 30%, plus a numeric reward.
        let k = i % 10;
        let success = if variant == "treatment" { k < 6 } else { k < 3 };
        let id = request_id_of(&resp);
        items.push(pb::RecordOutcomeRequest {
            request_id: id,
            actual: Some(pb::Actual {
                kind: Some(pb::actual::Kind::Success(success)),
            }),
            ..Default::default()
        });
    }
    let resp = outcomes
        .record_outcomes(tokio_stream::iter([pb::RecordOutcomesRequest {
            outcomes: items,
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.accepted,
        600,
        "{:?}",
        resp.results.iter().find(|r| !r.accepted)
    );
    mg.recorder.flush().await;

    let res = ex
        .get_experiment_results(pb::ExperimentRef {
            name: "homepage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let by_name: HashMap<&str, &pb::VariantResults> =
        res.variants.iter().map(|v| (v.name.as_str(), v)).collect();
    for (name, v) in &by_name {
        assert_eq!(v.requests, sent[*name], "{name}");
        assert_eq!(v.outcomes, sent[*name]);
        assert_eq!(v.judged, sent[*name]);
        let users = assigned.values().filter(|a| a == name).count() as f64;
        assert!(
            (v.units as f64 - users).abs() <= users * 0.05 + 2.0,
            "{name}: {} units vs {users}",
            v.units
        );
        let (lo, hi) = (v.ci_low.unwrap(), v.ci_high.unwrap());
        assert!(lo < v.success_rate.unwrap() && v.success_rate.unwrap() < hi);
    }
    assert!(by_name["treatment"].success_rate > by_name["control"].success_rate);
    let sig = res.significance.unwrap();
    assert_eq!(sig.test, "chi2_contingency");
    assert!(sig.significant && sig.p_value.unwrap() < 1e-6, "{sig:?}");
    let srm = res.sample_ratio_mismatch.unwrap();
    assert!(
        !srm.significant,
        "a 50/50 split with hashing is not a mismatch: {srm:?}"
    );
    let av = &res.always_valid[0];
    assert_eq!(
        (av.variant.as_str(), av.control.as_str()),
        ("treatment", "control")
    );
    assert!(av.test.as_ref().unwrap().p_value.unwrap() < 0.05);

    // Conclude: the treatment's version goes to production through the registry.
    let done = ex
        .conclude_experiment(pb::ConcludeExperimentRequest {
            name: "homepage".into(),
            winner: "treatment".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        done.experiment.unwrap().state,
        pb::ExperimentState::Concluded as i32
    );
    assert_eq!(done.promoted.unwrap().version, 2);
    assert_eq!(done.archived[0].version, 1);
    let resp = infer
        .model_infer(as_user(infer_request("m", &[&[1.0, 0.5]]), "user-1"))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "2");
    assert_eq!(
        header(&resp, "x-modelgate-variant"),
        None,
        "the experiment is over"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn assignments_and_counts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let (_a, _b) = two_versions(&mg).await;
    let mut ex = experiments(&mg).await;
    ex.create_experiment(create("sticky", 0.0)).await.unwrap();
    let mut before = Vec::new();
    let mut infer = infer_client(mg.data_addr).await;
    for i in 0..40 {
        let resp = infer
            .model_infer(as_user(
                infer_request("m", &[&[1.0, 0.5]]),
                &format!("u{i}"),
            ))
            .await
            .unwrap();
        before.push(header(&resp, "x-modelgate-variant").unwrap());
    }
    mg.recorder.flush().await;
    let counts = |r: pb::ExperimentResults| {
        r.variants
            .iter()
            .map(|v| (v.requests, v.units))
            .collect::<Vec<_>>()
    };
    let first = counts(
        ex.get_experiment_results(pb::ExperimentRef {
            name: "sticky".into(),
        })
        .await
        .unwrap()
        .into_inner(),
    );
    assert_eq!(first.iter().map(|c| c.0).sum::<u64>(), 40);
    mg.shutdown().await;

    let mg = start(dir.path()).await;
    let mut ex = experiments(&mg).await;
    let again = counts(
        ex.get_experiment_results(pb::ExperimentRef {
            name: "sticky".into(),
        })
        .await
        .unwrap()
        .into_inner(),
    );
    assert_eq!(
        again, first,
        "counters and unit sketches are exact after a restart"
    );
    let mut infer = infer_client(mg.data_addr).await;
    for (i, variant) in before.iter().enumerate() {
        let resp = infer
            .model_infer(as_user(
                infer_request("m", &[&[1.0, 0.5]]),
                &format!("u{i}"),
            ))
            .await
            .unwrap();
        assert_eq!(
            header(&resp, "x-modelgate-variant").as_ref(),
            Some(variant),
            "u{i}"
        );
    }
    mg.shutdown().await;
}

#[tokio::test]
async fn forced_variants_units_outside_coverage_and_anonymous_requests_are_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let (_a, _b) = two_versions(&mg).await;
    let mut ex = experiments(&mg).await;
    ex.create_experiment(create("partial", 0.3)).await.unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    // Forced: served by the treatment, with the headers, but not counted.
    let mut r = tonic::Request::new(infer_request("m", &[&[1.0, 0.5]]));
    r.metadata_mut()
        .insert("x-modelgate-variant", "treatment".parse().unwrap());
    let resp = infer.model_infer(r).await.unwrap();
    assert_eq!(served_version(&resp), "2");
    assert_eq!(
        header(&resp, "x-modelgate-variant").as_deref(),
        Some("treatment")
    );
    // No unit id: production, no experiment.
    let resp = infer
        .model_infer(infer_request("m", &[&[1.0, 0.5]]))
        .await
        .unwrap();
    assert_eq!(served_version(&resp), "1");
    assert_eq!(header(&resp, "x-modelgate-experiment"), None);
    // Coverage 30%: about 30% of 1000 users are in.
    let mut inside = 0u64;
    for i in 0..1000 {
        let resp = infer
            .model_infer(as_user(
                infer_request("m", &[&[1.0, 0.5]]),
                &format!("c{i}"),
            ))
            .await
            .unwrap();
        if header(&resp, "x-modelgate-experiment").is_some() {
            inside += 1;
        } else {
            assert_eq!(served_version(&resp), "1", "outside coverage: production");
        }
    }
    assert!(
        (240..=360).contains(&inside),
        "{inside} of 1000 inside a 30% coverage"
    );
    mg.recorder.flush().await;
    let res = ex
        .get_experiment_results(pb::ExperimentRef {
            name: "partial".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let counted: u64 = res.variants.iter().map(|v| v.requests).sum();
    assert_eq!(
        counted, inside,
        "only assigned units count: not the forced or anonymous requests"
    );
    // The record of the forced request says so.
    let no_outcomes = res.significance.unwrap();
    assert!(
        no_outcomes.p_value.is_none() && !no_outcomes.unavailable_reason.is_empty(),
        "{no_outcomes:?}"
    );
    mg.shutdown().await;
}

#[tokio::test]
async fn pause_resume_stop_and_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let (_a, _b) = two_versions(&mg).await;
    let mut ex = experiments(&mg).await;
    let refuse = |code: Code, starts: &'static str| {
        move |r: Result<tonic::Response<pb::Experiment>, tonic::Status>| {
            let e = r.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().starts_with(starts),
                "expected '{starts}…': {}",
                e.message()
            );
        }
    };
    let mut one = create("x", 0.0);
    one.variants.truncate(1);
    refuse(Code::InvalidArgument, "variants:")(ex.create_experiment(one).await);
    let mut dup = create("x", 0.0);
    dup.variants[1].name = "control".into();
    refuse(Code::InvalidArgument, "variants[1].name:")(ex.create_experiment(dup).await);
    let mut zero = create("x", 0.0);
    zero.variants[0].weight = 0.0;
    refuse(Code::InvalidArgument, "variants[0].weight:")(ex.create_experiment(zero).await);
    let mut unknown = create("x", 0.0);
    unknown.variants[1].version = "7".into();
    refuse(Code::InvalidArgument, "variants[1].version:")(ex.create_experiment(unknown).await);
    let mut wide = create("x", 0.0);
    wide.coverage = 2.0;
    refuse(Code::InvalidArgument, "coverage:")(ex.create_experiment(wide).await);
    let mut no_model = create("x", 0.0);
    no_model.model = "ghost".into();
    refuse(Code::NotFound, "model 'ghost'")(ex.create_experiment(no_model).await);

    ex.create_experiment(create("first", 0.0)).await.unwrap();
    let busy = ex
        .create_experiment(create("second", 0.0))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition);
    assert!(busy.message().contains("'first'"), "{}", busy.message());
    refuse(Code::AlreadyExists, "an experiment named 'first'")(
        ex.create_experiment(create("first", 0.0)).await,
    );
    refuse(Code::NotFound, "experiment 'nope'")(
        ex.get_experiment(pb::ExperimentRef {
            name: "nope".into(),
        })
        .await,
    );

    // A version serving an open experiment cannot be deleted.
    let mut reg = registry(mg.control_addr).await;
    let err = reg
        .delete_model_version(pb::DeleteModelVersionRequest {
            model: "m".into(),
            version: "2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("experiment 'first'"),
        "{}",
        err.message()
    );

    let mut infer = infer_client(mg.data_addr).await;
    let paused = ex
        .pause_experiment(pb::ExperimentRef {
            name: "first".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state, pb::ExperimentState::Paused as i32);
    let resp = infer
        .model_infer(as_user(infer_request("m", &[&[1.0, 0.5]]), "u1"))
        .await
        .unwrap();
    assert_eq!(
        header(&resp, "x-modelgate-experiment"),
        None,
        "paused: production"
    );
    refuse(Code::FailedPrecondition, "experiment 'first' is paused")(
        ex.pause_experiment(pb::ExperimentRef {
            name: "first".into(),
        })
        .await,
    );
    ex.resume_experiment(pb::ExperimentRef {
        name: "first".into(),
    })
    .await
    .unwrap();
    let resp = infer
        .model_infer(as_user(infer_request("m", &[&[1.0, 0.5]]), "u1"))
        .await
        .unwrap();
    assert!(header(&resp, "x-modelgate-experiment").is_some(), "resumed");

    // The promotion gate applies to the winner: accuracy 0.95 is below a 0.99 minimum.
    reg.set_promotion_policy(pb::SetPromotionPolicyRequest {
        model: "m".into(),
        minimum_metrics: [("accuracy".to_string(), 0.99)].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = ex
        .conclude_experiment(pb::ConcludeExperimentRequest {
            name: "first".into(),
            winner: "treatment".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("accuracy"), "{}", err.message());
    let still = ex
        .get_experiment(pb::ExperimentRef {
            name: "first".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        still.state,
        pb::ExperimentState::Running as i32,
        "a refused conclusion changes nothing"
    );
    let err = ex
        .conclude_experiment(pb::ConcludeExperimentRequest {
            name: "first".into(),
            winner: "nobody".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("winner:"), "{}", err.message());

    let stopped = ex
        .stop_experiment(pb::ExperimentRef {
            name: "first".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state, pb::ExperimentState::Stopped as i32);
    refuse(Code::FailedPrecondition, "experiment 'first' is stopped")(
        ex.resume_experiment(pb::ExperimentRef {
            name: "first".into(),
        })
        .await,
    );
    // The model is free again.
    ex.create_experiment(create("second", 0.0)).await.unwrap();
    let list = ex
        .list_experiments(pb::ListExperimentsRequest { model: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.experiments.len(), 2);
    mg.shutdown().await;
}

#[tokio::test]
async fn numeric_outcomes_get_means_and_a_welch_test_and_records_keep_the_variant() {
    let dir = tempfile::tempdir().unwrap();
    let mg = start(dir.path()).await;
    let (_a, _b) = two_versions(&mg).await;
    let mut ex = experiments(&mg).await;
    ex.create_experiment(create("revenue", 0.0)).await.unwrap();
    let mut infer = infer_client(mg.data_addr).await;
    let mut outcomes = OutcomesClient::new(channel(mg.control_addr).await);
    let mut values: HashMap<String, Vec<f64>> = HashMap::new();
    let mut an_id = (String::new(), String::new());
    for i in 0..80 {
        let resp = infer
            .model_infer(as_user(
                infer_request("m", &[&[1.0, 0.5]]),
                &format!("r{i}"),
            ))
            .await
            .unwrap();
        let variant = header(&resp, "x-modelgate-variant").unwrap();
        let id = request_id_of(&resp);
        // Revenue: the treatment earns about 2 more per request.
        let x = (i % 7) as f64 + if variant == "treatment" { 12.0 } else { 10.0 };
        outcomes
            .record_outcome(pb::RecordOutcomeRequest {
                request_id: id.clone(),
                actual: Some(pb::Actual {
                    kind: Some(pb::actual::Kind::Number(x)),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        values.entry(variant.clone()).or_default().push(x);
        an_id = (id, variant);
    }
    mg.recorder.flush().await;
    let res = ex
        .get_experiment_results(pb::ExperimentRef {
            name: "revenue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for v in &res.variants {
        let xs = &values[&v.name];
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
        assert_eq!(v.numeric_outcomes, xs.len() as u64);
        assert!((v.mean.unwrap() - mean).abs() < 1e-9);
        assert!((v.stddev.unwrap() - var.sqrt()).abs() < 1e-9);
        assert_eq!(v.judged, 0, "numbers are not verdicts");
    }
    let welch = res.numeric[0].test.clone().unwrap();
    assert_eq!(welch.test, "welch_t");
    assert!(welch.significant, "{welch:?}");
    // The record keeps the experiment and variant that served it.
    let mut preds = modelgate::pb::modelgate::v1::predictions_client::PredictionsClient::new(
        channel(mg.control_addr).await,
    );
    let rec = preds
        .get_prediction(pb::GetPredictionRequest {
            request_id: an_id.0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rec.experiment, "revenue");
    assert_eq!(rec.variant, an_id.1);
    assert!(!rec.variant_forced);
    mg.shutdown().await;
}
