//! Drift state in the `references` family: each model's reference sample, and small JSON records
//! of drift state, concept baselines and retraining policies.
//!
//! | key | value |
//! |---|---|
//! | model | JSON reference header (features, kinds, categories, row counts, source) |
//! | model ∅ `n` ∅ feature | sorted f64 LE values of a numeric reference feature |
//! | model ∅ `s` ∅ name | JSON state record (`drift`, `retrain`, `concept/<version>`) |

use rocksdb::{IteratorMode, WriteBatch};

use super::{cf, Store, StoreError};
use crate::drift::Reference;
use crate::storage::reference;

fn sub_key(model: &str, kind: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + name.len() + 3);
    k.extend_from_slice(model.as_bytes());
    k.push(0);
    k.push(kind);
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

impl Store {
    /// Replaces a model's reference (synced), and with it the model's drift state: a new
    /// reference starts with no episode, in the same write.
    pub fn put_reference(&self, model: &str, r: &Reference) -> Result<(), StoreError> {
        let fam = self.cf(cf::REFERENCES);
        let mut batch = WriteBatch::default();
        batch.delete_cf(fam, sub_key(model, b's', "drift"));
        // Drop the previous numeric arrays: model ∅ n ∅ …
        let mut from = model.as_bytes().to_vec();
        from.extend_from_slice(&[0, b'n', 0]);
        let mut to = from.clone();
        *to.last_mut().expect("non-empty") = 1;
        batch.delete_range_cf(fam, &from, &to);
        let parts = reference::encode(r);
        batch.put_cf(fam, model.as_bytes(), parts.header);
        for (name, bytes) in parts.numeric {
            batch.put_cf(fam, sub_key(model, b'n', &name), bytes);
        }
        self.write(batch, true)
    }

    /// A model's reference.
    pub fn load_reference(&self, model: &str) -> Result<Option<Reference>, StoreError> {
        let fam = self.cf(cf::REFERENCES);
        let Some(h) = self.db.get_cf(fam, model.as_bytes())? else {
            return Ok(None);
        };
        reference::decode(model, cf::REFERENCES, &h, |name| {
            Ok(self.db.get_cf(fam, sub_key(model, b'n', name))?)
        })
        .map(Some)
    }

    /// The models that have a reference.
    pub fn reference_models(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf::REFERENCES), IteratorMode::Start)
        {
            let (k, _) = item?;
            if !k.contains(&0) {
                out.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        Ok(out)
    }
}

impl crate::storage::DriftStore for Store {
    fn put_reference(&self, model: &str, r: &Reference) -> Result<(), StoreError> {
        Store::put_reference(self, model, r)
    }

    fn load_reference(&self, model: &str) -> Result<Option<Reference>, StoreError> {
        Store::load_reference(self, model)
    }

    fn reference_models(&self) -> Result<Vec<String>, StoreError> {
        Store::reference_models(self)
    }

    fn put_model_state(&self, model: &str, name: &str, json: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(cf::REFERENCES), sub_key(model, b's', name), json);
        self.write(batch, true)
    }

    fn get_model_state(&self, model: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(cf::REFERENCES), sub_key(model, b's', name))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::FeatureValue;
    use crate::storage::DriftStateExt;

    #[test]
    fn references_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names = vec!["x".to_string(), "c".to_string()];
        let rows = |k: f64| {
            (0..10)
                .map(|i| {
                    vec![
                        FeatureValue::Number(i as f64 * k),
                        FeatureValue::Text(format!("v{}", i % 2)),
                    ]
                })
                .collect::<Vec<_>>()
        };
        let r = crate::drift::build_reference(&names, rows(1.0), &[], 100, "uploaded", 5).unwrap();
        store.put_reference("m", &r).unwrap();
        assert_eq!(store.load_reference("m").unwrap().unwrap(), r);
        let r2 = crate::drift::build_reference(&names, rows(2.0), &[], 100, "captured", 6).unwrap();
        store.put_reference("m", &r2).unwrap();
        assert_eq!(store.load_reference("m").unwrap().unwrap(), r2);
        assert_eq!(store.reference_models().unwrap(), vec!["m".to_string()]);
        store.put_state("m", "drift", &vec![1, 2]).unwrap();
        assert_eq!(
            store.get_state::<Vec<i32>>("m", "drift").unwrap(),
            Some(vec![1, 2])
        );
        store.put_state("m", "retrain", &vec![3]).unwrap();
        store.put_reference("m", &r).unwrap();
        assert_eq!(
            store.get_state::<Vec<i32>>("m", "drift").unwrap(),
            None,
            "a new reference starts without the old drift state"
        );
        assert_eq!(
            store.get_state::<Vec<i32>>("m", "retrain").unwrap(),
            Some(vec![3]),
            "and keeps the retraining policy"
        );
        assert_eq!(
            store.reference_models().unwrap(),
            vec!["m".to_string()],
            "state records are not models"
        );
        assert!(store.load_reference("other").unwrap().is_none());
    }
}
