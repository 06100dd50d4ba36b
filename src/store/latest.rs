//! Each entity's latest feature values, written behind: a committed row's latest values wait in
//! memory ([`Pending`], read by `get_features` beside `features_latest`) and are merged into
//! `features_latest` every [`PERSIST_AFTER`], one merge per entity, in key order.
//!
//! Why: merging every recorded call's row into `features_latest` as it was committed was one
//! more insert per call at a random place of a memtable of ~20,000 entities, and each of those
//! operands was merged again by the flush and the compactions. Measured everything on with
//! 10,000 users (README, Performance): without that merge the record writer used ~2 µs and
//! RocksDB's threads ~2 µs less per call. Written behind, an entity's rows of two seconds are one
//! operand, and the operands go in sorted, each next to the last.
//!
//! Nothing is lost by a crash: every batch that adds rows also puts, in the same `WriteBatch`, a
//! journal entry (`features_journal`, key: a sequence number, value: the keys of the rows it
//! added, each after its length as a varint). A persist merges what is pending and deletes the
//! journal up to the last entry it covers, in one batch too. When the store opens, the rows the
//! journal still names are merged into `features_latest` before anything reads it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use rustc_hash::FxHashMap;

use super::features::{merge_values, LatestChains};
use super::records::MergedKeys;
use super::{cf, keys, Store, StoreError};

/// How long an entity's latest values may wait in memory before they are merged into
/// `features_latest`: long enough that a busy entity's rows collapse into one operand, short
/// enough that a restart after a crash replays a few seconds of rows at most.
const PERSIST_AFTER: Duration = Duration::from_secs(2);

/// Pending bytes (keys and operands) past which they are merged at once, whatever their age: a
/// bound on the memory this takes with many distinct entities.
const MAX_PENDING_BYTES: usize = 8 << 20;

/// Latest values committed with their rows but not yet merged into `features_latest`.
#[derive(Default)]
pub(super) struct Pending {
    /// By `features_latest` key: the operand of the entity's rows since the last persist,
    /// merged as RocksDB would merge them ([`merge_values`]).
    entries: FxHashMap<Vec<u8>, Vec<u8>>,
    /// The entries a persist is writing, readable until it is committed: the persist builds
    /// its batch from them without holding the lock that reads take.
    persisting: Option<Arc<FxHashMap<Vec<u8>, Vec<u8>>>>,
    /// Bytes of keys and operands in `entries`.
    bytes: usize,
    /// When the oldest of `entries` came.
    since: Option<Instant>,
}

impl Pending {
    /// Takes in one row's operand (time ‖ row), after what the entity already has pending.
    pub(super) fn absorb(&mut self, key: &[u8], operand: Vec<u8>) {
        match self.entries.get_mut(key) {
            Some(held) => {
                let merged = merge_values([held.as_slice(), operand.as_slice()].into_iter());
                self.bytes = self.bytes - held.len() + merged.len();
                *held = merged;
            }
            None => {
                self.bytes += key.len() + operand.len();
                self.entries.insert(key.to_vec(), operand);
            }
        }
        self.since.get_or_insert_with(Instant::now);
    }

    /// The entity's pending operand: what a persist is writing, then what came since.
    pub(super) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let writing = self.persisting.as_ref().and_then(|m| m.get(key));
        match (writing, self.entries.get(key)) {
            (Some(a), Some(b)) => Some(merge_values([a.as_slice(), b.as_slice()].into_iter())),
            (a, b) => a.or(b).cloned(),
        }
    }

    fn due(&self) -> bool {
        self.bytes >= MAX_PENDING_BYTES || self.since.is_some_and(|t| t.elapsed() >= PERSIST_AFTER)
    }
}

/// What orders the commits that add rows and the persists (held across each one's write).
#[derive(Default)]
pub(super) struct LatestWrites {
    /// The next journal entry's key.
    next_journal: u64,
    /// Operands piled up per entity in `features_latest`, counted as persists merge them.
    pub(super) chains: LatestChains,
}

