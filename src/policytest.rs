//! `segloop policy test FILE...`: unit tests for policy files, as `promtool test rules` is for
//! alert rules. A test file names a policy file and holds cases: per segment a sequence of
//! input windows (values per measurement, or nothing: no data), optional actuator outcomes,
//! and the expected effects as lines. Each case runs through the same pipeline and controller
//! as `segloop run`, on a clock that starts at 2026-01-01T00:00:00Z: window `n` (1-based) spans
//! `[(n-1)·size, n·size)`, its events are spread inside it, and it closes at its end, when the
//! controller's deadlines run and the outcomes given for it arrive.
//!
//! ```toml
//! policies = "policies.toml"   # relative to this file
//! window = "10s"               # the window size (default 10s)
//!
//! [[case]]
//! name = "errors fire once and resolve"
//! segment = [{ id = "eu-1/checkout/api", windows = [{ error = 1.0, count = 20 }, { error = 0.0, count = 20 }] }]
//! outcomes = [{ window = 1, segment = "eu-1/checkout/api", attempt = 1, status = "APPLIED" }]
//! expect = ["w1 eu-1/checkout/api error-rate: command disable_flag attempt 1"]
//! ```
//!
//! Expected lines, in the order they happen: `wN SEGMENT POLICY: command ACTION attempt K`,
//! `wN SEGMENT POLICY: suppressed by GUARDRAIL`, `wN SEGMENT POLICY: escalated (REASON)
//! [ACTION]`, `wN SEGMENT POLICY: resolved`. A case passes when the lines are exactly these.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::{build_codec, DecodeError};
use crate::config::{Config, Sources};
use crate::controller::Effects;
use crate::model::{OutcomeStatus, RemediationCommand, RemediationOutcome, TelemetryEvent};
use crate::pipeline::{Cause, Options, Pipeline, Record, Sink};
use crate::policy::PolicySet;

/// The clock of every case starts here (2026-01-01T00:00:00Z), so lines never depend on today.
pub const EPOCH_MS: i64 = 1_767_225_600_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// The policy file under test, relative to the test file.
    policies: PathBuf,
    /// A config whose `[windows]` to use (relative to the test file); default: the built-in.
    #[serde(default)]
    config: Option<PathBuf>,
    /// The window size (overrides the config's).
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(rename = "segment")]
    segments: Vec<SegmentInput>,
    #[serde(default)]
    outcomes: Vec<OutcomeInput>,
    /// Windows of nothing after the last input window (deadlines, backoffs and retries run).
    #[serde(default)]
    then_windows: usize,
    expect: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentInput {
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// One table per window: measurement = value or [values], and `count` (events in the
    /// window, the values repeated; default: the longest list, or 1). `{}`: no data.
    windows: Vec<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeInput {
    /// Arrives when this window closes (after its effects).
    window: usize,
    segment: String,
    /// The command answered: its attempt (and policy, when several act on the segment).
    attempt: i32,
    #[serde(default)]
    policy: Option<String>,
    /// ACCEPTED, APPLIED, FAILED or REJECTED.
    status: String,
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    pub name: String,
    pub expected: Vec<String>,
    pub actual: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.expected == self.actual
    }

    /// The difference, line by line: `-` expected and missing, `+` happened unexpectedly.
    pub fn diff(&self) -> String {
        let (a, b) = (&self.expected, &self.actual);
        // Longest common subsequence, then a walk that prints what is not in it.
        let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i][j] = if a[i] == b[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j, mut out) = (0, 0, String::new());
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                out.push_str(&format!("    {}\n", a[i]));
                i += 1;
                j += 1;
            } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
                out.push_str(&format!("  + {}\n", b[j]));
                j += 1;
            } else {
                out.push_str(&format!("  - {}\n", a[i]));
                i += 1;
            }
        }
        out
    }
}

