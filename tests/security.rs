//! Production Kafka on the real broker of `scripts/kafka.sh start` (its SASL_SSL and SSL
//! listeners, SCRAM users, private CA and authorizer): the loop as a SCRAM user holding exactly
//! the README's ACLs on zstd topics, over mutual TLS, reads over SCRAM-SHA-256 and PLAIN,
//! failures that end fast with the cause, and every codec the Java client writes.
//! Enabled by `--features kafka-broker-tests`; without a broker these tests fail, never skip.
#![cfg(feature = "kafka-broker-tests")]

mod common;
#[path = "support/telemetry.rs"]
mod telemetry;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use segloop::clock::{Clock, SystemClock};
use segloop::codec::{build_codec, CodecKind};
use segloop::model::TelemetryEvent;

fn kafka_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("SEGLOOP_KAFKA_DIR").unwrap_or_else(|_| "/tmp/segloop-kafka".into()),
    )
}

fn listener(name: &str) -> String {
    std::fs::read_to_string(kafka_dir().join(name))
        .unwrap_or_else(|_| panic!("no {name}: run scripts/kafka.sh start"))
        .trim()
        .to_string()
}

fn tls(file: &str) -> String {
    kafka_dir().join("tls").join(file).display().to_string()
}

fn tag(test: &str) -> String {
    format!("{test}-{}-{}", std::process::id(), SystemClock.now_ms())
}

fn topic_sets(tag: &str) -> Vec<String> {
    segloop::config::TopicsConfig::default()
        .all()
        .iter()
        .map(|(t, _)| format!("topics.{t}.name=rk.{tag}.{t}"))
        .collect()
}

/// Creates the test's topics as the super user on the plaintext listener (a locked-down
/// cluster's operators do this; segloop runs with `create_topics = false`).
fn create_topics(tag: &str, topic_compression: &str) {
    let mut sets = topic_sets(tag);
    sets.push("kafka.create_topics=true".into());
    sets.push(format!("kafka.topic_compression={topic_compression}"));
    let cfg = config_with(&broker_bootstrap(), &format!("setup-{tag}"), &sets);
    segloop::kafka::prepare_topics(&cfg).unwrap();
}

/// The README's ACL table (between `<!-- acls:start -->` and `<!-- acls:end -->`): (resource,
/// name, pattern, operations, needed by).
fn readme_acls() -> Vec<(String, String, String, Vec<String>, String)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("<!-- acls:start -->")
        .nth(1)
        .and_then(|s| s.split("<!-- acls:end -->").next())
        .expect("the README lists the ACLs between markers");
    table
        .lines()
        .filter(|l| l.starts_with('|') && !l.contains("---") && !l.contains("| resource |"))
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect();
            let ops = cells[3].split(',').map(|o| o.trim().to_string()).collect();
            (
                cells[0].clone(),
                cells[1].clone(),
                cells[2].clone(),
                ops,
                cells[4].clone(),
            )
        })
        .collect()
}

/// Grants `principal` the README rows needed by any of `roles`, minus `except` (resource name,
/// operation), through the Java admin client.
fn grant(principal: &str, tag: &str, roles: &[&str], except: Option<(&str, &str)>) -> usize {
    let mut lines = String::new();
    let mut n = 0;
    for (resource, name, pattern, ops, needed_by) in readme_acls() {
        if !roles.iter().any(|r| needed_by.split(", ").any(|x| x == *r)) {
            continue;
        }
        let name = match (resource.as_str(), name.as_str()) {
            ("Topic", role) => format!("rk.{tag}.{role}"),
            ("Group", "kafka.group_id") => format!("g-{tag}"),
            ("Group", "actuator.group_id") => format!("a-{tag}"),
            other => panic!("no mapping for README row {other:?}"),
        };
        for op in ops {
            if except == Some((name.as_str(), op.as_str())) {
                continue;
            }
            lines.push_str(&format!(
                "User:{principal} {} {} {name} {}\n",
                resource.to_uppercase(),
                pattern.to_uppercase(),
                op.to_uppercase()
            ));
            n += 1;
        }
    }
    java("Acls.java", &[&broker_bootstrap()], &lines);
    n
}

