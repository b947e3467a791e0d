//! The loop on a real Apache Kafka broker (KRaft, from `scripts/kafka.sh start`).
//! Enabled by `--features kafka-broker-tests`; without a broker these tests fail, never skip.
#![cfg(feature = "kafka-broker-tests")]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer};
use segloop::clock::{Clock, SystemClock};
use segloop::codec::{build_codec, CodecKind};
use segloop::config::TopicsConfig;
use segloop::model::{OutcomeStatus, RemediationCommand, TelemetryEvent};

/// Unique topic names (the broker is shared by the suite) created by segloop itself.
fn topics(test: &str) -> Vec<String> {
    let tag = format!("{test}-{}-{}", std::process::id(), SystemClock.now_ms());
    segloop::config::TopicsConfig::default()
        .all()
        .iter()
        .map(|(t, _)| format!("topics.{t}.name=rk.{tag}.{t}"))
        .chain(["kafka.create_topics=true".to_string()])
        .collect()
}

#[test]
fn the_loop_closes_on_real_kafka() {
    let bs = broker_bootstrap();
    let cfg = config_with(
        &bs,
        &format!("g-loop-{}", std::process::id()),
        &topics("loop"),
    );
    let report = close_the_loop(cfg, &bs, "real");
    assert!(
        report.commits > 0,
        "graceful shutdown committed: {report:?}"
    );
    assert_eq!(
        report.records_consumed,
        report.records_aggregated + report.records_dlq
    );
    // Every record came in batches from the feed (kafka::Feed), none through `poll`.
    assert_eq!(report.records_unrouted, 0, "{report:?}");
}

#[test]
fn undecodable_records_reach_the_dlq_on_real_kafka() {
    let bs = broker_bootstrap();
    let cfg = config_with(
        &bs,
        &format!("g-dlq-{}", std::process::id()),
        &topics("dlq"),
    );
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    inst.admin();
    let p = producer(&bs);
    p.send(
        BaseRecord::to(&t.telemetry.name)
            .key("x/y")
            .payload(&b"not avro"[..]),
    )
    .unwrap();
    p.flush(Duration::from_secs(15)).unwrap();
    let dlq = Reader::new(&bs, &t.dlq.name, 2);
    let code = dlq.until(
        Duration::from_secs(60),
        || {},
        |m| {
            use rdkafka::message::Headers;
            let h = m.headers()?;
            h.iter()
                .find(|x| x.key == "segloop.error.code")
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        },
    );
    assert_eq!(code.as_deref(), Some("bad_magic"));
    let report = inst.stop();
    assert_eq!(report.records_dlq, 1);
}

