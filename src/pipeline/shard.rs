//! Shards: the per-event work of disjoint partition sets (decode, labels, windows), each shard
//! a value of its own, so a driver may run them side by side.
//!
//! A [`Pipeline`] holds one shard or several; a partition belongs to one shard from its assign
//! to its revoke. A batch is split by shard and worked in **rounds**: in a round every shard
//! with records left works through them on its own (no state shared with another shard; the
//! pipeline's partition marks are read only) and judges the windows it closed that move no
//! loop, against its partitions' controller state, lent to it for the round
//! ([`Shard::triage`], `controller::triage`); then, between rounds, the pipeline alone writes
//! the round's rejections to the sink and hands every closed window to the sink, shard by
//! shard, the ones left to the controller judged by it first (firings meet the guardrails
//! there, exact with no lock). A shard ends its round early
//! when [`CLOSED_PER_ROUND`] closed windows wait (the buffer stays small, and commands go out
//! while the rest of the batch is worked), or at a record whose schema id only the registry
//! can answer (asked between rounds, by the pipeline, which holds the one registry source).
//!
//! [`Fanout`] is how a driver runs a round's shards: [`InPlace`] one after another (replays,
//! tests, one shard), the live runtime on its worker threads. The pipeline knows no thread.
//!
//! Here too: the pipeline's record path (`on_batch_with`, and `admit`/`ingest` for drivers
//! that hand records over one at a time and judge at once).

use super::*;

/// Closed windows a shard collects before it ends its round to have them judged.
pub const CLOSED_PER_ROUND: usize = 1024;

/// How a driver runs the shards of one round. Each task works one shard and touches nothing
/// another task touches; `run` returns once every task has returned.
pub trait Fanout {
    fn run(&self, tasks: &mut [&mut (dyn FnMut() + Send)]);
}

/// Runs a round's tasks one after another on the caller's thread.
pub struct InPlace;

impl Fanout for InPlace {
    fn run(&self, tasks: &mut [&mut (dyn FnMut() + Send)]) {
        for t in tasks {
            t();
        }
    }
}

/// What the shards read of the pipeline while they work (one for every shard of a round).
pub(super) struct Admission<'p> {
    pub(super) waiting: &'p BTreeMap<i32, SchemaWait>,
    pub(super) options: Options,
    pub(super) max_clock_skew_ms: i64,
    /// A registry is set: a record of an unseen schema id goes to the pipeline
    /// ([`Admitted::Unknown`]) instead of the DLQ.
    pub(super) learns: bool,
    /// Partition → shard (see [`ShardMap`]): a shard skips records of partitions not its own.
    pub(super) map: &'p ShardMap,
    /// Per partition, after a restore: windows ending at or before this are not judged.
    pub(super) replay_until: &'p BTreeMap<i32, i64>,
}

/// What [`Shard::admit`] made of a record.
pub(super) enum Admitted<'a> {
    Event(Telemetry<'a>),
    /// Not to be ingested, nothing to write (waiting, outside the range, not owned).
    Skip,
    /// To the DLQ with this reason.
    Reject(DecodeError),
    /// Its schema id is unknown and a registry may know it: the pipeline asks.
    Unknown,
}

/// How far a shard got in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Every record of the batch is worked.
    Done,
    /// Closed windows wait to be judged; go on at this record.
    Judge(usize),
    /// This record needs the registry (the pipeline admits it), then go on after it.
    Registry(usize),
}

/// Which shard owns each partition (partitions are small non-negative numbers).
#[derive(Debug, Default, Clone)]
pub(super) struct ShardMap(Vec<u16>);

const UNOWNED: u16 = u16::MAX;

impl ShardMap {
    #[inline]
    pub(super) fn get(&self, partition: i32) -> Option<usize> {
        let s = *self.0.get(usize::try_from(partition).ok()?)?;
        (s != UNOWNED).then_some(s as usize)
    }

    pub(super) fn set(&mut self, partition: i32, shard: Option<usize>) {
        let Ok(i) = usize::try_from(partition) else {
            return;
        };
        if self.0.len() <= i {
            self.0.resize(i + 1, UNOWNED);
        }
        self.0[i] = shard.map_or(UNOWNED, |s| s as u16);
    }

    /// The shard of every owned partition.
    pub(super) fn owners(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .filter(|s| **s != UNOWNED)
            .map(|s| usize::from(*s))
    }
}

