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

/// A reader of Avro datums into `T` for every writer schema we know, by fingerprint.
struct AvroReaders<T> {
    current_fingerprint: u64,
    writer: GenericDatumWriter<'static>,
    /// Writer = reader: serde straight from the bytes (the fast path).
    fast: GenericDatumReader<'static>,
    /// Other writer versions: decode with the writer schema, then resolve into the current one.
    resolving: HashMap<u64, GenericDatumReader<'static>>,
    reader_schema: &'static Schema,
    _t: PhantomData<fn() -> T>,
}

impl<T: Record> AvroReaders<T> {
    fn new() -> Result<Self, String> {
        apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
        let reader_schema = T::KIND.schema();
        let fast = GenericDatumReader::builder(reader_schema)
            .build()
            .map_err(|e| format!("cannot build Avro reader: {e}"))?;
        let writer = GenericDatumWriter::builder(reader_schema)
            .build()
            .map_err(|e| format!("cannot build Avro writer: {e}"))?;
        let mut readers = AvroReaders {
            current_fingerprint: fingerprint(reader_schema),
            writer,
            fast,
            resolving: HashMap::new(),
            reader_schema,
            _t: PhantomData,
        };
        for old in &T::KIND.known_versions()[1..] {
            readers.add_writer(old)?;
        }
        Ok(readers)
    }

    /// Accepts records written with `schema`; returns its fingerprint.
    fn add_writer(&mut self, schema: &'static Schema) -> Result<u64, String> {
        let fp = fingerprint(schema);
        if fp != self.current_fingerprint {
            let reader = GenericDatumReader::builder(schema)
                .build()
                .map_err(|e| format!("cannot build Avro reader for a writer schema: {e}"))?;
            self.resolving.insert(fp, reader);
        }
        Ok(fp)
    }

    /// Whether records written with `schema` can be read as the current schema (Avro schema
    /// resolution: new fields need defaults, types must promote), checked once, up front.
    fn check_resolves(&self, schema: &Schema) -> Result<(), String> {
        apache_avro::schema_compatibility::SchemaCompatibility::can_read(schema, self.reader_schema)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "the writer schema does not resolve into the current {} schema: {e}",
                    T::KIND.name()
                )
            })
    }

    fn knows(&self, fp: u64) -> bool {
        fp == self.current_fingerprint || self.resolving.contains_key(&fp)
    }

    fn encode_datum(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.writer
            .write_ser(out, value)
            .map(|_| ())
            .map_err(|e| EncodeError {
                kind: T::KIND.name(),
                message: e.to_string(),
            })
    }

    /// Decodes one datum written with the schema of fingerprint `fp` (which must be known).
    fn decode_datum(&self, fp: u64, datum: &[u8]) -> Result<T, DecodeError> {
        let mut input = SliceReader::new(datum);
        let result = if fp == self.current_fingerprint {
            guard_panics(|| self.fast.read_deser::<T>(&mut input))
                .map_err(|e| input.classify(e.to_string()))
        } else {
            let reader = self
                .resolving
                .get(&fp)
                .expect("caller should only pass known fingerprints");
            match guard_panics(|| reader.read_value(&mut input)) {
                Err(e) => Err(input.classify(e.to_string())),
                Ok(value) => guard_panics(|| value.resolve(self.reader_schema))
                    .and_then(|v| apache_avro::from_value::<T>(&v).map_err(Into::into))
                    .map_err(|e| {
                        DecodeError::new(
                            ErrorCode::SchemaMismatch,
                            format!(
                                "writer schema {fp:016x} does not resolve into the current {} schema: {e}",
                                T::KIND.name()
                            ),
                        )
                    }),
            }
        };
        let record = result?;
        if input.remaining() > 0 {
            return Err(DecodeError::new(
                ErrorCode::TrailingBytes,
                format!(
                    "{} bytes remain after a complete {} datum",
                    input.remaining(),
                    T::KIND.name()
                ),
            ));
        }
        Ok(record)
    }
}