#[test]
fn two_instances_split_partitions_and_the_survivor_takes_over() {
    let bs = broker_bootstrap();
    let group = format!("g-two-{}", std::process::id());
    let sets = topics("two");
    let a_cfg = config_with(&bs, &group, &sets);
    let t = a_cfg.topics.clone();
    let mut a = Instance::start(a_cfg);
    a.admin();
    let mut b = Instance::start(config_with(&bs, &group, &sets));
    b.admin();
    wait_split(&a, &b, Duration::from_secs(60));
    let pa = a.assigned()[0];
    let seg = (0..100)
        .map(|i| format!("two/seg-{i}"))
        .find(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == pa)
        .unwrap();
    // A stops gracefully; B takes its partition over and acts on its segment.
    let ra = a.stop();
    assert_eq!(ra.commands, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.assigned().len() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "survivor never took over: {:?}",
            b.assigned()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = producer(&bs);
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let cmd = actions.until(
        Duration::from_secs(60),
        || {
            telemetry(&p, &t.telemetry.name, &seg, SystemClock.now_ms(), 1.0);
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| Some(decode_command(m.payload()?)),
    );
    assert_eq!(cmd.map(|c| c.segment), Some(seg));
    let rb = b.stop();
    assert!(rb.commands >= 1, "{rb:?}");
    // The partitions b took over were routed to its feed when they were assigned.
    assert_eq!(rb.records_unrouted, 0, "{rb:?}");
}

#[test]
fn java_producers_land_keys_where_segloop_expects_them() {
    let bs = broker_bootstrap();
    let cfg = config_with(
        &bs,
        &format!("g-java-{}", std::process::id()),
        &topics("java"),
    );
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    inst.admin();
    let codec =
        build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default()).unwrap();
    let mut input = String::new();
    let segs: Vec<String> = (0..40).map(|i| format!("java/svc-{i}")).collect();
    // Four seconds of telemetry: java/svc-0 fails, the rest are healthy.
    let start = SystemClock.now_ms();
    for step in 0..40 {
        for s in &segs {
            let e = TelemetryEvent {
                segment: s.clone(),
                ts_ms: start + step * 100,
                measurements: [(
                    "error".to_string(),
                    if s == "java/svc-0" { 1.0 } else { 0.0 },
                )]
                .into(),
                labels: Default::default(),
                event_id: None,
            };
            let mut bytes = Vec::new();
            codec.encode(&e, &mut bytes).unwrap();
            input.push_str(&format!("{s}\t{}\n", hex::encode(bytes)));
        }
    }
    let out = java("Produce.java", &[&bs, &t.telemetry.name], &input);
    let placed = String::from_utf8_lossy(&out.stdout);
    let mut checked = 0;
    for line in placed.lines() {
        let (key, part) = line.split_once('\t').unwrap();
        assert_eq!(
            segloop::kafka::murmur2_partition(key.as_bytes(), 2),
            part.parse::<i32>().unwrap(),
            "the Java client put {key} elsewhere"
        );
        checked += 1;
    }
    assert_eq!(checked, 40 * 40);
    // segloop acts on the failing segment the Java client produced.
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let cmd = actions.until(
        Duration::from_secs(60),
        || {},
        |m| Some(decode_command(m.payload()?)),
    );
    assert_eq!(cmd.map(|c| c.segment).as_deref(), Some("java/svc-0"));
    inst.stop();
}

#[test]
fn two_segloop_processes_split_and_sigterm_hands_over_gracefully() {
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("proc-{}-{}", std::process::id(), SystemClock.now_ms());
    let policies = dir.path().join("policies.toml");
    std::fs::write(&policies, POLICIES).unwrap();
    let config_file = |port: u16| process_config(dir.path(), &bs, &tag, port, "");
    let spawn = |port: u16| {
        Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(["run", "--config"])
            .arg(config_file(port))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn(port_a);
    std::thread::sleep(Duration::from_secs(2));
    let mut b = spawn(port_b);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(assigned_of(port_a).len() == 1 && assigned_of(port_b).len() == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "no split between the processes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pa = assigned_of(port_a)[0] as i32;
    let seg = (0..100)
        .map(|i| format!("proc/seg-{i}"))
        .find(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == pa)
        .unwrap();
    // SIGTERM: A stops polling, flushes, commits and exits 0 within its deadline.
    let stopped = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &a.id().to_string()])
        .status()
        .unwrap();
    let status = a.wait().unwrap();
    assert!(status.success(), "A exited with {status}");
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "graceful shutdown took {:?}",
        stopped.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while assigned_of(port_b).len() != 2 {
        assert!(std::time::Instant::now() < deadline, "B never took over");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = format!("rk.{tag}");
    let p = producer(&bs);
    let actions = Reader::new(&bs, &format!("{t}.actions"), 2);
    let cmd = actions.until(
        Duration::from_secs(60),
        || {
            telemetry(
                &p,
                &format!("{t}.telemetry"),
                &seg,
                SystemClock.now_ms(),
                1.0,
            );
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| Some(decode_command(m.payload()?)),
    );
    assert_eq!(
        cmd.map(|c| c.segment),
        Some(seg),
        "the survivor acts on the moved partition"
    );
    Command::new("kill")
        .args(["-TERM", &b.id().to_string()])
        .status()
        .unwrap();
    assert!(b.wait().unwrap().success());
}

/// Backtests on the real broker: topics created through the admin API, the sample history
/// written with event-time timestamps, two identical reports, and `--from` served by the
/// broker's time index (offsets-for-times).
#[test]
fn backtest_replays_real_kafka_deterministically() {
    use segloop::backtest::{self, Invocation, Options};
    let bs = broker_bootstrap();
    let env = std::collections::HashMap::new();
    let mut overrides = topics("backtest");
    overrides.push(format!("kafka.bootstrap_servers={bs}"));
    overrides.push("kafka.partitions=4".into());
    overrides.push(format!("kafka.group_id=g-backtest-{}", std::process::id()));
    let file = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let config = segloop::config::Config::load(&segloop::config::Sources {
        file: Some(&file),
        env: &env,
        overrides: &overrides,
    })
    .unwrap();
    segloop::kafka::prepare_topics(&config).unwrap();
    let written = segloop::fleet::write_sample_history(&config, 1, 40).unwrap();
    let script = segloop::fleet::sample_history(1, 40, |_| {});
    let policies = || segloop::policy::PolicySet::for_config(&config).unwrap();
    let run =
        |inv: &Invocation| backtest::execute(config.clone(), policies(), inv, &mut |_| {}).unwrap();

    let a = run(&Invocation::default());
    assert_eq!(a.input.records_aggregated, written);
    let acted: std::collections::BTreeSet<String> = a
        .loops
        .iter()
        .filter(|l| l.commands.iter().any(|c| !c.escalation))
        .map(|l| l.segment.clone())
        .collect();
    let expected: std::collections::BTreeSet<String> = script
        .iter()
        .filter(|i| i.kind != segloop::fleet::FaultKind::NoisyHealthy)
        .map(|i| i.segment.clone())
        .collect();
    assert_eq!(acted, expected);
    let mut small = Invocation::default();
    small.options.fetch_max_bytes = Some(2000);
    assert_eq!(a.to_json(), run(&small).to_json());

    let from = segloop::fleet::SAMPLE_EPOCH_MS + 20_000;
    let ranged = run(&Invocation {
        options: Options {
            from_ms: Some(from),
            ..Options::default()
        },
        ..Invocation::default()
    });
    assert_eq!(ranged.meta.seek, "offsets_for_times");
    // The broker skipped what lies before from − margin (10.2 s of the 40 s): 9.8 s of it.
    let skipped = written - ranged.input.records_read;
    assert!(
        skipped >= written * 9 / 40 && skipped <= written * 10 / 40,
        "{:?}",
        ranged.input
    );
    assert!(ranged.input.first_event_ms.unwrap() >= from);
    assert!(ranged.totals.firings > 0);
}

/// What a command is, without its processing-time fields.
type CommandKey = (String, String, i32);
/// What a controller transition is, without its processing-time fields.
type Transition = (
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
);

fn transition(d: &segloop::model::DecisionRecord) -> Transition {
    (
        d.policy.clone(),
        d.from_state.clone(),
        d.to_state.clone(),
        d.trigger.clone(),
        d.window_start_ms,
        d.guardrail.clone(),
        d.command_id.clone(),
        serde_json::to_string(&d.aggregates).unwrap(),
    )
}

/// One pipeline, two drivers: the same telemetry and outcomes through `segloop run` and
/// through `segloop backtest --outcomes-from-topic` give the same commands (ids, actions,
/// attempts) and the same controller transitions per segment. Event times are near now, the
/// outcome is written well inside every deadline and away from window boundaries, and the
/// feed pauses around it, so both drivers see every window close on the same side of it.
#[test]
fn live_and_backtest_agree_on_the_same_records() {
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("parity-{}-{}", std::process::id(), SystemClock.now_ms());
    let port = free_port();
    let cfg = process_config(dir.path(), &bs, &tag, port, "");
    let topic = |t: &str| format!("rk.{tag}.{t}");
    let segments: Vec<String> = (0..8).map(|i| format!("parity/seg-{i}")).collect();
    let parts: std::collections::BTreeSet<i32> = segments
        .iter()
        .map(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2))
        .collect();
    assert_eq!(parts.len(), 2, "the segments cover both partitions");
    let bad = "parity/seg-3";

    let mut live = spawn(&cfg);
    wait_assigned(port, 2);
    let p = producer(&bs);
    let tick = |error_of_bad: f64| {
        let now = SystemClock.now_ms();
        for s in &segments {
            let e = if s == bad { error_of_bad } else { 0.0 };
            telemetry(&p, &topic("telemetry"), s, now, e);
        }
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    };
    let actions = Reader::new(&bs, &topic("actions"), 2);
    let cmd = actions
        .until(
            Duration::from_secs(60),
            || tick(1.0),
            |m| Some(decode_command(m.payload()?)),
        )
        .expect("the live loop commands the failing segment");
    assert_eq!(cmd.segment, bad);

    // The actuator answers 100-400 ms into a second: both the outcome's time and its arrival
    // fall inside one window, never on a boundary.
    std::thread::sleep(Duration::from_millis(20));
    while !(100..400).contains(&(SystemClock.now_ms() % 1000)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    outcome(&p, &topic("outcomes"), &cmd, OutcomeStatus::Accepted, None);
    outcome(&p, &topic("outcomes"), &cmd, OutcomeStatus::Applied, None);
    std::thread::sleep(Duration::from_millis(300));

    let decisions = Reader::new(&bs, &topic("decisions"), 2);
    decisions
        .until(
            Duration::from_secs(30),
            || tick(0.0),
            |m| {
                let d = decode_decision(m.payload()?);
                (d.segment == bad && d.to_state == "resolved").then_some(())
            },
        )
        .expect("the live loop verifies the fix");
    // Healthy windows past the resolution (it clears). At the end the two drivers may differ
    // by design: live closes the last windows on its idle timeout (wall clock), a replay never
    // does, and a loaded live process may stop before reading the last records. Transitions of
    // windows starting in the last 2 s of the feed are left out of the comparison.
    let until = SystemClock.now_ms() + 4_000;
    while SystemClock.now_ms() < until {
        tick(0.0);
    }
    let cut = SystemClock.now_ms() - 2_000;
    std::thread::sleep(Duration::from_millis(400));
    signal(&live, "-TERM");
    assert!(live.wait().unwrap().success());

    let live_commands: Vec<CommandKey> = read_all(&bs, &topic("actions"), |b| {
        let c = decode_command(b);
        Some((c.command_id, c.action, c.attempt))
    });
    let mut live_transitions: std::collections::BTreeMap<String, Vec<Transition>> =
        Default::default();
    let before_cut = |d: &segloop::model::DecisionRecord| d.window_start_ms.is_none_or(|w| w < cut);
    for d in read_all(&bs, &topic("decisions"), |b| Some(decode_decision(b))) {
        if !before_cut(&d) {
            continue;
        }
        live_transitions
            .entry(d.segment.clone())
            .or_default()
            .push(transition(&d));
    }

    let report_path = dir.path().join("parity.json");
    let out = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["backtest", "--outcomes-from-topic", "--config"])
        .arg(&cfg)
        .arg("--report")
        .arg(&report_path)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "backtest failed");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let mut replay_commands: Vec<CommandKey> = Vec::new();
    let mut replay_transitions: std::collections::BTreeMap<String, Vec<Transition>> =
        Default::default();
    for l in report["loops"].as_array().unwrap() {
        for c in l["commands"].as_array().unwrap() {
            replay_commands.push((
                c["command_id"].as_str().unwrap().into(),
                c["action"].as_str().unwrap().into(),
                c["attempt"].as_i64().unwrap() as i32,
            ));
        }
        for d in l["decisions"].as_array().unwrap() {
            let d: segloop::model::DecisionRecord = serde_json::from_value(d.clone()).unwrap();
            if !before_cut(&d) {
                continue;
            }
            replay_transitions
                .entry(d.segment.clone())
                .or_default()
                .push(transition(&d));
        }
    }
    assert_eq!(
        live_commands,
        vec![(cmd.command_id.clone(), "rollback".into(), 1)]
    );
    assert_eq!(replay_commands, live_commands);
    assert_eq!(
        replay_transitions.keys().collect::<Vec<_>>(),
        vec![bad],
        "only the failing segment moved"
    );
    assert_eq!(replay_transitions, live_transitions);
    let states: Vec<&str> = live_transitions[bad].iter().map(|t| t.2.as_str()).collect();
    assert!(
        states.contains(&"resolved") && states.contains(&"commanded"),
        "{states:?}"
    );
}

/// `/readyz` on a real broker: a quiet restart is ready, and so is a standby (issue #19).
#[test]
fn a_standby_and_a_quiet_restart_are_ready_on_real_kafka() {
    let bs = broker_bootstrap();
    let sets = topics("ready");
    let tag = format!("{}-{}", std::process::id(), SystemClock.now_ms());
    let one = |group: &str| {
        let mut c = config_with(&bs, &format!("{group}-{tag}"), &sets);
        c.kafka.partitions = 1;
        c
    };
    segloop::kafka::prepare_topics(&one("setup")).unwrap();
    common::a_standby_and_a_quiet_restart_are_ready(&bs, one);
}

/// The actuator on a real broker: an expired command is refused, and a new group id does not
/// run again a command the outcomes topic shows answered (issue #19).
#[test]
fn the_actuator_skips_expired_and_already_answered_commands_on_real_kafka() {
    let bs = broker_bootstrap();
    let cfg = config_with(
        &bs,
        &format!("g-expire-{}", std::process::id()),
        &topics("expire"),
    );
    segloop::kafka::prepare_topics(&cfg).unwrap();
    common::the_actuator_skips_expired_and_already_answered_commands(&bs, cfg);
}

/// A producer host running 20 s ahead (3 segments) and one event 50 s ahead share the
/// partitions of 30 healthy segments sending with disorder under `out_of_orderness`. Before the
/// robust watermark, the skewed events moved their partitions' watermarks: the healthy
/// segments' on-time events went to the DLQ as `late` and their emptied windows fired
/// `no_data()`. Now nothing is rejected and only the skewed segments' own windows move.
#[test]
fn a_skewed_producer_sharing_partitions_breaks_no_other_segment() {
    const SILENT: &str = r#"
[guardrails]
max_in_flight = 100
max_actions_per_minute = 6000
blast_radius = 1.0
max_action_staleness = "30s"

[[policies]]
name = "silent"
when = "no_data()"
for = 1
action = "restart"
ack_timeout = "2s"
max_attempts = 1
escalate = "page"
"#;
    let bs = broker_bootstrap();
    let mut sets = topics("skew");
    sets.push("windows.max_clock_skew=60s".into());
    let cfg = config_with(&bs, &format!("g-skew-{}", std::process::id()), &sets);
    let t = cfg.topics.clone();
    let mut inst = Instance::start_with(cfg, SILENT);
    inst.admin();
    let p = producer(&bs);
    let healthy: Vec<String> = (0..30).map(|i| format!("skew/ok-{i}")).collect();
    let ahead: Vec<String> = (0..3).map(|i| format!("skew/fast-host/seg-{i}")).collect();
    // Both partitions carry healthy and skewed segments.
    for part in 0..2 {
        assert!(healthy
            .iter()
            .any(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == part));
    }
    assert!((0..2).all(|part| ahead
        .iter()
        .chain(["skew/outlier".to_string()].iter())
        .any(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == part)));
    let started = SystemClock.now_ms();
    let mut step = 0i64;
    while SystemClock.now_ms() < started + 12_000 {
        let now = SystemClock.now_ms();
        for (i, s) in healthy.iter().enumerate() {
            // Disorder under out_of_orderness (100 ms).
            telemetry(
                &p,
                &t.telemetry.name,
                s,
                now - ((i as i64 * 7 + step * 13) % 80),
                0.0,
            );
        }
        for s in &ahead {
            telemetry(&p, &t.telemetry.name, s, now + 20_000, 0.0);
        }
        if step % 20 == 5 {
            telemetry(&p, &t.telemetry.name, "skew/outlier", now + 50_000, 0.0);
        }
        p.flush(Duration::from_secs(15)).unwrap();
        step += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let producer_stopped = SystemClock.now_ms();
    // Stop before the idle advance may close the windows after the producer stopped (it
    // waits for idle_timeout and two lag measurements at the end, 2 s apart).
    std::thread::sleep(Duration::from_millis(500));
    let report = inst.stop();
    assert_eq!(report.records_dlq, 0, "no event was rejected: {report:?}");
    assert_eq!(
        report.records_consumed,
        report.records_aggregated + report.records_dlq
    );
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let mut commanded = std::collections::BTreeSet::new();
    actions.until(
        Duration::from_secs(5),
        || {},
        |m| {
            let c = decode_command(m.payload()?);
            if c.issued_at_ms < producer_stopped {
                commanded.insert(c.segment);
            }
            None::<()>
        },
    );
    let healthy_commanded: Vec<_> = commanded
        .iter()
        .filter(|s| s.starts_with("skew/ok-"))
        .collect();
    assert!(
        healthy_commanded.is_empty(),
        "no_data() fired for segments that sent in time: {healthy_commanded:?} (all: {commanded:?})"
    );
    // The policy is armed: the outlier's own jump emptied its own windows.
    assert!(
        commanded.contains("skew/outlier"),
        "the outlier's own empty windows: {commanded:?}"
    );
}

/// `segloop bench e2e --bootstrap` as a user runs it (the binary, from another directory): the
/// same records through a bare rdkafka consumer, a bare Java consumer (the jars
/// `scripts/kafka.sh` fetched, found from the binary's checkout) and the whole pipeline, every
/// record accounted and every figure printed.
#[test]
fn the_e2e_bench_runs_on_real_kafka_against_rdkafka_and_java() {
    let bs = broker_bootstrap();
    let (stdout, pid) = bench(&["e2e", "--bootstrap", &bs, "--breaching", "0.02"]);
    let field = |name: &str| field(&stdout, name);
    let number = |name: &str| number(&stdout, name);
    assert_eq!(field("broker"), bs);
    assert_eq!(number("consumed"), 20_000.0);
    assert_eq!(number("aggregated") + number("dlq"), 20_000.0);
    assert_eq!(number("breaching_segments"), 10.0, "every 50th of 500");
    for rate in [
        "events_per_sec",
        "raw_consume_per_sec",
        "java_consume_per_sec",
        "ratio",
        "raw_ratio",
        "cpu_secs_per_million_events.pipeline",
        "peak_rss_bytes",
        // The real-Kafka suite runs a bench build (counting-alloc): the heap is measured.
        "pipeline_heap_bytes_per_segment",
    ] {
        assert!(number(rate) > 0.0, "{rate} in:\n{stdout}");
    }
    assert!(number("commands") >= 1.0, "{stdout}");
    assert!(number("state_records") >= number("commands"), "{stdout}");
    assert!(number("window_close_to_command_p99_ms") >= 0.0, "{stdout}");
    assert_no_bench_topics_left(&bs, pid);
}

/// `segloop bench <args> --events 20000 --segments 500 --partitions 4 --rounds 1` as a user
/// runs it (the binary, from another directory): its stdout, once it succeeded, and its pid.
fn bench(args: &[&str]) -> (String, u32) {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .arg("bench")
        .args(args)
        .args([
            "--events",
            "20000",
            "--segments",
            "500",
            "--partitions",
            "4",
            "--rounds",
            "1",
        ])
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, pid)
}

/// A bench's `name=value` line.
fn field(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
        .to_string()
}

/// A bench's `name=value` line, a number.
fn number(stdout: &str, name: &str) -> f64 {
    field(stdout, name)
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("{name} is not a number in:\n{stdout}"))
}

