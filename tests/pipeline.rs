//! The pipeline every driver runs, driven directly: its label rule and the prefetch schedule.

use std::collections::BTreeMap;

use segloop::codec::{DecodeError, SchemaLookup, SchemaSource};
use segloop::config::{Config, Sources};
use segloop::controller::Effects;
use segloop::model::{DecisionRecord, RemediationCommand};
use segloop::pipeline::{Cause, Options, Pipeline, Record, Sink};
use segloop::policy::PolicySet;

#[path = "support/telemetry.rs"]
mod telemetry;
use telemetry::encode;

#[derive(Default)]
struct Collect {
    commands: Vec<RemediationCommand>,
    rejected: Vec<String>,
    evicted: Vec<DecisionRecord>,
}

impl Sink for Collect {
    fn reject(&mut self, _: &Record<'_>, e: &DecodeError) {
        self.rejected.push(e.code.as_str().to_string());
    }
    fn evicted(&mut self, decision: DecisionRecord) {
        self.evicted.push(decision);
    }
    fn effects(&mut self, fx: &mut Effects, _: Cause<'_>, _: &PolicySet) {
        self.commands.append(&mut fx.commands);
        fx.decisions.clear();
        fx.timings.clear();
    }
}

fn config(sets: &[&str]) -> Config {
    let sets: Vec<String> = ["windows.size=1s", "windows.out_of_orderness=0s"]
        .iter()
        .chain(sets)
        .map(|s| s.to_string())
        .collect();
    Config::load(&Sources {
        file: None,
        env: &Default::default(),
        overrides: &sets,
    })
    .unwrap()
}

/// Feeds one encoded event on partition 0 at `offset`, with the driver clock at its time.
fn feed(p: &mut Pipeline, sink: &mut Collect, offset: i64, seg: &str, ts: i64, value: &[u8]) {
    let r = Record {
        partition: 0,
        offset,
        key: Some(seg.as_bytes()),
        value: Some(value),
        timestamp_ms: None,
        handle: offset as usize,
    };
    p.on_record(&r, ts, sink);
}

/// One rule for labels in every driver: a full label map is emptied only when a new segment
/// needs room, never because a known segment sent the same labels again. (Live used to empty
/// it on every labelled event once full, so a policy selecting on labels lost its segments.)
#[test]
fn known_labels_survive_a_full_map() {
    let policies = PolicySet::parse(
        r#"
[guardrails]
blast_radius = 1.0

[[policies]]
name = "team-y"
labels = { team = "y" }
when = "mean(error) > 0.5"
for = 1
action = "rollback"
"#,
        "p.toml",
    )
    .unwrap();
    let cfg = config(&["windows.max_segments=2"]);
    let mut p = Pipeline::new(&cfg, policies, Options::live()).unwrap();
    p.assign(0);
    let mut sink = Collect::default();
    let events = [
        ("a", 0, &[("team", "x")][..]),
        ("b", 10, &[("team", "y")][..]),
        ("a", 20, &[("team", "x")][..]),
        ("a", 2_000, &[][..]),
    ];
    for (offset, (seg, ts, labels)) in events.iter().enumerate() {
        let value = encode(seg, *ts, 1.0, labels);
        feed(&mut p, &mut sink, offset as i64, seg, *ts, &value);
    }
    assert!(sink.rejected.is_empty(), "{:?}", sink.rejected);
    let acted: Vec<&str> = sink.commands.iter().map(|c| c.segment.as_str()).collect();
    assert_eq!(acted, ["b"], "the policy selects team=y only");
    assert_eq!(p.stats().records_aggregated, 4);
    // Both segments' [0, 1 s) windows and their empty (no data) [1 s, 2 s) windows.
    assert_eq!(p.stats().windows_closed, 4);
}

