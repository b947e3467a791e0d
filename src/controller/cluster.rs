//! Across instances: what the other members of the group have under action, learned from
//! their records on the control topic, and this instance's claims.
//!
//! Every instance publishes its segments under action (`action/<segment>`, [`ActionRecord`])
//! on partition 0 of the control topic, so every reader sees all of them in one order. With
//! other live instances, a firing that passes the guardrails is first *claimed*: a record
//! naming the claim goes out, and the command is decided when the claim is read back. At that
//! moment the reader has seen exactly the records written before the claim, so the budgets
//! (in flight, per policy, blast radius, rate) count every claim and action ahead of it and no
//! instance can count past a limit on records it has not seen: the limits are exact across
//! instances. A claim holds its budget while it waits. A child segment (`a/b` under `a`) whose
//! ancestor is owned by another instance also waits out [`Cluster::hold_ms`] after claiming,
//! so an ancestor breaching in the same window wins (the child is inhibited).
//!
//! Nothing here does I/O: records come in through [`Controller::on_action_record`] and
//! [`Controller::on_peer`], and go out through [`Controller::take_action_records`].

use std::collections::{HashMap, VecDeque};

use super::*;

/// Control-topic key prefix of a segment's action record.
pub const ACTION_PREFIX: &str = "action/";

/// An instance record written within this long is a live instance (three heartbeats and a
/// commit interval).
pub const LIVE_FOR_MS: i64 = 35_000;

/// A claim not read back within this long is dropped (its firing is tried again).
pub const CLAIM_TIMEOUT_MS: i64 = 10_000;

/// What one instance has under action on one segment (key `action/<segment>` on partition 0
/// of the control topic). Every change of the segment's status writes a new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    #[serde(default = "one")]
    pub version: u32,
    pub instance: String,
    /// The writer's start time: records of an earlier run of the same instance are dead.
    pub incarnation: i64,
    /// Policies under action on the segment (command in flight, verifying, in backoff).
    #[serde(default)]
    pub acting: Vec<String>,
    /// Firings claimed and not decided yet: (policy, claim number).
    #[serde(default)]
    pub claims: Vec<(String, u64)>,
    pub at_ms: i64,
}

fn one() -> u32 {
    1
}

impl ActionRecord {
    /// Nothing under action, nothing claimed: the segment is released.
    pub fn is_released(&self) -> bool {
        self.acting.is_empty() && self.claims.is_empty()
    }

    fn counts_policy(&self, policy: Option<&str>) -> usize {
        let acting = self
            .acting
            .iter()
            .filter(|p| policy.is_none_or(|x| x == p.as_str()));
        let claimed = self
            .claims
            .iter()
            .filter(|(p, _)| policy.is_none_or(|x| x == p.as_str()))
            .filter(|(p, _)| !self.acting.contains(p));
        acting.count() + claimed.count()
    }
}

/// Another instance as its heartbeat says it.
#[derive(Debug, Clone, PartialEq)]
struct Peer {
    incarnation: i64,
    seen_ms: i64,
    known_segments: usize,
}

/// A segment's status as last published: its partition, policies acting, claims.
type Published = (i32, Vec<String>, Vec<(String, u64)>);

/// A firing of this instance waiting for its claim.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pending {
    pub(super) partition: i32,
    pub(super) claim: u64,
    pub(super) since_ms: i64,
    /// Read back and let through the budgets: waits out the ancestor hold.
    pub(super) confirmed: bool,
}

