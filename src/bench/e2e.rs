//! `segloop bench e2e`: the whole pipeline against a bare consumer on the same topic, and the
//! bench topics it produces.

use super::*;
use std::collections::BTreeMap;

/// Figures of one end-to-end run.
#[derive(Debug, Clone)]
pub struct E2eReport {
    /// `engine.threads` of the pipeline pass (its loop thread and the shards' workers).
    pub engine_threads: usize,
    /// `embedded` or the real broker's address.
    pub broker: String,
    pub records: u64,
    pub partitions: i32,
    pub segments: usize,
    /// Segments whose events breach the bench policy.
    pub breaching: usize,
    pub events_per_sec: f64,
    pub raw_consume_per_sec: f64,
    /// The bare Java consumer, when it ran (see [`JavaConsumer`]).
    pub java_consume_per_sec: Option<f64>,
    /// Why the Java consumer did not run.
    pub java_skipped: Option<String>,
    pub commands: u64,
    /// Records the pipeline wrote to the state changelog.
    pub state_records: u64,
    /// Window close (the poll that closed it returned) → command acknowledged by the broker.
    pub close_to_command_p50_ms: Option<f64>,
    pub close_to_command_p99_ms: Option<f64>,
    /// Window close → command handed to the producer.
    pub close_to_produce_p50_ms: Option<f64>,
    pub close_to_produce_p99_ms: Option<f64>,
    pub consumed: u64,
    pub aggregated: u64,
    pub dlq: u64,
    /// CPU seconds per million events of the fastest pipeline pass, by thread group.
    pub cpu_per_million: Vec<(String, f64)>,
    /// The process's peak resident set (VmHWM), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Rust heap the pipeline held per segment once every record was read (windows, controller,
    /// labels; librdkafka's buffers are C heap and not in it). Bench builds only
    /// (`--features counting-alloc`).
    pub heap_bytes_per_segment: Option<f64>,
}

impl E2eReport {
    pub fn print(&self) {
        println!("bench=e2e");
        println!("broker={}", self.broker);
        println!("records={}", self.records);
        println!("partitions={}", self.partitions);
        println!("segments={}", self.segments);
        println!("engine_threads={}", self.engine_threads);
        println!("breaching_segments={}", self.breaching);
        println!("consumed={}", self.consumed);
        println!("aggregated={}", self.aggregated);
        println!("dlq={}", self.dlq);
        println!("events_per_sec={:.0}", self.events_per_sec);
        println!("raw_consume_per_sec={:.0}", self.raw_consume_per_sec);
        print_java(
            self.events_per_sec,
            self.java_consume_per_sec,
            self.java_skipped.as_deref(),
            "raw_ratio",
        );
        println!(
            "raw_ratio={:.2}",
            self.events_per_sec / self.raw_consume_per_sec
        );
        for (group, secs) in &self.cpu_per_million {
            println!("cpu_secs_per_million_events.{group}={secs:.3}");
        }
        match self.peak_rss_bytes {
            Some(b) => println!("peak_rss_bytes={b}"),
            None => println!("peak_rss_bytes=unknown"),
        }
        match self.heap_bytes_per_segment {
            Some(b) => println!("pipeline_heap_bytes_per_segment={b:.0}"),
            None => println!("pipeline_heap_bytes_per_segment=unmeasured (a bench build measures it: cargo build --release --features counting-alloc)"),
        }
        println!("commands={}", self.commands);
        println!("state_records={}", self.state_records);
        let ms = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.1}"));
        println!(
            "window_close_to_command_p50_ms={}",
            ms(self.close_to_command_p50_ms)
        );
        println!(
            "window_close_to_command_p99_ms={}",
            ms(self.close_to_command_p99_ms)
        );
        println!(
            "window_close_to_produce_p50_ms={}",
            ms(self.close_to_produce_p50_ms)
        );
        println!(
            "window_close_to_produce_p99_ms={}",
            ms(self.close_to_produce_p99_ms)
        );
    }
}

