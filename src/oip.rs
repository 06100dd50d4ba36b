//! Open Inference Protocol tensors: decoding `contents` and `raw_*_contents` into values.
//!
//! Raw contents are row-major and little-endian with no padding; a BYTES element is a 4-byte
//! little-endian length followed by that many bytes. Everything here checks sizes against the
//! declared shape before touching data, so a hostile message yields an [`OipError`], not a panic
//! or a huge allocation.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::pb::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, InferParameter, InferTensorContents,
    ModelInferRequest, ModelInferResponse,
};

/// Default cap on elements decoded from one tensor.
pub const DEFAULT_MAX_ELEMENTS: usize = 16 * 1024 * 1024;

pub use crate::tensor::{DataType, Tensor, Values};

/// A tensor that cannot be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OipError {
    /// Unknown datatype name.
    #[error("tensor '{tensor}': unknown datatype '{datatype}'")]
    UnknownDatatype {
        /// Tensor name.
        tensor: String,
        /// Datatype as given.
        datatype: String,
    },
    /// A negative dimension.
    #[error("tensor '{tensor}': invalid shape {shape:?}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// Shape as given.
        shape: Vec<i64>,
    },
    /// More elements than allowed.
    #[error("tensor '{tensor}': {elements} elements exceed the limit of {limit}")]
    TooLarge {
        /// Tensor name.
        tensor: String,
        /// Elements declared.
        elements: usize,
        /// The limit.
        limit: usize,
    },
    /// Contents do not match the shape.
    #[error("tensor '{tensor}': shape {shape:?} ({datatype}) needs {expected}, got {got}")]
    SizeMismatch {
        /// Tensor name.
        tensor: String,
        /// Datatype.
        datatype: &'static str,
        /// Shape.
        shape: Vec<usize>,
        /// What the shape needs.
        expected: String,
        /// What was sent.
        got: String,
    },
    /// Typed contents cannot carry this datatype.
    #[error("tensor '{tensor}': {datatype} data must be sent as raw contents")]
    RawOnly {
        /// Tensor name.
        tensor: String,
        /// Datatype.
        datatype: &'static str,
    },
    /// raw contents count does not match the tensor count.
    #[error("{raw} raw contents for {tensors} tensors; there must be one per tensor")]
    RawCount {
        /// Raw entries.
        raw: usize,
        /// Tensors.
        tensors: usize,
    },
    /// Typed contents that are not a well-formed `InferTensorContents`.
    #[error("tensor '{tensor}': malformed contents: {reason}")]
    Malformed {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A BYTES element is malformed.
    #[error("tensor '{tensor}': malformed BYTES raw contents: {reason}")]
    BadBytes {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Checks a tensor's declared shape: every dimension non-negative, and at most `limit` elements
/// (a zero dimension counted as 1). Cheap: nothing is decoded, nothing allocated (every routed
/// call checks its shapes).
pub fn check_shape(name: &str, shape: &[i64], limit: usize) -> Result<(), OipError> {
    if shape.iter().any(|&d| d < 0) {
        return Err(OipError::BadShape {
            tensor: name.to_string(),
            shape: shape.to_vec(),
        });
    }
    // A zero dimension empties the tensor but its other dimensions still count rows (a
    // [1e9, 0] batch has 1e9 empty rows), so they are held to the limit as if it were 1.
    // A product past usize is "too many elements" too, not a malformed shape.
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| {
            acc.checked_mul(usize::try_from(d).unwrap_or(usize::MAX).max(1))
        })
        .unwrap_or(usize::MAX);
    if n > limit {
        return Err(OipError::TooLarge {
            tensor: name.to_string(),
            elements: n,
            limit,
        });
    }
    Ok(())
}

/// The dimensions of a shape that [`check_shape`] accepts.
fn element_count(name: &str, shape: &[i64], limit: usize) -> Result<Vec<usize>, OipError> {
    check_shape(name, shape, limit)?;
    // Each dimension is at most `limit` now, so it fits.
    Ok(shape.iter().map(|&d| d as usize).collect())
}

/// A tensor's typed `contents` (an `InferTensorContents`).
#[derive(Clone, Copy, Debug)]
pub enum Contents<'a> {
    /// Decoded (`None` when the tensor has none).
    Decoded(Option<&'a InferTensorContents>),
    /// As it came on the wire: every occurrence of the message, in order (a message sent twice
    /// merges, so its repeated fields are read across all of them), slices of `message`. Only
    /// the field the datatype is sent in is read, straight into the values; the others are not
    /// checked.
    Wire {
        /// The buffer the occurrences are slices of (BYTES elements share it).
        message: &'a Bytes,
        /// The occurrences.
        chunks: &'a [&'a [u8]],
    },
}

