//! Kafka adapters shared by the drivers (`run`, `backtest`, `demo`, the actuator): client configs,
//! topic checks and creation, the murmur2 partitioner.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Config;

/// A client config with the brokers, client id and the pass-through properties (which win).
pub fn client_config(config: &Config, extra: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    c.set("client.id", &config.kafka.client_id);
    for (k, v) in extra {
        c.set(*k, *v);
    }
    for (k, v) in config.kafka.librdkafka_properties() {
        c.set(k, v);
    }
    c
}

/// Partition counts of the configured topics, after creating missing ones when
/// `create_topics = true`.
///
/// # Errors
/// A missing topic (without `create_topics`), or telemetry and state with different partition
/// counts: both name the topic and the fix.
pub fn prepare_topics(config: &Config) -> anyhow::Result<BTreeMap<String, i32>> {
    let probe: BaseConsumer = client_config(config, &[("allow.auto.create.topics", "false")])
        .create()
        .context("cannot create a Kafka client for metadata")?;
    let t = &config.topics;
    // The state changelog and the control topic keep the latest record per key.
    let wanted: Vec<(&str, &str, bool)> = t
        .all()
        .into_iter()
        .map(|(role, topic)| {
            (
                role,
                topic.name.as_str(),
                matches!(role, "state" | "control"),
            )
        })
        .collect();
    let mut counts = existing_partitions(&probe, wanted.iter().map(|w| w.1))?;
    let missing: Vec<&(&str, &str, bool)> = wanted
        .iter()
        .filter(|w| !counts.contains_key(w.1))
        .collect();
    if !missing.is_empty() {
        if !config.kafka.create_topics {
            let names: Vec<String> = missing
                .iter()
                .map(|w| format!("{} ({})", w.1, w.0))
                .collect();
            bail!(
                "topic{} {} do{} not exist; create {} (telemetry and state with the same \
                 partition count) or set kafka.create_topics = true",
                if names.len() > 1 { "s" } else { "" },
                names.join(", "),
                if names.len() > 1 { "" } else { "es" },
                if names.len() > 1 { "them" } else { "it" }
            );
        }
        // State follows telemetry's partition count when telemetry already exists.
        let partitions = counts
            .get(t.telemetry.name.as_str())
            .copied()
            .unwrap_or(config.kafka.partitions);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(_, name, compacted)| {
                let n = NewTopic::new(
                    name,
                    partitions,
                    TopicReplication::Fixed(config.kafka.replication_factor),
                );
                if *compacted {
                    n.set("cleanup.policy", "compact")
                } else {
                    n
                }
            })
            .collect();
        let admin: AdminClient<DefaultClientContext> = client_config(config, &[])
            .create()
            .context("cannot create a Kafka admin client")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime for the admin client")?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = rt
            .block_on(admin.create_topics(new.iter(), &opts))
            .context("creating topics failed (the embedded mock cluster cannot create topics this way: see create_embedded_topics)")?;
        for r in results {
            if let Err((topic, code)) = r {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    bail!("cannot create topic {topic}: {code}");
                }
            }
        }
        // Metadata can lag creation by a moment.
        for _ in 0..50 {
            counts = existing_partitions(&probe, wanted.iter().map(|w| w.1))?;
            if counts.len() == wanted.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let telemetry = counts.get(t.telemetry.name.as_str()).copied();
    let state = counts.get(t.state.name.as_str()).copied();
    match (telemetry, state) {
        (Some(a), Some(b)) if a != b => bail!(
            "telemetry topic {} has {a} partitions but state topic {} has {b}; they must be \
             co-partitioned: recreate {} with {a} partitions",
            t.telemetry.name,
            t.state.name,
            t.state.name
        ),
        (None, _) | (_, None) => bail!("topic metadata is incomplete after creating topics"),
        _ => {}
    }
    Ok(counts)
}

/// Creates the configured topics on librdkafka's in-process mock cluster (which does not
/// implement the CreateTopics API): telemetry and state co-partitioned, the others with the
/// same count.
///
/// # Errors
/// The mock refused a topic.
pub fn create_embedded_topics<C: rdkafka::ClientContext>(
    cluster: &rdkafka::mocking::MockCluster<'_, C>,
    config: &Config,
) -> anyhow::Result<()> {
    for (_, topic) in config.topics.all() {
        let name = &topic.name;
        cluster
            .create_topic(name, config.kafka.partitions, 1)
            .with_context(|| format!("the embedded cluster cannot create {name}"))?;
    }
    Ok(())
}

