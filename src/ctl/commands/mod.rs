//! One file per command group: its flags (clap), the typed requests they make — built and
//! checked before connecting — and how each answer is shown. The helpers here read what several
//! groups share: input files, feature values, timestamps, durations and `KEY=VALUE` flags.

pub mod call;
pub mod drift;
pub mod events;
pub mod experiments;
pub mod features;
pub mod models;
pub mod outcomes;
pub mod predictions;
pub mod shadows;

use std::collections::HashMap;
use std::time::Duration;

use prost::Name;

use super::client::{timestamp_from_json, CtlError};
use crate::pb::modelgate::v1 as pb;
use crate::spec;

/// A usage error (exit code 2).
pub(crate) fn usage(msg: impl Into<String>) -> CtlError {
    CtlError::Usage(msg.into())
}

/// A file's text, or stdin's for `-`.
pub(crate) fn read_input(path: &str) -> Result<String, CtlError> {
    if path == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| usage(format!("stdin: {e}")))
    } else {
        std::fs::read_to_string(path).map_err(|e| usage(format!("{path}: {e}")))
    }
}

/// A feature value: a number when it reads as one, else text.
pub(crate) fn feature_value(s: &str) -> pb::FeatureValue {
    use pb::feature_value::Kind;
    let kind = match s.parse::<f64>() {
        Ok(x) if x.is_finite() => Kind::Number(x),
        _ => Kind::Text(s.to_string()),
    };
    pb::FeatureValue { kind: Some(kind) }
}

/// An RFC 3339 flag value of a request `R`, refused with the message proto JSON gives.
pub(crate) fn timestamp<R: Name>(value: &str) -> Result<prost_types::Timestamp, CtlError> {
    timestamp_from_json(value).map_err(|e| usage(format!("not a valid {}: {e}", R::full_name())))
}

/// `KEY=VALUE` flags into a map; `value` reads each value (`None`: not a number).
pub(crate) fn pairs<V>(
    flag: &str,
    items: &[String],
    value: impl Fn(&str) -> Option<V>,
) -> Result<HashMap<String, V>, CtlError> {
    spec::parse_pairs(items, value)
        .map(|m| m.into_iter().collect())
        .map_err(|e| usage(format!("{flag} {e}")))
}

/// clap's parser of duration flags: [`spec::parse_duration`], with the bare reason clap has
/// always shown after `invalid value '…' for '--flag'`.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    spec::parse_duration(s).map_err(|e| e.reason)
}

/// An optional span as its protobuf message.
pub(crate) fn duration_pb(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.map(crate::convert::spec::duration_to_pb)
}
