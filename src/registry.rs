//! The Schema Registry client: the Confluent REST API, which Confluent's registry, Apicurio's
//! `/apis/ccompat/v7`, Karapace and Redpanda all speak.
//!
//! Two uses, both of the `avro-confluent` framing:
//! - **Reading**: the writer schema of an id a codec has not seen, `GET /schemas/ids/{id}`,
//!   asked once per id and kept ([`Resolver`], the engine's [`SchemaSource`]). Live, a
//!   [`Resolver::background`] fetches on a thread of its own and retries an unreachable
//!   registry until it answers; the runtime pauses the waiting partitions meanwhile (see
//!   `runtime::schema_wait`). A replay uses [`Resolver::blocking`]: one request, and an
//!   error fails the replay.
//! - **Writing**: segloop registers the schema of each topic it writes under the subject
//!   `<topic>-value` (TopicNameStrategy) and writes with the id the registry gives
//!   ([`Registry::register`]); a registry whose compatibility rule refuses it stops startup.
//!
//! A driver module: the engine never does HTTP, it asks through [`SchemaSource`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::codec::{SchemaLookup, SchemaSource};
use crate::config::SchemaRegistryConfig;

/// The media type of the Confluent API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Most bytes of one answer read (a schema is a few KiB; a misdirected URL must not fill the
/// memory).
const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// Most ids kept that the registry said do not exist (beyond it they are asked again): bounds
/// the memory a stream of garbage ids can take.
const MAX_MISSING_KEPT: usize = 65_536;

/// Why the registry could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// No answer, an answer that is not the API's, a server error, or refused credentials:
    /// worth asking again later.
    #[error("schema registry {url}: {reason}")]
    Unavailable { url: String, reason: String },
    /// The subject's compatibility rule refuses the schema (HTTP 409).
    #[error(
        "the schema registry refuses segloop's {kind} schema under subject {subject}: {message}. \
         The subject's compatibility rule (GET /config/{subject}) rejects it against the \
         versions already registered: register a compatible version, change the rule, or \
         write to another topic"
    )]
    Incompatible {
        kind: &'static str,
        subject: String,
        message: String,
    },
    /// The registry refuses the schema itself (HTTP 422, or another 4xx).
    #[error(
        "the schema registry refuses segloop's {kind} schema under subject {subject}: {message}"
    )]
    Refused {
        kind: &'static str,
        subject: String,
        message: String,
    },
}

/// What the registry says an id is.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// The schema text (Avro JSON).
    Found(Arc<str>),
    /// No such id, or not an Avro schema: the reason.
    Missing(String),
}

/// A client of one registry.
pub struct Registry {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("url", &self.base).finish()
    }
}