/// A bench run leaves none of the topics it made on the broker (`bench-<pid>-…`).
fn assert_no_bench_topics_left(bs: &str, pid: u32) {
    use rdkafka::consumer::Consumer;
    let probe: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bs)
        .create()
        .unwrap();
    let prefix = format!("bench-{pid}-");
    let mut left = Vec::new();
    for _ in 0..50 {
        let md = probe.fetch_metadata(None, Duration::from_secs(10)).unwrap();
        left = (md.topics().iter())
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        if left.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the bench left its topics on the broker: {left:?}");
}

/// `segloop bench replay --bootstrap` the same way: the backtest path against the bare
/// rdkafka and Java consumers over one range, every record read by each.
#[test]
fn the_replay_bench_runs_on_real_kafka_against_rdkafka_and_java() {
    let bs = broker_bootstrap();
    let (stdout, pid) = bench(&["replay", "--bootstrap", &bs]);
    let number = |name: &str| number(&stdout, name);
    assert_eq!(number("records"), 20_000.0);
    for rate in [
        "replay_events_per_sec",
        "raw_consume_per_sec",
        "java_consume_per_sec",
        "ratio",
        "replay_to_raw_ratio",
        "engine_events_per_sec",
    ] {
        assert!(number(rate) > 0.0, "{rate} in:\n{stdout}");
    }
    assert!(number("windows_closed") > 0.0, "{stdout}");
    assert_no_bench_topics_left(&bs, pid);
}

