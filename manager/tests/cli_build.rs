//! `ferry build go|c` through the binary: what a person and a script see.

mod common;

use std::path::{Path, PathBuf};

use common::{ferry_env, ok};
use serde_json::Value;

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cross/samples")
        .join(name)
}

/// One Go build cache for every test here (HOME is a scratch directory).
fn go_cache() -> (&'static str, String) {
    (
        "GOCACHE",
        format!("{}/go-cache", env!("CARGO_TARGET_TMPDIR")),
    )
}

#[test]
fn build_go_prints_what_it_built_and_json_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let source = sample("hello-go");
    let source = source.to_str().unwrap();
    let (key, cache) = go_cache();
    let args = [
        "build",
        "go",
        source,
        "--service",
        "hello-go",
        "--version",
        "1.2.3",
        "--sequence",
        "5",
        "-o",
        "out",
        "--probe",
        "http://127.0.0.1:8080/healthz",
    ];
    let run = ferry_env(dir.path(), &[(key, &cache)], &args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("built hello-go 1.2.3 for armv7-unknown-linux-gnueabihf with go1."),
        "{}",
        run.stdout
    );

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = ferry_env(dir.path(), &[(key, &cache)], &json_args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let built: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(built["ok"], true);
    assert_eq!(built["kind"], "go");
    assert!(built["program_size"].as_u64().unwrap() > 100_000);
    assert!(built["compiler"].as_str().unwrap().starts_with("go1."));
    assert!(built["debug_file"].is_null());
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/hello-go-1.2.3.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["sequence"], 5);
    assert_eq!(manifest["target"], "armv7-unknown-linux-gnueabihf");
    assert_eq!(
        manifest["health"]["probe"]["url"],
        "http://127.0.0.1:8080/healthz"
    );
    assert!(
        manifest["build"]["packager"]
            .as_str()
            .unwrap()
            .starts_with("ferry ")
    );

    // What ferry built, ferry signs and verifies like any other release.
    // (verify checks the artifact against the manifest too.)
    ok(dir.path(), &["keygen", "--out", "ops"]);
    ok(
        dir.path(),
        &[
            "sign",
            "out/hello-go-1.2.3.manifest.json",
            "--key",
            "ops.key",
            "-o",
            "env.json",
        ],
    );
    let verified = ok(
        dir.path(),
        &[
            "verify",
            "env.json",
            "--pub",
            "ops.pub",
            "--artifact",
            "out/hello-go-1.2.3.tar.gz",
        ],
    );
    assert!(
        verified.starts_with("OK: hello-go 1.2.3 (sequence 5"),
        "{verified}"
    );
}

#[test]
fn build_c_keeps_debug_info_beside_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("hello-c");
    std::fs::create_dir_all(&source).unwrap();
    for file in ["hello.c", "Makefile"] {
        std::fs::copy(sample("hello-c").join(file), source.join(file)).unwrap();
    }
    let out = ok(
        dir.path(),
        &[
            "build",
            "c",
            "hello-c",
            "--service",
            "hello-c",
            "--version",
            "0.9.0",
            "--sequence",
            "1",
            "-o",
            "out",
            "--static",
            "--json",
        ],
    );
    let built: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(built["kind"], "c");
    let debug = built["debug_file"].as_str().unwrap();
    assert!(debug.ends_with("out/hello-c-0.9.0.debug"), "{debug}");
    assert!(dir.path().join(debug).is_file());
    assert!(
        built["flags"]
            .as_str()
            .unwrap()
            .contains("-mtune=cortex-a9")
    );
}

#[test]
fn a_missing_toolchain_names_the_package_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let source = sample("hello-go");
    for (kind, package) in [("go", "golang-go"), ("c", "gcc-arm-linux-gnueabihf")] {
        let run = ferry_env(
            dir.path(),
            &[("PATH", empty.to_str().unwrap())],
            &[
                "build",
                kind,
                source.to_str().unwrap(),
                "--service",
                "x",
                "--version",
                "1.0.0",
                "--sequence",
                "1",
                "-o",
                "out",
            ],
        );
        assert_eq!(run.code, 1, "{}", run.stdout);
        let line = run.stderr.trim_end();
        assert!(!line.contains('\n'), "more than one line: {line}");
        assert!(
            line.contains(&format!("apt-get install {package}")),
            "{line}"
        );
        assert!(!dir.path().join("out/x-1.0.0.tar.gz").exists());
    }
}

#[test]
fn a_compile_error_shows_the_compilers_words() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("broken");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(
        source.join("main.c"),
        "int main(void) { return not_declared; }\n",
    )
    .unwrap();
    let run = ferry_env(
        dir.path(),
        &[],
        &[
            "build",
            "c",
            "broken",
            "--service",
            "broken",
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "-o",
            "out",
        ],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with("ferry: error: cannot build broken"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("not_declared"), "{}", run.stderr);
}
