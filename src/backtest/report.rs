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

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Loops drawn in the HTML page (the JSON has them all).
const HTML_LOOPS: usize = 200;

/// A table row of cells (escaped here).
fn row(h: &mut String, cells: &[String], header: bool) {
    let tag = if header { "th" } else { "td" };
    h.push_str("<tr>");
    for c in cells {
        let _ = write!(h, "<{tag}>{}</{tag}>", esc(c));
    }
    h.push_str("</tr>\n");
}

impl Report {
    /// A self-contained HTML page: no scripts, fonts, styles or images from elsewhere. The
    /// summary is tables; each loop that commanded has a timeline with axes, the threshold
    /// and a labelled marker for every command, outcome, escalation and suppression.
    pub fn render_html(&self) -> String {
        let mut h = String::new();
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
        let _ = writeln!(
            h,
            "<title>segloop backtest: {}</title>",
            esc(&self.meta.topic)
        );
        h.push_str(
            "<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1360px}\
             table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
             td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}\
             .loop{margin:18px 0;border-top:1px solid #ddd;padding-top:8px}svg{background:#fcfcfc;border:1px solid #eee}\
             svg text{font:11px system-ui,sans-serif}.legend span{margin-right:14px}</style></head><body>\n",
        );
        let _ = writeln!(h, "<h1>segloop backtest</h1>");
        self.summary_tables(&mut h);
        h.push_str("<h2>Loops</h2>\n<p class=\"legend\"><span style=\"color:#1f5fbf\">— metric</span><span style=\"color:#c33\">- - threshold</span><span style=\"color:#c33\">▮ breaching window</span><span style=\"color:#333\">| command</span><span style=\"color:#7a1fa2\">| escalation</span><span style=\"color:#2a2\">● applied/accepted</span><span style=\"color:#c33\">● failed/rejected</span><span style=\"color:#b8860b\">▲ suppressed (reason)</span></p>\n");
        let mut under_action: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for l in &self.loops {
            under_action
                .entry(l.segment.as_str())
                .or_default()
                .extend(l.commands.iter().map(|c| c.issued_at_ms));
        }
        // Loops that commanded, and loops a guardrail held back (they matter most).
        for (drawn, l) in self
            .loops
            .iter()
            .filter(|l| !l.commands.is_empty() || !l.suppressed.is_empty())
            .enumerate()
        {
            if drawn == HTML_LOOPS {
                let _ = writeln!(h, "<p>… more loops in the JSON report.</p>");
                break;
            }
            let _ = writeln!(
                h,
                "<div class=\"loop\"><h3>{} · {}</h3><p>{} command(s), {} escalation(s), {} resolved; breaching {:.1} s; first detection {}</p>",
                esc(&l.segment),
                esc(&l.policy),
                l.commands.len(),
                l.escalations,
                l.resolved,
                l.time_in_breach_ms as f64 / 1000.0,
                l.first_detection_ms.map_or("-".into(), rfc3339)
            );
            h.push_str(&svg(l, &under_action));
            h.push_str("</div>\n");
        }
        h.push_str("</body></html>\n");
        h
    }

