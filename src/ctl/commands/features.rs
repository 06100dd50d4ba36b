//! `ctl features …`: the Features service (the online feature store).

use std::time::Duration;

use clap::Subcommand;

use super::{duration, duration_pb, feature_value, pairs, timestamp, usage};
use crate::ctl::client::{Client, CtlError};
use crate::ctl::render::{self, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::features_client::FeaturesClient;

/// `ctl features …`
#[derive(Subcommand, Debug, Clone)]
pub enum Features {
    /// Declares a feature.
    Register {
        /// Feature name.
        name: String,
        /// number | string
        #[arg(long = "type", default_value = "number")]
        kind: String,
        /// Values older than this are not served.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
    },
    /// Every feature.
    List,
    /// Writes an entity's values: NAME=VALUE… (numbers, else strings).
    Put {
        /// Entity id.
        entity: String,
        /// NAME=VALUE; at least one.
        #[arg(required = true)]
        values: Vec<String>,
        /// Event time, RFC 3339 (default now).
        #[arg(long)]
        time: Option<String>,
    },
    /// Reads values of entities, as of now or a time.
    Get {
        /// Entity ids.
        #[arg(long = "entity", required = true)]
        entities: Vec<String>,
        /// Feature names.
        #[arg(long = "feature", required = true)]
        features: Vec<String>,
        /// Point in time, RFC 3339.
        #[arg(long)]
        as_of: Option<String>,
    },
}

/// A checked `ctl features` call.
#[derive(Debug)]
pub enum Plan {
    /// RegisterFeature.
    Register(pb::RegisterFeatureRequest),
    /// ListFeatures.
    List(pb::ListFeaturesRequest),
    /// PutFeatures.
    Put(pb::PutFeaturesRequest),
    /// GetFeatures.
    Get(pb::GetFeaturesRequest),
}

const FEATURE_COLUMNS: &[&str] = &["name", "type", "ttl", "fromTraffic", "description"];

impl Features {
    /// The call these flags make, checked before connecting.
    pub fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            Features::Register {
                name,
                kind,
                ttl,
                description,
            } => {
                let t = match kind.to_ascii_lowercase().as_str() {
                    "number" => pb::FeatureType::Number,
                    "string" => pb::FeatureType::String,
                    _ => return Err(usage(format!("--type {kind:?}: expected number or string"))),
                };
                Plan::Register(pb::RegisterFeatureRequest {
                    name,
                    description: description.unwrap_or_default(),
                    r#type: t as i32,
                    ttl: duration_pb(ttl),
                })
            }
            Features::List => Plan::List(pb::ListFeaturesRequest {}),
            Features::Put {
                entity,
                values,
                time,
            } => {
                type Request = pb::PutFeaturesRequest;
                let values = pairs("feature value", &values, |v| Some(feature_value(v)))?;
                Plan::Put(Request {
                    rows: vec![pb::FeatureRowInput {
                        entity_id: entity,
                        values,
                        event_time: time.map(|t| timestamp::<Request>(&t)).transpose()?,
                    }],
                })
            }
            Features::Get {
                entities,
                features,
                as_of,
            } => {
                type Request = pb::GetFeaturesRequest;
                Plan::Get(Request {
                    entity_ids: entities,
                    feature_names: features,
                    as_of: as_of.map(|t| timestamp::<Request>(&t)).transpose()?,
                })
            }
        })
    }
}

impl Plan {
    /// Makes the call and prints the answer.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = FeaturesClient::new(client.channel().await?);
        match self {
            Plan::Register(r) => render::whole(
                &client.answer(api.register_feature(client.request(r)).await)?,
                output,
            ),
            Plan::List(r) => {
                let a = client.answer(api.list_features(client.request(r)).await)?;
                let rows = render::rows(&a.features);
                render::list(&a, rows, "features", FEATURE_COLUMNS, output);
            }
            Plan::Put(r) => render::whole(
                &client.answer(api.put_features(client.request(r)).await)?,
                output,
            ),
            Plan::Get(r) => render::whole(
                &client.answer(api.get_features(client.request(r)).await)?,
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
    fn values_are_numbers_else_text() {
        use pb::feature_value::Kind;
        assert_eq!(feature_value("3.5").kind, Some(Kind::Number(3.5)));
        assert_eq!(feature_value("gold").kind, Some(Kind::Text("gold".into())));
        let plan = Features::Put {
            entity: "acct-1".into(),
            values: vec!["balance=12.5".into(), "tier=gold".into()],
            time: None,
        }
        .plan()
        .unwrap();
        let Plan::Put(r) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(r.rows[0].values["balance"].kind, Some(Kind::Number(12.5)));
        let err = Features::Put {
            entity: "acct-1".into(),
            values: vec!["balance".into()],
            time: Some("yesterday".into()),
        }
        .plan()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "feature value \"balance\": expected KEY=VALUE"
        );
        let err = Features::Put {
            entity: "acct-1".into(),
            values: vec!["balance=1".into()],
            time: Some("bad".into()),
        }
        .plan()
        .unwrap_err();
        // What a proto-JSON request with this time gets (ctl sent proto JSON before).
        assert_eq!(
            err.to_string(),
            "not a valid modelgate.v1.PutFeaturesRequest: invalid rfc3339 timestamp: invalid date"
        );
        let err = Features::Get {
            entities: vec!["a".into()],
            features: vec!["b".into()],
            as_of: Some("2024-13-01T00:00:00Z".into()),
        }
        .plan()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "not a valid modelgate.v1.GetFeaturesRequest: failed to parse RFC-3339 formatted timestamp"
        );
    }
}
