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

use crate::codec::build_codec;
use crate::config::{Config, Sources};
use crate::model::{DecisionRecord, RemediationCommand, TelemetryEvent};
use crate::runtime::{self, Clock, Control, RunOptions, SharedCore, SystemClock};

const REGIONS: [&str; 4] = ["eu-1", "us-1", "us-2", "ap-1"];
const SERVICES: [&str; 10] = [
    "checkout", "search", "cart", "auth", "catalog", "payments", "profile", "reviews", "ship",
    "promo",
];
const ENDPOINTS: usize = 25;
/// Events per second per segment.
const RATE_HZ: u64 = 5;

/// What a scripted incident does to its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    ErrorSpike,
    LatencyRegression,
    SlowDrift,
    Flapping,
    ParentFault,
    NeverAcks,
    Ineffective,
    Silenced,
    NoisyHealthy,
}

impl FaultKind {
    fn describe(self) -> &'static str {
        match self {
            FaultKind::ErrorSpike => "error-rate spike (80% errors)",
            FaultKind::LatencyRegression => "latency regression (600-900 ms)",
            FaultKind::SlowDrift => "slow latency drift (+40 ms/s)",
            FaultKind::Flapping => "flapping: breaks again 2.5 s after every fix",
            FaultKind::ParentFault => "service-level fault; its 25 endpoints follow 1 s later",
            FaultKind::NeverAcks => "error spike; its actuator never answers",
            FaultKind::Ineffective => "latency regression the fix does not cure",
            FaultKind::Silenced => "error spike inside a silence window",
            FaultKind::NoisyHealthy => "noisy but healthy (wide latency, 2% errors)",
        }
    }

    /// What must happen, judged from the actions and decisions topics.
    fn expected(self) -> &'static str {
        match self {
            FaultKind::ErrorSpike
            | FaultKind::LatencyRegression
            | FaultKind::SlowDrift
            | FaultKind::ParentFault => "resolved",
            FaultKind::Flapping | FaultKind::NeverAcks | FaultKind::Ineffective => "escalated",
            FaultKind::Silenced | FaultKind::NoisyHealthy => "no_action",
        }
    }
}

/// One scripted incident.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub kind: FaultKind,
    pub segment: String,
    pub start_s: f64,
    /// For a silenced fault: when it stops by itself.
    pub end_s: Option<f64>,
}

/// The timeline of a run: incidents at offsets from the start.
pub fn script(seed: u64, duration_s: u64) -> Vec<Incident> {
    let mut rng = SplitMix(seed ^ 0xD3E0);
    // Distinct services for every incident, so subtrees never overlap.
    let mut services: Vec<(usize, usize)> = (0..REGIONS.len())
        .flat_map(|r| (0..SERVICES.len()).map(move |s| (r, s)))
        .collect();
    for i in (1..services.len()).rev() {
        services.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut pick = services.into_iter();
    let mut endpoint = |rng: &mut SplitMix| {
        let (r, s) = pick.next().expect("40 services cover the script");
        let e = rng.next() as usize % ENDPOINTS;
        (
            format!("{}/{}", REGIONS[r], SERVICES[s]),
            format!("{}/{}/ep-{e:02}", REGIONS[r], SERVICES[s]),
        )
    };
    // Incidents start between 6 s and duration − 30 s (at least 1.5 s apart).
    let spacing = ((duration_s as f64 - 36.0) / 7.0).clamp(1.5, 3.5);
    let at = |i: usize| 6.0 + spacing * i as f64;
    let kinds = [
        FaultKind::ErrorSpike,
        FaultKind::Flapping,
        FaultKind::LatencyRegression,
        FaultKind::SlowDrift,
        FaultKind::ParentFault,
        FaultKind::NeverAcks,
        FaultKind::Ineffective,
        FaultKind::Silenced,
    ];
    let mut out = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let (service, ep) = endpoint(&mut rng);
        let segment = if kind == FaultKind::ParentFault {
            service
        } else {
            ep
        };
        let start_s = at(i);
        let end_s = (kind == FaultKind::Silenced).then_some(start_s + 6.0);
        out.push(Incident {
            kind,
            segment,
            start_s,
            end_s,
        });
    }
    for _ in 0..5 {
        let (_, ep) = endpoint(&mut rng);
        out.push(Incident {
            kind: FaultKind::NoisyHealthy,
            segment: ep,
            start_s: 0.0,
            end_s: None,
        });
    }
    out
}

