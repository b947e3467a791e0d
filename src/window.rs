//! Event-time window engine: per-segment aggregates in tumbling or hopping windows, closed by
//! each segment's own progress and a robust measure of its partition's.
//!
//! # Model
//! - Time is cut into **panes** of length `hop` aligned to the Unix epoch. A window
//!   `[end - size, end)` is the merge of its `size / hop` panes, so an event is added once, to
//!   one pane, however many hopping windows overlap it. Tumbling windows are `hop = size`: one
//!   pane per window, moved (not copied) into the summary when the window closes.
//! - Three clocks close windows, and no segment's event time can drag another's (DESIGN.md,
//!   Clocks):
//!   - a **segment's own progress** (its latest accepted event time) closes its own windows
//!     when `progress − out_of_orderness ≥ end + grace`;
//!   - the **partition's progress** (`watermark_ms + out_of_orderness`) closes every segment's
//!     windows, quiet ones included: the lower median of its live segments' progress (an
//!     event within one window span of the controller clock), never past the clock and never
//!     back (see `measure_progress`), so fewer than half the live segments cannot move it;
//!   - the **idle advance**: a partition with no accepted event for `idle_timeout` moves to
//!     `min(now, read_through) − idle_timeout`, where the driver says up to when everything
//!     written to it was read ([`WindowEngine::advance_idle_read`]): a backlog is never
//!     advanced over.
//!
//!   Closing happens inside the call that moves a clock, so what closes depends only on the
//!   input sequence and the clock values passed in, never on how calls are batched.
//! - An event is **late** when every window containing it has closed for its segment; it is
//!   returned as a [`Rejection`] ([`Rejected::Late`]) and counted. An event more than
//!   `max_clock_skew` ahead of the controller clock is returned as [`Rejected::ClockSkew`] and
//!   moves nothing.
//! - Every segment of a partition closes every window from its first event on, empty or not,
//!   until it has been quiet for `segment_ttl` (then it is forgotten). Beyond `max_segments` the
//!   longest-idle segments are evicted; the events in their open windows are counted and
//!   reported ([`WindowEngine::take_evictions`]): `accepted = windowed + evicted + revoked +
//!   open` ([`EngineStats`]).
//! - [`WindowEngine::committable_offset`] is the lowest input offset still feeding an open
//!   window (or the next offset when none is open): committing no further means a restart
//!   rebuilds every open window exactly by re-reading.
//!
//! State is owned per partition ([`PartitionWindows`]): `revoke` drops exactly that partition's
//! segments. Nothing here does I/O or reads a clock; `now_ms` is always passed in.
//!
//! # Layout (for speed)
//! An event touches about five cache lines in a working set of tens of megabytes: its index
//! entry (`SegmentTable`), its slot's first line (key and bookkeeping), the lines of the
//! ring pane its timestamp maps to (`Panes`), and its sketch. [`WindowEngine::prefetch`]
//! starts those loads batches ahead (see `Hints`), so they overlap instead of stalling one
//! after another; `segloop bench window` measures the result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::sketch::{QuantileSketch, SketchParams};

use crate::config::WindowConfig;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// Most distinct measurement names one engine tracks; further names are dropped and counted.
pub const MAX_MEASUREMENT_NAMES: usize = 1024;

/// Window geometry and limits, in milliseconds. Built from [`WindowConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSpec {
    pub size_ms: i64,
    pub hop_ms: i64,
    pub out_of_orderness_ms: i64,
    pub grace_ms: i64,
    pub idle_timeout_ms: i64,
    pub max_clock_skew_ms: i64,
    pub segment_ttl_ms: i64,
    pub max_segments: usize,
    pub quantile_measurements: Vec<String>,
    pub relative_accuracy: f64,
}

impl WindowSpec {
    /// The spec of a window group: the config's spec with the group's size and hop.
    pub fn for_group(c: &WindowConfig, group: &crate::config::WindowGroup) -> Self {
        let ms = |d: std::time::Duration| d.as_millis() as i64;
        WindowSpec {
            size_ms: ms(group.size),
            hop_ms: group.hop.map_or(ms(group.size), ms),
            ..WindowSpec::from_config(c)
        }
    }

    /// The spec of a validated config (see `Config::validate` for the invariants).
    pub fn from_config(c: &WindowConfig) -> Self {
        let ms = |d: std::time::Duration| d.as_millis() as i64;
        WindowSpec {
            size_ms: ms(c.size),
            hop_ms: c.hop.map_or(ms(c.size), ms),
            out_of_orderness_ms: ms(c.out_of_orderness),
            grace_ms: ms(c.grace),
            idle_timeout_ms: ms(c.idle_timeout),
            max_clock_skew_ms: ms(c.max_clock_skew),
            segment_ttl_ms: ms(c.segment_ttl),
            max_segments: c.max_segments,
            quantile_measurements: c.quantile_measurements.clone(),
            relative_accuracy: c.relative_accuracy,
        }
    }
}

/// Running aggregates of one measurement in one pane.
#[derive(Clone, Debug, Default)]
struct Agg {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    sketch: Option<QuantileSketch>,
}

impl Agg {
    fn new(with_sketch: bool) -> Self {
        Agg {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sketch: with_sketch.then(QuantileSketch::new),
        }
    }

    #[inline]
    fn add(&mut self, params: &SketchParams, v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if let Some(s) = self.sketch.as_mut() {
            s.add(params, v);
        }
    }

    fn merge(&mut self, other: &Agg) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        match (self.sketch.as_mut(), other.sketch.as_ref()) {
            (Some(a), Some(b)) => a.merge(b),
            (None, Some(b)) => self.sketch = Some(b.clone()),
            _ => {}
        }
    }
}

/// Aggregates of one measurement over a closed window.
#[derive(Clone, Debug)]
pub struct MeasurementSummary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Present for the configured quantile measurements.
    pub sketch: Option<QuantileSketch>,
    params: SketchParams,
}

impl MeasurementSummary {
    fn from_agg(agg: Agg, params: SketchParams) -> Self {
        MeasurementSummary {
            count: agg.count,
            sum: agg.sum,
            min: agg.min,
            max: agg.max,
            sketch: agg.sketch,
            params,
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The q-quantile (0 ≤ q ≤ 1) within the sketch's relative accuracy; `None` without values
    /// or without a sketch for this measurement.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.as_ref()?.quantile(&self.params, q)
    }
}

/// A window's measurements, sorted by name (the usual one or two live inline).
pub type Measurements = SmallVec<[(Arc<str>, MeasurementSummary); INLINE_MEASUREMENTS]>;

/// One closed window of one segment: the immutable input to policies.
#[derive(Debug, Clone)]
pub struct WindowSummary {
    pub partition: i32,
    pub segment: Arc<str>,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Events in the window (0 = no data).
    pub count: u64,
    /// Per measurement, sorted by name.
    pub measurements: Measurements,
    /// The window group (`None`: the default windows); policies judge their group's windows.
    pub group: Option<Arc<str>>,
}

impl WindowSummary {
    /// A summary built from raw values (tests, simulations, backtest fixtures): `count` is the
    /// number of events, each measurement lists its values; `quantile` names the measurements
    /// that get a sketch with the given relative accuracy.
    pub fn from_values(
        partition: i32,
        segment: &str,
        (start_ms, end_ms): (i64, i64),
        count: u64,
        measurements: &[(&str, &[f64])],
        quantile: &[&str],
        relative_accuracy: f64,
    ) -> WindowSummary {
        let params = SketchParams::new(relative_accuracy);
        let mut ms: Measurements = measurements
            .iter()
            .map(|(name, values)| {
                let mut agg = Agg::new(quantile.contains(name));
                for v in values.iter().filter(|v| v.is_finite()) {
                    agg.add(&params, *v);
                }
                (Arc::from(*name), MeasurementSummary::from_agg(agg, params))
            })
            .collect();
        ms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        WindowSummary {
            partition,
            segment: Arc::from(segment),
            start_ms,
            end_ms,
            count,
            measurements: ms,
            group: None,
        }
    }

