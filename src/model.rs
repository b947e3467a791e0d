//! The wire contract as Rust types. Each type mirrors one schema in `schemas/` field for field;
//! the `.avsc` files are the source of truth and `tests/codec.rs` checks the two agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One telemetry observation for one segment (`schemas/telemetry.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryEvent {
    pub segment: String,
    /// Event time, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub measurements: BTreeMap<String, f64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub event_id: Option<String>,
}

/// Evidence behind a command (`CommandReason` in `schemas/command.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReason {
    pub condition: String,
    pub metric: String,
    pub observed: f64,
    pub threshold: f64,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
}

/// A remediation for exactly one segment (`schemas/command.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemediationCommand {
    pub command_id: String,
    pub segment: String,
    pub policy: String,
    #[serde(default)]
    pub policy_version: i64,
    pub action: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default = "first_attempt")]
    pub attempt: i32,
    pub issued_at_ms: i64,
    pub ack_deadline_ms: i64,
    pub reason: CommandReason,
    #[serde(default)]
    pub dry_run: bool,
}

fn first_attempt() -> i32 {
    1
}

/// What an actuator says about a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutcomeStatus {
    #[serde(rename = "ACCEPTED")]
    Accepted,
    #[serde(rename = "APPLIED")]
    Applied,
    #[serde(rename = "FAILED")]
    Failed,
    #[serde(rename = "REJECTED")]
    Rejected,
}

impl OutcomeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeStatus::Accepted => "ACCEPTED",
            OutcomeStatus::Applied => "APPLIED",
            OutcomeStatus::Failed => "FAILED",
            OutcomeStatus::Rejected => "REJECTED",
        }
    }

    /// The status named by its wire name (`APPLIED`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        [
            OutcomeStatus::Accepted,
            OutcomeStatus::Applied,
            OutcomeStatus::Failed,
            OutcomeStatus::Rejected,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// An actuator's acknowledgement of a command (`schemas/outcome.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemediationOutcome {
    pub command_id: String,
    pub segment: String,
    pub status: OutcomeStatus,
    pub ts_ms: i64,
    #[serde(default)]
    pub actuator: String,
    #[serde(default)]
    pub message: Option<String>,
}

/// One controller transition, for the audit trail (`schemas/decision.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub segment: String,
    pub policy: String,
    pub ts_ms: i64,
    pub from_state: String,
    pub to_state: String,
    #[serde(default)]
    pub trigger: String,
    #[serde(default)]
    pub window_start_ms: Option<i64>,
    #[serde(default)]
    pub aggregates: BTreeMap<String, f64>,
    #[serde(default)]
    pub guardrail: Option<String>,
    #[serde(default)]
    pub command_id: Option<String>,
}
