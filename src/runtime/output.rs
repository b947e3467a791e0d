//! The live output of the pipeline: commands, decisions and dead letters to Kafka, counters,
//! the run report, rate-limited log lines.

use super::*;

/// The live side of the pipeline: records to Kafka, counters, the run report.
pub(super) struct Output {
    pub(super) producer: Arc<ThreadedProducer<ProduceContext>>,
    pub(super) command_codec: Box<dyn Codec<RemediationCommand>>,
    pub(super) decision_codec: Box<dyn Codec<DecisionRecord>>,
    pub(super) actions_topic: String,
    pub(super) decisions_topic: String,
    pub(super) dlq_topic: String,
    pub(super) counters: Counters,
    pub(super) report: RunReport,
    /// Exactly-once: one transaction per commit interval.
    pub(super) eos: bool,
    /// Exactly-once: events of windows judged in the open transaction.
    pub(super) txn_windowed: u64,
    /// Rate-limited log lines (held-back firings by guardrail, dead letters by code): when
    /// each kind was last logged, and how many since.
    pub(super) held_back: BTreeMap<String, (Option<Instant>, u64)>,
    /// Most bytes of one dead letter (the producer's `message.max.bytes` less headroom;
    /// halved whenever the broker refuses one as too large).
    pub(super) dlq_limit: usize,
    /// Dead letters written again after a failure, by source record: how many times.
    pub(super) dlq_attempts: HashMap<(i32, i64), u32>,
}

/// Least time between two log lines about the same guardrail holding firings back.
pub(super) const HELD_BACK_LOG_EVERY: Duration = Duration::from_secs(10);

