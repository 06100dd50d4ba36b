//! TF Serving's gRPC API (`tensorflow.serving.PredictionService`): the protocol TensorFlow shops
//! call their models with.
//!
//! `Predict` is an inference: routed by `model_spec.name`, its version by `model_spec.version` (a
//! number) or `model_spec.version_label`, both read as one of modelgate's versions or aliases; its
//! input tensors (`TensorProto`, typed `*_val` fields or raw `tensor_content`) are the record's
//! features, its output map the predictions. `GetModelMetadata`, `Classify`, `Regress` and
//! `ModelService/GetModelStatus` name a model the same way and are routed by it, the backend's name
//! and version written into their `model_spec`; `MultiInference` (whose tasks may each name a
//! model) goes to the default model as it is. The messages are the vendored protos under
//! `proto/tensorflow_serving` and `proto/tensorflow`.
//!
//! The backend is called in this protocol: register the TF Serving gRPC endpoint (port 8500) of
//! the model server.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tonic::{body::Body, Status};

use super::grpc::{error_response, frame_bytes, unary_message};
use super::{
    wire, Call, InferAnswer, InferRequest, Inputs, ModelCall, Named, Outputs, Protocol,
    ProtocolError, Wanted,
};
use crate::pb::tensorflow::serving::{
    model_spec::VersionChoice, ModelSpec, PredictRequest, PredictResponse,
};
use crate::pb::tensorflow::{
    tensor_shape_proto::Dim, DataType as TfType, TensorProto, TensorShapeProto,
};
use crate::routing::Route;
use crate::tensor::{DataType, Tensor, Values};

/// gRPC path prefix of TF Serving's inference service.
pub const PREDICTION_PREFIX: &str = "/tensorflow.serving.PredictionService/";

/// gRPC path prefix of TF Serving's model status service.
pub const MODEL_SERVICE_PREFIX: &str = "/tensorflow.serving.ModelService/";

/// The request message of `Predict`.
const PREDICT_MESSAGE: &str = "tensorflow.serving.PredictRequest";

/// Every request of the protocol that names a model does so in `model_spec` (field 1).
const MODEL_SPEC_FIELD: u32 = 1;

const fn spec(message: &'static str) -> Call {
    Call::Model(ModelCall {
        message,
        name: "model_spec.name",
        optional: false,
        // Read through `model_spec`, not as top-level strings (see `TfsGrpc::named`).
        fields: (MODEL_SPEC_FIELD, None),
    })
}

/// TF Serving's gRPC API.
#[derive(Debug)]
pub struct TfsGrpc;

/// The TF Serving gRPC protocol.
pub static TFS_GRPC: TfsGrpc = TfsGrpc;