impl Registry {
    /// The client the config describes; `None` without `schema_registry.url`.
    ///
    /// # Errors
    /// TLS files that cannot be read or parsed (naming the field).
    pub fn from_config(config: &SchemaRegistryConfig) -> Result<Option<Registry>, String> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let mut tls = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::NativeTls);
        tls = match &config.ca_location {
            Some(path) => {
                let certs = read_certificates(path, "schema_registry.ca_location")?;
                if certs.is_empty() {
                    return Err(format!(
                        "schema_registry.ca_location: {} holds no PEM certificate",
                        path.display()
                    ));
                }
                tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            }
            None => tls.root_certs(ureq::tls::RootCerts::PlatformVerifier),
        };
        if let (Some(cert), Some(key)) = (&config.certificate_location, &config.key_location) {
            let chain = read_certificates(cert, "schema_registry.certificate_location")?;
            let key_pem = read_pem(key, "schema_registry.key_location")?;
            let key = ureq::tls::PrivateKey::from_pem(&key_pem).map_err(|e| {
                format!("schema_registry.key_location: {e} (a PKCS#8 PEM key is expected)")
            })?;
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .into();
        let auth = config.username.as_ref().map(|user| {
            use base64::Engine;
            let password = config.password().map_or("", |p| p.expose());
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        Ok(Some(Registry {
            base: url.trim_end_matches('/').to_string(),
            agent,
            auth,
        }))
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// `GET /schemas/ids/{id}`: the writer schema of an id.
    ///
    /// # Errors
    /// [`RegistryError::Unavailable`] when the registry gave no usable answer.
    pub fn schema(&self, id: u32) -> Result<Fetched, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let mut request = self.agent.get(&url).header("Accept", CONTENT_TYPE);
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        let answer = request
            .call()
            .map_err(|e| self.unavailable(e.to_string()))?;
        let (status, body) = read_answer(answer).map_err(|e| self.unavailable(e))?;
        match status {
            200 => {
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Answer {
                    schema: String,
                    #[serde(default)]
                    schema_type: Option<String>,
                }
                let a: Answer = serde_json::from_str(&body).map_err(|e| {
                    self.unavailable(format!(
                        "GET /schemas/ids/{id} answered with something else than a schema ({e}); \
                         is schema_registry.url the registry's base URL?"
                    ))
                })?;
                match a.schema_type.as_deref() {
                    None | Some("AVRO") => Ok(Fetched::Found(a.schema.into())),
                    Some(other) => Ok(Fetched::Missing(format!(
                        "schema id {id} is a {other} schema; segloop reads Avro"
                    ))),
                }
            }
            404 => Ok(Fetched::Missing(format!(
                "schema id {id} is not in the registry at {}",
                self.base
            ))),
            401 | 403 => Err(self.unavailable(format!(
                "HTTP {status}: the registry refuses the credentials; check \
                 schema_registry.username and password"
            ))),
            s => Err(self.unavailable(format!("HTTP {s}: {}", excerpt(&body)))),
        }
    }

    /// `POST /subjects/{subject}/versions`: registers `schema` (or finds it registered) and
    /// returns its id.
    ///
    /// # Errors
    /// Unavailable, or refused by the subject's compatibility rule (409) or as invalid.
    pub fn register(
        &self,
        kind: &'static str,
        subject: &str,
        schema: &str,
    ) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let body = serde_json::json!({ "schema": schema }).to_string();
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", CONTENT_TYPE)
            .header("Accept", CONTENT_TYPE);
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        let answer = request
            .send(body.as_bytes())
            .map_err(|e| self.unavailable(e.to_string()))?;
        let (status, text) = read_answer(answer).map_err(|e| self.unavailable(e))?;
        let message = || {
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(str::to_string))
                .unwrap_or_else(|| excerpt(&text))
        };
        match status {
            200 => {
                #[derive(serde::Deserialize)]
                struct Answer {
                    id: u32,
                }
                serde_json::from_str::<Answer>(&text)
                    .map(|a| a.id)
                    .map_err(|e| {
                        self.unavailable(format!(
                            "POST /subjects/{subject}/versions answered without an id ({e})"
                        ))
                    })
            }
            409 => Err(RegistryError::Incompatible {
                kind,
                subject: subject.into(),
                message: message(),
            }),
            401 | 403 => Err(self.unavailable(format!(
                "HTTP {status}: the registry refuses the credentials; check \
                 schema_registry.username and password"
            ))),
            s if (400..500).contains(&s) => Err(RegistryError::Refused {
                kind,
                subject: subject.into(),
                message: format!("HTTP {s}: {}", message()),
            }),
            s => Err(self.unavailable(format!("HTTP {s}: {}", message()))),
        }
    }

    /// [`Registry::register`], asking again while the registry is unavailable, for at most
    /// `max_wait`.
    ///
    /// # Errors
    /// As `register`; unavailable for longer than `max_wait`.
    pub fn register_within(
        &self,
        kind: &'static str,
        subject: &str,
        schema: &str,
        max_wait: Duration,
    ) -> Result<u32, RegistryError> {
        let deadline = Instant::now() + max_wait;
        let mut pause = Duration::from_millis(250);
        loop {
            match self.register(kind, subject, schema) {
                Err(RegistryError::Unavailable { url, reason }) if Instant::now() < deadline => {
                    tracing::warn!(%url, %reason, subject, "schema registry unavailable; asking again");
                    std::thread::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_secs(4));
                }
                Err(RegistryError::Unavailable { url, reason }) => {
                    return Err(RegistryError::Unavailable {
                        url,
                        reason: format!(
                            "{reason} (for longer than schema_registry.max_wait {})",
                            humantime::format_duration(max_wait)
                        ),
                    })
                }
                other => return other,
            }
        }
    }

    fn unavailable(&self, reason: String) -> RegistryError {
        RegistryError::Unavailable {
            url: self.base.clone(),
            reason,
        }
    }
}

