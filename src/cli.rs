//! The `segloop` command line. Parsing and the small tool subcommands live here; the long-running
//! subcommands call into their own modules.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::codec::{build_codec, decode_record, Codec, CodecKind, Record, SchemaSettings};
use crate::config::{Config, Sources};
use crate::model::{DecisionRecord, RemediationCommand, RemediationOutcome, TelemetryEvent};
use crate::schema::{fingerprint, parsing_canonical_form, SchemaKind};

/// Exit code for bad usage or a bad config.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "segloop",
    version,
    about = "Closes micro-segmentation feedback loops over Kafka",
    long_about = "segloop watches telemetry per segment in event-time windows, evaluates \
                  policies, emits remediation commands for exactly the segment in trouble, \
                  verifies the fix and retries or escalates."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the loop against Kafka brokers
    #[command(
        after_help = "Examples:\n  segloop run -c config/segloop.toml\n  segloop run -c config/segloop.toml --set kafka.bootstrap_servers=kafka:9092\n  SEGLOOP__KAFKA__GROUP_ID=blue segloop run -c config/segloop.toml\n\nSIGTERM/SIGINT stop gracefully (again: at once); SIGHUP reloads the policies.\n\nExit codes: 0 ok, 1 runtime failure, 2 usage or config error."
    )]
    Run(ConfigArgs),
    /// Run the whole loop on an embedded Kafka with a synthetic fleet and scripted faults
    #[command(
        after_help = "Examples:\n  segloop demo\n  segloop demo --duration 120 --seed 7 --summary demo.json\n\nExit codes: 0 every scripted incident went as expected, 1 one did not (or a failure), 2 usage error."
    )]
    Demo(DemoArgs),
    /// Replay a telemetry topic through the policies and report what they would have done
    #[command(
        after_help = "Examples:\n  segloop backtest --embedded-sample --report r.json --html r.html\n  segloop backtest -c config/segloop.toml --from -6h --report r.json\n  segloop backtest -c config/segloop.toml --policies new.toml --compare config/policies.toml --report r.json\n\nExit codes: 0 ok, 1 runtime failure, 2 usage or config error."
    )]
    Backtest(BacktestArgs),
    /// The reference actuator: run a handler per command, write outcomes
    #[command(
        after_help = "Examples:\n  segloop actuator -c config/segloop.toml\n  segloop actuator -c config/segloop.toml --set actuator.webhook=http://deployer:8080/segloop\n\nExit codes: 0 ok, 1 runtime failure, 2 usage or config error."
    )]
    Actuator(ConfigArgs),
    /// Benchmarks that print key=value figures
    #[command(
        after_help = "Examples:\n  segloop bench window --segments 100000 --events 10000000\n  segloop bench delivery --bootstrap 127.0.0.1:9092 --events 1000000\n\nExit codes: 0 ok, 1 runtime failure, 2 usage or config error."
    )]
    Bench(BenchArgs),
    /// Validate a config file and print the effective configuration
    #[command(
        after_help = "Examples:\n  segloop check-config config/segloop.toml\n  segloop check-config -c config/segloop.toml --partitions 12\n  segloop check-config config/segloop.toml --set windows.size=5s\n\nExit codes: 0 valid (warnings on stderr), 2 invalid (the field and the fix on stderr)."
    )]
    CheckConfig(CheckConfigArgs),
    /// Decode records (hex per line, or raw bytes) and print them as JSON lines
    #[command(
        after_help = "Examples:\n  echo c301a432... | segloop decode\n  kcat -C -b kafka:9092 -t segloop.telemetry -e -f '%s\\n' | segloop decode --codec json\n  segloop decode --raw --key eu-1/x < record.bin\n\nExit codes: 0 every record decoded, 1 some did not (each printed with its error code), 2 usage error."
    )]
    Decode(DecodeArgs),
    /// Encode JSON lines into records, printed as hex per line
    #[command(
        after_help = "Examples:\n  segloop encode < events.jsonl\n  segloop encode --codec avro-confluent --schema command commands.jsonl\n\nExit codes: 0 ok, 1 runtime failure, 2 usage or config error."
    )]
    Encode(EncodeArgs),
    /// Print the Avro schemas and their fingerprints
    #[command(after_help = "Examples:\n  segloop schemas\n  segloop schemas --full")]
    Schemas(SchemasArgs),
    /// Test policy files against chosen inputs and expected effects
    #[command(
        after_help = "Example:\n  segloop policy test config/policies.test.toml config/demo-policies.test.toml\n\nExit codes: 0 every case passed, 1 a case failed (its diff is printed), 2 a test file is invalid."
    )]
    Policy(PolicyArgs),
    /// Print a topic's records decoded, as JSON lines (dead letters with their error headers)
    #[command(
        after_help = "Examples:\n  segloop tail -c config/segloop.toml --topic dlq\n  segloop tail -c config/segloop.toml --topic actions --from -10m --follow\n  segloop tail -c config/segloop.toml --topic telemetry --key eu-1/checkout/api --max 20\n\nExit codes: 0 read, 1 the topic cannot be read, 2 usage or config error."
    )]
    Tail(TailArgs),
    /// Dead letters: send them back to their source topic once their cause is fixed
    #[command(
        after_help = "Examples:\n  segloop dlq replay -c config/segloop.toml --code unknown_fingerprint --dry-run\n  segloop dlq replay -c config/segloop.toml --code unknown_fingerprint --from -2h\n\nRecords go back byte for byte with their original key (truncated dead letters cannot).\nReplaying twice sends them twice: count with --dry-run first.\n\nExit codes: 0 done, 1 the DLQ cannot be read or a record not sent, 2 usage or config error."
    )]
    Dlq(DlqArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Examples:\n  segloop completions bash > /etc/bash_completion.d/segloop\n  segloop completions zsh > \"${fpath[1]}/_segloop\"\n\nExit codes: 0 printed, 2 usage error."
    )]
    Completions {
        /// The shell to complete in
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one per subcommand
    #[command(
        after_help = "Examples:\n  segloop man | man -l -\n  segloop man --out-dir /usr/local/share/man/man1\n\nExit codes: 0 written, 1 the directory cannot be written, 2 usage error."
    )]
    Man {
        /// Write segloop.1 and segloop-<subcommand>.1 here instead of printing segloop.1
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Add, list or expire silences on a running instance (through its admin API)
    #[command(
        after_help = "Examples:\n  segloop silence add -c config/segloop.toml --segments 'eu-1/checkout/**' --duration 2h --comment 'planned maintenance'\n  segloop silence list -c config/segloop.toml\n  segloop silence expire -c config/segloop.toml 6f1c...\n\nThe admin address and token come from [admin] (token_file or token_env).\nExit codes: 0 done, 1 the admin API refused or could not be reached, 2 usage or config error."
    )]
    Silence(SilenceArgs),
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Re-produce dead letters (original bytes and key) to their source topic
    Replay {
        /// Config file (TOML): brokers and topics
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override a config key (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Only dead letters of this error code (repeatable), e.g. unknown_fingerprint
        #[arg(long = "code")]
        codes: Vec<String>,
        /// Only dead letters from this source partition
        #[arg(long)]
        source_partition: Option<i32>,
        /// Only dead letters written from this time: RFC 3339 or relative (-2h)
        #[arg(long, allow_hyphen_values = true)]
        from: Option<String>,
        /// Only dead letters written up to this time (same forms)
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        /// Count what would be sent, send nothing
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Config file (TOML): brokers and topics
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set kafka.bootstrap_servers=kafka:9092 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// A topic role (telemetry, actions, outcomes, decisions, dlq, state, control) or name
    #[arg(long, default_value = "telemetry")]
    pub topic: String,
    /// Start at this time: RFC 3339 or relative to now (-10m); default: the beginning
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Keep printing new records (else stop at the topic's end when it started)
    #[arg(long, short)]
    pub follow: bool,
    /// Only this partition
    #[arg(long)]
    pub partition: Option<i32>,
    /// Only records with this key (segment)
    #[arg(long)]
    pub key: Option<String>,
    /// Stop after this many records
    #[arg(long)]
    pub max: Option<u64>,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub action: PolicyAction,
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Run policy test files (see `segloop::policytest` for the format)
    Test {
        /// Test files (TOML), each naming the policy file it tests
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct SilenceArgs {
    #[command(subcommand)]
    pub action: SilenceAction,
    /// Config file: the admin address (admin.listen) and token (admin.token_file/token_env)
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// The admin API to talk to (default: http://<admin.listen>)
    #[arg(long, global = true)]
    pub admin: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SilenceAction {
    /// Silence the segments a glob matches
    Add {
        /// Segments, a glob like eu-1/checkout/**
        #[arg(long)]
        segments: String,
        /// How long (at most 90d)
        #[arg(long, default_value = "1h")]
        duration: String,
        /// Why (required)
        #[arg(long)]
        comment: String,
        /// Who (default: $USER)
        #[arg(long, env = "USER")]
        created_by: Option<String>,
    },
    /// List the silences in force
    List,
    /// Expire a silence now
    Expire {
        /// The silence id (from `silence list`)
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file (TOML)
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set windows.size=5s (repeatable; beats env and file)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Log lines (and the end-of-run summary) as text or JSON (as logging.format)
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

impl ConfigArgs {
    /// The overrides, with `--log-format` as one more.
    fn all_overrides(&self) -> Vec<String> {
        let mut all = self.overrides.clone();
        if let Some(f) = &self.log_format {
            all.push(format!("logging.format={f}"));
        }
        all
    }
}

#[derive(Debug, Args)]
pub struct BacktestArgs {
    /// Config file (TOML): brokers, topics, codecs, windows, policies
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set windows.size=5s (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Replay from this event time: RFC 3339 or relative to now (-6h); default: the beginning
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Replay up to this event time (same forms); default: the end of the topic now
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Telemetry topic to replay (default: topics.telemetry.name)
    #[arg(long)]
    pub topic: Option<String>,
    /// Policy file to backtest (default: the config's `policies`)
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Write the JSON report here
    #[arg(long)]
    pub report: PathBuf,
    /// Also write a self-contained HTML report here
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Also run this policy file over the same replay and report the differences
    #[arg(long, value_name = "OTHER_POLICIES")]
    pub compare: Option<PathBuf>,
    /// Diff the would-be commands with the live actions topic over the same range
    #[arg(long)]
    pub against_live: bool,
    /// Write the would-be commands to this topic (never the live actions topic)
    #[arg(long)]
    pub sandbox_topic: Option<String>,
    /// Replay the outcomes topic's history instead of simulating the actuator
    #[arg(long)]
    pub outcomes_from_topic: bool,
    /// Start an embedded Kafka, write the demo fleet's history with its scripted incidents,
    /// and backtest that (nothing else needed)
    #[arg(long)]
    pub embedded_sample: bool,
    /// Seed of the embedded sample
    #[arg(long, default_value_t = 1)]
    pub sample_seed: u64,
    /// Seconds of history in the embedded sample
    #[arg(long, default_value_t = 60)]
    pub sample_duration: u64,
    /// Simulated actuator: time from command to outcome
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub actuator_delay: std::time::Duration,
    /// Simulated actuator: share of commands that succeed (0..=1)
    #[arg(long, default_value_t = 1.0)]
    pub actuator_success: f64,
    /// Simulated actuator: seed of which commands fail
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Cap the consumer's fetch sizes in bytes (the report does not depend on them)
    #[arg(long, hide = true)]
    pub fetch_max_bytes: Option<usize>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the scripted story runs, in seconds (at least 40: the last incident's retry
    /// is verified on evidence, which takes its windows)
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seed of the fleet's noise and the fault script
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the summary JSON here
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Demo configuration (window sizes, policies); default: config/demo.toml when it is in the
    /// current directory, else the built-in one
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// `segloop demo`: exit 0 only when every scripted incident went as expected.
pub fn demo(args: &DemoArgs) -> ExitCode {
    let config_path = match crate::demo::demo_config(args.config.as_deref()) {
        Ok((path, builtin)) => {
            if builtin {
                eprintln!("using the built-in demo config (no config/demo.toml here)");
            }
            path
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let opts = crate::demo::DemoOptions {
        duration_s: args.duration.max(40),
        seed: args.seed,
        config_path,
        live: true,
    };
    match crate::demo::run(&opts) {
        Ok(summary) => {
            crate::demo::print_summary(&summary);
            if let Some(path) = &args.summary {
                if let Err(e) = crate::demo::write_summary(&summary, path) {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(1);
                }
                println!("summary written to {}", path.display());
            }
            if summary.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark: window, evict (the segment cap under churn at --segments/10,
    /// --segments and 10x), e2e, replay, delivery (a real broker) or restore
    pub which: String,
    /// Distinct segments
    #[arg(long, default_value_t = 100_000)]
    pub segments: usize,
    /// Events to feed (each with 2 measurements, one with quantiles)
    #[arg(long, default_value_t = 10_000_000)]
    pub events: usize,
    /// Window settings from this config (default: built-in defaults, 10 s tumbling)
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// e2e, replay: telemetry partitions on the embedded cluster
    #[arg(long, default_value_t = 32)]
    pub partitions: i32,
    /// e2e, replay: interleaved (raw, driver) rounds; the fastest pass of each counts
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// delivery (required), restore: a real broker to run on (host:port); TLS and SASL settings
    /// come from --config
    #[arg(long)]
    pub bootstrap: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Config file (TOML), or give it with --config/-c like the other subcommands
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    pub file: Option<PathBuf>,
    /// Config file (TOML)
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The telemetry topic's partition count: also warn what scale-out does to each limit
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Override a config key, e.g. --set windows.size=5s (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SchemaArg {
    Telemetry,
    Command,
    Outcome,
    Decision,
}

impl SchemaArg {
    fn kind(self) -> SchemaKind {
        match self {
            SchemaArg::Telemetry => SchemaKind::Telemetry,
            SchemaArg::Command => SchemaKind::Command,
            SchemaArg::Outcome => SchemaKind::Outcome,
            SchemaArg::Decision => SchemaKind::Decision,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CodecArg {
    AvroSingleObject,
    AvroConfluent,
    AvroRaw,
    Json,
}

impl From<CodecArg> for CodecKind {
    fn from(c: CodecArg) -> Self {
        match c {
            CodecArg::AvroSingleObject => CodecKind::AvroSingleObject,
            CodecArg::AvroConfluent => CodecKind::AvroConfluent,
            CodecArg::AvroRaw => CodecKind::AvroRaw,
            CodecArg::Json => CodecKind::Json,
        }
    }
}

#[derive(Debug, Args)]
pub struct CodecArgs {
    /// The framing of the records (as `topics.<name>.codec`)
    #[arg(long, value_enum, default_value = "avro-single-object")]
    pub codec: CodecArg,
    /// Which record: telemetry, command, outcome or decision
    #[arg(long, value_enum, default_value = "telemetry")]
    pub schema: SchemaArg,
    /// Confluent: the id of the current schema
    #[arg(long, default_value_t = 1)]
    pub schema_id: u32,
    /// Confluent: another writer schema by id, ID=FILE (repeatable)
    #[arg(long = "schema-id-file", value_name = "ID=FILE")]
    pub schema_id_files: Vec<String>,
    /// An extra writer schema accepted by fingerprint, or the writer schema of avro-raw
    #[arg(long = "writer-schema", value_name = "FILE")]
    pub writer_schemas: Vec<PathBuf>,
}

impl CodecArgs {
    fn settings(&self) -> Result<SchemaSettings, String> {
        let mut schema_ids = HashMap::new();
        for spec in &self.schema_id_files {
            let (id, file) = spec
                .split_once('=')
                .ok_or_else(|| format!("--schema-id-file {spec}: expected ID=FILE"))?;
            let id: u32 = id
                .parse()
                .map_err(|_| format!("--schema-id-file {spec}: {id} is not a schema id"))?;
            schema_ids.insert(id, PathBuf::from(file));
        }
        let raw_writer_schema = match self.codec {
            CodecArg::AvroRaw => self.writer_schemas.first().cloned(),
            _ => None,
        };
        Ok(SchemaSettings {
            schema_id: Some(self.schema_id),
            schema_ids,
            writer_schemas: self.writer_schemas.clone(),
            raw_writer_schema,
        })
    }
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub codec: CodecArgs,
    /// Input is one raw record (all of stdin or FILE), not hex lines
    #[arg(long)]
    pub raw: bool,
    /// Also check the key rule: the record key (segment) it was read with
    #[arg(long)]
    pub key: Option<String>,
    /// Read from FILE instead of stdin
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub codec: CodecArgs,
    /// Read JSON lines from FILE instead of stdin
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SchemasArgs {
    /// Print the full schema JSON too
    #[arg(long)]
    pub full: bool,
}

/// Loads a config, printing its errors; the `Err` is the exit code to return.
fn load_config(
    file: Option<&Path>,
    overrides: &[String],
    env: &HashMap<String, String>,
) -> Result<Config, ExitCode> {
    Config::load(&Sources {
        file,
        env,
        overrides,
    })
    .map_err(|e| {
        eprintln!("error: invalid configuration\n{e}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// `segloop run`: the loop against Kafka brokers until a signal.
pub fn run(args: &ConfigArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), &args.all_overrides(), env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::process::init_logging(&config);
    let policies = match crate::policy::PolicySet::for_config(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid policies\n{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let control = std::sync::Arc::new(crate::clock::Control::default());
    crate::process::install_signal_handlers(control.clone());
    let text_logs = config.logging.format == crate::config::LogFormat::Text;
    let result = crate::runtime::run(crate::runtime::RunOptions {
        policies_path: config.policies.clone(),
        config,
        policies,
        control,
        clock: std::sync::Arc::new(crate::clock::SystemClock),
        metrics: crate::metrics::Metrics::new(),
        on_admin: None,
        on_core: None,
    });
    match result {
        Ok(report) if text_logs => {
            eprintln!(
                "stopped: {} records consumed ({} aggregated, {} to the DLQ), {} commands, {} decisions, {} outcomes applied, {} commits",
                report.records_consumed,
                report.records_aggregated,
                report.records_dlq,
                report.commands,
                report.decisions,
                report.outcomes_applied,
                report.commits
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            tracing::info!(
                records_consumed = report.records_consumed,
                records_aggregated = report.records_aggregated,
                records_dlq = report.records_dlq,
                commands = report.commands,
                decisions = report.decisions,
                outcomes_applied = report.outcomes_applied,
                commits = report.commits,
                "stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `segloop actuator`: consume commands, run the configured handlers, write outcomes.
pub fn actuator(args: &ConfigArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), &args.all_overrides(), env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::process::init_logging(&config);
    let control = std::sync::Arc::new(crate::clock::Control::default());
    crate::process::install_signal_handlers(control.clone());
    let handler = std::sync::Arc::new(crate::actuator::ConfiguredHandler::new(
        config.actuator.clone(),
    ));
    tracing::info!(
        actions = ?config.actuator.shell.keys().collect::<Vec<_>>(),
        webhook = ?config.actuator.webhook,
        "actuator starting"
    );
    match crate::actuator::run(&config, handler, control, |_| {}) {
        Ok(report) => {
            tracing::info!(
                commands = report.commands,
                applied = report.applied,
                failed = report.failed,
                rejected = report.rejected,
                duplicates = report.duplicates,
                expired = report.expired,
                answered_before = report.answered_before,
                undecodable = report.undecodable,
                "actuator stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `segloop backtest`: replay, print the summary, write the reports.
pub fn backtest(args: &BacktestArgs, env: &HashMap<String, String>) -> ExitCode {
    // The embedded sample is the demo fleet: without a config it is judged by the demo's.
    let mut config_path = args.config.clone();
    if args.embedded_sample && config_path.is_none() {
        match crate::demo::demo_config(None) {
            Ok((path, builtin)) => {
                eprintln!(
                    "no --config: the embedded sample is judged by the demo config ({})",
                    if builtin {
                        "built in".to_string()
                    } else {
                        path.display().to_string()
                    }
                );
                config_path = Some(path);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        }
    }
    let mut config = match load_config(config_path.as_deref(), &args.overrides, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::process::init_logging(&config);
    if let Some(p) = &args.policies {
        config.policies = Some(p.clone());
    }
    let usage = |m: String| {
        eprintln!("error: {m}");
        ExitCode::from(EXIT_USAGE)
    };
    if !(0.0..=1.0).contains(&args.actuator_success) {
        return usage(format!(
            "--actuator-success {} is not a share: give a number from 0 to 1",
            args.actuator_success
        ));
    }
    let (from_ms, to_ms) = match (time_flag(&args.from, "from"), time_flag(&args.to, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    if let (Some(f), Some(t)) = (from_ms, to_ms) {
        if f > t {
            return usage("--from is after --to: swap them".into());
        }
    }
    let policies = match crate::policy::PolicySet::for_config(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: invalid policies\n{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let inv = crate::backtest::Invocation {
        options: crate::backtest::Options {
            topic: args.topic.clone(),
            from_ms,
            to_ms,
            actuator: crate::backtest::SimulatedActuator {
                delay_ms: args.actuator_delay.as_millis() as i64,
                success: args.actuator_success,
                seed: args.seed,
            },
            outcomes_from_topic: args.outcomes_from_topic,
            sandbox_topic: args.sandbox_topic.clone(),
            fetch_max_bytes: args.fetch_max_bytes,
            policies_label: config
                .policies
                .as_ref()
                .map_or("(no policies)".into(), |p| p.display().to_string()),
            progress: true,
        },
        compare: args.compare.clone(),
        against_live: args.against_live,
        embedded_sample: args
            .embedded_sample
            .then_some((args.sample_seed, args.sample_duration)),
    };
    let report = match crate::backtest::execute(config, policies, &inv, &mut |s| eprintln!("{s}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    print!("{}", report.render_text());
    let mut writes = vec![(&args.report, report.to_json())];
    if let Some(h) = &args.html {
        writes.push((h, report.render_html()));
    }
    for (path, text) in writes {
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

/// A benchmark's figures, or its error (exit 1).
fn finish_bench<R>(result: anyhow::Result<R>, print: impl FnOnce(R)) -> ExitCode {
    match result {
        Ok(r) => {
            print(r);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `segloop bench <which>`: prints `key=value` figures.
pub fn bench(args: &BenchArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), &[], env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match args.which.as_str() {
        "window" => {
            let spec = crate::window::WindowSpec::from_config(&config.windows);
            crate::bench::window_bench(spec, args.segments, args.events).print();
            ExitCode::SUCCESS
        }
        "evict" => {
            // The same churn at three caps: constant per-event cost means the same ns/event.
            let spec = crate::window::WindowSpec::from_config(&config.windows);
            let mut exact = true;
            for cap in [args.segments / 10, args.segments, args.segments * 10] {
                let (report, reported) = crate::bench::evict_bench(spec.clone(), cap, args.events);
                report.print(reported);
                exact &= report.accounting_exact(reported);
            }
            if exact {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: the eviction accounting does not add up");
                ExitCode::from(1)
            }
        }
        "e2e" => finish_bench(
            crate::bench::e2e_bench(
                args.events as u64,
                args.segments,
                args.partitions,
                args.rounds,
            ),
            |r| r.print(),
        ),
        "replay" => finish_bench(
            crate::bench::replay_bench(
                args.events as u64,
                args.segments,
                args.partitions,
                args.rounds,
            ),
            |r| r.print(),
        ),
        "delivery" => {
            let Some(bs) = args.bootstrap.as_deref() else {
                eprintln!("error: bench delivery needs --bootstrap HOST:PORT (a real broker: the embedded one has no transactions)");
                return ExitCode::from(EXIT_USAGE);
            };
            finish_bench(
                crate::bench::delivery_bench(
                    (bs, &config.kafka),
                    args.events as u64,
                    args.segments,
                    args.partitions,
                    args.rounds,
                ),
                |r| r.print(),
            )
        }
        "restore" => finish_bench(
            crate::bench::restore_bench(
                args.bootstrap.as_deref().map(|bs| (bs, &config.kafka)),
                args.segments,
                args.partitions,
            ),
            |(n, secs)| {
                println!("bench=restore");
                println!("segments={n}");
                println!("partitions={}", args.partitions);
                println!("broker={}", args.bootstrap.as_deref().unwrap_or("embedded"));
                println!("restore_secs={secs:.3}");
                println!("segments_per_sec={:.0}", n as f64 / secs);
            },
        ),
        other => {
            eprintln!(
                "error: unknown benchmark {other:?}; choose window, e2e, replay, delivery or restore"
            );
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `segloop check-config`: exit 0 and print the effective config, or the errors and exit 2.
pub fn check_config(args: &CheckConfigArgs, env: &HashMap<String, String>) -> ExitCode {
    match Config::load(&Sources {
        file: args.file.as_deref().or(args.config.as_deref()),
        env,
        overrides: &args.overrides,
    }) {
        Ok(config) => match load_policies(&config) {
            Ok(_) if !crate::kafka::build_problems(&config).is_empty() => {
                eprintln!(
                    "error: this build cannot use these Kafka settings\n{}",
                    crate::kafka::build_problems(&config).join("\n")
                );
                ExitCode::from(EXIT_USAGE)
            }
            Ok(summary) => {
                if let Ok(set) = crate::policy::PolicySet::for_config(&config) {
                    for w in set.limit_warnings(args.partitions) {
                        eprintln!("warning: {w}");
                    }
                }
                for w in config.registry_warnings() {
                    eprintln!("warning: {w}");
                }
                let default_cap = crate::config::WindowConfig::default().max_segments;
                if config.windows.max_segments < default_cap {
                    eprintln!(
                        "warning: windows.max_segments = {} (default {default_cap}): past it the longest-idle 1% of segments are evicted, and the events in their open windows are never judged (counted in segloop_evicted_events_total, recorded as `evicted` decisions); a segment evicted while failing gets no command",
                        config.windows.max_segments
                    );
                }
                let mut text = config.to_toml();
                if let Some(s) = summary {
                    text.push_str(&s);
                }
                print_quietly(&text)
            }
            Err(e) => {
                eprintln!("error: invalid policies\n{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Err(e) => {
            eprintln!("error: invalid configuration\n{e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Loads the config's policy file and checks it against the window config; returns a summary.
///
/// # Errors
/// The policy file's errors, each naming the policy and field.
pub fn load_policies(config: &Config) -> Result<Option<String>, crate::policy::PolicyErrors> {
    let Some(path) = &config.policies else {
        return Ok(None);
    };
    let set = crate::policy::PolicySet::load_for(path, &config.windows)?;
    let mut out = format!("\n# policies from {}\n", path.display());
    for p in &set.policies {
        out.push_str(&format!(
            "#   {} v{}: segments {} when {} for {} -> {}{}\n",
            p.name,
            p.version,
            p.segments_glob,
            p.when_text,
            p.for_windows,
            p.action,
            if p.dry_run { " (dry run)" } else { "" }
        ));
    }
    Ok(Some(out))
}

fn read_input(file: Option<&Path>) -> std::io::Result<Vec<u8>> {
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
type CodecInput<T> = (Box<dyn Codec<T>>, Vec<u8>);

/// The codec the flags describe and the input bytes; the `Err` is the exit code to return.
fn codec_and_input<T: Record>(
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

fn decode_as<T: Record + Serialize>(args: &DecodeArgs) -> ExitCode {
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

fn decode_one<T: Record + Serialize>(
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

fn encode_as<T: Record>(args: &EncodeArgs) -> ExitCode {
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

fn print_schemas(out: &mut impl Write, full: bool) -> std::io::Result<()> {
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
fn print_quietly(text: &str) -> ExitCode {
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

/// `segloop silence ...`: the admin API's silences from the command line.
/// A time flag's value (RFC 3339 or relative to now, as `--from -6h`), its error naming the
/// flag; `None` when not given.
fn time_flag(value: &Option<String>, flag: &str) -> Result<Option<i64>, String> {
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    value
        .as_deref()
        .map(|s| crate::backtest::parse_time(s, now).map_err(|e| format!("--{flag} {e}")))
        .transpose()
}

/// `segloop tail`: a topic's records decoded, as JSON lines on stdout.
pub fn tail(args: &TailArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), &args.overrides, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let from_ms = match time_flag(&args.from, "from") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let opts = crate::tail::TailOptions {
        topic: args.topic.clone(),
        from_ms,
        follow: args.follow,
        partition: args.partition,
        key: args.key.clone(),
        max: args.max,
    };
    let stdout = std::io::stdout();
    match crate::tail::tail(&config, &opts, &mut stdout.lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `segloop dlq replay`: dead letters back to their source topic, by code, partition, time.
pub fn dlq(args: &DlqArgs, env: &HashMap<String, String>) -> ExitCode {
    let DlqAction::Replay {
        config,
        overrides,
        codes,
        source_partition,
        from,
        to,
        dry_run,
    } = &args.action;
    let config = match load_config(config.as_deref(), overrides, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (from_ms, to_ms) = match (time_flag(from, "from"), time_flag(to, "to")) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let filter = crate::tail::ReplayFilter {
        codes: codes.clone(),
        source_partition: *source_partition,
        from_ms,
        to_ms,
        dry_run: *dry_run,
    };
    match crate::tail::replay_dead_letters(&config, &filter) {
        Ok(c) => {
            let verb = if *dry_run { "would send" } else { "sent" };
            let total: u64 = c.sent.values().sum();
            for ((topic, code), n) in &c.sent {
                println!("{verb} {n} to {topic} ({code})");
            }
            println!(
                "{verb} {total} dead letter(s); {} truncated (cannot be replayed), {} filtered out",
                c.truncated, c.skipped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `segloop completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "segloop",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}

/// `segloop man [--out-dir DIR]`: the man page on stdout, or one page per subcommand in DIR.
pub fn man(out_dir: Option<&Path>) -> ExitCode {
    use clap::CommandFactory;
    let result = match out_dir {
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man pages: {e}");
            ExitCode::from(1)
        }
    }
}

/// `segloop policy test FILE...`: every case of every file; a failed case prints its diff.
pub fn policy(args: &PolicyArgs) -> ExitCode {
    let PolicyAction::Test { files } = &args.action;
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let results = match crate::policytest::run_file(file) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        for r in results {
            if r.passed() {
                passed += 1;
                println!("ok   {}: {}", file.display(), r.name);
            } else {
                failed += 1;
                println!(
                    "FAIL {}: {}\n  (- expected, + happened)\n{}",
                    file.display(),
                    r.name,
                    r.diff()
                );
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub fn silence(args: &SilenceArgs, env: &HashMap<String, String>) -> ExitCode {
    let config = match load_config(args.config.as_deref(), &[], env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let base = args
        .admin
        .clone()
        .unwrap_or_else(|| crate::runtime::admin::AdminClient::base_of(&config));
    let client = crate::runtime::admin::AdminClient::new(&base, config.admin.token.clone());
    let result = match &args.action {
        SilenceAction::Add {
            segments,
            duration,
            comment,
            created_by,
        } => {
            let Some(created_by) = created_by.as_deref().filter(|s| !s.trim().is_empty()) else {
                eprintln!("error: say who sets the silence: --created-by NAME (or set USER)");
                return ExitCode::from(EXIT_USAGE);
            };
            client.call(
                "POST",
                "/silences",
                Some(
                    &serde_json::json!({"segments": segments, "duration": duration,
                                     "comment": comment, "created_by": created_by}),
                ),
            )
        }
        SilenceAction::List => client.call("GET", "/silences", None),
        SilenceAction::Expire { id } => {
            let escaped: String =
                percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                    .collect();
            client.call("DELETE", &format!("/silences/{escaped}"), None)
        }
    };
    match result {
        Ok((status, body)) if (200..300).contains(&status) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&body).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "error: the admin API answered {status}: {}",
                body["error"].as_str().unwrap_or(&body.to_string())
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
