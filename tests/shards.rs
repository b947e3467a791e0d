//! A pipeline split into shards (`engine.threads`) does what one shard does: the same
//! commands, decisions, rejections, counts and commit floors for any input, with its shards'
//! rounds run on threads of their own.

use proptest::prelude::*;
use segloop::codec::DecodeError;
use segloop::config::{Config, Sources};
use segloop::controller::Effects;
use segloop::pipeline::{Cause, Fanout, Options, Pipeline, Record, Sink, CLOSED_PER_ROUND};
use segloop::policy::PolicySet;

#[path = "support/telemetry.rs"]
mod telemetry;

/// Everything a pipeline hands its driver, in a form that compares as a multiset (shards judge
/// their windows shard after shard, so the order across partitions differs).
#[derive(Default, Debug, PartialEq)]
struct Seen {
    commands: Vec<String>,
    decisions: Vec<String>,
    rejected: Vec<(i32, i64, String)>,
}

impl Seen {
    fn sorted(mut self) -> Self {
        self.commands.sort();
        self.decisions.sort();
        self.rejected.sort();
        self
    }
}

impl Sink for Seen {
    fn reject(&mut self, r: &Record<'_>, e: &DecodeError) {
        self.rejected
            .push((r.partition, r.offset, e.code.as_str().to_string()));
    }
    fn effects(&mut self, fx: &mut Effects, _: Cause<'_>, _: &PolicySet) {
        for c in fx.commands.drain(..) {
            self.commands.push(format!(
                "{} {} {} {} {}",
                c.command_id, c.segment, c.policy, c.attempt, c.issued_at_ms
            ));
        }
        for d in fx.decisions.drain(..) {
            self.decisions.push(format!(
                "{} {} {} {} {} {:?} {:?} {:?}",
                d.segment,
                d.policy,
                d.ts_ms,
                d.from_state,
                d.to_state,
                d.window_start_ms,
                d.guardrail,
                d.aggregates
            ));
        }
        fx.timings.clear();
    }
}

/// Runs a round's shards on threads of their own.
struct Threads;

impl Fanout for Threads {
    fn run(&self, tasks: &mut [&mut (dyn FnMut() + Send)]) {
        std::thread::scope(|s| {
            for t in tasks.iter_mut() {
                s.spawn(t);
            }
        });
    }
}

fn config() -> Config {
    Config::load(&Sources {
        file: None,
        env: &Default::default(),
        overrides: &[
            "windows.size=1s".into(),
            "windows.out_of_orderness=200ms".into(),
        ],
    })
    .unwrap()
}

/// Limits that never bind: with them, judging order cannot change what fires.
fn policies() -> PolicySet {
    policies_with("blast_radius = 1.0\nmax_in_flight = 100000", 2)
}

/// One policy (errors over half the window, `for_windows` windows) under `guardrails`.
fn policies_with(guardrails: &str, for_windows: u32) -> PolicySet {
    PolicySet::parse(
        &format!(
            r#"
[guardrails]
{guardrails}
max_actions_per_minute = 1000000

[[policies]]
name = "errors"
when = "mean(error) > 0.5"
for = {for_windows}
action = "rollback"
"#
        ),
        "p.toml",
    )
    .unwrap()
}

fn encode(segment: &str, ts: i64, error: f64) -> Vec<u8> {
    telemetry::encode(segment, ts, error, &[])
}

/// One record of a generated input: (partition, segment, event time, failing, garbage).
type Input = (i32, String, i64, bool, bool);

/// Feeds `batches` to a pipeline of `shards` shards over `partitions` partitions, each batch
/// at the clock of its newest event, then moves the clock far on; gives what it saw, its
/// counts and the commit floors after every batch.
fn drive(
    shards: usize,
    partitions: i32,
    batches: &[Vec<Input>],
) -> (Seen, segloop::pipeline::InputStats, Vec<Vec<Option<i64>>>) {
    let (seen, stats, floors) = drive_with(policies(), Feed::Batches(shards), partitions, batches);
    (seen.sorted(), stats, floors)
}

/// How a test hands records to the pipeline.
#[derive(Clone, Copy)]
enum Feed {
    /// Whole batches (`on_batch_with`, rounds on threads) to this many shards.
    Batches(usize),
    /// One record at a time to one shard, each judged at once (`on_record`): every window
    /// judged in order by the controller, none by a shard.
    InOrder,
}

