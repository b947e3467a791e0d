//! Controller transitions, guardrails and properties, on an injected clock.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use segloop::controller::{
    command_id, Controller, Effects, OutcomeDisposition, Phase, SegmentState, TimingKind,
};
use segloop::model::{OutcomeStatus, RemediationOutcome};
use segloop::policy::{PolicySet, Silence};

#[path = "common/windows.rs"]
mod windows;
use windows::{window, W};

/// The base policy file, with keys of `[guardrails]` and of the one policy overridden.
fn policies(extra_guardrails: &str, extra_policy: &str) -> PolicySet {
    let mut guardrails: toml::Table = toml::from_str(
        r#"
max_in_flight = 100
max_actions_per_minute = 1000
blast_radius = 1.0
flap_max_actions = 10
flap_window = "1h"
max_action_staleness = "1m"
"#,
    )
    .unwrap();
    let mut policy: toml::Table = toml::from_str(
        r#"
name = "errors"
segments = "**"
when = "mean(error) > 0.5 and count() >= 2"
for = 2
clear_for = 2
action = "rollback"
cooldown = "5m"
ack_timeout = "10s"
verify_within = "30s"
max_attempts = 2
backoff = "5s"
backoff_max = "20s"
escalate = "page"
"#,
    )
    .unwrap();
    guardrails.extend(toml::from_str::<toml::Table>(extra_guardrails).unwrap());
    policy.extend(toml::from_str::<toml::Table>(extra_policy).unwrap());
    let mut file = toml::Table::new();
    file.insert("guardrails".into(), toml::Value::Table(guardrails));
    file.insert(
        "policies".into(),
        toml::Value::Array(vec![toml::Value::Table(policy)]),
    );
    PolicySet::parse(&toml::to_string(&file).unwrap(), "test.toml")
        .unwrap_or_else(|e| panic!("{e}"))
}

struct H {
    c: Controller,
    fx: Effects,
    labels: BTreeMap<String, String>,
}

impl H {
    fn new(set: PolicySet) -> Self {
        let mut c = Controller::new(set);
        c.assign(0);
        H {
            c,
            fx: Effects::default(),
            labels: BTreeMap::new(),
        }
    }

    /// A window closing at its end (the controller clock = end + 1s).
    fn win(&mut self, seg: &str, start: i64, error: f64) {
        let w = window(seg, 0, start, error);
        self.c
            .on_window(&w, &self.labels, start + W + 1_000, &mut self.fx);
    }

    fn outcome(
        &mut self,
        seg: &str,
        id: &str,
        status: OutcomeStatus,
        now: i64,
    ) -> OutcomeDisposition {
        let o = RemediationOutcome {
            command_id: id.into(),
            segment: seg.into(),
            status,
            ts_ms: now,
            actuator: "t".into(),
            message: None,
        };
        self.c.on_outcome(&o, now, &mut self.fx)
    }

    fn phase(&self, seg: &str) -> Phase {
        self.c.segment(seg).unwrap().loops["errors"].phase
    }

    fn commands(&mut self) -> Vec<(String, String, i32)> {
        self.fx
            .commands
            .drain(..)
            .map(|c| (c.command_id, c.action, c.attempt))
            .collect()
    }

    fn guardrails(&self) -> Vec<String> {
        self.fx
            .decisions
            .iter()
            .filter_map(|d| d.guardrail.clone())
            .collect()
    }
}

/// Two breaching windows: fires at the second window's close (t = 2W + 1s).
fn fire(h: &mut H, seg: &str) -> String {
    h.win(seg, 0, 1.0);
    assert_eq!(h.phase(seg), Phase::Breaching);
    assert!(h.fx.commands.is_empty(), "for = 2 needs two windows");
    h.win(seg, W, 1.0);
    let cmds = h.commands();
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0].1, "rollback");
    assert_eq!(cmds[0].2, 1);
    assert_eq!(h.phase(seg), Phase::Commanded);
    cmds[0].0.clone()
}

#[test]
fn fault_then_ack_then_verified_then_cleared() {
    let mut h = H::new(policies("", ""));
    let id = fire(&mut h, "eu/a");
    assert_eq!(id, command_id("eu/a", "errors", 0, 1));
    let t = 2 * W + 1_000;
    assert_eq!(
        h.outcome("eu/a", &id, OutcomeStatus::Accepted, t + 100),
        OutcomeDisposition::Applied
    );
    assert_eq!(h.phase("eu/a"), Phase::Acknowledged);
    h.outcome("eu/a", &id, OutcomeStatus::Applied, t + 200);
    assert_eq!(h.phase("eu/a"), Phase::Verifying);
    // A window that started before APPLIED does not verify.
    h.win("eu/a", 2 * W, 0.0);
    assert_eq!(h.phase("eu/a"), Phase::Verifying);
    h.win("eu/a", 3 * W, 0.0);
    assert_eq!(h.phase("eu/a"), Phase::Resolved);
    h.win("eu/a", 4 * W, 0.0);
    assert_eq!(h.phase("eu/a"), Phase::Healthy);
    let kinds: Vec<TimingKind> = h.fx.timings.iter().map(|t| t.kind).collect();
    assert_eq!(
        kinds,
        [TimingKind::Detect, TimingKind::Ack, TimingKind::Resolve]
    );
    assert_eq!(
        h.fx.timings[0].ms,
        2 * W + 1_000,
        "detect: first breaching window start → command"
    );
    let path: Vec<String> =
        h.fx.decisions
            .iter()
            .map(|d| format!("{}->{}", d.from_state, d.to_state))
            .collect();
    assert_eq!(
        path,
        [
            "healthy->breaching",
            "breaching->commanded",
            "commanded->acknowledged",
            "acknowledged->verifying",
            "verifying->resolved",
            "resolved->healthy"
        ]
    );
    // Decisions carry the aggregates that decided them.
    assert_eq!(h.fx.decisions[1].aggregates["mean(error)"], 1.0);
}

