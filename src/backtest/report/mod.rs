//! The backtest report: JSON (stable field order, sorted keys), a terminal summary and a
//! self-contained HTML page with an inline SVG timeline per affected loop.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;
use smallvec::SmallVec;

use super::{InputStats, SimulatedActuator};
use crate::model::{DecisionRecord, RemediationCommand};
use crate::policy::PolicySet;

mod html;

/// (policy index, headline value, whether the condition held) in one window.
pub type PolicyValue = (u16, Option<f64>, Option<bool>);

/// One closed window of a traced segment: per selecting policy (by index), the value of the
/// condition's headline expression and whether the condition held.
#[derive(Debug, Clone)]
pub struct Point {
    pub start_ms: i64,
    pub end_ms: i64,
    pub count: u64,
    pub values: SmallVec<[PolicyValue; 2]>,
}

/// A would-be command, with the evidence behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandEntry {
    pub command_id: String,
    pub action: String,
    pub attempt: i32,
    pub escalation: bool,
    pub issued_at_ms: i64,
    pub metric: String,
    pub observed: f64,
    pub threshold: f64,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
}

impl CommandEntry {
    pub fn of(c: &RemediationCommand, escalation: bool) -> Self {
        CommandEntry {
            command_id: c.command_id.clone(),
            action: c.action.clone(),
            attempt: c.attempt,
            escalation,
            issued_at_ms: c.issued_at_ms,
            metric: c.reason.metric.clone(),
            observed: c.reason.observed,
            threshold: c.reason.threshold,
            window_start_ms: c.reason.window_start_ms,
            window_end_ms: c.reason.window_end_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutcomeEntry {
    pub command_id: String,
    pub status: String,
    pub ts_ms: i64,
}

/// What one (segment, policy) loop did during the replay.
#[derive(Debug, Clone, Default)]
pub struct LoopRecord {
    pub firings: u64,
    pub escalation_commands: u64,
    pub escalations: u64,
    pub resolved: u64,
    pub first_detection_ms: Option<i64>,
    pub first_command_ms: Option<i64>,
    pub suppressed: BTreeMap<String, u64>,
    pub commands: Vec<CommandEntry>,
    pub outcomes: Vec<OutcomeEntry>,
    pub decisions: Vec<DecisionRecord>,
}

/// Where outcomes came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ActuatorInfo {
    Simulated(SimulatedActuator),
    Recorded { topic: String, outcomes: u64 },
}

/// What was replayed, under what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Meta {
    pub topic: String,
    pub partitions: u32,
    /// How the start offsets were found: `offsets_for_times` or `beginning`.
    pub seek: String,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub policies: String,
    pub actuator: ActuatorInfo,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub segments_affected: u64,
    pub firings: u64,
    pub commands: u64,
    pub escalations: u64,
    pub resolved: u64,
    pub time_in_breach_ms: i64,
    pub suppressed: BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, l: &LoopReport) {
        self.firings += l.firings;
        self.commands += l.commands.len() as u64;
        self.escalations += l.escalations;
        self.resolved += l.resolved;
        self.time_in_breach_ms += l.time_in_breach_ms;
        for (g, n) in &l.suppressed {
            *self.suppressed.entry(g.clone()).or_default() += n;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelinePoint {
    pub start_ms: i64,
    pub end_ms: i64,
    pub count: u64,
    pub value: Option<f64>,
    pub breach: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// The condition's headline expression and its threshold.
    pub metric: Option<String>,
    pub threshold: Option<f64>,
    pub points: Vec<TimelinePoint>,
}

/// One (segment, policy) loop in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoopReport {
    pub segment: String,
    pub policy: String,
    pub partition: i32,
    pub firings: u64,
    pub first_detection_ms: Option<i64>,
    pub first_command_ms: Option<i64>,
    pub escalations: u64,
    pub resolved: u64,
    pub breaching_windows: u64,
    pub time_in_breach_ms: i64,
    pub suppressed: BTreeMap<String, u64>,
    pub commands: Vec<CommandEntry>,
    pub outcomes: Vec<OutcomeEntry>,
    /// Every controller transition, with the aggregates behind it.
    pub decisions: Vec<DecisionRecord>,
    pub timeline: Timeline,
}

impl LoopReport {
    /// How the loop ended: escalated, resolved or still open.
    fn outcome_text(&self) -> &'static str {
        if self.escalations > 0 {
            "escalated"
        } else if self.resolved > 0 {
            "resolved"
        } else {
            "open"
        }
    }

    /// The evidence of its first command: `metric = observed vs threshold`.
    fn why_text(&self) -> String {
        self.commands.first().map_or(String::new(), |c| {
            format!(
                "{} = {} vs {}",
                c.metric,
                short(c.observed),
                short(c.threshold)
            )
        })
    }
}

/// A backtest's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub meta: Meta,
    pub input: InputStats,
    pub totals: Totals,
    pub policies: BTreeMap<String, Totals>,
    pub loops: Vec<LoopReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compare: Option<Comparison>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against_live: Option<LiveDiff>,
}

