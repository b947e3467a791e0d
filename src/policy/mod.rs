//! Policies: which segments, what condition over a closed window, what to do, and the
//! guardrails over all of them. Loaded from TOML (`config/policies.toml`), compiled into a
//! [`PolicySet`]; every error names the policy and the field (and, in conditions, the column).

pub mod expr;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

use self::expr::Cond;

/// The policy file as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub guardrails: GuardrailsConfig,
    #[serde(default)]
    pub silences: Vec<SilenceConfig>,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

/// Limits across all policies. Global limits are enforced per owned partition as
/// `limit / partitions` (DESIGN.md), so N instances never exceed them together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardrailsConfig {
    /// Most commands awaiting an outcome or verification at once.
    pub max_in_flight: u32,
    /// Token-bucket rate limit on new commands.
    pub max_actions_per_minute: f64,
    /// Most fraction of known segments under action at once (0 < x ≤ 1).
    pub blast_radius: f64,
    /// Flap breaker: this many actions on one segment within `flap_window` freezes it and
    /// escalates once.
    pub flap_max_actions: u32,
    #[serde(with = "humantime_serde")]
    pub flap_window: Duration,
    /// How long a frozen segment stays frozen.
    #[serde(with = "humantime_serde")]
    pub flap_freeze: Duration,
    /// Windows that close further than this behind the controller clock are evaluated and
    /// recorded but never acted on.
    #[serde(with = "humantime_serde")]
    pub max_action_staleness: Duration,
    /// Seed of the retry jitter.
    pub seed: u64,
    /// Firing loops a budget (in-flight, blast radius, rate) holds back for this long raise one
    /// escalation naming the guardrail and how many segments wait; it clears when they drain.
    #[serde(with = "humantime_serde")]
    pub held_back_escalate_after: Duration,
    /// Actuator circuit breaker: with at least this many recent commands judged (0: off) ...
    pub actuator_breaker_min_commands: u32,
    /// ... and at least this fraction of them unanswered by their ack deadline, new commands
    /// stop and one escalation says so; an outcome closes the breaker again.
    pub actuator_breaker_ratio: f64,
    /// While the breaker is open, one command is let through this often as a probe.
    #[serde(with = "humantime_serde")]
    pub actuator_breaker_probe: Duration,
}

impl Default for GuardrailsConfig {
    fn default() -> Self {
        GuardrailsConfig {
            max_in_flight: 100,
            max_actions_per_minute: 60.0,
            blast_radius: 0.1,
            flap_max_actions: 4,
            flap_window: Duration::from_secs(900),
            flap_freeze: Duration::from_secs(1800),
            max_action_staleness: Duration::from_secs(120),
            seed: 0,
            held_back_escalate_after: Duration::from_secs(300),
            actuator_breaker_min_commands: 5,
            actuator_breaker_ratio: 0.8,
            actuator_breaker_probe: Duration::from_secs(60),
        }
    }
}

/// A silence as written: a segment glob and a time range (RFC 3339).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceConfig {
    pub id: String,
    pub segments: String,
    pub from: String,
    pub until: String,
    #[serde(default)]
    pub reason: String,
}

/// One policy as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// Recorded in commands; not part of their ids.
    #[serde(default = "one")]
    pub version: i64,
    /// Glob on the segment id: `*` within one path level, `**` across levels.
    #[serde(default = "all_segments")]
    pub segments: String,
    /// Labels the segment must carry (exact values).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The window group this policy judges (`[windows.groups.<name>]`); default: `windows`.
    #[serde(default)]
    pub window: Option<String>,
    /// Condition over a closed window that counts as breaching.
    pub when: String,
    /// Consecutive breaching windows to fire.
    #[serde(rename = "for", default = "one_u32")]
    pub for_windows: u32,
    /// Consecutive healthy windows to clear an incident.
    #[serde(default = "one_u32")]
    pub clear_for: u32,
    pub action: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// No second command with the same action on the same segment within this.
    #[serde(with = "humantime_serde", default = "default_cooldown")]
    pub cooldown: Duration,
    /// An outcome (APPLIED, FAILED or REJECTED) must arrive within this.
    #[serde(with = "humantime_serde", default = "default_ack_timeout")]
    pub ack_timeout: Duration,
    /// Must hold in a window within `verify_within` after APPLIED (default: `not when`).
    #[serde(default)]
    pub verify: Option<String>,
    #[serde(with = "humantime_serde", default = "default_verify_within")]
    pub verify_within: Duration,
    /// Attempts before escalating (1 = no retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Retry backoff: base × 2^(attempt − 1), capped, with ±50% seeded jitter.
    #[serde(with = "humantime_serde", default = "default_backoff")]
    pub backoff: Duration,
    #[serde(with = "humantime_serde", default = "default_backoff_max")]
    pub backoff_max: Duration,
    /// Action emitted when attempts are exhausted, no ack arrives, or the flap breaker trips.
    #[serde(default)]
    pub escalate: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// Most in-flight commands of this policy (its share per partition, like the global one).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