    pub fn measurement(&self, name: &str) -> Option<&MeasurementSummary> {
        self.measurements
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.measurements[i].1)
    }

    pub fn duration_secs(&self) -> f64 {
        (self.end_ms - self.start_ms) as f64 / 1000.0
    }

    /// Events per second over the window.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.duration_secs()
    }

    /// Sum of a measurement per second over the window (e.g. errors/s); 0 without values.
    pub fn rate_of(&self, name: &str) -> f64 {
        self.measurement(name).map_or(0.0, |m| m.sum) / self.duration_secs()
    }
}

/// Where an input record came from: its Kafka partition and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Counters of what the engine did (monotonic) and holds (gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub accepted: u64,
    pub late: u64,
    pub clock_skew: u64,
    pub non_finite_values: u64,
    pub dropped_measurement_names: u64,
    pub windows_closed: u64,
    pub expired_segments: u64,
    pub evicted_segments: u64,
    /// Accepted events by where they ended: in windows that closed (`windowed`), in open
    /// windows of segments the cap evicted (`evicted`) or of revoked partitions (`revoked`,
    /// re-read by their next owner), or still in open windows (`open`, a gauge). Always
    /// `accepted = windowed + evicted + revoked + open`.
    pub windowed_events: u64,
    pub evicted_events: u64,
    pub revoked_events: u64,
    pub open_events: u64,
    /// Gauge: segments held now.
    pub segments: u64,
}

/// A segment the cap evicted while it had events in open windows: what was lost to windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub partition: i32,
    pub segment: Arc<str>,
    /// Events in its open windows, never windowed.
    pub events: u64,
    /// Start of its oldest open pane.
    pub oldest_pane_ms: i64,
}

/// Measurements kept inline in a pane before spilling to the heap (latency + error is typical).
const INLINE_MEASUREMENTS: usize = 2;

/// `start_ms` of an unused pane position.
const NO_PANE: i64 = i64::MIN;

/// One hop of one segment: the unit events are added to (160 bytes with two measurements).
struct Pane {
    start_ms: i64,
    count: u64,
    min_offset: i64,
    aggs: SmallVec<[(u16, Agg); INLINE_MEASUREMENTS]>,
}

impl Pane {
    const UNUSED: Pane = Pane {
        start_ms: NO_PANE,
        count: 0,
        min_offset: i64::MAX,
        aggs: SmallVec::new_const(),
    };

    fn new(start_ms: i64, offset: i64) -> Self {
        Pane {
            start_ms,
            min_offset: offset,
            ..Pane::UNUSED
        }
    }

    fn is_used(&self) -> bool {
        self.start_ms != NO_PANE
    }
}

/// The open panes of a segment. A pane lives in `ring[(start / hop) % 2]` when that position
/// is free, else in `extra` (sorted by start). Tumbling windows whose lateness is shorter than a
/// window (the default) never need `extra`: the open pane and the one before it alternate
/// positions. So the position an event goes to is known from its timestamp alone, before its
/// segment is read, and a prefetch can load exactly that pane.
struct Panes {
    ring: [Pane; 2],
    extra: Vec<Pane>,
}

impl Panes {
    const EMPTY: Panes = Panes {
        ring: [Pane::UNUSED, Pane::UNUSED],
        extra: Vec::new(),
    };

    #[inline]
    fn ring_index(start_ms: i64, hop_ms: i64) -> usize {
        (start_ms.div_euclid(hop_ms) & 1) as usize
    }

    fn is_empty(&self) -> bool {
        !self.ring[0].is_used() && !self.ring[1].is_used() && self.extra.is_empty()
    }

    /// The pane starting at `start_ms` (ring position `r`), created if missing.
    #[inline]
    fn pane_mut(&mut self, start_ms: i64, r: usize, offset: i64) -> &mut Pane {
        if self.ring[r].start_ms == start_ms {
            return &mut self.ring[r];
        }
        if !self.ring[r].is_used() && !self.extra.iter().any(|p| p.start_ms == start_ms) {
            self.ring[r] = Pane::new(start_ms, offset);
            return &mut self.ring[r];
        }
        let i = match self.extra.binary_search_by_key(&start_ms, |p| p.start_ms) {
            Ok(i) => i,
            Err(i) => {
                self.extra.insert(i, Pane::new(start_ms, offset));
                i
            }
        };
        &mut self.extra[i]
    }

    /// Every open pane, in no particular order.
    fn iter(&self) -> impl Iterator<Item = &Pane> {
        self.ring.iter().filter(|p| p.is_used()).chain(&self.extra)
    }

    /// Every open pane, oldest first.
    fn sorted(&self) -> SmallVec<[&Pane; 4]> {
        let mut v: SmallVec<[&Pane; 4]> = self.iter().collect();
        v.sort_unstable_by_key(|p| p.start_ms);
        v
    }

    /// Removes and returns the pane starting at `start_ms`.
    fn take(&mut self, start_ms: i64, hop_ms: i64) -> Option<Pane> {
        let r = Self::ring_index(start_ms, hop_ms);
        if self.ring[r].start_ms == start_ms {
            return Some(std::mem::replace(&mut self.ring[r], Pane::UNUSED));
        }
        let i = self.extra.iter().position(|p| p.start_ms == start_ms)?;
        Some(self.extra.remove(i))
    }

    /// Drops every pane starting before `start_ms`; returns how many events they held.
    fn drop_before(&mut self, start_ms: i64) -> u64 {
        let mut events = 0;
        for p in &mut self.ring {
            if p.is_used() && p.start_ms < start_ms {
                events += p.count;
                *p = Pane::UNUSED;
            }
        }
        self.extra.retain(|p| {
            let keep = p.start_ms >= start_ms;
            if !keep {
                events += p.count;
            }
            keep
        });
        events
    }

    /// Events in the open panes.
    fn events(&self) -> u64 {
        self.iter().map(|p| p.count).sum()
    }
}