/// Runs every case of a test file.
///
/// # Errors
/// The test file, its policy file or its config cannot be read or are invalid (the message
/// names the file and the field).
pub fn run_file(path: &Path) -> Result<Vec<CaseResult>, String> {
    let text = crate::config::read_bounded(path, crate::config::MAX_FILE_BYTES)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let file: TestFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config = match &file.config {
        Some(c) => Config::load(&Sources {
            file: Some(&base.join(c)),
            env: &Default::default(),
            overrides: &[],
        })
        .map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(size) = file.window {
        config.windows.size = size;
        config.windows.hop = None;
    }
    // Windows close at their end: no lateness, and the tick after a window advances it.
    config.windows.out_of_orderness = Duration::ZERO;
    config.windows.grace = Duration::ZERO;
    config.windows.idle_timeout = Duration::from_millis(1);
    config.windows.max_clock_skew = Duration::from_secs(365 * 86_400);
    let policies = PolicySet::load_for(&base.join(&file.policies), &config.windows)
        .map_err(|e| format!("{}: {e}", base.join(&file.policies).display()))?;
    file.cases
        .iter()
        .map(|case| run_case(&config, policies.clone(), case))
        .collect()
}

/// What the sink keeps of one case: the lines, and the commands (outcomes answer them).
#[derive(Default)]
struct Lines {
    window: usize,
    lines: Vec<String>,
    commands: Vec<RemediationCommand>,
    rejected: Vec<String>,
}

impl Sink for Lines {
    fn reject(&mut self, record: &Record<'_>, error: &DecodeError) {
        self.rejected
            .push(format!("offset {}: {error}", record.offset));
    }

    fn effects(&mut self, fx: &mut Effects, _: Cause<'_>, _: &PolicySet) {
        let n = self.window;
        let escalation_of: BTreeMap<&str, &RemediationCommand> = fx
            .commands
            .iter()
            .filter(|c| c.params.contains_key("escalation_reason"))
            .map(|c| (c.command_id.as_str(), c))
            .collect();
        for d in &fx.decisions {
            let who = format!("w{n} {} {}", d.segment, d.policy);
            if let Some(g) = &d.guardrail {
                self.lines.push(format!("{who}: suppressed by {g}"));
            } else if d.to_state == "escalated" && d.from_state != "escalated" {
                let action = d
                    .command_id
                    .as_deref()
                    .and_then(|id| escalation_of.get(id))
                    .map_or(String::new(), |c| format!(" {}", c.action));
                self.lines
                    .push(format!("{who}: escalated ({}){action}", d.trigger));
            } else if d.to_state == "resolved" && d.from_state != "resolved" {
                self.lines.push(format!("{who}: resolved"));
            } else if matches!(d.to_state.as_str(), "commanded" | "dry_run")
                && d.from_state != d.to_state
            {
                if let Some(c) = fx
                    .commands
                    .iter()
                    .find(|c| Some(&c.command_id) == d.command_id.as_ref())
                {
                    let dry = if c.dry_run { " (dry run)" } else { "" };
                    self.lines.push(format!(
                        "{who}: command {} attempt {}{dry}",
                        c.action, c.attempt
                    ));
                }
            }
        }
        self.commands.append(&mut fx.commands);
        fx.decisions.clear();
        fx.timings.clear();
    }
}

fn run_case(config: &Config, policies: PolicySet, case: &Case) -> Result<CaseResult, String> {
    let at = |what: String| format!("case {:?}: {what}", case.name);
    let codec = build_codec::<TelemetryEvent>(
        config.topics.telemetry.codec,
        &config.topics.telemetry.schema_settings(),
    )
    .map_err(at)?;
    let mut pipeline = Pipeline::new(config, policies, Options::live()).map_err(at)?;
    pipeline.assign(0);
    let size = config.windows.size.as_millis() as i64;
    let mut sink = Lines::default();
    let inputs = case
        .segments
        .iter()
        .map(|s| s.windows.len())
        .max()
        .unwrap_or(0);
    let mut offset = 0i64;
    for n in 1..=inputs + case.then_windows {
        sink.window = n;
        let start = EPOCH_MS + (n as i64 - 1) * size;
        for seg in &case.segments {
            let Some(table) = seg.windows.get(n - 1) else {
                continue;
            };
            let events = window_events(table).map_err(|e| at(format!("{} w{n}: {e}", seg.id)))?;
            let step = size / (events.len() as i64 + 1);
            for (i, measurements) in events.into_iter().enumerate() {
                let ts = start + step * (i as i64 + 1);
                let event = TelemetryEvent {
                    segment: seg.id.clone(),
                    ts_ms: ts,
                    measurements,
                    labels: seg.labels.clone(),
                    event_id: None,
                };
                let mut bytes = Vec::new();
                codec
                    .encode(&event, &mut bytes)
                    .map_err(|e| at(e.to_string()))?;
                let record = Record {
                    partition: 0,
                    offset,
                    key: Some(seg.id.as_bytes()),
                    value: Some(&bytes),
                    timestamp_ms: Some(ts),
                    handle: 0,
                };
                offset += 1;
                pipeline.on_record(&record, ts, &mut sink);
            }
        }
        let end = start + size;
        pipeline.tick(end + 1, true, &mut sink);
        for o in case.outcomes.iter().filter(|o| o.window == n) {
            let status = OutcomeStatus::parse(&o.status).ok_or_else(|| {
                at(format!(
                    "outcome status {:?}: use ACCEPTED, APPLIED, FAILED or REJECTED",
                    o.status
                ))
            })?;
            let command = sink
                .commands
                .iter()
                .rev()
                .find(|c| {
                    c.segment == o.segment
                        && c.attempt == o.attempt
                        && o.policy.as_ref().is_none_or(|p| *p == c.policy)
                })
                .ok_or_else(|| {
                    at(format!(
                        "outcome for w{n}: no command attempt {} for {} by then",
                        o.attempt, o.segment
                    ))
                })?
                .clone();
            let outcome = RemediationOutcome {
                command_id: command.command_id,
                segment: command.segment,
                status,
                ts_ms: end + 2,
                actuator: "policy-test".into(),
                message: None,
            };
            pipeline.on_outcome(&outcome, end + 2, &mut sink);
        }
    }
    if !sink.rejected.is_empty() {
        return Err(at(format!(
            "input events were rejected: {}",
            sink.rejected.join("; ")
        )));
    }
    Ok(CaseResult {
        name: case.name.clone(),
        expected: case
            .expect
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect(),
        actual: sink.lines,
    })
}

/// The events of one window table: measurement values repeated up to `count`.
fn window_events(table: &toml::Table) -> Result<Vec<BTreeMap<String, f64>>, String> {
    let number = |v: &toml::Value| match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(i) => Ok(*i as f64),
        other => Err(format!("expected a number, found {other}")),
    };
    let mut series: Vec<(String, Vec<f64>)> = Vec::new();
    let mut count = None;
    for (k, v) in table {
        if k == "count" {
            count = Some(
                v.as_integer()
                    .filter(|c| (0..=10_000).contains(c))
                    .ok_or("count must be an integer in 0..=10000")? as usize,
            );
            continue;
        }
        let values = match v {
            toml::Value::Array(a) => a.iter().map(number).collect::<Result<Vec<_>, _>>()?,
            other => vec![number(other)?],
        };
        if values.is_empty() {
            return Err(format!("{k}: no values"));
        }
        series.push((k.clone(), values));
    }
    if series.is_empty() {
        return Ok(Vec::new());
    }
    let n = count.unwrap_or_else(|| series.iter().map(|(_, v)| v.len()).max().unwrap_or(1));
    Ok((0..n)
        .map(|i| {
            series
                .iter()
                .map(|(k, v)| (k.clone(), v[i % v.len()]))
                .collect()
        })
        .collect())
}
