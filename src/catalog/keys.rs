//! The key table: every API key by hash, compact for a million keys, cheap to copy and to change.
//!
//! A persistent map (HAMT) alone costs about twice the memory of a flat hash table at a million keys (409 MB
//! against 194 MB for the same entries, measured). So the table is a flat `HashMap` shared by every snapshot
//! (`base`), plus a small persistent map of the changes made since it was built (`delta`). A copy shares
//! both; a change edits the delta in O(log d). When the delta outgrows an eighth of the base, the next change
//! folds it into a new base (O(n), amortized over n/8 changes): a single revoke never rebuilds the table.

use std::collections::HashMap;
use std::sync::Arc;

use super::Key;
use crate::identity::api_key::KeyHash;

/// The delta is folded into the base once it holds more than this many entries and an eighth of the base.
const FOLD_AT_LEAST: usize = 4_096;

/// Every key by hash; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    base: Arc<HashMap<KeyHash, Key>>,
    /// Changes since `base` was built: `Some` adds or replaces, `None` removes a key of `base`.
    delta: imbl::HashMap<KeyHash, Option<Key>>,
    len: usize,
}

impl KeyTable {
    /// A table holding `keys` (the last of equal hashes wins).
    pub fn from_keys(keys: impl IntoIterator<Item = Key>) -> KeyTable {
        let base: HashMap<KeyHash, Key> = keys.into_iter().map(|k| (k.hash, k)).collect();
        KeyTable {
            len: base.len(),
            base: Arc::new(base),
            delta: imbl::HashMap::new(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key with this hash.
    pub fn get(&self, hash: &KeyHash) -> Option<&Key> {
        match self.delta.get(hash) {
            Some(change) => change.as_ref(),
            None => self.base.get(hash),
        }
    }

    /// Adds or replaces a key; `true` when its hash was new.
    pub fn insert(&mut self, key: Key) -> bool {
        let new = self.get(&key.hash).is_none();
        self.delta.insert(key.hash, Some(key));
        if new {
            self.len += 1;
        }
        self.fold_if_large();
        new
    }

    /// Adds or replaces every key of `keys`, folding at most once.
    pub fn extend(&mut self, keys: impl IntoIterator<Item = Key>) {
        for key in keys {
            if self.get(&key.hash).is_none() {
                self.len += 1;
            }
            self.delta.insert(key.hash, Some(key));
        }
        self.fold_if_large();
    }

    /// Removes the key with this hash.
    pub fn remove(&mut self, hash: &KeyHash) {
        if self.get(hash).is_none() {
            return;
        }
        self.len -= 1;
        if self.base.contains_key(hash) {
            self.delta.insert(*hash, None);
        } else {
            self.delta.remove(hash);
        }
        self.fold_if_large();
    }

    /// Every key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Key> {
        let delta = &self.delta;
        self.base
            .values()
            .filter(move |k| !delta.contains_key(&k.hash))
            .chain(self.delta.values().filter_map(Option::as_ref))
    }

    fn fold_if_large(&mut self) {
        if self.delta.len() > FOLD_AT_LEAST.max(self.base.len() / 8) {
            let mut base = HashMap::clone(&self.base);
            for (hash, change) in &self.delta {
                match change {
                    Some(key) => base.insert(*hash, *key),
                    None => base.remove(hash),
                };
            }
            self.base = Arc::new(base);
            self.delta = imbl::HashMap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Status;

    fn key(i: u32, status: Status) -> Key {
        Key {
            hash: KeyHash::of(&i.to_string()),
            app: i as usize,
            status,
            expires_at: None,
        }
    }

    #[test]
    fn copies_do_not_see_later_changes_and_folding_keeps_every_key() {
        let mut table = KeyTable::from_keys((0..10_000).map(|i| key(i, Status::Approved)));
        let copy = table.clone();
        table.insert(key(7, Status::Revoked));
        table.remove(&KeyHash::of("8"));
        assert!(table.insert(key(20_000, Status::Approved)));
        assert_eq!(
            table.get(&KeyHash::of("7")).map(|k| k.status),
            Some(Status::Revoked)
        );
        assert!(table.get(&KeyHash::of("8")).is_none());
        assert_eq!(table.len(), 10_000);
        assert_eq!(
            copy.get(&KeyHash::of("7")).map(|k| k.status),
            Some(Status::Approved)
        );
        assert!(copy.get(&KeyHash::of("8")).is_some());
        assert_eq!(copy.iter().count(), 10_000);

        // Enough changes to fold the delta into a new base several times over.
        for i in 0..30_000 {
            table.insert(key(i, Status::Revoked));
        }
        for i in 0..5_000 {
            table.remove(&KeyHash::of(&i.to_string()));
        }
        assert_eq!(table.len(), 25_000);
        assert_eq!(table.iter().count(), 25_000);
        assert!(table.get(&KeyHash::of("4999")).is_none());
        assert_eq!(
            table.get(&KeyHash::of("5000")).map(|k| k.status),
            Some(Status::Revoked)
        );
        assert!(table.delta.len() <= FOLD_AT_LEAST.max(table.base.len() / 8));
        table.remove(&KeyHash::of("nope"));
        assert_eq!(table.len(), 25_000);
    }
}
