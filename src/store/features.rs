//! The online feature store: every row of values an entity was given (`feature_rows`, newest
//! first per entity), each entity's newest value per feature (`features_latest`, kept by the
//! [`keep_newest`] merge operator so a write need not read first — the writer resolves an
//! entity's operands once 16 pile up, see [`LatestChains`]), the definitions (`feature_defs`),
//! and point-in-time reads over both.
//!
//! | family | key | value |
//! |---|---|---|
//! | `feature_rows` | entity ∅ ¬time ‖ seq | the row: names and `FeatureValue`s, or, when every value is a number, 0x00 ‖ table id ‖ the numbers (see [`NameTable`]) |
//! | `feature_rows` | 0xFF ‖ table id | a table of names those compact rows refer to |
//! | `features_latest` | entity | newest time ‖ every feature's newest (time, value), merged per feature; or the newest compact row of the entity's one table; or 0x01 ‖ pieces of both kinds, which only a reader with the names can merge (see [`merge_values`]); an operand is the row's time ‖ the row (compact or named, as its history row) |
//! | `feature_defs` | name | JSON `FeatureDef` |

use std::sync::Arc;

use prost::Message;
use rocksdb::{IteratorMode, MergeOperands};

use super::records::{
    decode_err, Layout, MergedKeys, NameTable, NumberRow, RecordBatch, RowLayouts,
};
use super::runs::{RunBatch, RUN_ROW};
use super::{cf, keys, Store, StoreError};
use crate::convert::feature_value_from_pb;
use crate::feature_store::{self, FeatureDef};
use crate::pb::modelgate::v1 as pb;
use crate::record::FeatureValue;
use crate::wire;

/// Tables of feature names whose layouts are kept (one per model's inputs, usually).
const MAX_LAYOUTS: usize = 64;

/// One feature's newest value in an entity's `features_latest` record.
#[derive(Clone, PartialEq, prost::Message)]
struct LatestEntry {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint64, tag = "2")]
    time_ms: u64,
    #[prost(message, optional, tag = "3")]
    value: Option<pb::FeatureValue>,
}

/// An entity's `features_latest` record: entries sorted by feature name.
#[derive(Clone, PartialEq, prost::Message)]
struct LatestFeatures {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<LatestEntry>,
}

/// The meaning of a merge, spelled out on messages: what the merge on the wire
/// ([`merge_latest`]) and the row encoding ([`encode_row`]) are tested against, and how a
/// reader resolves a layered value's pieces ([`Store::latest_of`]).
impl LatestFeatures {
    /// Keeps, per feature, the entry with the newest time (the later one on ties).
    fn absorb(&mut self, other: LatestFeatures) {
        for e in other.entries {
            match self.entries.binary_search_by(|x| x.name.cmp(&e.name)) {
                Ok(i) if self.entries[i].time_ms <= e.time_ms => self.entries[i] = e,
                Ok(_) => {}
                Err(i) => self.entries.insert(i, e),
            }
        }
    }

    /// Encoded with the newest time in front, for the retention filter.
    #[cfg(test)]
    fn to_value(&self) -> Vec<u8> {
        let newest = self.entries.iter().map(|e| e.time_ms).max().unwrap_or(0);
        keys::timed_value(newest, &self.encode_to_vec())
    }
}

impl LatestFeatures {
    fn get(&self, name: &str) -> Option<&LatestEntry> {
        self.entries
            .binary_search_by(|x| x.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    #[cfg(test)]
    fn from_value(v: &[u8]) -> Option<LatestFeatures> {
        let (_, body) = keys::split_timed_value(cf::FEATURES_LATEST, v).ok()?;
        LatestFeatures::decode(body).ok()
    }
}

/// The first byte of a compact history row ([`NameTable`]). No `LatestFeatures` encoding starts
/// with it (0 is no field's number), so rows written before compact rows read as they did.
pub(super) const COMPACT_ROW: u8 = 0x00;

/// A table of feature names as `feature_rows` stores it, once, under its id
/// ([`keys::feature_table_key`]).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredNames {
    #[prost(string, repeated, tag = "1")]
    names: Vec<String>,
}

impl NameTable {
    fn of(names: Vec<String>) -> NameTable {
        let stored = StoredNames { names }.encode_to_vec();
        let id = xxhash_rust::xxh3::xxh3_64(&stored);
        NameTable {
            id,
            key: keys::feature_table_key(id),
            stored,
        }
    }
}

/// Column `i`'s number in `values`, `None` when it holds text or is missing.
fn number_at<V: std::borrow::Borrow<FeatureValue>>(values: &[V], i: usize) -> Option<f64> {
    match values.get(i).map(V::borrow) {
        Some(FeatureValue::Number(x)) => Some(*x),
        _ => None,
    }
}

/// Appends the compact history row of `values` (numbers, every one) laid out by `layout`.
fn write_compact<V: std::borrow::Borrow<FeatureValue>>(
    table: &NameTable,
    layout: &[(usize, Vec<u8>)],
    values: &[V],
    out: &mut Vec<u8>,
) {
    out.reserve(9 + 8 * layout.len());
    out.push(COMPACT_ROW);
    out.extend_from_slice(&table.id.to_le_bytes());
    for (i, _) in layout {
        let x = number_at(values, *i).unwrap_or(f64::NAN);
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// The first byte of a compact history row whose numbers are all floats exactly (FP32 inputs,
/// the common case): 0x03 ‖ the table's id ‖ 4 bytes per number (`f32` LE), where a compact row
/// spends 8. History rows only (`features_latest` keeps [`COMPACT_ROW`]s): every recorded call
/// writes one, and each byte is logged, flushed and rewritten by every compaction that the
/// history goes through (README, "Shared record fields"). Read as the compact row it widens to
/// ([`widen`]). No `LatestFeatures` encoding starts with it (field 0 is no field).
pub(super) const FLOAT_ROW: u8 = 0x03;

/// The history row of compact row `compact` (0x00 ‖ id ‖ numbers): in `out` as a [`FLOAT_ROW`]
/// when every number is a float exactly (bit for bit, NaN payloads and zeros' signs too), else
/// `compact` itself.
fn history_of<'a>(compact: &'a [u8], out: &'a mut Vec<u8>) -> &'a [u8] {
    out.clear();
    out.reserve(compact.len() / 2 + 5);
    out.push(FLOAT_ROW);
    out.extend_from_slice(&compact[1..9]);
    // One pass, given up at the first number that is not a float.
    for b in compact[9..].chunks_exact(8) {
        let x = f64::from_le_bytes(b.try_into().expect("8 bytes"));
        let Some(f) = crate::record::exact_f32(x) else {
            return compact;
        };
        out.extend_from_slice(&f.to_le_bytes());
    }
    out
}

/// The compact row (0x00 ‖ id ‖ 8 bytes per number) a [`FLOAT_ROW`] stands for; `None` when
/// `row` is not one.
fn widen(row: &[u8]) -> Option<Vec<u8>> {
    let rest = row.strip_prefix(&[FLOAT_ROW])?;
    let (id, floats) = rest.split_first_chunk::<8>()?;
    if floats.len() % 4 != 0 {
        return None;
    }
    let mut wide = Vec::with_capacity(9 + floats.len() * 2);
    wide.push(COMPACT_ROW);
    wide.extend_from_slice(id);
    for b in floats.chunks_exact(4) {
        let x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        wide.extend_from_slice(&f64::from(x).to_le_bytes());
    }
    Some(wide)
}

/// The first byte of a `features_latest` value holding pieces that a merge could not combine
/// without their names: compact rows of different tables, or compact rows beside named entries
/// ([`merge_values`]). Like [`COMPACT_ROW`], no `LatestFeatures` encoding starts with it (field
/// 0 is no field).
pub(super) const LAYERED: u8 = 0x01;

/// Merge operator of `features_latest`: per feature, the value with the newest time wins, so a
/// late write of an old value never hides a newer one and no write needs a read first.
pub(super) fn keep_newest(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    Some(merge_values(existing.into_iter().chain(operands.iter())))
}

/// The table id of a compact row (0x00 ‖ id ‖ 8 bytes per number, or a run's first row, flagged
/// [`RUN_ROW`]), `None` when it is not one.
fn compact_id(body: &[u8]) -> Option<u64> {
    let rest = body
        .strip_prefix(&[COMPACT_ROW])
        .or_else(|| body.strip_prefix(&[RUN_ROW]))?;
    let (id, numbers) = rest.split_first_chunk::<8>()?;
    (numbers.len() % 8 == 0).then(|| u64::from_le_bytes(*id))
}

/// The pieces of a layered value (each its length, then a value: time ‖ body), as far as they
/// are whole.
fn layered_pieces(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = usize::try_from(prost::encoding::decode_varint(&mut bytes).ok()?).ok()?;
        let (piece, rest) = bytes.split_at_checked(len)?;
        bytes = rest;
        Some(piece)
    })
}

/// A compact row met by a merge: its table, its time and the whole value.
struct CompactPiece<'a> {
    id: u64,
    time_ms: u64,
    value: &'a [u8],
}

/// What a merge has met so far: of compact rows, the newest per table (in the order they came),
/// and the named values, to be merged entry by entry ([`merge_latest`]).
#[derive(Default)]
struct Pieces<'a> {
    compact: Vec<CompactPiece<'a>>,
    named: Vec<&'a [u8]>,
}

impl<'a> Pieces<'a> {
    /// Takes in one value (time ‖ body); a layered one piece by piece. What is malformed is
    /// passed over, as [`merge_latest`] passes over what does not decode.
    fn add(&mut self, value: &'a [u8], in_layered: bool) {
        let Ok((time_ms, body)) = keys::split_timed_value(cf::FEATURES_LATEST, value) else {
            return;
        };
        match body.first() {
            Some(&COMPACT_ROW | &RUN_ROW) => {
                let Some(id) = compact_id(body) else { return };
                let piece = CompactPiece { id, time_ms, value };
                match self.compact.iter().position(|p| p.id == id) {
                    // Rows of one table hold the same features: the newer row (the later one
                    // on a tie, which goes last: of two tables' rows of one millisecond, the
                    // later one wins too) holds each one's newest value.
                    Some(i) if self.compact[i].time_ms > time_ms => {}
                    Some(i) => {
                        self.compact.remove(i);
                        self.compact.push(piece);
                    }
                    None => self.compact.push(piece),
                }
            }
            Some(&LAYERED) if !in_layered => {
                for piece in layered_pieces(&body[1..]) {
                    self.add(piece, true);
                }
            }
            Some(&LAYERED) => {}
            _ => {
                self.named.push(value);
            }
        }
    }
}