/// Decodes one tensor from its typed `contents` or its `raw` bytes.
pub fn decode_tensor(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: Contents<'_>,
    raw: Option<&Bytes>,
    max_elements: usize,
) -> Result<Tensor, OipError> {
    let dt = DataType::parse(datatype).ok_or_else(|| OipError::UnknownDatatype {
        tensor: name.to_string(),
        datatype: datatype.to_string(),
    })?;
    let dims = element_count(name, shape, max_elements)?;
    let n: usize = dims.iter().product();
    let mismatch = |expected: String, got: String| OipError::SizeMismatch {
        tensor: name.to_string(),
        datatype: dt.as_str(),
        shape: dims.clone(),
        expected,
        got,
    };
    let values = match raw {
        Some(raw) => decode_raw(name, dt, n, raw, &mismatch)?,
        None => decode_contents(name, dt, n, contents, &mismatch)?,
    };
    Ok(Tensor {
        name: name.to_string(),
        datatype: dt,
        shape: dims,
        values,
    })
}

fn decode_raw(
    name: &str,
    dt: DataType,
    n: usize,
    raw: &Bytes,
    mismatch: &dyn Fn(String, String) -> OipError,
) -> Result<Values, OipError> {
    let Some(size) = dt.element_size() else {
        return decode_raw_bytes(name, n, raw, mismatch);
    };
    if raw.len() != n * size {
        return Err(mismatch(
            format!("{} raw bytes", n * size),
            format!("{}", raw.len()),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for c in raw.chunks_exact(size) {
        out.push(match dt {
            DataType::Bool => (c[0] != 0) as u8 as f64,
            DataType::U8 => c[0] as f64,
            DataType::I8 => c[0] as i8 as f64,
            DataType::U16 => u16::from_le_bytes([c[0], c[1]]) as f64,
            DataType::I16 => i16::from_le_bytes([c[0], c[1]]) as f64,
            DataType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
            DataType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
            DataType::U32 => u32::from_le_bytes(c.try_into().expect("4")) as f64,
            DataType::I32 => i32::from_le_bytes(c.try_into().expect("4")) as f64,
            DataType::F32 => f32::from_le_bytes(c.try_into().expect("4")) as f64,
            DataType::U64 => u64::from_le_bytes(c.try_into().expect("8")) as f64,
            DataType::I64 => i64::from_le_bytes(c.try_into().expect("8")) as f64,
            DataType::F64 => f64::from_le_bytes(c.try_into().expect("8")),
            DataType::Bytes => unreachable!("handled above"),
        });
    }
    Ok(Values::Numeric(out))
}

fn decode_raw_bytes(
    name: &str,
    n: usize,
    raw: &Bytes,
    mismatch: &dyn Fn(String, String) -> OipError,
) -> Result<Values, OipError> {
    // Each element needs at least its 4-byte length, which bounds the allocation by the input.
    if n > raw.len() / 4 {
        return Err(mismatch(
            format!("{n} length-prefixed elements"),
            format!("{} raw bytes", raw.len()),
        ));
    }
    let mut out = Vec::with_capacity(n);
    let mut pos = 0usize;
    for _ in 0..n {
        let Some(len) = raw.get(pos..pos + 4) else {
            return Err(OipError::BadBytes {
                tensor: name.to_string(),
                reason: "truncated length prefix",
            });
        };
        let len = u32::from_le_bytes(len.try_into().expect("4")) as usize;
        pos += 4;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= raw.len())
            .ok_or_else(|| OipError::BadBytes {
                tensor: name.to_string(),
                reason: "element longer than the remaining data",
            })?;
        out.push(raw.slice(pos..end));
        pos = end;
    }
    if pos != raw.len() {
        return Err(OipError::BadBytes {
            tensor: name.to_string(),
            reason: "trailing bytes after the last element",
        });
    }
    Ok(Values::Bytes(out))
}

fn decode_contents(
    name: &str,
    dt: DataType,
    n: usize,
    contents: Contents<'_>,
    mismatch: &dyn Fn(String, String) -> OipError,
) -> Result<Values, OipError> {
    let contents = match contents {
        Contents::Decoded(c) => c,
        Contents::Wire { message, chunks } => {
            return wire_contents(name, dt, n, message, chunks, mismatch)
        }
    };
    let empty = InferTensorContents::default();
    let c = contents.unwrap_or(&empty);
    fn numeric<T: Copy>(
        v: &[T],
        n: usize,
        field: &str,
        f: impl Fn(T) -> f64,
        mismatch: &dyn Fn(String, String) -> OipError,
    ) -> Result<Values, OipError> {
        if v.len() != n {
            return Err(mismatch(
                format!("{n} elements in {field}"),
                format!("{}", v.len()),
            ));
        }
        Ok(Values::Numeric(v.iter().map(|&x| f(x)).collect()))
    }
    match dt {
        DataType::Bool => numeric(
            &c.bool_contents,
            n,
            "bool_contents",
            |b| b as u8 as f64,
            mismatch,
        ),
        DataType::I8 | DataType::I16 | DataType::I32 => {
            numeric(&c.int_contents, n, "int_contents", f64::from, mismatch)
        }
        DataType::I64 => numeric(
            &c.int64_contents,
            n,
            "int64_contents",
            |x| x as f64,
            mismatch,
        ),
        DataType::U8 | DataType::U16 | DataType::U32 => {
            numeric(&c.uint_contents, n, "uint_contents", f64::from, mismatch)
        }
        DataType::U64 => numeric(
            &c.uint64_contents,
            n,
            "uint64_contents",
            |x| x as f64,
            mismatch,
        ),
        DataType::F32 => numeric(&c.fp32_contents, n, "fp32_contents", f64::from, mismatch),
        DataType::F64 => numeric(&c.fp64_contents, n, "fp64_contents", |x| x, mismatch),
        DataType::F16 | DataType::BF16 => Err(OipError::RawOnly {
            tensor: name.to_string(),
            datatype: dt.as_str(),
        }),
        DataType::Bytes => {
            if c.bytes_contents.len() != n {
                return Err(mismatch(
                    format!("{n} elements in bytes_contents"),
                    format!("{}", c.bytes_contents.len()),
                ));
            }
            Ok(Values::Bytes(c.bytes_contents.clone()))
        }
    }
}

/// [`decode_contents`] of contents as they came on the wire ([`Contents::Wire`]): the one field
/// the datatype is sent in, packed or not, converted as it is read — decoding the message first
/// (prost) grows a vector of the field's own type element by element, then converts it.
fn wire_contents(
    name: &str,
    dt: DataType,
    n: usize,
    message: &Bytes,
    chunks: &[&[u8]],
    mismatch: &dyn Fn(String, String) -> OipError,
) -> Result<Values, OipError> {
    use crate::wire::{self, Scalar};
    let malformed = |e: wire::WireError| OipError::Malformed {
        tensor: name.to_string(),
        reason: e.to_string(),
    };
    let count = |got: usize, field: &str| {
        if got == n {
            Ok(())
        } else {
            Err(mismatch(
                format!("{n} elements in {field}"),
                got.to_string(),
            ))
        }
    };
    // Field number, name, encoding and conversion, as `InferTensorContents` declares them (an
    // `int32` or `uint32` varint is truncated to 32 bits, as decoding does).
    let (label, numbers) = match dt {
        DataType::Bool => (
            "bool_contents",
            numbers(chunks, n, 1, Scalar::Varint, |v| (v != 0) as u8 as f64),
        ),
        DataType::I8 | DataType::I16 | DataType::I32 => (
            "int_contents",
            numbers(chunks, n, 2, Scalar::Varint, |v| f64::from(v as i32)),
        ),
        DataType::I64 => (
            "int64_contents",
            numbers(chunks, n, 3, Scalar::Varint, |v| v as i64 as f64),
        ),
        DataType::U8 | DataType::U16 | DataType::U32 => (
            "uint_contents",
            numbers(chunks, n, 4, Scalar::Varint, |v| f64::from(v as u32)),
        ),
        DataType::U64 => (
            "uint64_contents",
            numbers(chunks, n, 5, Scalar::Varint, |v| v as f64),
        ),
        DataType::F32 => (
            "fp32_contents",
            numbers(chunks, n, 6, Scalar::Fixed32, |v| {
                f64::from(f32::from_bits(v as u32))
            }),
        ),
        DataType::F64 => (
            "fp64_contents",
            numbers(chunks, n, 7, Scalar::Fixed64, f64::from_bits),
        ),
        DataType::F16 | DataType::BF16 => {
            return Err(OipError::RawOnly {
                tensor: name.to_string(),
                datatype: dt.as_str(),
            })
        }
        DataType::Bytes => {
            let mut out = Vec::new();
            for chunk in chunks {
                for f in wire::scan(chunk) {
                    let f = f.map_err(malformed)?;
                    if f.number == 8 {
                        let element = f.payload.ok_or(wire::WireError::WrongType(8));
                        out.push(message.slice_ref(element.map_err(malformed)?));
                    }
                }
            }
            count(out.len(), "bytes_contents")?;
            return Ok(Values::Bytes(out));
        }
    };
    let numbers = numbers.map_err(malformed)?;
    count(numbers.len(), label)?;
    Ok(Values::Numeric(numbers))
}

/// The elements of repeated field `field` across `chunks`, converted (generic, so that the
/// conversion is inlined into the loop), in a vector sized by the shape's `n` but never past what
/// the bytes can hold (one byte per varint at least): a shape is a claim, the bytes are there.
fn numbers(
    chunks: &[&[u8]],
    n: usize,
    field: u32,
    kind: crate::wire::Scalar,
    convert: impl Fn(u64) -> f64,
) -> Result<Vec<f64>, crate::wire::WireError> {
    use crate::wire::{self, Scalar};
    let width = match kind {
        Scalar::Varint => 1,
        Scalar::Fixed32 => 4,
        Scalar::Fixed64 => 8,
    };
    let mut out = Vec::with_capacity(n.min(chunks.iter().map(|c| c.len()).sum::<usize>() / width));
    for chunk in chunks {
        wire::repeated_scalars(chunk, field, kind, |v| out.push(convert(v)))?;
    }
    Ok(out)
}

/// The fields an input tensor and an output tensor share.
trait TensorMessage {
    fn fields(&self) -> (&str, &str, &[i64], Option<&InferTensorContents>);
}

impl TensorMessage for InferInputTensor {
    fn fields(&self) -> (&str, &str, &[i64], Option<&InferTensorContents>) {
        (
            &self.name,
            &self.datatype,
            &self.shape,
            self.contents.as_ref(),
        )
    }
}

impl TensorMessage for InferOutputTensor {
    fn fields(&self) -> (&str, &str, &[i64], Option<&InferTensorContents>) {
        (
            &self.name,
            &self.datatype,
            &self.shape,
            self.contents.as_ref(),
        )
    }
}

/// Decodes tensors whose data is either in each tensor's `contents` or, one entry per tensor, in
/// `raw`.
fn decode_all<T: TensorMessage>(
    tensors: &[T],
    raw: &[Bytes],
    max_elements: usize,
) -> Result<Vec<Tensor>, OipError> {
    if !raw.is_empty() && raw.len() != tensors.len() {
        return Err(OipError::RawCount {
            raw: raw.len(),
            tensors: tensors.len(),
        });
    }
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (name, datatype, shape, contents) = t.fields();
            let contents = Contents::Decoded(contents);
            decode_tensor(name, datatype, shape, contents, raw.get(i), max_elements)
        })
        .collect()
}

