//! Helpers shared by the runtime suites (embedded mock cluster and real Kafka).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use segloop::clock::{Clock, Control, SystemClock};
use segloop::codec::{build_codec, CodecKind};
use segloop::config::{Config, Sources};
use segloop::model::{
    DecisionRecord, OutcomeStatus, RemediationCommand, RemediationOutcome, TelemetryEvent,
};
use segloop::policy::PolicySet;
use segloop::runtime::{self, RunOptions, RunReport};

pub const POLICIES: &str = r#"
[guardrails]
max_in_flight = 100
max_actions_per_minute = 600
blast_radius = 1.0
max_action_staleness = "30s"

[[policies]]
name = "errors"
when = "mean(error) > 0.5 and count() >= 3"
for = 1
clear_for = 1
action = "rollback"
ack_timeout = "2s"
verify_within = "5s"
max_attempts = 2
backoff = "300ms"
backoff_max = "1s"
escalate = "page"
"#;

pub fn config(bootstrap: &str, group: &str) -> Config {
    config_with(bootstrap, group, &[])
}

/// The test config with extra `--set` overrides (e.g. unique topic names on a shared broker).
pub fn config_with(bootstrap: &str, group: &str, extra: &[String]) -> Config {
    let env = std::collections::HashMap::new();
    let sets: Vec<String> = [
        format!("kafka.bootstrap_servers={bootstrap}"),
        format!("kafka.group_id={group}"),
        "kafka.create_topics=false".into(),
        "kafka.partitions=2".into(),
        // Two shards (the default is one): every runtime test runs the sharded pipeline, one
        // partition per shard, its second shard on a worker thread.
        "engine.threads=2".into(),
        "windows.size=1s".into(),
        "windows.out_of_orderness=100ms".into(),
        "windows.idle_timeout=1s".into(),
        "windows.max_clock_skew=10s".into(),
        "windows.segment_ttl=30s".into(),
        "delivery.commit_interval=200ms".into(),
        "delivery.shutdown_timeout=5s".into(),
        "admin.listen=127.0.0.1:0".into(),
        "kafka.properties.\"session.timeout.ms\"=6000".into(),
        "kafka.properties.\"heartbeat.interval.ms\"=500".into(),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .collect();
    let c = Config::load(&Sources {
        file: None,
        env: &env,
        overrides: &sets,
    })
    .unwrap();
    assert_eq!(
        c.kafka.librdkafka_properties()["session.timeout.ms"],
        "6000"
    );
    let mut c = c;
    c.admin.token = Some(segloop::config::Secret::new(ADMIN_TOKEN));
    c
}

/// The admin token of the in-process test instances ([`http`] sends it).
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub struct Instance {
    control: Arc<Control>,
    admin: Arc<Mutex<Option<std::net::SocketAddr>>>,
    core: Arc<Mutex<Option<runtime::SharedCore>>>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<RunReport>>>,
}

impl Instance {
    pub fn start(config: Config) -> Instance {
        Instance::start_with(config, POLICIES)
    }

    /// An instance under `policies` (TOML).
    pub fn start_with(config: Config, policies: &str) -> Instance {
        let policies = PolicySet::parse(policies, "test").unwrap();
        let control = Arc::new(Control::default());
        let admin = Arc::new(Mutex::new(None));
        let core = Arc::new(Mutex::new(None));
        let (c2, a2, k2) = (control.clone(), admin.clone(), core.clone());
        let handle = std::thread::spawn(move || {
            runtime::run(RunOptions {
                config,
                policies,
                policies_path: None,
                control: c2,
                clock: Arc::new(SystemClock),
                metrics: segloop::metrics::Metrics::new(),
                on_admin: Some(Box::new(move |addr| *a2.lock().unwrap() = Some(addr))),
                on_core: Some(Box::new(move |c| *k2.lock().unwrap() = Some(c))),
            })
        });
        Instance {
            control,
            admin,
            core,
            handle: Some(handle),
        }
    }

    pub fn admin(&mut self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(a) = *self.admin.lock().unwrap() {
                return a;
            }
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let r = self.handle.take().unwrap().join().unwrap();
                panic!("the runtime ended before listening: {r:?}");
            }
            assert!(Instant::now() < deadline, "admin never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn assigned(&self) -> Vec<i32> {
        self.core
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.lock().unwrap().pipeline.assigned().to_vec())
            .unwrap_or_default()
    }

    /// Per assigned partition its shard, and per shard the events its windows accepted.
    pub fn shards(&self) -> (Vec<(i32, Option<usize>)>, Vec<u64>) {
        self.core
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| {
                let core = c.lock().unwrap();
                let p = &core.pipeline;
                (
                    p.assigned().iter().map(|q| (*q, p.shard_of(*q))).collect(),
                    p.shard_engine_stats().iter().map(|e| e.accepted).collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Other live instances this one has seen on the control topic.
    pub fn peers(&self) -> usize {
        use segloop::clock::Clock;
        let now = segloop::clock::SystemClock.now_ms();
        self.core
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|c| {
                let core = c.lock().unwrap();
                core.pipeline.controller().cluster().map(|x| x.peers(now))
            })
            .unwrap_or(0)
    }

    /// Runs `f` while holding the engine's lock (the loop and rebalances wait meanwhile).
    pub fn hold_engine<R>(&self, f: impl FnOnce() -> R) -> R {
        let core = self
            .core
            .lock()
            .unwrap()
            .clone()
            .expect("the runtime shared its core");
        let _held = core.lock().unwrap();
        f()
    }

    pub fn stop(self) -> RunReport {
        self.stop_result().unwrap()
    }

    /// Stops the instance and returns how its run ended (an error: it stopped on its own).
    pub fn stop_result(mut self) -> anyhow::Result<RunReport> {
        self.control.stop();
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Waits until two instances of one group own one partition each (a 2-partition topic).
pub fn wait_split(a: &Instance, b: &Instance, within: Duration) {
    let deadline = Instant::now() + within;
    while !(a.assigned().len() == 1 && b.assigned().len() == 1) {
        assert!(
            Instant::now() < deadline,
            "no split: a={:?} b={:?}",
            a.assigned(),
            b.assigned()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A producer placing keys as Java clients do. Idempotent: the tests write each segment's events
/// in event-time order and expect them in that order; without idempotence a retried first batch
/// (a topic created a moment ago answers "not leader" under load) lands after the second, and
/// its events arrive late (a CI run lost 26 of 60 that way).
pub fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

pub fn telemetry(p: &BaseProducer, topic: &str, seg: &str, ts: i64, error: f64) {
    let codec =
        build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default()).unwrap();
    let e = TelemetryEvent {
        segment: seg.into(),
        ts_ms: ts,
        measurements: BTreeMap::from([("error".into(), error), ("latency_ms".into(), 20.0)]),
        labels: BTreeMap::new(),
        event_id: None,
    };
    let mut bytes = Vec::new();
    codec.encode(&e, &mut bytes).unwrap();
    p.send(BaseRecord::to(topic).key(seg).payload(&bytes))
        .unwrap();
}

pub fn outcome(
    p: &BaseProducer,
    topic: &str,
    cmd: &RemediationCommand,
    status: OutcomeStatus,
    partition: Option<i32>,
) {
    let codec = build_codec::<RemediationOutcome>(CodecKind::AvroSingleObject, &Default::default())
        .unwrap();
    let o = RemediationOutcome {
        command_id: cmd.command_id.clone(),
        segment: cmd.segment.clone(),
        status,
        ts_ms: SystemClock.now_ms(),
        actuator: "test".into(),
        message: None,
    };
    let mut bytes = Vec::new();
    codec.encode(&o, &mut bytes).unwrap();
    let mut r = BaseRecord::to(topic).key(&cmd.segment).payload(&bytes);
    if let Some(part) = partition {
        r = r.partition(part);
    }
    p.send(r).unwrap();
    p.flush(Duration::from_secs(15)).unwrap();
}

/// Reads a topic from the beginning (every partition).
pub struct Reader {
    c: BaseConsumer,
}

impl Reader {
    pub fn new(bootstrap: &str, topic: &str, partitions: i32) -> Reader {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        Reader { c }
    }

    /// Polls until `f` returns Some or the timeout passes, while `tick` runs in between.
    pub fn until<T>(
        &self,
        timeout: Duration,
        mut tick: impl FnMut(),
        mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            tick();
            while let Some(Ok(m)) = self.c.poll(Duration::from_millis(20)) {
                if let Some(t) = f(&m) {
                    return Some(t);
                }
            }
        }
        None
    }
}

pub fn decode_command(bytes: &[u8]) -> RemediationCommand {
    build_codec::<RemediationCommand>(CodecKind::AvroSingleObject, &Default::default())
        .unwrap()
        .decode(bytes)
        .unwrap()
}

pub fn decode_decision(bytes: &[u8]) -> DecisionRecord {
    build_codec::<DecisionRecord>(CodecKind::AvroSingleObject, &Default::default())
        .unwrap()
        .decode(bytes)
        .unwrap()
}

/// The real broker's address: `SEGLOOP_KAFKA_BOOTSTRAP`, or the file `scripts/kafka.sh`
/// writes (in `$SEGLOOP_KAFKA_DIR`, default `/tmp/segloop-kafka`).
pub fn broker_bootstrap() -> String {
    if let Ok(b) = std::env::var("SEGLOOP_KAFKA_BOOTSTRAP") {
        return b;
    }
    let dir = std::env::var("SEGLOOP_KAFKA_DIR").unwrap_or_else(|_| "/tmp/segloop-kafka".into());
    std::fs::read_to_string(format!("{dir}/bootstrap"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            panic!("no Kafka broker: run scripts/kafka.sh start (or set SEGLOOP_KAFKA_BOOTSTRAP)")
        })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` of a process: the value of an unlabelled counter.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `GET /readyz` of a process: its assigned partitions.
pub fn assigned_of(port: u16) -> Vec<i64> {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return Vec::new();
    };
    let _ = write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("{}");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["assigned"].as_array().cloned())
        .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
        .unwrap_or_default()
}

/// A `segloop run` config file for a process on a real broker: topics `rk.<tag>.*` created
/// by segloop (2 partitions), two shards (`engine.threads`), 1 s windows, the test policies
/// (written next to it) with a 15 s ack timeout, admin on `port`; `extra` is appended (e.g. a
/// `[delivery]` table).
///
/// The process tests kill, stop or move a process with a command in flight and then
/// acknowledge it: the ack must reach the command they saw. With the 2 s timeout of the
/// in-process tests, a loaded machine sometimes retried before the kill, and the ack then went
/// to a superseded attempt.
pub fn process_config(
    dir: &std::path::Path,
    bs: &str,
    tag: &str,
    port: u16,
    delivery: &str,
) -> std::path::PathBuf {
    let policies = POLICIES.replace("ack_timeout = \"2s\"", "ack_timeout = \"15s\"");
    assert_ne!(policies, POLICIES, "the test policies name an ack_timeout");
    std::fs::write(dir.join("policies.toml"), policies).unwrap();
    let path = dir.join(format!("segloop-{port}.toml"));
    let topics: String = segloop::config::TopicsConfig::default()
        .all()
        .iter()
        .map(|(t, _)| format!("[topics.{t}]\nname = \"rk.{tag}.{t}\"\n"))
        .collect();
    std::fs::write(
        &path,
        format!(
            "policies = \"policies.toml\"\n[kafka]\nbootstrap_servers = \"{bs}\"\ngroup_id = \"g-{tag}\"\n\
             client_id = \"segloop-{port}\"\ncreate_topics = true\npartitions = 2\n[kafka.properties]\n\
             \"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n[engine]\nthreads = 2\n[windows]\nsize = \"1s\"\n\
             out_of_orderness = \"100ms\"\nidle_timeout = \"1s\"\nmax_clock_skew = \"10s\"\nsegment_ttl = \"30s\"\n\
             [delivery]\ncommit_interval = \"200ms\"\nshutdown_timeout = \"5s\"\n{delivery}\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\n[logging]\nlevel = \"warn\"\n{topics}"
        ),
    )
    .unwrap();
    path
}

/// A `segloop run` process, killed when dropped (a failing test leaves none behind).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

pub fn spawn(config: &std::path::Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

pub fn wait_assigned(port: u16, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while assigned_of(port).len() != n {
        assert!(
            Instant::now() < deadline,
            "the process on {port} never owned {n} partition(s)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
}

/// A consumer of both partitions of `topic` from the beginning, committed records only.
pub fn from_beginning(bs: &str, topic: &str) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("group.id", "read-all")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

/// Every record of a topic (committed records only), read until 2 s pass without one.
pub fn read_all<T>(bs: &str, topic: &str, mut decode: impl FnMut(&[u8]) -> Option<T>) -> Vec<T> {
    let c = from_beginning(bs, topic);
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            last = Instant::now();
            if let Some(t) = m.payload().and_then(&mut decode) {
                out.push(t);
            }
        }
    }
    out
}

/// The loop on a broker, end to end: an instance of `config` runs; the test feeds `<prefix>/ok`
/// and `<prefix>/bad` (failing) through the plaintext listener at `data_bs`, waits for the
/// command for `<prefix>/bad`, answers ACCEPTED and APPLIED (on partitions of its own choosing),
/// feeds healthy telemetry until the loop is resolved, and stops the instance.
pub fn close_the_loop(config: Config, data_bs: &str, prefix: &str) -> RunReport {
    let t = config.topics.clone();
    let mut inst = Instance::start(config);
    inst.admin();
    let p = producer(data_bs);
    let (ok, bad) = (format!("{prefix}/ok"), format!("{prefix}/bad"));
    let error = std::cell::Cell::new(1.0);
    let feed = || {
        let now = SystemClock.now_ms();
        telemetry(&p, &t.telemetry.name, &ok, now, 0.0);
        telemetry(&p, &t.telemetry.name, &bad, now, error.get());
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    };
    let cmd = Reader::new(data_bs, &t.actions.name, 2)
        .until(Duration::from_secs(60), feed, |m| {
            Some(decode_command(rdkafka::message::Message::payload(m)?))
        })
        .expect("a command for the failing segment");
    assert_eq!(cmd.segment, bad);
    outcome(&p, &t.outcomes.name, &cmd, OutcomeStatus::Accepted, Some(1));
    outcome(&p, &t.outcomes.name, &cmd, OutcomeStatus::Applied, Some(0));
    error.set(0.0);
    let resolved =
        Reader::new(data_bs, &t.decisions.name, 2).until(Duration::from_secs(30), feed, |m| {
            let d = decode_decision(rdkafka::message::Message::payload(m)?);
            (d.segment == bad && d.to_state == "resolved").then_some(d)
        });
    assert!(resolved.is_some(), "verified after APPLIED");
    inst.stop()
}

/// Runs a single-file Java program of `tests/java` with the Kafka jars, `stdin` fed to it.
pub fn java(program: &str, args: &[&str], stdin: &str) -> std::process::Output {
    let libs = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/kafka/target/kafka-libs/*"
    );
    let src = format!("{}/tests/java/{program}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("java")
        .args(["-cp", libs, &src])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("java should run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `/readyz` of a standby (more members than partitions) is 200, and an instance restarted with
/// no new traffic is ready: a partition with no position yet counts as caught up, not as the
/// whole topic behind. `one(group)`: the config of a member of `group`, on a one-partition
/// telemetry topic that exists.
pub fn a_standby_and_a_quiet_restart_are_ready(bs: &str, one: impl Fn(&str) -> Config) {
    let telemetry_topic = one("setup").topics.telemetry.name;
    // More than READY_MAX_LAG records, all consumed and committed by a first instance.
    let p = producer(bs);
    let now = SystemClock.now_ms();
    for i in 0..1_500 {
        telemetry(&p, &telemetry_topic, &format!("q/s-{}", i % 20), now, 0.0);
    }
    p.flush(Duration::from_secs(15)).unwrap();
    let ready = |admin| {
        let (status, body) = http(admin, "GET", "/readyz", "");
        (status, body)
    };
    let mut first = Instance::start(one("g-ready"));
    let admin = first.admin();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(admin).0 != 200 {
        assert!(Instant::now() < deadline, "{}", ready(admin).1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = first.stop();
    assert_eq!(report.records_consumed, 1_500);

    // The restart: no new records.
    let mut a = Instance::start(one("g-ready"));
    let admin_a = a.admin();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = ready(admin_a);
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready after a quiet restart: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second member joins a group with one partition: after the rebalance one of the two
    // (either may keep the partition) is a standby, and both are ready.
    let mut b = Instance::start(one("g-ready"));
    let admin_b = b.admin();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (sa, ba) = ready(admin_a);
        let (sb, bb) = ready(admin_b);
        let standbys = [&ba, &bb]
            .iter()
            .filter(|b| b.contains("\"standby\": true"))
            .count();
        if sa == 200 && sb == 200 && standbys == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ready standby: a {sa} {ba}\nb {sb} {bb}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    b.stop();
    a.stop();
}

/// The reference actuator never runs a command past its ack deadline (it answers REJECTED,
/// `expired`), and one started with a new group id does not run again what the outcomes topic
/// shows answered: idempotence survives restarts. `cfg`: topics that exist on `bs`.
pub fn the_actuator_skips_expired_and_already_answered_commands(bs: &str, cfg: Config) {
    let t = cfg.topics.clone();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran.log");
    let codec = build_codec::<RemediationCommand>(CodecKind::AvroSingleObject, &Default::default())
        .unwrap();
    let now = SystemClock.now_ms();
    let command = |id: &str, deadline: i64| RemediationCommand {
        command_id: id.into(),
        segment: format!("act/{id}"),
        policy: "errors".into(),
        policy_version: 1,
        action: "rollback".into(),
        params: Default::default(),
        attempt: 1,
        issued_at_ms: now - 60_000,
        ack_deadline_ms: deadline,
        reason: segloop::model::CommandReason {
            condition: "mean(error) > 0.5".into(),
            metric: "mean(error)".into(),
            observed: 1.0,
            threshold: 0.5,
            window_start_ms: now - 70_000,
            window_end_ms: now - 60_000,
        },
        dry_run: false,
    };
    let p = producer(bs);
    let answered = command("answered", now + 600_000);
    for c in [
        command("expired", now - 1_000),
        answered.clone(),
        command("fresh", now + 600_000),
    ] {
        let mut bytes = Vec::new();
        codec.encode(&c, &mut bytes).unwrap();
        p.send(
            rdkafka::producer::BaseRecord::to(&t.actions.name)
                .key(&c.segment)
                .payload(&bytes),
        )
        .unwrap();
    }
    // Another actuator already applied `answered`.
    outcome(
        &p,
        &t.outcomes.name,
        &answered,
        OutcomeStatus::Applied,
        None,
    );
    p.flush(Duration::from_secs(15)).unwrap();

    let mut act_cfg = cfg.clone();
    act_cfg.actuator.group_id = "a-brand-new-group".into();
    act_cfg.actuator.shell.insert(
        "rollback".into(),
        format!("echo \"$SEGLOOP_COMMAND_ID\" >> {}", log.display()),
    );
    let stop = Arc::new(Control::default());
    let (s2, seen) = (stop.clone(), Arc::new(std::sync::Mutex::new(0usize)));
    let seen2 = seen.clone();
    let actuator = std::thread::spawn(move || {
        let handler = Arc::new(segloop::actuator::ConfiguredHandler::new(
            act_cfg.actuator.clone(),
        ));
        segloop::actuator::run(&act_cfg, handler, s2, |_| *seen2.lock().unwrap() += 1)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while *seen.lock().unwrap() < 3 {
        assert!(
            Instant::now() < deadline,
            "the actuator never read the commands"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.stop();
    let report = actuator.join().unwrap().unwrap();
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        ran.trim(),
        "fresh",
        "only the fresh command ran: {report:?}"
    );
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(report.answered_before, 1, "{report:?}");
    // The expired one was answered REJECTED, with the reason.
    let outcomes = Reader::new(bs, &t.outcomes.name, 2);
    let rejected = outcomes.until(
        Duration::from_secs(10),
        || {},
        |m| {
            let o = build_codec::<segloop::model::RemediationOutcome>(
                CodecKind::AvroSingleObject,
                &Default::default(),
            )
            .unwrap()
            .decode(m.payload()?)
            .ok()?;
            (o.command_id == "expired" && o.status == OutcomeStatus::Rejected).then_some(o)
        },
    );
    let rejected = rejected.expect("an outcome for the expired command");
    assert!(rejected.message.unwrap_or_default().starts_with("expired"));
}
