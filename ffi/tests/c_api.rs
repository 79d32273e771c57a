//! The C ABI from C and C++: the committed header is what cbindgen generates; the C test
//! program (every function, every error code it can provoke) and the examples build with
//! the system compilers and run cleanly, normally and under AddressSanitizer.
//!
//! The library is built by a nested `cargo build` into its own target directory (the
//! outer `cargo test` holds the main one's lock, and does not build cdylib/staticlib
//! outputs for tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header_path() -> PathBuf {
    crate_dir().join("include").join("isolate_cluster.h")
}

/// The header cbindgen generates from the crate's source with the committed config.
fn generated_header() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn the_committed_header_is_what_cbindgen_generates() {
    let fresh = generated_header();
    if std::env::var_os("IC_UPDATE_HEADER").is_some() {
        std::fs::write(header_path(), &fresh).expect("write the header");
        return;
    }
    let committed = std::fs::read_to_string(header_path()).expect("the committed header");
    assert!(
        committed == fresh,
        "ffi/include/isolate_cluster.h is out of date: regenerate it with \
         `IC_UPDATE_HEADER=1 cargo test -p isolate-cluster-ffi --test c_api header` and commit it"
    );
}

/// Builds the library once; returns the directory holding `libisolate_cluster.{a,so}`.
fn library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = crate_dir().join("..").join("target").join("ffi-c");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // With network support, for `net_test.c`.
        let status = Command::new(cargo)
            .args(["build", "-p", "isolate-cluster-ffi", "--features", "zenoh"])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(crate_dir())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the library failed");
        target.join("debug")
    })
}

/// Compiles `sources` into `out` with `compiler`, linking the static library.
fn compile(compiler: &str, sources: &[&str], out: &str, extra: &[&str]) -> PathBuf {
    let lib = library_dir();
    let exe = lib.join(out);
    let mut cmd = Command::new(compiler);
    cmd.args(["-g", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .args(extra);
    for s in sources {
        cmd.arg(crate_dir().join(s));
    }
    cmd.arg("-o")
        .arg(&exe)
        .arg(lib.join("libisolate_cluster.a"))
        .args(["-lpthread", "-ldl", "-lm"]);
    let output = cmd.output().expect("run the compiler");
    assert!(
        output.status.success(),
        "{compiler} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Runs `exe` with a time limit; returns its stdout, failing on a non-zero exit.
fn run(exe: &Path, env: &[(&str, &str)], limit: Duration, args: &[&str]) -> String {
    let mut child = Command::new(exe)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the program");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                status.success(),
                "{} failed ({status}):\n{stdout}\n{}",
                exe.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            return stdout;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{} did not finish within {limit:?}", exe.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn the_c_api_test_program_passes() {
    let exe = compile("gcc", &["tests/api_test.c"], "api_test", &["-std=c11"]);
    let out = run(&exe, &[], LIMIT, &[]);
    assert!(out.contains("api_test: all checks passed"), "{out}");
}

#[test]
fn the_c_api_test_program_passes_under_address_sanitizer() {
    let exe = compile(
        "gcc",
        &["tests/api_test.c"],
        "api_test_asan",
        &["-std=c11", "-fsanitize=address", "-fno-omit-frame-pointer"],
    );
    let out = run(&exe, &[("ASAN_OPTIONS", "detect_leaks=1")], LIMIT, &[]);
    assert!(out.contains("api_test: all checks passed"), "{out}");
}

/// Two nodes of one network in one C program (`tests/net_test.c`), normally and under
/// AddressSanitizer (leak detection off: Zenoh's runtime keeps threads and buffers until
/// the process exits).
#[test]
fn two_nodes_talk_through_the_c_api() {
    for (flags, name, asan) in [
        (&[][..], "net_test", ""),
        (
            &["-fsanitize=address", "-fno-omit-frame-pointer"][..],
            "net_test_asan",
            "detect_leaks=0",
        ),
    ] {
        let mut extra = vec!["-std=c11"];
        extra.extend_from_slice(flags);
        let exe = compile("gcc", &["tests/net_test.c"], name, &extra);
        let dir = std::env::temp_dir().join(format!("ic-c-net-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("rendezvous directory");
        let out = run(
            &exe,
            &[("ASAN_OPTIONS", asan)],
            LIMIT,
            &[dir.to_str().expect("UTF-8 temp dir")],
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.contains("net_test: all"), "{out}");
    }
}

#[test]
fn the_c_and_cpp_examples_run() {
    for (flags, name) in [
        (&[][..], "pingpong"),
        (&["-fsanitize=address"][..], "pingpong_asan"),
    ] {
        let mut extra = vec!["-std=c11"];
        extra.extend_from_slice(flags);
        let exe = compile("gcc", &["examples/pingpong.c"], name, &extra);
        let out = run(&exe, &[("IC_PINGPONG_ROUNDS", "20000")], LIMIT, &[]);
        assert!(out.contains("round trips: 20000"), "{out}");
    }
    for (flags, name) in [
        (&[][..], "hello"),
        (&["-fsanitize=address"][..], "hello_asan"),
    ] {
        let mut extra = vec!["-std=c++17"];
        extra.extend_from_slice(flags);
        let exe = compile("g++", &["examples/hello.cpp"], name, &extra);
        let out = run(&exe, &[], LIMIT, &[]);
        assert!(out.contains("hello from /greeter, hello from C++"), "{out}");
    }
}
