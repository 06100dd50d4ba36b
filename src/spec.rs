//! The small concepts people write by hand, each with one type, one parser and one printer: a
//! shadow's comparison rule (`tolerance:0.01`), a prediction rule (`threshold:p:0.5:yes:no`), a
//! duration (`250ms`, `7d`) and `KEY=VALUE` pairs. `ctl`'s flags, the config, the state file and
//! the control API all go through these, so the forms cannot drift apart; their protobuf messages
//! convert in `crate::convert::spec`, one `From`/`TryFrom` pair per concept. Plain Rust: no tonic, no RocksDB,
//! no tokio.
//!
//! The serde form of [`Comparison`] and [`PredictionSpec`] is how the store keeps them (and the
//! shape of the state file's tables, which `declare` parses strictly with its own types: serde
//! cannot refuse unknown keys next to a unit variant such as `{ kind = "label" }`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A written spec that does not parse. The messages name the input as written; callers put the
/// flag or field in front (`--compare "x": expected label, bytes or tolerance:ABS[:REL]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not of the expected form.
    #[error("{input:?}: expected {expected}")]
    Form {
        /// The input as written.
        input: String,
        /// The forms it may take.
        expected: &'static str,
    },
    /// A part that must be a (finite) number is not.
    #[error("{input:?}: {part:?} is not a number")]
    Number {
        /// The input as written.
        input: String,
        /// The part at fault.
        part: String,
    },
}

/// A finite number, or `None`.
fn finite(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

// ---------------------------------------------------------------------------------------------
// Comparison rule
// ---------------------------------------------------------------------------------------------

/// When a shadow's answer agrees with production's. Written `label`, `bytes` or
/// `tolerance:ABS[:REL]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Comparison {
    /// Same predicted label per row (each version read as its registration says).
    Label,
    /// Every output value of a row within `absolute + relative × |production|`.
    Tolerance {
        /// Absolute tolerance.
        absolute: f64,
        /// Relative tolerance.
        relative: f64,
    },
    /// Byte-identical response messages (any method, parsed or not).
    Bytes,
}

/// The written forms of a [`Comparison`].
pub const COMPARISON_FORMS: &str = "label, bytes or tolerance:ABS[:REL]";

impl Comparison {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Comparison::Label => "label",
            Comparison::Tolerance { .. } => "tolerance",
            Comparison::Bytes => "bytes",
        }
    }
}

