//! `segloop run`: the engine and controller driven by Kafka.
//!
//! One engine thread owns the hot path: a `BaseConsumer` in the telemetry group (its records
//! taken in batches from a [`kafka::Feed`], its own queue polled for rebalances), the window
//! engine and the controller. Two group-less consumers read every
//! partition of the outcomes topic (from the end) and of the control topic (from the start).
//! One idempotent producer (`acks=all`, murmur2) writes commands, decisions and DLQ records.
//!
//! Delivery (at-least-once): telemetry offsets are committed every `commit_interval`, only up
//! to the engine's committable offset (the lowest offset still feeding an open window), and
//! only once every record produced before them is acknowledged (the producer's delivery
//! sequence, `delivery`; the loop does not wait for it). On revoke the rebalance callback
//! flushes and commits within a bound, then the partition's state is dropped; on assign,
//! consumption resumes at the committed offset, rebuilding open windows.
//!
//! The loop (`turn`) runs one turn after another as named steps. The admin thread
//! ([`admin`]) serves `/metrics`, health, and the admin API from the read model and
//! [`Status`]; it never takes the [`Core`]'s lock.

pub mod admin;
mod changelog;
mod delivery;
mod errors;
mod group;
pub mod instances;
mod live;
mod output;
mod schema_wait;
mod turn;
mod workers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
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

/// Locks `m`. A poisoned lock is taken as it is: every lock here guards counters, queues or
/// the core, which a panicking holder leaves consistent between steps.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

use changelog::*;
pub use changelog::{read_state_partition, state_reader, PartitionMarks};
use delivery::*;
pub use delivery::{ProduceContext, SilencePublisher};
use errors::*;
use group::*;
pub use live::Core;
use output::*;
pub use workers::Workers;

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
    /// Records written to the state changelog (segment states, tombstones, partition
    /// records).
    pub state_records: u64,
    /// Telemetry records that came through the consumer's queue instead of the feed (a
    /// partition the rebalance callback could not route: [`kafka::Feed`]); 0 normally.
    pub records_unrouted: u64,
    /// Window close → command acknowledged by the broker, seconds (first 100,000 samples).
    #[serde(skip)]
    pub close_to_command_secs: Vec<f64>,
    /// Window close → command handed to the producer, seconds (first 100,000 samples).
    #[serde(skip)]
    pub close_to_produce_secs: Vec<f64>,
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
    /// The controller state being restored after an assignment, as a sentence with its
    /// progress (`/readyz` is false meanwhile).
    pub restoring: Option<String>,
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
    let t = &config.topics;
    tracing::info!(
        brokers = %config.kafka.bootstrap_servers,
        group = %config.kafka.group_id,
        telemetry_partitions = partitions[t.telemetry.name.as_str()],
        "starting segloop"
    );
    let eos = config.delivery.mode == crate::config::DeliveryMode::ExactlyOnce;
    let group = config.kafka.group_id.clone();
    let config_shutdown = config.delivery.shutdown_timeout;
    let me = announce_self(&config, clock.now_ms());
    if eos {
        // Before transactions start: a live instance with this id would be fenced by them.
        instances::check_unique(&config, &me, clock.now_ms())?;
    }
    let producer = start_producer(&config, eos.then_some(me.transactional_id.as_str()))?;
    for w in config.registry_warnings() {
        tracing::warn!("{w}");
    }
    let registry = crate::registry::Registry::from_config(&config.schema_registry)
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    let resolver = registry
        .as_ref()
        .map(|r| crate::registry::Resolver::background(r.clone()));
    let core = Arc::new(Mutex::new(live::build_core(
        &config,
        policies,
        producer.clone(),
        registry.as_deref(),
        resolver.clone(),
        eos,
    )?));
    lock(&core)
        .pipeline
        .set_cluster(crate::controller::Cluster::new(
            &me.transactional_id,
            me.started_ms,
            ancestor_hold(&config).as_millis() as i64,
        ));
    let read_model = lock(&core).pipeline.read_model();
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
    let consumer = telemetry_consumer(&config, producer.clone(), core.clone(), eos)?;
    let outcomes = outcome_consumer(&config, &core, clock.now_ms())?;
    let controls = side_consumer(
        &config,
        &t.control.name,
        partitions[t.control.name.as_str()],
        Offset::Beginning,
    )?;
    let _guard = metrics::set_default_local_recorder(&*metrics.recorder);
    let shards = lock(&core).pipeline.shard_count();
    crate::metrics::init_escalations(
        lock(&core)
            .pipeline
            .policies()
            .policies
            .iter()
            .map(|p| p.name.as_str()),
    );
    let mut turns = turn::Loop::new(turn::Parts {
        core,
        status,
        heartbeat,
        producer,
        outcomes,
        controls,
        changelog: Changelog::new(&config)?,
        me,
        resolver,
        policies_path,
        clock,
        config,
    });
    // Every line of the loop carries the group (and, inside a rebalance or a restore, the
    // partitions).
    let span = tracing::info_span!("run", group = %group).entered();
    let feed = FeedGuard::new(&consumer, shards)?;
    let result = match turns.run(&consumer, &feed.feeds, &control) {
        turn::Ended::Stopped => Ok(turns.shutdown(&consumer)),
        turn::Ended::FailedAfterCommit(e) => {
            turns.shutdown(&consumer);
            Err(e)
        }
        turn::Ended::Failed(e) => Err(e),
    };
    drop(span);
    admin.stop();
    drop(feed);
    close_consumer(consumer, config_shutdown);
    result
}

