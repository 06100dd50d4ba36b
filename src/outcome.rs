//! Outcomes: judging a prediction against the truth that arrives later, and the performance
//! figures (accuracy, MAE, RMSE) kept from those judgements.

use serde::{Deserialize, Serialize};

use crate::record::{format_number, Prediction};

/// The truth for one row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Actual {
    /// A class label.
    Label(String),
    /// An integer class label.
    IntLabel(i64),
    /// A number (regression target).
    Number(f64),
    /// An explicit verdict.
    Success(bool),
}

/// What an outcome says about its prediction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Right or wrong, when that can be said (classification, explicit flags).
    pub success: Option<bool>,
    /// prediction − actual, for regression.
    pub error: Option<f64>,
}

/// Why an outcome cannot be judged against its prediction.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JudgeError {
    /// The actual is not a kind the prediction can be compared with.
    #[error("actual: {0}")]
    Mismatch(String),
    /// There is no prediction to compare with.
    #[error("the request has no prediction to compare with (not an OIP inference, or its answer could not be read); send an explicit success flag")]
    NoPrediction,
}

/// Judges `actual` against `prediction`.
pub fn judge(prediction: Option<&Prediction>, actual: &Actual) -> Result<Judgement, JudgeError> {
    if let Actual::Success(b) = actual {
        return Ok(Judgement {
            success: Some(*b),
            error: None,
        });
    }
    if let Actual::Number(x) = actual {
        if !x.is_finite() {
            return Err(JudgeError::Mismatch(format!("{x} is not a finite number")));
        }
    }
    match prediction.ok_or(JudgeError::NoPrediction)? {
        Prediction::Label(p) => {
            let actual = match actual {
                Actual::Label(s) => s.clone(),
                Actual::IntLabel(i) => i.to_string(),
                Actual::Number(x) => format_number(*x),
                Actual::Success(_) => unreachable!("handled above"),
            };
            Ok(Judgement {
                success: Some(*p == actual),
                error: None,
            })
        }
        Prediction::Value(v) => {
            let x = match actual {
                Actual::Number(x) => *x,
                Actual::IntLabel(i) => *i as f64,
                Actual::Label(s) => s.trim().parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| {
                    JudgeError::Mismatch(format!(
                        "the model predicts numbers; '{s}' is not one (send a number or a success flag)"
                    ))
                })?,
                Actual::Success(_) => unreachable!("handled above"),
            };
            Ok(Judgement {
                success: None,
                error: Some(v - x),
            })
        }
    }
}

/// Running sums over judgements; exact, and reversible (an overwritten outcome is subtracted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Outcomes recorded.
    pub outcomes: u64,
    /// Outcomes with a right/wrong verdict.
    pub judged: u64,
    /// Right ones.
    pub successes: u64,
    /// Outcomes with a numeric error.
    pub regression: u64,
    /// Σ |error|.
    pub abs_error: f64,
    /// Σ error².
    pub sq_error: f64,
}

/// The change one judgement makes to a tally (negated to take it back).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TallyDelta {
    /// Δ outcomes.
    pub outcomes: i64,
    /// Δ judged.
    pub judged: i64,
    /// Δ successes.
    pub successes: i64,
    /// Δ regression outcomes.
    pub regression: i64,
    /// Δ Σ|error|.
    pub abs_error: f64,
    /// Δ Σ error².
    pub sq_error: f64,
}

impl TallyDelta {
    /// What adding `j` changes.
    pub fn of(j: &Judgement) -> Self {
        TallyDelta {
            outcomes: 1,
            judged: j.success.is_some() as i64,
            successes: (j.success == Some(true)) as i64,
            regression: j.error.is_some() as i64,
            abs_error: j.error.map(f64::abs).unwrap_or(0.0),
            sq_error: j.error.map(|e| e * e).unwrap_or(0.0),
        }
    }

