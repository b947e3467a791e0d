//! Judging a closed window that moves no loop, against its partition's state alone.
//!
//! Nine in ten windows change nothing: a segment with no loop state whose window breaches no
//! policy. Judging one reads and writes only its partition's [`PartitionState`] (the segment's
//! small [`Seen`] entry), never what a guardrail shares across partitions, so the shard that
//! owns the partition judges it on its own thread while its round runs ([`Controller::lend`]).
//! Every other window (a segment with state, or a policy whose condition holds) is judged by
//! the one controller between rounds, where firings meet the shared, exact guardrails.
//!
//! One thing a quiet window does change that a firing reads: the number of segments known (the
//! blast radius is a fraction of it). A shard counts the segments it adds (`fresh`), and the
//! driver tells the controller how many were added *after* the window it judges now
//! ([`Controller::set_known_ahead`]), so a firing counts exactly the segments judged before
//! it, as if every window were judged in order on one thread.

use std::collections::BTreeMap;
use std::sync::Arc;

use smallvec::SmallVec;

use super::{Controller, GlobCache, PartitionState, Seen};
use crate::policy::{Policy, PolicySet};
use crate::window::WindowSummary;

/// Indexes of the policies a window moves.
pub(super) type Picked = SmallVec<[usize; 8]>;

/// The policies that judge a window of one segment, under one policy-set generation.
pub(super) struct Selector<'a> {
    pub policies: &'a [Policy],
    pub generation: u64,
    pub w: &'a WindowSummary,
    pub labels: &'a BTreeMap<String, String>,
}

impl Selector<'_> {
    /// The segment's glob matches, remembered in `cache` for one generation (at most 64
    /// policies are remembered; `None`: more, matched every window).
    pub(super) fn globs(&self, cache: &mut GlobCache) -> Option<u64> {
        (self.policies.len() <= 64).then(|| {
            cache.get(self.generation, || {
                self.policies
                    .iter()
                    .enumerate()
                    .filter(|(_, pol)| pol.selects_segment(&self.w.segment))
                    .fold(0u64, |bits, (i, _)| bits | (1 << i))
            })
        })
    }

    /// The policies this window moves (selected ones whose condition holds, or whose loop is
    /// not at rest: `moving`), and how many policies selected it (the evaluations).
    pub(super) fn pick(&self, globs: Option<u64>, moving: impl Fn(&str) -> bool) -> (Picked, u64) {
        let w = self.w;
        let mut selected = 0;
        let picked = self
            .policies
            .iter()
            .enumerate()
            .filter(|(i, pol)| {
                pol.window.as_deref() == w.group.as_deref()
                    && globs.map_or_else(|| pol.selects_segment(&w.segment), |g| g & (1 << i) != 0)
                    && pol.selects_labels(self.labels)
            })
            .filter(|(_, pol)| {
                selected += 1;
                pol.when.holds(w) || moving(&pol.name)
            })
            .map(|(i, _)| i)
            .collect();
        (picked, selected)
    }
}

/// A window of a segment with no state, judged against its partition's state.
pub(super) enum Quiet {
    /// Judged before a restart (re-read): nothing to do.
    Replayed,
    /// Judged: no loop moves (`new`: the segment was not known before).
    Judged { evaluations: u64, new: bool },
    /// A loop moves, or a window group's end is to be kept: the segment needs its state.
    Moves,
}

