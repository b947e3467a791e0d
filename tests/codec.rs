//! Codec behaviour: fastavro goldens (interop), round trips, hostile bytes, one test per code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use segloop::codec::{
    build_codec, check_key, decode_record, Codec, CodecKind, ErrorCode, Record, SchemaSettings,
};
use segloop::model::{
    CommandReason, OutcomeStatus, RemediationCommand, RemediationOutcome, TelemetryEvent,
};
use segloop::schema::{fingerprint, SchemaKind};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn v1() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/history/telemetry.v1.avsc")
}

/// The settings the goldens were written for (see scripts/interop.py).
fn golden_settings(version: &str) -> SchemaSettings {
    let mut schema_ids = HashMap::new();
    schema_ids.insert(2, v1());
    schema_ids.insert(3, golden("schemas/telemetry.v3.avsc"));
    SchemaSettings {
        schema_id: Some(1),
        schema_ids,
        writer_schemas: vec![golden("schemas/telemetry.v3.avsc")],
        raw_writer_schema: match version {
            "telemetry.v1" => Some(v1()),
            "telemetry.v3" => Some(golden("schemas/telemetry.v3.avsc")),
            _ => None,
        },
    }
}

fn hex_lines(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| hex::decode(l.trim()).unwrap())
        .collect()
}

