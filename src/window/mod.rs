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
//!
//! # Files
//! This file holds the engine ([`WindowEngine`]) and its spec; `summary` the aggregates and
//! closed-window summaries, `panes` a segment's ring of hops, `table` the segment table and
//! partitions, `close` the clocks that close windows, `groups` the window groups.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::sketch::{QuantileSketch, SketchParams};

use crate::config::WindowConfig;

mod close;
mod groups;
mod panes;
mod summary;
mod table;
#[cfg(test)]
mod tests;
use close::*;
pub use groups::*;
use panes::*;
pub use summary::*;
pub use table::*;

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

impl EngineStats {
    /// Adds `other`'s counters (and gauges) to these: the stats of several engines as one.
    pub fn add(&mut self, other: &EngineStats) {
        self.accepted += other.accepted;
        self.late += other.late;
        self.clock_skew += other.clock_skew;
        self.non_finite_values += other.non_finite_values;
        self.dropped_measurement_names += other.dropped_measurement_names;
        self.windows_closed += other.windows_closed;
        self.expired_segments += other.expired_segments;
        self.evicted_segments += other.evicted_segments;
        self.windowed_events += other.windowed_events;
        self.evicted_events += other.evicted_events;
        self.revoked_events += other.revoked_events;
        self.open_events += other.open_events;
        self.segments += other.segments;
    }
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
        let hash = p.segments.hash(segment.as_bytes());
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
    pub fn prefetch<K: AsRef<[u8]>>(&mut self, events: impl IntoIterator<Item = (i32, K, i64)>) {
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
            let h = p.segments.hash(key.as_ref());
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
        self.advance_idle_read(now_ms, &|_| i64::MAX, None, closed);
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
    ///
    /// `partition`: only that one (a driver judging each partition's windows before the next
    /// closes its own keeps `closed` to one partition's worth).
    pub fn advance_idle_read(
        &mut self,
        now_ms: i64,
        read_through: &dyn Fn(i32) -> i64,
        partition: Option<i32>,
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
            if p.next_end_ms.is_none() || partition.is_some_and(|only| only != p.partition) {
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
