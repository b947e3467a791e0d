//! `segloop run` on librdkafka's in-process mock cluster: the loop closes for exactly the
//! faulty segment, bad records reach the DLQ with headers, metrics are exposed.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use segloop::clock::{Clock, Control, SystemClock};
use segloop::codec::{build_codec, CodecKind};
use segloop::model::{OutcomeStatus, RemediationCommand, TelemetryEvent};
use segloop::policy::PolicySet;
use segloop::runtime::{self, RunOptions};

#[test]
fn a_fault_in_one_segment_is_commanded_acknowledged_and_verified() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let cfg = config(&bs, "g-loop");
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    let admin = inst.admin();
    let p = producer(&bs);
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let mut feed = {
        let p = &p;
        let topic = t.telemetry.name.clone();
        let mut bad = true;
        move |set_bad: Option<bool>| {
            if let Some(b) = set_bad {
                bad = b;
            }
            let now = SystemClock.now_ms();
            for seg in ["fleet/ok-1", "fleet/ok-2", "fleet/ok-3"] {
                telemetry(p, &topic, seg, now, 0.0);
            }
            telemetry(p, &topic, "fleet/bad", now, if bad { 1.0 } else { 0.0 });
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let cmd = actions
        .until(
            Duration::from_secs(30),
            || feed(None),
            |m| Some(decode_command(m.payload()?)),
        )
        .expect("a command for the faulty segment");
    assert_eq!(cmd.segment, "fleet/bad");
    assert_eq!(cmd.action, "rollback");
    assert_eq!(m_key(&cmd), "fleet/bad");

    // The actuator acknowledges on a partition of its own choosing: the owner still gets it.
    outcome(&p, &t.outcomes.name, &cmd, OutcomeStatus::Accepted, Some(1));
    outcome(&p, &t.outcomes.name, &cmd, OutcomeStatus::Applied, Some(0));
    let decisions = Reader::new(&bs, &t.decisions.name, 2);
    let resolved = decisions.until(
        Duration::from_secs(20),
        || feed(Some(false)),
        |m| {
            let d = decode_decision(m.payload()?);
            (d.segment == "fleet/bad" && d.to_state == "resolved").then_some(d)
        },
    );
    assert!(
        resolved.is_some(),
        "verified after APPLIED and healthy windows"
    );

    // No other segment was ever commanded.
    let others = actions.until(
        Duration::from_millis(500),
        || {},
        |m| {
            let c = decode_command(m.payload()?);
            (c.segment != "fleet/bad").then_some(c)
        },
    );
    assert!(others.is_none(), "{others:?}");

    let (status, metrics) = http(admin, "GET", "/metrics", "");
    assert_eq!(status, 200);
    for name in segloop::metrics::ALL {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    // Labelled with the topic's name, not its role.
    assert!(
        metrics.contains(&format!(
            "segloop_records_consumed_total{{topic=\"{}\"",
            t.telemetry.name
        )),
        "{metrics}"
    );
    let (status, seg) = http(admin, "GET", "/segments/fleet%2Fbad", "");
    assert_eq!(status, 200, "{seg}");
    assert!(seg.contains("\"controller\""));
    let (status, _) = http(admin, "GET", "/healthz", "");
    assert_eq!(status, 200);
    // Two shards (tests/common), one partition each, both working: murmur2 puts
    // fleet/ok-3 and fleet/bad on partition 0, fleet/ok-1 and fleet/ok-2 on partition 1.
    let (owners, accepted) = inst.shards();
    let mut shards: Vec<Option<usize>> = owners.iter().map(|(_, s)| *s).collect();
    shards.sort();
    assert_eq!(shards, [Some(0), Some(1)], "{owners:?}");
    assert!(accepted.iter().all(|n| *n > 0), "{accepted:?}");
    let report = inst.stop();
    assert!(report.commits > 0, "{report:?}");
    assert_eq!(
        report.records_consumed,
        report.records_aggregated + report.records_dlq
    );
    // Every record came in batches from the feed, none one by one through `poll`.
    assert_eq!(report.records_unrouted, 0, "{report:?}");
}

fn m_key(c: &RemediationCommand) -> &str {
    &c.segment
}

#[test]
fn no_ack_times_out_retries_and_escalates() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let cfg = config(&bs, "g-esc");
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    inst.admin();
    let p = producer(&bs);
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let mut seen = Vec::new();
    let escalated = actions.until(
        Duration::from_secs(40),
        || {
            telemetry(
                &p,
                &t.telemetry.name,
                "fleet/silent-actuator",
                SystemClock.now_ms(),
                1.0,
            );
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| {
            let c = decode_command(m.payload()?);
            seen.push((c.action.clone(), c.attempt));
            (c.action == "page").then_some(c)
        },
    );
    assert!(escalated.is_some(), "escalation after retries: {seen:?}");
    assert_eq!(
        &seen[..2],
        &[("rollback".to_string(), 1), ("rollback".to_string(), 2)]
    );
    inst.stop();
}

/// The admin API reads the pipeline's read model, never the engine's lock: with the lock held
/// (a long turn, a restore), every endpoint still answers, and a segment's in-flight command
/// is there.
#[test]
fn the_admin_api_answers_while_the_engine_lock_is_held() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let cfg = config(&bs, "g-admin");
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    let admin = inst.admin();
    let p = producer(&bs);
    let actions = Reader::new(&bs, &t.actions.name, 2);
    actions
        .until(
            Duration::from_secs(30),
            || {
                telemetry(
                    &p,
                    &t.telemetry.name,
                    "fleet/held",
                    SystemClock.now_ms(),
                    1.0,
                );
                p.flush(Duration::from_secs(15)).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            },
            |m| Some(decode_command(m.payload()?)),
        )
        .expect("a command");
    // The command's state reaches the read model at the end of the turn that wrote it.
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = std::sync::mpsc::channel();
    inst.hold_engine(|| {
        std::thread::spawn(move || {
            let answers: Vec<(String, u16, String)> = [
                "/segments/fleet%2Fheld",
                "/actions",
                "/silences",
                "/healthz",
                "/readyz",
                "/metrics",
            ]
            .iter()
            .map(|path| {
                let (status, body) = http(admin, "GET", path, "");
                (path.to_string(), status, body)
            })
            .collect();
            let _ = tx.send(answers);
        });
        let answers = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the admin API answers while the engine lock is held");
        for (path, status, body) in &answers {
            assert!([200, 503].contains(status), "{path}: {status} {body}");
        }
        // The budgets in use, next to the commands in flight.
        let actions: serde_json::Value = serde_json::from_str(&answers[1].2).unwrap();
        assert_eq!(actions["budgets"]["max_in_flight"], 100, "{}", answers[1].2);
        assert!(actions["budgets"]["known_segments"].as_u64() >= Some(1));
        let segment = &answers[0];
        assert_eq!(segment.1, 200, "{}", segment.2);
        // Its controller state, from the read model: the loop of the policy that fired
        // (commanded, or in backoff if its 2 s ack timeout passed meanwhile).
        assert!(
            segment.2.contains("\"loops\"")
                && segment.2.contains("\"errors\"")
                && ["commanded", "backoff"]
                    .iter()
                    .any(|p| segment.2.contains(p)),
            "{}",
            segment.2
        );
    });
    inst.stop();
}

#[test]
fn bad_records_land_in_the_dlq_with_headers_and_offsets_move_past_them() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let cfg = config(&bs, "g-dlq");
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    inst.admin();
    let p = producer(&bs);
    let now = SystemClock.now_ms();
    // garbage, a key that is not the payload's segment, too far in the future, then late.
    p.send(
        BaseRecord::to(&t.telemetry.name)
            .key("x/garbage")
            .payload(&b"\xC3\x01garbage"[..])
            .headers(OwnedHeaders::new().insert(Header {
                key: "trace",
                value: Some("abc"),
            })),
    )
    .unwrap();
    {
        let codec = build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default())
            .unwrap();
        let e = TelemetryEvent {
            segment: "x/real".into(),
            ts_ms: now,
            measurements: BTreeMap::new(),
            labels: BTreeMap::new(),
            event_id: None,
        };
        let mut bytes = Vec::new();
        codec.encode(&e, &mut bytes).unwrap();
        p.send(
            BaseRecord::to(&t.telemetry.name)
                .key("x/other")
                .payload(&bytes),
        )
        .unwrap();
    }
    telemetry(&p, &t.telemetry.name, "x/future", now + 3_600_000, 0.0);
    // Same key → same partition: a watermark far ahead, then an old event.
    telemetry(&p, &t.telemetry.name, "x/late", now, 0.0);
    telemetry(&p, &t.telemetry.name, "x/late", now - 60_000, 0.0);
    p.flush(Duration::from_secs(15)).unwrap();

    let dlq = Reader::new(&bs, &t.dlq.name, 2);
    let mut codes = BTreeMap::new();
    dlq.until(
        Duration::from_secs(30),
        || {},
        |m| {
            let h = m.headers()?;
            let get = |k: &str| {
                h.iter()
                    .find(|x| x.key == k)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let code = get("segloop.error.code")?;
            assert!(get("segloop.error.message").is_some());
            assert_eq!(
                get("segloop.source.topic").as_deref(),
                Some(t.telemetry.name.as_str())
            );
            assert!(
                get("segloop.source.partition").is_some() && get("segloop.source.offset").is_some()
            );
            if code == "bad_magic" || code == "malformed" || code == "truncated" {
                assert_eq!(
                    get("trace").as_deref(),
                    Some("abc"),
                    "original headers kept"
                );
                assert_eq!(m.payload(), Some(&b"\xC3\x01garbage"[..]), "byte for byte");
            }
            codes.insert(
                code,
                m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            );
            (codes.len() == 4).then_some(())
        },
    );
    let keys: Vec<&str> = codes.keys().map(String::as_str).collect();
    assert!(keys.contains(&"key_mismatch"), "{codes:?}");
    assert!(keys.contains(&"clock_skew"), "{codes:?}");
    assert!(keys.contains(&"late"), "{codes:?}");
    assert_eq!(keys.len(), 4, "{codes:?}");
    // Offsets move past poison records: the committed position covers them.
    std::thread::sleep(Duration::from_millis(600));
    let report = inst.stop();
    assert_eq!(report.records_dlq, 4, "{report:?}");
    assert_eq!(
        report.records_consumed,
        report.records_aggregated + report.records_dlq
    );
}

