//! Every RocksDB key modelgate writes is built and parsed here.
//!
//! Keys sort the way they are scanned: names are followed by a 0x00 separator (names never contain
//! NUL: the registry validates them) and integers are big-endian, so a model's versions are
//! contiguous and in numeric order.

/// A key that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {family} key {key:02x?}: {reason}")]
pub struct KeyError {
    /// Column family the key came from.
    pub family: &'static str,
    /// The raw key.
    pub key: Vec<u8>,
    /// What is wrong.
    pub reason: &'static str,
}

/// Version number 0 is the model's metadata record (counter and aliases); real versions start at 1.
pub const MODEL_META_VERSION: u32 = 0;

/// `registry` key: model name, 0x00, version (u32 BE).
pub fn registry_key(model: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 5);
    k.extend_from_slice(model.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Parses a `registry` key into model name and version.
pub fn decode_registry_key(key: &[u8]) -> Result<(String, u32), KeyError> {
    let err = |reason| KeyError {
        family: "registry",
        key: key.to_vec(),
        reason,
    };
    if key.len() < 6 {
        return Err(err("too short"));
    }
    let (name, rest) = key.split_at(key.len() - 5);
    if rest[0] != 0 {
        return Err(err("missing separator"));
    }
    if name.contains(&0) {
        return Err(err("NUL in model name"));
    }
    let name = std::str::from_utf8(name).map_err(|_| err("model name is not UTF-8"))?;
    let version = u32::from_be_bytes(rest[1..5].try_into().expect("4 bytes"));
    Ok((name.to_string(), version))
}

/// `policies` key: the model name.
pub fn policy_key(model: &str) -> Vec<u8> {
    model.as_bytes().to_vec()
}

/// Parses a `policies` key.
pub fn decode_policy_key(key: &[u8]) -> Result<String, KeyError> {
    std::str::from_utf8(key)
        .map(str::to_string)
        .map_err(|_| KeyError {
            family: "policies",
            key: key.to_vec(),
            reason: "model name is not UTF-8",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_keys_round_trip_and_sort_by_model_then_version() {
        for (m, v) in [("iris", 1), ("a", 0), ("x.y-z_1", u32::MAX)] {
            assert_eq!(
                decode_registry_key(&registry_key(m, v)).unwrap(),
                (m.to_string(), v)
            );
        }
        let mut keys = [
            registry_key("iris", 10),
            registry_key("iris-2", 1),
            registry_key("iris", 2),
            registry_key("iris", MODEL_META_VERSION),
        ];
        keys.sort();
        let decoded: Vec<_> = keys
            .iter()
            .map(|k| decode_registry_key(k).unwrap())
            .collect();
        assert_eq!(
            decoded,
            vec![
                ("iris".to_string(), 0),
                ("iris".to_string(), 2),
                ("iris".to_string(), 10),
                ("iris-2".to_string(), 1)
            ]
        );
    }

    #[test]
    fn malformed_registry_keys_are_errors() {
        assert!(decode_registry_key(b"").is_err());
        assert!(decode_registry_key(b"ab\x01\0\0\0\x01").is_err());
        assert!(decode_registry_key(b"a\0b\0\0\0\0\x01").is_err());
        assert!(decode_registry_key(b"\xff\0\0\0\0\x01").is_err());
    }

    #[test]
    fn policy_keys_round_trip() {
        assert_eq!(decode_policy_key(&policy_key("iris")).unwrap(), "iris");
        assert!(decode_policy_key(b"\xff").is_err());
    }
}
