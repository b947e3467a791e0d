//! Schema Registry on real parts: Apache Kafka (`scripts/kafka.sh`) and Apicurio Registry 3
//! (`scripts/registry.sh`, its Confluent API), with records written by the Python Confluent
//! client's `AvroSerializer` (`tests/python/avro_producer.py`), an implementation independent
//! of segloop's. `segloop run` and `segloop backtest` run as the user runs them: the binary,
//! a config file, from another directory.
//!
//! segloop reaches the registry through a proxy of the test's ([`Gate`]): closing it is the
//! outage (connections refused, open ones cut), while the Python producer, which goes to the
//! registry directly, registers new versions meanwhile.
#![cfg(feature = "kafka-broker-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message as _;

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

/// A TCP proxy in front of the registry, for segloop: open, it forwards; closed, it refuses
/// new connections and cuts the open ones (the registry is unreachable).
struct Gate {
    url: String,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Gate {
    fn new() -> Gate {
        let target = registry_url();
        let rest = target.strip_prefix("http://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap();
        let upstream: std::net::SocketAddr = authority.parse().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/{path}", listener.local_addr().unwrap());
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !o.load(SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let mut kept = c.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(server.try_clone().unwrap());
                drop(kept);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Gate { url, open, conns }
    }

    fn close(&self) {
        self.open.store(false, SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn open(&self) {
        self.open.store(true, SeqCst);
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
    // Tests run in parallel: the first PUT creates the rule, one racing it gets 409 (exists)
    // and its retry updates it.
    let put = || {
        http(
            "PUT",
            &format!("{url}/config"),
            Some(r#"{"compatibility":"BACKWARD"}"#),
        )
    };
    let (status, text) = match put() {
        (409, _) => put(),
        answer => answer,
    };
    assert_eq!(status, 200, "{text}");
    let (_, config) = http("GET", &format!("{url}/config"), None);
    assert!(config.contains("BACKWARD"), "{config}");
    for i in 0..3 {
        let schema = format!(
            r#"{{"type":"record","name":"Other{i}","fields":[{{"name":"x","type":"int"}}]}}"#
        );
        register(url, &format!("unrelated.{tag}.{i}-value"), &schema);
    }
}

/// A `segloop run` config on the real broker whose telemetry uses the Confluent framing with
/// the registry at `url`; `extra` lines go into `[schema_registry]`, `actions_confluent` makes
/// segloop register its command schema too.
fn registry_config(
    dir: &Path,
    bs: &str,
    tag: &str,
    port: u16,
    (url, extra): (&str, &str),
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
        "[schema_registry]\nurl = \"{url}\"\ntimeout = \"1s\"\n{extra}\n"
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// `segloop <subcommand> --config F <args>` as a user runs it: the binary, from another
/// directory.
fn segloop(subcommand: &str, config: &Path, args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segloop"));
    cmd.args([subcommand, "--config"])
        .arg(config)
        .args(args)
        .current_dir(std::env::temp_dir());
    cmd
}

/// `segloop run --config F` from another directory, its stderr kept in a file.
fn run_segloop(config: &Path, stderr: &Path) -> Proc {
    Proc(
        segloop("run", config, &[])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The Python producer (see its doc): registers `schema` under the topic's subject, produces
/// `count` records; the id the registry gave. Event times start `from_now_ms` from when the
/// producer starts producing, on its own clock: its start-up took over 10 s on a loaded
/// machine, and records stamped before it were older than windows the idle advance had
/// rightly closed meanwhile (late, dead-lettered). A batch after the first starts a few
/// seconds ahead (within `max_clock_skew`).
fn produce_all(bs: &str, topic: &str, schema: &Path, count: usize, from_now_ms: i64) -> u32 {
    produce_with_error(bs, topic, schema, count, from_now_ms, 0.0)
}

/// [`produce_all`] with every record's `error` measurement at `error`.
fn produce_with_error(
    bs: &str,
    topic: &str,
    schema: &Path,
    count: usize,
    from_now_ms: i64,
    error: f64,
) -> u32 {
    // Bounded: a producer that hangs fails the test instead of the whole suite's time.
    let out = Command::new("timeout")
        .args(["180", "python3"])
        .env("AVRO_PRODUCER_ERROR", error.to_string())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/avro_producer.py"
        ))
        .args([bs, &registry_url(), topic])
        .arg(schema)
        .args([
            count.to_string(),
            "10".into(),
            format!("now{from_now_ms:+}"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Python producer failed or took over 180 s ({:?})",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("id "))
        .unwrap_or_else(|| panic!("the Python producer said {stdout:?}"))
        .trim()
        .parse()
        .unwrap()
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

/// What each test starts from: the broker, the registry (and a gate to it), a tag naming the
/// test's topics, a `segloop run` config (see [`registry_config`]) and where its log goes.
struct Setup {
    bs: String,
    url: String,
    gate: Gate,
    tag: String,
    dir: tempfile::TempDir,
    port: u16,
    cfg: PathBuf,
    log: PathBuf,
    topic: String,
}

/// A [`Setup`] for the test `name`: segloop reaches the registry through the gate, waits at
/// most `max_wait`, and registers its command schema when `actions_confluent`.
fn setup(name: &str, max_wait: &str, actions_confluent: bool) -> Setup {
    let bs = broker_bootstrap();
    let url = registry_url();
    let gate = Gate::new();
    let tag = format!("sr-{name}-{}", std::process::id());
    prepare(&url, &tag);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = format!("max_wait = \"{max_wait}\"");
    let cfg = registry_config(
        dir.path(),
        &bs,
        &tag,
        port,
        (&gate.url, &extra),
        actions_confluent,
    );
    let log = dir.path().join("run.log");
    let topic = format!("rk.{tag}.telemetry");
    Setup {
        bs,
        url,
        gate,
        tag,
        dir,
        port,
        cfg,
        log,
        topic,
    }
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

/// The interop proof: records of the Python `AvroSerializer`, one schema version, then a new
/// compatible version registered mid-stream, all decoded by a running `segloop run` with no
/// config change and no restart; segloop registered its own command schema; no id is one a
/// config default would guess. Then `segloop backtest` replays the same records through the
/// registry, and fails (no report) when the registry does not answer.
#[test]
fn python_avro_serializer_records_decode_across_a_new_version_live_and_in_a_backtest() {
    let t0 = Instant::now();
    let Setup {
        bs,
        url,
        gate,
        tag,
        dir,
        port,
        cfg,
        log,
        topic,
    } = setup("interop", "30s", true);
    let mut run = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    phase(t0, "segloop assigned");

    let v2 = produce_all(&bs, &topic, &current_schema(), 300, -3_000);
    wait_windowed(port, 300.0, "the first version", &log);
    phase(t0, "first version windowed");
    let v3 = produce_all(&bs, &topic, &v3_schema(), 300, 3_000);
    wait_windowed(port, 600.0, "both versions", &log);
    phase(t0, "second version windowed");
    assert!(v2 != v3 && v2 > 1 && v3 > 1, "ids {v2} and {v3}");
    assert_eq!(dlq_records(&bs, &tag), 0, "nothing dead-lettered");
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

    // `segloop tail` shows them decoded through the registry too.
    let out = segloop("tail", &cfg, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 600);
    assert!(
        lines.iter().all(|l| l["value"]["segment"].is_string()),
        "{:?}",
        lines.iter().find(|l| !l["value"]["segment"].is_string())
    );

    // The same records replayed: decoded through the registry, nothing rejected.
    let backtest = |report: &Path| {
        segloop("backtest", &cfg, &["--report".as_ref(), report.as_os_str()])
            .output()
            .unwrap()
    };
    let report = dir.path().join("report.json");
    let out = backtest(&report);
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
    phase(t0, "backtest");

    // Registry unreachable: the backtest fails with the cause and writes no report.
    gate.close();
    let missing = dir.path().join("none.json");
    let out = backtest(&missing);
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
    phase(t0, "backtest without the registry");
}

/// A registry unreachable at startup while unknown ids are met: the partitions wait
/// (`/readyz` false, saying why), nothing goes to the DLQ; when it answers within `max_wait`,
/// every record is decoded.
#[test]
fn a_registry_down_at_startup_is_waited_for() {
    let t0 = Instant::now();
    let Setup {
        bs,
        gate,
        tag,
        port,
        cfg,
        log,
        topic,
        dir: _dir,
        ..
    } = setup("startup", "40s", false);
    // Records of two versions are on the topic before segloop starts (it creates the topic).
    let mut first = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    signal(&first, "-TERM");
    assert!(first.wait().unwrap().success());
    produce_all(&bs, &topic, &current_schema(), 200, -2_000);
    produce_all(&bs, &topic, &v3_schema(), 200, 3_000);
    phase(t0, "produced");

    gate.close();
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
    phase(t0, "waiting");
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
    gate.open();
    wait_windowed(port, 400.0, "after the registry came back", &log);
    phase(t0, "windowed");
    assert_eq!(dlq_records(&bs, &tag), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(port)["schema_waits"] != serde_json::json!([]) {
        assert!(Instant::now() < deadline, "still waiting: {}", readyz(port));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(run.try_wait().unwrap().is_none());
    signal(&run, "-TERM");
    assert!(run.wait().unwrap().success());
}

/// The registry unreachable mid-run: for less than `max_wait` a new version's records wait
/// and then decode; for longer, `segloop run` exits non-zero with the cause, having
/// dead-lettered nothing and committed no offset past the waiting records; the next run
/// (registry back) decodes them all.
#[test]
fn a_registry_down_mid_run_is_waited_for_up_to_max_wait_then_stops_the_run() {
    let t0 = Instant::now();
    let Setup {
        bs,
        gate,
        tag,
        dir,
        port,
        cfg,
        log,
        topic,
        ..
    } = setup("midrun", "12s", false);
    let mut run = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    produce_all(&bs, &topic, &current_schema(), 200, -2_000);
    wait_windowed(port, 200.0, "the first version", &log);
    phase(t0, "first version windowed");

    // Down for less than max_wait: a new version's records wait, then decode. Down longer
    // than the idle timeout and two lag measurements: the consumer has delivered past the
    // waiting records, and neither that nor anything measured before the seek back may let
    // the idle advance close their windows (they went to the DLQ as late).
    gate.close();
    produce_all(&bs, &topic, &v3_schema(), 200, 3_000);
    std::thread::sleep(Duration::from_secs(6));
    assert!(run.try_wait().unwrap().is_none(), "stopped before max_wait");
    assert!(metric(port, "segloop_schema_waiting_partitions").unwrap_or(0.0) > 0.0);
    gate.open();
    wait_windowed(port, 400.0, "after a short outage", &log);
    phase(t0, "short outage");

    // Down for longer: the run stops with the cause.
    gate.close();
    let v4_id = produce_all(&bs, &topic, &v4_schema(dir.path()), 200, 3_000);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = run.try_wait().unwrap() {
            break s;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "never stopped");
        std::thread::sleep(Duration::from_millis(100));
    };
    phase(t0, "stopped");
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
        match committed.find_partition(&topic, *p).unwrap().offset() {
            rdkafka::Offset::Offset(o) => {
                assert!(o <= *first, "partition {p} committed {o} past {first}")
            }
            other => panic!("partition {p}: no committed offset ({other:?})"),
        }
    }

    // Back: the next run reads the waiting records again and decodes them.
    gate.open();
    let mut again = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "segloop_windowed_events_total").unwrap_or(0.0) < 200.0 {
        assert!(
            Instant::now() < deadline,
            "the waiting records were not read again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dlq_records(&bs, &tag), 0);
    signal(&again, "-TERM");
    assert!(again.wait().unwrap().success());
    phase(t0, "read again");
}

/// Every topic on the registry: telemetry from the Python serializer, commands registered by
/// `segloop run` and read by `segloop actuator`, outcomes registered by the actuator and read
/// by `segloop run`: the loop closes (an APPLIED outcome is applied) with no id in any config.
#[test]
fn the_loop_closes_with_every_topic_on_the_registry() {
    let Setup {
        bs,
        url,
        tag,
        port,
        cfg,
        log,
        topic,
        dir: _dir,
        ..
    } = setup("loop", "30s", true);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    let outcomes = format!("[topics.outcomes]\nname = \"rk.{tag}.outcomes\"\n");
    assert!(text.contains(&outcomes));
    text = text.replace(
        &outcomes,
        &format!("{outcomes}codec = \"avro-confluent\"\n"),
    );
    text.push_str("[actuator]\nname = \"registry-test\"\n[actuator.shell]\nrollback = \"true\"\npage = \"true\"\n");
    std::fs::write(&cfg, text).unwrap();
    let mut run = run_segloop(&cfg, &log);
    wait_assigned(port, 2);
    let actuator = Proc(
        segloop("actuator", &cfg, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    produce_with_error(&bs, &topic, &current_schema(), 100, -1_000, 1.0);
    let applied = "segloop_outcomes_total{status=\"APPLIED\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, applied).unwrap_or(0.0) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no APPLIED outcome applied; the run's log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dlq_records(&bs, &tag), 0, "nothing dead-lettered");
    for subject in ["actions", "outcomes"] {
        let (status, versions) = http(
            "GET",
            &format!("{url}/subjects/rk.{tag}.{subject}-value/versions"),
            None,
        );
        assert_eq!((status, versions.as_str()), (200, "[1]"), "{subject}");
    }
    drop(actuator);
    signal(&run, "-TERM");
    assert!(run.wait().unwrap().success());
}

/// A subject whose compatibility rule refuses segloop's schema stops `segloop run` at
/// startup, naming the subject and the rule.
#[test]
fn an_incompatible_registered_schema_is_refused_at_startup() {
    let bs = broker_bootstrap();
    let url = registry_url();
    let tag = format!("sr-incompatible-{}", std::process::id());
    prepare(&url, &tag);
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
    let cfg = registry_config(dir.path(), &bs, &tag, port, (&url, ""), true);
    let out = segloop("run", &cfg, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&subject) && stderr.contains("compatibility rule"),
        "{stderr}"
    );
}

/// The registry client over TLS, against `openssl s_server` with the test CA's certificate for
/// 127.0.0.1 (from `scripts/kafka.sh`): the configured CA is trusted and another is not, and a
/// server that requires a client certificate gets the configured one. (`s_server -www` answers
/// every request with a status page: an answer that is not the API's means the handshake
/// succeeded.)
#[test]
fn the_registry_client_speaks_tls_and_mutual_tls() {
    let kafka_dir =
        std::env::var("SEGLOOP_KAFKA_DIR").unwrap_or_else(|_| "/tmp/segloop-kafka".into());
    let tls = PathBuf::from(kafka_dir).join("tls");
    assert!(
        tls.join("ca.pem").exists(),
        "no test certificates: run scripts/kafka.sh start"
    );
    let server = |mutual: bool| {
        let port = free_port();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(tls.join("broker.pem"))
            .arg("-key")
            .arg(tls.join("broker.key"));
        if mutual {
            cmd.arg("-Verify")
                .arg("1")
                .arg("-CAfile")
                .arg(tls.join("ca.pem"));
        }
        let child = Proc(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s_server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        (child, format!("https://127.0.0.1:{port}"))
    };
    let ask = |url: &str, sets: &[String]| {
        let mut all = vec![
            format!("schema_registry.url={url}"),
            "schema_registry.timeout=3s".into(),
        ];
        all.extend(sets.iter().cloned());
        let cfg = segloop::config::Config::load(&segloop::config::Sources {
            file: None,
            env: &Default::default(),
            overrides: &all,
        })
        .unwrap();
        let client = segloop::registry::Registry::from_config(&cfg.schema_registry)
            .unwrap()
            .unwrap();
        match client.schema(1) {
            Err(segloop::registry::RegistryError::Unavailable { reason, .. }) => reason,
            other => panic!("s_server cannot answer with a schema: {other:?}"),
        }
    };
    let ca = |name: &str| format!("schema_registry.ca_location={}", tls.join(name).display());
    let handshake_ok = "something else than a schema";

    let (_one_way, url) = server(false);
    let reason = ask(&url, &[ca("ca.pem")]);
    assert!(reason.contains(handshake_ok), "{reason}");
    let reason = ask(&url, &[ca("other-ca.pem")]);
    assert!(
        !reason.contains(handshake_ok),
        "a certificate of another CA was trusted: {reason}"
    );

    let (_mutual, url) = server(true);
    let reason = ask(&url, &[ca("ca.pem")]);
    assert!(
        !reason.contains(handshake_ok),
        "no client certificate, yet answered: {reason}"
    );
    let reason = ask(
        &url,
        &[
            ca("ca.pem"),
            format!(
                "schema_registry.certificate_location={}",
                tls.join("client.pem").display()
            ),
            format!(
                "schema_registry.key_location={}",
                tls.join("client.key").display()
            ),
        ],
    );
    assert!(reason.contains(handshake_ok), "{reason}");
}
