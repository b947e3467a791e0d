//! A guardrail that holds a firing back says so: `segloop run` logs the guardrail and the
//! setting in force (rate-limited), so a user is never silently disarmed.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::Producer;
use segloop::clock::{Clock, SystemClock};

#[test]
fn a_held_back_firing_is_logged_with_its_guardrail_and_limit() {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policies.toml"),
        POLICIES.replace("max_in_flight = 100", "max_in_flight = 1"),
    )
    .unwrap();
    let cfg = dir.path().join("segloop.toml");
    std::fs::write(
        &cfg,
        format!(
            "policies = \"policies.toml\"\n[kafka]\nbootstrap_servers = \"{bs}\"\npartitions = 2\n\
             [windows]\nsize = \"1s\"\nout_of_orderness = \"100ms\"\nidle_timeout = \"1s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[logging]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    segloop::kafka::create_embedded_topics(&cluster, &config(&bs, "setup")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = producer(&bs);
    let actions = Reader::new(&bs, "segloop.actions", 2);
    let started = Instant::now();
    let mut commands = Vec::new();
    while started.elapsed() < Duration::from_secs(20) && commands.is_empty() {
        commands.extend(actions.until(
            Duration::from_millis(100),
            || {
                let now = SystemClock.now_ms();
                for s in ["held/a", "held/b", "held/c"] {
                    telemetry(&p, "segloop.telemetry", s, now, 1.0);
                }
                p.flush(Duration::from_secs(15)).unwrap();
            },
            |m| Some(decode_command(rdkafka::message::Message::payload(m)?)),
        ));
    }
    assert_eq!(commands.len(), 1, "max_in_flight = 1 lets one act");
    // An undecodable record: dead-lettered, and said so.
    p.send(
        rdkafka::producer::BaseRecord::to("segloop.telemetry")
            .key("held/a")
            .payload(&b"not avro"[..]),
    )
    .unwrap();
    // A few more windows: the others stay held back.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let now = SystemClock.now_ms();
        for s in ["held/a", "held/b", "held/c"] {
            telemetry(&p, "segloop.telemetry", s, now, 1.0);
        }
        p.flush(Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = std::mem::replace(&mut child, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("firing held back by a guardrail"))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(
        lines[0].contains("max_in_flight") && lines[0].contains("guardrails.max_in_flight = 1"),
        "{}",
        lines[0]
    );
    // Rate-limited: one line per guardrail per 10 s, however many windows were held back.
    assert!(lines.len() <= 2, "{lines:?}");
    assert!(
        log.lines()
            .any(|l| l.contains("records dead-lettered") && l.contains("bad_magic")),
        "{log}"
    );
}
