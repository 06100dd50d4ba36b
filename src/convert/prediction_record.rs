//! A prediction record encoded for storage straight from what the record writer holds: the
//! `PredictionRecord` protobuf, byte for byte what prost writes for the same message, without
//! first copying every feature name, value and id into a message (that copy, and freeing it
//! again, was about a tenth of the writer's work per call; the names are shared, see
//! `record::extract_features`).
//!
//! Or in two parts ([`encode_shared`], [`encode_own`]): what a model's records share — its name,
//! the method called, the feature names — encoded once, and what is the record's own, without
//! its request id (the store's key). Protobuf reads fields in any order and a repeated field's
//! elements in the order met, so the request id, the shared part and the own part one after the
//! other ([`reassemble`]) are the same message. The own part also packs each row of numbers:
//! 4 bytes a number when every one is a float exactly (FP32 inputs), else 8, where a `FeatureRow`
//! spends 11 (fields 60 and 61, reserved in `PredictionRecord`; [`reassemble`] writes them back
//! as `FeatureRow`s).

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::record::{exact_f32, FeatureValue, Prediction};

/// The fields of a `PredictionRecord`, borrowed (`outcomes` are never stored with the record).
pub struct RecordParts<'a> {
    /// Field 1.
    pub request_id: &'a str,
    /// Field 2, as a `Timestamp`.
    pub time_ms: u64,
    /// Field 3.
    pub model: &'a str,
    /// Field 4.
    pub version: u32,
    /// Field 5.
    pub experiment: &'a str,
    /// Field 6.
    pub variant: &'a str,
    /// Field 7.
    pub unit_id: &'a str,
    /// Field 8.
    pub method: &'a str,
    /// Field 9.
    pub status_code: i32,
    /// Field 10.
    pub upstream_latency_us: u64,
    /// Field 11.
    pub latency_us: u64,
    /// Field 12.
    pub feature_names: &'a [String],
    /// Field 13 (`FeatureRow`s).
    pub rows: &'a [Vec<FeatureValue>],
    /// Field 14 (`PredictionValue`s).
    pub predictions: &'a [Prediction],
    /// Field 15 (an unknown entity is the empty string).
    pub entity_ids: &'a [Option<String>],
    /// Field 16.
    pub note: &'a str,
    /// Field 18.
    pub variant_forced: bool,
}

/// Encodes the record as prost would: fields in number order, proto3 defaults left out, every
/// element of a repeated field and every set oneof written.
pub fn encode(p: &RecordParts) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len_bound(p) + p.method.len() + names_len(p));
    string(1, p.request_id, &mut out);
    fields(p, true, &mut out);
    out
}

/// The fields of `p` that are its own: all but its request id (1), model (3), method (8) and
/// feature names (12), which [`reassemble`] puts back.
pub fn encode_own(p: &RecordParts) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len_bound(p));
    fields(p, false, &mut out);
    out
}

/// What the records of one model, called by one method with one table of feature names, share:
/// fields 3, 8 and 12.
pub fn encode_shared(model: &str, method: &str, names: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(model.len() + method.len() + 4 + names.len());
    string(3, model, &mut out);
    string(8, method, &mut out);
    for name in names {
        element(12, name, &mut out);
    }
    out
}

/// The record whose request id is `request_id`, whose shared fields are `shared`
/// ([`encode_shared`]) and whose own are `own` ([`encode_own`]): its packed rows written as
/// `FeatureRow`s. Own fields that do not scan, or a packed row cut short, end the message with a
/// zero byte, which no message holds: decoding refuses the record rather than skip a row (a
/// decoder skips the packed rows' field numbers, unknown to it).
pub fn reassemble(request_id: &str, shared: &[u8], own: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(request_id.len() + 2 + shared.len() + own.len() * 2);
    string(1, request_id, &mut out);
    out.extend_from_slice(shared);
    let mut copied = 0;
    for f in crate::wire::fields(own) {
        let Ok(f) = f else {
            out.extend_from_slice(&own[copied..]);
            out.push(0);
            return out;
        };
        let width = match f.number {
            PACKED_FLOATS => 4,
            PACKED_DOUBLES => 8,
            _ => continue,
        };
        let Some(payload) = f.payload.filter(|p| p.len() % width == 0) else {
            out.extend_from_slice(&own[copied..]);
            out.push(0);
            return out;
        };
        out.extend_from_slice(&own[copied..f.whole.start]);
        copied = f.whole.end;
        let numbers = own[payload].chunks_exact(width).map(|b| match *b {
            [a, b, c, d] => f64::from(f32::from_le_bytes([a, b, c, d])),
            _ => f64::from_le_bytes(b.try_into().expect("8 bytes")),
        });
        // A number's `FeatureValue` is as long whatever the number.
        let len = numbers.len() * value_len(&FeatureValue::Number(0.0));
        encode_key(13, WireType::LengthDelimited, &mut out);
        encode_varint(len as u64, &mut out);
        for x in numbers {
            feature_value(1, &FeatureValue::Number(x), &mut out);
        }
    }
    out.extend_from_slice(&own[copied..]);
    out
}

