//! The loop's state: the pipeline and its live output (records to Kafka, counters).

use super::*;

/// The loop's state. Only the loop changes it, one step at a time, and it never holds it across
/// a broker round trip (commits, flushes, transactions, changelog reads and seeks happen
/// between steps). The rebalance callback does not touch it; the admin thread reads the
/// pipeline's [`ReadModel`] and the [`Status`]. It sits behind a mutex only for observers
/// (the demo's terminal view, tests: `RunOptions::on_core`).
pub struct Core {
    pub pipeline: Pipeline,
    /// Runs the pipeline's shards of a batch (`engine.threads`).
    pub(super) workers: super::workers::Workers,
    pub config: Config,
    pub(super) out: Output,
    pub(super) outcome_codec: Box<dyn Codec<RemediationOutcome>>,
    /// With a registry: where the outcome codec learns schema ids, and the outcome
    /// partitions waiting on it (see [`schema_wait`]).
    pub(super) outcome_schemas: Option<crate::registry::Resolver>,
    pub(super) outcome_waiting: BTreeMap<i32, crate::pipeline::SchemaWait>,
    /// Committable offsets per owned partition (computed after producing their effects).
    pub pending_offsets: BTreeMap<i32, i64>,
    /// Outcomes for segments not owned when they arrived (newest last, bounded): replayed
    /// after a partition's state is restored, so acks that raced a rebalance or a restart
    /// still land.
    pub(super) recent_outcomes: std::collections::VecDeque<RemediationOutcome>,
    /// Outcome partitions still behind the end they had at startup (deadlines wait for them).
    pub(super) outcomes_backlog: BTreeMap<i32, i64>,
    /// Exactly-once: outcomes applied in the open transaction (replayed if it aborts).
    pub(super) txn_outcomes: Vec<RemediationOutcome>,
    /// Exactly-once: a transaction aborted; the owned partitions must rewind.
    pub(super) needs_rewind: bool,
    /// A fatal producer error (e.g. fenced by a newer instance): the loop stops with it.
    pub(super) fatal: Option<String>,
    /// Per partition: the `closed_through` and dead-letter mark last written to the changelog.
    pub(super) closed_written: BTreeMap<i32, PartitionMarks>,
}

/// Outcomes kept for replay after a restore.
pub(super) const RECENT_OUTCOMES: usize = 100_000;

impl Core {
    /// What the run did so far.
    pub fn report(&self) -> RunReport {
        let s = self.pipeline.stats();
        RunReport {
            records_consumed: s.records_read,
            records_aggregated: s.records_aggregated,
            ..self.out.report.clone()
        }
    }

    pub(super) fn sink(&mut self) -> (&mut Pipeline, LiveSink<'_, 'static>) {
        (
            &mut self.pipeline,
            LiveSink {
                out: &mut self.out,
                batch: &[],
                since: Instant::now(),
            },
        )
    }

    /// Partitions assigned: each starts empty; its state comes with [`Core::restored`]. Each
    /// goes to the shard whose feed it was routed to (`shards`, where known).
    pub(super) fn on_assigned(&mut self, parts: &[i32], shards: &[Option<usize>]) {
        self.out.counters.rebalances += 1;
        tracing::info!(?parts, "partitions assigned");
        for (i, &p) in parts.iter().enumerate() {
            self.pipeline.assign_to(p, shards.get(i).copied().flatten());
        }
    }

    /// Partitions revoked: what the callback handed over is accounted, and their state goes.
    pub(super) fn on_revoked(&mut self, parts: &[i32], handover: Handover) {
        self.out.counters.rebalances += 1;
        tracing::info!(?parts, ?handover, "partitions revoked");
        match handover {
            Handover::Commit(result) => self.after_commit(&result),
            Handover::Transaction(result) => self.after_transaction(result),
        }
        for p in parts {
            self.pipeline.revoke(*p);
            self.pending_offsets.remove(p);
            self.closed_written.remove(p);
        }
    }

    /// Counts a commit of offsets.
    pub(super) fn after_commit(&mut self, result: &CommitResult) {
        match result {
            CommitResult::Committed => {
                self.out.counters.commits += 1;
                self.out.report.commits += 1;
            }
            CommitResult::Nothing => {}
            CommitResult::Unconfirmed | CommitResult::Failed(_) => {
                self.out.counters.commit_errors += 1;
            }
        }
    }