fn expected_lines(name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(golden(&format!("{name}.expected.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_golden<T: Record + std::fmt::Debug>(name: &str) -> usize {
    let expected = expected_lines(name);
    let mut checked = 0;
    for (framing, kind) in [
        ("single-object", CodecKind::AvroSingleObject),
        ("confluent", CodecKind::AvroConfluent),
        ("raw", CodecKind::AvroRaw),
    ] {
        let codec = build_codec::<T>(kind, &golden_settings(name)).unwrap();
        let records = hex_lines(&golden(&format!("{name}.{framing}.hex")));
        assert_eq!(records.len(), expected.len(), "{name}.{framing}");
        for (bytes, want) in records.iter().zip(&expected) {
            let got = codec
                .decode(bytes)
                .unwrap_or_else(|e| panic!("{name}.{framing}: {e}"));
            assert_eq!(
                &serde_json::to_value(&got).unwrap(),
                want,
                "{name}.{framing} decoded differently from fastavro's input"
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn decodes_fastavro_goldens_in_every_framing_and_schema_version() {
    let mut n = 0;
    for version in ["telemetry.v1", "telemetry.v2", "telemetry.v3"] {
        n += check_golden::<TelemetryEvent>(version);
    }
    n += check_golden::<RemediationCommand>("command");
    n += check_golden::<RemediationOutcome>("outcome");
    assert_eq!(n, 3 * 3 * 3 + 3 + 3 * 4);
}

#[test]
fn fingerprints_match_fastavro_headers() {
    let first = &hex_lines(&golden("telemetry.v2.single-object.hex"))[0];
    assert_eq!(
        &first[2..10],
        &fingerprint(SchemaKind::Telemetry.schema()).to_le_bytes()
    );
    let cmd = &hex_lines(&golden("command.single-object.hex"))[0];
    assert_eq!(
        &cmd[2..10],
        &fingerprint(SchemaKind::Command.schema()).to_le_bytes()
    );
}

#[test]
fn every_embedded_schema_parses_and_mirrors_its_rust_type() {
    for kind in SchemaKind::ALL {
        for schema in kind.known_versions() {
            assert!(!schema.canonical_form().is_empty());
        }
    }
    // Each Rust type encodes with its schema (write_ser validates field by field).
    let codec = build_codec::<RemediationCommand>(CodecKind::AvroRaw, &Default::default()).unwrap();
    let mut out = Vec::new();
    codec.encode(&sample_command(), &mut out).unwrap();
    assert_eq!(codec.decode(&out).unwrap(), sample_command());
}

fn sample_event() -> TelemetryEvent {
    TelemetryEvent {
        segment: "eu-1/checkout/payments".into(),
        ts_ms: 1_764_000_000_000,
        measurements: BTreeMap::from([("latency_ms".into(), 120.5), ("error".into(), 0.0)]),
        labels: BTreeMap::from([("region".into(), "eu-1".into())]),
        event_id: Some("e-1".into()),
    }
}

fn sample_command() -> RemediationCommand {
    RemediationCommand {
        command_id: "id".into(),
        segment: "a/b".into(),
        policy: "p".into(),
        policy_version: 2,
        action: "rollback".into(),
        params: BTreeMap::from([("k".into(), "v".into())]),
        attempt: 1,
        issued_at_ms: 10,
        ack_deadline_ms: 20,
        reason: CommandReason {
            condition: "mean(error) > 0.05".into(),
            metric: "mean(error)".into(),
            observed: 0.5,
            threshold: 0.05,
            window_start_ms: 0,
            window_end_ms: 10,
        },
        dry_run: true,
    }
}

fn all_telemetry_codecs() -> Vec<Box<dyn Codec<TelemetryEvent>>> {
    [
        CodecKind::AvroSingleObject,
        CodecKind::AvroConfluent,
        CodecKind::AvroRaw,
        CodecKind::Json,
    ]
    .into_iter()
    .map(|k| build_codec::<TelemetryEvent>(k, &golden_settings("telemetry.v2")).unwrap())
    .collect()
}

fn encode(codec: &dyn Codec<TelemetryEvent>, e: &TelemetryEvent) -> Vec<u8> {
    let mut out = Vec::new();
    codec.encode(e, &mut out).unwrap();
    out
}

fn code_of(codec: &dyn Codec<TelemetryEvent>, bytes: &[u8]) -> ErrorCode {
    codec.decode(bytes).unwrap_err().code
}

fn codec(kind: CodecKind) -> Box<dyn Codec<TelemetryEvent>> {
    build_codec::<TelemetryEvent>(kind, &golden_settings("telemetry.v2")).unwrap()
}

// ---- one test per error code -------------------------------------------------------------

#[test]
fn truncated_header_and_datum_are_truncated() {
    let so = codec(CodecKind::AvroSingleObject);
    let full = encode(so.as_ref(), &sample_event());
    assert_eq!(code_of(so.as_ref(), &full[..5]), ErrorCode::Truncated);
    assert_eq!(
        code_of(so.as_ref(), &full[..full.len() - 3]),
        ErrorCode::Truncated
    );
    let cf = codec(CodecKind::AvroConfluent);
    assert_eq!(code_of(cf.as_ref(), &[0, 0, 0]), ErrorCode::Truncated);
    assert_eq!(code_of(cf.as_ref(), &[]), ErrorCode::Truncated);
    let json = codec(CodecKind::Json);
    assert_eq!(
        code_of(json.as_ref(), br#"{"segment":"a"#),
        ErrorCode::Truncated
    );
    let err = decode_record(so.as_ref(), Some(b"a"), None).unwrap_err();
    assert_eq!(err.code, ErrorCode::Truncated);
}

#[test]
fn wrong_magic_is_bad_magic() {
    let so = codec(CodecKind::AvroSingleObject);
    let mut bytes = encode(so.as_ref(), &sample_event());
    bytes[1] = 0x02;
    assert_eq!(code_of(so.as_ref(), &bytes), ErrorCode::BadMagic);
    let cf = codec(CodecKind::AvroConfluent);
    assert_eq!(
        code_of(cf.as_ref(), b"\x01\0\0\0\x01abc"),
        ErrorCode::BadMagic
    );
    // a Confluent-framed record read as single-object
    let framed = encode(cf.as_ref(), &sample_event());
    assert_eq!(code_of(so.as_ref(), &framed), ErrorCode::BadMagic);
}

#[test]
fn unknown_fingerprint_names_the_fix() {
    let so = codec(CodecKind::AvroSingleObject);
    let mut bytes = encode(so.as_ref(), &sample_event());
    bytes[2] ^= 0xFF;
    let err = so.decode(&bytes).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownFingerprint);
    assert!(err.message.contains("writer_schemas"), "{}", err.message);
}

#[test]
fn unconfigured_confluent_id_is_unknown_schema_id() {
    let cf = codec(CodecKind::AvroConfluent);
    let mut bytes = encode(cf.as_ref(), &sample_event());
    bytes[4] = 9;
    assert_eq!(code_of(cf.as_ref(), &bytes), ErrorCode::UnknownSchemaId);
}

#[test]
fn unresolvable_writer_is_schema_mismatch() {
    // A writer schema whose `measurements` are strings cannot resolve into map<double>.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.avsc");
    std::fs::write(
        &path,
        r#"{"type":"record","name":"TelemetryEvent","namespace":"io.segloop","fields":[
            {"name":"segment","type":"string"},{"name":"ts_ms","type":"long"},
            {"name":"measurements","type":{"type":"map","values":"string"}}]}"#,
    )
    .unwrap();
    let settings = SchemaSettings {
        raw_writer_schema: Some(path),
        ..Default::default()
    };
    let raw = build_codec::<TelemetryEvent>(CodecKind::AvroRaw, &settings).unwrap();
    // segment "a", ts 1, map {"x": "y"}
    let bytes = [2, b'a', 2, 2, 2, b'x', 2, b'y', 0];
    assert_eq!(code_of(raw.as_ref(), &bytes), ErrorCode::SchemaMismatch);
    let json = codec(CodecKind::Json);
    assert_eq!(
        code_of(json.as_ref(), br#"{"segment":"a","measurements":{}}"#),
        ErrorCode::SchemaMismatch
    );
}

#[test]
fn garbage_datum_is_malformed() {
    let raw = codec(CodecKind::AvroRaw);
    // string length -1 (zigzag 1) is invalid
    assert_eq!(code_of(raw.as_ref(), &[0x01, 0x41]), ErrorCode::Malformed);
    let json = codec(CodecKind::Json);
    assert_eq!(code_of(json.as_ref(), b"not json"), ErrorCode::Malformed);
}

#[test]
fn extra_bytes_after_datum_are_trailing_bytes() {
    let so = codec(CodecKind::AvroSingleObject);
    let mut bytes = encode(so.as_ref(), &sample_event());
    bytes.extend_from_slice(&[0, 0]);
    assert_eq!(code_of(so.as_ref(), &bytes), ErrorCode::TrailingBytes);
}

#[test]
fn empty_segment_and_negative_time_are_invalid_value() {
    let so = codec(CodecKind::AvroSingleObject);
    let mut e = sample_event();
    e.segment.clear();
    let bytes = encode(so.as_ref(), &e);
    let err = decode_record(so.as_ref(), Some(b""), Some(&bytes)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidValue);
    let mut e = sample_event();
    e.ts_ms = -5;
    let bytes = encode(so.as_ref(), &e);
    let err = decode_record(so.as_ref(), Some(e.segment.as_bytes()), Some(&bytes)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidValue);
}

#[test]
fn key_must_equal_payload_segment() {
    let so = codec(CodecKind::AvroSingleObject);
    let e = sample_event();
    let bytes = encode(so.as_ref(), &e);
    assert_eq!(
        decode_record(so.as_ref(), Some(b"other"), Some(&bytes))
            .unwrap_err()
            .code,
        ErrorCode::KeyMismatch
    );
    assert_eq!(
        decode_record(so.as_ref(), None, Some(&bytes))
            .unwrap_err()
            .code,
        ErrorCode::KeyMismatch
    );
    assert_eq!(
        decode_record(so.as_ref(), Some(e.segment.as_bytes()), Some(&bytes)).unwrap(),
        e
    );
    assert!(check_key(Some(b"a/b"), "a/b").is_ok());
}

#[test]
fn error_codes_are_stable_strings() {
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "truncated",
            "bad_magic",
            "unknown_fingerprint",
            "unknown_schema_id",
            "schema_mismatch",
            "malformed",
            "trailing_bytes",
            "invalid_value",
            "key_mismatch",
            "late",
            "clock_skew",
            "not_assigned"
        ]
    );
}

#[test]
fn json_codec_is_telemetry_only() {
    let err = build_codec::<RemediationOutcome>(CodecKind::Json, &Default::default())
        .err()
        .unwrap();
    assert!(err.contains("telemetry only"), "{err}");
}

#[test]
fn outcome_status_round_trips_as_avro_enum() {
    let codec = build_codec::<RemediationOutcome>(CodecKind::AvroSingleObject, &Default::default())
        .unwrap();
    for status in [
        OutcomeStatus::Accepted,
        OutcomeStatus::Applied,
        OutcomeStatus::Failed,
        OutcomeStatus::Rejected,
    ] {
        let o = RemediationOutcome {
            command_id: "c".into(),
            segment: "s".into(),
            status,
            ts_ms: 1,
            actuator: "a".into(),
            message: None,
        };
        let mut out = Vec::new();
        codec.encode(&o, &mut out).unwrap();
        assert_eq!(codec.decode(&out).unwrap(), o);
    }
}

// ---- properties ------------------------------------------------------------------------

fn arb_event() -> impl Strategy<Value = TelemetryEvent> {
    (
        // Multi-byte characters too: the fast path checks ASCII strings a faster way.
        "[a-z0-9/_é€😀-]{1,40}",
        0i64..4_000_000_000_000,
        prop::collection::btree_map("[a-z_µ]{1,12}", -1e12f64..1e12, 0..5),
        prop::collection::btree_map("[a-zß]{1,8}", "[ -~äñ✓]{0,16}", 0..3),
        prop::option::of("[a-f0-9-]{0,36}"),
    )
        .prop_map(
            |(segment, ts_ms, measurements, labels, event_id)| TelemetryEvent {
                segment,
                ts_ms,
                measurements,
                labels,
                event_id,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_codec_round_trips_telemetry(e in arb_event()) {
        for codec in all_telemetry_codecs() {
            let bytes = encode(codec.as_ref(), &e);
            let back = decode_record(codec.as_ref(), Some(e.segment.as_bytes()), Some(&bytes));
            prop_assert_eq!(back.as_ref(), Ok(&e), "codec {}", codec.kind());
        }
    }

    #[test]
    fn random_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        for codec in all_telemetry_codecs() {
            let _ = codec.decode(&bytes);
        }
        for kind in [CodecKind::AvroSingleObject, CodecKind::AvroConfluent, CodecKind::AvroRaw] {
            let _ = build_codec::<RemediationCommand>(kind, &Default::default()).unwrap().decode(&bytes);
            let _ = build_codec::<RemediationOutcome>(kind, &Default::default()).unwrap().decode(&bytes);
        }
    }

    #[test]
    fn corrupted_records_fail_with_a_code_or_decode(e in arb_event(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        // Flipping one byte of a valid record, in every framing and through the resolving
        // path (v1 writer), must give a decoded record or a typed error, never a panic.
        for codec in all_telemetry_codecs() {
            let mut bytes = encode(codec.as_ref(), &e);
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let _ = codec.decode(&bytes);
        }
    }
}

#[test]
fn older_writer_goes_through_resolution_and_gets_defaults() {
    let so = codec(CodecKind::AvroSingleObject);
    let first = &hex_lines(&golden("telemetry.v1.single-object.hex"))[0];
    let e = so.decode(first).unwrap();
    assert!(e.labels.is_empty());
    assert_eq!(e.event_id, None);
    assert_eq!(e.segment, "eu-1/checkout/payments");
}

// ---- the telemetry fast path agrees with the general decoder --------------------------------

fn fast_decoders() -> Vec<(
    segloop::codec::fast::TelemetryDecoder,
    Box<dyn Codec<TelemetryEvent>>,
)> {
    [
        CodecKind::AvroSingleObject,
        CodecKind::AvroConfluent,
        CodecKind::AvroRaw,
        CodecKind::Json,
    ]
    .into_iter()
    .map(|k| {
        let s = golden_settings("telemetry.v2");
        (
            segloop::codec::fast::TelemetryDecoder::new(k, &s).unwrap(),
            build_codec::<TelemetryEvent>(k, &s).unwrap(),
        )
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fast_path_equals_general_decoder_on_valid_records(e in arb_event()) {
        for (fast, general) in fast_decoders() {
            let bytes = encode(general.as_ref(), &e);
            let got = fast.decode(Some(e.segment.as_bytes()), Some(&bytes)).map(|t| t.into_owned());
            prop_assert_eq!(got, Ok(e.clone()), "codec {}", general.kind());
        }
    }

    #[test]
    fn fast_path_agrees_on_corrupted_and_random_bytes(
        e in arb_event(),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        for (fast, general) in fast_decoders() {
            let mut bytes = encode(general.as_ref(), &e);
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let truncated = &bytes[..cut.index(bytes.len() + 1)];
            for input in [&bytes[..], truncated, &noise[..]] {
                let a = fast.decode(None, Some(input)).map(|t| t.into_owned()).map_err(|e| e.code);
                let b = general.decode(input).map_err(|e| e.code);
                // Key rule aside (no key given), both must agree on success and on the code.
                let a = match a { Err(segloop::codec::ErrorCode::KeyMismatch) => Ok(()), Err(c) => Err(c), Ok(_) => Ok(()) };
                let b = match b {
                    Ok(ev) if segloop::codec::Record::validate(&ev).is_err() => Err(segloop::codec::ErrorCode::InvalidValue),
                    Ok(_) => Ok(()),
                    Err(c) => Err(c),
                };
                prop_assert_eq!(a, b, "codec {} input {:02x?}", general.kind(), input);
            }
        }
    }
}

proptest! {
    /// The label map's check "labels unchanged" (issue #24: it is made without copying the
    /// event) agrees with comparing the owned event's labels, for any labels on the wire,
    /// repeated keys included (those may only compare unequal: the owned path decides).
    #[test]
    fn borrowed_labels_compare_like_owned_ones(
        wire in proptest::collection::vec(("[ab]{1,2}", "[xy]{0,1}"), 0..4),
        stored in proptest::collection::btree_map("[ab]{1,2}", "[xy]{0,1}", 0..4),
    ) {
        use segloop::codec::fast::{Telemetry, TelemetryView};
        let view = TelemetryView {
            segment: "s",
            ts_ms: 0,
            measurements: Default::default(),
            labels: wire.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            event_id: None,
        };
        let owned = view.to_owned_event().labels == stored;
        let distinct = wire.iter().map(|(k, _)| k).collect::<std::collections::BTreeSet<_>>().len() == wire.len();
        let borrowed = Telemetry::View(view.clone()).labels_equal(&stored);
        prop_assert!(!borrowed || owned, "borrowed said equal, owned differs: {wire:?} vs {stored:?}");
        if distinct {
            prop_assert_eq!(borrowed, owned);
        }
        prop_assert_eq!(Telemetry::Owned(view.to_owned_event()).labels_equal(&stored), owned);
    }
}
