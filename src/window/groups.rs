//! Window groups: engines of other sizes next to the default one, fed the same events.

use super::*;

/// The default windows and the named window groups (`windows.groups`), fed the same events.
/// An event is taken only when every group takes it (one decision: aggregated everywhere or
/// rejected once), so accounting stays exact.
pub struct Windows {
    pub(super) main: WindowEngine,
    pub(super) groups: Vec<WindowEngine>,
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

    /// The default windows of one partition, if owned.
    pub fn partition(&self, partition: i32) -> Option<&PartitionWindows> {
        self.main.partition(partition)
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
    pub fn prefetch<K: AsRef<[u8]>>(&mut self, events: impl IntoIterator<Item = (i32, K, i64)>) {
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
        partition: Option<i32>,
        closed: &mut Vec<WindowSummary>,
    ) {
        self.main
            .advance_idle_read(now_ms, read_through, partition, closed);
        for g in &mut self.groups {
            g.advance_idle_read(now_ms, read_through, partition, closed);
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
