//! Online feature store rules: feature definitions, names, and point-in-time visibility.

use serde::{Deserialize, Serialize};

use crate::record::FeatureValue;

/// Longest feature name accepted.
pub const MAX_FEATURE_NAME: usize = 128;
/// Longest entity id accepted.
pub const MAX_ENTITY_ID: usize = 256;

/// The type of a feature's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// Numbers.
    Number,
    /// Strings (categorical).
    Text,
}

impl FeatureKind {
    /// The kind of a value.
    pub fn of(v: &FeatureValue) -> Self {
        match v {
            FeatureValue::Number(_) => FeatureKind::Number,
            FeatureValue::Text(_) => FeatureKind::Text,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureKind::Number => "number",
            FeatureKind::Text => "string",
        }
    }
}

/// A declared feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureDef {
    /// Name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Value type.
    pub kind: FeatureKind,
    /// How long a value stays valid, in milliseconds; `None` is forever.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// Registered automatically from traffic.
    #[serde(default)]
    pub from_traffic: bool,
}

/// Every known feature, shared by the record writer (which registers features seen in traffic)
/// and the Features service.
#[derive(Debug, Default)]
pub struct FeatureCatalog {
    defs: dashmap::DashMap<String, FeatureDef>,
}

impl FeatureCatalog {
    /// A catalog holding `defs`.
    pub fn new(defs: Vec<FeatureDef>) -> Self {
        FeatureCatalog {
            defs: defs.into_iter().map(|d| (d.name.clone(), d)).collect(),
        }
    }

    /// Whether `name` is known.
    pub fn contains(&self, name: &str) -> bool {
        self.defs.contains_key(name)
    }

    /// One definition.
    pub fn get(&self, name: &str) -> Option<FeatureDef> {
        self.defs.get(name).map(|d| d.clone())
    }

    /// Adds `def` unless the name is known.
    pub fn insert_if_absent(&self, def: FeatureDef) {
        self.defs.entry(def.name.clone()).or_insert(def);
    }

    /// Adds or replaces `def`.
    pub fn upsert(&self, def: FeatureDef) {
        self.defs.insert(def.name.clone(), def);
    }

    /// Every definition, by name.
    pub fn list(&self) -> Vec<FeatureDef> {
        let mut v: Vec<FeatureDef> = self.defs.iter().map(|d| d.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Checks a feature name: `[A-Za-z0-9._-]` plus `[` `]` (for `input[3]`), at most 128 bytes.
pub fn validate_feature_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("feature names must not be empty".into());
    }
    if name.len() > MAX_FEATURE_NAME {
        return Err(format!(
            "feature name '{name}' is longer than {MAX_FEATURE_NAME} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '[' | ']')))
    {
        return Err(format!(
            "feature name '{name}' contains '{c}'; allowed are letters, digits, '.', '_', '-', '[' and ']'"
        ));
    }
    Ok(())
}

/// Checks an entity id: non-empty, at most 256 bytes, no NUL or control characters.
pub fn validate_entity_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("entity ids must not be empty".into());
    }
    if id.len() > MAX_ENTITY_ID {
        return Err(format!("entity id is longer than {MAX_ENTITY_ID} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("entity id {id:?} contains control characters"));
    }
    Ok(())
}

/// Whether a value written at `event_ms` answers a read `as_of_ms`: it must not be from the future
/// and, with a TTL, not older than the TTL.
pub fn visible(event_ms: u64, as_of_ms: u64, ttl_ms: Option<u64>) -> bool {
    event_ms <= as_of_ms && ttl_ms.is_none_or(|ttl| as_of_ms - event_ms <= ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_in_time_and_ttl() {
        assert!(visible(100, 100, None));
        assert!(!visible(101, 100, None), "never a value from the future");
        assert!(visible(50, 100, Some(50)));
        assert!(!visible(49, 100, Some(50)), "expired, not stale");
    }

    #[test]
    fn names_and_entities() {
        assert!(validate_feature_name("input[3]").is_ok());
        assert!(validate_feature_name("petal.width_cm").is_ok());
        assert!(validate_feature_name("").is_err());
        assert!(validate_feature_name("a b").is_err());
        assert!(validate_feature_name(&"x".repeat(129)).is_err());
        assert!(validate_entity_id("user 42").is_ok());
        assert!(validate_entity_id("").is_err());
        assert!(validate_entity_id("a\0b").is_err());
    }
}
