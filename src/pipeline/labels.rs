//! The label map: each segment's labels for the policies that select on them, bounded.

use super::*;

/// Most memory the label map may hold (its estimate in [`label_bytes`]).
pub const MAX_LABEL_MAP_BYTES: usize = 64 << 20;

/// Labels per segment, kept only while some policy selects on labels. One rule for every
/// driver: a changed set replaces the old one, and the map is emptied only when a segment not
/// in it would take it past `max_segments` or [`MAX_LABEL_MAP_BYTES`]. Segments the windows
/// no longer hold (TTL, eviction, revoke) are dropped by [`Pipeline::end_turn`].
pub(super) struct LabelMap {
    pub(super) on: bool,
    pub(super) cap: usize,
    /// [`MAX_LABEL_MAP_BYTES`], or its share in one shard.
    pub(super) max_bytes: usize,
    pub(super) bytes: usize,
    pub(super) map: FastMap<String, Labels>,
}

pub(super) fn label_bytes(segment: &str, labels: &Labels) -> usize {
    const PER_STRING: usize = 32;
    segment.len()
        + PER_STRING
        + labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * PER_STRING)
            .sum::<usize>()
}

impl LabelMap {
    pub(super) fn note(&mut self, event: &Telemetry<'_>) {
        if !self.on || !event.has_labels() {
            return;
        }
        // Most events repeat their segment's labels: compared borrowed, nothing is copied.
        if self
            .map
            .get(event.segment())
            .is_some_and(|old| event.labels_equal(old))
        {
            return;
        }
        let owned = event.clone().into_owned();
        let size = label_bytes(&owned.segment, &owned.labels);
        match self.map.get(&owned.segment) {
            Some(old) if *old == owned.labels => {}
            Some(old) => {
                self.bytes = self.bytes - label_bytes(&owned.segment, old) + size;
                self.map.insert(owned.segment, owned.labels);
            }
            None => {
                if self.map.len() >= self.cap || self.bytes + size > self.max_bytes {
                    tracing::warn!(
                        segments = self.map.len(),
                        bytes = self.bytes,
                        "label map full: emptied (labels return with each segment's next event)"
                    );
                    self.map.clear();
                    self.bytes = 0;
                }
                self.bytes += size;
                self.map.insert(owned.segment, owned.labels);
            }
        }
    }

    /// Keeps only the segments `held` still says are held.
    pub(super) fn prune(&mut self, held: impl Fn(&str) -> bool) {
        let before = self.map.len();
        self.map.retain(|segment, _| held(segment));
        if self.map.len() != before {
            self.bytes = self.map.iter().map(|(s, l)| label_bytes(s, l)).sum();
        }
    }
}

pub(super) fn uses_labels(policies: &PolicySet) -> bool {
    policies.policies.iter().any(|p| !p.labels.is_empty())
}