impl FromStr for Comparison {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let number = |part: &str| {
            finite(part).ok_or_else(|| SpecError::Number {
                input: s.to_string(),
                part: part.to_string(),
            })
        };
        let parts: Vec<&str> = s.split(':').collect();
        Ok(match parts.as_slice() {
            ["label"] => Comparison::Label,
            ["bytes"] => Comparison::Bytes,
            ["tolerance", abs] => Comparison::Tolerance {
                absolute: number(abs)?,
                relative: 0.0,
            },
            ["tolerance", abs, rel] => Comparison::Tolerance {
                absolute: number(abs)?,
                relative: number(rel)?,
            },
            _ => {
                return Err(SpecError::Form {
                    input: s.to_string(),
                    expected: COMPARISON_FORMS,
                })
            }
        })
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Comparison::Tolerance { absolute, relative } if *relative == 0.0 => {
                write!(f, "tolerance:{absolute}")
            }
            Comparison::Tolerance { absolute, relative } => {
                write!(f, "tolerance:{absolute}:{relative}")
            }
            other => f.write_str(other.as_str()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prediction rule
// ---------------------------------------------------------------------------------------------

/// Label a threshold rule reports above its threshold when none is given.
pub const DEFAULT_POSITIVE_LABEL: &str = "1";
/// Label a threshold rule reports at or below its threshold when none is given.
pub const DEFAULT_NEGATIVE_LABEL: &str = "0";

/// How a prediction is read from a model's response. An empty `output` means the first output.
/// Written `argmax:OUTPUT[:LABEL,…]`, `threshold:OUTPUT:T[:POS:NEG]`, `label:OUTPUT` or
/// `value:OUTPUT` (names containing `:` or `,` cannot be written this way).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PredictionSpec {
    /// Index of the largest value per row, mapped through `labels` when given.
    Argmax {
        /// Output tensor name.
        output: String,
        /// Label per class index.
        labels: Vec<String>,
    },
    /// Positive when the row's score exceeds `threshold`.
    Threshold {
        /// Output tensor name.
        output: String,
        /// Decision threshold.
        threshold: f64,
        /// Label reported above the threshold.
        positive_label: String,
        /// Label reported at or below the threshold.
        negative_label: String,
    },
    /// The output holds the label itself.
    Label {
        /// Output tensor name.
        output: String,
    },
    /// Regression: the row's value.
    Value {
        /// Output tensor name.
        output: String,
    },
}

/// The written forms of a [`PredictionSpec`].
pub const PREDICTION_FORMS: &str =
    "argmax:OUTPUT[:LABEL,…], threshold:OUTPUT:T[:POS:NEG], label:OUTPUT or value:OUTPUT";

impl Default for PredictionSpec {
    fn default() -> Self {
        PredictionSpec::Value {
            output: String::new(),
        }
    }
}

impl PredictionSpec {
    /// A threshold rule; an empty label takes its default ([`DEFAULT_POSITIVE_LABEL`],
    /// [`DEFAULT_NEGATIVE_LABEL`]), whichever form the rule arrived in.
    pub fn threshold(
        output: impl Into<String>,
        threshold: f64,
        positive_label: impl Into<String>,
        negative_label: impl Into<String>,
    ) -> Self {
        let or = |label: String, default: &str| {
            if label.is_empty() {
                default.to_string()
            } else {
                label
            }
        };
        PredictionSpec::Threshold {
            output: output.into(),
            threshold,
            positive_label: or(positive_label.into(), DEFAULT_POSITIVE_LABEL),
            negative_label: or(negative_label.into(), DEFAULT_NEGATIVE_LABEL),
        }
    }

    /// The output tensor it reads (empty: the first).
    pub fn output(&self) -> &str {
        match self {
            PredictionSpec::Argmax { output, .. }
            | PredictionSpec::Threshold { output, .. }
            | PredictionSpec::Label { output }
            | PredictionSpec::Value { output } => output,
        }
    }
}

impl FromStr for PredictionSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::Form {
            input: s.to_string(),
            expected: PREDICTION_FORMS,
        };
        let parts: Vec<&str> = s.split(':').collect();
        Ok(match parts.as_slice() {
            ["argmax", output] => PredictionSpec::Argmax {
                output: output.to_string(),
                labels: Vec::new(),
            },
            ["argmax", output, labels] => PredictionSpec::Argmax {
                output: output.to_string(),
                labels: labels.split(',').map(str::to_string).collect(),
            },
            ["threshold", output, t, rest @ ..] if rest.is_empty() || rest.len() == 2 => {
                let t = finite(t).ok_or_else(bad)?;
                let (pos, neg) = match rest {
                    [pos, neg] => (*pos, *neg),
                    _ => ("", ""),
                };
                PredictionSpec::threshold(*output, t, pos, neg)
            }
            ["label", output] => PredictionSpec::Label {
                output: output.to_string(),
            },
            ["value", output] => PredictionSpec::Value {
                output: output.to_string(),
            },
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for PredictionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PredictionSpec::Argmax { output, labels } if labels.is_empty() => {
                write!(f, "argmax:{output}")
            }
            PredictionSpec::Argmax { output, labels } => {
                write!(f, "argmax:{output}:{}", labels.join(","))
            }
            PredictionSpec::Threshold {
                output,
                threshold,
                positive_label,
                negative_label,
            } => write!(
                f,
                "threshold:{output}:{threshold}:{positive_label}:{negative_label}"
            ),
            PredictionSpec::Label { output } => write!(f, "label:{output}"),
            PredictionSpec::Value { output } => write!(f, "value:{output}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Duration
// ---------------------------------------------------------------------------------------------

/// A duration that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{input}' is not a duration like 500ms or 2s: {reason}")]
pub struct DurationError {
    /// The input as written.
    pub input: String,
    /// What is wrong with it (`ctl`'s flags show only this, as they always have).
    pub reason: String,
}

/// Parses `250ms`, `2s`, `1m30s`, `7d`… (humantime's units).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s).map_err(|e| DurationError {
        input: s.to_string(),
        reason: e.to_string(),
    })
}

/// Prints a duration the way [`parse_duration`] reads it: `1h 30m`, `250ms`.
pub fn format_duration(d: Duration) -> impl fmt::Display {
    humantime::format_duration(d)
}

// ---------------------------------------------------------------------------------------------
// KEY=VALUE pairs
// ---------------------------------------------------------------------------------------------

/// The written form of one pair.
pub const PAIR_FORM: &str = "KEY=VALUE";

/// Splits `KEY=VALUE` at the first `=`; the key must not be empty, the value may be.
pub fn parse_pair(item: &str) -> Result<(&str, &str), SpecError> {
    item.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| SpecError::Form {
            input: item.to_string(),
            expected: PAIR_FORM,
        })
}

