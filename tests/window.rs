//! Window engine behaviour with an injected clock, and a property test against a naive
//! reference (sort all events, bucket them).

use std::collections::BTreeMap;

use proptest::prelude::*;
use segloop::window::Rejected;
use segloop::window::{Position, WindowEngine, WindowSpec, WindowSummary};

fn spec(size_ms: i64, hop_ms: i64) -> WindowSpec {
    WindowSpec {
        size_ms,
        hop_ms,
        out_of_orderness_ms: 100,
        grace_ms: 0,
        idle_timeout_ms: 5_000,
        max_clock_skew_ms: 60_000,
        segment_ttl_ms: 60_000,
        max_segments: 1_000,
        quantile_measurements: vec!["latency_ms".into()],
        relative_accuracy: 0.01,
    }
}

struct Harness {
    engine: WindowEngine,
    closed: Vec<WindowSummary>,
    offset: i64,
}

impl Harness {
    fn new(spec: WindowSpec) -> Self {
        let mut engine = WindowEngine::new(spec);
        engine.assign(0);
        Harness {
            engine,
            closed: Vec::new(),
            offset: 0,
        }
    }

    /// Ingest on partition 0 with the controller clock at the event time.
    fn event(&mut self, seg: &str, ts: i64, latency: f64) -> Result<(), Rejected> {
        self.event_at(seg, ts, latency, ts)
    }

    fn event_at(&mut self, seg: &str, ts: i64, latency: f64, now: i64) -> Result<(), Rejected> {
        let offset = self.offset;
        self.offset += 1;
        self.engine
            .ingest(
                Position {
                    partition: 0,
                    offset,
                },
                seg,
                ts,
                [("latency_ms", latency), ("error", 0.0)],
                now,
                &mut self.closed,
            )
            .map_err(|e| e.kind)
    }

    fn take(&mut self) -> Vec<WindowSummary> {
        std::mem::take(&mut self.closed)
    }
}

#[test]
fn a_window_closes_when_the_watermark_passes_its_end() {
    let mut h = Harness::new(spec(1_000, 1_000));
    h.event("a", 100, 10.0).unwrap();
    h.event("a", 900, 30.0).unwrap();
    h.event("a", 1_050, 5.0).unwrap(); // watermark 950: window [0,1000) still open
    assert!(h.take().is_empty());
    h.event("a", 1_100, 5.0).unwrap(); // watermark 1000: closes [0,1000)
    let closed = h.take();
    assert_eq!(closed.len(), 1);
    let w = &closed[0];
    assert_eq!((w.start_ms, w.end_ms, w.count), (0, 1_000, 2));
    let lat = w.measurement("latency_ms").unwrap();
    assert_eq!(
        (lat.count, lat.sum, lat.min, lat.max),
        (2, 40.0, 10.0, 30.0)
    );
    assert_eq!(lat.mean(), Some(20.0));
    assert_eq!(w.rate(), 2.0);
    assert!(
        w.measurement("error").unwrap().quantile(0.5).is_none(),
        "no sketch for error"
    );
}

#[test]
fn grace_delays_closing_and_accepts_events_until_then() {
    let mut s = spec(1_000, 1_000);
    s.grace_ms = 500;
    let mut h = Harness::new(s);
    h.event("a", 100, 1.0).unwrap();
    h.event("a", 1_200, 1.0).unwrap(); // watermark 1100 < 1000 + 500
    h.event("a", 950, 1.0).unwrap(); // behind the watermark but within grace: accepted
    assert!(h.take().is_empty());
    h.event("a", 1_600, 1.0).unwrap(); // watermark 1500: closes [0,1000)
    let closed = h.take();
    assert_eq!(closed[0].count, 2);
    assert_eq!(h.event("a", 999, 1.0), Err(Rejected::Late));
}