/// Of `shards` shards, the one owning the fewest partitions (the first of those), given the
/// shard of every owned partition: where a new partition goes, so a subset of a topic's
/// partitions still spreads over every shard.
pub fn least_loaded(shards: usize, owners: impl IntoIterator<Item = usize>) -> usize {
    let mut load = vec![0usize; shards.max(1)];
    for s in owners {
        if let Some(n) = load.get_mut(s) {
            *n += 1;
        }
    }
    (0..load.len()).min_by_key(|s| load[*s]).unwrap_or(0)
}

/// One shard: the windows, decoder and labels of the partitions it owns, and its counts.
pub(super) struct Shard {
    pub(super) engine: Windows,
    pub(super) decoder: TelemetryDecoder,
    pub(super) labels: LabelMap,
    /// The counts of admission and ingest (the pipeline adds its own: rejections, judged
    /// windows, evictions).
    pub(super) stats: InputStats,
    /// Windows closed and not yet judged, in close order.
    pub(super) closed: Vec<WindowSummary>,
    /// What the shard made of `closed[..verdicts.len()]` (see [`Shard::triage`]); the windows
    /// past it (closed on the pipeline's thread) go to the controller.
    pub(super) verdicts: Vec<Verdict>,
    /// What its judging counted this round.
    pub(super) judged: Judged,
    /// Segments with no state whose window this round went to the controller: their later
    /// windows this round go there too (judged in order).
    deferred: HashSet<Arc<str>, foldhash::fast::FixedState>,
}

/// A closed window as its shard left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Judged by the shard: no loop moved.
    Judged,
    /// For the controller; `fresh_before`: segments the shard had added this round before it.
    Controller { fresh_before: usize },
}

/// Whether a closed window is one a restart re-reads and does not judge again.
pub(super) fn replayed_before(replay_until: &BTreeMap<i32, i64>, w: &WindowSummary) -> bool {
    w.group.is_none()
        && replay_until
            .get(&w.partition)
            .is_some_and(|u| w.end_ms <= *u)
}

impl Shard {
    pub(super) fn new(engine: Windows, decoder: TelemetryDecoder, labels: LabelMap) -> Self {
        Shard {
            engine,
            decoder,
            labels,
            stats: InputStats::default(),
            closed: Vec::new(),
            verdicts: Vec::new(),
            judged: Judged::default(),
            deferred: HashSet::default(),
        }
    }

    /// Judges the windows closed since the last call that move no loop, against the lent
    /// state of its partitions (`controller::triage`); marks the others for the controller.
    pub(super) fn triage(
        &mut self,
        shared: &JudgeShared,
        parts: &mut [PartitionJudge<'_>],
        replay_until: &BTreeMap<i32, i64>,
    ) {
        let empty = Labels::new();
        for w in &self.closed[self.verdicts.len()..] {
            let to_controller = Verdict::Controller {
                fresh_before: self.judged.fresh,
            };
            // A re-read window is skipped by the pipeline; it goes no further.
            let verdict = if replayed_before(replay_until, w) || self.deferred.contains(&*w.segment)
            {
                to_controller
            } else if let Some(judge) = parts.iter_mut().find(|j| j.partition() == w.partition) {
                let labels = self.labels.map.get(&*w.segment).unwrap_or(&empty);
                match judge.judge(shared, w, labels, &mut self.judged) {
                    Triage::Judged => Verdict::Judged,
                    Triage::Controller { stated } => {
                        if !stated {
                            self.deferred.insert(w.segment.clone());
                        }
                        to_controller
                    }
                }
            } else {
                to_controller
            };
            self.verdicts.push(verdict);
        }
    }

    pub(super) fn clear_deferred(&mut self) {
        self.deferred.clear();
    }

    /// Tells the windows which segments the next records touch (see
    /// [`crate::window::WindowEngine::prefetch`]): keys and event times read without decoding.
    fn hint(&mut self, records: &[Record<'_>]) {
        let decoder = &self.decoder;
        // Keys as bytes: a hint only hashes them (the decoder validates the segment once).
        self.engine.prefetch(records.iter().filter_map(|r| {
            let ts = decoder.fast_event_time(r.value)?;
            Some((r.partition, r.key?, ts))
        }));
    }

    /// Decodes and validates a record, applies the event-time range and (against a broker
    /// timestamp) the clock-skew rule, and notes its labels.
    #[inline]
    pub(super) fn admit<'a>(
        &mut self,
        at: &Admission<'_>,
        me: usize,
        record: &Record<'a>,
    ) -> Admitted<'a> {
        if at.map.get(record.partition) != Some(me) {
            return Admitted::Skip;
        }
        if let Some(w) = at.waiting.get(&record.partition) {
            if record.offset >= w.offset {
                // Read again once the registry answers.
                return Admitted::Skip;
            }
        }
        match self.decoder.decode(record.key, record.value) {
            Ok(e) => self.decoded(at, record, e),
            Err(e) if at.learns && e.code == ErrorCode::UnknownSchemaId => Admitted::Unknown,
            Err(e) => {
                self.stats.records_read += 1;
                Admitted::Reject(e)
            }
        }
    }

