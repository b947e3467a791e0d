//! `segloop bench shards`: the pipeline's per-event work (decode, windows, the controller's
//! judgement of closed windows) on 1..N shards, as `segloop run` drives it with
//! `engine.threads` (its worker threads, batches of 1,024 records per shard), over records held
//! in memory: what sharding gains where cores are free (no broker on them). The rate is the
//! stream's (every record in, the windows it closed judged); closing the last windows after it
//! (the idle advance, not sharded) is timed apart.

use std::time::Instant;

use crate::pipeline::{Cause, Options, Pipeline, Record, Sink};

/// Figures of one `bench shards` run.
#[derive(Debug, Clone)]
pub struct ShardsReport {
    pub records: u64,
    pub segments: usize,
    pub partitions: i32,
    /// Per thread count: (threads, events per second while streaming (the fastest round),
    /// CPU seconds per million events (every thread), commands, seconds to close the last
    /// windows after the stream).
    pub runs: Vec<(usize, f64, f64, u64, f64)>,
}

impl ShardsReport {
    pub fn print(&self) {
        println!("bench=shards");
        println!("records={}", self.records);
        println!("segments={}", self.segments);
        println!("partitions={}", self.partitions);
        let one = self.runs.first().map_or(f64::NAN, |r| r.1);
        for (threads, rate, cpu, commands, flush) in &self.runs {
            println!("threads_{threads}.events_per_sec={rate:.0}");
            println!("threads_{threads}.speedup={:.2}", rate / one);
            println!("threads_{threads}.cpu_secs_per_million_events={cpu:.3}");
            println!("threads_{threads}.commands={commands}");
            println!("threads_{threads}.last_windows_close_secs={flush:.3}");
        }
    }
}

/// Counts commands; drops the rest.
#[derive(Default)]
struct Count(u64);

impl Sink for Count {
    fn reject(&mut self, _: &Record<'_>, _: &crate::codec::DecodeError) {}
    fn effects(
        &mut self,
        fx: &mut crate::controller::Effects,
        _: Cause<'_>,
        _: &crate::policy::PolicySet,
    ) {
        self.0 += fx.commands.len() as u64;
        fx.commands.clear();
        fx.decisions.clear();
        fx.timings.clear();
    }
}

/// Runs `records` in-memory records (the e2e bench's data) through pipelines of 1 and of each
/// thread count in `threads` (interleaved, `rounds` times), in batches of 1,024 records per
/// shard; the fastest round of each counts.
///
/// # Errors
/// The config or the worker threads cannot be built.
pub fn shards_bench(
    config: &crate::config::Config,
    records: u64,
    segments: usize,
    partitions: i32,
    threads: &[usize],
    rounds: usize,
) -> anyhow::Result<ShardsReport> {
    let partitions = partitions.max(1);
    let mut data: Vec<(i32, String, Vec<u8>)> = Vec::with_capacity(records as usize);
    super::e2e::bench_events(records, segments, 0.01, 0, |seg, bytes| {
        let p = crate::kafka::murmur2_partition(seg.as_bytes(), partitions);
        data.push((p, seg.to_string(), bytes.to_vec()));
        Ok(())
    })?;
    let policies = super::e2e::bench_policies()?;
    // Past every window of the data's 30 s, once a quiet partition counts as idle.
    let w = &config.windows;
    let quiet_ms = (w.size + w.out_of_orderness + w.grace + w.idle_timeout).as_millis() as i64 + 1;
    let mut runs: Vec<(usize, f64, f64, u64, f64)> = threads
        .iter()
        .map(|t| (*t, 0.0, f64::INFINITY, 0, 0.0))
        .collect();
    for _ in 0..rounds.max(1) {
        for run in &mut runs {
            let n = run.0.max(1);
            let workers = crate::runtime::Workers::new(n)?;
            let mut pipeline = Pipeline::sharded(config, policies.clone(), Options::live(), n)
                .map_err(anyhow::Error::msg)?;
            for p in 0..partitions {
                pipeline.assign(p);
            }
            let mut sink = Count::default();
            let mut offsets = vec![0i64; partitions as usize];
            let batch = 1024 * n;
            let cpu = super::cpu_secs();
            let start = Instant::now();
            for (k, chunk) in data.chunks(batch).enumerate() {
                let records: Vec<Record<'_>> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, (p, seg, bytes))| {
                        let o = &mut offsets[*p as usize];
                        *o += 1;
                        Record {
                            partition: *p,
                            offset: *o,
                            key: Some(seg.as_bytes()),
                            value: Some(bytes),
                            timestamp_ms: None,
                            handle: i,
                        }
                    })
                    .collect();
                // The clock follows event time (the data's 30 s from 0), as a caught-up live
                // run's would: the newest event's time.
                let last = ((k + 1) * batch).min(data.len()) - 1;
                let now = (last as i64 * 30_000) / data.len() as i64;
                pipeline.on_batch_with(&records, now, &mut sink, &workers);
            }
            let streamed = start.elapsed().as_secs_f64();
            let cpu_streamed = super::cpu_secs();
            // The last windows, closed by the idle advance (on the loop thread, one partition
            // at a time): timed apart, as `bench e2e` times the stream.
            pipeline.tick(30_000 + quiet_ms, true, &mut sink);
            let flushed = start.elapsed().as_secs_f64() - streamed;
            let rate = data.len() as f64 / streamed;
            if rate > run.1 {
                run.1 = rate;
                run.2 = (cpu_streamed - cpu) / (data.len() as f64 / 1e6);
                run.4 = flushed;
            }
            run.3 = sink.0;
        }
    }
    Ok(ShardsReport {
        records,
        segments,
        partitions,
        runs,
    })
}