    /// Accounts the exactly-once transaction's outcome: a commit makes its windows' events
    /// count and forgets its outcomes; an abort asks for a rewind; a fatal error stops the run.
    pub(super) fn after_transaction(&mut self, result: TxnResult) {
        let fatal = match result {
            TxnResult::Skipped => None,
            TxnResult::Fatal(e) => Some(e),
            TxnResult::Committed { offsets, fatal } => {
                *self
                    .out
                    .counters
                    .transactions
                    .entry("committed")
                    .or_default() += 1;
                self.txn_outcomes.clear();
                let n = std::mem::take(&mut self.out.txn_windowed);
                self.out.report.records_windowed += n;
                self.out.counters.windowed += n;
                if offsets {
                    self.after_commit(&CommitResult::Committed);
                }
                fatal
            }
            TxnResult::Aborted { error, fatal } => {
                tracing::warn!(%error, "exactly-once: transaction aborted; rewinding");
                self.after_commit(&CommitResult::Failed(error));
                *self.out.counters.transactions.entry("aborted").or_default() += 1;
                self.needs_rewind = true;
                fatal
            }
        };
        if let Some(e) = fatal {
            self.fatal.get_or_insert(e);
        }
    }

    /// Records `which` of a polled batch (indices, in order) through the pipeline; `since`:
    /// when the batch's poll returned.
    pub(super) fn on_telemetry(
        &mut self,
        batch: &[Polled<'_, '_>],
        which: &[usize],
        now: i64,
        since: Instant,
    ) {
        let records: Vec<Record<'_>> = which
            .iter()
            .map(|&handle| {
                let m = &batch[handle];
                if let Polled::Main(_) = m {
                    self.out.report.records_unrouted += 1;
                }
                let t = m.taken();
                self.out
                    .count_consumed("telemetry", t.partition, t.key, t.payload);
                Record {
                    partition: t.partition,
                    offset: t.offset,
                    key: t.key,
                    value: t.payload,
                    timestamp_ms: t.timestamp_ms,
                    handle,
                }
            })
            .collect();
        let mut sink = LiveSink {
            out: &mut self.out,
            batch,
            since,
        };
        self.pipeline
            .on_batch_with(&records, now, &mut sink, &self.workers);
    }

    pub(super) fn on_outcome(&mut self, m: &BorrowedMessage<'_>, now: i64) {
        if let Some(w) = self.outcome_waiting.get(&m.partition()) {
            if m.offset() >= w.offset {
                // Read again once the registry answers.
                return;
            }
        }
        if let (Some(source), Some(value)) = (self.outcome_schemas.as_mut(), m.payload()) {
            if let Err((schema_id, reason)) =
                crate::codec::learn_schema(self.outcome_codec.as_mut(), source, value)
            {
                self.outcome_waiting.insert(
                    m.partition(),
                    crate::pipeline::SchemaWait {
                        offset: m.offset(),
                        schema_id,
                        reason,
                    },
                );
                return;
            }
        }
        if let Some(end) = self.outcomes_backlog.get(&m.partition()) {
            if m.offset() + 1 >= *end {
                self.outcomes_backlog.remove(&m.partition());
                if self.outcomes_backlog.is_empty() {
                    tracing::info!("outcomes backlog read");
                }
            }
        }
        self.out
            .count_consumed("outcomes", m.partition(), m.key(), m.payload());
        let o = match decode_record(self.outcome_codec.as_ref(), m.key(), m.payload()) {
            Ok(o) => o,
            Err(e) => return self.out.dead_letter(&Source::of(m), &e),
        };
        if let Some(o) = self.apply_outcome(o, now) {
            self.out.report.outcomes_skipped += 1;
            self.out.counters.outcomes_skipped += 1;
            if self.recent_outcomes.len() >= RECENT_OUTCOMES {
                self.recent_outcomes.pop_front();
            }
            self.recent_outcomes.push_back(o);
        }
    }

    /// Applies an outcome; gives back one for a segment not owned here (yet).
    pub(super) fn apply_outcome(
        &mut self,
        o: RemediationOutcome,
        now: i64,
    ) -> Option<RemediationOutcome> {
        let (pipeline, mut sink) = self.sink();
        match pipeline.on_outcome(&o, now, &mut sink) {
            OutcomeDisposition::Applied => {
                self.out.report.outcomes_applied += 1;
                *self
                    .out
                    .counters
                    .outcomes
                    .entry(o.status.as_str())
                    .or_default() += 1;
                if self.out.eos {
                    self.txn_outcomes.push(o);
                }
            }
            OutcomeDisposition::NotOurs => return Some(o),
            OutcomeDisposition::Unknown => self.out.counters.outcomes_unknown += 1,
            OutcomeDisposition::Duplicate => {}
        }
        None
    }

