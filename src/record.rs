//! What a request and its answer say: the features of every sample, the model's prediction per
//! sample, and the entity each sample belongs to. Plain functions over protocol-neutral tensors
//! ([`Inputs`], [`Outputs`]): each wire protocol decodes its own messages into them
//! (`crate::protocol`), so records read every protocol's traffic the same way.
//!
//! Rows: a tensor of rank ≥ 2 has `shape[0]` rows and `shape[1..]` columns. Rank-1 tensors are
//! columns of a batch when another tensor fixes the batch size B (or when several rank-1 inputs
//! all have the same length); a lone rank-1 input is one sample of N features (`[N]`). Outputs of
//! rank 1 are one value per row.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::registry::PredictionSpec;
use crate::tensor::{DataType, Inputs, Outputs, Tensor, Values};

/// One feature value.
#[derive(Clone, Debug, PartialEq)]
pub enum FeatureValue {
    /// Every numeric datatype and BOOL.
    Number(f64),
    /// BYTES elements (categorical features).
    Text(String),
}

/// `x` as an `f32`, when that is `x` exactly, bit for bit (a NaN's payload and a zero's sign
/// too): what a number read from an FP32 tensor always is. Stores keep such numbers in 4 bytes.
pub fn exact_f32(x: f64) -> Option<f32> {
    let f = x as f32;
    (f64::from(f).to_bits() == x.to_bits()).then_some(f)
}

/// The precision a feature's numbers travel in: what its tensor's datatype can represent. Live
/// values are exact at it (an FP32 0.1 is the float32 nearest 0.1, widened exactly), so a
/// float64 reference is compared with them only after rounding to it (see `drift`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precision {
    /// FP64, the integer types and BOOL (exact in f64), and values with no tensor (uploads).
    #[default]
    F64,
    /// FP32.
    F32,
    /// FP16.
    F16,
    /// BF16.
    BF16,
}

impl Precision {
    /// The precision of a tensor datatype.
    pub fn of(datatype: DataType) -> Precision {
        match datatype {
            DataType::F32 => Precision::F32,
            DataType::F16 => Precision::F16,
            DataType::BF16 => Precision::BF16,
            _ => Precision::F64,
        }
    }

    /// A one-byte code for the precision, as stored (fleet drift rows and evaluations).
    pub fn code(self) -> u8 {
        match self {
            Precision::F64 => 0,
            Precision::F32 => 1,
            Precision::F16 => 2,
            Precision::BF16 => 3,
        }
    }

    /// The precision of a [`code`](Precision::code).
    pub fn from_code(code: u8) -> Option<Precision> {
        Some(match code {
            0 => Precision::F64,
            1 => Precision::F32,
            2 => Precision::F16,
            3 => Precision::BF16,
            _ => return None,
        })
    }

    /// The coarser of two: a feature that arrives as FP32 and FP16 is compared at FP16. (FP16
    /// and BF16 differ in range as well as in mantissa; BF16, with fewer mantissa bits, counts
    /// as the coarser.)
    pub fn join(self, other: Precision) -> Precision {
        self.max(other)
    }

    /// The datatype name of the precision (`FP64` also stands for the integer types).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F64 => "FP64",
            Precision::F32 => "FP32",
            Precision::F16 => "FP16",
            Precision::BF16 => "BF16",
        }
    }

    /// `x` rounded to the nearest value of this precision (ties to even), as a client converting
    /// a float64 would send it. Values beyond the type's range stay as they are, which keeps the
    /// rounding monotone (they are larger than anything the type can carry) and finite.
    pub fn round(self, x: f64) -> f64 {
        let y = match self {
            Precision::F64 => return x,
            Precision::F32 => f64::from(x as f32),
            Precision::F16 => half::f16::from_f64(x).to_f64(),
            Precision::BF16 => half::bf16::from_f64(x).to_f64(),
        };
        if y.is_finite() || !x.is_finite() {
            y
        } else {
            x
        }
    }

    /// A number as a category at this precision: the shortest decimal that is the same number
    /// once rounded to it, written as [`format_number`] writes it. The FP32 0.1 and the float64
    /// 0.1 are both `0.1`; the float64 0.123456789 is `0.12345679` at FP32, like its FP32 value.
    pub fn category(self, x: f64) -> String {
        let y = self.round(x);
        if self == Precision::F64 || !y.is_finite() {
            return format_number(y);
        }
        let same = |z: f64| z.is_finite() && self.round(z) == y;
        if self == Precision::F32 {
            // Rust prints a float32 as the shortest decimal that reads back as it.
            let z: f64 = (y as f32).to_string().parse().unwrap_or(f64::NAN);
            if same(z) {
                return format_number(z);
            }
        }
        // FP16 and BF16 (Rust prints neither): the fewest significant digits that round back.
        for digits in 0..17 {
            let z: f64 = format!("{y:.digits$e}").parse().unwrap_or(f64::NAN);
            if same(z) {
                return format_number(z);
            }
        }
        format_number(y)
    }
}

