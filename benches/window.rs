//! Window engine ingest throughput (criterion). `segloop bench window` prints the headline
//! figures (updates/s at 100k and 1M segments, bytes per segment).
//!
//! Two variants per size: plain `ingest` calls, and `ingest` with prefetch hints three batches
//! ahead, as the runtime feeds the engine. Every segment is seen once before timing starts.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use segloop::config::WindowConfig;
use segloop::window::{with_hints, Position, WindowEngine, WindowSpec};

/// Events in random segment order, keys laid out one after another as in a Kafka fetch:
/// the key buffer and (key start, key end, event time, latency) per event.
type Input = (String, Vec<(usize, usize, i64, f64)>);

fn draws(segments: usize, events: usize, size_ms: i64) -> Input {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut keys = String::new();
    let events = (0..events)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = x % segments as u64;
            let at = keys.len();
            keys.push_str(&format!("r{}/svc/ep-{s}", s % 7));
            let ts = (i as i64) * 12 * size_ms / events as i64;
            (at, keys.len(), ts, (x >> 32) as f64 % 500.0)
        })
        .collect();
    (keys, events)
}

fn bench(c: &mut Criterion) {
    let spec = WindowSpec::from_config(&WindowConfig::default());
    let mut group = c.benchmark_group("window");
    for segments in [1_000usize, 100_000] {
        // Twenty events per segment over twelve windows: mostly steady-state updates, not
        // first sightings.
        let events = (segments * 20).max(200_000);
        let (keys, input) = draws(segments, events, spec.size_ms);
        group.throughput(Throughput::Elements(events as u64));
        group.sample_size(if segments > 10_000 { 10 } else { 50 });
        for hinted in [false, true] {
            let name = if hinted { "ingest-hinted" } else { "ingest" };
            group.bench_function(format!("{name}/{segments}-segments"), |b| {
                b.iter_batched(
                    || {
                        // Every segment seen once, untimed: the timed part is steady-state
                        // updates, as in `segloop bench window`.
                        let mut e = WindowEngine::new(spec.clone());
                        e.assign(0);
                        let mut closed = Vec::new();
                        for s in 0..segments {
                            let _ = e.ingest(
                                Position {
                                    partition: 0,
                                    offset: 0,
                                },
                                &format!("r{}/svc/ep-{s}", s % 7),
                                0,
                                [("latency_ms", 1.0)],
                                0,
                                &mut closed,
                            );
                        }
                        e
                    },
                    |mut engine| {
                        let mut closed = Vec::new();
                        let mut each = |engine: &mut WindowEngine,
                                        i: usize,
                                        &(a, b, ts, latency): &(usize, usize, i64, f64)| {
                            let _ = engine.ingest(
                                Position {
                                    partition: 0,
                                    offset: i as i64,
                                },
                                &keys[a..b],
                                ts,
                                [("latency_ms", latency), ("error", 0.0)],
                                ts,
                                &mut closed,
                            );
                            closed.clear();
                        };
                        if hinted {
                            with_hints(
                                &mut engine,
                                &input,
                                |engine, _, chunk| {
                                    engine.prefetch(
                                        chunk.iter().map(|&(a, b, ts, _)| (0, &keys[a..b], ts)),
                                    );
                                },
                                each,
                            );
                        } else {
                            for (i, item) in input.iter().enumerate() {
                                each(&mut engine, i, item);
                            }
                        }
                        engine
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
