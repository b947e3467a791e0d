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
    pub delivery: DeliveryConfig,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    pub actuator: ActuatorConfig,
    pub schema_registry: SchemaRegistryConfig,
}

/// A Confluent-compatible Schema Registry (Confluent, Apicurio's `/apis/ccompat/v7`, Karapace,
/// Redpanda). With a `url`, the `avro-confluent` codec reads the writer schema of every id it
/// has not seen from the registry (once per id), and segloop registers the schemas of the
/// topics it writes under their TopicNameStrategy subjects (`<topic>-value`) at startup.
/// Without one, ids come from `topics.<role>.schema_id` and `schema_ids`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// Base URL, e.g. `https://registry:8081` or `http://apicurio:8080/apis/ccompat/v7`.
    pub url: Option<String>,
    /// HTTP basic auth (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    /// The password, or `{ env = "VAR" }` / `{ file = "path" }`. Never printed.
    pub password: Option<toml::Value>,
    /// PEM file of the CA(s) that signed the registry's certificate (default: the system's).
    pub ca_location: Option<PathBuf>,
    /// PEM client certificate and its PKCS#8 key, for a registry that requires mutual TLS.
    pub certificate_location: Option<PathBuf>,
    pub key_location: Option<PathBuf>,
    /// One request's time limit (connect, send, answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long records of an id the registry has not answered for may wait (their partition
    /// paused, `/readyz` false) before `segloop run` stops with the cause.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// `password` with its reference read (filled by `Config::load`).
    #[serde(skip)]
    resolved_password: Option<Secret>,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        SchemaRegistryConfig {
            url: None,
            username: None,
            password: None,
            ca_location: None,
            certificate_location: None,
            key_location: None,
            timeout: Duration::from_secs(5),
            max_wait: Duration::from_secs(60),
            resolved_password: None,
        }
    }
}

impl fmt::Debug for SchemaRegistryConfig {
    /// The password prints as `[redacted]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaRegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("ca_location", &self.ca_location)
            .field("certificate_location", &self.certificate_location)
            .field("key_location", &self.key_location)
            .field("timeout", &self.timeout)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

impl SchemaRegistryConfig {
    /// The basic-auth password, its reference read.
    pub fn password(&self) -> Option<&Secret> {
        self.resolved_password.as_ref()
    }

    fn resolve(&mut self, base: &Path, env: &HashMap<String, String>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.resolved_password = None;
        if let Some(v) = &self.password {
            match property_value("password", v, base, env) {
                Ok(s) => self.resolved_password = Some(Secret(s)),
                Err(message) => errors.push(FieldError {
                    field: "schema_registry.password".into(),
                    message,
                }),
            }
        }
        errors
    }

