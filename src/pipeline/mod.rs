//! The step every driver shares: a telemetry record in, the controller's effects out.
//!
//! `segloop run`, `segloop backtest` and the benches drive one [`Pipeline`]; none of them
//! decodes, windows, judges or steers the controller on its own. A driver decides three things
//! only:
//!
//! - where records come from (a consumer poll, a merged replay, a generated batch), handed over
//!   as [`Record`]s;
//! - which clock it passes as `now` (wall-clock time live; the maximum event time in a replay);
//! - where effects go, through its [`Sink`] (Kafka topics live; a report in a replay).
//!
//! One record's walk: [`Pipeline::admit`] (decode and validate, event-time range, clock skew
//! against a broker timestamp when asked, labels) → [`Pipeline::ingest`] (the windows; late and
//! skewed events are rejected there) → the windows that closed are judged (the controller, per
//! policy) → their commands and decisions go to the sink. [`Pipeline::tick`] advances quiet
//! partitions and deadlines on the driver's clock; [`Pipeline::on_outcome`] feeds actuator
//! acknowledgements.
//!
//! The pipeline also keeps the [`ReadModel`]: per-segment state (loop phases, in-flight
//! commands, open windows of segments someone asked about) in concurrent maps, written here at
//! the end of each turn and read by the admin API without taking the driver's lock.
//!
//! Engine code only: no Kafka, no tokio, no HTTP.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::Serialize;

use crate::codec::fast::{Telemetry, TelemetryDecoder};
use crate::codec::{DecodeError, ErrorCode, SchemaSource};
use crate::config::Config;
use crate::controller::{
    ActionRecord, Cluster, Controller, Effects, JudgeShared, Judged, OutcomeDisposition,
    PartitionJudge, SegmentState, StateChange, Triage,
};
use crate::model::{DecisionRecord, RemediationOutcome};
use crate::policy::{PolicySet, Silence};
use crate::window::{Position, WindowSummary, Windows};

mod dead_letters;
mod labels;
mod read_model;
mod shard;
use dead_letters::*;
#[allow(unused_imports)]
pub use labels::*;
#[allow(unused_imports)]
pub use read_model::*;
use shard::*;
pub use shard::{least_loaded, Fanout, InPlace, CLOSED_PER_ROUND};

/// Labels of a segment (the latest set seen).
pub type Labels = BTreeMap<String, String>;

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

/// One telemetry record as a driver hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// The broker's timestamp of the record, if it has one.
    pub timestamp_ms: Option<i64>,
    /// The driver's own reference to the record (live: its index in the polled batch), given
    /// back with a rejection; the pipeline never reads it.
    pub handle: usize,
}

/// Why the controller produced the effects a [`Sink`] receives.
#[derive(Debug, Clone, Copy)]
pub enum Cause<'a> {
    /// A closed window was judged; its effects may be empty.
    Window {
        window: &'a WindowSummary,
        labels: &'a Labels,
    },
    /// An outcome, a deadline, or a policy reload.
    Other,
}

/// The driver's side of the pipeline: where unusable records and effects go.
pub trait Sink {
    /// A record the pipeline cannot use; `error.code` is its DLQ reason.
    fn reject(&mut self, record: &Record<'_>, error: &DecodeError);
    /// The segment cap evicted a segment with events in open windows: `decision` records it
    /// (`to_state = "evicted"`). A replay counts these in its input stats and writes nothing.
    fn evicted(&mut self, _decision: DecisionRecord) {}
    /// The controller's commands, decisions and timings: drain `fx`. Called once per judged
    /// window (with [`Cause::Window`], effects or not) and once per other controller input.
    fn effects(&mut self, fx: &mut Effects, cause: Cause<'_>, policies: &PolicySet);
}

/// What an event's clock skew is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkewReference {
    /// The driver's clock when the record is ingested (live: wall-clock time at arrival).
    Arrival,
    /// The record's broker timestamp (a replay's nearest thing to the wall clock at arrival).
    BrokerTimestamp,
}

/// How a pipeline treats its input.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub skew: SkewReference,
    /// Events before this event time are read and counted, never ingested.
    pub from_ms: Option<i64>,
    /// Events after this event time are read and counted, never ingested.
    pub to_ms: Option<i64>,
}

