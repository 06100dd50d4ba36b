//! The names the use cases take at their boundary, checked once where they enter: a value of one
//! of these types is known to be well formed, so nothing past the adapters checks it again.

use std::fmt;

/// Why a name was refused: the field it came in, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidId {
    /// The request field (for INVALID_ARGUMENT messages that name it).
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A model's name, as callers and the registry know it.
    ModelName
);
id_type!(
    /// A request id: what a prediction record is kept under and an outcome names.
    RequestId
);
id_type!(
    /// The unit an experiment assigns (a user, a session…).
    UnitId
);

impl ModelName {
    /// A model name from request field `field`.
    pub fn parse(name: &str, field: &'static str) -> Result<Self, InvalidId> {
        crate::registry::validate_model_name(name, field).map_err(|e| InvalidId {
            field,
            reason: match e {
                crate::registry::RegistryError::InvalidArgument { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
        Ok(ModelName(name.to_string()))
    }
}

impl RequestId {
    /// A request id from request field `field`: 1–128 visible ASCII characters.
    pub fn parse(id: &str, field: &'static str) -> Result<Self, InvalidId> {
        crate::record::validate_request_id(id).map_err(|reason| InvalidId { field, reason })?;
        Ok(RequestId(id.to_string()))
    }
}

impl UnitId {
    /// A unit id: any non-empty text.
    pub fn parse(id: &str, field: &'static str) -> Result<Self, InvalidId> {
        if id.is_empty() {
            return Err(InvalidId {
                field,
                reason: "required".into(),
            });
        }
        Ok(UnitId(id.to_string()))
    }
}

/// A version as a call names it: its number, or an alias. Resolved against the registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// Version number.
    Number(u32),
    /// Alias (`champion`, `candidate`…).
    Alias(String),
}

impl Version {
    /// A version from request field `field`: a number, else an alias.
    pub fn parse(v: &str, field: &'static str) -> Result<Self, InvalidId> {
        let v = v.trim();
        if v.is_empty() {
            return Err(InvalidId {
                field,
                reason: "required: a version number or an alias".into(),
            });
        }
        Ok(match v.parse::<u32>() {
            Ok(n) => Version::Number(n),
            Err(_) => Version::Alias(v.to_string()),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::Number(n) => write!(f, "{n}"),
            Version::Alias(a) => f.write_str(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_where_they_enter() {
        assert_eq!(ModelName::parse("iris", "model").unwrap().as_str(), "iris");
        let e = ModelName::parse("", "model").unwrap_err();
        assert_eq!(e.field, "model");
        assert!(RequestId::parse("req 1", "request_id").is_err());
        assert_eq!(
            RequestId::parse("req-1", "request_id").unwrap().to_string(),
            "req-1"
        );
        assert_eq!(Version::parse("2", "version").unwrap(), Version::Number(2));
        assert_eq!(
            Version::parse("champion", "version").unwrap(),
            Version::Alias("champion".into())
        );
        assert_eq!(
            Version::parse(" ", "version").unwrap_err().to_string(),
            "version: required: a version number or an alias"
        );
        assert!(UnitId::parse("", "unit").is_err());
    }
}