#[test]
fn no_ack_times_out_retries_then_escalates() {
    let mut h = H::new(policies("", ""));
    let id1 = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.c.tick(t + 9_999, &mut h.fx);
    assert_eq!(h.phase("eu/a"), Phase::Commanded);
    h.c.tick(t + 10_000, &mut h.fx);
    assert_eq!(h.phase("eu/a"), Phase::Backoff);
    let d = h.c.segment("eu/a").unwrap().loops["errors"]
        .deadline_ms
        .unwrap();
    let delay = d - (t + 10_000);
    assert!((2_500..=7_500).contains(&delay), "5s ± 50% jitter: {delay}");
    h.c.tick(d, &mut h.fx);
    let retry = h.commands();
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0].2, 2);
    assert_ne!(retry[0].0, id1);
    assert_eq!(retry[0].0, command_id("eu/a", "errors", 0, 2));
    h.c.tick(d + 10_000, &mut h.fx);
    let esc = h.commands();
    assert_eq!(esc.len(), 1);
    assert_eq!(esc[0].1, "page");
    assert_eq!(h.phase("eu/a"), Phase::Escalated);
    assert!(h
        .fx
        .decisions
        .iter()
        .any(|x| x.trigger == "ack_timeout" && x.to_state == "escalated"));
}

#[test]
fn failed_outcome_backs_off_and_retries() {
    let mut h = H::new(policies("", ""));
    let id = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.outcome("eu/a", &id, OutcomeStatus::Failed, t + 50);
    assert_eq!(h.phase("eu/a"), Phase::Backoff);
    h.c.tick(t + 50 + 7_500, &mut h.fx);
    assert_eq!(h.commands().len(), 1);
    assert_eq!(h.phase("eu/a"), Phase::Commanded);
}

#[test]
fn applied_but_condition_persists_is_ineffective_then_retried() {
    let mut h = H::new(policies("", ""));
    let id = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.outcome("eu/a", &id, OutcomeStatus::Applied, t);
    h.win("eu/a", 3 * W, 1.0); // still bad
    assert_eq!(h.phase("eu/a"), Phase::Verifying);
    h.c.tick(t + 30_000, &mut h.fx);
    assert_eq!(h.phase("eu/a"), Phase::Backoff);
    assert!(h.fx.decisions.iter().any(|d| d.trigger == "ineffective"));
}

#[test]
fn duplicate_unknown_out_of_order_and_foreign_outcomes() {
    let mut h = H::new(policies("", ""));
    let id = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    // APPLIED before ACCEPTED: straight to verifying; the late ACCEPTED is a duplicate.
    assert_eq!(
        h.outcome("eu/a", &id, OutcomeStatus::Applied, t),
        OutcomeDisposition::Applied
    );
    assert_eq!(
        h.outcome("eu/a", &id, OutcomeStatus::Accepted, t + 1),
        OutcomeDisposition::Duplicate
    );
    assert_eq!(
        h.outcome("eu/a", &id, OutcomeStatus::Applied, t + 2),
        OutcomeDisposition::Duplicate
    );
    assert_eq!(h.phase("eu/a"), Phase::Verifying);
    assert_eq!(
        h.outcome("eu/a", "nope", OutcomeStatus::Applied, t),
        OutcomeDisposition::Unknown
    );
    assert_eq!(
        h.outcome("us/z", &id, OutcomeStatus::Applied, t),
        OutcomeDisposition::NotOurs
    );
    assert_eq!(h.c.stats().outcomes_unknown, 1);
}

#[test]
fn outcome_of_an_earlier_attempt_is_a_duplicate() {
    let mut h = H::new(policies("", ""));
    let id1 = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.outcome("eu/a", &id1, OutcomeStatus::Failed, t);
    h.c.tick(t + 20_000, &mut h.fx);
    assert_eq!(h.commands().len(), 1);
    assert_eq!(
        h.outcome("eu/a", &id1, OutcomeStatus::Applied, t + 20_001),
        OutcomeDisposition::Duplicate
    );
    assert_eq!(h.phase("eu/a"), Phase::Commanded);
}

#[test]
fn cooldown_suppresses_a_new_incident_with_the_same_action() {
    let mut h = H::new(policies("", "clear_for = 1"));
    let id = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.outcome("eu/a", &id, OutcomeStatus::Applied, t);
    h.win("eu/a", 3 * W, 0.0); // resolved
    h.win("eu/a", 4 * W, 0.0); // healthy
    assert_eq!(h.phase("eu/a"), Phase::Healthy);
    h.win("eu/a", 5 * W, 1.0);
    h.win("eu/a", 6 * W, 1.0); // would fire, 60s after the first command: cooldown 5m
    assert!(h.commands().is_empty());
    assert_eq!(h.guardrails(), ["cooldown"]);
}

#[test]
fn flap_breaker_freezes_and_escalates_once() {
    let mut h = H::new(policies(
        "flap_max_actions = 2\nflap_window = \"10m\"\nflap_freeze = \"30m\"",
        "cooldown = \"1s\"\nfor = 1\nclear_for = 1\nmax_attempts = 1",
    ));
    let mut t0 = 0;
    let mut ids = Vec::new();
    for _ in 0..2 {
        h.win("eu/a", t0, 1.0); // fires
        let id = h.commands().pop().unwrap().0;
        ids.push(id.clone());
        h.outcome("eu/a", &id, OutcomeStatus::Applied, t0 + W + 1_100);
        h.win("eu/a", t0 + 2 * W, 0.0); // resolved
        t0 += 3 * W;
    }
    h.win("eu/a", t0, 1.0); // third action within 10 minutes: breaker
    let cmds = h.commands();
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0].1, "page", "escalated instead of acting");
    assert_eq!(h.phase("eu/a"), Phase::Escalated);
    assert!(h.guardrails().contains(&"flap_breaker".to_string()));
    // Still frozen: no more actions, no second escalation.
    h.win("eu/a", t0 + W, 1.0);
    assert!(h.commands().is_empty());
    assert_ne!(ids[0], ids[1], "each incident has its own id");
    // Lucky healthy windows clear the escalated loop; it breaches again inside the same freeze:
    // still no action and no second page (it used to page 2-4 times per freeze).
    for i in 0..6 {
        let start = t0 + (2 + 2 * i) * W;
        h.win("eu/a", start, 0.0);
        h.win("eu/a", start + W, 1.0);
    }
    assert!(h.commands().is_empty(), "one escalation per freeze");
    assert!(h.guardrails().iter().all(|g| g == "flap_breaker"));
}

