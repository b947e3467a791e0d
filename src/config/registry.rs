//! `[schema_registry]`: where segloop reads and registers schemas, and how it authenticates.

use super::*;

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
    pub(super) resolved_password: Option<Secret>,
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

    pub(super) fn resolve(
        &mut self,
        base: &Path,
        env: &HashMap<String, String>,
    ) -> Vec<FieldError> {
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

    pub(super) fn validate(&self, err: &mut impl FnMut(&str, String)) {
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
