//! The telemetry consumer's group: rebalance events and lag.

use super::*;

/// A rebalance, in the telemetry stream where it happened (see [`Stream`]).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum GroupEvent {
    Assigned(Vec<i32>),
    /// The partitions left; the callback already handed over what was processed before it
    /// (committed its offsets, or the open transaction with them).
    Revoked {
        parts: Vec<i32>,
        handover: Handover,
    },
}

/// What the revoke callback did with the work processed before it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Handover {
    /// At-least-once: the offsets of the leaving partitions.
    Commit(CommitResult),
    /// Exactly-once: the open transaction (it takes every owned partition's offsets).
    Transaction(TxnResult),
}

/// The telemetry consumer's callbacks. The rebalance callback runs inside `poll`, on the
/// loop's thread, between two turns: on revoke it reads the core's committable offsets (the
/// lock held only for the copy), commits them with no lock held, and records the event; the
/// loop applies events in the order they came between the records ([`Stream`]).
pub(super) struct GroupContext {
    pub(super) topic: String,
    pub(super) producer: Arc<ThreadedProducer<ProduceContext>>,
    pub(super) eos: bool,
    pub(super) core: SharedCore,
    pub(super) events: Mutex<Vec<GroupEvent>>,
    /// Whether `events` may hold something: read once per polled record, so a poll with no
    /// group event takes no lock.
    pub(super) events_pending: std::sync::atomic::AtomicBool,
    pub(super) revoke_timeout: Duration,
    pub(super) client_errors: Mutex<Vec<(rdkafka::error::KafkaError, String)>>,
    /// Per telemetry partition, from librdkafka's statistics (`STATS_INTERVAL`): the high
    /// watermark of its last fetch response (what the lag is measured against) and where
    /// reading starts before anything is delivered.
    pub(super) fetch_marks: Mutex<BTreeMap<i32, FetchMarks>>,
    /// The group's rebalance protocol is cooperative ([`cooperative_protocol`]).
    pub(super) cooperative: bool,
    /// Where assigned partitions send their records (the loop's [`kafka::Feed`]s, one per
    /// shard); `None` before the loop starts and after it ends (records then go to the
    /// consumer's queue).
    pub(super) router: Mutex<Option<Routes>>,
    /// The topic's name for librdkafka.
    pub(super) topic_c: std::ffi::CString,
}

/// Whether librdkafka runs the group with the cooperative rebalance protocol under these
/// client properties: the `cooperative-sticky` assignor (librdkafka refuses to mix it with
/// eager ones) or the KIP-848 consumer group protocol.
pub(super) fn cooperative_protocol(properties: &BTreeMap<String, String>) -> bool {
    properties
        .get("partition.assignment.strategy")
        .is_some_and(|s| s.contains("cooperative-sticky"))
        || properties
            .get("group.protocol")
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("consumer"))
}

impl GroupContext {
    fn push(&self, ev: GroupEvent) {
        let mut events = lock(&self.events);
        events.push(ev);
        self.events_pending.store(true, Ordering::Release);
    }

    /// Routes the partitions about to be assigned to a feed (the one of the shard with the
    /// fewest partitions), before librdkafka starts fetching them (see [`kafka::Feed`]).
    fn route(&self, tpl: &TopicPartitionList) {
        let mut router = lock(&self.router);
        let Some(routes) = router.as_mut() else {
            return;
        };
        for e in tpl.elements() {
            let shard = routes.pick(e.partition());
            // SAFETY: the router is set only while its feeds live: the loop's guard clears it
            // (under this lock) before dropping them.
            if !unsafe { routes.feeds[shard].route(&self.topic_c, e.partition()) } {
                tracing::warn!(
                    partition = e.partition(),
                    "cannot route the partition to the feed; its records come through poll"
                );
            }
        }
    }

    /// Forgets the revoked partitions' feeds (their shards take new partitions first).
    fn unroute(&self, tpl: &TopicPartitionList, all: bool) {
        if let Some(routes) = lock(&self.router).as_mut() {
            if all {
                routes.owner.clear();
            }
            for e in tpl.elements() {
                routes.owner.remove(&e.partition());
            }
        }
    }

    /// The shard whose feed `partition` was routed to (the pipeline gives it the same shard).
    pub(super) fn shard_of(&self, partition: i32) -> Option<usize> {
        lock(&self.router)
            .as_ref()
            .and_then(|r| r.owner.get(&partition).copied())
    }

    /// The events since the last call, in the order they happened.
    pub(super) fn take_events(&self) -> Vec<GroupEvent> {
        if !self.events_pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut events = lock(&self.events);
        self.events_pending.store(false, Ordering::Release);
        std::mem::take(&mut *events)
    }
}

/// The feeds partitions are routed to, one per shard, and which partition went where.
pub(super) struct Routes {
    pub(super) feeds: Vec<kafka::Router>,
    pub(super) owner: BTreeMap<i32, usize>,
}