#[test]
fn silences_suppress_matching_segments_in_their_time_range() {
    let mut h = H::new(policies("", ""));
    h.c.add_silence(Silence::new("m1", "eu/**", 0, 60_000, "maintenance").unwrap());
    h.win("eu/a", 0, 1.0);
    h.win("eu/a", W, 1.0);
    assert!(h.commands().is_empty());
    assert_eq!(h.guardrails(), ["silence"]);
    h.win("us/a", 0, 1.0);
    h.win("us/a", W, 1.0);
    assert_eq!(h.commands().len(), 1);
    // After the silence ends, the still-breaching eu/a fires.
    h.win("eu/a", 6 * W, 1.0);
    assert_eq!(h.commands().len(), 1);
    assert!(h.c.remove_silence("m1"));
}

#[test]
fn an_ancestor_under_action_inhibits_descendants() {
    let mut h = H::new(policies("", ""));
    fire(&mut h, "eu/checkout");
    h.win("eu/checkout/pay", 0, 1.0);
    h.win("eu/checkout/pay", W, 1.0);
    assert!(h.commands().is_empty());
    assert_eq!(h.guardrails(), ["inhibited"]);
    // A sibling subtree is not inhibited.
    h.win("eu/search/q", 0, 1.0);
    h.win("eu/search/q", W, 1.0);
    assert_eq!(h.commands().len(), 1);
}

#[test]
fn stale_windows_are_evaluated_but_not_acted_on() {
    let mut h = H::new(policies("", ""));
    let labels = BTreeMap::new();
    for start in [0, W] {
        let w = window("eu/a", 0, start, 1.0);
        h.c.on_window(&w, &labels, start + W + 120_000, &mut h.fx); // 2 minutes late
    }
    assert!(h.commands().is_empty());
    assert_eq!(h.guardrails(), ["staleness"]);
    assert_eq!(h.phase("eu/a"), Phase::Breaching, "recorded as breaching");
}

#[test]
fn dry_run_emits_a_flagged_command_and_awaits_nothing() {
    let mut h = H::new(policies("", "dry_run = true"));
    h.win("eu/a", 0, 1.0);
    h.win("eu/a", W, 1.0);
    assert_eq!(h.fx.commands.len(), 1);
    assert!(h.fx.commands[0].dry_run);
    assert_eq!(h.phase("eu/a"), Phase::DryRun);
    h.c.tick(10 * W, &mut h.fx);
    assert_eq!(h.fx.commands.len(), 1, "no timeout, no retry");
}

#[test]
fn reload_mid_incident_keeps_state_and_ids() {
    let mut h = H::new(policies("", ""));
    let id = fire(&mut h, "eu/a");
    let mut v2 = policies("", "version = 7\nmax_attempts = 3");
    v2.policies[0].verify_within_ms = 60_000;
    h.c.reload(v2, 2 * W + 2_000, &mut h.fx);
    assert_eq!(h.phase("eu/a"), Phase::Commanded);
    h.outcome("eu/a", &id, OutcomeStatus::Failed, 2 * W + 3_000);
    h.c.tick(3 * W + 10_000, &mut h.fx);
    let cmds: Vec<_> = h.fx.commands.drain(..).collect();
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].policy_version, 7);
    assert_eq!(
        cmds[0].command_id,
        command_id("eu/a", "errors", 0, 2),
        "version is not in ids"
    );
    // Removing the policy ends its loops with a decision.
    let empty = PolicySet::parse("", "empty.toml").unwrap();
    h.c.reload(empty, 4 * W, &mut h.fx);
    assert!(h.fx.decisions.iter().any(|d| d.to_state == "removed"));
}

/// A segment's glob matches are remembered per policy set: a reload that changes which
/// segments a policy covers applies at the next window (nothing stale is kept), and a set of
/// more than 64 policies (not remembered) selects the same way.
#[test]
fn a_reload_that_changes_a_policys_segments_applies_at_the_next_window() {
    let mut h = H::new(policies("", "segments = \"us/**\""));
    h.win("eu/a", 0, 1.0);
    h.win("eu/a", W, 1.0);
    assert!(h.commands().is_empty(), "us/** does not cover eu/a");
    h.c.reload(policies("", "segments = \"eu/**\""), 2 * W, &mut h.fx);
    h.win("eu/a", 2 * W, 1.0);
    h.win("eu/a", 3 * W, 1.0);
    assert_eq!(h.commands().len(), 1, "eu/** covers eu/a after the reload");
    h.c.reload(policies("", "segments = \"us/**\""), 4 * W, &mut h.fx);
    h.win("eu/b", 4 * W, 1.0);
    h.win("eu/b", 5 * W, 1.0);
    assert!(h.commands().is_empty(), "and no longer after the next one");
    // 70 policies: the 70th covers eu/** and acts; the others cover nothing here.
    let mut text = String::from("[guardrails]\nmax_in_flight = 100\n");
    for i in 0..70 {
        let glob = if i == 69 { "eu/**" } else { "us/**" };
        text.push_str(&format!(
            "[[policies]]\nname = \"p{i}\"\nsegments = \"{glob}\"\nwhen = \"mean(error) > 0.5\"\naction = \"a{i}\"\n"
        ));
    }
    let mut h = H::new(PolicySet::parse(&text, "many.toml").unwrap());
    h.win("eu/c", 0, 1.0);
    let cmds = h.commands();
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0].1, "a69");
}

