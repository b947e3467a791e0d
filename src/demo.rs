//! `segloop demo`: the whole loop on an embedded Kafka (librdkafka's in-process mock cluster).
//!
//! A seeded synthetic fleet (4 regions × 10 services × 25 endpoints, plus the 40 service-level
//! segments) emits telemetry five times a second per segment; a script injects faults on a
//! published timeline; a simulated actuator answers commands on the outcomes topic and heals
//! what it fixes. The real `run` path processes everything. Ground truth comes from the
//! script; what happened is read back from the actions and decisions topics, never from the
//! controller's own state. Exit 0 only when every incident went as scripted, nothing healthy
//! was acted on, and every produced record is accounted for (consumed = aggregated + DLQ).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::clock::{Clock, Control, SystemClock};
use crate::codec::build_codec;
use crate::config::{Config, Sources};
use crate::fleet::{fleet, sample, script, FaultKind, Incident, SplitMix, RATE_HZ};
use crate::model::{DecisionRecord, RemediationCommand, TelemetryEvent};
use crate::runtime::{self, RunOptions, SharedCore};

/// Per-segment health as the generator sees it.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Faulty since (seconds from start), until healed.
    fault: Option<(FaultKind, f64)>,
    /// Re-break at this time (flapping).
    rebreak_at: Option<f64>,
    heals: u32,
}

/// Shared by the generator and the simulated actuator.
#[derive(Default)]
struct World {
    health: BTreeMap<String, Health>,
    script: Vec<Incident>,
}

impl World {
    fn incident_of(&self, segment: &str) -> Option<&Incident> {
        self.script.iter().find(|i| i.segment == segment)
    }

    /// The actuator applied a fix to `segment` at `t`.
    fn heal(&mut self, segment: &str, t: f64) {
        let kind = self.incident_of(segment).map(|i| i.kind);
        match kind {
            Some(FaultKind::Ineffective) => {}
            Some(FaultKind::ParentFault) => {
                if let Some(h) = self.health.get_mut(segment) {
                    h.heals += 1;
                }
                let prefix = format!("{segment}/");
                for (s, h) in self.health.iter_mut() {
                    if s == segment || s.starts_with(&prefix) {
                        h.fault = None;
                    }
                }
            }
            _ => {
                if let Some(h) = self.health.get_mut(segment) {
                    if h.fault.is_some() {
                        h.heals += 1;
                        if kind == Some(FaultKind::Flapping) {
                            h.rebreak_at = Some(t + 2.5);
                        }
                    }
                    h.fault = None;
                }
            }
        }
    }
}

/// The summary the demo prints and writes (fixed fields).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub duration_s: u64,
    pub segments: usize,
    pub incidents_injected: usize,
    pub incidents_detected: usize,
    pub incidents_resolved: usize,
    pub incidents_escalated: usize,
    pub false_positives: usize,
    pub time_to_detect_ms: Stat,
    pub time_to_resolve_ms: Stat,
    pub records_produced: u64,
    pub records_consumed: u64,
    pub records_aggregated: u64,
    pub records_dlq: u64,
    pub commands: usize,
    pub incidents: Vec<IncidentResult>,
    pub false_positive_commands: Vec<String>,
    pub passed: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stat {
    pub median: Option<i64>,
    pub max: Option<i64>,
}

