//! `segloop backtest` on the embedded mock cluster: determinism, expected firings from a
//! scripted history, the live group and actions topic untouched, compare, against-live,
//! recorded outcomes, and a self-contained HTML report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use segloop::backtest::{self, Invocation, Options, Report};
use segloop::config::{Config, Sources};
use segloop::fleet::{FaultKind, Incident};
use segloop::policy::PolicySet;

const SAMPLE_SECS: u64 = 40;
const PARTITIONS: i32 = 16;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_config(bootstrap: &str) -> Config {
    let env = std::collections::HashMap::new();
    let overrides = vec![
        format!("kafka.bootstrap_servers={bootstrap}"),
        format!("kafka.partitions={PARTITIONS}"),
    ];
    let file = repo().join("config/demo.toml");
    Config::load(&Sources {
        file: Some(&file),
        env: &env,
        overrides: &overrides,
    })
    .expect("demo config")
}

fn policies(config: &Config) -> PolicySet {
    segloop::policy::PolicySet::for_config(config).expect("demo policies")
}

/// An embedded cluster holding the sample history (seed 1).
struct Sample {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    config: Config,
    script: Vec<Incident>,
    records: u64,
}

fn sample() -> Sample {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let config = demo_config(&cluster.bootstrap_servers());
    segloop::kafka::create_embedded_topics(&cluster, &config).unwrap();
    let records = segloop::fleet::write_sample_history(&config, 1, SAMPLE_SECS).unwrap();
    let script = segloop::fleet::sample_history(1, SAMPLE_SECS, |_| {});
    Sample {
        cluster,
        config,
        script,
        records,
    }
}

fn replay(s: &Sample, inv: &Invocation) -> Report {
    backtest::execute(s.config.clone(), policies(&s.config), inv, &mut |_| {}).expect("backtest")
}

fn acted_on(r: &Report) -> BTreeSet<String> {
    r.loops
        .iter()
        .filter(|l| l.commands.iter().any(|c| !c.escalation))
        .map(|l| l.segment.clone())
        .collect()
}

#[test]
fn scripted_history_yields_the_expected_firings_and_replays_byte_for_byte() {
    let s = sample();
    let inv = Invocation::default();
    let a = replay(&s, &inv);
    assert_eq!(a.input.records_read, s.records);
    assert_eq!(a.input.records_aggregated, s.records, "{:?}", a.input);

    // Every scripted fault is acted on, and nothing else (a parent's endpoints are inhibited).
    let expected: BTreeSet<String> = s
        .script
        .iter()
        .filter(|i| i.kind != FaultKind::NoisyHealthy)
        .map(|i| i.segment.clone())
        .collect();
    assert_eq!(acted_on(&a), expected);
    let outcome = |seg: &str| {
        let loops: Vec<_> = a.loops.iter().filter(|l| l.segment == seg).collect();
        (
            loops.iter().map(|l| l.escalations).sum::<u64>(),
            loops.iter().map(|l| l.resolved).sum::<u64>(),
        )
    };
    for i in &s.script {
        let (escalated, resolved) = outcome(&i.segment);
        match i.kind {
            FaultKind::ErrorSpike | FaultKind::LatencyRegression | FaultKind::SlowDrift => {
                assert_eq!((escalated, resolved), (0, 1), "{:?} {}", i.kind, i.segment)
            }
            FaultKind::Flapping | FaultKind::NeverAcks | FaultKind::Ineffective => {
                assert_eq!(escalated, 1, "{:?} {}", i.kind, i.segment)
            }
            _ => {}
        }
    }
    assert!(a.totals.suppressed.get("inhibited").copied().unwrap_or(0) > 0);
    // The evidence behind each command is a breaching window of the policy.
    for l in &a.loops {
        for c in l.commands.iter().filter(|c| !c.escalation) {
            assert!(c.observed > c.threshold, "{c:?}");
            assert!(l
                .timeline
                .points
                .iter()
                .any(|p| p.start_ms == c.window_start_ms && p.breach == Some(true)));
        }
    }

    // Same input, same bytes; smaller fetches change nothing.
    let b = replay(&s, &inv);
    assert_eq!(a.to_json(), b.to_json());
    assert_eq!(a.render_html(), b.render_html());
    let mut small = Invocation::default();
    small.options.fetch_max_bytes = Some(1500);
    let c = replay(&s, &small);
    assert_eq!(a.to_json(), c.to_json());
    drop(s.cluster);
}

