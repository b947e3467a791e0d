//! `segloop bench ...`: benchmarks that print `key=value` lines, and (in bench builds) the
//! counting allocator that lets them measure memory instead of estimating it.
//!
//! The binary's global allocator is mimalloc (the window engine allocates and frees per
//! segment per window; against glibc's malloc, mimalloc took `bench window` from 1.94 to
//! 2.29 M events/s at 100k segments and from 0.63 to 0.79 M/s at 1M). A bench build
//! (`--features counting-alloc`) installs [`CountingAllocator`] instead: mimalloc plus one
//! relaxed atomic add per allocation and free; a production build carries no counter.

#[cfg(feature = "counting-alloc")]
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

#[cfg(feature = "counting-alloc")]
use mimalloc::MiMalloc;

use crate::window::{Position, WindowEngine, WindowSpec, WindowSummary};

mod e2e;
mod shards;
#[allow(unused_imports)]
pub use e2e::*;
pub use shards::{shards_bench, ShardsReport};

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

/// mimalloc, counting live bytes (installed by bench builds only).
#[cfg(feature = "counting-alloc")]
pub struct CountingAllocator;

// SAFETY: every call is forwarded to mimalloc, a correct global allocator; the counter is a
// relaxed atomic and never affects the memory handed out.
#[cfg(feature = "counting-alloc")]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` (a non-zero-size layout) is passed on.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator (so from mimalloc) with this layout.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: `ptr` came from mimalloc with `layout`; the caller guarantees `new_size`.
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// Live heap bytes, in a bench build (`None` in a production build: nothing counts them).
pub fn allocated_bytes() -> Option<isize> {
    cfg!(feature = "counting-alloc").then(|| ALLOCATED.load(Ordering::Relaxed))
}

/// Figures of one window-engine run.
#[derive(Debug, Clone)]
pub struct WindowBenchReport {
    pub segments: usize,
    pub events: usize,
    pub windows_spanned: i64,
    pub windows_closed: u64,
    pub elapsed_secs: f64,
    pub updates_per_sec: f64,
    /// Measured in a bench build only.
    pub bytes_per_segment: Option<f64>,
}

impl WindowBenchReport {
    pub fn print(&self) {
        println!("bench=window");
        println!("segments={}", self.segments);
        println!("events={}", self.events);
        println!("measurements_per_event=2");
        println!("windows_spanned={}", self.windows_spanned);
        println!("windows_closed={}", self.windows_closed);
        println!("elapsed_secs={:.3}", self.elapsed_secs);
        println!("updates_per_sec={:.0}", self.updates_per_sec);
        match self.bytes_per_segment {
            Some(b) => println!("bytes_per_segment={b:.0}"),
            None => println!("bytes_per_segment=unmeasured (a bench build measures it: cargo build --release --features counting-alloc)"),
        }
    }
}

/// A xorshift generator: the bench must not measure a heavyweight RNG.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Figures of one eviction run (see [`evict_bench`]).
#[derive(Debug, Clone)]
pub struct EvictBenchReport {
    pub cap: usize,
    pub events: usize,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    pub evicted_segments: u64,
    pub evicted_events: u64,
    pub stats: crate::window::EngineStats,
}

impl EvictBenchReport {
    /// `accepted = windowed + evicted + revoked + open`, and every evicted event reported.
    pub fn accounting_exact(&self, reported_events: u64) -> bool {
        let s = &self.stats;
        s.accepted == s.windowed_events + s.evicted_events + s.revoked_events + s.open_events
            && reported_events == s.evicted_events
    }

    pub fn print(&self, reported_events: u64) {
        println!("bench=evict");
        println!("cap={}", self.cap);
        println!("events={}", self.events);
        println!("elapsed_secs={:.3}", self.elapsed_secs);
        println!("events_per_sec={:.0}", self.events_per_sec);
        println!(
            "ns_per_event={:.1}",
            1e9 / self.events_per_sec.max(f64::MIN_POSITIVE)
        );
        println!("evicted_segments={}", self.evicted_segments);
        println!("evicted_events={}", self.evicted_events);
        println!(
            "accounting_exact={}",
            self.accounting_exact(reported_events)
        );
    }
}