fn one() -> i64 {
    1
}
fn one_u32() -> u32 {
    1
}
fn all_segments() -> String {
    "**".into()
}
fn default_cooldown() -> Duration {
    Duration::from_secs(300)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_verify_within() -> Duration {
    Duration::from_secs(120)
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub version: i64,
    pub segments_glob: String,
    segments: GlobMatcher,
    pub labels: BTreeMap<String, String>,
    /// The window group judged (`None`: the default windows).
    pub window: Option<String>,
    pub when: Cond,
    pub when_text: String,
    pub for_windows: u32,
    pub clear_for: u32,
    pub action: String,
    pub params: BTreeMap<String, String>,
    pub cooldown_ms: i64,
    pub ack_timeout_ms: i64,
    /// `None`: verified when `when` no longer holds.
    pub verify: Option<Cond>,
    pub verify_within_ms: i64,
    pub max_attempts: u32,
    pub backoff_ms: i64,
    pub backoff_max_ms: i64,
    pub escalate: Option<String>,
    pub dry_run: bool,
    pub max_in_flight: Option<u32>,
}

impl Policy {
    /// Whether the policy covers a segment with these labels.
    pub fn selects(&self, segment: &str, labels: &BTreeMap<String, String>) -> bool {
        self.selects_segment(segment) && self.selects_labels(labels)
    }

    /// Whether the policy's segment glob matches (the part of [`Policy::selects`] that a
    /// segment's name alone decides, so it can be remembered per segment).
    pub fn selects_segment(&self, segment: &str) -> bool {
        self.segments.is_match(segment)
    }

    /// Whether the labels carry every label the policy asks for.
    pub fn selects_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|x| x == v))
    }

    /// Whether a window verifies the fix.
    pub fn verified_by(&self, w: &crate::window::WindowSummary) -> bool {
        match &self.verify {
            Some(c) => c.holds(w),
            None => w.count > 0 && self.when.eval(w) == Some(false),
        }
    }
}

/// A compiled silence.
#[derive(Debug, Clone)]
pub struct Silence {
    pub id: String,
    pub segments_glob: String,
    segments: GlobMatcher,
    pub from_ms: i64,
    pub until_ms: i64,
    pub reason: String,
    /// Who set it (`config` for the policy file's silences).
    pub created_by: String,
}

impl Silence {
    /// # Errors
    /// A glob that does not compile.
    pub fn new(
        id: &str,
        segments: &str,
        from_ms: i64,
        until_ms: i64,
        reason: &str,
    ) -> Result<Self, String> {
        Ok(Silence {
            id: id.into(),
            segments_glob: segments.into(),
            segments: compile_glob(segments)?,
            from_ms,
            until_ms,
            reason: reason.into(),
            created_by: "config".into(),
        })
    }

    /// The same silence, set by `who`.
    pub fn by(mut self, who: &str) -> Self {
        self.created_by = who.into();
        self
    }

    pub fn covers(&self, segment: &str, now_ms: i64) -> bool {
        now_ms >= self.from_ms && now_ms < self.until_ms && self.segments.is_match(segment)
    }
}

/// How many recent commands' acknowledgements the actuator breaker judges.
pub const ACTUATOR_BREAKER_RECENT: usize = 20;