#[test]
fn two_instances_split_partitions_and_a_silence_posted_to_one_reaches_the_other() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let t = config(&bs, "g-two").topics;
    let mut a = Instance::start(config(&bs, "g-two"));
    let admin_a = a.admin();
    let mut b = Instance::start(config(&bs, "g-two"));
    b.admin();
    wait_split(&a, &b, Duration::from_secs(40));
    // One segment on each instance's partition (murmur2, as the Java client places keys).
    let seg_on = |p: i32| {
        (0..100)
            .map(|i| format!("two/seg-{i}"))
            .find(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == p)
            .unwrap()
    };
    let seg_a = seg_on(a.assigned()[0]);
    let seg_b = seg_on(b.assigned()[0]);

    // An operator silences B's segment through A's admin API.
    let body = format!(
        r#"{{"segments":"{seg_b}","duration":"5m","comment":"test","created_by":"operator"}}"#
    );
    let (status, resp) = http(admin_a, "POST", "/silences", &body);
    assert_eq!(status, 201, "{resp}");
    let id = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Applied once read back from the control topic, like every instance's.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = http(admin_a, "GET", "/silences", "");
        if list.contains(&id) && list.contains("operator") {
            break;
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let p = producer(&bs);
    let decisions = Reader::new(&bs, &t.decisions.name, 2);
    let suppressed = decisions.until(
        Duration::from_secs(30),
        || {
            let now = SystemClock.now_ms();
            telemetry(&p, &t.telemetry.name, &seg_a, now, 1.0);
            telemetry(&p, &t.telemetry.name, &seg_b, now, 1.0);
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| {
            let d = decode_decision(m.payload()?);
            (d.segment == seg_b && d.guardrail.as_deref() == Some("silence")).then_some(d)
        },
    );
    assert!(
        suppressed.is_some(),
        "B applied the silence it read from the control topic"
    );
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let cmds: Vec<RemediationCommand> = {
        let mut v = Vec::new();
        actions.until(
            Duration::from_secs(2),
            || {},
            |m| {
                v.push(decode_command(m.payload()?));
                None::<()>
            },
        );
        v
    };
    assert!(cmds.iter().any(|c| c.segment == seg_a), "{cmds:?}");
    assert!(cmds.iter().all(|c| c.segment != seg_b), "{cmds:?}");

    // Each acted only on its own segments; graceful shutdown commits both partitions.
    let (pa, pb) = (a.assigned()[0], b.assigned()[0]);
    let ra = a.stop();
    let rb = b.stop();
    assert!(ra.commands >= 1 && rb.commands == 0, "a={ra:?} b={rb:?}");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", "g-two")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&t.telemetry.name, pa);
    tpl.add_partition(&t.telemetry.name, pb);
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    for e in committed.elements() {
        assert!(
            matches!(e.offset(), Offset::Offset(o) if o > 0),
            "partition {} committed {:?}",
            e.partition(),
            e.offset()
        );
    }
    drop(committed);
}

#[test]
fn startup_fails_clearly_on_a_missing_topic_or_mismatched_partitions() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let cfg = config(&bs, "g-start");
    // Nothing created yet: the error names the missing topics and the fix.
    let err = segloop::kafka::prepare_topics(&cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("segloop.telemetry (telemetry)"), "{err}");
    assert!(err.contains("kafka.create_topics = true"), "{err}");
    // Telemetry with 2 partitions, state with 3: not co-partitioned.
    let t = &cfg.topics;
    cluster.create_topic(&t.telemetry.name, 2, 1).unwrap();
    cluster.create_topic(&t.state.name, 3, 1).unwrap();
    for name in [
        &t.actions.name,
        &t.outcomes.name,
        &t.dlq.name,
        &t.decisions.name,
        &t.control.name,
    ] {
        cluster.create_topic(name, 2, 1).unwrap();
    }
    let err = segloop::kafka::prepare_topics(&cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 2 partitions but state topic segloop.state has 3")
            && err.contains("co-partitioned"),
        "{err}"
    );
}

