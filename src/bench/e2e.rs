//! `segloop bench e2e`: the whole pipeline against a bare consumer on the same topic, and the
//! bench topics it produces.

use super::*;

/// Figures of one end-to-end run on the embedded cluster.
#[derive(Debug, Clone)]
pub struct E2eReport {
    pub records: u64,
    pub partitions: i32,
    pub segments: usize,
    pub events_per_sec: f64,
    pub raw_consume_per_sec: f64,
    pub ratio: f64,
    pub commands: u64,
    pub close_to_command_p50_ms: Option<f64>,
    pub close_to_command_p99_ms: Option<f64>,
    pub consumed: u64,
    pub aggregated: u64,
    pub dlq: u64,
}

impl E2eReport {
    pub fn print(&self) {
        println!("bench=e2e");
        println!("records={}", self.records);
        println!("partitions={}", self.partitions);
        println!("segments={}", self.segments);
        println!("consumed={}", self.consumed);
        println!("aggregated={}", self.aggregated);
        println!("dlq={}", self.dlq);
        println!("events_per_sec={:.0}", self.events_per_sec);
        println!("raw_consume_per_sec={:.0}", self.raw_consume_per_sec);
        println!("pipeline_to_raw_ratio={:.2}", self.ratio);
        println!("commands={}", self.commands);
        let ms = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.1}"));
        println!(
            "window_close_to_command_p50_ms={}",
            ms(self.close_to_command_p50_ms)
        );
        println!(
            "window_close_to_command_p99_ms={}",
            ms(self.close_to_command_p99_ms)
        );
    }
}

/// Produces `records` Avro telemetry records over `segments` segments (1% of them failing)
/// into a fresh embedded cluster, then measures, over the same records, a bare rdkafka
/// consumer and the full `run` pipeline (decode, windows, policies, commands).
///
/// # Errors
/// The embedded cluster or the runtime failed, or not every record was consumed.
pub fn e2e_bench(
    records: u64,
    segments: usize,
    partitions: i32,
    rounds: usize,
) -> anyhow::Result<E2eReport> {
    let BenchTopic {
        cluster: _cluster,
        config,
        policies,
    } = bench_topic(records, segments, partitions)?;
    let bs = config.kafka.bootstrap_servers.clone();

    // Rounds of (raw, pipeline) over the same records, interleaved, each in a fresh consumer
    // group; the fastest pass of each side counts (the embedded broker shares the 2 cores).
    let mut raw_secs = f64::INFINITY;
    let mut pipeline_secs = f64::INFINITY;
    let mut report = None;
    for round in 0..rounds.max(1) {
        raw_secs = raw_secs.min(raw_pass(
            &bs,
            &config.topics.telemetry.name,
            records,
            round,
        )?);
        let mut cfg = config.clone();
        cfg.kafka.group_id = format!("bench-e2e-{round}");
        let (secs, r) = pipeline_pass(cfg, policies.clone(), records)?;
        if secs < pipeline_secs {
            pipeline_secs = secs;
        }
        report.get_or_insert(r);
    }
    let report = report.expect("at least one round");
    // The first poll includes the group join; both rates are counted from the first record.
    let events_per_sec = records as f64 / pipeline_secs;
    let raw_per_sec = records as f64 / raw_secs;
    let mut lat: Vec<f64> = report
        .close_to_command_secs
        .iter()
        .map(|s| s * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let q = |q: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * q) as usize]);
    Ok(E2eReport {
        records,
        partitions,
        segments,
        events_per_sec,
        raw_consume_per_sec: raw_per_sec,
        ratio: events_per_sec / raw_per_sec,
        commands: report.commands,
        close_to_command_p50_ms: q(0.5),
        close_to_command_p99_ms: q(0.99),
        consumed: report.records_consumed,
        aggregated: report.records_aggregated,
        dlq: report.records_dlq,
    })
}

/// Seconds a bare consumer (fresh group) takes to read `records`, from its first record.
pub(super) fn raw_pass(bs: &str, topic: &str, records: u64, round: usize) -> anyhow::Result<f64> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::time::Duration;
    let raw: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("group.id", format!("bench-raw-{round}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The fetch settings the pipeline's telemetry consumer uses.
        .set("fetch.queue.backoff.ms", "5")
        .create()?;
    raw.subscribe(&[topic])?;
    let mut n = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while n < records && Instant::now() < deadline {
        if let Some(Ok(m)) = raw.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            n += 1;
            std::hint::black_box(rdkafka::message::Message::payload(&m));
        }
    }
    anyhow::ensure!(
        n == records,
        "raw consumer read {n} of {records} records (mock retention?)"
    );
    Ok(first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64()))
}

