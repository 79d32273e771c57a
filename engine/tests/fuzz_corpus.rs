//! The fuzz targets' committed corpora (`fuzz/corpus/<target>/`) replayed as ordinary
//! tests, so plain `cargo test` covers every input the fuzzers kept, plus a few thousand
//! pseudo-random inputs per target.

use std::path::Path;

use isolate_cluster::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target} fails on {}", path.display());
        n += 1;
    }
    assert!(n >= 5, "the {target} corpus has only {n} inputs");
}

/// xorshift64*: the same inputs on every run.
fn random_inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut s = seed;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    (0..count).map(move |_| {
        let len = (next() as usize) % max_len;
        (0..len).map(|_| next() as u8).collect()
    })
}

#[test]
fn frames_corpus() {
    replay("frames", fuzzing::frames);
}

#[test]
fn frames_random() {
    for data in random_inputs(0x5eed, 3_000, 512) {
        fuzzing::frames(&data);
    }
}

#[test]
fn untrusted_corpus() {
    replay("untrusted", fuzzing::untrusted);
}

#[test]
fn untrusted_random() {
    for data in random_inputs(0xbad, 3_000, 256) {
        fuzzing::untrusted(&data);
    }
}

#[test]
fn routing_corpus() {
    replay("routing", fuzzing::routing);
}

#[test]
fn routing_random() {
    // Each input runs a small cluster: fewer of them.
    for data in random_inputs(0x7a11, 150, 96) {
        fuzzing::routing(&data);
    }
}

#[test]
fn envelopes_corpus() {
    replay("envelopes", fuzzing::envelopes);
}

#[test]
fn envelopes_random() {
    for mut data in random_inputs(0xe4e1, 5_000, 160) {
        // Mostly past the version and kind bytes, so the header checks are reached.
        if data.len() > 1 && data[0] % 4 != 0 {
            data[0] = 1;
            data[1] = 1 + data[1] % 2;
        }
        fuzzing::envelopes(&data);
    }
}