    /// The summary as tables: what was replayed, per policy, and the loops that fired.
    fn summary_tables(&self, h: &mut String) {
        let m = &self.meta;
        h.push_str("<h2>Replay</h2>\n<table class=\"meta\">\n");
        for (k, v) in [
            (
                "topic",
                format!(
                    "{} ({} partitions, start: {})",
                    m.topic, m.partitions, m.seek
                ),
            ),
            ("policies", m.policies.clone()),
            ("event time", self.span_text()),
            ("actuator", self.actuator_text()),
            ("records", self.records_text()),
            ("windows closed", self.input.windows_closed.to_string()),
        ] {
            row(h, &[k.to_string(), v], false);
        }
        h.push_str("</table>\n<h2>Policies</h2>\n<table class=\"policies\">\n");
        let guardrails: std::collections::BTreeSet<&String> =
            self.totals.suppressed.keys().collect();
        let mut header: Vec<String> = [
            "policy",
            "segments",
            "firings",
            "commands",
            "escalated",
            "resolved",
            "time in breach",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        header.extend(guardrails.iter().map(|g| format!("suppressed: {g}")));
        row(h, &header, true);
        let mut rows: Vec<(&str, &Totals)> =
            self.policies.iter().map(|(k, v)| (k.as_str(), v)).collect();
        rows.push(("total", &self.totals));
        for (name, t) in rows {
            let mut cells = vec![
                name.to_string(),
                t.segments_affected.to_string(),
                t.firings.to_string(),
                t.commands.to_string(),
                t.escalations.to_string(),
                t.resolved.to_string(),
                format!("{:.1} s", t.time_in_breach_ms as f64 / 1000.0),
            ];
            cells.extend(
                guardrails
                    .iter()
                    .map(|g| t.suppressed.get(*g).copied().unwrap_or(0).to_string()),
            );
            row(h, &cells, false);
        }
        h.push_str("</table>\n");
        let fired: Vec<&LoopReport> = self.loops.iter().filter(|l| l.firings > 0).collect();
        if !fired.is_empty() {
            h.push_str("<h2>Loops that fired</h2>\n<table class=\"fired\">\n");
            row(
                h,
                &[
                    "segment",
                    "policy",
                    "first detection",
                    "commands",
                    "outcome",
                    "why",
                ]
                .map(String::from),
                true,
            );
            for l in fired.iter().take(HTML_LOOPS) {
                let (outcome, why) = (l.outcome_text(), l.why_text());
                row(
                    h,
                    &[
                        l.segment.clone(),
                        l.policy.clone(),
                        l.first_detection_ms.map_or("-".into(), rfc3339),
                        l.commands.len().to_string(),
                        outcome.to_string(),
                        why,
                    ],
                    false,
                );
            }
            h.push_str("</table>\n");
        }
        if self.compare.is_some() || self.against_live.is_some() {
            // The comparison lines of the text report (they follow the summary there).
            let text = self.render_text();
            let tail: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.starts_with("compare ") && !l.starts_with("against live"))
                .collect();
            let _ = writeln!(
                h,
                "<h2>Comparison</h2>\n<pre>{}</pre>",
                esc(&tail.join("\n"))
            );
        }
    }
}

/// A round step near `raw`: 1, 2 or 5 times a power of ten.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// A time step (ms) that gives at most 8 ticks over `span_ms`.
fn time_step(span_ms: i64) -> i64 {
    const STEPS: [i64; 17] = [
        1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000,
        1_800_000, 3_600_000, 7_200_000, 21_600_000, 43_200_000, 86_400_000,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| span_ms / s <= 8)
        .unwrap_or_else(|| (span_ms / 8 / 86_400_000 + 1) * 86_400_000)
}

/// `hh:mm:ss` (UTC) of a time, with the date when the chart spans days.
fn clock_label(ms: i64, with_date: bool) -> String {
    let secs = ms.div_euclid(1000);
    let day = secs.rem_euclid(86_400);
    let t = format!("{:02}:{:02}:{:02}", day / 3600, day / 60 % 60, day % 60);
    if with_date {
        format!("{} {t}", &rfc3339(ms)[..10])
    } else {
        t
    }
}

/// One labelled marker on a timeline.
struct Marker {
    at: i64,
    kind: &'static str,
    color: &'static str,
    label: String,
}

