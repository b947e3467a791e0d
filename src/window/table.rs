//! The segment table: each partition's segments (an open-addressed index over slots), their
//! names and the partitions this engine owns.

use super::*;

/// Equality of two short byte strings of equal length, eight bytes at a time: keys and
/// measurement names are compared on every event, and a libc call per compare showed in
/// profiles.
#[inline]
pub(super) fn short_eq(a: &[u8], b: &[u8]) -> bool {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len();
    let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    if n < 8 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    // Whole words, then the last eight bytes (overlapping the previous word when n % 8 != 0).
    let mut at = 0;
    while at + 8 <= n {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    at == n || word(a, n - 8) == word(b, n - 8)
}

/// Bytes of a segment name kept inline in its slot (longer names compare the rest through
/// `name`).
pub(super) const INLINE_KEY: usize = 28;

/// One segment's windows. Laid out for the ingest path: the first cache line holds the key and
/// the bookkeeping an event updates, each ring pane follows in the next lines.
#[repr(C, align(64))]
pub(super) struct SegmentWindows {
    pub(super) key_len: u16,
    /// Past its TTL during a close; removed when the close finishes.
    pub(super) expired: bool,
    pub(super) key: [u8; INLINE_KEY],
    /// Engine-wide ingest sequence number of the last event: eviction order (longest idle).
    pub(super) last_seq: u64,
    /// The segment's own event-time progress: its latest accepted event time.
    pub(super) last_event_ms: i64,
    /// End of the segment's oldest window not yet closed: an event whose windows all end
    /// before it is late.
    pub(super) next_end_ms: i64,
    /// Controller clock at its last accepted event: whether it counts towards the partition's
    /// progress (see `measure_progress`).
    pub(super) last_arrival_ms: i64,
    pub(super) panes: Panes,
    pub(super) name: Arc<str>,
}

impl SegmentWindows {
    pub(super) fn new(name: &str, next_end_ms: i64, last_event_ms: i64, last_seq: u64) -> Self {
        let mut key = [0u8; INLINE_KEY];
        let inline = name.len().min(INLINE_KEY);
        key[..inline].copy_from_slice(&name.as_bytes()[..inline]);
        SegmentWindows {
            // Longer names still compare exactly (through `name`); the length only has to
            // tell most names apart quickly.
            key_len: name.len().min(u16::MAX as usize) as u16,
            expired: false,
            key,
            last_seq,
            last_event_ms,
            next_end_ms,
            last_arrival_ms: i64::MIN,
            panes: Panes::EMPTY,
            name: Arc::from(name),
        }
    }

    #[inline]
    pub(super) fn is(&self, name: &str) -> bool {
        let b = name.as_bytes();
        if self.key_len as usize != b.len().min(u16::MAX as usize) {
            return false;
        }
        if b.len() <= INLINE_KEY {
            short_eq(&self.key[..b.len()], b)
        } else {
            self.key == b[..INLINE_KEY] && *self.name == *name
        }
    }
}

/// Segments of a partition: a dense slab (iterated in a deterministic order) plus an
/// open-addressing index of slot numbers.
///
/// An index entry is 8 bytes, `(hash tag << 32) | (slot + 1)` (0 = empty), found by linear
/// probing from `hash & mask`. Its address is known from the hash alone, so a batch of lookups
/// can start loading all their entries before the first is read (`SegmentTable::prefetch_entry`),
/// and the tag settles nearly every probe without touching a slot. Keys are compared against
/// the copy stored inline in the slot, which the event touches next anyway.
pub(super) struct SegmentTable {
    pub(super) hasher: foldhash::fast::FixedState,
    pub(super) entries: Vec<u64>,
    /// `hashes[i]` is the hash of `slots[i]`'s name (for growing and removing).
    pub(super) hashes: Vec<u64>,
    pub(super) slots: Vec<SegmentWindows>,
}

pub(super) const EMPTY: u64 = 0;

impl Default for SegmentTable {
    fn default() -> Self {
        SegmentTable {
            hasher: foldhash::fast::FixedState::with_seed(0x5e6_1009),
            entries: vec![EMPTY; 16],
            hashes: Vec::new(),
            slots: Vec::new(),
        }
    }
}

#[inline]
pub(super) fn entry_of(hash: u64, slot: usize) -> u64 {
    (hash & 0xffff_ffff_0000_0000) | (slot as u64 + 1)
}

impl SegmentTable {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    pub(super) fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    #[inline]
    /// A name's hash, from its bytes (a hint hashes a record's key before it is validated as
    /// UTF-8; the same bytes hash the same).
    pub(super) fn hash(&self, name: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(name)
    }

    /// Starts loading the index entry a hash probes first.
    #[inline]
    pub(super) fn prefetch_entry(&self, hash: u64) {
        prefetch_read(self.entries[hash as usize & self.mask()..].as_ptr() as *const u8);
    }

    /// The index position and slot of the first entry whose tag matches and for which `eq`
    /// holds.
    #[inline]
    pub(super) fn probe(
        &self,
        hash: u64,
        mut eq: impl FnMut(usize) -> bool,
    ) -> Option<(usize, usize)> {
        let mask = self.mask();
        let tag = hash & 0xffff_ffff_0000_0000;
        let mut at = hash as usize & mask;
        loop {
            let e = self.entries[at];
            if e == EMPTY {
                return None;
            }
            if e & 0xffff_ffff_0000_0000 == tag {
                let slot = (e & 0xffff_ffff) as usize - 1;
                if eq(slot) {
                    return Some((at, slot));
                }
            }
            at = (at + 1) & mask;
        }
    }

    #[inline]
    pub(super) fn find_hashed(&self, hash: u64, name: &str) -> Option<usize> {
        self.probe(hash, |i| self.slots[i].is(name))
            .map(|(_, slot)| slot)
    }

    #[inline]
    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.find_hashed(self.hash(name.as_bytes()), name)
    }

    pub(super) fn place(entries: &mut [u64], hash: u64, entry: u64) {
        let mask = entries.len() - 1;
        let mut at = hash as usize & mask;
        while entries[at] != EMPTY {
            at = (at + 1) & mask;
        }
        entries[at] = entry;
    }

    pub(super) fn insert_hashed(&mut self, hash: u64, seg: SegmentWindows) -> usize {
        assert!(
            self.slots.len() < u32::MAX as usize - 1,
            "segment table is full"
        );
        if (self.slots.len() + 1) * 2 > self.entries.len() {
            let mut entries = vec![EMPTY; self.entries.len() * 2];
            for (i, &h) in self.hashes.iter().enumerate() {
                Self::place(&mut entries, h, entry_of(h, i));
            }
            self.entries = entries;
        }
        let i = self.slots.len();
        Self::place(&mut self.entries, hash, entry_of(hash, i));
        self.hashes.push(hash);
        self.slots.push(seg);
        i
    }

    #[cfg(test)]
    pub(super) fn insert(&mut self, seg: SegmentWindows) -> usize {
        let hash = self.hash(seg.name.as_bytes());
        self.insert_hashed(hash, seg)
    }

    /// Empties index position `at` by shifting later entries of its probe run back (linear
    /// probing's deletion: no tombstones, so lookups never slow down with churn).
    pub(super) fn delete_at(&mut self, mut at: usize) {
        let mask = self.mask();
        let mut next = at;
        loop {
            next = (next + 1) & mask;
            let e = self.entries[next];
            if e == EMPTY {
                break;
            }
            let home = self.hashes[(e & 0xffff_ffff) as usize - 1] as usize & mask;
            // The entry may move back to `at` unless its home lies cyclically in (at, next].
            let stays = if at <= next {
                at < home && home <= next
            } else {
                at < home || home <= next
            };
            if !stays {
                self.entries[at] = e;
                at = next;
            }
        }
        self.entries[at] = EMPTY;
    }

    pub(super) fn remove(&mut self, name: &str) -> bool {
        let hash = self.hash(name.as_bytes());
        let Some((at, i)) = self.probe(hash, |i| self.slots[i].is(name)) else {
            return false;
        };
        self.delete_at(at);
        let last = self.slots.len() - 1;
        self.slots.swap_remove(i);
        self.hashes.swap_remove(i);
        if i != last {
            // The last slot moved to `i`: repoint its entry.
            let moved = self.hashes[i];
            let (at, _) = self
                .probe(moved, |slot| slot == last)
                .expect("every slot has an index entry");
            self.entries[at] = entry_of(moved, i);
        }
        true
    }
}

