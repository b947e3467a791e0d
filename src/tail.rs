//! `segloop tail`: a topic's records, decoded, as JSON lines (the kcat + xxd + decode pipeline
//! in one command). The topic is named by its role in the config (telemetry, actions, outcomes,
//! decisions, dlq) or by name; the role picks the codec. Dead letters print their error headers,
//! their source coordinates and their bytes (hex), and what they decode to when they do.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
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
    fn value(&self, bytes: &[u8]) -> Value {
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
    let s = settings.schema_settings();
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
                build_codec(tel.codec, &tel.schema_settings()).map_err(anyhow::Error::msg)?,
            )
        }
        _ => Decode::Json,
    };
    Ok((settings.name.clone(), decode))
}

/// Prints the records as JSON lines to `out`; returns how many.
///
/// # Errors
/// The topic does not exist, the broker cannot be reached, or `out` cannot be written.
pub fn tail(config: &Config, opts: &TailOptions, out: &mut dyn Write) -> anyhow::Result<u64> {
    let (topic, decode) = resolve(config, &opts.topic)?;
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
    let found = crate::kafka::offsets_from(&consumer, &topic, opts.from_ms)?;
    let mut tpl = TopicPartitionList::new();
    // Partitions still to read to their end (not following).
    let mut left: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, start) in &found.start {
        if opts.partition.is_some_and(|want| want != *p) {
            continue;
        }
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*start))?;
        if found.end[p] > *start {
            left.insert(*p, found.end[p]);
        }
    }
    anyhow::ensure!(
        tpl.count() > 0,
        "{topic} has no partition {}",
        opts.partition.unwrap_or(-1)
    );
    consumer
        .assign(&tpl)
        .context("cannot assign the partitions")?;
    let mut printed = 0u64;
    loop {
        if !opts.follow && left.is_empty() {
            break;
        }
        if opts.max.is_some_and(|m| printed >= m) {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = msg.context("consuming")?;
        if let Some(end) = left.get(&m.partition()) {
            if m.offset() + 1 >= *end {
                left.remove(&m.partition());
            }
        }
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        if opts.key.is_some() && key != opts.key {
            continue;
        }
        let mut line = json!({
            "partition": m.partition(),
            "offset": m.offset(),
            "timestamp_ms": m.timestamp().to_millis(),
            "key": key,
        });
        if let Decode::DeadLetter(_) = decode {
            let mut headers = serde_json::Map::new();
            if let Some(h) = m.headers() {
                for x in h.iter() {
                    headers.insert(
                        x.key.to_string(),
                        json!(x.value.map(|v| String::from_utf8_lossy(v).into_owned())),
                    );
                }
            }
            line["headers"] = Value::Object(headers);
            line["hex"] = json!(m.payload().map(hex));
        }
        line["value"] = m.payload().map_or(Value::Null, |b| decode.value(b));
        writeln!(out, "{line}")?;
        printed += 1;
    }
    Ok(printed)
}
