//! Schema Registry on real parts: Apache Kafka (`scripts/kafka.sh`) and Apicurio Registry 3
//! (`scripts/registry.sh`, its Confluent API), with records written by the Python Confluent
//! client's `AvroSerializer` (`tests/python/avro_producer.py`), an implementation independent
//! of segloop's. `segloop run` and `segloop backtest` run as the user runs them: the binary,
//! a config file, from another directory.
//!
//! The registry is paused (SIGSTOP) for the outage tests, so the tests of this file take turns.
#![cfg(feature = "kafka-broker-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message as _;

/// One test at a time: the registry is shared and some tests pause it.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The registry's Confluent API: `SEGLOOP_REGISTRY_URL`, or the file `scripts/registry.sh`
/// writes (in `$SEGLOOP_REGISTRY_DIR`, default `/tmp/segloop-registry`).
fn registry_url() -> String {
    if let Ok(u) = std::env::var("SEGLOOP_REGISTRY_URL") {
        return u;
    }
    let dir =
        std::env::var("SEGLOOP_REGISTRY_DIR").unwrap_or_else(|_| "/tmp/segloop-registry".into());
    std::fs::read_to_string(format!("{dir}/url"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| panic!("no schema registry: run scripts/registry.sh start"))
}

/// `scripts/registry.sh pause|resume`.
fn registry(cmd: &str) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/registry.sh"))
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "registry.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resumes the registry when a test ends, whatever happened.
struct Thaw;
impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/registry.sh"))
            .arg("resume")
            .output();
    }
}

fn http(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let ct = "application/vnd.schemaregistry.v1+json";
    let mut resp = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("PUT", Some(b)) => agent.put(url).header("Content-Type", ct).send(b.as_bytes()),
        ("POST", Some(b)) => agent
            .post(url)
            .header("Content-Type", ct)
            .send(b.as_bytes()),
        _ => unreachable!(),
    }
    .unwrap();
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap(),
    )
}

/// Registers a schema under `subject`; its id.
fn register(url: &str, subject: &str, schema: &str) -> u32 {
    let body = serde_json::json!({ "schema": schema }).to_string();
    let (status, text) = http(
        "POST",
        &format!("{url}/subjects/{subject}/versions"),
        Some(&body),
    );
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_u64()
        .unwrap() as u32
}

/// Apicurio has no compatibility rule by default (Confluent's default is BACKWARD): set it,
/// and register a few unrelated schemas so no id of a test is one a default would guess.
fn prepare(url: &str, tag: &str) {
    let (status, text) = http(
        "PUT",
        &format!("{url}/config"),
        Some(r#"{"compatibility":"BACKWARD"}"#),
    );
    assert_eq!(status, 200, "{text}");
    for i in 0..3 {
        let schema = format!(
            r#"{{"type":"record","name":"Other{i}","fields":[{{"name":"x","type":"int"}}]}}"#
        );
        register(url, &format!("unrelated.{tag}.{i}-value"), &schema);
    }
}

/// A `segloop run` config on the real broker whose telemetry uses the Confluent framing with
/// the registry; `extra` lines go into `[schema_registry]`, `actions_confluent` makes segloop
/// register its command schema too.
fn registry_config(
    dir: &Path,
    bs: &str,
    tag: &str,
    port: u16,
    extra: &str,
    actions_confluent: bool,
) -> PathBuf {
    let path = process_config(dir, bs, tag, port, "");
    let mut text = std::fs::read_to_string(&path).unwrap();
    let codec = |text: &mut String, role: &str| {
        let table = format!("[topics.{role}]\nname = \"rk.{tag}.{role}\"\n");
        assert!(text.contains(&table));
        *text = text.replace(&table, &format!("{table}codec = \"avro-confluent\"\n"));
    };
    codec(&mut text, "telemetry");
    if actions_confluent {
        codec(&mut text, "actions");
    }
    text.push_str(&format!(
        "[schema_registry]\nurl = \"{}\"\ntimeout = \"1s\"\n{extra}\n",
        registry_url()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// `segloop run --config F` from another directory, its stderr kept in a file.
fn run_segloop(config: &Path, stderr: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(["run", "--config"])
            .arg(config)
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The Python producer (see its doc). Returns the id the registry gave and the child, still
/// running when `go` is given (it produces once that file exists).
fn python_producer(
    bs: &str,
    topic: &str,
    schema: &Path,
    count: usize,
    start_ms: i64,
    go: Option<&Path>,
) -> (u32, std::process::Child) {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/avro_producer.py"
    ))
    .args([bs, &registry_url(), topic])
    .arg(schema)
    .args([count.to_string(), "10".into(), start_ms.to_string()]);
    if let Some(go) = go {
        cmd.arg(go);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let id = line
        .strip_prefix("id ")
        .unwrap_or_else(|| panic!("the Python producer said {line:?}"))
        .trim()
        .parse()
        .unwrap();
    (id, child)
}

fn produce_all(bs: &str, topic: &str, schema: &Path, count: usize, start_ms: i64) -> u32 {
    let (id, child) = python_producer(bs, topic, schema, count, start_ms, None);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the Python producer failed");
    id
}

fn current_schema() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/telemetry.avsc"
    ))
}

fn v3_schema() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/schemas/telemetry.v3.avsc"
    ))
}

