//! The built-in model server in TF Serving's protocol (`tensorflow.serving.PredictionService`):
//! the same models as over OIP, so that TF Serving callers and backends can be tried and tested
//! here. `Predict` takes one input tensor of N features (any alias; typed `*_val` fields or
//! `tensor_content`) and answers the model's outputs (in `tensor_content` when the request used
//! it, else in typed fields); `GetModelMetadata` answers the `serving_default` signature;
//! `Classify` (logistic models) and `Regress` (linear models) read each example's `input` float
//! list. A version is named by `model_spec.version` (the number) or `version_label`.

use prost::Message;
use tonic::{Request, Response, Status};

use super::{Kind, ModelServer, ModelSpec, Output};
use crate::pb::tensorflow::serving::{
    model_spec::VersionChoice, prediction_service_server::PredictionService, Class,
    ClassificationRequest, ClassificationResponse, ClassificationResult, Classifications,
    GetModelMetadataRequest, GetModelMetadataResponse, Input, ModelSpec as TfModelSpec,
    MultiInferenceRequest, MultiInferenceResponse, PredictRequest, PredictResponse, Regression,
    RegressionRequest, RegressionResponse, RegressionResult, SignatureDefMap,
};
use crate::pb::tensorflow::{
    feature::Kind as FeatureKind, tensor_info, DataType as TfType, SignatureDef, TensorInfo,
    TensorProto,
};
use crate::protocol::tfs_grpc::{self, tensor_shape as shape};
use crate::tensor::{DataType, Values};

impl ModelServer {
    /// The model a `model_spec` names.
    fn find_spec(&self, spec: Option<&TfModelSpec>) -> Result<&ModelSpec, Status> {
        let spec = spec.ok_or_else(|| Status::invalid_argument("model_spec: required"))?;
        let version = match &spec.version_choice {
            Some(VersionChoice::Version(n)) => n.to_string(),
            Some(VersionChoice::VersionLabel(l)) => l.clone(),
            None => String::new(),
        };
        self.find(&spec.name, &version)
    }
}

/// The `model_spec` of an answer from `m`.
fn answered_by(m: &ModelSpec, signature: &str) -> Option<TfModelSpec> {
    Some(TfModelSpec {
        name: m.name.clone(),
        signature_name: signature.to_string(),
        version_choice: Some(match m.version.parse::<i64>() {
            Ok(n) => VersionChoice::Version(n),
            Err(_) => VersionChoice::VersionLabel(m.version.clone()),
        }),
    })
}

fn tensor_info(name: &str, dtype: TfType, dims: &[i64]) -> TensorInfo {
    TensorInfo {
        dtype: dtype as i32,
        tensor_shape: shape(dims),
        encoding: Some(tensor_info::Encoding::Name(format!("{name}:0"))),
    }
}

/// The feature rows of `input`'s examples: each example's `input` float list.
fn example_rows(m: &ModelSpec, input: Option<&Input>) -> Result<Vec<Vec<f64>>, Status> {
    use crate::pb::tensorflow::serving::input::Kind as InputKind;
    let examples = match input.and_then(|i| i.kind.as_ref()) {
        Some(InputKind::ExampleList(l)) => &l.examples,
        Some(InputKind::ExampleListWithContext(l)) => &l.examples,
        None => {
            return Err(Status::invalid_argument(
                "input: required (an example list)",
            ))
        }
    };
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let values = e
                .features
                .as_ref()
                .and_then(|f| f.feature.get("input"))
                .and_then(|f| match &f.kind {
                    Some(FeatureKind::FloatList(l)) => Some(&l.value),
                    _ => None,
                })
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "input.examples[{i}]: needs a float_list feature 'input'"
                    ))
                })?;
            if values.len() != m.weights.len() {
                return Err(Status::invalid_argument(format!(
                    "input.examples[{i}]: {} features; model '{}' takes {}",
                    values.len(),
                    m.name,
                    m.weights.len()
                )));
            }
            Ok(values.iter().map(|&v| f64::from(v)).collect())
        })
        .collect()
}

#[tonic::async_trait]
impl PredictionService for ModelServer {
    async fn classify(
        &self,
        req: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        let r = req.into_inner();
        let m = self.find_spec(r.model_spec.as_ref())?;
        if m.kind != Kind::Logistic {
            return Err(Status::invalid_argument(format!(
                "model '{}' is linear: use Regress",
                m.name
            )));
        }
        let rows = example_rows(m, r.input.as_ref())?;
        let classifications = rows
            .iter()
            .map(|x| {
                let Output::F32(_, _, p) = &m.infer(x, 1)[0] else {
                    unreachable!("a logistic model's first output is its probabilities")
                };
                Classifications {
                    classes: vec![
                        Class {
                            label: "0".into(),
                            score: p[0],
                        },
                        Class {
                            label: "1".into(),
                            score: p[1],
                        },
                    ],
                }
            })
            .collect();
        Ok(Response::new(ClassificationResponse {
            model_spec: answered_by(m, "serving_default"),
            result: Some(ClassificationResult { classifications }),
        }))
    }