/// Merges `features_latest` values (oldest first): per feature, the value with the newest time,
/// the later one on ties.
///
/// Named values (and named rows) merge into one named value, entry by entry ([`merge_latest`]),
/// as they always did. Compact rows ([`NameTable`]) cannot be: RocksDB runs this where the
/// tables of names are not at hand (flushes and compactions, some at open). But rows of one table
/// hold the same features, so of those the newest row is all there is to keep, and that is the
/// merge of a model's rows: ~200 instructions, where merging them named cost ~27,000 per flushed
/// entity. Only when an entity has rows of several tables, or named values beside compact rows,
/// is the result layered: 0x01 and each piece kept — the named merge first, then the newest row
/// per table in the order they came — for the reader to absorb in that order with the names
/// ([`Store::latest_of`]).
///
/// Of two values of one millisecond, the later one wins, except that a compact row always wins
/// over a named value (a row holding text) of the same millisecond: which of the two came later
/// is not kept once the named values are merged.
fn merge_values<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut pieces = Pieces::default();
    for v in values {
        pieces.add(v, false);
    }
    let Pieces { compact, named, .. } = pieces;
    if compact.is_empty() {
        return merge_latest(named.into_iter());
    }
    // A named merge of nothing that decodes is no piece.
    let named = (!named.is_empty())
        .then(|| merge_latest(named.into_iter()))
        .filter(|v| v.len() > 8);
    if named.is_none() && compact.len() == 1 {
        return compact[0].value.to_vec();
    }
    let newest = compact
        .iter()
        .map(|p| p.time_ms)
        .chain(named.iter().map(|v| keys::be64(&v[..8])))
        .max()
        .unwrap_or(0);
    let mut out = Vec::with_capacity(
        9 + compact.iter().map(|p| p.value.len() + 2).sum::<usize>()
            + named.as_ref().map_or(0, |v| v.len() + 3),
    );
    out.extend_from_slice(&newest.to_be_bytes());
    out.push(LAYERED);
    let piece = |value: &[u8], out: &mut Vec<u8>| {
        prost::encoding::encode_varint(value.len() as u64, out);
        out.extend_from_slice(value);
    };
    if let Some(v) = &named {
        piece(v, &mut out);
    }
    for p in &compact {
        piece(p.value, &mut out);
    }
    out
}

/// How many operands each entity's latest values have piled up in the active memtable of
/// `features_latest`, so that once [`MAX_SUCCESSIVE_MERGES`] have, the writer resolves them:
/// reads the entity's value (RocksDB merges the pile) and puts it back, where reads stop. A
/// busy entity's reads then merge a bounded pile, and a write still needs no read.
///
/// RocksDB's own `max_successive_merges` does the same, but counts the pile with a seek into
/// the memtable on every merge: ~2,500 instructions per recorded call, for the rare entity
/// that piles up. Here a count is a hash-map step. The counts start again when RocksDB starts
/// a new memtable (the active memtable then holds fewer entries than were counted into it),
/// and the piles left in the old one are merged when it is flushed, as before. Commits that
/// merge take the lock for their write and the resolutions after it (`RecordBatch::commit`):
/// nothing is merged between a resolution's read and its write, which would lose the merge.
#[derive(Default)]
pub(super) struct LatestChains {
    /// Entries of the active memtable when last read.
    entries: u64,
    /// Operands per entity (by the key's xxh3 hash, itself hashed with Fx; two entities sharing
    /// a count are resolved sooner).
    piles: rustc_hash::FxHashMap<u64, usize>,
    /// Piles resolved.
    pub(super) resolved: u64,
}

/// Operands an entity's latest values pile up in the active memtable before the writer
/// resolves them ([`LatestChains`]). Not fewer: each resolution is a read of the entity's
/// value (memtable, block cache) and a merge, ~57,000 instructions; at 2, a tenth of the writes
/// of 10,000 random users paid it (~6,000 per recorded call). A read merging 16 rows of
/// operands is still microseconds.
pub(super) const MAX_SUCCESSIVE_MERGES: usize = 16;

impl Store {
    /// Counts the operands `merged` has just added to `features_latest` and resolves the piles
    /// that reached [`MAX_SUCCESSIVE_MERGES`]. A resolution that fails, or would wait for the
    /// disk, leaves its pile to be merged by reads and the flush (it loses nothing), and is
    /// tried again 16 merges later.
    pub(super) fn settle_latest(
        &self,
        chains: &mut LatestChains,
        merged: &MergedKeys,
        wo: &rocksdb::WriteOptions,
    ) {
        let family = self.cf(cf::FEATURES_LATEST);
        let active = || {
            self.db
                .property_int_value_cf(family, rocksdb::properties::NUM_ENTRIES_ACTIVE_MEM_TABLE)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        let now = active();
        if now < chains.entries + merged.len() as u64 {
            // A new memtable: the piles counted are in an older one.
            chains.piles.clear();
        }
        chains.entries = now;
        let mut wrote = false;
        for key in merged.iter() {
            let pile = chains
                .piles
                .entry(xxhash_rust::xxh3::xxh3_64(key))
                .or_default();
            *pile += 1;
            if *pile < MAX_SUCCESSIVE_MERGES {
                continue;
            }
            *pile = 0;
            // From memory only (memtables, block cache), as RocksDB resolved them: a value that
            // would have to be read from disk is left for 16 more merges, not waited for on the
            // writer (RocksDB answers "incomplete").
            let mut memory_only = rocksdb::ReadOptions::default();
            memory_only.set_read_tier(rocksdb::ReadTier::BlockCache);
            let resolved = match self.db.get_pinned_cf_opt(family, key, &memory_only) {
                Ok(Some(value)) => {
                    let mut b = rocksdb::WriteBatch::default();
                    b.put_cf(family, key, &*value);
                    self.write_opt(b, wo)
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e.into()),
            };
            match resolved {
                Ok(()) => {
                    chains.resolved += 1;
                    wrote = true;
                }
                Err(e) => tracing::debug!(error = %e, "latest features not resolved"),
            }
        }
        // Only a resolution's put (under the lock, nothing else writes the family) adds entries.
        if wrote {
            chains.entries = chains.entries.max(active());
        }
    }
}

/// The runs' first rows flagged in a `features_latest` value ([`RUN_ROW`], alone or among a
/// layered value's pieces): each one's table, time and bytes (time ‖ flagged row).
fn run_pieces(value: &[u8]) -> Vec<(u64, u64, &[u8])> {
    fn piece(v: &[u8]) -> Option<(u64, u64, &[u8])> {
        let (time_ms, body) = keys::split_timed_value(cf::FEATURES_LATEST, v).ok()?;
        (body.first() == Some(&RUN_ROW)).then_some(())?;
        Some((compact_id(body)?, time_ms, v))
    }
    match keys::split_timed_value(cf::FEATURES_LATEST, value) {
        Ok((_, body)) if body.first() == Some(&LAYERED) => {
            layered_pieces(&body[1..]).filter_map(piece).collect()
        }
        _ => piece(value).into_iter().collect(),
    }
}

/// The newest compact row of `table` in `entity`'s history not older than `not_before_ms`, as
/// an operand (time ‖ row); of rows of one millisecond, the last written (the history keeps
/// them in the order of their sequence numbers, which grow).
fn newest_row_of(
    history: &mut rocksdb::DBRawIterator<'_>,
    entity: &str,
    table: u64,
    not_before_ms: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    let prefix = keys::feature_row_prefix(entity);
    history.seek(&prefix);
    let mut found: Option<Vec<u8>> = None;
    while let (Some(k), Some(v)) = (history.key(), history.value()) {
        if !k.starts_with(&prefix) {
            break;
        }
        let t = keys::feature_row_time(k)?;
        if t < not_before_ms || found.as_ref().is_some_and(|f| keys::be64(&f[..8]) > t) {
            break;
        }
        let wide = widen(v);
        let row = wide.as_deref().unwrap_or(v);
        if row.first() == Some(&COMPACT_ROW) && compact_id(row) == Some(table) {
            found = Some(keys::timed_value(t, row));
        }
        history.next();
    }
    history.status()?;
    Ok(found)
}

/// One entry of an encoded `LatestFeatures`, borrowed: its name, its time and its encoding.
struct RawEntry<'a> {
    name: &'a [u8],
    time_ms: u64,
    encoded: &'a [u8],
    /// Whether `encoded` holds `time_ms` (field 2). An operand's entries do not: they are at
    /// the operand's time, the one in front of it (see [`merge_latest`]).
    timed: bool,
}

/// Merges named `features_latest` values (oldest first) as decoding each into a
/// [`LatestFeatures`], absorbing them in order and encoding the result would — per feature the
/// entry with the newest time, the later one on ties; a value that does not decode is passed
/// over — but on the wire: entries are found, compared and copied without being decoded into
/// owned names and values. ([`merge_values`] runs this for the named values of every merge
/// RocksDB does: flushes and compactions that meet an entity twice, the writer's resolutions
/// when an entity's operands pile up, reads of operands.)
///
/// An entry without a time is at its value's time, the one in front: that is how the writer
/// sends its named operands (rows holding text), a history row's bytes behind the row's time
/// (`RecordBatch::add_laid_out_row`), rather than encoding the row again with a time in every
/// entry. Such an entry is written out with its time appended, so that every named value this
/// returns has a time in each entry.
fn merge_latest<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    // Room for a few rows of 16 features: grown from empty, the vector was reallocated five
    // times for two or three such rows (~2,600 instructions of a ~27,000-instruction merge).
    let mut entries: Vec<RawEntry<'a>> = Vec::with_capacity(64);
    for v in values {
        let Ok((at, body)) = keys::split_timed_value(cf::FEATURES_LATEST, v) else {
            continue;
        };
        let start = entries.len();
        if raw_entries(body, at, &mut entries).is_none() {
            entries.truncate(start);
        }
    }
    // Stable: of equal names, the order they came in; the last of the newest time wins.
    entries.sort_by(|a, b| a.name.cmp(b.name));
    let mut kept: Vec<&RawEntry> = Vec::with_capacity(entries.len());
    for e in &entries {
        match kept.last_mut() {
            Some(k) if k.name == e.name => {
                if k.time_ms <= e.time_ms {
                    *k = e;
                }
            }
            _ => kept.push(e),
        }
    }
    let newest = kept.iter().map(|e| e.time_ms).max().unwrap_or(0);
    // An untimed entry gets its time appended (key 0x10, then the varint): fields may come in
    // any order, and prost reads it as it reads the time written before the value.
    let len = |e: &RawEntry| {
        e.encoded.len()
            + if e.timed {
                0
            } else {
                1 + prost::encoding::encoded_len_varint(e.time_ms)
            }
    };
    let mut out = Vec::with_capacity(
        8 + kept
            .iter()
            .map(|e| 1 + prost::encoding::encoded_len_varint(len(e) as u64) + len(e))
            .sum::<usize>(),
    );
    out.extend_from_slice(&newest.to_be_bytes());
    for e in kept {
        out.push(0x0a);
        prost::encoding::encode_varint(len(e) as u64, &mut out);
        out.extend_from_slice(e.encoded);
        if !e.timed {
            out.push(0x10);
            prost::encoding::encode_varint(e.time_ms, &mut out);
        }
    }
    out
}

