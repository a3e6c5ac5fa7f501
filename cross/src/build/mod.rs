//! `ferry build go|c`: compiling a service for the devices and packaging it.
//!
//! A build compiles the entrypoint into a scratch release tree
//! (`bin/SERVICE`, plus the files the operator adds), checks its ELF header
//! against the target exactly as devices will, and packages the tree with
//! [`crate::package`]. The manifest records the compiler, the flags and the
//! source's git commit. C builds keep their debug info in a `.debug` file
//! beside the package: it never ships, but it symbolises a crash report.

mod c;
mod debuginfo;
mod go;
mod tool;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ferry_protocol::elf::{ELF_HEADER_LEN, ElfError, check_elf};
use ferry_protocol::manifest::{ArtifactKind, BuildInfo, HealthSettings, ReloadRule, RunSettings};
use ferry_protocol::names::ARMV7_TARGET;
use ferry_protocol::{RelPath, ServiceName, Target, Timestamp};

use crate::package::{PackageError, PackageRequest, Packaged, package};

pub use c::{CBuild, build_c};
pub use go::{GoBuild, build_go};

/// What a build becomes: the release settings shared by Go and C builds.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The source directory (a Go module, or C sources / a Makefile).
    pub source: PathBuf,
    /// The service the release belongs to; the program is `bin/SERVICE`.
    pub service: ServiceName,
    /// The release's version; also compiled into the program.
    pub version: semver::Version,
    /// The release's sequence number (anti-rollback).
    pub sequence: u64,
    /// A directory whose contents are added to the release beside `bin/`
    /// (configuration, assets).
    pub files: Option<PathBuf>,
    /// When devices should stop accepting the release.
    pub expires: Option<Timestamp>,
    /// The health gate devices apply.
    pub health: HealthSettings,
    /// Paths devices watch, and what they do on a change.
    pub reload: Vec<ReloadRule>,
    /// How devices run the service: arguments, environment, user, stop.
    pub run: RunSettings,
    /// Names the tool in the manifest, e.g. `ferry 0.1.0`.
    pub packager: Option<String>,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// The package and its unsigned manifest.
    pub packaged: Packaged,
    /// The separated debug info (C builds), kept beside the package.
    pub debug_file: Option<PathBuf>,
    /// The debug info of programs among `--files`, kept beside it too.
    pub helper_debug_files: Vec<PathBuf>,
    /// Size in bytes of the entrypoint as shipped.
    pub program_size: u64,
    /// What the build did that the operator should know: a version that
    /// was not stamped into the program, say.
    pub warnings: Vec<String>,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A toolchain program is not installed.
    #[error("`{program}` was not found: {hint}")]
    ToolMissing {
        /// The program looked for.
        program: String,
        /// What to do about it (the Debian package to install, say).
        hint: String,
    },
    /// A toolchain program ran and failed.
    #[error("{program} failed ({status}): {command}\n{output}")]
    ToolFailed {
        /// The program.
        program: String,
        /// Its command line.
        command: String,
        /// How it ended.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// The source directory is not what this kind of build needs.
    #[error("{dir}: {reason}")]
    Source {
        /// The source directory.
        dir: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// The program was built, but not for the devices.
    #[error(
        "{program}: {error} (the build did not cross-compile; check that it uses $(CC) and $(CFLAGS))"
    )]
    WrongBinary {
        /// The program built.
        program: PathBuf,
        /// What its ELF header says.
        error: ElfError,
    },
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What went wrong.
        error: io::Error,
    },
    /// Packaging the built tree failed.
    #[error(transparent)]
    Package(#[from] PackageError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |error| BuildError::Io {
        path: path.to_owned(),
        error,
    }
}

/// The target every build produces code for.
pub fn device_target() -> Target {
    // The constant is a valid triple; `Target::new` only checks the form.
    Target::new(ARMV7_TARGET).unwrap_or_else(|_| unreachable!("ARMV7_TARGET is a valid triple"))
}

/// A scratch directory in `out_dir`, removed when dropped: the release tree
/// under `tree/`, and room beside it for what must not ship (debug info).
struct Stage {
    scratch: tempfile::TempDir,
    tree: PathBuf,
    program: PathBuf,
    entrypoint: RelPath,
}

impl Stage {
    fn new(request: &BuildRequest, out_dir: &Path) -> Result<Self, BuildError> {
        fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
        let scratch = tempfile::Builder::new()
            .prefix(".ferry-build-")
            .tempdir_in(out_dir)
            .map_err(io_err(out_dir))?;
        let tree = scratch.path().join("tree");
        let bin = tree.join("bin");
        fs::create_dir_all(&bin).map_err(io_err(&bin))?;
        let entrypoint = format!("bin/{}", request.service);
        let entrypoint = RelPath::new(entrypoint).map_err(|e| BuildError::Source {
            dir: request.source.clone(),
            reason: format!("service name does not make a release path: {}", e.reason),
        })?;
        Ok(Self {
            program: tree.join(entrypoint.as_str()),
            tree,
            scratch,
            entrypoint,
        })
    }

