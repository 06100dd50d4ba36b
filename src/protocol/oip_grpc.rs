//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, KServe v2 and
//! Triton): the first [`Protocol`].
//!
//! `ModelInfer` requests are scanned at the wire level on the request path — the model and
//! version they name route them, their declared shapes are checked — and kept as they are for
//! the record writer, which decodes them whole (prost) for their tensors (`crate::oip`). The
//! other calls that name a model are read and rewritten at the wire level (`super::wire`), field
//! by field, so that fields modelgate's protos do not declare survive.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tonic::{body::Body, Status};

use super::grpc::{error_response, frame_bytes, unary_message, unary_response};
use super::{
    wire, Call, InferAnswer, InferRequest, Inputs, ModelCall, Named, Outputs, Protocol,
    ProtocolError, ServerCall, StreamAnswer, Wanted,
};
use crate::oip;
use crate::pb::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, ServerLiveResponse,
    ServerMetadataResponse, ServerReadyResponse,
};
use crate::routing::Route;

/// gRPC path prefix of the Open Inference Protocol service.
pub const OIP_PREFIX: &str = "/inference.GRPCInferenceService/";

/// The request message of `ModelInfer`.
const INFER_MESSAGE: &str = "inference.ModelInferRequest";

/// Where `ModelInferRequest` names its model and version (`model_name` = 1, `model_version` = 2).
const INFER_FIELDS: (u32, Option<u32>) = (1, Some(2));

const fn named(message: &'static str, version: bool) -> ModelCall {
    ModelCall {
        message,
        name: "name",
        optional: false,
        fields: (1, if version { Some(2) } else { None }),
    }
}

const fn repository(message: &'static str) -> ModelCall {
    ModelCall {
        message,
        name: "model_name",
        optional: false,
        fields: (2, None),
    }
}

/// The Open Inference Protocol over gRPC.
#[derive(Debug)]
pub struct OipGrpc;

/// The OIP gRPC protocol.
pub static OIP_GRPC: OipGrpc = OipGrpc;

