//! `segloop actuator`: the reference actuator — what downstream actuator teams copy.
//!
//! It consumes the actions topic in its own consumer group, and for each command writes
//! ACCEPTED to the outcomes topic, runs a handler, then writes APPLIED, FAILED or REJECTED with
//! the handler's result. Handlers: a shell command per action, or a webhook. It is idempotent
//! on `command_id` (a command seen before is not run again), and at-least-once: offsets commit
//! after the command's outcomes are acknowledged by the broker. Dry-run commands are logged
//! and answered, never executed. Commands are handled one at a time, in order per partition.

use std::collections::{HashSet, VecDeque};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::clock::{Clock, Control, SystemClock};
use crate::codec::{build_codec, decode_record};
use crate::config::{ActuatorConfig, Config};
use crate::kafka;
use crate::model::{OutcomeStatus, RemediationCommand, RemediationOutcome};

/// What a handler made of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerOutcome {
    Applied(String),
    Failed(String),
    Rejected(String),
    /// Write nothing (a simulated actuator that never answers).
    Silent,
}

/// Runs commands.
pub trait Handler: Send + Sync {
    fn handle(&self, cmd: &RemediationCommand) -> HandlerOutcome;
}

/// A shell command per action, then a webhook, as configured.
pub struct ConfiguredHandler {
    config: ActuatorConfig,
    agent: ureq::Agent,
}

impl ConfiguredHandler {
    pub fn new(config: ActuatorConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        ConfiguredHandler { config, agent }
    }

    fn shell(&self, script: &str, cmd: &RemediationCommand) -> HandlerOutcome {
        let params = serde_json::to_string(&cmd.params).unwrap_or_default();
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("SEGLOOP_COMMAND_ID", &cmd.command_id)
            .env("SEGLOOP_SEGMENT", &cmd.segment)
            .env("SEGLOOP_ACTION", &cmd.action)
            .env("SEGLOOP_ATTEMPT", cmd.attempt.to_string())
            .env("SEGLOOP_POLICY", &cmd.policy)
            .env("SEGLOOP_PARAMS", params)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return HandlerOutcome::Failed(format!("cannot run the handler: {e}")),
        };
        let deadline = Instant::now() + self.config.timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return HandlerOutcome::Failed(format!(
                        "handler timed out after {}",
                        humantime::format_duration(self.config.timeout)
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return HandlerOutcome::Failed(format!("handler wait failed: {e}")),
            }
        }
        match child.wait_with_output() {
            Ok(out) => {
                let text = |b: &[u8]| {
                    String::from_utf8_lossy(b)
                        .trim()
                        .chars()
                        .take(2000)
                        .collect::<String>()
                };
                if out.status.success() {
                    HandlerOutcome::Applied(text(&out.stdout))
                } else {
                    let mut msg = text(&out.stderr);
                    if msg.is_empty() {
                        msg = text(&out.stdout);
                    }
                    HandlerOutcome::Failed(format!(
                        "exit {}: {msg}",
                        out.status.code().unwrap_or(-1)
                    ))
                }
            }
            Err(e) => HandlerOutcome::Failed(format!("handler output unreadable: {e}")),
        }
    }

    fn webhook(&self, url: &str, cmd: &RemediationCommand) -> HandlerOutcome {
        match self.agent.post(url).send_json(cmd) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let body: String = resp
                    .body_mut()
                    .read_to_string()
                    .unwrap_or_default()
                    .chars()
                    .take(2000)
                    .collect();
                match status {
                    200..=299 => HandlerOutcome::Applied(body),
                    400..=499 => HandlerOutcome::Rejected(format!("HTTP {status}: {body}")),
                    _ => HandlerOutcome::Failed(format!("HTTP {status}: {body}")),
                }
            }
            Err(e) => HandlerOutcome::Failed(format!("webhook failed: {e}")),
        }
    }
}

