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
mod changelog;
mod delivery;
mod errors;
mod group;
mod live;
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

use changelog::*;
pub use changelog::{read_state_partition, state_reader, PartitionMarks};
use delivery::*;
pub use delivery::{ProduceContext, SilencePublisher};
use errors::*;
use group::*;
pub use live::Core;
use live::*;

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
