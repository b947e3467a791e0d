//! Kafka adapters shared by the drivers (`run`, `backtest`, `demo`, the actuator): client configs,
//! topic checks and creation, the murmur2 partitioner.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;

mod connect;
mod feed;
#[cfg(test)]
mod tests;
#[allow(unused_imports)]
pub use connect::*;
pub use feed::{Fed, Feed, Router, Taken};

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
    let mut counts = existing_partitions(config, &probe, wanted.iter().map(|w| w.1))?;
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
                )
                .set("compression.type", &config.kafka.topic_compression);
                if *compacted {
                    n.set("cleanup.policy", "compact")
                } else {
                    n
                }
            })
            .collect();
        let (admin, rt) = admin_client(config)?;
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
            counts = existing_partitions(config, &probe, wanted.iter().map(|w| w.1))?;
            if counts.len() == wanted.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let unseen: Vec<&str> = wanted
        .iter()
        .map(|w| w.1)
        .filter(|name| !counts.contains_key(*name))
        .collect();
    if !unseen.is_empty() {
        bail!(
            "no metadata for topic{} {} from {} after waiting 5 s: the brokers are slow to \
             propagate new topics or the principal lacks DESCRIBE on them",
            if unseen.len() > 1 { "s" } else { "" },
            unseen.join(", "),
            describe_connection(config)
        );
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

/// An admin client on `config`'s connection, and a runtime to wait on its calls.
fn admin_client(
    config: &Config,
) -> anyhow::Result<(AdminClient<DefaultClientContext>, tokio::runtime::Runtime)> {
    let admin = client_config(config, &[])
        .create()
        .context("cannot create a Kafka admin client")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for the admin client")?;
    Ok((admin, rt))
}

/// Deletes `names` through the admin API (a topic already gone counts as deleted).
///
/// # Errors
/// The admin client failed, or a topic could not be deleted (the error names it).
pub fn delete_topics(config: &Config, names: &[&str]) -> anyhow::Result<()> {
    let (admin, rt) = admin_client(config)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = rt
        .block_on(admin.delete_topics(names, &opts))
        .context("deleting topics failed")?;
    for r in results {
        if let Err((topic, code)) = r {
            if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                bail!("cannot delete topic {topic}: {code}");
            }
        }
    }
    Ok(())
}

fn existing_partitions<'a>(
    config: &Config,
    probe: &BaseConsumer,
    names: impl Iterator<Item = &'a str>,
) -> anyhow::Result<BTreeMap<String, i32>> {
    let mut out = BTreeMap::new();
    for name in names {
        let md = probe
            .fetch_metadata(Some(name), Duration::from_secs(10))
            .with_context(|| format!("cannot fetch metadata for topic {name}"))?;
        for topic in md.topics() {
            let code = topic.error().map(RDKafkaErrorCode::from);
            if code == Some(RDKafkaErrorCode::TopicAuthorizationFailed) {
                bail!(
                    "not authorized to describe topic {} at {}: grant the principal DESCRIBE (and READ or WRITE, see the README's ACL list) on Topic:{}",
                    topic.name(),
                    describe_connection(config),
                    topic.name()
                );
            }
            if code.is_none() && !topic.partitions().is_empty() {
                out.insert(topic.name().to_string(), topic.partitions().len() as i32);
            }
        }
    }
    Ok(out)
}

/// Collapses repeated client errors and librdkafka warnings (a broker that is down fails every
/// reconnect of every client): the first of a kind is logged, repeats within `every` are
/// counted and reported on the next line of that kind. Kinds are bounded (256; then forgotten).
pub struct Collapse {
    every: std::time::Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

impl Collapse {
    pub fn new(every: std::time::Duration) -> Self {
        Collapse {
            every,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether an occurrence of `kind` is logged now: `Some(repeats)` (those not logged since
    /// the last line), or `None` to stay quiet.
    pub fn admit(&self, kind: &str) -> Option<u64> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        match seen.get_mut(kind) {
            Some((last, repeats)) if now.duration_since(*last) < self.every => {
                *repeats += 1;
                None
            }
            Some((last, repeats)) => {
                *last = now;
                Some(std::mem::take(repeats))
            }
            None => {
                if seen.len() >= 256 {
                    seen.clear();
                }
                seen.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// The process's collapse of client errors (every client of a process shares it).
pub fn client_log() -> &'static Collapse {
    static LOG: std::sync::OnceLock<Collapse> = std::sync::OnceLock::new();
    LOG.get_or_init(|| Collapse::new(std::time::Duration::from_secs(30)))
}

/// Logs a client error, collapsed (see [`Collapse`]).
pub fn log_client_error(error: &rdkafka::error::KafkaError, reason: &str) {
    if let Some(repeated) = client_log().admit(&error.to_string()) {
        tracing::warn!(error = %error, reason, repeated, "kafka client");
    }
}

/// Logs a librdkafka log line: warnings and worse collapsed by facility, the rest at debug.
pub fn log_client_line(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
            if let Some(repeated) = client_log().admit(&format!("librdkafka {fac}")) {
                tracing::warn!(target: "librdkafka", facility = fac, repeated, "{message}");
            }
        }
        _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
    }
}

/// Callbacks of clients with nothing of their own to do: client errors and librdkafka's
/// warnings collapsed.
pub struct Collapsing;

impl rdkafka::ClientContext for Collapsing {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_client_line(level, fac, message);
    }
}

impl rdkafka::consumer::ConsumerContext for Collapsing {}

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
            log_client_error(&error, reason);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_client_line(level, fac, message);
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

/// A producer's client config: [`client_config`] plus the configured compression (which the
/// pass-through properties may still override).
pub fn producer_config(config: &Config, extra: &[(&str, &str)]) -> ClientConfig {
    let mut with: Vec<(&str, &str)> = vec![("compression.type", &config.kafka.compression)];
    with.extend_from_slice(extra);
    client_config(config, &with)
}

/// Reads `topic` from broker time `from_ms` to the end it has now (committed records only),
/// handing each record's key and value (`None`: a tombstone) to `f`; gives up after `limit`.
///
/// # Errors
/// The topic cannot be read.
pub fn read_since(
    config: &Config,
    topic: &str,
    from_ms: i64,
    limit: Duration,
    mut f: impl FnMut(Option<&[u8]>, Option<&[u8]>),
) -> anyhow::Result<()> {
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer<QuietEof> = client_config(
        config,
        &[
            ("group.id", &format!("{}-lookback", config.kafka.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("isolation.level", "read_committed"),
        ],
    )
    .create_with_context(QuietEof)
    .with_context(|| format!("cannot create a reader of {topic}"))?;
    let found = offsets_from(&c, topic, Some(from_ms))?;
    let mut left: BTreeMap<i32, i64> = found
        .start
        .iter()
        .filter(|(p, o)| found.end[*p] > **o)
        .map(|(p, _)| (*p, found.end[p]))
        .collect();
    if left.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for p in left.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Offset(found.start[p]))?;
    }
    c.assign(&tpl)
        .with_context(|| format!("cannot read {topic}"))?;
    drop(tpl);
    let deadline = std::time::Instant::now() + limit;
    while !left.is_empty() && std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                f(m.key(), m.payload());
                if left
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    left.remove(&m.partition());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                left.remove(&p);
            }
            _ => {}
        }
    }
    Ok(())
}

/// A message's headers, copied, in order.
pub fn header_pairs<M: rdkafka::Message>(m: &M) -> Vec<(String, Option<Vec<u8>>)> {
    use rdkafka::message::Headers as _;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}