/// What `segloop bench e2e` runs on and how.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    pub records: u64,
    pub segments: usize,
    pub partitions: i32,
    pub rounds: usize,
    /// The fraction of segments whose events breach the bench policy.
    pub breaching: f64,
    /// The bare Java consumer, or why it cannot run.
    pub java: Result<JavaConsumer, String>,
    /// `engine.threads` of the pipeline pass (`None`: the config's default).
    pub threads: Option<usize>,
}

/// Produces `records` Avro telemetry records over `segments` segments (a `breaching` share of
/// them failing) on the embedded cluster or on `broker`, then reads the same records in
/// interleaved rounds, each in fresh groups: with a bare rdkafka consumer (the pipeline's
/// fetch settings), with a bare Java consumer (when it can run), and with the full `run`
/// pipeline (decode, windows, policies, controller, commands produced and acknowledged).
///
/// # Errors
/// The cluster or the runtime failed, or a pass did not read every record.
pub fn e2e_bench(broker: Option<Broker<'_>>, o: &E2eOptions) -> anyhow::Result<E2eReport> {
    let BenchTopic {
        cluster: _cluster,
        config,
        policies,
        breaching,
        _made: _topics_deleted_at_the_end,
    } = bench_topic_on(broker, o.records, o.segments, o.partitions, o.breaching)?;
    let bs = config.kafka.bootstrap_servers.clone();
    let topic = config.topics.telemetry.name.clone();
    let records = o.records;

    // The fastest pass of each side counts (the broker shares the 2 cores).
    let mut raw_secs = f64::INFINITY;
    let mut java_secs = f64::INFINITY;
    let mut java_skipped = o.java.as_ref().err().cloned();
    let mut pipeline_secs = f64::INFINITY;
    let mut heap_per_segment = None;
    let mut report = None;
    let mut cpu = Vec::new();
    for round in 0..o.rounds.max(1) {
        raw_secs = raw_secs.min(raw_pass(&bs, &topic, records, round)?);
        if let (Ok(java), None) = (&o.java, &java_skipped) {
            match java.pass(
                &bs,
                &topic,
                &format!("{}-java-{round}", config.kafka.group_id),
                records,
            ) {
                Ok(secs) => java_secs = java_secs.min(secs),
                Err(e) => java_skipped = Some(format!("{e:#}")),
            }
        }
        let mut cfg = config.clone();
        cfg.kafka.group_id = format!("{}-e2e-{round}", config.kafka.group_id);
        if let Some(n) = o.threads {
            cfg.engine.threads = n;
        }
        let (secs, r, threads, heap) = pipeline_pass(cfg, policies.clone(), records)?;
        heap_per_segment = heap.map(|b| b as f64 / o.segments.max(1) as f64);
        if secs < pipeline_secs {
            pipeline_secs = secs;
            cpu = threads;
        }
        report.get_or_insert(r);
    }
    let report = report.expect("at least one round");
    // Rates are counted from each pass's first record (the first poll includes the join).
    let events_per_sec = records as f64 / pipeline_secs;
    let quantiles = |secs: &[f64]| {
        let mut ms: Vec<f64> = secs.iter().map(|s| s * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let q = |q: f64| (!ms.is_empty()).then(|| ms[((ms.len() - 1) as f64 * q) as usize]);
        (q(0.5), q(0.99))
    };
    let (acked50, acked99) = quantiles(&report.close_to_command_secs);
    let (handed50, handed99) = quantiles(&report.close_to_produce_secs);
    Ok(E2eReport {
        broker: broker.map_or_else(|| "embedded".to_string(), |b| b.0.to_string()),
        records,
        partitions: o.partitions,
        segments: o.segments,
        engine_threads: crate::config::EngineConfig {
            threads: o.threads.unwrap_or(config.engine.threads),
        }
        .effective_threads(),
        breaching,
        events_per_sec,
        raw_consume_per_sec: records as f64 / raw_secs,
        java_consume_per_sec: java_skipped
            .is_none()
            .then(|| records as f64 / java_secs)
            .filter(|r| r.is_finite()),
        java_skipped,
        commands: report.commands,
        state_records: report.state_records,
        close_to_command_p50_ms: acked50,
        close_to_command_p99_ms: acked99,
        close_to_produce_p50_ms: handed50,
        close_to_produce_p99_ms: handed99,
        consumed: report.records_consumed,
        aggregated: report.records_aggregated,
        dlq: report.records_dlq,
        cpu_per_million: cpu
            .into_iter()
            .map(|(g, secs)| (g, secs / (records as f64 / 1e6)))
            .collect(),
        peak_rss_bytes: peak_rss(),
        heap_bytes_per_segment: heap_per_segment,
    })
}

/// A bare Java consumer (`benches/java/Consume.java`, run in source-file mode with the Kafka
/// client jars): the ceiling the throughput targets are stated against.
#[derive(Debug, Clone)]
pub struct JavaConsumer {
    /// A directory holding the Kafka client jars (e.g. `scripts/kafka/target/kafka-libs`).
    pub classpath: std::path::PathBuf,
}

/// The Java consumer's source, written next to a run's files.
const JAVA_CONSUMER: &str = include_str!("../../benches/java/Consume.java");

impl JavaConsumer {
    /// The jars given, or those `scripts/kafka.sh` fetched, looked for from the working
    /// directory and from the binary's (`target/<profile>/segloop` in a checkout); `None`
    /// when there are none or `java` is not installed.
    pub fn find(given: Option<&std::path::Path>) -> Result<JavaConsumer, String> {
        let has_jars = |d: &std::path::Path| {
            std::fs::read_dir(d).is_ok_and(|mut e| {
                e.any(|f| {
                    f.is_ok_and(|f| f.file_name().to_string_lossy().starts_with("kafka-clients"))
                })
            })
        };
        let java = std::process::Command::new("java")
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !java {
            return Err("java is not installed".into());
        }
        if let Some(d) = given {
            return if has_jars(d) {
                Ok(JavaConsumer {
                    classpath: d.to_path_buf(),
                })
            } else {
                Err(format!("no kafka-clients jar in {}", d.display()))
            };
        }
        let rel = std::path::Path::new("scripts/kafka/target/kafka-libs");
        let mut roots = vec![std::env::current_dir().unwrap_or_default()];
        if let Ok(exe) = std::env::current_exe() {
            roots.extend(
                exe.ancestors()
                    .skip(1)
                    .take(4)
                    .map(std::path::Path::to_path_buf),
            );
        }
        roots
            .into_iter()
            .map(|r| r.join(rel))
            .find(|d| has_jars(d))
            .map(|classpath| JavaConsumer { classpath })
            .ok_or_else(|| {
                "no Kafka client jars found (scripts/kafka.sh fetches them): pass --java-classpath"
                    .into()
            })
    }

    /// Seconds the Java consumer takes to read `records` of `topic` in group `group` at its
    /// steady rate (from its N/10th record on).
    pub(super) fn pass(
        &self,
        bs: &str,
        topic: &str,
        group: &str,
        records: u64,
    ) -> anyhow::Result<f64> {
        let dir = std::env::temp_dir().join(format!("segloop-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let source = dir.join("Consume.java");
        std::fs::write(&source, JAVA_CONSUMER)?;
        let out = std::process::Command::new("java")
            .arg("-cp")
            .arg(format!("{}/*", self.classpath.display()))
            .arg(&source)
            .args([bs, topic, group, &records.to_string()])
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "the Java consumer failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        let field = |name: &str| {
            stdout
                .split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let read = field("records=").unwrap_or(0.0) as u64;
        anyhow::ensure!(
            read == records,
            "the Java consumer read {read} of {records} records"
        );
        // Its steady rate (after the JIT compiled the loop), as the time for all records: the
        // higher ceiling, so the ratio is not flattered by the JVM's warm-up.
        match (field("steady_records="), field("steady_secs=")) {
            (Some(n), Some(secs)) if n > 0.0 && secs > 0.0 => Ok(secs * records as f64 / n),
            _ => field("secs=")
                .ok_or_else(|| anyhow::anyhow!("the Java consumer printed no time: {stdout}")),
        }
    }
}

/// CPU seconds per thread group of this process so far: `pipeline` (the runtime's loop),
/// `librdkafka` (its `rdk:` threads) and `other`, from `/proc/self/task`.
fn thread_cpu() -> BTreeMap<u32, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (name, secs) = stat_cpu(&stat);
        // The loop thread and the shards' workers (`engine.threads`).
        let group = if name == "pipeline" || name.starts_with("shard-") {
            "pipeline"
        } else if name.starts_with("rdk:") {
            "librdkafka"
        } else {
            "other"
        };
        out.insert(tid, (group.to_string(), secs));
    }
    out
}

/// CPU seconds by thread group.
pub(super) type ThreadCpu = Vec<(String, f64)>;

/// The CPU each thread group used between two [`thread_cpu`] snapshots (threads started
/// meanwhile count from zero).
fn cpu_between(
    before: &BTreeMap<u32, (String, f64)>,
    after: &BTreeMap<u32, (String, f64)>,
) -> ThreadCpu {
    let mut groups: BTreeMap<String, f64> = BTreeMap::new();
    for (tid, (group, secs)) in after {
        let was = before.get(tid).map_or(0.0, |b| b.1);
        *groups.entry(group.clone()).or_default() += secs - was;
    }
    groups.into_iter().collect()
}

/// The process's peak resident set size (`VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
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

/// Seconds the `run` pipeline takes to consume `records`, from its first record, its report,
/// the CPU of its threads, and (bench builds) the heap it grew by until every record was read.
pub(super) fn pipeline_pass(
    config: crate::config::Config,
    policies: crate::policy::PolicySet,
    records: u64,
) -> anyhow::Result<(f64, crate::runtime::RunReport, ThreadCpu, Option<isize>)> {
    use crate::clock::{Control, SystemClock};
    use crate::runtime::{self, RunOptions};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let control = Arc::new(Control::default());
    let cpu_before = thread_cpu();
    let heap_before = super::allocated_bytes();
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
    // The CPU of the pass's threads, read while they are alive; the heap while it holds every
    // segment.
    let cpu = cpu_between(&cpu_before, &thread_cpu());
    let heap = super::allocated_bytes()
        .zip(heap_before)
        .map(|(after, before)| after - before);
    // Let the last windows close (the idle advance, once two lag measurements found every
    // partition read to its end) and the commands reach the broker. A fixed 3 s raced the
    // idle advance: a command of the last windows was in some runs and not in others.
    let settle = Instant::now() + Duration::from_secs(20);
    while Instant::now() < settle && !handle.is_finished() {
        let open = core_slot.lock().expect("lock").as_ref().map_or(0, |c| {
            c.lock()
                .expect("core lock")
                .pipeline
                .engine_stats()
                .open_events
        });
        if open == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    control.stop();
    let report = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the runtime panicked"))??;
    anyhow::ensure!(
        report.records_consumed == records,
        "pipeline consumed {} of {records} records",
        report.records_consumed
    );
    Ok((secs, report, cpu, heap))
}

/// An embedded cluster with `records` synthetic telemetry records (event times over the last
/// 30 s, random segments, 1% of them failing) and the config and policies to process them.
/// On a real broker, the topics made for it are deleted when it is dropped: a bench run
/// leaves nothing behind on the user's cluster (each run wrote hundreds of megabytes).
pub struct BenchTopic {
    pub cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub config: crate::config::Config,
    pub policies: crate::policy::PolicySet,
    /// Segments whose events breach the policy.
    pub breaching: usize,
    /// The topics made on a real broker, deleted on drop.
    _made: MadeTopics,
}

/// Topics a bench made on a real broker: deleted when dropped (also when the bench fails
/// after making them).
struct MadeTopics(Option<crate::config::Config>);

impl Drop for MadeTopics {
    fn drop(&mut self) {
        let Some(config) = &self.0 else { return };
        let names: Vec<&str> = (config.topics.all().into_iter())
            .map(|(_, t)| t.name.as_str())
            .collect();
        if let Err(e) = crate::kafka::delete_topics(config, &names) {
            eprintln!(
                "warning: the bench's topics stay on the broker ({}): {e:#}",
                names.join(", ")
            );
        }
    }
}

/// Builds a [`BenchTopic`].
///
/// # Errors
/// The embedded cluster, the config or the producer failed.
pub fn bench_topic(records: u64, segments: usize, partitions: i32) -> anyhow::Result<BenchTopic> {
    bench_topic_on(None, records, segments, partitions, 0.01)
}

/// Real brokers to bench on: their address, and the connection settings (TLS, SASL) of the
/// `--config` given, so every client authenticates as `segloop run` would.
pub type Broker<'a> = (&'a str, &'a crate::config::KafkaConfig);

/// A [`BenchTopic`] on the embedded cluster, or on the `broker` (topics with names of their
/// own, created through the admin API); a `breaching` share of the segments fail.
///
/// # Errors
/// The cluster, the config or the producer failed.
pub fn bench_topic_on(
    broker: Option<Broker<'_>>,
    records: u64,
    segments: usize,
    partitions: i32,
    breaching: f64,
) -> anyhow::Result<BenchTopic> {
    use std::time::Duration;

    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

    use crate::clock::{Clock, SystemClock};

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
    let mut made = MadeTopics(None);
    if bootstrap.is_some() {
        made = MadeTopics(Some(config.clone()));
        crate::kafka::prepare_topics(&config)?;
    } else {
        crate::kafka::create_embedded_topics(&cluster, &config)?;
    }
    let policies = bench_policies()?;
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
    // Event times over the last 30 s, so windows close during the run.
    let start_ts = SystemClock.now_ms() - 30_000;
    let breaching = bench_events(records, segments, breaching, start_ts, |seg, bytes| {
        let rec = BaseRecord::<str, [u8]>::to(&config.topics.telemetry.name)
            .key(seg)
            .payload(bytes);
        Ok(crate::kafka::send_waiting(&producer, rec)?)
    })?;
    producer.flush(Duration::from_secs(60))?;
    Ok(BenchTopic {
        cluster,
        config,
        policies,
        breaching,
        _made: made,
    })
}

/// The benches' policy: a command for a window whose mean error is over 0.5 (limits that
/// never bind).
pub(super) fn bench_policies() -> anyhow::Result<crate::policy::PolicySet> {
    crate::policy::PolicySet::parse(
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
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The benches' telemetry: `records` Avro records (single-object encoding) over `segments`
/// segments picked at random, event times spread over 30 s from `start_ts`, every
/// `1/breaching`-th segment failing; each handed to `each` with its segment. Returns how many
/// segments fail.
pub(super) fn bench_events(
    records: u64,
    segments: usize,
    breaching: f64,
    start_ts: i64,
    mut each: impl FnMut(&str, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    use crate::codec::{build_codec, CodecKind};
    use crate::model::TelemetryEvent;
    let ids: Vec<String> = (0..segments.max(1))
        .map(|i| format!("r{}/svc-{}/ep-{i}", i % 4, i % 50))
        .collect();
    let codec = build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default())
        .map_err(anyhow::Error::msg)?;
    let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
    let mut bytes = Vec::with_capacity(128);
    // Every `stride`-th segment breaches.
    let stride = if breaching > 0.0 {
        (1.0 / breaching.min(1.0)).round().max(1.0) as u64
    } else {
        u64::MAX
    };
    for i in 0..records {
        let r = rng.next();
        let seg = &ids[(r % ids.len() as u64) as usize];
        let failing = (r % ids.len() as u64) % stride == 0;
        let e = TelemetryEvent {
            segment: seg.clone(),
            ts_ms: start_ts + (i as i64 * 30_000) / records.max(1) as i64,
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
        each(seg, &bytes)?;
    }
    Ok(ids
        .len()
        .div_ceil(usize::try_from(stride).unwrap_or(usize::MAX)))
}
