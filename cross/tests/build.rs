//! `ferry build go|c` for real: the sample services in cross/samples built
//! with the Go toolchain and the ARM cross compiler, their packages unpacked
//! and their programs run under qemu-arm (binfmt_misc, as scripts/setup
//! registers it).

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ferry_cross::{BuildError, BuildRequest, Built, CBuild, GoBuild, build_c, build_go};
use ferry_protocol::elf::check_elf;
use ferry_protocol::manifest::ArtifactKind;
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{ServiceName, Target};

/// Where the ARM C library lives for dynamically linked programs under qemu.
const ARM_SYSROOT: &str = "/usr/arm-linux-gnueabihf";

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples")
}

/// A copy of a sample, so builds never write into the source tree.
fn copy_sample(name: &str, to: &Path) -> PathBuf {
    let dest = to.join(name);
    copy_dir(&samples().join(name), &dest);
    dest
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for item in fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            fs::copy(item.path(), target).unwrap();
        }
    }
}

/// Makes `dir` a git repository with one commit; returns the commit.
fn git_commit_all(dir: &Path) -> String {
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=Ferry Tests",
                "-c",
                "user.email=tests@ferry.invalid",
            ])
            .args(args)
            .output()
            .expect("git not found");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "sample"]);
    git(&["rev-parse", "HEAD"])
}

fn request(source: &Path, service: &str, version: &str) -> BuildRequest {
    BuildRequest {
        source: source.to_owned(),
        service: ServiceName::new(service).unwrap(),
        version: version.parse().unwrap(),
        sequence: 1,
        files: None,
        expires: None,
        health: Default::default(),
        reload: Vec::new(),
        run: Default::default(),
        packager: Some("ferry tests".into()),
    }
}

