//! The whole path the tests of `config` take: a command line, an environment and a file's text
//! through [`apply_sources`](super::apply_sources), clap and [`Config::from_args`].

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser};

use super::{apply_sources, Config, Env, ServeArgs};

/// `modelgate` with the serve flags.
#[derive(Parser, Debug)]
pub(super) struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// `Config` from `args`, `env` and (when `--config` names one) a file holding `file`.
pub(super) fn load(
    args: &[&str],
    env: &[(&str, &str)],
    file: Option<&str>,
) -> Result<Config, String> {
    let argv: Vec<OsString> = std::iter::once("modelgate")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect();
    let env: Env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let file = file.map(str::to_string);
    let (cmd, _) = apply_sources(Cli::command(), &argv, &env, |_| {
        file.clone()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
    })
    .map_err(|e| e.to_string())?;
    let m = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
    let cli = Cli::from_arg_matches(&m).map_err(|e| e.to_string())?;
    Config::from_args(cli.serve).map_err(|e| e.to_string())
}
