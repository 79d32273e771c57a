//! Spawn, lookup, send, transfer, call, panic, restart, exit and shutdown against a model of
//! who must receive what.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isolate_cluster::fuzzing::routing(data));
