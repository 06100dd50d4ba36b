//! TF Serving's gRPC API (`tensorflow.serving.PredictionService`) through modelgate, to the
//! built-in model server speaking it: Predict routed by `model_spec` (name, version number,
//! version label) with typed and `tensor_content` tensors, recorded with named features and
//! parsed predictions; metadata, Classify and Regress routed; shadows compared; errors as gRPC
//! codes naming the field.

mod common;

use bytes::Bytes;
use common::*;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::predictions_client::PredictionsClient;
use modelgate::pb::modelgate::v1::shadows_client::ShadowsClient;
use modelgate::pb::tensorflow::serving::{
    input::Kind as InputKind, model_spec::VersionChoice,
    prediction_service_client::PredictionServiceClient, ClassificationRequest, ExampleList,
    GetModelMetadataRequest, Input, ModelSpec, PredictRequest, RegressionRequest, SignatureDefMap,
};
use modelgate::pb::tensorflow::{
    feature, DataType, Example, Feature, Features, FloatList, TensorProto,
};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

/// The model server serves `iris` v1 (P(1) rises with the first feature) and v2 (falls with it),
/// and a linear `price`. modelgate knows `iris` as `m` (v1 production, v2 aliased `canary`) and
/// `price` as itself.
async fn setup() -> (
    tempfile::TempDir,
    modelgate::server::Running,
    modelgate::model_server::RunningModelServer,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = modelgate::model_server::spawn(
        "127.0.0.1:0".parse().unwrap(),
        vec![
            "name=iris;kind=logistic;weights=1,0,0;version=1"
                .parse()
                .unwrap(),
            "name=iris;kind=logistic;weights=-1,0,0;version=2"
                .parse()
                .unwrap(),
            "name=price;kind=linear;weights=2,1;bias=1".parse().unwrap(),
        ],
    )
    .await
    .unwrap();
    let mg = start(dir.path()).await;
    let mut reg = registry(mg.control_addr).await;
    for v in ["1", "2"] {
        reg.register_model_version(pb::RegisterModelVersionRequest {
            model: "m".into(),
            endpoint: server.endpoint(),
            backend_model: "iris".into(),
            backend_version: v.into(),
            feature_names: vec![pb::InputFeatureNames {
                input: "x".into(),
                names: vec!["a".into(), "b".into(), "c".into()],
            }],
            prediction: Some(threshold_prediction("yes", "no")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    promote(&mut reg, "m", "1").await;
    reg.set_alias(pb::SetAliasRequest {
        model: "m".into(),
        alias: "canary".into(),
        version: "2".into(),
    })
    .await
    .unwrap();
    register(&mut reg, "price", &server.endpoint()).await;
    promote(&mut reg, "price", "1").await;
    (dir, mg, server)
}

async fn client(mg: &modelgate::server::Running) -> PredictionServiceClient<Channel> {
    PredictionServiceClient::new(channel(mg.data_addr).await)
}

fn spec(model: &str, version: Option<VersionChoice>) -> Option<ModelSpec> {
    Some(ModelSpec {
        name: model.into(),
        signature_name: "serving_default".into(),
        version_choice: version,
    })
}

use modelgate::protocol::tfs_grpc::tensor_shape as shape;

/// A [rows, 3] DT_FLOAT tensor in `float_val`, or in `tensor_content` when `raw`.
fn features(rows: &[[f32; 3]], raw: bool) -> TensorProto {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    let mut t = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[rows.len() as i64, 3]),
        ..Default::default()
    };
    if raw {
        t.tensor_content = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    } else {
        t.float_val = values;
    }
    t
}

fn predict(model: &str, version: Option<VersionChoice>, input: TensorProto) -> PredictRequest {
    PredictRequest {
        model_spec: spec(model, version),
        inputs: [("x".to_string(), input)].into(),
        ..Default::default()
    }
}

/// An answer tensor's values, whichever representation it came in.
fn values(t: &TensorProto) -> Vec<f64> {
    modelgate::protocol::tfs_grpc::tensor("t", t, 1 << 20)
        .unwrap()
        .numeric()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn predict_is_routed_recorded_and_answered_for_typed_and_raw_tensors() {
    let (_dir, mg, _server) = setup().await;
    let mut c = client(&mg).await;
    let rows = [[2.0, 0.0, 0.0], [-2.0, 1.0, 0.5]];
    let mut answers = Vec::new();
    let mut ids = Vec::new();
    for raw in [false, true] {
        let mut req = tonic::Request::new(predict("m", None, features(&rows, raw)));
        req.metadata_mut()
            .insert("x-user-id", "user-7".parse().unwrap());
        let resp = c.predict(req).await.unwrap();
        assert_eq!(served_version(&resp), "1");
        ids.push(request_id_of(&resp));
        let answer = resp.into_inner();
        // The backend's own answer: its name and version.
        let by = answer.model_spec.clone().unwrap();
        assert_eq!(
            (by.name.as_str(), by.version_choice),
            ("iris", Some(VersionChoice::Version(1)))
        );
        let p = &answer.outputs["probabilities"];
        assert_eq!(p.dtype, DataType::DtFloat as i32);
        assert_eq!(!p.tensor_content.is_empty(), raw, "answered as asked");
        answers.push((values(p), values(&answer.outputs["label"])));
    }
    assert_eq!(answers[0], answers[1], "typed and raw tensors answer alike");
    let (p, label) = &answers[0];
    assert!(p[1] > 0.5 && p[3] < 0.5, "{p:?}");
    assert_eq!(label, &vec![1.0, 0.0]);

    // Each call is recorded as an OIP call is: named features, one prediction per row, the unit.
    mg.recorder.flush().await;
    let mut records = PredictionsClient::new(channel(mg.control_addr).await);
    for id in ids {
        let rec = records
            .get_prediction(pb::GetPredictionRequest { request_id: id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rec.model, "m");
        assert_eq!(rec.version, 1);
        assert_eq!(rec.unit_id, "user-7");
        assert_eq!(rec.feature_names, vec!["a", "b", "c"]);
        assert_eq!(rec.rows.len(), 2, "{rec:?}");
        let row: Vec<f64> = rec.rows[1]
            .values
            .iter()
            .map(|v| match v.kind {
                Some(pb::feature_value::Kind::Number(x)) => x,
                ref other => panic!("not a number: {other:?}"),
            })
            .collect();
        assert_eq!(row, vec![-2.0, 1.0, 0.5]);
        let labels: Vec<&str> = rec
            .predictions
            .iter()
            .map(|p| match &p.kind {
                Some(pb::prediction_value::Kind::Label(l)) => l.as_str(),
                other => panic!("not a label: {other:?}"),
            })
            .collect();
        assert_eq!(labels, vec!["yes", "no"]);
        assert!(rec.method.ends_with("PredictionService/Predict"), "{rec:?}");
    }
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_and_labels_name_modelgates_versions() {
    let (_dir, mg, _server) = setup().await;
    let mut c = client(&mg).await;
    let row = [[2.0, 0.0, 0.0]];
    for (choice, served) in [
        (Some(VersionChoice::Version(2)), "2"),
        (Some(VersionChoice::VersionLabel("canary".into())), "2"),
        (Some(VersionChoice::Version(1)), "1"),
        (None, "1"),
    ] {
        let resp = c
            .predict(predict("m", choice.clone(), features(&row, false)))
            .await
            .unwrap_or_else(|e| panic!("{choice:?}: {e}"));
        assert_eq!(served_version(&resp), served, "{choice:?}");
        let by = resp.into_inner().model_spec.unwrap();
        // The backend got its own version number, whatever the caller named.
        assert_eq!(
            by.version_choice,
            Some(VersionChoice::Version(served.parse().unwrap())),
            "{choice:?}"
        );
    }
    let e = c
        .predict(predict(
            "m",
            Some(VersionChoice::Version(9)),
            features(&row, false),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no version '9'"), "{e:?}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_classify_and_regress_are_routed_by_model_spec() {
    let (_dir, mg, _server) = setup().await;
    let mut c = client(&mg).await;
    let meta = c
        .get_model_metadata(GetModelMetadataRequest {
            model_spec: spec("m", None),
            metadata_field: vec!["signature_def".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.model_spec.unwrap().name, "iris");
    let map = SignatureDefMap::decode(&meta.metadata["signature_def"].value[..]).unwrap();
    let sig = &map.signature_def["serving_default"];
    assert_eq!(sig.inputs["input"].dtype, DataType::DtFloat as i32);
    assert!(sig.outputs.contains_key("probabilities"));

    let example = |values: Vec<f32>| Example {
        features: Some(Features {
            feature: [(
                "input".to_string(),
                Feature {
                    kind: Some(feature::Kind::FloatList(FloatList { value: values })),
                },
            )]
            .into(),
        }),
    };
    let input = |rows: Vec<Vec<f32>>| {
        Some(Input {
            kind: Some(InputKind::ExampleList(ExampleList {
                examples: rows.into_iter().map(example).collect(),
            })),
        })
    };
    let classes = c
        .classify(ClassificationRequest {
            model_spec: spec("m", Some(VersionChoice::VersionLabel("canary".into()))),
            input: input(vec![vec![2.0, 0.0, 0.0]]),
        })
        .await
        .unwrap();
    assert_eq!(served_version(&classes), "2");
    let result = classes.into_inner().result.unwrap();
    // Version 2 falls with the first feature.
    assert!(result.classifications[0].classes[1].score < 0.5);

    let value = c
        .regress(RegressionRequest {
            model_spec: spec("price", None),
            input: input(vec![vec![1.0, 2.0], vec![0.0, 0.0]]),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let got: Vec<f32> = value.regressions.iter().map(|r| r.value).collect();
    assert_eq!(got, vec![5.0, 1.0]);
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_grpc_codes_naming_the_field() {
    let (_dir, mg, _server) = setup().await;
    let mut c = client(&mg).await;
    let row = [[1.0, 0.0, 0.0]];
    let e = c
        .predict(predict("nope", None, features(&row, false)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("nope"), "{e:?}");
    let e = c.predict(PredictRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("model_spec.name"), "{e:?}");
    let e = c
        .classify(ClassificationRequest::default())
        .await
        .unwrap_err();
    assert!(e.message().contains("model_spec.name"), "{e:?}");
    // Not a PredictRequest at all.
    let (code, msg) = raw_grpc_call(
        mg.data_addr,
        "/tensorflow.serving.PredictionService/Predict",
        Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument as i32, "{msg}");
    assert!(msg.contains("PredictRequest"), "{msg}");
    // A tensor over --max-tensor-elements is refused before it reaches the model.
    let mut huge = features(&row, false);
    huge.tensor_shape = shape(&[1 << 30, 3]);
    let e = c.predict(predict("m", None, huge)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_answers_tf_serving_copies_and_is_compared() {
    let (_dir, mg, _server) = setup().await;
    let mut shadows = ShadowsClient::new(channel(mg.control_addr).await);
    shadows
        .set_shadow(pb::SetShadowRequest {
            model: "m".into(),
            version: "2".into(),
            sample_fraction: 1.0,
            comparison: None,
            timeout: None,
        })
        .await
        .unwrap();
    let mut c = client(&mg).await;
    // Version 2 agrees with version 1 where the first feature is 0 (both 0.5, "no"); elsewhere
    // they disagree.
    for x in [2.0, -2.0, 0.0, 3.0] {
        c.predict(predict("m", None, features(&[[x, 0.0, 0.0]], false)))
            .await
            .unwrap();
    }
    let report = shadow_report_after(&mg, "m", "2", 4).await;
    assert_eq!((report.mirrored, report.compared), (4, 4), "{report:?}");
    assert_eq!(report.agreed, 1, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    mg.shutdown().await;
}
