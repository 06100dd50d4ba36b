//! Declarative state: one TOML file naming models, versions, experiments and shadows, applied at
//! start and again whenever it changes, so that every replica of a Deployment — each with its own
//! RocksDB — converges to the same routing. The format and its rules are in
//! `docs/declarative-state.md`; `deploy/state.example.toml` is a complete example.
//!
//! Three layers, the first two plain Rust (no I/O, no async):
//!
//! - **The format** ([`StateFile`]) and [`parse`](fn@parse): serde with `deny_unknown_fields`,
//!   then checks across items, then a dry run of the whole file against an empty state. Every
//!   error names the field by its path in the file (`models[0].versions[1].endpoint: …`) and its
//!   line.
//! - **Reconciliation** ([`reconcile`](fn@reconcile), and [`plan`] on a copy): compares what the
//!   file says with what a [`State`](crate::control::State) holds and changes only the
//!   difference, through the same registry, experiment and shadow rules the gRPC services call.
//!   Applying a file twice changes nothing the second time.
//! - **Application** ([`apply`](fn@apply), [`watch`](fn@watch)): one
//!   [`ControlPlane::update_state`](crate::control::ControlPlane::update_state) per apply, so the
//!   whole file is one synced `WriteBatch` and one routing snapshot; then the same events the
//!   services publish, plus `state_file_applied` / `state_file_rejected`; and the poller.
//!
//! One file per idea:
//!
//! | file | holds |
//! |---|---|
//! | `format.rs` | the declaration types and [`DeclareError`] (a problem named by its path) |
//! | `span.rs` | the TOML span locator: byte offset → field path, field path → line and column |
//! | `dates.rs` | TOML date-times → Unix milliseconds |
//! | `parse.rs` | bytes → checked [`StateFile`]: serde, checks across items, the dry run; [`load`] |
//! | `reconcile.rs` | file against state → [`Report`] and the durable update |
//! | `apply.rs` | [`apply`](fn@apply): one control-plane update, then the events |
//! | `watch.rs` | [`watch`](fn@watch): the poller |

mod apply;
mod dates;
#[cfg(test)]
mod fixtures;
mod format;
mod parse;
mod reconcile;
mod span;
mod watch;

pub use apply::{apply, ApplyError, APPLIED_EVENT};
pub use format::{
    ComparisonDecl, DeclareError, ExperimentDecl, ExperimentStateDecl, ModelDecl, PolicyDecl,
    PredictionDecl, ShadowDecl, StageDecl, StateFile, VariantDecl, VersionDecl,
};
pub use parse::{check_setting, from_bytes, load, parse, sha256_hex, LoadError, Loaded};
pub use reconcile::{plan, reconcile, Change, Report};
pub use watch::{watch, REJECTED_EVENT};