    fn validate(&self, err: &mut impl FnMut(&str, String)) {
        let Some(url) = &self.url else {
            for (field, set) in [
                ("username", self.username.is_some()),
                ("ca_location", self.ca_location.is_some()),
                ("certificate_location", self.certificate_location.is_some()),
            ] {
                if set {
                    err(
                        &format!("schema_registry.{field}"),
                        "is set but schema_registry.url is not; set the registry's URL".into(),
                    );
                }
            }
            return;
        };
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            err(
                "schema_registry.url",
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
        if !https && (self.ca_location.is_some() || self.certificate_location.is_some()) {
            err(
                "schema_registry.url",
                format!("{url} is not https:// but TLS files are set; use https://"),
            );
        }
        if self.certificate_location.is_some() != self.key_location.is_some() {
            err(
                "schema_registry.key_location",
                "certificate_location and key_location go together (mutual TLS)".into(),
            );
        }
        if self.password.is_some() && self.username.is_none() {
            err(
                "schema_registry.username",
                "a password is set without a username".into(),
            );
        }
        for (field, path) in [
            ("ca_location", &self.ca_location),
            ("certificate_location", &self.certificate_location),
            ("key_location", &self.key_location),
        ] {
            if let Some(p) = path {
                if let Err(e) = std::fs::metadata(p) {
                    err(
                        &format!("schema_registry.{field}"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                }
            }
        }
        if self.timeout < Duration::from_millis(100) {
            err(
                "schema_registry.timeout",
                "must be at least 100ms, e.g. \"5s\"".into(),
            );
        }
        if self.max_wait < self.timeout {
            err(
                "schema_registry.max_wait",
                format!(
                    "{} is shorter than schema_registry.timeout {}: not one request could be \
                     waited for; raise it",
                    humantime::format_duration(self.max_wait),
                    humantime::format_duration(self.timeout)
                ),
            );
        }
    }
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
    /// Exactly-once: the producer's `transactional.id` (stable per instance, so a restart
    /// fences its predecessor). Default: `<group_id>-<client_id>`.
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

/// Why a configuration was refused. Each variant says where and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    File {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Override { origin: String, message: String },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// A value that is well-formed but not acceptable, with the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Where a configuration comes from, lowest precedence first after the built-in defaults.
pub struct Sources<'a> {
    pub file: Option<&'a Path>,
    /// The process environment (or a test's): `SEGLOOP__*` keys override settings, and
    /// `{ env = "VAR" }` secrets are read from it.
    pub env: &'a HashMap<String, String>,
    /// `key.path=value` overrides from the command line.
    pub overrides: &'a [String],
}

impl Config {
    /// Loads, layers, resolves paths and validates.
    ///
    /// # Errors
    /// Unreadable file, syntax or unknown keys (with file, line and column), a bad override
    /// (naming the variable or flag), or failed cross-field checks (naming the field).
    pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
        let mut table = toml::Table::new();
        let mut base_dir = PathBuf::from(".");
        if let Some(path) = sources.file {
            let text = read_bounded(path, MAX_FILE_BYTES).map_err(|source| ConfigError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            // Deserialize straight from the text first: its errors carry spans.
            toml::from_str::<Config>(&text).map_err(|e| file_error(path, &text, &e))?;
            table =
                toml::from_str::<toml::Table>(&text).map_err(|e| file_error(path, &text, &e))?;
            if let Some(dir) = path.parent() {
                base_dir = dir.to_path_buf();
            }
        }

        let mut layers: Vec<(String, Vec<String>, String)> = Vec::new();
        let mut env: Vec<(&String, &String)> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (key, value) in env {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            layers.push((format!("environment variable {key}"), path, value.clone()));
        }
        for flag in sources.overrides {
            let (key, value) = flag.split_once('=').ok_or_else(|| ConfigError::Override {
                origin: format!("--set {flag}"),
                message: "expected key.path=value, e.g. --set windows.size=5s".into(),
            })?;
            let shown = if is_secret_key(key.trim().trim_matches('"')) {
                format!("--set {}={REDACTED}", key.trim())
            } else {
                format!("--set {flag}")
            };
            layers.push((shown, split_key_path(key.trim()), value.to_string()));
        }

        let mut config: Config =
            toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Override {
                    origin: "config".into(),
                    message: e.message().to_string(),
                })?;
        for (origin, path, value) in layers {
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Override {
                    origin,
                    message: "empty key segment".into(),
                });
            }
            // A literal that parses as TOML (`5`, `true`) is tried as such first, then as a
            // string, so `SEGLOOP__KAFKA__GROUP_ID=123` still sets a string field.
            let typed = parse_scalar(&value);
            set_path(&mut table, &path, typed.clone());
            let mut result: Result<Config, toml::de::Error> =
                toml::Value::Table(table.clone()).try_into();
            if result.is_err() && !typed.is_str() {
                set_path(&mut table, &path, toml::Value::String(value.clone()));
                let as_string: Result<Config, toml::de::Error> =
                    toml::Value::Table(table.clone()).try_into();
                if as_string.is_ok() {
                    result = as_string;
                } else {
                    set_path(&mut table, &path, typed);
                }
            }
            config = result.map_err(|e| ConfigError::Override {
                origin: origin.clone(),
                message: format!("{} (setting {})", e.message().trim(), path.join(".")),
            })?;
        }

        let defaults = TopicsConfig::default();
        for (topic, (_, default)) in config.topics.all_mut().into_iter().zip(defaults.all()) {
            if topic.name == UNSET_TOPIC_NAME {
                topic.name = default.name.clone();
            }
        }
        config.resolve_paths(&base_dir);
        let mut errors = config.kafka.resolve(&base_dir, sources.env);
        errors.extend(config.admin.resolve(&base_dir, sources.env));
        errors.extend(config.schema_registry.resolve(&base_dir, sources.env));
        if let Err(more) = config.validate() {
            errors.extend(more);
        }
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(config)
    }

    /// Settings a Schema Registry makes unused or a registry that is set but unused: what
    /// `check-config` and `segloop run` warn about (nothing is silently ignored).
    pub fn registry_warnings(&self) -> Vec<String> {
        let Some(url) = &self.schema_registry.url else {
            return Vec::new();
        };
        let confluent: Vec<(&str, &TopicConfig)> = self
            .topics
            .all()
            .into_iter()
            .filter(|(_, t)| t.codec == CodecKind::AvroConfluent)
            .collect();
        if confluent.is_empty() {
            return vec![format!(
                "schema_registry.url is set ({url}) but no topic uses the avro-confluent codec: \
                 the registry is not used"
            )];
        }
        confluent
            .into_iter()
            .filter(|(_, t)| t.schema_id != default_schema_id())
            .map(|(role, t)| {
                format!(
                    "topics.{role}.schema_id = {} is not used with a schema registry: ids come \
                     from the registry (segloop writes with the id it registers under \
                     {}-value)",
                    t.schema_id, t.name
                )
            })
            .collect()
    }

