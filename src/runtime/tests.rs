//! The runtime's handlers without a broker: the ordered group stream, the delivery sequence,
//! the commit notes, and the core's revoke/assign/transaction handlers.

use super::*;
use proptest::prelude::*;

fn revoked(parts: &[i32]) -> GroupEvent {
    GroupEvent::Revoked {
        parts: parts.to_vec(),
        handover: Handover::Commit(CommitResult::Committed),
    }
}

/// A stream of records given by partition, with events at positions.
fn stream(records: &[i32], events: &[(usize, GroupEvent)]) -> Stream<i32> {
    Stream {
        records: records.to_vec(),
        events: events.to_vec(),
    }
}

#[test]
fn a_batch_without_events_is_one_run_of_records() {
    let (steps, left_out) = stream(&[0, 1, 0], &[]).plan(|p| *p);
    assert_eq!(steps, vec![Step::Records(vec![0, 1, 2])]);
    assert_eq!(left_out, 0);
}

#[test]
fn records_before_a_revoke_of_their_partition_are_left_for_the_new_owner() {
    // p0 p1 | revoke [0] | p1 p1
    let s = stream(&[0, 1, 1, 1], &[(2, revoked(&[0]))]);
    let (steps, left_out) = s.plan(|p| *p);
    assert_eq!(
        steps,
        vec![
            Step::Records(vec![1]),
            Step::Group(revoked(&[0])),
            Step::Records(vec![2, 3]),
        ]
    );
    assert_eq!(left_out, 1);
}

#[test]
fn a_revoke_and_an_assign_in_one_batch_apply_in_order() {
    // p0 p1 | revoke [0, 1] | assign [0] | p0 p0: the records before the revoke are the old
    // assignment's (committed by the callback up to what was processed, re-read by whoever
    // owns them next); those after the assign are the new one's, from its committed offset.
    let s = stream(
        &[0, 1, 0, 0],
        &[(2, revoked(&[0, 1])), (2, GroupEvent::Assigned(vec![0]))],
    );
    let (steps, left_out) = s.plan(|p| *p);
    assert_eq!(
        steps,
        vec![
            Step::Group(revoked(&[0, 1])),
            Step::Group(GroupEvent::Assigned(vec![0])),
            Step::Records(vec![2, 3]),
        ]
    );
    assert_eq!(left_out, 2);
    // Events at the end of a batch (no record after them) still apply, after the records.
    let s = stream(&[1, 1], &[(2, GroupEvent::Assigned(vec![3]))]);
    assert_eq!(
        s.plan(|p| *p).0,
        vec![
            Step::Records(vec![0, 1]),
            Step::Group(GroupEvent::Assigned(vec![3]))
        ]
    );
}

proptest! {
    /// Any batch: every record is applied at most once and in polling order, events keep
    /// their order and sit between the records they came between, and a record is left out
    /// exactly when its partition is revoked after it in the same batch.
    #[test]
    fn any_stream_plans_in_order(
        records in prop::collection::vec(0i32..4, 0..40),
        raw_events in prop::collection::vec((0usize..41, any::<bool>(), prop::collection::vec(0i32..4, 1..3)), 0..5),
    ) {
        let mut events: Vec<(usize, GroupEvent)> = raw_events
            .into_iter()
            .map(|(at, assign, parts)| {
                let at = at.min(records.len());
                (at, if assign { GroupEvent::Assigned(parts) } else { revoked(&parts) })
            })
            .collect();
        events.sort_by_key(|(at, _)| *at);
        let s = stream(&records, &events);
        let (steps, left_out) = s.plan(|p| *p);
        let mut applied = Vec::new();
        let mut seen_events = Vec::new();
        for step in &steps {
            match step {
                Step::Records(which) => {
                    prop_assert!(!which.is_empty());
                    for &i in which {
                        // Every event before record i was applied before it.
                        let before = events.iter().filter(|(at, _)| *at <= i).count();
                        prop_assert_eq!(seen_events.len(), before);
                        applied.push(i);
                    }
                }
                Step::Group(ev) => seen_events.push(ev.clone()),
            }
        }
        prop_assert_eq!(&seen_events, &events.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>());
        prop_assert!(applied.windows(2).all(|w| w[0] < w[1]));
        for (i, p) in records.iter().enumerate() {
            let revoked_later = events.iter().any(|(at, ev)| {
                *at > i && matches!(ev, GroupEvent::Revoked { parts, .. } if parts.contains(p))
            });
            prop_assert_eq!(applied.contains(&i), !revoked_later);
        }
        prop_assert_eq!(left_out, records.len() - applied.len());
    }
}

