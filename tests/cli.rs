//! The `segloop` binary as a user runs it.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn segloop(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `segloop check-config config/segloop.toml --set <setting>`.
fn check_shipped_with(setting: &str) -> Output {
    segloop(
        &["check-config", "config/segloop.toml", "--set", setting],
        b"",
    )
}

#[test]
fn check_config_accepts_shipped_and_rejects_bad_with_exit_2() {
    let ok = segloop(&["check-config", "config/segloop.toml"], b"");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("[windows]"));
    assert!(!text(&ok.stderr).contains("warning: windows.max_segments"));
    // Threads say what they do to the segment cap; too many is refused, naming the field.
    let threads = check_shipped_with("engine.threads=4");
    assert!(threads.status.success());
    assert!(
        text(&threads.stderr).contains("engine.threads = 4 (4 threads)")
            && text(&threads.stderr).contains("(250000 each"),
        "{}",
        text(&threads.stderr)
    );
    let too_many = check_shipped_with("engine.threads=300");
    assert_eq!(too_many.status.code(), Some(2));
    assert!(
        text(&too_many.stderr).contains("engine.threads"),
        "{}",
        text(&too_many.stderr)
    );
    // A lowered segment cap says what eviction costs.
    let capped = check_shipped_with("windows.max_segments=500");
    assert!(capped.status.success());
    assert!(
        text(&capped.stderr).contains("windows.max_segments = 500")
            && text(&capped.stderr).contains("segloop_evicted_events_total"),
        "{}",
        text(&capped.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[kafka]\ngroupid = \"x\"\n").unwrap();
    let out = segloop(&["check-config", bad.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml:2:1") && err.contains("groupid"),
        "{err}"
    );
}

#[test]
fn decode_prints_json_for_goldens_and_coded_errors_for_garbage() {
    let golden = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/telemetry.v1.confluent.hex"),
    )
    .unwrap();
    let out = segloop(
        &[
            "decode",
            "--codec",
            "avro-confluent",
            "--schema-id-file",
            "2=schemas/history/telemetry.v1.avsc",
        ],
        &golden,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["segment"], "eu-1/checkout/payments");

    let out = segloop(&["decode"], b"c30199\nzz\n");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("record 1: truncated:"), "{err}");
    assert!(err.contains("record 2: not hex"), "{err}");
    assert_eq!(err.lines().count(), 2, "one line per bad record: {err}");
}

#[test]
fn decode_raw_bytes_and_check_the_key() {
    let line = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/telemetry.v2.single-object.hex"),
    )
    .unwrap();
    let bytes = hex::decode(line.lines().next().unwrap()).unwrap();
    let out = segloop(
        &["decode", "--raw", "--key", "eu-1/checkout/payments"],
        &bytes,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = segloop(&["decode", "--raw", "--key", "other"], &bytes);
    assert!(text(&out.stderr).contains("key_mismatch"));
}

#[test]
fn encode_then_decode_round_trips() {
    let json = br#"{"segment":"a/b","ts_ms":5,"measurements":{"x":1.5}}"#;
    let enc = segloop(&["encode", "--codec", "avro-raw"], json);
    assert!(enc.status.success(), "{}", text(&enc.stderr));
    let dec = segloop(&["decode", "--codec", "avro-raw"], &enc.stdout);
    let v: serde_json::Value = serde_json::from_slice(&dec.stdout).unwrap();
    assert_eq!(v["measurements"]["x"], 1.5);
    assert_eq!(v["labels"], serde_json::json!({}));
}

#[test]
fn schemas_lists_fingerprints_matching_fastavro() {
    let out = segloop(&["schemas"], b"");
    let s = text(&out.stdout);
    // fastavro's CRC-64-AVRO header bytes for schemas/telemetry.avsc (tests/golden)
    assert!(
        s.contains("single-object-header=c301a432be0ba4cbbd6d"),
        "{s}"
    );
}

