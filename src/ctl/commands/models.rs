//! `ctl models …`: the Registry service.

use clap::{Args, Subcommand};

use super::{pairs, usage};
use crate::ctl::client::{Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::registry_client::RegistryClient;
use crate::spec::{self, PredictionSpec};

/// `ctl models …`
#[derive(Subcommand, Debug, Clone)]
pub enum Models {
    /// Every model with its production version, latest version and aliases.
    List,
    /// A model's versions.
    Versions {
        /// Model name.
        model: String,
        /// Only this stage: staging, production, archived.
        #[arg(long)]
        stage: Option<String>,
    },
    /// One version (number or alias).
    Get {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
    },
    /// The production version.
    Production {
        /// Model name.
        model: String,
    },
    /// Registers a new version (numbered by modelgate).
    Register(Box<Register>),
    /// Moves a version to a stage: none, staging, production (archives the previous one), archived.
    Stage {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// none | staging | production | archived
        stage: String,
        /// Skip the promotion gates.
        #[arg(long)]
        force: bool,
    },
    /// Same as `stage MODEL VERSION production`.
    Promote {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
        /// Skip the promotion gates.
        #[arg(long)]
        force: bool,
    },
    /// Points an alias at a version.
    Alias {
        /// Model name.
        model: String,
        /// Alias name.
        alias: String,
        /// Version number or alias.
        version: String,
    },
    /// Removes an alias.
    Unalias {
        /// Model name.
        model: String,
        /// Alias name.
        alias: String,
    },
    /// Shows the promotion gates (`--min`/`--max` set them).
    Policy {
        /// Model name.
        model: String,
        /// Gate: METRIC=VALUE the version's metric must reach; repeatable.
        #[arg(long = "min", value_name = "METRIC=VALUE")]
        minimum: Vec<String>,
        /// Gate: METRIC=VALUE the version's metric must not exceed; repeatable.
        #[arg(long = "max", value_name = "METRIC=VALUE")]
        maximum: Vec<String>,
    },
    /// Deletes a version that is not in production.
    Delete {
        /// Model name.
        model: String,
        /// Version number or alias.
        version: String,
    },
}

/// `ctl models register …`
#[derive(Args, Debug, Clone)]
pub struct Register {
    /// Model name.
    pub model: String,
    /// The model server of this version: http://host:port, or https://host:port over TLS.
    #[arg(long)]
    pub endpoint: String,
    /// Model name to send to the model server, when it differs.
    #[arg(long)]
    pub backend_model: Option<String>,
    /// Model version to send to the model server.
    #[arg(long)]
    pub backend_version: Option<String>,
    /// The protocol the model server speaks: grpc (OIP, TF Serving or any gRPC service; the
    /// default) or oip-rest (the Open Inference Protocol over HTTP/JSON).
    #[arg(long, value_parser = ["grpc", "oip-rest"])]
    pub backend_protocol: Option<String>,
    /// Artifact path or URI (a local file is hashed).
    #[arg(long)]
    pub artifact_uri: Option<String>,
    /// Expected SHA-256 of the artifact.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Free text.
    #[arg(long)]
    pub description: Option<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// METRIC=NUMBER (offline evaluation); repeatable.
    #[arg(long = "metric", value_name = "METRIC=NUMBER")]
    pub metrics: Vec<String>,
    /// How to read a prediction: argmax:OUTPUT[:LABEL,…] | threshold:OUTPUT:T[:POS:NEG] |
    /// label:OUTPUT | value:OUTPUT.
    #[arg(long)]
    pub prediction: Option<String>,
    /// Feature names of an input: INPUT=NAME,NAME,…; repeatable.
    #[arg(long = "features", value_name = "INPUT=NAMES")]
    pub features: Vec<String>,
}

/// A checked `ctl models` call.
#[derive(Debug)]
pub enum Plan {
    /// ListModels.
    List(pb::ListModelsRequest),
    /// ListModelVersions.
    Versions(pb::ListModelVersionsRequest),
    /// GetModelVersion.
    Get(pb::GetModelVersionRequest),
    /// GetProductionVersion.
    Production(pb::GetProductionVersionRequest),
    /// RegisterModelVersion.
    Register(Box<pb::RegisterModelVersionRequest>),
    /// TransitionStage.
    Stage(pb::TransitionStageRequest),
    /// SetAlias.
    Alias(pb::SetAliasRequest),
    /// DeleteAlias.
    Unalias(pb::DeleteAliasRequest),
    /// SetPromotionPolicy when gates were given, else GetPromotionPolicy; the policy is shown
    /// either way.
    Policy {
        /// The change, when gates were given.
        set: Option<pb::SetPromotionPolicyRequest>,
        /// The question otherwise.
        get: pb::GetPromotionPolicyRequest,
    },
    /// DeleteModelVersion.
    Delete(pb::DeleteModelVersionRequest),
}

const MODEL_COLUMNS: &[&str] = &[
    "model",
    "productionVersion",
    "latestVersion",
    "versionCount",
    "aliases",
];
const VERSION_COLUMNS: &[&str] = &[
    "version",
    "stage",
    "endpoint",
    "aliases",
    "metrics",
    "tags",
    "createdAt",
];

/// A stage as written on the command line.
fn stage(s: &str) -> Result<pb::Stage, CtlError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "none" | "unspecified" => pb::Stage::Unspecified,
        "staging" => pb::Stage::Staging,
        "production" => pb::Stage::Production,
        "archived" => pb::Stage::Archived,
        _ => {
            return Err(usage(format!(
                "stage {s:?}: expected none, staging, production or archived"
            )))
        }
    })
}

