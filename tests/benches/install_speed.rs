//! How fast a release goes in, against the floor and against Mender.
//!
//! For a 1 MiB and a 50 MiB payload (incompressible, beside a small C
//! service), each timed from start until the new service has written its
//! start line, five runs each, the median printed:
//! - **floor**: one pass over the artifact that hashes and unpacks at once
//!   (`tee >(sha256sum) | tar xz`), then the service started;
//! - **Ferry install**: `ferry-agent install ENVELOPE ARTIFACT` (the offline
//!   path: verify, hash, unpack, ELF check, swap, restart), the `device`
//!   profile binary;
//! - **Mender install**: `mender install` + `mender commit` of a signed
//!   (ECDSA P-256) single-file artifact carrying the payload file alone,
//!   then the service started (Mender's module copies one file and restarts
//!   nothing: less work than Ferry's, so the comparison favours Mender);
//! - **Ferry apply**: from `POST /v1/deployments` to the new version
//!   serving, through a manager and the agent daemon (desired state over
//!   MQTT, download over HTTP).
//!
//! Then verification: SHA-256 as the agent hashes (`ArtifactCheck`, 64 KiB
//! reads) against `sha256sum` on the same 50 MiB artifact, and ed25519
//! envelope verifications per second.
//!
//! `cargo bench -p ferry-e2e --bench install_speed` (Mender's figures need
//! `mender-client` and `mender-artifact`, which `scripts/bench` installs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::{BrokerKind, Release, Site, kill_services, large_release, native_agent_binary};
use ferry_protocol::digest::ArtifactCheck;
use ferry_protocol::trust::NothingInstalled;
use ferry_protocol::{Checks, SecretKey, TrustPolicy};
use serde_json::json;

const RUNS: usize = 5;
const SIZES: [(usize, &str); 2] = [(1 << 20, "1 MiB"), (50 << 20, "50 MiB")];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Waits until `out` has a line starting with `start VERSION`.
fn wait_started(out: &Path, version: &str, since: Instant) -> f64 {
    let wanted = format!("start {version} ");
    loop {
        if std::fs::read_to_string(out).is_ok_and(|t| t.lines().any(|l| l.starts_with(&wanted))) {
            return since.elapsed().as_secs_f64();
        }
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "{version} never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A release of `size` payload bytes whose service records to `out`.
struct Payload {
    release: Release,
    envelope: PathBuf,
    /// The packaged tree: the payload file and the service binary.
    tree: PathBuf,
    out: PathBuf,
}

fn payload(root: &Path, key: &SecretKey, size: usize, version: &str, seq: u64) -> Payload {
    let dir = root.join(format!("payload-{size}-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("service.out");
    let release = large_release(&dir, key, version, seq, &out, size);
    let envelope = dir.join("envelope.json");
    std::fs::write(&envelope, release.envelope.to_json()).unwrap();
    Payload {
        tree: dir.join(format!("tree-{version}")),
        release,
        envelope,
        out,
    }
}

fn floor(p: &Payload, scratch: &Path) -> f64 {
    let dir = scratch.join("floor");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(&p.out);
    let script = format!(
        "tee >(sha256sum > {sum}) < {art} | tar xzf - -C {dir}; wait",
        sum = scratch.join("floor.sum").display(),
        art = p.release.artifact.display(),
        dir = dir.display()
    );
    let started = Instant::now();
    let status = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success());
    let mut service = Command::new(dir.join("bin/api")).spawn().unwrap();
    let took = wait_started(&p.out, &p.release.manifest.version.to_string(), started);
    let _ = service.kill();
    let _ = service.wait();
    took
}

fn ferry_install(p: &Payload, agent: &Path, trust: &Path, scratch: &Path) -> f64 {
    let data = scratch.join("ferry-data");
    let _ = std::fs::remove_dir_all(&data);
    let config = scratch.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"bench\"\ndata_dir = \"{}\"\nsupervisor = \"direct\"\nisolate_services = false\n[trust]\nkeys = [\"{}\"]\n",
            data.display(),
            trust.display()
        ),
    )
    .unwrap();
    let _ = std::fs::remove_file(&p.out);
    let started = Instant::now();
    let mut install = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .arg("install")
        .arg(&p.envelope)
        .arg(&p.release.artifact)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let took = wait_started(&p.out, &p.release.manifest.version.to_string(), started);
    // The health gate runs on (a policy wait, not work); it must pass.
    assert!(install.wait().unwrap().success());
    kill_services(&data);
    took
}

/// Mender's standalone install, set up once per payload.
struct Mender {
    artifact: PathBuf,
    config: PathBuf,
    fallback: PathBuf,
    dest: PathBuf,
}

fn mender_available() -> bool {
    ["mender", "mender-artifact"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) && Path::new("/etc/mender/artifact_info").exists()
}

fn mender_setup(p: &Payload, scratch: &Path) -> Mender {
    let dir = scratch.join("mender");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key.pem");
    let public = dir.join("public.pem");
    let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(Command::new("openssl")
        .args([
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
        ])
        .arg(&key));
    run(Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .stderr(std::process::Stdio::null()));
    let dest = dir.join("dest");
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("dest_dir"), dest.to_string_lossy().as_bytes()).unwrap();
    std::fs::write(files.join("filename"), "padding").unwrap();
    std::fs::write(files.join("permissions"), "644").unwrap();
    std::fs::copy(p.tree.join("padding"), files.join("padding")).unwrap();
    let artifact = dir.join("payload.mender");
    run(Command::new("mender-artifact")
        .current_dir(&files)
        .args([
            "write",
            "module-image",
            "-T",
            "single-file",
            "-t",
            "bench",
            "-n",
            "payload",
        ])
        .args([
            "-f",
            "dest_dir",
            "-f",
            "filename",
            "-f",
            "permissions",
            "-f",
            "padding",
        ])
        .arg("-k")
        .arg(&key)
        .arg("-o")
        .arg(&artifact)
        .stdout(std::process::Stdio::null()));
    let config = dir.join("mender.conf");
    std::fs::write(&config, json!({ "ArtifactVerifyKey": public }).to_string()).unwrap();
    let fallback = dir.join("fallback.conf");
    std::fs::write(&fallback, "{}").unwrap();
    Mender {
        artifact,
        config,
        fallback,
        dest,
    }
}

