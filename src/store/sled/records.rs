//! Where a queue's records live in sled: in the one `queues` tree, under a prefix of the
//! queue's name, so that a new connection adds keys instead of a tree (sled keeps its list of
//! trees in one page and writes all of it again for each new tree); or in a tree of the
//! queue's own, for queues made before, which stay where they are.

use std::ops::{Bound, RangeBounds};

use sled::IVec;

/// One queue's records: the keys the queue code uses, stored under the queue's prefix.
#[derive(Clone)]
pub(super) struct Records {
    tree: sled::Tree,
    /// The queue's name and a NUL (names never hold one), or empty in a tree of its own.
    prefix: Vec<u8>,
}

impl Records {
    /// A queue in a tree of its own.
    pub(super) fn own(tree: sled::Tree) -> Records {
        Records {
            tree,
            prefix: Vec::new(),
        }
    }

    /// Queue `name` in the shared tree.
    pub(super) fn shared(tree: sled::Tree, name: &str) -> Records {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        Records { tree, prefix }
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.get(self.full(key.as_ref()))
    }

    pub(super) fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> sled::Result<Option<IVec>> {
        self.tree.insert(self.full(key.as_ref()), value)
    }

    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.remove(self.full(key.as_ref()))
    }

    /// The records whose keys fall in `range`, in key order, keys without the prefix.
    pub(super) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        let bound = |b: Bound<&K>| match b {
            Bound::Included(k) => Bound::Included(self.full(k.as_ref())),
            Bound::Excluded(k) => Bound::Excluded(self.full(k.as_ref())),
            Bound::Unbounded => Bound::Unbounded,
        };
        let start = match bound(range.start_bound()) {
            Bound::Unbounded if !self.prefix.is_empty() => Bound::Included(self.prefix.clone()),
            b => b,
        };
        let end = match bound(range.end_bound()) {
            Bound::Unbounded if !self.prefix.is_empty() => Bound::Excluded(self.after_prefix()),
            b => b,
        };
        Iter {
            inner: self.tree.range::<Vec<u8>, _>((start, end)),
            skip: self.prefix.len(),
        }
    }

    /// The records whose keys start with `prefix`, in key order, keys without the queue's prefix.
    pub(super) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        Iter {
            inner: self.tree.scan_prefix(self.full(prefix.as_ref())),
            skip: self.prefix.len(),
        }
    }

    /// The first key after every key of this queue (its prefix's last byte, the NUL, plus one).
    fn after_prefix(&self) -> Vec<u8> {
        let mut end = self.prefix.clone();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    }

    /// A batch of writes to this queue, applied at once by [`Records::apply_batch`].
    pub(super) fn batch(&self) -> Batch {
        Batch {
            batch: sled::Batch::default(),
            prefix: self.prefix.clone(),
        }
    }

    pub(super) fn apply_batch(&self, batch: Batch) -> sled::Result<()> {
        self.tree.apply_batch(batch.batch)
    }
}

/// Writes to one queue, applied atomically.
pub(super) struct Batch {
    batch: sled::Batch,
    prefix: Vec<u8>,
}

impl Batch {
    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(key);
        k
    }

    pub(super) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<IVec>) {
        let k = self.full(key.as_ref());
        self.batch.insert(k, value);
    }

    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) {
        let k = self.full(key.as_ref());
        self.batch.remove(k);
    }
}

/// Records in key order, keys without the queue's prefix.
pub(super) struct Iter {
    inner: sled::Iter,
    skip: usize,
}

impl Iter {
    fn strip(&self, item: sled::Result<(IVec, IVec)>) -> sled::Result<(IVec, IVec)> {
        let (k, v) = item?;
        if self.skip == 0 {
            return Ok((k, v));
        }
        Ok((IVec::from(&k[self.skip..]), v))
    }

    /// The keys alone.
    pub(super) fn keys(self) -> impl DoubleEndedIterator<Item = sled::Result<IVec>> {
        self.map(|item| item.map(|(k, _)| k))
    }
}

impl Iterator for Iter {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.next()?;
        Some(self.strip(item))
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        let item = self.inner.next_back()?;
        Some(self.strip(item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_in_the_shared_tree_see_only_their_own_records() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("queues").unwrap();
        let (a, ab) = (Records::shared(tree.clone(), "a"), Records::shared(tree.clone(), "ab"));
        for (r, tag) in [(&a, b"a"), (&ab, b"b")] {
            for k in [[b'm', 1], [b'm', 2], [b'm', 3], [b'c', 0]] {
                r.insert(k, &tag[..]).unwrap();
            }
        }
        let keys = |it: Iter| it.keys().map(|k| k.unwrap().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            keys(a.scan_prefix([b'm'])),
            [vec![b'm', 1], vec![b'm', 2], vec![b'm', 3]]
        );
        assert_eq!(keys(ab.range([b'm', 2]..)), [vec![b'm', 2], vec![b'm', 3]]);
        assert_eq!(keys(a.range(..[b'm', 2])), [vec![b'c', 0], vec![b'm', 1]]);
        assert_eq!(keys(a.range::<[u8; 2], _>(..)).len(), 4);
        let (last, _) = ab.scan_prefix([b'm']).next_back().unwrap().unwrap();
        assert_eq!(&last[..], [b'm', 3]);
        let mut batch = a.batch();
        batch.remove([b'm', 1]);
        batch.insert([b'm', 9], &b"a"[..]);
        a.apply_batch(batch).unwrap();
        assert_eq!(a.get([b'm', 1]).unwrap(), None);
        assert_eq!(ab.get([b'm', 1]).unwrap().as_deref(), Some(&b"b"[..]));
        assert_eq!(a.remove([b'm', 9]).unwrap().as_deref(), Some(&b"a"[..]));
        // A queue in its own tree reads and writes its keys as they are.
        let own = Records::own(db.open_tree("queue/old").unwrap());
        own.insert([b'm', 1], &b"o"[..]).unwrap();
        assert_eq!(keys(own.range::<[u8; 2], _>(..)), [vec![b'm', 1]]);
    }
}
