//! The telemetry consumer's group: rebalance events and lag.

use super::*;

/// Rebalance events for the loop to apply (the callback runs inside `poll`).
#[derive(Debug)]
pub(super) enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

pub(super) struct GroupContext {
    pub(super) topic: String,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) core: Arc<Mutex<Core>>,
    pub(super) producer: Arc<ThreadedProducer<ProduceContext>>,
    pub(super) events: Mutex<Vec<GroupEvent>>,
    pub(super) revoke_timeout: Duration,
    pub(super) client_errors: Mutex<Vec<(rdkafka::error::KafkaError, String)>>,
    /// Per telemetry partition, the high watermark of its last fetch response, from
    /// librdkafka's statistics (`STATS_INTERVAL`): what the lag is measured against.
    pub(super) high_watermarks: Mutex<BTreeMap<i32, i64>>,
}

/// How often librdkafka reports statistics to the telemetry consumer (its high watermarks).
/// The lag is measured every 2 s, so each measurement sees a report made after the last one.
pub(super) const STATS_INTERVAL: &str = "500";

impl ClientContext for GroupContext {
    /// Keeps the high watermark of every telemetry partition (the statistics are delivered on
    /// the polling thread, like every callback of this consumer).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut known = self
            .high_watermarks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in topic.partitions.values() {
            // Partition -1 is librdkafka's internal "unassigned" queue; -1001 is "not known".
            if p.partition >= 0 && p.hi_offset >= 0 {
                known.insert(p.partition, p.hi_offset);
            }
        }
    }

    /// Errors outside a poll (authentication, TLS) are kept for the loop, which reports them
    /// like consume errors; others are logged.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error
            .rdkafka_error_code()
            .is_some_and(kafka::is_config_error)
        {
            if let Ok(mut v) = self.client_errors.lock() {
                v.push((error, reason.to_string()));
            }
        } else {
            kafka::log_client_error(&error, reason);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::log_client_line(level, fac, message);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            // The controller state of the partitions leaving goes to the changelog first.
            self.core
                .lock()
                .expect("core lock")
                .write_state(self.clock.now_ms());
            if self
                .core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .out
                .eos
            {
                // The open transaction takes the leaving partitions' offsets with it.
                commit_transaction(
                    consumer,
                    &self.topic,
                    &self.core,
                    &self.producer,
                    self.revoke_timeout,
                );
                self.events
                    .lock()
                    .expect("events lock")
                    .push(GroupEvent::Revoked(parts));
                return;
            }
            // Everything produced so far must be acknowledged before its offsets commit.
            let flushed = self.producer.flush(self.revoke_timeout).is_ok()
                && self.producer.context().take_errors() == 0;
            if flushed {
                let offsets = {
                    let core = self
                        .core
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    parts
                        .iter()
                        .filter_map(|p| core.pending_offsets.get(p).map(|o| (*p, *o)))
                        .collect::<Vec<_>>()
                };
                if let Err(e) = commit(consumer, &self.topic, &offsets, CommitMode::Sync) {
                    tracing::warn!(error = %e, "commit on revoke failed; the new owner re-reads");
                }
            } else {
                tracing::warn!("produce not confirmed before revoke; not committing");
            }
            self.events
                .lock()
                .expect("events lock")
                .push(GroupEvent::Revoked(parts));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.events
                .lock()
                .expect("events lock")
                .push(GroupEvent::Assigned(parts));
        }
    }
}

/// Records behind the high watermark per assigned partition: the consumer's position against
/// the high watermark of the partition's last fetch response, as librdkafka's statistics
/// report it (a local read; asking the broker, 500 ms per partition at worst, stalled the loop
/// for seconds whenever the embedded cluster was slow to answer).
pub(super) fn measure_lag(consumer: &BaseConsumer<GroupContext>) -> BTreeMap<i32, i64> {
    let Ok(positions) = consumer.position() else {
        return BTreeMap::new();
    };
    let high = consumer
        .context()
        .high_watermarks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    positions
        .elements()
        .iter()
        .filter_map(|e| {
            let high = *high.get(&e.partition())?;
            // No position yet: nothing was delivered since the assignment although the
            // partition was fetched (its high watermark is known), so nothing is waiting:
            // caught up. (Counting the position as 0 reported the whole topic as lag after a
            // quiet restart.)
            let lag = match e.offset() {
                Offset::Offset(o) => (high - o).max(0),
                _ => 0,
            };
            Some((e.partition(), lag))
        })
        .collect()
}