/// Pairs into a map (a repeated key keeps its last value); `value` reads each value, `None`
/// meaning it is not a number (the only values read so far are numbers and strings).
pub fn parse_pairs<V>(
    items: &[String],
    value: impl Fn(&str) -> Option<V>,
) -> Result<BTreeMap<String, V>, SpecError> {
    let mut map = BTreeMap::new();
    for item in items {
        let (k, v) = parse_pair(item)?;
        let v = value(v).ok_or_else(|| SpecError::Number {
            input: item.clone(),
            part: v.to_string(),
        })?;
        map.insert(k.to_string(), v);
    }
    Ok(map)
}

/// A `KEY=NUMBER` value: finite numbers only (metrics, promotion gates).
pub fn number(s: &str) -> Option<f64> {
    finite(s)
}

/// Prints pairs as `KEY=VALUE`, joined by `, ` (how tables show maps).
pub fn format_pairs<K: fmt::Display, V: fmt::Display>(
    pairs: impl IntoIterator<Item = (K, V)>,
) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(written: &str) -> T
    where
        T: FromStr<Err = SpecError> + fmt::Display + PartialEq + fmt::Debug,
    {
        let parsed: T = written.parse().unwrap();
        let printed = parsed.to_string();
        assert_eq!(
            printed.parse::<T>().unwrap(),
            parsed,
            "{written} → {printed}"
        );
        parsed
    }

    #[test]
    fn comparisons_parse_what_they_print() {
        assert_eq!(round_trip::<Comparison>("label"), Comparison::Label);
        assert_eq!(round_trip::<Comparison>("bytes"), Comparison::Bytes);
        let t = round_trip::<Comparison>("tolerance:0.01");
        assert_eq!(
            t,
            Comparison::Tolerance {
                absolute: 0.01,
                relative: 0.0
            }
        );
        assert_eq!(t.to_string(), "tolerance:0.01");
        let t = round_trip::<Comparison>("tolerance:0.5:0.25");
        assert_eq!(t.to_string(), "tolerance:0.5:0.25");
        for c in [
            Comparison::Label,
            Comparison::Bytes,
            Comparison::Tolerance {
                absolute: 1e-9,
                relative: 0.1 + 0.2,
            },
        ] {
            assert_eq!(c.to_string().parse::<Comparison>().unwrap(), c);
        }
    }

    #[test]
    fn comparisons_refuse_what_ctl_always_refused() {
        let err = |s: &str| s.parse::<Comparison>().unwrap_err().to_string();
        assert_eq!(
            err("same"),
            "\"same\": expected label, bytes or tolerance:ABS[:REL]"
        );
        assert_eq!(
            err("tolerance"),
            "\"tolerance\": expected label, bytes or tolerance:ABS[:REL]"
        );
        assert_eq!(err("tolerance:x"), "\"tolerance:x\": \"x\" is not a number");
        assert_eq!(
            err("tolerance:0.1:nan"),
            "\"tolerance:0.1:nan\": \"nan\" is not a number"
        );
    }

    #[test]
    fn predictions_parse_what_they_print() {
        assert_eq!(
            round_trip::<PredictionSpec>("threshold:probabilities:0.5:yes:no"),
            PredictionSpec::Threshold {
                output: "probabilities".into(),
                threshold: 0.5,
                positive_label: "yes".into(),
                negative_label: "no".into()
            }
        );
        // Without labels, the same defaults as the API and the state file.
        let t = round_trip::<PredictionSpec>("threshold:p:0.25");
        assert_eq!(t.to_string(), "threshold:p:0.25:1:0");
        assert_eq!(
            round_trip::<PredictionSpec>("argmax:p:a,b"),
            PredictionSpec::Argmax {
                output: "p".into(),
                labels: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(
            round_trip::<PredictionSpec>("argmax:p").to_string(),
            "argmax:p"
        );
        assert_eq!(
            round_trip::<PredictionSpec>("label:label"),
            PredictionSpec::Label {
                output: "label".into()
            }
        );
        assert_eq!(round_trip::<PredictionSpec>("value:").output(), "");
    }

    #[test]
    fn predictions_refuse_what_ctl_always_refused() {
        for bad in [
            "softmax:p",
            "argmax",
            "threshold:p",
            "threshold:p:x",
            "threshold:p:inf",
            "threshold:p:0.5:yes",
            "label:a:b",
        ] {
            assert_eq!(
                bad.parse::<PredictionSpec>().unwrap_err().to_string(),
                format!("{bad:?}: expected argmax:OUTPUT[:LABEL,…], threshold:OUTPUT:T[:POS:NEG], label:OUTPUT or value:OUTPUT")
            );
        }
    }

    #[test]
    fn durations_parse_what_they_print() {
        for written in ["250ms", "2s", "1m 30s", "7days", "1h", "1.5s"] {
            let d = parse_duration(written).unwrap();
            assert_eq!(parse_duration(&format_duration(d).to_string()).unwrap(), d);
        }
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            format_duration(Duration::from_millis(300)).to_string(),
            "300ms"
        );
        assert_eq!(format_duration(Duration::from_secs(3600)).to_string(), "1h");
        let e = parse_duration("soon").unwrap_err();
        assert_eq!(
            e.to_string(),
            "'soon' is not a duration like 500ms or 2s: expected number at 0"
        );
        assert_eq!(e.reason, "expected number at 0");
    }

    #[test]
    fn pairs_parse_what_they_print() {
        let items = vec!["accuracy=0.91".to_string(), "f1=0.5".to_string()];
        let map = parse_pairs(&items, number).unwrap();
        let printed = format_pairs(&map);
        assert_eq!(printed, "accuracy=0.91, f1=0.5");
        let again: Vec<String> = printed.split(", ").map(str::to_string).collect();
        assert_eq!(parse_pairs(&again, number).unwrap(), map);
        let tags = parse_pairs(&["team=risk".into(), "note=a=b".into(), "e=".into()], |v| {
            Some(v.to_string())
        })
        .unwrap();
        assert_eq!(tags["note"], "a=b");
        assert_eq!(tags["e"], "");
    }

    #[test]
    fn pairs_refuse_what_ctl_always_refused() {
        let err = |items: &[&str]| {
            let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
            parse_pairs(&items, number).unwrap_err().to_string()
        };
        assert_eq!(err(&["acc"]), "\"acc\": expected KEY=VALUE");
        assert_eq!(err(&["=1"]), "\"=1\": expected KEY=VALUE");
        assert_eq!(err(&["acc=high"]), "\"acc=high\": \"high\" is not a number");
        assert_eq!(err(&["acc=inf"]), "\"acc=inf\": \"inf\" is not a number");
    }
}