/// Decodes every input tensor of a request.
pub fn request_inputs(
    req: &ModelInferRequest,
    max_elements: usize,
) -> Result<Vec<Tensor>, OipError> {
    decode_all(&req.inputs, &req.raw_input_contents, max_elements)
}

/// Decodes every output tensor of a response.
pub fn response_outputs(
    resp: &ModelInferResponse,
    max_elements: usize,
) -> Result<Vec<Tensor>, OipError> {
    decode_all(&resp.outputs, &resp.raw_output_contents, max_elements)
}

/// Decodes one output of a response: the one named `name`, or the first when `name` is empty.
/// `None` when there is no such output.
pub fn response_output(
    resp: &ModelInferResponse,
    name: &str,
    max_elements: usize,
) -> Result<Option<Tensor>, OipError> {
    let found = if name.is_empty() {
        resp.outputs.first().map(|t| (0, t))
    } else {
        resp.outputs
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == name)
    };
    let Some((i, t)) = found else {
        return Ok(None);
    };
    let raw = &resp.raw_output_contents;
    if !raw.is_empty() && raw.len() != resp.outputs.len() {
        return Err(OipError::RawCount {
            raw: raw.len(),
            tensors: resp.outputs.len(),
        });
    }
    output_tensor(t, raw.get(i), max_elements).map(Some)
}

