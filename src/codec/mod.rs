//! Codecs: bytes on a topic ⇄ the records of [`crate::model`].
//!
//! One trait, [`Codec`], and four implementations, chosen per topic in config:
//!
//! | codec                | framing                                                   |
//! |----------------------|-----------------------------------------------------------|
//! | `avro-single-object` | `C3 01` + 8-byte little-endian CRC-64-AVRO fingerprint     |
//! | `avro-confluent`     | `00` + 4-byte big-endian schema id (from a registry or config) |
//! | `avro-raw`           | the bare Avro datum, written with a configured schema       |
//! | `json`               | one JSON object (telemetry only)                            |
//!
//! Avro decoding looks up the *writer* schema (by fingerprint, by id, or from config) and takes
//! the fast serde path when it is the current schema; any other known version goes through Avro
//! schema resolution, so older and newer compatible producers keep working.
//!
//! Every failure is a [`DecodeError`] with a stable [`ErrorCode`] — the code the runtime puts in
//! the DLQ header — and never a panic, whatever the bytes.

pub mod fast;

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::path::PathBuf;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{DecisionRecord, RemediationCommand, RemediationOutcome, TelemetryEvent};
use crate::schema::{fingerprint, load_schema_file, SchemaKind};

mod avro;
#[allow(unused_imports)]
pub use avro::*;

/// Largest allocation the Avro decoder may make for one length-prefixed value. Kafka records are
/// 1 MiB by default; a garbage length prefix must not make us allocate gigabytes.
const MAX_AVRO_ALLOCATION: usize = 16 * 1024 * 1024;

/// Longest segment id accepted (bytes). Ids are paths like `eu-1/checkout/payments`.
pub const MAX_SEGMENT_LEN: usize = 512;

const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const CONFLUENT_MAGIC: u8 = 0x00;

/// Stable reason codes for records that cannot be used. They are the values of the DLQ header
/// `segloop.error.code` and the `code` label of the decode-error metric: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// The bytes end before the header or the datum does (or the record has no value).
    Truncated,
    /// The framing's magic bytes are wrong for the configured codec.
    BadMagic,
    /// Single-object header names a schema fingerprint this instance does not know.
    UnknownFingerprint,
    /// Confluent header names a schema id that is not configured.
    UnknownSchemaId,
    /// The writer's data cannot be resolved into the current schema (or JSON lacks a field).
    SchemaMismatch,
    /// The bytes are not a valid datum for the writer schema (or not JSON).
    Malformed,
    /// A complete datum was read but bytes remain after it.
    TrailingBytes,
    /// The record decoded but a value is not acceptable (empty segment, negative time, ...).
    InvalidValue,
    /// The record key is missing or differs from the payload's `segment`.
    KeyMismatch,
    /// Behind the partition watermark beyond the grace period (window engine).
    Late,
    /// Further ahead of the controller clock than the allowed skew (window engine).
    ClockSkew,
    /// Its partition is not held by this instance's windows (window engine: a rebalance raced
    /// the record; the partition's owner reads it).
    NotAssigned,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::Truncated,
        ErrorCode::BadMagic,
        ErrorCode::UnknownFingerprint,
        ErrorCode::UnknownSchemaId,
        ErrorCode::SchemaMismatch,
        ErrorCode::Malformed,
        ErrorCode::TrailingBytes,
        ErrorCode::InvalidValue,
        ErrorCode::KeyMismatch,
        ErrorCode::Late,
        ErrorCode::ClockSkew,
        ErrorCode::NotAssigned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Truncated => "truncated",
            ErrorCode::BadMagic => "bad_magic",
            ErrorCode::UnknownFingerprint => "unknown_fingerprint",
            ErrorCode::UnknownSchemaId => "unknown_schema_id",
            ErrorCode::SchemaMismatch => "schema_mismatch",
            ErrorCode::Malformed => "malformed",
            ErrorCode::TrailingBytes => "trailing_bytes",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::KeyMismatch => "key_mismatch",
            ErrorCode::Late => "late",
            ErrorCode::ClockSkew => "clock_skew",
            ErrorCode::NotAssigned => "not_assigned",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that could not be decoded or accepted, with its stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        DecodeError {
            code,
            message: message.into(),
        }
    }
}

/// Encoding failed: the value does not fit the schema (a bug, or a non-finite where JSON needs
/// a number).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {kind} record: {message}")]
pub struct EncodeError {
    pub kind: &'static str,
    pub message: String,
}

