#![no_main]
//! `segloop::fuzz::telemetry` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| segloop::fuzz::telemetry(data));