/// This instance's view of the others (see the module doc). `None` in the controller: a
/// replay, or a run that shares nothing.
pub struct Cluster {
    me: String,
    incarnation: i64,
    /// How long a child with an ancestor owned elsewhere waits after claiming.
    hold_ms: i64,
    peers: HashMap<String, Peer>,
    /// The latest record of another instance per segment, released ones dropped.
    remote: BTreeMap<String, ActionRecord>,
    /// When other instances claimed (the rate limit counts their last minute).
    remote_claims: VecDeque<i64>,
    /// Highest claim number seen per (instance, incarnation).
    claims_seen: HashMap<String, (i64, u64)>,
    pub(super) pending: BTreeMap<(Arc<str>, String), Pending>,
    next_claim: u64,
    /// What was last published per segment: its partition, policies acting, claims.
    published: BTreeMap<Arc<str>, Published>,
    /// Segments whose status may have changed since the last publication.
    pub(super) dirty: BTreeSet<(i32, Arc<str>)>,
    /// Records to write, in order.
    out: Vec<(String, ActionRecord)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("peers", &self.peers.len())
            .field("remote", &self.remote.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// `me`: this instance's id; `incarnation`: its start time; `hold_ms`: the ancestor hold
    /// (the time a record takes to be seen by the others).
    pub fn new(me: &str, incarnation: i64, hold_ms: i64) -> Self {
        Cluster {
            me: me.to_string(),
            incarnation,
            hold_ms: hold_ms.max(0),
            peers: HashMap::new(),
            remote: BTreeMap::new(),
            remote_claims: VecDeque::new(),
            claims_seen: HashMap::new(),
            pending: BTreeMap::new(),
            next_claim: 0,
            published: BTreeMap::new(),
            dirty: BTreeSet::new(),
            out: Vec::new(),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn hold_ms(&self) -> i64 {
        self.hold_ms
    }

    /// Another instance's heartbeat (`None`: its tombstone, it stopped).
    pub(super) fn on_peer(&mut self, id: &str, heartbeat: Option<(i64, i64, usize)>) {
        if id == self.me {
            return;
        }
        match heartbeat {
            Some((incarnation, seen_ms, known_segments)) => {
                let stale = self
                    .peers
                    .get(id)
                    .is_some_and(|p| p.incarnation > incarnation);
                if !stale {
                    self.peers.insert(
                        id.to_string(),
                        Peer {
                            incarnation,
                            seen_ms,
                            known_segments,
                        },
                    );
                }
            }
            None => {
                self.peers.remove(id);
                self.remote.retain(|_, r| r.instance != id);
            }
        }
    }

    /// Whether a record still speaks for a running instance: its writer's latest heartbeat is
    /// of the same run and fresh, or (no heartbeat of that run seen yet) the record is.
    fn live(&self, r: &ActionRecord, now_ms: i64) -> bool {
        match self.peers.get(&r.instance) {
            Some(p) if p.incarnation == r.incarnation => now_ms - p.seen_ms < LIVE_FOR_MS,
            Some(p) if p.incarnation > r.incarnation => false,
            _ => now_ms - r.at_ms < LIVE_FOR_MS,
        }
    }

    /// Other instances are running: firings are claimed.
    pub fn shared(&self, now_ms: i64) -> bool {
        self.peers
            .values()
            .any(|p| now_ms - p.seen_ms < LIVE_FOR_MS)
            || self.remote.values().any(|r| self.live(r, now_ms))
    }

    /// Live instances besides this one.
    pub fn peers(&self, now_ms: i64) -> usize {
        self.peers
            .values()
            .filter(|p| now_ms - p.seen_ms < LIVE_FOR_MS)
            .count()
    }

    /// A record of another instance (`None`: a tombstone). Returns this instance's claim it
    /// reads back, if it is one: (segment, policy, claim).
    pub(super) fn on_record(
        &mut self,
        segment: &str,
        record: Option<ActionRecord>,
    ) -> Vec<(Arc<str>, String, u64)> {
        let Some(r) = record else {
            self.remote.remove(segment);
            return Vec::new();
        };
        if r.instance == self.me {
            if r.incarnation != self.incarnation {
                return Vec::new();
            }
            return r
                .claims
                .iter()
                .filter_map(|(policy, claim)| {
                    let key = (Arc::from(segment), policy.clone());
                    self.pending
                        .get(&key)
                        .filter(|p| p.claim == *claim && !p.confirmed)
                        .map(|_| (key.0, key.1, *claim))
                })
                .collect();
        }
        let seen = self
            .claims_seen
            .entry(r.instance.clone())
            .or_insert((r.incarnation, 0));
        if seen.0 != r.incarnation {
            *seen = (r.incarnation, 0);
        }
        for (_, claim) in &r.claims {
            if *claim > seen.1 {
                seen.1 = *claim;
                self.remote_claims.push_back(r.at_ms);
            }
        }
        if r.is_released() {
            // Only its writer releases a segment: a late release from an old owner leaves the
            // new owner's record.
            if self
                .remote
                .get(segment)
                .is_some_and(|x| x.instance == r.instance)
            {
                self.remote.remove(segment);
            }
        } else {
            self.remote.insert(segment.to_string(), r);
        }
        Vec::new()
    }

    /// Another live instance has `segment` under action (or claimed).
    pub(super) fn remote_under_action(&self, segment: &str, now_ms: i64) -> bool {
        self.remote
            .get(segment)
            .is_some_and(|r| self.live(r, now_ms))
    }

    /// Commands in flight or claimed on other live instances (of `policy`, or of all).
    pub(super) fn remote_in_flight(&self, policy: Option<&str>, now_ms: i64) -> usize {
        self.remote
            .values()
            .filter(|r| self.live(r, now_ms))
            .map(|r| r.counts_policy(policy))
            .sum()
    }

    /// Segments under action or claimed on other live instances.
    pub(super) fn remote_segments(&self, now_ms: i64) -> usize {
        self.remote
            .values()
            .filter(|r| self.live(r, now_ms))
            .count()
    }

    /// Segments known by the other live instances (their last heartbeat).
    pub(super) fn remote_known(&self, now_ms: i64) -> usize {
        self.peers
            .values()
            .filter(|p| now_ms - p.seen_ms < LIVE_FOR_MS)
            .map(|p| p.known_segments)
            .sum()
    }

    /// Claims of other instances within the last minute (each a command the rate pays for).
    pub(super) fn remote_claims_last_minute(&mut self, now_ms: i64) -> usize {
        while self
            .remote_claims
            .front()
            .is_some_and(|&t| now_ms - t >= 60_000)
        {
            self.remote_claims.pop_front();
        }
        self.remote_claims.len()
    }

    /// Claims read back and waiting out the hold: budget they hold (of `policy`, or all).
    pub(super) fn reserved(&self, policy: Option<&str>) -> usize {
        self.pending
            .iter()
            .filter(|((_, p), w)| w.confirmed && policy.is_none_or(|x| x == p.as_str()))
            .count()
    }

    /// The ancestor of `segment` another live instance has under action, if any.
    pub(super) fn remote_ancestor<'a>(&self, segment: &'a str, now_ms: i64) -> Option<&'a str> {
        let mut prefix = segment;
        while let Some(i) = prefix.rfind('/') {
            prefix = &prefix[..i];
            if self.remote_under_action(prefix, now_ms) {
                return Some(prefix);
            }
        }
        None
    }

    /// A new claim of `policy` on `segment`.
    pub(super) fn claim(&mut self, partition: i32, segment: &str, policy: &str, now_ms: i64) {
        self.next_claim += 1;
        self.pending.insert(
            (Arc::from(segment), policy.to_string()),
            Pending {
                partition,
                claim: self.next_claim,
                since_ms: now_ms,
                confirmed: false,
            },
        );
        self.dirty.insert((partition, Arc::from(segment)));
    }

    /// Drops a pending claim (decided, or void); its segment is published again.
    pub(super) fn unclaim(&mut self, segment: &str, policy: &str) {
        if let Some(p) = self
            .pending
            .remove(&(Arc::from(segment), policy.to_string()))
        {
            self.dirty.insert((p.partition, Arc::from(segment)));
        }
    }

    /// A partition left: its claims are void, its segments released.
    pub(super) fn revoke(&mut self, partition: i32) {
        self.pending.retain(|_, p| p.partition != partition);
        let gone: Vec<Arc<str>> = self
            .published
            .iter()
            .filter(|(_, p)| p.0 == partition)
            .map(|(s, _)| s.clone())
            .collect();
        for s in gone {
            self.dirty.insert((partition, s));
        }
    }

    /// Publishes `segment`'s status when it changed: `acting` are its policies under action.
    pub(super) fn publish(
        &mut self,
        partition: i32,
        segment: &Arc<str>,
        acting: Vec<String>,
        now_ms: i64,
    ) {
        let claims: Vec<(String, u64)> = self
            .pending
            .range((segment.clone(), String::new())..)
            .take_while(|((s, _), _)| s == segment)
            .map(|((_, p), w)| (p.clone(), w.claim))
            .collect();
        let status = (partition, acting, claims);
        let before = self.published.get(segment);
        let released = status.1.is_empty() && status.2.is_empty();
        if before == Some(&status) || (before.is_none() && released) {
            return;
        }
        let (_, acting, claims) = status.clone();
        if released {
            self.published.remove(segment);
        } else {
            self.published.insert(segment.clone(), status);
        }
        self.out.push((
            segment.to_string(),
            ActionRecord {
                version: RECORD_VERSION,
                instance: self.me.clone(),
                incarnation: self.incarnation,
                acting,
                claims,
                at_ms: now_ms,
            },
        ));
    }

    pub(super) fn take_out(&mut self) -> Vec<(String, ActionRecord)> {
        std::mem::take(&mut self.out)
    }
}

impl Controller {
    /// Shares limits and inhibition with the other instances of the group through `cluster`.
    pub fn set_cluster(&mut self, cluster: Cluster) {
        self.cluster = Some(cluster);
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Another instance's heartbeat: (incarnation, seen at, segments it knows); `None`: it
    /// stopped.
    pub fn on_peer(&mut self, id: &str, heartbeat: Option<(i64, i64, usize)>) {
        if let Some(c) = &mut self.cluster {
            c.on_peer(id, heartbeat);
        }
    }

    /// An `action/<segment>` record read from the control topic (`None`: a tombstone). This
    /// instance's own claim, read back, is decided here.
    pub fn on_action_record(
        &mut self,
        segment: &str,
        record: Option<ActionRecord>,
        now_ms: i64,
        out: &mut Effects,
    ) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let ctx = Ctx {
            now_ms,
            window: None,
        };
        for (segment, policy, _) in c.on_record(segment, record) {
            self.confirm(&segment, &policy, &ctx, out);
        }
    }