/// Labels are dropped with their segment: once the windows forget a segment (TTL), the next
/// prune forgets its labels, and the map's estimated memory shrinks with it.
#[test]
fn labels_leave_with_their_segment() {
    let policies = PolicySet::parse(
        "[[policies]]\nname = \"p\"\nlabels = { team = \"y\" }\nwhen = \"mean(error) > 0.5\"\naction = \"page\"\n",
        "p.toml",
    )
    .unwrap();
    let cfg = config(&["windows.segment_ttl=5s"]);
    let mut p = Pipeline::new(&cfg, policies, Options::live()).unwrap();
    p.assign(0);
    let mut sink = Collect::default();
    let feed = |p: &mut Pipeline, sink: &mut Collect, offset: i64, seg: &str, ts: i64| {
        let value = encode(seg, ts, 0.0, &[("team", "y"), ("tier", "gold")]);
        feed(p, sink, offset, seg, ts, &value);
    };
    feed(&mut p, &mut sink, 0, "gone-soon", 0);
    feed(&mut p, &mut sink, 1, "stays", 0);
    let both = p.label_bytes();
    assert!(both > 0);
    // Only `stays` sends on; `gone-soon` outlives its TTL.
    for (i, ts) in (1_000..60_000).step_by(1_000).enumerate() {
        feed(&mut p, &mut sink, 2 + i as i64, "stays", ts);
    }
    p.end_turn(60_000);
    let one = p.label_bytes();
    assert!(one > 0 && one < both, "{both} -> {one}");
}

/// The prefetch schedule: every item once, in order, and each chunk hinted before its items
/// are processed, `HINT_AHEAD` chunks ahead.
#[test]
fn the_hint_schedule_runs_ahead_of_every_item() {
    use segloop::window::{with_hints, HINT_AHEAD, HINT_BATCH};
    for n in [0, 1, HINT_BATCH - 1, HINT_BATCH, 5 * HINT_BATCH + 3] {
        let items: Vec<usize> = (0..n).collect();
        let mut log: Vec<(char, usize, usize)> = Vec::new();
        with_hints(
            &mut log,
            &items,
            |log, from, chunk| log.push(('h', from, chunk.len())),
            |log, i, item| {
                assert_eq!(i, *item);
                log.push(('i', i, 1));
            },
        );
        let processed: Vec<usize> = log.iter().filter(|e| e.0 == 'i').map(|e| e.1).collect();
        assert_eq!(processed, items);
        for i in 0..n {
            let at = log.iter().position(|e| e.0 == 'i' && e.1 == i).unwrap();
            let chunk_start = i / HINT_BATCH * HINT_BATCH;
            let hinted = log
                .iter()
                .position(|e| e.0 == 'h' && e.1 == chunk_start && e.2 > 0)
                .expect("every chunk is hinted");
            assert!(hinted < at);
            // HINT_AHEAD chunks' worth of hints precede the chunk's first item.
            let hints_before = log[..at].iter().filter(|e| e.0 == 'h').count();
            assert!(hints_before > i / HINT_BATCH + HINT_AHEAD - 1);
        }
    }
}

/// The commit floor and the dead-letter mark (issues #19, #21): a dead-letter write not yet
/// acknowledged holds the partition's committable offset; once acknowledged it moves on and
/// the mark covers the record, and a pipeline restored with that mark (a restart or a new
/// owner re-reading the range) writes it to the DLQ no second time.
#[test]
fn dead_letters_hold_the_commit_floor_and_are_written_once_across_lifetimes() {
    let policies = PolicySet::parse("", "p.toml").unwrap();
    let cfg = config(&[]);
    let feed = |p: &mut Pipeline, sink: &mut Collect| {
        // Offsets 0..6 in the window [0, 1 s); offset 6 at 5 s closes it.
        for offset in 0..7i64 {
            let ts = if offset == 6 { 5_000 } else { offset * 100 };
            let good = encode("a", ts, 0.0, &[]);
            let value: &[u8] = if offset == 2 { b"not avro" } else { &good };
            let r = Record {
                partition: 0,
                offset,
                key: Some(b"a"),
                value: Some(value),
                timestamp_ms: None,
                handle: 0,
            };
            p.on_record(&r, ts, sink);
        }
    };
    let mut p = Pipeline::new(&cfg, policies.clone(), Options::live()).unwrap();
    p.track_dead_letters();
    p.assign(0);
    let mut sink = Collect::default();
    feed(&mut p, &mut sink);
    assert_eq!(sink.rejected, ["bad_magic"]);
    // The first window closed (the open one starts at offset 6); the dead letter at 2 is not
    // acknowledged: it is the floor.
    assert_eq!(p.committable_offset(0), Some(2), "held by the dead letter");
    assert_eq!(
        p.dead_letter_mark(0),
        Some(1),
        "nothing at or above 2 is known written"
    );
    p.dead_letter_acked(0, 2);
    assert_eq!(
        p.committable_offset(0),
        Some(6),
        "the open window's first offset"
    );
    let mark = p.dead_letter_mark(0);
    assert_eq!(mark, Some(2));

    // The next lifetime re-reads offsets 0..6 with the mark restored: no second dead letter.
    let mut q = Pipeline::new(&cfg, policies, Options::live()).unwrap();
    q.track_dead_letters();
    q.assign(0);
    q.restore_dead_letter_mark(0, mark);
    let mut sink = Collect::default();
    feed(&mut q, &mut sink);
    assert!(sink.rejected.is_empty(), "{:?}", sink.rejected);
    assert_eq!(q.stats().dead_lettered_before, 1);
    assert_eq!(q.committable_offset(0), Some(6));
}

