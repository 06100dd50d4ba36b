//! From bytes to a checked [`StateFile`]: the TOML read by serde, then the checks across items
//! (names declared once, references to keys that exist), then a dry run of the whole file
//! against an empty state through [`reconcile`](super::reconcile()), so that a file that parses
//! also applies on a fresh replica. Also reading the file ([`load`], refusing one far too large)
//! and checking the `--state-file` setting at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::control::State;
use crate::registry;
use crate::spec;

use super::dates::datetime_ms;
use super::format::{registry_error, DeclareError, StageDecl, StateFile};
use super::reconcile::reconcile;
use super::span::{line_column, path_at, position_of_path};

/// Largest state file read. A ConfigMap holds at most 1 MiB; anything near this is a mistake.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It cannot be read.
    #[error("{}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid state file.
    #[error("{}: {error}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, where.
        error: DeclareError,
    },
}

/// A state file read from disk: its content, its SHA-256 (which replicas can compare) and the
/// parsed declaration.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The parsed, checked declaration.
    pub file: StateFile,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
    text: String,
}

impl Loaded {
    /// Fills in the line of an error found after parsing (an apply refusal, a conflict).
    pub fn locate(&self, mut e: DeclareError) -> DeclareError {
        if e.position.is_none() {
            e.position = position_of_path(&self.text, &e.path);
        }
        e
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks `--state-file` with the other settings, before any port is bound or the database is
/// opened, so that a bad file stops start-up with status 2 and a message naming the setting.
/// (The server reads the file again when it starts: the file is the source of truth.)
pub fn check_setting(config: &crate::config::Config) -> Result<(), crate::config::ConfigError> {
    match &config.state_file {
        Some(path) => load(path)
            .map(|_| ())
            .map_err(|e| crate::config::ConfigError::Invalid {
                setting: "state_file",
                message: e.to_string(),
            }),
        None => Ok(()),
    }
}

/// Reads and parses a state file.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let bytes = read(path)?;
    from_bytes(&bytes).map_err(|error| LoadError::Invalid {
        path: path.to_path_buf(),
        error,
    })
}

/// The bytes of a state file, refusing one far larger than a state file can sensibly be.
pub(super) fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    let failed = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(failed)?.len();
    if size > MAX_FILE_BYTES {
        return Err(failed(std::io::Error::other(format!(
            "it is {size} bytes, more than the {MAX_FILE_BYTES} a state file may have"
        ))));
    }
    std::fs::read(path).map_err(failed)
}

/// Parses the bytes of a state file.
pub fn from_bytes(bytes: &[u8]) -> Result<Loaded, DeclareError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DeclareError::at("", format!("not UTF-8 text: {e}")))?;
    Ok(Loaded {
        file: parse(text)?,
        sha256: sha256_hex(bytes),
        text: text.to_string(),
    })
}

/// Parses and checks a state file: the TOML, the fields, the references between items, and a dry
/// run of the whole file against an empty state (so a file that parses also applies on a fresh
/// replica, unless a policy or experiment created by hand stands in the way).
pub fn parse(text: &str) -> Result<StateFile, DeclareError> {
    let file: StateFile = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return DeclareError::at("", message);
        };
        DeclareError {
            path: path_at(text, span.start).unwrap_or_default(),
            message,
            position: Some(line_column(text, span.start)),
        }
    })?;
    let located = |e: DeclareError| DeclareError {
        position: position_of_path(text, &e.path),
        ..e
    };
    check(&file).map_err(located)?;
    let mut empty = State::default();
    let (report, _) = reconcile(&file, &mut empty, 0).map_err(located)?;
    if let Some(conflict) = report.conflicts.into_iter().next() {
        return Err(located(conflict));
    }
    Ok(file)
}