impl Handler for ConfiguredHandler {
    fn handle(&self, cmd: &RemediationCommand) -> HandlerOutcome {
        if let Some(script) = self.config.shell.get(&cmd.action) {
            return self.shell(script, cmd);
        }
        if let Some(url) = &self.config.webhook {
            return self.webhook(url, cmd);
        }
        HandlerOutcome::Rejected(format!("no handler for action {:?}", cmd.action))
    }
}

/// Remembers recent command ids (bounded), for idempotency.
pub struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Seen {
    pub fn new(cap: usize) -> Self {
        Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// True the first time an id is offered.
    pub fn first(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

/// What an actuator run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActuatorReport {
    pub commands: u64,
    pub duplicates: u64,
    pub applied: u64,
    pub failed: u64,
    pub rejected: u64,
    pub undecodable: u64,
    /// Commands past their ack deadline: answered REJECTED (`expired`), not run.
    pub expired: u64,
    /// Commands found answered in the outcomes topic at startup (not run again).
    pub answered_before: u64,
}

/// Consumes commands until `control.stop()`.
///
/// # Errors
/// Kafka clients cannot be created or subscribed.
pub fn run(
    config: &Config,
    handler: Arc<dyn Handler>,
    control: Arc<Control>,
    mut on_command: impl FnMut(&RemediationCommand),
) -> anyhow::Result<ActuatorReport> {
    kafka::connect(config)?;
    let t = &config.topics;
    let a = &config.actuator;
    let consumer: BaseConsumer = kafka::client_config(
        config,
        &[
            ("group.id", &a.group_id),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            // Commands of aborted exactly-once transactions never reach an actuator.
            ("isolation.level", "read_committed"),
        ],
    )
    .create()
    .context("cannot create the actions consumer")?;
    consumer
        .subscribe(&[&t.actions.name])
        .context("cannot subscribe to the actions topic")?;
    let producer: ThreadedProducer<DefaultProducerContext> = kafka::producer_config(
        config,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("partitioner", "murmur2_random"),
        ],
    )
    .create()
    .context("cannot create the outcomes producer")?;
    let mut commands =
        build_codec::<RemediationCommand>(t.actions.codec, &config.schema_settings(&t.actions))
            .map_err(anyhow::Error::msg)?;
    let registry = crate::registry::Registry::from_config(&config.schema_registry)
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    let outcome_settings = crate::registry::writer_settings(
        config,
        registry.as_deref(),
        &t.outcomes,
        &t.outcomes.name,
        crate::schema::SchemaKind::Outcome,
    )?;
    let mut outcomes = build_codec::<RemediationOutcome>(t.outcomes.codec, &outcome_settings)
        .map_err(anyhow::Error::msg)?;
    // With a registry, the writer schema of an id not seen is asked for; a registry that
    // does not answer within schema_registry.max_wait stops the actuator (a command is never
    // skipped for it).
    let mut schemas =
        registry.map(|r| crate::registry::Resolver::patient(r, config.schema_registry.max_wait));
    fn learn<T>(
        schemas: &mut Option<crate::registry::Resolver>,
        codec: &mut dyn crate::codec::Codec<T>,
        value: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        if let (Some(source), Some(value)) = (schemas.as_mut(), value) {
            crate::codec::learn_schema(codec, source, value).map_err(|(id, reason)| {
                anyhow::anyhow!(
                    "the schema registry did not answer for schema id {id} within \
                     schema_registry.max_wait: {reason}"
                )
            })?;
        }
        Ok(())
    }
    let mut unanswered = None;
    let mut seen = Seen::new(100_000);
    let mut report = ActuatorReport::default();
    // Idempotence across restarts and group changes: a command another actuator (or this one,
    // before a restart) already answered within the lookback is not run again.
    let lookback = config.delivery.outcome_lookback.as_millis() as i64;
    kafka::read_since(
        config,
        &t.outcomes.name,
        SystemClock.now_ms() - lookback,
        Duration::from_secs(30),
        |_, v| {
            let Some(v) = v else { return };
            if let Err(e) = learn(&mut schemas, outcomes.as_mut(), Some(v)) {
                unanswered.get_or_insert(e);
            }
            if let Ok(o) = outcomes.decode(v) {
                if seen.first(&o.command_id) {
                    report.answered_before += 1;
                }
            }
        },
    )?;
    if let Some(e) = unanswered {
        return Err(e.context("cannot read the outcomes topic's recent history"));
    }
    if report.answered_before > 0 {
        tracing::info!(
            commands = report.answered_before,
            "commands answered in the outcomes topic will not run again"
        );
    }
    let write = |cmd: &RemediationCommand, status: OutcomeStatus, message: Option<String>| {
        let o = RemediationOutcome {
            command_id: cmd.command_id.clone(),
            segment: cmd.segment.clone(),
            status,
            ts_ms: SystemClock.now_ms(),
            actuator: a.name.clone(),
            message,
        };
        let mut bytes = Vec::new();
        if let Err(e) = outcomes.encode(&o, &mut bytes) {
            tracing::error!(error = %e, "cannot encode an outcome");
            return;
        }
        let rec = BaseRecord::<str, [u8]>::to(&t.outcomes.name)
            .key(cmd.segment.as_str())
            .payload(&bytes);
        if let Err(e) = kafka::send_waiting(&producer, rec) {
            tracing::error!(error = %e, command_id = %cmd.command_id, "cannot queue an outcome");
        }
    };
    let mut uncommitted = false;
    let mut last_commit = Instant::now();
    while !control.stopping() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                uncommitted = true;
                learn(&mut schemas, commands.as_mut(), m.payload())?;
                let cmd = match decode_record(commands.as_ref(), m.key(), m.payload()) {
                    Ok(c) => c,
                    Err(e) => {
                        report.undecodable += 1;
                        tracing::warn!(error = %e, offset = m.offset(), "skipping an undecodable command");
                        continue;
                    }
                };
                on_command(&cmd);
                if !seen.first(&cmd.command_id) {
                    report.duplicates += 1;
                    continue;
                }
                report.commands += 1;
                let now = SystemClock.now_ms();
                if cmd.ack_deadline_ms > 0 && now > cmd.ack_deadline_ms {
                    // The controller has moved on (retried or escalated): running it now
                    // would act on a stale decision.
                    report.expired += 1;
                    tracing::warn!(command_id = %cmd.command_id, segment = %cmd.segment, action = %cmd.action, late_ms = now - cmd.ack_deadline_ms, "command past its ack deadline: not executed");
                    write(
                        &cmd,
                        OutcomeStatus::Rejected,
                        Some(format!(
                            "expired: past its ack deadline by {} ms; not executed",
                            now - cmd.ack_deadline_ms
                        )),
                    );
                    continue;
                }
                if cmd.dry_run {
                    tracing::info!(segment = %cmd.segment, action = %cmd.action, "dry run: not executed");
                    write(&cmd, OutcomeStatus::Accepted, None);
                    write(
                        &cmd,
                        OutcomeStatus::Applied,
                        Some("dry run: logged, not executed".into()),
                    );
                    continue;
                }
                let result = handler.handle(&cmd);
                if result != HandlerOutcome::Silent {
                    write(&cmd, OutcomeStatus::Accepted, None);
                }
                match result {
                    HandlerOutcome::Applied(msg) => {
                        report.applied += 1;
                        write(&cmd, OutcomeStatus::Applied, Some(msg))
                    }
                    HandlerOutcome::Failed(msg) => {
                        report.failed += 1;
                        write(&cmd, OutcomeStatus::Failed, Some(msg))
                    }
                    HandlerOutcome::Rejected(msg) => {
                        report.rejected += 1;
                        write(&cmd, OutcomeStatus::Rejected, Some(msg))
                    }
                    HandlerOutcome::Silent => {}
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "actions consumer error"),
            None => {}
        }
        if uncommitted && last_commit.elapsed() >= Duration::from_millis(500) {
            last_commit = Instant::now();
            // Outcomes first, then the offsets of the commands they answer.
            if producer.flush(Duration::from_secs(10)).is_ok()
                && consumer.commit_consumer_state(CommitMode::Async).is_ok()
            {
                uncommitted = false;
            }
        }
    }
    producer.flush(Duration::from_secs(10))?;
    if uncommitted {
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(action: &str) -> RemediationCommand {
        RemediationCommand {
            command_id: "c-1".into(),
            segment: "eu-1/a".into(),
            policy: "p".into(),
            policy_version: 1,
            action: action.into(),
            params: [("to".to_string(), "previous".to_string())].into(),
            attempt: 2,
            issued_at_ms: 0,
            ack_deadline_ms: 1,
            reason: crate::model::CommandReason {
                condition: "c".into(),
                metric: "m".into(),
                observed: 1.0,
                threshold: 0.5,
                window_start_ms: 0,
                window_end_ms: 1,
            },
            dry_run: false,
        }
    }

    fn handler(shell: &[(&str, &str)]) -> ConfiguredHandler {
        ConfiguredHandler::new(ActuatorConfig {
            shell: shell
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout: Duration::from_millis(500),
            ..Default::default()
        })
    }

    #[test]
    fn shell_handlers_see_the_command_and_map_exit_codes() {
        let h = handler(&[
            (
                "rollback",
                "echo \"$SEGLOOP_ACTION $SEGLOOP_SEGMENT #$SEGLOOP_ATTEMPT $SEGLOOP_PARAMS\"",
            ),
            ("restart", "echo boom >&2; exit 3"),
            ("slow", "sleep 5"),
        ]);
        assert_eq!(
            h.handle(&cmd("rollback")),
            HandlerOutcome::Applied("rollback eu-1/a #2 {\"to\":\"previous\"}".into())
        );
        assert_eq!(
            h.handle(&cmd("restart")),
            HandlerOutcome::Failed("exit 3: boom".into())
        );
        assert!(
            matches!(h.handle(&cmd("slow")), HandlerOutcome::Failed(m) if m.contains("timed out"))
        );
        assert!(matches!(
            h.handle(&cmd("scale")),
            HandlerOutcome::Rejected(_)
        ));
    }

    #[test]
    fn webhook_maps_http_status() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = server.server_addr().to_ip().unwrap();
        let t = std::thread::spawn(move || {
            for code in [200, 422, 503] {
                let mut req = server.recv().unwrap();
                let mut body = String::new();
                req.as_reader().read_to_string(&mut body).unwrap();
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["command_id"], "c-1", "{body}");
                req.respond(tiny_http::Response::from_string("done").with_status_code(code))
                    .unwrap();
            }
        });
        let h = ConfiguredHandler::new(ActuatorConfig {
            webhook: Some(format!("http://{addr}/fix")),
            ..Default::default()
        });
        assert_eq!(
            h.handle(&cmd("rollback")),
            HandlerOutcome::Applied("done".into())
        );
        assert!(
            matches!(h.handle(&cmd("rollback")), HandlerOutcome::Rejected(m) if m.starts_with("HTTP 422"))
        );
        assert!(
            matches!(h.handle(&cmd("rollback")), HandlerOutcome::Failed(m) if m.starts_with("HTTP 503"))
        );
        t.join().unwrap();
    }

    #[test]
    fn seen_is_bounded_and_idempotent() {
        let mut s = Seen::new(2);
        assert!(s.first("a"));
        assert!(!s.first("a"));
        assert!(s.first("b"));
        assert!(s.first("c")); // evicts a
        assert!(s.first("a"));
        assert!(!s.first("c"));
    }
}
