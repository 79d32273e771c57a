//! Arbitrary bytes as an envelope from another node (messages and announcements).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isolate_cluster::fuzzing::envelopes(data));