/// The segment cap under churn: the engine is filled to `cap` segments, then `events` events
/// of never-seen segments arrive (two events each, inside one window, so every evicted
/// segment has events in an open window): every insert goes through eviction. Returns the
/// figures and the events the evictions reported (`take_evictions`).
pub fn evict_bench(mut spec: WindowSpec, cap: usize, events: usize) -> (EvictBenchReport, u64) {
    let cap = cap.max(1);
    spec.max_segments = cap;
    // One window holds the whole run: nothing closes, so every evicted event was open.
    spec.size_ms = 3_600_000;
    spec.hop_ms = spec.size_ms;
    let mut engine = WindowEngine::new(spec);
    engine.assign(0);
    let mut closed = Vec::new();
    let name = |i: usize| format!("tenant-{}/svc/ep-{i}", i % 13);
    let mut offset = 0i64;
    let mut feed = |engine: &mut WindowEngine, i: usize, ts: i64| {
        let _ = engine.ingest(
            Position {
                partition: 0,
                offset,
            },
            &name(i),
            ts,
            [("latency_ms", 10.0)],
            ts,
            &mut closed,
        );
        offset += 1;
    };
    for i in 0..cap {
        feed(&mut engine, i, 1);
    }
    let mut reported = engine
        .take_evictions()
        .iter()
        .map(|e| e.events)
        .sum::<u64>();
    let start = Instant::now();
    for j in 0..events {
        // Each new segment sends twice (the second event lands on a live slot).
        let i = cap + j / 2;
        feed(&mut engine, i, 2);
        if j % 4096 == 0 {
            reported += engine
                .take_evictions()
                .iter()
                .map(|e| e.events)
                .sum::<u64>();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    reported += engine
        .take_evictions()
        .iter()
        .map(|e| e.events)
        .sum::<u64>();
    let stats = engine.stats();
    (
        EvictBenchReport {
            cap,
            events,
            elapsed_secs: elapsed,
            events_per_sec: events as f64 / elapsed.max(1e-9),
            evicted_segments: stats.evicted_segments,
            evicted_events: stats.evicted_events,
            stats,
        },
        reported,
    )
}

/// Feeds `events` events over `segments` segment ids (random order, each event with a latency
/// that has a quantile sketch and an error flag) through the same `ingest` call the runtime
/// makes, with event times spanning at least ten windows so windows close during the run.
/// Memory is measured with every segment holding an open window.
pub fn window_bench(spec: WindowSpec, segments: usize, events: usize) -> WindowBenchReport {
    let segments = segments.max(1);
    let ids: Vec<String> = (0..segments)
        .map(|i| format!("r{}/svc-{}/ep-{}", i % 7, i % 211, i))
        .collect();
    let windows_spanned = 10i64;
    let span_ms = spec.size_ms * windows_spanned + spec.size_ms / 2;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    // The input as the runtime sees it: keys laid out one after another in a buffer, as in a
    // Kafka fetch, in random segment order; values pre-drawn so the timed loop is the engine.
    let mut keys: Vec<u8> = Vec::new();
    let draws: Vec<(u32, u32, f64, f64)> = (0..events)
        .map(|_| {
            let r = rng.next();
            let id = ids[(r % segments as u64) as usize].as_bytes();
            let at = keys.len() as u32;
            keys.extend_from_slice(id);
            let latency = 20.0 + ((r >> 20) % 4000) as f64 / 10.0;
            let error = if (r >> 40) % 50 == 0 { 1.0 } else { 0.0 };
            (at, id.len() as u32, latency, error)
        })
        .collect();
    let keys = String::from_utf8(keys).expect("segment ids are UTF-8");

    let baseline = allocated_bytes();
    let mut engine = WindowEngine::new(spec.clone());
    engine.assign(0);
    let mut closed: Vec<WindowSummary> = Vec::with_capacity(segments);
    // Memory: one event per segment in the first window, nothing closed yet.
    for (i, id) in ids.iter().enumerate() {
        engine
            .ingest(
                Position {
                    partition: 0,
                    offset: i as i64,
                },
                id,
                0,
                [("latency_ms", 100.0), ("error", 0.0)],
                0,
                &mut closed,
            )
            .expect("warm-up event should be accepted");
    }
    let bytes_per_segment = allocated_bytes().zip(baseline).map(|(now, baseline)| {
        (now - baseline - (closed.capacity() * std::mem::size_of::<WindowSummary>()) as isize)
            as f64
            / segments as f64
    });

    let start = Instant::now();
    let mut closed_count = 0u64;
    // Records arrive in batches, as from a consumer poll; the engine is told a batch's keys
    // ahead of ingesting it, on the schedule the pipeline uses.
    let key_of = |d: &(u32, u32, f64, f64)| &keys[d.0 as usize..(d.0 + d.1) as usize];
    let ts_of = |i: usize| (i as i64 * span_ms) / events.max(1) as i64;
    crate::window::with_hints(
        &mut engine,
        &draws,
        |engine, from, chunk| {
            engine.prefetch(
                chunk
                    .iter()
                    .enumerate()
                    .map(|(j, d)| (0, key_of(d), ts_of(from + j))),
            );
        },
        |engine, i, d| {
            let ts = ts_of(i);
            let _ = engine.ingest(
                Position {
                    partition: 0,
                    offset: (segments + i) as i64,
                },
                key_of(d),
                ts,
                [("latency_ms", d.2), ("error", d.3)],
                ts,
                &mut closed,
            );
            if closed.len() >= 4096 {
                closed_count += closed.len() as u64;
                closed.clear();
            }
        },
    );
    closed_count += closed.len() as u64;
    let elapsed = start.elapsed().as_secs_f64();
    WindowBenchReport {
        segments,
        events,
        windows_spanned,
        windows_closed: closed_count,
        elapsed_secs: elapsed,
        updates_per_sec: events as f64 / elapsed,
        bytes_per_segment,
    }
}

/// Figures of `segloop bench replay`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    pub records: u64,
    pub partitions: i32,
    pub segments: usize,
    pub replay_events_per_sec: f64,
    pub raw_consume_per_sec: f64,
    pub ratio: f64,
    /// The bare Java consumer over the same range, when it ran (see [`JavaConsumer`]).
    pub java_consume_per_sec: Option<f64>,
    /// Why the Java consumer did not run.
    pub java_skipped: Option<String>,
    /// The replay driver alone, records already in memory in merged order.
    pub engine_events_per_sec: f64,
    pub windows_closed: u64,
    pub commands: u64,
    /// CPU time of the whole process (broker included) per second of the last pass.
    pub raw_cpu_cores: f64,
    pub replay_cpu_cores: f64,
}

/// CPU seconds this process used so far (user + system), from `/proc/self/stat`; 0 elsewhere.
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat").map_or(0.0, |stat| stat_cpu(&stat).1)
}

