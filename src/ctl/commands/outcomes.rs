//! `ctl outcomes …`: the Outcomes service.

use clap::Subcommand;
use serde_json::Value;

use super::{read_input, usage};
use crate::ctl::client::{from_json, Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::outcomes_client::OutcomesClient;

/// `ctl outcomes …`
#[derive(Subcommand, Debug, Clone)]
pub enum Outcomes {
    /// Records the truth for a prediction: one of --label, --value, --success.
    Record {
        /// Request id of the prediction.
        request_id: String,
        /// Row of a batched request.
        #[arg(long, default_value_t = 0)]
        row: u32,
        /// The true label.
        #[arg(long, group = "actual")]
        label: Option<String>,
        /// The true value (regression).
        #[arg(long, group = "actual")]
        value: Option<f64>,
        /// Whether the prediction was right.
        #[arg(long, group = "actual")]
        success: Option<bool>,
        /// Replace an outcome already recorded.
        #[arg(long)]
        overwrite: bool,
    },
    /// Streams outcomes from a JSON-lines file (`-`: stdin), one RecordOutcomeRequest per line,
    /// e.g. {"requestId":"…","actual":{"label":"setosa"}}.
    Import {
        /// File path or `-`.
        file: String,
    },
    /// Accuracy / MAE / RMSE of a model version from its outcomes.
    Performance {
        /// Model name.
        model: String,
        /// Version number or alias (default: production).
        #[arg(long)]
        version: Option<String>,
        /// Only the last N outcomes.
        #[arg(long)]
        window: Option<u32>,
    },
}

/// A checked `ctl outcomes` call.
#[derive(Debug)]
pub enum Plan {
    /// RecordOutcome.
    Record(pb::RecordOutcomeRequest),
    /// RecordOutcomes, one stream message per batch.
    Import(Vec<pb::RecordOutcomesRequest>),
    /// GetModelPerformance.
    Performance(pb::GetModelPerformanceRequest),
}

/// Outcomes per stream message: keeps each message small.
const BATCH: usize = 500;

/// The outcomes of a JSON-lines file, in batches; each line is proto JSON (the file format).
fn import(file: &str) -> Result<Vec<pb::RecordOutcomesRequest>, CtlError> {
    let text = read_input(file)?;
    let mut outcomes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| usage(format!("{file} line {}: {e}", i + 1)))?;
        outcomes.push(v);
    }
    if outcomes.is_empty() {
        return Err(usage(format!("{file}: no outcomes")));
    }
    outcomes
        .chunks(BATCH)
        .map(|c| from_json(serde_json::json!({ "outcomes": c })))
        .collect()
}

impl Outcomes {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Outcomes::Record {
                request_id,
                row,
                label,
                value,
                success,
                overwrite,
            } => {
                use pb::actual::Kind;
                let kind = match (label, value, success) {
                    (Some(l), None, None) => Kind::Label(l),
                    (None, Some(v), None) => Kind::Number(v),
                    (None, None, Some(s)) => Kind::Success(s),
                    _ => return Err(usage("give one of --label, --value or --success")),
                };
                Plan::Record(pb::RecordOutcomeRequest {
                    request_id,
                    row,
                    actual: Some(pb::Actual { kind: Some(kind) }),
                    overwrite,
                    time: None,
                })
            }
            Outcomes::Import { file } => Plan::Import(import(&file)?),
            Outcomes::Performance {
                model,
                version,
                window,
            } => Plan::Performance(pb::GetModelPerformanceRequest {
                model,
                version: version.unwrap_or_default(),
                window: window.unwrap_or(0),
            }),
        })
    }
}

impl Plan {
    /// Makes the call (or streams the batches) and prints the answer.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = OutcomesClient::new(client.channel().await?);
        match self {
            Plan::Record(r) => render::whole(
                &client.answer(api.record_outcome(client.request(r)).await)?,
                output,
            ),
            Plan::Import(batches) => {
                let stream = tokio_stream::iter(batches);
                render::whole(
                    &client.answer(api.record_outcomes(client.request(stream)).await)?,
                    output,
                )
            }
            Plan::Performance(r) => render::whole(
                &client.answer(api.get_model_performance(client.request(r)).await)?,
                output,
            ),
        }
        Ok(())
    }
}
