//! Runs of feature rows: an entity's newest values merged into `features_latest` once per run of
//! rows of one table of names, not once per row.
//!
//! Every recorded call writes its input features twice: the history row (`feature_rows`) and an
//! operand merged into the entity's latest values (`features_latest`). Both are keyed by entity,
//! so both inserts land at random places in their memtables (~25 key comparisons each), and the
//! operands are merged again at every flush and compaction: callgrind, 30,000 calls from 10,000
//! users with everything on, the per-call merge cost ~9,300 instructions of ~112,000 (README,
//! Performance). But a model's calls give its entities rows of one table of names
//! (`records::NameTable`), and of a table's rows only the newest says anything about the
//! entity's latest values.
//!
//! So the writer merges a compact row only when it opens a *run*: the entity's first row (in
//! this process) or its first of another table than its last. That operand is flagged
//! ([`RUN_ROW`]). Later rows of the run go to the history only, and the run's newest row is kept
//! here, in memory ([`Run`]); reads of the entity's latest values (`Store::get_features`)
//! absorb it. A run is closed — its newest row merged, unflagged — when the entity's next row is
//! of another table (the old run's newest row and the new run's first go as one operand, so an
//! entity alternating between two models merges one operand per row, as before), when more than
//! [`MAX_RUNS`] entities have runs (each run with rows not merged is closed), and when the
//! process stops (`Store::finish_feature_runs`, one synced write). A run whose merged piece is
//! older than half the features' retention behind its newest row is merged again, so that
//! retention never drops the latest values of an entity that still gets rows. Rows with text
//! (named rows), and rows written once the store has finished, are merged one by one, as
//! before.
//!
//! A process that did not stop (a crash, `kill -9`) leaves runs open: their newest rows are in
//! the history only. The store knows it (a key written when it opens, deleted when it finishes)
//! and, when it next opens, repairs before anything else: for each flagged piece in
//! `features_latest`, it merges the newest history row of the piece's table (`Store::
//! repair_feature_runs`). Nothing is lost — every row is in the history — and the repair reads
//! every entity's latest values once.
//!
//! Batches hold the runs' lock from their first compact row to the end of their write, and
//! reads while they read `features_latest`: a read never sees a run apart from the write that
//! made it. A batch changes runs in place and keeps what each was; a batch not written (a
//! failed write) puts them back, so it changes nothing.

use rustc_hash::FxHashMap;

use super::{keys, StoreError};

/// The first byte of a run's first row as merged into `features_latest`: 0x02, then what follows
/// the zero byte of a compact row (the table's id and the numbers). Merged and read as a
/// compact row; the flag says that newer rows of the table may be in the history only, should
/// the process not stop. Like the other kinds, no `LatestFeatures` encoding starts with it
/// (field 0 is no field).
pub(super) const RUN_ROW: u8 = 0x02;

/// Entities with runs kept at most: ~260 bytes each (the newest row of 16 numbers, the entity,
/// the map's slot), ~4 MiB in all.
pub(super) const MAX_RUNS: usize = 16_384;

/// Written (synced) when the store opens, deleted when it finishes (in the write of
/// [`FeatureRuns::finish`]'s operands): found at the next open, it says that runs may have been
/// left open. In the default family, beside `/ready`'s probe.
pub(super) const OPEN_KEY: &[u8] = b"modelgate/feature-runs-open";

/// An entity's run: its rows of one table since the run was opened.
#[derive(Clone, Debug)]
pub(super) struct Run {
    /// The table of names of its rows.
    pub(super) table: u64,
    /// Its newest row as an unflagged operand: time ‖ 0x00 ‖ id ‖ numbers.
    pub(super) newest: Vec<u8>,
    /// The time of `newest`, kept beside it: the map's slot holds it, so that deciding where a
    /// row goes does not read `newest` from wherever the heap put it (a cache miss per row with
    /// thousands of entities; `perf annotate` put ~a fifth of the writer's time for a row there).
    pub(super) newest_ms: u64,
    /// Whether `newest` is in the history only (not merged).
    pub(super) pending: bool,
    /// Time of the run's row last merged.
    pub(super) merged_ms: u64,
    /// The batch that last changed it ([`FeatureRuns::batches`]).
    batch: u64,
}

/// The runs of this process.
#[derive(Debug)]
pub(super) struct FeatureRuns {
    runs: FxHashMap<Box<str>, Run>,
    /// Set once the runs are closed for good: rows are merged one by one from then on.
    finished: bool,
    /// [`MAX_RUNS`], smaller in tests.
    pub(super) max: usize,
    /// Batches begun ([`RunBatch`]), the number of the last.
    batches: u64,
}

