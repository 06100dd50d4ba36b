//! Admission to the data plane: at most `--max-in-flight` calls are served at once, and calls
//! beyond that wait for a slot to free — up to `--queue-timeout` (or the caller's deadline, when
//! shorter), with at most `--max-queued` waiting. Each data thread queues its own calls, first
//! come first served; a slot freed on a thread goes to that thread's queue unless another
//! thread's waiting calls hold fewer slots (see `Local`).
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
//! that wait go through a semaphore (their thread's), which hands each freed slot to the longest
//! waiting. (A
//! semaphore for every call — tokio's, before — locked its waiter list on every release and
//! shared its count and its `Arc` between the data threads: a few cache lines pulled from the
//! other core per call.)

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::telemetry::Metrics;

/// The data plane's slots and the calls waiting for one, as one data thread sees them: each
/// thread has its own (see [`Admission::sibling`]), sharing the counts, with a queue of its own.
pub struct Admission {
    shared: Arc<Shared>,
    /// This thread's waiting calls.
    local: Arc<Local>,
}

struct Shared {
    /// Calls waiting for a slot, on every thread (`Waiting`). Never more than the sum of the
    /// threads' own counts: a waiting call is counted in its thread's first and here second, and
    /// leaves here first.
    waiting: AtomicUsize,
    /// Every thread's queue.
    queues: ArcSwap<Vec<Arc<Local>>>,
    max_in_flight: usize,
    max_queued: usize,
    queue_timeout: Duration,
    /// `in_flight` (the slots taken, handed ones included) and `queued`.
    metrics: Arc<Metrics>,
}

/// One data thread's waiting calls.
///
/// Why a queue per thread: a slot freed on one thread and handed to a call waiting on the other
/// wakes that thread (an eventfd write, measured at 0.39–0.47 per call served at twice the
/// maximum with one shared queue), which then serves that one call and flushes its writes
/// alone. A freed slot goes to its own thread's waiting calls unless another thread's waiting
/// calls hold fewer slots (a tie goes to the other thread), so the slots stay shared about
/// evenly between threads that have calls waiting, and a thread with none in flight is not
/// left waiting for the other's queue to empty.
struct Local {
    /// Calls waiting on this thread.
    waiting: AtomicUsize,
    /// Slots this thread's calls hold, or that were handed to them and not yet taken back.
    in_flight: AtomicUsize,
    /// Slots handed to this thread's waiting calls and not taken yet: a freed slot goes here,
    /// still counted as in flight.
    queue: Semaphore,
}

impl Local {
    fn new() -> Arc<Self> {
        Arc::new(Local {
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            queue: Semaphore::new(0),
        })
    }
}

