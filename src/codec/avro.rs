//! The Avro codecs: single-object, Confluent (ids learned from a registry) and raw datums,
//! with bounded allocation and panics of the Avro library turned into errors.

use super::*;

/// A reader of Avro datums into `T` for every writer schema we know, by fingerprint.
pub(super) struct AvroReaders<T> {
    pub(super) current_fingerprint: u64,
    pub(super) writer: GenericDatumWriter<'static>,
    /// Writer = reader: serde straight from the bytes (the fast path).
    pub(super) fast: GenericDatumReader<'static>,
    /// Other writer versions: decode with the writer schema, then resolve into the current one.
    pub(super) resolving: HashMap<u64, GenericDatumReader<'static>>,
    pub(super) reader_schema: &'static Schema,
    pub(super) _t: PhantomData<fn() -> T>,
}

impl<T: Record> AvroReaders<T> {
    pub(super) fn new() -> Result<Self, String> {
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
    pub(super) fn add_writer(&mut self, schema: &'static Schema) -> Result<u64, String> {
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
    pub(super) fn check_resolves(&self, schema: &Schema) -> Result<(), String> {
        apache_avro::schema_compatibility::SchemaCompatibility::can_read(schema, self.reader_schema)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "the writer schema does not resolve into the current {} schema: {e}",
                    T::KIND.name()
                )
            })
    }

    pub(super) fn knows(&self, fp: u64) -> bool {
        fp == self.current_fingerprint || self.resolving.contains_key(&fp)
    }

    pub(super) fn encode_datum(&self, value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.writer
            .write_ser(out, value)
            .map(|_| ())
            .map_err(|e| EncodeError {
                kind: T::KIND.name(),
                message: e.to_string(),
            })
    }

    /// Decodes one datum written with the schema of fingerprint `fp` (which must be known).
    pub(super) fn decode_datum(&self, fp: u64, datum: &[u8]) -> Result<T, DecodeError> {
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
pub(super) fn guard_panics<R>(
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
pub(super) struct SliceReader<'a> {
    pub(super) rest: &'a [u8],
    pub(super) hit_end: bool,
}

impl<'a> SliceReader<'a> {
    pub(super) fn new(rest: &'a [u8]) -> Self {
        SliceReader {
            rest,
            hit_end: false,
        }
    }

    pub(super) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(super) fn classify(&self, message: String) -> DecodeError {
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
    pub(super) readers: AvroReaders<T>,
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
    pub(super) readers: AvroReaders<T>,
    pub(super) write_id: Option<u32>,
    /// Every id seen: its writer schema's fingerprint, or why it cannot be used (not in the
    /// registry, not Avro, not resolvable into the current schema).
    pub(super) ids: HashMap<u32, Result<u64, String>>,
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
    pub(super) readers: AvroReaders<T>,
    pub(super) writer_fp: u64,
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