/// The markers of a loop: commands, outcomes, escalations, and suppressions (a run of the
/// same guardrail one marker, with its count), each with its text.
fn markers(l: &LoopReport, under_action: &BTreeMap<&str, Vec<i64>>) -> Vec<Marker> {
    let mut out = Vec::new();
    for c in &l.commands {
        out.push(Marker {
            at: c.issued_at_ms,
            kind: if c.escalation {
                "escalation-command"
            } else {
                "command"
            },
            color: if c.escalation { "#7a1fa2" } else { "#333" },
            label: if c.escalation {
                format!("{} (escalation)", c.action)
            } else {
                format!("{} #{}", c.action, c.attempt)
            },
        });
    }
    for o in &l.outcomes {
        let ok = o.status == "APPLIED" || o.status == "ACCEPTED";
        out.push(Marker {
            at: o.ts_ms,
            kind: "outcome",
            color: if ok { "#2a2" } else { "#c33" },
            label: o.status.clone(),
        });
    }
    let mut run: Option<(Marker, u64, String)> = None;
    let flush = |run: &mut Option<(Marker, u64, String)>, out: &mut Vec<Marker>| {
        if let Some((mut m, n, _)) = run.take() {
            if n > 1 {
                m.label = format!("{} ×{n}", m.label);
            }
            out.push(m);
        }
    };
    for d in &l.decisions {
        if let Some(g) = &d.guardrail {
            if run.as_ref().is_some_and(|(_, _, rg)| rg == g) {
                if let Some((_, n, _)) = run.as_mut() {
                    *n += 1;
                }
                continue;
            }
            flush(&mut run, &mut out);
            let reason = if g == "inhibited" {
                // The nearest ancestor that had been commanded by then.
                let by = under_action
                    .iter()
                    .filter(|(seg, times)| {
                        l.segment.len() > seg.len()
                            && l.segment.starts_with(*seg)
                            && l.segment.as_bytes()[seg.len()] == b'/'
                            && times.iter().any(|t| *t <= d.ts_ms)
                    })
                    .max_by_key(|(seg, _)| seg.len())
                    .map(|(seg, _)| *seg);
                match by {
                    Some(a) => format!("inhibited by {a}"),
                    None => "inhibited by an ancestor".into(),
                }
            } else {
                format!("suppressed: {g}")
            };
            run = Some((
                Marker {
                    at: d.ts_ms,
                    kind: "suppression",
                    color: "#b8860b",
                    label: reason,
                },
                1,
                g.clone(),
            ));
            continue;
        }
        flush(&mut run, &mut out);
        if d.to_state == "escalated" && d.from_state != "escalated" {
            out.push(Marker {
                at: d.ts_ms,
                kind: "escalation",
                color: "#7a1fa2",
                label: format!("escalated: {}", d.trigger),
            });
        }
    }
    flush(&mut run, &mut out);
    out.sort_by_key(|m| m.at);
    out
}

