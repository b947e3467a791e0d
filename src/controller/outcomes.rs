//! Outcomes and deadlines: an actuator's acknowledgement applied, an unanswered command
//! judged, a failed attempt retried or escalated.

use super::*;

impl Controller {
    /// Applies an actuator outcome.
    pub fn on_outcome(
        &mut self,
        o: &RemediationOutcome,
        now_ms: i64,
        out: &mut Effects,
    ) -> OutcomeDisposition {
        let Some((&partition, _)) = self
            .partitions
            .iter()
            .find(|(_, p)| p.knows(o.segment.as_str()))
        else {
            // Owned partitions know every segment that has a command in flight.
            return OutcomeDisposition::NotOurs;
        };
        *self.stats.outcomes.entry(o.status.as_str()).or_default() += 1;
        if let Some(since) = self.breaker.close() {
            let ctx = Ctx {
                now_ms,
                window: None,
            };
            self.instance_event(
                None,
                Phase::Escalated,
                Phase::Healthy,
                "actuator_answering",
                since,
                None,
                &ctx,
                out,
            );
        }
        let Some(seg) = self.partitions[&partition].segments.get(o.segment.as_str()) else {
            // Judged here, and no loop ever moved: no command of ours.
            self.stats.outcomes_unknown += 1;
            return OutcomeDisposition::Unknown;
        };
        let Some((policy_name, l)) = seg
            .loops
            .iter()
            .find(|(_, l)| l.command_id.as_deref() == Some(o.command_id.as_str()))
        else {
            let earlier = seg.loops.iter().any(|(name, l)| {
                l.incident_start_ms.is_some_and(|start| {
                    (1..l.attempt.max(1))
                        .any(|a| command_id(&o.segment, name, start, a) == o.command_id)
                })
            });
            if earlier {
                self.stats.outcomes_duplicate += 1;
                return OutcomeDisposition::Duplicate;
            }
            self.stats.outcomes_unknown += 1;
            return OutcomeDisposition::Unknown;
        };
        let (policy_name, phase) = (policy_name.clone(), l.phase);
        let ctx = Ctx {
            now_ms,
            window: None,
        };
        if phase == Phase::Commanded {
            self.breaker.answered();
        }
        let next = match (o.status, phase) {
            (OutcomeStatus::Accepted, Phase::Commanded) => {
                self.timing(
                    &policy_name,
                    TimingKind::Ack,
                    l.issued_at_ms.map(|t| now_ms - t),
                    out,
                );
                Some((Phase::Acknowledged, "accepted"))
            }
            (OutcomeStatus::Applied, Phase::Commanded | Phase::Acknowledged) => {
                if phase == Phase::Commanded {
                    self.timing(
                        &policy_name,
                        TimingKind::Ack,
                        l.issued_at_ms.map(|t| now_ms - t),
                        out,
                    );
                }
                Some((Phase::Verifying, "applied"))
            }
            (
                OutcomeStatus::Failed | OutcomeStatus::Rejected,
                Phase::Commanded | Phase::Acknowledged,
            ) => {
                if phase == Phase::Commanded {
                    self.timing(
                        &policy_name,
                        TimingKind::Ack,
                        l.issued_at_ms.map(|t| now_ms - t),
                        out,
                    );
                }
                None
            }
            _ => {
                self.stats.outcomes_duplicate += 1;
                return OutcomeDisposition::Duplicate;
            }
        };
        let Some(pi) = self.policy_index(&policy_name) else {
            return OutcomeDisposition::Unknown;
        };
        match next {
            Some((to, trigger)) => {
                let verify_within = self.policies.policies[pi].verify_within_ms;
                let l = self.loop_mut(partition, &o.segment, &policy_name);
                let from = l.phase;
                l.phase = to;
                if to == Phase::Verifying {
                    l.applied_at_ms = Some(now_ms);
                    l.deadline_ms = Some(now_ms + verify_within);
                }
                let id = l.command_id.clone();
                self.count_move(partition, &policy_name, from, to);
                out.decisions.push(decision(
                    &o.segment,
                    &policy_name,
                    from,
                    to,
                    trigger,
                    &ctx,
                    id,
                    None,
                    Vec::new(),
                ));
            }
            None => {
                let why = if o.status == OutcomeStatus::Failed {
                    "failed"
                } else {
                    "rejected"
                };
                self.retry_or_escalate(pi, partition, &o.segment, why, &ctx, out);
            }
        }
        OutcomeDisposition::Applied
    }

