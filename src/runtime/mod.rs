//! `segloop run`: the engine and controller driven by Kafka.
//!
//! One engine thread owns the hot path: a `BaseConsumer` in the telemetry group (polled in
//! batches), the window engine and the controller. Two group-less consumers read every
//! partition of the outcomes topic (from the end) and of the control topic (from the start).
//! One idempotent producer (`acks=all`, murmur2) writes commands, decisions and DLQ records.
//!
//! Delivery (at-least-once): telemetry offsets are committed every `commit_interval`, and only
//! up to the engine's committable offset (the lowest offset still feeding an open window), and
//! only after `flush` confirmed every record produced before it. On revoke the rebalance
//! callback flushes and commits within a bound, then the partition's state is dropped; on
//! assign, consumption resumes at the committed offset, rebuilding open windows.
//!
//! The admin thread ([`admin`]) serves `/metrics`, health, and the admin API; it locks the
//! shared [`Core`] briefly and never across I/O.

pub mod admin;
mod schema_wait;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, Control};
use crate::codec::{build_codec, decode_record, Codec, DecodeError};
use crate::config::Config;
use crate::controller::{Effects, OutcomeDisposition};
use crate::kafka;
use crate::metrics::{Counters, Gauges, Metrics};
use crate::model::{DecisionRecord, RemediationCommand, RemediationOutcome};
use crate::pipeline::{Cause, Options as PipelineOptions, Pipeline, Record, Sink};
use crate::policy::{PolicySet, Silence};

/// What a run did, for the caller (the demo's accounting, tests).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunReport {
    pub records_consumed: u64,
    pub records_aggregated: u64,
    pub records_dlq: u64,
    /// Events in the windows this run judged (exactly-once: committed transactions only).
    pub records_windowed: u64,
    pub commands: u64,
    pub decisions: u64,
    pub outcomes_applied: u64,
    pub outcomes_skipped: u64,
    pub commits: u64,
    /// Window close → command acknowledged by the broker, seconds (first 100,000 samples).
    #[serde(skip)]
    pub close_to_command_secs: Vec<f64>,
}

/// A silence as stored on the control topic (key `silence/<id>`; a null value deletes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SilenceRecord {
    /// The record's format version (`controller::RECORD_VERSION`).
    #[serde(default = "one")]
    pub version: u32,
    pub id: String,
    pub segments: String,
    pub from_ms: i64,
    pub until_ms: i64,
    /// The comment: why.
    #[serde(default)]
    pub reason: String,
    /// Who set it.
    #[serde(default)]
    pub created_by: String,
}

/// State shared by the engine loop and the rebalance callback (the admin thread reads the
/// pipeline's [`ReadModel`] and the [`Status`] instead).
pub struct Core {
    pub pipeline: Pipeline,
    pub config: Config,
    out: Output,
    outcome_codec: Box<dyn Codec<RemediationOutcome>>,
    /// With a registry: where the outcome codec learns schema ids, and the outcome
    /// partitions waiting on it (see [`schema_wait`]).
    outcome_schemas: Option<crate::registry::Resolver>,
    outcome_waiting: BTreeMap<i32, crate::pipeline::SchemaWait>,
    /// Committable offsets per owned partition (computed after producing their effects).
    pub pending_offsets: BTreeMap<i32, i64>,
    /// Reads a partition of the state changelog on assign (read_committed).
    state_reader: BaseConsumer<kafka::QuietEof>,
    /// Outcomes for segments not owned when they arrived (newest last, bounded): replayed
    /// after a partition's state is restored, so acks that raced a rebalance or a restart
    /// still land.
    recent_outcomes: std::collections::VecDeque<RemediationOutcome>,
    /// Outcome partitions still behind the end they had at startup (deadlines wait for them).
    outcomes_backlog: BTreeMap<i32, i64>,
    /// Exactly-once: outcomes applied in the open transaction (replayed if it aborts).
    txn_outcomes: Vec<RemediationOutcome>,
    /// Exactly-once: a transaction aborted; the owned partitions must rewind.
    needs_rewind: bool,
    /// A fatal producer error (e.g. fenced by a newer instance): the loop stops with it.
    fatal: Option<String>,
    /// Per partition: the `closed_through` and dead-letter mark last written to the changelog.
    closed_written: BTreeMap<i32, PartitionMarks>,
}

/// What the admin thread reads about the instance (besides the read model).
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The consumer joined its group (it got an assignment, possibly empty).
    pub joined: bool,
    pub assigned: Vec<i32>,
    pub lag: BTreeMap<i32, i64>,
    /// Consume errors seen in the last [`ERROR_FRESH`] (`/readyz` is false meanwhile).
    pub consume_errors: Vec<String>,
    /// Partitions waiting on the schema registry, each as a sentence (`/readyz` is false
    /// meanwhile).
    pub schema_waits: Vec<String>,
}

/// The engine loop's heartbeat, bumped every turn: `/healthz` reads it without any lock.
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicU64);

impl Heartbeat {
    pub fn beat(&self) {
        self.0
            .store(stamp(Instant::now()) as u64, Ordering::Release);
    }

    /// Time since the last beat (`None`: none yet).
    pub fn age(&self) -> Option<Duration> {
        let last = self.0.load(Ordering::Acquire);
        (last > 0)
            .then(|| Duration::from_micros((stamp(Instant::now()) as u64).saturating_sub(last)))
    }
}

/// How long a consume error keeps `/readyz` false after it was last seen.
const ERROR_FRESH: Duration = Duration::from_secs(10);
/// Least time between two logs of the same repeating consume error.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

/// The consume errors of one consumer. Every error is counted
/// (`segloop_consume_errors_total{topic, code}`), logged at error level (at most every 5 s, with
/// the count meanwhile) and keeps `/readyz` false while fresh. One that no retry fixes (see
/// [`ConsumeErrors::fatal`]) keeps `/readyz` false until the consumer delivers records again,
/// and stops the run if it has not by `kafka.connect_timeout` after it first appeared.
/// (librdkafka reports some of these once per partition, e.g. a topic authorization failure,
/// so waiting for a repeat would wait forever.)
struct ConsumeErrors {
    topic: String,
    streak: Option<Streak>,
}

struct Streak {
    message: String,
    fatal: bool,
    first: Instant,
    last: Instant,
    logged: Instant,
    unlogged: u64,
}

impl ConsumeErrors {
    fn new(topic: &str) -> Self {
        ConsumeErrors {
            topic: topic.to_string(),
            streak: None,
        }
    }

    /// Errors no retry fixes: configuration (TLS, authentication, authorization), data the
    /// client cannot read, a topic that is gone. An unreachable broker is retried forever.
    fn fatal(e: &rdkafka::error::KafkaError) -> bool {
        use rdkafka::types::RDKafkaErrorCode as E;
        if matches!(e, rdkafka::error::KafkaError::MessageConsumptionFatal(_)) {
            return true;
        }
        e.rdkafka_error_code().is_some_and(|c| {
            kafka::is_config_error(c)
                || matches!(
                    c,
                    E::BadCompression
                        | E::NotImplemented
                        | E::UnknownTopic
                        | E::UnknownTopicOrPartition
                        | E::UnsupportedCompressionType
                        | E::Fatal
                )
        })
    }

    fn on_error(
        &mut self,
        e: &rdkafka::error::KafkaError,
        detail: &str,
        where_: &str,
        counters: &mut Counters,
    ) {
        let code = e
            .rdkafka_error_code()
            .map_or_else(|| "unknown".to_string(), |c| format!("{c:?}"));
        *counters
            .consume_errors
            .entry((self.topic.clone(), code))
            .or_default() += 1;
        let now = Instant::now();
        let message = format!("{e}{detail}");
        let fatal = Self::fatal(e);
        match &mut self.streak {
            Some(s) if s.message == message && now - s.last < ERROR_FRESH => {
                s.last = now;
                s.unlogged += 1;
                if now - s.logged >= ERROR_LOG_EVERY {
                    tracing::error!(topic = %self.topic, partitions = %where_, error = %message, repeated = s.unlogged, "consume error, still repeating");
                    s.logged = now;
                    s.unlogged = 0;
                }
            }
            _ => {
                tracing::error!(topic = %self.topic, partitions = %where_, error = %message, fatal, "consume error");
                self.streak = Some(Streak {
                    message,
                    fatal,
                    first: now,
                    last: now,
                    logged: now,
                    unlogged: 0,
                });
            }
        }
    }

