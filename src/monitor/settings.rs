//! [`DriftSettings`]: the windows, cadence and hysteresis levels of data and concept drift, and
//! the shadow-agreement alert level (from `--drift-*`, `--concept-*`, `--shadow-agreement-alert`).

use crate::drift::{self, Hysteresis, Level};

/// Drift settings.
#[derive(Clone, Debug)]
pub struct DriftSettings {
    /// Live values per feature window (W).
    pub window: usize,
    /// New rows between evaluations (K).
    pub every: u64,
    /// Least time between evaluations of a model: under heavy traffic K rows arrive every few
    /// milliseconds, and evaluating that often would spend a core on statistics.
    pub min_interval: std::time::Duration,
    /// Benjamini–Hochberg false discovery rate: a feature starts drifting below it.
    pub fdr: f64,
    /// Adjusted p-value above which an evaluation counts towards the end of a feature's drift.
    pub exit_p_value: f64,
    /// Evaluations in a row above `exit_p_value` that end a feature's drift.
    pub exit_evaluations: u32,
    /// Largest reference (rows).
    pub reference_max: usize,
    /// Outcomes per concept window (N).
    pub concept_window: usize,
    /// Degradation beyond which a version's performance starts drifting.
    pub concept_threshold: f64,
    /// Degradation at most which an outcome counts towards the end of performance drift.
    pub concept_exit_threshold: f64,
    /// Outcomes in a row at most `concept_exit_threshold` that end performance drift.
    pub concept_exit_outcomes: u32,
    /// Shadow agreement below which `shadow_agreement_low` fires (after 100 comparisons).
    pub shadow_agreement_alert: f64,
    /// Fleet mode: the share of its rows a replica adds to a model's shared window (a uniform
    /// sample of the fleet's traffic whatever each replica's share of it).
    pub fleet_sample: f64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings {
            window: 1000,
            every: 100,
            min_interval: std::time::Duration::ZERO,
            fdr: 0.05,
            exit_p_value: 0.2,
            exit_evaluations: 3,
            reference_max: drift::MAX_SAMPLE,
            concept_window: 1000,
            concept_threshold: 0.1,
            concept_exit_threshold: 0.05,
            concept_exit_outcomes: 100,
            shadow_agreement_alert: 0.9,
            fleet_sample: 1.0,
        }
    }
}

impl DriftSettings {
    /// The levels of data drift's hysteresis.
    pub fn hysteresis(&self) -> Hysteresis {
        Hysteresis {
            fdr: self.fdr,
            exit_p_value: self.exit_p_value,
            exit_evaluations: self.exit_evaluations,
        }
    }

    /// Where a version's degradation stands against the levels of performance drift.
    pub fn concept_level(&self, degradation: f64) -> Level {
        if degradation > self.concept_threshold {
            Level::Alarm
        } else if degradation <= self.concept_exit_threshold {
            Level::Quiet
        } else {
            Level::Between
        }
    }
}
