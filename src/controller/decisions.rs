//! Decision records and command reasons.

use super::*;

/// Exponential backoff with ±50% jitter from a seeded generator keyed by the command, so a
/// replay or a restored controller computes the same delay.
pub(super) fn backoff_ms(policy: &Policy, attempt: u32, seed: u64, command_id: &str) -> i64 {
    let exp = policy
        .backoff_ms
        .saturating_mul(1i64 << attempt.saturating_sub(1).min(30))
        .min(policy.backoff_max_ms);
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in command_id.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    // SplitMix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
    ((exp as f64) * (0.5 + unit)).round() as i64
}

/// The reason of a command no window decided (a loop restored without its evidence).
pub(super) fn reason_without_window(policy: &Policy, start: i64) -> CommandReason {
    CommandReason {
        condition: policy.when_text.clone(),
        metric: String::new(),
        observed: f64::NAN,
        threshold: f64::NAN,
        window_start_ms: start,
        window_end_ms: start,
    }
}

pub(super) fn policy_reason(policy: &Policy, w: &WindowSummary) -> Option<CommandReason> {
    let ev = policy.when.evidence(w);
    Some(CommandReason {
        condition: policy.when_text.clone(),
        metric: ev.as_ref().map_or_else(String::new, |e| e.metric.clone()),
        observed: ev.as_ref().map_or(f64::NAN, |e| e.observed),
        threshold: ev.as_ref().map_or(f64::NAN, |e| e.threshold),
        window_start_ms: w.start_ms,
        window_end_ms: w.end_ms,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn decision(
    segment: &str,
    policy: &str,
    from: Phase,
    to: Phase,
    trigger: &str,
    ctx: &Ctx<'_>,
    command_id: Option<String>,
    guardrail: Option<Guardrail>,
    aggregates: Vec<(String, f64)>,
) -> DecisionRecord {
    DecisionRecord {
        segment: segment.into(),
        policy: policy.into(),
        ts_ms: ctx.now_ms,
        from_state: from.as_str().into(),
        to_state: to.as_str().into(),
        trigger: trigger.into(),
        window_start_ms: ctx.window.map(|w| w.start_ms),
        aggregates: aggregates.into_iter().collect(),
        guardrail: guardrail.map(|g| g.as_str().to_string()),
        command_id,
    }
}
