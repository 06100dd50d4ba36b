//! Conversions between domain values and the protobuf messages that carry them — on the control
//! API and in stored records — one pair per value, here rather than in each adapter. The specs'
//! messages (comparison and prediction rules, durations) are in [`spec`].

pub mod drift;
pub mod experiments;
pub mod prediction_record;
pub mod records;
pub mod registry;
pub mod shadows;
pub mod spec;

use crate::outcome::Actual;
use crate::pb::modelgate::v1 as pb;
use crate::record::{FeatureValue, Prediction};

pub use crate::pb::timestamp;

/// A prediction as records and the API carry it.
pub fn prediction_to_pb(p: &Prediction) -> pb::PredictionValue {
    pb::PredictionValue {
        kind: Some(match p {
            Prediction::Label(l) => pb::prediction_value::Kind::Label(l.clone()),
            Prediction::Value(v) => pb::prediction_value::Kind::Value(*v),
        }),
    }
}

/// A stored prediction, back.
pub fn prediction_from_pb(p: &pb::PredictionValue) -> Option<Prediction> {
    match p.kind.as_ref()? {
        pb::prediction_value::Kind::Label(l) => Some(Prediction::Label(l.clone())),
        pb::prediction_value::Kind::Value(v) => Some(Prediction::Value(*v)),
    }
}

/// A feature value as records and the API carry it.
pub fn feature_value_to_pb(v: &FeatureValue) -> pb::FeatureValue {
    pb::FeatureValue {
        kind: Some(match v {
            FeatureValue::Number(x) => pb::feature_value::Kind::Number(*x),
            FeatureValue::Text(s) => pb::feature_value::Kind::Text(s.clone()),
        }),
    }
}

/// A stored feature value, back.
pub fn feature_value_from_pb(v: pb::FeatureValue) -> Option<FeatureValue> {
    match v.kind? {
        pb::feature_value::Kind::Number(x) => Some(FeatureValue::Number(x)),
        pb::feature_value::Kind::Text(s) => Some(FeatureValue::Text(s)),
    }
}

/// An outcome's actual value as the record keeps it.
pub fn actual_to_pb(a: &Actual) -> pb::Actual {
    use pb::actual::Kind;
    pb::Actual {
        kind: Some(match a {
            Actual::Label(s) => Kind::Label(s.clone()),
            Actual::IntLabel(i) => Kind::IntLabel(*i),
            Actual::Number(x) => Kind::Number(*x),
            Actual::Success(b) => Kind::Success(*b),
        }),
    }
}

/// An actual value from the API: the field at fault and why, when it is not one.
pub fn actual_from_pb(a: Option<&pb::Actual>) -> Result<Actual, (&'static str, String)> {
    use pb::actual::Kind;
    match a.and_then(|a| a.kind.as_ref()) {
        Some(Kind::Label(s)) => Ok(Actual::Label(s.clone())),
        Some(Kind::IntLabel(i)) => Ok(Actual::IntLabel(*i)),
        Some(Kind::Number(x)) if x.is_finite() => Ok(Actual::Number(*x)),
        Some(Kind::Number(x)) => Err(("actual.number", format!("{x} is not a finite number"))),
        Some(Kind::Success(b)) => Ok(Actual::Success(*b)),
        None => Err((
            "actual",
            "required: one of label, int_label, number or success".into(),
        )),
    }
}

/// Unix milliseconds of a protobuf timestamp: the field at fault and why, when it is not one.
pub fn timestamp_ms(
    t: &prost_types::Timestamp,
    field: &'static str,
) -> Result<u64, (&'static str, String)> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err((field, "must be a valid time after 1970".into()));
    }
    Ok(t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}
