//! `ctl events …`: the Events service's watch stream.

use std::time::Duration;

use clap::Subcommand;

use crate::ctl::client::{json, Client, CtlError};
use crate::ctl::render::{cell, Output};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::events_client::EventsClient;

/// `ctl events …`
#[derive(Subcommand, Debug, Clone)]
pub enum Events {
    /// Stored events after a cursor, then (with --follow) new ones as they happen.
    Watch {
        /// Start after this cursor (0: from the first event).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Only these types; repeatable.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only this model's.
        #[arg(long)]
        model: Option<String>,
        /// Keep watching (until Ctrl-C); otherwise stop once the stored events are shown.
        #[arg(long, short)]
        follow: bool,
    },
}

/// A checked `ctl events` call.
#[derive(Debug)]
pub struct Plan {
    request: pb::WatchRequest,
    follow: bool,
}

/// Without --follow, the stream is over once no event arrives for this long: the stored ones
/// come at once.
const IDLE: Duration = Duration::from_millis(500);

impl Events {
    /// The call these flags make.
    pub fn plan(self) -> Plan {
        let Events::Watch {
            from,
            types,
            model,
            follow,
        } = self;
        Plan {
            request: pb::WatchRequest {
                from_cursor: from,
                types,
                model: model.unwrap_or_default(),
            },
            follow,
        }
    }
}

impl Plan {
    /// Watches and prints each event as it arrives: a line, or compact proto JSON.
    pub async fn run(self, client: &Client, output: Output) -> Result<(), CtlError> {
        let mut api = EventsClient::new(client.channel().await?);
        let mut stream = client.answer(api.watch(client.open_request(self.request)).await)?;
        loop {
            let next = if self.follow {
                stream.message().await
            } else {
                match tokio::time::timeout(IDLE, stream.message()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(()),
                }
            };
            let Some(event) = next.map_err(|s| client.failed(s))? else {
                return Ok(());
            };
            let e = json(&event);
            match output {
                Output::Json => println!("{e}"),
                Output::Table => println!(
                    "{:>6}  {}  {:<24} {}",
                    cell(&e["cursor"]),
                    cell(&e["time"]),
                    cell(&e["type"]),
                    cell(&e["message"])
                ),
            }
        }
    }
}
