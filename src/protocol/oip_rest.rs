//! The Open Inference Protocol over HTTP/JSON (KServe v2 REST): its infer request and response
//! bodies to and from the protobuf messages of OIP gRPC. A REST call is served by translating it
//! to OIP gRPC (`proxy::rest`), so that it gets everything a gRPC call gets; this module holds
//! the translation, and nothing of HTTP.
//!
//! JSON tensors: `{"name", "shape", "datatype", "parameters", "data"}`, `data` flat or nested
//! (row-major), numbers for the numeric types, `true`/`false` (or 0/1) for BOOL, strings for
//! BYTES. FP16 and BF16 travel as numbers and are sent on as raw little-endian halves. The binary
//! tensor extension (`Inference-Header-Content-Length`) is read too: the JSON header first, then
//! each input with a `binary_data_size` parameter as raw bytes, in order.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::pb::inference::infer_parameter::ParameterChoice;
use crate::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::pb::inference::model_infer_response::InferOutputTensor;
use crate::pb::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use crate::tensor::{DataType, Values};

/// Why a REST body cannot be read: the message names the field.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// Which outputs a REST caller asked to get back as binary tensors: every one (the request
/// parameter `binary_data_output`), or those whose `parameters` say `binary_data`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BinaryOutputs {
    /// Every output.
    pub all: bool,
    /// These outputs.
    pub names: Vec<String>,
}

impl BinaryOutputs {
    /// Whether output `name` goes back binary.
    pub fn wants(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n == name)
    }

    /// Whether any output does.
    pub fn any(&self) -> bool {
        self.all || !self.names.is_empty()
    }
}

/// Reads a REST infer body for `model` (and `version`, empty for any): JSON, or the binary
/// tensor extension's JSON header of `header_len` bytes followed by binary tensors.
pub fn infer_request(
    model: &str,
    version: &str,
    body: &[u8],
    header_len: Option<usize>,
) -> Result<ModelInferRequest, BadRequest> {
    infer_request_binary(model, version, body, header_len).map(|(r, _)| r)
}

fn is_true(p: Option<InferParameter>) -> bool {
    matches!(
        p.and_then(|p| p.parameter_choice),
        Some(ParameterChoice::BoolParam(true))
    )
}

/// [`infer_request`], and the outputs the caller wants back as binary tensors (those wishes are
/// the REST side's: they are not passed on).
pub fn infer_request_binary(
    model: &str,
    version: &str,
    body: &[u8],
    header_len: Option<usize>,
) -> Result<(ModelInferRequest, BinaryOutputs), BadRequest> {
    let (v, binary) = json_and_binary(body, header_len)?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    let mut req = ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: match obj.get("id") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("'id' must be a string")),
        },
        parameters: parameters(obj.get("parameters"), "parameters")?,
        ..Default::default()
    };
    let mut binary_outputs = BinaryOutputs {
        all: is_true(req.parameters.remove("binary_data_output")),
        names: Vec::new(),
    };
    let inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("'inputs' must be an array of tensors"))?;
    let (tensors, raw) = tensors(inputs, "inputs", binary)?;
    req.inputs = tensors
        .into_iter()
        .map(|t| InferInputTensor {
            name: t.name,
            datatype: t.datatype,
            shape: t.shape,
            parameters: t.parameters,
            contents: t.contents,
        })
        .collect();
    req.raw_input_contents = raw;
    if let Some(outputs) = obj.get("outputs") {
        let outputs = outputs
            .as_array()
            .ok_or_else(|| bad("'outputs' must be an array"))?;
        for (i, o) in outputs.iter().enumerate() {
            let field = format!("outputs[{i}]");
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("'{field}.name' must be a string")))?;
            let mut params = parameters(o.get("parameters"), &format!("{field}.parameters"))?;
            if is_true(params.remove("binary_data")) {
                binary_outputs.names.push(name.to_string());
            }
            req.outputs.push(InferRequestedOutputTensor {
                name: name.to_string(),
                parameters: params,
            });
        }
    }
    Ok((req, binary_outputs))
}

/// A body's JSON part (all of it, or its first `header_len` bytes with the binary tensor
/// extension) parsed, and the binary rest.
fn json_and_binary(body: &[u8], header_len: Option<usize>) -> Result<(Value, &[u8]), BadRequest> {
    let (json_part, binary) = match header_len {
        Some(n) if n <= body.len() => (&body[..n], &body[n..]),
        Some(n) => {
            return Err(bad(format!(
                "Inference-Header-Content-Length {n} is longer than the body ({} bytes)",
                body.len()
            )))
        }
        None => (body, &[][..]),
    };
    let v: Value =
        serde_json::from_slice(json_part).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    Ok((v, binary))
}