/// Runs a third-party decoding step, turning a panic (a decoder bug on hostile bytes) into an
/// error so one bad record can never take the process down.
fn guard_panics<R>(
    f: impl FnOnce() -> Result<R, apache_avro::Error>,
) -> Result<R, Box<dyn std::error::Error>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Box::new(e)),
        Err(_) => Err("the Avro decoder panicked on this input".into()),
    }
}

/// A `Read` over a slice that remembers whether the decoder asked for bytes past the end, which
/// is how a truncated datum is told from a malformed one.
struct SliceReader<'a> {
    rest: &'a [u8],
    hit_end: bool,
}

impl<'a> SliceReader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        SliceReader {
            rest,
            hit_end: false,
        }
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn classify(&self, message: String) -> DecodeError {
        if self.hit_end {
            DecodeError::new(ErrorCode::Truncated, format!("datum ends early: {message}"))
        } else {
            DecodeError::new(ErrorCode::Malformed, message)
        }
    }
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.rest.is_empty() {
            self.hit_end = true;
            return Ok(0);
        }
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

/// Avro single-object encoding: `C3 01`, the 8-byte little-endian fingerprint, the datum.
pub struct SingleObjectCodec<T> {
    readers: AvroReaders<T>,
}

impl<T: Record> Codec<T> for SingleObjectCodec<T> {
    fn kind(&self) -> CodecKind {
        CodecKind::AvroSingleObject
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&self.readers.current_fingerprint.to_le_bytes());
        self.readers.encode_datum(value, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        if let Some(magic) = bytes.get(..2) {
            if magic != SINGLE_OBJECT_MAGIC {
                return Err(DecodeError::new(
                    ErrorCode::BadMagic,
                    format!(
                        "expected single-object marker C3 01, found {:02X} {:02X}",
                        magic[0], magic[1]
                    ),
                ));
            }
        }
        let Some(header) = bytes.get(..10) else {
            return Err(DecodeError::new(
                ErrorCode::Truncated,
                format!(
                    "{} bytes is shorter than the 10-byte single-object header",
                    bytes.len()
                ),
            ));
        };
        let fp = u64::from_le_bytes(header[2..10].try_into().expect("8 bytes"));
        if !self.readers.knows(fp) {
            return Err(DecodeError::new(
                ErrorCode::UnknownFingerprint,
                format!(
                    "no known {} schema has fingerprint {fp:016x}; add the writer's schema to \
                     writer_schemas",
                    T::KIND.name()
                ),
            ));
        }
        self.readers.decode_datum(fp, &bytes[10..])
    }
}

/// Confluent wire format: `00`, the 4-byte big-endian schema id, the datum.
pub struct ConfluentCodec<T> {
    readers: AvroReaders<T>,
    write_id: Option<u32>,
    /// Every id seen: its writer schema's fingerprint, or why it cannot be used (not in the
    /// registry, not Avro, not resolvable into the current schema).
    ids: HashMap<u32, Result<u64, String>>,
}

/// Most writer schemas a codec learns from a registry (each is parsed once and kept for the
/// life of the process): far beyond the versions a topic sees, small enough to bound memory.
pub const MAX_LEARNED_SCHEMAS: usize = 4096;