    /// The consumer delivered records (with no error in the same poll): the error cleared.
    fn on_progress(&mut self) {
        if self.streak.take().is_some() {
            tracing::info!(topic = %self.topic, "consuming again after errors");
        }
    }

    /// The error while it counts (for `/readyz`): fresh, or fatal and not cleared.
    fn fresh(&self) -> Option<String> {
        self.streak
            .as_ref()
            .filter(|s| s.fatal || s.last.elapsed() < ERROR_FRESH)
            .map(|s| format!("{}: {}", self.topic, s.message))
    }

    /// Why the run must stop: a fatal error not cleared within `limit`.
    fn must_stop(&self, limit: Duration) -> Option<String> {
        let s = self.streak.as_ref()?;
        (s.fatal && s.first.elapsed() >= limit).then(|| {
            format!(
                "topic {}: {} (for {} s with no records since; a consume error no retry fixes stops segloop after kafka.connect_timeout)",
                self.topic,
                s.message,
                s.first.elapsed().as_secs()
            )
        })
    }
}

/// The live side of the pipeline: records to Kafka, counters, the run report.
struct Output {
    producer: Arc<ThreadedProducer<ProduceContext>>,
    command_codec: Box<dyn Codec<RemediationCommand>>,
    decision_codec: Box<dyn Codec<DecisionRecord>>,
    actions_topic: String,
    decisions_topic: String,
    dlq_topic: String,
    counters: Counters,
    report: RunReport,
    /// Exactly-once: one transaction per commit interval.
    eos: bool,
    /// Exactly-once: events of windows judged in the open transaction.
    txn_windowed: u64,
    /// Rate-limited log lines (held-back firings by guardrail, dead letters by code): when
    /// each kind was last logged, and how many since.
    held_back: BTreeMap<String, (Option<Instant>, u64)>,
    /// Most bytes of one dead letter (the producer's `message.max.bytes` less headroom;
    /// halved whenever the broker refuses one as too large).
    dlq_limit: usize,
    /// Dead letters written again after a failure, by source record: how many times.
    dlq_attempts: HashMap<(i32, i64), u32>,
}

/// Least time between two log lines about the same guardrail holding firings back.
const HELD_BACK_LOG_EVERY: Duration = Duration::from_secs(10);

/// The sink of one turn: the output, and the polled batch the records came from (a rejected
/// record goes to the DLQ with its original headers).
struct LiveSink<'o, 'b> {
    out: &'o mut Output,
    batch: &'b [BorrowedMessage<'b>],
}

impl Sink for LiveSink<'_, '_> {
    fn reject(&mut self, record: &Record<'_>, error: &DecodeError) {
        if let Some(m) = self.batch.get(record.handle) {
            self.out.dead_letter(m, error);
        }
    }

    fn evicted(&mut self, decision: crate::model::DecisionRecord) {
        let mut fx = Effects::default();
        fx.decisions.push(decision);
        self.out.emit(&mut fx, None);
    }

    fn effects(&mut self, fx: &mut Effects, cause: Cause<'_>, policies: &PolicySet) {
        for d in &fx.decisions {
            if d.to_state == "escalated" && d.from_state != "escalated" {
                *self
                    .out
                    .counters
                    .escalations
                    .entry((
                        d.policy.clone(),
                        d.trigger.split(':').next().unwrap_or("").to_string(),
                    ))
                    .or_default() += 1;
            }
            if d.segment == crate::controller::INSTANCE_SEGMENT {
                // The instance as a whole: held-back work or the actuator breaker.
                let waiting = d.aggregates.values().next().copied().unwrap_or(0.0);
                if d.to_state == "escalated" {
                    tracing::warn!(trigger = %d.trigger, count = waiting, policy = %d.policy, command_id = d.command_id.as_deref().unwrap_or(""), "instance escalation");
                } else {
                    tracing::info!(trigger = %d.trigger, "instance escalation cleared");
                }
            } else if let Some(g) = &d.guardrail {
                self.out.held_back(g, &d.segment, &d.policy, policies);
            } else if d.from_state != d.to_state
                && matches!(
                    d.to_state.as_str(),
                    "resolved" | "escalated" | "backoff" | "removed"
                )
            {
                // The transitions an operator follows (commands have their own line).
                tracing::info!(
                    segment = %d.segment,
                    policy = %d.policy,
                    from = %d.from_state,
                    to = %d.to_state,
                    trigger = %d.trigger,
                    command_id = d.command_id.as_deref().unwrap_or(""),
                    "loop"
                );
            }
        }
        let mut closed_at = None;
        if let Cause::Window { window, .. } = cause {
            if window.group.is_none() {
                if self.out.eos {
                    self.out.txn_windowed += window.count;
                } else {
                    self.out.report.records_windowed += window.count;
                    self.out.counters.windowed += window.count;
                }
            }
            if !fx.commands.is_empty() {
                closed_at = Some(Instant::now());
            }
        }
        self.out.emit(fx, closed_at);
    }
}

/// A state or control record written by a newer segloop: the run stops rather than misread it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NewerRecord(String);

/// The changelog key of a partition's own record (`closed_through`); segment ids are never
/// empty, so it cannot collide with one.
const PARTITION_KEY: &[u8] = b"";

/// The partition record of the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct PartitionRecord {
    #[serde(default = "one")]
    version: u32,
    closed_through_ms: i64,
    /// The dead-letter mark: every failed record at or below this offset is in the DLQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_lettered_through: Option<i64>,
}

/// What the changelog's partition record says of its partition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartitionMarks {
    /// The end of the last window judged.
    pub closed_through_ms: Option<i64>,
    /// The dead-letter mark.
    pub dead_lettered_through: Option<i64>,
}

fn one() -> u32 {
    1
}

/// Outcomes kept for replay after a restore.
const RECENT_OUTCOMES: usize = 100_000;

/// Rebalance events for the loop to apply (the callback runs inside `poll`).
#[derive(Debug)]
enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct GroupContext {
    topic: String,
    clock: Arc<dyn Clock>,
    core: Arc<Mutex<Core>>,
    producer: Arc<ThreadedProducer<ProduceContext>>,
    events: Mutex<Vec<GroupEvent>>,
    revoke_timeout: Duration,
    client_errors: Mutex<Vec<(rdkafka::error::KafkaError, String)>>,
    /// Per telemetry partition, the high watermark of its last fetch response, from
    /// librdkafka's statistics (`STATS_INTERVAL`): what the lag is measured against.
    high_watermarks: Mutex<BTreeMap<i32, i64>>,
}

/// How often librdkafka reports statistics to the telemetry consumer (its high watermarks).
/// The lag is measured every 2 s, so each measurement sees a report made after the last one.
const STATS_INTERVAL: &str = "500";

