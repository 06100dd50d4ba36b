//! Retention of the record families: the oldest time still kept (reads honour it), the time of a
//! stored entry (the compaction filter drops expired ones), and a compaction that drops them now.

use std::time::Duration;

use super::{cf, keys, Store};

impl Store {
    /// The oldest time still retained, by this store's clock.
    pub(super) fn cutoff(&self, retention: Duration) -> u64 {
        crate::storage::cutoff(self.clock.now_ms(), retention)
    }
}

/// The time a retained record was written, read from its key or value; `None` when the family is
/// kept forever or the entry is malformed (kept).
pub(super) fn record_time(family: &str, key: &[u8], value: &[u8]) -> Option<u64> {
    match family {
        cf::PREDICTIONS | cf::OUTCOMES | cf::FEATURES_LATEST => {
            keys::split_timed_value(cf::PREDICTIONS, value)
                .ok()
                .map(|(t, _)| t)
        }
        // A group's key holds its newest record's time: it expires with the newest.
        cf::PREDICTION_INDEX => keys::prediction_index_time(key).ok().map(|(t, _)| t),
        cf::OUTCOME_INDEX | cf::SHADOW_LOG => keys::outcome_index_time(key).ok(),
        cf::FEATURES => keys::feature_row_time(key).ok(),
        _ => None,
    }
}

impl Store {
    /// Runs a manual compaction of every retained family, which drops what retention has expired.
    /// RocksDB also does this on its own (periodic compaction); this makes it happen now.
    pub fn compact_expired(&self) {
        for name in [
            cf::PREDICTIONS,
            cf::PREDICTION_INDEX,
            cf::SHADOW_LOG,
            cf::OUTCOMES,
            cf::OUTCOME_INDEX,
            cf::FEATURES,
            cf::FEATURES_LATEST,
        ] {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}
