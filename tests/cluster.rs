//! Limits and inhibition across instances (issue #23), on a simulated control topic: several
//! controllers, each owning its partitions, exchange their action records through one ordered
//! log (partition 0 of the control topic) that each reads at its own pace.

use std::collections::BTreeMap;

use proptest::prelude::*;
use segloop::controller::{ActionRecord, Cluster, Controller, Effects};
use segloop::policy::PolicySet;

#[path = "common/windows.rs"]
mod windows;
use windows::{window, W};
const HOLD: i64 = 200;

fn policies(max_in_flight: u32, per_minute: u32) -> PolicySet {
    PolicySet::parse(
        &format!(
            r#"
[guardrails]
max_in_flight = {max_in_flight}
max_actions_per_minute = {per_minute}
blast_radius = 1.0
flap_max_actions = 10
flap_window = "1h"
max_action_staleness = "1m"

[[policies]]
name = "errors"
segments = "**"
when = "mean(error) > 0.5"
for = 1
clear_for = 2
action = "rollback"
cooldown = "1s"
ack_timeout = "1h"
verify_within = "1h"
max_attempts = 2
backoff = "5s"
backoff_max = "20s"
escalate = "page"
"#
        ),
        "test.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// One instance: its controller, its partition, how far it read the log, its commands.
struct Instance {
    c: Controller,
    partition: i32,
    read: usize,
    fx: Effects,
    commands: Vec<String>,
    suppressed: Vec<String>,
}

/// Instances sharing one ordered log of action records.
struct Sim {
    instances: Vec<Instance>,
    log: Vec<(String, ActionRecord)>,
    now: i64,
}

impl Sim {
    fn new(n: usize, set: &PolicySet) -> Sim {
        let now = 2 * W + 1_000;
        let mut instances: Vec<Instance> = (0..n)
            .map(|i| {
                let mut c = Controller::new(set.clone());
                c.assign(i as i32);
                c.set_cluster(Cluster::new(&format!("i{i}"), 1, HOLD));
                Instance {
                    c,
                    partition: i as i32,
                    read: 0,
                    fx: Effects::default(),
                    commands: Vec::new(),
                    suppressed: Vec::new(),
                }
            })
            .collect();
        for (i, inst) in instances.iter_mut().enumerate() {
            for j in (0..n).filter(|&j| j != i) {
                inst.c.on_peer(&format!("i{j}"), Some((1, now, 0)));
            }
        }
        Sim {
            instances,
            log: Vec::new(),
            now,
        }
    }

    /// What instance `i` did: its records to the log, its commands and suppressions noted.
    fn settle(&mut self, i: usize) {
        let inst = &mut self.instances[i];
        self.log.extend(inst.c.take_action_records(self.now));
        for c in inst.fx.commands.drain(..) {
            inst.commands.push(c.segment);
        }
        for d in inst.fx.decisions.drain(..) {
            if let Some(g) = d.guardrail {
                inst.suppressed.push(format!("{}:{g}", d.segment));
            }
        }
    }

    /// A breaching window of `segment` closes on instance `i`.
    fn breach(&mut self, i: usize, segment: &str) {
        let inst = &mut self.instances[i];
        let w = window(segment, inst.partition, W, 1.0);
        inst.c
            .on_window(&w, &BTreeMap::new(), self.now, &mut inst.fx);
        self.settle(i);
    }

    /// Instance `i` reads the next record of the log; false when it read them all.
    fn deliver(&mut self, i: usize) -> bool {
        let inst = &mut self.instances[i];
        let Some((segment, record)) = self.log.get(inst.read).cloned() else {
            return false;
        };
        inst.read += 1;
        inst.c
            .on_action_record(&segment, Some(record), self.now, &mut inst.fx);
        self.settle(i);
        true
    }

    fn tick(&mut self, i: usize, ms: i64) {
        self.now += ms;
        let inst = &mut self.instances[i];
        inst.c.tick(self.now, &mut inst.fx);
        self.settle(i);
    }

    /// Every instance reads the whole log and waits out the hold.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            for i in 0..self.instances.len() {
                while self.deliver(i) {
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        for i in 0..self.instances.len() {
            self.tick(i, HOLD);
        }
        for i in 0..self.instances.len() {
            while self.deliver(i) {}
        }
    }

    fn in_flight(&self) -> usize {
        self.instances.iter().map(|i| i.c.in_flight().count()).sum()
    }

    fn commands(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .instances
            .iter()
            .flat_map(|i| i.commands.clone())
            .collect();
        all.sort();
        all
    }
}

#[derive(Debug, Clone)]
enum Op {
    Breach(usize, usize),
    Deliver(usize),
    Tick(usize, i64),
}

fn arb_ops(n: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            (0..n, 0..6usize).prop_map(|(i, s)| Op::Breach(i, s)),
            (0..n).prop_map(Op::Deliver),
            (0..n, 0..150i64).prop_map(|(i, ms)| Op::Tick(i, ms)),
        ],
        1..80,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any interleaving of firings and reads of the control topic: the commands in flight over
    /// every instance never exceed `max_in_flight`, and once every instance has read
    /// everything, the limit is used (no two claims void each other into doing nothing).
    #[test]
    fn max_in_flight_is_exact_across_instances(
        n in 2..4usize,
        limit in 1..4u32,
        ops in arb_ops(3),
    ) {
        let set = policies(limit, 1000);
        let mut sim = Sim::new(n, &set);
        let mut breached = std::collections::BTreeSet::new();
        for op in ops {
            match op {
                Op::Breach(i, s) => {
                    let i = i % n;
                    let seg = format!("p{i}/s{s}");
                    breached.insert(seg.clone());
                    sim.breach(i, &seg);
                }
                Op::Deliver(i) => {
                    sim.deliver(i % n);
                }
                Op::Tick(i, ms) => sim.tick(i % n, ms),
            }
            prop_assert!(sim.in_flight() <= limit as usize, "{} in flight, limit {limit}", sim.in_flight());
        }
        sim.drain();
        // Firings voided by a full budget wait for their next window: give every breached
        // segment one more, and read everything again.
        for seg in &breached {
            let i: usize = seg[1..2].parse().unwrap();
            sim.breach(i, seg);
        }
        sim.drain();
        prop_assert!(sim.in_flight() <= limit as usize);
        prop_assert_eq!(sim.in_flight(), breached.len().min(limit as usize), "the limit is used");
    }
}

#[test]
fn a_limit_below_the_instance_count_lets_exactly_that_many_act() {
    let set = policies(1, 1000);
    let mut sim = Sim::new(2, &set);
    // Both fire before either reads anything: both claims are in the log.
    sim.breach(0, "a/x");
    sim.breach(1, "b/y");
    assert!(sim.commands().is_empty(), "a claim waits for its read-back");
    sim.drain();
    assert_eq!(sim.commands(), ["a/x"], "the first claim in the log wins");
    assert_eq!(sim.instances[1].suppressed, ["b/y:max_in_flight"]);
}

#[test]
fn an_ancestor_on_another_instance_inhibits_its_children_breaching_in_the_same_window() {
    let set = policies(100, 1000);
    let mut sim = Sim::new(2, &set);
    // The children close first (instance 1), the parent a moment later (instance 0).
    sim.breach(1, "cell/ep1");
    sim.breach(1, "cell/ep2");
    assert!(
        sim.deliver(1) && sim.deliver(1),
        "instance 1 reads its claims back"
    );
    assert!(sim.commands().is_empty(), "children wait out the hold");
    sim.breach(0, "cell");
    sim.drain();
    assert_eq!(sim.commands(), ["cell"], "the ancestor wins");
    let mut inhibited = sim.instances[1].suppressed.clone();
    inhibited.sort();
    assert_eq!(inhibited, ["cell/ep1:inhibited", "cell/ep2:inhibited"]);
    // Once under action, it inhibits new firings of its children at once.
    sim.breach(1, "cell/ep3");
    sim.drain();
    assert_eq!(sim.commands(), ["cell"]);
}

#[test]
fn a_child_whose_hold_passed_before_its_ancestor_fired_acts() {
    let set = policies(100, 1000);
    let mut sim = Sim::new(2, &set);
    sim.breach(1, "cell/ep1");
    sim.deliver(1);
    sim.tick(1, HOLD);
    assert_eq!(
        sim.commands(),
        ["cell/ep1"],
        "the hold bounds a child's wait"
    );
    // An ancestor firing later acts as well (a parent never waits for its children).
    sim.breach(0, "cell");
    sim.drain();
    assert_eq!(sim.commands(), ["cell", "cell/ep1"]);
}

#[test]
fn the_rate_limit_counts_the_other_instances_commands() {
    let set = policies(100, 2);
    let mut sim = Sim::new(2, &set);
    for s in ["a/1", "a/2"] {
        sim.breach(0, s);
    }
    sim.drain();
    assert_eq!(sim.commands().len(), 2);
    sim.breach(1, "b/1");
    sim.drain();
    assert_eq!(
        sim.commands().len(),
        2,
        "the minute's two commands were spent elsewhere"
    );
    assert_eq!(sim.instances[1].suppressed, ["b/1:rate_limit"]);
}

#[test]
fn records_of_a_stopped_or_restarted_instance_stop_counting() {
    let set = policies(1, 1000);
    let mut sim = Sim::new(2, &set);
    sim.breach(0, "a/x");
    sim.drain();
    assert_eq!(sim.commands(), ["a/x"]);
    // Instance 0 restarts (a new incarnation): its old record no longer holds the budget.
    let now = sim.now;
    sim.instances[1].c.on_peer("i0", Some((2, now, 0)));
    sim.breach(1, "b/y");
    sim.drain();
    assert_eq!(sim.commands(), ["a/x", "b/y"]);
}

#[test]
fn alone_an_instance_fires_at_once_and_publishes_what_it_has_under_action() {
    let set = policies(1, 1000);
    let mut sim = Sim::new(1, &set);
    sim.breach(0, "a/x");
    assert_eq!(sim.commands(), ["a/x"], "no claim without other instances");
    assert_eq!(sim.log.len(), 1);
    assert_eq!(sim.log[0].0, "a/x");
    assert_eq!(sim.log[0].1.acting, ["errors"]);
}