#[test]
fn late_events_are_returned_and_counted() {
    let mut h = Harness::new(spec(1_000, 1_000));
    h.event("a", 100, 1.0).unwrap();
    h.event("a", 2_500, 1.0).unwrap();
    assert_eq!(h.event("a", 500, 1.0), Err(Rejected::Late));
    assert_eq!(h.event("b", 1_999, 1.0), Err(Rejected::Late));
    assert_eq!(h.engine.stats().late, 2);
    // A late event does not feed any window.
    assert!(h.take().iter().all(|w| w.count <= 1));
}

#[test]
fn events_too_far_ahead_of_the_controller_clock_are_clock_skew() {
    let mut h = Harness::new(spec(1_000, 1_000));
    h.event_at("a", 1_000, 1.0, 1_000).unwrap();
    assert_eq!(
        h.event_at("a", 1_000 + 60_001, 1.0, 1_000),
        Err(Rejected::ClockSkew)
    );
    // The skewed event did not move the watermark: an on-time event is not late.
    h.event_at("a", 1_500, 1.0, 1_500).unwrap();
    assert_eq!(h.engine.stats().clock_skew, 1);
    assert!(h.engine.partition(0).unwrap().watermark_ms() < 1_500);
}

#[test]
fn non_finite_values_are_skipped_and_counted() {
    let mut h = Harness::new(spec(1_000, 1_000));
    h.event("a", 10, f64::NAN).unwrap();
    h.event("a", 20, f64::INFINITY).unwrap();
    h.event("a", 30, 7.0).unwrap();
    h.event("a", 5_000, 1.0).unwrap();
    let w = &h.take()[0];
    assert_eq!(w.count, 3, "events still count");
    assert_eq!(w.measurement("latency_ms").unwrap().count, 1);
    assert_eq!(h.engine.stats().non_finite_values, 2);
}

#[test]
fn quiet_segments_close_empty_windows_and_idle_partitions_advance() {
    let mut h = Harness::new(spec(1_000, 1_000));
    h.event("busy", 100, 1.0).unwrap();
    h.event("quiet", 200, 1.0).unwrap();
    for t in (1_000..4_200).step_by(100) {
        h.event("busy", t, 1.0).unwrap();
    }
    let quiet: Vec<_> = h
        .take()
        .into_iter()
        .filter(|w| &*w.segment == "quiet")
        .map(|w| (w.start_ms, w.count))
        .collect();
    assert_eq!(quiet, vec![(0, 1), (1_000, 0), (2_000, 0), (3_000, 0)]);

    // Now the whole partition goes silent: nothing closes until idle_timeout passes.
    let mut closed = Vec::new();
    h.engine.advance_idle(4_100 + 4_999, &mut closed);
    assert!(closed.is_empty());
    h.engine.advance_idle(4_100 + 7_000, &mut closed); // watermark → 6_100
    let windows: Vec<_> = closed
        .iter()
        .filter(|w| &*w.segment == "quiet")
        .map(|w| w.start_ms)
        .collect();
    assert_eq!(windows, vec![4_000, 5_000]);
}

#[test]
fn idle_segments_expire_after_the_ttl() {
    let mut s = spec(1_000, 1_000);
    s.segment_ttl_ms = 3_000;
    let mut h = Harness::new(s);
    h.event("gone", 100, 1.0).unwrap();
    for t in (0..6_000).step_by(250) {
        h.event("stays", t, 1.0).unwrap();
    }
    let gone = h.take().iter().filter(|w| &*w.segment == "gone").count();
    // Windows [0,1000) .. [3000,4000): the one ending 4000 is 3900 ms past its last event.
    assert_eq!(gone, 4);
    assert_eq!(h.engine.stats().expired_segments, 1);
    assert_eq!(h.engine.stats().segments, 1);
}

