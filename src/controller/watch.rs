//! Watches over the loops of one instance as a whole: firing loops that a budget holds back,
//! and an actuator that stopped answering. Each opens an episode that raises one escalation
//! and ends it when the cause goes away; neither does I/O (the controller turns their episodes
//! into commands and decision records).

use std::collections::{BTreeMap, VecDeque};

use super::Guardrail;

/// How an episode of a watch moved.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Episode {
    /// Held-back work waited past its limit: how many loops, behind which guardrail (the one
    /// holding most of them), since when, and the policy of the loop waiting longest.
    HeldBack {
        waiting: usize,
        guardrail: Guardrail,
        since_ms: i64,
        policy: String,
    },
    /// The held-back loops fired or went away.
    Drained { since_ms: i64 },
}

/// Firing loops a budget (in-flight, blast radius, rate) holds back, by (segment, policy).
#[derive(Debug, Default)]
pub(super) struct HeldBack {
    loops: BTreeMap<(String, String), (Guardrail, i64)>,
    /// The start of the episode escalated (one escalation per episode).
    escalated: Option<i64>,
}

impl HeldBack {
    /// A firing of `policy` on `segment` was held back by `guardrail` at `now_ms` (a loop held
    /// back again keeps the time it first waited).
    pub fn hold(&mut self, segment: &str, policy: &str, guardrail: Guardrail, now_ms: i64) {
        self.loops
            .entry((segment.to_string(), policy.to_string()))
            .and_modify(|e| e.0 = guardrail)
            .or_insert((guardrail, now_ms));
    }

    /// The loop fired, or stopped waiting.
    pub fn release(&mut self, segment: &str, policy: &str) {
        if !self.loops.is_empty() {
            self.loops
                .remove(&(segment.to_string(), policy.to_string()));
        }
    }

    /// Keeps the loops for which `waiting(segment, policy)` still holds.
    pub fn retain(&mut self, mut waiting: impl FnMut(&str, &str) -> bool) {
        self.loops.retain(|(s, p), _| waiting(s, p));
    }

    pub fn waiting(&self) -> usize {
        self.loops.len()
    }

    /// Opens an episode once a loop waited `after_ms`; ends it once none waits.
    pub fn check(&mut self, now_ms: i64, after_ms: i64) -> Option<Episode> {
        let Some(((_, policy), (_, since))) = self.loops.iter().min_by_key(|(_, (_, t))| *t) else {
            return self
                .escalated
                .take()
                .map(|since_ms| Episode::Drained { since_ms });
        };
        if self.escalated.is_some() || now_ms - since < after_ms {
            return None;
        }
        let mut by_guardrail: BTreeMap<Guardrail, usize> = BTreeMap::new();
        for (g, _) in self.loops.values() {
            *by_guardrail.entry(*g).or_default() += 1;
        }
        let guardrail = by_guardrail
            .iter()
            .max_by_key(|(g, n)| (**n, std::cmp::Reverse(**g)))
            .map(|(g, _)| *g)
            .expect("at least one loop waits");
        self.escalated = Some(*since);
        Some(Episode::HeldBack {
            waiting: self.loops.len(),
            guardrail,
            since_ms: *since,
            policy: policy.clone(),
        })
    }
}

use crate::policy::ACTUATOR_BREAKER_RECENT as RECENT;

/// The actuator circuit breaker: the recent commands' acknowledgements (answered by the ack
/// deadline or not); open while most went unanswered.
#[derive(Debug, Default)]
pub(super) struct ActuatorBreaker {
    recent: VecDeque<bool>,
    /// Open: since when, and when the next probe command may pass.
    open: Option<(i64, i64)>,
}

impl ActuatorBreaker {
    /// An outcome arrived (for any command, late ones too): the actuator answers. Returns
    /// when the breaker had been open since, if it closes now.
    pub fn close(&mut self) -> Option<i64> {
        let (since, _) = self.open.take()?;
        // A fresh start: the unanswered commands of the outage judge nothing now.
        self.recent.clear();
        Some(since)
    }

    /// A command's first answer came by its ack deadline.
    pub fn answered(&mut self) {
        self.push(true);
    }

    /// A command went unanswered past its ack deadline. Returns how many of the recent
    /// commands went unanswered if that opens the breaker now.
    pub fn unanswered(
        &mut self,
        now_ms: i64,
        min_commands: u32,
        ratio: f64,
        probe_ms: i64,
    ) -> Option<usize> {
        self.push(false);
        if self.open.is_some() || min_commands == 0 {
            return None;
        }
        let unanswered = self.recent.iter().filter(|a| !**a).count();
        let judged = self.recent.len();
        if judged >= min_commands as usize && unanswered as f64 >= ratio * judged as f64 - 1e-9 {
            self.open = Some((now_ms, now_ms + probe_ms));
            return Some(unanswered);
        }
        None
    }

    /// Whether the breaker stops a new command at `now_ms`. While open, one command passes
    /// per probe interval: its answer closes the breaker.
    pub fn blocks(&mut self, now_ms: i64, probe_ms: i64) -> bool {
        match &mut self.open {
            None => false,
            Some((_, next_probe)) if now_ms >= *next_probe => {
                *next_probe = now_ms + probe_ms;
                false
            }
            Some(_) => true,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    fn push(&mut self, answered: bool) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(answered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_escalates_once_per_episode_and_drains() {
        let mut h = HeldBack::default();
        h.hold("a", "p", Guardrail::BlastRadius, 1_000);
        h.hold("b", "p", Guardrail::BlastRadius, 2_000);
        h.hold("c", "q", Guardrail::RateLimit, 3_000);
        assert_eq!(h.check(60_000, 60_000), None, "not waited long enough");
        let e = h.check(61_000, 60_000).expect("escalates");
        assert_eq!(
            e,
            Episode::HeldBack {
                waiting: 3,
                guardrail: Guardrail::BlastRadius,
                since_ms: 1_000,
                policy: "p".into()
            }
        );
        // Held again: keeps its first time; no second escalation in the episode.
        h.hold("a", "p", Guardrail::BlastRadius, 70_000);
        assert_eq!(h.check(200_000, 60_000), None);
        h.release("a", "p");
        h.retain(|s, _| s != "b");
        h.release("c", "q");
        assert_eq!(
            h.check(200_001, 60_000),
            Some(Episode::Drained { since_ms: 1_000 })
        );
        assert_eq!(h.check(200_002, 60_000), None);
    }

    #[test]
    fn breaker_opens_on_most_unanswered_probes_and_closes_on_an_answer() {
        let mut b = ActuatorBreaker::default();
        b.answered();
        assert_eq!(b.close(), None);
        for i in 0..3 {
            assert_eq!(b.unanswered(i, 5, 0.8, 1_000), None, "too few judged");
        }
        // 4 of 5 unanswered: 0.8.
        assert_eq!(b.unanswered(10, 5, 0.8, 1_000), Some(4));
        assert!(b.is_open());
        assert!(b.blocks(500, 1_000));
        assert!(!b.blocks(1_010, 1_000), "a probe passes");
        assert!(b.blocks(1_011, 1_000), "one probe per interval");
        assert_eq!(b.unanswered(2_000, 5, 0.8, 1_000), None, "already open");
        assert_eq!(b.close(), Some(10));
        assert!(!b.blocks(2_001, 1_000));
        // The outage's history is forgotten: one more timeout does not reopen it.
        assert_eq!(b.unanswered(3_000, 5, 0.8, 1_000), None);
    }
}
