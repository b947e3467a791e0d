//! The telemetry hot path: a zero-copy reader of the current `TelemetryEvent` datum.
//!
//! A profile of `segloop bench e2e` showed the serde decoder (apache-avro `read_deser` into
//! owned `String`s and `BTreeMap`s) as the largest cost per record. Records written with the
//! current schema (the common case: the framing header names it) are read here straight from
//! the fetch buffer into borrowed slices; every other record takes the general codec. A
//! property test checks both agree on every input, valid or not.

use smallvec::SmallVec;

use super::{check_key, Codec, CodecKind, DecodeError, ErrorCode, Record, SchemaSettings};
use crate::model::TelemetryEvent;

/// A telemetry record borrowed from its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryView<'a> {
    pub segment: &'a str,
    pub ts_ms: i64,
    pub measurements: SmallVec<[(&'a str, f64); 4]>,
    pub labels: SmallVec<[(&'a str, &'a str); 2]>,
    pub event_id: Option<&'a str>,
}

impl TelemetryView<'_> {
    pub fn to_owned_event(&self) -> TelemetryEvent {
        TelemetryEvent {
            segment: self.segment.to_string(),
            ts_ms: self.ts_ms,
            measurements: self
                .measurements
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            event_id: self.event_id.map(str::to_string),
        }
    }
}

struct Cursor<'a> {
    rest: &'a [u8],
}

fn truncated(what: &str) -> DecodeError {
    DecodeError::new(ErrorCode::Truncated, format!("datum ends early: {what}"))
}

fn malformed(what: String) -> DecodeError {
    DecodeError::new(ErrorCode::Malformed, what)
}

impl<'a> Cursor<'a> {
    #[inline]
    fn long(&mut self) -> Result<i64, DecodeError> {
        // One byte: lengths, counts, union indexes (most of a record's varints).
        if let Some((&b, rest)) = self.rest.split_first() {
            if b & 0x80 == 0 {
                self.rest = rest;
                return Ok(i64::from(b >> 1) ^ -i64::from(b & 1));
            }
        }
        let mut value: u64 = 0;
        for (i, &b) in self.rest.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        if self.rest.len() < 10 {
            Err(truncated("inside a varint"))
        } else {
            Err(malformed("a varint is longer than 10 bytes".into()))
        }
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.long()?;
        if len < 0 {
            return Err(malformed(format!("negative length {len}")));
        }
        let len = len as usize;
        if len > super::MAX_AVRO_ALLOCATION {
            return Err(malformed(format!(
                "length {len} is above the {}-byte limit",
                super::MAX_AVRO_ALLOCATION
            )));
        }
        if len > self.rest.len() {
            return Err(truncated("inside a string"));
        }
        let (s, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(s)
    }

    #[inline]
    fn string(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.bytes()?;
        if b.is_ascii() {
            // SAFETY: ASCII bytes are valid UTF-8. Segment, measurement and label names are
            // ASCII almost always, and `is_ascii` checks a word at a time where the general
            // validation walked short strings byte by byte (7% of the loop at 2,000 segments).
            return Ok(unsafe { std::str::from_utf8_unchecked(b) });
        }
        std::str::from_utf8(b).map_err(|e| malformed(format!("string is not UTF-8: {e}")))
    }

    #[inline]
    fn double(&mut self) -> Result<f64, DecodeError> {
        let Some((b, rest)) = self.rest.split_first_chunk::<8>() else {
            return Err(truncated("inside a double"));
        };
        self.rest = rest;
        Ok(f64::from_le_bytes(*b))
    }

    /// Map blocks: `count` items (a negative count is followed by the block's byte size).
    fn map<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
        mut push: impl FnMut(T),
    ) -> Result<(), DecodeError> {
        loop {
            let count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            let n = if count < 0 {
                let _block_bytes = self.long()?;
                count.unsigned_abs()
            } else {
                count as u64
            };
            for _ in 0..n {
                push(item(self)?);
            }
        }
    }
}