/// The entries of an encoded `LatestFeatures` message, appended to `out`, those without a time
/// at `at`; `None` when it is malformed (as prost's decoding would refuse it: bad varints,
/// lengths past the end, a name that is not UTF-8).
fn raw_entries<'a>(body: &'a [u8], at: u64, out: &mut Vec<RawEntry<'a>>) -> Option<()> {
    for field in wire::scan(body) {
        let field = field.ok()?;
        if field.number != 1 {
            continue;
        }
        let encoded = field.payload?;
        let (mut name, mut time_ms) = (&b""[..], None);
        for f in wire::scan(encoded) {
            match f.ok()? {
                // The value (3) is copied as it is; other fields are not ours.
                wire::FieldRef {
                    number: 1, payload, ..
                } => name = payload?,
                wire::FieldRef {
                    number: 2, varint, ..
                } => time_ms = Some(varint?),
                _ => {}
            }
        }
        std::str::from_utf8(name).ok()?;
        out.push(RawEntry {
            name,
            time_ms: time_ms.unwrap_or(at),
            encoded,
            timed: time_ms.is_some(),
        });
    }
    Some(())
}

/// A row's entries sorted by name; of a name given twice, the later value (what
/// [`LatestFeatures::absorb`] keeps of two entries with one time).
fn sorted_row<'a, T>(values: impl IntoIterator<Item = (&'a str, T)>) -> Vec<(&'a str, T)> {
    let mut row: Vec<_> = values.into_iter().collect();
    // Reversed, then sorted stably: of equal names the later one comes first, and stays.
    row.reverse();
    row.sort_by(|a, b| a.0.cmp(b.0));
    row.dedup_by(|next, kept| next.0 == kept.0);
    row
}

/// The layout of `names`: its columns in the order [`sorted_row`] puts them (by name; of a name
/// given twice, the later column), each as its index in the table and its name encoded as
/// `LatestEntry.name` (field 1).
fn layout<'a>(names: impl IntoIterator<Item = &'a str>) -> Layout {
    sorted_row(names.into_iter().zip(0..))
        .into_iter()
        .map(|(name, i)| {
            let mut head = Vec::with_capacity(name.len() + 2);
            crate::convert::prediction_record::string(1, name, &mut head);
            (i, head)
        })
        .collect()
}

/// The layout of `names`, found once per table (`RowLayouts`): a model's records share one
/// table (`RecordWrite::Features`), and sorting its names again for every record cost ~3,200
/// instructions per recorded call, encoding them twice more. The layouts of tables no longer
/// used are dropped once there are more than [`MAX_LAYOUTS`].
///
/// Its [`NameTable`] too, unless `free` says the table's id holds another table.
fn table_layout<'o>(
    layouts: &'o mut RowLayouts,
    names: &Arc<[String]>,
    free: impl FnOnce(&NameTable) -> bool,
) -> (&'o Layout, &'o NumberRow, Option<&'o NameTable>) {
    let i = match layouts.iter().position(|(n, ..)| Arc::ptr_eq(n, names)) {
        Some(i) => i,
        None => {
            if layouts.len() >= MAX_LAYOUTS {
                layouts.clear();
            }
            let layout = layout(names.iter().map(String::as_str));
            let numbers = number_row(&layout);
            let table = NameTable::of(layout.iter().map(|(i, _)| names[*i].clone()).collect());
            let table = free(&table).then_some(table);
            layouts.push((names.clone(), layout, numbers, table));
            layouts.len() - 1
        }
    };
    let (_, layout, numbers, table) = &layouts[i];
    (layout, numbers, table.as_ref())
}

/// The history row (time 0) of `layout` when every value is a number: [`encode_row`] of zeros,
/// and where each column's 8 bytes are. A row of numbers is then one copy and a patch per column
/// (encoding entry by entry was ~1,800 instructions per recorded call of 16 features).
fn number_row(layout: &[(usize, Vec<u8>)]) -> NumberRow {
    let zeros =
        vec![FeatureValue::Number(0.0); layout.iter().map(|(i, _)| i + 1).max().unwrap_or(0)];
    let mut bytes = Vec::new();
    encode_row(layout, &zeros, 0, &mut bytes);
    // Each entry: its key (1 byte), its length, the name, then `value` (3): key, length 9,
    // `number`'s key and the 8 bytes, last.
    let mut end = 0;
    let at = layout
        .iter()
        .map(|(i, head)| {
            let len = head.len() + 11;
            end += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
            (*i, end - 8)
        })
        .collect();
    debug_assert_eq!(end, bytes.len());
    (bytes, at)
}

/// Appends the history row of `values` from `row` when every value is a number; false (nothing
/// written) when one is not.
fn write_numbers<V: std::borrow::Borrow<FeatureValue>>(
    row: &NumberRow,
    values: &[V],
    out: &mut Vec<u8>,
) -> bool {
    if !row.1.iter().all(|(i, _)| number_at(values, *i).is_some()) {
        return false;
    }
    let start = out.len();
    out.extend_from_slice(&row.0);
    for (i, at) in &row.1 {
        let x = number_at(values, *i).unwrap_or_default();
        out[start + at..start + at + 8].copy_from_slice(&x.to_le_bytes());
    }
    true
}

/// Appends the `LatestFeatures` encoding of the row `values` laid out by `layout` (`values[i]`
/// being column `i`'s) with every entry at `time_ms`, byte for byte what prost writes for the
/// message (a unit test checks), without building it: the message's owned names and values cost
/// more than the writing. The writer passes 0, which leaves the times out: the history row, and
/// behind the row's time the latest values' operand (`add_laid_out_row`). Rows with a time in
/// every entry are the operands earlier builds stored, which the tests still merge.
fn encode_row<V: std::borrow::Borrow<FeatureValue>>(
    layout: &[(usize, Vec<u8>)],
    values: &[V],
    time_ms: u64,
    out: &mut Vec<u8>,
) {
    use crate::convert::prediction_record::{delimited_len, feature_value, value_inner_len};
    use prost::encoding::{encode_key, encode_varint, WireType};
    // `LatestEntry.time_ms` (2), the same in every entry; left out when zero.
    let mut time_buf = [0u8; 11];
    let time_len = {
        let mut rest = &mut time_buf[..];
        if time_ms != 0 {
            encode_key(2, WireType::Varint, &mut rest);
            encode_varint(time_ms, &mut rest);
        }
        11 - rest.len()
    };
    let time = &time_buf[..time_len];
    out.reserve(
        layout
            .iter()
            .map(|(_, head)| head.len() + 14)
            .sum::<usize>()
            + layout.len() * time_len,
    );
    for (i, head) in layout {
        // LatestFeatures.entries (1): LatestEntry { name (1), time_ms (2), value (3) }.
        let value = values[*i].borrow();
        let len = head.len() + time.len() + delimited_len(3, value_inner_len(value));
        out.push(0x0a);
        if len < 0x80 {
            out.push(len as u8);
        } else {
            encode_varint(len as u64, out);
        }
        out.extend_from_slice(head);
        out.extend_from_slice(time);
        feature_value(3, value, out);
    }
}

