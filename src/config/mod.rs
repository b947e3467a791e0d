//! Configuration: TOML, layered `defaults < file < SEGLOOP__SECTION__KEY env vars < CLI --set`.
//!
//! - Every struct denies unknown keys; a file error names the file, line and column.
//! - Paths inside a file resolve relative to that file's directory.
//! - [`Config::validate`] does the cross-field checks and says what to change.
//! - The environment is passed in (not read here), so tests never touch the process env.
//!
//! `config/segloop.toml` documents every option.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{CodecKind, SchemaSettings};

mod load;
mod registry;
#[cfg(test)]
mod tests;
pub use load::*;
pub use registry::*;

/// Prefix of environment overrides: `SEGLOOP__WINDOWS__SIZE=5s` sets `windows.size`.
pub const ENV_PREFIX: &str = "SEGLOOP__";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Policy file (TOML); relative to this config file.
    pub policies: Option<PathBuf>,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub windows: WindowConfig,
    pub engine: EngineConfig,
    pub delivery: DeliveryConfig,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    pub actuator: ActuatorConfig,
    pub schema_registry: SchemaRegistryConfig,
}

/// `segloop actuator`: the reference actuator's handlers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActuatorConfig {
    /// Written in every outcome's `actuator` field.
    pub name: String,
    /// Consumer group of the actuators (instances share the actions topic).
    pub group_id: String,
    /// A shell command per action (run with `sh -c`; SEGLOOP_* variables describe the command;
    /// exit 0 = APPLIED, otherwise FAILED with its output).
    pub shell: BTreeMap<String, String>,
    /// POST each command as JSON to this http:// URL when no shell command matches its action;
    /// 2xx = APPLIED, 4xx = REJECTED, otherwise FAILED.
    pub webhook: Option<String>,
    /// A handler running longer than this fails.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ActuatorConfig {
    fn default() -> Self {
        ActuatorConfig {
            name: "segloop-actuator".into(),
            group_id: "segloop-actuator".into(),
            shell: BTreeMap::new(),
            webhook: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Brokers and client settings.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port,...` of the brokers.
    pub bootstrap_servers: String,
    /// Consumer group of the telemetry consumers; instances in one group share partitions.
    pub group_id: String,
    pub client_id: String,
    /// Create missing topics at startup (telemetry and state co-partitioned).
    pub create_topics: bool,
    /// Partition count for topics segloop creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// librdkafka properties passed through verbatim (SASL/TLS included). A secret can come
    /// from the environment or a file instead of the TOML:
    /// `"sasl.password" = { env = "KAFKA_PASSWORD" }` or `{ file = "/run/secrets/kafka" }`.
    pub properties: BTreeMap<String, toml::Value>,
    /// How long startup waits for the brokers (connection, TLS handshake, authentication,
    /// authorization) before `segloop run`, `actuator` and `backtest` give up with the cause;
    /// also how long a consume error other than an unreachable broker may repeat before
    /// `segloop run` stops.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Compression of the records segloop produces: none, gzip, snappy, lz4 or zstd (every
    /// codec is read on every topic, whatever this says).
    pub compression: String,
    /// `compression.type` of the topics segloop creates: producer (keep each producer's
    /// codec), none, gzip, snappy, lz4 or zstd.
    pub topic_compression: String,
    /// `properties` with secret references read (filled by `Config::load`).
    #[serde(skip)]
    resolved: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "segloop".into(),
            client_id: "segloop".into(),
            create_topics: false,
            partitions: 6,
            replication_factor: 1,
            properties: BTreeMap::new(),
            connect_timeout: Duration::from_secs(30),
            compression: "none".into(),
            topic_compression: "producer".into(),
            resolved: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    /// Secrets print as `[redacted]`, as everywhere segloop prints configuration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&String, String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_key(k) && !matches!(v, toml::Value::Table(_)) {
                    REDACTED.to_string()
                } else {
                    v.to_string()
                };
                (k, shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("client_id", &self.client_id)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("properties", &properties)
            .field("connect_timeout", &self.connect_timeout)
            .field("compression", &self.compression)
            .field("topic_compression", &self.topic_compression)
            .finish()
    }
}

/// Largest config or policy file read (a path like `/dev/zero` is refused, not read forever).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a UTF-8 text file of at most `max` bytes.
///
/// # Errors
/// The file cannot be read, is larger, or is not UTF-8.
/// Most bytes of a file a value or secret is read from (`{ file = ".." }`, `admin.token_file`):
/// PEM bundles and tokens are far smaller; `/dev/zero` must not fill the memory.
pub const MAX_SECRET_BYTES: u64 = 1 << 20;

pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes (the limit for config, policy and secret files)"),
        ));
    }
    Ok(text)
}

/// Compression codecs Kafka knows.
pub const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

/// Whether a librdkafka property holds a secret (never printed): keys ending in `password` or
/// `secret`, private keys given inline, JAAS configs.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.ends_with("password")
        || k.ends_with("secret")
        || k.ends_with("key.pem")
        || k.ends_with("jaas.config")
}

/// What a redacted secret prints as.
pub const REDACTED: &str = "[redacted]";

/// A property value: a scalar, or a reference to a secret in the environment or a file.
fn property_value(
    key: &str,
    v: &toml::Value,
    base: &Path,
    env: &HashMap<String, String>,
) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Table(t) => {
            let one = |what: &str| t.get(what).and_then(toml::Value::as_str);
            match (one("env"), one("file"), t.len()) {
                (Some(var), None, 1) => env.get(var).cloned().ok_or_else(|| {
                    format!("the environment variable {var} is not set; export it or put the value here")
                }),
                (None, Some(path), 1) => {
                    let p = base.join(path);
                    read_bounded(&p, MAX_SECRET_BYTES)
                        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                        .map_err(|e| format!("cannot read {}: {e}", p.display()))
                }
                _ => Err(format!(
                    "a table here must be {{ env = \"VAR\" }} or {{ file = \"path\" }} (the {} comes from there)",
                    if is_secret_key(key) { "secret" } else { "value" }
                )),
            }
        }
        toml::Value::Array(_) => Err("librdkafka properties are scalars; quote the value".into()),
        other => Ok(other.to_string()),
    }
}

impl KafkaConfig {
    /// The pass-through properties as librdkafka strings, secrets read.
    pub fn librdkafka_properties(&self) -> BTreeMap<String, String> {
        if !self.resolved.is_empty() || self.properties.is_empty() {
            return self.resolved.clone();
        }
        // Not loaded through `Config::load` (a test's literal): plain values only.
        self.properties
            .iter()
            .filter_map(|(k, v)| {
                let env = HashMap::new();
                Some((k.clone(), property_value(k, v, Path::new("."), &env).ok()?))
            })
            .collect()
    }

    /// Takes another config's connection settings (pass-through properties with their secrets
    /// read, connect timeout): for tools pointed at other brokers with `--bootstrap` that must
    /// authenticate as the config says.
    pub fn use_connection_of(&mut self, other: &KafkaConfig) {
        self.properties = other.properties.clone();
        self.resolved = other.resolved.clone();
        self.connect_timeout = other.connect_timeout;
    }

    /// A property's value as segloop will print it: secrets redacted.
    pub fn shown(&self, key: &str) -> Option<String> {
        let v = self.librdkafka_properties().remove(key)?;
        Some(if is_secret_key(key) {
            REDACTED.into()
        } else {
            v
        })
    }

    fn resolve(&mut self, base: &Path, env: &HashMap<String, String>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.resolved.clear();
        for (k, v) in &self.properties {
            match property_value(k, v, base, env) {
                Ok(s) => {
                    self.resolved.insert(k.clone(), s);
                }
                Err(message) => errors.push(FieldError {
                    field: format!("kafka.properties.{k}"),
                    message,
                }),
            }
        }
        errors
    }
}

/// One topic: its name and how its records are encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Default: the role's (`segloop.telemetry`, ...), so a table may set only its codec.
    #[serde(default = "unset_topic_name")]
    pub name: String,
    #[serde(default)]
    pub codec: CodecKind,
    /// Confluent wire format: the schema id segloop writes with.
    #[serde(default = "default_schema_id")]
    pub schema_id: u32,
    /// Confluent wire format: other writer schemas by id (`"7" = "schemas/old.avsc"`).
    #[serde(default)]
    pub schema_ids: BTreeMap<String, PathBuf>,
    /// Extra writer schemas accepted by fingerprint (single-object).
    #[serde(default)]
    pub writer_schemas: Vec<PathBuf>,
    /// `avro-raw`: the schema records were written with (default: the current one).
    #[serde(default)]
    pub raw_writer_schema: Option<PathBuf>,
}

fn default_schema_id() -> u32 {
    1
}

/// A topic table without `name`: replaced by the role's default name when the config loads.
const UNSET_TOPIC_NAME: &str = "\u{0}unset";

fn unset_topic_name() -> String {
    UNSET_TOPIC_NAME.to_string()
}

impl TopicConfig {
    fn named(name: &str) -> Self {
        TopicConfig {
            name: name.into(),
            codec: CodecKind::AvroSingleObject,
            schema_id: default_schema_id(),
            schema_ids: BTreeMap::new(),
            writer_schemas: Vec::new(),
            raw_writer_schema: None,
        }
    }

    /// The codec settings without a registry, ids parsed (validated by [`Config::validate`]).
    /// With one, see [`Config::schema_settings`].
    pub fn schema_settings(&self) -> SchemaSettings {
        SchemaSettings {
            schema_id: Some(self.schema_id),
            schema_ids: self
                .schema_ids
                .iter()
                .filter_map(|(id, p)| id.parse().ok().map(|id: u32| (id, p.clone())))
                .collect::<HashMap<_, _>>(),
            writer_schemas: self.writer_schemas.clone(),
            raw_writer_schema: self.raw_writer_schema.clone(),
        }
    }
}

/// The topics of the wire contract (DESIGN.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub telemetry: TopicConfig,
    pub actions: TopicConfig,
    pub outcomes: TopicConfig,
    pub dlq: TopicConfig,
    pub decisions: TopicConfig,
    pub control: TopicConfig,
    pub state: TopicConfig,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            telemetry: TopicConfig::named("segloop.telemetry"),
            actions: TopicConfig::named("segloop.actions"),
            outcomes: TopicConfig::named("segloop.outcomes"),
            dlq: TopicConfig::named("segloop.dlq"),
            decisions: TopicConfig::named("segloop.decisions"),
            control: TopicConfig::named("segloop.control"),
            state: TopicConfig::named("segloop.state"),
        }
    }
}

impl TopicsConfig {
    /// Every topic with its role (`telemetry`, `actions`, ..., `state`), the config key under
    /// `topics.`.
    pub fn all(&self) -> [(&'static str, &TopicConfig); 7] {
        [
            ("telemetry", &self.telemetry),
            ("actions", &self.actions),
            ("outcomes", &self.outcomes),
            ("dlq", &self.dlq),
            ("decisions", &self.decisions),
            ("control", &self.control),
            ("state", &self.state),
        ]
    }

    fn all_mut(&mut self) -> [&mut TopicConfig; 7] {
        [
            &mut self.telemetry,
            &mut self.actions,
            &mut self.outcomes,
            &mut self.dlq,
            &mut self.decisions,
            &mut self.control,
            &mut self.state,
        ]
    }
}

/// How `segloop run` spreads its per-event work over threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Threads that decode and window the telemetry and judge the windows that move no loop,
    /// each owning a disjoint set of the assigned partitions (0: one per CPU core). Every
    /// window that may fire is judged by the controller on the loop thread, so its limits stay
    /// exact. `windows.max_segments` is split evenly between the threads.
    pub threads: usize,
}

impl Default for EngineConfig {
    /// One thread: with the broker on the same cores, more threads measured slower (see
    /// docs/benchmarks.md, "Shards"); 0 uses every core of a host of its own.
    fn default() -> Self {
        EngineConfig { threads: 1 }
    }
}

/// Most `engine.threads`.
pub const MAX_ENGINE_THREADS: usize = 256;

impl EngineConfig {
    /// The threads a run uses: `threads`, or with 0 one per CPU core.
    pub fn effective_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n.min(MAX_ENGINE_THREADS),
        }
    }
}

/// Event-time windows and watermarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Window length.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// Hop for hopping windows; absent = tumbling. Must divide `size`.
    #[serde(with = "humantime_serde")]
    pub hop: Option<Duration>,
    /// Watermark = max event time seen on the partition − this.
    #[serde(with = "humantime_serde")]
    pub out_of_orderness: Duration,
    /// A window closes when the watermark passes its end + grace; later events are `late`.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// A partition with no events for this long advances its watermark on the controller clock.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Events further ahead of the controller clock than this are rejected (`clock_skew`).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// A segment with no events for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub segment_ttl: Duration,
    /// Most segments held per instance; the longest idle is evicted beyond it.
    pub max_segments: usize,
    /// Measurements that keep a quantile sketch (others: count/sum/min/max/mean/rate).
    pub quantile_measurements: Vec<String>,
    /// Relative error bound of the quantile sketch (0 < x ≤ 0.01).
    pub relative_accuracy: f64,
    /// Window groups with sizes of their own (`[windows.groups.slow] size = "5m"`); a policy
    /// picks one with `window = "slow"`. Watermarks, lateness and limits are shared.
    pub groups: BTreeMap<String, WindowGroup>,
}

/// A window group's geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowGroup {
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    #[serde(with = "humantime_serde", default)]
    pub hop: Option<Duration>,
}

impl WindowConfig {
    /// Each thread's share of `max_segments` with the work split `threads` ways (at least one).
    pub fn max_segments_per_thread(&self, threads: usize) -> usize {
        self.max_segments.div_ceil(threads.max(1)).max(1)
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            size: Duration::from_secs(10),
            hop: None,
            out_of_orderness: Duration::from_secs(2),
            grace: Duration::ZERO,
            idle_timeout: Duration::from_secs(30),
            max_clock_skew: Duration::from_secs(300),
            segment_ttl: Duration::from_secs(900),
            max_segments: 1_000_000,
            quantile_measurements: vec!["latency_ms".into()],
            relative_accuracy: 0.01,
            groups: BTreeMap::new(),
        }
    }
}

/// Delivery guarantee of the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub mode: DeliveryMode,
    /// How often offsets are committed (and, exactly-once, transactions committed).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Graceful shutdown deadline after SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Most time the controller state of one assignment may take to restore from the
    /// changelog, all its partitions together; a partition not restored by then starts from
    /// its windows alone (logged, `segloop_state_restore_failures_total`).
    #[serde(with = "humantime_serde")]
    pub restore_timeout: Duration,
    /// At startup, outcomes are read from this far back (acknowledgements that arrived while
    /// this instance was down are applied after its state is restored).
    #[serde(with = "humantime_serde")]
    pub outcome_lookback: Duration,
    /// Exactly-once: the producer's `transactional.id`, one per instance, stable across its
    /// restarts (so a restart fences its predecessor). Default: `<group_id>-<host>-<admin
    /// port>`, unique among running instances; a second live instance with the same id is
    /// refused at startup (`runtime::instances`).
    pub transactional_id: Option<String>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: DeliveryMode::AtLeastOnce,
            commit_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(10),
            restore_timeout: Duration::from_secs(120),
            outcome_lookback: Duration::from_secs(15 * 60),
            transactional_id: None,
        }
    }
}

