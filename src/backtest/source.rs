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
    /// The record's merge key: the least event time of this record and the
    /// [`MERGE_LOOKAHEAD`] records after it on its partition (see [`read_merged`]).
    pub merge_ts: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// A consumer of the replay's own: a group id of its own, never commits, reads committed data
/// only, reports partition ends.
fn reader(
    config: &Config,
    fetch_max_bytes: Option<usize>,
) -> anyhow::Result<BaseConsumer<kafka::QuietEof>> {
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
    c.create_with_context(kafka::QuietEof)
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
    let found = kafka::offsets_from(
        &consumer,
        topic,
        from_ms.map(|f| f.saturating_sub(margin_ms)),
    )?;
    Ok(Range {
        topic: topic.to_string(),
        start: found.start,
        end: found.end,
        seek: if found.by_time {
            "offsets_for_times"
        } else {
            "beginning"
        },
    })
}

#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    recs: Vec<Meta>,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    offset: i64,
    sort_ts: i64,
    broker_ts: Option<i64>,
    key: Option<(usize, usize)>,
    value: Option<(usize, usize)>,
}

impl Chunk {
    fn push(
        &mut self,
        offset: i64,
        sort_ts: i64,
        broker_ts: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        let mut span = |b: Option<&[u8]>| {
            b.map(|b| {
                let at = self.bytes.len();
                self.bytes.extend_from_slice(b);
                (at, b.len())
            })
        };
        let key = span(key);
        let value = span(value);
        self.recs.push(Meta {
            offset,
            sort_ts,
            broker_ts,
            key,
            value,
        });
    }

    /// Moves the last `n` records into a new chunk (copying their bytes).
    fn split_tail(&mut self, n: usize, mut into: Chunk) -> Chunk {
        let from = self.recs.len() - n.min(self.recs.len());
        let base = self.recs[from..]
            .iter()
            .flat_map(|m| m.key.iter().chain(m.value.iter()).map(|(at, _)| *at))
            .min()
            .unwrap_or(self.bytes.len());
        into.bytes.extend_from_slice(&self.bytes[base..]);
        into.recs.extend(self.recs[from..].iter().map(|m| {
            let rebase = |r: Option<(usize, usize)>| r.map(|(at, n)| (at - base, n));
            Meta {
                key: rebase(m.key),
                value: rebase(m.value),
                ..*m
            }
        }));
        self.recs.truncate(from);
        self.bytes.truncate(base);
        into
    }

    fn record(&self, i: usize, partition: i32) -> RawRecord<'_> {
        let m = &self.recs[i];
        let slice = |r: Option<(usize, usize)>| r.map(|(at, n)| &self.bytes[at..at + n]);
        RawRecord {
            partition,
            offset: m.offset,
            broker_ts_ms: m.broker_ts,
            merge_ts: m.sort_ts,
            key: slice(m.key),
            value: slice(m.value),
        }
    }
}

/// From the reader thread to the merge.
enum Handoff {
    Chunk(i32, Chunk),
    /// Nothing more will come from this partition.
    Finished(i32),
}

/// Records per chunk at most (a chunk also leaves early when the merge waits for it).
const CHUNK: usize = 512;

/// How many later records of its partition a record's merge key looks at: a record's key is
/// the least event time of itself and the next `MERGE_LOOKAHEAD`, so a few future-dated
/// records (an outlier, a producer host running ahead among others) neither hold their
/// partition back in the merge nor move the replay's clock, while a partition that is quiet
/// and then resumes is still merged at its new time.
pub const MERGE_LOOKAHEAD: usize = 8;

/// Per partition, shared by the reader and the merge.
#[derive(Default)]
struct Shared {
    /// Bytes handed over and not yet replayed.
    buffered: std::sync::atomic::AtomicUsize,
    /// The merge has nothing of this partition and waits for it: send what there is.
    wanted: std::sync::atomic::AtomicBool,
}

/// What a read saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub records: u64,
    pub bytes: u64,
}

