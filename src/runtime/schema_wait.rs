//! Records waiting on the schema registry, live: one rule.
//!
//! A telemetry record whose Confluent schema id the registry has not answered for (it is
//! being fetched, or the registry is down) is not dead-lettered: the pipeline stops reading
//! its partition at that record ([`crate::pipeline::SchemaWait`], which also holds the
//! partition's commit floor), and here the consumer pauses the partition. When the registry
//! answers, the partition is read again from that record (a seek) and resumed. `/readyz` is
//! false while any partition waits; one that waits longer than `schema_registry.max_wait`
//! stops `segloop run` with the cause: nothing went to the DLQ for it, nothing was committed
//! past it, and the next start reads it again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::pipeline::SchemaWait;
use crate::registry::Resolver;

/// The partitions the consumer has paused for the registry, and since when.
pub(super) struct SchemaWaits {
    resolver: Resolver,
    topic: String,
    max_wait: Duration,
    paused: BTreeMap<i32, (Instant, SchemaWait)>,
}

impl SchemaWaits {
    pub(super) fn new(resolver: Resolver, topic: &str, max_wait: Duration) -> Self {
        SchemaWaits {
            resolver,
            topic: topic.to_string(),
            max_wait,
            paused: BTreeMap::new(),
        }
    }

    /// A rebalance assigned or revoked `partitions`: a revoked one is no longer ours to
    /// resume; an assigned one starts afresh at its committed offset, not paused (a pause
    /// from an earlier assignment is lifted).
    pub(super) fn rebalanced<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &[i32],
        assigned: bool,
    ) {
        for p in partitions {
            if self.paused.remove(p).is_some() && assigned {
                // Not paused any more if librdkafka reset it: an error here changes nothing.
                let _ = consumer.resume(&self.list(*p));
            }
        }
    }

    /// Brings the consumer in line with the pipeline's `waiting` partitions: pauses the new
    /// ones; reads an answered one again from its waiting record (seek, resume) and returns
    /// it, for the caller to tell the pipeline ([`crate::pipeline::Pipeline::stop_waiting`]).
    ///
    /// # Errors
    /// A partition waited longer than `max_wait` (the message says which, on which id, why
    /// and what to do), or a seek failed.
    pub(super) fn sync<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        waiting: &BTreeMap<i32, SchemaWait>,
    ) -> anyhow::Result<Vec<i32>> {
        self.paused.retain(|p, _| waiting.contains_key(p));
        let mut answered = Vec::new();
        for (p, w) in waiting {
            if !self.paused.contains_key(p) {
                consumer.pause(&self.list(*p)).map_err(|e| {
                    anyhow::anyhow!("cannot pause partition {p} of {}: {e}", self.topic)
                })?;
                tracing::warn!(
                    partition = p,
                    offset = w.offset,
                    schema_id = w.schema_id,
                    reason = %w.reason,
                    "waiting for the schema registry: partition paused"
                );
                self.paused.insert(*p, (Instant::now(), w.clone()));
            }
            if self.resolver.answered(w.schema_id) {
                consumer
                    .seek(
                        &self.topic,
                        *p,
                        Offset::Offset(w.offset),
                        Duration::from_secs(10),
                    )
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot read partition {p} of {} again from offset {} after the \
                             schema registry answered: {e}",
                            self.topic,
                            w.offset
                        )
                    })?;
                consumer.resume(&self.list(*p)).map_err(|e| {
                    anyhow::anyhow!("cannot resume partition {p} of {}: {e}", self.topic)
                })?;
                self.paused.remove(p);
                tracing::info!(
                    partition = p,
                    offset = w.offset,
                    schema_id = w.schema_id,
                    "the schema registry answered: partition resumed"
                );
                answered.push(*p);
            }
        }
        if let Some((p, (since, w))) = self
            .paused
            .iter()
            .find(|(_, (since, _))| since.elapsed() > self.max_wait)
        {
            let reason = self.reason(w);
            anyhow::bail!(
                "partition {p} of {} waited {} (more than schema_registry.max_wait {}) for the \
                 schema registry at {} to answer for schema id {} (the record at offset {}): \
                 {reason}. Nothing was dead-lettered for it and no offset was committed past \
                 it; the next start reads it again. Bring the registry back, or raise \
                 schema_registry.max_wait",
                self.topic,
                humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                humantime::format_duration(self.max_wait),
                self.resolver.url(),
                w.schema_id,
                w.offset
            );
        }
        Ok(answered)
    }

    /// One sentence per waiting partition (for `/readyz`).
    pub(super) fn describe(&self) -> Vec<String> {
        self.paused
            .iter()
            .map(|(p, (since, w))| {
                format!(
                    "partition {p} of {} waits for the schema registry (schema id {}, offset {}, \
                     for {} s): {}",
                    self.topic,
                    w.schema_id,
                    w.offset,
                    since.elapsed().as_secs(),
                    self.reason(w)
                )
            })
            .collect()
    }

    /// Registry requests so far.
    pub(super) fn requests(&self) -> u64 {
        self.resolver.requests()
    }

    pub(super) fn len(&self) -> usize {
        self.paused.len()
    }

    /// The registry's latest reason for this id, else the one noted when the wait began.
    fn reason(&self, w: &SchemaWait) -> String {
        match self.resolver.last_error() {
            Some((id, reason)) if id == w.schema_id => reason,
            _ => w.reason.clone(),
        }
    }

    fn list(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        tpl
    }
}
