//! Fault tests on a real Apache Kafka broker (`scripts/kafka.sh start`): kill -9 mid-incident
//! in both delivery modes, acknowledgements that arrive while the owner is down, a rebalance
//! that moves an in-flight command, and a broker restart mid-stream with record accounting.
//! Enabled by `--features kafka-broker-tests`; without a broker these tests fail, never skip.
#![cfg(feature = "kafka-broker-tests")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use segloop::clock::{Clock, SystemClock};
use segloop::model::{OutcomeStatus, RemediationCommand};

fn tag(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), SystemClock.now_ms())
}

/// Feeds `seg` (error rate `error`) every 50 ms until a record of `topic` satisfies `f`.
fn feed_until<T>(
    bs: &str,
    tag: &str,
    topic: &str,
    seg: &str,
    error: f64,
    f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<T>,
) -> Option<T> {
    let p = producer(bs);
    let reader = Reader::new(bs, &format!("rk.{tag}.{topic}"), 2);
    reader.until(
        Duration::from_secs(90),
        || {
            telemetry(
                &p,
                &format!("rk.{tag}.telemetry"),
                seg,
                SystemClock.now_ms(),
                error,
            );
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        f,
    )
}

/// Waits (up to 60 s) until the state topic holds a record for `seg` (read committed).
fn wait_for_state(bs: &str, tag: &str, seg: &str) {
    use rdkafka::Message;
    let topic = format!("rk.{tag}.state");
    let c = from_beginning(bs, &topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            if m.key() == Some(seg.as_bytes()) && m.payload().is_some_and(|p| !p.is_empty()) {
                return;
            }
        }
    }
    panic!("no state record for {seg} in {topic} within 60 s");
}

fn command_for(
    seg: &str,
) -> impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<RemediationCommand> + '_ {
    move |m| Some(decode_command(m.payload()?)).filter(|c| c.segment == seg)
}

fn resolved_for(
    seg: &str,
) -> impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<Option<String>> + '_ {
    move |m| {
        let d = decode_decision(m.payload()?);
        (d.segment == seg && d.to_state == "resolved").then_some(d.command_id)
    }
}

/// The actuator's APPLIED for `cmd`, on the test's outcomes topic.
fn applied(bs: &str, tag: &str, cmd: &RemediationCommand) {
    let p = producer(bs);
    outcome(
        &p,
        &format!("rk.{tag}.outcomes"),
        cmd,
        OutcomeStatus::Applied,
        None,
    );
}

/// kill -9 mid-incident, the acknowledgement written while the process is down, restart:
/// the restored state holds the in-flight command, the ack is applied, the fix verified.
fn kill9_mid_incident(mode: &str) {
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = tag(&format!("kill9-{mode}"));
    let port = free_port();
    let cfg = process_config(
        dir.path(),
        &bs,
        &tag,
        port,
        &format!("mode = \"{mode}\"\ntransactional_id = \"tx-{tag}\""),
    );
    let mut a = spawn(&cfg);
    wait_assigned(port, 2);
    let seg = "crash/seg-1";
    let cmd = feed_until(&bs, &tag, "actions", seg, 1.0, command_for(seg))
        .expect("a command for the failing segment");
    assert_eq!(cmd.attempt, 1);
    // The in-flight command is in the changelog (committed, in exactly-once mode), and a few
    // commit intervals (200 ms) pass for the offsets: the kill waits for the state it tests
    // instead of guessing how long writing it takes.
    wait_for_state(&bs, &tag, seg);
    std::thread::sleep(Duration::from_millis(1000));
    signal(&a, "-KILL");
    a.wait().unwrap();

    // The actuator acknowledges while nobody owns the segment.
    applied(&bs, &tag, &cmd);

    let mut b = spawn(&cfg);
    wait_assigned(port, 2);
    let resolved = feed_until(&bs, &tag, "decisions", seg, 0.0, resolved_for(seg))
        .expect("the incident resolves after the restart");
    assert_eq!(resolved.as_deref(), Some(cmd.command_id.as_str()));

    let commands: Vec<RemediationCommand> = read_all(&bs, &format!("rk.{tag}.actions"), |b| {
        Some(decode_command(b))
    })
    .into_iter()
    .filter(|c| c.segment == seg)
    .collect();
    // No retry: the restored loop knew its command and took the ack from the downtime.
    assert!(
        commands.iter().all(|c| c.command_id == cmd.command_id),
        "{commands:?}"
    );
    if mode == "exactly-once" {
        assert_eq!(
            commands.len(),
            1,
            "duplicates under exactly-once: {commands:?}"
        );
    }
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success());
}