/// Reads `range` and hands every record to `on_record` in merged order. `sort_ts` gives a
/// record's event time (`None` for a record that does not decode, which then sorts with its
/// partition's previous record); its merge key is the least of its own and the next
/// [`MERGE_LOOKAHEAD`] records' (so a record leaves the reader only once those are read, or
/// its partition has ended).
///
/// A reader thread polls, computes merge keys and copies records into per-partition chunks;
/// the calling thread merges the chunks and runs `on_record`, so reading and replaying
/// overlap. The merge releases a record only while every unfinished partition has one
/// queued, so the order depends on the records alone.
///
/// # Errors
/// The consumer cannot be created or assigned, or the broker stops answering.
pub fn read_merged(
    config: &Config,
    range: &Range,
    fetch_max_bytes: Option<usize>,
    sort_ts: impl FnMut(Option<&[u8]>, Option<&[u8]>) -> Option<i64> + Send,
    mut on_record: impl FnMut(RawRecord<'_>),
) -> anyhow::Result<ReadStats> {
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};

    let open: Vec<i32> = range
        .start
        .iter()
        .filter(|(p, s)| **s < range.end[*p])
        .map(|(p, _)| *p)
        .collect();
    if open.is_empty() {
        return Ok(ReadStats::default());
    }
    let shared: BTreeMap<i32, Shared> = open.iter().map(|p| (*p, Shared::default())).collect();
    for s in shared.values() {
        s.wanted.store(true, SeqCst);
    }
    let high_water = (BUFFER_BYTES / open.len()).max(1 << 20);
    let consumer = reader(config, fetch_max_bytes)?;
    let feed = routed_feed(&consumer, &range.topic, &open)?;
    let mut tpl = TopicPartitionList::new();
    for p in &open {
        tpl.add_partition_offset(&range.topic, *p, Offset::Offset(range.start[p]))?;
    }
    consumer
        .assign(&tpl)
        .context("cannot assign the replay's partitions")?;

    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Handoff>(256);
        let (recycle_tx, recycle_rx) = std::sync::mpsc::channel::<Chunk>();
        let shared = &shared;
        // Borrowed, not moved: the consumer outlives the feed (dropped before it, at the end
        // of this function); a consumer destroyed with its feed alive waits forever.
        let (consumer, feed) = (&consumer, &feed);
        let reader = std::thread::Builder::new()
            .name("backtest-reader".into())
            .spawn_scoped(scope, move || {
                read_chunks(
                    (consumer, feed),
                    range,
                    shared,
                    high_water,
                    sort_ts,
                    &tx,
                    &recycle_rx,
                )
            })
            .context("cannot start the reader thread")?;

        struct Queue {
            chunks: VecDeque<Chunk>,
            /// Next record of the front chunk.
            at: usize,
            finished: bool,
        }
        let mut queues: BTreeMap<i32, Queue> = open
            .iter()
            .map(|p| {
                (
                    *p,
                    Queue {
                        chunks: VecDeque::new(),
                        at: 0,
                        finished: false,
                    },
                )
            })
            .collect();
        let mut waiting = open.len();
        let mut heap: BinaryHeap<Reverse<(i64, i32, i64)>> = BinaryHeap::new();
        loop {
            while waiting == 0 {
                let Some(Reverse((_, p, _))) = heap.pop() else {
                    break;
                };
                let q = queues.get_mut(&p).expect("known partition");
                let front = q.chunks.front().expect("a head was queued");
                on_record(front.record(q.at, p));
                q.at += 1;
                if q.at == front.recs.len() {
                    let mut done = q.chunks.pop_front().expect("front");
                    q.at = 0;
                    shared[&p].buffered.fetch_sub(done.bytes.len(), Relaxed);
                    done.bytes.clear();
                    done.recs.clear();
                    let _ = recycle_tx.send(done);
                }
                match q.chunks.front() {
                    Some(c) => {
                        let m = &c.recs[q.at];
                        heap.push(Reverse((m.sort_ts, p, m.offset)));
                    }
                    None if !q.finished => {
                        waiting += 1;
                        shared[&p].wanted.store(true, SeqCst);
                    }
                    None => {}
                }
            }
            if heap.is_empty() && queues.values().all(|q| q.finished) {
                break;
            }
            let Ok(feed) = rx.recv() else {
                break;
            };
            match feed {
                Handoff::Chunk(p, chunk) => {
                    let q = queues.get_mut(&p).expect("known partition");
                    if q.chunks.is_empty() {
                        let m = &chunk.recs[0];
                        heap.push(Reverse((m.sort_ts, p, m.offset)));
                        if !q.finished {
                            waiting -= 1;
                        }
                    }
                    q.chunks.push_back(chunk);
                }
                Handoff::Finished(p) => {
                    let q = queues.get_mut(&p).expect("known partition");
                    if !q.finished && q.chunks.is_empty() {
                        waiting -= 1;
                    }
                    q.finished = true;
                }
            }
        }
        drop(rx);
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the backtest reader panicked"))?
    })
}