/// The segment cap never drops events silently: a segment evicted with events in an open
/// window is counted in the input stats and handed to the sink as an `evicted` decision with
/// its event count (live: the decisions topic, a metric and a log line).
#[test]
fn evicted_open_windows_are_counted_and_recorded() {
    let policies = PolicySet::parse(
        "[[policies]]\nname = \"p\"\nwhen = \"mean(error) > 0.5\"\naction = \"page\"\n",
        "p.toml",
    )
    .unwrap();
    let cfg = config(&["windows.max_segments=2"]);
    let mut p = Pipeline::new(&cfg, policies, Options::live()).unwrap();
    p.assign(0);
    let mut sink = Collect::default();
    for (offset, (seg, ts)) in [("a", 0), ("a", 5), ("b", 10), ("c", 20)]
        .iter()
        .enumerate()
    {
        let value = encode(seg, *ts, 0.0, &[]);
        feed(&mut p, &mut sink, offset as i64, seg, *ts, &value);
    }
    assert_eq!(p.stats().evicted_segments, 1);
    assert_eq!(
        p.stats().evicted_events,
        2,
        "a's two events were in its open window"
    );
    assert_eq!(sink.evicted.len(), 1);
    let d = &sink.evicted[0];
    assert_eq!(
        (d.segment.as_str(), d.to_state.as_str(), d.trigger.as_str()),
        ("a", "evicted", "windows.max_segments")
    );
    assert_eq!(d.aggregates.get("events"), Some(&2.0));
    assert_eq!(d.window_start_ms, Some(0));
}

/// A registry in a test: answers by id (an id it has no answer for waits), and notes every
/// id it is asked for.
struct FakeRegistry {
    answers: std::sync::Arc<std::sync::Mutex<BTreeMap<u32, SchemaLookup>>>,
    asked: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl SchemaSource for FakeRegistry {
    fn lookup(&mut self, id: u32) -> SchemaLookup {
        self.asked.lock().unwrap().push(id);
        self.answers
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| SchemaLookup::Waiting("connection refused".into()))
    }
}

type Answers = std::sync::Arc<std::sync::Mutex<BTreeMap<u32, SchemaLookup>>>;
type Asked = std::sync::Arc<std::sync::Mutex<Vec<u32>>>;

/// A pipeline of `shards` shards, no policies, asking a [`FakeRegistry`] with `answers`; the
/// registry's answers and the ids it was asked for, to change and to read.
fn with_registry(
    cfg: &Config,
    shards: usize,
    answers: BTreeMap<u32, SchemaLookup>,
) -> (Pipeline, Answers, Asked) {
    let answers = std::sync::Arc::new(std::sync::Mutex::new(answers));
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut p = Pipeline::sharded(
        cfg,
        PolicySet::parse("", "p.toml").unwrap(),
        Options::live(),
        shards,
    )
    .unwrap();
    p.set_schema_source(Box::new(FakeRegistry {
        answers: answers.clone(),
        asked: asked.clone(),
    }));
    (p, answers, asked)
}