#[test]
fn max_in_flight_blast_radius_and_rate_limit_hold() {
    let set = |g: &str| policies(g, "");
    // In flight: 2 of 5 segments may act.
    let mut h = H::new(set("max_in_flight = 2"));
    for s in ["a", "b", "c"] {
        h.win(s, 0, 1.0);
    }
    for s in ["a", "b", "c"] {
        h.win(s, W, 1.0);
    }
    assert_eq!(h.commands().len(), 2);
    assert_eq!(h.guardrails(), ["max_in_flight"]);
    // Blast radius: 40% of 5 known segments = 2.
    let mut h = H::new(set("blast_radius = 0.4"));
    for s in ["a", "b", "c", "d", "e"] {
        h.win(s, 0, if s < "d" { 1.0 } else { 0.0 });
    }
    for s in ["a", "b", "c"] {
        h.win(s, W, 1.0);
    }
    assert_eq!(h.commands().len(), 2);
    assert_eq!(h.guardrails(), ["blast_radius"]);
    // Rate: 2 per minute.
    let mut h = H::new(set("max_actions_per_minute = 2"));
    for s in ["a", "b", "c"] {
        h.win(s, 0, 1.0);
    }
    for s in ["a", "b", "c"] {
        h.win(s, W, 1.0);
    }
    assert_eq!(h.commands().len(), 2);
    assert_eq!(h.guardrails(), ["rate_limit"]);
}

/// Limits are exact in one instance, whatever the partition count: 16 owned partitions with
/// max_in_flight 10, a policy's max_in_flight 4 and 5 actions per minute act on 4 segments.
/// (Split as `limit / partitions` per partition, they used to act on none.)
#[test]
fn limits_are_exact_across_owned_partitions() {
    let mut c = Controller::new(policies(
        "max_in_flight = 10\nmax_actions_per_minute = 5\nblast_radius = 0.1",
        "for = 1\nmax_in_flight = 4",
    ));
    for p in 0..16 {
        c.assign(p);
    }
    let mut fx = Effects::default();
    let labels = BTreeMap::new();
    for p in 0..16 {
        let s = format!("seg-{p}");
        c.on_window(&window(&s, p, 0, 1.0), &labels, W + 1_000, &mut fx);
    }
    assert_eq!(
        fx.commands.len(),
        1,
        "the blast radius allows one of 16 (10% is 1.6)"
    );
    let mut c = Controller::new(policies(
        "max_in_flight = 10\nmax_actions_per_minute = 5\nblast_radius = 1.0",
        "for = 1\nmax_in_flight = 4",
    ));
    for p in 0..16 {
        c.assign(p);
    }
    let mut fx = Effects::default();
    for p in 0..16 {
        let s = format!("seg-{p}");
        c.on_window(&window(&s, p, 0, 1.0), &labels, W + 1_000, &mut fx);
    }
    assert_eq!(fx.commands.len(), 4, "the policy's max_in_flight");
    let held: Vec<&str> = fx
        .decisions
        .iter()
        .filter_map(|d| d.guardrail.as_deref())
        .collect();
    assert_eq!(held.len(), 12);
    assert!(
        held.iter().all(|g| *g == "policy_max_in_flight"),
        "{held:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// No limit a config may hold (every count ≥ 1, a blast radius in (0, 1]) keeps a firing
    /// loop from its first command in one instance, however many partitions it owns.
    #[test]
    fn no_accepted_limit_blocks_the_first_command(
        max_in_flight in 1u32..50,
        policy_in_flight in prop::option::of(1u32..50),
        rate in 1u32..100,
        blast in 1u32..=100,
        partitions in 1i32..64,
        quiet in 0usize..200,
    ) {
        let policy = policy_in_flight.map_or(String::new(), |n| format!("max_in_flight = {n}"));
        let mut c = Controller::new(policies(
            &format!("max_in_flight = {max_in_flight}\nmax_actions_per_minute = {rate}\nblast_radius = {}", f64::from(blast) / 100.0),
            &format!("for = 1\n{policy}"),
        ));
        for p in 0..partitions {
            c.assign(p);
        }
        let labels = BTreeMap::new();
        let mut fx = Effects::default();
        // Healthy segments known first, on every partition.
        for i in 0..quiet {
            let p = (i as i32) % partitions;
            c.on_window(&window(&format!("q-{i}"), p, 0, 0.0), &labels, W + 1_000, &mut fx);
        }
        c.on_window(&window("bad", partitions - 1, 0, 1.0), &labels, W + 1_000, &mut fx);
        prop_assert_eq!(fx.commands.len(), 1, "{:?}", fx.decisions);
    }
}

#[test]
fn replayed_windows_are_ignored() {
    let mut h = H::new(policies("", ""));
    fire(&mut h, "eu/a");
    h.win("eu/a", W, 1.0); // re-read after a restart
    assert_eq!(h.c.stats().windows_replayed, 1);
    assert!(h.commands().is_empty());
}

#[test]
fn segment_state_round_trips_through_bytes() {
    let mut h = H::new(policies("", ""));
    fire(&mut h, "eu/a");
    let s = h.c.segment("eu/a").unwrap().clone();
    assert_eq!(SegmentState::from_bytes(&s.to_bytes()).unwrap(), s);
    assert!(SegmentState::from_bytes(b"{").is_err());
    // Versioned: a record written before versions is version 1; a newer one is refused, named.
    let mut json: serde_json::Value = serde_json::from_slice(&s.to_bytes()).unwrap();
    assert_eq!(json["version"], 1);
    json.as_object_mut().unwrap().remove("version");
    let old = SegmentState::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(old.version, 1);
    json["version"] = 99.into();
    let e = SegmentState::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap_err();
    assert!(e.contains("newer segloop"), "{e}");
}

// ---- properties ------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Window { seg: u8, bad: bool },
    Outcome { seg: u8, status: u8, stale: bool },
    Tick { ms: u16 },
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            4 => (0u8..8, any::<bool>()).prop_map(|(seg, bad)| Op::Window { seg, bad }),
            3 => (0u8..8, 0u8..4, any::<bool>()).prop_map(|(seg, status, stale)| Op::Outcome { seg, status, stale }),
            2 => (0u16..20_000).prop_map(|ms| Op::Tick { ms }),
        ],
        1..150,
    )
}

