//! Consume errors: counted, logged at a bounded rate, and when to stop for them.

use super::*;

/// How long a consume error keeps `/readyz` false after it was last seen.
pub(super) const ERROR_FRESH: Duration = Duration::from_secs(10);
/// Least time between two logs of the same repeating consume error.
pub(super) const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

/// The consume errors of one consumer. Every error is counted
/// (`segloop_consume_errors_total{topic, code}`), logged at error level (at most every 5 s, with
/// the count meanwhile) and keeps `/readyz` false while fresh. One that no retry fixes (see
/// [`ConsumeErrors::fatal`]) keeps `/readyz` false until the consumer delivers records again,
/// and stops the run if it has not by `kafka.connect_timeout` after it first appeared.
/// (librdkafka reports some of these once per partition, e.g. a topic authorization failure,
/// so waiting for a repeat would wait forever.)
pub(super) struct ConsumeErrors {
    pub(super) topic: String,
    pub(super) streak: Option<Streak>,
}

pub(super) struct Streak {
    pub(super) message: String,
    pub(super) fatal: bool,
    pub(super) first: Instant,
    pub(super) last: Instant,
    pub(super) logged: Instant,
    pub(super) unlogged: u64,
}

impl ConsumeErrors {
    pub(super) fn new(topic: &str) -> Self {
        ConsumeErrors {
            topic: topic.to_string(),
            streak: None,
        }
    }

    /// Errors no retry fixes: configuration (TLS, authentication, authorization), data the
    /// client cannot read, a topic that is gone. An unreachable broker is retried forever.
    pub(super) fn fatal(e: &rdkafka::error::KafkaError) -> bool {
        use rdkafka::types::RDKafkaErrorCode as E;
        if matches!(e, rdkafka::error::KafkaError::MessageConsumptionFatal(_)) {
            return true;
        }
        e.rdkafka_error_code().is_some_and(|c| {
            kafka::is_config_error(c)
                || matches!(
                    c,
                    E::BadCompression
                        | E::NotImplemented
                        | E::UnknownTopic
                        | E::UnknownTopicOrPartition
                        | E::UnsupportedCompressionType
                        | E::Fatal
                )
        })
    }

    pub(super) fn on_error(
        &mut self,
        e: &rdkafka::error::KafkaError,
        detail: &str,
        where_: &str,
        counters: &mut Counters,
    ) {
        let code = e
            .rdkafka_error_code()
            .map_or_else(|| "unknown".to_string(), |c| format!("{c:?}"));
        *counters
            .consume_errors
            .entry((self.topic.clone(), code))
            .or_default() += 1;
        let now = Instant::now();
        let message = format!("{e}{detail}");
        let fatal = Self::fatal(e);
        match &mut self.streak {
            Some(s) if s.message == message && now - s.last < ERROR_FRESH => {
                s.last = now;
                s.unlogged += 1;
                if now - s.logged >= ERROR_LOG_EVERY {
                    tracing::error!(topic = %self.topic, partitions = %where_, error = %message, repeated = s.unlogged, "consume error, still repeating");
                    s.logged = now;
                    s.unlogged = 0;
                }
            }
            _ => {
                tracing::error!(topic = %self.topic, partitions = %where_, error = %message, fatal, "consume error");
                self.streak = Some(Streak {
                    message,
                    fatal,
                    first: now,
                    last: now,
                    logged: now,
                    unlogged: 0,
                });
            }
        }
    }

    /// The consumer delivered records (with no error in the same poll): the error cleared.
    pub(super) fn on_progress(&mut self) {
        if self.streak.take().is_some() {
            tracing::info!(topic = %self.topic, "consuming again after errors");
        }
    }

    /// The error while it counts (for `/readyz`): fresh, or fatal and not cleared.
    pub(super) fn fresh(&self) -> Option<String> {
        self.streak
            .as_ref()
            .filter(|s| s.fatal || s.last.elapsed() < ERROR_FRESH)
            .map(|s| format!("{}: {}", self.topic, s.message))
    }

    /// Why the run must stop: a fatal error not cleared within `limit`.
    pub(super) fn must_stop(&self, limit: Duration) -> Option<String> {
        let s = self.streak.as_ref()?;
        (s.fatal && s.first.elapsed() >= limit).then(|| {
            format!(
                "topic {}: {} (for {} s with no records since; a consume error no retry fixes stops segloop after kafka.connect_timeout)",
                self.topic,
                s.message,
                s.first.elapsed().as_secs()
            )
        })
    }
}