/// The schema id of a Confluent-framed value (`00` + 4-byte big-endian id), if it has one.
pub fn confluent_schema_id(value: &[u8]) -> Option<u32> {
    match value {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Where writer schemas come from for Confluent ids a codec has not seen: a Schema Registry.
/// The engine asks; a driver implements it (HTTP is not the engine's business).
pub trait SchemaSource: Send {
    /// The writer schema registered under `id`. Called once per id a codec has not seen.
    fn lookup(&mut self, id: u32) -> SchemaLookup;
}

/// Learns the writer schema of `value`'s Confluent id from `source` when `codec` has never
/// seen that id. Returns the id it learned, if any (found or missing: either way decoding
/// again gives the final answer).
///
/// # Errors
/// The source has no answer yet: the id and why. The record must wait.
pub fn learn_schema<T>(
    codec: &mut dyn Codec<T>,
    source: &mut dyn SchemaSource,
    value: &[u8],
) -> Result<Option<u32>, (u32, String)> {
    let Some(id) = codec.unseen_schema_id(value) else {
        return Ok(None);
    };
    match source.lookup(id) {
        SchemaLookup::Found(text) => codec.learn(id, Ok(&text)),
        SchemaLookup::Missing(why) => codec.learn(id, Err(why)),
        SchemaLookup::Waiting(reason) => return Err((id, reason)),
    };
    Ok(Some(id))
}

/// What a [`SchemaSource`] knows of an id.
#[derive(Debug, Clone, PartialEq)]
pub enum SchemaLookup {
    /// The schema's text (Avro JSON).
    Found(std::sync::Arc<str>),
    /// The registry answered: there is no such id (or it is not an Avro schema). Records
    /// framed with it go to the DLQ as `unknown_schema_id`, with this reason.
    Missing(String),
    /// No answer yet (being fetched, or the registry is unreachable: the reason). Records
    /// framed with it wait; nothing is decided for them.
    Waiting(String),
}

impl<T: Record> Codec<T> for ConfluentCodec<T> {
    fn kind(&self) -> CodecKind {
        CodecKind::AvroConfluent
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let Some(id) = self.write_id else {
            return Err(EncodeError {
                kind: T::KIND.name(),
                message: "no schema id to write with: the schema is not registered".into(),
            });
        };
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        self.readers.encode_datum(value, out)
    }

    fn unseen_schema_id(&self, value: &[u8]) -> Option<u32> {
        confluent_schema_id(value).filter(|id| !self.ids.contains_key(id))
    }

    fn schema_of(&self, id: u32) -> Option<u64> {
        self.ids.get(&id).and_then(|r| r.as_ref().ok()).copied()
    }

    fn learn(&mut self, id: u32, schema: Result<&str, String>) -> Option<u64> {
        let learned = schema.and_then(|text| {
            if self.readers.resolving.len() >= MAX_LEARNED_SCHEMAS {
                return Err(format!(
                    "more than {MAX_LEARNED_SCHEMAS} writer schemas learned; segloop keeps no more"
                ));
            }
            let schema = Schema::parse_str(text)
                .map_err(|e| format!("the registry's schema {id} is not valid Avro: {e}"))?;
            let known = fingerprint(&schema);
            if self.readers.knows(known) {
                return Ok(known);
            }
            // Kept for the life of the process, like the built-in schemas (bounded above).
            let schema: &'static Schema = Box::leak(Box::new(schema));
            self.readers.check_resolves(schema)?;
            self.readers.add_writer(schema)
        });
        let fp = learned.as_ref().ok().copied();
        self.ids.insert(id, learned);
        fp
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        match bytes.first() {
            None => {
                return Err(DecodeError::new(
                    ErrorCode::Truncated,
                    "empty record; the Confluent header is 5 bytes",
                ))
            }
            Some(&b) if b != CONFLUENT_MAGIC => {
                return Err(DecodeError::new(
                    ErrorCode::BadMagic,
                    format!("expected Confluent magic byte 00, found {b:02X}"),
                ))
            }
            Some(_) => {}
        }
        let Some(header) = bytes.get(..5) else {
            return Err(DecodeError::new(
                ErrorCode::Truncated,
                format!(
                    "{} bytes is shorter than the 5-byte Confluent header",
                    bytes.len()
                ),
            ));
        };
        let id = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
        match self.ids.get(&id) {
            Some(Ok(fp)) => self.readers.decode_datum(*fp, &bytes[5..]),
            Some(Err(why)) => Err(DecodeError::new(
                ErrorCode::UnknownSchemaId,
                format!("schema id {id} cannot be used: {why}"),
            )),
            None => Err(DecodeError::new(
                ErrorCode::UnknownSchemaId,
                format!(
                    "schema id {id} is not configured for {} records; map it in schema_ids \
                     or set [schema_registry]",
                    T::KIND.name()
                ),
            )),
        }
    }
}

/// A bare Avro datum, written with the configured writer schema.
pub struct RawAvroCodec<T> {
    readers: AvroReaders<T>,
    writer_fp: u64,
}

impl<T: Record> Codec<T> for RawAvroCodec<T> {
    fn kind(&self) -> CodecKind {
        CodecKind::AvroRaw
    }

    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.readers.encode_datum(value, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        self.readers.decode_datum(self.writer_fp, bytes)
    }
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
