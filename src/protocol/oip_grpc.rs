//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, KServe v2 and
//! Triton): the first [`Protocol`].
//!
//! `ModelInfer` requests are scanned at the wire level on the request path — the model and
//! version they name route them, their declared shapes are checked — and kept as they are for
//! the record writer, which reads their tensors at the wire level too, straight into their values
//! (`crate::oip::Contents::Wire`). The other calls that name a model are read and rewritten at
//! the wire level (`crate::wire`), field by field, so that fields modelgate's protos do not
//! declare survive.

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
/// wire level), the tensors by [`InferRequest::inputs`] (on the writer's thread, at the wire
/// level too: each tensor's values go from the message into its `Tensor`).
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

    /// The entries of `parameters` (4), a map: each its `key` (1) and its `value` (2, an
    /// encoded `InferParameter`). None at all, without a scan, when the request has no
    /// parameters (most calls; the unit id is looked for in them at every call's end).
    fn parameter_entries(
        &self,
    ) -> impl Iterator<Item = Result<(&[u8], &[u8]), wire::WireError>> + '_ {
        let fields = self.has_parameters.then(|| wire::scan(&self.msg));
        fields.into_iter().flatten().filter_map(|f| {
            let entry = match f {
                Ok(f) if f.number == 4 => f.payload.unwrap_or_default(),
                Ok(_) => return None,
                Err(e) => return Some(Err(e)),
            };
            let read = || {
                let key = wire::bytes_field(entry, 1)?.unwrap_or_default();
                Ok((key, wire::bytes_field(entry, 2)?.unwrap_or_default()))
            };
            Some(read())
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
        // The last entry for a key wins, as when decoding.
        let mut value = None;
        for entry in self.parameter_entries() {
            let (k, v) = entry.ok()?;
            if k == key.as_bytes() {
                value = Some(v);
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
        for f in wire::scan(&self.msg) {
            let f = f.map_err(invalid)?;
            if f.number != 5 {
                continue;
            }
            let tensor = f.payload.unwrap_or_default();
            // Counted as the dimensions are read, without keeping them (every routed call
            // checks its shapes): a zero dimension counts as 1, as `check_shape` counts it.
            let (mut negative, mut n) = (false, 1usize);
            let count = |d: i64| {
                negative |= d < 0;
                n = n.saturating_mul(usize::try_from(d).unwrap_or(0).max(1));
            };
            let (name, _) = tensor_fields(tensor, count, None).map_err(invalid)?;
            if negative || n > max_elements {
                // The error names the shape: read again, whole.
                let mut shape = Shape::new();
                tensor_fields(tensor, |d| shape.push(d), None).map_err(invalid)?;
                oip::check_shape(name, &shape, max_elements).map_err(ProtocolError::Tensor)?;
            }
        }
        Ok(())
    }

    fn inputs(&self, max_elements: usize) -> Result<Inputs, String> {
        // Read at the wire level, on the writer's thread, once per record: each tensor's values
        // go straight from the message into its `Tensor` (decoding the whole message first
        // copied every string and grew every vector element by element, then converted it).
        let invalid = |e: wire::WireError| format!("request is not a valid {INFER_MESSAGE}: {e}");
        let [tensors, raw] = wire::repeated_fields(&self.msg, [5, 7]).map_err(invalid)?;
        if !raw.is_empty() && raw.len() != tensors.len() {
            return Err(oip::OipError::RawCount {
                raw: raw.len(),
                tensors: tensors.len(),
            }
            .to_string());
        }
        let decoded = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| wire_tensor(&self.msg, t, raw.get(i), max_elements, invalid))
            .collect::<Result<_, _>>()?;
        let mut parameters = std::collections::BTreeMap::new();
        for entry in self.parameter_entries() {
            let (key, value) = entry.map_err(invalid)?;
            let key = std::str::from_utf8(key).map_err(|_| invalid(wire::WireError::NotUtf8(1)))?;
            let value = InferParameter::decode(value)
                .map_err(|e| format!("request is not a valid {INFER_MESSAGE}: {e}"))?;
            // The last entry for a key wins, as when decoding; an empty string is none.
            match oip::parameter_text(&value) {
                Some(text) => parameters.insert(key.to_string(), text),
                None => parameters.remove(key),
            };
        }
        Ok(Inputs {
            tensors: decoded,
            parameters,
        })
    }
}

/// The occurrences of a tensor's `contents` (one, almost always), inline.
type Parts<'t> = smallvec::SmallVec<[&'t [u8]; 2]>;

/// A tensor's shape, inline (it rarely has more than a few dimensions).
type Shape = smallvec::SmallVec<[i64; 6]>;

