//! Drift references as the control API carries them.

use crate::convert::timestamp;
use crate::drift::{Reference, ReferenceData};
use crate::pb::modelgate::v1 as pb;
use crate::stats::Moments;

/// A reference's summary: per feature, its size and either moments and deciles or categories.
pub fn summary(model: &str, r: &Reference) -> pb::ReferenceSummary {
    pb::ReferenceSummary {
        model: model.to_string(),
        source: r.source.clone(),
        rows: r.rows,
        received: r.received,
        sampled: r.sampled,
        created_at: Some(timestamp(r.created_at_ms)),
        capture_remaining: 0,
        features: r
            .features
            .iter()
            .map(|f| match &f.data {
                ReferenceData::Numeric(v) => {
                    let mut m = Moments::default();
                    for &x in v {
                        m.push(x);
                    }
                    pb::ReferenceFeature {
                        name: f.name.clone(),
                        categorical: false,
                        count: v.len() as u64,
                        mean: (m.n > 0).then_some(m.mean),
                        stddev: m.variance().map(f64::sqrt),
                        min: v.first().copied(),
                        max: v.last().copied(),
                        categories: Default::default(),
                        non_finite: f.non_finite,
                    }
                }
                ReferenceData::Categorical(c) => pb::ReferenceFeature {
                    name: f.name.clone(),
                    categorical: true,
                    count: c.values().sum(),
                    categories: c.clone().into_iter().collect(),
                    non_finite: f.non_finite,
                    ..Default::default()
                },
            })
            .collect(),
    }
}