impl Routes {
    /// The feed of `partition`: the one it has, or the one with the fewest partitions.
    fn pick(&mut self, partition: i32) -> usize {
        if let Some(s) = self.owner.get(&partition) {
            return *s;
        }
        let shard = crate::pipeline::least_loaded(self.feeds.len(), self.owner.values().copied());
        self.owner.insert(partition, shard);
        shard
    }
}

/// A telemetry record as the loop polled it: from the feed, or (a partition not routed to
/// it) from the consumer's queue.
pub(super) enum Polled<'f, 'c> {
    Fed(kafka::Fed<'f>),
    Main(BorrowedMessage<'c>),
}

impl Polled<'_, '_> {
    /// Its partition (what a stream's plan needs, without the rest of [`Polled::taken`]).
    pub(super) fn partition(&self) -> i32 {
        match self {
            Polled::Fed(m) => m.partition(),
            Polled::Main(m) => m.partition(),
        }
    }

    /// Its coordinates and bytes.
    pub(super) fn taken(&self) -> kafka::Taken<'_> {
        match self {
            Polled::Fed(m) => m.taken(),
            Polled::Main(m) => kafka::Taken::of(m),
        }
    }

    /// What a dead letter copies of it.
    pub(super) fn source(&self) -> Source<'_> {
        match self {
            Polled::Fed(m) => Source {
                topic: m.topic(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                payload: m.payload(),
                headers: m.headers(),
            },
            Polled::Main(m) => Source::of(m),
        }
    }
}

/// The records and group events of one poll batch, in the order `poll` produced them (a
/// rebalance callback runs inside the `poll` that returns the record after it).
pub(super) struct Stream<M> {
    pub(super) records: Vec<M>,
    /// Each event with the number of records polled before it.
    pub(super) events: Vec<(usize, GroupEvent)>,
}

/// One step of applying a [`Stream`].
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    /// These records (indices into the batch), in order.
    Records(Vec<usize>),
    Group(GroupEvent),
}

impl<M> Stream<M> {
    /// An empty stream with room for `records` records.
    pub(super) fn with_capacity(records: usize) -> Self {
        Stream {
            records: Vec::with_capacity(records),
            events: Vec::new(),
        }
    }

    pub(super) fn clear(&mut self) {
        self.records.clear();
        self.events.clear();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty() && self.events.is_empty()
    }

    /// The steps that apply the batch in order, and the number of records left out: a record
    /// polled before a revoke of its partition was not processed when the callback handed
    /// the partition over (the new owner reads it from the committed offset), so this instance
    /// must not process it either. Records after an assignment belong to it.
    pub(super) fn plan(&self, partition: impl Fn(&M) -> i32) -> (Vec<Step>, usize) {
        let mut steps = Vec::new();
        let mut left_out = 0;
        let mut from = 0;
        let mut events = self.events.iter().peekable();
        loop {
            let to = events.peek().map_or(self.records.len(), |(at, _)| *at);
            let run: Vec<usize> = (from..to)
                .filter(|&i| {
                    let p = partition(&self.records[i]);
                    let revoked_later = self.events.iter().any(|(at, ev)| {
                        *at > i
                            && matches!(ev, GroupEvent::Revoked { parts, .. } if parts.contains(&p))
                    });
                    left_out += usize::from(revoked_later);
                    !revoked_later
                })
                .collect();
            if !run.is_empty() {
                steps.push(Step::Records(run));
            }
            from = to;
            match events.next() {
                Some((_, ev)) => steps.push(Step::Group(ev.clone())),
                None => break,
            }
        }
        (steps, left_out)
    }
}

/// How often librdkafka reports statistics to the telemetry consumer (its high watermarks).
/// The lag is measured every 2 s, so each measurement sees a report made after the last one.
pub(super) const STATS_INTERVAL: &str = "500";

impl ClientContext for GroupContext {
    /// Keeps the high watermark of every telemetry partition (the statistics are delivered on
    /// the polling thread, like every callback of this consumer).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut known = lock(&self.fetch_marks);
        for p in topic.partitions.values() {
            // Partition -1 is librdkafka's internal "unassigned" queue; -1001 is "not known".
            if p.partition >= 0 && p.hi_offset >= 0 {
                // The group's committed offset, else the log start (`auto.offset.reset` is
                // earliest).
                let start = [p.committed_offset, p.lo_offset]
                    .into_iter()
                    .find(|o| *o >= 0);
                known.insert(
                    p.partition,
                    FetchMarks {
                        high: p.hi_offset,
                        start,
                    },
                );
            }
        }
    }

    /// Errors outside a poll (authentication, TLS) are kept for the loop, which reports them
    /// like consume errors; others are logged.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error
            .rdkafka_error_code()
            .is_some_and(kafka::is_config_error)
        {
            if let Ok(mut v) = self.client_errors.lock() {
                v.push((error, reason.to_string()));
            }
        } else {
            kafka::log_client_error(&error, reason);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::log_client_line(level, fac, message);
    }
}

