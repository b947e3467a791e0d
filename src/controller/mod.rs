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
//!
//! # Files
//! This file holds the controller and the window step (a closed window moves a loop, a firing
//! becomes a command); `state` the per-segment state and its changelog record, `guardrails`
//! what holds a firing back and the budgets, `outcomes` acknowledgements and deadlines,
//! `decisions` the decision records, `watch` the actuator breaker, `triage` the windows that
//! move no loop (judged against one partition's state, by the shard that owns it).

mod watch;

mod cluster;
mod decisions;
mod guardrails;
mod outcomes;
mod state;
mod triage;
pub use cluster::{ActionRecord, Cluster, ACTION_PREFIX, CLAIM_TIMEOUT_MS, LIVE_FOR_MS};
use decisions::*;
#[allow(unused_imports)]
pub use guardrails::*;
#[allow(unused_imports)]
pub use state::*;
pub use triage::{JudgeShared, Judged, PartitionJudge, Triage};
use triage::{Quiet, Selector};

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
    /// Claims on the control topic not read back within [`CLAIM_TIMEOUT_MS`] (tried again).
    pub claims_expired: u64,
}

/// Segment states by name: hashed (a closed window looks its segment up once; a B-tree's
/// string compares were a seventh of the loop at 100,000 segments), with a fixed seed so runs
/// are alike; whatever needs an order sorts.
type Segments = std::collections::HashMap<Arc<str>, SegmentState, foldhash::fast::FixedState>;

/// A segment whose windows were judged and never moved a loop: what judging its next window
/// needs (the last judged end, against a re-read after a restart, and its glob matches), in a
/// small entry of its own. Nine in ten segments live here at any time; their
/// [`SegmentState`] (a few hundred bytes, with an allocation) exists once a loop moves, e.g.
/// the first breaching window.
#[derive(Debug, Clone, Copy)]
struct Seen {
    last_window_end_ms: i64,
    globs: GlobCache,
}

#[derive(Debug, Clone, Default)]
struct PartitionState {
    /// Segments with a state: a loop moved (or moves now), or restored from the changelog.
    segments: Segments,
    /// The other segments judged here (never both).
    seen: std::collections::HashMap<Arc<str>, Seen, foldhash::fast::FixedState>,
    /// Loops in flight here per policy, counted as they move (the budgets read them at every
    /// firing; a walk over the segments under action made a firing O(segments acting)).
    in_flight: BTreeMap<String, usize>,
    /// Segments with a loop under action (deadline scans and budgets read only these).
    active: BTreeSet<Arc<str>>,
    /// Segments changed since the last [`Controller::take_changes`].
    dirty: BTreeSet<Arc<str>>,
    /// Persisted segments judged since the last [`Controller::take_changes`] with nothing
    /// changed: checked for quiet there (a tombstone), not written again.
    recheck: BTreeSet<Arc<str>>,
    /// Segments whose state is in the changelog (a tombstone is due once they go quiet).
    persisted: std::collections::HashSet<Arc<str>, foldhash::fast::FixedState>,
}

/// One loop of `policy` fewer in flight.
fn count_out(counts: &mut BTreeMap<String, usize>, policy: &str) {
    if let Some(n) = counts.get_mut(policy) {
        *n -= 1;
        if *n == 0 {
            counts.remove(policy);
        }
    }
}

impl PartitionState {
    /// Segments judged here, with a state or not.
    fn known(&self) -> usize {
        self.segments.len() + self.seen.len()
    }

    fn knows(&self, segment: &str) -> bool {
        self.segments.contains_key(segment) || self.seen.contains_key(segment)
    }