    /// A topic's codec settings. With a Schema Registry no id is presumed to be the current
    /// schema (`schema_id` is not used): the registry says what each id is, and the id segloop
    /// writes with is the one it registers at startup. `schema_ids` still map ids to files.
    pub fn schema_settings(&self, topic: &TopicConfig) -> SchemaSettings {
        let mut s = topic.schema_settings();
        if self.schema_registry.url.is_some() {
            s.schema_id = None;
        }
        s
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.policies.as_mut() {
            resolve(p);
        }
        let r = &mut self.schema_registry;
        for p in [
            &mut r.ca_location,
            &mut r.certificate_location,
            &mut r.key_location,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        for topic in self.topics.all_mut() {
            topic.schema_ids.values_mut().for_each(resolve);
            topic.writer_schemas.iter_mut().for_each(resolve);
            if let Some(p) = topic.raw_writer_schema.as_mut() {
                resolve(p);
            }
        }
    }

    /// Cross-field checks. Returns every problem, each with the field and the fix.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        /// `<prefix>.hop` must be whole milliseconds and divide `<prefix>.size`.
        fn check_hop(
            err: &mut impl FnMut(&str, String),
            prefix: &str,
            size: Duration,
            hop: Option<Duration>,
        ) {
            let Some(hop) = hop else { return };
            if hop.is_zero() || hop.subsec_nanos() % 1_000_000 != 0 {
                err(
                    &format!("{prefix}.hop"),
                    "must be a whole number of milliseconds above 0".into(),
                );
            } else if hop > size || size.as_millis() % hop.as_millis() != 0 {
                err(
                    &format!("{prefix}.hop"),
                    format!(
                        "{} does not divide {prefix}.size {}; choose a hop such as {}",
                        humantime::format_duration(hop),
                        humantime::format_duration(size),
                        humantime::format_duration(size / 2)
                    ),
                );
            }
        }
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.into(),
                message,
            })
        };
        let w = &self.windows;
        if w.size < Duration::from_millis(1) {
            err("windows.size", "must be at least 1ms, e.g. \"10s\"".into());
        } else if w.size.subsec_nanos() % 1_000_000 != 0 {
            err(
                "windows.size",
                "must be a whole number of milliseconds".into(),
            );
        }
        check_hop(&mut err, "windows", w.size, w.hop);
        for (name, g) in &w.groups {
            let prefix = format!("windows.groups.{name}");
            if g.size.is_zero() || g.size.subsec_nanos() % 1_000_000 != 0 {
                err(
                    &format!("{prefix}.size"),
                    "must be a whole number of milliseconds above 0".into(),
                );
            } else {
                check_hop(&mut err, &prefix, g.size, g.hop);
            }
        }
        if w.idle_timeout.is_zero() {
            err(
                "windows.idle_timeout",
                "must be above 0, or quiet segments never close their windows".into(),
            );
        }
        if w.max_clock_skew.is_zero() {
            err(
                "windows.max_clock_skew",
                "must be above 0, e.g. \"5m\"".into(),
            );
        }
        if w.segment_ttl < w.size + w.out_of_orderness + w.grace {
            err(
                "windows.segment_ttl",
                format!(
                    "{} is shorter than a window's life (size + out_of_orderness + grace = {}); \
                     raise it",
                    humantime::format_duration(w.segment_ttl),
                    humantime::format_duration(w.size + w.out_of_orderness + w.grace)
                ),
            );
        }
        if w.max_segments == 0 {
            err("windows.max_segments", "must be at least 1".into());
        }
        if !(w.relative_accuracy > 0.0 && w.relative_accuracy <= 0.01) {
            err(
                "windows.relative_accuracy",
                format!(
                    "{} is outside (0, 0.01]; use 0.01 for 1% relative error",
                    w.relative_accuracy
                ),
            );
        }
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            err(
                "kafka.bootstrap_servers",
                "is empty; set host:port of a broker".into(),
            );
        }
        if k.group_id.trim().is_empty() {
            err("kafka.group_id", "is empty; name the consumer group".into());
        }
        if k.partitions < 1 {
            err("kafka.partitions", "must be at least 1".into());
        }
        if k.replication_factor < 1 {
            err("kafka.replication_factor", "must be at least 1".into());
        }
        for (key, value) in &k.properties {
            if matches!(value, toml::Value::Array(_)) {
                err(
                    &format!("kafka.properties.{key}"),
                    "librdkafka properties are scalars; quote the value".into(),
                );
            }
        }
        if k.connect_timeout < Duration::from_secs(1) {
            err(
                "kafka.connect_timeout",
                "must be at least 1s (a TLS handshake and SASL exchange take a few round trips)"
                    .into(),
            );
        }
        if !CODECS.contains(&k.compression.as_str()) {
            err(
                "kafka.compression",
                format!(
                    "{:?} is not a codec; use one of {}",
                    k.compression,
                    CODECS.join(", ")
                ),
            );
        }
        if k.topic_compression != "producer" && !CODECS.contains(&k.topic_compression.as_str()) {
            err(
                "kafka.topic_compression",
                format!(
                    "{:?} is not a codec; use producer or one of {}",
                    k.topic_compression,
                    CODECS.join(", ")
                ),
            );
        }
        for (role, topic) in self.topics.all() {
            if topic.name.trim().is_empty() {
                err(&format!("topics.{role}.name"), "is empty".into());
            }
            if topic.codec == CodecKind::Json && role != "telemetry" {
                err(
                    &format!("topics.{role}.codec"),
                    "json is for telemetry only; use avro-single-object".into(),
                );
            }
            for id in topic.schema_ids.keys() {
                match id.parse::<u32>() {
                    Ok(n) if n == topic.schema_id => err(
                        &format!("topics.{role}.schema_ids.{id}"),
                        "is also topics.{role}.schema_id, the id segloop writes with; use \
                         another id"
                            .replace("{role}", role),
                    ),
                    Ok(_) => {}
                    Err(_) => err(
                        &format!("topics.{role}.schema_ids.{id}"),
                        "keys are numeric schema ids, e.g. \"7\" = \"schemas/v1.avsc\"".into(),
                    ),
                }
            }
        }
        if self.topics.telemetry.name == self.topics.state.name {
            err(
                "topics.state.name",
                "must differ from topics.telemetry.name".into(),
            );
        }
        if let Some(url) = &self.actuator.webhook {
            if !url.starts_with("http://") {
                err(
                    "actuator.webhook",
                    format!("{url} is not an http:// URL (TLS endpoints need a proxy)"),
                );
            }
        }
        if self.actuator.timeout.is_zero() {
            err("actuator.timeout", "must be above 0".into());
        }
        if self.delivery.restore_timeout.is_zero() {
            err(
                "delivery.restore_timeout",
                "must be above 0 (e.g. \"2m\"): the time a rebalance may spend restoring controller state".into(),
            );
        }
        if self.delivery.commit_interval.is_zero() {
            err("delivery.commit_interval", "must be above 0".into());
        }
        self.schema_registry.validate(&mut err);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The effective configuration as TOML (what `check-config` prints), secrets redacted:
    /// a secret written in the file prints as `[redacted]`, a reference (`{ env = .. }`) as
    /// itself.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for (k, v) in shown.kafka.properties.iter_mut() {
            if is_secret_key(k) && !matches!(v, toml::Value::Table(_)) {
                *v = toml::Value::String(REDACTED.into());
            }
        }
        if let Some(p) = shown.schema_registry.password.as_mut() {
            if !matches!(p, toml::Value::Table(_)) {
                *p = toml::Value::String(REDACTED.into());
            }
        }
        toml::to_string_pretty(&shown).expect("config should serialize to TOML")
    }
}