/// A Confluent-framed telemetry datum under `id`, written with the writer schema `schema`
/// (`extra` fields beyond the current ones are given their values).
fn confluent(
    id: u32,
    schema: &str,
    segment: &str,
    ts: i64,
    extra: &[(&str, apache_avro::types::Value)],
) -> Vec<u8> {
    use apache_avro::types::Value;
    let schema = apache_avro::Schema::parse_str(schema).unwrap();
    let mut fields = vec![
        ("segment".to_string(), Value::String(segment.into())),
        ("ts_ms".to_string(), Value::TimestampMillis(ts)),
        (
            "measurements".to_string(),
            Value::Map([("error".to_string(), Value::Double(0.0))].into()),
        ),
        ("labels".to_string(), Value::Map(Default::default())),
        (
            "event_id".to_string(),
            Value::Union(0, Box::new(Value::Null)),
        ),
    ];
    fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value(&mut out, Value::Record(fields))
        .unwrap();
    out
}

/// With a Schema Registry, an id the codec has not seen is asked for once: a record waits
/// (its partition stops there and holds the commit floor, nothing is rejected) until the
/// registry answers; found, it decodes (the current schema, or a newer compatible one through
/// resolution); missing or unresolvable, it is dead-lettered as `unknown_schema_id`. No id is
/// presumed to be the current schema (the config's default `schema_id` 1 means nothing here).
#[test]
fn unknown_schema_ids_wait_for_the_registry_then_decode() {
    let current = segloop::schema::SchemaKind::Telemetry.source();
    let v3 = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/schemas/telemetry.v3.avsc"
    ))
    .unwrap();
    let incompatible = current.replace(
        r#"{"type": "long", "logicalType": "timestamp-millis"}"#,
        r#""string""#,
    );
    assert_ne!(incompatible, current);
    let cfg = config(&[
        "topics.telemetry.codec=avro-confluent",
        "schema_registry.url=http://127.0.0.1:9",
    ]);
    let (mut p, answers, asked) = with_registry(&cfg, 1, BTreeMap::new());
    p.assign(0);
    // Live: the consumer was last seen at the partition's end at 1 s.
    p.set_read_through(Some(BTreeMap::from([(0, 1_000)])));
    let mut sink = Collect::default();
    let on = |p: &mut Pipeline, sink: &mut Collect, offset: i64, value: &[u8]| {
        let r = Record {
            partition: 0,
            offset,
            key: Some(b"a"),
            value: Some(value),
            timestamp_ms: None,
            handle: 0,
        };
        p.on_record(&r, 1_000 + offset, sink);
    };
    // The default schema_id (1) is not taken for the current schema: it is asked for.
    let one = confluent(1, current, "a", 1_000, &[]);
    let v41 = confluent(41, current, "a", 1_001, &[]);
    on(&mut p, &mut sink, 0, &one);
    assert_eq!(p.waiting()[&0].schema_id, 1);
    assert_eq!(p.waiting()[&0].offset, 0);
    answers
        .lock()
        .unwrap()
        .insert(1, SchemaLookup::Found(current.into()));
    p.stop_waiting(0);
    on(&mut p, &mut sink, 0, &one);
    assert!(p.waiting().is_empty());

    // Unanswered: the partition waits at offset 1, later records are not read, nothing is
    // rejected, and the commit floor stays at the waiting record.
    on(&mut p, &mut sink, 1, &v41);
    on(&mut p, &mut sink, 2, &v41);
    assert_eq!(p.waiting()[&0].offset, 1);
    assert_eq!(p.waiting()[&0].reason, "connection refused");
    assert_eq!(
        p.committable_offset(0),
        Some(0),
        "the open window's first record"
    );
    assert!(sink.rejected.is_empty());
    assert_eq!(p.stats().records_aggregated, 1);
    assert_eq!(p.stats().records_read, 1, "waiting records are not read");

    // While it waits, the consumer may be at the end of the partition (it fetched past the
    // waiting record): the lag-based read-through says "read", the idle advance must not
    // believe it, or the waiting records come back late.
    p.set_read_through(Some(BTreeMap::from([(0, 60_000)])));
    p.tick(60_000, true, &mut sink);

    // Answered: read again from the waiting record, all decode; the id is never asked again.
    answers
        .lock()
        .unwrap()
        .insert(41, SchemaLookup::Found(current.into()));
    p.stop_waiting(0);
    for offset in 1..4 {
        on(&mut p, &mut sink, offset, &v41);
    }
    assert_eq!(p.stats().records_aggregated, 4);
    assert_eq!(*asked.lock().unwrap(), [1, 1, 41, 41]);

    // A newer compatible version under its own id: resolved into the current schema.
    answers
        .lock()
        .unwrap()
        .insert(42, SchemaLookup::Found(v3.clone().into()));
    let newer = confluent(
        42,
        &v3,
        "a",
        1_005,
        &[
            (
                "host",
                apache_avro::types::Value::Union(
                    1,
                    Box::new(apache_avro::types::Value::String("h1".into())),
                ),
            ),
            ("sample_rate", apache_avro::types::Value::Double(0.5)),
        ],
    );
    on(&mut p, &mut sink, 4, &newer);
    on(&mut p, &mut sink, 5, &newer);
    assert_eq!(p.stats().records_aggregated, 6);

    // Missing, and a schema that does not resolve: dead-lettered, each id asked once.
    answers.lock().unwrap().insert(
        43,
        SchemaLookup::Missing("schema id 43 is not in the registry".into()),
    );
    answers
        .lock()
        .unwrap()
        .insert(44, SchemaLookup::Found(incompatible.clone().into()));
    for (offset, id) in [(6, 43), (7, 43), (8, 44), (9, 44)] {
        let value = confluent(id, current, "a", 1_000 + offset, &[]);
        on(&mut p, &mut sink, offset, &value);
    }
    assert_eq!(sink.rejected, ["unknown_schema_id"; 4]);
    assert!(p.waiting().is_empty());
    assert_eq!(*asked.lock().unwrap(), [1, 1, 41, 41, 42, 43, 44]);
}

