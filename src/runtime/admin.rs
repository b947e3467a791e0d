//! The admin endpoint (loopback by default): `/metrics`, `/healthz`, `/readyz`,
//! `GET /segments/{id}`, `GET /actions`, `GET|POST /silences`, `DELETE /silences/{id}`.
//!
//! Served by one thread. It never takes the engine's lock: per-segment state comes from the
//! pipeline's [`ReadModel`] (written at the end of each turn), health from [`Status`], and
//! silences are written to the control topic through a [`SilencePublisher`].

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tiny_http::{Header, Method, Request, Response, Server};

use super::{SilencePublisher, SilenceRecord, Status};
use crate::clock::{Clock, SystemClock};
use crate::metrics::Metrics;
use crate::pipeline::ReadModel;

/// What the admin thread reads and writes.
pub struct Shared {
    pub read: Arc<ReadModel>,
    pub status: Arc<Mutex<Status>>,
    pub silences: SilencePublisher,
    pub metrics: Metrics,
}

/// How long `GET /segments/{id}` waits for the pipeline to snapshot a segment's open windows.
const WINDOWS_WAIT: Duration = Duration::from_secs(1);

/// Most lag (records per partition) at which `/readyz` calls the instance caught up.
pub const READY_MAX_LAG: i64 = 1_000;

