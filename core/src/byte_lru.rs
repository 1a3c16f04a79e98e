//! A map that drops its least recently used entries to stay within a byte budget.
//!
//! The server's narinfo answers and sent chunk frames and the mount's decompressed chunks are
//! all kept this way: entries of very different sizes, where a count of entries bounds nothing.

use std::hash::Hash;

/// Entries by key, least recently used dropped first, their weights summed within a limit.
/// Not locked: its owner decides what a lookup and an insert share.
pub struct ByteLru<K: Hash + Eq, V> {
    entries: lru::LruCache<K, V>,
    bytes: usize,
    limit: usize,
    weigh: fn(&V) -> usize,
}

impl<K: Hash + Eq, V> ByteLru<K, V> {
    /// Keeps entries while their weights (`weigh`, in bytes, counting any bookkeeping the
    /// owner wants counted) sum to at most `limit`; 0 keeps none.
    pub fn new(limit: usize, weigh: fn(&V) -> usize) -> Self {
        ByteLru { entries: lru::LruCache::unbounded(), bytes: 0, limit, weigh }
    }

    /// The entry of `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// Whether `key` has an entry, leaving its place in the order as it is.
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains(key)
    }

    /// Keeps `value` under `key`, replacing what was there, and drops the least recently used
    /// entries until the weights fit. A value heavier than the whole limit is not kept (and
    /// what `key` held is dropped, so no stale value outlives a newer one); returns whether
    /// `value` was kept.
    pub fn put(&mut self, key: K, value: V) -> bool {
        let weight = (self.weigh)(&value);
        if weight > self.limit {
            self.remove(&key);
            return false;
        }
        self.bytes += weight;
        if let Some(old) = self.entries.put(key, value) {
            self.bytes -= (self.weigh)(&old);
        }
        while self.bytes > self.limit {
            match self.entries.pop_lru() {
                Some((_, old)) => self.bytes -= (self.weigh)(&old),
                None => break,
            }
        }
        true
    }

    /// Drops the entry of `key`, returning it.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let old = self.entries.pop(key)?;
        self.bytes -= (self.weigh)(&old);
        Some(old)
    }

    /// Drops every entry for which `keep` says no.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool)
    where
        K: Clone,
    {
        let dropped: Vec<K> = self.entries.iter().filter(|(k, v)| !keep(k, v)).map(|(k, _)| k.clone()).collect();
        for key in dropped {
            self.remove(&key);
        }
    }

    /// The entries, most recently used first, leaving the order as it is.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter()
    }

    /// The summed weight of the entries kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many entries are kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Hash + Eq, V> std::fmt::Debug for ByteLru<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteLru").field("entries", &self.entries.len()).field("bytes", &self.bytes).field("limit", &self.limit).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lru(limit: usize) -> ByteLru<u8, Vec<u8>> {
        ByteLru::new(limit, |v| v.len() + 10)
    }

    #[test]
    fn drops_the_least_recently_used_to_stay_within_the_limit() {
        let mut kept = lru(4 * 110);
        for n in 0..4 {
            assert!(kept.put(n, vec![n; 100]));
        }
        assert_eq!(kept.bytes(), 4 * 110);
        // 0 is used again, so 1 is the least recently used when 4 comes.
        assert!(kept.get(&0).is_some());
        kept.put(4, vec![4; 100]);
        assert!(kept.get(&1).is_none());
        assert!(kept.get(&0).is_some() && kept.get(&4).is_some());
        assert_eq!((kept.len(), kept.bytes()), (4, 4 * 110));
        // A heavier entry pushes out as many as it needs.
        kept.put(5, vec![5; 210]);
        assert_eq!(kept.bytes(), 2 * 110 + 220);
        assert!(kept.bytes() <= 4 * 110);
    }

    #[test]
    fn replacing_counts_the_new_weight_only() {
        let mut kept = lru(1000);
        kept.put(1, vec![1; 100]);
        kept.put(1, vec![1; 300]);
        assert_eq!((kept.len(), kept.bytes()), (1, 310));
        assert_eq!(kept.remove(&1).map(|v| v.len()), Some(300));
        assert_eq!((kept.len(), kept.bytes()), (0, 0));
    }

    #[test]
    fn too_heavy_a_value_is_not_kept_and_drops_the_old_one() {
        let mut kept = lru(100);
        assert!(kept.put(1, vec![1; 50]));
        assert!(!kept.put(1, vec![1; 200]));
        assert!(kept.get(&1).is_none());
        assert_eq!(kept.bytes(), 0);
        let mut off = lru(0);
        assert!(!off.put(2, vec![]));
        assert!(off.is_empty());
    }

    #[test]
    fn retain_keeps_the_count_right() {
        let mut kept = lru(10_000);
        for n in 0..10 {
            kept.put(n, vec![n; usize::from(n)]);
        }
        kept.retain(|k, _| k % 2 == 0);
        assert_eq!(kept.len(), 5);
        assert_eq!(kept.bytes(), [0, 2, 4, 6, 8].iter().map(|n| n + 10).sum::<usize>());
        assert_eq!(kept.bytes(), kept.iter().map(|(_, v)| v.len() + 10).sum::<usize>());
    }
}