/// A history row's operand for `features_latest`: its time, then the row as stored.
fn operand(time_ms: u64, row: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + row.len());
    v.extend_from_slice(&time_ms.to_be_bytes());
    v.extend_from_slice(row);
    v
}

impl Store {
    /// Commits `batch`, which adds history rows (their keys in `journal`, their operands in
    /// `rows`), with its journal entry; then holds the rows' latest values pending, and merges
    /// everything pending into `features_latest` when it is due.
    pub(super) fn commit_rows(
        &self,
        mut batch: WriteBatch,
        journal: &[u8],
        rows: Vec<(Vec<u8>, Vec<u8>)>,
        wo: &WriteOptions,
    ) -> Result<(), StoreError> {
        let mut writes = self.latest_writes.lock();
        batch.put_cf(
            self.cf(cf::FEATURES_JOURNAL),
            writes.next_journal.to_be_bytes(),
            journal,
        );
        self.write_opt(batch, wo)?;
        writes.next_journal += 1;
        let due = {
            let mut pending = self.latest_pending.lock();
            for (key, operand) in rows {
                pending.absorb(&key, operand);
            }
            pending.due()
        };
        if due {
            if let Err(e) = self.persist_pending(&mut writes, wo) {
                // The rows are committed; their latest values stay pending (and journalled).
                tracing::debug!(error = %e, "latest feature values not merged yet; kept pending");
            }
        }
        Ok(())
    }

    /// Merges everything pending into `features_latest` now (benchmarks and tests that look at
    /// the family itself; a flush of the feature families).
    pub(crate) fn persist_latest(&self) -> Result<(), StoreError> {
        let mut writes = self.latest_writes.lock();
        self.persist_pending(&mut writes, &WriteOptions::default())
    }

    /// One batch: a merge per pending entity, in key order, and the journal deleted up to the
    /// last entry written. Pending entries stay readable until that batch is committed (a read
    /// between the two finds them in both, and merging a value twice changes nothing). A batch
    /// that fails leaves them pending, tried again [`PERSIST_AFTER`] later.
    fn persist_pending(
        &self,
        writes: &mut LatestWrites,
        wo: &WriteOptions,
    ) -> Result<(), StoreError> {
        // Nothing is absorbed meanwhile: commits that add rows hold `writes` too.
        let entries = {
            let mut pending = self.latest_pending.lock();
            if pending.entries.is_empty() {
                return Ok(());
            }
            let entries = Arc::new(std::mem::take(&mut pending.entries));
            pending.persisting = Some(entries.clone());
            pending.bytes = 0;
            pending.since = None;
            entries
        };
        let mut sorted: Vec<(&Vec<u8>, &Vec<u8>)> = entries.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let family = self.cf(cf::FEATURES_LATEST);
        let mut batch = WriteBatch::default();
        let mut merged = MergedKeys::default();
        for (key, operand) in sorted {
            batch.merge_cf(family, key, operand);
            merged.push(key);
        }
        batch.delete_range_cf(
            self.cf(cf::FEATURES_JOURNAL),
            0u64.to_be_bytes(),
            writes.next_journal.to_be_bytes(),
        );
        let written = self.write_opt(batch, wo);
        let mut pending = self.latest_pending.lock();
        pending.persisting = None;
        match written {
            Ok(()) => {
                drop(pending);
                self.settle_latest(&mut writes.chains, &merged, wo);
                Ok(())
            }
            Err(e) => {
                // Pending again, as they were (nothing came since), tried again later.
                pending.bytes = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
                pending.entries = Arc::try_unwrap(entries).unwrap_or_else(|e| (*e).clone());
                pending.since = Some(Instant::now());
                Err(e)
            }
        }
    }