/// A `/proc/.../stat` line's command name and CPU seconds (utime + stime, the 14th and 15th
/// fields, in clock ticks of 100 per second on Linux).
fn stat_cpu(stat: &str) -> (&str, f64) {
    let (head, rest) = stat.rsplit_once(')').unwrap_or((stat, ""));
    let name = head.split_once('(').map_or("", |x| x.1);
    // Fields after the parenthesised command name.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (name, (ticks(11) + ticks(12)) / 100.0)
}

impl ReplayReport {
    pub fn print(&self) {
        println!("bench=replay");
        println!("records={}", self.records);
        println!("partitions={}", self.partitions);
        println!("segments={}", self.segments);
        println!("windows_closed={}", self.windows_closed);
        println!("commands={}", self.commands);
        println!("replay_events_per_sec={:.0}", self.replay_events_per_sec);
        println!("raw_consume_per_sec={:.0}", self.raw_consume_per_sec);
        println!("replay_to_raw_ratio={:.2}", self.ratio);
        print_java(
            self.replay_events_per_sec,
            self.java_consume_per_sec,
            self.java_skipped.as_deref(),
            "replay_to_raw_ratio",
        );
        println!("engine_events_per_sec={:.0}", self.engine_events_per_sec);
        println!("raw_cpu_cores={:.2}", self.raw_cpu_cores);
        println!("replay_cpu_cores={:.2}", self.replay_cpu_cores);
    }
}