    /// The action records due since the last call: every segment whose status (policies under
    /// action, claims) changed.
    pub fn take_action_records(&mut self, now_ms: i64) -> Vec<(String, ActionRecord)> {
        let Some(c) = &mut self.cluster else {
            return Vec::new();
        };
        for (partition, segment) in std::mem::take(&mut c.dirty) {
            let acting: Vec<String> = self
                .partitions
                .get(&partition)
                .and_then(|p| p.segments.get(&segment))
                .map(|s| {
                    s.loops
                        .iter()
                        .filter(|(_, l)| l.phase.under_action())
                        .map(|(name, _)| name.clone())
                        .collect()
                })
                .unwrap_or_default();
            c.publish(partition, &segment, acting, now_ms);
        }
        c.take_out()
    }

    /// Whether `policy`'s loop on `segment` still wants a command.
    fn still_firing(&self, partition: i32, segment: &str, policy: &str) -> bool {
        self.partitions
            .get(&partition)
            .and_then(|p| p.segments.get(segment))
            .and_then(|s| s.loops.get(policy))
            .is_some_and(|l| matches!(l.phase, Phase::Breaching | Phase::Backoff))
    }

    /// An ancestor of `segment` is not known here: owned by another instance (or quiet).
    fn ancestor_elsewhere(&self, segment: &str) -> bool {
        let mut prefix = segment;
        while let Some(i) = prefix.rfind('/') {
            prefix = &prefix[..i];
            if !self.partitions.values().any(|p| p.knows(prefix)) {
                return true;
            }
        }
        false
    }

