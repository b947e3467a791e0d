//! The worker threads of the pipeline's shards (`engine.threads`).
//!
//! A round of a batch (see [`crate::pipeline::Fanout`]) runs its first shard on the loop thread
//! and every other shard on a pool thread (`shard-N`), and returns once all are done: the loop
//! never works while a shard does, so the core's state is touched by one thread at a time, and
//! a shard's state only by the thread working it.

use crate::pipeline::Fanout;

/// Runs the shards of a round: the first on the calling thread, the rest on the pool (none
/// with one shard).
pub struct Workers {
    pool: Option<rayon::ThreadPool>,
}

impl Workers {
    /// Workers for `shards` shards (`shards - 1` pool threads).
    ///
    /// # Errors
    /// The pool's threads cannot be started.
    pub fn new(shards: usize) -> anyhow::Result<Self> {
        let pool = (shards > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(shards - 1)
                    .thread_name(|i| format!("shard-{}", i + 1))
                    .build()
            })
            .transpose()
            .map_err(|e| anyhow::anyhow!("cannot start the engine's worker threads: {e}"))?;
        Ok(Workers { pool })
    }
}

impl Fanout for Workers {
    fn run(&self, tasks: &mut [&mut (dyn FnMut() + Send)]) {
        match (&self.pool, tasks.split_first_mut()) {
            (Some(pool), Some((first, rest))) if !rest.is_empty() => {
                pool.in_place_scope(|scope| {
                    for t in rest {
                        scope.spawn(move |_| t());
                    }
                    first();
                });
            }
            _ => {
                for t in tasks {
                    t();
                }
            }
        }
    }
}
