#![no_main]
//! `segloop::fuzz::records` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| segloop::fuzz::records(data));
