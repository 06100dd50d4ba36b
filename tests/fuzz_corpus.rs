//! The fuzz corpora under `fuzz/corpus/<target>/`, run through `modelgate::fuzzing` on the stable
//! toolchain: every checked-in seed and past crash input is checked on every `cargo test`.
//!
//! The seeds are built here (`seeds()`); `MODELGATE_WRITE_SEEDS=1 cargo test --test fuzz_corpus`
//! rewrites them after a change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use modelgate::fuzzing::{self, op, Writer};
use modelgate::oip;
use modelgate::pb::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, InferParameter, InferTensorContents,
    ModelInferRequest, ModelInferResponse,
};
use modelgate::proxy::body;
use modelgate::store::keys;
use prost::Message;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn input(
    name: &str,
    dt: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: dt.into(),
        shape: shape.to_vec(),
        parameters: Default::default(),
        contents,
    }
}

fn output(
    name: &str,
    dt: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
) -> InferOutputTensor {
    InferOutputTensor {
        name: name.into(),
        datatype: dt.into(),
        shape: shape.to_vec(),
        parameters: Default::default(),
        contents,
    }
}

fn fp32(v: &[f32]) -> Option<InferTensorContents> {
    Some(InferTensorContents {
        fp32_contents: v.to_vec(),
        ..Default::default()
    })
}

fn bytes_raw(items: &[&str]) -> Bytes {
    let mut raw = Vec::new();
    for s in items {
        raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
        raw.extend_from_slice(s.as_bytes());
    }
    Bytes::from(raw)
}

fn iris_request() -> ModelInferRequest {
    ModelInferRequest {
        model_name: "iris".into(),
        id: "tutorial-1".into(),
        inputs: vec![input("input", "FP32", &[1, 4], fp32(&[6.1, 2.8, 4.7, 1.2]))],
        ..Default::default()
    }
}

fn probabilities_response() -> ModelInferResponse {
    ModelInferResponse {
        model_name: "iris".into(),
        model_version: "1".into(),
        outputs: vec![output(
            "probabilities",
            "FP32",
            &[3, 2],
            fp32(&[0.9, 0.1, 0.2, 0.8, 0.5, 0.5]),
        )],
        ..Default::default()
    }
}

fn requests() -> Vec<(&'static str, ModelInferRequest)> {
    let mut entity_param = ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("x", "FP64", &[3], None)],
        raw_input_contents: vec![Bytes::from(
            [1.5f64, -2.0, 3.25]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )],
        ..Default::default()
    };
    entity_param.parameters = HashMap::from([(
        "entity_id".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("acct-9".into())),
        },
    )]);
    vec![
        ("seed-iris-fp32-typed", iris_request()),
        (
            "seed-batch-fp32-raw",
            ModelInferRequest {
                model_name: "iris".into(),
                inputs: vec![input("input", "FP32", &[2, 3], None)],
                raw_input_contents: vec![oip::f32_raw(&[1., 2., 3., 4., 5., 6.])],
                ..Default::default()
            },
        ),
        (
            "seed-columns-bytes-entity-raw",
            ModelInferRequest {
                model_name: "churn".into(),
                inputs: vec![
                    input("age", "INT64", &[2], None),
                    input("colour", "BYTES", &[2], None),
                    input("entity_id", "INT32", &[2], None),
                ],
                raw_input_contents: vec![
                    oip::i64_raw(&[31, 45]),
                    bytes_raw(&["red", "blue"]),
                    Bytes::from([7i32.to_le_bytes(), 8i32.to_le_bytes()].concat()),
                ],
                ..Default::default()
            },
        ),
        (
            "seed-half-precision-raw",
            ModelInferRequest {
                inputs: vec![
                    input("h", "FP16", &[1, 2], None),
                    input("b", "BF16", &[1, 1], None),
                ],
                raw_input_contents: vec![
                    Bytes::from(
                        [
                            half::f16::from_f32(0.5).to_le_bytes(),
                            half::f16::from_f32(-1.0).to_le_bytes(),
                        ]
                        .concat(),
                    ),
                    Bytes::from(half::bf16::from_f32(2.0).to_le_bytes().to_vec()),
                ],
                ..Default::default()
            },
        ),
        ("seed-vector-entity-parameter", entity_param),
        (
            "seed-typed-int-uint-bool",
            ModelInferRequest {
                inputs: vec![
                    input(
                        "i",
                        "INT32",
                        &[2, 1],
                        Some(InferTensorContents {
                            int_contents: vec![1, -2],
                            ..Default::default()
                        }),
                    ),
                    input(
                        "u",
                        "UINT64",
                        &[2, 1],
                        Some(InferTensorContents {
                            uint64_contents: vec![1, 1 << 40],
                            ..Default::default()
                        }),
                    ),
                    input(
                        "flag",
                        "BOOL",
                        &[2, 1],
                        Some(InferTensorContents {
                            bool_contents: vec![true, false],
                            ..Default::default()
                        }),
                    ),
                ],
                ..Default::default()
            },
        ),
    ]
}

