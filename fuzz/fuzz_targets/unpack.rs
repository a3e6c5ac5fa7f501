//! Any bytes as a release archive (gzip-compressed or, wrapped here, raw
//! tar): the unpacker may refuse, never panic, and never write anything
//! outside the directory it unpacks into.
#![no_main]

use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_agent::unpack::{UnpackLimits, unpack};
use libfuzzer_sys::fuzz_target;

fn tree(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.push(path.strip_prefix(base).unwrap_or(&path).to_owned());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            tree(&path, base, out);
        }
    }
}

fn check(archive_bytes: &[u8]) {
    let Ok(sandbox) = tempfile::tempdir() else {
        return;
    };
    let archive = sandbox.path().join("artifact.tar.gz");
    if std::fs::write(&archive, archive_bytes).is_err() {
        return;
    }
    let releases = sandbox.path().join("releases");
    if std::fs::create_dir(&releases).is_err() {
        return;
    }
    let dest = releases.join("new");
    let limits = UnpackLimits {
        max_bytes: 1 << 20,
        max_entries: 64,
    };
    let _ = unpack(&archive, &dest, limits);
    let mut written = Vec::new();
    tree(sandbox.path(), sandbox.path(), &mut written);
    for path in written {
        assert!(
            path == Path::new("artifact.tar.gz")
                || path == Path::new("releases")
                || path.starts_with("releases/new"),
            "the unpacker wrote {path:?} outside the release directory"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes as a tar inside gzip, so the fuzzer reaches the tar
    // reader without having to find the gzip format first.
    let mut gz = flate2_lite::encoder();
    if gz.write_all(data).is_ok() {
        if let Ok(bytes) = gz.finish() {
            check(&bytes);
        }
    }
});

mod flate2_lite {
    pub fn encoder() -> flate2::write::GzEncoder<Vec<u8>> {
        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())
    }
}