impl RecordBatch<'_> {
    /// Adds feature values of one entity at one time (history, and one merge into latest).
    #[cfg(test)]
    pub(super) fn add_features<'a>(
        &mut self,
        entity: &str,
        time_ms: u64,
        values: impl IntoIterator<Item = (&'a str, &'a FeatureValue)>,
    ) {
        let row: Vec<_> = values.into_iter().collect();
        let values: Vec<&FeatureValue> = row.iter().map(|(_, v)| *v).collect();
        self.add_laid_out_row(
            entity,
            time_ms,
            &layout(row.iter().map(|(n, _)| *n)),
            None,
            None,
            &values,
        );
    }

    /// Adds one entity's row at one time, `values[i]` being `names[i]`'s.
    pub(super) fn add_feature_row(
        &mut self,
        entity: &str,
        time_ms: u64,
        names: &Arc<[String]>,
        values: &[FeatureValue],
    ) {
        if names.len() != values.len() {
            // Not a row the recorder writes: paired as far as both go.
            let n = names.len().min(values.len());
            let own = layout(names[..n].iter().map(String::as_str));
            self.add_laid_out_row(entity, time_ms, &own, None, None, values);
            return;
        }
        let mut layouts = std::mem::take(&mut self.row_layouts);
        let store = self.store;
        let (layout, numbers, table) =
            table_layout(&mut layouts, names, |t| store.table_is_free(t));
        self.add_laid_out_row(entity, time_ms, layout, Some(numbers), table, values);
        self.row_layouts = layouts;
    }

    /// Adds a row of one entity at one time: the history row (compact when `table` is given and
    /// every value is a number), and the same row behind its time merged into the entity's
    /// latest values (compact too, then).
    fn add_laid_out_row<V: std::borrow::Borrow<FeatureValue>>(
        &mut self,
        entity: &str,
        time_ms: u64,
        layout: &[(usize, Vec<u8>)],
        numbers: Option<&NumberRow>,
        table: Option<&NameTable>,
        values: &[V],
    ) {
        if layout.is_empty() {
            return;
        }
        let seq = self
            .store
            .row_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The row's time, then the row: the latest values' operand, whose entries are at the
        // time in front (`merge_values`), and behind the time the history row. One encoding
        // serves both (encoding the row again with a time in every entry was ~2,000
        // instructions per recorded call of 16 features). Compact when it can be: 145 bytes
        // for 16 numbers instead of ~400, and merged by keeping the newest row.
        let value = &mut self.scratch;
        value.clear();
        value.extend_from_slice(&time_ms.to_be_bytes());
        let compact =
            match table.filter(|_| layout.iter().all(|(i, _)| number_at(values, *i).is_some())) {
                Some(table) => {
                    if !self.tables.contains(&table.id) {
                        self.batch
                            .put_cf(self.families.features, table.key, &table.stored);
                        self.tables.push(table.id);
                    }
                    write_compact(table, layout, values, value);
                    Some(table.id)
                }
                None => {
                    if !numbers.is_some_and(|n| write_numbers(n, values, value)) {
                        encode_row(layout, values, 0, value);
                    }
                    None
                }
            };
        let history = match compact {
            Some(_) => history_of(&value[8..], &mut self.floats),
            None => &value[8..],
        };
        self.batch.put_cf(
            self.families.features,
            keys::feature_row_key(entity, time_ms, seq),
            history,
        );
        let key = keys::feature_entity_key(entity);
        let Some(table) = compact else {
            self.batch
                .merge_cf(self.families.features_latest, key, &value[..]);
            self.merged.push(key);
            return;
        };
        // A compact row is merged only when it opens or closes a run (`runs.rs`).
        let store = self.store;
        let refresh_ms = (store.retention.features / 2).as_millis() as u64;
        let runs = self
            .runs
            .get_or_insert_with(|| RunBatch::new(store.runs.lock()));
        let (batch, merged, latest) = (
            &mut self.batch,
            &mut self.merged,
            self.families.features_latest,
        );
        let operands = runs.row(entity, table, &self.scratch, refresh_ms, |other, op| {
            let key = keys::feature_entity_key(other);
            batch.merge_cf(latest, key, op);
            merged.push(key);
        });
        let operand = match operands.as_slice() {
            [] => return,
            [one] => std::borrow::Cow::Borrowed(one.as_slice()),
            more => std::borrow::Cow::Owned(merge_values(more.iter().map(Vec::as_slice))),
        };
        self.batch.merge_cf(latest, key, operand);
        self.merged.push(key);
    }

    /// Adds a feature definition.
    pub(super) fn add_feature_def(&mut self, def: &FeatureDef) {
        self.batch.put_cf(
            self.store.family_id(cf::FEATURE_DEFS),
            def.name.as_bytes(),
            serde_json::to_vec(def).expect("feature definitions serialise"),
        );
    }
}