#[test]
fn backtest_usage_errors_exit_2_and_name_the_flag() {
    let out = segloop(&["backtest"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--report"),
        "{}",
        text(&out.stderr)
    );
    let out = segloop(
        &["backtest", "--report", "/dev/null", "--from", "yesterday"],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--from") && err.contains("-6h"), "{err}");
    let out = segloop(
        &[
            "backtest",
            "--report",
            "/dev/null",
            "--actuator-success",
            "2",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("from 0 to 1"));
}

#[test]
fn bench_window_prints_measured_figures() {
    let out = segloop(
        &["bench", "window", "--segments", "500", "--events", "20000"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let get = |k: &str| -> f64 {
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {s}"))
            .parse()
            .unwrap()
    };
    assert!(get("updates_per_sec") > 0.0);
    if cfg!(feature = "counting-alloc") {
        // Measured by the counting allocator: an open window per segment costs real bytes.
        assert!(get("bytes_per_segment") > 100.0, "{s}");
    } else {
        // A production build carries no counter, and says so rather than print a guess.
        assert!(s.contains("bytes_per_segment=unmeasured"), "{s}");
    }
    // Event times span ten windows: every segment closed windows during the run.
    assert!(get("windows_closed") >= 500.0 * 9.0, "{s}");
}

#[test]
fn check_config_reports_policy_errors_with_policy_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), "policies = \"p.toml\"\n").unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        "[[policies]]\nname = \"lat\"\nwhen = \"p99(latency_ms) > and count() > 3\"\naction = \"x\"\n",
    )
    .unwrap();
    let out = segloop(
        &["check-config", dir.path().join("c.toml").to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("policy `lat`: when: column 19"), "{err}");
    assert!(err.contains("^"), "{err}");

    // A quantile of a measurement that keeps no sketch is a config error too.
    std::fs::write(
        dir.path().join("p.toml"),
        "[[policies]]\nname = \"cpu\"\nwhen = \"p99(cpu) > 0.9\"\naction = \"scale\"\n",
    )
    .unwrap();
    let out = segloop(
        &["check-config", dir.path().join("c.toml").to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("windows.quantile_measurements lacks it"));
}

#[test]
fn check_config_redacts_secrets_and_refuses_what_the_build_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"alice\"\n\"sasl.password\" = \"hunter2-s3cret\"\n",
    )
    .unwrap();
    let out = segloop(&["check-config", cfg.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!all.contains("hunter2-s3cret"), "{all}");
    assert!(all.contains("[redacted]") && all.contains("alice"), "{all}");

    std::fs::write(
        &cfg,
        "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"GSSAPI\"\n",
    )
    .unwrap();
    let out = segloop(&["check-config", cfg.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("GSSAPI"),
        "{}",
        text(&out.stderr)
    );
}

/// No broker at the address: `segloop run` gives up within `kafka.connect_timeout` with one
/// line naming the brokers and the protocol, exit 1, and never prints the password.
#[test]
fn run_without_a_reachable_broker_fails_fast_and_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &cfg,
        format!(
            "[kafka]\nbootstrap_servers = \"127.0.0.1:{port}\"\nconnect_timeout = \"2s\"\n\
             [kafka.properties]\n\"sasl.username\" = \"alice\"\n\"sasl.password\" = \"hunter2-s3cret\"\n"
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = segloop(&["run", "--config", cfg.to_str().unwrap()], b"");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        took < std::time::Duration::from_secs(10),
        "took {took:?}: {err}"
    );
    assert!(!err.contains("hunter2-s3cret"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains(&format!("127.0.0.1:{port}")) && line.contains("security.protocol=plaintext"),
        "{line}"
    );
}

/// `check-config --partitions N` says what scale-out does to each limit, and flags a limit that
/// can never be reached; it still exits 0.
#[test]
fn check_config_warns_about_limits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        "[guardrails]\nmax_in_flight = 10\n[[policies]]\nname = \"wide\"\nwhen = \"count() > 1\"\naction = \"page\"\nmax_in_flight = 20\n",
    )
    .unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "policies = \"p.toml\"\n").unwrap();
    let out = segloop(
        &["check-config", cfg.to_str().unwrap(), "--partitions", "16"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("policy wide: max_in_flight = 20 can never be reached"),
        "{err}"
    );
    assert!(
        err.contains(
            "across up to 16 instances (one per partition): guardrails.max_in_flight = 10"
        ) && err.contains("policy wide: max_in_flight = 20")
            && err.contains("exactly (overshoot 0)")
            && err.contains("waits 250ms more"),
        "the scale-out bound is stated: {err}"
    );
    assert!(
        err.contains("no policy has `escalate`") && err.contains("no command reaches a person"),
        "escalations with nowhere to go are named: {err}"
    );
    let out = segloop(
        &[
            "check-config",
            cfg.to_str().unwrap(),
            "--set",
            "delivery.mode=exactly-once",
        ],
        b"",
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("across any number of instances")
            && err.contains("up to delivery.commit_interval = 1s")
            && err.contains("waits 1s 250ms more"),
        "without --partitions the bound is stated too, with exactly-once's cost: {err}"
    );
    // A breaker that can never open is refused, naming the field and the range.
    std::fs::write(
        dir.path().join("p.toml"),
        "[guardrails]\nactuator_breaker_min_commands = 50\n[[policies]]\nname = \"wide\"\nwhen = \"count() > 1\"\naction = \"page\"\n",
    )
    .unwrap();
    let out = segloop(&["check-config", cfg.to_str().unwrap()], b"");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains("guardrails.actuator_breaker_min_commands: 50 is outside 0..=20"),
        "{}",
        text(&out.stderr)
    );
}

