//! A segment's controller state: loop phases, and the record the state changelog keeps.

use super::*;

/// Where a (segment, policy) loop stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Healthy,
    Breaching,
    Commanded,
    Acknowledged,
    Verifying,
    Backoff,
    Resolved,
    Escalated,
    /// Fired in dry-run: recorded and emitted with `dry_run = true`, no ack awaited.
    DryRun,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Healthy => "healthy",
            Phase::Breaching => "breaching",
            Phase::Commanded => "commanded",
            Phase::Acknowledged => "acknowledged",
            Phase::Verifying => "verifying",
            Phase::Backoff => "backoff",
            Phase::Resolved => "resolved",
            Phase::Escalated => "escalated",
            Phase::DryRun => "dry_run",
        }
    }

    /// A command of this loop awaits an outcome or verification.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            Phase::Commanded | Phase::Acknowledged | Phase::Verifying
        )
    }

    /// The segment counts as under action (blast radius, inhibition).
    pub fn under_action(self) -> bool {
        self.in_flight() || self == Phase::Backoff
    }
}

/// One (segment, policy) state machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub phase: Phase,
    /// Consecutive breaching windows.
    pub breaches: u32,
    /// Consecutive healthy windows since the incident ended (for `clear_for`).
    pub healthy: u32,
    /// Start of the incident's first breaching window (part of command ids).
    pub incident_start_ms: Option<i64>,
    pub attempt: u32,
    pub command_id: Option<String>,
    /// Ack deadline, verify deadline or backoff end, by phase.
    pub deadline_ms: Option<i64>,
    pub issued_at_ms: Option<i64>,
    pub applied_at_ms: Option<i64>,
    /// Evidence of the window that fired, reused by retries.
    pub reason: Option<CommandReason>,
}

/// What a window's step can change in a loop (see [`LoopState::progress`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Progress {
    phase: Phase,
    breaches: u32,
    healthy: u32,
    incident_start_ms: Option<i64>,
    attempt: u32,
    has_command: bool,
    deadline_ms: Option<i64>,
}

impl LoopState {
    /// Every field a window's step writes (the rest change only where the loop is marked
    /// changed anyway: firing, outcomes, deadlines): equal before and after, the step changed
    /// nothing worth writing.
    pub(super) fn progress(&self) -> Progress {
        Progress {
            phase: self.phase,
            breaches: self.breaches,
            healthy: self.healthy,
            incident_start_ms: self.incident_start_ms,
            attempt: self.attempt,
            has_command: self.command_id.is_some(),
            deadline_ms: self.deadline_ms,
        }
    }

    pub(super) fn new() -> Self {
        LoopState {
            phase: Phase::Healthy,
            breaches: 0,
            healthy: 0,
            incident_start_ms: None,
            attempt: 0,
            command_id: None,
            deadline_ms: None,
            issued_at_ms: None,
            applied_at_ms: None,
            reason: None,
        }
    }
}

/// The version of the state and control records this build writes. A record of a later
/// version (a newer segloop in a rolling upgrade) is refused, named in the log, never misread;
/// records without one are version 1.
pub const RECORD_VERSION: u32 = 1;

pub(super) fn record_version() -> u32 {
    1
}

/// The `version` field of a JSON record (1 when it has none or is not JSON).
pub fn record_version_of(bytes: &[u8]) -> u32 {
    #[derive(Deserialize)]
    struct Versioned {
        #[serde(default = "record_version")]
        version: u32,
    }
    serde_json::from_slice::<Versioned>(bytes).map_or(1, |v| v.version)
}

/// Checks a record's version against [`RECORD_VERSION`].
///
/// # Errors
/// A version this build does not know, with what to do.
pub fn check_record_version(what: &str, version: u32) -> Result<(), String> {
    if version > RECORD_VERSION {
        return Err(format!(
            "{what} of version {version} was written by a newer segloop (this one reads up to {RECORD_VERSION}); finish the upgrade or roll back both"
        ));
    }
    Ok(())
}