#[test]
fn the_segment_cap_evicts_the_longest_idle_first() {
    let mut s = spec(1_000, 1_000);
    s.max_segments = 3;
    let mut h = Harness::new(s);
    h.event("old", 1, 1.0).unwrap();
    h.event("mid", 2, 1.0).unwrap();
    h.event("new", 3, 1.0).unwrap();
    h.event("old", 4, 1.0).unwrap(); // old is now the most recent
    h.event("fourth", 5, 1.0).unwrap(); // evicts mid (longest idle)
    assert_eq!(h.engine.stats().evicted_segments, 1);
    h.event("x", 5_000, 1.0).unwrap();
    let segs: Vec<String> = h.take().iter().map(|w| w.segment.to_string()).collect();
    assert!(!segs.contains(&"mid".to_string()), "{segs:?}");
    assert!(segs.contains(&"old".to_string()));
}

#[test]
fn revoke_drops_exactly_that_partitions_segments() {
    let mut e = WindowEngine::new(spec(1_000, 1_000));
    e.assign(0);
    e.assign(1);
    let mut closed = Vec::new();
    e.ingest(
        Position {
            partition: 0,
            offset: 0,
        },
        "p0-a",
        10,
        [("x", 1.0)],
        10,
        &mut closed,
    )
    .unwrap();
    e.ingest(
        Position {
            partition: 0,
            offset: 1,
        },
        "p0-b",
        10,
        [("x", 1.0)],
        10,
        &mut closed,
    )
    .unwrap();
    e.ingest(
        Position {
            partition: 1,
            offset: 0,
        },
        "p1-a",
        10,
        [("x", 1.0)],
        10,
        &mut closed,
    )
    .unwrap();
    assert_eq!(e.revoke(0), Some(2));
    assert_eq!(e.stats().segments, 1);
    assert_eq!(e.partition(1).unwrap().segment_count(), 1);
    let err = e
        .ingest(
            Position {
                partition: 0,
                offset: 2,
            },
            "p0-a",
            20,
            [("x", 1.0)],
            20,
            &mut closed,
        )
        .unwrap_err();
    assert_eq!(err.kind, Rejected::NotAssigned);
}

#[test]
fn committable_offset_is_the_lowest_offset_feeding_an_open_window() {
    let mut h = Harness::new(spec(1_000, 1_000));
    assert_eq!(h.engine.committable_offset(0), None);
    h.event("a", 100, 1.0).unwrap(); // offset 0, window [0,1000)
    h.event("b", 1_050, 1.0).unwrap(); // offset 1, window [1000,2000)
    h.event("a", 950, 1.0).unwrap(); // offset 2, window [0,1000) (out of order)
    assert_eq!(h.engine.committable_offset(0), Some(0));
    h.event("c", 1_100, 1.0).unwrap(); // offset 3
                                       // Offset 4: the median progress of a, b, c is now 1_100: [0,1000) closes.
    h.event("b", 1_200, 1.0).unwrap();
    assert_eq!(h.take().len(), 1, "b and c did not exist before 1000");
    // Offsets 0 and 2 fed the closed window; 1 is the lowest still open.
    assert_eq!(h.engine.committable_offset(0), Some(1));
    // Rejected records move the "nothing open" position but never the low mark.
    assert_eq!(h.event("a", 10, 1.0), Err(Rejected::Late)); // offset 5
    assert_eq!(h.engine.committable_offset(0), Some(1));
    let mut closed = Vec::new();
    h.engine.advance_idle(1_200 + 10_000, &mut closed);
    assert_eq!(
        h.engine.committable_offset(0),
        Some(6),
        "all closed: next offset"
    );
}

#[test]
fn hopping_windows_merge_panes() {
    let mut h = Harness::new(spec(3_000, 1_000));
    for (t, v) in [(100, 1.0), (1_100, 2.0), (2_100, 4.0), (3_100, 8.0)] {
        h.event("a", t, v).unwrap();
    }
    h.event("a", 10_000, 0.0).unwrap();
    let sums: Vec<(i64, f64)> = h
        .take()
        .iter()
        .map(|w| {
            (
                w.start_ms,
                w.measurement("latency_ms").map_or(0.0, |m| m.sum),
            )
        })
        .collect();
    // Windows end at 1000, 2000, ... (the first ones are partial from the segment's start).
    assert_eq!(
        &sums[..6],
        &[
            (-2_000, 1.0),
            (-1_000, 3.0),
            (0, 7.0),
            (1_000, 14.0),
            (2_000, 12.0),
            (3_000, 8.0)
        ]
    );
}