/// Guardrails in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Guardrails {
    pub max_in_flight: u32,
    pub max_actions_per_minute: f64,
    pub blast_radius: f64,
    pub flap_max_actions: u32,
    pub flap_window_ms: i64,
    pub flap_freeze_ms: i64,
    pub max_action_staleness_ms: i64,
    pub seed: u64,
    pub held_back_escalate_after_ms: i64,
    pub actuator_breaker_min_commands: u32,
    pub actuator_breaker_ratio: f64,
    pub actuator_breaker_probe_ms: i64,
}

impl PolicySet {
    /// Limits that cannot be met as written, and (given the telemetry topic's partition count,
    /// the most instances that can own partitions) what scale-out does to each limit: every
    /// instance enforces its limits over its own partitions.
    pub fn limit_warnings(&self) -> Vec<String> {
        let g = &self.guardrails;
        let mut out = Vec::new();
        if !self.policies.is_empty() && self.policies.iter().all(|p| p.escalate.is_none()) {
            out.push(
                "no policy has `escalate`: escalations (attempts exhausted, flap breaker, held-back work, actuator breaker) are decision records and log lines only; no command reaches a person"
                    .to_string(),
            );
        }
        if g.actuator_breaker_min_commands == 0 {
            out.push(
                "guardrails.actuator_breaker_min_commands = 0: the actuator circuit breaker is off; an actuator that stops answering makes every loop retry and escalate on its own"
                    .to_string(),
            );
        }
        for p in &self.policies {
            if let Some(limit) = p.max_in_flight {
                if limit > g.max_in_flight {
                    out.push(format!(
                        "policy {}: max_in_flight = {limit} can never be reached: guardrails.max_in_flight = {} binds first",
                        p.name, g.max_in_flight
                    ));
                }
            }
        }
        out
    }

    /// What holds across the instances of one group (`partitions`: the telemetry partitions,
    /// at most one instance each; `claim`: how long a claim takes to be read back; `hold`: the
    /// ancestor hold).
    pub fn scale_out_note(&self, partitions: Option<u32>, claim: &str, hold: &str) -> String {
        let g = &self.guardrails;
        let instances = partitions.map_or_else(
            || "any number of instances".to_string(),
            |n| format!("up to {n} instances (one per partition)"),
        );
        let mut limits = vec![
            format!("guardrails.max_in_flight = {}", g.max_in_flight),
            format!(
                "guardrails.max_actions_per_minute = {}",
                g.max_actions_per_minute
            ),
        ];
        for p in &self.policies {
            if let Some(limit) = p.max_in_flight {
                limits.push(format!("policy {}: max_in_flight = {limit}", p.name));
            }
        }
        format!(
            "across {instances}: {} hold for the whole group, exactly (overshoot 0): a firing is claimed on partition 0 of the control topic and decided when its claim is read back, counting every claim and action ahead of it; guardrails.blast_radius = {} is a fraction of the segments every instance knows (from their heartbeats, every 10 s), and an ancestor under action on any instance inhibits its descendants. The cost: with other instances running, a command waits for its claim ({claim}), and a child whose ancestor another instance owns waits {hold} more so that an ancestor breaching in the same window wins. An instance silent for 35 s no longer counts",
            limits.join(", "),
            g.blast_radius
        )
    }

    /// The setting behind a guardrail, as a log line shows it (`max_in_flight = 10`).
    pub fn limit_of(&self, guardrail: &str, policy: &str) -> String {
        let g = &self.guardrails;
        let p = self.policy(policy);
        match guardrail {
            "max_in_flight" => format!("guardrails.max_in_flight = {}", g.max_in_flight),
            "policy_max_in_flight" => format!(
                "policy {policy}: max_in_flight = {}",
                p.and_then(|p| p.max_in_flight).unwrap_or(0)
            ),
            "blast_radius" => format!(
                "guardrails.blast_radius = {} (of the segments known here, at least one)",
                g.blast_radius
            ),
            "rate_limit" => format!(
                "guardrails.max_actions_per_minute = {}",
                g.max_actions_per_minute
            ),
            "cooldown" => format!(
                "policy {policy}: cooldown = {} ms",
                p.map_or(0, |p| p.cooldown_ms)
            ),
            "flap_breaker" => format!(
                "guardrails.flap_max_actions = {} within {} ms",
                g.flap_max_actions, g.flap_window_ms
            ),
            "staleness" => format!(
                "guardrails.max_action_staleness = {} ms",
                g.max_action_staleness_ms
            ),
            "actuator_breaker" => format!(
                "guardrails.actuator_breaker_ratio = {} of at least {} commands unanswered (a probe every {} ms)",
                g.actuator_breaker_ratio, g.actuator_breaker_min_commands, g.actuator_breaker_probe_ms
            ),
            other => other.to_string(),
        }
    }
}

