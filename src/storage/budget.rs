//! A map whose values are counted in bytes, for the in-memory caches of verified data (piece
//! CVs, small files): each cache decides how to stay within its budget, this keeps the count.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

use bytes::Bytes;

/// A value's size in bytes, as a cache counts it.
pub trait Weighed {
    fn weight(&self) -> usize;
}

impl Weighed for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// A map that knows how many bytes its values hold together.
pub struct Budgeted<K, V> {
    map: HashMap<K, V>,
    held: usize,
}

impl<K, V> Default for Budgeted<K, V> {
    fn default() -> Self {
        Budgeted {
            map: HashMap::new(),
            held: 0,
        }
    }
}

impl<K: Hash + Eq, V: Weighed> Budgeted<K, V> {
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(key)
    }

    /// Adds or replaces the value under `key`.
    pub fn insert(&mut self, key: K, value: V) {
        self.held += value.weight();
        if let Some(old) = self.map.insert(key, value) {
            self.held -= old.weight();
        }
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let old = self.map.remove(key)?;
        self.held -= old.weight();
        Some(old)
    }

    /// Removes the entries whose value matches `stale` and returns their values.
    pub fn take_where(&mut self, mut stale: impl FnMut(&V) -> bool) -> Vec<V> {
        let taken: Vec<V> = self
            .map
            .extract_if(|_, v| stale(v))
            .map(|(_, v)| v)
            .collect();
        self.held -= taken.iter().map(Weighed::weight).sum::<usize>();
        taken
    }

    /// Bytes held, and entries.
    pub fn usage(&self) -> (usize, usize) {
        (self.held, self.map.len())
    }
}

impl<K: Hash + Eq + Clone, V: Weighed> Budgeted<K, V> {
    /// Drops entries (any) until `incoming` more bytes fit within `budget`.
    pub fn make_room(&mut self, incoming: usize, budget: usize) {
        while self.held + incoming > budget {
            let Some(key) = self.map.keys().next().cloned() else {
                break;
            };
            self.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_where_removes_and_uncounts_what_matches() {
        let mut m: Budgeted<String, Bytes> = Budgeted::default();
        for (k, v) in [("a", &b"1"[..]), ("b", b"22"), ("c", b"333")] {
            m.insert(k.into(), Bytes::from_static(v));
        }
        let mut taken = m.take_where(|v| v.len() >= 2);
        taken.sort();
        assert_eq!(
            taken,
            [Bytes::from_static(b"22"), Bytes::from_static(b"333")]
        );
        assert_eq!(m.usage(), (1, 1));
        assert!(m.get("a").is_some());
    }

    #[test]
    fn the_count_follows_inserts_replacements_and_removals() {
        let mut m: Budgeted<String, Bytes> = Budgeted::default();
        m.insert("a".into(), Bytes::from_static(b"1234"));
        m.insert("b".into(), Bytes::from_static(b"56"));
        assert_eq!(m.usage(), (6, 2));
        m.insert("a".into(), Bytes::from_static(b"7"));
        assert_eq!(m.usage(), (3, 2), "a replaced value is no longer counted");
        assert_eq!(m.remove("b").as_deref(), Some(&b"56"[..]));
        assert_eq!(m.remove("b"), None);
        assert_eq!(m.usage(), (1, 1));
        m.insert("c".into(), Bytes::from_static(b"89"));
        m.make_room(2, 4);
        assert!(m.usage().0 + 2 <= 4, "{:?}", m.usage());
        m.make_room(10, 4);
        assert_eq!(
            m.usage(),
            (0, 0),
            "everything goes when even that is not enough"
        );
    }
}