fn mender_install(m: &Mender, p: &Payload, scratch: &Path) -> f64 {
    let data = scratch.join("mender-data");
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&m.dest);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("device_type"), "device_type=bench\n").unwrap();
    let _ = std::fs::remove_file(&p.out);
    let mender = |what: &str| {
        let status = Command::new("mender")
            .arg("--config")
            .arg(&m.config)
            .arg("--fallback-config")
            .arg(&m.fallback)
            .arg("--data")
            .arg(&data)
            .arg("--no-syslog")
            .arg(what)
            .args((what == "install").then_some(&m.artifact))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "mender {what} failed");
    };
    let started = Instant::now();
    mender("install");
    mender("commit");
    let mut service = Command::new(p.tree.join("bin/api")).spawn().unwrap();
    let took = wait_started(&p.out, &p.release.manifest.version.to_string(), started);
    let _ = service.kill();
    let _ = service.wait();
    assert_eq!(
        std::fs::metadata(m.dest.join("padding"))
            .map(|m| m.len())
            .ok(),
        std::fs::metadata(p.tree.join("padding"))
            .map(|m| m.len())
            .ok(),
        "Mender did not install the payload"
    );
    took
}

/// Deploy → serving through a manager and the agent daemon, one run per
/// payload in `releases` (each a newer version).
async fn ferry_apply(releases: &[Payload], agent: &Path, trust: &Path, root: &Path) -> Vec<f64> {
    let site = Site::start(root, BrokerKind::Embedded, &["bench"], None).await;
    let daemon = ferry_e2e::ProcessAgent::start(
        agent,
        root,
        "bench",
        site.password("bench"),
        site.endpoints(),
        trust,
    );
    site.manager
        .wait_device("bench", "the agent online", |d| d["online"] == true)
        .await;
    let mut took = Vec::new();
    for p in releases {
        site.manager.publish(&p.release).await;
        let version = p.release.manifest.version.to_string();
        let started = Instant::now();
        site.manager
            .post(
                "/v1/deployments",
                json!({ "service": "api", "version": version, "devices": ["bench"] }),
            )
            .await;
        let out = p.out.clone();
        let v = version.clone();
        took.push(
            tokio::task::spawn_blocking(move || wait_started(&out, &v, started))
                .await
                .unwrap(),
        );
        // The next deploy waits for this one's commit (its health gate).
        site.manager
            .wait_device("bench", "the commit", |d| {
                d["reported"]["last_result"]["version"] == version.as_str()
            })
            .await;
    }
    drop(daemon);
    site.manager.stop().await;
    took
}