const SEGS: [&str; 8] = ["r/a", "r/a/x", "r/b", "r/b/y", "s/c", "s/d", "s/e", "s/f"];

struct Sim {
    c: Controller,
    now: i64,
    window_start: BTreeMap<u8, i64>,
    issued: Vec<String>,
    log: Vec<String>,
}

fn sim_policies() -> PolicySet {
    policies(
        "max_in_flight = 4\nblast_radius = 0.5\nmax_actions_per_minute = 6\nflap_max_actions = 3",
        "for = 1\ncooldown = \"20s\"\nmax_in_flight = 3",
    )
}

/// The simulation's policies with the instance watches off (the breaker) or out of reach
/// (held-back escalation): they are not in the changelog and start afresh after a restart.
fn sim_policies_without_watches() -> PolicySet {
    policies(
        "max_in_flight = 4\nblast_radius = 0.5\nmax_actions_per_minute = 6\nflap_max_actions = 3\n\
         actuator_breaker_min_commands = 0\nheld_back_escalate_after = \"1000d\"",
        "for = 1\ncooldown = \"20s\"\nmax_in_flight = 3",
    )
}

impl Sim {
    fn new() -> Self {
        Sim::with(sim_policies())
    }

    fn with(set: PolicySet) -> Self {
        let mut c = Controller::new(set);
        c.assign(0);
        c.assign(1);
        Sim {
            c,
            now: 0,
            window_start: BTreeMap::new(),
            issued: Vec::new(),
            log: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) -> Effects {
        let mut fx = Effects::default();
        match *op {
            Op::Window { seg, bad } => {
                let start = self.window_start.entry(seg).or_insert(0);
                let w = window(
                    SEGS[seg as usize],
                    i32::from(seg % 2),
                    *start,
                    if bad { 1.0 } else { 0.0 },
                );
                *start += W;
                self.now = self.now.max(w.end_ms) + 1;
                self.c.on_window(&w, &BTreeMap::new(), self.now, &mut fx);
            }
            Op::Outcome { seg, status, stale } => {
                let name = SEGS[seg as usize];
                let id = self
                    .c
                    .segment(name)
                    .and_then(|s| s.loops.get("errors"))
                    .and_then(|l| {
                        if stale {
                            l.incident_start_ms
                                .map(|st| command_id(name, "errors", st, 1))
                        } else {
                            l.command_id.clone()
                        }
                    });
                if let Some(id) = id {
                    let status = [
                        OutcomeStatus::Accepted,
                        OutcomeStatus::Applied,
                        OutcomeStatus::Failed,
                        OutcomeStatus::Rejected,
                    ][status as usize];
                    let o = RemediationOutcome {
                        command_id: id,
                        segment: name.into(),
                        status,
                        ts_ms: self.now,
                        actuator: "p".into(),
                        message: None,
                    };
                    self.c.on_outcome(&o, self.now, &mut fx);
                }
            }
            Op::Tick { ms } => {
                self.now += i64::from(ms);
                self.c.tick(self.now, &mut fx);
            }
        }
        for c in &fx.commands {
            self.issued.push(c.command_id.clone());
        }
        self.log
            .extend(fx.decisions.iter().map(|d| format!("{d:?}")));
        self.log
            .extend(fx.commands.iter().map(|c| format!("{c:?}")));
        fx
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        // Exact over both owned partitions: the policy's max_in_flight 3 (global 4), and a
        // blast radius of half the known segments (at least one).
        let segs: Vec<&SegmentState> = self.c.segments().collect();
        let in_flight = segs
            .iter()
            .flat_map(|s| s.loops.values())
            .filter(|l| l.phase.in_flight())
            .count();
        prop_assert!(in_flight <= 3, "in flight {}", in_flight);
        let under = segs
            .iter()
            .filter(|s| s.loops.values().any(|l| l.phase.under_action()))
            .count();
        prop_assert!(
            under as f64 <= (0.5 * self.c.known_segments() as f64).max(1.0) + 1e-9,
            "blast radius: {} of {}",
            under,
            self.c.known_segments()
        );
        let unique: BTreeSet<&String> = self.issued.iter().collect();
        prop_assert_eq!(
            unique.len(),
            self.issued.len(),
            "command ids unique per attempt"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn guardrails_hold_and_ids_are_unique(ops in arb_ops()) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.apply(op);
            sim.check_invariants()?;
        }
    }

    #[test]
    fn identical_inputs_give_identical_decisions(ops in arb_ops()) {
        let mut a = Sim::new();
        let mut b = Sim::new();
        for op in &ops {
            a.apply(op);
            b.apply(op);
        }
        prop_assert_eq!(a.log, b.log);
    }

    #[test]
    fn snapshot_restore_mid_run_continues_identically(ops in arb_ops(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(ops.len());
        let mut a = Sim::with(sim_policies_without_watches());
        for op in &ops[..cut] {
            a.apply(op);
        }
        // Restore every segment's bytes into a fresh controller.
        let states = a.c.segments().map(|s| s.to_bytes()).collect::<Vec<_>>();
        let mut b = restarted(&a, &states)?;
        continues_identically(&mut a, &mut b, &ops[cut..])?;
    }

    /// What a restart reads back is what the changelog got: the records `take_changes` gave
    /// after every step (tombstones delete). A controller restored from them at any point
    /// continues exactly as the live one: every change that matters was written, however few
    /// records were.
    #[test]
    fn a_restart_from_the_changelog_as_written_continues_identically(ops in arb_ops(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(ops.len());
        let mut a = Sim::with(sim_policies_without_watches());
        let mut changelog: BTreeMap<(i32, String), Vec<u8>> = BTreeMap::new();
        for op in &ops[..cut] {
            a.apply(op);
            for c in a.c.take_changes(a.now) {
                match c.state {
                    Some(bytes) => changelog.insert((c.partition, c.segment), bytes),
                    None => changelog.remove(&(c.partition, c.segment)),
                };
            }
        }
        let states = changelog.into_values().collect::<Vec<_>>();
        let mut b = restarted(&a, &states)?;
        continues_identically(&mut a, &mut b, &ops[cut..])?;
    }
}

/// A fresh simulation restored from `states` (changelog bytes) at `a`'s point. A segment with
/// no state (its loop never moved, or it went quiet) has its last window read again after
/// the restart: judged again, healthy, it changes nothing but what the controller knows.
fn restarted(a: &Sim, states: &[Vec<u8>]) -> Result<Sim, TestCaseError> {
    let mut b = Sim::with(sim_policies_without_watches());
    b.now = a.now;
    b.window_start = a.window_start.clone();
    b.issued = a.issued.clone();
    for bytes in states {
        b.c.restore(SegmentState::from_bytes(bytes).unwrap())
            .unwrap();
    }
    for (&seg, &start) in &a.window_start {
        let name = SEGS[seg as usize];
        if b.c.segment(name).is_none() {
            let again = window(name, i32::from(seg % 2), start - W, 0.0);
            let mut fx = Effects::default();
            b.c.on_window(&again, &BTreeMap::new(), b.now, &mut fx);
            prop_assert!(fx.is_empty(), "{:?}", fx);
        }
    }
    prop_assert_eq!(b.c.known_segments(), a.c.known_segments());
    Ok(b)
}

/// `a` and its restored `b` take the same `ops` with the same effects (token buckets are not
/// in the changelog: both refill first).
fn continues_identically(a: &mut Sim, b: &mut Sim, ops: &[Op]) -> Result<(), TestCaseError> {
    a.now += 60_000;
    b.now += 60_000;
    for op in ops {
        let fa = a.apply(op);
        let fb = b.apply(op);
        prop_assert_eq!(format!("{:?}", fa), format!("{:?}", fb));
    }
    Ok(())
}

#[test]
fn the_simulation_fires_and_hits_guardrails() {
    // Guards the property tests above against vacuity: the same simulator, with every
    // segment breaching, issues commands and meets guardrails.
    let mut sim = Sim::new();
    for round in 0..6 {
        for seg in 0..8u8 {
            sim.apply(&Op::Window { seg, bad: true });
        }
        sim.apply(&Op::Tick { ms: 15_000 });
        if round == 2 {
            for seg in 0..8u8 {
                sim.apply(&Op::Outcome {
                    seg,
                    status: 1,
                    stale: false,
                });
            }
        }
        sim.check_invariants().unwrap();
    }
    assert!(sim.issued.len() >= 4, "{}", sim.issued.len());
    let suppressed: u64 = sim.c.stats().suppressed.values().sum();
    assert!(suppressed > 0, "{:?}", sim.c.stats());
}

#[test]
fn changelog_holds_in_flight_state_and_tombstones_quiet_segments() {
    let mut h = H::new(policies("", ""));
    // Healthy windows change nothing worth keeping.
    h.win("eu/ok", 0, 0.0);
    assert!(h.c.take_changes(W).is_empty());
    let id = fire(&mut h, "eu/a");
    let changes = h.c.take_changes(2 * W + 1_000);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        (changes[0].partition, changes[0].segment.as_str()),
        (0, "eu/a")
    );
    // A fresh controller restored from the changelog knows the command in flight.
    let mut b = H::new(policies("", ""));
    let state = SegmentState::from_bytes(changes[0].state.as_deref().unwrap()).unwrap();
    b.c.restore(state).unwrap();
    assert_eq!(b.phase("eu/a"), Phase::Commanded);
    let t = 2 * W + 1_000;
    assert_eq!(
        b.outcome("eu/a", &id, OutcomeStatus::Applied, t + 200),
        OutcomeDisposition::Applied
    );
    b.win("eu/a", 2 * W, 0.0);
    b.win("eu/a", 3 * W, 0.0);
    b.win("eu/a", 4 * W, 0.0);
    assert_eq!(b.phase("eu/a"), Phase::Healthy);
    // Healthy again but the action is recent: kept while it counts for the cooldown.
    let kept = b.c.take_changes(5 * W);
    assert!(kept.iter().all(|c| c.state.is_some()), "{kept:?}");
    // Long after: one tombstone, then nothing.
    b.win("eu/a", 100 * W, 0.0);
    let later = b.c.take_changes(100 * W + 3_600_000);
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0].state, None);
    b.win("eu/a", 101 * W, 0.0);
    assert!(b.c.take_changes(101 * W + 3_600_000).is_empty());
}