    /// At open: merges the latest values of the rows the journal still names (committed before
    /// a crash, never persisted) into `features_latest`, and empties the journal.
    pub(super) fn recover_latest(&self) -> Result<(), StoreError> {
        let journal = self.cf(cf::FEATURES_JOURNAL);
        let history = self.cf(cf::FEATURES);
        let mut writes = self.latest_writes.lock();
        let (mut entries, mut rows) = (0u64, 0u64);
        for item in self.db.iterator_cf(journal, IteratorMode::Start) {
            let (key, entry) = item?;
            entries += 1;
            if let Ok(seq) = <[u8; 8]>::try_from(&*key) {
                writes.next_journal = writes.next_journal.max(u64::from_be_bytes(seq) + 1);
            }
            for row_key in keys::journal_rows(&entry) {
                // A row dropped since (retention) has nothing to add.
                let (Some(row), Ok(time_ms)) = (
                    self.db.get_pinned_cf(history, row_key)?,
                    keys::feature_row_time(row_key),
                ) else {
                    continue;
                };
                // The key without its 0 ‖ ¬time ‖ seq: the entity, `features_latest`'s key.
                let entity = &row_key[..row_key.len() - 13];
                self.latest_pending
                    .lock()
                    .absorb(entity, operand(time_ms, &row));
                rows += 1;
            }
        }
        if entries == 0 {
            return Ok(());
        }
        if rows == 0 {
            // Nothing to merge: the journal is emptied all the same.
            let mut b = WriteBatch::default();
            b.delete_range_cf(
                journal,
                0u64.to_be_bytes(),
                writes.next_journal.to_be_bytes(),
            );
            return self.write(b, false);
        }
        self.persist_pending(&mut writes, &WriteOptions::default())?;
        tracing::info!(
            entries,
            rows,
            "merged the latest values of feature rows committed before the last stop"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read while a persist writes finds what it writes and what came since, merged; rows of
    /// one entity pending together are one operand, the newest row's.
    #[test]
    fn pending_reads_merge_what_is_being_written_with_what_came_since() {
        let named = |entries: &[(&str, u64)]| {
            // A named value: a `LatestFeatures` of number entries (field 1: name, 2: time).
            let mut body = Vec::new();
            for (name, t) in entries {
                let mut e = Vec::new();
                prost::encoding::string::encode(1, &name.to_string(), &mut e);
                prost::encoding::uint64::encode(2, t, &mut e);
                prost::encoding::encode_key(
                    1,
                    prost::encoding::WireType::LengthDelimited,
                    &mut body,
                );
                prost::encoding::encode_varint(e.len() as u64, &mut body);
                body.extend_from_slice(&e);
            }
            body
        };
        let mut a_named = 1_000u64.to_be_bytes().to_vec();
        a_named.extend_from_slice(&named(&[("x", 1_000)]));
        let mut b_named = 2_000u64.to_be_bytes().to_vec();
        b_named.extend_from_slice(&named(&[("y", 2_000)]));
        let mut p = Pending::default();
        p.absorb(b"e", a_named.clone());
        assert_eq!(p.get(b"e"), Some(a_named.clone()));
        // Being written: the entries move aside and stay readable.
        p.persisting = Some(Arc::new(std::mem::take(&mut p.entries)));
        assert_eq!(p.get(b"e"), Some(a_named.clone()));
        p.absorb(b"e", b_named.clone());
        let both = merge_values([a_named.as_slice(), b_named.as_slice()].into_iter());
        assert_ne!(both, b_named);
        assert_eq!(p.get(b"e"), Some(both));
        assert_eq!(p.get(b"other"), None);
    }

    #[test]
    fn journal_entries_read_back_their_row_keys() {
        let mut j = Vec::new();
        let a = keys::feature_row_key("user-1", 1_000, 7);
        let b = keys::feature_row_key("u", 2_000, 8);
        keys::journal_row(&mut j, &a);
        keys::journal_row(&mut j, &b);
        let got: Vec<&[u8]> = keys::journal_rows(&j).collect();
        assert_eq!(got, vec![a.as_slice(), b.as_slice()]);
        // Cut short: only whole keys.
        let got: Vec<&[u8]> = keys::journal_rows(&j[..j.len() - 1]).collect();
        assert_eq!(got, vec![a.as_slice()]);
        assert_eq!(keys::journal_rows(&[0xff]).count(), 0);
    }
}
