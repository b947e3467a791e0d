//! The admin endpoint (loopback by default): `/metrics`, `/healthz`, `/readyz`,
//! `GET /segments/{id}`, `GET /actions`, `GET|POST /silences`, `DELETE /silences/{id}`.
//!
//! One thread runs a single-threaded tokio runtime with hyper's HTTP/1 server: a slow or idle
//! client costs a task, not a thread, and never holds up `/healthz` or `/metrics`. Every
//! limit is enforced before anything is allocated on a client's word (see the constants); a
//! handler that panics answers 500 and the server keeps serving. The server never takes the
//! engine's lock: per-segment state comes from the pipeline's [`ReadModel`], health from the
//! [`Heartbeat`] and [`Status`], and silences are written to the control topic through a
//! [`SilencePublisher`] on the blocking pool. `POST` and `DELETE` require the bearer token of
//! `admin.token_file`/`admin.token_env`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Heartbeat, SilencePublisher, SilenceRecord, Status};
use crate::clock::{Clock, SystemClock};
use crate::config::Secret;
use crate::metrics::Metrics;
use crate::pipeline::ReadModel;

/// Most lag (records per partition) at which `/readyz` calls the instance caught up.
pub const READY_MAX_LAG: i64 = 1_000;
/// Connections served at once; past it, the oldest connection is closed for the new one (an
/// idle flood cannot lock probes out).
pub const MAX_CONNECTIONS: usize = 256;
/// Request line and headers, together (hyper's read buffer; a longer head gets 431).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers per request.
pub const MAX_HEADERS: usize = 64;
/// A request body (`POST /silences`); a longer one gets 413, unread.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Time to send a request's head (also the idle time allowed between requests).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Longest silence.
pub const MAX_SILENCE: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long `GET /segments/{id}` waits for the pipeline to snapshot a segment's open windows.
const WINDOWS_WAIT: Duration = Duration::from_secs(1);
/// How long the loop may go without a turn before `/healthz` says it stalled.
const STALLED_AFTER: Duration = Duration::from_secs(10);

/// What the admin server reads and writes.
pub struct Shared {
    pub read: Arc<ReadModel>,
    pub status: Arc<Mutex<Status>>,
    pub heartbeat: Arc<Heartbeat>,
    pub silences: SilencePublisher,
    pub metrics: Metrics,
    /// The bearer token of the mutating endpoints (`None`: they are refused).
    pub token: Option<Secret>,
}

/// A running admin server.
pub struct Admin {
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `listen` and serves until [`Admin::stop`].
    ///
    /// # Errors
    /// The address cannot be bound, or the server thread cannot start.
    pub fn start(listen: &str, shared: Shared) -> anyhow::Result<Admin> {
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on admin.listen {listen}: {e}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shared = Arc::new(shared);
        let thread =
            crate::process::spawn_async("segloop-admin", move || serve(listener, shared, stopped))?;
        Ok(Admin {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin server: cannot use its socket");
            return;
        }
    };
    // Open connections, oldest first: (id, task).
    let open: Arc<Mutex<VecDeque<(u64, tokio::task::AbortHandle)>>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, most likely: let connections end, then go on.
                tracing::warn!(error = %e, "admin server: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        {
            let mut open = open.lock().expect("connections lock");
            while open.len() >= MAX_CONNECTIONS {
                if let Some((_, oldest)) = open.pop_front() {
                    oldest.abort();
                }
            }
        }
        let shared = shared.clone();
        let registry = open.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, shared.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            registry
                .lock()
                .expect("connections lock")
                .retain(|(i, _)| *i != id);
        });
        open.lock()
            .expect("connections lock")
            .push_back((id, task.abort_handle()));
    }
    for (_, task) in open.lock().expect("connections lock").drain(..) {
        task.abort();
    }
}

/// Runs the handler as a task of its own: a panic in it becomes a 500, and the server stays.
async fn respond(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match tokio::spawn(route(req, shared)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "admin handler failed");
            json_response(500, json!({"error": "internal error; see the log"}))
        }
    })
}

fn json_response(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec_pretty(&body).unwrap_or_default(),
        )))
        .expect("a static response")
}

fn error(status: u16, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, json!({"error": message.into()}))
}

/// A path segment, percent-decoded; `None` when the bytes are not UTF-8.
/// What the API parses of a request from outside, for the fuzz targets: a path's segment id
/// and a silence's body (hyper parses the head, within the limits above).
pub fn parse_untrusted(path: &str, body: &[u8]) {
    let _ = decode_segment(path.strip_prefix("/segments/").unwrap_or(path));
    let _ = new_silence(body, 1_800_000_000_000);
}

