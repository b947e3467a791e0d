//! The event-time scenarios of issue #18 through the window engine alone, printing what was
//! rejected as late and how many windows of healthy segments closed empty (each one a
//! `no_data()` for a segment that sent in time). Uses only `ingest`, so the same file runs
//! against older engines for an A/B: `cargo run --release --example skew_scenarios`.

use segloop::config::WindowConfig;
use segloop::window::{Position, WindowEngine, WindowSpec, WindowSummary};

struct Run {
    engine: WindowEngine,
    closed: Vec<WindowSummary>,
    offset: i64,
    late_healthy: u64,
}

impl Run {
    fn new() -> Run {
        let mut spec = WindowSpec::from_config(&WindowConfig::default());
        spec.max_clock_skew_ms = 300_000;
        let mut engine = WindowEngine::new(spec);
        engine.assign(0);
        Run {
            engine,
            closed: Vec::new(),
            offset: 0,
            late_healthy: 0,
        }
    }

    fn send(&mut self, seg: &str, ts: i64, now: i64, healthy: bool) {
        let r = self.engine.ingest(
            Position {
                partition: 0,
                offset: self.offset,
            },
            seg,
            ts,
            [("latency_ms", 20.0)],
            now,
            &mut self.closed,
        );
        self.offset += 1;
        if r.is_err() && healthy {
            self.late_healthy += 1;
        }
    }

    fn report(&self, name: &str, healthy_events: u64) {
        let empty = self
            .closed
            .iter()
            .filter(|w| w.segment.starts_with("ok-") && w.count == 0)
            .count();
        println!(
            "scenario={name} healthy_events={healthy_events} healthy_rejected={} healthy_empty_windows={empty}",
            self.late_healthy
        );
    }
}

/// Two minutes of telemetry every 100 ms from `healthy` on-time segments (disorder under
/// 50 ms), `ahead` segments of a host running 20 s ahead, and, at one step, one event of its
/// own segment 290 s ahead.
fn scenario(name: &str, healthy: i64, ahead: i64, outlier_at: Option<i64>) {
    let t0 = 1_764_000_000_000i64;
    let mut r = Run::new();
    let mut n = 0;
    for step in 0..1_200i64 {
        let now = t0 + step * 100;
        for s in 0..healthy {
            r.send(
                &format!("ok-{s}"),
                now - (s * 7 + step * 13) % 50,
                now,
                true,
            );
            n += 1;
        }
        for s in 0..ahead {
            r.send(&format!("fast-host/{s}"), now + 20_000, now, false);
        }
        if outlier_at == Some(step) {
            r.send("bad-clock", now + 290_000, now, false);
        }
    }
    r.report(name, n);
}

fn main() {
    // 1. One future-dated event (290 s ahead, inside max_clock_skew) among 50 segments.
    scenario("one_future_dated_event", 50, 0, Some(600));
    // 2. One producer host 20 s ahead (5 segments) among 124 healthy ones.
    scenario("host_20s_ahead", 124, 5, None);
}