#[test]
fn a_commit_mark_settles_once_everything_before_it_is_reported() {
    let d = Deliveries::default();
    let a = d.start();
    let b = d.start();
    let mark = d.mark();
    let c = d.start();
    assert_eq!(
        d.settled(mark),
        None,
        "two records before the mark are open"
    );
    d.finish(b, true);
    d.finish(c, false);
    assert_eq!(d.settled(mark), None, "record a is still open");
    d.finish(a, true);
    assert_eq!(
        d.settled(mark),
        Some(true),
        "a failure after the mark does not count"
    );
    assert_eq!(
        d.settled(d.mark()),
        Some(false),
        "c failed before this mark"
    );
    assert_eq!(
        d.settled(d.mark()),
        Some(true),
        "a failure is accounted once"
    );
}

#[test]
fn the_committer_commits_the_newest_settled_note_without_revoked_partitions() {
    let d = Deliveries::default();
    let mut c = Committer::default();
    let a = d.start();
    c.note(d.mark(), vec![(0, 10), (1, 20)]);
    let b = d.start();
    c.note(d.mark(), vec![(0, 15), (1, 25)]);
    assert_eq!(c.ready(&d), None, "nothing acknowledged yet");
    d.finish(a, true);
    c.revoked(&[1]);
    assert_eq!(c.ready(&d), Some(Some(vec![(0, 10)])), "partition 1 left");
    assert_eq!(c.ready(&d), None);
    d.finish(b, false);
    assert_eq!(
        c.ready(&d),
        Some(None),
        "a note behind a failed record is not committed"
    );
    // Notes give way when the producer lags: the newest settled one wins.
    for i in 0..40 {
        c.note(d.mark(), vec![(0, 100 + i)]);
    }
    assert_eq!(c.ready(&d), Some(Some(vec![(0, 139)])));
}

fn core() -> Core {
    let config = Config::default();
    let policies = PolicySet::parse(
        r#"
[[policies]]
name = "errors"
when = "mean(error) > 0.5"
action = "rollback"
"#,
        "test",
    )
    .unwrap();
    let producer = Arc::new(
        kafka::producer_config(&config, &[])
            .create_with_context(ProduceContext::default())
            .unwrap(),
    );
    live::build_core(&config, policies, producer, None, None, false).unwrap()
}

#[test]
fn assign_and_revoke_are_plain_handlers() {
    let mut c = core();
    c.on_assigned(&[0, 1], &[]);
    assert_eq!(c.pipeline.assigned(), &[0, 1]);
    c.restored(
        0,
        Ok((
            Vec::new(),
            PartitionMarks {
                closed_through_ms: Some(60_000),
                dead_lettered_through: None,
            },
        )),
        0.1,
    );
    assert_eq!(c.pipeline.closed_through(0), Some(60_000));
    c.restored(1, Err(anyhow::anyhow!("timed out")), 2.0);
    assert_eq!(c.out.counters.restore_failures, 1);
    assert!(c.fatal.is_none(), "a failed restore is not fatal");
    c.pending_offsets.insert(0, 5);
    c.pending_offsets.insert(1, 7);
    c.on_revoked(&[1], Handover::Commit(CommitResult::Committed));
    assert_eq!(c.pipeline.assigned(), &[0]);
    assert_eq!(
        c.pending_offsets.keys().copied().collect::<Vec<_>>(),
        vec![0]
    );
    assert_eq!(c.out.counters.commits, 1);
    c.on_revoked(&[0], Handover::Commit(CommitResult::Unconfirmed));
    assert_eq!(c.out.counters.commit_errors, 1);
    assert!(c.pipeline.assigned().is_empty());
    assert_eq!(c.out.counters.rebalances, 3);
}