/// A segment under action is written when its loop changes, not at every window judged while
/// nothing changes (it wrote one record per window: 25 per acting segment in the 100,000-segment
/// bench, and commands queued behind them in the producer); it is still checked each window
/// and gets its tombstone once quiet.
#[test]
fn a_segment_under_action_is_written_when_its_loop_changes_not_per_window() {
    let mut h = H::new(policies("", ""));
    fire(&mut h, "eu/a");
    let first = h.c.take_changes(2 * W + 1_000);
    assert_eq!(first.len(), 1, "{first:?}");
    // Awaiting the ack, breaching windows change nothing.
    for i in 2..6 {
        h.win("eu/a", i * W, 1.0);
        assert_eq!(h.phase("eu/a"), Phase::Commanded);
        let again = h.c.take_changes((i + 1) * W + 1_000);
        assert!(again.is_empty(), "window {i} wrote {again:?}");
    }
}

#[test]
fn a_policy_judges_only_the_windows_of_its_group() {
    let mut set = policies("", "");
    set.policies[0].window = Some("slow".into());
    let mut h = H::new(set);
    // Breaching default windows: the policy does not see them.
    h.win("eu/a", 0, 1.0);
    h.win("eu/a", W, 1.0);
    assert!(h.fx.commands.is_empty());
    assert!(h.c.segment("eu/a").is_none_or(|s| s.loops.is_empty()));
    // Breaching windows of its group: it fires.
    for start in [0, W] {
        let mut w = window("eu/a", 0, start, 1.0);
        w.group = Some("slow".into());
        h.c.on_window(&w, &h.labels, start + W + 1_000, &mut h.fx);
    }
    assert_eq!(h.commands().len(), 1);
    // A slow window re-read after a restart is ignored, per group.
    let mut again = window("eu/a", 0, W, 1.0);
    again.group = Some("slow".into());
    let replayed = h.c.stats().windows_replayed;
    h.c.on_window(&again, &h.labels, 3 * W, &mut h.fx);
    assert_eq!(h.c.stats().windows_replayed, replayed + 1);
}

