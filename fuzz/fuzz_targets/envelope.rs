//! Any bytes as a signed envelope, through the full trust check a device
//! runs: it may refuse, never panic, and never accept. The trusted key
//! (seed 42) signed nothing in the corpus, so an acceptance is a forgery.
#![no_main]

use ferry_protocol::trust::NothingInstalled;
use ferry_protocol::{Checks, SecretKey, Timestamp, TrustPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = TrustPolicy::new([SecretKey::from_seed(&[42; 32]).public_key()], 1) else {
        return;
    };
    let checks = Checks {
        now: Timestamp::from_unix_secs(1_800_000_000).system_time(),
        target: None,
        installed: &NothingInstalled,
    };
    assert!(
        policy.verify_json(data, &checks).is_err(),
        "an envelope nobody signed was accepted"
    );
});
