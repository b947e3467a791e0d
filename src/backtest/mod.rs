//! `segloop backtest`: replays a telemetry topic through the same window engine and controller
//! as `segloop run`, and reports what the policies would have done.
//!
//! - [`source`] reads a fixed offset range per partition and merges the partitions by
//!   (event time, partition, offset): the order depends on the records alone.
//! - [`Replay`] drives the engine. Its controller clock is the maximum event time seen
//!   (DESIGN.md), so windows, `no_data()`, cooldowns, ack timeouts and verification deadlines
//!   replay as they would have live. Clock skew is judged against each record's broker
//!   timestamp (the nearest thing a replay has to the wall clock at arrival).
//! - Outcomes come from a seeded simulated actuator (delay, success probability; each
//!   command's fate depends on its `command_id` alone) or from the recorded outcomes topic.
//! - [`report`] turns what happened into JSON, a terminal table and a self-contained HTML page.
//!
//! A backtest never commits offsets for the live group and never writes to the live actions
//! topic; `--sandbox-topic` receives the would-be commands if asked.

mod progress;
pub mod report;
pub mod source;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;

use anyhow::Context as _;

use crate::codec::fast::TelemetryDecoder;
use crate::codec::{build_codec, DecodeError};
use crate::config::Config;
use crate::controller::Effects;
use crate::model::{DecisionRecord, OutcomeStatus, RemediationCommand, RemediationOutcome};
use crate::pipeline::{Cause, Options as PipelineOptions, Pipeline, Record, Sink, SkewReference};
use crate::policy::PolicySet;
use crate::window::{WindowSpec, WindowSummary};

pub use crate::pipeline::InputStats;

pub use report::Report;
use report::{CommandEntry, LoopRecord, OutcomeEntry, Point};

mod topics;
#[allow(unused_imports)]
pub use topics::*;

/// The simulated actuator: every command (but escalations, which go to people) is answered
/// `APPLIED` after `delay_ms`, or `FAILED` with probability `1 − success`, decided by a hash of
/// `seed` and the `command_id`, so the answer does not depend on the order of anything.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SimulatedActuator {
    pub delay_ms: i64,
    pub success: f64,
    pub seed: u64,
}

impl Default for SimulatedActuator {
    fn default() -> Self {
        SimulatedActuator {
            delay_ms: 500,
            success: 1.0,
            seed: 1,
        }
    }
}