/// A call's slot; released (to a waiting call, if any) when dropped.
pub struct Slot {
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let local = &self.admission.local;
        local.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.admission.shared.release(local);
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
        let local = Local::new();
        Admission {
            shared: Arc::new(Shared {
                waiting: AtomicUsize::new(0),
                queues: ArcSwap::from_pointee(vec![local.clone()]),
                max_in_flight: max_in_flight.clamp(1, i64::MAX as usize),
                max_queued,
                queue_timeout,
                metrics,
            }),
            local,
        }
    }

    /// Another data thread's view of the same slots, with its own queue. A [`Slot`] holds its
    /// thread's `Admission`: cloning an `Arc` only that thread uses writes nothing the other
    /// threads read.
    pub fn sibling(&self) -> Self {
        let local = Local::new();
        self.shared.queues.rcu(|queues| {
            let mut queues = Vec::clone(queues);
            queues.push(local.clone());
            queues
        });
        Admission {
            shared: self.shared.clone(),
            local,
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
        let _waiting = Waiting::enter(s, &self.local)?;
        // A slot freed while this call was not yet counted as waiting was given back to the
        // count, not handed on: take it.
        fence(Ordering::SeqCst);
        if s.take() {
            return Ok(self.slot());
        }
        let wait = s.queue_timeout.min(deadline);
        match tokio::time::timeout(wait, self.local.queue.acquire()).await {
            Ok(Ok(handed)) => {
                // The slot was counted as in flight, here and on this thread, when it was
                // handed over.
                handed.forget();
                Ok(Slot {
                    admission: self.clone(),
                })
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

    /// A slot this thread's call took from the count.
    fn slot(self: &Arc<Self>) -> Slot {
        self.local.in_flight.fetch_add(1, Ordering::Relaxed);
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

    /// Gives back a slot freed on `own`'s thread: to a waiting call if there is one (see
    /// [`Local`] for which thread's), else to the count.
    fn release(&self, own: &Local) {
        loop {
            if self.waiting.load(Ordering::SeqCst) > 0 {
                let queues = self.queues.load();
                if let Some(to) = choose(&queues, own) {
                    return self.hand_on(to);
                }
            }
            self.metrics.in_flight.dec();
            // A call that started waiting just now may have looked for a free slot before this
            // one was given back (and the check above may have missed it): take the slot again
            // and hand it on. (The waiting calls, counted here, are counted on their threads
            // already, so the next round finds one unless it has left.)
            fence(Ordering::SeqCst);
            if self.waiting.load(Ordering::SeqCst) == 0 || !self.take() {
                return;
            }
        }
    }

    /// Hands a taken slot to the calls waiting on `to`'s thread.
    fn hand_on(&self, to: &Local) {
        to.in_flight.fetch_add(1, Ordering::Relaxed);
        to.queue.add_permits(1);
        // The call it was for may have left (timed out, gone away, or found a slot itself)
        // before the slot arrived; with nobody left waiting there, take it back.
        fence(Ordering::SeqCst);
        if to.waiting.load(Ordering::SeqCst) == 0 {
            self.reclaim(to);
        }
    }

    /// Takes back the slots handed to `from`'s waiting calls that are gone, and releases them.
    /// (Several can be: a waiting call that finds a free slot itself leaves the one handed to
    /// it.)
    fn reclaim(&self, from: &Local) {
        loop {
            let stray = from.queue.available_permits();
            if stray == 0 {
                return;
            }
            let Ok(n) = u32::try_from(stray) else { return };
            // Fails only when a waiting call took some meanwhile: count again.
            if let Ok(p) = from.queue.try_acquire_many(n) {
                p.forget();
                for _ in 0..n {
                    from.in_flight.fetch_sub(1, Ordering::Relaxed);
                    self.release(from);
                }
                return;
            }
        }
    }
}

/// The thread whose waiting calls get a slot freed on `own`'s: of those with calls waiting, the
/// one holding the fewest slots; on a tie, not `own` (the slot was its).
fn choose<'q>(queues: &'q [Arc<Local>], own: &Local) -> Option<&'q Local> {
    let mut best: Option<&Local> = None;
    for q in queues {
        if q.waiting.load(Ordering::SeqCst) == 0 {
            continue;
        }
        let better = best.is_none_or(|b| {
            let (n, m) = (
                q.in_flight.load(Ordering::Relaxed),
                b.in_flight.load(Ordering::Relaxed),
            );
            n < m || (n == m && std::ptr::eq(b, own))
        });
        if better {
            best = Some(q);
        }
    }
    best
}

/// A place in a thread's queue, counted (there, then in the total) while held.
struct Waiting<'a> {
    shared: &'a Shared,
    local: &'a Local,
}

impl<'a> Waiting<'a> {
    fn enter(shared: &'a Shared, local: &'a Local) -> Result<Self, Refused> {
        local.waiting.fetch_add(1, Ordering::SeqCst);
        let before = shared.waiting.fetch_add(1, Ordering::SeqCst);
        shared.metrics.queued.inc();
        let w = Waiting { shared, local };
        if before >= shared.max_queued {
            return Err(Refused::QueueFull);
        }
        Ok(w)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let s = self.shared;
        s.metrics.queued.dec();
        s.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.local.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The thread's last waiting call is gone: a slot handed on after it stopped waiting
            // has nobody to go to.
            fence(Ordering::SeqCst);
            s.reclaim(self.local);
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

    /// Two data threads with calls waiting: a slot freed on one goes to its own queue while the
    /// threads hold the slots evenly, and to the other thread's when that one holds fewer — so
    /// a thread whose calls hold no slot is not left waiting for the other's queue to empty.
    #[tokio::test(start_paused = true)]
    async fn freed_slots_stay_on_their_thread_unless_the_other_holds_fewer() {
        let a = admission(4, 10, 1000);
        let b = Arc::new(a.sibling());
        let waiter = |x: &Arc<Admission>, tag: &'static str| {
            let x = x.clone();
            tokio::spawn(async move { x.wait(Duration::from_secs(30)).await.map(|s| (tag, s)) })
        };
        // Thread a holds three slots and thread b one.
        let mut on_a: Vec<_> = (0..3).map(|_| a.try_admit().unwrap()).collect();
        let on_b = b.try_admit().unwrap();
        let (a1, b1, a2) = (waiter(&a, "a1"), waiter(&b, "b1"), waiter(&a, "a2"));
        tokio::task::yield_now().await;
        assert_eq!(a.shared.metrics.queued.get(), 3);
        // Freed on a, which still holds two against b's one: b's waiting call gets it.
        drop(on_a.pop());
        let (tag, b1_slot) = b1.await.unwrap().unwrap();
        assert_eq!(tag, "b1");
        // Now two each. Freed on b (one left there): b has nobody waiting, so a's first.
        drop(on_b);
        let (tag, a1_slot) = a1.await.unwrap().unwrap();
        assert_eq!(tag, "a1");
        // Freed on a with only a's call waiting: a's.
        drop(on_a.pop());
        assert_eq!(a2.await.unwrap().unwrap().0, "a2");
        drop((a1_slot, b1_slot, on_a));
        assert_eq!(a.shared.metrics.queued.get(), 0);
    }

    /// With one slot and calls waiting on both threads, the slot alternates between them.
    #[tokio::test(start_paused = true)]
    async fn one_slot_alternates_between_threads_with_calls_waiting() {
        let a = admission(1, 10, 1000);
        let b = Arc::new(a.sibling());
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let held = a.try_admit().unwrap();
        let mut tasks = Vec::new();
        for (x, tag) in [(&a, 'a'), (&a, 'a'), (&b, 'b'), (&b, 'b')] {
            let (x, order) = (x.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = x.wait(Duration::from_secs(30)).await.unwrap();
                order.lock().push(tag);
                tokio::task::yield_now().await;
                drop(slot);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), vec!['b', 'a', 'b', 'a']);
        assert_eq!(a.shared.metrics.in_flight.get(), 0);
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
            // Every slot is taken until the calls have started, so that some must wait however
            // the runtime schedules them.
            let first: Vec<_> = (0..3).map(|_| a.try_admit().unwrap()).collect();
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
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(first);
            for c in calls {
                c.await.unwrap();
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?} served at once");
        assert!(waited.load(Ordering::SeqCst) > 0, "no call had to wait");
        assert_eq!(a.shared.metrics.in_flight.get(), 0);
        assert_eq!(a.shared.metrics.queued.get(), 0);
        for q in a.shared.queues.load().iter() {
            assert_eq!(q.queue.available_permits(), 0, "a slot left handed on");
            assert_eq!(q.in_flight.load(Ordering::SeqCst), 0, "a slot left counted");
        }
        let held: Vec<_> = (0..3)
            .map(|_| a.try_admit().expect("every slot free"))
            .collect();
        assert!(a.try_admit().is_none());
        drop(held);
    }
}