#[test]
fn kill9_mid_incident_at_least_once_restores_and_resolves() {
    kill9_mid_incident("at-least-once");
}

#[test]
fn kill9_mid_incident_exactly_once_restores_without_duplicates() {
    kill9_mid_incident("exactly-once");
}

/// `n` healthy records of 500 other segments, stamped now.
fn backlog(p: &rdkafka::producer::BaseProducer, topic: &str, n: usize) {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use segloop::codec::{build_codec, CodecKind};
    let codec = build_codec::<segloop::model::TelemetryEvent>(
        CodecKind::AvroSingleObject,
        &Default::default(),
    )
    .unwrap();
    let now = SystemClock.now_ms();
    let mut bytes = Vec::new();
    for i in 0..n {
        let e = segloop::model::TelemetryEvent {
            segment: format!("noise/seg-{}", i % 500),
            ts_ms: now,
            measurements: [("error".to_string(), 0.0)].into(),
            labels: Default::default(),
            event_id: None,
        };
        bytes.clear();
        codec.encode(&e, &mut bytes).unwrap();
        let mut record = rdkafka::producer::BaseRecord::to(topic)
            .key(&e.segment)
            .payload(&bytes);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    p.poll(Duration::from_millis(10));
                    record = r;
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// Waits (up to 60 s) until the state topic holds a record of `seg` with a loop in `phase`.
fn wait_for_phase(bs: &str, tag: &str, seg: &str, phase: &str) {
    let topic = format!("rk.{tag}.state");
    let c = from_beginning(bs, &topic);
    let needle = format!("\"phase\":\"{phase}\"");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            if m.key() == Some(seg.as_bytes())
                && m.payload()
                    .is_some_and(|p| String::from_utf8_lossy(p).contains(&needle))
            {
                return;
            }
        }
    }
    panic!("no state record of {seg} in {phase} within 60 s");
}

/// kill -9 while a fix is being verified, down longer than `verify_within` (issue #17,
/// observation 2): the telemetry of the downtime is healthy, so the restarted process must
/// read it before judging the verify deadline, and resolve the incident with its one command
/// (it used to judge the deadline on its first tick: "ineffective", and a needless retry).
#[test]
fn kill9_during_verification_resolves_on_the_evidence_with_one_command() {
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = tag("kill9-verify");
    let port = free_port();
    let cfg = process_config(dir.path(), &bs, &tag, port, "");
    let mut a = spawn(&cfg);
    wait_assigned(port, 2);
    let seg = "verify/seg-1";
    let cmd = feed_until(&bs, &tag, "actions", seg, 1.0, command_for(seg))
        .expect("a command for the failing segment");
    applied(&bs, &tag, &cmd);
    wait_for_phase(&bs, &tag, seg, "verifying");
    std::thread::sleep(Duration::from_millis(1000));
    signal(&a, "-KILL");
    a.wait().unwrap();

    // While nobody runs: a backlog of other segments (the restarted process reads it over
    // many turns, ticking in between), then the segment healthy for 8 s, longer than
    // verify_within (5 s).
    let p = producer(&bs);
    let topic = format!("rk.{tag}.telemetry");
    backlog(&p, &topic, 150_000);
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(8) {
        telemetry(&p, &topic, seg, SystemClock.now_ms(), 0.0);
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut b = spawn(&cfg);
    wait_assigned(port, 2);
    let resolved = feed_until(&bs, &tag, "decisions", seg, 0.0, resolved_for(seg))
        .expect("the incident resolves after the restart");
    assert_eq!(resolved.as_deref(), Some(cmd.command_id.as_str()));
    let decisions: Vec<(String, String)> = read_all(&bs, &format!("rk.{tag}.decisions"), |b| {
        Some(decode_decision(b))
    })
    .into_iter()
    .filter(|d| d.segment == seg)
    .map(|d| (d.to_state, d.trigger))
    .collect();
    assert!(
        !decisions.iter().any(|(_, t)| t == "ineffective"),
        "judged ineffective before the evidence was read: {decisions:?}"
    );
    let commands: Vec<RemediationCommand> = read_all(&bs, &format!("rk.{tag}.actions"), |b| {
        Some(decode_command(b))
    })
    .into_iter()
    .filter(|c| c.segment == seg)
    .collect();
    assert_eq!(commands.len(), 1, "one command, no retry: {commands:?}");
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success());
}