/// The bare Java consumer's rate and `rate`'s ratio to it, or why there is none (`instead`:
/// the ratio to read then).
fn print_java(rate: f64, java: Option<f64>, skipped: Option<&str>, instead: &str) {
    match java {
        Some(j) => {
            println!("java_consume_per_sec={j:.0}");
            println!("ratio={:.2}", rate / j);
        }
        None => {
            println!(
                "java_consume_per_sec=none ({})",
                skipped.unwrap_or("not run")
            );
            println!("ratio=none (no Java figure; see {instead})");
        }
    }
}

/// `segloop bench replay`: over the same records (on the embedded cluster or `broker`),
/// interleaved rounds of a bare rdkafka consumer reading the range, of the bare Java consumer
/// (when `java` can run: the ceiling the targets are stated against) and of the backtest
/// replaying it (merge, decode, windows, policies, controller, simulated actuator); the
/// fastest pass of each counts. Then the replay driver alone over the records held in memory.
///
/// # Errors
/// The cluster failed, or a pass did not see every record.
pub fn replay_bench(
    broker: Option<Broker<'_>>,
    records: u64,
    segments: usize,
    partitions: i32,
    rounds: usize,
    java: &Result<JavaConsumer, String>,
) -> anyhow::Result<ReplayReport> {
    use crate::backtest::{self, source, Options, Outcomes, Replay};

    let topic = bench_topic_on(broker, records, segments, partitions, 0.01)?;
    let config = &topic.config;
    let range = source::resolve_range(config, &config.topics.telemetry.name, None, 0)?;
    anyhow::ensure!(
        range.len() == records,
        "the topic kept {} of {records} records (the embedded cluster's retention): use more partitions or fewer --events",
        range.len()
    );
    let (mut raw_secs, mut replay_secs) = (f64::INFINITY, f64::INFINITY);
    let (mut raw_cores, mut replay_cores) = (0.0, 0.0);
    let mut java_secs = f64::INFINITY;
    let mut java_skipped = java.as_ref().err().cloned();
    let mut last = None;
    for round in 0..rounds.max(1) {
        let (t, c) = (Instant::now(), cpu_secs());
        let raw = source::read_raw(config, &range)?;
        raw_secs = raw_secs.min(t.elapsed().as_secs_f64());
        raw_cores = (cpu_secs() - c) / t.elapsed().as_secs_f64();
        anyhow::ensure!(
            raw.records == records,
            "raw pass read {} records",
            raw.records
        );
        if let (Ok(java), None) = (java, &java_skipped) {
            let group = format!("{}-replay-java-{round}", config.kafka.group_id);
            let topic = &config.topics.telemetry.name;
            match java.pass(&config.kafka.bootstrap_servers, topic, &group, records) {
                Ok(secs) => java_secs = java_secs.min(secs),
                Err(e) => java_skipped = Some(format!("{e:#}")),
            }
        }
        let (t, c) = (Instant::now(), cpu_secs());
        let r = backtest::run(config, topic.policies.clone(), &range, &Options::default())?;
        replay_secs = replay_secs.min(t.elapsed().as_secs_f64());
        replay_cores = (cpu_secs() - c) / t.elapsed().as_secs_f64();
        anyhow::ensure!(
            r.input.records_read == records,
            "replay read {} records",
            r.input.records_read
        );
        last = Some(r);
    }
    let report = last.expect("at least one round");

    // Engine only: the merged records in memory, replayed by the driver.
    // (partition, offset, broker time, key, value)
    type Held = (i32, i64, Option<i64>, i64, Vec<u8>, Vec<u8>);
    let mut held: Vec<Held> = Vec::new();
    let decoder = {
        let t = &config.topics.telemetry;
        crate::codec::fast::TelemetryDecoder::new(t.codec, &t.schema_settings())
            .map_err(anyhow::Error::msg)?
    };
    source::read_merged(
        config,
        &range,
        None,
        |k, v| decoder.event_time(k, v),
        |r| {
            held.push((
                r.partition,
                r.offset,
                r.broker_ts_ms,
                r.merge_ts,
                r.key.unwrap_or_default().to_vec(),
                r.value.unwrap_or_default().to_vec(),
            ))
        },
    )?;
    let parts: Vec<i32> = range.end.keys().copied().collect();
    let mut engine_secs = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let mut replay = Replay::new(
            config,
            topic.policies.clone(),
            &parts,
            (None, None),
            Outcomes::Simulated(Default::default()),
        )?;
        let t = Instant::now();
        for (p, o, ts, merge_ts, k, v) in &held {
            replay.on_record(*p, *o, *ts, Some(*merge_ts), Some(k), Some(v));
        }
        engine_secs = engine_secs.min(t.elapsed().as_secs_f64());
        std::hint::black_box(replay.clock_ms());
    }
    let replay_per_sec = records as f64 / replay_secs;
    let raw_per_sec = records as f64 / raw_secs;
    Ok(ReplayReport {
        records,
        partitions,
        segments,
        replay_events_per_sec: replay_per_sec,
        raw_consume_per_sec: raw_per_sec,
        ratio: replay_per_sec / raw_per_sec,
        java_consume_per_sec: java_skipped
            .is_none()
            .then(|| records as f64 / java_secs)
            .filter(|r| r.is_finite()),
        java_skipped,
        engine_events_per_sec: records as f64 / engine_secs,
        windows_closed: report.input.windows_closed,
        commands: report.totals.commands,
        raw_cpu_cores: raw_cores,
        replay_cpu_cores: replay_cores,
    })
}

