//! The project's systemd units keep their sandbox: `systemd-analyze
//! security` scores them below a ceiling, and the manager really runs under
//! its unit (PID 1 systemd in a throwaway container), without capabilities,
//! under a seccomp filter, writing only its state directory.

use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::container::SystemdContainer;
use ferry_e2e::{ferry_binary, free_port};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd");

/// `systemd-analyze security` of a unit file: the overall exposure
/// (0.0 safest to 10.0) and whether it is at most `ceiling`.
fn exposure(unit: &str, ceiling: f64) -> (f64, bool) {
    let path = Path::new(UNITS).join(unit);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={}", (ceiling * 10.0) as u32))
        .arg(&path)
        .output()
        .expect("systemd-analyze not found; run scripts/setup");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure for {unit}: {text}"));
    (overall, out.status.success())
}

#[test]
fn the_units_keep_their_sandbox() {
    for (unit, ceiling) in [("ferry-agent.service", 3.0), ("ferry-manager.service", 1.5)] {
        let (overall, within) = exposure(unit, ceiling);
        println!("{unit}: exposure {overall}");
        assert!(
            within && overall <= ceiling,
            "{unit}: {overall} > {ceiling}"
        );
    }
}

/// A line of `/proc/PID/status` inside the container (its own PID
/// namespace), by its name.
fn status_field(container: &SystemdContainer, pid: &str, field: &str) -> String {
    let out = container.exec(&["cat", &format!("/proc/{pid}/status")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in the status of {pid}"))
        .trim()
        .to_owned()
}

/// Starts the manager's unit in `container` and waits until it serves
/// HTTPS on `http` with the CA it made and has written its operator token;
/// a client trusting that CA, and the token.
async fn start_serving(container: &SystemdContainer, http: u16) -> (reqwest::Client, String) {
    run_all(
        container,
        &[
            &["systemctl", "daemon-reload"],
            &["systemctl", "start", "ferry-manager"],
        ],
    );
    let token_path = container.host_path("/var/lib/ferry-manager/operator.token");
    let ca_path = container.host_path("/var/lib/ferry-manager/ca.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = None;
    let base = format!("https://127.0.0.1:{http}");
    loop {
        if client.is_none() {
            client = std::fs::read(&ca_path).ok().map(|pem| {
                reqwest::Client::builder()
                    .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
                    .build()
                    .unwrap()
            });
        }
        let up = match &client {
            Some(client) => client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            None => false,
        };
        if up && token_path.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the manager did not come up: {:?}",
            container.show("ferry-manager.service")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let token = std::fs::read_to_string(&token_path).unwrap();
    (client.unwrap(), token)
}

/// Runs each command in `container`, asserting it succeeds.
fn run_all(container: &SystemdContainer, commands: &[&[&str]]) {
    for command in commands {
        let out = container.exec(command);
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Installs the binary and the manager's unit in `container`, and makes
/// its user, as the unit's header says.
fn install_manager(container: &SystemdContainer) {
    std::fs::copy(ferry_binary(), container.host_path("/usr/bin/ferry")).unwrap();
    std::fs::copy(
        Path::new(UNITS).join("ferry-manager.service"),
        container.host_path("/etc/systemd/system/ferry-manager.service"),
    )
    .unwrap();
    run_all(
        container,
        &[&[
            "useradd",
            "--system",
            "--home",
            "/var/lib/ferry-manager",
            "ferry",
        ]],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_runs_under_its_sandboxed_unit() {
    let container = SystemdContainer::start();
    let http = free_port();
    let mqtt = free_port();
    install_manager(&container);
    // The unit as its header says to install it, on ports of this test's
    // own (the container shares this machine's network).
    let dropins = container.host_path("/etc/systemd/system/ferry-manager.service.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::write(
        dropins.join("ports.conf"),
        format!(
            "[Service]\nExecStart=\nExecStart=/usr/bin/ferry serve --data-dir /var/lib/ferry-manager \
             --http-listen 127.0.0.1:{http} --mqtt-listen 127.0.0.1:{mqtt}\n"
        ),
    )
    .unwrap();

    // It serves, over TLS with the CA it made: the operator token it wrote
    // works against its API.
    let (client, token) = start_serving(&container, http).await;
    let base = format!("https://127.0.0.1:{http}");
    let token_path = container.host_path("/var/lib/ferry-manager/operator.token");
    let added = client
        .post(format!("{base}/v1/devices"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "device_id": "gw-1" }))
        .send()
        .await
        .unwrap();
    assert!(added.status().is_success(), "{}", added.status());
    assert!(TcpStream::connect(("127.0.0.1", mqtt)).is_ok());

    // Its secrets are its own: the token and the CA key are 0600, owned by
    // the unit's user.
    let meta = std::fs::metadata(&token_path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let key = std::fs::metadata(container.host_path("/var/lib/ferry-manager/ca.key")).unwrap();
    assert_eq!((key.mode() & 0o777, key.uid()), (0o600, meta.uid()));
    let passwd = std::fs::read_to_string(container.host_path("/etc/passwd")).unwrap();
    let ferry_uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("ferry:x:")?.split(':').next()?.parse().ok())
        .unwrap();
    assert_eq!(meta.uid(), ferry_uid);

    // The process is sandboxed as the unit says: no capabilities, no new
    // privileges, a seccomp filter.
    let pid = container.show("ferry-manager.service")["MainPID"].clone();
    assert_ne!(pid, "0");
    assert_eq!(status_field(&container, &pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(&container, &pid, "Seccomp"), "2");
    assert_eq!(status_field(&container, &pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(&container, &pid, "CapEff"), "0000000000000000");
}

/// The replica drop-in: the manager takes its settings from the credential
/// systemd hands it, copied from a file its own user cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_its_settings_from_a_credential_its_user_cannot_read() {
    let container = SystemdContainer::start();
    install_manager(&container);
    let dropins = container.host_path("/etc/systemd/system/ferry-manager.service.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::copy(
        Path::new(UNITS).join("ferry-manager-replica.conf"),
        dropins.join("replica.conf"),
    )
    .unwrap();
    // Settings only the file has: ports of this test's own.
    let (http, mqtt) = (free_port(), free_port());
    let settings = container.host_path("/etc/ferry/manager.toml");
    std::fs::create_dir_all(settings.parent().unwrap()).unwrap();
    std::fs::write(
        &settings,
        format!("http_listen = \"127.0.0.1:{http}\"\nmqtt_listen = \"127.0.0.1:{mqtt}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        &settings,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (client, token) = start_serving(&container, http).await;
    let devices = client
        .get(format!("https://127.0.0.1:{http}/v1/devices"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert!(devices.status().is_success(), "{}", devices.status());
    assert!(TcpStream::connect(("127.0.0.1", mqtt)).is_ok());
    let read = container.exec(&[
        "runuser",
        "-u",
        "ferry",
        "--",
        "cat",
        "/etc/ferry/manager.toml",
    ]);
    assert!(
        !read.status.success(),
        "the service's user reads the settings file"
    );
}