/// A changelog record in the format segloop wrote before records were versioned (a fixture,
/// kept): it restores as version 1, with its command in flight.
#[test]
fn a_changelog_record_of_the_unversioned_format_restores() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/segment_state.unversioned.json"
    ))
    .unwrap();
    let s = SegmentState::from_bytes(&bytes).unwrap();
    assert_eq!(s.version, 1);
    assert_eq!(s.escalated_freeze_ms, None);
    assert_eq!(s.loops["errors"].phase, Phase::Commanded);
    let mut c = Controller::new(policies("", ""));
    c.assign(3);
    c.restore(s).unwrap();
    assert_eq!(c.in_flight().count(), 1);
}

/// A restart during verification (issue #17, observation 2): the restored loop's verify
/// deadline fell while the process was down. Until the partition's input is caught up nothing
/// is judged on the clock; the re-read healthy window resolves the loop with its one command.
#[test]
fn a_verify_deadline_passed_during_a_restart_waits_for_the_evidence() {
    let mut h = H::new(policies("", ""));
    let id = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.outcome("eu/a", &id, OutcomeStatus::Applied, t);
    let state = h.c.segment("eu/a").unwrap().clone();
    // The restarted process: the changelog's state, input not read yet, clock far past the
    // verify deadline (t + 30 s).
    let mut c = Controller::new(policies("", ""));
    c.assign(0);
    c.set_caught_up(Some(BTreeSet::new()));
    c.set_evidence_grace(5_000);
    c.restore(state).unwrap();
    let mut fx = Effects::default();
    let restart = t + 120_000;
    c.tick(restart, &mut fx);
    assert_eq!(
        c.segment("eu/a").unwrap().loops["errors"].phase,
        Phase::Verifying,
        "judged before the telemetry that decides it was read: {:?}",
        fx.decisions
    );
    // The re-read telemetry: a healthy window after APPLIED verifies the fix.
    c.on_window(
        &window("eu/a", 0, 3 * W, 0.0),
        &h.labels,
        restart + 10,
        &mut fx,
    );
    assert_eq!(
        c.segment("eu/a").unwrap().loops["errors"].phase,
        Phase::Resolved
    );
    assert!(fx.commands.is_empty(), "no retry: {:?}", fx.commands);
}

/// The deciding window: one that reaches the verify deadline and does not verify makes the fix
/// ineffective when it closes; with no window, a caught-up partition judges it once a
/// window's life past the deadline has passed.
#[test]
fn verification_is_judged_by_the_deciding_window_or_a_caught_up_silence() {
    let mut h = H::new(policies("", ""));
    h.c.set_caught_up(Some(BTreeSet::new()));
    let id = fire(&mut h, "eu/a");
    let t = 2 * W + 1_000;
    h.outcome("eu/a", &id, OutcomeStatus::Applied, t); // verify deadline t + 30 s = 51 s
    h.win("eu/a", 3 * W, 1.0); // ends at 40 s: before the deadline, no verdict
    assert_eq!(h.phase("eu/a"), Phase::Verifying);
    h.win("eu/a", 5 * W, 1.0); // ends at 60 s: the deciding window
    assert_eq!(h.phase("eu/a"), Phase::Backoff);
    assert!(h.fx.decisions.iter().any(|d| d.trigger == "ineffective"));

    // A segment that stops reporting: its partition is behind, then caught up.
    let mut h = H::new(policies("", ""));
    h.c.set_caught_up(Some(BTreeSet::new()));
    h.c.set_evidence_grace(5_000);
    let id = fire(&mut h, "eu/b");
    h.outcome("eu/b", &id, OutcomeStatus::Applied, t);
    h.c.tick(t + 60_000, &mut h.fx);
    assert_eq!(h.phase("eu/b"), Phase::Verifying, "behind: waits");
    h.c.set_caught_up(Some(BTreeSet::from([0])));
    h.c.tick(t + 34_999, &mut h.fx);
    assert_eq!(h.phase("eu/b"), Phase::Verifying, "inside the grace");
    h.c.tick(t + 35_000, &mut h.fx);
    assert_eq!(h.phase("eu/b"), Phase::Backoff);
}