    /// A path in the scratch directory, outside the release tree.
    fn aside(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Refuses a program devices would refuse (the same ELF check they run).
    fn check_program(&self) -> Result<(), BuildError> {
        check_program(&self.program)
    }

    /// Adds the operator's files to the tree and packages it. A program
    /// among the files has its debug info kept apart like the entrypoint's,
    /// in `SERVICE-VERSION.PATH.debug` beside the package (those paths are
    /// returned).
    fn finish(
        &self,
        request: &BuildRequest,
        kind: ArtifactKind,
        build: BuildInfo,
        out_dir: &Path,
    ) -> Result<(Packaged, u64, Vec<PathBuf>), BuildError> {
        let program_size = fs::metadata(&self.program)
            .map_err(io_err(&self.program))?
            .len();
        let mut debug_files = Vec::new();
        if let Some(files) = &request.files {
            copy_tree(files, &self.tree)?;
            // A program among the files must be built for the devices too.
            crate::programs::check_tree(&self.tree, &self.entrypoint, &device_target()).map_err(
                |reason| BuildError::Source {
                    dir: files.clone(),
                    reason,
                },
            )?;
            let mut helpers = Vec::new();
            with_debug_info(&self.tree, &mut helpers)?;
            for helper in helpers.into_iter().filter(|h| *h != self.program) {
                let relative = helper.strip_prefix(&self.tree).unwrap_or(&helper);
                let name = format!(
                    "{}-{}.{}.debug",
                    request.service,
                    request.version,
                    relative.to_string_lossy().replace('/', "_")
                );
                let aside = self.aside(&name);
                debuginfo::split(&helper, &aside)?;
                debug_files.push((aside, out_dir.join(name)));
            }
        }
        let packaged = package(
            &PackageRequest {
                dir: self.tree.clone(),
                service: request.service.clone(),
                version: request.version.clone(),
                entrypoint: self.entrypoint.clone(),
                sequence: request.sequence,
                target: device_target(),
                kind: Some(kind),
                expires: request.expires,
                build,
                health: request.health.clone(),
                reload: request.reload.clone(),
                run: request.run.clone(),
            },
            out_dir,
        )?;
        // The package is in place; the debug files join it.
        let mut kept = Vec::new();
        for (aside, beside) in debug_files {
            fs::rename(&aside, &beside).map_err(io_err(&beside))?;
            kept.push(beside);
        }
        Ok((packaged, program_size, kept))
    }
}

/// ELF files under `dir` that carry DWARF (a `.debug_info` section).
fn with_debug_info(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), BuildError> {
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = item.map_err(io_err(dir))?.path();
        if path.is_dir() {
            with_debug_info(&path, found)?;
        } else if path.is_file() {
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let debug = b".debug_info";
            if bytes.starts_with(b"\x7fELF") && bytes.windows(debug.len()).any(|w| w == debug) {
                found.push(path);
            }
        }
    }
    Ok(())
}

fn check_program(program: &Path) -> Result<(), BuildError> {
    let mut file = fs::File::open(program).map_err(io_err(program))?;
    let mut header = Vec::with_capacity(ELF_HEADER_LEN);
    (&mut file)
        .take(ELF_HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(io_err(program))?;
    check_elf(&header, &device_target()).map_err(|error| BuildError::WrongBinary {
        program: program.to_owned(),
        error,
    })
}

/// Copies the contents of `from` into `to`, refusing anything but files and
/// directories (the packager would refuse them anyway; this says where).
fn copy_tree(from: &Path, to: &Path) -> Result<(), BuildError> {
    for item in fs::read_dir(from).map_err(io_err(from))? {
        let item = item.map_err(io_err(from))?;
        let source = item.path();
        let target = to.join(item.file_name());
        let kind = item.file_type().map_err(io_err(&source))?;
        if kind.is_dir() {
            fs::create_dir_all(&target).map_err(io_err(&target))?;
            copy_tree(&source, &target)?;
        } else if kind.is_file() {
            if target.exists() {
                return Err(BuildError::Source {
                    dir: from.to_owned(),
                    reason: format!("{} would replace a file the build made", source.display()),
                });
            }
            fs::copy(&source, &target).map_err(io_err(&source))?;
        } else {
            return Err(BuildError::Source {
                dir: from.to_owned(),
                reason: format!(
                    "{}: only regular files and directories can be released",
                    source.display()
                ),
            });
        }
    }
    Ok(())
}

fn build_info(
    request: &BuildRequest,
    compiler: String,
    flags: String,
    git_commit: Option<String>,
) -> BuildInfo {
    BuildInfo {
        packager: request.packager.clone(),
        compiler: Some(compiler),
        flags: Some(flags),
        git_commit,
    }
}
