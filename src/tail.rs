//! `segloop tail`: a topic's records, decoded, as JSON lines (the kcat + xxd + decode pipeline
//! in one command). The topic is named by its role in the config (telemetry, actions, outcomes,
//! decisions, dlq) or by name; the role picks the codec. Dead letters print their error headers,
//! their source coordinates and their bytes (hex), and what they decode to when they do.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::codec::{build_codec, CodecKind};
use crate::config::Config;
use crate::model::{DecisionRecord, RemediationCommand, RemediationOutcome, TelemetryEvent};

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// A role (telemetry, actions, outcomes, decisions, dlq, state, control) or a topic name.
    pub topic: String,
    /// Start at this broker time (ms); `None`: the beginning.
    pub from_ms: Option<i64>,
    /// Keep reading new records (else stop at the end the topic had at the start).
    pub follow: bool,
    pub partition: Option<i32>,
    /// Only records with this key.
    pub key: Option<String>,
    /// Stop after this many records printed.
    pub max: Option<u64>,
}

/// How a topic's values are decoded.
enum Decode {
    Telemetry(Box<dyn crate::codec::Codec<TelemetryEvent>>),
    Command(Box<dyn crate::codec::Codec<RemediationCommand>>),
    Outcome(Box<dyn crate::codec::Codec<RemediationOutcome>>),
    Decision(Box<dyn crate::codec::Codec<DecisionRecord>>),
    /// Dead letters: headers first; the value as telemetry when it decodes now.
    DeadLetter(Box<dyn crate::codec::Codec<TelemetryEvent>>),
    /// JSON values (state, control), else hex.
    Json,
}

impl Decode {
    /// The value as JSON; with a registry, the writer schema of an id not seen is asked for
    /// first (an unanswered id shows as undecodable, with the registry's reason).
    fn value(&mut self, bytes: &[u8], schemas: Option<&mut crate::registry::Resolver>) -> Value {
        if let Some(source) = schemas {
            let learned = match self {
                Decode::Telemetry(c) | Decode::DeadLetter(c) => {
                    crate::codec::learn_schema(c.as_mut(), source, bytes)
                }
                Decode::Command(c) => crate::codec::learn_schema(c.as_mut(), source, bytes),
                Decode::Outcome(c) => crate::codec::learn_schema(c.as_mut(), source, bytes),
                Decode::Decision(c) => crate::codec::learn_schema(c.as_mut(), source, bytes),
                Decode::Json => Ok(None),
            };
            if let Err((id, reason)) = learned {
                return json!({
                    "undecodable": format!("the schema registry did not answer for schema id {id}: {reason}"),
                    "hex": hex(bytes),
                });
            }
        }
        let decoded = match self {
            Decode::Telemetry(c) | Decode::DeadLetter(c) => {
                c.decode(bytes).map(|r| json!(r)).map_err(|e| e.to_string())
            }
            Decode::Command(c) => c.decode(bytes).map(|r| json!(r)).map_err(|e| e.to_string()),
            Decode::Outcome(c) => c.decode(bytes).map(|r| json!(r)).map_err(|e| e.to_string()),
            Decode::Decision(c) => c.decode(bytes).map(|r| json!(r)).map_err(|e| e.to_string()),
            Decode::Json => serde_json::from_slice::<Value>(bytes).map_err(|e| e.to_string()),
        };
        match decoded {
            Ok(v) => v,
            Err(e) => json!({ "undecodable": e, "hex": hex(bytes) }),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The topic name and decoder for a role or a name.
fn resolve(config: &Config, topic: &str) -> anyhow::Result<(String, Decode)> {
    let t = &config.topics;
    let by_name = |name: &str| {
        [
            ("telemetry", &t.telemetry),
            ("actions", &t.actions),
            ("outcomes", &t.outcomes),
            ("decisions", &t.decisions),
            ("dlq", &t.dlq),
            ("state", &t.state),
            ("control", &t.control),
        ]
        .into_iter()
        .find(|(role, topic)| *role == name || topic.name == name)
    };
    let Some((role, settings)) = by_name(topic) else {
        anyhow::bail!(
            "--topic {topic}: give a role (telemetry, actions, outcomes, decisions, dlq, state, control) or the name of one of the configured topics"
        );
    };
    let s = config.schema_settings(settings);
    let avro = |k: CodecKind| {
        if k == CodecKind::Json {
            CodecKind::AvroSingleObject
        } else {
            k
        }
    };
    let decode = match role {
        "telemetry" => {
            Decode::Telemetry(build_codec(settings.codec, &s).map_err(anyhow::Error::msg)?)
        }
        "actions" => {
            Decode::Command(build_codec(avro(settings.codec), &s).map_err(anyhow::Error::msg)?)
        }
        "outcomes" => {
            Decode::Outcome(build_codec(avro(settings.codec), &s).map_err(anyhow::Error::msg)?)
        }
        "decisions" => {
            Decode::Decision(build_codec(avro(settings.codec), &s).map_err(anyhow::Error::msg)?)
        }
        "dlq" => {
            let tel = &t.telemetry;
            Decode::DeadLetter(
                build_codec(tel.codec, &config.schema_settings(tel)).map_err(anyhow::Error::msg)?,
            )
        }
        _ => Decode::Json,
    };
    Ok((settings.name.clone(), decode))
}

/// Reads `topic` from `from_ms` (broker time; `None`: the beginning) to the end it has now (or
/// on, when `follow`), one partition or all, calling `f` per record until it returns `false`.
///
/// # Errors
/// The topic does not exist, the broker cannot be reached, or `f` fails.
pub fn read(
    config: &Config,
    topic: &str,
    from_ms: Option<i64>,
    partition: Option<i32>,
    follow: bool,
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<crate::kafka::Collapsing> = crate::kafka::client_config(
        config,
        &[
            ("group.id", &format!("{}-tail", config.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ],
    )
    .create_with_context(crate::kafka::Collapsing)
    .context("cannot create a consumer")?;
    let found = crate::kafka::offsets_from(&consumer, topic, from_ms)?;
    let mut tpl = TopicPartitionList::new();
    // Partitions still to read to their end (not following).
    let mut left: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, start) in &found.start {
        if partition.is_some_and(|want| want != *p) {
            continue;
        }
        tpl.add_partition_offset(topic, *p, Offset::Offset(*start))?;
        if found.end[p] > *start {
            left.insert(*p, found.end[p]);
        }
    }
    anyhow::ensure!(
        tpl.count() > 0,
        "{topic} has no partition {}",
        partition.unwrap_or(-1)
    );
    consumer
        .assign(&tpl)
        .context("cannot assign the partitions")?;
    while follow || !left.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = msg.context("consuming")?;
        if let Some(end) = left.get(&m.partition()) {
            if m.offset() + 1 >= *end {
                left.remove(&m.partition());
            }
        }
        if !f(&m)? {
            break;
        }
    }
    Ok(())
}

/// Prints the records as JSON lines to `out`; returns how many.
///
/// # Errors
/// The topic does not exist, the broker cannot be reached, or `out` cannot be written.
pub fn tail(config: &Config, opts: &TailOptions, out: &mut dyn Write) -> anyhow::Result<u64> {
    let (topic, mut decode) = resolve(config, &opts.topic)?;
    let mut schemas = crate::registry::blocking_resolver(config)?;
    let mut printed = 0u64;
    if opts.max == Some(0) {
        return Ok(0);
    }
    read(
        config,
        &topic,
        opts.from_ms,
        opts.partition,
        opts.follow,
        |m| {
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            if opts.key.is_some() && key != opts.key {
                return Ok(true);
            }
            let mut line = json!({
                "partition": m.partition(),
                "offset": m.offset(),
                "timestamp_ms": m.timestamp().to_millis(),
                "key": key,
            });
            if let Decode::DeadLetter(_) = decode {
                line["headers"] = Value::Object(
                    crate::kafka::header_pairs(m)
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                k,
                                json!(v.map(|v| String::from_utf8_lossy(&v).into_owned())),
                            )
                        })
                        .collect(),
                );
                line["hex"] = json!(m.payload().map(hex));
            }
            line["value"] = m
                .payload()
                .map_or(Value::Null, |b| decode.value(b, schemas.as_mut()));
            writeln!(out, "{line}")?;
            printed += 1;
            Ok(opts.max.is_none_or(|max| printed < max))
        },
    )?;
    Ok(printed)
}

