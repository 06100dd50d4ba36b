//! `ctl drift …`: the Drift service.

use std::time::Duration;

use clap::Subcommand;

use super::{duration, duration_pb, feature_value, read_input, usage};
use crate::ctl::client::{Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::drift_client::DriftClient;

/// `ctl drift …`
#[derive(Subcommand, Debug, Clone)]
pub enum Drift {
    /// Uploads a reference sample from a CSV file with a header row of feature names.
    SetReference {
        /// Model name.
        model: String,
        /// CSV file (`-`: stdin).
        #[arg(long)]
        csv: String,
        /// Columns to treat as categories; repeatable.
        #[arg(long = "categorical")]
        categorical: Vec<String>,
    },
    /// Takes the next N live rows as the reference.
    Capture {
        /// Model name.
        model: String,
        /// Rows to capture.
        #[arg(long, default_value_t = 1000)]
        rows: u32,
    },
    /// The reference's summary.
    Reference {
        /// Model name.
        model: String,
    },
    /// Data drift per feature and concept drift per version.
    Report {
        /// Model name.
        model: String,
        /// Evaluate now instead of showing the last evaluation.
        #[arg(long)]
        evaluate: bool,
    },
    /// Shows the retraining policy; flags change it.
    Policy {
        /// Model name.
        model: String,
        /// Trigger on data drift.
        #[arg(long)]
        on_data_drift: Option<bool>,
        /// Trigger on performance drift.
        #[arg(long)]
        on_performance_drift: Option<bool>,
        /// Trigger when production is older than this.
        #[arg(long, value_parser = duration)]
        max_age: Option<Duration>,
        /// Least time between two triggers.
        #[arg(long, value_parser = duration)]
        cooldown: Option<Duration>,
    },
}

/// A checked `ctl drift` call.
#[derive(Debug)]
pub enum Plan {
    /// SetReference.
    SetReference(pb::SetReferenceRequest),
    /// CaptureReference.
    Capture(pb::CaptureReferenceRequest),
    /// GetReference.
    Reference(pb::GetReferenceRequest),
    /// GetDriftReport.
    Report(pb::GetDriftReportRequest),
    /// SetRetrainPolicy when flags were given, else GetRetrainPolicy; the policy is shown either
    /// way.
    Policy {
        /// The change, when flags were given.
        set: Option<pb::RetrainPolicy>,
        /// The question otherwise.
        get: pb::GetRetrainPolicyRequest,
    },
}

/// Turns a CSV with a header row into SetReference's names and rows. Quoting is not supported:
/// values are split on commas and trimmed.
fn csv_reference(text: &str) -> Result<(Vec<String>, Vec<pb::ReferenceRow>), CtlError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| usage("the CSV is empty; it needs a header row of feature names"))?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(usage(format!(
                "CSV line {}: {} values for {} columns",
                i + 2,
                cells.len(),
                header.len()
            )));
        }
        rows.push(pb::ReferenceRow {
            values: cells.iter().map(|c| feature_value(c)).collect(),
        });
    }
    Ok((header, rows))
}

impl Drift {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Drift::SetReference {
                model,
                csv,
                categorical,
            } => {
                let (feature_names, rows) = csv_reference(&read_input(&csv)?)?;
                Plan::SetReference(pb::SetReferenceRequest {
                    model,
                    feature_names,
                    rows,
                    categorical_features: categorical,
                })
            }
            Drift::Capture { model, rows } => {
                Plan::Capture(pb::CaptureReferenceRequest { model, rows })
            }
            Drift::Reference { model } => Plan::Reference(pb::GetReferenceRequest { model }),
            Drift::Report { model, evaluate } => {
                Plan::Report(pb::GetDriftReportRequest { model, evaluate })
            }
            Drift::Policy {
                model,
                on_data_drift,
                on_performance_drift,
                max_age,
                cooldown,
            } => {
                let changing = on_data_drift.is_some()
                    || on_performance_drift.is_some()
                    || max_age.is_some()
                    || cooldown.is_some();
                Plan::Policy {
                    set: changing.then(|| pb::RetrainPolicy {
                        model: model.clone(),
                        on_data_drift: on_data_drift.unwrap_or(false),
                        on_performance_drift: on_performance_drift.unwrap_or(false),
                        max_age: duration_pb(max_age),
                        cooldown: duration_pb(cooldown),
                    }),
                    get: pb::GetRetrainPolicyRequest { model },
                }
            }
        })
    }
}

impl Plan {
    /// Makes the call and prints the answer.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = DriftClient::new(client.channel().await?);
        match self {
            Plan::SetReference(r) => render::whole(
                &client.answer(api.set_reference(client.request(r)).await)?,
                output,
            ),
            Plan::Capture(r) => render::whole(
                &client.answer(api.capture_reference(client.request(r)).await)?,
                output,
            ),
            Plan::Reference(r) => render::whole(
                &client.answer(api.get_reference(client.request(r)).await)?,
                output,
            ),
            Plan::Report(r) => render::whole(
                &client.answer(api.get_drift_report(client.request(r)).await)?,
                output,
            ),
            Plan::Policy { set: Some(set), .. } => render::whole(
                &client.answer(api.set_retrain_policy(client.request(set)).await)?,
                output,
            ),
            Plan::Policy { set: None, get } => render::whole(
                &client.answer(api.get_retrain_policy(client.request(get)).await)?,
                output,
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_references_need_a_header_and_even_rows() {
        use pb::feature_value::Kind;
        let (names, rows) = csv_reference("a, b\n1,x\n2,y\n").unwrap();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(
            rows[1].values,
            [
                pb::FeatureValue {
                    kind: Some(Kind::Number(2.0))
                },
                pb::FeatureValue {
                    kind: Some(Kind::Text("y".into()))
                }
            ]
        );
        let err = csv_reference("a,b\n1\n").unwrap_err();
        assert_eq!(err.to_string(), "CSV line 2: 1 values for 2 columns");
    }
}