    /// `segment` (with a state here) changed: written with the next changes.
    fn mark_dirty(&mut self, segment: &str) {
        if !self.dirty.contains(segment) {
            let (name, _) = self.segments.get_key_value(segment).expect("segment known");
            self.dirty.insert(name.clone());
        }
    }
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
    /// Shared with the steps that run under one (a firing reads its policy while it changes
    /// the controller): a reload swaps it.
    policies: Arc<PolicySet>,
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
    /// The other instances of the group (live runs; `None`: this instance alone, a replay).
    cluster: Option<Cluster>,
    /// The policy set's generation (a reload makes a new one): per-segment glob matches are
    /// remembered for one generation.
    generation: u64,
    /// No deadline of a loop under action is before this (from the last walk; `i64::MIN` once
    /// a loop may have changed): a tick before it skips the walk.
    deadline_floor: i64,
    /// Segments known here that the window being judged would not know yet, judged in order
    /// ([`Controller::set_known_ahead`]): not counted by the blast radius.
    known_ahead: usize,
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
            policies: Arc::new(policies),
            partitions: BTreeMap::new(),
            tokens: None,
            silences: BTreeMap::new(),
            stats: ControllerStats::default(),
            caught_up: None,
            evidence_grace_ms: 0,
            held_back: watch::HeldBack::default(),
            breaker: watch::ActuatorBreaker::default(),
            cluster: None,
            generation: 0,
            deadline_floor: i64::MIN,
            known_ahead: 0,
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
        if let Some(c) = &mut self.cluster {
            c.revoke(partition);
        }
        self.partitions.remove(&partition).map(|p| p.known())
    }

    /// Replaces the policy set. Loops of policies that still exist keep their state (new
    /// thresholds apply from the next window); loops of removed policies end with a decision.
    pub fn reload(&mut self, policies: PolicySet, now_ms: i64, out: &mut Effects) {
        let names: BTreeSet<String> = policies.policies.iter().map(|p| p.name.clone()).collect();
        self.policies = Arc::new(policies);
        self.generation += 1;
        for p in self.partitions.values_mut() {
            // In segment order: the decisions come out the same on every run.
            let mut names_here: Vec<Arc<str>> = p.segments.keys().cloned().collect();
            names_here.sort_unstable();
            for name in &names_here {
                let seg = p.segments.get_mut(name).expect("listed above");
                let removed: Vec<String> = seg
                    .loops
                    .keys()
                    .filter(|k| !names.contains(*k))
                    .cloned()
                    .collect();
                for name in removed {
                    let l = seg.loops.remove(&name).expect("listed above");
                    if l.phase.in_flight() {
                        count_out(&mut p.in_flight, &name);
                    }
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
        if let Some(c) = &mut self.cluster {
            c.dirty.insert((state.partition, name.clone()));
        }
        p.seen.remove(&name);
        self.deadline_floor = i64::MIN;
        for policy in state.in_flight_policies() {
            *p.in_flight.entry(policy.to_string()).or_default() += 1;
        }
        if let Some(old) = p.segments.insert(name, state) {
            for policy in old.in_flight_policies() {
                count_out(&mut p.in_flight, policy);
            }
        }
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
            let before = p.seen.len();
            p.seen.retain(|name, _| held(partition, name));
            forgotten += before - p.seen.len();
        }
        forgotten
    }

    /// The changelog records due since the last call: the state of every changed segment
    /// that is not quiet, and a tombstone for each persisted one that went quiet.
    pub fn take_changes(&mut self, now_ms: i64) -> Vec<StateChange> {
        let memory_ms = self.memory_ms();
        let mut out = Vec::new();
        for (&partition, p) in &mut self.partitions {
            let dirty = std::mem::take(&mut p.dirty);
            let recheck = std::mem::take(&mut p.recheck);
            // A segment only judged again (its window changed nothing) is written only as
            // its tombstone once it is quiet.
            let changed = dirty.iter().map(|name| (name, true));
            let judged = recheck.difference(&dirty).map(|name| (name, false));
            for (name, changed) in changed.chain(judged) {
                let Some(seg) = p.segments.get(name) else {
                    continue;
                };
                if !seg.is_quiet(now_ms, memory_ms) {
                    if !changed {
                        continue;
                    }
                    p.persisted.insert(name.clone());
                    out.push(StateChange {
                        partition,
                        segment: name.to_string(),
                        state: Some(seg.to_bytes()),
                    });
                } else if p.persisted.remove(name) {
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
        let Some(p) = self.partitions.get_mut(&w.partition) else {
            return;
        };
        let sel = Selector {
            policies: &self.policies.policies,
            generation: self.generation,
            w,
            labels,
        };
        // One lookup for a segment seen before (the common case): most windows of most
        // segments change nothing, and a healthy window of a segment with no state is counted
        // and left in its small entry (a shard judges those on its own: `triage`).
        let (changing, selected) = match p.segments.get_mut(&*w.segment) {
            Some(seg) if w.end_ms <= seg.last_window_end(w.group.as_deref()) => {
                // Re-read after a restart: already judged.
                self.stats.windows_replayed += 1;
                return;
            }
            Some(seg) => {
                seg.judged(w.group.as_deref(), w.end_ms);
                // A persisted segment is checked again each window: it may have gone quiet
                // (a tombstone). It is not written again for the window alone: the default
                // windows' judged end is the partition record's (`closed_through`, which a
                // restart reads again from), and every loop change marks it dirty. A window
                // group's judged end is kept only in the segment's state: written.
                if p.persisted.contains(&*w.segment) {
                    let due = if w.group.is_some() {
                        &mut p.dirty
                    } else {
                        &mut p.recheck
                    };
                    if !due.contains(&*w.segment) {
                        due.insert(w.segment.clone());
                    }
                }
                let globs = sel.globs(&mut seg.globs);
                sel.pick(globs, |policy: &str| {
                    seg.loops
                        .get(policy)
                        .is_some_and(|l| l.phase != Phase::Healthy || l.breaches > 0)
                })
            }
            None => match p.judge_quiet(&sel) {
                Quiet::Replayed => {
                    self.stats.windows_replayed += 1;
                    return;
                }
                Quiet::Judged { evaluations, .. } => {
                    self.stats.evaluations += evaluations;
                    return;
                }
                Quiet::Moves => {
                    // A loop moves (or a window group's end is to be kept): the segment gets
                    // its state, with what its entry knew.
                    let mut state = SegmentState::new(&w.segment, w.partition);
                    if let Some(seen) = p.seen.remove(&*w.segment) {
                        state.last_window_end_ms = seen.last_window_end_ms;
                        state.globs = seen.globs;
                    }
                    let globs = sel.globs(&mut state.globs);
                    let picked = sel.pick(globs, |_| false);
                    state.judged(w.group.as_deref(), w.end_ms);
                    p.segments.insert(w.segment.clone(), state);
                    picked
                }
            },
        };
        self.stats.evaluations += selected;
        let ctx = Ctx {
            now_ms,
            window: Some(w),
        };
        for i in changing {
            self.step_window(i, &w.segment, w.partition, &ctx, out);
        }
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

    /// A loop about to change: marked changed ([`Controller::loop_changed`]).
    fn loop_mut(&mut self, partition: i32, segment: &str, policy: &str) -> &mut LoopState {
        self.loop_changed(partition, segment);
        self.loop_peek_mut(partition, segment, policy)
    }

    /// A loop to look at and perhaps change (made healthy if the segment has none for
    /// `policy`): marks nothing; a caller that changed it calls [`Controller::loop_changed`].
    fn loop_peek_mut(&mut self, partition: i32, segment: &str, policy: &str) -> &mut LoopState {
        let p = self
            .partitions
            .get_mut(&partition)
            .expect("partition owned");
        let loops = &mut p.segments.get_mut(segment).expect("segment known").loops;
        if !loops.contains_key(policy) {
            loops.insert(policy.to_string(), LoopState::new());
        }
        loops.get_mut(policy).expect("inserted above")
    }

    /// A loop of `segment` changed: its state is written with the next changes, and the next
    /// tick walks the deadlines again (the loop may have got one).
    fn loop_changed(&mut self, partition: i32, segment: &str) {
        self.deadline_floor = i64::MIN;
        self.partitions
            .get_mut(&partition)
            .expect("partition owned")
            .mark_dirty(segment);
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

    /// Keeps the partition's in-flight counts as a loop of `policy` moves from `from` to `to`.
    fn count_move(&mut self, partition: i32, policy: &str, from: Phase, to: Phase) {
        if from.in_flight() == to.in_flight() {
            return;
        }
        let p = self
            .partitions
            .get_mut(&partition)
            .expect("partition owned");
        if to.in_flight() {
            *p.in_flight.entry(policy.to_string()).or_default() += 1;
        } else {
            count_out(&mut p.in_flight, policy);
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
        if let Some(c) = &mut self.cluster {
            c.dirty.insert((partition, Arc::from(segment)));
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
        let name = policy.name.clone();
        let clear_for = policy.clear_for;
        let for_windows = policy.for_windows;
        let verified = policy.verified_by(w);
        // Most windows of a loop under action change nothing (a command awaiting its ack):
        // the loop is marked changed only if it did, so its state is not written again.
        let l = self.loop_peek_mut(partition, segment, &name);
        let before = l.progress();
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
        let l = self.loop_peek_mut(partition, segment, &name);
        l.phase = to;
        let id = l.command_id.clone();
        if l.progress() != before {
            self.loop_changed(partition, segment);
        }
        self.count_move(partition, &name, from, to);
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

    /// Fires the next attempt, unless a guardrail stops it. With other instances running, the
    /// firing is claimed first and decided when the claim is read back ([`cluster`]).
    fn fire(&mut self, pi: usize, partition: i32, segment: &str, ctx: &Ctx<'_>, out: &mut Effects) {
        let now = ctx.now_ms;
        let set = Arc::clone(&self.policies);
        let policy = &set.policies[pi];
        if self.cluster.as_ref().is_some_and(|c| {
            c.pending
                .contains_key(&(Arc::from(segment), policy.name.clone()))
        }) {
            // Its claim decides.
            return;
        }
        if let Some(g) = self.guardrail(policy, partition, segment, ctx) {
            self.suppress(pi, partition, segment, g, ctx, out);
            return;
        }
        if let Some(c) = self.cluster.as_mut().filter(|c| c.shared(now)) {
            c.claim(partition, segment, &policy.name, now);
            return;
        }
        self.emit(pi, partition, segment, ctx, out);
    }

    /// A firing stopped by guardrail `g`: its decision record, and what the guardrail does next.
    fn suppress(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        g: Guardrail,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let now = ctx.now_ms;
        let policy = &self.policies.policies[pi];
        *self.stats.suppressed.entry(g.as_str()).or_default() += 1;
        if g.is_budget() {
            self.held_back.hold(segment, &policy.name, g, now);
        }
        let mut aggs = Vec::new();
        if let Some(w) = ctx.window {
            policy.when.aggregates(w, &mut aggs);
        }
        let (name, backoff_ms) = (policy.name.clone(), policy.backoff_ms);
        let l = self.loop_mut(partition, segment, &name);
        let phase = l.phase;
        if phase == Phase::Backoff {
            // Try again after another base backoff rather than on every tick.
            l.deadline_ms = Some(now + backoff_ms.max(1));
        }
        out.decisions.push(decision(
            segment,
            &name,
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
    }

    /// The command of a firing every guardrail let through.
    fn emit(&mut self, pi: usize, partition: i32, segment: &str, ctx: &Ctx<'_>, out: &mut Effects) {
        let now = ctx.now_ms;
        let set = Arc::clone(&self.policies);
        let policy = &set.policies[pi];
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
            .unwrap_or_else(|| reason_without_window(policy, start));
        let to = if policy.dry_run {
            l.deadline_ms = None;
            l.healthy = 0;
            Phase::DryRun
        } else {
            l.deadline_ms = Some(now + policy.ack_timeout_ms);
            Phase::Commanded
        };
        l.phase = to;
        self.count_move(partition, &policy.name, from, to);
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
}
