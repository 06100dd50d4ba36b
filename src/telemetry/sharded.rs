//! Counters and histograms that every data thread writes in a part of its own (a shard), summed
//! when `/metrics` is read.
//!
//! Why: every proxied call counts itself (its route's status counter, its latency and its
//! upstream's latency histograms). With one atomic (or, for prometheus-client's histogram, one
//! lock and its fields) per series, two data threads serving the same route wrote the same
//! cache lines on every call, and each write first pulled the line from the other core: about
//! 90 ns per hand-off on the 2-core machine the README's figures come from, several per call. A
//! data thread writing its own shard keeps the line in its own cache; a scrape, a few times a
//! minute, reads every shard. This is how Envoy keeps per-worker stats and merges them on read.
//!
//! Data thread `i` writes shard `1 + i % (n - 1)`; every other thread (control plane, recorder,
//! tests) writes shard 0. Writes stay atomic read-modify-writes, so threads that share a shard
//! (more data threads than shards) still count exactly.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

thread_local! {
    /// This thread's shard number before the modulo: 0 outside data threads.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread write shard `1 + index % (shards - 1)`: called first by data
/// thread `index`.
pub fn set_data_thread(index: usize) {
    SHARD.with(|s| s.set(index + 1));
}

/// Shards per metric: one per core and one for the other threads, at most 64.
fn shard_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 63)
            + 1
    })
}

fn shard(len: usize) -> usize {
    match SHARD.with(Cell::get) {
        0 => 0,
        s => 1 + (s - 1) % (len - 1).max(1),
    }
}

/// A cache line (two, for the adjacent-line prefetcher) to itself.
#[repr(align(128))]
#[derive(Default, Debug)]
struct Padded<T>(T);

/// One `T` per shard ([`shard_count`]), each on lines of its own; clones share them.
#[derive(Debug)]
struct Shards<T>(Arc<[Padded<T>]>);

impl<T> Clone for Shards<T> {
    fn clone(&self) -> Self {
        Shards(self.0.clone())
    }
}

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Shards((0..shard_count()).map(|_| Padded::default()).collect())
    }
}

impl<T> Shards<T> {
    /// The calling thread's shard.
    fn mine(&self) -> &T {
        &self.0[shard(self.0.len())].0
    }

    /// Every shard, to sum them.
    fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &p.0)
    }
}

/// A monotonic counter, summed over its shards when read.
#[derive(Clone, Debug, Default)]
pub struct ShardedCounter {
    shards: Shards<AtomicU64>,
}

impl ShardedCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.shards.mine().fetch_add(1, Ordering::Relaxed);
    }

    /// The total over every shard.
    pub fn get(&self) -> u64 {
        self.shards.all().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Latency buckets: 50 µs doubling 17 times (to ~3.3 s), and +Inf.
pub const LATENCY_BOUNDS: [f64; 17] = {
    let mut b = [0.00005; 17];
    let mut i = 1;
    while i < 17 {
        b[i] = b[i - 1] * 2.0;
        i += 1;
    }
    b
};

const BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

#[derive(Default, Debug)]
struct HistogramShard {
    /// The sum's f64 bits.
    sum: AtomicU64,
    count: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// A latency histogram over [`LATENCY_BOUNDS`] (what prometheus-client's
/// `Histogram::new(exponential_buckets(0.00005, 2.0, 17))` exports, written per shard).
#[derive(Clone, Debug, Default)]
pub struct ShardedHistogram {
    shards: Shards<HistogramShard>,
}

impl ShardedHistogram {
    /// Counts `v` (seconds) in the first bucket whose upper bound is at least `v`.
    pub fn observe(&self, v: f64) {
        let s = self.shards.mine();
        // Only this thread writes its shard, unless threads share one: the loop then retries.
        let mut old = s.sum.load(Ordering::Relaxed);
        while let Err(now) = s.sum.compare_exchange_weak(
            old,
            (f64::from_bits(old) + v).to_bits(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            old = now;
        }
        s.count.fetch_add(1, Ordering::Relaxed);
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        s.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Sum, count and per-bucket counts (not cumulative; the last bound is `f64::MAX`, which the
    /// encoder writes as `+Inf`), over every shard.
    pub fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .map(|b| (b, 0))
            .collect();
        for s in self.shards.all() {
            sum += f64::from_bits(s.sum.load(Ordering::Relaxed));
            count += s.count.load(Ordering::Relaxed);
            for (b, n) in buckets.iter_mut().zip(&s.buckets) {
                b.1 += n.load(Ordering::Relaxed);
            }
        }
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.get();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
    use prometheus_client::registry::Registry;

    fn text(name: &str, m: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static) -> String {
        let mut r = Registry::default();
        r.register(name, "help", m);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    /// The sharded histogram exports exactly what prometheus-client's own does for the same
    /// observations, whichever threads made them.
    #[test]
    fn a_sharded_histogram_exports_what_prometheus_clients_does() {
        assert_eq!(
            LATENCY_BOUNDS.to_vec(),
            exponential_buckets(0.00005, 2.0, 17).collect::<Vec<_>>()
        );
        let ours = ShardedHistogram::default();
        let theirs = Histogram::new(exponential_buckets(0.00005, 2.0, 17));
        // Sums of powers of two are exact in any order, so the two sums agree to the last digit.
        let values = [
            0.0,
            0.5f64.powi(20),
            0.5f64.powi(14),
            0.5f64.powi(10),
            0.25,
            3.0,
            4.0,
            100.0,
        ];
        std::thread::scope(|s| {
            for (i, chunk) in values.chunks(2).enumerate() {
                let ours = ours.clone();
                s.spawn(move || {
                    set_data_thread(i);
                    for v in chunk {
                        ours.observe(*v);
                    }
                });
            }
        });
        for v in values {
            theirs.observe(v);
        }
        assert_eq!(text("latency", ours), text("latency", theirs));

        // A value on a bound counts in that bound's bucket, as prometheus-client counts it.
        for (i, bound) in LATENCY_BOUNDS.iter().enumerate() {
            let h = ShardedHistogram::default();
            h.observe(*bound);
            let (_, count, buckets) = h.get();
            assert_eq!(count, 1);
            assert_eq!(buckets[i], (*bound, 1), "bound {bound}");
        }
    }

    /// Data threads and other threads counting at once lose nothing, also when more data
    /// threads than shards share one.
    #[test]
    fn a_sharded_counter_counts_every_increment() {
        let c = ShardedCounter::default();
        let threads = 2 * shard_count() + 1;
        std::thread::scope(|s| {
            for i in 0..threads {
                let c = c.clone();
                s.spawn(move || {
                    if i > 0 {
                        set_data_thread(i);
                    }
                    for _ in 0..1000 {
                        c.inc();
                    }
                });
            }
        });
        assert_eq!(c.get(), 1000 * threads as u64);
        assert!(text("calls", c).contains(&format!("calls_total {}\n", 1000 * threads)));
    }
}