/// A running admin server.
pub struct Admin {
    pub addr: SocketAddr,
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `listen` and serves until [`Admin::stop`].
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn start(listen: &str, shared: Shared) -> anyhow::Result<Admin> {
        let server = Arc::new(
            Server::http(listen)
                .map_err(|e| anyhow::anyhow!("cannot listen on admin.listen {listen}: {e}"))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow::anyhow!("admin.listen {listen} is not an IP address"))?;
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("segloop-admin".into())
            .spawn(move || {
                while let Ok(req) = s.recv() {
                    handle(req, &shared);
                }
            })?;
        Ok(Admin {
            addr,
            server,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn json_response(status: u16, body: serde_json::Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(serde_json::to_vec_pretty(&body).unwrap_or_default())
        .with_status_code(status)
        .with_header(Header::from_bytes("Content-Type", "application/json").expect("static header"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    id: Option<String>,
    segments: String,
    #[serde(default)]
    from_ms: Option<i64>,
    #[serde(default)]
    until_ms: Option<i64>,
    /// Alternative to until_ms: a duration like "30m".
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    reason: String,
}

fn handle(mut req: Request, shared: &Shared) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    let resp = match (&method, path.as_str()) {
        (Method::Get, "/metrics") => Response::from_string(shared.metrics.render()).with_header(
            Header::from_bytes("Content-Type", "text/plain; version=0.0.4").expect("static header"),
        ),
        (Method::Get, "/healthz") => {
            let alive = shared
                .status
                .lock()
                .expect("status lock")
                .last_turn
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
            let body = json!({ "status": if alive { "ok" } else { "stalled" } });
            let status = if alive { 200 } else { 503 };
            return respond(req, json_response(status, body));
        }
        (Method::Get, "/readyz") => {
            let (assigned, lag, errors) = {
                let s = shared.status.lock().expect("status lock");
                (s.assigned.clone(), s.lag.clone(), s.consume_errors.clone())
            };
            let caught_up = assigned
                .iter()
                .all(|p| lag.get(p).is_some_and(|l| *l <= READY_MAX_LAG));
            let ready = !assigned.is_empty() && caught_up && errors.is_empty();
            return respond(
                req,
                json_response(
                    if ready { 200 } else { 503 },
                    json!({ "ready": ready, "assigned": assigned, "lag": lag, "consume_errors": errors }),
                ),
            );
        }
        (Method::Get, "/actions") => {
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
            return respond(req, json_response(200, json!({ "actions": list })));
        }
        (Method::Get, "/silences") => {
            let list: Vec<serde_json::Value> = shared
                .read
                .silences()
                .into_iter()
                .map(|s| {
                    json!({"id": s.id, "segments": s.segments, "from_ms": s.from_ms,
                           "until_ms": s.until_ms, "reason": s.reason})
                })
                .collect();
            return respond(req, json_response(200, json!({ "silences": list })));
        }
        (Method::Post, "/silences") => {
            let mut body = String::new();
            if req
                .as_reader()
                .take(64 * 1024)
                .read_to_string(&mut body)
                .is_err()
            {
                return respond(req, json_response(400, json!({"error": "unreadable body"})));
            }
            let new: NewSilence = match serde_json::from_str(&body) {
                Ok(n) => n,
                Err(e) => {
                    return respond(
                        req,
                        json_response(400, json!({"error": format!("bad silence: {e}")})),
                    )
                }
            };
            let now = SystemClock.now_ms();
            let from_ms = new.from_ms.unwrap_or(now);
            let until_ms = match (new.until_ms, new.duration.as_deref()) {
                (Some(u), _) => u,
                (None, Some(d)) => match humantime::parse_duration(d) {
                    Ok(d) => from_ms + d.as_millis() as i64,
                    Err(e) => {
                        return respond(
                            req,
                            json_response(400, json!({"error": format!("duration: {e}")})),
                        )
                    }
                },
                (None, None) => {
                    return respond(
                        req,
                        json_response(400, json!({"error": "give until_ms or duration"})),
                    )
                }
            };
            if until_ms <= from_ms {
                return respond(
                    req,
                    json_response(400, json!({"error": "until is not after from"})),
                );
            }
            if let Err(e) = crate::policy::Silence::new("check", &new.segments, 0, 1, "") {
                return respond(
                    req,
                    json_response(400, json!({"error": format!("segments: {e}")})),
                );
            }
            let id = new.id.unwrap_or_else(|| format!("s-{now}"));
            let record = SilenceRecord {
                id: id.clone(),
                segments: new.segments,
                from_ms,
                until_ms,
                reason: new.reason,
            };
            let result = shared.silences.publish(Some(&record), &id);
            return match result {
                Ok(()) => respond(
                    req,
                    json_response(201, json!({"id": id, "silence": record})),
                ),
                Err(e) => respond(req, json_response(503, json!({"error": e.to_string()}))),
            };
        }
        (Method::Delete, p) if p.starts_with("/silences/") => {
            let id = p["/silences/".len()..].to_string();
            let result = shared.silences.publish(None, &id);
            return match result {
                Ok(()) => respond(req, json_response(200, json!({"deleted": id}))),
                Err(e) => respond(req, json_response(503, json!({"error": e.to_string()}))),
            };
        }
        (Method::Get, p) if p.starts_with("/segments/") => {
            let id = percent_decode(&p["/segments/".len()..]);
            // The pipeline snapshots a watched segment's open windows at the end of its next
            // turn; a stalled pipeline answers without them.
            let asked = shared.read.watch(&id);
            let waited = std::time::Instant::now();
            while shared.read.turn() < asked + 2 && waited.elapsed() < WINDOWS_WAIT {
                std::thread::sleep(Duration::from_millis(5));
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
                return respond(
                    req,
                    json_response(
                        404,
                        json!({"error": format!("segment {id} is not held here")}),
                    ),
                );
            }
            return respond(
                req,
                json_response(
                    200,
                    json!({"segment": id, "open_windows": windows, "controller": state}),
                ),
            );
        }
        _ => {
            return respond(
                req,
                json_response(
                    404,
                    json!({"error": "not found", "paths": ["/metrics", "/healthz", "/readyz", "/segments/{id}", "/actions", "/silences"]}),
                ),
            )
        }
    };
    let _ = req.respond(resp);
}

fn respond(req: Request, resp: Response<std::io::Cursor<Vec<u8>>>) {
    let _ = req.respond(resp);
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

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