    /// Both changes together.
    pub fn plus(self, o: Self) -> Self {
        TallyDelta {
            outcomes: self.outcomes + o.outcomes,
            judged: self.judged + o.judged,
            successes: self.successes + o.successes,
            regression: self.regression + o.regression,
            abs_error: self.abs_error + o.abs_error,
            sq_error: self.sq_error + o.sq_error,
        }
    }

    /// The opposite change.
    pub fn negate(self) -> Self {
        TallyDelta {
            outcomes: -self.outcomes,
            judged: -self.judged,
            successes: -self.successes,
            regression: -self.regression,
            abs_error: -self.abs_error,
            sq_error: -self.sq_error,
        }
    }
}

impl Tally {
    /// Adds one judgement.
    pub fn add(&mut self, j: &Judgement) {
        let d = TallyDelta::of(j);
        self.outcomes += d.outcomes as u64;
        self.judged += d.judged as u64;
        self.successes += d.successes as u64;
        self.regression += d.regression as u64;
        self.abs_error += d.abs_error;
        self.sq_error += d.sq_error;
    }

    /// Adds another tally (another replica's share of the same version's outcomes).
    pub fn merge(&mut self, o: &Tally) {
        self.outcomes += o.outcomes;
        self.judged += o.judged;
        self.successes += o.successes;
        self.regression += o.regression;
        self.abs_error += o.abs_error;
        self.sq_error += o.sq_error;
    }

    /// Share of judged outcomes that were right.
    pub fn accuracy(&self) -> Option<f64> {
        (self.judged > 0).then(|| self.successes as f64 / self.judged as f64)
    }

    /// Mean absolute error.
    pub fn mae(&self) -> Option<f64> {
        (self.regression > 0).then(|| self.abs_error / self.regression as f64)
    }

    /// Root mean squared error.
    pub fn rmse(&self) -> Option<f64> {
        (self.regression > 0).then(|| (self.sq_error / self.regression as f64).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_compares_labels_however_they_are_sent() {
        let p = Prediction::Label("1".into());
        for (actual, right) in [
            (Actual::Label("1".into()), true),
            (Actual::IntLabel(1), true),
            (Actual::Number(1.0), true),
            (Actual::IntLabel(0), false),
            (Actual::Success(false), false),
        ] {
            assert_eq!(
                judge(Some(&p), &actual).unwrap().success,
                Some(right),
                "{actual:?}"
            );
        }
    }

    #[test]
    fn regression_gives_the_error() {
        let p = Prediction::Value(2.5);
        assert_eq!(
            judge(Some(&p), &Actual::Number(3.0)).unwrap().error,
            Some(-0.5)
        );
        assert_eq!(
            judge(Some(&p), &Actual::Label("2".into())).unwrap().error,
            Some(0.5)
        );
        assert!(matches!(
            judge(Some(&p), &Actual::Label("cat".into())),
            Err(JudgeError::Mismatch(_))
        ));
        assert!(matches!(
            judge(Some(&p), &Actual::Number(f64::NAN)),
            Err(JudgeError::Mismatch(_))
        ));
        assert_eq!(
            judge(None, &Actual::Success(true)).unwrap().success,
            Some(true)
        );
        assert_eq!(
            judge(None, &Actual::Label("x".into())),
            Err(JudgeError::NoPrediction)
        );
    }

    #[test]
    fn tallies_compute_accuracy_mae_and_rmse() {
        let mut t = Tally::default();
        assert_eq!(t.accuracy(), None);
        for s in [true, true, false, true] {
            t.add(&Judgement {
                success: Some(s),
                error: None,
            });
        }
        for e in [1.0, -3.0] {
            t.add(&Judgement {
                success: None,
                error: Some(e),
            });
        }
        assert_eq!(t.outcomes, 6);
        assert_eq!(t.accuracy(), Some(0.75));
        assert_eq!(t.mae(), Some(2.0));
        assert_eq!(t.rmse(), Some(5f64.sqrt()));
        let d = TallyDelta::of(&Judgement {
            success: Some(true),
            error: None,
        });
        assert_eq!(d.negate().successes, -1);
    }
}
