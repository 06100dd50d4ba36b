//! Where settings come from besides flags: the `MODELGATE_*` environment (passed in as an [`Env`],
//! never read from the process here, so tests do not touch global state) and the `--config` TOML
//! file. [`apply_sources`] installs both as clap defaults, in precedence order.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::ENV_PREFIX;

/// The environment as a map, so tests can pass their own.
pub type Env = HashMap<String, String>;

/// Reads the process environment's `MODELGATE_*` variables (call once, in `main`), and the
/// standard OpenTelemetry endpoint as `--otlp-endpoint` unless that is set.
pub fn process_env() -> Env {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    with_otel_endpoint(vars)
}

/// `MODELGATE_*` variables from `vars`, plus `MODELGATE_OTLP_ENDPOINT` taken from
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, when not set itself.
fn with_otel_endpoint(vars: Vec<(String, String)>) -> Env {
    let find = |name: &str| {
        vars.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let otel =
        find("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| find("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let mut env: Env = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    if let Some(e) = otel {
        env.entry(format!("{ENV_PREFIX}OTLP_ENDPOINT")).or_insert(e);
    }
    env
}

/// Finds the config file path: `--config PATH`, `--config=PATH`, else `MODELGATE_CONFIG`.
fn config_path(args: &[OsString], env: &Env) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    env.get("MODELGATE_CONFIG").map(PathBuf::from)
}

/// A config-file value as the text a flag would be given; `None` for tables and arrays.
fn toml_to_string(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Installs config-file values, then environment values, as the defaults of `cmd`'s arguments, so
/// that flags override env, which overrides the file. `args` is the command line of `cmd` itself
/// (used only to find `--config`). Returns warnings (unknown `MODELGATE_*` variables).
pub fn apply_sources(
    mut cmd: clap::Command,
    args: &[OsString],
    env: &Env,
    read_file: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<(clap::Command, Vec<String>), ConfigError> {
    let ids: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .filter(|id| id != "help" && id != "config")
        .collect();
    // Repeatable flags take a list: a TOML array, or whitespace-separated in the environment.
    let lists: Vec<String> = cmd
        .get_arguments()
        .filter(|a| matches!(a.get_action(), clap::ArgAction::Append))
        .map(|a| a.get_id().as_str().to_string())
        .collect();
    let mut defaults: HashMap<String, Vec<String>> = HashMap::new();
    if let Some(path) = config_path(args, env) {
        let text = read_file(&path).map_err(|e| ConfigError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for (key, value) in table {
            let id = key.replace('-', "_");
            if !ids.contains(&id) {
                return Err(ConfigError::UnknownKey { path, key });
            }
            let items: Vec<toml::Value> = match value {
                toml::Value::Array(a) if lists.contains(&id) => a,
                v => vec![v],
            };
            let v = items
                .iter()
                .map(toml_to_string)
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| ConfigError::File {
                    path: path.clone(),
                    message: format!("setting '{key}' must be a string, number or boolean"),
                })?;
            defaults.insert(id, v);
        }
    }
    let mut warnings = Vec::new();
    for (k, v) in env {
        let Some(name) = k.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let id = name.to_ascii_lowercase();
        if lists.contains(&id) {
            defaults.insert(id, v.split_whitespace().map(str::to_string).collect());
        } else if ids.contains(&id) {
            defaults.insert(id, vec![v.clone()]);
        } else if id != "config" && !OTHER_ENV.contains(&name) {
            warnings.push(format!("ignoring unknown environment variable {k}"));
        }
    }
    for (id, values) in defaults {
        cmd = cmd.mut_arg(id, |a| a.default_values(values));
    }
    Ok((cmd, warnings))
}

/// `MODELGATE_*` variables read by other subcommands, not unknown to `serve`.
/// `modelgate ctl` reads `MODELGATE_CTL_ADDR` (and `MODELGATE_CONTROL_TOKEN`, a setting too);
/// `deploy/ghz/run.sh` reads `MODELGATE_ADDR`.
const OTHER_ENV: &[&str] = &["ADDR", "CTL_ADDR"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::load;
    use std::time::Duration;

    #[test]
    fn the_standard_otel_endpoint_turns_tracing_on_unless_overridden() {
        let vars = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let env = with_otel_endpoint(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("PATH", "/bin"),
        ]));
        assert_eq!(env.get("MODELGATE_OTLP_ENDPOINT").unwrap(), "http://c:4317");
        assert!(!env.contains_key("PATH"));
        let env = with_otel_endpoint(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
        ]));
        assert_eq!(env.get("MODELGATE_OTLP_ENDPOINT").unwrap(), "http://t:4317");
        let env = with_otel_endpoint(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("MODELGATE_OTLP_ENDPOINT", "http://mine:4317"),
        ]));
        assert_eq!(
            env.get("MODELGATE_OTLP_ENDPOINT").unwrap(),
            "http://mine:4317"
        );
        assert!(with_otel_endpoint(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])).is_empty());
        assert!(load(&["--otlp-endpoint", "grpc://c:4317"], &[], None)
            .unwrap_err()
            .contains("otlp"));
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let file = "max_in_flight = 10\nmax-concurrent-streams = 7\nrequest_timeout = \"5s\"\n";
        // Without --config (or MODELGATE_CONFIG) no file is read.
        assert_eq!(load(&[], &[], Some(file)).unwrap().max_in_flight, 10_000);
        let c = load(&["--config", "x.toml"], &[], Some(file)).unwrap();
        assert_eq!(c.max_in_flight, 10);
        assert_eq!(c.max_concurrent_streams, 7);
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        let c = load(
            &["--config", "x.toml"],
            &[("MODELGATE_MAX_IN_FLIGHT", "20")],
            Some(file),
        )
        .unwrap();
        assert_eq!(c.max_in_flight, 20);
        let c = load(
            &["--config=x.toml", "--max-in-flight", "30"],
            &[("MODELGATE_MAX_IN_FLIGHT", "20")],
            Some(file),
        )
        .unwrap();
        assert_eq!(c.max_in_flight, 30);
        let c = load(&[], &[("MODELGATE_CONFIG", "x.toml")], Some(file)).unwrap();
        assert_eq!(c.max_in_flight, 10);
    }

    #[test]
    fn repeatable_settings_from_file_and_env() {
        let file = "webhook = [\"http://a:1/x\", \"http://b:2/y#drift_started\"]\n";
        let c = load(&["--config", "f"], &[], Some(file)).unwrap();
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(c.webhooks[1].types, vec!["drift_started"]);
        let c = load(
            &[],
            &[("MODELGATE_WEBHOOK", "http://a:1/x http://b:2/y")],
            None,
        )
        .unwrap();
        assert_eq!(c.webhooks.len(), 2);
        let c = load(
            &["--webhook", "http://c:3/z"],
            &[("MODELGATE_WEBHOOK", "http://a:1/x")],
            None,
        )
        .unwrap();
        assert_eq!(c.webhooks.len(), 1, "flags replace the environment");
        let err = load(&["--webhook", "https://x/y"], &[], None).unwrap_err();
        assert!(err.contains("--webhook"), "{err}");
        let err = load(&["--drift-fdr", "2"], &[], None).unwrap_err();
        assert!(err.contains("--drift-fdr"), "{err}");
    }
}
