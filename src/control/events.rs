//! `modelgate.v1.Events/Watch`: replays stored events after the watcher's cursor, then streams new
//! ones. A watcher that falls behind the live broadcast catches up from RocksDB; its own slowness
//! only ever delays its own stream.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::events::{matches, EventBus};
use crate::pb::modelgate::v1 as pb;
use crate::pb::modelgate::v1::events_server::Events;

/// The Events service.
#[derive(Clone)]
pub struct EventService {
    bus: Arc<EventBus>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl EventService {
    /// A service over `bus`; open Watch streams end when `stop` turns true (shutdown).
    pub fn new(bus: Arc<EventBus>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        EventService { bus, stop }
    }
}

#[tonic::async_trait]
impl Events for EventService {
    type WatchStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        // Subscribe before replaying, so nothing published in between is missed.
        let mut live = self.bus.subscribe();
        let store = self.bus.store().clone();
        let mut stop = self.stop.clone();
        let follow = async move {
            let mut last = r.from_cursor;
            loop {
                // Replay what is stored after `last`.
                loop {
                    let s = store.clone();
                    let after = last;
                    let batch =
                        match tokio::task::spawn_blocking(move || s.events_after(after, 256)).await
                        {
                            Ok(Ok(b)) => b,
                            Ok(Err(e)) => {
                                let _ = tx
                                    .send(Err(Status::unavailable(format!("storage: {e}"))))
                                    .await;
                                return;
                            }
                            Err(_) => return,
                        };
                    if batch.is_empty() {
                        break;
                    }
                    for e in batch {
                        last = e.cursor;
                        if matches(&e, &r.types, &r.model) && tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                }
                // Then follow the live broadcast until it gaps (the watcher lagged).
                loop {
                    match live.recv().await {
                        Ok(e) if e.cursor <= last => continue,
                        Ok(e) if e.cursor == last + 1 => {
                            last = e.cursor;
                            if matches(&e, &r.types, &r.model)
                                && tx.send(Ok(pb::Event::clone(&e))).await.is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        };
        tokio::spawn(async move {
            // Shutdown ends the stream, so that graceful shutdown never waits on a watcher.
            tokio::select! {
                _ = follow => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