fn committed(config: &Config, group: &str) -> BTreeMap<i32, Offset> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&config.topics.telemetry.name, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

fn topic_len(config: &Config, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            let (lo, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            hi - lo
        })
        .sum()
}

#[test]
fn leaves_the_live_group_and_actions_alone_and_fills_the_sandbox() {
    let s = sample();
    let group = s.config.kafka.group_id.clone();
    // The live group has committed somewhere in the middle.
    let live: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.config.kafka.bootstrap_servers)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(
            &s.config.topics.telemetry.name,
            p,
            Offset::Offset(100 + p as i64),
        )
        .unwrap();
    }
    live.commit(&tpl, CommitMode::Sync).unwrap();
    let before = committed(&s.config, &group);

    let mut inv = Invocation::default();
    inv.options.sandbox_topic = Some("backtest.sandbox".into());
    s.cluster
        .create_topic("backtest.sandbox", PARTITIONS, 1)
        .unwrap();
    let r = replay(&s, &inv);
    assert!(r.totals.commands > 0);

    assert_eq!(committed(&s.config, &group), before);
    assert!(committed(&s.config, &format!("{group}-backtest"))
        .values()
        .all(|o| *o == Offset::Invalid));
    assert_eq!(topic_len(&s.config, &s.config.topics.actions.name), 0);
    assert_eq!(
        topic_len(&s.config, "backtest.sandbox"),
        r.totals.commands as i64
    );

    // The live actions topic is refused as a sandbox.
    inv.options.sandbox_topic = Some(s.config.topics.actions.name.clone());
    let err = backtest::execute(s.config.clone(), policies(&s.config), &inv, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("live actions topic"), "{err}");
}

