//! Hostile input that used to crash, stall or exhaust segloop: deeply nested conditions, endless
//! policy files, records with tens of thousands of labels, invalid addresses and literals,
//! output to a closed pipe.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use segloop::codec::fast::TelemetryDecoder;
use segloop::codec::{build_codec, CodecKind, ErrorCode};
use segloop::model::TelemetryEvent;
use segloop::policy::PolicySet;

fn policy_with(when: &str) -> String {
    format!("[[policies]]\nname = \"deep\"\nwhen = \"{when}\"\naction = \"page\"\n",)
}

/// Conditions nested or chained far past any real one are refused with the policy and the
/// column, not a stack overflow.
#[test]
fn deep_and_long_conditions_are_refused_not_overflowed() {
    let n = 10_000;
    let cases = [
        format!("{}count() > 1{}", "(".repeat(n), ")".repeat(n)),
        format!("{}count() > 1", "not ".repeat(100_000)),
        format!("{}count() > 1", "-".repeat(100_000)),
        format!("count(){} > 1", " + 1".repeat(100_000)),
        format!("{}count() > 1{}", "(".repeat(40), ")".repeat(40)),
        "count() > 1e400".to_string(),
    ];
    for when in &cases {
        let started = Instant::now();
        let e = PolicySet::parse(&policy_with(when), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("deep"), "names the policy: {e}");
        assert!(
            e.contains("at most") || e.contains("nested") || e.contains("out of range"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Reasonable nesting still parses.
    PolicySet::parse(
        &policy_with("((count() > 1) and not (mean(error) > 0.5)) or -(-p99(latency_ms)) > 3"),
        "p.toml",
    )
    .unwrap();
}

fn segloop(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_config_refuses_what_used_to_crash_it() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("deep.toml");
    std::fs::write(
        &deep,
        policy_with(&format!(
            "{}count() > 1{}",
            "(".repeat(10_000),
            ")".repeat(10_000)
        )),
    )
    .unwrap();
    for (name, body) in [
        (
            "deep.toml",
            format!("policies = {:?}\n", deep.display().to_string()),
        ),
        ("zero.toml", "policies = \"/dev/zero\"\n".to_string()),
        (
            "port.toml",
            "[admin]\nlisten = \"127.0.0.1:99999\"\n".to_string(),
        ),
    ] {
        let cfg = dir.path().join(name);
        std::fs::write(&cfg, body).unwrap();
        let started = Instant::now();
        let out = segloop(&["check-config", cfg.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{name}");
    }
    let cfg = dir.path().join("port.toml");
    let err = String::from_utf8_lossy(&segloop(&["check-config", cfg.to_str().unwrap()]).stderr)
        .into_owned();
    assert!(
        err.contains("admin.listen") && err.contains("65535"),
        "{err}"
    );
}

/// `segloop check-config FILE | head -1`: the reader leaves, segloop ends quietly.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/segloop.toml");
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; {:?} check-config {shipped:?} | head -1 >/dev/null",
                env!("CARGO_BIN_EXE_segloop")
            ),
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One record with 90,000 labels (about 800 KB) is rejected quickly by both decoders, with the
/// limit in the message.
#[test]
fn a_record_with_ninety_thousand_labels_is_rejected_fast() {
    let mut e = TelemetryEvent {
        segment: "hostile/labels".into(),
        ts_ms: 1,
        measurements: [("error".to_string(), 0.0)].into(),
        labels: Default::default(),
        event_id: None,
    };
    for i in 0..90_000 {
        e.labels.insert(format!("k{i}"), "v".into());
    }
    for kind in [CodecKind::AvroSingleObject, CodecKind::AvroRaw] {
        let general = build_codec::<TelemetryEvent>(kind, &Default::default()).unwrap();
        let mut bytes = Vec::new();
        general.encode(&e, &mut bytes).unwrap();
        assert!(bytes.len() > 700_000);
        let fast = TelemetryDecoder::new(kind, &Default::default()).unwrap();
        let started = Instant::now();
        let err = fast
            .decode(Some(b"hostile/labels"), Some(&bytes))
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code, ErrorCode::InvalidValue);
        assert!(err.message.contains("at most"), "{}", err.message);
        assert!(took < Duration::from_millis(500), "fast path took {took:?}");
        let err =
            segloop::codec::decode_record(general.as_ref(), Some(b"hostile/labels"), Some(&bytes))
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidValue);
    }
    // A record repeating one key 90,000 times folds to one label, in linear-logarithmic time.
    let codec = build_codec::<TelemetryEvent>(CodecKind::AvroRaw, &Default::default()).unwrap();
    let mut one = e.clone();
    one.labels = [("k".to_string(), "v".to_string())].into();
    let mut bytes = Vec::new();
    codec.encode(&one, &mut bytes).unwrap();
    // Rewrite the labels map as 90,000 repeats of the same entry (Avro: count, items, 0).
    let tail = bytes.len() - 1; // event_id: null (one byte)
    let entry = [2u8, b'k', 2, b'v']; // "k" -> "v"
    let map_at = tail - 1 - entry.len() - 1; // count(1 = 0x02), entry, end (0)
    assert_eq!(bytes[map_at], 2, "the labels map starts here");
    let mut hostile = bytes[..map_at].to_vec();
    let count = 90_000u64;
    let mut z = count << 1; // zig-zag of a positive count
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            hostile.push(b);
            break;
        }
        hostile.push(b | 0x80);
    }
    for _ in 0..count {
        hostile.extend_from_slice(&entry);
    }
    hostile.push(0);
    hostile.push(0); // event_id null
    let fast = TelemetryDecoder::new(CodecKind::AvroRaw, &Default::default()).unwrap();
    let started = Instant::now();
    let got = fast
        .decode(Some(b"hostile/labels"), Some(&hostile))
        .map(|t| t.into_owned());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(got.map(|e| e.labels), Ok(one.labels));
}

