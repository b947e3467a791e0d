//! # segloop
//!
//! Closes micro-segmentation feedback loops over Kafka: telemetry keyed by segment is windowed
//! per segment in event time, policies judge each closed window, and the controller emits a
//! remediation command for exactly the segment in trouble, then verifies, retries or escalates.
//! See `DESIGN.md` in the README for the wire contract.
//!
//! # Layout
//!
//! An event's way through the code, top to bottom:
//!
//! - [`model`] — the wire contract as Rust types (telemetry, command, outcome, decision).
//! - [`schema`] — the embedded Avro schemas (`schemas/*.avsc`), fingerprints, known versions.
//! - [`codec`] — bytes ⇄ records: Avro single-object, Confluent, raw Avro, JSON; stable
//!   error codes for the DLQ.
//! - [`sketch`] — compact mergeable quantile sketch (DDSketch mapping, ≤ 1% relative error).
//! - [`window`] — event-time windows per segment: panes, watermarks, late/skew rejection,
//!   idle advance, quantile sketches, TTL and eviction, committable offsets; window groups
//!   with sizes of their own ([`window::Windows`]); a cache-conscious segment table fed by
//!   prefetch hints ([`window::WindowEngine::prefetch`]).
//! - [`policy`] — policies (segment selector, condition language, hysteresis, actions,
//!   retries, escalation) and guardrails, compiled from TOML.
//! - [`controller`] — the per-(segment, policy) state machine: fire, ack, verify, retry,
//!   escalate; guardrails; decision records; loop timings; snapshot/restore.
//! - [`kafka`] — Kafka adapters shared by the drivers: client configs, topic checks and
//!   creation, the murmur2 partitioner.
//! - [`runtime`] — `segloop run`: Kafka consumers/producer, offsets, rebalances, DLQ,
//!   shutdown, reload; [`runtime::admin`] serves metrics, health and the admin API.
//! - [`backtest`] — `segloop backtest`: a topic range replayed in (event time, partition,
//!   offset) order through the same engine and controller, with a simulated or recorded
//!   actuator; JSON, terminal and HTML reports; compare and against-live diffs.
//! - [`metrics`] — the documented Prometheus names and the per-instance recorder.
//! - [`config`] — layered TOML configuration (defaults < file < `SEGLOOP__*` env < CLI) with
//!   errors that name the key, file and line.
//! - [`actuator`] — `segloop actuator`, the reference actuator (shell or webhook handlers,
//!   idempotent on `command_id`); the demo's simulated actuator runs on it.
//! - [`demo`] — `segloop demo`: embedded Kafka, synthetic fleet, scripted faults, simulated
//!   actuator, scored from what the topics say.
//! - [`bench`] — `segloop bench` figures and the counting allocator behind `bytes_per_segment`.
//! - [`cli`] — the `segloop` command line (parsing only; each subcommand calls into the
//!   library).
//!
//! The engine modules (`codec`, `config`, `model`, `schema`, `sketch`, `window`, `policy`,
//! `controller`) never import Kafka, tokio I/O or
//! HTTP; the runtime and the backtest are drivers of the same engine.

pub mod actuator;
pub mod backtest;
pub mod bench;
pub mod cli;
pub mod codec;
pub mod config;
pub mod controller;
pub mod demo;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod runtime;
pub mod schema;
pub mod sketch;
pub mod window;