#[test]
fn compare_and_against_live_report_the_differences() {
    let s = sample();
    let dir = tempfile::tempdir().unwrap();
    // B: the same policies with a latency threshold nobody crosses.
    let text = std::fs::read_to_string(repo().join("config/demo-policies.toml")).unwrap();
    assert!(text.contains("p99(latency_ms) > 450"));
    let other = dir.path().join("b.toml");
    std::fs::write(
        &other,
        text.replace("p99(latency_ms) > 450", "p99(latency_ms) > 5000"),
    )
    .unwrap();
    let same = dir.path().join("same.toml");
    std::fs::write(&same, &text).unwrap();

    let mut inv = Invocation {
        compare: Some(same),
        ..Invocation::default()
    };
    let r = replay(&s, &inv);
    let c = r.compare.as_ref().unwrap();
    assert!(c.same > 0);
    assert_eq!(
        (c.earlier_in_b, c.later_in_b, c.only_in_a, c.only_in_b),
        (0, 0, 0, 0)
    );

    inv.compare = Some(other);
    let r = replay(&s, &inv);
    let c = r.compare.as_ref().unwrap();
    let latency_only: BTreeSet<&str> = s
        .script
        .iter()
        .filter(|i| {
            matches!(
                i.kind,
                FaultKind::LatencyRegression | FaultKind::SlowDrift | FaultKind::Ineffective
            )
        })
        .map(|i| i.segment.as_str())
        .collect();
    let only_a: BTreeSet<&str> = c
        .segments
        .iter()
        .filter(|d| d.verdict == "only_in_a")
        .map(|d| d.segment.as_str())
        .collect();
    assert_eq!(only_a, latency_only);
    assert_eq!(c.only_in_b, 0);

    // Against live: the live loop issued two of the would-be commands and one other.
    let ours: Vec<_> = r.loops.iter().flat_map(|l| l.commands.iter()).collect();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.config.kafka.bootstrap_servers)
        .create()
        .unwrap();
    let codec = segloop::codec::build_codec::<segloop::model::RemediationCommand>(
        s.config.topics.actions.codec,
        &s.config.topics.actions.schema_settings(),
    )
    .unwrap();
    let l0 = &r.loops.iter().find(|l| !l.commands.is_empty()).unwrap();
    let mut live = Vec::new();
    for (i, c) in ours.iter().take(2).enumerate() {
        live.push((
            format!("seg-{i}"),
            c.command_id.clone(),
            c.window_start_ms,
            c.window_end_ms,
        ));
    }
    live.push((
        "elsewhere".into(),
        "00000000-0000-0000-0000-000000000000".into(),
        l0.commands[0].window_start_ms,
        l0.commands[0].window_end_ms,
    ));
    for (seg, id, ws, we) in &live {
        let cmd = segloop::model::RemediationCommand {
            command_id: id.clone(),
            segment: seg.clone(),
            policy: "error-rate".into(),
            policy_version: 1,
            action: "rollback".into(),
            params: BTreeMap::new(),
            attempt: 1,
            issued_at_ms: *we,
            ack_deadline_ms: *we + 2000,
            reason: segloop::model::CommandReason {
                condition: "x".into(),
                metric: "mean(error)".into(),
                observed: 1.0,
                threshold: 0.25,
                window_start_ms: *ws,
                window_end_ms: *we,
            },
            dry_run: false,
        };
        let mut bytes = Vec::new();
        codec.encode(&cmd, &mut bytes).unwrap();
        producer
            .send(
                BaseRecord::to(&s.config.topics.actions.name)
                    .key(seg.as_bytes())
                    .payload(&bytes),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let inv = Invocation {
        against_live: true,
        ..Invocation::default()
    };
    let r = replay(&s, &inv);
    let d = r.against_live.as_ref().unwrap();
    assert_eq!(d.live_commands, 3);
    assert_eq!(d.matched, 2);
    assert_eq!(d.only_live.len(), 1);
    assert!(
        d.only_live[0].starts_with("elsewhere "),
        "{:?}",
        d.only_live
    );
    assert_eq!(d.only_backtest.len() as u64, r.totals.commands - 2);
}

#[test]
fn recorded_outcomes_replace_the_simulated_actuator() {
    let s = sample();
    // Nothing was ever acknowledged: every command times out, retries and escalates.
    let inv = Invocation {
        options: Options {
            outcomes_from_topic: true,
            ..Options::default()
        },
        ..Invocation::default()
    };
    let r = replay(&s, &inv);
    assert!(matches!(
        r.meta.actuator,
        segloop::backtest::report::ActuatorInfo::Recorded { outcomes: 0, .. }
    ));
    let fired: Vec<_> = r.loops.iter().filter(|l| l.firings > 0).collect();
    assert!(!fired.is_empty());
    assert!(fired
        .iter()
        .all(|l| l.outcomes.is_empty() && l.resolved == 0));
    assert!(fired.iter().any(|l| l.escalations > 0));
    let timeouts = r
        .loops
        .iter()
        .flat_map(|l| &l.decisions)
        .filter(|d| d.trigger == "ack_timeout")
        .count();
    assert!(timeouts > 0);
}

#[test]
fn html_report_is_self_contained() {
    let s = sample();
    let r = replay(&s, &Invocation::default());
    let html = r.render_html();
    assert!(html.starts_with("<!DOCTYPE html>"));
    let drawn = r
        .loops
        .iter()
        .filter(|l| !l.commands.is_empty() || !l.suppressed.is_empty())
        .count();
    assert_eq!(html.matches("<svg").count(), drawn);
    for external in ["<script", "src=", "href=", "url(", "@import", "<link"] {
        assert!(!html.contains(external), "{external}");
    }
    let seg = &r.loops[0].segment;
    assert!(html.contains(seg.as_str()));
    assert!(html.contains("<polyline"));
}

#[test]
fn time_range_filters_by_event_time() {
    let s = sample();
    let from = segloop::fleet::SAMPLE_EPOCH_MS + 20_000;
    let inv = Invocation {
        options: Options {
            from_ms: Some(from),
            ..Options::default()
        },
        ..Invocation::default()
    };
    let r = replay(&s, &inv);
    // The embedded cluster has no time index: the replay reads from the beginning.
    assert_eq!(r.meta.seek, "beginning");
    assert!(r.input.records_before_range > 0);
    assert_eq!(
        r.input.records_in_range + r.input.records_before_range,
        r.input.records_read
    );
    assert!(r.input.first_event_ms.unwrap() >= from);
    assert!(r
        .loops
        .iter()
        .flat_map(|l| &l.commands)
        .all(|c| c.window_start_ms >= from));
}

#[test]
fn times_parse_as_rfc3339_or_relative() {
    let now = 1_767_225_600_000;
    assert_eq!(backtest::parse_time("2026-01-01T00:00:00Z", 0), Ok(now));
    assert_eq!(backtest::parse_time("-6h", now), Ok(now - 6 * 3_600_000));
    assert_eq!(backtest::parse_time("now", now), Ok(now));
    let e = backtest::parse_time("yesterday", now).unwrap_err();
    assert!(
        e.contains("2026-01-01T00:00:00Z") && e.contains("-6h"),
        "{e}"
    );
}

#[test]
fn embedded_sample_cli_writes_identical_reports() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| -> (String, String) {
        let (json, html) = (
            dir.path().join(format!("{name}.json")),
            dir.path().join(format!("{name}.html")),
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segloop"))
            .current_dir(repo())
            .args([
                "backtest",
                "--config",
                "config/demo.toml",
                "--embedded-sample",
                "--report",
            ])
            .arg(&json)
            .arg("--html")
            .arg(&html)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("policy") && stdout.contains("error-rate"),
            "{stdout}"
        );
        // Not a terminal: plain progress lines, the last one complete.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("replay progress: 100% ") && stderr.contains("/s, ETA"),
            "{stderr}"
        );
        (read(&json), read(&html))
    };
    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }
    let a = run("a");
    let b = run("b");
    assert_eq!(a, b);
    let v: serde_json::Value = serde_json::from_str(&a.0).unwrap();
    assert!(v["totals"]["firings"].as_u64().unwrap() > 0);
}