impl ConsumerContext for GroupContext {
    /// rust-rdkafka's default, except that the protocol comes from the configuration: the
    /// default asks librdkafka (`rd_kafka_rebalance_protocol`), and that call can wait forever
    /// when the final revoke of a consumer close is served after the group has terminated
    /// (librdkafka #4041; a CI run hung there in a consumer's drop).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr::{
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS as ASSIGN,
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS as REVOKE,
        };
        let tpl: &TopicPartitionList = tpl;
        let rebalance = match err {
            ASSIGN => Rebalance::Assign(tpl),
            REVOKE => Rebalance::Revoke(tpl),
            other => {
                let code: rdkafka::types::RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "rebalance failed");
                Rebalance::Error(rdkafka::error::KafkaError::Rebalance(code))
            }
        };
        self.pre_rebalance(consumer, &rebalance);
        if err == ASSIGN {
            self.route(tpl);
        }
        let done = match (err == ASSIGN, self.cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "rebalance: the assignment change failed");
        }
        if err == REVOKE {
            self.unroute(tpl, !self.cooperative);
        }
        self.post_rebalance(consumer, &rebalance);
    }

    /// A revoke hands the leaving partitions over before librdkafka lets them go: every record
    /// produced so far acknowledged, then their committable offsets committed (exactly-once:
    /// the open transaction committed with them). No engine state is touched here.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        // The committable offsets as the last turn left them: computed after that turn's
        // state records were queued, and without the partitions a rewind restarted since.
        let (offsets, fatal) = {
            let core = lock(&self.core);
            (core.pending_offsets.clone(), core.fatal.is_some())
        };
        let handover = if self.eos {
            Handover::Transaction(if fatal {
                TxnResult::Skipped
            } else {
                commit_transaction(
                    consumer,
                    &self.topic,
                    &self.producer,
                    &offsets,
                    self.revoke_timeout,
                )
            })
        } else {
            let leaving: Vec<(i32, i64)> = offsets
                .into_iter()
                .filter(|(p, _)| parts.contains(p))
                .collect();
            Handover::Commit(commit_flushed(
                consumer,
                &self.topic,
                &self.producer,
                &leaving,
                self.revoke_timeout,
            ))
        };
        self.push(GroupEvent::Revoked { parts, handover });
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.push(GroupEvent::Assigned(parts));
        }
    }
}

/// Records behind the high watermark per assigned partition: the consumer's position against
/// the high watermark of the partition's last fetch response, as librdkafka's statistics
/// report it (a local read; asking the broker, 500 ms per partition at worst, stalled the loop
/// for seconds whenever the embedded cluster was slow to answer).
///
/// `waiting`: per partition stopped at a record (a schema wait), that record's offset. The
/// consumer may have delivered past it (the records after it were fetched, then left for the
/// seek back), so its position says nothing of what the wait holds back: the lag counts from
/// the waiting record.
pub(super) fn measure_lag(
    consumer: &BaseConsumer<GroupContext>,
    waiting: &BTreeMap<i32, i64>,
) -> BTreeMap<i32, i64> {
    let Ok(positions) = consumer.position() else {
        return BTreeMap::new();
    };
    let marks = lock(&consumer.context().fetch_marks).clone();
    positions
        .elements()
        .iter()
        .filter_map(|e| {
            let position = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let lag = lag_from(
                marks.get(&e.partition())?,
                position,
                waiting.get(&e.partition()).copied(),
            )?;
            Some((e.partition(), lag))
        })
        .collect()
}

/// What librdkafka's statistics say of a partition being read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct FetchMarks {
    /// The high watermark of the last fetch response.
    pub(super) high: i64,
    /// Where reading starts when nothing was delivered yet: the committed offset, else the
    /// log start; `None` while neither is known.
    pub(super) start: Option<i64>,
}

/// A partition's lag: from its position, or from the record it waits at when that is
/// earlier. No position yet (nothing delivered since the assignment): from where reading
/// starts, so a quiet restart (committed at the end) is caught up and a backlog not yet
/// delivered is not (taking it as caught up let the idle advance close its windows, and the
/// backlog went to the DLQ as late). `None`: not known yet.
pub(super) fn lag_from(
    marks: &FetchMarks,
    position: Option<i64>,
    waiting_at: Option<i64>,
) -> Option<i64> {
    let from = match (position.or(marks.start), waiting_at) {
        (Some(p), Some(w)) => p.min(w),
        (Some(p), None) => p,
        (None, w) => w?,
    };
    Some((marks.high - from).max(0))
}