/// Checks that need more than one item: names and keys declared once, references to keys that
/// exist, one production version per model, values the API's "zero means default" would hide.
fn check(file: &StateFile) -> Result<(), DeclareError> {
    let mut models: BTreeMap<&str, (usize, BTreeSet<&str>)> = BTreeMap::new();
    for (i, m) in file.models.iter().enumerate() {
        let path = format!("models[{i}]");
        registry::validate_model_name(&m.name, "name").map_err(|e| registry_error(&path, e))?;
        if let Some((first, _)) = models.get(m.name.as_str()) {
            return Err(DeclareError::at(
                format!("{path}.name"),
                format!(
                    "model '{}' is declared twice (also models[{first}]); declare each model once",
                    m.name
                ),
            ));
        }
        let mut keys: BTreeMap<&str, usize> = BTreeMap::new();
        let mut production = None;
        for (j, v) in m.versions.iter().enumerate() {
            let path = format!("{path}.versions[{j}]");
            registry::validate_alias(&v.key).map_err(|e| registry_error(&path, e))?;
            if let Some(first) = keys.insert(&v.key, j) {
                return Err(DeclareError::at(
                    format!("{path}.key"),
                    format!(
                        "key '{}' is used twice in model '{}' (also versions[{first}])",
                        v.key, m.name
                    ),
                ));
            }
            if v.stage == StageDecl::Production {
                if let Some(first) = production.replace(j) {
                    return Err(DeclareError::at(
                        format!("{path}.stage"),
                        format!(
                            "model '{}' can have one production version; versions[{first}] is production too",
                            m.name
                        ),
                    ));
                }
            }
        }
        models.insert(&m.name, (i, keys.into_keys().collect()));
    }
    let key_of = |path: &str, model: &str, key: &str| -> Result<(), DeclareError> {
        let Some((i, keys)) = models.get(model) else {
            return Err(DeclareError::at(
                format!("{path}.model"),
                format!("model '{model}' is not declared under [[models]] in this file"),
            ));
        };
        if !keys.contains(key) {
            let known: Vec<&str> = keys.iter().copied().collect();
            return Err(DeclareError::at(
                format!("{path}.version"),
                format!(
                    "'{key}' is not a version key of model '{model}' (models[{i}] declares: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        Ok(())
    };
    let mut experiments: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, e) in file.experiments.iter().enumerate() {
        let path = format!("experiments[{i}]");
        if let Some(first) = experiments.insert(&e.name, i) {
            return Err(DeclareError::at(
                format!("{path}.name"),
                format!(
                    "experiment '{}' is declared twice (also experiments[{first}])",
                    e.name
                ),
            ));
        }
        if !models.contains_key(e.model.as_str()) {
            return Err(DeclareError::at(
                format!("{path}.model"),
                format!(
                    "model '{}' is not declared under [[models]] in this file",
                    e.model
                ),
            ));
        }
        for (k, v) in e.variants.iter().enumerate() {
            key_of(&format!("{path}.variants[{k}]"), &e.model, &v.version).map_err(|mut err| {
                // The variant's field is `version`; the model is the experiment's.
                err.path = format!("{path}.variants[{k}].version");
                err
            })?;
        }
        // CreateExperiment reads 0 as "the default"; in a file, 0 written out is a mistake.
        for (field, value) in [("coverage", e.coverage), ("alpha", e.alpha)] {
            if value == Some(0.0) {
                return Err(DeclareError::at(
                    format!("{path}.{field}"),
                    "must be greater than 0 (leave it out for the default)",
                ));
            }
        }
        for (field, value) in [("start", &e.start), ("end", &e.end)] {
            if let Some(d) = value {
                datetime_ms(d).map_err(|m| DeclareError::at(format!("{path}.{field}"), m))?;
            }
        }
    }
    let mut shadows: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, s) in file.shadows.iter().enumerate() {
        let path = format!("shadows[{i}]");
        key_of(&path, &s.model, &s.version)?;
        if let Some(first) = shadows.insert((&s.model, &s.version), i) {
            return Err(DeclareError::at(
                format!("{path}.version"),
                format!(
                    "model '{}' version '{}' already has a shadow in shadows[{first}]",
                    s.model, s.version
                ),
            ));
        }
        if let Some(t) = &s.timeout {
            spec::parse_duration(t)
                .map_err(|e| DeclareError::at(format!("{path}.timeout"), e.to_string()))?;
        }
        if !(0.0..=1.0).contains(&s.sample_fraction) {
            return Err(DeclareError::at(
                format!("{path}.sample_fraction"),
                format!(
                    "{} is outside [0, 1] (0 removes the shadow)",
                    s.sample_fraction
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declare::fixtures::BASIC;

    fn err(text: &str) -> DeclareError {
        parse(text).expect_err("should be refused")
    }

    #[test]
    fn errors_name_the_field_and_its_line() {
        let e = err(&BASIC.replace("endpoint = \"127.0.0.1:8082\"", "endpoint = \"127.0.0.1\""));
        assert_eq!(e.path, "models[0].versions[1].endpoint");
        assert!(e.message.contains("port"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(11), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with("models[0].versions[1].endpoint: "),
            "{shown}"
        );
        assert!(shown.ends_with("(line 11, column 3)"), "{shown}");

        let e = err(&BASIC.replace("endpoint = \"127.0.0.1:8082\"", "endpont = \"x\""));
        assert_eq!(e.path, "models[0].versions[1].endpont");
        assert!(e.message.contains("unknown field `endpont`"), "{e}");

        let e = err(&BASIC.replace("endpoint = \"127.0.0.1:8082\"", "endpoint = 8082"));
        assert_eq!(e.path, "models[0].versions[1].endpoint");
        assert!(e.message.contains("expected a string"), "{e}");

        let e = err(&BASIC.replace("  endpoint = \"127.0.0.1:8082\"\n", ""));
        assert_eq!(e.path, "models[0].versions[1]");
        assert!(e.message.contains("missing field `endpoint`"), "{e}");

        let e = err(&BASIC.replace("stage = \"production\"", "stage = \"prod\""));
        assert_eq!(e.path, "models[0].versions[0].stage");

        let e = err(&BASIC.replace("weight = 1 }", "weight = 0 }"));
        assert_eq!(e.path, "experiments[0].variants[1].weight");

        let e = err(&BASIC.replace("version = \"v2\", weight", "version = \"v3\", weight"));
        assert_eq!(e.path, "experiments[0].variants[1].version");
        assert!(e.message.contains("v1, v2"), "{e}");

        let e = err(&BASIC.replace("coverage = 0.5", "coverage = 0"));
        assert_eq!(e.path, "experiments[0].coverage");
        let e = err(&BASIC.replace("coverage = 0.5", "coverage = 1.5"));
        assert_eq!(e.path, "experiments[0].coverage");
        let e = err(&BASIC.replace("coverage = 0.5", "start = 2026-12-01T00:00:00"));
        assert_eq!(e.path, "experiments[0].start");
        assert!(e.message.contains("time zone"), "{e}");

        let e = err(&BASIC.replace("sample_fraction = 0.1", "sample_fraction = 2"));
        assert_eq!(e.path, "shadows[0].sample_fraction");
        let e = err(&BASIC.replace(
            "sample_fraction = 0.1",
            "sample_fraction = 0.1\ntimeout = \"2m\"",
        ));
        assert_eq!(e.path, "shadows[0].timeout");
        let e = err(&BASIC.replace(
            "sample_fraction = 0.1",
            "sample_fraction = 0.1\ncomparison = { kind = \"tolerance\", absolute = -1 }",
        ));
        assert_eq!(e.path, "shadows[0].comparison");
        let e = err(&BASIC.replace("version = \"v2\"\nsample", "version = \"v9\"\nsample"));
        assert_eq!(e.path, "shadows[0].version");

        let e = err(&BASIC.replace("key = \"v2\"", "key = \"v1\""));
        assert_eq!(e.path, "models[0].versions[1].key");
        let e = err(&BASIC.replace("key = \"v2\"", "key = \"2\""));
        assert_eq!(e.path, "models[0].versions[1].key");
        let e = err(&BASIC.replace("key = \"v2\"", "key = \"v2\"\n  stage = \"production\""));
        assert_eq!(e.path, "models[0].versions[1].stage");
        let e = err(&BASIC.replace(
            "metrics = { accuracy = 0.93 }",
            "metrics = { accuracy = nan }",
        ));
        assert_eq!(e.path, "models[0].versions[0].metrics");
        let e = err(&format!("{BASIC}\n[[models]]\nname = \"iris\"\n"));
        assert_eq!(e.path, "models[1].name");
        let e = err(&format!("{BASIC}\n[[experiments]]\nname = \"x\"\nmodel = \"iris\"\nvariants = [ {{ name = \"a\", version = \"v1\" }}, {{ name = \"b\", version = \"v2\" }} ]\n"));
        assert_eq!(e.path, "experiments[1]");
        assert!(e.message.contains("iris-ab"), "{e}");

        let e = err("[[model]]\nname = \"x\"\n");
        assert_eq!(e.path, "model");
        assert!(e.message.contains("unknown field `model`"), "{e}");
        let e = err("[[models]]\nname = \"x\n");
        assert_eq!(e.path, "");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(from_bytes(b"\xff").unwrap_err().message.contains("UTF-8"));
    }
}