/// A config file for a process on a secured listener: `properties` is the body of
/// `[kafka.properties]`; topics `rk.<tag>.*` exist already.
fn secure_config(dir: &Path, bs: &str, tag: &str, port: u16, properties: &str) -> PathBuf {
    let policies = POLICIES.replace("ack_timeout = \"2s\"", "ack_timeout = \"15s\"");
    std::fs::write(dir.join("policies.toml"), policies).unwrap();
    let topics: String = segloop::config::TopicsConfig::default()
        .all()
        .iter()
        .map(|(t, _)| format!("[topics.{t}]\nname = \"rk.{tag}.{t}\"\n"))
        .collect();
    let path = dir.join(format!("segloop-{port}.toml"));
    std::fs::write(
        &path,
        format!(
            "policies = \"policies.toml\"\n[kafka]\nbootstrap_servers = \"{bs}\"\ngroup_id = \"g-{tag}\"\n\
             client_id = \"segloop-{port}\"\ncreate_topics = false\nconnect_timeout = \"5s\"\ncompression = \"zstd\"\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n{properties}\n\
             [windows]\nsize = \"1s\"\nout_of_orderness = \"100ms\"\nidle_timeout = \"1s\"\nmax_clock_skew = \"10s\"\n\
             segment_ttl = \"30s\"\n[delivery]\ncommit_interval = \"200ms\"\nshutdown_timeout = \"5s\"\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\n[logging]\nlevel = \"warn\"\n\
             [actuator]\ngroup_id = \"a-{tag}\"\n[actuator.shell]\nrollback = \"true\"\npage = \"true\"\n{topics}"
        ),
    )
    .unwrap();
    path
}

fn scram(user: &str, password: &str, mechanism: &str) -> String {
    format!(
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"{mechanism}\"\n\
         \"sasl.username\" = \"{user}\"\n\"sasl.password\" = {password}\n\"ssl.ca.location\" = \"{}\"\n",
        tls("ca.pem")
    )
}

fn spawn_with(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_segloop"));
    c.args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        c.env(k, v);
    }
    Proc(c.spawn().unwrap())
}

/// A zstd-compressing producer on the plaintext listener (the test's own telemetry source).
fn zstd_producer() -> rdkafka::producer::BaseProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker_bootstrap())
        .set("partitioner", "murmur2_random")
        .set("compression.type", "zstd")
        // In order across retries (see producer() in tests/common/mod.rs).
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

/// `segloop run`, `segloop actuator` and `segloop backtest` as SCRAM-SHA-512 user alice, who
/// holds exactly the README's ACL rows for them, on topics whose `compression.type` is zstd:
/// the loop closes (command, APPLIED by the actuator, verified), and the backtest replays it.
#[test]
fn a_scram_user_with_the_readme_acls_closes_the_loop_on_zstd_topics() {
    let tag = tag("acl");
    create_topics(&tag, "zstd");
    let granted = grant("alice", &tag, &["run", "actuator", "backtest"], None);
    assert!(granted >= 15, "{granted} ACLs");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = secure_config(
        dir.path(),
        &listener("sasl_bootstrap"),
        &tag,
        port,
        &scram("alice", "{ env = \"ALICE_PASSWORD\" }", "SCRAM-SHA-512"),
    );
    let env = [("ALICE_PASSWORD", "alice-secret")];
    let mut run = spawn_with(&["run"], &cfg, &env);
    let mut actuator = spawn_with(&["actuator"], &cfg, &env);
    wait_assigned(port, 2);

    let p = zstd_producer();
    let topic = |t: &str| format!("rk.{tag}.{t}");
    let bad = "acl/bad";
    let decisions = Reader::new(&broker_bootstrap(), &topic("decisions"), 2);
    let error = std::cell::Cell::new(1.0);
    let resolved = decisions.until(
        Duration::from_secs(90),
        || {
            let now = SystemClock.now_ms();
            telemetry(&p, &topic("telemetry"), "acl/ok", now, 0.0);
            telemetry(&p, &topic("telemetry"), bad, now, error.get());
            p.flush(Duration::from_secs(15)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        },
        |m| {
            let d = decode_decision(m.payload()?);
            if d.segment == bad && d.to_state == "acknowledged" {
                // The actuator answered: the fix takes effect.
                error.set(0.0);
            }
            (d.segment == bad && d.to_state == "resolved").then_some(d)
        },
    );
    assert!(resolved.is_some(), "the loop closes as alice");
    signal(&run, "-TERM");
    signal(&actuator, "-TERM");
    assert!(run.wait().unwrap().success());
    assert!(actuator.wait().unwrap().success());

    let report = dir.path().join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["backtest", "--outcomes-from-topic", "--config"])
        .arg(&cfg)
        .arg("--report")
        .arg(&report)
        .env("ALICE_PASSWORD", "alice-secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backtest as alice: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let acted: Vec<&str> = r["loops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["commands"].as_array().unwrap().is_empty())
        .map(|l| l["segment"].as_str().unwrap())
        .collect();
    assert_eq!(acted, [bad]);
}