    /// The rules past decoding (see [`Shard::admit`]), for an event decoded here or after the
    /// registry answered.
    #[inline]
    pub(super) fn decoded<'a>(
        &mut self,
        at: &Admission<'_>,
        record: &Record<'a>,
        event: Telemetry<'a>,
    ) -> Admitted<'a> {
        self.stats.records_read += 1;
        let ts = event.ts_ms();
        if at.options.from_ms.is_some_and(|f| ts < f) {
            self.stats.records_before_range += 1;
            return Admitted::Skip;
        }
        if at.options.to_ms.is_some_and(|t| ts > t) {
            self.stats.records_after_range += 1;
            return Admitted::Skip;
        }
        self.stats.records_in_range += 1;
        if at.options.skew == SkewReference::BrokerTimestamp {
            if let Some(b) = record.timestamp_ms {
                if ts > b.saturating_add(at.max_clock_skew_ms) {
                    return Admitted::Reject(DecodeError::new(
                        ErrorCode::ClockSkew,
                        format!(
                            "event time {ts} is {} ms ahead of the record's timestamp {b} (max skew {} ms)",
                            ts - b,
                            at.max_clock_skew_ms
                        ),
                    ));
                }
            }
        }
        self.labels.note(&event);
        Admitted::Event(event)
    }

    /// Ingests an admitted event at `now_ms`; the windows it closes join [`Shard::closed`].
    #[inline]
    pub(super) fn ingest(
        &mut self,
        record: &Record<'_>,
        event: &Telemetry<'_>,
        now_ms: i64,
    ) -> Result<(), DecodeError> {
        let ts = event.ts_ms();
        self.engine
            .ingest(
                Position {
                    partition: record.partition,
                    offset: record.offset,
                },
                event.segment(),
                ts,
                event.measurements().iter().copied(),
                now_ms,
                &mut self.closed,
            )
            .map_err(rejected)?;
        let s = &mut self.stats;
        s.records_aggregated += 1;
        s.first_event_ms = Some(s.first_event_ms.map_or(ts, |f| f.min(ts)));
        s.last_event_ms = Some(s.last_event_ms.map_or(ts, |l| l.max(ts)));
        Ok(())
    }

    /// One round of shard `me`: works `records[from..]` (hinted ahead, as
    /// [`crate::window::with_hints`] schedules it) until the end, [`CLOSED_PER_ROUND`] closed
    /// windows, or a record for the registry. Rejections are pushed with their record's index.
    pub(super) fn work(
        &mut self,
        at: &Admission<'_>,
        me: usize,
        records: &[Record<'_>],
        from: usize,
        now_ms: i64,
        rejects: &mut Vec<(usize, DecodeError)>,
    ) -> Stop {
        use crate::window::{HINT_AHEAD, HINT_BATCH};
        let mut hinted = from;
        for i in from..records.len() {
            let ahead = (i + HINT_AHEAD * HINT_BATCH).min(records.len());
            while hinted < ahead {
                let end = (hinted + HINT_BATCH).min(records.len());
                self.hint(&records[hinted..end]);
                hinted = end;
            }
            let r = &records[i];
            match self.admit(at, me, r) {
                Admitted::Event(e) => {
                    if let Err(e) = self.ingest(r, &e, now_ms) {
                        rejects.push((i, e));
                    }
                }
                Admitted::Skip => {}
                Admitted::Reject(e) => rejects.push((i, e)),
                Admitted::Unknown => return Stop::Registry(i),
            }
            if self.closed.len() >= CLOSED_PER_ROUND && i + 1 < records.len() {
                return Stop::Judge(i + 1);
            }
        }
        Stop::Done
    }
}