impl Store {
    /// Every feature definition.
    pub fn load_feature_defs(&self) -> Result<Vec<FeatureDef>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::FEATURE_DEFS), IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push(
                serde_json::from_slice(&v).map_err(|source| StoreError::Value {
                    family: cf::FEATURE_DEFS,
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Writes feature definitions durably (synced): they are configuration.
    pub fn put_feature_defs(&self, defs: &[FeatureDef]) -> Result<(), StoreError> {
        let mut b = self.record_batch();
        for d in defs {
            b.add_feature_def(d);
        }
        self.write(std::mem::take(&mut b.batch).into_write_batch(), true)
    }

    /// Point-in-time feature reads: for each entity, for each `(feature, ttl)`, the latest value at
    /// or before `as_of_ms` with its time, or `None` (never seen, only newer values, or expired).
    #[allow(clippy::type_complexity)]
    pub fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> Result<Vec<Vec<Option<(u64, FeatureValue)>>>, StoreError> {
        let retained = self.cutoff(self.retention.features);
        // One batched, sorted multi-get of the entities' latest records: each holds every
        // feature's newest value, so most reads ("as of now") need nothing else.
        let mut order: Vec<(&[u8], usize)> = entities
            .iter()
            .enumerate()
            .map(|(i, e)| (keys::feature_entity_key(e), i))
            .collect();
        order.sort_unstable();
        // Read under the runs' lock, with the newest rows of runs not merged (`runs.rs`): no
        // batch writes between the two.
        let runs = self.runs.lock();
        let values = self.db.batched_multi_get_cf(
            self.cf(cf::FEATURES_LATEST),
            order.iter().map(|(k, _)| k),
            true,
        );
        let pending: Vec<Option<Vec<u8>>> = entities
            .iter()
            .map(|e| runs.pending(e).map(<[u8]>::to_vec))
            .collect();
        drop(runs);
        let mut latest: Vec<Option<LatestFeatures>> = vec![None; entities.len()];
        for ((_, i), v) in order.iter().zip(values) {
            latest[*i] = match v? {
                Some(v) => self.latest_of(&entities[*i], &v)?,
                None => None,
            };
        }
        for ((entity, latest), row) in entities.iter().zip(&mut latest).zip(pending) {
            if let Some(newer) =
                row.and_then(|row| self.latest_piece(entity, &row, true).transpose())
            {
                latest.get_or_insert_with(Default::default).absorb(newer?);
            }
        }
        // Opened at the first look-back only: most reads ("as of now") need none, and an
        // iterator pins a view of every memtable and file of the family.
        let mut history = None;
        let mut out = Vec::with_capacity(entities.len());
        for (entity, latest) in entities.iter().zip(latest) {
            let mut row: Vec<Option<(u64, FeatureValue)>> = Vec::with_capacity(features.len());
            let mut older = Vec::new();
            for (i, (feature, _)) in features.iter().enumerate() {
                row.push(match latest.as_ref().and_then(|l| l.get(feature)) {
                    None => None,
                    Some(e) if e.time_ms <= as_of_ms => e
                        .value
                        .clone()
                        .and_then(feature_value_from_pb)
                        .map(|v| (e.time_ms, v)),
                    Some(_) => {
                        // The newest value is from after as_of: look back in the history.
                        older.push(i);
                        None
                    }
                });
            }
            if !older.is_empty() {
                self.look_back(
                    history.get_or_insert_with(|| self.db.raw_iterator_cf(self.cf(cf::FEATURES))),
                    entity,
                    features,
                    as_of_ms,
                    retained,
                    older,
                    &mut row,
                )?;
            }
            for (found, (_, ttl)) in row.iter_mut().zip(features) {
                if found.as_ref().is_some_and(|(t, _)| {
                    *t < retained || !feature_store::visible(*t, as_of_ms, *ttl)
                }) {
                    *found = None;
                }
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Fills `row[i]` for each `i` in `wanted` with the feature's value in the newest of
    /// `entity`'s rows at or before `as_of_ms`: rows are read newest first until every wanted
    /// feature is found or nothing older could be returned (retention, TTLs).
    #[allow(clippy::too_many_arguments)]
    fn look_back(
        &self,
        history: &mut rocksdb::DBRawIterator<'_>,
        entity: &str,
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
        retained: u64,
        mut wanted: Vec<usize>,
        row: &mut [Option<(u64, FeatureValue)>],
    ) -> Result<(), StoreError> {
        let prefix = keys::feature_row_prefix(entity);
        history.seek(keys::feature_row_key(entity, as_of_ms, 0));
        while !wanted.is_empty() {
            let (Some(k), Some(v)) = (history.key(), history.value()) else {
                history.status()?;
                break;
            };
            if !k.starts_with(&prefix) {
                break;
            }
            let t = keys::feature_row_time(k)?;
            if t < retained {
                break;
            }
            // A feature whose TTL has passed at this row is not in any older one either.
            wanted.retain(|&i| feature_store::visible(t, as_of_ms, features[i].1));
            let stored = self.history_row(entity, v)?;
            wanted.retain(|&i| match stored.get(&features[i].0) {
                Some(e) => {
                    row[i] = e
                        .value
                        .clone()
                        .and_then(feature_value_from_pb)
                        .map(|v| (t, v));
                    false
                }
                None => true,
            });
            history.next();
        }
        Ok(())
    }

    /// A history row as stored: compact ([`NameTable`]) or a `LatestFeatures`.
    fn history_row(&self, entity: &str, v: &[u8]) -> Result<LatestFeatures, StoreError> {
        match v.split_first() {
            Some((&COMPACT_ROW, rest)) => self.compact_row(cf::FEATURES, entity, rest, 0),
            Some((&FLOAT_ROW, _)) => match widen(v) {
                Some(wide) => self.compact_row(cf::FEATURES, entity, &wide[1..], 0),
                None => Err(StoreError::Decode {
                    family: cf::FEATURES,
                    key: entity.to_string(),
                    reason: "a row of floats cut short".into(),
                }),
            },
            _ => LatestFeatures::decode(v).map_err(decode_err(cf::FEATURES, entity.to_string())),
        }
    }

    /// An entity's `features_latest` value with its names: named (as merged), compact (every
    /// feature at the value's time) or layered (its pieces absorbed in the order they are kept,
    /// see [`merge_values`]); `None` when it is malformed, as a value that does not decode
    /// always read.
    fn latest_of(&self, entity: &str, v: &[u8]) -> Result<Option<LatestFeatures>, StoreError> {
        self.latest_piece(entity, v, false)
    }

    /// [`Store::latest_of`] of one value, or of one piece of a layered value (`in_layered`:
    /// pieces are never layered themselves, as [`Pieces::add`] takes them).
    fn latest_piece(
        &self,
        entity: &str,
        v: &[u8],
        in_layered: bool,
    ) -> Result<Option<LatestFeatures>, StoreError> {
        let Ok((time_ms, body)) = keys::split_timed_value(cf::FEATURES_LATEST, v) else {
            return Ok(None);
        };
        match body.split_first() {
            Some((&COMPACT_ROW | &RUN_ROW, rest)) => self
                .compact_row(cf::FEATURES_LATEST, entity, rest, time_ms)
                .map(Some),
            Some((&LAYERED, _)) if in_layered => Ok(None),
            Some((&LAYERED, pieces)) => {
                let mut all = LatestFeatures::default();
                for piece in layered_pieces(pieces) {
                    if let Some(found) = self.latest_piece(entity, piece, true)? {
                        all.absorb(found);
                    }
                }
                Ok(Some(all))
            }
            _ => Ok(LatestFeatures::decode(body).ok()),
        }
    }

    /// The entries of a compact row (past its first byte), each at `time_ms`, sorted by name.
    fn compact_row(
        &self,
        family: &'static str,
        entity: &str,
        rest: &[u8],
        time_ms: u64,
    ) -> Result<LatestFeatures, StoreError> {
        let bad = |reason: String| StoreError::Decode {
            family,
            key: entity.to_string(),
            reason,
        };
        let Some((id, numbers)) = rest.split_first_chunk::<8>() else {
            return Err(bad("a compact row without its table's id".into()));
        };
        let id = u64::from_le_bytes(*id);
        let names = self
            .name_table(id)?
            .ok_or_else(|| bad(format!("the table of names {id:016x} is missing")))?;
        if numbers.len() != 8 * names.len() {
            return Err(bad(format!(
                "{} bytes of numbers for a table of {} names",
                numbers.len(),
                names.len()
            )));
        }
        let mut entries = names
            .iter()
            .zip(numbers.chunks_exact(8))
            .map(|(name, x)| {
                let mut le = [0u8; 8];
                le.copy_from_slice(x);
                LatestEntry {
                    name: name.clone(),
                    time_ms,
                    value: Some(pb::FeatureValue {
                        kind: Some(pb::feature_value::Kind::Number(f64::from_le_bytes(le))),
                    }),
                }
            })
            .collect::<Vec<_>>();
        // Tables are written sorted by name (their rows' layout); sorted again, a table that
        // were not would still be searched right (`LatestFeatures::get`).
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(LatestFeatures { entries })
    }

    /// Closes every run of feature rows (the record writer stops): merges each run's newest
    /// row not merged yet and marks the store finished, in one synced write (`runs.rs`).
    pub fn finish_feature_runs(&self) -> Result<(), StoreError> {
        let mut runs = self.runs.lock();
        let pending = runs.finish();
        let mut b = rocksdb::WriteBatch::default();
        let latest = self.cf(cf::FEATURES_LATEST);
        for (entity, row) in &pending {
            b.merge_cf(latest, keys::feature_entity_key(entity), row);
        }
        b.delete(super::runs::OPEN_KEY);
        self.write(b, true)
    }

    /// Merges, for each run's first row flagged in `features_latest` ([`RUN_ROW`]), the newest
    /// row of its table in the entity's history, unflagged: the runs a process that did not
    /// finish left open (`runs.rs`). Run when the store opens, before anything is written.
    pub(super) fn repair_feature_runs(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let latest = self.cf(cf::FEATURES_LATEST);
        let mut history = self.db.raw_iterator_cf(self.cf(cf::FEATURES));
        let mut batch = rocksdb::WriteBatch::default();
        let (mut entities, mut repaired) = (0u64, 0u64);
        for item in self.db.iterator_cf(latest, IteratorMode::Start) {
            let (key, value) = item?;
            entities += 1;
            let Ok(entity) = std::str::from_utf8(&key) else {
                continue;
            };
            for (table, time_ms, piece) in run_pieces(&value) {
                let newest = newest_row_of(&mut history, entity, table, time_ms)?;
                // Unflagged, the newest row (or the piece itself when the history has nothing
                // newer, e.g. expired) closes the run.
                let mut close = newest.unwrap_or_else(|| piece.to_vec());
                close[8] = COMPACT_ROW;
                batch.merge_cf(latest, &key, close);
                repaired += 1;
            }
            if batch.len() >= 1_000 {
                self.write(std::mem::take(&mut batch), false)?;
            }
        }
        self.write(batch, true)?;
        tracing::info!(
            entities,
            repaired,
            elapsed = ?started.elapsed(),
            "the last process did not stop cleanly: feature runs it left open are merged"
        );
        Ok(())
    }

    /// The table of names `id`, read once from `feature_rows` and then kept.
    fn name_table(&self, id: u64) -> Result<Option<Arc<[String]>>, StoreError> {
        if let Some(names) = self.name_tables.read().get(&id) {
            return Ok(Some(names.clone()));
        }
        let key = keys::feature_table_key(id);
        let Some(v) = self.db.get_pinned_cf(self.cf(cf::FEATURES), key)? else {
            return Ok(None);
        };
        let names: Arc<[String]> = StoredNames::decode(&*v)
            .map_err(decode_err(
                cf::FEATURES,
                format!("table of names {id:016x}"),
            ))?
            .names
            .into();
        self.name_tables.write().insert(id, names.clone());
        Ok(Some(names))
    }

    /// Whether `table`'s id is free for it: unused, or holding this very table. Checked once per
    /// table a writer lays out; a failed read counts as taken (its rows are then written whole).
    fn table_is_free(&self, table: &NameTable) -> bool {
        match self.db.get_pinned_cf(self.cf(cf::FEATURES), table.key) {
            Ok(None) => true,
            Ok(Some(v)) => *v == table.stored[..],
            Err(_) => false,
        }
    }

    /// Flushes the feature families' memtables to SST files (benchmarks compare reads from both).
    pub fn flush_features(&self) -> Result<(), StoreError> {
        for name in [cf::FEATURES, cf::FEATURES_LATEST] {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }
}

impl crate::storage::FeatureStore for Store {
    fn load_feature_defs(&self) -> Result<Vec<FeatureDef>, StoreError> {
        Store::load_feature_defs(self)
    }

    fn put_feature_defs(&self, defs: &[FeatureDef]) -> Result<(), StoreError> {
        Store::put_feature_defs(self, defs)
    }

    fn get_features(
        &self,
        entities: &[String],
        features: &[(String, Option<u64>)],
        as_of_ms: u64,
    ) -> Result<Vec<Vec<Option<(u64, FeatureValue)>>>, StoreError> {
        Store::get_features(self, entities, features, as_of_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::feature_value_to_pb;

    /// Feature "x" of `entity` as of `as_of`, with its time after `t0`.
    fn feature_x(store: &Store, entity: &str, as_of: u64, t0: u64) -> Option<(u64, FeatureValue)> {
        store
            .get_features(&[entity.to_string()], &[("x".to_string(), None)], as_of)
            .unwrap()
            .remove(0)
            .remove(0)
            .map(|(t, v)| (t - t0, v))
    }

    /// What prost writes for a row: its entries absorbed one by one into a `LatestFeatures`
    /// (of a name given twice, the later value), every entry at `time_ms`.
    fn reference(row: &[(&str, &FeatureValue)], time_ms: u64) -> LatestFeatures {
        let mut expected = LatestFeatures::default();
        for (name, value) in row {
            expected.absorb(LatestFeatures {
                entries: vec![LatestEntry {
                    name: name.to_string(),
                    time_ms,
                    value: Some(feature_value_to_pb(value)),
                }],
            });
        }
        expected
    }

    /// A table of names laid out once serves every row that shares it, and each row is written
    /// as that row alone is: sorted by name, of a name given twice the later value; another
    /// table (equal names, not the same table) gets its own layout, and a row with fewer values
    /// than names is paired as far as both go.
    #[test]
    fn rows_sharing_a_table_of_names_encode_as_each_row_alone() {
        let table = |names: &[&str]| -> Arc<[String]> {
            names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .into()
        };
        let shared = table(&["x[2]", "x[10]", "a", "x[2]", "b"]);
        let twin = table(&["b", "a"]);
        let encoded = |layout: &[(usize, Vec<u8>)], values: &[FeatureValue]| {
            let mut out = Vec::new();
            encode_row(layout, values, 1_764_000_000_123, &mut out);
            LatestFeatures::decode(&out[..]).unwrap()
        };
        let mut layouts = Vec::new();
        for k in 0..3 {
            let values: Vec<FeatureValue> = (0..5)
                .map(|i| FeatureValue::Number((k * 10 + i) as f64))
                .collect();
            let row: Vec<_> = shared.iter().map(String::as_str).zip(&values).collect();
            let got = encoded(table_layout(&mut layouts, &shared, |_| true).0, &values);
            assert_eq!(got, reference(&row, 1_764_000_000_123));
            let names: Vec<&str> = got.entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, ["a", "b", "x[10]", "x[2]"]);
            // The later of the two "x[2]".
            assert_eq!(got.entries[3].value, Some(feature_value_to_pb(&values[3])));
            let two = &values[..2];
            let twin_row: Vec<_> = twin.iter().map(String::as_str).zip(two).collect();
            assert_eq!(
                encoded(table_layout(&mut layouts, &twin, |_| true).0, two),
                reference(&twin_row, 1_764_000_000_123)
            );
            // Fewer values than names: paired as far as they go.
            let short = layout(shared[..2].iter().map(String::as_str));
            let short_row: Vec<_> = shared.iter().map(String::as_str).zip(two).collect();
            assert_eq!(
                encoded(&short, two),
                reference(&short_row, 1_764_000_000_123)
            );
        }
        // One layout per table, however many rows.
        assert_eq!(layouts.len(), 2);
    }

    /// A random named value at `time_ms`: fewer than `most` entries of `names`, numbers or
    /// texts, given a time or not (untimed, at the value's time: said by the `bool`).
    fn random_named(
        rng: &mut impl rand::Rng,
        names: &[&str],
        most: usize,
        time_ms: u64,
    ) -> (Vec<u8>, bool) {
        let row: Vec<(String, FeatureValue)> = (0..rng.random_range(0..most))
            .map(|_| {
                let name = names[rng.random_range(0..names.len())].to_string();
                let value = if rng.random_bool(0.5) {
                    FeatureValue::Number(rng.random_range(-3..3) as f64)
                } else {
                    FeatureValue::Text(format!("v{}", rng.random_range(0..3)))
                };
                (name, value)
            })
            .collect();
        let row_values: Vec<&FeatureValue> = row.iter().map(|(_, v)| v).collect();
        let untimed = rng.random_bool(0.5);
        let mut v = time_ms.to_be_bytes().to_vec();
        encode_row(
            &layout(row.iter().map(|(n, _)| n.as_str())),
            &row_values,
            if untimed { 0 } else { time_ms },
            &mut v,
        );
        (v, untimed)
    }

    /// The merge on the wire gives what decoding, absorbing and encoding the messages gave:
    /// random operands over a few names (so names repeat, at equal and different times), an
    /// existing value or none, operands as the writer sends them (entries without a time, at
    /// the operand's) or with a time in every entry, and operands that do not decode (passed
    /// over by both). The result has a time in every entry: decoded alone, it is the reference.
    #[test]
    fn merging_on_the_wire_is_merging_the_messages() {
        use rand::{Rng, SeedableRng};
        // (value, whether its entries are untimed: at the value's time)
        let reference = |values: &[(Vec<u8>, bool)]| {
            let mut acc = LatestFeatures::default();
            for (v, untimed) in values {
                if let Some(mut l) = LatestFeatures::from_value(v) {
                    if *untimed {
                        let at = u64::from_be_bytes(v[..8].try_into().unwrap());
                        l.entries.iter_mut().for_each(|e| e.time_ms = at);
                    }
                    acc.absorb(l);
                }
            }
            acc.to_value()
        };
        let decoded = |v: &[u8]| (v[..8].to_vec(), LatestFeatures::from_value(v));
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let names = ["a", "b", "clicks", "country", "z"];
        for case in 0..500 {
            let mut values: Vec<(Vec<u8>, bool)> = Vec::new();
            for _ in 0..rng.random_range(1..6) {
                let time_ms = rng.random_range(0..4u64) * 1_000;
                let (mut v, untimed) = random_named(&mut rng, &names, 5, time_ms);
                match rng.random_range(0..12) {
                    // Not a value at all, and one cut short inside an entry.
                    0 => v.truncate(5),
                    1 if v.len() > 12 => v.truncate(v.len() - 3),
                    _ => {}
                }
                values.push((v, untimed));
            }
            let merged = merge_latest(values.iter().map(|(v, _)| v.as_slice()));
            let expected = reference(&values);
            assert_eq!(decoded(&merged), decoded(&expected), "case {case}");
            // Merged again with nothing (RocksDB merges a merged value with later operands):
            // unchanged, every entry keeping its time.
            assert_eq!(
                decoded(&merge_latest([merged.as_slice()].into_iter())),
                decoded(&expected),
                "case {case}"
            );
            // Timed operands (at a time other than 0, which prost leaves out) merge as before.
            if values
                .iter()
                .all(|(v, untimed)| !untimed && v.get(..8).is_none_or(|t| t != [0; 8]))
            {
                assert_eq!(merged, expected, "case {case}: byte for byte");
            }
        }
        // Nothing that decodes: an empty value, as before.
        assert_eq!(
            merge_latest([&b"\x00"[..]].into_iter()),
            reference(&[(vec![0], false)])
        );
    }

    /// Compact rows (of several tables, late ones too), named values, timed or not, and
    /// malformed ones merge — at once, or in groups whose merges are merged again, as RocksDB
    /// merges operands piecewise — into a value that reads back as absorbing every one of them
    /// named, in order. Rows of one table alone merge into the newest row as it is; rows of
    /// several tables into a layered value. (Named values and compact rows never share a
    /// millisecond here: between those two kinds the compact row wins a tie, checked last.)
    #[test]
    fn merging_compact_rows_is_absorbing_them_named() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names = ["a", "b", "clicks", "country", "z"];
        let tables: Vec<(NameTable, Vec<String>)> =
            [&["a", "b"][..], &["b", "clicks", "z"], &["a", "country"]]
                .iter()
                .map(|t| {
                    let t: Vec<String> = t.iter().map(|n| n.to_string()).collect();
                    (NameTable::of(t.clone()), t)
                })
                .collect();
        for (table, names) in &tables {
            store
                .name_tables
                .write()
                .insert(table.id, names.clone().into());
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1805);
        for case in 0..1_000 {
            let mut values: Vec<Vec<u8>> = Vec::new();
            let mut reference = LatestFeatures::default();
            let mut compact_tables = std::collections::BTreeSet::new();
            let mut only_compact = true;
            for _ in 0..rng.random_range(1..8) {
                let mut v;
                let mut entries = None;
                if rng.random_bool(0.6) {
                    // Compact rows at odd seconds.
                    let time_ms = rng.random_range(0..4u64) * 2_000 + 1_000;
                    let (table, names) = &tables[rng.random_range(0..tables.len())];
                    v = time_ms.to_be_bytes().to_vec();
                    let row: Vec<(usize, Vec<u8>)> =
                        (0..names.len()).map(|i| (i, vec![])).collect();
                    let numbers: Vec<FeatureValue> = (0..names.len())
                        .map(|_| FeatureValue::Number(rng.random_range(-3..3) as f64))
                        .collect();
                    write_compact(table, &row, &numbers, &mut v);
                    compact_tables.insert(table.id);
                    entries = Some(LatestFeatures {
                        entries: names
                            .iter()
                            .zip(&numbers)
                            .map(|(name, x)| LatestEntry {
                                name: name.clone(),
                                time_ms,
                                value: Some(feature_value_to_pb(x)),
                            })
                            .collect(),
                    });
                } else {
                    // Named values at even seconds, their entries at the value's time or not.
                    only_compact = false;
                    let time_ms = rng.random_range(0..4u64) * 2_000;
                    v = random_named(&mut rng, &names, 4, time_ms).0;
                    if let Some(mut l) = LatestFeatures::from_value(&v) {
                        l.entries.iter_mut().for_each(|e| e.time_ms = time_ms);
                        entries = Some(l);
                    }
                }
                // Malformed: too short for a time, or cut inside a number or an entry.
                match rng.random_range(0..15) {
                    0 => v.truncate(5),
                    1 if v.len() > 12 => v.truncate(v.len() - 3),
                    _ => {
                        if let Some(e) = entries {
                            reference.absorb(e);
                        }
                    }
                }
                values.push(v);
            }
            let newest = reference
                .entries
                .iter()
                .map(|e| e.time_ms)
                .max()
                .unwrap_or(0);
            let resolved = |v: &[u8]| {
                assert_eq!(
                    keys::be64(&v[..8]),
                    newest,
                    "case {case}: the newest time in front"
                );
                store.latest_of("e", v).unwrap().unwrap_or_default()
            };
            let merged = merge_values(values.iter().map(Vec::as_slice));
            assert_eq!(resolved(&merged), reference, "case {case}");
            assert_eq!(
                resolved(&merge_values([merged.as_slice()].into_iter())),
                reference,
                "case {case}: merged again with nothing"
            );
            // In groups, as flushes and compactions merge operands, then merged again.
            let mut groups = Vec::new();
            let mut rest = &values[..];
            while !rest.is_empty() {
                let (group, tail) = rest.split_at(rng.random_range(1..=rest.len()));
                groups.push(merge_values(group.iter().map(Vec::as_slice)));
                rest = tail;
            }
            let regrouped = merge_values(groups.iter().map(Vec::as_slice));
            assert_eq!(resolved(&regrouped), reference, "case {case}: in groups");
            let well_formed = values
                .iter()
                .all(|v| v.len() > 8 && compact_id(&v[8..]).is_some());
            if only_compact && well_formed && compact_tables.len() == 1 {
                // The newest row, the later one on a tie.
                let newest_row = values
                    .iter()
                    .enumerate()
                    .max_by_key(|(i, v)| (keys::be64(&v[..8]), *i))
                    .unwrap()
                    .1;
                assert_eq!(&merged, newest_row, "case {case}: the newest row as it is");
            }
            if well_formed && compact_tables.len() > 1 {
                assert_eq!(merged[8], LAYERED, "case {case}");
            }
        }
        // A compact row and a named value of one millisecond, in either order: the row's number.
        let (table, _) = &tables[0];
        let mut row = 5_000u64.to_be_bytes().to_vec();
        let numbers = [FeatureValue::Number(1.0), FeatureValue::Number(2.0)];
        write_compact(table, &[(0, vec![]), (1, vec![])], &numbers, &mut row);
        let mut named = 5_000u64.to_be_bytes().to_vec();
        encode_row(
            &layout(["a"]),
            &[FeatureValue::Text("t".into())],
            0,
            &mut named,
        );
        for pair in [[&row, &named], [&named, &row]] {
            let merged = merge_values(pair.into_iter().map(Vec::as_slice));
            let a = store.latest_of("e", &merged).unwrap().unwrap();
            assert_eq!(
                a.get("a").unwrap().value,
                Some(feature_value_to_pb(&numbers[0]))
            );
        }
    }

    /// Whatever bytes a value holds — a time, then a compact, layered or named body, cut or
    /// garbled anywhere — merging and reading them never panics, and a merge of a compact row
    /// with such bytes, where they hold no value of the row's features, keeps the row's.
    #[test]
    fn merging_arbitrary_bytes_never_panics() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = vec!["a".into(), "b".into()];
        let table = NameTable::of(names.clone());
        store.name_tables.write().insert(table.id, names.into());
        let mut row = 7_000u64.to_be_bytes().to_vec();
        let numbers = [FeatureValue::Number(1.5), FeatureValue::Number(-2.0)];
        write_compact(&table, &[(0, vec![]), (1, vec![])], &numbers, &mut row);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..5_000 {
            let mut junk: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
            if junk.len() > 8 {
                junk[8] = [COMPACT_ROW, LAYERED, 0x0a][rng.random_range(0..3)];
            }
            let merged = merge_values([junk.as_slice()].into_iter());
            let _ = store.latest_of("e", &merged);
            let _ = store.latest_of("e", &junk);
            let merged = merge_values([row.as_slice(), junk.as_slice()].into_iter());
            let _ = merge_values([junk.as_slice(), merged.as_slice()].into_iter());
            // Unless the junk holds an `a` of its own, or names a table that is not stored.
            let junk_read = store.latest_of("e", &junk);
            if junk_read
                .as_ref()
                .is_ok_and(|l| l.as_ref().is_none_or(|l| l.get("a").is_none()))
            {
                let read = store.latest_of("e", &merged).unwrap();
                let a = read.expect("a merge holding the row reads");
                let a = a.get("a").expect("the row's a is kept");
                assert_eq!(
                    (a.time_ms, &a.value),
                    (7_000, &Some(feature_value_to_pb(&numbers[0])))
                );
            }
        }
    }

    /// A history row of numbers written from its table's zero row is the row encoded entry by
    /// entry (names out of order, given twice, long enough for a two-byte length; numbers
    /// negative, zero, NaN, huge); a row with a text, or too few values, is left to the encoder.
    #[test]
    fn rows_of_numbers_from_the_zero_row_encode_as_entry_by_entry() {
        let long = "n".repeat(200);
        let names: Vec<&str> = vec!["b", "a", &long, "b", "x[10]", "x[2]"];
        let layout = layout(names.iter().copied());
        let numbers = number_row(&layout);
        for values in [
            vec![1.5, -2.0, 0.0, f64::NAN, 1e300, -0.0],
            vec![0.0; 6],
            (0..6).map(f64::from).collect(),
        ] {
            let values: Vec<FeatureValue> = values.into_iter().map(FeatureValue::Number).collect();
            let mut expected = vec![7];
            encode_row(&layout, &values, 0, &mut expected);
            let mut got = vec![7];
            assert!(write_numbers(&numbers, &values, &mut got));
            assert_eq!(got, expected);
        }
        let mut text: Vec<FeatureValue> = (0..6).map(|i| FeatureValue::Number(i.into())).collect();
        text[4] = FeatureValue::Text("blue".into());
        let mut out = vec![7];
        assert!(!write_numbers(&numbers, &text, &mut out));
        assert!(!write_numbers(&numbers, &text[..3], &mut out));
        assert_eq!(out, [7]);
    }

    /// The hand-written encoding is prost's, for rows with numbers and texts (empty, zero,
    /// negative, long), names given twice (the later wins) and out of order, times 0 and large.
    #[test]
    fn rows_encode_as_prost_encodes_the_message() {
        let long = "x".repeat(300);
        let values = [
            FeatureValue::Number(1.5),
            FeatureValue::Text(String::new()),
            FeatureValue::Number(0.0),
            FeatureValue::Number(-2.0),
            FeatureValue::Text("seven".into()),
            FeatureValue::Text(long.clone()),
        ];
        let rows: Vec<Vec<(&str, &FeatureValue)>> = vec![
            vec![("a", &values[0])],
            vec![("b", &values[0]), ("a", &values[1]), ("c", &values[2])],
            vec![
                ("z", &values[3]),
                ("a", &values[4]),
                ("z", &values[0]),
                ("m", &values[5]),
            ],
            vec![(long.as_str(), &values[5]), ("", &values[2])],
        ];
        for row in rows {
            for time_ms in [0, 1, 1_764_000_000_000, u64::MAX] {
                let expected = reference(&row, time_ms);
                let values: Vec<&FeatureValue> = row.iter().map(|(_, v)| *v).collect();
                let mut got = vec![9];
                encode_row(
                    &layout(row.iter().map(|(n, _)| *n)),
                    &values,
                    time_ms,
                    &mut got,
                );
                assert_eq!(got[1..], expected.encode_to_vec(), "{row:?} at {time_ms}");
                assert_eq!(
                    LatestFeatures::decode(&got[1..]).unwrap(),
                    expected,
                    "{row:?}"
                );
            }
        }
    }

    /// A busy entity: its latest values are merged from more operands than the writer lets
    /// pile up (`MAX_SUCCESSIVE_MERGES`), one batch per write as the writer commits them, some
    /// late (an older time written after a newer one), across a flush; every read sees the newest
    /// value of each feature, as one merge of all the rows would give.
    #[test]
    fn a_busy_entity_reads_its_newest_values_however_its_operands_were_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 600_000;
        let n = |x: f64| FeatureValue::Number(x);
        let names = ["a", "b", "c"];
        let mut newest: std::collections::BTreeMap<&str, (u64, f64)> = Default::default();
        for i in 0..100u64 {
            // Every seventh write is late: a time before the newest already written.
            let time_ms = if i % 7 == 6 {
                t0 + i * 1_000 - 5_500
            } else {
                t0 + i * 1_000
            };
            let name = names[(i % 3) as usize];
            let value = i as f64;
            let mut b = store.record_batch();
            b.add_features("busy", time_ms, [(name, &n(value)), ("all", &n(value))]);
            b.commit(false).unwrap();
            for f in [name, "all"] {
                if newest.get(f).is_none_or(|(t, _)| *t <= time_ms) {
                    newest.insert(f, (time_ms, value));
                }
            }
            if i == 50 {
                store.flush_features().unwrap();
            }
            if i % 10 == 9 || i == 99 {
                let wanted: Vec<(String, Option<u64>)> = ["a", "b", "c", "all"]
                    .iter()
                    .map(|f| (f.to_string(), None))
                    .collect();
                let got = store
                    .get_features(&["busy".to_string()], &wanted, u64::MAX)
                    .unwrap()
                    .remove(0);
                let expected: Vec<_> = ["a", "b", "c", "all"]
                    .iter()
                    .map(|f| newest.get(f).map(|(t, v)| (*t, n(*v))))
                    .collect();
                assert_eq!(got, expected, "after write {i}");
            }
        }
    }

    /// An entity's operands are resolved each time [`MAX_SUCCESSIVE_MERGES`] pile up in the
    /// active memtable, whether they came one batch at a time or many in one batch; a flush
    /// starts a new memtable and the counts again, and other entities' operands count apart.
    #[test]
    fn piles_of_operands_are_resolved_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 600_000;
        let n = |x: f64| FeatureValue::Number(x);
        let resolved = || store.latest_chains.lock().resolved;
        let write = |entity: &str, i: u64| {
            let mut b = store.record_batch();
            b.add_features(entity, t0 + i, [("x", &n(i as f64))]);
            b.commit(false).unwrap();
        };
        for i in 0..MAX_SUCCESSIVE_MERGES as u64 - 1 {
            write("busy", i);
            write("other", i);
        }
        assert_eq!(resolved(), 0);
        write("busy", 100);
        assert_eq!(resolved(), 1, "the 16th operand of busy");
        // A resolution is a put: the entity's newest value is still read.
        let x = |entity: &str| feature_x(&store, entity, u64::MAX, t0);
        assert_eq!(x("busy"), Some((100, n(100.0))));
        // Many operands in one batch.
        let mut b = store.record_batch();
        for i in 0..40 {
            b.add_features("busy", t0 + 200 + i, [("x", &n(i as f64))]);
        }
        b.commit(false).unwrap();
        assert_eq!(resolved(), 3);
        assert_eq!(x("busy"), Some((239, n(39.0))));
        // A flush starts a new memtable: other's 15 operands are in the old one.
        store.flush_features().unwrap();
        for i in 0..10 {
            write("other", 300 + i);
        }
        assert_eq!(resolved(), 3);
        assert_eq!(x("other"), Some((309, n(309.0))));
        // A value that would have to be read from disk is not waited for: "cold" was flushed and
        // never read since, so its 16th operand leaves the pile as it is — and loses nothing.
        write("cold", 400);
        store.flush_features().unwrap();
        for i in 0..MAX_SUCCESSIVE_MERGES as u64 {
            write("cold", 401 + i);
        }
        assert_eq!(resolved(), 3);
        assert_eq!(x("cold"), Some((416, n(416.0))));
    }

    /// A batch's feature rows of several entities, interleaved (`RecordLog::commit`): every
    /// entity reads back its newest row, of two rows at the same time the later one, and its
    /// history as of any time.
    #[test]
    fn a_batch_interleaving_entities_keeps_each_entitys_order() {
        use crate::storage::{RecordLog, RecordWrites};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let t0 = now - 60_000;
        let n = FeatureValue::Number;
        let mut w = RecordWrites::default();
        w.add_experiment_requests("ab", "control", 1);
        for (entity, dt, x) in [
            ("b", 0, 1.0),
            ("a", 0, 5.0),
            ("b", 1_000, 2.0),
            ("c", 0, 7.0),
            ("b", 1_000, 3.0),
            ("a", 500, 6.0),
        ] {
            w.add_features(entity, t0 + dt, [("x", &n(x))]);
        }
        store.commit(w, false).unwrap();
        let x = |entity: &str, as_of: u64| feature_x(&store, entity, as_of, t0);
        assert_eq!(x("a", now), Some((500, n(6.0))));
        assert_eq!(
            x("b", now),
            Some((1_000, n(3.0))),
            "the later of two rows at one time"
        );
        assert_eq!(x("c", now), Some((0, n(7.0))));
        assert_eq!(x("b", t0 + 999), Some((0, n(1.0))));
        assert_eq!(x("a", t0 + 499), Some((0, n(5.0))));
    }

    /// The stored history rows of `entity`, newest first (raw values).
    fn stored_rows(store: &Store, entity: &str) -> Vec<Vec<u8>> {
        let prefix = keys::feature_row_prefix(entity);
        store
            .db
            .prefix_iterator_cf(store.cf(cf::FEATURES), &prefix)
            .map(|kv| kv.unwrap())
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.to_vec())
            .collect()
    }

    /// The table of names of `names`' compact rows: in layout order, by name.
    fn laid_out_table(names: &[String]) -> NameTable {
        let mut sorted = names.to_vec();
        sorted.sort();
        NameTable::of(sorted)
    }

    /// The names of [`sixteen`]'s features: `x[0]`..`x[15]`.
    fn sixteen_names() -> Arc<[String]> {
        (0..16).map(|i| format!("x[{i}]")).collect()
    }

    /// Sixteen numeric features of one model's table, `x[0]`..`x[15]`, for `entity` at `t`.
    fn sixteen(w: &mut crate::storage::RecordWrites, names: &Arc<[String]>, entity: &str, t: u64) {
        let values = (0..16).map(|i| FeatureValue::Number(t as f64 + i as f64 / 8.0));
        w.add_feature_row(entity, t, names.clone(), values.collect());
    }

    /// A history row whose numbers are all floats (FP32 inputs) holds 4 bytes a number: 73 bytes
    /// for 16 features. What reads back is what was written, bit for bit (a NaN's payload, a
    /// zero's sign), from the memtable and from files; a row with a number that is not a float
    /// keeps 8 bytes a number. (`runs.rs`'s repair reads rows of floats too.)
    #[test]
    fn rows_of_floats_are_stored_in_four_bytes_a_number() {
        use crate::storage::{RecordLog, RecordWrites};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names = sixteen_names();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 60_000;
        let floats = |k: u64| -> Vec<FeatureValue> {
            let odd = [f64::from(f32::NAN), -0.0, f64::INFINITY, f64::from(0.1f32)];
            (0..16)
                .map(|i| {
                    FeatureValue::Number(odd.get(i).copied().unwrap_or(k as f64 + i as f64 / 8.0))
                })
                .collect()
        };
        for k in 0..3 {
            let mut w = RecordWrites::default();
            w.add_feature_row("u", t0 + k * 1_000, names.clone(), floats(k));
            let mut wide = floats(k);
            wide[5] = FeatureValue::Number(0.1);
            w.add_feature_row("v", t0 + k * 1_000, names.clone(), wide);
            store.commit(w, false).unwrap();
        }
        for row in stored_rows(&store, "u") {
            assert_eq!((row[0], row.len()), (FLOAT_ROW, 9 + 16 * 4));
        }
        for row in stored_rows(&store, "v") {
            assert_eq!((row[0], row.len()), (COMPACT_ROW, 9 + 16 * 8));
        }
        let bits = |store: &Store, entity: &str, as_of: u64| -> Vec<(u64, u64)> {
            let features: Vec<(String, Option<u64>)> =
                names.iter().map(|n| (n.clone(), None)).collect();
            let mut row = store
                .get_features(&[entity.to_string()], &features, as_of)
                .unwrap()
                .remove(0);
            row.drain(..)
                .map(|v| match v {
                    Some((t, FeatureValue::Number(x))) => (t, x.to_bits()),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let expect = |k: u64| -> Vec<(u64, u64)> {
            floats(k)
                .iter()
                .map(|v| match v {
                    FeatureValue::Number(x) => (t0 + k * 1_000, x.to_bits()),
                    FeatureValue::Text(_) => unreachable!(),
                })
                .collect()
        };
        assert_eq!(bits(&store, "u", t0 + 1_500), expect(1));
        store.flush_features().unwrap();
        assert_eq!(bits(&store, "u", t0 + 500), expect(0));
        assert_eq!(bits(&store, "u", u64::MAX), expect(2));
    }

    /// A row of numbers is stored compact: 0x00, its table's id and the numbers, 137 bytes for
    /// 16 features (named, it was ~400); its table of names once, beside it; and so is the
    /// entity's latest values' operand. A row holding text is stored named, as before.
    /// Point-in-time reads give back every value, from the memtable, from files, and after a
    /// restart (the table read back from the store).
    #[test]
    fn rows_of_numbers_are_stored_compact_and_read_back_whole() {
        use crate::storage::{RecordLog, RecordWrites};
        let dir = tempfile::tempdir().unwrap();
        let names = sixteen_names();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 60_000;
        let want = |store: &Store, entity: &str, as_of: u64| {
            let features: Vec<(String, Option<u64>)> =
                names.iter().map(|n| (n.clone(), None)).collect();
            store
                .get_features(&[entity.to_string()], &features, as_of)
                .unwrap()
                .remove(0)
        };
        let expect = |t: u64| {
            (0..16)
                .map(|i| Some((t, FeatureValue::Number(t as f64 + i as f64 / 8.0))))
                .collect::<Vec<_>>()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            for b in 0..3u64 {
                let mut w = RecordWrites::default();
                for e in ["u1", "u2"] {
                    sixteen(&mut w, &names, e, t0 + b * 1_000);
                }
                store.commit(w, false).unwrap();
            }
            // The latest values, merged: the run's first compact row as it is, flagged, 8 + 137
            // bytes; its newer rows are in the history, and the newest in memory (`runs.rs`).
            let latest = |entity: &str| {
                store
                    .db
                    .get_cf(
                        store.cf(cf::FEATURES_LATEST),
                        keys::feature_entity_key(entity),
                    )
                    .unwrap()
                    .unwrap()
            };
            let u2 = latest("u2");
            assert_eq!((u2.len(), u2[8]), (8 + 9 + 16 * 8, RUN_ROW));
            assert_eq!(keys::be64(&u2[..8]), t0);
            assert_eq!(want(&store, "u2", u64::MAX), expect(t0 + 2_000));
            let mut w = RecordWrites::default();
            w.add_features(
                "u1",
                t0 + 5_000,
                [("x[0]", &FeatureValue::Text("hi".into()))],
            );
            store.commit(w, false).unwrap();
            // A named row beside compact ones: layered, for reads to resolve.
            assert_eq!(latest("u1")[8], LAYERED);

            let rows = stored_rows(&store, "u1");
            assert_eq!(rows.len(), 4);
            assert_eq!(rows[0][0], 0x0a, "a row with text is named");
            for row in &rows[1..] {
                assert_eq!(row[0], COMPACT_ROW);
                assert_eq!(row.len(), 9 + 16 * 8);
            }
            let id = u64::from_le_bytes(rows[1][1..9].try_into().unwrap());
            let table = store
                .db
                .get_cf(store.cf(cf::FEATURES), keys::feature_table_key(id))
                .unwrap()
                .expect("the table is stored");
            assert_eq!(StoredNames::decode(&table[..]).unwrap().names.len(), 16);
            // Looking back past the text row reads compact rows (memtable).
            assert_eq!(want(&store, "u1", t0 + 1_500), expect(t0 + 1_000));
            store.flush_features().unwrap();
            assert_eq!(want(&store, "u2", t0 + 999), expect(t0));
        }
        // A restart: the table is read from the store.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(want(&store, "u1", t0 + 2_500), expect(t0 + 2_000));
        assert_eq!(want(&store, "u2", t0 + 1_000), expect(t0 + 1_000));
        let text = want(&store, "u1", t0 + 9_000);
        assert_eq!(text[0], Some((t0 + 5_000, FeatureValue::Text("hi".into()))));
        assert_eq!(
            text[1],
            Some((
                t0 + 2_000,
                FeatureValue::Number((t0 + 2_000) as f64 + 0.125)
            ))
        );
    }

    /// Should a table's id already hold another table, that table is left as it is and the rows
    /// are stored named: both read back.
    #[test]
    fn a_table_id_taken_by_another_table_leaves_rows_named() {
        use crate::storage::{RecordLog, RecordWrites};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names = sixteen_names();
        let table = laid_out_table(&names);
        let other = StoredNames {
            names: vec!["other".into()],
        }
        .encode_to_vec();
        store
            .db
            .put_cf(store.cf(cf::FEATURES), table.key, &other)
            .unwrap();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 60_000;
        for t in [t0, t0 + 1_000] {
            let mut w = RecordWrites::default();
            sixteen(&mut w, &names, "u", t);
            store.commit(w, false).unwrap();
        }
        let rows = stored_rows(&store, "u");
        assert!(rows.iter().all(|r| r[0] == 0x0a), "named rows");
        let stored = store
            .db
            .get_cf(store.cf(cf::FEATURES), table.key)
            .unwrap()
            .unwrap();
        assert_eq!(stored, other, "the other table is untouched");
        let got = store
            .get_features(&["u".to_string()], &[("x[3]".to_string(), None)], t0 + 500)
            .unwrap();
        assert_eq!(
            got[0][0],
            Some((t0, FeatureValue::Number(t0 as f64 + 0.375)))
        );
    }

    /// Retention drops expired rows but keeps the tables of names that newer rows refer to.
    #[test]
    fn retention_keeps_tables_of_names() {
        use crate::storage::{RecordLog, RecordWrites};
        let dir = tempfile::tempdir().unwrap();
        let (store, clock) = Store::with_minute_of_features(dir.path());
        let now = crate::clock::Clock::now_ms(&*clock);
        let names = sixteen_names();
        let mut w = RecordWrites::default();
        sixteen(&mut w, &names, "old", now - 1_000);
        store.commit(w, false).unwrap();
        let table = laid_out_table(&names);
        clock.advance(120_000);
        store.compact_expired();
        assert!(
            stored_rows(&store, "old").is_empty(),
            "the expired row is gone"
        );
        assert!(store
            .db
            .get_cf(store.cf(cf::FEATURES), table.key)
            .unwrap()
            .is_some());
    }

    /// History reads walk an entity's rows newest first: rows without the feature are passed
    /// over, rows of the same millisecond are both kept, and a TTL ends the walk.
    #[test]
    fn point_in_time_reads_walk_the_rows_of_an_entity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = crate::clock::Clock::now_ms(&crate::clock::SystemClock) - 60_000;
        let n = |x: f64| FeatureValue::Number(x);
        let mut b = store.record_batch();
        b.add_features("e", t0, [("a", &n(1.0)), ("b", &n(10.0))]);
        b.add_features("e", t0 + 1_000, [("a", &n(2.0))]);
        b.add_features("e", t0 + 1_000, [("c", &n(7.0))]);
        b.add_features("e", t0 + 2_000, [("a", &n(3.0)), ("b", &n(30.0))]);
        // Another entity whose id extends "e" must not be read as "e".
        b.add_features("e2", t0 + 1_500, [("b", &n(99.0))]);
        b.commit(false).unwrap();
        let feats = |names: &[(&str, Option<u64>)]| -> Vec<(String, Option<u64>)> {
            names.iter().map(|(f, t)| (f.to_string(), *t)).collect()
        };
        let get = |as_of: u64, names: &[(&str, Option<u64>)]| {
            store
                .get_features(&["e".to_string()], &feats(names), as_of)
                .unwrap()
                .remove(0)
                .into_iter()
                .map(|c| c.map(|(t, v)| (t - t0, v)))
                .collect::<Vec<_>>()
        };
        let all = [("a", None), ("b", None), ("c", None)];
        assert_eq!(
            get(t0 + 1_500, &all),
            vec![
                Some((1_000, n(2.0))),
                Some((0, n(10.0))),
                Some((1_000, n(7.0)))
            ],
            "b is only in the oldest row; both rows of t0+1000 count"
        );
        assert_eq!(
            get(t0 + 2_000, &all),
            vec![
                Some((2_000, n(3.0))),
                Some((2_000, n(30.0))),
                Some((1_000, n(7.0)))
            ]
        );
        assert_eq!(get(t0 - 1, &all), vec![None, None, None]);
        // With a 1 s TTL, b's value of t0 has expired at t0+1500 although it is the latest then.
        assert_eq!(
            get(t0 + 1_500, &[("b", Some(1_000)), ("a", Some(1_000))]),
            vec![None, Some((1_000, n(2.0)))]
        );
    }
}
