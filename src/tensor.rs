//! Tensors as modelgate reads them, whatever the wire protocol: a name, a datatype, a shape and
//! the elements widened to `f64` (or kept as bytes). A protocol decodes its messages into these
//! ([`Inputs`] of a request, [`Outputs`] of an answer), and records, experiments, shadows and
//! drift read only these, so that a new protocol changes none of them.

use std::collections::BTreeMap;

use bytes::Bytes;

/// A tensor datatype (the Open Inference Protocol's names, which the other protocols map to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// BOOL
    Bool,
    /// UINT8
    U8,
    /// UINT16
    U16,
    /// UINT32
    U32,
    /// UINT64
    U64,
    /// INT8
    I8,
    /// INT16
    I16,
    /// INT32
    I32,
    /// INT64
    I64,
    /// FP16
    F16,
    /// BF16
    BF16,
    /// FP32
    F32,
    /// FP64
    F64,
    /// BYTES
    Bytes,
}

impl DataType {
    /// Parses the protocol's datatype name.
    pub fn parse(s: &str) -> Option<DataType> {
        Some(match s {
            "BOOL" => DataType::Bool,
            "UINT8" => DataType::U8,
            "UINT16" => DataType::U16,
            "UINT32" => DataType::U32,
            "UINT64" => DataType::U64,
            "INT8" => DataType::I8,
            "INT16" => DataType::I16,
            "INT32" => DataType::I32,
            "INT64" => DataType::I64,
            "FP16" => DataType::F16,
            "BF16" => DataType::BF16,
            "FP32" => DataType::F32,
            "FP64" => DataType::F64,
            "BYTES" => DataType::Bytes,
            _ => return None,
        })
    }

    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element in raw contents; `None` for BYTES (variable).
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

/// Decoded tensor elements, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// Every numeric type and BOOL (as 0 / 1), widened to f64.
    Numeric(Vec<f64>),
    /// BYTES elements, sharing the message buffer.
    Bytes(Vec<Bytes>),
}

impl Values {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Values::Numeric(v) => v.len(),
            Values::Bytes(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A decoded tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Tensor name.
    pub name: String,
    /// Datatype.
    pub datatype: DataType,
    /// Shape (every dimension non-negative).
    pub shape: Vec<usize>,
    /// Elements.
    pub values: Values,
}

impl Tensor {
    /// Rows (samples): the first dimension of a tensor of rank ≥ 2, else 1.
    pub fn rows(&self) -> usize {
        if self.shape.len() >= 2 {
            self.shape[0]
        } else {
            1
        }
    }

    /// Elements per row.
    pub fn cols(&self) -> usize {
        match self.rows() {
            0 => 0,
            r => self.values.len() / r,
        }
    }

    /// The numeric elements, if the tensor is numeric.
    pub fn numeric(&self) -> Option<&[f64]> {
        match &self.values {
            Values::Numeric(v) => Some(v),
            Values::Bytes(_) => None,
        }
    }
}

/// What a request carries for records: its input tensors, and its parameters as text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    /// The input tensors, in the request's order.
    pub tensors: Vec<Tensor>,
    /// Request parameters as text (string, integer and boolean parameters; empty strings are
    /// left out): where an entity id or a unit id may be.
    pub parameters: BTreeMap<String, String>,
}

/// What an answer carries for records and comparisons: its output tensors, or the ones asked
/// for (see [`Wanted`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outputs {
    /// The output tensors decoded, in the answer's order.
    pub tensors: Vec<Tensor>,
}

impl Outputs {
    /// The output named `name`, or the first when `name` is empty.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        if name.is_empty() {
            self.tensors.first()
        } else {
            self.tensors.iter().find(|t| t.name == name)
        }
    }
}

/// Which outputs of an answer a reader needs. A prediction reads one output; decoding only that
/// one keeps the record writer cheap on answers with large other outputs (embeddings, logits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// The output of this name, or the first output when the name is empty.
    One(&'a str),
    /// Every output.
    All,
}
