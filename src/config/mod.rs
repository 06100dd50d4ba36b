//! Settings for `modelgate serve`: flags, `MODELGATE_*` environment variables and an optional TOML
//! config file, merged and validated into a [`Config`] before any port is bound.
//!
//! Precedence, highest first: command-line flag, environment variable, config file, built-in
//! default. Environment and file values are installed as clap defaults, so one parser checks every
//! value and its errors name the flag. The environment is passed in (never read from the process
//! here), so tests do not touch global state.
//!
//! | file | holds |
//! |---|---|
//! | `args.rs` | the flags ([`ServeArgs`]): defaults, parsers, help |
//! | `sources.rs` | the environment ([`Env`]) and the config file, installed as defaults ([`apply_sources`]) |
//! | `validate.rs` | the checks clap cannot make, into a [`Config`] |
//! | `retention.rs` | [`parse_retention`]: `--retention`, per record family |
//! | `error.rs` | [`ConfigError`]: the setting at fault, named |

mod args;
mod error;
mod retention;
mod sources;
#[cfg(test)]
mod test_support;
mod validate;

/// Prefix of every environment variable modelgate reads.
pub const ENV_PREFIX: &str = "MODELGATE_";

pub use crate::telemetry::LogFormat;
pub use args::ServeArgs;
pub use error::ConfigError;
pub use retention::parse_retention;
pub use sources::{apply_sources, process_env, Env};
pub use validate::Config;
