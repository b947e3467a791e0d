//! The synthetic fleet shared by `segloop demo` (live, closed-loop) and `segloop backtest
//! --embedded-sample` (a recorded, open-loop history): 4 regions × 10 services × 25 endpoints
//! plus the 40 service-level segments, a seeded script of incidents, and the noise model of
//! one event.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::Serialize;

use crate::codec::build_codec;
use crate::config::Config;
use crate::model::TelemetryEvent;

const REGIONS: [&str; 4] = ["eu-1", "us-1", "us-2", "ap-1"];
const SERVICES: [&str; 10] = [
    "checkout", "search", "cart", "auth", "catalog", "payments", "profile", "reviews", "ship",
    "promo",
];
const ENDPOINTS: usize = 25;
/// Events per second per segment.
pub const RATE_HZ: u64 = 5;

/// What a scripted incident does to its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    ErrorSpike,
    LatencyRegression,
    SlowDrift,
    Flapping,
    ParentFault,
    NeverAcks,
    Ineffective,
    Silenced,
    NoisyHealthy,
}

impl FaultKind {
    pub fn describe(self) -> &'static str {
        match self {
            FaultKind::ErrorSpike => "error-rate spike (80% errors)",
            FaultKind::LatencyRegression => "latency regression (600-900 ms)",
            FaultKind::SlowDrift => "slow latency drift (+40 ms/s)",
            FaultKind::Flapping => "flapping: breaks again 2.5 s after every fix",
            FaultKind::ParentFault => "service-level fault; its 25 endpoints follow 1 s later",
            FaultKind::NeverAcks => "error spike; its actuator never answers",
            FaultKind::Ineffective => "latency regression the fix does not cure",
            FaultKind::Silenced => "error spike inside a silence window",
            FaultKind::NoisyHealthy => "noisy but healthy (wide latency, 2% errors)",
        }
    }

    /// What must happen, judged from the actions and decisions topics.
    pub fn expected(self) -> &'static str {
        match self {
            FaultKind::ErrorSpike
            | FaultKind::LatencyRegression
            | FaultKind::SlowDrift
            | FaultKind::ParentFault => "resolved",
            FaultKind::Flapping | FaultKind::NeverAcks | FaultKind::Ineffective => "escalated",
            FaultKind::Silenced | FaultKind::NoisyHealthy => "no_action",
        }
    }
}

/// One scripted incident.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub kind: FaultKind,
    pub segment: String,
    pub start_s: f64,
    /// For a silenced fault: when it stops by itself.
    pub end_s: Option<f64>,
}

/// The timeline of a run: incidents at offsets from the start.
pub fn script(seed: u64, duration_s: u64) -> Vec<Incident> {
    let mut rng = SplitMix(seed ^ 0xD3E0);
    // Distinct services for every incident, so subtrees never overlap.
    let mut services: Vec<(usize, usize)> = (0..REGIONS.len())
        .flat_map(|r| (0..SERVICES.len()).map(move |s| (r, s)))
        .collect();
    for i in (1..services.len()).rev() {
        services.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut pick = services.into_iter();
    let mut endpoint = |rng: &mut SplitMix| {
        let (r, s) = pick.next().expect("40 services cover the script");
        let e = rng.next_u64() as usize % ENDPOINTS;
        (
            format!("{}/{}", REGIONS[r], SERVICES[s]),
            format!("{}/{}/ep-{e:02}", REGIONS[r], SERVICES[s]),
        )
    };
    // Incidents start between 6 s and duration − 30 s (at least 1.5 s apart).
    let spacing = ((duration_s as f64 - 36.0) / 7.0).clamp(1.5, 3.5);
    let at = |i: usize| 6.0 + spacing * i as f64;
    let kinds = [
        FaultKind::ErrorSpike,
        FaultKind::Flapping,
        FaultKind::LatencyRegression,
        FaultKind::SlowDrift,
        FaultKind::ParentFault,
        FaultKind::NeverAcks,
        FaultKind::Ineffective,
        FaultKind::Silenced,
    ];
    let mut out = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let (service, ep) = endpoint(&mut rng);
        let segment = if kind == FaultKind::ParentFault {
            service
        } else {
            ep
        };
        let start_s = at(i);
        let end_s = (kind == FaultKind::Silenced).then_some(start_s + 6.0);
        out.push(Incident {
            kind,
            segment,
            start_s,
            end_s,
        });
    }
    for _ in 0..5 {
        let (_, ep) = endpoint(&mut rng);
        out.push(Incident {
            kind: FaultKind::NoisyHealthy,
            segment: ep,
            start_s: 0.0,
            end_s: None,
        });
    }
    out
}

/// The synthetic fleet: per region and service, the service and its endpoints.
pub fn fleet() -> Vec<String> {
    let mut segments = Vec::new();
    for r in REGIONS {
        for s in SERVICES {
            segments.push(format!("{r}/{s}"));
            for e in 0..ENDPOINTS {
                segments.push(format!("{r}/{s}/ep-{e:02}"));
            }
        }
    }
    segments
}

/// Event time of the sample history's first event: 2026-01-01T00:00:00Z.
pub const SAMPLE_EPOCH_MS: i64 = 1_767_225_600_000;