/// An `InferInputTensor` or `InferOutputTensor` read at the wire level: its `name` (1) and
/// `datatype` (2), the last occurrence of each, as decoding reads them; each dimension of its
/// `shape` (3, packed or not) given to `dimension` in order; each occurrence of its `contents`
/// (5), when asked, into `contents`. Its `parameters` (4) are not read: nothing taken from a
/// tensor uses them.
fn tensor_fields<'t>(
    tensor: &'t [u8],
    mut dimension: impl FnMut(i64),
    mut contents: Option<&mut Parts<'t>>,
) -> Result<(&'t str, &'t str), wire::WireError> {
    if let Some(c) = contents.as_deref_mut() {
        c.clear();
    }
    let (mut name, mut datatype) = (&[][..], &[][..]);
    for f in wire::scan(tensor) {
        let f = f?;
        match (f.number, f.varint, f.payload) {
            (1, _, Some(p)) => name = p,
            (2, _, Some(p)) => datatype = p,
            // An `int64`: a negative dimension is a ten-byte two's complement varint.
            (3, Some(d), _) => dimension(d as i64),
            (3, _, Some(packed)) => wire::varints(packed, |d| dimension(d as i64))?,
            (5, _, Some(p)) => {
                if let Some(c) = contents.as_deref_mut() {
                    c.push(p);
                }
            }
            (1..=3 | 5, _, _) => return Err(wire::WireError::WrongType(f.number)),
            _ => {}
        }
    }
    let text = |b, number| std::str::from_utf8(b).map_err(|_| wire::WireError::NotUtf8(number));
    Ok((text(name, 1)?, text(datatype, 2)?))
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
        let this = wire::bytes_field(&msg[t.clone()], 1).map_err(not_a_response)?;
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
    let tensor = wire_tensor(msg, &tensors[i], raw.get(i), max_elements, not_a_response)?;
    Ok(Outputs {
        tensors: vec![tensor],
    })
}