impl ClientContext for GroupContext {
    /// Keeps the high watermark of every telemetry partition (the statistics are delivered on
    /// the polling thread, like every callback of this consumer).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut known = self
            .high_watermarks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in topic.partitions.values() {
            // Partition -1 is librdkafka's internal "unassigned" queue; -1001 is "not known".
            if p.partition >= 0 && p.hi_offset >= 0 {
                known.insert(p.partition, p.hi_offset);
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            // The controller state of the partitions leaving goes to the changelog first.
            self.core
                .lock()
                .expect("core lock")
                .write_state(self.clock.now_ms());
            if self
                .core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .out
                .eos
            {
                // The open transaction takes the leaving partitions' offsets with it.
                commit_transaction(
                    consumer,
                    &self.topic,
                    &self.core,
                    &self.producer,
                    self.revoke_timeout,
                );
                self.events
                    .lock()
                    .expect("events lock")
                    .push(GroupEvent::Revoked(parts));
                return;
            }
            // Everything produced so far must be acknowledged before its offsets commit.
            let flushed = self.producer.flush(self.revoke_timeout).is_ok()
                && self.producer.context().take_errors() == 0;
            if flushed {
                let offsets = {
                    let core = self
                        .core
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    parts
                        .iter()
                        .filter_map(|p| core.pending_offsets.get(p).map(|o| (*p, *o)))
                        .collect::<Vec<_>>()
                };
                if let Err(e) = commit(consumer, &self.topic, &offsets, CommitMode::Sync) {
                    tracing::warn!(error = %e, "commit on revoke failed; the new owner re-reads");
                }
            } else {
                tracing::warn!("produce not confirmed before revoke; not committing");
            }
            self.events
                .lock()
                .expect("events lock")
                .push(GroupEvent::Revoked(parts));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.events
                .lock()
                .expect("events lock")
                .push(GroupEvent::Assigned(parts));
        }
    }
}

/// Producer callbacks: count failures; time commands from window close to broker ack.
#[derive(Default)]
pub struct ProduceContext {
    errors: AtomicU64,
    errors_total: AtomicU64,
    close_to_ack: Mutex<Vec<f64>>,
    /// Delivery reports of dead-letter writes, for the loop to account (drained every turn).
    dead_letters: Mutex<Vec<DeadLetterDelivery>>,
}

/// A dead-letter write's delivery report: the source record's coordinates, and on failure
/// the record, to write again.
struct DeadLetterDelivery {
    partition: i32,
    offset: i64,
    failed: Option<FailedDeadLetter>,
}

