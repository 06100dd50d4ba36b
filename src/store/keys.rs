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

fn err(family: &'static str, key: &[u8], reason: &'static str) -> KeyError {
    KeyError {
        family,
        key: key.to_vec(),
        reason,
    }
}

pub(super) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

/// `predictions` key: the request id (visible ASCII, no NUL).
pub fn prediction_key(request_id: &str) -> &[u8] {
    request_id.as_bytes()
}

/// Default-family key of the shared fields of prediction records whose id is `id`
/// (`records::SharedTables`): a fixed prefix, then the id (u64 BE).
pub fn shared_fields_key(id: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..24].copy_from_slice(SHARED_FIELDS_PREFIX);
    k[24..].copy_from_slice(&id.to_be_bytes());
    k
}

const SHARED_FIELDS_PREFIX: &[u8; 24] = b"modelgate/record-shared/";

/// `prediction_index` key: model, 0x00, time (ms, u64 BE), request id; the value is the version.
/// Scanning a model's prefix walks its records in time order.
pub fn prediction_index_key(model: &str, time_ms: u64, request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 9 + request_id.len());
    k.extend_from_slice(model.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// The prefix of every `prediction_index` key of `model`.
pub fn prediction_index_prefix(model: &str) -> Vec<u8> {
    let mut k = model.as_bytes().to_vec();
    k.push(0);
    k
}

/// The byte after the time in a `prediction_index` key of a group of records
/// ([`prediction_group_key`]); never a request id's first byte (those are visible ASCII), so a
/// group's key sorts after every single record's of its model and time.
pub const PREDICTION_GROUP: u8 = 0xFF;

/// Widest span of time (ms) between the oldest and newest record of one `prediction_index` group:
/// a record of time t is in a group whose key time is at most this much after t, so a listing
/// from time t starts reading there.
pub const PREDICTION_GROUP_SPAN_MS: u64 = 100;

/// `prediction_index` key of a group of records: model, 0x00, the group's newest time (ms, u64
/// BE), [`PREDICTION_GROUP`], the group's id (16 bytes, unique); the value lists the records.
pub fn prediction_group_key(model: &str, newest_ms: u64, group: [u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 26);
    k.extend_from_slice(model.as_bytes());
    k.push(0);
    k.extend_from_slice(&newest_ms.to_be_bytes());
    k.push(PREDICTION_GROUP);
    k.extend_from_slice(&group);
    k
}

/// Where a reverse scan of `model`'s `prediction_index` starts to meet every key whose time is
/// at most `time_ms`, single records and groups: past all of them, before any later time's.
pub fn prediction_index_seek(model: &str, time_ms: u64) -> Vec<u8> {
    let mut k = prediction_index_prefix(model);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&[PREDICTION_GROUP, PREDICTION_GROUP]);
    k
}

/// The time of a `prediction_index` key (a single record's, or a group's newest), and whether it
/// is a group's.
pub fn prediction_index_time(key: &[u8]) -> Result<(u64, bool), KeyError> {
    let (_, rest) = split_prediction_index_key(key)?;
    Ok((be64(&rest[..8]), rest.get(8) == Some(&PREDICTION_GROUP)))
}

/// A `prediction_index` key's model's length, and what follows the separator (at least the
/// time's 8 bytes).
fn split_prediction_index_key(key: &[u8]) -> Result<(usize, &[u8]), KeyError> {
    const F: &str = "prediction_index";
    let sep = key
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| err(F, key, "missing separator"))?;
    let rest = &key[sep + 1..];
    if rest.len() < 8 {
        return Err(err(F, key, "too short"));
    }
    Ok((sep, rest))
}

/// Parses a single record's `prediction_index` key into (model, time, request id).
pub fn decode_prediction_index_key(key: &[u8]) -> Result<(String, u64, String), KeyError> {
    const F: &str = "prediction_index";
    let (sep, rest) = split_prediction_index_key(key)?;
    let model = std::str::from_utf8(&key[..sep]).map_err(|_| err(F, key, "model is not UTF-8"))?;
    let id = std::str::from_utf8(&rest[8..]).map_err(|_| err(F, key, "request id is not UTF-8"))?;
    Ok((model.to_string(), be64(&rest[..8]), id.to_string()))
}