    /// Applies buffered outcomes whose segments are owned now.
    pub(super) fn replay_recent_outcomes(&mut self, now: i64) {
        for o in std::mem::take(&mut self.recent_outcomes) {
            if let Some(o) = self.apply_outcome(o, now) {
                self.recent_outcomes.push_back(o);
            }
        }
    }

    pub(super) fn on_control(&mut self, m: &BorrowedMessage<'_>, now: i64) {
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        if let Some(segment) = key.strip_prefix(crate::controller::ACTION_PREFIX) {
            self.on_action_record(segment, m.payload(), now);
            return;
        }
        if let Some(id) = key.strip_prefix(instances::PREFIX) {
            let heartbeat = m
                .payload()
                .and_then(|v| serde_json::from_slice::<instances::InstanceRecord>(v).ok())
                .map(|r| (r.started_ms, r.seen_ms, r.known_segments));
            self.pipeline.on_peer(id, heartbeat);
            return;
        }
        let Some(id) = key.strip_prefix("silence/") else {
            return;
        };
        match m.payload() {
            None => {
                self.pipeline.remove_silence(id);
                tracing::info!(id, "silence removed");
            }
            Some(bytes) => match serde_json::from_slice::<SilenceRecord>(bytes)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    crate::controller::check_record_version("a silence record", s.version)
                        .map_err(|e| {
                            self.fatal = Some(format!("control topic: {e}"));
                            e
                        })
                        .map(|()| s)
                }) {
                Ok(s) => match Silence::new(&s.id, &s.segments, s.from_ms, s.until_ms, &s.reason) {
                    Ok(silence) => {
                        tracing::info!(id = %s.id, segments = %s.segments, created_by = %s.created_by, "silence applied");
                        self.pipeline.add_silence(silence.by(&s.created_by));
                    }
                    Err(e) => tracing::warn!(id, error = %e, "ignoring a silence with a bad glob"),
                },
                Err(e) => tracing::warn!(id, error = %e, "ignoring an unreadable control record"),
            },
        }
    }

    /// Another instance's `action/<segment>` record, or this one's read back (its claims
    /// decide here).
    fn on_action_record(&mut self, segment: &str, value: Option<&[u8]>, now: i64) {
        let record = match value.map(serde_json::from_slice::<crate::controller::ActionRecord>) {
            None => None,
            Some(Ok(r)) => {
                if let Err(e) =
                    crate::controller::check_record_version("an action record", r.version)
                {
                    self.fatal = Some(format!("control topic: {e}"));
                    return;
                }
                Some(r)
            }
            Some(Err(e)) => {
                tracing::warn!(segment, error = %e, "ignoring an unreadable action record");
                return;
            }
        };
        let (pipeline, mut sink) = self.sink();
        pipeline.on_action_record(segment, record, now, &mut sink);
    }

    /// What this instance has under action, for the others (`action/<segment>`, all on
    /// partition 0 of the control topic so every reader sees them in one order).
    pub(super) fn write_actions(&mut self, now: i64) {
        let records = self.pipeline.take_action_records(now);
        if records.is_empty() {
            return;
        }
        let topic = &self.config.topics.control.name;
        for (segment, record) in records {
            let key = format!("{}{segment}", crate::controller::ACTION_PREFIX);
            let value = serde_json::to_vec(&record).expect("an action record serializes");
            send_record(
                &self.out.producer,
                keyed(topic, key.as_bytes(), Some(&value)).partition(0),
            );
        }
    }

    /// Quiet partitions and deadlines on the controller clock (deadlines wait until the
    /// outcomes backlog is read: an ack may be in it).
    pub(super) fn tick(&mut self, now: i64) {
        let deadlines = self.outcomes_backlog.is_empty();
        let (pipeline, mut sink) = self.sink();
        pipeline.tick(now, deadlines, &mut sink);
    }

    pub(super) fn reload(&mut self, set: PolicySet, now: i64) {
        let (pipeline, mut sink) = self.sink();
        pipeline.reload(set, now, &mut sink);
    }

    /// Writes the controller state changed since the last call to the state changelog
    /// (key: segment; partition: the telemetry partition; a tombstone once a segment is
    /// quiet again).
    pub(super) fn write_state(&mut self, now: i64) {
        let topic = self.config.topics.state.name.clone();
        for change in self.pipeline.take_state_changes(now) {
            send_record(
                &self.out.producer,
                keyed(&topic, change.segment.as_bytes(), change.state.as_deref())
                    .partition(change.partition),
            );
            self.out.counters.state_records += 1;
            self.out.report.state_records += 1;
        }
        for p in self.pipeline.assigned().to_vec() {
            let marks = PartitionMarks {
                closed_through_ms: self.pipeline.closed_through(p),
                dead_lettered_through: self.pipeline.dead_letter_mark(p),
            };
            if marks == PartitionMarks::default()
                || self.closed_written.get(&p).is_some_and(|w| *w == marks)
            {
                continue;
            }
            let value = serde_json::to_vec(&PartitionRecord {
                version: crate::controller::RECORD_VERSION,
                closed_through_ms: marks.closed_through_ms.unwrap_or(i64::MIN),
                dead_lettered_through: marks.dead_lettered_through,
            })
            .expect("a partition record serializes");
            send_record(
                &self.out.producer,
                keyed(&topic, PARTITION_KEY, Some(&value)).partition(p),
            );
            self.closed_written.insert(p, marks);
            self.out.counters.state_records += 1;
            self.out.report.state_records += 1;
        }
    }

    /// Partition `p`'s controller state as read from the changelog (`secs`: how long the
    /// read took): applied, or the partition starts from its windows alone (logged), or the
    /// run stops for a record of a newer format.
    pub(super) fn restored(&mut self, p: i32, read: anyhow::Result<Restored>, secs: f64) {
        let result = read.and_then(|(states, marks)| {
            self.closed_written.insert(p, marks);
            self.pipeline
                .restore_dead_letter_mark(p, marks.dead_lettered_through);
            self.pipeline
                .restore(p, states, marks.closed_through_ms)
                .map_err(anyhow::Error::msg)
        });
        self.out.counters.restore_secs.push(secs);
        match result {
            Ok(n) => {
                self.out.counters.state_restored += n as u64;
                tracing::info!(
                    partition = p,
                    segments = n,
                    secs,
                    "controller state restored"
                );
            }
            Err(e) if e.downcast_ref::<NewerRecord>().is_some() => {
                // Misreading a newer format would act on wrong state: stop instead.
                tracing::error!(partition = p, error = %e, "controller state of a newer format");
                self.fatal = Some(e.to_string());
            }
            Err(e) => {
                self.out.counters.restore_failures += 1;
                tracing::error!(partition = p, error = %e, "controller state not restored; the partition starts from windows alone");
            }
        }
    }

    /// Exactly-once, after an aborted transaction: partition `p` starts again, empty (the
    /// loop seeks it to its committed offset and restores its committed state), and the
    /// outcomes the aborted transaction had applied wait to be applied again.
    pub(super) fn restart(&mut self, p: i32) {
        self.out.txn_windowed = 0;
        self.pipeline.revoke(p);
        self.pending_offsets.remove(&p);
        self.closed_written.remove(&p);
        self.pipeline.assign(p);
        let applied = std::mem::take(&mut self.txn_outcomes);
        self.recent_outcomes.extend(applied);
    }

    /// Dead-letter deliveries since the last turn: an acknowledged write releases the commit
    /// floor; a failed one is written again (truncated further if it was too large), and after
    /// [`DLQ_ATTEMPTS`] the run stops, never having committed past it. Exactly-once: the
    /// failed write fails its transaction, whose rewind writes it again.
    pub(super) fn account_dead_letters(&mut self) {
        let deliveries = std::mem::take(&mut *lock(&self.out.producer.context().dead_letters));
        for d in deliveries {
            let Some(f) = d.failed else {
                self.out.dlq_attempts.remove(&(d.partition, d.offset));
                self.pipeline.dead_letter_acked(d.partition, d.offset);
                continue;
            };
            if self.out.eos {
                if f.too_large {
                    self.out.dlq_limit = (self.out.dlq_limit / 2).max(MIN_DLQ_LIMIT);
                }
                continue;
            }
            let attempts = self
                .out
                .dlq_attempts
                .entry((d.partition, d.offset))
                .or_insert(0);
            *attempts += 1;
            if *attempts >= DLQ_ATTEMPTS {
                self.fatal = Some(format!(
                    "the DLQ topic {} cannot be written: {} (the dead letter of partition {} offset {} failed {} times); the committed offset stays before it, so a restart writes it again",
                    self.out.dlq_topic, f.error, d.partition, d.offset, DLQ_ATTEMPTS
                ));
                continue;
            }
            if let Some(n) = self.out.log_every("dlq-retry", HELD_BACK_LOG_EVERY) {
                tracing::warn!(error = %f.error, partition = d.partition, offset = d.offset, failures = n, "dead letter not written; writing it again (the commit waits for it)");
            }
            self.out.write_dead_letter(
                (d.partition, d.offset),
                f.key.as_deref(),
                f.value.as_deref(),
                &f.headers,
                f.too_large,
            );
        }
    }

    pub(super) fn refresh_offsets(&mut self) {
        for &p in self.pipeline.assigned() {
            if let Some(o) = self.pipeline.committable_offset(p) {
                self.pending_offsets.insert(p, o);
            }
        }
    }
}