/// [`drive`] with `policies`, fed as `feed` says; what it saw in the order it saw it.
fn drive_with(
    policies: PolicySet,
    feed: Feed,
    partitions: i32,
    batches: &[Vec<Input>],
) -> (Seen, segloop::pipeline::InputStats, Vec<Vec<Option<i64>>>) {
    let shards = match feed {
        Feed::Batches(n) => n,
        Feed::InOrder => 1,
    };
    let mut p = Pipeline::sharded(&config(), policies, Options::live(), shards).unwrap();
    for q in 0..partitions {
        p.assign(q);
    }
    let mut seen = Seen::default();
    let mut floors = Vec::new();
    let mut offsets = vec![0i64; partitions as usize];
    for batch in batches {
        let values: Vec<(i32, i64, Vec<u8>, &str)> = batch
            .iter()
            .map(|(q, seg, ts, failing, garbage)| {
                let o = offsets[*q as usize];
                offsets[*q as usize] += 1;
                let v = if *garbage {
                    vec![0xc3, 0x01, 0xff]
                } else {
                    encode(seg, *ts, if *failing { 1.0 } else { 0.0 })
                };
                (*q, o, v, seg.as_str())
            })
            .collect();
        let records: Vec<Record<'_>> = values
            .iter()
            .enumerate()
            .map(|(i, (q, o, v, seg))| Record {
                partition: *q,
                offset: *o,
                key: Some(seg.as_bytes()),
                value: Some(v),
                timestamp_ms: None,
                handle: i,
            })
            .collect();
        let now = batch.iter().map(|r| r.2).max().unwrap_or(0);
        match feed {
            Feed::Batches(_) => p.on_batch_with(&records, now, &mut seen, &Threads),
            Feed::InOrder => {
                for r in &records {
                    p.on_record(r, now, &mut seen);
                }
            }
        }
        p.tick(now, true, &mut seen);
        floors.push((0..partitions).map(|q| p.committable_offset(q)).collect());
    }
    p.tick(10_000_000, true, &mut seen);
    (seen, p.stats(), floors)
}

/// Batches of records over 1 to `partitions - 1` partitions and `segments` segments, event
/// times below `ts_max`, failing with weight `failing`, 2-3% garbage.
fn batches(
    partitions: std::ops::Range<i32>,
    segments: u8,
    ts_max: i64,
    failing: f64,
    per_batch: std::ops::Range<usize>,
    count: std::ops::Range<usize>,
) -> impl Strategy<Value = (i32, Vec<Vec<Input>>)> {
    partitions.prop_flat_map(move |partitions| {
        let record = (
            0..partitions,
            0..segments,
            0..ts_max,
            prop::bool::weighted(failing),
            prop::bool::weighted(0.03),
        )
            .prop_map(|(q, s, ts, failing, garbage)| (q, format!("s{s}"), ts, failing, garbage));
        (
            Just(partitions),
            prop::collection::vec(
                prop::collection::vec(record, per_batch.clone()),
                count.clone(),
            ),
        )
    })
}

