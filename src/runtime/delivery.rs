//! Delivery: the producer, offset commits and transactions.

use super::*;
use std::sync::atomic::AtomicUsize;

/// Producer callbacks: count failures; time commands from window close to broker ack.
#[derive(Default)]
pub struct ProduceContext {
    pub(super) errors_total: AtomicU64,
    pub(super) close_to_ack: Mutex<Vec<f64>>,
    /// Every record sent, until its delivery report: what a commit waits for.
    pub(super) deliveries: Deliveries,
    /// Commands: when their window closed, by delivery sequence number.
    pub(super) stamps: Mutex<HashMap<usize, Instant>>,
    /// Delivery reports of dead-letter writes, for the loop to account (drained every turn).
    pub(super) dead_letters: Mutex<Vec<DeadLetterDelivery>>,
}

/// A dead-letter write's delivery report: the source record's coordinates, and on failure
/// the record, to write again.
pub(super) struct DeadLetterDelivery {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) failed: Option<FailedDeadLetter>,
}

pub(super) struct FailedDeadLetter {
    pub(super) error: String,
    pub(super) too_large: bool,
    pub(super) key: Option<Vec<u8>>,
    pub(super) value: Option<Vec<u8>>,
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
}

/// The source coordinates of a dead-letter record (its `segloop.source.*` headers).
pub(super) fn dead_letter_source(m: &BorrowedMessage<'_>) -> Option<(i32, i64)> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    let get = |name: &str| {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse::<i64>().ok())
    };
    Some((
        i32::try_from(get("segloop.source.partition")?).ok()?,
        get("segloop.source.offset")?,
    ))
}

impl ClientContext for ProduceContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        kafka::log_client_error(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::log_client_line(level, fac, message);
    }
}

/// Process-relative microseconds (+1, so 0 means "never"): the heartbeat's time.
pub(super) fn stamp(at: Instant) -> usize {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    at.saturating_duration_since(start).as_micros() as usize + 1
}

impl ProducerContext for ProduceContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let m = match result {
            Ok(m) | Err((_, m)) => m,
        };
        if let Some((partition, offset)) = dead_letter_source(m) {
            let failed = result.as_ref().err().map(|(e, m)| FailedDeadLetter {
                error: e.to_string(),
                too_large: e.rdkafka_error_code()
                    == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: kafka::header_pairs(m),
            });
            if let Ok(mut v) = self.dead_letters.lock() {
                v.push(DeadLetterDelivery {
                    partition,
                    offset,
                    failed,
                });
            }
        }
        let stamp_of = self.stamps.lock().ok().and_then(|mut v| v.remove(&opaque));
        self.deliveries.finish(opaque, result.is_ok());
        match result {
            Ok(_) => {
                if let Some(at) = stamp_of {
                    if let Ok(mut v) = self.close_to_ack.lock() {
                        v.push(at.elapsed().as_secs_f64());
                    }
                }
            }
            Err((e, _)) => {
                self.errors_total.fetch_add(1, Ordering::SeqCst);
                tracing::error!(error = %e, "record could not be delivered");
            }
        }
    }
}

/// The delivery sequence: every record sent gets the next number (its delivery opaque), open
/// until librdkafka reports it delivered or failed.
#[derive(Debug)]
pub(super) struct Deliveries {
    next: AtomicUsize,
    open: Mutex<BTreeSet<usize>>,
    /// Failed records not yet accounted by a commit.
    failed: Mutex<BTreeSet<usize>>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries {
            next: AtomicUsize::new(1),
            open: Mutex::new(BTreeSet::new()),
            failed: Mutex::new(BTreeSet::new()),
        }
    }
}

impl Deliveries {
    /// The number of the next record sent: everything sent before it has a smaller one.
    pub(super) fn mark(&self) -> usize {
        self.next.load(Ordering::SeqCst)
    }

    /// A record is about to be sent: its number.
    pub(super) fn start(&self) -> usize {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        lock(&self.open).insert(seq);
        seq
    }

    /// Record `seq` was delivered (`ok`) or failed (or could not be queued).
    pub(super) fn finish(&self, seq: usize, ok: bool) {
        if !ok {
            lock(&self.failed).insert(seq);
        }
        lock(&self.open).remove(&seq);
    }

    /// Whether every record sent before `mark` is reported: `None` while one is open,
    /// `Some(false)` if one failed (the failures before `mark` are then accounted and
    /// forgotten), `Some(true)` if all were delivered.
    pub(super) fn settled(&self, mark: usize) -> Option<bool> {
        if lock(&self.open).first().is_some_and(|s| *s < mark) {
            return None;
        }
        let mut failed = lock(&self.failed);
        let later = failed.split_off(&mark);
        let ok = failed.is_empty();
        *failed = later;
        Some(ok)
    }
}

