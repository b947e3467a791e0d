//! The admin endpoint (loopback by default): `/metrics`, `/healthz`, `/readyz`,
//! `GET /segments/{id}`, `GET /actions`, `GET|POST /silences`, `DELETE /silences/{id}`.
//!
//! Served by one thread; each request locks the shared core briefly.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tiny_http::{Header, Method, Request, Response, Server};

use super::{Control, Core, SilenceRecord};
use crate::metrics::Metrics;

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
    pub fn start(
        listen: &str,
        core: Arc<Mutex<Core>>,
        metrics: Metrics,
        control: Arc<Control>,
    ) -> anyhow::Result<Admin> {
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
                    handle(req, &core, &metrics, &control);
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

fn handle(mut req: Request, core: &Arc<Mutex<Core>>, metrics: &Metrics, _control: &Control) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    let resp = match (&method, path.as_str()) {
        (Method::Get, "/metrics") => Response::from_string(metrics.render()).with_header(
            Header::from_bytes("Content-Type", "text/plain; version=0.0.4").expect("static header"),
        ),
        (Method::Get, "/healthz") => {
            let core = core.lock().expect("core lock");
            let alive = core
                .last_turn
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
            let body = json!({ "status": if alive { "ok" } else { "stalled" } });
            let status = if alive { 200 } else { 503 };
            drop(core);
            return respond(req, json_response(status, body));
        }
        (Method::Get, "/readyz") => {
            let core = core.lock().expect("core lock");
            let assigned = core.assigned.clone();
            let lag = core.lag.clone();
            drop(core);
            let caught_up = assigned
                .iter()
                .all(|p| lag.get(p).is_some_and(|l| *l <= READY_MAX_LAG));
            let ready = !assigned.is_empty() && caught_up;
            return respond(
                req,
                json_response(
                    if ready { 200 } else { 503 },
                    json!({ "ready": ready, "assigned": assigned, "lag": lag }),
                ),
            );
        }
        (Method::Get, "/actions") => {
            let core = core.lock().expect("core lock");
            let list: Vec<serde_json::Value> = core
                .controller
                .in_flight()
                .map(|(seg, policy, l)| {
                    json!({
                        "segment": seg.segment,
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
            let core = core.lock().expect("core lock");
            let list: Vec<serde_json::Value> = core
                .controller
                .silences()
                .map(|s| {
                    json!({"id": s.id, "segments": s.segments_glob, "from_ms": s.from_ms,
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
            let now = super::Clock::now_ms(&super::SystemClock);
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
            let result = core
                .lock()
                .expect("core lock")
                .publish_silence(Some(&record), &id);
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
            let result = core.lock().expect("core lock").publish_silence(None, &id);
            return match result {
                Ok(()) => respond(req, json_response(200, json!({"deleted": id}))),
                Err(e) => respond(req, json_response(503, json!({"error": e.to_string()}))),
            };
        }
        (Method::Get, p) if p.starts_with("/segments/") => {
            let id = percent_decode(&p["/segments/".len()..]);
            let core = core.lock().expect("core lock");
            let state = core
                .controller
                .segment(&id)
                .map(|s| serde_json::to_value(s).unwrap_or_default());
            let windows: Vec<serde_json::Value> = core
                .engine
                .open_windows(&id)
                .iter()
                .map(summary_json)
                .collect();
            drop(core);
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