/// Which dead letters to send back.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only these error codes (empty: every code).
    pub codes: Vec<String>,
    pub source_partition: Option<i32>,
    /// Broker time of the dead letter, from and to (ms).
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Count only.
    pub dry_run: bool,
}

/// What a replay did (or, in a dry run, would do), by source topic and error code.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayCount {
    pub sent: BTreeMap<(String, String), u64>,
    /// Truncated dead letters: their original bytes are gone, they cannot be sent back.
    pub truncated: u64,
    /// Read but filtered out.
    pub skipped: u64,
}

/// Sends dead letters back to their source topic (original key, value and headers; the
/// `segloop.*` headers dropped) for when their cause has been fixed.
///
/// # Errors
/// The DLQ cannot be read or a record cannot be produced.
pub fn replay_dead_letters(config: &Config, filter: &ReplayFilter) -> anyhow::Result<ReplayCount> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        crate::kafka::producer_config(config, &[])
            .create()
            .context("cannot create a producer")?;
    let mut count = ReplayCount::default();
    let dlq = config.topics.dlq.name.clone();
    read(config, &dlq, filter.from_ms, None, false, |m| {
        let headers = crate::kafka::header_pairs(m);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_deref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let code = get("segloop.error.code").unwrap_or_default();
        let source =
            get("segloop.source.topic").unwrap_or_else(|| config.topics.telemetry.name.clone());
        let partition: Option<i32> = get("segloop.source.partition").and_then(|p| p.parse().ok());
        let at = m.timestamp().to_millis().unwrap_or(0);
        let wanted = (filter.codes.is_empty() || filter.codes.contains(&code))
            && filter.source_partition.is_none_or(|p| partition == Some(p))
            && filter.to_ms.is_none_or(|t| at <= t);
        if !wanted {
            count.skipped += 1;
            return Ok(true);
        }
        if get("segloop.truncated").as_deref() == Some("true") {
            count.truncated += 1;
            return Ok(true);
        }
        if !filter.dry_run {
            let mut kept = OwnedHeaders::new();
            for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with("segloop.")) {
                kept = kept.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&source).headers(kept);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(v) = m.payload() {
                record = record.payload(v);
            }
            crate::kafka::send_waiting(&producer, record)
                .with_context(|| format!("cannot send a dead letter back to {source}"))?;
        }
        *count.sent.entry((source, code)).or_default() += 1;
        Ok(true)
    })?;
    producer
        .flush(Duration::from_secs(30))
        .context("the replayed records were not acknowledged")?;
    Ok(count)
}
