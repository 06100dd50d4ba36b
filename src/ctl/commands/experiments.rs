//! `ctl experiments …`: the Experiments service.

use clap::Subcommand;

use super::{timestamp, usage};
use crate::ctl::client::{Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::experiments_client::ExperimentsClient;

/// `ctl experiments …`
#[derive(Subcommand, Debug, Clone)]
pub enum Experiments {
    /// Creates and starts an experiment.
    Create {
        /// Experiment name.
        name: String,
        /// Model name.
        #[arg(long)]
        model: String,
        /// NAME=VERSION[:WEIGHT]; at least two.
        #[arg(
            long = "variant",
            value_name = "NAME=VERSION[:WEIGHT]",
            required = true
        )]
        variants: Vec<String>,
        /// Share of units in the experiment, (0, 1]; default 1.
        #[arg(long)]
        coverage: Option<f64>,
        /// Assignment salt (change it to reshuffle units).
        #[arg(long)]
        salt: Option<String>,
        /// Metadata key of the unit id (default: the server's --unit-key).
        #[arg(long)]
        unit_key: Option<String>,
        /// Significance level.
        #[arg(long)]
        alpha: Option<f64>,
        /// Start time, RFC 3339.
        #[arg(long)]
        start: Option<String>,
        /// End time, RFC 3339.
        #[arg(long)]
        end: Option<String>,
    },
    /// Every experiment (of one model).
    List {
        /// Only this model's.
        #[arg(long)]
        model: Option<String>,
    },
    /// One experiment.
    Get {
        /// Experiment name.
        name: String,
    },
    /// Stops assigning units; traffic goes to production.
    Pause {
        /// Experiment name.
        name: String,
    },
    /// Assigns again.
    Resume {
        /// Experiment name.
        name: String,
    },
    /// Ends it without a winner.
    Stop {
        /// Experiment name.
        name: String,
    },
    /// Ends it and promotes the winner's version in the same write.
    Conclude {
        /// Experiment name.
        name: String,
        /// Winning variant (none: conclude without promotion).
        #[arg(long)]
        winner: Option<String>,
        /// Skip the promotion gates.
        #[arg(long)]
        force: bool,
    },
    /// Per-variant counts, rates and the tests (significance, SRM, always-valid).
    Results {
        /// Experiment name.
        name: String,
    },
}

/// A checked `ctl experiments` call.
#[derive(Debug)]
pub enum Plan {
    /// CreateExperiment.
    Create(pb::CreateExperimentRequest),
    /// ListExperiments.
    List(pb::ListExperimentsRequest),
    /// GetExperiment.
    Get(pb::ExperimentRef),
    /// PauseExperiment.
    Pause(pb::ExperimentRef),
    /// ResumeExperiment.
    Resume(pb::ExperimentRef),
    /// StopExperiment.
    Stop(pb::ExperimentRef),
    /// ConcludeExperiment.
    Conclude(pb::ConcludeExperimentRequest),
    /// GetExperimentResults.
    Results(pb::ExperimentRef),
}

const EXPERIMENT_COLUMNS: &[&str] = &[
    "name",
    "model",
    "state",
    "variants",
    "coverage",
    "winner",
    "createdAt",
];

/// `NAME=VERSION[:WEIGHT]`, weight 1 when left out.
fn variant(v: &str) -> Result<pb::VariantSpec, CtlError> {
    let bad = || usage(format!("--variant {v:?}: expected NAME=VERSION[:WEIGHT]"));
    let (name, rest) = v.split_once('=').ok_or_else(bad)?;
    let (version, weight) = match rest.split_once(':') {
        Some((ver, w)) => (ver, w.parse::<f64>().map_err(|_| bad())?),
        None => (rest, 1.0),
    };
    Ok(pb::VariantSpec {
        name: name.to_string(),
        version: version.to_string(),
        weight,
    })
}

impl Experiments {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Experiments::Create {
                name,
                model,
                variants,
                coverage,
                salt,
                unit_key,
                alpha,
                start,
                end,
            } => {
                type Request = pb::CreateExperimentRequest;
                Plan::Create(Request {
                    variants: variants
                        .iter()
                        .map(|v| variant(v))
                        .collect::<Result<_, _>>()?,
                    name,
                    model,
                    coverage: coverage.unwrap_or_default(),
                    alpha: alpha.unwrap_or_default(),
                    salt: salt.unwrap_or_default(),
                    unit_key: unit_key.unwrap_or_default(),
                    start: start.map(|s| timestamp::<Request>(&s)).transpose()?,
                    end: end.map(|s| timestamp::<Request>(&s)).transpose()?,
                })
            }
            Experiments::List { model } => Plan::List(pb::ListExperimentsRequest {
                model: model.unwrap_or_default(),
            }),
            Experiments::Get { name } => Plan::Get(pb::ExperimentRef { name }),
            Experiments::Pause { name } => Plan::Pause(pb::ExperimentRef { name }),
            Experiments::Resume { name } => Plan::Resume(pb::ExperimentRef { name }),
            Experiments::Stop { name } => Plan::Stop(pb::ExperimentRef { name }),
            Experiments::Conclude {
                name,
                winner,
                force,
            } => Plan::Conclude(pb::ConcludeExperimentRequest {
                name,
                winner: winner.unwrap_or_default(),
                force,
            }),
            Experiments::Results { name } => Plan::Results(pb::ExperimentRef { name }),
        })
    }
}

impl Plan {
    /// Makes the call and prints the answer.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = ExperimentsClient::new(client.channel().await?);
        match self {
            Plan::Create(r) => render::whole(
                &client.answer(api.create_experiment(client.request(r)).await)?,
                output,
            ),
            Plan::List(r) => {
                let a = client.answer(api.list_experiments(client.request(r)).await)?;
                let rows = render::rows(&a.experiments);
                render::list(&a, rows, "experiments", EXPERIMENT_COLUMNS, output);
            }
            Plan::Get(r) => render::whole(
                &client.answer(api.get_experiment(client.request(r)).await)?,
                output,
            ),
            Plan::Pause(r) => render::whole(
                &client.answer(api.pause_experiment(client.request(r)).await)?,
                output,
            ),
            Plan::Resume(r) => render::whole(
                &client.answer(api.resume_experiment(client.request(r)).await)?,
                output,
            ),
            Plan::Stop(r) => render::whole(
                &client.answer(api.stop_experiment(client.request(r)).await)?,
                output,
            ),
            Plan::Conclude(r) => render::whole(
                &client.answer(api.conclude_experiment(client.request(r)).await)?,
                output,
            ),
            Plan::Results(r) => render::whole(
                &client.answer(api.get_experiment_results(client.request(r)).await)?,
                output,
            ),
        }
        Ok(())
    }
}