fn read_pem(path: &std::path::Path, field: &str) -> Result<Vec<u8>, String> {
    crate::config::read_bounded(path, crate::config::MAX_SECRET_BYTES)
        .map(String::into_bytes)
        .map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

/// The PEM certificates of a file (other PEM items are skipped).
fn read_certificates(
    path: &std::path::Path,
    field: &str,
) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem = read_pem(path, field)?;
    ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field}: {e}"))
}

fn read_answer(mut answer: ureq::http::Response<ureq::Body>) -> Result<(u16, String), String> {
    let status = answer.status().as_u16();
    let body = answer
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()
        .map_err(|e| format!("HTTP {status}, and its body cannot be read: {e}"))?;
    Ok((status, body))
}

/// The start of an answer body, for an error message.
fn excerpt(body: &str) -> String {
    let t = body.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

/// Ids already answered, shared by a [`Resolver`]'s handles and its fetch threads.
#[derive(Default)]
struct Known {
    answers: HashMap<u32, Fetched>,
    fetching: HashSet<u32>,
    missing: usize,
    /// The last reason the registry could not answer, with the id asked.
    last_error: Option<(u32, String)>,
    requests: u64,
}

impl Known {
    fn keep(&mut self, id: u32, answer: Fetched) {
        if matches!(answer, Fetched::Missing(_)) {
            if self.missing >= MAX_MISSING_KEPT {
                return;
            }
            self.missing += 1;
        }
        self.answers.insert(id, answer);
    }
}

/// The registry as the engine's [`SchemaSource`]: every id asked once, its answer kept. Clones
/// share what is known (the runtime keeps one to see when a waiting id is answered).
#[derive(Clone)]
pub struct Resolver {
    registry: Arc<Registry>,
    known: Arc<Mutex<Known>>,
    /// `None`: fetches in the background. `Some(d)`: asks then and there, again while the
    /// registry is unavailable for at most `d`.
    blocking: Option<Duration>,
}

impl Resolver {
    /// Live: an id not known is fetched on a thread of its own, asked again (backing off up to
    /// 4 s) until the registry answers; meanwhile lookups say `Waiting`. The thread ends when
    /// every handle is gone.
    pub fn background(registry: Arc<Registry>) -> Self {
        Resolver {
            registry,
            known: Arc::default(),
            blocking: None,
        }
    }

    /// Replays: a lookup asks the registry then and there, once; an unavailable registry is
    /// `Waiting` with the reason (which fails a replay).
    pub fn blocking(registry: Arc<Registry>) -> Self {
        Resolver::patient(registry, Duration::ZERO)
    }

    /// Tools (the reference actuator): like [`Resolver::blocking`], asking again while the
    /// registry is unavailable, for at most `max_wait`.
    pub fn patient(registry: Arc<Registry>, max_wait: Duration) -> Self {
        Resolver {
            registry,
            known: Arc::default(),
            blocking: Some(max_wait),
        }
    }

    pub fn url(&self) -> &str {
        self.registry.url()
    }

    /// Whether the registry has answered for `id` (found or missing).
    pub fn answered(&self, id: u32) -> bool {
        self.lock().answers.contains_key(&id)
    }

    /// The last reason the registry could not answer (and for which id).
    pub fn last_error(&self) -> Option<(u32, String)> {
        self.lock().last_error.clone()
    }

    /// Requests made so far (each id is asked until answered, then never again).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ask(registry: &Registry, known: &Mutex<Known>, id: u32) -> Result<Fetched, String> {
        let result = registry.schema(id);
        let mut k = known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        k.requests += 1;
        match result {
            Ok(answer) => {
                k.keep(id, answer.clone());
                k.fetching.remove(&id);
                if k.last_error.as_ref().is_some_and(|(e, _)| *e == id) {
                    k.last_error = None;
                }
                Ok(answer)
            }
            Err(e) => {
                let reason = e.to_string();
                k.last_error = Some((id, reason.clone()));
                Err(reason)
            }
        }
    }

    fn fetch_in_background(&self, id: u32) {
        let registry = self.registry.clone();
        let known: Weak<Mutex<Known>> = Arc::downgrade(&self.known);
        let spawned = std::thread::Builder::new()
            .name(format!("registry-{id}"))
            .spawn(move || {
                let mut pause = Duration::from_millis(100);
                while let Some(k) = known.upgrade() {
                    match Resolver::ask(&registry, &k, id) {
                        Ok(_) => return,
                        Err(reason) => {
                            tracing::warn!(schema_id = id, %reason, "schema registry unavailable; asking again");
                        }
                    }
                    drop(k);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(4));
                }
            });
        if let Err(e) = spawned {
            let mut k = self.lock();
            k.fetching.remove(&id);
            k.last_error = Some((id, format!("cannot start a fetch thread: {e}")));
        }
    }
}