/// `outcomes` key: request id, 0x00, row (u32 BE).
pub fn outcome_key(request_id: &str, row: u32) -> Vec<u8> {
    let mut k = outcome_prefix(request_id);
    k.extend_from_slice(&row.to_be_bytes());
    k
}

/// The prefix of every outcome of one request.
pub fn outcome_prefix(request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(request_id.len() + 5);
    k.extend_from_slice(request_id.as_bytes());
    k.push(0);
    k
}

/// Parses an `outcomes` key into (request id, row).
pub fn decode_outcome_key(key: &[u8]) -> Result<(String, u32), KeyError> {
    const F: &str = "outcomes";
    if key.len() < 6 || key[key.len() - 5] != 0 {
        return Err(err(F, key, "missing separator"));
    }
    let (id, rest) = key.split_at(key.len() - 5);
    let id = std::str::from_utf8(id).map_err(|_| err(F, key, "request id is not UTF-8"))?;
    Ok((id.to_string(), be32(&rest[1..])))
}

/// The prefix of every `outcome_index` key of one model version.
pub fn outcome_index_prefix(model: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 5);
    k.extend_from_slice(model.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// `outcome_index` key: model, 0x00, version (u32 BE), time (ms, u64 BE), request id, 0x00, row
/// (u32 BE). A version's outcomes are contiguous and in time order, for "the last N outcomes".
pub fn outcome_index_key(
    model: &str,
    version: u32,
    time_ms: u64,
    request_id: &str,
    row: u32,
) -> Vec<u8> {
    let mut k = outcome_index_prefix(model, version);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&outcome_key(request_id, row));
    k
}

/// The time inside an `outcome_index` key.
pub fn outcome_index_time(key: &[u8]) -> Result<u64, KeyError> {
    let sep = key
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| err("outcome_index", key, "missing separator"))?;
    key.get(sep + 5..sep + 13)
        .map(be64)
        .ok_or_else(|| err("outcome_index", key, "too short"))
}

/// `counters` key of a model version's counter: b'v', model, 0x00, version (u32 BE), name.
pub fn version_counter_key(model: &str, version: u32, name: &str) -> Vec<u8> {
    let mut k = vec![b'v'];
    k.extend_from_slice(&outcome_index_prefix(model, version));
    k.extend_from_slice(name.as_bytes());
    k
}