#[test]
fn rebalance_moves_an_in_flight_command_and_the_new_owner_closes_the_loop() {
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = tag("moved");
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn(&process_config(dir.path(), &bs, &tag, port_a, ""));
    wait_assigned(port_a, 2);
    let mut b = spawn(&process_config(dir.path(), &bs, &tag, port_b, ""));
    wait_assigned(port_b, 1);
    wait_assigned(port_a, 1);
    let pa = assigned_of(port_a)[0] as i32;
    let seg = (0..100)
        .map(|i| format!("moved/seg-{i}"))
        .find(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == pa)
        .unwrap();
    let cmd = feed_until(&bs, &tag, "actions", &seg, 1.0, command_for(&seg))
        .expect("A commands its segment");
    // A leaves (its partition moves to B with the command in flight).
    signal(&a, "-TERM");
    assert!(a.wait().unwrap().success());
    wait_assigned(port_b, 2);
    applied(&bs, &tag, &cmd);
    let resolved = feed_until(&bs, &tag, "decisions", &seg, 0.0, resolved_for(&seg))
        .expect("B closes the loop A opened");
    assert_eq!(resolved.as_deref(), Some(cmd.command_id.as_str()));
    let retries = read_all(&bs, &format!("rk.{tag}.actions"), |b| {
        Some(decode_command(b))
    })
    .into_iter()
    .filter(|c| c.segment == seg && c.command_id != cmd.command_id)
    .count();
    assert_eq!(retries, 0, "B re-issued or retried the moved command");
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success());
}

