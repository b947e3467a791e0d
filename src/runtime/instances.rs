//! Instances on the control topic: each announces itself (key `instance/<id>`) with a
//! heartbeat. The others learn from it that they share the group's limits (see
//! [`crate::controller::Cluster`]); exactly-once, a second live instance started with the same
//! `transactional.id` is refused at startup instead of fencing the first. The default id is
//! unique per instance.

use super::*;

/// What an exactly-once instance says of itself on the control topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    #[serde(default = "one")]
    pub version: u32,
    /// The instance's id: its `transactional.id` (exactly-once, or configured), else the same
    /// default.
    pub transactional_id: String,
    pub host: String,
    /// The admin listen address as configured (with its port, unless 0).
    pub admin: String,
    pub pid: u32,
    pub started_ms: i64,
    /// When the instance last wrote this record.
    pub seen_ms: i64,
    /// Segments it knew then (the others' blast radius is a fraction of every instance's).
    #[serde(default)]
    pub known_segments: usize,
}

/// How often a running instance writes its record.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A record written within this long is a live instance (three heartbeats and a commit).
pub const LIVE_FOR: Duration = Duration::from_millis(crate::controller::LIVE_FOR_MS as u64);

/// The control-topic key prefix of instance records.
pub const PREFIX: &str = "instance/";

/// The control-topic key of an instance record.
pub fn key(transactional_id: &str) -> String {
    format!("{PREFIX}{transactional_id}")
}

/// This machine's name (the pod name under Kubernetes); `localhost` when unknown.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The `transactional.id` when `delivery.transactional_id` is not set: unique among running
/// instances. With a fixed admin port, `<group_id>-<host>-<port>`: two instances on one host
/// cannot share a port, and a restart in the same place keeps the id, so it fences its
/// predecessor. With port 0, `<group_id>-<host>-p<pid>.<n>` (a restart gets a new id; its
/// predecessor's open transaction is aborted by the broker after `transaction.timeout.ms`).
pub fn default_transactional_id(config: &Config, host: &str) -> String {
    static IN_PROCESS: AtomicU64 = AtomicU64::new(0);
    let group = &config.kafka.group_id;
    match fixed_port(&config.admin.listen) {
        Some(port) => format!("{group}-{host}-{port}"),
        None => format!(
            "{group}-{host}-p{}.{}",
            std::process::id(),
            IN_PROCESS.fetch_add(1, Ordering::Relaxed)
        ),
    }
}

/// The port of an admin address, unless 0 (or unparsable): an instance restarted with it
/// comes back at the same address.
pub fn fixed_port(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
}

/// Why `other` (the latest record under this instance's id) is a live duplicate of `me`, if
/// it is: written within [`LIVE_FOR`] of `now_ms` by an instance elsewhere (another host, or
/// another admin address on this one). The same host and admin address is this instance's own
/// predecessor (a restart), which it fences.
pub fn duplicate_of(me: &InstanceRecord, other: &InstanceRecord, now_ms: i64) -> Option<String> {
    let age_ms = now_ms - other.seen_ms;
    let live = age_ms < LIVE_FOR.as_millis() as i64;
    let predecessor =
        other.host == me.host && other.admin == me.admin && fixed_port(&me.admin).is_some();
    (live && !predecessor).then(|| {
        format!(
            "transactional.id {} is in use by a live instance (host {}, admin {}, pid {}, seen {} s ago): two instances with one id would fence each other; set delivery.transactional_id per instance, or leave it unset for a unique default",
            other.transactional_id,
            other.host,
            other.admin,
            other.pid,
            age_ms.max(0) / 1000
        )
    })
}

/// Exactly-once, at startup: refuses to start when a live instance already uses
/// `transactional_id` (its record on the control topic is fresh).
///
/// # Errors
/// A live duplicate, or the control topic cannot be read.
pub fn check_unique(config: &Config, me: &InstanceRecord, now_ms: i64) -> anyhow::Result<()> {
    let wanted = key(&me.transactional_id);
    let mut latest: Option<Option<InstanceRecord>> = None;
    kafka::read_since(
        config,
        &config.topics.control.name,
        now_ms - 2 * LIVE_FOR.as_millis() as i64,
        Duration::from_secs(10),
        |k, v| {
            if k == Some(wanted.as_bytes()) {
                latest = Some(v.and_then(|v| serde_json::from_slice(v).ok()));
            }
        },
    )?;
    if let Some(Some(other)) = latest {
        if let Some(why) = duplicate_of(me, &other, now_ms) {
            anyhow::bail!("{why}");
        }
    }
    Ok(())
}
