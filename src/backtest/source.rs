//! Reading a topic for a replay: a fixed offset range per partition (resolved once, so two
//! passes read the same records), merged across partitions by (event time, partition, offset).
//!
//! The merge is a k-way merge of the partitions' offset-ordered sequences: a record is released
//! only while every unfinished partition has a buffered head, so the order depends on the
//! records alone, never on fetch sizes or timing. Buffers are bounded ([`BUFFER_BYTES`]):
//! a partition far ahead of the others is paused until they catch up.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka;

/// Bytes buffered across all partitions before the fullest are paused (each partition may
/// hold its share, at least 1 MiB). Pausing makes librdkafka drop and refetch what it had
/// prefetched, so the bound is generous: balanced partitions never reach it.
pub const BUFFER_BYTES: usize = 256 << 20;

/// Where a replay starts and ends, per partition (`end` exclusive: the high watermark when
/// the range was resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub topic: String,
    pub start: BTreeMap<i32, i64>,
    pub end: BTreeMap<i32, i64>,
    /// How the start was found: `offsets_for_times` or `beginning`.
    pub seek: &'static str,
}

impl Range {
    /// Records in the range (an upper bound: transaction markers take offsets too).
    pub fn len(&self) -> u64 {
        self.end
            .iter()
            .map(|(p, e)| (e - self.start.get(p).copied().unwrap_or(*e)).max(0) as u64)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One record as read, borrowed from the reader's buffers.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    /// The broker's timestamp (create or log-append time), when the record has one.
    pub broker_ts_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// The replay consumer's callbacks: partition ends are expected (they end the replay), not
/// errors worth logging.
pub struct ReplayContext;

impl rdkafka::ClientContext for ReplayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = match &error {
            KafkaError::PartitionEOF(_) => true,
            KafkaError::Global(code) => *code == rdkafka::types::RDKafkaErrorCode::PartitionEOF,
            _ => false,
        };
        if !eof {
            tracing::warn!(error = %error, reason, "backtest consumer");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReplayContext {}

/// A consumer of the replay's own: a group id of its own, never commits, reads committed data
/// only, reports partition ends.
fn reader(
    config: &Config,
    fetch_max_bytes: Option<usize>,
) -> anyhow::Result<BaseConsumer<ReplayContext>> {
    let group = format!("{}-backtest", config.kafka.group_id);
    let mut c = kafka::client_config(
        config,
        &[
            ("group.id", group.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("isolation.level", "read_committed"),
            ("fetch.queue.backoff.ms", "5"),
        ],
    );
    if let Some(n) = fetch_max_bytes {
        let n = n.to_string();
        c.set("max.partition.fetch.bytes", &n);
        c.set("fetch.message.max.bytes", &n);
    }
    c.create_with_context(ReplayContext)
        .context("cannot create the backtest consumer")
}

/// Resolves the offsets to replay: from the first record at or after `from_ms` (broker time,
/// less `margin_ms` for producers whose clocks or batching lag event time) where the broker
/// answers offsets-for-times, else from the beginning; to the current high watermark.
///
/// # Errors
/// The topic does not exist or its metadata or watermarks cannot be read.
pub fn resolve_range(
    config: &Config,
    topic: &str,
    from_ms: Option<i64>,
    margin_ms: i64,
) -> anyhow::Result<Range> {
    let consumer = reader(config, None)?;
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot fetch metadata for topic {topic}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic {topic} does not exist (or has no partitions); check topics.telemetry.name or --topic"
    );
    let mut start = BTreeMap::new();
    let mut end = BTreeMap::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .with_context(|| format!("cannot read the offsets of {topic}/{p}"))?;
        start.insert(p, low);
        end.insert(p, high);
    }
    let mut seek = "beginning";
    if let Some(from) = from_ms {
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(from.saturating_sub(margin_ms)))?;
        }
        // The embedded mock cluster answers ListOffsets by time with the log end. A broker
        // whose answer for time 0 is not the first offset does not keep a time index: the
        // replay then starts at the beginning and the event-time filter does the rest.
        let mut probe = TopicPartitionList::new();
        for &p in &partitions {
            probe.add_partition_offset(topic, p, Offset::Offset(0))?;
        }
        let indexed = consumer
            .offsets_for_times(probe, timeout)
            .is_ok_and(|found| {
                found.elements().iter().all(|e| {
                    let (low, high) = (start[&e.partition()], end[&e.partition()]);
                    low == high || e.offset() == Offset::Offset(low)
                })
            });
        let found = if indexed {
            consumer.offsets_for_times(tpl, timeout).ok()
        } else {
            None
        };
        if let Some(found) = found {
            let mut resolved = BTreeMap::new();
            for e in found.elements() {
                let (low, high) = (start[&e.partition()], end[&e.partition()]);
                match e.offset() {
                    Offset::Offset(n) if (low..=high).contains(&n) => {
                        resolved.insert(e.partition(), n);
                    }
                    Offset::End => {
                        resolved.insert(e.partition(), high);
                    }
                    _ => {}
                }
            }
            if resolved.len() == partitions.len() {
                start = resolved;
                seek = "offsets_for_times";
            }
        }
    }
    Ok(Range {
        topic: topic.to_string(),
        start,
        end,
        seek,
    })
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    offset: i64,
    sort_ts: i64,
    broker_ts: Option<i64>,
    key: Option<(usize, usize)>,
    value: Option<(usize, usize)>,
}

