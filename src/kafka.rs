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

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that is down fails every reconnect: one line per kind per interval, and the
    /// next line says how many were not logged.
    #[test]
    fn repeated_client_errors_are_collapsed() {
        let c = Collapse::new(std::time::Duration::from_millis(200));
        assert_eq!(c.admit("AllBrokersDown"), Some(0));
        for _ in 0..50 {
            assert_eq!(c.admit("AllBrokersDown"), None);
        }
        assert_eq!(c.admit("BrokerTransportFailure"), Some(0), "kinds apart");
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(c.admit("AllBrokersDown"), Some(50));
        assert_eq!(c.admit("AllBrokersDown"), None);
        // Bounded: many kinds never grow it past 256.
        for i in 0..1_000 {
            c.admit(&format!("kind {i}"));
        }
        assert!(c.seen.lock().unwrap().len() <= 256);
    }

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

/// A producer's client config: [`client_config`] plus the configured compression (which the
/// pass-through properties may still override).
pub fn producer_config(config: &Config, extra: &[(&str, &str)]) -> ClientConfig {
    let mut with: Vec<(&str, &str)> = vec![("compression.type", &config.kafka.compression)];
    with.extend_from_slice(extra);
    client_config(config, &with)
}

/// What this build of librdkafka supports (`builtin.features`: gzip, snappy, ssl, sasl_scram,
/// zstd, ...).
pub fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|s| s.split(',').map(|f| f.trim().to_string()).collect())
        .unwrap_or_default()
}

