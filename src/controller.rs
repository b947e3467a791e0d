//! The closed-loop controller: one state machine per (segment, policy), driven by closed
//! windows, actuator outcomes and an injected controller clock.
//!
//! ```text
//!   healthy ──breach──► breaching ──for N windows, guardrails pass──► commanded
//!      ▲                   │ healthy window                              │ ACCEPTED
//!      │                   ▼                                             ▼
//!      │                healthy                                     acknowledged
//!      │                                                               │ APPLIED (also straight
//!      │                                                               ▼  from commanded)
//!   clear_for healthy windows ◄── resolved ◄──verify holds── verifying
//!      ▲                                                               │ no verify in time
//!      │                                                               ▼ (ineffective), or
//!   escalated ◄── attempts exhausted / flap breaker ◄── backoff ◄── FAILED/REJECTED/no outcome
//!                                                          │ backoff elapsed
//!                                                          └──► commanded (attempt + 1)
//! ```
//!
//! Deadlines (ack, backoff), cooldowns, silences and the flap breaker run on the controller
//! clock (`now_ms`, passed in). A verification is judged on evidence: the first window of the
//! policy that ends at or after the verify deadline and does not verify makes the fix
//! ineffective; the deadline alone decides only once the partition's input is caught up and a
//! window's life has passed (a restart re-reads the healthy windows before judging). Every
//! transition and every suppressed firing yields a [`DecisionRecord`]; the guardrail that
//! suppressed it is named. Nothing here does I/O; the same code runs live and in backtests.
//!
//! Every limit (in-flight, per policy, blast radius, rate) is exact over the partitions this
//! instance owns. Two watches look at the instance as a whole ([`watch`]): firing loops a budget
//! holds back too long, and an actuator that stopped answering (its circuit breaker stops new
//! commands). Each raises one escalation per episode, on the segment [`INSTANCE_SEGMENT`].

mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    CommandReason, DecisionRecord, OutcomeStatus, RemediationCommand, RemediationOutcome,
};
use crate::policy::{Policy, PolicySet, Silence};
use crate::window::WindowSummary;

/// The segment of the escalations and decisions about the instance as a whole (held-back work,
/// the actuator breaker); segment ids of telemetry are never `*` by convention.
pub const INSTANCE_SEGMENT: &str = "*";

/// Namespace of command ids (UUIDv5).
pub const COMMAND_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5e6100b0_0c1d_4a7e_9f00_c0a11d5e6100);

/// The id of a command: UUIDv5 over the length-prefixed segment and policy, the start of the
/// incident's first breaching window and the attempt. Stable across restarts, replays and
/// policy edits (the policy version is not part of it).
pub fn command_id(segment: &str, policy: &str, incident_start_ms: i64, attempt: u32) -> String {
    let mut name = Vec::with_capacity(segment.len() + policy.len() + 32);
    for part in [segment.as_bytes(), policy.as_bytes()] {
        name.extend_from_slice(&(part.len() as u32).to_be_bytes());
        name.extend_from_slice(part);
    }
    name.extend_from_slice(&incident_start_ms.to_be_bytes());
    name.extend_from_slice(&attempt.to_be_bytes());
    uuid::Uuid::new_v5(&COMMAND_ID_NAMESPACE, &name).to_string()
}

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

impl LoopState {
    fn new() -> Self {
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

fn record_version() -> u32 {
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
}

impl SegmentState {
    fn new(segment: &str, partition: i32) -> Self {
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
        }
    }

    /// End of the last window of `group` seen (`None`: the default windows).
    fn last_window_end(&self, group: Option<&str>) -> i64 {
        match group {
            None => self.last_window_end_ms,
            Some(g) => self
                .last_window_end_by_group
                .get(g)
                .copied()
                .unwrap_or(i64::MIN),
        }
    }

    fn under_action(&self) -> bool {
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

/// Which guardrail stopped a firing (the `guardrail` of its decision record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Guardrail {
    Staleness,
    Silence,
    FlapBreaker,
    Inhibited,
    Cooldown,
    PolicyInFlight,
    MaxInFlight,
    BlastRadius,
    RateLimit,
    /// The actuator circuit breaker is open.
    ActuatorBreaker,
}

impl Guardrail {
    pub const ALL: [Guardrail; 10] = [
        Guardrail::Staleness,
        Guardrail::Silence,
        Guardrail::FlapBreaker,
        Guardrail::Inhibited,
        Guardrail::Cooldown,
        Guardrail::PolicyInFlight,
        Guardrail::MaxInFlight,
        Guardrail::BlastRadius,
        Guardrail::RateLimit,
        Guardrail::ActuatorBreaker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Guardrail::Staleness => "staleness",
            Guardrail::Silence => "silence",
            Guardrail::FlapBreaker => "flap_breaker",
            Guardrail::Inhibited => "inhibited",
            Guardrail::Cooldown => "cooldown",
            Guardrail::PolicyInFlight => "policy_max_in_flight",
            Guardrail::MaxInFlight => "max_in_flight",
            Guardrail::BlastRadius => "blast_radius",
            Guardrail::RateLimit => "rate_limit",
            Guardrail::ActuatorBreaker => "actuator_breaker",
        }
    }

    /// A budget: it holds firings back for want of room, not by intent (silences, cooldowns,
    /// inhibition, the flap breaker). Held-back work is escalated past a limit.
    pub fn is_budget(self) -> bool {
        matches!(
            self,
            Guardrail::PolicyInFlight
                | Guardrail::MaxInFlight
                | Guardrail::BlastRadius
                | Guardrail::RateLimit
        )
    }
}

/// Loop timings, per policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingKind {
    /// First breaching window start → command.
    Detect,
    /// Command → first outcome.
    Ack,
    /// First breaching window start → verified.
    Resolve,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoopTiming {
    pub policy: String,
    pub kind: TimingKind,
    pub ms: i64,
}

/// What one controller call produced, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    pub commands: Vec<RemediationCommand>,
    pub decisions: Vec<DecisionRecord>,
    pub timings: Vec<LoopTiming>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.decisions.is_empty() && self.timings.is_empty()
    }

    pub fn clear(&mut self) {
        self.commands.clear();
        self.decisions.clear();
        self.timings.clear();
    }
}