impl Options {
    /// Live: skew against arrival, every event time.
    pub fn live() -> Self {
        Options {
            skew: SkewReference::Arrival,
            from_ms: None,
            to_ms: None,
        }
    }
}

/// A label map entry's memory, estimated: its strings plus a fixed overhead per string.
/// A window's life past its end until it closes at the latest: the largest window, the allowed
/// lateness and the idle advance. A verification with no deciding window waits this long past
/// its deadline on a caught-up partition.
fn evidence_grace_ms(w: &crate::config::WindowConfig) -> i64 {
    let largest = w.groups.values().map(|g| g.size).chain([w.size]).max();
    let life = largest.unwrap_or(w.size) + w.out_of_orderness + w.grace + w.idle_timeout;
    life.as_millis().try_into().unwrap_or(i64::MAX)
}

/// How far `partition` counts as read through: its read-through (all of them: `until`), never
/// past the merge's `until`, nor past where it stood when a schema wait began (`frozen`).
fn read_through_at(
    through: &Option<BTreeMap<i32, i64>>,
    until: i64,
    frozen: &BTreeMap<i32, i64>,
    partition: i32,
) -> i64 {
    let t = match through {
        None => until,
        Some(m) => m.get(&partition).copied().unwrap_or(i64::MIN).min(until),
    };
    frozen.get(&partition).map_or(t, |f| t.min(*f))
}

/// The engine (windows, policies, controller) behind one step for every driver.
pub struct Pipeline {
    /// The per-event work, one shard per partition set (see `pipeline::shard`).
    shards: Vec<Shard>,
    /// Which shard owns each assigned partition.
    map: ShardMap,
    controller: Controller,
    options: Options,
    max_clock_skew_ms: i64,
    fx: Effects,
    assigned: Vec<i32>,
    /// Per partition: the end of the last window judged (windows close in end order).
    closed_through: BTreeMap<i32, i64>,
    /// Per partition, after a restore: windows ending at or before this were judged before the
    /// restart; re-read, they are rebuilt but not judged again.
    replay_until: BTreeMap<i32, i64>,
    stats: InputStats,
    read: Arc<ReadModel>,
    dead_letters: DeadLetters,
    /// See [`Pipeline::set_read_through`] and [`Pipeline::set_read_until`].
    read_through: Option<BTreeMap<i32, i64>>,
    read_until: i64,
    /// Where writer schemas of Confluent ids the codec has not seen come from (a registry).
    schemas: Option<Box<dyn SchemaSource>>,
    /// Partitions waiting on the registry, from the first record of an unanswered id on.
    waiting: BTreeMap<i32, SchemaWait>,
    /// The read-through of each waiting partition when its wait began: the idle advance
    /// goes no further while it waits (the consumer may have fetched past the waiting
    /// record, so the lag says nothing of the records the wait holds back).
    waiting_read_through: BTreeMap<i32, i64>,
}

/// A partition stopped at a record whose schema id the registry has not answered for. That
/// record and every later one of the partition are not read until the driver has the answer
/// and reads the partition again from [`SchemaWait::offset`] (live: a seek); it holds the
/// partition's commit floor.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaWait {
    pub offset: i64,
    pub schema_id: u32,
    /// Why there is no answer yet (the registry's last error, or "asking").
    pub reason: String,
}

impl Pipeline {
    /// A pipeline of one shard (a replay, the benches, tests).
    ///
    /// # Errors
    /// The telemetry codec settings are invalid (the message names the topic).
    pub fn new(config: &Config, policies: PolicySet, options: Options) -> Result<Self, String> {
        Self::sharded(config, policies, options, 1)
    }