fn responses() -> Vec<(&'static str, ModelInferResponse)> {
    vec![
        ("seed-probabilities-fp32-typed", probabilities_response()),
        (
            "seed-label-bytes-raw",
            ModelInferResponse {
                model_name: "iris".into(),
                outputs: vec![output("label", "BYTES", &[2], None)],
                raw_output_contents: vec![bytes_raw(&["setosa", "virginica"])],
                ..Default::default()
            },
        ),
        (
            "seed-value-fp64-raw",
            ModelInferResponse {
                outputs: vec![output("value", "FP64", &[2, 1], None)],
                raw_output_contents: vec![Bytes::from(
                    [1.5f64, -2.0]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect::<Vec<u8>>(),
                )],
                ..Default::default()
            },
        ),
        (
            "seed-label-and-probabilities",
            ModelInferResponse {
                outputs: vec![
                    output(
                        "label",
                        "INT64",
                        &[2],
                        Some(InferTensorContents {
                            int64_contents: vec![0, 1],
                            ..Default::default()
                        }),
                    ),
                    output(
                        "probabilities",
                        "FP32",
                        &[2, 2],
                        fp32(&[0.7, 0.3, 0.4, 0.6]),
                    ),
                ],
                ..Default::default()
            },
        ),
        (
            "seed-threshold-scores",
            ModelInferResponse {
                outputs: vec![output("score", "FP32", &[3], fp32(&[0.1, 0.5, 0.9]))],
                ..Default::default()
            },
        ),
    ]
}

fn control_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn register(w: &mut Writer, model: &str, endpoint: &str, accuracy: f64) {
        w.u32(1_000).byte(op::REGISTER);
        w.string(model).string(endpoint).string("").string("");
        w.byte(1).string("accuracy").f64(accuracy); // metrics
        w.byte(0); // tags
        w.byte(1)
            .string("probabilities")
            .byte(2)
            .string("cat")
            .string("dog"); // argmax
        w.byte(1)
            .string("input")
            .byte(2)
            .string("petal")
            .string("sepal"); // feature names
    }
    let mut lifecycle = Writer::default();
    register(&mut lifecycle, "iris", "http://127.0.0.1:8001", 0.91);
    register(&mut lifecycle, "iris", "127.0.0.1:8002/", 0.94);
    lifecycle.u32(2_000).byte(op::POLICY).string("iris");
    lifecycle.byte(1).string("accuracy").f64(0.9).byte(0);
    lifecycle
        .u32(3_000)
        .byte(op::TRANSITION)
        .string("iris")
        .string("1")
        .byte(1)
        .byte(0);
    lifecycle
        .u32(4_000)
        .byte(op::ALIAS)
        .string("iris")
        .string("candidate")
        .string("2")
        .byte(0);
    lifecycle.u32(5_000).byte(op::EXPERIMENT);
    lifecycle.string("iris-ab").string("iris").byte(2);
    lifecycle.string("control").string("1").f64(1.0);
    lifecycle.string("treatment").string("candidate").f64(3.0);
    lifecycle
        .string("x-user-id")
        .string("salt")
        .f64(0.5)
        .f64(0.05);
    lifecycle
        .opt_u64(Some(0))
        .opt_u64(Some(10_000))
        .string("alice");
    lifecycle
        .u32(6_000)
        .byte(op::SHADOW)
        .string("iris")
        .string("2");
    lifecycle.byte(3).f64(0.01).f64(0.1); // tolerance
    lifecycle.f64(0.25).byte(1).u64(250_000_000).string("bob");
    lifecycle
        .u32(7_000)
        .byte(op::DELETE)
        .string("iris")
        .string("1");

    // Two finite weights whose sum is not (the experiment rule this exercises was fixed).
    let mut huge_weights = Writer::default();
    register(&mut huge_weights, "iris", "h:1", 0.5);
    register(&mut huge_weights, "iris", "h:2", 0.5);
    huge_weights.u32(1).byte(op::EXPERIMENT);
    huge_weights.string("big").string("iris").byte(2);
    huge_weights.string("a").string("1").f64(f64::MAX);
    huge_weights.string("b").string("2").f64(f64::MAX);
    huge_weights.string("").string("").f64(0.0).f64(0.0);
    huge_weights.opt_u64(None).opt_u64(None).string("carol");

    let mut validators = Writer::default();
    for s in [
        "iris",
        "x.y-z_1",
        "-bad",
        "http://[::1]:9000/",
        "localhost:65535",
        "https://h:1",
        "h:0",
        "0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef",
        "req-01J8Z",
        "input[3]",
        "user 42",
        "x-tenant.id",
    ] {
        validators.u32(0).byte(op::VALIDATE).string(s);
    }
    vec![
        ("seed-register-promote-experiment-shadow", lifecycle.data),
        ("seed-validators", validators.data),
        ("seed-experiment-huge-weights", huge_weights.data),
    ]
}