/// The synthetic fleet: per region and service, the service and its endpoints.
fn fleet() -> Vec<String> {
    let mut segments = Vec::new();
    for r in REGIONS {
        for s in SERVICES {
            segments.push(format!("{r}/{s}"));
            for e in 0..ENDPOINTS {
                segments.push(format!("{r}/{s}/ep-{e:02}"));
            }
        }
    }
    segments
}

/// Event time of the sample history's first event: 2026-01-01T00:00:00Z.
pub const SAMPLE_EPOCH_MS: i64 = 1_767_225_600_000;

/// When a scripted fault is on in the sample history (seconds from its start): the history is
/// open-loop, as recorded on a day the fixes landed on their own schedule.
fn sample_fault(kind: FaultKind, since: f64) -> bool {
    match kind {
        FaultKind::ErrorSpike | FaultKind::LatencyRegression | FaultKind::ParentFault => {
            since < 3.5
        }
        FaultKind::SlowDrift => since < 7.0,
        // Four bursts of 3.5 s, 2.5 s apart.
        FaultKind::Flapping => since < 24.0 && since % 6.0 < 3.5,
        FaultKind::NeverAcks | FaultKind::Ineffective => since < 20.0,
        FaultKind::Silenced => since < 6.0,
        FaultKind::NoisyHealthy => false,
    }
}

/// The sample history for `segloop backtest --embedded-sample`: the demo's fleet (5 events per
/// second per segment from [`SAMPLE_EPOCH_MS`]) with the demo's scripted incidents, each on
/// for a fixed time. Returns the script; `emit` gets the events in time order.
pub fn sample_history(
    seed: u64,
    duration_s: u64,
    mut emit: impl FnMut(TelemetryEvent),
) -> Vec<Incident> {
    let script = script(seed, duration_s);
    let segments = fleet();
    let mut rng = SplitMix(seed);
    let ticks = duration_s * RATE_HZ;
    for n in 0..ticks {
        let now_s = n as f64 / RATE_HZ as f64;
        let ts = SAMPLE_EPOCH_MS + (n * 1000 / RATE_HZ) as i64;
        for seg in &segments {
            let mut fault = None;
            let mut noisy = false;
            for i in &script {
                let since = now_s - i.start_s;
                if i.segment == *seg {
                    noisy |= i.kind == FaultKind::NoisyHealthy;
                    if since >= 0.0 && sample_fault(i.kind, since) {
                        fault = Some((i.kind, i.start_s));
                    }
                } else if i.kind == FaultKind::ParentFault
                    && seg.starts_with(&i.segment)
                    && seg.as_bytes().get(i.segment.len()) == Some(&b'/')
                    && since >= 1.0
                    && sample_fault(i.kind, since)
                {
                    // Its endpoints follow the service a second later.
                    fault = Some((i.kind, i.start_s + 1.0));
                }
            }
            let (latency, error) = sample(&mut rng, fault, noisy, now_s);
            emit(TelemetryEvent {
                segment: seg.clone(),
                ts_ms: ts,
                measurements: BTreeMap::from([
                    ("error".to_string(), error),
                    ("latency_ms".to_string(), latency),
                ]),
                labels: BTreeMap::new(),
                event_id: None,
            });
        }
    }
    script
}

