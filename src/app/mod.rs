//! The use cases: what modelgate does, over the domain (plain values) and the storage seam, with
//! typed errors and checked names at their boundary. The adapters — the tonic services in
//! `control`, the state file in `declare`, `ctl`, the data plane — call these; nothing here knows
//! tonic, RocksDB or the wire protocols.
//!
//! - [`control`]: apply a control change (registry, experiments, shadows) durably, then publish it.
//! - [`outcomes`]: ingest an outcome: judge it against its prediction, store it with its tallies.
//! - [`reports`]: assemble experiment results, model performance and shadow reports.

pub mod control;
pub mod outcomes;
pub mod reports;
