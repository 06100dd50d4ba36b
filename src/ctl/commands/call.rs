//! `ctl call Service/Method '{json}'`: any control method with a proto-JSON request, like
//! grpcurl. Proto JSON is this command's job, so it stays untyped.

use serde_json::Value;

use super::{read_input, usage};
use crate::ctl::client::{Client, CtlError};
use crate::ctl::render::{self, Output};

/// A checked `ctl call`.
#[derive(Debug)]
pub struct Plan {
    method: String,
    body: Value,
}

/// The call: the body must be JSON (`-` reads it from stdin); the method and fields are checked
/// against the descriptors once connected.
pub fn plan(method: String, body: String) -> Result<Plan, CtlError> {
    let text = if body == "-" { read_input("-")? } else { body };
    let body: Value =
        serde_json::from_str(&text).map_err(|e| usage(format!("the request is not JSON: {e}")))?;
    Ok(Plan { method, body })
}

impl Plan {
    /// Makes the call and prints the answer as proto JSON, whatever --output says (like grpcurl).
    pub async fn run(self, client: &Client) -> Result<(), CtlError> {
        let answer = client.call(&self.method, self.body).await?;
        render::print(&answer, Output::Json);
        Ok(())
    }
}