/// The loop's state at startup: the pipeline (nothing caught up or read through until the
/// lag says so; with a registry, schema ids learned through `resolver`) and its output, with
/// the schemas segloop writes registered.
pub(super) fn build_core(
    config: &Config,
    policies: PolicySet,
    producer: Arc<ThreadedProducer<ProduceContext>>,
    registry: Option<&crate::registry::Registry>,
    resolver: Option<crate::registry::Resolver>,
    eos: bool,
) -> anyhow::Result<Core> {
    let t = &config.topics;
    let codec_err = |topic: &str, e: String| anyhow::anyhow!("topics.{topic}: {e}");
    let threads = config.engine.effective_threads();
    let mut pipeline = Pipeline::sharded(config, policies, PipelineOptions::live(), threads)
        .map_err(anyhow::Error::msg)?;
    if threads > 1 {
        tracing::info!(
            threads,
            max_segments_per_thread = config.windows.max_segments_per_thread(threads),
            "engine: telemetry decoded and windowed on {threads} threads, each owning a share of the assigned partitions"
        );
    }
    pipeline.track_dead_letters();
    // No partition is caught up until the lag says so: a verification with no deciding window
    // waits for the re-read telemetry after a restart.
    pipeline.set_caught_up(Some(BTreeSet::new()));
    // Nor is any partition read through to its end: the idle advance waits for the lag.
    pipeline.set_read_through(Some(BTreeMap::new()));
    if let Some(r) = &resolver {
        pipeline.set_schema_source(Box::new(r.clone()));
    }
    let writer = |topic: &crate::config::TopicConfig, kind| {
        crate::registry::writer_settings(config, registry, topic, &topic.name, kind)
    };
    let command_settings = writer(&t.actions, crate::schema::SchemaKind::Command)?;
    let decision_settings = writer(&t.decisions, crate::schema::SchemaKind::Decision)?;
    Ok(Core {
        pipeline,
        workers: super::workers::Workers::new(threads)?,
        out: Output {
            producer,
            command_codec: build_codec(t.actions.codec, &command_settings)
                .map_err(|e| codec_err("actions", e))?,
            decision_codec: build_codec(t.decisions.codec, &decision_settings)
                .map_err(|e| codec_err("decisions", e))?,
            actions_topic: t.actions.name.clone(),
            decisions_topic: t.decisions.name.clone(),
            dlq_topic: t.dlq.name.clone(),
            counters: Counters {
                topic_names: [
                    ("telemetry", t.telemetry.name.clone()),
                    ("outcomes", t.outcomes.name.clone()),
                ]
                .into(),
                ..Counters::default()
            },
            report: RunReport::default(),
            eos,
            txn_windowed: 0,
            held_back: BTreeMap::new(),
            dlq_limit: dlq_limit(config),
            dlq_attempts: HashMap::new(),
        },
        outcome_codec: build_codec(t.outcomes.codec, &config.schema_settings(&t.outcomes))
            .map_err(|e| codec_err("outcomes", e))?,
        outcome_schemas: resolver,
        outcome_waiting: BTreeMap::new(),
        pending_offsets: BTreeMap::new(),
        recent_outcomes: std::collections::VecDeque::new(),
        outcomes_backlog: BTreeMap::new(),
        txn_outcomes: Vec::new(),
        needs_rewind: false,
        fatal: None,
        closed_written: BTreeMap::new(),
        config: config.clone(),
    })
}