struct FailedDeadLetter {
    error: String,
    too_large: bool,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// The source coordinates of a dead-letter record (its `segloop.source.*` headers).
fn dead_letter_source(m: &BorrowedMessage<'_>) -> Option<(i32, i64)> {
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
    fn take_errors(&self) -> u64 {
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
fn stamp(at: Instant) -> usize {
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

fn commit<C: ConsumerContext>(
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

/// Shared state handed to callers that inspect it.
pub type SharedCore = Arc<Mutex<Core>>;

/// Options of one runtime instance.
pub struct RunOptions {
    pub config: Config,
    pub policies: PolicySet,
    /// Watched for changes (and re-read on SIGHUP).
    pub policies_path: Option<PathBuf>,
    pub control: Arc<Control>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    /// Called with the admin address once it listens.
    pub on_admin: Option<Box<dyn FnOnce(std::net::SocketAddr) + Send>>,
    /// Shared state, for callers that inspect it (the demo's terminal view, tests).
    pub on_core: Option<Box<dyn FnOnce(SharedCore) + Send>>,
}

/// Runs until `control.stop()`; returns what it did.
///
/// # Errors
/// Startup failures (brokers, topics, admin address) and fatal consumer errors.
pub fn run(opts: RunOptions) -> anyhow::Result<RunReport> {
    let RunOptions {
        config,
        policies,
        policies_path,
        control,
        clock,
        metrics,
        on_admin,
        on_core,
    } = opts;
    kafka::connect(&config)?;
    let partitions = kafka::prepare_topics(&config)?;
    let telemetry_partitions = partitions[config.topics.telemetry.name.as_str()];
    let control_partitions = partitions[config.topics.control.name.as_str()];
    tracing::info!(
        brokers = %config.kafka.bootstrap_servers,
        group = %config.kafka.group_id,
        telemetry_partitions,
        "starting segloop"
    );

    let eos = config.delivery.mode == crate::config::DeliveryMode::ExactlyOnce;
    let txn_id = config
        .delivery
        .transactional_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", config.kafka.group_id, config.kafka.client_id));
    let mut producer_props = vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("linger.ms", "5"),
        ("queue.buffering.max.messages", "100000"),
    ];
    if eos {
        producer_props.push(("transactional.id", txn_id.as_str()));
    }
    let producer: Arc<ThreadedProducer<ProduceContext>> = Arc::new(
        kafka::producer_config(&config, &producer_props)
            .create_with_context(ProduceContext::default())
            .context("cannot create the Kafka producer")?,
    );
    if eos {
        // Fences any earlier producer with this id (a crashed predecessor) and aborts its
        // open transaction.
        producer
            .init_transactions(Duration::from_secs(30))
            .with_context(|| {
                format!("cannot initialise transactions (transactional.id {txn_id})")
            })?;
        producer
            .begin_transaction()
            .context("cannot begin a transaction")?;
        tracing::info!(transactional_id = %txn_id, "exactly-once: transactions on");
    }

    let t = &config.topics;
    let codec_err = |topic: &str, e: String| anyhow::anyhow!("topics.{topic}: {e}");
    let mut pipeline =
        Pipeline::new(&config, policies, PipelineOptions::live()).map_err(anyhow::Error::msg)?;
    pipeline.track_dead_letters();
    // No partition is caught up until the lag says so: a verification with no deciding window
    // waits for the re-read telemetry after a restart.
    pipeline.set_caught_up(Some(BTreeSet::new()));
    // Nor is any partition read through to its end: the idle advance waits for the lag.
    pipeline.set_read_through(Some(BTreeMap::new()));
    // With a registry: ids learned in the background; the schemas segloop writes registered.
    for w in config.registry_warnings() {
        tracing::warn!("{w}");
    }
    let registry = crate::registry::Registry::from_config(&config.schema_registry)
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    let writer = |topic: &crate::config::TopicConfig, kind| {
        crate::registry::writer_settings(&config, registry.as_deref(), topic, &topic.name, kind)
    };
    let command_settings = writer(&t.actions, crate::schema::SchemaKind::Command)?;
    let decision_settings = writer(&t.decisions, crate::schema::SchemaKind::Decision)?;
    let resolver = registry.map(crate::registry::Resolver::background);
    let max_wait = config.schema_registry.max_wait;
    let mut schema_waits = resolver.as_ref().map(|r| {
        pipeline.set_schema_source(Box::new(r.clone()));
        schema_wait::SchemaWaits::new(r.clone(), &t.telemetry.name, max_wait)
    });
    let mut outcome_waits = resolver
        .as_ref()
        .map(|r| schema_wait::SchemaWaits::new(r.clone(), &t.outcomes.name, max_wait));
    let read_model = pipeline.read_model();
    let core = Arc::new(Mutex::new(Core {
        pipeline,
        out: Output {
            producer: producer.clone(),
            command_codec: build_codec(t.actions.codec, &command_settings)
                .map_err(|e| codec_err("actions", e))?,
            decision_codec: build_codec(t.decisions.codec, &decision_settings)
                .map_err(|e| codec_err("decisions", e))?,
            actions_topic: t.actions.name.clone(),
            decisions_topic: t.decisions.name.clone(),
            dlq_topic: t.dlq.name.clone(),
            counters: Counters {
                topic_names: [
                    ("telemetry", t.telemetry.name.clone()),
                    ("outcomes", t.outcomes.name.clone()),
                ]
                .into(),
                ..Counters::default()
            },
            report: RunReport::default(),
            eos,
            txn_windowed: 0,
            held_back: BTreeMap::new(),
            dlq_limit: dlq_limit(&config),
            dlq_attempts: HashMap::new(),
        },
        outcome_codec: build_codec(t.outcomes.codec, &config.schema_settings(&t.outcomes))
            .map_err(|e| codec_err("outcomes", e))?,
        outcome_schemas: resolver.clone(),
        outcome_waiting: BTreeMap::new(),
        pending_offsets: BTreeMap::new(),
        state_reader: state_reader(&config)?,
        recent_outcomes: std::collections::VecDeque::new(),
        outcomes_backlog: BTreeMap::new(),
        txn_outcomes: Vec::new(),
        needs_rewind: false,
        fatal: None,
        closed_written: BTreeMap::new(),
        config: config.clone(),
    }));
    let status = Arc::new(Mutex::new(Status::default()));
    let heartbeat = Arc::new(Heartbeat::default());
    if let Some(f) = on_core {
        f(core.clone());
    }

    let admin = admin::Admin::start(
        &config.admin.listen,
        admin::Shared {
            read: read_model,
            status: status.clone(),
            heartbeat: heartbeat.clone(),
            token: config.admin.token.clone(),
            silences: SilencePublisher {
                producer: producer.clone(),
                topic: t.control.name.clone(),
            },
            metrics: metrics.clone(),
        },
    )?;
    tracing::info!(address = %admin.addr, "admin and metrics listening");
    if let Some(f) = on_admin {
        f(admin.addr);
    }

    let session_timeout = config
        .kafka
        .librdkafka_properties()
        .get("session.timeout.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(45_000);
    let group_ctx = GroupContext {
        topic: t.telemetry.name.clone(),
        clock: clock.clone(),
        core: core.clone(),
        producer: producer.clone(),
        events: Mutex::new(Vec::new()),
        client_errors: Mutex::new(Vec::new()),
        high_watermarks: Mutex::new(BTreeMap::new()),
        revoke_timeout: Duration::from_millis(session_timeout / 2)
            .min(config.delivery.shutdown_timeout),
    };
    let consumer: BaseConsumer<GroupContext> = kafka::client_config(
        &config,
        &[
            ("group.id", &config.kafka.group_id),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            // librdkafka postpones a partition's next fetch by this long once its local queue
            // is over the thresholds (default 1 s), which leaves a busy consumer idle in gaps.
            ("fetch.queue.backoff.ms", "5"),
        ],
    )
    // The high watermarks the lag is measured against (GroupContext::stats): set over any
    // `kafka.properties` value, which would leave the lag stale or unknown.
    .set("statistics.interval.ms", STATS_INTERVAL)
    .create_with_context(group_ctx)
    .context("cannot create the telemetry consumer")?;
    consumer
        .subscribe(&[&t.telemetry.name])
        .context("cannot subscribe to the telemetry topic")?;

    let outcomes: BaseConsumer<kafka::Collapsing> = {
        let c = side_consumer_unassigned(&config, &t.outcomes.name)?;
        let lookback = config.delivery.outcome_lookback.as_millis() as i64;
        let found = kafka::offsets_from(&c, &t.outcomes.name, Some(clock.now_ms() - lookback))?;
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &found.start {
            tpl.add_partition_offset(&t.outcomes.name, *p, Offset::Offset(*o))?;
        }
        c.assign(&tpl)
            .context("cannot assign the partitions of the outcomes topic")?;
        core.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .outcomes_backlog = found
            .start
            .iter()
            .filter(|(p, o)| found.end[*p] > **o)
            .map(|(p, _)| (*p, found.end[p]))
            .collect();
        c
    };
    let controls: BaseConsumer<kafka::Collapsing> = side_consumer(
        &config,
        &t.control.name,
        control_partitions,
        Offset::Beginning,
    )?;

    let _guard = metrics::set_default_local_recorder(&*metrics.recorder);
    crate::metrics::init_escalations(
        core.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pipeline
            .policies()
            .policies
            .iter()
            .map(|p| p.name.as_str()),
    );
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    let mut within_before = BTreeSet::new();
    // Partitions at their high watermark in the last lag measurement, when it was taken, and
    // per partition the time everything written to it was last known read.
    let mut at_end_before: BTreeSet<i32> = BTreeSet::new();
    let mut measured_before_ms = i64::MIN;
    let mut read_through: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_publish = Instant::now();
    let mut policy_mtime = policies_path.as_ref().and_then(|p| mtime(p));
    let mut last_policy_check = Instant::now();
    let commit_interval = config.delivery.commit_interval;
    let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(4096);

    let (mut poll_time, mut work_time, mut turns) = (Duration::ZERO, Duration::ZERO, 0u64);
    let mut telemetry_errors = ConsumeErrors::new(&t.telemetry.name);
    let mut outcome_errors = ConsumeErrors::new(&t.outcomes.name);
    let mut control_errors = ConsumeErrors::new(&t.control.name);
    // A reason to stop that still lets the shutdown commit what is safe (then `run` fails).
    let mut stop_error: Option<anyhow::Error> = None;
    while !control.stopping() {
        turns += 1;
        let turn_start = Instant::now();
        // Telemetry: block briefly for the first record, then take what is buffered.
        batch.clear();
        let mut poll_error = None;
        let mut timeout = Duration::from_millis(50);
        while batch.len() < 4096 {
            match consumer.poll(timeout) {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => {
                    poll_error = Some(e);
                    break;
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        let client_errors = std::mem::take(
            &mut *consumer
                .context()
                .client_errors
                .lock()
                .expect("errors lock"),
        );
        if poll_error.is_some() || !client_errors.is_empty() {
            // Which partitions: those with records behind them that this instance owns.
            let behind: Vec<i32> = status
                .lock()
                .expect("status lock")
                .lag
                .iter()
                .filter(|(_, l)| **l > 0)
                .map(|(p, _)| *p)
                .collect();
            let behind = format!("{behind:?} (behind)");
            let mut core = core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(e) = poll_error {
                telemetry_errors.on_error(&e, "", &behind, &mut core.out.counters);
            }
            for (e, reason) in client_errors {
                telemetry_errors.on_error(
                    &e,
                    &format!(": {reason}"),
                    "all",
                    &mut core.out.counters,
                );
            }
        } else if !batch.is_empty() {
            telemetry_errors.on_progress();
        }
        poll_time += turn_start.elapsed();
        let work_start = Instant::now();
        let events: Vec<GroupEvent> = std::mem::take(
            &mut *consumer
                .context()
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let now = clock.now_ms();
        if let Some(w) = schema_waits.as_mut() {
            for ev in &events {
                match ev {
                    GroupEvent::Assigned(parts) => w.rebalanced(&consumer, parts, true),
                    GroupEvent::Revoked(parts) => w.rebalanced(&consumer, parts, false),
                }
            }
        }
        {
            let mut core = core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let core = &mut *core;
            let joined = events.iter().any(|e| matches!(e, GroupEvent::Assigned(_)));
            for ev in events {
                core.apply_group_event(ev, now);
            }
            if joined {
                status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .joined = true;
            }
            core.on_telemetry(&batch, now);
            // Messages pin librdkafka state: release them now, never hold them across turns
            // (a consumer destroyed with messages alive waits for them forever).
            batch.clear();
            // Outcomes and operator intents.
            let outcome_batch = if core.outcomes_backlog.is_empty() {
                256
            } else {
                8192
            };
            for _ in 0..outcome_batch {
                match outcomes.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        outcome_errors.on_progress();
                        core.on_outcome(&m, now);
                    }
                    Some(Err(e)) => {
                        outcome_errors.on_error(&e, "", "all", &mut core.out.counters);
                        break;
                    }
                    None => break,
                }
            }
            for _ in 0..256 {
                match controls.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        control_errors.on_progress();
                        core.on_control(&m);
                    }
                    Some(Err(e)) => {
                        control_errors.on_error(&e, "", "all", &mut core.out.counters);
                        break;
                    }
                    None => break,
                }
            }
            core.tick(now);
            core.account_dead_letters();
            core.write_state(now);
            core.refresh_offsets();
            core.pipeline.end_turn(now);
            let mut s = status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.assigned = core.pipeline.assigned().to_vec();
            heartbeat.beat();
            s.consume_errors = [&telemetry_errors, &outcome_errors, &control_errors]
                .iter()
                .filter_map(|e| e.fresh())
                .collect();
        }
        if let Err(e) = sync_schema_waits(
            &core,
            &status,
            (&consumer, schema_waits.as_mut()),
            (&outcomes, outcome_waits.as_mut()),
        ) {
            stop_error = Some(e);
            break;
        }
        if let Some(why) = [&telemetry_errors, &outcome_errors, &control_errors]
            .iter()
            .find_map(|e| e.must_stop(config.kafka.connect_timeout))
        {
            admin.stop();
            anyhow::bail!("{why}");
        }
        work_time += work_start.elapsed();

        if last_commit.elapsed() >= commit_interval {
            last_commit = Instant::now();
            commit_owned(
                &consumer,
                &core,
                &producer,
                CommitMode::Async,
                commit_interval,
            );
        }
        {
            let mut c = core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(e) = c.fatal.take() {
                drop(c);
                admin.stop();
                anyhow::bail!("{e}");
            }
            if std::mem::take(&mut c.needs_rewind) {
                c.rewind(&consumer, clock.now_ms());
            }
        }
        if last_lag.elapsed() >= Duration::from_secs(2) {
            last_lag = Instant::now();
            let lag = measure_lag(&consumer);
            // Caught up: within the readiness threshold in two measurements in a row (2 s
            // apart), so a backlog's tail, or records fetched but not yet delivered (no
            // position yet), are read before a verification is judged without its window.
            let within: BTreeSet<i32> = lag
                .iter()
                .filter(|(_, l)| **l <= admin::READY_MAX_LAG)
                .map(|(p, _)| *p)
                .collect();
            let caught_up = within.intersection(&within_before).copied().collect();
            within_before = within;
            // Read through: at the high watermark in two measurements in a row, so the second
            // saw a high watermark fetched after the first (one cached from before a stall
            // cannot pass for the end); everything written before the first was read then.
            let measured_ms = clock.now_ms();
            let at_end: BTreeSet<i32> = lag
                .iter()
                .filter(|(_, l)| **l == 0)
                .map(|(p, _)| *p)
                .collect();
            for p in at_end.intersection(&at_end_before) {
                read_through.insert(*p, measured_before_ms);
            }
            at_end_before = at_end;
            measured_before_ms = measured_ms;
            let mut c = core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            c.pipeline.set_caught_up(Some(caught_up));
            c.pipeline.set_read_through(Some(read_through.clone()));
            drop(c);
            status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .lag = lag;
        }
        if let Some(path) = &policies_path {
            let hup = control.take_reload();
            if hup || last_policy_check.elapsed() >= Duration::from_secs(2) {
                last_policy_check = Instant::now();
                let m = mtime(path);
                if hup || m != policy_mtime {
                    policy_mtime = m;
                    reload_policies(&core, path, &config, clock.now_ms());
                }
            }
        }
        if last_publish.elapsed() >= Duration::from_millis(250) {
            last_publish = Instant::now();
            publish(&core, &producer, &status);
        }
    }

    // Graceful shutdown: stop polling, flush, commit what is safe. (The loop's time split is
    // this log line's; the library reads no process environment.)
    tracing::info!(
        turns,
        poll_secs = poll_time.as_secs_f64(),
        work_secs = work_time.as_secs_f64(),
        "shutting down: flushing and committing"
    );
    let deadline = config.delivery.shutdown_timeout;
    core.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .write_state(clock.now_ms());
    commit_owned(&consumer, &core, &producer, CommitMode::Sync, deadline);
    publish(&core, &producer, &status);
    admin.stop();
    let report = core
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .report();
    drop(batch);
    drop(consumer);
    match stop_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Pauses the telemetry and outcome partitions waiting on the schema registry, and reads the
/// answered ones again (see [`schema_wait`]); publishes the waits to `/readyz` and metrics.
///
/// # Errors
/// A partition waited longer than `schema_registry.max_wait`.
fn sync_schema_waits(
    core: &Arc<Mutex<Core>>,
    status: &Mutex<Status>,
    (telemetry, telemetry_waits): (
        &BaseConsumer<GroupContext>,
        Option<&mut schema_wait::SchemaWaits>,
    ),
    (outcomes, outcome_waits): (
        &BaseConsumer<kafka::Collapsing>,
        Option<&mut schema_wait::SchemaWaits>,
    ),
) -> anyhow::Result<()> {
    let (Some(tw), Some(ow)) = (telemetry_waits, outcome_waits) else {
        return Ok(());
    };
    let lock = || {
        core.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let (waiting, outcome_waiting) = {
        let c = lock();
        (c.pipeline.waiting().clone(), c.outcome_waiting.clone())
    };
    let result = tw.sync(telemetry, &waiting).and_then(|answered| {
        let more = ow.sync(outcomes, &outcome_waiting)?;
        if !answered.is_empty() || !more.is_empty() {
            let mut c = lock();
            for p in answered {
                c.pipeline.stop_waiting(p);
            }
            for p in more {
                c.outcome_waiting.remove(&p);
            }
        }
        Ok(())
    });
    let mut described = tw.describe();
    described.extend(ow.describe());
    metrics::gauge!(crate::metrics::SCHEMA_WAITING).set((tw.len() + ow.len()) as f64);
    metrics::counter!(crate::metrics::REGISTRY_REQUESTS).absolute(tw.requests());
    status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .schema_waits = described;
    result
}

fn side_consumer(
    config: &Config,
    topic: &str,
    partitions: i32,
    start: Offset,
) -> anyhow::Result<BaseConsumer<kafka::Collapsing>> {
    let c = side_consumer_unassigned(config, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, start)?;
    }
    c.assign(&tpl)
        .with_context(|| format!("cannot assign the partitions of {topic}"))?;
    Ok(c)
}

/// A group-less reader of every partition of a side topic (it never commits).
fn side_consumer_unassigned(
    config: &Config,
    topic: &str,
) -> anyhow::Result<BaseConsumer<kafka::Collapsing>> {
    let c: BaseConsumer<kafka::Collapsing> = kafka::client_config(
        config,
        &[
            ("group.id", &format!("{}-side", config.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ],
    )
    .create_with_context(kafka::Collapsing)
    .with_context(|| format!("cannot create a consumer for {topic}"))?;
    Ok(c)
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn reload_policies(core: &Arc<Mutex<Core>>, path: &std::path::Path, config: &Config, now: i64) {
    match PolicySet::load_for(path, &config.windows) {
        Ok(set) => {
            core.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reload(set, now);
            tracing::info!(path = %path.display(), "policies reloaded");
        }
        Err(e) => {
            tracing::error!(errors = %e, "policy reload refused; keeping the old policies");
        }
    }
}

fn commit_owned(
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
fn commit_transaction<C: ConsumerContext>(
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

/// A reader of the state changelog (committed records only; it never joins the group).
///
/// # Errors
/// The client cannot be created.
pub fn state_reader(config: &Config) -> anyhow::Result<BaseConsumer<kafka::QuietEof>> {
    kafka::client_config(
        config,
        &[
            ("group.id", &format!("{}-state", config.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("isolation.level", "read_committed"),
            // A restore reads to the end as fast as it can: no waiting for full fetches.
            ("fetch.wait.max.ms", "10"),
            ("fetch.queue.backoff.ms", "5"),
        ],
    )
    .create_with_context(kafka::QuietEof)
    .context("cannot create the state changelog reader")
}

/// Reads partition `p` of the state changelog to its current end: the latest state of every
/// segment (tombstoned ones left out) and the partition's `closed_through`, if recorded.
///
/// # Errors
/// The partition cannot be read within 120 s, or holds another partition's state.
pub fn read_state_partition(
    reader: &BaseConsumer<kafka::QuietEof>,
    topic: &str,
    p: i32,
) -> anyhow::Result<(Vec<crate::controller::SegmentState>, PartitionMarks)> {
    let (low, high) = kafka::watermarks(reader, topic, p)?;
    if high <= low {
        return Ok((Vec::new(), PartitionMarks::default()));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
    reader.assign(&tpl)?;
    let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(k) = m.key() {
                    latest.insert(k.to_vec(), m.payload().map(<[u8]>::to_vec));
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => tracing::warn!(error = %e, "state changelog reader"),
            None => {}
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "restoring {topic}/{p} took over 120 s"
        );
    }
    reader.unassign()?;
    let mut states = Vec::with_capacity(latest.len());
    let mut marks = PartitionMarks::default();
    for (key, value) in latest {
        let Some(bytes) = value else { continue };
        let version = crate::controller::record_version_of(&bytes);
        if let Err(e) = crate::controller::check_record_version(
            &format!(
                "the state record {:?} of {topic}/{p}",
                String::from_utf8_lossy(&key)
            ),
            version,
        ) {
            return Err(NewerRecord(e).into());
        }
        if key == PARTITION_KEY {
            match serde_json::from_slice::<PartitionRecord>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    crate::controller::check_record_version("a partition record", r.version)
                        .map(|()| r)
                }) {
                Ok(r) => {
                    marks = PartitionMarks {
                        closed_through_ms: Some(r.closed_through_ms).filter(|t| *t != i64::MIN),
                        dead_lettered_through: r.dead_lettered_through,
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable partition record ignored"),
            }
            continue;
        }
        match crate::controller::SegmentState::from_bytes(&bytes) {
            Ok(state) if state.partition == p => states.push(state),
            Ok(state) => tracing::warn!(
                segment = %state.segment,
                "state record of partition {} found in partition {p}; ignored",
                state.partition
            ),
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(&key),
                error = %e,
                "unreadable state record ignored"
            ),
        }
    }
    Ok((states, marks))
}

/// How long transactional calls are retried through a broker outage (below the default
/// `transaction.timeout.ms` of 60 s).
const TXN_RETRY_FOR: Duration = Duration::from_secs(45);

/// Calls `f` again while it fails with a retriable transaction error, until `deadline`.
fn txn_retry(
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

/// Records behind the high watermark per assigned partition: the consumer's position against
/// the high watermark of the partition's last fetch response, as librdkafka's statistics
/// report it (a local read; asking the broker, 500 ms per partition at worst, stalled the loop
/// for seconds whenever the embedded cluster was slow to answer).
fn measure_lag(consumer: &BaseConsumer<GroupContext>) -> BTreeMap<i32, i64> {
    let Ok(positions) = consumer.position() else {
        return BTreeMap::new();
    };
    let high = consumer
        .context()
        .high_watermarks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    positions
        .elements()
        .iter()
        .filter_map(|e| {
            let high = *high.get(&e.partition())?;
            // No position yet: nothing was delivered since the assignment although the
            // partition was fetched (its high watermark is known), so nothing is waiting:
            // caught up. (Counting the position as 0 reported the whole topic as lag after a
            // quiet restart.)
            let lag = match e.offset() {
                Offset::Offset(o) => (high - o).max(0),
                _ => 0,
            };
            Some((e.partition(), lag))
        })
        .collect()
}

fn publish(
    core: &Arc<Mutex<Core>>,
    producer: &ThreadedProducer<ProduceContext>,
    status: &Mutex<Status>,
) {
    let lag = status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .lag
        .clone();
    let mut core = core
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let core = &mut *core;
    let out = &mut core.out;
    if let Ok(mut v) = producer.context().close_to_ack.lock() {
        let room = 100_000usize.saturating_sub(out.report.close_to_command_secs.len());
        out.report
            .close_to_command_secs
            .extend(v.iter().take(room).copied());
        out.counters.close_to_command_secs.append(&mut v);
    }
    let e = core.pipeline.engine().stats();
    let c = core.pipeline.controller().stats();
    let gauges = Gauges {
        in_flight: core.pipeline.controller().in_flight().count() as u64,
        segments: e.segments,
        windows_closed: e.windows_closed,
        evaluations: c.evaluations,
        firings: c.firings,
        non_finite: e.non_finite_values,
        evicted: e.evicted_segments,
        evicted_events: e.evicted_events,
        produce_errors: producer.context().errors_total.load(Ordering::SeqCst),
        suppressions: c.suppressed.clone(),
        lag,
        label_bytes: core.pipeline.label_bytes() as u64,
        held_back: core.pipeline.controller().held_back() as u64,
        actuator_breaker_open: core.pipeline.controller().actuator_breaker_open(),
    };
    crate::metrics::publish(&mut out.counters, &gauges);
}

impl Core {
    /// What the run did so far.
    pub fn report(&self) -> RunReport {
        let s = self.pipeline.stats();
        RunReport {
            records_consumed: s.records_read,
            records_aggregated: s.records_aggregated,
            ..self.out.report.clone()
        }
    }

    fn sink(&mut self) -> (&mut Pipeline, LiveSink<'_, 'static>) {
        (
            &mut self.pipeline,
            LiveSink {
                out: &mut self.out,
                batch: &[],
            },
        )
    }

    fn apply_group_event(&mut self, ev: GroupEvent, now: i64) {
        self.out.counters.rebalances += 1;
        match ev {
            GroupEvent::Assigned(parts) => {
                tracing::info!(?parts, "partitions assigned");
                for p in parts {
                    self.pipeline.assign(p);
                    self.restore_partition(p);
                }
                self.replay_recent_outcomes(now);
            }
            GroupEvent::Revoked(parts) => {
                tracing::info!(?parts, "partitions revoked");
                for p in parts {
                    self.pipeline.revoke(p);
                    self.pending_offsets.remove(&p);
                    self.closed_written.remove(&p);
                }
            }
        }
    }

    /// One polled batch of telemetry through the pipeline.
    fn on_telemetry(&mut self, batch: &[BorrowedMessage<'_>], now: i64) {
        let records: Vec<Record<'_>> = batch
            .iter()
            .enumerate()
            .map(|(handle, m)| {
                self.out.count_consumed("telemetry", m);
                Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key(),
                    value: m.payload(),
                    timestamp_ms: m.timestamp().to_millis(),
                    handle,
                }
            })
            .collect();
        let mut sink = LiveSink {
            out: &mut self.out,
            batch,
        };
        self.pipeline.on_batch(&records, now, &mut sink);
    }

    fn on_outcome(&mut self, m: &BorrowedMessage<'_>, now: i64) {
        if let Some(w) = self.outcome_waiting.get(&m.partition()) {
            if m.offset() >= w.offset {
                // Read again once the registry answers.
                return;
            }
        }
        if let (Some(source), Some(value)) = (self.outcome_schemas.as_mut(), m.payload()) {
            if let Err((schema_id, reason)) =
                crate::codec::learn_schema(self.outcome_codec.as_mut(), source, value)
            {
                self.outcome_waiting.insert(
                    m.partition(),
                    crate::pipeline::SchemaWait {
                        offset: m.offset(),
                        schema_id,
                        reason,
                    },
                );
                return;
            }
        }
        if let Some(end) = self.outcomes_backlog.get(&m.partition()) {
            if m.offset() + 1 >= *end {
                self.outcomes_backlog.remove(&m.partition());
                if self.outcomes_backlog.is_empty() {
                    tracing::info!("outcomes backlog read");
                }
            }
        }
        self.out.count_consumed("outcomes", m);
        let o = match decode_record(self.outcome_codec.as_ref(), m.key(), m.payload()) {
            Ok(o) => o,
            Err(e) => return self.out.dead_letter(m, &e),
        };
        if let Some(o) = self.apply_outcome(o, now) {
            self.out.report.outcomes_skipped += 1;
            self.out.counters.outcomes_skipped += 1;
            if self.recent_outcomes.len() >= RECENT_OUTCOMES {
                self.recent_outcomes.pop_front();
            }
            self.recent_outcomes.push_back(o);
        }
    }

    /// Applies an outcome; gives back one for a segment not owned here (yet).
    fn apply_outcome(&mut self, o: RemediationOutcome, now: i64) -> Option<RemediationOutcome> {
        let (pipeline, mut sink) = self.sink();
        match pipeline.on_outcome(&o, now, &mut sink) {
            OutcomeDisposition::Applied => {
                self.out.report.outcomes_applied += 1;
                *self
                    .out
                    .counters
                    .outcomes
                    .entry(o.status.as_str())
                    .or_default() += 1;
                if self.out.eos {
                    self.txn_outcomes.push(o);
                }
            }
            OutcomeDisposition::NotOurs => return Some(o),
            OutcomeDisposition::Unknown => self.out.counters.outcomes_unknown += 1,
            OutcomeDisposition::Duplicate => {}
        }
        None
    }

    /// Applies buffered outcomes whose segments are owned now.
    fn replay_recent_outcomes(&mut self, now: i64) {
        for o in std::mem::take(&mut self.recent_outcomes) {
            if let Some(o) = self.apply_outcome(o, now) {
                self.recent_outcomes.push_back(o);
            }
        }
    }

    fn on_control(&mut self, m: &BorrowedMessage<'_>) {
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        let Some(id) = key.strip_prefix("silence/") else {
            return;
        };
        match m.payload() {
            None => {
                self.pipeline.remove_silence(id);
                tracing::info!(id, "silence removed");
            }
            Some(bytes) => match serde_json::from_slice::<SilenceRecord>(bytes)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    crate::controller::check_record_version("a silence record", s.version)
                        .map_err(|e| {
                            self.fatal = Some(format!("control topic: {e}"));
                            e
                        })
                        .map(|()| s)
                }) {
                Ok(s) => match Silence::new(&s.id, &s.segments, s.from_ms, s.until_ms, &s.reason) {
                    Ok(silence) => {
                        tracing::info!(id = %s.id, segments = %s.segments, created_by = %s.created_by, "silence applied");
                        self.pipeline.add_silence(silence.by(&s.created_by));
                    }
                    Err(e) => tracing::warn!(id, error = %e, "ignoring a silence with a bad glob"),
                },
                Err(e) => tracing::warn!(id, error = %e, "ignoring an unreadable control record"),
            },
        }
    }

    /// Quiet partitions and deadlines on the controller clock (deadlines wait until the
    /// outcomes backlog is read: an ack may be in it).
    fn tick(&mut self, now: i64) {
        let deadlines = self.outcomes_backlog.is_empty();
        let (pipeline, mut sink) = self.sink();
        pipeline.tick(now, deadlines, &mut sink);
    }

    fn reload(&mut self, set: PolicySet, now: i64) {
        let (pipeline, mut sink) = self.sink();
        pipeline.reload(set, now, &mut sink);
    }

    /// Writes the controller state changed since the last call to the state changelog
    /// (key: segment; partition: the telemetry partition; a tombstone once a segment is
    /// quiet again).
    fn write_state(&mut self, now: i64) {
        let topic = self.config.topics.state.name.clone();
        for change in self.pipeline.take_state_changes(now) {
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(&topic, 0)
                    .key(change.segment.as_bytes())
                    .partition(change.partition);
            if let Some(v) = change.state.as_deref() {
                record = record.payload(v);
            }
            send_record(&self.out.producer, record);
            self.out.counters.state_records += 1;
        }
        for p in self.pipeline.assigned().to_vec() {
            let marks = PartitionMarks {
                closed_through_ms: self.pipeline.closed_through(p),
                dead_lettered_through: self.pipeline.dead_letter_mark(p),
            };
            if marks == PartitionMarks::default()
                || self.closed_written.get(&p).is_some_and(|w| *w == marks)
            {
                continue;
            }
            let value = serde_json::to_vec(&PartitionRecord {
                version: crate::controller::RECORD_VERSION,
                closed_through_ms: marks.closed_through_ms.unwrap_or(i64::MIN),
                dead_lettered_through: marks.dead_lettered_through,
            })
            .expect("a partition record serializes");
            send_record(
                &self.out.producer,
                BaseRecord::with_opaque_to(&topic, 0)
                    .key(PARTITION_KEY)
                    .payload(value.as_slice())
                    .partition(p),
            );
            self.closed_written.insert(p, marks);
            self.out.counters.state_records += 1;
        }
    }

    /// Restores partition `p`'s controller state from the changelog: the latest record per
    /// segment, read (committed records only) up to the end the partition has now.
    fn restore_partition(&mut self, p: i32) {
        let started = Instant::now();
        let topic = self.config.topics.state.name.clone();
        let result =
            read_state_partition(&self.state_reader, &topic, p).and_then(|(states, marks)| {
                self.closed_written.insert(p, marks);
                self.pipeline
                    .restore_dead_letter_mark(p, marks.dead_lettered_through);
                self.pipeline
                    .restore(p, states, marks.closed_through_ms)
                    .map_err(anyhow::Error::msg)
            });
        let secs = started.elapsed().as_secs_f64();
        self.out.counters.restore_secs.push(secs);
        match result {
            Ok(n) => {
                self.out.counters.state_restored += n as u64;
                tracing::info!(
                    partition = p,
                    segments = n,
                    secs,
                    "controller state restored"
                );
            }
            Err(e) if e.downcast_ref::<NewerRecord>().is_some() => {
                // Misreading a newer format would act on wrong state: stop instead.
                tracing::error!(partition = p, error = %e, "controller state of a newer format");
                self.fatal = Some(e.to_string());
            }
            Err(e) => {
                tracing::error!(partition = p, error = %e, "controller state not restored; the partition starts from windows alone");
            }
        }
    }

    /// Exactly-once, after an aborted transaction: every owned partition goes back to its
    /// last committed state (committed offset, changelog), and the outcomes the aborted
    /// transaction had applied are applied again.
    fn rewind(&mut self, consumer: &BaseConsumer<GroupContext>, now: i64) {
        let topic = self.config.topics.telemetry.name.clone();
        let parts = self.pipeline.assigned().to_vec();
        let committed = consumer
            .committed(Duration::from_secs(10))
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.partition(), e.offset()))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        self.out.txn_windowed = 0;
        for p in &parts {
            self.pipeline.revoke(*p);
            self.pending_offsets.remove(p);
            self.closed_written.remove(p);
            self.pipeline.assign(*p);
            let to = match committed.get(p) {
                Some(Offset::Offset(o)) => Offset::Offset(*o),
                _ => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(&topic, *p, to, Duration::from_secs(10)) {
                tracing::error!(partition = p, error = %e, "rewind: seek failed");
                self.fatal = Some(format!("exactly-once: rewind of partition {p} failed: {e}"));
                return;
            }
            self.restore_partition(*p);
        }
        let applied = std::mem::take(&mut self.txn_outcomes);
        self.recent_outcomes.extend(applied);
        self.replay_recent_outcomes(now);
        tracing::info!(?parts, "rewound to the last committed state");
    }

    /// Dead-letter deliveries since the last turn: an acknowledged write releases the commit
    /// floor; a failed one is written again (truncated further if it was too large), and after
    /// [`DLQ_ATTEMPTS`] the run stops, never having committed past it. Exactly-once: the
    /// failed write fails its transaction, whose rewind writes it again.
    fn account_dead_letters(&mut self) {
        let deliveries = std::mem::take(
            &mut *self
                .out
                .producer
                .context()
                .dead_letters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for d in deliveries {
            let Some(f) = d.failed else {
                self.out.dlq_attempts.remove(&(d.partition, d.offset));
                self.pipeline.dead_letter_acked(d.partition, d.offset);
                continue;
            };
            if self.out.eos {
                if f.too_large {
                    self.out.dlq_limit = (self.out.dlq_limit / 2).max(MIN_DLQ_LIMIT);
                }
                continue;
            }
            let attempts = self
                .out
                .dlq_attempts
                .entry((d.partition, d.offset))
                .or_insert(0);
            *attempts += 1;
            if *attempts >= DLQ_ATTEMPTS {
                self.fatal = Some(format!(
                    "the DLQ topic {} cannot be written: {} (the dead letter of partition {} offset {} failed {} times); the committed offset stays before it, so a restart writes it again",
                    self.out.dlq_topic, f.error, d.partition, d.offset, DLQ_ATTEMPTS
                ));
                continue;
            }
            if let Some(n) = self.out.log_every("dlq-retry", HELD_BACK_LOG_EVERY) {
                tracing::warn!(error = %f.error, partition = d.partition, offset = d.offset, failures = n, "dead letter not written; writing it again (the commit waits for it)");
            }
            self.out.write_dead_letter(
                (d.partition, d.offset),
                f.key.as_deref(),
                f.value.as_deref(),
                &f.headers,
                f.too_large,
            );
        }
    }

    fn refresh_offsets(&mut self) {
        for &p in self.pipeline.assigned() {
            if let Some(o) = self.pipeline.committable_offset(p) {
                self.pending_offsets.insert(p, o);
            }
        }
    }
}

impl Output {
    /// Counts a consumed record and its bytes (key and value) under its topic's role.
    fn count_consumed(&mut self, role: &'static str, m: &BorrowedMessage<'_>) {
        let bytes = m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len);
        let entry = self
            .counters
            .consumed
            .entry((role, m.partition()))
            .or_default();
        entry.0 += 1;
        entry.1 += bytes as u64;
    }

    /// Logs a firing a guardrail held back: the first at once, then one line per guardrail at
    /// most every [`HELD_BACK_LOG_EVERY`] with the count meanwhile (never silently disarmed).
    fn held_back(&mut self, guardrail: &str, segment: &str, policy: &str, policies: &PolicySet) {
        if let Some(n) = self.log_every(guardrail, HELD_BACK_LOG_EVERY) {
            tracing::warn!(
                guardrail,
                limit = %policies.limit_of(guardrail, policy),
                segment,
                policy,
                held_back = n,
                "firing held back by a guardrail"
            );
        }
    }

    /// Counts an event of `kind`; `Some(count since the last line)` when a line is due (the
    /// first at once, then at most one per `every`).
    fn log_every(&mut self, kind: &str, every: Duration) -> Option<u64> {
        let now = Instant::now();
        let entry = self.held_back.entry(kind.to_string()).or_insert((None, 0));
        entry.1 += 1;
        if entry.0.is_none_or(|last| now - last >= every) {
            let n = entry.1;
            *entry = (Some(now), 0);
            Some(n)
        } else {
            None
        }
    }

    fn emit(&mut self, fx: &mut Effects, closed_at: Option<Instant>) {
        for cmd in fx.commands.drain(..) {
            let mut bytes = Vec::with_capacity(256);
            if let Err(e) = self.command_codec.encode(&cmd, &mut bytes) {
                tracing::error!(error = %e, "cannot encode a command");
                continue;
            }
            *self
                .counters
                .commands
                .entry((cmd.action.clone(), cmd.policy.clone()))
                .or_default() += 1;
            self.report.commands += 1;
            tracing::info!(segment = %cmd.segment, policy = %cmd.policy, action = %cmd.action, attempt = cmd.attempt, command_id = %cmd.command_id, "command");
            send(
                &self.producer,
                &self.actions_topic,
                cmd.segment.as_bytes(),
                &bytes,
                closed_at.map_or(0, stamp),
            );
        }
        for d in fx.decisions.drain(..) {
            let mut bytes = Vec::with_capacity(256);
            if self.decision_codec.encode(&d, &mut bytes).is_ok() {
                self.report.decisions += 1;
                send(
                    &self.producer,
                    &self.decisions_topic,
                    d.segment.as_bytes(),
                    &bytes,
                    0,
                );
            }
        }
        for timing in fx.timings.drain(..) {
            self.counters
                .timings
                .push((timing.kind, timing.policy, timing.ms as f64 / 1000.0));
        }
    }

    fn dead_letter(&mut self, m: &BorrowedMessage<'_>, e: &DecodeError) {
        let code = e.code.as_str();
        if let Some(n) = self.log_every(&format!("dlq/{code}"), HELD_BACK_LOG_EVERY) {
            tracing::warn!(
                code,
                records = n,
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                error = %e.message,
                "records dead-lettered (a sample; one line per code at most every 10 s)"
            );
        }
        *self.counters.decode_errors.entry(code).or_default() += 1;
        *self.counters.dlq.entry(code).or_default() += 1;
        self.report.records_dlq += 1;
        let mut headers: Vec<(String, Option<Vec<u8>>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        for (k, v) in [
            ("segloop.error.code", code),
            ("segloop.error.message", e.message.as_str()),
            ("segloop.source.topic", m.topic()),
            ("segloop.source.partition", &m.partition().to_string()),
            ("segloop.source.offset", &m.offset().to_string()),
        ] {
            headers.push((k.to_string(), Some(v.as_bytes().to_vec())));
        }
        self.write_dead_letter(
            (m.partition(), m.offset()),
            m.key(),
            m.payload(),
            &headers,
            false,
        );
    }

    /// Writes a dead letter. One too large for the DLQ (its size limit, halved each time the
    /// broker refuses one as too large) goes truncated, with headers giving its original size
    /// (its coordinates are in the `segloop.source.*` headers): the one exception to the
    /// byte-for-byte contract. A write that cannot even be queued is reported like a failed
    /// delivery, so the loop writes it again and the commit floor waits for it.
    fn write_dead_letter(
        &mut self,
        source: (i32, i64),
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(String, Option<Vec<u8>>)],
        too_large: bool,
    ) {
        if too_large {
            self.dlq_limit = (self.dlq_limit / 2).max(MIN_DLQ_LIMIT);
        }
        let header_bytes: usize = headers
            .iter()
            .filter(|(k, _)| k != "segloop.original.size" && k != "segloop.truncated")
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16)
            .sum();
        let key_len = key.map_or(0, <[u8]>::len);
        let value_len = value.map_or(0, <[u8]>::len);
        let room = self.dlq_limit.saturating_sub(header_bytes + key_len + 128);
        let original = headers
            .iter()
            .find(|(k, _)| k == "segloop.original.size")
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse().ok())
            .unwrap_or(value_len);
        let truncated = value_len > room;
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            if k == "segloop.original.size" || k == "segloop.truncated" {
                continue;
            }
            owned = owned.insert(Header {
                key: k.as_str(),
                value: v.as_deref(),
            });
        }
        let size = original.to_string();
        if truncated || original != value_len {
            owned = owned
                .insert(Header {
                    key: "segloop.truncated",
                    value: Some("true"),
                })
                .insert(Header {
                    key: "segloop.original.size",
                    value: Some(size.as_str()),
                });
            self.counters.dlq_truncated += u64::from(truncated);
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.dlq_topic, 0).headers(owned);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(&v[..v.len().min(room)]);
        }
        if let Err(e) = kafka::send_waiting(&self.producer, record) {
            let too_large = e.rdkafka_error_code()
                == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge);
            if let Ok(mut v) = self.producer.context().dead_letters.lock() {
                v.push(DeadLetterDelivery {
                    partition: source.0,
                    offset: source.1,
                    failed: Some(FailedDeadLetter {
                        error: e.to_string(),
                        too_large,
                        key: key.map(<[u8]>::to_vec),
                        value: value.map(|v| v[..v.len().min(room)].to_vec()),
                        headers: headers.to_vec(),
                    }),
                });
            }
        }
    }
}

/// The first size limit of a dead letter: the producer's `message.max.bytes` (librdkafka's
/// default 1,000,000) less headroom for the record's framing.
fn dlq_limit(config: &Config) -> usize {
    config
        .kafka
        .properties
        .get("message.max.bytes")
        .and_then(|v| match v {
            toml::Value::Integer(n) => usize::try_from(*n).ok(),
            toml::Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .unwrap_or(1_000_000usize)
        .saturating_sub(4 << 10)
        .max(MIN_DLQ_LIMIT)
}

/// The smallest a dead letter is truncated to.
const MIN_DLQ_LIMIT: usize = 16 << 10;

/// Times a dead letter is written before the run stops (it is never committed past).
const DLQ_ATTEMPTS: u32 = 5;

/// Writes silences to the control topic (every instance applies them from there).
#[derive(Clone)]
pub struct SilencePublisher {
    producer: Arc<ThreadedProducer<ProduceContext>>,
    topic: String,
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

fn send(
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
fn send_record(
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
