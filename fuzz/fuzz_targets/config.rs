#![no_main]
//! `segloop::fuzz::config` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| segloop::fuzz::config(data));