/// Reads a REST infer answer (from an OIP REST backend) as the OIP gRPC response: the inverse
/// of [`infer_response`].
pub fn infer_response_from_json(
    body: &[u8],
    header_len: Option<usize>,
) -> Result<ModelInferResponse, BadRequest> {
    let (mut v, binary) = json_and_binary(body, header_len)?;
    // A server's answer may carry parameters OIP gRPC cannot (MLServer's nested `headers`): they
    // are left out rather than failing the answer.
    scalar_parameters_only(&mut v);
    if let Some(outputs) = v.get_mut("outputs").and_then(Value::as_array_mut) {
        outputs.iter_mut().for_each(scalar_parameters_only);
    }
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    let text = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(format!("'{key}' must be a string"))),
    };
    let outputs = obj
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("'outputs' must be an array of tensors"))?;
    let (tensors, raw) = tensors(outputs, "outputs", binary)?;
    Ok(ModelInferResponse {
        model_name: text("model_name")?,
        model_version: text("model_version")?,
        id: text("id")?,
        parameters: parameters(obj.get("parameters"), "parameters")?,
        outputs: tensors
            .into_iter()
            .map(|t| InferOutputTensor {
                name: t.name,
                datatype: t.datatype,
                shape: t.shape,
                parameters: t.parameters,
                contents: t.contents,
            })
            .collect(),
        raw_output_contents: raw,
    })
}

/// Drops the `parameters` of `v` that are not booleans, integers or strings.
fn scalar_parameters_only(v: &mut Value) {
    if let Some(p) = v.get_mut("parameters").and_then(Value::as_object_mut) {
        p.retain(|_, x| x.is_boolean() || x.is_string() || x.as_i64().is_some());
    }
}

/// An OIP gRPC infer request as a REST infer body (for an OIP REST backend): the inverse of
/// [`infer_request`]. Every tensor travels as JSON; `max_elements` bounds each input.
pub fn infer_request_json(req: &ModelInferRequest, max_elements: usize) -> Result<Value, String> {
    let tensors = crate::oip::request_inputs(req, max_elements).map_err(|e| e.to_string())?;
    let inputs: Vec<Value> = tensors
        .iter()
        .zip(&req.inputs)
        .map(|(t, i)| tensor_json(&i.name, &i.datatype, &i.shape, &i.parameters, Some(t)))
        .collect();
    let mut body = Map::new();
    if !req.id.is_empty() {
        body.insert("id".into(), json!(req.id));
    }
    if !req.parameters.is_empty() {
        body.insert("parameters".into(), parameters_json(&req.parameters));
    }
    body.insert("inputs".into(), Value::Array(inputs));
    if !req.outputs.is_empty() {
        let outputs = req
            .outputs
            .iter()
            .map(|o| {
                let mut out = Map::new();
                out.insert("name".into(), json!(o.name));
                if !o.parameters.is_empty() {
                    out.insert("parameters".into(), parameters_json(&o.parameters));
                }
                Value::Object(out)
            })
            .collect();
        body.insert("outputs".into(), Value::Array(outputs));
    }
    Ok(Value::Object(body))
}

fn parameters_json(p: &HashMap<String, InferParameter>) -> Value {
    p.iter()
        .map(|(k, v)| (k.clone(), parameter_json(v)))
        .collect::<Map<_, _>>()
        .into()
}

/// A decoded tensor as a JSON tensor: numbers (integers exact below 2^53), booleans for BOOL,
/// strings for BYTES (not UTF-8: replaced characters).
fn tensor_json(
    name: &str,
    datatype: &str,
    shape: &[i64],
    params: &HashMap<String, InferParameter>,
    data: Option<&crate::tensor::Tensor>,
) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), json!(name));
    out.insert("datatype".into(), json!(datatype));
    out.insert("shape".into(), json!(shape));
    if !params.is_empty() {
        out.insert("parameters".into(), parameters_json(params));
    }
    let Some(t) = data else {
        return Value::Object(out);
    };
    let data: Vec<Value> = match &t.values {
        Values::Numeric(v) => v
            .iter()
            .map(|x| match t.datatype {
                DataType::Bool => json!(*x != 0.0),
                DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64 => json!(x),
                // Integers were widened to f64 by the decoder: exact below 2^53.
                _ => {
                    if *x < 0.0 {
                        json!(*x as i64)
                    } else {
                        json!(*x as u64)
                    }
                }
            })
            .collect(),
        Values::Bytes(v) => v
            .iter()
            .map(|b| json!(String::from_utf8_lossy(b)))
            .collect(),
    };
    out.insert("data".into(), Value::Array(data));
    Value::Object(out)
}

