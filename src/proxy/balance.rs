//! Spreading data-port connections evenly over the data threads.
//!
//! Every data thread accepts from the same listening socket. On its own that leaves the spread to
//! chance: a new connection wakes every thread and the first to call `accept` takes it, so a burst
//! of connections — a client opening its pool, h2load's four — often all land on one thread while
//! the others idle (measured: h2load's four connections on one of two threads in one run of
//! four). A gRPC client keeps its connection for hours, so the imbalance lasts. Each thread now
//! places what it accepts on the thread serving the fewest connections — itself when it is one
//! of them — and hands the socket over before anything is read from it (Envoy's "exact"
//! connection balancing does the same). A call never crosses threads; only a new connection
//! may, once.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use crate::telemetry::Metrics;

/// The index of the least loaded of `live` (connections per thread), `me` when it is one of the
/// least loaded, else the first of them.
pub fn least_loaded(live: &[i64], me: usize) -> usize {
    let min = live.iter().copied().min().unwrap_or(0);
    if live.get(me) == Some(&min) {
        return me;
    }
    live.iter().position(|&n| n == min).unwrap_or(me)
}

/// A connection accepted by one thread for another.
pub struct Handed {
    /// The socket, out of the accepting thread's reactor (nothing read from it yet).
    pub stream: std::net::TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its count on the thread it goes to.
    pub placed: Placed,
}

/// The live connections of every data thread (the `modelgate_data_connections` gauges, which
/// placing reads), and a way to hand each one a connection.
struct Shared {
    live: Vec<Gauge>,
    inboxes: Vec<mpsc::UnboundedSender<Handed>>,
}

/// One data thread's place in the balance: where it counts its connections and where it
/// receives those other threads accepted for it.
pub struct Seat {
    thread: usize,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Handed>,
}

/// One connection counted on a thread; it stops counting when dropped (the connection ended).
pub struct Placed {
    thread: usize,
    shared: Arc<Shared>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.shared.live[self.thread].dec();
    }
}

impl Placed {
    /// The thread the connection is counted on.
    pub fn thread(&self) -> usize {
        self.thread
    }
}

/// Seats for `threads` data threads (at least one), counted in `metrics`'
/// `modelgate_data_connections{thread}`.
pub fn seats(threads: usize, metrics: &Metrics) -> Vec<Seat> {
    let threads = threads.max(1);
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let shared = Arc::new(Shared {
        live: (0..threads).map(|i| metrics.data_connections(i)).collect(),
        inboxes: senders,
    });
    receivers
        .into_iter()
        .enumerate()
        .map(|(thread, inbox)| Seat {
            thread,
            shared: shared.clone(),
            inbox,
        })
        .collect()
}

impl Seat {
    /// This seat's thread.
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// Counts a new connection on the least loaded thread and says which.
    pub fn place(&self) -> Placed {
        let live: Vec<i64> = self.shared.live.iter().map(Gauge::get).collect();
        self.count_on(least_loaded(&live, self.thread))
    }

    /// Counts a connection on this seat's own thread.
    pub fn here(&self) -> Placed {
        self.count_on(self.thread)
    }

    fn count_on(&self, thread: usize) -> Placed {
        self.shared.live[thread].inc();
        Placed {
            thread,
            shared: self.shared.clone(),
        }
    }

    /// Hands a connection to the thread it was placed on; gives it back when that thread no
    /// longer takes connections (it is shutting down).
    pub fn hand(&self, handed: Handed) -> Result<(), Box<Handed>> {
        let thread = handed.placed.thread;
        self.shared.inboxes[thread]
            .send(handed)
            .map_err(|e| Box::new(e.0))
    }

    /// The next connection another thread accepted for this one (None once every sender is
    /// gone, which does not happen while this seat lives).
    pub async fn handed(&mut self) -> Option<Handed> {
        self.inbox.recv().await
    }

    /// Stops taking connections from other threads, at shutdown: those handed over and not yet
    /// taken are closed, and later ones are given back to the thread that accepted them.
    pub fn close(&mut self) {
        self.inbox.close();
        while let Ok(dropped) = self.inbox.try_recv() {
            tracing::debug!(peer = %dropped.peer, "data connection closed at shutdown before it was served");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_loaded_thread_takes_the_connection() {
        assert_eq!(least_loaded(&[0, 0], 0), 0);
        assert_eq!(least_loaded(&[0, 0], 1), 1);
        assert_eq!(least_loaded(&[1, 0], 0), 1);
        assert_eq!(least_loaded(&[3, 2, 2], 0), 1);
        assert_eq!(least_loaded(&[3, 2, 2], 2), 2);
        assert_eq!(least_loaded(&[5], 0), 0);
    }

    #[test]
    fn connections_spread_evenly_and_stop_counting_when_they_end() {
        let metrics = Metrics::new();
        let seats = seats(2, &metrics);
        // Thread 0 accepts four connections in a row, as when a client opens its pool.
        let mut placed: Vec<Placed> = (0..4).map(|_| seats[0].place()).collect();
        let on: Vec<usize> = placed.iter().map(Placed::thread).collect();
        assert_eq!(on, [0, 1, 0, 1]);
        assert_eq!(metrics.data_connections(0).get(), 2);
        assert_eq!(metrics.data_connections(1).get(), 2);
        // Both of thread 1's connections end: the next ones go to it, whoever accepts them,
        // until the two are even again; a tie stays on the thread that accepted.
        placed.retain(|p| p.thread() == 0);
        assert_eq!(metrics.data_connections(1).get(), 0);
        placed.push(seats[0].place());
        placed.push(seats[0].place());
        assert_eq!(placed[2].thread(), 1);
        assert_eq!(placed[3].thread(), 1);
        assert_eq!(seats[1].place().thread(), 1);
        assert_eq!(seats[0].place().thread(), 0);
    }

    #[tokio::test]
    async fn a_connection_handed_over_arrives_and_a_closed_seat_gives_it_back() {
        let metrics = Metrics::new();
        let mut seats = seats(2, &metrics);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        let placed = seats[0].place();
        assert_eq!(placed.thread(), 0);
        let other = seats[0].place();
        assert_eq!(other.thread(), 1);
        drop(placed);
        let handed = Handed {
            stream,
            peer,
            placed: other,
        };
        assert!(seats[0].hand(handed).is_ok());
        let got = seats[1].handed().await.expect("handed over");
        assert_eq!(got.peer, peer);
        assert_eq!(got.placed.thread(), 1);
        seats[1].close();
        let back = seats[0].hand(got).expect_err("a closed seat takes nothing");
        assert_eq!(back.peer, peer);
    }
}
