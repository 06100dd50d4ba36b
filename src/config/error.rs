//! [`ConfigError`]: a setting that is wrong, named by its flag and its environment variable, or
//! a config file that cannot be used.

use std::path::PathBuf;

use super::ENV_PREFIX;

/// A setting that is wrong, named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is invalid.
    #[error("invalid setting {}: {message}", describe(setting))]
    Invalid {
        /// Setting name (flag without dashes, with underscores).
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The config file cannot be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// File path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The config file has a key modelgate does not know.
    #[error("config file {path}: unknown setting '{key}'")]
    UnknownKey {
        /// File path.
        path: PathBuf,
        /// The key.
        key: String,
    },
}

/// `--flag-name (MODELGATE_FLAG_NAME)`: the two names a user may have set it by.
fn describe(setting: &str) -> String {
    format!(
        "--{} ({}{})",
        setting.replace('_', "-"),
        ENV_PREFIX,
        setting.to_ascii_uppercase()
    )
}