impl Protocol for OipGrpc {
    fn name(&self) -> &'static str {
        "oip-grpc"
    }

    fn classify(&self, path: &str) -> Option<Call> {
        let method = path.strip_prefix(OIP_PREFIX)?;
        Some(match method {
            "ModelInfer" => Call::Infer,
            "ModelMetadata" => Call::Model(named("inference.ModelMetadataRequest", true)),
            "ModelReady" => Call::Model(named("inference.ModelReadyRequest", true)),
            "ModelConfig" => Call::Model(named("inference.ModelConfigRequest", true)),
            "ModelStatistics" => Call::Model(named("inference.ModelStatisticsRequest", true)),
            "RepositoryModelLoad" => {
                Call::Model(repository("inference.RepositoryModelLoadRequest"))
            }
            "RepositoryModelUnload" => {
                Call::Model(repository("inference.RepositoryModelUnloadRequest"))
            }
            // Trace settings name a model, or none for the server's own.
            "TraceSetting" => Call::Model(ModelCall {
                optional: true,
                ..repository("inference.TraceSettingRequest")
            }),
            "ModelStreamInfer" => Call::Stream,
            "ServerLive" => Call::Server(ServerCall::Live),
            "ServerReady" => Call::Server(ServerCall::Ready),
            "ServerMetadata" => Call::Server(ServerCall::Metadata),
            // RepositoryIndex, shared memory, LogSettings, and whatever Triton adds later.
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
        let m = OipRequest::scan(msg).map_err(|error| ProtocolError::Wire {
            message: INFER_MESSAGE,
            error,
        })?;
        if m.model().is_empty() {
            return Err(ProtocolError::MissingModel("model_name"));
        }
        Ok(Arc::new(m))
    }

    fn named(&self, call: &ModelCall, _path: &str, msg: &[u8]) -> Result<Named, ProtocolError> {
        let invalid = |error| ProtocolError::Wire {
            message: call.message,
            error,
        };
        let (name_field, version_field) = call.fields;
        Ok(Named {
            model: wire::string_field(msg, name_field).map_err(invalid)?,
            version: match version_field {
                Some(f) => wire::string_field(msg, f).map_err(invalid)?,
                None => String::new(),
            },
        })
    }

    fn rewrite(
        &self,
        call: &Call,
        msg: &[u8],
        (model, version): (&str, &str),
        route: &Route,
    ) -> Result<Option<Bytes>, ProtocolError> {
        let (message, fields) = match call {
            Call::Infer | Call::Stream => (INFER_MESSAGE, INFER_FIELDS),
            // A call that named no model went to the default model as it is.
            Call::Model(m) if !model.is_empty() => (m.message, m.fields),
            _ => return Ok(None),
        };
        let edits = backend_edits(route, fields, model, version);
        if edits.is_empty() {
            return Ok(None);
        }
        wire::set_string_fields(msg, &edits)
            .map(Some)
            .map_err(|error| ProtocolError::Wire { message, error })
    }

    fn read_answer(&self, msg: &Bytes) -> Result<Box<dyn InferAnswer>, String> {
        Ok(Box::new(OipAnswer {
            msg: msg.clone(),
            whole: std::sync::OnceLock::new(),
        }))
    }

    /// A `ModelStreamInferResponse`: `error_message` (1) and `infer_response` (2), whose `id`
    /// (3) names the request; read at the wire level, as the answer passes.
    fn stream_answer(&self, msg: &Bytes) -> StreamAnswer {
        let response = wire::message_field(msg, 2).ok().flatten();
        StreamAnswer {
            failed: !wire::string_field(msg, 1).unwrap_or_default().is_empty(),
            id: response
                .as_ref()
                .and_then(|r| wire::string_field(r, 3).ok())
                .unwrap_or_default(),
            response,
        }
    }

    fn server_response(&self, call: ServerCall, ready: bool) -> http::Response<Body> {
        match call {
            ServerCall::Live => unary_response(&ServerLiveResponse { live: true }),
            ServerCall::Ready => unary_response(&ServerReadyResponse { ready }),
            ServerCall::Metadata => unary_response(&ServerMetadataResponse {
                name: "modelgate".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: vec![],
            }),
        }
    }

    fn error_response(&self, status: Status) -> http::Response<Body> {
        error_response(status)
    }
}

/// The string fields to write into a request so that the backend understands it: the route's
/// backend model name (when it has one and the caller named another), and the version — a
/// caller's `model_version` names one of modelgate's versions, so the backend gets that version's
/// backend version, or none when it has none registered. Empty when the request is right as it is.
fn backend_edits<'r>(
    route: &'r Route,
    (name_field, version_field): (u32, Option<u32>),
    name: &str,
    version: &str,
) -> Vec<(u32, &'r str)> {
    let mut edits = Vec::new();
    if let Some(b) = route.backend_model.as_deref().filter(|b| *b != name) {
        edits.push((name_field, b));
    }
    if let Some(field) = version_field {
        let backend = route.backend_version.as_deref().unwrap_or("");
        if backend != version {
            edits.push((field, backend));
        }
    }
    edits
}

/// A `ModelInferRequest`, read as far as each question needs. Routing reads three strings and
/// the declared shapes; decoding the whole message with prost (every tensor's values into a
/// vector, every parameter into a map) was ~5,000 instructions of a routed call's ~97,000, and
/// only the record writer needs the values. So the message is scanned once at the wire level —
/// every field framed right, `model_name`, `model_version` and `id` (1–3) UTF-8 strings, the
/// message fields (4–7) length-delimited — and the rest is read when asked: the shapes by
/// [`InferRequest::check`], a parameter by [`InferRequest::parameter`] (its map entries at the
/// wire level), the tensors by [`InferRequest::inputs`] (prost, on the writer's thread).
/// A malformed tensor or parameter that nothing reads is passed on as it came, as a proxy would
/// pass it: the model server judges it.
#[derive(Debug)]
pub struct OipRequest {
    msg: Bytes,
    model: std::ops::Range<usize>,
    version: std::ops::Range<usize>,
    id: std::ops::Range<usize>,
    /// Whether it has `parameters` (4): most calls have none, and the unit id is looked for in
    /// them at every call's end.
    has_parameters: bool,
    /// Whether it has `inputs` (5), whose shapes are checked.
    has_inputs: bool,
}

