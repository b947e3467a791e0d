//! The admin surface of a real `segloop run` process (on librdkafka's mock cluster, which
//! listens on a loopback port the child connects to): bounded against hostile clients,
//! authenticated for changes, always answering health and metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;

const TOKEN: &str = "admin-test-token-3f9a";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(pid field)` of /proc/<pid>/status, e.g. VmRSS in kB, Threads.
fn proc_status(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A raw request on a new connection: (status, body, time to answer).
fn request(addr: SocketAddr, raw: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body, started.elapsed())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, Duration) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let (s, b, _) = request(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    (s, b)
}

struct Running {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    dir: tempfile::TempDir,
    proc: Proc,
    addr: SocketAddr,
}

/// A `segloop run` process with its admin API on a free port and a bearer token from the
/// environment, healthy.
fn start() -> Running {
    let cluster = MockCluster::new(1).unwrap();
    let bs = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("segloop.toml");
    std::fs::write(
        &cfg,
        format!(
            "[kafka]\nbootstrap_servers = \"{bs}\"\npartitions = 2\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\
             token_env = \"SEGLOOP_TEST_ADMIN_TOKEN\"\n[logging]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let config = segloop::config::Config::load(&segloop::config::Sources {
        file: Some(&cfg),
        env: &[("SEGLOOP_TEST_ADMIN_TOKEN".to_string(), TOKEN.to_string())].into(),
        overrides: &[],
    })
    .unwrap();
    segloop::kafka::create_embedded_topics(&cluster, &config).unwrap();
    let proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("SEGLOOP_TEST_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(addr).is_ok() && get(addr, "/healthz").0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "segloop run never became healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Running {
        _cluster: cluster,
        dir,
        proc,
        addr,
    }
}

/// Memory a hostile client may cost at most (RSS growth).
const RSS_BOUND_KB: u64 = 64 * 1024;
/// Longest a health probe may wait while the server is under attack (a loaded CI machine).
const PROBE_BOUND: Duration = Duration::from_secs(5);

#[test]
fn hostile_requests_cost_nothing_and_health_keeps_answering() {
    let r = start();
    let pid = r.proc.0.id();
    let rss_before = proc_status(pid, "VmRSS:");

    // A Content-Length bomb on a GET, its "body" trickling in slowly.
    let mut bomb = TcpStream::connect(r.addr).unwrap();
    bomb.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
        .unwrap();
    // A body bomb on a POST: refused before reading.
    let (status, _) = {
        let (s, b, _) = request(
            r.addr,
            &format!(
                "POST /silences HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000000000\r\nConnection: close\r\n\r\n{{"
            ),
        );
        (s, b)
    };
    assert_eq!(status, 413);
    let mut slowest = Duration::ZERO;
    for _ in 0..15 {
        let _ = bomb.write_all(b"xxxxxxxx");
        let (status, _, took) = get(r.addr, "/healthz");
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        let (status, _, took) = get(r.addr, "/metrics");
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(slowest < PROBE_BOUND, "a probe took {slowest:?}");

    // A 1 MiB header and a 1 MiB URL: refused, nothing kept.
    let big = "a".repeat(1 << 20);
    let (status, _, _) = request(
        r.addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"),
    );
    assert!(status == 431 || status == 0, "{status}");
    let (status, _, _) = request(
        r.addr,
        &format!("GET /segments/{big} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    );
    assert!(status == 431 || status == 414 || status == 0, "{status}");

    // A percent-escape into a multibyte character, and invalid UTF-8: 4xx, still serving.
    let (status, _, _) = get(r.addr, "/segments/%a\u{e9}x");
    assert!((400..500).contains(&status), "{status}");
    let (status, _, _) = get(r.addr, "/segments/%ff%fe");
    assert_eq!(status, 400);
    let (status, _, _) = get(r.addr, "/healthz");
    assert_eq!(status, 200);

    let grown = proc_status(pid, "VmRSS:").saturating_sub(rss_before);
    eprintln!("hostile requests: RSS {rss_before} kB, grew {grown} kB; slowest probe {slowest:?}");
    assert!(grown < RSS_BOUND_KB, "RSS grew {grown} kB");
    drop(bomb);
}

#[test]
fn three_thousand_idle_connections_cost_no_threads() {
    let r = start();
    let pid = r.proc.0.id();
    let threads_before = proc_status(pid, "Threads:");
    let rss_before = proc_status(pid, "VmRSS:");
    let idle: Vec<TcpStream> = (0..3000)
        .filter_map(|_| TcpStream::connect(r.addr).ok())
        .collect();
    assert!(idle.len() >= 2900, "only {} connected", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    let (status, _, took) = get(r.addr, "/healthz");
    assert_eq!(status, 200);
    assert!(took < PROBE_BOUND, "{took:?}");
    let threads = proc_status(pid, "Threads:");
    let grown = proc_status(pid, "VmRSS:").saturating_sub(rss_before);
    eprintln!(
        "{} idle connections: threads {threads_before} -> {threads}, RSS grew {grown} kB, probe {took:?}",
        idle.len()
    );
    assert!(
        threads <= threads_before + 2,
        "threads {threads_before} -> {threads}"
    );
    assert!(grown < RSS_BOUND_KB, "RSS grew {grown} kB");
    drop(idle);
}

#[test]
fn changes_need_the_token_and_silences_are_validated() {
    let r = start();
    let body =
        r#"{"segments":"eu-1/**","duration":"30m","comment":"maintenance","created_by":"ana"}"#;
    assert_eq!(send(r.addr, "POST", "/silences", None, body).0, 401);
    assert_eq!(
        send(r.addr, "POST", "/silences", Some("wrong"), body).0,
        401
    );
    let (status, resp) = send(r.addr, "POST", "/silences", Some(TOKEN), body);
    assert_eq!(status, 201, "{resp}");
    let created: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(created["silence"]["ends_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let (status, resp) = send(
        r.addr,
        "POST",
        "/silences",
        Some(TOKEN),
        r#"{"segments":"**","duration":"300000000years","comment":"x","created_by":"y"}"#,
    );
    assert_eq!(status, 400, "{resp}");
    assert!(resp.contains("90d"), "{resp}");
    // Listed once read back from the control topic.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(r.addr, "/silences").1.contains(&id) {
        assert!(Instant::now() < deadline, "the silence never showed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        send(r.addr, "DELETE", &format!("/silences/{id}"), None, "").0,
        401
    );

    // The command line, with the token from the config's environment variable.
    let cfg = r.dir.path().join("segloop.toml");
    let cli = |args: &[&str], token: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_segloop"));
        c.arg("silence").args(args).arg("--config").arg(&cfg);
        match token {
            Some(t) => c.env("SEGLOOP_TEST_ADMIN_TOKEN", t),
            None => c.env_remove("SEGLOOP_TEST_ADMIN_TOKEN"),
        };
        c.output().unwrap()
    };
    let out = cli(&["list"], Some(TOKEN));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = cli(&["expire", &id], Some("wrong"));
    assert_eq!(out.status.code(), Some(1), "a refused change exits 1");
    let out = cli(&["expire", &id], Some(TOKEN));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        &[
            "add",
            "--segments",
            "us-1/**",
            "--duration",
            "5m",
            "--comment",
            "deploy",
            "--created-by",
            "ana",
        ],
        Some(TOKEN),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["list"], None);
    assert_eq!(out.status.code(), Some(2), "no token: a config error");
}

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[admin]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["check-config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.listen") && err.contains("token"),
        "{err}"
    );
}