/// Equality of two short byte strings of equal length, eight bytes at a time: keys and
/// measurement names are compared on every event, and a libc call per compare showed in
/// profiles.
#[inline]
fn short_eq(a: &[u8], b: &[u8]) -> bool {
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
const INLINE_KEY: usize = 28;

/// One segment's windows. Laid out for the ingest path: the first cache line holds the key and
/// the bookkeeping an event updates, each ring pane follows in the next lines.
#[repr(C, align(64))]
struct SegmentWindows {
    key_len: u16,
    /// Past its TTL during a close; removed when the close finishes.
    expired: bool,
    key: [u8; INLINE_KEY],
    /// Engine-wide ingest sequence number of the last event: eviction order (longest idle).
    last_seq: u64,
    /// The segment's own event-time progress: its latest accepted event time.
    last_event_ms: i64,
    /// End of the segment's oldest window not yet closed: an event whose windows all end
    /// before it is late.
    next_end_ms: i64,
    /// Controller clock at its last accepted event: whether it counts towards the partition's
    /// progress (see `measure_progress`).
    last_arrival_ms: i64,
    panes: Panes,
    name: Arc<str>,
}

impl SegmentWindows {
    fn new(name: &str, next_end_ms: i64, last_event_ms: i64, last_seq: u64) -> Self {
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
    fn is(&self, name: &str) -> bool {
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
struct SegmentTable {
    hasher: foldhash::fast::FixedState,
    entries: Vec<u64>,
    /// `hashes[i]` is the hash of `slots[i]`'s name (for growing and removing).
    hashes: Vec<u64>,
    slots: Vec<SegmentWindows>,
}

const EMPTY: u64 = 0;

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
fn entry_of(hash: u64, slot: usize) -> u64 {
    (hash & 0xffff_ffff_0000_0000) | (slot as u64 + 1)
}

impl SegmentTable {
    fn len(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    #[inline]
    fn hash(&self, name: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(name.as_bytes())
    }

    /// Starts loading the index entry a hash probes first.
    #[inline]
    fn prefetch_entry(&self, hash: u64) {
        prefetch_read(self.entries[hash as usize & self.mask()..].as_ptr() as *const u8);
    }

    /// The index position and slot of the first entry whose tag matches and for which `eq`
    /// holds.
    #[inline]
    fn probe(&self, hash: u64, mut eq: impl FnMut(usize) -> bool) -> Option<(usize, usize)> {
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
    fn find_hashed(&self, hash: u64, name: &str) -> Option<usize> {
        self.probe(hash, |i| self.slots[i].is(name))
            .map(|(_, slot)| slot)
    }

    #[inline]
    fn find(&self, name: &str) -> Option<usize> {
        self.find_hashed(self.hash(name), name)
    }

    fn place(entries: &mut [u64], hash: u64, entry: u64) {
        let mask = entries.len() - 1;
        let mut at = hash as usize & mask;
        while entries[at] != EMPTY {
            at = (at + 1) & mask;
        }
        entries[at] = entry;
    }

    fn insert_hashed(&mut self, hash: u64, seg: SegmentWindows) -> usize {
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
    fn insert(&mut self, seg: SegmentWindows) -> usize {
        let hash = self.hash(&seg.name);
        self.insert_hashed(hash, seg)
    }

    /// Empties index position `at` by shifting later entries of its probe run back (linear
    /// probing's deletion: no tombstones, so lookups never slow down with churn).
    fn delete_at(&mut self, mut at: usize) {
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

    fn remove(&mut self, name: &str) -> bool {
        let hash = self.hash(name);
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
    partition: i32,
    segments: SegmentTable,
    /// Latest event time accepted (shown; it closes nothing).
    max_event_ms: i64,
    /// The partition's progress − `out_of_orderness`: the lower median of its live segments'
    /// event-time progress (see `measure_progress`), or the idle advance. Never moves back.
    watermark_ms: i64,
    /// End of the oldest window the partition's progress has not closed; `None` before the
    /// first accepted event. A new segment's windows start here.
    next_end_ms: Option<i64>,
    /// Controller clock at the last accepted event (idle detection).
    last_arrival_ms: i64,
    /// Controller clock at the first accepted event.
    first_arrival_ms: i64,
    /// Accepted events since the progress was last measured, and the clock then.
    since_measure: usize,
    measured_at_ms: i64,
    /// One past the highest offset seen.
    next_offset: Option<i64>,
}

impl PartitionWindows {
    fn new(partition: i32) -> Self {
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
struct PartitionMap {
    dense: Vec<Option<PartitionWindows>>,
    other: BTreeMap<i32, PartitionWindows>,
}

/// Partition numbers below this are indexed directly.
const DENSE_PARTITIONS: i32 = 1 << 16;

impl PartitionMap {
    #[inline]
    fn get(&self, partition: i32) -> Option<&PartitionWindows> {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            self.dense.get(partition as usize)?.as_ref()
        } else {
            self.other.get(&partition)
        }
    }

    #[inline]
    fn get_mut(&mut self, partition: i32) -> Option<&mut PartitionWindows> {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            self.dense.get_mut(partition as usize)?.as_mut()
        } else {
            self.other.get_mut(&partition)
        }
    }

    fn get_or_insert(&mut self, partition: i32) -> &mut PartitionWindows {
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

    fn remove(&mut self, partition: i32) -> Option<PartitionWindows> {
        if (0..DENSE_PARTITIONS).contains(&partition) {
            self.dense.get_mut(partition as usize)?.take()
        } else {
            self.other.remove(&partition)
        }
    }

    fn values(&self) -> impl Iterator<Item = &PartitionWindows> {
        let below = self.other.range(..0).map(|(_, p)| p);
        let above = self.other.range(0..).map(|(_, p)| p);
        below.chain(self.dense.iter().flatten()).chain(above)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut PartitionWindows> {
        let (below, above): (Vec<_>, Vec<_>) =
            self.other.values_mut().partition(|p| p.partition < 0);
        below
            .into_iter()
            .chain(self.dense.iter_mut().flatten())
            .chain(above)
    }
}

/// Interned measurement names.
struct Names {
    params: SketchParams,
    ids: FastMap<Box<str>, u16>,
    names: Vec<Arc<str>>,
    quantile: Vec<bool>,
    wanted_quantiles: Vec<String>,
}

impl Names {
    fn id(&mut self, name: &str) -> Option<u16> {
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

/// Per-segment windows for the partitions this instance owns.
pub struct WindowEngine {
    spec: WindowSpec,
    sketch: SketchParams,
    names: Names,
    partitions: PartitionMap,
    /// Segments held across all partitions.
    segment_total: usize,
    seq: u64,
    stats: EngineStats,
    /// The window group this engine serves (`None`: the default windows).
    group: Option<Arc<str>>,
    /// Prefetch hints in flight (see [`WindowEngine::prefetch`]).
    hints: Hints,
    /// Reused by `measure_progress`.
    scratch: Vec<i64>,
    /// Evictions that cost events, until [`WindowEngine::take_evictions`].
    evictions: Vec<Eviction>,
}

/// Events per [`WindowEngine::prefetch`] call that work well here.
pub const HINT_BATCH: usize = 32;
/// How many batches ahead of its ingest a batch is hinted.
pub const HINT_AHEAD: usize = 3;

/// The prefetch schedule every caller of [`WindowEngine::prefetch`] uses: `items` in chunks of
/// [`HINT_BATCH`], each chunk hinted [`HINT_AHEAD`] chunks before its items are processed.
/// `hint` gets the index of a chunk's first item and the chunk (empty past the end); `each`
/// gets an item's index and the item.
pub fn with_hints<S: ?Sized, T>(
    state: &mut S,
    items: &[T],
    mut hint: impl FnMut(&mut S, usize, &[T]),
    mut each: impl FnMut(&mut S, usize, &T),
) {
    let chunk = |i: usize| {
        let from = (i * HINT_BATCH).min(items.len());
        (from, &items[from..((i + 1) * HINT_BATCH).min(items.len())])
    };
    for i in 0..HINT_AHEAD {
        let (from, c) = chunk(i);
        hint(state, from, c);
    }
    for i in 0..items.len().div_ceil(HINT_BATCH) {
        let (from, c) = chunk(i + HINT_AHEAD);
        hint(state, from, c);
        let (first, c) = chunk(i);
        for (j, item) in c.iter().enumerate() {
            each(state, first + j, item);
        }
    }
}

/// Software-pipelined prefetch across hint calls. Each [`WindowEngine::prefetch`] call (one
/// batch of upcoming events) advances three stages, each on a different batch:
/// 1. this batch: hash the keys and start loading their index entries;
/// 2. the batch hinted one call earlier: probe its index entries (loaded by now) and start
///    loading the slot lines and the ring pane each event will update;
/// 3. the batch hinted two calls earlier: read those panes (loaded by now) for their sketches'
///    addresses and start loading the sketches.
///
/// Every stage reads only what an earlier call loaded a whole batch of ingests ago, so nothing
/// stalls on a load issued just before, and ingest itself does no hint work. Hints are
/// positions, re-checked when used, never pointers: a stale one costs a useless prefetch.
#[derive(Default)]
struct Hints {
    /// Stage 2 input: (partition, hash, ring position).
    hashed: Vec<(i32, u64, u8, i64)>,
    /// Stage 3 input: (partition, slot, ring position).
    slots: Vec<(i32, u32, u8, i64)>,
}

impl WindowEngine {
    /// An engine for a named window group: its summaries carry the name.
    pub fn for_group(spec: WindowSpec, group: &str) -> Self {
        let mut e = WindowEngine::new(spec);
        e.group = Some(Arc::from(group));
        e
    }

    /// The window group this engine serves.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// Whether [`WindowEngine::ingest`] would take an event of `segment` at `ts_ms` on
    /// `partition` (clock skew, lateness), without changing anything.
    ///
    /// # Errors
    /// As `ingest`.
    pub fn check(
        &self,
        partition: i32,
        segment: &str,
        ts_ms: i64,
        now_ms: i64,
    ) -> Result<(), Rejection> {
        let Some(p) = self.partitions.get(partition) else {
            return Err(not_assigned(partition));
        };
        let pane_ms = ts_ms.div_euclid(self.spec.hop_ms) * self.spec.hop_ms;
        let closed = closed_to(p, p.segments.find(segment), &self.spec);
        check_in(
            p,
            closed,
            &self.spec,
            self.group.as_deref(),
            ts_ms,
            pane_ms,
            now_ms,
        )
    }

    pub fn new(spec: WindowSpec) -> Self {
        let sketch = SketchParams::new(spec.relative_accuracy);
        let wanted_quantiles = spec.quantile_measurements.clone();
        WindowEngine {
            spec,
            sketch,
            names: Names {
                params: sketch,
                ids: FastMap::default(),
                names: Vec::new(),
                quantile: Vec::new(),
                wanted_quantiles,
            },
            partitions: PartitionMap::default(),
            segment_total: 0,
            seq: 0,
            stats: EngineStats::default(),
            group: None,
            hints: Hints::default(),
            scratch: Vec::new(),
            evictions: Vec::new(),
        }
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.segments = self.segment_total as u64;
        s
    }

    /// Takes ownership of a partition (empty; the runtime re-reads from the committed offset).
    pub fn assign(&mut self, partition: i32) {
        self.partitions.get_or_insert(partition);
    }

    /// Drops a partition's state; returns how many segments it held.
    pub fn revoke(&mut self, partition: i32) -> Option<usize> {
        let p = self.partitions.remove(partition)?;
        let events: u64 = p.segments.slots.iter().map(|s| s.panes.events()).sum();
        self.stats.revoked_events += events;
        self.stats.open_events -= events;
        let removed = p.segments.len();
        self.segment_total -= removed;
        Some(removed)
    }

    /// Segments the cap evicted with events in open windows since the last call, oldest
    /// first (the pipeline records each).
    pub fn take_evictions(&mut self) -> Vec<Eviction> {
        std::mem::take(&mut self.evictions)
    }

    pub fn partitions(&self) -> impl Iterator<Item = &PartitionWindows> {
        self.partitions.values()
    }

    pub fn partition(&self, partition: i32) -> Option<&PartitionWindows> {
        self.partitions.get(partition)
    }

    /// The open panes of a segment as partial summaries (`[start, start + hop)`), oldest
    /// first: what the admin API shows. Empty when the segment is not held here.
    pub fn open_windows(&self, segment: &str) -> Vec<WindowSummary> {
        for p in self.partitions.values() {
            if let Some(i) = p.segments.find(segment) {
                let seg = &p.segments.slots[i];
                return seg
                    .panes
                    .sorted()
                    .into_iter()
                    .map(|pane| {
                        summary_of(
                            seg,
                            p.partition,
                            pane.start_ms,
                            pane.start_ms + self.spec.hop_ms,
                            pane.count,
                            pane.aggs.iter().cloned(),
                            &self.names,
                        )
                    })
                    .map(|mut w| {
                        w.group = self.group.clone();
                        w
                    })
                    .collect();
            }
        }
        Vec::new()
    }

    /// The offset to commit for a partition: the lowest offset still feeding an open window,
    /// or one past the last offset seen when no window is open. `None` before any input.
    /// A scan of the partition's segments: called once per commit, never per event.
    pub fn committable_offset(&self, partition: i32) -> Option<i64> {
        let p = self.partitions.get(partition)?;
        p.segments
            .slots
            .iter()
            .flat_map(|s| s.panes.iter().map(|pane| pane.min_offset))
            .min()
            .or(p.next_offset)
    }

    /// Adds one event. Windows that its watermark advance closes are appended to `closed`
    /// (before the event is added). Late or skewed events are returned, not dropped: the caller
    /// DLQs them. Non-finite values are skipped and counted; the event still counts.
    ///
    /// # Errors
    /// A [`Rejection`]: late, clock skew, or a partition that was not assigned.
    pub fn ingest<'a>(
        &mut self,
        at: Position,
        segment: &str,
        ts_ms: i64,
        measurements: impl IntoIterator<Item = (&'a str, f64)>,
        now_ms: i64,
        closed: &mut Vec<WindowSummary>,
    ) -> Result<(), Rejection> {
        self.ingest_inner(at, segment, ts_ms, measurements, now_ms, closed)
    }

    #[inline]
    fn ingest_inner<'a>(
        &mut self,
        at: Position,
        segment: &str,
        ts_ms: i64,
        measurements: impl IntoIterator<Item = (&'a str, f64)>,
        now_ms: i64,
        closed: &mut Vec<WindowSummary>,
    ) -> Result<(), Rejection> {
        let Position { partition, offset } = at;
        let spec = &self.spec;
        let Some(p) = self.partitions.get_mut(partition) else {
            return Err(not_assigned(partition));
        };
        p.next_offset = Some(p.next_offset.map_or(offset + 1, |n| n.max(offset + 1)));
        let pane_no = ts_ms.div_euclid(spec.hop_ms);
        let pane_ms = pane_no * spec.hop_ms;
        let hash = p.segments.hash(segment);
        let found = p.segments.find_hashed(hash, segment);
        let closed_to = closed_to(p, found, spec);
        if let Err(e) = check_in(
            p,
            closed_to,
            spec,
            self.group.as_deref(),
            ts_ms,
            pane_ms,
            now_ms,
        ) {
            match e.kind {
                Rejected::ClockSkew => self.stats.clock_skew += 1,
                Rejected::Late => self.stats.late += 1,
                Rejected::NotAssigned => {}
            }
            return Err(e);
        }

        p.last_arrival_ms = now_ms;
        p.max_event_ms = p.max_event_ms.max(ts_ms);
        if p.next_end_ms.is_none() {
            // The first event: nothing is closed for the partition yet. Its progress is first
            // measured one window span later, when every live segment has had its say (so a
            // future-dated first event does not set it).
            p.next_end_ms = Some(i64::MIN);
            p.first_arrival_ms = now_ms;
        }
        self.seq += 1;
        let seq = self.seq;
        let mut p = p;
        let partition_open_from = p.next_end_ms.unwrap_or(i64::MIN);
        let slot = match found {
            Some(slot) => {
                // The segment's own progress closes its own windows (emitted before this event
                // lands: they end at or before ts − out_of_orderness − grace ≤ ts).
                let seg = &mut p.segments.slots[slot];
                if ts_ms > seg.last_event_ms {
                    // `next_end` is on the hop grid: no division unless something closes.
                    if seg.next_end_ms <= reach(ts_ms, spec) {
                        let through =
                            last_end(ts_ms.saturating_sub(spec.out_of_orderness_ms), spec);
                        Closing {
                            spec,
                            names: &self.names,
                            group: self.group.as_ref(),
                            stats: &mut self.stats,
                            closed,
                        }
                        .close_segment(seg, through, p.partition);
                    }
                    seg.last_event_ms = ts_ms;
                }
                // An on-time event before the segment's first window (out of order) opens the
                // windows it falls in: none of them was emitted (they end past every close).
                if pane_ms + spec.hop_ms < seg.next_end_ms {
                    let open = partition_open_from.max(own_open_from(seg, spec));
                    seg.next_end_ms = seg.next_end_ms.min((pane_ms + spec.hop_ms).max(open));
                }
                slot
            }
            None => {
                let next_end = (pane_ms + spec.hop_ms).max(partition_open_from);
                if self.segment_total >= spec.max_segments {
                    self.evict();
                }
                self.segment_total += 1;
                p = self
                    .partitions
                    .get_mut(partition)
                    .expect("partition checked above");
                p.segments
                    .insert_hashed(hash, SegmentWindows::new(segment, next_end, ts_ms, seq))
            }
        };
        let spec = &self.spec;
        let seg = &mut p.segments.slots[slot];
        seg.last_seq = seq;
        seg.last_arrival_ms = now_ms;
        let pane = seg.panes.pane_mut(pane_ms, (pane_no & 1) as usize, offset);
        pane.count += 1;
        pane.min_offset = pane.min_offset.min(offset);
        for (name, v) in measurements {
            if !v.is_finite() {
                self.stats.non_finite_values += 1;
                continue;
            }
            let Some(id) = self.names.id(name) else {
                self.stats.dropped_measurement_names += 1;
                continue;
            };
            let agg = match pane.aggs.iter().position(|(i, _)| *i == id) {
                Some(i) => &mut pane.aggs[i].1,
                None => {
                    pane.aggs
                        .push((id, Agg::new(self.names.quantile[id as usize])));
                    &mut pane.aggs.last_mut().expect("just pushed").1
                }
            };
            agg.add(&self.sketch, v);
        }
        self.stats.accepted += 1;
        self.stats.open_events += 1;

        // The partition's progress moves only when it can close something, and is measured at
        // most once per eighth of its segments' events (a scan of its segments).
        p.since_measure += 1;
        if reach(ts_ms, spec) >= p.next_end_ms.unwrap_or(i64::MAX)
            && p.since_measure > p.segments.len() / 8
        {
            let mut closing = Closing {
                spec,
                names: &self.names,
                group: self.group.as_ref(),
                stats: &mut self.stats,
                closed,
            };
            self.segment_total -= closing.measure_progress(p, now_ms, &mut self.scratch);
        }
        Ok(())
    }

    /// A hint about a batch of events that will be ingested soon, given as `(partition,
    /// segment, event time)`. Hint batches in order, three batches (16 to 64 events each)
    /// ahead of the batch being ingested: each call starts loading this batch's index entries,
    /// the previous batch's segment state and the batch before that's sketches (see
    /// `Hints`), so the sketches load one batch ahead of their use. Changes nothing but
    /// speed.
    pub fn prefetch<'k>(&mut self, events: impl IntoIterator<Item = (i32, &'k str, i64)>) {
        let mut hints = std::mem::take(&mut self.hints);
        // Stage 3: sketches of the batch before last.
        let spec = &self.spec;
        for &(partition, slot, ring, ts_ms) in &hints.slots {
            let seg = self
                .partitions
                .get(partition)
                .and_then(|p| p.segments.slots.get(slot as usize));
            // An event that will close its segment's windows clones the segment's name into
            // each summary: load the name's reference count now (a miss per close otherwise).
            if let Some(seg) = seg {
                if seg.next_end_ms <= reach(ts_ms, spec) {
                    prefetch_read((Arc::as_ptr(&seg.name) as *const u8).wrapping_sub(16));
                }
            }
            let pane = seg.map(|seg| &seg.panes.ring[ring as usize]);
            // A window's sketch usually holds a few buckets: two lines cover them.
            for (_, agg) in pane.into_iter().flat_map(|pane| &pane.aggs) {
                if let Some(sketch) = &agg.sketch {
                    prefetch_span(sketch.store_addr(), 128);
                }
            }
        }
        // Stage 2: segment state of the previous batch.
        hints.slots.clear();
        for &(partition, h, ring, ts_ms) in &hints.hashed {
            let Some(p) = self.partitions.get(partition) else {
                continue;
            };
            let Some((_, slot)) = p.segments.probe(h, |_| true) else {
                continue;
            };
            let seg = &p.segments.slots[slot];
            prefetch_read(seg as *const SegmentWindows as *const u8);
            let pane = &seg.panes.ring[ring as usize];
            prefetch_span(
                pane as *const Pane as *const u8,
                std::mem::size_of::<Pane>(),
            );
            hints.slots.push((partition, slot as u32, ring, ts_ms));
        }
        // Stage 1: index entries of this batch.
        hints.hashed.clear();
        let hop = self.spec.hop_ms;
        for (partition, key, ts_ms) in events {
            let Some(p) = self.partitions.get(partition) else {
                continue;
            };
            let h = p.segments.hash(key);
            p.segments.prefetch_entry(h);
            hints
                .hashed
                .push((partition, h, (ts_ms.div_euclid(hop) & 1) as u8, ts_ms));
        }
        self.hints = hints;
    }

    /// Advances idle partitions on the controller clock, every partition taken as read to the
    /// end (tests, and a driver that knows nothing is waiting): see
    /// [`WindowEngine::advance_idle_read`].
    pub fn advance_idle(&mut self, now_ms: i64, closed: &mut Vec<WindowSummary>) {
        self.advance_idle_read(now_ms, &|_| i64::MAX, closed);
    }

    /// Moves the partitions' progress on the controller clock:
    /// - a partition with events since its progress was last measured is measured again (at
    ///   most once per `hop`, so ticks stay cheap);
    /// - a **truly idle** partition — no accepted event for `idle_timeout`, and everything
    ///   written to it up to `read_through(partition)` read — advances its watermark to
    ///   `min(now, read_through) − idle_timeout`, so quiet segments close windows with
    ///   `count = 0`. A partition with unread backlog is never advanced past it: live,
    ///   `read_through` is when the consumer was last seen at the high watermark; in a replay,
    ///   where the merge stands.
    pub fn advance_idle_read(
        &mut self,
        now_ms: i64,
        read_through: &dyn Fn(i32) -> i64,
        closed: &mut Vec<WindowSummary>,
    ) {
        let spec = &self.spec;
        let mut closing = Closing {
            spec,
            names: &self.names,
            group: self.group.as_ref(),
            stats: &mut self.stats,
            closed,
        };
        for p in self.partitions.values_mut() {
            if p.next_end_ms.is_none() {
                continue;
            }
            if p.since_measure > 0 && now_ms.saturating_sub(p.measured_at_ms) >= spec.hop_ms {
                self.segment_total -= closing.measure_progress(p, now_ms, &mut self.scratch);
            }
            if now_ms.saturating_sub(p.last_arrival_ms) < spec.idle_timeout_ms {
                continue;
            }
            let wm = now_ms
                .min(read_through(p.partition))
                .saturating_sub(spec.idle_timeout_ms);
            self.segment_total -= closing.advance_watermark(p, wm);
        }
    }

    /// Evicts the longest-idle segments (1% of the cap at a time, at least one) across all
    /// partitions: one scan per batch, so a burst of new segments costs a constant amount of
    /// work per insert. Events in an evicted segment's open windows are counted
    /// (`evicted_events`) and reported (`take_evictions`), never silently dropped.
    fn evict(&mut self) {
        let batch = (self.spec.max_segments / 100).max(1);
        let mut all: Vec<(u64, i32, u32)> = self
            .partitions
            .values()
            .flat_map(|p| {
                (0..p.segments.slots.len())
                    .map(move |i| (p.segments.slots[i].last_seq, p.partition, i as u32))
            })
            .collect();
        let batch = batch.min(all.len());
        if batch == 0 {
            return;
        }
        all.select_nth_unstable_by_key(batch - 1, |(seq, _, _)| *seq);
        let victims = &mut all[..batch];
        // Oldest first, whatever order the selection left them in.
        victims.sort_unstable_by_key(|(seq, _, _)| *seq);
        // Names, not slot numbers: removing a segment moves another into its slot.
        let victims: Vec<(i32, Arc<str>)> = victims
            .iter()
            .map(|&(_, partition, i)| {
                let p = self.partitions.get(partition).expect("listed above");
                (partition, p.segments.slots[i as usize].name.clone())
            })
            .collect();
        for (partition, name) in victims {
            let Some(p) = self.partitions.get_mut(partition) else {
                continue;
            };
            let Some(i) = p.segments.find(&name) else {
                continue;
            };
            let seg = &p.segments.slots[i];
            let events = seg.panes.events();
            if events > 0 {
                self.evictions.push(Eviction {
                    partition,
                    segment: name.clone(),
                    events,
                    oldest_pane_ms: seg
                        .panes
                        .iter()
                        .map(|pane| pane.start_ms)
                        .min()
                        .unwrap_or(0),
                });
            }
            p.segments.remove(&name);
            self.segment_total -= 1;
            self.stats.evicted_segments += 1;
            self.stats.evicted_events += events;
            self.stats.open_events -= events;
        }
    }
}

/// Prefetches every cache line of `len` bytes from `ptr`.
#[inline(always)]
fn prefetch_span(ptr: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        prefetch_read(ptr.wrapping_add(off));
        off += 64;
    }
}

#[inline(always)]
fn prefetch_read(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; it never faults or reads into the program, whatever the
    // address (and this one points into a live slot).
    unsafe {
        std::arch::x86_64::_mm_prefetch(ptr as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Why the windows refuse an event: the engine's own reasons (the pipeline dead-letters the
/// record under the matching code; the engine knows no codec).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub kind: Rejected,
    pub message: String,
}

/// The kinds of [`Rejection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Every window the event belongs to has closed for its segment.
    Late,
    /// Further ahead of the controller clock than `max_clock_skew`.
    ClockSkew,
    /// Of a partition these windows do not hold (not assigned here, or revoked).
    NotAssigned,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn not_assigned(partition: i32) -> Rejection {
    Rejection {
        kind: Rejected::NotAssigned,
        message: format!("partition {partition} is not assigned to this instance"),
    }
}

/// What closed the windows of the segment in `slot` (or of a new segment): the end of the
/// oldest window the partition's progress left open, and the point its own progress reached
/// (`latest event − out_of_orderness − grace`; a window ending at or before it is closed).
/// Nothing else closes a segment's windows.
#[inline]
fn closed_to(p: &PartitionWindows, slot: Option<usize>, spec: &WindowSpec) -> (i64, i64) {
    let partition = p.next_end_ms.unwrap_or(i64::MIN);
    let own = slot.map_or(i64::MIN, |i| reach(p.segments.slots[i].last_event_ms, spec));
    (partition, own)
}

/// End of the oldest window the segment's own progress leaves open.
#[inline]
fn own_open_from(seg: &SegmentWindows, spec: &WindowSpec) -> i64 {
    last_end(
        seg.last_event_ms.saturating_sub(spec.out_of_orderness_ms),
        spec,
    )
    .saturating_add(spec.hop_ms)
}

/// How far an event time closes windows: a window ending at or before `reach(ts)` closes
/// (`ts − out_of_orderness − grace`). Window ends are on the hop grid, so comparing an end with
/// it needs no division.
#[inline]
fn reach(ts_ms: i64, spec: &WindowSpec) -> i64 {
    ts_ms
        .saturating_sub(spec.out_of_orderness_ms)
        .saturating_sub(spec.grace_ms)
}

/// End of the last window that closes at watermark `wm`: `end + grace ≤ wm`, on the hop grid.
#[inline]
fn last_end(wm: i64, spec: &WindowSpec) -> i64 {
    (wm.saturating_sub(spec.grace_ms))
        .div_euclid(spec.hop_ms)
        .saturating_mul(spec.hop_ms)
}

/// Clock-skew and lateness checks of an event at `ts_ms` (in the pane starting at `pane_ms`)
/// of a segment whose windows were closed as `closed_to` says (no division: ends are on the
/// hop grid).
#[inline]
fn check_in(
    p: &PartitionWindows,
    (partition_open, own_reach): (i64, i64),
    spec: &WindowSpec,
    group: Option<&str>,
    ts_ms: i64,
    pane_ms: i64,
    now_ms: i64,
) -> Result<(), Rejection> {
    if ts_ms > now_ms.saturating_add(spec.max_clock_skew_ms) {
        return Err(Rejection {
            kind: Rejected::ClockSkew,
            message: format!(
                "event time {ts_ms} is {} ms ahead of the controller clock {now_ms} (max skew {} ms)",
                ts_ms - now_ms,
                spec.max_clock_skew_ms
            ),
        });
    }
    let last_window_end = pane_ms + spec.size_ms;
    if last_window_end < partition_open || last_window_end <= own_reach {
        let open_from = partition_open.max(
            last_end(own_reach.saturating_add(spec.grace_ms), spec).saturating_add(spec.hop_ms),
        );
        return Err(Rejection {
            kind: Rejected::Late,
            message: format!(
                "event time {ts_ms} is late: its segment's {}windows closed up to {open_from} (partition watermark {}, grace {} ms)",
                group.map_or(String::new(), |g| format!("`{g}` ")),
                p.watermark_ms,
                spec.grace_ms,
            ),
        });
    }
    Ok(())
}

/// Segments a partition's progress is measured on at most (see `measure_progress`).
const PROGRESS_SAMPLE: usize = 4096;

/// What every close needs besides the partition or segment it closes: the geometry, the
/// measurement names, the group the summaries carry, the counters, and where closed windows go.
struct Closing<'a> {
    spec: &'a WindowSpec,
    names: &'a Names,
    group: Option<&'a Arc<str>>,
    stats: &'a mut EngineStats,
    closed: &'a mut Vec<WindowSummary>,
}

impl Closing<'_> {
    /// Measures the partition's progress — the lower median of the event-time progress of
    /// its live segments (those with an accepted event within one window span, `size +
    /// out_of_orderness + grace`, of the controller clock), and never past the controller
    /// clock — and moves the watermark to it minus `out_of_orderness` if that is later. Fewer
    /// than half the live segments cannot drag it forward, and no number of segments can drag
    /// it past the clock; a segment that stopped sending stops holding it back one window span
    /// later. Not measured before one window span after the partition's first event (every
    /// live segment has had its say by then). Returns how many segments expired.
    fn measure_progress(
        &mut self,
        p: &mut PartitionWindows,
        now_ms: i64,
        scratch: &mut Vec<i64>,
    ) -> usize {
        let spec = self.spec;
        let span = spec.size_ms + spec.out_of_orderness_ms + spec.grace_ms;
        if now_ms.saturating_sub(p.first_arrival_ms) < span {
            return 0;
        }
        p.since_measure = 0;
        p.measured_at_ms = now_ms;
        let live_from = now_ms.saturating_sub(span);
        scratch.clear();
        // A large partition is measured on an evenly spaced sample of its slots (slot order
        // depends only on the input, so the sample does too): the median of a few thousand is
        // as robust, and a scan of a million slots per measurement cost a quarter of the
        // engine's time.
        let stride = p.segments.slots.len().div_ceil(PROGRESS_SAMPLE).max(1);
        scratch.extend(
            p.segments
                .slots
                .iter()
                .step_by(stride)
                .filter(|s| !s.expired && s.last_arrival_ms >= live_from)
                .map(|s| s.last_event_ms),
        );
        if scratch.is_empty() {
            return 0;
        }
        let k = (scratch.len() - 1) / 2;
        // Producers ahead of the controller clock are ahead of time itself: never followed.
        let progress = (*scratch.select_nth_unstable(k).1).min(now_ms);
        self.advance_watermark(p, progress.saturating_sub(spec.out_of_orderness_ms))
    }

    /// Moves the partition's watermark to `wm` if that is later, closing what it passes (see
    /// `close_windows`). Returns how many segments expired.
    fn advance_watermark(&mut self, p: &mut PartitionWindows, wm: i64) -> usize {
        if wm <= p.watermark_ms {
            return 0;
        }
        p.watermark_ms = wm;
        self.close_windows(p)
    }

    /// Closes, for every segment of the partition, every window with `end + grace ≤
    /// watermark` it has not closed on its own progress, in slab order (which depends only on
    /// the input). Returns how many segments expired.
    fn close_windows(&mut self, p: &mut PartitionWindows) -> usize {
        let spec = self.spec;
        let Some(next_end) = p.next_end_ms else {
            return 0;
        };
        let through = last_end(p.watermark_ms, spec);
        if through < next_end {
            return 0;
        }
        let mut expired: Vec<Arc<str>> = Vec::new();
        for seg in p.segments.slots.iter_mut() {
            if seg.expired || seg.next_end_ms > through {
                continue;
            }
            self.close_segment(seg, through, p.partition);
            let last_closed = seg.next_end_ms - spec.hop_ms;
            if seg.panes.is_empty() && last_closed - seg.last_event_ms > spec.segment_ttl_ms {
                seg.expired = true;
                expired.push(seg.name.clone());
            }
        }
        p.next_end_ms = Some(through + spec.hop_ms);
        let mut removed = 0;
        for name in expired {
            if p.segments.remove(&name) {
                self.stats.expired_segments += 1;
                removed += 1;
            }
        }
        removed
    }

    /// Closes the segment's windows from its oldest open one through the one ending at
    /// `through`, empty ones included, and counts the events of the panes no later window
    /// needs. Empty windows more than `segment_ttl` after the segment's last event are skipped
    /// (a quiet segment is forgotten after its TTL anyway), so a jump in event time — decades,
    /// at worst — costs at most one TTL of windows plus one per open pane, never one per hop
    /// of the jump.
    fn close_segment(&mut self, seg: &mut SegmentWindows, through: i64, partition: i32) {
        let spec = self.spec;
        let tumbling = spec.hop_ms == spec.size_ms;
        let mut end = seg.next_end_ms;
        while end <= through {
            // The first empty window past the TTL is emitted (the sweep then forgets the
            // segment), later ones are not.
            if (end - spec.hop_ms).saturating_sub(seg.last_event_ms) > spec.segment_ttl_ms {
                let next_pane = seg.panes.iter().map(|pane| pane.start_ms).min();
                if next_pane.is_none_or(|n| n >= end) {
                    // Past the TTL with nothing in this window: on to the first window holding
                    // the next pane, or past `through`.
                    let resume = next_pane.map_or(i64::MAX, |n| n.saturating_add(spec.hop_ms));
                    end = resume
                        .min(through.saturating_add(spec.hop_ms))
                        .max(end + spec.hop_ms);
                    continue;
                }
            }
            let start = end - spec.size_ms;
            let (mut summary, freed) = if tumbling {
                take_tumbling(seg, start, end, partition, self.names)
            } else {
                merge_hopping(seg, start, end, spec.hop_ms, partition, self.names)
            };
            summary.group = self.group.cloned();
            self.closed.push(summary);
            self.stats.windows_closed += 1;
            self.stats.windowed_events += freed;
            self.stats.open_events -= freed;
            end += spec.hop_ms;
        }
        seg.next_end_ms = end;
    }
}

fn summary_of(
    seg: &SegmentWindows,
    partition: i32,
    start_ms: i64,
    end_ms: i64,
    count: u64,
    aggs: impl IntoIterator<Item = (u16, Agg)>,
    names: &Names,
) -> WindowSummary {
    let mut measurements: Measurements = aggs
        .into_iter()
        .map(|(id, m)| {
            (
                names.names[id as usize].clone(),
                MeasurementSummary::from_agg(m, names.params),
            )
        })
        .collect();
    measurements.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    WindowSummary {
        partition,
        segment: seg.name.clone(),
        start_ms,
        end_ms,
        count,
        measurements,
        group: None,
    }
}

/// Tumbling: the window is its single pane, moved out. Also returns the events it freed.
fn take_tumbling(
    seg: &mut SegmentWindows,
    start: i64,
    end: i64,
    partition: i32,
    names: &Names,
) -> (WindowSummary, u64) {
    let (count, aggs) = match seg.panes.take(start, end - start) {
        Some(p) => (p.count, p.aggs),
        None => (0, SmallVec::new()),
    };
    // Panes older than this window cannot exist (they closed earlier).
    let older = seg.panes.drop_before(start);
    (
        summary_of(seg, partition, start, end, count, aggs, names),
        count + older,
    )
}

/// Hopping: merge the panes in `[start, end)`, then free those no later window needs (and
/// count their events).
fn merge_hopping(
    seg: &mut SegmentWindows,
    start: i64,
    end: i64,
    hop: i64,
    partition: i32,
    names: &Names,
) -> (WindowSummary, u64) {
    let mut count = 0;
    let mut aggs: Vec<(u16, Agg)> = Vec::new();
    for pane in seg
        .panes
        .sorted()
        .into_iter()
        .filter(|p| p.start_ms >= start && p.start_ms < end)
    {
        count += pane.count;
        for (id, m) in &pane.aggs {
            match aggs.iter_mut().find(|(i, _)| i == id) {
                Some((_, acc)) => acc.merge(m),
                None => aggs.push((*id, m.clone())),
            }
        }
    }
    // The next window starts at start + hop.
    let freed = seg.panes.drop_before(start + hop);
    (
        summary_of(seg, partition, start, end, count, aggs, names),
        freed,
    )
}

/// The default windows and the named window groups (`windows.groups`), fed the same events.
/// An event is taken only when every group takes it (one decision: aggregated everywhere or
/// rejected once), so accounting stays exact.
pub struct Windows {
    main: WindowEngine,
    groups: Vec<WindowEngine>,
}

impl Windows {
    /// The engines a config asks for.
    pub fn from_config(c: &WindowConfig) -> Self {
        Windows {
            main: WindowEngine::new(WindowSpec::from_config(c)),
            groups: c
                .groups
                .iter()
                .map(|(name, g)| WindowEngine::for_group(WindowSpec::for_group(c, g), name))
                .collect(),
        }
    }

    /// Every engine: the default first, then the groups by name.
    pub fn engines(&self) -> impl Iterator<Item = &WindowEngine> {
        std::iter::once(&self.main).chain(&self.groups)
    }

    pub fn spec(&self) -> &WindowSpec {
        self.main.spec()
    }

    /// The default windows' counters (groups see the same events).
    pub fn stats(&self) -> EngineStats {
        self.main.stats()
    }

    pub fn assign(&mut self, partition: i32) {
        self.main.assign(partition);
        for g in &mut self.groups {
            g.assign(partition);
        }
    }

    pub fn revoke(&mut self, partition: i32) -> Option<usize> {
        for g in &mut self.groups {
            g.revoke(partition);
        }
        self.main.revoke(partition)
    }

    pub fn partitions(&self) -> impl Iterator<Item = &PartitionWindows> {
        self.main.partitions()
    }

    /// Open windows of a segment in every group.
    pub fn open_windows(&self, segment: &str) -> Vec<WindowSummary> {
        self.engines()
            .flat_map(|e| e.open_windows(segment))
            .collect()
    }

    /// The lowest committable offset across the groups.
    pub fn committable_offset(&self, partition: i32) -> Option<i64> {
        self.engines()
            .filter_map(|e| e.committable_offset(partition))
            .min()
    }

    /// See [`WindowEngine::prefetch`] (the default windows; groups are rarely hot).
    pub fn prefetch<'k>(&mut self, events: impl IntoIterator<Item = (i32, &'k str, i64)>) {
        self.main.prefetch(events);
    }

    /// Ingests into every engine, or into none (see the type's doc).
    ///
    /// # Errors
    /// As [`WindowEngine::ingest`], from whichever engine refuses first.
    pub fn ingest<'a, M>(
        &mut self,
        at: Position,
        segment: &str,
        ts_ms: i64,
        measurements: M,
        now_ms: i64,
        closed: &mut Vec<WindowSummary>,
    ) -> Result<(), Rejection>
    where
        M: IntoIterator<Item = (&'a str, f64)> + Clone,
    {
        for g in &self.groups {
            g.check(at.partition, segment, ts_ms, now_ms)?;
        }
        self.main
            .ingest(at, segment, ts_ms, measurements.clone(), now_ms, closed)?;
        for g in &mut self.groups {
            if let Err(e) = g.ingest(at, segment, ts_ms, measurements.clone(), now_ms, closed) {
                // Checked above: only a bug gets here; say so rather than lose it silently.
                tracing::error!(group = g.group().unwrap_or(""), error = %e, "window group refused a checked event");
            }
        }
        Ok(())
    }

    /// Leaves clock skew to the caller (a replay judges it against broker timestamps at
    /// admission): the engines check no event against the clock passed to them.
    pub fn judge_skew_at_admission(&mut self) {
        for e in std::iter::once(&mut self.main).chain(&mut self.groups) {
            e.spec.max_clock_skew_ms = i64::MAX;
        }
    }

    /// See [`WindowEngine::advance_idle_read`].
    pub fn advance_idle_read(
        &mut self,
        now_ms: i64,
        read_through: &dyn Fn(i32) -> i64,
        closed: &mut Vec<WindowSummary>,
    ) {
        self.main.advance_idle_read(now_ms, read_through, closed);
        for g in &mut self.groups {
            g.advance_idle_read(now_ms, read_through, closed);
        }
    }

    /// Evictions of every engine (see [`WindowEngine::take_evictions`]); a segment evicted
    /// from several groups is reported once per group.
    pub fn take_evictions(&mut self) -> Vec<Eviction> {
        let mut all = self.main.take_evictions();
        for g in &mut self.groups {
            all.extend(g.take_evictions());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(name: &str) -> SegmentWindows {
        SegmentWindows::new(name, 0, 0, 0)
    }

    #[test]
    fn short_eq_finds_a_difference_at_any_position() {
        for n in 0..=INLINE_KEY {
            let a: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            assert!(short_eq(&a, &a.clone()));
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x40;
                assert!(!short_eq(&a, &b), "n={n} at={at}");
            }
        }
    }

    #[test]
    fn slots_tell_apart_long_names_that_share_the_inline_prefix() {
        let long = "region-0/cluster-07/service-checkout/endpoint-";
        let a = seg(&format!("{long}1"));
        assert!(a.is(&format!("{long}1")));
        assert!(!a.is(&format!("{long}2")));
        assert!(!a.is(&format!("{long}10")));
        assert!(!a.is(long));
        let short = seg("us-1/auth");
        assert!(short.is("us-1/auth"));
        assert!(!short.is("us-1/autH"));
        assert!(!short.is("us-1/auth/"));
    }

    #[test]
    fn segment_table_stays_consistent_under_churn() {
        let mut t = SegmentTable::default();
        let mut model = std::collections::BTreeSet::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let name = format!("seg-{}", x % 500);
            if x % 3 == 0 {
                assert_eq!(t.remove(&name), model.remove(&name));
            } else if t.find(&name).is_none() {
                t.insert(seg(&name));
                model.insert(name);
            }
            if x % 97 == 0 {
                for name in &model {
                    let i = t.find(name).expect("present");
                    assert_eq!(&*t.slots[i].name, name.as_str());
                }
            }
        }
        assert_eq!(t.len(), model.len());
        for name in &model {
            let i = t.find(name).expect("present");
            assert_eq!(&*t.slots[i].name, name.as_str());
        }
        assert!(t.find("absent").is_none());
    }
}