fn register(r: Register) -> Result<pb::RegisterModelVersionRequest, CtlError> {
    let tags = pairs("--tag", &r.tags, |v| Some(v.to_string()))?;
    let metrics = pairs("--metric", &r.metrics, spec::number)?;
    let prediction = match &r.prediction {
        Some(p) => {
            let p: PredictionSpec = p.parse().map_err(|e| usage(format!("--prediction {e}")))?;
            Some(pb::PredictionSpec::from(&p))
        }
        None => None,
    };
    let mut feature_names = Vec::new();
    for f in &r.features {
        let (input, list) = f
            .split_once('=')
            .ok_or_else(|| usage(format!("--features {f:?}: expected INPUT=NAME,NAME,…")))?;
        feature_names.push(pb::InputFeatureNames {
            input: input.to_string(),
            names: list.split(',').map(str::to_string).collect(),
        });
    }
    Ok(pb::RegisterModelVersionRequest {
        tags,
        metrics,
        model: r.model,
        endpoint: r.endpoint,
        backend_model: r.backend_model.unwrap_or_default(),
        backend_version: r.backend_version.unwrap_or_default(),
        backend_protocol: match r.backend_protocol.as_deref() {
            Some("oip-rest") => pb::BackendProtocol::OipRest,
            Some(_) => pb::BackendProtocol::Grpc,
            None => pb::BackendProtocol::Unspecified,
        } as i32,
        artifact_uri: r.artifact_uri.unwrap_or_default(),
        artifact_sha256: r.sha256.unwrap_or_default(),
        description: r.description.unwrap_or_default(),
        prediction,
        feature_names,
    })
}

impl Models {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Models::List => Plan::List(pb::ListModelsRequest {}),
            Models::Versions { model, stage: s } => Plan::Versions(pb::ListModelVersionsRequest {
                model,
                stage: match s {
                    Some(s) => stage(&s)? as i32,
                    None => pb::Stage::Unspecified as i32,
                },
            }),
            Models::Get { model, version } => {
                Plan::Get(pb::GetModelVersionRequest { model, version })
            }
            Models::Production { model } => {
                Plan::Production(pb::GetProductionVersionRequest { model })
            }
            Models::Register(r) => Plan::Register(Box::new(register(*r)?)),
            Models::Stage {
                model,
                version,
                stage: s,
                force,
            } => Plan::Stage(pb::TransitionStageRequest {
                model,
                version,
                stage: stage(&s)? as i32,
                force,
            }),
            Models::Promote {
                model,
                version,
                force,
            } => Plan::Stage(pb::TransitionStageRequest {
                model,
                version,
                stage: pb::Stage::Production as i32,
                force,
            }),
            Models::Alias {
                model,
                alias,
                version,
            } => Plan::Alias(pb::SetAliasRequest {
                model,
                alias,
                version,
            }),
            Models::Unalias { model, alias } => {
                Plan::Unalias(pb::DeleteAliasRequest { model, alias })
            }
            Models::Policy {
                model,
                minimum,
                maximum,
            } => Plan::Policy {
                set: if minimum.is_empty() && maximum.is_empty() {
                    None
                } else {
                    Some(pb::SetPromotionPolicyRequest {
                        model: model.clone(),
                        minimum_metrics: pairs("--min", &minimum, spec::number)?,
                        maximum_metrics: pairs("--max", &maximum, spec::number)?,
                    })
                },
                get: pb::GetPromotionPolicyRequest { model },
            },
            Models::Delete { model, version } => {
                Plan::Delete(pb::DeleteModelVersionRequest { model, version })
            }
        })
    }
}

