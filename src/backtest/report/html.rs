//! The report as HTML: tables and an SVG timeline per loop.

use super::*;

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Loops drawn in the HTML page (the JSON has them all).
pub(super) const HTML_LOOPS: usize = 200;

/// A table row of cells (escaped here).
pub(super) fn row(h: &mut String, cells: &[String], header: bool) {
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
    pub(super) fn summary_tables(&self, h: &mut String) {
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
pub(super) fn nice_step(raw: f64) -> f64 {
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
pub(super) fn time_step(span_ms: i64) -> i64 {
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
pub(super) fn clock_label(ms: i64, with_date: bool) -> String {
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
pub(super) struct Marker {
    pub(super) at: i64,
    pub(super) kind: &'static str,
    pub(super) color: &'static str,
    pub(super) label: String,
}

/// The markers of a loop: commands, outcomes, escalations, and suppressions (a run of the
/// same guardrail one marker, with its count), each with its text.
pub(super) fn markers(l: &LoopReport, under_action: &BTreeMap<&str, Vec<i64>>) -> Vec<Marker> {
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
pub(super) fn svg(l: &LoopReport, under_action: &BTreeMap<&str, Vec<i64>>) -> String {
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