/// The telemetry consumer's [`kafka::Feed`]s, one per shard of the pipeline, routed to by its
/// rebalance callback while this lives; dropped before the consumer (librdkafka must see the
/// feeds destroyed first): the router is cleared, then the feeds destroyed.
struct FeedGuard<'c> {
    consumer: &'c BaseConsumer<GroupContext>,
    feeds: Vec<kafka::Feed>,
}

impl<'c> FeedGuard<'c> {
    fn new(
        consumer: &'c BaseConsumer<GroupContext>,
        shards: usize,
    ) -> anyhow::Result<FeedGuard<'c>> {
        let feeds = (0..shards.max(1))
            .map(|_| {
                // SAFETY: the consumer is alive, and the guard (holding a borrow of it) drops
                // the feeds before the consumer can be dropped.
                unsafe { kafka::Feed::new(consumer.client().native_ptr()) }
                    .context("cannot create the telemetry feed queue")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        *lock(&consumer.context().router) = Some(Routes {
            feeds: feeds.iter().map(kafka::Feed::router).collect(),
            owner: BTreeMap::new(),
        });
        Ok(FeedGuard { consumer, feeds })
    }
}

impl Drop for FeedGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.consumer.context().router) = None;
    }
}

/// Closes the telemetry consumer (leaving the group), waiting at most `within`: a close that
/// librdkafka never finishes (a final rebalance served after its group terminated) is left
/// to finish or not on its own thread, with a warning, so a stop never hangs on it.
fn close_consumer(consumer: BaseConsumer<GroupContext>, within: Duration) {
    let (done, closed) = std::sync::mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            if closed.recv_timeout(within).is_err() {
                tracing::warn!(
                    waited = ?within,
                    "the telemetry consumer did not finish closing; left to close in the background"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "no thread to close the telemetry consumer on"),
    }
}

/// How long a child segment whose ancestor another instance owns waits after its claim is
/// read back, so an ancestor breaching in the same window wins: the time the ancestor's claim
/// takes to be seen (a few polls at-least-once; a commit interval more exactly-once) and a
/// margin for the two windows closing apart.
pub fn ancestor_hold(config: &Config) -> Duration {
    let visible = if config.delivery.mode == crate::config::DeliveryMode::ExactlyOnce {
        config.delivery.commit_interval
    } else {
        Duration::ZERO
    };
    visible + Duration::from_millis(250)
}

/// This instance as its control-topic record says it: the configured `transactional.id`, or a
/// default unique per instance ([`instances::default_transactional_id`]).
fn announce_self(config: &Config, now_ms: i64) -> instances::InstanceRecord {
    let host = instances::hostname();
    instances::InstanceRecord {
        version: crate::controller::RECORD_VERSION,
        transactional_id: config
            .delivery
            .transactional_id
            .clone()
            .unwrap_or_else(|| instances::default_transactional_id(config, &host)),
        host,
        admin: config.admin.listen.clone(),
        pid: std::process::id(),
        started_ms: now_ms,
        seen_ms: now_ms,
        known_segments: 0,
    }
}