impl OipRequest {
    /// Scans `msg` (see the type's documentation).
    pub fn scan(msg: Bytes) -> Result<Self, wire::WireError> {
        let (mut model, mut version, mut id) = (0..0, 0..0, 0..0);
        let (mut has_parameters, mut has_inputs) = (false, false);
        for f in wire::fields(&msg) {
            let f = f?;
            if !(1..=7).contains(&f.number) {
                continue;
            }
            // Each known field is length-delimited (the wrong wire type is what prost refuses).
            let payload = f.payload.ok_or(wire::WireError::WrongType(f.number))?;
            // The last occurrence of a string wins, as when decoding.
            let string = match f.number {
                1 => &mut model,
                2 => &mut version,
                3 => &mut id,
                4 => {
                    has_parameters = true;
                    continue;
                }
                5 => {
                    has_inputs = true;
                    continue;
                }
                _ => continue,
            };
            std::str::from_utf8(&msg[payload.clone()])
                .map_err(|_| wire::WireError::NotUtf8(f.number))?;
            *string = payload;
        }
        Ok(OipRequest {
            msg,
            model,
            version,
            id,
            has_parameters,
            has_inputs,
        })
    }

    fn text(&self, range: &std::ops::Range<usize>) -> &str {
        // Checked UTF-8 by `scan`.
        std::str::from_utf8(&self.msg[range.clone()]).unwrap_or_default()
    }
}

impl From<&ModelInferRequest> for OipRequest {
    /// A request as it would arrive: encoded, then scanned.
    fn from(m: &ModelInferRequest) -> Self {
        OipRequest::scan(m.encode_to_vec().into()).expect("prost's encoding scans")
    }
}

impl InferRequest for OipRequest {
    fn protocol(&self) -> &'static dyn Protocol {
        &OIP_GRPC
    }

    fn model(&self) -> &str {
        self.text(&self.model)
    }

    fn version(&self) -> &str {
        self.text(&self.version)
    }

    fn id(&self) -> &str {
        self.text(&self.id)
    }

    fn parameter(&self, key: &str) -> Option<String> {
        // `parameters` (4) is a map: entries with `key` (1) and `value` (2, an
        // `InferParameter`); the last entry for a key wins, as when decoding.
        if !self.has_parameters {
            return None;
        }
        let mut value = None;
        for f in wire::scan(&self.msg) {
            let f = f.ok()?;
            if f.number != 4 {
                continue;
            }
            let entry = f.payload?;
            if wire::bytes_field(entry, 1).ok()?.unwrap_or_default() == key.as_bytes() {
                value = Some(wire::bytes_field(entry, 2).ok()?.unwrap_or_default());
            }
        }
        let value = InferParameter::decode(value?).ok()?;
        oip::parameter_text(&value)
    }

    fn check(&self, max_elements: usize) -> Result<(), ProtocolError> {
        let invalid = |error| ProtocolError::Wire {
            message: INFER_MESSAGE,
            error,
        };
        if !self.has_inputs {
            return Ok(());
        }
        let mut shape = Vec::new();
        for f in wire::scan(&self.msg) {
            let f = f.map_err(invalid)?;
            if f.number != 5 {
                continue;
            }
            // An `InferInputTensor`: `name` (1) and `shape` (3, packed or not).
            let (mut name, tensor) = (&[][..], f.payload.unwrap_or_default());
            shape.clear();
            for t in wire::scan(tensor) {
                let t = t.map_err(invalid)?;
                match (t.number, t.varint, t.payload) {
                    (1, _, Some(p)) => name = p,
                    (3, Some(d), _) => shape.push(d as i64),
                    (3, _, Some(packed)) => {
                        wire::varints(packed, &mut shape).map_err(invalid)?;
                    }
                    (1 | 3, _, _) => return Err(invalid(wire::WireError::WrongType(t.number))),
                    _ => {}
                }
            }
            let name =
                std::str::from_utf8(name).map_err(|_| invalid(wire::WireError::NotUtf8(1)))?;
            oip::check_shape(name, &shape, max_elements).map_err(ProtocolError::Tensor)?;
        }
        Ok(())
    }

    fn inputs(&self, max_elements: usize) -> Result<Inputs, String> {
        // The record writer asks once per record: decoded here, not kept.
        let whole = ModelInferRequest::decode(self.msg.clone())
            .map_err(|e| format!("request is not a valid {INFER_MESSAGE}: {e}"))?;
        inputs(&whole, max_elements)
    }
}