/// A broker of its own, restarted while telemetry flows: segloop (exactly-once) reconnects,
/// and every record produced is counted once, in a judged window or in the DLQ.
#[test]
fn broker_restart_mid_stream_loses_nothing_and_counts_every_record_once() {
    let kdir = format!("/tmp/segloop-kafka-restart-{}", std::process::id());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh");
    let kafka = |cmd: &str| {
        let out = Command::new(script)
            .arg(cmd)
            .env("SEGLOOP_KAFKA_DIR", &kdir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kafka.sh {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    kafka("start");
    struct Stop<'a>(&'a dyn Fn(&str));
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            (self.0)("stop");
        }
    }
    let _stop = Stop(&kafka);
    let bs = std::fs::read_to_string(format!("{kdir}/bootstrap"))
        .unwrap()
        .trim()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let tag = tag("restart");
    let port = free_port();
    let cfg = process_config(
        dir.path(),
        &bs,
        &tag,
        port,
        &format!("mode = \"exactly-once\"\ntransactional_id = \"tx-{tag}\""),
    );
    let mut seg_proc = spawn(&cfg);
    wait_assigned(port, 2);

    // 30 segments, 10 events/s each for 16 s; the broker restarts 5 s in.
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();
    let topic = format!("rk.{tag}.telemetry");
    let started = Instant::now();
    let mut restarted = false;
    let mut produced = 0u64;
    while started.elapsed() < Duration::from_secs(16) {
        if !restarted && started.elapsed() > Duration::from_secs(5) {
            restarted = true;
            kafka("restart");
        }
        let now = SystemClock.now_ms();
        for i in 0..30 {
            telemetry(&producer, &topic, &format!("rs/seg-{i}"), now, 0.0);
            produced += 1;
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(100));
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    assert!(restarted);

    // Every record ends in a judged window or the DLQ, exactly once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut windowed, mut dlq) = (0.0, 0usize);
    while Instant::now() < deadline {
        windowed = metric(port, "segloop_windowed_events_total").unwrap_or(0.0);
        dlq = read_all(&bs, &format!("rk.{tag}.dlq"), |_| Some(())).len();
        if windowed as u64 + dlq as u64 >= produced {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        windowed as u64 + dlq as u64,
        produced,
        "windowed {windowed} + dlq {dlq} != produced {produced}"
    );
    signal(&seg_proc, "-TERM");
    assert!(seg_proc.wait().unwrap().success());
}

/// A dead letter as read back from the DLQ: its source offset, its payload length, and the
/// original size when it was truncated.
#[derive(Debug)]
struct DeadLetter {
    partition: i32,
    offset: i64,
    len: usize,
    original_size: Option<usize>,
    code: String,
}

fn dead_letters(bs: &str, topic: &str) -> Vec<DeadLetter> {
    use rdkafka::message::Headers;
    let c = from_beginning(bs, topic);
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            last = Instant::now();
            let h = m.headers().expect("dead letters carry headers");
            let get = |name: &str| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| std::str::from_utf8(x.value?).ok().map(str::to_string))
            };
            out.push(DeadLetter {
                partition: get("segloop.source.partition").unwrap().parse().unwrap(),
                offset: get("segloop.source.offset").unwrap().parse().unwrap(),
                len: m.payload().map_or(0, <[u8]>::len),
                original_size: get("segloop.original.size").map(|s| s.parse().unwrap()),
                code: get("segloop.error.code").unwrap_or_default(),
            });
        }
    }
    out
}

/// Two segments, one per partition of a two-partition topic.
fn one_per_partition(prefix: &str) -> [String; 2] {
    let find = |p: i32| {
        (0..100)
            .map(|i| format!("{prefix}/seg-{i}"))
            .find(|s| segloop::kafka::murmur2_partition(s.as_bytes(), 2) == p)
            .unwrap()
    };
    [find(0), find(1)]
}

