//! The unpacker against crafted archives kept in `agent/tests/corpus/tar/`:
//! each `NAME.tar.gz` must be refused with the words in `NAME.expect`, and
//! nothing may be written outside the directory it unpacks into.
//!
//! [`generate`] makes them (the tar crate's writer would refuse most, so
//! headers are written raw); `FERRY_WRITE_CORPUS=1 cargo test -p
//! ferry-agent --test tar_corpus` writes them. Files added by hand run too.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_agent::unpack::{UnpackLimits, unpack};
use tar::EntryType;

const LIMITS: UnpackLimits = UnpackLimits {
    max_bytes: 1 << 20,
    max_entries: 10,
};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// One raw entry: name (written as is, up to 100 bytes), type, link name, data.
struct Raw<'a>(&'a [u8], EntryType, &'a str, &'a [u8]);

/// A tar of raw entries, written without any of a tar writer's checks.
fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for Raw(name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(*kind);
        header.set_mode(0o755);
        header.set_size(data.len() as u64);
        if matches!(kind, EntryType::Char | EntryType::Block) {
            header.set_device_major(1).unwrap();
            header.set_device_minor(3).unwrap();
        }
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn file(name: &str) -> Raw<'_> {
    Raw(name.as_bytes(), EntryType::Regular, "", b"data\n")
}

fn generate() -> BTreeMap<&'static str, (Vec<u8>, &'static str)> {
    use EntryType::*;
    let mut c = BTreeMap::new();
    let mut add = |name: &'static str, tar: Vec<u8>, expect: &'static str| {
        c.insert(name, (gzip(&tar), expect));
    };
    add("dotdot", raw_tar(&[file("../evil")]), "entry \"../evil\"");
    add(
        "dotdot_nested",
        raw_tar(&[file("bin/../../evil")]),
        "bin/../../evil",
    );
    add(
        "absolute",
        raw_tar(&[file("/tmp/ferry-corpus-evil")]),
        "/tmp/ferry-corpus-evil",
    );
    add(
        "symlink_out",
        raw_tar(&[Raw(b"bin/sh", Symlink, "/bin/sh", b"")]),
        "symbolic link",
    );
    add(
        "symlink_relative",
        raw_tar(&[Raw(b"etc", Symlink, "../../etc", b""), file("etc/passwd")]),
        "symbolic link",
    );
    add(
        "hardlink_out",
        raw_tar(&[Raw(b"bin/passwd", Link, "/etc/passwd", b"")]),
        "hard link",
    );
    add(
        "char_device",
        raw_tar(&[Raw(b"dev/null", Char, "", b"")]),
        "device",
    );
    add(
        "block_device",
        raw_tar(&[Raw(b"dev/sda", Block, "", b"")]),
        "device",
    );
    add(
        "fifo",
        raw_tar(&[Raw(b"run/pipe", Fifo, "", b"")]),
        "only regular files and directories",
    );
    add(
        "duplicate",
        raw_tar(&[file("bin/api"), file("bin/api")]),
        "appears twice",
    );
    let many: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
    let many: Vec<Raw<'_>> = many.iter().map(|n| file(n)).collect();
    add("too_many_entries", raw_tar(&many), "more than 10 entries");
    let big = vec![0u8; (LIMITS.max_bytes + 1) as usize];
    add(
        "too_many_bytes",
        raw_tar(&[Raw(b"blob", Regular, "", &big)]),
        "more than 1048576 bytes",
    );
    // GNU long name and pax path records carry the real name in an entry
    // of their own: the unpacker must judge the name they give.
    let long = format!("{}/../../../evil", "a".repeat(120));
    let mut long_data = long.as_bytes().to_vec();
    long_data.push(0);
    add(
        "gnu_longname_climbs_out",
        raw_tar(&[
            Raw(b"././@LongLink", GNULongName, "", &long_data),
            file("x"),
        ]),
        "../../../evil",
    );
    let record = "path=../pax-evil\n";
    let pax = format!("{} {record}", record.len() + 3);
    add(
        "pax_path_climbs_out",
        raw_tar(&[Raw(b"pax", XHeader, "", pax.as_bytes()), file("innocent")]),
        "pax-evil",
    );
    add(
        "file_then_dir_through_it",
        raw_tar(&[file("bin"), file("bin/api")]),
        "cannot write",
    );
    let good = gzip(&raw_tar(&[file("bin/api")]));
    c.insert(
        "truncated",
        (good[..good.len() / 2].to_vec(), "corrupt or truncated"),
    );
    c.insert(
        "not_gzip",
        (
            b"just some text, not an archive".to_vec(),
            "corrupt or truncated",
        ),
    );
    c.insert(
        "gzip_of_garbage",
        (gzip(&[0x41; 700]), "corrupt or truncated"),
    );
    c
}