    /// This instance's claim is read back: every record before it has been read, so the
    /// guardrails decide now, exactly. Let through, it fires, or first waits out the ancestor
    /// hold (its budget reserved).
    fn confirm(&mut self, segment: &str, policy: &str, ctx: &Ctx<'_>, out: &mut Effects) {
        let Some(c) = &self.cluster else {
            return;
        };
        let Some(p) = c.pending.get(&(Arc::from(segment), policy.to_string())) else {
            return;
        };
        let (partition, since_ms, hold_ms) = (p.partition, p.since_ms, c.hold_ms());
        let pi = self.policy_index(policy);
        let Some(pi) = pi.filter(|_| self.still_firing(partition, segment, policy)) else {
            self.cluster_mut().unclaim(segment, policy);
            return;
        };
        let set = Arc::clone(&self.policies);
        let rule = &set.policies[pi];
        if let Some(g) = self.guardrail(rule, partition, segment, ctx) {
            self.cluster_mut().unclaim(segment, policy);
            self.suppress(pi, partition, segment, g, ctx, out);
            return;
        }
        if self.ancestor_elsewhere(segment) && ctx.now_ms < since_ms + hold_ms {
            let key = (Arc::from(segment), policy.to_string());
            if let Some(p) = self.cluster_mut().pending.get_mut(&key) {
                p.confirmed = true;
            }
            return;
        }
        self.cluster_mut().unclaim(segment, policy);
        self.emit(pi, partition, segment, ctx, out);
    }

    fn cluster_mut(&mut self) -> &mut Cluster {
        self.cluster.as_mut().expect("called with a cluster")
    }

    /// On the clock: claims that waited out the hold fire (unless an ancestor elsewhere came
    /// under action meanwhile: inhibited); claims never read back are dropped (the loop fires
    /// again on its next window or backoff).
    pub(super) fn tick_claims(&mut self, ctx: &Ctx<'_>, out: &mut Effects) {
        let Some(c) = &self.cluster else {
            return;
        };
        let now = ctx.now_ms;
        let due: Vec<(Arc<str>, String, Pending)> = c
            .pending
            .iter()
            .filter(|(_, p)| {
                if p.confirmed {
                    now >= p.since_ms + c.hold_ms()
                } else {
                    now - p.since_ms >= CLAIM_TIMEOUT_MS
                }
            })
            .map(|((s, pol), p)| (s.clone(), pol.clone(), p.clone()))
            .collect();
        for (segment, policy, p) in due {
            self.cluster_mut().unclaim(&segment, &policy);
            if !p.confirmed {
                self.stats.claims_expired += 1;
                continue;
            }
            let Some(pi) = self
                .policy_index(&policy)
                .filter(|_| self.still_firing(p.partition, &segment, &policy))
            else {
                continue;
            };
            if self.cluster_mut().remote_ancestor(&segment, now).is_some() {
                self.suppress(pi, p.partition, &segment, Guardrail::Inhibited, ctx, out);
            } else {
                self.emit(pi, p.partition, &segment, ctx, out);
            }
        }
    }
}