/// The windows of one Kafka partition.
pub struct PartitionWindows {
    pub(super) partition: i32,
    pub(super) segments: SegmentTable,
    /// Latest event time accepted (shown; it closes nothing).
    pub(super) max_event_ms: i64,
    /// The partition's progress − `out_of_orderness`: the lower median of its live segments'
    /// event-time progress (see `measure_progress`), or the idle advance. Never moves back.
    pub(super) watermark_ms: i64,
    /// End of the oldest window the partition's progress has not closed; `None` before the
    /// first accepted event. A new segment's windows start here.
    pub(super) next_end_ms: Option<i64>,
    /// Controller clock at the last accepted event (idle detection).
    pub(super) last_arrival_ms: i64,
    /// Controller clock at the first accepted event.
    pub(super) first_arrival_ms: i64,
    /// Accepted events since the progress was last measured, and the clock then.
    pub(super) since_measure: usize,
    pub(super) measured_at_ms: i64,
    /// One past the highest offset seen.
    pub(super) next_offset: Option<i64>,
}

impl PartitionWindows {
    pub(super) fn new(partition: i32) -> Self {
        PartitionWindows {
            partition,
            segments: SegmentTable::default(),
            max_event_ms: i64::MIN,
            watermark_ms: i64::MIN,
            next_end_ms: None,
            last_arrival_ms: i64::MIN,
            first_arrival_ms: i64::MIN,
            since_measure: 0,
            measured_at_ms: i64::MIN,
            next_offset: None,
        }
    }