/// What the model predicted for one row.
#[derive(Clone, Debug, PartialEq)]
pub enum Prediction {
    /// Classification.
    Label(String),
    /// Regression.
    Value(f64),
}

/// The features of a request: one row per sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeatureTable {
    /// Feature names, one per column. Shared: the tables of one model's traffic mostly have the
    /// same columns, and [`extract_features`] hands back the previous table's names when they are.
    pub names: Arc<[String]>,
    /// What `names` were made of (shared with them).
    pub made_of: Arc<[TensorColumns]>,
    /// Rows of values, each `names.len()` long.
    pub rows: Vec<Vec<FeatureValue>>,
    /// The precision of each column's numbers (from its tensor's datatype).
    pub precisions: Vec<Precision>,
    /// The feature-store entity of each row, when known.
    pub entities: Vec<Option<String>>,
}

impl FeatureTable {
    /// Its names and what they were made of, to name the next table of the same model.
    pub fn columns(&self) -> Columns {
        Columns {
            names: self.names.clone(),
            made_of: self.made_of.clone(),
        }
    }
}

/// One feature tensor as a table's names see it: the tensor's name, its number of columns and
/// the names registered for it. Tables made of the same tensors have the same names.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorColumns {
    tensor: String,
    columns: usize,
    registered: Option<Vec<String>>,
}

/// A table's names with what they were made of, handed to [`extract_features`] for the next
/// table of the same model: when that one is made of the same tensors it shares the names,
/// found out by comparing a few tensors instead of spelling out and comparing every column's
/// name (`input[12]`: a twentieth of the record writer's work per call).
#[derive(Clone, Debug, Default)]
pub struct Columns {
    /// The names, one per column.
    pub names: Arc<[String]>,
    made_of: Arc<[TensorColumns]>,
}

/// Longest request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// Checks a request id: 1 to 128 visible ASCII characters (what modelgate keeps from a caller's
/// `x-request-id`, and what it generates).
pub fn validate_request_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("required".into());
    }
    if id.len() > MAX_REQUEST_ID {
        return Err(format!("longer than {MAX_REQUEST_ID} characters"));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{id:?} must be visible ASCII without spaces"));
    }
    Ok(())
}

/// Formats a number the way a label would be written: integers without a fraction.
pub fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        // itoa, not `format!`: a label read from an output is formatted for every prediction
        // and shadow comparison (~1,200 instructions each through `format!`).
        itoa::Buffer::new().format(x as i64).to_string()
    } else {
        x.to_string()
    }
}

fn value_at(t: &Tensor, i: usize) -> FeatureValue {
    match &t.values {
        Values::Numeric(v) => FeatureValue::Number(v[i]),
        Values::Bytes(v) => FeatureValue::Text(String::from_utf8_lossy(&v[i]).into_owned()),
    }
}

fn text_at(t: &Tensor, i: usize) -> String {
    match value_at(t, i) {
        FeatureValue::Number(x) => format_number(x),
        FeatureValue::Text(s) => s,
    }
}