/// Bad records in the re-read range of a restart (issue #19, observation 1): each partition's
/// commit floor is held back by an open window (an event 8 s ahead), bad records follow and
/// reach the DLQ, and the range is re-read by a new process (kill -9 and restart, at least
/// once) or by a second member the partitions are handed to (SIGTERM, exactly once). The dead-letter mark in the changelog makes the DLQ hold each bad record
/// exactly once (before it, every restart wrote them again).
fn dead_letters_once_across_a_restart(mode: &str, stop: &str) {
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = tag(&format!("dlq-once-{mode}"));
    let port = free_port();
    let delivery = if mode == "exactly-once" {
        format!("mode = \"{mode}\"\ntransactional_id = \"tx-{tag}\"")
    } else {
        String::new()
    };
    let cfg = process_config(dir.path(), &bs, &tag, port, &delivery);
    let mut a = spawn(&cfg);
    wait_assigned(port, 2);
    let p = producer(&bs);
    let topic = format!("rk.{tag}.telemetry");
    let now = SystemClock.now_ms();
    for seg in one_per_partition("hold") {
        telemetry(&p, &topic, &seg, now + 8_000, 0.0);
    }
    let bad = 20;
    for i in 0..bad {
        p.send(
            rdkafka::producer::BaseRecord::to(&topic)
                .key(&format!("bad/seg-{i}"))
                .payload(&b"not avro"[..]),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    let dlq = format!("rk.{tag}.dlq");
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_letters(&bs, &dlq).len() < bad {
        assert!(
            Instant::now() < deadline,
            "the bad records never reached the DLQ"
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (mut b, port_b) = if stop == "-TERM" {
        // A hand-off: a second member joins (one partition moves to it), then the first
        // stops gracefully and the second takes the other one too.
        let port_b = free_port();
        let cfg_b = process_config(
            dir.path(),
            &bs,
            &tag,
            port_b,
            &delivery.replace("tx-", "tx-b-"),
        );
        let b = spawn(&cfg_b);
        wait_assigned(port_b, 1);
        signal(&a, "-TERM");
        assert!(a.wait().unwrap().success());
        (b, port_b)
    } else {
        signal(&a, "-KILL");
        a.wait().unwrap();
        (spawn(&cfg), port)
    };
    wait_assigned(port_b, 2);
    // Time for the re-read, with fresh telemetry (as far ahead as the held events, so none is
    // late) closing the held windows.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        for seg in one_per_partition("fresh") {
            telemetry(&p, &topic, &seg, SystemClock.now_ms() + 8_000, 0.0);
        }
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let letters: Vec<DeadLetter> = dead_letters(&bs, &dlq);
    assert!(
        letters.iter().all(|d| d.code == "bad_magic"),
        "only the bad records: {letters:?}"
    );
    let distinct: std::collections::BTreeSet<(i32, i64)> =
        letters.iter().map(|d| (d.partition, d.offset)).collect();
    assert_eq!(distinct.len(), bad, "{letters:?}");
    assert_eq!(
        letters.len(),
        bad,
        "each bad record exactly once in the DLQ across the restart"
    );
    signal(&b, "-TERM");
    assert!(b.wait().unwrap().success());
}

#[test]
fn dead_letters_once_across_kill9_at_least_once() {
    dead_letters_once_across_a_restart("at-least-once", "-KILL");
}

#[test]
fn dead_letters_once_across_sigterm_exactly_once() {
    dead_letters_once_across_a_restart("exactly-once", "-TERM");
}

/// Records too large for the DLQ (issue #21, observation 4): a 2 MB and a 10 MiB record on a
/// telemetry topic that accepts them go to the DLQ truncated, with headers giving their
/// original size and coordinates (they used to fail with MessageSizeTooLarge while counted,
/// and the commit moved past them).
#[test]
fn oversized_records_reach_the_dlq_truncated() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let bs = broker_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = tag("dlq-big");
    let topic = format!("rk.{tag}.telemetry");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = rt
        .block_on(
            admin.create_topics(
                &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))
                    .set("max.message.bytes", "16777216")],
                &AdminOptions::new(),
            ),
        )
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let port = free_port();
    let cfg = process_config(dir.path(), &bs, &tag, port, "");
    let mut a = spawn(&cfg);
    wait_assigned(port, 2);
    let p: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("message.max.bytes", "20000000")
        .create()
        .unwrap();
    let sizes = [2_000_000usize, 10 << 20];
    for (i, size) in sizes.iter().enumerate() {
        let mut value = b"not avro".to_vec();
        value.resize(*size, 7);
        p.send(
            rdkafka::producer::BaseRecord::to(&topic)
                .key(&format!("big/seg-{i}"))
                .payload(&value),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    let dlq = format!("rk.{tag}.dlq");
    let deadline = Instant::now() + Duration::from_secs(60);
    let letters = loop {
        let l = dead_letters(&bs, &dlq);
        if l.len() >= 2 || Instant::now() > deadline {
            break l;
        }
    };
    assert_eq!(letters.len(), 2, "{letters:?}");
    let mut originals: Vec<usize> = letters.iter().filter_map(|d| d.original_size).collect();
    originals.sort_unstable();
    assert_eq!(originals, sizes, "{letters:?}");
    for d in &letters {
        assert_eq!(d.code, "bad_magic");
        assert!(
            d.len > 900_000 && d.len < 1_000_000,
            "truncated to fit: {d:?}"
        );
    }
    signal(&a, "-TERM");
    assert!(a.wait().unwrap().success());
}
