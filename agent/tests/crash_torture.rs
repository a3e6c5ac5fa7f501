//! Crash consistency: the agent binary installs release after release and
//! is killed with SIGKILL in the middle, over and over, seeded so any
//! failure repeats. Half the kills land right after each step the agent
//! logs, in turn; the rest at random instants. Every fifth release
//! crash-loops, so rollbacks are killed too.
//!
//! After each kill: `current` points at a whole release, the old one or
//! the new one, never a mix and never dangling. After the next start (which
//! recovers from the journal and finishes the install): the journal is
//! gone, `current` is the release that should run, and exactly one service
//! process runs, that release's program.
//!
//! `FERRY_TORTURE_TRIALS` (default 40) and `FERRY_TORTURE_SEED` change the
//! run; the closing line says what was tried.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::torture::{
    AgentProcess, Known, assert_old_or_new, assert_recovers, env_or, journal_phase,
};
use support::{Build, Rig, Seeded};

#[test]
fn kills_at_every_step_and_at_random_instants_never_leave_a_mix() {
    let trials = env_or("FERRY_TORTURE_TRIALS", 40);
    let seed = env_or("FERRY_TORTURE_SEED", 0xC0FF_EE15);
    let mut random = Seeded(seed);
    let rig = Rig::new();
    let data = rig.data();
    let agent = AgentProcess::new(&rig);
    let mut known = Known::default();

    // 1.0.0 installed; 2.0.0 installed to count the steps of an install.
    let v1 = rig.release("1.0.0", 1, Build::SERVE, |_| {});
    known.add(&v1);
    assert!(agent.run(&v1).0);
    let v2 = rig.release("2.0.0", 2, Build::SERVE, |_| {});
    known.add(&v2);
    let started = Instant::now();
    let (ok, lines) = agent.run(&v2);
    let install_time = started.elapsed();
    assert!(ok, "{lines:?}");
    let steps = lines.len().max(1);
    let mut installed = "2.0.0".to_owned();

    let mut killed_in = BTreeMap::<String, u32>::new();
    for trial in 0..trials {
        let sequence = trial + 3;
        let version = format!("{sequence}.0.0");
        let crashes = trial % 5 == 4;
        let build = if crashes { Build::CRASH } else { Build::SERVE };
        let release = rig.release(&version, sequence, build, |_| {});
        known.add(&release);

        // Kill it: after each logged step in turn, or at a random instant.
        let last = if trial % 2 == 0 {
            let n = 1 + (trial as usize / 2) % steps;
            agent.kill_after_lines(&release, n)
        } else {
            let ms = random.next() % (install_time.as_millis() as u64 + 200);
            agent.kill_after(&release, Duration::from_millis(ms))
        };
        let phase = journal_phase(&data);
        *killed_in.entry(phase.clone()).or_default() += 1;
        let context = format!(
            "seed {seed:#x} trial {trial} ({version}, killed at {last:?}, journal {phase})"
        );

        // Right after the kill: a whole release, old or new.
        assert_old_or_new(&data, &known, &installed, &version, &context);

        // The next start recovers and finishes.
        let expected = assert_recovers(
            &agent, &rig, &known, &release, crashes, &installed, &context,
        );
        installed = expected;
    }
    println!(
        "seed {seed:#x}: {trials} kills ({} at logged steps, {} at random instants; {steps} steps per install), by journal phase at the kill: {killed_in:?}",
        trials.div_ceil(2),
        trials / 2
    );
    ferry_agent::supervisor::direct::stop_leftovers(&data.join("run"));
}