    /// A pipeline whose per-event work is split over `shards` partition sets (at least one),
    /// for a driver that runs them side by side ([`Pipeline::on_batch_with`]). The segment cap
    /// (`windows.max_segments`) and the label map's bounds are split evenly between the shards:
    /// together they hold no more than one shard would.
    ///
    /// # Errors
    /// The telemetry codec settings are invalid (the message names the topic).
    pub fn sharded(
        config: &Config,
        policies: PolicySet,
        options: Options,
        shards: usize,
    ) -> Result<Self, String> {
        let n = shards.clamp(1, usize::from(u16::MAX - 1));
        let t = &config.topics.telemetry;
        let read = Arc::new(ReadModel::default());
        read.set_silences(policies.silences.iter());
        let labels_on = uses_labels(&policies);
        let mut windows = config.windows.clone();
        windows.max_segments = config.windows.max_segments_per_thread(n);
        let shards = (0..n)
            .map(|_| {
                let decoder = TelemetryDecoder::new(t.codec, &config.schema_settings(t))
                    .map_err(|e| format!("topics.telemetry: {e}"))?;
                let mut engine = Windows::from_config(&windows);
                if options.skew == SkewReference::BrokerTimestamp {
                    // Skew is judged at admission, against the broker timestamp; the replay's
                    // clock (robust event time) is no wall clock to judge it by.
                    engine.judge_skew_at_admission();
                }
                Ok(Shard::new(
                    engine,
                    decoder,
                    LabelMap {
                        on: labels_on,
                        cap: windows.max_segments,
                        max_bytes: MAX_LABEL_MAP_BYTES / n,
                        bytes: 0,
                        map: FastMap::default(),
                    },
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut controller = Controller::new(policies);
        controller.set_evidence_grace(evidence_grace_ms(&config.windows));
        Ok(Pipeline {
            shards,
            map: ShardMap::default(),
            controller,
            options,
            max_clock_skew_ms: config.windows.max_clock_skew.as_millis() as i64,
            fx: Effects::default(),
            assigned: Vec::new(),
            closed_through: BTreeMap::new(),
            replay_until: BTreeMap::new(),
            stats: InputStats::default(),
            read,
            dead_letters: DeadLetters::default(),
            read_through: None,
            read_until: i64::MAX,
            schemas: None,
            waiting: BTreeMap::new(),
            waiting_read_through: BTreeMap::new(),
        })
    }

    /// Asks `source` for the writer schema of every Confluent id the telemetry codec has not
    /// seen (see [`SchemaLookup`]): found, it is learned and the record decoded; missing, the
    /// record is dead-lettered as `unknown_schema_id`; no answer yet, the partition waits
    /// ([`Pipeline::waiting`]).
    pub fn set_schema_source(&mut self, source: Box<dyn SchemaSource>) {
        self.schemas = Some(source);
    }

    /// Partitions waiting on the schema registry.
    pub fn waiting(&self) -> &BTreeMap<i32, SchemaWait> {
        &self.waiting
    }

    /// The driver will deliver `partition` again from its waiting record on: its records are
    /// read again.
    pub fn stop_waiting(&mut self, partition: i32) {
        self.waiting.remove(&partition);
        self.waiting_read_through.remove(&partition);
    }

    /// How far `partition` counts as read through (see [`Pipeline::set_read_through`]).
    fn read_through_of(&self, partition: i32) -> i64 {
        read_through_at(
            &self.read_through,
            self.read_until,
            &self.waiting_read_through,
            partition,
        )
    }

    /// Per partition, the driver-clock time up to which everything written to it has been
    /// read (live: when the consumer was last seen at the high watermark; a replay: where its
    /// merge stands). The idle advance never moves a partition past it, so an unread backlog
    /// is never judged late. `None` (the default): every partition is read through now.
    pub fn set_read_through(&mut self, through: Option<BTreeMap<i32, i64>>) {
        self.read_through = through;
    }

    /// Every partition is read through `ms` (a replay's merge: no partition holds an unread
    /// record with an earlier merge key).
    pub fn set_read_until(&mut self, ms: i64) {
        self.read_until = ms;
    }

    /// The partitions whose input is caught up (a live driver measures it from the lag; until
    /// it does, a replay's default holds: every partition). Verification deadlines with no
    /// deciding window are judged only on caught-up partitions.
    pub fn set_caught_up(&mut self, partitions: Option<BTreeSet<i32>>) {
        self.controller.set_caught_up(partitions);
    }

    /// The windows' counters over every shard (gauges summed too).
    pub fn engine_stats(&self) -> crate::window::EngineStats {
        let mut all = crate::window::EngineStats::default();
        for s in &self.shards {
            all.add(&s.engine.stats());
        }
        all
    }

    /// Each shard's window counters, in shard order.
    pub fn shard_engine_stats(&self) -> Vec<crate::window::EngineStats> {
        self.shards.iter().map(|s| s.engine.stats()).collect()
    }

    /// The shard that owns `partition` (`None`: not owned).
    pub fn shard_of(&self, partition: i32) -> Option<usize> {
        self.map.get(partition)
    }

    /// How many shards the per-event work is split over.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn policies(&self) -> &PolicySet {
        self.controller.policies()
    }

    /// The input accounting so far (the pipeline's and every shard's).
    pub fn stats(&self) -> InputStats {
        let mut all = self.stats.clone();
        for s in &self.shards {
            add_counts(&mut all, &s.stats);
        }
        all
    }

    pub fn read_model(&self) -> Arc<ReadModel> {
        self.read.clone()
    }

    /// Owned partitions, in order.
    pub fn assigned(&self) -> &[i32] {
        &self.assigned
    }

    /// Takes on a partition: its shard is the one with the fewest partitions (the first of
    /// those), so a subset of a topic's partitions still spreads over every shard.
    pub fn assign(&mut self, partition: i32) {
        self.assign_to(partition, None);
    }

    /// Takes on a partition in `shard` (a driver that reads each shard's partitions apart
    /// says where this one is read); `None` or a shard out of range: as [`Pipeline::assign`].
    pub fn assign_to(&mut self, partition: i32, shard: Option<usize>) {
        let shard = match (self.map.get(partition), shard) {
            (Some(s), _) => s,
            (None, Some(s)) if s < self.shards.len() => s,
            (None, _) => least_loaded(self.shards.len(), self.map.owners()),
        };
        self.map.set(partition, Some(shard));
        self.shards[shard].engine.assign(partition);
        self.controller.assign(partition);
        if let Err(at) = self.assigned.binary_search(&partition) {
            self.assigned.insert(at, partition);
        }
    }

    /// Drops a partition's windows, controller state and bookkeeping.
    pub fn revoke(&mut self, partition: i32) {
        if let Some(s) = self.map.get(partition) {
            self.shards[s].engine.revoke(partition);
        }
        self.map.set(partition, None);
        self.controller.revoke(partition);
        self.assigned.retain(|p| *p != partition);
        self.closed_through.remove(&partition);
        self.replay_until.remove(&partition);
        self.dead_letters.revoke(partition);
        self.waiting.remove(&partition);
        self.waiting_read_through.remove(&partition);
        self.read.states.retain(|_, s| s.0 != partition);
    }

    /// Restores a partition's controller state (from the changelog) and the end of the last
    /// window it judged. Returns how many segments were restored.
    ///
    /// # Errors
    /// A state of a partition not assigned here.
    pub fn restore(
        &mut self,
        partition: i32,
        states: Vec<SegmentState>,
        closed_through: Option<i64>,
    ) -> Result<usize, String> {
        if let Some(t) = closed_through {
            self.replay_until.insert(partition, t);
            self.closed_through.insert(partition, t);
        }
        let n = states.len();
        for state in states {
            self.read
                .states
                .insert(state.segment.clone(), (state.partition, state.to_bytes()));
            self.controller.restore(state)?;
        }
        Ok(n)
    }

    /// The end of the last window judged on `partition`.
    pub fn closed_through(&self, partition: i32) -> Option<i64> {
        self.closed_through.get(&partition).copied()
    }

    /// The commit floor of `partition`, the one rule every driver commits by: the lowest of
    /// the offset still feeding an open window and every dead-letter write not yet
    /// acknowledged, and the record waiting on the schema registry.
    pub fn committable_offset(&self, partition: i32) -> Option<i64> {
        let floors = [
            self.dead_letters.floor(partition),
            self.waiting.get(&partition).map(|w| w.offset),
        ];
        let windows = self
            .map
            .get(partition)
            .and_then(|s| self.shards[s].engine.committable_offset(partition));
        floors.into_iter().flatten().chain(windows).min()
    }

    /// Dead-letter writes will be acknowledged ([`Pipeline::dead_letter_acked`]): until then
    /// each holds the commit floor of its partition.
    pub fn track_dead_letters(&mut self) {
        self.dead_letters.tracked = true;
    }

    /// A dead-letter write of the record at (`partition`, `offset`) was acknowledged.
    pub fn dead_letter_acked(&mut self, partition: i32, offset: i64) {
        self.dead_letters.acked(partition, offset);
    }

    /// Restores a partition's dead-letter mark (from the changelog): its records at or below
    /// it were dead-lettered already and are not again.
    pub fn restore_dead_letter_mark(&mut self, partition: i32, mark: Option<i64>) {
        self.dead_letters.restore(partition, mark);
    }

    /// The partition's dead-letter mark: every record at or below it that failed was
    /// dead-lettered, and acknowledged (what the changelog keeps).
    pub fn dead_letter_mark(&self, partition: i32) -> Option<i64> {
        self.dead_letters.mark(partition)
    }

    pub(super) fn reject(&mut self, record: &Record<'_>, e: &DecodeError, sink: &mut dyn Sink) {
        if !self.dead_letters.admit(record.partition, record.offset) {
            // Dead-lettered in an earlier lifetime (at or below the restored mark).
            self.stats.dead_lettered_before += 1;
            return;
        }
        *self
            .stats
            .rejected
            .entry(e.code.as_str().to_string())
            .or_default() += 1;
        sink.reject(record, e);
    }

    /// Closed windows → controller → sink: shard after shard, in close order within each.
    /// Windows a shard judged on its own (no loop moved) go straight to the sink; for the
    /// others the controller is told how many segments the round added after them
    /// (`controller::triage`), so each is judged as if every window were judged in order.
    pub(super) fn judge(&mut self, now_ms: i64, sink: &mut dyn Sink) {
        let mut fresh_after: usize = self.shards.iter().map(|s| s.judged.fresh).sum();
        for s in 0..self.shards.len() {
            let counts = std::mem::take(&mut self.shards[s].judged);
            self.controller.add_judged(&counts);
            fresh_after -= counts.fresh;
            let evictions = self.shards[s].engine.take_evictions();
            if !evictions.is_empty() {
                self.record_evictions(s, evictions, now_ms, sink);
            }
            if self.shards[s].closed.is_empty() {
                continue;
            }
            // Judged in place (a summary is a few hundred bytes: moving each out of the buffer
            // was a measurable share of a sweep at 100,000 segments), then dropped together.
            let mut closed = std::mem::take(&mut self.shards[s].closed);
            let mut verdicts = std::mem::take(&mut self.shards[s].verdicts);
            let fresh = (counts.fresh, fresh_after);
            self.judge_closed(s, &closed, &verdicts, fresh, now_ms, sink);
            self.controller.set_known_ahead(0);
            closed.clear();
            verdicts.clear();
            self.shards[s].closed = closed;
            self.shards[s].verdicts = verdicts;
            self.shards[s].clear_deferred();
        }
    }

    fn judge_closed(
        &mut self,
        shard: usize,
        closed: &[WindowSummary],
        verdicts: &[Verdict],
        (fresh, fresh_after): (usize, usize),
        now_ms: i64,
        sink: &mut dyn Sink,
    ) {
        let empty = Labels::new();
        let labels_of = &self.shards[shard].labels.map;
        for (k, w) in closed.iter().enumerate() {
            self.stats.windows_closed += 1;
            // Window groups are judged through the controller's own per-group record; the
            // replay marks follow the default windows.
            if replayed_before(&self.replay_until, w) {
                continue;
            }
            if w.group.is_none() {
                let through = self.closed_through.entry(w.partition).or_insert(i64::MIN);
                *through = (*through).max(w.end_ms);
            }
            let labels = labels_of.get(&*w.segment).unwrap_or(&empty);
            // For the controller: the segments the round added after this window (the
            // shard's since it left the window, none for a window closed after its round, and
            // every later shard's) are not known to it yet.
            let added_since = match verdicts.get(k) {
                Some(Verdict::Judged) => None,
                Some(Verdict::Controller { fresh_before }) => Some(fresh - fresh_before),
                None => Some(0),
            };
            if let Some(since) = added_since {
                self.controller.set_known_ahead(fresh_after + since);
                self.controller.on_window(w, labels, now_ms, &mut self.fx);
            }
            sink.effects(
                &mut self.fx,
                Cause::Window { window: w, labels },
                self.controller.policies(),
            );
        }
    }

    /// Evicted segments' events: counted, logged once per batch, and recorded.
    fn record_evictions(
        &mut self,
        shard: usize,
        evictions: Vec<crate::window::Eviction>,
        now_ms: i64,
        sink: &mut dyn Sink,
    ) {
        let events: u64 = evictions.iter().map(|e| e.events).sum();
        self.stats.evicted_segments += evictions.len() as u64;
        self.stats.evicted_events += events;
        tracing::warn!(
            segments = evictions.len(),
            events,
            max_segments = self.shards[shard].engine.spec().max_segments,
            "the segment cap evicted segments with events in open windows: those events are not windowed (raise windows.max_segments)"
        );
        for e in evictions {
            sink.evicted(DecisionRecord {
                segment: e.segment.to_string(),
                policy: String::new(),
                ts_ms: now_ms,
                from_state: "open".into(),
                to_state: "evicted".into(),
                trigger: "windows.max_segments".into(),
                window_start_ms: Some(e.oldest_pane_ms),
                aggregates: [
                    ("events".to_string(), e.events as f64),
                    ("partition".to_string(), f64::from(e.partition)),
                ]
                .into_iter()
                .collect(),
                guardrail: None,
                command_id: None,
            });
        }
    }

    /// Moves the driver's clock to `now_ms`: quiet partitions close their windows, and (when
    /// `deadlines`) ack, verification and backoff deadlines fire.
    pub fn tick(&mut self, now_ms: i64, deadlines: bool, sink: &mut dyn Sink) {
        // One partition at a time, each judged before the next closes: an idle advance can
        // close every segment's windows at once, and a batch of all of them was a buffer of
        // hundreds of megabytes at 100,000 segments (page faults were a quarter of the loop).
        for i in 0..self.assigned.len() {
            let (through, until, frozen) = (
                &self.read_through,
                self.read_until,
                &self.waiting_read_through,
            );
            let partition = self.assigned[i];
            let Some(s) = self.map.get(partition) else {
                continue;
            };
            let shard = &mut self.shards[s];
            shard.engine.advance_idle_read(
                now_ms,
                &|p| read_through_at(through, until, frozen, p),
                Some(partition),
                &mut shard.closed,
            );
            self.judge(now_ms, sink);
        }
        if deadlines {
            self.controller.tick(now_ms, &mut self.fx);
            sink.effects(&mut self.fx, Cause::Other, self.controller.policies());
        }
    }

    /// An actuator's outcome.
    pub fn on_outcome(
        &mut self,
        outcome: &RemediationOutcome,
        now_ms: i64,
        sink: &mut dyn Sink,
    ) -> OutcomeDisposition {
        let d = self.controller.on_outcome(outcome, now_ms, &mut self.fx);
        sink.effects(&mut self.fx, Cause::Other, self.controller.policies());
        d
    }

    /// Replaces the policy set (loops of kept policies keep their state).
    pub fn reload(&mut self, policies: PolicySet, now_ms: i64, sink: &mut dyn Sink) {
        let on = uses_labels(&policies);
        for s in &mut self.shards {
            s.labels.on = on;
        }
        self.controller.reload(policies, now_ms, &mut self.fx);
        self.read.set_silences(self.controller.silences());
        sink.effects(&mut self.fx, Cause::Other, self.controller.policies());
    }

    /// Shares limits and inhibition with the group's other instances (see
    /// [`crate::controller::Cluster`]).
    pub fn set_cluster(&mut self, cluster: Cluster) {
        self.controller.set_cluster(cluster);
    }

    /// Another instance's heartbeat (`None`: it stopped).
    pub fn on_peer(&mut self, id: &str, heartbeat: Option<(i64, i64, usize)>) {
        self.controller.on_peer(id, heartbeat);
    }

    /// An action record from the control topic; this instance's claims read back fire here.
    pub fn on_action_record(
        &mut self,
        segment: &str,
        record: Option<ActionRecord>,
        now_ms: i64,
        sink: &mut dyn Sink,
    ) {
        self.controller
            .on_action_record(segment, record, now_ms, &mut self.fx);
        sink.effects(&mut self.fx, Cause::Other, self.controller.policies());
    }

    /// The action records due for the control topic since the last call.
    pub fn take_action_records(&mut self, now_ms: i64) -> Vec<(String, ActionRecord)> {
        self.controller.take_action_records(now_ms)
    }

    pub fn add_silence(&mut self, silence: Silence) {
        self.controller.add_silence(silence);
        self.read.set_silences(self.controller.silences());
    }

    pub fn remove_silence(&mut self, id: &str) -> bool {
        let removed = self.controller.remove_silence(id);
        self.read.set_silences(self.controller.silences());
        removed
    }

    /// The controller's changelog records due since the last call; the read model follows.
    pub fn take_state_changes(&mut self, now_ms: i64) -> Vec<StateChange> {
        let changes = self.controller.take_changes(now_ms);
        for c in &changes {
            match &c.state {
                Some(bytes) => {
                    self.read
                        .states
                        .insert(c.segment.clone(), (c.partition, bytes.clone()));
                }
                None => {
                    self.read.states.remove(&c.segment);
                }
            }
        }
        changes
    }

    /// The label map's estimated memory (bounded by [`MAX_LABEL_MAP_BYTES`]).
    pub fn label_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.labels.bytes).sum()
    }

    /// End of a turn at `now_ms`: the read model's budgets and watched windows are refreshed
    /// and the turn counted; every [`PRUNE_EVERY`] turns the labels of segments the windows
    /// forgot are dropped.
    pub fn end_turn(&mut self, now_ms: i64) {
        let turn = self.read.turn.load(Ordering::Acquire);
        if let Ok(mut b) = self.read.budgets.lock() {
            *b = self.controller.budgets(now_ms);
        }
        if turn % PRUNE_EVERY == 0 {
            for shard in &mut self.shards {
                if !shard.labels.map.is_empty() {
                    let engine = &shard.engine;
                    shard
                        .labels
                        .prune(|s| engine.partitions().any(|p| p.holds(s)));
                }
            }
            // The controller forgets quiet segments their partition's windows forgot: its
            // memory follows the windows' bound (max_segments, segment_ttl). One lookup per
            // segment, in its own partition (asking every partition was 16 per segment).
            let (shards, map) = (&self.shards, &self.map);
            self.controller.forget_quiet(now_ms, |p, s| {
                map.get(p)
                    .and_then(|i| shards[i].engine.partition(p))
                    .is_some_and(|w| w.holds(s))
            });
        }
        self.read
            .watched
            .retain(|_, asked| turn.saturating_sub(*asked) <= WATCH_TURNS);
        for w in self.read.watched.iter() {
            let open: Vec<WindowSummary> = self
                .shards
                .iter()
                .flat_map(|s| s.engine.open_windows(w.key()))
                .collect();
            if open.is_empty() {
                self.read.windows.remove(w.key());
            } else {
                self.read.windows.insert(w.key().clone(), open);
            }
        }
        self.read
            .windows
            .retain(|k, _| self.read.watched.contains_key(k));
        self.read.turn.fetch_add(1, Ordering::Release);
    }

    /// The input accounting, with the windows still open.
    pub fn finish(self) -> (InputStats, Controller) {
        let mut stats = self.stats();
        stats.open_windows_at_end = self
            .shards
            .iter()
            .flat_map(|s| s.engine.partitions())
            .map(|p| p.segment_count() as u64)
            .sum();
        (stats, self.controller)
    }
}

/// Turns between two prunes of the label map.
const PRUNE_EVERY: u64 = 1024;