impl FeatureRuns {
    /// The runs of a store opening, and whether the last process left runs open (it did not
    /// finish). Marks the store open, synced, before any row is written.
    pub(super) fn start(db: &rocksdb::DB) -> Result<(FeatureRuns, bool), StoreError> {
        let left_open = db.get(OPEN_KEY)?.is_some();
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.put_opt(OPEN_KEY, [], &wo)?;
        let runs = FeatureRuns {
            runs: FxHashMap::default(),
            finished: false,
            max: MAX_RUNS,
            batches: 0,
        };
        Ok((runs, left_open))
    }

    /// The newest row of `entity`'s run when it is not merged (time ‖ compact row).
    pub(super) fn pending(&self, entity: &str) -> Option<&[u8]> {
        self.runs
            .get(entity)
            .filter(|run| run.pending)
            .map(|run| run.newest.as_slice())
    }

    /// Closes every run for good (the store is stopping): the operands that merge the rows not
    /// merged, by entity, to go in one synced write with [`OPEN_KEY`]'s delete.
    pub(super) fn finish(&mut self) -> Vec<(Box<str>, Vec<u8>)> {
        self.finished = true;
        std::mem::take(&mut self.runs)
            .into_iter()
            .filter(|(_, run)| run.pending)
            .map(|(entity, run)| (entity, run.newest))
            .collect()
    }

    /// Runs kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.runs.len()
    }
}

/// [`RUN_ROW`]'s form of `row` (time ‖ 0x00 ‖ id ‖ numbers).
pub(super) fn flagged(row: &[u8]) -> Vec<u8> {
    let mut v = row.to_vec();
    v[8] = RUN_ROW;
    v
}

/// A batch's view of the runs, holding their lock. It changes runs in place (one look-up of
/// an entity a row) and keeps what they were: a batch dropped unwritten (a failed write) puts
/// them back ([`RunBatch::written`] keeps its changes). Staging changes in a second map and
/// moving them into the kept one when written looked each entity up twice and copied every run.
pub(super) struct RunBatch<'s> {
    runs: parking_lot::MutexGuard<'s, FeatureRuns>,
    /// This batch's number ([`Run::batch`]).
    batch: u64,
    /// Each change, oldest first: the entity and its run before (`None`: it had none).
    undo: Vec<(Box<str>, Option<Run>)>,
    /// Whether the batch closed every run kept before it (too many entities): they are gone
    /// once it is written, and meanwhile only runs this batch changed count.
    evicted: bool,
}

impl<'s> RunBatch<'s> {
    pub(super) fn new(mut runs: parking_lot::MutexGuard<'s, FeatureRuns>) -> Self {
        runs.batches += 1;
        RunBatch {
            batch: runs.batches,
            runs,
            undo: Vec::new(),
            evicted: false,
        }
    }

    /// Takes `entity`'s compact row `row` (time ‖ 0x00 ‖ table id ‖ numbers) of `table`, and
    /// says what to merge into its latest values: nothing while it continues a run, else the
    /// operands, oldest first — the closing of the entity's run of another table (its newest
    /// row, unflagged: of one table's rows a merge keeps the newest, the later of one
    /// millisecond), then the new run's flagged row — for the caller to merge as one. A run's
    /// newest row more than `refresh_ms` newer than its row last merged is merged (flagged: the
    /// run goes on). `close` receives the operands closing other entities' runs when there are
    /// too many (by entity).
    pub(super) fn row(
        &mut self,
        entity: &str,
        table: u64,
        row: &[u8],
        refresh_ms: u64,
        mut close: impl FnMut(&str, Vec<u8>),
    ) -> Vec<Vec<u8>> {
        if self.runs.finished {
            return vec![row.to_vec()];
        }
        let time_ms = keys::be64(&row[..8]);
        let (batch, evicted) = (self.batch, self.evicted);
        // Empty (no allocation) while a run goes on, the common case.
        let mut operands = Vec::new();
        // Runs from before an eviction in this batch are closed: as if there were none.
        let had_run = match self
            .runs
            .runs
            .get_mut(entity)
            .filter(|run| !evicted || run.batch == batch)
        {
            Some(run) if run.table == table => {
                // Of two rows of one millisecond the later is the newer, as merges keep them.
                let newer = time_ms >= run.newest_ms;
                let mut next = Run {
                    table,
                    newest: if newer { row } else { &run.newest }.to_vec(),
                    newest_ms: time_ms.max(run.newest_ms),
                    pending: run.pending || newer,
                    merged_ms: run.merged_ms,
                    batch,
                };
                if next.pending && next.newest_ms.saturating_sub(next.merged_ms) >= refresh_ms {
                    operands.push(flagged(&next.newest));
                    next.pending = false;
                    next.merged_ms = next.newest_ms;
                }
                let before = std::mem::replace(run, next);
                self.undo.push((entity.into(), Some(before)));
                return operands;
            }
            // A run of another table: closed with its newest row.
            Some(old) => {
                operands.push(old.newest.clone());
                true
            }
            None => false,
        };
        operands.push(flagged(row));
        if !had_run && !evicted && self.runs.runs.len() >= self.runs.max {
            for (entity, run) in &self.runs.runs {
                if run.pending && run.batch != batch {
                    close(entity, run.newest.clone());
                }
            }
            self.evicted = true;
        }
        let before = self.runs.runs.insert(
            entity.into(),
            Run {
                table,
                newest: row.to_vec(),
                newest_ms: time_ms,
                pending: false,
                merged_ms: time_ms,
                batch,
            },
        );
        self.undo.push((entity.into(), before));
        operands
    }