fn inputs() -> impl Strategy<Value = (i32, Vec<Vec<Input>>)> {
    batches(1..6, 24, 30_000, 0.5, 0..60, 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any input, any number of shards: the same commands, decisions and rejections (as
    /// multisets), the same counts, the same commit floor after every batch as one shard.
    #[test]
    fn sharded_pipelines_do_what_one_shard_does((partitions, batches) in inputs(), shards in 2usize..5) {
        let one = drive(1, partitions, &batches);
        let many = drive(shards, partitions, &batches);
        prop_assert_eq!(&one.0, &many.0);
        prop_assert_eq!(&one.1, &many.1);
        prop_assert_eq!(&one.2, &many.2);
        prop_assert!(one.1.records_read > 0 || batches.iter().all(Vec::is_empty));
    }
}

/// Limits that bind: the blast radius (a fraction of the segments known when a loop fires)
/// and the in-flight limit stop firings, so judging order matters.
fn binding_policies() -> PolicySet {
    policies_with("blast_radius = 0.12\nmax_in_flight = 5", 1)
}

/// Inputs with many segments new in each batch beside failing ones: the number of segments
/// known moves the blast radius within a batch.
fn many_segments() -> impl Strategy<Value = (i32, Vec<Vec<Input>>)> {
    batches(1..4, 80, 20_000, 0.3, 0..120, 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A shard judges the windows that move no loop while its round runs, the controller the
    /// others after it: with limits that bind, the commands and decisions are exactly those of
    /// judging every window in order, one record at a time, in the same order.
    #[test]
    fn windows_judged_by_the_shard_leave_the_limits_exact((partitions, batches) in many_segments()) {
        let batched = drive_with(binding_policies(), Feed::Batches(1), partitions, &batches);
        let in_order = drive_with(binding_policies(), Feed::InOrder, partitions, &batches);
        prop_assert_eq!(&batched.0.commands, &in_order.0.commands);
        prop_assert_eq!(&batched.0.decisions, &in_order.0.decisions);
        prop_assert_eq!(&batched.1, &in_order.1);
        prop_assert_eq!(&batched.2, &in_order.2);
    }
}

/// A batch that closes more windows than a shard collects in one round (several rounds, the
/// buffer judged between them): every window is judged, once, and the commands match one
/// shard's.
#[test]
fn a_batch_closing_many_windows_is_judged_in_rounds() {
    let segments = 3 * CLOSED_PER_ROUND;
    let mut first = Vec::new();
    let mut second = Vec::new();
    for i in 0..segments {
        let q = (i % 4) as i32;
        // Two failing windows per segment: the policy fires on the second.
        first.push((q, format!("seg-{i}"), 100, true, false));
        second.push((q, format!("seg-{i}"), 1_100, true, false));
    }
    let third: Vec<Input> = (0..4)
        .map(|q| (q, "tick".into(), 5_000, false, false))
        .collect();
    let batches = vec![first, second, third];
    let one = drive(1, 4, &batches);
    let two = drive(2, 4, &batches);
    assert_eq!(one.0.commands.len(), segments, "every segment fired once");
    assert_eq!(one, two);
    assert!(two.1.windows_closed >= 2 * segments as u64);
}

/// Partitions spread over the shards whatever their numbers (an instance of a scaled-out
/// group owns a subset), and the segment cap is split between the shards.
#[test]
fn partitions_spread_over_shards_and_the_segment_cap_is_split() {
    let mut c = config();
    c.windows.max_segments = 10;
    let mut p = Pipeline::sharded(&c, policies(), Options::live(), 2).unwrap();
    for q in [0, 2, 4, 6] {
        p.assign(q);
    }
    let owners: Vec<Option<usize>> = [0, 2, 4, 6].iter().map(|q| p.shard_of(*q)).collect();
    assert_eq!(owners, [Some(0), Some(1), Some(0), Some(1)]);
    assert_eq!(p.shard_of(1), None);
    p.revoke(2);
    assert_eq!(p.shard_of(2), None);
    p.assign(8);
    assert_eq!(p.shard_of(8), Some(1), "the shard with fewer partitions");
    // 12 segments on one shard's partitions: its share of the cap (5) holds.
    let mut seen = Seen::default();
    let names: Vec<String> = (0..12).map(|i| format!("x{i}")).collect();
    let values: Vec<Vec<u8>> = names.iter().map(|n| encode(n, 100, 0.0)).collect();
    let records: Vec<Record<'_>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            partition: 0,
            offset: i as i64,
            key: Some(names[i].as_bytes()),
            value: Some(v),
            timestamp_ms: None,
            handle: i,
        })
        .collect();
    p.on_batch_with(&records, 100, &mut seen, &Threads);
    assert_eq!(seen.rejected, []);
    assert_eq!(p.engine_stats().segments, 5);
    assert_eq!(p.engine_stats().evicted_segments, 7);
    assert_eq!(p.stats().records_aggregated, 12);
}

/// `segloop bench shards` runs the same data on 1 and 2 threads: both judge every window
/// (the same commands) and report a rate.
#[test]
fn the_shards_bench_runs_every_thread_count_on_the_same_data() {
    let r = segloop::bench::shards_bench(&config(), 20_000, 300, 4, &[1, 2], 1).unwrap();
    assert_eq!(r.runs.len(), 2);
    let (one, two) = (&r.runs[0], &r.runs[1]);
    assert_eq!((one.0, two.0), (1, 2));
    assert!(one.3 > 0, "the breaching segments get commands: {r:?}");
    assert_eq!(one.3, two.3, "{r:?}");
    assert!(one.1 > 0.0 && two.1 > 0.0 && one.2.is_finite(), "{r:?}");
}
