//! Admission to the data plane: at most `--max-in-flight` calls are served at once, and calls
//! beyond that wait, first come first served, for a slot to free — up to `--queue-timeout` (or
//! the caller's deadline, when shorter), with at most `--max-queued` waiting.
//!
//! Why wait instead of refusing at once: when modelgate's own CPU is what is saturated, a
//! refusal costs about half a served call (the HTTP/2 stream, the headers, the answer), and a
//! caller refused at once sends its next call at once. Refusing the excess then spends the CPU on
//! refusals, and the calls served fall to a tenth of the maximum (measured: 0.12 of it at twice
//! the maximum). A waiting call costs nothing while it waits: its body is not read, so HTTP/2
//! flow control holds the rest of it at the client, and its caller does not send another. The
//! callers are held back at the connection, as a proxy's `maxconn` queue holds them, and the
//! calls served stay at the maximum. What cannot wait — the queue is full, or no slot freed in
//! time — is still refused with RESOURCE_EXHAUSTED, and `--queue-timeout 0` restores refusing
//! at once.
//!
//! hyper cannot lower a connection's advertised concurrent-stream limit once the connection is
//! open (the other way to hold callers back); the static per-connection limit
//! (`--max-concurrent-streams`) and `--max-queued` bound what waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::Metrics;

/// The data plane's slots and the calls waiting for one.
pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_in_flight: usize,
    max_queued: usize,
    queue_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// A call's slot; released (and the in-flight gauge lowered) when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// Why a call got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Waiting is off (`--queue-timeout 0`).
    NoQueue,
    /// `--max-queued` calls are already waiting.
    QueueFull,
    /// No slot freed within this long.
    Waited(Duration),
}

impl Admission {
    /// Admission with `max_in_flight` slots (at least 1).
    pub fn new(
        max_in_flight: usize,
        max_queued: usize,
        queue_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(max_in_flight.min(Semaphore::MAX_PERMITS))),
            waiting: AtomicUsize::new(0),
            max_in_flight,
            max_queued,
            queue_timeout,
            metrics,
        }
    }

    /// A free slot, if there is one and nobody is waiting for it (the semaphore hands released
    /// slots to waiters first, so a newcomer cannot jump the queue).
    pub fn try_admit(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// Waits for a slot for up to `--queue-timeout` or `deadline`, whichever is shorter.
    /// Cancel-safe: a caller that goes away while waiting leaves the queue.
    pub async fn wait(&self, deadline: Duration) -> Result<Slot, Refused> {
        if self.queue_timeout.is_zero() {
            return Err(Refused::NoQueue);
        }
        let _waiting = Waiting::enter(self)?;
        let wait = self.queue_timeout.min(deadline);
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.slot(permit)),
            // The semaphore is never closed; treat it as no slot rather than panic.
            Ok(Err(_)) | Err(_) => Err(Refused::Waited(wait)),
        }
    }

    /// The message a refused caller reads: what was full, and the flag that sets it.
    pub fn refusal(&self, why: Refused) -> String {
        let limit = format!(
            "modelgate is serving its limit of {} requests (--max-in-flight)",
            self.max_in_flight
        );
        match why {
            Refused::NoQueue => format!("{limit}; retry with backoff"),
            Refused::QueueFull => format!(
                "{limit} and {} more are waiting (--max-queued); retry with backoff",
                self.max_queued
            ),
            Refused::Waited(d) => format!(
                "{limit} and none freed within {d:?} (--queue-timeout or the call's deadline); retry with backoff"
            ),
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.metrics.in_flight.inc();
        Slot {
            _permit: permit,
            metrics: self.metrics.clone(),
        }
    }
}

/// A place in the queue, counted while held.
struct Waiting<'a>(&'a Admission);

impl<'a> Waiting<'a> {
    fn enter(a: &'a Admission) -> Result<Self, Refused> {
        if a.waiting.fetch_add(1, Ordering::AcqRel) >= a.max_queued {
            a.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::QueueFull);
        }
        a.metrics.queued.inc();
        Ok(Waiting(a))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.queued.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, queued: usize, timeout_ms: u64) -> Admission {
        Admission::new(
            max,
            queued,
            Duration::from_millis(timeout_ms),
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_call_gets_the_next_free_slot_in_arrival_order() {
        let a = Arc::new(admission(1, 10, 1000));
        let held = a.try_admit().expect("a free slot");
        assert!(a.try_admit().is_none());
        let first = tokio::spawn({
            let a = a.clone();
            async move { a.wait(Duration::from_secs(30)).await.map(|_| 1) }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let a = a.clone();
            async move { a.wait(Duration::from_secs(30)).await.map(|_| 2) }
        });
        tokio::task::yield_now().await;
        assert_eq!(a.metrics.queued.get(), 2);
        drop(held);
        assert_eq!(first.await.unwrap(), Ok(1));
        assert_eq!(second.await.unwrap(), Ok(2));
        assert_eq!(a.metrics.queued.get(), 0);
        assert_eq!(a.metrics.in_flight.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_no_longer_than_the_queue_timeout_or_its_deadline() {
        let a = admission(1, 10, 1000);
        let _held = a.try_admit().unwrap();
        let t = tokio::time::Instant::now();
        let r = a.wait(Duration::from_secs(30)).await;
        assert_eq!(r.err(), Some(Refused::Waited(Duration::from_secs(1))));
        assert_eq!(t.elapsed(), Duration::from_secs(1));
        let r = a.wait(Duration::from_millis(200)).await.err();
        assert_eq!(r, Some(Refused::Waited(Duration::from_millis(200))));
        let msg = a.refusal(r.unwrap());
        assert!(
            msg.contains("--max-in-flight") && msg.contains("200ms"),
            "{msg}"
        );
        assert_eq!(a.metrics.queued.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_and_a_zero_timeout_refuse_at_once() {
        let a = Arc::new(admission(1, 1, 1000));
        let _held = a.try_admit().unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.wait(Duration::from_secs(30)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        let t = tokio::time::Instant::now();
        assert_eq!(
            a.wait(Duration::from_secs(30)).await.err(),
            Some(Refused::QueueFull)
        );
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert!(a.refusal(Refused::QueueFull).contains("--max-queued"));
        assert!(
            !waiter.await.unwrap(),
            "the waiter timed out: the slot stayed held"
        );

        let none = admission(1, 10, 0);
        let _held = none.try_admit().unwrap();
        assert_eq!(
            none.wait(Duration::from_secs(30)).await.err(),
            Some(Refused::NoQueue)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_while_waiting_leaves_the_queue() {
        let a = Arc::new(admission(1, 10, 1000));
        let held = a.try_admit().unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.wait(Duration::from_secs(30)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert_eq!(a.metrics.queued.get(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.metrics.queued.get(), 0);
        drop(held);
        assert!(a.try_admit().is_some(), "the slot went to nobody who left");
    }
}
