//! Shards: the per-event work of disjoint partition sets (decode, labels, windows), each shard
//! a value of its own, so a driver may run them side by side.
//!
//! A [`Pipeline`] holds one shard or several; a partition belongs to one shard from its assign
//! to its revoke. A batch is split by shard and worked in **rounds**: in a round every shard
//! with records left works through them on its own (no state shared with another shard; the
//! pipeline's partition marks are read only), then, between rounds, the pipeline alone writes
//! the round's rejections to the sink and judges the windows the round closed, shard by shard,
//! through the one controller (exact guardrails need no lock). A shard ends its round early
//! when [`CLOSED_PER_ROUND`] closed windows wait (the buffer stays small, and commands go out
//! while the rest of the batch is worked), or at a record whose schema id only the registry
//! can answer (asked between rounds, by the pipeline, which holds the one registry source).
//!
//! [`Fanout`] is how a driver runs a round's shards: [`InPlace`] one after another (replays,
//! tests, one shard), the live runtime on its worker threads. The pipeline knows no thread.

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

/// What a shard reads of the pipeline while it works: the same for every shard of a round.
pub(super) struct Admission<'p> {
    pub(super) waiting: &'p BTreeMap<i32, SchemaWait>,
    pub(super) options: Options,
    pub(super) max_clock_skew_ms: i64,
    /// A registry is set: a record of an unseen schema id goes to the pipeline
    /// ([`Admitted::Unknown`]) instead of the DLQ.
    pub(super) learns: bool,
    /// Partition → shard (see [`ShardMap`]): a shard skips records of partitions not its own.
    pub(super) map: &'p ShardMap,
    pub(super) shard: usize,
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

    /// Partitions owned by `shard`.
    pub(super) fn count(&self, shard: usize) -> usize {
        self.0.iter().filter(|s| **s as usize == shard).count()
    }
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
}

impl Shard {
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
    pub(super) fn admit<'a>(&mut self, at: &Admission<'_>, record: &Record<'a>) -> Admitted<'a> {
        if at.map.get(record.partition) != Some(at.shard) {
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

    /// One round: works `records[from..]` (hinted ahead, as [`crate::window::with_hints`]
    /// schedules it) until the end, [`CLOSED_PER_ROUND`] closed windows, or a record for the
    /// registry. Rejections are pushed with their record's index.
    pub(super) fn work(
        &mut self,
        at: &Admission<'_>,
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
            match self.admit(at, r) {
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