fn decode_segment(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The refusal of a request without the configured bearer token (`None`: it has it).
fn refusal(req: &Request<Incoming>, token: Option<&Secret>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = token else {
        return Some(error(
            403,
            "changes need an admin token: set admin.token_file or admin.token_env and send it as Authorization: Bearer <token>",
        ));
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), token.expose().as_bytes()) => None,
        Some(_) => Some(error(401, "wrong bearer token")),
        None => Some(error(401, "send Authorization: Bearer <admin token>")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => Response::builder()
            .header("Content-Type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(shared.metrics.render())))
            .expect("a static response"),
        (&Method::GET, "/healthz") => {
            let alive = shared
                .heartbeat
                .age()
                .is_some_and(|age| age < STALLED_AFTER);
            json_response(
                if alive { 200 } else { 503 },
                json!({ "status": if alive { "ok" } else { "stalled" } }),
            )
        }
        (&Method::GET, "/readyz") => {
            let (joined, assigned, lag, errors, schema_waits, restoring) = {
                let s = shared
                    .status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                (
                    s.joined,
                    s.assigned.clone(),
                    s.lag.clone(),
                    s.consume_errors.clone(),
                    s.schema_waits.clone(),
                    s.restoring.clone(),
                )
            };
            let caught_up = assigned
                .iter()
                .all(|p| lag.get(p).is_some_and(|l| *l <= READY_MAX_LAG));
            // A standby (the group has more members than partitions) is ready with none.
            let standby = joined && assigned.is_empty();
            let ready = joined
                && caught_up
                && errors.is_empty()
                && schema_waits.is_empty()
                && restoring.is_none();
            json_response(
                if ready { 200 } else { 503 },
                json!({ "ready": ready, "standby": standby, "assigned": assigned, "lag": lag,
                        "consume_errors": errors, "schema_waits": schema_waits,
                        "restoring": restoring }),
            )
        }
        (&Method::GET, "/actions") => {
            let list: Vec<serde_json::Value> = shared
                .read
                .in_flight()
                .into_iter()
                .map(|(segment, policy, l)| {
                    json!({
                        "segment": segment,
                        "policy": policy,
                        "phase": l.phase.as_str(),
                        "attempt": l.attempt,
                        "command_id": l.command_id,
                        "issued_at_ms": l.issued_at_ms,
                        "deadline_ms": l.deadline_ms,
                    })
                })
                .collect();
            json_response(
                200,
                json!({ "actions": list, "budgets": shared.read.budgets() }),
            )
        }
        (&Method::GET, "/silences") => {
            let list: Vec<serde_json::Value> = shared
                .read
                .silences()
                .into_iter()
                .map(|s| {
                    json!({"id": s.id, "segments": s.segments, "starts_at": rfc3339(s.from_ms),
                           "ends_at": rfc3339(s.until_ms), "from_ms": s.from_ms,
                           "until_ms": s.until_ms, "comment": s.reason,
                           "created_by": s.created_by})
                })
                .collect();
            json_response(200, json!({ "silences": list }))
        }
        (&Method::POST, "/silences") => {
            if let Some(r) = refusal(&req, shared.token.as_ref()) {
                return r;
            }
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            post_silence(&body, &shared).await
        }
        (&Method::DELETE, p) if p.starts_with("/silences/") => {
            if let Some(r) = refusal(&req, shared.token.as_ref()) {
                return r;
            }
            let Some(id) = decode_segment(&p["/silences/".len()..]) else {
                return error(400, "the silence id is not UTF-8 once percent-decoded");
            };
            if !shared.read.silences().iter().any(|s| s.id == id) {
                return error(404, format!("no silence {id} (GET /silences lists them)"));
            }
            let publisher = shared.silences.clone();
            let key = id.clone();
            match tokio::task::spawn_blocking(move || publisher.publish(None, &key)).await {
                Ok(Ok(())) => json_response(200, json!({"expired": id})),
                Ok(Err(e)) => error(503, e.to_string()),
                Err(e) => error(500, e.to_string()),
            }
        }
        (&Method::GET, p) if p.starts_with("/segments/") => {
            let Some(id) = decode_segment(&p["/segments/".len()..]) else {
                return error(400, "the segment id is not UTF-8 once percent-decoded");
            };
            // The pipeline snapshots a watched segment's open windows at the end of its next
            // turn; a stalled pipeline answers without them.
            let asked = shared.read.watch(&id);
            let waited = std::time::Instant::now();
            while shared.read.turn() < asked + 2 && waited.elapsed() < WINDOWS_WAIT {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let state = shared
                .read
                .state(&id)
                .map(|s| serde_json::to_value(s).unwrap_or_default());
            let windows: Vec<serde_json::Value> = shared
                .read
                .open_windows(&id)
                .iter()
                .map(summary_json)
                .collect();
            if state.is_none() && windows.is_empty() {
                return error(404, format!("segment {id} is not held here"));
            }
            json_response(
                200,
                json!({"segment": id, "open_windows": windows, "controller": state}),
            )
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/actions" | "/silences") => {
            error(405, format!("{method} is not allowed on {path}"))
        }
        _ => json_response(
            404,
            json!({"error": "not found", "paths": ["/metrics", "/healthz", "/readyz", "/segments/{id}", "/actions", "/silences"]}),
        ),
    }
}

/// A request body within [`MAX_BODY_BYTES`] and [`BODY_TIMEOUT`]; a claimed length past the
/// limit is refused before reading anything.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    let claimed = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if claimed.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(error(
            413,
            format!("the body may be {MAX_BODY_BYTES} bytes at most"),
        ));
    }
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(error(408, "the body did not arrive in time")),
        Ok(Err(e)) => Err(error(413, format!("unreadable body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    segments: String,
    /// Start: RFC 3339, or `from_ms`; default now.
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    from_ms: Option<i64>,
    /// End: `duration` ("30m"), RFC 3339 `ends_at`, or `until_ms`.
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default)]
    until_ms: Option<i64>,
    #[serde(default, alias = "reason")]
    comment: String,
    #[serde(default)]
    created_by: String,
}