/// When a scripted fault is on in the sample history (seconds from its start): the history is
/// open-loop, as recorded on a day the fixes landed on their own schedule.
fn sample_fault(kind: FaultKind, since: f64) -> bool {
    match kind {
        FaultKind::ErrorSpike | FaultKind::LatencyRegression | FaultKind::ParentFault => {
            since < 3.5
        }
        FaultKind::SlowDrift => since < 7.0,
        // Four bursts of 3.5 s, 2.5 s apart.
        FaultKind::Flapping => since < 24.0 && since % 6.0 < 3.5,
        FaultKind::NeverAcks | FaultKind::Ineffective => since < 20.0,
        FaultKind::Silenced => since < 6.0,
        FaultKind::NoisyHealthy => false,
    }
}

/// The sample history for `segloop backtest --embedded-sample`: the demo's fleet (5 events per
/// second per segment from [`SAMPLE_EPOCH_MS`]) with the demo's scripted incidents, each on
/// for a fixed time. Returns the script; `emit` gets the events in time order.
pub fn sample_history(
    seed: u64,
    duration_s: u64,
    mut emit: impl FnMut(TelemetryEvent),
) -> Vec<Incident> {
    let script = script(seed, duration_s);
    let segments = fleet();
    let mut rng = SplitMix(seed);
    let ticks = duration_s * RATE_HZ;
    for n in 0..ticks {
        let now_s = n as f64 / RATE_HZ as f64;
        let ts = SAMPLE_EPOCH_MS + (n * 1000 / RATE_HZ) as i64;
        for seg in &segments {
            let mut fault = None;
            let mut noisy = false;
            for i in &script {
                let since = now_s - i.start_s;
                if i.segment == *seg {
                    noisy |= i.kind == FaultKind::NoisyHealthy;
                    if since >= 0.0 && sample_fault(i.kind, since) {
                        fault = Some((i.kind, i.start_s));
                    }
                } else if i.kind == FaultKind::ParentFault
                    && seg.starts_with(&i.segment)
                    && seg.as_bytes().get(i.segment.len()) == Some(&b'/')
                    && since >= 1.0
                    && sample_fault(i.kind, since)
                {
                    // Its endpoints follow the service a second later.
                    fault = Some((i.kind, i.start_s + 1.0));
                }
            }
            let (latency, error) = sample(&mut rng, fault, noisy, now_s);
            emit(TelemetryEvent {
                segment: seg.clone(),
                ts_ms: ts,
                measurements: BTreeMap::from([
                    ("error".to_string(), error),
                    ("latency_ms".to_string(), latency),
                ]),
                labels: BTreeMap::new(),
                event_id: None,
            });
        }
    }
    script
}

/// Writes the sample history to the configured telemetry topic (record timestamps = event
/// times, keys = segments, murmur2 partitioning). Returns the records written.
///
/// # Errors
/// The producer cannot be created or does not confirm every record.
pub fn write_sample_history(config: &Config, seed: u64, duration_s: u64) -> anyhow::Result<u64> {
    let t = &config.topics.telemetry;
    let codec =
        build_codec::<TelemetryEvent>(t.codec, &t.schema_settings()).map_err(anyhow::Error::msg)?;
    let producer: ThreadedProducer<DefaultProducerContext> = crate::kafka::producer_config(
        config,
        &[
            ("partitioner", "murmur2_random"),
            ("linger.ms", "20"),
            ("enable.idempotence", "true"),
        ],
    )
    .create()
    .context("cannot create the sample producer")?;
    let mut written = 0u64;
    let mut failed = None;
    let mut bytes = Vec::with_capacity(128);
    sample_history(seed, duration_s, |e| {
        bytes.clear();
        if failed.is_some() || codec.encode(&e, &mut bytes).is_err() {
            return;
        }
        let rec = BaseRecord::<str, [u8]>::to(&t.name)
            .key(e.segment.as_str())
            .payload(&bytes)
            .timestamp(e.ts_ms);
        match crate::kafka::send_waiting(&producer, rec) {
            Ok(()) => written += 1,
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return Err(e).context("cannot write the sample history");
    }
    producer
        .flush(Duration::from_secs(30))
        .context("the sample history was not fully written")?;
    Ok(written)
}

/// SplitMix64: small, seeded, good enough for synthetic noise.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One event's (latency, error) for a segment in a given state.
pub fn sample(
    rng: &mut SplitMix,
    fault: Option<(FaultKind, f64)>,
    noisy: bool,
    now_s: f64,
) -> (f64, f64) {
    let u = rng.unit();
    let e = rng.unit();
    let base_latency = if noisy {
        50.0 + 370.0 * u
    } else {
        50.0 + 150.0 * u
    };
    let base_error = if e < if noisy { 0.02 } else { 0.002 } {
        1.0
    } else {
        0.0
    };
    match fault {
        None => (base_latency, base_error),
        Some((kind, since)) => match kind {
            FaultKind::ErrorSpike
            | FaultKind::Flapping
            | FaultKind::ParentFault
            | FaultKind::NeverAcks
            | FaultKind::Silenced => (base_latency, if e < 0.8 { 1.0 } else { 0.0 }),
            FaultKind::LatencyRegression | FaultKind::Ineffective => {
                (600.0 + 300.0 * u, base_error)
            }
            FaultKind::SlowDrift => (base_latency + 40.0 * (now_s - since) * 2.5, base_error),
            FaultKind::NoisyHealthy => (base_latency, base_error),
        },
    }
}
