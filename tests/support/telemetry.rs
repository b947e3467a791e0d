//! Telemetry records for tests that drive a pipeline directly.

use std::collections::BTreeMap;

use segloop::codec::{build_codec, CodecKind};
use segloop::model::TelemetryEvent;

/// One event of `segment` at `ts` with an `error` measurement and `labels`, in the Avro
/// single-object encoding.
pub fn encode(segment: &str, ts: i64, error: f64, labels: &[(&str, &str)]) -> Vec<u8> {
    let codec =
        build_codec::<TelemetryEvent>(CodecKind::AvroSingleObject, &Default::default()).unwrap();
    let mut out = Vec::new();
    codec
        .encode(
            &TelemetryEvent {
                segment: segment.into(),
                ts_ms: ts,
                measurements: BTreeMap::from([("error".into(), error)]),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                event_id: None,
            },
            &mut out,
        )
        .unwrap();
    out
}