/// A JSON tensor read: the fields an input and an output tensor share.
struct JsonTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    parameters: HashMap<String, InferParameter>,
    contents: Option<InferTensorContents>,
}

/// Reads the JSON tensors of `field` (`inputs` of a request, `outputs` of an answer), taking the
/// elements of those with a `binary_data_size` parameter from `binary`, in order. Returns them
/// with their raw contents: none when every tensor is typed, else one per tensor (OIP gRPC's raw
/// contents are all or nothing, so typed ones are converted).
fn tensors(
    list: &[Value],
    field: &str,
    mut binary: &[u8],
) -> Result<(Vec<JsonTensor>, Vec<Bytes>), BadRequest> {
    let mut out = Vec::with_capacity(list.len());
    let mut raws: Vec<Bytes> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let t = t
            .as_object()
            .ok_or_else(|| bad(format!("'{field}' must be an object")))?;
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'{field}.name' must be a string")))?
            .to_string();
        let datatype = t
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'{field}.datatype' must be a string")))?
            .to_string();
        let dt = DataType::parse(&datatype)
            .ok_or_else(|| bad(format!("'{field}.datatype': unknown datatype '{datatype}'")))?;
        let shape: Vec<i64> = t
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("'{field}.shape' must be an array of integers")))?
            .iter()
            .map(|d| d.as_i64().filter(|d| *d >= 0))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("'{field}.shape' must hold non-negative integers")))?;
        let mut params = parameters(t.get("parameters"), &format!("{field}.parameters"))?;
        let binary_size =
            params
                .remove("binary_data_size")
                .and_then(|p| match p.parameter_choice {
                    Some(ParameterChoice::Int64Param(n)) => usize::try_from(n).ok(),
                    _ => None,
                });
        let mut tensor = JsonTensor {
            name,
            datatype,
            shape,
            parameters: params,
            contents: None,
        };
        if let Some(n) = binary_size {
            if n > binary.len() {
                return Err(bad(format!(
                    "'{field}': binary_data_size {n} is more than the {} bytes left",
                    binary.len()
                )));
            }
            raws.push(Bytes::copy_from_slice(&binary[..n]));
            binary = &binary[n..];
        } else {
            let data = t
                .get("data")
                .ok_or_else(|| bad(format!("'{field}.data' is missing")))?;
            let mut flat = Vec::new();
            flatten(data, &mut flat);
            let (contents, raw) = contents(dt, &flat, &format!("{field}.data"))?;
            tensor.contents = contents;
            raws.push(raw.unwrap_or_default());
        }
        out.push(tensor);
    }
    // Raw contents are all or nothing in OIP gRPC: typed contents become raw when any tensor
    // came binary (or was FP16/BF16).
    if raws.iter().any(|r| !r.is_empty()) {
        for (t, raw) in out.iter_mut().zip(raws.iter_mut()) {
            if let Some(c) = t.contents.take() {
                *raw = typed_to_raw(&t.datatype, &c);
            }
        }
        Ok((out, raws))
    } else {
        Ok((out, Vec::new()))
    }
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.clone()),
    }
}

