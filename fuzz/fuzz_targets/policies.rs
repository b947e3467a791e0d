#![no_main]
//! `segloop::fuzz::policies` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| segloop::fuzz::policies(data));
