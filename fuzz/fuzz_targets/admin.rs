#![no_main]
//! `segloop::fuzz::admin` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| segloop::fuzz::admin(data));