/// Extracts the feature table of a request's inputs.
///
/// `names` are the registered feature names per input; `entity_key` names an input tensor (one
/// entity id per row, not a feature) or a request parameter holding the entity; `unit_id` is the
/// fallback entity. `previous` are the columns of an earlier table (of the same model): when
/// this one is made of the same tensors, it shares their names rather than building its own.
pub fn extract_features(
    inputs: &Inputs,
    names: &BTreeMap<String, Vec<String>>,
    entity_key: &str,
    unit_id: Option<&str>,
    previous: Option<&Columns>,
) -> Result<FeatureTable, String> {
    // Inline: a request has a few tensors, and the writer reads every recorded call's.
    type Few<T> = smallvec::SmallVec<[T; 4]>;
    let (entity_tensor, features): (Few<&Tensor>, Few<&Tensor>) = inputs
        .tensors
        .iter()
        .partition(|t| !entity_key.is_empty() && t.name == entity_key);
    let batch = batch_size(&features);
    let widths = features
        .iter()
        .map(|t| columns(t, batch))
        .collect::<Result<Few<usize>, String>>()?;
    // Sized once: growing every row column by column was a sixth of what reading features cost.
    let width: usize = widths.iter().sum();
    let mut table = FeatureTable {
        rows: (0..batch).map(|_| Vec::with_capacity(width)).collect(),
        precisions: Vec::with_capacity(width),
        ..Default::default()
    };
    for (t, &cols) in features.iter().zip(&widths) {
        for _ in 0..cols {
            table.precisions.push(Precision::of(t.datatype));
        }
        for (r, row) in table.rows.iter_mut().enumerate() {
            for c in 0..cols {
                row.push(value_at(t, r * cols + c));
            }
        }
    }
    let same = |p: &&Columns| {
        p.made_of.len() == features.len()
            && p.made_of
                .iter()
                .zip(&features)
                .zip(&widths)
                .all(|((m, t), &w)| {
                    m.tensor == t.name
                        && m.columns == w
                        && m.registered.as_ref() == names.get(&t.name)
                })
    };
    match previous.filter(same) {
        Some(p) => {
            table.names = p.names.clone();
            table.made_of = p.made_of.clone();
        }
        None => {
            let mut column_names = Vec::with_capacity(width);
            for (t, &cols) in features.iter().zip(&widths) {
                let registered = names.get(&t.name);
                for c in 0..cols {
                    column_names.push(match registered.and_then(|n| n.get(c)) {
                        Some(name) => name.clone(),
                        None => position_name(&t.name, c),
                    });
                }
            }
            table.names = column_names.into();
            table.made_of = features
                .iter()
                .zip(&widths)
                .map(|(t, &columns)| TensorColumns {
                    tensor: t.name.clone(),
                    columns,
                    registered: names.get(&t.name).cloned(),
                })
                .collect();
        }
    }
    table.entities = match entity_tensor.first() {
        Some(t) => {
            if t.values.len() != batch {
                return Err(format!(
                    "entity input '{}' has {} values for {batch} rows",
                    t.name,
                    t.values.len()
                ));
            }
            (0..batch).map(|r| Some(text_at(t, r))).collect()
        }
        None => {
            let e = inputs
                .parameters
                .get(entity_key)
                .cloned()
                .or(unit_id.map(str::to_string));
            vec![e; batch]
        }
    };
    Ok(table)
}

/// The name of an unregistered column: the tensor's name and the column, `input[3]`. (Built by
/// hand: `format!` cost the record writer a tenth of its instructions, once per column.)
fn position_name(tensor: &str, column: usize) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(column);
    let mut name = String::with_capacity(tensor.len() + digits.len() + 2);
    name.push_str(tensor);
    name.push('[');
    name.push_str(digits);
    name.push(']');
    name
}

/// The number of samples a set of input tensors carries.
fn batch_size(tensors: &[&Tensor]) -> usize {
    if let Some(t) = tensors.iter().find(|t| t.shape.len() >= 2) {
        return t.shape[0];
    }
    let rank1: Vec<usize> = tensors
        .iter()
        .filter(|t| t.shape.len() == 1)
        .map(|t| t.shape[0])
        .collect();
    if rank1.len() > 1 && rank1.iter().all(|&n| n == rank1[0]) {
        return rank1[0];
    }
    1
}

