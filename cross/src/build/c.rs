//! `ferry build c`: an ARMv7 C program built with the cross toolchain,
//! either by compiling the directory's `.c` files or through its Makefile.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_protocol::manifest::ArtifactKind;

use super::tool::{self, ARM_GCC, MAKE};
use super::{BuildError, BuildRequest, Built, Stage, build_info, debuginfo, io_err};

/// The code generation flags every C build for the devices uses: ARMv7-A
/// with NEON, tuned for the Cortex-A9, hard-float ABI; `-g` so there is
/// debug info to keep apart.
pub const DEVICE_CFLAGS: &str =
    "-O2 -march=armv7-a -mfpu=neon -mtune=cortex-a9 -mfloat-abi=hard -g";

/// The prefix of the cross toolchain's programs, as Makefiles expect it.
pub const CROSS_COMPILE: &str = "arm-linux-gnueabihf-";

/// C-specific build settings.
#[derive(Debug, Clone, Default)]
pub struct CBuild {
    /// Link statically: the program then needs nothing from the device's libc.
    pub static_link: bool,
    /// With a Makefile: the program it builds, relative to the source
    /// directory (the service name by default).
    pub binary: Option<PathBuf>,
    /// Flags added after [`DEVICE_CFLAGS`].
    pub extra_cflags: Vec<String>,
}

/// Builds the C program in `request.source` for the devices and packages it
/// into `out_dir`, with its debug info in `out_dir/SERVICE-VERSION.debug`.
///
/// With a `Makefile` (or `makefile`, `GNUmakefile`), runs `make -B` in the
/// source directory with `CC`, `CFLAGS`, `LDFLAGS`, `CROSS_COMPILE`,
/// `VERSION` and `COMMIT` set on its command line. Otherwise compiles every
/// `.c` file at the top of the directory into one program, with
/// `FERRY_VERSION` and `FERRY_COMMIT` defined as string literals.
pub fn build_c(
    request: &BuildRequest,
    settings: &CBuild,
    out_dir: &Path,
) -> Result<Built, BuildError> {
    let compiler = format!(
        "{} {}",
        ARM_GCC.program,
        ARM_GCC.first_line(["-dumpfullversion"])?
    );
    let commit = tool::git_commit(&request.source);
    let mut cflags = DEVICE_CFLAGS.to_owned();
    for flag in &settings.extra_cflags {
        cflags.push(' ');
        cflags.push_str(flag);
    }
    let ldflags = if settings.static_link { "-static" } else { "" };

    let stage = Stage::new(request, out_dir)?;
    let flags = if has_makefile(&request.source) {
        // make runs on a copy: the ARM objects it leaves stay out of the
        // user's tree (and an object left there from a host build cannot
        // end up in the program).
        let source = stage.scratch.path().join("source");
        copy_sources(&request.source, &source)?;
        let mut make = MAKE.command();
        // -B: the Makefile cannot see that VERSION or CFLAGS changed, and a
        // program left from an earlier build must never ship as this one.
        make.current_dir(&source)
            .arg("-B")
            .arg(format!("-j{}", jobs()))
            .arg(format!("CC={}", ARM_GCC.program))
            .arg(format!("CROSS_COMPILE={CROSS_COMPILE}"))
            .arg(format!("CFLAGS={cflags}"))
            .arg(format!("LDFLAGS={ldflags}"))
            .arg(format!("VERSION={}", request.version))
            .arg(format!("COMMIT={}", commit.as_deref().unwrap_or("unknown")));
        MAKE.run(&mut make)?;
        let binary = settings
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(request.service.as_str()));
        let built = source.join(&binary);
        if !built.is_file() {
            return Err(BuildError::Source {
                dir: request.source.clone(),
                reason: format!(
                    "make succeeded but did not produce {} (name the program with --binary)",
                    binary.display()
                ),
            });
        }
        fs::copy(&built, &stage.program).map_err(io_err(&built))?;
        format!("make CFLAGS='{cflags}' LDFLAGS='{ldflags}'")
    } else {
        let sources = c_sources(&request.source)?;
        let mut gcc = ARM_GCC.command();
        gcc.args(cflags.split_whitespace())
            .arg(format!("-DFERRY_VERSION=\"{}\"", request.version))
            .arg(format!(
                "-DFERRY_COMMIT=\"{}\"",
                commit.as_deref().unwrap_or("unknown")
            ))
            .arg("-I")
            .arg(&request.source)
            .args(&sources)
            .arg("-o")
            .arg(&stage.program);
        if settings.static_link {
            gcc.arg("-static");
        }
        ARM_GCC.run(&mut gcc)?;
        format!("{cflags} {ldflags}").trim_end().to_owned()
    };

    stage.check_program()?;
    let warnings = unstamped_version(&stage.program, &request.version.to_string())?;
    let debug_name = format!("{}-{}.debug", request.service, request.version);
    let debug_aside = stage.aside(&debug_name);
    debuginfo::split(&stage.program, &debug_aside)?;
    let (packaged, program_size, helper_debug_files) = stage.finish(
        request,
        ArtifactKind::C,
        build_info(request, compiler, flags, commit),
        out_dir,
    )?;
    // The package is in place; the debug file joins it (same filesystem).
    let debug_file = out_dir.join(&debug_name);
    fs::rename(&debug_aside, &debug_file).map_err(io_err(&debug_file))?;
    Ok(Built {
        packaged,
        debug_file: Some(debug_file),
        helper_debug_files,
        program_size,
        warnings,
    })
}

/// A warning when the release's version does not occur in the program: its
/// build ignores `VERSION` (or `FERRY_VERSION`), so it cannot report it.
fn unstamped_version(program: &Path, version: &str) -> Result<Vec<String>, BuildError> {
    let bytes = fs::read(program).map_err(io_err(program))?;
    let found = bytes
        .windows(version.len().max(1))
        .any(|w| w == version.as_bytes());
    Ok(if found {
        Vec::new()
    } else {
        vec![format!(
            "the version {version} does not occur in the program: its build ignores VERSION (a Makefile) or FERRY_VERSION (plain sources), so it cannot report the version it is"
        )]
    })
}

/// Copies a source tree for a build: files, directories and links as they
/// are, without `.git`.
fn copy_sources(from: &Path, to: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(to).map_err(io_err(to))?;
    for item in fs::read_dir(from).map_err(io_err(from))? {
        let item = item.map_err(io_err(from))?;
        if item.file_name() == ".git" {
            continue;
        }
        let (source, target) = (item.path(), to.join(item.file_name()));
        let kind = item.file_type().map_err(io_err(&source))?;
        if kind.is_dir() {
            copy_sources(&source, &target)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&source).map_err(io_err(&source))?;
            std::os::unix::fs::symlink(link, &target).map_err(io_err(&target))?;
        } else if kind.is_file() {
            fs::copy(&source, &target).map_err(io_err(&source))?;
        }
    }
    Ok(())
}

fn has_makefile(dir: &Path) -> bool {
    ["GNUmakefile", "makefile", "Makefile"]
        .iter()
        .any(|name| dir.join(name).is_file())
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `.c` files at the top of `dir`, in name order (so builds repeat).
fn c_sources(dir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let mut sources = Vec::new();
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = item.map_err(io_err(dir))?.path();
        if path.extension().is_some_and(|e| e == "c") && path.is_file() {
            sources.push(path);
        }
    }
    if sources.is_empty() {
        return Err(BuildError::Source {
            dir: dir.to_owned(),
            reason: "no .c files and no Makefile to build".into(),
        });
    }
    sources.sort();
    Ok(sources)
}
