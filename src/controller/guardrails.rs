//! Guardrails: what may hold a firing back (in flight, rate, blast radius, flapping, the
//! actuator breaker), the budgets they use, and escalations of the instance as a whole.

use super::*;

/// Which guardrail stopped a firing (the `guardrail` of its decision record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Guardrail {
    Staleness,
    Silence,
    FlapBreaker,
    Inhibited,
    Cooldown,
    PolicyInFlight,
    MaxInFlight,
    BlastRadius,
    RateLimit,
    /// The actuator circuit breaker is open.
    ActuatorBreaker,
}

impl Guardrail {
    pub const ALL: [Guardrail; 10] = [
        Guardrail::Staleness,
        Guardrail::Silence,
        Guardrail::FlapBreaker,
        Guardrail::Inhibited,
        Guardrail::Cooldown,
        Guardrail::PolicyInFlight,
        Guardrail::MaxInFlight,
        Guardrail::BlastRadius,
        Guardrail::RateLimit,
        Guardrail::ActuatorBreaker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Guardrail::Staleness => "staleness",
            Guardrail::Silence => "silence",
            Guardrail::FlapBreaker => "flap_breaker",
            Guardrail::Inhibited => "inhibited",
            Guardrail::Cooldown => "cooldown",
            Guardrail::PolicyInFlight => "policy_max_in_flight",
            Guardrail::MaxInFlight => "max_in_flight",
            Guardrail::BlastRadius => "blast_radius",
            Guardrail::RateLimit => "rate_limit",
            Guardrail::ActuatorBreaker => "actuator_breaker",
        }
    }

    /// A budget: it holds firings back for want of room, not by intent (silences, cooldowns,
    /// inhibition, the flap breaker). Held-back work is escalated past a limit.
    pub fn is_budget(self) -> bool {
        matches!(
            self,
            Guardrail::PolicyInFlight
                | Guardrail::MaxInFlight
                | Guardrail::BlastRadius
                | Guardrail::RateLimit
        )
    }
}

/// The guardrail budgets of one instance, as used at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Budgets {
    pub in_flight: usize,
    pub max_in_flight: u32,
    pub under_action: usize,
    /// Segments the blast radius allows under action now (at least one).
    pub blast_radius_segments: usize,
    pub known_segments: usize,
    /// Commands the rate limit allows right now.
    pub rate_tokens: f64,
    pub max_actions_per_minute: f64,
    /// (policy, in flight, its max_in_flight) for policies with a limit.
    pub policies: Vec<(String, usize, u32)>,
    /// Other live instances of the group (their heartbeats on the control topic).
    pub peers: usize,
    /// Commands in flight or claimed on the other instances (counted against the limits).
    pub elsewhere_in_flight: usize,
}

impl Controller {
    /// Drops held-back loops that stopped waiting; escalates a backlog that waited too long,
    /// once, and says when it drained.
    pub(super) fn watch_held_back(&mut self, ctx: &Ctx<'_>, out: &mut Effects) {
        if self.held_back.waiting() > 0 {
            let partitions = &self.partitions;
            self.held_back.retain(|segment, policy| {
                partitions.values().any(|p| {
                    p.segments
                        .get(segment)
                        .and_then(|s| s.loops.get(policy))
                        .is_some_and(|l| matches!(l.phase, Phase::Breaching | Phase::Backoff))
                })
            });
        }
        let after = self.policies.guardrails.held_back_escalate_after_ms;
        match self.held_back.check(ctx.now_ms, after) {
            Some(watch::Episode::HeldBack {
                waiting,
                guardrail,
                since_ms,
                policy,
            }) => {
                let params = BTreeMap::from([
                    ("escalation_reason".to_string(), "held_back".to_string()),
                    ("guardrail".to_string(), guardrail.as_str().to_string()),
                    ("waiting_segments".to_string(), waiting.to_string()),
                    ("waiting_since_ms".to_string(), since_ms.to_string()),
                ]);
                self.instance_event(
                    Some(&policy),
                    Phase::Healthy,
                    Phase::Escalated,
                    &format!("held_back:{}", guardrail.as_str()),
                    since_ms,
                    Some(InstanceEscalation {
                        params,
                        count_name: "waiting_segments",
                        count: waiting,
                    }),
                    ctx,
                    out,
                );
            }
            Some(watch::Episode::Drained { since_ms }) => self.instance_event(
                None,
                Phase::Escalated,
                Phase::Healthy,
                "held_back_drained",
                since_ms,
                None,
                ctx,
                out,
            ),
            None => {}
        }
    }