/// What became of an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeDisposition {
    /// Moved its loop on.
    Applied,
    /// Already seen, or for an earlier attempt: ignored.
    Duplicate,
    /// The segment is not owned here (another instance's).
    NotOurs,
    /// Owned segment, but no command with that id: counted and dropped.
    Unknown,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControllerStats {
    pub windows: u64,
    pub evaluations: u64,
    pub firings: u64,
    pub commands: u64,
    pub suppressed: BTreeMap<&'static str, u64>,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub outcomes_unknown: u64,
    pub outcomes_duplicate: u64,
    pub windows_replayed: u64,
}

#[derive(Debug, Clone, Default)]
struct PartitionState {
    segments: BTreeMap<Arc<str>, SegmentState>,
    /// Segments with a loop under action (deadline scans and budgets read only these).
    active: BTreeSet<Arc<str>>,
    /// Segments changed since the last [`Controller::take_changes`].
    dirty: BTreeSet<Arc<str>>,
    /// Segments whose state is in the changelog (a tombstone is due once they go quiet).
    persisted: BTreeSet<Arc<str>>,
}

/// The guardrail budgets of one instance, as used at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Budgets {
    pub in_flight: usize,
    pub max_in_flight: u32,
    pub under_action: usize,
    /// Segments the blast radius allows under action now (at least one).
    pub blast_radius_segments: usize,
    pub known_segments: usize,
    /// Commands the rate limit allows right now.
    pub rate_tokens: f64,
    pub max_actions_per_minute: f64,
    /// (policy, in flight, its max_in_flight) for policies with a limit.
    pub policies: Vec<(String, usize, u32)>,
}

/// A changelog record for the state topic: a segment's state, or `None` to delete it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub partition: i32,
    pub segment: String,
    pub state: Option<Vec<u8>>,
}

/// The controller of the partitions this instance owns. Every limit is exact within it: the
/// in-flight limits count every owned partition's loops, the blast radius is a fraction of every
/// segment known here (never less than one segment), and one token bucket holds the rate.
pub struct Controller {
    policies: PolicySet,
    partitions: BTreeMap<i32, PartitionState>,
    /// The rate limit's token bucket (`None`: full, nothing spent yet).
    tokens: Option<(f64, i64)>,
    /// Silences added at run time (control topic), by id.
    silences: BTreeMap<String, Silence>,
    stats: ControllerStats,
    /// Partitions whose input is read up to the broker's end (`None`: all, as in a replay).
    caught_up: Option<BTreeSet<i32>>,
    /// Processing time past a verify deadline before a caught-up partition with no deciding
    /// window judges the fix anyway (a window's life: size, lateness, idle advance).
    evidence_grace_ms: i64,
    held_back: watch::HeldBack,
    breaker: watch::ActuatorBreaker,
}

/// An escalation about the instance as a whole: its command's params, and the count its
/// decision reports (as an aggregate).
struct InstanceEscalation {
    params: BTreeMap<String, String>,
    count_name: &'static str,
    count: usize,
}

/// Inputs that are the same for every loop touched by one call.
struct Ctx<'a> {
    now_ms: i64,
    window: Option<&'a WindowSummary>,
}

impl Controller {
    pub fn new(policies: PolicySet) -> Self {
        Controller {
            policies,
            partitions: BTreeMap::new(),
            tokens: None,
            silences: BTreeMap::new(),
            stats: ControllerStats::default(),
            caught_up: None,
            evidence_grace_ms: 0,
            held_back: watch::HeldBack::default(),
            breaker: watch::ActuatorBreaker::default(),
        }
    }

    /// How long past a verify deadline a caught-up partition waits for the deciding window.
    pub fn set_evidence_grace(&mut self, ms: i64) {
        self.evidence_grace_ms = ms.max(0);
    }

    /// The partitions whose input is caught up (live: measured from the lag; `None`: every
    /// partition, as in a replay, which reads in order).
    pub fn set_caught_up(&mut self, partitions: Option<BTreeSet<i32>>) {
        self.caught_up = partitions;
    }

    fn is_caught_up(&self, partition: i32) -> bool {
        self.caught_up
            .as_ref()
            .is_none_or(|c| c.contains(&partition))
    }

