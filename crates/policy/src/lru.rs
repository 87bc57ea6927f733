//! A map with a fixed maximum number of entries that evicts the least recently used one
//! to make room. O(1) per operation: a hash index into a slab of nodes that form a
//! doubly linked list in recency order.

use std::collections::HashMap;
use std::hash::Hash;

use slab::Slab;

/// Marks the end of the recency list.
const NIL: usize = usize::MAX;

#[derive(Debug)]
struct Node<K, V> {
    key: K,
    value: V,
    /// The next more recently used node, or `NIL` for the head.
    newer: usize,
    /// The next less recently used node, or `NIL` for the tail.
    older: usize,
}

#[derive(Debug)]
pub(crate) struct LruMap<K, V> {
    /// Key to slab index; exactly the keys of `nodes`.
    index: HashMap<K, usize>,
    /// Never more than `capacity` entries; the slab only grows up to that.
    nodes: Slab<Node<K, V>>,
    /// Most recently used node, `NIL` when empty.
    head: usize,
    /// Least recently used node, `NIL` when empty.
    tail: usize,
    /// At least 1.
    capacity: usize,
    /// Entries pushed out by [`LruMap::entry`] to make room.
    evictions: u64,
}

impl<K: Eq + Hash + Clone, V> LruMap<K, V> {
    /// `capacity` is at least 1 (checked by the configurations that build this).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            index: HashMap::new(),
            nodes: Slab::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.max(1),
            evictions: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The value for `key`, without changing its recency.
    pub(crate) fn peek(&self, key: &K) -> Option<&V> {
        let slot = *self.index.get(key)?;
        self.nodes.get(slot).map(|node| &node.value)
    }

    /// The value for `key`, created by `make` if absent, marked most recently used. When
    /// the map is full, a new key first evicts the least recently used entry: the map
    /// never grows past its capacity and never refuses a key.
    pub(crate) fn entry(&mut self, key: &K, make: impl FnOnce() -> V) -> &mut V {
        let slot = match self.index.get(key) {
            Some(&slot) => {
                self.move_to_head(slot);
                slot
            }
            None => {
                if self.nodes.len() >= self.capacity {
                    self.pop_tail();
                    self.evictions = self.evictions.saturating_add(1);
                }
                let slot = self.nodes.insert(Node {
                    key: key.clone(),
                    value: make(),
                    newer: NIL,
                    older: NIL,
                });
                self.index.insert(key.clone(), slot);
                self.link_at_head(slot);
                slot
            }
        };
        // Invariant: `slot` was either found through `index`, which holds exactly the
        // occupied slots of `nodes` (see `check_invariants`), or was just returned by
        // `nodes.insert`; so the slot is occupied and the index cannot panic.
        &mut self.nodes[slot].value
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.index.remove(key)?;
        self.unlink(slot);
        self.nodes.try_remove(slot).map(|node| node.value)
    }

    /// Removes least recently used entries while `idle` says they hold nothing, at most
    /// `max_entries` of them. Returns how many were removed.
    pub(crate) fn remove_idle_tail(
        &mut self,
        max_entries: usize,
        idle: impl Fn(&V) -> bool,
    ) -> usize {
        let mut removed = 0;
        while removed < max_entries {
            let Some(node) = self.nodes.get(self.tail) else {
                break;
            };
            if !idle(&node.value) {
                break;
            }
            self.pop_tail();
            removed += 1;
        }
        removed
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.nodes.iter().map(|(_, node)| &node.value)
    }

    fn pop_tail(&mut self) {
        let slot = self.tail;
        if slot == NIL {
            return;
        }
        self.unlink(slot);
        if let Some(node) = self.nodes.try_remove(slot) {
            self.index.remove(&node.key);
        }
    }

    fn move_to_head(&mut self, slot: usize) {
        if self.head != slot {
            self.unlink(slot);
            self.link_at_head(slot);
        }
    }

    fn unlink(&mut self, slot: usize) {
        let Some(node) = self.nodes.get(slot) else {
            return;
        };
        let (newer, older) = (node.newer, node.older);
        match self.nodes.get_mut(newer) {
            Some(n) => n.older = older,
            None => self.head = older,
        }
        match self.nodes.get_mut(older) {
            Some(n) => n.newer = newer,
            None => self.tail = newer,
        }
        if let Some(node) = self.nodes.get_mut(slot) {
            node.newer = NIL;
            node.older = NIL;
        }
    }

    fn link_at_head(&mut self, slot: usize) {
        let old_head = self.head;
        if let Some(node) = self.nodes.get_mut(slot) {
            node.newer = NIL;
            node.older = old_head;
        }
        match self.nodes.get_mut(old_head) {
            Some(n) => n.newer = slot,
            None => self.tail = slot,
        }
        self.head = slot;
    }

    /// Checks the list, the index and the capacity against each other.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        if self.nodes.len() > self.capacity {
            return Err(format!(
                "{} entries, capacity {}",
                self.nodes.len(),
                self.capacity
            ));
        }
        if self.index.len() != self.nodes.len() {
            return Err(format!(
                "index has {} keys, slab {} nodes",
                self.index.len(),
                self.nodes.len()
            ));
        }
        let mut seen = 0;
        let mut newer = NIL;
        let mut slot = self.head;
        while slot != NIL {
            let Some(node) = self.nodes.get(slot) else {
                return Err(format!("list reaches vacant slot {slot}"));
            };
            if node.newer != newer {
                return Err(format!("slot {slot} has a wrong back link"));
            }
            if self.index.get(&node.key) != Some(&slot) {
                return Err(format!("slot {slot} is not indexed under its key"));
            }
            seen += 1;
            if seen > self.nodes.len() {
                return Err("recency list has a cycle".to_owned());
            }
            newer = slot;
            slot = node.older;
        }
        if newer != self.tail {
            return Err("tail is not the end of the list".to_owned());
        }
        if seen != self.nodes.len() {
            return Err(format!("list holds {seen} of {} nodes", self.nodes.len()));
        }
        Ok(())
    }
}