/// The report's timelines carry what an SRE reads (issue #26): a y axis with a scale, time
/// ticks, the threshold's value on its line, a marker with text for every command and
/// outcome, and suppressions with their reason (inhibited by the ancestor under action); the
/// summary is HTML tables, not preformatted text.
#[test]
fn html_timelines_have_axes_threshold_and_labelled_markers() {
    let s = sample();
    let r = replay(&s, &Invocation::default());
    let html = r.render_html();
    assert!(!html.contains("<pre>"), "the summary is tables");
    assert!(html.contains("<table class=\"policies\">"));
    assert!(html.contains("<table class=\"fired\">"));
    let svgs: Vec<&str> = html.split("<svg").skip(1).collect();
    assert!(!svgs.is_empty());
    for svg in &svgs {
        assert!(svg.contains("<g class=\"axis axis-y\">"), "{svg}");
        assert!(svg.contains("<g class=\"axis axis-x\">"), "{svg}");
        assert!(
            svg.matches("<text class=\"tick\"").count() >= 4,
            "y scale and time ticks: {svg}"
        );
    }
    // The threshold's value is written on its line.
    let with_threshold = svgs
        .iter()
        .find(|s| s.contains("class=\"threshold\""))
        .expect("a timeline with a threshold");
    assert!(with_threshold.contains("threshold-label"));
    assert!(
        with_threshold.contains(">threshold 0.25<") || with_threshold.contains(">threshold 450<")
    );
    // Every command of a drawn loop has a labelled marker.
    let commands: usize = r.loops.iter().map(|l| l.commands.len()).sum();
    let command_markers = html.matches("<g class=\"marker command\">").count()
        + html
            .matches("<g class=\"marker escalation-command\">")
            .count();
    assert_eq!(command_markers, commands);
    // Suppressions carry their reason: the sample's inhibited loops name the ancestor.
    assert!(html.contains("<g class=\"marker suppression\">"));
    assert!(
        html.contains("inhibited by "),
        "an inhibition names its ancestor"
    );
    assert!(html.contains("suppressed: flap_breaker"));
}