#[derive(Default)]
struct PartBuf {
    bytes: Vec<u8>,
    /// Bytes before this were consumed (compacted away when the buffer drains or grows).
    consumed: usize,
    recs: VecDeque<Meta>,
    finished: bool,
    paused: bool,
    /// Merge key of the last record read (records that do not decode sort with it).
    last_ts: i64,
}

impl PartBuf {
    fn buffered(&self) -> usize {
        self.bytes.len() - self.consumed
    }

    fn push(
        &mut self,
        offset: i64,
        sort_ts: i64,
        broker_ts: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        if self.recs.is_empty() {
            self.bytes.clear();
            self.consumed = 0;
        } else if self.consumed > (1 << 20) && self.consumed * 2 > self.bytes.len() {
            // Slide the live tail to the front.
            let c = self.consumed;
            self.bytes.drain(..c);
            for m in &mut self.recs {
                if let Some(k) = &mut m.key {
                    k.0 -= c;
                }
                if let Some(v) = &mut m.value {
                    v.0 -= c;
                }
            }
            self.consumed = 0;
        }
        let mut span = |b: Option<&[u8]>| {
            b.map(|b| {
                let at = self.bytes.len();
                self.bytes.extend_from_slice(b);
                (at, b.len())
            })
        };
        let key = span(key);
        let value = span(value);
        self.recs.push_back(Meta {
            offset,
            sort_ts,
            broker_ts,
            key,
            value,
        });
    }
}

/// What a read saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub records: u64,
    pub bytes: u64,
}