pub(super) fn build(
    meta: Meta,
    input: InputStats,
    policies: &PolicySet,
    loops: BTreeMap<(String, String), LoopRecord>,
    mut traces: std::collections::HashMap<Arc<str>, (i32, Vec<Point>)>,
    hop_ms: i64,
) -> Report {
    let mut out = Vec::with_capacity(loops.len());
    for ((segment, policy), l) in loops {
        let index = policies.policies.iter().position(|p| p.name == policy);
        let primary = index.and_then(|i| policies.policies[i].when.primary());
        let (partition, points) = traces
            .get_mut(segment.as_str())
            .map(|(p, pts)| (*p, pts.as_slice()))
            .unwrap_or((-1, &[][..]));
        let points: Vec<TimelinePoint> = points
            .iter()
            .filter_map(|pt| {
                let i = index? as u16;
                let (_, value, breach) = pt.values.iter().find(|v| v.0 == i)?;
                Some(TimelinePoint {
                    start_ms: pt.start_ms,
                    end_ms: pt.end_ms,
                    count: pt.count,
                    value: *value,
                    breach: *breach,
                })
            })
            .collect();
        let breaching = points.iter().filter(|p| p.breach == Some(true)).count() as u64;
        out.push(LoopReport {
            partition,
            firings: l.firings,
            first_detection_ms: l.first_detection_ms,
            first_command_ms: l.first_command_ms,
            escalations: l.escalations,
            resolved: l.resolved,
            breaching_windows: breaching,
            time_in_breach_ms: breaching as i64 * hop_ms,
            suppressed: l.suppressed,
            commands: l.commands,
            outcomes: l.outcomes,
            decisions: l.decisions,
            timeline: Timeline {
                metric: primary.map(|(n, _)| n.to_string()),
                threshold: primary.map(|(_, t)| t),
                points,
            },
            segment,
            policy,
        });
    }
    let mut totals = Totals::default();
    let mut by_policy: BTreeMap<String, Totals> = policies
        .policies
        .iter()
        .map(|p| (p.name.clone(), Totals::default()))
        .collect();
    let mut affected: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for l in &out {
        totals.add(l);
        by_policy.entry(l.policy.clone()).or_default().add(l);
        if !l.commands.is_empty() {
            affected.entry(&l.policy).or_default().insert(&l.segment);
            affected.entry("").or_default().insert(&l.segment);
        }
    }
    totals.segments_affected = affected.get("").map_or(0, |s| s.len() as u64);
    for (name, t) in &mut by_policy {
        t.segments_affected = affected.get(name.as_str()).map_or(0, |s| s.len() as u64);
    }
    Report {
        format: "segloop-backtest/1",
        meta,
        input,
        totals,
        policies: by_policy,
        loops: out,
        compare: None,
        against_live: None,
    }
}