/// The loop over mutual TLS (client certificate CN=segloop-mtls, a super user).
#[test]
fn mutual_tls_closes_the_loop() {
    let tag = tag("mtls");
    let mut sets = topic_sets(&tag);
    sets.extend([
        "kafka.create_topics=true".to_string(),
        "kafka.properties.\"security.protocol\"=SSL".into(),
        format!("kafka.properties.\"ssl.ca.location\"={}", tls("ca.pem")),
        format!(
            "kafka.properties.\"ssl.certificate.location\"={}",
            tls("client.pem")
        ),
        format!(
            "kafka.properties.\"ssl.key.location\"={}",
            tls("client.key")
        ),
    ]);
    let cfg = config_with(&listener("ssl_bootstrap"), &format!("g-{tag}"), &sets);
    close_the_loop(cfg, &broker_bootstrap(), "mtls");
}

/// Replays the test's telemetry topic in-process with `sets` and returns (read, aggregated,
/// rejected).
fn replay(tag: &str, bs: &str, sets: &[String]) -> (u64, u64, usize) {
    let mut all = topic_sets(tag);
    all.extend(sets.iter().cloned());
    let cfg = config_with(bs, &format!("g-{tag}"), &all);
    let policies = segloop::policy::PolicySet::parse(POLICIES, "test").unwrap();
    let r = segloop::backtest::execute(cfg, policies, &Default::default(), &mut |_| {}).unwrap();
    (
        r.input.records_read,
        r.input.records_aggregated,
        r.input.rejected.len(),
    )
}

