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
//!
//! The slots are counted in one atomic, the `modelgate_in_flight_requests` gauge itself: a call
//! takes a slot with one compare-and-swap and gives it back with one subtraction. Only calls
//! that wait go through a semaphore, which hands each freed slot to the longest waiting. (A
//! semaphore for every call — tokio's, before — locked its waiter list on every release and
//! shared its count and its `Arc` between the data threads: a few cache lines pulled from the
//! other core per call.)

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::telemetry::Metrics;

/// The data plane's slots and the calls waiting for one, as one data thread sees them: each
/// thread has its own (see [`Admission::sibling`]), sharing the counts.
pub struct Admission {
    shared: Arc<Shared>,
}

struct Shared {
    /// Calls waiting for a slot (`Waiting`).
    waiting: AtomicUsize,
    /// Slots handed to waiters and not taken yet: a freed slot goes here, still counted as in
    /// flight, when someone waits.
    queue: Semaphore,
    max_in_flight: usize,
    max_queued: usize,
    queue_timeout: Duration,
    /// `in_flight` (the slots taken, handed ones included) and `queued`.
    metrics: Arc<Metrics>,
}

/// A call's slot; released (to the longest waiting call, if any) when dropped.
pub struct Slot {
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.shared.release();
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
            shared: Arc::new(Shared {
                waiting: AtomicUsize::new(0),
                queue: Semaphore::new(0),
                max_in_flight: max_in_flight.clamp(1, i64::MAX as usize),
                max_queued,
                queue_timeout,
                metrics,
            }),
        }
    }

    /// Another data thread's view of the same slots. A [`Slot`] holds its thread's `Admission`:
    /// cloning an `Arc` only that thread uses writes nothing the other threads read.
    pub fn sibling(&self) -> Self {
        Admission {
            shared: self.shared.clone(),
        }
    }

    /// A free slot, if there is one and nobody is waiting for it (a newcomer does not jump the
    /// queue).
    pub fn try_admit(self: &Arc<Self>) -> Option<Slot> {
        let s = &self.shared;
        (s.waiting.load(Ordering::SeqCst) == 0 && s.take()).then(|| self.slot())
    }

    /// Waits for a slot for up to `--queue-timeout` or `deadline`, whichever is shorter.
    /// Cancel-safe: a caller that goes away while waiting leaves the queue, and a slot handed
    /// to it goes to the next.
    pub async fn wait(self: &Arc<Self>, deadline: Duration) -> Result<Slot, Refused> {
        let s = &self.shared;
        if s.queue_timeout.is_zero() {
            return Err(Refused::NoQueue);
        }
        let _waiting = Waiting::enter(s)?;
        // A slot freed while this call was not yet counted as waiting was given back to the
        // count, not handed on: take it.
        fence(Ordering::SeqCst);
        if s.take() {
            return Ok(self.slot());
        }
        let wait = s.queue_timeout.min(deadline);
        match tokio::time::timeout(wait, s.queue.acquire()).await {
            Ok(Ok(handed)) => {
                // The slot was counted as in flight when it was handed over.
                handed.forget();
                Ok(self.slot())
            }
            // The semaphore is never closed; treat it as no slot rather than panic.
            Ok(Err(_)) | Err(_) => Err(Refused::Waited(wait)),
        }
    }

    /// The message a refused caller reads: what was full, and the flag that sets it.
    pub fn refusal(&self, why: Refused) -> String {
        let s = &self.shared;
        let limit = format!(
            "modelgate is serving its limit of {} requests (--max-in-flight)",
            s.max_in_flight
        );
        match why {
            Refused::NoQueue => format!("{limit}; retry with backoff"),
            Refused::QueueFull => format!(
                "{limit} and {} more are waiting (--max-queued); retry with backoff",
                s.max_queued
            ),
            Refused::Waited(d) => format!(
                "{limit} and none freed within {d:?} (--queue-timeout or the call's deadline); retry with backoff"
            ),
        }
    }

    fn slot(self: &Arc<Self>) -> Slot {
        Slot {
            admission: self.clone(),
        }
    }
}

