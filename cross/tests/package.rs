//! Packaging real directories on disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_cross::{PackageError, PackageRequest, package};
use ferry_protocol::manifest::ArtifactKind;
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{RelPath, ServiceName, Sha256Digest, Target};

fn request(dir: &Path) -> PackageRequest {
    PackageRequest {
        dir: dir.to_owned(),
        service: ServiceName::new("api").unwrap(),
        version: semver::Version::new(1, 0, 0),
        entrypoint: RelPath::new("bin/api").unwrap(),
        sequence: 1,
        target: Target::new(ARMV7_TARGET).unwrap(),
        kind: None,
        expires: None,
        build: Default::default(),
        health: Default::default(),
        reload: Vec::new(),
        run: Default::default(),
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A small service tree: an executable, a config, a nested data file.
fn service_tree(root: &Path) {
    write(&root.join("bin/api"), b"\x7fELF not really", 0o755);
    write(&root.join("etc/api.toml"), b"port = 8080\n", 0o600);
    write(&root.join("share/data/z.txt"), &vec![b'z'; 10_000], 0o644);
    write(&root.join("share/a.txt"), b"a", 0o664);
}

#[test]
fn same_tree_packs_to_the_same_bytes_whatever_the_mtimes_and_order() {
    let scratch = tempfile::tempdir().unwrap();
    let (one, two) = (scratch.path().join("one"), scratch.path().join("two"));
    service_tree(&one);
    // Build the second tree in another order, with other times and modes
    // that reduce to the same 0644/0755.
    write(&two.join("share/a.txt"), b"a", 0o644);
    write(&two.join("share/data/z.txt"), &vec![b'z'; 10_000], 0o600);
    write(&two.join("etc/api.toml"), b"port = 8080\n", 0o644);
    write(&two.join("bin/api"), b"\x7fELF not really", 0o700);
    let old = fs::File::options()
        .write(true)
        .open(two.join("etc/api.toml"))
        .unwrap();
    old.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();

    let a = package(&request(&one), &scratch.path().join("out-a")).unwrap();
    let b = package(&request(&two), &scratch.path().join("out-b")).unwrap();
    let bytes_a = fs::read(&a.artifact).unwrap();
    assert_eq!(bytes_a, fs::read(&b.artifact).unwrap());
    assert_eq!(a.manifest, b.manifest);
    assert_eq!(a.manifest.artifact.sha256, Sha256Digest::of(&bytes_a));
    assert_eq!(a.manifest.artifact.size, bytes_a.len() as u64);
    assert_eq!(a.artifact.file_name().unwrap(), "api-1.0.0.tar.gz");
    assert_eq!(
        a.manifest_path.file_name().unwrap(),
        "api-1.0.0.manifest.json"
    );
    // The manifest on disk is the one returned.
    let on_disk =
        ferry_protocol::Manifest::from_json(&fs::read(&a.manifest_path).unwrap()).unwrap();
    assert_eq!(on_disk, a.manifest);
}

#[test]
fn a_content_change_changes_the_hash() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    service_tree(&tree);
    let before = package(&request(&tree), &scratch.path().join("out")).unwrap();
    write(&tree.join("etc/api.toml"), b"port = 8081\n", 0o644);
    let after = package(&request(&tree), &scratch.path().join("out")).unwrap();
    assert_ne!(
        before.manifest.artifact.sha256,
        after.manifest.artifact.sha256
    );
}

#[test]
fn archive_is_sorted_owned_by_root_and_dated_zero() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    service_tree(&tree);
    let out = package(&request(&tree), &scratch.path().join("out")).unwrap();

    let gz = flate2::read::GzDecoder::new(fs::File::open(&out.artifact).unwrap());
    let mut archive = tar::Archive::new(gz);
    let mut listing = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
            (0, 0, 0)
        );
        listing.push(format!(
            "{} {:o} {}",
            entry.path().unwrap().display(),
            h.mode().unwrap(),
            h.size().unwrap()
        ));
    }
    assert_eq!(
        listing,
        [
            "bin/ 755 0",
            "bin/api 755 15",
            "etc/ 755 0",
            "etc/api.toml 644 12",
            "share/ 755 0",
            "share/a.txt 644 1",
            "share/data/ 755 0",
            "share/data/z.txt 644 10000",
        ]
    );
    assert_eq!(out.manifest.limits.entries, 8);
    assert_eq!(out.manifest.limits.unpacked_bytes, 15 + 12 + 1 + 10_000);
}

#[test]
fn refuses_links_and_special_files_naming_the_path() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    service_tree(&tree);
    std::os::unix::fs::symlink("/etc/passwd", tree.join("etc/passwd")).unwrap();
    let err = package(&request(&tree), &scratch.path().join("out")).unwrap_err();
    assert!(
        matches!(&err, PackageError::UnsupportedEntry { kind: "symbolic link", path } if path.ends_with("etc/passwd")),
        "{err}"
    );
    // Nothing was written.
    assert!(!scratch.path().join("out").exists());

    fs::remove_file(tree.join("etc/passwd")).unwrap();
    mkfifo(&tree.join("share/pipe"));
    let err = package(&request(&tree), &scratch.path().join("out")).unwrap_err();
    assert!(
        matches!(
            err,
            PackageError::UnsupportedEntry {
                kind: "named pipe",
                ..
            }
        ),
        "{err}"
    );
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn entrypoint_must_exist_and_be_executable() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    service_tree(&tree);

    let mut missing = request(&tree);
    missing.entrypoint = RelPath::new("bin/nope").unwrap();
    let err = package(&missing, &scratch.path().join("out")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "entrypoint bin/nope: not found in the directory"
    );

    let mut not_exec = request(&tree);
    not_exec.entrypoint = RelPath::new("etc/api.toml").unwrap();
    let err = package(&not_exec, &scratch.path().join("out")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "entrypoint etc/api.toml: is not executable (chmod +x it)"
    );

    let mut dir = request(&tree);
    dir.entrypoint = RelPath::new("bin").unwrap();
    assert!(matches!(
        package(&dir, &scratch.path().join("out")),
        Err(PackageError::Entrypoint {
            reason: "is a directory",
            ..
        })
    ));
}

#[test]
fn kind_is_detected_from_go_build_info() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    service_tree(&tree);
    let c = package(&request(&tree), &scratch.path().join("out")).unwrap();
    assert_eq!(c.manifest.kind, ArtifactKind::C);

    let mut go_binary = b"\x7fELF...".to_vec();
    go_binary.extend_from_slice(b"\xff Go buildinf:\x08\x02");
    write(&tree.join("bin/api"), &go_binary, 0o755);
    let go = package(&request(&tree), &scratch.path().join("out")).unwrap();
    assert_eq!(go.manifest.kind, ArtifactKind::Go);

    let mut forced = request(&tree);
    forced.kind = Some(ArtifactKind::C);
    assert_eq!(
        package(&forced, &scratch.path().join("out"))
            .unwrap()
            .manifest
            .kind,
        ArtifactKind::C
    );
}

#[test]
fn not_a_directory_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        package(&request(&file), &scratch.path().join("out")),
        Err(PackageError::NotADirectory(_))
    ));
}
