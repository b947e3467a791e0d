//! The command line: every subcommand's arguments (clap).

use super::*;

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
        after_help = "Examples:\n  segloop bench window --segments 100000 --events 10000000\n  segloop bench e2e --bootstrap 127.0.0.1:9092 --segments 2000\n  segloop bench delivery --bootstrap 127.0.0.1:9092 --events 1000000\n\nExit codes: 0 ok, 1 runtime failure, 2 usage or config error."
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
    pub(super) fn all_overrides(&self) -> Vec<String> {
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

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark: window, evict (the segment cap under churn at --segments/10,
    /// --segments and 10x), e2e, replay, shards (the pipeline on 1..N threads, in memory),
    /// delivery (a real broker) or restore
    pub which: String,
    /// Distinct segments
    #[arg(long, default_value_t = 100_000)]
    pub segments: usize,
    /// Events to feed (each with 2 measurements, one with quantiles). Default: 10,000,000 for
    /// window and evict; e2e and replay: 1,000,000 on the embedded cluster (it keeps about
    /// that many), 3,000,000 on --bootstrap; shards: 2,000,000
    #[arg(long)]
    pub events: Option<usize>,
    /// Window settings from this config (default: built-in defaults, 10 s tumbling)
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// e2e, replay: telemetry partitions
    #[arg(long, default_value_t = 32)]
    pub partitions: i32,
    /// e2e, replay: interleaved rounds (raw, Java, driver); the fastest pass of each counts
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// e2e, replay, delivery (required), restore: a real broker to run on (host:port); TLS
    /// and SASL settings come from --config
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// e2e: the share of segments whose events breach the bench policy
    #[arg(long, default_value_t = 0.01)]
    pub breaching: f64,
    /// e2e, replay --bootstrap: a directory with the Kafka client jars for the bare Java consumer
    /// (default: the jars scripts/kafka.sh fetched, if found)
    #[arg(long)]
    pub java_classpath: Option<PathBuf>,
    /// e2e: `engine.threads` of the pipeline pass (default: the config's; 0 = one per core);
    /// shards: the most threads to run (default: one per core, at least 2)
    #[arg(long)]
    pub threads: Option<usize>,
}

impl BenchArgs {
    /// `--events`, or the benchmark's default (see the flag).
    pub fn events(&self) -> usize {
        self.events
            .unwrap_or(match (self.which.as_str(), &self.bootstrap) {
                ("e2e" | "replay", None) => 1_000_000,
                ("e2e" | "replay", Some(_)) => 3_000_000,
                ("shards", _) => 2_000_000,
                _ => 10_000_000,
            })
    }
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
    pub(super) fn kind(self) -> SchemaKind {
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
    pub(super) fn settings(&self) -> Result<SchemaSettings, String> {
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
