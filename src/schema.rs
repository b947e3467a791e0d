//! The Avro schemas of the wire contract, embedded from `schemas/` at build time, with their
//! CRC-64-AVRO (Rabin) fingerprints and the older versions a reader still accepts.
//!
//! Parsed schemas are leaked into `'static` on first use: there are a handful of them per
//! process and the decoders keep references to them for the life of the process.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use apache_avro::Schema;

/// Which record of the wire contract a schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemaKind {
    Telemetry,
    Command,
    Outcome,
    Decision,
}

impl SchemaKind {
    pub const ALL: [SchemaKind; 4] = [
        SchemaKind::Telemetry,
        SchemaKind::Command,
        SchemaKind::Outcome,
        SchemaKind::Decision,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchemaKind::Telemetry => "telemetry",
            SchemaKind::Command => "command",
            SchemaKind::Outcome => "outcome",
            SchemaKind::Decision => "decision",
        }
    }

    pub fn from_name(name: &str) -> Option<SchemaKind> {
        SchemaKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The `.avsc` text of the current version (what segloop writes and reads into).
    pub fn source(self) -> &'static str {
        match self {
            SchemaKind::Telemetry => include_str!("../schemas/telemetry.avsc"),
            SchemaKind::Command => include_str!("../schemas/command.avsc"),
            SchemaKind::Outcome => include_str!("../schemas/outcome.avsc"),
            SchemaKind::Decision => include_str!("../schemas/decision.avsc"),
        }
    }

    /// Earlier versions of this schema that segloop still decodes (`schemas/history/`).
    pub fn history_sources(self) -> &'static [&'static str] {
        match self {
            SchemaKind::Telemetry => &[include_str!("../schemas/history/telemetry.v1.avsc")],
            _ => &[],
        }
    }

    /// The current schema, parsed once per process.
    pub fn schema(self) -> &'static Schema {
        static PARSED: OnceLock<BTreeMap<SchemaKind, &'static Schema>> = OnceLock::new();
        PARSED.get_or_init(|| {
            SchemaKind::ALL
                .into_iter()
                .map(|kind| {
                    let schema = Schema::parse_str(kind.source())
                        .expect("embedded schema should parse (checked by tests)");
                    (kind, &*Box::leak(Box::new(schema)))
                })
                .collect()
        })[&self]
    }

    /// Every schema version this build knows for the kind, current first.
    pub fn known_versions(self) -> &'static [&'static Schema] {
        static KNOWN: OnceLock<BTreeMap<SchemaKind, Vec<&'static Schema>>> = OnceLock::new();
        &KNOWN.get_or_init(|| {
            SchemaKind::ALL
                .into_iter()
                .map(|kind| {
                    let mut all = vec![kind.schema()];
                    for src in kind.history_sources() {
                        let schema = Schema::parse_str(src).expect("embedded schema should parse");
                        all.push(&*Box::leak(Box::new(schema)));
                    }
                    (kind, all)
                })
                .collect()
        })[&self]
    }
}

/// CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form, as a number. The
/// single-object header carries it little-endian.
pub fn fingerprint(schema: &Schema) -> u64 {
    use apache_avro::rabin::Rabin;
    use digest::Digest;
    let bytes = Rabin::digest(parsing_canonical_form(schema).as_bytes());
    let arr: [u8; 8] = bytes
        .as_slice()
        .try_into()
        .expect("Rabin fingerprint should be 8 bytes");
    u64::from_le_bytes(arr)
}

/// The schema's Parsing Canonical Form as the Avro specification defines it.
///
/// apache-avro 0.22 keeps a primitive that carried a logical type as `{"type":"long"}`, where the
/// specification's [PRIMITIVES] rule (and the Java, Python and fastavro implementations) write
/// `"long"`; fingerprints computed from its form would not match any other producer's. Every
/// object of exactly that shape in a canonical form is such a primitive (PCF keeps only the
/// `name`, `type`, `fields`, `symbols`, `items`, `values` and `size` attributes), so rewriting it
/// is exact.
pub fn parsing_canonical_form(schema: &Schema) -> String {
    let mut form = schema.canonical_form();
    for primitive in [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ] {
        form = form.replace(
            &format!(r#"{{"type":"{primitive}"}}"#),
            &format!(r#""{primitive}""#),
        );
    }
    form
}

/// Reads and parses a schema file supplied by the user (an extra writer schema).
pub fn load_schema_file(path: &Path) -> Result<&'static Schema, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read schema file {}: {e}", path.display()))?;
    let schema = Schema::parse_str(&text).map_err(|e| {
        format!(
            "schema file {} is not a valid Avro schema: {e}",
            path.display()
        )
    })?;
    Ok(Box::leak(Box::new(schema)))
}