#[test]
fn editing_the_policy_file_reloads_policies_without_a_restart() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let cfg = config(&bs, "g-reload");
    let t = cfg.topics.clone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.toml");
    // v1 never fires (threshold above any mean); v2 fires.
    std::fs::write(
        &path,
        POLICIES.replace("mean(error) > 0.5", "mean(error) > 5"),
    )
    .unwrap();
    let control = Arc::new(Control::default());
    let c2 = control.clone();
    let p2 = path.clone();
    let handle = std::thread::spawn(move || {
        runtime::run(RunOptions {
            config: cfg,
            policies: PolicySet::load(&p2).unwrap(),
            policies_path: Some(p2),
            control: c2,
            clock: Arc::new(SystemClock),
            metrics: segloop::metrics::Metrics::new(),
            on_admin: None,
            on_core: None,
        })
    });
    let p = producer(&bs);
    let feed = || {
        telemetry(
            &p,
            &t.telemetry.name,
            "reload/seg",
            SystemClock.now_ms(),
            1.0,
        );
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    };
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let early = actions.until(Duration::from_secs(8), feed, |m| {
        Some(decode_command(m.payload()?))
    });
    assert!(early.is_none(), "v1 must not fire: {early:?}");
    // An invalid edit is refused and the old policies stay.
    std::fs::write(
        &path,
        "[[policies]]\nname = \"broken\"\nwhen = \"p99(\"\naction = \"x\"\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2_500));
    std::fs::write(
        &path,
        POLICIES.replace("name = \"errors\"", "name = \"errors\"\nversion = 2"),
    )
    .unwrap();
    let cmd = actions
        .until(Duration::from_secs(20), feed, |m| {
            Some(decode_command(m.payload()?))
        })
        .expect("the reloaded policy fires");
    assert_eq!(cmd.policy_version, 2);
    control.stop();
    handle.join().unwrap().unwrap();
}

