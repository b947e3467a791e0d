//! Window engine ingest throughput (criterion). `segloop bench window` prints the headline
//! figures (updates/s at 100k and 1M segments, bytes per segment).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use segloop::config::WindowConfig;
use segloop::window::{Position, WindowEngine, WindowSpec};

fn bench(c: &mut Criterion) {
    let spec = WindowSpec::from_config(&WindowConfig::default());
    let mut group = c.benchmark_group("window");
    for segments in [1_000usize, 100_000] {
        let ids: Vec<String> = (0..segments)
            .map(|i| format!("r{}/svc/ep-{i}", i % 7))
            .collect();
        let events = 200_000usize;
        group.throughput(Throughput::Elements(events as u64));
        group.bench_function(format!("ingest/{segments}-segments"), |b| {
            b.iter_batched(
                || {
                    let mut e = WindowEngine::new(spec.clone());
                    e.assign(0);
                    e
                },
                |mut engine| {
                    let mut closed = Vec::new();
                    let mut x = 0x2545_F491_4F6C_DD1Du64;
                    for i in 0..events {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let ts = (i as i64) * 12 * spec.size_ms / events as i64;
                        let _ = engine.ingest(
                            Position {
                                partition: 0,
                                offset: i as i64,
                            },
                            &ids[(x % segments as u64) as usize],
                            ts,
                            [("latency_ms", (x >> 32) as f64 % 500.0), ("error", 0.0)],
                            ts,
                            &mut closed,
                        );
                        closed.clear();
                    }
                    engine
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