/// Unpacks a built package into `to`; returns the program's path.
fn unpack(built: &Built, to: &Path) -> PathBuf {
    let file = fs::File::open(&built.packaged.artifact).unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(to)
        .unwrap();
    to.join(built.packaged.manifest.entrypoint.as_str())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running program, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` in `dir` (which gets a `port` file) and returns the body
/// of its answer to GET /version.
fn run_and_ask(program: &Path, dir: &Path, sysroot: Option<&str>) -> String {
    assert!(
        Path::new("/proc/sys/fs/binfmt_misc/qemu-arm").exists(),
        "qemu-arm is not registered with binfmt_misc; run scripts/setup"
    );
    let port = free_port();
    fs::write(dir.join("port"), port.to_string()).unwrap();
    let mut command = Command::new(program);
    command.current_dir(dir);
    command.env_remove("QEMU_LD_PREFIX");
    if let Some(sysroot) = sysroot {
        command.env("QEMU_LD_PREFIX", sysroot);
    }
    let mut running = Running(command.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream
                .write_all(b"GET /version HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
            return body.trim().to_owned();
        }
        if let Some(status) = running.0.try_wait().unwrap() {
            panic!("{} exited early: {status}", program.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            program.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn readelf(args: &[&str], file: &Path) -> String {
    let out = Command::new("arm-linux-gnueabihf-readelf")
        .args(args)
        .arg(file)
        .output()
        .expect("arm-linux-gnueabihf-readelf not found; run scripts/setup");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_arm(program: &Path) {
    let bytes = fs::read(program).unwrap();
    check_elf(&bytes, &Target::new(ARMV7_TARGET).unwrap()).unwrap();
}

#[test]
fn go_service_is_built_for_armv7_stamped_with_version_and_commit_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("hello-go", dir.path());
    let commit = git_commit_all(&source);

    let built = build_go(
        &request(&source, "hello-go", "1.4.2"),
        &GoBuild::default(),
        &dir.path().join("out"),
    )
    .unwrap();
    let manifest = &built.packaged.manifest;
    assert_eq!(manifest.kind, ArtifactKind::Go);
    assert_eq!(manifest.target.as_str(), ARMV7_TARGET);
    assert_eq!(manifest.entrypoint.as_str(), "bin/hello-go");
    assert_eq!(manifest.build.git_commit.as_deref(), Some(commit.as_str()));
    assert!(
        manifest
            .build
            .compiler
            .as_deref()
            .unwrap()
            .starts_with("go1.")
    );
    let flags = manifest.build.flags.as_deref().unwrap();
    for expected in [
        "GOARCH=arm",
        "GOARM=7",
        "CGO_ENABLED=0",
        "-s -w",
        "-X main.version=1.4.2",
    ] {
        assert!(flags.contains(expected), "{expected} missing from {flags}");
    }
    assert!(built.debug_file.is_none());

    let tree = dir.path().join("unpacked");
    let program = unpack(&built, &tree);
    assert_arm(&program);
    // -s -w: no symbol table; static (no interpreter) since cgo is off.
    assert!(!readelf(&["-S"], &program).contains(".symtab"));
    assert!(!readelf(&["-l"], &program).contains("interpreter"));
    assert_eq!(
        run_and_ask(&program, &tree, None),
        format!("hello-go 1.4.2 {commit}")
    );
}

#[test]
fn go_builds_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("hello-go", dir.path());
    let req = request(&source, "hello-go", "1.0.0");
    let first = build_go(&req, &GoBuild::default(), &dir.path().join("a")).unwrap();
    let second = build_go(&req, &GoBuild::default(), &dir.path().join("b")).unwrap();
    assert_eq!(
        first.packaged.manifest.artifact.sha256,
        second.packaged.manifest.artifact.sha256
    );
    // No git here: no commit is claimed.
    assert_eq!(first.packaged.manifest.build.git_commit, None);
}

#[test]
fn c_sources_are_built_with_debug_info_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    // The .c file alone, no Makefile: ferry compiles it directly.
    fs::copy(samples().join("hello-c/hello.c"), source.join("hello.c")).unwrap();
    let commit = git_commit_all(&source);
    let out = dir.path().join("out");

    let built = build_c(
        &request(&source, "hello-c", "2.0.1"),
        &CBuild::default(),
        &out,
    )
    .unwrap();
    let manifest = &built.packaged.manifest;
    assert_eq!(manifest.kind, ArtifactKind::C);
    assert!(
        manifest
            .build
            .compiler
            .as_deref()
            .unwrap()
            .starts_with("arm-linux-gnueabihf-gcc ")
    );
    let flags = manifest.build.flags.as_deref().unwrap();
    assert!(flags.contains("-march=armv7-a -mfpu=neon -mtune=cortex-a9 -mfloat-abi=hard"));

    // The debug info sits beside the package and holds the DWARF...
    let debug = built.debug_file.clone().unwrap();
    assert_eq!(debug, out.join("hello-c-2.0.1.debug"));
    assert!(readelf(&["-S"], &debug).contains(".debug_info"));
    // ...which the shipped program no longer has, but it names the file.
    let tree = dir.path().join("unpacked");
    let program = unpack(&built, &tree);
    assert_arm(&program);
    let sections = readelf(&["-S"], &program);
    assert!(!sections.contains(".debug_info"), "{sections}");
    let link = readelf(&["--string-dump=.gnu_debuglink"], &program);
    assert!(link.contains("hello-c-2.0.1.debug"), "{link}");
    // The debug file is not in the package.
    assert!(!tree.join("hello-c-2.0.1.debug").exists());

    assert_eq!(
        run_and_ask(&program, &tree, Some(ARM_SYSROOT)),
        format!("hello-c 2.0.1 {commit}")
    );
}

#[test]
fn c_makefile_builds_statically_and_always_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("hello-c", dir.path());
    let settings = CBuild {
        static_link: true,
        ..CBuild::default()
    };
    let first = build_c(
        &request(&source, "hello-c", "1.0.0"),
        &settings,
        &dir.path().join("a"),
    )
    .unwrap();
    // Same sources, new version: make must not keep the 1.0.0 program.
    let built = build_c(
        &request(&source, "hello-c", "1.1.0"),
        &settings,
        &dir.path().join("b"),
    )
    .unwrap();
    assert_ne!(
        first.packaged.manifest.artifact.sha256,
        built.packaged.manifest.artifact.sha256
    );
    assert!(
        built
            .packaged
            .manifest
            .build
            .flags
            .as_deref()
            .unwrap()
            .contains("LDFLAGS='-static'")
    );

    let tree = dir.path().join("unpacked");
    let program = unpack(&built, &tree);
    assert!(!readelf(&["-l"], &program).contains("interpreter"));
    // Static: runs with no ARM C library around.
    assert_eq!(run_and_ask(&program, &tree, None), "hello-c 1.1.0 unknown");
}

#[test]
fn files_are_added_beside_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("hello-c", dir.path());
    let files = dir.path().join("files");
    fs::create_dir_all(files.join("etc")).unwrap();
    fs::write(files.join("etc/app.conf"), "level = 3\n").unwrap();
    let mut req = request(&source, "hello-c", "1.0.0");
    req.files = Some(files);
    let built = build_c(&req, &CBuild::default(), &dir.path().join("out")).unwrap();
    let tree = dir.path().join("unpacked");
    unpack(&built, &tree);
    assert_eq!(
        fs::read_to_string(tree.join("etc/app.conf")).unwrap(),
        "level = 3\n"
    );
    assert_eq!(built.packaged.manifest.limits.entries, 4); // bin, bin/hello-c, etc, etc/app.conf
}

#[test]
fn a_makefile_that_ignores_cc_is_caught_before_packaging() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("hello-c", dir.path());
    // A Makefile that hard-codes the host compiler: an x86-64 program.
    fs::write(
        source.join("Makefile"),
        "hello-c: hello.c\n\tcc -O2 -o $@ hello.c\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let error = build_c(
        &request(&source, "hello-c", "1.0.0"),
        &CBuild::default(),
        &out,
    )
    .unwrap_err();
    assert!(matches!(error, BuildError::WrongBinary { .. }), "{error}");
    assert!(error.to_string().contains("x86-64"), "{error}");
    // Nothing was written but the (empty) output directory.
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn broken_sources_fail_with_the_compilers_words() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(
        source.join("main.c"),
        "int main(void) { return missing_symbol; }\n",
    )
    .unwrap();
    let error = build_c(
        &request(&source, "x", "1.0.0"),
        &CBuild::default(),
        &dir.path().join("out"),
    )
    .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, BuildError::ToolFailed { .. }), "{text}");
    assert!(text.contains("missing_symbol"), "{text}");

    let no_module = dir.path().join("go");
    fs::create_dir_all(&no_module).unwrap();
    fs::write(no_module.join("main.go"), "package main\nfunc main() {}\n").unwrap();
    let error = build_go(
        &request(&no_module, "x", "1.0.0"),
        &GoBuild::default(),
        &dir.path().join("out"),
    )
    .unwrap_err();
    assert!(error.to_string().contains("go mod init"), "{error}");
}

/// The current Go that `scripts/setup` keeps under target/.
fn current_go() -> PathBuf {
    let go = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go-1.27.3/go/bin/go");
    assert!(
        go.is_file(),
        "{} is missing; run scripts/setup",
        go.display()
    );
    go
}

#[test]
fn a_module_that_needs_a_current_go_builds_with_the_go_named_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("greeter", dir.path());
    // Debian's Go 1.19 cannot read a go.mod that names a toolchain: the
    // build fails with go's own words and says how to choose another Go.
    let error = build_go(
        &request(&source, "greeter", "1.0.0"),
        &GoBuild::default(),
        &dir.path().join("old"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("unknown directive: toolchain"), "{error}");
    assert!(error.contains("--go"), "{error}");

    let built = build_go(
        &request(&source, "greeter", "1.0.0"),
        &GoBuild {
            go: Some(current_go()),
            ..GoBuild::default()
        },
        &dir.path().join("new"),
    )
    .unwrap();
    let compiler = built.packaged.manifest.build.compiler.clone().unwrap();
    assert!(compiler.starts_with("go1.27.3 ("), "{compiler}");
    assert!(compiler.ends_with("from --go)"), "{compiler}");
    assert!(built.warnings.is_empty(), "{:?}", built.warnings);
    assert!(
        built
            .packaged
            .manifest
            .build
            .flags
            .as_deref()
            .unwrap()
            .contains("GOTOOLCHAIN=local")
    );
    let tree = dir.path().join("unpacked");
    let program = unpack(&built, &tree);
    assert_arm(&program);
}

#[test]
fn a_version_the_program_cannot_carry_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    // Go: `version` is a constant, which -X cannot set.
    let go = dir.path().join("constant");
    fs::create_dir_all(&go).unwrap();
    fs::write(
        go.join("go.mod"),
        "module example.com/constant\n\ngo 1.19\n",
    )
    .unwrap();
    fs::write(
        go.join("main.go"),
        "package main\n\nimport \"fmt\"\n\nconst version = \"2.8.1\"\n\nvar commit = \"\"\n\nfunc main() { fmt.Println(version, commit) }\n",
    )
    .unwrap();
    let built = build_go(
        &request(&go, "constant", "2.8.2"),
        &GoBuild::default(),
        &dir.path().join("go-out"),
    )
    .unwrap();
    assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
    assert!(
        built.warnings[0].contains("-X main.version=... had no effect"),
        "{:?}",
        built.warnings
    );
    // The hello-go sample declares both variables: no warning.
    let hello = copy_sample("hello-go", dir.path());
    let built = build_go(
        &request(&hello, "hello-go", "1.0.0"),
        &GoBuild::default(),
        &dir.path().join("hello-out"),
    )
    .unwrap();
    assert!(built.warnings.is_empty(), "{:?}", built.warnings);

    // C: a Makefile that never passes VERSION to the compiler.
    let c = copy_sample("hello-c", dir.path());
    fs::write(
        c.join("Makefile"),
        "hello-c: hello.c\n\t$(CC) $(CFLAGS) -o $@ hello.c $(LDFLAGS)\n",
    )
    .unwrap();
    let built = build_c(
        &request(&c, "hello-c", "7.7.7"),
        &CBuild::default(),
        &dir.path().join("c-out"),
    )
    .unwrap();
    assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
    assert!(
        built.warnings[0].contains("7.7.7 does not occur in the program"),
        "{:?}",
        built.warnings
    );
}

#[test]
fn make_runs_outside_the_source_tree() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("tinyhttpd", dir.path());
    let before: Vec<_> = fs::read_dir(&source)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    build_c(
        &request(&source, "tinyhttpd", "1.0.0"),
        &CBuild::default(),
        &dir.path().join("out"),
    )
    .unwrap();
    let after: Vec<_> = fs::read_dir(&source)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "the build left {after:?} in the source"
    );
}

#[test]
fn programs_among_the_files_are_checked_and_their_debug_info_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let source = copy_sample("hello-c", dir.path());
    let files = dir.path().join("files");
    fs::create_dir_all(files.join("libexec")).unwrap();
    let helper_c = dir.path().join("helper.c");
    fs::write(&helper_c, "int main(void) { return 0; }\n").unwrap();
    let compile = |compiler: &str, out: &Path| {
        let status = Command::new(compiler)
            .args(["-g", "-O2", "-o"])
            .arg(out)
            .arg(&helper_c)
            .status()
            .unwrap();
        assert!(status.success());
    };
    compile("arm-linux-gnueabihf-gcc", &files.join("libexec/helper"));
    let mut req = request(&source, "hello-c", "1.0.0");
    req.files = Some(files.clone());
    let out = dir.path().join("out");
    let built = build_c(&req, &CBuild::default(), &out).unwrap();
    let kept = out.join("hello-c-1.0.0.libexec_helper.debug");
    assert_eq!(built.helper_debug_files, std::slice::from_ref(&kept));
    assert!(readelf(&["-S"], &kept).contains(".debug_info"));
    let tree = dir.path().join("unpacked");
    unpack(&built, &tree);
    let shipped = readelf(&["-S"], &tree.join("libexec/helper"));
    assert!(!shipped.contains(".debug_info"), "{shipped}");
    assert!(shipped.contains(".gnu_debuglink"), "{shipped}");
    // The operator's own copy keeps its debug info.
    assert!(readelf(&["-S"], &files.join("libexec/helper")).contains(".debug_info"));

    // A helper built for this machine instead: refused, by name.
    compile("cc", &files.join("libexec/helper"));
    let error = build_c(&req, &CBuild::default(), &dir.path().join("x86")).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("libexec/helper: built for x86-64"),
        "{error}"
    );
}