/// A record type of the wire contract.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    const KIND: SchemaKind;
    /// The segment the record is about; must equal the Kafka key.
    fn segment(&self) -> &str;
    /// Checks values the schema cannot express.
    fn validate(&self) -> Result<(), String> {
        validate_segment(self.segment())
    }
}

fn validate_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("segment is empty".into());
    }
    if segment.len() > MAX_SEGMENT_LEN {
        return Err(format!(
            "segment is {} bytes, longer than the {MAX_SEGMENT_LEN}-byte limit",
            segment.len()
        ));
    }
    Ok(())
}

/// Most measurements in one telemetry record.
pub const MAX_MEASUREMENTS: usize = 64;
/// Most labels in one telemetry record.
pub const MAX_LABELS: usize = 64;
/// Most bytes of label keys and values together in one telemetry record.
pub const MAX_LABEL_BYTES: usize = 8 * 1024;

/// The per-record caps of telemetry (after repeated map keys are folded), shared by both
/// decoders: `n` measurements, and labels as (count, key and value bytes).
pub fn check_telemetry_caps(
    measurements: usize,
    labels: usize,
    label_bytes: usize,
) -> Result<(), String> {
    if measurements > MAX_MEASUREMENTS {
        return Err(format!(
            "{measurements} measurements; a record may carry {MAX_MEASUREMENTS} at most"
        ));
    }
    if labels > MAX_LABELS {
        return Err(format!(
            "{labels} labels; a record may carry {MAX_LABELS} at most"
        ));
    }
    if label_bytes > MAX_LABEL_BYTES {
        return Err(format!(
            "labels of {label_bytes} bytes; a record may carry {MAX_LABEL_BYTES} at most"
        ));
    }
    Ok(())
}

impl Record for TelemetryEvent {
    const KIND: SchemaKind = SchemaKind::Telemetry;
    fn segment(&self) -> &str {
        &self.segment
    }
    fn validate(&self) -> Result<(), String> {
        validate_segment(&self.segment)?;
        if self.ts_ms < 0 {
            return Err(format!("ts_ms {} is before the Unix epoch", self.ts_ms));
        }
        check_telemetry_caps(
            self.measurements.len(),
            self.labels.len(),
            self.labels.iter().map(|(k, v)| k.len() + v.len()).sum(),
        )
    }
}

impl Record for RemediationCommand {
    const KIND: SchemaKind = SchemaKind::Command;
    fn segment(&self) -> &str {
        &self.segment
    }
}

impl Record for RemediationOutcome {
    const KIND: SchemaKind = SchemaKind::Outcome;
    fn segment(&self) -> &str {
        &self.segment
    }
}

impl Record for DecisionRecord {
    const KIND: SchemaKind = SchemaKind::Decision;
    fn segment(&self) -> &str {
        &self.segment
    }
}

/// Bytes ⇄ records of type `T`.
pub trait Codec<T>: Send + Sync {
    fn kind(&self) -> CodecKind;
    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError>;
    /// Decodes one record's value. Does not check the key: see [`decode_record`].
    fn decode(&self, bytes: &[u8]) -> Result<T, DecodeError>;
    /// The schema id framing `value` when this codec has never seen it (neither configured
    /// nor learned): the id to ask a [`SchemaSource`] for. Only the Confluent codec has ids.
    fn unseen_schema_id(&self, _value: &[u8]) -> Option<u32> {
        None
    }
    /// Learns what `id` is: the writer schema's text from a registry, or why it cannot be
    /// used (records framed with it then fail as `unknown_schema_id` with that reason).
    /// Returns the schema's fingerprint when it was usable.
    fn learn(&mut self, _id: u32, _schema: Result<&str, String>) -> Option<u64> {
        None
    }
    /// The fingerprint of the writer schema an id names, when known and usable.
    fn schema_of(&self, _id: u32) -> Option<u64> {
        None
    }
}

/// Decodes a Kafka record: the value through `codec`, then the value checks of
/// [`Record::validate`], then the key rule (key = payload segment).
pub fn decode_record<T: Record>(
    codec: &dyn Codec<T>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<T, DecodeError> {
    let value = value
        .ok_or_else(|| DecodeError::new(ErrorCode::Truncated, "record has no value (tombstone)"))?;
    let record = codec.decode(value)?;
    record
        .validate()
        .map_err(|m| DecodeError::new(ErrorCode::InvalidValue, m))?;
    check_key(key, record.segment())?;
    Ok(record)
}

/// The key rule of the wire contract: the key is the segment id, UTF-8.
pub fn check_key(key: Option<&[u8]>, segment: &str) -> Result<(), DecodeError> {
    match key {
        None => Err(DecodeError::new(
            ErrorCode::KeyMismatch,
            format!("record has no key; expected the segment id {segment:?}"),
        )),
        Some(k) if k == segment.as_bytes() => Ok(()),
        Some(k) => Err(DecodeError::new(
            ErrorCode::KeyMismatch,
            format!(
                "key {:?} differs from the payload segment {segment:?}",
                String::from_utf8_lossy(k)
            ),
        )),
    }
}

/// The codec names used in config and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CodecKind {
    #[default]
    AvroSingleObject,
    AvroConfluent,
    AvroRaw,
    Json,
}