impl PartitionState {
    /// Judges a window of a segment that has no state here ([`Quiet`]). Changes only the
    /// segment's [`Seen`] entry, and only when nothing moves.
    pub(super) fn judge_quiet(&mut self, sel: &Selector<'_>) -> Quiet {
        let w = sel.w;
        let quiet = |picked: &Picked| picked.is_empty() && w.group.is_none();
        if let Some(seen) = self.seen.get_mut(&*w.segment) {
            if w.group.is_none() && w.end_ms <= seen.last_window_end_ms {
                return Quiet::Replayed;
            }
            let globs = sel.globs(&mut seen.globs);
            let (picked, evaluations) = sel.pick(globs, |_| false);
            if !quiet(&picked) {
                return Quiet::Moves;
            }
            seen.last_window_end_ms = w.end_ms;
            return Quiet::Judged {
                evaluations,
                new: false,
            };
        }
        let mut cache = GlobCache::default();
        let globs = sel.globs(&mut cache);
        let (picked, evaluations) = sel.pick(globs, |_| false);
        if !quiet(&picked) {
            return Quiet::Moves;
        }
        self.seen.insert(
            w.segment.clone(),
            Seen {
                last_window_end_ms: w.end_ms,
                globs: cache,
            },
        );
        Quiet::Judged {
            evaluations,
            new: true,
        }
    }
}

/// What a shard's judging of quiet windows counted, merged into the controller's statistics
/// between rounds ([`Controller::add_judged`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Judged {
    pub windows: u64,
    pub evaluations: u64,
    pub replayed: u64,
    /// Segments added (first judged) so far in the round.
    pub fresh: usize,
}

/// What a shard needs of the controller as a whole to judge quiet windows: the policies and
/// their generation (read only while the round runs).
pub struct JudgeShared {
    policies: Arc<PolicySet>,
    generation: u64,
}

/// One owned partition's controller state, lent to the shard that owns the partition for a
/// round ([`Controller::lend`]).
pub struct PartitionJudge<'a> {
    partition: i32,
    state: &'a mut PartitionState,
}

/// A window a [`PartitionJudge`] was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triage {
    /// Judged here: no loop moved; the driver hands the window to its sink with no effects.
    Judged,
    /// For the controller, between rounds; `stated`: the segment has state (its later windows
    /// this round go there anyway).
    Controller { stated: bool },
}

impl PartitionJudge<'_> {
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Judges `w` here if it moves no loop; counts into `counts`.
    pub fn judge(
        &mut self,
        shared: &JudgeShared,
        w: &WindowSummary,
        labels: &BTreeMap<String, String>,
        counts: &mut Judged,
    ) -> Triage {
        if self.state.segments.contains_key(&*w.segment) {
            return Triage::Controller { stated: true };
        }
        let sel = Selector {
            policies: &shared.policies.policies,
            generation: shared.generation,
            w,
            labels,
        };
        match self.state.judge_quiet(&sel) {
            Quiet::Replayed => {
                counts.windows += 1;
                counts.replayed += 1;
                Triage::Judged
            }
            Quiet::Judged { evaluations, new } => {
                counts.windows += 1;
                counts.evaluations += evaluations;
                counts.fresh += usize::from(new);
                Triage::Judged
            }
            Quiet::Moves => Triage::Controller { stated: false },
        }
    }
}

impl Controller {
    /// Lends every owned partition's state out, for shards to judge their quiet windows side
    /// by side (module [`triage`](self)); nothing else of the controller runs meanwhile.
    pub fn lend(&mut self) -> (JudgeShared, Vec<PartitionJudge<'_>>) {
        let shared = JudgeShared {
            policies: Arc::clone(&self.policies),
            generation: self.generation,
        };
        let parts = self
            .partitions
            .iter_mut()
            .map(|(&partition, state)| PartitionJudge { partition, state })
            .collect();
        (shared, parts)
    }

    /// Adds what shards judged on their own to the statistics.
    pub fn add_judged(&mut self, counts: &Judged) {
        self.stats.windows += counts.windows;
        self.stats.evaluations += counts.evaluations;
        self.stats.windows_replayed += counts.replayed;
    }

    /// Segments already known here that a window judged now would not yet know if every
    /// window were judged in order (added by shards later in the round): left out of the
    /// blast radius. Zero outside a round's judging.
    pub fn set_known_ahead(&mut self, n: usize) {
        self.known_ahead = n;
    }
}