/// A consumed record as a dead letter copies it.
pub(super) struct Source<'a> {
    pub(super) topic: &'a str,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<&'a [u8]>,
    pub(super) payload: Option<&'a [u8]>,
    /// Its headers, in order.
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl<'a> Source<'a> {
    pub(super) fn of<M: Message>(m: &'a M) -> Source<'a> {
        Source {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload(),
            headers: kafka::header_pairs(m),
        }
    }
}

/// The sink of one turn: the output, and the polled batch the records came from (a rejected
/// record goes to the DLQ with its original headers).
pub(super) struct LiveSink<'o, 'b> {
    pub(super) out: &'o mut Output,
    pub(super) batch: &'b [Polled<'b, 'b>],
    /// When the step's input was in hand (a telemetry batch: when its poll returned): a window
    /// this step closes closed no later than this, so commands are timed from it.
    pub(super) since: Instant,
}

impl Sink for LiveSink<'_, '_> {
    fn reject(&mut self, record: &Record<'_>, error: &DecodeError) {
        if let Some(m) = self.batch.get(record.handle) {
            self.out.dead_letter(&m.source(), error);
        }
    }

    fn evicted(&mut self, decision: crate::model::DecisionRecord) {
        let mut fx = Effects::default();
        fx.decisions.push(decision);
        self.out.emit(&mut fx, None);
    }

    fn effects(&mut self, fx: &mut Effects, cause: Cause<'_>, policies: &PolicySet) {
        for d in &fx.decisions {
            if d.to_state == "escalated" && d.from_state != "escalated" {
                *self
                    .out
                    .counters
                    .escalations
                    .entry((
                        d.policy.clone(),
                        d.trigger.split(':').next().unwrap_or("").to_string(),
                    ))
                    .or_default() += 1;
            }
            if d.segment == crate::controller::INSTANCE_SEGMENT {
                // The instance as a whole: held-back work or the actuator breaker.
                let waiting = d.aggregates.values().next().copied().unwrap_or(0.0);
                if d.to_state == "escalated" {
                    tracing::warn!(trigger = %d.trigger, count = waiting, policy = %d.policy, command_id = d.command_id.as_deref().unwrap_or(""), "instance escalation");
                } else {
                    tracing::info!(trigger = %d.trigger, "instance escalation cleared");
                }
            } else if let Some(g) = &d.guardrail {
                self.out.held_back(g, &d.segment, &d.policy, policies);
            } else if d.from_state != d.to_state
                && matches!(
                    d.to_state.as_str(),
                    "resolved" | "escalated" | "backoff" | "removed"
                )
            {
                // The transitions an operator follows (commands have their own line).
                tracing::info!(
                    segment = %d.segment,
                    policy = %d.policy,
                    from = %d.from_state,
                    to = %d.to_state,
                    trigger = %d.trigger,
                    command_id = d.command_id.as_deref().unwrap_or(""),
                    "loop"
                );
            }
        }
        let mut closed_at = None;
        if let Cause::Window { window, .. } = cause {
            if window.group.is_none() {
                if self.out.eos {
                    self.out.txn_windowed += window.count;
                } else {
                    self.out.report.records_windowed += window.count;
                    self.out.counters.windowed += window.count;
                }
            }
            if !fx.commands.is_empty() {
                closed_at = Some(self.since);
            }
        }
        self.out.emit(fx, closed_at);
    }
}

impl Output {
    /// Counts a consumed record and its bytes (key and value) under its topic's role.
    pub(super) fn count_consumed(
        &mut self,
        role: &'static str,
        partition: i32,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) {
        let bytes = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
        let entry = self.counters.consumed.entry((role, partition)).or_default();
        entry.0 += 1;
        entry.1 += bytes as u64;
    }

    /// Logs a firing a guardrail held back: the first at once, then one line per guardrail at
    /// most every [`HELD_BACK_LOG_EVERY`] with the count meanwhile (never silently disarmed).
    pub(super) fn held_back(
        &mut self,
        guardrail: &str,
        segment: &str,
        policy: &str,
        policies: &PolicySet,
    ) {
        if let Some(n) = self.log_every(guardrail, HELD_BACK_LOG_EVERY) {
            tracing::warn!(
                guardrail,
                limit = %policies.limit_of(guardrail, policy),
                segment,
                policy,
                held_back = n,
                "firing held back by a guardrail"
            );
        }
    }

    /// Counts an event of `kind`; `Some(count since the last line)` when a line is due (the
    /// first at once, then at most one per `every`).
    pub(super) fn log_every(&mut self, kind: &str, every: Duration) -> Option<u64> {
        let now = Instant::now();
        let entry = self.held_back.entry(kind.to_string()).or_insert((None, 0));
        entry.1 += 1;
        if entry.0.is_none_or(|last| now - last >= every) {
            let n = entry.1;
            *entry = (Some(now), 0);
            Some(n)
        } else {
            None
        }
    }

    pub(super) fn emit(&mut self, fx: &mut Effects, closed_at: Option<Instant>) {
        for cmd in fx.commands.drain(..) {
            let mut bytes = Vec::with_capacity(256);
            if let Err(e) = self.command_codec.encode(&cmd, &mut bytes) {
                tracing::error!(error = %e, "cannot encode a command");
                continue;
            }
            *self
                .counters
                .commands
                .entry((cmd.action.clone(), cmd.policy.clone()))
                .or_default() += 1;
            self.report.commands += 1;
            tracing::info!(segment = %cmd.segment, policy = %cmd.policy, action = %cmd.action, attempt = cmd.attempt, command_id = %cmd.command_id, "command");
            if let Some(at) = closed_at {
                let secs = at.elapsed().as_secs_f64();
                self.counters.close_to_produce_secs.push(secs);
                if self.report.close_to_produce_secs.len() < 100_000 {
                    self.report.close_to_produce_secs.push(secs);
                }
            }
            send(
                &self.producer,
                &self.actions_topic,
                cmd.segment.as_bytes(),
                &bytes,
                closed_at,
            );
        }
        for d in fx.decisions.drain(..) {
            let mut bytes = Vec::with_capacity(256);
            if self.decision_codec.encode(&d, &mut bytes).is_ok() {
                self.report.decisions += 1;
                send(
                    &self.producer,
                    &self.decisions_topic,
                    d.segment.as_bytes(),
                    &bytes,
                    None,
                );
            }
        }
        for timing in fx.timings.drain(..) {
            self.counters
                .timings
                .push((timing.kind, timing.policy, timing.ms as f64 / 1000.0));
        }
    }

    pub(super) fn dead_letter(&mut self, m: &Source<'_>, e: &DecodeError) {
        let code = e.code.as_str();
        if let Some(n) = self.log_every(&format!("dlq/{code}"), HELD_BACK_LOG_EVERY) {
            tracing::warn!(
                code,
                records = n,
                topic = m.topic,
                partition = m.partition,
                offset = m.offset,
                error = %e.message,
                "records dead-lettered (a sample; one line per code at most every 10 s)"
            );
        }
        *self.counters.decode_errors.entry(code).or_default() += 1;
        *self.counters.dlq.entry(code).or_default() += 1;
        self.report.records_dlq += 1;
        let mut headers = m.headers.clone();
        for (k, v) in [
            ("segloop.error.code", code),
            ("segloop.error.message", e.message.as_str()),
            ("segloop.source.topic", m.topic),
            ("segloop.source.partition", &m.partition.to_string()),
            ("segloop.source.offset", &m.offset.to_string()),
        ] {
            headers.push((k.to_string(), Some(v.as_bytes().to_vec())));
        }
        self.write_dead_letter((m.partition, m.offset), m.key, m.payload, &headers, false);
    }

    /// Writes a dead letter. One too large for the DLQ (its size limit, halved each time the
    /// broker refuses one as too large) goes truncated, with headers giving its original size
    /// (its coordinates are in the `segloop.source.*` headers): the one exception to the
    /// byte-for-byte contract. A write that cannot even be queued is reported like a failed
    /// delivery, so the loop writes it again and the commit floor waits for it.
    pub(super) fn write_dead_letter(
        &mut self,
        source: (i32, i64),
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(String, Option<Vec<u8>>)],
        too_large: bool,
    ) {
        if too_large {
            self.dlq_limit = (self.dlq_limit / 2).max(MIN_DLQ_LIMIT);
        }
        let header_bytes: usize = headers
            .iter()
            .filter(|(k, _)| k != "segloop.original.size" && k != "segloop.truncated")
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16)
            .sum();
        let key_len = key.map_or(0, <[u8]>::len);
        let value_len = value.map_or(0, <[u8]>::len);
        let room = self.dlq_limit.saturating_sub(header_bytes + key_len + 128);
        let original = headers
            .iter()
            .find(|(k, _)| k == "segloop.original.size")
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse().ok())
            .unwrap_or(value_len);
        let truncated = value_len > room;
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            if k == "segloop.original.size" || k == "segloop.truncated" {
                continue;
            }
            owned = owned.insert(Header {
                key: k.as_str(),
                value: v.as_deref(),
            });
        }
        let size = original.to_string();
        if truncated || original != value_len {
            owned = owned
                .insert(Header {
                    key: "segloop.truncated",
                    value: Some("true"),
                })
                .insert(Header {
                    key: "segloop.original.size",
                    value: Some(size.as_str()),
                });
            self.counters.dlq_truncated += u64::from(truncated);
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.dlq_topic, 0).headers(owned);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(&v[..v.len().min(room)]);
        }
        if let Err(e) = kafka::send_waiting(&self.producer, record) {
            let too_large = e.rdkafka_error_code()
                == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge);
            if let Ok(mut v) = self.producer.context().dead_letters.lock() {
                v.push(DeadLetterDelivery {
                    partition: source.0,
                    offset: source.1,
                    failed: Some(FailedDeadLetter {
                        error: e.to_string(),
                        too_large,
                        key: key.map(<[u8]>::to_vec),
                        value: value.map(|v| v[..v.len().min(room)].to_vec()),
                        headers: headers.to_vec(),
                    }),
                });
            }
        }
    }
}

/// The first size limit of a dead letter: the producer's `message.max.bytes` (librdkafka's
/// default 1,000,000) less headroom for the record's framing.
pub(super) fn dlq_limit(config: &Config) -> usize {
    config
        .kafka
        .properties
        .get("message.max.bytes")
        .and_then(|v| match v {
            toml::Value::Integer(n) => usize::try_from(*n).ok(),
            toml::Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .unwrap_or(1_000_000usize)
        .saturating_sub(4 << 10)
        .max(MIN_DLQ_LIMIT)
}

/// The smallest a dead letter is truncated to.
pub(super) const MIN_DLQ_LIMIT: usize = 16 << 10;

/// Times a dead letter is written before the run stops (it is never committed past).
pub(super) const DLQ_ATTEMPTS: u32 = 5;