/// Commits `offsets` of `topic` ([`CommitResult::Nothing`] when there are none); a failure is
/// logged (the partitions' next reader re-reads from the last committed offset).
pub(super) fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    offsets: &[(i32, i64)],
    mode: CommitMode,
) -> CommitResult {
    if offsets.is_empty() {
        return CommitResult::Nothing;
    }
    let result = offsets
        .iter()
        .try_fold(TopicPartitionList::new(), |mut tpl, (p, o)| {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                .map(|()| tpl)
        })
        .and_then(|tpl| consumer.commit(&tpl, mode));
    match result {
        Ok(()) => CommitResult::Committed,
        Err(e) => {
            tracing::warn!(error = %e, "offset commit failed; the partitions' next reader re-reads");
            CommitResult::Failed(e.to_string())
        }
    }
}

/// What a commit of offsets came to.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum CommitResult {
    Committed,
    /// No owned partition had a committable offset.
    Nothing,
    /// A record produced before the offsets was not acknowledged: not committed.
    Unconfirmed,
    Failed(String),
}

/// Commits `offsets` once every record produced so far is acknowledged (the producer flushed
/// within `timeout`): the revoke callback's and the shutdown's commit. (The loop's periodic
/// commit waits for nothing: see [`Committer`].)
pub(super) fn commit_flushed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    producer: &ThreadedProducer<ProduceContext>,
    offsets: &[(i32, i64)],
    timeout: Duration,
) -> CommitResult {
    let mark = producer.context().deliveries.mark();
    if producer.flush(timeout).is_err() || producer.context().deliveries.settled(mark) != Some(true)
    {
        tracing::warn!("produced records not confirmed; not committing");
        return CommitResult::Unconfirmed;
    }
    commit(consumer, topic, offsets, CommitMode::Sync)
}

/// At-least-once, the loop's periodic commit without waiting on the producer: every
/// `commit_interval` the committable offsets are noted with the producer's delivery mark, and
/// they are committed (asynchronously) on the first turn at which every record produced
/// before the mark is acknowledged. A failed record before the mark drops the note; the next
/// one commits (as a skipped round did when the commit flushed the producer).
#[derive(Debug, Default)]
pub(super) struct Committer {
    notes: std::collections::VecDeque<(usize, Vec<(i32, i64)>)>,
}

/// Offset notes kept while the producer catches up (older ones give way: newer offsets
/// cover them).
const MAX_NOTES: usize = 16;

impl Committer {
    /// Notes the committable offsets, produced before `mark`.
    pub(super) fn note(&mut self, mark: usize, offsets: Vec<(i32, i64)>) {
        if self.notes.len() >= MAX_NOTES {
            self.notes.pop_front();
        }
        self.notes.push_back((mark, offsets));
    }

    /// The partitions left: their offsets are the new owner's to commit.
    pub(super) fn revoked(&mut self, parts: &[i32]) {
        for (_, offsets) in &mut self.notes {
            offsets.retain(|(p, _)| !parts.contains(p));
        }
    }

    /// The newest note whose records are all reported, if any (older ones are passed over):
    /// its offsets, or `None` when one of its records failed.
    pub(super) fn ready(&mut self, deliveries: &Deliveries) -> Option<Option<Vec<(i32, i64)>>> {
        let mut found = None;
        while let Some((mark, _)) = self.notes.front() {
            let Some(delivered) = deliveries.settled(*mark) else {
                break;
            };
            let (_, offsets) = self.notes.pop_front().expect("a front note");
            found = Some(delivered.then_some(offsets));
        }
        found
    }
}

/// The exactly-once transaction's outcome.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum TxnResult {
    /// Committed (`offsets`: with offsets in it); `fatal`: the next could not begin.
    Committed {
        offsets: bool,
        fatal: Option<String>,
    },
    /// Aborted: the owned partitions rewind to the last committed state.
    Aborted {
        error: String,
        fatal: Option<String>,
    },
    /// Failed past recovery (fenced by a newer instance).
    Fatal(String),
    /// Not tried: the run is stopping for a fatal error.
    Skipped,
}

