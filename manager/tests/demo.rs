//! `ferry demo`, run as a newcomer would: it must bring two devices to v1,
//! then v2, and stop cleanly on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::free_port;

#[test]
fn the_demo_deploys_v1_then_v2_to_two_devices_and_stops_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["demo", "--dir"])
        .arg(tmp.path().join("demo"))
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .env("HOME", tmp.path())
        .env_remove("XDG_CONFIG_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(demo.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.starts_with("Press Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    let text = lines.join("\n");
    // Fleet rows read: DEVICE STATUS SERVICE VERSION pid ...
    let rows = |service: &str, version: &str| {
        lines
            .iter()
            .filter(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.get(1) == Some(&"online")
                    && words.get(2) == Some(&service)
                    && words.get(3) == Some(&version)
            })
            .count()
    };
    assert_eq!(rows("hello", "1.0.0"), 2, "{text}");
    assert_eq!(rows("hello", "2.0.0"), 2, "{text}");
    // With a Go toolchain on the machine, the Go sample goes out too.
    let go = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if go {
        assert_eq!(rows("hello-go", "1.0.0"), 2, "{text}");
        assert_eq!(rows("hello-go", "2.0.0"), 2, "{text}");
    } else {
        assert!(text.contains("no Go toolchain found"), "{text}");
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status}");
    // The services the demo's agents started are gone.
    for device in ["demo-1", "demo-2"] {
        let pid_file = tmp
            .path()
            .join(format!("demo/agent-{device}/run/hello.pid"));
        if let Ok(text) = std::fs::read_to_string(pid_file) {
            let pid = text.split_whitespace().next().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(
                stat.is_empty() || stat.contains(") Z "),
                "{device}'s service still runs"
            );
        }
    }
}