#[test]
fn a_newer_state_format_stops_the_run() {
    let mut c = core();
    c.on_assigned(&[0], &[]);
    c.restored(0, Err(NewerRecord("version 9".into()).into()), 0.0);
    assert_eq!(c.fatal.as_deref(), Some("version 9"));
}

#[test]
fn transaction_outcomes_are_accounted_by_the_core() {
    let mut c = core();
    c.out.txn_windowed = 42;
    c.after_transaction(TxnResult::Committed {
        offsets: true,
        fatal: None,
    });
    assert_eq!(c.out.report.records_windowed, 42);
    assert_eq!(c.out.report.commits, 1);
    assert!(!c.needs_rewind);
    c.on_revoked(
        &[],
        Handover::Transaction(TxnResult::Aborted {
            error: "broker gone".into(),
            fatal: None,
        }),
    );
    assert!(c.needs_rewind, "an aborted transaction rewinds");
    assert!(c.fatal.is_none());
    c.on_assigned(&[2], &[]);
    c.pending_offsets.insert(2, 9);
    c.restart(2);
    assert_eq!(c.pipeline.assigned(), &[2]);
    assert!(
        c.pending_offsets.is_empty(),
        "a restarted partition has nothing to commit"
    );
    c.after_transaction(TxnResult::Fatal("fenced".into()));
    c.after_transaction(TxnResult::Committed {
        offsets: false,
        fatal: Some("cannot begin".into()),
    });
    assert_eq!(
        c.fatal.as_deref(),
        Some("fenced"),
        "the first fatal error is kept"
    );
}

fn record(host: &str, admin: &str, seen_ms: i64) -> instances::InstanceRecord {
    instances::InstanceRecord {
        version: 1,
        transactional_id: "tx-a".into(),
        host: host.into(),
        admin: admin.into(),
        pid: 7,
        started_ms: 0,
        seen_ms,
        known_segments: 0,
    }
}

#[test]
fn a_live_instance_elsewhere_with_the_same_id_is_a_duplicate_but_a_predecessor_is_not() {
    let me = record("pod-a", "0.0.0.0:9464", 100_000);
    let live = 100_000 - 5_000;
    let stale = 100_000 - instances::LIVE_FOR.as_millis() as i64 - 1;
    // Another host, or another admin address on this host: a live duplicate.
    let why = instances::duplicate_of(&me, &record("pod-b", "0.0.0.0:9464", live), 100_000);
    assert!(why.is_some_and(|w| w.contains("tx-a") && w.contains("pod-b") && w.contains("5 s ago")));
    assert!(
        instances::duplicate_of(&me, &record("pod-a", "0.0.0.0:9465", live), 100_000).is_some()
    );
    // The same host and fixed admin address: this instance's predecessor (a restart).
    assert!(
        instances::duplicate_of(&me, &record("pod-a", "0.0.0.0:9464", live), 100_000).is_none()
    );
    // With port 0 nothing says it is the same instance: a duplicate.
    let me0 = record("pod-a", "127.0.0.1:0", 100_000);
    assert!(
        instances::duplicate_of(&me0, &record("pod-a", "127.0.0.1:0", live), 100_000).is_some()
    );
    // Not seen for LIVE_FOR: gone.
    assert!(
        instances::duplicate_of(&me, &record("pod-b", "0.0.0.0:9464", stale), 100_000).is_none()
    );
}

#[test]
fn the_default_transactional_id_is_unique_per_instance() {
    let mut config = Config::default();
    config.kafka.group_id = "g".into();
    config.admin.listen = "0.0.0.0:9464".into();
    // A fixed admin port: stable across restarts, unique on the host.
    assert_eq!(
        instances::default_transactional_id(&config, "pod-a"),
        "g-pod-a-9464"
    );
    assert_ne!(
        instances::default_transactional_id(&config, "pod-a"),
        instances::default_transactional_id(&config, "pod-b")
    );
    // Port 0: unique per instance even inside one process.
    config.admin.listen = "127.0.0.1:0".into();
    let a = instances::default_transactional_id(&config, "h");
    let b = instances::default_transactional_id(&config, "h");
    assert_ne!(a, b);
    assert!(a.starts_with("g-h-p"), "{a}");
}

