//! modelgate: a gRPC sidecar for machine-learning model servers.
//!
//! See `README.md` for what it does and `docs/` for the design. The binary (`src/main.rs`) is a
//! thin CLI over this library; tests start the same servers in-process.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod control;
pub mod convert;
pub mod ctl;
pub mod declare;
pub mod demo;
pub mod drift;
pub mod events;
pub mod experiment;
pub mod feature_store;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod model_server;
pub mod monitor;
pub mod oip;
pub mod outcome;
pub mod pb;
pub mod protocol;
pub mod proxy;
pub mod record;
pub mod recorder;
pub mod registry;
pub mod routing;
pub mod server;
pub mod shadow;
pub mod spec;
pub mod startup_pages;
pub mod state;
pub mod stats;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod tensor;
pub mod tls;
pub mod traces;
pub mod webhook;
pub mod wire;