fn verification(artifact: &Path, release: &Release) {
    let bytes = std::fs::metadata(artifact).unwrap().len() as f64 / 1048576.0;
    let mut sha256sum = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let out = Command::new("sha256sum").arg(artifact).output().unwrap();
        assert!(out.status.success());
        sha256sum.push(started.elapsed().as_secs_f64());

        let started = Instant::now();
        let mut file = std::fs::File::open(artifact).unwrap();
        let mut check = ArtifactCheck::new(&release.manifest.artifact);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            check.update(&buf[..n]).unwrap();
        }
        check.finish().unwrap();
        ours.push(started.elapsed().as_secs_f64());
    }
    let (theirs, ours) = (median(sha256sum), median(ours));
    println!(
        "sha256, {bytes:.0} MiB artifact: ferry (ArtifactCheck) {:>7.1} MiB/s | sha256sum {:>7.1} MiB/s | ratio {:.2}",
        bytes / ours,
        bytes / theirs,
        theirs / ours
    );
    let policy = TrustPolicy::new([SecretKey::from_seed(&[5; 32]).public_key()], 1).unwrap();
    let envelope = release.envelope.to_json();
    let checks = Checks {
        now: std::time::SystemTime::now(),
        target: None,
        installed: &NothingInstalled,
    };
    let n = 2000;
    let started = Instant::now();
    for _ in 0..n {
        policy.verify_json(&envelope, &checks).unwrap();
    }
    let each = started.elapsed().as_secs_f64() / f64::from(n);
    println!(
        "ed25519 envelope verification (parse, signature, manifest checks): {:.0} per second, {:.1} µs each",
        1.0 / each,
        each * 1e6
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let agent = native_agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SecretKey::from_seed(&[5; 32]);
    let trust = root.join("ops.pub");
    std::fs::write(&trust, key.public_key().to_text()).unwrap();
    let with_mender = mender_available();
    if !with_mender {
        println!(
            "Mender: not installed (scripts/bench installs mender-client and mender-artifact); its rows are skipped"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("median of {RUNS} runs; each until the new service has written its start line");
    let mut largest = None;
    for (size, name) in SIZES {
        let p = payload(root, &key, size, "1.0.0", 1);
        let scratch = root.join(format!("scratch-{size}"));
        std::fs::create_dir_all(&scratch).unwrap();
        let floor_s = median((0..RUNS).map(|_| floor(&p, &scratch)).collect());
        let ferry_s = median(
            (0..RUNS)
                .map(|_| ferry_install(&p, &agent, &trust, &scratch))
                .collect(),
        );
        let mender_s = with_mender.then(|| {
            let m = mender_setup(&p, &scratch);
            median(
                (0..RUNS)
                    .map(|_| mender_install(&m, &p, &scratch))
                    .collect(),
            )
        });
        let updates: Vec<Payload> = (1..=3)
            .map(|i| payload(root, &key, size, &format!("1.0.{i}"), 1 + i))
            .collect();
        let apply_s = median(runtime.block_on(ferry_apply(&updates, &agent, &trust, &scratch)));
        println!(
            "{name:>6}: floor {:>7.1} ms | ferry install {:>7.1} ms ({:.2}x floor) | mender install {} | ferry apply (deploy → serving) {:>7.1} ms ({:.2}x floor)",
            floor_s * 1e3,
            ferry_s * 1e3,
            ferry_s / floor_s,
            mender_s.map_or("-".to_owned(), |m| format!(
                "{:>7.1} ms (ferry {:.2}x faster)",
                m * 1e3,
                m / ferry_s
            )),
            apply_s * 1e3,
            apply_s / floor_s,
        );
        largest = Some(p);
    }
    if let Some(p) = largest {
        verification(&p.release.artifact, &p.release);
    }
}