/// Policies, guardrails and static silences, compiled and checked.
#[derive(Debug, Clone)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    pub guardrails: Guardrails,
    pub silences: Vec<Silence>,
}

/// What is wrong with a policy file; each line names the policy (or section) and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct PolicyErrors(pub Vec<String>);

fn compile_glob(glob: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| e.to_string())
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl PolicySet {
    /// Reads and compiles a policy file.
    ///
    /// # Errors
    /// Unreadable file, TOML errors (with line and column), or compile errors naming policy,
    /// field and column.
    pub fn load(path: &Path) -> Result<PolicySet, PolicyErrors> {
        let text =
            crate::config::read_bounded(path, crate::config::MAX_FILE_BYTES).map_err(|e| {
                PolicyErrors(vec![format!(
                    "cannot read policy file {}: {e}",
                    path.display()
                )])
            })?;
        PolicySet::parse(&text, &path.display().to_string())
    }

    /// Parses and compiles policy TOML; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`PolicySet::load`].
    pub fn parse(text: &str, origin: &str) -> Result<PolicySet, PolicyErrors> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map_or((1, 1), |s| {
                let before = &text[..s.start.min(text.len())];
                (
                    before.matches('\n').count() + 1,
                    before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
                )
            });
            PolicyErrors(vec![format!(
                "{origin}:{line}:{col}: {}",
                e.message().trim()
            )])
        })?;
        PolicySet::compile(&file)
    }

    /// Compiles and checks a parsed file.
    ///
    /// # Errors
    /// Every problem found, each naming the policy and field.
    pub fn compile(file: &PolicyFile) -> Result<PolicySet, PolicyErrors> {
        let mut errors = Vec::new();
        let g = &file.guardrails;
        if g.max_in_flight == 0 {
            errors.push("guardrails.max_in_flight: must be at least 1".to_string());
        }
        if !(g.max_actions_per_minute > 0.0 && g.max_actions_per_minute.is_finite()) {
            errors.push("guardrails.max_actions_per_minute: must be above 0".to_string());
        }
        if !(g.blast_radius > 0.0 && g.blast_radius <= 1.0) {
            errors.push(format!(
                "guardrails.blast_radius: {} is outside (0, 1]; e.g. 0.05 for 5% of segments",
                g.blast_radius
            ));
        }
        if g.flap_max_actions < 2 {
            errors.push("guardrails.flap_max_actions: must be at least 2".to_string());
        }
        if g.held_back_escalate_after.is_zero() {
            errors.push(
                "guardrails.held_back_escalate_after: must be above 0 (held-back work must reach a person); e.g. \"5m\""
                    .to_string(),
            );
        }
        if g.actuator_breaker_min_commands as usize > ACTUATOR_BREAKER_RECENT {
            errors.push(format!(
                "guardrails.actuator_breaker_min_commands: {} is outside 0..={ACTUATOR_BREAKER_RECENT} (the breaker judges the last {ACTUATOR_BREAKER_RECENT} commands; 0 turns it off)",
                g.actuator_breaker_min_commands
            ));
        }
        if !(g.actuator_breaker_ratio > 0.0 && g.actuator_breaker_ratio <= 1.0) {
            errors.push(format!(
                "guardrails.actuator_breaker_ratio: {} is outside (0, 1]; e.g. 0.8 for most commands",
                g.actuator_breaker_ratio
            ));
        }
        if g.actuator_breaker_probe.is_zero() {
            errors.push(
                "guardrails.actuator_breaker_probe: must be above 0; e.g. \"1m\"".to_string(),
            );
        }
        let mut silences = Vec::new();
        for (i, s) in file.silences.iter().enumerate() {
            let at = format!("silences[{i}] ({})", s.id);
            let from = humantime::parse_rfc3339_weak(&s.from)
                .map_err(|e| format!("{at}.from: {e}; use RFC 3339, e.g. 2026-11-26T10:00:00Z"));
            let until = humantime::parse_rfc3339_weak(&s.until)
                .map_err(|e| format!("{at}.until: {e}; use RFC 3339"));
            match (from, until) {
                (Ok(f), Ok(u)) => {
                    let epoch = |t: std::time::SystemTime| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64)
                    };
                    let (f, u) = (epoch(f), epoch(u));
                    if u <= f {
                        errors.push(format!("{at}.until: must be after from"));
                    }
                    match Silence::new(&s.id, &s.segments, f, u, &s.reason) {
                        Ok(s) => silences.push(s),
                        Err(e) => errors.push(format!("{at}.segments: {e}")),
                    }
                }
                (f, u) => {
                    errors.extend(f.err());
                    errors.extend(u.err());
                }
            }
        }
        let mut policies = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for p in &file.policies {
            let at = format!("policy `{}`", p.name);
            let mut err = |field: &str, msg: String| errors.push(format!("{at}: {field}: {msg}"));
            if p.name.trim().is_empty() {
                err("name", "is empty".into());
            }
            if !names.insert(p.name.clone()) {
                err(
                    "name",
                    "is used by another policy; names must be unique".into(),
                );
            }
            let segments = compile_glob(&p.segments)
                .map_err(|e| err("segments", e))
                .ok();
            let when = expr::parse(&p.when)
                .map_err(|e| err("when", e.render(&p.when)))
                .ok();
            let verify = match &p.verify {
                Some(v) => match expr::parse(v) {
                    Ok(c) => Some(Some(c)),
                    Err(e) => {
                        err("verify", e.render(v));
                        None
                    }
                },
                None => Some(None),
            };
            if p.for_windows == 0 {
                err("for", "must be at least 1 window".into());
            }
            if p.clear_for == 0 {
                err("clear_for", "must be at least 1 window".into());
            }
            if p.action.trim().is_empty() {
                err(
                    "action",
                    "is empty; name the action, e.g. \"rollback\"".into(),
                );
            }
            if p.ack_timeout.is_zero() {
                err("ack_timeout", "must be above 0, e.g. \"30s\"".into());
            }
            if p.verify_within.is_zero() {
                err("verify_within", "must be above 0".into());
            }
            if p.max_attempts == 0 {
                err("max_attempts", "must be at least 1".into());
            }
            if p.backoff > p.backoff_max {
                err("backoff", "is above backoff_max; raise backoff_max".into());
            }
            if p.max_in_flight == Some(0) {
                err("max_in_flight", "must be at least 1 (or omitted)".into());
            }
            if let (Some(segments), Some(when), Some(verify)) = (segments, when, verify) {
                policies.push(Policy {
                    name: p.name.clone(),
                    version: p.version,
                    segments_glob: p.segments.clone(),
                    segments,
                    labels: p.labels.clone(),
                    window: p.window.clone(),
                    when,
                    when_text: p.when.clone(),
                    for_windows: p.for_windows,
                    clear_for: p.clear_for,
                    action: p.action.clone(),
                    params: p.params.clone(),
                    cooldown_ms: ms(p.cooldown),
                    ack_timeout_ms: ms(p.ack_timeout),
                    verify,
                    verify_within_ms: ms(p.verify_within),
                    max_attempts: p.max_attempts,
                    backoff_ms: ms(p.backoff),
                    backoff_max_ms: ms(p.backoff_max),
                    escalate: p.escalate.clone(),
                    dry_run: p.dry_run,
                    max_in_flight: p.max_in_flight,
                });
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Ok(PolicySet {
            policies,
            guardrails: Guardrails {
                max_in_flight: g.max_in_flight,
                max_actions_per_minute: g.max_actions_per_minute,
                blast_radius: g.blast_radius,
                flap_max_actions: g.flap_max_actions,
                flap_window_ms: ms(g.flap_window),
                flap_freeze_ms: ms(g.flap_freeze),
                max_action_staleness_ms: ms(g.max_action_staleness),
                seed: g.seed,
                held_back_escalate_after_ms: ms(g.held_back_escalate_after),
                actuator_breaker_min_commands: g.actuator_breaker_min_commands,
                actuator_breaker_ratio: g.actuator_breaker_ratio,
                actuator_breaker_probe_ms: ms(g.actuator_breaker_probe),
            },
            silences,
        })
    }

    /// The policy set a config names (`policies = "..."`), checked against its windows; an
    /// empty set when it names none.
    ///
    /// # Errors
    /// As [`PolicySet::load_for`].
    pub fn for_config(config: &crate::config::Config) -> Result<PolicySet, PolicyErrors> {
        match &config.policies {
            Some(path) => PolicySet::load_for(path, &config.windows),
            None => PolicySet::compile(&PolicyFile::default()),
        }
    }

    /// Loads a policy file for windows configured as `windows`: every quantile a condition
    /// takes must be of a measurement the windows sketch.
    ///
    /// # Errors
    /// As [`PolicySet::load`], plus quantiles of unsketched measurements.
    pub fn load_for(
        path: &Path,
        windows: &crate::config::WindowConfig,
    ) -> Result<PolicySet, PolicyErrors> {
        let set = PolicySet::load(path)?;
        let missing: Vec<String> = set
            .quantile_measurements()
            .into_iter()
            .filter(|m| !windows.quantile_measurements.contains(m))
            .collect();
        if !missing.is_empty() {
            return Err(PolicyErrors(vec![format!(
                "policies take quantiles of {} but windows.quantile_measurements lacks {}; add them",
                missing.join(", "),
                if missing.len() == 1 { "it" } else { "them" }
            )]));
        }
        let unknown: Vec<String> = set
            .policies
            .iter()
            .filter_map(|p| {
                let g = p.window.as_ref()?;
                (!windows.groups.contains_key(g)).then(|| {
                    format!(
                        "policy `{}`: window: no window group `{g}`; define [windows.groups.{g}] (size, hop) in the config or remove the key",
                        p.name
                    )
                })
            })
            .collect();
        if !unknown.is_empty() {
            return Err(PolicyErrors(unknown));
        }
        Ok(set)
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// Measurements some condition takes a quantile of (the window config must sketch them).
    pub fn quantile_measurements(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.policies {
            expr::quantile_measurements(&p.when, &mut out);
            if let Some(v) = &p.verify {
                expr::quantile_measurements(v, &mut out);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_stay_within_a_level_unless_double_star() {
        let g = compile_glob("eu-1/*/payments").unwrap();
        assert!(g.is_match("eu-1/checkout/payments"));
        assert!(!g.is_match("eu-1/a/b/payments"));
        assert!(compile_glob("eu-1/**").unwrap().is_match("eu-1/a/b/c"));
    }

    #[test]
    fn errors_name_the_policy_field_and_column() {
        let text = r#"
[[policies]]
name = "lat"
when = "p99(latency_ms) >"
action = "rollback"

[[policies]]
name = "err"
when = "mean(error) > 0.05"
action = ""
for = 0
"#;
        let e = PolicySet::parse(text, "p.toml").unwrap_err().to_string();
        assert!(e.contains("policy `lat`: when: column 18"), "{e}");
        assert!(e.contains("policy `err`: action: is empty"), "{e}");
        assert!(e.contains("policy `err`: for: must be at least 1"), "{e}");
    }

    #[test]
    fn unknown_keys_name_line_and_column() {
        let e = PolicySet::parse(
            "[[policies]]\nname = \"x\"\nwhen = \"no_data()\"\naction = \"page\"\ncooldwn = \"1m\"\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("p.toml:5:1") && e.contains("cooldwn"), "{e}");
    }

    #[test]
    fn label_matchers_must_all_match() {
        let set = PolicySet::parse(
            "[[policies]]\nname = \"x\"\nwhen = \"no_data()\"\naction = \"page\"\nsegments = \"eu-1/**\"\nlabels = { tier = \"gold\" }\n",
            "p.toml",
        )
        .unwrap();
        let p = &set.policies[0];
        let gold = BTreeMap::from([("tier".to_string(), "gold".to_string())]);
        assert!(p.selects("eu-1/a", &gold));
        assert!(!p.selects("eu-1/a", &BTreeMap::new()));
        assert!(!p.selects("us-1/a", &gold));
    }
}