/// A `ModelInferResponse`, read as far as each question needs: the one output a prediction is
/// read from is found at the wire level and only it is decoded (decoding the whole answer —
/// its ids, names and every other output — was most of what reading a prediction cost the
/// record writer); every output, for a shadow comparison, decodes the whole message, once.
/// (So a field that is not read is not checked: an answer whose `id` is not UTF-8 still gives
/// its prediction.)
struct OipAnswer {
    msg: Bytes,
    whole: std::sync::OnceLock<Result<ModelInferResponse, String>>,
}

impl InferAnswer for OipAnswer {
    fn outputs(&self, wanted: Wanted<'_>, max_elements: usize) -> Result<Outputs, String> {
        match wanted {
            Wanted::One(name) => one_output(&self.msg, name, max_elements),
            Wanted::All => {
                let whole = self.whole.get_or_init(|| {
                    ModelInferResponse::decode(self.msg.clone()).map_err(not_a_response)
                });
                outputs(whole.as_ref().map_err(Clone::clone)?, wanted, max_elements)
            }
        }
    }
}

fn not_a_response(e: impl std::fmt::Display) -> String {
    format!("the answer is not a ModelInferResponse: {e}")
}

/// The output `name` (the first one when empty) of the `ModelInferResponse` `msg`, as
/// [`outputs`] gives it for `Wanted::One(name)`: `outputs` (5) and `raw_output_contents` (6) are
/// found in one scan, and only the output wanted is decoded.
fn one_output(msg: &Bytes, name: &str, max_elements: usize) -> Result<Outputs, String> {
    let [tensors, raw] = wire::repeated_fields(msg, [5, 6]).map_err(not_a_response)?;
    let mut found = None;
    for (i, t) in tensors.iter().enumerate() {
        // `name` (1): the last occurrence, as decoding reads it.
        let this = wire::bytes_field(t, 1).map_err(not_a_response)?;
        if name.is_empty() || this == Some(name.as_bytes()) {
            found = Some(i);
            break;
        }
    }
    let Some(i) = found else {
        return Ok(Outputs::default());
    };
    if !raw.is_empty() && raw.len() != tensors.len() {
        return Err(oip::OipError::RawCount {
            raw: raw.len(),
            tensors: tensors.len(),
        }
        .to_string());
    }
    let t = OutputView::decode(tensors[i].clone()).map_err(not_a_response)?;
    fn text(b: &[u8]) -> Result<&str, String> {
        std::str::from_utf8(b).map_err(|_| not_a_response("a string field is not UTF-8"))
    }
    let tensor = oip::decode_tensor(
        text(&t.name)?,
        text(&t.datatype)?,
        &t.shape,
        t.contents.as_ref(),
        raw.get(i),
        max_elements,
    )
    .map_err(|e| e.to_string())?;
    Ok(Outputs {
        tensors: vec![tensor],
    })
}

/// What [`one_output`] reads of an `InferOutputTensor`: its strings as slices of the answer
/// (checked for UTF-8 afterwards, as decoding a `string` would), its shape and contents; its
/// `parameters` (4) are not read — nothing taken from one output uses them, and decoding the map
/// and the strings into owned copies was a third of reading an answer's prediction.
#[derive(Clone, PartialEq, prost::Message)]
struct OutputView {
    #[prost(bytes = "bytes", tag = "1")]
    name: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    datatype: Bytes,
    #[prost(int64, repeated, tag = "3")]
    shape: Vec<i64>,
    #[prost(message, optional, tag = "5")]
    contents: Option<crate::pb::inference::InferTensorContents>,
}