    /// A decision about the instance as a whole (segment [`INSTANCE_SEGMENT`]) and, with
    /// `escalation` (its params and the count it reports), the escalation command: the
    /// escalate action of `policy` if it has one, else of the first policy that has one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn instance_event(
        &mut self,
        policy: Option<&str>,
        from: Phase,
        to: Phase,
        trigger: &str,
        since_ms: i64,
        escalation: Option<InstanceEscalation>,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let chosen = policy
            .and_then(|name| self.policies.policy(name))
            .filter(|p| p.escalate.is_some())
            .or_else(|| self.policies.policies.iter().find(|p| p.escalate.is_some()))
            .or_else(|| policy.and_then(|name| self.policies.policy(name)))
            .or_else(|| self.policies.policies.first());
        let name = chosen.map_or_else(String::new, |p| p.name.clone());
        let mut id = None;
        let mut aggregates = Vec::new();
        if let Some(InstanceEscalation {
            params,
            count_name,
            count,
        }) = escalation
        {
            aggregates.push((count_name.to_string(), count as f64));
            if let Some((p, action)) = chosen.and_then(|p| Some((p, p.escalate.clone()?))) {
                let cid = command_id(INSTANCE_SEGMENT, &format!("{name}:{trigger}"), since_ms, 1);
                id = Some(cid.clone());
                self.stats.commands += 1;
                out.commands.push(RemediationCommand {
                    command_id: cid,
                    segment: INSTANCE_SEGMENT.into(),
                    policy: name.clone(),
                    policy_version: p.version,
                    action,
                    params,
                    attempt: 1,
                    issued_at_ms: ctx.now_ms,
                    ack_deadline_ms: ctx.now_ms + p.ack_timeout_ms,
                    reason: reason_without_window(p, since_ms),
                    dry_run: p.dry_run,
                });
            }
        }
        out.decisions.push(decision(
            INSTANCE_SEGMENT,
            &name,
            from,
            to,
            trigger,
            ctx,
            id,
            None,
            aggregates,
        ));
    }

    /// The first guardrail that stops a firing now, if any.
    pub(super) fn guardrail(
        &mut self,
        policy: &Policy,
        partition: i32,
        segment: &str,
        ctx: &Ctx<'_>,
    ) -> Option<Guardrail> {
        let now = ctx.now_ms;
        let set = Arc::clone(&self.policies);
        let g = &set.guardrails;
        if let Some(w) = ctx.window {
            if now - w.end_ms > g.max_action_staleness_ms {
                return Some(Guardrail::Staleness);
            }
        }
        if self.silences().any(|s| s.covers(segment, now)) {
            return Some(Guardrail::Silence);
        }
        let p = self.partitions.get_mut(&partition).expect("owned");
        let seg = p.segments.get_mut(segment).expect("known");
        if seg.frozen_until_ms.is_some_and(|t| now < t) {
            return Some(Guardrail::FlapBreaker);
        }
        seg.action_history.retain(|&t| now - t < g.flap_window_ms);
        if seg.action_history.len() as u32 >= g.flap_max_actions {
            seg.frozen_until_ms = Some(now + g.flap_freeze_ms);
            // The freeze is state of its own (no loop moved): written with the next changes.
            p.mark_dirty(segment);
            return Some(Guardrail::FlapBreaker);
        }
        if let Some(&last) = seg.last_action_ms.get(&policy.action) {
            // A retry of the same incident is not held back by its own cooldown.
            let own_retry = seg
                .loops
                .get(&policy.name)
                .is_some_and(|l| l.phase == Phase::Backoff);
            if !own_retry && now - last < policy.cooldown_ms {
                return Some(Guardrail::Cooldown);
            }
        }
        // Inhibition down the tree: an ancestor under action (here or, with other
        // instances, there) holds its descendants.
        let mut prefix = segment;
        while let Some(i) = prefix.rfind('/') {
            prefix = &prefix[..i];
            if self.partitions.values().any(|q| q.active.contains(prefix))
                || self
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.remote_under_action(prefix, now))
            {
                return Some(Guardrail::Inhibited);
            }
        }
        // The budgets, over every partition owned here and every other instance's records.
        if let Some(limit) = policy.max_in_flight {
            if self.in_flight_count(Some(&policy.name))
                + self.elsewhere_in_flight(Some(&policy.name), now)
                + 1
                > limit as usize
            {
                return Some(Guardrail::PolicyInFlight);
            }
        }
        if self.in_flight_count(None) + self.elsewhere_in_flight(None, now) + 1
            > g.max_in_flight as usize
        {
            return Some(Guardrail::MaxInFlight);
        }
        let already = self.partitions[&partition].active.contains(segment);
        // Segments under action elsewhere are known there, whatever its last heartbeat said.
        let (remote_segments, remote_known) = self.cluster.as_ref().map_or((0, 0), |c| {
            let under = c.remote_segments(now);
            (under + c.reserved(None), c.remote_known(now).max(under))
        });
        if !already
            && (self.under_action() + remote_segments) as f64 + 1.0
                > self.blast_radius_budget(
                    self.known_segments().saturating_sub(self.known_ahead) + remote_known,
                ) + 1e-9
        {
            return Some(Guardrail::BlastRadius);
        }
        let tokens = self.rate_tokens(now);
        self.tokens = Some((tokens, now));
        let spent_elsewhere = self
            .cluster
            .as_mut()
            .map_or(0, |c| c.remote_claims_last_minute(now) + c.reserved(None));
        if tokens - (spent_elsewhere as f64) < 1.0 - 1e-9 {
            return Some(Guardrail::RateLimit);
        }
        // Last: a probe let through while open must not be stopped by another guardrail.
        if !policy.dry_run && self.breaker.blocks(now, g.actuator_breaker_probe_ms) {
            return Some(Guardrail::ActuatorBreaker);
        }
        None
    }

    /// Loops awaiting an outcome or verification over every owned partition (of `policy`, or
    /// of every policy).
    pub(super) fn in_flight_count(&self, policy: Option<&str>) -> usize {
        let counted = self
            .partitions
            .values()
            .map(|p| match policy {
                None => p.in_flight.values().sum(),
                Some(name) => p.in_flight.get(name).copied().unwrap_or(0),
            })
            .sum();
        // Every debug build (the tests) checks the counts against a walk of the loops.
        debug_assert_eq!(
            counted,
            self.in_flight()
                .filter(|(_, name, _)| policy.is_none_or(|x| x == *name))
                .count(),
            "in-flight count of {policy:?}"
        );
        counted
    }

    /// Commands of other instances in flight or claimed, and this instance's claims waiting
    /// out the ancestor hold (of `policy`, or of every policy).
    pub(super) fn elsewhere_in_flight(&self, policy: Option<&str>, now_ms: i64) -> usize {
        self.cluster.as_ref().map_or(0, |c| {
            c.remote_in_flight(policy, now_ms) + c.reserved(policy)
        })
    }

    /// Segments under action over every owned partition.
    pub(super) fn under_action(&self) -> usize {
        self.partitions.values().map(|p| p.active.len()).sum()
    }

    /// Segments known over every owned partition (judged here, with a state or not).
    pub fn known_segments(&self) -> usize {
        self.partitions.values().map(PartitionState::known).sum()
    }

    /// The rate limit's tokens at `now_ms`: refilled at the rate per minute up to the burst.
    pub(super) fn rate_tokens(&self, now_ms: i64) -> f64 {
        let burst = self.rate_burst();
        self.tokens.map_or(burst, |(t, at)| {
            let rate = self.policies.guardrails.max_actions_per_minute;
            (t + rate * (now_ms - at).max(0) as f64 / 60_000.0).min(burst)
        })
    }

    /// The budgets in use now: what `/actions` shows next to the commands in flight.
    pub fn budgets(&self, now_ms: i64) -> Budgets {
        let g = &self.policies.guardrails;
        let known = self.known_segments();
        Budgets {
            in_flight: self.in_flight_count(None),
            peers: self.cluster.as_ref().map_or(0, |c| c.peers(now_ms)),
            elsewhere_in_flight: self.elsewhere_in_flight(None, now_ms),
            max_in_flight: g.max_in_flight,
            under_action: self.under_action(),
            blast_radius_segments: self.blast_radius_budget(known).floor() as usize,
            known_segments: known,
            rate_tokens: self.rate_tokens(now_ms),
            max_actions_per_minute: g.max_actions_per_minute,
            policies: self
                .policies
                .policies
                .iter()
                .filter_map(|p| {
                    p.max_in_flight
                        .map(|limit| (p.name.clone(), self.in_flight_count(Some(&p.name)), limit))
                })
                .collect(),
        }
    }

    /// Segments that may be under action at once with `known` segments: the blast radius's
    /// fraction of them, never less than one.
    pub(super) fn blast_radius_budget(&self, known: usize) -> f64 {
        (self.policies.guardrails.blast_radius * known as f64).max(1.0)
    }

    /// The rate limit's burst: a minute's worth, at least one command.
    pub(super) fn rate_burst(&self) -> f64 {
        self.policies.guardrails.max_actions_per_minute.max(1.0)
    }

    pub(super) fn trip_flap_breaker(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let seg = self.segment_mut(partition, segment);
        // One escalation per freeze: a loop that cleared and breaches again inside the same
        // freeze is held back (its decision says flap_breaker) but pages nobody again.
        if seg.frozen_until_ms.is_some() && seg.escalated_freeze_ms == seg.frozen_until_ms {
            return;
        }
        seg.escalated_freeze_ms = seg.frozen_until_ms;
        let l = self.loop_mut(partition, segment, &self.policies.policies[pi].name.clone());
        if l.phase == Phase::Escalated {
            return;
        }
        self.escalate(pi, partition, segment, "flap_breaker", ctx, out);
    }
}