impl CodecKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CodecKind::AvroSingleObject => "avro-single-object",
            CodecKind::AvroConfluent => "avro-confluent",
            CodecKind::AvroRaw => "avro-raw",
            CodecKind::Json => "json",
        }
    }

    pub fn parse(s: &str) -> Option<CodecKind> {
        [
            CodecKind::AvroSingleObject,
            CodecKind::AvroConfluent,
            CodecKind::AvroRaw,
            CodecKind::Json,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for CodecKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which schemas a topic's codec writes with and accepts. Paths are already resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchemaSettings {
    /// Confluent wire format: the id that names the current schema, which segloop writes
    /// with. `None` with a Schema Registry until segloop has registered its schema: no id is
    /// presumed to be the current schema, the registry says what each id is.
    pub schema_id: Option<u32>,
    /// Confluent wire format: other writer schemas by registry id.
    pub schema_ids: HashMap<u32, PathBuf>,
    /// Extra writer schemas accepted by fingerprint (e.g. a newer producer's version).
    pub writer_schemas: Vec<PathBuf>,
    /// `avro-raw` only: the schema the records were written with (default: current).
    pub raw_writer_schema: Option<PathBuf>,
}

/// Builds the codec for records of type `T`.
///
/// # Errors
/// A schema file that cannot be read or parsed, or `json` for a record other than telemetry.
pub fn build_codec<T: Record>(
    kind: CodecKind,
    settings: &SchemaSettings,
) -> Result<Box<dyn Codec<T>>, String> {
    Ok(match kind {
        CodecKind::AvroSingleObject => {
            let mut readers = AvroReaders::<T>::new()?;
            for path in &settings.writer_schemas {
                readers.add_writer(load_schema_file(path)?)?;
            }
            Box::new(SingleObjectCodec { readers })
        }
        CodecKind::AvroConfluent => {
            let mut readers = AvroReaders::<T>::new()?;
            let mut ids = HashMap::new();
            if let Some(id) = settings.schema_id {
                ids.insert(id, Ok(readers.current_fingerprint));
            }
            for (id, path) in &settings.schema_ids {
                if Some(*id) == settings.schema_id {
                    return Err(format!(
                        "schema id {id} is both the id segloop writes with (schema_id) and a \
                         writer schema in schema_ids; give {} another id",
                        path.display()
                    ));
                }
                let fp = readers.add_writer(load_schema_file(path)?)?;
                ids.insert(*id, Ok(fp));
            }
            Box::new(ConfluentCodec {
                readers,
                write_id: settings.schema_id,
                ids,
            })
        }
        CodecKind::AvroRaw => {
            let mut readers = AvroReaders::<T>::new()?;
            let writer_fp = match &settings.raw_writer_schema {
                Some(path) => readers.add_writer(load_schema_file(path)?)?,
                None => readers.current_fingerprint,
            };
            Box::new(RawAvroCodec { readers, writer_fp })
        }
        CodecKind::Json => {
            if T::KIND != SchemaKind::Telemetry {
                return Err(format!(
                    "the json codec is for telemetry only; {} records use an Avro codec",
                    T::KIND.name()
                ));
            }
            Box::new(JsonCodec::<T>(PhantomData))
        }
    })
}

/// One JSON object per record, fields as in the Avro schema (`ts_ms` a number of ms).
pub struct JsonCodec<T>(PhantomData<fn() -> T>);

impl<T: Record> Codec<T> for JsonCodec<T> {
    fn kind(&self) -> CodecKind {
        CodecKind::Json
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        serde_json::to_writer(out, value).map_err(|e| EncodeError {
            kind: T::KIND.name(),
            message: e.to_string(),
        })
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| {
            use serde_json::error::Category;
            let code = match e.classify() {
                Category::Eof => ErrorCode::Truncated,
                Category::Syntax | Category::Io => ErrorCode::Malformed,
                Category::Data => ErrorCode::SchemaMismatch,
            };
            DecodeError::new(code, format!("json: {e}"))
        })
    }
}