/// A replay whose partitions carry future-dated records among on-time ones (a record 120 s
/// ahead, and a host 5 s ahead): the merge neither holds their partitions back nor lets them
/// move the clock, so no on-time record is judged late and no healthy segment's windows empty
/// out. (Merged by event time alone, the outlier held its partition back until the others
/// reached its time; the records behind it were then idle-advanced over and DLQ'd as late.)
#[test]
fn a_replayed_outlier_breaks_no_other_segment() {
    use segloop::codec::build_codec;
    use segloop::model::TelemetryEvent;
    let cluster = MockCluster::new(1).expect("mock cluster");
    let config = demo_config(&cluster.bootstrap_servers());
    segloop::kafka::create_embedded_topics(&cluster, &config).unwrap();
    let t = &config.topics.telemetry;
    let codec = build_codec::<TelemetryEvent>(t.codec, &t.schema_settings()).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        // In order across retries (see producer() in tests/common/mod.rs).
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let send = |seg: &str, ts: i64| {
        let e = TelemetryEvent {
            segment: seg.into(),
            ts_ms: ts,
            measurements: BTreeMap::from([("error".into(), 0.0), ("latency_ms".into(), 20.0)]),
            labels: BTreeMap::new(),
            event_id: None,
        };
        let mut bytes = Vec::new();
        codec.encode(&e, &mut bytes).unwrap();
        let p = segloop::kafka::murmur2_partition(seg.as_bytes(), PARTITIONS);
        producer
            .send(
                BaseRecord::to(&t.name)
                    .key(seg)
                    .payload(&bytes)
                    .partition(p),
            )
            .unwrap();
        producer.poll(Duration::ZERO);
    };
    let healthy: Vec<String> = (0..48).map(|i| format!("bt/ok-{i}")).collect();
    let fast: Vec<String> = (0..2).map(|i| format!("bt/fast-host/seg-{i}")).collect();
    let base = segloop::fleet::SAMPLE_EPOCH_MS;
    let span = 60_000;
    for at in (0..span).step_by(250) {
        for s in &healthy {
            send(s, base + at);
        }
        for s in &fast {
            send(s, base + at + 5_000);
        }
        if at == 20_000 {
            send("bt/outlier", base + at + 120_000);
        }
        if at < 10_000 {
            send("bt/goes-quiet", base + at);
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let policies = PolicySet::parse(
        r#"
[[policies]]
name = "silent"
when = "no_data()"
for = 1
action = "restart"
"#,
        "test",
    )
    .unwrap();
    let r = backtest::execute(
        config.clone(),
        policies,
        &Invocation::default(),
        &mut |_| {},
    )
    .expect("backtest");
    assert!(r.input.rejected.is_empty(), "{:?}", r.input);
    assert_eq!(r.input.records_aggregated, r.input.records_read);
    let early: Vec<_> = r
        .loops
        .iter()
        .filter(|l| l.segment.starts_with("bt/ok-"))
        .flat_map(|l| {
            l.commands
                .iter()
                .map(move |c| (&l.segment, c.window_start_ms))
        })
        .filter(|(_, start)| *start < base + span - 5_000)
        .collect();
    assert!(
        early.is_empty(),
        "no_data() for segments that sent: {early:?}"
    );
    // A segment that really went quiet is still seen: the robust progress passes it.
    let quiet = r
        .loops
        .iter()
        .find(|l| l.segment == "bt/goes-quiet")
        .expect("the quiet segment fired");
    let first = quiet.commands.first().expect("a command").window_start_ms;
    assert!(
        (base + 10_000..base + 15_000).contains(&first),
        "no_data() soon after it stopped: {first}"
    );
    drop(cluster);
}