impl SimulatedActuator {
    /// The outcome of a command, or `None` for an escalation.
    pub fn answer(&self, cmd: &RemediationCommand, escalation: bool) -> Option<RemediationOutcome> {
        if escalation {
            return None;
        }
        let draw = unit(self.seed ^ fnv1a(cmd.command_id.as_bytes()));
        let status = if draw < self.success {
            OutcomeStatus::Applied
        } else {
            OutcomeStatus::Failed
        };
        Some(RemediationOutcome {
            command_id: cmd.command_id.clone(),
            segment: cmd.segment.clone(),
            status,
            ts_ms: cmd.issued_at_ms + self.delay_ms,
            actuator: "backtest-simulated".into(),
            message: None,
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A uniform draw in [0, 1) from a 64-bit seed (SplitMix64's finalizer).
fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Where outcomes come from.
#[derive(Debug, Clone)]
pub enum Outcomes {
    Simulated(SimulatedActuator),
    /// The outcomes topic's history, delivered at their own timestamps.
    Recorded(Vec<RemediationOutcome>),
}

/// An outcome waiting for the clock.
struct Pending {
    at_ms: i64,
    seq: u64,
    outcome: RemediationOutcome,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.seq) == (other.at_ms, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_ms, self.seq).cmp(&(other.at_ms, other.seq))
    }
}

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

/// Windows kept per segment before it is affected (context for the timeline).
const CONTEXT_POINTS: usize = 12;
/// Windows kept per affected segment.
const MAX_POINTS: usize = 20_000;

#[derive(Default)]
struct SegmentTrace {
    partition: i32,
    points: VecDeque<Point>,
    affected: bool,
}

/// Where would-be commands go besides the report.
type CommandSink = Box<dyn FnMut(&RemediationCommand)>;

/// The replay driver: records in, the pipeline of `segloop run`, a report out. Its clock is the
/// maximum event time replayed so far.
pub struct Replay {
    pipeline: Pipeline,
    hop_ms: i64,
    clock_ms: i64,
    book: Book,
}

/// The replay's side of the pipeline: the simulated or recorded actuator and what the report
/// needs (loops, traces).
struct Book {
    outcomes: Outcomes,
    pending: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    loops: BTreeMap<(String, String), LoopRecord>,
    traces: HashMap<Arc<str>, SegmentTrace>,
    /// command_id → (segment, policy) of the loop that issued it.
    command_loops: HashMap<String, (String, String)>,
    sink: Option<CommandSink>,
}

impl Replay {
    /// A replay of `partitions` telemetry partitions under `policies`. Events before `from_ms`
    /// or after `to_ms` (event time) are read but not replayed.
    ///
    /// # Errors
    /// The telemetry codec settings are invalid.
    pub fn new(
        config: &Config,
        policies: PolicySet,
        partitions: &[i32],
        (from_ms, to_ms): (Option<i64>, Option<i64>),
        outcomes: Outcomes,
    ) -> anyhow::Result<Replay> {
        let mut pipeline = Pipeline::new(
            config,
            policies,
            PipelineOptions {
                // Clock skew is judged against each record's broker timestamp (the nearest
                // thing a replay has to the wall clock at arrival).
                skew: SkewReference::BrokerTimestamp,
                from_ms,
                to_ms,
            },
        )
        .map_err(anyhow::Error::msg)?;
        for &p in partitions {
            pipeline.assign(p);
        }
        let mut pending = BinaryHeap::new();
        let mut seq = 0;
        if let Outcomes::Recorded(history) = &outcomes {
            for o in history {
                seq += 1;
                pending.push(Reverse(Pending {
                    at_ms: o.ts_ms,
                    seq,
                    outcome: o.clone(),
                }));
            }
        }
        Ok(Replay {
            pipeline,
            hop_ms: WindowSpec::from_config(&config.windows).hop_ms,
            clock_ms: i64::MIN,
            book: Book {
                outcomes,
                pending,
                seq,
                loops: BTreeMap::new(),
                traces: HashMap::default(),
                command_loops: HashMap::default(),
                sink: None,
            },
        })
    }

    /// Would-be commands also go here (the sandbox topic), in the order they were issued.
    pub fn with_sink(mut self, sink: impl FnMut(&RemediationCommand) + 'static) -> Self {
        self.book.sink = Some(Box::new(sink));
        self
    }

    /// The controller clock: the greatest merge key replayed so far (see
    /// [`source::MERGE_LOOKAHEAD`]): the replay's event time, which a few future-dated
    /// records cannot move.
    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// Replays one record: admitted by the pipeline, the clock moves to its merge key
    /// (`merge_ts`; its event time when there is no merge), then it is ingested. Every
    /// partition counts as read through the merge key (the merge holds nothing earlier), so
    /// the idle advance never passes a record still to come.
    pub fn on_record(
        &mut self,
        partition: i32,
        offset: i64,
        broker_ts_ms: Option<i64>,
        merge_ts: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        let record = Record {
            partition,
            offset,
            key,
            value,
            timestamp_ms: broker_ts_ms,
            handle: 0,
        };
        let Some(event) = self.pipeline.admit(&record, &mut self.book) else {
            return;
        };
        let at = merge_ts.unwrap_or(event.ts_ms());
        self.pipeline.set_read_until(at);
        if at > self.clock_ms {
            self.advance(at);
        }
        self.pipeline
            .ingest(&record, &event, self.clock_ms, &mut self.book);
    }

    /// Moves the controller clock to `to`: outcomes due by then (each at its own time),
    /// quiet partitions, deadlines.
    fn advance(&mut self, to: i64) {
        while let Some(Reverse(next)) = self.book.pending.peek() {
            if next.at_ms > to {
                break;
            }
            let Reverse(p) = self.book.pending.pop().expect("peeked");
            let at = p.at_ms.max(self.clock_ms);
            self.clock_ms = at;
            self.pipeline.tick(at, true, &mut self.book);
            self.pipeline.on_outcome(&p.outcome, at, &mut self.book);
            if let Some(l) = self.book.loop_of_command(&p.outcome) {
                l.outcomes.push(OutcomeEntry {
                    command_id: p.outcome.command_id.clone(),
                    status: p.outcome.status.as_str().to_string(),
                    ts_ms: at,
                });
            }
        }
        self.clock_ms = to;
        self.pipeline.tick(to, true, &mut self.book);
    }

    /// Ends the replay: what happened, as a report.
    pub fn finish(self, meta: report::Meta) -> Report {
        let (input, controller) = self.pipeline.finish();
        report::build(
            meta,
            input,
            controller.policies(),
            self.book.loops,
            self.book
                .traces
                .into_iter()
                .map(|(k, t)| (k, (t.partition, t.points.into_iter().collect())))
                .collect(),
            self.hop_ms,
        )
    }
}

impl Sink for Book {
    /// Rejections are counted by the pipeline (the report's `rejected`); a replay writes no DLQ.
    fn reject(&mut self, _: &Record<'_>, _: &DecodeError) {}

    fn effects(&mut self, fx: &mut Effects, cause: Cause<'_>, policies: &PolicySet) {
        if let Cause::Window { window, labels } = cause {
            let affected = !fx.decisions.is_empty() || !fx.commands.is_empty();
            trace(&mut self.traces, policies, window, labels, affected);
        }
        self.take_effects(fx);
    }
}

/// Records a closed window on its segment's trace (the report's timelines).
fn trace(
    traces: &mut HashMap<Arc<str>, SegmentTrace>,
    policies: &PolicySet,
    w: &WindowSummary,
    labels: &BTreeMap<String, String>,
    affected: bool,
) {
    let values = policies
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.window.as_deref() == w.group.as_deref() && p.selects(&w.segment, labels))
        .map(|(i, p)| {
            let value = p.when.primary().and_then(|(n, _)| n.eval(w));
            (i as u16, value, p.when.eval(w))
        })
        .collect();
    let trace = traces
        .entry(w.segment.clone())
        .or_insert_with(|| SegmentTrace {
            partition: w.partition,
            ..SegmentTrace::default()
        });
    trace.affected |= affected;
    trace.points.push_back(Point {
        start_ms: w.start_ms,
        end_ms: w.end_ms,
        count: w.count,
        values,
    });
    let cap = if trace.affected {
        MAX_POINTS
    } else {
        CONTEXT_POINTS
    };
    while trace.points.len() > cap {
        trace.points.pop_front();
    }
}

impl Book {
    fn loop_of_command(&mut self, o: &RemediationOutcome) -> Option<&mut LoopRecord> {
        let key = self.command_loops.get(&o.command_id)?;
        self.loops.get_mut(key)
    }

    fn take_effects(&mut self, fx: &mut Effects) {
        for cmd in fx.commands.drain(..) {
            // Every escalation command (attempts exhausted, flap breaker, held-back work, the
            // actuator breaker) says why in its params; its attempt number alone does not tell.
            let escalation = cmd.params.contains_key("escalation_reason");
            if let Outcomes::Simulated(sim) = &self.outcomes {
                if let Some(o) = sim.answer(&cmd, escalation) {
                    self.seq += 1;
                    self.pending.push(Reverse(Pending {
                        at_ms: o.ts_ms,
                        seq: self.seq,
                        outcome: o,
                    }));
                }
            }
            if let Some(sink) = self.sink.as_mut() {
                sink(&cmd);
            }
            if let Some(t) = self.traces.get_mut(cmd.segment.as_str()) {
                t.affected = true;
            }
            self.command_loops.insert(
                cmd.command_id.clone(),
                (cmd.segment.clone(), cmd.policy.clone()),
            );
            let l = self.loop_record(&cmd.segment, &cmd.policy);
            if l.first_command_ms.is_none() {
                l.first_command_ms = Some(cmd.issued_at_ms);
            }
            if escalation {
                l.escalation_commands += 1;
            } else if cmd.attempt == 1 {
                l.firings += 1;
            }
            l.commands.push(CommandEntry::of(&cmd, escalation));
        }
        for d in fx.decisions.drain(..) {
            if let Some(t) = self.traces.get_mut(d.segment.as_str()) {
                t.affected = true;
            }
            let l = self.loop_record(&d.segment, &d.policy);
            note_decision(l, &d);
            l.decisions.push(d);
        }
        // Loop timings are read back from the decisions and commands above.
        fx.timings.clear();
    }

    fn loop_record(&mut self, segment: &str, policy: &str) -> &mut LoopRecord {
        self.loops
            .entry((segment.to_string(), policy.to_string()))
            .or_default()
    }
}

fn note_decision(l: &mut LoopRecord, d: &DecisionRecord) {
    if d.to_state == "breaching" && d.from_state == "healthy" {
        let start = d.window_start_ms.unwrap_or(d.ts_ms);
        if l.first_detection_ms.is_none() {
            l.first_detection_ms = Some(start);
        }
    }
    match d.to_state.as_str() {
        "escalated" if d.from_state != "escalated" => l.escalations += 1,
        "resolved" if d.from_state != "resolved" => l.resolved += 1,
        _ => {}
    }
    if let Some(g) = &d.guardrail {
        *l.suppressed.entry(g.clone()).or_default() += 1;
    }
}

/// What to replay and how.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The telemetry topic (default: `topics.telemetry.name`).
    pub topic: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub actuator: SimulatedActuator,
    /// Replay the outcomes topic's history instead of simulating an actuator.
    pub outcomes_from_topic: bool,
    /// Would-be commands are also written here (never the live actions topic).
    pub sandbox_topic: Option<String>,
    /// Caps the consumer's fetch sizes (tests: the report must not depend on them).
    pub fetch_max_bytes: Option<usize>,
    /// Shown in the report (the policy file's name).
    pub policies_label: String,
    /// Show progress on standard error (a bar on a terminal, else a line every 10 s).
    pub progress: bool,
}

/// Replays a topic range under one policy set.
///
/// # Errors
/// The topic cannot be read, the codec settings are invalid, or the sandbox topic is the live
/// actions topic.
pub fn run(
    config: &Config,
    policies: PolicySet,
    range: &source::Range,
    opts: &Options,
) -> anyhow::Result<Report> {
    let outcomes = if opts.outcomes_from_topic {
        Outcomes::Recorded(read_outcomes(config, opts)?)
    } else {
        Outcomes::Simulated(opts.actuator)
    };
    let actuator = match &outcomes {
        Outcomes::Simulated(s) => report::ActuatorInfo::Simulated(*s),
        Outcomes::Recorded(v) => report::ActuatorInfo::Recorded {
            topic: config.topics.outcomes.name.clone(),
            outcomes: v.len() as u64,
        },
    };
    let partitions: Vec<i32> = range.end.keys().copied().collect();
    let mut replay = Replay::new(
        config,
        policies,
        &partitions,
        (opts.from_ms, opts.to_ms),
        outcomes,
    )?;
    let mut sandbox = None;
    if let Some(topic) = &opts.sandbox_topic {
        anyhow::ensure!(
            *topic != config.topics.actions.name,
            "--sandbox-topic {topic} is the live actions topic; a backtest never writes there: pick another topic"
        );
        let producer = Sandbox::new(config, topic)?;
        let shared = Arc::new(producer);
        let s = shared.clone();
        replay = replay.with_sink(move |cmd| s.send(cmd));
        sandbox = Some(shared);
    }
    let mut decoder = {
        let t = &config.topics.telemetry;
        TelemetryDecoder::new(t.codec, &config.schema_settings(t)).map_err(anyhow::Error::msg)?
    };
    // A registry error fails the replay: its report must not depend on the registry's health.
    let resolver = crate::registry::blocking_resolver(config)?;
    if let Some(r) = &resolver {
        replay.pipeline.set_schema_source(Box::new(r.clone()));
    }
    let unanswered = Unanswered::default();
    let mut merge_source = resolver.clone();
    let merge_unanswered = unanswered.clone();
    let started = std::time::Instant::now();
    let mut progress = opts.progress.then(|| progress::Progress::new(range.len()));
    let stats = source::read_merged(
        config,
        range,
        opts.fetch_max_bytes,
        move |k, v| match merge_source.as_mut() {
            None => decoder.event_time(k, v),
            Some(source) => decoder
                .event_time_learning(source, k, v)
                .unwrap_or_else(|e| {
                    merge_unanswered.note(e);
                    None
                }),
        },
        |r| {
            replay.on_record(
                r.partition,
                r.offset,
                r.broker_ts_ms,
                Some(r.merge_ts),
                r.key,
                r.value,
            );
            if let Some(p) = progress.as_mut() {
                p.add(1);
            }
        },
    )?;
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    let waiting = replay
        .pipeline
        .waiting()
        .values()
        .next()
        .map(|w| (w.schema_id, w.reason.clone()));
    if let Some((id, reason)) = waiting.or(unanswered.take()) {
        anyhow::bail!(
            "the schema registry did not answer for schema id {id}: {reason}. A backtest does \
             not wait for the registry (its report must not depend on it): run it again when \
             the registry answers"
        );
    }
    let elapsed = started.elapsed();
    if let Some(s) = sandbox {
        s.flush()?;
    }
    tracing::info!(
        records = stats.records,
        secs = elapsed.as_secs_f64(),
        "replay finished"
    );
    Ok(replay.finish(report::Meta {
        topic: range.topic.clone(),
        partitions: partitions.len() as u32,
        seek: range.seek.to_string(),
        from_ms: opts.from_ms,
        to_ms: opts.to_ms,
        policies: opts.policies_label.clone(),
        actuator,
    }))
}

/// The first schema id the registry did not answer for during a read (the merge runs on the
/// reader's thread, so clones share it): a replay fails with it.
#[derive(Clone, Default)]
struct Unanswered(Arc<std::sync::Mutex<Option<(u32, String)>>>);

impl Unanswered {
    fn note(&self, e: (u32, String)) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(e);
    }

    fn take(&self) -> Option<(u32, String)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Telemetry partitions of the embedded sample (at least).
pub const SAMPLE_PARTITIONS: i32 = 16;

/// A whole `segloop backtest` invocation, after parsing.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub options: Options,
    /// Run this policy file over the same replay and compare.
    pub compare: Option<std::path::PathBuf>,
    /// Diff the would-be commands with the live actions topic.
    pub against_live: bool,
    /// First write the demo's history to an embedded cluster and replay that: (seed, seconds).
    pub embedded_sample: Option<(u64, u64)>,
}

/// Runs an invocation: the sample (if asked), the range, the replay(s), the diffs.
///
/// # Errors
/// Any step's failure, with its context.
pub fn execute(
    mut config: Config,
    policies: PolicySet,
    inv: &Invocation,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    let mut sample_records = None;
    let _cluster = match inv.embedded_sample {
        Some((seed, secs)) => {
            let cluster = rdkafka::mocking::MockCluster::new(1)
                .context("cannot start the embedded Kafka cluster")?;
            config.kafka.bootstrap_servers = cluster.bootstrap_servers();
            // The embedded cluster keeps ~5 MiB per partition: spread the history wide enough
            // that it keeps all of it (checked below).
            config.kafka.partitions = config.kafka.partitions.max(SAMPLE_PARTITIONS);
            crate::kafka::create_embedded_topics(&cluster, &config)?;
            let n = crate::fleet::write_sample_history(&config, seed, secs)?;
            sample_records = Some(n);
            say(&format!(
                "embedded sample: {n} records of the demo fleet (seed {seed}, {secs} s from {}) written to {} on the embedded cluster",
                report::rfc3339(crate::fleet::SAMPLE_EPOCH_MS),
                config.topics.telemetry.name
            ));
            Some(cluster)
        }
        None => None,
    };
    crate::kafka::connect(&config)?;
    let topic = inv
        .options
        .topic
        .clone()
        .unwrap_or_else(|| config.topics.telemetry.name.clone());
    let w = &config.windows;
    let margin = (w.out_of_orderness + w.max_clock_skew).as_millis() as i64;
    let range = source::resolve_range(&config, &topic, inv.options.from_ms, margin)?;
    if let (Some(written), None) = (sample_records, inv.options.from_ms) {
        anyhow::ensure!(
            range.len() == written,
            "the embedded cluster kept {} of the {written} sample records; shorten --sample-duration",
            range.len()
        );
    }
    say(&format!(
        "replaying {topic}: {} partitions, up to {} records (start: {})",
        range.end.len(),
        range.len(),
        range.seek
    ));
    let mut report = run(&config, policies, &range, &inv.options)?;
    if let Some(path) = &inv.compare {
        let other = PolicySet::load_for(path, &config.windows)
            .map_err(|e| anyhow::anyhow!("invalid policies in {}:\n{e}", path.display()))?;
        let mut opts = inv.options.clone();
        opts.sandbox_topic = None;
        opts.policies_label = path.display().to_string();
        let b = run(&config, other, &range, &opts)?;
        report.compare = Some(report::compare(&report, &b));
    }
    if inv.against_live {
        let live = read_live_commands(&config, inv.options.fetch_max_bytes)?;
        report.against_live = Some(report::against_live(
            &report,
            &config.topics.actions.name,
            &live,
        ));
    }
    Ok(report)
}

/// Parses a time for `--from`/`--to`: RFC 3339 (`2026-01-01T00:00:00Z`), `now`, or relative to
/// now (`-6h`, `-90m`).
///
/// # Errors
/// Neither form; the message shows both.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now_ms);
    }
    if let Some(rel) = s.strip_prefix('-') {
        let d = humantime::parse_duration(rel)
            .map_err(|e| format!("{s:?}: {e} (write e.g. -6h or 2026-01-01T00:00:00Z)"))?;
        return Ok(now_ms - d.as_millis() as i64);
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?}: {e} (write e.g. 2026-01-01T00:00:00Z or -6h)"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}