    /// The batch was written: its changes stay (and, if it closed every run kept before it,
    /// only they do).
    pub(super) fn written(mut self) {
        if self.evicted {
            let batch = self.batch;
            self.runs.runs.retain(|_, run| run.batch == batch);
        }
        self.undo.clear();
    }
}

impl Drop for RunBatch<'_> {
    /// Unwritten (or written, with nothing left to undo): the runs are put back as they were.
    fn drop(&mut self) {
        while let Some((entity, before)) = self.undo.pop() {
            match before {
                Some(run) => {
                    self.runs.runs.insert(entity, run);
                }
                None => {
                    self.runs.runs.remove(&entity);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::record::FeatureValue;
    use crate::storage::{RecordLog, RecordWrites};
    use crate::store::{cf, Store};

    /// The first bytes of a compact row and of a layered value, as `features.rs` writes them.
    const COMPACT_ROW: u8 = 0x00;
    const LAYERED: u8 = 0x01;

    /// A table of names: `{prefix}0`..`{prefix}3`.
    fn table(prefix: &str) -> Arc<[String]> {
        (0..4).map(|i| format!("{prefix}{i}")).collect()
    }

    /// Row `x` of `names`: x, x + 0.25, x + 0.5, x + 0.75.
    fn row(x: f64) -> Vec<FeatureValue> {
        (0..4)
            .map(|i| FeatureValue::Number(x + f64::from(i) / 4.0))
            .collect()
    }

    fn writes(rows: &[(&str, &Arc<[String]>, u64, f64)]) -> RecordWrites {
        let mut w = RecordWrites::default();
        for (entity, names, t, x) in rows {
            w.add_feature_row(entity, *t, (*names).clone(), row(*x));
        }
        w
    }

    fn write(store: &Store, rows: &[(&str, &Arc<[String]>, u64, f64)]) {
        store.commit(writes(rows), false).unwrap();
    }

    /// Adds `rows` to a batch that is then dropped unwritten, as after a failed write.
    fn apply_unwritten(store: &Store, rows: &[(&str, &Arc<[String]>, u64, f64)]) {
        let w = writes(rows);
        let mut b = store.record_batch();
        for write in &w.writes {
            b.apply(write);
        }
    }

    /// What a read gives for `names` of `entity` as of `as_of`: each (time, value).
    fn read(
        store: &Store,
        entity: &str,
        names: &[String],
        as_of: u64,
    ) -> Vec<Option<(u64, FeatureValue)>> {
        let features: Vec<(String, Option<u64>)> =
            names.iter().map(|n| (n.clone(), None)).collect();
        store
            .get_features(&[entity.to_string()], &features, as_of)
            .unwrap()
            .remove(0)
    }

    /// A read of row `x` at `t`.
    fn at(t: u64, x: f64) -> Vec<Option<(u64, FeatureValue)>> {
        row(x).into_iter().map(|v| Some((t, v))).collect()
    }

    /// The entity's stored latest value: its time and the first byte of its body.
    fn stored(store: &Store, entity: &str) -> (u64, u8) {
        let v = store
            .db
            .get_cf(store.cf(cf::FEATURES_LATEST), entity.as_bytes())
            .unwrap()
            .expect("a latest value");
        (keys::be64(&v[..8]), v[8])
    }

    fn operands_in_memtable(store: &Store) -> u64 {
        store
            .db
            .property_int_value_cf(
                store.cf(cf::FEATURES_LATEST),
                rocksdb::properties::NUM_ENTRIES_ACTIVE_MEM_TABLE,
            )
            .unwrap()
            .unwrap()
    }

    fn t0() -> u64 {
        crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 600_000
    }

    /// Ten rows of one table, one batch each: one operand merged (the first row, flagged), and
    /// every read gives the newest row — as of now, looking back, after a late row (an older
    /// time) and after a second row of the newest millisecond (the later one wins).
    #[test]
    fn a_run_merges_its_first_row_and_reads_its_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (t0, a) = (t0(), table("a"));
        for i in 0..10 {
            write(&store, &[("u", &a, t0 + i * 1_000, i as f64)]);
            assert_eq!(
                read(&store, "u", &a, u64::MAX),
                at(t0 + i * 1_000, i as f64)
            );
        }
        assert_eq!(operands_in_memtable(&store), 1, "one operand for ten rows");
        assert_eq!(stored(&store, "u"), (t0, RUN_ROW));
        assert_eq!(read(&store, "u", &a, t0 + 4_500), at(t0 + 4_000, 4.0));
        write(&store, &[("u", &a, t0 + 3_000, 30.0)]);
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 9_000, 9.0));
        write(&store, &[("u", &a, t0 + 9_000, 99.0)]);
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 9_000, 99.0));
        assert_eq!(operands_in_memtable(&store), 1);
    }

    /// An entity whose rows move to another table: the old run's newest row and the new run's
    /// first are merged as one operand, and both tables read their newest rows; back to the
    /// first table, a run of it starts again.
    #[test]
    fn a_run_closes_when_the_entitys_table_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (t0, a, b) = (t0(), table("a"), table("b"));
        for i in 0..3 {
            write(&store, &[("u", &a, t0 + i, i as f64)]);
        }
        write(&store, &[("u", &b, t0 + 10, 10.0)]);
        assert_eq!(operands_in_memtable(&store), 2);
        assert_eq!(stored(&store, "u"), (t0 + 10, LAYERED));
        write(&store, &[("u", &b, t0 + 11, 11.0)]);
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 2, 2.0));
        assert_eq!(read(&store, "u", &b, u64::MAX), at(t0 + 11, 11.0));
        write(&store, &[("u", &a, t0 + 20, 20.0)]);
        write(&store, &[("u", &a, t0 + 21, 21.0)]);
        assert_eq!(operands_in_memtable(&store), 3);
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 21, 21.0));
        assert_eq!(read(&store, "u", &b, u64::MAX), at(t0 + 11, 11.0));
    }

    /// A store dropped without finishing (as a crash leaves it) is repaired when it opens: each
    /// run's newest row, in the history only, is merged; one that finished needs nothing.
    #[test]
    fn runs_left_open_are_merged_when_the_store_opens_again() {
        let dir = tempfile::tempdir().unwrap();
        let (t0, a, b) = (t0(), table("a"), table("b"));
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..5 {
                write(
                    &store,
                    &[
                        ("u", &a, t0 + i, i as f64),
                        ("v", &b, t0 + i, 10.0 + i as f64),
                    ],
                );
            }
            // A later row of v's first table, then its newest row of b: both runs open.
            write(&store, &[("v", &a, t0 + 7, 7.0), ("v", &a, t0 + 8, 8.0)]);
            write(&store, &[("v", &b, t0 + 9, 9.0), ("v", &b, t0 + 12, 12.0)]);
            store.flush_features().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(stored(&store, "u"), (t0 + 4, COMPACT_ROW), "closed");
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 4, 4.0));
        assert_eq!(read(&store, "v", &a, u64::MAX), at(t0 + 8, 8.0));
        assert_eq!(read(&store, "v", &b, u64::MAX), at(t0 + 12, 12.0));
        // A clean stop merges what is pending and leaves nothing to repair.
        write(&store, &[("u", &a, t0 + 30, 30.0)]);
        write(&store, &[("u", &a, t0 + 31, 31.0)]);
        store.finish().unwrap();
        assert_eq!(stored(&store, "u"), (t0 + 31, COMPACT_ROW));
        assert!(store.db.get(OPEN_KEY).unwrap().is_none());
        // Rows after the finish are merged one by one.
        write(&store, &[("u", &a, t0 + 32, 32.0)]);
        assert_eq!(stored(&store, "u"), (t0 + 32, COMPACT_ROW));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 32, 32.0));
    }

    /// More entities than runs are kept: every run with rows not merged is closed (merged) in
    /// the batch that needs the room, and every entity still reads its newest row.
    #[test]
    fn too_many_runs_close_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.runs.lock().max = 4;
        let (t0, a) = (t0(), table("a"));
        let entities = ["e0", "e1", "e2", "e3"];
        for (i, e) in entities.iter().enumerate() {
            let t = t0 + i as u64;
            write(&store, &[(e, &a, t, 0.0), (e, &a, t + 100, 1.0)]);
        }
        assert_eq!(store.runs.lock().len(), 4);
        // A fifth entity: the four runs are closed, their newest rows merged.
        write(&store, &[("e4", &a, t0, 0.0), ("e4", &a, t0 + 100, 1.0)]);
        assert_eq!(store.runs.lock().len(), 1);
        for (i, e) in entities.iter().enumerate() {
            assert_eq!(stored(&store, e), (t0 + i as u64 + 100, COMPACT_ROW), "{e}");
            assert_eq!(read(&store, e, &a, u64::MAX), at(t0 + i as u64 + 100, 1.0));
        }
        assert_eq!(read(&store, "e4", &a, u64::MAX), at(t0 + 100, 1.0));
        // A closed run starts again with its entity's next row.
        write(
            &store,
            &[("e0", &a, t0 + 200, 2.0), ("e0", &a, t0 + 201, 3.0)],
        );
        assert_eq!(read(&store, "e0", &a, u64::MAX), at(t0 + 201, 3.0));
    }

    /// A batch that is never written (a failed write) changes no run: its rows are read
    /// nowhere, and the next row continues the run as it was.
    #[test]
    fn a_batch_not_written_changes_no_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (t0, a) = (t0(), table("a"));
        write(&store, &[("u", &a, t0, 0.0)]);
        write(&store, &[("u", &a, t0 + 1, 1.0)]);
        apply_unwritten(
            &store,
            &[
                ("u", &a, t0 + 2, 2.0),
                ("u", &a, t0 + 3, 2.5),
                ("v", &a, t0 + 2, 2.0),
            ],
        );
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 1, 1.0));
        assert_eq!(read(&store, "v", &a, u64::MAX), vec![None; 4]);
        assert_eq!(store.runs.lock().len(), 1);
        write(&store, &[("u", &a, t0 + 3, 3.0)]);
        assert_eq!(read(&store, "u", &a, u64::MAX), at(t0 + 3, 3.0));
        assert_eq!(operands_in_memtable(&store), 1);
        // "v" has no run: its first row opens one (a second operand).
        write(&store, &[("v", &a, t0 + 4, 4.0)]);
        assert_eq!(operands_in_memtable(&store), 2);
    }

    /// A batch that closed every run for room and is never written changes no run either: the
    /// runs it closed go on, and their newest rows are still read.
    #[test]
    fn a_batch_that_closed_every_run_and_was_not_written_changes_no_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.runs.lock().max = 2;
        let (t0, a) = (t0(), table("a"));
        write(&store, &[("e0", &a, t0, 0.0), ("e0", &a, t0 + 1, 1.0)]);
        write(&store, &[("e1", &a, t0, 0.0), ("e1", &a, t0 + 1, 1.0)]);
        apply_unwritten(&store, &[("e0", &a, t0 + 2, 2.0), ("e2", &a, t0 + 2, 2.0)]);
        assert_eq!(store.runs.lock().len(), 2);
        for e in ["e0", "e1"] {
            assert_eq!(stored(&store, e), (t0, RUN_ROW), "{e}");
            assert_eq!(read(&store, e, &a, u64::MAX), at(t0 + 1, 1.0), "{e}");
        }
        assert_eq!(read(&store, "e2", &a, u64::MAX), vec![None; 4]);
    }

    /// A run's newest row is merged again once it is half the retention newer than the row
    /// merged last, so that retention, which drops an entity's latest values by their newest
    /// time, keeps those of an entity that still gets rows.
    #[test]
    fn a_long_run_is_merged_again_within_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let (store, clock) = Store::with_minute_of_features(dir.path());
        let now = crate::clock::Clock::now_ms(&*clock);
        let a = table("a");
        for s in [0u64, 10, 20, 29, 30, 40] {
            write(&store, &[("u", &a, now + s * 1_000, s as f64)]);
        }
        assert_eq!(stored(&store, "u"), (now + 30_000, RUN_ROW));
        clock.advance(85_000);
        store.compact_expired();
        assert_eq!(read(&store, "u", &a, u64::MAX), at(now + 40_000, 40.0));
    }
}
