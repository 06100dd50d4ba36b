//! The specs' protobuf messages: one `From`/`TryFrom` pair per concept, used by the control
//! services (answers and requests) and by `ctl` (requests). `TryFrom` refuses only what the
//! message itself cannot mean (an unset `oneof`, a negative span); the rules of each concept
//! (finite thresholds, tolerances ≥ 0) stay with the registry and the shadows.

use std::time::Duration;

use crate::pb::modelgate::v1 as pb;
use crate::spec::{Comparison, PredictionSpec};

/// A `oneof` left unset where one of its cases is required.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("set one of {0}")]
pub struct Unset(pub &'static str);

/// A negative `google.protobuf.Duration` where a span is expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("must not be negative")]
pub struct NegativeDuration;

impl From<&Comparison> for pb::ShadowComparison {
    fn from(c: &Comparison) -> Self {
        use pb::shadow_comparison::Kind;
        pb::ShadowComparison {
            kind: Some(match *c {
                Comparison::Label => Kind::Label(pb::SameLabel {}),
                Comparison::Tolerance { absolute, relative } => {
                    Kind::Tolerance(pb::WithinTolerance { absolute, relative })
                }
                Comparison::Bytes => Kind::Bytes(pb::SameBytes {}),
            }),
        }
    }
}

impl TryFrom<pb::ShadowComparison> for Comparison {
    type Error = Unset;

    fn try_from(c: pb::ShadowComparison) -> Result<Self, Unset> {
        use pb::shadow_comparison::Kind;
        match c.kind {
            None => Err(Unset(
                "label, tolerance, bytes (or leave it unset for label)",
            )),
            Some(Kind::Label(_)) => Ok(Comparison::Label),
            Some(Kind::Tolerance(t)) => Ok(Comparison::Tolerance {
                absolute: t.absolute,
                relative: t.relative,
            }),
            Some(Kind::Bytes(_)) => Ok(Comparison::Bytes),
        }
    }
}

impl From<&PredictionSpec> for pb::PredictionSpec {
    fn from(p: &PredictionSpec) -> Self {
        use pb::prediction_spec::Kind;
        let kind = match p.clone() {
            PredictionSpec::Argmax { output, labels } => {
                Kind::Argmax(pb::ArgmaxPrediction { output, labels })
            }
            PredictionSpec::Threshold {
                output,
                threshold,
                positive_label,
                negative_label,
            } => Kind::Threshold(pb::ThresholdPrediction {
                output,
                threshold,
                positive_label,
                negative_label,
            }),
            PredictionSpec::Label { output } => Kind::Label(pb::LabelPrediction { output }),
            PredictionSpec::Value { output } => Kind::Value(pb::ValuePrediction { output }),
        };
        pb::PredictionSpec { kind: Some(kind) }
    }
}

impl TryFrom<pb::PredictionSpec> for PredictionSpec {
    type Error = Unset;

    /// Empty threshold labels take their defaults, as in every other form.
    fn try_from(p: pb::PredictionSpec) -> Result<Self, Unset> {
        use pb::prediction_spec::Kind;
        Ok(match p.kind {
            None => return Err(Unset("argmax, threshold, label, value")),
            Some(Kind::Argmax(a)) => PredictionSpec::Argmax {
                output: a.output,
                labels: a.labels,
            },
            Some(Kind::Threshold(t)) => {
                PredictionSpec::threshold(t.output, t.threshold, t.positive_label, t.negative_label)
            }
            Some(Kind::Label(l)) => PredictionSpec::Label { output: l.output },
            Some(Kind::Value(v)) => PredictionSpec::Value { output: v.output },
        })
    }
}

/// A span as a `google.protobuf.Duration` (both types are foreign, so a function rather than
/// `From`; prost's own conversion is fallible and normalises, which these fields never need).
pub fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A `google.protobuf.Duration` as a span; a negative part (seconds or nanos) is refused.
pub fn duration_from_pb(d: &prost_types::Duration) -> Result<Duration, NegativeDuration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(NegativeDuration);
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_survive_the_message() {
        for c in [
            Comparison::Label,
            Comparison::Bytes,
            Comparison::Tolerance {
                absolute: 0.01,
                relative: 0.5,
            },
        ] {
            assert_eq!(Comparison::try_from(pb::ShadowComparison::from(&c)), Ok(c));
        }
        assert_eq!(
            Comparison::try_from(pb::ShadowComparison { kind: None })
                .unwrap_err()
                .to_string(),
            "set one of label, tolerance, bytes (or leave it unset for label)"
        );
    }

    #[test]
    fn predictions_survive_the_message() {
        for written in [
            "argmax:p:a,b",
            "argmax:",
            "threshold:p:0.5:yes:no",
            "label:label",
            "value:y",
        ] {
            let p: PredictionSpec = written.parse().unwrap();
            assert_eq!(
                PredictionSpec::try_from(pb::PredictionSpec::from(&p)),
                Ok(p)
            );
        }
        let bare = pb::PredictionSpec {
            kind: Some(pb::prediction_spec::Kind::Threshold(
                pb::ThresholdPrediction {
                    output: "p".into(),
                    threshold: 0.5,
                    ..Default::default()
                },
            )),
        };
        assert_eq!(
            PredictionSpec::try_from(bare).unwrap().to_string(),
            "threshold:p:0.5:1:0"
        );
        assert_eq!(
            PredictionSpec::try_from(pb::PredictionSpec { kind: None })
                .unwrap_err()
                .to_string(),
            "set one of argmax, threshold, label, value"
        );
    }

    #[test]
    fn durations_survive_the_message() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(3600),
            Duration::new(2, 1),
        ] {
            assert_eq!(duration_from_pb(&duration_to_pb(d)), Ok(d));
        }
        assert_eq!(
            duration_to_pb(Duration::from_millis(1500)),
            prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        for bad in [(-1, 0), (0, -1)] {
            let d = prost_types::Duration {
                seconds: bad.0,
                nanos: bad.1,
            };
            assert_eq!(
                duration_from_pb(&d).unwrap_err().to_string(),
                "must not be negative"
            );
        }
    }
}