fn parameters(
    v: Option<&Value>,
    field: &str,
) -> Result<HashMap<String, InferParameter>, BadRequest> {
    let Some(v) = v else {
        return Ok(HashMap::new());
    };
    if v.is_null() {
        return Ok(HashMap::new());
    }
    let obj = v
        .as_object()
        .ok_or_else(|| bad(format!("'{field}' must be an object")))?;
    obj.iter()
        .map(|(k, v)| {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => ParameterChoice::Int64Param(i),
                    None => ParameterChoice::StringParam(n.to_string()),
                },
                _ => {
                    return Err(bad(format!(
                        "'{field}.{k}' must be a boolean, an integer or a string"
                    )))
                }
            };
            Ok((
                k.clone(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// Typed contents (or, for FP16 / BF16, raw bytes) of JSON elements.
fn contents(
    dt: DataType,
    flat: &[Value],
    field: &str,
) -> Result<(Option<InferTensorContents>, Option<Bytes>), BadRequest> {
    let mut c = InferTensorContents::default();
    let number = |i: usize, v: &Value| {
        v.as_f64()
            .ok_or_else(|| bad(format!("'{field}[{i}]' must be a number")))
    };
    let integer = |i: usize, v: &Value, min: i128, max: i128| {
        let n = v
            .as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
            .ok_or_else(|| bad(format!("'{field}[{i}]' must be an integer")))?;
        if n < min || n > max {
            return Err(bad(format!(
                "'{field}[{i}]': {n} is out of range for {}",
                dt.as_str()
            )));
        }
        Ok(n)
    };
    for (i, v) in flat.iter().enumerate() {
        match dt {
            DataType::Bool => c.bool_contents.push(match v {
                Value::Bool(b) => *b,
                Value::Number(n) if n.as_u64() == Some(0) => false,
                Value::Number(n) if n.as_u64() == Some(1) => true,
                _ => return Err(bad(format!("'{field}[{i}]' must be true or false"))),
            }),
            DataType::I8 => c.int_contents.push(integer(i, v, -128, 127)? as i32),
            DataType::I16 => c.int_contents.push(integer(i, v, -32768, 32767)? as i32),
            DataType::I32 => c
                .int_contents
                .push(integer(i, v, i32::MIN.into(), i32::MAX.into())? as i32),
            DataType::I64 => c
                .int64_contents
                .push(integer(i, v, i64::MIN.into(), i64::MAX.into())? as i64),
            DataType::U8 => c.uint_contents.push(integer(i, v, 0, 255)? as u32),
            DataType::U16 => c.uint_contents.push(integer(i, v, 0, 65535)? as u32),
            DataType::U32 => c
                .uint_contents
                .push(integer(i, v, 0, u32::MAX.into())? as u32),
            DataType::U64 => c
                .uint64_contents
                .push(integer(i, v, 0, u64::MAX.into())? as u64),
            DataType::F32 => c.fp32_contents.push(number(i, v)? as f32),
            DataType::F64 | DataType::F16 | DataType::BF16 => c.fp64_contents.push(number(i, v)?),
            DataType::Bytes => c.bytes_contents.push(match v {
                Value::String(s) => Bytes::copy_from_slice(s.as_bytes()),
                _ => return Err(bad(format!("'{field}[{i}]' must be a string"))),
            }),
        }
    }
    // OIP gRPC has no typed field for halves: they travel raw.
    let raw = match dt {
        DataType::F16 => Some(
            c.fp64_contents
                .iter()
                .flat_map(|x| half::f16::from_f64(*x).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        DataType::BF16 => Some(
            c.fp64_contents
                .iter()
                .flat_map(|x| half::bf16::from_f64(*x).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        _ => None,
    };
    Ok(match raw {
        Some(r) => (None, Some(r)),
        None => (Some(c), None),
    })
}

/// Typed contents as OIP's raw little-endian bytes (BYTES: 4-byte length, then the bytes).
fn typed_to_raw(datatype: &str, c: &InferTensorContents) -> Bytes {
    let mut out = Vec::new();
    match DataType::parse(datatype) {
        Some(DataType::Bool) => out.extend(c.bool_contents.iter().map(|b| u8::from(*b))),
        Some(DataType::I8) => out.extend(c.int_contents.iter().map(|x| *x as i8 as u8)),
        Some(DataType::I16) => c
            .int_contents
            .iter()
            .for_each(|x| out.extend((*x as i16).to_le_bytes())),
        Some(DataType::I32) => c
            .int_contents
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes())),
        Some(DataType::I64) => c
            .int64_contents
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes())),
        Some(DataType::U8) => out.extend(c.uint_contents.iter().map(|x| *x as u8)),
        Some(DataType::U16) => c
            .uint_contents
            .iter()
            .for_each(|x| out.extend((*x as u16).to_le_bytes())),
        Some(DataType::U32) => c
            .uint_contents
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes())),
        Some(DataType::U64) => c
            .uint64_contents
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes())),
        Some(DataType::F32) => c
            .fp32_contents
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes())),
        Some(DataType::F64) => c
            .fp64_contents
            .iter()
            .for_each(|x| out.extend(x.to_le_bytes())),
        Some(DataType::Bytes) => c.bytes_contents.iter().for_each(|b| {
            out.extend((b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }),
        Some(DataType::F16) | Some(DataType::BF16) | None => {}
    }
    out.into()
}

