//! How a drift reference is kept, whatever keeps it: a JSON header (features, their kinds and
//! categories, row counts, source) and, per numeric feature, its sorted values as f64
//! little-endian bytes (exact, and 8 bytes a value). RocksDB keeps the parts under keys of its
//! `references` family, fleet mode as fields of a Redis hash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{StoreError, StoreResult};
use crate::drift::{Reference, ReferenceData, ReferenceFeature};

#[derive(Serialize, Deserialize)]
struct Header {
    features: Vec<HeaderFeature>,
    rows: u64,
    received: u64,
    sampled: bool,
    source: String,
    created_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct HeaderFeature {
    name: String,
    non_finite: u64,
    /// Present for categorical features.
    categories: Option<BTreeMap<String, u64>>,
}

/// A reference in parts: the header, and each numeric feature's values by feature name.
pub struct Parts {
    /// The JSON header.
    pub header: Vec<u8>,
    /// (feature, sorted f64 LE values) of each numeric feature.
    pub numeric: Vec<(String, Vec<u8>)>,
}

/// Splits a reference into its parts.
pub fn encode(r: &Reference) -> Parts {
    let header = Header {
        features: r
            .features
            .iter()
            .map(|f| HeaderFeature {
                name: f.name.clone(),
                non_finite: f.non_finite,
                categories: match &f.data {
                    ReferenceData::Categorical(c) => Some(c.clone()),
                    ReferenceData::Numeric(_) => None,
                },
            })
            .collect(),
        rows: r.rows,
        received: r.received,
        sampled: r.sampled,
        source: r.source.clone(),
        created_at_ms: r.created_at_ms,
    };
    Parts {
        header: serde_json::to_vec(&header).expect("headers serialise"),
        numeric: r
            .features
            .iter()
            .filter_map(|f| match &f.data {
                ReferenceData::Numeric(v) => Some((
                    f.name.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )),
                ReferenceData::Categorical(_) => None,
            })
            .collect(),
    }
}

/// Puts a reference of `model` together from its header and `numeric`, which reads a numeric
/// feature's values (`None`: no values).
pub fn decode(
    model: &str,
    family: &'static str,
    header: &[u8],
    mut numeric: impl FnMut(&str) -> StoreResult<Option<Vec<u8>>>,
) -> StoreResult<Reference> {
    let h: Header = serde_json::from_slice(header).map_err(|source| StoreError::Value {
        family,
        key: model.to_string(),
        source,
    })?;
    let mut features = Vec::with_capacity(h.features.len());
    for f in h.features {
        let data = match f.categories {
            Some(c) => ReferenceData::Categorical(c),
            None => ReferenceData::Numeric(
                numeric(&f.name)?
                    .unwrap_or_default()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
        };
        features.push(ReferenceFeature {
            name: f.name,
            data,
            non_finite: f.non_finite,
        });
    }
    Ok(Reference {
        features,
        rows: h.rows,
        received: h.received,
        sampled: h.sampled,
        source: h.source,
        created_at_ms: h.created_at_ms,
    })
}