/// Reads a datum written with the current telemetry schema.
///
/// # Errors
/// `truncated`, `malformed` or `trailing_bytes`, as the general decoder classifies them.
pub fn read_telemetry(bytes: &[u8]) -> Result<TelemetryView<'_>, DecodeError> {
    let mut c = Cursor { rest: bytes };
    let segment = c.string()?;
    let ts_ms = c.long()?;
    let mut measurements = SmallVec::new();
    c.map(
        |c| Ok((c.string()?, c.double()?)),
        |kv| measurements.push(kv),
    )?;
    let mut labels = SmallVec::new();
    c.map(|c| Ok((c.string()?, c.string()?)), |kv| labels.push(kv))?;
    let event_id = match c.long()? {
        0 => None,
        1 => Some(c.string()?),
        i => return Err(malformed(format!("union index {i} out of range"))),
    };
    if !c.rest.is_empty() {
        return Err(DecodeError::new(
            ErrorCode::TrailingBytes,
            format!(
                "{} bytes remain after a complete telemetry datum",
                c.rest.len()
            ),
        ));
    }
    // Avro maps keep the last value of a repeated key, like the general decoder's BTreeMap.
    dedup_last(&mut measurements);
    dedup_last(&mut labels);
    super::check_telemetry_caps(
        measurements.len(),
        labels.len(),
        labels.iter().map(|(k, v)| k.len() + v.len()).sum(),
    )
    .map_err(|m| DecodeError::new(ErrorCode::InvalidValue, m))?;
    Ok(TelemetryView {
        segment,
        ts_ms,
        measurements,
        labels,
        event_id,
    })
}

/// Keeps the last entry of each key, in their order: O(n) for the usual handful of entries,
/// O(n log n) for many (a hostile record may repeat keys by the hundred thousand).
fn dedup_last<K: Ord + Copy, V: Copy, const N: usize>(v: &mut SmallVec<[(K, V); N]>)
where
    [(K, V); N]: smallvec::Array<Item = (K, V)>,
{
    if v.len() < 2 {
        return;
    }
    if v.len() <= 8 {
        let mut i = 0;
        while i < v.len() {
            if v[i + 1..].iter().any(|(k, _)| *k == v[i].0) {
                v.remove(i);
            } else {
                i += 1;
            }
        }
        return;
    }
    // Sort positions by (key, position): the last of each run of equal keys survives.
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_unstable_by(|&a, &b| v[a].0.cmp(&v[b].0).then(a.cmp(&b)));
    let mut keep = vec![false; v.len()];
    for (i, &at) in order.iter().enumerate() {
        if order.get(i + 1).is_none_or(|&next| v[next].0 != v[at].0) {
            keep[at] = true;
        }
    }
    let mut at = 0;
    v.retain(|_| {
        at += 1;
        keep[at - 1]
    });
}

/// A decoded telemetry record: borrowed on the fast path, owned otherwise.
#[derive(Debug, Clone, PartialEq)]
pub enum Telemetry<'a> {
    View(TelemetryView<'a>),
    Owned(TelemetryEvent),
}

impl Telemetry<'_> {
    pub fn segment(&self) -> &str {
        match self {
            Telemetry::View(v) => v.segment,
            Telemetry::Owned(e) => &e.segment,
        }
    }

    pub fn ts_ms(&self) -> i64 {
        match self {
            Telemetry::View(v) => v.ts_ms,
            Telemetry::Owned(e) => e.ts_ms,
        }
    }

    /// Measurements as (name, value).
    pub fn measurements(&self) -> SmallVec<[(&str, f64); 4]> {
        match self {
            Telemetry::View(v) => v.measurements.iter().copied().collect(),
            Telemetry::Owned(e) => e
                .measurements
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect(),
        }
    }

    pub fn has_labels(&self) -> bool {
        match self {
            Telemetry::View(v) => !v.labels.is_empty(),
            Telemetry::Owned(e) => !e.labels.is_empty(),
        }
    }

    /// Whether the event's labels are exactly `labels` (no copy made). Repeated keys on the
    /// wire never equal a map (the owned event would keep one of them): they compare unequal.
    pub fn labels_equal(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            Telemetry::View(v) => {
                v.labels.len() == labels.len()
                    && v.labels
                        .iter()
                        .all(|(k, val)| labels.get(*k).is_some_and(|x| x == val))
                    && v.labels
                        .iter()
                        .enumerate()
                        .all(|(i, (k, _))| v.labels[..i].iter().all(|(j, _)| j != k))
            }
            Telemetry::Owned(e) => e.labels == *labels,
        }
    }

    pub fn into_owned(self) -> TelemetryEvent {
        match self {
            Telemetry::View(v) => v.to_owned_event(),
            Telemetry::Owned(e) => e,
        }
    }
}

/// The telemetry decoder of the runtime: the fast path for records whose framing names the
/// current schema, the general codec for everything else.
pub struct TelemetryDecoder {
    general: Box<dyn Codec<TelemetryEvent>>,
    fast: FastPath,
}

/// Which records are current-schema datums, read by the fast path.
enum FastPath {
    Never,
    /// Records starting with these header bytes.
    Prefix(Vec<u8>),
    /// Confluent records whose id names the current schema (configured, or learned from a
    /// registry: a producer registers the same schema under ids of its own).
    ConfluentIds(SmallVec<[u32; 4]>),
}