/// Reads `range` and hands every record to `on_record` in merged order. `sort_ts` gives a
/// record's merge key (its event time; `None` for a record that does not decode, which then
/// sorts with its partition's previous record).
///
/// # Errors
/// The consumer cannot be created or assigned, or a fetch fails fatally.
pub fn read_merged(
    config: &Config,
    range: &Range,
    fetch_max_bytes: Option<usize>,
    mut sort_ts: impl FnMut(Option<&[u8]>, Option<&[u8]>) -> Option<i64>,
    mut on_record: impl FnMut(RawRecord<'_>),
) -> anyhow::Result<ReadStats> {
    let consumer = reader(config, fetch_max_bytes)?;
    let mut tpl = TopicPartitionList::new();
    let mut parts: BTreeMap<i32, PartBuf> = BTreeMap::new();
    // Unfinished partitions with nothing buffered: nothing can be released while any exists.
    let mut waiting = 0usize;
    for (&p, &s) in &range.start {
        let e = range.end[&p];
        let finished = s >= e;
        if !finished {
            tpl.add_partition_offset(&range.topic, p, Offset::Offset(s))?;
            waiting += 1;
        }
        parts.insert(
            p,
            PartBuf {
                finished,
                last_ts: i64::MIN,
                ..PartBuf::default()
            },
        );
    }
    let mut stats = ReadStats::default();
    if waiting == 0 {
        return Ok(stats);
    }
    consumer
        .assign(&tpl)
        .context("cannot assign the replay's partitions")?;
    let mut heap: BinaryHeap<Reverse<(i64, i32, i64)>> = BinaryHeap::new();
    let mut idle_polls = 0u32;
    let high_water = (BUFFER_BYTES / parts.len().max(1)).max(1 << 20);
    let low_water = high_water / 4;
    loop {
        // Release in order while every unfinished partition has a head.
        while waiting == 0 {
            let Some(Reverse((_, p, _))) = heap.pop() else {
                break;
            };
            let pb = parts.get_mut(&p).expect("known partition");
            let m = pb.recs.pop_front().expect("a head was queued");
            let slice = |r: Option<(usize, usize)>| r.map(|(at, n)| &pb.bytes[at..at + n]);
            on_record(RawRecord {
                partition: p,
                offset: m.offset,
                broker_ts_ms: m.broker_ts,
                key: slice(m.key),
                value: slice(m.value),
            });
            let used = m
                .key
                .map_or(0, |k| k.0 + k.1)
                .max(m.value.map_or(0, |v| v.0 + v.1));
            pb.consumed = pb.consumed.max(used);
            match pb.recs.front() {
                Some(next) => heap.push(Reverse((next.sort_ts, p, next.offset))),
                None if !pb.finished => waiting += 1,
                None => {}
            }
            if pb.paused && pb.buffered() <= low_water && !pb.finished {
                pb.paused = false;
                let mut one = TopicPartitionList::new();
                one.add_partition(&range.topic, p);
                consumer.resume(&one)?;
            }
        }
        if heap.is_empty() && parts.values().all(|pb| pb.finished) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_polls = 0;
                let p = m.partition();
                let end = range.end.get(&p).copied().unwrap_or(0);
                let Some(pb) = parts.get_mut(&p) else {
                    continue;
                };
                if pb.finished {
                    continue;
                }
                if m.offset() >= end {
                    pb.finished = true;
                    if pb.recs.is_empty() {
                        waiting -= 1;
                    }
                    continue;
                }
                stats.records += 1;
                stats.bytes +=
                    (m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len)) as u64;
                let ts = sort_ts(m.key(), m.payload()).unwrap_or(pb.last_ts);
                pb.last_ts = ts;
                let was_empty = pb.recs.is_empty();
                pb.push(
                    m.offset(),
                    ts,
                    m.timestamp().to_millis(),
                    m.key(),
                    m.payload(),
                );
                if was_empty {
                    waiting -= 1;
                    heap.push(Reverse((ts, p, m.offset())));
                }
                if m.offset() + 1 >= end {
                    pb.finished = true;
                }
                if !pb.finished && !pb.paused && pb.buffered() >= high_water {
                    pb.paused = true;
                    let mut one = TopicPartitionList::new();
                    one.add_partition(&range.topic, p);
                    consumer.pause(&one)?;
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(pb) = parts.get_mut(&p) {
                    if !pb.finished {
                        pb.finished = true;
                        if pb.recs.is_empty() {
                            waiting -= 1;
                        }
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "backtest consumer error");
            }
            None => {
                idle_polls += 1;
                anyhow::ensure!(
                    idle_polls < 300,
                    "no records for 30 s while {waiting} partition(s) of {} were still expected to have some; is the broker up?",
                    range.topic
                );
            }
        }
    }
    Ok(stats)
}

/// Reads `range` in arrival order without merging or decoding (the replay benchmark's peer).
///
/// # Errors
/// As [`read_merged`].
pub fn read_raw(config: &Config, range: &Range) -> anyhow::Result<ReadStats> {
    let consumer = reader(config, None)?;
    let mut tpl = TopicPartitionList::new();
    let mut open = 0usize;
    for (&p, &s) in &range.start {
        if s < range.end[&p] {
            tpl.add_partition_offset(&range.topic, p, Offset::Offset(s))?;
            open += 1;
        }
    }
    let mut stats = ReadStats::default();
    if open == 0 {
        return Ok(stats);
    }
    consumer.assign(&tpl)?;
    let mut done: BTreeMap<i32, bool> = BTreeMap::new();
    let mut idle_polls = 0u32;
    while done.len() < open {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_polls = 0;
                let end = range.end[&m.partition()];
                if m.offset() < end {
                    stats.records += 1;
                    stats.bytes += (m.key().map_or(0, <[u8]>::len)
                        + m.payload().map_or(0, <[u8]>::len))
                        as u64;
                    std::hint::black_box(m.payload());
                }
                if m.offset() + 1 >= end {
                    done.insert(m.partition(), true);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                done.insert(p, true);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => {
                idle_polls += 1;
                anyhow::ensure!(idle_polls < 300, "no records for 30 s");
            }
        }
    }
    Ok(stats)
}