    /// Whether the actuator breaker is open (new commands stop).
    pub fn actuator_breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Firing loops a budget holds back now.
    pub fn held_back(&self) -> usize {
        self.held_back.waiting()
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    pub fn stats(&self) -> &ControllerStats {
        &self.stats
    }

    pub fn assign(&mut self, partition: i32) {
        self.partitions.entry(partition).or_default();
    }

    /// Drops a partition's controller state (the new owner restores it from the changelog).
    pub fn revoke(&mut self, partition: i32) -> Option<usize> {
        self.partitions.remove(&partition).map(|p| p.segments.len())
    }

    /// Replaces the policy set. Loops of policies that still exist keep their state (new
    /// thresholds apply from the next window); loops of removed policies end with a decision.
    pub fn reload(&mut self, policies: PolicySet, now_ms: i64, out: &mut Effects) {
        let names: BTreeSet<String> = policies.policies.iter().map(|p| p.name.clone()).collect();
        self.policies = policies;
        for p in self.partitions.values_mut() {
            for seg in p.segments.values_mut() {
                let removed: Vec<String> = seg
                    .loops
                    .keys()
                    .filter(|k| !names.contains(*k))
                    .cloned()
                    .collect();
                for name in removed {
                    let l = seg.loops.remove(&name).expect("listed above");
                    out.decisions.push(DecisionRecord {
                        segment: seg.segment.clone(),
                        policy: name,
                        ts_ms: now_ms,
                        from_state: l.phase.as_str().into(),
                        to_state: "removed".into(),
                        trigger: "reload".into(),
                        window_start_ms: None,
                        aggregates: BTreeMap::new(),
                        guardrail: None,
                        command_id: l.command_id,
                    });
                }
                if !seg.under_action() {
                    p.active.remove(seg.segment.as_str());
                }
            }
            p.dirty.extend(p.segments.keys().cloned());
        }
    }

    /// Adds or replaces a run-time silence.
    pub fn add_silence(&mut self, silence: Silence) {
        self.silences.insert(silence.id.clone(), silence);
    }

    pub fn remove_silence(&mut self, id: &str) -> bool {
        self.silences.remove(id).is_some()
    }

    pub fn silences(&self) -> impl Iterator<Item = &Silence> {
        self.policies.silences.iter().chain(self.silences.values())
    }

    /// The controller state of a segment, if owned.
    pub fn segment(&self, segment: &str) -> Option<&SegmentState> {
        self.partitions
            .values()
            .find_map(|p| p.segments.get(segment))
    }

    /// Every owned segment's state (for the changelog and the admin API).
    pub fn segments(&self) -> impl Iterator<Item = &SegmentState> {
        self.partitions.values().flat_map(|p| p.segments.values())
    }

    /// Commands awaiting an outcome or verification.
    pub fn in_flight(&self) -> impl Iterator<Item = (&SegmentState, &str, &LoopState)> {
        self.partitions.values().flat_map(|p| {
            p.active.iter().flat_map(move |s| {
                let seg = &p.segments[s];
                seg.loops
                    .iter()
                    .filter(|(_, l)| l.phase.in_flight())
                    .map(move |(name, l)| (seg, name.as_str(), l))
            })
        })
    }

    /// Restores a segment's state (from the changelog) into its owned partition.
    ///
    /// # Errors
    /// The partition is not assigned here.
    pub fn restore(&mut self, state: SegmentState) -> Result<(), String> {
        let p = self
            .partitions
            .get_mut(&state.partition)
            .ok_or_else(|| format!("partition {} is not assigned", state.partition))?;
        let name: Arc<str> = Arc::from(state.segment.as_str());
        if state.under_action() {
            p.active.insert(name.clone());
        } else {
            p.active.remove(&name);
        }
        p.persisted.insert(name.clone());
        p.segments.insert(name, state);
        Ok(())
    }

    /// How long a segment's past actions still count (cooldowns, the flap window).
    fn memory_ms(&self) -> i64 {
        self.policies
            .policies
            .iter()
            .map(|p| p.cooldown_ms)
            .chain([self.policies.guardrails.flap_window_ms])
            .max()
            .unwrap_or(0)
    }

    /// Forgets the state of segments that are quiet (see [`SegmentState::is_quiet`]) and that
    /// the windows no longer hold (`held(partition, segment)` false: TTL, eviction), so the
    /// controller's memory follows the windows' bound. A persisted one is marked for its
    /// tombstone first and forgotten on a later call. Returns how many were forgotten.
    pub fn forget_quiet(&mut self, now_ms: i64, held: impl Fn(i32, &str) -> bool) -> usize {
        let memory_ms = self.memory_ms();
        let mut forgotten = 0;
        for (&partition, p) in &mut self.partitions {
            let gone: Vec<Arc<str>> = p
                .segments
                .iter()
                .filter(|(name, seg)| {
                    !p.active.contains(*name)
                        && seg.is_quiet(now_ms, memory_ms)
                        && !held(partition, name)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                if p.persisted.contains(&name) {
                    p.dirty.insert(name);
                } else if !p.dirty.contains(&name) {
                    p.segments.remove(&name);
                    forgotten += 1;
                }
            }
        }
        forgotten
    }

    /// The changelog records due since the last call: the state of every changed segment
    /// that is not quiet, and a tombstone for each persisted one that went quiet.
    pub fn take_changes(&mut self, now_ms: i64) -> Vec<StateChange> {
        let memory_ms = self.memory_ms();
        let mut out = Vec::new();
        for (&partition, p) in &mut self.partitions {
            for name in std::mem::take(&mut p.dirty) {
                let Some(seg) = p.segments.get(&name) else {
                    continue;
                };
                if !seg.is_quiet(now_ms, memory_ms) {
                    p.persisted.insert(name.clone());
                    out.push(StateChange {
                        partition,
                        segment: name.to_string(),
                        state: Some(seg.to_bytes()),
                    });
                } else if p.persisted.remove(&name) {
                    out.push(StateChange {
                        partition,
                        segment: name.to_string(),
                        state: None,
                    });
                }
            }
        }
        out
    }

    /// Evaluates every policy that covers the window's segment.
    pub fn on_window(
        &mut self,
        w: &WindowSummary,
        labels: &BTreeMap<String, String>,
        now_ms: i64,
        out: &mut Effects,
    ) {
        self.stats.windows += 1;
        let Some(p) = self.partitions.get(&w.partition) else {
            return;
        };
        if let Some(seg) = p.segments.get(&*w.segment) {
            if w.end_ms <= seg.last_window_end(w.group.as_deref()) {
                // Re-read after a restart: already judged.
                self.stats.windows_replayed += 1;
                return;
            }
        }
        let selected: smallvec::SmallVec<[usize; 8]> = self
            .policies
            .policies
            .iter()
            .enumerate()
            .filter(|(_, pol)| {
                pol.window.as_deref() == w.group.as_deref() && pol.selects(&w.segment, labels)
            })
            .map(|(i, _)| i)
            .collect();
        let p = self.partitions.get_mut(&w.partition).expect("checked");
        let seg = p
            .segments
            .entry(w.segment.clone())
            .or_insert_with(|| SegmentState::new(&w.segment, w.partition));
        match &w.group {
            None => seg.last_window_end_ms = w.end_ms,
            Some(g) => {
                seg.last_window_end_by_group.insert(g.to_string(), w.end_ms);
            }
        }
        // A persisted segment is re-checked each window: it may have gone quiet with time.
        if p.persisted.contains(&*w.segment) && !p.dirty.contains(&*w.segment) {
            p.dirty.insert(w.segment.clone());
        }
        let ctx = Ctx {
            now_ms,
            window: Some(w),
        };
        for i in selected {
            self.stats.evaluations += 1;
            self.step_window(i, &w.segment, w.partition, &ctx, out);
        }
    }

    /// Applies an actuator outcome.
    pub fn on_outcome(
        &mut self,
        o: &RemediationOutcome,
        now_ms: i64,
        out: &mut Effects,
    ) -> OutcomeDisposition {
        let Some((&partition, _)) = self
            .partitions
            .iter()
            .find(|(_, p)| p.segments.contains_key(o.segment.as_str()))
        else {
            // Owned partitions know every segment that has a command in flight.
            return OutcomeDisposition::NotOurs;
        };
        *self.stats.outcomes.entry(o.status.as_str()).or_default() += 1;
        if let Some(since) = self.breaker.close() {
            let ctx = Ctx {
                now_ms,
                window: None,
            };
            self.instance_event(
                None,
                Phase::Escalated,
                Phase::Healthy,
                "actuator_answering",
                since,
                None,
                &ctx,
                out,
            );
        }
        let seg = &self.partitions[&partition].segments[o.segment.as_str()];
        let Some((policy_name, l)) = seg
            .loops
            .iter()
            .find(|(_, l)| l.command_id.as_deref() == Some(o.command_id.as_str()))
        else {
            let earlier = seg.loops.iter().any(|(name, l)| {
                l.incident_start_ms.is_some_and(|start| {
                    (1..l.attempt.max(1))
                        .any(|a| command_id(&o.segment, name, start, a) == o.command_id)
                })
            });
            if earlier {
                self.stats.outcomes_duplicate += 1;
                return OutcomeDisposition::Duplicate;
            }
            self.stats.outcomes_unknown += 1;
            return OutcomeDisposition::Unknown;
        };
        let (policy_name, phase) = (policy_name.clone(), l.phase);
        let ctx = Ctx {
            now_ms,
            window: None,
        };
        if phase == Phase::Commanded {
            self.breaker.answered();
        }
        let next = match (o.status, phase) {
            (OutcomeStatus::Accepted, Phase::Commanded) => {
                self.timing(
                    &policy_name,
                    TimingKind::Ack,
                    l.issued_at_ms.map(|t| now_ms - t),
                    out,
                );
                Some((Phase::Acknowledged, "accepted"))
            }
            (OutcomeStatus::Applied, Phase::Commanded | Phase::Acknowledged) => {
                if phase == Phase::Commanded {
                    self.timing(
                        &policy_name,
                        TimingKind::Ack,
                        l.issued_at_ms.map(|t| now_ms - t),
                        out,
                    );
                }
                Some((Phase::Verifying, "applied"))
            }
            (
                OutcomeStatus::Failed | OutcomeStatus::Rejected,
                Phase::Commanded | Phase::Acknowledged,
            ) => {
                if phase == Phase::Commanded {
                    self.timing(
                        &policy_name,
                        TimingKind::Ack,
                        l.issued_at_ms.map(|t| now_ms - t),
                        out,
                    );
                }
                None
            }
            _ => {
                self.stats.outcomes_duplicate += 1;
                return OutcomeDisposition::Duplicate;
            }
        };
        let Some(pi) = self.policy_index(&policy_name) else {
            return OutcomeDisposition::Unknown;
        };
        match next {
            Some((to, trigger)) => {
                let verify_within = self.policies.policies[pi].verify_within_ms;
                let l = self.loop_mut(partition, &o.segment, &policy_name);
                let from = l.phase;
                l.phase = to;
                if to == Phase::Verifying {
                    l.applied_at_ms = Some(now_ms);
                    l.deadline_ms = Some(now_ms + verify_within);
                }
                let id = l.command_id.clone();
                out.decisions.push(decision(
                    &o.segment,
                    &policy_name,
                    from,
                    to,
                    trigger,
                    &ctx,
                    id,
                    None,
                    Vec::new(),
                ));
            }
            None => {
                let why = if o.status == OutcomeStatus::Failed {
                    "failed"
                } else {
                    "rejected"
                };
                self.retry_or_escalate(pi, partition, &o.segment, why, &ctx, out);
            }
        }
        OutcomeDisposition::Applied
    }

    /// Runs deadlines: ack timeouts, verification deadlines, backoff ends.
    pub fn tick(&mut self, now_ms: i64, out: &mut Effects) {
        let ctx = Ctx {
            now_ms,
            window: None,
        };
        let due: Vec<(i32, Arc<str>, String)> = self
            .partitions
            .iter()
            .flat_map(|(&pn, p)| {
                p.active.iter().flat_map(move |s| {
                    p.segments[s]
                        .loops
                        .iter()
                        .filter(move |(_, l)| l.deadline_ms.is_some_and(|d| now_ms >= d))
                        .map(move |(name, _)| (pn, s.clone(), name.clone()))
                })
            })
            .collect();
        for (partition, segment, policy_name) in due {
            let Some(pi) = self.policy_index(&policy_name) else {
                continue;
            };
            let seg = &self.partitions[&partition].segments[&segment];
            let l = &seg.loops[&policy_name];
            let (phase, deadline) = (l.phase, l.deadline_ms.unwrap_or(now_ms));
            match phase {
                Phase::Commanded | Phase::Acknowledged => {
                    if phase == Phase::Commanded {
                        self.judge_unanswered(&policy_name, &ctx, out);
                    }
                    self.retry_or_escalate(pi, partition, &segment, "ack_timeout", &ctx, out)
                }
                Phase::Verifying => {
                    // Judged on evidence: the deciding window was read (it did not verify, or
                    // the window step would have resolved the loop), or the input is caught up
                    // and a window's life has passed with none.
                    let group = self.policies.policies[pi].window.as_deref();
                    let evidence = seg.last_window_end(group) >= deadline;
                    if evidence
                        || (self.is_caught_up(partition)
                            && now_ms >= deadline.saturating_add(self.evidence_grace_ms))
                    {
                        self.retry_or_escalate(pi, partition, &segment, "ineffective", &ctx, out)
                    }
                }
                Phase::Backoff => self.fire(pi, partition, &segment, &ctx, out),
                _ => {
                    self.loop_mut(partition, &segment, &policy_name).deadline_ms = None;
                }
            }
        }
        self.watch_held_back(&ctx, out);
    }

    /// A command went unanswered past its ack deadline: the actuator breaker judges it.
    fn judge_unanswered(&mut self, policy: &str, ctx: &Ctx<'_>, out: &mut Effects) {
        let g = &self.policies.guardrails;
        let Some(unanswered) = self.breaker.unanswered(
            ctx.now_ms,
            g.actuator_breaker_min_commands,
            g.actuator_breaker_ratio,
            g.actuator_breaker_probe_ms,
        ) else {
            return;
        };
        let params = BTreeMap::from([
            (
                "escalation_reason".to_string(),
                "actuator_not_acknowledging".to_string(),
            ),
            ("unanswered_commands".to_string(), unanswered.to_string()),
        ]);
        self.instance_event(
            Some(policy),
            Phase::Healthy,
            Phase::Escalated,
            "actuator_not_acknowledging",
            ctx.now_ms,
            Some(InstanceEscalation {
                params,
                count_name: "unanswered_commands",
                count: unanswered,
            }),
            ctx,
            out,
        );
    }

    /// Drops held-back loops that stopped waiting; escalates a backlog that waited too long,
    /// once, and says when it drained.
    fn watch_held_back(&mut self, ctx: &Ctx<'_>, out: &mut Effects) {
        if self.held_back.waiting() > 0 {
            let partitions = &self.partitions;
            self.held_back.retain(|segment, policy| {
                partitions.values().any(|p| {
                    p.segments
                        .get(segment)
                        .and_then(|s| s.loops.get(policy))
                        .is_some_and(|l| matches!(l.phase, Phase::Breaching | Phase::Backoff))
                })
            });
        }
        let after = self.policies.guardrails.held_back_escalate_after_ms;
        match self.held_back.check(ctx.now_ms, after) {
            Some(watch::Episode::HeldBack {
                waiting,
                guardrail,
                since_ms,
                policy,
            }) => {
                let params = BTreeMap::from([
                    ("escalation_reason".to_string(), "held_back".to_string()),
                    ("guardrail".to_string(), guardrail.as_str().to_string()),
                    ("waiting_segments".to_string(), waiting.to_string()),
                    ("waiting_since_ms".to_string(), since_ms.to_string()),
                ]);
                self.instance_event(
                    Some(&policy),
                    Phase::Healthy,
                    Phase::Escalated,
                    &format!("held_back:{}", guardrail.as_str()),
                    since_ms,
                    Some(InstanceEscalation {
                        params,
                        count_name: "waiting_segments",
                        count: waiting,
                    }),
                    ctx,
                    out,
                );
            }
            Some(watch::Episode::Drained { since_ms }) => self.instance_event(
                None,
                Phase::Escalated,
                Phase::Healthy,
                "held_back_drained",
                since_ms,
                None,
                ctx,
                out,
            ),
            None => {}
        }
    }

    /// A decision about the instance as a whole (segment [`INSTANCE_SEGMENT`]) and, with
    /// `escalation` (its params and the count it reports), the escalation command: the
    /// escalate action of `policy` if it has one, else of the first policy that has one.
    #[allow(clippy::too_many_arguments)]
    fn instance_event(
        &mut self,
        policy: Option<&str>,
        from: Phase,
        to: Phase,
        trigger: &str,
        since_ms: i64,
        escalation: Option<InstanceEscalation>,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let chosen = policy
            .and_then(|name| self.policies.policy(name))
            .filter(|p| p.escalate.is_some())
            .or_else(|| self.policies.policies.iter().find(|p| p.escalate.is_some()))
            .or_else(|| policy.and_then(|name| self.policies.policy(name)))
            .or_else(|| self.policies.policies.first());
        let name = chosen.map_or_else(String::new, |p| p.name.clone());
        let mut id = None;
        let mut aggregates = Vec::new();
        if let Some(InstanceEscalation {
            params,
            count_name,
            count,
        }) = escalation
        {
            aggregates.push((count_name.to_string(), count as f64));
            if let Some((p, action)) = chosen.and_then(|p| Some((p, p.escalate.clone()?))) {
                let cid = command_id(INSTANCE_SEGMENT, &format!("{name}:{trigger}"), since_ms, 1);
                id = Some(cid.clone());
                self.stats.commands += 1;
                out.commands.push(RemediationCommand {
                    command_id: cid,
                    segment: INSTANCE_SEGMENT.into(),
                    policy: name.clone(),
                    policy_version: p.version,
                    action,
                    params,
                    attempt: 1,
                    issued_at_ms: ctx.now_ms,
                    ack_deadline_ms: ctx.now_ms + p.ack_timeout_ms,
                    reason: reason_without_window(p, since_ms),
                    dry_run: p.dry_run,
                });
            }
        }
        out.decisions.push(decision(
            INSTANCE_SEGMENT,
            &name,
            from,
            to,
            trigger,
            ctx,
            id,
            None,
            aggregates,
        ));
    }

    fn policy_index(&self, name: &str) -> Option<usize> {
        self.policies.policies.iter().position(|p| p.name == name)
    }

    /// The state of a segment of an owned partition (it exists once a window was judged).
    fn segment_mut(&mut self, partition: i32, segment: &str) -> &mut SegmentState {
        self.partitions
            .get_mut(&partition)
            .expect("partition owned")
            .segments
            .get_mut(segment)
            .expect("segment known")
    }

    fn loop_mut(&mut self, partition: i32, segment: &str, policy: &str) -> &mut LoopState {
        let p = self
            .partitions
            .get_mut(&partition)
            .expect("partition owned");
        if !p.dirty.contains(segment) {
            let (name, _) = p.segments.get_key_value(segment).expect("segment known");
            p.dirty.insert(name.clone());
        }
        let loops = &mut p.segments.get_mut(segment).expect("segment known").loops;
        if !loops.contains_key(policy) {
            loops.insert(policy.to_string(), LoopState::new());
        }
        loops.get_mut(policy).expect("inserted above")
    }

    fn timing(&self, policy: &str, kind: TimingKind, ms: Option<i64>, out: &mut Effects) {
        if let Some(ms) = ms {
            out.timings.push(LoopTiming {
                policy: policy.into(),
                kind,
                ms: ms.max(0),
            });
        }
    }

    fn sync_active(&mut self, partition: i32, segment: &str) {
        let p = self
            .partitions
            .get_mut(&partition)
            .expect("partition owned");
        let seg = &p.segments[segment];
        if seg.under_action() {
            if !p.active.contains(segment) {
                p.active.insert(Arc::from(segment));
            }
        } else {
            p.active.remove(segment);
        }
    }

    fn step_window(
        &mut self,
        pi: usize,
        segment: &str,
        partition: i32,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let w = ctx.window.expect("window step has a window");
        let policy = &self.policies.policies[pi];
        let breach = policy.when.holds(w);
        // Most windows of most segments change nothing: leave before any allocation.
        if !breach {
            let quiet = self
                .partitions
                .get(&partition)
                .and_then(|p| p.segments.get(segment))
                .is_none_or(|s| {
                    s.loops
                        .get(&policy.name)
                        .is_none_or(|l| l.phase == Phase::Healthy && l.breaches == 0)
                });
            if quiet {
                return;
            }
        }
        let name = policy.name.clone();
        let clear_for = policy.clear_for;
        let for_windows = policy.for_windows;
        let verified = policy.verified_by(w);
        let l = self.loop_mut(partition, segment, &name);
        let from = l.phase;
        let mut fire = false;
        let mut ineffective = false;
        let mut to = from;
        let mut trigger = "window";
        match from {
            Phase::Healthy | Phase::Breaching => {
                if breach {
                    l.breaches += 1;
                    if l.incident_start_ms.is_none() {
                        l.incident_start_ms = Some(w.start_ms);
                        l.attempt = 0;
                    }
                    to = Phase::Breaching;
                    fire = l.breaches >= for_windows;
                } else if from == Phase::Breaching {
                    to = Phase::Healthy;
                    l.breaches = 0;
                    l.incident_start_ms = None;
                }
            }
            Phase::Verifying => {
                if verified && l.applied_at_ms.is_some_and(|t| w.start_ms >= t) {
                    to = Phase::Resolved;
                    trigger = "verified";
                    l.healthy = 1;
                    l.deadline_ms = None;
                    let start = l.incident_start_ms;
                    self.timing(
                        &name,
                        TimingKind::Resolve,
                        start.map(|s| ctx.now_ms - s),
                        out,
                    );
                } else if l.deadline_ms.is_some_and(|d| w.end_ms >= d) {
                    // The deciding window: it reaches the verify deadline and does not verify.
                    ineffective = true;
                }
            }
            Phase::Resolved | Phase::Escalated | Phase::DryRun => {
                if breach {
                    l.healthy = 0;
                    if from != Phase::Escalated {
                        // The fix did not hold: a new incident (cooldowns still apply).
                        to = Phase::Breaching;
                        l.breaches = 1;
                        l.incident_start_ms = Some(w.start_ms);
                        l.attempt = 0;
                        l.command_id = None;
                        fire = for_windows <= 1;
                    }
                } else {
                    l.healthy += 1;
                    if l.healthy >= clear_for {
                        to = Phase::Healthy;
                        trigger = "cleared";
                        l.breaches = 0;
                        l.healthy = 0;
                        l.incident_start_ms = None;
                        l.command_id = None;
                        l.attempt = 0;
                    }
                }
            }
            Phase::Commanded | Phase::Acknowledged | Phase::Backoff => {}
        }
        let l = self.loop_mut(partition, segment, &name);
        l.phase = to;
        let id = l.command_id.clone();
        if to != from {
            let mut aggs = Vec::new();
            self.policies.policies[pi].when.aggregates(w, &mut aggs);
            out.decisions.push(decision(
                segment, &name, from, to, trigger, ctx, id, None, aggs,
            ));
        }
        if ineffective {
            self.retry_or_escalate(pi, partition, segment, "ineffective", ctx, out);
        }
        if fire {
            let reason = policy_reason(&self.policies.policies[pi], w);
            self.loop_mut(partition, segment, &name).reason = reason;
            self.fire(pi, partition, segment, ctx, out);
        }
        self.sync_active(partition, segment);
    }

    /// Fires the next attempt, unless a guardrail stops it.
    fn fire(&mut self, pi: usize, partition: i32, segment: &str, ctx: &Ctx<'_>, out: &mut Effects) {
        let now = ctx.now_ms;
        let policy = self.policies.policies[pi].clone();
        if let Some(g) = self.guardrail(&policy, partition, segment, ctx) {
            *self.stats.suppressed.entry(g.as_str()).or_default() += 1;
            if g.is_budget() {
                self.held_back.hold(segment, &policy.name, g, now);
            }
            let mut aggs = Vec::new();
            if let Some(w) = ctx.window {
                policy.when.aggregates(w, &mut aggs);
            }
            let l = self.loop_mut(partition, segment, &policy.name);
            let phase = l.phase;
            if phase == Phase::Backoff {
                // Try again after another base backoff rather than on every tick.
                l.deadline_ms = Some(now + policy.backoff_ms.max(1));
            }
            out.decisions.push(decision(
                segment,
                &policy.name,
                phase,
                phase,
                "suppressed",
                ctx,
                None,
                Some(g),
                aggs,
            ));
            if g == Guardrail::FlapBreaker {
                self.trip_flap_breaker(pi, partition, segment, ctx, out);
            }
            return;
        }
        self.stats.firings += 1;
        self.held_back.release(segment, &policy.name);
        let seg = self.segment_mut(partition, segment);
        seg.last_action_ms.insert(policy.action.clone(), now);
        seg.action_history.push(now);
        let (tokens, _) = self.tokens.get_or_insert((self.rate_burst(), now));
        *tokens -= 1.0;
        let l = self.loop_mut(partition, segment, &policy.name);
        let from = l.phase;
        l.attempt += 1;
        let attempt = l.attempt;
        let start = l.incident_start_ms.unwrap_or(now);
        let id = command_id(segment, &policy.name, start, attempt);
        l.command_id = Some(id.clone());
        l.issued_at_ms = Some(now);
        l.applied_at_ms = None;
        let reason = l
            .reason
            .clone()
            .unwrap_or_else(|| reason_without_window(&policy, start));
        let to = if policy.dry_run {
            l.deadline_ms = None;
            l.healthy = 0;
            Phase::DryRun
        } else {
            l.deadline_ms = Some(now + policy.ack_timeout_ms);
            Phase::Commanded
        };
        l.phase = to;
        if attempt == 1 {
            self.timing(&policy.name, TimingKind::Detect, Some(now - start), out);
        }
        self.stats.commands += 1;
        out.commands.push(RemediationCommand {
            command_id: id.clone(),
            segment: segment.into(),
            policy: policy.name.clone(),
            policy_version: policy.version,
            action: policy.action.clone(),
            params: policy.params.clone(),
            attempt: attempt as i32,
            issued_at_ms: now,
            ack_deadline_ms: now + policy.ack_timeout_ms,
            reason,
            dry_run: policy.dry_run,
        });
        let mut aggs = Vec::new();
        if let Some(w) = ctx.window {
            policy.when.aggregates(w, &mut aggs);
        }
        let trigger = if from == Phase::Backoff {
            "retry"
        } else {
            "fired"
        };
        out.decisions.push(decision(
            segment,
            &policy.name,
            from,
            to,
            trigger,
            ctx,
            Some(id),
            None,
            aggs,
        ));
        self.sync_active(partition, segment);
    }

    /// The first guardrail that stops a firing now, if any.
    fn guardrail(
        &mut self,
        policy: &Policy,
        partition: i32,
        segment: &str,
        ctx: &Ctx<'_>,
    ) -> Option<Guardrail> {
        let now = ctx.now_ms;
        let g = self.policies.guardrails.clone();
        if let Some(w) = ctx.window {
            if now - w.end_ms > g.max_action_staleness_ms {
                return Some(Guardrail::Staleness);
            }
        }
        if self.silences().any(|s| s.covers(segment, now)) {
            return Some(Guardrail::Silence);
        }
        let p = self.partitions.get_mut(&partition).expect("owned");
        let seg = p.segments.get_mut(segment).expect("known");
        if seg.frozen_until_ms.is_some_and(|t| now < t) {
            return Some(Guardrail::FlapBreaker);
        }
        seg.action_history.retain(|&t| now - t < g.flap_window_ms);
        if seg.action_history.len() as u32 >= g.flap_max_actions {
            seg.frozen_until_ms = Some(now + g.flap_freeze_ms);
            return Some(Guardrail::FlapBreaker);
        }
        if let Some(&last) = seg.last_action_ms.get(&policy.action) {
            // A retry of the same incident is not held back by its own cooldown.
            let own_retry = seg
                .loops
                .get(&policy.name)
                .is_some_and(|l| l.phase == Phase::Backoff);
            if !own_retry && now - last < policy.cooldown_ms {
                return Some(Guardrail::Cooldown);
            }
        }
        // Inhibition down the tree: an ancestor under action holds its descendants.
        let mut prefix = segment;
        while let Some(i) = prefix.rfind('/') {
            prefix = &prefix[..i];
            if self.partitions.values().any(|q| q.active.contains(prefix)) {
                return Some(Guardrail::Inhibited);
            }
        }
        // The budgets, over every partition owned here.
        if let Some(limit) = policy.max_in_flight {
            if self.in_flight_count(Some(&policy.name)) + 1 > limit as usize {
                return Some(Guardrail::PolicyInFlight);
            }
        }
        if self.in_flight_count(None) + 1 > g.max_in_flight as usize {
            return Some(Guardrail::MaxInFlight);
        }
        let already = self.partitions[&partition].active.contains(segment);
        if !already
            && self.under_action() as f64 + 1.0
                > self.blast_radius_budget(self.known_segments()) + 1e-9
        {
            return Some(Guardrail::BlastRadius);
        }
        let tokens = self.rate_tokens(now);
        self.tokens = Some((tokens, now));
        if tokens < 1.0 - 1e-9 {
            return Some(Guardrail::RateLimit);
        }
        // Last: a probe let through while open must not be stopped by another guardrail.
        if !policy.dry_run && self.breaker.blocks(now, g.actuator_breaker_probe_ms) {
            return Some(Guardrail::ActuatorBreaker);
        }
        None
    }

    /// Loops awaiting an outcome or verification over every owned partition (of `policy`, or
    /// of every policy).
    fn in_flight_count(&self, policy: Option<&str>) -> usize {
        self.in_flight()
            .filter(|(_, name, _)| policy.is_none_or(|x| x == *name))
            .count()
    }

    /// Segments under action over every owned partition.
    fn under_action(&self) -> usize {
        self.partitions.values().map(|p| p.active.len()).sum()
    }

    /// Segments known over every owned partition.
    fn known_segments(&self) -> usize {
        self.partitions.values().map(|p| p.segments.len()).sum()
    }

    /// The rate limit's tokens at `now_ms`: refilled at the rate per minute up to the burst.
    fn rate_tokens(&self, now_ms: i64) -> f64 {
        let burst = self.rate_burst();
        self.tokens.map_or(burst, |(t, at)| {
            let rate = self.policies.guardrails.max_actions_per_minute;
            (t + rate * (now_ms - at).max(0) as f64 / 60_000.0).min(burst)
        })
    }

    /// The budgets in use now: what `/actions` shows next to the commands in flight.
    pub fn budgets(&self, now_ms: i64) -> Budgets {
        let g = &self.policies.guardrails;
        let known = self.known_segments();
        Budgets {
            in_flight: self.in_flight_count(None),
            max_in_flight: g.max_in_flight,
            under_action: self.under_action(),
            blast_radius_segments: self.blast_radius_budget(known).floor() as usize,
            known_segments: known,
            rate_tokens: self.rate_tokens(now_ms),
            max_actions_per_minute: g.max_actions_per_minute,
            policies: self
                .policies
                .policies
                .iter()
                .filter_map(|p| {
                    p.max_in_flight
                        .map(|limit| (p.name.clone(), self.in_flight_count(Some(&p.name)), limit))
                })
                .collect(),
        }
    }

    /// Segments that may be under action at once with `known` segments: the blast radius's
    /// fraction of them, never less than one.
    fn blast_radius_budget(&self, known: usize) -> f64 {
        (self.policies.guardrails.blast_radius * known as f64).max(1.0)
    }

    /// The rate limit's burst: a minute's worth, at least one command.
    fn rate_burst(&self) -> f64 {
        self.policies.guardrails.max_actions_per_minute.max(1.0)
    }

    fn trip_flap_breaker(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let seg = self.segment_mut(partition, segment);
        // One escalation per freeze: a loop that cleared and breaches again inside the same
        // freeze is held back (its decision says flap_breaker) but pages nobody again.
        if seg.frozen_until_ms.is_some() && seg.escalated_freeze_ms == seg.frozen_until_ms {
            return;
        }
        seg.escalated_freeze_ms = seg.frozen_until_ms;
        let l = self.loop_mut(partition, segment, &self.policies.policies[pi].name.clone());
        if l.phase == Phase::Escalated {
            return;
        }
        self.escalate(pi, partition, segment, "flap_breaker", ctx, out);
    }

    fn retry_or_escalate(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        why: &'static str,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let policy = self.policies.policies[pi].clone();
        let seed = self.policies.guardrails.seed;
        // While the actuator breaker is open an unanswered command is the actuator's fault, not
        // the fix's: the loop waits in backoff instead of paging per segment.
        let breaker_holds = why == "ack_timeout" && self.breaker.is_open();
        let l = self.loop_mut(partition, segment, &policy.name);
        if l.attempt < policy.max_attempts || breaker_holds {
            let from = l.phase;
            let delay = backoff_ms(
                &policy,
                l.attempt,
                seed,
                l.command_id.as_deref().unwrap_or(""),
            );
            l.phase = Phase::Backoff;
            l.deadline_ms = Some(ctx.now_ms + delay);
            let id = l.command_id.clone();
            out.decisions.push(decision(
                segment,
                &policy.name,
                from,
                Phase::Backoff,
                why,
                ctx,
                id,
                None,
                Vec::new(),
            ));
            self.sync_active(partition, segment);
        } else {
            self.escalate(pi, partition, segment, why, ctx, out);
        }
    }

    /// Ends the incident as escalated, emitting the policy's escalation action once.
    fn escalate(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        why: &'static str,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let policy = self.policies.policies[pi].clone();
        let now = ctx.now_ms;
        let l = self.loop_mut(partition, segment, &policy.name);
        let from = l.phase;
        l.phase = Phase::Escalated;
        l.deadline_ms = None;
        l.healthy = 0;
        let start = l.incident_start_ms.unwrap_or(now);
        // Escalations take the attempt number after the last; ids stay unique per incident.
        let attempt = l.attempt + 1;
        let reason = l.reason.clone();
        let mut id = None;
        if let Some(action) = &policy.escalate {
            let cid = command_id(segment, &policy.name, start, attempt);
            l.command_id = Some(cid.clone());
            l.attempt = attempt;
            id = Some(cid.clone());
            self.stats.commands += 1;
            out.commands.push(RemediationCommand {
                command_id: cid,
                segment: segment.into(),
                policy: policy.name.clone(),
                policy_version: policy.version,
                action: action.clone(),
                params: BTreeMap::from([("escalation_reason".to_string(), why.to_string())]),
                attempt: attempt as i32,
                issued_at_ms: now,
                ack_deadline_ms: now + policy.ack_timeout_ms,
                reason: reason.unwrap_or_else(|| reason_without_window(&policy, start)),
                dry_run: policy.dry_run,
            });
        }
        out.decisions.push(decision(
            segment,
            &policy.name,
            from,
            Phase::Escalated,
            why,
            ctx,
            id,
            None,
            Vec::new(),
        ));
        self.sync_active(partition, segment);
    }
}

/// Exponential backoff with ±50% jitter from a seeded generator keyed by the command, so a
/// replay or a restored controller computes the same delay.
fn backoff_ms(policy: &Policy, attempt: u32, seed: u64, command_id: &str) -> i64 {
    let exp = policy
        .backoff_ms
        .saturating_mul(1i64 << attempt.saturating_sub(1).min(30))
        .min(policy.backoff_max_ms);
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in command_id.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    // SplitMix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
    ((exp as f64) * (0.5 + unit)).round() as i64
}

/// The reason of a command no window decided (a loop restored without its evidence).
fn reason_without_window(policy: &Policy, start: i64) -> CommandReason {
    CommandReason {
        condition: policy.when_text.clone(),
        metric: String::new(),
        observed: f64::NAN,
        threshold: f64::NAN,
        window_start_ms: start,
        window_end_ms: start,
    }
}

fn policy_reason(policy: &Policy, w: &WindowSummary) -> Option<CommandReason> {
    let ev = policy.when.evidence(w);
    Some(CommandReason {
        condition: policy.when_text.clone(),
        metric: ev.as_ref().map_or_else(String::new, |e| e.metric.clone()),
        observed: ev.as_ref().map_or(f64::NAN, |e| e.observed),
        threshold: ev.as_ref().map_or(f64::NAN, |e| e.threshold),
        window_start_ms: w.start_ms,
        window_end_ms: w.end_ms,
    })
}

#[allow(clippy::too_many_arguments)]
fn decision(
    segment: &str,
    policy: &str,
    from: Phase,
    to: Phase,
    trigger: &str,
    ctx: &Ctx<'_>,
    command_id: Option<String>,
    guardrail: Option<Guardrail>,
    aggregates: Vec<(String, f64)>,
) -> DecisionRecord {
    DecisionRecord {
        segment: segment.into(),
        policy: policy.into(),
        ts_ms: ctx.now_ms,
        from_state: from.as_str().into(),
        to_state: to.as_str().into(),
        trigger: trigger.into(),
        window_start_ms: ctx.window.map(|w| w.start_ms),
        aggregates: aggregates.into_iter().collect(),
        guardrail: guardrail.map(|g| g.as_str().to_string()),
        command_id,
    }
}