#[test]
fn the_corpus_on_disk_is_what_the_generator_makes() {
    let write = std::env::var_os("FERRY_WRITE_CORPUS").is_some();
    for (name, (bytes, expect)) in generate() {
        let input = corpus().join(format!("{name}.tar.gz"));
        if write {
            fs::create_dir_all(corpus()).unwrap();
            fs::write(&input, &bytes).unwrap();
            fs::write(
                corpus().join(format!("{name}.expect")),
                format!("{expect}\n"),
            )
            .unwrap();
        } else {
            assert_eq!(
                fs::read(&input).ok().as_deref(),
                Some(&bytes[..]),
                "{} differs from the generator; FERRY_WRITE_CORPUS=1 rewrites it",
                input.display()
            );
        }
    }
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.push(path.strip_prefix(dir).unwrap().to_owned());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(
                tree(&path)
                    .into_iter()
                    .map(|p| path.strip_prefix(dir).unwrap().join(p)),
            );
        }
    }
    out
}

#[test]
fn every_crafted_archive_is_refused_and_writes_nothing_outside() {
    let mut tried = 0;
    let mut wrong = Vec::new();
    for file in fs::read_dir(corpus()).unwrap() {
        let path = file.unwrap().path();
        if !path.to_string_lossy().ends_with(".tar.gz") {
            continue;
        }
        let stem = path
            .to_string_lossy()
            .trim_end_matches(".tar.gz")
            .to_owned();
        let expect = fs::read_to_string(format!("{stem}.expect"))
            .unwrap_or_else(|_| panic!("{} has no .expect file", path.display()));
        let expect = expect.trim_end_matches('\n');
        // The release directory sits two levels down, so `..` and `../..`
        // land in directories this test watches.
        let sandbox = tempfile::tempdir().unwrap();
        let dest = sandbox.path().join("releases/new");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        match unpack(&path, &dest, LIMITS) {
            Ok(_) => wrong.push(format!("{} was unpacked", path.display())),
            Err(e) if !e.to_string().contains(expect) => wrong.push(format!(
                "{}: refused with {:?}, expected words {expect:?}",
                path.display(),
                e.to_string()
            )),
            Err(_) => {}
        }
        let outside: Vec<PathBuf> = tree(sandbox.path())
            .into_iter()
            .filter(|p| !p.starts_with("releases/new") && p != Path::new("releases"))
            .collect();
        if !outside.is_empty() {
            wrong.push(format!("{} wrote outside: {outside:?}", path.display()));
        }
        tried += 1;
    }
    assert!(
        !Path::new("/tmp/ferry-corpus-evil").exists(),
        "an absolute path was written"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(tried >= 18, "only {tried} archives in the corpus");
}

/// The `unpack` fuzzer's kept corpus (`fuzz/corpus/unpack/`), replayed with
/// its invariant: whatever the bytes, nothing lands outside the release.
#[test]
fn the_fuzz_corpus_unpacks_nothing_outside() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/unpack");
    let mut tried = 0;
    for file in fs::read_dir(&dir).unwrap() {
        let path = file.unwrap().path();
        let sandbox = tempfile::tempdir().unwrap();
        let dest = sandbox.path().join("releases/new");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let _ = unpack(&path, &dest, LIMITS);
        let outside: Vec<PathBuf> = tree(sandbox.path())
            .into_iter()
            .filter(|p| !p.starts_with("releases/new") && p != Path::new("releases"))
            .collect();
        assert!(
            outside.is_empty(),
            "{} wrote outside: {outside:?}",
            path.display()
        );
        tried += 1;
    }
    assert!(tried >= 18, "only {tried} inputs in {}", dir.display());
}