/// Figures of `segloop bench delivery`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryReport {
    pub records: u64,
    pub partitions: i32,
    pub segments: usize,
    pub at_least_once_events_per_sec: f64,
    pub exactly_once_events_per_sec: f64,
    pub transactions: u64,
}

impl DeliveryReport {
    pub fn print(&self) {
        println!("bench=delivery");
        println!("records={}", self.records);
        println!("partitions={}", self.partitions);
        println!("segments={}", self.segments);
        println!(
            "at_least_once_events_per_sec={:.0}",
            self.at_least_once_events_per_sec
        );
        println!(
            "exactly_once_events_per_sec={:.0}",
            self.exactly_once_events_per_sec
        );
        println!(
            "exactly_once_to_at_least_once_ratio={:.2}",
            self.exactly_once_events_per_sec / self.at_least_once_events_per_sec
        );
        println!("exactly_once_commits={}", self.transactions);
    }
}

/// `segloop bench delivery --bootstrap HOST:PORT`: the whole pipeline over the same records
/// on a real broker (the embedded one has no transactions), in at-least-once and in
/// exactly-once mode, interleaved rounds in fresh consumer groups; the fastest pass of each.
///
/// # Errors
/// The broker, the topics or a pass failed.
pub fn delivery_bench(
    broker: Broker<'_>,
    records: u64,
    segments: usize,
    partitions: i32,
    rounds: usize,
) -> anyhow::Result<DeliveryReport> {
    let topic = bench_topic_on(Some(broker), records, segments, partitions, 0.01)?;
    let (mut alo, mut eos, mut commits) = (f64::INFINITY, f64::INFINITY, 0);
    for round in 0..rounds.max(1) {
        for exactly_once in [false, true] {
            let mut cfg = topic.config.clone();
            cfg.kafka.group_id = format!("{}-{round}-{exactly_once}", topic.config.kafka.group_id);
            if exactly_once {
                cfg.delivery.mode = crate::config::DeliveryMode::ExactlyOnce;
                cfg.delivery.transactional_id = Some(cfg.kafka.group_id.clone());
            }
            let (secs, report, _, _) = pipeline_pass(cfg, topic.policies.clone(), records)?;
            if exactly_once {
                eos = eos.min(secs);
                commits = report.commits;
            } else {
                alo = alo.min(secs);
            }
        }
    }
    Ok(DeliveryReport {
        records,
        partitions,
        segments,
        at_least_once_events_per_sec: records as f64 / alo,
        exactly_once_events_per_sec: records as f64 / eos,
        transactions: commits,
    })
}