    /// The partition's robust watermark (see the module doc).
    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// The latest event time accepted on this partition (which may be an outlier's).
    pub fn max_event_ms(&self) -> i64 {
        self.max_event_ms
    }

    /// Whether this partition holds windows of `segment`.
    pub fn holds(&self, segment: &str) -> bool {
        self.segments.find(segment).is_some()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// Partitions by number: direct indexing for Kafka's partition numbers (the lookup is on every
/// event), a map for anything outside that range. Iterates in partition order.
#[derive(Default)]
pub(super) struct PartitionMap {
    pub(super) dense: Vec<Option<PartitionWindows>>,
    pub(super) other: BTreeMap<i32, PartitionWindows>,
}

/// Partition numbers below this are indexed directly.
pub(super) const DENSE_PARTITIONS: i32 = 1 << 16;

impl PartitionMap {
    #[inline]
    pub(super) fn get(&self, partition: i32) -> Option<&PartitionWindows> {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            self.dense.get(partition as usize)?.as_ref()
        } else {
            self.other.get(&partition)
        }
    }

    #[inline]
    pub(super) fn get_mut(&mut self, partition: i32) -> Option<&mut PartitionWindows> {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            self.dense.get_mut(partition as usize)?.as_mut()
        } else {
            self.other.get_mut(&partition)
        }
    }

    pub(super) fn get_or_insert(&mut self, partition: i32) -> &mut PartitionWindows {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            let i = partition as usize;
            if self.dense.len() <= i {
                self.dense.resize_with(i + 1, || None);
            }
            self.dense[i].get_or_insert_with(|| PartitionWindows::new(partition))
        } else {
            self.other
                .entry(partition)
                .or_insert_with(|| PartitionWindows::new(partition))
        }
    }

    pub(super) fn remove(&mut self, partition: i32) -> Option<PartitionWindows> {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            self.dense.get_mut(partition as usize)?.take()
        } else {
            self.other.remove(&partition)
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &PartitionWindows> {
        let below = self.other.range(..0).map(|(_, p)| p);
        let above = self.other.range(0..).map(|(_, p)| p);
        below.chain(self.dense.iter().flatten()).chain(above)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut PartitionWindows> {
        let (below, above): (Vec<_>, Vec<_>) =
            self.other.values_mut().partition(|p| p.partition < 0);
        below
            .into_iter()
            .chain(self.dense.iter_mut().flatten())
            .chain(above)
    }
}

/// Interned measurement names.
pub(super) struct Names {
    pub(super) params: SketchParams,
    pub(super) ids: FastMap<Box<str>, u16>,
    pub(super) names: Vec<Arc<str>>,
    pub(super) quantile: Vec<bool>,
    pub(super) wanted_quantiles: Vec<String>,
}

impl Names {
    pub(super) fn id(&mut self, name: &str) -> Option<u16> {
        // A handful of names is the norm: comparing them beats hashing.
        if self.names.len() <= 8 {
            if let Some(i) = self
                .names
                .iter()
                .position(|n| n.len() == name.len() && short_eq(n.as_bytes(), name.as_bytes()))
            {
                return Some(i as u16);
            }
        } else if let Some(&id) = self.ids.get(name) {
            return Some(id);
        }
        if self.names.len() >= MAX_MEASUREMENT_NAMES {
            return None;
        }
        let id = self.names.len() as u16;
        self.ids.insert(name.into(), id);
        self.names.push(name.into());
        self.quantile
            .push(self.wanted_quantiles.iter().any(|q| q == name));
        Some(id)
    }
}
