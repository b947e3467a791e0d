#![no_main]
//! `segloop::fuzz::condition` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| segloop::fuzz::condition(data));
