//! `segloop bench ...`: benchmarks that print `key=value` lines, and the counting allocator that
//! lets them measure memory instead of estimating it.
//!
//! The binary installs [`CountingAllocator`] as its global allocator; it adds one relaxed atomic
//! add per allocation and free.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use crate::window::{Position, WindowEngine, WindowSpec, WindowSummary};

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes.
pub struct CountingAllocator;

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Live heap bytes, when the binary installed [`CountingAllocator`] (0 otherwise).
pub fn allocated_bytes() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
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
    pub bytes_per_segment: f64,
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
        println!("bytes_per_segment={:.0}", self.bytes_per_segment);
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
    let bytes_per_segment = (allocated_bytes()
        - baseline
        - (closed.capacity() * std::mem::size_of::<WindowSummary>()) as isize)
        as f64
        / segments as f64;

    let start = Instant::now();
    let mut closed_count = 0u64;
    // Records arrive in batches, as from a consumer poll; the engine is told a batch's keys
    // before ingesting it.
    const BATCH: usize = 48;
    let key_of = |d: &(u32, u32, f64, f64)| &keys[d.0 as usize..(d.0 + d.1) as usize];
    for (i, (at, len, latency, error)) in draws.iter().enumerate() {
        if i % BATCH == 0 {
            engine.prefetch(0, draws[i..(i + BATCH).min(events)].iter().map(key_of));
        }
        let ts = (i as i64 * span_ms) / events.max(1) as i64;
        let _ = engine.ingest(
            Position {
                partition: 0,
                offset: (segments + i) as i64,
            },
            &keys[*at as usize..(*at + *len) as usize],
            ts,
            [("latency_ms", *latency), ("error", *error)],
            ts,
            &mut closed,
        );
        if closed.len() >= 4096 {
            closed_count += closed.len() as u64;
            closed.clear();
        }
    }
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