/// `segloop policy test` (issue #26): the shipped tests pass, run from another directory (paths
/// are relative to the test file); a wrong expectation fails with a readable diff (exit 1); an
/// invalid test file is a usage error (exit 2).
#[test]
fn policy_test_passes_the_shipped_tests_and_diffs_a_wrong_expectation() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_segloop"))
            .args(args)
            .current_dir(elsewhere.path())
            .output()
            .unwrap()
    };
    let shipped: Vec<std::path::PathBuf> = [
        "config/policies.test.toml",
        "config/demo-policies.test.toml",
    ]
    .iter()
    .map(|f| repo.join(f))
    .collect();
    let mut args: Vec<&std::ffi::OsStr> = vec!["policy".as_ref(), "test".as_ref()];
    args.extend(shipped.iter().map(|p| p.as_os_str()));
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("8 passed, 0 failed"),
        "{}",
        text(&out.stdout)
    );

    // One expectation moved a window later: exit 1, the diff names both lines.
    let wrong = std::fs::read_to_string(&shipped[0]).unwrap().replace(
        "\"w2 eu-1/checkout/api high-latency: command rollback attempt 1\"",
        "\"w3 eu-1/checkout/api high-latency: command rollback attempt 1\"",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo.join("config/policies.toml"),
        dir.path().join("policies.toml"),
    )
    .unwrap();
    let file = dir.path().join("wrong.test.toml");
    std::fs::write(&file, wrong).unwrap();
    let out = run(&["policy".as_ref(), "test".as_ref(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let s = text(&out.stdout);
    assert!(s.contains("FAIL"), "{s}");
    assert!(
        s.contains("  - w3 eu-1/checkout/api high-latency: command rollback attempt 1"),
        "{s}"
    );
    assert!(
        s.contains("  + w2 eu-1/checkout/api high-latency: command rollback attempt 1"),
        "{s}"
    );
    assert!(s.contains("4 passed, 1 failed"), "{s}");

    // An unknown field: a usage error naming it.
    std::fs::write(&file, "policies = \"policies.toml\"\nwindoe = \"10s\"\n[[case]]\nname = \"x\"\nsegment = []\nexpect = []\n").unwrap();
    let out = run(&["policy".as_ref(), "test".as_ref(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("windoe"),
        "{}",
        text(&out.stderr)
    );
}

/// Issue #25, first steps: the embedded sample works from any directory without a config (the
/// built-in demo config judges it, and says so), `--from -6h` parses as a value, and logs carry
/// no colour codes into a pipe.
#[test]
fn backtest_embedded_sample_works_anywhere_and_relative_times_parse() {
    let elsewhere = tempfile::tempdir().unwrap();
    let report = elsewhere.path().join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .current_dir(elsewhere.path())
        .args([
            "backtest",
            "--embedded-sample",
            "--sample-duration",
            "30",
            "--report",
        ])
        .arg(&report)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("judged by the demo config (built in)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI codes in a pipe: {stderr}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["totals"]["firings"].as_u64().unwrap() > 0, "{stdout}");

    // `--from -6h` is a value, not a flag: this fails only on the range it names.
    let out = segloop(
        &[
            "backtest",
            "--embedded-sample",
            "--report",
            "/dev/null",
            "--from",
            "-6h",
            "--to",
            "-7h",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(err.contains("--from"), "{err}");
}

/// CLI conventions (issue #25): every subcommand's help ends with examples (and the exit codes
/// where they say more than 0), every option has help text, and check-config takes
/// `--config/-c` like the others as well as a positional file.
#[test]
fn every_subcommand_has_examples_and_check_config_takes_dash_c() {
    for sub in [
        "run",
        "demo",
        "backtest",
        "actuator",
        "bench",
        "check-config",
        "decode",
        "encode",
        "schemas",
        "policy",
        "silence",
        "completions",
        "man",
        "tail",
        "dlq",
    ] {
        let out = segloop(&[sub, "--help"], b"");
        assert!(out.status.success(), "{sub}");
        let help = text(&out.stdout);
        assert!(
            help.contains("Example"),
            "{sub} --help has no examples:\n{help}"
        );
        if sub != "schemas" {
            assert!(
                help.contains("Exit codes"),
                "{sub} --help has no exit codes:\n{help}"
            );
        }
    }
    let help = text(&segloop(&["decode", "--help"], b"").stdout);
    for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
        let described = line.split_whitespace().count() > 2;
        assert!(described, "an option without help text: {line}");
    }
    // Completions and man pages come from the same command definition.
    for shell in ["bash", "zsh", "fish"] {
        let out = segloop(&["completions", shell], b"");
        assert!(out.status.success());
        let script = text(&out.stdout);
        assert!(
            script.contains("check-config") && script.contains("backtest"),
            "{shell}"
        );
    }
    let page = text(&segloop(&["man"], b"").stdout);
    assert!(page.contains(".TH segloop 1"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let out = segloop(&["man", "--out-dir", dir.path().to_str().unwrap()], b"");
    assert!(out.status.success());
    assert!(dir.path().join("segloop-backtest.1").is_file());
    let out = segloop(&["check-config", "-c", "config/segloop.toml"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = segloop(&["check-config"], b"");
    assert_eq!(out.status.code(), Some(2));
}

/// `segloop demo` as a user runs it after `cargo install` (issue #25): from a directory with no
/// `config/`, on the built-in demo config, and it passes.
#[test]
fn the_demo_runs_from_another_directory_on_its_built_in_config() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .current_dir(elsewhere.path())
        .args(["demo", "--duration", "40", "--seed", "3"])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stderr.contains("using the built-in demo config"),
        "{stderr}"
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("DEMO PASSED"), "{stdout}");
}