#[test]
fn the_e2e_bench_accounts_for_every_record() {
    let r = segloop::bench::e2e_bench(
        None,
        &segloop::bench::E2eOptions {
            records: 20_000,
            segments: 300,
            partitions: 4,
            rounds: 1,
            breaching: 0.01,
            java: Err("embedded".into()),
            threads: Some(2),
        },
    )
    .unwrap();
    assert_eq!(r.consumed, 20_000);
    assert_eq!(r.broker, "embedded");
    assert_eq!(r.engine_threads, 2);
    assert_eq!(r.breaching, 3, "every 100th of 300 segments");
    assert!(r.java_consume_per_sec.is_none() && r.java_skipped.is_some());
    // The pipeline's own thread did the work, and its CPU is accounted.
    assert!(
        r.cpu_per_million
            .iter()
            .any(|(g, secs)| g == "pipeline" && *secs > 0.0),
        "{r:?}"
    );
    assert!(r.peak_rss_bytes.is_some_and(|b| b > 0));
    assert_eq!(r.aggregated + r.dlq, r.consumed);
    assert!(r.events_per_sec > 0.0 && r.raw_consume_per_sec > 0.0);
    // 1% of segments fail: the policy acts on them.
    assert!(r.commands >= 1, "{r:?}");
    assert!(r.close_to_command_p50_ms.is_some());
}