/// Exactly-once: commits the open transaction with `offsets` (the committable offsets of every
/// owned partition), then begins the next; a failed commit is aborted (the caller rewinds).
pub(super) fn commit_transaction<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    producer: &ThreadedProducer<ProduceContext>,
    offsets: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> TxnResult {
    // Broker outages surface as retriable errors ("retry call to resume"): keep calling
    // until the transaction timeout would expire.
    let deadline = Instant::now() + TXN_RETRY_FOR;
    let attempt = || -> rdkafka::error::KafkaResult<()> {
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in offsets {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
            }
            let cgm =
                consumer
                    .group_metadata()
                    .ok_or(rdkafka::error::KafkaError::ConsumerCommit(
                        rdkafka::types::RDKafkaErrorCode::State,
                    ))?;
            txn_retry(deadline, || {
                producer.send_offsets_to_transaction(&tpl, &cgm, timeout)
            })?;
        }
        txn_retry(deadline, || producer.commit_transaction(timeout))
    };
    let begin = || {
        producer.begin_transaction().err().map(|e| {
            tracing::error!(error = %e, "exactly-once: cannot begin a transaction");
            format!("exactly-once: {e}")
        })
    };
    match attempt() {
        Ok(()) => TxnResult::Committed {
            offsets: !offsets.is_empty(),
            fatal: begin(),
        },
        Err(e) if matches!(&e, rdkafka::error::KafkaError::Transaction(t) if t.is_fatal()) => {
            tracing::error!(error = %e, "exactly-once: fatal transaction error (fenced by a newer instance?)");
            TxnResult::Fatal(format!("exactly-once: {e}"))
        }
        Err(e) => {
            tracing::warn!(error = %e, "exactly-once: commit failed; aborting and rewinding");
            if let Err(abort) = txn_retry(deadline, || producer.abort_transaction(timeout)) {
                tracing::error!(error = %abort, "exactly-once: abort failed");
                return TxnResult::Fatal(format!("exactly-once: {abort}"));
            }
            TxnResult::Aborted {
                error: e.to_string(),
                fatal: begin(),
            }
        }
    }
}

/// How long transactional calls are retried through a broker outage (below the default
/// `transaction.timeout.ms` of 60 s).
pub(super) const TXN_RETRY_FOR: Duration = Duration::from_secs(45);

/// Calls `f` again while it fails with a retriable transaction error, until `deadline`.
pub(super) fn txn_retry(
    deadline: Instant,
    mut f: impl FnMut() -> rdkafka::error::KafkaResult<()>,
) -> rdkafka::error::KafkaResult<()> {
    loop {
        match f() {
            Err(rdkafka::error::KafkaError::Transaction(e))
                if e.is_retriable() && Instant::now() < deadline =>
            {
                tracing::warn!(error = %e, "exactly-once: retrying a transactional call");
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// Writes silences to the control topic (every instance applies them from there).
#[derive(Clone)]
pub struct SilencePublisher {
    pub(super) producer: Arc<ThreadedProducer<ProduceContext>>,
    pub(super) topic: String,
}

impl SilencePublisher {
    /// Writes a silence (`None`: deletes silence `id`) and waits for the broker's ack.
    ///
    /// # Errors
    /// The record could not be queued or acknowledged.
    pub fn publish(&self, s: Option<&SilenceRecord>, id: &str) -> anyhow::Result<()> {
        let key = format!("silence/{id}");
        let value = s.map(serde_json::to_vec).transpose()?;
        send_record(
            &self.producer,
            keyed(&self.topic, key.as_bytes(), value.as_deref()),
        );
        self.producer
            .flush(Duration::from_secs(5))
            .context("the silence was not acknowledged by the broker")?;
        Ok(())
    }
}

/// A record of `topic` under `key` holding `value` (`None`: a tombstone).
pub(super) fn keyed<'a>(
    topic: &'a str,
    key: &'a [u8],
    value: Option<&'a [u8]>,
) -> BaseRecord<'a, [u8], [u8], usize> {
    let record = BaseRecord::with_opaque_to(topic, 0).key(key);
    match value {
        Some(v) => record.payload(v),
        None => record,
    }
}

/// Sends a record; `closed_at`: a command's window close, to time it to the broker's ack.
pub(super) fn send(
    producer: &ThreadedProducer<ProduceContext>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    closed_at: Option<Instant>,
) {
    send_timed(producer, keyed(topic, key, Some(payload)), closed_at);
}

/// Sends, waiting while the producer queue is full (backpressure, bounded queue); a record
/// that cannot be queued at all counts as a produce error (and fails the commit it precedes).
pub(super) fn send_record(
    producer: &ThreadedProducer<ProduceContext>,
    record: BaseRecord<'_, [u8], [u8], usize>,
) {
    send_timed(producer, record, None);
}

fn send_timed(
    producer: &ThreadedProducer<ProduceContext>,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
    closed_at: Option<Instant>,
) {
    let context = producer.context();
    let seq = context.deliveries.start();
    record.delivery_opaque = seq;
    if let Some(at) = closed_at {
        if let Ok(mut stamps) = context.stamps.lock() {
            stamps.insert(seq, at);
        }
    }
    if let Err(e) = kafka::send_waiting(producer, record) {
        if let Ok(mut stamps) = context.stamps.lock() {
            stamps.remove(&seq);
        }
        context.deliveries.finish(seq, false);
        context.errors_total.fetch_add(1, Ordering::SeqCst);
        tracing::error!(error = %e, "cannot queue a record");
    }
}