/// Sharded (`engine.threads`), a partition waits on the registry on its own: its shard leaves
/// the record to the pipeline, which asks; another shard's partition goes on meanwhile, and
/// the waiting one decodes once answered.
#[test]
fn a_sharded_pipeline_waits_for_the_registry_per_partition() {
    let current = segloop::schema::SchemaKind::Telemetry.source();
    let cfg = config(&[
        "topics.telemetry.codec=avro-confluent",
        "schema_registry.url=http://127.0.0.1:9",
    ]);
    let (mut p, answers, asked) = with_registry(
        &cfg,
        2,
        BTreeMap::from([(1, SchemaLookup::Found(current.into()))]),
    );
    p.assign(0);
    p.assign(1);
    assert_ne!(p.shard_of(0), p.shard_of(1));
    let values: Vec<(i32, i64, Vec<u8>)> = (0..4)
        .flat_map(|o| {
            [
                (0, o, confluent(41, current, "a", 1_000 + o, &[])),
                (1, o, confluent(1, current, "b", 1_000 + o, &[])),
            ]
        })
        .collect();
    fn batch(values: &[(i32, i64, Vec<u8>)]) -> Vec<Record<'_>> {
        values
            .iter()
            .map(|(q, o, v)| Record {
                partition: *q,
                offset: *o,
                key: Some(if *q == 0 { b"a" } else { b"b" }),
                value: Some(v),
                timestamp_ms: None,
                handle: 0,
            })
            .collect()
    }
    let mut sink = Collect::default();
    p.on_batch_with(
        &batch(&values),
        1_004,
        &mut sink,
        &segloop::pipeline::InPlace,
    );
    assert_eq!(
        p.waiting()[&0].offset,
        0,
        "partition 0 waits at its first record"
    );
    assert!(!p.waiting().contains_key(&1));
    assert_eq!(
        p.stats().records_aggregated,
        4,
        "partition 1's four records"
    );
    assert_eq!(
        p.committable_offset(0),
        Some(0),
        "the waiting record holds the floor"
    );
    assert!(sink.rejected.is_empty());
    answers
        .lock()
        .unwrap()
        .insert(41, SchemaLookup::Found(current.into()));
    p.stop_waiting(0);
    let again: Vec<_> = values.into_iter().filter(|(q, _, _)| *q == 0).collect();
    p.on_batch_with(
        &batch(&again),
        1_005,
        &mut sink,
        &segloop::pipeline::InPlace,
    );
    assert!(p.waiting().is_empty());
    assert_eq!(p.stats().records_aggregated, 8);
    assert_eq!(p.committable_offset(0), Some(0));
    // Between rounds, shard by shard: partition 0's id, partition 1's; then 41 again.
    assert_eq!(*asked.lock().unwrap(), [41, 1, 41]);
}
