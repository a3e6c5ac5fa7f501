//! A download cut again and again at random offsets (seeded, so a failure
//! repeats): every attempt resumes where the last one stopped, and the
//! release installs with the right hash in the end.

mod support;

use ferry_protocol::messages::Outcome;
use support::artifacts::ArtifactServer;
use support::{Build, Rig, Seeded};

#[tokio::test]
async fn a_download_cut_at_random_offsets_resumes_every_time_and_installs() {
    let seed = 0x5EED_F00D_u64;
    let mut random = Seeded(seed);
    let mut rig = Rig::new();
    // 2 MiB that gzip cannot shrink, so the artifact is big enough to cut often.
    let noise: Vec<u8> = (0..(2 << 20) / 8)
        .flat_map(|_| random.next().to_le_bytes())
        .collect();
    let release = rig.release_with(
        "1.0.0",
        1,
        Build::SERVE,
        &[("data/noise".into(), noise)],
        |_| {},
    );
    let bytes = std::fs::read(&release.artifact).unwrap();
    let server = ArtifactServer::start().await;
    let url = server.add(bytes.clone());
    // Eight transfers, each cut after a random share of what it was sent.
    let cuts: Vec<usize> = (0..8)
        .map(|_| 1 + (random.next() % (bytes.len() as u64 / 10)) as usize)
        .collect();
    server.cut_after(&url, &cuts);

    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = rig.install_from(&release, &url).await;
        if result.outcome == Outcome::Installed {
            break;
        }
        assert_eq!(
            result.outcome,
            Outcome::Failed,
            "seed {seed:#x}: {result:?}"
        );
        assert!(
            attempts <= cuts.len(),
            "seed {seed:#x}: still failing after {attempts} attempts"
        );
    }
    // The agent retries a cut download itself a few times within one
    // install; what matters is where each request started.
    println!(
        "seed {seed:#x}: {attempts} install attempts for {} cuts",
        cuts.len()
    );

    // Each request after the first started where the previous one stopped:
    // the start offsets grow by exactly the bytes each cut transfer carried.
    let starts: Vec<usize> = server
        .ranges()
        .iter()
        .map(|r| {
            r.strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .map_or(0, |n| n.parse().unwrap())
        })
        .collect();
    let mut expected = vec![0];
    for cut in &cuts {
        expected.push(expected.last().unwrap() + cut);
    }
    assert_eq!(starts, expected, "seed {seed:#x}");
    ferry_agent::supervisor::direct::stop_leftovers(&rig.data().join("run"));
}