fn file_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => line_col(text, span.start),
        None => (1, 1),
    };
    ConfigError::File {
        path: path.to_path_buf(),
        line,
        column,
        message: e.message().trim().to_string(),
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Splits `a.b."c.d"` into `["a", "b", "c.d"]` (quotes keep dotted librdkafka keys whole).
fn split_key_path(key: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in key.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    out
}

/// An override value: a TOML literal when it parses as one (`5`, `true`, `[1, 2]`), else a string.
fn parse_scalar(value: &str) -> toml::Value {
    match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed table should have v"),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("path should not be empty");
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("entry should be a table");
    }
    cur.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }

    #[test]
    fn key_paths_keep_quoted_dots() {
        assert_eq!(
            split_key_path("kafka.properties.\"session.timeout.ms\""),
            ["kafka", "properties", "session.timeout.ms"]
        );
        assert_eq!(split_key_path("windows.size"), ["windows", "size"]);
    }

    #[test]
    fn scalars_parse_as_toml_or_string() {
        assert_eq!(parse_scalar("5"), toml::Value::Integer(5));
        assert_eq!(parse_scalar("true"), toml::Value::Boolean(true));
        assert_eq!(parse_scalar("5s"), toml::Value::String("5s".into()));
        assert_eq!(
            parse_scalar("127.0.0.1:9092"),
            toml::Value::String("127.0.0.1:9092".into())
        );
    }
}
