//! The loop on a real Apache Kafka broker (KRaft, from `scripts/kafka.sh start`).
//! Enabled by `--features kafka-broker-tests`; without a broker these tests fail, never skip.
#![cfg(feature = "kafka-broker-tests")]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer};
use segloop::codec::{build_codec, CodecKind};
use segloop::model::{OutcomeStatus, TelemetryEvent};
use segloop::runtime::{Clock, SystemClock};

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
    let t = cfg.topics.clone();
    let mut inst = Instance::start(cfg);
    inst.admin();
    let p = producer(&bs);
    let actions = Reader::new(&bs, &t.actions.name, 2);
    let mut bad = true;
    let mut feed = |b: Option<bool>| {
        if let Some(b) = b {
            bad = b;
        }
        let now = SystemClock.now_ms();
        telemetry(&p, &t.telemetry.name, "real/ok", now, 0.0);
        telemetry(
            &p,
            &t.telemetry.name,
            "real/bad",
            now,
            if bad { 1.0 } else { 0.0 },
        );
        p.flush(Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    };
    let cmd = actions
        .until(
            Duration::from_secs(60),
            || feed(None),
            |m| Some(decode_command(m.payload()?)),
        )
        .expect("a command on real Kafka");
    assert_eq!(cmd.segment, "real/bad");
    outcome(&p, &t.outcomes.name, &cmd, OutcomeStatus::Accepted, Some(1));
    outcome(&p, &t.outcomes.name, &cmd, OutcomeStatus::Applied, Some(0));
    let decisions = Reader::new(&bs, &t.decisions.name, 2);
    let resolved = decisions.until(
        Duration::from_secs(30),
        || feed(Some(false)),
        |m| {
            let d = decode_decision(m.payload()?);
            (d.segment == "real/bad" && d.to_state == "resolved").then_some(d)
        },
    );
    assert!(resolved.is_some(), "verified after APPLIED");
    let report = inst.stop();
    assert!(
        report.commits > 0,
        "graceful shutdown committed: {report:?}"
    );
    assert_eq!(
        report.records_consumed,
        report.records_aggregated + report.records_dlq
    );
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
    p.flush(Duration::from_secs(5)).unwrap();
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(a.assigned().len() == 1 && b.assigned().len() == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "no split: a={:?} b={:?}",
            a.assigned(),
            b.assigned()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
            p.flush(Duration::from_secs(5)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| Some(decode_command(m.payload()?)),
    );
    assert_eq!(cmd.map(|c| c.segment), Some(seg));
    let rb = b.stop();
    assert!(rb.commands >= 1, "{rb:?}");
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
    let libs = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/kafka/target/kafka-libs/*"
    );
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/java/Produce.java");
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
    let mut child = Command::new("java")
        .args(["-cp", libs, src, &bs, &t.telemetry.name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("java should run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
            p.flush(Duration::from_secs(5)).unwrap();
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
    let written = segloop::demo::write_sample_history(&config, 1, 40).unwrap();
    let script = segloop::demo::sample_history(1, 40, |_| {});
    let policies = || segloop::cli::load_policy_set(&config).unwrap();
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
        .filter(|i| i.kind != segloop::demo::FaultKind::NoisyHealthy)
        .map(|i| i.segment.clone())
        .collect();
    assert_eq!(acted, expected);
    let mut small = Invocation::default();
    small.options.fetch_max_bytes = Some(2000);
    assert_eq!(a.to_json(), run(&small).to_json());

    let from = segloop::demo::SAMPLE_EPOCH_MS + 20_000;
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