/// SCRAM-SHA-256 and PLAIN over SASL_SSL read a topic as fully as the plaintext listener.
#[test]
fn scram_sha_256_and_plain_read_every_record() {
    let tag = tag("mech");
    create_topics(&tag, "producer");
    let p = producer(&broker_bootstrap());
    let start = SystemClock.now_ms();
    for i in 0..60 {
        let seg = format!("mech/s-{}", i % 6);
        p.send(
            rdkafka::producer::BaseRecord::to(&format!("rk.{tag}.telemetry"))
                .key(&seg)
                .payload(&telemetry::encode(&seg, start + i * 50, 0.0, &[])),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(15)).unwrap();
    for mechanism in ["SCRAM-SHA-256", "PLAIN"] {
        let sets = vec![
            "kafka.properties.\"security.protocol\"=SASL_SSL".to_string(),
            format!("kafka.properties.\"sasl.mechanism\"={mechanism}"),
            "kafka.properties.\"sasl.username\"=admin".into(),
            "kafka.properties.\"sasl.password\"=admin-secret".into(),
            format!("kafka.properties.\"ssl.ca.location\"={}", tls("ca.pem")),
        ];
        let got = replay(&tag, &listener("sasl_bootstrap"), &sets);
        assert_eq!(got, (60, 60, 0), "{mechanism}");
    }
}

/// Runs `segloop run` expecting it to fail: (exit code, seconds taken, its `error:` line).
fn run_failing(cfg: &Path, env: &[(&str, &str)]) -> (Option<i32>, f64, String) {
    let started = Instant::now();
    let mut c = Command::new(env!("CARGO_BIN_EXE_segloop"));
    c.args(["run", "--config"]).arg(cfg);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in: {stderr}"))
        .to_string();
    (out.status.code(), started.elapsed().as_secs_f64(), line)
}

/// A wrong password, an unknown CA, a hostname mismatch and a missing ACL each end `segloop
/// run` within `kafka.connect_timeout` (5 s here, plus start-up) with exit 1 and one line
/// naming the broker, the mechanism and the cause.
#[test]
fn connection_failures_end_fast_with_the_cause() {
    let tag = tag("fail");
    create_topics(&tag, "producer");
    let dir = tempfile::tempdir().unwrap();
    let sasl = listener("sasl_bootstrap");
    let ssl = listener("ssl_bootstrap");
    let localhost_ssl = ssl.replace("127.0.0.1", "localhost");
    let mtls = |ca: &str| {
        format!(
            "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n\
             \"ssl.certificate.location\" = \"{}\"\n\"ssl.key.location\" = \"{}\"\n",
            tls(ca),
            tls("client.pem"),
            tls("client.key")
        )
    };
    let cases: Vec<(&str, String, String, Vec<&str>)> = vec![
        (
            "wrong password",
            sasl.clone(),
            scram("alice", "\"not-the-password\"", "SCRAM-SHA-512"),
            vec!["SCRAM-SHA-512", "alice", "uthenticat", "sasl.password"],
        ),
        (
            "unknown CA",
            ssl.clone(),
            mtls("other-ca.pem"),
            vec!["security.protocol=SSL", "verify", "ssl.ca.location"],
        ),
        (
            "hostname mismatch",
            localhost_ssl.clone(),
            mtls("ca.pem"),
            vec!["security.protocol=SSL", "localhost", "ssl.ca.location"],
        ),
    ];
    for (case, bs, props, wanted) in cases {
        let cfg = secure_config(dir.path(), &bs, &tag, free_port(), &props);
        let (code, secs, line) = run_failing(&cfg, &[]);
        assert_eq!(code, Some(1), "{case}: {line}");
        assert!(secs < 15.0, "{case}: took {secs:.1} s: {line}");
        assert!(line.contains(&bs), "{case}: the broker is named: {line}");
        for w in wanted {
            assert!(line.contains(w), "{case}: {w:?} missing in: {line}");
        }
        assert!(!line.contains("not-the-password"), "{case}: {line}");
    }

    // Missing ACL: bob holds every row for `run` but Read on the telemetry topic. The error is
    // loud while it lasts (/readyz 503 naming it, the metric), then the run stops.
    let telemetry = format!("rk.{tag}.telemetry");
    grant("bob", &tag, &["run"], Some((&telemetry, "Read")));
    let port = free_port();
    let cfg = secure_config(
        dir.path(),
        &sasl,
        &tag,
        port,
        &scram("bob", "\"bob-secret\"", "SCRAM-SHA-512"),
    );
    let started = Instant::now();
    let mut bob = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut seen_unready, mut seen_metric) = (None, false);
    while bob.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(40) {
        if let Some(body) = get(port, "/readyz").filter(|b| b.contains("authorization")) {
            assert!(body.contains("\"ready\": false"), "{body}");
            seen_unready = Some(body);
        }
        seen_metric |= get(port, "/metrics").is_some_and(|m| {
            m.lines().any(|l| {
                l.starts_with("segloop_consume_errors_total{")
                    && l.contains("TopicAuthorizationFailed")
            })
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = bob.wait_with_output().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in: {stderr}"));
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(secs < 30.0, "took {secs:.1} s: {line}");
    assert!(
        line.contains(&telemetry) && line.to_lowercase().contains("authorization"),
        "the topic and the cause are named: {line}"
    );
    assert!(seen_unready.is_some(), "/readyz never named the error");
    assert!(seen_metric, "segloop_consume_errors_total never counted it");
}

/// `GET path` on the admin port of a process: the body, if it answered.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|x| x.1.to_string())
}

/// Records the Java client writes with each codec are all read and windowed.
#[test]
fn every_codec_the_java_client_writes_is_read() {
    let tag = tag("codecs");
    create_topics(&tag, "producer");
    let codec =
        build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default()).unwrap();
    let start = SystemClock.now_ms();
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    for (c, name) in codecs.iter().enumerate() {
        let mut input = String::new();
        for i in 0..100i64 {
            let seg = format!("codec/s-{}", i % 10);
            let e = TelemetryEvent {
                segment: seg.clone(),
                ts_ms: start + c as i64 * 5_000 + i * 40,
                measurements: [("error".to_string(), 0.0)].into(),
                labels: Default::default(),
                event_id: None,
            };
            let mut bytes = Vec::new();
            codec.encode(&e, &mut bytes).unwrap();
            input.push_str(&format!("{seg}\t{}\n", hex::encode(bytes)));
        }
        java(
            "Produce.java",
            &[
                &broker_bootstrap(),
                &format!("rk.{tag}.telemetry"),
                &format!("compression.type={name}"),
                "linger.ms=50",
            ],
            &input,
        );
    }
    let got = replay(&tag, &broker_bootstrap(), &[]);
    assert_eq!(
        got,
        (400, 400, 0),
        "every record of every codec read and windowed"
    );
}