/// Writes the sample history to the configured telemetry topic (record timestamps = event
/// times, keys = segments, murmur2 partitioning). Returns the records written.
///
/// # Errors
/// The producer cannot be created or does not confirm every record.
pub fn write_sample_history(config: &Config, seed: u64, duration_s: u64) -> anyhow::Result<u64> {
    let t = &config.topics.telemetry;
    let codec =
        build_codec::<TelemetryEvent>(t.codec, &t.schema_settings()).map_err(anyhow::Error::msg)?;
    let producer: ThreadedProducer<DefaultProducerContext> = crate::kafka::client_config(
        config,
        &[
            ("partitioner", "murmur2_random"),
            ("linger.ms", "20"),
            ("enable.idempotence", "true"),
        ],
    )
    .create()
    .context("cannot create the sample producer")?;
    let mut written = 0u64;
    let mut failed = None;
    let mut bytes = Vec::with_capacity(128);
    sample_history(seed, duration_s, |e| {
        bytes.clear();
        if failed.is_some() || codec.encode(&e, &mut bytes).is_err() {
            return;
        }
        let rec = BaseRecord::<str, [u8]>::to(&t.name)
            .key(e.segment.as_str())
            .payload(&bytes)
            .timestamp(e.ts_ms);
        match crate::kafka::send_waiting(&producer, rec) {
            Ok(()) => written += 1,
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return Err(e).context("cannot write the sample history");
    }
    producer
        .flush(Duration::from_secs(30))
        .context("the sample history was not fully written")?;
    Ok(written)
}

/// SplitMix64: small, seeded, good enough for synthetic noise.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

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
pub fn run(opts: &DemoOptions) -> anyhow::Result<Summary> {
    let env = std::collections::HashMap::new();
    let cluster = MockCluster::new(1).context("cannot start the embedded Kafka cluster")?;
    let bootstrap = cluster.bootstrap_servers();
    let overrides = vec![format!("kafka.bootstrap_servers={bootstrap}")];
    let config = Config::load(&Sources {
        file: Some(&opts.config_path),
        env: &env,
        overrides: &overrides,
    })?;
    let policies = crate::cli::load_policy_set(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
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
            "id": "demo-maintenance",
            "segments": format!("{subtree}/**"),
            "from_ms": t0_ms + ((i.start_s - 2.0) * 1000.0) as i64,
            "until_ms": t0_ms + ((i.start_s + 12.0) * 1000.0) as i64,
            "reason": "demo: planned maintenance",
        });
        let (status, resp) = http_post(admin, "/silences", &body.to_string())?;
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
                    c.report.records_consumed,
                    c.engine.stats().windows_closed,
                    c.report.commands,
                    c.controller.in_flight().count()
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
        let consumed = core_slot
            .lock()
            .expect("lock")
            .as_ref()
            .map_or(0, |c| c.lock().expect("core lock").report.records_consumed);
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

/// One event's (latency, error) for a segment in a given state.
fn sample(
    rng: &mut SplitMix,
    fault: Option<(FaultKind, f64)>,
    noisy: bool,
    now_s: f64,
) -> (f64, f64) {
    let u = rng.unit();
    let e = rng.unit();
    let base_latency = if noisy {
        50.0 + 370.0 * u
    } else {
        50.0 + 150.0 * u
    };
    let base_error = if e < if noisy { 0.02 } else { 0.002 } {
        1.0
    } else {
        0.0
    };
    match fault {
        None => (base_latency, base_error),
        Some((kind, since)) => match kind {
            FaultKind::ErrorSpike
            | FaultKind::Flapping
            | FaultKind::ParentFault
            | FaultKind::NeverAcks
            | FaultKind::Silenced => (base_latency, if e < 0.8 { 1.0 } else { 0.0 }),
            FaultKind::LatencyRegression | FaultKind::Ineffective => {
                (600.0 + 300.0 * u, base_error)
            }
            FaultKind::SlowDrift => (base_latency + 40.0 * (now_s - since) * 2.5, base_error),
            FaultKind::NoisyHealthy => (base_latency, base_error),
        },
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

fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: segloop\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
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
