//! Frame writes, batch writes and reads on tiny rings against a `VecDeque` model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isolate_cluster::fuzzing::frames(data));