#[test]
fn quantiles_are_within_one_percent() {
    let mut h = Harness::new(spec(10_000, 10_000));
    let mut values: Vec<f64> = (1..=5_000).map(|i| (i * 37 % 5_000 + 1) as f64).collect();
    for (i, v) in values.iter().enumerate() {
        h.event("a", i as i64, *v).unwrap();
    }
    h.event("a", 50_000, 1.0).unwrap();
    let w = h.take().remove(0);
    let m = w.measurement("latency_ms").unwrap();
    values.sort_by(f64::total_cmp);
    for q in [0.5, 0.9, 0.95, 0.99, 0.123] {
        let truth = values[(q * (values.len() - 1) as f64) as usize];
        let est = m.quantile(q).unwrap();
        assert!(
            (est - truth).abs() <= 0.01 * truth,
            "q={q}: {est} vs {truth}"
        );
    }
}

// ---- property test against a naive reference -------------------------------------------

#[derive(Debug, Clone)]
struct Ev {
    seg: u8,
    ts: i64,
    lat: u16,
    err: bool,
}

/// Events in roughly increasing time with bounded disorder (≤ out_of_orderness).
fn arb_stream() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (0u8..6, 0i64..60, -100i64..=0, 1u16..5_000, any::<bool>()),
        1..400,
    )
    .prop_map(|raw| {
        let mut t = 1_000_000i64;
        raw.into_iter()
            .map(|(seg, step, jitter, lat, err)| {
                t += step;
                Ev {
                    seg,
                    ts: t + jitter,
                    lat,
                    err,
                }
            })
            .collect()
    })
}

type Key = (String, i64);

/// Segment names: short ones, and ones longer than what a slot keeps inline that share a long
/// prefix (so only the tail tells them apart).
fn seg_name(seg: u8) -> String {
    if seg < 3 {
        format!("s{seg}")
    } else {
        format!("region-0/cluster-07/service-checkout/endpoint-{seg}")
    }
}

