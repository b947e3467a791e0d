//! Fuzz targets: every parser that takes bytes or text from outside, as one function each that
//! must never panic on any input. `fuzz/` runs them under libFuzzer (`cargo +nightly fuzz run
//! <target>`); `tests/fuzz_corpus.rs` replays the committed corpus (`fuzz/corpus/<target>/`,
//! every crash found included) through the same functions on the stable toolchain in CI.
//!
//! Where two implementations read the same input, a target also checks that they agree (the
//! fast telemetry decoder and the general one).

use std::collections::HashMap;

use crate::codec::fast::{Telemetry, TelemetryDecoder};
use crate::codec::{build_codec, CodecKind, SchemaSettings};
use crate::model::{RemediationCommand, RemediationOutcome, TelemetryEvent};

/// A fuzz target: takes any bytes, never panics.
pub type Target = fn(&[u8]);

/// The targets by name (the `fuzz/fuzz_targets/<name>.rs` files and corpus directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("telemetry", telemetry),
    ("records", records),
    ("condition", condition),
    ("policies", policies),
    ("config", config),
    ("admin", admin),
];

const KINDS: [CodecKind; 4] = [
    CodecKind::AvroSingleObject,
    CodecKind::AvroConfluent,
    CodecKind::AvroRaw,
    CodecKind::Json,
];

/// A telemetry record under every framing: the fast decoder and the general one accept the same
/// records and read the same event from them.
pub fn telemetry(data: &[u8]) {
    type Decoders = Vec<(
        CodecKind,
        TelemetryDecoder,
        Box<dyn crate::codec::Codec<TelemetryEvent>>,
    )>;
    thread_local! {
        // Built once per thread: building them per input took most of the fuzzer's time.
        static DECODERS: Decoders = KINDS
            .iter()
            .map(|kind| {
                let settings = SchemaSettings::default();
                (
                    *kind,
                    TelemetryDecoder::new(*kind, &settings).expect("built-in schemas build"),
                    build_codec::<TelemetryEvent>(*kind, &settings).expect("built-in schemas build"),
                )
            })
            .collect();
    }
    DECODERS.with(|decoders| {
        for (kind, fast, general) in decoders {
            telemetry_agree(*kind, fast, &**general, data);
        }
    });
}

fn telemetry_agree(
    kind: CodecKind,
    fast: &TelemetryDecoder,
    general: &dyn crate::codec::Codec<TelemetryEvent>,
    data: &[u8],
) {
    let a = fast.decode(None, Some(data));
    let b = crate::codec::decode_record(general, None, Some(data));
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let a = match a {
                Telemetry::Owned(e) => e,
                Telemetry::View(v) => v.to_owned_event(),
            };
            assert!(same_event(&a, &b), "{kind:?}: fast {a:?} != general {b:?}");
        }
        (Err(a), Err(b)) => assert_eq!(a.code, b.code, "{kind:?}: {a} vs {b}"),
        (a, b) => panic!("{kind:?}: fast {a:?} but general {b:?}"),
    }
}

/// Equal events, NaN measurements equal to each other.
fn same_event(a: &TelemetryEvent, b: &TelemetryEvent) -> bool {
    a.segment == b.segment
        && a.ts_ms == b.ts_ms
        && a.labels == b.labels
        && a.event_id == b.event_id
        && a.measurements.len() == b.measurements.len()
        && a.measurements
            .iter()
            .zip(&b.measurements)
            .all(|((ka, va), (kb, vb))| ka == kb && (va == vb || (va.is_nan() && vb.is_nan())))
}

/// Commands and outcomes (what an actuator and segloop read back) under every Avro framing.
pub fn records(data: &[u8]) {
    let settings = SchemaSettings::default();
    for kind in &KINDS[..3] {
        let c = build_codec::<RemediationCommand>(*kind, &settings).expect("built-in schemas");
        let _ = c.decode(data);
        let o = build_codec::<RemediationOutcome>(*kind, &settings).expect("built-in schemas");
        let _ = o.decode(data);
    }
}

/// A policy condition (`when`, `verify`): parsed, and when it parses, evaluated on a window.
pub fn condition(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cond) = crate::policy::expr::parse(&text) {
        let w = crate::window::WindowSummary::from_values(
            0,
            "fuzz/segment",
            (0, 10_000),
            3,
            &[
                ("error", &[0.0, 1.0, f64::NAN]),
                ("latency_ms", &[1.0, 2.0, 3.0]),
            ],
            &[],
            0.01,
        );
        let _ = cond.eval(&w);
    }
}

/// A policy file.
pub fn policies(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(set) = crate::policy::PolicySet::parse(&text, "fuzz.toml") {
        let _ = set.limit_warnings();
        let _ = set.scale_out_note(Some(16), "", "");
    }
}

/// The config loader: the input's first line as a file, its other lines as `--set` overrides.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (file, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let overrides: Vec<String> = rest.lines().map(str::to_string).collect();
    let env = HashMap::new();
    let _ = crate::config::Config::load(&crate::config::Sources {
        file: None,
        env: &env,
        overrides: &overrides,
    });
    let dir = std::env::temp_dir().join(format!("segloop-fuzz-config-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() {
        let path = dir.join("c.toml");
        let body = file.replace("\\n", "\n");
        if std::fs::write(&path, body).is_ok() {
            let _ = crate::config::Config::load(&crate::config::Sources {
                file: Some(&path),
                env: &env,
                overrides: &overrides,
            });
        }
    }
}

/// What the admin API parses of a request: the path's segment id and a silence's body.
pub fn admin(data: &[u8]) {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (path, body) = data.split_at(split);
    crate::runtime::admin::parse_untrusted(&String::from_utf8_lossy(path), body);
}