fn parse_time(field: &str, s: &str) -> Result<i64, String> {
    humantime::parse_rfc3339_weak(s)
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        })
        .map_err(|e| format!("{field}: {e} (write e.g. 2026-01-01T00:00:00Z)"))
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Validates a new silence (like Alertmanager's: who and why are required, the duration is
/// bounded, the id is generated).
fn new_silence(body: &[u8], now: i64) -> Result<SilenceRecord, String> {
    let new: NewSilence = serde_json::from_slice(body).map_err(|e| format!("bad silence: {e}"))?;
    if new.comment.trim().is_empty() {
        return Err("comment is required: say why".into());
    }
    if new.created_by.trim().is_empty() {
        return Err("created_by is required: say who".into());
    }
    crate::policy::Silence::new("check", &new.segments, 0, 1, "")
        .map_err(|e| format!("segments: {e}"))?;
    let from_ms = match (&new.starts_at, new.from_ms) {
        (Some(s), None) => parse_time("starts_at", s)?,
        (None, Some(ms)) => ms,
        (None, None) => now,
        (Some(_), Some(_)) => return Err("give starts_at or from_ms, not both".into()),
    };
    let max = MAX_SILENCE.as_millis() as i64;
    let until_ms = match (&new.duration, &new.ends_at, new.until_ms) {
        (Some(d), None, None) => {
            let d = humantime::parse_duration(d).map_err(|e| {
                format!("duration {d:?}: {e}; write e.g. 30m, 2h or 7d (at most 90d)")
            })?;
            if d > MAX_SILENCE {
                return Err(format!(
                    "duration {} is longer than the 90d a silence may last",
                    humantime::format_duration(d)
                ));
            }
            from_ms.saturating_add(d.as_millis() as i64)
        }
        (None, Some(e), None) => parse_time("ends_at", e)?,
        (None, None, Some(ms)) => ms,
        (None, None, None) => return Err("give duration, ends_at or until_ms".into()),
        _ => return Err("give one of duration, ends_at, until_ms".into()),
    };
    if until_ms <= from_ms {
        return Err("the silence ends before it starts".into());
    }
    if until_ms - from_ms > max {
        return Err("a silence may last 90d at most".into());
    }
    Ok(SilenceRecord {
        version: crate::controller::RECORD_VERSION,
        id: uuid::Uuid::new_v4().to_string(),
        segments: new.segments,
        from_ms,
        until_ms,
        reason: new.comment.trim().to_string(),
        created_by: new.created_by.trim().to_string(),
    })
}

async fn post_silence(body: &[u8], shared: &Shared) -> Response<Full<Bytes>> {
    let record = match new_silence(body, SystemClock.now_ms()) {
        Ok(r) => r,
        Err(e) => return error(400, e),
    };
    let publisher = shared.silences.clone();
    let r = record.clone();
    match tokio::task::spawn_blocking(move || publisher.publish(Some(&r), &r.id)).await {
        Ok(Ok(())) => json_response(
            201,
            json!({"id": record.id, "silence": {
                "id": record.id, "segments": record.segments,
                "starts_at": rfc3339(record.from_ms), "ends_at": rfc3339(record.until_ms),
                "from_ms": record.from_ms, "until_ms": record.until_ms,
                "comment": record.reason, "created_by": record.created_by}}),
        ),
        Ok(Err(e)) => error(503, e.to_string()),
        Err(e) => error(500, e.to_string()),
    }
}

fn summary_json(w: &crate::window::WindowSummary) -> serde_json::Value {
    let measurements: serde_json::Map<String, serde_json::Value> = w
        .measurements
        .iter()
        .map(|(name, m)| {
            (
                name.to_string(),
                json!({
                    "count": m.count, "sum": m.sum, "min": m.min, "max": m.max,
                    "mean": m.mean(), "p50": m.quantile(0.5), "p99": m.quantile(0.99),
                }),
            )
        })
        .collect();
    json!({"start_ms": w.start_ms, "end_ms": w.end_ms, "count": w.count, "measurements": measurements})
}

/// A client of the admin API (`segloop silence ...`).
pub struct AdminClient {
    base: String,
    token: Option<Secret>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:9464`.
    pub fn new(base: &str, token: Option<Secret>) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// The admin address of a config: `admin.listen`, with an unspecified address as loopback.
    pub fn base_of(config: &crate::config::Config) -> String {
        let listen = &config.admin.listen;
        let local = match listen.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
            _ => listen.clone(),
        };
        format!("http://{local}")
    }

    /// One request: the status and the JSON body.
    ///
    /// # Errors
    /// The admin API cannot be reached or answers something that is not JSON.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let url = format!("{}{path}", self.base);
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Bearer {}", t.expose()));
        let result = match (method, body) {
            ("POST", Some(b)) => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(b)
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => self.agent.get(&url).call(),
        };
        let mut resp =
            result.map_err(|e| anyhow::anyhow!("cannot reach the admin API at {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let json = serde_json::from_str(&text).map_err(|_| {
            anyhow::anyhow!("{url} answered {status} with something other than JSON")
        })?;
        Ok((status, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silences_are_validated_like_alertmanager() {
        let ok = |b: &str| new_silence(b.as_bytes(), 1_000);
        let s =
            ok(r#"{"segments":"eu-1/**","duration":"30m","comment":"deploy","created_by":"ana"}"#)
                .unwrap();
        assert_eq!((s.from_ms, s.until_ms), (1_000, 1_000 + 1_800_000));
        let t =
            ok(r#"{"segments":"eu-1/**","duration":"30m","comment":"deploy","created_by":"ana"}"#)
                .unwrap();
        assert_ne!(s.id, t.id, "ids are unique even within one millisecond");
        for (body, wanted) in [
            (
                r#"{"segments":"x","duration":"30m","created_by":"ana"}"#,
                "comment",
            ),
            (
                r#"{"segments":"x","duration":"30m","comment":" ","created_by":"ana"}"#,
                "comment",
            ),
            (
                r#"{"segments":"x","duration":"30m","comment":"c"}"#,
                "created_by",
            ),
            (
                r#"{"segments":"x","duration":"300000000years","comment":"c","created_by":"a"}"#,
                "duration",
            ),
            (
                r#"{"segments":"x","duration":"91d","comment":"c","created_by":"a"}"#,
                "90d",
            ),
            (
                r#"{"segments":"x","until_ms":5,"comment":"c","created_by":"a"}"#,
                "ends before",
            ),
            (
                r#"{"segments":"[","duration":"1m","comment":"c","created_by":"a"}"#,
                "segments",
            ),
            (
                r#"{"id":"mine","segments":"x","duration":"1m","comment":"c","created_by":"a"}"#,
                "unknown field",
            ),
        ] {
            let e = ok(body).unwrap_err();
            assert!(e.contains(wanted), "{body}: {e}");
        }
        let r = ok(r#"{"segments":"x","starts_at":"2026-01-01T00:00:00Z","ends_at":"2026-01-01T01:00:00Z","comment":"c","created_by":"a"}"#).unwrap();
        assert_eq!(r.until_ms - r.from_ms, 3_600_000);
        assert_eq!(rfc3339(r.from_ms), "2026-01-01T00:00:00.000Z");
    }

    #[test]
    fn percent_decoding_never_panics() {
        assert_eq!(decode_segment("fleet%2Fbad").as_deref(), Some("fleet/bad"));
        assert_eq!(decode_segment("%a\u{e9}x").as_deref(), Some("%a\u{e9}x"));
        assert_eq!(decode_segment("%ff%fe"), None);
        assert_eq!(decode_segment("%").as_deref(), Some("%"));
    }

    #[test]
    fn tokens_compare_in_full() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