/// The record path through the shards: batches in rounds, and one record at a time.
impl Pipeline {
    /// A batch of records on one clock reading, worked shard after shard on this thread.
    pub fn on_batch(&mut self, records: &[Record<'_>], now_ms: i64, sink: &mut dyn Sink) {
        self.on_batch_with(records, now_ms, sink, &InPlace);
    }

    /// A batch of records on one clock reading, split by shard and worked in rounds (see
    /// `pipeline::shard`): `fanout` runs a round's shards, each hinting the windows ahead of its
    /// ingest; between rounds the rejections go to the sink and the closed windows are judged,
    /// shard by shard, in close order within each.
    pub fn on_batch_with<'a>(
        &mut self,
        records: &[Record<'a>],
        now_ms: i64,
        sink: &mut dyn Sink,
        fanout: &dyn Fanout,
    ) {
        let n = self.shards.len();
        // One shard reads the batch as it is (it skips partitions not owned); several read
        // their own records, in batch order.
        let split: Vec<Vec<Record<'a>>>;
        let lists: Vec<&[Record<'a>]> = if n == 1 {
            vec![records]
        } else {
            let mut own = vec![Vec::with_capacity(records.len() / n + 1); n];
            for r in records {
                if let Some(s) = self.map.get(r.partition) {
                    own[s].push(*r);
                }
            }
            split = own;
            split.iter().map(Vec::as_slice).collect()
        };
        let mut next: Vec<Option<usize>> =
            lists.iter().map(|l| (!l.is_empty()).then_some(0)).collect();
        let mut rejects: Vec<Vec<(usize, DecodeError)>> = vec![Vec::new(); n];
        let mut stops = vec![Stop::Done; n];
        while next.iter().any(Option::is_some) {
            {
                let (shards, at, shared, mut lent) = self.shards_for_round();
                let (at, shared) = (&at, &shared);
                let mut tasks: Vec<_> = shards
                    .iter_mut()
                    .zip(&lists)
                    .zip(&next)
                    .zip(rejects.iter_mut().zip(stops.iter_mut()))
                    .zip(lent.iter_mut())
                    .enumerate()
                    .filter_map(|(i, ((((shard, list), from), (rejects, stop)), parts))| {
                        let from = (*from)?;
                        Some(move || {
                            *stop = shard.work(at, i, list, from, now_ms, rejects);
                            shard.triage(shared, parts, at.replay_until);
                        })
                    })
                    .collect();
                let mut refs: Vec<&mut (dyn FnMut() + Send)> = tasks
                    .iter_mut()
                    .map(|t| t as &mut (dyn FnMut() + Send))
                    .collect();
                fanout.run(&mut refs);
            }
            for s in 0..n {
                let Some(_) = next[s] else { continue };
                for (i, e) in std::mem::take(&mut rejects[s]) {
                    self.reject(&lists[s][i], &e, sink);
                }
                next[s] = match stops[s] {
                    Stop::Done => None,
                    Stop::Judge(i) => Some(i),
                    Stop::Registry(i) => {
                        self.admit_and_ingest(&lists[s][i], now_ms, sink);
                        (i + 1 < lists[s].len()).then_some(i + 1)
                    }
                };
            }
            self.judge(now_ms, sink);
        }
    }

    /// One record on the driver's clock: [`Pipeline::admit`], then [`Pipeline::ingest`].
    #[inline]
    pub fn on_record(&mut self, record: &Record<'_>, now_ms: i64, sink: &mut dyn Sink) {
        if let Some(event) = self.admit(record, sink) {
            self.ingest(record, &event, now_ms, sink);
        }
    }

    /// The shards, and what they read of the pipeline.
    fn shards_and_reads(&mut self) -> (&mut [Shard], Admission<'_>) {
        let (shards, at, _) = self.split();
        (shards, at)
    }

    /// The shards, what they read of the pipeline, and the controller (disjoint borrows).
    fn split(&mut self) -> (&mut [Shard], Admission<'_>, &mut Controller) {
        let at = Admission {
            waiting: &self.waiting,
            options: self.options,
            max_clock_skew_ms: self.max_clock_skew_ms,
            learns: self.schemas.is_some(),
            map: &self.map,
            replay_until: &self.replay_until,
        };
        (&mut self.shards, at, &mut self.controller)
    }

    /// [`Pipeline::shards_and_reads`], with the controller's partition states lent to the
    /// shards that own them (for [`Shard::triage`]).
    fn shards_for_round(
        &mut self,
    ) -> (
        &mut [Shard],
        Admission<'_>,
        JudgeShared,
        Vec<Vec<PartitionJudge<'_>>>,
    ) {
        let (shards, at, controller) = self.split();
        let (shared, parts) = controller.lend();
        let mut lent: Vec<Vec<PartitionJudge<'_>>> =
            (0..shards.len()).map(|_| Vec::new()).collect();
        for judge in parts {
            if let Some(s) = at.map.get(judge.partition()) {
                lent[s].push(judge);
            }
        }
        (shards, at, shared, lent)
    }

    /// Decodes and validates a record, applies the event-time range and (against a broker
    /// timestamp) the clock-skew rule, and notes its labels. `None`: the record is not to be
    /// ingested (rejected through the sink, outside the range, or of a partition not owned:
    /// polled before a revoke took effect, the new owner reads it).
    #[inline]
    pub fn admit<'a>(&mut self, record: &Record<'a>, sink: &mut dyn Sink) -> Option<Telemetry<'a>> {
        let s = self.map.get(record.partition)?;
        let (shards, at) = self.shards_and_reads();
        let admitted = match shards[s].admit(&at, s, record) {
            Admitted::Unknown => match self.learn_schema(s, record) {
                Ok(Some(e)) => {
                    let (shards, at) = self.shards_and_reads();
                    shards[s].decoded(&at, record, e)
                }
                Ok(None) => Admitted::Skip,
                Err(e) => {
                    self.shards[s].stats.records_read += 1;
                    Admitted::Reject(e)
                }
            },
            other => other,
        };
        match admitted {
            Admitted::Event(e) => Some(e),
            Admitted::Reject(e) => {
                self.reject(record, &e, sink);
                None
            }
            Admitted::Skip | Admitted::Unknown => None,
        }
    }

    /// Ingests an admitted event at `now_ms` and judges the windows it closes.
    #[inline]
    pub fn ingest(
        &mut self,
        record: &Record<'_>,
        event: &Telemetry<'_>,
        now_ms: i64,
        sink: &mut dyn Sink,
    ) {
        self.ingest_unjudged(record, event, now_ms, sink);
        self.judge(now_ms, sink);
    }

    /// Ingests an admitted event into its partition's shard (a partition not owned is
    /// refused by the windows: `not_assigned`); a refusal goes to the sink.
    fn ingest_unjudged(
        &mut self,
        record: &Record<'_>,
        event: &Telemetry<'_>,
        now_ms: i64,
        sink: &mut dyn Sink,
    ) {
        let s = self.map.get(record.partition).unwrap_or(0);
        if let Err(e) = self.shards[s].ingest(record, event, now_ms) {
            self.reject(record, &e, sink);
        }
    }

    /// A record a shard left to the pipeline (its schema id is for the registry): admitted
    /// here, ingested into its shard; judged with the round.
    fn admit_and_ingest(&mut self, record: &Record<'_>, now_ms: i64, sink: &mut dyn Sink) {
        if let Some(event) = self.admit(record, sink) {
            self.ingest_unjudged(record, &event, now_ms, sink);
        }
    }

    /// A record the shard's codec could not decode for its unseen schema id: asks the
    /// registry, learns the answer (in that shard's codec) and decodes again. `Ok(None)`: no
    /// answer yet, the partition waits from this record on. `Err`: the registry does not know
    /// the id (the record is dead-lettered).
    fn learn_schema<'a>(
        &mut self,
        shard: usize,
        record: &Record<'a>,
    ) -> Result<Option<Telemetry<'a>>, DecodeError> {
        let decoder = &mut self.shards[shard].decoder;
        let Some(source) = self.schemas.as_mut() else {
            return decoder.decode(record.key, record.value).map(Some);
        };
        match decoder.learn_schema(source.as_mut(), record.value) {
            // Learned, it decodes now; unknown to the registry, the same error comes again
            // (the dead letter's reason).
            Ok(_) => decoder.decode(record.key, record.value).map(Some),
            Err((schema_id, reason)) => {
                let frozen = self.read_through_of(record.partition);
                self.waiting_read_through.insert(record.partition, frozen);
                self.waiting.insert(
                    record.partition,
                    SchemaWait {
                        offset: record.offset,
                        schema_id,
                        reason,
                    },
                );
                Ok(None)
            }
        }
    }
}

/// A record the windows refused, as the dead letter's error (the engine's reasons under their
/// stable DLQ codes).
fn rejected(r: crate::window::Rejection) -> DecodeError {
    use crate::window::Rejected;
    let code = match r.kind {
        Rejected::Late => ErrorCode::Late,
        Rejected::ClockSkew => ErrorCode::ClockSkew,
        Rejected::NotAssigned => ErrorCode::NotAssigned,
    };
    DecodeError::new(code, r.message)
}

/// Adds the counts of `b` to `a` (the fields a shard counts).
pub(super) fn add_counts(a: &mut InputStats, b: &InputStats) {
    a.records_read += b.records_read;
    a.records_in_range += b.records_in_range;
    a.records_aggregated += b.records_aggregated;
    a.records_before_range += b.records_before_range;
    a.records_after_range += b.records_after_range;
    a.first_event_ms = match (a.first_event_ms, b.first_event_ms) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    a.last_event_ms = match (a.last_event_ms, b.last_event_ms) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
}
