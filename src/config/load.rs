//! Loading: files, environment and `--set` merged in that order, then validated; each refusal
//! names the field and the fix.

use super::*;

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

    pub(super) fn resolve_paths(&mut self, base: &Path) {
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
        if self.engine.threads > super::MAX_ENGINE_THREADS {
            err(
                "engine.threads",
                format!(
                    "{} is more than {}; use one per CPU core (0 does that)",
                    self.engine.threads,
                    super::MAX_ENGINE_THREADS
                ),
            );
        }
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

pub(super) fn file_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
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
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Splits `a.b."c.d"` into `["a", "b", "c.d"]` (quotes keep dotted librdkafka keys whole).
pub(super) fn split_key_path(key: &str) -> Vec<String> {
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
pub(super) fn parse_scalar(value: &str) -> toml::Value {
    match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed table should have v"),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

pub(super) fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
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