/// Exactly-once replicas started with the same settings each get a transactional.id of their
/// own (the default is unique per instance), so neither fences the other: both commit
/// transactions and stop cleanly. (With the old default, `<group_id>-<client_id>`, the second
/// fenced the first, whose run ended with a fatal transaction error.)
#[test]
fn two_exactly_once_instances_with_default_settings_do_not_fence_each_other() {
    let bs = broker_bootstrap();
    let group = format!("g-eos2-{}", std::process::id());
    let mut sets = topics("eos2");
    sets.push("delivery.mode=exactly-once".into());
    let a_cfg = config_with(&bs, &group, &sets);
    assert!(a_cfg.delivery.transactional_id.is_none());
    let t = a_cfg.topics.clone();
    let mut a = Instance::start(a_cfg);
    a.admin();
    let mut b = Instance::start(config_with(&bs, &group, &sets));
    b.admin();
    wait_split(&a, &b, Duration::from_secs(60));
    // Records on both partitions for a few commit intervals.
    let p = producer(&bs);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while std::time::Instant::now() < until {
        for s in 0..8 {
            telemetry(
                &p,
                &t.telemetry.name,
                &format!("eos2/seg-{s}"),
                SystemClock.now_ms(),
                0.0,
            );
        }
        i += 1;
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(i > 10);
    let ra = a.stop_result().expect("a was not fenced");
    let rb = b.stop_result().expect("b was not fenced");
    assert!(ra.commits >= 1 && rb.commits >= 1, "{ra:?}\n{rb:?}");
    assert!(
        ra.records_consumed > 0 && rb.records_consumed > 0,
        "{ra:?}\n{rb:?}"
    );
}

/// Two instances configured with one transactional.id: the second is refused at startup,
/// naming the id and the live instance that has it, and the first keeps running unfenced.
#[test]
fn a_second_live_instance_with_the_same_transactional_id_is_refused() {
    let bs = broker_bootstrap();
    let group = format!("g-dup-{}", std::process::id());
    let mut sets = topics("dup");
    sets.push("delivery.mode=exactly-once".into());
    sets.push(format!(
        "delivery.transactional_id=tx-dup-{}",
        std::process::id()
    ));
    let mut a = Instance::start(config_with(&bs, &group, &sets));
    a.admin();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while a.assigned().is_empty() {
        assert!(std::time::Instant::now() < deadline, "a never joined");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A's first record is committed with its first transaction (1 s commit interval).
    std::thread::sleep(Duration::from_secs(3));
    let b = Instance::start(config_with(&bs, &group, &sets));
    let err = b.stop_result().expect_err("the duplicate must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("in use by a live instance") && msg.contains("tx-dup-"),
        "{msg}"
    );
    // A still runs its transactions: it reads and commits what comes next.
    let t = config_with(&bs, &group, &sets).topics;
    let p = producer(&bs);
    for s in 0..20 {
        telemetry(
            &p,
            &t.telemetry.name,
            &format!("dup/seg-{s}"),
            SystemClock.now_ms(),
            0.0,
        );
    }
    p.flush(Duration::from_secs(15)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let ra = a.stop_result().expect("a was not fenced");
    assert!(ra.records_consumed == 20 && ra.commits >= 1, "{ra:?}");
}

/// The test policies with an ack timeout no test outlives: a command stays in flight (and its
/// segment under action) for the whole test.
fn long_ack_policies(max_in_flight: u32) -> String {
    POLICIES
        .replace("ack_timeout = \"2s\"", "ack_timeout = \"60s\"")
        .replace(
            "max_in_flight = 100",
            &format!("max_in_flight = {max_in_flight}"),
        )
}

/// Two instances of one group, split one partition each, that have seen each other's
/// heartbeat; returns them with the partition each owns.
fn two_instances(sets: &[String], group: &str, policies: &str) -> (Instance, Instance, i32, i32) {
    let bs = broker_bootstrap();
    let mut a = Instance::start_with(config_with(&bs, group, sets), policies);
    a.admin();
    let mut b = Instance::start_with(config_with(&bs, group, sets), policies);
    b.admin();
    wait_split(&a, &b, Duration::from_secs(60));
    let (pa, pb) = (a.assigned()[0], b.assigned()[0]);
    // Heartbeats are written on the first turn and read within a few polls (a commit interval
    // more exactly-once).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(a.peers() == 1 && b.peers() == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the instances never saw each other"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (a, b, pa, pb)
}

/// Segment names with `prefix` placed on `partition` (of 2) by murmur2.
fn names_on(partition: i32, n: usize, name: impl Fn(usize) -> String) -> Vec<String> {
    (0..1000)
        .map(name)
        .filter(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == partition)
        .take(n)
        .collect()
}

/// Sends breaching events for `segments` every 50 ms for `secs`, collecting the commands.
fn breach_and_collect(
    bs: &str,
    topics: &TopicsConfig,
    segments: &[String],
    secs: u64,
) -> Vec<RemediationCommand> {
    let p = producer(bs);
    let actions = Reader::new(bs, &topics.actions.name, 2);
    let mut commands = Vec::new();
    let mut last = std::time::Instant::now() - Duration::from_secs(1);
    actions.until(
        Duration::from_secs(secs),
        || {
            if last.elapsed() >= Duration::from_millis(50) {
                last = std::time::Instant::now();
                let now = SystemClock.now_ms();
                for s in segments {
                    telemetry(&p, &topics.telemetry.name, s, now, 1.0);
                }
                p.flush(Duration::from_secs(15)).unwrap();
            }
        },
        |m| {
            commands.push(decode_command(m.payload()?));
            None::<()>
        },
    );
    commands
}

/// Issue #23: a parent and its children owned by different instances breach in the same
/// windows. The parent acts; its children, on the other instance, are inhibited (before,
/// each instance saw only its own segments under action and the children acted too).
#[test]
fn a_parent_and_its_children_owned_apart_breaching_together_only_the_parent_acts() {
    let bs = broker_bootstrap();
    let group = format!("g-tree-{}", std::process::id());
    let sets = topics("tree");
    let t = config_with(&bs, &group, &sets).topics;
    let (a, b, pa, pb) = two_instances(&sets, &group, &long_ack_policies(100));
    let parent = names_on(pa, 1, |i| format!("cell-{i}")).remove(0);
    let children = names_on(pb, 4, |i| format!("{parent}/ep-{i}"));
    assert_eq!(children.len(), 4);
    let mut all = children.clone();
    all.push(parent.clone());
    let commands = breach_and_collect(&bs, &t, &all, 8);
    let acted: BTreeSet<&str> = commands.iter().map(|c| c.segment.as_str()).collect();
    assert_eq!(acted, BTreeSet::from([parent.as_str()]), "{commands:?}");
    let (ra, rb) = (a.stop(), b.stop());
    assert_eq!(ra.commands + rb.commands, 1, "{ra:?}\n{rb:?}");
}

/// Issue #23: a global `max_in_flight` below the partition count holds across two
/// instances, at-least-once and exactly-once (before, each instance allowed it for itself).
#[test]
fn max_in_flight_below_the_partition_count_holds_across_two_instances() {
    for mode in ["at-least-once", "exactly-once"] {
        let bs = broker_bootstrap();
        let group = format!("g-mif-{mode}-{}", std::process::id());
        let mut sets = topics(&format!("mif-{mode}"));
        sets.push(format!("delivery.mode={mode}"));
        let t = config_with(&bs, &group, &sets).topics;
        let (a, b, pa, pb) = two_instances(&sets, &group, &long_ack_policies(1));
        let mut segments = names_on(pa, 3, |i| format!("mif/a-{i}"));
        segments.extend(names_on(pb, 3, |i| format!("mif/b-{i}")));
        let commands = breach_and_collect(&bs, &t, &segments, 8);
        let ids: BTreeSet<&str> = commands.iter().map(|c| c.command_id.as_str()).collect();
        for c in &commands {
            // The claim's round trip, as the closing figures quote it.
            eprintln!(
                "{mode}: window end -> command issued: {} ms",
                c.issued_at_ms - c.reason.window_end_ms
            );
        }
        assert_eq!(
            ids.len(),
            1,
            "{mode}: one command in flight in the group: {commands:?}"
        );
        let (ra, rb) = (a.stop(), b.stop());
        assert_eq!(ra.commands + rb.commands, 1, "{mode}: {ra:?}\n{rb:?}");
    }
}
