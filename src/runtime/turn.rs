//! The loop: one turn after another, each a sequence of named steps.
//!
//! A turn: [`Loop::poll`] the telemetry (records and group events as one ordered
//! [`Stream`]), [`Loop::apply`] it, [`Loop::read_side_topics`] (outcomes, control),
//! [`Loop::reload_policies`], [`Loop::close_turn`] (deadlines, dead letters, state records,
//! committable offsets and `/readyz`), [`Loop::sync_schema_waits`],
//! [`Loop::commit`], [`Loop::rewind`] (exactly-once, after an abort), [`Loop::measure_lag`],
//! [`Loop::publish`]. The core is locked inside a step and released before every broker round
//! trip (commit, flush, transaction, changelog read, seek).

use super::*;

/// What the loop is built from (see [`run`]).
pub(super) struct Parts {
    pub(super) core: SharedCore,
    pub(super) status: Arc<Mutex<Status>>,
    pub(super) heartbeat: Arc<Heartbeat>,
    pub(super) producer: Arc<ThreadedProducer<ProduceContext>>,
    pub(super) outcomes: BaseConsumer<kafka::Collapsing>,
    pub(super) controls: BaseConsumer<kafka::Collapsing>,
    pub(super) changelog: Changelog,
    /// This instance's record on the control topic (see [`instances`]).
    pub(super) me: instances::InstanceRecord,
    pub(super) resolver: Option<crate::registry::Resolver>,
    pub(super) policies_path: Option<PathBuf>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) config: Config,
}

/// Most records taken from the telemetry consumer in one turn. A window closed by a record waits
/// for the records before it in its batch: at 100,000 segments 4,096 records put the close →
/// command p99 at 10-14 ms, 1,024 at 5-9 ms (docs/benchmarks.md).
const BATCH: usize = 1024;

/// How often the committable offsets are computed, besides the turns a commit is due on.
const OFFSETS_EVERY: Duration = Duration::from_millis(100);

pub(super) struct Loop {
    p: Parts,
    eos: bool,
    committer: Committer,
    schema_waits: Option<schema_wait::SchemaWaits>,
    outcome_waits: Option<schema_wait::SchemaWaits>,
    telemetry_errors: ConsumeErrors,
    outcome_errors: ConsumeErrors,
    control_errors: ConsumeErrors,
    lag: LagMarks,
    last_commit: Instant,
    last_lag: Instant,
    last_publish: Instant,
    last_policy_check: Instant,
    /// When the committable offsets were last computed (a scan of every open window).
    last_offsets: Instant,
    /// When the instance record was last written (`None`: not yet).
    last_announce: Option<Instant>,
    policy_mtime: Option<SystemTime>,
    poll_time: Duration,
    work_time: Duration,
    turns: u64,
}

/// How the loop ended.
pub(super) enum Ended {
    /// `control.stop()`: shut down gracefully.
    Stopped,
    /// A reason to stop that still lets the shutdown commit what is safe (a schema waited
    /// past `schema_registry.max_wait`).
    FailedAfterCommit(anyhow::Error),
    /// A fatal error (fenced, a newer record format, a DLQ that cannot be written, a consume
    /// error no retry fixes): nothing more is committed.
    Failed(anyhow::Error),
}

/// What two lag measurements in a row establish (see [`Loop::measure_lag`]).
#[derive(Default)]
pub(super) struct LagMarks {
    within_before: BTreeSet<i32>,
    at_end_before: BTreeSet<i32>,
    measured_before_ms: i64,
    pub(super) read_through: BTreeMap<i32, i64>,
}

impl LagMarks {
    /// Takes one measurement (`lag` per partition, at `measured_ms` on the driver clock);
    /// returns the partitions caught up (within the readiness threshold in this one and the
    /// one before). A partition at its end in both is read through the time of the first.
    pub(super) fn observe(&mut self, lag: &BTreeMap<i32, i64>, measured_ms: i64) -> BTreeSet<i32> {
        let within: BTreeSet<i32> = lag
            .iter()
            .filter(|(_, l)| **l <= admin::READY_MAX_LAG)
            .map(|(p, _)| *p)
            .collect();
        let caught_up = within.intersection(&self.within_before).copied().collect();
        self.within_before = within;
        let at_end: BTreeSet<i32> = lag
            .iter()
            .filter(|(_, l)| **l == 0)
            .map(|(p, _)| *p)
            .collect();
        for p in at_end.intersection(&self.at_end_before) {
            self.read_through.insert(*p, self.measured_before_ms);
        }
        self.at_end_before = at_end;
        self.measured_before_ms = measured_ms;
        caught_up
    }

