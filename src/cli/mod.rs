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

mod args;
mod formats;
pub use args::*;
pub use formats::*;

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
    let events = args.events();
    let broker = args.bootstrap.as_deref().map(|bs| (bs, &config.kafka));
    // e2e, replay: the Java ceiling needs a real broker and the Kafka client jars; without
    // them the figures say why there is none.
    let java = || {
        if broker.is_some() {
            crate::bench::JavaConsumer::find(args.java_classpath.as_deref())
        } else {
            Err("the embedded cluster is not a Kafka broker Java can reach".to_string())
        }
    };
    match args.which.as_str() {
        "window" => {
            let spec = crate::window::WindowSpec::from_config(&config.windows);
            crate::bench::window_bench(spec, args.segments, events).print();
            ExitCode::SUCCESS
        }
        "evict" => {
            // The same churn at three caps: constant per-event cost means the same ns/event.
            let spec = crate::window::WindowSpec::from_config(&config.windows);
            let mut exact = true;
            for cap in [args.segments / 10, args.segments, args.segments * 10] {
                let (report, reported) = crate::bench::evict_bench(spec.clone(), cap, events);
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
        "e2e" => {
            if !(0.0..=1.0).contains(&args.breaching) {
                eprintln!("error: --breaching is a share of the segments, from 0 to 1");
                return ExitCode::from(EXIT_USAGE);
            }
            finish_bench(
                crate::bench::e2e_bench(
                    broker,
                    &crate::bench::E2eOptions {
                        records: events as u64,
                        segments: args.segments,
                        partitions: args.partitions,
                        rounds: args.rounds,
                        breaching: args.breaching,
                        java: java(),
                        threads: args.threads,
                    },
                ),
                |r| r.print(),
            )
        }
        "shards" => {
            // Default: one per core.
            let most = crate::config::EngineConfig {
                threads: args.threads.unwrap_or(0),
            }
            .effective_threads();
            let threads: Vec<usize> = (1..=most.max(2)).collect();
            finish_bench(
                crate::bench::shards_bench(
                    &config,
                    events as u64,
                    args.segments,
                    args.partitions,
                    &threads,
                    args.rounds,
                ),
                |r| r.print(),
            )
        }
        "replay" => finish_bench(
            crate::bench::replay_bench(
                broker,
                events as u64,
                args.segments,
                args.partitions,
                args.rounds,
                &java(),
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
                    events as u64,
                    args.segments,
                    args.partitions,
                    args.rounds,
                ),
                |r| r.print(),
            )
        }
        "restore" => finish_bench(
            crate::bench::restore_bench(broker, args.segments, args.partitions),
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
                "error: unknown benchmark {other:?}; choose window, evict, e2e, replay, shards, delivery or restore"
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
                    for w in set.limit_warnings() {
                        eprintln!("warning: {w}");
                    }
                    let claim = if config.delivery.mode == crate::config::DeliveryMode::ExactlyOnce
                    {
                        format!(
                            "up to delivery.commit_interval = {}, as it is written in the transaction",
                            humantime::format_duration(config.delivery.commit_interval)
                        )
                    } else {
                        "tens of milliseconds".to_string()
                    };
                    let hold = humantime::format_duration(crate::runtime::ancestor_hold(&config));
                    eprintln!(
                        "note: {}",
                        set.scale_out_note(args.partitions, &claim, &hold.to_string())
                    );
                }
                for w in config.registry_warnings() {
                    eprintln!("warning: {w}");
                }
                if config.delivery.mode == crate::config::DeliveryMode::ExactlyOnce {
                    use crate::runtime::instances;
                    match &config.delivery.transactional_id {
                        Some(id) => eprintln!("note: exactly-once: transactional.id {id} (delivery.transactional_id); a second live instance with it is refused at startup"),
                        None => eprintln!(
                            "note: exactly-once: transactional.id {} on this host (the default: unique per instance, refused at startup if a live instance has it)",
                            instances::default_transactional_id(&config, &instances::hostname())
                        ),
                    }
                    if config.delivery.transactional_id.is_none()
                        && instances::fixed_port(&config.admin.listen).is_none()
                    {
                        eprintln!("warning: admin.listen has port 0, so the default transactional.id changes with every start: a restart does not fence its predecessor, whose open transaction the broker aborts only after transaction.timeout.ms; set delivery.transactional_id or a fixed admin port");
                    }
                }
                let threads = config.engine.effective_threads();
                if threads > 1 {
                    eprintln!(
                        "note: engine.threads = {} ({threads} threads): telemetry is decoded and windowed on {threads} threads, each owning a share of the assigned partitions; windows.max_segments = {} is split between them ({} each: a thread whose partitions hold more segments evicts its longest idle ones first)",
                        config.engine.threads,
                        config.windows.max_segments,
                        config.windows.max_segments_per_thread(threads)
                    );
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
