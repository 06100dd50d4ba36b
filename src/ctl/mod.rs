//! `modelgate ctl`: the control API from the shell. Every subcommand is one control call (or a
//! stream of them) built from flags; answers print as tables or as proto JSON. `ctl call` reaches
//! any method with a JSON body, like grpcurl.
//!
//! Exit codes: 0 success; 1 another server error; 2 bad usage or input file; 3 modelgate
//! unreachable (or UNAVAILABLE / DEADLINE_EXCEEDED); 4 NOT_FOUND; 5 INVALID_ARGUMENT /
//! OUT_OF_RANGE; 6 FAILED_PRECONDITION / ALREADY_EXISTS / ABORTED; 7 UNAUTHENTICATED /
//! PERMISSION_DENIED. Errors print the server's own message on stderr.

pub mod client;
pub mod commands;
pub mod render;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use client::{Client, CtlError};
pub use commands::drift::Drift;
pub use commands::events::Events;
pub use commands::experiments::Experiments;
pub use commands::features::Features;
pub use commands::models::{Models, Register};
pub use commands::outcomes::Outcomes;
pub use commands::predictions::Predictions;
pub use commands::shadows::Shadows;
use render::Output;

/// Options of `modelgate ctl`.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// modelgate's control port.
    #[arg(
        long,
        env = "MODELGATE_CTL_ADDR",
        default_value = "http://127.0.0.1:9001",
        global = true
    )]
    pub addr: String,
    /// Bearer token, when modelgate runs with --control-token.
    #[arg(
        long,
        env = "MODELGATE_CONTROL_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify a TLS control port against, instead of the system roots;
    /// TLS is used when --addr starts with https://.
    #[arg(long, value_name = "FILE", env = "MODELGATE_CTL_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for a control port that requires one (--control-client-ca).
    #[arg(
        long,
        value_name = "FILE",
        env = "MODELGATE_CTL_CERT",
        requires = "key",
        global = true
    )]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "MODELGATE_CTL_KEY",
        requires = "cert",
        global = true
    )]
    pub key: Option<PathBuf>,
    /// Name to verify the control port's certificate against, when it is not --addr's host.
    #[arg(
        long,
        value_name = "NAME",
        env = "MODELGATE_CTL_SERVER_NAME",
        global = true
    )]
    pub server_name: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Deadline of each control call (`--timeout` is a setting of `shadows set`, not this).
    // Not `--timeout`: a global flag shares its name and value with a subcommand's flag of the
    // same id, so `shadows set` without `--timeout` stored this deadline as the shadow's.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        value_parser = commands::duration,
        global = true
    )]
    pub call_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The control services.
#[derive(Subcommand, Debug, Clone)]
pub enum CtlCommand {
    /// Models and versions: register, list, stages, aliases, promotion gates.
    #[command(subcommand)]
    Models(Models),
    /// A/B experiments: create, list, pause, resume, stop, conclude, results.
    #[command(subcommand)]
    Experiments(Experiments),
    /// Shadow deployments: set, remove, list, report.
    #[command(subcommand)]
    Shadows(Shadows),
    /// Prediction records: get one, list a model's.
    #[command(subcommand)]
    Predictions(Predictions),
    /// Outcomes (ground truth): record one, import many, model performance.
    #[command(subcommand)]
    Outcomes(Outcomes),
    /// The online feature store: register, list, put, get.
    #[command(subcommand)]
    Features(Features),
    /// Drift: references, reports, retraining policies.
    #[command(subcommand)]
    Drift(Drift),
    /// The event stream.
    #[command(subcommand)]
    Events(Events),
    /// Any control method with a JSON request, e.g.
    /// `call Registry/ListModels '{}'` (like grpcurl; the answer is printed as proto JSON).
    Call {
        /// `Service/Method`; `modelgate.v1.` may be left out.
        method: String,
        /// The request as proto JSON; `-` reads it from stdin.
        #[arg(default_value = "{}")]
        body: String,
    },
}

/// A command checked and built before connecting: its typed request(s).
enum Plan {
    Models(commands::models::Plan),
    Experiments(commands::experiments::Plan),
    Shadows(commands::shadows::Plan),
    Predictions(commands::predictions::Plan),
    Outcomes(commands::outcomes::Plan),
    Features(commands::features::Plan),
    Drift(commands::drift::Plan),
    Events(commands::events::Plan),
    Call(commands::call::Plan),
}

