//! Connecting: what this build of librdkafka can do, the first connection's diagnosis (with a
//! hint per failure), and configuration errors no retry fixes.

use super::*;

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
    pub(super) errors: std::sync::Mutex<Vec<(Option<RDKafkaErrorCode>, String)>>,
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
pub(super) fn hint(code: Option<RDKafkaErrorCode>, reason: &str) -> &'static str {
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