/// `segloop bench restore`: writes the controller state of `segments` segments (each with a
/// command in flight) to the state topic, then times restoring every partition into a fresh
/// controller, as an assign after a restart does.
///
/// # Errors
/// The cluster or the topics failed, or fewer segments came back than were written.
pub fn restore_bench(
    broker: Option<Broker<'_>>,
    segments: usize,
    partitions: i32,
) -> anyhow::Result<(usize, f64)> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let topic = bench_topic_on(broker, 0, 1, partitions, 0.0)?;
    let config = &topic.config;
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        crate::kafka::producer_config(config, &[("linger.ms", "20"), ("compression.type", "lz4")])
            .create()?;
    for i in 0..segments {
        let segment = format!("r{}/svc-{}/ep-{i}", i % 4, i % 50);
        let partition = crate::kafka::murmur2_partition(segment.as_bytes(), partitions);
        let bytes = in_flight_state(&segment, partition, i as i64).to_bytes();
        let rec = BaseRecord::<[u8], [u8]>::to(&config.topics.state.name)
            .key(segment.as_bytes())
            .payload(&bytes)
            .partition(partition);
        crate::kafka::send_waiting(&producer, rec)?;
    }
    producer.flush(std::time::Duration::from_secs(60))?;
    let mut controller = crate::controller::Controller::new(topic.policies.clone());
    let reader = crate::runtime::state_reader(config)?;
    let started = Instant::now();
    let mut restored = 0;
    for p in 0..partitions {
        controller.assign(p);
        let (states, _marks) = crate::runtime::read_state_partition(
            &reader,
            &config.topics.state.name,
            p,
            started + config.delivery.restore_timeout,
            &mut |_, _| {},
        )?;
        for s in states {
            controller.restore(s).map_err(anyhow::Error::msg)?;
            restored += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        restored == segments,
        "restored {restored} of {segments} segments (embedded retention? use more partitions)"
    );
    Ok((restored, secs))
}

/// A segment's controller state with one command awaiting its outcome.
fn in_flight_state(segment: &str, partition: i32, at_ms: i64) -> crate::controller::SegmentState {
    use crate::controller::{LoopState, Phase, SegmentState};
    let id = crate::controller::command_id(segment, "errors", at_ms, 1);
    SegmentState {
        version: crate::controller::RECORD_VERSION,
        segment: segment.to_string(),
        partition,
        loops: std::collections::BTreeMap::from([(
            "errors".to_string(),
            LoopState {
                phase: Phase::Commanded,
                breaches: 2,
                healthy: 0,
                incident_start_ms: Some(at_ms),
                attempt: 1,
                command_id: Some(id),
                deadline_ms: Some(at_ms + 30_000),
                issued_at_ms: Some(at_ms + 2_000),
                applied_at_ms: None,
                reason: Some(crate::model::CommandReason {
                    condition: "mean(error) > 0.5".into(),
                    metric: "mean(error)".into(),
                    observed: 0.9,
                    threshold: 0.5,
                    window_start_ms: at_ms,
                    window_end_ms: at_ms + 1_000,
                }),
            },
        )]),
        last_action_ms: std::collections::BTreeMap::from([("rollback".to_string(), at_ms + 2_000)]),
        action_history: vec![at_ms + 2_000],
        frozen_until_ms: None,
        escalated_freeze_ms: None,
        last_window_end_ms: at_ms + 2_000,
        last_window_end_by_group: std::collections::BTreeMap::new(),
        globs: Default::default(),
    }
}