impl FastPath {
    #[inline]
    fn datum<'a>(&self, value: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            FastPath::Never => None,
            FastPath::Prefix(p) => value.strip_prefix(p.as_slice()),
            FastPath::ConfluentIds(ids) => {
                let id = super::confluent_schema_id(value)?;
                ids.contains(&id).then(|| &value[5..])
            }
        }
    }
}

impl TelemetryDecoder {
    /// # Errors
    /// As [`super::build_codec`].
    pub fn new(kind: CodecKind, settings: &SchemaSettings) -> Result<Self, String> {
        let general = super::build_codec::<TelemetryEvent>(kind, settings)?;
        let current = crate::schema::fingerprint(crate::schema::SchemaKind::Telemetry.schema());
        let fast = match kind {
            CodecKind::AvroSingleObject => {
                let mut p = vec![0xC3, 0x01];
                p.extend_from_slice(&current.to_le_bytes());
                FastPath::Prefix(p)
            }
            CodecKind::AvroConfluent => {
                FastPath::ConfluentIds(settings.schema_id.into_iter().collect())
            }
            CodecKind::AvroRaw if settings.raw_writer_schema.is_none() => {
                FastPath::Prefix(Vec::new())
            }
            _ => FastPath::Never,
        };
        Ok(TelemetryDecoder { general, fast })
    }

    /// See [`super::learn_schema`]; an id of the current schema joins the fast path.
    ///
    /// # Errors
    /// As `learn_schema`: no answer yet for the id.
    pub fn learn_schema(
        &mut self,
        source: &mut dyn super::SchemaSource,
        value: Option<&[u8]>,
    ) -> Result<bool, (u32, String)> {
        let Some(value) = value else {
            return Ok(false);
        };
        let Some(id) = super::learn_schema(self.general.as_mut(), source, value)? else {
            return Ok(false);
        };
        if let (Some(fp), FastPath::ConfluentIds(ids)) =
            (self.general.schema_of(id), &mut self.fast)
        {
            let current = crate::schema::fingerprint(crate::schema::SchemaKind::Telemetry.schema());
            if fp == current && !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(true)
    }

    /// A record's event time like [`TelemetryDecoder::event_time`], learning its schema id
    /// from `source` first when it is new. `Err`: no answer for the id yet.
    ///
    /// # Errors
    /// As [`TelemetryDecoder::learn_schema`].
    pub fn event_time_learning(
        &mut self,
        source: &mut dyn super::SchemaSource,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Option<i64>, (u32, String)> {
        if let Some(ts) = self.fast_event_time(value) {
            return Ok(Some(ts));
        }
        self.learn_schema(source, value)?;
        Ok(self.event_time(key, value))
    }

    /// A record's event time, read without decoding the rest (a merge key: a replay orders
    /// records by it before decoding them). `None` for a record that does not decode.
    pub fn event_time(&self, key: Option<&[u8]>, value: Option<&[u8]>) -> Option<i64> {
        self.fast_event_time(value)
            .or_else(|| self.decode(key, value).ok().map(|e| e.ts_ms()))
    }

    /// The event time of a current-schema record, read off its first fields; `None` for any
    /// other record (which this never decodes: it is for hints, cheap or nothing).
    #[inline]
    pub fn fast_event_time(&self, value: Option<&[u8]>) -> Option<i64> {
        let datum = self.fast.datum(value?)?;
        let mut c = Cursor { rest: datum };
        c.bytes().ok()?;
        c.long().ok()
    }

    /// Decodes, validates and checks the key rule, like [`super::decode_record`].
    ///
    /// # Errors
    /// The record's error, with its stable code.
    pub fn decode<'a>(
        &self,
        key: Option<&[u8]>,
        value: Option<&'a [u8]>,
    ) -> Result<Telemetry<'a>, DecodeError> {
        let value = value.ok_or_else(|| {
            DecodeError::new(ErrorCode::Truncated, "record has no value (tombstone)")
        })?;
        let record = match self.fast.datum(value) {
            Some(datum) => Telemetry::View(read_telemetry(datum)?),
            None => Telemetry::Owned(self.general.decode(value)?),
        };
        match &record {
            Telemetry::View(v) => {
                if v.segment.is_empty() || v.segment.len() > super::MAX_SEGMENT_LEN || v.ts_ms < 0 {
                    // The general rules word the message.
                    v.to_owned_event()
                        .validate()
                        .map_err(|m| DecodeError::new(ErrorCode::InvalidValue, m))?;
                }
            }
            Telemetry::Owned(e) => e
                .validate()
                .map_err(|m| DecodeError::new(ErrorCode::InvalidValue, m))?,
        }
        check_key(key, record.segment())?;
        Ok(record)
    }
}