fn existing_partitions<'a>(
    probe: &BaseConsumer,
    names: impl Iterator<Item = &'a str>,
) -> anyhow::Result<BTreeMap<String, i32>> {
    let mut out = BTreeMap::new();
    for name in names {
        let md = probe
            .fetch_metadata(Some(name), Duration::from_secs(10))
            .with_context(|| format!("cannot fetch metadata for topic {name}"))?;
        for topic in md.topics() {
            if topic.error().is_none() && !topic.partitions().is_empty() {
                out.insert(topic.name().to_string(), topic.partitions().len() as i32);
            }
        }
    }
    Ok(out)
}

/// Callbacks of consumers that read to the end of a partition (`enable.partition.eof`):
/// reaching the end is expected, not an error worth logging.
pub struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::KafkaError;
        let eof = match &error {
            KafkaError::PartitionEOF(_) => true,
            KafkaError::Global(code) => *code == rdkafka::types::RDKafkaErrorCode::PartitionEOF,
            _ => false,
        };
        if !eof {
            tracing::warn!(error = %error, reason, "kafka client");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Per-partition offsets of a topic: where to start, and the high watermarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offsets {
    pub start: BTreeMap<i32, i64>,
    pub end: BTreeMap<i32, i64>,
    /// Whether `start` came from the broker's time index (else: the beginning).
    pub by_time: bool,
}

/// The offsets of `topic` from broker time `from_ms` on (the first record at or after it,
/// by offsets-for-times), or from the beginning without a time or where the broker keeps no
/// time index; `end` is the high watermark now.
///
/// The embedded mock cluster answers offsets-for-times with the log end: a broker whose
/// answer for time 0 is not the first offset is treated as having no time index.
///
/// # Errors
/// The topic does not exist or its metadata or watermarks cannot be read.
pub fn offsets_from<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    from_ms: Option<i64>,
) -> anyhow::Result<Offsets> {
    use rdkafka::{Offset, TopicPartitionList};
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot fetch metadata for topic {topic}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic {topic} does not exist (or has no partitions); check the topic names in the config"
    );
    let mut start = BTreeMap::new();
    let mut end = BTreeMap::new();
    for &p in &partitions {
        let (low, high) = watermarks(consumer, topic, p)?;
        start.insert(p, low);
        end.insert(p, high);
    }
    let Some(from) = from_ms else {
        return Ok(Offsets {
            start,
            end,
            by_time: false,
        });
    };
    let at = |ts: i64| -> anyhow::Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(ts))?;
        }
        Ok(tpl)
    };
    let indexed = consumer
        .offsets_for_times(at(0)?, timeout)
        .is_ok_and(|found| {
            found.elements().iter().all(|e| {
                let (low, high) = (start[&e.partition()], end[&e.partition()]);
                low == high || e.offset() == Offset::Offset(low)
            })
        });
    if indexed {
        if let Ok(found) = consumer.offsets_for_times(at(from)?, timeout) {
            let mut resolved = BTreeMap::new();
            for e in found.elements() {
                let (low, high) = (start[&e.partition()], end[&e.partition()]);
                match e.offset() {
                    Offset::Offset(n) if (low..=high).contains(&n) => {
                        resolved.insert(e.partition(), n);
                    }
                    Offset::End => {
                        resolved.insert(e.partition(), high);
                    }
                    _ => {}
                }
            }
            if resolved.len() == partitions.len() {
                return Ok(Offsets {
                    start: resolved,
                    end,
                    by_time: true,
                });
            }
        }
    }
    Ok(Offsets {
        start,
        end,
        by_time: false,
    })
}

/// The low and high watermarks of a partition, retried for up to 15 s while the broker is
/// still electing its leader (right after the topic was created, or during a broker restart).
///
/// # Errors
/// The offsets cannot be read within that time.
pub fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> anyhow::Result<(i64, i64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
            Ok(w) => return Ok(w),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(topic, partition, error = %e, "watermarks not available yet; retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read the offsets of {topic}/{partition}"))
            }
        }
    }
}

/// Sends a record, waiting while the producer's bounded queue is full (backpressure).
///
/// # Errors
/// Any error but a full queue (the record cannot be queued at all).
pub fn send_waiting<C, K, P>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    mut record: rdkafka::producer::BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> rdkafka::error::KafkaResult<()>
where
    C: rdkafka::producer::ProducerContext + 'static,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Java's murmur2 partitioner (what `partitioner=murmur2_random` does for keyed records):
/// `(murmur2(key) & 0x7fffffff) % partitions`. Used to find a segment's partition without a
/// broker (tests, the demo's ground truth).
pub fn murmur2_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) as i32 % partitions
}

/// Kafka's murmur2 (seed 0x9747b28c), as in `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ len as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's published vectors (clients/src/test/java/.../UtilsTest.java, testMurmur2).
    #[test]
    fn murmur2_matches_kafka_test_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2(key) as i32,
                want,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }
}