/// The producer of commands, decisions, state and dead letters (idempotent, `acks=all`,
/// murmur2); exactly-once (`txn_id`): transactional, with its first transaction begun.
fn start_producer(
    config: &Config,
    txn_id: Option<&str>,
) -> anyhow::Result<Arc<ThreadedProducer<ProduceContext>>> {
    let eos = txn_id.is_some();
    let txn_id = txn_id.unwrap_or_default();
    let mut props = vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("linger.ms", "5"),
        ("queue.buffering.max.messages", "100000"),
    ];
    if eos {
        props.push(("transactional.id", txn_id));
    }
    let producer: Arc<ThreadedProducer<ProduceContext>> = Arc::new(
        kafka::producer_config(config, &props)
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
    Ok(producer)
}

/// The telemetry consumer, subscribed, in the group; its rebalance callback commits the
/// core's committable offsets (see [`GroupContext`]).
fn telemetry_consumer(
    config: &Config,
    producer: Arc<ThreadedProducer<ProduceContext>>,
    core: SharedCore,
    eos: bool,
) -> anyhow::Result<BaseConsumer<GroupContext>> {
    let topic = &config.topics.telemetry.name;
    let properties = config.kafka.librdkafka_properties();
    let session_timeout = properties
        .get("session.timeout.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(45_000);
    let context = GroupContext {
        topic: topic.clone(),
        producer,
        eos,
        core,
        events: Mutex::new(Vec::new()),
        events_pending: Default::default(),
        client_errors: Mutex::new(Vec::new()),
        fetch_marks: Mutex::new(BTreeMap::new()),
        cooperative: cooperative_protocol(&properties),
        router: Mutex::new(None),
        topic_c: std::ffi::CString::new(topic.as_str())
            .context("the telemetry topic's name holds a NUL byte")?,
        revoke_timeout: Duration::from_millis(session_timeout / 2)
            .min(config.delivery.shutdown_timeout),
    };
    let consumer: BaseConsumer<GroupContext> = kafka::client_config(
        config,
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
    .create_with_context(context)
    .context("cannot create the telemetry consumer")?;
    consumer
        .subscribe(&[topic])
        .context("cannot subscribe to the telemetry topic")?;
    Ok(consumer)
}

/// The outcomes reader: every partition from `delivery.outcome_lookback` ago; the partitions
/// with a backlog are noted in the core (deadlines wait for it).
fn outcome_consumer(
    config: &Config,
    core: &SharedCore,
    now: i64,
) -> anyhow::Result<BaseConsumer<kafka::Collapsing>> {
    let topic = &config.topics.outcomes.name;
    let c = side_consumer_unassigned(config, topic)?;
    let lookback = config.delivery.outcome_lookback.as_millis() as i64;
    let found = kafka::offsets_from(&c, topic, Some(now - lookback))?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &found.start {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    c.assign(&tpl)
        .context("cannot assign the partitions of the outcomes topic")?;
    lock(core).outcomes_backlog = found
        .start
        .iter()
        .filter(|(p, o)| found.end[*p] > **o)
        .map(|(p, _)| (*p, found.end[p]))
        .collect();
    Ok(c)
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

fn publish(
    core: &Arc<Mutex<Core>>,
    producer: &ThreadedProducer<ProduceContext>,
    status: &Mutex<Status>,
) {
    let lag = lock(status).lag.clone();
    let mut core = lock(core);
    let core = &mut *core;
    let out = &mut core.out;
    if let Ok(mut v) = producer.context().close_to_ack.lock() {
        let room = 100_000usize.saturating_sub(out.report.close_to_command_secs.len());
        out.report
            .close_to_command_secs
            .extend(v.iter().take(room).copied());
        out.counters.close_to_command_secs.append(&mut v);
    }
    let e = core.pipeline.engine_stats();
    let c = core.pipeline.controller().stats();
    let budgets = core
        .pipeline
        .controller()
        .budgets(crate::clock::SystemClock.now_ms());
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
        peers: budgets.peers as u64,
        in_flight_elsewhere: budgets.elsewhere_in_flight as u64,
        claims_expired: c.claims_expired,
        actuator_breaker_open: core.pipeline.controller().actuator_breaker_open(),
    };
    crate::metrics::publish(&mut out.counters, &gauges);
}

#[cfg(test)]
mod tests;