/// A version after v3 (a new optional field), written next to the test's config.
fn v4_schema(dir: &Path) -> PathBuf {
    let v3 = std::fs::read_to_string(v3_schema()).unwrap();
    let v4 = v3.replace(
        r#"{"name": "sample_rate""#,
        r#"{"name": "zone", "type": ["null", "string"], "default": null}, {"name": "sample_rate""#,
    );
    assert_ne!(v3, v4);
    let p = dir.join("telemetry.v4.avsc");
    std::fs::write(&p, v4).unwrap();
    p
}

/// Waits until the process has judged windows holding `n` events (its metric).
fn wait_windowed(port: u16, n: f64, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let w = metric(port, "segloop_windowed_events_total").unwrap_or(0.0);
        if w >= n {
            assert_eq!(w, n, "{what}: more events than produced");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {w} of {n} events windowed; readyz {}; the run's log:\n{}",
            readyz(port),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn readyz(port: u16) -> serde_json::Value {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return serde_json::Value::Null;
    };
    let _ = write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("null");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn dlq_records(bs: &str, tag: &str) -> usize {
    read_all(bs, &format!("rk.{tag}.dlq"), |b| Some(b.len())).len()
}

/// Prints how long the test has run at each phase (shown with --nocapture).
fn phase(t0: Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The interop proof: records of the Python `AvroSerializer`, one schema version, then a new
/// compatible version registered mid-stream, all decoded by a running `segloop run` with no
/// config change and no restart; segloop registered its own command schema; no id is one a
/// config default would guess. Then `segloop backtest` replays the same records through the
/// registry, and fails (no report) when the registry does not answer.
#[test]
fn python_avro_serializer_records_decode_across_a_new_version_live_and_in_a_backtest() {
    let _turn = turn();
    let t0 = Instant::now();
    let _thaw = Thaw;
    let bs = broker_bootstrap();
    let url = registry_url();
    let tag = format!("sr-interop-{}", std::process::id());
    prepare(&url, &tag);
    phase(t0, "prepare(&url, &tag);");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = registry_config(dir.path(), &bs, &tag, port, "max_wait = \"30s\"", true);
    let log = dir.path().join("run.log");
    let mut run = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    phase(t0, "wait_assigned(port, 2);");
    let topic = format!("rk.{tag}.telemetry");

    let start = now_ms() - 3_000;
    let v2 = produce_all(&bs, &topic, &current_schema(), 300, start);
    phase(
        t0,
        "let v2 = produce_all(&bs, &topic, &current_schema(), 300, st",
    );
    wait_windowed(port, 300.0, "the first version", &log);
    phase(t0, "310");
    let v3 = produce_all(&bs, &topic, &v3_schema(), 300, now_ms());
    phase(
        t0,
        "let v3 = produce_all(&bs, &topic, &v3_schema(), 300, now_ms(",
    );
    wait_windowed(port, 600.0, "both versions", &log);
    phase(t0, "312");
    assert!(v2 != v3 && v2 > 1 && v3 > 1, "ids {v2} and {v3}");
    assert_eq!(dlq_records(&bs, &tag), 0, "nothing dead-lettered");
    phase(t0, "314");
    assert_eq!(
        metric(port, "segloop_schema_registry_requests_total"),
        Some(2.0),
        "each id asked once"
    );
    let (status, versions) = http(
        "GET",
        &format!("{url}/subjects/rk.{tag}.actions-value/versions"),
        None,
    );
    assert_eq!(
        (status, versions.as_str()),
        (200, "[1]"),
        "segloop registered its command schema"
    );
    assert!(
        run.try_wait().unwrap().is_none(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    signal(&run, "-TERM");
    assert!(run.wait().unwrap().success());
    phase(t0, "assert!(run.wait().unwrap().success());");

    // The same records replayed: decoded through the registry, nothing rejected.
    let report = dir.path().join("report.json");
    let backtest = |report: &Path| {
        Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(["backtest", "--config"])
            .arg(&cfg)
            .arg("--report")
            .arg(report)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    };
    let out = backtest(&report);
    phase(t0, "let out = backtest(&report);");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["input"]["records_aggregated"], 600, "{}", r["input"]);
    assert_eq!(
        r["input"]["rejected"],
        serde_json::json!({}),
        "{}",
        r["input"]
    );

    // Registry down: the backtest fails with the cause and writes no report.
    registry("pause");
    phase(t0, "367");
    let missing = dir.path().join("none.json");
    let out = backtest(&missing);
    phase(t0, "let out = backtest(&missing);");
    registry("resume");
    phase(t0, "370");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a backtest must fail when the registry does not answer"
    );
    assert!(
        stderr.contains("schema registry did not answer"),
        "{stderr}"
    );
    assert!(!missing.exists());
}

/// A registry down at startup while unknown ids are met: the partitions wait (`/readyz`
/// false, saying why), nothing goes to the DLQ; when it answers within `max_wait`, every
/// record is decoded.
#[test]
fn a_registry_down_at_startup_is_waited_for() {
    let _turn = turn();
    let t0 = Instant::now();
    let _thaw = Thaw;
    let bs = broker_bootstrap();
    let url = registry_url();
    let tag = format!("sr-startup-{}", std::process::id());
    prepare(&url, &tag);
    phase(t0, "prepare(&url, &tag);");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = registry_config(dir.path(), &bs, &tag, port, "max_wait = \"40s\"", false);
    // segloop creates the topics; the records are written before it runs again.
    let log = dir.path().join("run.log");
    let mut first = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    phase(t0, "wait_assigned(port, 2);");
    signal(&first, "-TERM");
    assert!(first.wait().unwrap().success());
    let topic = format!("rk.{tag}.telemetry");
    let start = now_ms() - 2_000;
    produce_all(&bs, &topic, &current_schema(), 200, start);
    phase(
        t0,
        "produce_all(&bs, &topic, &current_schema(), 200, start);",
    );
    produce_all(&bs, &topic, &v3_schema(), 200, start + 2_000);
    phase(
        t0,
        "produce_all(&bs, &topic, &v3_schema(), 200, start + 2_000);",
    );

    registry("pause");
    phase(t0, "409");
    let mut run = run_segloop(&cfg, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    let waits = loop {
        let r = readyz(port);
        if let Some(w) = r["schema_waits"].as_array().filter(|w| !w.is_empty()) {
            assert_eq!(r["ready"], false);
            break w.clone();
        }
        assert!(Instant::now() < deadline, "never waited: {r}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        waits[0]
            .as_str()
            .unwrap()
            .contains("waits for the schema registry"),
        "{waits:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        metric(port, "segloop_windowed_events_total").unwrap_or(0.0),
        0.0
    );
    registry("resume");
    phase(t0, "433");
    wait_windowed(port, 400.0, "after the registry came back", &log);
    phase(t0, "434");
    assert_eq!(dlq_records(&bs, &tag), 0);
    phase(t0, "assert_eq!(dlq_records(&bs, &tag), 0);");
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(port)["schema_waits"] != serde_json::json!([]) {
        assert!(Instant::now() < deadline, "still waiting: {}", readyz(port));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(run.try_wait().unwrap().is_none());
    signal(&run, "-TERM");
    assert!(run.wait().unwrap().success());
    phase(t0, "assert!(run.wait().unwrap().success());");
}

/// The registry down mid-run: for less than `max_wait` the new version's records wait and
/// then decode; for longer, `segloop run` exits non-zero with the cause, having dead-lettered
/// nothing and committed no offset past the waiting records; the next run (registry back)
/// decodes them all.
#[test]
fn a_registry_down_mid_run_is_waited_for_up_to_max_wait_then_stops_the_run() {
    let _turn = turn();
    let t0 = Instant::now();
    let _thaw = Thaw;
    let bs = broker_bootstrap();
    let url = registry_url();
    let tag = format!("sr-midrun-{}", std::process::id());
    prepare(&url, &tag);
    phase(t0, "prepare(&url, &tag);");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = registry_config(dir.path(), &bs, &tag, port, "max_wait = \"8s\"", false);
    let log = dir.path().join("run.log");
    let mut run = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    phase(t0, "wait_assigned(port, 2);");
    let topic = format!("rk.{tag}.telemetry");
    let start = now_ms() - 2_000;
    produce_all(&bs, &topic, &current_schema(), 200, start);
    phase(
        t0,
        "produce_all(&bs, &topic, &current_schema(), 200, start);",
    );
    wait_windowed(port, 200.0, "the first version", &log);
    phase(t0, "468");

    // Down for less than max_wait: a new version's records wait, then decode.
    let go = dir.path().join("go-v3");
    let (_, producer) = python_producer(&bs, &topic, &v3_schema(), 200, now_ms(), Some(&go));
    registry("pause");
    phase(t0, "473");
    std::fs::write(&go, "").unwrap();
    assert!(producer.wait_with_output().unwrap().status.success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(run.try_wait().unwrap().is_none(), "stopped before max_wait");
    registry("resume");
    phase(t0, "478");
    wait_windowed(port, 400.0, "after a short outage", &log);
    phase(t0, "479");

    // Down for longer: the run stops with the cause.
    let go = dir.path().join("go-v4");
    let v4 = v4_schema(dir.path());
    let (v4_id, producer) = python_producer(&bs, &topic, &v4, 200, now_ms(), Some(&go));
    registry("pause");
    phase(t0, "485");
    std::fs::write(&go, "").unwrap();
    assert!(producer.wait_with_output().unwrap().status.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "never stopped");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("schema_registry.max_wait")
            && stderr.contains(&format!("schema id {v4_id}")),
        "{stderr}"
    );
    assert_eq!(
        dlq_records(&bs, &tag),
        0,
        "nothing dead-lettered for an outage"
    );

    // No committed offset passed the first record of the new version.
    let first_v4 = {
        let c = from_beginning(&bs, &topic);
        let mut first = std::collections::BTreeMap::new();
        let mut last = Instant::now();
        while last.elapsed() < Duration::from_secs(2) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                last = Instant::now();
                if m.payload().and_then(segloop::codec::confluent_schema_id) == Some(v4_id) {
                    first.entry(m.partition()).or_insert(m.offset());
                }
            }
        }
        first
    };
    assert!(!first_v4.is_empty());
    let group: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", format!("g-{tag}"))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition(&topic, p);
    }
    let committed = group
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    for (p, first) in &first_v4 {
        let c = committed.find_partition(&topic, *p).unwrap().offset();
        match c {
            rdkafka::Offset::Offset(o) => {
                assert!(o <= *first, "partition {p} committed {o} past {first}")
            }
            other => panic!("partition {p}: no committed offset ({other:?})"),
        }
    }

    // Back: the next run reads the waiting records again and decodes them.
    registry("resume");
    phase(t0, "548");
    let mut again = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    phase(t0, "wait_assigned(port, 2);");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "segloop_windowed_events_total").unwrap_or(0.0) < 200.0 {
        assert!(
            Instant::now() < deadline,
            "the waiting records were not read again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dlq_records(&bs, &tag), 0);
    phase(t0, "assert_eq!(dlq_records(&bs, &tag), 0);");
    signal(&again, "-TERM");
    assert!(again.wait().unwrap().success());
}

/// A subject whose compatibility rule refuses segloop's schema stops `segloop run` at
/// startup, naming the subject and the rule.
#[test]
fn an_incompatible_registered_schema_is_refused_at_startup() {
    let _turn = turn();
    let t0 = Instant::now();
    let bs = broker_bootstrap();
    let url = registry_url();
    let tag = format!("sr-incompatible-{}", std::process::id());
    prepare(&url, &tag);
    phase(t0, "prepare(&url, &tag);");
    let subject = format!("rk.{tag}.actions-value");
    // An earlier "command" with a field segloop's schema lacks and cannot default: under
    // BACKWARD, segloop's version cannot read it.
    register(
        &url,
        &subject,
        r#"{"type":"record","name":"RemediationCommand","namespace":"io.segloop","fields":[{"name":"ticket","type":"string"}]}"#,
    );
    let (status, text) = http(
        "PUT",
        &format!("{url}/config/{subject}"),
        Some(r#"{"compatibility":"BACKWARD"}"#),
    );
    assert_eq!(status, 200, "{text}");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = registry_config(dir.path(), &bs, &tag, port, "", true);
    let out = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["run", "--config"])
        .arg(&cfg)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&subject) && stderr.contains("compatibility rule"),
        "{stderr}"
    );
}