/// Decodes the tensor at `tensor` in `msg` (an `InferInputTensor` or `InferOutputTensor`, read
/// by [`tensor_fields`]), its data in its `contents` or in `raw` (its raw contents entry);
/// `invalid` says what a malformed tensor is.
fn wire_tensor(
    msg: &Bytes,
    tensor: &std::ops::Range<usize>,
    raw: Option<&std::ops::Range<usize>>,
    max_elements: usize,
    invalid: impl Fn(wire::WireError) -> String,
) -> Result<oip::Tensor, String> {
    let (mut shape, mut chunks) = (Shape::new(), Parts::new());
    let (name, datatype) =
        tensor_fields(&msg[tensor.clone()], |d| shape.push(d), Some(&mut chunks))
            .map_err(invalid)?;
    let contents = oip::Contents::Wire {
        message: msg,
        chunks: &chunks,
    };
    let raw = raw.map(|r| msg.slice(r.clone()));
    oip::decode_tensor(name, datatype, &shape, contents, raw.as_ref(), max_elements)
        .map_err(|e| e.to_string())
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
        // Tensor values are read only when the inputs are: then the error says so. An FP32
        // tensor "x" of shape [1] whose `fp32_contents` claims 3 bytes and has 2.
        let r = OipRequest::scan(Bytes::from_static(&[
            0x0a, 0x01, b'm', 0x2a, 0x12, 0x0a, 0x01, b'x', 0x12, 0x04, b'F', b'P', b'3', b'2',
            0x1a, 0x01, 0x01, 0x2a, 0x04, 0x32, 0x03, 0x00, 0x00,
        ]))
        .unwrap();
        assert!(r.check(10).is_ok());
        let e = r.inputs(10).unwrap_err();
        assert_eq!(
            e,
            "tensor 'x': malformed contents: malformed protobuf message at byte 0"
        );
        // A tensor's `datatype` as a varint: refused by the shape check, as by the writer.
        let r = OipRequest::scan(Bytes::from_static(&[0x2a, 0x02, 0x10, 0x01])).unwrap();
        assert_eq!(
            r.check(10).unwrap_err().to_string(),
            "request is not a valid inference.ModelInferRequest: field 2 has the wrong wire type"
        );
        let e = r.inputs(10).unwrap_err();
        assert_eq!(
            e,
            "request is not a valid inference.ModelInferRequest: field 2 has the wrong wire type"
        );
    }

    /// A protobuf field, for messages encoded by hand: key, then the payload as given.
    fn field(number: u32, wire_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(u64::from(number) << 3 | u64::from(wire_type), &mut out);
        if wire_type == 2 {
            prost::encoding::encode_varint(payload.len() as u64, &mut out);
        }
        out.extend_from_slice(payload);
        out
    }

    /// The inputs read at the wire level are the inputs of the decoded message, for every
    /// datatype, typed or raw, packed or not, with `contents` sent in two parts.
    #[test]
    fn inputs_read_on_the_wire_are_the_decoded_inputs() {
        use crate::pb::inference::infer_parameter::ParameterChoice;
        use crate::pb::inference::model_infer_request::InferInputTensor;
        let typed = |name: &str, datatype: &str, shape: Vec<i64>, c: InferTensorContents| {
            InferInputTensor {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                contents: Some(c),
                ..Default::default()
            }
        };
        let c = InferTensorContents::default;
        let m = ModelInferRequest {
            model_name: "m".into(),
            parameters: [(
                "user".to_string(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::StringParam("u-1".into())),
                },
            )]
            .into(),
            inputs: vec![
                typed(
                    "f32",
                    "FP32",
                    vec![1, 3],
                    InferTensorContents {
                        fp32_contents: vec![0.5, -1.25, 3e30],
                        ..c()
                    },
                ),
                typed(
                    "f64",
                    "FP64",
                    vec![2],
                    InferTensorContents {
                        fp64_contents: vec![1e-300, -2.0],
                        ..c()
                    },
                ),
                typed(
                    "i32",
                    "INT32",
                    vec![3],
                    InferTensorContents {
                        int_contents: vec![-1, i32::MIN, 7],
                        ..c()
                    },
                ),
                typed(
                    "i8",
                    "INT8",
                    vec![1],
                    InferTensorContents {
                        int_contents: vec![-128],
                        ..c()
                    },
                ),
                typed(
                    "i64",
                    "INT64",
                    vec![2],
                    InferTensorContents {
                        int64_contents: vec![i64::MIN, 5],
                        ..c()
                    },
                ),
                typed(
                    "u32",
                    "UINT32",
                    vec![1],
                    InferTensorContents {
                        uint_contents: vec![u32::MAX],
                        ..c()
                    },
                ),
                typed(
                    "u64",
                    "UINT64",
                    vec![1],
                    InferTensorContents {
                        uint64_contents: vec![u64::MAX],
                        ..c()
                    },
                ),
                typed(
                    "b",
                    "BOOL",
                    vec![2],
                    InferTensorContents {
                        bool_contents: vec![true, false],
                        ..c()
                    },
                ),
                typed(
                    "s",
                    "BYTES",
                    vec![2],
                    InferTensorContents {
                        bytes_contents: vec![Bytes::from("red"), Bytes::new()],
                        ..c()
                    },
                ),
                typed("empty", "FP32", vec![0, 4], c()),
            ],
            ..Default::default()
        };
        let same = |msg: Vec<u8>| {
            let decoded = ModelInferRequest::decode(&msg[..]).unwrap();
            let scanned = OipRequest::scan(msg.into()).unwrap();
            assert_eq!(scanned.inputs(100), inputs(&decoded, 100));
            scanned.inputs(100)
        };
        let got = same(m.encode_to_vec()).unwrap();
        assert_eq!(got.tensors.len(), 10);
        assert_eq!(
            got.tensors[2].numeric().unwrap(),
            &[-1.0, i32::MIN as f64, 7.0]
        );
        assert_eq!(got.parameters["user"], "u-1");

        // Raw contents: one per tensor.
        let raw = ModelInferRequest {
            inputs: vec![
                typed("a", "FP32", vec![2], c()),
                typed("b", "INT64", vec![1], c()),
            ],
            raw_input_contents: vec![oip::f32_raw(&[1.5, 2.5]), oip::i64_raw(&[-9])],
            ..Default::default()
        };
        assert_eq!(same(raw.encode_to_vec()).unwrap().tensors.len(), 2);
        let mut short = raw.clone();
        short.raw_input_contents.pop();
        assert!(same(short.encode_to_vec())
            .unwrap_err()
            .contains("1 raw contents for 2"));

        // Unpacked elements, and `contents` in two parts (a message sent twice merges): an
        // FP32 tensor of 3 whose first part holds 1.0 unpacked, the second 2.0 and 3.0 packed;
        // an INT32 tensor of 2 with -5 and 6 unpacked.
        let one = field(6, 5, &1f32.to_le_bytes());
        let two = field(6, 2, &[2f32.to_le_bytes(), 3f32.to_le_bytes()].concat());
        let mut tensor = [field(1, 2, b"x"), field(2, 2, b"FP32"), field(3, 0, &[3])].concat();
        tensor.extend(field(5, 2, &one));
        tensor.extend(field(5, 2, &two));
        let mut ints = [field(1, 2, b"i"), field(2, 2, b"INT32"), field(3, 2, &[2])].concat();
        let mut neg = field(2, 0, &[]);
        prost::encoding::encode_varint(-5i64 as u64, &mut neg);
        ints.extend(field(5, 2, &[neg, field(2, 0, &[6])].concat()));
        let msg = [field(5, 2, &tensor), field(5, 2, &ints)].concat();
        let got = same(msg).unwrap();
        assert_eq!(got.tensors[0].numeric().unwrap(), &[1.0, 2.0, 3.0]);
        assert_eq!(got.tensors[1].numeric().unwrap(), &[-5.0, 6.0]);

        // Too few values for the shape, and the wrong field for the datatype: the same errors.
        let mut few = m.clone();
        few.inputs[0].shape = vec![1, 4];
        assert!(same(few.encode_to_vec()).is_err());
        let mut wrong = m.clone();
        wrong.inputs[0].datatype = "INT32".into();
        let e = same(wrong.encode_to_vec()).unwrap_err();
        assert!(e.contains("needs 3 elements in int_contents, got 0"), "{e}");
        // A shape claiming far more than the bytes hold is refused, not allocated for.
        let mut huge = m.clone();
        huge.inputs[0].shape = vec![1 << 20, 64];
        assert!(OipRequest::from(&huge).inputs(usize::MAX).is_err());
    }
}