    /// `partition` is read again from an earlier offset (a schema wait answered: the seek
    /// back): what was measured of it no longer holds. It is read through nothing until two
    /// measurements after the seek say so, and no measurement before the seek counts towards
    /// caught up (an idle advance in between
    /// closed the windows of the records about to be read again, and they went to the DLQ
    /// as late).
    pub(super) fn forget(&mut self, partition: i32) {
        self.within_before.remove(&partition);
        self.at_end_before.remove(&partition);
        self.read_through.remove(&partition);
    }
}

impl Loop {
    pub(super) fn new(p: Parts) -> Loop {
        let t = &p.config.topics;
        let max_wait = p.config.schema_registry.max_wait;
        let waits = |topic: &str| {
            p.resolver
                .as_ref()
                .map(|r| schema_wait::SchemaWaits::new(r.clone(), topic, max_wait))
        };
        Loop {
            eos: p.config.delivery.mode == crate::config::DeliveryMode::ExactlyOnce,
            committer: Committer::default(),
            schema_waits: waits(&t.telemetry.name),
            outcome_waits: waits(&t.outcomes.name),
            telemetry_errors: ConsumeErrors::new(&t.telemetry.name),
            outcome_errors: ConsumeErrors::new(&t.outcomes.name),
            control_errors: ConsumeErrors::new(&t.control.name),
            lag: LagMarks {
                measured_before_ms: i64::MIN,
                ..LagMarks::default()
            },
            last_commit: Instant::now(),
            last_lag: Instant::now(),
            last_publish: Instant::now(),
            last_policy_check: Instant::now(),
            last_announce: None,
            last_offsets: Instant::now(),
            policy_mtime: p.policies_path.as_ref().and_then(|p| mtime(p)),
            poll_time: Duration::ZERO,
            work_time: Duration::ZERO,
            turns: 0,
            p,
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        lock(&self.p.core)
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        lock(&self.p.status)
    }

    /// Turns until `control.stop()` or a reason to stop.
    pub(super) fn run(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        feeds: &[kafka::Feed],
        control: &Control,
    ) -> Ended {
        let mut stream: Stream<Polled<'_, '_>> = Stream::with_capacity(BATCH);
        let mut fed = Vec::with_capacity(BATCH);
        while !control.stopping() {
            self.turns += 1;
            let polled = Instant::now();
            let poll_error = self.poll(consumer, feeds, &mut fed, &mut stream);
            let polled_at = Instant::now();
            self.poll_time += polled_at - polled;
            self.consume_errors(consumer, poll_error, !stream.records.is_empty());
            let now = self.p.clock.now_ms();
            self.apply(consumer, &stream, now, polled_at);
            // Messages pin librdkafka state: release them now, never hold them across turns
            // (a consumer destroyed with messages alive waits for them forever).
            stream.clear();
            self.read_side_topics(now);
            self.reload_policies(control);
            self.close_turn(now);
            if let Err(e) = self.sync_schema_waits(consumer) {
                return Ended::FailedAfterCommit(e);
            }
            if let Some(why) = [
                &self.telemetry_errors,
                &self.outcome_errors,
                &self.control_errors,
            ]
            .iter()
            .find_map(|e| e.must_stop(self.p.config.kafka.connect_timeout))
            {
                return Ended::Failed(anyhow::anyhow!("{why}"));
            }
            self.work_time += polled_at.elapsed();
            self.commit(consumer);
            let fatal = self.core().fatal.take();
            if let Some(e) = fatal {
                return Ended::Failed(anyhow::anyhow!("{e}"));
            }
            self.rewind(consumer);
            self.measure_lag(consumer);
            self.announce();
            self.publish();
        }
        Ended::Stopped
    }

    /// Polls the telemetry: the consumer's queue first (rebalances run their callback there,
    /// so every group event comes before this turn's records from the feeds), then a batch
    /// from each shard's feed, waiting briefly for the first record when there is nothing else
    /// to do. A record on the consumer's queue (a partition not routed to a feed) keeps its
    /// place among the events.
    fn poll<'f, 'c>(
        &mut self,
        consumer: &'c BaseConsumer<GroupContext>,
        feeds: &'f [kafka::Feed],
        fed: &mut Vec<kafka::Fed<'f>>,
        stream: &mut Stream<Polled<'f, 'c>>,
    ) -> Option<rdkafka::error::KafkaError> {
        stream.clear();
        while stream.records.len() < BATCH {
            let polled = consumer.poll(Duration::ZERO);
            let at = stream.records.len();
            stream.events.extend(
                consumer
                    .context()
                    .take_events()
                    .into_iter()
                    .map(|ev| (at, ev)),
            );
            match polled {
                Some(Ok(m)) => stream.records.push(Polled::Main(m)),
                Some(Err(e)) => return Some(e),
                None => break,
            }
        }
        let room = BATCH - stream.records.len();
        let mut errors = Vec::new();
        for feed in feeds {
            feed.take(room, Duration::ZERO, fed, &mut errors);
        }
        if stream.is_empty() && fed.is_empty() && errors.is_empty() {
            // Nothing anywhere: wait for the first record, on one feed at a time in short
            // slices when there are several (a record on another feed waits one slice).
            let slice = Duration::from_millis(if feeds.len() > 1 { 5 } else { 50 });
            let until = Instant::now() + Duration::from_millis(50);
            'wait: while Instant::now() < until {
                for feed in feeds {
                    feed.take(room, slice, fed, &mut errors);
                    if !fed.is_empty() || !errors.is_empty() {
                        break 'wait;
                    }
                }
            }
            for feed in feeds {
                feed.take(room, Duration::ZERO, fed, &mut errors);
            }
        }
        stream.records.extend(fed.drain(..).map(Polled::Fed));
        errors.into_iter().next()
    }

