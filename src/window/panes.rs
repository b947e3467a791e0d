//! Panes: a segment's ring of hops, the unit events are added to.

use super::*;

/// `start_ms` of an unused pane position.
pub(super) const NO_PANE: i64 = i64::MIN;

/// One hop of one segment: the unit events are added to (160 bytes with two measurements).
pub(super) struct Pane {
    pub(super) start_ms: i64,
    pub(super) count: u64,
    pub(super) min_offset: i64,
    pub(super) aggs: SmallVec<[(u16, Agg); INLINE_MEASUREMENTS]>,
}

impl Pane {
    const UNUSED: Pane = Pane {
        start_ms: NO_PANE,
        count: 0,
        min_offset: i64::MAX,
        aggs: SmallVec::new_const(),
    };

    pub(super) fn new(start_ms: i64, offset: i64) -> Self {
        Pane {
            start_ms,
            min_offset: offset,
            ..Pane::UNUSED
        }
    }

    pub(super) fn is_used(&self) -> bool {
        self.start_ms != NO_PANE
    }
}

/// The open panes of a segment. A pane lives in `ring[(start / hop) % 2]` when that position
/// is free, else in `extra` (sorted by start). Tumbling windows whose lateness is shorter than a
/// window (the default) never need `extra`: the open pane and the one before it alternate
/// positions. So the position an event goes to is known from its timestamp alone, before its
/// segment is read, and a prefetch can load exactly that pane.
pub(super) struct Panes {
    pub(super) ring: [Pane; 2],
    pub(super) extra: Vec<Pane>,
}

impl Panes {
    pub(super) const EMPTY: Panes = Panes {
        ring: [Pane::UNUSED, Pane::UNUSED],
        extra: Vec::new(),
    };

    #[inline]
    pub(super) fn ring_index(start_ms: i64, hop_ms: i64) -> usize {
        (start_ms.div_euclid(hop_ms) & 1) as usize
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.ring[0].is_used() && !self.ring[1].is_used() && self.extra.is_empty()
    }

    /// The pane starting at `start_ms` (ring position `r`), created if missing.
    #[inline]
    pub(super) fn pane_mut(&mut self, start_ms: i64, r: usize, offset: i64) -> &mut Pane {
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
    pub(super) fn iter(&self) -> impl Iterator<Item = &Pane> {
        self.ring.iter().filter(|p| p.is_used()).chain(&self.extra)
    }

    /// Every open pane, oldest first.
    pub(super) fn sorted(&self) -> SmallVec<[&Pane; 4]> {
        let mut v: SmallVec<[&Pane; 4]> = self.iter().collect();
        v.sort_unstable_by_key(|p| p.start_ms);
        v
    }

    /// Removes and returns the pane starting at `start_ms`.
    pub(super) fn take(&mut self, start_ms: i64, hop_ms: i64) -> Option<Pane> {
        let r = Self::ring_index(start_ms, hop_ms);
        if self.ring[r].start_ms == start_ms {
            return Some(std::mem::replace(&mut self.ring[r], Pane::UNUSED));
        }
        let i = self.extra.iter().position(|p| p.start_ms == start_ms)?;
        Some(self.extra.remove(i))
    }

    /// Drops every pane starting before `start_ms`; returns how many events they held.
    pub(super) fn drop_before(&mut self, start_ms: i64) -> u64 {
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
    pub(super) fn events(&self) -> u64 {
        self.iter().map(|p| p.count).sum()
    }
}