/// Controller state of one segment: what the changelog stores and a restore brings back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentState {
    /// The record's format version ([`RECORD_VERSION`]).
    #[serde(default = "record_version")]
    pub version: u32,
    pub segment: String,
    pub partition: i32,
    pub loops: BTreeMap<String, LoopState>,
    /// Last command time per action (cooldowns).
    pub last_action_ms: BTreeMap<String, i64>,
    /// Command times within the flap window.
    pub action_history: Vec<i64>,
    pub frozen_until_ms: Option<i64>,
    /// The freeze (its end) a flap-breaker escalation was sent for: one per freeze.
    #[serde(default)]
    pub escalated_freeze_ms: Option<i64>,
    /// End of the last window seen: a replayed window is ignored.
    pub last_window_end_ms: i64,
    /// The same, per window group.
    #[serde(default)]
    pub last_window_end_by_group: BTreeMap<String, i64>,
    /// Which policies' segment globs match this segment (not stored: recomputed).
    #[serde(skip)]
    pub globs: GlobCache,
}

/// The policies whose segment glob matches a segment, remembered for one policy set: (the
/// set's generation, a bit per policy). Globs are matched once per segment and reload, not once
/// per closed window. Not part of the state's identity (equality ignores it).
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobCache(Option<(u64, u64)>);

impl GlobCache {
    /// The bits for `generation`, computed by `compute` when not remembered.
    pub(super) fn get(&mut self, generation: u64, compute: impl FnOnce() -> u64) -> u64 {
        match self.0 {
            Some((g, bits)) if g == generation => bits,
            _ => {
                let bits = compute();
                self.0 = Some((generation, bits));
                bits
            }
        }
    }
}

impl PartialEq for GlobCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl SegmentState {
    pub(super) fn new(segment: &str, partition: i32) -> Self {
        SegmentState {
            version: RECORD_VERSION,
            segment: segment.into(),
            partition,
            loops: BTreeMap::new(),
            last_action_ms: BTreeMap::new(),
            action_history: Vec::new(),
            frozen_until_ms: None,
            escalated_freeze_ms: None,
            last_window_end_ms: i64::MIN,
            last_window_end_by_group: BTreeMap::new(),
            globs: GlobCache::default(),
        }
    }

    /// End of the last window of `group` seen (`None`: the default windows).
    pub(super) fn last_window_end(&self, group: Option<&str>) -> i64 {
        match group {
            None => self.last_window_end_ms,
            Some(g) => self
                .last_window_end_by_group
                .get(g)
                .copied()
                .unwrap_or(i64::MIN),
        }
    }

    /// Records the end of the window of `group` just judged (see [`Self::last_window_end`]).
    pub(super) fn judged(&mut self, group: Option<&str>, end_ms: i64) {
        match group {
            None => self.last_window_end_ms = end_ms,
            Some(g) => {
                self.last_window_end_by_group.insert(g.to_string(), end_ms);
            }
        }
    }

    /// Policies whose loop here awaits an outcome or verification.
    pub(super) fn in_flight_policies(&self) -> impl Iterator<Item = &str> {
        self.loops
            .iter()
            .filter(|(_, l)| l.phase.in_flight())
            .map(|(name, _)| name.as_str())
    }

    pub(super) fn under_action(&self) -> bool {
        self.loops.values().any(|l| l.phase.under_action())
    }

    /// Whether a restart may forget this state at `now_ms`: every loop healthy, no freeze,
    /// and no action recent enough (`memory_ms`) to count for cooldowns or the flap breaker.
    pub fn is_quiet(&self, now_ms: i64, memory_ms: i64) -> bool {
        self.loops
            .values()
            .all(|l| l.phase == Phase::Healthy && l.breaches == 0)
            && self.frozen_until_ms.is_none_or(|f| f <= now_ms)
            && self
                .last_action_ms
                .values()
                .chain(&self.action_history)
                .all(|&t| now_ms - t >= memory_ms)
    }

    /// The state as changelog bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("controller state should serialize")
    }

    /// # Errors
    /// Bytes that are not a serialized [`SegmentState`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let state: SegmentState =
            serde_json::from_slice(bytes).map_err(|e| format!("bad controller state: {e}"))?;
        check_record_version("a controller state record", state.version)?;
        Ok(state)
    }
}