/// Observation 4: a budget that holds firing loops back past `held_back_escalate_after` raises
/// one escalation naming the guardrail and how many wait; it clears when they drain.
#[test]
fn held_back_work_is_escalated_once_and_clears_when_drained() {
    // The first segment's command stays unanswered (a long ack timeout) and holds the slot.
    let mut h = H::new(policies(
        "blast_radius = 0.01\nheld_back_escalate_after = \"1m\"",
        "ack_timeout = \"1h\"",
    ));
    // One segment takes the single slot of the blast radius; three more breach behind it.
    fire(&mut h, "eu/a");
    for s in ["eu/b", "eu/c", "eu/d"] {
        h.win(s, 0, 1.0);
        h.win(s, W, 1.0);
    }
    assert!(h.fx.commands.is_empty());
    assert_eq!(h.c.held_back(), 3);
    let t = 2 * W + 1_000;
    h.c.tick(t + 59_999, &mut h.fx);
    assert!(h.fx.commands.is_empty(), "not yet waited a minute");
    for at in [t + 60_000, t + 90_000, t + 120_000] {
        h.c.tick(at, &mut h.fx);
    }
    let pages: Vec<_> = h.fx.commands.drain(..).collect();
    assert_eq!(pages.len(), 1, "one escalation per episode: {pages:?}");
    let p = &pages[0];
    assert_eq!((p.segment.as_str(), p.action.as_str()), ("*", "page"));
    assert_eq!(p.params["guardrail"], "blast_radius");
    assert_eq!(p.params["waiting_segments"], "3");
    assert_eq!(p.params["escalation_reason"], "held_back");
    // The waiting segments recover: the backlog drains and the escalation clears.
    for s in ["eu/b", "eu/c", "eu/d"] {
        h.win(s, 2 * W, 0.0);
    }
    h.c.tick(t + 130_000, &mut h.fx);
    assert_eq!(h.c.held_back(), 0);
    assert!(h
        .fx
        .decisions
        .iter()
        .any(|d| d.segment == "*" && d.trigger == "held_back_drained"));
}

/// Observation 5: an actuator that is down. After most recent commands go unanswered the
/// breaker opens: one escalation, no per-segment pages, new commands held; a probe passes per
/// interval, and its answer closes the breaker.
#[test]
fn an_actuator_that_stops_answering_opens_the_breaker_with_one_page() {
    let mut h = H::new(policies(
        "actuator_breaker_min_commands = 4\nactuator_breaker_ratio = 0.75\nactuator_breaker_probe = \"2m\"",
        "",
    ));
    let segs: Vec<String> = (0..8).map(|i| format!("eu/s{i}")).collect();
    for s in &segs {
        h.win(s, 0, 1.0);
        h.win(s, W, 1.0);
    }
    assert_eq!(h.fx.commands.len(), 8);
    h.fx.commands.clear();
    let t = 2 * W + 1_000;
    // Every ack deadline passes unanswered; retries and their deadlines follow.
    let mut at = t;
    while at < t + 600_000 {
        at += 1_000;
        h.c.tick(at, &mut h.fx);
    }
    assert!(h.c.actuator_breaker_open());
    let instance: Vec<_> = h.fx.commands.iter().filter(|c| c.segment == "*").collect();
    assert_eq!(instance.len(), 1, "one page: {instance:?}");
    assert_eq!(
        instance[0].params["escalation_reason"],
        "actuator_not_acknowledging"
    );
    let per_segment_pages =
        h.fx.commands
            .iter()
            .filter(|c| c.segment != "*" && c.action == "page")
            .count();
    assert_eq!(per_segment_pages, 0, "no page storm");
    assert!(h.guardrails().iter().any(|g| g == "actuator_breaker"));
    // Probes: about one per 2 minutes over the 10 minutes, not a retry per segment.
    let probes =
        h.fx.commands
            .iter()
            .filter(|c| c.segment != "*" && c.action == "rollback")
            .count();
    assert!((4..=7).contains(&probes), "probes: {probes}");
    // The actuator answers a probe: the breaker closes.
    let probe =
        h.fx.commands
            .iter()
            .rev()
            .find(|c| c.segment != "*")
            .unwrap()
            .clone();
    h.outcome(
        &probe.segment,
        &probe.command_id,
        OutcomeStatus::Applied,
        at + 1,
    );
    assert!(!h.c.actuator_breaker_open());
    assert!(h
        .fx
        .decisions
        .iter()
        .any(|d| d.segment == "*" && d.trigger == "actuator_answering"));
}

/// The controller's memory follows the windows' bound (issue #21): a quiet segment the windows
/// forgot is forgotten; one under action, or one whose action still counts for its cooldown,
/// is kept; a persisted one is tombstoned first, then forgotten.
#[test]
fn quiet_segments_the_windows_forgot_are_forgotten() {
    let mut h = H::new(policies("", "cooldown = \"1m\""));
    for i in 0..50 {
        h.win(&format!("q/s{i}"), 0, 0.0);
    }
    let id = fire(&mut h, "q/acting");
    assert_eq!(h.c.known_segments(), 51);
    assert_eq!(
        h.c.segments().count(),
        1,
        "only the segment whose loop moved has a state"
    );
    let now = 3 * W;
    // The windows still hold them: nothing is forgotten.
    assert_eq!(h.c.forget_quiet(now, |_, _| true), 0);
    assert_eq!(h.c.forget_quiet(now, |_, _| false), 50);
    assert_eq!(h.c.known_segments(), 1, "the segment under action stays");
    // It resolves and clears; it was persisted, so its tombstone is due before it goes.
    h.outcome("q/acting", &id, OutcomeStatus::Applied, now);
    h.c.take_changes(now);
    h.win("q/acting", 4 * W, 0.0);
    h.win("q/acting", 5 * W, 0.0);
    h.win("q/acting", 6 * W, 0.0);
    assert_eq!(h.phase("q/acting"), Phase::Healthy);
    h.c.take_changes(7 * W);
    // Its last action still counts for the flap window (1 h): kept.
    assert_eq!(h.c.forget_quiet(7 * W + 60_000, |_, _| false), 0);
    let later = 7 * W + 7_200_000; // past the flap window
    assert_eq!(h.c.forget_quiet(later, |_, _| false), 0, "tombstone first");
    let changes = h.c.take_changes(later);
    assert!(
        changes
            .iter()
            .any(|c| c.segment == "q/acting" && c.state.is_none()),
        "{changes:?}"
    );
    assert_eq!(h.c.forget_quiet(later, |_, _| false), 1);
    assert_eq!(h.c.known_segments(), 0);
}
