//! Running the `ferry` binary as a user would, in a scratch directory that
//! is also its HOME (so no manager config of the machine leaks in).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ferry` in `dir`.
pub fn ferry(dir: &Path, args: &[&str]) -> Run {
    ferry_env(dir, &[], args)
}

/// Runs `ferry` in `dir` with extra environment variables.
pub fn ferry_env(dir: &Path, envs: &[(&str, &str)], args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("FERRY_URL")
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_CONFIG")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// Runs a command that must succeed.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let run = ferry(dir, args);
    assert_eq!(run.code, 0, "ferry {args:?} failed:\n{}", run.stderr);
    run.stdout
}

/// Runs a command that must fail, and returns its one-line complaint.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let run = ferry(dir, args);
    assert_eq!(
        run.code, 1,
        "ferry {args:?} should fail:\n{}{}",
        run.stdout, run.stderr
    );
    let line = run.stderr.trim_end();
    assert!(!line.contains('\n'), "more than one line: {line}");
    assert!(line.starts_with("ferry: "), "{line}");
    line.to_owned()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real ARMv7 hard-float ELF file (the ARM C library's loader), for
/// releases whose program is packaged but never run: `ferry package` checks
/// the entrypoint against the target as devices do.
pub fn arm_program() -> Vec<u8> {
    let loader = "/usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3";
    std::fs::read(loader)
        .unwrap_or_else(|e| panic!("{loader}: {e}; run scripts/setup (libc6-armhf-cross)"))
}
