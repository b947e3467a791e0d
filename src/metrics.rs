//! Prometheus metrics: the documented names, their descriptions, and the per-instance
//! recorder the admin endpoint renders.
//!
//! Names follow `segloop_<name>_<unit>_total` for counters; labels are low-cardinality
//! (`topic`, `partition`, `code`, `guardrail`, `status`, `action`, `policy`). The hot path
//! counts into plain integers and [`publish`] moves the deltas into the recorder once per
//! loop turn, so a record costs no registry lookup.

use std::collections::BTreeMap;
use std::sync::Arc;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub const RECORDS_CONSUMED: &str = "segloop_records_consumed_total";
pub const BYTES_CONSUMED: &str = "segloop_consumed_bytes_total";
pub const DECODE_ERRORS: &str = "segloop_decode_errors_total";
pub const DLQ_RECORDS: &str = "segloop_dlq_records_total";
pub const DLQ_TRUNCATED: &str = "segloop_dlq_truncated_total";
pub const LATE_RECORDS: &str = "segloop_late_records_total";
pub const SKEWED_RECORDS: &str = "segloop_skewed_records_total";
pub const NON_FINITE_VALUES: &str = "segloop_non_finite_values_total";
pub const WINDOWS_CLOSED: &str = "segloop_windows_closed_total";
pub const EVALUATIONS: &str = "segloop_evaluations_total";
pub const FIRINGS: &str = "segloop_firings_total";
pub const SUPPRESSIONS: &str = "segloop_suppressions_total";
pub const COMMANDS: &str = "segloop_commands_total";
pub const OUTCOMES: &str = "segloop_outcomes_total";
pub const OUTCOMES_SKIPPED: &str = "segloop_outcomes_skipped_total";
pub const OUTCOMES_UNKNOWN: &str = "segloop_outcomes_unknown_total";
pub const IN_FLIGHT: &str = "segloop_in_flight_actions";
pub const SEGMENTS: &str = "segloop_segments";
pub const SEGMENTS_EVICTED: &str = "segloop_segments_evicted_total";
pub const EVICTED_EVENTS: &str = "segloop_evicted_events_total";
pub const DETECT_SECONDS: &str = "segloop_detect_seconds";
pub const ACK_SECONDS: &str = "segloop_ack_seconds";
pub const RESOLVE_SECONDS: &str = "segloop_resolve_seconds";
pub const CLOSE_TO_COMMAND_SECONDS: &str = "segloop_window_close_to_command_seconds";
pub const CLOSE_TO_PRODUCE_SECONDS: &str = "segloop_window_close_to_produce_seconds";
pub const CONSUMER_LAG: &str = "segloop_consumer_lag_records";
pub const REBALANCES: &str = "segloop_rebalances_total";
pub const COMMITS: &str = "segloop_commits_total";
pub const COMMIT_ERRORS: &str = "segloop_commit_errors_total";
pub const PRODUCE_ERRORS: &str = "segloop_produce_errors_total";
pub const WINDOWED_EVENTS: &str = "segloop_windowed_events_total";
pub const STATE_RECORDS: &str = "segloop_state_records_total";
pub const STATE_RESTORED: &str = "segloop_state_restored_segments_total";
pub const STATE_RESTORE_SECONDS: &str = "segloop_state_restore_seconds";
pub const STATE_RESTORE_FAILURES: &str = "segloop_state_restore_failures_total";
pub const HANDED_OVER: &str = "segloop_records_handed_over_total";
pub const TRANSACTIONS: &str = "segloop_transactions_total";
pub const CONSUME_ERRORS: &str = "segloop_consume_errors_total";
pub const LABEL_MAP_BYTES: &str = "segloop_label_map_bytes";
pub const ESCALATIONS: &str = "segloop_escalations_total";
pub const HELD_BACK: &str = "segloop_held_back_loops";
pub const PEERS: &str = "segloop_group_peers";
pub const IN_FLIGHT_ELSEWHERE: &str = "segloop_in_flight_elsewhere";
pub const CLAIMS_EXPIRED: &str = "segloop_claims_expired_total";
pub const ACTUATOR_BREAKER: &str = "segloop_actuator_breaker_open";
pub const BUILD_INFO: &str = "segloop_build_info";
pub const SCHEMA_WAITING: &str = "segloop_schema_waiting_partitions";
pub const REGISTRY_REQUESTS: &str = "segloop_schema_registry_requests_total";

