//! # segloop
//!
//! Closes micro-segmentation feedback loops over Kafka: telemetry keyed by segment is windowed
//! per segment in event time, policies judge each closed window, and the controller emits a
//! remediation command for exactly the segment in trouble, then verifies, retries or escalates.
//! The wire contract is in the README ("Wire contract") and `schemas/`; `ARCHITECTURE.md` maps
//! the code and records each mechanism.
//!
//! # Layout
//!
//! An event's way through the code, top to bottom (`ARCHITECTURE.md` walks it in detail):
//!
//! - [`model`] — the wire contract as Rust types (telemetry, command, outcome, decision).
//! - [`schema`] — the embedded Avro schemas (`schemas/*.avsc`), fingerprints, known versions.
//! - [`codec`] — bytes ⇄ records: Avro single-object, Confluent, raw Avro, JSON; stable
//!   error codes for the DLQ.
//! - [`sketch`] — compact mergeable quantile sketch (DDSketch mapping, ≤ 1% relative error).
//! - [`window`] — event-time windows per segment: panes, watermarks, late/skew rejection,
//!   idle advance, quantile sketches, TTL and eviction, committable offsets; window groups
//!   with sizes of their own ([`window::Windows`]); a cache-conscious segment table fed by
//!   prefetch hints on one schedule ([`window::with_hints`]).
//! - [`policy`] — policies (segment selector, condition language, hysteresis, actions,
//!   retries, escalation) and guardrails, compiled from TOML.
//! - [`controller`] — the per-(segment, policy) state machine: fire, ack, verify, retry,
//!   escalate; guardrails; decision records; loop timings; snapshot/restore.
//! - [`pipeline`] — the one step every driver runs: record → decode → labels → prefetch →
//!   windows → judge → controller → effects to the driver's [`pipeline::Sink`]; the
//!   per-event work in shards owning disjoint partition sets, which a driver may run side by
//!   side ([`pipeline::Fanout`], `engine.threads`), each judging the windows that move no
//!   loop against its partitions' controller state, the one controller the rest; the
//!   [`pipeline::ReadModel`] the admin API reads without the engine's lock.
//! - [`config`] — layered TOML configuration (defaults < file < `SEGLOOP__*` env < CLI) with
//!   errors that name the key, file and line.
//!
//! Drivers and what they share:
//!
//! - [`runtime`] — `segloop run`: Kafka consumers/producer, offsets, rebalances, DLQ,
//!   changelog, exactly-once, reload, in modules along its seams (the loop's named steps, the
//!   group's ordered stream of records and events, the core's handlers, output, delivery,
//!   changelog, the shards' worker threads); [`runtime::admin`] serves metrics, health and the
//!   admin API.
//! - [`backtest`] — `segloop backtest`: a topic range replayed in (event time, partition,
//!   offset) order through the pipeline, with a simulated or recorded actuator; JSON, terminal
//!   and HTML reports; compare and against-live diffs.
//! - [`policytest`] — `segloop policy test`: policy unit tests (input windows, outcomes,
//!   expected effects) run through the same pipeline and controller.
//! - [`bench`] — `segloop bench` figures and the counting allocator behind `bytes_per_segment` (bench builds).
//! - [`fuzz`] — fuzz targets: every parser of outside input as a function that must not panic
//!   (`fuzz/` runs them under libFuzzer; `tests/fuzz_corpus.rs` replays the corpus in CI).
//! - [`demo`] — `segloop demo`: embedded Kafka, the synthetic fleet, simulated actuator,
//!   scored from what the topics say.
//! - [`actuator`] — `segloop actuator`, the reference actuator (shell or webhook handlers,
//!   idempotent on `command_id`); the demo's simulated actuator runs on it.
//! - [`fleet`] — the synthetic fleet and scripted incidents (demo and the backtest sample).
//! - [`registry`] — the Schema Registry client (Confluent REST API): writer schemas by id
//!   for the `avro-confluent` codec (the engine's [`codec::SchemaSource`]), and registration
//!   of the schemas segloop writes.
//! - [`kafka`] — Kafka adapters shared by the drivers: client configs, topic checks and
//!   creation, watermarks, the murmur2 partitioner, the batch feed of a consumer's records
//!   ([`kafka::Feed`]).
//! - [`metrics`] — the documented Prometheus names and the per-instance recorder.
//! - [`clock`] — the injected controller clock and the stop/reload flags.
//! - [`process`] — logging and signal handling of the long-running subcommands.
//! - [`cli`] — the `segloop` command line: parses, loads config, calls one library function
//!   per subcommand, prints, maps the result to an exit code.
//!
//! The engine modules (`codec`, `config`, `model`, `schema`, `sketch`, `window`, `policy`,
//! `controller`, `pipeline`) never import Kafka, tokio I/O or HTTP; `runtime` and `backtest`
//! are two drivers of the same pipeline and import neither each other nor `demo`
//! (`tests/architecture.rs` checks these rules).

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod actuator;
pub mod backtest;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod controller;
pub mod demo;
pub mod fleet;
pub mod fuzz;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod policy;
pub mod policytest;
pub mod process;
pub mod registry;
pub mod runtime;
pub mod schema;
pub mod sketch;
pub mod tail;
pub mod window;