impl Shared {
    /// Counts a slot taken, if one is free.
    fn take(&self) -> bool {
        let used = self.metrics.in_flight.inner();
        let mut n = used.load(Ordering::Relaxed);
        loop {
            if n >= self.max_in_flight as i64 {
                return false;
            }
            match used.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
    }

    /// Gives a slot back: to the longest waiting call if there is one, else to the count.
    fn release(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return self.hand_on();
        }
        self.metrics.in_flight.dec();
        // A call that started waiting just now may have looked for a free slot before this one
        // was given back (and the check above may have missed it): hand one on for it.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 && self.take() {
            self.hand_on();
        }
    }

    /// Hands a taken slot to the waiting calls.
    fn hand_on(&self) {
        self.queue.add_permits(1);
        // The call it was for may have left (timed out, gone away, or found a slot itself)
        // before the slot arrived; with nobody left waiting, take it back.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 {
            self.reclaim();
        }
    }

    /// Takes back the slots handed to waiting calls that are gone, and releases them. (Several
    /// can be: a waiting call that finds a free slot itself leaves the one handed to it.)
    fn reclaim(&self) {
        loop {
            let stray = self.queue.available_permits();
            if stray == 0 {
                return;
            }
            let Ok(n) = u32::try_from(stray) else { return };
            // Fails only when a waiting call took some meanwhile: count again.
            if let Ok(p) = self.queue.try_acquire_many(n) {
                p.forget();
                for _ in 0..n {
                    self.release();
                }
                return;
            }
        }
    }
}

/// A place in the queue, counted while held.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn enter(s: &'a Shared) -> Result<Self, Refused> {
        if s.waiting.fetch_add(1, Ordering::SeqCst) >= s.max_queued {
            s.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::QueueFull);
        }
        s.metrics.queued.inc();
        Ok(Waiting(s))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let s = self.0;
        s.metrics.queued.dec();
        if s.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last waiter is gone: a slot handed on after it stopped waiting has nobody to
            // go to.
            fence(Ordering::SeqCst);
            s.reclaim();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, queued: usize, timeout_ms: u64) -> Arc<Admission> {
        Arc::new(Admission::new(
            max,
            queued,
            Duration::from_millis(timeout_ms),
            Arc::new(Metrics::new()),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_call_gets_the_next_free_slot_in_arrival_order() {
        let a = admission(1, 10, 1000);
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
        assert_eq!(a.shared.metrics.queued.get(), 2);
        drop(held);
        assert_eq!(first.await.unwrap(), Ok(1));
        assert_eq!(second.await.unwrap(), Ok(2));
        assert_eq!(a.shared.metrics.queued.get(), 0);
        assert_eq!(a.shared.metrics.in_flight.get(), 0);
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
        assert_eq!(a.shared.metrics.queued.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_and_a_zero_timeout_refuse_at_once() {
        let a = admission(1, 1, 1000);
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
        let a = admission(1, 10, 1000);
        let held = a.try_admit().unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.wait(Duration::from_secs(30)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert_eq!(a.shared.metrics.queued.get(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.shared.metrics.queued.get(), 0);
        drop(held);
        assert!(a.try_admit().is_some(), "the slot went to nobody who left");
    }

    /// Many calls on several threads, more than the slots, each waiting: never more than the
    /// limit served at once, every call served, and nothing left counted when they are done —
    /// whatever order slots are freed, handed on and found in.
    #[test]
    fn slots_hold_under_contention_and_none_is_lost() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let a = admission(3, 1000, 10_000);
        let serving = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let waited = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let calls: Vec<_> = (0..400)
                .map(|i| {
                    // Each call runs on a thread of its own runtime view, as the data threads do.
                    let (a, serving, most) = (Arc::new(a.sibling()), serving.clone(), most.clone());
                    let waited = waited.clone();
                    tokio::spawn(async move {
                        let slot = match a.try_admit() {
                            Some(s) => s,
                            None => {
                                waited.fetch_add(1, Ordering::SeqCst);
                                a.wait(Duration::from_secs(30)).await.expect("a slot")
                            }
                        };
                        let now = serving.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        if i % 3 == 0 {
                            tokio::task::yield_now().await;
                        }
                        serving.fetch_sub(1, Ordering::SeqCst);
                        drop(slot);
                    })
                })
                .collect();
            for c in calls {
                c.await.unwrap();
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?} served at once");
        assert!(waited.load(Ordering::SeqCst) > 0, "no call had to wait");
        assert_eq!(a.shared.metrics.in_flight.get(), 0);
        assert_eq!(a.shared.metrics.queued.get(), 0);
        assert_eq!(
            a.shared.queue.available_permits(),
            0,
            "a slot left handed on"
        );
        let held: Vec<_> = (0..3)
            .map(|_| a.try_admit().expect("every slot free"))
            .collect();
        assert!(a.try_admit().is_none());
        drop(held);
    }
}