    /// Counts and logs the telemetry consumer's errors (and those raised outside a poll).
    fn consume_errors(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        poll_error: Option<rdkafka::error::KafkaError>,
        progress: bool,
    ) {
        let client_errors = std::mem::take(&mut *lock(&consumer.context().client_errors));
        if poll_error.is_none() && client_errors.is_empty() {
            if progress {
                self.telemetry_errors.on_progress();
            }
            return;
        }
        // Which partitions: those with records behind them that this instance owns.
        let behind: Vec<i32> = self
            .status()
            .lag
            .iter()
            .filter(|(_, l)| **l > 0)
            .map(|(p, _)| *p)
            .collect();
        let behind = format!("{behind:?} (behind)");
        let core = &mut *lock(&self.p.core);
        if let Some(e) = poll_error {
            self.telemetry_errors
                .on_error(&e, "", &behind, &mut core.out.counters);
        }
        for (e, reason) in client_errors {
            self.telemetry_errors.on_error(
                &e,
                &format!(": {reason}"),
                "all",
                &mut core.out.counters,
            );
        }
    }

    /// Applies the polled stream in order: runs of records through the pipeline, group
    /// events between them ([`Stream::plan`]). After an aborted transaction the owned
    /// partitions rewind at once and the rest of the batch is read again.
    fn apply(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        stream: &Stream<Polled<'_, '_>>,
        now: i64,
        polled_at: Instant,
    ) {
        if stream.is_empty() {
            return;
        }
        let (steps, left_out) = stream.plan(|m| m.partition());
        if left_out > 0 {
            tracing::info!(
                records = left_out,
                "records polled before their partition was revoked left for the new owner"
            );
            self.core().out.counters.handed_over += left_out as u64;
        }
        let mut rewound = false;
        for step in steps {
            match step {
                Step::Records(which) if !rewound => {
                    self.core()
                        .on_telemetry(&stream.records, &which, now, polled_at);
                }
                Step::Records(_) => {}
                Step::Group(GroupEvent::Revoked { parts, handover }) => {
                    let _span = tracing::info_span!("revoke", partitions = ?parts).entered();
                    if let Some(w) = self.schema_waits.as_mut() {
                        w.rebalanced(consumer, &parts, false);
                    }
                    self.committer.revoked(&parts);
                    self.core().on_revoked(&parts, handover);
                    rewound |= self.rewind(consumer);
                }
                Step::Group(GroupEvent::Assigned(parts)) => {
                    let _span = tracing::info_span!("assign", partitions = ?parts).entered();
                    if let Some(w) = self.schema_waits.as_mut() {
                        w.rebalanced(consumer, &parts, true);
                    }
                    let shards: Vec<Option<usize>> = parts
                        .iter()
                        .map(|p| consumer.context().shard_of(*p))
                        .collect();
                    self.core().on_assigned(&parts, &shards);
                    self.restore(&parts);
                    self.core().replay_recent_outcomes(now);
                    self.status().joined = true;
                }
            }
        }
    }