/// A hot reload of a policy file that would have overflowed the stack keeps the running
/// process alive, on its old policies.
#[test]
fn a_hostile_policy_edit_leaves_the_running_process_alone() {
    use rdkafka::mocking::MockCluster;
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.toml");
    std::fs::write(&policies, policy_with("mean(error) > 0.5")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("segloop.toml");
    std::fs::write(
        &cfg,
        format!(
            "policies = \"policies.toml\"\n[kafka]\nbootstrap_servers = \"{}\"\npartitions = 2\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\n[logging]\nlevel = \"warn\"\n",
            cluster.bootstrap_servers()
        ),
    )
    .unwrap();
    let config = segloop::config::Config::load(&segloop::config::Sources {
        file: Some(&cfg),
        env: &Default::default(),
        overrides: &[],
    })
    .unwrap();
    segloop::kafka::create_embedded_topics(&cluster, &config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segloop"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let healthy = || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                use std::io::Read;
                write!(
                    s,
                    "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy() {
        assert!(Instant::now() < deadline, "never healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(
        &policies,
        policy_with(&format!(
            "{}count() > 1{}",
            "(".repeat(10_000),
            ")".repeat(10_000)
        )),
    )
    .unwrap();
    // The file is checked every 2 s; give it two checks, then it must still be serving.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the process died on a policy edit"
    );
    assert!(healthy());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("policy reload refused"), "{log}");
}

/// What a registry answers is outside input too: any schema text (garbage, another type, a
/// mutated telemetry schema) for any id, then any record under that id, never panics; a
/// usable answer decodes a datum the same as the built-in schema does, an unusable one makes
/// its records `unknown_schema_id` (never a wait, never a silent drop).
#[test]
fn any_registry_answer_is_learned_or_refused_without_panic() {
    use proptest::prelude::*;
    use segloop::codec::{SchemaLookup, SchemaSource};

    struct One(Option<String>);
    impl SchemaSource for One {
        fn lookup(&mut self, _: u32) -> SchemaLookup {
            match self.0.take() {
                Some(text) => SchemaLookup::Found(text.into()),
                None => SchemaLookup::Missing("asked twice".into()),
            }
        }
    }
    let current = segloop::schema::SchemaKind::Telemetry.source().to_string();
    let schema = prop_oneof![
        ".{0,200}",
        Just(current.clone()),
        Just(r#""string""#.to_string()),
        Just(
            r#"{"type":"record","name":"TelemetryEvent","namespace":"io.segloop","fields":[]}"#
                .to_string()
        ),
        (0..current.len(), any::<char>()).prop_map({
            let current = current.clone();
            move |(at, c)| {
                let mut s = current.clone();
                let at = (0..=at).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                s.insert(at, c);
                s
            }
        }),
    ];
    let event = TelemetryEvent {
        segment: "a/b".into(),
        ts_ms: 1_700_000_000_000,
        measurements: [("error".to_string(), 1.0)].into(),
        labels: Default::default(),
        event_id: None,
    };
    let mut datum = Vec::new();
    let writer = build_codec::<TelemetryEvent>(
        CodecKind::AvroConfluent,
        &segloop::codec::SchemaSettings {
            schema_id: Some(9),
            ..Default::default()
        },
    )
    .unwrap();
    writer.encode(&event, &mut datum).unwrap();
    let settings = segloop::codec::SchemaSettings::default();
    proptest!(ProptestConfig::with_cases(256), |(text in schema, tail in proptest::collection::vec(any::<u8>(), 0..64), id in 1u32..1000)| {
        let mut decoder = TelemetryDecoder::new(CodecKind::AvroConfluent, &settings).unwrap();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&id.to_be_bytes());
        framed.extend_from_slice(&datum[5..]);
        let usable = text == current;
        let mut source = One(Some(text));
        prop_assert_eq!(decoder.learn_schema(&mut source, Some(&framed)), Ok(true));
        let result = decoder.decode(Some(b"a/b"), Some(&framed));
        if usable {
            let record = result.unwrap();
            prop_assert_eq!(record.segment(), "a/b");
            prop_assert_eq!(record.ts_ms(), 1_700_000_000_000);
        } else if let Err(e) = &result {
            // A schema that is not usable answers as the id's own error.
            prop_assert!(
                [ErrorCode::UnknownSchemaId, ErrorCode::Malformed, ErrorCode::Truncated, ErrorCode::TrailingBytes, ErrorCode::SchemaMismatch, ErrorCode::InvalidValue, ErrorCode::KeyMismatch]
                    .contains(&e.code),
                "{e:?}"
            );
        }
        // Garbage after the header under the same id: an error or a record, never a panic,
        // and never asked again.
        let mut garbage = framed[..5].to_vec();
        garbage.extend_from_slice(&tail);
        let _ = decoder.decode(Some(b"a/b"), Some(&garbage));
        prop_assert_eq!(decoder.learn_schema(&mut source, Some(&garbage)), Ok(false));
    });
}