/// The reader thread: poll, key, chunk, hand over; pause partitions far ahead.
fn read_chunks(
    (consumer, feed): (&BaseConsumer<kafka::QuietEof>, &kafka::Feed),
    range: &Range,
    shared: &BTreeMap<i32, Shared>,
    high_water: usize,
    mut sort_ts: impl FnMut(Option<&[u8]>, Option<&[u8]>) -> Option<i64>,
    tx: &std::sync::mpsc::SyncSender<Handoff>,
    recycle: &std::sync::mpsc::Receiver<Chunk>,
) -> anyhow::Result<ReadStats> {
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};

    struct Part {
        chunk: Chunk,
        last_ts: i64,
        finished: bool,
        paused: bool,
    }
    let mut parts: BTreeMap<i32, Part> = shared
        .keys()
        .map(|p| {
            (
                *p,
                Part {
                    chunk: Chunk::default(),
                    last_ts: i64::MIN,
                    finished: false,
                    paused: false,
                },
            )
        })
        .collect();
    let mut unfinished = parts.len();
    let mut stats = ReadStats::default();
    let mut idle_polls = 0u32;
    let mut fed = Vec::with_capacity(TAKE);
    let mut detached = Vec::new();
    let mut errors = Vec::new();
    // Hands a partition's chunk over, but for the records whose merge key still waits on
    // later ones (unless the partition has ended); `false` once the merge is gone.
    let send = |p: i32, part: &mut Part| -> bool {
        let keep = if part.finished { 0 } else { MERGE_LOOKAHEAD };
        if part.chunk.recs.len() <= keep {
            return true;
        }
        let next = recycle.try_recv().unwrap_or_default();
        let next = part.chunk.split_tail(keep, next);
        let chunk = std::mem::replace(&mut part.chunk, next);
        shared[&p].buffered.fetch_add(chunk.bytes.len(), Relaxed);
        shared[&p].wanted.store(false, SeqCst);
        tx.send(Handoff::Chunk(p, chunk)).is_ok()
    };
    // Marks a partition finished and hands over the rest of it; `false` once the merge is gone.
    let finished = |p: i32, part: &mut Part| -> bool {
        part.finished = true;
        send(p, part) && tx.send(Handoff::Finished(p)).is_ok()
    };
    let one = |p: i32| -> anyhow::Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&range.topic, p, Offset::Invalid)?;
        Ok(tpl)
    };
    while unfinished > 0 {
        for (p, part) in parts.iter_mut().filter(|(_, part)| part.paused) {
            if shared[p].buffered.load(Relaxed) <= high_water / 4 {
                part.paused = false;
                consumer.resume(&one(*p)?)?;
            }
        }
        take(consumer, feed, &mut fed, &mut detached, &mut errors);
        if fed.is_empty() && detached.is_empty() && errors.is_empty() {
            // Idle: whatever is chunked goes now.
            for (p, part) in parts.iter_mut() {
                if !send(*p, part) {
                    return Ok(stats);
                }
            }
            idle_polls += 1;
            anyhow::ensure!(
                idle_polls < 300,
                "no records for 30 s while {unfinished} partition(s) of {} were still expected to have some; is the broker up?",
                range.topic
            );
            continue;
        }
        idle_polls = 0;
        let records = fed
            .iter()
            .map(kafka::Fed::taken)
            .chain(detached.iter().map(kafka::Taken::of));
        for m in records {
            let mut finish = None;
            let p = m.partition;
            let end = range.end.get(&p).copied().unwrap_or(0);
            let Some(part) = parts.get_mut(&p) else {
                continue;
            };
            if part.finished {
                continue;
            }
            if m.offset >= end {
                finish = Some(p);
            } else {
                stats.records += 1;
                stats.bytes +=
                    (m.key.map_or(0, <[u8]>::len) + m.payload.map_or(0, <[u8]>::len)) as u64;
                let ts = sort_ts(m.key, m.payload).unwrap_or(part.last_ts);
                part.last_ts = ts;
                // This record ends the look-ahead of the ones before it (still here: a
                // chunk leaves with its last MERGE_LOOKAHEAD records kept back).
                let n = part.chunk.recs.len();
                for r in &mut part.chunk.recs[n.saturating_sub(MERGE_LOOKAHEAD)..] {
                    r.sort_ts = r.sort_ts.min(ts);
                }
                part.chunk
                    .push(m.offset, ts, m.timestamp_ms, m.key, m.payload);
                if m.offset + 1 >= end {
                    finish = Some(p);
                } else if part.chunk.recs.len() >= CHUNK + MERGE_LOOKAHEAD
                    || (shared[&p].wanted.load(SeqCst) && part.chunk.recs.len() > MERGE_LOOKAHEAD)
                {
                    if !send(p, part) {
                        return Ok(stats);
                    }
                    if shared[&p].buffered.load(Relaxed) >= high_water {
                        part.paused = true;
                        consumer.pause(&one(p)?)?;
                    }
                }
            }
            if let Some(p) = finish {
                unfinished -= 1;
                if !finished(p, parts.get_mut(&p).expect("known partition")) {
                    return Ok(stats);
                }
            }
        }
        fed.clear();
        detached.clear();
        for e in errors.drain(..) {
            match e {
                KafkaError::PartitionEOF(p) => {
                    let Some(part) = parts.get_mut(&p).filter(|x| !x.finished) else {
                        continue;
                    };
                    unfinished -= 1;
                    if !finished(p, part) {
                        return Ok(stats);
                    }
                }
                e => tracing::warn!(error = %e, "backtest consumer error"),
            }
        }
    }
    Ok(stats)
}