impl Report {
    /// The report as pretty JSON (deterministic: fixed field order, sorted maps).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a report serializes");
        s.push('\n');
        s
    }

    /// First command per segment (escalations excluded), for comparisons.
    fn first_commands(&self) -> BTreeMap<&str, (i64, u64)> {
        let mut out: BTreeMap<&str, (i64, u64)> = BTreeMap::new();
        for l in &self.loops {
            for c in l.commands.iter().filter(|c| !c.escalation) {
                let e = out.entry(&l.segment).or_insert((c.issued_at_ms, 0));
                e.0 = e.0.min(c.issued_at_ms);
                e.1 += 1;
            }
        }
        out
    }

    /// The terminal summary.
    /// The replay's event-time span, the actuator and the records, as the text and the HTML
    /// summaries both say them.
    fn span_text(&self) -> String {
        match (self.input.first_event_ms, self.input.last_event_ms) {
            (Some(a), Some(b)) => format!("{} … {}", rfc3339(a), rfc3339(b)),
            _ => "no events".into(),
        }
    }

    fn actuator_text(&self) -> String {
        match &self.meta.actuator {
            ActuatorInfo::Simulated(a) => format!(
                "simulated (answers after {} ms, {}% succeed, seed {})",
                a.delay_ms,
                a.success * 100.0,
                a.seed
            ),
            ActuatorInfo::Recorded { topic, outcomes } => {
                format!("recorded outcomes from {topic} ({outcomes})")
            }
        }
    }

    fn records_text(&self) -> String {
        let i = &self.input;
        let rejected: u64 = i.rejected.values().sum();
        let detail = if i.rejected.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                i.rejected
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        format!(
            "{} read, {} in range, {} aggregated, {} rejected{detail}",
            i.records_read, i.records_in_range, i.records_aggregated, rejected
        )
    }

    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let m = &self.meta;
        let _ = writeln!(
            s,
            "backtest of {} ({} partitions, start: {}) under {}",
            m.topic, m.partitions, m.seek, m.policies
        );
        let _ = writeln!(s, "event time: {}", self.span_text());
        let _ = writeln!(s, "actuator: {}", self.actuator_text());
        let _ = writeln!(
            s,
            "records: {}; {} windows closed\n",
            self.records_text(),
            self.input.windows_closed
        );
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>8} {:>9} {:>10} {:>9} {:>11} {:>15}",
            "policy",
            "segments",
            "firings",
            "commands",
            "escalated",
            "resolved",
            "suppressed",
            "time in breach"
        );
        let mut rows: Vec<(&str, &Totals)> =
            self.policies.iter().map(|(k, v)| (k.as_str(), v)).collect();
        rows.push(("total", &self.totals));
        for (name, t) in rows {
            let _ = writeln!(
                s,
                "{:<16} {:>9} {:>8} {:>9} {:>10} {:>9} {:>11} {:>14.1}s",
                name,
                t.segments_affected,
                t.firings,
                t.commands,
                t.escalations,
                t.resolved,
                t.suppressed.values().sum::<u64>(),
                t.time_in_breach_ms as f64 / 1000.0
            );
        }
        let fired: Vec<&LoopReport> = self.loops.iter().filter(|l| l.firings > 0).collect();
        if !fired.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<28} {:<12} {:<24} {:>9} {:<10} why",
                "segment", "policy", "first detection", "commands", "outcome"
            );
            for l in fired.iter().take(50) {
                let (outcome, why) = (l.outcome_text(), l.why_text());
                let _ = writeln!(
                    s,
                    "{:<28} {:<12} {:<24} {:>9} {:<10} {}",
                    l.segment,
                    l.policy,
                    l.first_detection_ms.map_or("-".into(), rfc3339),
                    l.commands.len(),
                    outcome,
                    why
                );
            }
            if fired.len() > 50 {
                let _ = writeln!(s, "… and {} more (see the JSON report)", fired.len() - 50);
            }
        }
        if let Some(c) = &self.compare {
            let _ = writeln!(
                s,
                "\ncompare {} (A) with {} (B): {} same, {} earlier in B, {} later in B, {} only in A, {} only in B",
                c.a, c.b, c.same, c.earlier_in_b, c.later_in_b, c.only_in_a, c.only_in_b
            );
            for d in c.segments.iter().filter(|d| d.verdict != "same").take(30) {
                let _ = writeln!(
                    s,
                    "  {:<28} {:<13} A {:<24} B {}",
                    d.segment,
                    d.verdict,
                    d.a_first_command_ms.map_or("-".into(), rfc3339),
                    d.b_first_command_ms.map_or("-".into(), rfc3339)
                );
            }
        }
        if let Some(l) = &self.against_live {
            let _ = writeln!(
                s,
                "\nagainst live ({}): {} live commands in range, {} would-be; {} match, {} only in the backtest, {} only live",
                l.topic,
                l.live_commands,
                l.backtest_commands,
                l.matched,
                l.only_backtest.len(),
                l.only_live.len()
            );
        }
        s
    }
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Two policy sets over the same replay.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub a_totals: Totals,
    pub b_totals: Totals,
    pub same: u64,
    pub earlier_in_b: u64,
    pub later_in_b: u64,
    pub only_in_a: u64,
    pub only_in_b: u64,
    /// Every segment either set acted on, by name.
    pub segments: Vec<SegmentDiff>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentDiff {
    pub segment: String,
    pub a_first_command_ms: Option<i64>,
    pub b_first_command_ms: Option<i64>,
    pub a_commands: u64,
    pub b_commands: u64,
    /// `same`, `earlier_in_b`, `later_in_b`, `only_in_a`, `only_in_b`.
    pub verdict: &'static str,
}