fn lookup_of(answer: &Fetched) -> SchemaLookup {
    match answer {
        Fetched::Found(s) => SchemaLookup::Found(s.clone()),
        Fetched::Missing(why) => SchemaLookup::Missing(why.clone()),
    }
}

impl SchemaSource for Resolver {
    fn lookup(&mut self, id: u32) -> SchemaLookup {
        if let Some(max_wait) = self.blocking {
            if let Some(a) = self.lock().answers.get(&id) {
                return lookup_of(a);
            }
            let deadline = Instant::now() + max_wait;
            let mut pause = Duration::from_millis(100);
            loop {
                match Resolver::ask(&self.registry, &self.known, id) {
                    Ok(a) => return lookup_of(&a),
                    Err(reason) if Instant::now() >= deadline => {
                        return SchemaLookup::Waiting(reason)
                    }
                    Err(reason) => {
                        tracing::warn!(schema_id = id, %reason, "schema registry unavailable; asking again");
                        std::thread::sleep(
                            pause.min(deadline.saturating_duration_since(Instant::now())),
                        );
                        pause = (pause * 2).min(Duration::from_secs(4));
                    }
                }
            }
        }
        let mut k = self.lock();
        if let Some(a) = k.answers.get(&id) {
            return lookup_of(a);
        }
        let why = match &k.last_error {
            Some((e, reason)) if *e == id => reason.clone(),
            _ => format!("asking the registry at {} for it", self.registry.url()),
        };
        if k.fetching.insert(id) {
            drop(k);
            self.fetch_in_background(id);
        }
        SchemaLookup::Waiting(why)
    }
}

/// The codec settings of `topic` for writing under the topic name `name`: with a registry and
/// the `avro-confluent` codec, segloop's current `kind` schema registered (or found) under the
/// subject `<name>-value` (TopicNameStrategy) and written with the id the registry gives.
/// Without a registry, or with another codec, the configured settings. `registry` is the
/// config's client ([`Registry::from_config`]), built once by the caller.
///
/// # Errors
/// The registry refuses the schema (its compatibility rule, naming the subject), or does not
/// answer within `schema_registry.max_wait`.
pub fn writer_settings(
    config: &crate::config::Config,
    registry: Option<&Registry>,
    topic: &crate::config::TopicConfig,
    name: &str,
    kind: crate::schema::SchemaKind,
) -> anyhow::Result<crate::codec::SchemaSettings> {
    let mut settings = config.schema_settings(topic);
    let Some(registry) = registry.filter(|_| topic.codec == crate::codec::CodecKind::AvroConfluent)
    else {
        return Ok(settings);
    };
    let subject = format!("{name}-value");
    let id = registry.register_within(
        kind.name(),
        &subject,
        kind.source(),
        config.schema_registry.max_wait,
    )?;
    tracing::info!(
        subject,
        schema_id = id,
        url = registry.url(),
        "schema registered"
    );
    settings.schema_id = Some(id);
    Ok(settings)
}

/// The registry of the config as a [`Resolver::blocking`], if one is set.
///
/// # Errors
/// Unreadable TLS files.
pub fn blocking_resolver(config: &crate::config::Config) -> anyhow::Result<Option<Resolver>> {
    Ok(Registry::from_config(&config.schema_registry)
        .map_err(anyhow::Error::msg)?
        .map(|r| Resolver::blocking(Arc::new(r))))
}