    async fn regress(
        &self,
        req: Request<RegressionRequest>,
    ) -> Result<Response<RegressionResponse>, Status> {
        let r = req.into_inner();
        let m = self.find_spec(r.model_spec.as_ref())?;
        if m.kind != Kind::Linear {
            return Err(Status::invalid_argument(format!(
                "model '{}' is logistic: use Classify",
                m.name
            )));
        }
        let regressions = example_rows(m, r.input.as_ref())?
            .iter()
            .map(|x| {
                let Output::F32(_, _, v) = &m.infer(x, 1)[0] else {
                    unreachable!("a linear model's output is its value")
                };
                Regression { value: v[0] }
            })
            .collect();
        Ok(Response::new(RegressionResponse {
            model_spec: answered_by(m, "serving_default"),
            result: Some(RegressionResult { regressions }),
        }))
    }

    async fn predict(
        &self,
        req: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let r = req.into_inner();
        let m = self.find_spec(r.model_spec.as_ref())?.clone();
        let [(name, proto)] = r.inputs.iter().collect::<Vec<_>>()[..] else {
            return Err(Status::invalid_argument(format!(
                "model '{}' takes exactly one input tensor, got {}",
                m.name,
                r.inputs.len()
            )));
        };
        let input = tfs_grpc::tensor(name, proto, crate::oip::DEFAULT_MAX_ELEMENTS)
            .map_err(Status::invalid_argument)?;
        let Values::Numeric(x) = &input.values else {
            return Err(Status::invalid_argument(format!(
                "input '{name}' is DT_STRING; model '{}' takes numeric features",
                m.name
            )));
        };
        let n = m.weights.len();
        let rows = match input.shape[..] {
            [c] if c == n => 1,
            [b, c] if c == n => b,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "input '{name}' has shape {:?}; model '{}' expects [batch, {n}] or [{n}]",
                    input.shape, m.name
                )))
            }
        };
        if !m.latency.is_zero() {
            tokio::time::sleep(m.latency).await;
        }
        let raw = !proto.tensor_content.is_empty();
        let mut outputs = std::collections::BTreeMap::new();
        for o in m.infer(x, rows) {
            let (name, dt, dims, values, content) = match o {
                Output::F32(name, dims, v) => (
                    name,
                    DataType::F32,
                    dims,
                    Values::Numeric(v.iter().map(|&x| f64::from(x)).collect()),
                    crate::oip::f32_raw(&v),
                ),
                Output::I64(name, dims, v) => (
                    name,
                    DataType::I64,
                    dims,
                    Values::Numeric(v.iter().map(|&x| x as f64).collect()),
                    crate::oip::i64_raw(&v),
                ),
            };
            if !r.output_filter.is_empty() && !r.output_filter.iter().any(|f| f == name) {
                continue;
            }
            let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            let tensor: TensorProto = if raw {
                TensorProto {
                    dtype: tfs_grpc::tf_datatype(dt) as i32,
                    tensor_shape: shape(&dims.iter().map(|&d| d as i64).collect::<Vec<_>>()),
                    tensor_content: content,
                    ..Default::default()
                }
            } else {
                tfs_grpc::typed_tensor(dt, &dims, &values)
            };
            outputs.insert(name.to_string(), tensor);
        }
        if let Some(bad) = r.output_filter.iter().find(|f| !outputs.contains_key(*f)) {
            return Err(Status::invalid_argument(format!(
                "output_filter: model '{}' has no output '{bad}'",
                m.name
            )));
        }
        Ok(Response::new(PredictResponse {
            model_spec: answered_by(&m, "serving_default"),
            outputs,
        }))
    }

    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented(
            "the built-in model server does not serve MultiInference",
        ))
    }

    async fn get_model_metadata(
        &self,
        req: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let m = self.find_spec(r.model_spec.as_ref())?;
        if let Some(f) = r.metadata_field.iter().find(|f| *f != "signature_def") {
            return Err(Status::invalid_argument(format!(
                "metadata_field: '{f}' is not served (only signature_def)"
            )));
        }
        let outputs = m
            .output_metadata()
            .into_iter()
            .map(|o| {
                let dtype = if o.datatype == "INT64" {
                    TfType::DtInt64
                } else {
                    TfType::DtFloat
                };
                (o.name.clone(), tensor_info(&o.name, dtype, &o.shape))
            })
            .collect();
        let signature = SignatureDef {
            inputs: [(
                "input".to_string(),
                tensor_info("input", TfType::DtFloat, &[-1, m.weights.len() as i64]),
            )]
            .into(),
            outputs,
            method_name: "tensorflow/serving/predict".into(),
            defaults: Default::default(),
        };
        let map = SignatureDefMap {
            signature_def: [("serving_default".to_string(), signature)].into(),
        };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: answered_by(m, ""),
            metadata: [(
                "signature_def".to_string(),
                prost_types::Any {
                    type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
                    value: map.encode_to_vec(),
                },
            )]
            .into(),
        }))
    }
}