fn parameter_json(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(i)) => json!(i),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        None => Value::Null,
    }
}

/// An OIP gRPC infer response as a REST response body with the outputs `binary` names as binary
/// tensors: the JSON header (those outputs with a `binary_data_size` parameter and no `data`),
/// then their raw bytes in order. Returns the body and the JSON header's length (the
/// `Inference-Header-Content-Length`).
pub fn infer_response_binary(
    resp: &ModelInferResponse,
    max_elements: usize,
    binary: &BinaryOutputs,
) -> Result<(Bytes, usize), String> {
    let (header, raw) = response_json(resp, max_elements, binary)?;
    let mut body = serde_json::to_vec(&header).expect("JSON");
    let header_len = body.len();
    raw.iter().for_each(|r| body.extend_from_slice(r));
    Ok((body.into(), header_len))
}

/// An OIP gRPC infer response as the REST response body. `max_elements` bounds each output.
pub fn infer_response(resp: &ModelInferResponse, max_elements: usize) -> Result<Value, String> {
    response_json(resp, max_elements, &BinaryOutputs::default()).map(|(v, _)| v)
}

/// The JSON body of a response, the outputs `binary` names left without `data` (their raw bytes
/// returned in order, their size in a `binary_data_size` parameter). Every output is decoded,
/// so a malformed one is an error either way; only the others are written out as JSON.
fn response_json(
    resp: &ModelInferResponse,
    max_elements: usize,
    binary: &BinaryOutputs,
) -> Result<(Value, Vec<Bytes>), String> {
    let tensors = crate::oip::response_outputs(resp, max_elements).map_err(|e| e.to_string())?;
    let mut outputs = Vec::with_capacity(tensors.len());
    let mut raw = Vec::new();
    for (i, (t, o)) in tensors.iter().zip(&resp.outputs).enumerate() {
        if !binary.wants(&o.name) {
            outputs.push(tensor_json(
                &o.name,
                &o.datatype,
                &o.shape,
                &o.parameters,
                Some(t),
            ));
            continue;
        }
        let bytes = match resp.raw_output_contents.get(i) {
            Some(r) => r.clone(),
            None => typed_to_raw(&o.datatype, &o.contents.clone().unwrap_or_default()),
        };
        let mut params = o.parameters.clone();
        params.insert(
            "binary_data_size".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(bytes.len() as i64)),
            },
        );
        outputs.push(tensor_json(&o.name, &o.datatype, &o.shape, &params, None));
        raw.push(bytes);
    }
    let mut body = Map::new();
    body.insert("model_name".into(), json!(resp.model_name));
    body.insert("model_version".into(), json!(resp.model_version));
    if !resp.id.is_empty() {
        body.insert("id".into(), json!(resp.id));
    }
    if !resp.parameters.is_empty() {
        body.insert("parameters".into(), parameters_json(&resp.parameters));
    }
    body.insert("outputs".into(), Value::Array(outputs));
    Ok((Value::Object(body), raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_tensors_become_typed_contents() {
        let body = br#"{"id":"r1","parameters":{"p":1},"inputs":[
            {"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]},
            {"name":"b","shape":[2],"datatype":"BOOL","data":[true,0]},
            {"name":"s","shape":[1],"datatype":"BYTES","data":["hi"]}],
            "outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}"#;
        let r = infer_request("m", "2", body, None).unwrap();
        assert_eq!(
            (r.model_name.as_str(), r.model_version.as_str()),
            ("m", "2")
        );
        assert_eq!(r.id, "r1");
        assert_eq!(
            r.parameters["p"].parameter_choice,
            Some(ParameterChoice::Int64Param(1))
        );
        let x = &r.inputs[0];
        assert_eq!(x.shape, vec![2, 2]);
        assert_eq!(
            x.contents.as_ref().unwrap().fp32_contents,
            vec![1.0, 2.0, 3.0, 4.5]
        );
        assert_eq!(
            r.inputs[1].contents.as_ref().unwrap().bool_contents,
            vec![true, false]
        );
        assert_eq!(
            r.inputs[2].contents.as_ref().unwrap().bytes_contents[0],
            "hi"
        );
        assert!(r.raw_input_contents.is_empty());
        assert!(r.outputs[0].parameters.is_empty(), "binary_data dropped");
        let (_, binary) = infer_request_binary("m", "", body, None).unwrap();
        assert!(binary.wants("probabilities") && !binary.wants("label"));
    }

    #[test]
    fn binary_tensors_and_halves_travel_raw() {
        let header = br#"{"inputs":[
            {"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},
            {"name":"h","shape":[1],"datatype":"FP16","data":[0.5]}]}"#;
        let mut body = header.to_vec();
        body.extend(1.5f32.to_le_bytes());
        body.extend(2.5f32.to_le_bytes());
        let r = infer_request("m", "", &body, Some(header.len())).unwrap();
        assert_eq!(r.raw_input_contents.len(), 2);
        assert_eq!(&r.raw_input_contents[0][..4], &1.5f32.to_le_bytes());
        assert_eq!(
            &r.raw_input_contents[1][..],
            &half::f16::from_f32(0.5).to_le_bytes()
        );
        assert!(r.inputs.iter().all(|t| t.contents.is_none()));
        assert!(!r.inputs[0].parameters.contains_key("binary_data_size"));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let e = |b: &str| infer_request("m", "", b.as_bytes(), None).unwrap_err().0;
        assert!(e("{").contains("not JSON"));
        assert!(e(r#"{"inputs":3}"#).contains("'inputs'"));
        assert!(
            e(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP99","data":[1]}]}"#)
                .contains("'inputs[0].datatype'")
        );
        assert!(
            e(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}"#)
                .contains("'inputs[0].data[0]'")
        );
        assert!(
            e(r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"INT8","data":[1]}]}"#)
                .contains("'inputs[0].shape'")
        );
        assert!(
            e(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#)
                .contains("'inputs[0].data'")
        );
        let long = infer_request("m", "", b"{}", Some(10)).unwrap_err().0;
        assert!(long.contains("Inference-Header-Content-Length"), "{long}");
    }

    #[test]
    fn responses_become_json_tensors() {
        use crate::pb::inference::model_infer_response::InferOutputTensor;
        let resp = ModelInferResponse {
            model_name: "m".into(),
            model_version: "3".into(),
            id: "r1".into(),
            outputs: vec![
                InferOutputTensor {
                    name: "probabilities".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    ..Default::default()
                },
                InferOutputTensor {
                    name: "label".into(),
                    datatype: "INT64".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![
                crate::oip::f32_raw(&[0.25, 0.75]),
                crate::oip::i64_raw(&[-3]),
            ],
            ..Default::default()
        };
        let v = infer_response(&resp, 1 << 20).unwrap();
        assert_eq!(v["model_version"], "3");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["outputs"][0]["data"], json!([0.25, 0.75]));
        assert_eq!(v["outputs"][0]["shape"], json!([1, 2]));
        assert_eq!(v["outputs"][1]["data"], json!([-3]));

        // And back, as an OIP REST backend's answer is read: the same tensors.
        let mut with_headers = v.clone();
        with_headers["parameters"] = json!({"content_type": "np", "headers": {"a": "b"}});
        let back = infer_response_from_json(with_headers.to_string().as_bytes(), None).unwrap();
        assert_eq!((back.model_name.as_str(), back.id.as_str()), ("m", "r1"));
        assert_eq!(back.parameters.len(), 1, "nested parameters are left out");
        assert_eq!(
            crate::oip::response_outputs(&back, 100).unwrap(),
            crate::oip::response_outputs(&resp, 100).unwrap()
        );
    }

    #[test]
    fn requests_travel_to_json_and_back_unchanged() {
        let body = br#"{"id":"r1","parameters":{"p":1},"inputs":[
            {"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4.5]},
            {"name":"n","shape":[2],"datatype":"INT64","data":[-7,9007199254740991]},
            {"name":"b","shape":[2],"datatype":"BOOL","data":[true,false]},
            {"name":"s","shape":[1],"datatype":"BYTES","data":["hi"]}],
            "outputs":[{"name":"probabilities"}]}"#;
        let req = infer_request("m", "", body, None).unwrap();
        let json = infer_request_json(&req, 100).unwrap();
        let again = infer_request("m", "", json.to_string().as_bytes(), None).unwrap();
        assert_eq!(again, req);
        // Halves travel raw in gRPC and as numbers in JSON.
        let half = br#"{"inputs":[{"name":"h","shape":[2],"datatype":"FP16","data":[0.5,-2]}]}"#;
        let req = infer_request("m", "", half, None).unwrap();
        let json = infer_request_json(&req, 100).unwrap();
        assert_eq!(json["inputs"][0]["data"], json!([0.5, -2.0]));
        assert_eq!(
            infer_request("m", "", json.to_string().as_bytes(), None).unwrap(),
            req
        );
    }
}