/// Compares the first command per segment of two replays of the same input.
pub fn compare(a: &Report, b: &Report) -> Comparison {
    let (fa, fb) = (a.first_commands(), b.first_commands());
    let names: BTreeSet<&str> = fa.keys().chain(fb.keys()).copied().collect();
    let mut c = Comparison {
        a: a.meta.policies.clone(),
        b: b.meta.policies.clone(),
        a_totals: a.totals.clone(),
        b_totals: b.totals.clone(),
        ..Comparison::default()
    };
    for name in names {
        let (x, y) = (fa.get(name), fb.get(name));
        let verdict = match (x, y) {
            (Some(x), Some(y)) if x.0 == y.0 => "same",
            (Some(x), Some(y)) if y.0 < x.0 => "earlier_in_b",
            (Some(_), Some(_)) => "later_in_b",
            (Some(_), None) => "only_in_a",
            _ => "only_in_b",
        };
        match verdict {
            "same" => c.same += 1,
            "earlier_in_b" => c.earlier_in_b += 1,
            "later_in_b" => c.later_in_b += 1,
            "only_in_a" => c.only_in_a += 1,
            _ => c.only_in_b += 1,
        }
        c.segments.push(SegmentDiff {
            segment: name.to_string(),
            a_first_command_ms: x.map(|v| v.0),
            b_first_command_ms: y.map(|v| v.0),
            a_commands: x.map_or(0, |v| v.1),
            b_commands: y.map_or(0, |v| v.1),
            verdict,
        });
    }
    c
}

/// The would-be commands against what the live loop issued over the same event-time range.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveDiff {
    pub topic: String,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub live_commands: u64,
    pub backtest_commands: u64,
    /// Same `command_id` (ids are deterministic: same segment, policy, incident, attempt).
    pub matched: u64,
    pub only_backtest: Vec<String>,
    pub only_live: Vec<String>,
}

/// Diffs the report's commands with the live ones whose evidence window lies in the replayed
/// event-time range.
pub fn against_live(r: &Report, topic: &str, live: &[RemediationCommand]) -> LiveDiff {
    let from = r.meta.from_ms.or(r.input.first_event_ms);
    let to = r.meta.to_ms.or(r.input.last_event_ms);
    let in_range = |c: &RemediationCommand| {
        from.is_none_or(|f| c.reason.window_start_ms >= f)
            && to.is_none_or(|t| c.reason.window_end_ms <= t)
    };
    let live: BTreeMap<&str, &RemediationCommand> = live
        .iter()
        .filter(|c| in_range(c))
        .map(|c| (c.command_id.as_str(), c))
        .collect();
    let ours: BTreeMap<&str, &CommandEntry> = r
        .loops
        .iter()
        .flat_map(|l| l.commands.iter())
        .map(|c| (c.command_id.as_str(), c))
        .collect();
    let describe = |seg: &str, policy: &str, action: &str, attempt: i32, id: &str| {
        format!("{seg} {policy} {action} #{attempt} ({id})")
    };
    let mut d = LiveDiff {
        topic: topic.to_string(),
        from_ms: from,
        to_ms: to,
        live_commands: live.len() as u64,
        backtest_commands: ours.len() as u64,
        ..LiveDiff::default()
    };
    for l in &r.loops {
        for c in &l.commands {
            if live.contains_key(c.command_id.as_str()) {
                d.matched += 1;
            } else {
                d.only_backtest.push(describe(
                    &l.segment,
                    &l.policy,
                    &c.action,
                    c.attempt,
                    &c.command_id,
                ));
            }
        }
    }
    for (id, c) in &live {
        if !ours.contains_key(id) {
            d.only_live
                .push(describe(&c.segment, &c.policy, &c.action, c.attempt, id));
        }
    }
    d
}
