//! A real mosquitto broker on a free loopback port, for as long as the value lives.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    pub port: u16,
    child: Child,
    config: std::path::PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto with anonymous access; `extra` is appended to its config.
    pub fn start(dir: &Path, extra: &str) -> Self {
        let port = free_port();
        let config = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n{extra}\n"),
        )
        .unwrap();
        let child = spawn(&config, port);
        Self {
            port,
            child,
            config,
        }
    }

    /// Kills the broker and starts a new one on the same port, losing every
    /// session and retained message.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.config, self.port);
    }

    /// Kills the broker (until [`Mosquitto::start_again`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a broker again on the same port, with nothing retained.
    pub fn start_again(&mut self) {
        self.child = spawn(&self.config, self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

fn spawn(config: &Path, port: u16) -> Child {
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("mosquitto not found ({e}); run scripts/setup"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