impl Protocol for TfsGrpc {
    fn name(&self) -> &'static str {
        "tfs-grpc"
    }

    fn classify(&self, path: &str) -> Option<Call> {
        if let Some(method) = path.strip_prefix(PREDICTION_PREFIX) {
            return Some(match method {
                "Predict" => Call::Infer,
                "GetModelMetadata" => spec("tensorflow.serving.GetModelMetadataRequest"),
                "Classify" => spec("tensorflow.serving.ClassificationRequest"),
                "Regress" => spec("tensorflow.serving.RegressionRequest"),
                // MultiInference's tasks each name a model; the call goes to the default model.
                _ => Call::Unnamed,
            });
        }
        let method = path.strip_prefix(MODEL_SERVICE_PREFIX)?;
        Some(match method {
            "GetModelStatus" => spec("tensorflow.serving.GetModelStatusRequest"),
            // HandleReloadConfigRequest configures the whole server.
            _ => Call::Unnamed,
        })
    }

    fn message(&self, body: &Bytes) -> Result<Bytes, ProtocolError> {
        Ok(unary_message(body)?)
    }

    fn body(&self, msg: &[u8]) -> Bytes {
        frame_bytes(msg)
    }

    fn decode_infer(
        &self,
        _path: &str,
        msg: Bytes,
    ) -> Result<Arc<dyn InferRequest>, ProtocolError> {
        let m = PredictRequest::decode(msg).map_err(|error| ProtocolError::Decode {
            message: PREDICT_MESSAGE,
            error,
        })?;
        let version = match &m.model_spec {
            Some(spec) if !spec.name.is_empty() => version_of(spec),
            _ => return Err(ProtocolError::MissingModel("model_spec.name")),
        };
        Ok(Arc::new(TfsRequest {
            version,
            request: m,
        }))
    }

    fn named(&self, call: &ModelCall, _path: &str, msg: &[u8]) -> Result<Named, ProtocolError> {
        let spec = model_spec(call.message, msg)?;
        Ok(Named {
            version: version_of(&spec),
            model: spec.name,
        })
    }

    /// Writes the backend's name and version into `model_spec`, at the wire level (every other
    /// field, tensors included, is kept as it came). A backend version that is a number is sent as
    /// `version`, any other as `version_label`, none as neither (the backend's latest).
    fn rewrite(
        &self,
        call: &Call,
        msg: &[u8],
        (model, _version): (&str, &str),
        route: &Route,
    ) -> Result<Option<Bytes>, ProtocolError> {
        let message = match call {
            Call::Infer => PREDICT_MESSAGE,
            Call::Model(m) if !model.is_empty() => m.message,
            _ => return Ok(None),
        };
        let mut spec = model_spec(message, msg)?;
        let before = spec.clone();
        if let Some(b) = route.backend_model.as_deref() {
            spec.name = b.to_string();
        }
        spec.version_choice = match route.backend_version.as_deref().unwrap_or("") {
            "" => None,
            v => Some(match v.parse::<i64>() {
                Ok(n) => VersionChoice::Version(n),
                Err(_) => VersionChoice::VersionLabel(v.to_string()),
            }),
        };
        if spec == before {
            return Ok(None);
        }
        wire::set_fields(msg, &[(MODEL_SPEC_FIELD, &spec.encode_to_vec())])
            .map(Some)
            .map_err(|error| ProtocolError::Wire { message, error })
    }

    fn read_answer(&self, msg: &Bytes) -> Result<Box<dyn InferAnswer>, String> {
        PredictResponse::decode(msg.clone())
            .map(|r| Box::new(TfsAnswer(r)) as Box<dyn InferAnswer>)
            .map_err(|e| format!("the answer is not a PredictResponse: {e}"))
    }

    fn error_response(&self, status: Status) -> http::Response<Body> {
        error_response(status)
    }
}

/// The `model_spec` of a request `message`, decoded (empty when the request has none).
fn model_spec(message: &'static str, msg: &[u8]) -> Result<ModelSpec, ProtocolError> {
    let bytes = wire::bytes_field(msg, MODEL_SPEC_FIELD)
        .map_err(|error| ProtocolError::Wire { message, error })?;
    ModelSpec::decode(bytes.unwrap_or_default())
        .map_err(|error| ProtocolError::Decode { message, error })
}

/// The version a `model_spec` names, as modelgate reads versions: the number, or the label.
fn version_of(spec: &ModelSpec) -> String {
    match &spec.version_choice {
        Some(VersionChoice::Version(n)) => n.to_string(),
        Some(VersionChoice::VersionLabel(l)) => l.clone(),
        None => String::new(),
    }
}

/// A decoded `PredictRequest`.
#[derive(Debug)]
pub struct TfsRequest {
    request: PredictRequest,
    version: String,
}