/// Decodes one output tensor, its data in its `contents` or in `raw` (its entry of the
/// response's `raw_output_contents`).
pub fn output_tensor(
    t: &InferOutputTensor,
    raw: Option<&Bytes>,
    max_elements: usize,
) -> Result<Tensor, OipError> {
    let (name, datatype, shape, contents) = t.fields();
    decode_tensor(
        name,
        datatype,
        shape,
        Contents::Decoded(contents),
        raw,
        max_elements,
    )
}

/// A request parameter as text (string, integer or boolean parameters; an empty string is none).
pub fn parameter(params: &HashMap<String, InferParameter>, key: &str) -> Option<String> {
    parameter_text(params.get(key)?)
}

/// A parameter's value as text: a non-empty string, an integer, or a boolean.
pub fn parameter_text(value: &InferParameter) -> Option<String> {
    match value.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) if !s.is_empty() => Some(s.clone()),
        ParameterChoice::StringParam(_) => None,
        ParameterChoice::Int64Param(i) => Some(i.to_string()),
        ParameterChoice::BoolParam(b) => Some(b.to_string()),
    }
}

/// Every request parameter that [`parameter`] reads as text.
pub fn parameters(params: &HashMap<String, InferParameter>) -> BTreeMap<String, String> {
    params
        .keys()
        .filter_map(|k| parameter(params, k).map(|v| (k.clone(), v)))
        .collect()
}