/// Own fields holding a row of numbers, each 4 bytes (an `f32`, LE) or 8 (an `f64`, LE).
const PACKED_FLOATS: u32 = 60;
const PACKED_DOUBLES: u32 = 61;

/// Field 13: a `FeatureRow` of `row`.
fn feature_row(row: &[FeatureValue], out: &mut Vec<u8>) {
    encode_key(13, WireType::LengthDelimited, out);
    encode_varint(row.iter().map(value_len).sum::<usize>() as u64, out);
    for v in row {
        feature_value(1, v, out);
    }
}

/// A row as its own part holds it: packed when every value is a number.
fn own_row(row: &[FeatureValue], out: &mut Vec<u8>) {
    let number = |v: &FeatureValue| match v {
        FeatureValue::Number(x) => Some(*x),
        FeatureValue::Text(_) => None,
    };
    if row.iter().any(|v| number(v).is_none()) {
        feature_row(row, out);
        return;
    }
    let numbers = || row.iter().filter_map(number);
    // Bit for bit: a NaN's payload and a zero's sign come back as they were.
    if numbers().all(|x| exact_f32(x).is_some()) {
        encode_key(PACKED_FLOATS, WireType::LengthDelimited, out);
        encode_varint((row.len() * 4) as u64, out);
        numbers().for_each(|x| out.extend_from_slice(&(x as f32).to_le_bytes()));
    } else {
        encode_key(PACKED_DOUBLES, WireType::LengthDelimited, out);
        encode_varint((row.len() * 8) as u64, out);
        numbers().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
}

/// About the bytes of a record's own fields (an upper bound for numbers).
fn encoded_len_bound(p: &RecordParts) -> usize {
    let values: usize = p.rows.iter().map(|r| r.len() * 11 + 2).sum();
    96 + p.request_id.len() + p.unit_id.len() + values + p.predictions.len() * 12
}

fn names_len(p: &RecordParts) -> usize {
    p.feature_names.iter().map(|n| n.len() + 2).sum()
}

/// Every field but the request id (1); the model (3), method (8) and names (12) only when
/// `shared`.
fn fields(p: &RecordParts, shared: bool, out: &mut Vec<u8>) {
    let (seconds, nanos) = (p.time_ms / 1000, (p.time_ms % 1000) * 1_000_000);
    let time_len = scalar_len(1, seconds) + scalar_len(2, nanos);
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(time_len as u64, out);
    scalar(1, seconds, out);
    scalar(2, nanos, out);
    if shared {
        string(3, p.model, out);
    }
    scalar(4, u64::from(p.version), out);
    string(5, p.experiment, out);
    string(6, p.variant, out);
    string(7, p.unit_id, out);
    if shared {
        string(8, p.method, out);
    }
    // An int32 is written as its sign extension to 64 bits.
    scalar(9, p.status_code as i64 as u64, out);
    scalar(10, p.upstream_latency_us, out);
    scalar(11, p.latency_us, out);
    if shared {
        for name in p.feature_names {
            element(12, name, out);
        }
    }
    for row in p.rows {
        if shared {
            feature_row(row, out);
        } else {
            own_row(row, out);
        }
    }
    for prediction in p.predictions {
        let inner = match prediction {
            Prediction::Label(l) => delimited_len(1, l.len()),
            Prediction::Value(_) => 9,
        };
        encode_key(14, WireType::LengthDelimited, out);
        encode_varint(inner as u64, out);
        match prediction {
            Prediction::Label(l) => element(1, l, out),
            Prediction::Value(x) => double(2, *x, out),
        }
    }
    for entity in p.entity_ids {
        element(15, entity.as_deref().unwrap_or_default(), out);
    }
    string(16, p.note, out);
    scalar(18, u64::from(p.variant_forced), out);
}

/// Field `tag` holding a `FeatureValue` message (always written: an element or a oneof).
/// A number, the common case, is one copy of its 11 bytes (`tag` must be below 16, a one-byte
/// key, as every caller's is).
pub(crate) fn feature_value(tag: u32, v: &FeatureValue, out: &mut Vec<u8>) {
    debug_assert!(tag < 16);
    match v {
        FeatureValue::Number(x) => {
            // Key, length 9, then `number` (1): key 0x09 and the double.
            let mut bytes = [(tag << 3) as u8 | 2, 9, 0x09, 0, 0, 0, 0, 0, 0, 0, 0];
            bytes[3..].copy_from_slice(&x.to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        FeatureValue::Text(s) => {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(value_inner_len(v) as u64, out);
            element(2, s, out);
        }
    }
}

/// A singular string: left out when empty.
pub(crate) fn string(tag: u32, s: &str, out: &mut Vec<u8>) {
    if !s.is_empty() {
        element(tag, s, out);
    }
}

/// A string of a repeated field or a oneof: always written.
fn element(tag: u32, s: &str, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// A varint scalar: left out when zero.
fn scalar(tag: u32, v: u64, out: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

/// The encoded length of [`scalar`].
fn scalar_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

/// A double of a oneof: always written.
fn double(tag: u32, x: f64, out: &mut Vec<u8>) {
    encode_key(tag, WireType::SixtyFourBit, out);
    out.extend_from_slice(&x.to_le_bytes());
}

pub(crate) fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// The encoded length of a `FeatureValue` message (a double, or a string).
pub(crate) fn value_inner_len(v: &FeatureValue) -> usize {
    match v {
        FeatureValue::Number(_) => 9,
        FeatureValue::Text(s) => delimited_len(2, s.len()),
    }
}

/// The encoded length of a `FeatureValue` as an element of `FeatureRow.values`.
fn value_len(v: &FeatureValue) -> usize {
    delimited_len(1, value_inner_len(v))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::pb::modelgate::v1 as pb;

    /// The message prost would encode for the same parts.
    fn message(p: &RecordParts) -> pb::PredictionRecord {
        pb::PredictionRecord {
            request_id: p.request_id.into(),
            time: Some(crate::pb::timestamp(p.time_ms)),
            model: p.model.into(),
            version: p.version,
            experiment: p.experiment.into(),
            variant: p.variant.into(),
            unit_id: p.unit_id.into(),
            method: p.method.into(),
            status_code: p.status_code,
            upstream_latency_us: p.upstream_latency_us,
            latency_us: p.latency_us,
            feature_names: p.feature_names.to_vec(),
            rows: p
                .rows
                .iter()
                .map(|r| pb::FeatureRow {
                    values: r.iter().map(crate::convert::feature_value_to_pb).collect(),
                })
                .collect(),
            predictions: p
                .predictions
                .iter()
                .map(crate::convert::prediction_to_pb)
                .collect(),
            entity_ids: p
                .entity_ids
                .iter()
                .map(|e| e.clone().unwrap_or_default())
                .collect(),
            note: p.note.into(),
            outcomes: Vec::new(),
            variant_forced: p.variant_forced,
        }
    }

    #[test]
    fn records_encode_as_prost_encodes_them() {
        let long = "é".repeat(100);
        let names: Vec<String> = (0..20).map(|i| format!("input[{i}]")).collect();
        let rows = vec![
            vec![
                FeatureValue::Number(0.0),
                FeatureValue::Number(-1.5e300),
                FeatureValue::Text(String::new()),
                FeatureValue::Text(long.clone()),
            ],
            vec![],
            (0..20)
                .map(|i| FeatureValue::Number(f64::from(i)))
                .collect(),
            // Not all floats: packed as doubles, a NaN's payload and a zero's sign kept.
            vec![
                FeatureValue::Number(0.1),
                FeatureValue::Number(f64::from_bits(0x7ff8_0000_0000_0001)),
                FeatureValue::Number(-0.0),
            ],
            // Floats, a float NaN and infinities among them.
            vec![
                FeatureValue::Number(f64::from(f32::NAN)),
                FeatureValue::Number(f64::INFINITY),
                FeatureValue::Number(-0.0),
                FeatureValue::Number(f64::from(0.1f32)),
            ],
        ];
        let predictions = vec![
            Prediction::Label(String::new()),
            Prediction::Label("setosa".into()),
            Prediction::Value(0.0),
            Prediction::Value(f64::NAN),
        ];
        let entities = vec![None, Some("user-7".to_string()), Some(String::new())];
        let full = RecordParts {
            request_id: "0193a1b2-req",
            time_ms: 1_733_000_000_123,
            model: "iris",
            version: 3,
            experiment: "ab",
            variant: "treatment",
            unit_id: "user-7",
            method: "/inference.GRPCInferenceService/ModelInfer",
            status_code: 14,
            upstream_latency_us: 1234,
            latency_us: 1_000_000_000_000,
            feature_names: &names,
            rows: &rows,
            predictions: &predictions,
            entity_ids: &entities,
            note: &long,
            variant_forced: true,
        };
        let empty = RecordParts {
            request_id: "",
            time_ms: 0,
            model: "",
            version: 0,
            experiment: "",
            variant: "",
            unit_id: "",
            method: "",
            status_code: 0,
            upstream_latency_us: 0,
            latency_us: 0,
            feature_names: &[],
            rows: &[],
            predictions: &[],
            entity_ids: &[],
            note: "",
            variant_forced: false,
        };
        let whole_seconds = RecordParts {
            time_ms: 5_000,
            status_code: -1,
            ..empty
        };
        for parts in [&full, &empty, &whole_seconds] {
            let expected = message(parts);
            let bytes = encode(parts);
            assert_eq!(bytes, expected.encode_to_vec());
            let back = pb::PredictionRecord::decode(&bytes[..]).unwrap();
            assert_eq!(back.feature_names, expected.feature_names);
            assert_eq!(back.rows.len(), parts.rows.len());
            // In two parts, put back together: the same message.
            let shared = encode_shared(parts.model, parts.method, parts.feature_names);
            let own = encode_own(parts);
            assert!(own.len() + shared.len() < bytes.len() || parts.request_id.is_empty());
            let whole = reassemble(parts.request_id, &shared, &own);
            // Re-encoded in field order (a NaN prediction is not equal to itself).
            let back = pb::PredictionRecord::decode(&whole[..]).unwrap();
            assert_eq!(back.encode_to_vec(), bytes);
            // The part of its own holds none of the shared fields, nor the request id, nor a
            // row of numbers as a `FeatureRow` (only the row with text).
            let alone = pb::PredictionRecord::decode(&own[..]).unwrap();
            assert_eq!(
                (alone.request_id, alone.model, alone.method),
                (String::new(), String::new(), String::new())
            );
            assert!(alone.feature_names.is_empty());
            let texts = parts
                .rows
                .iter()
                .filter(|r| r.iter().any(|v| matches!(v, FeatureValue::Text(_))));
            assert_eq!(alone.rows.len(), texts.count());
        }
        // A damaged own part is refused, not read without the row it cannot read.
        let own = encode_own(&full);
        let packed = crate::wire::fields(&own)
            .map(Result::unwrap)
            .filter(|f| f.number == PACKED_FLOATS)
            .find_map(|f| f.payload.filter(|p| !p.is_empty()))
            .unwrap();
        // Its length one short: a row of 3¾ floats.
        let mut cut = own.clone();
        cut[packed.start - 1] -= 1;
        let back = reassemble("r", &[], &cut);
        assert!(pb::PredictionRecord::decode(&back[..]).is_err());
        // Cut inside its note: the own part does not scan.
        let back = reassemble("r", &[], &own[..own.len() - 10]);
        assert!(pb::PredictionRecord::decode(&back[..]).is_err());
        // Packed: a number in 4 bytes (floats) or 8, not 11.
        let floats = [vec![FeatureValue::Number(0.5); 16]];
        let packed = RecordParts {
            rows: &floats,
            ..empty
        };
        let row = encode(&packed).len();
        assert_eq!(encode_own(&packed).len(), row - 16 * 11 + 16 * 4);
    }
}
