//! Experiments and their results as the control API carries them.

use crate::convert::timestamp;
use crate::experiment::{Experiment, ExperimentState};
use crate::pb::modelgate::v1 as pb;
use crate::stats::{TestResult, Unavailable};

/// An experiment's state.
pub fn state_to_pb(s: &ExperimentState) -> pb::ExperimentState {
    match s {
        ExperimentState::Running => pb::ExperimentState::Running,
        ExperimentState::Paused => pb::ExperimentState::Paused,
        ExperimentState::Stopped => pb::ExperimentState::Stopped,
        ExperimentState::Concluded { .. } => pb::ExperimentState::Concluded,
    }
}

/// Converts an experiment.
pub fn experiment_to_pb(e: &Experiment) -> pb::Experiment {
    let total: f64 = e.variants.iter().map(|v| v.weight).sum();
    pb::Experiment {
        name: e.name.clone(),
        model: e.model.clone(),
        variants: e
            .variants
            .iter()
            .map(|v| pb::ExperimentVariant {
                name: v.name.clone(),
                version: v.version,
                weight: v.weight,
                share: v.weight / total,
            })
            .collect(),
        unit_key: e.unit_key.clone(),
        salt: e.salt.clone(),
        coverage: e.coverage,
        alpha: e.alpha,
        start: e.start_ms.map(timestamp),
        end: e.end_ms.map(timestamp),
        state: state_to_pb(&e.state) as i32,
        winner: match &e.state {
            ExperimentState::Concluded { winner } => winner.clone(),
            _ => String::new(),
        },
        created_at: Some(timestamp(e.created_at_ms)),
        updated_at: Some(timestamp(e.updated_at_ms)),
    }
}

/// A test result for the API: numbers, or the reason they are absent — never NaN.
pub fn statistic(test: &str, r: &Result<TestResult, Unavailable>, alpha: f64) -> pb::TestStatistic {
    match r {
        Ok(t) if t.statistic.is_finite() && t.p_value.is_finite() => pb::TestStatistic {
            test: test.into(),
            statistic: Some(t.statistic),
            dof: Some(t.dof),
            p_value: Some(t.p_value),
            significant: t.p_value < alpha,
            unavailable_reason: String::new(),
        },
        Ok(_) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: "not a finite number for this data".into(),
            ..Default::default()
        },
        Err(e) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: e.0.clone(),
            ..Default::default()
        },
    }
}

/// A test that yields only a p-value (the always-valid one).
pub fn p_value_only(test: &str, r: &Result<f64, Unavailable>, alpha: f64) -> pb::TestStatistic {
    match r {
        Ok(p) if p.is_finite() => pb::TestStatistic {
            test: test.into(),
            p_value: Some(*p),
            significant: *p < alpha,
            ..Default::default()
        },
        Ok(_) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: "not a finite number for this data".into(),
            ..Default::default()
        },
        Err(e) => pb::TestStatistic {
            test: test.into(),
            unavailable_reason: e.0.clone(),
            ..Default::default()
        },
    }
}
