//! Any bytes as a manifest: parsed or refused, never a panic; whatever
//! parses writes back to JSON that parses to the same manifest.
#![no_main]

use ferry_protocol::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::from_json(data) {
        let again =
            Manifest::from_json(&manifest.to_json()).expect("a manifest's own JSON reads back");
        assert_eq!(again, manifest);
    }
});
