//! Arbitrary bytes as a frame header and as payloads from outside the process.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isolate_cluster::fuzzing::untrusted(data));
