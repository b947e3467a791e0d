//! Decode/encode throughput of each telemetry codec (fast path, and the resolving path for an
//! older writer). `cargo bench --bench codec`.

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segloop::codec::{build_codec, CodecKind, SchemaSettings};
use segloop::model::TelemetryEvent;

fn event() -> TelemetryEvent {
    TelemetryEvent {
        segment: "eu-1/checkout/payments".into(),
        ts_ms: 1_764_000_000_000,
        measurements: BTreeMap::from([("latency_ms".into(), 212.5), ("error".into(), 0.0)]),
        labels: BTreeMap::new(),
        event_id: None,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("telemetry");
    group.throughput(Throughput::Elements(1));
    for kind in [
        CodecKind::AvroSingleObject,
        CodecKind::AvroConfluent,
        CodecKind::AvroRaw,
        CodecKind::Json,
    ] {
        let codec = build_codec::<TelemetryEvent>(kind, &SchemaSettings::default()).unwrap();
        let mut bytes = Vec::new();
        codec.encode(&event(), &mut bytes).unwrap();
        group.bench_function(format!("decode/{kind}"), |b| {
            b.iter(|| codec.decode(std::hint::black_box(&bytes)).unwrap())
        });
        let e = event();
        group.bench_function(format!("encode/{kind}"), |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(64);
                codec.encode(std::hint::black_box(&e), &mut out).unwrap();
                out
            })
        });
    }
    // Resolving path: a v1 writer read into the current schema.
    let v1 =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/history/telemetry.v1.avsc");
    let old = build_codec::<TelemetryEvent>(
        CodecKind::AvroRaw,
        &SchemaSettings {
            raw_writer_schema: Some(v1),
            ..Default::default()
        },
    )
    .unwrap();
    // v1 datum: segment, ts, measurements — the v2 datum minus its trailing labels/event_id.
    let current =
        build_codec::<TelemetryEvent>(CodecKind::AvroRaw, &SchemaSettings::default()).unwrap();
    let mut bytes = Vec::new();
    current.encode(&event(), &mut bytes).unwrap();
    bytes.truncate(bytes.len() - 2);
    group.bench_function("decode/avro-raw-resolving-v1", |b| {
        b.iter(|| old.decode(std::hint::black_box(&bytes)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