    /// Restores the controller state of `parts` from the changelog, the core unlocked while
    /// reading; `/readyz` shows the progress, and the heartbeat goes on.
    fn restore(&mut self, parts: &[i32]) {
        let (status, heartbeat) = (self.p.status.clone(), self.p.heartbeat.clone());
        let read = self.p.changelog.restore(parts, &mut |progress| {
            heartbeat.beat();
            lock(&status).restoring = Some(progress);
        });
        self.status().restoring = None;
        let mut core = self.core();
        for (p, result, secs) in read {
            core.restored(p, result, secs);
        }
    }

    /// Outcomes (a larger share while their startup backlog is read) and operator intents.
    fn read_side_topics(&mut self, now: i64) {
        let core = &mut *lock(&self.p.core);
        let outcome_batch = if core.outcomes_backlog.is_empty() {
            256
        } else {
            8192
        };
        for _ in 0..outcome_batch {
            match self.p.outcomes.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    self.outcome_errors.on_progress();
                    core.on_outcome(&m, now);
                }
                Some(Err(e)) => {
                    self.outcome_errors
                        .on_error(&e, "", "all", &mut core.out.counters);
                    break;
                }
                None => break,
            }
        }
        for _ in 0..256 {
            match self.p.controls.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    self.control_errors.on_progress();
                    core.on_control(&m, now);
                }
                Some(Err(e)) => {
                    self.control_errors
                        .on_error(&e, "", "all", &mut core.out.counters);
                    break;
                }
                None => break,
            }
        }
    }

    /// Re-reads the policy file on SIGHUP or when it changed (checked every 2 s).
    fn reload_policies(&mut self, control: &Control) {
        let Some(path) = self.p.policies_path.clone() else {
            return;
        };
        let hup = control.take_reload();
        if !hup && self.last_policy_check.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_policy_check = Instant::now();
        let m = mtime(&path);
        if !hup && m == self.policy_mtime {
            return;
        }
        self.policy_mtime = m;
        match PolicySet::load_for(&path, &self.p.config.windows) {
            Ok(set) => {
                let now = self.p.clock.now_ms();
                self.core().reload(set, now);
                tracing::info!(path = %path.display(), "policies reloaded");
            }
            Err(e) => {
                tracing::error!(errors = %e, "policy reload refused; keeping the old policies");
            }
        }
    }

    /// The turn's bookkeeping: deadlines, dead-letter deliveries, the state records of every
    /// change, the committable offsets (what a revoke commits, so they are computed after
    /// the state records are queued), and the instance's status.
    fn close_turn(&mut self, now: i64) {
        let core = &mut *lock(&self.p.core);
        core.tick(now);
        core.account_dead_letters();
        core.write_state(now);
        core.write_actions(now);
        // The committable offsets scan every open window of every owned partition: at most
        // every OFFSETS_EVERY, and on the turn a commit is due. Offsets only grow, so a
        // revoke that commits slightly older ones commits less, never too much.
        if self.last_offsets.elapsed() >= OFFSETS_EVERY || self.commit_due() {
            self.last_offsets = Instant::now();
            core.refresh_offsets();
        }
        core.pipeline.end_turn(now);
        let mut s = lock(&self.p.status);
        s.assigned = core.pipeline.assigned().to_vec();
        self.p.heartbeat.beat();
        s.consume_errors = [
            &self.telemetry_errors,
            &self.outcome_errors,
            &self.control_errors,
        ]
        .iter()
        .filter_map(|e| e.fresh())
        .collect();
    }

    /// Pauses the telemetry and outcome partitions waiting on the schema registry, and reads
    /// the answered ones again (see [`schema_wait`]); publishes the waits to `/readyz` and
    /// metrics.
    ///
    /// # Errors
    /// A partition waited longer than `schema_registry.max_wait`.
    fn sync_schema_waits(&mut self, consumer: &BaseConsumer<GroupContext>) -> anyhow::Result<()> {
        let (Some(tw), Some(ow)) = (self.schema_waits.as_mut(), self.outcome_waits.as_mut()) else {
            return Ok(());
        };
        let core = &self.p.core;
        let (waiting, outcome_waiting) = {
            let c = lock(core);
            (c.pipeline.waiting().clone(), c.outcome_waiting.clone())
        };
        let lag = &mut self.lag;
        let result = tw.sync(consumer, &waiting).and_then(|answered| {
            let more = ow.sync(&self.p.outcomes, &outcome_waiting)?;
            if !answered.is_empty() || !more.is_empty() {
                let mut c = lock(core);
                for &p in &answered {
                    lag.forget(p);
                    c.pipeline.stop_waiting(p);
                }
                if !answered.is_empty() {
                    c.pipeline.set_read_through(Some(lag.read_through.clone()));
                }
                for p in more {
                    c.outcome_waiting.remove(&p);
                }
            }
            Ok(())
        });
        let mut described = tw.describe();
        described.extend(ow.describe());
        metrics::gauge!(crate::metrics::SCHEMA_WAITING).set((tw.len() + ow.len()) as f64);
        metrics::counter!(crate::metrics::REGISTRY_REQUESTS).absolute(tw.requests());
        lock(&self.p.status).schema_waits = described;
        result
    }

    /// Whether this turn commits (`commit_interval` passed since the last commit).
    fn commit_due(&self) -> bool {
        self.last_commit.elapsed() >= self.p.config.delivery.commit_interval
    }

    /// Commits what is safe. At-least-once: every `commit_interval` the committable offsets
    /// are noted with the producer's delivery mark, and committed (asynchronously) once every
    /// record produced before them is acknowledged, on whichever turn that is: the loop never
    /// waits for the producer. Exactly-once: the transaction commits every `commit_interval`.
    fn commit(&mut self, consumer: &BaseConsumer<GroupContext>) {
        let interval = self.p.config.delivery.commit_interval;
        let due = self.commit_due();
        if due {
            self.last_commit = Instant::now();
        }
        let topic = &self.p.config.topics.telemetry.name;
        if self.eos {
            if !due {
                return;
            }
            let (offsets, fatal) = {
                let c = self.core();
                (c.pending_offsets.clone(), c.fatal.is_some())
            };
            if fatal {
                return;
            }
            let result = commit_transaction(consumer, topic, &self.p.producer, &offsets, interval);
            self.core().after_transaction(result);
            return;
        }
        let deliveries = &self.p.producer.context().deliveries;
        if due {
            let offsets = self
                .core()
                .pending_offsets
                .iter()
                .map(|(p, o)| (*p, *o))
                .collect();
            self.committer.note(deliveries.mark(), offsets);
        }
        let result = match self.committer.ready(deliveries) {
            None => return,
            Some(None) => {
                tracing::warn!("produced records not confirmed; not committing this round");
                CommitResult::Unconfirmed
            }
            Some(Some(offsets)) => commit(consumer, topic, &offsets, CommitMode::Async),
        };
        self.core().after_commit(&result);
    }

    /// Exactly-once, after an aborted transaction: every owned partition goes back to its
    /// last committed state (committed offset, changelog), and the outcomes the aborted
    /// transaction had applied are applied again. Returns whether it rewound.
    fn rewind(&mut self, consumer: &BaseConsumer<GroupContext>) -> bool {
        let parts = {
            let mut c = self.core();
            if !std::mem::take(&mut c.needs_rewind) {
                return false;
            }
            let parts = c.pipeline.assigned().to_vec();
            for p in &parts {
                c.restart(*p);
            }
            parts
        };
        let topic = &self.p.config.topics.telemetry.name;
        let committed = consumer
            .committed(Duration::from_secs(10))
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.partition(), e.offset()))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        for p in &parts {
            let to = match committed.get(p) {
                Some(Offset::Offset(o)) => Offset::Offset(*o),
                _ => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(topic, *p, to, Duration::from_secs(10)) {
                tracing::error!(partition = p, error = %e, "rewind: seek failed");
                self.core().fatal =
                    Some(format!("exactly-once: rewind of partition {p} failed: {e}"));
                return true;
            }
        }
        self.restore(&parts);
        let now = self.p.clock.now_ms();
        self.core().replay_recent_outcomes(now);
        tracing::info!(?parts, "rewound to the last committed state");
        true
    }

    /// Every 2 s: the lag per owned partition, and what two measurements in a row establish.
    /// Caught up: within the readiness threshold in both (so a backlog's tail, or records
    /// fetched but not yet delivered, are read before a verification is judged without its
    /// window). Read through: at the high watermark in both, so the second saw a high
    /// watermark fetched after the first (one cached from before a stall cannot pass for the
    /// end); everything written before the first was read then.
    fn measure_lag(&mut self, consumer: &BaseConsumer<GroupContext>) {
        if self.last_lag.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_lag = Instant::now();
        let waiting: BTreeMap<i32, i64> = (self.core().pipeline.waiting().iter())
            .map(|(p, w)| (*p, w.offset))
            .collect();
        let lag = group::measure_lag(consumer, &waiting);
        let caught_up = self.lag.observe(&lag, self.p.clock.now_ms());
        let read_through = self.lag.read_through.clone();
        {
            let mut c = self.core();
            c.pipeline.set_caught_up(Some(caught_up));
            c.pipeline.set_read_through(Some(read_through));
        }
        self.status().lag = lag;
    }

    /// Every [`instances::HEARTBEAT`]: this instance's record on the control topic (exactly-once
    /// in the open transaction: visible once it commits).
    fn announce(&mut self) {
        if self
            .last_announce
            .is_some_and(|t| t.elapsed() < instances::HEARTBEAT)
        {
            return;
        }
        let me = &mut self.p.me;
        self.last_announce = Some(Instant::now());
        me.seen_ms = self.p.clock.now_ms();
        me.known_segments = lock(&self.p.core).pipeline.controller().known_segments();
        let value = serde_json::to_vec(&*me).expect("an instance record serializes");
        self.write_me(Some(&value));
    }

    /// This instance's record on the control topic (`None`: the tombstone that frees its id
    /// and tells the others it stopped).
    fn write_me(&self, value: Option<&[u8]>) {
        let key = instances::key(&self.p.me.transactional_id);
        let topic = &self.p.config.topics.control.name;
        send_record(&self.p.producer, keyed(topic, key.as_bytes(), value));
    }

    /// Every 250 ms: the metrics.
    fn publish(&mut self) {
        if self.last_publish.elapsed() < Duration::from_millis(250) {
            return;
        }
        self.last_publish = Instant::now();
        publish(&self.p.core, &self.p.producer, &self.p.status);
    }

    /// Graceful shutdown: the last state records, then a commit of what is safe (everything
    /// produced acknowledged first); returns what the run did.
    pub(super) fn shutdown(&mut self, consumer: &BaseConsumer<GroupContext>) -> RunReport {
        // The loop's time split is this log line's (the library reads no process environment).
        tracing::info!(
            turns = self.turns,
            poll_secs = self.poll_time.as_secs_f64(),
            work_secs = self.work_time.as_secs_f64(),
            "shutting down: flushing and committing"
        );
        let deadline = self.p.config.delivery.shutdown_timeout;
        let offsets = {
            let mut c = self.core();
            c.write_state(self.p.clock.now_ms());
            c.refresh_offsets();
            c.pending_offsets.clone()
        };
        let topic = &self.p.config.topics.telemetry.name;
        // Gone: the id is free (committed with the last transaction).
        self.write_me(None);
        if self.eos {
            if self.core().fatal.is_none() {
                let result =
                    commit_transaction(consumer, topic, &self.p.producer, &offsets, deadline);
                self.core().after_transaction(result);
            }
        } else {
            let offsets: Vec<(i32, i64)> = offsets.into_iter().collect();
            let result = commit_flushed(consumer, topic, &self.p.producer, &offsets, deadline);
            self.core().after_commit(&result);
        }
        publish(&self.p.core, &self.p.producer, &self.p.status);
        self.core().report()
    }
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