impl InferRequest for TfsRequest {
    fn protocol(&self) -> &'static dyn Protocol {
        &TFS_GRPC
    }

    fn model(&self) -> &str {
        self.request
            .model_spec
            .as_ref()
            .map_or("", |s| s.name.as_str())
    }

    fn version(&self) -> &str {
        &self.version
    }

    /// TF Serving requests carry no id.
    fn id(&self) -> &str {
        ""
    }

    /// TF Serving requests carry no parameters: a unit id comes from the headers.
    fn parameter(&self, _key: &str) -> Option<String> {
        None
    }

    fn check(&self, max_elements: usize) -> Result<(), ProtocolError> {
        self.request.inputs.iter().try_for_each(|(name, t)| {
            crate::oip::check_shape(name, &dims(t), max_elements).map_err(ProtocolError::Tensor)
        })
    }

    fn inputs(&self, max_elements: usize) -> Result<Inputs, String> {
        Ok(Inputs {
            tensors: self
                .request
                .inputs
                .iter()
                .map(|(name, t)| tensor(name, t, max_elements))
                .collect::<Result<_, _>>()?,
            parameters: Default::default(),
        })
    }
}

/// A decoded `PredictResponse`.
struct TfsAnswer(PredictResponse);

impl InferAnswer for TfsAnswer {
    fn outputs(&self, wanted: Wanted<'_>, max_elements: usize) -> Result<Outputs, String> {
        let outputs = &self.0.outputs;
        let tensors = match wanted {
            Wanted::All => outputs
                .iter()
                .map(|(name, t)| tensor(name, t, max_elements))
                .collect::<Result<_, _>>()?,
            // The first output is the first by name (the map has no other order).
            Wanted::One("") => outputs
                .iter()
                .next()
                .map(|(name, t)| tensor(name, t, max_elements))
                .transpose()?
                .into_iter()
                .collect(),
            Wanted::One(name) => outputs
                .get(name)
                .map(|t| tensor(name, t, max_elements))
                .transpose()?
                .into_iter()
                .collect(),
        };
        Ok(Outputs { tensors })
    }
}

/// A tensor's declared shape; a tensor without one is a scalar.
fn dims(t: &TensorProto) -> Vec<i64> {
    t.tensor_shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| d.size).collect())
        .unwrap_or_default()
}

/// The datatype modelgate reads a TensorFlow datatype as; `None` for the ones it does not read
/// (complex, quantized, resource and variant tensors).
pub fn datatype(dtype: i32) -> Option<DataType> {
    Some(match TfType::try_from(dtype).ok()? {
        TfType::DtFloat => DataType::F32,
        TfType::DtDouble => DataType::F64,
        TfType::DtInt32 => DataType::I32,
        TfType::DtUint8 => DataType::U8,
        TfType::DtInt16 => DataType::I16,
        TfType::DtInt8 => DataType::I8,
        TfType::DtString => DataType::Bytes,
        TfType::DtInt64 => DataType::I64,
        TfType::DtBool => DataType::Bool,
        TfType::DtBfloat16 => DataType::BF16,
        TfType::DtUint16 => DataType::U16,
        TfType::DtHalf => DataType::F16,
        TfType::DtUint32 => DataType::U32,
        TfType::DtUint64 => DataType::U64,
        _ => return None,
    })
}

/// The TensorFlow datatype of one of modelgate's.
pub fn tf_datatype(dt: DataType) -> TfType {
    match dt {
        DataType::F32 => TfType::DtFloat,
        DataType::F64 => TfType::DtDouble,
        DataType::I32 => TfType::DtInt32,
        DataType::U8 => TfType::DtUint8,
        DataType::I16 => TfType::DtInt16,
        DataType::I8 => TfType::DtInt8,
        DataType::Bytes => TfType::DtString,
        DataType::I64 => TfType::DtInt64,
        DataType::Bool => TfType::DtBool,
        DataType::BF16 => TfType::DtBfloat16,
        DataType::U16 => TfType::DtUint16,
        DataType::F16 => TfType::DtHalf,
        DataType::U32 => TfType::DtUint32,
        DataType::U64 => TfType::DtUint64,
    }
}