/// Most records the reader takes from its feed at once.
const TAKE: usize = 4096;

/// A feed for the replay's consumer with every partition of `open` routed to it; call it
/// before the assignment (see [`kafka::Feed`]).
fn routed_feed(
    consumer: &BaseConsumer<kafka::QuietEof>,
    topic: &str,
    open: &[i32],
) -> anyhow::Result<kafka::Feed> {
    // SAFETY: the consumer is alive; the caller declares the feed after the consumer, so
    // the feed (and every record taken from it) is dropped first.
    let feed = unsafe { kafka::Feed::new(consumer.client().native_ptr()) }
        .context("cannot create the replay's feed queue")?;
    let name = std::ffi::CString::new(topic).context("the topic's name holds a NUL byte")?;
    for p in open {
        // SAFETY: the feed is alive (created above, returned to the caller).
        let routed = unsafe { feed.router().route(&name, *p) };
        anyhow::ensure!(
            routed,
            "cannot route partition {p} of {topic} to the replay's feed"
        );
    }
    Ok(feed)
}

/// The next records: the consumer's own queue served first (errors, logs; a record there is
/// copied), then a batch from the feed, waiting up to 100 ms when nothing else came.
fn take<'f>(
    consumer: &BaseConsumer<kafka::QuietEof>,
    feed: &'f kafka::Feed,
    fed: &mut Vec<kafka::Fed<'f>>,
    detached: &mut Vec<rdkafka::message::OwnedMessage>,
    errors: &mut Vec<KafkaError>,
) {
    while let Some(r) = consumer.poll(Duration::ZERO) {
        match r {
            Ok(m) => detached.push(m.detach()),
            Err(e) => errors.push(e),
        }
    }
    let wait = if detached.is_empty() && errors.is_empty() {
        Duration::from_millis(100)
    } else {
        Duration::ZERO
    };
    feed.take(TAKE, wait, fed, errors);
}

/// The next message: what is queued without waiting (librdkafka skips its clock reads on
/// that path), else up to 100 ms.
fn poll<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
) -> Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>> {
    consumer
        .poll(Duration::ZERO)
        .or_else(|| consumer.poll(Duration::from_millis(100)))
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
        match poll(&consumer) {
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
