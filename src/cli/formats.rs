//! `segloop decode`, `encode` and `schemas`: the wire formats from the command line.

use super::*;

pub(super) fn read_input(file: Option<&Path>) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match file {
        Some(p) => buf = std::fs::read(p)?,
        None => {
            std::io::stdin().read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}

/// `segloop decode`: exit 0 when every record decoded, 1 when any did not, 2 on bad usage.
pub fn decode(args: &DecodeArgs) -> ExitCode {
    match args.codec.schema.kind() {
        SchemaKind::Telemetry => decode_as::<TelemetryEvent>(args),
        SchemaKind::Command => decode_as::<RemediationCommand>(args),
        SchemaKind::Outcome => decode_as::<RemediationOutcome>(args),
        SchemaKind::Decision => decode_as::<DecisionRecord>(args),
    }
}

/// A codec and the bytes it is to read.
pub(super) type CodecInput<T> = (Box<dyn Codec<T>>, Vec<u8>);

/// The codec the flags describe and the input bytes; the `Err` is the exit code to return.
pub(super) fn codec_and_input<T: Record>(
    codec: &CodecArgs,
    file: Option<&Path>,
) -> Result<CodecInput<T>, ExitCode> {
    let built = codec
        .settings()
        .and_then(|s| build_codec::<T>(codec.codec.into(), &s))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_USAGE)
        })?;
    let input = read_input(file).map_err(|e| {
        eprintln!("error: cannot read input: {e}");
        ExitCode::from(EXIT_USAGE)
    })?;
    Ok((built, input))
}

pub(super) fn decode_as<T: Record + Serialize>(args: &DecodeArgs) -> ExitCode {
    let (codec, input) = match codec_and_input::<T>(&args.codec, args.file.as_deref()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let records: Vec<(usize, Result<Vec<u8>, String>)> = if args.raw {
        vec![(1, Ok(input))]
    } else {
        input
            .lines()
            .map_while(Result::ok)
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let cleaned: String = l.split_whitespace().collect();
                (
                    i + 1,
                    hex::decode(&cleaned).map_err(|e| format!("not hex: {e}")),
                )
            })
            .collect()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0;
    for (line, bytes) in records {
        let result = bytes.and_then(|b| decode_one(codec.as_ref(), args.key.as_deref(), &b));
        match result {
            Ok(json) => {
                let _ = writeln!(out, "{json}");
            }
            Err(message) => {
                failed += 1;
                let _ = out.flush();
                eprintln!("error: record {line}: {message}");
            }
        }
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

pub(super) fn decode_one<T: Record + Serialize>(
    codec: &dyn Codec<T>,
    key: Option<&str>,
    bytes: &[u8],
) -> Result<String, String> {
    let record = match key {
        Some(k) => decode_record(codec, Some(k.as_bytes()), Some(bytes)),
        None => codec.decode(bytes),
    }
    .map_err(|e| e.to_string())?;
    serde_json::to_string(&record).map_err(|e| e.to_string())
}

/// `segloop encode`: JSON lines in, hex lines out.
pub fn encode(args: &EncodeArgs) -> ExitCode {
    match args.codec.schema.kind() {
        SchemaKind::Telemetry => encode_as::<TelemetryEvent>(args),
        SchemaKind::Command => encode_as::<RemediationCommand>(args),
        SchemaKind::Outcome => encode_as::<RemediationOutcome>(args),
        SchemaKind::Decision => encode_as::<DecisionRecord>(args),
    }
}

pub(super) fn encode_as<T: Record>(args: &EncodeArgs) -> ExitCode {
    let (codec, input) = match codec_and_input::<T>(&args.codec, args.file.as_deref()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut failed = 0;
    for (i, line) in input.lines().map_while(Result::ok).enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut out = Vec::new();
        let result = serde_json::from_str::<T>(&line)
            .map_err(|e| format!("not a {} record: {e}", T::KIND.name()))
            .and_then(|r| codec.encode(&r, &mut out).map_err(|e| e.to_string()));
        match result {
            Ok(()) => println!("{}", hex::encode(&out)),
            Err(e) => {
                failed += 1;
                eprintln!("error: line {}: {e}", i + 1);
            }
        }
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `segloop schemas`: name, fingerprint (as in the single-object header), canonical form.
pub fn schemas(args: &SchemasArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // A closed pipe (`segloop schemas | head`) ends the listing quietly.
    let _ = print_schemas(&mut out, args.full);
    ExitCode::SUCCESS
}

pub(super) fn print_schemas(out: &mut impl Write, full: bool) -> std::io::Result<()> {
    for kind in SchemaKind::ALL {
        for (i, schema) in kind.known_versions().iter().enumerate() {
            let fp = fingerprint(schema);
            let version = if i == 0 { "current" } else { "older" };
            writeln!(
                out,
                "{:<10} {:<8} crc64-avro=0x{:016x} single-object-header={}",
                kind.name(),
                version,
                fp,
                hex::encode([&[0xC3, 0x01][..], &fp.to_le_bytes()].concat())
            )?;
            writeln!(out, "  canonical: {}", parsing_canonical_form(schema))?;
        }
        if full {
            writeln!(out, "{}", kind.source())?;
        }
    }
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head -1`) ends the output quietly.
pub(super) fn print_quietly(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            ExitCode::from(1)
        }
    }
}