/// The inputs of a `ModelInferRequest`: its tensors decoded, its parameters as text.
pub fn inputs(req: &ModelInferRequest, max_elements: usize) -> Result<Inputs, String> {
    Ok(Inputs {
        tensors: oip::request_inputs(req, max_elements).map_err(|e| e.to_string())?,
        parameters: oip::parameters(&req.parameters),
    })
}

/// The outputs of a `ModelInferResponse` that are `wanted`, decoded.
pub fn outputs(
    resp: &ModelInferResponse,
    wanted: Wanted<'_>,
    max_elements: usize,
) -> Result<Outputs, String> {
    let tensors = match wanted {
        Wanted::All => oip::response_outputs(resp, max_elements),
        Wanted::One(name) => oip::response_output(resp, name, max_elements).map(Vec::from_iter),
    };
    Ok(Outputs {
        tensors: tensors.map_err(|e| e.to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::model_infer_response::InferOutputTensor;
    use crate::pb::inference::InferTensorContents;

    #[test]
    fn one_output_is_read_as_decoding_the_whole_answer_reads_it() {
        let tensor =
            |name: &str, datatype: &str, shape: Vec<i64>, fp32: Vec<f32>| InferOutputTensor {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                parameters: Default::default(),
                contents: (!fp32.is_empty()).then(|| InferTensorContents {
                    fp32_contents: fp32,
                    ..Default::default()
                }),
            };
        let typed = ModelInferResponse {
            model_name: "iris".into(),
            id: "r-1".into(),
            outputs: vec![
                tensor("probabilities", "FP32", vec![1, 2], vec![0.25, 0.75]),
                tensor("label", "FP32", vec![1], vec![1.0]),
            ],
            ..Default::default()
        };
        let raw = ModelInferResponse {
            outputs: vec![
                tensor("a", "FP32", vec![2], vec![]),
                tensor("b", "FP32", vec![1], vec![]),
            ],
            raw_output_contents: vec![
                Bytes::from([1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()),
                Bytes::from(3f32.to_le_bytes().to_vec()),
            ],
            ..Default::default()
        };
        // Parameters of an output are not read: the same tensor either way.
        let mut with_parameters = typed.clone();
        with_parameters.outputs[1].parameters.insert(
            "unit".into(),
            crate::pb::inference::InferParameter {
                parameter_choice: Some(
                    crate::pb::inference::infer_parameter::ParameterChoice::StringParam(
                        "cm".into(),
                    ),
                ),
            },
        );
        let mut miscounted = raw.clone();
        miscounted.raw_output_contents.pop();
        let mut short = raw.clone();
        short.outputs[1].shape = vec![2];
        for resp in [&typed, &with_parameters, &raw, &miscounted, &short] {
            let msg = Bytes::from(resp.encode_to_vec());
            for name in ["", "probabilities", "label", "a", "b", "missing"] {
                let whole = outputs(resp, Wanted::One(name), 100);
                assert_eq!(one_output(&msg, name, 100), whole, "{name}");
                // Through the answer, and every output from the same answer afterwards.
                let answer = OipGrpc.read_answer(&msg).unwrap();
                assert_eq!(answer.outputs(Wanted::One(name), 100), whole);
                assert_eq!(
                    answer.outputs(Wanted::All, 100),
                    outputs(resp, Wanted::All, 100)
                );
            }
        }
        assert_eq!(
            one_output(&msg(&typed), "label", 100).unwrap().tensors[0]
                .values
                .len(),
            1
        );
        // A message that does not parse is an error either way.
        let garbage = Bytes::from_static(&[0x2a, 0x09, 0x0a]);
        assert!(one_output(&garbage, "", 100)
            .unwrap_err()
            .starts_with("the answer is not a ModelInferResponse"));
        let answer = OipGrpc.read_answer(&garbage).unwrap();
        assert!(answer.outputs(Wanted::All, 100).is_err());
        // A datatype that is not UTF-8: an error either way.
        let mut bad = tensor("x", "FP32", vec![1], vec![1.0]).encode_to_vec();
        let at = bad.windows(4).position(|w| w == b"FP32").unwrap();
        bad[at] = 0xff;
        let mut bad_answer = Vec::new();
        prost::encoding::bytes::encode(5, &bad, &mut bad_answer);
        let bad_answer = Bytes::from(bad_answer);
        assert!(ModelInferResponse::decode(bad_answer.clone()).is_err());
        assert!(one_output(&bad_answer, "x", 100)
            .unwrap_err()
            .starts_with("the answer is not a ModelInferResponse"));
    }

    fn msg(resp: &ModelInferResponse) -> Bytes {
        Bytes::from(resp.encode_to_vec())
    }

    fn classify(path: &str) -> Call {
        super::super::classify(path).1
    }

    #[test]
    fn paths_classify() {
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelInfer"),
            Call::Infer
        );
        assert!(matches!(
            classify("/inference.GRPCInferenceService/ModelReady"),
            Call::Model(ModelCall {
                fields: (1, Some(2)),
                ..
            })
        ));
        assert!(matches!(
            classify("/inference.GRPCInferenceService/RepositoryModelLoad"),
            Call::Model(ModelCall {
                fields: (2, None),
                optional: false,
                ..
            })
        ));
        assert_eq!(
            classify("/inference.GRPCInferenceService/RepositoryIndex"),
            Call::Unnamed
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ServerLive"),
            Call::Server(ServerCall::Live)
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelStreamInfer"),
            Call::Stream
        );
        assert_eq!(classify("/grpc.health.v1.Health/Check"), Call::Local);
        assert_eq!(
            classify("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Call::Local
        );
        assert_eq!(classify("/pkg.Svc/Method"), Call::PassThrough);
        assert_eq!(classify("/"), Call::PassThrough);
    }

    #[test]
    fn backends_get_their_own_name_and_version() {
        let mut route = Route {
            model: "iris".into(),
            version: 1,
            version_label: "1".into(),
            endpoint: "http://h:1".into(),
            backend_model: None,
            backend_version: None,
            backend_protocol: Default::default(),
            prediction: Default::default(),
            feature_names: Default::default(),
            metrics: Default::default(),
        };
        assert!(backend_edits(&route, INFER_FIELDS, "iris", "").is_empty());
        // A version the caller named is modelgate's: without a backend version, none is sent.
        assert_eq!(
            backend_edits(&route, INFER_FIELDS, "iris", "1"),
            vec![(2, "")]
        );
        route.backend_model = Some("iris_onnx".into());
        route.backend_version = Some("v3".into());
        assert_eq!(
            backend_edits(&route, INFER_FIELDS, "iris", "1"),
            vec![(1, "iris_onnx"), (2, "v3")]
        );
        assert!(backend_edits(&route, INFER_FIELDS, "iris_onnx", "v3").is_empty());
        // Repository calls have no version field.
        assert_eq!(
            backend_edits(&route, (2, None), "iris", ""),
            vec![(2, "iris_onnx")]
        );
    }

    /// The scanned request answers every question as the decoded message did: the strings (the
    /// last occurrence), a parameter (the last map entry for its key), the shapes checked
    /// (packed or not, negative dimensions), and the inputs.
    #[test]
    fn a_scanned_request_reads_as_the_decoded_message() {
        use crate::pb::inference::infer_parameter::ParameterChoice;
        use crate::pb::inference::model_infer_request::InferInputTensor;
        let param = |c: ParameterChoice| InferParameter {
            parameter_choice: Some(c),
        };
        let tensor = |name: &str, shape: Vec<i64>| InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            contents: Some(InferTensorContents {
                fp32_contents: vec![0.5; shape.iter().product::<i64>().max(0) as usize],
                ..Default::default()
            }),
            shape,
            ..Default::default()
        };
        let m = ModelInferRequest {
            model_name: "iris".into(),
            model_version: "2".into(),
            id: "r-9".into(),
            parameters: [
                (
                    "user".to_string(),
                    param(ParameterChoice::StringParam("u-1".into())),
                ),
                ("n".to_string(), param(ParameterChoice::Int64Param(-3))),
                ("b".to_string(), param(ParameterChoice::BoolParam(true))),
                (
                    "empty".to_string(),
                    param(ParameterChoice::StringParam(String::new())),
                ),
            ]
            .into(),
            inputs: vec![tensor("x", vec![2, 2]), tensor("y", vec![1, 3])],
            ..Default::default()
        };
        let r = OipRequest::from(&m);
        assert_eq!((r.model(), r.version(), r.id()), ("iris", "2", "r-9"));
        for key in ["user", "n", "b", "empty", "missing"] {
            assert_eq!(
                r.parameter(key),
                oip::parameter(&m.parameters, key),
                "{key}"
            );
        }
        assert_eq!(r.parameter("n").as_deref(), Some("-3"));
        assert!(r.check(4).is_ok());
        assert_eq!(
            r.inputs(100).unwrap(),
            inputs(&m, 100).unwrap(),
            "the tensors, decoded on demand"
        );
        let too_large = r.check(3).unwrap_err().to_string();
        assert!(
            too_large.contains("tensor 'x': 4 elements exceed the limit of 3"),
            "{too_large}"
        );

        // Repeated strings and map entries: the last one wins. Unpacked shapes and negative
        // dimensions read as prost reads them.
        let mut msg = m.encode_to_vec();
        msg.extend_from_slice(
            &ModelInferRequest {
                model_name: "setosa".into(),
                parameters: [(
                    "user".to_string(),
                    param(ParameterChoice::StringParam("u-2".into())),
                )]
                .into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        // `inputs` (5) holding `name` "z" and an unpacked shape [-1].
        msg.extend_from_slice(&[0x2a, 0x0e, 0x0a, 0x01, b'z', 0x18]);
        msg.extend_from_slice(&[0xff; 9]);
        msg.push(0x01);
        let decoded = ModelInferRequest::decode(&msg[..]).unwrap();
        assert_eq!(decoded.inputs[2].shape, vec![-1]);
        let r = OipRequest::scan(msg.into()).unwrap();
        assert_eq!(r.model(), decoded.model_name);
        assert_eq!(r.parameter("user").as_deref(), Some("u-2"));
        let bad = r.check(100).unwrap_err().to_string();
        assert_eq!(bad, "tensor 'z': invalid shape [-1]");
    }

    #[test]
    fn a_malformed_request_is_refused_where_it_is_read() {
        let scan = |b: &[u8]| {
            OipRequest::scan(Bytes::copy_from_slice(b))
                .map(|_| ())
                .unwrap_err()
        };
        assert_eq!(
            scan(&[0xff, 0xff, 0xff, 0xff]),
            wire::WireError::Malformed(0)
        );
        // `model_name` as a varint, not a string.
        assert_eq!(scan(&[0x08, 0x01]), wire::WireError::WrongType(1));
        assert_eq!(scan(&[0x0a, 0x01, 0xff]), wire::WireError::NotUtf8(1));
        // A length past the end.
        assert!(matches!(
            scan(&[0x0a, 0x05, b'a']),
            wire::WireError::Malformed(_)
        ));
        // A tensor whose own fields are malformed: found by the shape check.
        let r = OipRequest::scan(Bytes::from_static(&[
            0x0a, 0x01, b'm', 0x2a, 0x02, 0x1a, 0x05,
        ]))
        .unwrap();
        let e = r.check(10).unwrap_err();
        assert!(matches!(e, ProtocolError::Wire { .. }), "{e}");
        // Tensor values are read only when the inputs are: then the error says so.
        let r = OipRequest::scan(Bytes::from_static(&[
            0x0a, 0x01, b'm', 0x2a, 0x06, 0x2a, 0x04, 0x32, 0x03, 0x00, 0x00,
        ]))
        .unwrap();
        assert!(r.check(10).is_ok());
        let e = r.inputs(10).unwrap_err();
        assert!(e.contains("not a valid inference.ModelInferRequest"), "{e}");
    }
}
