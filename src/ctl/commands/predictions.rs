//! `ctl predictions …`: the Predictions service.

use clap::Subcommand;

use super::timestamp;
use crate::ctl::client::{json, Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::predictions_client::PredictionsClient;

/// `ctl predictions …`
#[derive(Subcommand, Debug, Clone)]
pub enum Predictions {
    /// One record by request id (the `x-modelgate-request-id` response header).
    Get {
        /// Request id.
        request_id: String,
    },
    /// A model's records, newest first.
    List {
        /// Model name.
        model: String,
        /// Only this version number.
        #[arg(long)]
        version: Option<u32>,
        /// At most this many (≤ 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// From this time, RFC 3339.
        #[arg(long)]
        since: Option<String>,
    },
}

/// A checked `ctl predictions` call.
#[derive(Debug)]
pub enum Plan {
    /// GetPrediction.
    Get(pb::GetPredictionRequest),
    /// ListPredictions.
    List(pb::ListPredictionsRequest),
}

const PREDICTION_COLUMNS: &[&str] = &[
    "requestId",
    "time",
    "version",
    "experiment",
    "variant",
    "unitId",
    "statusCode",
    "latencyUs",
    "predictions",
];

impl Predictions {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Predictions::Get { request_id } => Plan::Get(pb::GetPredictionRequest { request_id }),
            Predictions::List {
                model,
                version,
                limit,
                since,
            } => {
                type Request = pb::ListPredictionsRequest;
                Plan::List(Request {
                    model,
                    version: version.unwrap_or(0),
                    limit,
                    start_time: since.map(|s| timestamp::<Request>(&s)).transpose()?,
                    ..Default::default()
                })
            }
        })
    }
}

impl Plan {
    /// Makes the call and prints the answer: a record with feature names beside their values,
    /// a list with each prediction as a plain value.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = PredictionsClient::new(client.channel().await?);
        match self {
            Plan::Get(r) => {
                let a = client.answer(api.get_prediction(client.request(r)).await)?;
                match output {
                    Output::Table => print!("{}", render::prediction_record(&json(&a))),
                    Output::Json => render::whole(&a, output),
                }
            }
            Plan::List(r) => {
                let a = client.answer(api.list_predictions(client.request(r)).await)?;
                let mut rows = render::rows(&a.predictions);
                rows.iter_mut().for_each(render::plain_predictions);
                render::list(&a, rows, "predictions", PREDICTION_COLUMNS, output);
            }
        }
        Ok(())
    }
}
