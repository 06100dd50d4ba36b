//! `ctl shadows …`: the Shadows service.

use std::time::Duration;

use clap::Subcommand;

use super::{duration, duration_pb, usage};
use crate::ctl::client::{Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::shadows_client::ShadowsClient;
use crate::spec::Comparison;

/// `ctl shadows …`
#[derive(Subcommand, Debug, Clone)]
pub enum Shadows {
    /// Mirrors a share of production traffic to a version.
    Set {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// Share of requests mirrored, (0, 1].
        #[arg(long, default_value_t = 1.0)]
        fraction: f64,
        /// Deadline of each copy, at most 60s (default 1s).
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        timeout: Option<Duration>,
        /// When answers agree: label (default), bytes, or tolerance:ABS[:REL].
        #[arg(long)]
        compare: Option<String>,
    },
    /// Stops mirroring to a version.
    Remove {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
    },
    /// Every shadow (of one model).
    List {
        /// Only this model's.
        #[arg(long)]
        model: Option<String>,
    },
    /// Agreement, latency and disagreements of a shadow.
    Report {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// Disagreements to show.
        #[arg(long, default_value_t = 10)]
        disagreements: u32,
    },
}

/// A checked `ctl shadows` call.
#[derive(Debug)]
pub enum Plan {
    /// SetShadow.
    Set(pb::SetShadowRequest),
    /// RemoveShadow.
    Remove(pb::RemoveShadowRequest),
    /// ListShadows.
    List(pb::ListShadowsRequest),
    /// GetShadowReport.
    Report(pb::GetShadowReportRequest),
}

const SHADOW_COLUMNS: &[&str] = &[
    "model",
    "version",
    "sampleFraction",
    "timeout",
    "comparison",
    "createdAt",
];

impl Shadows {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Shadows::Set {
                model,
                version,
                fraction,
                timeout,
                compare,
            } => {
                let comparison = match compare {
                    Some(c) => {
                        let c: Comparison =
                            c.parse().map_err(|e| usage(format!("--compare {e}")))?;
                        Some(pb::ShadowComparison::from(&c))
                    }
                    None => None,
                };
                Plan::Set(pb::SetShadowRequest {
                    model,
                    version,
                    sample_fraction: fraction,
                    comparison,
                    timeout: duration_pb(timeout),
                })
            }
            Shadows::Remove { model, version } => {
                Plan::Remove(pb::RemoveShadowRequest { model, version })
            }
            Shadows::List { model } => Plan::List(pb::ListShadowsRequest {
                model: model.unwrap_or_default(),
            }),
            Shadows::Report {
                model,
                version,
                disagreements,
            } => Plan::Report(pb::GetShadowReportRequest {
                model,
                version,
                disagreements,
            }),
        })
    }
}

impl Plan {
    /// Makes the call and prints the answer.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = ShadowsClient::new(client.channel().await?);
        match self {
            Plan::Set(r) => render::whole(
                &client.answer(api.set_shadow(client.request(r)).await)?,
                output,
            ),
            Plan::Remove(r) => render::whole(
                &client.answer(api.remove_shadow(client.request(r)).await)?,
                output,
            ),
            Plan::List(r) => {
                let a = client.answer(api.list_shadows(client.request(r)).await)?;
                render::list(
                    &a,
                    render::rows(&a.shadows),
                    "shadows",
                    SHADOW_COLUMNS,
                    output,
                );
            }
            Plan::Report(r) => render::whole(
                &client.answer(api.get_shadow_report(client.request(r)).await)?,
                output,
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(args: &[&str]) -> Result<pb::SetShadowRequest, CtlError> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            shadows: Shadows,
        }
        let all = ["shadows", "set", "iris", "2"].iter().chain(args);
        match Cli::try_parse_from(all).unwrap().shadows.plan()? {
            Plan::Set(r) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flag_values_become_typed_requests() {
        let r = set(&["--compare", "tolerance:0.01", "--timeout", "1500ms"]).unwrap();
        assert_eq!(
            r.comparison,
            Some(pb::ShadowComparison {
                kind: Some(pb::shadow_comparison::Kind::Tolerance(
                    pb::WithinTolerance {
                        absolute: 0.01,
                        relative: 0.0
                    }
                ))
            })
        );
        assert_eq!(
            r.timeout,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            set(&["--compare", "same"]).unwrap_err().to_string(),
            "--compare \"same\": expected label, bytes or tolerance:ABS[:REL]"
        );
        assert_eq!(
            set(&["--compare", "tolerance:x"]).unwrap_err().to_string(),
            "--compare \"tolerance:x\": \"x\" is not a number"
        );
    }
}