#[test]
fn the_reference_actuator_closes_the_loop_with_a_shell_handler() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let cfg = config(&bs, "g-act");
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg.clone());
    inst.admin();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("handled.log");
    let mut act_cfg = cfg;
    act_cfg.actuator.group_id = "actuators".into();
    act_cfg.actuator.shell.insert(
        "rollback".into(),
        format!(
            "echo \"$SEGLOOP_COMMAND_ID $SEGLOOP_SEGMENT\" >> {}",
            log.display()
        ),
    );
    let stop = Arc::new(Control::default());
    let s2 = stop.clone();
    let actuator = std::thread::spawn(move || {
        let handler = Arc::new(segloop::actuator::ConfiguredHandler::new(
            act_cfg.actuator.clone(),
        ));
        segloop::actuator::run(&act_cfg, handler, s2, |_| {})
    });
    let p = producer(&bs);
    let mut bad = true;
    let decisions = Reader::new(&bs, &t.decisions.name, 2);
    let resolved = decisions.until(
        Duration::from_secs(40),
        || {
            let now = SystemClock.now_ms();
            telemetry(
                &p,
                &t.telemetry.name,
                "act/seg",
                now,
                if bad { 1.0 } else { 0.0 },
            );
            p.flush(Duration::from_secs(15)).unwrap();
            // The handler "fixes" the segment: once it ran, telemetry is healthy.
            bad = !log.exists();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| {
            let d = decode_decision(m.payload()?);
            (d.to_state == "resolved").then_some(d)
        },
    );
    assert!(
        resolved.is_some(),
        "the loop closed through segloop actuator"
    );
    stop.stop();
    let report = actuator.join().unwrap().unwrap();
    inst.stop();
    assert_eq!(report.commands, 1, "{report:?}");
    assert_eq!(report.applied, 1);
    let handled = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        handled.lines().count(),
        1,
        "idempotent: ran once: {handled}"
    );
    assert!(handled.contains("act/seg"));
}

/// `/readyz` of a standby and of a quiet restart (see the shared test).
#[test]
fn a_standby_and_a_quiet_restart_are_ready() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let one = |group: &str| {
        let mut c = config(&bs, group);
        c.kafka.partitions = 1;
        c
    };
    segloop::kafka::create_embedded_topics(&cluster, &one("setup")).unwrap();
    common::a_standby_and_a_quiet_restart_are_ready(&bs, one);
}

/// The actuator's deadline and idempotence across group ids (see the shared test).
#[test]
fn the_actuator_skips_expired_and_already_answered_commands() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let cfg = config(&bs, "g-expire");
    segloop::kafka::create_embedded_topics(&cluster, &cfg).unwrap();
    common::the_actuator_skips_expired_and_already_answered_commands(&bs, cfg);
}

