//! The read model: what the admin thread reads of the pipeline without locking it.

use super::*;

/// Input accounting: what was read, used and rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InputStats {
    /// Records of owned partitions offered to the pipeline.
    pub records_read: u64,
    pub records_in_range: u64,
    pub records_aggregated: u64,
    pub records_before_range: u64,
    pub records_after_range: u64,
    /// Records rejected, by DLQ reason.
    pub rejected: BTreeMap<String, u64>,
    pub first_event_ms: Option<i64>,
    pub last_event_ms: Option<i64>,
    /// Windows closed (every window group).
    pub windows_closed: u64,
    pub open_windows_at_end: u64,
    /// Failed records re-read at or below the restored dead-letter mark: written to the DLQ
    /// in an earlier lifetime, not again.
    #[serde(skip_serializing_if = "is_zero")]
    pub dead_lettered_before: u64,
    /// Segments the cap (`windows.max_segments`) evicted with events in open windows, and
    /// those events: aggregated, never windowed.
    #[serde(skip_serializing_if = "is_zero")]
    pub evicted_segments: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub evicted_events: u64,
}

pub(super) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Turns a watched segment stays watched after the last request for it.
pub(super) const WATCH_TURNS: u64 = 20_000;
/// Segments watched at most (a request past it replaces the whole list).
pub(super) const MAX_WATCHED: usize = 256;

/// A silence as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SilenceView {
    pub id: String,
    pub segments: String,
    pub from_ms: i64,
    pub until_ms: i64,
    pub reason: String,
    pub created_by: String,
}

/// Per-segment state for readers on other threads (the admin API), written by the pipeline at
/// the end of each turn; readers never take the driver's lock.
#[derive(Debug, Default)]
pub struct ReadModel {
    /// Controller state of every owned segment that is not quiet, as the changelog holds it
    /// (partition, record bytes): loop phases, in-flight commands, cooldowns. Readers parse
    /// it; the loop only copies bytes it wrote anyway (parsing each change back was 2-5% of
    /// the loop thread at 100,000 segments).
    pub(super) states: DashMap<String, (i32, Vec<u8>)>,
    /// Open windows of the watched segments, refreshed every turn.
    pub(super) windows: DashMap<String, Vec<WindowSummary>>,
    /// Segments a reader asked about, with the turn of the last request.
    pub(super) watched: DashMap<String, u64>,
    pub(super) silences: Mutex<Vec<SilenceView>>,
    pub(super) budgets: Mutex<crate::controller::Budgets>,
    pub(super) turn: AtomicU64,
}

impl ReadModel {
    /// Turns the pipeline has ended.
    pub fn turn(&self) -> u64 {
        self.turn.load(Ordering::Acquire)
    }

    /// The controller state of a segment, if owned here and not quiet.
    pub fn state(&self, segment: &str) -> Option<SegmentState> {
        self.states
            .get(segment)
            .and_then(|s| SegmentState::from_bytes(&s.1).ok())
    }

    /// Asks for a segment's open windows: from the end of the next turn on,
    /// [`ReadModel::open_windows`] has them. Returns the current turn.
    pub fn watch(&self, segment: &str) -> u64 {
        let turn = self.turn();
        if self.watched.len() >= MAX_WATCHED && !self.watched.contains_key(segment) {
            self.watched.clear();
        }
        self.watched.insert(segment.to_string(), turn);
        turn
    }

    /// Open windows of a watched segment as of the last turn.
    pub fn open_windows(&self, segment: &str) -> Vec<WindowSummary> {
        self.windows
            .get(segment)
            .map(|w| w.clone())
            .unwrap_or_default()
    }

    /// Every loop awaiting an outcome or verification: (segment, policy, loop).
    pub fn in_flight(&self) -> Vec<(String, String, crate::controller::LoopState)> {
        let mut out: Vec<_> = self
            .states
            .iter()
            .filter_map(|s| SegmentState::from_bytes(&s.1).ok())
            .flat_map(|s| {
                s.loops
                    .into_iter()
                    .filter(|(_, l)| l.phase.in_flight())
                    .map(|(p, l)| (s.segment.clone(), p, l))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The guardrail budgets as of the last turn.
    pub fn budgets(&self) -> crate::controller::Budgets {
        self.budgets.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn silences(&self) -> Vec<SilenceView> {
        self.silences.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(super) fn set_silences<'a>(&self, silences: impl Iterator<Item = &'a Silence>) {
        let list = silences
            .map(|s| SilenceView {
                id: s.id.clone(),
                segments: s.segments_glob.clone(),
                from_ms: s.from_ms,
                until_ms: s.until_ms,
                reason: s.reason.clone(),
                created_by: s.created_by.clone(),
            })
            .collect();
        if let Ok(mut v) = self.silences.lock() {
            *v = list;
        }
    }
}