/// `counters` key of an experiment variant's counter: b'e', experiment, 0x00, variant, 0x00, name.
pub fn experiment_counter_key(experiment: &str, variant: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(experiment.len() + variant.len() + name.len() + 3);
    k.push(b'e');
    k.extend_from_slice(experiment.as_bytes());
    k.push(0);
    k.extend_from_slice(variant.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `counters` key of a shadow's counter: b's', model, 0x00, version (u32 BE), name.
pub fn shadow_counter_key(model: &str, version: u32, name: &str) -> Vec<u8> {
    let mut k = shadow_counter_prefix(model, version);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The prefix of a shadow's counters.
pub fn shadow_counter_prefix(model: &str, version: u32) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend_from_slice(&outcome_index_prefix(model, version));
    k
}

/// `shadow_log` key: model, 0x00, version (u32 BE), time (ms, u64 BE), request id — the same
/// layout as `outcome_index`, so a version's disagreements are contiguous and in time order.
pub fn shadow_log_key(model: &str, version: u32, time_ms: u64, request_id: &str) -> Vec<u8> {
    let mut k = outcome_index_prefix(model, version);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// `feature_rows` key: entity, 0x00, inverted time (u64::MAX − ms, BE), sequence (u32 BE). An
/// entity's newest row sorts first, so a seek to `feature_row_key(e, as_of, 0)` lands on its
/// latest row at or before `as_of`; the sequence tells apart rows of the same millisecond.
/// Entity ids hold no control characters, so the 0x00 ends the entity unambiguously.
pub fn feature_row_key(entity: &str, time_ms: u64, seq: u32) -> Vec<u8> {
    let mut k = feature_row_prefix(entity);
    k.extend_from_slice(&(u64::MAX - time_ms).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The prefix of an entity's `feature_rows`.
pub fn feature_row_prefix(entity: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(entity.len() + 13);
    k.extend_from_slice(entity.as_bytes());
    k.push(0);
    k
}

/// The time inside a `feature_rows` key.
pub fn feature_row_time(key: &[u8]) -> Result<u64, KeyError> {
    if key.len() < 13 {
        return Err(err("feature_rows", key, "too short"));
    }
    let n = key.len();
    Ok(u64::MAX - be64(&key[n - 12..n - 4]))
}

/// `feature_rows` key of a table of feature names (`features::NameTable`): 0xFF, then the
/// table's id (u64 BE). No entity's rows sort among these (UTF-8 has no 0xFF byte), and no time
/// reads from it (too short), so retention keeps it.
pub fn feature_table_key(id: u64) -> [u8; 9] {
    let mut k = [0xff; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// `features_latest` key: the entity id.
pub fn feature_entity_key(entity: &str) -> &[u8] {
    entity.as_bytes()
}

/// Prefixes a stored value with its time (ms, u64 BE), so retention can read it cheaply.
pub fn timed_value(time_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + body.len());
    v.extend_from_slice(&time_ms.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Splits a value written by [`timed_value`].
pub fn split_timed_value<'a>(
    family: &'static str,
    value: &'a [u8],
) -> Result<(u64, &'a [u8]), KeyError> {
    if value.len() < 8 {
        return Err(err(family, value, "value shorter than its time prefix"));
    }
    Ok((be64(&value[..8]), &value[8..]))
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

    #[test]
    fn record_keys_round_trip_and_sort_by_time() {
        let k = prediction_index_key("iris", 1_700_000_000_000, "01J-abc");
        assert_eq!(
            decode_prediction_index_key(&k).unwrap(),
            ("iris".to_string(), 1_700_000_000_000, "01J-abc".to_string())
        );
        assert!(k.starts_with(&prediction_index_prefix("iris")));
        assert!(prediction_index_key("iris", 5, "z") < prediction_index_key("iris", 6, "a"));
        assert!(decode_prediction_index_key(b"iris").is_err());

        assert_eq!(
            decode_outcome_key(&outcome_key("req-1", 3)).unwrap(),
            ("req-1".to_string(), 3)
        );
        assert!(decode_outcome_key(b"x").is_err());
        let oi = outcome_index_key("iris", 2, 99, "req", 1);
        assert!(oi.starts_with(&outcome_index_prefix("iris", 2)));
        assert_eq!(outcome_index_time(&oi).unwrap(), 99);
        assert!(
            outcome_index_key("iris", 2, 99, "z", 0) < outcome_index_key("iris", 2, 100, "a", 0)
        );
    }

    #[test]
    fn feature_rows_sort_newest_first_per_entity() {
        let old = feature_row_key("u1", 100, 7);
        let new = feature_row_key("u1", 200, 0);
        assert!(new < old);
        assert_eq!(feature_row_time(&old).unwrap(), 100);
        assert!(old.starts_with(&feature_row_prefix("u1")));
        // Same millisecond: the sequence keeps both.
        assert_ne!(feature_row_key("u1", 100, 1), feature_row_key("u1", 100, 2));
        // "u1" and "u10" do not interleave.
        assert!(!feature_row_key("u10", 5, 0).starts_with(&feature_row_prefix("u1")));
        assert!(feature_row_time(b"short").is_err());
        // Tables of names sort apart from every entity's rows, and carry no time.
        let table = feature_table_key(u64::MAX);
        assert!(feature_row_time(&table).is_err());
        assert!(feature_row_key("\u{10ffff}", 0, u32::MAX).as_slice() < &table[..]);
    }

    #[test]
    fn timed_values_split() {
        let v = timed_value(42, b"body");
        assert_eq!(split_timed_value("x", &v).unwrap(), (42, &b"body"[..]));
        assert!(split_timed_value("x", b"short").is_err());
    }
}
