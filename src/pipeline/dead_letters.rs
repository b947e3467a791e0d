//! Dead letters per partition: the commit floor they hold until acknowledged, and the mark the
//! changelog keeps.

use super::*;

/// Dead-letter writes per partition: those not yet acknowledged hold the commit floor, and the
/// mark (every failed record at or below it is dead-lettered and acknowledged) goes to the
/// changelog so a re-read after a restart or rebalance writes none twice.
#[derive(Debug, Default)]
pub(super) struct DeadLetters {
    /// Whether writes are acknowledged (a live driver); a replay writes no DLQ.
    pub(super) tracked: bool,
    pub(super) partitions: BTreeMap<i32, DeadLetterState>,
}

#[derive(Debug, Default)]
pub(super) struct DeadLetterState {
    /// Restored from the changelog: records at or below it are not written again.
    pub(super) restored: Option<i64>,
    /// Written, not yet acknowledged.
    pub(super) pending: BTreeSet<i64>,
    /// The highest offset written.
    pub(super) written: Option<i64>,
}

impl DeadLetters {
    /// Whether the failed record at (`partition`, `offset`) is to be written (not at or below
    /// the restored mark); if so it counts as written and pending.
    pub(super) fn admit(&mut self, partition: i32, offset: i64) -> bool {
        let s = self.partitions.entry(partition).or_default();
        if s.restored.is_some_and(|m| offset <= m) {
            return false;
        }
        if self.tracked {
            s.pending.insert(offset);
            s.written = Some(s.written.map_or(offset, |w| w.max(offset)));
        }
        true
    }

    pub(super) fn acked(&mut self, partition: i32, offset: i64) {
        if let Some(s) = self.partitions.get_mut(&partition) {
            s.pending.remove(&offset);
        }
    }

    pub(super) fn floor(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|s| s.pending.first().copied())
    }

    pub(super) fn mark(&self, partition: i32) -> Option<i64> {
        let s = self.partitions.get(&partition)?;
        let done = match s.pending.first() {
            Some(&lowest) => Some(lowest - 1).filter(|_| s.written.is_some()),
            None => s.written,
        };
        match (done, s.restored) {
            (Some(d), Some(r)) => Some(d.max(r)),
            (d, r) => d.or(r),
        }
    }

    pub(super) fn restore(&mut self, partition: i32, mark: Option<i64>) {
        let s = self.partitions.entry(partition).or_default();
        s.restored = mark;
        s.pending.clear();
        s.written = None;
    }

    pub(super) fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}