/// Seconds the `run` pipeline takes to consume `records`, from its first record, and its report.
pub(super) fn pipeline_pass(
    config: crate::config::Config,
    policies: crate::policy::PolicySet,
    records: u64,
) -> anyhow::Result<(f64, crate::runtime::RunReport)> {
    use crate::clock::{Control, SystemClock};
    use crate::runtime::{self, RunOptions};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let control = Arc::new(Control::default());
    let core_slot: Arc<Mutex<Option<crate::runtime::SharedCore>>> = Arc::new(Mutex::new(None));
    let (c2, k2) = (control.clone(), core_slot.clone());
    let handle = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || {
            runtime::run(RunOptions {
                config,
                policies,
                policies_path: None,
                control: c2,
                clock: Arc::new(SystemClock),
                metrics: crate::metrics::Metrics::new(),
                on_admin: None,
                on_core: Some(Box::new(move |c| *k2.lock().expect("lock") = Some(c))),
            })
        })?;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let secs = loop {
        let consumed = core_slot.lock().expect("lock").as_ref().map_or(0, |c| {
            c.lock().expect("core lock").report().records_consumed
        });
        if consumed > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if consumed >= records || Instant::now() > deadline || handle.is_finished() {
            break first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let the last windows close and commands reach the broker.
    std::thread::sleep(Duration::from_secs(3));
    control.stop();
    let report = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the runtime panicked"))??;
    anyhow::ensure!(
        report.records_consumed == records,
        "pipeline consumed {} of {records} records",
        report.records_consumed
    );
    Ok((secs, report))
}

/// An embedded cluster with `records` synthetic telemetry records (event times over the last
/// 30 s, random segments, 1% of them failing) and the config and policies to process them.
pub struct BenchTopic {
    pub cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub config: crate::config::Config,
    pub policies: crate::policy::PolicySet,
}

/// Builds a [`BenchTopic`].
///
/// # Errors
/// The embedded cluster, the config or the producer failed.
pub fn bench_topic(records: u64, segments: usize, partitions: i32) -> anyhow::Result<BenchTopic> {
    bench_topic_on(None, records, segments, partitions)
}

/// Real brokers to bench on: their address, and the connection settings (TLS, SASL) of the
/// `--config` given, so every client authenticates as `segloop run` would.
pub type Broker<'a> = (&'a str, &'a crate::config::KafkaConfig);

/// A [`BenchTopic`] on the embedded cluster, or on the `broker` (topics with names of their
/// own, created through the admin API).
///
/// # Errors
/// The cluster, the config or the producer failed.
pub fn bench_topic_on(
    broker: Option<Broker<'_>>,
    records: u64,
    segments: usize,
    partitions: i32,
) -> anyhow::Result<BenchTopic> {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

    use crate::clock::{Clock, SystemClock};
    use crate::codec::{build_codec, CodecKind};
    use crate::model::TelemetryEvent;

    let bootstrap = broker.map(|b| b.0);
    let cluster = rdkafka::mocking::MockCluster::new(1)?;
    let bs = bootstrap.map_or_else(|| cluster.bootstrap_servers(), str::to_string);
    let env = std::collections::HashMap::new();
    let tag = format!("bench-{}-{}", std::process::id(), SystemClock.now_ms());
    let mut sets: Vec<String> = vec![
        format!("kafka.bootstrap_servers={bs}"),
        format!("kafka.group_id={tag}"),
        format!("kafka.partitions={partitions}"),
        "windows.size=1s".into(),
        "windows.out_of_orderness=100ms".into(),
        "windows.idle_timeout=2s".into(),
        "windows.max_clock_skew=1m".into(),
        "windows.segment_ttl=5m".into(),
        "delivery.commit_interval=1s".into(),
        "admin.listen=127.0.0.1:0".into(),
        "logging.level=warn".into(),
    ];
    if bootstrap.is_some() {
        for (t, _) in crate::config::TopicsConfig::default().all() {
            sets.push(format!("topics.{t}.name={tag}.{t}"));
        }
        sets.push("kafka.create_topics=true".into());
    }
    let mut config = crate::config::Config::load(&crate::config::Sources {
        file: None,
        env: &env,
        overrides: &sets,
    })?;
    if let Some((_, connection)) = broker {
        config.kafka.use_connection_of(connection);
    }
    if bootstrap.is_some() {
        crate::kafka::prepare_topics(&config)?;
    } else {
        crate::kafka::create_embedded_topics(&cluster, &config)?;
    }
    let policies = crate::policy::PolicySet::parse(
        r#"
[guardrails]
max_in_flight = 100000
max_actions_per_minute = 1000000
blast_radius = 1.0
max_action_staleness = "10m"
[[policies]]
name = "errors"
when = "mean(error) > 0.5 and count() >= 2"
for = 1
action = "rollback"
ack_timeout = "1h"
"#,
        "bench",
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    // Produce: event times over the last 30 s, so windows close during the run.
    let ids: Vec<String> = (0..segments.max(1))
        .map(|i| format!("r{}/svc-{}/ep-{i}", i % 4, i % 50))
        .collect();
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        crate::kafka::producer_config(
            &config,
            &[
                ("partitioner", "murmur2_random"),
                ("linger.ms", "20"),
                ("batch.num.messages", "10000"),
                ("queue.buffering.max.messages", "500000"),
            ],
        )
        .create()?;
    let codec = build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default())
        .map_err(anyhow::Error::msg)?;
    let start_ts = SystemClock.now_ms() - 30_000;
    let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
    let mut bytes = Vec::with_capacity(128);
    for i in 0..records {
        let r = rng.next();
        let seg = &ids[(r % ids.len() as u64) as usize];
        let failing = (r % ids.len() as u64) % 100 == 0;
        let e = TelemetryEvent {
            segment: seg.clone(),
            ts_ms: start_ts + (i as i64 * 30_000) / records as i64,
            measurements: BTreeMap::from([
                ("latency_ms".to_string(), 20.0 + (r >> 40) as f64 % 300.0),
                ("error".to_string(), if failing { 1.0 } else { 0.0 }),
            ]),
            labels: BTreeMap::new(),
            event_id: None,
        };
        bytes.clear();
        codec
            .encode(&e, &mut bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let rec = BaseRecord::<str, [u8]>::to(&config.topics.telemetry.name)
            .key(seg.as_str())
            .payload(&bytes);
        crate::kafka::send_waiting(&producer, rec)?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(BenchTopic {
        cluster,
        config,
        policies,
    })
}