/// Little-endian raw bytes of FP32 values.
pub fn f32_raw(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// Little-endian raw bytes of INT64 values.
pub fn i64_raw(values: &[i64]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 8);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn dec(
        dt: &str,
        shape: &[i64],
        c: Option<InferTensorContents>,
        raw: Option<Vec<u8>>,
    ) -> Result<Tensor, OipError> {
        let raw = raw.map(Bytes::from);
        let decoded = decode_tensor(
            "x",
            dt,
            shape,
            Contents::Decoded(c.as_ref()),
            raw.as_ref(),
            1000,
        );
        // The same contents read as they came on the wire: the same tensor, or the same error.
        let message = Bytes::from(c.as_ref().map(Message::encode_to_vec).unwrap_or_default());
        let chunks: Vec<&[u8]> = c.iter().map(|_| &message[..]).collect();
        let on_the_wire = Contents::Wire {
            message: &message,
            chunks: &chunks,
        };
        let wire = decode_tensor("x", dt, shape, on_the_wire, raw.as_ref(), 1000);
        assert_eq!(decoded, wire, "{dt} {shape:?}");
        decoded
    }

    #[test]
    fn raw_and_typed_contents_agree_for_every_numeric_type() {
        let cases: Vec<(&str, InferTensorContents, Vec<u8>)> = vec![
            (
                "FP32",
                InferTensorContents {
                    fp32_contents: vec![1.5, -2.0],
                    ..Default::default()
                },
                [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat(),
            ),
            (
                "FP64",
                InferTensorContents {
                    fp64_contents: vec![1.5, -2.0],
                    ..Default::default()
                },
                [1.5f64.to_le_bytes(), (-2.0f64).to_le_bytes()].concat(),
            ),
            (
                "INT8",
                InferTensorContents {
                    int_contents: vec![1, -2],
                    ..Default::default()
                },
                vec![1, 0xfe],
            ),
            (
                "INT16",
                InferTensorContents {
                    int_contents: vec![1, -2],
                    ..Default::default()
                },
                [1i16.to_le_bytes(), (-2i16).to_le_bytes()].concat(),
            ),
            (
                "INT32",
                InferTensorContents {
                    int_contents: vec![1, -2],
                    ..Default::default()
                },
                [1i32.to_le_bytes(), (-2i32).to_le_bytes()].concat(),
            ),
            (
                "INT64",
                InferTensorContents {
                    int64_contents: vec![1, -2],
                    ..Default::default()
                },
                [1i64.to_le_bytes(), (-2i64).to_le_bytes()].concat(),
            ),
            (
                "UINT8",
                InferTensorContents {
                    uint_contents: vec![1, 200],
                    ..Default::default()
                },
                vec![1, 200],
            ),
            (
                "UINT16",
                InferTensorContents {
                    uint_contents: vec![1, 60000],
                    ..Default::default()
                },
                [1u16.to_le_bytes(), 60000u16.to_le_bytes()].concat(),
            ),
            (
                "UINT32",
                InferTensorContents {
                    uint_contents: vec![1, 4_000_000_000],
                    ..Default::default()
                },
                [1u32.to_le_bytes(), 4_000_000_000u32.to_le_bytes()].concat(),
            ),
            (
                "UINT64",
                InferTensorContents {
                    uint64_contents: vec![1, 1 << 40],
                    ..Default::default()
                },
                [1u64.to_le_bytes(), (1u64 << 40).to_le_bytes()].concat(),
            ),
            (
                "BOOL",
                InferTensorContents {
                    bool_contents: vec![true, false],
                    ..Default::default()
                },
                vec![1, 0],
            ),
        ];
        for (dt, contents, raw) in cases {
            let a = dec(dt, &[1, 2], Some(contents), None).unwrap();
            let b = dec(dt, &[1, 2], None, Some(raw)).unwrap();
            assert_eq!(a, b, "{dt}");
            assert_eq!(a.rows(), 1);
            assert_eq!(a.cols(), 2);
        }
    }

    #[test]
    fn half_precision_is_raw_only() {
        let raw = [
            half::f16::from_f32(0.5).to_le_bytes(),
            half::f16::from_f32(-1.0).to_le_bytes(),
        ]
        .concat();
        let t = dec("FP16", &[2], None, Some(raw)).unwrap();
        assert_eq!(t.numeric().unwrap(), &[0.5, -1.0]);
        let raw = half::bf16::from_f32(2.0).to_le_bytes().to_vec();
        assert_eq!(
            dec("BF16", &[1], None, Some(raw))
                .unwrap()
                .numeric()
                .unwrap(),
            &[2.0]
        );
        assert!(matches!(
            dec("FP16", &[1], Some(Default::default()), None),
            Err(OipError::RawOnly { .. })
        ));
    }

    #[test]
    fn bytes_tensors_decode_from_both_forms() {
        let mut raw = Vec::new();
        for s in ["red", "", "blue"] {
            raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw.extend_from_slice(s.as_bytes());
        }
        let a = dec("BYTES", &[3, 1], None, Some(raw)).unwrap();
        let b = dec(
            "BYTES",
            &[3, 1],
            Some(InferTensorContents {
                bytes_contents: vec![Bytes::from("red"), Bytes::new(), Bytes::from("blue")],
                ..Default::default()
            }),
            None,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rows(), 3);
    }

    #[test]
    fn hostile_tensors_are_errors() {
        assert!(matches!(
            dec("FP32", &[-1, 2], None, None),
            Err(OipError::BadShape { .. })
        ));
        assert!(matches!(
            dec("FP32", &[i64::MAX, i64::MAX], None, None),
            Err(OipError::TooLarge {
                elements: usize::MAX,
                ..
            })
        ));
        assert!(matches!(
            dec("FP32", &[1000, 1000], None, None),
            Err(OipError::TooLarge { .. })
        ));
        assert!(matches!(
            dec("FP99", &[1], None, None),
            Err(OipError::UnknownDatatype { .. })
        ));
        assert!(matches!(
            dec("FP32", &[2], None, Some(vec![0; 7])),
            Err(OipError::SizeMismatch { .. })
        ));
        assert!(matches!(
            dec(
                "FP32",
                &[2],
                Some(InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                }),
                None
            ),
            Err(OipError::SizeMismatch { .. })
        ));
        // A length prefix pointing past the end, and trailing garbage.
        assert!(matches!(
            dec("BYTES", &[1], None, Some(vec![9, 0, 0, 0, 1])),
            Err(OipError::BadBytes { .. })
        ));
        assert!(matches!(
            dec("BYTES", &[1], None, Some(vec![0, 0, 0, 0, 1])),
            Err(OipError::BadBytes { .. })
        ));
        assert!(matches!(
            dec("BYTES", &[500], None, Some(vec![0; 8])),
            Err(OipError::SizeMismatch { .. })
        ));
        let err = dec("FP32", &[2, 3], None, Some(vec![0; 20]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("24 raw bytes") && err.contains("20"), "{err}");
    }

    #[test]
    fn empty_tensors_keep_every_dimension_within_the_limit() {
        // Found by fuzzing (oip_request): a zero dimension made any other dimension pass, and
        // the feature table then allocated one row per declared row ([i64::MAX, 0] panicked
        // with a capacity overflow; [1e9, 0] asked for 24 GB).
        assert!(matches!(
            dec("FP32", &[1_000_000_000, 0], None, None),
            Err(OipError::TooLarge { .. })
        ));
        assert!(matches!(
            dec("FP32", &[0, i64::MAX, i64::MAX], None, None),
            Err(OipError::TooLarge { .. })
        ));
        let t = dec("FP32", &[1000, 0], None, None).unwrap();
        assert_eq!((t.rows(), t.values.len()), (1000, 0));
        assert!(dec("FP32", &[1001, 0], None, None).is_err());
    }

    #[test]
    fn raw_count_must_match_inputs() {
        let req = ModelInferRequest {
            inputs: vec![Default::default(), Default::default()],
            raw_input_contents: vec![Bytes::new()],
            ..Default::default()
        };
        assert!(matches!(
            request_inputs(&req, 10),
            Err(OipError::RawCount { raw: 1, tensors: 2 })
        ));
    }
}