/// Metrics and admin HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address; loopback by default. Port 0 picks a free port. Beyond loopback a token
    /// is required.
    pub listen: String,
    /// The bearer token the mutating endpoints (`POST`/`DELETE /silences`) require, read from
    /// this file (relative to the config file)...
    pub token_file: Option<PathBuf>,
    /// ...or from this environment variable. Never printed.
    pub token_env: Option<String>,
    /// The token, read by `Config::load`.
    #[serde(skip)]
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9464".into(),
            token_file: None,
            token_env: None,
            token: None,
        }
    }
}

/// A secret value: compared and used, never printed (`Debug` shows `[redacted]`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl AdminConfig {
    fn resolve(&mut self, base: &Path, env: &HashMap<String, String>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.into(),
                message,
            })
        };
        self.token = match (&self.token_file, &self.token_env) {
            (Some(_), Some(_)) => {
                fail(
                    "admin.token_env",
                    "give token_file or token_env, not both".into(),
                );
                None
            }
            (Some(p), None) => {
                let p = base.join(p);
                match read_bounded(&p, MAX_SECRET_BYTES) {
                    Ok(s) if !s.trim().is_empty() => Some(Secret(s.trim().to_string())),
                    Ok(_) => {
                        fail("admin.token_file", format!("{} is empty", p.display()));
                        None
                    }
                    Err(e) => {
                        fail(
                            "admin.token_file",
                            format!("cannot read {}: {e}", p.display()),
                        );
                        None
                    }
                }
            }
            (None, Some(var)) => match env.get(var).map(|s| s.trim()) {
                Some(s) if !s.is_empty() => Some(Secret(s.to_string())),
                _ => {
                    fail(
                        "admin.token_env",
                        format!("the environment variable {var} is not set (or empty)"),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        let parsed = self.listen.parse::<std::net::SocketAddr>();
        let localhost_port = self
            .listen
            .strip_prefix("localhost:")
            .and_then(|p| p.parse::<u16>().ok());
        if parsed.is_err() && localhost_port.is_none() {
            fail(
                "admin.listen",
                format!(
                    "{:?} is not an address with a port (0-65535), e.g. \"127.0.0.1:9464\"",
                    self.listen
                ),
            );
        }
        let loopback = parsed.map_or(localhost_port.is_some(), |a| a.ip().is_loopback());
        if !loopback
            && self.token.is_none()
            && self.token_file.is_none()
            && self.token_env.is_none()
        {
            fail(
                "admin.listen",
                format!(
                    "{} is reachable beyond this host: set admin.token_file or admin.token_env \
                     (a bearer token for the mutating endpoints), or listen on 127.0.0.1",
                    self.listen
                ),
            );
        }
        errors
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `segloop=debug,rdkafka=warn`.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}