fn key_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut values = Writer::default();
    values
        .string("iris")
        .string("iris-2")
        .string("req-1")
        .string("user-42");
    values
        .u32(1)
        .u32(2)
        .u64(1_700_000_000_000)
        .u64(1_700_000_000_500)
        .u32(3)
        .string("{\"label\":\"1\"}");
    vec![
        ("seed-registry-key", keys::registry_key("iris", 2)),
        ("seed-registry-meta-key", keys::registry_key("iris", 0)),
        (
            "seed-prediction-index-key",
            keys::prediction_index_key("iris", 1_700_000_000_000, "01J-abc"),
        ),
        ("seed-outcome-key", keys::outcome_key("req-1", 3)),
        (
            "seed-outcome-index-key",
            keys::outcome_index_key("iris", 2, 99, "req", 1),
        ),
        (
            "seed-feature-row-key",
            keys::feature_row_key("user-42", 1_700_000_000_000, 7),
        ),
        ("seed-timed-value", keys::timed_value(42, b"body")),
        ("seed-round-trip-values", values.data),
    ]
}

/// Every seed: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, req) in requests() {
        out.push(("oip_request", name, req.encode_to_vec()));
    }
    for (name, resp) in responses() {
        out.push(("oip_response", name, resp.encode_to_vec()));
    }
    out.push((
        "grpc_frame",
        "seed-framed-request",
        body::frame(&iris_request()).to_vec(),
    ));
    out.push((
        "grpc_frame",
        "seed-framed-response",
        body::frame(&probabilities_response()).to_vec(),
    ));
    out.push(("grpc_frame", "seed-empty-message", vec![0, 0, 0, 0, 0]));
    out.push(("grpc_frame", "seed-compressed", vec![1, 0, 0, 0, 2, 8, 1]));
    out.push(("grpc_frame", "seed-truncated", vec![0, 0, 0, 0, 9, 1]));
    for (name, data) in control_seeds() {
        out.push(("control_args", name, data));
    }
    for (name, data) in key_seeds() {
        out.push(("keys", name, data));
    }
    out
}

#[test]
fn seeds_are_checked_in() {
    let write = std::env::var_os("MODELGATE_WRITE_SEEDS").is_some();
    for (target, name, data) in seeds() {
        let path = corpus().join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run MODELGATE_WRITE_SEEDS=1 cargo test --test fuzz_corpus",
                path.display()
            )
        });
        assert_eq!(stored, data, "{} is out of date", path.display());
    }
}

#[test]
fn every_corpus_file_passes_its_target() {
    let mut ran = HashMap::new();
    for dir in std::fs::read_dir(corpus()).unwrap() {
        let dir = dir.unwrap().path();
        let target = dir.file_name().unwrap().to_str().unwrap().to_string();
        for file in std::fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            if file.file_name().unwrap().to_str().unwrap().starts_with('.') {
                continue;
            }
            let data = std::fs::read(&file).unwrap();
            let found = std::panic::catch_unwind(|| fuzzing::run(&target, &data))
                .unwrap_or_else(|_| panic!("{} fails its target", file.display()));
            assert!(found, "{}: no fuzz target '{target}'", dir.display());
            *ran.entry(target.clone()).or_insert(0) += 1;
        }
    }
    for (target, _) in fuzzing::TARGETS {
        assert!(
            ran.get(*target).copied().unwrap_or(0) > 0,
            "no seeds for {target}"
        );
    }
}

#[test]
fn the_seeds_exercise_their_targets() {
    // The seeds are meaningful: real messages decode, and real keys decode.
    for (_, req) in requests() {
        let back = ModelInferRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert!(oip::request_inputs(&back, fuzzing::MAX_ELEMENTS).is_ok());
    }
    for (_, resp) in responses() {
        assert!(oip::response_outputs(&resp, fuzzing::MAX_ELEMENTS).is_ok());
    }
    assert!(keys::decode_registry_key(&keys::registry_key("iris", 2)).is_ok());
}