/// `segloop tail` (issue #25): a topic's records decoded as JSON lines, by role; dead letters
/// with their error headers and bytes; `--key` and `--max` filter.
#[test]
fn tail_prints_decoded_records_and_dead_letters_with_their_headers() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let cfg = config(&bs, "g-tail");
    segloop::kafka::create_embedded_topics(&cluster, &cfg).unwrap();
    let t = cfg.topics.clone();
    let p = producer(&bs);
    let now = SystemClock.now_ms();
    for seg in ["tail/a", "tail/b", "tail/a"] {
        telemetry(&p, &t.telemetry.name, seg, now, 0.5);
    }
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "segloop.error.code",
            value: Some("bad_magic"),
        })
        .insert(Header {
            key: "segloop.source.offset",
            value: Some("7"),
        });
    p.send(
        BaseRecord::to(&t.dlq.name)
            .key("tail/x")
            .payload(&b"not avro"[..])
            .headers(headers),
    )
    .unwrap();
    p.flush(Duration::from_secs(15)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, format!("[kafka]\nbootstrap_servers = \"{bs}\"\n")).unwrap();
    let tail = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segloop"))
            .arg("tail")
            .arg("-c")
            .arg(&file)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let lines = tail(&[]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["value"]["measurements"]["error"] == 0.5));
    let a = tail(&["--key", "tail/a"]);
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|l| l["value"]["segment"] == "tail/a"));
    assert_eq!(tail(&["--max", "1"]).len(), 1);
    let dlq = tail(&["--topic", "dlq"]);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["headers"]["segloop.error.code"], "bad_magic");
    assert_eq!(dlq[0]["hex"], "6e6f74206176726f"); // "not avro"
    assert!(dlq[0]["value"]["undecodable"].is_string());
}

/// `segloop dlq replay` (issue #25): a dry run counts by source topic and code; a replay sends
/// the original bytes and key back to the source topic without segloop's headers; a truncated
/// dead letter is counted, never sent; other codes are filtered out.
#[test]
fn dlq_replay_sends_dead_letters_back_to_their_source() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let cfg = config(&bs, "g-replay");
    segloop::kafka::create_embedded_topics(&cluster, &cfg).unwrap();
    let t = cfg.topics.clone();
    let p = producer(&bs);
    let letter = |key: &str, value: &[u8], code: &str, truncated: bool| {
        let mut h = OwnedHeaders::new()
            .insert(Header {
                key: "trace-id",
                value: Some("abc"),
            })
            .insert(Header {
                key: "segloop.error.code",
                value: Some(code),
            })
            .insert(Header {
                key: "segloop.source.topic",
                value: Some(t.telemetry.name.as_str()),
            })
            .insert(Header {
                key: "segloop.source.partition",
                value: Some("0"),
            });
        if truncated {
            h = h.insert(Header {
                key: "segloop.truncated",
                value: Some("true"),
            });
        }
        p.send(
            BaseRecord::to(&t.dlq.name)
                .key(key)
                .payload(value)
                .headers(h),
        )
        .unwrap();
    };
    letter(
        "rp/a",
        b"written with a schema now known",
        "unknown_fingerprint",
        false,
    );
    letter("rp/b", b"too big, cut", "unknown_fingerprint", true);
    letter("rp/c", b"late", "late", false);
    p.flush(Duration::from_secs(15)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, format!("[kafka]\nbootstrap_servers = \"{bs}\"\n")).unwrap();
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(["dlq", "replay", "-c"])
            .arg(&file)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dry = run(&["--code", "unknown_fingerprint", "--dry-run"]);
    assert!(
        dry.contains(&format!(
            "would send 1 to {} (unknown_fingerprint)",
            t.telemetry.name
        )),
        "{dry}"
    );
    assert!(
        dry.contains("1 truncated") && dry.contains("1 filtered out"),
        "{dry}"
    );
    let telemetry_now = || {
        let c = Reader::new(&bs, &t.telemetry.name, 2);
        let mut got = Vec::new();
        c.until(
            Duration::from_secs(3),
            || {},
            |m| {
                got.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    m.headers()
                        .map(|h| h.iter().map(|x| x.key.to_string()).collect::<Vec<_>>()),
                ));
                None::<()>
            },
        );
        got
    };
    assert!(telemetry_now().is_empty(), "a dry run sends nothing");
    let sent = run(&["--code", "unknown_fingerprint"]);
    assert!(sent.contains("sent 1 dead letter(s)"), "{sent}");
    let back = telemetry_now();
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].0.as_deref(), Some(&b"rp/a"[..]));
    assert_eq!(
        back[0].1.as_deref(),
        Some(&b"written with a schema now known"[..])
    );
    assert_eq!(back[0].2, Some(vec!["trace-id".to_string()]));
}