/// The reasons an escalation gives (`segloop_escalations_total{reason}`).
pub const ESCALATION_REASONS: [&str; 7] = [
    "ack_timeout",
    "failed",
    "rejected",
    "ineffective",
    "flap_breaker",
    "held_back",
    "actuator_not_acknowledging",
];

/// Zero-valued escalation series for every policy and reason, so `increase()` sees the first
/// escalation (a series born at 1 looks like no increase to Prometheus).
pub fn init_escalations<'a>(policies: impl Iterator<Item = &'a str>) {
    for policy in policies {
        for reason in ESCALATION_REASONS {
            metrics::counter!(ESCALATIONS, "policy" => policy.to_string(), "reason" => reason)
                .increment(0);
        }
    }
}

/// The commit this binary was built from (`SEGLOOP_COMMIT` at build time, as the Dockerfile
/// passes it), or `unknown`.
pub const COMMIT: &str = match option_env!("SEGLOOP_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// Every documented metric name (the README lists them; a test checks `/metrics` has them).
pub const ALL: &[&str] = &[
    RECORDS_CONSUMED,
    BYTES_CONSUMED,
    DECODE_ERRORS,
    DLQ_RECORDS,
    DLQ_TRUNCATED,
    LATE_RECORDS,
    SKEWED_RECORDS,
    NON_FINITE_VALUES,
    WINDOWS_CLOSED,
    EVALUATIONS,
    FIRINGS,
    SUPPRESSIONS,
    COMMANDS,
    OUTCOMES,
    OUTCOMES_SKIPPED,
    OUTCOMES_UNKNOWN,
    IN_FLIGHT,
    ESCALATIONS,
    HELD_BACK,
    PEERS,
    IN_FLIGHT_ELSEWHERE,
    CLAIMS_EXPIRED,
    ACTUATOR_BREAKER,
    BUILD_INFO,
    SEGMENTS,
    SEGMENTS_EVICTED,
    EVICTED_EVENTS,
    DETECT_SECONDS,
    ACK_SECONDS,
    RESOLVE_SECONDS,
    CLOSE_TO_COMMAND_SECONDS,
    CLOSE_TO_PRODUCE_SECONDS,
    CONSUMER_LAG,
    REBALANCES,
    COMMITS,
    COMMIT_ERRORS,
    PRODUCE_ERRORS,
    WINDOWED_EVENTS,
    STATE_RECORDS,
    STATE_RESTORED,
    STATE_RESTORE_SECONDS,
    STATE_RESTORE_FAILURES,
    HANDED_OVER,
    TRANSACTIONS,
    CONSUME_ERRORS,
    LABEL_MAP_BYTES,
];

/// One instance's recorder and the handle that renders it.
#[derive(Clone)]
pub struct Metrics {
    pub recorder: Arc<PrometheusRecorder>,
    pub handle: PrometheusHandle,
}

impl Metrics {
    /// A fresh recorder (per runtime, so two instances in one process stay apart).
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
            .expect("bucket list should be valid")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics {
            recorder: Arc::new(recorder),
            handle,
        };
        m.with(describe_all);
        m
    }

    /// Runs `f` with this recorder as the thread's recorder.
    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        metrics::with_local_recorder(&*self.recorder, f)
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn describe_all() {
    describe_gauge!(
        LABEL_MAP_BYTES,
        Unit::Bytes,
        "Estimated memory of the per-segment labels kept for label selectors (bounded)"
    );
    describe_counter!(
        CONSUME_ERRORS,
        Unit::Count,
        "Errors a consumer reported instead of records (decompression, authorization, unknown topic, unreachable brokers), by topic and code"
    );
    describe_counter!(
        RECORDS_CONSUMED,
        Unit::Count,
        "Records consumed, by topic and partition"
    );
    describe_counter!(
        BYTES_CONSUMED,
        Unit::Bytes,
        "Key + value bytes consumed, by topic and partition"
    );
    describe_counter!(
        DECODE_ERRORS,
        Unit::Count,
        "Records that could not be used, by error code"
    );
    describe_counter!(
        DLQ_RECORDS,
        Unit::Count,
        "Records written to the DLQ, by error code"
    );
    describe_counter!(
        DLQ_TRUNCATED,
        Unit::Count,
        "Dead letters too large for the DLQ, written truncated (headers give the original size)"
    );
    describe_counter!(
        LATE_RECORDS,
        Unit::Count,
        "Telemetry behind the watermark beyond grace"
    );
    describe_counter!(
        SKEWED_RECORDS,
        Unit::Count,
        "Telemetry too far ahead of the controller clock"
    );
    describe_counter!(
        NON_FINITE_VALUES,
        Unit::Count,
        "Measurements rejected as NaN or infinite"
    );
    describe_counter!(WINDOWS_CLOSED, Unit::Count, "Per-segment windows closed");
    describe_counter!(
        EVALUATIONS,
        Unit::Count,
        "Policy evaluations of closed windows"
    );
    describe_counter!(
        FIRINGS,
        Unit::Count,
        "Policy firings that passed every guardrail"
    );
    describe_counter!(
        SUPPRESSIONS,
        Unit::Count,
        "Firings suppressed, by guardrail"
    );
    describe_counter!(
        COMMANDS,
        Unit::Count,
        "Commands produced, by action and policy"
    );
    describe_counter!(
        OUTCOMES,
        Unit::Count,
        "Outcomes applied to owned segments, by status"
    );
    describe_counter!(
        OUTCOMES_SKIPPED,
        Unit::Count,
        "Outcomes for segments other instances own"
    );
    describe_counter!(
        OUTCOMES_UNKNOWN,
        Unit::Count,
        "Outcomes naming no known command"
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Commands awaiting an outcome or verification"
    );
    describe_gauge!(SEGMENTS, Unit::Count, "Segments held in windows");
    describe_counter!(
        ESCALATIONS,
        Unit::Count,
        "Loops escalated to a person, by policy and reason (segment * : the instance as a whole)"
    );
    describe_gauge!(
        HELD_BACK,
        Unit::Count,
        "Firing loops a budget (in-flight, blast radius, rate) holds back now"
    );
    describe_gauge!(
        PEERS,
        Unit::Count,
        "Other live instances of the group (their heartbeats on the control topic)"
    );
    describe_gauge!(
        IN_FLIGHT_ELSEWHERE,
        Unit::Count,
        "Commands in flight or claimed on the other instances, counted against the limits"
    );
    describe_counter!(
        CLAIMS_EXPIRED,
        Unit::Count,
        "Claims on the control topic not read back within 10 s (their firings are tried again)"
    );
    describe_gauge!(
        ACTUATOR_BREAKER,
        Unit::Count,
        "1 while the actuator circuit breaker is open (most recent commands unanswered)"
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "1, labelled with the version and commit of this build"
    );
    describe_counter!(
        SEGMENTS_EVICTED,
        Unit::Count,
        "Segments evicted by the segment cap"
    );
    describe_counter!(
        EVICTED_EVENTS,
        Unit::Count,
        "Events in open windows of segments the segment cap evicted: aggregated, never windowed"
    );
    describe_histogram!(
        DETECT_SECONDS,
        Unit::Seconds,
        "First breaching window start to command, by policy"
    );
    describe_histogram!(
        ACK_SECONDS,
        Unit::Seconds,
        "Command to first outcome, by policy"
    );
    describe_histogram!(
        RESOLVE_SECONDS,
        Unit::Seconds,
        "First breaching window start to verified, by policy"
    );
    describe_histogram!(
        CLOSE_TO_COMMAND_SECONDS,
        Unit::Seconds,
        "Window close to command produced (acknowledged by the broker); timed from when the poll that closed the window returned"
    );
    describe_histogram!(
        CLOSE_TO_PRODUCE_SECONDS,
        Unit::Seconds,
        "Window close to command handed to the producer; timed from when the poll that closed the window returned"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Telemetry consumer lag, by partition"
    );
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "Consumer group rebalances (assign and revoke)"
    );
    describe_counter!(COMMITS, Unit::Count, "Telemetry offset commits");
    describe_counter!(
        COMMIT_ERRORS,
        Unit::Count,
        "Failed telemetry offset commits"
    );
    describe_counter!(
        PRODUCE_ERRORS,
        Unit::Count,
        "Records the producer could not deliver"
    );
    describe_counter!(
        WINDOWED_EVENTS,
        Unit::Count,
        "Events in the windows judged (exactly-once: in committed transactions)"
    );
    describe_counter!(
        STATE_RECORDS,
        Unit::Count,
        "Controller state records written to the state changelog (tombstones included)"
    );
    describe_counter!(
        STATE_RESTORED,
        Unit::Count,
        "Segments whose controller state was restored from the changelog on assign"
    );
    describe_counter!(
        STATE_RESTORE_FAILURES,
        Unit::Count,
        "Assigned partitions whose controller state could not be restored within delivery.restore_timeout (they start from their windows alone)"
    );
    describe_counter!(
        HANDED_OVER,
        Unit::Count,
        "Telemetry records polled before their partition was revoked in the same batch, left for the new owner"
    );
    describe_histogram!(
        STATE_RESTORE_SECONDS,
        Unit::Seconds,
        "Time to restore one assigned partition's controller state from the changelog"
    );
    describe_counter!(
        TRANSACTIONS,
        Unit::Count,
        "Exactly-once transactions, by result (committed, aborted)"
    );
    describe_gauge!(
        SCHEMA_WAITING,
        Unit::Count,
        "Telemetry partitions paused on a schema id the registry has not answered for"
    );
    describe_counter!(
        REGISTRY_REQUESTS,
        Unit::Count,
        "Schema Registry lookups of writer schemas by id (each id is asked until answered)"
    );
    // Zero-valued series so every documented name is exposed from the start.
    for name in [
        LATE_RECORDS,
        SKEWED_RECORDS,
        NON_FINITE_VALUES,
        WINDOWS_CLOSED,
        EVALUATIONS,
        FIRINGS,
        OUTCOMES_SKIPPED,
        OUTCOMES_UNKNOWN,
        SEGMENTS_EVICTED,
        EVICTED_EVENTS,
        REBALANCES,
        COMMITS,
        COMMIT_ERRORS,
        PRODUCE_ERRORS,
        WINDOWED_EVENTS,
        STATE_RECORDS,
        STATE_RESTORED,
        STATE_RESTORE_FAILURES,
        HANDED_OVER,
        REGISTRY_REQUESTS,
        // Listed before the first error (then by topic and code).
        CONSUME_ERRORS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for result in ["committed", "aborted"] {
        metrics::counter!(TRANSACTIONS, "result" => result).increment(0);
    }
    for name in [
        IN_FLIGHT,
        SEGMENTS,
        LABEL_MAP_BYTES,
        HELD_BACK,
        PEERS,
        IN_FLIGHT_ELSEWHERE,
        ACTUATOR_BREAKER,
        SCHEMA_WAITING,
    ] {
        metrics::gauge!(name).set(0.0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT)
        .set(1.0);
    for code in crate::codec::ErrorCode::ALL {
        metrics::counter!(DECODE_ERRORS, "code" => code.as_str()).increment(0);
        metrics::counter!(DLQ_RECORDS, "code" => code.as_str()).increment(0);
    }
    for status in ["ACCEPTED", "APPLIED", "FAILED", "REJECTED"] {
        metrics::counter!(OUTCOMES, "status" => status).increment(0);
    }
    for g in crate::controller::Guardrail::ALL {
        metrics::counter!(SUPPRESSIONS, "guardrail" => g.as_str()).increment(0);
    }
}

/// Hot-path counters, moved into the recorder by [`publish`].
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// By (topic role, partition); published under the topic's name ([`Counters::topic_names`]).
    pub consumed: BTreeMap<(&'static str, i32), (u64, u64)>,
    /// Topic role → the configured topic name, for labels.
    pub topic_names: BTreeMap<&'static str, String>,
    pub decode_errors: BTreeMap<&'static str, u64>,
    pub dlq: BTreeMap<&'static str, u64>,
    pub dlq_truncated: u64,
    /// Escalations by (policy, reason).
    pub escalations: BTreeMap<(String, String), u64>,
    pub commands: BTreeMap<(String, String), u64>,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub outcomes_skipped: u64,
    pub outcomes_unknown: u64,
    pub close_to_command_secs: Vec<f64>,
    pub close_to_produce_secs: Vec<f64>,
    pub timings: Vec<(crate::controller::TimingKind, String, f64)>,
    pub rebalances: u64,
    pub commits: u64,
    pub commit_errors: u64,
    pub windowed: u64,
    pub state_records: u64,
    pub state_restored: u64,
    pub restore_failures: u64,
    pub handed_over: u64,
    pub restore_secs: Vec<f64>,
    pub transactions: BTreeMap<&'static str, u64>,
    pub consume_errors: BTreeMap<(String, String), u64>,
}

/// Moves counter deltas and current gauges into the current thread's recorder.
pub fn publish(c: &mut Counters, gauges: &Gauges) {
    use metrics::{counter, gauge, histogram};
    for ((role, partition), (n, bytes)) in std::mem::take(&mut c.consumed) {
        let topic = c
            .topic_names
            .get(role)
            .cloned()
            .unwrap_or_else(|| role.to_string());
        let p = partition.to_string();
        counter!(RECORDS_CONSUMED, "topic" => topic.clone(), "partition" => p.clone()).increment(n);
        counter!(BYTES_CONSUMED, "topic" => topic, "partition" => p).increment(bytes);
    }
    for (code, n) in std::mem::take(&mut c.decode_errors) {
        counter!(DECODE_ERRORS, "code" => code).increment(n);
        match code {
            "late" => counter!(LATE_RECORDS).increment(n),
            "clock_skew" => counter!(SKEWED_RECORDS).increment(n),
            _ => {}
        }
    }
    for (code, n) in std::mem::take(&mut c.dlq) {
        counter!(DLQ_RECORDS, "code" => code).increment(n);
    }
    for ((action, policy), n) in std::mem::take(&mut c.commands) {
        counter!(COMMANDS, "action" => action, "policy" => policy).increment(n);
    }
    for (status, n) in std::mem::take(&mut c.outcomes) {
        counter!(OUTCOMES, "status" => status).increment(n);
    }
    counter!(OUTCOMES_SKIPPED).increment(std::mem::take(&mut c.outcomes_skipped));
    counter!(OUTCOMES_UNKNOWN).increment(std::mem::take(&mut c.outcomes_unknown));
    for s in c.close_to_produce_secs.drain(..) {
        histogram!(CLOSE_TO_PRODUCE_SECONDS).record(s);
    }
    for s in c.close_to_command_secs.drain(..) {
        histogram!(CLOSE_TO_COMMAND_SECONDS).record(s);
    }
    for (kind, policy, s) in c.timings.drain(..) {
        let name = match kind {
            crate::controller::TimingKind::Detect => DETECT_SECONDS,
            crate::controller::TimingKind::Ack => ACK_SECONDS,
            crate::controller::TimingKind::Resolve => RESOLVE_SECONDS,
        };
        histogram!(name, "policy" => policy).record(s);
    }
    counter!(DLQ_TRUNCATED).increment(std::mem::take(&mut c.dlq_truncated));
    counter!(REBALANCES).increment(std::mem::take(&mut c.rebalances));
    counter!(COMMITS).increment(std::mem::take(&mut c.commits));
    counter!(COMMIT_ERRORS).increment(std::mem::take(&mut c.commit_errors));
    counter!(WINDOWED_EVENTS).increment(std::mem::take(&mut c.windowed));
    counter!(STATE_RECORDS).increment(std::mem::take(&mut c.state_records));
    counter!(STATE_RESTORED).increment(std::mem::take(&mut c.state_restored));
    counter!(STATE_RESTORE_FAILURES).increment(std::mem::take(&mut c.restore_failures));
    counter!(HANDED_OVER).increment(std::mem::take(&mut c.handed_over));
    for s in c.restore_secs.drain(..) {
        histogram!(STATE_RESTORE_SECONDS).record(s);
    }
    for ((topic, code), n) in std::mem::take(&mut c.consume_errors) {
        counter!(CONSUME_ERRORS, "topic" => topic, "code" => code).increment(n);
    }
    for (result, n) in std::mem::take(&mut c.transactions) {
        counter!(TRANSACTIONS, "result" => result).increment(n);
    }
    gauge!(IN_FLIGHT).set(gauges.in_flight as f64);
    gauge!(SEGMENTS).set(gauges.segments as f64);
    gauge!(LABEL_MAP_BYTES).set(gauges.label_bytes as f64);
    gauge!(HELD_BACK).set(gauges.held_back as f64);
    gauge!(PEERS).set(gauges.peers as f64);
    gauge!(IN_FLIGHT_ELSEWHERE).set(gauges.in_flight_elsewhere as f64);
    counter!(CLAIMS_EXPIRED).absolute(gauges.claims_expired);
    gauge!(ACTUATOR_BREAKER).set(f64::from(u8::from(gauges.actuator_breaker_open)));
    for ((policy, reason), n) in std::mem::take(&mut c.escalations) {
        counter!(ESCALATIONS, "policy" => policy, "reason" => reason).increment(n);
    }
    counter!(WINDOWS_CLOSED).absolute(gauges.windows_closed);
    counter!(EVALUATIONS).absolute(gauges.evaluations);
    counter!(FIRINGS).absolute(gauges.firings);
    counter!(NON_FINITE_VALUES).absolute(gauges.non_finite);
    counter!(SEGMENTS_EVICTED).absolute(gauges.evicted);
    counter!(EVICTED_EVENTS).absolute(gauges.evicted_events);
    counter!(PRODUCE_ERRORS).absolute(gauges.produce_errors);
    for (g, n) in &gauges.suppressions {
        counter!(SUPPRESSIONS, "guardrail" => *g).absolute(*n);
    }
    for (p, lag) in &gauges.lag {
        gauge!(CONSUMER_LAG, "partition" => p.to_string()).set(*lag as f64);
    }
}

/// Values read from the engine and controller at publish time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub in_flight: u64,
    pub segments: u64,
    pub windows_closed: u64,
    pub evaluations: u64,
    pub firings: u64,
    pub non_finite: u64,
    pub evicted: u64,
    pub evicted_events: u64,
    pub produce_errors: u64,
    pub suppressions: BTreeMap<&'static str, u64>,
    pub lag: BTreeMap<i32, i64>,
    pub label_bytes: u64,
    pub held_back: u64,
    pub peers: u64,
    pub in_flight_elsewhere: u64,
    pub claims_expired: u64,
    pub actuator_breaker_open: bool,
}