/// The inline SVG timeline of one loop: y axis with a scale, time ticks, the threshold with
/// its value, breaching windows, the metric, and the markers.
fn svg(l: &LoopReport, under_action: &BTreeMap<&str, Vec<i64>>) -> String {
    let (w, ht) = (1300.0_f64, 250.0_f64);
    let (left, right, top, bottom) = (70.0_f64, 150.0_f64, 64.0_f64, 40.0_f64);
    let pts = &l.timeline.points;
    let marks = markers(l, under_action);
    let mut t0 = pts.first().map_or(i64::MAX, |p| p.start_ms);
    let mut t1 = pts.last().map_or(i64::MIN, |p| p.end_ms);
    for m in &marks {
        t0 = t0.min(m.at);
        t1 = t1.max(m.at);
    }
    if t0 >= t1 {
        t1 = t0.saturating_add(1000);
    }
    let vmax_raw = pts
        .iter()
        .filter_map(|p| p.value)
        .chain(l.timeline.threshold)
        .fold(0.0_f64, f64::max);
    let ystep = nice_step(vmax_raw.max(f64::MIN_POSITIVE) / 4.0);
    let vmax = ((vmax_raw * 1.05 / ystep).ceil() * ystep).max(ystep);
    let (x0, x1, y0, y1) = (left, w - right, ht - bottom, top);
    let x = |t: i64| x0 + (t - t0) as f64 / (t1 - t0) as f64 * (x1 - x0);
    let y = |v: f64| y0 - (v / vmax) * (y0 - y1);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\">"
    );
    for p in pts.iter().filter(|p| p.breach == Some(true)) {
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{y1:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#c33\" fill-opacity=\"0.15\"/>",
            x(p.start_ms),
            (x(p.end_ms) - x(p.start_ms)).max(1.0),
            y0 - y1
        );
    }
    // The y axis: a scale in round steps, with grid lines.
    let _ = write!(
        s,
        "<g class=\"axis axis-y\"><line x1=\"{x0}\" x2=\"{x0}\" y1=\"{y1}\" y2=\"{y0}\" stroke=\"#888\"/>"
    );
    let mut v = 0.0;
    while v <= vmax + ystep * 1e-9 {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"#eee\"/><text class=\"tick\" x=\"{3:.1}\" y=\"{4:.1}\" text-anchor=\"end\">{5}</text>",
            x0 - 4.0,
            x1,
            y(v),
            x0 - 6.0,
            y(v) + 4.0,
            short(v)
        );
        v += ystep;
    }
    let metric = l.timeline.metric.as_deref().unwrap_or("");
    let _ = write!(
        s,
        "<text class=\"axis-label\" x=\"{x0}\" y=\"{:.1}\">{}</text></g>",
        y1 - 50.0,
        esc(metric)
    );
    // The time axis: round steps, UTC clock labels.
    let _ = write!(
        s,
        "<g class=\"axis axis-x\"><line x1=\"{x0}\" x2=\"{x1}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#888\"/>"
    );
    let step = time_step(t1 - t0);
    let with_date = t1 - t0 >= 86_400_000 || t0.div_euclid(86_400_000) != t1.div_euclid(86_400_000);
    let mut t = t0.div_euclid(step) * step;
    if t < t0 {
        t += step;
    }
    while t <= t1 {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{y0}\" y2=\"{1}\" stroke=\"#888\"/><text class=\"tick\" x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{3}</text>",
            x(t),
            y0 + 4.0,
            y0 + 16.0,
            clock_label(t, with_date)
        );
        t += step;
    }
    let _ = write!(
        s,
        "<text class=\"axis-label\" x=\"{x1}\" y=\"{:.1}\" text-anchor=\"end\">UTC</text></g>",
        y0 + 32.0
    );
    if let Some(th) = l.timeline.threshold {
        let _ = write!(
            s,
            "<line class=\"threshold\" x1=\"{x0}\" x2=\"{x1}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#c33\" stroke-dasharray=\"5,4\"/><text class=\"threshold-label\" x=\"{1:.1}\" y=\"{2:.1}\" fill=\"#c33\">threshold {3}</text>",
            y(th),
            x1 + 6.0,
            y(th) + 4.0,
            short(th)
        );
    }
    let line: Vec<String> = pts
        .iter()
        .filter_map(|p| {
            p.value
                .map(|v| format!("{:.1},{:.1}", x((p.start_ms + p.end_ms) / 2), y(v)))
        })
        .collect();
    if !line.is_empty() {
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"1.5\" points=\"{}\"/>",
            line.join(" ")
        );
    }
    // Markers, their labels on three staggered rows above the plot.
    for (i, m) in marks.iter().enumerate() {
        let mx = x(m.at);
        let ly = y1 - 6.0 - (i % 3) as f64 * 14.0;
        let shape = match m.kind {
            "outcome" => format!(
                "<circle cx=\"{mx:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"/>",
                y0 - 6.0,
                m.color
            ),
            "suppression" => format!(
                "<path d=\"M{0:.1} {1:.1} l-4 7 h8 z\" fill=\"{2}\"/>",
                mx,
                y0 - 9.0,
                m.color
            ),
            _ => format!(
                "<line x1=\"{mx:.1}\" x2=\"{mx:.1}\" y1=\"{y1}\" y2=\"{y0}\" stroke=\"{}\"/>",
                m.color
            ),
        };
        let _ = write!(
            s,
            "<g class=\"marker {}\"><title>{} at {}</title>{shape}<line x1=\"{mx:.1}\" x2=\"{mx:.1}\" y1=\"{:.1}\" y2=\"{y1}\" stroke=\"{}\" stroke-opacity=\"0.3\"/><text x=\"{:.1}\" y=\"{ly:.1}\" fill=\"{}\">{}</text></g>",
            m.kind,
            esc(&m.label),
            rfc3339(m.at),
            ly + 2.0,
            m.color,
            mx + 2.0,
            m.color,
            esc(&m.label)
        );
    }
    s.push_str("</svg>\n");
    s
}