fn reference(events: &[Ev], size: i64, hop: i64) -> BTreeMap<Key, Vec<&Ev>> {
    let mut windows: BTreeMap<Key, Vec<&Ev>> = BTreeMap::new();
    for e in events {
        let pane = e.ts.div_euclid(hop) * hop;
        let mut end = pane + hop;
        while end <= pane + size {
            windows
                .entry((seg_name(e.seg), end - size))
                .or_default()
                .push(e);
            end += hop;
        }
    }
    windows
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn closed_windows_match_a_naive_reference(
        events in arb_stream(),
        geometry in 0u8..3,
    ) {
        // Hopping; tumbling with lateness under a window; tumbling with lateness of
        // two windows (three panes open at once).
        let (size, hop) = [(300, 100), (200, 200), (50, 50)][geometry as usize];
        let mut s = spec(size, hop);
        s.out_of_orderness_ms = 100;
        let mut engine = WindowEngine::new(s);
        engine.assign(0);
        let mut closed = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let seg = seg_name(e.seg);
            let r = engine.ingest(Position { partition: 0, offset: i as i64 }, &seg, e.ts,
                [("latency_ms", e.lat as f64), ("error", if e.err { 1.0 } else { 0.0 })],
                e.ts, &mut closed,
            );
            prop_assert!(r.is_ok(), "disorder within out_of_orderness is never late: {:?}", r);
        }
        let last = events.iter().map(|e| e.ts).max().unwrap();
        engine.advance_idle(last + 10_000, &mut closed);

        let want = reference(&events, size, hop);
        let mut seen = BTreeMap::new();
        for w in &closed {
            let key = (w.segment.to_string(), w.start_ms);
            prop_assert!(seen.insert(key.clone(), ()).is_none(), "window {:?} closed twice", key);
            prop_assert_eq!(w.end_ms - w.start_ms, size);
            match want.get(&key) {
                None => prop_assert_eq!(w.count, 0, "{:?} has no events in the reference", key),
                Some(evs) => {
                    prop_assert_eq!(w.count, evs.len() as u64);
                    let lat = w.measurement("latency_ms").unwrap();
                    let mut vals: Vec<f64> = evs.iter().map(|e| e.lat as f64).collect();
                    prop_assert_eq!(lat.sum, vals.iter().sum::<f64>());
                    prop_assert_eq!(lat.min, vals.iter().cloned().fold(f64::INFINITY, f64::min));
                    prop_assert_eq!(lat.max, vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
                    let errs = evs.iter().filter(|e| e.err).count() as f64;
                    prop_assert_eq!(w.measurement("error").unwrap().sum, errs);
                    vals.sort_by(f64::total_cmp);
                    for q in [0.5, 0.9, 0.99] {
                        let truth = vals[(q * (vals.len() - 1) as f64) as usize];
                        let est = lat.quantile(q).unwrap();
                        prop_assert!((est - truth).abs() <= 0.01 * truth, "q={} {} vs {}", q, est, truth);
                    }
                }
            }
        }
        for key in want.keys() {
            prop_assert!(seen.contains_key(key), "reference window {:?} never closed", key);
        }
        prop_assert_eq!(engine.committable_offset(0), Some(events.len() as i64));
    }

    #[test]
    fn prefetch_hints_change_nothing_but_speed(
        events in arb_stream(),
        batch in 1usize..40,
        ahead in 0usize..5,
        junk in any::<bool>(),
    ) {
        let describe = |closed: &[segloop::window::WindowSummary]| {
            closed.iter().map(|w| format!("{}:{}:{}:{:?}", w.segment, w.start_ms, w.count,
                w.measurement("latency_ms").map(|m| (m.sum, m.min, m.max, m.quantile(0.9)))))
                .collect::<Vec<_>>()
        };
        let run = |hinted: bool| {
            let mut engine = WindowEngine::new(spec(200, 200));
            engine.assign(0);
            let mut closed = Vec::new();
            let names: Vec<String> = events.iter().map(|e| seg_name(e.seg)).collect();
            for (i, e) in events.iter().enumerate() {
                if hinted && i % batch == 0 {
                    let from = (i + ahead * batch).min(events.len());
                    let to = (from + batch).min(events.len());
                    let mut hints: Vec<(i32, &str, i64)> =
                        (from..to).map(|j| (0, names[j].as_str(), events[j].ts)).collect();
                    if junk {
                        // Unassigned partitions, unknown segments, wild times.
                        hints.push((7, "nobody", 0));
                        hints.push((-3, "s1", i64::MIN / 4));
                        hints.push((0, "never-seen", i64::MAX / 4));
                    }
                    engine.prefetch(hints);
                }
                let _ = engine.ingest(Position { partition: 0, offset: i as i64 }, &names[i], e.ts,
                    [("latency_ms", e.lat as f64)], e.ts, &mut closed);
            }
            let last = events.iter().map(|e| e.ts).max().unwrap();
            engine.advance_idle(last + 10_000, &mut closed);
            (describe(&closed), engine.stats(), engine.committable_offset(0))
        };
        prop_assert_eq!(run(false), run(true));
    }

    #[test]
    fn same_input_same_output(events in arb_stream()) {
        let run = || {
            let mut engine = WindowEngine::new(spec(200, 100));
            engine.assign(0);
            let mut closed = Vec::new();
            for (i, e) in events.iter().enumerate() {
                let _ = engine.ingest(Position { partition: 0, offset: i as i64 }, &format!("s{}", e.seg), e.ts,
                    [("latency_ms", e.lat as f64)], e.ts, &mut closed);
            }
            closed.iter().map(|w| format!("{}:{}:{}:{:?}", w.segment, w.start_ms, w.count,
                w.measurement("latency_ms").map(|m| (m.sum, m.quantile(0.9))))).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }
}

#[test]
fn window_groups_close_at_their_own_sizes_from_the_same_events() {
    let mut c = segloop::config::WindowConfig {
        size: std::time::Duration::from_secs(1),
        out_of_orderness: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    c.groups.insert(
        "slow".into(),
        segloop::config::WindowGroup {
            size: std::time::Duration::from_secs(5),
            hop: None,
        },
    );
    let mut w = segloop::window::Windows::from_config(&c);
    w.assign(0);
    let mut closed = Vec::new();
    // 10 events per second for 12 s.
    for i in 0..120i64 {
        let ts = 100 * i;
        w.ingest(
            Position {
                partition: 0,
                offset: i,
            },
            "eu/a",
            ts,
            [("latency_ms", 10.0), ("error", 0.0)],
            ts,
            &mut closed,
        )
        .unwrap();
    }
    let fast: Vec<&WindowSummary> = closed.iter().filter(|s| s.group.is_none()).collect();
    let slow: Vec<&WindowSummary> = closed
        .iter()
        .filter(|s| s.group.as_deref() == Some("slow"))
        .collect();
    assert_eq!(fast.len(), 11, "1 s windows up to the watermark (11.8 s)");
    assert!(fast
        .iter()
        .all(|s| s.end_ms - s.start_ms == 1_000 && s.count == 10));
    assert_eq!(slow.len(), 2, "5 s windows [0,5) and [5,10)");
    assert!(slow
        .iter()
        .all(|s| s.end_ms - s.start_ms == 5_000 && s.count == 50));
    // The open 5 s window [10, 15) holds offsets from 100 on: nothing below commits.
    assert_eq!(w.committable_offset(0), Some(100));
    // A late event for the slow group is refused once, for every group.
    let before = closed.len();
    let late = w.ingest(
        Position {
            partition: 0,
            offset: 120,
        },
        "eu/a",
        4_000,
        [("latency_ms", 10.0)],
        12_000,
        &mut closed,
    );
    assert_eq!(late.unwrap_err().kind, Rejected::Late);
    assert_eq!(closed.len(), before);
}

// ---- event time that one producer cannot break (the Clocks rule) ------------------------

/// Who sends an event in [`arb_skewed`].
#[derive(Debug, Clone, Copy)]
enum Source {
    /// On time, with disorder under `out_of_orderness`.
    Healthy(u8),
    /// A producer host running ahead by the stream's skew (its own segments).
    Ahead(u8),
    /// One future-dated event of its own segment (up to the stream's outlier distance).
    Outlier(u8),
}

#[derive(Debug, Clone)]
struct SkewedStream {
    /// (source, true time, event time)
    events: Vec<(Source, i64, i64)>,
    healthy: u8,
}

/// Streams in which fewer than half the live segments of the partition run ahead (a skewed
/// host's segments plus isolated outliers), all within `max_clock_skew`.
fn arb_skewed() -> impl Strategy<Value = SkewedStream> {
    (
        4u8..9,
        0u8..3,
        0u8..2,
        1_000i64..50_000,
        prop::collection::vec((0u16..1_000, 1i64..40, 0i64..100), 50..600),
    )
        .prop_map(|(healthy, ahead, outliers, skew, raw)| {
            let mut t = 1_000_000i64;
            let events = raw
                .into_iter()
                .map(|(pick, step, jitter)| {
                    t += step;
                    let n = u16::from(healthy + ahead);
                    let source = if outliers > 0 && pick % 97 == 0 {
                        Source::Outlier((pick % u16::from(outliers)) as u8)
                    } else if (pick % n) < u16::from(healthy) {
                        Source::Healthy((pick % n) as u8)
                    } else {
                        Source::Ahead((pick % n) as u8 - healthy)
                    };
                    let ts = match source {
                        Source::Healthy(_) => t - jitter,
                        Source::Ahead(_) => t + skew - jitter,
                        Source::Outlier(_) => t + skew * 5,
                    };
                    (source, t, ts)
                })
                .collect();
            SkewedStream { events, healthy }
        })
}

fn source_name(s: Source) -> String {
    match s {
        Source::Healthy(i) => format!("healthy-{i}"),
        Source::Ahead(i) => format!("ahead-host/seg-{i}"),
        Source::Outlier(i) => format!("outlier-{i}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// No on-time event of a healthy segment is rejected, and every window of a healthy
    /// segment closes with exactly the events it sent in it (so no `no_data()` fires for a
    /// segment that sent in time), however the other segments of the partition run ahead.
    #[test]
    fn segments_running_ahead_affect_only_themselves(
        stream in arb_skewed(),
        hopping in any::<bool>(),
        catching_up in any::<bool>(),
    ) {
        // Live, the clock is the wall clock: nothing ahead of it is followed. Catching up on a
        // backlog (or in a replay), every event is behind the clock: the median alone holds.
        let behind = if catching_up { 600_000 } else { 0 };
        let (size, hop) = if hopping { (1_000, 250) } else { (1_000, 1_000) };
        let mut s = spec(size, hop);
        s.max_clock_skew_ms = 300_000;
        let mut engine = WindowEngine::new(s);
        engine.assign(0);
        let mut closed = Vec::new();
        let mut healthy_events = Vec::new();
        for (i, (source, now, ts)) in stream.events.iter().enumerate() {
            let seg = source_name(*source);
            let r = engine.ingest(
                Position { partition: 0, offset: i as i64 },
                &seg,
                *ts,
                [("latency_ms", 1.0)],
                *now + behind,
                &mut closed,
            );
            if let Source::Healthy(h) = source {
                prop_assert!(r.is_ok(), "healthy event {} at {} (now {}) rejected: {:?}", i, ts, now, r);
                healthy_events.push(Ev { seg: *h, ts: *ts, lat: 1, err: false });
            }
        }
        let last = stream.events.last().map_or(0, |e| e.1);
        engine.advance_idle(last + behind + 400_000, &mut closed);
        let want = reference(&healthy_events, size, hop);
        let mut seen = BTreeMap::new();
        for w in closed.iter().filter(|w| w.segment.starts_with("healthy-")) {
            let h: u8 = w.segment["healthy-".len()..].parse().unwrap();
            prop_assert!(h < stream.healthy);
            let key = (seg_name(h), w.start_ms);
            let expected = want.get(&key).map_or(0, |e| e.len() as u64);
            prop_assert_eq!(w.count, expected, "window {:?} of {}", key, w.segment);
            prop_assert!(seen.insert(key, ()).is_none());
        }
        let st = engine.stats();
        prop_assert_eq!(st.accepted, st.windowed_events + st.evicted_events + st.revoked_events + st.open_events);
        prop_assert_eq!(st.open_events, 0, "everything closed at the end");
    }
}

#[test]
fn one_future_dated_event_closes_only_its_own_segment_windows() {
    // Observed: one event 290 s ahead moved its partition's watermark and every following
    // on-time event of the partition went to the DLQ as late.
    let mut s = spec(10_000, 10_000);
    s.out_of_orderness_ms = 2_000;
    s.max_clock_skew_ms = 300_000;
    let mut h = Harness::new(s);
    for t in (0..30_000).step_by(500) {
        for seg in ["a", "b", "c"] {
            h.event_at(seg, t, 1.0, t).unwrap();
        }
        if t == 15_000 {
            h.event_at("bad-clock", t + 290_000, 1.0, t).unwrap();
        }
    }
    assert_eq!(h.engine.stats().late, 0);
    let closed = h.take();
    for seg in ["a", "b", "c"] {
        let windows: Vec<_> = closed
            .iter()
            .filter(|w| &*w.segment == seg)
            .map(|w| (w.start_ms, w.count))
            .collect();
        assert_eq!(windows, vec![(0, 20), (10_000, 20)], "{seg}");
    }
    assert!(h.engine.partition(0).unwrap().watermark_ms() < 30_000);
}

#[test]
fn a_partition_with_unread_backlog_is_never_advanced_past_it() {
    // Observed: after an engine stall longer than idle_timeout, the idle advance (on arrival
    // time) pushed lagging partitions forward and their unread backlog went to the DLQ as late.
    let mut h = Harness::new(spec(1_000, 1_000));
    for t in (0..5_000).step_by(100) {
        h.event_at("a", t, 1.0, t).unwrap();
        h.event_at("b", t, 1.0, t).unwrap();
    }
    h.take();
    // A 60 s stall: the consumer was last at the partition's end at 5 s; 60 s of records are
    // now waiting in Kafka.
    let stalled_until = 65_000;
    let mut closed = Vec::new();
    h.engine
        .advance_idle_read(stalled_until, &|_| 5_000, None, &mut closed);
    for t in (5_000..65_000).step_by(100) {
        assert_eq!(
            h.event_at("a", t, 1.0, stalled_until),
            Ok(()),
            "backlog at {t}"
        );
    }
    assert_eq!(h.engine.stats().late, 0);

    // The same stall with the partition taken as read through (what arrival time alone
    // assumed) rejects the backlog: the read-through bound is what protects it.
    let mut h = Harness::new(spec(1_000, 1_000));
    for t in (0..5_000).step_by(100) {
        h.event_at("a", t, 1.0, t).unwrap();
    }
    h.engine.advance_idle(stalled_until, &mut closed);
    assert_eq!(
        h.event_at("a", 5_000, 1.0, stalled_until),
        Err(Rejected::Late)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any event time the codec admits (from 1970 on) and any clock, far beyond today (a
    /// segment back after decades, 1970 next to now): nothing panics, nothing loops per hop
    /// of a jump (at most a TTL of empty windows per quiet spell), and the accounting identity
    /// holds.
    #[test]
    fn extreme_event_times_neither_panic_nor_flood(
        events in prop::collection::vec(
            (0u8..4, prop_oneof![
                Just(0i64), Just(1i64), Just(1_764_000_000_000i64), Just(1i64 << 60),
                0i64..4_000_000_000_000, 0i64..(1i64 << 60),
            ], prop_oneof![
                Just(0i64), Just(1i64 << 60), 0i64..4_000_000_000_000, 0i64..(1i64 << 60),
            ]),
            1..60,
        ),
        read_through in any::<i64>(),
    ) {
        let mut s = spec(10_000, 10_000);
        s.segment_ttl_ms = 60_000;
        let mut engine = WindowEngine::new(s);
        engine.assign(0);
        let mut closed = Vec::new();
        for (i, (seg, ts, now)) in events.iter().enumerate() {
            let _ = engine.ingest(
                Position { partition: 0, offset: i as i64 },
                &format!("s{seg}"),
                *ts,
                [("latency_ms", 1.0)],
                *now,
                &mut closed,
            );
            engine.advance_idle_read(*now, &|_| read_through, None, &mut closed);
        }
        // Four segments, each at most a TTL (6 windows) of empty windows plus one per event
        // per quiet spell.
        prop_assert!(closed.len() <= events.len() * 4 * 8, "{} windows", closed.len());
        let st = engine.stats();
        prop_assert_eq!(st.accepted, st.windowed_events + st.evicted_events + st.revoked_events + st.open_events);
    }
}
