//! Performance figures and feature definitions as the control API carries them.

use std::time::Duration;

use crate::convert::spec::duration_to_pb;
use crate::feature_store::{FeatureDef, FeatureKind};
use crate::outcome::Tally;
use crate::pb::modelgate::v1 as pb;

/// A version's outcome tally as performance figures.
pub fn figures(t: &Tally) -> pb::PerformanceFigures {
    pb::PerformanceFigures {
        outcomes: t.outcomes,
        judged: t.judged,
        successes: t.successes,
        accuracy: t.accuracy(),
        regression_outcomes: t.regression,
        mae: t.mae(),
        rmse: t.rmse(),
    }
}

/// A feature type.
pub fn kind_to_pb(k: FeatureKind) -> pb::FeatureType {
    match k {
        FeatureKind::Number => pb::FeatureType::Number,
        FeatureKind::Text => pb::FeatureType::String,
    }
}

/// A feature definition.
pub fn def_to_pb(d: &FeatureDef) -> pb::FeatureDefinition {
    pb::FeatureDefinition {
        name: d.name.clone(),
        description: d.description.clone(),
        r#type: kind_to_pb(d.kind) as i32,
        ttl: d.ttl_ms.map(|ms| duration_to_pb(Duration::from_millis(ms))),
        from_traffic: d.from_traffic,
    }
}