impl Plan {
    /// Makes the call and prints the answer.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = RegistryClient::new(client.channel().await?);
        match self {
            Plan::List(r) => {
                let a = client.answer(api.list_models(client.request(r)).await)?;
                render::list(&a, render::rows(&a.models), "models", MODEL_COLUMNS, output);
            }
            Plan::Versions(r) => {
                let a = client.answer(api.list_model_versions(client.request(r)).await)?;
                let rows = render::rows(&a.versions);
                render::list(&a, rows, "versions", VERSION_COLUMNS, output);
            }
            Plan::Get(r) => render::whole(
                &client.answer(api.get_model_version(client.request(r)).await)?,
                output,
            ),
            Plan::Production(r) => render::whole(
                &client.answer(api.get_production_version(client.request(r)).await)?,
                output,
            ),
            Plan::Register(r) => render::whole(
                &client.answer(api.register_model_version(client.request(*r)).await)?,
                output,
            ),
            Plan::Stage(r) => render::whole(
                &client.answer(api.transition_stage(client.request(r)).await)?,
                output,
            ),
            Plan::Alias(r) => render::whole(
                &client.answer(api.set_alias(client.request(r)).await)?,
                output,
            ),
            Plan::Unalias(r) => render::whole(
                &client.answer(api.delete_alias(client.request(r)).await)?,
                output,
            ),
            Plan::Policy { set: Some(set), .. } => render::whole(
                &client.answer(api.set_promotion_policy(client.request(set)).await)?,
                output,
            ),
            Plan::Policy { set: None, get } => render::whole(
                &client.answer(api.get_promotion_policy(client.request(get)).await)?,
                output,
            ),
            Plan::Delete(r) => render::whole(
                &client.answer(api.delete_model_version(client.request(r)).await)?,
                output,
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register_with(args: &[&str]) -> Result<pb::RegisterModelVersionRequest, CtlError> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            register: Register,
        }
        let mut all = vec!["register", "iris", "--endpoint", "http://m:1"];
        all.extend(args);
        register(Cli::try_parse_from(all).unwrap().register)
    }

    #[test]
    fn flag_values_become_typed_requests() {
        let r = register_with(&[
            "--prediction",
            "threshold:probabilities:0.5:yes:no",
            "--metric",
            "accuracy=0.9",
            "--tag",
            "team=risk",
            "--features",
            "input=a,b",
        ])
        .unwrap();
        assert_eq!(
            r.prediction,
            Some(pb::PredictionSpec {
                kind: Some(pb::prediction_spec::Kind::Threshold(
                    pb::ThresholdPrediction {
                        output: "probabilities".into(),
                        threshold: 0.5,
                        positive_label: "yes".into(),
                        negative_label: "no".into(),
                    }
                ))
            })
        );
        assert_eq!(r.metrics["accuracy"], 0.9);
        assert_eq!(r.tags["team"], "risk");
        assert_eq!(r.feature_names[0].names, ["a", "b"]);
        let err = register_with(&["--prediction", "softmax:p"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--prediction \"softmax:p\": expected argmax:OUTPUT[:LABEL,…], threshold:OUTPUT:T[:POS:NEG], label:OUTPUT or value:OUTPUT"
        );
        let err = register_with(&["--metric", "acc"]).unwrap_err();
        assert_eq!(err.to_string(), "--metric \"acc\": expected KEY=VALUE");
        let err = register_with(&["--metric", "acc=high"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--metric \"acc=high\": \"high\" is not a number"
        );
        assert_eq!(stage("Production").unwrap(), pb::Stage::Production);
        assert!(stage("prod").is_err());
    }
}