/// Decodes the `TensorProto` named `name` (at most `max_elements` elements): from
/// `tensor_content` (raw little-endian, every datatype but strings) when it is set, else from
/// the typed field of its datatype. As TensorFlow reads them, a typed field with fewer elements
/// than the shape is filled out with its last element (a single value fills the tensor), and an
/// empty one with zeros; more elements than the shape is an error.
pub fn tensor(name: &str, t: &TensorProto, max_elements: usize) -> Result<Tensor, String> {
    let dt = datatype(t.dtype).ok_or_else(|| {
        let dtype = TfType::try_from(t.dtype)
            .map_or_else(|_| t.dtype.to_string(), |d| d.as_str_name().to_string());
        format!("tensor '{name}': dtype {dtype} is not read")
    })?;
    let shape = dims(t);
    if t.tensor_shape.as_ref().is_some_and(|s| s.unknown_rank) {
        return Err(format!("tensor '{name}': unknown rank"));
    }
    crate::oip::check_shape(name, &shape, max_elements).map_err(|e| e.to_string())?;
    if !t.tensor_content.is_empty() {
        if dt == DataType::Bytes {
            return Err(format!(
                "tensor '{name}': DT_STRING elements must be sent in string_val, not tensor_content"
            ));
        }
        return crate::oip::decode_tensor(
            name,
            dt.as_str(),
            &shape,
            crate::oip::Contents::Decoded(None),
            Some(&t.tensor_content),
            max_elements,
        )
        .map_err(|e| e.to_string());
    }
    let n: usize = shape.iter().map(|&d| d as usize).product();
    let values = match dt {
        DataType::Bytes => Values::Bytes(fill(name, n, t.string_val.clone(), Bytes::new())?),
        _ => {
            let typed: Vec<f64> = match dt {
                DataType::F32 => t.float_val.iter().map(|&v| f64::from(v)).collect(),
                DataType::F64 => t.double_val.clone(),
                DataType::I32 | DataType::I16 | DataType::I8 | DataType::U8 | DataType::U16 => {
                    t.int_val.iter().map(|&v| f64::from(v)).collect()
                }
                DataType::I64 => t.int64_val.iter().map(|&v| v as f64).collect(),
                DataType::Bool => t.bool_val.iter().map(|&v| f64::from(u8::from(v))).collect(),
                DataType::F16 => t
                    .half_val
                    .iter()
                    .map(|&v| half::f16::from_bits(v as u16).to_f64())
                    .collect(),
                DataType::BF16 => t
                    .half_val
                    .iter()
                    .map(|&v| half::bf16::from_bits(v as u16).to_f64())
                    .collect(),
                DataType::U32 => t.uint32_val.iter().map(|&v| f64::from(v)).collect(),
                DataType::U64 => t.uint64_val.iter().map(|&v| v as f64).collect(),
                DataType::Bytes => unreachable!("handled above"),
            };
            Values::Numeric(fill(name, n, typed, 0.0)?)
        }
    };
    Ok(Tensor {
        name: name.to_string(),
        datatype: dt,
        shape: shape.iter().map(|&d| d as usize).collect(),
        values,
    })
}

/// `values` filled out to `n` elements as TensorFlow does (with the last one, or `zero`).
fn fill<T: Clone>(name: &str, n: usize, mut values: Vec<T>, zero: T) -> Result<Vec<T>, String> {
    if values.len() > n {
        return Err(format!(
            "tensor '{name}': {} values for a shape of {n} elements",
            values.len()
        ));
    }
    let last = values.last().cloned().unwrap_or(zero);
    values.resize(n, last);
    Ok(values)
}

/// A tensor shape of `dims`.
pub fn tensor_shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    })
}