impl Stat {
    fn of(mut v: Vec<i64>) -> Stat {
        v.sort_unstable();
        Stat {
            median: v.get(v.len() / 2).copied(),
            max: v.last().copied(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IncidentResult {
    pub kind: FaultKind,
    pub segment: String,
    pub description: &'static str,
    pub start_s: f64,
    pub expected: &'static str,
    pub actual: String,
    pub commands: Vec<String>,
    pub time_to_detect_ms: Option<i64>,
    pub time_to_resolve_ms: Option<i64>,
    pub ok: bool,
}

/// Options of a demo run.
pub struct DemoOptions {
    pub duration_s: u64,
    pub seed: u64,
    pub config_path: std::path::PathBuf,
    /// Print the live view.
    pub live: bool,
}

/// Runs the demo and returns its summary.
///
/// # Errors
/// The embedded cluster, the config, or the runtime failed to start.
/// The demo's config and policies, built into the binary: `segloop demo` and
/// `segloop backtest --embedded-sample` work from any directory.
pub const BUILTIN_CONFIG: &str = include_str!("../config/demo.toml");
pub const BUILTIN_POLICIES: &str = include_str!("../config/demo-policies.toml");

/// The demo config to use: `explicit`, else `config/demo.toml` when it is here (files on disk
/// override), else the built-in one written to a private temporary directory. Returns the path
/// and whether it is the built-in one.
///
/// # Errors
/// The built-in files cannot be written.
pub fn demo_config(
    explicit: Option<&std::path::Path>,
) -> anyhow::Result<(std::path::PathBuf, bool)> {
    if let Some(p) = explicit {
        return Ok((p.to_path_buf(), false));
    }
    let local = std::path::PathBuf::from("config/demo.toml");
    if local.is_file() {
        return Ok((local, false));
    }
    let dir = std::env::temp_dir().join(format!("segloop-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("demo.toml"), BUILTIN_CONFIG)?;
    std::fs::write(dir.join("demo-policies.toml"), BUILTIN_POLICIES)?;
    Ok((dir.join("demo.toml"), true))
}

pub fn run(opts: &DemoOptions) -> anyhow::Result<Summary> {
    let env = std::collections::HashMap::new();
    let cluster = MockCluster::new(1).context("cannot start the embedded Kafka cluster")?;
    let bootstrap = cluster.bootstrap_servers();
    let overrides = vec![format!("kafka.bootstrap_servers={bootstrap}")];
    let mut config = Config::load(&Sources {
        file: Some(&opts.config_path),
        env: &env,
        overrides: &overrides,
    })?;
    // The demo's operator holds the admin token of this run (a fresh one each time).
    let token = uuid::Uuid::new_v4().to_string();
    config.admin.token = Some(crate::config::Secret::new(token.clone()));
    let policies =
        crate::policy::PolicySet::for_config(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::kafka::create_embedded_topics(&cluster, &config)?;
    let t = config.topics.clone();
    let script = script(opts.seed, opts.duration_s);
    let live = opts.live;
    let say = move |s: String| {
        if live {
            println!("{s}");
        }
    };

    say(format!(
        "segloop demo — embedded Kafka at {bootstrap}, seed {}, {} s\n",
        opts.seed, opts.duration_s
    ));
    say("timeline:".into());
    for i in &script {
        say(format!(
            "  t={:>5.1}s  {:<22} {:<26} expect {}",
            i.start_s,
            format!("{:?}", i.kind),
            i.segment,
            i.kind.expected()
        ));
    }
    say(String::new());

    let segments = fleet();
    let world = Arc::new(Mutex::new(World {
        health: segments
            .iter()
            .map(|s| (s.clone(), Health::default()))
            .collect(),
        script: script.clone(),
    }));

    // The runtime: the real `run` path.
    let control = Arc::new(Control::default());
    let core_slot: Arc<Mutex<Option<SharedCore>>> = Arc::new(Mutex::new(None));
    let admin_slot: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::new(Mutex::new(None));
    let runtime_handle = {
        let (control, core_slot, admin_slot) =
            (control.clone(), core_slot.clone(), admin_slot.clone());
        let config = config.clone();
        let policies_path = config.policies.clone();
        std::thread::Builder::new()
            .name("segloop-run".into())
            .spawn(move || {
                runtime::run(RunOptions {
                    config,
                    policies,
                    policies_path,
                    control,
                    clock: Arc::new(SystemClock),
                    metrics: crate::metrics::Metrics::new(),
                    on_admin: Some(Box::new(move |a| {
                        *admin_slot.lock().expect("lock") = Some(a)
                    })),
                    on_core: Some(Box::new(move |c| {
                        *core_slot.lock().expect("lock") = Some(c)
                    })),
                })
            })?
    };
    let started = Instant::now();
    let admin = loop {
        if let Some(a) = *admin_slot.lock().expect("lock") {
            break a;
        }
        if runtime_handle.is_finished() {
            let r = runtime_handle
                .join()
                .map_err(|_| anyhow::anyhow!("runtime panicked"))?;
            anyhow::bail!("the runtime stopped during startup: {:?}", r.err());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the runtime did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    say(format!("metrics and admin API: http://{admin}/metrics  http://{admin}/actions  http://{admin}/segments/<id>\n"));

    // The silence window of the silenced incident, posted through the admin API like an operator.
    let t0_ms = SystemClock.now_ms();
    if let Some(i) = script.iter().find(|i| i.kind == FaultKind::Silenced) {
        let subtree = i
            .segment
            .rsplit_once('/')
            .map_or(i.segment.clone(), |x| x.0.to_string());
        let body = serde_json::json!({
            "created_by": "segloop demo",
            "segments": format!("{subtree}/**"),
            "from_ms": t0_ms + ((i.start_s - 2.0) * 1000.0) as i64,
            "until_ms": t0_ms + ((i.start_s + 12.0) * 1000.0) as i64,
            "comment": "demo: planned maintenance",
        });
        let (status, resp) = http_post(admin, "/silences", &body.to_string(), &token)?;
        anyhow::ensure!(status == 201, "posting the silence failed: {status} {resp}");
        say(format!(
            "silence posted via POST /silences: {subtree}/** from t={:.0}s to t={:.0}s",
            i.start_s - 2.0,
            i.start_s + 12.0
        ));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let commands_seen: Arc<Mutex<Vec<(f64, RemediationCommand)>>> =
        Arc::new(Mutex::new(Vec::new()));
    let resolved_seen: Arc<Mutex<BTreeMap<String, i64>>> = Arc::new(Mutex::new(BTreeMap::new()));

    // Simulated actuator: the reference actuator (`segloop actuator`) with a handler that
    // heals the fleet instead of running a shell command.
    let actuator_control = Arc::new(Control::default());
    let actuator = {
        let (control, world, seen) = (
            actuator_control.clone(),
            world.clone(),
            commands_seen.clone(),
        );
        let mut act_config = config.clone();
        act_config.actuator.name = "demo-actuator".into();
        act_config.actuator.group_id = "demo-actuator".into();
        std::thread::Builder::new()
            .name("demo-actuator".into())
            .spawn(move || {
                let handler = Arc::new(SimulatedFix { world, started });
                crate::actuator::run(&act_config, handler, control, |cmd| {
                    let now_s = started.elapsed().as_secs_f64();
                    seen.lock().expect("lock").push((now_s, cmd.clone()));
                    if live {
                        println!(
                            "  t={now_s:>5.1}s  command {:<8} attempt {} → {}",
                            cmd.action, cmd.attempt, cmd.segment
                        );
                    }
                })
            })?
    };

    // Decisions reader: when each segment was verified.
    let decisions = {
        let (stop, resolved, bootstrap, t) = (
            stop.clone(),
            resolved_seen.clone(),
            bootstrap.clone(),
            t.clone(),
        );
        let partitions = config.kafka.partitions;
        std::thread::spawn(move || -> anyhow::Result<()> {
            let reader = reader(&bootstrap, &t.decisions.name, partitions)?;
            let codec =
                build_codec::<DecisionRecord>(t.decisions.codec, &t.decisions.schema_settings())
                    .map_err(anyhow::Error::msg)?;
            while !stop.load(Ordering::SeqCst) {
                if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
                    if let Some(d) = m.payload().and_then(|p| codec.decode(p).ok()) {
                        if d.to_state == "resolved" {
                            resolved
                                .lock()
                                .expect("lock")
                                .entry(d.segment)
                                .or_insert(d.ts_ms);
                        }
                    }
                }
            }
            Ok(())
        })
    };

    // Generator: five events per second per segment, in step with the consumer.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    let codec = build_codec::<TelemetryEvent>(t.telemetry.codec, &t.telemetry.schema_settings())
        .map_err(anyhow::Error::msg)?;
    let mut rng = SplitMix(opts.seed);
    let tick = Duration::from_millis(1000 / RATE_HZ);
    let end = Duration::from_secs(opts.duration_s);
    let mut next_status = Instant::now();
    let mut n_tick = 0u64;
    let mut bytes = Vec::with_capacity(128);
    while started.elapsed() < end {
        let now_s = started.elapsed().as_secs_f64();
        let ts = SystemClock.now_ms();
        {
            let mut w = world.lock().expect("lock");
            // Faults starting now.
            let starting: Vec<Incident> = w
                .script
                .iter()
                .filter(|i| {
                    i.kind != FaultKind::NoisyHealthy
                        && i.start_s <= now_s
                        && w.health[&i.segment].fault.is_none()
                        && w.health[&i.segment].heals == 0
                })
                .cloned()
                .collect();
            for i in starting {
                if i.end_s.is_some_and(|e| now_s >= e) {
                    continue;
                }
                if w.health[&i.segment].rebreak_at.is_some() {
                    continue;
                }
                say(format!(
                    "  t={now_s:>5.1}s  fault    {:<26} {}",
                    i.segment,
                    i.kind.describe()
                ));
                w.health.get_mut(&i.segment).expect("known").fault = Some((i.kind, now_s));
            }
            // Flapping segments break again; silenced faults end by themselves.
            for (seg, h) in w.health.iter_mut() {
                if h.rebreak_at.is_some_and(|r| now_s >= r) {
                    h.rebreak_at = None;
                    h.fault = Some((FaultKind::Flapping, now_s));
                    say(format!(
                        "  t={now_s:>5.1}s  fault    {seg:<26} breaks again (flapping)"
                    ));
                }
            }
            for i in w.script.clone() {
                if let (Some(e), Some(h)) = (i.end_s, w.health.get_mut(&i.segment)) {
                    if now_s >= e && h.fault.is_some() {
                        h.fault = None;
                        h.heals = 1;
                    }
                }
            }
            // Children of a faulty parent follow it a second later.
            let parents: Vec<(String, f64)> = w
                .health
                .iter()
                .filter_map(|(s, h)| match h.fault {
                    Some((FaultKind::ParentFault, since)) => Some((s.clone(), since)),
                    _ => None,
                })
                .collect();
            for (parent, since) in parents {
                if now_s >= since + 1.0 {
                    let prefix = format!("{parent}/");
                    for (s, h) in w.health.iter_mut() {
                        if s.starts_with(&prefix) && h.fault.is_none() {
                            h.fault = Some((FaultKind::ParentFault, since + 1.0));
                        }
                    }
                }
            }
            for seg in &segments {
                let h = &w.health[seg];
                let noisy = w
                    .incident_of(seg)
                    .is_some_and(|i| i.kind == FaultKind::NoisyHealthy);
                let (latency, error) = sample(&mut rng, h.fault, noisy, now_s);
                let mut measurements = BTreeMap::new();
                measurements.insert("latency_ms".to_string(), latency);
                measurements.insert("error".to_string(), error);
                let e = TelemetryEvent {
                    segment: seg.clone(),
                    ts_ms: ts,
                    measurements,
                    labels: BTreeMap::new(),
                    event_id: None,
                };
                bytes.clear();
                if codec.encode(&e, &mut bytes).is_ok() {
                    let rec = BaseRecord::<str, [u8]>::to(&t.telemetry.name)
                        .key(seg.as_str())
                        .payload(&bytes);
                    match crate::kafka::send_waiting(&producer, rec) {
                        Ok(()) => {
                            produced.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::error!(error = %e, "cannot queue telemetry"),
                    }
                }
            }
        }
        if live && Instant::now() >= next_status {
            next_status += Duration::from_secs(5);
            if let Some(core) = core_slot.lock().expect("lock").as_ref() {
                let c = core.lock().expect("core lock");
                println!(
                    "  t={now_s:>5.1}s  status   produced={} consumed={} windows={} commands={} in_flight={}",
                    produced.load(Ordering::Relaxed),
                    c.report().records_consumed,
                    c.pipeline.engine_stats().windows_closed,
                    c.report().commands,
                    c.pipeline.controller().in_flight().count()
                );
            }
        }
        n_tick += 1;
        let next = tick * n_tick as u32;
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    producer.flush(Duration::from_secs(10))?;
    let produced_total = produced.load(Ordering::SeqCst);

    // Let the pipeline drain: every produced record consumed.
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let consumed = core_slot.lock().expect("lock").as_ref().map_or(0, |c| {
            c.lock().expect("core lock").report().records_consumed
        });
        if consumed >= produced_total || Instant::now() > drain_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    control.stop();
    let report = runtime_handle
        .join()
        .map_err(|_| anyhow::anyhow!("the runtime panicked"))??;
    stop.store(true, Ordering::SeqCst);
    actuator_control.stop();
    actuator
        .join()
        .map_err(|_| anyhow::anyhow!("actuator panicked"))??;
    decisions
        .join()
        .map_err(|_| anyhow::anyhow!("decision reader panicked"))??;
    drop(cluster);

    let commands = commands_seen.lock().expect("lock").clone();
    let resolved = resolved_seen.lock().expect("lock").clone();
    Ok(score(
        opts,
        &script,
        segments.len(),
        &commands,
        &resolved,
        t0_ms,
        produced_total,
        &report,
    ))
}

/// The demo's fix: a short delay, then the fleet's segment heals (or not, as scripted).
struct SimulatedFix {
    world: Arc<Mutex<World>>,
    started: Instant,
}

impl crate::actuator::Handler for SimulatedFix {
    fn handle(&self, cmd: &RemediationCommand) -> crate::actuator::HandlerOutcome {
        use crate::actuator::HandlerOutcome;
        let kind = self
            .world
            .lock()
            .expect("lock")
            .incident_of(&cmd.segment)
            .map(|i| i.kind);
        // Pages go to people; one actuator is scripted to be dead.
        if cmd.action == "page" || kind == Some(FaultKind::NeverAcks) {
            return HandlerOutcome::Silent;
        }
        std::thread::sleep(Duration::from_millis(300));
        self.world
            .lock()
            .expect("lock")
            .heal(&cmd.segment, self.started.elapsed().as_secs_f64());
        HandlerOutcome::Applied(format!("{} done", cmd.action))
    }
}

#[allow(clippy::too_many_arguments)]
fn score(
    opts: &DemoOptions,
    script: &[Incident],
    segments: usize,
    commands: &[(f64, RemediationCommand)],
    resolved: &BTreeMap<String, i64>,
    t0_ms: i64,
    produced: u64,
    report: &runtime::RunReport,
) -> Summary {
    let mut results = Vec::new();
    let mut expected_targets: BTreeSet<&str> = BTreeSet::new();
    for i in script {
        let expects_commands = matches!(i.kind.expected(), "resolved" | "escalated");
        if expects_commands {
            expected_targets.insert(&i.segment);
        }
        let cmds: Vec<&RemediationCommand> = commands
            .iter()
            .map(|(_, c)| c)
            .filter(|c| c.segment == i.segment)
            .collect();
        let mut actual = if cmds.iter().any(|c| c.action == "page") {
            "escalated".to_string()
        } else if resolved.contains_key(&i.segment) && !cmds.is_empty() {
            "resolved".to_string()
        } else if cmds.is_empty() {
            "no_action".to_string()
        } else {
            "acted_unverified".to_string()
        };
        // A parent-level fault must act on the parent only: its endpoints are inhibited.
        if i.kind == FaultKind::ParentFault {
            let prefix = format!("{}/", i.segment);
            let children = commands
                .iter()
                .filter(|(_, c)| c.segment.starts_with(&prefix))
                .count();
            if children > 0 {
                actual = format!("{actual}+{children}_child_commands");
            }
        }
        let start_ms = t0_ms + (i.start_s * 1000.0) as i64;
        let detect = cmds.first().map(|c| c.issued_at_ms - start_ms);
        let resolve = resolved.get(&i.segment).map(|t| t - start_ms);
        let ok = actual == i.kind.expected();
        results.push(IncidentResult {
            kind: i.kind,
            segment: i.segment.clone(),
            description: i.kind.describe(),
            start_s: i.start_s,
            expected: i.kind.expected(),
            actual,
            commands: cmds
                .iter()
                .map(|c| format!("{}#{}", c.action, c.attempt))
                .collect(),
            time_to_detect_ms: detect,
            time_to_resolve_ms: resolve.filter(|_| i.kind.expected() == "resolved"),
            ok,
        });
    }
    let false_positive_commands: Vec<String> = commands
        .iter()
        .filter(|(_, c)| {
            !expected_targets.contains(c.segment.as_str())
                && !script.iter().any(|i| {
                    i.kind == FaultKind::ParentFault
                        && c.segment.starts_with(&format!("{}/", i.segment))
                })
        })
        .map(|(_, c)| format!("{} {}", c.action, c.segment))
        .collect();
    let injected: Vec<&IncidentResult> = results
        .iter()
        .filter(|r| r.kind != FaultKind::NoisyHealthy)
        .collect();
    let detected = injected.iter().filter(|r| !r.commands.is_empty()).count();
    let resolved_n = injected.iter().filter(|r| r.actual == "resolved").count();
    let escalated_n = injected.iter().filter(|r| r.actual == "escalated").count();
    let accounted = report.records_consumed == report.records_aggregated + report.records_dlq
        && report.records_consumed == produced;
    let passed = results.iter().all(|r| r.ok) && false_positive_commands.is_empty() && accounted;
    Summary {
        seed: opts.seed,
        duration_s: opts.duration_s,
        segments,
        incidents_injected: injected.len(),
        incidents_detected: detected,
        incidents_resolved: resolved_n,
        incidents_escalated: escalated_n,
        false_positives: false_positive_commands.len(),
        time_to_detect_ms: Stat::of(
            results
                .iter()
                .filter(|r| r.kind != FaultKind::NoisyHealthy)
                .filter_map(|r| r.time_to_detect_ms)
                .collect(),
        ),
        time_to_resolve_ms: Stat::of(
            results
                .iter()
                .filter_map(|r| r.time_to_resolve_ms)
                .collect(),
        ),
        records_produced: produced,
        records_consumed: report.records_consumed,
        records_aggregated: report.records_aggregated,
        records_dlq: report.records_dlq,
        commands: commands.len(),
        incidents: results,
        false_positive_commands,
        passed,
    }
}

/// The final table.
pub fn print_summary(s: &Summary) {
    println!(
        "\n{:<14} {:<26} {:>8} {:<10} {:<24} {:>9} {:>10}  commands",
        "incident", "segment", "start", "expected", "actual", "detect", "resolve"
    );
    for r in &s.incidents {
        let ms =
            |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{:.1}s", v as f64 / 1000.0));
        println!(
            "{:<14} {:<26} {:>7.1}s {:<10} {:<24} {:>9} {:>10}  {} {}",
            format!("{:?}", r.kind).chars().take(14).collect::<String>(),
            r.segment,
            r.start_s,
            r.expected,
            r.actual,
            ms(r.time_to_detect_ms),
            ms(r.time_to_resolve_ms),
            r.commands.join(","),
            if r.ok { "ok" } else { "FAILED" }
        );
    }
    println!(
        "\nincidents: {} injected, {} detected, {} resolved, {} escalated; false positives: {}",
        s.incidents_injected,
        s.incidents_detected,
        s.incidents_resolved,
        s.incidents_escalated,
        s.false_positives
    );
    let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    println!(
        "time to detect: median {}, max {}; time to resolve: median {}, max {}",
        ms(s.time_to_detect_ms.median),
        ms(s.time_to_detect_ms.max),
        ms(s.time_to_resolve_ms.median),
        ms(s.time_to_resolve_ms.max)
    );
    println!(
        "records: produced {}, consumed {} = aggregated {} + dlq {}",
        s.records_produced, s.records_consumed, s.records_aggregated, s.records_dlq
    );
    println!(
        "{}",
        if s.passed {
            "DEMO PASSED"
        } else {
            "DEMO FAILED"
        }
    );
}

fn reader(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<BaseConsumer> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "demo-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    token: &str,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: segloop\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((
        status,
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    ))
}

/// Writes the summary JSON.
///
/// # Errors
/// The file cannot be written.
pub fn write_summary(s: &Summary, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(s)?)
        .with_context(|| format!("cannot write {}", path.display()))
}