#[test]
fn the_rebalance_protocol_follows_the_client_properties() {
    let props = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(!cooperative_protocol(&props(&[])));
    assert!(!cooperative_protocol(&props(&[(
        "partition.assignment.strategy",
        "range,roundrobin"
    )])));
    assert!(cooperative_protocol(&props(&[(
        "partition.assignment.strategy",
        "cooperative-sticky"
    )])));
    assert!(cooperative_protocol(&props(&[(
        "group.protocol",
        "consumer"
    )])));
    assert!(!cooperative_protocol(&props(&[(
        "group.protocol",
        "classic"
    )])));
}

#[test]
fn a_waiting_partition_lags_from_its_waiting_record() {
    use super::group::{lag_from, FetchMarks};
    let m = |start| FetchMarks { high: 260, start };
    // Delivered through the end, but stopped at offset 60 of 260: 200 records held back.
    assert_eq!(lag_from(&m(Some(0)), Some(260), Some(60)), Some(200));
    assert_eq!(lag_from(&m(None), None, Some(60)), Some(200));
    assert_eq!(lag_from(&m(Some(0)), Some(250), None), Some(10));
    assert_eq!(lag_from(&m(Some(0)), Some(40), Some(60)), Some(220));
    assert_eq!(lag_from(&m(Some(0)), Some(300), None), Some(0));
}

/// Nothing delivered since the assignment: the lag counts from where reading starts (the
/// committed offset, else the log start). A backlog not yet delivered is behind (it was taken
/// as caught up, and after two measurements the idle advance closed its windows: 2,831
/// on-time records dead-lettered as late in a 100,000-segment bench); a quiet restart,
/// committed at the end, is caught up; where reading starts not known yet, neither.
#[test]
fn a_partition_with_nothing_delivered_lags_from_where_reading_starts() {
    use super::group::{lag_from, FetchMarks};
    let m = |start| FetchMarks { high: 260, start };
    assert_eq!(lag_from(&m(Some(0)), None, None), Some(260), "a backlog");
    assert_eq!(
        lag_from(&m(Some(260)), None, None),
        Some(0),
        "a quiet restart"
    );
    assert_eq!(lag_from(&m(None), None, None), None, "not known yet");
    assert_eq!(lag_from(&m(None), Some(250), None), Some(10));
}

/// The registry answered a waiting partition, whose measurements said it was at its end (the
/// consumer had delivered past the waiting record): until two measurements after the seek
/// back, it is read through nothing and not caught up, so no idle advance closes the windows
/// of the records about to be read again.
#[test]
fn a_partition_read_again_is_not_read_through_until_measured_again() {
    let mut m = super::turn::LagMarks::default();
    let at_end = BTreeMap::from([(0, 0), (1, 0)]);
    m.observe(&at_end, 1_000);
    let caught_up = m.observe(&at_end, 3_000);
    assert_eq!(caught_up, BTreeSet::from([0, 1]));
    assert_eq!(m.read_through, BTreeMap::from([(0, 1_000), (1, 1_000)]));

    m.forget(0);
    assert_eq!(m.read_through, BTreeMap::from([(1, 1_000)]));
    let caught_up = m.observe(&at_end, 5_000);
    assert_eq!(
        caught_up,
        BTreeSet::from([1]),
        "one measurement after the seek"
    );
    assert_eq!(m.read_through, BTreeMap::from([(1, 3_000)]));
    let caught_up = m.observe(&at_end, 7_000);
    assert_eq!(caught_up, BTreeSet::from([0, 1]));
    assert_eq!(m.read_through, BTreeMap::from([(0, 5_000), (1, 5_000)]));
}