/// Columns a tensor contributes to each of `batch` rows.
fn columns(t: &Tensor, batch: usize) -> Result<usize, String> {
    let n = t.values.len();
    let fits = match t.shape.len() {
        _ if batch == 0 => return Ok(0),
        0 | 1 if batch == 1 => return Ok(n),
        0 => false,
        _ => t.shape[0] == batch,
    };
    if fits {
        Ok(n / batch)
    } else {
        Err(format!(
            "input '{}' has shape {:?}, which does not split into {batch} rows",
            t.name, t.shape
        ))
    }
}

/// Rows and columns of an output tensor: rank ≥ 1 has `shape[0]` rows.
fn output_rows_cols(t: &Tensor) -> (usize, usize) {
    let rows = t.shape.first().copied().unwrap_or(1);
    let cols = t.values.len().checked_div(rows).unwrap_or(0);
    (rows, cols)
}

/// The output a prediction is read from (empty: the first): the one a reader of an answer
/// needs to decode for [`extract_predictions`] (`Wanted::One`).
pub fn prediction_output(spec: &PredictionSpec) -> &str {
    match spec {
        PredictionSpec::Argmax { output, .. }
        | PredictionSpec::Threshold { output, .. }
        | PredictionSpec::Label { output }
        | PredictionSpec::Value { output } => output,
    }
}

/// Reads one prediction per row from an answer's outputs, as `spec` says.
pub fn extract_predictions(
    outputs: &Outputs,
    spec: &PredictionSpec,
) -> Result<Vec<Prediction>, String> {
    let output = prediction_output(spec);
    let t = outputs.get(output).ok_or_else(|| {
        if output.is_empty() {
            "the response has no outputs".to_string()
        } else {
            format!("the response has no output '{output}'")
        }
    })?;
    let (rows, cols) = output_rows_cols(t);
    if rows > 0 && cols == 0 {
        return Err(format!(
            "output '{}' has shape {:?}: rows with no values",
            t.name, t.shape
        ));
    }
    let numeric = |what: &str| {
        t.numeric()
            .ok_or_else(|| format!("output '{}' is BYTES; {what} needs numbers", t.name))
    };
    let row = |v: &'_ [f64], r: usize| v[r * cols..(r + 1) * cols].to_vec();
    match spec {
        PredictionSpec::Argmax { labels, .. } => {
            let v = numeric("argmax")?;
            (0..rows)
                .map(|r| {
                    let row = row(v, r);
                    let best = row
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| !x.is_nan())
                        .fold(None::<(usize, f64)>, |best, (i, &x)| match best {
                            Some((_, b)) if b >= x => best,
                            _ => Some((i, x)),
                        })
                        .ok_or_else(|| format!("row {r} of output '{}' has no number", t.name))?;
                    Ok(Prediction::Label(
                        labels
                            .get(best.0)
                            .cloned()
                            .unwrap_or_else(|| best.0.to_string()),
                    ))
                })
                .collect()
        }
        PredictionSpec::Threshold {
            threshold,
            positive_label,
            negative_label,
            ..
        } => {
            let v = numeric("threshold")?;
            if cols != 1 && cols != 2 {
                return Err(format!(
                    "threshold needs one score per row or [batch, 2] probabilities; output '{}' has {cols} columns",
                    t.name
                ));
            }
            Ok((0..rows)
                .map(|r| {
                    let score = v[r * cols + cols - 1];
                    Prediction::Label(if score > *threshold {
                        positive_label.clone()
                    } else {
                        negative_label.clone()
                    })
                })
                .collect())
        }
        PredictionSpec::Label { .. } => Ok((0..rows)
            .map(|r| Prediction::Label(text_at(t, r * cols)))
            .collect()),
        PredictionSpec::Value { .. } => {
            let v = numeric("a value prediction")?;
            Ok((0..rows).map(|r| Prediction::Value(v[r * cols])).collect())
        }
    }
}