/// Settings this build cannot honour, each as `field: problem and fix` (empty: all fine).
/// `check-config` reports them, and every client refuses to start with them.
pub fn build_problems(config: &Config) -> Vec<String> {
    let features = builtin_features();
    let has = |f: &str| features.iter().any(|x| x == f);
    let mut out = Vec::new();
    let props = config.kafka.librdkafka_properties();
    for (k, v) in &props {
        // librdkafka's own check of each value (unknown keys, unsupported values).
        let mut one = ClientConfig::new();
        one.set(k, v);
        if let Err(e) = one.create_native_config() {
            let shown = if crate::config::is_secret_key(k) {
                crate::config::REDACTED
            } else {
                v.as_str()
            };
            out.push(format!(
                "kafka.properties.{k}: librdkafka refuses {shown:?}: {e}"
            ));
        }
    }
    let protocol = props
        .get("security.protocol")
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_else(|| "plaintext".into());
    if protocol.contains("ssl") && !has("ssl") {
        out.push(format!(
            "kafka.properties.security.protocol: {protocol} needs TLS, which this build lacks (built without OpenSSL)"
        ));
    }
    if protocol.starts_with("sasl") {
        let mechanisms = props
            .get("sasl.mechanisms")
            .or_else(|| props.get("sasl.mechanism"))
            .cloned()
            .unwrap_or_else(|| "GSSAPI".into());
        for m in mechanisms.split(',').map(str::trim) {
            let feature = match m.to_ascii_uppercase().as_str() {
                "PLAIN" => "sasl_plain",
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => "sasl_scram",
                "OAUTHBEARER" => "sasl_oauthbearer",
                "GSSAPI" => "sasl_gssapi",
                _ => {
                    out.push(format!(
                        "kafka.properties.sasl.mechanism: unknown mechanism {m:?}; use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"
                    ));
                    continue;
                }
            };
            if !has(feature) {
                out.push(format!(
                    "kafka.properties.sasl.mechanism: {m} is not in this build (it has: {}); use SCRAM-SHA-512, SCRAM-SHA-256, PLAIN or OAUTHBEARER",
                    features.iter().filter(|f| f.starts_with("sasl")).cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        if !has(codec) {
            out.push(format!(
                "build: cannot read {codec}-compressed topics (librdkafka built without {codec})"
            ));
        }
    }
    let c = config.kafka.compression.as_str();
    if c != "none" && !has(c) {
        out.push(format!(
            "kafka.compression: {c} is not in this build; use one of gzip, snappy, lz4, zstd"
        ));
    }
    out
}

/// Client callbacks that keep the errors librdkafka reports outside a call (failed
/// connections, TLS handshakes, authentication), for [`connect`].
#[derive(Default)]
pub struct ErrorWatch {
    errors: std::sync::Mutex<Vec<(Option<RDKafkaErrorCode>, String)>>,
}

impl rdkafka::ClientContext for ErrorWatch {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 64 {
                v.push((error.rdkafka_error_code(), reason.to_string()));
            }
        }
    }
}

impl rdkafka::producer::ProducerContext for ErrorWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Errors that no retry fixes: the configuration must change.
pub fn is_config_error(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as E;
    matches!(
        code,
        E::Authentication
            | E::SaslAuthenticationFailed
            | E::SSL
            | E::TopicAuthorizationFailed
            | E::GroupAuthorizationFailed
            | E::ClusterAuthorizationFailed
            | E::TransactionalIdAuthorizationFailed
            | E::UnsupportedSASLMechanism
            | E::IllegalSASLState
    )
}

/// How the configured brokers are reached, for error messages: the bootstrap servers, the
/// security protocol and the SASL mechanism.
pub fn describe_connection(config: &Config) -> String {
    let props = config.kafka.librdkafka_properties();
    let protocol = props
        .get("security.protocol")
        .cloned()
        .unwrap_or_else(|| "plaintext".into());
    let mut s = format!(
        "{} (security.protocol={protocol}",
        config.kafka.bootstrap_servers
    );
    if protocol.to_ascii_lowercase().starts_with("sasl") {
        let m = props
            .get("sasl.mechanism")
            .or_else(|| props.get("sasl.mechanisms"))
            .cloned()
            .unwrap_or_else(|| "GSSAPI".into());
        s.push_str(&format!(", sasl.mechanism={m}"));
        if let Some(user) = props.get("sasl.username") {
            s.push_str(&format!(", sasl.username={user}"));
        }
    }
    s.push(')');
    s
}

/// A hint for the usual causes of a connection error.
fn hint(code: Option<RDKafkaErrorCode>, reason: &str) -> &'static str {
    use RDKafkaErrorCode as E;
    let r = reason.to_ascii_lowercase();
    if r.contains("certificate") || r.contains("ssl handshake") {
        return "check ssl.ca.location (the CA that signed the broker's certificate), that the certificate names the host in bootstrap_servers, and ssl.certificate.location/ssl.key.location for mutual TLS";
    }
    match code {
        Some(E::Authentication | E::SaslAuthenticationFailed) => {
            "check sasl.username, sasl.password and sasl.mechanism"
        }
        Some(E::SSL) if r.contains("verify") || r.contains("certificate") => {
            "check ssl.ca.location (the CA that signed the broker's certificate) and that the certificate names the host in bootstrap_servers"
        }
        Some(E::SSL) => "check security.protocol, ssl.certificate.location and ssl.key.location",
        Some(
            E::TopicAuthorizationFailed
            | E::GroupAuthorizationFailed
            | E::ClusterAuthorizationFailed
            | E::TransactionalIdAuthorizationFailed,
        ) => "grant the ACLs the README lists (Run against your Kafka: ACLs)",
        _ => "check bootstrap_servers and security.protocol",
    }
}

/// Connects to the configured brokers and fetches metadata, within `kafka.connect_timeout`.
/// A TLS, authentication or authorization failure ends it at once (librdkafka would retry a
/// wrong password forever).
///
/// # Errors
/// One line naming the brokers, the security protocol, the mechanism, the cause and the fix.
pub fn connect(config: &Config) -> anyhow::Result<()> {
    let problems = build_problems(config);
    if !problems.is_empty() {
        bail!(
            "this build cannot use the configured Kafka settings:\n  {}",
            problems.join("\n  ")
        );
    }
    use rdkafka::producer::Producer as _;
    // A producer: polling it serves librdkafka's error callback, whose reason names the broker
    // and the cause (a consumer hands errors back from poll without it). It never sends.
    // Its own log lines are off: the failure is reported once, below, with the fix.
    let watch: rdkafka::producer::BaseProducer<ErrorWatch> = client_config(config, &[])
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg)
        .create_with_context(ErrorWatch::default())
        .context("cannot create a Kafka client")?;
    let deadline = std::time::Instant::now() + config.kafka.connect_timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let last = match watch
            .client()
            .fetch_metadata(None, left.min(Duration::from_millis(500)))
        {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        watch.poll(Duration::ZERO);
        let seen = std::mem::take(&mut *watch.context().errors.lock().expect("errors lock"));
        if let Some((code, reason)) = seen
            .iter()
            .find(|(c, _)| c.is_some_and(is_config_error))
            .or_else(|| left.is_zero().then(|| seen.last()).flatten())
        {
            bail!(
                "cannot connect to Kafka at {}: {reason} ({})",
                describe_connection(config),
                hint(*code, reason)
            );
        }
        if left.is_zero() {
            bail!(
                "cannot connect to Kafka at {}: no broker answered within {} ({last}; {})",
                describe_connection(config),
                humantime::format_duration(config.kafka.connect_timeout),
                hint(None, "")
            );
        }
    }
}

/// Reads `topic` from broker time `from_ms` to the end it has now (committed records only),
/// handing each record's value to `f`; gives up after `limit`.
///
/// # Errors
/// The topic cannot be read.
pub fn read_since(
    config: &Config,
    topic: &str,
    from_ms: i64,
    limit: Duration,
    mut f: impl FnMut(&[u8]),
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
                if let Some(v) = m.payload() {
                    f(v);
                }
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
