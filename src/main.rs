//! The `segloop` binary: parse the command line, dispatch, map outcomes to exit codes.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use segloop::cli::{self, Cli, Command};

/// mimalloc (see `segloop::bench` for the measurement that chose it). It also stands in for
/// the C library's `malloc` (the crate's `override` feature), so librdkafka's per-message
/// allocations, freed on the loop thread after a broker thread made them, avoid glibc's
/// cross-arena frees (6% of the loop thread at 2,000 segments; docs/benchmarks.md).
#[cfg(not(feature = "counting-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bench builds (`--features counting-alloc`): mimalloc counting live heap bytes, so
/// `segloop bench window` reports measured memory. Never in a production build.
#[cfg(feature = "counting-alloc")]
#[global_allocator]
static GLOBAL: segloop::bench::CountingAllocator = segloop::bench::CountingAllocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    match cli.command {
        Command::CheckConfig(args) => cli::check_config(&args, &env),
        Command::Decode(args) => cli::decode(&args),
        Command::Encode(args) => cli::encode(&args),
        Command::Schemas(args) => cli::schemas(&args),
        Command::Run(args) => cli::run(&args, &env),
        Command::Actuator(args) => cli::actuator(&args, &env),
        Command::Demo(args) => cli::demo(&args),
        Command::Backtest(args) => cli::backtest(&args, &env),
        Command::Bench(args) => cli::bench(&args, &env),
        Command::Silence(args) => cli::silence(&args, &env),
        Command::Policy(args) => cli::policy(&args),
        Command::Completions { shell } => cli::completions(shell),
        Command::Tail(args) => cli::tail(&args, &env),
        Command::Dlq(args) => cli::dlq(&args, &env),
        Command::Man { out_dir } => cli::man(out_dir.as_deref()),
    }
}