    /// Runs deadlines: ack timeouts, verification deadlines, backoff ends.
    pub fn tick(&mut self, now_ms: i64, out: &mut Effects) {
        let ctx = Ctx {
            now_ms,
            window: None,
        };
        // The walk over the loops under action runs only once the earliest deadline it saw
        // last time is due, or a loop changed since (every tick walked them: O(segments
        // acting) per turn). A deadline that is due and waits (a verification without
        // evidence yet) keeps the floor at or before now, so it is looked at every tick.
        let mut due: Vec<(i32, Arc<str>, String)> = Vec::new();
        if now_ms >= self.deadline_floor {
            let mut floor = i64::MAX;
            for (&pn, p) in &self.partitions {
                for s in &p.active {
                    for (name, l) in &p.segments[s].loops {
                        let Some(d) = l.deadline_ms else { continue };
                        floor = floor.min(d);
                        if now_ms >= d {
                            due.push((pn, s.clone(), name.clone()));
                        }
                    }
                }
            }
            self.deadline_floor = floor;
        } else {
            debug_assert!(
                !self
                    .partitions
                    .values()
                    .any(|p| p.active.iter().any(|s| p.segments[s]
                        .loops
                        .values()
                        .any(|l| l.deadline_ms.is_some_and(|d| now_ms >= d)))),
                "a deadline under the floor {} at {now_ms}",
                self.deadline_floor
            );
        }
        for (partition, segment, policy_name) in due {
            let Some(pi) = self.policy_index(&policy_name) else {
                continue;
            };
            let seg = &self.partitions[&partition].segments[&segment];
            let l = &seg.loops[&policy_name];
            let (phase, deadline) = (l.phase, l.deadline_ms.unwrap_or(now_ms));
            match phase {
                Phase::Commanded | Phase::Acknowledged => {
                    if phase == Phase::Commanded {
                        self.judge_unanswered(&policy_name, &ctx, out);
                    }
                    self.retry_or_escalate(pi, partition, &segment, "ack_timeout", &ctx, out)
                }
                Phase::Verifying => {
                    // Judged on evidence: the deciding window was read (it did not verify, or
                    // the window step would have resolved the loop), or the input is caught up
                    // and a window's life has passed with none.
                    let group = self.policies.policies[pi].window.as_deref();
                    let evidence = seg.last_window_end(group) >= deadline;
                    if evidence
                        || (self.is_caught_up(partition)
                            && now_ms >= deadline.saturating_add(self.evidence_grace_ms))
                    {
                        self.retry_or_escalate(pi, partition, &segment, "ineffective", &ctx, out)
                    }
                }
                Phase::Backoff => self.fire(pi, partition, &segment, &ctx, out),
                _ => {
                    self.loop_mut(partition, &segment, &policy_name).deadline_ms = None;
                }
            }
        }
        self.tick_claims(&ctx, out);
        self.watch_held_back(&ctx, out);
    }

    /// A command went unanswered past its ack deadline: the actuator breaker judges it.
    pub(super) fn judge_unanswered(&mut self, policy: &str, ctx: &Ctx<'_>, out: &mut Effects) {
        let g = &self.policies.guardrails;
        let Some(unanswered) = self.breaker.unanswered(
            ctx.now_ms,
            g.actuator_breaker_min_commands,
            g.actuator_breaker_ratio,
            g.actuator_breaker_probe_ms,
        ) else {
            return;
        };
        let params = BTreeMap::from([
            (
                "escalation_reason".to_string(),
                "actuator_not_acknowledging".to_string(),
            ),
            ("unanswered_commands".to_string(), unanswered.to_string()),
        ]);
        self.instance_event(
            Some(policy),
            Phase::Healthy,
            Phase::Escalated,
            "actuator_not_acknowledging",
            ctx.now_ms,
            Some(InstanceEscalation {
                params,
                count_name: "unanswered_commands",
                count: unanswered,
            }),
            ctx,
            out,
        );
    }

    pub(super) fn retry_or_escalate(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        why: &'static str,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let set = Arc::clone(&self.policies);
        let policy = &set.policies[pi];
        let seed = set.guardrails.seed;
        // While the actuator breaker is open an unanswered command is the actuator's fault, not
        // the fix's: the loop waits in backoff instead of paging per segment.
        let breaker_holds = why == "ack_timeout" && self.breaker.is_open();
        let l = self.loop_mut(partition, segment, &policy.name);
        if l.attempt < policy.max_attempts || breaker_holds {
            let from = l.phase;
            let delay = backoff_ms(
                policy,
                l.attempt,
                seed,
                l.command_id.as_deref().unwrap_or(""),
            );
            l.phase = Phase::Backoff;
            l.deadline_ms = Some(ctx.now_ms + delay);
            let id = l.command_id.clone();
            self.count_move(partition, &policy.name, from, Phase::Backoff);
            out.decisions.push(decision(
                segment,
                &policy.name,
                from,
                Phase::Backoff,
                why,
                ctx,
                id,
                None,
                Vec::new(),
            ));
            self.sync_active(partition, segment);
        } else {
            self.escalate(pi, partition, segment, why, ctx, out);
        }
    }

    /// Ends the incident as escalated, emitting the policy's escalation action once.
    pub(super) fn escalate(
        &mut self,
        pi: usize,
        partition: i32,
        segment: &str,
        why: &'static str,
        ctx: &Ctx<'_>,
        out: &mut Effects,
    ) {
        let set = Arc::clone(&self.policies);
        let policy = &set.policies[pi];
        let now = ctx.now_ms;
        let l = self.loop_mut(partition, segment, &policy.name);
        let from = l.phase;
        l.phase = Phase::Escalated;
        l.deadline_ms = None;
        l.healthy = 0;
        let start = l.incident_start_ms.unwrap_or(now);
        // Escalations take the attempt number after the last; ids stay unique per incident.
        let attempt = l.attempt + 1;
        let reason = l.reason.clone();
        let mut id = None;
        if let Some(action) = &policy.escalate {
            let cid = command_id(segment, &policy.name, start, attempt);
            l.command_id = Some(cid.clone());
            l.attempt = attempt;
            id = Some(cid.clone());
            self.stats.commands += 1;
            out.commands.push(RemediationCommand {
                command_id: cid,
                segment: segment.into(),
                policy: policy.name.clone(),
                policy_version: policy.version,
                action: action.clone(),
                params: BTreeMap::from([("escalation_reason".to_string(), why.to_string())]),
                attempt: attempt as i32,
                issued_at_ms: now,
                ack_deadline_ms: now + policy.ack_timeout_ms,
                reason: reason.unwrap_or_else(|| reason_without_window(policy, start)),
                dry_run: policy.dry_run,
            });
        }
        self.count_move(partition, &policy.name, from, Phase::Escalated);
        out.decisions.push(decision(
            segment,
            &policy.name,
            from,
            Phase::Escalated,
            why,
            ctx,
            id,
            None,
            Vec::new(),
        ));
        self.sync_active(partition, segment);
    }
}