/// Every numeric output value of each row, outputs in order (for tolerance comparisons). BYTES
/// outputs are skipped. (Outputs that do not decode give none: see the protocol's reader.)
pub fn output_rows(outputs: &Outputs) -> Vec<Vec<f64>> {
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for t in &outputs.tensors {
        let Some(v) = t.numeric() else { continue };
        let (n, cols) = output_rows_cols(t);
        if rows.len() < n {
            rows.resize(n, Vec::new());
        }
        for (r, row) in rows.iter_mut().enumerate().take(n) {
            row.extend_from_slice(&v[r * cols..(r + 1) * cols]);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oip;
    use crate::pb::inference::{
        infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
        model_infer_response::InferOutputTensor, InferParameter, InferTensorContents,
        ModelInferRequest, ModelInferResponse,
    };
    use crate::protocol::oip_grpc;
    use crate::tensor::Wanted;
    use bytes::Bytes;

    /// [`super::extract_features`] of an OIP request, as the OIP gRPC protocol reads it.
    fn extract_features(
        req: &ModelInferRequest,
        names: &BTreeMap<String, Vec<String>>,
        entity_key: &str,
        unit_id: Option<&str>,
        max_elements: usize,
    ) -> Result<FeatureTable, String> {
        let inputs = oip_grpc::inputs(req, max_elements)?;
        super::extract_features(&inputs, names, entity_key, unit_id, None)
    }

    /// [`super::extract_predictions`] of an OIP answer, decoding only the output it reads.
    fn extract_predictions(
        resp: &ModelInferResponse,
        spec: &PredictionSpec,
        max_elements: usize,
    ) -> Result<Vec<Prediction>, String> {
        let wanted = Wanted::One(prediction_output(spec));
        super::extract_predictions(&oip_grpc::outputs(resp, wanted, max_elements)?, spec)
    }

    fn input(
        name: &str,
        dt: &str,
        shape: &[i64],
        contents: InferTensorContents,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape: shape.to_vec(),
            parameters: Default::default(),
            contents: Some(contents),
        }
    }

    fn fp32(v: &[f32]) -> InferTensorContents {
        InferTensorContents {
            fp32_contents: v.to_vec(),
            ..Default::default()
        }
    }

    fn num(x: f64) -> FeatureValue {
        FeatureValue::Number(x)
    }

    #[test]
    fn a_batch_gives_one_row_per_sample_with_registered_names() {
        let req = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[2, 3], fp32(&[1., 2., 3., 4., 5., 6.]))],
            ..Default::default()
        };
        let names = BTreeMap::from([("x".to_string(), vec!["a".to_string(), "b".to_string()])]);
        let t = extract_features(&req, &names, "entity_id", Some("user-1"), 1000).unwrap();
        assert_eq!(&t.names[..], ["a", "b", "x[2]"]);
        assert_eq!(
            t.rows,
            vec![
                vec![num(1.), num(2.), num(3.)],
                vec![num(4.), num(5.), num(6.)]
            ]
        );
        assert_eq!(t.entities, vec![Some("user-1".to_string()); 2]);
    }

    #[test]
    fn raw_typed_and_bytes_inputs_and_an_entity_tensor() {
        let mut raw_colour = Vec::new();
        for s in ["red", "blue"] {
            raw_colour.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw_colour.extend_from_slice(s.as_bytes());
        }
        let req = ModelInferRequest {
            inputs: vec![
                input("age", "INT64", &[2], Default::default()),
                input("colour", "BYTES", &[2], Default::default()),
                input("entity_id", "INT32", &[2], Default::default()),
            ],
            raw_input_contents: vec![
                oip::i64_raw(&[31, 45]),
                Bytes::from(raw_colour),
                Bytes::from([7i32.to_le_bytes(), 8i32.to_le_bytes()].concat()),
            ],
            ..Default::default()
        };
        let t = extract_features(&req, &BTreeMap::new(), "entity_id", Some("u"), 1000).unwrap();
        assert_eq!(&t.names[..], ["age[0]", "colour[0]"]);
        assert_eq!(t.rows[1], vec![num(45.), FeatureValue::Text("blue".into())]);
        assert_eq!(
            t.entities,
            vec![Some("7".to_string()), Some("8".to_string())]
        );
    }

    #[test]
    fn tables_with_the_same_columns_share_their_names() {
        let req = |x: &str, n: usize| ModelInferRequest {
            inputs: vec![input(x, "FP32", &[1, n as i64], fp32(&vec![0.5; n]))],
            ..Default::default()
        };
        let table = |r: &ModelInferRequest, names, previous| {
            let inputs = oip_grpc::inputs(r, 1000).unwrap();
            super::extract_features(&inputs, names, "entity_id", None, previous).unwrap()
        };
        let none = BTreeMap::new();
        let first = table(&req("x", 12), &none, None);
        assert_eq!(first.names[11], "x[11]");
        let first_columns = first.columns();
        let again = table(&req("x", 12), &none, Some(&first_columns));
        assert!(Arc::ptr_eq(&first.names, &again.names));
        // Other columns, a name that only starts like one, other registered names: new names.
        let age = BTreeMap::from([("x".to_string(), vec!["age".to_string()])]);
        for (r, names) in [
            (req("x", 11), &none),
            (req("xy", 12), &none),
            (req("x", 2), &none),
            (req("x", 12), &age),
        ] {
            let t = table(&r, names, Some(&first_columns));
            assert!(!Arc::ptr_eq(&first.names, &t.names));
            assert_eq!(t.names, table(&r, names, None).names);
        }
        let short = table(&req("x", 2), &none, None);
        let short_columns = short.columns();
        let t = table(&req("x", 12), &none, Some(&short_columns));
        assert_eq!(t.names, first.names);
    }

    #[test]
    fn a_lone_vector_is_one_sample_and_parameters_name_the_entity() {
        let mut req = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[3], fp32(&[1., 2., 3.]))],
            ..Default::default()
        };
        req.parameters.insert(
            "entity_id".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("acct-9".into())),
            },
        );
        let t = extract_features(&req, &BTreeMap::new(), "entity_id", Some("u"), 1000).unwrap();
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.names.len(), 3);
        assert_eq!(t.entities, vec![Some("acct-9".to_string())]);
    }

    #[test]
    fn inconsistent_batches_are_reported() {
        let req = ModelInferRequest {
            inputs: vec![
                input("x", "FP32", &[2, 1], fp32(&[1., 2.])),
                input("y", "FP32", &[3, 1], fp32(&[1., 2., 3.])),
            ],
            ..Default::default()
        };
        let err = extract_features(&req, &BTreeMap::new(), "", None, 1000).unwrap_err();
        assert!(err.contains("'y'"), "{err}");
    }

    fn response(name: &str, shape: &[i64], v: &[f32]) -> ModelInferResponse {
        ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: name.into(),
                datatype: "FP32".into(),
                shape: shape.to_vec(),
                parameters: Default::default(),
                contents: Some(fp32(v)),
            }],
            ..Default::default()
        }
    }

    fn labels(p: Vec<Prediction>) -> Vec<String> {
        p.into_iter()
            .map(|p| match p {
                Prediction::Label(l) => l,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn predictions_are_read_as_registered() {
        let probs = response("probabilities", &[3, 2], &[0.9, 0.1, 0.2, 0.8, 0.5, 0.5]);
        let argmax = PredictionSpec::Argmax {
            output: "probabilities".into(),
            labels: vec!["cat".into(), "dog".into()],
        };
        assert_eq!(
            labels(extract_predictions(&probs, &argmax, 100).unwrap()),
            vec!["cat", "dog", "cat"]
        );
        let unlabelled = PredictionSpec::Argmax {
            output: String::new(),
            labels: vec![],
        };
        assert_eq!(
            labels(extract_predictions(&probs, &unlabelled, 100).unwrap()),
            vec!["0", "1", "0"]
        );
        let threshold = PredictionSpec::Threshold {
            output: "probabilities".into(),
            threshold: 0.5,
            positive_label: "yes".into(),
            negative_label: "no".into(),
        };
        assert_eq!(
            labels(extract_predictions(&probs, &threshold, 100).unwrap()),
            vec!["no", "yes", "no"]
        );
        let value = PredictionSpec::Value {
            output: String::new(),
        };
        let scores = response("value", &[2], &[1.5, -2.0]);
        assert_eq!(
            extract_predictions(&scores, &value, 100).unwrap(),
            vec![Prediction::Value(1.5), Prediction::Value(-2.0)]
        );
        let label = PredictionSpec::Label {
            output: "value".into(),
        };
        assert_eq!(
            labels(
                extract_predictions(&response("value", &[2, 1], &[3.0, 4.0]), &label, 100).unwrap()
            ),
            vec!["3", "4"]
        );
        let missing = PredictionSpec::Value {
            output: "nope".into(),
        };
        assert!(extract_predictions(&scores, &missing, 100)
            .unwrap_err()
            .contains("'nope'"));
        let wide = response("p", &[1, 3], &[0.1, 0.2, 0.7]);
        assert!(extract_predictions(
            &wide,
            &PredictionSpec::Threshold {
                output: String::new(),
                threshold: 0.5,
                positive_label: "1".into(),
                negative_label: "0".into()
            },
            100
        )
        .unwrap_err()
        .contains("3 columns"));
    }

    #[test]
    fn empty_rows_are_errors_not_panics() {
        // Found by fuzzing (oip_response): an output of shape [2, 0] has rows but no values;
        // reading a label or a value from it indexed an empty tensor.
        let empty = response("p", &[2, 0], &[]);
        for spec in [
            PredictionSpec::Label {
                output: String::new(),
            },
            PredictionSpec::Value {
                output: String::new(),
            },
            PredictionSpec::Argmax {
                output: String::new(),
                labels: vec![],
            },
        ] {
            let err = extract_predictions(&empty, &spec, 100).unwrap_err();
            assert!(err.contains("no values"), "{err}");
        }
    }

    #[test]
    fn a_batch_of_empty_rows_is_bounded() {
        // Found by fuzzing (oip_request): a batch of i64::MAX empty rows panicked with a
        // capacity overflow while allocating the rows.
        let req = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[i64::MAX, 0], fp32(&[]))],
            ..Default::default()
        };
        assert!(extract_features(&req, &BTreeMap::new(), "", None, 1000).is_err());
    }

    /// numpy 2: `float(np.float32(0.1))`, `float(np.float16(0.1))`; BF16 by hand (0x3DCD).
    #[test]
    fn precisions_round_like_the_clients_types() {
        assert_eq!(Precision::F32.round(0.1), 0.10000000149011612);
        assert_eq!(Precision::F16.round(0.1), 0.0999755859375);
        assert_eq!(Precision::BF16.round(0.1), 0.10009765625);
        assert_eq!(Precision::F64.round(0.1), 0.1);
        // Beyond the range: kept, so the order of a sorted reference stays.
        assert_eq!(Precision::F16.round(70_000.0), 70_000.0);
        assert_eq!(Precision::F32.round(1e300), 1e300);
        assert_eq!(Precision::F32.round(f64::INFINITY), f64::INFINITY);
        assert!(Precision::F16.round(65_504.0) < Precision::F16.round(65_600.0));
        for p in [Precision::F32, Precision::F16, Precision::BF16] {
            assert_eq!(p.category(0.1), "0.1", "{p:?}");
            assert_eq!(p.category(p.round(0.1)), "0.1", "{p:?}");
            assert_eq!(p.category(3.0), "3", "{p:?}");
        }
        assert_eq!(Precision::F32.category(0.123456789), "0.12345679");
        assert_eq!(Precision::F64.category(0.123456789), "0.123456789");
        assert_eq!(Precision::F16.category(0.123456789), "0.1235");
        assert_eq!(Precision::F16.category(1e6), "1000000");
        assert_eq!(Precision::F32.category(f64::NAN), "NaN");
        assert_eq!(Precision::F32.join(Precision::F16), Precision::F16);
        assert_eq!(Precision::F64.join(Precision::F32), Precision::F32);
        assert_eq!(Precision::of(oip::DataType::I64), Precision::F64);
        assert_eq!(Precision::of(oip::DataType::BF16).as_str(), "BF16");
    }

    #[test]
    fn numbers_format_like_labels() {
        assert_eq!(format_number(1.0), "1");
        assert_eq!(format_number(-3.0), "-3");
        assert_eq!(format_number(-0.0), "0");
        assert_eq!(format_number(123_456_789_012_345.0), "123456789012345");
        assert_eq!(format_number(1e15), "1000000000000000");
        assert_eq!(format_number(0.25), "0.25");
    }
}