/// A `TensorProto` of `dt` with `shape` and `values` in its typed field (numbers for numeric
/// datatypes): for the built-in model server's answers and for tests.
pub fn typed_tensor(dt: DataType, shape: &[usize], values: &Values) -> TensorProto {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let mut t = TensorProto {
        dtype: tf_datatype(dt) as i32,
        tensor_shape: tensor_shape(&dims),
        ..Default::default()
    };
    match values {
        Values::Bytes(b) => t.string_val = b.clone(),
        Values::Numeric(v) => match dt {
            DataType::F32 => t.float_val = v.iter().map(|&x| x as f32).collect(),
            DataType::F64 => t.double_val = v.clone(),
            DataType::I64 => t.int64_val = v.iter().map(|&x| x as i64).collect(),
            DataType::Bool => t.bool_val = v.iter().map(|&x| x != 0.0).collect(),
            DataType::F16 => {
                t.half_val = v
                    .iter()
                    .map(|&x| i32::from(half::f16::from_f64(x).to_bits()))
                    .collect()
            }
            DataType::BF16 => {
                t.half_val = v
                    .iter()
                    .map(|&x| i32::from(half::bf16::from_f64(x).to_bits()))
                    .collect()
            }
            DataType::U32 => t.uint32_val = v.iter().map(|&x| x as u32).collect(),
            DataType::U64 => t.uint64_val = v.iter().map(|&x| x as u64).collect(),
            _ => t.int_val = v.iter().map(|&x| x as i32).collect(),
        },
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
        tensor_shape(dims)
    }

    fn classify(path: &str) -> Call {
        super::super::classify(path).1
    }

    fn iris_route() -> Route {
        Route {
            model: "iris".into(),
            version: 2,
            version_label: "2".into(),
            endpoint: "http://127.0.0.1:1".into(),
            backend_model: None,
            backend_version: None,
            backend_protocol: Default::default(),
            prediction: Default::default(),
            feature_names: Default::default(),
            metrics: Default::default(),
        }
    }

    #[test]
    fn paths_classify() {
        assert_eq!(
            classify("/tensorflow.serving.PredictionService/Predict"),
            Call::Infer
        );
        for m in ["GetModelMetadata", "Classify", "Regress"] {
            assert!(matches!(
                classify(&format!("/tensorflow.serving.PredictionService/{m}")),
                Call::Model(ModelCall {
                    name: "model_spec.name",
                    ..
                })
            ));
        }
        assert!(matches!(
            classify("/tensorflow.serving.ModelService/GetModelStatus"),
            Call::Model(_)
        ));
        assert_eq!(
            classify("/tensorflow.serving.PredictionService/MultiInference"),
            Call::Unnamed
        );
    }

    #[test]
    fn typed_fields_and_tensor_content_decode_alike() {
        let typed = TensorProto {
            dtype: TfType::DtFloat as i32,
            tensor_shape: shape(&[2, 2]),
            float_val: vec![1.0, 2.0, 3.5, -4.0],
            ..Default::default()
        };
        let raw = TensorProto {
            dtype: TfType::DtFloat as i32,
            tensor_shape: shape(&[2, 2]),
            tensor_content: [1.0f32, 2.0, 3.5, -4.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            ..Default::default()
        };
        let a = tensor("x", &typed, 100).unwrap();
        let b = tensor("x", &raw, 100).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.shape, vec![2, 2]);
        assert_eq!(a.numeric().unwrap(), &[1.0, 2.0, 3.5, -4.0]);

        let int64 = TensorProto {
            dtype: TfType::DtInt64 as i32,
            tensor_shape: shape(&[3]),
            int64_val: vec![7, -1, 9],
            ..Default::default()
        };
        assert_eq!(
            tensor("i", &int64, 100).unwrap().numeric().unwrap(),
            &[7.0, -1.0, 9.0]
        );
        let half = TensorProto {
            dtype: TfType::DtHalf as i32,
            tensor_shape: shape(&[1]),
            half_val: vec![i32::from(half::f16::from_f32(0.5).to_bits())],
            ..Default::default()
        };
        assert_eq!(tensor("h", &half, 100).unwrap().numeric().unwrap(), &[0.5]);
        let strings = TensorProto {
            dtype: TfType::DtString as i32,
            tensor_shape: shape(&[2]),
            string_val: vec![Bytes::from("red"), Bytes::from("blue")],
            ..Default::default()
        };
        assert_eq!(
            tensor("s", &strings, 100).unwrap().values,
            Values::Bytes(vec![Bytes::from("red"), Bytes::from("blue")])
        );
    }

    #[test]
    fn a_short_typed_field_fills_out_as_tensorflow_does_and_a_long_one_is_refused() {
        let one = TensorProto {
            dtype: TfType::DtInt32 as i32,
            tensor_shape: shape(&[2, 2]),
            int_val: vec![3],
            ..Default::default()
        };
        assert_eq!(
            tensor("c", &one, 100).unwrap().numeric().unwrap(),
            &[3.0; 4]
        );
        let scalar = TensorProto {
            dtype: TfType::DtDouble as i32,
            double_val: vec![2.5],
            ..Default::default()
        };
        let t = tensor("s", &scalar, 100).unwrap();
        assert_eq!((t.shape.len(), t.numeric().unwrap()), (0, &[2.5][..]));
        let long = TensorProto {
            dtype: TfType::DtFloat as i32,
            tensor_shape: shape(&[1]),
            float_val: vec![1.0, 2.0],
            ..Default::default()
        };
        let e = tensor("l", &long, 100).unwrap_err();
        assert!(e.contains("'l'") && e.contains("2 values"), "{e}");
        let big = TensorProto {
            dtype: TfType::DtFloat as i32,
            tensor_shape: shape(&[1000, 1000]),
            ..Default::default()
        };
        assert!(tensor("b", &big, 1000).unwrap_err().contains("'b'"));
        let complex = TensorProto {
            dtype: TfType::DtComplex64 as i32,
            ..Default::default()
        };
        assert!(tensor("c", &complex, 10)
            .unwrap_err()
            .contains("DT_COMPLEX64 is not read"));
        let bad_raw = TensorProto {
            dtype: TfType::DtFloat as i32,
            tensor_shape: shape(&[2]),
            tensor_content: Bytes::from_static(&[0, 0, 0]),
            ..Default::default()
        };
        assert!(tensor("r", &bad_raw, 10).is_err());
    }

    #[test]
    fn versions_and_labels_are_named_and_backends_get_their_own() {
        let req = PredictRequest {
            model_spec: Some(ModelSpec {
                name: "iris".into(),
                signature_name: "serving_default".into(),
                version_choice: Some(VersionChoice::Version(2)),
            }),
            output_filter: vec!["scores".into()],
            ..Default::default()
        };
        let msg = Bytes::from(req.encode_to_vec());
        let decoded = TFS_GRPC.decode_infer("", msg.clone()).unwrap();
        assert_eq!((decoded.model(), decoded.version()), ("iris", "2"));

        let mut route = iris_route();
        route.backend_model = Some("iris-tf".into());
        route.backend_version = Some("canary".into());
        let out = TFS_GRPC
            .rewrite(&Call::Infer, &msg, ("iris", "2"), &route)
            .unwrap()
            .expect("rewritten");
        let back = PredictRequest::decode(out).unwrap();
        let spec = back.model_spec.unwrap();
        assert_eq!(spec.name, "iris-tf");
        assert_eq!(
            spec.version_choice,
            Some(VersionChoice::VersionLabel("canary".into()))
        );
        assert_eq!(spec.signature_name, "serving_default");
        assert_eq!(back.output_filter, vec!["scores".to_string()]);

        // Nothing to change: the message goes as it is.
        let mut same = iris_route();
        same.backend_version = Some("2".into());
        assert!(TFS_GRPC
            .rewrite(&Call::Infer, &msg, ("iris", "2"), &same)
            .unwrap()
            .is_none());

        let Call::Model(call) = classify("/tensorflow.serving.PredictionService/Classify") else {
            panic!()
        };
        let named = TFS_GRPC.named(&call, "", &msg).unwrap();
        assert_eq!(
            (named.model.as_str(), named.version.as_str()),
            ("iris", "2")
        );
        let none = TFS_GRPC.decode_infer("", Bytes::new()).unwrap_err();
        assert!(none.to_string().contains("model_spec.name"), "{none}");
    }
}
