//! Delivery: the producer, offset commits and transactions.

use super::*;

/// Producer callbacks: count failures; time commands from window close to broker ack.
#[derive(Default)]
pub struct ProduceContext {
    pub(super) errors: AtomicU64,
    pub(super) errors_total: AtomicU64,
    pub(super) close_to_ack: Mutex<Vec<f64>>,
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

impl ProduceContext {
    pub(super) fn take_errors(&self) -> u64 {
        self.errors.swap(0, Ordering::SeqCst)
    }
}

impl ClientContext for ProduceContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        kafka::log_client_error(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::log_client_line(level, fac, message);
    }
}

/// Process-relative microseconds (+1, so 0 means "not timed"): the delivery opaque of
/// commands, the time their window closed.
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
            use rdkafka::message::Headers;
            let failed = result.as_ref().err().map(|(e, m)| FailedDeadLetter {
                error: e.to_string(),
                too_large: e.rdkafka_error_code()
                    == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
            if let Ok(mut v) = self.dead_letters.lock() {
                v.push(DeadLetterDelivery {
                    partition,
                    offset,
                    failed,
                });
            }
        }
        match result {
            Ok(_) => {
                if opaque > 0 {
                    let secs = (stamp(Instant::now()).saturating_sub(opaque)) as f64 / 1e6;
                    if let Ok(mut v) = self.close_to_ack.lock() {
                        v.push(secs);
                    }
                }
            }
            Err((e, _)) => {
                self.errors.fetch_add(1, Ordering::SeqCst);
                self.errors_total.fetch_add(1, Ordering::SeqCst);
                tracing::error!(error = %e, "record could not be delivered");
            }
        }
    }
}

pub(super) fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    offsets: &[(i32, i64)],
    mode: CommitMode,
) -> anyhow::Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    consumer.commit(&tpl, mode)?;
    Ok(())
}

pub(super) fn commit_owned(
    consumer: &BaseConsumer<GroupContext>,
    core: &Arc<Mutex<Core>>,
    producer: &ThreadedProducer<ProduceContext>,
    mode: CommitMode,
    flush_timeout: Duration,
) {
    if core
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .out
        .eos
    {
        let topic = consumer.context().topic.clone();
        commit_transaction(consumer, &topic, core, producer, flush_timeout);
        return;
    }
    // Offsets are read before the flush: everything they cover was produced before it.
    let offsets: Vec<(i32, i64)> = {
        let core = core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        core.pending_offsets.iter().map(|(p, o)| (*p, *o)).collect()
    };
    if producer.flush(flush_timeout).is_err() || producer.context().take_errors() > 0 {
        tracing::warn!("produced records not confirmed; not committing this round");
        core.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .out
            .counters
            .commit_errors += 1;
        return;
    }
    let topic = consumer.context().topic.clone();
    let result = commit(consumer, &topic, &offsets, mode);
    let mut core = core
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match result {
        Ok(()) => {
            if !offsets.is_empty() {
                core.out.counters.commits += 1;
                core.out.report.commits += 1;
            }
        }
        Err(e) => {
            core.out.counters.commit_errors += 1;
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
}

/// Exactly-once: commits the open transaction with the committable offsets of every owned
/// partition, then begins the next. When the commit fails the transaction is aborted and
/// the owned partitions are marked for a rewind to the last committed state; a fatal error
/// (fenced by a newer instance) is kept for the loop to stop with.
pub(super) fn commit_transaction<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    core: &Arc<Mutex<Core>>,
    producer: &ThreadedProducer<ProduceContext>,
    timeout: Duration,
) {
    let offsets: Vec<(i32, i64)> = {
        let core = core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if core.fatal.is_some() {
            return;
        }
        core.pending_offsets.iter().map(|(p, o)| (*p, *o)).collect()
    };
    // Broker outages surface as retriable errors ("retry call to resume"): keep calling
    // until the transaction timeout would expire.
    let deadline = Instant::now() + TXN_RETRY_FOR;
    let attempt = || -> rdkafka::error::KafkaResult<()> {
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &offsets {
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
    let result = attempt();
    let mut core = core
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match result {
        Ok(()) => {
            *core
                .out
                .counters
                .transactions
                .entry("committed")
                .or_default() += 1;
            core.txn_outcomes.clear();
            let n = std::mem::take(&mut core.out.txn_windowed);
            core.out.report.records_windowed += n;
            core.out.counters.windowed += n;
            if !offsets.is_empty() {
                core.out.counters.commits += 1;
                core.out.report.commits += 1;
            }
        }
        Err(e) => {
            let fatal = matches!(&e, rdkafka::error::KafkaError::Transaction(t) if t.is_fatal());
            if fatal {
                tracing::error!(error = %e, "exactly-once: fatal transaction error (fenced by a newer instance?)");
                core.fatal = Some(format!("exactly-once: {e}"));
                return;
            }
            tracing::warn!(error = %e, "exactly-once: commit failed; aborting and rewinding");
            core.out.counters.commit_errors += 1;
            *core.out.counters.transactions.entry("aborted").or_default() += 1;
            if let Err(e) = txn_retry(deadline, || producer.abort_transaction(timeout)) {
                tracing::error!(error = %e, "exactly-once: abort failed");
                core.fatal = Some(format!("exactly-once: {e}"));
                return;
            }
            core.needs_rewind = true;
        }
    }
    if let Err(e) = producer.begin_transaction() {
        tracing::error!(error = %e, "exactly-once: cannot begin a transaction");
        core.fatal = Some(format!("exactly-once: {e}"));
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
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, 0).key(key.as_bytes());
        if let Some(v) = value.as_deref() {
            record = record.payload(v);
        }
        send_record(&self.producer, record);
        self.producer
            .flush(Duration::from_secs(5))
            .context("the silence was not acknowledged by the broker")?;
        Ok(())
    }
}

pub(super) fn send(
    producer: &ThreadedProducer<ProduceContext>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    opaque: usize,
) {
    send_record(
        producer,
        BaseRecord::with_opaque_to(topic, opaque)
            .key(key)
            .payload(payload),
    );
}

/// Sends, waiting while the producer queue is full (backpressure, bounded queue); a record
/// that cannot be queued at all counts as a produce error.
pub(super) fn send_record(
    producer: &ThreadedProducer<ProduceContext>,
    record: BaseRecord<'_, [u8], [u8], usize>,
) {
    if let Err(e) = kafka::send_waiting(producer, record) {
        producer.context().errors.fetch_add(1, Ordering::SeqCst);
        producer
            .context()
            .errors_total
            .fetch_add(1, Ordering::SeqCst);
        tracing::error!(error = %e, "cannot queue a record");
    }
}
