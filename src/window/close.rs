//! Closing windows: the clocks that move (a segment's own progress, its partition's, the idle
//! advance) and the summaries they close.

use super::*;

/// What closed the windows of the segment in `slot` (or of a new segment): the end of the
/// oldest window the partition's progress left open, and the point its own progress reached
/// (`latest event − out_of_orderness − grace`; a window ending at or before it is closed).
/// Nothing else closes a segment's windows.
#[inline]
pub(super) fn closed_to(
    p: &PartitionWindows,
    slot: Option<usize>,
    spec: &WindowSpec,
) -> (i64, i64) {
    let partition = p.next_end_ms.unwrap_or(i64::MIN);
    let own = slot.map_or(i64::MIN, |i| reach(p.segments.slots[i].last_event_ms, spec));
    (partition, own)
}

/// End of the oldest window the segment's own progress leaves open.
#[inline]
pub(super) fn own_open_from(seg: &SegmentWindows, spec: &WindowSpec) -> i64 {
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
pub(super) fn reach(ts_ms: i64, spec: &WindowSpec) -> i64 {
    ts_ms
        .saturating_sub(spec.out_of_orderness_ms)
        .saturating_sub(spec.grace_ms)
}

/// End of the last window that closes at watermark `wm`: `end + grace ≤ wm`, on the hop grid.
#[inline]
pub(super) fn last_end(wm: i64, spec: &WindowSpec) -> i64 {
    (wm.saturating_sub(spec.grace_ms))
        .div_euclid(spec.hop_ms)
        .saturating_mul(spec.hop_ms)
}

/// Clock-skew and lateness checks of an event at `ts_ms` (in the pane starting at `pane_ms`)
/// of a segment whose windows were closed as `closed_to` says (no division: ends are on the
/// hop grid).
#[inline]
pub(super) fn check_in(
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
pub(super) const PROGRESS_SAMPLE: usize = 4096;

/// What every close needs besides the partition or segment it closes: the geometry, the
/// measurement names, the group the summaries carry, the counters, and where closed windows go.
pub(super) struct Closing<'a> {
    pub(super) spec: &'a WindowSpec,
    pub(super) names: &'a Names,
    pub(super) group: Option<&'a Arc<str>>,
    pub(super) stats: &'a mut EngineStats,
    pub(super) closed: &'a mut Vec<WindowSummary>,
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
    pub(super) fn measure_progress(
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
    pub(super) fn advance_watermark(&mut self, p: &mut PartitionWindows, wm: i64) -> usize {
        if wm <= p.watermark_ms {
            return 0;
        }
        p.watermark_ms = wm;
        self.close_windows(p)
    }

    /// Closes, for every segment of the partition, every window with `end + grace ≤
    /// watermark` it has not closed on its own progress, in slab order (which depends only on
    /// the input). Returns how many segments expired.
    pub(super) fn close_windows(&mut self, p: &mut PartitionWindows) -> usize {
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
    pub(super) fn close_segment(&mut self, seg: &mut SegmentWindows, through: i64, partition: i32) {
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

pub(super) fn summary_of(
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
pub(super) fn take_tumbling(
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
pub(super) fn merge_hopping(
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