impl CtlCommand {
    fn plan(self) -> Result<Plan, CtlError> {
        Ok(match self {
            CtlCommand::Models(c) => Plan::Models(c.plan()?),
            CtlCommand::Experiments(c) => Plan::Experiments(c.plan()?),
            CtlCommand::Shadows(c) => Plan::Shadows(c.plan()?),
            CtlCommand::Predictions(c) => Plan::Predictions(c.plan()?),
            CtlCommand::Outcomes(c) => Plan::Outcomes(c.plan()?),
            CtlCommand::Features(c) => Plan::Features(c.plan()?),
            CtlCommand::Drift(c) => Plan::Drift(c.plan()?),
            CtlCommand::Events(c) => Plan::Events(c.plan()),
            CtlCommand::Call { method, body } => Plan::Call(commands::call::plan(method, body)?),
        })
    }
}

/// Runs a `ctl` command; the error carries the exit code.
pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    // Check what can be checked before connecting.
    let plan = args.command.plan()?;
    let tls = client::TlsFiles {
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        server_name: args.server_name,
    };
    let client =
        Client::connect(&args.addr, args.token.as_deref(), &tls, args.call_timeout).await?;
    let output = args.output;
    match plan {
        Plan::Models(p) => p.run(&client, output).await,
        Plan::Experiments(p) => p.run(&client, output).await,
        Plan::Shadows(p) => p.run(&client, output).await,
        Plan::Predictions(p) => p.run(&client, output).await,
        Plan::Outcomes(p) => p.run(&client, output).await,
        Plan::Features(p) => p.run(&client, output).await,
        Plan::Drift(p) => p.run(&client, output).await,
        Plan::Events(p) => p.run(&client, output).await,
        Plan::Call(p) => p.run(&client).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> CtlArgs {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap()
            .ctl
    }

    fn shadow_timeout(args: &CtlArgs) -> Option<prost_types::Duration> {
        match args.command.clone().plan().unwrap() {
            Plan::Shadows(commands::shadows::Plan::Set(r)) => r.timeout,
            _ => panic!("a SetShadow call"),
        }
    }

    #[test]
    fn the_call_deadline_and_the_shadow_timeout_are_separate_flags() {
        let a = parse(&["shadows", "set", "iris", "2"]);
        assert_eq!(a.call_timeout, Duration::from_secs(30));
        assert_eq!(shadow_timeout(&a), None, "the server's default");
        let a = parse(&["--call-timeout", "5s", "shadows", "set", "iris", "2"]);
        assert_eq!(a.call_timeout, Duration::from_secs(5));
        assert_eq!(shadow_timeout(&a), None);
        let a = parse(&["shadows", "set", "iris", "2", "--timeout", "2s"]);
        assert_eq!(a.call_timeout, Duration::from_secs(30));
        assert_eq!(
            shadow_timeout(&a),
            Some(prost_types::Duration {
                seconds: 2,
                nanos: 0
            })
        );
    }

    /// A global flag and a subcommand's flag with the same id or name share one value in clap:
    /// whatever one is given (or defaults to) the other gets.
    #[test]
    fn no_subcommand_flag_shadows_a_global_one() {
        use clap::Args;
        let cmd = CtlArgs::augment_args(clap::Command::new("ctl"));
        let globals: Vec<(String, Option<String>)> = cmd
            .get_arguments()
            .filter(|a| a.is_global_set())
            .map(|a| (a.get_id().to_string(), a.get_long().map(str::to_string)))
            .collect();
        assert!(globals.iter().any(|(id, _)| id == "call_timeout"));
        fn walk(
            cmd: &clap::Command,
            path: &str,
            globals: &[(String, Option<String>)],
            bad: &mut Vec<String>,
        ) {
            for a in cmd.get_arguments() {
                for (id, long) in globals {
                    if a.get_id() == id.as_str()
                        || (long.is_some() && a.get_long() == long.as_deref())
                    {
                        bad.push(format!("{path}: --{}", a.get_long().unwrap_or_default()));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), globals, bad);
            }
        }
        let mut bad = Vec::new();
        for sub in cmd.get_subcommands() {
            walk(sub, sub.get_name(), &globals, &mut bad);
        }
        assert!(
            bad.is_empty(),
            "flags that collide with global ones: {bad:?}"
        );
    }
}
